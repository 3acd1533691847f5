"""Python exceptions for the outcomes of ipc.v1 calls.

Each gRPC status a caller may want to handle becomes its own exception, subclassing
the built-in exception a Python programmer would reach for (``TimeoutError``,
``ValueError``, ``LookupError``, ``ConnectionError``), so both
``except DeadlineExceeded`` and ``except TimeoutError`` work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from .client import Msg


class IpcError(Exception):
    """A failed ipc.v1 call: ``code`` is the gRPC status, ``details`` its message."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        self.code = code


class NoResponders(IpcError):
    """SendMsg: nobody is subscribed to the target (UNAVAILABLE "no responders")."""


class DeadlineExceeded(IpcError, TimeoutError):
    """SendMsg: the target did not answer within the timeout (DEADLINE_EXCEEDED)."""


class ReplyError(IpcError):
    """SendMsg: the target answered with ``error`` set; the reply is in ``reply``."""

    def __init__(self, reply: Msg):
        super().__init__(reply.error)
        self.reply = reply


class InvalidArgument(IpcError, ValueError):
    """The request was rejected as malformed (INVALID_ARGUMENT): see ``details``."""


class NotFound(IpcError, LookupError):
    """Reply: the request is unknown or was already answered/timed out (NOT_FOUND)."""


class ResourceExhausted(IpcError):
    """Too big a message, or a subscriber too slow to keep up (RESOURCE_EXHAUSTED)."""


class Unavailable(IpcError, ConnectionError):
    """The server cannot be reached or is shutting down (UNAVAILABLE)."""


class FailedPrecondition(IpcError):
    """Gather/Rollout: the key was used by a different operation (FAILED_PRECONDITION)."""


class Aborted(IpcError):
    """Gather/Rollout: a run under this key is still going, coordinated elsewhere (ABORTED)."""


_BY_CODE: dict[grpc.StatusCode, type[IpcError]] = {
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def error_for(code: grpc.StatusCode, details: str) -> IpcError:
    """The exception for a status code and its message."""
    if code == grpc.StatusCode.UNAVAILABLE and "no responders" in details.lower():
        return NoResponders(details, code)
    return _BY_CODE.get(code, IpcError)(details, code)


def from_rpc_error(error: grpc.RpcError) -> IpcError:
    """The exception matching a failed call's status."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    return error_for(code, details)
