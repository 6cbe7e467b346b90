//! Typed column values from pgoutput's text format, chosen by the column's type OID.
//!
//! Errors never include the value itself: row data must not reach the logs.

use crate::pgoutput::Datum;

/// Type OIDs this module distinguishes (from `pg_type.dat`; stable across versions).
pub mod oid {
    /// `bool`
    pub const BOOL: u32 = 16;
    /// `bytea`
    pub const BYTEA: u32 = 17;
    /// `"char"`
    pub const CHAR: u32 = 18;
    /// `name`
    pub const NAME: u32 = 19;
    /// `int8`
    pub const INT8: u32 = 20;
    /// `int2`
    pub const INT2: u32 = 21;
    /// `int4`
    pub const INT4: u32 = 23;
    /// `text`
    pub const TEXT: u32 = 25;
    /// `oid`
    pub const OID: u32 = 26;
    /// `json`
    pub const JSON: u32 = 114;
    /// `float4`
    pub const FLOAT4: u32 = 700;
    /// `float8`
    pub const FLOAT8: u32 = 701;
    /// `bpchar` (`char(n)`)
    pub const BPCHAR: u32 = 1042;
    /// `varchar`
    pub const VARCHAR: u32 = 1043;
    /// `date`
    pub const DATE: u32 = 1082;
    /// `time`
    pub const TIME: u32 = 1083;
    /// `timestamp`
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `interval`
    pub const INTERVAL: u32 = 1186;
    /// `timetz`
    pub const TIMETZ: u32 = 1266;
    /// `numeric`
    pub const NUMERIC: u32 = 1700;
    /// `uuid`
    pub const UUID: u32 = 2950;
    /// `jsonb`
    pub const JSONB: u32 = 3802;
}

/// One typed column value, borrowing from the tuple where possible.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value the server did not send (UPDATE only).
    UnchangedToast,
    /// `bool`
    Bool(bool),
    /// `int2`, `int4`, `int8`, `oid`
    Int(i64),
    /// `float4`, `float8` (may be NaN or infinite)
    Float(f64),
    /// `numeric`: exact decimal text, including `NaN`, `Infinity`, `-Infinity`.
    Numeric(&'a str),
    /// Every other type, in PostgreSQL's text output form (dates, uuids, arrays, enums...).
    Text(&'a str),
    /// `json` / `jsonb`, raw text as sent.
    Json(&'a str),
    /// `bytea`, decoded.
    Bytea(Vec<u8>),
    /// A binary-format datum; skusync does not request binary mode, so it is passed through.
    Binary(&'a [u8]),
}

/// A column value that could not be parsed. Names the type and the problem, never the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The text did not have the form the type requires.
    #[error("invalid {type_name} value (type oid {type_oid}): {reason}")]
    Invalid {
        /// The column's type OID.
        type_oid: u32,
        /// Human name of the type as parsed ("int4", "text", ...).
        type_name: &'static str,
        /// What was wrong, without the value.
        reason: &'static str,
    },
    /// A column index beyond the tuple.
    #[error("column index {index} out of range: the tuple has {count} columns")]
    NoSuchColumn {
        /// Requested index.
        index: usize,
        /// Columns in the tuple.
        count: usize,
    },
    /// `new_value` on a change without a new tuple (a DELETE).
    #[error("the change has no new tuple")]
    NoNewTuple,
}

fn type_name(type_oid: u32) -> &'static str {
    match type_oid {
        oid::BOOL => "bool",
        oid::INT2 => "int2",
        oid::INT4 => "int4",
        oid::INT8 => "int8",
        oid::OID => "oid",
        oid::FLOAT4 => "float4",
        oid::FLOAT8 => "float8",
        oid::NUMERIC => "numeric",
        oid::JSON => "json",
        oid::JSONB => "jsonb",
        oid::BYTEA => "bytea",
        oid::TEXT => "text",
        oid::VARCHAR => "varchar",
        oid::BPCHAR => "bpchar",
        oid::NAME => "name",
        oid::CHAR => "char",
        oid::UUID => "uuid",
        oid::DATE => "date",
        oid::TIME => "time",
        oid::TIMETZ => "timetz",
        oid::TIMESTAMP => "timestamp",
        oid::TIMESTAMPTZ => "timestamptz",
        oid::INTERVAL => "interval",
        _ => "text-format",
    }
}

/// Parses one datum as the type `type_oid`. Unknown types become [`Value::Text`].
pub fn parse_value(datum: &Datum, type_oid: u32) -> Result<Value<'_>, ValueError> {
    let bytes = match datum {
        Datum::Null => return Ok(Value::Null),
        Datum::UnchangedToast => return Ok(Value::UnchangedToast),
        Datum::Binary(b) => return Ok(Value::Binary(b)),
        Datum::Text(b) => b,
    };
    let err = |reason| ValueError::Invalid {
        type_oid,
        type_name: type_name(type_oid),
        reason,
    };
    // client_encoding is UTF8, so every text-format value must be UTF-8.
    let s = std::str::from_utf8(bytes).map_err(|_| err("not valid UTF-8"))?;
    match type_oid {
        oid::BOOL => match s {
            "t" => Ok(Value::Bool(true)),
            "f" => Ok(Value::Bool(false)),
            _ => Err(err("expected t or f")),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => s
            .parse::<i64>()
            .map(Value::Int)
            .map_err(|_| err("not an integer in range")),
        oid::FLOAT4 | oid::FLOAT8 => parse_float(s)
            .map(Value::Float)
            .ok_or_else(|| err("not a floating-point number")),
        oid::NUMERIC => {
            if is_numeric_text(s) {
                Ok(Value::Numeric(s))
            } else {
                Err(err("not a decimal number"))
            }
        }
        oid::JSON | oid::JSONB => Ok(Value::Json(s)),
        oid::BYTEA => decode_bytea(s).map(Value::Bytea).map_err(err),
        _ => Ok(Value::Text(s)),
    }
}

/// PostgreSQL float output: decimal/exponent forms plus `NaN`, `Infinity`, `-Infinity`.
/// Rust's parser also takes `inf`, `infinity` in any case, which PostgreSQL never sends,
/// so only the exact spellings PG emits are allowed through the word forms.
fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ if s
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E') =>
        {
            None
        }
        _ => s.parse().ok(),
    }
}

