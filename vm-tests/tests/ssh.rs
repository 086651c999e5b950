//! The SSH handler end to end: a real OpenSSH `sshd` on loopback (its own host key and config,
//! `authorized_keys` holding only the agent's key) and the unmodified OpenSSH clients run as an
//! unprivileged bot in its own cgroup, with a key the server rejects. The agent shows the
//! server's own host key (`host_key_file`), so the bot's `known_hosts` is the real one.

use std::{fs, path::Path};

use vm_tests::{ssh::SshServer, *};

const INJECTIONS: &[&str] = include!("../../policy/src/shell/injections.rs");

fn world(tag: &str, rules: &str) -> (SshServer, Cgroup, AgentProc) {
    let server = SshServer::start(tag);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let body = [
        identity_for("bot", &bot),
        server.target_toml("box"),
        rules.to_string(),
    ]
    .concat();
    let agent = AgentProc::start(tag, FailMode::Closed, &body);
    (server, bot, agent)
}

const EXEC_RULES: &str = r#"
[[rule]]
name = "plain commands"
identities = ["bot"]
targets = ["box"]
action = "allow"
ssh = { exec = ["echo *", "exit *", "true", "sleep *"] }
"#;

#[test]
fn bot_key_is_rejected_by_the_server_itself() {
    require_root();
    // No agent: the bot's own key does not log in (the agent's injected key is what works).
    let server = SshServer::start("direct");
    let bot = Cgroup::new("ssh-direct");
    let (st, _out, err) = server.ssh(&bot, &[], "echo hi");
    assert_eq!(st.code(), Some(255), "bot key must be rejected: {err}");
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn exec_allowed_denied_and_controlmaster_siblings() {
    require_root();
    let (server, bot, agent) = world("ssh-exec", EXEC_RULES);
    let (st, out, err) = server.ssh(&bot, &[], "echo hello world");
    assert_eq!(
        st.code(),
        Some(0),
        "stdout {out:?} stderr {err:?}\n{}",
        agent.stderr_text()
    );
    assert_eq!(out, "hello world\n");

    // Exit statuses pass through exactly.
    let (st, _, err) = server.ssh(&bot, &[], "exit 7");
    assert_eq!(st.code(), Some(7), "{err}");

    // Denied: stderr names the command, rule state and identity; status 126.
    let (st, out, err) = server.ssh(&bot, &[], "id");
    assert_eq!(st.code(), Some(126), "out {out:?} err {err:?}");
    assert!(
        err.contains("tollgate: exec \"id\" denied for identity bot"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");

    // ControlMaster: one connection, a denied channel, then a sibling that still works.
    let ctl_opt = control_master(&server, &bot, "ctl");
    let mux = ["-o", "ControlMaster=no", "-o", ctl_opt.as_str()];
    let (st, _, err) = server.ssh(&bot, &mux, "cat /etc/shadow");
    assert_eq!(st.code(), Some(126), "{err}");
    let (st, out, err) = server.ssh(&bot, &mux, "echo sibling");
    assert_eq!((st.code(), out.as_str()), (Some(0), "sibling\n"), "{err}");
    let (st, _, err) = server.ssh(&bot, &mux, "exit 3");
    assert_eq!(st.code(), Some(3), "{err}");
    // One upstream login served all three channels of the multiplexed connection.
    stop_master(&server, &bot, &ctl_opt);

    // Audit and metrics carry protocol ssh and the channel counter.
    let ev = agent.wait_audit("denied exec", |e| {
        e["event"] == "operation" && e["operation"] == "cat /etc/shadow"
    });
    assert_eq!(ev["protocol"], "ssh", "{ev}");
    assert_eq!(ev["action"], "deny", "{ev}");
    assert_eq!(ev["kind"], "ssh", "{ev}");
    let metrics = http_get(agent.metrics, "/metrics", std::time::Duration::from_secs(5))
        .expect("scrape")
        .1;
    let samples = parse_metrics(&metrics);
    assert!(
        metric_sum(
            &samples,
            "tollgate_ssh_channels_total",
            &[("target", "box"), ("kind", "exec"), ("action", "deny")]
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &samples,
            "tollgate_ssh_channels_total",
            &[("target", "box"), ("kind", "exec"), ("action", "allow")]
        ) >= 4.0,
        "{metrics}"
    );
}

#[test]
fn injection_attempts_never_run() {
    require_root();
    let (server, bot, agent) = world("ssh-inj", EXEC_RULES);
    let marker_dir = server.dir.path().join("markers");
    fs::create_dir(&marker_dir).expect("mkdir markers");
    let mut tried = 0;
    for (i, attempt) in INJECTIONS.iter().enumerate() {
        if attempt.contains('\0') {
            // argv cannot carry a NUL byte; the unit test covers it.
            continue;
        }
        let marker = marker_dir.join(format!("m{i}"));
        let cmd = attempt.replace("MARKER", &marker.display().to_string());
        let (st, out, err) = server.ssh(&bot, &[], &cmd);
        assert_eq!(
            st.code(),
            Some(126),
            "{cmd:?} was not refused: out {out:?} err {err:?}"
        );
        assert!(err.contains("tollgate: exec"), "{cmd:?}: {err}");
        tried += 1;
    }
    assert!(tried >= 20, "{tried}");
    // A quoted operator is an argument, not syntax: allowed, and it runs nothing else either.
    let marker = marker_dir.join("quoted");
    let (st, out, err) = server.ssh(&bot, &[], &format!("echo 'hi; touch {}'", marker.display()));
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(out, format!("hi; touch {}\n", marker.display()));
    let left: Vec<_> = fs::read_dir(&marker_dir)
        .expect("read markers")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        left.is_empty(),
        "something ran: {left:?}\n{}",
        agent.stderr_text()
    );
}

#[test]
fn forwarding_env_and_agent_requests_are_refused() {
    require_root();
    let (server, bot, agent) = world("ssh-fwd", EXEC_RULES);
    // -W is a direct-tcpip channel (what -L and -D open per connection).
    let (st, _, err) = server.ssh(&bot, &["-W", &format!("127.0.0.1:{}", server.port)], "");
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("administratively prohibited"), "{err}");
    // -R with ExitOnForwardFailure: the global request is refused.
    let (st, _, err) = server.ssh(
        &bot,
        &["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"],
        "echo x",
    );
    assert_eq!(st.code(), Some(255), "{err}");
    // SetEnv (what SendEnv sends) is refused; the command itself still runs. (-A sends no
    // request here: the bot has no agent to forward.)
    let (st, out, err) = server.ssh(&bot, &["-o", "SetEnv=BASH_ENV=/tmp/x", "-A"], "echo ran");
    assert_eq!((st.code(), out.as_str()), (Some(0), "ran\n"), "{err}");
    for (op, what) in [
        (
            "direct-tcpip",
            format!("direct-tcpip 127.0.0.1:{}", server.port),
        ),
        ("tcpip-forward", "tcpip-forward localhost:0".to_string()),
        ("env", "env BASH_ENV".to_string()),
    ] {
        let ev = agent.wait_audit(op, |e| e["event"] == "operation" && e["operation"] == what);
        assert_eq!(ev["action"], "deny", "{ev}");
        assert_eq!(ev["protocol"], "ssh", "{ev}");
    }
}

#[test]
fn forwarding_true_lets_direct_tcpip_through_and_audits_it() {
    require_root();
    let rules = format!(
        "{EXEC_RULES}\n[[rule]]\nname = \"fwd\"\nidentities = [\"bot\"]\ntargets = [\"box\"]\naction = \"allow\"\nssh = {{ forwarding = true }}\n"
    );
    let (server, bot, agent) = world("ssh-fwd-ok", &rules);
    // An unprotected service that greets: `ssh -W` reaches it through the agent and the
    // server. (A forward to a protected target would itself be redirected and decided.)
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let greeter = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"hello through the forward\n");
        }
    });
    let (_st, out, err) = server.ssh(&bot, &["-W", &addr.to_string()], "");
    assert_eq!(out, "hello through the forward\n", "{err}");
    let _ = greeter.join();
    let ev = agent.wait_audit("allowed forward", |e| {
        e["event"] == "operation" && e["operation"] == format!("direct-tcpip {addr}")
    });
    assert_eq!(ev["action"], "allow", "{ev}");
}

