//! The PostgreSQL protocol handler: terminate the bot's session, log in upstream with the
//! target's credential, decide every statement, mask results, record the session.
//!
//! Denials keep the server's own semantics: a denied simple Query or Parse is *replaced* by a
//! statement that fails during parse analysis (`SELECT '<marker>'::pg_catalog.int4`), so the
//! server itself produces the error at the right place in the stream, aborts an open
//! transaction, and skips the rest of an extended-protocol batch until Sync, exactly as for a
//! real error. On the way back, that error is rewritten into tollgate's 42501 message. Nothing
//! of a denied message reaches the server.
//!
//! Masking works from RowDescription: column rules need the table and column behind a result
//! column, which come from the server catalog (`catalog.rs`), and detectors look at every
//! text-like value. Values are re-encoded in DataRow; nothing is buffered beyond one message.
//! COPY ... TO STDOUT is planned when it is decided (`copy.rs`) and its CopyData rows are
//! masked field by field; what cannot be masked is denied, or withheld mid-stream with a 42501.

use crate::{lock, obj};
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tollgate_policy::{Action, Decision, IdentityOidc, Protocol};

use crate::{
    audit::Line,
    mask::{Masked, Masker},
    oidc,
    pg::{
        catalog::{self, Catalog},
        classify::{self, ClassifyCache, Statement},
        copy::{self, CopyMasker, CopyPlan},
        functions::{self, Functions},
        pool, scram, startup, upstream, verdict,
        wire::{self, ErrorReport, Frontend, Startup, TransactionStatus},
    },
    recording::Recorder,
    relay::Totals,
    session::{
        workload::WorkloadAuth as Checked, ApprovalOutcome, BoxFuture, DataPathError, Generation,
        InternalError, ProtocolHandler, Refusal as ConnRefusal, SessionCx, Withdrawn,
    },
    tls::{self, Ca, Conn, ReadHalf, WriteHalf},
};

/// What a CancelRequest with one of our keys reaches: the session's upstream backend (address
/// and key), and the session's held operation if one is waiting for approval.
#[derive(Clone)]
struct CancelTarget {
    addr: std::net::SocketAddr,
    upstream: Option<(i32, i32)>,
    held: Arc<HeldCancel>,
}

/// Set while a session holds an operation for approval; a CancelRequest then withdraws the
/// request (the server has nothing to cancel: the statement never reached it).
#[derive(Default)]
struct HeldCancel {
    holding: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

/// Our cancel keys -> where a cancel goes.
type CancelMap = HashMap<(i32, i32), CancelTarget>;

/// Removes a session's cancel key when the session ends.
struct CancelKeyGuard<'a>(&'a Mutex<CancelMap>, (i32, i32));
impl Drop for CancelKeyGuard<'_> {
    fn drop(&mut self) {
        lock(self.0).remove(&self.1);
    }
}

/// The PostgreSQL handler, built once (`handlers.rs`): what its sessions share lives here,
/// not in statics.
pub struct PgHandler {
    /// Statement classifications shared by all sessions (keyed by normalised statement).
    classify: ClassifyCache,
    /// Our cancel keys, for CancelRequests that arrive on connections of their own.
    cancel_keys: Mutex<CancelMap>,
    /// Logged-in upstream connections kept for reuse (`pool.rs`).
    pool: pool::Pool,
    /// SCRAM salted passwords already derived, for upstream logins (`scram.rs`).
    salted: scram::SaltedPasswords,
    /// Masking catalog snapshots per (target, database).
    catalogs: catalog::Snapshots<Catalog>,
    /// Function catalog snapshots per (target, database).
    functions: catalog::Snapshots<Functions>,
    /// `tollgate_pg_upstream_connections_total{target, connection}`.
    upstream_conns: prometheus::IntCounterVec,
    /// `tollgate_pg_pool_idle_connections` (the pool counts in it).
    pool_idle: prometheus::IntGauge,
}

impl Default for PgHandler {
    fn default() -> Self {
        PgHandler::new()
    }
}

impl PgHandler {
    pub fn new() -> PgHandler {
        use crate::metrics::must;
        let upstream_conns = must(prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "tollgate_pg_upstream_connections_total",
                "Upstream connections PostgreSQL sessions started on, by target and whether the connection was new (connect and login) or reused from the pool.",
            ),
            &["target", "connection"],
        ));
        let pool_idle = must(prometheus::IntGauge::new(
            "tollgate_pg_pool_idle_connections",
            "Logged-in PostgreSQL upstream connections kept idle for reuse.",
        ));
        PgHandler {
            classify: ClassifyCache::new(4096),
            cancel_keys: Mutex::new(HashMap::new()),
            pool: pool::Pool::new(pool_idle.clone()),
            salted: Default::default(),
            catalogs: Default::default(),
            functions: Default::default(),
            upstream_conns,
            pool_idle,
        }
    }
}

impl ProtocolHandler for PgHandler {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }
    fn inspects(&self) -> bool {
        true
    }
    fn serve<'a>(
        &'a self,
        cx: &'a SessionCx,
        client: TcpStream,
    ) -> BoxFuture<'a, Result<Totals, DataPathError>> {
        Box::pin(serve(self, cx, client))
    }
    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        why: ConnRefusal,
        message: &'a str,
    ) -> BoxFuture<'a, ()> {
        // 28000: invalid authorization; 53100 (disk_full): the audit log cannot be written.
        let code = match why {
            ConnRefusal::Denied => "28000",
            ConnRefusal::AuditUnwritable => "53100",
        };
        Box::pin(refuse(client, code, message))
    }
    fn on_reload(&self, old: &Generation, new: &tollgate_policy::Policy) {
        // Idle upstream connections of a target the new policy changed, removed or stopped
        // pooling would otherwise serve sessions for up to a minute.
        let closed = self
            .pool
            .close_targets(|name| crate::session::target_changed(&old.policy, new, name));
        if closed > 0 {
            tracing::info!(
                closed,
                "closed idle upstream connections of changed targets"
            );
        }
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Kept upstream connections: say goodbye to the servers rather than vanish.
            self.pool.close_all();
            let until = std::time::Instant::now() + Duration::from_millis(500);
            while self.pool.kept() > 0 && std::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }
    fn register_metrics(&self, registry: &prometheus::Registry) {
        for c in [
            Box::new(self.upstream_conns.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(self.pool_idle.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::warn!(error = %e, "PostgreSQL metrics not registered");
            }
        }
    }
}

/// Refuse a PostgreSQL client before anything reaches the server: answer an SSLRequest or
/// GSSENCRequest with `N`, read its startup message (bounded, 2 s), then send a FATAL with
/// SQLSTATE `code` and `message` and close.
async fn refuse(mut stream: TcpStream, code: &str, message: &str) {
    const SSL_REQUEST: u32 = 80_877_103;
    const GSSENC_REQUEST: u32 = 80_877_104;
    let read_startup = async {
        let mut head = [0u8; 8];
        loop {
            stream.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            if len == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST) {
                stream.write_all(b"N").await?;
                continue;
            }
            let rest = (len as usize).saturating_sub(8).min(10_000);
            let mut sink = vec![0u8; rest];
            stream.read_exact(&mut sink).await?;
            return Ok::<(), std::io::Error>(());
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read_startup).await;
    let mut out = bytes::BytesMut::new();
    wire::encode_error_response(&wire::ErrorReport::fatal(code, message), &mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

/// Bytes counted in both directions.
#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
}

async fn send_fatal<W: AsyncWrite + Unpin>(
    client: &mut W,
    code: &str,
    message: &str,
    hint: Option<&str>,
) {
    let mut out = BytesMut::new();
    let mut r = ErrorReport::fatal(code, message);
    if let Some(h) = hint {
        r = r.with_hint(h);
    }
    wire::encode_error_response(&r, &mut out);
    let _ = client.write_all(&out).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// How long a client may take to send its startup packet (and finish a TLS handshake).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the workload token check decided.
enum WorkloadAuth {
    /// The token verified and matched `require_claims`.
    Verified(oidc::Claims),
    /// Observe mode: the check failed, was audited, and is not enforced.
    Unverified,
    /// The bot was told why and the session ends.
    Refused,
}

/// Workload OIDC (`oidc = {...}` on the identity): ask the bot for a password with
/// AuthenticationCleartextPassword, and verify the JWT it sends (issuer, audience, signature,
/// expiry, then `require_claims`). The token is consumed here: it never goes upstream, and is
/// never logged, audited or recorded (only the outcome and the token's `sub` are).
///
/// The outcome is audited as an `auth` event; a refused bot got a FATAL 28P01 (08006 when the
/// provider is unreachable). In observe mode a failed check is audited (`enforced = false`)
/// and the session goes on without claims.
///
/// Cleartext is what carries a bearer token in PostgreSQL's protocol. The bot's leg is
/// loopback, or TLS when the bot asks for it (see `tls.rs`).
async fn workload_token(
    cx: &SessionCx,
    client: &mut Conn,
    buf: &mut BytesMut,
    o: &IdentityOidc,
) -> Result<WorkloadAuth, DataPathError> {
    let mut out = BytesMut::new();
    wire::encode_authentication_cleartext_password(&mut out);
    client
        .write_all(&out)
        .await
        .map_err(DataPathError::Client)?;
    client.flush().await.map_err(DataPathError::Client)?;
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    let password = loop {
        match wire::parse_frontend(buf) {
            Ok(Some((Frontend::Password(body), _))) => break body,
            Ok(Some((other, _))) => {
                let msg = format!(
                    "tollgate: expected a password message, got {}",
                    other.name()
                );
                send_fatal(client, "08P01", &msg, None).await;
                return Err(DataPathError::Client(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    msg,
                )));
            }
            Ok(None) => match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
                Ok(Ok(0)) => {
                    // libpq with no password closes here ("fe_sendauth: no password supplied").
                    cx.audit_event(
                        "auth",
                        obj(json!({"method": "oidc", "outcome": "denied",
                                   "reason": "the bot sent no token (closed the connection)"})),
                    );
                    return Ok(WorkloadAuth::Refused);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(DataPathError::Client(e)),
                Err(_) => return Err(DataPathError::Client(std::io::ErrorKind::TimedOut.into())),
            },
            Err(e) => {
                let msg = format!("tollgate: invalid password message: {e}");
                send_fatal(client, "08P01", &msg, None).await;
                return Err(DataPathError::Client(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    msg,
                )));
            }
        }
    };
    // A PasswordMessage body is one NUL-terminated string.
    let token = password.strip_suffix(b"\0").unwrap_or(&password);
    let token = std::str::from_utf8(token).unwrap_or("").trim();
    match cx.check_workload_token(o, token).await {
        Checked::Verified(c) => Ok(WorkloadAuth::Verified(c)),
        Checked::Unverified => Ok(WorkloadAuth::Unverified),
        Checked::Refused(e) => {
            let (code, hint) = if e.is_unavailable() {
                (
                    "08006",
                    "the identity provider could not be reached; try again",
                )
            } else {
                (
                    "28P01",
                    "this identity must send a client_credentials JWT from its OIDC provider as the password",
                )
            };
            let msg = format!(
                "tollgate: workload token rejected for identity {}: {e}",
                cx.identity.as_deref().unwrap_or("(unknown)")
            );
            send_fatal(client, code, &msg, Some(hint)).await;
            Ok(WorkloadAuth::Refused)
        }
    }
}

/// Secure a new upstream connection as the target's `tls` says (the name to verify is the
/// configured one, else the host the bot dialled, else the IP): logins and cancels alike.
async fn secure_upstream(cx: &SessionCx, up: TcpStream) -> Result<Conn, upstream::LoginError> {
    let tls = &cx.target.tls;
    let name = tls::server_name(tls, cx.dialled_host().as_deref(), cx.orig_dst.ip())?;
    upstream::negotiate_tls(up, tls, name).await
}

/// Read the startup packet: answer GSSENCRequest with 'N' and SSLRequest with 'S' and a TLS
/// handshake when the agent has a CA (else 'N'); a client that opens with a TLS ClientHello
/// (`sslnegotiation=direct`) gets TLS at once. Returns the (possibly encrypted) stream.
async fn read_startup(
    cx: &SessionCx,
    tcp: TcpStream,
    buf: &mut BytesMut,
) -> Result<(Conn, Startup), DataPathError> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    let timed_out = || DataPathError::Client(std::io::ErrorKind::TimedOut.into());
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(0)) => {
            return Err(DataPathError::Client(
                std::io::ErrorKind::UnexpectedEof.into(),
            ))
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(DataPathError::Client(e)),
        Err(_) => return Err(timed_out()),
    }
    let mut client = if first[0] == wire::TLS_HANDSHAKE {
        match &cx.agent.ca {
            Some(ca) => accept_tls(ca, cx, tcp, deadline).await?,
            // A TLS client cannot read a plaintext error: just close.
            None => {
                return Err(DataPathError::Client(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "client started TLS directly, and bot-side TLS is not available",
                )))
            }
        }
    } else {
        Conn::Plain(tcp)
    };
    loop {
        match wire::parse_startup(buf) {
            Ok(Some(Startup::Ssl)) if !client.is_tls() && cx.agent.ca.is_some() => {
                if !buf.is_empty() {
                    // Bytes sent after SSLRequest but before the handshake could be injected
                    // by anyone on the path (CVE-2021-23214): refuse, as PostgreSQL does.
                    let msg = "tollgate: received unencrypted data after SSL request";
                    send_fatal(&mut client, "08P01", msg, None).await;
                    return Err(DataPathError::Client(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        msg,
                    )));
                }
                client
                    .write_all(&[wire::SSL_ACCEPTED])
                    .await
                    .map_err(DataPathError::Client)?;
                let (Conn::Plain(tcp), Some(ca)) = (client, &cx.agent.ca) else {
                    return Err(InternalError::unreachable("TLS requested twice"));
                };
                client = accept_tls(ca, cx, tcp, deadline).await?;
            }
            Ok(Some(Startup::Ssl)) | Ok(Some(Startup::GssEnc)) => {
                client
                    .write_all(&[wire::ENCRYPTION_REFUSED])
                    .await
                    .map_err(DataPathError::Client)?;
                client.flush().await.map_err(DataPathError::Client)?;
            }
            Ok(Some(s)) => return Ok((client, s)),
            Ok(None) => match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
                Ok(Ok(0)) => {
                    return Err(DataPathError::Client(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(DataPathError::Client(e)),
                Err(_) => return Err(timed_out()),
            },
            Err(e) => {
                let msg = format!("tollgate: invalid startup packet: {e}");
                send_fatal(&mut client, "08P01", &msg, None).await;
                return Err(DataPathError::Client(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    msg,
                )));
            }
        }
    }
}

/// TLS handshake with a bot, presenting a leaf for the name it asked for and the IP it dialled.
async fn accept_tls(
    ca: &Arc<Ca>,
    cx: &SessionCx,
    tcp: TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Conn, DataPathError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(
        ca.server_config(cx.orig_dst.ip(), &tls::ServerTls::postgres()),
    );
    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))),
        Ok(Err(e)) => Err(DataPathError::Client(std::io::Error::new(
            e.kind(),
            format!("TLS handshake with the bot failed: {e}"),
        ))),
        Err(_) => Err(DataPathError::Client(std::io::ErrorKind::TimedOut.into())),
    }
}

/// The startup phase: TLS if asked, the startup packet; a CancelRequest is forwarded here
/// and a replication connection refused (`None`: nothing more to serve).
async fn startup(
    h: &PgHandler,
    cx: &SessionCx,
    tcp: TcpStream,
    cbuf: &mut BytesMut,
) -> Result<Option<(Conn, Vec<(String, String)>)>, DataPathError> {
    // As PostgreSQL and libpq do: every write is a whole protocol exchange, and Nagle would
    // hold a result behind the delayed ACK of an earlier small write (an approval notice).
    let _ = tcp.set_nodelay(true);
    let (mut client, startup) = read_startup(cx, tcp, cbuf).await?;
    let params = match startup {
        Startup::Cancel { pid, secret } => {
            // A cancel for one of our sessions: forward it with the upstream backend's key.
            let found = lock(&h.cancel_keys).get(&(pid, secret)).cloned();
            if let Some(t) = found.filter(|t| t.addr == cx.orig_dst) {
                if t.held.holding.load(Ordering::SeqCst) {
                    t.held.notify.notify_waiters();
                } else if let Some(key) = t.upstream {
                    let up = cx.connect_upstream().await?;
                    let sent = match secure_upstream(cx, up).await {
                        Ok(conn) => upstream::cancel(conn, key).await.map_err(Into::into),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "cancel request not forwarded");
                    }
                }
            }
            // An orderly end (TLS close_notify): libpq 17 reports an encrypted cancel whose
            // connection ends without one as failed.
            let _ = client.shutdown().await;
            return Ok(None);
        }
        s @ Startup::Startup { .. } => {
            if s.needs_negotiation() {
                // Protocol 3.x newer than 3.0 or `_pq_.` options: answer as PostgreSQL does and
                // carry on in 3.0 (options are never forwarded upstream).
                let opts = s.protocol_options();
                let mut out = BytesMut::new();
                wire::encode_negotiate_protocol_version(&opts, &mut out)
                    .map_err(InternalError::encode)?;
                client
                    .write_all(&out)
                    .await
                    .map_err(DataPathError::Client)?;
            }
            let Startup::Startup { params, .. } = s else {
                return Err(InternalError::unreachable("startup"));
            };
            if params.iter().any(|(k, v)| {
                k == "replication" && !matches!(v.as_str(), "false" | "off" | "no" | "0")
            }) {
                send_fatal(
                    &mut client,
                    "42501",
                    "tollgate: replication connections are not allowed through tollgate",
                    None,
                )
                .await;
                return Ok(None);
            }
            params
        }
        // read_startup answers SSL/GSS requests itself and never returns them.
        Startup::Ssl | Startup::GssEnc => {
            return Err(InternalError::unreachable("unexpected encryption request"))
        }
    };
    Ok(Some((client, params)))
}

/// What the login phase leaves for the session.
struct LoggedIn {
    session: upstream::Session,
    /// The pool key and login ParameterStatus messages, if the connection may be kept.
    keep: Option<(pool::Key, Bytes)>,
    /// Whether the connection came from the pool.
    reused: bool,
    /// The upstream user, the user the client asked for, and the database.
    user: String,
    client_user: String,
    database: String,
    /// The verified workload token's claims, if the identity presented one.
    workload: Option<oidc::Claims>,
    /// The parameters sent upstream.
    pass: Vec<(String, String)>,
}

