//! Flags and `IPC_*` environment variables, and what they resolve to: the pod's
//! identity, the upstream addresses, the hooks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ipc_core::channel;
use ipc_core::node::args::NodeArgs;

/// The per-pod sidecar of fleet-ipc: serves the ipc.v1.Ipc API on a Unix socket to the
/// pod's processes and keeps the pod connected to the control plane.
#[derive(Debug, Clone, Parser)]
#[command(name = "ipc-sidecar", version)]
// The same flag as the server's; its help names whose queue it is here: the pod's
// local processes'.
#[command(mut_arg("subscriber_queue", |arg| arg.help(
    "Messages queued per local subscriber before it is cut off as too slow"
)))]
pub struct Config {
    /// Unix socket to serve ipc.v1.Ipc on. Its directory is created; a stale socket
    /// of a dead sidecar is replaced, a live one is refused.
    #[arg(
        long,
        env = "IPC_SOCKET",
        default_value = "/var/run/fleet-ipc/ipc.sock"
    )]
    pub socket: PathBuf,
    /// Permissions of the socket file, in octal.
    #[arg(long, env = "IPC_SOCKET_MODE", default_value = "0660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Owner of the socket file, `UID[:GID]` or `:GID` (numeric), so that app
    /// containers running as another user can connect; default: the sidecar's user.
    #[arg(long, env = "IPC_SOCKET_OWNER", value_parser = parse_owner)]
    pub socket_owner: Option<SocketOwner>,
    /// Control-plane address, `host:port` or `http(s)://host:port`. Repeat the flag or
    /// separate with commas: tried in turn.
    #[arg(
        long = "upstream",
        env = "IPC_UPSTREAM",
        value_delimiter = ',',
        default_value = "127.0.0.1:7700",
        value_parser = parse_upstream
    )]
    pub upstream: Vec<String>,
    /// App id of the pod, and the default for local callers' `:channel` names.
    #[arg(long, env = "IPC_APP", default_value = "app")]
    pub app: String,
    /// Role of the pod: it is subscribed upstream to `app:role`, so that operators can
    /// broadcast to (and hooks can serve) every pod of the role.
    #[arg(long, env = "IPC_ROLE")]
    pub role: Option<String>,
    /// Tag of the pod (with a role): subscribed to `app:role:tag` as well.
    #[arg(long, env = "IPC_TAG")]
    pub tag: Option<String>,
    /// Pod name (label `pod`, part of the pod's id); default: $POD_NAME.
    #[arg(long, env = "IPC_POD")]
    pub pod: Option<String>,
    /// Pod namespace (label `namespace`); default: $POD_NAMESPACE.
    #[arg(long, env = "IPC_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes node of the pod (label `node`); default: $NODE_NAME.
    #[arg(long = "node-name", env = "IPC_NODE_NAME")]
    pub node_name: Option<String>,
    /// The pod's subscriber id upstream (a channel operators can target); default:
    /// `pod-<namespace>-<pod>`, or `pod-<hostname>` outside Kubernetes.
    #[arg(long, env = "IPC_ID")]
    pub id: Option<String>,
    /// This sidecar's node name (in `ipc:subscribed` and `reply_to`); default: the pod id.
    #[arg(long, env = "IPC_NODE")]
    pub node: Option<String>,
    /// A label of the pod, `key=value`; repeat the flag or separate with commas.
    #[arg(long = "label", env = "IPC_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Also serve ipc.v1.Ipc on this loopback TCP address (`127.0.0.1:PORT`,
    /// `[::1]:PORT`; port 0 picks a free one), for gRPC clients that cannot dial a
    /// Unix socket. Loopback only: callers are trusted as the pod's own processes,
    /// as on the socket, so the API must not be reachable from outside the pod.
    #[arg(long, env = "IPC_LISTEN_TCP", value_parser = parse_loopback)]
    pub listen_tcp: Option<SocketAddr>,
    /// TCP address for health: gRPC health (grpc.health.v1), `/healthz`, `/readyz`
    /// and `/metrics`. In a pod give a fixed port on all interfaces for the kubelet's
    /// probes (the injector passes `0.0.0.0:7701`).
    #[arg(long, env = "IPC_HEALTH_LISTEN", default_value = "127.0.0.1:0")]
    pub health_listen: SocketAddr,
    /// `OP=COMMAND`: run COMMAND with `/bin/sh -c` when a message of op OP arrives on
    /// the pod's channels, the message as JSON on stdin. Repeatable (in the
    /// environment, one per line).
    #[arg(long = "hook", env = "IPC_HOOKS", value_delimiter = '\n', value_parser = parse_hook)]
    pub hooks: Vec<(String, String)>,
    /// Longest a hook may run before it is killed: `30s`, `500ms`, `2m` or seconds.
    #[arg(long, env = "IPC_HOOK_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub hook_timeout: Duration,
    /// File with a bearer token sent upstream (`authorization` metadata); read at
    /// every connection, so a rotated token is picked up.
    #[arg(long, env = "IPC_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM certificate authority that signed the control plane's certificate, for
    /// `https://` upstreams (default: the system's roots).
    #[arg(long, env = "IPC_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// PEM client certificate presented upstream (mTLS); needs --upstream-key.
    #[arg(long, env = "IPC_UPSTREAM_CERT", requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,
    /// PEM private key of --upstream-cert.
    #[arg(long, env = "IPC_UPSTREAM_KEY", requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// Upstream messages kept for local subscribers that resume with a cursor.
    #[arg(long, env = "IPC_BUFFER", default_value_t = 10_000)]
    pub buffer: usize,
    /// Bytes of upstream messages kept at most (the oldest go first).
    #[arg(long, env = "IPC_BUFFER_BYTES", default_value_t = 16 << 20)]
    pub buffer_bytes: usize,
    /// Longest a connection attempt to an upstream address may take.
    #[arg(long, env = "IPC_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Longest an upstream Broadcast, Reply or Members call may take.
    #[arg(long, env = "IPC_UPSTREAM_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// How often the upstream connection is pinged (HTTP/2 PING). A replica that
    /// leaves a ping unanswered for three such periods is given up (it hangs, or
    /// the network does) and the pod resumes on the next address with its cursor.
    #[arg(long, env = "IPC_UPSTREAM_KEEPALIVE", default_value = "1s", value_parser = parse_duration)]
    pub upstream_keepalive: Duration,
    /// Largest pause between reconnection attempts (exponential backoff with jitter).
    #[arg(long, env = "IPC_RECONNECT_MAX", default_value = "5s", value_parser = parse_duration)]
    pub reconnect_max: Duration,
    /// Longest a local Subscribe waits for the upstream subscription to include its
    /// channels before it is answered anyway.
    #[arg(long, env = "IPC_COVER_WAIT", default_value = "3s", value_parser = parse_duration)]
    pub cover_wait: Duration,
    /// `--max-msg-bytes`, `--subscriber-queue`, `--max-timeout-ms`, `--grace-ms`: as
    /// the server takes them.
    #[command(flatten)]
    pub node_args: NodeArgs,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "IPC_LOG_JSON")]
    pub log_json: bool,
    /// OTLP/gRPC collector to export trace spans to (`http://HOST:4317`); off when
    /// absent. The W3C `traceparent` of callers is passed on either way.
    #[arg(long, env = "IPC_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Who the pod is, as the control plane and operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// Subscriber id upstream; also a channel that reaches the pod.
    pub id: String,
    pub app: String,
    pub role: Option<String>,
    pub tag: Option<String>,
    /// The flags' labels plus `pod`, `namespace` and `node` when known.
    pub labels: HashMap<String, String>,
}

