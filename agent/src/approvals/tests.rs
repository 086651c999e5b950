use super::*;
use crate::approvals::auth::{LocalToken, LOCAL_SUBJECT};
use std::sync::Arc;

fn new_req(approvers: &[&str], min: u32, timeout: Duration) -> NewRequest {
    NewRequest {
        identity: Some("ci-bot".into()),
        workload_subject: None,
        target: "app-db".into(),
        protocol: "postgres".into(),
        session: "s-1".into(),
        operation: "DELETE FROM orders WHERE id = 1".into(),
        kind: "delete".into(),
        rule: "deletes need a human".into(),
        approvers: approvers.iter().map(|s| s.to_string()).collect(),
        min_approvals: min,
        timeout,
    }
}

fn who(subject: &str, groups: &[&str]) -> Approver {
    Approver {
        subject: subject.into(),
        groups: groups.iter().map(|s| s.to_string()).collect(),
        all_groups: false,
    }
}

fn broker() -> (Arc<Broker>, Arc<Metrics>) {
    let m = Metrics::new();
    (Arc::new(Broker::with_store(None, None, m.clone(), None)), m)
}

#[tokio::test]
async fn approve_wakes_the_waiter() {
    let (b, m) = broker();
    let mut t = b.open_request(new_req(&["dba"], 1, Duration::from_secs(60)));
    assert_eq!(m.approvals_pending.get(), 1);
    let id = t.id();
    let b2 = b.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        b2.decide(id, &who("alice", &["dba"]), Verdict::Approve, None)
            .expect("approve");
    });
    let r = t.wait().await;
    assert_eq!(r.status, Status::Approved);
    assert_eq!(r.approvals[0].subject, "alice");
    assert_eq!(m.approvals_pending.get(), 0);
    assert_eq!(m.approvals_total.with_label_values(&["approved"]).get(), 1);
    assert_eq!(m.approval_wait.get_sample_count(), 1);
    drop(t);
    // Not cancelled afterwards by the drop.
    assert_eq!(b.get(id).map(|r| r.status), Some(Status::Approved));
    assert_eq!(
        b.decide(id, &who("bob", &["dba"]), Verdict::Deny, None),
        Err(DecideError::Closed {
            id,
            status: "approved"
        })
    );
}

#[tokio::test]
async fn deny_carries_the_comment_and_expiry_denies() {
    let (b, m) = broker();
    let mut t = b.open_request(new_req(&[], 1, Duration::from_secs(60)));
    b.decide(
        t.id(),
        &who("bob", &[]),
        Verdict::Deny,
        Some("not during the freeze".into()),
    )
    .expect("deny");
    let r = t.wait().await;
    assert_eq!(r.status, Status::Denied);
    assert_eq!(
        r.denied_by.and_then(|v| v.comment).as_deref(),
        Some("not during the freeze")
    );
    let mut t = b.open_request(new_req(&[], 1, Duration::from_millis(50)));
    let r = t.wait().await;
    assert_eq!(r.status, Status::Expired);
    assert!(r.reason.as_deref().unwrap_or("").contains("expired after"));
    assert_eq!(m.approvals_total.with_label_values(&["expired"]).get(), 1);
    assert_eq!(m.approvals_total.with_label_values(&["denied"]).get(), 1);
}

#[tokio::test]
async fn dropping_the_ticket_cancels() {
    let (b, m) = broker();
    let t = b.open_request(new_req(&[], 1, Duration::from_secs(60)));
    let id = t.id();
    drop(t);
    assert_eq!(b.get(id).map(|r| r.status), Some(Status::Cancelled));
    assert_eq!(m.approvals_pending.get(), 0);
    assert_eq!(m.approvals_total.with_label_values(&["cancelled"]).get(), 1);
    // A waiter dropped mid-wait (the bot went away) cancels too.
    let mut t = b.open_request(new_req(&[], 1, Duration::from_secs(60)));
    let id = t.id();
    let _ = tokio::time::timeout(Duration::from_millis(20), t.wait()).await;
    drop(t);
    assert_eq!(b.get(id).map(|r| r.status), Some(Status::Cancelled));
}