#[test]
fn changed_upstream_host_key_fails_closed() {
    require_root();
    let (server, bot, agent) = world("ssh-hostkey", EXEC_RULES);
    // Replace the agent's known_hosts entry with another key.
    let other = server.dir.path().join("other_ed25519");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let public = fs::read_to_string(other.with_extension("pub")).expect("pub");
    let mut p = public.split_whitespace();
    let kh = server.dir.path().join("agent_known_hosts");
    fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            server.port,
            p.next().unwrap_or_default(),
            p.next().unwrap_or_default()
        ),
    )
    .expect("write known_hosts");
    let (st, out, err) = server.ssh(&bot, &[], "echo should-not-run");
    assert_eq!(st.code(), Some(255), "out {out:?} err {err:?}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("CHANGED"), "{err}");
    assert!(err.contains(&kh.display().to_string()), "{err}");
    // An empty known_hosts: unknown key, same result.
    fs::write(&kh, "").expect("truncate");
    let (st, _, err) = server.ssh(&bot, &[], "echo should-not-run");
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("is not in"), "{err}");
    drop(agent);
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn scp_both_modes_and_sftp_are_byte_identical() {
    require_root();
    let rules = r#"
[[rule]]
name = "transfers"
identities = ["bot"]
targets = ["box"]
action = "allow"
ssh = { exec = ["scp *"], subsystems = ["sftp"] }
"#;
    let (server, bot, _agent) = world("ssh-scp", rules);
    let src = server.bot_home.join("src.bin");
    let st = std::process::Command::new("head")
        .args(["-c", "104857600", "/dev/urandom"])
        .stdout(fs::File::create(&src).expect("create src"))
        .status()
        .expect("head");
    assert!(st.success());
    std::os::unix::fs::chown(&src, Some(BOT_UID), Some(BOT_UID)).expect("chown");
    let want = sha256(&src);
    let remote_dir = server.dir.path().join("remote");
    fs::create_dir(&remote_dir).expect("mkdir remote");
    let port = server.port.to_string();
    for (mode, flag) in [("legacy", "-O"), ("sftp", "-s")] {
        let remote = remote_dir.join(format!("up-{mode}.bin"));
        let mut args = server.client_opts();
        args.extend([
            flag.to_string(),
            "-P".into(),
            port.clone(),
            src.display().to_string(),
            format!("root@127.0.0.1:{}", remote.display()),
        ]);
        let (st, _, err) = server.run_as_bot(&bot, "/usr/bin/scp", &args);
        assert!(st.success(), "scp {mode} up: {err}");
        assert_eq!(sha256(&remote), want, "scp {mode} up");
        let back = server.bot_home.join(format!("down-{mode}.bin"));
        let mut args = server.client_opts();
        args.extend([
            flag.to_string(),
            "-P".into(),
            port.clone(),
            format!("root@127.0.0.1:{}", remote.display()),
            back.display().to_string(),
        ]);
        let (st, _, err) = server.run_as_bot(&bot, "/usr/bin/scp", &args);
        assert!(st.success(), "scp {mode} down: {err}");
        assert_eq!(sha256(&back), want, "scp {mode} down");
        let _ = fs::remove_file(&remote);
        let _ = fs::remove_file(&back);
    }
    // sftp put and get in batch mode.
    let batch = server.bot_home.join("batch");
    let remote = remote_dir.join("sftp.bin");
    let back = server.bot_home.join("sftp-back.bin");
    fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            src.display(),
            remote.display(),
            remote.display(),
            back.display()
        ),
    )
    .expect("batch");
    let mut args = server.client_opts();
    args.extend([
        "-P".to_string(),
        port,
        "-b".into(),
        batch.display().to_string(),
        "root@127.0.0.1".into(),
    ]);
    let (st, _, err) = server.run_as_bot(&bot, "/usr/bin/sftp", &args);
    assert!(st.success(), "sftp: {err}");
    assert_eq!(sha256(&remote), want, "sftp put");
    assert_eq!(sha256(&back), want, "sftp get");
    for f in [&src, &remote, &back] {
        let _ = fs::remove_file(f);
    }
}