impl PodIdentity {
    /// The channels the pod listens to as itself: its id, `app:role`, `app:role:tag`.
    /// Hooks serve messages of these channels.
    pub fn channels(&self) -> Vec<String> {
        let mut channels = vec![self.id.clone()];
        if let Some(role) = &self.role {
            channels.push(format!("{}:{role}", self.app));
            if let Some(tag) = &self.tag {
                channels.push(format!("{}:{role}:{tag}", self.app));
            }
        }
        channels
    }
}

impl Config {
    /// Resolves the pod's identity from the flags and the Kubernetes downward-API
    /// variables, and checks every name.
    pub fn identity(&self) -> anyhow::Result<PodIdentity> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let pod = self.pod.clone().or_else(|| env("POD_NAME"));
        let namespace = self.namespace.clone().or_else(|| env("POD_NAMESPACE"));
        let node = self.node_name.clone().or_else(|| env("NODE_NAME"));
        channel::check_segment("--app", &self.app).map_err(anyhow::Error::msg)?;
        if let Some(role) = &self.role {
            channel::check_segment("--role", role).map_err(anyhow::Error::msg)?;
        }
        if let Some(tag) = &self.tag {
            if self.role.is_none() {
                anyhow::bail!("--tag needs --role: the tag channel is app:role:tag");
            }
            channel::check_segment("--tag", tag).map_err(anyhow::Error::msg)?;
        }
        let id = match (&self.id, &pod) {
            (Some(id), _) => id.clone(),
            (None, Some(pod)) => match &namespace {
                Some(ns) => format!("pod-{ns}-{pod}"),
                None => format!("pod-{pod}"),
            },
            (None, None) => format!("pod-{}", ipc_core::node::hostname()),
        };
        channel::parse_name(&id, None)
            .map_err(|e| anyhow::anyhow!("the pod's id (--id, or from --pod/--namespace): {e}"))?;
        let mut labels: HashMap<String, String> = self.labels.iter().cloned().collect();
        for (key, value) in [("pod", pod), ("namespace", namespace), ("node", node)] {
            if let Some(value) = value {
                labels.entry(key.to_string()).or_insert(value);
            }
        }
        Ok(PodIdentity {
            id,
            app: self.app.clone(),
            role: self.role.clone(),
            tag: self.tag.clone(),
            labels,
        })
    }
}

