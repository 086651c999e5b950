//! Unmodified kubectl 1.32 as the unprivileged bot, through tollgate, against a fake API
//! server on loopback. The kubeconfig trusts the agent's CA (`certificate-authority-data`)
//! and holds no credentials: the agent injects the target's token, which the fake checks on
//! every request. Requests are decided per Kubernetes verb, resource and namespace.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use vm_tests::{
    kube::{kubeconfig, FakeApiServer, SECRET_PASSWORD},
    require_root, AgentProc, Cgroup, FailMode, TempDir,
};

const TOKEN: &str = "kube-sa-token-0b5d";

fn policy(bot: &Cgroup, api: &FakeApiServer, token: &Path) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

[[target]]
name = "cluster"
protocol = "kubernetes"
address = ["127.0.0.1:{port}"]
credential = "cluster-sa"
tls = {{ mode = "verify-full", ca_file = "{ca}", server_name = "localhost" }}

[credential.cluster-sa]
token_file = "{token}"

[[rule]]
name = "ci reads in default"
identities = ["ci-bot"]
targets = ["cluster"]
action = "allow"
kubernetes = {{ verbs = ["get", "list", "watch"], resources = ["pods", "pods/log", "events", "secrets"], namespaces = ["default"] }}

[[rule]]
name = "ci may exec into web-1"
identities = ["ci-bot"]
targets = ["cluster"]
action = "allow"
kubernetes = {{ verbs = ["create", "get"], resources = ["pods/exec"], namespaces = ["default"], names = ["web-1"], exec = ["echo *", "cat /etc/hostname"] }}

[[rule]]
name = "restarts need a human"
identities = ["ci-bot"]
targets = ["cluster"]
action = "approve"
kubernetes = {{ verbs = ["create", "get"], resources = ["pods/exec"], namespaces = ["default"], exec = ["restart *"] }}
timeout = "2m"

[[rule]]
name = "ci deletes pods in default"
identities = ["ci-bot"]
targets = ["cluster"]
action = "allow"
kubernetes = {{ verbs = ["delete"], resources = ["pods"], namespaces = ["default"] }}

[[rule]]
name = "ci mints tokens for the deployer"
identities = ["ci-bot"]
targets = ["cluster"]
action = "allow"
kubernetes = {{ verbs = ["create"], resources = ["serviceaccounts/token"], namespaces = ["default"], names = ["deployer"] }}

[[rule]]
name = "ci may act as viewer"
identities = ["ci-bot"]
targets = ["cluster"]
action = "allow"
kubernetes = {{ verbs = ["impersonate"], resources = ["users"], names = ["viewer"] }}
"#,
        glob = bot.glob(),
        port = api.port,
        ca = api.ca_file.display(),
        token = token.display(),
    )
}

struct Kubectl {
    home: PathBuf,
    config: PathBuf,
}

