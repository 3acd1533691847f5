"""A thin, synchronous wrapper over the generated ipc.v1 stubs.

``Client`` has one method per RPC, speaking plain Python values (dicts, lists,
strings, numbers) instead of ``google.protobuf.Value``, and raising the exceptions of
:mod:`fleet_ipc.errors` instead of ``grpc.RpcError``. On top of ``subscribe`` sits a
handler API in the spirit of backendjs's ``ipc.on(op, fn)``: register functions by op
with ``client.on(op)``, then ``client.run(role=...)`` receives messages, calls the
matching handler, answers requests with the handler's return value on the same
stream (a Serve stream: no Reply call per request), and reconnects (resuming from its
cursor) when the stream is cut.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from . import errors
from ._stubs import ipc_pb2, ipc_pb2_grpc

log = logging.getLogger("fleet_ipc")

DEFAULT_ADDR = "localhost:7700"
#: SendMsg's wait when none is given (the server's default too).
DEFAULT_SEND_TIMEOUT = 5.0
#: Bound on the other unary calls, so that a stuck server cannot hang a caller.
DEFAULT_CALL_TIMEOUT = 10.0
#: Slack on SendMsg's gRPC deadline over ``timeout_ms``, so that the server's own
#: DEADLINE_EXCEEDED (with its explanation) arrives before the client gives up.
_DEADLINE_SLACK = 1.0
#: Reconnect backoff of ``Client.run``.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 5.0

SUBSCRIBED_OP = "ipc:subscribed"
GAP_OP = "ipc:gap"
#: The notice a Serve stream sends when one of its replies was not delivered:
#: data ``{"reply_to", "code", "error"}`` (``code`` a status name, ``NOT_FOUND`` when
#: the requester gave up).
REPLY_ERROR_OP = "ipc:reply-error"

#: Answers of ``run``'s handlers waiting to be written on the Serve stream; a handler
#: answering faster than the connection takes them waits.
_SERVE_QUEUE = 256
#: The largest answer sent on the Serve stream. A node decodes stream messages of up
#: to 4 MiB whatever its ``--max-msg-bytes``, and one it cannot decode ends the stream;
#: a larger answer goes as a Reply call, which fails alone if the node refuses it.
_SERVE_REPLY_MAX = (4 << 20) - 1024
#: How long ``stop()`` waits for answers already given to be written before it ends
#: the stream (any still unwritten then go as Reply calls).
_FLUSH_LIMIT = DEFAULT_CALL_TIMEOUT
#: Codes of a refused answer (too large, bad headers): its requester is then told so
#: with an error answer instead of waiting for its timeout.
_REFUSED_ANSWER_CODES = (
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
)

Handler = Callable[["Msg"], Any]


def to_value(data: Any) -> struct_pb2.Value | None:
    """A JSON-like Python value as ``google.protobuf.Value`` (``None``: absent)."""
    if data is None:
        return None
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """``google.protobuf.Value`` as a Python value; whole numbers become ``int``."""
    return _ints(json_format.MessageToDict(value))


def _ints(data: Any) -> Any:
    # protobuf numbers are doubles; JSON readers give ints for whole numbers.
    if isinstance(data, float) and data.is_integer() and abs(data) < 2**53:
        return int(data)
    if isinstance(data, list):
        return [_ints(item) for item in data]
    if isinstance(data, dict):
        return {key: _ints(item) for key, item in data.items()}
    return data


@dataclass(frozen=True)
class Msg:
    """A message as a subscriber sees it (``ipc.v1.Msg``)."""

    op: str
    data: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    id: str = ""
    channel: str = ""
    sender: str = ""
    ts_ms: int = 0
    cursor: str = ""
    reply_to: str = ""
    error: str = ""

    @classmethod
    def from_pb(cls, pb: ipc_pb2.Msg) -> Msg:
        return cls(
            op=pb.op,
            data=from_value(pb.data) if pb.HasField("data") else None,
            headers=dict(pb.headers),
            id=pb.id,
            channel=pb.channel,
            sender=pb.sender,
            ts_ms=pb.ts_ms,
            cursor=pb.cursor,
            reply_to=pb.reply_to,
            error=pb.error,
        )

    @property
    def is_request(self) -> bool:
        """Whether the sender waits for an answer (``Client.reply``)."""
        return bool(self.reply_to)


@dataclass(frozen=True)
class Broadcasted:
    """Where an accepted broadcast went: its id, resolved channel and log cursor."""

    id: str
    channel: str
    cursor: str
    #: the key was seen within the server's window: nothing was stored, and ``id``
    #: and ``cursor`` are the first message's
    duplicate: bool = False


#: Attempts of a ``broadcast`` that keeps failing with UNAVAILABLE.
BROADCAST_ATTEMPTS = 3

_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def _broadcasted(response: Any) -> Broadcasted:
    return Broadcasted(
        id=response.id, channel=response.channel, cursor=response.cursor, duplicate=response.duplicate
    )


@dataclass(frozen=True)
class Lease:
    """The answer to ``Client.lock`` / ``Client.renew``. When not ``acquired``,
    ``holder`` and ``expires_ms`` describe the current holder and ``fence`` is 0."""

    name: str
    acquired: bool
    #: grows with every grant of the name: resources refuse writes with an older one
    fence: int
    holder: str
    #: end of the lease unless renewed, ms since the epoch
    expires_ms: int


@dataclass(frozen=True)
class LimitAnswer:
    """The answer to ``Client.limit``."""

    allowed: bool
    remaining: int
    #: when refused: seconds until the cost is available
    retry_after: float


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _operation(
    target: str,
    op: str,
    data: Any,
    headers: Mapping[str, str] | None,
    labels: Mapping[str, str] | None,
    dry_run: bool,
    key: str | None,
    timeout: float,
) -> dict[str, Any]:
    """The fields GatherRequest and RolloutRequest share."""
    return {
        "target": target,
        "op": op,
        "data": to_value(data),
        "headers": headers or {},
        "timeout_ms": max(1, _ms(timeout)),
        "labels": labels or {},
        "dry_run": dry_run,
        "key": key or "",
    }


@dataclass(frozen=True)
class Member:
    """A connected subscriber, as listed by ``Client.members``."""

    id: str
    app: str
    role: str
    tag: str
    labels: dict[str, str]
    channels: list[str]
    node: str
    connected_ms: int

    @classmethod
    def from_pb(cls, pb: ipc_pb2.Member) -> Member:
        return cls(
            id=pb.id,
            app=pb.app,
            role=pb.role,
            tag=pb.tag,
            labels=dict(pb.labels),
            channels=list(pb.channels),
            node=pb.node,
            connected_ms=pb.connected_ms,
        )


@dataclass(frozen=True)
class Outcome:
    """One member's line in a :class:`Ledger`.

    ``status`` is the name of ``ipc.v1.Outcome.Status``: ``PENDING``, ``OK``,
    ``FAILED``, ``NO_REPLY``, ``NOT_READY`` or ``SKIPPED``.
    """

    member: str
    node: str
    status: str
    #: the member's answer, if any (a ``FAILED`` one has ``error`` set)
    reply: Msg | None = None
    #: Rollout: the 1-based wave (0: skipped, already OK in an earlier run)
    wave: int = 0
    duration_ms: int = 0
    #: why, in words: "replied with error: …", "no answer within 2000 ms", …
    detail: str = ""

    @classmethod
    def from_pb(cls, pb: ipc_pb2.Outcome) -> Outcome:
        return cls(
            member=pb.member,
            node=pb.node,
            status=ipc_pb2.Outcome.Status.Name(pb.status),
            reply=Msg.from_pb(pb.reply) if pb.HasField("reply") else None,
            wave=pb.wave,
            duration_ms=pb.duration_ms,
            detail=pb.detail,
        )


@dataclass(frozen=True)
class Ledger:
    """Who was asked and how each answered: the answer of ``Client.gather`` and the
    last event of ``Client.rollout``. One outcome per member resolved at the start,
    none missing. ``state`` is the name of ``ipc.v1.Ledger.State``: ``DONE``,
    ``STOPPED``, ``CANCELLED``, ``DRY_RUN`` (or ``RUNNING``)."""

    id: str
    target: str
    op: str
    state: str
    expected: int
    ok: int
    failed: int
    no_reply: int
    not_ready: int
    skipped: int
    outcomes: list[Outcome]
    waves: int

    @classmethod
    def from_pb(cls, pb: ipc_pb2.Ledger) -> Ledger:
        return cls(
            id=pb.id,
            target=pb.target,
            op=pb.op,
            state=ipc_pb2.Ledger.State.Name(pb.state),
            expected=pb.expected,
            ok=pb.ok,
            failed=pb.failed,
            no_reply=pb.no_reply,
            not_ready=pb.not_ready,
            skipped=pb.skipped,
            outcomes=[Outcome.from_pb(outcome) for outcome in pb.outcomes],
            waves=pb.waves,
        )

    def members(self, *statuses: str) -> list[str]:
        """The members with one of ``statuses`` (all of them when none is given)."""
        return [o.member for o in self.outcomes if not statuses or o.status in statuses]


@dataclass(frozen=True)
class RolloutEvent:
    """Progress of a rollout: one ``outcome`` as it settles (``wave`` 0 for members
    skipped on a rerun), and last an event with the whole ``ledger``."""

    wave: int
    outcome: Outcome | None = None
    ledger: Ledger | None = None

    @classmethod
    def from_pb(cls, pb: ipc_pb2.RolloutEvent) -> RolloutEvent:
        return cls(
            wave=pb.wave,
            outcome=Outcome.from_pb(pb.outcome) if pb.HasField("outcome") else None,
            ledger=Ledger.from_pb(pb.ledger) if pb.HasField("ledger") else None,
        )


class Rollout:
    """A running rollout: iterate it for :class:`RolloutEvent` (the last one carries
    the ledger, also kept in ``ledger``). ``cancel()`` (or leaving a ``with`` block)
    ends the call; the node then starts no further wave (state ``CANCELLED``)."""

    def __init__(self, call: Any):
        self._call = call
        self._cancelled = threading.Event()
        #: the final ledger, once the last event arrived
        self.ledger: Ledger | None = None

    def __iter__(self) -> Iterator[RolloutEvent]:
        try:
            for pb in self._call:
                event = RolloutEvent.from_pb(pb)
                if event.ledger is not None:
                    self.ledger = event.ledger
                yield event
        except grpc.RpcError as error:
            if self._cancelled.is_set() and error.code() == grpc.StatusCode.CANCELLED:
                return
            raise errors.from_rpc_error(error) from error

    def wait(self) -> Ledger:
        """Reads the remaining events and returns the final ledger."""
        for _ in self:
            pass
        if self.ledger is None:
            raise errors.IpcError("the rollout ended without its ledger")
        return self.ledger

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()

    def __enter__(self) -> Rollout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Subscription:
    """An open Subscribe stream; iterate it for :class:`Msg`.

    The first message is ``ipc:subscribed``; after it, ``id`` and ``node`` say who
    this subscriber is and where. ``cursor`` is the last cursor seen: pass it to a new
    ``subscribe`` to resume without a gap. ``cancel()`` (or leaving a ``with`` block)
    ends the stream; iteration then just stops.
    """

    def __init__(self, call: Any):
        self._call = call
        self._cancelled = threading.Event()
        self.id = ""
        self.node = ""
        self.cursor = ""

    def __iter__(self) -> Iterator[Msg]:
        try:
            for pb in self._call:
                msg = Msg.from_pb(pb)
                if msg.op == SUBSCRIBED_OP and isinstance(msg.data, dict):
                    self.id = str(msg.data.get("id", ""))
                    self.node = str(msg.data.get("node", ""))
                if msg.cursor:
                    self.cursor = msg.cursor
                yield msg
        except grpc.RpcError as error:
            if self._cancelled.is_set() and error.code() == grpc.StatusCode.CANCELLED:
                return
            raise errors.from_rpc_error(error) from error

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class _ServeStream:
    """The sending side of one Serve call of ``Client.run``.

    grpcio reads ``requests()`` on a thread of its own: first the subscription, then
    every answer given to ``send``. It asks for the next message only once the
    previous one is written, so a message handed over and not asked past is the only
    one whose fate is unknown when the call ends. ``finish`` ends the sending side
    once everything given is written; ``abandon`` (the call ended) hands back what was
    not written, for Reply calls. Either one ends the generator, so grpcio's thread
    never waits on it forever.
    """

    def __init__(self, subscribe: ipc_pb2.SubscribeRequest):
        self._subscribe = subscribe
        # Reentrant: stop() may run in a signal handler on a thread inside send().
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[ipc_pb2.ReplyRequest] = collections.deque()
        self._open = True
        #: handed to grpcio and not known to be written
        self._writing: ipc_pb2.ReplyRequest | None = None
        #: nothing more will be written: the generator returned, or the call ended
        self._over = threading.Event()

    def requests(self) -> Iterator[ipc_pb2.ServeRequest]:
        yield ipc_pb2.ServeRequest(subscribe=self._subscribe)
        while True:
            with self._cond:
                self._writing = None  # asked for more: the previous one is written
                self._cond.notify_all()
                while self._open and not self._queue:
                    self._cond.wait()
                if not self._queue:
                    self._over.set()
                    return  # grpcio then closes the sending side
                reply = self._writing = self._queue.popleft()
                self._cond.notify_all()
            yield ipc_pb2.ServeRequest(reply=reply)

    def send(self, reply: ipc_pb2.ReplyRequest) -> bool:
        """Queues ``reply``; ``False`` once the stream no longer takes answers."""
        with self._cond:
            while self._open and len(self._queue) >= _SERVE_QUEUE:
                self._cond.wait()
            if not self._open:
                return False
            self._queue.append(reply)
            self._cond.notify_all()
            return True

    def finish(self, limit: float) -> list[ipc_pb2.ReplyRequest]:
        """Takes no more answers, waits up to ``limit`` seconds for those given to be
        written, and returns the ones that were not."""
        with self._cond:
            self._open = False
            self._cond.notify_all()
        self._over.wait(limit)
        return self.abandon()

    def call_ended(self) -> None:
        self._over.set()

    def abandon(self) -> list[ipc_pb2.ReplyRequest]:
        """The call ended: the answers not written (the last one handed over
        possibly was, a Reply call then finds it answered)."""
        with self._cond:
            self._open = False
            unsent = ([self._writing] if self._writing is not None else []) + list(self._queue)
            self._writing = None
            self._queue.clear()
            self._cond.notify_all()
        return unsent


def _target(addr: str) -> str:
    """gRPC target for ``host:port``, ``http://host:port`` or a Unix socket path."""
    for scheme in ("http://", "grpc://"):
        if addr.startswith(scheme):
            return addr[len(scheme) :].rstrip("/")
    if addr.startswith("/"):
        return f"unix:{addr}"
    return addr


