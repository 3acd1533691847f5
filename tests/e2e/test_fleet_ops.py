"""Gather and Rollout against real fleets: worker processes (tests/e2e/fleet_worker.py)
that answer OK, with an error, never, restart and come back, or never come back,
through a single ipc-server, through two ipc-server replicas sharing a real
redis-server, and behind an ipc-sidecar. The operator is the Python client.

What the workers saw is read from the events file they append to — who was asked,
under which operation, in which wave, and when each was done — so "at most
wave_size in flight" and "never asked" are what the workers recorded, not what
timing suggests.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fleet_ipc import Aborted, Client, FailedPrecondition, Ledger, NoResponders, Unavailable
from fleet_ipc.testing import WAIT_LIMIT, IpcServer, IpcSidecar, Process, RedisServer, wait_until

WORKER = Path(__file__).resolve().parent / "fleet_worker.py"
TOPOLOGIES = ["single", "replicas", "sidecar"]


def serving(addr: str) -> bool:
    """Whether ``addr`` takes a subscription (a replica refuses until it reached Redis)."""
    with Client(addr, app="shop") as probe:
        try:
            with probe.subscribe(["shop:probe"]) as subscription:
                return next(iter(subscription)).op == "ipc:subscribed"
        except Unavailable:
            return False


@dataclass
class Fleet:
    """Where workers connect (in turn), where an operator calls (``entry``) and where a
    rerun goes (``other``: another replica when there is one)."""

    name: str
    entry: str
    other: str
    worker_addrs: list[str]
    events: Path
    #: where a broadcast may be sent from: every replica, and a pod's socket
    publishers: list[str] = field(default_factory=list)
    replicas: list[IpcServer] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    _next: int = 0

    def worker(self, member: str, behaviour: str = "ok", *args: str, addr: str | None = None) -> Process:
        """Starts a worker process; returns once it subscribed."""
        if addr is None:
            addr = self.worker_addrs[self._next % len(self.worker_addrs)]
            self._next += 1
        argv = [sys.executable, str(WORKER), "--addr", addr, "--id", member, "--behaviour", behaviour]
        process = Process([*argv, "--events", str(self.events), *args], env=dict(os.environ))
        self.processes.append(process)
        return process

    def workers(self, behaviours: dict[str, str], *args: str) -> None:
        """Starts one worker per member id, all at once, and waits until the
        operator's replica lists every one of them."""
        started = [self.worker(member, behaviour, *args) for member, behaviour in behaviours.items()]
        for process in started:
            process.wait_for(r'"event": "subscribed"')
        self.wait_members(set(behaviours))

    def wait_members(self, members: set[str]) -> None:
        with Client(self.entry, app="shop") as operator:
            wait_until(
                lambda: members <= {m.id for m in operator.members(role="worker")},
                f"{sorted(members)} listed by the operator's replica",
            )

    def read_events(self) -> list[dict]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines()]

    def starts(self, op: str | None = None) -> list[dict]:
        return [e for e in self.read_events() if e["event"] == "start" and (op is None or e["op"] == op)]

    def close(self) -> None:
        for process in self.processes:
            process.kill()


@contextmanager
def running_fleet(kind: str, tmp_path: Path) -> Iterator[Fleet]:
    events = tmp_path / "events.jsonl"
    if kind == "single":
        with IpcServer(app="shop") as server:
            fleet = Fleet(kind, server.grpc_addr, server.grpc_addr, [server.grpc_addr], events)
            fleet.publishers = [server.grpc_addr]
            fleet.replicas = [server]
            try:
                yield fleet
            finally:
                fleet.close()
    elif kind == "replicas":
        with RedisServer() as redis:
            args = ["--redis", redis.url, "--presence-ttl-ms", "3000"]
            with IpcServer(app="shop", args=[*args, "--node", "replica-a"]) as a, IpcServer(
                app="shop", args=[*args, "--node", "replica-b"]
            ) as b:
                for replica in (a, b):
                    wait_until(lambda addr=replica.grpc_addr: serving(addr), f"{replica.grpc_addr} serving")
                addrs = [a.grpc_addr, b.grpc_addr]
                fleet = Fleet(kind, a.grpc_addr, b.grpc_addr, addrs, events, publishers=addrs, replicas=[a, b])
                try:
                    yield fleet
                finally:
                    fleet.close()
    else:
        with IpcServer(app="shop") as server, IpcSidecar(
            tmp_path / "ipc.sock", server.grpc_addr, app="shop", args=["--role", "web"]
        ) as sidecar:
            fleet = Fleet(kind, server.grpc_addr, server.grpc_addr, [sidecar.socket], events)
            fleet.publishers = [server.grpc_addr, sidecar.socket]
            fleet.replicas = [server]
            try:
                yield fleet
            finally:
                fleet.close()