/// The client TLS set-up for `https://` upstreams: the given CA (else the system's
/// roots) and, for mTLS, a client certificate. Files are read now, so a missing one
/// stops the sidecar at start with its name.
pub fn upstream_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    use anyhow::Context as _;
    let read = |path: &Path, what: &str| {
        std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
    };
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(read(
            ca,
            "--upstream-ca",
        )?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (cert, key) {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(cert, "--upstream-cert")?,
            read(key, "--upstream-key")?,
        ));
    }
    Ok(tls)
}

/// `0660`, `660` or `0o660`.
/// Numeric owner and group of the socket file; either may be left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

fn parse_owner(text: &str) -> Result<SocketOwner, String> {
    let number = |part: &str| -> Result<Option<u32>, String> {
        if part.is_empty() {
            return Ok(None);
        }
        part.parse()
            .map(Some)
            .map_err(|_| format!("{text:?}: owner must be numeric UID[:GID] or :GID"))
    };
    let (uid, gid) = text.split_once(':').unwrap_or((text, ""));
    let owner = SocketOwner {
        uid: number(uid)?,
        gid: number(gid)?,
    };
    if owner.uid.is_none() && owner.gid.is_none() {
        return Err(format!("{text:?}: give UID, UID:GID or :GID"));
    }
    Ok(owner)
}

fn parse_loopback(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an address (127.0.0.1:PORT or [::1]:PORT)"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: the pod's API has no authentication of its \
             own, so it is served on 127.0.0.1 or ::1 only"
        ));
    }
    Ok(addr)
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim_start_matches("0o");
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("{text:?} is not an octal file mode like 0660"))?;
    if mode > 0o777 {
        return Err(format!("{text:?} is not a file mode: at most 0777"));
    }
    Ok(mode)
}

