//! Row filters (`where = ["deleted_at IS NULL", "usage IN ('internal', 'transit')"]`):
//! parsed once from the config, rendered back as SQL for the snapshot's COPY query, and
//! evaluated on the text form of streamed rows. Pure.
//!
//! The grammar is deliberately small, so that the stream and the snapshot cannot
//! disagree: `column op literal`, with `IS [NOT] NULL`, `=`, `<>`, `!=`, `<`, `<=`, `>`,
//! `>=`, `[NOT] IN (...)`. Identifiers are as in SQL (bare ones fold to lower case,
//! double quotes keep case); literals are `'text'`, numbers, `true` and `false`. Ordering
//! comparisons are allowed only on numeric columns: on text they would follow the
//! database's collation, which the stream cannot reproduce. As in SQL, a NULL value
//! satisfies nothing but `IS NULL`.

use crate::pgoutput::Datum;
use crate::txn::value::oid;
use std::cmp::Ordering;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A literal of a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    Text(String),
    /// A number as written (`-3`, `2.50`).
    Number(String),
    Bool(bool),
}

/// What a condition tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    IsNull,
    IsNotNull,
    Cmp(CmpOp, Literal),
    In(Vec<Literal>),
    NotIn(Vec<Literal>),
}

/// One `where` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The column's real name.
    pub column: String,
    pub test: Test,
}

/// The ANDed conditions of one table (empty: every row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub conditions: Vec<Condition>,
}

/// How a column's values compare, by its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Number,
    Bool,
    /// Anything else: compared by the text PostgreSQL prints, equality only.
    Text,
    /// `char(n)`: text whose trailing spaces do not count, as in SQL.
    Padded,
}

impl Kind {
    /// The comparison kind of a column type.
    pub fn of(type_oid: u32) -> Kind {
        match type_oid {
            oid::INT2 | oid::INT4 | oid::INT8 | oid::NUMERIC | oid::FLOAT4 | oid::FLOAT8 => {
                Kind::Number
            }
            oid::BOOL => Kind::Bool,
            oid::BPCHAR => Kind::Padded,
            _ => Kind::Text,
        }
    }
}

impl Filter {
    /// Parse the config's list; the error names the item.
    pub fn parse(items: &[String]) -> Result<Filter, String> {
        let mut conditions = Vec::new();
        for (i, s) in items.iter().enumerate() {
            conditions.push(parse_condition(s).map_err(|e| format!("where[{i}] {s:?}: {e}"))?);
        }
        Ok(Filter { conditions })
    }

    /// The columns it reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.conditions.iter().map(|c| c.column.as_str())
    }

    /// Whether a condition cannot be evaluated on a column of this kind (ordering on a
    /// non-number, a literal of the wrong kind); the message names the column.
    pub fn check_kind(&self, column: &str, kind: Kind) -> Result<(), String> {
        for c in self.conditions.iter().filter(|c| c.column == column) {
            let lits: Vec<&Literal> = match &c.test {
                Test::IsNull | Test::IsNotNull => vec![],
                Test::Cmp(op, l) => {
                    if !matches!(op, CmpOp::Eq | CmpOp::Ne) && kind != Kind::Number {
                        return Err(format!(
                            "column {column:?} is compared with <, <=, > or >=, which skusync evaluates only \
                             on numeric columns (on text the result depends on the database's collation)"
                        ));
                    }
                    vec![l]
                }
                Test::In(v) | Test::NotIn(v) => v.iter().collect(),
            };
            for l in lits {
                let ok = matches!(
                    (kind, l),
                    (Kind::Number, Literal::Number(_))
                        | (Kind::Bool, Literal::Bool(_))
                        | (Kind::Text | Kind::Padded, Literal::Text(_))
                );
                if !ok {
                    return Err(format!(
                        "column {column:?} is {}, compared with a literal of another kind",
                        match kind {
                            Kind::Number => "numeric",
                            Kind::Bool => "boolean",
                            Kind::Text | Kind::Padded => {
                                "compared as text (write the literal in quotes)"
                            }
                        }
                    ));
                }
            }
        }
        Ok(())
    }

    /// SQL for a WHERE clause (each condition parenthesized), or `None` when empty.
    pub fn to_sql(&self) -> Option<String> {
        if self.conditions.is_empty() {
            return None;
        }
        Some(
            self.conditions
                .iter()
                .map(|c| format!("({})", c.to_sql()))
                .collect::<Vec<_>>()
                .join(" AND "),
        )
    }

    /// Whether a row passes, given each condition's column value and kind. `None` when a
    /// value is unknown (an unchanged TOAST value, not sent).
    pub fn eval<'a>(
        &self,
        mut value: impl FnMut(&str) -> Option<(&'a Datum, Kind)>,
    ) -> Option<bool> {
        for c in &self.conditions {
            let (d, kind) = value(&c.column)?;
            let v: Option<&[u8]> = match d {
                Datum::Null => None,
                Datum::Text(b) | Datum::Binary(b) => Some(b),
                Datum::UnchangedToast => return None,
            };
            if !c.test.holds(v, kind) {
                return Some(false);
            }
        }
        Some(true)
    }
}

