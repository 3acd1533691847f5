"""A pod process in Python: talks to the sidecar over its Unix socket with the
fleet_ipc client (grpcio). Prints one JSON line per step, for the Rust test to check.

    python pod_worker.py SOCKET
"""

import json
import sys

import grpc
from fleet_ipc import Client


def say(**fields):
    print(json.dumps(fields), flush=True)


def main(socket_path):
    # A stock channel, with its defaults: grpc-core sends the socket path as
    # :authority, which the sidecar accepts.
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    client = Client(socket_path, app="shop", channel=channel)
    say(pong=client.send_msg("", "ping").op)
    subscription = client.subscribe([":py"], id="py-1", role="pyworker")
    messages = iter(subscription)
    say(subscribed=next(messages).op)
    client.broadcast(":py", "py:hello", {"x": 1})
    for msg in messages:
        if msg.op == "py:hello":
            say(got=msg.data, channel=msg.channel, has_cursor=bool(msg.cursor))
        elif msg.is_request:
            client.reply(msg.reply_to, "py:answer", {"echo": msg.data})
            say(answered=msg.op)
            return


if __name__ == "__main__":
    main(sys.argv[1])
