//! The approvals web page (`/ui/` on the admin listener) on a real kernel, with a real
//! PostgreSQL, the real OIDC provider (npm `oidc-provider`) and headless Chromium: a bot's
//! psql DELETE is held; the browser opens `/ui/`, is sent to the IdP, logs in (authorization
//! code + PKCE), sees the request and clicks Approve; the DELETE completes.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use vm_tests::{
    browser::Browser,
    oidc::OidcProvider,
    pg::{app_target, PgServer, APP_PASSWORD},
    psql::Psql,
    require_root, wait_for, AgentProc, Cgroup, FailMode, TempDir,
};

fn policy(
    pg: &PgServer,
    bot: &Cgroup,
    secret: &Path,
    issuer: &str,
    client_secret: &Path,
) -> String {
    format!(
        r#"[approvals]
[approvals.oidc]
issuer = "{issuer}"
client_id = "tollgate"
client_secret_file = "{client_secret}"
audience = "tollgate"
groups_claim = "groups"

[[identity]]
name = "ci-bot"
cgroup = "{glob}"

{target}
[[rule]]
name = "ci reads and writes rows"
identities = ["ci-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "insert", "update", "set", "show", "begin", "commit", "rollback"] }}

[[rule]]
name = "deletes need a dba"
identities = ["ci-bot"]
targets = ["app-db"]
action = "approve"
sql = {{ statements = ["delete"] }}
approvers = ["dba"]
timeout = "5m"
"#,
        glob = bot.glob(),
        target = app_target(pg, secret, ""),
        client_secret = client_secret.display(),
    )
}

/// One HTTP/1.1 exchange (Connection: close): (status, head, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

fn count(pg: &PgServer, sql: &str) -> String {
    pg.superuser_sql(sql, "app").trim().to_string()
}

/// `target/test-artefacts` of this workspace (kept after the test's temp dirs are gone).
fn artefacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artefacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artefacts");
    dir.canonicalize().unwrap_or(dir)
}

/// Log in through the provider's form after `/ui/` sent the browser there; wait for the page.
fn login(b: &Browser, admin: SocketAddr, idp: &OidcProvider, user: &str) {
    b.goto(&format!("http://{admin}/ui/"));
    let at = b.wait_url("the IdP's login page", |u| u.starts_with(idp.issuer()));
    assert!(at.contains("/interaction/"), "{at}");
    b.type_into("#username", user);
    b.type_into("#password", &format!("{user}-pw"));
    b.click("#submit");
    b.wait_url("back on /ui/", |u| u == format!("http://{admin}/ui/"));
    b.wait_text("#who", "the signed-in approver", |t| t.contains(user));
}

