//! Upstream connection reuse for PostgreSQL targets (`pool = true`, the default).
//!
//! A session that ends cleanly (the client sent Terminate, nothing is in flight, the server is
//! idle outside a transaction) leaves its logged-in upstream connection behind, reset with
//! `DISCARD ALL` as pgbouncer's `server_reset_query` does. The next session for the same target
//! address, upstream user, startup parameters and credential secret takes it instead of
//! connecting, logging in and starting a new backend process. Connect-per-transaction bots get
//! their connection in microseconds instead of a fork and a SCRAM exchange.
//!
//! Each idle connection is kept by a small task that watches it: the connection is dropped
//! (with Terminate) when it has been idle for [`IDLE_TIMEOUT`], or when the server closes it or
//! sends anything unsolicited. A plain TCP connection taken by a session on another session
//! thread is moved to that thread's runtime; TLS connections (whose socket cannot be moved out
//! from under the TLS state) are only reused on the thread that made them.

use std::{
    collections::HashMap,
    hash::BuildHasher as _,
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::oneshot,
};

use crate::{lock, pg::wire, tls::Conn};

/// How long an unused upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per key (beyond this they are closed).
pub const MAX_IDLE_PER_KEY: usize = 32;

/// A logged-in, reset upstream connection and what a new session needs to greet its client.
pub struct Idle {
    pub conn: Conn,
    /// The backend's cancel key.
    pub backend_key: Option<(i32, i32)>,
    /// ParameterStatus (and login notices) from the original login, relayed to each client.
    pub relay: Bytes,
}

/// What must match for a connection to be reused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    thread: Option<usize>,
    target: String,
    addr: SocketAddr,
    user: String,
    params: Vec<(String, String)>,
    /// Keyed hash of the credential's secret: a rotated secret gets fresh connections. The
    /// secret itself is never kept here.
    secret: u64,
}

impl Key {
    pub fn new(
        tls: bool,
        target: &str,
        addr: SocketAddr,
        user: &str,
        params: &[(String, String)],
        secret: Option<&[u8]>,
    ) -> Key {
        static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        let mut params = params.to_vec();
        params.sort();
        Key {
            thread: if tls { crate::plane::current() } else { None },
            target: target.to_string(),
            addr,
            user: user.to_string(),
            params,
            secret: SEED.get_or_init(Default::default).hash_one(secret),
        }
    }
}

type Claim = oneshot::Sender<oneshot::Sender<Idle>>;

static POOL: Mutex<Option<HashMap<Key, Vec<Claim>>>> = Mutex::new(None);

/// Take an idle connection for `key`, if one is kept.
pub async fn take(key: &Key) -> Option<Idle> {
    loop {
        let claim = {
            let mut pool = lock(&POOL);
            let map = pool.as_mut()?;
            let list = map.get_mut(key)?;
            let claim = list.pop();
            if list.is_empty() {
                map.remove(key);
            }
            claim?
        };
        let (tx, rx) = oneshot::channel();
        if claim.send(tx).is_err() {
            continue; // its keeper already closed it
        }
        if let Ok(mut idle) = rx.await {
            if let Conn::Plain(s) = idle.conn {
                // Register the socket with this thread's runtime.
                let Ok(s) = s.into_std().and_then(tokio::net::TcpStream::from_std) else {
                    continue;
                };
                idle.conn = Conn::Plain(s);
            }
            return Some(idle);
        }
    }
}

/// Keep `idle` for the next session with `key` (needs a tokio runtime).
pub fn put(key: Key, idle: Idle) {
    let (tx, rx) = oneshot::channel();
    {
        let mut pool = lock(&POOL);
        let list = pool
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_default();
        list.retain(|c| !c.is_closed());
        if list.len() >= MAX_IDLE_PER_KEY {
            drop(pool);
            tokio::spawn(terminate(idle.conn));
            return;
        }
        list.push(tx);
    }
    tokio::spawn(keep(idle, rx));
}

/// Watch an idle connection until a session claims it, it times out, or the server speaks.
async fn keep(mut idle: Idle, claim: oneshot::Receiver<oneshot::Sender<Idle>>) {
    let mut probe = [0u8; 1];
    let reply = tokio::select! {
        r = claim => r.ok(),
        _ = tokio::time::sleep(IDLE_TIMEOUT) => None,
        // EOF, an error or an unsolicited message (a FATAL before shutdown, a changed
        // parameter): not a connection to hand to a new session.
        _ = idle.conn.read(&mut probe) => None,
    };
    match reply {
        Some(reply) => {
            if let Err(idle) = reply.send(idle) {
                terminate(idle.conn).await;
            }
        }
        None => terminate(idle.conn).await,
    }
}

/// Say goodbye to the server and close.
pub async fn terminate(mut conn: Conn) {
    let bye = [b'X', 0, 0, 0, 4];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = conn.write_all(&bye).await;
        let _ = conn.shutdown().await;
    })
    .await;
}

/// Reset a connection for the next session: `DISCARD ALL`, which must complete without error
/// and leave the server idle outside a transaction. None: the connection is not reusable.
pub async fn reset(mut conn: Conn) -> Option<Conn> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query("DISCARD ALL", &mut out).ok()?;
    let done = tokio::time::timeout(Duration::from_secs(2), async {
        conn.write_all(&out).await.ok()?;
        conn.flush().await.ok()?;
        let mut buf = BytesMut::with_capacity(256);
        let mut completed = false;
        loop {
            while let Some((tag, raw)) = wire::parse_backend(&mut buf).ok()? {
                match tag {
                    b'C' => completed = true,
                    // Parameters reset to the session's startup values, and notices.
                    b'S' | b'N' => {}
                    b'Z' => {
                        let idle = raw.get(5) == Some(&b'I');
                        return (completed && idle && buf.is_empty()).then_some(());
                    }
                    _ => return None,
                }
            }
            if conn.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        }
    })
    .await;
    matches!(done, Ok(Some(()))).then_some(conn)
}