/// `[-+]digits[.digits]` / `.digits` or the special values (PG never emits exponents).
fn is_numeric_text(s: &str) -> bool {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    (!int.is_empty() || !frac.is_empty()) && all_digits(int) && all_digits(frac)
        // "1." is not PG output
        && !(body.ends_with('.'))
}

/// Decodes bytea text output: hex (`\x0aff`, the default) or the legacy escape form.
fn decode_bytea(s: &str) -> Result<Vec<u8>, &'static str> {
    if let Some(hex) = s.strip_prefix("\\x") {
        let b = hex.as_bytes();
        if b.len() % 2 != 0 {
            return Err("odd number of hex digits");
        }
        return b
            .chunks_exact(2)
            .map(|p| match (hex_digit(p[0]), hex_digit(p[1])) {
                (Some(h), Some(l)) => Ok(h << 4 | l),
                _ => Err("invalid hex digit"),
            })
            .collect();
    }
    // Escape form (bytea_output = 'escape'): `\\` and `\ooo` octal, everything else literal.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = b.get(i + 1..i + 4).ok_or("truncated escape")?;
            let mut v: u16 = 0;
            for &d in oct {
                if !(b'0'..=b'7').contains(&d) {
                    return Err("invalid escape");
                }
                v = v * 8 + u16::from(d - b'0');
            }
            out.push(u8::try_from(v).map_err(|_| "invalid escape")?);
            i += 4;
        }
    }
    Ok(out)
}

fn hex_digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

fn hex_string(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("\\x");
    for &x in b {
        s.push(char::from(H[usize::from(x >> 4)]));
        s.push(char::from(H[usize::from(x & 15)]));
    }
    s
}

