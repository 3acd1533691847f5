"""The ipc.v1 contract through a plain grpcio client, with stubs generated from
proto/ipc/v1/ipc.proto at test time: what any language's generated client sees.

Absence of a message is never waited for: a test broadcasts a sentinel after the
messages that must not arrive, and checks that the sentinel is what comes next.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import pytest
from fleet_ipc.ipc.v1 import ipc_pb2
from fleet_ipc.testing import WAIT_LIMIT, IpcServer
from google.protobuf import json_format, struct_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def value(data: object) -> struct_pb2.Value:
    result = struct_pb2.Value()
    json_format.ParseDict(data, result)
    return result


def plain(data: struct_pb2.Value) -> object:
    return json_format.MessageToDict(data)


def broadcast(stub, channel: str, op: str, data: object = None, metadata=(), **fields) -> ipc_pb2.BroadcastResponse:
    request = ipc_pb2.BroadcastRequest(channel=channel, op=op, **fields)
    if data is not None:
        request.data.CopyFrom(value(data))
    return stub.Broadcast(request, timeout=WAIT_LIMIT, metadata=list(metadata))


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value  # type: ignore[return-value]


def in_thread(work: Callable[[], object]) -> Callable[[], object]:
    """Start ``work`` in a thread; the returned function joins it and gives its
    result, or raises what it raised."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed to the joining test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> object:
        thread.join(WAIT_LIMIT)
        assert not thread.is_alive(), f"{work} did not finish within {WAIT_LIMIT:.0f}s"
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        return outcome.get("result")

    return join


# --- Broadcast and Subscribe ------------------------------------------------------


def test_broadcast_reaches_subscriber_with_id_channel_and_cursor(stub, subscribe) -> None:
    news = subscribe(channels=["shop:news"])
    assert news.id and news.node
    sent = broadcast(stub, "shop:news", "news:published", {"title": "hello", "n": 1}, headers={"trace": "t-1"})
    assert sent.channel == "shop:news"
    assert sent.id and sent.cursor
    got = news.next()
    assert got.op == "news:published"
    assert plain(got.data) == {"title": "hello", "n": 1}
    assert dict(got.headers) == {"trace": "t-1"}
    assert (got.id, got.channel, got.cursor) == (sent.id, sent.channel, sent.cursor)
    assert got.ts_ms > 0
    assert not got.reply_to


def test_any_json_value_is_carried(stub, subscribe) -> None:
    inbox = subscribe(channels=["shop:values"])
    for data in ["text", 42.5, [1, "two", None, True], {"nested": {"list": []}}]:
        broadcast(stub, "shop:values", "value:any", data)
        assert plain(inbox.next().data) == data
    broadcast(stub, "shop:values", "value:none")
    assert not inbox.next().HasField("data")


def test_role_and_tag_channels_and_own_id(stub, subscribe) -> None:
    blue = subscribe(app="shop", role="worker", tag="blue", id="w-blue")
    broadcast(stub, "shop:worker", "to:role")
    assert blue.next_op() == "to:role"
    broadcast(stub, "shop:worker:blue", "to:tag")
    assert blue.next_op() == "to:tag"
    broadcast(stub, "w-blue", "to:id")
    assert blue.next_op() == "to:id"
    broadcast(stub, "shop:worker:green", "to:other-tag")
    broadcast(stub, "billing:worker", "to:other-app")
    broadcast(stub, "shop:worker", "sentinel")
    assert blue.next_op() == "sentinel"


def test_colon_prefix_takes_the_app_from_ipc_app_metadata(stub, subscribe) -> None:
    billing = subscribe(channels=["billing:jobs"])
    shop = subscribe(channels=["shop:jobs"])
    sent = broadcast(stub, ":jobs", "job:run", metadata=[("ipc-app", "billing")])
    assert sent.channel == "billing:jobs"
    assert billing.next().channel == "billing:jobs"
    # Without metadata the server's --app (shop) applies.
    assert broadcast(stub, ":jobs", "job:run").channel == "shop:jobs"
    assert shop.next().channel == "shop:jobs"


def test_subscribe_channels_with_colon_prefix_use_the_metadata_app(stub, subscribe) -> None:
    inbox = subscribe(channels=[":alerts"], metadata=[("ipc-app", "billing")])
    broadcast(stub, "billing:alerts", "alert:raised")
    assert inbox.next().channel == "billing:alerts"


