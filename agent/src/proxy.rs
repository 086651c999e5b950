//! The data path in userspace: accept a redirected connection, attribute it, find its target,
//! decide, then hand it to the protocol handler; write audit, metrics and the close event
//! exactly once per session.
//!
//! Phases of a session (see ARCHITECTURE.md): accept -> attribute (kernel facts) -> target ->
//! `decide(Connect)` -> handler (`on_operation` decisions through [`SessionCx::decide`],
//! upstream through [`SessionCx::connect_upstream`]) -> close (the [`SessionGuard`]).

use crate::{lock, obj};
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde_json::{json, Map, Value};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::task::TaskTracker;
use tollgate_common::ConnInfo;
use tollgate_policy::{
    decide, Action, Decision, Mode, Operation, Policy, Protocol, Request, Target, TargetAddress,
    WorkloadFacts,
};
use tracing::{debug, warn, Instrument};

use crate::{
    audit::Audit,
    bpf::{self, AGENT_MARK},
    identity::{Facts, Resolver},
    metrics::Metrics,
    relay::{self, RelayKind, Totals},
    targets::Routes,
};

/// Where the original destination and kernel facts of an accepted connection come from: the
/// eBPF maps in production, a table in in-process tests.
pub trait ConnSource: Send + Sync {
    /// The record of the client at `peer` whose connection was accepted on `local`.
    fn take_conn(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnInfo>;
    /// The process's current exec generation (see `ConnInfo::exec_gen`).
    fn exec_gen(&self, pid: u32) -> u64;
}

impl ConnSource for bpf::Datapath {
    fn take_conn(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnInfo> {
        bpf::Datapath::take_conn(self, peer, local)
    }
    fn exec_gen(&self, pid: u32) -> u64 {
        bpf::Datapath::exec_gen(self, pid)
    }
}

/// One policy generation: the parsed policy and the routes built from it.
pub struct Generation {
    pub policy: Policy,
    pub routes: Routes,
}

/// Where an error on the data path came from (pingora's habit): it decides the metric label
/// and what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    /// The client misbehaved or went away.
    #[error("client: {0}")]
    Client(io::Error),
    /// The upstream could not be reached or failed.
    #[error("upstream {addr}: {source}")]
    Upstream { addr: SocketAddr, source: io::Error },
    /// Policy refused the connection or an operation.
    #[error("policy: {0}")]
    Policy(String),
    /// A bug or resource problem in the agent.
    #[error("internal: {0}")]
    Internal(String),
}

impl DataPathError {
    /// The one place errors become a bounded label.
    pub fn label(&self) -> &'static str {
        match self {
            DataPathError::Client(_) => "client",
            DataPathError::Upstream { .. } => "upstream",
            DataPathError::Policy(_) => "policy",
            DataPathError::Internal(_) => "internal",
        }
    }
}

/// What an approval request came to. `Unavailable` (no broker on this agent: no admin
/// listener to approve through) must be treated as a deny with a clear message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Approved by these distinct approvers (subjects).
    Approved {
        id: u64,
        approvers: Vec<String>,
    },
    /// Denied by `approver`, with an optional comment.
    Denied {
        id: u64,
        approver: String,
        comment: Option<String>,
    },
    /// Nobody decided within the rule's `timeout` (or the request was closed otherwise).
    Expired {
        id: u64,
        reason: String,
    },
    Unavailable,
}

impl ApprovalOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            ApprovalOutcome::Approved { .. } => "approved",
            ApprovalOutcome::Denied { .. } => "denied",
            ApprovalOutcome::Expired { .. } => "expired",
            ApprovalOutcome::Unavailable => "unavailable",
        }
    }

    fn of(r: &crate::approvals::ApprovalRequest) -> ApprovalOutcome {
        use crate::approvals::Status;
        match r.status {
            Status::Approved => ApprovalOutcome::Approved {
                id: r.id,
                approvers: r.approvals.iter().map(|v| v.subject.clone()).collect(),
            },
            Status::Denied => ApprovalOutcome::Denied {
                id: r.id,
                approver: r
                    .denied_by
                    .as_ref()
                    .map(|v| v.subject.clone())
                    .unwrap_or_default(),
                comment: r.denied_by.as_ref().and_then(|v| v.comment.clone()),
            },
            Status::Expired | Status::Cancelled | Status::Pending => ApprovalOutcome::Expired {
                id: r.id,
                reason: r.reason.clone().unwrap_or_else(|| "expired".into()),
            },
        }
    }
}

