//! One bot connection: TLS termination, hyper's server (HTTP/1.1 and HTTP/2), and each
//! request through attribution, decision and forwarding.
//!
//! hyper's HTTP/2 server runs each stream's service future on its own task, which must be
//! `'static`, while the session context is borrowed. So the service only hands each request
//! to the session's own loop over a channel and waits for the answer; the loop runs the
//! requests concurrently (`FuturesUnordered`) inside the session's future. When the bot goes
//! away, hyper drops the waiting service futures, and the loop's work for them (an upstream
//! exchange, an approval wait) is cancelled with the session.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::Bytes;
use futures_util::{stream::FuturesUnordered, StreamExt as _};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
};
use tollgate_policy::{Action, Credential, Decision, DecisionReason, Operation, Protocol};

use super::{
    approval_message, attribute, denial_message, finish_response, kube_json,
    mask::{mask_document, WatchMask, MAX_DOCUMENT},
    refusal, strip_hop_by_hop, tally,
    upstream::Upstream,
    AnyBody, RecordLine,
};
use crate::{
    obj,
    relay::Totals,
    session::{ApprovalOutcome, DataPathError, InternalError, SessionCx},
    tls::Conn,
};

/// ALPN protocols offered to bots.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

type Job = (Request<Incoming>, oneshot::Sender<Response<AnyBody>>);

/// Serve one bot connection until it closes.
pub async fn serve(
    kept: &super::upstream::Kept,
    scrubs: &super::scrub::ScrubCache,
    cx: &SessionCx,
    client: TcpStream,
) -> Result<Totals, DataPathError> {
    let protocol = cx.target.protocol;
    let tls_target = matches!(protocol, Protocol::Https | Protocol::Kubernetes);
    let (io, sni, maybe_h2) = if tls_target {
        let Some(ca) = cx.agent.ca.clone() else {
            return Err(InternalError::unreachable(
                "the agent has no CA, so it cannot terminate the bot's TLS",
            ));
        };
        let cfg = ca.server_config(
            cx.orig_dst.ip(),
            &crate::tls::ServerTls {
                alpn: ALPN.iter().map(|p| p.to_vec()).collect(),
                client_auth: None,
            },
        );
        let tls = tokio_rustls::TlsAcceptor::from(cfg)
            .accept(client)
            .await
            .map_err(DataPathError::Client)?;
        let sni = tls.get_ref().1.server_name().map(str::to_ascii_lowercase);
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        (
            Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))),
            sni,
            h2,
        )
    } else {
        // Plain text may be HTTP/2 with prior knowledge, whose preface starts `PRI `, which no
        // HTTP/1 request does (hyper's auto builder decides those).
        let h2 = starts_like_h2(&client).await;
        (Conn::Plain(client), None, h2)
    };
    let credential = credential_for(cx);
    let client_cert = credential.as_ref().ok().and_then(|(_, c)| c.as_ref());
    let upstream_tls = if tls_target {
        let name = crate::tls::server_name(
            &cx.target.tls,
            cx.dialled_host().or_else(|| sni.clone()).as_deref(),
            cx.orig_dst.ip(),
        )
        .map_err(InternalError::encode)?;
        let cfg = crate::tls::http_client_config(&cx.target.tls, ALPN, client_cert)
            .map_err(InternalError::encode)?;
        // The same settings offering only http/1.1 (for upgrades).
        let h1 = crate::tls::http_client_config(&cx.target.tls, &ALPN[1..], client_cert)
            .map_err(InternalError::encode)?;
        Some(((cfg, name), h1))
    } else {
        None
    };
    let (upstream_tls, tls_h1) = match upstream_tls {
        Some((t, h1)) => (Some(t), Some(h1)),
        None => (None, None),
    };
    let up = Upstream::new(cx, upstream_tls, tls_h1, kept);
    let relays = std::sync::Mutex::new(tokio::task::JoinSet::new());
    let credential = credential.map(|(header, _)| header);
    // Answers are scanned for the credential the agent injects (`scrub.rs`); a find is
    // counted, with a warning once per answer.
    let scrub = credential
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|v| scrubs.get(v))
        .map(|s| {
            let counter = cx
                .agent
                .metrics
                .masked_values
                .with_label_values(&[&cx.target.name, "credential"]);
            let target = cx.target.name.clone();
            let report: super::scrub::OnMask = Arc::new(move |n, first| {
                if first {
                    tracing::warn!(target_name = %target, "the upstream's answer held the target's credential; masked");
                }
                counter.inc_by(n);
            });
            (s, report)
        });
    let shared = Arc::new(super::Shared {
        recorder: cx.open_recorder(),
        totals: (AtomicU64::new(0), AtomicU64::new(0)),
        seconds: cx
            .agent
            .metrics
            .http_request_seconds
            .with_label_values(&[&cx.target.name, protocol.as_str()]),
    });
    let recorder = &shared.recorder;
    if let Some(r) = recorder {
        r.write(cx.start_event(json!({ "sni": sni })));
    }
    // `[[mask]]` rules naming this target: JSON answers masked as they stream.
    let masker =
        crate::mask::Masker::for_target(&cx.gen.policy, &cx.target.name, cx.agent.hash_key);

    let env = Env {
        cx,
        up: &up,
        sni: sni.as_deref(),
        credential: &credential,
        shared: &shared,
        relays: &relays,
        masker: &masker,
        scrub: &scrub,
    };
    let result = if maybe_h2 {
        serve_any(io, env, protocol).await
    } else {
        // HTTP/1.1 (TLS without h2 in ALPN): each request is handled in the connection's own
        // future, borrowing the session, without a hand-off to another loop.
        let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
            Ok::<_, std::convert::Infallible>(env.handle(req).await)
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await
            .map_err(Into::into)
    };
    // Upgraded connections (WebSocket) outlive hyper's connection: the session ends with them.
    let mut relays = std::mem::take(&mut *crate::lock(&relays));
    while relays.join_next().await.is_some() {}
    if let Some(r) = recorder {
        r.write(obj(json!({"event": "end", "session": cx.id,
            "error": result.as_ref().err().map(|e| e.to_string())})));
    }
    let t = Totals {
        bytes_up: shared.totals.0.load(Ordering::Relaxed),
        bytes_down: shared.totals.1.load(Ordering::Relaxed),
    };
    cx.add_bytes(t);
    match result {
        Ok(()) => Ok(t),
        Err(e) => Err(DataPathError::Client(std::io::Error::other(e.to_string()))),
    }
}