/// A filter resolved against a relation: each condition's column position and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub filter: Filter,
    pub cols: Vec<(usize, Kind)>,
}

impl Resolved {
    /// Whether the row passes; `None` when a filter column was not sent (unchanged TOAST).
    pub fn passes(&self, t: &[Datum]) -> Option<bool> {
        let mut i = 0;
        self.filter.eval(|_| {
            let (pos, kind) = *self.cols.get(i)?;
            i += 1;
            Some((t.get(pos).unwrap_or(&Datum::Null), kind))
        })
    }
}

impl Condition {
    /// The SQL of the condition, comparing as the stream does (see [`compared_sql`]).
    fn to_sql(&self) -> String {
        let col = crate::pg::ident::quote_ident(&self.column);
        match &self.test {
            Test::IsNull => format!("{col} IS NULL"),
            Test::IsNotNull => format!("{col} IS NOT NULL"),
            Test::Cmp(op, l) => format!(
                "{} {} {}",
                compared_sql(&col, std::slice::from_ref(l)),
                match op {
                    CmpOp::Eq => "=",
                    CmpOp::Ne => "<>",
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                },
                l.to_sql()
            ),
            Test::In(v) => format!("{} IN ({})", compared_sql(&col, v), list_sql(v)),
            Test::NotIn(v) => format!("{} NOT IN ({})", compared_sql(&col, v), list_sql(v)),
        }
    }
}

/// The column as SQL compares it with these literals, so that the snapshot's COPY (and
/// `verify`) agree with the stream's evaluation of the printed text, whatever the
/// column's type: text literals compare bytes of the printed text (`::text COLLATE "C"`;
/// `citext`'s or a nondeterministic collation's `=` would ignore case), numbers compare
/// the printed decimal (`::text::numeric`; a `real` 0.1 is not `= 0.1` in SQL, whose
/// comparison widens it to double precision). `char(n)`'s `::text` drops its pad
/// spaces, as the stream does. Booleans compare natively.
fn compared_sql(col: &str, lits: &[Literal]) -> String {
    if lits.iter().all(|l| matches!(l, Literal::Text(_))) {
        format!("{col}::text COLLATE \"C\"")
    } else if lits.iter().all(|l| matches!(l, Literal::Number(_))) {
        format!("{col}::text::numeric")
    } else {
        col.to_string()
    }
}

fn list_sql(v: &[Literal]) -> String {
    v.iter().map(Literal::to_sql).collect::<Vec<_>>().join(", ")
}

impl Literal {
    fn to_sql(&self) -> String {
        match self {
            Literal::Text(s) => crate::pg::conn::quote_literal(s),
            Literal::Number(n) => n.clone(),
            Literal::Bool(b) => b.to_string(),
        }
    }

    /// Whether a value equals it (`None` when they cannot be compared).
    fn cmp_value(&self, v: &[u8], kind: Kind) -> Option<Ordering> {
        let v = std::str::from_utf8(v).ok()?;
        match (self, kind) {
            (Literal::Number(n), Kind::Number) => cmp_numbers(v, n),
            (Literal::Bool(b), Kind::Bool) => {
                let x = match v {
                    "t" | "true" => true,
                    "f" | "false" => false,
                    _ => return None,
                };
                Some(x.cmp(b))
            }
            (Literal::Text(s), Kind::Text) => Some(v.as_bytes().cmp(s.as_bytes())),
            (Literal::Text(s), Kind::Padded) => {
                Some(v.trim_end_matches(' ').cmp(s.trim_end_matches(' ')))
            }
            _ => None,
        }
    }
}

