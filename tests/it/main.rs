//! Integration tests against real PostgreSQL, Redis and Mosquitto servers that the
//! harness starts on free loopback ports.

mod api;
mod apply_script;
mod architecture;
mod chaos;
mod cluster;
mod config_reference;
mod decimals;
mod docs_commands;
mod filters;
mod fold_oracle;
mod harness;
mod harness_smoke;
mod lookups;
mod mqtt_e2e;
mod mqtt_publisher;
mod ops;
mod oracle;
mod partitions;
mod pg_security;
mod redis_errors;
mod redis_reader;
mod replication;
mod secrets;
mod support;
mod surrogate;
mod telemetry;
mod verify;
mod webhook;
mod writer;