@pytest.fixture(params=TOPOLOGIES)
def fleet(request, tmp_path: Path) -> Iterator[Fleet]:
    """Each test runs on a single server, on two Redis replicas, and behind a sidecar."""
    with running_fleet(request.param, tmp_path) as running:
        yield running


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet("replicas", tmp_path) as running:
        yield running


def statuses(ledger: Ledger) -> dict[str, str]:
    return {outcome.member: outcome.status for outcome in ledger.outcomes}


def in_flight_at_most(events: list[dict], op_id: str) -> int:
    """The most members of operation ``op_id`` that were between ``start`` and ``end``
    at once, in the order the workers wrote their events."""
    busy: set[str] = set()
    most = 0
    for event in events:
        if event.get("op_id") != op_id:
            continue
        if event["event"] == "start":
            busy.add(event["member"])
            most = max(most, len(busy))
        elif event["event"] == "end":
            busy.discard(event["member"])
    return most


def test_gather_names_everyone_and_never_asks_a_watcher(fleet: Fleet) -> None:
    fleet.worker("tail", "ok", "--watch", "shop:>").wait_for(r'"event": "subscribed"')
    fleet.workers({"g-a": "ok", "g-b": "error"}, "--label", "zone=eu")
    fleet.workers({"g-c": "silent", "g-d": "ok"}, "--label", "zone=us")
    everyone = ["g-a", "g-b", "g-c", "g-d"]
    with Client(fleet.entry, app="shop") as operator:
        plan = operator.gather(":worker", "health:check", dry_run=True)
        assert (plan.state, plan.expected, plan.target) == ("DRY_RUN", 4, "shop:worker")
        assert plan.members("PENDING") == everyone

        eu = operator.gather(":worker", "health:check", labels={"zone": "eu"}, timeout=5)
        assert statuses(eu) == {"g-a": "OK", "g-b": "FAILED"}

        ledger = operator.gather(":worker", "health:check", timeout=1)
        assert (ledger.state, ledger.expected) == ("DONE", 4)
        assert statuses(ledger) == {"g-a": "OK", "g-b": "FAILED", "g-c": "NO_REPLY", "g-d": "OK"}
        assert (ledger.ok, ledger.failed, ledger.no_reply) == (2, 1, 1)
        by_member = {outcome.member: outcome for outcome in ledger.outcomes}
        assert by_member["g-a"].reply.data == {"member": "g-a"}
        assert by_member["g-b"].detail == "replied with error: g-b cannot health:check"
        assert by_member["g-c"].detail == "no answer within 1000 ms"

        with pytest.raises(NoResponders):
            operator.gather(":nobody", "health:check")

        # The watcher is live (it gets this broadcast) and was never asked.
        marker = operator.broadcast(":worker", "marker")
    wait_until(
        lambda: any(e["member"] == "tail" and e.get("id") == marker.id for e in fleet.read_events()),
        "the watcher received the marker broadcast",
    )
    asked = Counter(event["member"] for event in fleet.starts("health:check"))
    assert asked == {"g-a": 2, "g-b": 2, "g-c": 1, "g-d": 1}, "the dry run asked someone, or the watcher was asked"
    assert {e["op_id"] for e in fleet.starts() if e["member"] == "g-c"} == {ledger.id}


