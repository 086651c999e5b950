//! Policy reloads on a running agent: a new policy applies to new connections while open
//! relays keep going; a broken policy is rejected, counted and audited, and the previous one
//! stays in force.

use std::time::Duration;

use vm_tests::*;

const HELD_BYTES: usize = 256 * 1024;

#[test]
fn reload_applies_to_new_connections_and_rejects_broken_policy() {
    require_root();
    let echo = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new("reload-ci");
    let ops = Cgroup::new("reload-ops");
    let ids = [identity_for("ci-bot", &ci), identity_for("ops-bot", &ops)].concat();
    let target = tcp_target("echo", &[echo.v4().to_string()]);
    let allow_ci = [
        ids.clone(),
        target.clone(),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let deny_ci = [
        ids.clone(),
        target.clone(),
        rule("ci is cut off", &["ci-bot"], &["echo"], "deny"),
        rule("ops may use echo", &["ops-bot"], &["echo"], "allow"),
    ]
    .concat();
    let mut agent = AgentProc::start("reload", FailMode::Closed, &allow_ci);
    let addr = echo.v4().to_string();
    let small = [
        "--connect",
        addr.as_str(),
        "--send-bytes",
        "1000",
        "--expect-echo",
    ];
    let reloads = |result: &str| {
        agent
            .audit()
            .iter()
            .filter(|e| e["event"] == "policy_reload" && e["result"] == result)
            .count()
    };

    // A ci-bot relay is open (half its payload echoed) when the policy changes under it.
    let n = HELD_BYTES.to_string();
    let mut held = ci.probe_held(
        probe_bin!(),
        &["--connect", &addr, "--send-bytes", &n, "--expect-echo"],
    );
    let h = held.wait_held(Duration::from_secs(15));
    assert_eq!(h["recv_bytes"], HELD_BYTES / 2, "{h}");
    let ev = agent.connect_event(held.pid);
    assert_eq!(ev["action"], "allow", "{ev}");

    agent.write_policy(&deny_ci);
    wait_for(Duration::from_secs(10), "policy_reload ok", || {
        (reloads("ok") == 1).then_some(())
    });

    // New ci-bot connections are denied under the new rule; ops-bot is now let in.
    let r = ci.probe(probe_bin!(), &small);
    assert!(r.was_denied(), "ci-bot after reload: {r}");
    let ev = agent.connect_event(r.pid);
    assert_eq!(ev["action"], "deny", "{ev}");
    assert_eq!(ev["rule"], "ci is cut off", "{ev}");
    let r = ops.probe(probe_bin!(), &small);
    assert!(r.echo_ok(), "ops-bot after reload: {r}");

    // The relay opened under the old policy carries the rest of its bytes.
    let done = held.finish(Duration::from_secs(30));
    assert!(done.echo_ok(), "held relay broke on reload: {done}");
    assert_eq!(done.recv_bytes(), HELD_BYTES as u64, "{done}");
    let close = agent.close_event(done.pid);
    assert_eq!(close["bytes_up"], HELD_BYTES as u64, "{close}");
    assert_eq!(close["bytes_down"], HELD_BYTES as u64, "{close}");
    assert_eq!(close["status"], "ok", "{close}");

    // A syntactically broken file: rejected, counted, audited; the agent keeps running.
    agent.write_policy_raw(&format!(
        "{}[[rule]\nname = \"half-written\nidentities = [\"ci-bot\"\n",
        agent.agent_section()
    ));
    let err = agent.wait_audit("policy_reload error", |e| {
        e["event"] == "policy_reload" && e["result"] == "error"
    });
    let msg = err["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("{}:", agent.policy_path.display())),
        "the reload error should name file:line:col: {err}"
    );
    assert!(
        agent.metric("tollgate_policy_reloads_total", &[("result", "error")]) >= 1.0,
        "error reload not counted"
    );
    assert_eq!(
        agent.metric("tollgate_policy_reloads_total", &[("result", "ok")]),
        1.0
    );
    assert!(
        agent.is_running(),
        "a broken policy file must not stop the agent"
    );

    // The previous policy is still the one in force.
    let r = ci.probe(probe_bin!(), &small);
    assert!(r.was_denied(), "ci-bot with the broken file: {r}");
    assert_eq!(agent.connect_event(r.pid)["rule"], "ci is cut off");
    let r = ops.probe(probe_bin!(), &small);
    assert!(r.echo_ok(), "ops-bot with the broken file: {r}");
    assert_eq!(agent.connect_event(r.pid)["action"], "allow");

    // A good file again, applied on SIGHUP as well: ci-bot is back. Before the SIGHUP the audit
    // log is rotated as logrotate does (renamed): the agent follows to a new file.
    agent.write_policy(&allow_ci);
    let rotated = agent.audit_path().with_extension("jsonl.1");
    std::fs::rename(agent.audit_path(), &rotated).expect("rotate the audit log");
    let pid = agent.pid().expect("agent runs");
    // SAFETY: kill(2) on our own agent's pid.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    agent.wait_audit("policy_reload ok on sighup", |e| {
        e["event"] == "policy_reload" && e["result"] == "ok" && e["trigger"] == "sighup"
    });
    let r = ci.probe(probe_bin!(), &small);
    assert!(r.echo_ok(), "ci-bot after the good policy came back: {r}");
    let before: Vec<serde_json::Value> = std::fs::read_to_string(&rotated)
        .expect("rotated log")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        before
            .iter()
            .any(|e| e["event"] == "policy_reload" && e["result"] == "error"),
        "the rotated file keeps what was written before"
    );
    assert!(
        !before.iter().any(|e| e["trigger"] == "sighup"),
        "nothing after the SIGHUP went to the rotated file"
    );
    assert_eq!(agent.connect_event(r.pid)["action"], "allow");

    let status = agent.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    agent.wait_audit("agent_stop", |e| e["event"] == "agent_stop");
}