/// Whether a plain-text connection's first bytes may be HTTP/2's preface (`PRI * HTTP/2.0`):
/// peeked, not read. A connection that ends or fails first goes to the auto builder, which
/// reports it.
async fn starts_like_h2(client: &TcpStream) -> bool {
    let mut b = [0u8; 4];
    // At most 10 s of a client sending `P`, `PR` or `PRI` and stalling.
    for _ in 0..10_000 {
        match client.peek(&mut b).await {
            Ok(n) if n >= 4 || (n > 0 && !b"PRI ".starts_with(&b[..n])) => {
                return &b[..n] == b"PRI ";
            }
            Ok(0) | Err(_) => return true,
            // Fewer bytes than tell, all of them a prefix of `PRI `: wait for more.
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
        }
    }
    true
}

/// HTTP/2 (or a plain-text connection that may be): hyper's auto builder spawns each stream's
/// service future, which must own what it holds, so requests are handed to this loop, which
/// handles them with the session borrowed, and the answers go back.
async fn serve_any(
    io: Conn,
    env: Env<'_>,
    protocol: Protocol,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (tx, mut rx) = mpsc::channel::<Job>(64);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let tx = tx.clone();
        async move {
            let (reply, answer) = oneshot::channel();
            if tx.send((req, reply)).await.is_err() {
                return Ok::<_, std::convert::Infallible>(refusal(
                    protocol,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "tollgate: the session is closing",
                    None,
                ));
            }
            Ok(answer.await.unwrap_or_else(|_| {
                refusal(
                    protocol,
                    StatusCode::BAD_GATEWAY,
                    "tollgate: the request was abandoned",
                    None,
                )
            }))
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut inflight = FuturesUnordered::new();
    let result = loop {
        tokio::select! {
            r = &mut conn => break r,
            Some((req, reply)) = rx.recv() => inflight.push(async move {
                let resp = env.handle(req).await;
                let _ = reply.send(resp);
            }),
            Some(()) = inflight.next(), if !inflight.is_empty() => {}
        }
    };
    drop(inflight);
    result
}

/// What the target's credential gives: the `Authorization` value (`Bearer <token>` for a
/// `token_file` or `env`, `Basic` for `user` + `password_file`) or a client certificate for
/// mTLS (`cert_file` + `key_file`). `Err` when the credential cannot be read: requests are then
/// refused (fail closed), never sent without it.
#[allow(clippy::type_complexity)]
fn credential_for(
    cx: &SessionCx,
) -> Result<(Option<header::HeaderValue>, Option<crate::tls::ClientCert>), String> {
    let Some(name) = &cx.target.credential else {
        return Ok((None, None));
    };
    let gen = cx.agent.gen.load();
    let Some(cred): Option<&Credential> = gen.policy.credentials.get(name) else {
        return Err(format!("credential {name} is not in the policy"));
    };
    let secret = crate::session::credentials::read_secret(name, cred)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("credential {name} has no secret"))?;
    if let Some(cert_file) = &cred.cert_file {
        let cert = crate::tls::ClientCert::load(cert_file, &secret)
            .map_err(|e| format!("credential {name}: {e}"))?;
        return Ok((None, Some(cert)));
    }
    let value = match (&cred.user, &cred.password_file) {
        (Some(user), Some(_)) => {
            use base64::Engine as _;
            let mut raw = user.as_bytes().to_vec();
            raw.push(b':');
            raw.extend_from_slice(&secret);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        }
        _ => format!(
            "Bearer {}",
            String::from_utf8(secret).map_err(|_| format!("credential {name} is not UTF-8"))?
        ),
    };
    let mut v = header::HeaderValue::from_str(&value)
        .map_err(|_| format!("credential {name} cannot be sent in a header"))?;
    v.set_sensitive(true);
    Ok((Some(v), None))
}

