//! Integration tests against real PostgreSQL, Redis and Mosquitto servers that the
//! harness starts on free loopback ports.

mod apply_script;
mod harness;
mod harness_smoke;
mod replication;
mod support;
