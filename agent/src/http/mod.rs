//! The HTTP, HTTPS and Kubernetes API handler, on hyper.
//!
//! The bot's connection is served by hyper (HTTP/1.1 or HTTP/2, chosen by ALPN or the h2
//! preface); for `https` and `kubernetes` targets the agent terminates the bot's TLS with a
//! leaf its CA mints for the SNI (or the dialled IP). Every request is attributed
//! ([`tollgate_policy::http`]), decided, audited and recorded on its own; an allowed one goes
//! upstream over the agent's own connections (rustls, h2 when the server offers it), with the
//! target's credential in place of whatever `Authorization` the bot sent. Bodies stream both
//! ways: nothing is buffered.
//!
//! # Layout
//! - `mod.rs`: the per-request pipeline: [`attribute`] (pure), the decision, the refusals in
//!   the client's own language (403 JSON, or a Kubernetes `Status`), forwarding.
//! - `mask.rs`: Kubernetes Secret values masked in JSON answers (watches event by event).
//! - `scrub.rs`: the injected credential masked wherever an answer echoes it.
//! - `serve.rs`: one bot connection: TLS, hyper's server, each request through the pipeline.
//! - `upstream.rs`: the agent's connections to the target (TLS, h1/h2, a small pool).
//! - `adapter.rs`: the [`crate::proxy::ProtocolHandler`] entry point, and the only place that
//!   knows the session layer.
//!
//! A request is *refused before its body is read*, so `Expect: 100-continue` uploads to a
//! denied path never send their body, and smuggling tricks (CL+TE, duplicate lengths, absolute
//! URIs that disagree with `Host`, `Host` that disagrees with SNI) are answered by the agent
//! and never reach the upstream: the upstream request is framed anew by hyper from the parsed
//! request, with the canonical path that was decided.

mod adapter;
mod exec;
mod json;
mod mask;
mod scrub;
mod serve;
mod upstream;

pub use adapter::HttpHandler;

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt as _, Full};
use hyper::{
    body::{Body, Frame, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Method, Response, StatusCode,
};
use serde_json::{json, Value};
use tollgate_policy::{
    http::{kube_attributes, kube_impersonation, normalize_path, KubeAttrs, KubeRequest},
    Decision, DecisionReason, Operation, Protocol,
};

use crate::{audit::Line, recording::Recorder, session::ApprovalOutcome};

/// Body type of everything the agent sends (to the bot and upstream).
pub type AnyBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// A body the agent wrote itself.
fn full(bytes: impl Into<Bytes>) -> AnyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// What one request is, as far as policy is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributed {
    /// Request method.
    pub method: String,
    /// Decoded, normalised path (what globs see).
    pub path: String,
    /// The canonical path and query sent upstream.
    pub forward: String,
    /// Host, lowercase, without port.
    pub host: String,
    /// `Some` for a Kubernetes target: the API request's attributes (`None` inside for a
    /// discovery document).
    pub kube: Option<Option<KubeAttrs>>,
    /// The command of `pods/exec` (and `pods/attach`, empty) from the query, one word per
    /// `command` argument.
    pub command: Option<Vec<String>>,
    /// For a Kubernetes target, what the request's `Impersonate-*` headers ask for: each an
    /// `impersonate` request decided with it.
    pub impersonate: Vec<KubeAttrs>,
    /// For an HTTP target, the methods a method override asks for (`X-HTTP-Method-Override`,
    /// `X-HTTP-Method`, `X-Method-Override`, a `_method` query parameter), uppercase: many
    /// frameworks run a `POST` carrying one as that method, so each is decided too.
    pub overrides: Vec<String>,
}

/// Headers web frameworks read as the request's real method.
const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Why a request is refused before policy sees it; the message is for the bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unattributable {
    /// 400 (malformed), 421 (Host/SNI mismatch) or 403 (not attributable).
    pub status: StatusCode,
    pub message: String,
}

