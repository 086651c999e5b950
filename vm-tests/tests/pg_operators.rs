//! Functions that run without being called by name: a user-defined operator's function, a
//! cast's function and a domain's CHECK function, on a real kernel with a real PostgreSQL and an
//! unmodified psql running unprivileged in bot cgroups. A bot allowed only `select` must be
//! refused (42501, naming the function) and the functions must not run (a table they write to
//! stays empty, read directly as the superuser); a rule naming the function lets its operator
//! run; ordinary operators and casts keep working. A table with a column of such a type counts
//! as running its functions too.

use std::path::Path;

use vm_tests::{
    identity_for,
    pg::{app_target, bot_psql, output_text, PgServer, APP_PASSWORD},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

fn policy(pg: &PgServer, reader: &Cgroup, trusted: &Cgroup, secret: &Path) -> String {
    format!(
        r#"{reader}{trusted}{target}
[[rule]]
name = "reader only reads"
identities = ["reader"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select"] }}

[[rule]]
name = "trusted may run evil"
identities = ["trusted"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select"], functions = ["evil"] }}
"#,
        reader = identity_for("reader", reader),
        trusted = identity_for("trusted", trusted),
        target = app_target(pg, secret, ""),
    )
}

/// Functions that record that they ran (SECURITY DEFINER: as the superuser, whoever calls),
/// and the operator, cast and domain that run them without their names being written.
const SETUP: &str = "
    CREATE TABLE side_effects (what text);
    CREATE FUNCTION evil(a int, b int) RETURNS int LANGUAGE plpgsql VOLATILE SECURITY DEFINER
      AS $$ BEGIN INSERT INTO side_effects VALUES ('operator'); RETURN a + b; END $$;
    CREATE OPERATOR public.!!! (FUNCTION = evil, LEFTARG = int, RIGHTARG = int);
    CREATE TYPE evil_t AS (v int);
    CREATE FUNCTION evil_cast(a int) RETURNS evil_t LANGUAGE plpgsql VOLATILE SECURITY DEFINER
      AS $$ BEGIN INSERT INTO side_effects VALUES ('cast'); RETURN ROW(a)::evil_t; END $$;
    CREATE CAST (int AS evil_t) WITH FUNCTION evil_cast(int);
    CREATE FUNCTION evil_check(a int) RETURNS bool LANGUAGE plpgsql VOLATILE SECURITY DEFINER
      AS $$ BEGIN INSERT INTO side_effects VALUES ('domain'); RETURN true; END $$;
    CREATE DOMAIN evil_d AS int CHECK (evil_check(VALUE));
    CREATE DOMAIN evil_d2 AS evil_d;
    CREATE TYPE holds_d AS (v evil_d);
    CREATE TABLE holder (id int, v evil_d);
    GRANT SELECT ON holder TO app_rw;
    CREATE EXTENSION citext;
    CREATE TABLE people (name citext, tags int[]);
    INSERT INTO people VALUES ('Alice', '{1}'), ('bob', '{2}');
    GRANT SELECT ON people TO app_rw;";

fn side_effects(pg: &PgServer) -> String {
    pg.superuser_sql(
        "SELECT count(*) || ':' || coalesce(string_agg(what, ',' ORDER BY what), '') FROM side_effects",
        "app",
    )
    .trim()
    .to_string()
}

#[test]
fn operators_casts_and_domains_run_only_functions_a_rule_names() {
    require_root();
    let pg = PgServer::start("pgops");
    pg.superuser_sql(SETUP, "app");
    let reader = Cgroup::new("pgops-reader");
    let trusted = Cgroup::new("pgops-trusted");
    let dir = TempDir::new("pgops-secret");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let agent = AgentProc::start(
        "pgops",
        FailMode::Closed,
        &policy(&pg, &reader, &trusted, &secret),
    );
    let run = |bot: &Cgroup, sql: &str| bot_psql(bot, pg.port, &["-Atc", sql]);
    let denied = |bot: &Cgroup, sql: &str, function: &str| {
        let o = run(bot, sql);
        let t = output_text(&o);
        assert!(
            !o.status.success() && t.contains("42501") && t.contains(function),
            "{sql} must be refused naming {function}: {t}\n--- agent ---\n{}",
            agent.stderr_text()
        );
    };

    // Ordinary operators and casts still run under the select-only rule.
    let o = run(
        &reader,
        "SELECT 1 + 2, 'a' || 'b', 2 = ANY(ARRAY[1, 2]), 3::text, '5'::int, 3 IN (1, 2, 3), \
         2 BETWEEN 1 AND 3, NULLIF(1, 2), CAST('7' AS bigint), 1 IS DISTINCT FROM 2",
    );
    assert_eq!(
        output_text(&o),
        "3|ab|t|3|5|t|t|1|7|t\n",
        "--- agent ---\n{}",
        agent.stderr_text()
    );

    // An extension's types and operators (citext's I/O, `=` and btree functions: user OIDs
    // that are not volatile) run under the select-only rule without being named.
    let o = run(
        &reader,
        "SELECT name FROM people WHERE name = 'ALICE' OR name::text = 'bob' ORDER BY name",
    );
    assert_eq!(
        output_text(&o),
        "Alice\nbob\n",
        "--- agent ---\n{}",
        agent.stderr_text()
    );

    for (sql, function) in [
        ("SELECT 1 !!! 2", "public.evil"),
        ("SELECT 1 OPERATOR(public.!!!) 2", "public.evil"),
        (
            "SELECT x FROM (VALUES (1)) v(x) WHERE x !!! 1 > 0",
            "public.evil",
        ),
        ("SELECT 1 WHERE 3 IN (SELECT 1 !!! 2)", "public.evil"),
        ("SELECT 1::evil_t", "public.evil_cast"),
        ("SELECT CAST(1 AS evil_t)", "public.evil_cast"),
        ("SELECT CAST(1 AS public.\"evil_t\")", "public.evil_cast"),
        ("SELECT 1::evil_d", "public.evil_check"),
        ("SELECT 1::evil_d2", "public.evil_check"),
        ("SELECT '{1}'::evil_d[]", "public.evil_check"),
        // Composite types and table rows run their columns' types' functions.
        ("SELECT '(1)'::holds_d", "public.evil_check"),
        ("SELECT ROW(1)::holds_d", "public.evil_check"),
        ("SELECT * FROM holder", "public.evil_check"),
    ] {
        denied(&reader, sql, function);
    }
    // A parameter whose type a Parse message fixes by OID runs that type's input function at
    // Bind, with no type name in the SQL: `SELECT $1` with `$1` an `evil_d`.
    let oid = pg
        .superuser_sql("SELECT 'evil_d'::regtype::oid", "app")
        .trim()
        .to_string();
    let raw = |script: &str| {
        let o = reader
            .command(Path::new(env!("CARGO_BIN_EXE_tg-pgraw")))
            .args(["127.0.0.1", &pg.port.to_string(), script])
            .args(["user=bot", "database=app"])
            .output()
            .expect("tg-pgraw");
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let v = raw(&format!("PT s|SELECT $1|{oid}\nBV p|s|1\nE p\nS"));
    let errors = v["errors"].to_string();
    assert!(
        errors.contains("42501") && errors.contains("public.evil_check"),
        "{v}\n--- agent ---\n{}",
        agent.stderr_text()
    );
    // The same with a built-in type (int4) runs.
    let v = raw("PT s|SELECT $1|23\nBV p|s|41\nE p\nS");
    assert_eq!(v["rows"], serde_json::json!([["41"]]), "{v}");
    // A type OID the catalog does not have stands for itself: refused, not passed.
    let v = raw("PT s|SELECT $1|4000000000\nBV p|s|1\nE p\nS");
    assert!(v["errors"].to_string().contains("42501"), "{v}");

    // The rule names `evil`, not the cast's function: no rule matches (as for `evil_cast(1)`).
    denied(&trusted, "SELECT 1::evil_t", "no rule matches");
    assert_eq!(side_effects(&pg), "0:", "nothing ran");

    // A rule that names the operator's function lets it run.
    let o = run(&trusted, "SELECT 1 !!! 2");
    assert_eq!(
        output_text(&o),
        "3\n",
        "--- agent ---\n{}",
        agent.stderr_text()
    );
    assert_eq!(side_effects(&pg), "1:operator");

    // An operator created after the session's catalog snapshot was read (cached for the next
    // sessions) is looked up before deciding.
    pg.superuser_sql(
        "CREATE OPERATOR public.!@! (FUNCTION = evil, LEFTARG = int, RIGHTARG = int)",
        "app",
    );
    denied(&reader, "SELECT 1 !@! 2", "public.evil");
    assert_eq!(side_effects(&pg), "1:operator");
}
