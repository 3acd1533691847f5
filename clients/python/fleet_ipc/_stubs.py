"""The generated ipc.v1 modules, generated on first use when missing.

The stubs come from ``proto/ipc/v1/ipc.proto`` via ``python -m fleet_ipc.gen``; in a
checkout with grpcio-tools installed a missing set is generated here, so
``import fleet_ipc`` just works.
"""

try:
    from .ipc.v1 import ipc_pb2, ipc_pb2_grpc
except ModuleNotFoundError as missing:
    if missing.name is None or not missing.name.startswith(__package__ + ".ipc"):
        raise
    from . import gen

    try:
        gen.generate()
    except (ImportError, FileNotFoundError) as cause:
        raise ImportError(
            "fleet_ipc's gRPC stubs are not generated and cannot be generated here "
            f"({cause}); run `python -m fleet_ipc.gen` in a checkout with grpcio-tools installed"
        ) from cause
    from .ipc.v1 import ipc_pb2, ipc_pb2_grpc

__all__ = ["ipc_pb2", "ipc_pb2_grpc"]
