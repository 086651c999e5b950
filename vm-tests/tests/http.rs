//! HTTPS through tollgate, per request: unmodified curl (HTTP/1.1 and HTTP/2) and a raw TLS
//! client as the unprivileged bot in a bot cgroup, a real HTTPS server on loopback (Python's
//! http.server + ssl) that logs what reaches it. The bot trusts the agent's CA (`--cacert`);
//! the agent verifies the server against the target's `tls.ca_file` and injects its token.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Output};

use serde_json::{json, Value};
use vm_tests::{
    http::{raw_client, statuses, ws_client, HttpsServer},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

const TOKEN: &str = "tg-upstream-token-5f1e";
const STOLEN: &str = "stolen-bot-token-77aa";

fn policy(bot: &Cgroup, srv: &HttpsServer, token: &Path) -> String {
    billing_policy(
        bot,
        srv,
        &format!("token_file = \"{}\"", token.display()),
        "\"GET\", \"POST\"",
    )
}

/// The `billing` target with `credential` as its credential's keys, read by `ci-bot` with
/// `methods` under `/api/v1/*`; DELETE denied.
fn billing_policy(bot: &Cgroup, srv: &HttpsServer, credential: &str, methods: &str) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

[[target]]
name = "billing"
protocol = "https"
address = ["127.0.0.1:{port}"]
credential = "billing-api"
tls = {{ mode = "verify-full", ca_file = "{ca}", server_name = "localhost" }}

[credential.billing-api]
{credential}

[[rule]]
name = "ci reads the v1 API"
identities = ["ci-bot"]
targets = ["billing"]
action = "allow"
http = {{ methods = [{methods}], paths = ["/api/v1/*"] }}

[[rule]]
name = "nobody deletes"
identities = ["ci-bot"]
targets = ["billing"]
action = "deny"
http = {{ methods = ["DELETE"] }}
"#,
        glob = bot.glob(),
        port = srv.port,
        ca = srv.ca_file.display(),
    )
}

fn world_readable(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

/// The agent's CA in a directory the bot can read: (that directory, the CA file).
fn agent_ca_for_bot(tag: &str, agent: &AgentProc) -> (TempDir, std::path::PathBuf) {
    let trust = TempDir::new(&format!("{tag}-trust"));
    let pem = std::fs::read_to_string(agent.data_dir.join("ca/ca.pem")).expect("agent CA");
    let ca = world_readable(&trust, "tollgate-ca.pem", &pem);
    (trust, ca)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `/usr/bin/python3 ARGS` as the bot, with a clean environment.
fn python(bot: &Cgroup, args: &[&std::ffi::OsStr]) -> Output {
    bot.command(Path::new("/usr/bin/python3"))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("python3")
}

/// curl as the bot; prints the body, then a line `<status> <http version>`.
fn curl(bot: &Cgroup, ca: &Path, args: &[&str]) -> (u16, String, String) {
    let out = bot
        .command(Path::new("/usr/bin/curl"))
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {STOLEN}")])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = s.rsplit_once('\n').unwrap_or(("", &s));
    let mut t = tail.split(' ');
    let code = t.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let version = t.next().unwrap_or("").to_string();
    assert!(code != 0, "curl {args:?} failed: {}", text(&out));
    (code, body.to_string(), version)
}

/// `curl URL` as `bot`, trusting only `ca`, with `host:port:addr` as `resolve`: it must fail
/// (no HTTP status at all: refused at connect or in the TLS handshake).
fn curl_fails(bot: &Cgroup, ca: &Path, resolve: &str, url: &str) {
    let out = bot
        .command(Path::new("/usr/bin/curl"))
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["--resolve", resolve, url])
        .env_clear()
        .output()
        .expect("curl");
    assert!(!out.status.success(), "{}", text(&out));
}

/// A server, a bot cgroup, the target's token file, the agent (with `extra` rules, and the
/// admin API when `admin`) and the agent's CA where the bot can read it.
struct Fixture {
    srv: HttpsServer,
    bot: Cgroup,
    files: TempDir,
    agent: AgentProc,
    trust: TempDir,
    ca: std::path::PathBuf,
}

fn fixture(tag: &str, extra: &str, admin: bool) -> Fixture {
    require_root();
    let srv = HttpsServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let files = TempDir::new(&format!("{tag}-files"));
    let token = files.path().join("billing.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let body = format!("{}{extra}", policy(&bot, &srv, &token));
    let agent = if admin {
        AgentProc::start_with_admin(tag, FailMode::Closed, &body)
    } else {
        AgentProc::start(tag, FailMode::Closed, &body)
    };
    let pem = std::fs::read_to_string(agent.data_dir.join("ca/ca.pem")).expect("agent CA");
    let trust = TempDir::new(&format!("{tag}-trust"));
    let ca = world_readable(&trust, "tollgate-ca.pem", &pem);
    Fixture {
        srv,
        bot,
        files,
        agent,
        trust,
        ca,
    }
}

#[test]
fn https_requests_are_decided_one_by_one_with_the_token_injected() {
    let Fixture {
        srv,
        bot,
        files,
        agent,
        trust: _trust,
        ca,
    } = fixture("http-basic", "", false);
    let base = format!("https://localhost:{}", srv.port);
    // curl resolves localhost to 127.0.0.1 (the target address) and sends SNI localhost.
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);

    for (flag, want_version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let url = format!("{base}/api/v1/invoices?limit=5");
        let (code, body, version) = curl(&bot, &ca, &[flag, "--resolve", &resolve, &url]);
        assert_eq!((code, version.as_str()), (200, want_version), "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["path"], "/api/v1/invoices?limit=5", "{v}");

        // Outside the allowed paths: a 403 with a JSON body, the upstream never asked.
        let url = format!("{base}/admin/users");
        let (code, body, _) = curl(&bot, &ca, &[flag, "--resolve", &resolve, &url]);
        assert_eq!(code, 403, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("tollgate: GET /admin/users denied")),
            "{v}"
        );
        // A deny rule is named.
        let url = format!("{base}/api/v1/invoices/7");
        let (code, body, _) = curl(
            &bot,
            &ca,
            &[flag, "--resolve", &resolve, "-X", "DELETE", &url],
        );
        assert_eq!(code, 403, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["rule"], "nobody deletes", "{v}");

        // An upload streams through (chunked, 8 MiB) and arrives whole.
        let big = files.path().join("upload.bin");
        std::fs::write(&big, vec![b'x'; 8 << 20]).expect("upload");
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let url = format!("{base}/api/v1/uploads");
        let data = format!("@{}", big.display());
        let (code, body, _) = curl(
            &bot,
            &ca,
            &[
                flag,
                "--resolve",
                &resolve,
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &data,
                &url,
            ],
        );
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["bytes"], 8 << 20, "{v}");
        std::fs::remove_file(&big).expect("rm");
    }

    // Python requests (Debian's python3-requests), as unmodified as curl.
    let script = format!(
        "import json, requests\n\
         s = requests.Session()\n\
         out = []\n\
         for p in ['/api/v1/invoices/9', '/api/v1/../../admin']:\n\
         \x20   r = s.get('https://localhost:{port}' + p, verify='{ca}', headers={{'Authorization': 'Bearer {STOLEN}'}})\n\
         \x20   out.append([r.status_code, r.json()])\n\
         print(json.dumps(out))\n",
        port = srv.port,
        ca = ca.display()
    );
    let out = python(&bot, &["-c".as_ref(), script.as_ref()]);
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v[0][0], 200, "{v}");
    assert_eq!(v[0][1]["path"], "/api/v1/invoices/9", "{v}");
    // requests resolves dot segments itself (RFC 3986) and sends /admin: denied.
    assert_eq!(v[1][0], 403, "{v}");

    let log = srv.access_log();
    assert_eq!(log.len(), 5, "{log:#?}");
    for e in &log {
        assert_eq!(e["authorization"], format!("Bearer {TOKEN}"), "{e}");
        assert!(
            e["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/api/v1/")),
            "{e}"
        );
    }
    // The stolen header never went anywhere: not upstream, not the audit, not a recording.
    let audit = std::fs::read_to_string(agent.audit_path()).expect("audit");
    assert!(!audit.contains(STOLEN) && !audit.contains(TOKEN));
    let mut requests = 0;
    for f in std::fs::read_dir(agent.data_dir.join("sessions")).expect("sessions") {
        let t = std::fs::read_to_string(f.expect("entry").path()).expect("recording");
        assert!(!t.contains(STOLEN) && !t.contains(TOKEN));
        for l in t.lines() {
            let v: Value = serde_json::from_str(l).expect("line");
            if v["event"] == "request" {
                requests += 1;
                assert!(v["status"].is_u64() && v["duration_ms"].is_number(), "{v}");
            }
        }
    }
    assert_eq!(requests, 10);
    let allowed = agent.metric(
        "tollgate_decisions_total",
        &[("target", "billing"), ("action", "allow")],
    );
    assert!(allowed >= 4.0, "{allowed}");
    let timed = agent.metric(
        "tollgate_http_request_duration_seconds_count",
        &[("target", "billing"), ("protocol", "https")],
    );
    assert_eq!(timed, 10.0, "one observation per request");
}