#[test]
fn interactive_shell_under_tmux_is_recorded_as_asciicast() {
    require_root();
    let rules = format!(
        "{EXEC_RULES}\n[[rule]]\nname = \"shells\"\nidentities = [\"bot\"]\ntargets = [\"box\"]\naction = \"allow\"\nssh = {{ shell = true }}\n"
    );
    let (server, bot, agent) = world("ssh-tmux", &rules);
    let sock = server.bot_home.join("tmux.sock");
    let status = server.bot_home.join("status");
    let mut ssh = vec!["/usr/bin/ssh".to_string()];
    ssh.extend(server.client_opts());
    ssh.extend(["-tt", "-p", &server.port.to_string(), "root@127.0.0.1"].map(String::from));
    // ssh's own messages go to a file, and the pane outlives ssh (so a failure shows why,
    // instead of "no server running" when the tmux session ends with ssh).
    let ssh_err = server.bot_home.join("ssh.err");
    let shell_cmd = format!(
        "{} 2>{}; echo EXIT=$? > {}; sleep 120",
        ssh.join(" "),
        ssh_err.display(),
        status.display()
    );
    let home = server.bot_home.display().to_string();
    let tmux = vm_tests::BotTmux::start(&bot, &sock, &[("HOME", &home)], 80, 24, &shell_cmd);
    let pane = || tmux.pane();
    let prompt = wait_until(std::time::Duration::from_secs(20), || {
        pane().contains('#').then_some(())
    });
    assert!(
        prompt.is_some(),
        "no shell prompt in 20 s; pane: {:?}; ssh stderr: {:?}; {:?}",
        pane(),
        fs::read_to_string(&ssh_err).unwrap_or_default(),
        fs::read_to_string(&status).unwrap_or_default()
    );
    tmux.keys(&["echo typed-$((6*7))", "Enter"]);
    wait_for(std::time::Duration::from_secs(10), "typed output", || {
        pane().contains("typed-42").then_some(())
    });
    // Resizing reaches the remote terminal.
    tmux.run(&["resize-window", "-x", "100", "-y", "30"]);
    tmux.keys(&["stty size", "Enter"]);
    wait_for(std::time::Duration::from_secs(10), "new size", || {
        pane().contains("30 100").then_some(())
    });
    // Ctrl-C interrupts the remote command, the shell goes on.
    tmux.keys(&["sleep 60; echo not-interrupted", "Enter"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    tmux.keys(&["C-c"]);
    tmux.keys(&["echo after-$((1+1))", "Enter"]);
    wait_for(std::time::Duration::from_secs(10), "after Ctrl-C", || {
        pane().contains("after-2").then_some(())
    });
    tmux.keys(&["exit 3", "Enter"]);
    let st = wait_for(std::time::Duration::from_secs(15), "ssh exit", || {
        fs::read_to_string(&status)
            .ok()
            .filter(|s| s.contains("EXIT="))
    });
    assert_eq!(st.trim(), "EXIT=3");
    // (`after-2` within seconds of a `sleep 60` shows Ctrl-C interrupted it.)

    // The recording: asciicast v2 with output and the resize, which asciinema plays.
    checked_cast(&agent.data_dir, "typed-42", "100x30");
    let sessions = agent.data_dir.join("sessions");
    // `tollgate replay` prints the terminal's output.
    let session = fs::read_dir(&sessions)
        .expect("sessions")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.ends_with(".jsonl"))
        .and_then(|n| n.split('.').next().map(str::to_string))
        .expect("jsonl recording");
    let (shown, err) = replay(&agent.data_dir, &session);
    assert!(shown.contains("typed-42"), "{shown}\n{err}");
}

/// `ssh [extra] root@127.0.0.1 [-- command]` as the bot (its HOME, stdin null, stdout and
/// stderr piped), to spawn; tests add environment or stdin.
fn bot_ssh(
    server: &SshServer,
    bot: &Cgroup,
    extra: &[&str],
    command: Option<&str>,
) -> std::process::Command {
    let mut args = server.client_opts();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-p", &server.port.to_string(), "root@127.0.0.1"].map(String::from));
    if let Some(c) = command {
        args.extend(["--".to_string(), c.to_string()]);
    }
    let mut cmd = bot.command(Path::new("/usr/bin/ssh"));
    cmd.args(&args)
        .env("HOME", &server.bot_home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// `ssh` as the bot in the background, its stderr readable line by line.
fn spawn_ssh(server: &SshServer, bot: &Cgroup, command: &str) -> std::process::Child {
    bot_ssh(server, bot, &[], Some(command))
        .spawn()
        .expect("spawn ssh")
}

/// A ControlMaster connection of the bot (`ssh -M -N -f`) with its socket `name` in the bot's
/// HOME; returns the `ControlPath=...` option for the clients that share it.
fn control_master(server: &SshServer, bot: &Cgroup, name: &str) -> String {
    let ctl_opt = format!("ControlPath={}", server.bot_home.join(name).display());
    let mut args = server.client_opts();
    args.extend(["-p", &server.port.to_string()].map(String::from));
    args.extend(
        [
            "-o",
            "ControlMaster=yes",
            "-o",
            &ctl_opt,
            "-o",
            "ControlPersist=60",
            "-N",
            "-f",
            "root@127.0.0.1",
        ]
        .map(String::from),
    );
    let (st, _, err) = server.run_as_bot(bot, "/usr/bin/ssh", &args);
    assert!(st.success(), "master: {err}");
    ctl_opt
}

/// End the ControlMaster of `ctl_opt` (`ssh -O exit`).
fn stop_master(server: &SshServer, bot: &Cgroup, ctl_opt: &str) {
    let mut stop = server.client_opts();
    stop.extend(["-o", ctl_opt, "-O", "exit", "root@127.0.0.1"].map(String::from));
    let _ = server.run_as_bot(bot, "/usr/bin/ssh", &stop);
}

/// Read the child's stderr until the approval notice; returns the request number.
fn held_approval(child: &mut std::process::Child) -> (u64, String) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr);
    let mut line = String::new();
    lines.read_line(&mut line).expect("read stderr");
    let n = line
        .split("approval #")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no approval notice: {line:?}"));
    // Keep draining in the background so the child never blocks on a full pipe.
    let (tx, _rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(lines.get_mut(), &mut rest);
        let _ = tx.send(rest);
    });
    (n, line)
}