impl Kubectl {
    fn command(&self, bot: &Cgroup, args: &[&str]) -> Command {
        let mut c = bot.command(Path::new("/usr/bin/kubectl"));
        c.arg("--kubeconfig")
            .arg(&self.config)
            .args(["--request-timeout", "20s"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &self.home);
        c
    }
    fn run(&self, bot: &Cgroup, args: &[&str]) -> Output {
        self.command(bot, args).output().expect("kubectl")
    }
    fn spawn(&self, bot: &Cgroup, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
        let mut child = self
            .command(bot, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Lines from `rx` until one satisfies `pred`, within `timeout`.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = pred(&l);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("no matching line within {timeout:?}; saw {seen:?}"),
        }
    }
}

/// The fake API server, the bot, an agent (with the admin API) deciding by [`policy`], and
/// kubectl configured for the bot.
struct World {
    api: FakeApiServer,
    bot: Cgroup,
    agent: AgentProc,
    k: Kubectl,
    _files: TempDir,
    _home: TempDir,
}

fn world(tag: &str) -> World {
    require_root();
    let api = FakeApiServer::start(tag, TOKEN);
    let bot = Cgroup::new(&format!("{tag}-bot"));
    let files = TempDir::new(&format!("{tag}-files"));
    let token = files.path().join("sa.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    let agent = AgentProc::start_with_admin(tag, FailMode::Closed, &policy(&bot, &api, &token));
    let pem = std::fs::read_to_string(agent.data_dir.join("ca/ca.pem")).expect("agent CA");
    let home = TempDir::new(&format!("{tag}-home"));
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let config = home.path().join("kubeconfig");
    std::fs::write(&config, kubeconfig(api.port, &pem)).expect("kubeconfig");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let k = Kubectl {
        home: home.path().to_path_buf(),
        config,
    };
    World {
        api,
        bot,
        agent,
        k,
        _files: files,
        _home: home,
    }
}

#[test]
fn kubectl_through_the_agent_with_injected_token() {
    let World {
        api,
        bot,
        agent,
        k,
        _files,
        _home,
    } = world("kube-ctl");

    let o = k.run(&bot, &["get", "pods"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("web-1") && t.contains("web-2") && t.contains("Running"),
        "{t}"
    );

    let o = k.run(&bot, &["describe", "pod", "web-1"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("Name:") && t.contains("web-1") && t.contains("nginx:1.25"),
        "{t}"
    );

    // Another namespace: refused by the agent, in kubectl's own words.
    let o = k.run(&bot, &["get", "pods", "-n", "prod"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("Error from server (Forbidden): tollgate: "),
        "{t}"
    );
    let o = k.run(
        &bot,
        &["delete", "pod", "db-0", "-n", "prod", "--wait=false"],
    );
    assert!(
        !o.status.success() && text(&o).contains("(Forbidden)"),
        "{}",
        text(&o)
    );

    // exec: allowed into web-1 only (WebSocket, v5 channels relayed).
    let o = k.run(&bot, &["exec", "web-1", "--", "echo", "hi"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("exec in web-1: echo hi"), "{t}");
    // Denied by name, by namespace, and by command (the `command` words of the request are
    // matched against the rule's `exec` patterns word by word: no shell joins them).
    for args in [
        &["exec", "web-2", "--", "echo", "hi"][..],
        &["exec", "db-0", "-n", "prod", "--", "echo", "hi"][..],
        &["exec", "web-1", "--", "cat", "/etc/shadow"][..],
        &["exec", "web-1", "--", "sh", "-c", "echo hi"][..],
        &["exec", "web-1", "--", "echo hi; id"][..],
    ] {
        let o = k.run(&bot, args);
        let t = text(&o);
        assert!(!o.status.success(), "{args:?}: {t}");
        assert!(
            t.contains("tollgate: ") && t.contains("denied"),
            "{args:?}: {t}"
        );
    }
    // A token typed into an exec's command is not written into the audit.
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
    let o = k.run(&bot, &["exec", "web-1", "--", "echo", jwt]);
    assert!(o.status.success(), "{}", text(&o));

    // Impersonation is a request of its own, decided like the API server's RBAC would
    // (verb impersonate): kubectl --as / --as-group work only as far as a rule allows.
    let o = k.run(&bot, &["get", "pods", "--as", "viewer"]);
    assert!(o.status.success(), "{}", text(&o));
    for args in [
        &["get", "pods", "--as", "system:admin"][..],
        &[
            "get",
            "pods",
            "--as",
            "viewer",
            "--as-group",
            "system:masters",
        ][..],
        &[
            "get",
            "pods",
            "--as",
            "system:serviceaccount:kube-system:admin",
        ][..],
        &["get", "pods", "--as", "viewer", "--as-uid", "0"][..],
    ] {
        let o = k.run(&bot, args);
        let t = text(&o);
        assert!(!o.status.success(), "{args:?}: {t}");
        assert!(
            t.contains("Error from server (Forbidden): tollgate: "),
            "{args:?}: {t}"
        );
    }

    // port-forward: no rule allows pods/portforward.
    let o = k.run(&bot, &["port-forward", "pod/web-1", "18080:80"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("tollgate: "), "{t}");

    // Secret data is masked by default.
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(SECRET_PASSWORD);
    let o = k.run(&bot, &["get", "secret", "db", "-o", "yaml"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("password:"), "{t}");
    assert!(
        !t.contains(&encoded) && !t.contains(SECRET_PASSWORD),
        "secret leaked: {t}"
    );

    // A token minted for a service account is a cluster credential: masked like Secret data.
    let o = k.run(&bot, &["create", "token", "deployer"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("masked-by-tollgate") && !t.contains("minted-for"),
        "{t}"
    );

    // logs -f streams: the first lines arrive while the server is still writing.
    let started = Instant::now();
    let (mut logs, rx) = k.spawn(&bot, &["logs", "-f", "web-1"]);
    wait_line(&rx, Duration::from_secs(8), |l| {
        l.contains("web-1 log line 2")
    });
    assert!(
        logs.try_wait().expect("wait").is_none(),
        "kubectl logs -f ended after {:?}; it should still be following",
        started.elapsed()
    );
    let _ = logs.kill();
    let _ = logs.wait();

    // get --watch streams: a deletion made meanwhile shows up in the running watch.
    let (mut watch, rx) = k.spawn(&bot, &["get", "pods", "--watch"]);
    wait_line(&rx, Duration::from_secs(10), |l| l.contains("web-2"));
    std::thread::sleep(Duration::from_millis(500));
    let o = k.run(&bot, &["delete", "pod", "web-2", "--wait=false"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("deleted"), "{}", text(&o));
    wait_line(&rx, Duration::from_secs(10), |l| l.contains("web-2"));
    let _ = watch.kill();
    let _ = watch.wait();

    // What the API server saw: the agent's token on every request, never the prod namespace.
    let log = api.access_log();
    assert!(log.len() >= 8, "{log:#?}");
    for e in &log {
        assert_eq!(e["authorization"], format!("Bearer {TOKEN}"), "{e}");
        let p = e["path"].as_str().unwrap_or("");
        assert!(
            !p.contains("/namespaces/prod")
                && !p.contains("web-2/exec")
                && !p.contains("shadow")
                && !p.contains("command=sh")
                && !p.contains("/portforward"),
            "{e}"
        );
    }
    // Only the allowed impersonation reached the API server.
    let impersonating: Vec<_> = log
        .iter()
        .filter(|e| e["impersonate"].as_object().is_some_and(|m| !m.is_empty()))
        .collect();
    assert!(!impersonating.is_empty(), "{log:#?}");
    for e in impersonating {
        assert_eq!(
            e["impersonate"],
            serde_json::json!({"impersonate-user": "viewer"}),
            "{e}"
        );
    }
    let audit = std::fs::read_to_string(agent.audit_path()).expect("audit");
    assert!(!audit.contains(TOKEN) && !audit.contains(&encoded));
    assert!(
        !audit.contains("eyJzdWIiOiJib3QifQ")
            && audit.contains("(get pods/exec -n default web-1) command: echo "),
        "{audit}"
    );
    assert!(audit.contains("\"kind\":\"kubernetes\""));
    // (kubectl's discovery reads carry the headers too, when its cache is cold.)
    assert!(
        agent
            .audit()
            .iter()
            .any(|e| e["operation"]
                .as_str()
                .is_some_and(|o| o
                    .ends_with("; impersonate users viewer, impersonate groups system:masters)"))
                && e["action"] == "deny"
                && e["flags"] == "impersonation"),
        "{audit}"
    );
    assert!(
        audit.contains("(get pods/exec -n default web-1) command: echo hi"),
        "{audit}"
    );
    assert!(
        audit.contains("command: cat /etc/shadow") && audit.contains("command: 'echo hi; id'"),
        "{audit}"
    );
}

/// An exec the policy sends for approval is held (the WebSocket upgrade waits) until a human
/// decides with `tollgate approvals`: approved, it runs; denied, kubectl prints the comment and
/// the API server never sees it.
#[test]
fn kubectl_exec_waits_for_approval() {
    let World {
        api,
        bot,
        agent,
        k,
        _files,
        _home,
    } = world("kube-appr");
    let spawn = |what: &str| {
        k.command(&bot, &["exec", "web-1", "--", "restart", what])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl")
    };
    let execs = || {
        api.access_log()
            .iter()
            .filter(|e| e["path"].as_str().is_some_and(|p| p.contains("/exec")))
            .count()
    };

    let child = spawn("app");
    let pending = agent.pending_approval();
    let shown = pending.to_string();
    assert!(shown.contains("command: restart app"), "{shown}");
    assert_eq!(execs(), 0, "held, not sent: {:?}", api.access_log());
    let id = pending["id"].as_u64().expect("id").to_string();
    agent.approvals(&["approve", &id]);
    let out = child.wait_with_output().expect("kubectl");
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("exec in web-1: restart app"), "{t}");
    assert_eq!(execs(), 1);

    let child = spawn("db");
    let id = agent.pending_approval()["id"]
        .as_u64()
        .expect("id")
        .to_string();
    agent.approvals(&["deny", &id, "--comment", "not during the freeze"]);
    let out = child.wait_with_output().expect("kubectl");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("not during the freeze"), "{t}");
    assert_eq!(execs(), 1, "a denied exec never reaches the API server");
}

/// `kubectl exec -it` in a real terminal (tmux): typing reaches the container's shell, a
/// resize reaches it as the channel-4 message, the exit status comes back to kubectl, and the
/// terminal is recorded as asciicast v2 that asciinema plays and `tollgate replay` prints.
#[test]
fn kubectl_exec_tty_in_tmux_is_recorded_as_asciicast() {
    let World {
        api: _api,
        bot,
        agent,
        k,
        _files,
        _home,
    } = world("kube-tty");
    let status = k.home.join("status");
    let err = k.home.join("kubectl.err");
    // The pane outlives kubectl, so a failure shows why.
    let shell = format!(
        "/usr/bin/kubectl --kubeconfig {} exec -it web-1 -- echo session 2>{}; echo EXIT=$? > {}; sleep 120",
        k.config.display(),
        err.display(),
        status.display()
    );
    let home = k.home.display().to_string();
    let tmux = vm_tests::BotTmux::start(
        &bot,
        &k.home.join("tmux.sock"),
        &[("HOME", &home), ("TERM", "xterm")],
        80,
        24,
        &shell,
    );
    let prompt = vm_tests::wait_until(Duration::from_secs(20), || {
        // (capture-pane drops the prompt's trailing space)
        tmux.pane()
            .lines()
            .any(|l| l.trim_end() == "$")
            .then_some(())
    });
    assert!(
        prompt.is_some(),
        "no prompt in 20 s; pane: {:?}; kubectl stderr: {:?}; {:?}",
        tmux.pane(),
        std::fs::read_to_string(&err).unwrap_or_default(),
        std::fs::read_to_string(&status).unwrap_or_default()
    );
    tmux.keys(&["echo typed-42", "Enter"]);
    vm_tests::wait_for(Duration::from_secs(10), "typed output", || {
        tmux.pane()
            .lines()
            .any(|l| l.trim_end() == "typed-42")
            .then_some(())
    });
    tmux.run(&["resize-window", "-x", "100", "-y", "30"]);
    tmux.keys(&["stty size", "Enter"]);
    vm_tests::wait_for(Duration::from_secs(10), "the new size", || {
        tmux.pane().contains("30 100").then_some(())
    });
    tmux.keys(&["exit 3", "Enter"]);
    let st = vm_tests::wait_for(Duration::from_secs(15), "kubectl's exit", || {
        std::fs::read_to_string(&status)
            .ok()
            .filter(|s| s.contains("EXIT="))
    });
    assert_eq!(
        st.trim(),
        "EXIT=3",
        "{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );

    // The recording: asciicast v2 with the output and the resize, never the input alone.
    vm_tests::checked_cast(&agent.data_dir, "typed-42", "100x30");
    let sessions = agent.data_dir.join("sessions");
    let session = std::fs::read_dir(&sessions)
        .expect("sessions")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".jsonl"))
        .find(|n| {
            std::fs::read_to_string(sessions.join(n)).is_ok_and(|t| t.contains("\"terminal\""))
        })
        .and_then(|n| n.split('.').next().map(str::to_string))
        .expect("the exec session's recording");
    let (shown, err) = vm_tests::replay(&agent.data_dir, &session);
    assert!(
        shown.contains("TERM") && shown.contains("echo session") && shown.contains("typed-42"),
        "{shown}\n{err}"
    );
}

/// `kubectl exec` without a terminal: stdout and stderr reach kubectl as sent, and the
/// session's recording holds both streams line by line, masked by the detectors (an AWS key
/// printed by the command), which `tollgate replay` prints.
#[test]
fn kubectl_exec_without_tty_records_stdout_and_stderr() {
    let w = world("kube-exec-lines");
    let (bot, agent, k) = (&w.bot, &w.agent, &w.k);
    let key = "AKIAIOSFODNN7EXAMPLE";
    let o = k.run(bot, &["exec", "web-1", "--", "echo", "build", "ok", key]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains(&format!("build ok {key}")), "stdout: {out}");
    assert!(
        err.contains("echo in web-1: a note on stderr"),
        "stderr: {err}"
    );

    // The recording: found by its output lines (written when the exec's WebSocket ends).
    let sessions = agent.data_dir.join("sessions");
    let (session, recording) =
        vm_tests::wait_for(Duration::from_secs(10), "the exec's output lines", || {
            std::fs::read_dir(&sessions)
                .ok()?
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".jsonl"))
                .find_map(|n| {
                    let t = std::fs::read_to_string(sessions.join(&n)).ok()?;
                    (t.contains("\"stderr\"") && t.contains("build ok"))
                        .then(|| (n.split('.').next().unwrap_or_default().to_string(), t))
                })
        });
    assert!(!recording.contains(key), "{recording}");
    let (shown, e) = vm_tests::replay(&agent.data_dir, &session);
    assert!(
        shown.contains("STDOUT exec in web-1: echo build ok"),
        "{shown}\n{e}"
    );
    assert!(shown.contains("STDOUT build ok ********"), "{shown}\n{e}");
    assert!(
        shown.contains("STDERR echo in web-1: a note on stderr"),
        "{shown}\n{e}"
    );
    assert!(!shown.contains(key), "{shown}");
}
