"""Client.gather and Client.rollout against a real ipc-server, with workers running
the client's handler API in threads: what the methods return and raise."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from fleet_ipc import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    Ledger,
    Msg,
    NoResponders,
    Outcome,
    RolloutEvent,
)
from fleet_ipc.testing import WAIT_LIMIT, IpcServer


@pytest.fixture
def workers(server: IpcServer) -> Iterator[Callable[..., list[Msg]]]:
    """Starts handler workers of role `worker` under given ids; each answers `check`
    with its id, or with an error when its id starts with `bad`. Returns the list of
    requests they received."""
    running: list[tuple[Client, threading.Thread]] = []
    received: list[Msg] = []

    def start(*ids: str) -> list[Msg]:
        for member in ids:
            worker = Client(server.grpc_addr, app="shop")
            subscribed = threading.Event()
            worker.on("ipc:subscribed")(lambda msg: subscribed.set())

            @worker.on("check")
            def check(msg: Msg, member: str = member) -> dict:
                received.append(msg)
                if member.startswith("bad"):
                    raise RuntimeError(f"{member} is unwell")
                return {"member": member}

            thread = threading.Thread(target=worker.run, kwargs={"role": "worker", "id": member}, daemon=True)
            thread.start()
            assert subscribed.wait(WAIT_LIMIT), f"{member} did not subscribe"
            running.append((worker, thread))
        return received

    yield start
    for worker, thread in running:
        worker.close()
        thread.join(WAIT_LIMIT)


def test_gather_returns_a_ledger_naming_each_member(client: Client, workers) -> None:
    received = workers("w1", "bad-w2")
    ledger = client.gather(":worker", "check", {"deep": True}, headers={"trace": "t-1"})
    assert isinstance(ledger, Ledger)
    assert (ledger.state, ledger.target, ledger.op, ledger.expected) == ("DONE", "shop:worker", "check", 2)
    assert (ledger.ok, ledger.failed, ledger.no_reply) == (1, 1, 0)
    bad, good = ledger.outcomes
    assert isinstance(good, Outcome)
    assert (good.member, good.status, good.reply.data) == ("w1", "OK", {"member": "w1"})
    assert (bad.member, bad.status, bad.detail) == ("bad-w2", "FAILED", "replied with error: bad-w2 is unwell")
    assert bad.reply.error == "bad-w2 is unwell"
    assert ledger.members("FAILED", "NO_REPLY") == ["bad-w2"]
    assert {(m.data["deep"], m.headers["trace"], m.headers["ipc-op-id"]) for m in received} == {(True, "t-1", ledger.id)}


def test_a_keyed_gather_is_asked_once(client: Client, workers) -> None:
    received = workers("w1")
    first = client.gather(":worker", "check", key="audit-1")
    again = client.gather(":worker", "check", key="audit-1")
    assert again == first
    assert len(received) == 1 and received[0].headers["ipc-op-key"] == "audit-1"
    with pytest.raises(FailedPrecondition, match="key"):
        client.rollout(":worker", "check", key="audit-1").wait()


def test_dry_runs_ask_nobody(client: Client, workers) -> None:
    received = workers("w1", "w2", "w3")
    plan = client.gather(":worker", "check", dry_run=True)
    assert (plan.state, plan.members("PENDING")) == ("DRY_RUN", ["w1", "w2", "w3"])
    waves = client.rollout(":worker", "check", wave_size=2, dry_run=True).wait()
    assert (waves.state, waves.waves) == ("DRY_RUN", 2)
    assert [o.wave for o in waves.outcomes] == [1, 1, 2]
    assert received == []


def test_rollout_yields_each_outcome_then_the_ledger(client: Client, workers) -> None:
    workers("w1", "w2", "w3")
    rollout = client.rollout(":worker", "check", wave_size=2)
    events = list(rollout)
    assert all(isinstance(event, RolloutEvent) for event in events)
    assert sorted((e.wave, e.outcome.member, e.outcome.status) for e in events[:-1]) == [
        (1, "w1", "OK"),
        (1, "w2", "OK"),
        (2, "w3", "OK"),
    ]
    assert events[-1].outcome is None and events[-1].ledger == rollout.ledger
    assert (rollout.ledger.state, rollout.ledger.ok) == ("DONE", 3)


def test_a_failure_past_the_budget_stops_the_rollout(client: Client, workers) -> None:
    received = workers("bad-w1", "w2")
    ledger = client.rollout(":worker", "check", max_failures=0).wait()
    assert ledger.state == "STOPPED"
    assert [(o.member, o.status) for o in ledger.outcomes] == [("bad-w1", "FAILED"), ("w2", "PENDING")]
    assert len(received) == 1


def test_errors_are_raised_as_their_exceptions(client: Client) -> None:
    with pytest.raises(NoResponders):
        client.gather(":worker", "check")
    with pytest.raises(NoResponders):
        client.rollout(":worker", "check").wait()
    with pytest.raises(InvalidArgument, match="target"):
        client.gather("", "check")