/// Why a value is not usable as a whole number (e.g. a stock quantity). Never holds the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotWholeNumber {
    /// The value is SQL NULL.
    #[error("value is NULL")]
    Null,
    /// An unchanged TOASTed value: its content is unknown.
    #[error("value is an unchanged TOASTed value (not sent by the server)")]
    UnchangedToast,
    /// The type is not int2/int4/int8/oid/numeric.
    #[error("value is not of an integer or numeric type")]
    NotNumeric,
    /// A numeric with a non-zero fractional part.
    #[error("numeric value has a fractional part")]
    Fractional,
    /// `NaN` or an infinity.
    #[error("numeric value is NaN or infinite")]
    NotFinite,
    /// Outside the i64 range.
    #[error("numeric value is out of the 64-bit integer range")]
    OutOfRange,
    /// Numeric text that is not a decimal number.
    #[error("numeric text is malformed")]
    Malformed,
    /// More fractional digits than the table's `scale` allows.
    #[error("numeric value has more fractional digits than the table's scale ({0})")]
    TooManyDigits(u32),
}

impl Value<'_> {
    /// JSON form for `skusync tail` and payloads.
    ///
    /// * `Null` -> `null`; `Bool` -> bool; `Int` -> number.
    /// * `Float` -> number when finite, else the strings `"NaN"`, `"Infinity"`, `"-Infinity"`.
    /// * `Numeric` -> its exact decimal text as a string (JSON numbers lose precision).
    /// * `Text` -> string.
    /// * `Json` -> the parsed JSON value, or the raw text as a string if it does not parse.
    /// * `Bytea` and `Binary` -> `"\\x..."` lowercase hex string (PostgreSQL's bytea hex form).
    /// * `UnchangedToast` -> the string `"unchanged-toast"`. This is in-band and could clash
    ///   with a text value of the same spelling; [`crate::txn::Change::to_json`] avoids the
    ///   ambiguity by listing such columns separately instead.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::UnchangedToast => J::String("unchanged-toast".into()),
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(n) => J::Number(n),
                None if f.is_nan() => J::String("NaN".into()),
                None if *f > 0.0 => J::String("Infinity".into()),
                None => J::String("-Infinity".into()),
            },
            Value::Numeric(s) | Value::Text(s) => J::String((*s).to_owned()),
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| J::String((*s).into())),
            Value::Bytea(b) => J::String(hex_string(b)),
            Value::Binary(b) => J::String(hex_string(b)),
        }
    }

    /// The value as an exact integer: integer types directly, numerics only when they have
    /// no fractional part (`"12.000"` is 12) and fit in i64. Floats and text are refused so
    /// that stock quantities are never silently rounded.
    pub fn as_whole_number(&self) -> Result<i64, NotWholeNumber> {
        match self {
            Value::Int(i) => Ok(*i),
            Value::Numeric(s) => numeric_to_i64(s),
            Value::Null => Err(NotWholeNumber::Null),
            Value::UnchangedToast => Err(NotWholeNumber::UnchangedToast),
            _ => Err(NotWholeNumber::NotNumeric),
        }
    }
}

impl Value<'_> {
    /// The value in units of 10^-`scale` (exact): at most `digits` (≤ `scale`) significant
    /// fractional digits are accepted; with both 0 this is [`Value::as_whole_number`].
    pub fn as_scaled(&self, digits: u32, scale: u32) -> Result<i64, NotWholeNumber> {
        if digits == 0 && scale == 0 {
            return self.as_whole_number();
        }
        let unit = 10i64.pow(scale);
        match self {
            Value::Int(i) => i.checked_mul(unit).ok_or(NotWholeNumber::OutOfRange),
            Value::Numeric(s) => numeric_to_scaled(s, digits, scale),
            Value::Null => Err(NotWholeNumber::Null),
            Value::UnchangedToast => Err(NotWholeNumber::UnchangedToast),
            _ => Err(NotWholeNumber::NotNumeric),
        }
    }
}

fn numeric_to_scaled(s: &str, digits: u32, scale: u32) -> Result<i64, NotWholeNumber> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Err(NotWholeNumber::NotFinite);
    }
    if !is_numeric_text(s) {
        return Err(NotWholeNumber::Malformed);
    }
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > digits as usize {
        return Err(if digits == 0 {
            NotWholeNumber::Fractional
        } else {
            NotWholeNumber::TooManyDigits(digits)
        });
    }
    // Accumulate negatively so the most negative value is representable.
    let mut acc: i64 = 0;
    let padded = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(scale as usize);
    for d in int.bytes().chain(padded) {
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_sub(i64::from(d - b'0')))
            .ok_or(NotWholeNumber::OutOfRange)?;
    }
    if neg {
        Ok(acc)
    } else {
        acc.checked_neg().ok_or(NotWholeNumber::OutOfRange)
    }
}