/// What every request of the session shares.
#[derive(Clone, Copy)]
struct Env<'a> {
    cx: &'a SessionCx,
    up: &'a Upstream<'a>,
    sni: Option<&'a str>,
    credential: &'a Result<Option<header::HeaderValue>, String>,
    /// What each request's recording line takes along (one counted reference).
    shared: &'a Arc<super::Shared>,
    relays: &'a std::sync::Mutex<tokio::task::JoinSet<()>>,
    masker: &'a Option<crate::mask::Masker>,
    /// The injected credential, looked for in every answer, and what a find reports.
    scrub: &'a Option<(Arc<super::scrub::Scrub>, super::scrub::OnMask)>,
}

impl Env<'_> {
    /// For an exec or attach: its output's recording. With a terminal (`tty=true`) an
    /// asciicast made when the relayed WebSocket first shows the terminal's size or output;
    /// without one, `output` lines of the session recording.
    fn terminal(
        &self,
        att: &super::Attributed,
        query: Option<&str>,
    ) -> Option<Arc<super::exec::Terminal>> {
        att.command.as_ref()?;
        let cx = self.cx;
        let masker = secret_detectors(cx);
        let tty = tollgate_policy::http::query_values(query, "tty").unwrap_or_default();
        if !tty.first().is_some_and(|v| v == "true" || v == "1") {
            let recorder = self.shared.recorder.clone()?;
            return Some(Arc::new(super::exec::Terminal::lines(
                masker, recorder, None,
            )));
        }
        let data_dir = cx.gen.policy.agent.data_dir.clone();
        let session = cx.id.clone();
        let recorder = self.shared.recorder.clone();
        let shown = match att.command.as_deref() {
            Some([]) => format!("attach {}", att.path),
            Some(words) => super::command_text(words),
            None => String::new(),
        };
        Some(Arc::new(super::exec::Terminal::new(
            masker,
            Box::new(move |w, h| {
                let c = crate::ssh::cast::Cast::create(&data_dir, &session, 1, w, h, "xterm")
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "cannot create the terminal recording"),
                    )
                    .ok()?;
                if let Some(r) = &recorder {
                    r.write(crate::obj(
                        json!({"event": "terminal", "cast": c.file_name(), "command": shown}),
                    ));
                }
                Some(c)
            }),
        )))
    }

    /// A request that would carry the target's `Authorization` credential must name the target
    /// itself: one of its names (the host names of its `address`, its `tls.server_name`) or
    /// the address dialled. Otherwise a bot could have the credential sent to another virtual
    /// host behind the same address (an ingress, a shared load balancer) and read it there.
    /// A target known by addresses alone has no names to hold requests to.
    fn credential_host(&self, host: &str) -> Result<(), super::Unattributable> {
        if !matches!(self.credential, Ok(Some(_))) {
            return Ok(());
        }
        let target = &self.cx.target;
        // Borrowed, so the common case allocates nothing.
        let names = || {
            target
                .address
                .iter()
                .filter_map(|a| match a {
                    tollgate_policy::TargetAddress::Host(h, _) => Some(h.as_str()),
                    _ => None,
                })
                .chain(target.tls.server_name.as_deref())
                .map(|n| n.trim_end_matches('.'))
        };
        if names().next().is_none() || names().any(|n| n.eq_ignore_ascii_case(host)) {
            return Ok(());
        }
        let dialled = host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical() == self.cx.orig_dst.ip().to_canonical());
        if dialled {
            return Ok(());
        }
        Err(super::Unattributable {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "tollgate: host {host} is not target {}'s ({}); its credential is sent to no other host",
                target.name,
                names().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// An answer's headers and body scanned for the injected credential; `Err(message)` for
    /// a compressed body, which cannot be scanned (the agent asked for an uncompressed one),
    /// unless `compressed_checked` (the caller refuses those itself).
    fn scrub_answer(
        &self,
        (s, report): &(Arc<super::scrub::Scrub>, super::scrub::OnMask),
        parts: &mut hyper::http::response::Parts,
        body: AnyBody,
        compressed_checked: bool,
    ) -> Result<AnyBody, String> {
        use hyper::body::Body as _;
        scrub_headers(s, report, &mut parts.headers);
        if body.is_end_stream() {
            return Ok(body);
        }
        if let Some(e) = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .filter(|e| !compressed_checked && !e.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Err(format!(
                "tollgate: target {}'s answer came compressed ({}) although the agent asked for none, so it cannot be checked for the target's credential; refused",
                self.cx.target.name,
                String::from_utf8_lossy(e.as_bytes())
            ));
        }
        Ok(s.body(body, report.clone()))
    }

    async fn handle(self, mut req: Request<Incoming>) -> Response<AnyBody> {
        let cx = self.cx;
        let protocol = cx.target.protocol;
        let kind = if protocol == Protocol::Kubernetes {
            "kubernetes"
        } else {
            "http"
        };
        let started = Instant::now();
        let mut record = RecordLine {
            shared: self.shared.clone(),
            fields: super::RecordFields {
                method: req.method().clone(),
                ..Default::default()
            },
            up: None,
            started,
            bodies: cx.target.record_bodies.then(|| {
                // The target's masks, else the secret detectors (a recording never holds a
                // credential or a masked value).
                let m = self
                    .masker
                    .clone()
                    .filter(|m| m.has_detectors())
                    .unwrap_or_else(|| secret_detectors(cx));
                Arc::new(super::Bodies::new(m))
            }),
        };
        let attributed = attribute(protocol, req.method(), req.uri(), req.headers(), self.sni)
            .and_then(|a| self.credential_host(&a.host).map(|()| a));
        let mut att = match attributed {
            Ok(a) => a,
            Err(u) => {
                // The target the bot sent, bounded, for the audit: without a query or userinfo,
                // which may carry secrets (`?...` says a query was there).
                let raw: String = audit_target(req.uri()).chars().take(512).collect();
                let d = Decision {
                    action: Action::Deny,
                    rule: None,
                    reason: DecisionReason::NoMatchingRule,
                };
                cx.audit_operation(
                    &cx.policy(),
                    kind,
                    &format!("{} {raw}", req.method()),
                    &d,
                    Some("unattributable"),
                );
                record.fields.target = Some(raw);
                record.fields.action = Some("deny");
                record.fields.reason = Some(u.message.clone());
                return finish_response(refusal(protocol, u.status, &u.message, None), record);
            }
        };
        let text = exec_shown(self.cx, &att, att.text());
        let d = match (&att.kube, att.operation()) {
            (Some(a), _) if !att.impersonate.is_empty() => {
                decide_impersonating(cx, a.as_ref(), &att, &text)
            }
            (Some(Some(a)), _) => {
                let resource = a.resource_path();
                cx.decide(
                    Operation::Kube {
                        verb: &a.verb,
                        resource: &resource,
                        namespace: &a.namespace,
                        name: &a.name,
                        command: att.command.as_deref(),
                    },
                    &text,
                )
            }
            (Some(None), _) => cx.audit_operation(
                &cx.policy(),
                kind,
                &text,
                &Decision {
                    action: Action::Allow,
                    rule: Some("(discovery)".into()),
                    reason: DecisionReason::Matched,
                },
                Some("discovery"),
            ),
            (None, Some(op)) if !att.overrides.is_empty() => decide_overridden(cx, op, &att, &text),
            (None, Some(op)) => cx.decide(op, &text),
            (None, None) => Decision {
                action: Action::Deny,
                rule: None,
                reason: DecisionReason::NoMatchingRule,
            },
        };
        record.fields.path = Some(att.path.clone());
        record.fields.host = Some(att.host.clone());
        record.fields.kubernetes = Some(kube_json(&att.kube));
        record.fields.action = Some(d.action.as_str());
        record.fields.rule = Some(d.rule.as_deref().map(str::to_owned));
        let what = || format!("{} {}", att.method, att.path);
        // Upgrades: WebSocket over HTTP/1.1 is relayed once decided; anything else (SPDY,
        // h2c) is refused.
        let upgrade = match req.headers().get(header::UPGRADE) {
            None => Ok(None),
            Some(v)
                if v.as_bytes().eq_ignore_ascii_case(b"websocket")
                    && req.version() == hyper::Version::HTTP_11 =>
            {
                Ok(Some(v.clone()))
            }
            Some(v) => Err(format!(
                "tollgate: an upgrade to {} is refused; only WebSocket (HTTP/1.1) is relayed (kubectl uses WebSocket for exec, attach and port-forward since 1.30)",
                String::from_utf8_lossy(v.as_bytes())
            )),
        };
        match d.action {
            Action::Allow => {}
            Action::Deny => {
                let msg = denial_message(&d, cx.identity.as_deref(), &cx.target.name, &what());
                return finish_response(
                    refusal(protocol, StatusCode::FORBIDDEN, &msg, d.rule.as_deref()),
                    record,
                );
            }
            // kubectl falls back from a refused WebSocket exec to SPDY, which is never relayed:
            // that retry opens no second approval request, and says how the first one ended.
            Action::Approve if upgrade.is_err() => {
                let msg = match earlier_outcome(cx, &att).await {
                    Some(m) => m,
                    None => format!(
                        "tollgate: {} needs approval, which only a WebSocket request can wait for",
                        what()
                    ),
                };
                return finish_response(
                    refusal(protocol, StatusCode::FORBIDDEN, &msg, d.rule.as_deref()),
                    record,
                );
            }
            Action::Approve => {
                let outcome = cx.request_approval(&cx.policy(), &text, kind, &d).await;
                record.fields.approval = Some(outcome.label());
                if !matches!(outcome, ApprovalOutcome::Approved { .. }) {
                    let msg = approval_message(&outcome, &what());
                    return finish_response(
                        refusal(protocol, StatusCode::FORBIDDEN, &msg, d.rule.as_deref()),
                        record,
                    );
                }
            }
        }
        let upgrade = match upgrade {
            Ok(u) => u,
            Err(msg) => {
                return finish_response(
                    refusal(protocol, StatusCode::FORBIDDEN, &msg, None),
                    record,
                );
            }
        };
        let bot_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let terminal = if upgrade.is_some() {
            self.terminal(&att, req.uri().query())
        } else {
            None
        };
        let credential = match self.credential {
            Ok(c) => c.clone(),
            Err(e) => {
                let msg = format!("tollgate: the target's credential cannot be used: {e}");
                return finish_response(
                    refusal(protocol, StatusCode::SERVICE_UNAVAILABLE, &msg, None),
                    record,
                );
            }
        };
        // The bot's authority for the upstream: an absolute-form URI's, else its Host (a
        // shared buffer, not copied), else the attributed host.
        let authority = match req.uri().authority() {
            Some(a) => header::HeaderValue::from_str(a.as_str()).ok(),
            None => req.headers().get(header::HOST).cloned(),
        }
        .or_else(|| header::HeaderValue::from_str(&att.host).ok());
        let Some(authority) = authority else {
            return finish_response(
                refusal(
                    protocol,
                    StatusCode::BAD_REQUEST,
                    "tollgate: the request's host cannot be forwarded",
                    None,
                ),
                record,
            );
        };
        let (mut parts, body) = req.into_parts();
        let bot_version = parts.version;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(c) = credential {
            parts.headers.insert(header::AUTHORIZATION, c);
        }
        // An answer that echoes the credential is scanned: it must come uncompressed.
        if self.scrub.is_some() {
            parts.headers.remove(header::ACCEPT_ENCODING);
        }
        if let Some(u) = &upgrade {
            parts.headers.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("upgrade"),
            );
            parts.headers.insert(header::UPGRADE, u.clone());
        }
        // Secrets are masked by default: ask for JSON the agent can read (no protobuf, no
        // compression).
        let secrets = match &att.kube {
            Some(Some(a))
                if a.resource == "secrets"
                    || (a.resource == "serviceaccounts" && a.subresource == "token") =>
            {
                Some(a.verb == "watch")
            }
            _ => None,
        };
        if secrets.is_some() || self.masker.is_some() {
            let accept = parts
                .headers
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .map(|a| {
                    a.split(',')
                        .filter(|m| !m.contains("protobuf"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|a| !a.trim().is_empty())
                .unwrap_or_else(|| "application/json".into());
            if let Ok(v) = header::HeaderValue::from_str(&accept) {
                parts.headers.insert(header::ACCEPT, v);
            }
            parts.headers.remove(header::ACCEPT_ENCODING);
            // A part of a document cannot be masked: a range that starts inside a masked
            // value would pass the rest of it as a value of its own.
            parts.headers.remove(header::RANGE);
            parts.headers.remove(header::IF_RANGE);
        }
        let head = parts.method == hyper::Method::HEAD;
        // A request without a body (most) is not wrapped to count or keep it.
        let body = if hyper::body::Body::is_end_stream(&body) {
            body.boxed_unsync()
        } else {
            let up = Arc::new(AtomicU64::new(0));
            record.up = Some(up.clone());
            tally(
                super::capture(body.boxed_unsync(), &record.bodies, false),
                up,
            )
        };
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.headers_mut() = parts.headers;
        *out.uri_mut() =
            match hyper::Uri::from_maybe_shared(Bytes::from(std::mem::take(&mut att.forward))) {
                Ok(u) => u,
                Err(_) => {
                    return finish_response(
                        refusal(
                            protocol,
                            StatusCode::BAD_REQUEST,
                            "tollgate: the request path cannot be forwarded",
                            None,
                        ),
                        record,
                    )
                }
            };
        let sent = match bot_upgrade {
            Some(bot) => self
                .up
                .send_upgrade(out, &authority)
                .await
                .map(|r| (r, Some(bot))),
            None => self.up.send(out, &authority).await.map(|r| (r, None)),
        };
        match sent {
            Ok((mut resp, Some(bot))) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream = hyper::upgrade::on(&mut resp);
                let (mut parts, _) = resp.into_parts();
                let upgrade_value = parts.headers.get(header::UPGRADE).cloned();
                strip_hop_by_hop(&mut parts.headers);
                if let Some((s, report)) = self.scrub {
                    scrub_headers(s, report, &mut parts.headers);
                }
                parts.headers.insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("upgrade"),
                );
                if let Some(u) = upgrade_value {
                    parts.headers.insert(header::UPGRADE, u);
                }
                crate::lock(self.relays).spawn(relay_upgraded(bot, upstream, record, terminal));
                Response::from_parts(parts, super::full(Bytes::new()))
            }
            Ok((resp, _)) => {
                let (mut parts, body) = resp.into_parts();
                // The bot's own version: an HTTP/1.0 upstream must not turn a keep-alive
                // HTTP/1.1 connection into a 1.0 one.
                parts.version = bot_version;
                strip_hop_by_hop(&mut parts.headers);
                let mut body = body.boxed_unsync();
                if (secrets.is_some() || self.masker.is_some())
                    && parts.status == StatusCode::PARTIAL_CONTENT
                {
                    let msg = format!(
                        "tollgate: masking applies to target {}, and a partial answer (206) cannot be masked, so it is refused",
                        cx.target.name
                    );
                    return finish_response(
                        refusal(protocol, StatusCode::FORBIDDEN, &msg, None),
                        record,
                    );
                }
                if let Some(scrub) = self.scrub {
                    // Masking refuses a compressed answer itself, in its own words.
                    let masked = secrets.is_some() || self.masker.is_some();
                    match self.scrub_answer(scrub, &mut parts, body, head || masked) {
                        Ok(b) => body = b,
                        Err(msg) => {
                            return finish_response(
                                refusal(protocol, StatusCode::BAD_GATEWAY, &msg, None),
                                record,
                            )
                        }
                    }
                }
                if let Some(watch) = secrets {
                    match mask_secret_body(cx, &mut parts.headers, body, watch).await {
                        Ok(b) => body = b,
                        Err(msg) => {
                            return finish_response(
                                refusal(protocol, StatusCode::FORBIDDEN, &msg, None),
                                record,
                            )
                        }
                    }
                }
                if let Some(m) = self.masker {
                    match mask_json_body(cx, &mut parts, body, m, head) {
                        Ok(b) => body = b,
                        Err(msg) => {
                            return finish_response(
                                refusal(protocol, StatusCode::FORBIDDEN, &msg, None),
                                record,
                            )
                        }
                    }
                }
                finish_response(Response::from_parts(parts, body), record)
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream request failed");
                let msg = format!("tollgate: the upstream request failed: {e}");
                finish_response(
                    refusal(protocol, StatusCode::BAD_GATEWAY, &msg, None),
                    record,
                )
            }
        }
    }
}

/// Mask the credential in an answer's headers, reporting what was found.
fn scrub_headers(
    s: &super::scrub::Scrub,
    report: &super::scrub::OnMask,
    h: &mut header::HeaderMap,
) {
    let n = s.headers(h);
    if n > 0 {
        report(n, true);
    }
}

/// The text of an exec (or attach) request as the audit and approvers see it: its command
/// through the SSH handler's secret detectors (a token or key typed into a command is not
/// written down). Other requests' text as it is.
fn exec_shown(cx: &SessionCx, att: &super::Attributed, text: String) -> String {
    if att.command.is_none() {
        return text;
    }
    match secret_detectors(cx).shown(&text) {
        std::borrow::Cow::Owned(o) => o,
        std::borrow::Cow::Borrowed(_) => text,
    }
}

/// The secret detectors the SSH handler runs on commands and terminal output, for what an
/// exec shows and records, and for request bodies of a target without masks of its own.
fn secret_detectors(cx: &SessionCx) -> crate::mask::Masker {
    crate::mask::Masker::with_detectors(
        crate::ssh::SSH_DETECTORS,
        tollgate_policy::MaskStyle::Full,
        cx.agent.hash_key,
    )
}

/// A request target as the audit may show it: scheme, host and port of an absolute-form URI
/// (never its userinfo), the path, and `?...` in place of a query.
pub(super) fn audit_target(u: &hyper::Uri) -> String {
    let mut t = String::new();
    if let (Some(scheme), Some(host)) = (u.scheme_str(), u.host()) {
        t.push_str(scheme);
        t.push_str("://");
        t.push_str(host);
        if let Some(p) = u.port_u16() {
            t.push_str(&format!(":{p}"));
        }
    }
    t.push_str(u.path());
    if u.query().is_some() {
        t.push_str("?...");
    }
    t
}

/// A Kubernetes request with `Impersonate-*` headers: the request itself (`None`: a discovery
/// read, which every client may make) and each impersonation (verb `impersonate`, as the API
/// server checks them) decided under one policy snapshot; the strictest decision stands and is
/// audited once, the impersonations in its text.
fn decide_impersonating(
    cx: &SessionCx,
    main: Option<&tollgate_policy::http::KubeAttrs>,
    att: &super::Attributed,
    text: &str,
) -> Decision {
    let gen = cx.agent.gen.load();
    let decide = |a: &tollgate_policy::http::KubeAttrs, command| {
        cx.decide_in(
            &gen,
            Operation::Kube {
                verb: &a.verb,
                resource: &a.resource_path(),
                namespace: &a.namespace,
                name: &a.name,
                command,
            },
        )
    };
    let mut worst = match main {
        Some(a) => decide(a, att.command.as_deref()),
        None => Decision {
            action: Action::Allow,
            rule: Some("(discovery)".into()),
            reason: DecisionReason::Matched,
        },
    };
    for i in &att.impersonate {
        worst = worst.stricter(decide(i, None));
    }
    cx.audit_operation(&gen, "kubernetes", text, &worst, Some("impersonation"))
}

/// An HTTP request carrying a method override: decided as its own method and as each method it
/// asks for, under one policy snapshot; the strictest decision stands, audited once.
fn decide_overridden(
    cx: &SessionCx,
    op: Operation<'_>,
    att: &super::Attributed,
    text: &str,
) -> Decision {
    let gen = cx.agent.gen.load();
    let mut worst = cx.decide_in(&gen, op);
    for m in &att.overrides {
        let d = cx.decide_in(
            &gen,
            Operation::Http {
                method: m,
                path: &att.path,
                host: &att.host,
            },
        );
        worst = worst.stricter(d);
    }
    cx.audit_operation(&gen, "http", text, &worst, Some("method-override"))
}

/// How the latest approval request of this identity for the same exec (same pod path and
/// command, on this target, within the last two minutes) ended, as a refusal message; `None`
/// when there is none.
async fn earlier_outcome(cx: &SessionCx, att: &super::Attributed) -> Option<String> {
    let command = att.command.as_deref()?;
    let store = cx.agent.approvals.clone()?;
    let (_, recent) = store.list().await.ok()?;
    let tail = exec_shown(
        cx,
        att,
        format!(" command: {}", super::command_text(command)),
    );
    let path = format!(" {} ", att.path);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let r = recent.into_iter().find(|r| {
        r.identity == cx.identity
            && r.target == cx.target.name
            && r.operation.ends_with(&tail)
            && r.operation.contains(&path)
            && now.saturating_sub(r.created_ms) < 120_000
    })?;
    let outcome = ApprovalOutcome::of(&r);
    if matches!(outcome, ApprovalOutcome::Approved { .. }) {
        return None;
    }
    let what = format!("{} {}", att.method, att.path);
    Some(approval_message(&outcome, &what))
}

/// Under `[[mask]]` rules: a JSON answer masked as it streams (`json.rs`); an answer with a
/// body the agent cannot read (another type, compressed) is refused, never passed unmasked.
fn mask_json_body(
    cx: &SessionCx,
    parts: &mut hyper::http::response::Parts,
    body: AnyBody,
    masker: &crate::mask::Masker,
    head: bool,
) -> Result<AnyBody, String> {
    use hyper::body::Body as _;
    let empty =
        head || matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) || parts.status.is_informational()
            || body.is_end_stream()
            || body.size_hint().exact() == Some(0);
    if empty {
        return Ok(body);
    }
    let ctype = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mime = ctype.split(';').next().unwrap_or("").trim().to_string();
    let json = mime == "application/json"
        || mime.ends_with("+json")
        || mime == "application/x-ndjson"
        || mime == "application/jsonl";
    let encoded = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
    if !json || encoded {
        return Err(format!(
            "tollgate: masking applies to target {}, and its answer (content type \"{ctype}\"{}) cannot be masked, so it is refused",
            cx.target.name,
            if encoded { ", compressed" } else { "" }
        ));
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let counter = cx
        .agent
        .metrics
        .masked_values
        .with_label_values(&[&cx.target.name, "http_json"]);
    Ok(
        super::json::JsonMaskBody::new(body, masker.clone(), Box::new(move |n| counter.inc_by(n)))
            .boxed_unsync(),
    )
}

/// Mask a response about Secrets (see `mask.rs`): a watch event by event, a document whole.
/// `Err(message)` when it cannot be masked: the bot gets a refusal, never the values.
async fn mask_secret_body(
    cx: &SessionCx,
    headers: &mut header::HeaderMap,
    body: AnyBody,
    watch: bool,
) -> Result<AnyBody, String> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("")
        .to_string();
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
    if !ctype.trim_start().starts_with("application/json") || encoded {
        return Err(format!(
            "tollgate: a response about Secrets that the agent cannot mask (content type \"{ctype}\"{}) is refused",
            if encoded { ", compressed" } else { "" }
        ));
    }
    let counter = cx
        .agent
        .metrics
        .masked_values
        .with_label_values(&[&cx.target.name, "kubernetes_secret"]);
    if watch {
        headers.remove(header::CONTENT_LENGTH);
        return Ok(WatchMask::new(body, Box::new(move |n| counter.inc_by(n))).boxed_unsync());
    }
    let bytes = http_body_util::Limited::new(body, MAX_DOCUMENT)
        .collect()
        .await
        .map_err(|e| {
            format!("tollgate: a response about Secrets could not be read for masking: {e}")
        })?
        .to_bytes();
    let (out, n) = mask_document(&bytes).ok_or_else(|| {
        "tollgate: a response about Secrets is not JSON, so it cannot be masked; refused"
            .to_string()
    })?;
    counter.inc_by(n);
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(out.len()));
    Ok(super::full(out))
}

