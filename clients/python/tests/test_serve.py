"""``Client.run`` answers on its Serve stream, against a real ipc-server (and a real
ipc-sidecar on a pod socket): each answer reaches its own requester, in whatever
order the handlers finish, and the node's per-RPC counters show that no Reply call
carried them."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fleet_ipc import Client, Msg, ReplyError
from fleet_ipc.testing import WAIT_LIMIT, CuttingProxy, IpcServer, IpcSidecar, scrape, wait_until


def calls(metrics_addr: str, method: str, **labels: str) -> float:
    """How many ``method`` calls the node at ``metrics_addr`` answered (streams: opened)."""
    return scrape(metrics_addr, "ipc_rpc_requests_total", method=method, **labels)


class Worker:
    """``client.run(**options)`` in a thread: ready once subscribed (``id``), stopped
    on exit, which fails if ``run`` does not return or raised."""

    def __init__(self, client: Client, **options: Any):
        self.client = client
        self.subscriptions: queue.Queue[str] = queue.Queue()
        client.on("ipc:subscribed")(lambda msg: self.subscriptions.put(msg.data["id"]))
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, kwargs=options, daemon=True)
        self.id = ""

    def _run(self, **options: Any) -> None:
        try:
            self.client.run(**options)
        except BaseException as error:
            self.failures.append(error)

    def __enter__(self) -> Worker:
        self.thread.start()
        self.id = self.subscriptions.get(timeout=WAIT_LIMIT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.stop()
        self.thread.join(WAIT_LIMIT)
        assert not self.thread.is_alive(), "run() did not return after stop()"
        assert not self.failures, f"run() raised {self.failures}"
        self.client.close()


def calculator(addr: str, app: str = "shop") -> Client:
    calc = Client(addr, app=app)
    calc.on("sum")(lambda msg: sum(msg.data))
    calc.on("blob")(lambda msg: "x" * msg.data)

    @calc.on("fail")
    def fail(msg: Msg) -> None:
        raise RuntimeError("cannot do that")

    return calc


def answers_and_errors(client: Client, target: str) -> None:
    """Requests answered with data, with a handler's error, and without a handler."""
    for n in range(20):
        assert client.send_msg(target, "sum", [n, 1, 2]).data == n + 3
    with pytest.raises(ReplyError) as failure:
        client.send_msg(target, "fail")
    assert failure.value.reply.error == "cannot do that"
    with pytest.raises(ReplyError, match="no handler"):
        client.send_msg(target, "unknown:op")


def out_of_order(client: Client, worker: Client, target: str, count: int = 8) -> None:
    """``count`` requests, each sent once the previous one reached a handler; the
    handlers finish in reverse, and each requester must get its own answer."""
    arrived: queue.Queue[int] = queue.Queue()
    done = [threading.Event() for _ in range(count)]
    finished: list[int] = []

    @worker.on("square")
    def square(msg: Msg) -> dict[str, int]:
        n = msg.data
        arrived.put(n)
        if n + 1 < count and not done[n + 1].wait(WAIT_LIMIT):
            raise RuntimeError(f"request {n + 1} was never handled while {n} was running")
        finished.append(n)
        done[n].set()
        return {"n": n, "square": n * n}

    with ThreadPoolExecutor(count) as requesters:
        replies = []
        for n in range(count):
            replies.append(requesters.submit(client.send_msg, target, "square", n, timeout=WAIT_LIMIT))
            assert arrived.get(timeout=WAIT_LIMIT) == n
        assert [reply.result().data for reply in replies] == [{"n": n, "square": n * n} for n in range(count)]
    assert finished == list(reversed(range(count)))


def test_answers_travel_on_the_serve_stream_not_as_reply_calls(server: IpcServer, client: Client) -> None:
    with Worker(calculator(server.grpc_addr), role="calc"):
        answers_and_errors(client, ":calc")
    assert calls(server.metrics_addr, "Reply") == 0, "an answer went as a Reply call"
    assert calls(server.metrics_addr, "Serve", code="OK") == 1
    assert calls(server.metrics_addr, "Subscribe") == 0


