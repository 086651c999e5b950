//! PostgreSQL TLS through tollgate: the bot's side (the agent's CA, `tollgate ca export`) and
//! the agent's own connection to a server that only accepts TLS (`tls` of a target, with
//! SCRAM-SHA-256-PLUS channel binding). Real PostgreSQL 15, unmodified psql as the bot.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Output};

use vm_tests::{
    pg::{
        app_target, assert_sleep_cancelled_quickly, PgServer, TestCa, APP_PASSWORD, SECRET_EMAIL,
    },
    require_root, tollgate_bin, AgentProc, Cgroup, FailMode, TempDir,
};

/// One postgres target for `pg` with the given `tls = ...` line (or none), selects allowed,
/// emails masked.
fn policy(pg: &PgServer, bot: &Cgroup, secret: &Path, tls: &str) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

{target}
[[rule]]
name = "ci reads"
identities = ["ci-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "show"] }}

[[mask]]
targets = ["app-db"]
columns = ["*.email"]
style = "partial"
"#,
        glob = bot.glob(),
        target = app_target(pg, secret, tls),
    )
}

/// A directory and files the unprivileged bot can read (trust anchors only).
fn world_readable(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

/// psql as the bot with a wrong password and the given extra conninfo.
fn psql(bot: &Cgroup, pg: &PgServer, conninfo: &str, sql: &[&str]) -> Output {
    let conn = format!(
        "port={} user=bot dbname=app password=wrong-on-purpose connect_timeout=10 {conninfo}",
        pg.port
    );
    let mut cmd = bot.command(Path::new("/usr/bin/psql"));
    cmd.arg(conn)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
    for s in sql {
        cmd.args(["-c", s]);
    }
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("psql")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn bots_get_tls_from_the_agent_ca_with_require_and_verify_full() {
    require_root();
    let tag = "pgtls-bot";
    let pg = PgServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let dir = TempDir::new(&format!("{tag}-files"));
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let agent = AgentProc::start(tag, FailMode::Closed, &policy(&pg, &bot, &secret, ""));

    // `tollgate ca export` prints the CA the agent signs bots' certificates with.
    let out = std::process::Command::new(tollgate_bin())
        .args(["ca", "export", "--data-dir"])
        .arg(&agent.data_dir)
        .output()
        .expect("ca export");
    assert!(out.status.success(), "ca export: {}", text(&out));
    let pem = String::from_utf8(out.stdout).expect("pem");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let trust = TempDir::new(&format!("{tag}-trust"));
    let root = world_readable(&trust, "tollgate-ca.pem", &pem);
    let other = world_readable(&trust, "other-ca.pem", &TestCa::new("other").ca_pem);

    let select = "select email from customers where id = 1";
    let cases = [
        ("sslmode=require host=127.0.0.1".to_string(), "require"),
        (
            format!(
                "sslmode=verify-full sslrootcert={} host=127.0.0.1",
                root.display()
            ),
            "verify-full by IP",
        ),
        (
            format!(
                "sslmode=verify-full sslrootcert={} host=localhost hostaddr=127.0.0.1",
                root.display()
            ),
            "verify-full by name",
        ),
    ];
    for (conninfo, what) in &cases {
        let o = psql(&bot, &pg, conninfo, &["\\conninfo", select]);
        let t = text(&o);
        assert!(o.status.success(), "{what}: psql failed: {t}");
        assert!(
            t.contains("SSL connection (protocol: TLSv1.3"),
            "{what}: not TLS: {t}"
        );
        assert!(t.contains("@example.com"), "{what}: no row: {t}");
        assert!(!t.contains(SECRET_EMAIL), "{what}: email not masked: {t}");
    }

    // Verification is real: another CA, or a name the certificate does not carry, fails.
    let o = psql(
        &bot,
        &pg,
        &format!(
            "sslmode=verify-full sslrootcert={} host=127.0.0.1",
            other.display()
        ),
        &[select],
    );
    assert!(!o.status.success(), "untrusted CA accepted: {}", text(&o));
    assert!(
        text(&o).contains("certificate verify failed"),
        "{}",
        text(&o)
    );

    // Plaintext still works for clients that do not ask (loopback).
    let o = psql(
        &bot,
        &pg,
        "sslmode=disable host=127.0.0.1",
        &["\\conninfo", select],
    );
    assert!(o.status.success(), "plaintext: {}", text(&o));
    assert!(!text(&o).contains("SSL connection"), "{}", text(&o));

    // The CA key never leaves the data dir, and nothing of it reaches the audit log.
    let key = std::fs::read_to_string(agent.data_dir.join("ca/ca.key")).expect("ca key");
    let key_body: String = key.lines().nth(1).unwrap_or_default().to_string();
    assert!(key_body.len() > 20);
    let audit = std::fs::read_to_string(agent.audit_path()).expect("audit");
    assert!(!audit.contains(&key_body));
    assert!(!audit.contains(APP_PASSWORD));
    let mode = std::fs::metadata(agent.data_dir.join("ca/ca.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "CA key readable by others: {mode:o}");
}

#[test]
fn the_agent_logs_in_over_verified_tls_to_a_tls_only_server() {
    require_root();
    let tag = "pgtls-up";
    let ca = TestCa::new("upstream");
    let pg = PgServer::start_with_tls(tag, &ca);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let dir = TempDir::new(&format!("{tag}-files"));
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).expect("ca");
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, TestCa::new("wrong").ca_pem).expect("ca");

    let verify = format!(
        r#"tls = {{ mode = "verify-full", ca_file = "{}", server_name = "localhost" }}"#,
        ca_file.display()
    );
    let mut agent = AgentProc::start(tag, FailMode::Closed, &policy(&pg, &bot, &secret, &verify));
    let ssl_in_use = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    let select = "select email from customers where id = 1";
    let o = psql(
        &bot,
        &pg,
        "sslmode=disable host=127.0.0.1",
        &[ssl_in_use, select],
    );
    let t = text(&o);
    assert!(o.status.success(), "verify-full login failed: {t}");
    let mut lines = t.lines();
    assert_eq!(lines.next(), Some("t"), "upstream session is not TLS: {t}");
    assert!(
        !t.contains(SECRET_EMAIL) && t.contains("@example.com"),
        "{t}"
    );

    // A cancel reaches the backend over the same verified TLS (unit-tested: a target that
    // requires TLS never gets the key in plaintext).
    assert_sleep_cancelled_quickly(
        &bot,
        Path::new(env!("CARGO_BIN_EXE_tg-pgclient")),
        pg.port,
        || agent.stderr_text(),
    );
    assert!(!agent.stderr_text().contains("cancel request not forwarded"));

    // A server certificate that does not chain to ca_file: a clear error, nothing sent.
    let bad = format!(
        r#"tls = {{ mode = "verify-full", ca_file = "{}", server_name = "localhost" }}"#,
        wrong_ca.display()
    );
    // The agent restarted with the target's `tls` line set to `tls`.
    let restart_with = |agent: &mut AgentProc, tls: &str| {
        agent.write_policy(&policy(&pg, &bot, &secret, tls));
        agent.terminate();
        agent.restart();
    };
    // The bot's session reaches the server over TLS.
    let encrypted = |what: &str| {
        let o = psql(&bot, &pg, "sslmode=disable host=127.0.0.1", &[ssl_in_use]);
        assert!(o.status.success(), "{what}: {}", text(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "t");
    };
    // The bot's session is refused because the server's certificate was.
    let refused = |what: &str| {
        let o = psql(&bot, &pg, "sslmode=disable host=127.0.0.1", &[select]);
        let t = text(&o);
        assert!(!o.status.success(), "{what}: {t}");
        assert!(
            t.contains("tollgate: upstream TLS: TLS handshake with the server failed"),
            "{t}"
        );
    };
    restart_with(&mut agent, &bad);
    refused("unverifiable server accepted");

    // `verify-ca` checks the chain against ca_file (that it skips the names is unit-tested).
    let ca_only = |f: &Path| {
        format!(
            r#"tls = {{ mode = "verify-ca", ca_file = "{}" }}"#,
            f.display()
        )
    };
    restart_with(&mut agent, &ca_only(&ca_file));
    encrypted("verify-ca");
    restart_with(&mut agent, &ca_only(&wrong_ca));
    refused("verify-ca accepted another CA");

    // `require` encrypts without checking the certificate.
    restart_with(&mut agent, r#"tls = { mode = "require" }"#);
    encrypted("require");

    // Without TLS, this server refuses the login, and the bot hears why.
    restart_with(&mut agent, "");
    let o = psql(&bot, &pg, "sslmode=disable host=127.0.0.1", &[ssl_in_use]);
    let t = text(&o);
    assert!(
        !o.status.success(),
        "plaintext login to a hostssl-only server: {t}"
    );
    assert!(t.contains("no encryption"), "{t}");

    let audit = std::fs::read_to_string(agent.audit_path()).expect("audit");
    assert!(!audit.contains(APP_PASSWORD));
    assert!(!agent.stderr_text().contains(APP_PASSWORD));
}
