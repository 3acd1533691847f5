//! Test harness: real servers, redis-server and sidecars on free loopback ports