/// Default `timeout` of an approve rule.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);

/// A protocol handler (postgres, ssh, http, kubernetes, tcp). The agent has already attributed
/// the connection and admitted it; the handler classifies operations, asks
/// [`SessionCx::decide`] for each, connects upstream with [`SessionCx::connect_upstream`],
/// applies its response hooks (masking) and returns the byte totals when the session ends.
pub trait ProtocolHandler: Send + Sync {
    fn protocol(&self) -> Protocol;
    fn serve<'a>(
        &'a self,
        cx: &'a SessionCx,
        client: TcpStream,
    ) -> Pin<Box<dyn Future<Output = Result<Totals, DataPathError>> + Send + 'a>>;
}

/// Opaque TCP relay (`protocol = "tcp"`, and any whole-connection allow).
pub struct TcpHandler {
    pub kind: RelayKind,
}

impl ProtocolHandler for TcpHandler {
    fn protocol(&self) -> Protocol {
        Protocol::Tcp
    }
    fn serve<'a>(
        &'a self,
        cx: &'a SessionCx,
        client: TcpStream,
    ) -> Pin<Box<dyn Future<Output = Result<Totals, DataPathError>> + Send + 'a>> {
        Box::pin(async move {
            let upstream = cx.connect_upstream().await?;
            let counted = (AtomicU64::new(0), AtomicU64::new(0));
            let r = relay::relay(self.kind, client, upstream, &counted).await;
            let totals = Totals {
                bytes_up: counted.0.load(Ordering::Relaxed),
                bytes_down: counted.1.load(Ordering::Relaxed),
            };
            cx.add_bytes(totals);
            r.map(|_| totals).map_err(DataPathError::Client)
        })
    }
}

/// Shared agent state.
pub struct Agent {
    pub gen: ArcSwap<Generation>,
    pub conns: Arc<dyn ConnSource>,
    pub resolver: Resolver,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub resolved: Mutex<HashMap<String, Vec<IpAddr>>>,
    /// The addresses on this network namespace's interfaces (followed through netlink): a
    /// local target protects its port on each of them.
    pub local: Mutex<crate::targets::LocalAddrs>,
    /// Held while routes are rebuilt, written to the kernel and swapped in, so a policy reload,
    /// a DNS refresh and an address change never interleave.
    pub routes_update: Mutex<()>,
    pub relay_kind: RelayKind,
    pub upstream_timeout: Duration,
    /// `SO_MARK` for upstream sockets (None only in in-process tests, which load no programs).
    pub upstream_mark: Option<u32>,
    /// Key of the `hash` masking style: stable per installation (`<data_dir>/mask.key`).
    pub hash_key: [u8; 32],
    /// The agent's CA for bot-side TLS (None: bots' TLS requests are refused).
    pub ca: Option<Arc<crate::tls::Ca>>,
    /// The approval broker (None: no way to approve, so `approve` decisions are refused).
    pub approvals: Option<Arc<dyn crate::approvals::ApprovalStore>>,
    /// Session threads (None: sessions run on the runtime that accepted them, as in-process
    /// tests do).
    pub plane: Option<crate::plane::Plane>,
    next_session: AtomicU64,
    started_ms: u64,
}

impl Agent {
    pub fn new(
        gen: Generation,
        conns: Arc<dyn ConnSource>,
        resolver: Resolver,
        audit: Audit,
        metrics: Arc<Metrics>,
    ) -> Agent {
        let max = gen.policy.agent.max_connections.max(1);
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Agent {
            gen: ArcSwap::from_pointee(gen),
            conns,
            resolver,
            audit,
            metrics,
            limiter: Arc::new(Semaphore::new(max)),
            tracker: TaskTracker::new(),
            resolved: Mutex::new(HashMap::new()),
            local: Mutex::new(crate::targets::LocalAddrs::new()),
            routes_update: Mutex::new(()),
            relay_kind: RelayKind::from_env(),
            upstream_timeout: Duration::from_secs(10),
            upstream_mark: Some(AGENT_MARK),
            hash_key: [0; 32],
            ca: None,
            approvals: None,
            plane: None,
            next_session: AtomicU64::new(1),
            started_ms,
        }
    }

