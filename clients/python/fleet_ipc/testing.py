"""Run real processes in tests: an ``ipc-server`` on free ports, a ``redis-server``,
example workers, grpcurl streams — and wait on the lines they print instead of
sleeping. ``CuttingProxy`` loses the answer of one call on a real connection.

    with IpcServer(app="shop") as server:
        client = Client(server.grpc_addr)

``IpcServer`` starts ``ipc-server --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0``
and waits for its readiness line ``listening grpc=ADDR metrics=ADDR``; ``stop()``
sends SIGTERM and returns the exit status. The binary is ``$IPC_SERVER_BIN``, else
``target/debug/ipc-server`` of the checkout.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

#: How long a process may take to print what a test waits for before the test
#: fails. A bound on failure, never a way to wait: success returns at once.
WAIT_LIMIT = 30.0

# Optional listeners follow as more `name=ADDR` fields (injector=…, admin=…).
READY_LINE = re.compile(r"^listening grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+)(?P<more>(?: \S+=\S+)*)$")


def wait_until(check: Callable[[], object], what: str, limit: float = WAIT_LIMIT):
    """Polls ``check`` until it returns something truthy, and returns that; fails
    naming ``what`` after ``limit`` seconds. For states no process prints a line
    about (a member listed, a file written)."""
    deadline = time.monotonic() + limit
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit:.0f}s: {what}")
        time.sleep(0.02)


def repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "proto" / "ipc" / "v1" / "ipc.proto").is_file():
            return parent
    raise FileNotFoundError(f"{here} is not inside a fleet-ipc checkout")


def server_binary() -> Path:
    configured = os.environ.get("IPC_SERVER_BIN")
    binary = Path(configured) if configured else repo_root() / "target" / "debug" / "ipc-server"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"{binary} not found or not executable: build it with `cargo build -p ipc-server`")
    return binary


class Process:
    """A child process whose stdout lines are collected by a reader thread, so a
    test can wait for a line (``wait_for``) without blocking on a pipe or sleeping.
    stderr goes to a temporary file, shown when something goes wrong."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None):
        self.argv = [str(arg) for arg in argv]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=cwd,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []  # every stdout line so far
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"stdout of {self.argv[0]}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)  # EOF

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def describe(self) -> str:
        status = self.proc.poll()
        state = "running" if status is None else f"exited with {status}"
        stdout = "\n".join(self.lines[-40:])
        stderr = "\n".join(self.stderr().splitlines()[-40:])
        return f"`{' '.join(self.argv)}` ({state})\n--- stdout (last lines) ---\n{stdout}\n--- stderr (last lines) ---\n{stderr}"

    def wait_for(self, match: str | Callable[[str], bool], what: str | None = None, limit: float = WAIT_LIMIT) -> str:
        """The next stdout line matching ``match`` (a regex, searched, or a predicate).

        Fails with the process's output if it ends first or prints nothing matching
        within ``limit`` seconds.
        """
        predicate = match if callable(match) else (lambda line, pattern=re.compile(match): bool(pattern.search(line)))
        what = what or (match if isinstance(match, str) else "a matching line")
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line {what!r} within {limit:.0f}s from {self.describe()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)  # keep reporting EOF to later waits
                self.proc.wait()
                raise AssertionError(f"output ended before a line {what!r} from {self.describe()}")
            self.lines.append(line)
            if predicate(line):
                return line

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, limit: float = WAIT_LIMIT) -> int:
        """Wait for exit; a process still running after ``limit`` is killed and fails."""
        try:
            return self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not exit within {limit:.0f}s: {self.describe()}") from None

    def stop(self, limit: float = WAIT_LIMIT) -> int:
        """SIGTERM, then wait for the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(limit)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class IpcServer(Process):
    """A real ``ipc-server`` on free loopback ports, ready once constructed."""

    def __init__(
        self,
        app: str = "app",
        args: Sequence[str] = (),
        binary: str | Path | None = None,
        listen: str = "127.0.0.1:0",
    ):
        """``listen`` may name the address of a stopped server, to restart "it"."""
        argv = [
            str(binary or server_binary()),
            "--listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--app",
            app,
            *args,
        ]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        super().__init__(argv, env=env)
        try:
            ready = READY_LINE.match(self.wait_for(READY_LINE.pattern, "listening grpc=ADDR metrics=ADDR"))
        except BaseException:
            self.kill()
            raise
        assert ready is not None
        self.app = app
        self.grpc_addr: str = ready["grpc"]
        self.metrics_addr: str = ready["metrics"]
        more = dict(field.split("=", 1) for field in ready["more"].split())
        #: The admin console's address, with ``--admin-listen``.
        self.admin_addr: str | None = more.get("admin")

    def __enter__(self) -> IpcServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def sidecar_binary() -> Path:
    configured = os.environ.get("IPC_SIDECAR_BIN")
    binary = Path(configured) if configured else repo_root() / "target" / "debug" / "ipc-sidecar"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"{binary} not found or not executable: build it with `cargo build -p ipc-sidecar`")
    return binary


class IpcSidecar(Process):
    """A real ``ipc-sidecar`` serving ``socket`` for a pod, relaying to ``upstream``;
    ready once constructed (it printed ``listening socket=… health=…``)."""

    def __init__(self, socket: str | Path, upstream: str, app: str = "app", args: Sequence[str] = ()):
        argv = [str(sidecar_binary()), "--socket", str(socket), "--upstream", upstream, "--app", app, *args]
        super().__init__(argv, env=dict(os.environ))
        try:
            ready = self.wait_for(lambda line: line.startswith("listening socket="), "listening socket=PATH health=ADDR")
        except BaseException:
            self.kill()
            raise
        self.socket = str(socket)
        #: Where the sidecar serves ``/healthz``, ``/readyz`` and ``/metrics``.
        self.health_addr: str = ready.rpartition(" health=")[2]

    def __enter__(self) -> IpcSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def scrape(addr: str, name: str, **labels: str) -> float:
    """The sum of the samples of metric ``name`` whose labels include ``labels``, on
    the ``/metrics`` page at ``addr`` (0 when there are none)."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=WAIT_LIMIT) as response:
        text = response.read().decode()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            if all(label in series for label in wanted):
                total += float(value)
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    found = shutil.which("redis-server") or "/usr/sbin/redis-server"
    if not os.access(found, os.X_OK):
        raise FileNotFoundError("redis-server not found: run scripts/test (it installs the Debian package redis-server)")
    return found


