//! Sans-IO framing of the streaming replication protocol on top of `postgres-protocol`.
//!
//! [`parse_frame`] takes bytes and returns a frame or `None` ("need more"); encoders
//! write into a caller's buffer. `postgres-protocol` does not know `CopyBothResponse`
//! (`W`) and would consume and reject it, so headers are peeked here first; CopyData,
//! the hot path, is split off zero-copy without going through its parser.

use super::error::PgError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Default cap on one server frame. A single XLogData carries one pgoutput message, which
/// can hold a multi-megabyte TOASTed value; 256 MiB keeps a runaway length from eating RAM.
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;

/// One message from the server.
pub enum Frame {
    /// `d`: the payload of a CopyData message.
    CopyData(Bytes),
    /// `W`: the server entered CopyBoth mode (reply to `START_REPLICATION`).
    CopyBothResponse,
    /// `v`: the server does not support a protocol option we asked for.
    NegotiateProtocolVersion,
    /// Anything else, parsed by `postgres-protocol`.
    Other(backend::Message),
}

/// Parse one frame from the front of `buf`, or `Ok(None)` when more bytes are needed.
/// A header announcing more than `max_frame` bytes is an error as soon as its five
/// bytes are in; `buf` is never grown here.
pub fn parse_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, PgError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(PgError::Protocol(format!(
            "frame {:?} has invalid length {len}",
            tag as char
        )));
    }
    let total = len + 1;
    if total > max_frame {
        return Err(PgError::FrameTooLarge {
            len: total,
            max: max_frame,
        });
    }
    if buf.len() < total {
        // No reserve of the announced length: the buffer grows as bytes arrive, so a
        // header alone (a peer announcing a huge frame) costs nothing.
        return Ok(None);
    }
    match tag {
        b'd' => {
            let mut frame = buf.split_to(total).freeze();
            frame.advance(5);
            Ok(Some(Frame::CopyData(frame)))
        }
        b'W' => {
            buf.advance(total);
            Ok(Some(Frame::CopyBothResponse))
        }
        b'v' => {
            buf.advance(total);
            Ok(Some(Frame::NegotiateProtocolVersion))
        }
        _ => match backend::Message::parse(buf) {
            Ok(Some(m)) => Ok(Some(Frame::Other(m))),
            Ok(None) => Ok(None),
            Err(e) => Err(PgError::Protocol(format!(
                "cannot parse frame {:?}: {e}",
                tag as char
            ))),
        },
    }
}

/// Why a [`FrameGuard`] stopped a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardError {
    /// A header announced more than the cap in force.
    TooLarge { len: usize, max: usize, ready: bool },
    /// A header with a length below 4, or a truncated authentication request.
    Malformed(String),
    /// The authentication request was refused by the caller's check.
    Refused(String),
}

/// Watches the server's bytes on a stream another parser consumes (tokio-postgres): frame
/// by frame, without buffering, it refuses a frame above the cap (a small one until the
/// first ReadyForQuery, then `max`) and shows each authentication request (`R`) to a
/// check before its bytes can complete. A refusal happens no later than the read that
/// completes the request's first 9 bytes, so the consumer never sees a whole request it
/// should not answer.
#[derive(Debug)]
pub struct FrameGuard {
    startup_max: usize,
    max: usize,
    ready: bool,
    head: [u8; 9],
    have: usize,
    body_left: usize,
}

impl FrameGuard {
    /// A guard allowing `startup_max` bytes per frame before ReadyForQuery, `max` after.
    pub fn new(startup_max: usize, max: usize) -> FrameGuard {
        FrameGuard {
            startup_max,
            max,
            ready: false,
            head: [0; 9],
            have: 0,
            body_left: 0,
        }
    }

