//! RESP2 replies without redis-rs' parser, for the publisher's reads (sans-IO: functions
//! take bytes; [`reader`](super::reader) is the one module that adapts them to a socket).
//!
//! Why: the publisher reads a SKU's whole hash (HGETALL, about 60 reply elements for the
//! demo's mapping) for every state message. redis-rs parses each element into a
//! `Value` of its own (an allocation per element, through a combinator parser), and the
//! field map made from them costs as much again: 21 µs per hash on machine R (`cargo
//! bench --bench publish`), more than building the message. Here a reply is first
//! delimited ([`reply_len`]), then a hash becomes one [`FlatHash`]: all its strings in one
//! buffer, checked as UTF-8 once, and a sorted index of spans.

use std::ops::Range;

/// A malformed or unexpected reply. The connection it came from is not to be reused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// Bytes that are not RESP2 (or a RESP3 type this reader never asks for).
    #[error("malformed Redis reply at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
    /// An error reply (`-ERR ...`, `-WRONGTYPE ...`).
    #[error("{0}")]
    Server(String),
    /// A well-formed reply of another type than the command returns.
    #[error("unexpected Redis reply: {0}")]
    Unexpected(&'static str),
}

/// Deepest nesting accepted (the publisher's commands reply at depth 2 at most).
const MAX_DEPTH: usize = 8;

/// Largest element count or bulk length accepted (Redis' own bulk limit is 512 MB).
const MAX_LEN: i64 = 512 * 1024 * 1024;

/// The length in bytes of the first complete reply in `buf`; `None` when `buf` holds
/// only part of it.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, RespError> {
    let mut at = 0;
    // elements still to read at each open array level
    let mut open: [i64; MAX_DEPTH] = [0; MAX_DEPTH];
    let mut depth = 0;
    loop {
        let Some((kind, n, next)) = header(buf, at)? else {
            return Ok(None);
        };
        at = next;
        match kind {
            b'+' | b'-' | b':' => {}
            b'$' if n < 0 => {}
            b'$' => {
                let end = at + n as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(RespError::Malformed {
                        at: end,
                        what: "bulk string not ended by CRLF",
                    });
                }
                at = end + 2;
            }
            b'*' if n > 0 => {
                if depth == MAX_DEPTH {
                    return Err(RespError::Malformed {
                        at,
                        what: "arrays nested too deep",
                    });
                }
                open[depth] = n;
                depth += 1;
                continue;
            }
            b'*' => {}
            _ => {
                return Err(RespError::Malformed {
                    at: at.saturating_sub(1),
                    what: "unknown reply type",
                });
            }
        }
        // one element done: close the arrays it completes
        loop {
            if depth == 0 {
                return Ok(Some(at));
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

/// The reply line at `at`: its type byte, its number (the count or length for `*`, `$`
/// and `:`; 0 for `+` and `-`), and where the next line starts. `None`: incomplete.
#[inline]
fn header(buf: &[u8], at: usize) -> Result<Option<(u8, i64, usize)>, RespError> {
    // Most lines are a nil or a length of one or two digits (every element of an HMGET's
    // or HGETALL's reply): read those in place, the rest in `header_line`.
    if let Some(&[kind @ (b'$' | b'*' | b':'), a, b, c, d]) = buf.get(at..at + 5) {
        let digit = |x: u8| x.is_ascii_digit().then(|| i64::from(x - b'0'));
        if b == b'\r' && c == b'\n' {
            if let Some(n) = digit(a) {
                return Ok(Some((kind, n, at + 4)));
            }
        } else if c == b'\r' && d == b'\n' {
            if a == b'-' && b == b'1' {
                return Ok(Some((kind, -1, at + 5)));
            }
            if let (Some(t), Some(u)) = (digit(a), digit(b)) {
                return Ok(Some((kind, 10 * t + u, at + 5)));
            }
        }
    }
    header_line(buf, at)
}

fn header_line(buf: &[u8], at: usize) -> Result<Option<(u8, i64, usize)>, RespError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let bad = |what| RespError::Malformed { at, what };
    match kind {
        b'+' | b'-' => {
            let Some(nl) = memchr_crlf(&buf[at + 1..]) else {
                return Ok(None);
            };
            Ok(Some((kind, 0, at + 1 + nl + 2)))
        }
        b':' | b'$' | b'*' => {
            // The number read as it is scanned for its `\r` (one pass: this runs for
            // every element of every reply, a few bytes each).
            let mut i = at + 1;
            let neg = buf.get(i) == Some(&b'-');
            i += usize::from(neg);
            let digits = i;
            let mut v: u64 = 0;
            loop {
                match buf.get(i) {
                    None => return Ok(None),
                    Some(b'\r') => break,
                    Some(&c) if c.is_ascii_digit() => {
                        v = (v.checked_mul(10))
                            .and_then(|v| v.checked_add(u64::from(c - b'0')))
                            .ok_or_else(|| bad("bad number in a reply header"))?;
                        i += 1;
                    }
                    Some(_) => return Err(bad("bad number in a reply header")),
                }
            }
            match buf.get(i + 1) {
                None => return Ok(None),
                Some(b'\n') => {}
                Some(_) => return Err(bad("bad number in a reply header")),
            }
            let n = match (neg, i - digits) {
                (_, 0) => None,
                (false, _) => i64::try_from(v).ok(),
                // i64::MIN's magnitude is one above i64::MAX
                (true, _) => (v <= 1 << 63).then(|| (v as i64).wrapping_neg()),
            }
            .ok_or_else(|| bad("bad number in a reply header"))?;
            if kind != b':' && !(-1..=MAX_LEN).contains(&n) {
                return Err(bad("length out of range"));
            }
            Ok(Some((kind, n, i + 2)))
        }
        _ => Err(bad("unknown reply type")),
    }
}

/// Appends one command, its arguments as RESP bulk strings, to `out` (what redis-rs'
/// `Cmd` packs, without building one: thin apply's reads make a command per SKU).
/// `n` is the number of arguments `args` yields.
pub fn pack_command<'a>(out: &mut Vec<u8>, n: usize, args: impl IntoIterator<Item = &'a [u8]>) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        put_bulk(out, a.len(), &[a]);
    }
}