/// The login phase: the workload token, the startup settings, the credential, then an
/// upstream connection from the pool or a fresh login (`None`: the client was refused).
async fn login(
    h: &PgHandler,
    cx: &SessionCx,
    client: &mut Conn,
    cbuf: &mut BytesMut,
    policy: &tollgate_policy::Policy,
    params: &[(String, String)],
) -> Result<Option<LoggedIn>, DataPathError> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let client_user = param("user").unwrap_or_default();
    let database = param("database").unwrap_or_else(|| client_user.clone());
    // Workload OIDC: the identity (already attributed from kernel facts) must also present a
    // valid token as its password, before anything reaches upstream.
    let workload_oidc = cx
        .identity
        .as_deref()
        .and_then(|n| policy.identity(n))
        .and_then(|i| i.oidc.clone());
    let workload = match workload_oidc {
        Some(o) => match workload_token(cx, client, cbuf, &o).await? {
            WorkloadAuth::Verified(claims) => {
                let _ = cx.claims.set(oidc::claim_values(&claims));
                Some(claims)
            }
            WorkloadAuth::Unverified => None,
            WorkloadAuth::Refused => return Ok(None),
        },
        None => None,
    };
    // Startup parameters are settings like any SET (startup.rs): decided before anything
    // reaches upstream, and all of them audited.
    let settings = match startup_settings(cx, client, params).await {
        Some(s) => s,
        None => return Ok(None),
    };
    let cred_name = cx.target.credential.clone();
    let cred = cred_name
        .as_deref()
        .and_then(|n| policy.credentials.get(n).map(|c| (n, c)));
    let (user, secret) = match cred {
        Some((n, c)) => match upstream::read_secret(n, c) {
            Ok(s) => (c.user.clone().unwrap_or(client_user.clone()), s),
            Err(e) => {
                send_fatal(
                    client,
                    "28P01",
                    &format!("tollgate: {e}"),
                    Some("fix the credential in the tollgate policy"),
                )
                .await;
                return Err(DataPathError::Upstream {
                    addr: cx.orig_dst,
                    source: std::io::Error::other(e.to_string()),
                });
            }
        },
        None => (client_user.clone(), None),
    };
    // What the client asked for goes upstream, except identity-bearing keys and `options`,
    // whose (decided) settings go as parameters of their own.
    let pass: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "user" && k != "options" && !k.starts_with("_pq_."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain(
            settings
                .into_iter()
                .filter(|s| s.from_options)
                .map(|s| (s.name, s.value)),
        )
        .collect();
    // A connection left by an earlier session with the same upstream login, if any.
    let pool_key = cx.target.pool.then(|| {
        h.pool.key(
            cx.identity.as_deref().unwrap_or(""),
            cx.target.tls.mode != tollgate_policy::TlsMode::Disable,
            &cx.target.name,
            cx.orig_dst,
            &user,
            &pass,
            secret.as_deref(),
        )
    });
    let pooled = match pool_key {
        Some(k) => h.pool.take(k).await,
        None => None,
    };
    let reused = pooled.is_some();
    h.upstream_conns
        .with_label_values(&[
            cx.target.name.as_str(),
            if reused { "reused" } else { "new" },
        ])
        .inc();
    // The login's ParameterStatus messages, kept for the pool: shared by the sessions that
    // reuse one connection, copied to its exact size after a fresh login.
    let reused_relay = pooled.as_ref().map(|idle| idle.relay.clone());
    let session = if let Some(idle) = pooled {
        upstream::Session {
            stream: idle.conn,
            backend_key: idle.backend_key,
            relay: BytesMut::from(&idle.relay[..]),
            status: b'I',
            rest: BytesMut::new(),
        }
    } else {
        let up = match cx.connect_upstream().await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                s
            }
            Err(e) => {
                send_fatal(
                    client,
                    "08006",
                    &format!(
                        "tollgate: cannot reach {} ({}): {e}",
                        cx.target.name, cx.orig_dst
                    ),
                    None,
                )
                .await;
                return Err(e);
            }
        };
        let cred_label = cred_name.clone().unwrap_or_else(|| "(none)".into());
        let login = match secure_upstream(cx, up).await {
            Ok(up) => {
                upstream::login(up, &user, &pass, &cred_label, secret.as_deref(), &h.salted).await
            }
            Err(e) => Err(e),
        };
        match login {
            Ok(s) => s,
            Err(e) => {
                let hint = e.blames_credential().then_some(
                    "the bot's own password is ignored; fix the credential in the tollgate policy",
                );
                send_fatal(client, e.sqlstate(), &format!("tollgate: {e}"), hint).await;
                return Err(DataPathError::Upstream {
                    addr: cx.orig_dst,
                    source: std::io::Error::other(e.to_string()),
                });
            }
        }
    };
    // What the pool needs to keep this connection for the next session.
    let keep = pool_key.map(|key| {
        let relay = reused_relay.unwrap_or_else(|| Bytes::copy_from_slice(&session.relay));
        (key, relay)
    });
    Ok(Some(LoggedIn {
        session,
        keep,
        reused,
        user,
        client_user,
        database,
        workload,
        pass,
    }))
}

/// The masking plan and the catalog snapshots the session's decisions need (from the
/// handler's snapshots or read on the new connection).
/// A catalog snapshot the session needs could not be read upstream: tell the client (FATAL
/// XX000 naming `what`) and end the session as an upstream failure.
async fn snapshot_failed(
    cx: &SessionCx,
    client: &mut Conn,
    what: &str,
    e: std::io::Error,
) -> DataPathError {
    send_fatal(
        client,
        "XX000",
        &format!("tollgate: cannot read the {what}: {e}"),
        None,
    )
    .await;
    DataPathError::Upstream {
        addr: cx.orig_dst,
        source: e,
    }
}

async fn snapshots(
    h: &PgHandler,
    cx: &SessionCx,
    client: &mut Conn,
    session: &mut upstream::Session,
    policy: &tollgate_policy::Policy,
    database: &str,
) -> Result<(Option<Arc<Masker>>, Arc<Catalog>, Arc<Functions>), DataPathError> {
    let masker = Masker::for_target(policy, &cx.target.name, cx.agent.hash_key).map(Arc::new);
    let catalog = match &masker {
        Some(m) if m.has_column_rules() => {
            match catalog::load(&h.catalogs, session, m, &cx.target.name, database).await {
                Ok(set) => set,
                Err(e) => {
                    return Err(snapshot_failed(cx, client, "catalog needed for masking", e).await)
                }
            }
        }
        _ => Arc::new(Catalog::default()),
    };

    // Which functions a rule may let run without naming them (functions.rs).
    let plain_functions = match functions::load(&h.functions, session, &cx.target.name, database)
        .await
    {
        Ok(f) => f,
        Err(e) => {
            return Err(snapshot_failed(cx, client, "function catalog needed for policy", e).await)
        }
    };
    Ok((masker, catalog, plain_functions))
}

async fn serve(h: &PgHandler, cx: &SessionCx, tcp: TcpStream) -> Result<Totals, DataPathError> {
    let mut cbuf = BytesMut::with_capacity(8192);
    let Some((mut client, params)) = startup(h, cx, tcp, &mut cbuf).await? else {
        return Ok(Totals::default());
    };
    let gen = cx.agent.gen.load_full();
    let policy = &gen.policy;
    let Some(mut logged) = login(h, cx, &mut client, &mut cbuf, policy, &params).await? else {
        return Ok(Totals::default());
    };
    let (masker, catalog, plain_functions) = snapshots(
        h,
        cx,
        &mut client,
        &mut logged.session,
        policy,
        &logged.database,
    )
    .await?;
    let recorder = cx.open_recorder();
    if let Some(r) = &recorder {
        r.write(start_event(cx, &logged, &params));
    }
    let held_cancel = Arc::new(HeldCancel::default());
    let our_key = cancel_key(h, cx, &logged.session, &held_cancel);
    let _cancel_guard = CancelKeyGuard(&h.cancel_keys, our_key);
    greet(&mut client, &logged.session, our_key).await?;
    let LoggedIn {
        mut session,
        keep,
        database,
        pass,
        ..
    } = logged;
    drop(pass);
    let backend_key = session.backend_key;

    let shared = Arc::new(Shared {
        denials: Mutex::new(VecDeque::new()),
        lexing: Mutex::new(Lexing {
            scs: login_escapes(&session.relay),
            settled: true,
        }),
        expect: Mutex::new(VecDeque::new()),
        unsafe_encoding: Mutex::new(unsafe_client_encoding(&session.relay)),
        refresh_queued: AtomicBool::new(false),
        notices: Mutex::new(VecDeque::new()),
        notice: tokio::sync::Notify::new(),
        refused: Mutex::new(Refused::default()),
        refused_new: AtomicBool::new(false),
        refused_some: AtomicBool::new(false),
        skipping: AtomicBool::new(false),
    });
    let counters = Counters::default();
    let (cr, cw) = client.into_split();
    let (ur, uw) = session.stream.into_split();
    let up_rest = std::mem::take(&mut session.rest);
    // The session lives long: keep nothing of the login phase.
    drop(session.relay);
    drop(params);
    let nonce = format!("tollgate-denied-{:016x}", rand::random::<u64>());
    let (release, released) = if keep.is_some() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let c2u = ClientSide {
        cx,
        h,
        shared: shared.clone(),
        nonce: nonce.clone(),
        prepared: HashMap::new(),
        last_classified: None,
        portals: HashMap::new(),
        statements: HashMap::new(),
        next_version: 0,
        next_refusal: 0,
        taint: false,
        resets: false,
        recorder: recorder.clone(),
        masker: masker.clone(),
        catalog: catalog.clone(),
        functions: plain_functions,
        copy_plans: Vec::new(),
        statement_copy: HashMap::new(),
        held_cancel,
        release,
        ddl_since_refresh: false,
        database,
        unknown_after_refresh: HashMap::new(),
        param_types: Vec::new(),
        stale_refusal: None,
        fast_key: String::new(),
        known: None,
    };
    let u2c = ServerSide {
        cx,
        shared: shared.clone(),
        nonce,
        masker,
        catalog,
        stmt_descs: HashMap::new(),
        portal_descs: HashMap::new(),
        current: None,
        last_desc: None,
        last_plan: None,
        recorder: recorder.clone(),
        masked_in_statement: 0,
        copy: None,
        copy_scratch: Vec::new(),
        row_scratch: Vec::new(),
        withhold: false,
        status: session.status,
        released,
        refreshing: None,
    };
    let r = tokio::try_join!(
        c2u.run(cr, uw, cbuf, &counters),
        u2c.run(ur, cw, up_rest, &counters)
    );
    let r = match r {
        // The client said goodbye without the Terminate being forwarded: the server's end may
        // serve the next session if nothing is in flight.
        Ok((Some(uw), Some((ur, rest, status)))) => {
            let quiet = rest.is_empty()
                && status == b'I'
                && lock(&shared.expect).is_empty()
                && lock(&shared.denials).is_empty();
            if let Some(conn) = Conn::reunite(ur, uw) {
                keep_or_end(h, cx, conn, keep.filter(|_| quiet), backend_key).await;
            }
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Some(rec) = &recorder {
        rec.write(obj(json!({"event": "end", "session": cx.id, "error": r.as_ref().err().map(|e| e.to_string())})));
    }
    let totals = Totals {
        bytes_up: counters.up.load(Ordering::Relaxed),
        bytes_down: counters.down.load(Ordering::Relaxed),
    };
    cx.add_bytes(totals);
    r.map(|_| totals)
}

/// The recording's start event: who logged in as whom, and what the client asked for
/// (startup parameters other than protocol options).
fn start_event(
    cx: &SessionCx,
    l: &LoggedIn,
    params: &[(String, String)],
) -> serde_json::Map<String, serde_json::Value> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    cx.start_event(json!({
        "database": l.database, "user": l.user, "client_user": l.client_user,
        "application_name": param("application_name"),
        "oidc_subject": l.workload.as_ref().map(|c| c.subject.clone()),
        "startup": params.iter().filter(|(k, _)| !k.starts_with("_pq_.")).map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "upstream_connection": if l.reused { "reused" } else { "new" },
    }))
}

/// Our own cancel key for the session: the backend's real process id (clients compare it with
/// NotificationResponse's sender and pg_backend_pid(), e.g. to skip their own notifications)
/// and a secret of our own, so a CancelRequest only works through us. Keys are (pid, secret)
/// pairs: the secret is redrawn on a clash.
fn cancel_key(
    h: &PgHandler,
    cx: &SessionCx,
    session: &upstream::Session,
    held: &Arc<HeldCancel>,
) -> (i32, i32) {
    let mut keys = lock(&h.cancel_keys);
    loop {
        let pid = session
            .backend_key
            .map_or_else(|| rand::random::<i32>() & 0x7fff_ffff, |k| k.0);
        let key = (pid, rand::random::<i32>());
        if let std::collections::hash_map::Entry::Vacant(e) = keys.entry(key) {
            e.insert(CancelTarget {
                addr: cx.orig_dst,
                upstream: session.backend_key,
                held: held.clone(),
            });
            return key;
        }
    }
}

/// Greet the client as the server would: AuthenticationOk, the server's ParameterStatus
/// messages, our cancel key, ReadyForQuery; one write.
async fn greet(
    client: &mut Conn,
    session: &upstream::Session,
    key: (i32, i32),
) -> Result<(), DataPathError> {
    let mut out = BytesMut::with_capacity(session.relay.len() + 64);
    wire::encode_authentication_ok(&mut out);
    out.extend_from_slice(&session.relay);
    wire::encode_backend_key_data(
        wire::BackendKeyData {
            pid: key.0,
            secret: key.1,
        },
        &mut out,
    );
    wire::encode_ready_for_query(
        TransactionStatus::from_byte(session.status).unwrap_or(TransactionStatus::Idle),
        &mut out,
    );
    client.write_all(&out).await.map_err(DataPathError::Client)
}

/// After the client left quietly: the upstream connection goes back to the pool (reset) when
/// it may be kept (`keep`), else it is ended politely.
async fn keep_or_end(
    h: &PgHandler,
    cx: &SessionCx,
    conn: Conn,
    keep: Option<(pool::Key, Bytes)>,
    backend_key: Option<(i32, i32)>,
) {
    match keep {
        Some((key, relay)) => {
            if let Some(conn) = pool::reset(conn).await {
                h.pool.put(
                    key,
                    &cx.target.name,
                    pool::Idle {
                        conn,
                        backend_key,
                        relay,
                    },
                );
            }
        }
        None => pool::terminate(conn).await,
    }
}

/// Decide the settings the client's startup parameters ask for (see `startup.rs`), after
/// auditing every parameter. `None`: refused (the client got a FATAL 42501 naming the setting).
async fn startup_settings(
    cx: &SessionCx,
    client: &mut Conn,
    params: &[(String, String)],
) -> Option<Vec<startup::Setting>> {
    let mut shown = serde_json::Map::new();
    for (k, v) in params.iter().filter(|(k, _)| !k.starts_with("_pq_.")) {
        shown.insert(k.clone(), json!(v));
    }
    cx.audit_event("startup", obj(json!({ "parameters": shown })));
    let gen = cx.policy();
    let refuse = |text: String, flag: &str| {
        let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
        cx.audit_operation(&gen, "set", &text, &d, Some(flag))
    };
    let settings = match startup::settings(params) {
        Ok(s) => s,
        Err(e) => {
            let options = params
                .iter()
                .find(|(k, _)| k == "options")
                .map_or("", |(_, v)| v.as_str());
            if refuse(format!("startup options: {options}"), "startup").action != Action::Allow {
                send_fatal(client, "42501", &format!("tollgate: {e}"), None).await;
                return None;
            }
            // Observe mode: the session goes on, without the options.
            return Some(Vec::new());
        }
    };
    for st in settings.iter().filter(|s| !s.is_safe()) {
        let text = format!("startup: SET {} = {}", st.name, st.value);
        let d = if st.is_never() {
            refuse(text, "startup_library")
        } else {
            let as_set = Statement {
                kind: "set",
                kinds: vec!["set"],
                tables: Vec::new(),
                functions: Vec::new(),
                operators: Vec::new(),
                casts: Vec::new(),
                redefines: false,
                dangerous: Vec::new(),
                read_only: false,
                text: text.clone(),
                prepared_name: None,
                literal_dependent: false,
                lineage: Default::default(),
            };
            let (d, _) = decide_statement(cx, &gen, &as_set);
            cx.audit_operation(&gen, "set", &text, &d, Some("startup"))
        };
        let why = match d.action {
            Action::Allow => continue,
            Action::Approve => "a startup setting cannot wait for approval; connect without it and SET it in the session".to_string(),
            Action::Deny if st.is_never() => format!("setting {} at startup loads code into the server, which tollgate never allows", st.name),
            Action::Deny => match &d.rule {
                Some(r) => format!("SET {} at startup denied by rule \"{r}\"", st.name),
                None => format!("SET {} at startup is not allowed for identity {} (no rule allows set)", st.name, cx.identity.as_deref().unwrap_or("unknown")),
            },
        };
        send_fatal(
            client,
            "42501",
            &format!("tollgate: {why}"),
            Some("startup parameters and options=-c name=value are decided like SET"),
        )
        .await;
        return None;
    }
    Some(settings)
}

/// State shared by the two directions.
struct Shared {
    /// The refusals the server will raise (as errors of the nonce statement), in order. The
    /// client side queues a refusal after the expectation of its message, so a ReadyForQuery
    /// that empties the expectations (which clears refusals the server skipped) never drops it.
    denials: Mutex<VecDeque<Refusal>>,
    /// How the server lexes backslashes, and whether that is certain (see [`Lexing`]).
    lexing: Mutex<Lexing>,
    /// What the server will answer, in order, for the result-shaping messages we forwarded.
    expect: Mutex<VecDeque<Expect>>,
    /// The session's client_encoding, if it is one whose multibyte characters can end in an
    /// ASCII byte (SJIS, BIG5, ...): the classifier reads UTF-8 and would misread quotes and
    /// backslashes, so every statement is refused until it is UTF-8 again.
    unsafe_encoding: Mutex<Option<String>>,
    /// An [`Expect::Refresh`] is queued: the server side looks for it only then, so the hot
    /// path pays one relaxed load per message.
    refresh_queued: AtomicBool,
    /// Messages the client side has for the client (approval notices, a final FATAL), which
    /// the server side writes between whole messages; `notice` wakes it. (A queue and a
    /// `Notify` rather than a channel, which allocates a block of slots per session.)
    notices: Mutex<VecDeque<Bytes>>,
    notice: tokio::sync::Notify,
    /// Statement versions whose Parse the server refused or skipped (see [`Refused`]).
    refused: Mutex<Refused>,
    /// `refused` has versions the client side has not applied yet: it looks only then.
    refused_new: AtomicBool,
    /// `refused` has versions (written by the server side only): it looks only then.
    refused_some: AtomicBool,
    /// The server is skipping every message up to the next Sync, after an error in an
    /// extended-protocol message: a simple Query or a FunctionCall sent meanwhile gets no
    /// answer. Written by the server side only: set before the expectations it skips are
    /// popped, cleared before the Sync's is, so a client side that finds the queue empty
    /// (under its lock) reads it right.
    skipping: AtomicBool,
}

/// Parses that did not take: the server answered an ErrorResponse to them or skipped them
/// (after an error, everything up to the Sync), so the name still means what it meant before
/// (a named statement that already existed keeps its old text; a skipped Parse of the unnamed
/// statement leaves the old one). The session's record of that version is wrong: it is
/// treated as unknown (its computed columns masked, no COPY plan). The server side records
/// them and reads them for the Executes already queued; the client side applies them to its
/// statements and portals before its next message. They are forgotten once both sides agree
/// and nothing is in flight.
#[derive(Default)]
struct Refused {
    versions: Vec<u64>,
    /// How many of `versions` the client side has applied.
    applied: usize,
}

impl Shared {
    /// Queue `msg` for the client (see [`Shared::notices`]).
    fn notify(&self, msg: Bytes) {
        lock(&self.notices).push_back(msg);
        self.notice.notify_one();
    }

    /// The next queued message for the client.
    fn next_notice(&self) -> Option<Bytes> {
        lock(&self.notices).pop_front()
    }
}

/// An in-band re-read of the catalog snapshots (see `ClientSide::refresh`): the client side
/// writes the catalog queries on the session's upstream connection while nothing is in flight,
/// and the server side reads their answers (never forwarded) and hands the snapshots back.
#[derive(Debug)]
struct RefreshJob {
    /// Whether the masking catalog is read too (only under column rules).
    catalog: bool,
    done: Mutex<Option<tokio::sync::oneshot::Sender<Refreshed>>>,
}

/// The re-read masking catalog (if asked for) and function snapshot, or why not.
type Refreshed = (
    Option<std::io::Result<Arc<Catalog>>>,
    std::io::Result<Arc<Functions>>,
);

/// The server side's progress through a [`RefreshJob`]'s answers.
#[derive(Default)]
struct RefreshState {
    /// Reading the masking catalog's answer (the first ReadyForQuery ends it).
    catalog: Option<catalog::Reader>,
    catalog_done: Option<std::io::Result<Arc<Catalog>>>,
    functions: functions::Reader,
}

/// An error the client gets in place of what the server says to the nonce statement.
struct Refusal {
    /// Numbers the substitute statement (`'<nonce>-<id>'`), so a refusal whose substitute the
    /// server never ran (skipped in an aborted transaction) is not shown for a later one.
    id: u64,
    /// SQLSTATE: `42501` for policy denials (with the "ask for access" hint), `42601` for
    /// statements PostgreSQL's grammar rejects, `57014` for a cancelled approval wait.
    code: &'static str,
    message: String,
    /// The parser's cursor position (1-based, in characters) for syntax errors.
    position: Option<u32>,
}

/// The server's `standard_conforming_strings` as its ParameterStatus reports it, and whether
/// that is what it will lex the client's next message with.
///
/// `settled` is true only when everything forwarded has been answered up to a ReadyForQuery:
/// the server reports a changed setting just before ReadyForQuery, and any statement (a `SET`,
/// `RESET`, a rollback, a function or trigger calling `set_config`) may change it, so while
/// anything is in flight the classifier reads backslash texts both ways. The client side sets
/// it false after queueing the expectation of each message it forwards; the server side sets
/// it true on a ReadyForQuery that leaves the queue empty, holding the queue's lock.
struct Lexing {
    scs: classify::Escapes,
    settled: bool,
}

/// The standard_conforming_strings the login ParameterStatus messages report.
fn login_escapes(relay: &[u8]) -> classify::Escapes {
    let mut buf = BytesMut::from(relay);
    let mut found = classify::Escapes::Unknown;
    while let Ok(Some((tag, raw))) = wire::parse_backend(&mut buf) {
        if tag == b'S' {
            if let Ok(("standard_conforming_strings", v)) = wire::decode_parameter_status(&raw) {
                found = classify::Escapes::from_setting(v);
            }
        }
    }
    found
}

/// Client-only encodings whose multibyte characters can contain bytes below 0x80 (the names
/// are the server's canonical spellings, as in ParameterStatus).
const ASCII_UNSAFE_ENCODINGS: &[&str] = &[
    "SJIS",
    "SHIFT_JIS_2004",
    "BIG5",
    "GBK",
    "UHC",
    "GB18030",
    "JOHAB",
];

fn unsafe_encoding_name(value: &str) -> Option<String> {
    ASCII_UNSAFE_ENCODINGS
        .iter()
        .any(|e| e.eq_ignore_ascii_case(value))
        .then(|| value.to_string())
}

/// The client_encoding the login ParameterStatus messages report, if it is ASCII-unsafe.
fn unsafe_client_encoding(relay: &[u8]) -> Option<String> {
    let mut buf = BytesMut::from(relay);
    let mut found = None;
    while let Ok(Some((tag, raw))) = wire::parse_backend(&mut buf) {
        if tag == b'S' {
            if let Ok(("client_encoding", v)) = wire::decode_parameter_status(&raw) {
                found = unsafe_encoding_name(v);
            }
        }
    }
    found
}

/// Whether the server ends its answer to `e` with a ReadyForQuery (it is the last message of a
/// batch the server skips to after an error).
fn ends_at_ready(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Sync | Expect::Simple(..) | Expect::Call { .. } | Expect::Probe(..)
    )
}