/// An upstream that echoes what it receives (a debug endpoint, `TRACE`) would hand the bot the
/// token the agent injects: every echo of it, in headers, cut across body chunks, base64- or
/// percent-encoded, comes back masked to the same length, and an answer compressed against
/// the agent's wish is refused rather than passed unchecked.
#[test]
fn an_upstream_echoing_the_request_never_hands_the_bot_the_token() {
    let extra = r#"
[[rule]]
name = "ci may trace"
identities = ["ci-bot"]
targets = ["billing"]
action = "allow"
http = { methods = ["TRACE"], paths = ["/api/v1/*"] }
"#;
    let Fixture {
        srv,
        bot,
        files: _files,
        agent,
        trust: _trust,
        ca,
    } = fixture("http-echo", extra, false);
    let base = format!("https://localhost:{}", srv.port);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(TOKEN);
    let masked = "*".repeat(TOKEN.len());
    for flag in ["--http1.1", "--http2"] {
        // -i: the answer's headers are printed before its body.
        let url = format!("{base}/api/v1/echo");
        let (code, out, _) = curl(
            &bot,
            &ca,
            &[flag, "-i", "--compressed", "--resolve", &resolve, &url],
        );
        assert_eq!(code, 200, "{out}");
        assert!(!out.contains(TOKEN) && !out.contains(&b64), "{out}");
        let (head, body) = out.split_once("\r\n\r\n").expect("headers then body");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("x-echo-authorization: bearer {masked}")),
            "{head}"
        );
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        // hyper sends header names in lowercase.
        assert_eq!(
            v["headers"]["authorization"],
            format!("Bearer {masked}"),
            "{v}"
        );
        // Base64's padding may stay: it is no part of the secret.
        assert_eq!(
            v["b64"].as_str().map(|b| b.trim_end_matches('=')),
            Some("*".repeat(b64.trim_end_matches('=').len()).as_str()),
            "{v}"
        );

        // TRACE echoes the request as the server got it.
        let url = format!("{base}/api/v1/trace-me");
        let (code, body, _) = curl(
            &bot,
            &ca,
            &[flag, "-X", "TRACE", "--resolve", &resolve, &url],
        );
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("TRACE /api/v1/trace-me"), "{body}");
        assert!(!body.contains(TOKEN) && !body.contains(STOLEN), "{body}");
        assert!(body.contains(&format!("Bearer {masked}")), "{body}");

        // Compressed although the agent asked for no compression: refused, not passed.
        let url = format!("{base}/api/v1/echo-gz");
        let (code, body, _) = curl(
            &bot,
            &ca,
            &[flag, "--compressed", "--resolve", &resolve, &url],
        );
        assert_eq!(code, 502, "{body}");
        assert!(body.contains("compressed"), "{body}");
        assert!(!body.contains(TOKEN));
    }
    // Another virtual host behind the target's address (SNI and Host alike): the credential
    // is not sent there.
    let evil = format!("evil.internal:{}:127.0.0.1", srv.port);
    let url = format!("https://evil.internal:{}/api/v1/echo", srv.port);
    let (code, body, _) = curl(&bot, &ca, &["--resolve", &evil, &url]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("host evil.internal is not target billing's (localhost)"),
        "{body}"
    );
    // The address dialled, as a Host, is the target itself.
    let url = format!("https://127.0.0.1:{}/api/v1/echo", srv.port);
    let (code, body, _) = curl(&bot, &ca, &[&url]);
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(TOKEN), "{body}");

    // The agent asked upstream for uncompressed answers though curl offered gzip.
    let log = srv.access_log();
    assert!(
        log.iter()
            .all(|e| !e["host"].as_str().unwrap_or("").contains("evil")),
        "{log:#?}"
    );
    let echoes: Vec<_> = log
        .iter()
        .filter(|e| {
            e["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/api/v1/echo"))
        })
        .collect();
    assert_eq!(echoes.len(), 5, "{log:#?}");
    for e in echoes {
        assert_eq!(e["authorization"], format!("Bearer {TOKEN}"), "{e}");
        assert!(e["accept_encoding"].is_null(), "{e}");
    }
    let n = agent.metric(
        "tollgate_masked_values_total",
        &[("target", "billing"), ("detector", "credential")],
    );
    // Per echo: the header, the JSON's Authorization and its base64; per TRACE: one.
    assert!(n >= 8.0, "{n}");
    for f in std::fs::read_dir(agent.data_dir.join("sessions")).expect("sessions") {
        let t = std::fs::read_to_string(f.expect("entry").path()).expect("recording");
        assert!(!t.contains(TOKEN) && !t.contains(&b64));
    }
}

