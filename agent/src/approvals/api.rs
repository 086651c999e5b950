//! The admin listener (`[agent] admin`): health and the approvals JSON API.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /healthz`, `/readyz` | `ok`, or 503 while the audit log cannot be written |
//! | `GET /v1/approvals` | `{"pending": [...], "recent": [...]}` |
//! | `GET /v1/approvals/{id}` | `{"request": {...}}` |
//! | `POST /v1/approvals/{id}/approve`, `/deny` with `{"comment": "..."}` | `{"request": {...}}` |
//! | `GET /v1/status` | the agent's status (`crate::status`) |
//! | `/ui/...` | the web page (`web.rs`) |
//!
//! Every `/v1` call needs `Authorization: Bearer <token>`, or the web page's session cookie
//! (then a POST must also carry the session's `X-Tollgate-CSRF` token, else 403): 401 (with a
//! reason) when the credentials are missing or not accepted, 403 when the approver may not decide this request, 404 for an
//! unknown id, 409 when it is already closed or this approver already approved, 503 when the
//! verifier or the shared approval store cannot answer. A refused call never changes the request.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::{
    auth::{Approver, ApproverAuth, AuthError},
    web::{self, Web, WebUi},
    ApprovalStore, DecideError, Verdict,
};

/// Largest request body accepted (a comment).
const MAX_BODY: usize = 64 * 1024;

pub struct Admin {
    pub broker: Option<Arc<dyn ApprovalStore>>,
    pub auth: Arc<dyn ApproverAuth>,
    /// The web page at `/ui/` (on when `[approvals.oidc]` names a web client).
    pub web: Web,
    /// The audit log whose write health `/healthz` reports (None in tests).
    pub audit: Option<crate::audit::Audit>,
    /// What `GET /v1/status` reports (set once the agent is built; unset: 503).
    pub status: std::sync::OnceLock<Arc<dyn StatusReport>>,
}

/// The agent's status document for `GET /v1/status` (`crate::status` implements it; the API
/// only serves it).
pub trait StatusReport: Send + Sync {
    fn report<'a>(
        &'a self,
        broker: Option<&'a Arc<dyn ApprovalStore>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Value> + Send + 'a>>;
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut s = body.to_string();
    s.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(s)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"tollgate\""),
        );
    }
    r
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({"error": msg.into(), "status": status.as_u16()}),
    )
}

