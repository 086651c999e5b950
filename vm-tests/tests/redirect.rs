//! The data path on a real kernel: a bot's connect to a protected destination is redirected to
//! the agent, attributed from kernel facts, decided, and relayed or reset; an unprotected
//! destination is left alone.

use std::time::Duration;

use vm_tests::*;

const MIB: usize = 1 << 20;

fn probe_path() -> String {
    probe_bin!()
        .canonicalize()
        .expect("tg-probe binary exists")
        .display()
        .to_string()
}

/// One protected echo service, a `ci-bot` identity for `ci` with an allow rule, and an
/// `ops-bot` identity for `ops` with no rule at all.
fn world(tag: &str) -> (EchoServer, Cgroup, Cgroup, AgentProc) {
    let echo = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new(&format!("{tag}-ci"));
    let ops = Cgroup::new(&format!("{tag}-ops"));
    let body = [
        identity_for("ci-bot", &ci),
        identity_for("ops-bot", &ops),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start(tag, FailMode::Closed, &body);
    (echo, ci, ops, agent)
}

#[test]
fn allowed_bot_is_attributed_from_kernel_facts() {
    require_root();
    let (echo, ci, _ops, agent) = world("attr");
    let addr = echo.v4().to_string();
    let r = ci.probe(
        probe_bin!(),
        &["--connect", &addr, "--send-bytes", "1000", "--expect-echo"],
    );
    assert!(r.connected() && r.echo_ok(), "probe failed: {r}");

    let ev = agent.connect_event(r.pid);
    assert_eq!(ev["identity"], "ci-bot", "{ev}");
    assert_eq!(ev["action"], "allow", "{ev}");
    assert_eq!(ev["rule"], "ci may use echo", "{ev}");
    assert_eq!(ev["target"], "echo", "{ev}");
    assert_eq!(ev["protocol"], "tcp", "{ev}");
    assert_eq!(ev["pid"], r.pid, "{ev}");
    assert_eq!(ev["uid"], BOT_UID, "{ev}");
    assert_eq!(ev["user"], "nobody", "{ev}");
    assert_eq!(ev["cgroup"], ci.rel(), "{ev}");
    assert_eq!(ev["exe"], probe_path(), "{ev}");
    assert_eq!(ev["comm"], "tg-probe", "{ev}");
    assert_eq!(ev["orig_dst"], addr, "{ev}");
    // The agent saw the bot's own socket as its peer.
    assert_eq!(ev["peer"], r.json["local"], "{ev} vs {r}");
    // The bot really runs unprivileged (the probe reports its own uid and capabilities).
    assert_eq!(r.json["uid"], BOT_UID, "{r}");
    assert_eq!(r.json["cap_eff"], "0000000000000000", "{r}");
    // Exactly one connection reached the service: the agent's upstream.
    assert_eq!(echo.accepted(), 1);
    assert_eq!(
        agent.metric(
            "tollgate_decisions_total",
            &[
                ("identity", "ci-bot"),
                ("target", "echo"),
                ("action", "allow")
            ]
        ),
        1.0
    );
    assert_eq!(agent.metric("tollgate_redirects_total", &[]), 1.0);
}

#[test]
fn getpeername_shows_the_original_destination() {
    require_root();
    let (echo, ci, _ops, agent) = world("peer");
    let v4 = echo.v4().to_string();
    let v6 = format!("[::1]:{}", echo.port());
    let listener4 = format!("127.0.0.1:{}", agent.listen_port);
    let listener6 = format!("[::1]:{}", agent.listen_port);

    let r = ci.probe(
        probe_bin!(),
        &["--connect", &v4, "--send-bytes", "10", "--expect-echo"],
    );
    assert!(r.echo_ok(), "{r}");
    assert_eq!(r.peer(), Some(v4.as_str()), "{r}");
    assert_ne!(r.peer(), Some(listener4.as_str()), "{r}");

    let r = ci.probe(
        probe_bin!(),
        &["--connect", &v6, "--send-bytes", "10", "--expect-echo"],
    );
    assert!(r.echo_ok(), "{r}");
    assert_eq!(r.peer(), Some(v6.as_str()), "{r}");
    assert_ne!(r.peer(), Some(listener6.as_str()), "{r}");

    let r = ci.probe(
        probe_bin!(),
        &[
            "--connect",
            &v4,
            "--v6-socket",
            "--send-bytes",
            "10",
            "--expect-echo",
        ],
    );
    assert!(r.echo_ok(), "{r}");
    let mapped = format!("[::ffff:127.0.0.1]:{}", echo.port());
    assert_eq!(r.peer(), Some(mapped.as_str()), "{r}");
    assert_eq!(agent.metric("tollgate_redirects_total", &[]), 3.0);
}

#[test]
fn one_mib_round_trip_is_intact_and_counted() {
    require_root();
    let (echo, ci, _ops, agent) = world("mib");
    let addr = echo.v4().to_string();
    let n = MIB.to_string();
    let r = ci.probe(
        probe_bin!(),
        &["--connect", &addr, "--send-bytes", &n, "--expect-echo"],
    );
    assert!(r.echo_ok(), "{r}");
    assert_eq!(r.recv_bytes(), MIB as u64, "{r}");
    assert_eq!(r.sent_sha256(), r.recv_sha256(), "{r}");
    assert_eq!(r.sent_sha256().len(), 64, "{r}");

    // The service received exactly the bytes the bot sent.
    let done = wait_for(Duration::from_secs(10), "echo server to finish", || {
        let f = echo.finished();
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].bytes, MIB as u64);
    assert_eq!(done[0].sha256, r.sent_sha256());

    let close = agent.close_event(r.pid);
    assert_eq!(close["bytes_up"], MIB as u64, "{close}");
    assert_eq!(close["bytes_down"], MIB as u64, "{close}");
    assert_eq!(close["status"], "ok", "{close}");
    assert_eq!(close["identity"], "ci-bot", "{close}");
    assert!(close["duration_ms"].is_u64(), "{close}");
}

/// The congestion control named on `ss -tin`'s info line for each socket matching `filter`.
fn congestion_controls(filter: &str) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-H", "-t", "-i", "-n", "state", "established", filter])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss: {out:?}");
    let known = ["cubic", "bbr", "reno", "dctcp", "htcp", "vegas", "westwood"];
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(char::is_whitespace))
        .map(|l| {
            l.split_whitespace()
                .find(|w| known.contains(w))
                .unwrap_or("?")
                .to_string()
        })
        .collect()
}