fn unattributable(status: StatusCode, message: impl Into<String>) -> Unattributable {
    Unattributable {
        status,
        message: message.into(),
    }
}

/// The host part of an authority (`host`, `host:port`, `[v6]:port`), lowercase.
fn host_of(authority: &str) -> String {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        a.rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(a, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Attribute one request (pure): framing and host checks, path normalisation, and for a
/// Kubernetes target the API server's request attributes. `sni` is the name the bot's TLS
/// ClientHello carried.
pub fn attribute(
    protocol: Protocol,
    method: &Method,
    uri: &hyper::Uri,
    headers: &HeaderMap,
    sni: Option<&str>,
) -> Result<Attributed, Unattributable> {
    let bad = |m: &str| unattributable(StatusCode::BAD_REQUEST, format!("tollgate: {m}"));
    // Framing: a request both chunked and sized, or sized twice, is read differently by
    // different servers (request smuggling): refused.
    let te = headers.get_all(header::TRANSFER_ENCODING).iter().count();
    let cl = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if te > 0 && cl > 0 {
        return Err(bad(
            "Content-Length together with Transfer-Encoding is refused",
        ));
    }
    if cl > 1 {
        return Err(bad("more than one Content-Length is refused"));
    }
    for v in headers.get_all(header::TRANSFER_ENCODING) {
        if !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(bad(
                "a Transfer-Encoding other than a single \"chunked\" is refused",
            ));
        }
    }
    if te > 1 {
        return Err(bad("more than one Transfer-Encoding is refused"));
    }
    // Host: exactly one, agreeing with an absolute-form URI or :authority, and with SNI.
    let mut hosts = headers.get_all(header::HOST).iter();
    let first_host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("more than one Host header is refused"));
    }
    let header_host = match first_host {
        Some(h) => Some(
            h.to_str()
                .map_err(|_| bad("the Host header is not ASCII"))
                .map(host_of)?,
        ),
        None => None,
    };
    let uri_host = uri.authority().map(|a| host_of(a.as_str()));
    let host = match (uri_host, header_host) {
        (Some(u), Some(h)) if u != h => {
            return Err(bad(
                "the request URI names another host than the Host header",
            ))
        }
        (Some(h), _) | (None, Some(h)) => h,
        (None, None) => return Err(bad("a request without a Host is refused")),
    };
    if host.is_empty() {
        return Err(bad("an empty Host is refused"));
    }
    if let Some(sni) = sni {
        if !sni.eq_ignore_ascii_case(&host) {
            return Err(unattributable(
                StatusCode::MISDIRECTED_REQUEST,
                format!("tollgate: Host {host} does not match the TLS server name {sni}"),
            ));
        }
    }
    if let Some(scheme) = uri.scheme_str() {
        if !matches!(scheme, "http" | "https") {
            return Err(bad("only http and https request URIs are accepted"));
        }
    }
    if method == Method::CONNECT {
        return Err(unattributable(
            StatusCode::FORBIDDEN,
            "tollgate: CONNECT is refused (tollgate is not a forward proxy)",
        ));
    }
    let path = normalize_path(uri.path()).map_err(|e| {
        unattributable(
            StatusCode::FORBIDDEN,
            format!("tollgate: request refused: {e}"),
        )
    })?;
    let mut forward = path.encoded;
    if let Some(q) = uri.query() {
        forward.push('?');
        forward.push_str(q);
    }
    let kube = match protocol {
        Protocol::Kubernetes => {
            match kube_attributes(method.as_str(), &path.decoded, uri.query()) {
                Ok(KubeRequest::Resource(a)) => Some(Some(a)),
                Ok(KubeRequest::Discovery) => Some(None),
                Err(e) => {
                    return Err(unattributable(
                        StatusCode::FORBIDDEN,
                        format!("tollgate: request refused: {e}"),
                    ))
                }
            }
        }
        _ => None,
    };
    let impersonate = match protocol {
        Protocol::Kubernetes => kube_impersonation(
            headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        )
        .map_err(|e| {
            unattributable(
                StatusCode::FORBIDDEN,
                format!("tollgate: request refused: {e}"),
            )
        })?,
        _ => Vec::new(),
    };
    let mut overrides = Vec::new();
    if kube.is_none() {
        for name in &METHOD_OVERRIDES {
            for v in headers.get_all(name) {
                let m = v
                    .to_str()
                    .map_err(|_| bad("a method override header is not text"))?;
                overrides.push(m.trim().to_ascii_uppercase());
            }
        }
        // Decoding every key costs an allocation each; a query can only name `_method` if it
        // spells it, or percent-encodes something.
        if let Some(q) = uri
            .query()
            .filter(|q| q.contains("_method") || q.contains('%'))
        {
            let q = tollgate_policy::http::query_values(Some(q), "_method")
                .ok_or_else(|| bad("a malformed query"))?;
            overrides.extend(q.into_iter().map(|m| m.trim().to_ascii_uppercase()));
        }
        // Once each, in order, the request's own method left out.
        let mut unique: Vec<String> = Vec::new();
        for m in overrides {
            if m != method.as_str() && !unique.contains(&m) {
                unique.push(m);
            }
        }
        overrides = unique;
    }
    let command = match &kube {
        Some(Some(a))
            if a.resource == "pods" && matches!(a.subresource.as_str(), "exec" | "attach") =>
        {
            let words =
                tollgate_policy::http::query_values(uri.query(), "command").ok_or_else(|| {
                    unattributable(
                        StatusCode::FORBIDDEN,
                        "tollgate: request refused: malformed exec query",
                    )
                })?;
            Some(words)
        }
        _ => None,
    };
    Ok(Attributed {
        method: method.as_str().to_string(),
        path: path.decoded,
        forward,
        host,
        kube,
        command,
        impersonate,
        overrides,
    })
}

