//! What the injected sidecar looks like: image, upstream, socket, resources.

use serde::{Deserialize, Serialize};

/// The container image that holds `ipc-server`, `ipc-sidecar` and `ipcctl`
/// (built by `deploy/docker/Dockerfile`); the tag follows the workspace version, and
/// `deploy/k8s` runs the control plane from the same image.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/fleet-ipc/fleet-ipc:", env!("CARGO_PKG_VERSION"));
/// The control plane's Service in `deploy/k8s`, as the sidecar's `--upstream`.
pub const DEFAULT_UPSTREAM: &str = "ipc-server.fleet-ipc.svc:7700";
/// The directory shared by the sidecar and the app containers (an `emptyDir`).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/fleet-ipc";
/// The sidecar's `--health-listen` port, probed by the kubelet.
pub const DEFAULT_HEALTH_PORT: u16 = 7701;
/// The Secret, in each pod's namespace, whose key `token` is the sidecar's bearer
/// token: `deploy/k8s/issue-token.sh NAMESPACE APP...` creates it.
pub const DEFAULT_TOKEN_SECRET: &str = "fleet-ipc-token";

/// How the webhook and `ipcctl inject` build the sidecar.
///
/// Every field has a default that matches `deploy/k8s`, so `InjectConfig::default()`
/// is right for a standard install; with the `clap` feature each field is also a
/// `--sidecar-*` flag with an `IPC_SIDECAR_*` environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct InjectConfig {
    /// Image of the injected sidecar container.
    #[cfg_attr(feature = "clap", arg(long = "sidecar-image", env = "IPC_SIDECAR_IMAGE", default_value = DEFAULT_IMAGE))]
    pub image: String,

    /// imagePullPolicy of the sidecar container (Always, IfNotPresent, Never; empty:
    /// the cluster's default).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "sidecar-image-pull-policy",
            env = "IPC_SIDECAR_IMAGE_PULL_POLICY",
            default_value = "IfNotPresent"
        )
    )]
    pub image_pull_policy: String,

    /// Control-plane address the sidecar connects to (`host:port` or
    /// `http(s)://host:port`).
    #[cfg_attr(feature = "clap", arg(long = "sidecar-upstream", env = "IPC_SIDECAR_UPSTREAM", default_value = DEFAULT_UPSTREAM))]
    pub upstream: String,

    /// Directory of the shared volume; the socket is `<dir>/ipc.sock`.
    #[cfg_attr(feature = "clap", arg(long = "sidecar-socket-dir", env = "IPC_SIDECAR_SOCKET_DIR", default_value = DEFAULT_SOCKET_DIR))]
    pub socket_dir: String,

    /// Port of the sidecar's health endpoint (`--health-listen 0.0.0.0:PORT`); it
    /// shares the pod's network namespace with the app, so pick one the app leaves
    /// free.
    #[cfg_attr(feature = "clap", arg(long = "sidecar-health-port", env = "IPC_SIDECAR_HEALTH_PORT", default_value_t = DEFAULT_HEALTH_PORT))]
    pub health_port: u16,

    /// CPU request of the sidecar (empty: none).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "sidecar-cpu-request",
            env = "IPC_SIDECAR_CPU_REQUEST",
            default_value = "10m"
        )
    )]
    pub cpu_request: String,

    /// Memory request of the sidecar (empty: none).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "sidecar-memory-request",
            env = "IPC_SIDECAR_MEMORY_REQUEST",
            default_value = "16Mi"
        )
    )]
    pub memory_request: String,

    /// CPU limit of the sidecar (empty, the default: none, so that it is never
    /// throttled while relaying a burst).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "sidecar-cpu-limit",
            env = "IPC_SIDECAR_CPU_LIMIT",
            default_value = ""
        )
    )]
    pub cpu_limit: String,

    /// Memory limit of the sidecar (empty: none).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "sidecar-memory-limit",
            env = "IPC_SIDECAR_MEMORY_LIMIT",
            default_value = "64Mi"
        )
    )]
    pub memory_limit: String,

    /// Name of a Secret in the pod's namespace with a `token` key: mounted read-only
    /// into the sidecar, its path given as `IPC_TOKEN_FILE`. Empty: no token (only
    /// for a control plane that accepts unauthenticated callers).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "sidecar-token-secret",
            env = "IPC_SIDECAR_TOKEN_SECRET",
            default_value = DEFAULT_TOKEN_SECRET
        )
    )]
    pub token_secret: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
            upstream: DEFAULT_UPSTREAM.to_owned(),
            socket_dir: DEFAULT_SOCKET_DIR.to_owned(),
            health_port: DEFAULT_HEALTH_PORT,
            cpu_request: "10m".to_owned(),
            memory_request: "16Mi".to_owned(),
            cpu_limit: String::new(),
            memory_limit: "64Mi".to_owned(),
            token_secret: DEFAULT_TOKEN_SECRET.to_owned(),
        }
    }
}

impl InjectConfig {
    /// The Unix socket the sidecar serves and the apps connect to.
    pub fn socket_path(&self) -> String {
        format!("{}/ipc.sock", self.socket_dir.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_document_means_defaults() {
        let config: InjectConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, InjectConfig::default());
        assert_eq!(config.socket_path(), "/var/run/fleet-ipc/ipc.sock");
    }

    #[test]
    fn a_misspelt_field_is_refused() {
        let err = serde_json::from_str::<InjectConfig>(r#"{"imagee": "x"}"#).unwrap_err();
        assert!(err.to_string().contains("imagee"), "{err}");
    }

    #[cfg(feature = "clap")]
    #[test]
    fn flag_defaults_equal_the_default_config() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            inject: InjectConfig,
        }
        let cli = Cli::try_parse_from(["test"]).unwrap();
        assert_eq!(cli.inject, InjectConfig::default());
    }
}
