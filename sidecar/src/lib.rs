//! The per-pod sidecar: the ipc.v1 API on a Unix socket, relayed to the control plane