class Client:
    """A connection to an ipc-server or a sidecar.

    ``addr`` is ``host:port`` (also ``http://host:port``) or a Unix socket path.
    ``app`` is sent as ``ipc-app`` metadata: it expands channels written with a
    leading ``:`` (``:worker`` → ``<app>:worker``). ``token`` is sent as a bearer token.
    """

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        app: str | None = None,
        token: str | None = None,
        *,
        channel: grpc.Channel | None = None,
    ):
        self.addr = addr
        self.app = app
        target = _target(addr)
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = ipc_pb2_grpc.IpcStub(self._channel)
        self._metadata: list[tuple[str, str]] = []
        if app:
            self._metadata.append(("ipc-app", app))
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        self._handlers: dict[str, Handler] = {}
        self._stopping = threading.Event()
        self._running: Subscription | None = None
        #: the sending side of run()'s Serve stream open now, where answers go
        self._serve: _ServeStream | None = None
        #: false once a node answered Serve with UNIMPLEMENTED: run() then subscribes
        #: and answers with Reply calls
        self._serving = True
        #: messages being handled: stop() lets their answers go out first
        self._in_flight = 0
        #: requests told their answer was refused, so that a refused notice is not
        #: answered again
        self._told: collections.deque[str] = collections.deque(maxlen=256)
        # Reentrant: stop() may run in a signal handler on the thread inside run().
        self._lock = threading.RLock()
        #: The subscriber id of ``run``, once subscribed.
        self.id = ""

    # --- the five RPCs ------------------------------------------------------------

    def broadcast(
        self,
        channel: str,
        op: str,
        data: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        key: str | None = None,
        retry: bool = True,
    ) -> Broadcasted:
        """Publish ``op`` on ``channel``; returns once the bus has stored it.

        ``key`` is an idempotency key: a broadcast whose key the server saw within its
        ``--dedup-window`` (10 minutes) is not stored again, and the answer has
        ``duplicate`` set. A broadcast failing with UNAVAILABLE is retried (up to
        three attempts within ``timeout``) with a key from its first attempt (a random
        one when none is given), so a retry is never delivered twice;
        ``retry=False`` sends once, without an automatic key.
        """
        if key is None and retry:
            key = f"auto-{secrets.token_hex(8)}"
        request = ipc_pb2.BroadcastRequest(
            channel=channel, op=op, data=to_value(data), headers=headers or {}, key=key or ""
        )
        deadline = time.monotonic() + timeout
        attempt = 1
        while True:
            try:
                response = self._unary(self._stub.Broadcast, request, max(deadline - time.monotonic(), 0.001))
                break
            except errors.Unavailable:
                pause = 0.1 * 2**attempt
                if not retry or attempt >= BROADCAST_ATTEMPTS or time.monotonic() + pause >= deadline:
                    raise
                log.debug("broadcast unavailable; retrying with its key %s", key)
                time.sleep(pause)
                attempt += 1
        return _broadcasted(response)

    def publish(self, messages: Iterable[Mapping[str, Any]]) -> Iterator[Broadcasted | errors.IpcError]:
        """Publish many messages on one Publish stream: far cheaper per message than
        one ``broadcast`` each. ``messages`` yields dicts with ``channel``, ``op`` and
        optionally ``data``, ``headers``, ``key``. Yields one answer per message, in
        order, once stored: a :class:`Broadcasted`, or for a message the server refused
        the error ``broadcast`` would have raised (the stream goes on). A failure of the
        stream itself is raised. Not retried: give messages keys to resend them safely.
        """

        def requests() -> Iterator[Any]:
            for message in messages:
                yield ipc_pb2.BroadcastRequest(
                    channel=message.get("channel", ""),
                    op=message.get("op", ""),
                    data=to_value(message.get("data")),
                    headers=message.get("headers") or {},
                    key=message.get("key") or "",
                )

        try:
            for answer in self._stub.Publish(requests(), metadata=self._metadata):
                if answer.code or answer.error:
                    code = _STATUS_BY_NUMBER.get(answer.code, grpc.StatusCode.UNKNOWN)
                    yield errors.error_for(code, answer.error)
                else:
                    yield _broadcasted(answer)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from error

    def send_msg(
        self,
        target: str,
        op: str,
        data: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT,
        raise_on_error: bool = True,
    ) -> Msg:
        """Ask one subscriber of ``target`` and return its reply.

        ``target`` is a subscriber id or a role channel (any one of its subscribers);
        empty asks the node itself (``ping``, ``members``). Raises
        :class:`~fleet_ipc.errors.NoResponders` when no responder (that id, or a subscriber of that role) exists,
        :class:`~fleet_ipc.errors.DeadlineExceeded` when no answer comes within
        ``timeout`` seconds, and :class:`~fleet_ipc.errors.ReplyError` when the answer
        carries ``error`` (unless ``raise_on_error`` is false).
        """
        request = ipc_pb2.SendMsgRequest(
            target=target,
            op=op,
            data=to_value(data),
            headers=headers or {},
            timeout_ms=max(1, round(timeout * 1000)),
        )
        response = self._unary(self._stub.SendMsg, request, timeout + _DEADLINE_SLACK)
        reply = Msg.from_pb(response.reply)
        if reply.error and raise_on_error:
            raise errors.ReplyError(reply)
        return reply

    def reply(
        self,
        reply_to: str,
        op: str = "",
        data: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        error: str = "",
        timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        """Answer a request seen on a subscription (``msg.reply_to``).

        Raises :class:`~fleet_ipc.errors.NotFound` when the request is unknown or its
        sender stopped waiting.
        """
        request = ipc_pb2.ReplyRequest(reply_to=reply_to, op=op, data=to_value(data), headers=headers or {}, error=error)
        self._unary(self._stub.Reply, request, timeout)

    def members(
        self,
        *,
        app: str = "",
        role: str = "",
        labels: Mapping[str, str] | None = None,
        channel: str = "",
        timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> list[Member]:
        """Connected subscribers, fleet-wide, filtered by app, role and labels.

        With ``channel`` (``:`` adds the app): only those a broadcast on it would
        reach, its subscribers and the watchers whose patterns match; nothing is sent.
        """
        request = ipc_pb2.MembersRequest(app=app, role=role, labels=labels or {}, channel=channel)
        response = self._unary(self._stub.Members, request, timeout)
        return [Member.from_pb(member) for member in response.members]

    def gather(
        self,
        target: str,
        op: str,
        data: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        dry_run: bool = False,
        key: str | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> Ledger:
        """Ask every responder of ``target`` (a role channel or a member id), fleet-wide,
        and return the :class:`Ledger` naming each one ``OK``, ``FAILED`` or
        ``NO_REPLY`` once all answered or ``timeout`` seconds passed.

        ``labels`` keeps only responders with every one of them; ``dry_run`` resolves
        them and sends nothing (state ``DRY_RUN``). With ``key`` the ledger is kept
        for an hour: a repeat returns it and asks nobody. Raises
        :class:`~fleet_ipc.errors.NoResponders` when the target has no responder and
        :class:`~fleet_ipc.errors.FailedPrecondition` for a key used by another
        operation.
        """
        request = ipc_pb2.GatherRequest(**_operation(target, op, data, headers, labels, dry_run, key, timeout))
        return Ledger.from_pb(self._unary(self._stub.Gather, request, timeout + _DEADLINE_SLACK))

    def rollout(
        self,
        target: str,
        op: str,
        data: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        dry_run: bool = False,
        key: str | None = None,
        wave_size: int = 1,
        max_failures: int = 0,
        ready_timeout: float = 0.0,
        timeout: float = DEFAULT_SEND_TIMEOUT,
        deadline: float | None = None,
    ) -> Rollout:
        """Ask the responders of ``target`` in waves of ``wave_size`` (member-id order):
        the next wave only once every member of the current one answered and, with
        ``ready_timeout`` (seconds), came back (subscribed again under its id). Once
        more than ``max_failures`` members are not ``OK`` no wave starts: ``STOPPED``,
        the rest ``PENDING``.

        Returns a :class:`Rollout` to iterate for :class:`RolloutEvent` (one per
        outcome, the ledger last) or to ``wait()`` on. ``timeout`` is each member's
        time to answer; ``deadline`` (seconds, default none) bounds the whole call.
        ``dry_run`` yields the plan only (members and waves). A rerun with the same
        ``key`` resumes, from any replica: members already ``OK`` are ``SKIPPED``.
        Errors (no responders, bad input, a key used for another operation) are
        raised when iteration starts; :class:`~fleet_ipc.errors.Aborted` when a run
        under the key is still going elsewhere (the node first waits a few seconds,
        so that the run of a replica that died is resumed instead).
        """
        request = ipc_pb2.RolloutRequest(
            **_operation(target, op, data, headers, labels, dry_run, key, timeout),
            wave_size=wave_size,
            max_failures=max_failures,
            ready_timeout_ms=_ms(ready_timeout),
        )
        return Rollout(self._stub.Rollout(request, timeout=deadline, metadata=self._metadata))

    def lock(self, name: str, ttl: float, wait: float = 0.0, *, timeout: float = DEFAULT_CALL_TIMEOUT) -> Lease:
        """Takes the lock ``name`` for ``ttl`` seconds, waiting up to ``wait`` seconds
        for the holder to release it. Not getting it is ``acquired=False``, not an error."""
        return self._lock_call(name, ttl, wait, 0, timeout)

    def renew(self, name: str, fence: int, ttl: float, *, timeout: float = DEFAULT_CALL_TIMEOUT) -> Lease:
        """Extends the lease held with ``fence`` to ``ttl`` seconds from now;
        ``acquired=False`` once it is lost."""
        return self._lock_call(name, ttl, 0.0, fence, timeout)

    def _lock_call(self, name: str, ttl: float, wait: float, fence: int, timeout: float) -> Lease:
        request = ipc_pb2.LockRequest(name=name, ttl_ms=_ms(ttl), wait_ms=_ms(wait), fence=fence)
        response = self._unary(self._stub.Lock, request, timeout + wait)
        return Lease(
            name=name,
            acquired=response.acquired,
            fence=response.fence,
            holder=response.holder,
            expires_ms=response.expires_ms,
        )

    def unlock(self, name: str, fence: int, *, timeout: float = DEFAULT_CALL_TIMEOUT) -> bool:
        """Releases the lock held with ``fence``; ``False`` if that lease was no longer held."""
        response = self._unary(self._stub.Unlock, ipc_pb2.UnlockRequest(name=name, fence=fence), timeout)
        return bool(response.released)

    def limit(
        self,
        name: str,
        rate: int,
        *,
        interval: float = 1.0,
        burst: int = 0,
        cost: int = 1,
        timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> LimitAnswer:
        """Draws ``cost`` tokens from the fleet-wide bucket ``name`` (``rate`` per
        ``interval`` seconds, up to ``burst``, which defaults to ``rate``)."""
        request = ipc_pb2.LimitRequest(name=name, rate=rate, interval_ms=_ms(interval), burst=burst, cost=cost)
        response = self._unary(self._stub.Limit, request, timeout)
        return LimitAnswer(
            allowed=response.allowed, remaining=response.remaining, retry_after=response.retry_after_ms / 1000
        )

    def subscribe(
        self,
        channels: Sequence[str] = (),
        *,
        role: str = "",
        tag: str = "",
        id: str = "",
        app: str = "",
        labels: Mapping[str, str] | None = None,
        cursor: str = "",
    ) -> Subscription:
        """Open a stream of the messages of ``channels`` (names or patterns with ``*``
        and ``>``), of ``<app>:<role>`` and ``<app>:<role>:<tag>``, and of requests
        addressed to this subscriber. ``cursor`` resumes after that message."""
        request = ipc_pb2.SubscribeRequest(
            channels=list(channels), id=id, app=app, role=role, tag=tag, labels=labels or {}, cursor=cursor
        )
        return Subscription(self._stub.Subscribe(request, metadata=self._metadata))

    # --- handlers -----------------------------------------------------------------

    def on(self, op: str) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of ``op``.

        It is called with the :class:`Msg`; for a request, its return value is the
        reply's data and an exception it raises becomes the reply's ``error``.
        """

        def register(handler: Handler) -> Handler:
            self._handlers[op] = handler
            return handler

        return register

    def emit(self, op: str, msg: Msg | None = None) -> Any:
        """Call the handler of ``op`` in this process (no network); returns its result."""
        handler = self._handlers.get(op)
        if handler is None:
            raise KeyError(f"no handler for op {op!r}")
        return handler(msg if msg is not None else Msg(op=op))

    def run(
        self,
        *,
        role: str = "",
        tag: str = "",
        channels: Sequence[str] = (),
        id: str = "",
        app: str = "",
        labels: Mapping[str, str] | None = None,
        cursor: str = "",
        reconnect: bool = True,
        concurrency: int = 1,
    ) -> None:
        """Subscribe and dispatch every message to its handler until ``stop()``.

        The subscription is a Serve stream: the answers to requests travel back on
        it, in the order the handlers finish, instead of as one Reply call each. When
        the stream is cut (server restart, slow-subscriber cut-off) it reconnects
        with backoff under the same id, resuming from the last cursor, so nothing is
        missed; an answer given while no stream is open, or not yet written when one
        was cut, goes as a Reply call. Handlers run one at a time, in arrival order;
        with ``concurrency`` N, up to N run at once on threads (reading waits while N
        are running). ``id`` is then the subscriber id, to ``run`` again under (a
        worker that restarts).
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self._stopping.clear()
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fleet_ipc-handler") if concurrency > 1 else None
        slots = threading.BoundedSemaphore(concurrency)
        backoff = _BACKOFF_FIRST
        try:
            while not self._stopping.is_set():
                request = ipc_pb2.SubscribeRequest(
                    channels=list(channels), id=id, app=app, role=role, tag=tag, labels=labels or {}, cursor=cursor
                )
                subscription, serve = self._open(request)
                with self._lock:
                    self._running, self._serve = subscription, serve
                try:
                    if self._stopping.is_set():  # stop() raced with the (re)connect
                        break
                    for msg in subscription:
                        backoff = _BACKOFF_FIRST
                        if msg.op == SUBSCRIBED_OP and isinstance(msg.data, dict):
                            self.id = str(msg.data.get("id", ""))
                        if pool is None:
                            with self._lock:
                                self._in_flight += 1
                            try:
                                self._dispatch(msg)
                            finally:
                                with self._lock:
                                    self._in_flight -= 1
                        else:
                            slots.acquire()
                            with self._lock:
                                self._in_flight += 1
                            pool.submit(self._dispatch_pooled, msg, slots)
                        if self._stopping.is_set():
                            break
                except errors.IpcError as failure:
                    if failure.code == grpc.StatusCode.UNIMPLEMENTED and serve is not None and not subscription.id:
                        log.info("the node has no Serve: subscribing, answering with Reply calls")
                        self._serving = False
                        continue
                    if not isinstance(failure, (errors.Unavailable, errors.ResourceExhausted)) or not reconnect:
                        raise
                    log.warning("subscription cut (%s); reconnecting in %.1fs", failure.details, backoff)
                finally:
                    if pool is not None and self._stopping.is_set():
                        # Every handler still running answers before the stream ends.
                        for _ in range(concurrency):
                            slots.acquire()
                        for _ in range(concurrency):
                            slots.release()
                    with self._lock:
                        ours = self._running is subscription
                        if ours:
                            self._running, self._serve = None, None
                    if ours:
                        self._end_stream(subscription, serve, flush=self._stopping.is_set())
                id = subscription.id or id
                cursor = subscription.cursor or cursor
                if not reconnect:
                    break
                if self._stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def stop(self) -> None:
        """Make ``run`` return (from a handler, a signal handler or another thread).

        A message being handled is answered first, then the subscription ends: a
        handler of ``worker:restart`` can call ``stop()`` and its caller still gets
        the answer (a subscription ended before the answer is a request not answered).
        Answers given from then on go as Reply calls, each confirmed by the node, and
        those already given on the stream are written before it ends.
        """
        self._stopping.set()
        with self._lock:
            if self._in_flight or self._running is None:
                return  # run() ends the stream once the handlers answered
            running, serve = self._running, self._serve
            self._running, self._serve = None, None
        self._end_stream(running, serve, flush=True)

    def close(self) -> None:
        """``stop()``, without waiting for a handler still running, and close the channel."""
        self.stop()
        with self._lock:
            running, serve = self._running, self._serve
            self._running, self._serve = None, None
        if running is not None:
            if serve is not None:
                serve.abandon()
            running.cancel()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------

    def _unary(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from error

    def _open(self, request: ipc_pb2.SubscribeRequest) -> tuple[Subscription, _ServeStream | None]:
        """The next stream of ``run``: Serve, or Subscribe on a node without Serve."""
        if not self._serving:
            return Subscription(self._stub.Subscribe(request, metadata=self._metadata)), None
        serve = _ServeStream(request)
        call = self._stub.Serve(serve.requests(), metadata=self._metadata)
        call.add_done_callback(lambda _call: serve.call_ended())
        return Subscription(call), serve

    def _end_stream(self, subscription: Subscription, serve: _ServeStream | None, *, flush: bool) -> None:
        """Ends a stream of ``run``. With ``flush`` (stopping) the answers given on it
        are written first; the ones that could not be (a stream that broke) go as
        Reply calls before it is cancelled, while their requests still wait."""
        unsent = []
        if serve is not None:
            unsent = serve.finish(_FLUSH_LIMIT) if flush else serve.abandon()
        for reply in unsent:
            self._reply_call(reply)
        subscription.cancel()

    def _dispatch_pooled(self, msg: Msg, slots: threading.BoundedSemaphore) -> None:
        try:
            self._dispatch(msg)
        except Exception:
            log.exception("dispatching %s failed", msg.op)
        finally:
            with self._lock:
                self._in_flight -= 1
                last = self._stopping.is_set() and not self._in_flight and self._running is not None
                running, serve = (self._running, self._serve) if last else (None, None)
                if last:
                    self._running, self._serve = None, None
            slots.release()
            if running is not None:
                self._end_stream(running, serve, flush=True)

    def _dispatch(self, msg: Msg) -> None:
        if msg.op == GAP_OP:
            log.warning("messages were lost before %s: %s", msg.cursor, msg.data)
        if msg.op == REPLY_ERROR_OP and not msg.cursor:
            self._not_delivered(msg)
        handler = self._handlers.get(msg.op)
        if not msg.is_request:
            if handler is not None:
                try:
                    handler(msg)
                except Exception:
                    log.exception("handler of %s failed", msg.op)
            return
        if handler is None:
            self._answer(msg, error=f"no handler for op {msg.op!r}")
            return
        try:
            result = handler(msg)
        except Exception as failure:
            log.exception("handler of %s failed", msg.op)
            self._answer(msg, error=str(failure) or type(failure).__name__)
        else:
            self._answer(msg, data=result)

    def _answer(self, request: Msg, data: Any = None, error: str = "") -> None:
        try:
            value = to_value(data)
        except Exception as failure:  # not JSON-like: the requester learns why
            log.exception("the answer of %s is not JSON data", request.op)
            value, error = None, f"the answer of {request.op!r} is not JSON data: {failure}"
        self._send_answer(ipc_pb2.ReplyRequest(reply_to=request.reply_to, op=request.op, data=value, error=error))

    def _send_answer(self, reply: ipc_pb2.ReplyRequest) -> None:
        """On the Serve stream open now; as a Reply call when there is none, when
        stopping (confirmed before the stream ends) or when it is too large for it."""
        with self._lock:
            serve = None if self._stopping.is_set() else self._serve
        if serve is not None and reply.ByteSize() <= _SERVE_REPLY_MAX and serve.send(reply):
            return
        self._reply_call(reply)

    def _reply_call(self, reply: ipc_pb2.ReplyRequest) -> None:
        try:
            self._unary(self._stub.Reply, reply, DEFAULT_CALL_TIMEOUT)
        except errors.NotFound:
            log.warning("reply to %s came too late: the sender stopped waiting", reply.op)
        except errors.IpcError as failure:
            if failure.code in _REFUSED_ANSWER_CODES:
                self._tell_requester(reply.reply_to, failure.details)
            else:
                log.warning("answer to %s not delivered: %s", reply.op, failure)
        except Exception as failure:  # closed channel
            log.warning("answer to %s not delivered: %s", reply.op, failure)

    def _not_delivered(self, notice: Msg) -> None:
        """An ``ipc:reply-error`` notice: an answer sent on the stream was not delivered."""
        data = notice.data if isinstance(notice.data, dict) else {}
        reply_to, code, why = (str(data.get(key, "")) for key in ("reply_to", "code", "error"))
        if code == "NOT_FOUND":
            log.warning("reply to %s came too late: the sender stopped waiting", reply_to)
        elif reply_to and code in {status.name for status in _REFUSED_ANSWER_CODES}:
            self._tell_requester(reply_to, why)
        else:
            log.warning("answer to %s not delivered: %s %s", reply_to, code, why)

    def _tell_requester(self, reply_to: str, why: str) -> None:
        """The node refused an answer (too large, bad headers): its requester gets
        an error answer saying why, rather than waiting for its timeout."""
        with self._lock:
            told = reply_to in self._told
            if not told:
                self._told.append(reply_to)
        if told:
            log.warning("answer to %s not delivered: %s", reply_to, why)
            return
        log.warning("the node refused an answer (%s); its requester is told so", why)
        self._send_answer(ipc_pb2.ReplyRequest(reply_to=reply_to, error=f"answer not delivered: {why}"))