impl Attributed {
    /// The policy operation.
    pub fn operation(&self) -> Option<Operation<'_>> {
        match &self.kube {
            None => Some(Operation::Http {
                method: &self.method,
                path: &self.path,
                host: &self.host,
            }),
            Some(Some(_)) | Some(None) => None,
        }
    }

    /// `; impersonate users admin, impersonate groups g`: what the request impersonates.
    fn impersonation_text(&self) -> String {
        let parts: Vec<String> = self.impersonate.iter().map(kube_text).collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!("; {}", parts.join(", "))
        }
    }

    /// How the audit log shows the request (no query: it may carry secrets).
    pub fn text(&self) -> String {
        match &self.kube {
            Some(Some(a)) => format!(
                "{} {} ({}{}){}",
                self.method,
                self.path,
                kube_text(a),
                self.impersonation_text(),
                self.command
                    .as_deref()
                    .map(|c| format!(" command: {}", command_text(c)))
                    .unwrap_or_default(),
            ),
            Some(None) if !self.impersonate.is_empty() => format!(
                "{} {} (discovery{})",
                self.method,
                self.path,
                self.impersonation_text()
            ),
            _ => {
                let mut t = String::with_capacity(self.method.len() + 1 + self.path.len());
                t.push_str(&self.method);
                t.push(' ');
                t.push_str(&self.path);
                if !self.overrides.is_empty() {
                    t.push_str(" (as ");
                    t.push_str(&self.overrides.join(", "));
                    t.push(')');
                }
                t
            }
        }
    }
}

/// `verb resource[/subresource][ -n namespace][ name]`, as the audit shows a Kubernetes
/// request.
fn kube_text(a: &KubeAttrs) -> String {
    let mut t = format!("{} {}", a.verb, a.resource_path());
    if !a.namespace.is_empty() {
        t.push_str(" -n ");
        t.push_str(&a.namespace);
    }
    if !a.name.is_empty() {
        t.push(' ');
        t.push_str(&a.name);
    }
    t
}

