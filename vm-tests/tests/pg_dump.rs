//! `pg_dump -Fc` through tollgate, run unprivileged in a bot cgroup under the allow-all rule
//! (`policy/examples/allow-all.toml`, verbatim) plus a column mask, of a database holding large
//! objects, a zero-column table and a masked column; then `pg_restore` (direct, as the
//! superuser) into a new database. Everything round-trips, except that masked values stay
//! masked: the dump never holds them.

use std::{fs, path::Path, process::Command};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD, SECRET_EMAIL},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn allow_all_rules() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples/allow-all.toml");
    let text = fs::read_to_string(&path).expect("policy/examples/allow-all.toml");
    let at = text
        .find("\n[[rule]]")
        .map(|i| i + 1)
        .expect("allow-all.toml has a [[rule]]");
    text[at..].replace("admin-bot", "dump-bot")
}

#[test]
fn pg_dump_custom_format_round_trips_with_large_objects_and_masks() {
    require_root();
    let pg = PgServer::start("dump");
    pg.superuser_sql(
        "SET ROLE app_rw;
         CREATE TABLE nothing_here ();
         INSERT INTO nothing_here DEFAULT VALUES;
         INSERT INTO nothing_here DEFAULT VALUES;
         CREATE TABLE docs (id int PRIMARY KEY, body oid);
         INSERT INTO docs VALUES
           (1, lo_from_bytea(0, 'first large object'::bytea)),
           (2, lo_from_bytea(0, decode(repeat('00ff', 100000), 'hex')));",
        "app",
    );
    let lo_sums = |db: &str| {
        pg.superuser_sql(
            "SELECT string_agg(md5(lo_get(body)), ',' ORDER BY id) FROM docs",
            db,
        )
    };
    let want_lo = lo_sums("app");

    let dir = TempDir::new("dump");
    let secret = dir.path().join("app-rw.pw");
    fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let out = dir.path().join("out");
    fs::create_dir(&out).expect("out dir");
    let s = Command::new("chmod")
        .arg("777")
        .arg(&out)
        .status()
        .expect("chmod");
    assert!(s.success());

    let bot = Cgroup::new("dump-bot");
    let policy = format!(
        "[[identity]]\nname = \"dump-bot\"\ncgroup = \"{}\"\n\n{}\n{}\n\
         [[mask]]\ntargets = [\"app-db\"]\ncolumns = [\"customers.email\"]\nstyle = \"partial\"\n",
        bot.glob(),
        app_target(&pg, &secret, "pool = false"),
        allow_all_rules(),
    );
    let agent = AgentProc::start("dump", FailMode::Closed, &policy);

    let file = out.join("app.dump");
    let o = bot
        .command(&Path::new(PG_BIN).join("pg_dump"))
        .arg(format!(
            "host=127.0.0.1 port={} user=bot password=wrong dbname=app sslmode=disable",
            pg.port
        ))
        .args(["-Fc", "-f"])
        .arg(&file)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("pg_dump");
    assert!(
        o.status.success(),
        "pg_dump through tollgate failed: {}\nagent log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        agent.stderr_text()
    );

    // The dump as SQL text: the masked value is not in it.
    let sql = Command::new(Path::new(PG_BIN).join("pg_restore"))
        .arg("-f")
        .arg("-")
        .arg(&file)
        .output()
        .expect("pg_restore -f -");
    assert!(sql.status.success());
    let sql = String::from_utf8_lossy(&sql.stdout);
    assert!(!sql.contains(SECRET_EMAIL), "the dump holds a masked value");
    assert!(sql.contains("CREATE TABLE public.nothing_here ("), "{sql}");
    assert!(
        sql.contains("BLOBS") || sql.contains("lo_open"),
        "no large objects in the dump"
    );

    // Restore into a new database, directly as the superuser.
    pg.superuser_sql("CREATE DATABASE restored OWNER app_rw", "postgres");
    let r = Command::new(Path::new(PG_BIN).join("pg_restore"))
        .args(["-h"])
        .arg(pg.socket_dir())
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "restored",
            "--exit-on-error",
        ])
        .arg(&file)
        .env("PGPASSWORD", "postgres-superuser-pw")
        .output()
        .expect("pg_restore");
    assert!(
        r.status.success(),
        "pg_restore failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(lo_sums("restored"), want_lo, "large objects differ");
    assert_eq!(
        pg.superuser_sql("SELECT count(*) FROM nothing_here", "restored")
            .trim(),
        "2"
    );
    let emails = pg.superuser_sql("SELECT email FROM customers ORDER BY id", "restored");
    assert!(!emails.contains(SECRET_EMAIL), "{emails}");
    assert_eq!(emails.lines().count(), 2, "{emails}");
    assert!(
        emails.lines().all(|e| e.contains('*')),
        "masked values restore masked: {emails}"
    );
    // Unmasked columns round-trip as they are.
    assert_eq!(
        pg.superuser_sql(
            "SELECT string_agg(name || card_number, ',' ORDER BY id) FROM customers",
            "restored"
        ),
        pg.superuser_sql(
            "SELECT string_agg(name || card_number, ',' ORDER BY id) FROM customers",
            "app"
        ),
    );
}