/// Appends one bulk string, `parts` joined (`len` bytes in all). Most arguments are
/// under 100 bytes: their `$<len>\r\n` is written as one fixed-size copy, not through
/// itoa and a copy of its digits (this runs for every argument of every thin call).
fn put_bulk(out: &mut Vec<u8>, len: usize, parts: &[&[u8]]) {
    out.reserve(len + 24);
    if len < 10 {
        out.extend_from_slice(&[b'$', b'0' + len as u8, b'\r', b'\n']);
    } else if len < 100 {
        let (t, u) = ((len / 10) as u8, (len % 10) as u8);
        out.extend_from_slice(&[b'$', b'0' + t, b'0' + u, b'\r', b'\n']);
    } else {
        out.push(b'$');
        out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a command's arguments go, one at a time: a redis-rs `Cmd`, or a [`Packer`]'s
/// RESP bytes. One encoder writes both (thin apply's write is packed here on a single
/// Redis, and built as a `Cmd` where redis-rs routes it).
pub trait Args {
    /// An empty command sized for about `nargs` arguments of `bytes` in all.
    fn sized(nargs: usize, bytes: usize) -> Self
    where
        Self: Sized;

    /// One argument: `parts` joined (a key made of a prefix and a tag, without a copy).
    fn parts(&mut self, parts: &[&[u8]]);

    /// One argument.
    fn bytes(&mut self, a: &[u8]) {
        self.parts(&[a]);
    }

    /// One argument: a number in decimal (as redis-rs writes integers).
    fn int<T: itoa::Integer>(&mut self, v: T) {
        self.bytes(itoa::Buffer::new().format(v).as_bytes());
    }
}

impl Args for redis::Cmd {
    fn sized(nargs: usize, bytes: usize) -> Self {
        redis::Cmd::with_capacity(nargs, bytes)
    }

    fn parts(&mut self, parts: &[&[u8]]) {
        use redis::RedisWrite;
        use std::io::Write;
        let mut w = self.writer_for_next_arg();
        for p in parts {
            // writing into the command's own Vec cannot fail
            let _ = w.write_all(p);
        }
    }

    fn bytes(&mut self, a: &[u8]) {
        redis::RedisWrite::write_arg(self, a);
    }
}

/// Room before a [`Packer`]'s arguments for its `*<count>\r\n`, written once the count
/// is known (a usize has 20 digits at most).
const COUNT_ROOM: usize = 23;

/// One command packed as RESP, argument by argument, its count written at the end: a
/// thin write's count is known only once its entries are written, and this way nothing
/// is copied twice (a `Cmd` keeps its arguments, then packs them into another buffer).
pub struct Packer {
    buf: Vec<u8>,
    n: usize,
}

impl Packer {
    /// A packer with room for about `bytes` of arguments (their headers included).
    pub fn with_capacity(bytes: usize) -> Packer {
        let mut buf = Vec::with_capacity(COUNT_ROOM + bytes);
        buf.resize(COUNT_ROOM, 0);
        Packer { buf, n: 0 }
    }

    /// The packed command (as `Cmd::get_packed_command` packs it).
    pub fn finish(&mut self) -> &[u8] {
        let mut b = itoa::Buffer::new();
        let count = b.format(self.n).as_bytes();
        let start = COUNT_ROOM - count.len() - 3;
        self.buf[start] = b'*';
        self.buf[start + 1..start + 1 + count.len()].copy_from_slice(count);
        self.buf[COUNT_ROOM - 2..COUNT_ROOM].copy_from_slice(b"\r\n");
        &self.buf[start..]
    }
}

impl Args for Packer {
    fn sized(nargs: usize, bytes: usize) -> Self {
        // each argument's `$<len>` header and CRLFs
        Packer::with_capacity(bytes + 8 * nargs)
    }

    fn parts(&mut self, parts: &[&[u8]]) {
        put_bulk(&mut self.buf, parts.iter().map(|p| p.len()).sum(), parts);
        self.n += 1;
    }
}

/// Where `\r\n` starts in `b`.
fn memchr_crlf(b: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = b[from..].iter().position(|&c| c == b'\r') {
        let i = from + i;
        match b.get(i + 1) {
            Some(b'\n') => return Some(i),
            Some(_) => from = i + 1,
            None => return None,
        }
    }
    None
}

/// The error text of an error reply (`None`: not an error reply). `reply` is one whole
/// reply as [`reply_len`] delimits it.
pub fn error_of(reply: &[u8]) -> Option<String> {
    let rest = reply.strip_prefix(b"-")?;
    let end = rest.len().saturating_sub(2);
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// An integer reply (`:n`); an error reply is [`RespError::Server`].
pub fn int_of(reply: &[u8]) -> Result<i64, RespError> {
    if let Some(e) = error_of(reply) {
        return Err(RespError::Server(e));
    }
    match header(reply, 0)? {
        Some((b':', n, _)) => Ok(n),
        _ => Err(RespError::Unexpected("not an integer")),
    }
}

/// An HMGET reply's values, borrowed from `reply` (one whole reply as [`reply_len`]
/// delimits it), into `out`: a string per field asked for, `None` where the hash has no
/// such field or there is no hash. Thin apply reads every SKU of a batch this way, so
/// nothing is copied. An error reply is [`RespError::Server`]; a value that is not UTF-8
/// is malformed (skusync writes only UTF-8); on any error `out` is left empty.
pub fn strings_of<'a>(reply: &'a [u8], out: &mut Vec<Option<&'a str>>) -> Result<(), RespError> {
    out.clear();
    let r = strings_into(reply, out);
    if r.is_err() {
        out.clear();
    }
    r
}

fn strings_into<'a>(reply: &'a [u8], out: &mut Vec<Option<&'a str>>) -> Result<(), RespError> {
    if let Some(e) = error_of(reply) {
        return Err(RespError::Server(e));
    }
    let Some((b'*', n @ 0.., mut at)) = header(reply, 0)? else {
        return Err(RespError::Unexpected("an HMGET reply that is not an array"));
    };
    // a nil takes 5 bytes at least: a count the reply cannot hold reserves nothing more
    out.reserve((n as usize).min(reply.len() / 5));
    for _ in 0..n {
        let Some((b'$', len, start)) = header(reply, at)? else {
            return Err(RespError::Unexpected(
                "an HMGET element that is not a string",
            ));
        };
        if len < 0 {
            out.push(None);
            at = start;
            continue;
        }
        let end = start + len as usize;
        if end + 2 > reply.len() {
            return Err(RespError::Malformed {
                at,
                what: "bulk string past the reply's end",
            });
        }
        let s = std::str::from_utf8(&reply[start..end]).map_err(|_| RespError::Malformed {
            at: start,
            what: "a hash value that is not UTF-8",
        })?;
        out.push(Some(s));
        at = end + 2;
    }
    Ok(())
}

/// A Redis hash as HGETALL returned it: every field name and value in one string, and
/// per field the spans of its name and value, sorted by name (field names are unique).
/// Two are equal when they hold the same fields, whatever the order they came in.
#[derive(Debug, Clone, Default)]
pub struct FlatHash {
    text: String,
    /// (name, value) byte ranges into `text`, by name.
    spans: Vec<(Range<u32>, Range<u32>)>,
}

impl FlatHash {
    /// Parse one HGETALL reply (`reply`, as [`reply_len`] delimits it): an array of
    /// alternating names and values. An error reply is [`RespError::Server`]; a name or
    /// value that is not UTF-8 is malformed (skusync writes only UTF-8).
    pub fn parse(reply: &[u8]) -> Result<FlatHash, RespError> {
        if let Some(e) = error_of(reply) {
            return Err(RespError::Server(e));
        }
        let Some((b'*', n, mut at)) = header(reply, 0)? else {
            return Err(RespError::Unexpected(
                "an HGETALL reply that is not an array",
            ));
        };
        if n < 0 || n % 2 != 0 {
            return Err(RespError::Unexpected("an HGETALL reply with an odd count"));
        }
        // The strings' bytes are at most the reply's length: one allocation.
        let mut bytes = Vec::with_capacity(reply.len());
        // a pair takes at least 12 bytes (`$0\r\n\r\n` twice): a count the reply cannot
        // hold allocates nothing for it
        let mut spans = Vec::with_capacity((n as usize / 2).min(reply.len() / 12));
        let mut name = 0..0;
        for i in 0..n {
            let Some((b'$', len, start)) = header(reply, at)? else {
                return Err(RespError::Unexpected(
                    "an HGETALL element that is not a string",
                ));
            };
            if len < 0 || start + len as usize + 2 > reply.len() {
                return Err(RespError::Malformed {
                    at,
                    what: "bulk string past the reply's end",
                });
            }
            let from = bytes.len() as u32;
            bytes.extend_from_slice(&reply[start..start + len as usize]);
            let span = from..bytes.len() as u32;
            if i % 2 == 0 {
                name = span;
            } else {
                spans.push((name.clone(), span));
            }
            at = start + len as usize + 2;
        }
        if u32::try_from(bytes.len()).is_err() {
            return Err(RespError::Malformed {
                at: 0,
                what: "a hash of 4 GiB or more",
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| RespError::Malformed {
            at: e.utf8_error().valid_up_to(),
            what: "a hash field that is not UTF-8",
        })?;
        // a span boundary inside a multi-byte character would make a slice panic: each
        // span must start and end on a character boundary of the whole text
        let on_boundary = |r: &Range<u32>| {
            text.is_char_boundary(r.start as usize) && text.is_char_boundary(r.end as usize)
        };
        if !spans.iter().all(|(k, v)| on_boundary(k) && on_boundary(v)) {
            return Err(RespError::Malformed {
                at: 0,
                what: "a hash field that is not UTF-8",
            });
        }
        Ok(FlatHash::sorted(text, spans))
    }

    /// From (name, value) pairs (redis-rs' replies, tests). A repeated name keeps its
    /// last value, as a map would.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> FlatHash {
        let mut text = String::new();
        let mut spans = Vec::new();
        for (k, v) in pairs {
            let a = text.len() as u32;
            text.push_str(k);
            let b = text.len() as u32;
            text.push_str(v);
            spans.push((a..b, b..text.len() as u32));
        }
        FlatHash::sorted(text, spans)
    }

    fn sorted(text: String, mut spans: Vec<(Range<u32>, Range<u32>)>) -> FlatHash {
        let s = |r: &Range<u32>| &text.as_bytes()[r.start as usize..r.end as usize];
        // stable: for a repeated name the last pair ends up last, and `get` takes it
        spans.sort_by(|a, b| s(&a.0).cmp(s(&b.0)));
        spans.dedup_by(|later, earlier| {
            let same = s(&later.0) == s(&earlier.0);
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        FlatHash { text, spans }
    }

    fn str(&self, r: &Range<u32>) -> &str {
        &self.text[r.start as usize..r.end as usize]
    }

    /// The value of field `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.spans
            .binary_search_by(|(k, _)| self.str(k).cmp(name))
            .ok()
            .map(|i| self.str(&self.spans[i].1))
    }

    /// Every (name, value), by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.spans.iter().map(|(k, v)| (self.str(k), self.str(v)))
    }

    /// The number of fields.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether the hash has no field (HGETALL of a missing key).
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// From a reply redis-rs parsed (an array of names and values in RESP2, a map in
    /// RESP3): for connections the publisher does not read itself.
    pub fn from_value(v: redis::Value) -> Result<FlatHash, redis::ParsingError> {
        use redis::Value;
        let text =
            |v: &Value| -> Result<String, redis::ParsingError> { redis::from_redis_value_ref(v) };
        match v {
            Value::Array(items) if items.len() % 2 == 0 => {
                let mut pairs = Vec::with_capacity(items.len() / 2);
                for kv in items.chunks(2) {
                    pairs.push((text(&kv[0])?, text(&kv[1])?));
                }
                Ok(FlatHash::from_pairs(
                    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ))
            }
            Value::Map(items) => {
                let mut pairs = Vec::with_capacity(items.len());
                for (k, v) in &items {
                    pairs.push((text(k)?, text(v)?));
                }
                Ok(FlatHash::from_pairs(
                    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ))
            }
            other => {
                let m: std::collections::HashMap<String, String> = redis::from_redis_value(other)?;
                Ok(FlatHash::from_pairs(
                    m.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                ))
            }
        }
    }
}

impl PartialEq for FlatHash {
    fn eq(&self, other: &FlatHash) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for FlatHash {}

/// A hash from a map (tests, the HTTP API's reads).
impl From<&std::collections::HashMap<String, String>> for FlatHash {
    fn from(m: &std::collections::HashMap<String, String>) -> FlatHash {
        FlatHash::from_pairs(m.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn hgetall(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", pairs.len() * 2).into_bytes();
        for (k, v) in pairs {
            for s in [k, v] {
                out.extend_from_slice(format!("${}\r\n{s}\r\n", s.len()).as_bytes());
            }
        }
        out
    }

    #[test]
    fn a_reply_is_delimited_whole_or_not_at_all() {
        let r = b"*2\r\n*2\r\n:1\r\n$3\r\nab\n\r\n+OK\r\n-ERR x\r\n".to_vec();
        // the first reply: an array holding an array (an int, a bulk with a newline) and OK
        assert_eq!(reply_len(&r).unwrap(), Some(r.len() - 8));
        for cut in 0..r.len() - 8 {
            assert_eq!(reply_len(&r[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(reply_len(b"$-1\r\n").unwrap(), Some(5));
        assert_eq!(reply_len(b"*0\r\n:5\r\n").unwrap(), Some(4));
        assert_eq!(reply_len(b"*-1\r\n").unwrap(), Some(5));
        assert_eq!(reply_len(b"-ERR x\r\n").unwrap(), Some(8));
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for bad in [
            &b"\r\n"[..],
            b"*1\r\n\r\n",
            b"*2\r\n$1\r\na\r\n\r\n",
            b"?x\r\n",
            b"$abc\r\n",
            b"$3\r\nabcd\r\n",
            b"*99999999999999999999\r\n",
            b"$-2\r\n",
            b":-\r\n",
            b":\r\n",
            b":1x\r\n",
            b"$1\rx",
            b":-9223372036854775809\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(
                reply_len(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_hash_reads_back_field_by_field() {
        let h = FlatHash::parse(&hgetall(&[
            ("on_hand", "12"),
            ("loc:WH/1:on_hand", "7"),
            ("ü", ""),
            ("b:views:29", "3"),
        ]))
        .unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h.get("on_hand"), Some("12"));
        assert_eq!(h.get("loc:WH/1:on_hand"), Some("7"));
        assert_eq!(h.get("ü"), Some(""));
        assert_eq!(h.get("reserved"), None);
        assert!(FlatHash::parse(b"*0\r\n").unwrap().is_empty());
    }

    #[test]
    fn error_and_odd_replies_are_refused_by_the_hash_parser() {
        assert_eq!(
            FlatHash::parse(b"-WRONGTYPE Operation against a key\r\n"),
            Err(RespError::Server(
                "WRONGTYPE Operation against a key".into()
            ))
        );
        assert!(FlatHash::parse(b"*1\r\n$1\r\na\r\n").is_err());
        assert!(FlatHash::parse(b":3\r\n").is_err());
        // a count far beyond the bytes: refused without allocating for it
        assert!(FlatHash::parse(b"*536870912\r\n$1\r\na\r\n").is_err());
        assert!(FlatHash::parse(b"*2\r\n$1\r\na\r\n:1\r\n").is_err());
        // a name that is not UTF-8, and one whose bytes would split a character
        assert!(FlatHash::parse(b"*2\r\n$1\r\n\xff\r\n$0\r\n\r\n").is_err());
        assert!(
            FlatHash::parse(b"*4\r\n$1\r\n\xc3\r\n$1\r\n\xbc\r\n$0\r\n\r\n$0\r\n\r\n").is_err()
        );
    }

    #[test]
    fn a_packed_command_is_what_redis_rs_packs() {
        let args: [&[u8]; 4] = [b"HMGET", b"p:{a b}", b"", "loc:\u{e9}\r\n".as_bytes()];
        let mut ours = b"junk".to_vec();
        pack_command(&mut ours, args.len(), args);
        let mut c = redis::cmd("HMGET");
        for a in &args[1..] {
            c.arg(*a);
        }
        assert_eq!(&ours[4..], &c.get_packed_command()[..]);
    }

    #[test]
    fn a_packer_packs_what_redis_rs_packs() {
        let mut p = Packer::with_capacity(4);
        let mut c = redis::Cmd::new();
        for a in [&mut p as &mut dyn ArgsDyn, &mut c] {
            a.put_all();
        }
        assert_eq!(p.finish(), &c.get_packed_command()[..]);
        // no arguments, and counts of one and of several digits
        assert_eq!(Packer::with_capacity(0).finish(), b"*0\r\n");
        let mut many = Packer::with_capacity(0);
        let mut c = redis::Cmd::new();
        for i in 0..1234u32 {
            many.int(i);
            c.arg(i);
        }
        assert_eq!(many.finish(), &c.get_packed_command()[..]);
    }

    /// The same arguments through either [`Args`] (a test's way to call both alike).
    trait ArgsDyn {
        fn put_all(&mut self);
    }

    impl<A: Args> ArgsDyn for A {
        fn put_all(&mut self) {
            self.bytes(b"EVALSHA");
            self.bytes(b"");
            self.parts(&[b"p", b":{", "\u{e9}\r\n".as_bytes(), b"}"]);
            self.parts(&[]);
            self.int(0u64);
            self.int(u64::MAX);
            self.int(-7i64);
            self.int(42usize);
            // each way a length is written: one digit, two, and itoa's
            for n in [9, 10, 99, 100, 1000] {
                self.bytes(&vec![b'x'; n]);
            }
        }
    }

    #[test]
    fn integers_and_errors_read_back() {
        assert_eq!(int_of(b":-42\r\n"), Ok(-42));
        assert_eq!(int_of(b":9223372036854775807\r\n"), Ok(i64::MAX));
        assert_eq!(int_of(b":-9223372036854775808\r\n"), Ok(i64::MIN));
        assert!(int_of(b":9223372036854775808\r\n").is_err());
        assert_eq!(int_of(b":007\r\n"), Ok(7));
        assert_eq!(
            int_of(b"-ERR no\r\n"),
            Err(RespError::Server("ERR no".into()))
        );
        assert!(int_of(b"+OK\r\n").is_err());
        assert_eq!(error_of(b"+OK\r\n"), None);
    }

    #[test]
    fn hmget_values_read_back_borrowed_or_refused() {
        let mut out = Vec::new();
        strings_of(b"*3\r\n$2\r\n12\r\n$-1\r\n$2\r\n\xc3\xbc\r\n", &mut out).unwrap();
        assert_eq!(out, vec![Some("12"), None, Some("ü")]);
        strings_of(b"*0\r\n", &mut out).unwrap();
        assert!(out.is_empty());
        for bad in [
            &b"-WRONGTYPE Operation against a key\r\n"[..],
            b":1\r\n",
            b"*2\r\n$1\r\na\r\n:1\r\n",
            b"*1\r\n$1\r\n\xff\r\n",
            b"*1\r\n$5\r\nab\r\n",
            b"*-1\r\n",
            b"*536870912\r\n$1\r\na\r\n",
        ] {
            out.push(Some("stale"));
            assert!(
                strings_of(bad, &mut out).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(out.is_empty());
        }
    }

    proptest! {
        /// The flat hash holds what redis-rs' parser and map conversion make of the same
        /// bytes, and the delimiter finds the reply's end in any stream of them.
        #[test]
        fn a_flat_hash_equals_redis_rs_map(
            m in proptest::collection::hash_map("[a-z:/{}ü%_0-9]{0,12}", "[-0-9.a-zé\r\n]{0,10}", 0..40),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let pairs: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let bytes = hgetall(&pairs);
            let mut stream = bytes.clone();
            stream.extend_from_slice(&tail);
            prop_assert_eq!(reply_len(&stream).unwrap(), Some(bytes.len()));
            let ours = FlatHash::parse(&bytes).unwrap();
            let theirs: HashMap<String, String> =
                redis::from_redis_value(redis::parse_redis_value(&bytes).unwrap()).unwrap();
            let ours_map: HashMap<String, String> =
                ours.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            prop_assert_eq!(&ours_map, &theirs);
            for (k, v) in &theirs {
                prop_assert_eq!(ours.get(k), Some(v.as_str()));
            }
            prop_assert_eq!(FlatHash::from(&theirs), ours.clone());
            prop_assert_eq!(
                FlatHash::from_value(redis::parse_redis_value(&bytes).unwrap()).unwrap(),
                ours
            );
        }

        /// HMGET values are what redis-rs makes of the same bytes.
        #[test]
        fn hmget_values_equal_redis_rs(
            vals in proptest::collection::vec(proptest::option::of("[-0-9.a-zé:{}\r\n]{0,10}"), 0..40),
        ) {
            let mut bytes = format!("*{}\r\n", vals.len()).into_bytes();
            for v in &vals {
                match v {
                    Some(s) => bytes.extend_from_slice(format!("${}\r\n{s}\r\n", s.len()).as_bytes()),
                    None => bytes.extend_from_slice(b"$-1\r\n"),
                }
            }
            prop_assert_eq!(reply_len(&bytes).unwrap(), Some(bytes.len()));
            let mut ours = Vec::new();
            strings_of(&bytes, &mut ours).unwrap();
            let theirs: Vec<Option<String>> =
                redis::from_redis_value(redis::parse_redis_value(&bytes).unwrap()).unwrap();
            let ours: Vec<Option<String>> = ours.iter().map(|v| v.map(str::to_string)).collect();
            prop_assert_eq!(ours, theirs);
        }

        /// Sequences of RESP's own tokens (what random bytes rarely make: a CRLF where a
        /// type byte belongs, counts without elements) never panic either.
        #[test]
        fn token_soup_does_not_panic(tokens in proptest::collection::vec(
            proptest::sample::select(vec![
                "\r\n", "*1", "*2", "*0", "*-1", "$1", "$0", "$-1", ":", "+", "-", "a", "0", "-1", "\r", "\n",
            ]),
            0..24,
        )) {
            let b = tokens.concat().into_bytes();
            let _ = reply_len(&b);
            let _ = FlatHash::parse(&b);
            let _ = int_of(&b);
            let _ = strings_of(&b, &mut Vec::new());
        }

        /// Arbitrary bytes never panic the delimiter or the hash parser.
        #[test]
        fn arbitrary_bytes_do_not_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = reply_len(&b);
            let _ = FlatHash::parse(&b);
            let _ = int_of(&b);
            let _ = strings_of(&b, &mut Vec::new());
        }

        /// The in-place read of short lines says what the full one does, on lines made
        /// of the bytes that matter (types, digits, signs, CR, LF) and on any bytes.
        #[test]
        fn short_lines_read_as_the_full_parse_reads_them(
            before in proptest::collection::vec(any::<u8>(), 0..3),
            kind in proptest::sample::select(b"$*:+-x".to_vec()),
            // mostly the shapes read in place (one or two digits, `-1`), then anything
            number in "[0-9]{1,2}|-1|[-0-9x\r]{0,4}",
            end in prop_oneof![
                3 => Just(&b"\r\n"[..]),
                1 => proptest::sample::select(vec![&b"\r"[..], b"", b"\n", b"\rx", b"\r\n$"]),
            ],
            any_bytes in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            // a line as replies hold them (type, digits, CRLF), and lines broken in every
            // way, after bytes the read starts past
            let mut line = before.clone();
            line.push(kind);
            line.extend_from_slice(number.as_bytes());
            line.extend_from_slice(end);
            prop_assert_eq!(header(&line, before.len()), header_line(&line, before.len()));
            prop_assert_eq!(header(&any_bytes, 0), header_line(&any_bytes, 0));
        }
    }
}
