//! `[[mask]]` rules on JSON answers of `http`, `https` and `kubernetes` targets, streaming.
//!
//! The body is tokenised as it passes ([`JsonMask::feed`]): structure and unmasked values are
//! copied as they arrive; only the value in progress is held (a string up to [`MAX_VALUE`]).
//! So a 100 MB list is never held whole, and a watch stream (one JSON value after another)
//! is masked as it flows. A value is masked when its *path* matches a mask rule's `columns`:
//! the object keys and array indexes from the top, joined by `.` (`items.3.spec.email`), seen
//! as the SQL masks see `table.column` (a glob without `.` matches the last key anywhere, so
//! `ssn` masks every `ssn`; `items.*.spec.email` masks that field of every item). A masked
//! object or array is replaced whole. Every other string value, number and object key goes
//! through the target's value detectors. Keys and strings are decoded first (`\u0073`, `\/`,
//! surrogate pairs), so a key or value spelled with escapes is seen as any JSON reader sees it;
//! a string no reader agrees on (a lone surrogate) is not JSON. Anything that is not JSON ends
//! the stream with an error; nothing unmasked of a value that could not be read is ever sent.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame};

use super::AnyBody;
use crate::mask::{Masked, Masker};

/// Longest string value (or number) held for masking; longer ends the stream.
pub const MAX_VALUE: usize = 4 << 20;

/// Deepest nesting followed; deeper ends the stream.
const MAX_DEPTH: usize = 512;

#[derive(Debug)]
enum Frame_ {
    /// An object: the key of the member in progress, whether a key is expected next, and
    /// whether its colon was read (a value may come).
    Object {
        key: Option<String>,
        want_key: bool,
        colon: bool,
    },
    /// An array: the index of the element in progress, and whether a value may come.
    Array { index: usize, open: bool },
}

enum Token {
    None,
    /// A string (raw bytes, quotes included); `key` when it is an object key.
    Str {
        raw: Vec<u8>,
        escaped: bool,
        key: bool,
    },
    /// A number or literal.
    Scalar(Vec<u8>),
    /// Skipping a masked object or array: its depth, and string state inside it.
    Skip {
        depth: usize,
        in_str: bool,
        escaped: bool,
    },
}

/// The streaming masker of one body.
pub struct JsonMask {
    masker: Masker,
    stack: Vec<Frame_>,
    token: Token,
    /// How many values were masked (column rules and detectors).
    pub masked: u64,
}

/// Why a body could not be masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotJson(pub &'static str);

impl JsonMask {
    pub fn new(masker: Masker) -> JsonMask {
        JsonMask {
            masker,
            stack: Vec::new(),
            token: Token::None,
            masked: 0,
        }
    }

    /// The path of the value starting now: (parent path, last component).
    fn path(&self) -> Option<(String, String)> {
        let mut parts: Vec<String> = Vec::with_capacity(self.stack.len());
        for f in &self.stack {
            match f {
                Frame_::Object { key, .. } => parts.push(key.clone().unwrap_or_default()),
                Frame_::Array { index, .. } => parts.push(index.to_string()),
            }
        }
        let last = parts.pop()?;
        Some((parts.join("."), last))
    }

    /// The column style for the value starting now, if a rule masks it.
    fn masked_here(&self) -> bool {
        if !self.masker.has_column_rules() {
            return false;
        }
        match self.path() {
            Some((parent, last)) => self.masker.column_masked(Some(&parent), &last),
            None => false,
        }
    }

    fn emit_masked(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        self.masked += 1;
        write_masked(self.masker.mask_text(raw, true), out);
    }