#[tokio::test]
async fn approver_checks_leave_the_request_untouched() {
    let (b, _) = broker();
    let t = b.open_request(new_req(&["dba"], 2, Duration::from_secs(60)));
    let id = t.id();
    // Not in the group.
    let e = b
        .decide(id, &who("eve", &["dev"]), Verdict::Approve, None)
        .expect_err("eve is no dba");
    assert!(
        matches!(&e, DecideError::Forbidden(m) if m.contains("dba")),
        "{e}"
    );
    // The requesting identity itself.
    let e = b
        .decide(id, &who("ci-bot", &["dba"]), Verdict::Deny, None)
        .expect_err("self");
    assert!(
        matches!(&e, DecideError::Forbidden(m) if m.contains("own request")),
        "{e}"
    );
    let r = b.get(id).expect("still there");
    assert_eq!(r.status, Status::Pending);
    assert!(r.approvals.is_empty() && r.denied_by.is_none());
    // min_approvals = 2 needs two distinct subjects.
    let r = b
        .decide(id, &who("alice", &["dba"]), Verdict::Approve, None)
        .expect("first");
    assert_eq!(r.status, Status::Pending);
    assert!(matches!(
        b.decide(id, &who("alice", &["dba"]), Verdict::Approve, None),
        Err(DecideError::AlreadyVoted(_))
    ));
    let r = b
        .decide(id, &who("bob", &["dba", "x"]), Verdict::Approve, None)
        .expect("second");
    assert_eq!(r.status, Status::Approved);
    // The local admin token's approver is in every group.
    let t2 = b.open_request(new_req(&["dba"], 1, Duration::from_secs(60)));
    let root = Approver {
        subject: LOCAL_SUBJECT.into(),
        groups: vec![],
        all_groups: true,
    };
    assert_eq!(
        b.decide(t2.id(), &root, Verdict::Approve, None)
            .map(|r| r.status),
        Ok(Status::Approved)
    );
    drop(t);
    drop(t2);
    assert_eq!(
        b.decide(999, &root, Verdict::Approve, None),
        Err(DecideError::NotFound(999))
    );
}

#[tokio::test]
async fn store_survives_a_restart_and_pending_requests_expire() {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let guard = Dir(std::env::temp_dir().join(format!("tg-appr-{}", rand::random::<u64>())));
    let dir = guard.0.clone();
    let m = Metrics::new();
    let b = Arc::new(Broker::open(&dir, None, m.clone(), None).expect("open"));
    let t1 = b.open_request(new_req(&[], 1, Duration::from_secs(60)));
    let t2 = b.open_request(new_req(&[], 1, Duration::from_secs(60)));
    b.decide(t1.id(), &who("alice", &[]), Verdict::Approve, None)
        .expect("approve");
    let (id1, id2) = (t1.id(), t2.id());
    // Simulate a crash: the tickets are never dropped normally.
    std::mem::forget(t1);
    std::mem::forget(t2);
    b.flush();
    drop(b);
    let b = Broker::open(&dir, None, Metrics::new(), None).expect("reopen");
    let (pending, recent) = b.list();
    assert!(pending.is_empty());
    assert_eq!(b.get(id1).map(|r| r.status), Some(Status::Approved));
    let r2 = b.get(id2).expect("kept in history");
    assert_eq!(r2.status, Status::Expired);
    assert!(r2.reason.as_deref().unwrap_or("").contains("restarted"));
    assert_eq!(recent.len(), 2);
    let b = Arc::new(b);
    let t3 = b.open_request(new_req(&[], 1, Duration::from_secs(60)));
    assert!(t3.id() > id2, "ids keep counting across restarts");
    drop(t3);
    // Written out before the directory goes, so no late write re-creates it.
    b.flush();
    drop(b);
    drop(guard);
}

#[tokio::test]
async fn history_is_bounded() {
    let (b, _) = broker();
    for _ in 0..HISTORY + 10 {
        drop(b.open_request(new_req(&[], 1, Duration::from_secs(60))));
    }
    let (pending, recent) = b.list();
    assert!(pending.is_empty());
    assert_eq!(recent.len(), HISTORY);
}