/// An exec command's words as one line: plain words as they are, any other word in single
/// quotes (so `sh -c 'rm -rf /'` shows where each word ends), control characters escaped.
pub fn command_text(words: &[String]) -> String {
    let plain = |w: &str| {
        !w.is_empty()
            && w.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'_' | b'.' | b'/' | b':' | b'=' | b'@' | b'%' | b'+' | b',' | b'-' | b'*'
                    )
            })
    };
    words
        .iter()
        .map(|w| {
            if plain(w) {
                w.clone()
            } else {
                // `escape_default` also escapes quotes and backslashes, so the word's end is
                // unambiguous.
                format!("'{}'", w.escape_default())
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A refusal in the client's own language: a Kubernetes `Status` for kubernetes targets (so
/// kubectl prints `Error from server (Forbidden): tollgate: ...`), JSON otherwise.
pub fn refusal(
    protocol: Protocol,
    status: StatusCode,
    message: &str,
    rule: Option<&str>,
) -> Response<AnyBody> {
    let body = if protocol == Protocol::Kubernetes {
        let reason = match status {
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::BAD_REQUEST => "BadRequest",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
            StatusCode::BAD_GATEWAY => "InternalError",
            _ => "Forbidden",
        };
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": { "causes": [{ "reason": "tollgate", "message": rule.unwrap_or("") }] },
            "code": status.as_u16(),
        })
    } else {
        json!({
            "error": status.canonical_reason().unwrap_or("refused").to_ascii_lowercase(),
            "message": message,
            "rule": rule,
        })
    };
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    // A request refused for its framing or host may have left bytes behind it that were
    // meant to be read as another request: close instead of reading on.
    if matches!(
        status,
        StatusCode::BAD_REQUEST | StatusCode::MISDIRECTED_REQUEST
    ) {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The message of a policy refusal.
pub fn denial_message(d: &Decision, identity: Option<&str>, target: &str, what: &str) -> String {
    let who = identity.unwrap_or("(unknown)");
    match (&d.rule, d.reason) {
        (Some(rule), DecisionReason::Matched) => format!(
            "tollgate: {what} denied for identity {who} on target {target} by rule \"{rule}\"; ask for access"
        ),
        _ => format!(
            "tollgate: {what} denied for identity {who} on target {target}: no rule allows it ({}); ask for access",
            d.reason.as_str()
        ),
    }
}

/// The message of an approval that did not end in approval.
pub fn approval_message(o: &ApprovalOutcome, what: &str) -> String {
    match o {
        ApprovalOutcome::Approved { .. } => String::new(),
        ApprovalOutcome::Denied {
            id,
            approver,
            comment,
        } => format!(
            "tollgate: {what} was denied by {approver} (approval {id}){}",
            comment
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        ),
        ApprovalOutcome::Expired { id, reason } => {
            format!("tollgate: approval {id} for {what} ended without approval: {reason}")
        }
        ApprovalOutcome::Unavailable => {
            format!("tollgate: {what} needs approval, which is not available on this agent")
        }
    }
}

/// Headers that belong to one hop and are never forwarded (RFC 9110 7.6.1), plus the bot's
/// credentials (replaced by the target's). `CONNECTION` first: see [`strip_hop_by_hop`].
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Remove the [`HOP_BY_HOP`] headers and those `Connection` names. One look at each name
/// present and a removal only for those listed (most messages carry one or none), with no
/// allocation: this runs twice per request.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for n in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == n) {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 {
        strip_connection_named(headers);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(n);
        }
    }
}

/// The headers `Connection` names (hop-by-hop too). Each value is a cheap clone (a shared
/// buffer), so the map can change while its names are read.
fn strip_connection_named(headers: &mut HeaderMap) {
    for k in 0.. {
        let Some(v) = headers.get_all(header::CONNECTION).iter().nth(k).cloned() else {
            break;
        };
        let Ok(v) = v.to_str() else { continue };
        for n in v.split(',') {
            // A token that is no header name removes nothing.
            headers.remove(n.trim());
        }
    }
}