/// connect4/6 skip the trie for ports outside the `PORTS` bitmap: a target on a port the
/// previous policy did not use must be protected as soon as the reload is applied, and a
/// removed one released.
#[test]
fn a_target_on_a_new_port_is_protected_after_reload_and_released_after_removal() {
    require_root();
    let kept = EchoServer::start(EchoMode::Echo);
    let added = EchoServer::start(EchoMode::Echo);
    assert_ne!(kept.port(), added.port());
    let ci = Cgroup::new("reload-port-ci");
    let base = [
        identity_for("ci-bot", &ci),
        tcp_target("kept", &[kept.v4().to_string()]),
        rule("ci may use kept", &["ci-bot"], &["kept"], "allow"),
    ]
    .concat();
    let with_added = [base.clone(), tcp_target("added", &[added.v4().to_string()])].concat();
    let agent = AgentProc::start("reload-port", FailMode::Open, &base);
    let addr = added.v4().to_string();
    let small = [
        "--connect",
        addr.as_str(),
        "--send-bytes",
        "1000",
        "--expect-echo",
    ];
    let reloads_ok = |agent: &AgentProc| {
        agent
            .audit()
            .iter()
            .filter(|e| e["event"] == "policy_reload" && e["result"] == "ok")
            .count()
    };

    let r = ci.probe(probe_bin!(), &small);
    assert!(r.echo_ok(), "not yet a target: direct: {r}");
    assert_eq!(r.peer(), Some(addr.as_str()), "{r}");
    assert_eq!(added.accepted(), 1);

    agent.write_policy(&with_added);
    wait_for(Duration::from_secs(10), "the first reload", || {
        (reloads_ok(&agent) >= 1).then_some(())
    });
    let r = ci.probe(probe_bin!(), &small);
    assert!(
        r.was_denied(),
        "a new target (no rule for it) after reload: {r}"
    );
    assert_eq!(agent.connect_event(r.pid)["target"], "added");
    assert_eq!(
        added.accepted(),
        1,
        "a protected connect reached the service"
    );

    agent.write_policy(&base);
    wait_for(Duration::from_secs(10), "the second reload", || {
        (reloads_ok(&agent) >= 2).then_some(())
    });
    let r = ci.probe(probe_bin!(), &small);
    assert!(r.echo_ok(), "target removed again: direct: {r}");
    assert_eq!(added.accepted(), 2);
}
