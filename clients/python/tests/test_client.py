"""fleet_ipc.Client against a real ipc-server: the verbs, the handler API, and each
failure as its Python exception."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import pytest
from fleet_ipc import (
    Client,
    DeadlineExceeded,
    InvalidArgument,
    Msg,
    NoResponders,
    NotFound,
    ReplyError,
    Subscription,
)
from fleet_ipc.testing import WAIT_LIMIT, IpcServer


class Inbox:
    """Reads a subscription in a thread so a test can take messages with a bound."""

    def __init__(self, subscription: Subscription):
        self.subscription = subscription
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for msg in self.subscription:
                self._queue.put(msg)
        except Exception as error:  # handed to the test by next()
            self._queue.put(error)

    def next(self) -> Msg:
        try:
            item = self._queue.get(timeout=WAIT_LIMIT)
        except queue.Empty:
            raise AssertionError(f"no message within {WAIT_LIMIT:.0f}s") from None
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture
def inbox(client: Client) -> Iterator[Callable[..., Inbox]]:
    opened: list[Subscription] = []

    def open_inbox(*channels: str, **options) -> Inbox:
        subscription = client.subscribe(channels, **options)
        opened.append(subscription)
        box = Inbox(subscription)
        assert box.next().op == "ipc:subscribed"
        return box

    yield open_inbox
    for subscription in opened:
        subscription.cancel()


@pytest.fixture
def worker(server: IpcServer) -> Iterator[Client]:
    """A second client running handlers as role `calc` in a thread."""
    calc = Client(server.grpc_addr, app="shop")
    subscribed = threading.Event()

    @calc.on("ipc:subscribed")
    def ready(msg: Msg) -> None:
        subscribed.set()

    @calc.on("sum")
    def total(msg: Msg) -> int:
        return sum(msg.data)

    @calc.on("fail")
    def fail(msg: Msg) -> None:
        raise RuntimeError("cannot do that")

    @calc.on("trace")
    def trace(msg: Msg) -> str | None:
        return msg.headers.get("traceparent")

    runner = threading.Thread(target=calc.run, kwargs={"role": "calc"}, daemon=True)
    runner.start()
    assert subscribed.wait(WAIT_LIMIT), "worker never subscribed"
    yield calc
    calc.stop()
    runner.join(WAIT_LIMIT)
    assert not runner.is_alive(), "run() did not return after stop()"
    calc.close()


def test_broadcast_is_received_with_its_cursor(client: Client, inbox) -> None:
    news = inbox(":news")
    assert news.subscription.id
    sent = client.broadcast(":news", "news:out", {"n": 1, "tags": ["a"]}, headers={"trace": "t"})
    assert sent.channel == "shop:news"
    got = news.next()
    assert (got.op, got.data, got.headers) == ("news:out", {"n": 1, "tags": ["a"]}, {"trace": "t"})
    assert (got.id, got.channel, got.cursor) == (sent.id, sent.channel, sent.cursor)
    assert news.subscription.cursor == sent.cursor


def test_role_subscription_and_patterns(client: Client, inbox) -> None:
    workers = inbox(role="worker", tag="blue")
    everything = inbox("shop:>")
    client.broadcast(":worker:blue", "to:blue")
    assert workers.next().op == "to:blue"
    assert everything.next().channel == "shop:worker:blue"


def test_resume_from_the_last_cursor(client: Client, inbox) -> None:
    first = inbox(":orders", id="reader")
    client.broadcast(":orders", "order:0")
    first.next()
    cursor = first.subscription.cursor
    first.subscription.cancel()
    for n in (1, 2):
        client.broadcast(":orders", f"order:{n}")
    resumed = inbox(":orders", id="reader", cursor=cursor)
    assert [resumed.next().op, resumed.next().op] == ["order:1", "order:2"]


def test_a_handler_return_value_answers_the_request(client: Client, worker: Client) -> None:
    reply = client.send_msg(":calc", "sum", [1, 2, 3])
    assert reply.op == "sum"
    assert reply.data == 6
    assert not reply.error


def test_a_traceparent_header_reaches_the_worker_and_comes_back(
    client: Client, worker: Client
) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    reply = client.send_msg(":calc", "trace", headers={"traceparent": parent})
    assert reply.data == parent, "the worker was asked in the caller's trace"
    assert reply.headers.get("traceparent") == parent, "the reply comes back in it"


def test_a_handler_exception_becomes_a_reply_error(client: Client, worker: Client) -> None:
    with pytest.raises(ReplyError) as failure:
        client.send_msg(":calc", "fail")
    assert "cannot do that" in str(failure.value)
    assert failure.value.reply.error == "cannot do that"
    reply = client.send_msg(":calc", "fail", raise_on_error=False)
    assert reply.error == "cannot do that"


def test_a_request_without_handler_is_answered_with_an_error(client: Client, worker: Client) -> None:
    with pytest.raises(ReplyError, match="no handler"):
        client.send_msg(":calc", "unknown:op")


def test_no_responders(client: Client) -> None:
    with pytest.raises(NoResponders, match="no responders"):
        client.send_msg(":nobody", "x", timeout=60)


def test_deadline_exceeded_is_a_timeout_error(client: Client, inbox) -> None:
    silent = inbox(role="silent")
    with pytest.raises(DeadlineExceeded) as failure:
        client.send_msg(":silent", "x", timeout=0.3)
    assert isinstance(failure.value, TimeoutError)
    assert silent.next().op == "x"


def test_late_reply_is_not_found(client: Client, inbox) -> None:
    silent = inbox(role="silent")
    with pytest.raises(DeadlineExceeded):
        client.send_msg(":silent", "x", timeout=0.2)
    request = silent.next()
    assert request.is_request
    with pytest.raises(NotFound):
        client.reply(request.reply_to, "x", {"too": "late"})


def test_bad_input_is_a_value_error(client: Client) -> None:
    with pytest.raises(InvalidArgument) as failure:
        client.broadcast("shop:*", "x")
    assert isinstance(failure.value, ValueError)
    assert "pattern" in failure.value.details
    with pytest.raises(InvalidArgument):
        client.broadcast(":news", "")


def test_ping_the_node(client: Client) -> None:
    assert client.send_msg("", "ping").op == "pong"


def test_members_lists_the_worker(client: Client, worker: Client) -> None:
    [member] = client.members(role="calc")
    assert member.id == worker.id
    assert (member.app, member.role) == ("shop", "calc")
    assert "shop:calc" in member.channels


def test_members_a_broadcast_would_reach(client: Client, worker: Client) -> None:
    assert [member.id for member in client.members(channel=":calc")] == [worker.id]
    assert client.members(channel=":nobody") == []


def test_emit_calls_a_handler_in_process() -> None:
    local = Client("localhost:1")  # never connects: emit stays in this process

    @local.on("add")
    def add(msg: Msg) -> int:
        return msg.data["a"] + msg.data["b"]

    assert local.emit("add", Msg(op="add", data={"a": 2, "b": 3})) == 5
    with pytest.raises(KeyError):
        local.emit("missing")
    local.close()


def test_run_returns_when_the_server_goes_away_without_reconnect(server: IpcServer) -> None:
    calc = Client(server.grpc_addr, app="shop")
    subscribed = threading.Event()
    calc.on("ipc:subscribed")(lambda msg: subscribed.set())
    failures: list[BaseException] = []

    def run() -> None:
        try:
            calc.run(role="calc", reconnect=False)
        except BaseException as error:
            failures.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert subscribed.wait(WAIT_LIMIT)
    assert server.stop() == 0
    runner.join(WAIT_LIMIT)
    assert not runner.is_alive()
    assert [type(error).__name__ for error in failures] == ["Unavailable"]
    calc.close()


def test_run_reconnects_when_the_server_comes_back(server: IpcServer) -> None:
    calc = Client(server.grpc_addr, app="shop")
    subscriptions: queue.Queue[str] = queue.Queue()
    gaps: list[Msg] = []
    calc.on("ipc:subscribed")(lambda msg: subscriptions.put(msg.data["id"]))
    calc.on("ipc:gap")(gaps.append)
    calc.on("sum")(lambda msg: sum(msg.data))
    news: queue.Queue[str] = queue.Queue()
    calc.on("news")(lambda msg: news.put(msg.cursor))
    runner = threading.Thread(target=calc.run, kwargs={"role": "calc"}, daemon=True)
    runner.start()
    first_id = subscriptions.get(timeout=WAIT_LIMIT)
    calc.broadcast(":calc", "news")
    assert news.get(timeout=WAIT_LIMIT)  # the worker now holds a cursor of the old log

    # Same address, new process: its memory log does not know the old cursor.
    assert server.stop() == 0
    with IpcServer(app="shop", listen=server.grpc_addr) as restarted:
        assert subscriptions.get(timeout=WAIT_LIMIT) == first_id, "did not resubscribe under the same id"
        with Client(restarted.grpc_addr, app="shop") as caller:
            assert caller.send_msg(":calc", "sum", [2, 3]).data == 5
        # The new log never saw that cursor: the loss is reported, not hidden.
        assert [gap.op for gap in gaps] == ["ipc:gap"]
        calc.stop()
        runner.join(WAIT_LIMIT)
        assert not runner.is_alive()
        assert restarted.stop() == 0
    calc.close()
