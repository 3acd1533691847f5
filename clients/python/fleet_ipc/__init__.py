"""fleet_ipc — the Python client of fleet-ipc, the control-plane message bus.

    from fleet_ipc import Client

    client = Client("localhost:7700", app="shop")
    client.broadcast(":worker", "worker:restart")          # every worker of shop
    reply = client.send_msg(":worker", "config:get", {"key": "db"}, timeout=2)
    ledger = client.gather(":worker", "health:check")      # every worker, each named
    for event in client.rollout(":worker", "worker:restart", wave_size=2, ready_timeout=30):
        print(event.outcome or event.ledger)

# Layout
- ``client``: ``Client`` (one method per RPC, plus ``on``/``run`` handlers), ``Msg``,
  ``Member``, ``Lease``, ``LimitAnswer``, ``Subscription``, ``Ledger``, ``Outcome``,
  ``Rollout``, ``RolloutEvent``, and the ``Value`` <-> Python conversion.
- ``errors``: one exception per failure a caller handles (``NoResponders``,
  ``DeadlineExceeded``, ``ReplyError``, ...).
- ``gen``: generates the stubs ``fleet_ipc.ipc.v1`` from ``proto/ipc/v1/ipc.proto``
  (``python -m fleet_ipc.gen``); they are not committed.
- ``testing``: runs a real ``ipc-server`` (or any process) and waits for its output
  lines — for tests of code that uses this client.
"""

from .client import (
    Broadcasted,
    Client,
    Lease,
    Ledger,
    LimitAnswer,
    Member,
    Msg,
    Outcome,
    Rollout,
    RolloutEvent,
    Subscription,
)
from .errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    IpcError,
    NoResponders,
    NotFound,
    ReplyError,
    ResourceExhausted,
    Unavailable,
)

__all__ = [
    "Aborted",
    "Broadcasted",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "IpcError",
    "Lease",
    "Ledger",
    "LimitAnswer",
    "Member",
    "Msg",
    "NoResponders",
    "NotFound",
    "Outcome",
    "ReplyError",
    "ResourceExhausted",
    "Rollout",
    "RolloutEvent",
    "Subscription",
    "Unavailable",
]
