//! Masking of Kubernetes Secret values in JSON responses, by default on `kubernetes` targets.
//!
//! A request on `secrets` (any verb) is sent upstream asking for JSON only (no protobuf, no
//! compression). The answer is masked before the bot sees any of it: a document (get, list)
//! is read whole up to [`MAX_DOCUMENT`] bytes; a watch is masked event by event (one JSON
//! object per line, each up to [`MAX_DOCUMENT`]), so an endless watch never sits in memory.
//! Anything the agent cannot parse is refused, never passed on unmasked.
//!
//! Masked: every value under a `data` or `stringData` object, the
//! `kubectl.kubernetes.io/last-applied-configuration` annotation (which repeats them), and a
//! `TokenRequest`'s `status.token` (requests on `serviceaccounts/token` are masked the same way).

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use serde_json::Value;

use super::AnyBody;

/// Largest JSON document (or watch event) masked; larger is refused.
pub const MAX_DOCUMENT: usize = 32 << 20;

/// What a masked value becomes: valid base64 (Secret `data` is `[]byte`), reading
/// `masked-by-tollgate` when decoded.
pub const MASKED: &str = "bWFza2VkLWJ5LXRvbGxnYXRl";

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Mask `v` in place; returns how many values were masked.
pub fn mask_secrets(v: &mut Value) -> u64 {
    let mut n = 0;
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                match (k.as_str(), &mut *child) {
                    ("data" | "stringData", Value::Object(values)) => {
                        for val in values.values_mut() {
                            *val = Value::String(MASKED.into());
                            n += 1;
                        }
                    }
                    (LAST_APPLIED, Value::String(s)) => {
                        *s = "(masked by tollgate)".into();
                        n += 1;
                    }
                    _ => n += mask_secrets(child),
                }
            }
        }
        Value::Array(a) => {
            for child in a {
                n += mask_secrets(child);
            }
        }
        _ => {}
    }
    n
}

/// Mask one JSON document; `None` when it is not JSON. A `TokenRequest` (the answer of
/// `serviceaccounts/token`, `kubectl create token`) has its `status.token` masked too: it is a
/// credential for the cluster, which the bot must not hold.
pub fn mask_document(bytes: &[u8]) -> Option<(Vec<u8>, u64)> {
    let mut v: Value = serde_json::from_slice(bytes).ok()?;
    let mut n = mask_secrets(&mut v);
    if v["kind"] == "TokenRequest" {
        if let Some(t) = v.pointer_mut("/status/token").filter(|t| t.is_string()) {
            *t = Value::String("masked-by-tollgate".into());
            n += 1;
        }
    }
    Some((serde_json::to_vec(&v).ok()?, n))
}

/// A watch body masked line by line.
pub struct WatchMask {
    inner: AnyBody,
    buf: BytesMut,
    ready: VecDeque<Bytes>,
    ended: bool,
    on_mask: Box<dyn Fn(u64) + Send>,
}

impl WatchMask {
    pub fn new(inner: AnyBody, on_mask: Box<dyn Fn(u64) + Send>) -> WatchMask {
        WatchMask {
            inner,
            buf: BytesMut::new(),
            ready: VecDeque::new(),
            ended: false,
            on_mask,
        }
    }

    /// Mask every complete line in `buf`. `false` when one is not JSON (or too long).
    fn drain_lines(&mut self, all: bool) -> bool {
        while let Some(i) = memchr::memchr(b'\n', &self.buf) {
            let line = self.buf.split_to(i + 1);
            if !self.push_line(&line[..i]) {
                return false;
            }
        }
        if all && !self.buf.is_empty() {
            let line = self.buf.split();
            return self.push_line(&line);
        }
        self.buf.len() <= MAX_DOCUMENT
    }

    fn push_line(&mut self, line: &[u8]) -> bool {
        if line.iter().all(u8::is_ascii_whitespace) {
            return true;
        }
        match mask_document(line) {
            Some((mut out, n)) => {
                if n > 0 {
                    (self.on_mask)(n);
                }
                out.push(b'\n');
                self.ready.push_back(Bytes::from(out));
                true
            }
            None => false,
        }
    }
}

impl Body for WatchMask {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                        if !self.drain_lines(false) {
                            // Not JSON, or an event too large to mask: end the stream here.
                            // Nothing unmasked has been sent.
                            self.ended = true;
                            self.ready.clear();
                            tracing::warn!("a watch event could not be masked; the stream is cut");
                        }
                    }
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    if !self.drain_lines(true) {
                        self.ready.clear();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_masked_everywhere() {
        let doc = br#"{"kind":"SecretList","items":[{"metadata":{"name":"a","annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"stringData\":{\"p\":\"hunter2\"}}"}},"data":{"p":"aHVudGVyMg=="},"stringData":{"q":"hunter2"}}]}"#;
        let (out, n) = mask_document(doc).expect("json");
        let s = String::from_utf8(out).expect("utf8");
        assert_eq!(n, 3, "{s}");
        assert!(!s.contains("hunter2") && !s.contains("aHVudGVyMg=="), "{s}");
        assert!(s.contains(MASKED));
        assert!(mask_document(b"\x0a\x0bk8s\x00protobuf").is_none());
    }

    #[test]
    fn token_requests_lose_their_token() {
        let doc = br#"{"kind":"TokenRequest","apiVersion":"authentication.k8s.io/v1","spec":{"audiences":["x"]},"status":{"token":"eyJhbGciOiJSUzI1NiJ9.secret","expirationTimestamp":"2026-12-07T08:00:00Z"}}"#;
        let (out, n) = mask_document(doc).expect("json");
        let s = String::from_utf8(out).expect("utf8");
        assert_eq!(n, 1, "{s}");
        assert!(
            !s.contains("eyJ") && s.contains("expirationTimestamp"),
            "{s}"
        );
        // Any other kind keeps a `status.token`.
        let (out, n) = mask_document(br#"{"kind":"Other","status":{"token":"t"}}"#).expect("json");
        assert_eq!(
            (n, out.as_slice()),
            (0, &br#"{"kind":"Other","status":{"token":"t"}}"#[..])
        );
    }

    /// `data` spelled with escapes, or twice (a JSON reader keeps the last), is still `data`.
    #[test]
    fn disguised_data_keys_are_masked() {
        for doc in [
            r#"{"kind":"Secret","d\u0061ta":{"p":"aHVudGVyMg=="}}"#,
            r#"{"kind":"Secret","\u0073tringData":{"p":"hunter2"}}"#,
            r#"{"kind":"Secret","data":{"p":"aHVudGVyMg=="},"data":{"q":"aHVudGVyMg=="}}"#,
            r#"{"kind":"Secret","data":{"p":"x"},"d\u0061ta":{"q":"aHVudGVyMg=="}}"#,
        ] {
            let (out, n) = mask_document(doc.as_bytes()).expect("json");
            let s = String::from_utf8(out).expect("utf8");
            assert!(n >= 1, "{doc} -> {s}");
            assert!(
                !s.contains("hunter2") && !s.contains("aHVudGVyMg=="),
                "{doc} -> {s}"
            );
        }
    }
}