    fn session_id(&self) -> String {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", self.started_ms)
    }

    /// Accept loop for one listener; returns when `stop` fires.
    pub async fn serve_listener(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let Ok(permit) = self.limiter.clone().try_acquire_owned() else {
                            // Over the concurrency cap: refuse fast rather than queue unboundedly.
                            self.metrics.rejected.with_label_values(&["limit"]).inc();
                            reset(stream);
                            continue;
                        };
                        let agent = self.clone();
                        match &self.plane {
                            Some(plane) => {
                                // Handed over as a std socket: a tokio socket belongs to the
                                // runtime that registered it.
                                let stream = match stream.into_std() {
                                    Ok(s) => s,
                                    Err(e) => {
                                        warn!(error = %e, "cannot hand a connection to a session thread");
                                        continue;
                                    }
                                };
                                plane.spawn(self.tracker.track_future(async move {
                                    match TcpStream::from_std(stream) {
                                        Ok(stream) => agent.handle(stream, peer).await,
                                        Err(e) => warn!(error = %e, "session thread cannot take a connection"),
                                    }
                                    drop(permit);
                                }));
                            }
                            None => {
                                self.tracker.spawn(async move {
                                    agent.handle(stream, peer).await;
                                    drop(permit);
                                });
                            }
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }

    /// One connection, start to end.
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let info = stream
            .local_addr()
            .ok()
            .and_then(|local| self.conns.take_conn(peer, local));
        let Some(info) = info else {
            // Not redirected by our hooks (someone dialled the listener directly, or the record
            // was lost): nothing to attribute, nothing to allow.
            self.metrics
                .rejected
                .with_label_values(&["unattributed"])
                .inc();
            warn!(%peer, "connection without a kernel record refused");
            reset(stream);
            return;
        };
        let orig = bpf::orig_dst(&info);
        let mut facts = self.resolver.facts(&info);
        // /proc/<pid>/exe was read after the connect; if the process exec'd (or exited and its
        // pid was reused) in between, that path describes another program: don't trust it.
        if self.conns.exec_gen(info.pid) != info.exec_gen {
            warn!(
                pid = info.pid,
                "process exec'd after connecting; its exe is not used for identity"
            );
            facts.exe = None;
            facts.exe_verified = false;
        }
        let gen = self.gen.load_full();
        let id = self.session_id();
        let span = tracing::info_span!("conn", conn_id = %id, %peer, orig_dst = %orig, identity = tracing::field::Empty, target = tracing::field::Empty, protocol = tracing::field::Empty);
        async move {
            // An unresolvable cgroup matches no identity (fail closed).
            let identity = facts.cgroup.as_deref().and_then(|cgroup| {
                gen.policy
                    .identify(&WorkloadFacts {
                        cgroup,
                        uid: facts.uid,
                        user: facts.user.as_deref(),
                        // Only a path that names the very file the process runs.
                        exe: facts.exe.as_deref().filter(|_| facts.exe_verified),
                        comm: &facts.comm,
                        foreign_userns: facts.foreign_userns,
                    })
                    .map(|i| i.name.clone())
            });
            let target = gen.routes.lookup(orig).and_then(|i| gen.policy.targets.get(i)).cloned();
            let span = tracing::Span::current();
            span.record("identity", identity.as_deref().unwrap_or("unknown"));
            let Some(target) = target else {
                // The route vanished between the kernel redirect and now (policy reload).
                self.metrics.rejected.with_label_values(&["no_target"]).inc();
                self.audit.write(obj(json!({
                    "event": "connect", "session": id, "identity": identity, "target": null,
                    "protocol": null, "operation": "connect", "action": "deny", "rule": null,
                    "reason": "unknown_target", "orig_dst": orig.to_string(), "peer": peer.to_string(),
                    "pid": facts.pid, "uid": facts.uid, "user": facts.user, "cgroup": facts.cgroup, "exe": facts.exe, "comm": facts.comm,
                    "exe_dev": facts.exe_dev, "exe_ino": facts.exe_ino, "exe_verified": facts.exe_verified, "foreign_userns": facts.foreign_userns,
                })));
                reset(stream);
                return;
            };
            span.record("target", target.name.as_str());
            span.record("protocol", target.protocol.as_str());
            let cx = SessionCx {
                id,
                identity,
                target,
                facts,
                orig_dst: orig,
                peer,
                agent: self.clone(),
                gen: gen.clone(),
                claims: std::sync::OnceLock::new(),
                started: Instant::now(),
                bytes: (AtomicU64::new(0), AtomicU64::new(0)),
                base_json: std::sync::OnceLock::new(),
                decided: std::sync::OnceLock::new(),
            };
            cx.run(stream).await;
        }
        .instrument(span)
        .await
    }