#[test]
fn web_page_logs_in_with_oidc_and_approves_a_held_delete() {
    require_root();
    let tag = "apweb";
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, vm_tests::free_port()));
    let callback = format!("http://{admin}/ui/callback");
    let idp = OidcProvider::start_with(tag, &[&callback]);
    let pg = PgServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let dir = TempDir::new(&format!("{tag}-secret"));
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let client_secret = dir.path().join("oidc-client");
    std::fs::write(&client_secret, idp.client_secret("tollgate")).expect("client secret");
    let agent = AgentProc::start_with_admin_at(
        tag,
        FailMode::Closed,
        &policy(&pg, &bot, &secret, idp.issuer(), &client_secret),
        admin,
    );
    wait_for(Duration::from_secs(10), "the admin API", || {
        matches!(
            vm_tests::http_get(admin, "/healthz", Duration::from_secs(2)),
            Ok((200, _))
        )
        .then_some(())
    });

    // Without a session: /ui/ sends the browser to /ui/login, which goes to the IdP with
    // state, nonce and an S256 PKCE challenge; the page's headers forbid framing and inline
    // script.
    let (status, head, _) = http(admin, "GET", "/ui/", &[], "");
    assert_eq!(status, 303, "{head}");
    assert_eq!(header(&head, "location"), ["/ui/login"], "{head}");
    let csp = header(&head, "content-security-policy").join(" ");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{head}"
    );
    assert_eq!(header(&head, "x-frame-options"), ["DENY"], "{head}");
    let (status, head, _) = http(admin, "GET", "/ui/login", &[], "");
    assert_eq!(status, 303, "{head}");
    let to = header(&head, "location").join("");
    assert!(to.starts_with(&format!("{}/auth?", idp.issuer())), "{to}");
    for p in [
        "code_challenge_method=S256",
        "code_challenge=",
        "state=",
        "nonce=",
        "response_type=code",
        "client_id=tollgate",
    ] {
        assert!(to.contains(p), "{p} missing in {to}");
    }
    // The API refuses a made-up session cookie.
    let (status, _, body) = http(
        admin,
        "GET",
        "/v1/approvals",
        &[("Cookie", "tollgate_session=00")],
        "",
    );
    assert_eq!(status, 401, "{body}");

    let mut p = Psql::spawn(
        &bot,
        pg.port,
        "wrong-on-purpose",
        &["-c", "DELETE FROM orders WHERE id = 1"],
    );
    let id = p.approval_id();
    let row = format!("#req-{id}");

    // carol (dev) sees the request, but her approval is refused with a 403 on the page.
    {
        let b = Browser::start(&format!("{tag}-carol"));
        login(&b, admin, &idp, "carol");
        let op = b.text(&format!("{row} td.operation"));
        assert!(op.contains("DELETE FROM orders"), "{op}");
        b.click(&format!("{row} button.approve"));
        let msg = b.wait_text("#message", "the refusal on the page", |t| {
            t.contains("HTTP")
        });
        assert!(msg.contains("403"), "{msg}");
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM orders WHERE id = 1"), "1");

    // alice (dba).
    let b = Browser::start(&format!("{tag}-alice"));
    login(&b, admin, &idp, "alice");
    let op = b.text(&format!("{row} td.operation"));
    assert!(op.contains("DELETE FROM orders"), "{op}");
    assert!(b.text(&row).contains("ci-bot"));
    let shot = artefacts_dir().join("approvals-ui.png");
    b.screenshot(&shot);
    eprintln!("screenshot of the approvals page: {}", shot.display());

    // The session cookie: HttpOnly, SameSite=Strict, Path=/ (not Secure: plain http here).
    let c = b.cookie("tollgate_session");
    assert_eq!(c["httpOnly"], true, "{c}");
    assert_eq!(c["sameSite"], "Strict", "{c}");
    assert_eq!(c["path"], "/", "{c}");
    let cookie = format!(
        "tollgate_session={}",
        c["value"].as_str().expect("cookie value")
    );
    // With the cookie: reads work; a POST without (or with a wrong) CSRF header is refused.
    let (status, _, body) = http(admin, "GET", "/v1/approvals", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    let approve = format!("/v1/approvals/{id}/approve");
    let (status, _, body) = http(admin, "POST", &approve, &[("Cookie", &cookie)], "{}");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _, body) = http(
        admin,
        "POST",
        &approve,
        &[("Cookie", &cookie), ("X-Tollgate-CSRF", "guess")],
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = http(admin, "GET", "/ui/session", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    let session: Value = serde_json::from_str(&body).expect("session JSON");
    assert_eq!(session["subject"], "alice", "{session}");
    assert_eq!(session["groups"], serde_json::json!(["dba"]), "{session}");
    assert_eq!(count(&pg, "SELECT count(*) FROM orders WHERE id = 1"), "1");

    // alice clicks Approve: the held DELETE runs.
    b.click(&format!("{row} button.approve"));
    let msg = b.wait_text("#message", "the approval on the page", |t| {
        t.contains(&format!("#{id}"))
    });
    assert!(msg.contains("approved"), "{msg}");
    let (ok, text) = p.finish();
    assert!(
        ok && text.contains("DELETE 1"),
        "{text}\n--- agent ---\n{}",
        agent.stderr_text()
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM orders WHERE id = 1"), "0");
    let ev = agent.wait_audit("approval approved", |e| {
        e["event"] == "approval" && e["action"] == "approved"
    });
    assert_eq!(ev["approver"], "alice", "{ev}");
    assert_eq!(ev["approval_id"], id, "{ev}");
    // The page moves it to the recent list.
    b.wait_text("#recent", "the decided request under Recent", |t| {
        t.contains(&format!("#{id}")) && t.contains("approved")
    });

    // Bot-supplied text is shown as text, never as markup; Deny asks for a comment, which the
    // bot gets with its 42501.
    let mut p = Psql::spawn(
        &bot,
        pg.port,
        "wrong-on-purpose",
        &["-c", "DELETE FROM orders WHERE id = 2 /* <b id=\"injected\">x</b><img src=x onerror=\"document.title='pwned'\"> */"],
    );
    let id2 = p.approval_id();
    let row2 = format!("#req-{id2}");
    let op = b.text(&format!("{row2} td.operation"));
    assert!(op.contains("<b id=\"injected\">x</b>"), "{op}");
    let src = b.source();
    assert!(
        !src.contains("<b id=\"injected\""),
        "bot text became markup: {src}"
    );
    b.click(&format!("{row2} button.deny"));
    b.click(&format!("{row2} button.confirm-deny"));
    let msg = b.wait_text("#message", "the empty comment refused", |t| {
        t.contains("comment")
    });
    assert!(msg.contains(&format!("#{id2}")), "{msg}");
    b.type_into(&format!("{row2} input.comment"), "not during the freeze");
    b.click(&format!("{row2} button.confirm-deny"));
    b.wait_text("#message", "the denial on the page", |t| {
        t.contains("denied")
    });
    let (ok, text) = p.finish();
    assert!(
        !ok && text.contains("42501") && text.contains("not during the freeze"),
        "{text}"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM orders WHERE id = 2"), "1");
    let ev = agent.wait_audit("approval denied", |e| {
        e["event"] == "approval" && e["action"] == "denied"
    });
    assert_eq!(ev["approver"], "alice", "{ev}");

    // Logout (CSRF-protected) ends the session server-side.
    let csrf = session["csrf"].as_str().expect("csrf").to_string();
    let (status, _, body) = http(admin, "POST", "/ui/logout", &[("Cookie", &cookie)], "");
    assert_eq!(status, 403, "logout without CSRF: {body}");
    let (status, head, body) = http(
        admin,
        "POST",
        "/ui/logout",
        &[("Cookie", &cookie), ("X-Tollgate-CSRF", &csrf)],
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        header(&head, "set-cookie")
            .iter()
            .any(|c| c.starts_with("tollgate_session=;") && c.contains("Max-Age=0")),
        "{head}"
    );
    let (status, _, body) = http(admin, "GET", "/v1/approvals", &[("Cookie", &cookie)], "");
    assert_eq!(status, 401, "{body}");
    // No session id or token in the agent's log.
    let log = agent.stderr_text();
    assert!(
        !log.contains(&cookie["tollgate_session=".len()..]),
        "session id in the agent log"
    );
    assert!(!log.contains(&csrf), "CSRF token in the agent log");
}
