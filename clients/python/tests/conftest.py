"""Fixtures of the Python client's tests: a real ipc-server per test and a
``fleet_ipc.Client`` connected to it. Stubs are generated from the proto first.

    .venv/bin/python -m pytest clients/python/tests   (after cargo build -p ipc-server)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACKAGE_ROOT))

from fleet_ipc import gen  # noqa: E402

gen.generate()

from fleet_ipc import Client  # noqa: E402
from fleet_ipc.testing import IpcServer  # noqa: E402


@pytest.fixture
def server() -> Iterator[IpcServer]:
    with IpcServer(app="shop") as running:
        yield running
        status = running.stop()
        assert status == 0, f"ipc-server exited with {status} on SIGTERM:\n{running.describe()}"


@pytest.fixture
def client(server: IpcServer) -> Iterator[Client]:
    with Client(server.grpc_addr, app="shop") as connected:
        yield connected
