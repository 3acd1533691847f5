//! The exit statuses scripts act on, and the one stderr line of a failure.

use std::process::ExitCode;

use ipc_client::Error;

/// The exit statuses, shown by `ipcctl --help` and documented in the README.
pub const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  any other failure
  2  bad input or usage (including INVALID_ARGUMENT from the server)
  3  no responders for the target
  4  deadline exceeded (no reply in time)
  5  the reply carried `error` (the reply is still printed)
  6  server unreachable
  7  permission denied or unauthenticated
  8  refused: `lock` not acquired or lost, `unlock` released nothing, `limit` over the rate,
     `gather`/`rollout` key in use by a run still going
  9  `gather`/`rollout`: some members failed or did not answer (the summary names them)
 10  `rollout`: stopped by its failure budget (--max-failures); the rest were not asked
`ipcctl lock NAME -- CMD` otherwise exits with CMD's status.";

pub const OTHER: u8 = 1;
pub const BAD_INPUT: u8 = 2;
pub const NO_RESPONDERS: u8 = 3;
pub const DEADLINE: u8 = 4;
pub const REPLY_ERROR: u8 = 5;
pub const UNREACHABLE: u8 = 6;
pub const DENIED: u8 = 7;
pub const REFUSED: u8 = 8;
pub const SOME_FAILED: u8 = 9;
pub const STOPPED: u8 = 10;

/// Prints the one stderr line for a failed call and picks its exit status.
pub fn report(addr: &str, err: &Error) -> ExitCode {
    let message = match err {
        Error::Unreachable(detail) if !detail.contains(addr) => {
            format!("server unreachable at {addr}: {detail}")
        }
        other => other.to_string(),
    };
    fail(exit_code(err), &message)
}

pub fn exit_code(err: &Error) -> u8 {
    match err {
        // A FAILED_PRECONDITION is an operation key reused for another operation.
        Error::Config(_) | Error::InvalidArgument(_) | Error::FailedPrecondition(_) => BAD_INPUT,
        Error::NoResponders { .. } => NO_RESPONDERS,
        Error::DeadlineExceeded(_) => DEADLINE,
        Error::ReplyError(_) => REPLY_ERROR,
        Error::Unreachable(_) => UNREACHABLE,
        Error::PermissionDenied(_) | Error::Unauthenticated(_) => DENIED,
        // `Error` is non-exhaustive: anything new is "another failure" until mapped.
        _ => OTHER,
    }
}

pub fn fail(code: u8, message: &str) -> ExitCode {
    // One line, whatever the server put in its message.
    let message = message.replace(['\n', '\r'], " ");
    eprintln!("ipcctl: {message}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_documented_exit_status() {
        let msg = Box::new(ipc_client::Msg::default());
        let cases = [
            (Error::Config("bad addr".into()), 2),
            (Error::InvalidArgument("bad channel".into()), 2),
            (Error::NoResponders { target: "x".into() }, 3),
            (Error::DeadlineExceeded("late".into()), 4),
            (Error::ReplyError(msg), 5),
            (Error::Unreachable("refused".into()), 6),
            (Error::PermissionDenied("no".into()), 7),
            (Error::Unauthenticated("who".into()), 7),
            (Error::FailedPrecondition("key used before".into()), 2),
            (Error::Other(tonic::Status::not_found("late reply")), 1),
        ];
        for (err, code) in cases {
            assert_eq!(exit_code(&err), code, "{err}");
            assert!(
                EXIT_CODES.contains(&format!("  {code}  ")),
                "{code} undocumented"
            );
        }
    }
}
