//! In-process tests of the PostgreSQL handler (no kernel, no root): a bot's socket is handed to
//! [`PgHandler`] through `SessionCx::for_test`, against a fake PostgreSQL server that speaks
//! just enough of the protocol (login without a password, the function catalog query, simple
//! queries, the denial substitute's error, `DISCARD ALL`) and keeps every statement it got.
//! The real-server behaviour is covered by the vm-tests; these pin the handler's contract with
//! the session layer: decisions and audit lines, nothing of a denied statement upstream, the
//! handler's own pool and metrics (fields, not statics), and its refusal in PostgreSQL's terms.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::BytesMut;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    handler::PgHandler,
    wire::{self, ErrorReport, Field, Frontend, Startup, TransactionStatus},
};
use crate::session::{Agent, ProtocolHandler, Refusal, SessionCx};

/// A fake PostgreSQL server.
struct Fake {
    addr: SocketAddr,
    /// Statements received (the function catalog query and `DISCARD ALL` left out).
    queries: Arc<Mutex<Vec<String>>>,
    /// Logins (startup messages) accepted.
    logins: Arc<AtomicUsize>,
}

async fn fake_server() -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let queries = Arc::new(Mutex::new(Vec::new()));
    let logins = Arc::new(AtomicUsize::new(0));
    let (q, n) = (queries.clone(), logins.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(fake_conn(s, q.clone(), n.clone()));
        }
    });
    Fake {
        addr,
        queries,
        logins,
    }
}

fn ready(out: &mut BytesMut) {
    wire::encode_ready_for_query(TransactionStatus::Idle, out);
}