/// Serve the admin API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        if matches!(path.as_str(), "/healthz" | "/readyz") {
            return crate::metrics::health_response(self.audit.as_ref());
        }
        if path == "/ui" || path.starts_with("/ui/") {
            return match &self.web {
                Web::On(w) => w.handle(req).await,
                Web::Off(reason) => web::handle_off(reason, &path),
            };
        }
        if path == "/v1/status" {
            return self.status(req).await;
        }
        let Some(rest) = path.strip_prefix("/v1/approvals") else {
            return error(StatusCode::NOT_FOUND, format!("not found: {path}"));
        };
        let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let route = match (&method, parts.as_slice()) {
            (&Method::GET, []) => Route::List,
            (&Method::GET, [id]) => Route::Get(id),
            (&Method::POST, [id, "approve"]) => Route::Decide(id, Verdict::Approve),
            (&Method::POST, [id, "deny"]) => Route::Decide(id, Verdict::Deny),
            (_, [] | [_]) | (_, [_, "approve" | "deny"]) => {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} is not allowed on {path}"),
                )
            }
            _ => return error(StatusCode::NOT_FOUND, format!("not found: {path}")),
        };
        let Some(broker) = &self.broker else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "approvals are not enabled on this agent",
            );
        };
        // Authenticate before reading anything else the caller sent.
        let who = match self.caller(&req, method == Method::POST).await {
            Ok(w) => w,
            Err(r) => return r,
        };
        let parse_id = |s: &str| s.parse::<u64>().ok();
        match route {
            Route::List => match broker.list().await {
                Ok((pending, recent)) => reply(
                    StatusCode::OK,
                    json!({"pending": pending, "recent": recent, "you": who.subject}),
                ),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            },
            Route::Get(id) => {
                let found = match parse_id(id) {
                    Some(n) => broker.get(n).await,
                    None => Ok(None),
                };
                match found {
                    Ok(Some(r)) => reply(StatusCode::OK, json!({ "request": r })),
                    Ok(None) => error(StatusCode::NOT_FOUND, format!("no approval request #{id}")),
                    Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                }
            }
            Route::Decide(id, verdict) => {
                let Some(id) = parse_id(id) else {
                    return error(StatusCode::NOT_FOUND, format!("no approval request #{id}"));
                };
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("cannot read the request body: {e}"),
                        )
                    }
                };
                let comment = if body.iter().all(u8::is_ascii_whitespace) {
                    None
                } else {
                    match serde_json::from_slice::<Value>(&body) {
                        Ok(v) => match v.get("comment") {
                            None | Some(Value::Null) => None,
                            Some(Value::String(s)) => Some(s.clone()),
                            Some(_) => {
                                return error(StatusCode::BAD_REQUEST, "`comment` must be a string")
                            }
                        },
                        Err(e) => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                format!("the body must be JSON like {{\"comment\": \"...\"}}: {e}"),
                            )
                        }
                    }
                };
                match broker.decide(id, &who, verdict, comment).await {
                    Ok(r) => reply(StatusCode::OK, json!({ "request": r })),
                    Err(e) => {
                        let status = match e {
                            DecideError::NotFound(_) => StatusCode::NOT_FOUND,
                            DecideError::Closed { .. } | DecideError::AlreadyVoted(_) => {
                                StatusCode::CONFLICT
                            }
                            DecideError::Forbidden(_) => StatusCode::FORBIDDEN,
                            DecideError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                        };
                        error(status, e.to_string())
                    }
                }
            }
        }
    }
}

impl Admin {
    /// `GET /v1/status` (`status.rs`), for any caller the approvals API accepts.
    async fn status(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed on /v1/status", req.method()),
            );
        }
        if let Err(r) = self.caller(&req, false).await {
            return r;
        }
        match self.status.get() {
            Some(s) => reply(StatusCode::OK, s.report(self.broker.as_ref()).await),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is still starting",
            ),
        }
    }

    /// The approver behind a call: its bearer token if it has one, else the web page's session
    /// cookie (a state-changing call must then echo the session's CSRF token).
    async fn caller(
        &self,
        req: &Request<Incoming>,
        changes_state: bool,
    ) -> Result<Approver, Response<Full<Bytes>>> {
        let has_auth = req.headers().contains_key(hyper::header::AUTHORIZATION);
        if !has_auth {
            if let Web::On(w) = &self.web {
                if web::cookie(req.headers(), web::SESSION_COOKIE).is_some() {
                    let Some((who, csrf)) = w.session_approver(req.headers()) else {
                        return Err(error(
                            StatusCode::UNAUTHORIZED,
                            "the web session is unknown or has expired: sign in again at /ui/",
                        ));
                    };
                    if changes_state && !WebUi::csrf_ok(req.headers(), &csrf) {
                        return Err(error(
                            StatusCode::FORBIDDEN,
                            "missing or wrong X-Tollgate-CSRF header: a call authenticated by the session cookie that changes state must carry the session's CSRF token (from /ui/session)",
                        ));
                    }
                    return Ok(who);
                }
            }
        }
        let bearer = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_string());
        let Some(bearer) = bearer.filter(|t| !t.is_empty()) else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer <token>)",
            ));
        };
        match self.auth.authenticate(&bearer).await {
            Ok(w) => Ok(w),
            Err(e @ AuthError::Unauthenticated(_)) => {
                Err(error(StatusCode::UNAUTHORIZED, e.to_string()))
            }
            Err(e @ AuthError::Unavailable(_)) => {
                Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
            }
        }
    }
}

enum Route<'a> {
    List,
    Get(&'a str),
    Decide(&'a str, Verdict),
}