def test_patterns_star_matches_one_segment_and_gt_the_rest(stub, subscribe) -> None:
    star = subscribe(channels=["shop:*"])
    rest = subscribe(channels=["shop:>"])
    broadcast(stub, "shop:a", "one")
    broadcast(stub, "shop:a:b", "two")
    broadcast(stub, "other:a", "elsewhere")
    broadcast(stub, "shop:end", "sentinel")
    assert [star.next_op(), star.next_op()] == ["one", "sentinel"]
    assert [rest.next_op(), rest.next_op(), rest.next_op()] == ["one", "two", "sentinel"]


def test_resume_from_cursor_gets_exactly_the_missed_messages_in_order(stub, subscribe) -> None:
    first = subscribe(channels=["shop:orders"], id="reader")
    broadcast(stub, "shop:orders", "order:0")
    seen = first.next()
    assert seen.op == "order:0"
    first.cancel()
    first.end()

    for n in (1, 2, 3):
        broadcast(stub, "shop:orders", f"order:{n}")
    broadcast(stub, "shop:unrelated", "not:mine")

    resumed = subscribe(channels=["shop:orders"], id="reader", cursor=seen.cursor)
    assert [resumed.next_op() for _ in range(3)] == ["order:1", "order:2", "order:3"]
    broadcast(stub, "shop:orders", "order:4")
    assert resumed.next_op() == "order:4"  # live again, no duplicate in between


@pytest.mark.parametrize("server_args", [["--retention", "3"]])
def test_a_cursor_beyond_retention_is_reported_as_a_gap(stub, subscribe) -> None:
    reader = subscribe(channels=["shop:log"])
    broadcast(stub, "shop:log", "log:0")
    cursor = reader.next().cursor
    reader.cancel()
    for n in range(1, 11):
        broadcast(stub, "shop:log", f"log:{n}")
    resumed = subscribe(channels=["shop:log"], cursor=cursor)
    assert resumed.next_op() == "ipc:gap"
    # Then what the log still holds, in order.
    assert [resumed.next_op() for _ in range(3)] == ["log:8", "log:9", "log:10"]


# --- SendMsg and Reply ------------------------------------------------------------


def answer_next(stub, stream, data: object = None, error: str = "") -> Callable[[], object]:
    """In a thread: take the next request from ``stream`` and reply to it."""

    def answer() -> ipc_pb2.Msg:
        request = stream.next()
        reply = ipc_pb2.ReplyRequest(reply_to=request.reply_to, op=request.op, error=error)
        if data is not None:
            reply.data.CopyFrom(value(data))
        stub.Reply(reply, timeout=WAIT_LIMIT)
        return request

    return in_thread(answer)


def test_send_msg_goes_to_exactly_one_subscriber_of_the_role(stub, subscribe) -> None:
    workers = [subscribe(app="shop", role="worker") for _ in range(2)]
    served: dict[str, Callable[[], object]] = {}

    answered: list[str] = []

    def serve(stream) -> None:
        request = stream.next()
        if request.op == "config:get":
            stub.Reply(ipc_pb2.ReplyRequest(reply_to=request.reply_to, op="config:get", data=value(stream.id)))
            answered.append(stream.id)
            request = stream.next()
        assert request.op == "sentinel"

    for worker in workers:
        served[worker.id] = in_thread(lambda worker=worker: serve(worker))
    reply = stub.SendMsg(ipc_pb2.SendMsgRequest(target=":worker", op="config:get", timeout_ms=10_000), timeout=WAIT_LIMIT)
    broadcast(stub, "shop:worker", "sentinel")
    for join in served.values():
        join()
    assert len(answered) == 1
    assert plain(reply.reply.data) == answered[0]


def test_send_msg_to_a_subscriber_id(stub, subscribe) -> None:
    worker = subscribe(app="shop", role="worker", id="w-42")
    asked = answer_next(stub, worker, {"ok": True})
    reply = stub.SendMsg(ipc_pb2.SendMsgRequest(target="w-42", op="status", data=value({"q": 1})), timeout=WAIT_LIMIT)
    request = asked()
    assert request.op == "status" and plain(request.data) == {"q": 1}
    assert request.reply_to
    assert plain(reply.reply.data) == {"ok": True}


def test_reply_with_error_comes_back_as_a_reply(stub, subscribe) -> None:
    worker = subscribe(app="shop", role="worker")
    asked = answer_next(stub, worker, error="disk full")
    reply = stub.SendMsg(ipc_pb2.SendMsgRequest(target=":worker", op="backup"), timeout=WAIT_LIMIT).reply
    asked()
    assert reply.error == "disk full"