def test_concurrent_requests_answered_out_of_order_each_reach_their_requester(
    server: IpcServer, client: Client
) -> None:
    calc = calculator(server.grpc_addr)
    with Worker(calc, role="calc", concurrency=8):
        out_of_order(client, calc, ":calc")
    assert calls(server.metrics_addr, "Reply") == 0


def test_a_large_answer_arrives_and_one_the_node_refuses_is_an_error_for_its_requester(
    server: IpcServer, client: Client
) -> None:
    with Worker(calculator(server.grpc_addr), role="calc"):
        assert len(client.send_msg(":calc", "blob", 600_000).data) == 600_000
        # Over the node's --max-msg-bytes (1 MiB): refused on the stream, and the
        # requester is told why at once instead of waiting for its timeout.
        with pytest.raises(ReplyError, match="answer not delivered.*limit") as refused:
            client.send_msg(":calc", "blob", 2_000_000, timeout=WAIT_LIMIT)
        assert "--max-msg-bytes" in refused.value.reply.error
        # Over what a stream message may be (4 MiB): a Reply call, refused alone.
        with pytest.raises(ReplyError, match="answer not delivered.*too large"):
            client.send_msg(":calc", "blob", 5_000_000, timeout=WAIT_LIMIT)
        assert client.send_msg(":calc", "sum", [1, 2]).data == 3
    # Sent on the stream, the 5 MB answer would have ended it: a second Serve call.
    assert calls(server.metrics_addr, "Serve", code="OK") == 1, "the stream did not go on"
    assert calls(server.metrics_addr, "Reply", code="OK") == 0


def test_a_cut_stream_is_resumed_as_a_serve_stream_under_the_same_id(server: IpcServer, client: Client) -> None:
    with CuttingProxy(server.grpc_addr) as proxy:
        worker = Worker(calculator(proxy.addr), role="calc")
        with worker:
            assert client.send_msg(":calc", "sum", [1, 2]).data == 3
            proxy.sever()
            assert worker.subscriptions.get(timeout=WAIT_LIMIT) == worker.id
            assert client.send_msg(":calc", "sum", [3, 4]).data == 7
    assert calls(server.metrics_addr, "Serve", code="OK") >= 2
    assert calls(server.metrics_addr, "Reply") == 0


@pytest.mark.parametrize("end", ["stop", "close"])
def test_stop_and_close_leave_no_thread_behind(server: IpcServer, client: Client, end: str) -> None:
    before = set(threading.enumerate())
    calc = calculator(server.grpc_addr)
    worker = Worker(calc, role="calc")
    worker.thread.start()
    worker.subscriptions.get(timeout=WAIT_LIMIT)
    assert client.send_msg(":calc", "sum", [1, 2]).data == 3
    # run()'s own, and grpcio's: the one feeding the Serve call's requests.
    assert len(set(threading.enumerate()) - before) >= 2
    getattr(calc, end)()
    worker.thread.join(WAIT_LIMIT)
    assert not worker.thread.is_alive(), f"run() did not return after {end}()"
    assert not worker.failures
    wait_until(lambda: not set(threading.enumerate()) - before, "every thread of the worker ended")
    calc.close()


def test_handlers_answer_through_the_sidecar_socket_on_serve_streams(
    server: IpcServer, client: Client, tmp_path
) -> None:
    with IpcSidecar(tmp_path / "ipc.sock", server.grpc_addr, app="shop", args=["--role", "web"]) as sidecar:
        local = calculator(sidecar.socket)
        with Worker(local, id="py-web-1", concurrency=4):
            answers_and_errors(client, "py-web-1")
            out_of_order(client, local, "py-web-1", count=4)
        # Neither the pod's process nor the sidecar's upstream made a Reply call.
        assert calls(sidecar.health_addr, "Reply") == 0
        assert calls(sidecar.health_addr, "Serve", code="OK") >= 1
        assert calls(server.metrics_addr, "Reply") == 0
