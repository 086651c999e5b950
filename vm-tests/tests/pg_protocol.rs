//! PostgreSQL protocol fidelity through tollgate (issue 13): errors as the server gives them,
//! fast-path function calls, connection-level errors that name their cause, TLS close, catalog
//! freshness and large messages. A real kernel, a real PostgreSQL 15 server, and unmodified
//! clients (psql, tg-pgraw, tg-pgclient) running in a bot cgroup.

use std::{path::Path, process::Output};

use vm_tests::{
    pg::{app_target, PgGate, PgServer},
    Cgroup,
};

/// The policy: `extra` rules (decided first), then rows and DDL allowed, DROP denied.
fn policy(pg: &PgServer, bot: &Cgroup, secret_file: &Path, extra: &str) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

{target}
{extra}
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
"#,
        glob = bot.glob(),
        target = app_target(pg, secret_file, ""),
    )
}

/// The shared gate (`vm_tests::pg::PgGate`) with this file's helpers.
struct Fixture(PgGate);

impl std::ops::Deref for Fixture {
    type Target = PgGate;
    fn deref(&self) -> &PgGate {
        &self.0
    }
}

fn fixture(tag: &str, extra: &str) -> Fixture {
    Fixture(PgGate::start(tag, |pg, bot, secret| {
        policy(pg, bot, secret, extra)
    }))
}

impl Fixture {
    /// psql as the bot (a wrong password: identity comes from the kernel).
    fn psql(&self, args: &[&str]) -> Output {
        vm_tests::pg::bot_psql(&self.bot, self.pg.port, args)
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

/// After an error in an extended-protocol message the server skips every message up to the
/// Sync, simple queries included. A client that sends more of them only once it has read the
/// error (psycopg's pipeline mode can) gets one ReadyForQuery for all of them, and every
/// answer after it still goes with its own message: a syntax error answered by the server's
/// parser is not given again to the next statement, and a skipped query (allowed, refused, or
/// a syntax error) gets no answer, as it gets none directly. Nothing is left in flight after
/// it: the last statement is read as the server reads it (standard_conforming_strings on),
/// which is certain only then (while anything is in flight a backslash is read both ways, and
/// one of the readings is a DROP).
#[test]
fn messages_skipped_after_an_error_leave_later_answers_in_place() {
    let f = fixture("pgskip", "");
    let v = f.raw(
        "P |SELECT 1/0\nB |\nE \nH\nW\nP |SELECT 2\nB |\nE \nS\n\
         Q SELEC 1\nQ SELECT 3\nP |SELECT 4\nB |\nE \nS\n\
         P |SELECT 1/0\nB |\nE \nH\nW\nP |SELECT 5\nB |\nE \nSN\nQ SELEC 6\n\
         P |SELECT 7\nB |\nE \nS\n\
         P |SELECT 1/0\nB |\nE \nH\nW\nQN SELECT 8\nQN SELEC 9\nQN DROP TABLE orders\n\
         P |SELECT 10\nB |\nE \nS\nQ SELECT 11\n\
         Q SELECT 'a\\' || ' ; DROP TABLE orders; --'",
    );
    assert_eq!(
        v["errors"],
        serde_json::json!([
            "22012: division by zero",
            "42601: syntax error at or near \"SELEC\"@1",
            "22012: division by zero",
            "42601: syntax error at or near \"SELEC\"@1",
            "22012: division by zero",
        ]),
        "{v}"
    );
    assert_eq!(
        v["rows"],
        serde_json::json!([["3"], ["4"], ["7"], ["11"], ["a\\ ; DROP TABLE orders; --"]]),
        "{v}"
    );
}

/// Fast-path function calls (libpq's large-object API) are decided as SQL calls of the
/// function their OID names: allowed where a rule names the functions, refused naming the
/// function otherwise, refused for an OID the catalog does not know; audited without values.
#[test]
fn fast_path_calls_are_decided_as_calls_of_the_function_they_name() {
    let f = fixture(
        "pgfastpath",
        r#"
[[rule]]
name = "large objects"
identities = ["ci-bot"]
targets = ["app-db"]
action = "allow"
sql = { statements = ["select"], functions = ["lo_creat", "lo_open", "lo_close", "loread", "lowrite"] }
"#,
    );
    let oids = f.pg.superuser_sql(
        "SELECT string_agg(p::regproc::oid::text, ' ' ORDER BY n) FROM unnest(
           array['lo_creat', 'lo_open', 'lowrite', 'loread', 'lo_close', 'lo_unlink'])
           WITH ORDINALITY AS u(p, n)",
        "app",
    );
    let o: Vec<&str> = oids.split_whitespace().collect();
    let (creat, open, write, read, close, unlink) = (o[0], o[1], o[2], o[3], o[4], o[5]);
    let v = f.raw(&format!(
        "Q BEGIN
         F {creat}|-1
         F {open}|$r1|131072
         F {write}|$r2|hello fast path
         F {close}|$r2
         F {open}|$r1|262144
         F {read}|$r5|100
         F {close}|$r5
         F {unlink}|$r1
         Q ROLLBACK
         F 999999|1
         Q BEGIN
         F {creat}|-1
         Q COMMIT"
    ));
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 8, "{v}");
    assert_eq!(results[2], 15, "lowrite wrote 15 bytes: {v}");
    assert_eq!(results[5], "hello fast path", "{v}");
    let errors = v["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 2, "{v}");
    let e = errors[0].as_str().expect("error");
    assert!(
        e.starts_with("42501: ") && e.contains("lo_unlink"),
        "a refusal names the function: {v}"
    );
    let e = errors[1].as_str().expect("error");
    assert!(
        e.contains("OID 999999") && e.contains("not in the catalog snapshot"),
        "{v}"
    );
    // Audited as calls, without argument values.
    let audit = f.agent.audit();
    let ops: Vec<&str> = audit
        .iter()
        .filter_map(|l| l["operation"].as_str())
        .filter(|o| o.starts_with("fast-path call"))
        .collect();
    assert!(
        ops.contains(&"fast-path call pg_catalog.lowrite(2 arguments)"),
        "{ops:?}"
    );
    assert!(
        !audit
            .iter()
            .any(|l| l.to_string().contains("hello fast path")),
        "no argument value in the audit log"
    );
    // The committed object exists; the refused call did not run.
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM pg_largeobject_metadata", "app")
            .trim(),
        "1"
    );
}