/// Whether `e` is an extended-protocol message's: an error in it makes the server skip to the
/// next Sync.
fn extended(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Parse(..)
            | Expect::Bind(..)
            | Expect::Close(..)
            | Expect::DescribeStatement(..)
            | Expect::DescribePortal(_)
            | Expect::Execute { .. }
    )
}

/// A forwarded message whose answer shapes how DataRows must be read.
#[derive(Debug, Clone)]
enum Expect {
    /// Simple query: RowDescriptions arrive in the stream, text format; ends at ReadyForQuery.
    /// The plans of its COPY ... TO STDOUT statements on a masked target, in order, and whether
    /// its computed columns may carry masked values.
    Simple(VecDeque<Arc<CopyPlan>>, bool),
    /// Parse of statement `name` at `version`: its old description is void once the server
    /// reaches it (whether the Parse succeeds or not); see [`Refused`] if it does not.
    Parse(String, u64),
    /// Bind of portal `name` (the [`Bound`] of `version`): the portal's old description is
    /// void once the server reaches it; see [`Refused`] if it does not take.
    Bind(String, u64),
    /// Close of a statement (`b'S'`) or portal (`b'P'`).
    Close(u8, String),
    /// Describe of a statement (at its version): the RowDescription/NoData belongs to it.
    DescribeStatement(String, u64),
    /// Describe of a portal: the RowDescription (with formats) belongs to it.
    DescribePortal(String),
    /// Execute: rows of `portal`, bound by this session from `statement` (name, version) with
    /// `formats` (None: a portal the session did not bind, such as a SQL cursor); `copy` if the
    /// statement is a COPY ... TO STDOUT on a masked target; `taint` if its computed columns
    /// may carry masked values; `resets` if running it may create or drop other portals.
    Execute {
        portal: String,
        statement: Option<(Arc<str>, u64)>,
        /// The version of the Bind that made the portal (`u64::MAX`: not bound here).
        bound: u64,
        formats: Vec<i16>,
        copy: Option<Arc<CopyPlan>>,
        taint: bool,
        resets: bool,
    },
    /// Sync: ends at ReadyForQuery.
    Sync,
    /// A simple query this classifier's grammar rejects, sent to the server as a Parse of the
    /// unnamed statement plus a Sync (parsed, never run), so that the client gets the server's
    /// own syntax error (message, detail, hint, position) for its own text. Should the server's
    /// parser accept it, the client gets this message instead (42601); ends at ReadyForQuery.
    Probe(String),
    /// A fast-path FunctionCall: a FunctionCallResponse (of `result_type`, in `format`) or an
    /// error, then ReadyForQuery; `taint` as for Execute.
    Call {
        result_type: u32,
        format: i16,
        taint: bool,
    },
    /// The agent's own catalog queries (one or two ReadyForQuery): read by the server side,
    /// never forwarded.
    Refresh(Arc<RefreshJob>),
}

/// What the session knows of one version of a prepared statement (protocol level).
#[derive(Debug, Clone, Copy)]
struct StatementInfo {
    /// Unique per Parse in the session, so a description of an older version never applies.
    version: u64,
    /// Its computed columns may carry masked values.
    taint: bool,
    /// Running it may create or drop portals (cursors, procedures, functions, transaction ends).
    resets: bool,
}

/// A portal this session bound.
#[derive(Debug, Clone)]
struct Bound {
    /// Unique per Bind in the session (the same counter as statement versions).
    version: u64,
    statement: Arc<str>,
    info: StatementInfo,
    formats: Vec<i16>,
}

/// Statement kinds whose execution may create, drop or replace portals (cursors).
const PORTAL_KINDS: &[&str] = &[
    "declare",
    "close",
    "fetch",
    "move",
    "discard",
    "call",
    "do",
    "execute",
    "commit",
    "rollback",
    "end",
    "abort",
    "savepoint",
    "release",
    "prepare",
];

/// The client -> server direction: decide, then forward or replace.
struct ClientSide<'a> {
    cx: &'a SessionCx,
    h: &'a PgHandler,
    shared: Arc<Shared>,
    nonce: String,
    /// Prepared statements by name: their classification, for SQL-level EXECUTE.
    prepared: HashMap<String, Arc<Vec<Statement>>>,
    /// The classification `decide_sql` decided last (a protocol Parse's, for `prepared`).
    last_classified: Option<Arc<Vec<Statement>>>,
    /// Portals this session bound.
    portals: HashMap<String, Bound>,
    /// Prepared statements (protocol level) by name: their current version.
    statements: HashMap<Arc<str>, StatementInfo>,
    /// The next statement version.
    next_version: u64,
    /// The next refusal's id.
    next_refusal: u64,
    /// Set by `decide_sql`: the message's computed columns may carry masked values.
    taint: bool,
    /// Set by `decide_sql`: the message may create or drop portals.
    resets: bool,
    recorder: Option<Arc<Recorder>>,
    masker: Option<Arc<Masker>>,
    /// Column layout of masked tables, for COPY ... TO STDOUT.
    catalog: Arc<Catalog>,
    /// Functions a rule may let run without naming them.
    functions: Arc<Functions>,
    /// Masking plans of the COPY ... TO STDOUT statements of the message just decided.
    copy_plans: Vec<Arc<CopyPlan>>,
    /// Prepared statements (protocol level) that are a COPY ... TO STDOUT: their plan.
    statement_copy: HashMap<String, Arc<CopyPlan>>,
    /// Signalled by a CancelRequest with this session's key while an operation is held.
    held_cancel: Arc<HeldCancel>,
    /// Set when the upstream connection may be kept for the next session: a Terminate is then
    /// not forwarded, and the server side is told to stop reading.
    release: Option<tokio::sync::oneshot::Sender<()>>,
    /// The session forwarded DDL since the snapshots were read: the next statement that names
    /// a relation or function re-reads them first.
    ddl_since_refresh: bool,
    /// The session's database, for the snapshot caches.
    database: String,
    /// Names still unknown after a re-read, and when: they do not trigger another one for
    /// [`RETRY_UNKNOWN_AFTER`] (a statement on a relation that does not exist costs one
    /// catalog read, not one per statement).
    unknown_after_refresh: HashMap<String, std::time::Instant>,
    /// The parameter type OIDs of the Parse message being decided: their input functions run
    /// at Bind, so they count as called (`Functions::behind_type_oids`).
    param_types: Vec<u32>,
    /// Set when a re-read was needed under column rules while something was in flight: the
    /// statement is refused with this message.
    stale_refusal: Option<String>,
    /// The buffer of the classification cache's key (see `ClassifyCache::classify_with`).
    fast_key: String,
    /// The last classification `refresh_for` found fully known to the snapshots.
    known: Option<Known>,
}

/// A classification whose every relation and function the snapshots know (see
/// `ClientSide::refresh_for`): a session repeating one statement checks it once per snapshot.
/// (Whether column rules apply is the session's masker's, fixed for the session.)
struct Known {
    statements: Arc<Vec<Statement>>,
    catalog: Arc<Catalog>,
    functions: Arc<Functions>,
    /// Whether its statements name any relation, function, operator or type.
    names_any: bool,
    /// Whether they are DDL that may change the snapshots.
    ddl: bool,
    /// Set by `decide_sql`: without parameter types and with no EXECUTE of a prepared
    /// statement, each statement already names the functions behind its operators, casts and
    /// relations' column types under `functions`, so they need not be looked up again.
    covered: bool,
}

impl Known {
    /// Whether this is what is known of `statements` under `functions`.
    fn of(&self, statements: &Arc<Vec<Statement>>, functions: &Arc<Functions>) -> bool {
        Arc::ptr_eq(&self.statements, statements) && Arc::ptr_eq(&self.functions, functions)
    }
}

/// A key buffer longer than this (a long statement's) is not kept for the next one.
const FAST_KEY_KEPT: usize = 1024;

/// See `ClientSide::unknown_after_refresh`.
const RETRY_UNKNOWN_AFTER: Duration = Duration::from_secs(2);

/// Statement kinds that may change what the catalog snapshots say.
const DDL_KINDS: &[&str] = &[
    "create",
    "alter",
    "drop",
    "comment",
    "security_label",
    "import",
];

/// A text's classification with the lexing it was made under (see `ClientSide::refresh_for`).
type Classified = (classify::Escapes, Arc<Vec<Statement>>);

/// The verdict on one message of SQL.
enum Verdict {
    Allow,
    Deny(String),
    /// PostgreSQL's grammar rejects the text: SQLSTATE 42601 with the parser's message and
    /// position, as the server would answer.
    Syntax(String, Option<u32>),
    /// The client cancelled a held operation (SQLSTATE 57014, as the server would answer).
    Cancelled(String),
    /// Some statement needs approval and none is denied: the whole message waits once.
    Hold(Hold),
}

/// A message held for approval.
struct Hold {
    /// The policy snapshot it was decided under (the approval's rule, approvers, timeout).
    gen: Arc<Generation>,
    /// The statement kind that needed approval (the first one).
    kind: &'static str,
    /// The `approve` decision (names the rule).
    decision: Decision,
    /// The message as the audit log shows it (masked).
    shown: String,
    /// " on t1, t2" for messages.
    tables: String,
}

/// While a message is held, bytes the client sends meanwhile (pipelined messages) are read so
/// a disconnect is noticed, up to this much; beyond it the client is simply not read.
const HOLD_READ_CAP: usize = 1 << 20;