#[test]
fn approval_holds_the_channel_then_runs_or_refuses_with_the_comment() {
    require_root();
    let server = SshServer::start("ssh-appr");
    let bot = Cgroup::new("ssh-appr-bot");
    let body = [
        identity_for("bot", &bot),
        server.target_toml("box"),
        format!(
            "{EXEC_RULES}\n[[rule]]\nname = \"restarts need ops\"\nidentities = [\"bot\"]\ntargets = [\"box\"]\naction = \"approve\"\nssh = {{ exec = [\"echo restart *\"] }}\napprovers = [\"ops\"]\ntimeout = \"2m\"\n"
        ),
    ]
    .concat();
    let agent = AgentProc::start_with_admin("ssh-appr", FailMode::Closed, &body);
    let admin = agent.admin.expect("admin").to_string();
    let token = agent.data_dir.join("admin.token").display().to_string();
    let cli = |args: &[&str]| {
        let mut a = vec!["approvals"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--admin", &admin, "--token-file", &token]);
        tollgate(&a)
    };
    wait_for(std::time::Duration::from_secs(10), "admin API", || {
        std::fs::metadata(agent.data_dir.join("admin.token")).ok()
    });

    // Approved: the held command runs once.
    let mut child = spawn_ssh(&server, &bot, "echo restart app");
    let (n, notice) = held_approval(&mut child);
    assert!(notice.contains("waits for approval"), "{notice}");
    assert!(
        notice.contains(&format!("tollgate approvals approve {n}")),
        "{notice}"
    );
    let (code, out, err) = cli(&["approve", &n.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let out = child.wait_with_output().expect("ssh");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "restart app\n");

    // Denied with a comment: 126 and the comment on stderr.
    let mut child = spawn_ssh(&server, &bot, "echo restart db");
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr");
    let mut reader = std::io::BufReader::new(stderr);
    let mut first = String::new();
    reader.read_line(&mut first).expect("notice");
    let n: u64 = first
        .split("approval #")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("{first:?}"));
    let (code, out, err) = cli(&["deny", &n.to_string(), "--comment", "not during the freeze"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).expect("stderr");
    let status = child.wait().expect("ssh");
    assert_eq!(status.code(), Some(126), "{rest}");
    assert!(rest.contains("not during the freeze"), "{rest}");

    // Withdrawn: the bot goes away while held; the request leaves the queue.
    let mut child = spawn_ssh(&server, &bot, "echo restart cache");
    let (n, _) = held_approval(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    let mut last = String::new();
    let withdrawn = (0..150).any(|_| {
        let (_, out, _) = cli(&["list", "--json"]);
        last = out.clone();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        // Not pending any more, and recorded as cancelled.
        let in_list = |k: &str| {
            v[k].as_array()
                .and_then(|a| a.iter().find(|r| r["id"] == n).cloned())
        };
        let gone = in_list("pending").is_none()
            && in_list("recent").is_some_and(|r| r["status"] == "cancelled");
        if !gone {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        gone
    });
    assert!(
        withdrawn,
        "request #{n} still pending after the bot left: {last}"
    );
}

/// A file of `mib` MiB of random bytes, owned by the bot.
fn random_file(path: &Path, mib: usize) -> String {
    let st = std::process::Command::new("head")
        .args(["-c", &(mib << 20).to_string(), "/dev/urandom"])
        .stdout(fs::File::create(path).expect("create"))
        .status()
        .expect("head");
    assert!(st.success());
    std::os::unix::fs::chown(path, Some(BOT_UID), Some(BOT_UID)).expect("chown");
    sha256(path)
}

#[test]
fn rsync_and_git_over_ssh_are_byte_identical() {
    require_root();
    let rules = r#"
[[rule]]
name = "rsync and git"
identities = ["bot"]
targets = ["box"]
action = "allow"
ssh = { exec = ["rsync --server *", "git-upload-pack *", "git-receive-pack *"] }
"#;
    let (server, bot, agent) = world("ssh-rsync", rules);
    let ssh_cmd = format!("ssh {} -p {}", server.client_opts().join(" "), server.port);
    // rsync -e ssh, both ways, 100 MiB.
    let src = server.bot_home.join("big.bin");
    let want = random_file(&src, 100);
    let remote_dir = server.dir.path().join("rsync-remote");
    fs::create_dir(&remote_dir).expect("mkdir");
    let remote = remote_dir.join("big.bin");
    let (st, _, err) = server.run_as_bot(
        &bot,
        "/usr/bin/rsync",
        &[
            "-e".into(),
            ssh_cmd.clone(),
            src.display().to_string(),
            format!("root@127.0.0.1:{}", remote.display()),
        ],
    );
    assert!(st.success(), "rsync up: {err}\n{}", agent.stderr_text());
    assert_eq!(sha256(&remote), want, "rsync up");
    let back = server.bot_home.join("big-back.bin");
    let (st, _, err) = server.run_as_bot(
        &bot,
        "/usr/bin/rsync",
        &[
            "-e".into(),
            ssh_cmd.clone(),
            format!("root@127.0.0.1:{}", remote.display()),
            back.display().to_string(),
        ],
    );
    assert!(st.success(), "rsync down: {err}");
    assert_eq!(sha256(&back), want, "rsync down");
    let _ = fs::remove_file(&remote);
    let _ = fs::remove_file(&back);

    // git push then clone over ssh (git-receive-pack / git-upload-pack), with the 100 MiB file.
    let bare = server.dir.path().join("repo.git");
    let st = std::process::Command::new("git")
        .args(["init", "-q", "--bare"])
        .arg(&bare)
        .status()
        .expect("git init --bare");
    assert!(st.success());
    let url = format!("ssh://root@127.0.0.1:{}{}", server.port, bare.display());
    let work = server.bot_home.join("work");
    let git = |args: &[&str], dir: &Path| {
        let mut all = vec![
            "-C".to_string(),
            dir.display().to_string(),
            "-c".into(),
            "user.name=bot".into(),
            "-c".into(),
            "user.email=bot@example.invalid".into(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let child = bot
            .command(Path::new("/usr/bin/git"))
            .args(&all)
            .env("HOME", &server.bot_home)
            .env("GIT_SSH_COMMAND", &ssh_cmd)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn git");
        let (st, out, err) = wait_child(child, std::time::Duration::from_secs(300), "git");
        assert!(
            st.success(),
            "git {args:?}: {out}{err}\n{}",
            agent.stderr_text()
        );
    };
    let (st, _, err) = server.run_as_bot(&bot, "/bin/mkdir", &[work.display().to_string()]);
    assert!(st.success(), "{err}");
    git(&["init", "-q", "-b", "main"], &work);
    fs::rename(&src, work.join("big.bin")).expect("move big file");
    git(&["add", "big.bin"], &work);
    git(&["commit", "-q", "-m", "big"], &work);
    git(&["push", "-q", &url, "main"], &work);
    let clone = server.bot_home.join("clone");
    git(
        &[
            "clone",
            "-q",
            "-b",
            "main",
            &url,
            &clone.display().to_string(),
        ],
        &server.bot_home,
    );
    assert_eq!(sha256(&clone.join("big.bin")), want, "git clone");
    let _ = fs::remove_dir_all(&work);
    let _ = fs::remove_dir_all(&clone);
    let _ = fs::remove_dir_all(&bare);
}

#[test]
fn malformed_input_ends_that_session_only() {
    require_root();
    let (server, bot, agent) = world("ssh-bad", EXEC_RULES);
    // A client that speaks garbage after a version line, and one with an absurd packet length.
    for payload in [
        "SSH-2.0-evil\\r\\n\\x00\\x00\\x00\\x0c\\x0a\\x14garbagegarbage",
        "SSH-2.0-evil\\r\\n\\xff\\xff\\xff\\xf0\\x04AAAAAAAAAAAAAAAA",
        "not ssh at all\\r\\n\\r\\n\\r\\n",
    ] {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{}; printf '{payload}' >&3; timeout 10 cat <&3 >/dev/null; echo done",
            server.port
        );
        let (st, out, err) = server.run_as_bot(&bot, "/bin/bash", &["-c".to_string(), script]);
        assert!(st.success() && out.contains("done"), "{out}{err}");
    }
    // The agent is still serving: a real client works.
    let (st, out, err) = server.ssh(&bot, &[], "echo still-serving");
    assert_eq!(
        (st.code(), out.as_str()),
        (Some(0), "still-serving\n"),
        "{err}"
    );
    // Each bad session ended with a close event that names the client side.
    let closes = agent.wait_audit_count("three client-side closes", 3, |e| {
        e["event"] == "close" && e["status"] == "client"
    });
    assert!(closes.len() >= 3, "{closes:?}");
}

#[test]
fn upstream_killed_mid_channel_gives_a_clean_error() {
    require_root();
    let (server, bot, _agent) = world("ssh-kill", EXEC_RULES);
    let child = spawn_ssh(&server, &bot, "sleep 60");
    let sshd = server.pid().expect("sshd pid");
    // The per-connection sshd process (a child of the sshd this test started) serving it.
    let conn = wait_for(
        std::time::Duration::from_secs(15),
        "the session's sshd",
        || {
            let out = std::process::Command::new("pgrep")
                .args(["-P", &sshd.to_string()])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i32>().ok())
        },
    );
    // Let the exec start, then kill the upstream side of this one session.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(conn), nix::sys::signal::SIGKILL);
    let (st, _out, err) = wait_child(child, std::time::Duration::from_secs(20), "ssh");
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("upstream connection was lost"), "{err}");
    // Other sessions go on.
    let (st, out, err) = server.ssh(&bot, &[], "echo after");
    assert_eq!((st.code(), out.as_str()), (Some(0), "after\n"), "{err}");
}

#[test]
fn ssh_ca_host_certificates_need_the_cert_authority_line() {
    require_root();
    let server = SshServer::start("ssh-ca");
    let bot = Cgroup::new("ssh-ca-bot");
    let body = [
        identity_for("bot", &bot),
        server.target_toml_with("box", false),
        EXEC_RULES.to_string(),
    ]
    .concat();
    let agent = AgentProc::start("ssh-ca", FailMode::Closed, &body);
    // The bot trusts only the real server's key: the agent's certificate is not accepted
    // (OpenSSH's own host-key error, nothing runs).
    let (st, out, err) = server.ssh(&bot, &[], "echo should-not-run");
    assert_eq!(st.code(), Some(255), "out {out:?} err {err:?}");
    assert!(out.is_empty());
    assert!(
        err.contains("Host key verification failed")
            || err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{err}"
    );
    // With the @cert-authority line from `tollgate ca export --ssh`, the same client works.
    let (code, line, err) = tollgate(&[
        "ca",
        "export",
        "--ssh",
        "--data-dir",
        &agent.data_dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(line.starts_with("@cert-authority * ssh-ed25519 "), "{line}");
    fs::write(&server.bot_known_hosts, &line).expect("known_hosts");
    let (st, out, err) = server.ssh(&bot, &[], "echo via-certificate");
    assert_eq!(
        (st.code(), out.as_str()),
        (Some(0), "via-certificate\n"),
        "{err}"
    );
}

#[test]
fn workload_oidc_token_is_the_ssh_password() {
    require_root();
    let idp = vm_tests::oidc::OidcProvider::start("ssh-oidc");
    let server = SshServer::start("ssh-oidc");
    let bot = Cgroup::new("ssh-oidc-bot");
    let body = format!(
        "[[identity]]\nname = \"bot\"\ncgroup = \"{}\"\noidc = {{ issuer = \"{}\", audience = \"tollgate\", require_claims = {{ groups = [\"deployers\"] }} }}\n\n{}{EXEC_RULES}",
        bot.glob(),
        idp.issuer(),
        server.target_toml("box"),
    );
    let agent = AgentProc::start("ssh-oidc", FailMode::Closed, &body);
    let askpass = server.bot_home.join("askpass");
    let token_file = server.bot_home.join("token");
    fs::write(
        &askpass,
        format!("#!/bin/sh\ncat {}\n", token_file.display()),
    )
    .expect("askpass");
    fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let run_with = |token: &str, method: &str| {
        fs::write(&token_file, token).expect("token");
        // Password prompts need BatchMode off; the askpass helper answers with the token.
        let mut args: Vec<String> = server
            .client_opts()
            .into_iter()
            .map(|a| {
                if a == "BatchMode=yes" {
                    "BatchMode=no".into()
                } else {
                    a
                }
            })
            .collect();
        args.extend(
            [
                "-o",
                &format!("PreferredAuthentications={method}"),
                "-o",
                "NumberOfPasswordPrompts=1",
                "-p",
                &server.port.to_string(),
                "root@127.0.0.1",
                "--",
                "echo with-token",
            ]
            .map(String::from),
        );
        let child = bot
            .command(Path::new("/usr/bin/ssh"))
            .args(&args)
            .env("HOME", &server.bot_home)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ssh");
        wait_child(child, std::time::Duration::from_secs(60), "ssh")
    };
    let run = |token: &str| run_with(token, "password");
    let good = idp.workload_token("deploy-bot");
    let (st, out, err) = run(&good);
    assert_eq!(
        (st.code(), out.as_str()),
        (Some(0), "with-token\n"),
        "{err}\n{}",
        agent.stderr_text()
    );
    let ev = agent.wait_audit("oidc auth allowed", |e| {
        e["event"] == "auth" && e["outcome"] == "allowed"
    });
    assert!(ev["oidc_subject"].is_string(), "{ev}");
    // A forged token: refused before anything reaches upstream.
    let forged = format!("{}x", &good[..good.len() - 1]);
    let (st, out, err) = run(&forged);
    assert_eq!(st.code(), Some(255), "{out}{err}");
    assert!(out.is_empty() && err.contains("Permission denied"), "{err}");
    agent.wait_audit("oidc auth denied", |e| {
        e["event"] == "auth" && e["outcome"] == "denied"
    });
    // The same token through keyboard-interactive (one hidden "Token: " prompt).
    let (st, out, err) = run_with(&good, "keyboard-interactive");
    assert_eq!(
        (st.code(), out.as_str()),
        (Some(0), "with-token\n"),
        "keyboard-interactive: {err}\n{}",
        agent.stderr_text()
    );
    let (st, out, err) = run_with(&forged, "keyboard-interactive");
    assert_eq!(st.code(), Some(255), "{out}{err}");
    assert!(out.is_empty() && err.contains("Permission denied"), "{err}");
    let outcomes: Vec<_> = agent
        .wait_audit_count("four auth lines", 4, |e| e["event"] == "auth")
        .into_iter()
        .map(|e| e["outcome"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        outcomes,
        ["allowed", "denied", "allowed", "denied"],
        "{}",
        agent.stderr_text()
    );
    // The token never reaches the audit log or the agent's own log.
    let audit = fs::read_to_string(agent.audit_path()).expect("audit");
    let sig = good.rsplit('.').next().unwrap_or_default();
    assert!(!audit.contains(sig) && !agent.stderr_text().contains(sig));
}

/// Every JSON line of every recording under `sessions`.
fn recorded_events(sessions: &Path) -> Vec<serde_json::Value> {
    fs::read_dir(sessions)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<serde_json::Value>>()
        })
        .collect()
}

#[test]
fn exec_recordings_and_audit_mask_secrets() {
    require_root();
    let rules = format!(
        "{EXEC_RULES}\n[[rule]]\nname = \"listing\"\nidentities = [\"bot\"]\ntargets = [\"box\"]\n\
         action = \"allow\"\nssh = {{ exec = [\"ls *\"] }}\n"
    );
    let (server, bot, agent) = world("ssh-rec", &rules);
    // An AWS access key id in an allowed command and in a denied one, and a JWT-shaped value.
    let key = "AKIAIOSFODNN7EXAMPLE";
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXZhbHVlLWhlcmU";
    let (st, out, err) = server.ssh(&bot, &[], &format!("echo {key}"));
    assert_eq!(st.code(), Some(0), "{err}");
    // The bot still gets its command's real output: masking applies to what tollgate keeps.
    assert_eq!(out, format!("{key}\n"));
    let (st, _, err) = server.ssh(&bot, &[], &format!("printf {jwt}"));
    assert_eq!(st.code(), Some(126), "{err}");
    assert!(!err.contains(jwt), "the refusal echoes the secret: {err}");
    let (st, _, _) = server.ssh(&bot, &[], "exit 4");
    assert_eq!(st.code(), Some(4));
    // Recordings: one JSON line per channel with command, action, rule, exit status, bytes.
    let sessions = agent.data_dir.join("sessions");
    let lines: Vec<serde_json::Value> = wait_for(
        std::time::Duration::from_secs(10),
        "three channel lines",
        || {
            let all: Vec<serde_json::Value> = recorded_events(&sessions)
                .into_iter()
                .filter(|v| v["event"] == "exec")
                .collect();
            (all.len() >= 3).then_some(all)
        },
    );
    let exit4 = lines
        .iter()
        .find(|v| v["command"] == "exit 4")
        .expect("exit 4 recorded");
    assert_eq!(exit4["action"], "allow");
    assert_eq!(exit4["rule"], "plain commands");
    assert_eq!(exit4["exit_status"], 4);
    let echo = lines
        .iter()
        .find(|v| {
            v["command"]
                .as_str()
                .is_some_and(|c| c.starts_with("echo "))
        })
        .expect("echo recorded");
    assert_eq!(echo["bytes_down"], key.len() + 1, "{echo}");
    let denied = lines
        .iter()
        .find(|v| v["action"] == "deny")
        .expect("deny recorded");
    assert_eq!(denied["exit_status"], 126);
    // Neither secret is in any recording or the audit log.
    let mut kept = fs::read_to_string(agent.audit_path()).expect("audit");
    for e in fs::read_dir(&sessions).expect("sessions").flatten() {
        kept.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
    }
    assert!(!kept.contains(key), "AWS key kept:\n{kept}");
    assert!(!kept.contains(jwt), "JWT kept:\n{kept}");
    assert!(!agent.stderr_text().contains(key) && !agent.stderr_text().contains(jwt));

    // A command without a terminal: its stdout and stderr are `output` lines of the session's
    // recording, masked, naming the channel, and `tollgate replay` prints them.
    // A key or a JWT glued to other characters is still masked (in the command and its
    // output), and so is a lowercased key (a key id's case carries nothing).
    let lower = key.to_lowercase();
    let (st, out, err) = server.ssh(&bot, &[], &format!("echo glued{key} {lower} x{jwt}"));
    assert_eq!(
        (st.code(), out),
        (Some(0), format!("glued{key} {lower} x{jwt}\n")),
        "{err}"
    );
    let (st, _, err) = server.ssh(&bot, &[], &format!("ls /nonexistent-{key}"));
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains(key), "the bot sees the real stderr: {err}");
    let outputs = |stream: &str| -> Vec<serde_json::Value> {
        recorded_events(&sessions)
            .into_iter()
            .filter(|v| v["event"] == "output" && v["stream"] == stream)
            .collect()
    };
    let stdout = outputs("stdout");
    assert!(
        stdout.iter().any(|v| v["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty() && !t.contains(key) && v["ssh"]["channel"].is_u64())),
        "echo's output recorded, masked: {stdout:?}"
    );
    let stderr = wait_for(std::time::Duration::from_secs(10), "stderr line", || {
        let e = outputs("stderr");
        (!e.is_empty()).then_some(e)
    });
    let text = stderr[0]["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("cannot access") && text.contains("/nonexistent-"),
        "{stderr:?}"
    );
    let mut kept = String::new();
    for e in fs::read_dir(&sessions).expect("sessions").flatten() {
        kept.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
    }
    assert!(!kept.contains(key), "AWS key kept in output lines:\n{kept}");
    assert!(!kept.contains(&lower), "lowercased AWS key kept:\n{kept}");
    assert!(!kept.contains(jwt), "glued JWT kept:\n{kept}");
    let session = fs::read_dir(&sessions)
        .expect("sessions")
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok().map(|t| (e, t)))
        .find(|(_, t)| t.contains("cannot access"))
        .and_then(|(e, _)| {
            let n = e.file_name().into_string().ok()?;
            n.split('.').next().map(str::to_string)
        })
        .expect("the ls session's recording");
    let (shown, err) = replay(&agent.data_dir, &session);
    assert!(
        shown.contains("STDERR") && shown.contains("cannot access") && !shown.contains(key),
        "{shown}\n{err}"
    );
}

#[test]
fn upstream_connections_are_reused_unless_pool_false() {
    require_root();
    // Reuse is the default for ssh targets; `pool = false` turns it off.
    for (pool, want_logins) in [(true, 1), (false, 3)] {
        let tag = if pool { "ssh-pool" } else { "ssh-nopool" };
        let server = SshServer::start(tag);
        let bot = Cgroup::new(&format!("{tag}-bot"));
        let mut target = server.target_toml("box");
        if !pool {
            target = target.replace("protocol = \"ssh\"\n", "protocol = \"ssh\"\npool = false\n");
        }
        let body = [identity_for("bot", &bot), target, EXEC_RULES.to_string()].concat();
        let agent = AgentProc::start(tag, FailMode::Closed, &body);
        for i in 0..3 {
            let (st, out, err) = server.ssh(&bot, &[], &format!("echo run-{i}"));
            assert_eq!(
                (st.code(), out.clone()),
                (Some(0), format!("run-{i}\n")),
                "{err}"
            );
        }
        // The server saw one login with the pool (the next sessions reused it), three without.
        let logins = server.log().matches("Accepted publickey").count();
        assert_eq!(logins, want_logins, "pool={pool}\n{}", server.log());
        let reused = agent
            .wait_audit_count("reused upstream logins", 3 - want_logins, |e| {
                e["event"] == "upstream_login" && e["reused"] == true
            })
            .len();
        assert_eq!(reused, 3 - want_logins, "pool={pool}");
        if !pool {
            continue;
        }
        // A reload that changes the target (one more address; pooling stays on) drops the kept
        // connection (the SSH handler's on_reload): the next session logs in anew.
        let port = format!("127.0.0.1:{}", server.port);
        let changed = body.replace(
            &format!("address = [\"{port}\"]"),
            &format!("address = [\"{port}\", \"[::1]:{}\"]", server.port),
        );
        assert_ne!(changed, body, "the target's address line");
        agent.write_policy(&changed);
        agent.wait_audit("policy_reload ok", |e| {
            e["event"] == "policy_reload" && e["result"] == "ok"
        });
        let (st, out, err) = server.ssh(&bot, &[], "echo after-reload");
        assert_eq!(
            (st.code(), out),
            (Some(0), "after-reload\n".into()),
            "{err}"
        );
        let logins = server.log().matches("Accepted publickey").count();
        assert_eq!(
            logins,
            2,
            "a fresh login after the reload\n{}",
            server.log()
        );
        let last = agent
            .audit()
            .into_iter()
            .rev()
            .find(|e| e["event"] == "upstream_login")
            .expect("upstream_login after the reload");
        assert_eq!(last["reused"], false, "{last}");
    }
}

/// The exit status `ssh host 'exit N'` must give for run `i` (varied, never 255, which is
/// ssh's own error status).
fn status_of(i: usize) -> i32 {
    ((i * 37 + 1) % 250) as i32
}

#[test]
fn pooled_connection_passes_every_exit_status() {
    require_root();
    let (server, bot, agent) = world("ssh-pool50", EXEC_RULES);
    // 50 bot connections in a row, all served as channels of one reused upstream login.
    for i in 0..50 {
        let want = status_of(i);
        let (st, _, err) = server.ssh(&bot, &[], &format!("exit {want}"));
        assert_eq!(
            st.code(),
            Some(want),
            "run {i}: {err}\n{}",
            agent.stderr_text()
        );
    }
    let logins = server.log().matches("Accepted publickey").count();
    assert_eq!(logins, 1, "{}", server.log());
    // ControlMaster on top: the multiplexed channels of one bot connection, each on the
    // reused upstream connection, each with its own status.
    let ctl_opt = control_master(&server, &bot, "ctl50");
    let mux = ["-o", "ControlMaster=no", "-o", ctl_opt.as_str()];
    for i in 0..30 {
        let want = status_of(i + 50);
        let (st, _, err) = server.ssh(&bot, &mux, &format!("exit {want}"));
        assert_eq!(st.code(), Some(want), "mux run {i}: {err}");
    }
    stop_master(&server, &bot, &ctl_opt);
    let logins = server.log().matches("Accepted publickey").count();
    assert_eq!(logins, 1, "{}", server.log());
}

#[test]
fn exit_signals_propagate_as_openssh_does_directly() {
    require_root();
    let rules = format!(
        "{EXEC_RULES}\n[[rule]]\nname = \"self kill\"\nidentities = [\"bot\"]\ntargets = [\"box\"]\naction = \"allow\"\nssh = {{ exec = [\"kill -TERM *\"] }}\n"
    );
    let server = SshServer::start("ssh-sig");
    // (`$$` is a substitution the matcher refuses; `0` is the shell's own process group.)
    let cmd = "kill -TERM 0";
    // Directly (before any agent runs), with the key the server accepts: OpenSSH's own
    // behaviour for a command killed by a signal.
    let mut args = server.client_opts();
    let key_at = args.iter().position(|a| a == "-i").expect("-i") + 1;
    args[key_at] = server.agent_key.display().to_string();
    args.extend(
        [
            "-v",
            "-p",
            &server.port.to_string(),
            "root@127.0.0.1",
            "--",
            cmd,
        ]
        .map(String::from),
    );
    let child = std::process::Command::new("/usr/bin/ssh")
        .args(&args)
        .env("HOME", &server.bot_home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ssh");
    let (direct, _, direct_err) = wait_child(child, std::time::Duration::from_secs(60), "ssh");
    assert!(
        direct_err.contains("rtype exit-signal"),
        "direct: {direct_err}"
    );
    // Through the agent, as the bot with its own (rejected) key.
    let bot = Cgroup::new("ssh-sig-bot");
    let body = [identity_for("bot", &bot), server.target_toml("box"), rules].concat();
    let agent = AgentProc::start("ssh-sig", FailMode::Closed, &body);
    let (st, out, err) = server.ssh(&bot, &["-v"], cmd);
    assert_eq!(
        st.code(),
        direct.code(),
        "out {out:?} err {err}\n{}",
        agent.stderr_text()
    );
    assert_eq!(st.code(), Some(255), "{err}");
    assert!(err.contains("rtype exit-signal"), "{err}");
    assert!(!err.contains("tollgate:"), "{err}");
    // A normal status after it on the same agent.
    let (st, _, err) = server.ssh(&bot, &[], "exit 9");
    assert_eq!(st.code(), Some(9), "{err}");
}

/// A TCP service that greets each connection once (an unprotected port).
fn greeter() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        use std::io::Write;
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"hello through the forward\n");
        }
    });
    addr
}