    /// Re-resolve host-name targets and rebuild routes when an address changed.
    pub fn set_resolved(&self, name: String, addrs: Vec<IpAddr>) -> bool {
        let mut r = lock(&self.resolved);
        let changed = r.get(&name) != Some(&addrs);
        r.insert(name, addrs);
        changed
    }

    pub fn resolved_snapshot(&self) -> HashMap<String, Vec<IpAddr>> {
        lock(&self.resolved).clone()
    }

    /// Record the current interface addresses; true if they changed.
    pub fn set_local(&self, addrs: crate::targets::LocalAddrs) -> bool {
        let mut l = lock(&self.local);
        let changed = *l != addrs;
        *l = addrs;
        changed
    }

    /// The route table for `policy` with the current resolved and local addresses.
    pub fn routes_for(&self, policy: &tollgate_policy::Policy) -> crate::targets::Routes {
        let local = lock(&self.local).clone();
        crate::targets::Routes::build(policy, &self.resolved_snapshot(), &local)
    }
}

/// What a client (or the agent's log) is told while the audit log cannot be written.
pub fn audit_refusal(error: &str, what: &str) -> String {
    format!("tollgate: the audit log cannot be written ({error}); {what} are refused until it can")
}

/// Refuse a PostgreSQL client before anything reaches the server: answer an SSLRequest or
/// GSSENCRequest with `N`, read its startup message (bounded, 2 s), then send a FATAL with
/// SQLSTATE `code` and `message` and close.
async fn refuse_postgres(mut stream: TcpStream, code: &str, message: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
            return Ok::<(), io::Error>(());
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read_startup).await;
    let mut out = bytes::BytesMut::new();
    crate::pg::wire::encode_error_response(
        &crate::pg::wire::ErrorReport::fatal(code, message),
        &mut out,
    );
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

/// Close with RST so the client sees a refusal at once, not an orderly EOF.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Everything a handler knows about its session, and the services it may call.
pub struct SessionCx {
    pub id: String,
    pub identity: Option<String>,
    pub target: Target,
    pub facts: Facts,
    pub orig_dst: SocketAddr,
    pub peer: SocketAddr,
    pub agent: Arc<Agent>,
    /// The policy generation the session started under; operations are decided under the
    /// newest one (see [`SessionCx::decide`]).
    pub gen: Arc<Generation>,
    /// Verified workload OIDC claims (claim name to values), set once by a handler after the
    /// bot's token checked out; rules with a `claims` condition are decided against them.
    pub claims: std::sync::OnceLock<std::collections::BTreeMap<String, Vec<String>>>,
    started: Instant,
    bytes: (AtomicU64, AtomicU64),
    /// [`SessionCx::base`], serialized once for the per-operation audit lines.
    base_json: std::sync::OnceLock<String>,
    /// `tollgate_decisions_total` for this session's labels: allow, deny, approve.
    decided: std::sync::OnceLock<[prometheus::IntCounter; 3]>,
}

impl SessionCx {
    fn base_json(&self) -> &str {
        self.base_json
            .get_or_init(|| crate::audit::Line::fields(&self.base()))
    }

    fn base(&self) -> Map<String, Value> {
        obj(json!({
            "session": self.id,
            "identity": self.identity,
            "target": self.target.name,
            "protocol": self.target.protocol.as_str(),
            "pid": self.facts.pid,
            "uid": self.facts.uid,
            "user": self.facts.user,
            "cgroup": self.facts.cgroup,
            "exe": self.facts.exe,
            "comm": self.facts.comm,
            "peer": self.peer.to_string(),
            "orig_dst": self.orig_dst.to_string(),
        }))
    }

