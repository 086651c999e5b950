//! The SSH handler (`protocol = "ssh"`): a russh server faces the bot, a russh client logs in
//! upstream with the target's credential, and every channel request is decided on its own.
//!
//! # Layout
//! - `mod.rs` (this file): [`SshHandler`], the adapter to the session contract
//!   ([`crate::proxy::ProtocolHandler`] / [`crate::proxy::SessionCx`]); the bot-facing russh
//!   server handler, which only answers requests in order and hands channels to the session loop.
//! - `channel`: one session channel: collect pty/env, decide exec/shell/subsystem, open the
//!   upstream channel, pass data, EOF, window changes, signals and exit status both ways.
//! - `ca`: the agent's SSH CA (host certificates for the name or IP dialled).
//! - `cast`: asciicast v2 recordings of terminals.
//! - `pool`: idle upstream connections kept for the identity's next bot connection.
//! - `upstream`: the russh client: `known_hosts` check (fail closed) and credential injection.
//!
//! Bot authentication: the identity is the kernel's attribution, so any public key, password or
//! `none` is accepted; keys and passwords are never logged or forwarded.
//!
//! Host key toward the bot: the target's `host_key_file` (the real server's own key, so the
//! bot's `known_hosts` is untouched); otherwise a host certificate from the agent's SSH CA for
//! the name or IP dialled (`tollgate ca export --ssh` prints the `@cert-authority` line).

pub mod ca;
pub(crate) mod cast;
mod channel;
pub mod pool;
pub(crate) mod terminal;
pub mod upstream;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use futures_util::stream::{FuturesUnordered, StreamExt};
use russh::{
    server::{self, Auth, Msg, Session},
    Channel, ChannelId,
};
use tokio::{net::TcpStream, sync::mpsc};
use tollgate_policy::{decide, Operation, Protocol, Request, SshOpKind};

use crate::{
    relay::Totals,
    session::{BoxFuture, DataPathError, ProtocolHandler, SessionCx},
};

/// Detectors always applied to SSH commands in the audit log and recordings.
pub const SSH_DETECTORS: &[&str] = &["private_key", "aws_access_key", "jwt", "bearer_token"];

/// The SSH protocol handler, built once (`handlers.rs`): what its sessions share lives in its
/// fields, not in statics.
#[derive(Default)]
pub struct SshHandler {
    /// Idle upstream connections kept for reuse (`pool.rs`).
    pool: pool::Pool,
    /// The agent's SSH CA, per data directory (`ca.rs`).
    cas: ca::Cas,
}

impl ProtocolHandler for SshHandler {
    fn protocol(&self) -> Protocol {
        Protocol::Ssh
    }
    /// Every channel request is decided on its own.
    fn inspects(&self) -> bool {
        true
    }
    fn serve<'a>(
        &'a self,
        cx: &'a SessionCx,
        client: TcpStream,
    ) -> BoxFuture<'a, Result<Totals, DataPathError>> {
        Box::pin(serve(self, cx, client, cx.agent.hash_key))
    }
    fn on_reload(&self, old: &crate::session::Generation, new: &tollgate_policy::Policy) {
        // Idle upstream connections of a target the new policy changed, removed or stopped
        // pooling: dropped (which closes them), as the PostgreSQL handler's are.
        let closed = self
            .pool
            .remove_targets(|name| crate::session::target_changed(&old.policy, new, name))
            .len();
        if closed > 0 {
            tracing::info!(
                closed,
                "closed idle SSH upstream connections of changed targets"
            );
        }
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Kept upstream connections: say goodbye to the servers rather than vanish.
            let bye = self
                .pool
                .remove_targets(|_| true)
                .into_iter()
                .map(|up| async move {
                    let _ = up
                        .handle
                        .disconnect(russh::Disconnect::ByApplication, "", "")
                        .await;
                });
            let all = futures_util::future::join_all(bye);
            let _ = tokio::time::timeout(std::time::Duration::from_millis(500), all).await;
        })
    }
}

