//! pgoutput decoder: one XLogData payload in, one [`Message`] out.
//!
//! Every read is bounds-checked and every length is validated against the bytes that remain
//! before anything is allocated, so arbitrary input yields an error, never a panic. Strings and
//! values are slices of the input [`Bytes`] (zero-copy).

use super::{Column, Datum, Message, OldKind, Relation, Tuple, Xid};
use bytes::Bytes;

/// Decoder error: names the byte offset within the message where decoding failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {what} at offset {offset}")]
pub struct DecodeError {
    /// Byte offset within the message (0 = the tag byte) where the problem was found.
    pub offset: usize,
    /// What was expected or what was wrong, e.g. "truncated Int64 commit_lsn in Commit".
    pub what: String,
}

/// Decoder state: protocol version and whether we are inside a streamed block.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The `proto_version` sent in `START_REPLICATION` (1-4); gates which tags are accepted.
    pub proto_version: u32,
    /// `streaming 'parallel'` was requested: Stream Abort then carries abort LSN + timestamp.
    pub parallel_streaming: bool,
    /// Between Stream Start (`S`) and Stream Stop (`E`): with proto_version >= 2,
    /// R/Y/I/U/D/T/M carry an Int32 xid prefix.
    pub in_stream: bool,
}

/// Minimum encoded size of one Relation column: flags, empty name (NUL), type OID, typmod.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4;
/// Minimum encoded size of one TupleData column: a bare kind byte (`n` or `u`).
const MIN_DATUM_LEN: usize = 1;

impl Decoder {
    /// A decoder for `proto_version`, outside any streamed block.
    pub fn new(proto_version: u32, parallel_streaming: bool) -> Self {
        Decoder {
            proto_version,
            parallel_streaming,
            in_stream: false,
        }
    }