#[tokio::test]
async fn api_authenticates_and_authorizes() {
    let (b, _) = broker();
    let admin = Arc::new(api::Admin {
        broker: Some(b.clone()),
        auth: Arc::new(LocalToken::new("t".repeat(40))),
        web: crate::approvals::web::Web::Off("no OIDC in this test".into()),
        audit: None,
        status: std::sync::OnceLock::new(),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let server = tokio::spawn(api::serve(l, admin));
    let mut t = b.open_request(new_req(&["dba"], 1, Duration::from_secs(60)));
    let id = t.id();
    let good = "t".repeat(40);
    use hyper::Method;
    // Bad token: 401 with a reason, request untouched.
    let e = client::call(
        addr,
        "forged",
        Method::POST,
        &format!("/v1/approvals/{id}/approve"),
        None,
    )
    .await
    .expect_err("401");
    assert!(
        matches!(&e, client::ClientError::Refused { status: 401, message } if message.contains("admin token")),
        "{e}"
    );
    assert_eq!(b.get(id).map(|r| r.status), Some(Status::Pending));
    // Listing and reading.
    let v = client::call(addr, &good, Method::GET, "/v1/approvals", None)
        .await
        .expect("list");
    assert!(client::render_list(&v)
        .expect("render")
        .contains("DELETE FROM orders"));
    let v = client::call(
        addr,
        &good,
        Method::GET,
        &format!("/v1/approvals/{id}"),
        None,
    )
    .await
    .expect("get");
    assert_eq!(client::request_of(&v).expect("request").id, id);
    let e = client::call(addr, &good, Method::GET, "/v1/approvals/999", None)
        .await
        .expect_err("404");
    assert!(
        matches!(e, client::ClientError::Refused { status: 404, .. }),
        "{e}"
    );
    // Bad body.
    let e = client::call(
        addr,
        &good,
        Method::POST,
        &format!("/v1/approvals/{id}/deny"),
        Some(serde_json::json!({"comment": 5})),
    )
    .await
    .expect_err("400");
    assert!(
        matches!(e, client::ClientError::Refused { status: 400, .. }),
        "{e}"
    );
    // Deny with a comment.
    let v = client::call(
        addr,
        &good,
        Method::POST,
        &format!("/v1/approvals/{id}/deny"),
        Some(serde_json::json!({"comment": "use the archive job"})),
    )
    .await
    .expect("deny");
    assert_eq!(client::request_of(&v).expect("r").status, Status::Denied);
    let r = t.wait().await;
    assert_eq!(
        r.denied_by.map(|v| v.subject).as_deref(),
        Some(LOCAL_SUBJECT)
    );
    let e = client::call(
        addr,
        &good,
        Method::POST,
        &format!("/v1/approvals/{id}/approve"),
        None,
    )
    .await
    .expect_err("409");
    assert!(
        matches!(e, client::ClientError::Refused { status: 409, .. }),
        "{e}"
    );
    server.abort();
}

#[tokio::test]
async fn webhook_retries_until_accepted() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            n += 1;
            // The first attempt fails with a 500; the retry is accepted.
            let status = if n == 1 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            if let Some(body) = answer_one(&mut s, status).await {
                let _ = tx.send(body);
            }
        }
    });
    let n = webhook::start(&format!("http://{addr}/hook")).expect("webhook");
    assert!(webhook::start("ftp://hooks.example/x").is_err());
    assert!(webhook::start("https:///x").is_err());
    let m = Metrics::new();
    let b = Arc::new(Broker::with_store(None, None, m, Some(n)));
    let t = b.open_request(new_req(&["dba"], 1, Duration::from_secs(60)));
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("first attempt")
        .expect("body");
    let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("retry")
        .expect("body");
    assert_eq!(first, second);
    let v: serde_json::Value = serde_json::from_str(&first).expect("json");
    assert!(
        v["text"]
            .as_str()
            .unwrap_or("")
            .contains("approvals approve 1"),
        "{v}"
    );
    assert_eq!(v["id"], 1);
    assert_eq!(b.get(t.id()).map(|r| r.status), Some(Status::Pending));
    drop(t);
}