impl ClientSide<'_> {
    /// Mask literals in statement text before it reaches the audit log or a recording.
    fn masked_text<'s>(&self, sql: &'s str) -> std::borrow::Cow<'s, str> {
        // Password literals first (`redact.rs`), then the session's detectors.
        let sql = super::redact::redact(sql);
        match &self.masker {
            Some(m) => match m.shown(&sql) {
                // Nothing to mask (the usual case): the text itself, not a copy.
                std::borrow::Cow::Borrowed(_) => sql,
                std::borrow::Cow::Owned(o) => o.into(),
            },
            None => sql,
        }
    }

    /// Decide every statement of `sql`; the first denial wins and nothing of the message runs.
    /// Decide `sql` and record it (masked once, for both the audit log and the recording).
    /// `made`: the classification `refresh_for` already made of `sql`, with the lexing it used.
    async fn judge(&mut self, sql: &str, made: Option<Classified>) -> Verdict {
        let shown = self.masked_text(sql);
        self.judge_as(sql, &shown, made).await
    }

    /// [`Self::judge`] `sql`, shown in the audit log and the recording as `shown`.
    async fn judge_as(&mut self, sql: &str, shown: &str, made: Option<Classified>) -> Verdict {
        let v = self.decide_sql(sql, shown, made).await;
        if let Some(r) = &self.recorder {
            let (decision, error) = match &v {
                Verdict::Allow => ("allow", None),
                Verdict::Deny(m) | Verdict::Cancelled(m) | Verdict::Syntax(m, _) => {
                    ("deny", Some(m.as_str()))
                }
                Verdict::Hold(_) => ("approve", None),
            };
            // Written with the statement's result, in one write(2) (see recording.rs).
            r.defer(
                Line::new("")
                    .str("event", "statement")
                    .str("session", &self.cx.id)
                    .str("text", shown)
                    .str("decision", decision)
                    .opt("error", error),
            );
        }
        v
    }

    async fn decide_sql(&mut self, sql: &str, shown: &str, made: Option<Classified>) -> Verdict {
        let cx = self.cx;
        self.last_classified = None;
        // One policy snapshot for the whole message: every decision, gate, audit line and
        // approval of it.
        let gen = cx.policy();
        if let Err(refusal) = cx.audit_gate(&gen, "sql", "statements", shown) {
            return Verdict::Deny(refusal);
        }
        if let Some(m) = self.stale_refusal.take() {
            let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
            cx.audit_operation(&gen, "sql", shown, &d, Some("stale_catalog"));
            return Verdict::Deny(m);
        }
        self.copy_plans.clear();
        // Until classified, assume the worst.
        self.taint = true;
        self.resets = true;
        let unsafe_encoding = lock(&self.shared.unsafe_encoding).clone();
        if let Some(enc) = unsafe_encoding {
            let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
            cx.audit_operation(&gen, "sql", shown, &d, Some("client_encoding"));
            return Verdict::Deny(format!(
                "tollgate: client_encoding {enc} cannot be classified safely (its characters can hide quotes and backslashes); set client_encoding to UTF8"
            ));
        }
        let escapes = {
            let l = lock(&self.shared.lexing);
            if l.settled {
                l.scs
            } else {
                classify::Escapes::Unknown
            }
        };
        let made = made.filter(|(e, _)| *e == escapes).map(|(_, st)| st);
        let statements = match made.map_or_else(|| self.h.classify.classify_as(sql, escapes), Ok) {
            Ok(s) => s,
            Err(classify::ClassifyError::Syntax(m)) => {
                // The server would reject it too: answer as it would, not as a policy denial.
                let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                if cx
                    .audit_operation(&gen, "sql", shown, &d, Some("syntax_error"))
                    .action
                    == Action::Allow
                {
                    return Verdict::Allow;
                }
                let position = classify::syntax_error_position(sql, escapes);
                return Verdict::Syntax(m, position);
            }
            Err(classify::ClassifyError::Plpgsql(m)) if m.starts_with("Invalid statement: ") => {
                // A DO block whose PL/pgSQL does not compile: the server would refuse to compile
                // it too, so answer with its message (without a position: libpg_query keeps
                // none for PL/pgSQL), not as a policy denial. Nothing of it runs either way.
                let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                if cx
                    .audit_operation(&gen, "do", shown, &d, Some("plpgsql_error"))
                    .action
                    == Action::Allow
                {
                    return Verdict::Allow;
                }
                let m = m.trim_start_matches("Invalid statement: ").to_string();
                return Verdict::Syntax(m, None);
            }
            Err(e) => {
                let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                if cx
                    .audit_operation(&gen, "sql", shown, &d, Some("unparseable"))
                    .action
                    == Action::Allow
                {
                    return Verdict::Allow;
                }
                return Verdict::Deny(format!(
                    "tollgate: statement could not be classified ({e}); denied"
                ));
            }
        };
        self.taint = false;
        self.resets = false;
        let mut held: Option<Hold> = None;
        // The same classification under the same function snapshot was found to name every
        // function behind its statements already (see `Known::covered`).
        let covered = self.param_types.is_empty()
            && self
                .known
                .as_ref()
                .is_some_and(|k| k.covered && k.of(&statements, &self.functions));
        let mut all_covered = self.param_types.is_empty();
        for (index, st) in statements.iter().enumerate() {
            // SQL-level EXECUTE (also in EXPLAIN ANALYZE and CREATE TABLE AS) runs what was
            // prepared under that name, by PREPARE or a protocol Parse: decide that. A name this
            // session did not see prepared (dynamic SQL) runs something unknown.
            let runs = st
                .prepared_name
                .as_deref()
                .filter(|_| st.kinds.contains(&"execute") && !st.kinds.contains(&"prepare"));
            let prepared = runs.and_then(|name| self.prepared.get(name).cloned());
            let unknown_prepared = runs.is_some() && prepared.is_none();
            all_covered &= runs.is_none();
            // CREATE TABLE ... AS EXECUTE: the table's statement is decided, and what it runs
            // is a source of the rows it writes.
            let wraps = runs.is_some() && st.kind != "execute";
            let wrapped: Vec<Statement>;
            let effective = match prepared.as_deref() {
                Some(p) if wraps => {
                    wrapped = std::iter::once(st.clone())
                        .chain(p.iter().cloned())
                        .collect();
                    wrapped.as_slice()
                }
                Some(p) => p.as_slice(),
                None => std::slice::from_ref(st),
            };
            for (at, s) in effective.iter().enumerate() {
                // The functions behind its operators, casts and its relations' column types count
                // as called (functions.rs).
                let with_behind;
                let s = if (covered && prepared.is_none())
                    || (s.operators.is_empty()
                        && s.casts.is_empty()
                        && s.tables.is_empty()
                        && self.param_types.is_empty())
                {
                    s
                } else {
                    let mut behind = self.functions.behind(&s.operators, &s.casts);
                    behind.extend(self.functions.behind_relations(&s.tables));
                    behind.extend(self.functions.behind_type_oids(&self.param_types));
                    if behind.iter().all(|f| s.functions.contains(f)) {
                        s
                    } else {
                        all_covered = false;
                        let mut called = s.clone();
                        called.functions.extend(behind);
                        called.functions.sort();
                        called.functions.dedup();
                        with_behind = called;
                        &with_behind
                    }
                };
                self.resets |=
                    s.kinds.iter().any(|k| PORTAL_KINDS.contains(k)) || !s.functions.is_empty();
                let mut taint = if s.kind == "fetch" {
                    // A cursor's rows: what it computes was decided at DECLARE.
                    catalog::Taint {
                        output: self.catalog.any_masked(),
                        write: false,
                    }
                } else {
                    self.catalog.taint(&s.lineage, &s.tables)
                };
                if unknown_prepared {
                    // Whatever it runs may compute from masked columns.
                    taint.output |= self.catalog.any_masked();
                }
                if wraps && (at > 0 || unknown_prepared) && taint.output {
                    // The prepared statement's rows are what CREATE TABLE AS writes.
                    taint.write = true;
                }
                self.taint |= taint.output;
                if taint.write
                    && (wraps
                        || s.kinds
                            .iter()
                            .any(|k| matches!(*k, "insert" | "update" | "merge" | "create")))
                {
                    let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                    cx.audit_operation(&gen, s.kind, shown, &d, Some("masked_lineage"));
                    return Verdict::Deny(format!(
                        "tollgate: {}{} would write values derived from masked columns (mask rules of target {}); denied",
                        s.kind,
                        on_tables(s),
                        cx.target.name
                    ));
                }
                if s.kind == "copy" && !s.kinds.contains(&"insert") && self.masker.is_some() {
                    // COPY ... TO STDOUT has no RowDescription: plan from the statement's own
                    // options, the catalog and its lineage, or refuse rather than leak.
                    match self.copy_plan(sql, index, taint.output) {
                        Ok(Some(p)) => self.copy_plans.push(p),
                        // COPY TO a file or program: no output to mask; policy decides.
                        Ok(None) => {}
                        Err(e) => {
                            let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                            cx.audit_operation(
                                &gen,
                                "copy",
                                &self.masked_text(&s.text),
                                &d,
                                Some("copy_out_unmaskable"),
                            );
                            return Verdict::Deny(format!(
                                "tollgate: COPY ... TO STDOUT denied: {e}"
                            ));
                        }
                    }
                }
                if let Some((flag, why)) = verdict::never_allowed(s) {
                    let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                    cx.audit_operation(&gen, s.kind, shown, &d, Some(flag));
                    return Verdict::Deny(format!("tollgate: {why}; denied"));
                }
                let (d, kind) = decide_statement(cx, &gen, s);
                // The cached classification may come from a statement with other constants:
                // the audit shows what this bot actually sent.
                let text: std::borrow::Cow<str> = if statements.len() == 1 {
                    shown.into()
                } else {
                    format!("{} [in: {shown}]", s.kind).into()
                };
                let extra = if s.dangerous.is_empty() {
                    None
                } else {
                    Some(s.dangerous.join(","))
                };
                let d = dangerous_gate(&gen, s, d);
                let named: Vec<&str> = s
                    .functions
                    .iter()
                    .filter(|f| !self.functions.is_plain(f))
                    .map(String::as_str)
                    .collect();
                let allowed = d.action == Action::Allow;
                let d = function_gate(&gen, &named, d);
                let refused_for_functions = allowed && d.action == Action::Deny;
                let d = cx.audit_decision(&gen, kind, &text, d, extra.as_deref());
                if d.action == Action::Deny && refused_for_functions {
                    return Verdict::Deny(format!(
                        "tollgate: {kind}{} calls {}, which a rule must name in its functions (user-defined, extension and volatile functions can write or run SQL) for identity {}; denied",
                        on_tables(s),
                        named.join(", "),
                        cx.identity.as_deref().unwrap_or("unknown")
                    ));
                }
                match d.action {
                    Action::Allow => {}
                    Action::Deny => return Verdict::Deny(deny_message(cx, kind, s, &d)),
                    Action::Approve => {
                        // Held once for the whole message, after every statement was decided
                        // (a later deny still wins).
                        if held.is_none() {
                            held = Some(Hold {
                                gen: gen.clone(),
                                kind,
                                decision: d,
                                shown: shown.to_string(),
                                tables: on_tables(s),
                            });
                        }
                    }
                }
            }
            // Allowed (or waiting for approval): what it prepares or deallocates is what the
            // server will have for the statements after it. Should a later one be refused,
            // nothing ran: a name then wrongly missing is unknown, one wrongly present does
            // not exist on the server (a name known already is never replaced).
            self.prepared_effects(st);
        }
        if all_covered && !covered {
            if let Some(k) = self
                .known
                .as_mut()
                .filter(|k| k.of(&statements, &self.functions))
            {
                k.covered = true;
            }
        }
        self.last_classified = Some(statements);
        match held {
            Some(h) => Verdict::Hold(h),
            None => Verdict::Allow,
        }
    }

    /// Hold a message for approval: tell the client (a NoticeResponse, which psql prints),
    /// wait for the broker, and meanwhile watch the client so a disconnect cancels the request.
    /// `None`: the client went away (the request was cancelled).
    async fn hold(&mut self, h: Hold, cr: &mut ReadHalf, buf: &mut BytesMut) -> Option<Verdict> {
        let cx = self.cx;
        let rule = h.decision.rule.as_deref().unwrap_or("?").to_string();
        let ticket = match cx
            .open_approval(&h.gen, &h.shown, h.kind, &h.decision)
            .await
        {
            Ok(t) => t,
            Err(why) => {
                return Some(Verdict::Deny(format!(
                    "tollgate: {}{} needs approval under rule \"{rule}\", but {why}; denied",
                    h.kind, h.tables
                )))
            }
        };
        let id = ticket.id();
        let notice = format!(
            "tollgate: waiting for approval #{id} ({} under rule \"{rule}\", expires in {}) (tollgate approvals approve {id})",
            h.kind,
            crate::approvals::human(ticket.timeout())
        );
        let mut n = BytesMut::new();
        wire::encode_notice_response(
            &ErrorReport {
                severity: wire::Severity::Notice,
                ..ErrorReport::error("01000", &notice)
            },
            &mut n,
        );
        self.shared.notify(n.freeze());
        let held = self.held_cancel.clone();
        let outcome = {
            // Registered before `holding` is set, so a cancel that sees `holding` wakes us.
            let cancelled = held.notify.notified();
            tokio::pin!(cancelled);
            cancelled.as_mut().enable();
            held.holding.store(true, Ordering::SeqCst);
            // The client is watched while it waits: a disconnect or a CancelRequest withdraws
            // the request.
            let watch = async {
                let mut reading = true;
                loop {
                    tokio::select! {
                        _ = &mut cancelled => {
                            return Withdrawn::Cancelled(
                                "the client cancelled the statement while it waited",
                            )
                        }
                        r = cr.read_buf(buf), if reading => match r {
                            Ok(0) | Err(_) => return Withdrawn::Gone,
                            Ok(_) => reading = buf.len() < HOLD_READ_CAP,
                        },
                    }
                }
            };
            let o = cx
                .hold_approval(ticket, &rule, &h.shown, self.recorder.as_deref(), watch)
                .await;
            held.holding.store(false, Ordering::SeqCst);
            o
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(Withdrawn::Cancelled(_)) => {
                return Some(Verdict::Cancelled(format!(
                    "canceling statement due to user request (tollgate: approval #{id} for {}{} withdrawn)",
                    h.kind, h.tables
                )));
            }
            Err(Withdrawn::Gone) => return None,
        };
        Some(match outcome {
            ApprovalOutcome::Approved { .. } => Verdict::Allow,
            ApprovalOutcome::Denied {
                approver, comment, ..
            } => Verdict::Deny(format!(
                "tollgate: {}{} was denied by {approver} (approval #{id}): {}",
                h.kind,
                h.tables,
                comment.as_deref().unwrap_or("no comment given")
            )),
            ApprovalOutcome::Expired { reason, .. } => Verdict::Deny(format!(
                "tollgate: {}{} was not approved (approval #{id} {reason}); denied",
                h.kind, h.tables
            )),
            ApprovalOutcome::Unavailable => Verdict::Deny(format!(
                "tollgate: {}{} needs approval, which is not available; denied",
                h.kind, h.tables
            )),
        })
    }

    /// The masking plan for statement `index` of `sql`, if it is a COPY ... TO STDOUT.
    fn copy_plan(
        &self,
        sql: &str,
        index: usize,
        taint: bool,
    ) -> Result<Option<Arc<CopyPlan>>, copy::CopyError> {
        let Some(m) = self.masker.as_deref() else {
            return Ok(None);
        };
        match copy::copy_outs(sql)?.into_iter().nth(index).flatten() {
            Some(c) => Ok(Some(Arc::new(copy::plan(&c, m, &self.catalog, taint)?))),
            None => Ok(None),
        }
    }

    fn deny_substitute(&mut self, message: String) -> String {
        self.refuse_substitute("42501", message)
    }

    /// A statement that fails on the server with our nonce in its error, which the server side
    /// rewrites into `code` and `message` (so the refusal keeps its place among results).
    fn refuse_substitute(&mut self, code: &'static str, message: String) -> String {
        self.refusal_substitute(code, message, None)
    }

    fn refusal_substitute(
        &mut self,
        code: &'static str,
        message: String,
        position: Option<u32>,
    ) -> String {
        let id = self.next_refusal;
        self.next_refusal += 1;
        lock(&self.shared.denials).push_back(Refusal {
            id,
            code,
            message,
            position,
        });
        format!("SELECT '{}-{id}'::pg_catalog.int4", self.nonce)
    }

    /// The substitute for a message that ended with verdict `v` (not `Allow` or `Hold`).
    fn verdict_substitute(&mut self, v: Verdict) -> String {
        match v {
            Verdict::Cancelled(m) => self.refuse_substitute("57014", m),
            Verdict::Syntax(message, position) => {
                self.refusal_substitute("42601", message, position)
            }
            Verdict::Deny(m) => self.deny_substitute(m),
            Verdict::Allow | Verdict::Hold(_) => {
                self.deny_substitute("tollgate: internal verdict error; denied".into())
            }
        }
    }

    /// Nothing is in flight: every forwarded message is answered up to a ReadyForQuery.
    fn idle(&self) -> bool {
        let ex = lock(&self.shared.expect);
        ex.is_empty()
            && !self.shared.skipping.load(Ordering::Relaxed)
            && lock(&self.shared.lexing).settled
    }

    /// Whether an unknown `name` may trigger a re-read (see `unknown_after_refresh`).
    fn may_retry(&self, name: &str) -> bool {
        self.unknown_after_refresh
            .get(name)
            .is_none_or(|at| at.elapsed() >= RETRY_UNKNOWN_AFTER)
    }

    /// Before `sql` is decided: if it names a relation (under column rules) or a function the
    /// snapshots do not know, or the session ran DDL since they were read, re-read them on the
    /// upstream connection when nothing is in flight. When something is in flight and column
    /// rules apply, the statement is refused with a retry message instead (`stale_refusal`):
    /// deciding it on a snapshot without the relation could pass a masked column of it.
    async fn refresh_for(
        &mut self,
        sql: &str,
        io: &mut ClientIo<'_>,
    ) -> Result<Option<Classified>, DataPathError> {
        let escapes = {
            let l = lock(&self.shared.lexing);
            if l.settled {
                l.scs
            } else {
                classify::Escapes::Unknown
            }
        };
        // decide_sql classifies the same text again: a cache hit.
        let classified = self
            .h
            .classify
            .classify_with(sql, escapes, &mut self.fast_key);
        if self.fast_key.capacity() > FAST_KEY_KEPT {
            self.fast_key = String::new();
        }
        let Ok(statements) = classified else {
            return Ok(None);
        };
        let column_rules = self.masker.as_ref().is_some_and(|m| m.has_column_rules());
        if let Some(k) = self.known.as_ref().filter(|k| {
            k.of(&statements, &self.functions) && Arc::ptr_eq(&k.catalog, &self.catalog)
        }) {
            // Known as a whole the last time, against these very snapshots.
            if !(self.ddl_since_refresh && k.names_any) {
                self.ddl_since_refresh |= k.ddl;
                return Ok(Some((escapes, statements)));
            }
        }
        let mut relations: Vec<String> = Vec::new();
        let mut unknown: Vec<String> = Vec::new();
        let mut names_any = false;
        let mut ddl = false;
        for st in statements.iter() {
            names_any |= !st.tables.is_empty()
                || !st.functions.is_empty()
                || !st.operators.is_empty()
                || !st.casts.is_empty();
            // Without column rules only the function snapshot matters, and only DDL that can
            // create, replace or rename a function, an operator, a cast or a type, or give a
            // table a column of a type with functions that are not plain, changes it (a dropped
            // one is only missed, which fails closed): re-reading after every CREATE TABLE made
            // a DDL-heavy session (PostgreSQL's regression suite) 14 times slower.
            ddl |= if column_rules {
                st.kinds.iter().any(|k| DDL_KINDS.contains(k))
            } else {
                st.dangerous
                    .iter()
                    .any(|f| f == "ddl:code" || f.starts_with("extension:"))
                    || (matches!(st.kind, "create" | "alter")
                        && (!st.functions.is_empty()
                            || !self.functions.behind(&[], &st.casts).is_empty()))
                    || st.redefines
            };
            if column_rules {
                for t in &st.tables {
                    if !self.catalog.knows(t) && self.may_retry(t) {
                        relations.push(t.clone());
                    }
                }
            }
            for f in &st.functions {
                if !self.functions.knows(f) && self.may_retry(f) {
                    unknown.push(f.clone());
                }
            }
            // Operator and type names the snapshot lacks (created since): keyed apart from
            // function names.
            for o in st
                .operators
                .iter()
                .filter(|o| !self.functions.knows_operator(o))
            {
                let key = format!("operator {o}");
                if self.may_retry(&key) {
                    unknown.push(key);
                }
            }
            for t in st.casts.iter().filter(|t| !self.functions.knows_type(t)) {
                let key = format!("type {t}");
                if self.may_retry(&key) {
                    unknown.push(key);
                }
            }
        }
        let after_ddl = self.ddl_since_refresh && names_any;
        if relations.is_empty() && unknown.is_empty() {
            self.known = Some(Known {
                statements: statements.clone(),
                catalog: self.catalog.clone(),
                functions: self.functions.clone(),
                names_any,
                ddl,
                covered: false,
            });
            if !after_ddl {
                self.ddl_since_refresh |= ddl;
                return Ok(Some((escapes, statements)));
            }
        }
        if self.idle() {
            self.refresh(io, column_rules).await?;
            let now = std::time::Instant::now();
            for t in relations {
                if !self.catalog.knows(&t) {
                    self.unknown_after_refresh.insert(t, now);
                }
            }
            for f in unknown {
                let known = match (f.strip_prefix("operator "), f.strip_prefix("type ")) {
                    (Some(o), _) => self.functions.knows_operator(o),
                    (_, Some(t)) => self.functions.knows_type(t),
                    _ => self.functions.knows(&f),
                };
                if !known {
                    self.unknown_after_refresh.insert(f, now);
                }
            }
        } else if column_rules && (after_ddl || !relations.is_empty()) {
            let why = match relations.first() {
                Some(t) => format!("names {t}, which the masking catalog snapshot does not have"),
                None => "follows DDL this session ran".into(),
            };
            self.stale_refusal = Some(format!(
                "tollgate: the statement {why}, and the catalog cannot be re-read while earlier messages are in flight (pipelined); retry it once they are answered"
            ));
        }
        self.ddl_since_refresh = ddl;
        Ok(None)
    }

    /// Re-read the snapshots in band (see [`RefreshJob`]): only when [`Self::idle`], so the
    /// server answers the agent's queries before anything else and the server side can tell
    /// them apart by the queue. On failure (a server error, an aborted transaction) the old
    /// snapshots stay.
    async fn refresh(
        &mut self,
        io: &mut ClientIo<'_>,
        with_catalog: bool,
    ) -> Result<(), DataPathError> {
        flush(&mut io.uw, &mut io.out, io.counters, self.cx).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Arc::new(RefreshJob {
            catalog: with_catalog,
            done: Mutex::new(Some(tx)),
        });
        let mut q = BytesMut::new();
        if with_catalog {
            catalog::query(&mut q).map_err(internal)?;
        }
        functions::query(&mut q).map_err(internal)?;
        {
            let mut ex = lock(&self.shared.expect);
            ex.push_back(Expect::Refresh(job));
            self.shared.refresh_queued.store(true, Ordering::Release);
        }
        io.uw
            .write_all(&q)
            .await
            .map_err(|e| upstream_err(self.cx, e))?;
        // The server side answers when it has read both answers, or drops the sender if the
        // session ends first.
        let Ok((cat, funcs)) = rx.await else {
            return Ok(());
        };
        let database = self.database.clone();
        match cat {
            Some(Ok(c)) => {
                self.h
                    .catalogs
                    .remember(&self.cx.target.name, &database, c.clone());
                self.catalog = c;
            }
            Some(Err(e)) => tracing::info!(error = %e, "catalog re-read failed; old snapshot kept"),
            None => {}
        }
        match funcs {
            Ok(f) => {
                self.h
                    .functions
                    .remember(&self.cx.target.name, &database, f.clone());
                self.functions = f;
            }
            Err(e) => {
                tracing::info!(error = %e, "function catalog re-read failed; old snapshot kept")
            }
        }
        self.ddl_since_refresh = false;
        Ok(())
    }

    /// A Bind is forwarded: remember the portal it makes.
    fn bind(&mut self, portal: String, statement: &str, formats: Vec<i16>) {
        // The name as the statements map holds it, so a Bind costs no copy of it.
        let (statement, info) = match self.statements.get_key_value(statement) {
            Some((name, info)) => (name.clone(), *info),
            // A statement not parsed in this session (SQL PREPARE): unknown.
            None => (
                statement.into(),
                StatementInfo {
                    version: u64::MAX,
                    taint: true,
                    resets: true,
                },
            ),
        };
        let version = self.next_version;
        self.next_version += 1;
        lock(&self.shared.expect).push_back(Expect::Bind(portal.clone(), version));
        self.portals.insert(
            portal,
            Bound {
                version,
                statement,
                info,
                formats,
            },
        );
    }

    /// The client sent a message that cannot be framed: the session ends with the FATAL the
    /// server would send (08P01, and PostgreSQL's "invalid message length" for a length over
    /// its limit). The client side cannot write to the client: the server side writes the FATAL
    /// once the upstream, shut down here, has closed, so it is never lost to a race.
    async fn malformed(
        &mut self,
        e: wire::WireError,
        uw: &mut WriteHalf,
    ) -> Result<Option<WriteHalf>, DataPathError> {
        tracing::warn!(error = %e, "malformed message from client; session ends");
        let mut o = BytesMut::new();
        encode_session_error(
            &DataPathError::Client(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            &mut o,
        );
        self.shared.notify(o.freeze());
        let _ = uw.shutdown().await;
        Ok(None)
    }

    /// A message too large to hold (see [`wire::large_frontend`]). A Bind or CopyData is
    /// relayed in pieces as it arrives: nothing in its values is inspected, and a Bind's names
    /// and formats are read on the way ([`wire::BindScan`]). A Query, Parse or FunctionCall
    /// longer than [`wire::MAX_MESSAGE_LEN`] is read and dropped, and refused with 54000 in
    /// its place (its SQL must be classified whole; a fast-path call is decided with its
    /// arguments' count). The inner error: the message cannot be framed, the session ends.
    async fn large(
        &mut self,
        l: wire::Large,
        io: &mut ClientIo<'_>,
    ) -> Result<Result<(), wire::WireError>, DataPathError> {
        let cx = self.cx;
        let ClientIo {
            cr,
            uw,
            buf,
            out,
            counters,
        } = io;
        let counters: &Counters = counters;
        let side = |e: RelayError| match e {
            RelayError::Read(e) => DataPathError::Client(e),
            RelayError::Write(e) => upstream_err(cx, e),
            RelayError::Scan(e) => DataPathError::Client(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            )),
        };
        match l.tag {
            b'd' => {
                flush(uw, out, counters, self.cx).await?;
                let last = relay(cr, Some(uw), buf, l.total, |_| Ok(()), &counters.up)
                    .await
                    .map_err(side)?;
                out.extend_from_slice(&last);
            }
            b'B' => {
                flush(uw, out, counters, self.cx).await?;
                let mut scan = wire::BindScan::default();
                let mut at = 0;
                let last = relay(
                    cr,
                    Some(uw),
                    buf,
                    l.total,
                    |piece| {
                        // The 5-byte header is not part of the body.
                        let skip = 5usize.saturating_sub(at).min(piece.len());
                        at += piece.len();
                        scan.feed(&piece[skip..])
                    },
                    &counters.up,
                )
                .await;
                let last = match last {
                    Ok(last) => last,
                    // Part of the message is with the server: the session cannot go on.
                    Err(RelayError::Scan(e)) => return Ok(Err(e)),
                    Err(e) => return Err(side(e)),
                };
                match scan.finish() {
                    Ok(head) => {
                        self.bind(head.portal, &head.statement, head.result_formats);
                        out.extend_from_slice(&last);
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
            tag => {
                // Read and dropped: only the first bytes (a Parse's statement name) are kept.
                let mut head = Vec::new();
                let dropped = AtomicU64::new(0);
                relay(
                    cr,
                    None,
                    buf,
                    l.total,
                    |piece| {
                        let n = (MAX_NAME_PREFIX - head.len()).min(piece.len());
                        head.extend_from_slice(&piece[..n]);
                        Ok(())
                    },
                    &dropped,
                )
                .await
                .map_err(side)?;
                let what = match tag {
                    b'Q' => "statement text",
                    b'P' => "prepared statement text",
                    _ => "fast-path function call",
                };
                let message = format!(
                    "tollgate: {what} of {} bytes is too long to inspect (limit {} bytes)",
                    l.total - 5,
                    wire::MAX_MESSAGE_LEN - 4
                );
                tracing::warn!(target = %self.cx.target.name, "{message}");
                let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                let _ = self
                    .cx
                    .audit_operation(&self.cx.policy(), "too_long", &message, &d, None);
                let sub = self.refuse_substitute("54000", message);
                self.copy_plans.clear();
                if tag == b'P' {
                    let name = head
                        .get(5..)
                        .and_then(|b| b.iter().position(|&c| c == 0).map(|i| &b[..i]))
                        .and_then(|n| std::str::from_utf8(n).ok())
                        .map(str::to_owned);
                    let Some(name) = name else {
                        return Ok(Err(wire::WireError::MissingNul {
                            what: "Parse message",
                        }));
                    };
                    self.statement_copy.remove(&name);
                    let info = StatementInfo {
                        version: self.next_version,
                        taint: true,
                        resets: self.resets,
                    };
                    self.next_version += 1;
                    self.statements.insert(name.as_str().into(), info);
                    lock(&self.shared.expect).push_back(Expect::Parse(name.clone(), info.version));
                    postgres_protocol::message::frontend::parse(
                        &name,
                        &sub,
                        std::iter::empty(),
                        out,
                    )
                    .map_err(internal)?;
                } else {
                    if tag == b'Q' {
                        self.statements.remove("");
                        self.portals.remove("");
                    }
                    lock(&self.shared.expect).push_back(Expect::Simple(VecDeque::new(), true));
                    postgres_protocol::message::frontend::query(&sub, out).map_err(internal)?;
                }
            }
        }
        // Forwarded (see the end of `run`'s loop).
        lock(&self.shared.lexing).settled = false;
        Ok(Ok(()))
    }

    async fn run(
        mut self,
        cr: ReadHalf,
        uw: WriteHalf,
        buf: BytesMut,
        counters: &Counters,
    ) -> Result<Option<WriteHalf>, DataPathError> {
        let mut io = ClientIo {
            cr,
            uw,
            buf,
            out: BytesMut::with_capacity(ReadSize::START),
            counters,
        };
        let mut size = ReadSize::new(16 * 1024);
        loop {
            // Every whole message read so far is decided, then all of them go in one write.
            loop {
                let (msg, raw) = match self.frame(&mut io).await? {
                    Framed::Message(m, raw) => (m, raw),
                    Framed::More => break,
                    Framed::Malformed(e) => return self.malformed(e, &mut io.uw).await,
                };
                match self.on_message(msg, raw, &mut io).await? {
                    Next::Forwarded => {
                        // Until the server is ready again, it may have changed how the next
                        // message is lexed.
                        lock(&self.shared.lexing).settled = false;
                        if io.out.len() > 64 * 1024 {
                            io.write_out(self.cx).await?;
                        }
                    }
                    Next::Probed => {}
                    Next::Release => return Ok(Some(io.uw)),
                    Next::Close => {
                        let _ = io.uw.shutdown().await;
                        return Ok(None);
                    }
                }
            }
            io.write_out(self.cx).await?;
            // A TLS upstream may hold records back until flushed (a no-op on plain TCP).
            io.uw.flush().await.map_err(|e| upstream_err(self.cx, e))?;
            match read_more(&mut io.cr, &mut io.buf, &mut io.out, &mut size).await {
                Ok(0) => {
                    let _ = io.uw.shutdown().await;
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) => return Err(DataPathError::Client(e)),
            }
        }
    }

    /// The next whole message in the buffer. A message too long to hold is relayed in pieces
    /// or refused here (see `large`), and framing goes on after it.
    async fn frame(&mut self, io: &mut ClientIo<'_>) -> Result<Framed, DataPathError> {
        loop {
            let e = match wire::parse_frontend(&mut io.buf) {
                Ok(Some((m, raw))) => return Ok(Framed::Message(m, raw)),
                r => match (wire::large_frontend(&io.buf), r) {
                    (Ok(Some(l)), _) => match self.large(l, io).await? {
                        Ok(()) => continue,
                        Err(e) => e,
                    },
                    (Ok(None), Ok(None)) => return Ok(Framed::More),
                    (Ok(None), Err(e)) | (Err(e), _) => e,
                    (Ok(None), Ok(Some(_))) => return Err(InternalError::unreachable("framing")),
                },
            };
            // Tell the server nothing; the session ends with the error the server would give
            // (a FATAL the server side writes once the upstream has closed).
            return Ok(Framed::Malformed(e));
        }
    }

    /// Decide one message and queue what goes to the server for it (the message itself, or a
    /// substitute that makes the server answer with the refusal in its place).
    async fn on_message(
        &mut self,
        msg: Frontend,
        raw: Bytes,
        io: &mut ClientIo<'_>,
    ) -> Result<Next, DataPathError> {
        if self.shared.refused_new.load(Ordering::Acquire) {
            self.apply_refused();
        }
        match msg {
            Frontend::Query(sql) => return self.on_query(&sql, &raw, io).await,
            Frontend::Parse {
                name,
                query,
                param_types,
            } => {
                self.param_types = param_types;
                let next = self.on_parse(name, &query, &raw, io).await;
                self.param_types.clear();
                return next;
            }
            Frontend::Bind {
                portal,
                statement,
                raw: body,
            } => {
                let formats = wire::bind_result_formats(&body).unwrap_or_default();
                self.bind(portal, &statement, formats);
            }
            Frontend::Describe { kind, name } => {
                lock(&self.shared.expect).push_back(if kind == b'S' {
                    let version = self
                        .statements
                        .get(name.as_str())
                        .map_or(u64::MAX, |i| i.version);
                    Expect::DescribeStatement(name, version)
                } else {
                    Expect::DescribePortal(name)
                });
            }
            Frontend::Execute { portal, .. } => {
                let ex = self.execute_expect(portal);
                lock(&self.shared.expect).push_back(ex);
            }
            Frontend::Close { kind, name } => {
                if kind == b'S' {
                    self.statements.remove(name.as_str());
                    self.prepared.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
                lock(&self.shared.expect).push_back(Expect::Close(kind, name));
            }
            Frontend::Sync => lock(&self.shared.expect).push_back(Expect::Sync),
            Frontend::FunctionCall(body) => return self.on_function_call(&body, &raw, io).await,
            Frontend::Password(_) => {
                // We never asked: after startup this is a protocol violation.
                return Err(DataPathError::Client(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "unexpected password message after login",
                )));
            }
            Frontend::Terminate => {
                if let Some(release) = self.release.take() {
                    // The connection may serve the next session: send what was decided
                    // before the Terminate, and keep the server's end open.
                    flush(&mut io.uw, &mut io.out, io.counters, self.cx).await?;
                    let _ = release.send(());
                    return Ok(Next::Release);
                }
                io.out.extend_from_slice(&raw);
                io.write_out(self.cx).await?;
                return Ok(Next::Close);
            }
            Frontend::Flush
            | Frontend::CopyData(_)
            | Frontend::CopyDone
            | Frontend::CopyFail(_) => {}
        }
        // Forwarded as it came.
        io.out.extend_from_slice(&raw);
        Ok(Next::Forwarded)
    }

    /// `v`, or what the approval wait made of it (see [`Self::hold`]); None: the client went
    /// away while the message was held. What was decided before the message goes to the server
    /// first: it runs while this one waits.
    async fn settle(
        &mut self,
        v: Verdict,
        io: &mut ClientIo<'_>,
    ) -> Result<Option<Verdict>, DataPathError> {
        let Verdict::Hold(h) = v else {
            return Ok(Some(v));
        };
        flush(&mut io.uw, &mut io.out, io.counters, self.cx).await?;
        Ok(self.hold(h, &mut io.cr, &mut io.buf).await)
    }

    /// The verdict on SQL text `sql` (snapshots re-read first if it needs them, an approval
    /// waited for); None: the client went away while it was held.
    async fn verdict_on(
        &mut self,
        sql: &str,
        io: &mut ClientIo<'_>,
    ) -> Result<Option<Verdict>, DataPathError> {
        let made = self.refresh_for(sql, io).await?;
        let v = self.judge(sql, made).await;
        self.settle(v, io).await
    }

    /// A simple query: decided as a whole, forwarded or replaced by a refusal.
    async fn on_query(
        &mut self,
        sql: &str,
        raw: &[u8],
        io: &mut ClientIo<'_>,
    ) -> Result<Next, DataPathError> {
        let Some(v) = self.verdict_on(sql, io).await? else {
            return Ok(Next::Close);
        };
        let plans = std::mem::take(&mut self.copy_plans);
        // A simple query replaces the unnamed statement and portal.
        self.statements.remove("");
        self.portals.remove("");
        let v = match v {
            // With nothing in flight, let the server's own parser say what is wrong
            // (Expect::Probe): a Parse is parsed and analysed, never run. Its Sync would end a
            // skip after an error and the implicit transaction of messages in flight, so
            // otherwise the client gets the classifier's own error, in its place.
            Verdict::Syntax(message, _) if self.idle() => {
                lock(&self.shared.expect).push_back(Expect::Probe(message));
                postgres_protocol::message::frontend::parse(
                    "",
                    sql,
                    std::iter::empty(),
                    &mut io.out,
                )
                .map_err(internal)?;
                postgres_protocol::message::frontend::sync(&mut io.out);
                return Ok(Next::Probed);
            }
            v => v,
        };
        lock(&self.shared.expect).push_back(Expect::Simple(plans.into(), self.taint));
        match v {
            Verdict::Allow => io.out.extend_from_slice(raw),
            // settle() never answers Hold.
            Verdict::Hold(_) => return Err(InternalError::unreachable("held twice")),
            v => {
                let sub = self.verdict_substitute(v);
                postgres_protocol::message::frontend::query(&sub, &mut io.out).map_err(internal)?;
            }
        }
        Ok(Next::Forwarded)
    }

    /// A Parse: its text decided as a simple query's; a refused one prepares the refusal under
    /// the same name, so the statement's Bind/Execute fail as the server would fail them.
    async fn on_parse(
        &mut self,
        name: String,
        query: &str,
        raw: &[u8],
        io: &mut ClientIo<'_>,
    ) -> Result<Next, DataPathError> {
        let Some(v) = self.verdict_on(query, io).await? else {
            return Ok(Next::Close);
        };
        match (self.copy_plans.pop(), &v) {
            (Some(p), Verdict::Allow) => {
                self.statement_copy.insert(name.clone(), p);
            }
            _ => {
                self.statement_copy.remove(&name);
            }
        }
        self.copy_plans.clear();
        let info = StatementInfo {
            version: self.next_version,
            taint: self.taint || !matches!(v, Verdict::Allow),
            resets: self.resets,
        };
        self.next_version += 1;
        match self.statements.get_mut(name.as_str()) {
            Some(i) => *i = info,
            None => {
                self.statements.insert(name.as_str().into(), info);
            }
        }
        // What SQL EXECUTE of the name runs (a name that exists keeps its statement: the
        // server refuses this Parse).
        let classified = self.last_classified.take();
        if !name.is_empty() && matches!(v, Verdict::Allow) {
            if let (false, Some(c)) = (self.prepared.contains_key(&name), classified) {
                self.prepared.insert(name.clone(), c);
            }
        }
        match v {
            Verdict::Allow => io.out.extend_from_slice(raw),
            // settle() never answers Hold.
            Verdict::Hold(_) => return Err(InternalError::unreachable("held twice")),
            v => {
                let sub = self.verdict_substitute(v);
                postgres_protocol::message::frontend::parse(
                    &name,
                    &sub,
                    std::iter::empty(),
                    &mut io.out,
                )
                .map_err(internal)?;
            }
        }
        lock(&self.shared.expect).push_back(Expect::Parse(name, info.version));
        Ok(Next::Forwarded)
    }

    /// SQL PREPARE, DEALLOCATE and DISCARD change the server's prepared statements, which
    /// protocol Parse and Close share: keep `prepared` (what SQL EXECUTE runs) and `statements`
    /// (what a protocol Bind binds) as the server will have them. DECLARE, CLOSE and DISCARD
    /// make the portals this session bound unknown.
    fn prepared_effects(&mut self, st: &Statement) {
        // Portals too: SQL cursors share the protocol's portal names, so a name DECLAREd
        // (after its portal ended) or CLOSEd is no longer what a Bind here made.
        if st
            .kinds
            .iter()
            .any(|k| matches!(*k, "declare" | "close" | "discard"))
        {
            self.portals.clear();
        }
        let name = st.prepared_name.as_deref();
        if st.kinds.contains(&"prepare") {
            let Some(name) = name else { return };
            // A name that exists is refused by the server (42P05) and keeps its statement.
            if !self.prepared.contains_key(name) {
                self.prepared
                    .insert(name.to_string(), Arc::new(vec![st.clone()]));
                // Not what a protocol Parse of it said any more: bound, it is unknown.
                self.statements.remove(name);
                self.statement_copy.remove(name);
            }
        } else if matches!(st.kind, "deallocate" | "discard") {
            match name.filter(|_| st.kind == "deallocate") {
                Some(name) => {
                    self.prepared.remove(name);
                    self.statements.remove(name);
                    self.statement_copy.remove(name);
                }
                // DEALLOCATE ALL, DISCARD ALL: every named statement (not the unnamed one).
                None => {
                    self.prepared.clear();
                    self.statements.retain(|n, _| n.is_empty());
                    self.statement_copy.retain(|n, _| n.is_empty());
                }
            }
        }
    }

    /// Versions whose Parse or Bind did not take ([`Refused`]) are unknown from now on: their
    /// computed columns are masked, they may reset portals, and no COPY plan holds for them.
    fn apply_refused(&mut self) {
        let mut r = lock(&self.shared.refused);
        self.shared.refused_new.store(false, Ordering::Relaxed);
        for &version in &r.versions[r.applied..] {
            for (name, info) in self.statements.iter_mut() {
                if info.version == version {
                    info.taint = true;
                    info.resets = true;
                    self.statement_copy.remove(&**name);
                    // SQL EXECUTE of it runs something unknown too.
                    self.prepared.remove(&**name);
                }
            }
            for b in self.portals.values_mut() {
                if b.info.version == version {
                    b.info.taint = true;
                    b.info.resets = true;
                }
            }
            // A Bind that did not take: the name is whatever portal the server had (a cursor
            // WITH HOLD), or none.
            self.portals.retain(|_, b| b.version != version);
        }
        r.applied = r.versions.len();
    }

    /// What the server's answer to an Execute of `portal` is read with.
    fn execute_expect(&self, portal: String) -> Expect {
        match self.portals.get(&portal) {
            Some(b) => Expect::Execute {
                copy: self.statement_copy.get(&*b.statement).cloned(),
                statement: Some((b.statement.clone(), b.info.version)),
                bound: b.version,
                formats: b.formats.clone(),
                taint: b.info.taint,
                resets: b.info.resets,
                portal,
            },
            // A portal this session did not bind (a SQL cursor): nothing is known of its rows
            // but a Describe of it.
            None => Expect::Execute {
                portal,
                statement: None,
                bound: u64::MAX,
                formats: Vec::new(),
                copy: None,
                taint: true,
                resets: true,
            },
        }
    }

    /// A fast-path FunctionCall names a function by OID: decided as a SQL call of that
    /// function, under the same rules; a refused one is answered by a substitute query (its
    /// error and ReadyForQuery answer the call).
    async fn on_function_call(
        &mut self,
        body: &[u8],
        raw: &[u8],
        io: &mut ClientIo<'_>,
    ) -> Result<Next, DataPathError> {
        let (v, call) = self.function_call_verdict(body, io).await?;
        let Some(v) = self.settle(v, io).await? else {
            return Ok(Next::Close);
        };
        self.copy_plans.clear();
        match (v, call) {
            (Verdict::Allow, Some((result_type, format))) => {
                lock(&self.shared.expect).push_back(Expect::Call {
                    result_type,
                    format,
                    taint: self.taint,
                });
                io.out.extend_from_slice(raw);
            }
            (Verdict::Hold(_), _) => return Err(InternalError::unreachable("held twice")),
            (v, _) => {
                let v = match v {
                    Verdict::Allow => Verdict::Deny("tollgate: fast-path call denied".into()),
                    v => v,
                };
                // Queued before the refusal (see Shared::denials).
                lock(&self.shared.expect).push_back(Expect::Simple(VecDeque::new(), true));
                let sub = self.verdict_substitute(v);
                postgres_protocol::message::frontend::query(&sub, &mut io.out).map_err(internal)?;
            }
        }
        Ok(Next::Forwarded)
    }

    /// The verdict on a FunctionCall, and (result type, format) when the function is known. An
    /// OID the snapshot does not have may be a function created since: re-read it first.
    async fn function_call_verdict(
        &mut self,
        body: &[u8],
        io: &mut ClientIo<'_>,
    ) -> Result<(Verdict, Option<(u32, i16)>), DataPathError> {
        if let Ok(c) = wire::decode_function_call(body) {
            let key = format!("oid:{}", c.oid);
            if self.functions.by_oid(c.oid).is_none() && self.may_retry(&key) && self.idle() {
                self.refresh(io, false).await?;
                if self.functions.by_oid(c.oid).is_none() {
                    self.unknown_after_refresh
                        .insert(key, std::time::Instant::now());
                }
            }
        }
        let call = wire::decode_function_call(body).ok().map(|c| {
            (
                c.oid,
                c.args.len(),
                c.result_format,
                self.functions.by_oid(c.oid).cloned(),
            )
        });
        Ok(match call {
            Some((_, nargs, format, Some(f))) => {
                let sql = format!(
                    "SELECT {}.{}()",
                    quote_ident(&f.schema),
                    quote_ident(&f.name)
                );
                let shown = format!(
                    "fast-path call {}.{}({nargs} argument{})",
                    f.schema,
                    f.name,
                    if nargs == 1 { "" } else { "s" }
                );
                let v = self.judge_as(&sql, &shown, None).await;
                (v, Some((f.result_type, format)))
            }
            other => {
                let what = match other {
                    Some((oid, ..)) => {
                        format!("function OID {oid}, which is not in the catalog snapshot")
                    }
                    None => "a malformed FunctionCall message".into(),
                };
                let d = Decision::deny(tollgate_policy::DecisionReason::NoMatchingRule);
                let _ = self.cx.audit_operation(
                    &self.cx.policy(),
                    "function_call",
                    &format!("fast-path call of {what}"),
                    &d,
                    None,
                );
                (
                    Verdict::Deny(format!("tollgate: fast-path call of {what}; denied")),
                    None,
                )
            }
        })
    }
}

/// The client side's I/O: the client's read half, the server's write half, the bytes read
/// and not yet framed, the bytes decided and not yet written, and the byte counters.
struct ClientIo<'c> {
    cr: ReadHalf,
    uw: WriteHalf,
    buf: BytesMut,
    out: BytesMut,
    counters: &'c Counters,
}

impl ClientIo<'_> {
    /// Write what is decided to the server: one write for a batch of messages.
    async fn write_out(&mut self, cx: &SessionCx) -> Result<(), DataPathError> {
        if !self.out.is_empty() {
            self.uw
                .write_all(&self.out)
                .await
                .map_err(|e| upstream_err(cx, e))?;
            self.counters
                .up
                .fetch_add(self.out.len() as u64, Ordering::Relaxed);
            self.out.clear();
        }
        Ok(())
    }
}

