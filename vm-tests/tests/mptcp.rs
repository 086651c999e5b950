//! MPTCP (issue 12, item 9). An MPTCP socket (`socket(AF_INET[6], SOCK_STREAM,
//! IPPROTO_MPTCP)`) connects through its first TCP subflow: the kernel runs the connect hook on
//! that subflow (protocol TCP, a socket cookie of its own), while `getpeername` runs on the
//! MPTCP socket, whose cookie has no record. Redirected, such a bot saw the agent's listener as
//! its peer. The hooks now refuse an MPTCP connect to a protected destination with
//! `EPROTONOSUPPORT` (so the bot learns nothing of the agent and reaches nothing directly);
//! MPTCP to unprotected destinations is untouched, and plain TCP to the target still works.

use std::net::{IpAddr, Ipv4Addr};

use vm_tests::*;

const EPROTONOSUPPORT: i64 = 93;

#[test]
fn mptcp_to_a_protected_target_is_refused_and_never_bypasses() {
    require_root();
    // Before 5.19 the hooks cannot tell an MPTCP subflow from TCP (no bpf_skc_to_mptcp_sock):
    // the connect is redirected as TCP, enforced, and its getpeername shows the agent.
    if !require_kernel((5, 19), "bpf_skc_to_mptcp_sock recognises MPTCP subflows") {
        return;
    }
    let echo = EchoServer::start_on(EchoMode::Echo, &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]);
    let other = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new("mptcp-ci");
    let intruder = Cgroup::new("mptcp-intruder");
    let body = [
        identity_for("ci-bot", &ci),
        identity_for("intruder", &intruder),
        tcp_target("echo", &[format!("127.0.0.1:{}", echo.port())]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start("mptcp", FailMode::Closed, &body);
    let port = echo.port();

    // Plain TCP: the allowed bot is relayed and sees the original peer.
    let tcp_dial = format!("127.0.0.1:{port}");
    let r = ci.probe(
        probe_bin!(),
        &[
            "--connect",
            &tcp_dial,
            "--send-bytes",
            "2000",
            "--expect-echo",
        ],
    );
    assert!(r.echo_ok(), "plain TCP through the agent: {r}");
    assert_eq!(r.peer(), Some(tcp_dial.as_str()), "{r}");

    let mut problems = Vec::new();
    // (address, AF_INET6 socket, TCP Fast Open instead of connect())
    let ways: [(&str, bool, bool); 7] = [
        ("127.0.0.1", false, false),
        ("127.0.0.2", false, false),
        ("[::1]", false, false),
        // AF_INET6 MPTCP socket to ::ffff:127.0.0.1 (connect6's IPv4-mapped path).
        ("127.0.0.1", true, false),
        ("0.0.0.0", false, false),
        // sendto(MSG_FASTOPEN): MPTCP's fast-open path into the connect.
        ("127.0.0.1", false, true),
        ("[::1]", false, true),
    ];
    // MPTCP gained fast open in Linux 6.2: before, the kernel itself fails
    // sendto(MSG_FASTOPEN) on an MPTCP socket with EOPNOTSUPP before any connect hook runs
    // (nothing is connected or sent either way).
    let mptcp_tfo = kernel_version() >= (6, 2);
    const EOPNOTSUPP: i64 = 95;
    let mut hooked = 0.0;
    for (who, cg) in [("ci-bot", &ci), ("intruder", &intruder)] {
        for (ip, v6, tfo) in ways {
            let want = if tfo && !mptcp_tfo {
                EOPNOTSUPP
            } else {
                hooked += 1.0;
                EPROTONOSUPPORT
            };
            let dial = format!("{ip}:{port}");
            let mut args = vec![
                "--connect",
                dial.as_str(),
                "--mptcp",
                "--send-bytes",
                "2000",
                "--expect-echo",
            ];
            if v6 {
                args.push("--v6-socket");
            }
            if tfo {
                args.push("--fastopen");
            }
            let how = format!(
                "{who} MPTCP to {dial}{}{}",
                if v6 { " (AF_INET6)" } else { "" },
                if tfo { " (MSG_FASTOPEN)" } else { "" }
            );
            let before = echo.accepted();
            let r = cg.probe(probe_bin!(), &args);
            if r.connected() {
                // Whatever else happened, a connected MPTCP bot must not see the agent.
                problems.push(format!(
                    "{how}: connected (peer {:?}; the agent listens on port {}), want \
                     EPROTONOSUPPORT: {r}",
                    r.peer(),
                    agent.listen_port
                ));
            } else if r.errno() != Some(want) {
                problems.push(format!("{how}: want errno {want}, got {r}"));
            }
            if echo.accepted() != before {
                problems.push(format!(
                    "{how}: the server saw a connection (relayed, or a BYPASS): {r}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(
        agent.metric("tollgate_bpf_connects_total", &[("outcome", "mptcp")]),
        hooked
    );

    // MPTCP itself is not broken: an unprotected destination still works over it, by
    // connect() and by MSG_FASTOPEN.
    let free = format!("127.0.0.1:{}", other.port());
    let ways_free: &[Option<&str>] = if mptcp_tfo {
        &[None, Some("--fastopen")]
    } else {
        println!("MPTCP fast open needs Linux 6.2: only connect() is checked to an unprotected destination");
        &[None]
    };
    for &extra in ways_free {
        let before = other.accepted();
        let mut args = vec![
            "--connect",
            free.as_str(),
            "--mptcp",
            "--send-bytes",
            "2000",
            "--expect-echo",
        ];
        args.extend(extra);
        let r = intruder.probe(probe_bin!(), &args);
        assert!(r.echo_ok(), "MPTCP {extra:?} to an unprotected port: {r}");
        assert_eq!(other.accepted(), before + 1);
    }
}
