"""examples/worker.py as a real process against a real server, driven by a client
the way an operator or another service would."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_ipc import Client, DeadlineExceeded, ReplyError
from fleet_ipc.testing import IpcServer, Process

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "worker.py"


def start_worker(server: IpcServer, *args: str) -> tuple[Process, dict]:
    env = dict(os.environ, PYTHONPATH=str(EXAMPLE.parents[1]))
    worker = Process([sys.executable, str(EXAMPLE), "--addr", server.grpc_addr, "--app", "shop", *args], env=env)
    return worker, event(worker, "subscribed")


def event(worker: Process, name: str) -> dict:
    line = worker.wait_for(lambda line: json.loads(line).get("event") == name, f'{{"event": "{name}"}}')
    return json.loads(line)


@pytest.fixture
def worker(server: IpcServer) -> Iterator[tuple[Process, dict]]:
    process, subscribed = start_worker(server, "--tag", "blue")
    yield process, subscribed
    process.kill()


def test_config_get_is_answered(client: Client, worker) -> None:
    process, _ = worker
    reply = client.send_msg(":worker", "config:get", {"key": "db"})
    assert reply.data == {"key": "db", "value": "postgres://db.internal:5432/shop"}
    assert event(process, "config:get")["key"] == "db"


def test_unknown_config_key_is_a_reply_error(client: Client, worker) -> None:
    with pytest.raises(ReplyError, match="unknown config key"):
        client.send_msg(":worker", "config:get", {"key": "nope"})
    # The worker goes on answering.
    assert client.send_msg(":worker", "config:get", {"key": "cache_ttl_s"}).data["value"] == 60


def test_the_worker_is_a_member_with_its_role_and_tag(client: Client, worker) -> None:
    _, subscribed = worker
    [member] = client.members(role="worker")
    assert member.id == subscribed["id"]
    assert member.tag == "blue"
    assert {"shop:worker", "shop:worker:blue"} <= set(member.channels)


def test_a_broadcast_restart_subscribes_again_under_the_same_id(client: Client, worker) -> None:
    process, subscribed = worker
    sent = client.broadcast(":worker:blue", "worker:restart")
    restart = event(process, "restart")
    assert (restart["id"], restart["channel"]) == (sent.id, "shop:worker:blue")
    again = event(process, "subscribed")
    assert again["id"] == subscribed["id"], "the id the node assigned first is kept"
    # Back, under the same id and tag: it answers again.
    assert client.send_msg(subscribed["id"], "config:get", {"key": "db"}).data["key"] == "db"
    [member] = client.members(role="worker")
    assert (member.id, member.tag) == (subscribed["id"], "blue")


def test_a_rollout_restarts_the_workers_in_waves_and_waits_for_each_to_come_back(
    client: Client, server: IpcServer
) -> None:
    workers = [start_worker(server, "--id", f"worker-{n}")[0] for n in (1, 2, 3)]
    try:
        ledger = client.rollout(":worker", "worker:restart", wave_size=2, ready_timeout=10).wait()
        assert (ledger.state, ledger.ok, ledger.waves) == ("DONE", 3, 2)
        assert [(o.member, o.wave) for o in ledger.outcomes] == [("worker-1", 1), ("worker-2", 1), ("worker-3", 2)]
        assert all(o.reply.data == {"restarted": True} for o in ledger.outcomes)
        for n, process in enumerate(workers, start=1):
            assert event(process, "restart")["operation"] == ledger.id
            assert event(process, "subscribed")["id"] == f"worker-{n}"
    finally:
        for process in workers:
            process.kill()


def test_a_repeated_operation_is_answered_without_restarting_again(client: Client, worker) -> None:
    process, subscribed = worker
    headers = {"ipc-op-id": "op-1", "ipc-op-key": "restart-1"}
    first = client.send_msg(subscribed["id"], "worker:restart", headers=headers)
    assert first.data == {"restarted": True}
    assert event(process, "subscribed")["id"] == subscribed["id"]
    repeat = client.send_msg(subscribed["id"], "worker:restart", headers=headers)
    assert repeat.data == {"restarted": False, "reason": "already restarted for this operation"}
    assert event(process, "restart")["repeat"] is True


def test_sigterm_stops_the_worker(worker) -> None:
    process, _ = worker
    assert process.stop() == 0, process.describe()
    event(process, "exit")


def test_a_busy_target_gives_deadline_exceeded(client: Client, server: IpcServer) -> None:
    # A subscriber of the role that never answers: the caller's timeout ends the wait.
    with client.subscribe(role="worker") as silent:
        assert next(iter(silent)).op == "ipc:subscribed"
        with pytest.raises(DeadlineExceeded):
            client.send_msg(":worker", "config:get", {"key": "db"}, timeout=0.3)
