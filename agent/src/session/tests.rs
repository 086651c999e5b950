//! The session layer's contracts, in process (no kernel, no root): a session's claims reach
//! the shared `decide`, one operation's decision, audit line and approval see one policy
//! generation across a reload, and the opaque relay serves through `SessionCx::for_test`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tollgate_policy::{Action, Operation, Policy};

use super::*;
use crate::{metrics::Metrics, relay::RelayKind};

/// A scratch data directory, removed at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> Dir {
    static N: AtomicU64 = AtomicU64::new(0);
    Dir(std::env::temp_dir().join(format!(
        "tg-session-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )))
}

/// A policy with identity `ci-bot`, a postgres target `db` and a tcp target `echo` at
/// `echo`, plus `rules`.
fn policy(dir: &Dir, mode: &str, echo: SocketAddr, rules: &str) -> Policy {
    let text = format!(
        r#"[agent]
data_dir = "{data}"
mode = "{mode}"

[[identity]]
name = "ci-bot"
uid = 1000

[[target]]
name = "db"
protocol = "postgres"
address = ["127.0.0.1:5432"]

[[target]]
name = "echo"
protocol = "tcp"
address = ["{echo}"]
{rules}
"#,
        data = dir.0.display(),
    );
    match tollgate_policy::parse(&text, "t.toml") {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn audit(dir: &Dir) -> Vec<Value> {
    std::fs::read_to_string(dir.0.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

fn select<'a>(tables: &'a [String]) -> Operation<'a> {
    Operation::Sql {
        statement: "select",
        tables,
        functions: &[],
    }
}

const ANY: &str = "127.0.0.1:9";

#[test]
fn a_claims_conditioned_deny_rule_matches_through_the_shared_decide() {
    let dir = scratch();
    let rules = r#"
[[rule]]
name = "ci reads"
identities = ["ci-bot"]
targets = ["db"]
action = "allow"
sql = { statements = ["select"] }

[[rule]]
name = "no contractors"
identities = ["ci-bot"]
targets = ["db"]
action = "deny"
sql = { statements = ["select"] }
claims = { groups = ["contractors"] }
"#;
    let p = policy(&dir, "enforce", ANY.parse().expect("addr"), rules);
    let agent = Arc::new(Agent::in_process(p).expect("agent"));
    let tables = vec!["orders".to_string()];

    // Without claims the conditioned deny does not apply.
    let cx = SessionCx::for_test(agent.clone(), Some("ci-bot"), "db", ANY.parse().expect("a"))
        .expect("target");
    let d = cx.decide(select(&tables), "select * from orders");
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.rule.as_deref(), Some("ci reads"));

    // A session whose verified token carries the group: the handler-neutral decide passes
    // the claims, so the deny matches (it did not before: claims were passed as None).
    let cx = SessionCx::for_test(agent.clone(), Some("ci-bot"), "db", ANY.parse().expect("a"))
        .expect("target");
    let mut claims = BTreeMap::new();
    claims.insert("groups".to_string(), vec!["contractors".to_string()]);
    cx.claims.set(claims).expect("claims set once");
    let d = cx.decide(select(&tables), "select * from orders");
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.rule.as_deref(), Some("no contractors"));

    let lines = audit(&dir);
    let ops: Vec<&Value> = lines.iter().filter(|l| l["event"] == "operation").collect();
    assert_eq!(ops.len(), 2, "{lines:?}");
    assert_eq!(ops[1]["action"], "deny");
    assert_eq!(ops[1]["rule"], "no contractors");
}

#[tokio::test]
async fn one_operation_sees_one_policy_generation_across_a_reload() {
    let dir = scratch();
    let rules = |approver: &str, timeout: &str| {
        format!(
            r#"
[[rule]]
name = "drops need approval"
identities = ["ci-bot"]
targets = ["db"]
action = "approve"
sql = {{ statements = ["drop"] }}
approvers = ["{approver}"]
timeout = "{timeout}"
"#
        )
    };
    let echo: SocketAddr = ANY.parse().expect("addr");
    let a = policy(&dir, "enforce", echo, &rules("alice", "2m"));
    // The reload: observe mode (which would turn the decision into an allow and mark the
    // audit line unenforced) and another approver and timeout.
    let b = policy(&dir, "observe", echo, &rules("bob", "7m"));
    let mut agent = Agent::in_process(a).expect("agent");
    let broker = Arc::new(crate::approvals::Broker::with_store(
        None,
        None,
        Metrics::new(),
        None,
    ));
    agent.approvals = Some(broker.clone());
    let agent = Arc::new(agent);
    let cx = SessionCx::for_test(agent.clone(), Some("ci-bot"), "db", echo).expect("target");
    let drop_op = Operation::Sql {
        statement: "drop",
        tables: &[],
        functions: &[],
    };

    // The operation takes its snapshot and is decided under it...
    let gen = cx.policy();
    let d = cx.decide_in(&gen, drop_op);
    assert_eq!(d.action, Action::Approve);

    // ...a reload lands from another task while it is in flight...
    let swapped = {
        let agent = agent.clone();
        let routes = crate::targets::Routes::build(&b, &Default::default(), &Default::default());
        tokio::spawn(async move {
            agent.gen.store(Arc::new(Generation { policy: b, routes }));
        })
    };
    swapped.await.expect("reload task");
    assert_eq!(
        cx.policy().policy.agent.mode,
        tollgate_policy::Mode::Observe,
        "the reload is in force for the next operation"
    );

    // ...and its audit line and approval request still follow the snapshot.
    let enforced = cx.audit_operation(&gen, "drop", "drop table t", &d, None);
    assert_eq!(
        enforced.action,
        Action::Approve,
        "not turned into an allow by the new observe mode"
    );
    let line = audit(&dir)
        .into_iter()
        .rfind(|l| l["event"] == "operation")
        .expect("audit line");
    assert_eq!(line["action"], "approve");
    assert_eq!(line["enforced"], true);
    let ticket = cx
        .open_approval(&gen, "drop table t", "drop", &d)
        .await
        .expect("broker");
    let (pending, _) = broker.list();
    let req = pending
        .iter()
        .find(|r| r.id == ticket.id())
        .expect("pending");
    assert_eq!(req.approvers, ["alice"], "approvers of the snapshot's rule");
    assert_eq!(ticket.timeout(), std::time::Duration::from_secs(120));
    drop(ticket);

    // The next operation is decided, audited and held under the new generation.
    let d = cx.decide(drop_op, "drop table u");
    assert_eq!(d.action, Action::Allow, "observe mode lets it run");
    let line = audit(&dir)
        .into_iter()
        .rfind(|l| l["event"] == "operation")
        .expect("audit line");
    assert_eq!(line["action"], "approve");
    assert_eq!(line["enforced"], false);
}

async fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    a
}

/// A connected pair: the bot's end and the agent's accepted end.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bot = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (agent_end, _) = l.accept().await.expect("accept");
    (bot, agent_end)
}

