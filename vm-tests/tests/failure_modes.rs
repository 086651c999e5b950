//! What happens to protected destinations when the agent dies: fail closed (the default) keeps
//! the pinned programs, so connects are refused until the agent is back or `tollgate uninstall`
//! runs; fail open lets the programs go with the process.

use std::time::Duration;

use vm_tests::*;

/// connect4, connect6, getpeername4, getpeername6 (there is no sock_ops hook: the agent finds
/// client sockets with sock_diag).
const LINKS: usize = 4;

fn count_pinned_links(agent: &AgentProc) -> usize {
    std::fs::read_dir(agent.pin_path.join("links"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

fn echo_args(addr: &str) -> Vec<&str> {
    vec![
        "--connect",
        addr,
        "--send-bytes",
        "2048",
        "--expect-echo",
        "--timeout-ms",
        "5000",
    ]
}

#[test]
fn fail_closed_refuses_after_kill9_until_restart_or_uninstall() {
    require_root();
    let echo = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new("closed-ci");
    let body = [
        identity_for("ci-bot", &ci),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let mut agent = AgentProc::start("closed", FailMode::Closed, &body);
    let v4 = echo.v4().to_string();
    let v6 = format!("[::1]:{}", echo.port());

    let r = ci.probe(probe_bin!(), &echo_args(&v4));
    assert!(r.echo_ok(), "with the agent up: {r}");
    assert_eq!(echo.accepted(), 1);
    assert_eq!(
        count_pinned_links(&agent),
        LINKS,
        "fail closed pins its links"
    );

    // The agent dies hard: the pins stay and every spelling of the target is refused.
    agent.kill9();
    assert_eq!(
        count_pinned_links(&agent),
        LINKS,
        "pins must survive kill -9"
    );
    for (addr, v6_socket) in [(&v4, false), (&v6, false), (&v4, true)] {
        let mut args = echo_args(addr);
        if v6_socket {
            args.push("--v6-socket");
        }
        let r = ci.probe(probe_bin!(), &args);
        assert!(
            !r.connected() && r.errno() == Some(no_agent_errno()),
            "with the agent dead, {addr} (v6 socket: {v6_socket}) must be refused: {r}"
        );
    }
    assert_eq!(echo.accepted(), 1, "a refused connect reached the service");

    // Back with the same pins: served again.
    agent.restart();
    let r = ci.probe(probe_bin!(), &echo_args(&v4));
    assert!(r.echo_ok(), "after restart: {r}");
    let ev = agent.connect_event(r.pid);
    assert_eq!(ev["action"], "allow", "{ev}");
    assert_eq!(ev["identity"], "ci-bot", "{ev}");
    assert_eq!(echo.accepted(), 2);
    assert_eq!(
        count_pinned_links(&agent),
        LINKS,
        "restart replaces the pins"
    );

    // Dead again, then uninstalled: direct access with no agent at all.
    agent.kill9();
    let r = ci.probe(probe_bin!(), &echo_args(&v4));
    assert_eq!(r.errno(), Some(no_agent_errno()), "{r}");
    let out = agent.uninstall();
    assert!(
        out.contains(&format!("removed {LINKS} pinned links")),
        "uninstall said: {out}"
    );
    assert!(
        !agent.pin_path.exists(),
        "pin dir still there after uninstall"
    );
    let audited = agent.audit().len();
    let r = ci.probe(probe_bin!(), &echo_args(&v4));
    assert!(
        r.echo_ok(),
        "after uninstall the service must be reachable directly: {r}"
    );
    assert_eq!(r.peer(), Some(v4.as_str()), "{r}");
    let direct = wait_for(
        Duration::from_secs(10),
        "the direct connection to end",
        || {
            echo.finished()
                .into_iter()
                .find(|c| Some(c.peer.to_string().as_str()) == r.json["local"].as_str())
        },
    );
    assert_eq!(direct.bytes, 2048);
    assert_eq!(
        agent.audit().len(),
        audited,
        "nothing may audit a direct connection"
    );
}

#[test]
fn fail_open_allows_direct_access_after_kill9() {
    require_root();
    let echo = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new("open-ci");
    let stranger = Cgroup::new("open-stranger");
    let body = [
        identity_for("ci-bot", &ci),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let mut agent = AgentProc::start("open", FailMode::Open, &body);
    let v4 = echo.v4().to_string();
    assert!(!agent.pin_path.exists(), "fail open must not pin anything");

    // While the agent runs, the policy is enforced.
    let r = ci.probe(probe_bin!(), &echo_args(&v4));
    assert!(r.echo_ok(), "{r}");
    let r = stranger.probe(probe_bin!(), &echo_args(&v4));
    assert!(r.was_denied(), "{r}");
    assert_eq!(echo.accepted(), 1);

    // Dead agent, fail open: the programs went with the process; the stranger gets through.
    agent.kill9();
    let r = wait_for(
        Duration::from_secs(10),
        "direct access after kill -9",
        || {
            let r = stranger.probe(probe_bin!(), &echo_args(&v4));
            r.echo_ok().then_some(r)
        },
    );
    assert_eq!(r.peer(), Some(v4.as_str()), "{r}");
    let direct = wait_for(
        Duration::from_secs(10),
        "the direct connection to end",
        || {
            echo.finished()
                .into_iter()
                .find(|c| Some(c.peer.to_string().as_str()) == r.json["local"].as_str())
        },
    );
    assert_eq!(direct.bytes, 2048, "the service saw the bot's own socket");
    let v6 = format!("[::1]:{}", echo.port());
    let r6 = stranger.probe(probe_bin!(), &echo_args(&v6));
    assert!(r6.echo_ok(), "{r6}");
}

/// Fail closed means refused while the agent is down, not "reachable by whoever listens on
/// the agent's port". The pinned connect hooks keep rewriting protected destinations to the
/// listener address; once the agent is gone, any unprivileged bot may bind that port (it is
/// above 1024) and receive every other bot's connections to the protected targets.
#[test]
fn fail_closed_listener_port_cannot_be_taken_over_by_a_bot() {
    require_root();
    let echo = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new("hijack-ci");
    let evil = Cgroup::new("hijack-evil");
    let body = [
        identity_for("ci-bot", &ci),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let mut agent = AgentProc::start("hijack", FailMode::Closed, &body);
    let v4 = echo.v4().to_string();
    let r = ci.probe(probe_bin!(), &echo_args(&v4));
    assert!(r.echo_ok(), "with the agent up: {r}");
    agent.kill9();

    // A compromised bot (uid 65534, no capabilities) takes the dead agent's listener port.
    let listener = format!("127.0.0.1:{}", agent.listen_port);
    let mut thief = evil.probe_running(
        probe_bin!(),
        &["--listen", &listener, "--timeout-ms", "3000"],
    );
    let l = thief.next_json(Duration::from_secs(10));

    // The victim's connect to the protected destination must still be refused.
    let victim = ci.probe(probe_bin!(), &echo_args(&v4));
    let stolen = thief.finish(Duration::from_secs(15));
    assert!(
        !victim.connected() && victim.errno() == Some(no_agent_errno()),
        "fail closed is not closed: with the agent dead, an unprivileged bot listening on \
         {listener} ({l}) received the connection ci-bot made to the protected {v4}: \
         victim saw {victim}; thief saw {stolen}"
    );
    assert_ne!(stolen.json["accepted"], true, "{stolen}");
}
