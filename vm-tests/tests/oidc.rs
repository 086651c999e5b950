//! OIDC with a real provider (npm `oidc-provider`, `vm-tests/oidc/provider.mjs`): the provider
//! itself, and workload OIDC through the agent (a bot's PostgreSQL password carries a
//! client_credentials JWT).

use std::{path::Path, time::Duration};

use vm_tests::{
    http_get,
    oidc::{jwt_claims, OidcProvider},
    pg::{app_target, PgServer, APP_PASSWORD},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

#[test]
fn provider_serves_discovery_tokens_and_rotates_keys() {
    let idp = OidcProvider::start("oidcprov");
    let (status, body) = http_get(
        idp.addr(),
        "/.well-known/openid-configuration",
        Duration::from_secs(5),
    )
    .expect("discovery");
    assert_eq!(status, 200, "{body}");
    let disc: serde_json::Value = serde_json::from_str(&body).expect("discovery JSON");
    assert_eq!(disc["issuer"], idp.issuer());
    assert!(disc["code_challenge_methods_supported"]
        .as_array()
        .is_some_and(|m| m.iter().any(|v| v == "S256")));

    // Workload token: sub is the client, groups from its registration, aud tollgate.
    let t = idp.workload_token("deploy-bot");
    let c = jwt_claims(&t);
    assert_eq!(c["sub"], "deploy-bot");
    assert_eq!(c["aud"], "tollgate");
    assert_eq!(c["iss"], idp.issuer());
    assert_eq!(c["groups"], serde_json::json!(["deployers"]));

    // Approver tokens speak for the user.
    let c = jwt_claims(&idp.token_for("alice"));
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["groups"], serde_json::json!(["dba"]));
    let c = jwt_claims(&idp.token_for("carol"));
    assert_eq!(c["groups"], serde_json::json!(["dev"]));
    let c = jwt_claims(&idp.token_for_audience("bob", "other-api"));
    assert_eq!(c["aud"], "other-api");

    // Rotation: the JWKS changes and new tokens carry the new kid.
    let header = |t: &str| -> serde_json::Value {
        use base64::Engine as _;
        let h = t.split('.').next().expect("header");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .expect("b64"),
        )
        .expect("json")
    };
    let old_kid = header(&t)["kid"].as_str().expect("kid").to_string();
    let kid = idp.rotate_keys(false);
    assert_ne!(kid, old_kid);
    let t2 = idp.workload_token("deploy-bot");
    assert_eq!(header(&t2)["kid"], kid.as_str());
    let (_, jwks) = http_get(idp.addr(), "/jwks", Duration::from_secs(5)).expect("jwks");
    assert!(jwks.contains(&kid) && !jwks.contains(&old_kid), "{jwks}");
}

// ---------------------------------------------------------------------------------------------
// Workload OIDC through the agent
// ---------------------------------------------------------------------------------------------

fn workload_policy(
    pg: &PgServer,
    idp: &OidcProvider,
    deploy: &Cgroup,
    report: &Cgroup,
    secret: &Path,
) -> String {
    format!(
        r#"[[identity]]
name = "deploy-bot"
cgroup = "{deploy}"
oidc = {{ issuer = "{issuer}", audience = "tollgate", require_claims = {{ groups = ["deployers"] }} }}

[[identity]]
name = "report-bot"
cgroup = "{report}"
oidc = {{ issuer = "{issuer}", require_claims = {{ groups = ["analysts"] }} }}

{target}
[[rule]]
name = "bots read"
identities = ["deploy-bot", "report-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select"] }}

[[rule]]
name = "deployers update"
identities = ["deploy-bot", "report-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["update"] }}
claims = {{ groups = ["deployers"] }}
"#,
        deploy = deploy.glob(),
        report = report.glob(),
        issuer = idp.issuer(),
        target = app_target(pg, secret, ""),
    )
}