/// What the client side's buffer holds next.
enum Framed {
    /// One whole message and its raw bytes.
    Message(Frontend, Bytes),
    /// Part of a message: read more.
    More,
    /// Bytes that cannot be a message: the session ends.
    Malformed(wire::WireError),
}

/// How the client side goes on after one message.
enum Next {
    /// The message (or its substitute) is queued for the server.
    Forwarded,
    /// A syntax probe is queued (parsed by the server, never run: the lexing stays).
    Probed,
    /// A Terminate that was not forwarded: the server's end may serve the next session.
    Release,
    /// The session ends (a Terminate was forwarded, or the client went away while held).
    Close,
}

/// How much of a large message one read takes.
const RELAY_CHUNK: usize = 128 * 1024;

/// The first bytes of a refused large message that are kept (a Parse's statement name).
const MAX_NAME_PREFIX: usize = 5 + 10_000;

/// Where a relay failed.
#[derive(Debug)]
enum RelayError {
    /// Reading the message: the peer went away.
    Read(std::io::Error),
    /// Writing it on.
    Write(std::io::Error),
    /// `scan` refused it.
    Scan(wire::WireError),
}

/// Relays one message of `total` bytes (tag included) from `r` to `w`, or drops it when `w` is
/// `None`, in pieces as they arrive: at most [`RELAY_CHUNK`] bytes of it are held at once.
/// `buf` holds the start of the message (and maybe more); what follows the message stays in
/// `buf` or unread in `r`. Every piece goes through `scan` before it is written. The last piece
/// is not written but returned, so the caller can note what the message means before the peer
/// can answer it.
async fn relay(
    r: &mut ReadHalf,
    mut w: Option<&mut WriteHalf>,
    buf: &mut BytesMut,
    total: usize,
    mut scan: impl FnMut(&[u8]) -> Result<(), wire::WireError>,
    counter: &AtomicU64,
) -> Result<Bytes, RelayError> {
    let first = buf.split_to(buf.len().min(total)).freeze();
    let mut left = total - first.len();
    scan(&first).map_err(RelayError::Scan)?;
    if left == 0 {
        return Ok(first);
    }
    let mut chunk = vec![0u8; RELAY_CHUNK.min(left)];
    let mut piece: &[u8] = &first;
    loop {
        if let Some(w) = w.as_deref_mut() {
            w.write_all(piece).await.map_err(RelayError::Write)?;
        }
        counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
        let want = chunk.len().min(left);
        let n = r.read(&mut chunk[..want]).await.map_err(RelayError::Read)?;
        if n == 0 {
            return Err(RelayError::Read(std::io::ErrorKind::UnexpectedEof.into()));
        }
        scan(&chunk[..n]).map_err(RelayError::Scan)?;
        left -= n;
        if left == 0 {
            return Ok(Bytes::copy_from_slice(&chunk[..n]));
        }
        piece = &chunk[..n];
    }
}

