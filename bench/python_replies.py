#!/usr/bin/env python3
"""Sequential SendMsg to a Python handler (``fleet_ipc.Client.run``) answering on its
Serve stream, against the same handler answering with one unary Reply call per
request — the before/after of issue 18 for the Python client, in one run.

    PYTHONPATH=clients/python python3 bench/python_replies.py [--requests 2000]

Starts a real ipc-server (``$IPC_SERVER_BIN``, else target/release/ipc-server, else
target/debug/ipc-server) and two workers in this process, each with its own
connection: role ``serve`` (the client as it is) and role ``unary`` (the same client
made to subscribe and answer with Reply calls, as before). The requests alternate
between the two in blocks of 100, so both see the same machine load. Prints p50, p99
and requests/s per path, the server's per-RPC counts, and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients" / "python"))

from fleet_ipc import Client  # noqa: E402
from fleet_ipc.testing import WAIT_LIMIT, IpcServer, scrape  # noqa: E402

BLOCK = 100


def server_binary() -> str:
    candidates = (os.environ.get("IPC_SERVER_BIN"), ROOT / "target/release/ipc-server", ROOT / "target/debug/ipc-server")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit("no ipc-server binary: cargo build --release -p ipc-server")


def start_worker(addr: str, role: str, serve: bool) -> tuple[Client, threading.Thread]:
    worker = Client(addr, app="bench")
    worker._serving = serve  # False: Subscribe and a Reply call per answer, as before issue 18
    subscribed = threading.Event()
    worker.on("ipc:subscribed")(lambda msg: subscribed.set())
    worker.on("echo")(lambda msg: msg.data)
    thread = threading.Thread(target=worker.run, kwargs={"role": role}, daemon=True)
    thread.start()
    if not subscribed.wait(WAIT_LIMIT):
        raise SystemExit(f"worker {role} never subscribed")
    return worker, thread


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per path")
    args = parser.parse_args()
    binary = server_binary()
    load_before = os.getloadavg()
    with IpcServer(app="bench", binary=binary) as server:
        workers = {role: start_worker(server.grpc_addr, role, role == "serve") for role in ("serve", "unary")}
        caller = Client(server.grpc_addr, app="bench")
        payload = {"n": 0, "text": "x" * 64}
        for role in workers:  # warm up both connections
            for _ in range(50):
                caller.send_msg(f":{role}", "echo", payload)
        latencies: dict[str, list[float]] = {role: [] for role in workers}
        busy: dict[str, float] = {role: 0.0 for role in workers}
        while any(len(samples) < args.requests for samples in latencies.values()):
            for role, samples in latencies.items():
                block = min(BLOCK, args.requests - len(samples))
                started = time.perf_counter()
                for _ in range(block):
                    sent = time.perf_counter()
                    caller.send_msg(f":{role}", "echo", payload)
                    samples.append(time.perf_counter() - sent)
                busy[role] += time.perf_counter() - started
        counts = {
            method: scrape(server.metrics_addr, "ipc_rpc_requests_total", method=method)
            for method in ("SendMsg", "Reply", "Serve", "Subscribe")
        }
        for worker, thread in workers.values():
            worker.stop()
            thread.join(WAIT_LIMIT)
            worker.close()
        caller.close()
        server.stop()
    load_after = os.getloadavg()
    print(f"ipc-server: {binary}")
    print(f"{args.requests} sequential SendMsg per path, 64-byte text payload, blocks of {BLOCK} alternating")
    print(f"{'path':<28} {'p50 µs':>8} {'p99 µs':>8} {'req/s':>8}")
    for role, label in (("unary", "handler answers with Reply"), ("serve", "handler answers on Serve")):
        samples = latencies[role]
        print(
            f"{label:<28} {statistics.median(samples) * 1e6:>8.0f} {percentile(samples, 0.99) * 1e6:>8.0f} "
            f"{len(samples) / busy[role]:>8.0f}"
        )
    ratio = statistics.median(latencies["serve"]) / statistics.median(latencies["unary"])
    print(f"p50 Serve / Reply: {ratio:.2f}")
    print("server calls: " + ", ".join(f"{method} {count:.0f}" for method, count in counts.items()))
    print(f"load average: {load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
