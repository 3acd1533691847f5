"""A broadcast whose answer is lost on a real connection: the client retries it under
the key of its first attempt, and the message is delivered once."""

from __future__ import annotations

import pytest

from fleet_ipc import Client, Unavailable
from fleet_ipc.testing import CuttingProxy, IpcServer


def test_a_lost_answer_is_retried_under_its_key_and_delivered_once(server: IpcServer, client: Client) -> None:
    with CuttingProxy(server.grpc_addr) as proxy, Client(proxy.addr, app="shop") as through:
        with client.subscribe([":deploys"]) as subscription:
            messages = iter(subscription)
            assert next(messages).op == "ipc:subscribed"
            through.members()  # connected: the next answer through the proxy is the broadcast's
            proxy.arm()
            sent = through.broadcast(":deploys", "deploy:start", {"version": 42})
            assert proxy.cut.is_set(), "the first answer was not lost"
            # The first attempt was stored; the retry, under the same key, was not.
            assert sent.duplicate is True
            delivered = next(messages)
            assert (delivered.id, delivered.data) == (sent.id, {"version": 42})
            marker = client.broadcast(":deploys", "marker")
            assert next(messages).id == marker.id, "the retry was delivered a second time"


def test_without_retry_the_lost_answer_is_an_error_though_the_message_was_stored(
    server: IpcServer, client: Client
) -> None:
    with CuttingProxy(server.grpc_addr) as proxy, Client(proxy.addr, app="shop") as through:
        with client.subscribe([":deploys"]) as subscription:
            messages = iter(subscription)
            assert next(messages).op == "ipc:subscribed"
            through.members()
            proxy.arm()
            with pytest.raises(Unavailable):
                through.broadcast(":deploys", "deploy:start", retry=False)
            # Why the clients key their retries: the unanswered broadcast was delivered.
            assert next(messages).op == "deploy:start"