/// Connect to a local forward's port (retrying until ssh listens) and read what comes.
fn read_forward(port: u16) -> String {
    use std::io::Read;
    let mut s = wait_for(
        std::time::Duration::from_secs(20),
        "the forward's local port",
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    got
}

/// `ssh [extra] host 'sleep 4'` as the bot in the background (a forward lives as long).
fn spawn_ssh_with(server: &SshServer, bot: &Cgroup, extra: &[&str]) -> std::process::Child {
    bot_ssh(server, bot, extra, Some("sleep 4"))
        .spawn()
        .expect("spawn ssh")
}

#[test]
fn l_r_d_a_and_sendenv_are_each_refused_by_default() {
    require_root();
    let rules = EXEC_RULES.replace("\"sleep *\"", "\"sleep *\", \"printenv *\"");
    let (server, bot, agent) = world("ssh-fwd5", &rules);
    let target = greeter();
    let denied = |what: &str| {
        let ev = agent.wait_audit(what, |e| {
            e["event"] == "operation" && e["operation"] == what
        });
        assert_eq!(ev["action"], "deny", "{ev}");
        assert_eq!(ev["protocol"], "ssh", "{ev}");
    };
    // -L: the local port opens (ssh's side), but the channel to the destination is refused.
    let lport = free_port();
    let child = spawn_ssh_with(&server, &bot, &["-L", &format!("{lport}:{target}")]);
    assert_eq!(read_forward(lport), "", "a -L forward got through");
    let (_, _, err) = wait_child(child, std::time::Duration::from_secs(30), "ssh -L");
    assert!(err.contains("administratively prohibited"), "{err}");
    denied(&format!("direct-tcpip {target}"));
    // -D: a SOCKS5 CONNECT to the greeter through the dynamic forward is refused the same way.
    let dport = free_port();
    let child = spawn_ssh_with(&server, &bot, &["-D", &dport.to_string()]);
    let reply = {
        use std::io::{Read, Write};
        let mut s = wait_for(std::time::Duration::from_secs(20), "the -D port", || {
            std::net::TcpStream::connect(("127.0.0.1", dport)).ok()
        });
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&[5, 1, 0]).expect("socks hello");
        let mut hello = [0u8; 2];
        s.read_exact(&mut hello).expect("socks method");
        assert_eq!(hello, [5, 0]);
        let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
        req.extend(target.port().to_be_bytes());
        s.write_all(&req).expect("socks connect");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    };
    assert!(
        !String::from_utf8_lossy(&reply).contains("hello through"),
        "a -D forward got through: {reply:?}"
    );
    assert!(
        reply.get(1).is_none_or(|&r| r != 0),
        "SOCKS success: {reply:?}"
    );
    let _ = wait_child(child, std::time::Duration::from_secs(30), "ssh -D");
    denied(&format!("direct-tcpip 127.0.0.1:{}", target.port()));
    // -R: the server-side listener is refused.
    let (st, _, err) = server.ssh(
        &bot,
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("0:{target}"),
        ],
        "echo should-not-run",
    );
    assert_eq!(st.code(), Some(255), "{err}");
    denied("tcpip-forward localhost:0");
    // -A with a real agent for the bot: the request is refused, the server never sets
    // SSH_AUTH_SOCK.
    let sock = server.bot_home.join("agent.sock");
    let mut ssh_agent = bot
        .command(Path::new("/usr/bin/ssh-agent"))
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    wait_for(
        std::time::Duration::from_secs(10),
        "ssh-agent socket",
        || sock.exists().then_some(()),
    );
    let child = bot_ssh(&server, &bot, &["-A"], Some("printenv SSH_AUTH_SOCK"))
        .env("SSH_AUTH_SOCK", &sock)
        .spawn()
        .expect("ssh -A");
    let (_st, out, err) = wait_child(child, std::time::Duration::from_secs(60), "ssh -A");
    let _ = ssh_agent.kill();
    let _ = ssh_agent.wait();
    assert_eq!(out, "", "agent forwarding reached the server: {err}");
    denied("auth-agent");
    // SendEnv: LANG is one the server accepts (AcceptEnv LANG), but tollgate refuses it.
    let child = bot_ssh(
        &server,
        &bot,
        &["-o", "SendEnv=LANG"],
        Some("printenv LANG"),
    )
    .env("LANG", "tollgate-sent.UTF-8")
    .spawn()
    .expect("ssh SendEnv");
    let (_st, out, err) = wait_child(child, std::time::Duration::from_secs(60), "ssh");
    assert!(
        !out.contains("tollgate-sent"),
        "LANG reached the server: {err}"
    );
    denied("env LANG");
}