fn numeric_to_i64(s: &str) -> Result<i64, NotWholeNumber> {
    numeric_to_scaled(s, 0, 0)
}

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01 (UTC).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// PostgreSQL timestamp (microseconds since 2000-01-01T00:00:00Z) to Unix microseconds.
/// PostgreSQL's `infinity`/`-infinity` (i64::MAX/i64::MIN) map to themselves; other values
/// saturate at the i64 range.
pub fn pg_timestamp_to_unix_micros(micros_since_2000: i64) -> i64 {
    match micros_since_2000 {
        i64::MIN | i64::MAX => micros_since_2000,
        t => t.saturating_add(PG_EPOCH_UNIX_MICROS),
    }
}

/// PostgreSQL timestamp to RFC 3339 UTC with milliseconds, e.g. `2026-11-25T08:59:09.123Z`.
///
/// Sub-millisecond digits are truncated toward the past (so `-1` µs is `...59.999Z`).
/// `i64::MAX`/`i64::MIN` (PostgreSQL's `infinity`/`-infinity`) give `"infinity"` /
/// `"-infinity"`. Years outside 0000..=9999, which RFC 3339 cannot express, use the ISO 8601
/// expanded form with a sign and six digits (`+294277-01-09T04:00:54.775Z`).
pub fn pg_timestamp_to_rfc3339_millis(micros_since_2000: i64) -> String {
    match micros_since_2000 {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    // The epoch offset is whole milliseconds, so flooring first and adding it after is
    // the same floor, and stays within i64.
    let unix_ms = micros_since_2000.div_euclid(1000) + PG_EPOCH_UNIX_MICROS / 1000;
    const MS_PER_DAY: i64 = 86_400_000;
    let days = unix_ms.div_euclid(MS_PER_DAY);
    let ms_of_day = unix_ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_unix_days(days);
    let (h, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (min, rest) = (rest / 60_000, rest % 60_000);
    let (sec, ms) = (rest / 1000, rest % 1000);
    // Digit by digit (what `{:04}`, `{:+07}` and `{:02}` write): each state message
    // formats one or two of these, and `format!` was most of their cost.
    let mut out = String::with_capacity(30);
    if (0..=9999).contains(&y) {
        push_digits(&mut out, y.unsigned_abs(), 4);
    } else {
        out.push(if y < 0 { '-' } else { '+' });
        push_digits(&mut out, y.unsigned_abs(), 6);
    }
    for (sep, v, width) in [
        ('-', u64::from(m), 2),
        ('-', u64::from(d), 2),
        ('T', h as u64, 2),
        (':', min as u64, 2),
        (':', sec as u64, 2),
        ('.', ms as u64, 3),
    ] {
        out.push(sep);
        push_digits(&mut out, v, width);
    }
    out.push('Z');
    out
}

/// Appends `v` in decimal, zero-padded to at least `width` digits.
fn push_digits(out: &mut String, v: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(v);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// Days since 1970-01-01 to proleptic Gregorian (year, month, day).
///
/// Works in 400-year eras (146 097 days each, the Gregorian cycle) counted from
/// 0000-03-01, so the leap day falls at the end of each computed year.
fn civil_from_unix_days(days: i64) -> (i64, u32, u32) {
    const DAYS_PER_ERA: i64 = 146_097;
    // 0000-03-01 is 719 468 days before 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(DAYS_PER_ERA);
    let doe = z.rem_euclid(DAYS_PER_ERA); // day of era, 0..=146096
    // Year of era: remove the extra day every 4 years, restored every 100, removed every 400.
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, from March 1
    let mp = (5 * doy + 2) / 153; // month index from March, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + i64::from(month <= 2);
    // month and day are small by construction.
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn t(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn null_toast_binary_pass_through_any_type() {
        for ty in [oid::INT4, oid::BOOL, 99999] {
            assert_eq!(parse_value(&Datum::Null, ty).unwrap(), Value::Null);
            assert_eq!(
                parse_value(&Datum::UnchangedToast, ty).unwrap(),
                Value::UnchangedToast
            );
            let b = Datum::Binary(Bytes::from_static(&[0, 1, 2]));
            assert_eq!(parse_value(&b, ty).unwrap(), Value::Binary(&[0, 1, 2]));
        }
    }

    #[test]
    fn bools() {
        assert_eq!(parse_value(&t("t"), 16).unwrap(), Value::Bool(true));
        assert_eq!(parse_value(&t("f"), 16).unwrap(), Value::Bool(false));
        assert!(parse_value(&t("true"), 16).is_err());
    }

    #[test]
    fn integers() {
        for ty in [21, 23, 20, 26] {
            assert_eq!(parse_value(&t("-42"), ty).unwrap(), Value::Int(-42));
        }
        assert_eq!(
            parse_value(&t("9223372036854775807"), 20).unwrap(),
            Value::Int(i64::MAX)
        );
        assert_eq!(
            parse_value(&t("4294967295"), 26).unwrap(),
            Value::Int(4294967295)
        );
        for bad in ["", "1.0", "x", "9223372036854775808", " 1"] {
            assert!(parse_value(&t(bad), 23).is_err(), "{bad}");
        }
    }

    #[test]
    fn floats() {
        assert_eq!(parse_value(&t("1.5"), 701).unwrap(), Value::Float(1.5));
        assert_eq!(parse_value(&t("1e+30"), 700).unwrap(), Value::Float(1e30));
        assert_eq!(
            parse_value(&t("-Infinity"), 701).unwrap(),
            Value::Float(f64::NEG_INFINITY)
        );
        assert_eq!(
            parse_value(&t("Infinity"), 701).unwrap(),
            Value::Float(f64::INFINITY)
        );
        match parse_value(&t("NaN"), 700).unwrap() {
            Value::Float(f) => assert!(f.is_nan()),
            v => panic!("{v:?}"),
        }
        for bad in ["inf", "nan", "", "abc", "1.2.3"] {
            assert!(parse_value(&t(bad), 701).is_err(), "{bad}");
        }
    }

    #[test]
    fn numerics() {
        for ok in [
            "0",
            "-1.50",
            "123456789012345678901234567890.000001",
            ".5",
            "NaN",
            "Infinity",
            "-Infinity",
        ] {
            assert_eq!(parse_value(&t(ok), 1700).unwrap(), Value::Numeric(ok));
        }
        for bad in ["", "-", "1.", "1e5", "abc", "1..2", "--1"] {
            assert!(parse_value(&t(bad), 1700).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_like_types_and_unknown() {
        for ty in [
            25, 1043, 1042, 19, 18, 2950, 1082, 1083, 1266, 1114, 1184, 1186, 1009, 77777,
        ] {
            assert_eq!(
                parse_value(&t("héllo {1,2}"), ty).unwrap(),
                Value::Text("héllo {1,2}")
            );
        }
        assert_eq!(
            parse_value(&t("{\"a\":1}"), 114).unwrap(),
            Value::Json("{\"a\":1}")
        );
        assert_eq!(parse_value(&t("[1]"), 3802).unwrap(), Value::Json("[1]"));
    }

    #[test]
    fn non_utf8_is_an_error_without_the_value() {
        let d = Datum::Text(Bytes::from_static(b"secret\xff"));
        for ty in [25, 23, 1700, 3802] {
            let e = parse_value(&d, ty).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("UTF-8"), "{msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
        let e = parse_value(&t("secret"), 23).unwrap_err().to_string();
        assert!(
            e.contains("int4") && e.contains("23") && !e.contains("secret"),
            "{e}"
        );
    }

    #[test]
    fn bytea_forms() {
        assert_eq!(
            parse_value(&t("\\x00ff7A"), 17).unwrap(),
            Value::Bytea(vec![0, 0xff, 0x7a])
        );
        assert_eq!(parse_value(&t("\\x"), 17).unwrap(), Value::Bytea(vec![]));
        assert_eq!(
            parse_value(&t("a\\\\b\\000\\377"), 17).unwrap(),
            Value::Bytea(vec![b'a', b'\\', b'b', 0, 255])
        );
        for bad in ["\\x0", "\\xzz", "\\400", "\\12", "\\"] {
            assert!(parse_value(&t(bad), 17).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_forms() {
        use serde_json::json;
        assert_eq!(Value::Null.to_json(), json!(null));
        assert_eq!(Value::UnchangedToast.to_json(), json!("unchanged-toast"));
        assert_eq!(Value::Bool(true).to_json(), json!(true));
        assert_eq!(Value::Int(-7).to_json(), json!(-7));
        assert_eq!(Value::Float(0.5).to_json(), json!(0.5));
        assert_eq!(Value::Float(f64::NAN).to_json(), json!("NaN"));
        assert_eq!(Value::Float(f64::INFINITY).to_json(), json!("Infinity"));
        assert_eq!(
            Value::Float(f64::NEG_INFINITY).to_json(),
            json!("-Infinity")
        );
        assert_eq!(Value::Numeric("1.10").to_json(), json!("1.10"));
        assert_eq!(Value::Text("x").to_json(), json!("x"));
        assert_eq!(Value::Json("{\"a\":[1]}").to_json(), json!({"a":[1]}));
        assert_eq!(Value::Json("{broken").to_json(), json!("{broken"));
        assert_eq!(Value::Bytea(vec![1, 0xab]).to_json(), json!("\\x01ab"));
        assert_eq!(Value::Binary(&[0xff]).to_json(), json!("\\xff"));
    }

    #[test]
    fn whole_numbers() {
        assert_eq!(Value::Int(5).as_whole_number(), Ok(5));
        for (s, v) in [
            ("12", 12),
            ("12.000", 12),
            ("-3", -3),
            ("+4", 4),
            ("-0.0", 0),
            ("007", 7),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(Value::Numeric(s).as_whole_number(), Ok(v), "{s}");
        }
        assert_eq!(
            Value::Numeric("1.5").as_whole_number(),
            Err(NotWholeNumber::Fractional)
        );
        assert_eq!(
            Value::Numeric("abc").as_whole_number(),
            Err(NotWholeNumber::Malformed)
        );
        assert_eq!(
            Value::Numeric("NaN").as_whole_number(),
            Err(NotWholeNumber::NotFinite)
        );
        assert_eq!(
            Value::Numeric("Infinity").as_whole_number(),
            Err(NotWholeNumber::NotFinite)
        );
        assert_eq!(
            Value::Numeric("9223372036854775808").as_whole_number(),
            Err(NotWholeNumber::OutOfRange)
        );
        assert_eq!(
            Value::Numeric("-9223372036854775809").as_whole_number(),
            Err(NotWholeNumber::OutOfRange)
        );
        assert_eq!(Value::Null.as_whole_number(), Err(NotWholeNumber::Null));
        assert_eq!(
            Value::UnchangedToast.as_whole_number(),
            Err(NotWholeNumber::UnchangedToast)
        );
        assert_eq!(
            Value::Float(1.0).as_whole_number(),
            Err(NotWholeNumber::NotNumeric)
        );
        assert_eq!(
            Value::Text("1").as_whole_number(),
            Err(NotWholeNumber::NotNumeric)
        );
    }

    #[test]
    fn timestamps_known_dates() {
        let day = 86_400_000_000i64;
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(0),
            "2000-01-01T00:00:00.000Z"
        );
        assert_eq!(pg_timestamp_to_unix_micros(0), 946_684_800_000_000);
        // 2000 is a leap year (divisible by 400): Feb 29 exists.
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(59 * day),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(60 * day),
            "2000-03-01T00:00:00.000Z"
        );
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(366 * day),
            "2001-01-01T00:00:00.000Z"
        );
        // Pre-2000, with truncation toward the past.
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(-1),
            "1999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(-1000),
            "1999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(-1001),
            "1999-12-31T23:59:59.998Z"
        );
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(-946_684_800_000_000),
            "1970-01-01T00:00:00.000Z"
        );
        // 1900 is not a leap year (divisible by 100, not 400): 1900-02-28 -> 1900-03-01.
        // Unix day -25508 is 1900-03-01; -25509 is 1900-02-28.
        let unix_to_pg = |unix_days: i64| unix_days * day - 946_684_800_000_000;
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(unix_to_pg(-25509)),
            "1900-02-28T00:00:00.000Z"
        );
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(unix_to_pg(-25508)),
            "1900-03-01T00:00:00.000Z"
        );
        // 2024-02-29 (leap) = unix day 19782.
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(unix_to_pg(19782)),
            "2024-02-29T00:00:00.000Z"
        );
        // 2026-11-25T08:59:09.123456Z: unix 1795597149.123456 s.
        let unix_micros = 1_795_597_149_123_456i64;
        let pg = unix_micros - 946_684_800_000_000;
        assert_eq!(pg_timestamp_to_unix_micros(pg), unix_micros);
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(pg),
            "2026-11-25T08:59:09.123Z"
        );
        // 4713-11-24 BC is PostgreSQL's minimum; far years use the expanded form.
        assert_eq!(pg_timestamp_to_rfc3339_millis(i64::MAX), "infinity");
        assert_eq!(pg_timestamp_to_rfc3339_millis(i64::MIN), "-infinity");
        assert_eq!(pg_timestamp_to_unix_micros(i64::MAX), i64::MAX);
        assert_eq!(pg_timestamp_to_unix_micros(i64::MIN), i64::MIN);
        assert_eq!(pg_timestamp_to_unix_micros(i64::MAX - 1), i64::MAX);
        assert_eq!(
            pg_timestamp_to_rfc3339_millis(i64::MAX - 1),
            "+294277-01-09T04:00:54.775Z"
        );
        assert!(pg_timestamp_to_rfc3339_millis(i64::MIN + 1).starts_with('-'));
    }

    /// Naive reference: walk years and months from 1970.
    fn naive_civil(mut days: i64) -> (i64, u32, u32) {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let ylen = |y: i64| if leap(y) { 366 } else { 365 };
        let mut y = 1970;
        while days < 0 {
            y -= 1;
            days += ylen(y);
        }
        while days >= ylen(y) {
            days -= ylen(y);
            y += 1;
        }
        let ml = [
            31,
            if leap(y) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        let mut m = 0;
        while days >= ml[m] {
            days -= ml[m];
            m += 1;
        }
        (y, m as u32 + 1, days as u32 + 1)
    }

    proptest! {
        #[test]
        fn civil_matches_naive(days in -800_000i64..800_000) {
            let (y, m, d) = civil_from_unix_days(days);
            prop_assert_eq!((y, m, d), naive_civil(days));
        }

        #[test]
        fn timestamps_are_written_as_format_writes_them(micros in any::<i64>()) {
            // the formatting this replaced, with i128 arithmetic
            let reference = |micros: i64| -> String {
                match micros {
                    i64::MAX => return "infinity".into(),
                    i64::MIN => return "-infinity".into(),
                    _ => {}
                }
                let unix_ms = (i128::from(micros) + i128::from(PG_EPOCH_UNIX_MICROS)).div_euclid(1000);
                let (days, ms_of_day) = (unix_ms.div_euclid(86_400_000), unix_ms.rem_euclid(86_400_000));
                let (y, m, d) = civil_from_unix_days(days as i64);
                let (h, min) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000 / 60_000);
                let (sec, ms) = (ms_of_day % 60_000 / 1000, ms_of_day % 1000);
                let year = if (0..=9999).contains(&y) { format!("{y:04}") } else { format!("{y:+07}") };
                format!("{year}-{m:02}-{d:02}T{h:02}:{min:02}:{sec:02}.{ms:03}Z")
            };
            prop_assert_eq!(pg_timestamp_to_rfc3339_millis(micros), reference(micros));
            // and around the epoch, where the years are four digits
            let near = micros % 400_000_000_000_000_000;
            prop_assert_eq!(pg_timestamp_to_rfc3339_millis(near), reference(near));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..24), ty in prop_oneof![
            Just(16u32), Just(17), Just(20), Just(21), Just(23), Just(26), Just(700), Just(701),
            Just(1700), Just(114), Just(3802), Just(25), any::<u32>()]) {
            let d = Datum::Text(Bytes::from(bytes));
            if let Ok(v) = parse_value(&d, ty) {
                let _ = v.to_json();
                let _ = v.as_whole_number();
            }
        }

        #[test]
        fn whole_number_round_trip(i in any::<i64>(), zeros in 0usize..4) {
            let s = if zeros == 0 { i.to_string() } else { format!("{i}.{}", "0".repeat(zeros)) };
            prop_assert_eq!(Value::Numeric(&s).as_whole_number(), Ok(i));
        }

        #[test]
        fn timestamps_never_panic(t in any::<i64>()) {
            let s = pg_timestamp_to_rfc3339_millis(t);
            prop_assert!(s.ends_with('Z') || s.ends_with("infinity"));
        }
    }
}
