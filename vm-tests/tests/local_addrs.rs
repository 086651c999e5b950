//! Every address that reaches a local server is one target (issue 12, item 4). A server bound
//! to all interfaces answers on each of the host's addresses, so a target on a local address
//! must protect its port on all of them: loopback aliases, `0.0.0.0`/`::`, the addresses of the
//! interfaces (IPv4, IPv6, link-local with a scope id, IPv4-mapped), including an address added
//! after the agent started, whichever of them the policy names.
//!
//! Each test runs in a network namespace of its own (the test thread enters it, see
//! `ThreadNetns`) with 192.0.2.2/32 and fd00::2/128 on `lo` and fe80::2 on a veth, a server on
//! `[::]` (dual-stack), and an agent with `namespace = "own"`. Two unprivileged bots dial every
//! spelling: `ci-bot` (allowed) must be relayed by the agent to the address it dialled;
//! `intruder` (no rule) must be denied, and the server must never see it.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use vm_tests::{netns::ThreadNetns, *};

/// One way to reach the server: what the bot dials, with which socket, and the original
/// destination the agent must report.
struct Way {
    dial: String,
    v6_socket: bool,
    orig_dst: String,
}

fn way(dial: &str, v6_socket: bool, orig: &str, port: u16) -> Way {
    Way {
        dial: format!("{dial}:{port}"),
        v6_socket,
        orig_dst: format!("{orig}:{port}"),
    }
}

struct World {
    echo: EchoServer,
    ci: Cgroup,
    intruder: Cgroup,
    agent: AgentProc,
    lo_index: u32,
    // Last: dropped after the agent, the server and the bots.
    ns: ThreadNetns,
}

