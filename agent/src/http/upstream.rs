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
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{body::Incoming, client::conn, header, Request, Response, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::AnyBody;
use crate::{
    lock,
    session::{
        kept::{KeptConn, KeptKey},
        DataPathError, SessionCx,
    },
    tls::{Conn, UpstreamTlsError},
};

/// Idle HTTP/1.1 connections kept per session.
const IDLE_H1: usize = 8;
/// How long a connection left idle by an ended session is kept for the next one.
const SHARED_IDLE: Duration = Duration::from_secs(30);

/// Which sessions may take over a connection: see the module documentation.
#[derive(Clone)]
pub struct PoolKey {
    /// The session thread (the connection's task runs on its runtime).
    thread: Option<usize>,
    identity: Option<String>,
    target: String,
    addr: SocketAddr,
    /// The client configuration (compared by identity: it is kept alive by the key, so its
    /// address is never another configuration's) and the name verified.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl PartialEq for PoolKey {
    fn eq(&self, o: &PoolKey) -> bool {
        self.thread == o.thread
            && self.identity == o.identity
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
        self.thread.hash(h);
        self.identity.hash(h);
        self.target.hash(h);
        self.addr.hash(h);
        if let Some((cfg, name)) = &self.tls {
            Arc::as_ptr(cfg).hash(h);
            name.hash(h);
        }
    }
}

impl KeptKey for PoolKey {
    const IDLE: Duration = SHARED_IDLE;
    const PER_KEY: usize = IDLE_H1;
    fn target(&self) -> &str {
        &self.target
    }
}

/// A connection an ended session left.
pub enum Idle {
    H1(conn::http1::SendRequest<AnyBody>),
    H2(conn::http2::SendRequest<AnyBody>),
}

impl KeptConn for Idle {
    fn is_open(&self) -> bool {
        match self {
            Idle::H1(s) => !s.is_closed(),
            Idle::H2(s) => !s.is_closed(),
        }
    }
}

/// The connections ended sessions left, owned by the handler: a reload drops a changed
/// target's, shutdown all.
pub type Kept = crate::session::kept::Kept<PoolKey, Idle>;

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
                thread: crate::plane::current(),
                identity: cx.identity.clone(),
                target: cx.target.name.clone(),
                addr: cx.orig_dst,
                tls: tls.clone(),
            };
            (kept, key)
        });
        // A connection a previous session of this identity left (one: a session that needs
        // more opens them).
        let (h2, h1) = match kept.as_ref().and_then(|(kept, key)| kept.take(key)) {
            Some(Idle::H2(s)) => (Some(s), Vec::new()),
            Some(Idle::H1(s)) => (None, vec![s]),
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
    /// documentation); closed ones, and those past [`IDLE_H1`], are dropped.
    fn drop(&mut self) {
        let Some((kept, key)) = self.kept.take() else {
            return;
        };
        let h2 = lock(&self.h2).take().map(Idle::H2);
        // Not only the ready ones: a connection whose last response ended in this very poll
        // has not been told yet; one still busy later is skipped when taken (see `sender`).
        let h1 = std::mem::take(&mut *lock(&self.h1))
            .into_iter()
            .map(Idle::H1);
        for c in h2.into_iter().chain(h1) {
            // Refused (closed, or enough kept): dropped, which closes it.
            let _ = kept.put(key.clone(), c);
        }
    }
}
