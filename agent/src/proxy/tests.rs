//! In-process tests of the session path: real sockets on 127.0.0.1:0, a real echo upstream, a
//! table standing in for the kernel's `SOCK_ORIG` (keyed by client address instead of the
//! client socket's cookie), and assertions on wire bytes, audit
//! lines and scraped metrics.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};
use tollgate_common::ConnInfo;

use super::*;
use crate::{
    audit::Audit,
    identity::Resolver,
    metrics::Metrics,
    session::{ConnSource, Generation},
    targets::Routes,
};

/// Connection records keyed by the client's address (the agent finds them by the client
/// socket's cookie; its address identifies that socket just as well here).
#[derive(Default)]
struct Table(Mutex<HashMap<SocketAddr, ConnInfo>>);

impl ConnSource for Table {
    fn take_conn(&self, peer: SocketAddr, _local: SocketAddr) -> Option<ConnInfo> {
        self.0.lock().ok()?.remove(&peer)
    }
    fn exec_gen(&self, _pid: u32) -> u64 {
        0
    }
}

struct Fixture {
    agent: Arc<Agent>,
    table: Arc<Table>,
    listen: SocketAddr,
    upstream: SocketAddr,
    dir: PathBuf,
    bot_cgroup: u64,
    other_cgroup: u64,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

fn rand_suffix() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn fixture(mode: &str, extra_rules: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "tg-proxy-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let cg = dir.join("cgroup");
    std::fs::create_dir_all(cg.join("bots/ci")).expect("mkdir");
    std::fs::create_dir_all(cg.join("other")).expect("mkdir");
    let bot_cgroup = std::fs::metadata(cg.join("bots/ci")).expect("md").ino();
    let other_cgroup = std::fs::metadata(cg.join("other")).expect("md").ino();
    let upstream = echo_upstream().await;
    let text = format!(
        r#"[agent]
data_dir = "{data}"
mode = "{mode}"

[[identity]]
name = "ci-bot"
cgroup = "/bots/ci*"

[[identity]]
name = "other"
cgroup = "/other"

[[target]]
name = "echo"
protocol = "tcp"
address = ["{upstream}"]

[[target]]
name = "web"
protocol = "http"
address = ["127.0.0.1:1"]

[[rule]]
name = "ci may echo"
identities = ["ci-bot"]
targets = ["echo"]
action = "allow"
{extra_rules}
"#,
        data = dir.join("data").display()
    );
    let policy = tollgate_policy::parse(&text, "test.toml").expect("policy");
    let routes = Routes::build(&policy, &HashMap::new(), &Default::default());
    let table = Arc::new(Table::default());
    let audit = Audit::open(&dir.join("data")).expect("audit");
    let mut agent = Agent::new(
        Generation { policy, routes },
        table.clone(),
        Resolver::new(cg),
        audit,
        Metrics::new(),
    );
    agent.upstream_mark = None;
    let agent = Arc::new(agent);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let listen = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let a = agent.clone();
    tokio::spawn(async move {
        let _keep = tx;
        a.serve_listener(l, rx).await
    });
    Fixture {
        agent,
        table,
        listen,
        upstream,
        dir,
        bot_cgroup,
        other_cgroup,
    }
}

fn info_for(dst: SocketAddr, cgroup_id: u64) -> ConnInfo {
    ConnInfo {
        orig_ip: bpf::ip_words(dst.ip()),
        orig_port: dst.port(),
        family: 2,
        pid: std::process::id(),
        uid: 1000,
        cgroup_id,
        comm: *b"bot\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ..ConnInfo::default()
    }
}

impl Fixture {
    /// Connect to the listener as if redirected from `dst` by a process in `cgroup_id`.
    async fn connect(&self, dst: SocketAddr, cgroup_id: Option<u64>) -> TcpStream {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let local = sock.local_addr().expect("local");
        if let Some(cg) = cgroup_id {
            self.table
                .0
                .lock()
                .expect("lock")
                .insert(local, info_for(dst, cg));
        }
        sock.connect(self.listen).await.expect("connect")
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("data/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    async fn wait_for_audit(&self, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..200 {
            let a = self.audit();
            if pred(&a) {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("audit never satisfied the condition: {:#?}", self.audit());
    }
}

async fn assert_reset(mut s: TcpStream) {
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no hang");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "denied connection must not echo: {r:?}"
    );
}

#[tokio::test]
async fn allowed_bot_is_relayed_and_audited_once() {
    let f = fixture("enforce", "").await;
    let mut s = f.connect(f.upstream, Some(f.bot_cgroup)).await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    s.write_all(&payload).await.expect("write");
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await.expect("read echo");
    assert_eq!(back, payload);
    drop(s);
    let a = f
        .wait_for_audit(|a| a.iter().any(|e| e["event"] == "close"))
        .await;
    let connect: Vec<_> = a.iter().filter(|e| e["event"] == "connect").collect();
    let close: Vec<_> = a.iter().filter(|e| e["event"] == "close").collect();
    assert_eq!((connect.len(), close.len()), (1, 1), "{a:#?}");
    let c = connect[0];
    assert_eq!(c["identity"], "ci-bot");
    assert_eq!(c["action"], "allow");
    assert_eq!(c["rule"], "ci may echo");
    assert_eq!(c["cgroup"], "/bots/ci");
    assert_eq!(c["uid"], 1000);
    assert_eq!(c["pid"], std::process::id());
    assert_eq!(c["comm"], "bot");
    assert_eq!(c["orig_dst"], f.upstream.to_string());
    assert_eq!(close[0]["bytes_up"], payload.len() as u64);
    assert_eq!(close[0]["bytes_down"], payload.len() as u64);
    assert_eq!(close[0]["session"], c["session"]);
    let m = f.agent.metrics.render();
    assert!(m.contains(r#"tollgate_decisions_total{action="allow",identity="ci-bot",protocol="tcp",target="echo"} 1"#), "{m}");
    assert!(
        m.contains(r#"tollgate_sessions_active{protocol="tcp"} 0"#),
        "{m}"
    );
}

#[tokio::test]
async fn other_identity_and_unknown_cgroup_are_denied() {
    let f = fixture("enforce", "").await;
    assert_reset(f.connect(f.upstream, Some(f.other_cgroup)).await).await;
    assert_reset(f.connect(f.upstream, Some(987_654_321)).await).await;
    let a = f
        .wait_for_audit(|a| a.iter().filter(|e| e["event"] == "connect").count() == 2)
        .await;
    assert!(
        a.iter().all(|e| e["event"] != "close"),
        "a denied connection has no session: {a:#?}"
    );
    let conns: Vec<_> = a.iter().filter(|e| e["event"] == "connect").collect();
    assert_eq!(conns[0]["identity"], "other");
    assert_eq!(conns[0]["reason"], "no_matching_rule");
    assert_eq!(conns[1]["identity"], Value::Null);
    assert_eq!(conns[1]["reason"], "unknown_identity");
    assert!(conns.iter().all(|c| c["action"] == "deny"));
    let m = f.agent.metrics.render();
    assert!(m.contains(r#"tollgate_decisions_total{action="deny",identity="unknown",protocol="tcp",target="echo"} 1"#), "{m}");
}

#[tokio::test]
async fn unattributed_connection_is_refused() {
    let f = fixture("enforce", "").await;
    assert_reset(f.connect(f.upstream, None).await).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(f.audit().is_empty());
    assert!(f
        .agent
        .metrics
        .render()
        .contains(r#"tollgate_connections_rejected_total{reason="unattributed"} 1"#));
}

#[tokio::test]
async fn observe_mode_relays_but_audits_the_real_decision() {
    let f = fixture("observe", "").await;
    let mut s = f.connect(f.upstream, Some(f.other_cgroup)).await;
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    s.read_exact(&mut b)
        .await
        .expect("observe mode must not block");
    assert_eq!(&b, b"ping");
    let a = f.wait_for_audit(|a| !a.is_empty()).await;
    assert_eq!(a[0]["action"], "deny");
    assert_eq!(a[0]["enforced"], false);
}

#[tokio::test]
async fn operation_scoped_rules_do_not_open_an_uninspected_relay() {
    // An http-only rule admits the connection in the policy, but without an http handler the
    // requests could not be checked: the connection must be refused, not relayed blindly.
    let rule = "\n[[rule]]\nname = \"ci reads web\"\nidentities = [\"ci-bot\"]\ntargets = [\"web\"]\naction = \"allow\"\nhttp = { methods = [\"GET\"] }\n";
    let f = fixture("enforce", rule).await;
    assert_reset(
        f.connect("127.0.0.1:1".parse().expect("addr"), Some(f.bot_cgroup))
            .await,
    )
    .await;
    let a = f.wait_for_audit(|a| !a.is_empty()).await;
    assert_eq!(a[0]["action"], "deny");
    assert_eq!(a[0]["reason"], "operation_policy_unsupported");
}

#[tokio::test]
async fn unreachable_upstream_closes_cleanly_and_is_audited() {
    let rule = "\n[[rule]]\nname = \"ci whole web\"\nidentities = [\"ci-bot\"]\ntargets = [\"web\"]\naction = \"allow\"\n";
    let f = fixture("enforce", rule).await;
    assert_reset(
        f.connect("127.0.0.1:1".parse().expect("addr"), Some(f.bot_cgroup))
            .await,
    )
    .await;
    let a = f
        .wait_for_audit(|a| a.iter().any(|e| e["event"] == "close"))
        .await;
    let close = a.iter().find(|e| e["event"] == "close").expect("close");
    assert_eq!(close["status"], "upstream");
    // The agent keeps serving others.
    let mut s = f.connect(f.upstream, Some(f.bot_cgroup)).await;
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("still serving");
}