impl Test {
    fn holds(&self, v: Option<&[u8]>, kind: Kind) -> bool {
        let Some(v) = v else {
            return matches!(self, Test::IsNull);
        };
        match self {
            Test::IsNull => false,
            Test::IsNotNull => true,
            Test::Cmp(op, l) => match l.cmp_value(v, kind) {
                None => false,
                Some(o) => match op {
                    CmpOp::Eq => o.is_eq(),
                    CmpOp::Ne => o.is_ne(),
                    CmpOp::Lt => o.is_lt(),
                    CmpOp::Le => o.is_le(),
                    CmpOp::Gt => o.is_gt(),
                    CmpOp::Ge => o.is_ge(),
                },
            },
            Test::In(ls) => ls
                .iter()
                .any(|l| l.cmp_value(v, kind) == Some(Ordering::Equal)),
            // SQL: NOT IN is true only if every comparison is definitely false.
            Test::NotIn(ls) => ls
                .iter()
                .all(|l| l.cmp_value(v, kind).is_some_and(Ordering::is_ne)),
        }
    }
}

/// Compare two decimal numbers exactly (`-0012.50` vs `12.5`); NaN as PostgreSQL's
/// numeric orders it; other forms (exponents, Infinity) by their f64 value.
pub fn cmp_numbers(a: &str, b: &str) -> Option<Ordering> {
    // as PostgreSQL's numeric (the snapshot compares `::text::numeric`): NaN equals NaN
    // and is above every other number
    let nan = |s: &str| s.trim().eq_ignore_ascii_case("nan");
    match (nan(a), nan(b)) {
        (true, true) => return Some(Ordering::Equal),
        (true, false) => return Some(Ordering::Greater),
        (false, true) => return Some(Ordering::Less),
        (false, false) => {}
    }
    match (Decimal::parse(a), Decimal::parse(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => {
            let x: f64 = a.trim().parse().ok()?;
            let y: f64 = b.trim().parse().ok()?;
            x.partial_cmp(&y)
        }
    }
}

/// A plain decimal, normalized: sign, integer digits without leading zeros, fraction
/// digits without trailing zeros.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    neg: bool,
    int: String,
    frac: String,
}

impl Decimal {
    fn parse(s: &str) -> Option<Decimal> {
        let s = s.trim();
        let (neg, s) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        // an exponent (`1e+16`, as floats print): the point moves, exactly
        let (s, exp) = match s.split_once(['e', 'E']) {
            Some((m, e)) => {
                let e: i32 = e.parse().ok()?;
                // float8 stays within about ±330; farther is no value skusync compares
                if e.unsigned_abs() > 1000 {
                    return None;
                }
                (m, e)
            }
            None => (s, 0),
        };
        let (i, f) = s.split_once('.').unwrap_or((s, ""));
        if (i.is_empty() && f.is_empty())
            || !i.bytes().all(|b| b.is_ascii_digit())
            || !f.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let (i, f) = shift_point(i, f, exp);
        let int = i.trim_start_matches('0').to_string();
        let frac = f.trim_end_matches('0').to_string();
        let zero = int.is_empty() && frac.is_empty();
        Some(Decimal {
            neg: neg && !zero,
            int,
            frac,
        })
    }

    fn cmp_abs(&self, o: &Decimal) -> Ordering {
        self.int
            .len()
            .cmp(&o.int.len())
            .then_with(|| self.int.cmp(&o.int))
            .then_with(|| self.frac.cmp(&o.frac))
    }
}

/// The digits `i.f` times 10^`exp`, as integer and fraction digits.
fn shift_point(i: &str, f: &str, exp: i32) -> (String, String) {
    let digits = format!("{i}{f}");
    let point = i.len() as i64 + i64::from(exp);
    if point <= 0 {
        let zeros = "0".repeat(point.unsigned_abs() as usize);
        (String::new(), format!("{zeros}{digits}"))
    } else if point as usize >= digits.len() {
        let zeros = "0".repeat(point as usize - digits.len());
        (format!("{digits}{zeros}"), String::new())
    } else {
        let (a, b) = digits.split_at(point as usize);
        (a.to_string(), b.to_string())
    }
}