def test_empty_target_is_answered_by_the_node(stub) -> None:
    pong = stub.SendMsg(ipc_pb2.SendMsgRequest(op="ping"), timeout=WAIT_LIMIT).reply
    assert pong.op == "pong"
    assert not pong.error


def test_node_members_op_lists_subscribers(stub, subscribe) -> None:
    worker = subscribe(app="shop", role="worker", id="w-members")
    reply = stub.SendMsg(ipc_pb2.SendMsgRequest(op="members"), timeout=WAIT_LIMIT).reply
    assert not reply.error
    assert worker.id in json_format.MessageToJson(reply.data)


def test_no_responders_is_unavailable_at_once(stub) -> None:
    failure = status_of(
        lambda: stub.SendMsg(ipc_pb2.SendMsgRequest(target=":nobody", op="x", timeout_ms=120_000), timeout=WAIT_LIMIT)
    )
    assert failure.code() == grpc.StatusCode.UNAVAILABLE
    assert "no responders" in failure.details()


def test_timeout_ms_bounds_the_wait(stub, subscribe) -> None:
    silent = subscribe(app="shop", role="silent")
    # The gRPC deadline is long: only timeout_ms can end this call in time.
    failure = status_of(
        lambda: stub.SendMsg(ipc_pb2.SendMsgRequest(target=":silent", op="x", timeout_ms=300), timeout=WAIT_LIMIT)
    )
    assert failure.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert silent.next().op == "x"


def test_grpc_deadline_bounds_the_wait_when_smaller(stub, subscribe, server) -> None:
    silent = subscribe(app="shop", role="silent")
    failure = status_of(
        lambda: stub.SendMsg(ipc_pb2.SendMsgRequest(target=":silent", op="x", timeout_ms=120_000), timeout=0.5)
    )
    assert failure.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    request = silent.next()
    # The server gave up with the caller: a reply now is late, whatever timeout_ms said.
    # (Waits for the server to count the outcome, so the check does not race it.)
    wait_for_metric(server, 'ipc_sendmsg_total{outcome="deadline_exceeded"}', 1)
    late = status_of(lambda: stub.Reply(ipc_pb2.ReplyRequest(reply_to=request.reply_to, op="x"), timeout=WAIT_LIMIT))
    assert late.code() == grpc.StatusCode.NOT_FOUND


def wait_for_metric(server: IpcServer, sample: str, at_least: float) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        with urllib.request.urlopen(f"http://{server.metrics_addr}/metrics", timeout=WAIT_LIMIT) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(sample + " ") and float(line.rsplit(" ", 1)[1]) >= at_least:
                    return
        assert time.monotonic() < deadline, f"metric {sample} never reached {at_least}"


def test_late_reply_is_not_found(stub, subscribe) -> None:
    slow = subscribe(app="shop", role="slow")
    failure = status_of(
        lambda: stub.SendMsg(ipc_pb2.SendMsgRequest(target=":slow", op="report", timeout_ms=200), timeout=WAIT_LIMIT)
    )
    assert failure.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    request = slow.next()
    late = status_of(lambda: stub.Reply(ipc_pb2.ReplyRequest(reply_to=request.reply_to, op="report"), timeout=WAIT_LIMIT))
    assert late.code() == grpc.StatusCode.NOT_FOUND


def test_reply_to_an_unknown_request_is_not_found(stub) -> None:
    unknown = status_of(lambda: stub.Reply(ipc_pb2.ReplyRequest(reply_to="nobody-asked", op="x"), timeout=WAIT_LIMIT))
    assert unknown.code() in (grpc.StatusCode.NOT_FOUND, INVALID)
    assert unknown.details()


# --- Members ----------------------------------------------------------------------


def test_members_filters_by_app_role_and_labels(stub, subscribe) -> None:
    subscribe(app="shop", role="worker", tag="blue", id="w1", labels={"zone": "eu"})
    subscribe(app="shop", role="worker", id="w2", labels={"zone": "us"})
    subscribe(app="billing", role="worker", id="b1")

    def ids(**request) -> list[str]:
        return sorted(m.id for m in stub.Members(ipc_pb2.MembersRequest(**request), timeout=WAIT_LIMIT).members)

    assert ids() == ["b1", "w1", "w2"]
    assert ids(app="shop") == ["w1", "w2"]
    assert ids(app="shop", labels={"zone": "eu"}) == ["w1"]
    assert ids(role="worker", app="billing") == ["b1"]
    [w1] = [m for m in stub.Members(ipc_pb2.MembersRequest(app="shop"), timeout=WAIT_LIMIT).members if m.id == "w1"]
    assert (w1.app, w1.role, w1.tag, dict(w1.labels)) == ("shop", "worker", "blue", {"zone": "eu"})
    assert {"shop:worker", "shop:worker:blue", "w1"} <= set(w1.channels)
    assert w1.node and w1.connected_ms > 0


