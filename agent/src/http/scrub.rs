//! The target's credential never comes back to the bot.
//!
//! The agent puts the target's credential into every request it forwards, so an upstream that
//! echoes requests (a `TRACE`, a debug endpoint that returns the headers it got, an error page
//! quoting them) would hand the bot the very secret it must never hold. Every answer of a
//! target with a `Bearer` or `Basic` credential is therefore scanned, headers, body and
//! trailers, for the secret in the forms an echo takes: as sent, base64-encoded, with a JSON
//! escape of `/`, percent-encoded. Each occurrence becomes as many `*`, so lengths (and a
//! `Content-Length`) still hold. The body is scanned as it streams; only a frame's last bytes
//! that could begin a secret wait for the next frame, so a stream (`logs -f`, a watch) gets
//! everything else at once. The agent asks upstream for uncompressed answers, and one that
//! comes compressed anyway is refused: it cannot be scanned.
//!
//! Not scanned: the bytes of an upgraded connection (WebSocket), which the bot's own frames
//! drive.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use hyper::{
    body::{Body, Frame, SizeHint},
    header::{HeaderMap, HeaderValue},
};

use super::AnyBody;

/// Shorter forms are not looked for: they would mangle ordinary text.
const MIN_NEEDLE: usize = 6;

/// What to look for in a target's answers.
pub struct Scrub {
    finder: AhoCorasick,
    needles: Vec<Vec<u8>>,
    /// The longest needle's length.
    longest: usize,
    /// The shortest needle's length: shorter text holds none.
    shortest: usize,
    /// Which bytes begin a needle.
    first: [bool; 256],
}

impl Scrub {
    /// For the `Authorization` value the agent injects: `Bearer <token>` (the token) or
    /// `Basic <base64>` (the encoded pair and the password). `None` for anything else or a
    /// secret too short to look for.
    pub fn for_authorization(value: &HeaderValue) -> Option<Scrub> {
        let v = value.as_bytes();
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        if let Some(token) = strip_scheme(v, b"bearer ") {
            secrets.push(token.to_vec());
        } else if let Some(pair) = strip_scheme(v, b"basic ") {
            secrets.push(pair.to_vec());
            if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(pair) {
                if let Some(i) = raw.iter().position(|&b| b == b':') {
                    secrets.push(raw[i + 1..].to_vec());
                }
            }
        } else {
            secrets.push(v.to_vec());
        }
        Scrub::new(&secrets)
    }

    /// Each secret in its echoed forms.
    fn new(secrets: &[Vec<u8>]) -> Option<Scrub> {
        let mut needles: Vec<Vec<u8>> = Vec::new();
        for s in secrets {
            let forms = [
                s.clone(),
                // Without padding, which is no part of the secret (and a padded form would
                // begin with an unpadded one, so streaming could end a match early).
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(s)
                    .into_bytes(),
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(s)
                    .into_bytes(),
                json_escaped(s),
                percent_encoded(s),
            ];
            for f in forms {
                if f.len() >= MIN_NEEDLE && !needles.contains(&f) {
                    needles.push(f);
                }
            }
        }
        if needles.is_empty() {
            return None;
        }
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&needles)
            .ok()?;
        let mut first = [false; 256];
        for n in &needles {
            first[usize::from(n[0])] = true;
        }
        let longest = needles.iter().map(Vec::len).max().unwrap_or(0);
        let shortest = needles.iter().map(Vec::len).min().unwrap_or(0);
        Some(Scrub {
            finder,
            needles,
            longest,
            shortest,
            first,
        })
    }

    /// Mask every occurrence in `buf`; how many there were.
    fn mask(&self, buf: &mut [u8]) -> u64 {
        let spans: Vec<_> = self.finder.find_iter(&*buf).map(|m| m.range()).collect();
        for r in &spans {
            buf[r.clone()].fill(b'*');
        }
        spans.len() as u64
    }

    /// Mask every header value holding a secret; how many were.
    pub fn headers(&self, headers: &mut HeaderMap) -> u64 {
        let mut n = 0;
        for v in headers.values_mut() {
            // Most answer headers (types, lengths, dates) are too short to hold a secret.
            if v.len() >= self.shortest && self.finder.is_match(v.as_bytes()) {
                let mut b = v.as_bytes().to_vec();
                n += self.mask(&mut b);
                // `*` is a valid header byte, so the masked value is too; were it not, the
                // value would go whole, never unmasked.
                *v = HeaderValue::from_bytes(&b)
                    .unwrap_or_else(|_| HeaderValue::from_static("[masked by tollgate]"));
            }
        }
        n
    }

    /// How many of `buf`'s last bytes may begin a secret (and so must wait for more).
    fn pending_prefix(&self, buf: &[u8]) -> usize {
        let start = buf.len().saturating_sub(self.longest - 1);
        (start..buf.len())
            .find(|&i| {
                self.first[usize::from(buf[i])] && {
                    let tail = &buf[i..];
                    self.needles
                        .iter()
                        .any(|n| n.len() > tail.len() && n.starts_with(tail))
                }
            })
            .map_or(0, |i| buf.len() - i)
    }

    /// `inner` with every secret masked as it streams; `on_mask(n, first)` is told of each
    /// batch of masked ones, `first` for the answer's first.
    pub fn body(self: &Arc<Self>, inner: AnyBody, on_mask: OnMask) -> AnyBody {
        use http_body_util::BodyExt as _;
        ScrubBody {
            inner,
            scrub: self.clone(),
            held: BytesMut::new(),
            trailers: None,
            ended: false,
            on_mask,
            reported: false,
        }
        .boxed_unsync()
    }
}

