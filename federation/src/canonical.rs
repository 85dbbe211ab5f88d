//! Matrix canonical JSON: the one byte string that stands for a JSON value.
//!
//! Signatures and event ids are computed over these bytes, so two servers that
//! hold the same value compute the same bytes whatever whitespace, key order or
//! escapes the value arrived with. The rules are those of the Matrix
//! specification, appendix "Canonical JSON":
//!
//! - UTF-8 output with no insignificant whitespace.
//! - Object keys sorted by Unicode code point. Rust compares strings by their
//!   UTF-8 bytes, which is the same order (UTF-16 code-unit order, used by
//!   RFC 8785, is *not*: it puts U+1F600 before U+FF61).
//! - Strings escape only `"`, `\` and U+0000..=U+001F; those controls use
//!   `\b \t \n \f \r` where they exist and `\u00XX` with lowercase hex
//!   otherwise. Everything else, non-ASCII included, is written as itself.
//! - Numbers are integers in `[-(2^53)+1, (2^53)-1]`, written in decimal with
//!   no sign on zero, no fraction and no exponent.
//!
//! Numbers are judged by how `serde_json` holds them: an integer is
//! accepted if it is in range ([`CanonicalError::IntegerOutOfRange`]
//! otherwise); a number it parsed as a float, which is any number written
//! with a fraction or an exponent and also `-0`, is refused
//! ([`CanonicalError::Float`]), even when its value is whole. That is
//! stricter than the specification's last example, which turns
//! `{"a": -0, "b": 1e10}` into `{"a":0,"b":10000000000}`; the tests keep that
//! example and check the refusal. Judging floats by value cannot be done
//! reliably: `serde_json` rounds `1.00000000000000000001` to exactly `1.0`,
//! and without its `float_roundtrip` feature it even parses
//! `9007199254740991.0` as `9007199254740990.0`, so a value test would accept
//! non-integers and change integers. Hearth builds every event it signs from
//! Rust integers, so the refusal costs nothing. ruma refuses floats too, and
//! Synapse refuses them in events of room versions 6 and later.
//!
//! Duplicate keys cannot be seen here: `serde_json` keeps the last one when it
//! parses. Nesting depth is bounded by the parser (128 levels by default).

use serde_json::{Map, Number, Value};

use crate::error::CanonicalError;

/// The largest integer canonical JSON allows, `2^53 - 1`; the smallest is its negation.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Encode `value` as Matrix canonical JSON.
pub fn canonical_json(value: &Value) -> Result<String, CanonicalError> {
    let mut out = String::new();
    write_value(&mut out, value)?;
    Ok(out)
}

/// Encode a JSON object as canonical JSON, leaving out the top-level members
/// named in `skip` (`signatures`, `unsigned`) without copying the object.
pub(crate) fn canonical_object_except(
    object: &Map<String, Value>,
    skip: &[&str],
) -> Result<String, CanonicalError> {
    let mut out = String::new();
    write_object(&mut out, object, skip)?;
    Ok(out)
}

fn write_value(out: &mut String, value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => out.push_str(&integer(n)?.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item).map_err(|e| within(e, &i.to_string()))?;
            }
            out.push(']');
        }
        Value::Object(object) => write_object(out, object, &[])?,
    }
    Ok(())
}

fn write_object(
    out: &mut String,
    object: &Map<String, Value>,
    skip: &[&str],
) -> Result<(), CanonicalError> {
    let mut members: Vec<(&String, &Value)> = object
        .iter()
        .filter(|(key, _)| !skip.contains(&key.as_str()))
        .collect();
    // Byte order of UTF-8 is code point order. Keys are unique, so the
    // unstable sort is deterministic.
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_value(out, value).map_err(|e| within(e, &path_segment(key)))?;
    }
    out.push('}');
    Ok(())
}

/// The integer a JSON number stands for, if canonical JSON allows it.
fn integer(n: &Number) -> Result<i64, CanonicalError> {
    if let Some(i) = n.as_i64() {
        if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) {
            return Ok(i);
        }
        return Err(CanonicalError::IntegerOutOfRange { at: String::new() });
    }
    if n.is_u64() {
        // Above i64::MAX, so far above 2^53.
        return Err(CanonicalError::IntegerOutOfRange { at: String::new() });
    }
    Err(CanonicalError::Float { at: String::new() })
}