/// Many frameworks run a `POST` with `X-HTTP-Method-Override: DELETE` (or `X-HTTP-Method`,
/// `X-Method-Override`, `?_method=`) as a DELETE: each method asked for is decided too.
#[test]
fn method_overrides_are_decided_as_the_methods_they_ask_for() {
    let Fixture {
        srv,
        bot,
        files: _files,
        agent,
        trust: _trust,
        ca,
    } = fixture("http-override", "", false);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let url = |p: &str| format!("https://localhost:{}{p}", srv.port);
    for (args, path) in [
        (
            vec!["-X", "POST", "-H", "X-HTTP-Method-Override: DELETE"],
            "/api/v1/invoices/1",
        ),
        (
            vec!["-X", "POST", "-H", "x-http-method: delete"],
            "/api/v1/invoices/2",
        ),
        (
            vec!["-X", "POST", "-H", "X-Method-Override: Delete"],
            "/api/v1/invoices/3",
        ),
        (vec!["-X", "POST"], "/api/v1/invoices/4?_method=DELETE"),
        (vec!["-X", "GET"], "/api/v1/invoices/5?a=1&_method=delete"),
    ] {
        for v in ["--http1.1", "--http2"] {
            let mut a = vec![v, "--resolve", &resolve];
            a.extend(&args);
            let u = url(path);
            a.push(&u);
            let (code, body, _) = curl(&bot, &ca, &a);
            assert_eq!(code, 403, "{args:?} {path}: {body}");
            let j: Value = serde_json::from_str(&body).expect("json");
            assert_eq!(j["rule"], "nobody deletes", "{j}");
        }
    }
    // An override to a method that is allowed too passes.
    let (code, body, _) = curl(
        &bot,
        &ca,
        &[
            "--resolve",
            &resolve,
            "-X",
            "POST",
            "-H",
            "X-HTTP-Method-Override: GET",
            &url("/api/v1/invoices/6"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    let log = srv.access_log();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["path"], "/api/v1/invoices/6", "{log:#?}");
    let audit = agent.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["operation"] == "POST /api/v1/invoices/1 (as DELETE)"
                && e["flags"] == "method-override"
                && e["action"] == "deny"),
        "{audit:#?}"
    );
}

/// A bot's next connection reuses the upstream connection its last one left, so a `curl` per
/// call costs no upstream handshake, and another identity never gets it: the upstream sees
/// the bot's calls on as many connections as the agent has session threads (each keeps its
/// own), and the other identity's call on a connection of its own.
#[test]
fn upstream_connections_are_kept_for_the_same_identity_only() {
    let other = Cgroup::new("http-reuse-other");
    let extra = format!(
        r#"
[[identity]]
name = "ops-bot"
cgroup = "{}"

[[rule]]
name = "ops reads the v1 API"
identities = ["ops-bot"]
targets = ["billing"]
action = "allow"
http = {{ methods = ["GET"], paths = ["/api/v1/*"] }}
"#,
        other.glob()
    );
    let Fixture {
        srv,
        bot,
        files: _files,
        agent: _agent,
        trust: _trust,
        ca,
    } = fixture("http-reuse", &extra, false);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let url = format!("https://localhost:{}/api/v1/invoices", srv.port);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let calls = threads + 3;
    let peer = |n: usize| -> u64 {
        let log = srv.access_log();
        assert_eq!(log.len(), n, "{log:?}");
        log[n - 1]["peer"].as_u64().expect("peer port")
    };
    // HTTP/1.1 and HTTP/2 from the bot alike (the upstream connection is HTTP/1.1).
    for flag in ["--http1.1", "--http2"].into_iter().cycle().take(2 * calls) {
        let (code, body, _) = curl(&bot, &ca, &[flag, "--resolve", &resolve, &url]);
        assert_eq!(code, 200, "{body}");
    }
    // Each session thread opened one connection and kept it; all later calls reused them.
    let log = srv.access_log();
    assert_eq!(log.len(), 2 * calls, "{log:?}");
    let bot_peers: std::collections::BTreeSet<u64> =
        log.iter().filter_map(|e| e["peer"].as_u64()).collect();
    assert!(
        bot_peers.len() <= threads,
        "{} calls on {} upstream connections with {threads} session threads: {log:?}",
        2 * calls,
        bot_peers.len()
    );
    let (code, body, _) = curl(&other, &ca, &["--http1.1", "--resolve", &resolve, &url]);
    assert_eq!(code, 200, "{body}");
    let theirs = peer(2 * calls + 1);
    assert!(
        !bot_peers.contains(&theirs),
        "ops-bot's call went on a connection ci-bot's sessions left: {theirs}"
    );
    // The injected credential is on every call, whichever connection carried it.
    assert!(srv
        .access_log()
        .iter()
        .all(|e| e["authorization"] == format!("Bearer {TOKEN}")));
}