/// Relay an upgraded connection (WebSocket) both ways until either side closes, then write the
/// request's recording line with the bytes each way.
async fn relay_upgraded(
    bot: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    mut record: RecordLine,
    terminal: Option<Arc<super::exec::Terminal>>,
) {
    let (bot, upstream) = match tokio::join!(bot, upstream) {
        (Ok(b), Ok(u)) => (b, u),
        (b, u) => {
            tracing::debug!(
                bot = b.is_ok(),
                upstream = u.is_ok(),
                "an upgrade did not complete"
            );
            record.finish(101, 0);
            return;
        }
    };
    let (mut bot_r, mut bot_w) = tokio::io::split(TokioIo::new(bot));
    let (mut up_r, mut up_w) = tokio::io::split(TokioIo::new(upstream));
    // Each direction on its own, counting what it moved even when it ends in an error (a
    // peer that closes TLS without close_notify).
    let tap = |from_bot| terminal.clone().map(|t| super::exec::Tap::new(t, from_bot));
    let (up, down) = tokio::join!(
        copy_counting(&mut bot_r, &mut up_w, tap(true)),
        copy_counting(&mut up_r, &mut bot_w, tap(false))
    );
    record
        .up
        .get_or_insert_with(Default::default)
        .fetch_add(up, Ordering::Relaxed);
    record.finish(101, down);
}

/// Copy until EOF or an error, then shut the writer down; the bytes copied.
async fn copy_counting(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut tap: Option<super::exec::Tap>,
) -> u64 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                if w.write_all(&buf[..k]).await.is_err() {
                    break;
                }
                if let Some(t) = &mut tap {
                    t.feed(&buf[..k]);
                }
                n += k as u64;
            }
        }
    }
    let _ = w.shutdown().await;
    n
}
