//! PostgreSQL through tollgate, on a real kernel with a real PostgreSQL 15 server (SCRAM) and
//! an unmodified psql running unprivileged in a bot cgroup.

use std::{path::Path, process::Output};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD, SECRET_CARD, SECRET_EMAIL},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

fn policy(pg: &PgServer, bot: &Cgroup, secret_file: &Path) -> String {
    policy_with(pg, bot, secret_file, "")
}

/// [`policy`] with `target_extra` lines in the target.
fn policy_with(pg: &PgServer, bot: &Cgroup, secret_file: &Path, target_extra: &str) -> String {
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
sql = {{ statements = ["select", "insert", "update", "set", "show", "begin", "commit", "rollback", "copy"] }}

[[rule]]
name = "deletes need a human"
identities = ["ci-bot"]
targets = ["app-db"]
action = "approve"
sql = {{ statements = ["delete"] }}

[[rule]]
name = "no-ddl"
identities = ["ci-bot"]
targets = ["app-db"]
action = "deny"
sql = {{ statements = ["drop", "truncate", "alter", "create"] }}

[[mask]]
targets = ["app-db"]
columns = ["*.email", "customers.card_number"]
detectors = ["email", "credit_card", "aws_access_key"]
style = "partial"
"#,
        glob = bot.glob(),
        target = app_target(pg, secret_file, target_extra),
    )
}

struct Fixture {
    pg: PgServer,
    bot: Cgroup,
    agent: AgentProc,
    secret_dir: TempDir,
}

fn fixture(tag: &str) -> Fixture {
    require_root();
    let pg = PgServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let dir = TempDir::new(&format!("{tag}-secret"));
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let agent = AgentProc::start(tag, FailMode::Closed, &policy(&pg, &bot, &secret));
    Fixture {
        pg,
        bot,
        agent,
        secret_dir: dir,
    }
}

impl Fixture {
    /// psql as the bot, with a WRONG password: identity comes from the kernel.
    fn psql(&self, args: &[&str]) -> Output {
        psql_as(&self.bot, &self.pg, args)
    }
}

/// psql in cgroup `bot` to `pg`, with a WRONG password.
fn psql_as(bot: &Cgroup, pg: &PgServer, args: &[&str]) -> Output {
    vm_tests::pg::bot_psql(bot, pg.port, args)
}

