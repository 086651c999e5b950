//! Upstream connection reuse for PostgreSQL targets (`pool = true`, the default).
//!
//! A session that ends cleanly (the client sent Terminate, nothing is in flight, the server is
//! idle outside a transaction) leaves its logged-in upstream connection behind, reset with
//! `DISCARD ALL` as pgbouncer's `server_reset_query` does. The next session of the same workload
//! identity for the same target address, upstream user, startup parameters and credential
//! secret takes it instead of connecting, logging in and starting a new backend process.
//! Connect-per-transaction bots get their connection in microseconds instead of a fork and a
//! SCRAM exchange.
//!
//! Each idle connection is kept by a small task that watches it: the connection is dropped
//! (with Terminate) when it has been idle for [`IDLE_TIMEOUT`], or when the server closes it or
//! sends anything unsolicited. A plain TCP connection taken by a session on another session
//! thread is moved to that thread's runtime; TLS connections (whose socket cannot be moved out
//! from under the TLS state) are only reused on the thread that made them.

use std::{
    collections::{hash_map::RandomState, HashMap},
    hash::BuildHasher as _,
    net::SocketAddr,
    sync::Mutex,
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

/// Idle connections kept in all. The key includes startup parameters the bot chooses (e.g.
/// `application_name`), so without a total a bot could park any number of backends on the
/// server, outside the agent's `max_connections`.
pub const MAX_IDLE_TOTAL: usize = 64;

/// A logged-in, reset upstream connection and what a new session needs to greet its client.
pub struct Idle {
    pub conn: Conn,
    /// The backend's cancel key.
    pub backend_key: Option<(i32, i32)>,
    /// ParameterStatus (and login notices) from the original login, relayed to each client.
    pub relay: Bytes,
}

/// What must match for a connection to be reused: the workload identity, the target, its
/// address, the upstream user, the startup parameters (sorted) and the credential's secret (a
/// rotated secret gets fresh connections), as a 128-bit keyed digest (two independently
/// seeded SipHashes, seeded per [`Pool`]). Every session holds its key, so it is kept small, and
/// it never holds the secret. Made by [`Pool::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    thread: Option<usize>,
    digest: [u64; 2],
}

type Claim = oneshot::Sender<oneshot::Sender<Idle>>;

/// The idle connections of one key, and the target they belong to (for closing a target's
/// connections when a reload changes or removes it).
struct Kept {
    target: String,
    claims: Vec<Claim>,
}

/// The idle connections, a field of the PostgreSQL handler (built once).
pub struct Pool {
    map: Mutex<Option<HashMap<Key, Kept>>>,
    /// The seeds of the two SipHashes of [`Key`]: random per pool, so a bot cannot choose
    /// startup parameters that collide with another session's key.
    seeds: [RandomState; 2],
    /// Idle connections currently kept (each keeper task holds one); exported as
    /// `tollgate_pg_pool_idle_connections`.
    kept: prometheus::IntGauge,
}

impl Pool {
    /// An empty pool counting its connections in `kept`.
    pub fn new(kept: prometheus::IntGauge) -> Pool {
        Pool {
            map: Mutex::new(None),
            seeds: Default::default(),
            kept,
        }
    }

    /// The key of a session's upstream login. `identity`: the session's workload identity.
    /// Backend state that `DISCARD ALL` leaves (a `LOAD`ed library, dblink connections, a
    /// procedural language's session globals) then never passes from one identity to another
    /// that shares the credential.
    #[expect(clippy::too_many_arguments, reason = "each field of the key")]
    pub fn key(
        &self,
        identity: &str,
        tls: bool,
        target: &str,
        addr: SocketAddr,
        user: &str,
        params: &[(String, String)],
        secret: Option<&[u8]>,
    ) -> Key {
        let mut params: Vec<&(String, String)> = params.iter().collect();
        params.sort();
        let fields = (identity, tls, target, addr, user, params, secret);
        let [a, b] = &self.seeds;
        Key {
            thread: if tls { crate::plane::current() } else { None },
            digest: [a.hash_one(&fields), b.hash_one(&fields)],
        }
    }

