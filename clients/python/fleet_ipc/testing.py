"""Run real processes in tests: an ``ipc-server`` on free ports, example workers,
grpcurl streams — and wait on the lines they print instead of sleeping.

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
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: How long a process may take to print what a test waits for before the test
#: fails. A bound on failure, never a way to wait: success returns at once.
WAIT_LIMIT = 30.0

# Optional listeners follow as more `name=ADDR` fields (injector=…, admin=…).
READY_LINE = re.compile(r"^listening grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+)(?P<more>(?: \S+=\S+)*)$")


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
            self.wait_for(lambda line: line.startswith("listening socket="), "listening socket=PATH health=ADDR")
        except BaseException:
            self.kill()
            raise
        self.socket = str(socket)

    def __enter__(self) -> IpcSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
