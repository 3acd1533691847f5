#!/usr/bin/env python3
"""An example worker: subscribes as role ``worker``, answers ``config:get`` and
restarts on ``worker:restart``.

    python clients/python/examples/worker.py --addr localhost:7700 --app shop --id worker-1

Then, from another terminal:

    grpcurl -plaintext -d '{"target":":worker","op":"config:get","data":{"key":"db"}}' \
        -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/SendMsg
    grpcurl -plaintext -d '{"target":":worker","op":"worker:restart","wave_size":2,"max_failures":0,"ready_timeout_ms":30000}' \
        -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/Rollout

It prints one JSON line per event on stdout (``subscribed``, ``config:get``,
``restart``, ``exit``). On ``worker:restart`` — a Rollout's request or a broadcast —
it answers, ends its subscription, and subscribes again under the same id, as a
process restarted by its supervisor (systemd, Kubernetes) does with a stable id such
as the pod name: a Rollout with ``ready_timeout_ms`` waits for exactly that before its
next wave. The request's ``ipc-op-id`` header names the operation, so a repeat of one
already done (a rerun after its coordinator died) is answered without restarting
again. SIGTERM and Ctrl-C stop it.
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
    parser.add_argument(
        "--id",
        default=os.environ.get("IPC_ID", ""),
        help="stable subscriber id, e.g. the pod name (default $IPC_ID, else the one the node assigns first)",
    )
    args = parser.parse_args()

    client = Client(args.addr, app=args.app)
    restarting = False
    done_operations: set[str] = set()  # ipc-op-id of the restarts already done

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
    def restart(msg: Msg) -> dict[str, Any]:
        nonlocal restarting
        operation = msg.headers.get("ipc-op-id", "")
        repeat = bool(operation) and operation in done_operations
        event("restart", channel=msg.channel, sender=msg.sender, id=msg.id, operation=operation, repeat=repeat)
        if repeat:
            return {"restarted": False, "reason": "already restarted for this operation"}
        done_operations.add(operation)
        # The answer goes out first; run() then returns and the loop below
        # subscribes again under the same id.
        restarting = True
        client.stop()
        return {"restarted": True}

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal terminated
        terminated = True
        client.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    terminated = False
    member_id = args.id
    while not terminated:
        client.run(role="worker", tag=args.tag, id=member_id)
        if not restarting:
            break
        # A real worker would reload code or configuration here.
        restarting = False
        member_id = client.id or member_id
    event("exit")
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