    /// Take an idle connection for `key`, if one is kept.
    pub async fn take(&self, key: Key) -> Option<Idle> {
        loop {
            let claim = {
                let mut pool = lock(&self.map);
                let map = pool.as_mut()?;
                let list = &mut map.get_mut(&key)?.claims;
                let claim = list.pop();
                if list.is_empty() {
                    map.remove(&key);
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

    /// Keep `idle`, a connection to `target`, for the next session with `key` (needs a tokio
    /// runtime).
    pub fn put(&self, key: Key, target: &str, idle: Idle) {
        let (tx, rx) = oneshot::channel();
        {
            let mut pool = lock(&self.map);
            let list = &mut pool
                .get_or_insert_with(HashMap::new)
                .entry(key)
                .or_insert_with(|| Kept {
                    target: target.to_string(),
                    claims: Vec::new(),
                })
                .claims;
            list.retain(|c| !c.is_closed());
            // Counted under the pool's lock, so no two puts pass the cap together (keepers
            // only lower the count).
            if list.len() >= MAX_IDLE_PER_KEY || self.kept() >= MAX_IDLE_TOTAL {
                drop(pool);
                tokio::spawn(terminate(idle.conn));
                return;
            }
            self.kept.inc();
            list.push(tx);
        }
        let kept = self.kept.clone();
        tokio::spawn(async move {
            keep(idle, rx).await;
            kept.dec();
        });
    }

    /// How many idle connections are kept now.
    pub fn kept(&self) -> usize {
        self.kept.get().max(0) as usize
    }

    /// Close every idle connection (at shutdown): their keepers say Terminate to the server.
    pub fn close_all(&self) {
        let map = lock(&self.map).take();
        drop(map);
    }

    /// Close the idle connections of every target `stale` names (after a reload that changed
    /// or removed the target, or turned its pool off); returns how many were closed.
    pub fn close_targets(&self, stale: impl Fn(&str) -> bool) -> usize {
        let closed: Vec<Kept> = match lock(&self.map).as_mut() {
            Some(map) => map
                .extract_if(|_, k| stale(&k.target))
                .map(|(_, k)| k)
                .collect(),
            None => return 0,
        };
        // Dropping the claims wakes their keepers, which say Terminate.
        closed
            .iter()
            .map(|k| k.claims.iter().filter(|c| !c.is_closed()).count())
            .sum()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A connection pair: the agent's end (as a pooled upstream) and the "server" end.
    async fn pair(l: &TcpListener) -> (Conn, TcpStream) {
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (Conn::Plain(c), s)
    }

    fn key(pool: &Pool, n: usize) -> Key {
        key_of(pool, "ci-bot", n)
    }

    /// [`key`] for another workload identity.
    fn key_of(pool: &Pool, identity: &str, n: usize) -> Key {
        pool.key(
            identity,
            false,
            "db",
            "127.0.0.1:5432".parse().expect("addr"),
            "app",
            &[("application_name".into(), format!("bot-{n}"))],
            Some(b"secret"),
        )
    }

    fn idle(conn: Conn) -> Idle {
        Idle {
            conn,
            backend_key: Some((1, 2)),
            relay: Bytes::new(),
        }
    }

    /// Reads what the agent sent before closing: Terminate, then EOF.
    async fn said_goodbye(s: &mut TcpStream) -> bool {
        let mut got = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        matches!(r, Ok(Ok(_))) && got == [b'X', 0, 0, 0, 4]
    }

    /// Wait (bounded) until every keeper has finished.
    async fn none_kept(pool: &Pool) {
        for _ in 0..200 {
            if pool.kept() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn kept_connections_are_reused_capped_and_dropped_when_the_server_leaves() {
        let pool = Pool::new(prometheus::IntGauge::new("kept", "kept").expect("gauge"));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        // Reuse: the same connection comes back for the same key, not for another.
        let (c, mut s) = pair(&l).await;
        pool.put(key(&pool, 0), "db", idle(c));
        assert!(
            pool.take(key(&pool, 1)).await.is_none(),
            "another key gets nothing"
        );
        assert!(
            pool.take(key_of(&pool, "ops-bot", 0)).await.is_none(),
            "another identity with the same login gets nothing"
        );
        let mut back = pool.take(key(&pool, 0)).await.expect("kept for its key");
        assert_eq!(back.backend_key, Some((1, 2)));
        back.conn.write_all(b"ping").await.expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.expect("same socket");
        assert_eq!(&b, b"ping");
        assert!(pool.take(key(&pool, 0)).await.is_none(), "taken once");

        // The server closing an idle connection removes it.
        pool.put(key(&pool, 0), "db", back);
        drop(s);
        none_kept(&pool).await;
        assert_eq!(pool.kept(), 0, "a closed connection is not kept");
        assert!(pool.take(key(&pool, 0)).await.is_none());

        // A reload closes the connections of the targets it changed, and only those.
        let other = pool.key(
            "ci-bot",
            false,
            "other",
            "127.0.0.1:5433".parse().expect("addr"),
            "app",
            &[],
            None,
        );
        let (c, mut s_db) = pair(&l).await;
        pool.put(key(&pool, 0), "db", idle(c));
        let (c, mut s_other) = pair(&l).await;
        pool.put(other, "other", idle(c));
        assert_eq!(pool.close_targets(|t| t == "other"), 1);
        assert!(
            said_goodbye(&mut s_other).await,
            "the changed target's connection closed with Terminate"
        );
        assert!(pool.take(other).await.is_none());
        let mut back = pool
            .take(key(&pool, 0))
            .await
            .expect("the unchanged target's connection stays");
        back.conn.write_all(b"pong").await.expect("write");
        let mut b = [0u8; 4];
        s_db.read_exact(&mut b).await.expect("same socket");
        assert_eq!(&b, b"pong");
        drop(back);
        drop(s_db);
        assert_eq!(pool.close_targets(|_| true), 0, "nothing left to close");
        none_kept(&pool).await;
        assert_eq!(pool.kept(), 0);

        // The total cap: bot-chosen startup parameters cannot park unbounded backends.
        let mut servers = Vec::new();
        for n in 0..MAX_IDLE_TOTAL + 3 {
            let (c, s) = pair(&l).await;
            pool.put(key(&pool, n), "db", idle(c));
            servers.push(s);
        }
        assert_eq!(pool.kept(), MAX_IDLE_TOTAL);
        for s in servers.iter_mut().skip(MAX_IDLE_TOTAL) {
            assert!(said_goodbye(s).await, "over the cap: closed with Terminate");
        }
        // Shutdown closes the rest, each with Terminate.
        pool.close_all();
        for s in servers.iter_mut().take(MAX_IDLE_TOTAL) {
            assert!(said_goodbye(s).await, "closed at shutdown with Terminate");
        }
        none_kept(&pool).await;
        assert_eq!(pool.kept(), 0);
    }
}
