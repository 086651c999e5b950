//! Obfuscated and indirect destructive SQL through tollgate, on a real kernel with a real
//! PostgreSQL server and an unmodified psql running unprivileged in a bot cgroup. Every
//! statement of the bypass list must be refused by tollgate (42501, its own message) and must
//! leave the database exactly as it was, checked over a direct superuser connection. Look-alikes
//! that only mention dangerous words must pass.

use std::{path::Path, process::Output};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

fn policy(pg: &PgServer, reader: &Cgroup, setter: &Cgroup, secret_file: &Path) -> String {
    format!(
        r#"[[identity]]
name = "reader"
cgroup = "{reader}"

[[identity]]
name = "setter"
cgroup = "{setter}"

{target}
[[rule]]
name = "reader only reads"
identities = ["reader"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "show", "begin", "commit", "rollback", "copy"] }}

[[rule]]
name = "setter reads and sets"
identities = ["setter"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "show", "set", "begin", "commit", "rollback"], functions = ["pg_catalog.*"] }}

[[rule]]
name = "no-writes"
identities = ["reader", "setter"]
targets = ["app-db"]
action = "deny"
sql = {{ statements = ["drop", "truncate", "alter", "create", "delete", "update", "insert", "merge", "grant"] }}

[[mask]]
targets = ["app-db"]
columns = ["*.email", "customers.card_number"]
detectors = ["email", "credit_card"]
style = "partial"
"#,
        reader = reader.glob(),
        setter = setter.glob(),
        target = app_target(pg, secret_file, ""),
    )
}

struct Fixture {
    pg: PgServer,
    reader: Cgroup,
    setter: Cgroup,
    agent: AgentProc,
    _dir: TempDir,
}