# --- bad input --------------------------------------------------------------------

BAD_INPUT = [
    pytest.param("Broadcast", ipc_pb2.BroadcastRequest(channel="shop:news", op=""), "op", id="broadcast-empty-op"),
    pytest.param("Broadcast", ipc_pb2.BroadcastRequest(channel="shop news", op="x"), "channel", id="broadcast-bad-channel"),
    pytest.param("Broadcast", ipc_pb2.BroadcastRequest(channel="", op="x"), "channel", id="broadcast-empty-channel"),
    pytest.param("Broadcast", ipc_pb2.BroadcastRequest(channel="shop::x", op="x"), "channel", id="broadcast-empty-segment"),
    pytest.param("Broadcast", ipc_pb2.BroadcastRequest(channel="shop:*", op="x"), "pattern", id="broadcast-pattern-star"),
    pytest.param("Broadcast", ipc_pb2.BroadcastRequest(channel="shop:>", op="x"), "pattern", id="broadcast-pattern-gt"),
    pytest.param("Broadcast", ipc_pb2.BroadcastRequest(channel="s" * 300, op="x"), "channel", id="broadcast-long-channel"),
    pytest.param("SendMsg", ipc_pb2.SendMsgRequest(target=":worker", op=""), "op", id="sendmsg-empty-op"),
    pytest.param("SendMsg", ipc_pb2.SendMsgRequest(target="shop:>", op="x"), "pattern", id="sendmsg-pattern-target"),
    pytest.param("SendMsg", ipc_pb2.SendMsgRequest(target="bad target", op="x"), "target", id="sendmsg-bad-target"),
    pytest.param("Subscribe", ipc_pb2.SubscribeRequest(cursor="not-a-cursor"), "cursor", id="subscribe-malformed-cursor"),
    pytest.param("Subscribe", ipc_pb2.SubscribeRequest(channels=["shop worker"]), "channel", id="subscribe-bad-channel"),
    pytest.param("Subscribe", ipc_pb2.SubscribeRequest(channels=["shop:>:x"]), "last", id="subscribe-gt-not-last"),
]


@pytest.mark.parametrize(("rpc", "request_message", "mentions"), BAD_INPUT)
def test_bad_input_is_invalid_argument_saying_what_is_wrong(stub, subscribe, rpc, request_message, mentions) -> None:
    bystander = subscribe(channels=["shop:ok"])
    method = getattr(stub, rpc)

    def call() -> object:
        result = method(request_message, timeout=WAIT_LIMIT)
        return list(result) if rpc == "Subscribe" else result

    failure = status_of(call)
    assert failure.code() == INVALID, f"{failure.code()}: {failure.details()}"
    assert mentions in failure.details().lower(), failure.details()
    # Other clients are unaffected.
    broadcast(stub, "shop:ok", "still:fine")
    assert bystander.next_op() == "still:fine"


def test_oversized_data_is_refused_and_the_node_goes_on(stub, subscribe) -> None:
    bystander = subscribe(channels=["shop:ok"])
    big = "x" * (1024 * 1024 + 1)
    failure = status_of(lambda: broadcast(stub, "shop:big", "too:big", big))
    assert failure.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, INVALID), failure.code()
    assert failure.details()
    broadcast(stub, "shop:ok", "still:fine")
    assert bystander.next_op() == "still:fine"


# --- shutdown ---------------------------------------------------------------------


def test_sigterm_ends_streams_with_unavailable_and_exits_zero(server, subscribe) -> None:
    stream = subscribe(channels=["shop:x"])
    server.signal()
    ended = stream.end()
    assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended.details()
    assert server.wait() == 0, server.describe()


# --- reflection ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_service_in_both_versions(server, version: str) -> None:
    """grpcurl 1.8.6 asks v1alpha, newer tools ask v1: both must answer."""
    with grpc.insecure_channel(server.grpc_addr) as channel:
        reflect = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=bytes,
            response_deserializer=bytes,
        )
        list_services = b"\x3a\x00"  # ServerReflectionRequest{list_services: ""}, field 7
        [answer] = list(reflect(iter([list_services]), timeout=WAIT_LIMIT))
    assert b"ipc.v1.Ipc" in answer
    assert b"grpc.health.v1.Health" in answer