def test_rollout_goes_in_waves_waits_for_restarts_and_names_every_outcome(fleet: Fleet) -> None:
    fleet.worker("tail", "ok", "--watch", "shop:worker").wait_for(r'"event": "subscribed"')
    # Member-id order makes the waves: [m1 m2] [m3 m4] [m5 m6] [m7]. With a ready
    # timeout, an answer is not enough: the member must come back (m6 never does).
    behaviours = {
        "m1": "restart",
        "m2": "restart",
        "m3": "restart",
        "m4": "restart",
        "m5": "error",
        "m6": "gone",
        "m7": "silent",
    }
    fleet.workers(behaviours, "--hold-ms", "100")
    with Client(fleet.entry, app="shop") as operator:
        rollout = operator.rollout(
            ":worker", "worker:restart", wave_size=2, max_failures=3, ready_timeout=1.0, timeout=1.0, deadline=WAIT_LIMIT
        )
        events = list(rollout)
    ledger = rollout.ledger
    assert ledger is not None and events[-1].ledger == ledger
    assert (ledger.state, ledger.expected, ledger.waves) == ("DONE", 7, 4), [(o.member, o.status, o.detail) for o in ledger.outcomes]
    assert statuses(ledger) == {
        "m1": "OK",
        "m2": "OK",
        "m3": "OK",
        "m4": "OK",
        "m5": "FAILED",
        "m6": "NOT_READY",
        "m7": "NO_REPLY",
    }
    assert [outcome.wave for outcome in ledger.outcomes] == [1, 1, 2, 2, 3, 3, 4]
    # One event per outcome, as it happened, each in its wave; then the ledger.
    progress = [(event.wave, event.outcome.member) for event in events[:-1]]
    assert sorted(progress) == [(1, "m1"), (1, "m2"), (2, "m3"), (2, "m4"), (3, "m5"), (3, "m6"), (4, "m7")]
    assert [wave for wave, _ in progress] == sorted(wave for wave, _ in progress)

    recorded = fleet.read_events()
    starts = [e for e in recorded if e["event"] == "start"]
    assert {e["member"]: e["wave"] for e in starts} == {o.member: o.wave for o in ledger.outcomes}
    assert all(e["op_id"] == ledger.id for e in starts)
    assert in_flight_at_most(recorded, ledger.id) <= 2
    # A wave starts only after every member of the one before was done (and back).
    order = [(e["event"], e["wave"]) for e in recorded if e.get("op_id") == ledger.id and e["event"] in ("start", "end")]
    for position, (event, wave) in enumerate(order):
        if event == "start":
            earlier_waves_done = [w for kind, w in order[position:] if kind == "end" and w < wave]
            assert not earlier_waves_done, f"wave {wave} started before wave {earlier_waves_done} was done: {order}"
    subscribed = Counter(e["member"] for e in recorded if e["event"] == "subscribed")
    assert subscribed == {"tail": 1, "m1": 2, "m2": 2, "m3": 2, "m4": 2, "m5": 1, "m6": 1, "m7": 1}
    assert not [e for e in starts if e["member"] == "tail"], "the watcher was asked"


def test_stopped_leaves_the_rest_pending_and_a_rerun_by_key_resumes(fleet: Fleet) -> None:
    fleet.workers({"s1": "ok", "s2": "error", "s3": "ok", "s4": "ok"})
    with Client(fleet.entry, app="shop") as operator:
        plan = operator.rollout(":worker", "deploy", {"version": 7}, wave_size=2, dry_run=True).wait()
        assert plan.state == "DRY_RUN" and plan.waves == 2
        assert [(o.member, o.wave, o.status) for o in plan.outcomes] == [
            ("s1", 1, "PENDING"),
            ("s2", 1, "PENDING"),
            ("s3", 2, "PENDING"),
            ("s4", 2, "PENDING"),
        ]

        first = operator.rollout(":worker", "deploy", {"version": 7}, key="deploy-7", wave_size=1).wait()
    assert first.state == "STOPPED"
    assert statuses(first) == {"s1": "OK", "s2": "FAILED", "s3": "PENDING", "s4": "PENDING"}
    assert Counter(e["member"] for e in fleet.starts("deploy")) == {"s1": 1, "s2": 1}, "a member past the budget was asked"

    # The rerun goes to another replica (the key lives in Redis) with a larger budget.
    with Client(fleet.other, app="shop") as operator:
        with pytest.raises(FailedPrecondition, match="different operation"):
            operator.rollout(":worker", "deploy", {"version": 8}, key="deploy-7").wait()
        rollout = operator.rollout(":worker", "deploy", {"version": 7}, key="deploy-7", wave_size=2, max_failures=1)
        events = list(rollout)
        resumed = rollout.ledger
        assert resumed is not None
        assert events[0].outcome.member == "s1" and events[0].outcome.status == "SKIPPED"
        assert resumed.id == first.id and resumed.state == "DONE"
        assert statuses(resumed) == {"s1": "SKIPPED", "s2": "FAILED", "s3": "OK", "s4": "OK"}
        # Finished: a third run with the key answers the ledger and asks nobody.
        again = operator.rollout(":worker", "deploy", {"version": 7}, key="deploy-7").wait()
        assert (again.id, statuses(again)) == (first.id, statuses(resumed))
    starts = fleet.starts("deploy")
    assert Counter(e["member"] for e in starts) == {"s1": 1, "s2": 2, "s3": 1, "s4": 1}
    assert {(e["op_id"], e["key"]) for e in starts} == {(first.id, "deploy-7")}
    assert [e["repeat"] for e in starts if e["member"] == "s2"] == [False, True]