    fn count_decision(&self, action: &str) {
        let counter = |action: &str| {
            self.agent.metrics.decisions.with_label_values(&[
                self.identity.as_deref().unwrap_or("unknown"),
                &self.target.name,
                self.target.protocol.as_str(),
                action,
            ])
        };
        let i = match action {
            "allow" => 0,
            "deny" => 1,
            "approve" => 2,
            other => return counter(other).inc(),
        };
        self.decided
            .get_or_init(|| [counter("allow"), counter("deny"), counter("approve")])[i]
            .inc();
    }

    /// `on_operation`: decide one operation under the current policy, audit it and count it.
    /// `text` is the operation as the audit log shows it (already masked by the handler).
    /// In observe mode the returned decision is always allow; the audit keeps the real one.
    pub fn decide(&self, op: Operation<'_>, text: &str) -> Decision {
        let gen = self.agent.gen.load();
        let d = decide(
            &gen.policy,
            &Request {
                claims: None,
                identity: self.identity.as_deref(),
                target: &self.target.name,
                op,
            },
        );
        self.audit_operation(op.kind_str(), text, &d, None)
    }

    /// Audit and count a decision a handler reached itself (for example the strictest of
    /// several kinds of one SQL statement). `flags` notes what made it special (dangerous
    /// functions, unparseable input). Returns the decision to enforce: in observe mode, allow.
    pub fn audit_operation(
        &self,
        kind: &str,
        text: &str,
        d: &Decision,
        flags: Option<&str>,
    ) -> Decision {
        let observe = self.agent.gen.load().policy.agent.mode == Mode::Observe;
        self.agent.audit.write_line(
            crate::audit::Line::new(self.base_json())
                .str("event", "operation")
                .str("operation", text)
                .str("kind", kind)
                .str("action", d.action.as_str())
                .opt("rule", d.rule.as_deref())
                .str("reason", d.reason.as_str())
                .opt("flags", flags)
                .val("enforced", !observe),
        );
        self.count_decision(d.action.as_str());
        if observe {
            Decision {
                action: Action::Allow,
                ..d.clone()
            }
        } else {
            d.clone()
        }
    }

    /// Fail-closed audit, the statement hook: `Err(message for the client)` while the audit
    /// log or recordings cannot be written (disk full, I/O error) under `fail_mode = "closed"`.
    /// The refusal is audited (an attempt that may itself fail) and counted as a deny.
    /// `fail_mode = "open"` keeps serving; `/healthz` and the metric still report.
    pub fn audit_gate(&self, shown: &str) -> Result<(), String> {
        let Err(e) = self.agent.audit.check() else {
            return Ok(());
        };
        if self.agent.gen.load().policy.agent.fail_mode == tollgate_policy::FailMode::Open {
            return Ok(());
        }
        let d = Decision {
            action: Action::Deny,
            rule: None,
            reason: tollgate_policy::DecisionReason::NoMatchingRule,
        };
        self.audit_operation("sql", shown, &d, Some("audit_unwritable"));
        Err(audit_refusal(&e, "statements"))
    }

    /// Audit a session event other than an operation (e.g. `auth` for a workload token check):
    /// the session's base fields, `event`, then `fields`. Callers never put secrets in `fields`.
    pub fn audit_event(&self, event: &str, fields: Map<String, Value>) {
        let mut ev = self.base();
        ev.insert("event".into(), event.into());
        ev.extend(fields);
        self.agent.audit.write(ev);
    }

