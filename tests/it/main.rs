//! Integration tests against real servers.

mod harness;
mod harness_smoke;