async fn fake_conn(mut s: TcpStream, queries: Arc<Mutex<Vec<String>>>, logins: Arc<AtomicUsize>) {
    let mut buf = BytesMut::new();
    loop {
        match wire::parse_startup(&mut buf) {
            Ok(Some(Startup::Startup { .. })) => break,
            Ok(Some(_)) => {
                if s.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(None) => match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            Err(_) => return,
        }
    }
    logins.fetch_add(1, Ordering::SeqCst);
    let mut out = BytesMut::new();
    wire::encode_authentication_ok(&mut out);
    for (k, v) in [
        ("server_version", "16.4"),
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
    ] {
        wire::encode_parameter_status(k, v, &mut out).expect("param");
    }
    wire::encode_backend_key_data(
        wire::BackendKeyData {
            pid: 4242,
            secret: 7,
        },
        &mut out,
    );
    ready(&mut out);
    if s.write_all(&out).await.is_err() {
        return;
    }
    loop {
        let msg = match wire::parse_frontend(&mut buf) {
            Ok(Some((m, _))) => m,
            Ok(None) => match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            Err(_) => return,
        };
        let mut out = BytesMut::new();
        match msg {
            Frontend::Terminate => return,
            Frontend::Query(q) if q.contains("pg_catalog.pg_proc") => {
                wire::encode_command_complete("SELECT 0", &mut out).expect("tag");
            }
            Frontend::Query(q) if q.trim() == "DISCARD ALL" => {
                wire::encode_command_complete("DISCARD ALL", &mut out).expect("tag");
            }
            Frontend::Query(q) if q.contains("::pg_catalog.int4") => {
                // What PostgreSQL answers to the denial substitute `SELECT '<marker>'::int4`.
                let lit = q.split('\'').nth(1).unwrap_or_default().to_string();
                let m = format!("invalid input syntax for type integer: \"{lit}\"");
                wire::encode_error_response(&ErrorReport::error("22P02", &m), &mut out);
            }
            Frontend::Query(q) => {
                queries.lock().expect("lock").push(q.to_string());
                let field = Field {
                    name: "?column?".into(),
                    table_oid: 0,
                    column: 0,
                    type_oid: 23,
                    type_size: 4,
                    type_modifier: -1,
                    format: 0,
                };
                wire::encode_row_description(&[field], &mut out).expect("T");
                wire::encode_data_row(&[Some(b"1")], &mut out).expect("D");
                wire::encode_command_complete("SELECT 1", &mut out).expect("C");
            }
            _ => continue,
        }
        ready(&mut out);
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The bot's side of one session: raw protocol messages.
struct Bot {
    s: TcpStream,
    buf: BytesMut,
}

impl Bot {
    async fn startup(s: TcpStream) -> (Bot, Vec<(u8, bytes::Bytes)>) {
        let mut b = Bot {
            s,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "app"), ("database", "app")],
            &mut out,
        )
        .expect("startup");
        b.s.write_all(&out).await.expect("write");
        let msgs = b.until_ready().await;
        (b, msgs)
    }

    /// Backend messages up to and including ReadyForQuery (or the connection's end).
    async fn until_ready(&mut self) -> Vec<(u8, bytes::Bytes)> {
        let mut msgs = Vec::new();
        loop {
            while let Some((tag, raw)) = wire::parse_backend(&mut self.buf).expect("framing") {
                msgs.push((tag, raw));
                if tag == b'Z' {
                    return msgs;
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read_buf(&mut self.buf))
                .await
                .expect("the agent answers")
                .expect("read");
            if n == 0 {
                return msgs;
            }
        }
    }

    async fn query(&mut self, sql: &str) -> Vec<(u8, bytes::Bytes)> {
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut out).expect("query");
        self.s.write_all(&out).await.expect("write");
        self.until_ready().await
    }

    async fn terminate(mut self) {
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::terminate(&mut out);
        self.s.write_all(&out).await.expect("write");
        let mut rest = Vec::new();
        let _ = self.s.read_to_end(&mut rest).await;
    }
}

fn error_of(msgs: &[(u8, bytes::Bytes)]) -> Option<(String, String)> {
    msgs.iter().find(|(t, _)| *t == b'E').map(|(_, raw)| {
        let e = wire::decode_error_notice(raw).expect("error");
        (
            e.get(b'C').unwrap_or_default().to_string(),
            e.get(b'M').unwrap_or_default().to_string(),
        )
    })
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

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn agent(fake: SocketAddr) -> (Arc<Agent>, Dir) {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = Dir(std::env::temp_dir().join(format!(
        "tg-pg-inprocess-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )));
    let text = format!(
        r#"[agent]
data_dir = "{data}"

[[identity]]
name = "ci-bot"
uid = 1000

[[target]]
name = "db"
protocol = "postgres"
address = ["{fake}"]

[[rule]]
name = "ci reads"
identities = ["ci-bot"]
targets = ["db"]
action = "allow"
sql = {{ statements = ["select"] }}
"#,
        data = dir.0.display()
    );
    let policy = tollgate_policy::parse(&text, "t.toml").expect("policy");
    (Arc::new(Agent::in_process(policy).expect("agent")), dir)
}

fn audit(dir: &Dir) -> Vec<Value> {
    std::fs::read_to_string(dir.0.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// One session of `handler` for `ci-bot`, served on its own task.
async fn session(
    handler: &Arc<PgHandler>,
    agent: &Arc<Agent>,
    fake: SocketAddr,
) -> (Bot, tokio::task::JoinHandle<()>) {
    let cx = SessionCx::for_test(agent.clone(), Some("ci-bot"), "db", fake).expect("target");
    let (bot, agent_end) = pair().await;
    let h = handler.clone();
    let served = tokio::spawn(async move {
        let r = h.serve(&cx, agent_end).await;
        assert!(r.is_ok(), "session ends cleanly: {:?}", r.err());
    });
    let (bot, greeting) = Bot::startup(bot).await;
    let tags: Vec<u8> = greeting.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags.first(),
        Some(&b'R'),
        "AuthenticationOk first: {tags:?}"
    );
    assert!(
        tags.contains(&b'K') && tags.last() == Some(&b'Z'),
        "{tags:?}"
    );
    (bot, served)
}

#[tokio::test]
async fn statements_are_decided_and_the_denied_one_never_reaches_the_server() {
    let fake = fake_server().await;
    let (agent, dir) = agent(fake.addr);
    let handler = Arc::new(PgHandler::new());
    assert!(handler.inspects());

    let (mut bot, served) = session(&handler, &agent, fake.addr).await;
    let r = bot.query("select 1").await;
    assert!(error_of(&r).is_none(), "allowed: {r:?}");
    assert!(r.iter().any(|(t, _)| *t == b'D'), "the row comes back");

    let r = bot.query("drop table orders").await;
    let (code, message) = error_of(&r).expect("denied");
    assert_eq!(code, "42501");
    assert!(
        message.contains("drop on orders is not allowed for identity ci-bot"),
        "{message}"
    );
    // The session goes on after a denial.
    let r = bot.query("select 2").await;
    assert!(error_of(&r).is_none(), "{r:?}");
    bot.terminate().await;
    served.await.expect("session task");

    assert_eq!(
        *fake.queries.lock().expect("lock"),
        ["select 1", "select 2"],
        "nothing of the denied statement reached the server"
    );
    let ops: Vec<(String, String)> = audit(&dir)
        .iter()
        .filter(|l| l["event"] == "operation")
        .map(|l| {
            (
                l["operation"].as_str().unwrap_or_default().to_string(),
                l["action"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want = [
        ("select 1", "allow"),
        ("drop table orders", "deny"),
        ("select 2", "allow"),
    ];
    assert_eq!(
        ops,
        want.map(|(o, a)| (o.to_string(), a.to_string())),
        "one audit line per statement"
    );
}

#[tokio::test]
async fn the_pool_is_the_handlers_own() {
    let fake = fake_server().await;
    let (agent, _dir) = agent(fake.addr);
    let handler = Arc::new(PgHandler::new());
    let registry = prometheus::Registry::new();
    handler.register_metrics(&registry);
    let metric = |name: &str, labels: &[(&str, &str)]| -> f64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| m.get_gauge().get_value() + m.get_counter().get_value())
            .sum()
    };

    // A session that ends cleanly leaves its logged-in connection to the handler's pool...
    let (mut bot, served) = session(&handler, &agent, fake.addr).await;
    bot.query("select 1").await;
    bot.terminate().await;
    served.await.expect("session task");
    for _ in 0..100 {
        if metric("tollgate_pg_pool_idle_connections", &[]) == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric("tollgate_pg_pool_idle_connections", &[]), 1.0);

    // ...which the next session takes instead of logging in again.
    let (mut bot, served) = session(&handler, &agent, fake.addr).await;
    bot.query("select 1").await;
    bot.terminate().await;
    served.await.expect("session task");
    assert_eq!(fake.logins.load(Ordering::SeqCst), 1, "one login upstream");
    let reused = [("target", "db"), ("connection", "reused")];
    assert_eq!(
        metric("tollgate_pg_upstream_connections_total", &reused),
        1.0
    );

    // Another handler (another agent in the same process) has a pool of its own.
    let other = Arc::new(PgHandler::new());
    let (mut bot, served) = session(&other, &agent, fake.addr).await;
    bot.query("select 1").await;
    bot.terminate().await;
    served.await.expect("session task");
    assert_eq!(fake.logins.load(Ordering::SeqCst), 2);

    // Shutdown says goodbye to what the pool keeps.
    handler.shutdown().await;
    other.shutdown().await;
    assert_eq!(metric("tollgate_pg_pool_idle_connections", &[]), 0.0);
}

#[tokio::test]
async fn a_refused_connection_gets_a_postgresql_fatal() {
    let handler = PgHandler::new();
    let (mut bot, agent_end) = pair().await;
    let refusing = handler.refuse(agent_end, Refusal::Denied, "tollgate: no identity matched");
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message([("user", "app")], &mut out)
        .expect("startup");
    let client = async {
        bot.write_all(&out).await.expect("write");
        let mut got = Vec::new();
        bot.read_to_end(&mut got).await.expect("read");
        got
    };
    let ((), got) = tokio::join!(refusing, client);
    let mut buf = BytesMut::from(&got[..]);
    let (tag, raw) = wire::parse_backend(&mut buf)
        .expect("framing")
        .expect("a message");
    assert_eq!(tag, b'E');
    let e = wire::decode_error_notice(&raw).expect("error");
    assert_eq!(e.get(b'S'), Some("FATAL"));
    assert_eq!(e.get(b'C'), Some("28000"));
    assert_eq!(e.get(b'M'), Some("tollgate: no identity matched"));
}