/// The backend pid psql printed as `pid=N` (the output must be a success).
fn backend_pid(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("pid=").map(str::to_string))
        .unwrap_or_else(|| panic!("no pid in {}", text(o)))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn psql_select_is_masked_and_ddl_denied_without_ending_the_session() {
    let f = fixture("pgpsql");
    // Masked select with a wrong password.
    let o = f.psql(&[
        "-Atc",
        "SELECT id, name, email, card_number, note FROM customers ORDER BY id",
    ]);
    let t = text(&o);
    assert!(
        o.status.success(),
        "{t}\n--- agent ---\n{}",
        f.agent.stderr_text()
    );
    assert!(t.contains("Alice"), "{t}");
    assert!(!t.contains(SECRET_EMAIL), "email leaked: {t}");
    assert!(!t.contains(SECRET_CARD), "card leaked: {t}");
    assert!(t.contains("1111"), "partial style keeps the last 4: {t}");
    assert!(
        !t.contains("bob@example.org"),
        "detector missed the note column: {t}"
    );

    // DROP is denied with 42501 and the next statement in the same session still runs.
    let o = f.psql(&[
        "-c",
        "DROP TABLE customers",
        "-c",
        "SELECT count(*) AS n FROM customers",
    ]);
    let t = text(&o);
    assert!(t.contains("42501"), "{t}");
    assert!(t.contains("no-ddl"), "the message names the rule: {t}");
    assert!(
        t.contains(" 2\n") || t.contains("2\n(1 row)"),
        "session continued: {t}"
    );
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM customers", "app")
            .trim(),
        "2"
    );

    // DELETE needs approval, which this agent cannot grant: refused with that message.
    let o = f.psql(&["-c", "DELETE FROM orders WHERE id = 1"]);
    let t = text(&o);
    assert!(t.contains("approval is not available"), "{t}");
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM orders", "app")
            .trim(),
        "10"
    );

    // A multi-statement string with one denied part runs nothing.
    let o = f.psql(&[
        "-c",
        "INSERT INTO audit_log(msg) VALUES ('x'); DROP TABLE orders",
    ]);
    assert!(text(&o).contains("42501"), "{}", text(&o));
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM audit_log", "app")
            .trim(),
        "0"
    );

    // Obfuscated and indirect destructive statements are denied too.
    for sql in [
        "/* hi */ dRoP TaBlE orders",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
        "EXPLAIN ANALYZE DELETE FROM orders",
        "DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$",
        "SELECT pg_read_file('/etc/passwd')",
        "COPY orders TO PROGRAM 'cat > /tmp/x'",
        "PREPARE p AS DELETE FROM orders",
    ] {
        let o = f.psql(&["-c", sql]);
        let t = text(&o);
        assert!(!o.status.success() && t.contains("tollgate"), "{sql}: {t}");
    }
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM orders", "app")
            .trim(),
        "10"
    );
    // A secret in free text, changed by SQL the way a bot would to slip past a detector:
    // lowercased, initcapped, glued to other characters. Every form comes back masked, and
    // the SQL the bot sent shows no key either (it names the column, not the value).
    f.pg.superuser_sql(
        "UPDATE customers SET note = 'deploy key AKIAIOSFODNN7EXAMPLE' WHERE id = 1",
        "app",
    );
    let o = f.psql(&[
        "-Atc",
        "SELECT lower(note), initcap(note), 'x' || replace(note, ' ', ''), upper(lower(note)) FROM customers WHERE id = 1",
    ]);
    let t = text(&o);
    assert!(o.status.success() && t.contains("deploy"), "{t}");
    for form in [
        "AKIAIOSFODNN7EXAMPLE",
        "akiaiosfodnn7example",
        "Akiaiosfodnn7example",
        "IOSFODNN7EXAMPLE",
        "iosfodnn7example",
    ] {
        assert!(
            !t.to_ascii_lowercase().contains(&form.to_ascii_lowercase()),
            "{form} leaked: {t}"
        );
    }

    // A string literal that mentions DROP is just a select.
    let o = f.psql(&["-Atc", "SELECT 'DROP TABLE orders' AS s"]);
    assert!(
        o.status.success() && text(&o).contains("DROP TABLE orders"),
        "{}",
        text(&o)
    );

    // Passwords written into statements (allowed or not) are audited and recorded redacted.
    let o = f.psql(&[
        "-c",
        "ALTER ROLE app_ro PASSWORD 'tg-new-pass-91'",
        "-c",
        "SELECT dblink_connect('c', 'host=db password=tg-dblink-pass-77')",
        "-c",
        "SELECT 'postgresql://u:tg-uri-pass-55@db/app' AS uri",
    ]);
    let t = text(&o);
    let audit = f.agent.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["operation"] == "ALTER ROLE app_ro PASSWORD '[redacted]'"),
        "{t}\n{audit:#?}"
    );
    // Nothing the agent wrote contains the upstream password or the planted secrets.
    let mut written = String::new();
    for entry in walk(&f.agent.data_dir) {
        written.push_str(&std::fs::read_to_string(&entry).unwrap_or_default());
    }
    written.push_str(&f.agent.stderr_text());
    for secret in [
        APP_PASSWORD,
        SECRET_EMAIL,
        SECRET_CARD,
        "tg-new-pass-91",
        "tg-dblink-pass-77",
        "tg-uri-pass-55",
    ] {
        assert!(
            !written.contains(secret),
            "{secret} leaked into agent output"
        );
    }
    assert!(
        !written.to_ascii_lowercase().contains("iosfodnn7example"),
        "the AWS key leaked into agent output"
    );
    let audit = f.agent.audit();
    assert!(audit.iter().any(|e| e["event"] == "operation"
        && e["kind"] == "drop"
        && e["action"] == "deny"
        && e["rule"] == "no-ddl"));
    assert!(audit
        .iter()
        .any(|e| e["event"] == "operation" && e["kind"] == "select" && e["action"] == "allow"));
}