/// Capacity a quiet session keeps for its next message: none. Its next read takes 64 bytes
/// (what `read_buf` reserves in an empty buffer) and the read after it the usual chunk: a
/// read or two more once per idle period, for 1 KiB less per idle session (both sides).
const IDLE_READ_CAPACITY: usize = 0;

/// How long a session waits for its peer before it releases its buffers: far longer than the
/// pause between round trips of a busy session, short enough that sessions opened in a burst
/// do not all hold their buffers at once.
const IDLE_RELEASE_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Read more bytes into `buf` (reserving `chunk` when it runs low). While bytes keep coming the
/// buffers keep their capacity; when the peer has sent nothing for [`IDLE_RELEASE_AFTER`] and
/// no partial message is pending, `buf` and `out` are released, so an idle session holds a few
/// hundred bytes of buffers instead of tens of KiB. (Releasing at every pause instead cost a
/// 64 KiB allocation per round trip: request/response traffic pauses after every message.)
async fn read_more(
    r: &mut ReadHalf,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    size: &mut ReadSize,
) -> std::io::Result<usize> {
    use std::{future::Future as _, task::Poll};
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(size.chunk);
    }
    let spare = buf.capacity() - buf.len();
    {
        // One poll without waiting: bytes already there are read into the big buffer.
        let mut read = std::pin::pin!(r.read_buf(buf));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(res) = read.as_mut().poll(&mut cx) {
            return size.after(res, spare);
        }
    }
    // Wait, with one timer per side kept armed across reads instead of a timer per read (an
    // insert and a removal in the timer wheel per round trip): a deadline armed by an earlier
    // wait fires early and is moved to this wait's, so a busy session re-arms it at most once
    // per IDLE_RELEASE_AFTER. read_buf is cancel-safe: a read cut short has taken nothing.
    let release_at = tokio::time::Instant::now() + IDLE_RELEASE_AFTER;
    let mut idle = size
        .idle
        .take()
        .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(release_at)));
    if idle.is_elapsed() {
        idle.as_mut().reset(release_at);
    }
    loop {
        tokio::select! {
            biased;
            res = r.read_buf(buf) => {
                size.idle = Some(idle);
                return size.after(res, spare);
            }
            () = idle.as_mut() => {
                if idle.deadline() >= release_at {
                    break;
                }
                idle.as_mut().reset(release_at);
            }
        }
    }
    // Idle: the timer goes with the buffers.
    drop(idle);
    if buf.is_empty() && buf.capacity() > IDLE_READ_CAPACITY {
        *buf = BytesMut::with_capacity(IDLE_READ_CAPACITY);
    }
    if out.is_empty() && out.capacity() > 0 {
        *out = BytesMut::new();
    }
    size.chunk = ReadSize::START;
    r.read_buf(buf).await
}

/// How much a session reserves for its next read: it starts small and doubles (up to `max`)
/// while reads fill what was reserved, so a session that only ever sees small messages never
/// holds a big buffer, and a large result is still read in big chunks.
struct ReadSize {
    chunk: usize,
    max: usize,
    /// The idle timer of [`read_more`], armed at the first wait.
    idle: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl ReadSize {
    const START: usize = 8 * 1024;

    fn new(max: usize) -> ReadSize {
        ReadSize {
            chunk: ReadSize::START.min(max),
            max,
            idle: None,
        }
    }

    fn after(&mut self, res: std::io::Result<usize>, spare: usize) -> std::io::Result<usize> {
        if let Ok(n) = res {
            if n >= spare && self.chunk < self.max {
                self.chunk = (self.chunk * 2).min(self.max);
            }
        }
        res
    }
}

/// Write out what is buffered for the server.
async fn flush(
    uw: &mut WriteHalf,
    out: &mut BytesMut,
    counters: &Counters,
    cx: &SessionCx,
) -> Result<(), DataPathError> {
    if !out.is_empty() {
        uw.write_all(out).await.map_err(|e| upstream_err(cx, e))?;
        counters.up.fetch_add(out.len() as u64, Ordering::Relaxed);
        out.clear();
    }
    uw.flush().await.map_err(|e| upstream_err(cx, e))
}

/// The one mapping of a data-path error to what the PostgreSQL client is told as its session
/// ends: a FATAL ErrorResponse with the SQLSTATE PostgreSQL itself would use. A message that
/// cannot be framed (from either side) keeps its [`wire::WireError`] inside the I/O error, for
/// its own SQLSTATE and text. Refusals of single statements are not session errors: they are
/// ERRORs in the statement's place (see [`refusal_report`]).
fn encode_session_error(e: &DataPathError, out: &mut BytesMut) {
    let wire = |io: &std::io::Error| {
        io.get_ref()
            .and_then(|x| x.downcast_ref::<wire::WireError>())
            .cloned()
    };
    let (code, message) = match e {
        DataPathError::Client(io) => match wire(io) {
            Some(w) => (w.sqlstate(), w.to_string()),
            None => ("08P01", format!("tollgate: {io}")),
        },
        DataPathError::Upstream { source, .. } => match wire(source) {
            Some(w) => (
                "08P01",
                format!("tollgate: malformed message from the server: {w}"),
            ),
            None => (
                "08006",
                "tollgate: the upstream server closed the connection unexpectedly".into(),
            ),
        },
        DataPathError::Policy(d) => (
            "42501",
            format!(
                "tollgate: session ended by policy (rule {})",
                d.rule.as_deref().unwrap_or("none")
            ),
        ),
        DataPathError::Internal(i) => ("XX000", format!("tollgate: internal error: {i}")),
    };
    wire::encode_error_response(&ErrorReport::fatal(code, &message), out);
}

/// What the client sees for a refused statement: an ERROR with the refusal's SQLSTATE, the
/// "ask for access" hint on policy denials, and the parser's position on syntax errors.
fn refusal_report(r: &Refusal) -> ErrorReport<'_> {
    let mut report = ErrorReport::error(r.code, &r.message);
    if r.code == "42501" {
        report = report
            .with_hint("ask for access: a tollgate policy rule must allow this for your identity");
    }
    if let Some(p) = r.position {
        report = report.with_position(p);
    }
    report
}

fn internal(e: std::io::Error) -> DataPathError {
    DataPathError::Client(e)
}

fn upstream_err(cx: &SessionCx, e: std::io::Error) -> DataPathError {
    DataPathError::Upstream {
        addr: cx.orig_dst,
        source: e,
    }
}

/// Decide one statement as this session under `gen` (see `verdict::decide_statement`).
fn decide_statement(cx: &SessionCx, gen: &Generation, s: &Statement) -> (Decision, &'static str) {
    verdict::decide_statement(
        &verdict::Asker {
            policy: &gen.policy,
            identity: cx.identity.as_deref(),
            target: &cx.target.name,
            claims: cx.claims.get(),
        },
        s,
    )
}

fn dangerous_gate(gen: &Generation, s: &Statement, d: Decision) -> Decision {
    verdict::dangerous_gate(&gen.policy, s, d)
}

fn function_gate(gen: &Generation, named: &[&str], d: Decision) -> Decision {
    verdict::function_gate(&gen.policy, named, d)
}

/// The refusal id in a server error about the substitute `'<nonce>-<id>'`.
fn refusal_id(message: &str, nonce: &str) -> Option<u64> {
    let at = message.find(nonce)? + nonce.len();
    let digits: &str = message[at..].strip_prefix('-')?;
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn on_tables(s: &Statement) -> String {
    if s.tables.is_empty() {
        String::new()
    } else {
        format!(" on {}", s.tables.join(", "))
    }
}

fn deny_message(cx: &SessionCx, kind: &str, s: &Statement, d: &Decision) -> String {
    let who = cx.identity.as_deref().unwrap_or("unknown");
    match (&d.rule, s.dangerous.is_empty()) {
        (Some(rule), true) => format!(
            "tollgate: {kind}{} denied by rule \"{rule}\" for identity {who}",
            on_tables(s)
        ),
        (_, false) if s.dangerous.iter().any(|f| f.starts_with("copy:")) => format!(
            "tollgate: {kind}{} reads or writes a file or runs a program on the database server ({}), which no rule allows for identity {who} (a rule allows it with `copy_server_files = true` or `copy_program = true`; from the client use COPY ... TO STDOUT / FROM STDIN, psql's \\copy); denied",
            on_tables(s),
            s.dangerous.join(", ")
        ),
        (_, false) => format!(
            "tollgate: {kind}{} uses {} which no rule explicitly allows for identity {who}; denied",
            on_tables(s),
            s.dangerous.join(", ")
        ),
        (None, true) => format!(
            "tollgate: {kind}{} is not allowed for identity {who} (no rule matches); denied",
            on_tables(s)
        ),
    }
}

/// One result set being streamed: how to read and mask its rows.
/// How one result column is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Detectors only.
    None,
    /// A column rule selects the table column: masked in the rule's style.
    Column,
    /// Computed from (or possibly from) a masked column: masked in full (`mask_derived`).
    Derived,
}

struct RowPlan {
    /// Per column: (format, type oid, how it is masked).
    cols: Vec<(i16, u32, Rule)>,
    /// Columns beyond `cols` (rows of an undescribed portal): their result formats, and whether
    /// they are masked (under column rules: yes, since nothing says which column they are).
    rest_formats: Vec<i16>,
    rest_masked: Rule,
}

/// A plan and what it was made from (see `ServerSide::described_plan`): the same description
/// (the same `Arc`), result formats, taint and catalog snapshot make the same plan.
struct PlanMemo {
    fields: Arc<Vec<wire::Field>>,
    formats: Option<Vec<i16>>,
    taint: bool,
    catalog: Arc<Catalog>,
    plan: Arc<RowPlan>,
}

/// The longest RowDescription a session keeps for reuse (`ServerSide::last_desc`).
const DESC_KEPT: usize = 1024;

/// The server -> client direction: rewrite denial errors, mask rows, record results.
struct ServerSide<'a> {
    cx: &'a SessionCx,
    shared: Arc<Shared>,
    nonce: String,
    masker: Option<Arc<Masker>>,
    catalog: Arc<Catalog>,
    /// RowDescriptions of prepared statements, by name, with the version they describe.
    stmt_descs: HashMap<String, (u64, Arc<Vec<wire::Field>>)>,
    /// RowDescriptions of portals, by name, valid until the portal is bound again, closed, or
    /// may have been replaced (see `Expect::Execute::resets`).
    portal_descs: HashMap<String, Arc<Vec<wire::Field>>>,
    current: Option<Arc<RowPlan>>,
    /// The last RowDescription of a simple query (its bytes, bounded) and its fields: a session
    /// running the same query shape again reuses them instead of decoding each time.
    last_desc: Option<(Vec<u8>, Arc<Vec<wire::Field>>)>,
    /// The last plan made from a description, and what it was made from.
    last_plan: Option<PlanMemo>,
    recorder: Option<Arc<Recorder>>,
    masked_in_statement: u64,
    /// The COPY ... TO STDOUT being masked.
    copy: Option<CopyMasker>,
    /// Reused buffer for masked COPY rows.
    copy_scratch: Vec<u8>,
    /// Reused buffer for a DataRow's value ranges (see `mask_row`).
    row_scratch: Vec<Option<std::ops::Range<usize>>>,
    /// The rest of a COPY's output is withheld (it could not be masked; the client already
    /// got an error): CopyData, CopyDone and its CommandComplete are dropped.
    withhold: bool,
    /// Transaction status of the server's last ReadyForQuery.
    status: u8,
    /// Fires when the client side ended with a Terminate it did not forward.
    released: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Reading the answers of an [`Expect::Refresh`].
    refreshing: Option<RefreshState>,
}