impl Ord for Decimal {
    fn cmp(&self, o: &Decimal) -> Ordering {
        match (self.neg, o.neg) {
            (false, true) => Ordering::Greater,
            (true, false) => Ordering::Less,
            (false, false) => self.cmp_abs(o),
            (true, true) => o.cmp_abs(self),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, o: &Decimal) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

// --- the parser ---

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A bare word (identifier or keyword), as written.
    Word(String),
    /// A double-quoted identifier.
    Quoted(String),
    Str(String),
    Num(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push(Tok::LParen);
                i += 1
            }
            b')' => {
                out.push(Tok::RParen);
                i += 1
            }
            b',' => {
                out.push(Tok::Comma);
                i += 1
            }
            b'\'' | b'"' => {
                // '' (or "") inside is one quote
                let mut v = Vec::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err("unterminated quote".into()),
                        Some(&q) if q == c => {
                            if b.get(i + 1) == Some(&c) {
                                v.push(c);
                                i += 2;
                            } else {
                                i += 1;
                                break;
                            }
                        }
                        Some(&x) => {
                            v.push(x);
                            i += 1
                        }
                    }
                }
                let v = String::from_utf8(v).map_err(|_| "not UTF-8")?;
                if c == b'"' {
                    if v.is_empty() {
                        return Err("empty quoted identifier".into());
                    }
                    out.push(Tok::Quoted(v));
                } else {
                    out.push(Tok::Str(v));
                }
            }
            b'<' | b'>' | b'=' | b'!' => {
                let two = s.get(i..i + 2).unwrap_or("");
                let op: &'static str = match two {
                    "<=" => "<=",
                    ">=" => ">=",
                    "<>" => "<>",
                    "!=" => "!=",
                    _ => match c {
                        b'<' => "<",
                        b'>' => ">",
                        b'=' => "=",
                        _ => return Err("unexpected '!'".into()),
                    },
                };
                i += op.len();
                out.push(Tok::Op(op));
            }
            b'-' | b'+' | b'.' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                    i += 1;
                }
                let n = &s[start..i];
                if Decimal::parse(n).is_none() {
                    return Err(format!("bad number {n:?}"));
                }
                out.push(Tok::Num(n.to_string()));
            }
            c if c == b'_' || c.is_ascii_alphabetic() || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i] == b'_'
                        || b[i] == b'$'
                        || b[i].is_ascii_alphanumeric()
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                out.push(Tok::Word(s[start..i].to_string()));
            }
            _ => return Err(format!("unexpected character {:?}", c as char)),
        }
    }
    Ok(out)
}

fn parse_condition(s: &str) -> Result<Condition, String> {
    let toks = lex(s)?;
    let mut it = toks.into_iter().peekable();
    let column = match it.next() {
        // SQL folds unquoted identifiers to lower case.
        Some(Tok::Word(w)) if !is_keyword(&w) => w.to_lowercase(),
        Some(Tok::Quoted(q)) => q,
        _ => return Err("must start with a column name".into()),
    };
    let word =
        |t: &Option<Tok>, kw: &str| matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw));
    let next = it.next();
    let test = if word(&next, "is") {
        let n = it.next();
        if word(&n, "null") {
            Test::IsNull
        } else if word(&n, "not") && word(&it.next(), "null") {
            Test::IsNotNull
        } else {
            return Err("IS must be followed by NULL or NOT NULL".into());
        }
    } else if word(&next, "in") {
        Test::In(parse_list(&mut it)?)
    } else if word(&next, "not") {
        if !word(&it.next(), "in") {
            return Err("NOT must be followed by IN".into());
        }
        Test::NotIn(parse_list(&mut it)?)
    } else if let Some(Tok::Op(op)) = next {
        let op = match op {
            "=" => CmpOp::Eq,
            "<>" | "!=" => CmpOp::Ne,
            "<" => CmpOp::Lt,
            "<=" => CmpOp::Le,
            ">" => CmpOp::Gt,
            _ => CmpOp::Ge,
        };
        Test::Cmp(op, parse_literal(it.next())?)
    } else {
        return Err(
            "expected IS [NOT] NULL, [NOT] IN (...) or a comparison (=, <>, !=, <, <=, >, >=)"
                .into(),
        );
    };
    if let Some(t) = it.next() {
        return Err(format!(
            "unexpected {t:?} after the condition (one condition per item; items are ANDed)"
        ));
    }
    Ok(Condition { column, test })
}

fn is_keyword(w: &str) -> bool {
    ["is", "not", "null", "in", "true", "false", "and", "or"]
        .iter()
        .any(|k| w.eq_ignore_ascii_case(k))
}