/// What the bot-facing handler tells the session loop.
enum Event {
    /// Authentication done, as this user (recorded; upstream uses the credential's user).
    Authed(String),
    /// A password from a bot whose identity needs a workload token: the loop checks it with
    /// the session's shared check (audit, observe mode) and answers.
    Token(String, String, tokio::sync::oneshot::Sender<bool>),
    /// A session channel was opened.
    Session(Channel<Msg>),
    /// A direct-tcpip channel (`ssh -L`, `-D`) was opened, already allowed by policy.
    DirectTcpip(Channel<Msg>, String, u32),
    /// A forwarding-kind request (env, agent, X11, -L/-D/-R) was decided in the handler: the
    /// loop audits and counts it.
    Forward(&'static str, String, tollgate_policy::Decision),
}

/// Counts shared with the channels.
#[derive(Default)]
pub(crate) struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

async fn serve(
    h: &SshHandler,
    cx: &SessionCx,
    client: TcpStream,
    hash_key: [u8; 32],
) -> Result<Totals, DataPathError> {
    let (host_key, certificates) = match &cx.target.host_key_file {
        Some(path) => (
            russh::keys::load_secret_key(path, None).map_err(|e| {
                config_error(format!(
                    "cannot load host_key_file {} of target {}: {e}",
                    path.display(),
                    cx.target.name
                ))
            })?,
            Vec::new(),
        ),
        None => {
            let ca = h
                .cas
                .get(&cx.gen.policy.agent.data_dir)
                .map_err(config_error)?;
            let mut principals = vec![cx.orig_dst.ip().to_string()];
            principals.extend(cx.dialled_host());
            let cert = ca.host_cert(&principals).map_err(config_error)?;
            (ca.host_key(), vec![cert])
        }
    };
    let config = Arc::new(server::Config {
        keys: vec![host_key],
        certificates,
        auth_rejection_time: std::time::Duration::from_millis(0),
        auth_rejection_time_initial: Some(std::time::Duration::from_millis(0)),
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let oidc = oidc_of(cx);
    let self_tx = tx.clone();
    let bot = BotSide {
        tx,
        oidc,
        agent: cx.agent.clone(),
        identity: cx.identity.clone(),
        target: cx.target.name.clone(),
    };
    let running = server::run_stream(config, client, bot)
        .await
        .map_err(|e| DataPathError::Client(std::io::Error::other(e.to_string())))?;
    let server_handle = running.handle();
    let counters = Arc::new(Counters::default());
    let masker = crate::mask::Masker::with_detectors(
        SSH_DETECTORS,
        tollgate_policy::MaskStyle::Full,
        hash_key,
    );
    let recorder = cx.open_recorder();
    let mut upstream: Option<Result<Arc<channel::Upstream>, String>> = None;
    let mut pool_key = None;
    let mut channels = FuturesUnordered::new();
    let mut running = std::pin::pin!(running);
    // The handler's sender goes away with the russh session; stop polling it then.
    let mut events_open = true;
    let result = loop {
        tokio::select! {
            ev = rx.recv(), if events_open => {
                let Some(ev) = ev else {
                    events_open = false;
                    continue;
                };
                match ev {
                    Event::Token(user, token, reply) => {
                        let ok = match &oidc_of(cx) {
                            Some(o) => match cx.check_workload_token(o, token.trim()).await {
                                crate::session::workload::WorkloadAuth::Verified(c) => {
                                    let _ = cx.claims.set(crate::oidc::claim_values(&c));
                                    true
                                }
                                crate::session::workload::WorkloadAuth::Unverified => true,
                                crate::session::workload::WorkloadAuth::Refused(_) => false,
                            },
                            None => true,
                        };
                        // Authed first: the bot opens channels only after the reply.
                        if ok {
                            let _ = self_tx.send(Event::Authed(user));
                        }
                        let _ = reply.send(ok);
                    }
                    Event::Authed(user) => {
                        if upstream.is_none() {
                            upstream = Some(connect_upstream(cx, &h.pool, &user).await.map(|(up, key)| {
                                pool_key = Some(key);
                                up
                            }));
                            if let Some(r) = &recorder {
                                r.write(cx.start_event(serde_json::json!({ "client_user": user })));
                            }
                        }
                    }
                    Event::Session(ch) => {
                        let up = upstream.clone().unwrap_or_else(|| Err("not authenticated".into()));
                        channels.push(Box::pin(channel::session(channel::ChannelCx {
                            cx,
                            server: server_handle.clone(),
                            upstream: up,
                            counters: counters.clone(),
                            masker: &masker,
                            recorder: recorder.clone(),
                        }, ch)) as BoxFuture<'_, ()>);
                    }
                    Event::Forward(kind, what, d) => audit_forward(cx, kind, &what, &d),
                    Event::DirectTcpip(ch, host, port) => {
                        let up = upstream.clone().unwrap_or_else(|| Err("not authenticated".into()));
                        channels.push(Box::pin(channel::direct_tcpip(cx, up, counters.clone(), recorder.clone(), ch, host, port)));
                    }
                }
            }
            Some(()) = channels.next(), if !channels.is_empty() => {}
            r = &mut running => {
                break r.map_err(|e| DataPathError::Client(std::io::Error::other(e.to_string())));
            }
        }
    };
    // Channels still finishing (the bot often disconnects right after its channel's close)
    // write their recording lines; bounded, their bot side is gone.
    let drain = async { while channels.next().await.is_some() {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
    // Decisions the handler made just before the bot left are still audited.
    while let Ok(ev) = rx.try_recv() {
        if let Event::Forward(kind, what, d) = ev {
            audit_forward(cx, kind, &what, &d);
        }
    }
    if let Some(Ok(up)) = upstream {
        // A session that ended cleanly leaves its upstream connection for the identity's next
        // one (`pool`, default on); otherwise it is closed.
        let kept = match (cx.target.pool && result.is_ok(), pool_key) {
            (true, Some(key)) => h.pool.put(key, up),
            (_, _) => Err(up),
        };
        if let Err(up) = kept {
            let _ = up
                .handle
                .disconnect(russh::Disconnect::ByApplication, "", "")
                .await;
        }
    }
    let totals = Totals {
        bytes_up: counters.up.load(Ordering::Relaxed),
        bytes_down: counters.down.load(Ordering::Relaxed),
    };
    cx.add_bytes(totals);
    result.map(|_| totals)
}

/// The pure policy decision on a forwarding-kind request (`kind` `what`, e.g. `env LANG`).
pub(crate) fn decide_forward(
    policy: &tollgate_policy::Policy,
    identity: Option<&str>,
    target: &str,
    kind: &str,
    what: &str,
) -> tollgate_policy::Decision {
    decide(
        policy,
        &Request {
            claims: None,
            identity,
            target,
            inspected: true,
            op: Operation::Ssh {
                kind: SshOpKind::Forward,
                command: &format!("{kind} {what}"),
            },
        },
    )
}

fn audit_forward(cx: &SessionCx, kind: &str, what: &str, d: &tollgate_policy::Decision) {
    let shown = format!("{kind} {what}");
    cx.audit_operation(&cx.policy(), "ssh", shown.trim_end(), d, Some(kind));
    cx.agent
        .metrics
        .ssh_channel(&cx.target.name, kind, d.action.as_str());
}

fn config_error(msg: String) -> DataPathError {
    DataPathError::Internal(crate::session::InternalError::Config(msg))
}

/// The identity's workload OIDC, if it has one.
fn oidc_of(cx: &SessionCx) -> Option<tollgate_policy::IdentityOidc> {
    cx.identity
        .as_deref()
        .and_then(|n| cx.gen.policy.identity(n))
        .and_then(|i| i.oidc.clone())
}

/// Log in upstream as the credential's user (or the bot's, when the credential names none).
async fn connect_upstream(
    cx: &SessionCx,
    pool: &pool::Pool,
    bot_user: &str,
) -> Result<(Arc<channel::Upstream>, pool::PoolKey), String> {
    let gen = cx.agent.gen.load();
    let cred = cx
        .target
        .credential
        .as_deref()
        .and_then(|c| gen.policy.credentials.get(c));
    let Some(cred) = cred else {
        return Err(format!(
            "target {} has no credential: the agent injects the upstream login (add `credential = \"...\"` with key_file or password_file)",
            cx.target.name
        ));
    };
    let login = upstream::Login {
        user: cred.user.clone().unwrap_or_else(|| bot_user.to_string()),
        key_file: cred.key_file.clone(),
        cert_file: cred.cert_file.clone(),
        password_file: cred.password_file.clone(),
    };
    let key = pool::PoolKey {
        target: cx.target.name.clone(),
        identity: cx.identity.clone(),
        server: cx.orig_dst,
        user: login.user.clone(),
        key_file: login.key_file.clone(),
        cert_file: login.cert_file.clone(),
        password_file: login.password_file.clone(),
        known_hosts: cx.target.known_hosts.clone(),
    };
    if cx.target.pool {
        if let Some(up) = pool.take(&key) {
            cx.audit_event(
                "upstream_login",
                crate::obj(serde_json::json!({ "user": login.user, "client_user": bot_user, "reused": true })),
            );
            return Ok((up, key));
        }
    }
    let stream = cx.connect_upstream().await.map_err(|e| e.to_string())?;
    let mut hosts = Vec::new();
    if let Some(h) = cx.dialled_host() {
        hosts.push((h, cx.orig_dst.port()));
    }
    hosts.push((cx.orig_dst.ip().to_string(), cx.orig_dst.port()));
    let handle = upstream::connect(stream, cx.target.known_hosts.clone(), hosts, &login)
        .await
        .map_err(|e| e.to_string())?;
    cx.audit_event(
        "upstream_login",
        crate::obj(
            serde_json::json!({ "user": login.user, "client_user": bot_user, "reused": false }),
        ),
    );
    Ok((Arc::new(channel::Upstream { handle }), key))
}

/// The bot-facing russh handler. It answers every request in order (replies must follow the
/// requests' order) and leaves the work to the session loop.
struct BotSide {
    tx: mpsc::UnboundedSender<Event>,
    /// The identity's workload OIDC: then only a valid token as the password logs in.
    oidc: Option<tollgate_policy::IdentityOidc>,
    agent: Arc<crate::session::Agent>,
    identity: Option<String>,
    target: String,
}

impl BotSide {
    /// Whether policy allows a forwarding-kind request (`-L`, `-D`, env, agent, X11). Pure: the
    /// channel audits the decision it enforces.
    fn forwarding_allowed(&self, kind: &'static str, what: &str) -> bool {
        let gen = self.agent.gen.load();
        let d = decide_forward(
            &gen.policy,
            self.identity.as_deref(),
            &self.target,
            kind,
            what,
        );
        let allowed = d.action == tollgate_policy::Action::Allow
            && !matches!(
                kind,
                "x11" | "auth-agent" | "tcpip-forward" | "streamlocal-forward"
            );
        let d = if allowed || d.action == tollgate_policy::Action::Deny {
            d
        } else {
            // Allowed by policy but not supported here, or `approve` (which a forwarding request
            // cannot wait for): refused, and the audit says so.
            tollgate_policy::Decision {
                action: tollgate_policy::Action::Deny,
                ..d
            }
        };
        let _ = self.tx.send(Event::Forward(kind, what.to_string(), d));
        allowed
    }

    /// Any key or `none` logs in, unless the identity needs a workload token.
    fn authed(&self, user: &str) -> Result<Auth, russh::Error> {
        if self.oidc.is_some() {
            return Ok(Auth::Reject {
                proceed_with_methods: Some(russh::MethodSet::from(
                    &[
                        russh::MethodKind::Password,
                        russh::MethodKind::KeyboardInteractive,
                    ][..],
                )),
                partial_success: false,
            });
        }
        let _ = self.tx.send(Event::Authed(user.to_string()));
        Ok(Auth::Accept)
    }

    /// The session loop checks `token` (the identity's workload OIDC token) and answers.
    async fn token(&self, user: &str, token: String) -> Auth {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Event::Token(user.to_string(), token, reply));
        match answer.await {
            Ok(true) => Auth::Accept,
            _ => Auth::reject(),
        }
    }
}

impl server::Handler for BotSide {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.authed(user)
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        // Never logged, never forwarded: the kernel's attribution is the identity. An identity
        // with workload OIDC presents its token here instead.
        if self.oidc.is_none() {
            return self.authed(user);
        }
        Ok(self.token(user, password.to_string()).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if self.oidc.is_none() {
            return self.authed(user);
        }
        // One prompt, not echoed; its answer is the token, checked like a password.
        match response.map(|mut r| r.next()) {
            None => Ok(Auth::Partial {
                name: "tollgate".into(),
                instructions: "This identity logs in with its workload OIDC token.".into(),
                prompts: vec![("Token: ".into(), false)].into(),
            }),
            Some(Some(answer)) => {
                let token = String::from_utf8_lossy(&answer).into_owned();
                Ok(self.token(user, token).await)
            }
            // A response without an answer.
            Some(None) => Ok(Auth::reject()),
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.authed(user)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let _ = self.tx.send(Event::Session(channel));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.forwarding_allowed("direct-tcpip", &format!("{host}:{port}")) {
            reply.accept().await;
            let _ = self
                .tx
                .send(Event::DirectTcpip(channel, host.to_string(), port));
        } else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.forwarding_allowed("env", name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Not supported in this version, whatever the policy says (fail closed).
        self.forwarding_allowed("x11", "");
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The bot's agent would let the bastion sign for it: never forwarded in this version.
        self.forwarding_allowed("auth-agent", "");
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Remote forwarding (`ssh -R`) is not supported in this version (fail closed).
        self.forwarding_allowed("tcpip-forward", &format!("{address}:{port}"));
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.forwarding_allowed("streamlocal-forward", socket_path);
        Ok(false)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted at once (replies must stay in order); the channel decides and, when policy
        // refuses, ends it with a stderr message and exit status 126.
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
}