/// What an [`Observed`] body does with each data frame it passes.
trait Seen: Send + Unpin + 'static {
    fn seen(&mut self, d: &Bytes);
}

impl<F: FnMut(&Bytes) + Send + Unpin + 'static> Seen for F {
    fn seen(&mut self, d: &Bytes) {
        self(d)
    }
}

/// A body that shows each data frame it passes to `seen`.
struct Observed<S: Seen> {
    inner: AnyBody,
    seen: S,
}

impl<S: Seen> Body for Observed<S> {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.seen.seen(d);
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `inner`, counting the bytes it passes into `bytes`.
fn tally(inner: AnyBody, bytes: Arc<AtomicU64>) -> AnyBody {
    Observed {
        inner,
        seen: move |d: &Bytes| {
            bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
        },
    }
    .boxed_unsync()
}

/// A response body's observer on its way to the bot: counts what passes, and writes the
/// request's recording line when the body is dropped (ended, or abandoned), with final bytes
/// and duration.
struct Finishing {
    down: u64,
    status: u16,
    record: Option<RecordLine>,
}

impl Seen for Finishing {
    fn seen(&mut self, d: &Bytes) {
        self.down += d.len() as u64;
    }
}

impl Drop for Finishing {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            r.finish(self.status, self.down);
        }
    }
}

/// What a session's requests share with their recording lines, which outlive the request's
/// future (they are written when the response body is dropped).
struct Shared {
    recorder: Option<Arc<Recorder>>,
    /// Bytes up and down over the session.
    totals: (AtomicU64, AtomicU64),
    /// `tollgate_http_request_duration_seconds` for the session's target.
    seconds: prometheus::Histogram,
}

/// One request's recording line, written when its response body ends.
struct RecordLine {
    shared: Arc<Shared>,
    /// The line's fields so far.
    fields: RecordFields,
    /// Bytes sent upstream, counted as the request body passes (`None`: no body, 0).
    up: Option<Arc<AtomicU64>>,
    started: Instant,
    /// `record_bodies = true`: the start of the request and response bodies, and the masker
    /// they pass before they are written.
    bodies: Option<Arc<Bodies>>,
}

/// What a request's recording line says besides its outcome (status, bytes, duration,
/// bodies). Typed, and written field by field in key order, so a request costs no map of
/// JSON values; a field left `None` is not in the line.
#[derive(Clone, Default)]
struct RecordFields {
    method: Method,
    /// The raw request target, when the request could not be attributed.
    target: Option<String>,
    action: Option<&'static str>,
    /// Why the request could not be attributed.
    reason: Option<String>,
    path: Option<String>,
    host: Option<String>,
    /// The Kubernetes attributes (`null` for plain HTTP).
    kubernetes: Option<Value>,
    /// `Some(None)`: the line says `"rule":null`.
    rule: Option<Option<String>>,
    approval: Option<&'static str>,
}

/// Largest part of each body a recording keeps.
const RECORDED_BODY: usize = 64 * 1024;

/// The recorded starts of one request's bodies (`record_bodies = true`).
struct Bodies {
    request: std::sync::Mutex<(Vec<u8>, u64)>,
    response: std::sync::Mutex<(Vec<u8>, u64)>,
    masker: crate::mask::Masker,
}

impl Bodies {
    fn new(masker: crate::mask::Masker) -> Bodies {
        Bodies {
            request: std::sync::Mutex::new((Vec::new(), 0)),
            response: std::sync::Mutex::new((Vec::new(), 0)),
            masker,
        }
    }

    /// Keep the start of `data` (the bytes of one side as they pass), count all of it.
    fn keep(side: &std::sync::Mutex<(Vec<u8>, u64)>, data: &[u8]) {
        let mut s = crate::lock(side);
        let room = RECORDED_BODY.saturating_sub(s.0.len());
        s.0.extend_from_slice(&data[..room.min(data.len())]);
        s.1 += data.len() as u64;
    }

