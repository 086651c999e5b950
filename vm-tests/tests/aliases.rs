//! No bypass through another spelling of the same destination: a loopback target protects the
//! port on every loopback address, on the unspecified addresses and on IPv4-mapped IPv6 from
//! an AF_INET6 socket. Each spelling must reach the agent (audited with identity and orig_dst),
//! and for a denied identity each must be denied without touching the service.

use std::net::{IpAddr, Ipv4Addr};

use vm_tests::*;

/// One way to reach the service: what the bot dials, with which socket, and what the agent
/// must report as the original destination.
struct Spelling {
    dial: String,
    v6_socket: bool,
    orig_dst: String,
    peer: String,
}

fn spellings(port: u16) -> Vec<Spelling> {
    let s = |dial: &str, v6: bool, orig: &str, peer: &str| Spelling {
        dial: format!("{dial}:{port}"),
        v6_socket: v6,
        orig_dst: format!("{orig}:{port}"),
        peer: format!("{peer}:{port}"),
    };
    vec![
        s("127.0.0.1", false, "127.0.0.1", "127.0.0.1"),
        s("[::1]", false, "[::1]", "[::1]"),
        // An AF_INET6 socket dialling ::ffff:127.0.0.1 never passes the connect4 hook.
        s("127.0.0.1", true, "127.0.0.1", "[::ffff:127.0.0.1]"),
        s("127.0.0.2", false, "127.0.0.2", "127.0.0.2"),
        s("127.0.0.2", true, "127.0.0.2", "[::ffff:127.0.0.2]"),
        // connect() to the unspecified address reaches a local listener.
        s("0.0.0.0", false, "0.0.0.0", "0.0.0.0"),
        s("[::]", false, "[::]", "[::]"),
    ]
}

fn every_spelling_is_redirected(tag: &str, target_address: impl Fn(u16) -> String) {
    require_root();
    let echo = EchoServer::start_on(EchoMode::Echo, &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]);
    let ci = Cgroup::new(&format!("{tag}-ci"));
    let intruder = Cgroup::new(&format!("{tag}-intruder"));
    let body = [
        identity_for("ci-bot", &ci),
        identity_for("intruder", &intruder),
        tcp_target("echo", &[target_address(echo.port())]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start(tag, FailMode::Closed, &body);

    let ways = spellings(echo.port());
    let mut problems = Vec::new();
    for w in &ways {
        let mut args = vec![
            "--connect",
            w.dial.as_str(),
            "--send-bytes",
            "3000",
            "--expect-echo",
        ];
        if w.v6_socket {
            args.push("--v6-socket");
        }
        let how = format!(
            "{} ({})",
            w.dial,
            if w.v6_socket { "AF_INET6" } else { "native" }
        );

        // The allowed bot: redirected, attributed, relayed to the same service.
        let r = ci.probe(probe_bin!(), &args);
        let ev = agent.connect_event(r.pid);
        if !r.echo_ok() {
            problems.push(format!("ci-bot via {how}: no echo: {r}"));
        }
        if r.peer() != Some(w.peer.as_str()) {
            problems.push(format!(
                "ci-bot via {how}: getpeername {:?}, want {}",
                r.peer(),
                w.peer
            ));
        }
        if ev["identity"] != "ci-bot"
            || ev["action"] != "allow"
            || ev["orig_dst"] != w.orig_dst.as_str()
        {
            problems.push(format!(
                "ci-bot via {how}: audit {ev}, want orig_dst {}",
                w.orig_dst
            ));
        }

        // The intruder: redirected and denied; the service never sees it.
        let before = echo.accepted();
        let r = intruder.probe(probe_bin!(), &args);
        let ev = agent.connect_event(r.pid);
        if !r.was_denied() {
            problems.push(format!("intruder via {how}: not reset: {r}"));
        }
        if ev["identity"] != "intruder"
            || ev["action"] != "deny"
            || ev["orig_dst"] != w.orig_dst.as_str()
        {
            problems.push(format!(
                "intruder via {how}: audit {ev}, want orig_dst {}",
                w.orig_dst
            ));
        }
        if echo.accepted() != before {
            problems.push(format!(
                "intruder via {how}: reached the service directly (BYPASS)"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(
        agent.metric("tollgate_redirects_total", &[]),
        2.0 * ways.len() as f64
    );
    assert_eq!(
        agent.metric(
            "tollgate_decisions_total",
            &[("identity", "intruder"), ("action", "deny")]
        ),
        ways.len() as f64
    );
}

#[test]
fn exact_loopback_target_covers_every_loopback_spelling() {
    every_spelling_is_redirected("alias-exact", |p| format!("127.0.0.1:{p}"));
}

#[test]
fn loopback_cidr_target_covers_every_loopback_spelling() {
    every_spelling_is_redirected("alias-cidr", |p| format!("127.0.0.0/8:{p}"));
}
