//! SKU <-> topic level encoding (see the module doc of [`super`] for the rule).

/// The topic level of the empty SKU. A lone `%` never results from encoding a non-empty
/// SKU, because every `%` an encoding produces is followed by two hex digits.
pub const EMPTY_SKU_LEVEL: &str = "%";

/// Whether a byte stays as is: printable ASCII except the escape and MQTT's special
/// characters. Everything else (controls, NUL, space, DEL, every non-ASCII UTF-8 byte) is
/// escaped so topics stay visible, wildcard-free and one level deep.
fn keep(b: u8) -> bool {
    matches!(b, 0x21..=0x7E) && !matches!(b, b'%' | b'/' | b'+' | b'#')
}

/// Encodes a SKU into one topic level.
pub fn encode_sku(sku: &str) -> String {
    if sku.is_empty() {
        return EMPTY_SKU_LEVEL.to_string();
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(sku.len());
    for &b in sku.as_bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

/// Decodes a topic level produced by [`encode_sku`]; `None` for anything
/// [`encode_sku`] cannot produce (so decoding is the exact inverse).
pub fn decode_sku(level: &str) -> Option<String> {
    if level == EMPTY_SKU_LEVEL {
        return Some(String::new());
    }
    if level.is_empty() {
        return None;
    }
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let bytes = level.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            let v = (hi << 4) | lo;
            // canonical form only: a kept byte written as %XX is not ours
            if keep(v) {
                return None;
            }
            out.push(v);
            i += 3;
        } else if keep(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn odd_skus() {
        assert_eq!(encode_sku("ABC-1"), "ABC-1");
        assert_eq!(encode_sku("a/b"), "a%2Fb");
        assert_eq!(encode_sku("a+b#c%d:e"), "a%2Bb%23c%25d:e");
        assert_eq!(encode_sku("a b"), "a%20b");
        assert_eq!(encode_sku("\0"), "%00");
        assert_eq!(encode_sku("é"), "%C3%A9");
        assert_eq!(encode_sku(""), "%");
        assert_eq!(encode_sku("%"), "%25");
        assert_eq!(decode_sku("%"), Some(String::new()));
        assert_eq!(decode_sku("a%2Fb").as_deref(), Some("a/b"));
        for bad in ["", "%2", "%zz", "a/b", "a b", "%41", "%2f", "%C3", "+", "#"] {
            assert_eq!(decode_sku(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(s in any::<String>()) {
            let e = encode_sku(&s);
            prop_assert!(!e.is_empty());
            prop_assert!(!e.contains(['/', '+', '#', '\0']));
            prop_assert!(e.bytes().all(|b| (0x21..=0x7E).contains(&b)));
            prop_assert_eq!(decode_sku(&e), Some(s));
        }

        #[test]
        fn injective(a in any::<String>(), b in any::<String>()) {
            if a != b {
                prop_assert_ne!(encode_sku(&a), encode_sku(&b));
            }
        }

        #[test]
        fn injective_on_near_collisions(a in "[%/+# a0\u{0}é]{0,6}", b in "[%/+# a0\u{0}é]{0,6}") {
            if a != b {
                prop_assert_ne!(encode_sku(&a), encode_sku(&b));
            }
        }

        #[test]
        fn decode_then_encode_is_identity(level in "[%0-9A-Fa-z/ ]{0,12}") {
            if let Some(s) = decode_sku(&level) {
                prop_assert_eq!(encode_sku(&s), level);
            }
        }
    }
}