fn parse_literal(t: Option<Tok>) -> Result<Literal, String> {
    match t {
        Some(Tok::Str(s)) => Ok(Literal::Text(s)),
        Some(Tok::Num(n)) => Ok(Literal::Number(n)),
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => Ok(Literal::Bool(true)),
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => Ok(Literal::Bool(false)),
        Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => {
            Err("a comparison with NULL is never true; write IS NULL or IS NOT NULL".into())
        }
        _ => Err("expected a literal: 'text', a number, true or false".into()),
    }
}

fn parse_list(
    it: &mut std::iter::Peekable<std::vec::IntoIter<Tok>>,
) -> Result<Vec<Literal>, String> {
    if it.next() != Some(Tok::LParen) {
        return Err("IN must be followed by a parenthesized list".into());
    }
    let mut v = Vec::new();
    loop {
        v.push(parse_literal(it.next())?);
        match it.next() {
            Some(Tok::Comma) => continue,
            Some(Tok::RParen) => break,
            _ => return Err("expected , or ) in the IN list".into()),
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn f(items: &[&str]) -> Filter {
        Filter::parse(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn eval(filter: &Filter, row: &[(&str, Option<&str>, Kind)]) -> Option<bool> {
        let data: Vec<(String, Datum, Kind)> = row
            .iter()
            .map(|(c, v, k)| {
                (
                    c.to_string(),
                    v.map_or(Datum::Null, |v| {
                        Datum::Text(Bytes::copy_from_slice(v.as_bytes()))
                    }),
                    *k,
                )
            })
            .collect();
        filter.eval(|c| {
            data.iter()
                .find(|(n, _, _)| n == c)
                .map(|(_, d, k)| (d, *k))
        })
    }

    #[test]
    fn the_issue_forms_parse_and_render_as_sql() {
        let x = f(&[
            "deleted_at IS NULL",
            "tracked = true",
            "usage IN ('internal', 'transit')",
            "\"deletedAt\" IS NOT NULL",
            "qty >= -2.5",
            "kind NOT IN ('it''s')",
            "Status != 'x'",
        ]);
        assert_eq!(
            x.to_sql().unwrap(),
            "(deleted_at IS NULL) AND (tracked = true) AND \
             (usage::text COLLATE \"C\" IN ('internal', 'transit')) AND (\"deletedAt\" IS NOT NULL) AND \
             (qty::text::numeric >= -2.5) AND (kind::text COLLATE \"C\" NOT IN ('it''s')) AND \
             (status::text COLLATE \"C\" <> 'x')"
        );
        assert_eq!(x.columns().collect::<Vec<_>>()[3], "deletedAt");
    }

    #[test]
    fn bad_items_are_refused_with_the_item() {
        for bad in [
            "",
            "deleted_at",
            "deleted_at IS",
            "a = ",
            "a = b",
            "a = 1 AND b = 2",
            "a IN 1, 2",
            "a IN ('x'",
            "a = 'open",
            "a == 1",
            "a = NULL",
            "1 = a",
            "a; DROP TABLE x",
            "a = 1.2.3",
        ] {
            let e = Filter::parse(&[bad.to_string()]).unwrap_err();
            assert!(e.starts_with("where[0]"), "{bad}: {e}");
        }
    }

    #[test]
    fn evaluation_follows_sql_including_null() {
        let x = f(&["deleted_at IS NULL", "usage IN ('internal', 'transit')"]);
        let row = |d: Option<&str>, u: Option<&str>| {
            eval(
                &x,
                &[("deleted_at", d, Kind::Text), ("usage", u, Kind::Text)],
            )
        };
        assert_eq!(row(None, Some("internal")), Some(true));
        assert_eq!(
            row(Some("2024-01-01 00:00:00+00"), Some("internal")),
            Some(false)
        );
        assert_eq!(row(None, Some("view")), Some(false));
        assert_eq!(row(None, None), Some(false), "NULL IN (...) is not true");
        let n = f(&["usage NOT IN ('view')"]);
        assert_eq!(
            eval(&n, &[("usage", None, Kind::Text)]),
            Some(false),
            "NULL NOT IN is not true"
        );
        assert_eq!(eval(&n, &[("usage", Some("x"), Kind::Text)]), Some(true));
        let b = f(&["tracked = true"]);
        assert_eq!(eval(&b, &[("tracked", Some("t"), Kind::Bool)]), Some(true));
        assert_eq!(eval(&b, &[("tracked", Some("f"), Kind::Bool)]), Some(false));
        let q = f(&["qty > 2", "qty <= 10.50", "qty <> 5"]);
        let qv = |v: &str| eval(&q, &[("qty", Some(v), Kind::Number)]);
        assert_eq!(qv("2.000"), Some(false));
        assert_eq!(qv("2.001"), Some(true));
        assert_eq!(qv("10.5"), Some(true));
        assert_eq!(qv("10.51"), Some(false));
        assert_eq!(qv("5.0"), Some(false));
        assert_eq!(qv("NaN"), Some(false));
        // NaN as numeric orders it (the snapshot compares `::text::numeric`), infinities
        // as PostgreSQL prints them
        let g = f(&["qty > 2"]);
        let gv = |v: &str| eval(&g, &[("qty", Some(v), Kind::Number)]);
        assert_eq!(gv("NaN"), Some(true));
        assert_eq!(gv("Infinity"), Some(true));
        assert_eq!(gv("-Infinity"), Some(false));
        assert_eq!(gv("1e+20"), Some(true));
        assert_eq!(cmp_numbers("NaN", "nan"), Some(Ordering::Equal));
        // an unchanged TOAST value is unknown
        let t = Datum::UnchangedToast;
        assert_eq!(x.eval(|_| Some((&t, Kind::Text))), None);
    }

    #[test]
    fn kinds_are_checked_against_column_types() {
        let x = f(&["name < 'm'"]);
        assert!(
            x.check_kind("name", Kind::Text)
                .unwrap_err()
                .contains("collation")
        );
        assert!(
            x.check_kind("name", Kind::Number).is_err(),
            "a text literal for a number"
        );
        assert!(f(&["qty < 3"]).check_kind("qty", Kind::Number).is_ok());
        assert!(
            f(&["tracked = 1"])
                .check_kind("tracked", Kind::Bool)
                .is_err()
        );
        assert!(f(&["id = '7'"]).check_kind("id", Kind::Number).is_err());
    }

    proptest! {
        #[test]
        fn decimal_comparison_matches_exact_rationals(a in -100_000i64..100_000, b in -100_000i64..100_000, sa in 0u32..4, sb in 0u32..4) {
            // a / 10^sa vs b / 10^sb, written with sa and sb fraction digits and padding
            let show = |v: i64, s: u32| {
                let p = 10i64.pow(s);
                let sign = if v < 0 { "-" } else { "" };
                let v = v.unsigned_abs() as i64;
                if s == 0 { format!("{sign}00{v}") } else { format!("{sign}{}.{:0w$}0", v / p, v % p, w = s as usize) }
            };
            let want = (i128::from(a) * 10i128.pow(sb)).cmp(&(i128::from(b) * 10i128.pow(sa)));
            prop_assert_eq!(cmp_numbers(&show(a, sa), &show(b, sb)), Some(want));
        }

        #[test]
        fn exponent_forms_compare_exactly(a in -100_000i64..100_000, ea in -10i32..10, b in -100_000i64..100_000, sb in 0u32..4) {
            // a * 10^ea, as a float prints it (`1.2345e+16`), vs b / 10^sb
            let d = a.unsigned_abs().to_string();
            let (h, t) = d.split_at(1);
            let shown = format!(
                "{}{h}.{t}e{:+}",
                if a < 0 { "-" } else { "" },
                ea + t.len() as i32
            );
            let p = 10i64.pow(sb);
            let bv = b.unsigned_abs() as i64;
            let other = format!(
                "{}{}.{:0w$}",
                if b < 0 { "-" } else { "" },
                bv / p,
                bv % p,
                w = sb as usize
            );
            // both times 10^(sb + 20): integers
            let lhs = i128::from(a) * 10i128.pow((ea + sb as i32 + 20) as u32);
            let rhs = i128::from(b) * 10i128.pow(20);
            prop_assert_eq!(cmp_numbers(&shown, &other), Some(lhs.cmp(&rhs)));
        }
    }

    #[test]
    fn float_exponents_compare_exactly_with_long_literals() {
        assert_eq!(
            cmp_numbers("1e+16", "10000000000000001"),
            Some(Ordering::Less)
        );
        assert_eq!(cmp_numbers("1.5e-3", "0.0015"), Some(Ordering::Equal));
        assert_eq!(cmp_numbers("-2E+2", "-200.0"), Some(Ordering::Equal));
        assert_eq!(cmp_numbers("1e+400", "1"), Some(Ordering::Greater));
    }
}
