//! Opaque byte relays between a client and its upstream. The default moves bytes with
//! splice(2) through a pipe, so they never enter userspace; `TOLLGATE_RELAY=copy` selects a
//! plain userspace copy (used by benchmarks as the "bare relay" baseline). Both count bytes for
//! the audit log and half-close each direction on EOF so protocols with half-closed streams
//! keep working.

use std::{
    io,
    net::Shutdown,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{io::Interest, net::TcpStream};

use crate::sys;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// Client to upstream.
    pub bytes_up: u64,
    /// Upstream to client.
    pub bytes_down: u64,
}

/// Which relay implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Splice,
    Copy,
}

impl RelayKind {
    pub fn from_env() -> RelayKind {
        match std::env::var("TOLLGATE_RELAY").as_deref() {
            Ok("copy") => RelayKind::Copy,
            _ => RelayKind::Splice,
        }
    }
}

/// Relay until both directions have closed. On error, partial byte counts are still returned
/// alongside the error through `counted`.
pub async fn relay(
    kind: RelayKind,
    client: TcpStream,
    upstream: TcpStream,
    counted: &(AtomicU64, AtomicU64),
) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match kind {
        RelayKind::Splice => {
            let up = splice_dir(&client, &upstream, &counted.0);
            let down = splice_dir(&upstream, &client, &counted.1);
            tokio::try_join!(up, down).map(|_| ())
        }
        RelayKind::Copy => {
            let (mut c, mut u) = (client, upstream);
            let r = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            if let Ok((a, b)) = r {
                counted.0.store(a, Ordering::Relaxed);
                counted.1.store(b, Ordering::Relaxed);
            }
            r.map(|_| ())
        }
    }
}

/// One direction: socket -> pipe -> socket, waiting on readiness in between.
async fn splice_dir(src: &TcpStream, dst: &TcpStream, count: &AtomicU64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let (pr, pw) = sys::pipe()?;
    loop {
        let n = src
            .async_io(Interest::READABLE, || {
                sys::splice(src.as_raw_fd(), pw.as_raw_fd(), CHUNK)
            })
            .await?;
        if n == 0 {
            // EOF from src: pass the half-close on.
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = dst
                .async_io(Interest::WRITABLE, || {
                    sys::splice(pr.as_raw_fd(), dst.as_raw_fd(), left)
                })
                .await?;
            left -= m;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        (a, b)
    }

    async fn round_trip(kind: RelayKind) {
        // client <-> [c_side relay u_side] <-> server
        let (mut client, c_side) = pair().await;
        let (u_side, mut server) = pair().await;
        let counted = std::sync::Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let cc = counted.clone();
        let relay_task = tokio::spawn(async move { relay(kind, c_side, u_side, &cc).await });
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&p2).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server read");
        assert_eq!(got, payload);
        server.write_all(b"bye").await.expect("server write");
        server.shutdown().await.expect("server shutdown");
        assert_eq!(writer.await.expect("join"), b"bye");
        relay_task.await.expect("join").expect("relay ok");
        assert_eq!(counted.0.load(Ordering::Relaxed), payload.len() as u64);
        assert_eq!(counted.1.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn splice_relays_both_ways_with_half_close() {
        round_trip(RelayKind::Splice).await;
    }

    #[tokio::test]
    async fn copy_relays_both_ways_with_half_close() {
        round_trip(RelayKind::Copy).await;
    }
}