#[test]
fn forwarding_true_lets_ssh_l_through_and_records_it() {
    require_root();
    let rules = format!(
        "{EXEC_RULES}\n[[rule]]\nname = \"fwd\"\nidentities = [\"bot\"]\ntargets = [\"box\"]\naction = \"allow\"\nssh = {{ forwarding = true }}\n"
    );
    let (server, bot, agent) = world("ssh-fwd-l", &rules);
    let target = greeter();
    let lport = free_port();
    let child = spawn_ssh_with(&server, &bot, &["-L", &format!("{lport}:{target}")]);
    assert_eq!(read_forward(lport), "hello through the forward\n");
    let _ = wait_child(child, std::time::Duration::from_secs(30), "ssh -L");
    let what = format!("direct-tcpip {target}");
    let ev = agent.wait_audit("allowed -L", |e| {
        e["event"] == "operation" && e["operation"] == what
    });
    assert_eq!(ev["action"], "allow", "{ev}");
    // The session recording names the forward's destination and its bytes.
    let sessions = agent.data_dir.join("sessions");
    let line = wait_for(
        std::time::Duration::from_secs(10),
        "recorded forward",
        || {
            fs::read_dir(&sessions).ok()?.flatten().find_map(|e| {
                fs::read_to_string(e.path())
                    .ok()?
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["event"] == "direct-tcpip")
            })
        },
    );
    assert_eq!(line["destination"], target.to_string(), "{line}");
    assert_eq!(line["bytes_down"], 26, "{line}");
}