/// Every event of every session recording under `data_dir`.
fn recorded(data_dir: &Path) -> Vec<serde_json::Value> {
    walk(&data_dir.join("sessions"))
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<serde_json::Value>>()
        })
        .collect()
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != "mask.key") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn tokio_postgres_extended_protocol_matches_direct_except_masked_columns() {
    let f = fixture("pgtokio");
    let client = env!("CARGO_BIN_EXE_tg-pgclient");
    // Direct: over the Unix socket with the real password (the kernel hooks only see TCP).
    let direct = std::process::Command::new(client)
        .arg(format!(
            "host={} port={} user=app_rw password={APP_PASSWORD} dbname=app",
            f.pg.dir.path().display(),
            f.pg.port
        ))
        .output()
        .expect("direct client");
    assert!(direct.status.success(), "{}", text(&direct));
    // Through tollgate: TCP to the protected address, as the bot, with a wrong password.
    let proxied = f
        .bot
        .command(Path::new(client))
        .arg(format!(
            "host=127.0.0.1 port={} user=bot password=wrong dbname=app",
            f.pg.port
        ))
        .output()
        .expect("proxied client");
    assert!(
        proxied.status.success(),
        "{}\n--- agent ---\n{}",
        text(&proxied),
        f.agent.stderr_text()
    );
    let d: serde_json::Value = serde_json::from_slice(&direct.stdout).expect("direct json");
    let p: serde_json::Value = serde_json::from_slice(&proxied.stdout).expect("proxied json");

    assert_eq!(d["pipelined"], p["pipelined"], "pipelined results differ");
    assert_eq!(d["insert"], p["insert"]);
    assert_eq!(
        p["after_denial"], 42,
        "session continues after a denial: {p}"
    );
    assert_eq!(p["drop"]["code"], "42501", "{p}");
    assert_eq!(
        d["drop"]["code"], "42P01",
        "direct: the table does not exist: {d}"
    );
    // Same rows; id and name identical, email and card masked (never the planted values).
    let (dr, pr) = (
        d["prepared"].as_array().expect("rows"),
        p["prepared"].as_array().expect("rows"),
    );
    assert_eq!(dr.len(), pr.len());
    for (a, b) in dr.iter().zip(pr) {
        assert_eq!(a[0], b[0]);
        assert_eq!(a[1], b[1]);
        assert_ne!(a[2], b[2], "email must be masked: {b}");
        assert_ne!(a[3], b[3], "card must be masked: {b}");
    }
    let s = String::from_utf8_lossy(&proxied.stdout);
    assert!(!s.contains(SECRET_EMAIL) && !s.contains(SECRET_CARD), "{s}");
}

#[test]
fn malformed_bytes_get_a_clean_error_and_the_agent_keeps_serving() {
    let f = fixture("pgbad");
    let addr = f.pg.addr();
    // Garbage as a startup packet, and an absurd length: the bot gets a protocol error (or a
    // closed connection), never a hang, and nothing reaches the server.
    for bytes in ["64", "100000"] {
        let r = f.bot.probe(
            vm_tests::probe_bin!(),
            &[
                "--connect",
                &addr,
                "--send-bytes",
                bytes,
                "--timeout-ms",
                "5000",
            ],
        );
        assert!(r.connected(), "{r}");
    }
    // The agent still serves a well-behaved bot.
    let o = f.psql(&["-Atc", "SELECT 40 + 2"]);
    assert!(
        o.status.success() && text(&o).contains("42"),
        "{}\n--- agent ---\n{}",
        text(&o),
        f.agent.stderr_text()
    );
    let audit = f.agent.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["event"] == "close" && e["status"] == "client"),
        "malformed sessions are closed as client errors: {audit:?}"
    );
}

#[test]
fn cancel_request_reaches_the_right_backend_quickly() {
    let f = fixture("pgcancel");
    vm_tests::pg::assert_sleep_cancelled_quickly(
        &f.bot,
        Path::new(env!("CARGO_BIN_EXE_tg-pgclient")),
        f.pg.port,
        || f.agent.stderr_text(),
    );
}