/// `host:port` becomes `http://host:port`; `http(s)://host:port` is kept.
fn parse_upstream(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty upstream address".into());
    }
    let url = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    let uri: http_uri::Uri = url.parse().map_err(|e| {
        format!("{text:?} is not an address like host:port or http://host:port ({e})")
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {}
        _ => return Err(format!("{text:?}: the scheme must be http or https")),
    }
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err(format!(
            "{text:?}: give a host and a port, like ipc-server:7700"
        ));
    }
    Ok(url)
}

/// Re-export of the URI type tonic uses, so that addresses are checked as tonic will.
mod http_uri {
    pub use tonic::codegen::http::Uri;
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} is not key=value"))?;
    let key = key.trim();
    if key.is_empty() || key.len() > 128 {
        return Err(format!("label {text:?}: the key must be 1 to 128 bytes"));
    }
    Ok((key.to_string(), value.to_string()))
}

fn parse_hook(text: &str) -> Result<(String, String), String> {
    let (op, command) = text.split_once('=').ok_or_else(|| {
        format!("hook {text:?} is not OP=COMMAND, like worker:restart='kill -TERM 1'")
    })?;
    let op = op.trim();
    if op.is_empty() || op.len() > 256 || op.chars().any(char::is_control) {
        return Err(format!(
            "hook {text:?}: the op must be 1 to 256 printable bytes"
        ));
    }
    if command.trim().is_empty() {
        return Err(format!("hook {text:?}: the command is empty"));
    }
    Ok((op.to_string(), command.to_string()))
}

/// `30s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    ipc_proto::duration::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["ipc-sidecar"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn upstreams_are_urls_in_order() {
        let c = config(&["--upstream", "a:1,http://b:2", "--upstream", "c:3"]);
        assert_eq!(c.upstream, ["http://a:1", "http://b:2", "http://c:3"]);
        assert!(parse_upstream("no-port").is_err());
        assert!(parse_upstream("ftp://a:1").is_err());
    }

    #[test]
    fn identity_from_the_pod_and_labels() {
        let c = config(&[
            "--pod",
            "web-1",
            "--namespace",
            "shop",
            "--node-name",
            "n7",
            "--app",
            "shop",
            "--role",
            "web",
            "--tag",
            "eu",
            "--label",
            "zone=a",
        ]);
        let id = c.identity().unwrap();
        assert_eq!(id.id, "pod-shop-web-1");
        assert_eq!(id.labels["pod"], "web-1");
        assert_eq!(id.labels["namespace"], "shop");
        assert_eq!(id.labels["node"], "n7");
        assert_eq!(id.labels["zone"], "a");
        assert_eq!(id.channels(), ["pod-shop-web-1", "shop:web", "shop:web:eu"]);
    }

    /// A node flag left out gives the node's own default, as on the server.
    #[test]
    fn node_flags_left_out_give_the_node_defaults() {
        let node = config(&[]).node_args.node_config(String::new(), None);
        let default = ipc_core::NodeConfig {
            name: String::new(),
            ..ipc_core::NodeConfig::default()
        };
        assert_eq!(format!("{node:?}"), format!("{default:?}"));
        let command = <Config as clap::CommandFactory>::command();
        let queue = command
            .get_arguments()
            .find(|arg| arg.get_id() == "subscriber_queue")
            .unwrap();
        assert!(
            queue
                .get_help()
                .unwrap()
                .to_string()
                .contains("local subscriber"),
            "the sidecar's help names its local subscribers"
        );
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        assert!(parse_mode("0999").is_err());
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_label("novalue").is_err());
        assert!(parse_hook("no-command=").is_err());
        assert_eq!(
            parse_hook("worker:restart=kill -TERM 1"),
            Ok(("worker:restart".into(), "kill -TERM 1".into()))
        );
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        let c = config(&["--tag", "eu"]);
        assert!(c.identity().is_err(), "a tag without a role");
        let c = config(&["--id", "bad id"]);
        assert!(c.identity().is_err());
    }
}
