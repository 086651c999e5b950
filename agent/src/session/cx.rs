//! [`SessionCx`]: one session's facts and the services a handler calls, and the connection
//! decision that picks its handler.
//!
//! One operation, one policy snapshot: a handler takes [`SessionCx::policy`] once and passes
//! it to [`SessionCx::decide_in`], [`SessionCx::audit_operation`],
//! [`SessionCx::audit_gate`] and [`SessionCx::open_approval`], so a reload between them never
//! mixes two policies in one decision. The session's verified claims are always passed.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tollgate_policy::{decide, Action, Decision, Mode, Operation, Request, Target};
use tracing::{debug, warn};

use super::{guard::SessionGuard, Agent, Generation, ProtocolHandler, Refusal};
use crate::{identity::Facts, obj, relay::Totals};

/// What a client (or the agent's log) is told while the audit log cannot be written.
pub fn audit_refusal(error: &str, what: &str) -> String {
    format!("tollgate: the audit log cannot be written ({error}); {what} are refused until it can")
}

/// Close with RST so the client sees a refusal at once, not an orderly EOF.
pub fn reset(stream: TcpStream) {
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
    /// The Unix socket path the bot dialled, for a connection redirected from it (audited as
    /// `unix_socket`; `peer` is then the agent's internal bridge).
    pub unix_socket: Option<String>,
    pub agent: Arc<Agent>,
    /// The policy generation the session started under; operations are decided under the
    /// newest one (see [`SessionCx::decide`]).
    pub gen: Arc<Generation>,
    /// Verified workload OIDC claims (claim name to values), set once by a handler after the
    /// bot's token checked out; rules with a `claims` condition are decided against them.
    pub claims: OnceLock<BTreeMap<String, Vec<String>>>,
    pub(super) started: Instant,
    pub(super) bytes: (AtomicU64, AtomicU64),
    /// [`SessionCx::base`], serialized once for the per-operation audit lines.
    base_json: OnceLock<String>,
    /// `tollgate_decisions_total` for this session's labels: allow, deny, approve.
    decided: OnceLock<[prometheus::IntCounter; 3]>,
}

impl SessionCx {
    /// A session of `identity` to `target` from the attributed `facts`, started under `gen`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        agent: Arc<Agent>,
        gen: Arc<Generation>,
        id: String,
        identity: Option<String>,
        target: Target,
        facts: Facts,
        orig_dst: SocketAddr,
        peer: SocketAddr,
    ) -> SessionCx {
        SessionCx {
            id,
            identity,
            target,
            facts,
            orig_dst,
            peer,
            unix_socket: None,
            agent,
            gen,
            claims: OnceLock::new(),
            started: Instant::now(),
            bytes: (AtomicU64::new(0), AtomicU64::new(0)),
            base_json: OnceLock::new(),
            decided: OnceLock::new(),
        }
    }

    /// The test constructor (the in-process tier): a session of `identity` to the target
    /// named `target` in the agent's current policy, whose original destination is
    /// `orig_dst` (a fake or real upstream on loopback). Handlers are then served directly,
    /// without the kernel, the accept loop or root.
    pub fn for_test(
        agent: Arc<Agent>,
        identity: Option<&str>,
        target: &str,
        orig_dst: SocketAddr,
    ) -> Option<SessionCx> {
        let gen = agent.gen.load_full();
        let target = gen.policy.target(target)?.clone();
        let id = agent.session_id();
        let facts = Facts {
            pid: std::process::id(),
            comm: "in-process-test".into(),
            ..Facts::default()
        };
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        Some(SessionCx::new(
            agent,
            gen,
            id,
            identity.map(str::to_string),
            target,
            facts,
            orig_dst,
            peer,
        ))
    }

    fn base_json(&self) -> &str {
        self.base_json
            .get_or_init(|| crate::audit::Line::fields(&self.base()))
    }

    /// Open the session's recording under data_dir. None when it cannot be created: the
    /// failure is then reported to the audit health (`/healthz`, `tollgate status`).
    pub fn open_recorder(&self) -> Option<std::sync::Arc<crate::recording::Recorder>> {
        crate::recording::Recorder::open_in(
            &self.gen.policy.agent.data_dir,
            &self.id,
            &self.agent.audit,
        )
        .ok()
        .map(std::sync::Arc::new)
    }

    /// A recording's `start` event: who the session is (attribution, target, protocol) plus
    /// the protocol's own `fields` (a JSON object).
    pub fn start_event(&self, fields: Value) -> Map<String, Value> {
        let mut m = obj(json!({
            "event": "start", "session": self.id, "identity": self.identity,
            "target": self.target.name, "protocol": self.target.protocol.as_str(),
            "pid": self.facts.pid, "uid": self.facts.uid, "cgroup": self.facts.cgroup,
            "exe": self.facts.exe,
        }));
        m.extend(obj(fields));
        m
    }

    pub(super) fn base(&self) -> Map<String, Value> {
        let mut m = obj(json!({
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
        }));
        if let Some(path) = &self.unix_socket {
            m.insert("unix_socket".into(), path.as_str().into());
        }
        m
    }

    pub(super) fn count_decision(&self, action: &str) {
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

    /// The current policy generation: take it once per operation and pass it to every step
    /// of that operation (decision, gates, audit, approval).
    pub fn policy(&self) -> Arc<Generation> {
        self.agent.gen.load_full()
    }

    /// The policy's answer for `op` by this session under `gen`, with the session's
    /// verified claims (so `claims`-conditioned rules match); neither audited nor counted.
    pub fn decide_in(&self, gen: &Generation, op: Operation<'_>) -> Decision {
        decide(
            &gen.policy,
            &Request {
                claims: self.claims.get(),
                identity: self.identity.as_deref(),
                target: &self.target.name,
                op,
                inspected: true,
            },
        )
    }

    /// `on_operation`: decide one operation under the current policy, audit it and count it,
    /// all under one snapshot. `text` is the operation as the audit log shows it (already
    /// masked by the handler). In observe mode the returned decision is always allow; the
    /// audit keeps the real one.
    pub fn decide(&self, op: Operation<'_>, text: &str) -> Decision {
        // A borrowed snapshot (no reference count taken) for this one decision.
        let gen = self.agent.gen.load();
        let d = self.decide_in(&gen, op);
        self.audit_decision(&gen, op.kind_str(), text, d, None)
    }

    /// Audit and count a decision a handler reached itself (for example the strictest of
    /// several kinds of one SQL statement). `flags` notes what made it special (dangerous
    /// functions, unparseable input). Returns the decision to enforce: in observe mode, allow.
    pub fn audit_operation(
        &self,
        gen: &Generation,
        kind: &str,
        text: &str,
        d: &Decision,
        flags: Option<&str>,
    ) -> Decision {
        self.audit_decision(gen, kind, text, d.clone(), flags)
    }

    /// [`Self::audit_operation`] of a decision the caller no longer needs.
    pub fn audit_decision(
        &self,
        gen: &Generation,
        kind: &str,
        text: &str,
        mut d: Decision,
        flags: Option<&str>,
    ) -> Decision {
        let observe = gen.policy.agent.mode == Mode::Observe;
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
            d.action = Action::Allow;
        }
        d
    }

    /// Fail-closed audit, the statement hook: `Err(message for the client)` while the audit
    /// log or recordings cannot be written (disk full, I/O error) under `fail_mode = "closed"`.
    /// The refusal is audited (an attempt that may itself fail) and counted as a deny.
    /// `fail_mode = "open"` keeps serving; `/healthz` and the metric still report.
    /// `kind` is the audit's operation kind, `what` the plural the client reads
    /// ("statements").
    pub fn audit_gate(
        &self,
        gen: &Generation,
        kind: &str,
        what: &str,
        shown: &str,
    ) -> Result<(), String> {
        let Err(e) = self.agent.audit.check() else {
            return Ok(());
        };
        if gen.policy.agent.fail_mode == tollgate_policy::FailMode::Open {
            return Ok(());
        }
        let d = Decision {
            action: Action::Deny,
            rule: None,
            reason: tollgate_policy::DecisionReason::NoMatchingRule,
        };
        self.audit_operation(gen, kind, shown, &d, Some("audit_unwritable"));
        Err(audit_refusal(&e, what))
    }

    /// Audit a session event other than an operation (e.g. `auth` for a workload token check):
    /// the session's base fields, `event`, then `fields`. Callers never put secrets in `fields`.
    pub fn audit_event(&self, event: &str, fields: Map<String, Value>) {
        let mut ev = self.base();
        ev.insert("event".into(), event.into());
        ev.extend(fields);
        self.agent.audit.write(ev);
    }
}

