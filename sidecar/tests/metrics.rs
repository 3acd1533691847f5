//! `/metrics` of both binaries, scraped live from a fleet of Redis, a replica and a
//! sidecar after some traffic: each scrape passes `promtool check metrics` and
//! carries the families an operator needs (build, process, per-RPC, Redis bus,
//! sidecar upstream and hooks), and every metric the shipped dashboard and alert
//! rules (deploy/monitoring) name is in them. The rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`).

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::RedisServer;
use serde_json::json;

/// `promtool` (Debian: /usr/bin, package `prometheus`).
fn promtool() -> PathBuf {
    ipc_testkit::find_program("promtool")
        .expect("promtool not found: install the Debian package `prometheus` (scripts/test does)")
}

/// Fails the test unless `promtool check metrics` accepts `text` without a remark.
fn promtool_check(what: &str, text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let output = child.wait_with_output().expect("waiting for promtool");
    let remarks = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && remarks.trim().is_empty(),
        "promtool check metrics refused the {what} scrape ({}): {remarks}\n{text}",
        output.status
    );
}

/// The value of the sample written exactly as `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

#[tokio::test]
async fn both_binaries_serve_metrics_promtool_accepts_with_what_operators_need() {
    let redis = RedisServer::start();
    let server = ServerProcess::start(&["--app", APP, "--redis", &redis.url()]);
    let sidecar = SidecarProcess::start(&server.url(), &["--hook", "check:version=exit 3"]);
    sidecar.wait_upstream(true).await;

    // Traffic through both: a broadcast from the pod to a local subscriber (via
    // the replica's Redis log), and a request from the fleet to the pod's hook.
    let mut pod = sidecar.client().await;
    let mut news = subscribe_to(&mut pod, &[":news"]).await;
    broadcast(&mut pod, ":news", "hello", json!({}))
        .await
        .unwrap();
    assert_eq!(next(&mut news).await.op, "hello");
    let mut operator = server.client().await;
    let reply = send(&mut operator, ":web", "check:version", 20_000)
        .await
        .expect("the hook's reply");
    assert_eq!(data(&reply)["exit_code"], 3);

    let server_text = scrape(server.metrics).await;
    let sidecar_text = scrape(sidecar.health).await;
    promtool_check("ipc-server", &server_text);
    promtool_check("ipc-sidecar", &sidecar_text);

    for text in [&server_text, &sidecar_text] {
        let build = text
            .lines()
            .find(|l| l.starts_with("ipc_build_info{"))
            .expect("ipc_build_info");
        assert!(
            build.starts_with(&format!(
                "ipc_build_info{{version=\"{}\",commit=\"",
                env!("CARGO_PKG_VERSION")
            )) && !build.contains("commit=\"\"")
                && build.ends_with("} 1"),
            "{build}"
        );
        assert!(sample(text, "process_resident_memory_bytes") > 0.0);
        assert!(sample(text, "process_open_fds") > 0.0);
        assert!(sample(text, "process_start_time_seconds") > 1.6e9);
        assert_eq!(sample(text, "ipc_bus_up"), 1.0);
    }

    // The replica: its callers' RPCs, and the Redis bus under it.
    assert!(
        sample(
            &server_text,
            "ipc_rpc_requests_total{method=\"SendMsg\",code=\"OK\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &server_text,
            "ipc_rpc_duration_seconds_count{method=\"Serve\",code=\"OK\"}"
        ) >= 1.0
    );
    assert_eq!(sample(&server_text, "ipc_redis_connected"), 1.0);
    assert!(sample(&server_text, "ipc_redis_append_batch_size_count") >= 1.0);
    assert!(sample(&server_text, "ipc_redis_xadd_duration_seconds_count") >= 1.0);
    assert_eq!(
        sample(
            &server_text,
            "ipc_redis_reconnects_total{connection=\"command\"}"
        ),
        0.0
    );
    assert!(sample(&server_text, "ipc_redis_tail_lag_seconds") >= 0.0);

    // The sidecar: the pod's RPCs, its upstream, its hooks.
    assert_eq!(
        sample(
            &sidecar_text,
            "ipc_rpc_requests_total{method=\"Broadcast\",code=\"OK\"}"
        ),
        1.0
    );
    assert_eq!(sample(&sidecar_text, "ipc_sidecar_upstream_connected"), 1.0);
    assert_eq!(
        sample(&sidecar_text, "ipc_sidecar_upstream_reconnects_total"),
        0.0
    );
    assert_eq!(
        sample(
            &sidecar_text,
            "ipc_sidecar_hook_runs_total{op=\"check:version\",status=\"3\"}"
        ),
        1.0
    );
    assert_eq!(sample(&sidecar_text, "ipc_subscribers"), 1.0);
    assert!(
        sidecar_text.contains("on this sidecar's socket")
            && server_text.contains("on this replica"),
        "help texts name the binary that serves them"
    );

    // Every metric the dashboard and the alerts use is served by a real binary.
    let served: BTreeSet<&str> = [&server_text, &sidecar_text]
        .into_iter()
        .flat_map(|text| text.lines())
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let named = monitoring_metrics();
    assert!(named.len() > 20, "too few metrics found: {named:?}");
    let missing: Vec<_> = named
        .iter()
        .filter(|m| !served.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "named in deploy/monitoring but served by no binary: {missing:?}"
    );
}

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

/// Metric names (`ipc_*`, `process_*`) in a PromQL expression.
fn metric_names(expr: &str) -> impl Iterator<Item = String> + '_ {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("ipc_") || word.starts_with("process_"))
        .map(str::to_string)
}

/// The alert rules of alerts.yaml, as YAML.
fn alert_rules() -> serde_yaml::Value {
    let text = std::fs::read_to_string(monitoring_dir().join("alerts.yaml")).expect("alerts.yaml");
    serde_yaml::from_str(&text).expect("alerts.yaml is YAML")
}

/// Every metric named by an expression of the dashboard or of the alert rules.
fn monitoring_metrics() -> BTreeSet<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring_dir().join("grafana-dashboard.json"))
            .expect("grafana-dashboard.json"),
    )
    .expect("the dashboard is JSON");
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            names.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    for group in alert_rules()["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            names.extend(metric_names(rule["expr"].as_str().expect("expr")));
        }
    }
    names
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = monitoring_dir();
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let output = Command::new(promtool())
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("running promtool");
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Each alert has a unit test.
    let tests = std::fs::read_to_string(dir.join("alerts.test.yaml")).expect("alerts.test.yaml");
    for group in alert_rules()["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert name");
            assert!(
                tests.contains(&format!("alertname: {alert}")),
                "no unit test of {alert} in alerts.test.yaml"
            );
        }
    }
}

#[test]
fn the_prometheus_rule_manifest_holds_the_same_rules_as_alerts_yaml() {
    let text = std::fs::read_to_string(monitoring_dir().join("prometheusrule.yaml"))
        .expect("prometheusrule.yaml");
    let manifest: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    assert_eq!(manifest["kind"], "PrometheusRule");
    assert_eq!(
        manifest["spec"],
        alert_rules(),
        "prometheusrule.yaml differs from alerts.yaml: regenerate it"
    );
}