#[test]
fn smuggling_and_path_tricks_never_reach_a_denied_path() {
    let Fixture {
        srv,
        bot,
        files: _files,
        agent,
        trust,
        ca,
    } = fixture("http-tricks", "", false);
    let client = raw_client(trust.path());
    let h = "Host: localhost\\r\\n";
    let end = "Connection: close\\r\\n\\r\\n";
    let get = |path: &str| format!("GET {path} HTTP/1.1\\r\\n{h}{end}");
    let smuggled = format!("GET /admin HTTP/1.1\\r\\n{h}\\r\\n");
    // (name, SNI, raw request)
    let tricks: Vec<(&str, &str, String)> = vec![
        ("dot-dot", "localhost", get("/api/v1/../../admin")),
        ("encoded dot-dot", "localhost", get("/api/v1/%2e%2e/%2e%2e/admin")),
        ("upper-case encoded dots", "localhost", get("/api/v1/%2E%2E/%2E%2E/admin")),
        ("mixed dot and %2e", "localhost", get("/api/v1/.%2e/.%2E/admin")),
        ("encoded slash", "localhost", get("/api/v1/..%2f..%2fadmin")),
        ("encoded backslash", "localhost", get("/api/v1/..%5c..%5cadmin")),
        ("double encoding", "localhost", get("/api/v1/%252e%252e/%252e%252e/admin")),
        ("double slash root", "localhost", get("//admin")),
        ("double slash inside", "localhost", get("/api//v1/..//../admin")),
        ("path parameter", "localhost", get("/api/v1/..;/..;/admin")),
        ("encoded NUL", "localhost", get("/api/v1/%00/../../../admin")),
        ("above root", "localhost", get("/../admin")),
        ("absolute-form other host", "localhost", format!("GET https://evil.internal/api/v1/x HTTP/1.1\\r\\n{h}{end}")),
        ("absolute-form denied path", "localhost", format!("GET https://localhost/admin HTTP/1.1\\r\\n{h}{end}")),
        ("Host vs SNI mismatch", "localhost", format!("GET /api/v1/x HTTP/1.1\\r\\nHost: admin.internal\\r\\n{end}")),
        ("two Host headers", "localhost", format!("GET /api/v1/x HTTP/1.1\\r\\n{h}Host: admin.internal\\r\\n{end}")),
        ("no Host (HTTP/1.0)", "localhost", "GET /admin HTTP/1.0\\r\\n\\r\\n".to_string()),
        ("duplicate Content-Length", "localhost", format!("POST /api/v1/x HTTP/1.1\\r\\n{h}Content-Length: 0\\r\\nContent-Length: 40\\r\\n\\r\\n{smuggled}")),
        ("CL + TE", "localhost", format!("POST /api/v1/x HTTP/1.1\\r\\n{h}Content-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n{smuggled}")),
        ("TE + CL, header case", "localhost", format!("POST /api/v1/x HTTP/1.1\\r\\n{h}TRANSFER-ENCODING: chunked\\r\\ncontent-length: 4\\r\\n\\r\\n0\\r\\n\\r\\n{smuggled}")),
        ("obfuscated TE", "localhost", format!("POST /api/v1/x HTTP/1.1\\r\\n{h}Transfer-Encoding: xchunked\\r\\n\\r\\n0\\r\\n\\r\\n{smuggled}")),
        ("TE list", "localhost", format!("POST /api/v1/x HTTP/1.1\\r\\n{h}Transfer-Encoding: gzip, chunked\\r\\n\\r\\n0\\r\\n\\r\\n{smuggled}")),
        ("space in path", "localhost", format!("GET /api/v1/x /admin HTTP/1.1\\r\\n{h}{end}")),
        ("fragment", "localhost", get("/api/v1/x#/../../../admin")),
        ("lower-case method", "localhost", format!("get /admin HTTP/1.1\\r\\n{h}{end}")),
        ("CONNECT tunnel", "localhost", format!("CONNECT localhost:443 HTTP/1.1\\r\\n{h}{end}")),
    ];
    assert!(tricks.len() >= 20);
    let mut report = Vec::new();
    for (name, sni, req) in &tricks {
        let port = srv.port.to_string();
        let out = python(
            &bot,
            &[
                client.as_ref(),
                port.as_ref(),
                ca.as_ref(),
                sni.as_ref(),
                req.as_ref(),
            ],
        );
        let answer = String::from_utf8_lossy(&out.stdout).to_string();
        let codes = statuses(&answer);
        report.push(format!("{name}: {codes:?}"));
        assert!(
            !codes.is_empty() || answer.is_empty(),
            "{name}: unexpected answer {answer:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // hyper reads CL+TE as chunked (TE wins, RFC 9112 6.3), answers the first request and
        // closes the connection: the smuggled request after it is never read. That is the
        // normalised outcome; anything else must be refused.
        // A fragment is no part of the path (hyper drops it): `/api/v1/x` is what is decided
        // and sent.
        let normalised =
            name.starts_with("CL + TE") || name.starts_with("TE + CL") || *name == "fragment";
        if normalised {
            assert!(
                codes == [200] || codes.iter().all(|c| *c >= 400),
                "{name}: {answer}"
            );
        } else {
            assert!(
                codes.iter().all(|c| *c >= 400),
                "{name}: a trick got a success: {answer}"
            );
        }
    }
    eprintln!("{}", report.join("\n"));

    // Pipelined on one connection: the allowed request is answered, the denied one refused.
    let pipelined =
        format!("GET /api/v1/first HTTP/1.1\\r\\n{h}\\r\\nGET /admin HTTP/1.1\\r\\n{h}{end}");
    let port = srv.port.to_string();
    let out = python(
        &bot,
        &[
            client.as_ref(),
            port.as_ref(),
            ca.as_ref(),
            "localhost".as_ref(),
            pipelined.as_ref(),
        ],
    );
    let answer = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(statuses(&answer), vec![200, 403], "{answer}");

    // What reached the server: only allowed paths, in canonical form.
    let log = srv.access_log();
    assert!(!log.is_empty());
    for e in &log {
        let p = e["path"].as_str().unwrap_or("");
        assert!(
            p.starts_with("/api/v1/") && !p.contains("..") && !p.contains('%') && !p.contains("//"),
            "a trick reached the server: {e}"
        );
        assert_ne!(e["method"], "GET /admin");
    }
    assert!(log.iter().all(|e| e["path"] != "/admin"), "{log:#?}");
    drop(agent);
}

fn approvals(agent: &AgentProc, args: &[&str]) -> String {
    agent.approvals(args)
}

fn pending_id(agent: &AgentProc) -> u64 {
    agent.pending_approval()["id"]
        .as_u64()
        .expect("an approval id")
}

#[test]
fn an_approve_rule_holds_the_request_until_a_human_decides() {
    let extra = "\n[[rule]]\nname = \"refunds need a human\"\nidentities = [\"ci-bot\"]\ntargets = [\"billing\"]\naction = \"approve\"\nhttp = { methods = [\"POST\"], paths = [\"/api/v1/refunds/*\"] }\n";
    let Fixture {
        srv,
        bot,
        files: _files,
        agent,
        trust: _trust,
        ca,
    } = fixture("http-approve", extra, true);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let url = format!("https://localhost:{}/api/v1/refunds/42", srv.port);
    let spawn = || {
        let ca = ca.clone();
        let (resolve, url) = (resolve.clone(), url.clone());
        let bot = &bot;
        let mut c = bot.command(Path::new("/usr/bin/curl"));
        c.args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&ca)
            .args([
                "-w",
                "\n%{http_code}",
                "--resolve",
                &resolve,
                "-d",
                "amount=10",
                &url,
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdout(std::process::Stdio::piped());
        c.spawn().expect("curl")
    };

    // Approved: the held request then reaches the server.
    let child = spawn();
    let id = pending_id(&agent);
    assert!(srv.access_log().is_empty(), "held, not sent");
    approvals(&agent, &["approve", &id.to_string()]);
    let out = child.wait_with_output().expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(s.ends_with("\n200"), "{s}");
    assert_eq!(srv.access_log().len(), 1);

    // Denied: 403 JSON with the approver's comment; nothing sent.
    let child = spawn();
    let id = pending_id(&agent);
    approvals(
        &agent,
        &[
            "deny",
            &id.to_string(),
            "--comment",
            "not during the freeze",
        ],
    );
    let out = child.wait_with_output().expect("curl");
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", ""));
    assert_eq!(code, "403", "{s}");
    let v: Value = serde_json::from_str(body).expect("json");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("not during the freeze")),
        "{v}"
    );
    assert_eq!(v["rule"], "refunds need a human", "{v}");
    assert_eq!(srv.access_log().len(), 1);

    // The bot gives up (its connection closes): the request is withdrawn (the agent then
    // refuses to approve it: "already cancelled") and nothing is sent.
    let mut child = spawn();
    let id = pending_id(&agent);
    child.kill().expect("kill curl");
    let _ = child.wait();
    agent.wait_audit("the approval cancelled", |e| {
        e["event"] == "approval" && e["action"] == "cancelled"
    });
    let list: Value =
        serde_json::from_str(&approvals(&agent, &["list", "--json"])).expect("approvals json");
    let pending = list.get("pending").unwrap_or(&list);
    assert!(
        pending
            .as_array()
            .is_some_and(|l| l.iter().all(|p| p["id"] != id)),
        "{list}"
    );
    assert_eq!(srv.access_log().len(), 1, "a withdrawn request was sent");
}

