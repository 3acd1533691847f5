//! A fleet worker: subscribes as role `worker`, answers `config:get`, obeys
//! `worker:restart`.
//!
//! ```text
//! cargo run -p ipc-server &
//! cargo run -p ipc-client --example worker -- --addr http://127.0.0.1:7700 --app shop
//! ipcctl --app shop send :worker config:get --data '{"key":"db_url"}'
//! ipcctl --app shop broadcast :worker worker:restart --data '{"grace":5}'
//! ```
//!
//! Flags: `--addr ADDR` (or `IPC_ADDR`, default `http://127.0.0.1:7700`; a socket path
//! works too), `--app APP` (or `IPC_APP`), `--tag TAG`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipc_client::{Client, Handlers, Msg, SubscribeOptions};
use serde_json::json;

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
    let restarts = Arc::new(AtomicU64::new(0));

    let mut handlers = Handlers::new();
    handlers.on("ipc:subscribed", |msg| async move {
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
    let counter = Arc::clone(&restarts);
    handlers.on("worker:restart", move |msg: Msg| {
        let counter = Arc::clone(&counter);
        async move {
            // A real worker would drain and re-exec here; this one counts restarts.
            let generation = counter.fetch_add(1, Ordering::SeqCst) + 1;
            let grace = msg.data["grace"].as_u64().unwrap_or(0);
            println!(
                "worker: restart #{generation} requested by {} (grace {grace}s)",
                msg.sender
            );
            Ok(json!({"generation": generation}))
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

    let mut options = SubscribeOptions::new().role("worker");
    if let Some(tag) = args.tag {
        options = options.tag(tag);
    }
    handlers.run(&client, options).await?;
    Ok(())
}

struct Args {
    addr: String,
    app: Option<String>,
    tag: Option<String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            addr: std::env::var("IPC_ADDR").unwrap_or_else(|_| "http://127.0.0.1:7700".into()),
            app: std::env::var("IPC_APP").ok().filter(|a| !a.is_empty()),
            tag: None,
        };
        let mut argv = std::env::args().skip(1);
        while let Some(flag) = argv.next() {
            let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--addr" => args.addr = value()?,
                "--app" => args.app = Some(value()?),
                "--tag" => args.tag = Some(value()?),
                other => {
                    return Err(format!(
                        "unknown argument {other:?}; use --addr, --app, --tag"
                    ));
                }
            }
        }
        Ok(args)
    }
}