    /// Decode exactly one pgoutput message (the data part of one XLogData message).
    ///
    /// Updates [`Decoder::in_stream`] on Stream Start / Stream Stop; on error the state is
    /// left unchanged.
    ///
    /// # Errors
    ///
    /// An empty or truncated message, an unknown tag, a tag newer than `proto_version`, an
    /// unknown tuple marker or column kind, a String without its NUL, a negative length, a
    /// count larger than the remaining bytes could hold, or bytes after the complete message.
    pub fn decode(&mut self, buf: &Bytes) -> Result<Message, DecodeError> {
        let Some(&tag) = buf.first() else {
            return Err(DecodeError {
                offset: 0,
                what: "empty message, expected a tag".into(),
            });
        };
        let Some(name) = tag_name(tag) else {
            return Err(DecodeError {
                offset: 0,
                what: format!("unknown message tag 0x{tag:02x}"),
            });
        };
        let needed = min_version(tag);
        if self.proto_version < needed {
            return Err(DecodeError {
                offset: 0,
                what: format!(
                    "{name} (tag 0x{tag:02x}) requires protocol version {needed}, \
                     decoder uses {}",
                    self.proto_version
                ),
            });
        }
        let mut c = Cursor {
            buf,
            pos: 1,
            msg: name,
        };
        // The xid prefix only exists between S and E, and only in protocols that can stream.
        let streamed = self.in_stream && self.proto_version >= 2;
        let msg = match tag {
            b'B' => Message::Begin {
                final_lsn: c.u64("final_lsn")?,
                commit_ts: c.i64("commit_ts")?,
                xid: c.u32("xid")?,
            },
            b'C' => Message::Commit {
                flags: c.u8("flags")?,
                commit_lsn: c.u64("commit_lsn")?,
                end_lsn: c.u64("end_lsn")?,
                commit_ts: c.i64("commit_ts")?,
            },
            b'O' => Message::Origin {
                commit_lsn: c.u64("commit_lsn")?,
                name: c.cstr("name")?,
            },
            b'R' => {
                let xid = c.xid(streamed)?;
                Message::Relation(c.relation(xid)?)
            }
            b'Y' => Message::Type {
                xid: c.xid(streamed)?,
                oid: c.u32("type oid")?,
                namespace: c.cstr("namespace")?,
                name: c.cstr("name")?,
            },
            b'I' => {
                let xid = c.xid(streamed)?;
                let rel = c.u32("relation oid")?;
                c.expect_byte(b'N', "new tuple marker 'N'")?;
                Message::Insert {
                    xid,
                    rel,
                    new: c.tuple()?,
                }
            }
            b'U' => {
                let xid = c.xid(streamed)?;
                let rel = c.u32("relation oid")?;
                let at = c.pos;
                let marker = c.u8("tuple marker")?;
                let old = match marker {
                    b'K' => Some((OldKind::Key, c.tuple()?)),
                    b'O' => Some((OldKind::Full, c.tuple()?)),
                    b'N' => None,
                    other => return Err(c.err_at(at, bad_marker(other, "'K', 'O' or 'N'"))),
                };
                if old.is_some() {
                    c.expect_byte(b'N', "new tuple marker 'N'")?;
                }
                Message::Update {
                    xid,
                    rel,
                    old,
                    new: c.tuple()?,
                }
            }
            b'D' => {
                let xid = c.xid(streamed)?;
                let rel = c.u32("relation oid")?;
                let at = c.pos;
                let kind = match c.u8("old tuple marker")? {
                    b'K' => OldKind::Key,
                    b'O' => OldKind::Full,
                    other => return Err(c.err_at(at, bad_marker(other, "'K' or 'O'"))),
                };
                Message::Delete {
                    xid,
                    rel,
                    old: (kind, c.tuple()?),
                }
            }
            b'T' => {
                let xid = c.xid(streamed)?;
                let at = c.pos;
                let nrels = c.u32("nrels")?;
                let options = c.u8("options")?;
                // Validate before allocating: each OID takes 4 bytes.
                let nrels = c.check_count(at, nrels as usize, 4, "nrels")?;
                let mut rels = Vec::with_capacity(nrels);
                for _ in 0..nrels {
                    rels.push(c.u32("relation oid")?);
                }
                Message::Truncate { xid, options, rels }
            }
            b'M' => {
                let xid = c.xid(streamed)?;
                let transactional = c.bool("flags")?;
                let lsn = c.u64("lsn")?;
                let prefix = c.cstr("prefix")?;
                let content = c.len_bytes("content")?;
                Message::LogicalMessage {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                }
            }
            b'S' => Message::StreamStart {
                xid: c.u32("xid")?,
                first_segment: c.bool("first_segment")?,
            },
            b'E' => Message::StreamStop,
            b'c' => Message::StreamCommit {
                xid: c.u32("xid")?,
                flags: c.u8("flags")?,
                commit_lsn: c.u64("commit_lsn")?,
                end_lsn: c.u64("end_lsn")?,
                commit_ts: c.i64("commit_ts")?,
            },
            b'A' => {
                let xid = c.u32("xid")?;
                let subxid = c.u32("subxid")?;
                let abort = if self.parallel_streaming {
                    Some((c.u64("abort_lsn")?, c.i64("abort_ts")?))
                } else {
                    None
                };
                Message::StreamAbort { xid, subxid, abort }
            }
            b'b' => Message::BeginPrepare {
                prepare_lsn: c.u64("prepare_lsn")?,
                end_lsn: c.u64("end_lsn")?,
                prepare_ts: c.i64("prepare_ts")?,
                xid: c.u32("xid")?,
                gid: c.cstr("gid")?,
            },
            b'P' => Message::Prepare {
                flags: c.u8("flags")?,
                prepare_lsn: c.u64("prepare_lsn")?,
                end_lsn: c.u64("end_lsn")?,
                prepare_ts: c.i64("prepare_ts")?,
                xid: c.u32("xid")?,
                gid: c.cstr("gid")?,
            },
            b'K' => Message::CommitPrepared {
                flags: c.u8("flags")?,
                commit_lsn: c.u64("commit_lsn")?,
                end_lsn: c.u64("end_lsn")?,
                commit_ts: c.i64("commit_ts")?,
                xid: c.u32("xid")?,
                gid: c.cstr("gid")?,
            },
            b'r' => Message::RollbackPrepared {
                flags: c.u8("flags")?,
                prepare_end_lsn: c.u64("prepare_end_lsn")?,
                rollback_end_lsn: c.u64("rollback_end_lsn")?,
                prepare_ts: c.i64("prepare_ts")?,
                rollback_ts: c.i64("rollback_ts")?,
                xid: c.u32("xid")?,
                gid: c.cstr("gid")?,
            },
            b'p' => Message::StreamPrepare {
                flags: c.u8("flags")?,
                prepare_lsn: c.u64("prepare_lsn")?,
                end_lsn: c.u64("end_lsn")?,
                prepare_ts: c.i64("prepare_ts")?,
                xid: c.u32("xid")?,
                gid: c.cstr("gid")?,
            },
            // tag_name() accepted only the tags above.
            _ => return Err(c.err_at(0, format!("unknown message tag 0x{tag:02x}"))),
        };
        let rest = buf.len() - c.pos;
        if rest != 0 {
            return Err(c.err_at(
                c.pos,
                format!("{rest} trailing byte(s) after complete {name}"),
            ));
        }
        match msg {
            Message::StreamStart { .. } => self.in_stream = true,
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }
}

/// Human-readable message name for a tag, or `None` for an unknown tag.
fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

/// Lowest protocol version in which the server can send `tag`.
fn min_version(tag: u8) -> u32 {
    match tag {
        b'S' | b'E' | b'c' | b'A' => 2,
        b'b' | b'P' | b'K' | b'r' | b'p' => 3,
        _ => 1,
    }
}

fn bad_marker(got: u8, expected: &str) -> String {
    format!("unknown tuple marker 0x{got:02x}, expected {expected}")
}

/// Bounds-checked reader over one message. `msg` names the message for error texts.
struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
    msg: &'static str,
}

