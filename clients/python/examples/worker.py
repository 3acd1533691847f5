#!/usr/bin/env python3
"""An example worker: subscribes as role ``worker``, answers ``config:get`` and obeys
``worker:restart``.

    python clients/python/examples/worker.py --addr localhost:7700 --app shop

Then, from another terminal:

    grpcurl -plaintext -d '{"target":":worker","op":"config:get","data":{"key":"db"}}' \
        -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/SendMsg
    grpcurl -plaintext -d '{"channel":":worker","op":"worker:restart"}' \
        -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/Broadcast

It prints one JSON line per event on stdout (``subscribed``, ``config:get``,
``restart``, ``exit``). On ``worker:restart`` it exits with status 0, as a worker
under a supervisor (systemd, Kubernetes, a process manager) does to be started
afresh; SIGTERM and Ctrl-C stop it the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

try:
    from fleet_ipc import Client, Msg
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fleet_ipc import Client, Msg

#: What this worker can tell about its configuration.
CONFIG: dict[str, Any] = {
    "db": "postgres://db.internal:5432/shop",
    "cache_ttl_s": 60,
    "features": ["search", "checkout"],
}


def event(name: str, **fields: Any) -> None:
    print(json.dumps({"event": name, **fields}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default=os.environ.get("IPC_ADDR", "localhost:7700"), help="server or sidecar")
    parser.add_argument("--app", default=os.environ.get("IPC_APP"), help="app id (ipc-app)")
    parser.add_argument("--tag", default="", help="also subscribe to <app>:worker:<tag>")
    parser.add_argument("--id", default="", help="subscriber id (generated when empty)")
    args = parser.parse_args()

    client = Client(args.addr, app=args.app)

    @client.on("ipc:subscribed")
    def subscribed(msg: Msg) -> None:
        event("subscribed", id=msg.data["id"], node=msg.data["node"])

    @client.on("config:get")
    def config_get(msg: Msg) -> dict[str, Any]:
        key = msg.data.get("key") if isinstance(msg.data, dict) else msg.data
        event("config:get", key=key, sender=msg.sender)
        if key not in CONFIG:
            # Becomes the reply's `error`: the caller sees it, the worker goes on.
            raise LookupError(f"unknown config key: {key!r}")
        return {"key": key, "value": CONFIG[key]}

    @client.on("worker:restart")
    def restart(msg: Msg) -> None:
        event("restart", channel=msg.channel, sender=msg.sender, id=msg.id)
        client.stop()

    def on_signal(signum: int, _frame: object) -> None:
        client.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    client.run(role="worker", tag=args.tag, id=args.id)
    event("exit")
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