/// A connection no identity matches gets a FATAL that says so, with the facts the agent saw,
/// instead of a reset; an upstream login failure says what the server said, and blames the
/// credential only when the server rejected it.
#[test]
fn connection_errors_name_the_real_cause() {
    let f = fixture("pgcause", "");
    let stranger = Cgroup::new("pgcause-stranger");
    let conn = format!(
        "host=127.0.0.1 port={} user=bot dbname=app password=x sslmode=prefer connect_timeout=10",
        f.pg.port
    );
    let o = stranger
        .command(Path::new("/usr/bin/psql"))
        .args([conn.as_str(), "-X", "-c", "SELECT 1"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("psql");
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("FATAL:  tollgate: no identity matched"), "{t}");
    assert!(t.contains(stranger.name()), "the cgroup it saw: {t}");
    assert!(t.contains("uid 65534"), "{t}");

    let o = f.psql(&["-c", "SELECT 1"]);
    assert!(o.status.success(), "{}", text(&o));
    let conn = format!(
        "host=127.0.0.1 port={} user=bot dbname=nosuch password=x sslmode=disable connect_timeout=10",
        f.pg.port
    );
    let o = f
        .bot
        .command(Path::new("/usr/bin/psql"))
        .args([conn.as_str(), "-X", "-c", "SELECT 1"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("psql");
    let t = text(&o);
    assert!(t.contains("database \"nosuch\" does not exist"), "{t}");
    assert!(!t.contains("credential"), "not the credential's fault: {t}");
}

/// Every TLS connection the agent ends gets a close_notify, a cancel connection included
/// (libpq 17 sends CancelRequest encrypted under sslmode=prefer and reports "cancellation
/// failed" when the connection ends without one). openssl s_client reports an end without
/// close_notify as "unexpected eof while reading".
#[test]
fn tls_connections_end_with_close_notify() {
    let f = fixture("pgtlsclose", "");
    let mut cancel = Vec::new();
    cancel.extend_from_slice(&16i32.to_be_bytes());
    cancel.extend_from_slice(&80_877_102i32.to_be_bytes());
    cancel.extend_from_slice(&4242i32.to_be_bytes());
    cancel.extend_from_slice(&77i32.to_be_bytes());
    let mut child = f
        .bot
        .command(Path::new("/usr/bin/openssl"))
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", f.pg.port),
            "-starttls",
            "postgres",
            "-quiet",
            "-state",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&cancel).expect("cancel");
        // Keep stdin open until the agent has ended the connection.
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    let (_, out, err) = vm_tests::wait_child(child, std::time::Duration::from_secs(10), "openssl");
    let t = format!("{out}{err}");
    assert!(
        t.contains("SSL negotiation finished") || t.contains("SSLok"),
        "TLS was set up: {t}"
    );
    assert!(!t.contains("unexpected eof"), "no close_notify: {t}");
    assert!(t.contains("close notify"), "{t}");
}

/// Under a mask rule, COPY of a table without columns (pg_dump dumps them) is known to the
/// catalog and passes.
#[test]
fn zero_column_tables_copy_under_a_mask_rule() {
    let f = fixture(
        "pgzerocol",
        r#"
[[mask]]
targets = ["app-db"]
columns = ["*.email"]
style = "full"
"#,
    );
    f.pg.superuser_sql(
        "SET ROLE app_rw; CREATE TABLE nothing_here (); INSERT INTO nothing_here DEFAULT VALUES;",
        "app",
    );
    let o = f.psql(&[
        "-c",
        "COPY public.nothing_here TO STDOUT",
        "-c",
        "COPY customers (id, email) TO STDOUT",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.starts_with("\n1\t"),
        "one empty row, then masked rows: {t}"
    );
    assert!(!t.contains("@"), "{t}");
}