impl Cursor<'_> {
    fn err_at(&self, offset: usize, what: String) -> DecodeError {
        DecodeError { offset, what }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Take `n` bytes as a fixed-size array, or fail naming the wire type and field.
    #[inline]
    fn take<const N: usize>(&mut self, ty: &str, field: &str) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N);
        match end.and_then(|end| self.buf.get(self.pos..end)) {
            Some(s) => {
                let mut a = [0u8; N];
                a.copy_from_slice(s);
                self.pos += N;
                Ok(a)
            }
            None => Err(self.err_at(self.pos, format!("truncated {ty} {field} in {}", self.msg))),
        }
    }

    #[inline]
    fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.take::<1>("Int8", field)?[0])
    }

    #[inline]
    fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take("Int32", field)?))
    }

    #[inline]
    fn i32(&mut self, field: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take("Int32", field)?))
    }

    #[inline]
    fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take("Int64", field)?))
    }

    #[inline]
    fn i64(&mut self, field: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take("Int64", field)?))
    }

    /// An Int8 that the server only ever writes as 0 or 1; anything else is rejected
    /// rather than silently folded, because it would mean a format we do not understand.
    fn bool(&mut self, field: &str) -> Result<bool, DecodeError> {
        let at = self.pos;
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.err_at(
                at,
                format!("invalid {field} 0x{v:02x} in {}, expected 0 or 1", self.msg),
            )),
        }
    }

    fn expect_byte(&mut self, want: u8, what: &str) -> Result<(), DecodeError> {
        let at = self.pos;
        let got = self.u8(what)?;
        if got == want {
            Ok(())
        } else {
            Err(self.err_at(
                at,
                format!("expected {what} in {}, got 0x{got:02x}", self.msg),
            ))
        }
    }

    /// The Int32 xid prefix of R/Y/I/U/D/T/M inside a streamed block.
    #[inline]
    fn xid(&mut self, streamed: bool) -> Result<Option<Xid>, DecodeError> {
        if streamed {
            Ok(Some(self.u32("xid")?))
        } else {
            Ok(None)
        }
    }

    /// A NUL-terminated string, returned without the NUL as a slice of the input.
    fn cstr(&mut self, field: &str) -> Result<Bytes, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        match rest.iter().position(|&b| b == 0) {
            Some(n) => {
                let s = self.buf.slice(self.pos..self.pos + n);
                self.pos += n + 1;
                Ok(s)
            }
            None => Err(self.err_at(
                self.pos,
                format!("unterminated String {field} in {} (missing NUL)", self.msg),
            )),
        }
    }

    /// Int32 length followed by that many bytes, sliced from the input.
    fn len_bytes(&mut self, field: &str) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let len = self.i32(field)?;
        let Ok(len) = usize::try_from(len) else {
            return Err(self.err_at(
                at,
                format!("negative length {len} of {field} in {}", self.msg),
            ));
        };
        if len > self.remaining() {
            return Err(self.err_at(
                self.pos,
                format!(
                    "truncated {field} in {}: length {len} but {} byte(s) remain",
                    self.msg,
                    self.remaining()
                ),
            ));
        }
        let s = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(s)
    }

    /// Reject a count whose minimal encoding could not fit in the remaining bytes, so a
    /// hostile count cannot make us allocate.
    fn check_count(
        &self,
        at: usize,
        count: usize,
        min_each: usize,
        field: &str,
    ) -> Result<usize, DecodeError> {
        match count.checked_mul(min_each) {
            Some(need) if need <= self.remaining() => Ok(count),
            _ => Err(self.err_at(
                at,
                format!(
                    "{field} {count} in {} exceeds what {} remaining byte(s) can hold",
                    self.msg,
                    self.remaining()
                ),
            )),
        }
    }

    /// Relation body after the optional xid.
    fn relation(&mut self, xid: Option<Xid>) -> Result<Relation, DecodeError> {
        let oid = self.u32("relation oid")?;
        let namespace = self.cstr("namespace")?;
        let name = self.cstr("name")?;
        let replica_identity = self.u8("replica_identity")?;
        let at = self.pos;
        let ncols = u16::from_be_bytes(self.take("Int16", "ncols")?);
        let ncols = self.check_count(at, usize::from(ncols), MIN_COLUMN_LEN, "ncols")?;
        let mut columns = Vec::with_capacity(ncols);
        for _ in 0..ncols {
            columns.push(Column {
                flags: self.u8("column flags")?,
                name: self.cstr("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            xid,
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// TupleData: Int16 ncols, then one kind byte (and for `t`/`b` a length and value) each.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let at = self.pos;
        let ncols = u16::from_be_bytes(self.take("Int16", "tuple ncols")?);
        let ncols = self.check_count(at, usize::from(ncols), MIN_DATUM_LEN, "tuple ncols")?;
        let mut datums = Vec::with_capacity(ncols);
        for _ in 0..ncols {
            let at = self.pos;
            let d = match self.u8("tuple column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => Datum::Text(self.len_bytes("text column value")?),
                b'b' => Datum::Binary(self.len_bytes("binary column value")?),
                k => {
                    return Err(self.err_at(
                        at,
                        format!("unknown tuple column kind 0x{k:02x} in {}", self.msg),
                    ));
                }
            };
            datums.push(d);
        }
        Ok(datums)
    }
}
