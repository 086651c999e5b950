//! `[approvals] webhook`: a Slack-compatible JSON payload (`{"text": ...}` plus structured
//! fields) POSTed on each new request by a background task, with bounded retries and backoff.
//! The broker only enqueues (never awaits), so a slow or dead webhook cannot delay a request's
//! expiry. A full queue drops the notification with a warning.
//!
//! `https://` URLs (Slack, Teams, ...) are verified against the system CA bundle
//! (`SSL_CERT_FILE` overrides it); plain `http://` is for a relay on the host. Requests go out
//! through the agent's own HTTP client (`oidc::http_fetch_with`): one exchange per connection,
//! no redirects, the agent's socket mark (so they are never redirected to the agent itself),
//! bounded answers.

use std::{sync::Arc, time::Duration};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::ApprovalRequest;

/// Attempts per notification (the first plus retries).
pub const ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubled after each failure.
pub const BACKOFF: Duration = Duration::from_millis(500);
/// Per-attempt deadline.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a webhook URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL does not parse, or is not http(s) with a host.
    #[error("[approvals] webhook {0}: not a valid https:// or http:// URL")]
    Invalid(String),
}

/// Enqueues notifications for the background sender.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Value>,
}

/// Check the URL and start the sender task (needs a tokio runtime).
pub fn start(url: &str) -> Result<Notifier, WebhookError> {
    start_with(url, None)
}

/// [`start`], trusting `tls` instead of the system CA bundle for https:// (tests).
pub fn start_with(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Notifier, WebhookError> {
    let uri = check(url)?;
    let (tx, mut rx) = mpsc::channel::<Value>(256);
    tokio::spawn(async move {
        while let Some(payload) = rx.recv().await {
            send_with_retries(&uri, &payload, tls.clone()).await;
        }
    });
    Ok(Notifier { tx })
}

/// Validate a webhook URL: https:// or http://, with a host.
pub fn check(url: &str) -> Result<hyper::Uri, WebhookError> {
    match url.parse::<hyper::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some() => Ok(u),
        _ => Err(WebhookError::Invalid(url.to_string())),
    }
}

impl Notifier {
    pub fn notify(&self, r: &ApprovalRequest) {
        if let Err(e) = self.tx.try_send(payload(r)) {
            tracing::warn!(id = r.id, error = %e, "approval webhook queue full; notification dropped");
        }
    }
}

/// The Slack-compatible body: `text` for chat, the rest for machines.
pub fn payload(r: &ApprovalRequest) -> Value {
    let who = r.identity.as_deref().unwrap_or("unknown");
    let text = format!(
        "tollgate: approval #{id} requested: {who} wants to run `{op}` on {target} (rule \"{rule}\"{groups}); expires {expires}. Approve with `tollgate approvals approve {id}` or deny with `tollgate approvals deny {id} --comment ...`",
        id = r.id,
        op = r.operation,
        target = r.target,
        rule = r.rule,
        groups = if r.approvers.is_empty() {
            String::new()
        } else {
            format!(", approvers: {}", r.approvers.join(", "))
        },
        expires = r.expires,
    );
    json!({
        "text": text,
        "id": r.id,
        "identity": r.identity,
        "target": r.target,
        "protocol": r.protocol,
        "session": r.session,
        "operation": r.operation,
        "kind": r.kind,
        "rule": r.rule,
        "approvers": r.approvers,
        "min_approvals": r.min_approvals,
        "created": r.created,
        "expires": r.expires,
    })
}

async fn send_with_retries(
    uri: &hyper::Uri,
    payload: &Value,
    tls: Option<Arc<rustls::ClientConfig>>,
) {
    let body = payload.to_string().into_bytes();
    let mut backoff = BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let req = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "tollgate")
            .body(body.clone());
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook request");
                return;
            }
        };
        let sent = crate::oidc::http_fetch_with(req, tls.clone());
        let why = match tokio::time::timeout(ATTEMPT_TIMEOUT, sent).await {
            Ok(Ok(resp)) if resp.status().is_success() => return,
            Ok(Ok(resp)) => format!("HTTP {}", resp.status()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
        };
        tracing::warn!(%uri, attempt, error = %why, "approval webhook failed");
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    tracing::error!(%uri, "approval webhook gave up after {ATTEMPTS} attempts");
}