#[test]
fn upstream_dying_mid_result_gives_a_clean_error_and_others_are_served() {
    let f = fixture("pgdie");
    let conn = format!(
        "host=127.0.0.1 port={} user=bot dbname=app password=wrong sslmode=disable",
        f.pg.port
    );
    let child = f
        .bot
        .command(Path::new("/usr/bin/psql"))
        .arg(&conn)
        .args([
            "-X",
            "-Atc",
            "SELECT g, repeat('x', 100) FROM generate_series(1, 50000000) g",
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    // Wait until the query runs, then kill its backend from the server side.
    vm_tests::wait_for(
        std::time::Duration::from_secs(20),
        "the long query to start",
        || {
            let n = f.pg.superuser_sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_rw' AND query LIKE '%generate_series%' AND state = 'active'", "postgres");
            (n.trim() != "0").then_some(())
        },
    );
    f.pg.superuser_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app_rw' AND query LIKE '%generate_series%'", "postgres");
    let (status, _out, err) =
        vm_tests::wait_child(child, std::time::Duration::from_secs(30), "psql");
    assert!(!status.success(), "psql must fail: {err}");
    assert!(
        err.contains("terminating connection") || err.contains("tollgate"),
        "a clean error, not a hang: {err}"
    );
    // The agent keeps serving.
    let o = f.psql(&["-Atc", "SELECT 6 * 7"]);
    assert!(
        o.status.success() && text(&o).contains("42"),
        "{}",
        text(&o)
    );
}

/// A planted value only the COPY test inserts: an email inside free text with every character
/// COPY has to escape or quote around it.
const COPY_NOTE_EMAIL: &str = "carol.copy@example.net";

#[test]
fn psql_copy_to_stdout_is_masked_and_copy_from_stdin_still_works() {
    let f = fixture("pgcopy");
    f.pg.superuser_sql(
        &format!(
            "INSERT INTO customers VALUES (3, 'Carol', 'carol@example.com', '4000056655665556', \
             E'tab\\there, \"quoted\"\\nnew line \\\\ back {COPY_NOTE_EMAIL}')"
        ),
        "app",
    );
    let direct = f.pg.superuser_sql("COPY customers TO STDOUT", "app");
    assert!(direct.contains(SECRET_EMAIL) && direct.contains(COPY_NOTE_EMAIL));

    // Text format: every row arrives, masked.
    let o = f.psql(&["-c", "\\copy customers to stdout"]);
    let t = text(&o);
    assert!(
        o.status.success(),
        "{t}\n--- agent ---\n{}",
        f.agent.stderr_text()
    );
    for leaked in [
        SECRET_EMAIL,
        SECRET_CARD,
        COPY_NOTE_EMAIL,
        "bob@example.org",
        "4000056655665556",
    ] {
        assert!(!t.contains(leaked), "{leaked} leaked: {t}");
    }
    let lines: Vec<&str> = o
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| std::str::from_utf8(l).expect("utf8"))
        .collect();
    assert_eq!(lines.len(), 3, "one line per row: {t}");
    let alice: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(alice.len(), 5, "{t}");
    assert_eq!((alice[0], alice[1], alice[4]), ("1", "Alice", "vip"));
    assert!(
        alice[2].ends_with("@example.com") && alice[2] != SECRET_EMAIL,
        "{t}"
    );
    assert!(alice[3].ends_with("1111"), "partial keeps the last 4: {t}");
    let carol: Vec<&str> = lines[2].split('\t').collect();
    assert_eq!(carol.len(), 5, "escapes kept the row's shape: {t}");
    assert!(
        carol[4].starts_with("tab\\there, \"quoted\"\\nnew line \\\\ back "),
        "the note is re-escaped as PostgreSQL writes it: {t}"
    );

    // CSV with a header, custom delimiter and quoting.
    let o = f.psql(&[
        "-c",
        "\\copy customers (note, email, id) to stdout with (format csv, header, delimiter ';', force_quote *)",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.starts_with("note;email;id\n"), "{t}");
    for leaked in [SECRET_EMAIL, COPY_NOTE_EMAIL, "bob@example.org"] {
        assert!(!t.contains(leaked), "{leaked} leaked: {t}");
    }
    assert!(t.contains("\"vip\""), "{t}");

    // COPY (query) on a target with column rules: which output column is which table column
    // is only known to the server, so a query that reads a masked column has every value
    // masked in full.
    let o = f.psql(&["-c", "\\copy (select id, email from customers) to stdout"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        !t.contains(SECRET_EMAIL) && t.contains("********\t********"),
        "{t}"
    );
    // Binary output is refused, never passed.
    let o = f.psql(&["-c", "\\copy customers to stdout with (format binary)"]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("42501") && t.contains("binary"),
        "{t}"
    );
    // The session goes on after a refused COPY.
    let o = f.psql(&[
        "-c",
        "COPY customers TO STDOUT (FORMAT binary)",
        "-c",
        "SELECT 'still here'",
    ]);
    assert!(text(&o).contains("still here"), "{}", text(&o));

    // COPY FROM STDIN is decided as copy + insert and still works.
    let mut child = f
        .bot
        .command(Path::new("/usr/bin/psql"))
        .arg(format!(
            "host=127.0.0.1 port={} user=bot dbname=app password=wrong sslmode=disable",
            f.pg.port
        ))
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "\\copy orders (id, customer, amount) from pstdin",
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"101\t1\t1000\n102\t2\t2000\n")
            .expect("write");
    }
    let (status, out, err) =
        vm_tests::wait_child(child, std::time::Duration::from_secs(20), "psql copy from");
    assert!(status.success(), "{out}{err}");
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM orders WHERE id > 100", "app")
            .trim(),
        "2"
    );

    // Counted, recorded, and written nowhere in clear.
    assert!(
        f.agent.metric(
            "tollgate_masked_values_total",
            &[("target", "app-db"), ("detector", "column")]
        ) >= 6.0,
        "{}",
        f.agent.metrics_text()
    );
    let mut written = String::new();
    for entry in walk(&f.agent.data_dir) {
        written.push_str(&std::fs::read_to_string(&entry).unwrap_or_default());
    }
    written.push_str(&f.agent.stderr_text());
    for secret in [APP_PASSWORD, SECRET_EMAIL, SECRET_CARD, COPY_NOTE_EMAIL] {
        assert!(
            !written.contains(secret),
            "{secret} leaked into agent output"
        );
    }
    let results: Vec<serde_json::Value> = recorded(&f.agent.data_dir)
        .into_iter()
        .filter(|e| e["event"] == "result" && e["tag"] == "COPY 3")
        .collect();
    assert!(
        results
            .iter()
            .any(|e| e["rows"] == 3 && e["masked"].as_u64().unwrap_or(0) >= 6),
        "recorded COPY results: {results:?}"
    );
}