#[test]
fn websocket_upgrades_are_decided_then_relayed() {
    let Fixture {
        srv,
        bot,
        files: _files,
        agent,
        trust,
        ca,
    } = fixture("http-ws", "", false);
    let client = ws_client(trust.path());
    let ws = |path: &str| -> Value {
        let port = srv.port.to_string();
        let out = python(
            &bot,
            &[
                client.as_ref(),
                port.as_ref(),
                ca.as_ref(),
                path.as_ref(),
                "hello through tollgate".as_ref(),
            ],
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    };
    let v = ws("/api/v1/ws");
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["echo"], "hello through tollgate", "{v}");
    let v = ws("/admin/ws");
    assert_eq!(v["status"], 403, "{v}");
    let log = srv.access_log();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["upgrade"], "websocket");
    assert_eq!(log[0]["authorization"], format!("Bearer {TOKEN}"));
    // The upgraded request is recorded with its bytes once the relay ends.
    let recorded = vm_tests::wait_for(std::time::Duration::from_secs(10), "ws recording", || {
        std::fs::read_dir(agent.data_dir.join("sessions"))
            .ok()?
            .flatten()
            .filter_map(|f| std::fs::read_to_string(f.path()).ok())
            .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .find(|v| v["event"] == "request" && v["status"] == 101)
    });
    assert!(recorded["bytes_up"].as_u64().unwrap_or(0) > 0, "{recorded}");
    assert!(
        recorded["bytes_down"].as_u64().unwrap_or(0) > 0,
        "{recorded}"
    );
}

/// Peak resident memory of `pid` (VmHWM), in KiB.
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_1gib_download_streams_byte_identical_in_flat_memory() {
    use std::io::Read as _;
    let Fixture {
        srv,
        bot,
        files: _files,
        agent,
        trust: _trust,
        ca,
    } = fixture("http-big", "", false);
    const SIZE: u64 = 1 << 30;
    let before = peak_kib(agent.pid().expect("agent pid"));
    let url = format!(
        "https://localhost:{}/api/v1/download?bytes={SIZE}",
        srv.port
    );
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let started = std::time::Instant::now();
    let mut child = bot
        .command(Path::new("/usr/bin/curl"))
        .args(["-sS", "--fail", "--max-time", "300", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &resolve, &url])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    let mut out = child.stdout.take().expect("stdout");
    // Compared with the server's pattern as it arrives (byte i of each 64 KiB block is
    // i % 251), slice by slice.
    let block: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = out.read(&mut buf).expect("read");
        if k == 0 {
            break;
        }
        let mut chunk = &buf[..k];
        while !chunk.is_empty() {
            let at = (n % 65536) as usize;
            let take = chunk.len().min(65536 - at);
            assert!(
                chunk[..take] == block[at..at + take],
                "the download differs at byte {n}"
            );
            chunk = &chunk[take..];
            n += take as u64;
        }
    }
    assert!(child.wait().expect("curl").success());
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(n, SIZE);
    let after = peak_kib(agent.pid().expect("agent pid"));
    eprintln!(
        "1 GiB through the agent in {secs:.1} s ({:.0} MiB/s); agent peak RSS {before} -> {after} KiB",
        1024.0 / secs
    );
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "agent peak RSS grew from {before} to {after} KiB: the body was buffered"
    );
}

/// Removes the installed CA and refreshes the bundle again, whatever the test did.
struct Uninstall(std::path::PathBuf);

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::process::Command::new("update-ca-certificates")
            .stdout(std::process::Stdio::null())
            .status();
    }
}

#[test]
fn ca_install_lets_clients_trust_the_agent_without_flags() {
    let Fixture {
        srv,
        bot,
        files: _files,
        agent,
        trust: _trust,
        ca: _ca,
    } = fixture("http-cainstall", "", false);
    let url = format!("https://localhost:{}/api/v1/invoices", srv.port);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let curl = || {
        bot.command(Path::new("/usr/bin/curl"))
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(["--resolve", &resolve, &url])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("curl")
    };
    // Before: the agent's CA is unknown to the system bundle.
    let o = curl();
    assert!(!o.status.success(), "{}", text(&o));
    let _guard = Uninstall("/usr/local/share/ca-certificates/tollgate.crt".into());
    let out = std::process::Command::new(vm_tests::tollgate_bin())
        .args(["ca", "install", "--data-dir"])
        .arg(&agent.data_dir)
        .output()
        .expect("tollgate ca install");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out)
        .contains("installed the tollgate CA as /usr/local/share/ca-certificates/tollgate.crt"));
    let o = curl();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "{}", text(&o));
}