#[test]
fn terminal_recordings_mask_secrets_split_across_reads() {
    require_root();
    let rules = format!(
        "{EXEC_RULES}\n[[rule]]\nname = \"shell\"\nidentities = [\"bot\"]\ntargets = [\"box\"]\naction = \"allow\"\nssh = {{ shell = true }}\n"
    );
    let (server, bot, agent) = world("ssh-castmask", &rules);
    // On the server: a script that prints each secret in two writes with a pause between, so
    // sshd reads the terminal twice and the agent sees two output chunks. The secrets are not
    // in what the bot types (only the script's path is), so any trace of them in the
    // recording comes from the output.
    let aws = "AKIAIOSFODNN7EXAMPLE";
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXZhbHVlLWhlcmU";
    let token = "abcdefghijklmnopqrstuvwxyz012345";
    let body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ";
    let script = server.dir.path().join("split.sh");
    let halves = |s: &str| (s[..s.len() / 2].to_string(), s[s.len() / 2..].to_string());
    let mut text = String::from("printf 'begin-marker\\n'\n");
    for (pre, secret, post) in [
        ("aws ", aws, " end\\n"),
        ("jwt=", jwt, "\\n"),
        ("Authorization: Bearer ", token, "\\n"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\\n",
            body,
            "\\n-----END OPENSSH PRIVATE KEY-----\\n",
        ),
    ] {
        let (a, b) = halves(secret);
        text.push_str(&format!(
            "printf -- '{pre}{a}'; sleep 0.4; printf -- '{b}{post}'\n"
        ));
    }
    text.push_str("printf 'end-marker\\n'\n");
    fs::write(&script, text).expect("script");
    let mut child = bot_ssh(&server, &bot, &["-tt"], None)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ssh -tt");
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("sh {}; exit 5\n", script.display()).as_bytes())
            .expect("type");
    }
    let (st, out, err) = wait_child(child, std::time::Duration::from_secs(60), "ssh -tt");
    assert_eq!(
        st.code(),
        Some(5),
        "out {out:?} err {err}\n{}",
        agent.stderr_text()
    );
    // The bot saw the real output, every secret whole.
    for secret in [aws, jwt, token, body] {
        assert!(out.contains(secret), "{secret} not printed: {out:?}");
    }
    // The recording: markers kept, no half of any secret.
    let sessions = agent.data_dir.join("sessions");
    let cast = wait_for(std::time::Duration::from_secs(10), "the cast file", || {
        fs::read_dir(&sessions).ok()?.flatten().find_map(|e| {
            let p = e.path();
            let t = fs::read_to_string(&p).ok()?;
            (p.extension()? == "cast" && t.contains("end-marker")).then_some(t)
        })
    });
    assert!(cast.contains("begin-marker"), "{cast}");
    for secret in [aws, jwt, token, body] {
        let (a, b) = halves(secret);
        assert!(
            !cast.contains(&a) && !cast.contains(&b),
            "part of {secret} recorded:\n{cast}"
        );
    }
}