    /// Look at the next bytes of the stream. `on_auth` gets the code of every
    /// authentication request (0 = Ok, 3 = cleartext, 5 = md5, 10/11/12 = SASL ...).
    pub fn scan(
        &mut self,
        mut bytes: &[u8],
        on_auth: &mut dyn FnMut(u32) -> Result<(), String>,
    ) -> Result<(), GuardError> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let need = if self.have >= 5 && self.head[0] == b'R' {
                9
            } else {
                5
            };
            let n = (need - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < need {
                continue;
            }
            let tag = self.head[0];
            let len = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]])
                as usize;
            if need == 5 {
                if len < 4 {
                    return Err(GuardError::Malformed(format!(
                        "frame {:?} has invalid length {len}",
                        tag as char
                    )));
                }
                let max = if self.ready {
                    self.max
                } else {
                    self.startup_max
                };
                if len + 1 > max {
                    return Err(GuardError::TooLarge {
                        len: len + 1,
                        max,
                        ready: self.ready,
                    });
                }
                if tag == b'R' {
                    if len < 8 {
                        return Err(GuardError::Malformed(
                            "authentication request without a code".into(),
                        ));
                    }
                    continue; // read the code
                }
                if tag == b'Z' {
                    self.ready = true;
                }
                self.body_left = len - 4;
            } else {
                let code =
                    u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]);
                on_auth(code).map_err(GuardError::Refused)?;
                self.body_left = len - 8;
            }
            self.have = 0;
        }
        Ok(())
    }
}

/// A message inside the CopyBoth stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplMessage {
    /// `w`: WAL data; `data` is one pgoutput message.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        server_time: i64,
        data: Bytes,
    },
    /// `k`: primary keepalive; `reply` asks for a status update now.
    Keepalive {
        wal_end: u64,
        server_time: i64,
        reply: bool,
    },
}

/// Parse a CopyData payload of the replication stream.
pub fn parse_repl_message(mut b: Bytes) -> Result<ReplMessage, PgError> {
    let short = |what: &str| PgError::Protocol(format!("truncated {what} message"));
    if b.is_empty() {
        return Err(short("empty CopyData"));
    }
    match b.get_u8() {
        b'w' => {
            if b.len() < 24 {
                return Err(short("XLogData"));
            }
            let wal_start = b.get_u64();
            let wal_end = b.get_u64();
            let server_time = b.get_i64();
            Ok(ReplMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data: b,
            })
        }
        b'k' => {
            if b.len() < 17 {
                return Err(short("keepalive"));
            }
            let wal_end = b.get_u64();
            let server_time = b.get_i64();
            let reply = b.get_u8() != 0;
            Ok(ReplMessage::Keepalive {
                wal_end,
                server_time,
                reply,
            })
        }
        t => Err(PgError::Protocol(format!(
            "unknown replication message type 0x{t:02x}"
        ))),
    }
}

/// Current time in microseconds since 2000-01-01, the protocol's clock.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - PG_EPOCH_OFFSET_US
}