/// `inspect = false`: the connection is decided once and relayed as it is. The bot sees the
/// server's own certificate (not one minted by the agent), its own Authorization reaches the
/// server untouched, no request is decided or recorded one by one; an identity without a
/// whole-connection rule is refused at connect.
#[test]
fn inspect_false_relays_tls_without_decrypting() {
    require_root();
    let tag = "http-opaque";
    let srv = HttpsServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let other = Cgroup::new(&format!("{tag}-other"));
    let body = format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

[[identity]]
name = "other-bot"
cgroup = "{other}"

[[target]]
name = "partner"
protocol = "https"
address = ["127.0.0.1:{port}"]
inspect = false

[[rule]]
name = "ci reaches the partner API"
identities = ["ci-bot"]
targets = ["partner"]
action = "allow"
"#,
        glob = bot.glob(),
        other = other.glob(),
        port = srv.port,
    );
    let agent = AgentProc::start(tag, FailMode::Closed, &body);
    let trust = TempDir::new(&format!("{tag}-trust"));
    let server_ca = world_readable(
        &trust,
        "server-ca.pem",
        &std::fs::read_to_string(&srv.ca_file).expect("server CA"),
    );
    let agent_ca = world_readable(
        &trust,
        "agent-ca.pem",
        &std::fs::read_to_string(agent.data_dir.join("ca/ca.pem")).expect("agent CA"),
    );
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let url = format!("https://localhost:{}/anything/at/all", srv.port);

    // Trusting only the server's own CA works: the TLS session is the server's.
    let (code, body, _) = curl(&bot, &server_ca, &["--resolve", &resolve, &url]);
    assert_eq!(code, 200, "{body}");
    let log = srv.access_log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["path"], "/anything/at/all");
    // The bot's own header went through: nothing was decrypted, so nothing was replaced.
    assert_eq!(log[0]["authorization"], format!("Bearer {STOLEN}"));
    // Trusting only the agent's CA fails: the agent minted no certificate.
    curl_fails(&bot, &agent_ca, &resolve, &url);

    // Another identity, no whole-connection rule: refused at connect, nothing reaches the server.
    curl_fails(&other, &server_ca, &resolve, &url);
    assert_eq!(srv.access_log().len(), 1);

    // The audit: connection decisions only, no request was decided one by one. (The refused
    // connection's line may reach the file just after curl has given up.)
    agent.wait_audit("the refused connection", |e| {
        e["event"] == "connect" && e["action"] == "deny" && e["identity"] == "other-bot"
    });
    let audit = agent.audit();
    let connects: Vec<_> = audit.iter().filter(|e| e["event"] == "connect").collect();
    assert!(
        connects
            .iter()
            .any(|e| e["action"] == "allow" && e["rule"] == "ci reaches the partner API"),
        "{audit:#?}"
    );
    assert!(
        connects
            .iter()
            .any(|e| e["action"] == "deny" && e["identity"] == "other-bot"),
        "{audit:#?}"
    );
    assert!(
        !audit.iter().any(|e| e["event"] == "operation"),
        "{audit:#?}"
    );
}

/// mTLS upstream: the target's credential is a client certificate (`cert_file` + `key_file`),
/// which the agent presents to a server that requires one; the bot holds no certificate and
/// its own Authorization is still dropped.
#[test]
fn client_certificate_credential_for_a_server_requiring_mtls() {
    require_root();
    let tag = "http-mtls";
    let client = vm_tests::pg::TestCa::new(&format!("{tag}-client"));
    let files = TempDir::new(&format!("{tag}-files"));
    let client_ca = files.path().join("client-ca.pem");
    let cert = files.path().join("client.pem");
    let key = files.path().join("client.key");
    std::fs::write(&client_ca, &client.ca_pem).expect("ca");
    std::fs::write(&cert, &client.cert_pem).expect("cert");
    std::fs::write(&key, &client.key_pem).expect("key");
    let srv = HttpsServer::start_mtls(tag, &client_ca);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let body = billing_policy(
        &bot,
        &srv,
        &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"",
            cert.display(),
            key.display()
        ),
        "\"GET\"",
    );
    let agent = AgentProc::start(tag, FailMode::Closed, &body);
    let (_trust, ca) = agent_ca_for_bot(tag, &agent);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);

    // Without a client certificate the server refuses the handshake (root is not redirected).
    let direct = std::process::Command::new("/usr/bin/curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&srv.ca_file)
        .args(["--resolve", &resolve])
        .arg(format!("https://localhost:{}/api/v1/x", srv.port))
        .output()
        .expect("curl");
    assert!(!direct.status.success(), "{}", text(&direct));
    assert!(srv.access_log().is_empty());

    // Through the agent: its client certificate opens the server.
    for version in ["--http1.1", "--http2"] {
        let (code, body, _) = curl(
            &bot,
            &ca,
            &[
                version,
                "--resolve",
                &resolve,
                &format!("https://localhost:{}/api/v1/invoices", srv.port),
            ],
        );
        assert_eq!(code, 200, "{version}: {body}");
    }
    let (code, _, _) = curl(
        &bot,
        &ca,
        &[
            "--resolve",
            &resolve,
            &format!("https://localhost:{}/admin", srv.port),
        ],
    );
    assert_eq!(code, 403);
    let log = srv.access_log();
    assert_eq!(log.len(), 2, "{log:#?}");
    for e in &log {
        assert_eq!(e["path"], "/api/v1/invoices", "{e}");
        assert_eq!(
            e["client_issuer"][0],
            format!("{tag}-client test CA"),
            "the agent's client certificate: {e}"
        );
        assert!(
            e["authorization"].is_null(),
            "the bot's header is dropped: {e}"
        );
    }
    let audit = std::fs::read_to_string(agent.audit_path()).expect("audit");
    assert!(
        !audit.contains("PRIVATE KEY"),
        "no key material in the audit"
    );
}