    /// The approval hook, first half: hold `operation` (as the audit shows it, masked) for a
    /// human under `decision` (an `approve` decision naming its rule). `Err` with the reason
    /// when this agent has no broker or its store is unavailable: the handler refuses the
    /// operation with that message (fail closed). The request is cancelled if the returned
    /// ticket is dropped before [`SessionCx::wait_approval`] ends.
    pub async fn open_approval(
        &self,
        operation: &str,
        kind: &str,
        decision: &Decision,
    ) -> Result<crate::approvals::Ticket, String> {
        let Some(broker) = self.agent.approvals.clone() else {
            return Err("approval is not available on this agent".into());
        };
        let req = {
            let gen = self.agent.gen.load();
            let rule_name = decision.rule.clone().unwrap_or_default();
            let rule = gen.policy.rule(&rule_name);
            crate::approvals::NewRequest {
                identity: self.identity.clone(),
                // A workload that presented a token is also known by its subject: an approver
                // with that subject is the requester and cannot decide the request.
                workload_subject: self
                    .claims
                    .get()
                    .and_then(|c| c.get("sub"))
                    .and_then(|v| v.first().cloned()),
                target: self.target.name.clone(),
                protocol: self.target.protocol.as_str().into(),
                session: self.id.clone(),
                operation: operation.to_string(),
                kind: kind.to_string(),
                rule: rule_name,
                approvers: rule.map(|r| r.approvers.clone()).unwrap_or_default(),
                min_approvals: rule.and_then(|r| r.min_approvals).unwrap_or(1),
                timeout: rule
                    .and_then(|r| r.timeout)
                    .unwrap_or(DEFAULT_APPROVAL_TIMEOUT),
            }
        };
        broker.open(req).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot open an approval request; the operation is refused");
            e.to_string()
        })
    }

    /// The approval hook, second half: wait for approve, deny or expiry.
    pub async fn wait_approval(&self, ticket: &mut crate::approvals::Ticket) -> ApprovalOutcome {
        ApprovalOutcome::of(&ticket.wait().await)
    }

    /// Both halves for handlers with nothing to tell their client meanwhile: hold the
    /// operation and wait. Dropping the future cancels the request.
    pub async fn request_approval(
        &self,
        operation: &str,
        kind: &str,
        decision: &Decision,
    ) -> ApprovalOutcome {
        match self.open_approval(operation, kind, decision).await {
            Ok(mut t) => self.wait_approval(&mut t).await,
            Err(_) => ApprovalOutcome::Unavailable,
        }
    }

    /// The target host name the bot dialled, if the original destination is one of the
    /// target's `host:port` addresses as last resolved.
    pub fn dialled_host(&self) -> Option<String> {
        let resolved = lock(&self.agent.resolved);
        self.target.address.iter().find_map(|a| match a {
            TargetAddress::Host(h, port)
                if *port == self.orig_dst.port()
                    && resolved
                        .get(h)
                        .is_some_and(|ips| ips.contains(&self.orig_dst.ip())) =>
            {
                Some(h.clone())
            }
            _ => None,
        })
    }

    /// Connect to the original destination. The socket carries the agent's mark, so the
    /// kernel hooks never redirect it back to us.
    pub async fn connect_upstream(&self) -> Result<TcpStream, DataPathError> {
        let mut addr = self.orig_dst;
        // The kernel record has no scope id: a link-local address of this host is reached on
        // the interface that holds it.
        if let SocketAddr::V6(v6) = &mut addr {
            if v6.scope_id() == 0 && v6.ip().is_unicast_link_local() {
                if let Some(index) = lock(&self.agent.local).get(&IpAddr::V6(*v6.ip())) {
                    v6.set_scope_id(*index);
                }
            }
        }
        let up = |source| DataPathError::Upstream { addr, source };
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(up)?;
        if let Some(mark) = self.agent.upstream_mark {
            socket2::SockRef::from(&sock).set_mark(mark).map_err(up)?;
        }
        crate::sys::unpaced_on_loopback(socket2::SockRef::from(&sock), addr.ip());
        match tokio::time::timeout(self.agent.upstream_timeout, sock.connect(addr)).await {
            Ok(r) => r.map_err(up),
            Err(_) => Err(up(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }

    pub fn add_bytes(&self, t: Totals) {
        self.bytes.0.store(t.bytes_up, Ordering::Relaxed);
        self.bytes.1.store(t.bytes_down, Ordering::Relaxed);
    }

    /// Why a connection was refused, for the client: which identity (or that none matched,
    /// with the facts the kernel gave, which are the client's own) and what the policy said.
    fn connect_refusal(&self, d: &tollgate_policy::Decision) -> String {
        let f = &self.facts;
        match &self.identity {
            None => format!(
                "tollgate: no identity matched this connection to target {} (the agent saw cgroup {}, uid {}{}, executable {}{}); add an [[identity]] that matches it to the policy",
                self.target.name,
                f.cgroup.as_deref().unwrap_or("(unknown)"),
                f.uid,
                f.user.as_deref().map(|u| format!(" ({u})")).unwrap_or_default(),
                f.exe.as_deref().filter(|_| f.exe_verified).unwrap_or("(not verified)"),
                if f.foreign_userns { ", in a user namespace of its own" } else { "" },
            ),
            Some(who) => match d.action {
                Action::Approve => format!(
                    "tollgate: connections of identity {who} to target {} need approval, which is not available for whole connections; denied",
                    self.target.name
                ),
                _ => match &d.rule {
                    Some(rule) => format!(
                        "tollgate: identity {who} may not connect to target {} (rule \"{rule}\"); ask for access",
                        self.target.name
                    ),
                    None => format!(
                        "tollgate: identity {who} may not connect to target {} (no rule allows it: {}); ask for access",
                        self.target.name,
                        d.reason.as_str()
                    ),
                },
            },
        }
    }

    /// Decide the connection, serve it, close it; the guard writes the close exactly once.
    async fn run(self, stream: TcpStream) {
        let policy = &self.gen.policy;
        let d = decide(
            policy,
            &Request {
                claims: None,
                identity: self.identity.as_deref(),
                target: &self.target.name,
                op: Operation::Connect,
            },
        );
        let observe = policy.agent.mode == Mode::Observe;
        // Only the opaque relay exists in this version: a connection admitted only because some
        // operation-scoped rule could match would pass its operations unchecked, so it is
        // refused unless the policy allowed the whole connection (fail closed).
        let whole = d
            .rule
            .as_deref()
            .and_then(|r| policy.rule(r))
            .is_some_and(|r| r.is_whole_connection());
        let pg = crate::pg::handler::PgHandler {
            hash_key: self.agent.hash_key,
            ca: self.agent.ca.clone(),
        };
        let tcp = TcpHandler {
            kind: self.agent.relay_kind,
        };
        let ssh = crate::ssh::SshHandler {
            hash_key: self.agent.hash_key,
        };
        // PostgreSQL always goes through its handler (per-statement policy, credential
        // injection, masking, recording), even under a whole-connection allow.
        let handler: Option<&dyn ProtocolHandler> = match (d.action, self.target.protocol, whole) {
            (Action::Allow, Protocol::Postgres, _) => Some(&pg),
            // SSH goes through its handler (per-channel policy, injected login) when the target
            // names a credential or a host key; otherwise only a whole-connection allow relays
            // it opaquely, as before.
            (Action::Allow, Protocol::Ssh, _)
                if self.target.host_key_file.is_some() || self.target.credential.is_some() =>
            {
                Some(&ssh)
            }
            (Action::Allow, _, true) | (Action::Allow, Protocol::Tcp, _) => Some(&tcp),
            _ => None,
        };
        // Fail-closed audit: no new connection while its audit cannot be written.
        let unaudited = match self.agent.audit.check() {
            Err(e) if policy.agent.fail_mode == tollgate_policy::FailMode::Closed => {
                Some(audit_refusal(&e, "connections"))
            }
            _ => None,
        };
        let (action, reason) = match (d.action, handler.is_some()) {
            _ if unaudited.is_some() => ("deny", "audit_unwritable"),
            (Action::Allow, true) => ("allow", d.reason.as_str()),
            (Action::Allow, false) => ("deny", "operation_policy_unsupported"),
            (Action::Approve, _) => ("deny", "approval_unavailable"),
            (Action::Deny, _) => ("deny", d.reason.as_str()),
        };
        let mut ev = self.base();
        ev.insert("event".into(), "connect".into());
        ev.insert("operation".into(), "connect".into());
        ev.insert("action".into(), action.into());
        ev.insert("rule".into(), json!(d.rule));
        ev.insert("reason".into(), reason.into());
        ev.insert("enforced".into(), (!observe).into());
        // The file behind `exe`, as the agent's mount namespace sees it: a path alone can be
        // a bind mount in the bot's own namespace.
        ev.insert("exe_dev".into(), json!(self.facts.exe_dev));
        ev.insert("exe_ino".into(), json!(self.facts.exe_ino));
        ev.insert("exe_verified".into(), self.facts.exe_verified.into());
        ev.insert("foreign_userns".into(), self.facts.foreign_userns.into());
        self.agent.audit.write(ev);
        self.count_decision(action);
        // The audit log is the record of every decision; the operational log gets it only at
        // debug level (one line per connection would flood journald on a busy host).
        debug!(
            action,
            reason,
            rule = d.rule.as_deref().unwrap_or("-"),
            pid = self.facts.pid,
            uid = self.facts.uid,
            cgroup = self.facts.cgroup.as_deref().unwrap_or("-"),
            "connection decided"
        );

        if let Some(msg) = unaudited {
            warn!(pid = self.facts.pid, "{msg}");
            match self.target.protocol {
                // In the client's own language: a FATAL after its startup message.
                // disk_full: the audit log cannot be written.
                Protocol::Postgres => refuse_postgres(stream, "53100", &msg).await,
                _ => reset(stream),
            }
            return;
        }
        let handler: &dyn ProtocolHandler = match (action, observe) {
            ("allow", _) => handler.unwrap_or(&tcp),
            (_, true) if self.target.protocol == Protocol::Postgres => &pg,
            (_, true) => &tcp,
            _ if self.target.protocol == Protocol::Postgres => {
                // In the client's own language: psql prints the cause instead of a reset.
                let msg = self.connect_refusal(&d);
                refuse_postgres(stream, "28000", &msg).await;
                return;
            }
            _ => {
                reset(stream);
                return;
            }
        };
        let proto = self.target.protocol.as_str();
        let guard = SessionGuard::new(&self, proto);
        let result = handler.serve(&self, stream).await;
        guard.finish(&self, result);
    }
}

/// Writes the session's close event and metrics exactly once: `finish` normally, `Drop` as the
/// fallback when the task is cancelled (shutdown deadline).
struct SessionGuard {
    protocol: &'static str,
    done: bool,
    agent: Arc<Agent>,
    base: Map<String, Value>,
    started: Instant,
}

impl SessionGuard {
    fn new(cx: &SessionCx, protocol: &'static str) -> SessionGuard {
        cx.agent
            .metrics
            .sessions_active
            .with_label_values(&[protocol])
            .inc();
        SessionGuard {
            protocol,
            done: false,
            agent: cx.agent.clone(),
            base: cx.base(),
            started: cx.started,
        }
    }

    fn finish(mut self, cx: &SessionCx, result: Result<Totals, DataPathError>) {
        let t = Totals {
            bytes_up: cx.bytes.0.load(Ordering::Relaxed),
            bytes_down: cx.bytes.1.load(Ordering::Relaxed),
        };
        let (status, error) = match &result {
            Ok(_) => ("ok", None),
            Err(e) => (e.label(), Some(e.to_string())),
        };
        if let Err(e) = &result {
            warn!(error = %e, "session ended with an error");
        }
        self.close(t, status, error);
    }

    fn close(&mut self, t: Totals, status: &str, error: Option<String>) {
        if self.done {
            return;
        }
        self.done = true;
        let m = &self.agent.metrics;
        m.sessions_active.with_label_values(&[self.protocol]).dec();
        m.relay_bytes
            .with_label_values(&[self.protocol, "upstream"])
            .inc_by(t.bytes_up);
        m.relay_bytes
            .with_label_values(&[self.protocol, "downstream"])
            .inc_by(t.bytes_down);
        let secs = self.started.elapsed().as_secs_f64();
        m.session_seconds
            .with_label_values(&[self.protocol])
            .observe(secs);
        let mut ev = self.base.clone();
        ev.insert("event".into(), "close".into());
        ev.insert("operation".into(), "close".into());
        ev.insert("status".into(), status.into());
        ev.insert("error".into(), json!(error));
        ev.insert("bytes_up".into(), t.bytes_up.into());
        ev.insert("bytes_down".into(), t.bytes_down.into());
        ev.insert("duration_ms".into(), ((secs * 1000.0) as u64).into());
        self.agent.audit.write(ev);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.close(
            Totals::default(),
            "aborted",
            Some("session cancelled at shutdown".into()),
        );
    }
}

#[cfg(test)]
mod tests;