def test_a_keyed_broadcast_sent_twice_is_delivered_once(fleet: Fleet) -> None:
    fleet.workers({"k1": "ok", "k2": "ok"})
    answers = []
    for addr in fleet.publishers + fleet.publishers:
        with Client(addr, app="shop") as publisher:
            answers.append(publisher.broadcast(":worker", "cache:flush", key="flush-1"))
    assert [a.duplicate for a in answers] == [False] + [True] * (len(answers) - 1)
    assert {(a.id, a.cursor) for a in answers} == {(answers[0].id, answers[0].cursor)}
    with Client(fleet.entry, app="shop") as operator:
        marker = operator.broadcast(":worker", "marker")

    def received() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {"k1": [], "k2": []}
        for event in fleet.read_events():
            if event["event"] == "broadcast":
                seen[event["member"]].append(event["id"])
        return seen

    wait_until(lambda: all(marker.id in ids for ids in received().values()), "the marker reached both workers")
    assert received() == {"k1": [answers[0].id, marker.id], "k2": [answers[0].id, marker.id]}


def test_a_rollout_whose_coordinator_died_is_resumed_on_another_replica(replicas: Fleet) -> None:
    fleet = replicas
    coordinator, survivor = fleet.replicas
    # The workers sit on the surviving replica; the coordinator reaches them through Redis.
    for member, behaviour in {"c1": "ok", "c2": "stall-first", "c3": "ok"}.items():
        fleet.worker(member, behaviour, addr=survivor.grpc_addr).wait_for(r'"event": "subscribed"')
    fleet.wait_members({"c1", "c2", "c3"})

    with Client(coordinator.grpc_addr, app="shop") as operator:
        rollout = operator.rollout(":worker", "worker:restart", key="restart-42", timeout=20)
        events = iter(rollout)
        assert next(events).outcome.member == "c1"
        # c2 has the request and is still at it.
        wait_until(lambda: any(e["member"] == "c2" for e in fleet.starts()), "c2 asked")
        # While the coordinator lives, a rerun elsewhere is refused: one run per key.
        with Client(survivor.grpc_addr, app="shop") as other, pytest.raises(Aborted, match="in use"):
            other.rollout(":worker", "worker:restart", key="restart-42").wait()
        coordinator.signal(signal.SIGKILL)
        with pytest.raises(Unavailable):
            next(events)
    assert coordinator.wait() == -signal.SIGKILL

    with Client(survivor.grpc_addr, app="shop") as operator:
        resumed = operator.rollout(":worker", "worker:restart", key="restart-42", timeout=5).wait()
    assert resumed.state == "DONE"
    assert statuses(resumed) == {"c1": "SKIPPED", "c2": "OK", "c3": "OK"}
    starts = fleet.starts("worker:restart")
    # c1 answered OK before the coordinator died: never asked again. c2 was in flight:
    # asked again, under the same operation id and key, so it can tell the repeat.
    assert Counter(e["member"] for e in starts) == {"c1": 1, "c2": 2, "c3": 1}
    c2 = [e for e in starts if e["member"] == "c2"]
    assert [(e["op_id"], e["key"], e["repeat"]) for e in c2] == [
        (resumed.id, "restart-42", False),
        (resumed.id, "restart-42", True),
    ]


def test_a_gather_whose_coordinator_died_is_asked_again_under_its_key(replicas: Fleet) -> None:
    fleet = replicas
    coordinator, survivor = fleet.replicas
    for member, behaviour in {"h1": "ok", "h2": "stall-first"}.items():
        fleet.worker(member, behaviour, addr=survivor.grpc_addr).wait_for(r'"event": "subscribed"')
    fleet.wait_members({"h1", "h2"})

    cut_off: list[Unavailable] = []

    def gather_on_the_coordinator() -> None:
        with Client(coordinator.grpc_addr, app="shop") as operator:
            try:
                operator.gather(":worker", "health:check", key="audit-9", timeout=20)
            except Unavailable as error:
                cut_off.append(error)

    gathering = threading.Thread(target=gather_on_the_coordinator, daemon=True)
    gathering.start()
    wait_until(lambda: {e["member"] for e in fleet.starts()} == {"h1", "h2"}, "both asked")
    coordinator.signal(signal.SIGKILL)
    gathering.join(WAIT_LIMIT)
    assert cut_off, "the Gather on the killed replica did not fail with UNAVAILABLE"
    assert coordinator.wait() == -signal.SIGKILL

    with Client(survivor.grpc_addr, app="shop") as operator:
        ledger = operator.gather(":worker", "health:check", key="audit-9", timeout=20)
    assert (ledger.state, statuses(ledger)) == ("DONE", {"h1": "OK", "h2": "OK"})
    # A Gather stores its ledger when it ends: nothing was stored, so everyone is
    # asked again — under the same key, with a new operation id.
    starts = fleet.starts("health:check")
    assert Counter(e["member"] for e in starts) == {"h1": 2, "h2": 2}
    assert {e["key"] for e in starts} == {"audit-9"}
    first_id, second_id = dict.fromkeys(e["op_id"] for e in starts)
    assert second_id == ledger.id and first_id != ledger.id
    assert [e["repeat"] for e in starts if e["member"] == "h2"] == [False, True]
