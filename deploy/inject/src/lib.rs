//! Kubernetes sidecar injection, shared by the admission webhook and ipcctl inject