/// `[[mask]]` on an HTTPS target: JSON fields by path (`ssn`, `items.*.spec.email`) and the
/// credit-card detector, masked as the answer streams (HTTP/1.1 and HTTP/2), a ~100 MB list
/// masked in flat agent memory; an answer that cannot be masked (HTML, gzip) is refused, and
/// the agent asks upstream for an uncompressed answer.
#[test]
fn json_answers_are_masked_as_they_stream() {
    let extra = "\n[[mask]]\ntargets = [\"billing\"]\ncolumns = [\"ssn\", \"items.*.spec.email\"]\ndetectors = [\"credit_card\"]\n";
    let Fixture {
        srv,
        bot,
        files,
        agent,
        trust: _trust,
        ca,
    } = fixture("http-mask", extra, false);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let url = |p: &str| format!("https://localhost:{}{p}", srv.port);
    for version in ["--http1.1", "--http2"] {
        let (code, body, _) = curl(
            &bot,
            &ca,
            &[
                version,
                "--compressed",
                "--resolve",
                &resolve,
                &url("/api/v1/customers?n=3"),
            ],
        );
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("masked JSON is JSON");
        let items = v["items"].as_array().expect("items");
        assert_eq!(items.len(), 3, "{body}");
        for (i, it) in items.iter().enumerate() {
            assert_eq!(it["id"], i, "{body}");
            assert_eq!(it["spec"]["name"], format!("n{i}"), "{body}");
            assert!(
                !it["ssn"].as_str().unwrap_or("123-45").contains("123-45"),
                "{body}"
            );
            assert!(
                it["spec"]["email"] != format!("user{i}@example.com"),
                "{body}"
            );
            assert!(
                it["note"].as_str().is_some_and(|n| !n.contains("4111")),
                "{body}"
            );
        }
    }
    // Keys spelled with escapes, in another case or twice, a card number escaped or sent as
    // a number, all cut across tiny chunks: masked as a JSON reader would read them.
    let (code, body, _) = curl(
        &bot,
        &ca,
        &["--resolve", &resolve, &url("/api/v1/disguised")],
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("masked JSON is JSON");
    assert_eq!(v["ok"], true, "{body}");
    for secret in ["123-45-6789", "987-65-4320", "555-12-3456", "4111"] {
        assert!(!body.contains(secret), "{secret}: {body}");
    }
    assert!(
        !body.contains("\\u0020") && !body.contains("\\u0031"),
        "escaped digits pass: {body}"
    );
    // The agent asked for an uncompressed answer.
    let log = srv.access_log();
    assert!(
        log.iter().all(|e| e["accept_encoding"].is_null()),
        "{log:#?}"
    );

    // A range of a masked document: the agent asks for the whole (a range starting inside a
    // masked value would pass its digits as a number of their own) and masks it.
    let (code, body, _) = curl(
        &bot,
        &ca,
        &[
            "--resolve",
            &resolve,
            "-H",
            "Range: bytes=44-52",
            &url("/api/v1/customers?n=1"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains("123-45") && !body.contains("user0@"),
        "{body}"
    );
    let log = srv.access_log();
    let ranged: Vec<_> = log
        .iter()
        .filter(|e| e["path"] == "/api/v1/customers?n=1")
        .collect();
    assert_eq!(ranged.len(), 1, "{log:#?}");
    assert!(ranged[0]["range"].is_null(), "{log:#?}");
    // A part sent anyway: refused, never passed on.
    let (code, body, _) = curl(&bot, &ca, &["--resolve", &resolve, &url("/api/v1/partial")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("partial answer"), "{body}");
    assert!(!body.contains("123456789"), "{body}");

    // Not maskable: refused, never passed on.
    for path in ["/api/v1/page", "/api/v1/gz"] {
        let (code, body, _) = curl(&bot, &ca, &["--resolve", &resolve, &url(path)]);
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("cannot be masked"), "{body}");
        assert!(!body.contains("123-45-6789"), "{body}");
    }

    // A list of about 100 MB streams through in flat memory, every value masked.
    let n = 650_000;
    let out = files.path().join("customers.json");
    let pid = agent.pid().expect("agent pid");
    let before = peak_kib(pid);
    let dl = bot
        .command(Path::new("/usr/bin/curl"))
        .args(["-sS", "--max-time", "300", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &resolve, "-o", "-"])
        .arg(url(&format!("/api/v1/customers?n={n}")))
        .env_clear()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    let got = dl.wait_with_output().expect("curl");
    assert!(got.status.success(), "{}", text(&got));
    std::fs::write(&out, &got.stdout).expect("write");
    let after = peak_kib(pid);
    let size = got.stdout.len();
    // (about 100 MB as the server sends it; the masked values are shorter)
    assert!(size > 64 << 20, "{size} bytes");
    let body = String::from_utf8_lossy(&got.stdout);
    assert!(!body.contains("4111 1111"), "a card number leaked");
    assert!(!body.contains("@example.com"), "an email leaked");
    assert!(!body.contains("\"123-45-"), "an ssn leaked");
    let v: Value = serde_json::from_slice(&got.stdout).expect("the whole list is JSON");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(n));
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "agent peak memory grew by {} KiB for a {} MiB answer",
        after.saturating_sub(before),
        size >> 20
    );
    let _ = std::fs::remove_file(&out);
    eprintln!(
        "masked {} MiB; agent peak RSS {} -> {} KiB",
        size >> 20,
        before,
        after
    );
}

/// `record_bodies = true`: each request's recording line carries the start of both bodies,
/// masked (JSON fields by the target's `[[mask]]`, values by its detectors).
#[test]
fn record_bodies_keeps_masked_bodies_in_the_recording() {
    require_root();
    let tag = "http-bodies";
    let srv = HttpsServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let files = TempDir::new(&format!("{tag}-files"));
    let token = files.path().join("billing.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let body = policy(&bot, &srv, &token).replace(
        "credential = \"billing-api\"\n",
        "credential = \"billing-api\"\nrecord_bodies = true\n",
    ) + "\n[[mask]]\ntargets = [\"billing\"]\ncolumns = [\"ssn\"]\ndetectors = [\"credit_card\"]\n";
    let agent = AgentProc::start(tag, FailMode::Closed, &body);
    let (_trust, ca) = agent_ca_for_bot(tag, &agent);
    let resolve = format!("localhost:{}:127.0.0.1", srv.port);
    let url = |p: &str| format!("https://localhost:{}{p}", srv.port);
    let (code, _, _) = curl(
        &bot,
        &ca,
        &["--resolve", &resolve, &url("/api/v1/customers?n=2")],
    );
    assert_eq!(code, 200);
    let (code, _, _) = curl(
        &bot,
        &ca,
        &[
            "--resolve",
            &resolve,
            "-H",
            "Content-Type: text/plain",
            "-d",
            "pay with 4111 1111 1111 1111 please",
            &url("/api/v1/invoices"),
        ],
    );
    assert_eq!(code, 200);
    let sessions = agent.data_dir.join("sessions");
    let lines: Vec<Value> = vm_tests::wait_for(
        std::time::Duration::from_secs(10),
        "two recorded requests",
        || {
            let v: Vec<Value> = std::fs::read_dir(&sessions)
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
                .flat_map(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .lines()
                        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                        .collect::<Vec<_>>()
                })
                .filter(|l| l["event"] == "request")
                .collect();
            (v.len() >= 2).then_some(v)
        },
    );
    let get = lines
        .iter()
        .find(|l| l["method"] == "GET")
        .expect("the GET");
    let shown = get["response_body"]["text"]
        .as_str()
        .expect("response body");
    assert!(
        shown.contains("CustomerList") && shown.contains("user0@example.com"),
        "{get}"
    );
    assert!(
        !shown.contains("123-45-") && !shown.contains("4111 1111"),
        "{get}"
    );
    let post = lines
        .iter()
        .find(|l| l["method"] == "POST")
        .expect("the POST");
    let sent = post["request_body"]["text"].as_str().expect("request body");
    assert!(
        sent.starts_with("pay with ") && !sent.contains("4111"),
        "{post}"
    );
    assert_eq!(post["request_body"]["bytes"], 35, "{post}");
    assert!(
        post["response_body"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("sha256")),
        "{post}"
    );
}