/// The rules both stores share (the PostgreSQL store runs them inside its row lock).
#[test]
fn apply_verdict_counts_distinct_subjects_and_refuses_the_requester() {
    let (b, _) = broker();
    let t = b.open_request(new_req(&["dba"], 2, Duration::from_secs(60)));
    let mut r = b.get(t.id()).expect("request");
    let before = r.clone();
    // The requesting identity may not vote, and the request is left as it was.
    let e = apply_verdict(&mut r, &who("ci-bot", &["dba"]), Verdict::Approve, None, 1)
        .expect_err("self-approval");
    assert!(matches!(e, DecideError::Forbidden(_)), "{e}");
    assert_eq!(r, before);
    // Not in the group.
    assert!(matches!(
        apply_verdict(&mut r, &who("eve", &["dev"]), Verdict::Approve, None, 1),
        Err(DecideError::Forbidden(_))
    ));
    // First vote: still pending; the same subject again (from any host): refused.
    let (s, v) =
        apply_verdict(&mut r, &who("alice", &["dba"]), Verdict::Approve, None, 2).expect("vote");
    assert_eq!((s, v.subject.as_str()), (None, "alice"));
    assert!(matches!(
        apply_verdict(&mut r, &who("alice", &["dba"]), Verdict::Approve, None, 3),
        Err(DecideError::AlreadyVoted(_))
    ));
    assert_eq!(r.approvals.len(), 1);
    // A second, distinct subject decides it.
    let (s, _) = apply_verdict(&mut r, &who("bob", &["dba"]), Verdict::Approve, None, 4)
        .expect("second vote");
    assert_eq!(s, Some(Status::Approved));
    // A deny records its approver and a non-blank comment only.
    let mut r2 = before.clone();
    let (s, _) = apply_verdict(
        &mut r2,
        &who("carol", &["dba"]),
        Verdict::Deny,
        Some("  ".into()),
        5,
    )
    .expect("deny");
    assert_eq!(s, Some(Status::Denied));
    assert_eq!(
        r2.denied_by.map(|v| (v.subject, v.comment)),
        Some(("carol".into(), None))
    );
}

/// Reads one HTTP/1.1 request (headers plus a Content-Length body) and answers `status`.
async fn answer_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16384];
    let body = loop {
        let k = s.read(&mut buf).await.ok()?;
        if k == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..k]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(i) = text.find("\r\n\r\n") {
            let len = text
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                })
                .unwrap_or(0);
            if got.len() >= i + 4 + len {
                break text[i + 4..].to_string();
            }
        }
    };
    s.write_all(
        format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let _ = s.shutdown().await;
    Some(body)
}

#[tokio::test]
async fn https_webhook_is_verified_and_delivered() {
    let dir = std::env::temp_dir().join(format!("tg-webhook-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Arc::new(crate::tls::Ca::load_or_create(&dir).expect("ca"));
    let ip: std::net::IpAddr = "127.0.0.1".parse().expect("ip");
    let acceptor =
        tokio_rustls::TlsAcceptor::from(ca.server_config(ip, &crate::tls::ServerTls::postgres()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let got = match acceptor.accept(s).await {
                Ok(mut tls) => answer_one(&mut tls, "200 OK").await,
                Err(_) => None, // the client refused our certificate
            };
            let _ = tx.send(got);
        }
    });
    let trusting = |pem: &str| {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.expect("pem")).expect("root");
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    };
    let url = format!("https://{addr}/hook");
    // One request opened with a webhook trusting `tls`: what the receiver got (None: the
    // handshake failed there).
    let mut notify = async |tls| {
        let n = webhook::start_with(&url, Some(tls)).expect("webhook");
        let b = Arc::new(Broker::with_store(None, None, Metrics::new(), Some(n)));
        let _t = b.open_request(new_req(&["dba"], 1, Duration::from_secs(60)));
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an attempt")
            .expect("channel")
    };

    // Trusting the server's CA: delivered over TLS.
    let body = notify(trusting(ca.pem()))
        .await
        .expect("a request over TLS");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        v["text"].as_str().unwrap_or("").contains("approval #1"),
        "{v}"
    );

    // Trusting another CA: the certificate is refused and nothing is sent.
    let other_dir = dir.join("other");
    let other = crate::tls::Ca::load_or_create(&other_dir).expect("other ca");
    let refused = notify(trusting(other.pem())).await;
    assert!(
        refused.is_none(),
        "no request over an unverified TLS connection"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
