#!/usr/bin/env python3
"""A worker process for the fleet-operation tests, with a chosen behaviour, that
writes what happens to it to a shared events file — so the tests judge what the
workers saw, not what the timing suggests.

    fleet_worker.py --addr ADDR --id w1 --behaviour ok --events FILE [--hold-ms 100]

Behaviours, for every request (Gather, Rollout, SendMsg):
- ``ok``: answers ``{"member": ID}``;
- ``error``: answers with ``error`` set;
- ``silent``: never answers;
- ``restart``: answers, ends its subscription and subscribes again under its id;
- ``gone``: answers, ends its subscription and exits (it never comes back);
- ``stall-first``: never answers the first request of an operation, answers its
  repeats as ``ok`` — a worker busy when its coordinator died.
``--watch PATTERN`` subscribes to a channel pattern only, as a watcher (no role).

Each line of the events file is one JSON object with ``member`` and ``event``:
``subscribed``; ``start`` when a request arrives (with ``op``, ``op_id``, ``key``,
``wave`` from the ``ipc-op-*`` headers, and ``repeat``: this operation — the same
``ipc-op-id`` or ``ipc-op-key`` — asked before);
``end`` just before the act that settles the member for its coordinator (the answer;
for ``restart``, the new subscription, which a Rollout with ``ready_timeout_ms``
waits for); ``broadcast`` for a message that is not a request. Lines are appended
with one ``write`` each, so the file's order is the order things happened.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

from fleet_ipc import Client, Msg  # noqa: E402

BEHAVIOURS = ("ok", "error", "silent", "restart", "gone", "stall-first")


class Events:
    def __init__(self, path: str, member: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._member = member

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"member": self._member, "event": event, **fields}) + "\n"
        os.write(self._fd, line.encode())


def request_fields(msg: Msg) -> dict[str, Any]:
    return {
        "op": msg.op,
        "op_id": msg.headers.get("ipc-op-id", ""),
        "key": msg.headers.get("ipc-op-key", ""),
        "wave": int(msg.headers.get("ipc-op-wave", "0")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="server or sidecar socket")
    parser.add_argument("--app", default="shop")
    parser.add_argument("--id", required=True)
    parser.add_argument("--role", default="worker")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--behaviour", choices=BEHAVIOURS, default="ok")
    parser.add_argument("--hold-ms", type=int, default=0, help="work time before answering")
    parser.add_argument("--watch", default="", help="subscribe to this pattern only, as a watcher")
    parser.add_argument("--events", required=True, help="file shared by the workers")
    args = parser.parse_args()

    events = Events(args.events, args.id)
    labels = dict(label.split("=", 1) for label in args.label)
    asked: set[tuple[str, str]] = set()  # operations (by ipc-op-id and ipc-op-key) that asked before
    client = Client(args.addr, app=args.app)
    while True:
        if args.watch:
            subscription = client.subscribe([args.watch], id=args.id)
        else:
            subscription = client.subscribe(role=args.role, id=args.id, labels=labels)
        again = False
        for msg in subscription:
            if msg.op == "ipc:subscribed":
                events.write("subscribed", node=msg.data["node"])
                print(json.dumps({"event": "subscribed", "id": msg.data["id"]}), flush=True)
                continue
            if not msg.is_request:
                events.write("broadcast", op=msg.op, id=msg.id, channel=msg.channel)
                continue
            fields = request_fields(msg)
            # The same operation again: the same id (a Rollout resumed), or the same
            # key (a Gather rerun, which has a new id when the first stored nothing).
            marks = {("id", fields["op_id"]), ("key", fields["key"])} - {("id", ""), ("key", "")}
            repeat = bool(marks & asked)
            asked |= marks
            events.write("start", repeat=repeat, **fields)
            if args.behaviour == "silent" or (args.behaviour == "stall-first" and not repeat):
                continue
            if args.hold_ms:
                time.sleep(args.hold_ms / 1000)  # the work the request asks for
            if args.behaviour == "error":
                events.write("end", **fields)
                client.reply(msg.reply_to, msg.op, error=f"{args.id} cannot {msg.op}")
                continue
            if args.behaviour not in ("restart", "gone"):
                events.write("end", **fields)
            client.reply(msg.reply_to, msg.op, {"member": args.id})
            if args.behaviour in ("restart", "gone"):
                events.write("end", **fields)
                subscription.cancel()
                again = args.behaviour == "restart"
                break
        if not again:
            break
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