    /// One side as recorded: masked text, and whether it was cut.
    fn shown(&self, side: &std::sync::Mutex<(Vec<u8>, u64)>) -> Value {
        let s = crate::lock(side);
        let text = match self.masker.mask_text(&s.0, false) {
            Some(crate::mask::Masked::Value(v, _)) => String::from_utf8_lossy(&v).into_owned(),
            Some(crate::mask::Masked::Null(_)) => String::new(),
            None => String::from_utf8_lossy(&s.0).into_owned(),
        };
        json!({ "text": text, "bytes": s.1, "truncated": s.1 > s.0.len() as u64 })
    }
}

/// `inner`, its start kept in `bodies` when bodies are recorded.
fn capture(inner: AnyBody, bodies: &Option<Arc<Bodies>>, response: bool) -> AnyBody {
    match bodies {
        Some(b) => {
            let bodies = b.clone();
            Observed {
                inner,
                seen: move |d: &Bytes| {
                    let side = if response {
                        &bodies.response
                    } else {
                        &bodies.request
                    };
                    Bodies::keep(side, d);
                },
            }
            .boxed_unsync()
        }
        None => inner,
    }
}

impl RecordLine {
    fn finish(mut self, status: u16, down: u64) {
        let elapsed = self.started.elapsed();
        let shared = &self.shared;
        shared.seconds.observe(elapsed.as_secs_f64());
        let up = self.up.as_ref().map_or(0, |u| u.load(Ordering::Relaxed));
        shared.totals.0.fetch_add(up, Ordering::Relaxed);
        shared.totals.1.fetch_add(down, Ordering::Relaxed);
        let Some(r) = &shared.recorder else {
            return;
        };
        let f = &self.fields;
        let bodies = self
            .bodies
            .take()
            .map(|b| (b.shown(&b.request), b.shown(&b.response)));
        // Keys in order, as every recording line has them.
        let mut line = Line::new("");
        if let Some(a) = f.action {
            line = line.str("action", a);
        }
        if let Some(a) = f.approval {
            line = line.str("approval", a);
        }
        line = line
            .val("bytes_down", down)
            .val("bytes_up", up)
            .val("duration_ms", elapsed.as_secs_f64() * 1000.0)
            .str("event", "request");
        if let Some(h) = &f.host {
            line = line.str("host", h);
        }
        if let Some(k) = &f.kubernetes {
            line = line.val("kubernetes", k);
        }
        line = line.str("method", f.method.as_str());
        if let Some(p) = &f.path {
            line = line.str("path", p);
        }
        if let Some(why) = &f.reason {
            line = line.str("reason", why);
        }
        if let Some((request, response)) = &bodies {
            line = line
                .val("request_body", request)
                .val("response_body", response);
        }
        if let Some(rule) = &f.rule {
            line = line.opt("rule", rule.as_deref());
        }
        line = line.val("status", status);
        if let Some(t) = &f.target {
            line = line.str("target", t);
        }
        r.write_line(line);
    }
}

/// The Kubernetes attributes as recorded.
fn kube_json(a: &Option<Option<KubeAttrs>>) -> Value {
    match a {
        None => Value::Null,
        Some(None) => json!({ "discovery": true }),
        Some(Some(a)) => json!({
            "verb": a.verb, "group": a.group, "version": a.version, "resource": a.resource,
            "subresource": a.subresource, "namespace": a.namespace, "name": a.name,
        }),
    }
}

/// `resp` with its body counted, and `record` written when that body ends.
fn finish_response(resp: Response<AnyBody>, record: RecordLine) -> Response<AnyBody> {
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = Observed {
        inner: capture(body, &record.bodies, true),
        seen: Finishing {
            down: 0,
            status,
            record: Some(record),
        },
    }
    .boxed_unsync();
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests;