#[test]
fn the_agents_loopback_legs_do_not_pace() {
    require_root();
    let (echo, ci, _ops, agent) = world("pace");
    let addr = echo.v4().to_string();
    let n = MIB.to_string();
    let mut held = ci.probe_held(
        probe_bin!(),
        &["--connect", &addr, "--send-bytes", &n, "--expect-echo"],
    );
    held.wait_held(Duration::from_secs(15));
    // The agent's two sockets: the accepted one (the bot's leg) and its upstream (the echo
    // service's accepted socket has the port as its source, the agent's upstream as its
    // destination; both are on loopback).
    let accepted = congestion_controls(&format!("( sport = :{} )", agent.listen_port));
    let upstream = congestion_controls(&format!("( dport = :{} )", echo.port()));
    let host_default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .expect("read the host's default congestion control");
    assert_eq!(accepted, ["cubic"], "host default {host_default}");
    assert_eq!(upstream, ["cubic"], "host default {host_default}");
    let done = held.finish(Duration::from_secs(30));
    assert!(done.echo_ok(), "{done}");
    assert_eq!(done.sent_sha256(), done.recv_sha256(), "{done}");
}

#[test]
fn bots_without_an_allow_rule_are_denied_and_audited() {
    require_root();
    // Created before the agent starts, like the others: attribution of cgroups created later
    // is the subject of `attribution.rs`.
    let stranger = Cgroup::new("deny-stranger");
    let (echo, ci, ops, agent) = world("deny");
    let addr = echo.v4().to_string();
    let args = [
        "--connect",
        addr.as_str(),
        "--send-bytes",
        "4096",
        "--expect-echo",
    ];

    // No identity matches the stranger's cgroup.
    let r = stranger.probe(probe_bin!(), &args);
    assert!(r.was_denied(), "unknown bot was not reset: {r}");
    let ev = agent.connect_event(r.pid);
    assert_eq!(ev["action"], "deny", "{ev}");
    assert!(ev["identity"].is_null(), "{ev}");
    assert_eq!(ev["reason"], "unknown_identity", "{ev}");
    assert_eq!(ev["cgroup"], stranger.rel(), "{ev}");
    assert_eq!(ev["uid"], BOT_UID, "{ev}");
    assert_eq!(ev["orig_dst"], addr, "{ev}");

    // ops-bot is known but no rule lets it in.
    let r = ops.probe(probe_bin!(), &args);
    assert!(r.was_denied(), "ops-bot was not reset: {r}");
    let ev = agent.connect_event(r.pid);
    assert_eq!(ev["action"], "deny", "{ev}");
    assert_eq!(ev["identity"], "ops-bot", "{ev}");
    assert_eq!(ev["reason"], "no_matching_rule", "{ev}");
    assert_eq!(ev["cgroup"], ops.rel(), "{ev}");

    // Neither denied connection reached the service.
    assert_eq!(echo.accepted(), 0);
    assert_eq!(
        agent.metric(
            "tollgate_decisions_total",
            &[("identity", "unknown"), ("action", "deny")]
        ),
        1.0
    );
    assert_eq!(
        agent.metric(
            "tollgate_decisions_total",
            &[("identity", "ops-bot"), ("action", "deny")]
        ),
        1.0
    );

    // The allowed bot still gets through, so the denials were policy, not breakage.
    let r = ci.probe(probe_bin!(), &args);
    assert!(r.echo_ok(), "{r}");
    assert_eq!(echo.accepted(), 1);
}

