//! Where a client connects: parsing the `--addr` / `IPC_ADDR` forms users type.

use std::fmt;
use std::path::PathBuf;

use crate::Error;

/// A parsed node address.
///
/// Accepted forms:
/// - `http://host:port` and `https://host:port` (TLS needs the `tls` feature);
/// - `host:port`, taken as `http://host:port`, as grpcurl accepts it;
/// - a Unix socket: an absolute path (`/run/ipc/ipc.sock`) or `unix:PATH`
///   (`unix:/run/ipc.sock`, `unix:///run/ipc.sock`, or a relative `unix:ipc.sock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP endpoint, always with its scheme: `http://…` or `https://…`.
    Tcp(http::Uri),
    /// A Unix domain socket, e.g. the sidecar's socket in a pod.
    Unix(PathBuf),
}

impl Address {
    /// Parses one of the accepted forms; any other input is [`Error::Config`].
    pub fn parse(addr: &str) -> Result<Self, Error> {
        let addr = addr.trim();
        let invalid = |why: &str| Error::Config(format!("invalid address {addr:?}: {why}"));
        if addr.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(rest) = addr.strip_prefix("unix:") {
            // `unix:///abs` is the URI form of `unix:/abs`; both name the same path.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(invalid("no socket path after `unix:`"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if addr.starts_with('/') {
            return Ok(Address::Unix(PathBuf::from(addr)));
        }
        let with_scheme = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let uri: http::Uri = with_scheme.parse().map_err(|e| invalid(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") if cfg!(feature = "tls") => {}
            Some("https") => {
                return Err(invalid(
                    "https needs ipc-client built with the `tls` feature",
                ));
            }
            _ => {
                return Err(invalid(
                    "expected http://, https://, a socket path or unix:PATH",
                ));
            }
        }
        let Some(authority) = uri.authority() else {
            return Err(invalid("no host"));
        };
        if authority.host().is_empty() {
            return Err(invalid("no host"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid("a node address has no path"));
        }
        Ok(Address::Tcp(uri))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(uri) => {
                // Print `http://h:p` rather than the normalised `http://h:p/`.
                let scheme = uri.scheme_str().unwrap_or("http");
                match uri.authority() {
                    Some(authority) => write!(f, "{scheme}://{authority}"),
                    None => write!(f, "{uri}"),
                }
            }
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Address::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str) -> Address {
        Address::Unix(PathBuf::from(path))
    }

    #[test]
    fn socket_paths_and_unix_urls_are_unix_addresses() {
        assert_eq!(
            Address::parse("/run/ipc/ipc.sock").unwrap(),
            unix("/run/ipc/ipc.sock")
        );
        assert_eq!(
            Address::parse("unix:/run/ipc.sock").unwrap(),
            unix("/run/ipc.sock")
        );
        assert_eq!(
            Address::parse("unix:///run/ipc.sock").unwrap(),
            unix("/run/ipc.sock")
        );
        assert_eq!(Address::parse("unix:ipc.sock").unwrap(), unix("ipc.sock"));
        assert_eq!(Address::parse(" /a.sock ").unwrap(), unix("/a.sock"));
    }

    #[test]
    fn http_addresses_keep_host_and_port() {
        let addr = Address::parse("http://127.0.0.1:7700").unwrap();
        assert_eq!(addr.to_string(), "http://127.0.0.1:7700");
        let addr = Address::parse("http://ipc.example:80/").unwrap();
        assert_eq!(addr.to_string(), "http://ipc.example:80");
    }

    #[test]
    fn bare_host_port_means_http() {
        let addr = Address::parse("localhost:7700").unwrap();
        assert_eq!(addr.to_string(), "http://localhost:7700");
    }

    #[test]
    fn https_depends_on_the_tls_feature() {
        let parsed = Address::parse("https://ipc.example:443");
        if cfg!(feature = "tls") {
            assert_eq!(parsed.unwrap().to_string(), "https://ipc.example:443");
        } else {
            let err = parsed.unwrap_err().to_string();
            assert!(err.contains("`tls` feature"), "{err}");
        }
    }

    #[test]
    fn rejects_what_cannot_be_a_node_address() {
        for bad in [
            "",
            "unix:",
            "ftp://x:1",
            "http://",
            "http://h:1/ipc",
            "http://h:1/?q",
            "a b",
        ] {
            let err = Address::parse(bad).expect_err(bad);
            assert!(matches!(err, Error::Config(_)), "{bad}: {err}");
            assert!(err.to_string().contains("invalid address"), "{bad}: {err}");
        }
    }

    #[test]
    fn display_round_trips_through_parse() {
        for addr in ["http://127.0.0.1:1", "unix:/x/y.sock", "unix:rel.sock"] {
            let parsed = Address::parse(addr).unwrap();
            assert_eq!(Address::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }
}
