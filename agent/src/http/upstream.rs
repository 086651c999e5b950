//! The agent's own connections to an HTTP target: TLS with rustls (ALPN h2, http/1.1) for
//! `https` and `kubernetes`, plaintext for `http`; HTTP/2 multiplexed on one connection when
//! the server negotiates it, otherwise a small pool of idle HTTP/1.1 connections.
//!
//! When a bot's connection ends, its idle upstream connections are kept for the next
//! connection of the **same identity** to the same target, address and TLS settings (on the
//! same session thread), for [`SHARED_IDLE`]: a bot that runs `curl` once per call then
//! costs no upstream TCP and TLS handshake per call. Never across identities: an upstream
//! that binds authentication to its connection (NTLM, or a bot's own `Authorization` on a
//! target without a credential) cannot lend one bot's login to another.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::{body::Incoming, client::conn, header, Request, Response, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::AnyBody;
use crate::{
    lock,
    session::{DataPathError, SessionCx},
    tls::{Conn, UpstreamTlsError},
};

/// Idle HTTP/1.1 connections kept per session.
const IDLE_H1: usize = 8;
/// How long a connection left idle by an ended session is kept for the next one.
const SHARED_IDLE: Duration = Duration::from_secs(30);

/// Which sessions may take over a connection: see the module documentation.
#[derive(Clone)]
struct PoolKey {
    identity: Option<String>,
    target: String,
    addr: SocketAddr,
    /// The client configuration (compared by identity: it is kept alive by the key, so its
    /// address is never another configuration's) and the name verified.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl PartialEq for PoolKey {
    fn eq(&self, o: &PoolKey) -> bool {
        self.identity == o.identity
            && self.target == o.target
            && self.addr == o.addr
            && match (&self.tls, &o.tls) {
                (None, None) => true,
                (Some((a, n)), Some((b, m))) => Arc::ptr_eq(a, b) && n == m,
                _ => false,
            }
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.identity.hash(h);
        self.target.hash(h);
        self.addr.hash(h);
        if let Some((cfg, name)) = &self.tls {
            Arc::as_ptr(cfg).hash(h);
            name.hash(h);
        }
    }
}

/// Connections left idle by an ended session.
#[derive(Default)]
struct Shared {
    h2: Option<conn::http2::SendRequest<AnyBody>>,
    h1: Vec<conn::http1::SendRequest<AnyBody>>,
    since: Option<Instant>,
}

/// The connections ended sessions left, per session thread (their connection tasks run on
/// that thread's runtime, so a session only takes those of its own thread) and [`PoolKey`].
/// Owned by the handler: a reload closes a changed target's, shutdown all.
#[derive(Default)]
pub struct Kept(Mutex<HashMap<(Option<usize>, PoolKey), Shared>>);

impl Kept {
    /// The connections kept for `key` on this thread (expired ones are dropped first).
    fn take(&self, key: &PoolKey) -> Option<Shared> {
        let mut kept = lock(&self.0);
        let now = Instant::now();
        kept.retain(|_, k| k.since.is_some_and(|t| now - t < SHARED_IDLE));
        kept.remove(&(crate::plane::current(), key.clone()))
    }

    fn put(
        &self,
        key: PoolKey,
        h2: Option<conn::http2::SendRequest<AnyBody>>,
        h1: Vec<conn::http1::SendRequest<AnyBody>>,
    ) {
        let mut kept = lock(&self.0);
        let k = kept.entry((crate::plane::current(), key)).or_default();
        if h2.is_some() {
            k.h2 = h2;
        }
        k.h1.extend(h1);
        k.h1.truncate(IDLE_H1);
        k.since = Some(Instant::now());
    }

    /// Drop (so close) the connections of the targets `changed` names; how many.
    pub fn remove_targets(&self, changed: impl Fn(&str) -> bool) -> usize {
        let mut kept = lock(&self.0);
        let before = kept.len();
        kept.retain(|(_, key), _| !changed(&key.target));
        before - kept.len()
    }
}