#[tokio::test]
async fn the_tcp_relay_serves_through_the_test_constructor() {
    let dir = scratch();
    let echo = echo_upstream().await;
    let rules = "\n[[rule]]\nname = \"ci echo\"\nidentities = [\"ci-bot\"]\ntargets = [\"echo\"]\naction = \"allow\"\n";
    let agent = Arc::new(Agent::in_process(policy(&dir, "enforce", echo, rules)).expect("agent"));
    let registry = Registry::new(RelayKind::Copy);
    let relay = registry
        .get(tollgate_policy::Protocol::Tcp)
        .expect("tcp")
        .clone();
    assert!(!relay.inspects(), "the relay decides nothing per operation");
    assert!(registry
        .inspecting(tollgate_policy::Protocol::Postgres)
        .is_none());

    let cx = SessionCx::for_test(agent.clone(), Some("ci-bot"), "echo", echo).expect("target");
    let (mut bot, agent_end) = pair().await;
    let served = tokio::spawn(async move { relay.serve(&cx, agent_end).await });
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = bot.split();
    let send = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, got) = tokio::join!(send, recv);
    got.expect("read");
    assert_eq!(back, payload, "bytes come back unchanged");
    let totals = served.await.expect("task").expect("relay ends cleanly");
    assert_eq!(totals.bytes_up, payload.len() as u64);
    assert_eq!(totals.bytes_down, payload.len() as u64);

    // An unreachable upstream is an upstream error, not a panic or a hang.
    let cx = SessionCx::for_test(
        agent,
        Some("ci-bot"),
        "echo",
        "127.0.0.1:1".parse().expect("a"),
    )
    .expect("target");
    let (_bot, agent_end) = pair().await;
    let e = registry
        .relay()
        .serve(&cx, agent_end)
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(e.label(), "upstream");
}
