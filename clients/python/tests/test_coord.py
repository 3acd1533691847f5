"""Locks and rate limits through ``fleet_ipc.Client`` against a real ipc-server."""

from __future__ import annotations

import threading

import pytest

from fleet_ipc import Client, InvalidArgument


def test_one_holder_renewal_and_release(client: Client) -> None:
    lease = client.lock(":job", ttl=30)
    assert lease.acquired and lease.fence > 0 and lease.name == ":job"

    refused = client.lock(":job", ttl=30)
    assert not refused.acquired
    assert refused.fence == 0 and refused.holder == lease.holder

    renewed = client.renew(":job", lease.fence, ttl=60)
    assert renewed.acquired and renewed.fence == lease.fence
    assert renewed.expires_ms > lease.expires_ms

    assert client.unlock(":job", lease.fence + 1) is False
    assert client.unlock(":job", lease.fence) is True
    assert client.unlock(":job", lease.fence) is False

    again = client.lock(":job", ttl=30)
    assert again.acquired and again.fence > lease.fence


def test_a_waiter_gets_the_lock_when_it_is_released(client: Client, server) -> None:
    lease = client.lock(":job", ttl=30)
    with Client(server.grpc_addr, app="shop") as other:
        result: list = []
        waiter = threading.Thread(target=lambda: result.append(other.lock(":job", ttl=30, wait=20)))
        waiter.start()
        # Released whether or not the waiter is already waiting: either way it must get it.
        assert client.unlock(":job", lease.fence)
        waiter.join(30)
        assert result and result[0].acquired and result[0].fence > lease.fence


def test_bad_lock_is_invalid_argument(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="ttl"):
        client.lock(":job", ttl=0)


def test_limit_allows_the_burst_then_refuses(client: Client) -> None:
    answers = [client.limit(":mail", rate=1, interval=3600, burst=2) for _ in range(3)]
    assert [a.allowed for a in answers] == [True, True, False]
    assert [a.remaining for a in answers[:2]] == [1, 0]
    assert answers[2].retry_after > 0
