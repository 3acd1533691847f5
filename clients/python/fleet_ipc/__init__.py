"""fleet_ipc — the Python client of fleet-ipc, the control-plane message bus.

    from fleet_ipc import Client

    client = Client("localhost:7700", app="shop")
    client.broadcast(":worker", "worker:restart")          # every worker of shop
    reply = client.send_msg(":worker", "config:get", {"key": "db"}, timeout=2)

# Layout
- ``client``: ``Client`` (one method per RPC, plus ``on``/``run`` handlers), ``Msg``,
  ``Member``, ``Lease``, ``LimitAnswer``, ``Subscription``, and the ``Value`` <-> Python conversion.
- ``errors``: one exception per failure a caller handles (``NoResponders``,
  ``DeadlineExceeded``, ``ReplyError``, ...).
- ``gen``: generates the stubs ``fleet_ipc.ipc.v1`` from ``proto/ipc/v1/ipc.proto``
  (``python -m fleet_ipc.gen``); they are not committed.
- ``testing``: runs a real ``ipc-server`` (or any process) and waits for its output
  lines — for tests of code that uses this client.
"""

from .client import Broadcasted, Client, Lease, LimitAnswer, Member, Msg, Subscription
from .errors import (
    DeadlineExceeded,
    InvalidArgument,
    IpcError,
    NoResponders,
    NotFound,
    ReplyError,
    ResourceExhausted,
    Unavailable,
)

__all__ = [
    "Broadcasted",
    "Client",
    "DeadlineExceeded",
    "InvalidArgument",
    "IpcError",
    "Lease",
    "LimitAnswer",
    "Member",
    "Msg",
    "NoResponders",
    "NotFound",
    "ReplyError",
    "ResourceExhausted",
    "Subscription",
    "Unavailable",
]