/// Encode a standby status update (`r`) as a CopyData frame. For a logical slot only
/// `flush` moves `confirmed_flush_lsn`; `write` and `apply` feed `pg_stat_replication`.
pub fn standby_status_update(
    write: u64,
    flush: u64,
    apply: u64,
    now: i64,
    reply: bool,
    out: &mut BytesMut,
) {
    out.reserve(39);
    out.put_u8(b'd');
    out.put_u32(4 + 34);
    out.put_u8(b'r');
    out.put_u64(write);
    out.put_u64(flush);
    out.put_u64(apply);
    out.put_i64(now);
    out.put_u8(reply as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copydata_needs_whole_frame_then_splits_zero_copy() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[b'd', 0, 0, 0, 7, b'k', 1]);
        assert!(parse_frame(&mut buf, 1024).unwrap().is_none());
        buf.extend_from_slice(&[2, 9]);
        match parse_frame(&mut buf, 1024).unwrap() {
            Some(Frame::CopyData(b)) => assert_eq!(&b[..], &[b'k', 1, 2]),
            _ => panic!("expected CopyData"),
        }
        assert_eq!(&buf[..], &[9]);
    }

    #[test]
    fn copy_both_response_is_recognized() {
        let mut buf = BytesMut::from(&[b'W', 0, 0, 0, 7, 0, 0, 0][..]);
        assert!(matches!(
            parse_frame(&mut buf, 1024).unwrap(),
            Some(Frame::CopyBothResponse)
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_invalid_frames_are_errors() {
        let mut buf = BytesMut::from(&[b'd', 0x10, 0, 0, 0][..]);
        assert!(matches!(
            parse_frame(&mut buf, 1024),
            Err(PgError::FrameTooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 2][..]);
        assert!(parse_frame(&mut buf, 1024).is_err());
    }

    #[test]
    fn a_two_gib_header_reserves_nothing_and_fails_under_the_startup_cap() {
        let mut buf = BytesMut::with_capacity(16);
        // 'R' announcing 2 GiB: under the startup cap it is refused at once.
        buf.extend_from_slice(&[b'R', 0x80, 0, 0, 0]);
        let cap = buf.capacity();
        match parse_frame(&mut buf, 64 * 1024) {
            Err(PgError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), ((2usize << 30) + 1, 64 * 1024));
            }
            _ => panic!("expected FrameTooLarge"),
        }
        assert_eq!(buf.capacity(), cap, "nothing reserved");
        // Under a cap it fits, a partial frame waits without growing the buffer.
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&[b'd', 0x7f, 0, 0, 0, 1, 2]);
        let cap = buf.capacity();
        assert!(parse_frame(&mut buf, usize::MAX).unwrap().is_none());
        assert_eq!(
            buf.capacity(),
            cap,
            "nothing reserved for the announced length"
        );
    }

    fn scan_all(g: &mut FrameGuard, chunks: &[&[u8]]) -> (Result<(), GuardError>, Vec<u32>) {
        let mut codes = Vec::new();
        for c in chunks {
            let r = g.scan(c, &mut |code| {
                codes.push(code);
                if code == 3 {
                    Err("no cleartext".into())
                } else {
                    Ok(())
                }
            });
            if r.is_err() {
                return (r, codes);
            }
        }
        (Ok(()), codes)
    }

    #[test]
    fn the_guard_sees_auth_codes_split_across_reads_and_caps_frames() {
        // SASL request split mid-code, a parameter status, ReadyForQuery, then a big row.
        let mut g = FrameGuard::new(64, 1024);
        let sasl: &[u8] = &[b'R', 0, 0, 0, 23, 0, 0, 0, 10];
        let (r, codes) = scan_all(
            &mut g,
            &[
                &sasl[..7],
                &sasl[7..],
                b"SCRAM-SHA-256\0\0",
                &[b'R', 0, 0, 0, 8, 0, 0, 0, 0],
                &[b'S', 0, 0, 0, 6, b'a', 0],
                &[b'Z', 0, 0, 0, 5, b'I'],
                &[b'D', 0, 0, 0x01, 0],
                &[0; 252],
            ],
        );
        assert_eq!(r, Ok(()));
        assert_eq!(codes, vec![10, 0]);
        // After ReadyForQuery the larger cap applies.
        assert!(matches!(
            g.scan(&[b'D', 0, 0, 0x10, 0], &mut |_| Ok(())),
            Err(GuardError::TooLarge {
                max: 1024,
                ready: true,
                ..
            })
        ));
        // A cleartext request is refused before its code bytes are all through.
        let mut g = FrameGuard::new(64, 1024);
        let (r, codes) = scan_all(&mut g, &[&[b'R', 0, 0, 0, 8, 0, 0], &[0, 3]]);
        assert_eq!(r, Err(GuardError::Refused("no cleartext".into())));
        assert_eq!(codes, vec![3]);
        // Before ReadyForQuery a 2 GiB header is refused by the small cap.
        let mut g = FrameGuard::new(64, 1024);
        assert!(matches!(
            g.scan(&[b'E', 0x80, 0, 0, 0], &mut |_| Ok(())),
            Err(GuardError::TooLarge {
                max: 64,
                ready: false,
                ..
            })
        ));
    }

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut p = BytesMut::new();
        p.put_u8(b'w');
        p.put_u64(10);
        p.put_u64(20);
        p.put_i64(30);
        p.put_slice(b"B...");
        assert_eq!(
            parse_repl_message(p.freeze()).unwrap(),
            ReplMessage::XLogData {
                wal_start: 10,
                wal_end: 20,
                server_time: 30,
                data: Bytes::from_static(b"B...")
            }
        );
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(5);
        k.put_i64(6);
        k.put_u8(1);
        assert_eq!(
            parse_repl_message(k.freeze()).unwrap(),
            ReplMessage::Keepalive {
                wal_end: 5,
                server_time: 6,
                reply: true
            }
        );
        for bad in [&b""[..], b"w123", b"k", b"z"] {
            assert!(parse_repl_message(Bytes::copy_from_slice(bad)).is_err());
        }
    }

    #[test]
    fn status_update_is_39_bytes() {
        let mut out = BytesMut::new();
        standby_status_update(1, 2, 3, 4, true, &mut out);
        assert_eq!(out.len(), 39);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(out[38], 1);
    }
}