/// psql in `bot`'s cgroup (unprivileged), with `password` (None: no password at all, `-w`).
fn psql(pg: &PgServer, bot: &Cgroup, password: Option<&str>, sql: &str) -> (bool, String) {
    let conn = format!(
        "host=127.0.0.1 port={} user=bot dbname=app sslmode=disable connect_timeout=10",
        pg.port
    );
    let mut c = bot.command(Path::new("/usr/bin/psql"));
    c.arg(conn)
        .args(["-X", "-w", "-v", "VERBOSITY=verbose", "-Atc", sql])
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    if let Some(p) = password {
        c.env("PGPASSWORD", p);
    }
    let o = c.output().expect("psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn workload_jwt_as_postgres_password_is_verified_against_the_kernel_identity() {
    require_root();
    let idp = OidcProvider::start("oidcwl");
    let pg = PgServer::start("oidcwl");
    let deploy = Cgroup::new("oidcwl-deploy");
    let report = Cgroup::new("oidcwl-report");
    let stranger = Cgroup::new("oidcwl-stranger");
    let dir = TempDir::new("oidcwl-secret");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let agent = AgentProc::start(
        "oidcwl",
        FailMode::Closed,
        &workload_policy(&pg, &idp, &deploy, &report, &secret),
    );
    let sql = "SELECT count(*) FROM customers";
    let mut tokens = Vec::new();
    let ctx = |t: &str| format!("{t}\n--- agent ---\n{}", agent.stderr_text());

    // 1. The right cgroup with a valid client_credentials JWT gets in.
    let good = idp.workload_token("deploy-bot");
    tokens.push(good.clone());
    let (ok, t) = psql(&pg, &deploy, Some(&good), sql);
    assert!(ok && t.trim() == "2", "{}", ctx(&t));

    // 2. No token: the agent asks for a password and libpq has none.
    let (ok, t) = psql(&pg, &deploy, None, sql);
    assert!(!ok && t.contains("no password supplied"), "{}", ctx(&t));

    // 3. Not a JWT, a forged signature, the wrong audience, the wrong groups: a FATAL (28P01;
    //    psql does not print the SQLSTATE of a connection error) that says why.
    // Same header and claims, one signature character changed (in the middle, so the
    // base64url stays canonical).
    let mut forged: Vec<String> = good.split('.').map(str::to_string).collect();
    let mid = forged[2].len() / 2;
    let c = if &forged[2][mid..=mid] == "A" {
        "B"
    } else {
        "A"
    };
    forged[2].replace_range(mid..=mid, c);
    let forged = forged.join(".");
    let wrong_aud = idp.workload_token_for_audience("deploy-bot", "other-api");
    let wrong_groups = idp.workload_token("report-bot");
    for (token, why) in [
        ("not-a-token", "malformed token"),
        (forged.as_str(), "signature is invalid"),
        (wrong_aud.as_str(), "audience does not include tollgate"),
        (wrong_groups.as_str(), "claim `groups`"),
    ] {
        tokens.push(token.to_string());
        let (ok, t) = psql(&pg, &deploy, Some(token), sql);
        assert!(!ok, "{why}: {}", ctx(&t));
        assert!(
            t.contains("FATAL") && t.contains("workload token rejected") && t.contains(why),
            "{why}: {}",
            ctx(&t)
        );
    }

    // 4. Kernel attribution and token must both match: deploy-bot's valid token from the
    //    report-bot cgroup fails report-bot's require_claims, and from an unlisted cgroup the
    //    connection is refused before any token is looked at.
    let (ok, t) = psql(&pg, &report, Some(&good), sql);
    assert!(!ok && t.contains("claim `groups`"), "{}", ctx(&t));
    let (ok, t) = psql(&pg, &stranger, Some(&good), sql);
    assert!(
        !ok && !t.contains("\n2\n") && t.trim() != "2",
        "{}",
        ctx(&t)
    );
    let report_token = idp.workload_token("report-bot");
    tokens.push(report_token.clone());
    let (ok, t) = psql(&pg, &report, Some(&report_token), sql);
    assert!(ok && t.trim() == "2", "{}", ctx(&t));

    // 4b. Rules match the token's claims: only a `deployers` token may UPDATE.
    let update = "UPDATE customers SET note = 'checked' WHERE id = 2";
    let (ok, t) = psql(&pg, &report, Some(&report_token), update);
    assert!(
        !ok && t.contains("42501") && t.contains("update"),
        "analysts token updated: {}",
        ctx(&t)
    );
    let (ok, t) = psql(&pg, &deploy, Some(&good), update);
    assert!(ok && t.contains("UPDATE 1"), "deployers token: {}", ctx(&t));

    // 5. Key rotation: tokens signed with the provider's new key verify (JWKS refresh), and
    //    the withdrawn key's tokens no longer do.
    idp.rotate_keys(false);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let rotated = idp.workload_token("deploy-bot");
    tokens.push(rotated.clone());
    let (ok, t) = psql(&pg, &deploy, Some(&rotated), sql);
    assert!(ok && t.trim() == "2", "after rotation: {}", ctx(&t));
    let (ok, t) = psql(&pg, &deploy, Some(&good), sql);
    assert!(
        !ok && t.contains("does not publish"),
        "old key: {}",
        ctx(&t)
    );

    // 6. The audit shows who got in and why others did not, never the token. (The last refusal's
    // line may reach the file just after the client has given up.)
    agent.wait_audit("a refused login", |e| {
        e["event"] == "auth" && e["outcome"] == "denied"
    });
    let audit = agent.audit();
    assert!(
        audit.iter().any(|e| e["event"] == "auth"
            && e["outcome"] == "allowed"
            && e["identity"] == "deploy-bot"
            && e["oidc_subject"] == "deploy-bot"),
        "{audit:#?}"
    );
    assert!(audit
        .iter()
        .any(|e| e["event"] == "auth" && e["outcome"] == "denied"));
    assert!(audit.iter().any(|e| e["event"] == "operation"
        && e["identity"] == "report-bot"
        && e["action"] == "allow"));

    // 7. No token (nor any long part of one) is in any log, audit line or recording.
    let mut written = agent.stderr_text();
    for f in walk(&agent.data_dir) {
        written.push_str(&String::from_utf8_lossy(
            &std::fs::read(&f).unwrap_or_default(),
        ));
    }
    assert!(
        written.len() > 1000,
        "the agent wrote its audit and recordings"
    );
    for t in &tokens {
        for part in t.split('.').filter(|p| p.len() >= 16) {
            assert!(!written.contains(part), "token part leaked: {part}");
        }
    }
    assert!(!written.contains(APP_PASSWORD));
}

// ---------------------------------------------------------------------------------------------
// The provider's login page in headless Chromium (authorization code + PKCE)
// ---------------------------------------------------------------------------------------------

#[test]
fn chromium_logs_in_with_code_and_pkce() {
    use sha2::Digest as _;
    use vm_tests::{browser::Browser, oidc::http_request, url_encode};
    let cb_port = vm_tests::free_port();
    let redirect = format!("http://127.0.0.1:{cb_port}/callback");
    let idp = OidcProvider::start_with("oidcweb", &[&redirect]);
    let artefacts = TempDir::new("oidcweb-artefacts");
    let browser = Browser::start("oidcweb");

    let b64 = |d: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
    };
    let verifier = b64(format!("pkce-{}-{}", std::process::id(), cb_port)
        .repeat(3)
        .as_bytes());
    let challenge = b64(&sha2::Sha256::digest(verifier.as_bytes()));
    let auth = format!(
        "{}/auth?client_id=tollgate&response_type=code&scope={}&redirect_uri={}&state=st8&nonce=n0nce&code_challenge={challenge}&code_challenge_method=S256",
        idp.issuer(),
        url_encode("openid groups"),
        url_encode(&redirect),
    );
    browser.goto(&auth);
    browser.find("#username");
    assert!(
        browser.source().contains("tollgate"),
        "the page names the client"
    );
    // A wrong password is refused on the page.
    browser.type_into("#username", "alice");
    browser.type_into("#password", "nope");
    browser.click("#submit");
    browser.find("#error");
    browser.screenshot(&artefacts.path().join("login-error.png"));
    // The right one goes back to the redirect URI with a code.
    browser.type_into("#username", "alice");
    browser.type_into("#password", "alice-pw");
    browser.screenshot(&artefacts.path().join("login.png"));
    browser.click("#submit");
    let url = browser.wait_url("the redirect with a code", |u| u.starts_with(&redirect));
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    assert_eq!(param("state").as_deref(), Some("st8"), "{url}");
    let code = param("code").unwrap_or_else(|| panic!("no code in {url}"));
    let png = std::fs::read(artefacts.path().join("login.png")).expect("screenshot kept");
    assert!(png.len() > 1000);

    // The web client exchanges the code with its secret and the PKCE verifier.
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("tollgate:{}", idp.client_secret("tollgate")));
    let body = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={verifier}",
        url_encode(&redirect)
    );
    let (status, text) = http_request(
        idp.addr(),
        "POST",
        "/token",
        &[
            ("Authorization", &format!("Basic {basic}")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        body.as_bytes(),
    )
    .expect("token request");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let at = jwt_claims(v["access_token"].as_str().expect("access token"));
    assert_eq!(at["sub"], "alice");
    assert_eq!(at["aud"], "tollgate");
    assert_eq!(at["groups"], serde_json::json!(["dba"]));
    let id = jwt_claims(v["id_token"].as_str().expect("id token"));
    assert_eq!(id["sub"], "alice");
    assert_eq!(id["nonce"], "n0nce");
    assert_eq!(id["groups"], serde_json::json!(["dba"]));
    // A replayed code is refused.
    let (status, _) = http_request(
        idp.addr(),
        "POST",
        "/token",
        &[
            ("Authorization", &format!("Basic {basic}")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        body.as_bytes(),
    )
    .expect("token request");
    assert_eq!(status, 400);
    eprintln!(
        "screenshots: {} (kept only if the test fails)",
        artefacts.path().display()
    );
}
