"""The Python client on a pod's Unix socket, through a real ipc-sidecar relaying to a
real ipc-server: what an application in a Kubernetes pod does."""

from __future__ import annotations

import threading

from fleet_ipc import Client, NoResponders
from fleet_ipc.testing import IpcServer, IpcSidecar

import pytest


def test_a_pod_process_broadcasts_subscribes_and_answers_over_the_socket(server: IpcServer, tmp_path) -> None:
    with IpcSidecar(tmp_path / "ipc.sock", server.grpc_addr, app="shop", args=["--role", "web"]) as sidecar:
        with Client(sidecar.socket, app="shop") as local, Client(server.grpc_addr, app="shop") as operator:
            assert local.send_msg("", "ping").op == "pong"

            subscription = local.subscribe([":news"], id="py-web-1")
            messages = iter(subscription)
            assert next(messages).op == "ipc:subscribed"
            sent = operator.broadcast(":news", "news:out", {"n": 1})
            got = next(messages)
            assert (got.op, got.channel, got.cursor) == ("news:out", "shop:news", sent.cursor)

            # A request from the control plane to this process, answered over the socket.
            answered = threading.Thread(
                target=lambda: operator_reply.append(operator.send_msg("py-web-1", "config:get", {}, timeout=5))
            )
            operator_reply: list = []
            answered.start()
            request = next(messages)
            assert request.op == "config:get" and request.reply_to
            local.reply(request.reply_to, "config:get", {"db": "postgres://db"})
            answered.join(10)
            assert operator_reply and operator_reply[0].data == {"db": "postgres://db"}
            subscription.cancel()

            with pytest.raises(NoResponders):
                local.send_msg(":nobody", "x", timeout=2)
