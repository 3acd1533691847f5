//! The Redis bus: replicas of the control plane in sync through a Redis Stream
