//! Audit is fail-closed. With data_dir on a small tmpfs filled to the last byte (as an
//! unprivileged bot could fill a shared disk), a bot's statements and new connections are
//! refused while the audit log or its recording cannot be written, `/healthz` says why, the
//! write-error metric moves, and audit.jsonl keeps only whole JSON lines; once space is freed
//! the service resumes.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use vm_tests::{
    http_get,
    pg::{app_target, PgServer, APP_PASSWORD},
    require_root, wait_for, AgentProc, Cgroup, FailMode, TempDir,
};

/// A tmpfs mounted for the test; lazily unmounted on drop (the agent may still hold files).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mkdir mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("tmpfs")
            .arg(at)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let keep = self.0.with_extension("kept");
            eprintln!(
                "vm-tests: copying {} to {} for inspection",
                self.0.display(),
                keep.display()
            );
            let _ = Command::new("cp")
                .arg("-a")
                .arg(&self.0)
                .arg(&keep)
                .status();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system holding `dir` until ENOSPC; returns the filler's path.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).expect("create filler");
    let chunk = vec![0u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", p.display()),
        }
    }
    p
}

fn psql_cmd(bot: &Cgroup, port: u16, args: &[&str]) -> Command {
    let conn = format!(
        "host=127.0.0.1 port={port} user=bot dbname=app password=wrong sslmode=disable connect_timeout=10"
    );
    let mut cmd = bot.command(Path::new("/usr/bin/psql"));
    cmd.arg(conn)
        .args(["-X", "-v", "VERBOSITY=verbose"])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    cmd
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every line of audit.jsonl is a whole JSON object (no cut line, no two glued together).
fn assert_whole_lines(path: &Path) -> usize {
    let raw = std::fs::read(path).expect("read audit.jsonl");
    assert!(raw.ends_with(b"\n"), "audit.jsonl ends in a partial line");
    let text = String::from_utf8(raw).expect("utf-8");
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("audit.jsonl line {} is not JSON ({e}): {l:?}", i + 1));
        assert!(v.is_object(), "line {}: {l}", i + 1);
    }
    text.lines().count()
}

#[test]
fn a_full_data_dir_refuses_statements_and_connections_until_space_is_freed() {
    require_root();
    let pg = PgServer::start("auditfull");
    pg.superuser_sql(
        "SET ROLE app_rw; CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (1);",
        "app",
    );
    let bot = Cgroup::new("auditfull-bot");
    let dir = TempDir::new("auditfull-secret");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let body = format!(
        "[[identity]]\nname = \"bot\"\ncgroup = \"{}\"\n\n{}\n[[rule]]\nname = \"read and append\"\n\
         identities = [\"bot\"]\ntargets = [\"app-db\"]\naction = \"allow\"\n\
         sql = {{ statements = [\"select\", \"insert\"] }}\n",
        bot.glob(),
        app_target(&pg, &secret, "")
    );
    let mut agent = AgentProc::start_with_admin("auditfull", FailMode::Closed, &body);
    // data_dir on a 1 MiB tmpfs of its own.
    agent.terminate();
    let data = agent.data_dir.clone();
    let _ = std::fs::remove_dir_all(&data);
    let _mount = Tmpfs::mount(&data, "1m");
    agent.restart();
    let admin = agent.admin.expect("admin listener");
    let port = pg.port;
    let health = || http_get(admin, "/healthz", Duration::from_secs(5)).expect("GET /healthz");
    assert_eq!(health().0, 200);

    // Control: a session works.
    let o = psql_cmd(&bot, port, &["-At", "-c", "select 41 + 1"])
        .output()
        .expect("psql");
    assert!(text(&o).contains("42"), "{}", text(&o));

    // Session A is open and sleeping when the disk fills; its later statements must be refused.
    let a = psql_cmd(
        &bot,
        port,
        &[
            "-At",
            "-c",
            "select pg_sleep(4)",
            "-c",
            "insert into ledger values (666)",
            "-c",
            "select 'after-fill-a'",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("psql A");
    agent.wait_audit("A's pg_sleep", |e| {
        e["operation"]
            .as_str()
            .is_some_and(|o| o.contains("pg_sleep"))
    });
    let filler = fill(&data);

    // Session B opens on the full disk: its recording cannot be written, so its statements
    // are refused, and so many refusals fill the audit log's last page as well.
    let mut args = vec!["-At"];
    for _ in 0..40 {
        args.extend(["-c", "select 'after-fill-b'"]);
    }
    let b = psql_cmd(&bot, port, &args).output().expect("psql B");
    let bt = text(&b);
    assert!(!bt.contains("after-fill-b\n"), "B's SELECT ran: {bt}");
    assert!(
        bt.contains("tollgate: the audit log cannot be written"),
        "B was not told why: {bt}"
    );
    let a = a.wait_with_output().expect("psql A");
    let at = text(&a);
    assert!(!at.contains("after-fill-a\n"), "A's SELECT ran: {at}");
    assert!(at.contains("statements are refused until it can"), "{at}");
    assert_eq!(
        pg.superuser_sql(
            "select string_agg(id::text, ',' order by id) from ledger",
            "app"
        )
        .trim(),
        "1",
        "the INSERT reached the database"
    );

    // A new connection is refused.
    let c = psql_cmd(&bot, port, &["-At", "-c", "select 'new-conn'"])
        .output()
        .expect("psql C");
    let ct = text(&c);
    assert!(!c.status.success() && !ct.contains("new-conn\n"), "{ct}");
    assert!(
        ct.contains("connections are refused until it can"),
        "the new connection was not told why: {ct}"
    );

    let (status, body) = health();
    assert_eq!(
        status, 503,
        "/healthz while the audit cannot be written: {body}"
    );
    assert!(body.contains("No space left on device"), "{body}");
    assert!(agent.metric("tollgate_audit_write_errors_total", &[("file", "audit")]) >= 1.0);
    assert!(
        agent.metric(
            "tollgate_audit_write_errors_total",
            &[("file", "recording")]
        ) >= 1.0
    );
    let lines_full = assert_whole_lines(&agent.audit_path());

    // Free the space: service resumes, and the log says when.
    std::fs::remove_file(&filler).expect("free space");
    wait_for(Duration::from_secs(10), "/healthz ok again", || {
        (health().0 == 200).then_some(())
    });
    let o = psql_cmd(&bot, port, &["-At", "-c", "select 'resumed'"])
        .output()
        .expect("psql D");
    assert!(text(&o).contains("resumed"), "{}", text(&o));
    let lines = assert_whole_lines(&agent.audit_path());
    assert!(lines > lines_full);
    assert!(
        agent.audit().iter().any(|e| e["event"] == "audit_resumed"),
        "no audit_resumed line"
    );
}
