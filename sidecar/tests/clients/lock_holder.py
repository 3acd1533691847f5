"""A pod process that takes a lock through the sidecar's socket and then keeps its
connection open doing nothing, until it is killed: sidecar/tests/leases.rs kills it
and checks that the lock is released at once.

    python lock_holder.py SOCKET NAME TTL_MS
"""

import json
import sys
import time

import grpc

from fleet_ipc._stubs import ipc_pb2, ipc_pb2_grpc

socket, name, ttl_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
channel = grpc.insecure_channel(f"unix:{socket}")
stub = ipc_pb2_grpc.IpcStub(channel)
answer = stub.Lock(ipc_pb2.LockRequest(name=name, ttl_ms=ttl_ms), metadata=[("ipc-app", "shop")])
print(json.dumps({"acquired": answer.acquired, "fence": str(answer.fence),
                  "holder": answer.holder, "expires_ms": answer.expires_ms}), flush=True)
while True:
    time.sleep(3600)
