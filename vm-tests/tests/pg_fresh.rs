//! Catalog freshness (issue 13 item 5), on a real kernel with a real PostgreSQL server: a bot
//! allowed to create tables makes one with a masked column and at once COPYs it TO STDOUT and
//! selects a value derived from the masked column, in the same session and in a new session
//! that starts from the cached (older) snapshot. The values come back masked, not refused and
//! not in clear.

use std::{path::Path, process::Output};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

fn policy(pg: &PgServer, bot: &Cgroup, secret: &Path) -> String {
    format!(
        r#"[[identity]]
name = "bot"
cgroup = "{bot}"

{target}
[[rule]]
name = "bot builds and reads"
identities = ["bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "insert", "create", "alter", "drop", "copy", "begin", "commit"] }}

[[mask]]
targets = ["app-db"]
columns = ["*.email"]
style = "partial"
"#,
        bot = bot.glob(),
        target = app_target(pg, secret, ""),
    )
}

fn psql(bot: &Cgroup, port: u16, sql: &[&str]) -> Output {
    let conn = format!(
        "host=127.0.0.1 port={port} user=bot dbname=app password=wrong sslmode=disable connect_timeout=10"
    );
    let mut cmd = bot.command(Path::new("/usr/bin/psql"));
    cmd.arg(conn)
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    for s in sql {
        cmd.arg("-c").arg(s);
    }
    cmd.output().expect("psql")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_table_created_seconds_ago_is_masked_not_refused() {
    require_root();
    let tag = "pgfresh";
    let pg = PgServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let dir = TempDir::new(&format!("{tag}-secret"));
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let agent = AgentProc::start(tag, FailMode::Closed, &policy(&pg, &bot, &secret));
    let ctx = |o: &Output| format!("{}\n--- agent ---\n{}", text(o), agent.stderr_text());

    // A first session reads (and caches) the snapshot before the tables exist.
    let o = psql(&bot, pg.port, &["SELECT 1"]);
    assert!(o.status.success(), "{}", ctx(&o));

    // Same session: create, fill, then COPY and a derived value at once.
    let o = psql(
        &bot,
        pg.port,
        &[
            "CREATE TABLE fresh_a (id int, email text)",
            "INSERT INTO fresh_a VALUES (1, 'fresh.secret@example.com')",
            "COPY fresh_a TO STDOUT",
            "SELECT upper(email) FROM fresh_a",
            "SELECT email FROM fresh_a",
        ],
    );
    let t = text(&o);
    assert!(o.status.success(), "same session: {}", ctx(&o));
    assert!(
        !t.contains("secret") && !t.contains("SECRET"),
        "same session leaked: {}",
        ctx(&o)
    );
    assert!(t.contains("@example.com"), "masked, not empty: {}", ctx(&o));

    // A column added by DDL the session ran is masked in the same session.
    let o = psql(
        &bot,
        pg.port,
        &[
            "CREATE TABLE fresh_b (id int)",
            "INSERT INTO fresh_b VALUES (1)",
            "SELECT id FROM fresh_b",
            "ALTER TABLE fresh_b ADD COLUMN email text DEFAULT 'alter.secret@example.com'",
            "COPY fresh_b TO STDOUT",
            "SELECT email FROM fresh_b",
        ],
    );
    let t = text(&o);
    assert!(o.status.success(), "after ALTER: {}", ctx(&o));
    assert!(!t.contains("secret"), "after ALTER leaked: {}", ctx(&o));

    // Created by someone else after this (target, database)'s snapshot was cached: a new
    // session starts from the cached snapshot, and the statement naming it re-reads.
    pg.superuser_sql(
        "SET ROLE app_rw; CREATE TABLE fresh_c (id int, email text);
         INSERT INTO fresh_c VALUES (1, 'other.secret@example.com');",
        "app",
    );
    let o = psql(
        &bot,
        pg.port,
        &[
            "COPY fresh_c TO STDOUT",
            "SELECT lower(email) FROM fresh_c",
            "COPY (SELECT email FROM fresh_c) TO STDOUT",
        ],
    );
    let t = text(&o);
    assert!(o.status.success(), "other session's table: {}", ctx(&o));
    assert!(
        !t.contains("secret"),
        "other session's table leaked: {}",
        ctx(&o)
    );
    assert!(t.contains("@example.com"), "masked, not empty: {}", ctx(&o));
}