/// Scrubbers by the `Authorization` value they look for, shared by every connection that
/// injects the same value (the automaton is built once, not per connection). One per HTTP
/// handler; a credential that changes (a rotated token file) leaves its old entry, so it is
/// bounded.
#[derive(Default)]
pub struct ScrubCache(std::sync::Mutex<Vec<(HeaderValue, Arc<Scrub>)>>);

impl ScrubCache {
    /// The scrubber for `value` (see [`Scrub::for_authorization`]).
    pub fn get(&self, value: &HeaderValue) -> Option<Arc<Scrub>> {
        let mut cache = crate::lock(&self.0);
        if let Some((_, s)) = cache.iter().find(|(v, _)| v == value) {
            return Some(s.clone());
        }
        let s = Arc::new(Scrub::for_authorization(value)?);
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.push((value.clone(), s.clone()));
        Some(s)
    }
}

fn strip_scheme<'a>(v: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    (v.len() > scheme.len() && v[..scheme.len()].eq_ignore_ascii_case(scheme))
        .then(|| v[scheme.len()..].trim_ascii())
}

/// `/` as JSON encoders that escape it write it (`\/`).
fn json_escaped(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        if b == b'/' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// Every byte outside RFC 3986's unreserved set as `%XX`.
fn percent_encoded(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// A body scanned as it streams (see the module's documentation).
struct ScrubBody {
    inner: AnyBody,
    scrub: Arc<Scrub>,
    /// The end of the last frame, which may begin a secret.
    held: BytesMut,
    /// Trailers read while bytes were still held: sent after them.
    trailers: Option<HeaderMap>,
    ended: bool,
    on_mask: OnMask,
    /// Whether `on_mask` was called for this answer yet.
    reported: bool,
}

/// What a scrubbed body reports: how many it masked, and whether it is the answer's first.
pub type OnMask = Arc<dyn Fn(u64, bool) + Send + Sync>;

impl ScrubBody {
    fn report(&mut self, n: u64) {
        if n > 0 {
            (self.on_mask)(n, !self.reported);
            self.reported = true;
        }
    }

    /// Scan `held` + `data`; what can go now (everything but a tail that may begin a secret,
    /// or everything at the end).
    fn pass(&mut self, data: &[u8], end: bool) -> Option<Bytes> {
        self.held.extend_from_slice(data);
        let n = self.scrub.mask(&mut self.held);
        self.report(n);
        let keep = if end {
            0
        } else {
            self.scrub.pending_prefix(&self.held)
        };
        let go = self.held.len() - keep;
        (go > 0).then(|| self.held.split_to(go).freeze())
    }
}

impl Body for ScrubBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.ended {
                if let Some(rest) = self.pass(&[], true) {
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => {
                        // The common case (nothing held, no secret, no tail that may begin
                        // one) passes the frame as it is, uncopied.
                        if self.held.is_empty()
                            && !self.scrub.finder.is_match(&d[..])
                            && self.scrub.pending_prefix(&d) == 0
                        {
                            return Poll::Ready(Some(Ok(Frame::data(d))));
                        }
                        if let Some(b) = self.pass(&d, false) {
                            return Poll::Ready(Some(Ok(Frame::data(b))));
                        }
                    }
                    Err(f) => {
                        if let Ok(mut t) = f.into_trailers() {
                            let n = self.scrub.headers(&mut t);
                            self.report(n);
                            self.trailers = Some(t);
                        }
                        self.ended = true;
                    }
                },
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_empty() && self.trailers.is_none()
    }
    fn size_hint(&self) -> SizeHint {
        // Same length in, same length out.
        let mut h = self.inner.size_hint();
        let held = self.held.len() as u64;
        h.set_lower(h.lower() + held);
        if let Some(u) = h.upper() {
            h.set_upper(u + held);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    const TOKEN: &str = "tg-test-token-abc/def+ghi";

    fn scrub() -> Arc<Scrub> {
        Arc::new(
            Scrub::for_authorization(
                &HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("test value"),
            )
            .expect("test value"),
        )
    }

    /// A body of `chunks`, through the scrubber, collected.
    fn through(s: &Arc<Scrub>, chunks: &[&[u8]]) -> (Vec<u8>, u64) {
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body =
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = count.clone();
        let out = s.body(
            body,
            Arc::new(move |n, _| {
                c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }),
        );
        let bytes = futures_executor_block_on(out.collect())
            .expect("test value")
            .to_bytes();
        (
            bytes.to_vec(),
            count.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test value")
            .block_on(f)
    }

    #[test]
    fn every_echoed_form_is_masked_even_cut_across_frames() {
        let s = scrub();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(TOKEN);
        let doc = format!(
            r#"{{"headers":{{"Authorization":"Bearer {TOKEN}"}},"b":"{b64}","j":"{}","p":"{}"}}"#,
            TOKEN.replace('/', "\\/"),
            "tg-test-token-abc%2Fdef%2Bghi"
        );
        for cut in [1, 2, 3, 7, 13, doc.len()] {
            let chunks: Vec<&[u8]> = doc.as_bytes().chunks(cut).collect();
            let (out, n) = through(&s, &chunks);
            let text = String::from_utf8(out).expect("test value");
            assert_eq!(text.len(), doc.len(), "lengths hold");
            assert_eq!(n, 4, "{text}");
            for part in ["tg-test-token", &b64[..12], "def+ghi", "def%2Bghi"] {
                assert!(!text.contains(part), "cut {cut}: {text}");
            }
        }
    }

    /// Random text with the token's forms at random places, cut at random: every form is
    /// masked, nothing else changes, and the length holds.
    #[test]
    fn random_bodies_and_cuts_never_leak() {
        use base64::Engine as _;
        use rand::{Rng as _, SeedableRng as _};
        let s = scrub();
        let forms = [
            TOKEN.to_string(),
            base64::engine::general_purpose::STANDARD.encode(TOKEN),
            TOKEN.replace('/', "\\/"),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..300 {
            let mut doc = Vec::new();
            let mut plain = Vec::new();
            for _ in 0..rng.gen_range(0..6) {
                // Noise drawn from the token's own letters, so near misses abound.
                for _ in 0..rng.gen_range(0..40) {
                    let b = TOKEN.as_bytes()[rng.gen_range(0..TOKEN.len())];
                    doc.push(b);
                    plain.push(b);
                }
                let f = &forms[rng.gen_range(0..forms.len())];
                doc.extend_from_slice(f.as_bytes());
                plain.extend(std::iter::repeat_n(b'*', f.len()));
            }
            let mut chunks = Vec::new();
            let mut rest = &doc[..];
            while !rest.is_empty() {
                let k = rng.gen_range(1..=rest.len().min(17));
                chunks.push(&rest[..k]);
                rest = &rest[k..];
            }
            let (out, _) = through(&s, &chunks);
            assert_eq!(out.len(), doc.len());
            let text = String::from_utf8_lossy(&out);
            assert!(!text.contains(TOKEN) && !text.contains(&forms[1]), "{text}");
            // Noise that happens to spell a form is masked too, so compare only where the
            // expected text is not masked.
            for (o, p) in out.iter().zip(&plain) {
                assert!(
                    *o == *p || *o == b'*' || (*p == b'*' && *o == b'='),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn text_without_the_secret_passes_unchanged_and_at_once() {
        let s = scrub();
        // A frame ending in what could begin the token is held back only that far.
        let (out, n) = through(&s, &[b"line one\n", b"tail tg-te", b"xt after\n"]);
        assert_eq!(n, 0);
        assert_eq!(out, b"line one\ntail tg-text after\n");
        assert_eq!(s.pending_prefix(b"ends with tg-te"), 5);
        assert_eq!(s.pending_prefix(b"ends with a newline\n"), 0);
    }

    #[test]
    fn headers_and_basic_credentials() {
        let s = scrub();
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo",
            HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("test value"),
        );
        h.insert("content-type", HeaderValue::from_static("application/json"));
        assert_eq!(s.headers(&mut h), 1);
        assert!(!h["x-echo"].to_str().expect("test value").contains("token"));
        assert_eq!(h["content-type"], "application/json");

        use base64::Engine as _;
        let pair = base64::engine::general_purpose::STANDARD.encode("svc:s3cret-pw");
        let basic = Scrub::for_authorization(
            &HeaderValue::from_str(&format!("Basic {pair}")).expect("test value"),
        )
        .expect("test value");
        let mut doc = format!("auth Basic {pair} password s3cret-pw").into_bytes();
        assert_eq!(basic.mask(&mut doc), 2);
        assert!(!String::from_utf8(doc)
            .expect("test value")
            .contains("s3cret"));
        // A secret too short to look for gives no scrubber.
        assert!(Scrub::for_authorization(&HeaderValue::from_static("Bearer abc")).is_none());
    }
}
