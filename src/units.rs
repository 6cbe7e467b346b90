//! Quantities in units of 10^-scale: how decimals are summed exactly (no floating point
//! anywhere) and written at the edges (Redis fields, payloads) as decimal numbers. With
//! scale 0 a unit is one and every text is a whole number, as before decimals existed.

/// Parse a stored decimal (`12.5`, `-3`, `0.125`) into units; extra fractional digits
/// are cut (skusync never stores more than its scale). `None` when it is not a decimal.
pub fn parse(s: &str, scale: u32) -> Option<i64> {
    if scale == 0 {
        return s.parse().ok();
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut v: i64 = 0;
    let digits = int.bytes().chain(
        frac.bytes()
            .chain(std::iter::repeat(b'0'))
            .take(scale as usize),
    );
    for d in digits {
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

/// Write units as a decimal without trailing zeros (`12.5`, `3`, `-0.25`).
pub fn format(n: i64, scale: u32) -> String {
    let mut out = String::with_capacity(24);
    write(&mut out, n, scale);
    out
}

/// Append units as a decimal to `out`.
pub fn write(out: &mut String, n: i64, scale: u32) {
    // itoa rather than `write!`: this runs for most values the apply writes
    let mut b = itoa::Buffer::new();
    if scale == 0 {
        out.push_str(b.format(n));
        return;
    }
    let unit = 10u64.pow(scale);
    let a = n.unsigned_abs();
    let (int, frac) = (a / unit, a % unit);
    if n < 0 {
        out.push('-');
    }
    out.push_str(b.format(int));
    if frac > 0 {
        let f = b.format(frac);
        out.push('.');
        // the fraction's leading zeros, then its digits without trailing ones
        for _ in f.len()..scale as usize {
            out.push('0');
        }
        out.push_str(f.trim_end_matches('0'));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decimals_round_trip_and_print_without_trailing_zeros() {
        assert_eq!(parse("12.5", 3), Some(12_500));
        assert_eq!(parse("-0.125", 3), Some(-125));
        assert_eq!(parse("7", 2), Some(700));
        assert_eq!(parse("7", 0), Some(7));
        assert_eq!(parse("1.5", 0), None, "scale 0 reads whole numbers only");
        assert_eq!(parse("x", 2), None);
        assert_eq!(parse("", 2), None);
        assert_eq!(format(12_500, 3), "12.5");
        assert_eq!(format(-125, 3), "-0.125");
        assert_eq!(format(700, 2), "7");
        assert_eq!(format(-5, 0), "-5");
        assert_eq!(format(0, 9), "0");
        // a fraction's leading zeros stay, its trailing ones go
        assert_eq!(format(1_005, 3), "1.005");
        assert_eq!(format(-50, 3), "-0.05");
        assert_eq!(format(i64::MIN, 2), "-92233720368547758.08");
    }

    proptest! {
        #[test]
        fn parse_inverts_format(n in -(1i64 << 53)..(1i64 << 53), scale in 0u32..=9) {
            prop_assert_eq!(parse(&format(n, scale), scale), Some(n));
        }
    }
}
