//! Benchmarks of fleet-ipc against NATS and Redis