    fn finish_string(&mut self, raw: Vec<u8>, key: bool, out: &mut Vec<u8>) -> Result<(), NotJson> {
        let text: String =
            serde_json::from_slice(&raw).map_err(|_| NotJson("a string is not valid JSON"))?;
        if key {
            // A key can hold what a detector catches too (a map keyed by email); a masked key
            // is a string even in the `null` style, as a key must be.
            match self.masker.mask_text(text.as_bytes(), false) {
                Some(m) => {
                    self.masked += 1;
                    match m {
                        Masked::Null(_) => {
                            write_masked(Some(Masked::Value(b"********".to_vec(), Vec::new())), out)
                        }
                        v => write_masked(Some(v), out),
                    }
                }
                None => out.extend_from_slice(&raw),
            }
            if let Some(Frame_::Object {
                key,
                want_key,
                colon,
            }) = self.stack.last_mut()
            {
                *want_key = false;
                *colon = false;
                // Paths see the key as sent: a detector's mask of it must not change which
                // column rules select its value.
                *key = Some(text);
            }
            return Ok(());
        }
        if self.masked_here() {
            self.emit_masked(text.as_bytes(), out);
        } else {
            match self.masker.mask_text(text.as_bytes(), false) {
                Some(m) => {
                    self.masked += 1;
                    write_masked(Some(m), out);
                }
                None => out.extend_from_slice(&raw),
            }
        }
        Ok(())
    }

    fn finish_scalar(&mut self, raw: Vec<u8>, out: &mut Vec<u8>) -> Result<(), NotJson> {
        serde_json::from_slice::<serde_json::Value>(&raw)
            .map_err(|_| NotJson("a number or literal is not valid JSON"))?;
        if self.masked_here() {
            self.emit_masked(&raw, out);
            return Ok(());
        }
        // A number goes through the detectors too (a card number sent as a JSON number); a
        // masked one becomes a string (or null).
        let number = !matches!(raw.first(), Some(b't' | b'f' | b'n'));
        match number.then(|| self.masker.mask_text(&raw, false)).flatten() {
            Some(m) => {
                self.masked += 1;
                write_masked(Some(m), out);
            }
            None => out.extend_from_slice(&raw),
        }
        Ok(())
    }

    /// Mask the next bytes of the body; what may be sent so far is appended to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), NotJson> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match &mut self.token {
                Token::Str { raw, escaped, key } => {
                    raw.push(b);
                    if raw.len() > MAX_VALUE {
                        return Err(NotJson("a string value is too long to mask"));
                    }
                    if *escaped {
                        *escaped = false;
                    } else if b == b'\\' {
                        *escaped = true;
                    } else if b == b'"' {
                        let (raw, key) = (std::mem::take(raw), *key);
                        self.token = Token::None;
                        self.finish_string(raw, key, out)?;
                    }
                    i += 1;
                    continue;
                }
                Token::Scalar(raw) => {
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.') {
                        raw.push(b);
                        if raw.len() > 512 {
                            return Err(NotJson("a number is too long"));
                        }
                        i += 1;
                        continue;
                    }
                    let raw = std::mem::take(raw);
                    self.token = Token::None;
                    self.finish_scalar(raw, out)?;
                    // `b` is structure: handled below.
                }
                Token::Skip {
                    depth,
                    in_str,
                    escaped,
                } => {
                    if *in_str {
                        if *escaped {
                            *escaped = false;
                        } else if b == b'\\' {
                            *escaped = true;
                        } else if b == b'"' {
                            *in_str = false;
                        }
                    } else {
                        match b {
                            b'"' => *in_str = true,
                            b'{' | b'[' => *depth += 1,
                            b'}' | b']' => {
                                *depth -= 1;
                                if *depth == 0 {
                                    self.token = Token::None;
                                    self.emit_masked(b"", out);
                                }
                            }
                            _ => {}
                        }
                    }
                    i += 1;
                    continue;
                }
                Token::None => {}
            }
            // Structure.
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => out.push(b),
                b'{' | b'[' => {
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(NotJson("nesting too deep to mask"));
                    }
                    self.start_value()?;
                    if self.masked_here() {
                        self.token = Token::Skip {
                            depth: 1,
                            in_str: false,
                            escaped: false,
                        };
                    } else {
                        out.push(b);
                        self.stack.push(if b == b'{' {
                            Frame_::Object {
                                key: None,
                                want_key: true,
                                colon: false,
                            }
                        } else {
                            Frame_::Array {
                                index: 0,
                                open: true,
                            }
                        });
                    }
                }
                b'}' | b']' => {
                    match (self.stack.pop(), b) {
                        (Some(Frame_::Object { .. }), b'}')
                        | (Some(Frame_::Array { .. }), b']') => {}
                        _ => return Err(NotJson("unbalanced brackets")),
                    }
                    out.push(b);
                }
                b':' => {
                    match self.stack.last_mut() {
                        Some(Frame_::Object {
                            key: Some(_),
                            want_key: false,
                            colon,
                        }) if !*colon => *colon = true,
                        _ => return Err(NotJson("a colon out of place")),
                    }
                    out.push(b);
                }
                b',' => {
                    match self.stack.last_mut() {
                        Some(Frame_::Object { want_key, key, .. }) => {
                            *want_key = true;
                            *key = None;
                        }
                        Some(Frame_::Array { index, open }) => {
                            *index += 1;
                            *open = true;
                        }
                        None => return Err(NotJson("a comma outside any object or array")),
                    }
                    out.push(b);
                }
                b'"' => {
                    let key = matches!(
                        self.stack.last(),
                        Some(Frame_::Object { want_key: true, .. })
                    );
                    if !key {
                        self.start_value()?;
                    }
                    self.token = Token::Str {
                        raw: vec![b'"'],
                        escaped: false,
                        key,
                    };
                }
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                    self.start_value()?;
                    self.token = Token::Scalar(vec![b]);
                }
                _ => return Err(NotJson("not JSON")),
            }
            i += 1;
        }
        Ok(())
    }

    /// A value starts here: it must be where a value may be.
    fn start_value(&mut self) -> Result<(), NotJson> {
        match self.stack.last_mut() {
            Some(Frame_::Object { colon, .. }) if *colon => {
                *colon = false;
                Ok(())
            }
            Some(Frame_::Object { .. }) => Err(NotJson("a value where a key belongs")),
            Some(Frame_::Array { open, .. }) if *open => {
                *open = false;
                Ok(())
            }
            Some(Frame_::Array { .. }) => Err(NotJson("two values without a comma")),
            None => Ok(()),
        }
    }

    /// The body ended: anything held is flushed (a number at the very end), or it was cut.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), NotJson> {
        match std::mem::replace(&mut self.token, Token::None) {
            Token::None => {}
            Token::Scalar(raw) => self.finish_scalar(raw, out)?,
            _ => return Err(NotJson("the body ended inside a value")),
        }
        if !self.stack.is_empty() {
            return Err(NotJson("the body ended inside an object or array"));
        }
        Ok(())
    }
}

