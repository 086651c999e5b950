//! Real PostgreSQL client libraries through tollgate, unprivileged in a bot cgroup, under the
//! allow-all rule (`policy/examples/allow-all.toml`, verbatim). The libraries come from
//! `cargo xtask setup`: psycopg 3 and asyncpg in `<tools>/pyvenv` (pinned from PyPI),
//! node-postgres in `vm-tests/clients/node_modules` (npm ci from its package-lock.json).
//!
//! The `*_same_through_agent` tests run one script per library (`vm-tests/clients/`), which
//! prints one JSON document of everything the library observed, first directly (before the
//! agent starts, so nothing is redirected) and then through the agent, and compare the two.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
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

/// Which client library a comparison runs, and how.
#[derive(Clone, Copy)]
enum Lib {
    Psycopg,
    Asyncpg,
    NodePg,
}

impl Lib {
    fn tag(self) -> &'static str {
        match self {
            Lib::Psycopg => "psycopg",
            Lib::Asyncpg => "asyncpg",
            Lib::NodePg => "nodepg",
        }
    }

    fn script(self) -> &'static str {
        match self {
            Lib::Psycopg => "psycopg_all.py",
            Lib::Asyncpg => "asyncpg_all.py",
            Lib::NodePg => "node_pg_all.js",
        }
    }
}

fn clients_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
    assert!(
        d.join("node_modules/pg/package.json").is_file(),
        "node-postgres is not installed in {}: run `cargo xtask setup` as root",
        d.display()
    );
    d
}

/// Run `lib`'s script as the bot with the connection `args` (JSON) and parse its document.
fn run_script(
    lib: Lib,
    bot: &Cgroup,
    work: &Path,
    args: &Value,
    agent_log: &dyn Fn() -> String,
) -> Value {
    let script = work.join("clients").join(lib.script());
    let mut cmd = match lib {
        Lib::Psycopg | Lib::Asyncpg => {
            let mut c = bot.command(Path::new("/usr/bin/python3"));
            c.arg(&script).env("PYTHONPATH", work.join("site"));
            c
        }
        Lib::NodePg => {
            let mut c = bot.command(Path::new("/usr/bin/node"));
            c.arg(&script);
            c
        }
    };
    let o = cmd
        .arg(args.to_string())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", work)
        .env("PYTHONPATH", work.join("site"))
        .current_dir(work.join("clients"))
        .output()
        .expect("client script");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}\nagent log:\n{}",
        lib.script(),
        o.status,
        agent_log()
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{}: not one JSON document ({e}):\n{stdout}\n{stderr}",
            lib.script()
        )
    })
}

/// Paths (`a.b[3]`) where `a` and `b` differ, with both values.
fn differences(a: &Value, b: &Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = format!("{at}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => differences(v, w, &p, out),
                    (v, w) => out.push(format!("{p}: direct {v:?}, through the agent {w:?}")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{at}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{at}: direct {a}, through the agent {b}")),
        _ => {}
    }
}

/// The same script directly and through the agent: equal documents, except `volatile`.
fn same_through_agent(lib: Lib) {
    require_root();
    let tag = format!("cl-{}", lib.tag());
    let pg = PgServer::start(&tag);
    let dir = TempDir::new(&tag);
    let work = dir.path();
    let secret = work.join("app-rw.pw");
    fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    // The bot (65534) cannot enter root's tools dir or the worktree: readable copies.
    for (from, to) in [(site_packages(), "site"), (clients_dir(), "clients")] {
        let s = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(work.join(to))
            .status()
            .expect("cp");
        assert!(s.success());
    }
    let s = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(work)
        .status()
        .expect("chmod");
    assert!(s.success());
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let conn = |user: &str, password: &str| {
        serde_json::json!({
            "host": "127.0.0.1", "port": pg.port, "user": user, "password": password, "dbname": "app",
        })
    };
    // Direct: no agent runs yet, so no redirect is attached; the bot logs in as the role the
    // credential names, with its password.
    let direct = run_script(lib, &bot, work, &conn("app_rw", APP_PASSWORD), &|| {
        String::new()
    });
    // Through the agent: the bot names itself and a wrong password; the agent logs in with the
    // credential. A successful run with these is itself proof that it went through the agent.
    // `pool = false`, as allow-all.toml says: every session gets a backend of its own.
    let policy = format!(
        "[[identity]]\nname = \"admin-bot\"\ncgroup = \"{}\"\n\n{}\n{}",
        bot.glob(),
        app_target(&pg, &secret, "pool = false\n"),
        allow_all_rules(),
    );
    let agent = AgentProc::start(&tag, FailMode::Closed, &policy);
    let via = run_script(lib, &bot, work, &conn("bot", "wrong"), &|| {
        agent.stderr_text()
    });
    assert_eq!(via["volatile"]["login_user"], "bot", "{via}");
    // `volatile` holds what legitimately differs: backend PIDs (a new backend per run) and the
    // user the client named at login (app_rw directly; the bot's own name through the agent,
    // which logs in as app_rw: `server.current_user` is compared and must be app_rw both ways).
    let strip = |mut v: Value| {
        v.as_object_mut().expect("document").remove("volatile");
        v
    };
    let (direct, via) = (strip(direct), strip(via));
    let mut diffs = Vec::new();
    differences(&direct, &via, "", &mut diffs);
    assert!(
        diffs.is_empty(),
        "{}: {} differences direct vs through the agent:\n{}\n--- direct ---\n{}\n--- through the agent ---\n{}\n--- agent log ---\n{}",
        lib.tag(),
        diffs.len(),
        diffs.join("\n"),
        serde_json::to_string_pretty(&direct).unwrap_or_default(),
        serde_json::to_string_pretty(&via).unwrap_or_default(),
        agent.stderr_text()
    );
}

/// psycopg 3 (libpq 18): server-side cursors, COPY both ways (text, binary, CSV), LISTEN/NOTIFY,
/// binary results, pipeline mode, prepared statements, typed parameters, errors, savepoints.
#[test]
fn psycopg_same_through_agent() {
    same_through_agent(Lib::Psycopg);
}

/// asyncpg (its own protocol code, binary results): cursors on portals, COPY both ways,
/// LISTEN/NOTIFY, prepared statements, pipelined executemany, errors, savepoints.
#[test]
fn asyncpg_same_through_agent() {
    same_through_agent(Lib::Asyncpg);
}

/// node-postgres with pg-cursor and pg-copy-streams: cursors, COPY both ways, LISTEN/NOTIFY,
/// named (prepared) queries, binary results, errors, savepoints.
#[test]
fn node_pg_same_through_agent() {
    same_through_agent(Lib::NodePg);
}
