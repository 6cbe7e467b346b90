//! Integration tests against real PostgreSQL, Redis and Mosquitto servers that the
//! harness starts on free loopback ports.

mod harness;
mod harness_smoke;
mod mqtt_publisher;
mod replication;
mod support;
