//! data_dir is the agent's own. The agent runs as root and writes its audit log, recordings and
//! keys there: a directory another user can write lets that user plant a symlink at a path the
//! agent writes, and the agent then appends to whatever root-owned file the link names.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Stdio};

use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD},
    require_root, tollgate, AgentProc, Cgroup, FailMode, TempDir,
};

/// A root-owned file a bot must never get the agent to write to.
fn precious(dir: &TempDir) -> std::path::PathBuf {
    let p = dir.path().join("precious");
    std::fs::write(&p, "root's own file\n").expect("write precious");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

#[test]
fn a_world_writable_data_dir_stops_the_start_before_a_planted_link_is_written() {
    require_root();
    let bot = Cgroup::new("datadir-ww-bot");
    let dir = TempDir::new("datadir-ww");
    // The bot must reach the precious file's directory to name it; it cannot write it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let target = precious(&dir);
    let body = format!(
        "[[identity]]\nname = \"bot\"\ncgroup = \"{}\"\n\n",
        bot.glob()
    );
    let mut agent = AgentProc::start("datadir-ww", FailMode::Closed, &body);
    agent.terminate();

    // data_dir made world-writable (a careless install), and the bot plants the audit log.
    let data = agent.data_dir.clone();
    std::fs::remove_file(data.join("audit.jsonl")).expect("rm audit.jsonl");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).expect("chmod 777");
    let st = bot
        .command(Path::new("/bin/ln"))
        .arg("-s")
        .arg(&target)
        .arg(data.join("audit.jsonl"))
        .stdout(Stdio::null())
        .status()
        .expect("ln as the bot");
    assert!(st.success(), "the bot could not plant its link");

    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| agent.restart()));
    let msg = match started {
        Ok(()) => panic!(
            "the agent started on a world-writable data_dir; the planted link's target now holds:\n{}",
            std::fs::read_to_string(&target).unwrap_or_default()
        ),
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(
        msg.contains(&format!("chmod go-w {}", data.display())),
        "the refusal must name the path and the fix: {msg}"
    );
    assert_eq!(
        std::fs::read_to_string(&target).expect("read precious"),
        "root's own file\n",
        "the agent wrote through the bot's symlink"
    );
}

#[test]
fn a_link_at_a_predictable_recording_path_is_never_followed() {
    require_root();
    let pg = PgServer::start("datadir-rec");
    let bot = Cgroup::new("datadir-rec-bot");
    let dir = TempDir::new("datadir-rec");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let target = precious(&dir);
    let body = format!(
        "[[identity]]\nname = \"bot\"\ncgroup = \"{}\"\n\n{}\n[[rule]]\nname = \"read\"\n\
         identities = [\"bot\"]\ntargets = [\"app-db\"]\naction = \"allow\"\n\
         sql = {{ statements = [\"select\"] }}\n",
        bot.glob(),
        app_target(&pg, &secret, "")
    );
    let agent = AgentProc::start("datadir-rec", FailMode::Closed, &body);
    let psql = |sql: &str| {
        let conn = format!(
            "host=127.0.0.1 port={} user=bot dbname=app password=wrong sslmode=disable",
            pg.port
        );
        let o = bot
            .command(Path::new("/usr/bin/psql"))
            .arg(conn)
            .args(["-X", "-At", "-c", sql])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("psql");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    psql("select 'first'");
    let first = agent.wait_audit("the first session", |e| e["event"] == "connect");
    let id = first["session"].as_str().expect("session id").to_string();
    // Session ids are `<agent start ms, hex>-<counter>`: the next ones are predictable, and so
    // were their recording paths. Plant links at every one of them.
    let (prefix, n) = id.rsplit_once('-').expect("id has a counter");
    let n: u64 = n.parse().expect("counter");
    let sessions = agent.data_dir.join("sessions");
    for k in n + 1..n + 20 {
        std::os::unix::fs::symlink(&target, sessions.join(format!("{prefix}-{k}.jsonl")))
            .expect("plant link");
    }
    psql("select 'second'");
    let second = agent.wait_audit("the second session", |e| {
        e["event"] == "connect" && e["session"] != id.as_str()
    });
    let sid = second["session"].as_str().expect("id").to_string();
    assert_eq!(
        std::fs::read_to_string(&target).expect("read precious"),
        "root's own file\n",
        "the agent wrote session {sid}'s recording through a planted link"
    );
    // The recording is there, under a name nobody could predict, and `replay` finds it.
    let rec = std::fs::read_dir(&sessions)
        .expect("sessions")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            n.strip_prefix(&format!("{sid}."))
                .and_then(|r| r.strip_suffix(".jsonl"))
                .is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .unwrap_or_else(|| {
            panic!(
                "no randomly named recording for {sid} in {}",
                sessions.display()
            )
        });
    assert!(
        std::fs::symlink_metadata(sessions.join(&rec)).is_ok_and(|m| m.is_file()),
        "{rec}"
    );
    let policy = agent.policy_path.to_string_lossy().into_owned();
    let (code, out, err) = tollgate(&["replay", &sid, "--policy", &policy]);
    assert_eq!(code, 0, "replay {sid}: {err}");
    assert!(out.contains("select 'second'"), "{out}");
}