#[test]
fn upstream_login_with_an_openssh_user_certificate() {
    require_root();
    // A user CA the server trusts; the agent's key is NOT in authorized_keys, only its
    // certificate (signed for principal root) lets it in.
    let ca_dir = TempDir::new("ssh-userca");
    let ca = ca_dir.path().join("user_ca");
    let key = ca_dir.path().join("agent_cert_key");
    for k in [&ca, &key] {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .status()
            .expect("ssh-keygen");
        assert!(st.success());
    }
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca)
        .args(["-I", "tollgate-agent", "-n", "root", "-V", "-5m:+1h"])
        .arg(key.with_extension("pub"))
        .status()
        .expect("ssh-keygen -s");
    assert!(st.success());
    let cert = ca_dir.path().join("agent_cert_key-cert.pub");
    assert!(cert.exists());
    let server = SshServer::start_with(
        "ssh-cert",
        &format!("TrustedUserCAKeys {}\n", ca.with_extension("pub").display()),
    );
    let bot = Cgroup::new("ssh-cert-bot");
    let plain = server.target_toml("box").replace(
        &format!("key_file = \"{}\"", server.agent_key.display()),
        &format!("key_file = \"{}\"", key.display()),
    );
    assert!(plain.contains(&key.display().to_string()));
    // The key alone (no certificate): the server refuses it, the bot gets a clean error.
    let body = [
        identity_for("bot", &bot),
        plain.clone(),
        EXEC_RULES.to_string(),
    ]
    .concat();
    let agent = AgentProc::start("ssh-cert-plain", FailMode::Closed, &body);
    let (st, out, err) = server.ssh(&bot, &[], "echo via-key");
    assert_eq!(st.code(), Some(255), "out {out:?} err {err}");
    assert!(
        err.contains("refused the injected credential"),
        "{err}\n{}",
        agent.stderr_text()
    );
    drop(agent);
    // With cert_file beside it: logged in by certificate.
    let with_cert = plain.replace(
        &format!("key_file = \"{}\"\n", key.display()),
        &format!(
            "key_file = \"{}\"\ncert_file = \"{}\"\n",
            key.display(),
            cert.display()
        ),
    );
    let body = [identity_for("bot", &bot), with_cert, EXEC_RULES.to_string()].concat();
    let agent = AgentProc::start("ssh-cert", FailMode::Closed, &body);
    let (st, out, err) = server.ssh(&bot, &[], "echo via-certificate");
    assert_eq!(
        (st.code(), out.as_str()),
        (Some(0), "via-certificate\n"),
        "{err}\n{}",
        agent.stderr_text()
    );
    let log = server.log();
    assert!(
        log.contains("Accepted publickey for root") && log.contains("ID tollgate-agent"),
        "{log}"
    );
}