/// Backend state that `DISCARD ALL` leaves behind must not pass between identities that share
/// a credential: a kept connection goes only to a later session of the identity that left it.
#[test]
fn a_kept_connection_serves_only_the_identity_that_left_it() {
    require_root();
    let pg = PgServer::start("pgpoolid");
    let ci = Cgroup::new("pgpoolid-bot");
    let ops = Cgroup::new("pgpoolid-ops");
    let dir = TempDir::new("pgpoolid-secret");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let policy = format!(
        "{}\n[[identity]]\nname = \"ops-bot\"\ncgroup = \"{}\"\n\n[[rule]]\nname = \"ops reads\"\nidentities = [\"ops-bot\"]\ntargets = [\"app-db\"]\naction = \"allow\"\nsql = {{ statements = [\"select\"] }}\n",
        policy(&pg, &ci, &secret),
        ops.glob()
    );
    let agent = AgentProc::start("pgpoolid", FailMode::Closed, &policy);
    let backend = |bot: &Cgroup| -> String {
        let o = psql_as(
            bot,
            &pg,
            &["-At", "-c", "SELECT 'pid=' || pg_backend_pid()"],
        );
        assert!(
            o.status.success(),
            "{}\n--- agent ---\n{}",
            text(&o),
            agent.stderr_text()
        );
        backend_pid(&o)
    };
    let kept_idle = |n: f64| {
        vm_tests::wait_for(
            std::time::Duration::from_secs(10),
            "the ended session's backend kept idle",
            || (agent.metric("tollgate_pg_pool_idle_connections", &[]) == n).then_some(()),
        )
    };
    let ci_backend = backend(&ci);
    kept_idle(1.0);
    let ops_backend = backend(&ops);
    assert_ne!(
        ops_backend, ci_backend,
        "ops-bot was given the backend ci-bot left"
    );
    kept_idle(2.0);
    assert_eq!(backend(&ci), ci_backend, "ci-bot gets its own backend back");
    assert_eq!(
        backend(&ops),
        ops_backend,
        "ops-bot gets its own backend back"
    );
}