impl SessionCx {
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

    /// Decide the connection, pick its handler from the registry, serve it, close it; the
    /// guard writes the close exactly once.
    pub(crate) async fn run(self, stream: TcpStream) {
        let policy = &self.gen.policy;
        let handlers = &self.agent.handlers;
        // The protocol's own handler, if it checks operations: it always serves its targets
        // (per-operation policy, credential injection, masking, recording), even under a
        // whole-connection allow, and only then may rules that need operations checked one by
        // one (or claims, presented later) let a connection in.
        // A target with `inspect = false` has no handler of its own here: only the opaque
        // relay, under a whole-connection rule (its TLS is never terminated).
        let inspecting = handlers
            .inspecting(self.target.protocol)
            .filter(|_| self.target.inspect);
        let d = decide(
            policy,
            &Request {
                claims: None,
                identity: self.identity.as_deref(),
                target: &self.target.name,
                op: Operation::Connect,
                inspected: inspecting.is_some(),
            },
        );
        let observe = policy.agent.mode == Mode::Observe;
        // Without an inspecting handler only the opaque relay is left: a connection admitted
        // only because some operation-scoped rule could match would pass its operations
        // unchecked, so it is refused unless the policy allowed the whole connection (fail
        // closed). The relay's own protocol (`tcp`) is always whole.
        let whole = d
            .rule
            .as_deref()
            .and_then(|r| policy.rule(r))
            .is_some_and(|r| r.is_whole_connection());
        let own = handlers
            .get(self.target.protocol)
            .filter(|_| self.target.inspect);
        let handler: Option<&Arc<dyn ProtocolHandler>> = match d.action {
            Action::Allow => inspecting
                .or_else(|| whole.then(|| handlers.relay()))
                .or(own),
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
        ev.insert("rule".into(), json!(d.rule.as_deref()));
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

        // A refusal in the client's own language where its protocol has a handler (psql
        // prints the cause instead of a reset), else a reset.
        let refuser = own.unwrap_or(handlers.relay());
        if let Some(msg) = unaudited {
            warn!(pid = self.facts.pid, "{msg}");
            refuser.refuse(stream, Refusal::AuditUnwritable, &msg).await;
            return;
        }
        let handler: &Arc<dyn ProtocolHandler> = match (action, observe) {
            ("allow", _) => handler.unwrap_or(handlers.relay()),
            (_, true) => inspecting.unwrap_or(handlers.relay()),
            _ => {
                let msg = self.connect_refusal(&d);
                refuser.refuse(stream, Refusal::Denied, &msg).await;
                return;
            }
        };
        let proto = self.target.protocol.as_str();
        let guard = SessionGuard::new(&self, proto);
        let result = handler.serve(&self, stream).await;
        guard.finish(&self, result);
    }
}
