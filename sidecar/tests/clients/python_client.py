"""A pod process on stubs generated from proto/ipc/v1/ipc.proto (grpcio), with a
stock channel and its defaults: `grpc.insecure_channel("unix:SOCKET")`, no option.
The same steps as node_client.js and go/main.go, one JSON line per step, for
any_client.rs to check.

    python python_client.py SOCKET NAME PROTO_ROOT
"""

import importlib.resources
import json
import sys
import tempfile

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_tools import protoc

# Stubs generated as a user would, with grpcio-tools, into a directory of our own.
OUT = tempfile.mkdtemp(prefix="ipc-python-stubs-")
WELL_KNOWN = importlib.resources.files("grpc_tools") / "_proto"
if protoc.main(["protoc", f"-I{sys.argv[3]}", f"-I{WELL_KNOWN}", f"--python_out={OUT}",
                f"--grpc_python_out={OUT}", "ipc/v1/ipc.proto"]) != 0:
    sys.exit("protoc failed")
sys.path.insert(0, OUT)
from ipc.v1 import ipc_pb2, ipc_pb2_grpc  # noqa: E402

METADATA = [("ipc-app", "shop")]


def say(**fields):
    print(json.dumps(fields), flush=True)


def value(data):
    return json_format.ParseDict(data, struct_pb2.Value())


def plain(msg):
    return json_format.MessageToDict(msg.data) if msg.HasField("data") else None


def main(socket_path, name):
    stub = ipc_pb2_grpc.IpcStub(grpc.insecure_channel(f"unix:{socket_path}"))
    pong = stub.SendMsg(ipc_pb2.SendMsgRequest(op="ping"), metadata=METADATA, timeout=10)
    say(pong=pong.reply.op)
    stream = stub.Subscribe(
        ipc_pb2.SubscribeRequest(channels=[f":{name}"], id=f"{name}-1", role=f"{name}worker"),
        metadata=METADATA,
    )
    say(subscribed=next(stream).op)
    stub.Broadcast(
        ipc_pb2.BroadcastRequest(channel=f":{name}", op=f"{name}:hello", data=value({"x": "one"})),
        metadata=METADATA,
        timeout=10,
    )
    for msg in stream:
        if msg.op == f"{name}:hello":
            say(got=plain(msg), channel=msg.channel)
            break
    answer = stub.SendMsg(
        ipc_pb2.SendMsgRequest(target=":operator", op=f"{name}:ask", data=value({"n": "two"}), timeout_ms=10000),
        metadata=METADATA,
        timeout=15,
    )
    say(answer=answer.reply.op, data=plain(answer.reply))
    for msg in stream:
        if msg.reply_to:
            stub.Reply(
                ipc_pb2.ReplyRequest(reply_to=msg.reply_to, op=f"{name}:answer", data=msg.data),
                metadata=METADATA,
                timeout=10,
            )
            say(answered=msg.op)
            stream.cancel()
            return


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
