//! Placeholder; filled in by the decoder work.
use super::Message;
use bytes::BytesMut;

/// Encode `msg` as the server would, appending to `out`.
pub fn encode(_msg: &Message, _in_stream: bool, _parallel_streaming: bool, _out: &mut BytesMut) {}