/// The namespace, the server, two bot cgroups and an agent whose one target is
/// `target(port)`.
fn world(tag: &str, target: impl Fn(u16) -> String) -> World {
    require_root();
    let ns = ThreadNetns::enter(tag);
    ns.add_addr("192.0.2.2/32", "lo");
    ns.add_addr("fd00::2/128", "lo");
    ns.ip(&[
        "link", "add", "tgla0", "type", "veth", "peer", "name", "tgla1",
    ]);
    ns.ip(&["link", "set", "tgla0", "up"]);
    ns.ip(&["link", "set", "tgla1", "up"]);
    ns.add_addr("fe80::2/64", "tgla0");
    let lo_index = ns.if_index("tgla0");
    let echo = EchoServer::start_any(EchoMode::Echo);
    let ci = Cgroup::new(&format!("{tag}-ci"));
    let intruder = Cgroup::new(&format!("{tag}-intruder"));
    let body = [
        identity_for("ci-bot", &ci),
        identity_for("intruder", &intruder),
        tcp_target("db", &[target(echo.port())]),
        rule("ci may use db", &["ci-bot"], &["db"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start_own_netns(tag, FailMode::Closed, &body);
    World {
        echo,
        ci,
        intruder,
        agent,
        lo_index,
        ns,
    }
}

impl World {
    fn ways(&self) -> Vec<Way> {
        let p = self.echo.port();
        let ll = format!("[fe80::2%{}]", self.lo_index);
        vec![
            way("192.0.2.2", false, "192.0.2.2", p),
            // An AF_INET6 socket dialling ::ffff:192.0.2.2 never passes connect4.
            way("192.0.2.2", true, "192.0.2.2", p),
            way("[fd00::2]", false, "[fd00::2]", p),
            way(&ll, false, "[fe80::2]", p),
            way("127.0.0.1", false, "127.0.0.1", p),
            way("127.0.0.2", false, "127.0.0.2", p),
            way("127.0.0.2", true, "127.0.0.2", p),
            way("[::1]", false, "[::1]", p),
            way("0.0.0.0", false, "0.0.0.0", p),
            way("[::]", false, "[::]", p),
        ]
    }

    fn args(w: &Way) -> Vec<&str> {
        let mut a = vec![
            "--connect",
            w.dial.as_str(),
            "--send-bytes",
            "3000",
            "--expect-echo",
        ];
        if w.v6_socket {
            a.push("--v6-socket");
        }
        a
    }

    /// The intruder dials `w` once: true if the agent denied it (and the server never saw it).
    fn intruder_denied(&self, w: &Way, problems: &mut Vec<String>) -> bool {
        let before = self.echo.accepted();
        let r = self.intruder.probe(probe_bin!(), &Self::args(w));
        let how = describe(w);
        if self.echo.accepted() != before || r.echo_ok() {
            problems.push(format!(
                "intruder via {how}: reached the server directly (BYPASS): {r}"
            ));
            return false;
        }
        if !r.was_denied() {
            problems.push(format!("intruder via {how}: not denied by the agent: {r}"));
            return false;
        }
        let ev = self.connect_event(r.pid);
        if ev["identity"] != "intruder"
            || ev["action"] != "deny"
            || ev["orig_dst"] != w.orig_dst.as_str()
        {
            problems.push(format!(
                "intruder via {how}: audit {ev}, want a deny with orig_dst {}",
                w.orig_dst
            ));
        }
        true
    }

    /// The allowed bot dials `w`: relayed by the agent (audited with the original destination)
    /// to the very address it dialled, and getpeername shows that address.
    fn ci_relayed(&self, w: &Way, problems: &mut Vec<String>) {
        let how = describe(w);
        let r = self.ci.probe(probe_bin!(), &Self::args(w));
        if !r.echo_ok() {
            problems.push(format!("ci-bot via {how}: no echo: {r}"));
            return;
        }
        let ev = self.connect_event(r.pid);
        if ev["identity"] != "ci-bot"
            || ev["action"] != "allow"
            || ev["orig_dst"] != w.orig_dst.as_str()
        {
            problems.push(format!(
                "ci-bot via {how}: audit {ev}, want an allow with orig_dst {}",
                w.orig_dst
            ));
        }
        let orig: SocketAddr = w.orig_dst.parse().expect("orig_dst parses");
        let peer = r.peer().and_then(|p| p.parse::<SocketAddr>().ok());
        if peer.map(|p| (canonical(p.ip()), p.port())) != Some((orig.ip(), orig.port())) {
            problems.push(format!(
                "ci-bot via {how}: getpeername {:?}, want {}",
                r.peer(),
                w.orig_dst
            ));
        }
        // The agent's upstream leg went to the dialled address (a connect to the unspecified
        // address lands on loopback, so those are not compared).
        if !orig.ip().is_unspecified() {
            let local = self.last_leg_local();
            if local != Some(orig.ip()) {
                problems.push(format!(
                    "ci-bot via {how}: the server saw the agent's leg on {local:?}, want {}",
                    orig.ip()
                ));
            }
        }
    }

    /// The agent's `connect` event for `pid`, or `null` if none comes within 2 s (the bot
    /// went around the agent): reported as a problem by the caller, not a panic.
    fn connect_event(&self, pid: u32) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let found = self
                .agent
                .audit()
                .into_iter()
                .find(|e| e["event"] == "connect" && e["pid"] == pid);
            if let Some(e) = found {
                return e;
            }
            if Instant::now() > deadline {
                return serde_json::Value::Null;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server-side local address of the connection the server finished last, once every
    /// accepted one has finished. Only the agent's legs ever reach the server (a bot that got
    /// there directly is reported as a bypass), so after an allowed probe this is its leg.
    fn last_leg_local(&self) -> Option<IpAddr> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let done = self.echo.finished();
            if done.len() == self.echo.accepted() {
                return done.last().map(|c| canonical(c.local.ip()));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Both bots over every spelling in `ways`.
    fn check(&self, ways: &[Way]) {
        let mut problems = Vec::new();
        for w in ways {
            self.ci_relayed(w, &mut problems);
            self.intruder_denied(w, &mut problems);
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn describe(w: &Way) -> String {
    format!(
        "{} ({})",
        w.dial,
        if w.v6_socket { "AF_INET6" } else { "native" }
    )
}

#[test]
fn loopback_target_covers_every_host_address_and_follows_new_ones() {
    let w = world("local-lo", |p| format!("127.0.0.1:{p}"));
    w.check(&w.ways());

    // Addresses added after the agent started are covered within a short time.
    w.ns.add_addr("192.0.2.3/32", "lo");
    w.ns.add_addr("fd00::3/128", "lo");
    let p = w.echo.port();
    let added = [
        way("192.0.2.3", false, "192.0.2.3", p),
        way("192.0.2.3", true, "192.0.2.3", p),
        way("[fd00::3]", false, "[fd00::3]", p),
    ];
    // The agent hears of the change through netlink at once; 300 ms is ample for it to update
    // the kernel tries (a bypass after that shows up as a failure here).
    std::thread::sleep(Duration::from_millis(300));
    let mut problems = Vec::new();
    for a in &added {
        assert!(
            w.intruder_denied(a, &mut problems),
            "an address added after the start is not covered 300 ms later: {}",
            problems.join("\n")
        );
    }
    w.check(&added);
}

#[test]
fn host_address_target_covers_loopback() {
    let w = world("local-host", |p| format!("192.0.2.2:{p}"));
    w.check(&w.ways());
}

#[test]
fn unspecified_target_covers_every_host_address() {
    let w = world("local-any", |p| format!("0.0.0.0:{p}"));
    w.check(&w.ways());
}