#[test]
fn a_finished_session_leaves_a_reset_connection_for_the_next_and_an_open_transaction_does_not() {
    let f = fixture("pgpool");
    let pid = backend_pid;
    // Session 1 dirties its backend: a setting, an advisory lock, an application name.
    let o = f.psql(&[
        "-At",
        "-c",
        "SET work_mem = '7MB'",
        "-c",
        "SELECT pg_advisory_lock(4242)",
        "-c",
        "SELECT set_config('application_name', 'dirty', false)",
        "-c",
        "SELECT 'pid=' || pg_backend_pid()",
    ]);
    let first = pid(&o);
    // Session 2 gets the same backend, reset: nothing of session 1 is left.
    let o = f.psql(&[
        "-At",
        "-c",
        "SELECT 'pid=' || pg_backend_pid()",
        "-c",
        "SHOW work_mem",
        "-c",
        "SELECT 'locks=' || count(*) FROM pg_locks WHERE locktype = 'advisory'",
        "-c",
        "SHOW application_name",
    ]);
    assert_eq!(pid(&o), first, "the second session reuses the backend");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains("\n4MB\n"),
        "work_mem is back to the default: {out}"
    );
    assert!(
        out.contains("locks=0"),
        "the advisory lock was released: {out}"
    );
    assert!(!out.contains("dirty"), "application_name was reset: {out}");
    let recordings: Vec<serde_json::Value> = recorded(&f.agent.data_dir)
        .into_iter()
        .filter(|e| e["event"] == "start")
        .collect();
    assert!(
        recordings
            .iter()
            .any(|e| e["upstream_connection"] == "reused"),
        "a recording says the connection was reused: {recordings:?}"
    );
    // A session that leaves inside a transaction does not leave its backend behind.
    let o = f.psql(&["-At", "-c", "BEGIN; SELECT 'pid=' || pg_backend_pid();"]);
    let in_tx = pid(&o);
    // Wait (bounded) until backend `pid` has ended.
    let ended = |pid: &str, what: &str| {
        vm_tests::wait_for(std::time::Duration::from_secs(10), what, || {
            let n = f.pg.superuser_sql(
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
                "postgres",
            );
            (n.trim() == "0").then_some(())
        })
    };
    ended(&in_tx, "the in-transaction backend to end");
    let o = f.psql(&["-At", "-c", "SELECT 'pid=' || pg_backend_pid()"]);
    let last = pid(&o);
    assert_ne!(last, in_tx, "a new backend after an open transaction");

    // Metrics: sessions 1 and 4 logged in, 2 and 3 reused; session 4's backend is kept idle.
    let upstream = |c: &str| {
        f.agent.metric(
            "tollgate_pg_upstream_connections_total",
            &[("target", "app-db"), ("connection", c)],
        )
    };
    assert_eq!((upstream("new"), upstream("reused")), (2.0, 2.0));
    vm_tests::wait_for(
        std::time::Duration::from_secs(10),
        "the last backend kept idle",
        || (f.agent.metric("tollgate_pg_pool_idle_connections", &[]) == 1.0).then_some(()),
    );

    // A reload that turns the pool off closes the kept backend at once, not a minute later.
    let secret = f.secret_dir.path().join("app-rw.pw");
    f.agent
        .write_policy(&policy_with(&f.pg, &f.bot, &secret, "pool = false"));
    ended(&last, "the kept backend to end after the reload");
    assert_eq!(
        f.agent.metric("tollgate_pg_pool_idle_connections", &[]),
        0.0
    );
    let o = f.psql(&["-At", "-c", "SELECT 'pid=' || pg_backend_pid()"]);
    assert_ne!(pid(&o), last, "no reuse once the pool is off");
    assert_eq!(upstream("new"), 3.0);
}
