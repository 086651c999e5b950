//! The CLI side of the approvals API (`tollgate approvals ...`): one HTTP/1 call to the
//! agent's admin listener, rendered for a human.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::ApprovalRequest;

/// Why a CLI call failed; the message is what the user sees.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent is not listening or the call timed out.
    #[error("cannot reach the agent's admin API at {addr}: {why} (is `tollgate run` up, and is [agent] admin set?)")]
    Connect { addr: SocketAddr, why: String },
    /// The agent refused the call (401, 403, 404, 409, ...).
    #[error("the agent refused the call (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// The answer was not what the API documents.
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

/// Call `method path` with a bearer token and an optional JSON body; the JSON answer.
pub async fn call(
    addr: SocketAddr,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    let conn_err = |why: String| ClientError::Connect { addr, why };
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| conn_err(e.to_string()))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!(
                "HTTP {status}, body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            ))
        })?;
        if status != StatusCode::OK {
            return Err(ClientError::Refused {
                status: status.as_u16(),
                message: v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("(no reason given)")
                    .to_string(),
            });
        }
        Ok(v)
    };
    match tokio::time::timeout(Duration::from_secs(15), fut).await {
        Ok(r) => r,
        Err(_) => Err(conn_err("no answer within 15s".into())),
    }
}

/// The request in an API answer (`{"request": {...}}`).
pub fn request_of(v: &Value) -> Result<ApprovalRequest, ClientError> {
    serde_json::from_value(v.get("request").cloned().unwrap_or(Value::Null))
        .map_err(|e| ClientError::Protocol(format!("no request in the answer: {e}")))
}

fn list_of(v: &Value, key: &str) -> Result<Vec<ApprovalRequest>, ClientError> {
    serde_json::from_value(v.get(key).cloned().unwrap_or(Value::Array(vec![])))
        .map_err(|e| ClientError::Protocol(format!("bad `{key}` list: {e}")))
}

fn clip(s: &str, n: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        format!("{}...", one_line.chars().take(n).collect::<String>())
    }
}

/// One line per request.
pub fn line(r: &ApprovalRequest) -> String {
    let detail = match r.status {
        super::Status::Pending => format!(
            "expires {}, {}/{} approvals",
            r.expires,
            r.approvals.len(),
            r.min_approvals
        ),
        super::Status::Approved => format!(
            "by {}",
            r.approvals
                .iter()
                .map(|v| v.subject.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        super::Status::Denied => match &r.denied_by {
            Some(v) => format!(
                "by {}{}",
                v.subject,
                v.comment
                    .as_deref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            ),
            None => String::new(),
        },
        _ => r.reason.clone().unwrap_or_default(),
    };
    // In a shared store, which agent's bot waits on it.
    let on = r
        .holder
        .as_deref()
        .map(|h| format!("  (on {h})"))
        .unwrap_or_default();
    format!(
        "#{:<5} {:<9} {:<16} {:<16} {:<40} rule \"{}\"  {}{on}",
        r.id,
        r.status.as_str(),
        r.identity.as_deref().unwrap_or("unknown"),
        r.target,
        clip(&r.operation, 40),
        r.rule,
        detail
    )
}

/// `tollgate approvals list` output.
pub fn render_list(v: &Value) -> Result<String, ClientError> {
    let pending = list_of(v, "pending")?;
    let recent = list_of(v, "recent")?;
    let mut out = String::new();
    if pending.is_empty() {
        out.push_str("no pending approval requests\n");
    } else {
        out.push_str(&format!("pending ({}):\n", pending.len()));
        for r in &pending {
            out.push_str(&format!("  {}\n", line(r)));
        }
    }
    if !recent.is_empty() {
        out.push_str(&format!("recent ({}):\n", recent.len().min(20)));
        for r in recent.iter().take(20) {
            out.push_str(&format!("  {}\n", line(r)));
        }
    }
    Ok(out)
}