#[test]
fn unprotected_destinations_are_not_touched() {
    require_root();
    let (protected, ci, _ops, agent) = world("unprot");
    let other = EchoServer::start(EchoMode::Echo);
    let addr = other.v4().to_string();
    let before = agent.metric("tollgate_redirects_total", &[]);

    let r = ci.probe(
        probe_bin!(),
        &["--connect", &addr, "--send-bytes", "65536", "--expect-echo"],
    );
    assert!(r.echo_ok(), "{r}");
    assert_eq!(r.peer(), Some(addr.as_str()), "{r}");
    // The service saw the bot's own socket: a direct connection, no relay in between.
    let done = wait_for(
        Duration::from_secs(10),
        "unprotected echo to finish",
        || {
            let f = other.finished();
            (!f.is_empty()).then_some(f)
        },
    );
    assert_eq!(
        Some(done[0].peer.to_string().as_str()),
        r.json["local"].as_str(),
        "{r}"
    );
    assert_eq!(agent.metric("tollgate_redirects_total", &[]), before);

    // Same again over IPv6.
    let addr6 = format!("[::1]:{}", other.port());
    let r6 = ci.probe(
        probe_bin!(),
        &["--connect", &addr6, "--send-bytes", "100", "--expect-echo"],
    );
    assert!(r6.echo_ok(), "{r6}");
    assert_eq!(agent.metric("tollgate_redirects_total", &[]), before);

    // A protected connect right after is counted, so the counter works...
    let p = ci.probe(
        probe_bin!(),
        &[
            "--connect",
            &protected.v4().to_string(),
            "--send-bytes",
            "10",
            "--expect-echo",
        ],
    );
    assert!(p.echo_ok(), "{p}");
    agent.close_event(p.pid);
    assert_eq!(agent.metric("tollgate_redirects_total", &[]), before + 1.0);
    // ...and the audit log knows nothing of the unprotected ones.
    let port = format!(":{}", other.port());
    for e in agent.audit() {
        assert_ne!(e["pid"], r.pid, "unprotected connect audited: {e}");
        assert_ne!(e["pid"], r6.pid, "unprotected connect audited: {e}");
        assert!(
            !e["orig_dst"].as_str().unwrap_or("").ends_with(&port),
            "unprotected destination audited: {e}"
        );
    }
}
