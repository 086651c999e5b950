//! Real PostgreSQL client libraries through tollgate, unprivileged in a bot cgroup, under the
//! allow-all rule (`policy/examples/allow-all.toml`, verbatim). The libraries come from
//! `cargo xtask setup` (`<tools>/pyvenv`, pinned from PyPI).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

fn site_packages() -> PathBuf {
    let tools = std::env::var_os("TOLLGATE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tollgate/tools")
        });
    let p = tools.join("pyvenv/lib/python3.11/site-packages");
    assert!(
        p.join("psycopg").is_dir(),
        "psycopg is not installed in {}: run `cargo xtask setup` as root",
        p.display()
    );
    p
}

fn allow_all_rules() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples/allow-all.toml");
    let text = fs::read_to_string(&path).expect("policy/examples/allow-all.toml");
    let at = text
        .find("\n[[rule]]")
        .map(|i| i + 1)
        .expect("allow-all.toml has a [[rule]]");
    text[at..].to_string()
}

/// psycopg 3's `cancel_safe()` over `sslmode=prefer`: the bundled libpq (17+) sends the
/// CancelRequest over TLS and reports failure unless the agent ends that TLS connection with
/// close_notify (issue 13 item 6).
#[test]
fn psycopg_cancel_safe_over_sslmode_prefer() {
    require_root();
    let pg = PgServer::start("clients");
    let dir = TempDir::new("clients");
    let secret = dir.path().join("app-rw.pw");
    fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    // The bot (65534) cannot enter root's tools dir: a readable copy of the packages.
    let site = dir.path().join("site");
    let s = Command::new("cp")
        .arg("-a")
        .arg(site_packages())
        .arg(&site)
        .status()
        .expect("cp");
    assert!(s.success());
    let s = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir.path())
        .status()
        .expect("chmod");
    assert!(s.success());
    let script = dir.path().join("cancel.py");
    fs::write(
        &script,
        r#"import sys, threading, time, psycopg
from psycopg import pq
print("libpq", pq.version(), flush=True)
conn = psycopg.connect(sys.argv[1])
def cancel():
    time.sleep(1.0)
    try:
        conn.cancel_safe(timeout=10)
        print("cancel_safe ok", flush=True)
    except Exception as e:
        print("cancel_safe failed:", repr(e), flush=True)
t = threading.Thread(target=cancel)
t.start()
try:
    conn.execute("SELECT pg_sleep(30)")
    print("not cancelled", flush=True)
except psycopg.errors.QueryCanceled:
    print("query cancelled", flush=True)
t.join()
"#,
    )
    .expect("script");
    let bot = Cgroup::new("clients-bot");
    let policy = format!(
        "[[identity]]\nname = \"admin-bot\"\ncgroup = \"{}\"\n\n{}\n{}",
        bot.glob(),
        app_target(&pg, &secret, ""),
        allow_all_rules(),
    );
    let agent = AgentProc::start("clients", FailMode::Closed, &policy);
    let o = bot
        .command(Path::new("/usr/bin/python3"))
        .arg(&script)
        .arg(format!(
            "host=127.0.0.1 port={} user=bot password=wrong dbname=app sslmode=prefer",
            pg.port
        ))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PYTHONPATH", &site)
        .env("HOME", dir.path())
        .output()
        .expect("python3");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{out}");
    assert!(
        out.contains("query cancelled") && out.contains("cancel_safe ok"),
        "{out}\nagent log:\n{}",
        agent.stderr_text()
    );
}