class RedisServer(Process):
    """A private ``redis-server`` on a free loopback port, without persistence, in a
    temporary directory; ready once constructed. ``url`` is what ``--redis`` takes."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fleet-ipc-redis-")
        self.port = free_port()
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        super().__init__([*argv, "--dir", self._dir.name])
        try:
            self.wait_for("Ready to accept connections", "redis ready line")
        except BaseException:
            self.kill()
            raise
        self.url = f"redis://127.0.0.1:{self.port}/"

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._dir.cleanup()


# HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
_FRAME_HEADER = 9
_HEADERS_FRAME = 0x1


class CuttingProxy:
    """A TCP proxy in front of a gRPC server that can lose one answer.

    Once ``arm()``-ed, it cuts the connection when the server's response headers of
    the next call come back: the server did the work, the client never hears of it
    and sees UNAVAILABLE — what a lost answer looks like when a connection or a
    replica dies at the wrong moment. Connections opened afterwards are relayed
    untouched. ``cut`` is set once it happened.
    """

    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition(":")
        self._upstream = (host or "127.0.0.1", int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self._armed = threading.Event()
        self.cut = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="cutting proxy", daemon=True).start()

    def arm(self) -> None:
        self._armed.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self._upstream)
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            CuttingProxy._close(source, sink)

    def _answers(self, server: socket.socket, client: socket.socket) -> None:
        """Relays the server's frames one by one, so that it can stop at a call's
        response headers."""
        pending = b""
        try:
            while chunk := server.recv(65536):
                pending += chunk
                while len(pending) >= _FRAME_HEADER:
                    length = int.from_bytes(pending[:3], "big")
                    if len(pending) < _FRAME_HEADER + length:
                        break
                    kind, stream = pending[3], int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
                    if kind == _HEADERS_FRAME and stream and self._armed.is_set():
                        self._armed.clear()
                        self.cut.set()
                        return
                    client.sendall(pending[: _FRAME_HEADER + length])
                    pending = pending[_FRAME_HEADER + length :]
        except OSError:
            pass
        finally:
            self._close(server, client)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def sever(self) -> None:
        """Cuts every connection open now, as a network failure would; new ones are
        relayed as before (a client reconnects through the proxy)."""
        sockets, self._sockets = self._sockets, []
        self._close(*sockets)

    def close(self) -> None:
        self._listener.close()
        self._close(*self._sockets)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
