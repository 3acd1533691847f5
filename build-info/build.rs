//! Finds the git commit being built, for `ipc_build_info{commit}`: `IPC_GIT_COMMIT`
//! when set (an image built without `.git`), else `git rev-parse HEAD`, else
//! `unknown` (a source tarball). Reruns when HEAD moves, so a new commit is seen
//! without rebuilding anything else.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=IPC_GIT_COMMIT");
    let commit = std::env::var("IPC_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let head_ref = git(&["rev-parse", "--symbolic-full-name", "HEAD"]);
    let watched = [
        git(&["rev-parse", "--git-path", "HEAD"]),
        head_ref.and_then(|r| git(&["rev-parse", "--git-path", &r])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ];
    // Only files that exist: cargo reruns on every build for a missing one.
    for path in watched.into_iter().flatten() {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=IPC_GIT_COMMIT={commit}");
}
