//! `exe` identity is the file, not the path. An unprivileged bot can create a user and mount
//! namespace (`unshare -Urm`) and bind-mount any file over any path there, so the path
//! `/proc/<pid>/exe` shows proves nothing: the agent must compare the file itself (device and
//! inode) with the file at that path in its own mount namespace, and must not match `exe` for
//! a process in another user namespace unless the identity opts in.

use std::{
    os::unix::fs::MetadataExt,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use vm_tests::*;

/// The binary the bot pretends to be.
const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// Run `sh -c script` through `unshare args` as the bot and parse tg-probe's JSON report.
fn in_unshare(bot: &Cgroup, unshare: &[&str], script: &str) -> (u32, Value) {
    let mut cmd: Command = bot.command(std::path::Path::new("/usr/bin/unshare"));
    cmd.args(unshare)
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn unshare");
    // unshare(1) without --fork and `exec` in sh keep one pid from unshare to tg-probe.
    let pid = child.id();
    let (status, out, err) = wait_child(child, Duration::from_secs(60), "unshare + tg-probe");
    let json = out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| {
            panic!("no probe report; status {status}, stdout {out:?}, stderr {err:?}")
        });
    (pid, json)
}

#[test]
fn a_bind_mount_in_the_bots_own_namespace_does_not_borrow_an_exe_identity() {
    require_root();
    assert!(
        std::path::Path::new(PSQL).exists(),
        "{PSQL} is missing: apt-get install postgresql"
    );
    let echo = EchoServer::start(EchoMode::Echo);
    let bot = Cgroup::new("exe-bot");
    let probe = probe_bin!().canonicalize().expect("tg-probe path");
    let probe_md = std::fs::metadata(&probe).expect("stat tg-probe");
    // "psql" opts in to foreign user namespaces, so only the file comparison stands between
    // the bind mount and the identity; "probe" does not opt in.
    let body = [
        format!(
            "[[identity]]\nname = \"psql\"\ncgroup = \"{g}\"\nexe = \"{PSQL}\"\nexe_foreign_userns = true\n\n\
             [[identity]]\nname = \"probe\"\ncgroup = \"{g}\"\nexe = \"{p}\"\n\n",
            g = bot.glob(),
            p = probe.display()
        ),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("psql and probe may use echo", &["psql", "probe"], &["echo"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start("exe", FailMode::Closed, &body);
    let addr = echo.v4().to_string();
    let probe_args = format!("--connect {addr} --send-bytes 64 --expect-echo");

    // Control: the genuine binary, in the agent's user namespace, has its identity.
    let r = bot.probe(
        probe_bin!(),
        &["--connect", &addr, "--send-bytes", "64", "--expect-echo"],
    );
    let ev = agent.connect_event(r.pid);
    assert!(r.echo_ok(), "the genuine probe must pass: {r} {ev}");
    assert_eq!(ev["identity"], "probe", "{ev}");
    assert_eq!(ev["exe_ino"], probe_md.ino(), "{ev}");
    assert_eq!(ev["exe_dev"], probe_md.dev(), "{ev}");
    assert_eq!(ev["exe_verified"], true, "{ev}");

    // The attack: tg-probe bind-mounted over psql's path in the bot's own mount namespace,
    // then exec'd by that path. /proc/<pid>/exe reads `.../psql`; the file is tg-probe.
    let psql_before = std::fs::read(PSQL).expect("read psql");
    let (pid, json) = in_unshare(
        &bot,
        &["-Urm"],
        &format!(
            "mount --bind {} {PSQL} && exec {PSQL} {probe_args}",
            probe.display()
        ),
    );
    let ev = agent.connect_event(pid);
    assert_eq!(
        ev["exe"], PSQL,
        "the audit shows the path the process claims: {ev}"
    );
    assert_eq!(
        ev["identity"],
        Value::Null,
        "a bind mount over {PSQL} in the bot's namespace borrowed the psql identity: {ev}"
    );
    assert_eq!(ev["action"], "deny", "{ev}");
    assert_eq!(ev["exe_ino"], probe_md.ino(), "the file actually run: {ev}");
    assert_eq!(ev["exe_verified"], false, "{ev}");
    assert!(
        json["echo_ok"] != true,
        "the spoofed psql reached the echo server: {json}"
    );

    // The genuine probe file, but from another user namespace: "probe" did not opt in.
    let (pid, json) = in_unshare(
        &bot,
        &["-Ur"],
        &format!("exec {} {probe_args}", probe.display()),
    );
    let ev = agent.connect_event(pid);
    assert_eq!(ev["foreign_userns"], true, "{ev}");
    assert_eq!(ev["exe_verified"], true, "{ev}");
    assert_eq!(
        ev["identity"],
        Value::Null,
        "exe matched for a process in another user namespace without exe_foreign_userns: {ev}"
    );
    assert!(json["echo_ok"] != true, "{json}");

    // Nothing changed on the host: psql is still psql.
    assert_eq!(std::fs::read(PSQL).expect("read psql"), psql_before);
}
