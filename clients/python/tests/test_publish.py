"""Bulk publishing (``Client.publish``) and idempotency keys (``broadcast(key=...)``)
against a real ipc-server."""

from __future__ import annotations

from fleet_ipc import Client, InvalidArgument
from test_client import Inbox


def test_publish_answers_each_message_in_order(client: Client) -> None:
    reader = Inbox(client.subscribe(["news:metrics"]))
    assert reader.next().op == "ipc:subscribed"
    messages = [{"channel": "news:metrics", "op": "tick", "data": n} for n in range(20)]
    messages[5]["op"] = ""
    answers = list(client.publish(iter(messages)))
    assert len(answers) == 20
    assert isinstance(answers[5], InvalidArgument) and "op" in str(answers[5])
    for n, answer in enumerate(answers):
        if n == 5:
            continue
        assert answer.cursor, answer
        received = reader.next()
        assert (received.id, received.data) == (answer.id, n)


def test_a_broadcast_key_is_stored_once(client: Client) -> None:
    reader = Inbox(client.subscribe(["news:jobs"]))
    assert reader.next().op == "ipc:subscribed"
    first = client.broadcast("news:jobs", "job:run", 1, key="nightly-1")
    again = client.broadcast("news:jobs", "job:run", 2, key="nightly-1")
    assert not first.duplicate and again.duplicate
    assert (again.id, again.cursor) == (first.id, first.cursor)
    # Without a key of its own, each broadcast gets a fresh one.
    other = client.broadcast("news:jobs", "marker")
    assert not other.duplicate
    assert [reader.next().op, reader.next().op] == ["job:run", "marker"]