fn write_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{09}' => out.push_str("\\t"),
            '\u{0a}' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\u{0d}' => out.push_str("\\r"),
            '\u{00}'..='\u{1f}' => {
                let b = c as usize;
                out.push_str("\\u00");
                out.push(char::from(HEX[b >> 4]));
                out.push(char::from(HEX[b & 0xf]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A key as one segment of a dotted path, with `.` and `\` escaped the way
/// the Matrix appendix "Dot-separated property paths" does it.
fn path_segment(key: &str) -> String {
    key.replace('\\', "\\\\").replace('.', "\\.")
}

/// Prefix the error's path with the segment of the enclosing array or object.
fn within(err: CanonicalError, segment: &str) -> CanonicalError {
    let join = |at: String| {
        if at.is_empty() {
            segment.to_owned()
        } else {
            format!("{segment}.{at}")
        }
    };
    match err {
        CanonicalError::Float { at } => CanonicalError::Float { at: join(at) },
        CanonicalError::IntegerOutOfRange { at } => {
            CanonicalError::IntegerOutOfRange { at: join(at) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canon(text: &str) -> Result<String, CanonicalError> {
        canonical_json(&serde_json::from_str(text).unwrap())
    }

    /// Every example of the Matrix specification, appendix "Canonical JSON"
    /// (matrix-org/matrix-spec `content/appendices.md`), input text as published.
    #[test]
    fn matrix_spec_vectors() {
        let vectors: &[(&str, &str)] = &[
            ("{}", "{}"),
            (
                r#"{
                    "one": 1,
                    "two": "Two"
                }"#,
                r#"{"one":1,"two":"Two"}"#,
            ),
            (
                r#"{
                    "b": "2",
                    "a": "1"
                }"#,
                r#"{"a":"1","b":"2"}"#,
            ),
            (r#"{"b":"2","a":"1"}"#, r#"{"a":"1","b":"2"}"#),
            (
                r#"{
                    "auth": {
                        "success": true,
                        "mxid": "@john.doe:example.com",
                        "profile": {
                            "display_name": "John Doe",
                            "three_pids": [
                                {
                                    "medium": "email",
                                    "address": "john.doe@example.org"
                                },
                                {
                                    "medium": "msisdn",
                                    "address": "123456789"
                                }
                            ]
                        }
                    }
                }"#,
                r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#,
            ),
            (
                r#"{
                    "a": "日本語"
                }"#,
                r#"{"a":"日本語"}"#,
            ),
            (
                r#"{
                    "本": 2,
                    "日": 1
                }"#,
                r#"{"日":1,"本":2}"#,
            ),
            (
                r#"{
                    "a": "\u65E5"
                }"#,
                r#"{"a":"日"}"#,
            ),
            (
                r#"{
                    "a": null
                }"#,
                r#"{"a":null}"#,
            ),
        ];
        for (input, expected) in vectors {
            assert_eq!(canon(input).unwrap(), *expected, "input: {input}");
        }
    }

    /// The specification's last example expects `{"a":0,"b":10000000000}`
    /// from this input. Hearth refuses it instead: numbers written as floats
    /// are refused whatever their value (see the module doc).
    #[test]
    fn matrix_spec_float_vector_is_refused() {
        let input = r#"{
                    "a": -0,
                    "b": 1e10
                }"#;
        assert_eq!(canon(input), Err(CanonicalError::Float { at: "a".into() }));
        assert_eq!(
            canon(r#"{"b": 1e10}"#),
            Err(CanonicalError::Float { at: "b".into() })
        );
        // Written as integers, the same values are fine.
        assert_eq!(
            canon(r#"{"a": 0, "b": 10000000000}"#).unwrap(),
            r#"{"a":0,"b":10000000000}"#
        );
    }

    /// The escaping rules of the specification's grammar (not a published vector).
    #[test]
    fn escapes_only_quote_backslash_and_controls() {
        let value = json!({
            "s": "\u{0}\u{1}\u{8}\t\n\u{b}\u{c}\r\u{1f} \"\\/\u{7f}é😀\u{2028}"
        });
        assert_eq!(
            canonical_json(&value).unwrap(),
            "{\"s\":\"\\u0000\\u0001\\b\\t\\n\\u000b\\f\\r\\u001f \\\"\\\\/\u{7f}é😀\u{2028}\"}"
        );
        // Escapes in keys too.
        assert_eq!(
            canonical_json(&json!({"a\nb": 1})).unwrap(),
            "{\"a\\nb\":1}"
        );
    }

    /// Code point order, not UTF-16 order (U+1F600 is D83D DE00 in UTF-16,
    /// which sorts before U+FF61).
    #[test]
    fn keys_sort_by_code_point() {
        let value = json!({"😀": 3, "｡": 2, "é": 1, "b": 0, "a": 0, "B": 0, "": 0});
        assert_eq!(
            canonical_json(&value).unwrap(),
            r#"{"":0,"B":0,"a":0,"b":0,"é":1,"｡":2,"😀":3}"#
        );
    }

    #[test]
    fn arrays_keep_their_order() {
        assert_eq!(
            canonical_json(&json!([3, "b", [2, 1], {"z": 1, "y": 2}, true, false, null])).unwrap(),
            r#"[3,"b",[2,1],{"y":2,"z":1},true,false,null]"#
        );
    }

    #[test]
    fn integer_range_edges() {
        let max = MAX_SAFE_INTEGER;
        assert_eq!(canonical_json(&json!(max)).unwrap(), "9007199254740991");
        assert_eq!(canonical_json(&json!(-max)).unwrap(), "-9007199254740991");
        for bad in [
            json!(max + 1),
            json!(-max - 1),
            json!(i64::MIN),
            json!(u64::MAX),
        ] {
            assert!(
                matches!(
                    canonical_json(&bad),
                    Err(CanonicalError::IntegerOutOfRange { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn floats_are_refused_with_their_path() {
        for text in [
            "1.5",
            "0.1",
            "-2.25",
            "1e-3",
            "4503599627370495.5",
            "1.00000000000000000001",
            "2.0",
            "-0",
            "0.0",
            "1e10",
            "1E2",
            "9007199254740991.0",
            "-1e300",
        ] {
            assert!(
                matches!(canon(text), Err(CanonicalError::Float { .. })),
                "{text}"
            );
        }
        assert_eq!(
            canon(r#"{"content": {"sizes": [1, 2, 3.5]}}"#),
            Err(CanonicalError::Float {
                at: "content.sizes.2".into()
            })
        );
        assert_eq!(
            canon(r#"{"m.relates_to": {"n": 9007199254740992}}"#),
            Err(CanonicalError::IntegerOutOfRange {
                at: r"m\.relates_to.n".into()
            })
        );
    }

    /// A small deterministic generator (no proptest in the tree): the
    /// canonical form parses back to the same value, is a fixed point, and
    /// matches `serde_json`'s compact output of the key-sorted value.
    #[test]
    fn canonical_form_round_trips() {
        struct Rng(u64);
        impl Rng {
            fn next(&mut self) -> u64 {
                // xorshift64*
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
            fn below(&mut self, n: u64) -> u64 {
                self.next() % n
            }
        }
        const CHARS: &[char] = &[
            'a', 'b', 'Z', '0', ' ', '"', '\\', '/', '\u{0}', '\u{8}', '\t', '\n', '\u{b}',
            '\u{c}', '\r', '\u{1f}', '\u{7f}', 'é', '日', '｡', '😀', '\u{2028}',
        ];
        fn string(rng: &mut Rng) -> String {
            (0..rng.below(6))
                .map(|_| CHARS[rng.below(CHARS.len() as u64) as usize])
                .collect()
        }
        fn value(rng: &mut Rng, depth: u32) -> Value {
            match rng.below(if depth > 3 { 4 } else { 6 }) {
                0 => Value::Null,
                1 => Value::Bool(rng.below(2) == 1),
                2 => {
                    let n =
                        (rng.next() % (2 * MAX_SAFE_INTEGER as u64 + 1)) as i64 - MAX_SAFE_INTEGER;
                    json!(if rng.below(2) == 0 { n % 1000 } else { n })
                }
                3 => Value::String(string(rng)),
                4 => Value::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
                _ => Value::Object(
                    (0..rng.below(4))
                        .map(|_| (string(rng), value(rng, depth + 1)))
                        .collect(),
                ),
            }
        }
        fn sorted(v: &Value) -> Value {
            match v {
                Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
                Value::Object(map) => {
                    let mut entries: Vec<_> = map.iter().collect();
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                    Value::Object(
                        entries
                            .into_iter()
                            .map(|(k, v)| (k.clone(), sorted(v)))
                            .collect(),
                    )
                }
                other => other.clone(),
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let v = value(&mut rng, 0);
            let text = canonical_json(&v).unwrap();
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, v);
            assert_eq!(canonical_json(&back).unwrap(), text);
            assert_eq!(serde_json::to_string(&sorted(&v)).unwrap(), text);
        }
    }
}
