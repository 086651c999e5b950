//! PostgreSQL's Unix socket (issue 12, item 4, second half). The connect hooks only see
//! AF_INET/AF_INET6, and aya 0.14 cannot load `cgroup/connect_unix`, so the socket is not
//! redirected: a bot that can open it reaches the database around the agent with a stolen
//! password. This test shows that attack on a default socket (mode 0777), that `check-policy`
//! and `doctor` warn about it, and that the README's remedy (`unix_socket_permissions = 0770`,
//! `unix_socket_group`) refuses the bot while root's administration path still works.

use std::{path::Path, process::Output};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD, SECRET_EMAIL},
    require_root, tollgate, AgentProc, Cgroup, FailMode, TempDir,
};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// psql as the unprivileged bot over `host` (an address, or the socket directory), logging in
/// as `user` with `password`.
fn bot_psql(bot: &Cgroup, host: &str, port: u16, user: &str, password: &str, sql: &str) -> Output {
    let conn = format!(
        "host={host} port={port} user={user} dbname=app password={password} sslmode=disable \
         connect_timeout=10"
    );
    bot.command(Path::new("/usr/bin/psql"))
        .arg(conn)
        .args(["-X", "-At", "-v", "VERBOSITY=verbose", "-c", sql])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("psql")
}

#[test]
fn postgres_unix_socket_is_warned_about_and_closed_by_its_permissions() {
    require_root();
    let mut pg = PgServer::start("unixsock");
    let bot = Cgroup::new("unixsock-bot");
    let dir = TempDir::new("unixsock");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let body = format!(
        "[[identity]]\nname = \"ci-bot\"\ncgroup = \"{}\"\n\n{}\n[[rule]]\nname = \"ci reads\"\n\
         identities = [\"ci-bot\"]\ntargets = [\"app-db\"]\naction = \"allow\"\n\
         sql = {{ statements = [\"select\"] }}\n\n[[mask]]\ntargets = [\"app-db\"]\n\
         columns = [\"*.email\"]\nstyle = \"full\"\n",
        bot.glob(),
        app_target(&pg, &secret, "")
    );

    // check-policy and doctor say that the socket is not covered, and how to close it.
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, &body).expect("policy");
    let file = file.display().to_string();
    let (code, out, err) = tollgate(&["check-policy", &file]);
    assert_eq!(code, 0, "a warning is not an error: {out}{err}");
    let sock = format!(".s.PGSQL.{}", pg.port);
    for want in [
        "warning: target \"app-db\"",
        sock.as_str(),
        "NOT covered by the redirect",
        "unix_socket_permissions = 0770",
        "unix_socket_group",
    ] {
        assert!(
            err.contains(want),
            "check-policy stderr lacks {want:?}: {err}"
        );
    }
    let (_, out, err) = tollgate(&["doctor", "--policy", &file]);
    assert!(
        out.contains("warn  Unix socket of postgres target \"app-db\" is not redirected")
            && out.contains(&sock),
        "doctor: {out}{err}"
    );

    let agent = AgentProc::start("unixsock", FailMode::Closed, &body);
    // Over TCP the bot is the agent's: emails masked, DROP denied.
    let o = bot_psql(
        &bot,
        "127.0.0.1",
        pg.port,
        "bot",
        "wrong",
        "SELECT email FROM customers",
    );
    assert!(o.status.success(), "{}\n{}", text(&o), agent.stderr_text());
    assert!(!text(&o).contains(SECRET_EMAIL), "{}", text(&o));

    // The attack: the default socket (mode 0777) lets the bot in with the stolen password,
    // past the agent (clear emails). This is the limit the warnings are about.
    let socket_dir = pg.socket_dir().display().to_string();
    let o = bot_psql(
        &bot,
        &socket_dir,
        pg.port,
        "app_rw",
        APP_PASSWORD,
        "SELECT email FROM customers",
    );
    assert!(
        o.status.success() && text(&o).contains(SECRET_EMAIL),
        "with a world-writable socket the bot was expected to get in: {}",
        text(&o)
    );

    // The README's remedy: the socket closed to everyone outside the server's group.
    pg.restart_with("-c unix_socket_permissions=0770 -c unix_socket_group=postgres");
    for sql in ["SELECT email FROM customers", "DROP TABLE audit_log"] {
        let o = bot_psql(&bot, &socket_dir, pg.port, "app_rw", APP_PASSWORD, sql);
        let t = text(&o);
        assert!(
            !o.status.success() && t.contains("Permission denied") && !t.contains(SECRET_EMAIL),
            "the bot still reaches the socket after unix_socket_permissions = 0770: {t}"
        );
    }
    // Root's administration path still works over the socket, and the table is still there.
    let n = pg.superuser_sql("SELECT count(*) FROM audit_log", "app");
    assert_eq!(n.trim(), "0", "{n}");
    drop(agent);
}
