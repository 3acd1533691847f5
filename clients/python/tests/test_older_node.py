"""Unit test: ``Client.run`` on a node from before Serve. Every real binary of this
repository serves Serve, so the older node is an in-process grpcio server with
Subscribe and Reply only (the generated base answers Serve with UNIMPLEMENTED)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fleet_ipc import Client
from fleet_ipc._stubs import ipc_pb2, ipc_pb2_grpc
from fleet_ipc.client import from_value, to_value
from fleet_ipc.testing import WAIT_LIMIT

REPLY_TO = "old#1.0123456789abcdef"


class OlderNode(ipc_pb2_grpc.IpcServicer):
    """Subscribe: ``ipc:subscribed``, one request, then open until cancelled. Reply:
    recorded."""

    def __init__(self) -> None:
        self.subscriptions: queue.Queue[ipc_pb2.SubscribeRequest] = queue.Queue()
        self.replies: queue.Queue[ipc_pb2.ReplyRequest] = queue.Queue()

    def Subscribe(self, request, context):  # noqa: N802 (the RPC's name)
        self.subscriptions.put(request)
        ended = threading.Event()
        context.add_callback(ended.set)
        yield ipc_pb2.Msg(op="ipc:subscribed", data=to_value({"id": request.id, "node": "old"}))
        yield ipc_pb2.Msg(op="sum", data=to_value([1, 2]), reply_to=REPLY_TO)
        ended.wait()

    def Reply(self, request, context):  # noqa: N802
        self.replies.put(request)
        return ipc_pb2.ReplyResponse()


@pytest.fixture
def older_node() -> Iterator[tuple[OlderNode, str]]:
    node = OlderNode()
    server = grpc.server(ThreadPoolExecutor(4))
    ipc_pb2_grpc.add_IpcServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield node, f"127.0.0.1:{port}"
    server.stop(0)


def test_on_a_node_without_serve_run_subscribes_and_answers_with_reply_calls(older_node) -> None:
    node, addr = older_node
    worker = Client(addr, app="shop")
    worker.on("sum")(lambda msg: sum(msg.data))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(role="calc", id="w1", labels={"zone": "eu"})
        except BaseException as error:
            failures.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        subscribed = node.subscriptions.get(timeout=WAIT_LIMIT)
        assert (subscribed.role, subscribed.id, dict(subscribed.labels)) == ("calc", "w1", {"zone": "eu"})
        reply = node.replies.get(timeout=WAIT_LIMIT)
        assert (reply.reply_to, reply.op, from_value(reply.data)) == (REPLY_TO, "sum", 3)
    finally:
        worker.stop()
        runner.join(WAIT_LIMIT)
        worker.close()
    assert not runner.is_alive(), "run() did not return after stop()"
    assert not failures, f"run() raised {failures}"
