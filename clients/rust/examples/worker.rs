//! A fleet worker: subscribes as role `worker`, answers `config:get`, restarts on
//! `worker:restart`.
//!
//! ```text
//! cargo run -p ipc-server &
//! cargo run -p ipc-client --example worker -- --addr http://127.0.0.1:7700 --app shop --id worker-1
//! ipcctl --app shop send :worker config:get --data '{"key":"db_url"}'
//! grpcurl -plaintext -d '{"target":":worker","op":"worker:restart","wave_size":2,"max_failures":0,"ready_timeout_ms":30000}' \
//!     -H 'ipc-app: shop' 127.0.0.1:7700 ipc.v1.Ipc/Rollout
//! ```
//!
//! On `worker:restart` (a Rollout's request or a broadcast) it answers, ends its
//! subscription and subscribes again under the same id — what a process restarted by
//! its supervisor does with a stable id such as the pod name, and what a Rollout with
//! `ready_timeout_ms` waits for before its next wave. The answer goes out before the
//! subscription ends: a subscription ended first would leave the request unanswered.
//! A repeat of an operation already done (the same `ipc-op-id` header, as a rerun
//! after the coordinating replica died sends) is answered without restarting again.
//!
//! Flags: `--addr ADDR` (or `IPC_ADDR`, default `http://127.0.0.1:7700`; a socket path
//! works too), `--app APP` (or `IPC_APP`), `--tag TAG`, `--id ID` (or `IPC_ID`; default:
//! the id the node assigns first, kept across restarts).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use ipc_client::{Client, Handlers, Msg, OP_SUBSCRIBED, SubscribeOptions};
use serde_json::json;

/// The header naming the operation (Gather, Rollout) a request belongs to; the same
/// on a rerun of that operation.
const OP_ID_HEADER: &str = "ipc-op-id";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse()?;
    let mut builder = Client::builder(&args.addr);
    if let Some(app) = &args.app {
        builder = builder.app(app);
    }
    // Lazy: the worker may start before the node; the subscription waits for it.
    let client = builder.connect_lazy()?;

    let config = Arc::new(BTreeMap::from([
        ("db_url".to_owned(), json!("postgres://db.internal/shop")),
        ("pool_size".to_owned(), json!(16)),
    ]));
    // The operations whose restart this worker did (a real worker would keep them
    // where a restart does not lose them).
    let restarted_for: Arc<Mutex<HashSet<String>>> = Arc::default();

    let mut handlers = Handlers::new();
    handlers.on(OP_SUBSCRIBED, |msg| async move {
        // Printed so that scripts (and the tests) know the worker is live.
        println!(
            "worker: subscribed id={} node={}",
            msg.data["id"], msg.data["node"]
        );
        Ok(json!(null))
    });
    handlers.on("ipc:gap", |msg| async move {
        println!("worker: missed messages: {}", msg.data);
        Ok(json!(null))
    });
    let settings = Arc::clone(&config);
    handlers.on("config:get", move |msg| {
        let settings = Arc::clone(&settings);
        async move {
            let key = msg.data["key"]
                .as_str()
                .ok_or("config:get needs {\"key\": …}")?;
            settings
                .get(key)
                .cloned()
                .ok_or_else(|| format!("no config key {key:?}"))
        }
    });
    let done = Arc::clone(&restarted_for);
    handlers.on("worker:restart", move |msg: Msg| {
        let done = Arc::clone(&done);
        async move {
            let operation = msg.headers.get(OP_ID_HEADER).cloned().unwrap_or_default();
            let mut done = done.lock().expect("restart bookkeeping");
            if !operation.is_empty() && !done.insert(operation.clone()) {
                println!("worker: restart for {operation} already done");
                return Ok(
                    json!({"restarted": false, "reason": "already restarted for this operation"}),
                );
            }
            let grace = msg.data["grace"].as_u64().unwrap_or(0);
            println!(
                "worker: restart requested by {} (grace {grace}s)",
                msg.sender
            );
            Ok(json!({"restarted": true}))
        }
    });

    // `emit` dispatches in-process, as backendjs's emitMsg: the same handlers serve
    // local callers.
    let local = Msg {
        op: "config:get".into(),
        data: json!({"key": "pool_size"}),
        ..Msg::default()
    };
    println!(
        "worker: local config:get pool_size = {:?}",
        handlers.emit(local).await
    );

    let mut id = args.id.unwrap_or_default();
    loop {
        let mut options = SubscribeOptions::new().role("worker");
        if let Some(tag) = &args.tag {
            options = options.tag(tag.clone());
        }
        if !id.is_empty() {
            options = options.id(id.clone());
        }
        id = serve_until_restart(&client, &handlers, options).await?;
        // A real worker would drain and reload its code or configuration here.
        println!("worker: restarting as {id}");
    }
}

/// Handles messages one at a time, answering requests with the handler's result,
/// until a restart has been answered; then ends the subscription (by dropping it)
/// and returns the subscriber id to subscribe again under.
async fn serve_until_restart(
    client: &Client,
    handlers: &Handlers,
    options: SubscribeOptions,
) -> Result<String, ipc_client::Error> {
    let mut messages = client.subscribe(options);
    let mut id = String::new();
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        if msg.op == OP_SUBSCRIBED {
            id = msg.data["id"].as_str().unwrap_or_default().to_owned();
        }
        let answer = handlers
            .emit(msg.clone())
            .await
            .unwrap_or_else(|| Err(format!("no handler for op {:?}", msg.op)));
        let restart = msg.op == "worker:restart"
            && matches!(&answer, Ok(data) if data["restarted"] == json!(true));
        if msg.is_request() {
            let reply = match answer {
                Ok(data) => client.reply(&msg.reply_to, &msg.op, data),
                Err(error) => client
                    .reply(&msg.reply_to, &msg.op, json!(null))
                    .error(error),
            };
            if let Err(error) = reply.await {
                println!(
                    "worker: the answer to {} was not delivered: {error}",
                    msg.op
                );
            }
        }
        if restart {
            return Ok(id);
        }
    }
    Err(ipc_client::Error::Unreachable(
        "the subscription ended".into(),
    ))
}

struct Args {
    addr: String,
    app: Option<String>,
    tag: Option<String>,
    id: Option<String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            addr: std::env::var("IPC_ADDR").unwrap_or_else(|_| "http://127.0.0.1:7700".into()),
            app: std::env::var("IPC_APP").ok().filter(|a| !a.is_empty()),
            tag: None,
            id: std::env::var("IPC_ID").ok().filter(|id| !id.is_empty()),
        };
        let mut argv = std::env::args().skip(1);
        while let Some(flag) = argv.next() {
            let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--addr" => args.addr = value()?,
                "--app" => args.app = Some(value()?),
                "--tag" => args.tag = Some(value()?),
                "--id" => args.id = Some(value()?),
                other => {
                    return Err(format!(
                        "unknown argument {other:?}; use --addr, --app, --tag, --id"
                    ));
                }
            }
        }
        Ok(args)
    }
}