/// `tg-hyper` (a hyper client over rustls, run as the bot) with `args` on one connection; its
/// JSON lines.
fn hyper_client(
    bot: &Cgroup,
    port: u16,
    ca: &Path,
    version: &str,
    requests: &[Value],
) -> Vec<Value> {
    let out = bot
        .command(Path::new(env!("CARGO_BIN_EXE_tg-hyper")))
        .arg(format!("127.0.0.1:{port}"))
        .arg("localhost")
        .arg(ca)
        .arg(version)
        .args(requests.iter().map(|r| r.to_string()))
        .env_clear()
        .output()
        .expect("tg-hyper");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A Rust client (hyper, HTTP/1.1 and HTTP/2) through the agent: allowed and denied requests,
/// and HTTP/2 header tricks (`:authority` against a `host` header, against SNI, two `host`
/// headers, `:path` with `..` and encoded dots) that are refused or normalised; none reaches a
/// path the policy denies.
#[test]
fn hyper_client_and_http2_pseudo_header_tricks() {
    let Fixture {
        srv,
        bot,
        files: _files,
        agent: _agent,
        trust: _trust,
        ca,
    } = fixture("http-hyper", "", false);
    let port = srv.port;
    let base = format!("https://localhost:{port}");
    let get =
        |uri: String, headers: Value| json!({"method": "GET", "uri": uri, "headers": headers});

    let r = hyper_client(
        &bot,
        port,
        &ca,
        "h2",
        &[
            get(format!("{base}/api/v1/ok"), json!([])),
            json!({"method": "DELETE", "uri": format!("{base}/api/v1/x"), "headers": []}),
        ],
    );
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (r[0]["status"].as_u64(), r[0]["version"].as_str()),
        (Some(200), Some("HTTP/2.0")),
        "{r:?}"
    );
    assert_eq!(r[1]["status"], 403, "{r:?}");
    let refusal: Value =
        serde_json::from_str(r[1]["body"].as_str().unwrap_or("")).expect("403 JSON");
    assert_eq!(refusal["rule"], "nobody deletes", "{refusal}");
    let r = hyper_client(
        &bot,
        port,
        &ca,
        "h1",
        &[get(format!("{base}/api/v1/h1"), json!([]))],
    );
    assert_eq!(
        (r[0]["status"].as_u64(), r[0]["version"].as_str()),
        (Some(200), Some("HTTP/1.1")),
        "{r:?}"
    );

    // HTTP/2 tricks, each on its own connection: (request, acceptable statuses).
    let tricks: Vec<(Value, &[u64])> = vec![
        // :authority says localhost, a host header says another name.
        (
            get(
                format!("{base}/api/v1/ok"),
                json!([["host", "admin.internal"]]),
            ),
            &[400],
        ),
        // :authority names another host than the TLS server name.
        (
            get(
                format!("https://admin.internal:{port}/api/v1/ok"),
                json!([]),
            ),
            &[421, 400],
        ),
        // Two host headers.
        (
            get(
                format!("{base}/api/v1/ok"),
                json!([
                    ["host", format!("localhost:{port}")],
                    ["host", "admin.internal"]
                ]),
            ),
            &[400],
        ),
        // :path climbing out of the allowed prefix, plain and percent-encoded.
        (get(format!("{base}/api/v1/../../admin"), json!([])), &[403]),
        (
            get(format!("{base}/api/v1/%2e%2e/%2e%2e/admin"), json!([])),
            &[403],
        ),
        (
            get(format!("{base}/api/v1/..%2fadmin"), json!([])),
            &[403, 400],
        ),
        (get(format!("{base}//admin"), json!([])), &[403]),
    ];
    for (req, ok) in &tricks {
        let r = hyper_client(&bot, port, &ca, "h2", std::slice::from_ref(req));
        let status = r.first().and_then(|l| l["status"].as_u64());
        assert!(status.is_some_and(|s| ok.contains(&s)), "{req}: {r:?}");
    }
    let log = srv.access_log();
    let paths: Vec<&str> = log.iter().filter_map(|e| e["path"].as_str()).collect();
    assert_eq!(
        paths,
        ["/api/v1/ok", "/api/v1/h1"],
        "only the two allowed requests reached the server"
    );
    assert!(
        log.iter().all(|e| e["host"]
            .as_str()
            .is_some_and(|h| h.starts_with("localhost"))),
        "{log:#?}"
    );
}

/// A plain-text `http` target: decided per request over HTTP/1.1 and over HTTP/2 with prior
/// knowledge (`curl --http2-prior-knowledge`; the agent speaks HTTP/1.1 upstream), with the
/// token injected and the bot's own header dropped, against Python's http.server.
#[test]
fn plain_http_target_over_http1_and_h2c() {
    require_root();
    let bot = Cgroup::new("plain-http-bot");
    let files = TempDir::new("plain-http-files");
    std::fs::create_dir_all(files.path().join("www/api/v1")).expect("www");
    std::fs::create_dir_all(files.path().join("www/admin")).expect("www");
    std::fs::write(files.path().join("www/api/v1/items"), "items-body\n").expect("file");
    std::fs::write(files.path().join("www/admin/keys"), "admin-secret\n").expect("file");
    let token = files.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let port = vm_tests::free_port();
    /// The server, ended by its pid however the test ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Server(
        std::process::Command::new("/usr/bin/python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(files.path().join("www"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 http.server"),
    );
    vm_tests::wait_for(
        std::time::Duration::from_secs(5),
        "http.server listening",
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    let policy = format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

[[target]]
name = "plain-api"
protocol = "http"
address = ["127.0.0.1:{port}"]
credential = "plain-token"

[credential.plain-token]
token_file = "{token}"

[[rule]]
name = "ci reads the v1 API"
identities = ["ci-bot"]
targets = ["plain-api"]
action = "allow"
http = {{ methods = ["GET"], paths = ["/api/v1/*"] }}
"#,
        glob = bot.glob(),
        token = token.display(),
    );
    let agent = AgentProc::start("plain-http", FailMode::Closed, &policy);
    let run = |args: &[&str]| -> (String, String) {
        let out = bot
            .command(Path::new("/usr/bin/curl"))
            .args([
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code} %{http_version}",
            ])
            .args(["-H", &format!("Authorization: Bearer {STOLEN}")])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("curl");
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, tail) = s.rsplit_once('\n').unwrap_or(("", &s));
        (body.to_string(), tail.to_string())
    };
    let base = format!("http://127.0.0.1:{port}");
    let mut failures = Vec::new();
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let allowed = format!("{base}/api/v1/items");
        let mut args = extra.to_vec();
        args.push(&allowed);
        let (body, tail) = run(&args);
        let want = if extra.is_empty() { "200 1.1" } else { "200 2" };
        if body != "items-body\n" || tail != want {
            failures.push(format!("{extra:?} allowed: {tail} {body:?}"));
        }
        for denied in [
            "/admin/keys",
            "/api/v1/../../admin/keys",
            "/api/v1/%2e%2e/%2e%2e/admin/keys",
        ] {
            let url = format!("{base}{denied}");
            let mut args = extra.to_vec();
            args.extend(["--path-as-is", url.as_str()]);
            let (body, tail) = run(&args);
            if !tail.starts_with("403") || body.contains("admin-secret") {
                failures.push(format!("{extra:?} {denied}: {tail} {body:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- agent ---\n{}",
        failures.join("\n"),
        agent.stderr_text()
    );
    // Every request was decided and audited; the bot's header never reached the audit.
    let audit = std::fs::read_to_string(agent.audit_path()).expect("audit");
    assert!(audit.contains("/api/v1/items") && !audit.contains(STOLEN));
}