/// Why a request could not be sent upstream. Safe to show the bot.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection failed.
    #[error("{0}")]
    Connect(#[from] DataPathError),
    /// The target's TLS settings cannot be used, or the handshake failed.
    #[error("{0}")]
    Tls(#[from] UpstreamTlsError),
    /// The HTTP exchange failed.
    #[error("the upstream HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be rebuilt for the upstream.
    #[error("the request cannot be sent upstream: {0}")]
    Request(String),
}

enum Sender {
    H1(conn::http1::SendRequest<AnyBody>),
    H2(conn::http2::SendRequest<AnyBody>),
}

/// One session's upstream connections.
pub struct Upstream<'a> {
    cx: &'a SessionCx,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// The same TLS settings offering only http/1.1: for upgrades (WebSocket), which HTTP/2
    /// cannot carry here.
    tls_h1: Option<Arc<ClientConfig>>,
    h2: Mutex<Option<conn::http2::SendRequest<AnyBody>>>,
    h1: Mutex<Vec<conn::http1::SendRequest<AnyBody>>>,
    /// Where this session's idle connections go when it ends (None: the target says
    /// `pool = false`).
    kept: Option<(&'a Kept, PoolKey)>,
}

impl<'a> Upstream<'a> {
    /// `tls`: the client configuration and the name to verify, for `https`/`kubernetes`.
    pub fn new(
        cx: &'a SessionCx,
        tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
        tls_h1: Option<Arc<ClientConfig>>,
        kept: &'a Kept,
    ) -> Upstream<'a> {
        let kept = cx.target.pool.then(|| {
            let key = PoolKey {
                identity: cx.identity.clone(),
                target: cx.target.name.clone(),
                addr: cx.orig_dst,
                tls: tls.clone(),
            };
            (kept, key)
        });
        // The connections a previous session of this identity left (HTTP/2 is shared by
        // every session that takes it; HTTP/1.1 ones are handed over).
        let (h2, h1) = match kept.as_ref().and_then(|(kept, key)| kept.take(key)) {
            Some(k) => (k.h2.filter(|s| !s.is_closed()), k.h1),
            None => (None, Vec::new()),
        };
        Upstream {
            cx,
            tls,
            tls_h1,
            h2: Mutex::new(h2),
            h1: Mutex::new(h1),
            kept,
        }
    }

    /// Send `req` (origin-form URI: path and query) for `authority` (the bot's Host).
    pub async fn send(
        &self,
        mut req: Request<AnyBody>,
        authority: &header::HeaderValue,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match self.sender().await? {
            Sender::H2(mut s) => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let pq = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                *req.uri_mut() = Uri::builder()
                    .scheme(scheme)
                    .authority(authority.as_bytes())
                    .path_and_query(pq)
                    .build()
                    .map_err(|e| UpstreamError::Request(e.to_string()))?;
                *req.version_mut() = Version::HTTP_2;
                req.headers_mut().remove(header::HOST);
                Ok(s.send_request(req).await?)
            }
            Sender::H1(mut s) => {
                *req.version_mut() = Version::HTTP_11;
                if !req.headers().contains_key(header::HOST) {
                    req.headers_mut().insert(header::HOST, authority.clone());
                }
                let r = s.send_request(req).await;
                // Back to the pool: it is ready again once this response's body has been
                // read; one still busy when taken is dropped (see `sender`).
                let mut idle = lock(&self.h1);
                if idle.len() < IDLE_H1 {
                    idle.push(s);
                }
                Ok(r?)
            }
        }
    }

    /// Send an upgrade request (WebSocket) on a connection of its own, HTTP/1.1 only; the
    /// connection is driven with upgrades, so a 101 hands the socket over.
    pub async fn send_upgrade(
        &self,
        mut req: Request<AnyBody>,
        authority: &header::HeaderValue,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let tcp = self.cx.connect_upstream().await?;
        let io = match (&self.tls, &self.tls_h1) {
            (Some((_, name)), Some(cfg)) => {
                let tls = TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(UpstreamTlsError::Handshake)?;
                Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(tls)))
            }
            _ => Conn::Plain(tcp),
        };
        let (mut s, c) = conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = c.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, authority.clone());
        }
        Ok(s.send_request(req).await?)
    }

    async fn sender(&self) -> Result<Sender, UpstreamError> {
        if let Some(s) = lock(&self.h2).clone() {
            if !s.is_closed() {
                return Ok(Sender::H2(s));
            }
        }
        loop {
            let Some(mut s) = lock(&self.h1).pop() else {
                break;
            };
            // An idle connection is ready at once (no timer then); give one that is finishing
            // a response a moment before opening another.
            if s.is_ready()
                || !s.is_closed()
                    && tokio::time::timeout(std::time::Duration::from_millis(5), s.ready())
                        .await
                        .is_ok_and(|r| r.is_ok())
            {
                return Ok(Sender::H1(s));
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Sender, UpstreamError> {
        let tcp = self.cx.connect_upstream().await?;
        let (io, h2) = match &self.tls {
            Some((cfg, name)) => {
                let tls = TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(UpstreamTlsError::Handshake)?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                (
                    Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))),
                    h2,
                )
            }
            None => (Conn::Plain(tcp), false),
        };
        if h2 {
            let (s, c) = conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
            tokio::spawn(async move {
                if let Err(e) = c.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            *lock(&self.h2) = Some(s.clone());
            Ok(Sender::H2(s))
        } else {
            let (s, c) = conn::http1::handshake(TokioIo::new(io)).await?;
            tokio::spawn(async move {
                if let Err(e) = c.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Sender::H1(s))
        }
    }
}

impl Drop for Upstream<'_> {
    /// Keep the session's idle connections for the identity's next session (see the module
    /// documentation); closed ones are dropped.
    fn drop(&mut self) {
        let Some((kept, key)) = self.kept.take() else {
            return;
        };
        let h2 = lock(&self.h2).take().filter(|s| !s.is_closed());
        let h1: Vec<_> = std::mem::take(&mut *lock(&self.h1))
            .into_iter()
            // Not `is_ready`: a connection whose last response ended in this very poll has
            // not been told yet; one still busy later is skipped when taken (see `sender`).
            .filter(|s| !s.is_closed())
            .collect();
        if h2.is_some() || !h1.is_empty() {
            kept.put(key, h2, h1);
        }
    }
}