/// SQLSTATE classes whose messages name objects, settings or states but never quote a stored
/// value (connection, feature, transaction state, authorization, syntax and access, resources,
/// operator intervention, system errors). Every other class (data exceptions, integrity
/// violations, check options, PL/pgSQL RAISE, external routines, internal errors) may.
const NO_VALUE_CLASSES: &[&str] = &[
    "08", "0A", "0B", "0L", "0P", "25", "26", "28", "2B", "34", "3B", "3D", "3F", "40", "42", "53",
    "54", "55", "57", "58", "72", "F0",
];

/// Whether an error with SQLSTATE `code` can be passed on under column rules.
fn quotes_no_values(code: &str) -> bool {
    code.get(..2).is_some_and(|c| NO_VALUE_CLASSES.contains(&c))
}

/// Columns of value ranges a session keeps between DataRows (24 bytes each).
const ROW_SCRATCH_KEPT: usize = 64;

/// Types whose binary form is their text (UTF-8): masked like text.
fn text_like(oid: u32) -> bool {
    matches!(oid, 25 | 1043 | 1042 | 19 | 114 | 142 | 705 | 18)
}

/// The format of result column `i` under a Bind's result `formats`.
fn format_at(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}

impl ServerSide<'_> {
    /// Whether column rules exist (rows must be attributable to columns).
    fn column_rules(&self) -> bool {
        self.masker.as_ref().is_some_and(|m| m.has_column_rules())
    }

    /// How columns nothing describes are masked: in full under column rules.
    fn derived_rule(&self) -> Rule {
        if self.column_rules() {
            Rule::Derived
        } else {
            Rule::None
        }
    }

    /// A plan for rows nothing describes: under column rules every value is masked.
    fn blind_plan(&self, formats: &[i16]) -> RowPlan {
        RowPlan {
            cols: Vec::new(),
            rest_formats: formats.to_vec(),
            rest_masked: self.derived_rule(),
        }
    }

    /// The plan for rows described by `fields`; `taint`: computed columns (no table column in
    /// the description) may carry masked values, so they are masked too.
    fn plan(&self, fields: &[wire::Field], formats: Option<&[i16]>, taint: bool) -> RowPlan {
        RowPlan {
            rest_formats: Vec::new(),
            rest_masked: self.derived_rule(),
            cols: fields
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let fmt = match formats {
                        Some(fs) => format_at(fs, i),
                        None => f.format,
                    };
                    let key = (f.table_oid, f.column);
                    let rule = if self.catalog.derived.contains(&key)
                        // A whole row (attribute 0) of a relation with masked columns.
                        || (f.column == 0 && self.catalog.masked_oids.contains(&f.table_oid))
                        // A computed column (no table column), or a system column, in a
                        // statement whose values may derive from masked columns.
                        || (taint && (f.table_oid == 0 || f.column <= 0))
                    {
                        Rule::Derived
                    } else if self.catalog.masked.contains(&key) {
                        Rule::Column
                    } else {
                        Rule::None
                    };
                    (fmt, f.type_oid, rule)
                })
                .collect(),
        }
    }

    /// The server reached `e` (it completed, failed or was skipped): forget the descriptions it
    /// makes void.
    /// Drop the expectations of messages the server refused or skipped: up to the next Sync
    /// when it is `skipping` after an error in an extended-protocol message, else up to the
    /// next message that ends at a ReadyForQuery.
    fn drop_skipped(&mut self, skipping: bool) {
        while let Some(e) = self.pop_if(|e| {
            !matches!(e, Expect::Sync | Expect::Probe(_) | Expect::Refresh(_))
                && (skipping || !ends_at_ready(e))
        }) {
            self.void_refused(&e);
        }
    }

    /// [`Self::void`] for `e`, which the server refused or skipped: a Parse's version is
    /// recorded in [`Refused`].
    fn void_refused(&mut self, e: &Expect) {
        if let Expect::Parse(_, version) | Expect::Bind(_, version) = e {
            lock(&self.shared.refused).versions.push(*version);
            self.shared.refused_some.store(true, Ordering::Relaxed);
            self.shared.refused_new.store(true, Ordering::Release);
        }
        self.void(e);
    }

    /// Whether statement `version`'s Parse did not take (see [`Refused`]).
    fn refused(&self, version: u64) -> bool {
        self.shared.refused_some.load(Ordering::Relaxed)
            && lock(&self.shared.refused).versions.contains(&version)
    }

    fn void(&mut self, e: &Expect) {
        match e {
            Expect::Parse(name, _) => {
                self.stmt_descs.remove(name);
            }
            Expect::Bind(portal, _) => {
                self.portal_descs.remove(portal);
            }
            Expect::Close(b'S', name) => {
                self.stmt_descs.remove(name);
            }
            Expect::Close(_, name) => {
                self.portal_descs.remove(name);
            }
            Expect::Execute {
                portal,
                resets: true,
                ..
            } => {
                // It may have declared, closed or replaced cursors: only its own portal's
                // description (for a suspended portal's next Execute) is kept.
                self.portal_descs.retain(|name, _| name == portal);
            }
            _ => {}
        }
    }

    /// Mask one DataRow; None if unchanged.
    fn mask_row(&mut self, raw: &[u8]) -> Result<Option<BytesMut>, DataPathError> {
        let (Some(m), Some(plan)) = (self.masker.as_ref(), self.current.as_ref()) else {
            return Ok(None);
        };
        // The row's values as ranges of `raw`, in a buffer every row of the session reuses.
        let mut ranges = std::mem::take(&mut self.row_scratch);
        wire::data_row_ranges(raw, &mut ranges).map_err(|e| DataPathError::Upstream {
            addr: self.cx.orig_dst,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
        let values = ranges.iter().map(|r| r.clone().map(|r| &raw[r]));
        // Most rows need no change: only masked fields are collected (no allocation otherwise),
        // and the row is re-encoded only when there is one.
        let mut changes: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        let mut fired: Vec<&'static str> = Vec::new();
        for (i, v) in values.clone().enumerate() {
            let (fmt, oid, col_rule) = plan.cols.get(i).copied().unwrap_or((
                format_at(&plan.rest_formats, i),
                0,
                plan.rest_masked,
            ));
            let Some(bytes) = v else {
                continue;
            };
            let as_text = fmt == 0 || text_like(oid);
            let r = if as_text {
                match col_rule {
                    Rule::Derived => Some(m.mask_derived(bytes)),
                    Rule::Column => m.mask_text(bytes, true),
                    Rule::None => m.mask_text(bytes, false),
                }
            } else if col_rule != Rule::None {
                // A masked column in a binary format we cannot rewrite: never pass it through.
                Some(Masked::Null(vec!["column"]))
            } else if oid == 20 && bytes.len() == 8 {
                // int8 can carry card numbers: check its decimal form, NULL it if it is one.
                let n = i64::from_be_bytes([
                    bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
                ]);
                match m.mask_text(n.to_string().as_bytes(), false) {
                    Some(Masked::Value(_, d)) | Some(Masked::Null(d)) => Some(Masked::Null(d)),
                    None => None,
                }
            } else {
                None
            };
            match r {
                None => {}
                Some(Masked::Value(v, d)) => {
                    fired.extend(d);
                    changes.push((i, Some(v)));
                }
                Some(Masked::Null(d)) => {
                    fired.extend(d);
                    changes.push((i, None));
                }
            }
        }
        let new: Option<Vec<Option<&[u8]>>> = (!changes.is_empty()).then(|| values.collect());
        // Kept for the next row, unless a very wide row made it large.
        if ranges.capacity() <= ROW_SCRATCH_KEPT {
            self.row_scratch = ranges;
        }
        let Some(mut new) = new else {
            return Ok(None);
        };
        for (i, v) in &changes {
            new[*i] = v.as_deref();
        }
        for d in &fired {
            self.cx
                .agent
                .metrics
                .masked_values
                .with_label_values(&[self.cx.target.name.as_str(), d])
                .inc();
        }
        self.masked_in_statement += fired.len() as u64;
        let mut out = BytesMut::with_capacity(raw.len());
        wire::encode_data_row(&new, &mut out).map_err(InternalError::encode)?;
        Ok(Some(out))
    }

    /// The plan made for the COPY ... TO STDOUT whose CopyOutResponse just arrived.
    fn take_copy_plan(&self) -> Option<Arc<CopyPlan>> {
        match lock(&self.shared.expect).front_mut() {
            Some(Expect::Simple(plans, _)) => plans.pop_front(),
            // No plan holds for an older text than the one it was made for.
            Some(Expect::Execute {
                copy,
                statement,
                bound,
                ..
            }) => copy.take().filter(|_| {
                !self.refused(*bound) && !statement.as_ref().is_some_and(|(_, v)| self.refused(*v))
            }),
            _ => None,
        }
    }

    /// Refuse the rest of a COPY's output: the client gets a 42501 error now (in COPY OUT
    /// state that ends the COPY for it, as a server-side error would), and everything the
    /// server still sends for this COPY is dropped.
    fn withhold_copy(&mut self, why: &str, out: &mut BytesMut) {
        let msg = format!("tollgate: COPY ... TO STDOUT output withheld: {why}");
        tracing::warn!(target = %self.cx.target.name, "{msg}");
        wire::encode_error_response(
            &ErrorReport::error("42501", &msg)
                .with_hint("use SELECT, or COPY table [(columns)] TO STDOUT in text or CSV format"),
            out,
        );
        self.withhold = true;
        self.copy = None;
    }

    /// Mask one CopyData payload (or, with `done`, the last unterminated row) into `out`.
    fn copy_data(
        &mut self,
        data: &[u8],
        done: bool,
        out: &mut BytesMut,
    ) -> Result<(), DataPathError> {
        let (Some(cm), Some(m)) = (self.copy.as_mut(), self.masker.as_deref()) else {
            return Ok(());
        };
        let mut rows = std::mem::take(&mut self.copy_scratch);
        rows.clear();
        let r = if done {
            cm.finish(m, &mut rows)
        } else {
            cm.feed(data, m, &mut rows)
        };
        let result = match r {
            Ok(fired) => {
                for d in &fired {
                    self.cx
                        .agent
                        .metrics
                        .masked_values
                        .with_label_values(&[self.cx.target.name.as_str(), d])
                        .inc();
                }
                self.masked_in_statement += fired.len() as u64;
                if !rows.is_empty() {
                    wire::encode_copy_data(&rows, out).map_err(InternalError::encode)?;
                }
                Ok(())
            }
            Err(e) => {
                self.withhold_copy(&e.to_string(), out);
                Ok(())
            }
        };
        self.copy_scratch = rows;
        result
    }

    fn record_result(&mut self, tag: Option<&str>, error: Option<&str>) {
        let masked = std::mem::take(&mut self.masked_in_statement);
        if let Some(r) = &self.recorder {
            r.write_line(
                Line::new("")
                    .str("event", "result")
                    .str("session", &self.cx.id)
                    .opt("tag", tag)
                    .val("rows", tag.and_then(wire::command_rows))
                    .val("masked", masked)
                    .opt("error", error),
            );
        }
    }

    async fn run(
        mut self,
        mut ur: ReadHalf,
        mut cw: WriteHalf,
        mut buf: BytesMut,
        counters: &Counters,
    ) -> Result<Option<(ReadHalf, BytesMut, u8)>, DataPathError> {
        let mut out = BytesMut::with_capacity(ReadSize::START);
        let mut size = ReadSize::new(64 * 1024);
        loop {
            loop {
                let parsed = wire::parse_backend(&mut buf);
                if !matches!(parsed, Ok(Some(_))) {
                    // Incomplete, or too long to hold: a large row is relayed in pieces when
                    // no mask applies to it (see `large`).
                    if let Some(l) = wire::large_backend(&buf) {
                        if self
                            .large(l, &mut ur, &mut cw, &mut buf, &mut out, counters)
                            .await?
                        {
                            continue;
                        }
                    }
                }
                let (tag, raw) = match parsed {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        let e = self.bad(e);
                        encode_session_error(&e, &mut out);
                        let _ = cw.write_all(&out).await;
                        let _ = cw.shutdown().await;
                        return Err(e);
                    }
                };
                self.on_message(tag, raw, &mut out)?;
                if out.len() > 64 * 1024 {
                    cw.write_all(&out).await.map_err(DataPathError::Client)?;
                    counters.down.fetch_add(out.len() as u64, Ordering::Relaxed);
                    out.clear();
                }
            }
            if !out.is_empty() {
                cw.write_all(&out).await.map_err(DataPathError::Client)?;
                counters.down.fetch_add(out.len() as u64, Ordering::Relaxed);
                out.clear();
            }
            cw.flush().await.map_err(DataPathError::Client)?;
            // Everything parsed so far is written: a notice goes between whole messages.
            let released = async {
                match self.released.as_mut() {
                    Some(rx) => rx.await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                r = read_more(&mut ur, &mut buf, &mut out, &mut size) => r,
                ok = released => {
                    self.released = None;
                    if ok {
                        // The client left with a Terminate that was not forwarded.
                        let _ = cw.shutdown().await;
                        return Ok(Some((ur, buf, self.status)));
                    }
                    continue;
                }
                () = self.shared.notice.notified() => {
                    loop {
                        let Some(n) = self.shared.next_notice() else { break };
                        cw.write_all(&n).await.map_err(DataPathError::Client)?;
                        counters.down.fetch_add(n.len() as u64, Ordering::Relaxed);
                    }
                    cw.flush().await.map_err(DataPathError::Client)?;
                    continue;
                }
            };
            match read {
                Ok(0) => {
                    // A FATAL the client side queued before it shut the upstream down.
                    loop {
                        let Some(n) = self.shared.next_notice() else {
                            break;
                        };
                        let _ = cw.write_all(&n).await;
                    }
                    let _ = cw.shutdown().await;
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) => {
                    // The server went away mid-stream: tell the client in its own language.
                    let e = upstream_err(self.cx, e);
                    let mut o = BytesMut::new();
                    encode_session_error(&e, &mut o);
                    let _ = cw.write_all(&o).await;
                    let _ = cw.shutdown().await;
                    return Err(e);
                }
            }
        }
    }

    /// A server message too large to hold (see [`wire::large_backend`]). With no mask on it,
    /// it is relayed in pieces as it arrives; withheld output is read and dropped. A row a mask
    /// applies to must be held whole: up to [`wire::MAX_MESSAGE_LEN`] it is (false: parse it
    /// as usual); beyond, the client gets 54000 instead and the rest of the statement's output
    /// is withheld, as a server error in the middle of a result ends it. Never a raw value.
    async fn large(
        &mut self,
        l: wire::Large,
        ur: &mut ReadHalf,
        cw: &mut WriteHalf,
        buf: &mut BytesMut,
        out: &mut BytesMut,
        counters: &Counters,
    ) -> Result<bool, DataPathError> {
        if self.shared.refresh_queued.load(Ordering::Acquire)
            && matches!(lock(&self.shared.expect).front(), Some(Expect::Refresh(_)))
        {
            // The answer to the agent's own catalog query: held, and bounded, as any.
            return Ok(false);
        }
        // Detectors read every text value a masker sees, so under a masker every row is
        // inspected; COPY output is inspected when it is being masked.
        let masked = match l.tag {
            b'd' => self.copy.is_some(),
            _ => self.masker.is_some(),
        };
        let mut drop = self.withhold && l.tag != wire::FUNCTION_CALL_RESPONSE_TAG;
        if masked && !drop {
            if l.total - 1 <= wire::MAX_MESSAGE_LEN {
                return Ok(false);
            }
            let what = match l.tag {
                b'D' => "a row",
                b'd' => "a COPY row",
                _ => "a function result",
            };
            let msg = format!(
                "tollgate: {what} of {} bytes is too large to mask (limit {} bytes); the rest of the output is withheld",
                l.total - 5,
                wire::MAX_MESSAGE_LEN - 4
            );
            tracing::warn!(target = %self.cx.target.name, "{msg}");
            wire::encode_error_response(
                &ErrorReport::error("54000", &msg).with_hint(
                    "a mask applies to this target: read large values in pieces (substring)",
                ),
                out,
            );
            self.record_result(None, Some(&msg));
            if l.tag != wire::FUNCTION_CALL_RESPONSE_TAG {
                self.withhold = true;
                self.copy = None;
                self.current = None;
            }
            drop = true;
        }
        if !out.is_empty() {
            cw.write_all(out).await.map_err(DataPathError::Client)?;
            counters.down.fetch_add(out.len() as u64, Ordering::Relaxed);
            out.clear();
        }
        let dropped = AtomicU64::new(0);
        let (w, counter) = if drop {
            (None, &dropped)
        } else {
            (Some(cw), &counters.down)
        };
        let last = relay(ur, w, buf, l.total, |_| Ok(()), counter)
            .await
            .map_err(|e| match e {
                RelayError::Write(e) => DataPathError::Client(e),
                RelayError::Read(source) => DataPathError::Upstream {
                    addr: self.cx.orig_dst,
                    source,
                },
                RelayError::Scan(e) => DataPathError::Upstream {
                    addr: self.cx.orig_dst,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                },
            })?;
        if !drop {
            out.extend_from_slice(&last);
        }
        Ok(true)
    }

    /// One message of the answer to the agent's own catalog queries: read, never forwarded.
    fn on_refresh(&mut self, job: Arc<RefreshJob>, tag: u8, raw: &[u8]) {
        let masker = self.masker.clone();
        let st = self.refreshing.get_or_insert_with(|| RefreshState {
            catalog: job.catalog.then(catalog::Reader::default),
            ..RefreshState::default()
        });
        if let Some(r) = st.catalog.as_mut() {
            let done = match masker.as_deref() {
                Some(m) => r.feed(m, tag, raw),
                None if tag == b'Z' => Some(Err(std::io::Error::other("no masker"))),
                None => None,
            };
            if let Some(res) = done {
                st.catalog = None;
                st.catalog_done = Some(res.map(Arc::new));
            }
            return;
        }
        let Some(funcs) = st.functions.feed(tag, raw) else {
            return;
        };
        let st = self.refreshing.take().unwrap_or_default();
        self.status = raw.get(5).copied().unwrap_or(self.status);
        if let Some(Ok(c)) = &st.catalog_done {
            // The server side plans RowDescriptions with the same snapshot as the client side
            // decides with; later messages come after this answer.
            self.catalog = c.clone();
        }
        {
            let mut ex = lock(&self.shared.expect);
            ex.pop_front();
            self.shared.refresh_queued.store(false, Ordering::Release);
            if ex.is_empty() {
                lock(&self.shared.lexing).settled = true;
            }
        }
        if let Some(tx) = lock(&job.done).take() {
            let _ = tx.send((st.catalog_done, funcs.map(Arc::new)));
        }
    }

    fn on_message(&mut self, tag: u8, raw: Bytes, out: &mut BytesMut) -> Result<(), DataPathError> {
        if self.shared.refresh_queued.load(Ordering::Acquire) && !matches!(tag, b'A' | b'S' | b'N')
        {
            let job = match lock(&self.shared.expect).front() {
                Some(Expect::Refresh(job)) => Some(job.clone()),
                _ => None,
            };
            if let Some(job) = job {
                self.on_refresh(job, tag, &raw);
                return Ok(());
            }
        }
        match tag {
            b'T' => self.on_row_description(&raw)?,
            b'n' => {
                // NoData answers a Describe: the statement or portal returns no rows.
                match self.pop_if(|e| {
                    matches!(e, Expect::DescribeStatement(..) | Expect::DescribePortal(_))
                }) {
                    Some(Expect::DescribeStatement(n, _)) => {
                        self.stmt_descs.remove(&n);
                    }
                    Some(Expect::DescribePortal(n)) => {
                        self.portal_descs.remove(&n);
                    }
                    _ => {}
                }
            }
            b'1' => {
                let probe = match lock(&self.shared.expect).front() {
                    Some(Expect::Probe(message)) => Some(message.clone()),
                    _ => None,
                };
                if let Some(message) = probe {
                    // The server's parser accepted what this classifier's grammar (a newer
                    // PostgreSQL's) rejects: the text is not run, and the client gets the
                    // classifier's error. Without a position: the server reports such checks
                    // (`PARTITION BY MAGIC`) when it runs the statement, where they have none.
                    self.stmt_descs.remove("");
                    self.record_result(None, Some(&message));
                    wire::encode_error_response(&ErrorReport::error("42601", &message), out);
                    return Ok(());
                }
                // ParseComplete: the statement's old description no longer applies.
                if let Some(e) = self.pop_if(|e| matches!(e, Expect::Parse(..))) {
                    self.void(&e);
                }
            }
            b'2' | b'3' => {
                // BindComplete / CloseComplete: the portal's (statement's) old description
                // no longer applies.
                if let Some(e) = self.pop_if(|e| matches!(e, Expect::Bind(..) | Expect::Close(..)))
                {
                    self.void(&e);
                }
            }
            // The rest of a result refused with 54000 (see `large`).
            b'D' if self.withhold => return Ok(()),
            b'D' => {
                if self.current.is_none() {
                    self.current = Some(self.execute_plan());
                }
                if let Some(m) = self.mask_row(&raw)? {
                    out.extend_from_slice(&m);
                    return Ok(());
                }
            }
            b'H' => return self.on_copy_response(&raw, out),
            b'd' | b'c' if self.withhold => return Ok(()),
            b'd' if self.copy.is_some() => return self.copy_data(&raw[5..], false, out),
            b'c' if self.copy.is_some() => {
                self.copy_data(&[], true, out)?;
                if self.withhold {
                    return Ok(());
                }
            }
            b'C' | b's' if self.withhold => {
                // The server finished (or suspended) a statement whose output was withheld:
                // the client already has its error, so the completion is not passed on.
                self.withhold = false;
                self.copy = None;
                self.current = None;
                self.pop_if(|e| matches!(e, Expect::Execute { .. }));
                let tagtxt = wire::decode_command_complete(&raw).ok();
                self.record_result(tagtxt, Some("COPY output withheld by tollgate"));
                return Ok(());
            }
            wire::FUNCTION_CALL_RESPONSE_TAG if self.masker.is_some() => {
                return self.on_function_result(&raw, out)
            }
            b'S' => match wire::decode_parameter_status(&raw) {
                Ok(("client_encoding", v)) => {
                    *lock(&self.shared.unsafe_encoding) = unsafe_encoding_name(v);
                }
                Ok(("standard_conforming_strings", v)) => {
                    lock(&self.shared.lexing).scs = classify::Escapes::from_setting(v);
                }
                _ => {}
            },
            b'C' | b's' | b'I' => {
                self.copy = None;
                if let Some(e) = self.pop_if(|e| matches!(e, Expect::Execute { .. })) {
                    self.void(&e);
                }
                if tag != b's' {
                    let tagtxt = if tag == b'C' {
                        wire::decode_command_complete(&raw).ok()
                    } else {
                        None
                    };
                    self.record_result(tagtxt, None);
                }
                self.current = None;
            }
            b'E' => return self.on_error(&raw, out),
            b'Z' => self.on_ready(&raw),
            _ => {}
        }
        out.extend_from_slice(&raw);
        Ok(())
    }

    /// A malformed message from the server, as the session's error.
    fn bad(&self, e: wire::WireError) -> DataPathError {
        upstream_err(
            self.cx,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    }

    /// Pops the front expectation if `pred` holds for it.
    fn pop_if(&self, pred: impl FnOnce(&Expect) -> bool) -> Option<Expect> {
        let mut ex = lock(&self.shared.expect);
        if ex.front().is_some_and(pred) {
            ex.pop_front()
        } else {
            None
        }
    }

    /// A RowDescription: the description of a Describe's statement or portal, or the plan of
    /// the simple query's rows that follow.
    fn on_row_description(&mut self, raw: &[u8]) -> Result<(), DataPathError> {
        let fields = match &self.last_desc {
            Some((bytes, fields)) if bytes[..] == *raw => fields.clone(),
            _ => {
                let fields = Arc::new(wire::decode_row_description(raw).map_err(|e| self.bad(e))?);
                self.last_desc = (raw.len() <= DESC_KEPT).then(|| (raw.to_vec(), fields.clone()));
                fields
            }
        };
        let taint = match self
            .pop_if(|e| matches!(e, Expect::DescribeStatement(..) | Expect::DescribePortal(_)))
        {
            Some(Expect::DescribeStatement(name, version)) => {
                self.stmt_descs.insert(name, (version, fields));
                return Ok(());
            }
            Some(Expect::DescribePortal(name)) => {
                self.portal_descs.insert(name, fields);
                return Ok(());
            }
            // Simple query: formats are in the message. Nothing we sent asks for any other
            // description: trust none of its columns to be plain.
            _ => match lock(&self.shared.expect).front() {
                Some(Expect::Simple(_, taint)) => *taint,
                _ => true,
            },
        };
        self.current = Some(self.described_plan(&fields, None, taint));
        Ok(())
    }

    /// The plan for the rows of the Execute the server is answering: the portal's own
    /// description (a Describe after its Bind), else that of the exact statement version it
    /// was bound from; rows nothing describes are masked whole under column rules.
    fn execute_plan(&mut self) -> Arc<RowPlan> {
        let shared = self.shared.clone();
        let ex = lock(&shared.expect);
        let Some(Expect::Execute {
            portal,
            statement,
            bound,
            formats,
            taint,
            ..
        }) = ex.front()
        else {
            return Arc::new(self.blind_plan(&[]));
        };
        // Bound from a version whose Parse did not take, or by a Bind that did not: the
        // portal runs something older.
        let taint = *taint
            || self.refused(*bound)
            || statement
                .as_ref()
                .is_some_and(|(_, version)| self.refused(*version));
        let desc = self.portal_descs.get(portal).or_else(|| {
            let (name, version) = statement.as_ref()?;
            self.stmt_descs
                .get(&**name)
                .filter(|(v, _)| v == version)
                .map(|(_, d)| d)
        });
        match desc.cloned() {
            Some(d) => self.described_plan(&d, Some(formats), taint),
            None => Arc::new(self.blind_plan(formats)),
        }
    }

    /// [`Self::plan`], or the last plan when it was made from the same description, formats,
    /// taint and catalog snapshot (a session repeating one statement: no plan per result).
    fn described_plan(
        &mut self,
        fields: &Arc<Vec<wire::Field>>,
        formats: Option<&[i16]>,
        taint: bool,
    ) -> Arc<RowPlan> {
        if let Some(m) = &self.last_plan {
            if Arc::ptr_eq(&m.fields, fields)
                && m.formats.as_deref() == formats
                && m.taint == taint
                && Arc::ptr_eq(&m.catalog, &self.catalog)
            {
                return m.plan.clone();
            }
        }
        let plan = Arc::new(self.plan(fields, formats, taint));
        self.last_plan = Some(PlanMemo {
            fields: fields.clone(),
            formats: formats.map(<[i16]>::to_vec),
            taint,
            catalog: self.catalog.clone(),
            plan: plan.clone(),
        });
        plan
    }

    /// A CopyOutResponse: its output is masked by the plan made for it, or withheld.
    fn on_copy_response(&mut self, raw: &[u8], out: &mut BytesMut) -> Result<(), DataPathError> {
        let resp = wire::decode_copy_response(raw).map_err(|e| self.bad(e))?;
        let plan = self.take_copy_plan();
        if self.masker.is_none() {
            out.extend_from_slice(raw);
            return Ok(());
        }
        match plan {
            Some(p) if resp.format == 0 => {
                self.copy = Some(CopyMasker::new(p));
                out.extend_from_slice(raw);
            }
            // Binary output, or a COPY no plan was made for: nothing of it may pass.
            Some(_) => self.withhold_copy(&copy::CopyError::Binary.to_string(), out),
            None => self.withhold_copy("COPY output that tollgate did not plan to mask", out),
        }
        Ok(())
    }

    /// A fast-path result is one computed value: masked as SQL masks `SELECT f()`.
    fn on_function_result(&mut self, raw: &[u8], out: &mut BytesMut) -> Result<(), DataPathError> {
        let call = match lock(&self.shared.expect).front() {
            Some(Expect::Call {
                result_type,
                format,
                taint,
            }) => Some((*result_type, *format, *taint)),
            _ => None,
        };
        let plan = match call {
            Some((result_type, format, taint)) => RowPlan {
                cols: vec![(
                    format,
                    result_type,
                    if taint {
                        self.derived_rule()
                    } else {
                        Rule::None
                    },
                )],
                ..self.blind_plan(&[])
            },
            None => self.blind_plan(&[1]),
        };
        // As a one-column DataRow: Int16 count, then the Int32 length and value.
        let mut row = BytesMut::with_capacity(raw.len() + 2);
        row.extend_from_slice(b"D");
        row.extend_from_slice(&((raw.len() - 1 + 2) as i32).to_be_bytes());
        row.extend_from_slice(&1i16.to_be_bytes());
        row.extend_from_slice(&raw[5..]);
        let saved = self.current.replace(Arc::new(plan));
        let masked = self.mask_row(&row);
        self.current = saved;
        match masked? {
            Some(m) => {
                // Back to a FunctionCallResponse: drop the count.
                out.extend_from_slice(&[wire::FUNCTION_CALL_RESPONSE_TAG]);
                out.extend_from_slice(&((m.len() - 1 - 2) as i32).to_be_bytes());
                out.extend_from_slice(&m[7..]);
            }
            None => out.extend_from_slice(raw),
        }
        Ok(())
    }

    /// An ErrorResponse: a refusal's substitute failing becomes the refusal; under column
    /// rules a server error that may quote a value keeps only its SQLSTATE.
    fn on_error(&mut self, raw: &[u8], out: &mut BytesMut) -> Result<(), DataPathError> {
        self.withhold = false;
        self.copy = None;
        let en = wire::decode_error_notice(raw).map_err(|e| self.bad(e))?;
        // Extended protocol: the server now skips to Sync; so do our expectations. Messages the
        // client sends after this, up to its Sync, are skipped too (`on_ready`).
        let skipping = {
            let ex = lock(&self.shared.expect);
            let skip = ex.front().is_some_and(extended);
            if skip {
                self.shared.skipping.store(true, Ordering::Relaxed);
            }
            skip || self.shared.skipping.load(Ordering::Relaxed)
        };
        self.drop_skipped(skipping);
        self.current = None;
        if let Some(id) = en.message().and_then(|m| refusal_id(m, &self.nonce)) {
            let r = {
                let mut q = lock(&self.shared.denials);
                // Refusals whose substitutes the server skipped (aborted transaction).
                while q.front().is_some_and(|r| r.id < id) {
                    q.pop_front();
                }
                q.pop_front().filter(|r| r.id == id)
            }
            .unwrap_or_else(|| Refusal {
                id,
                code: "42501",
                message: "tollgate: statement denied".into(),
                position: None,
            });
            self.record_result(None, Some(&r.message));
            wire::encode_error_response(&refusal_report(&r), out);
        } else if self.column_rules() && !quotes_no_values(en.code().unwrap_or("")) {
            // Data errors quote the value that failed (`invalid input syntax for type
            // integer: "a@example.com"`, `Key (email)=(...)`, RAISE): a cast or a constraint
            // would unmask a column. Only the SQLSTATE goes on.
            let code = en.code().unwrap_or("XX000").to_string();
            let msg = format!(
                "tollgate: error {code} (the server's message is withheld on this target: it may quote values of masked columns)"
            );
            self.record_result(None, Some(&msg));
            let report = ErrorReport::error(&code, &msg);
            let report = if en.severity() == Some("FATAL") {
                ErrorReport {
                    severity: wire::Severity::Fatal,
                    ..report
                }
            } else {
                report
            };
            wire::encode_error_response(&report, out);
        } else {
            self.record_result(None, Some(en.message().unwrap_or("")));
            out.extend_from_slice(raw);
        }
        Ok(())
    }

    /// A ReadyForQuery: the server finished what it was answering.
    fn on_ready(&mut self, raw: &[u8]) {
        self.status = raw.get(5).copied().unwrap_or(0);
        self.withhold = false;
        self.copy = None;
        // Everything before the message this answers was answered or skipped after an error:
        // a client may send more of the failed batch (simple queries too) after the server's
        // ErrorResponse has been read here, and those messages get no answer at all.
        // (Cleared before the Sync's own expectation goes, so the client side never sees an
        // empty queue with a skip that has ended.)
        let skipping = self.shared.skipping.swap(false, Ordering::Relaxed);
        self.drop_skipped(skipping);
        let ended_simple = self
            .pop_if(ends_at_ready)
            .is_some_and(|e| !matches!(e, Expect::Sync));
        if ended_simple {
            // A simple query replaces the unnamed statement and portal, and its statements
            // may declare or close cursors.
            self.stmt_descs.remove("");
            self.portal_descs.clear();
        }
        {
            // Everything forwarded is answered: the ParameterStatus values reported before
            // this ReadyForQuery are what the next message is lexed with.
            let ex = lock(&self.shared.expect);
            if ex.is_empty() {
                lock(&self.shared.lexing).settled = true;
                // Every substitute was answered: refusals left were skipped.
                lock(&self.shared.denials).clear();
                // No Execute is queued: refused versions the client side has applied are no
                // longer needed here.
                if self.shared.refused_some.load(Ordering::Relaxed) {
                    let mut r = lock(&self.shared.refused);
                    if r.applied == r.versions.len() {
                        r.versions.clear();
                        r.applied = 0;
                        self.shared.refused_some.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        if self.status == b'I' {
            // Out of a transaction: its portals are gone (holdable cursors aside, which are
            // then described again or masked whole).
            self.portal_descs.clear();
        }
        self.current = None;
    }
}

#[cfg(test)]
mod read_more_tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A busy session keeps its buffers across many round trips, past the age of the idle
    /// timer armed by its first wait (that timer fires early and is moved, not obeyed); a
    /// session left idle releases them, and reads again afterwards.
    #[tokio::test]
    async fn buffers_stay_while_bytes_keep_coming_and_go_when_idle() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut peer = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (ours, _) = l.accept().await.expect("accept");
        let (r, _w) = ours.into_split();
        let mut r = ReadHalf::Plain(r);
        let (mut buf, mut out) = (BytesMut::new(), BytesMut::with_capacity(4096));
        let mut size = ReadSize::new(16 * 1024);

        let start = Instant::now();
        let mut checked = 0;
        while start.elapsed() < 4 * IDLE_RELEASE_AFTER {
            let sent = Instant::now();
            let writer = async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                peer.write_all(b"x").await.expect("write");
            };
            let (n, ()) = tokio::join!(read_more(&mut r, &mut buf, &mut out, &mut size), writer);
            assert_eq!(n.expect("read"), 1);
            buf.clear();
            // Only a wait well under the idle time proves anything (a loaded machine may
            // stretch a 5 ms sleep).
            if sent.elapsed() < IDLE_RELEASE_AFTER / 2 {
                assert!(
                    buf.capacity() >= 4096,
                    "a busy session lost its read buffer"
                );
                assert!(
                    out.capacity() >= 4096,
                    "a busy session lost its output buffer"
                );
                checked += 1;
            }
        }
        assert!(
            checked >= 10,
            "only {checked} round trips were quick enough to check"
        );

        let later = async {
            tokio::time::sleep(3 * IDLE_RELEASE_AFTER).await;
            peer.write_all(b"yz").await.expect("write");
        };
        let (n, ()) = tokio::join!(read_more(&mut r, &mut buf, &mut out, &mut size), later);
        assert_eq!(n.expect("read"), 2);
        assert_eq!(&buf[..], b"yz");
        // What `read_buf` reserves in an empty buffer to read into.
        assert!(buf.capacity() <= 64, "{}", buf.capacity());
        assert_eq!(out.capacity(), 0, "the idle session kept its output buffer");
        assert!(size.idle.is_none(), "the idle session kept its timer");
    }
}

#[cfg(test)]
mod session_error_tests {
    use super::*;

    /// The (severity, SQLSTATE, message) the client is told for `e`.
    fn told(e: &DataPathError) -> (String, String, String) {
        let mut out = BytesMut::new();
        encode_session_error(e, &mut out);
        let en = wire::decode_error_notice(&out).expect("an ErrorResponse");
        (
            en.severity().unwrap_or("").to_string(),
            en.code().unwrap_or("").to_string(),
            en.message().unwrap_or("").to_string(),
        )
    }

    #[test]
    fn every_session_error_is_a_fatal_with_postgres_sqlstate() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
        let framing = wire::WireError::UnknownMessage(b'?');
        let too_many = wire::WireError::TooMany {
            what: "DataRow",
            count: 2,
            limit: 1,
        };
        let cases = [
            // A client message that cannot be framed keeps the WireError's own SQLSTATE.
            (
                DataPathError::Client(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    framing.clone(),
                )),
                framing.sqlstate(),
                framing.to_string(),
            ),
            (
                DataPathError::Client(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    too_many.clone(),
                )),
                "54000",
                too_many.to_string(),
            ),
            (
                DataPathError::Upstream {
                    addr,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, framing.clone()),
                },
                "08P01",
                format!("tollgate: malformed message from the server: {framing}"),
            ),
            (
                DataPathError::Upstream {
                    addr,
                    source: std::io::ErrorKind::ConnectionReset.into(),
                },
                "08006",
                "tollgate: the upstream server closed the connection unexpectedly".into(),
            ),
            (
                InternalError::unreachable("test"),
                "XX000",
                "tollgate: internal error: unexpected state: test".into(),
            ),
        ];
        for (e, code, message) in cases {
            assert_eq!(
                told(&e),
                ("FATAL".to_string(), code.to_string(), message),
                "{e}"
            );
        }
    }
}
