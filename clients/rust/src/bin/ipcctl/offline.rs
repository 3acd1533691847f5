//! The commands that need no server: `token new` and `inject`.

use std::io;
use std::process::ExitCode;

use crate::exit::{self, fail};

/// `ipcctl token new NAME`: the secret goes to stderr so that redirecting stdout
/// into the tokens file never writes it there.
pub fn new_token(name: &str) -> ExitCode {
    match ipc_proto::token::new_token(name) {
        Ok((secret, entry)) => {
            eprintln!(
                "secret (shown once; clients send `authorization: Bearer <secret>`): {secret}"
            );
            print!("{entry}");
            ExitCode::SUCCESS
        }
        Err(err) => fail(exit::BAD_INPUT, &err),
    }
}

/// `ipcctl inject`: reads the manifest, prints it injected; warnings on stderr.
pub fn inject(file: &str, sidecar: &ipc_inject::InjectConfig) -> ExitCode {
    let text = if file == "-" {
        io::read_to_string(io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    let text = match text {
        Ok(text) => text,
        Err(err) => return fail(exit::BAD_INPUT, &format!("reading {file}: {err}")),
    };
    match ipc_inject::inject_manifests_report(&text, sidecar) {
        Ok(out) => {
            for warning in &out.warnings {
                eprintln!("ipcctl: warning: {warning}");
            }
            print!("{}", out.yaml);
            ExitCode::SUCCESS
        }
        Err(err) => fail(exit::BAD_INPUT, &format!("{file}: {err}")),
    }
}
