//! PostgreSQL protocol fidelity through tollgate (issue 13): errors as the server gives them,
//! fast-path function calls, connection-level errors that name their cause, TLS close, catalog
//! freshness and large messages. A real kernel, a real PostgreSQL 15 server, and unmodified
//! clients (psql, tg-pgraw, tg-pgclient) running in a bot cgroup.

use std::{path::Path, process::Output};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

fn policy(pg: &PgServer, bot: &Cgroup, secret_file: &Path, extra: &str) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

{target}
[[rule]]
name = "ci reads and writes rows"
identities = ["ci-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "insert", "update", "set", "show", "begin", "commit", "rollback", "copy", "create"] }}

[[rule]]
name = "no-drop"
identities = ["ci-bot"]
targets = ["app-db"]
action = "deny"
sql = {{ statements = ["drop", "truncate"] }}
{extra}
"#,
        glob = bot.glob(),
        target = app_target(pg, secret_file, ""),
    )
}

struct Fixture {
    pg: PgServer,
    bot: Cgroup,
    agent: AgentProc,
    _dir: TempDir,
}

fn fixture(tag: &str, extra: &str) -> Fixture {
    require_root();
    let pg = PgServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let dir = TempDir::new(&format!("{tag}-secret"));
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let agent = AgentProc::start(tag, FailMode::Closed, &policy(&pg, &bot, &secret, extra));
    Fixture {
        pg,
        bot,
        agent,
        _dir: dir,
    }
}

impl Fixture {
    /// psql as the bot (a wrong password: identity comes from the kernel).
    fn psql(&self, args: &[&str]) -> Output {
        let conn = format!("host=127.0.0.1 port={} user=bot dbname=app password=wrong-on-purpose sslmode=disable connect_timeout=10", self.pg.port);
        self.bot
            .command(Path::new("/usr/bin/psql"))
            .arg(conn)
            .args(["-X", "-v", "VERBOSITY=verbose"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("psql")
    }

    /// tg-pgraw as the bot: one JSON object.
    fn raw(&self, script: &str) -> serde_json::Value {
        let o = self
            .bot
            .command(Path::new(env!("CARGO_BIN_EXE_tg-pgraw")))
            .args(["127.0.0.1", &self.pg.port.to_string(), script])
            .output()
            .expect("tg-pgraw");
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
            panic!(
                "tg-pgraw: {}\n--- agent ---\n{}",
                text(&o),
                self.agent.stderr_text()
            )
        })
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// psql through the agent and direct (as the superuser) print the same syntax error: 42601
/// with the parser's message, LINE and caret, and no "ask for access" hint. With
/// standard_conforming_strings off, a backslash-escaped quote is valid SQL and runs.
#[test]
fn syntax_errors_come_back_as_the_server_gives_them() {
    let f = fixture("pgsyntax", "");
    let o = f.psql(&["-c", "SELECT 1 AS a,\n  2 FRM t"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("ERROR:  42601: syntax error at or near \"t\""),
        "{t}"
    );
    // The caret under the `t`, as psql prints it for a direct connection.
    assert!(t.contains("LINE 2:   2 FRM t\n                ^"), "{t}");
    assert!(!t.contains("HINT"), "{t}");
    assert!(!t.contains("42501"), "{t}");
    let o = f.psql(&["-c", "selec 1"]);
    let t = text(&o);
    assert!(
        t.contains("ERROR:  42601: syntax error at or near \"selec\"\nLINE 1: selec 1\n        ^"),
        "{t}"
    );
    // The extended protocol gets the position too (tg-pgraw prints code: message@position).
    let v = f.raw("P s|SELECT 1 FRM t\nS\nQ SELECT 2");
    assert_eq!(
        v["errors"][0], "42601: syntax error at or near \"t\"@14",
        "{v}"
    );
    assert_eq!(v["rows"][0][0], "2", "{v}");

    // standard_conforming_strings off, as pg_regress sets it: 'a\'b' is one string.
    let o = f.psql(&[
        "-At",
        "-c",
        "SET standard_conforming_strings = off",
        "-c",
        "SELECT 'a\\'b' AS s",
        "-c",
        "SELECT 'x\\'' ; DROP TABLE orders; --'",
    ]);
    let t = text(&o);
    assert!(t.contains("a'b\n"), "{t}");
    // ... and the hidden DROP is read as the server reads it: denied by policy.
    assert!(t.contains("42501") && t.contains("drop"), "{t}");
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM orders", "app")
            .trim(),
        "10"
    );
}
