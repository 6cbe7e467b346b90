//! Placeholder; filled in by the decoder work.
use super::Message;
use bytes::Bytes;

/// Decoder error: names the byte offset within the message where decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {what} at offset {offset}")]
pub struct DecodeError {
    pub offset: usize,
    pub what: String,
}

/// Decoder state: protocol version and whether we are inside a streamed block.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub proto_version: u32,
    pub parallel_streaming: bool,
    pub in_stream: bool,
}

impl Decoder {
    pub fn new(proto_version: u32, parallel_streaming: bool) -> Self {
        Decoder {
            proto_version,
            parallel_streaming,
            in_stream: false,
        }
    }
    pub fn decode(&mut self, _buf: &Bytes) -> Result<Message, DecodeError> {
        Err(DecodeError {
            offset: 0,
            what: "unimplemented".into(),
        })
    }
}
