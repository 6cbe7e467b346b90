//! Sinks, one folder each. Redis is the durable read model (and MQTT's outbox); MQTT is a
//! projection of Redis, republished from it until the broker acknowledged.
//!
//! Durability contract: a batch is *accepted* when handed to a sink and *durable* when the
//! sink's effects survive a skusync crash. Only durable batches may move the slot's
//! confirmed LSN. Redis is durable when its apply script returned; MQTT never holds the
//! slot back, because Redis marks what is unpublished and MQTT catches up from it.

pub mod history;
pub mod layout;
pub mod mqtt;
pub mod redis;
pub mod webhook;