fn write_masked(m: Option<Masked>, out: &mut Vec<u8>) {
    match m {
        Some(Masked::Value(v, _)) => {
            let s = String::from_utf8_lossy(&v);
            out.extend_from_slice(
                serde_json::to_string(&*s)
                    .unwrap_or_else(|_| "\"\"".into())
                    .as_bytes(),
            );
        }
        Some(Masked::Null(_)) | None => out.extend_from_slice(b"null"),
    }
}

/// A response body masked by [`JsonMask`] as it streams. A body that turns out not to be JSON
/// is cut where it stops being readable (what was sent before is masked).
pub struct JsonMaskBody {
    inner: AnyBody,
    mask: JsonMask,
    ended: bool,
    counted: Box<dyn Fn(u64) + Send>,
}

impl JsonMaskBody {
    pub fn new(inner: AnyBody, masker: Masker, counted: Box<dyn Fn(u64) + Send>) -> JsonMaskBody {
        JsonMaskBody {
            inner,
            mask: JsonMask::new(masker),
            ended: false,
            counted,
        }
    }
}

impl Body for JsonMaskBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            let mut out = Vec::new();
            let before = self.mask.masked;
            let r = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => self.mask.feed(&d, &mut out),
                    // Trailers: dropped (they could carry what the body did not).
                    Err(_) => Ok(()),
                },
                Poll::Ready(None) => {
                    self.ended = true;
                    self.mask.finish(&mut out)
                }
            };
            let n = self.mask.masked - before;
            if n > 0 {
                (self.counted)(n);
            }
            if let Err(e) = r {
                tracing::warn!(
                    reason = e.0,
                    "a JSON answer could not be masked; the body is cut"
                );
                self.ended = true;
                // What was read of the broken value is never sent; bytes before it were
                // masked already. Ending early makes the client see a truncated body.
                return Poll::Ready(None);
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(columns: &[&str], detectors: &[&str]) -> Masker {
        let text = format!(
            "[[target]]\nname = \"api\"\nprotocol = \"https\"\naddress = [\"10.0.0.1:443\"]\n[[mask]]\ntargets = [\"api\"]\ncolumns = {columns:?}\ndetectors = {detectors:?}\n"
        );
        let p = tollgate_policy::parse(&text, "t.toml").expect("policy");
        Masker::for_target(&p, "api", [3; 32]).expect("a masker")
    }

    fn run(m: &Masker, doc: &[u8], piece: usize) -> Result<String, NotJson> {
        let mut j = JsonMask::new(m.clone());
        let mut out = Vec::new();
        for c in doc.chunks(piece) {
            j.feed(c, &mut out)?;
        }
        j.finish(&mut out)?;
        Ok(String::from_utf8(out).expect("utf8"))
    }

    #[test]
    fn fields_by_path_and_detector_hits_are_masked_in_any_split() {
        let m = masker(&["ssn", "items.*.spec.email", "secret"], &["credit_card"]);
        let doc = br#"{"ssn":"123-45-6789","n":1,"items":[{"spec":{"email":"a@x.io","name":"a"}},{"spec":{"email":"b@x.io"},"email":"keep@x.io"}],"note":"card 4111 1111 1111 1111 ok","secret":{"deep":[1,"x\"}"]},"z":[true,null,-1.5e3]}"#;
        let whole = run(&m, doc, doc.len()).expect("json");
        for piece in [1, 2, 3, 7, 64] {
            assert_eq!(run(&m, doc, piece).expect("json"), whole, "piece {piece}");
        }
        let v: serde_json::Value = serde_json::from_str(&whole).expect("valid JSON out");
        assert_ne!(v["ssn"], "123-45-6789", "{whole}");
        assert_eq!(v["n"], 1);
        assert_ne!(v["items"][0]["spec"]["email"], "a@x.io", "{whole}");
        assert_ne!(v["items"][1]["spec"]["email"], "b@x.io", "{whole}");
        assert_eq!(v["items"][0]["spec"]["name"], "a");
        assert_eq!(v["items"][1]["email"], "keep@x.io", "only the path's email");
        assert!(!whole.contains("4111"), "{whole}");
        assert!(
            v["secret"].is_string(),
            "a masked object is replaced whole: {whole}"
        );
        assert_eq!(v["z"], serde_json::json!([true, null, -1500.0]));
    }

    #[test]
    fn watch_streams_and_broken_bodies() {
        let m = masker(&["object.spec.password"], &[]);
        let stream = b"{\"type\":\"ADDED\",\"object\":{\"spec\":{\"password\":\"p1\"}}}\n{\"type\":\"MODIFIED\",\"object\":{\"spec\":{\"password\":\"p2\"}}}\n";
        let out = run(&m, stream, 5).expect("json");
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains("p1") && !out.contains("p2"), "{out}");
        for bad in [&b"<html>"[..], b"{\"a\" 1}", b"[1,2", b"{\"a\":\"x", b"{]"] {
            assert!(
                run(&m, bad, 3).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Every split of `doc` gives the same output (keys and values cut anywhere, inside an
    /// escape too); that output.
    fn run_any_split(m: &Masker, doc: &[u8]) -> String {
        let whole = run(m, doc, doc.len()).expect("json");
        for piece in 1..doc.len().min(24) {
            assert_eq!(run(m, doc, piece).expect("json"), whole, "piece {piece}");
        }
        whole
    }

    /// An upstream may spell a masked key with JSON escapes, in any case (column globs are
    /// case-insensitive, as for SQL), or repeat it: a JSON client reads the same key, so the
    /// masker must too.
    #[test]
    fn disguised_and_repeated_keys_are_still_masked() {
        let m = masker(&["ssn", "items.*.spec.email"], &[]);
        for (doc, secret) in [
            (r#"{"s\u0073n":"111-22-3333"}"#, "111-22-3333"),
            (r#"{"\u0073sn":"111-22-3333"}"#, "111-22-3333"),
            (r#"{"\u0073\u0073\u006e":"111-22-3333"}"#, "111-22-3333"),
            (r#"{"\u0073\u0073\u006E":"111-22-3333"}"#, "111-22-3333"),
            (r#"{"\u0053SN":"111-22-3333"}"#, "111-22-3333"),
            (r#"{"SsN":"111-22-3333"}"#, "111-22-3333"),
            (r#"{"ssn":"first-value","ssn":"second-value"}"#, "-value"),
            (
                r#"{"ssn":"first-value","x":1,"s\u0073n":"second-value"}"#,
                "-value",
            ),
            (r#"{"ssn":{"nested":"object-value"}}"#, "object-value"),
            (r#"{"ssn":12345678901}"#, "12345678901"),
            (
                r#"{"it\u0065ms":[{"sp\u0065c":{"\u0065mail":"x@secret.example"}}]}"#,
                "secret.example",
            ),
            (
                r#"{"items":[{"spec":{"em\u0061il":"x@secret.example","email":"y@secret.example"}}]}"#,
                "secret.example",
            ),
        ] {
            let out = run_any_split(&m, doc.as_bytes());
            assert!(!out.contains(secret), "{doc} -> {out}");
            serde_json::from_str::<serde_json::Value>(&out).expect("masked JSON is JSON");
        }
        // Not the masked key: left as sent, escapes and all.
        let doc = r#"{"ssn2":"a","xssn":"b","s\u0073n\u0032":"c"}"#;
        assert_eq!(run_any_split(&m, doc.as_bytes()), doc);
    }

    /// Detectors see a string value decoded: a card number or AWS key written with escapes
    /// (or as a JSON number, or as an object key) is still caught.
    #[test]
    fn detectors_see_decoded_values_numbers_and_keys() {
        let m = masker(&[], &["credit_card", "aws_access_key", "email"]);
        for (doc, secret) in [
            (r#"{"k":"AKIA\u0049OSFODNN7EXAMPLE"}"#, "OSFODNN7EXAMPLE"),
            (r#"{"k":"\u0041KIAIOSFODNN7EXAMPLE"}"#, "OSFODNN7EXAMPLE"),
            (r#"{"card":"4111\u00201111\u00201111\u00201111"}"#, "1111"),
            (
                r#"{"card":"\u0034\u0031\u0031\u0031111111111111"}"#,
                "111111",
            ),
            (r#"{"mail":"alice\u0040example.com"}"#, "alice"),
            (r#"{"mail":"alice\/x@example.com"}"#, "alice"),
            (r#"{"card":4111111111111111}"#, "4111111111111111"),
            (r#"[4111111111111111,1]"#, "4111111111111111"),
            (r#"{"4111 1111 1111 1111":true}"#, "4111 1111 1111 1111"),
            (r#"{"by":{"alice\u0040example.com":1}}"#, "alice"),
        ] {
            let out = run_any_split(&m, doc.as_bytes());
            assert!(!out.contains(secret), "{doc} -> {out}");
            serde_json::from_str::<serde_json::Value>(&out).expect("masked JSON is JSON");
        }
        // A plain number or key stays as it is.
        let doc = r#"{"count":41,"price":-1.5e3,"name":"widget"}"#;
        assert_eq!(run_any_split(&m, doc.as_bytes()), doc);
    }

    /// Surrogates: a pair is one character, decoded like any other; a lone surrogate is not
    /// a string any JSON reader agrees on, so the body is refused (never passed unmasked).
    #[test]
    fn surrogate_escapes() {
        let m = masker(&["ssn"], &["email"]);
        let out = run_any_split(
            &m,
            r#"{"ssn\ud83d\ude00":"kept","mail":"\ud83d\ude00 alice@example.com"}"#.as_bytes(),
        );
        assert!(out.contains("kept") && !out.contains("alice"), "{out}");
        for bad in [
            r#"{"ssn":"\ud800"}"#,
            r#"{"s\udc00sn":"x"}"#,
            r#"{"a":"\u00zz"}"#,
        ] {
            assert!(run(&m, bad.as_bytes(), 1).is_err(), "{bad}");
        }
    }
}