fn fixture(tag: &str) -> Fixture {
    require_root();
    let pg = PgServer::start(tag);
    pg.superuser_sql(
        "SET ROLE app_rw;
         CREATE TABLE stats (id int, drop_count int, \"delete\" text);
         INSERT INTO stats VALUES (1, 7, 'kept');
         CREATE PROCEDURE wipe() LANGUAGE sql AS 'DELETE FROM orders';
         CREATE FUNCTION purge() RETURNS int LANGUAGE sql AS 'DELETE FROM orders RETURNING 1';
         CREATE FUNCTION public.upper(t text) RETURNS text LANGUAGE sql AS 'DELETE FROM orders RETURNING t';",
        "app",
    );
    let reader = Cgroup::new(&format!("{tag}-reader"));
    let setter = Cgroup::new(&format!("{tag}-setter"));
    let dir = TempDir::new(&format!("{tag}-secret"));
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let agent = AgentProc::start(
        tag,
        FailMode::Closed,
        &policy(&pg, &reader, &setter, &secret),
    );
    Fixture {
        pg,
        reader,
        setter,
        agent,
        _dir: dir,
    }
}

fn psql(bot: &Cgroup, port: u16, env: &[(&str, &str)], args: &[&str]) -> Output {
    let conn = format!("host=127.0.0.1 port={port} user=bot dbname=app password=wrong sslmode=disable connect_timeout=10");
    let mut cmd = bot.command(Path::new("/usr/bin/psql"));
    cmd.arg(conn)
        .args(["-X", "-v", "VERBOSITY=verbose"])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    for (k, v) in env {
        cmd.env(k, v);
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

/// Everything a destructive statement could have changed, read directly as the superuser.
fn state(pg: &PgServer) -> String {
    pg.superuser_sql(
        "SELECT concat_ws(' | ',
           (SELECT string_agg(c.relname || ':' || c.relkind::text, ',' ORDER BY c.relname)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public'),
           (SELECT count(*) FROM orders), (SELECT sum(amount) FROM orders),
           (SELECT count(*) FROM customers), (SELECT count(*) FROM audit_log),
           (SELECT string_agg(email, ',' ORDER BY id) FROM customers),
           (SELECT count(*) FROM pg_rules WHERE schemaname = 'public'),
           (SELECT string_agg(proname, ',' ORDER BY proname) FROM pg_proc p
              JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'),
           (SELECT count(*) FROM pg_largeobject_metadata),
           (SELECT coalesce(string_agg(grantee || ':' || privilege_type, ','), '-')
              FROM information_schema.role_table_grants
             WHERE table_schema = 'public' AND grantee NOT IN ('app_rw', 'postgres')),
           (SELECT last_value || '/' || is_called FROM audit_log_id_seq),
           (SELECT rolsuper::text FROM pg_roles WHERE rolname = 'app_rw'))",
        "app",
    )
}

#[test]
fn obfuscated_and_indirect_destructive_statements_are_denied_and_change_nothing() {
    let f = fixture("pgbypass");
    let pwned = f.agent.dir().join("pwned");
    let program = format!("COPY orders TO PROGRAM 'touch {}'", pwned.display());
    // (bot, statements run in one psql session; the last one is the one that must be denied).
    let reader = &f.reader;
    let setter = &f.setter;
    let bypass: Vec<(&Cgroup, Vec<&str>)> = vec![
        (reader, vec!["/*x*/DROP/*y*/ TABLE orders"]),
        (reader, vec!["dRoP\n\tTaBlE\n orders"]),
        (reader, vec!["DROP TABLE \"orders\""]),
        (reader, vec!["DROP TABLE U&\"\\006f\\0072ders\""]),
        (reader, vec!["DELETE FROM U&\"ord!0065rs\" UESCAPE '!'"]),
        (reader, vec!["DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$"]),
        (reader, vec!["DO $$ BEGIN EXECUTE 'DR' || 'OP TABLE ord' || 'ers'; END $$"]),
        (reader, vec!["DO $b$ DECLARE q text := reverse('sredro MORF ETELED'); BEGIN EXECUTE q; END $b$"]),
        (reader, vec!["DO $body$BEGIN EXECUTE $x$DELETE FROM orders$x$; END$body$"]),
        (reader, vec!["WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d"]),
        (reader, vec!["EXPLAIN ANALYZE DELETE FROM orders"]),
        (reader, vec!["PREPARE p AS DELETE FROM orders", "EXECUTE p"]),
        (reader, vec![program.as_str()]),
        (reader, vec!["SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app_rw'"]),
        (reader, vec!["SELECT pg_read_file('/etc/passwd')"]),
        (reader, vec!["SELECT lo_import('/etc/passwd')"]),
        (reader, vec!["SELECT * FROM dblink('dbname=app', 'DELETE FROM orders') AS t(x text)"]),
        (reader, vec!["SELECT set_config('role', 'postgres', false)"]),
        (reader, vec!["SELECT 1; DROP TABLE orders"]),
        (reader, vec!["CREATE RULE r AS ON INSERT TO audit_log DO INSTEAD DELETE FROM orders"]),
        (reader, vec!["CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DELETE FROM orders'", "SELECT f()"]),
        (reader, vec!["SELECT * FROM orders FOR UPDATE"]),
        (reader, vec!["CALL wipe()"]),
        (reader, vec!["TRUNCATE orders"]),
        (reader, vec!["ALTER TABLE orders RENAME TO orders_gone"]),
        (reader, vec!["GRANT ALL ON orders TO PUBLIC"]),
        (reader, vec!["SET ROLE postgres"]),
        (reader, vec!["SET standard_conforming_strings = off"]),
        (reader, vec!["SELECT 'a\\'; DROP TABLE orders; --'"]),
        (reader, vec!["MERGE INTO orders o USING (SELECT 1 AS id) s ON o.id = s.id WHEN MATCHED THEN DELETE"]),
        (reader, vec!["SELECT * INTO orders_copy FROM orders"]),
        (reader, vec!["COPY orders FROM STDIN"]),
        (reader, vec!["BEGIN", "DECLARE c CURSOR FOR WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d"]),
        (reader, vec!["SELECT nextval('audit_log_id_seq')"]),
        (reader, vec!["SELECT pg_notify('ch', 'x')"]),
        // Functions are allowed by list (item 5): SQL text run by a built-in, user-defined and
        // volatile functions, and a user function that shadows a built-in's name.
        (reader, vec!["SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, pg_read_file(''/etc/hostname'')::tsquery')"]),
        (reader, vec!["SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, (SELECT count(*) FROM (SELECT purge()) x)::text::tsquery')"]),
        (setter, vec!["SELECT pg_catalog.ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, pg_catalog.lo_from_bytea(0, ''x'')::text::tsquery')"]),
        (reader, vec!["SELECT purge()"]),
        (reader, vec!["SELECT count(*) FROM orders WHERE purge() > 0"]),
        (reader, vec!["SELECT upper('x')"]),
        (reader, vec!["SELECT txid_current()"]),
        (reader, vec!["SELECT pg_advisory_lock(42)"]),
        (reader, vec!["SELECT pg_logical_emit_message(true, 'x', 'y')"]),
        (reader, vec!["SELECT pg_backup_start('x')"]),
        (reader, vec!["SELECT lo_from_bytea(0, 'x')"]),
        // The setter may SET, but not the encoding the classifier cannot read, and not the
        // escape trick that SET enables.
        (setter, vec!["SET client_encoding = 'SJIS'"]),
        (setter, vec!["SET NAMES 'BIG5'"]),
        // With standard_conforming_strings off the server reads this as a string and a DROP
        // (tollgate now lexes as the server does; `SELECT 'x\'; DROP ...; --'` is one
        // harmless string there, and passes).
        (setter, vec!["SET standard_conforming_strings = off", "SELECT 'x\\'' ; DROP TABLE orders; --'"]),
        (setter, vec!["SELECT set_config('client_encoding', 'SJIS', false)"]),
    ];
    let before = state(&f.pg);
    let mut failures = Vec::new();
    for (bot, statements) in &bypass {
        let mut args = Vec::new();
        for s in statements {
            args.push("-c");
            args.push(*s);
        }
        let o = psql(bot, f.pg.port, &[], &args);
        let t = text(&o);
        let last = statements.last().expect("statement");
        if !(t.contains("42501") && t.contains("tollgate")) {
            failures.push(format!("NOT DENIED: {last}\n{t}"));
        }
        let now = state(&f.pg);
        if now != before {
            failures.push(format!(
                "CHANGED THE DATABASE: {last}\nbefore {before}\nafter  {now}"
            ));
        }
    }
    assert!(!pwned.exists(), "COPY TO PROGRAM ran");

    // A client_encoding whose characters can end in a backslash (SJIS 0x815C), chosen at
    // startup: every statement is refused, so this string cannot smuggle the DROP that the
    // server would see after the string ends early.
    let smuggle = "SELECT E'\u{81}\\'; DROP TABLE orders; --'";
    for env in [
        [("PGCLIENTENCODING", "SJIS")],
        [("PGOPTIONS", "-c client_encoding=BIG5")],
    ] {
        let o = psql(setter, f.pg.port, &env, &["-c", smuggle]);
        let t = text(&o);
        if !(t.contains("42501") && t.contains("client_encoding")) {
            failures.push(format!("NOT DENIED with {env:?}: {smuggle}\n{t}"));
        }
    }
    assert_eq!(state(&f.pg), before, "the database changed");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(bypass.len() >= 25);

    let audit = f.agent.audit();
    let denied = audit
        .iter()
        .filter(|e| e["event"] == "operation" && e["action"] == "deny")
        .count();
    assert!(denied >= bypass.len(), "every denial is audited: {denied}");
}

#[test]
fn look_alikes_are_not_denied() {
    let f = fixture("pglookalike");
    let cases: &[(&str, &str)] = &[
        ("SELECT 'DROP TABLE orders' AS s", "DROP TABLE orders"),
        ("SELECT drop_count FROM stats", "7"),
        ("SELECT \"delete\" FROM stats", "kept"),
        (
            "SELECT /* DELETE FROM orders; */ count(*) FROM orders",
            "10",
        ),
        ("SELECT count(*) FROM orders -- ; DROP TABLE orders", "10"),
        ("SELECT $$DELETE FROM orders$$", "DELETE FROM orders"),
        (
            "SELECT $tag$'; DROP TABLE orders; --$tag$",
            "'; DROP TABLE orders; --",
        ),
        (
            "SELECT E'\\'; TRUNCATE orders; --'",
            "'; TRUNCATE orders; --",
        ),
        ("SELECT U&'\\0044ROP' AS word", "DROP"),
        (
            "SELECT id FROM orders WHERE amount > 0 ORDER BY id LIMIT 1",
            "1",
        ),
        ("SHOW standard_conforming_strings", "on"),
        (
            "SELECT lower('X') || (now() IS NOT NULL)::text || (random() < 2)::text",
            "xtruetrue",
        ),
        (
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM orders WHERE id < 3",
            "1,2",
        ),
        ("COPY stats (id, \"delete\") TO STDOUT", "1\tkept"),
    ];
    let before = state(&f.pg);
    for (sql, want) in cases {
        let o = psql(&f.reader, f.pg.port, &[], &["-Atc", sql]);
        let t = text(&o);
        assert!(
            o.status.success() && t.contains(want),
            "{sql} should pass and print {want:?}: {t}\n--- agent ---\n{}",
            f.agent.stderr_text()
        );
    }
    assert_eq!(state(&f.pg), before);
}

/// Item 1 of the security issue: startup parameters (`options=-c ...` and parameters of their
/// own) are decided like SET, and all of them are audited.
#[test]
fn startup_parameters_are_decided_like_set() {
    let f = fixture("pgstartup");
    let show = "SHOW log_statement";
    // The reader may not SET: no setting but the client-facing ones passes at startup.
    for opts in [
        "-c log_statement=none -c session_replication_role=replica",
        "-csession_replication_role=replica",
        "--session-replication-role=replica",
        "-c search_path=evil,public",
        "-e",
        "-c work_mem=1GB -o -d5",
    ] {
        let o = psql(&f.reader, f.pg.port, &[("PGOPTIONS", opts)], &["-c", show]);
        let t = text(&o);
        assert!(
            !o.status.success() && t.contains("FATAL:  tollgate:"),
            "{opts} should be refused at startup: {t}"
        );
    }
    // Code loading is refused even for an identity that may SET.
    let o = psql(
        &f.setter,
        f.pg.port,
        &[("PGOPTIONS", "-c session_preload_libraries=/tmp/x/evil.so")],
        &["-c", show],
    );
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("loads code"),
        "library preload should be refused: {t}"
    );
    // A setting as a startup parameter of its own (no client library sends one, a raw client
    // can) is decided the same way.
    let raw = |bot: &Cgroup, kv: &str| {
        let o = bot
            .command(Path::new(env!("CARGO_BIN_EXE_tg-pgraw")))
            .args([
                "127.0.0.1",
                &f.pg.port.to_string(),
                "Q SHOW session_replication_role",
                kv,
            ])
            .output()
            .expect("tg-pgraw");
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let v = raw(&f.reader, "session_replication_role=replica");
    assert!(
        v["fatal"].as_str().is_some_and(|m| m.contains("42501")),
        "{v}"
    );
    // The setter may SET: its settings reach the server (as parameters of their own).
    let o = psql(
        &f.setter,
        f.pg.port,
        &[(
            "PGOPTIONS",
            "-c statement_timeout=4321 -c search_path=public,pg_catalog",
        )],
        &["-Atc", "SHOW search_path", "-Atc", "SHOW statement_timeout"],
    );
    let t = text(&o);
    assert!(
        o.status.success() && t.contains("public,pg_catalog") && t.contains("4321ms"),
        "{t}"
    );
    // Client-facing settings need no rule.
    let o = psql(
        &f.reader,
        f.pg.port,
        &[
            ("PGOPTIONS", "-c DateStyle=German"),
            ("PGAPPNAME", "nightly-report"),
        ],
        &["-Atc", "SHOW DateStyle"],
    );
    assert!(
        o.status.success() && text(&o).contains("German"),
        "{}",
        text(&o)
    );
    // Every startup parameter is in the audit log, and every refusal.
    let audit = f.agent.audit();
    assert!(audit.iter().any(
        |e| e["event"] == "startup" && e["parameters"]["application_name"] == "nightly-report"
    ));
    assert!(audit.iter().any(|e| e["event"] == "operation"
        && e["action"] == "deny"
        && e["operation"]
            .as_str()
            .is_some_and(|o| o.contains("session_replication_role = replica"))));
    // The recording of a session keeps them too.
    let rec = std::fs::read_dir(f.agent.data_dir.join("sessions"))
        .expect("sessions")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .any(|t| t.contains("nightly-report") && t.contains("\"startup\""));
    assert!(rec, "a recording holds the startup parameters");
}
