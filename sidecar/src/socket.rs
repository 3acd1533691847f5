//! The Unix socket the pod's processes connect to.
//!
//! A socket file left by a sidecar that died is replaced; one that still accepts
//! connections belongs to a live sidecar and is refused, so that two sidecars never
//! fight over one pod. The file is created with the requested mode (umask set around
//! `bind`, then `chmod`), and removed at shutdown if it is still ours.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {0:?} is longer than the 107 bytes a Unix socket path may have")]
    TooLong(PathBuf),
    #[error("creating the socket's directory {dir:?}: {source}")]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0:?} is served by a live process (another ipc-sidecar?); stop it or choose another --socket"
    )]
    InUse(PathBuf),
    #[error("{0:?} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A bound socket; dropping it removes the file if it is still the one we bound.
pub struct BoundSocket {
    path: PathBuf,
    inode: u64,
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` with permissions `mode` (and `owner`, if given), replacing a stale
/// socket file.
pub fn bind(
    path: &Path,
    mode: u32,
    owner: Option<crate::config::SocketOwner>,
) -> Result<(UnixListener, BoundSocket), SocketError> {
    if path.as_os_str().len() > 107 {
        return Err(SocketError::TooLong(path.to_path_buf()));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::Directory {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "replacing the stale socket of a sidecar that is gone");
                    std::fs::remove_file(path).map_err(|source| SocketError::Io {
                        what: "removing the stale socket",
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(SocketError::Io {
                        what: "checking the existing socket",
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Io {
                what: "checking",
                path: path.to_path_buf(),
                source,
            });
        }
    }
    // The umask makes the file appear with no more than `mode`, so that nobody can
    // connect in the moment between bind and chmod.
    let previous = umask(Mode::from_bits_truncate(!mode & 0o777));
    let bound = UnixListener::bind(path);
    umask(previous);
    let listener = bound.map_err(|source| SocketError::Io {
        what: "binding",
        path: path.to_path_buf(),
        source,
    })?;
    let io = |what| {
        move |source| SocketError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("setting permissions of"))?;
    if let Some(owner) = owner {
        nix::unistd::chown(
            path,
            owner.uid.map(nix::unistd::Uid::from_raw),
            owner.gid.map(nix::unistd::Gid::from_raw),
        )
        .map_err(|errno| io("changing the owner of")(std::io::Error::from(errno)))?;
    }
    let inode = std::fs::symlink_metadata(path)
        .map_err(io("reading"))?
        .ino();
    Ok((
        listener,
        BoundSocket {
            path: path.to_path_buf(),
            inode,
        },
    ))
}
