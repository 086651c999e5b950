//! The approval broker: an operation that policy sends to `approve` is held while a human
//! decides. The broker knows nothing about protocols; a handler opens a request through
//! [`crate::session::SessionCx::open_approval`], tells its client how to ask for approval, and
//! waits on the [`Ticket`]. Approvers act through the admin API (`api.rs`), which the CLI
//! (`client.rs`) and the web page (`web.rs`, `/ui/`) call.
//!
//! Layout: this file (requests, states, the [`ApprovalStore`] trait and the embedded store
//! [`Broker`] with its persistence), `pg.rs` (the fleet-wide PostgreSQL store), `auth.rs`
//! (the [`auth::ApproverAuth`] trait and the local admin token), `api.rs` (the admin HTTP
//! listener), `web.rs` (the web page, its OIDC login and sessions), `webhook.rs` (Slack-compatible notifications), `client.rs` (the CLI's HTTP client).
//!
//! States: `pending` -> `approved` | `denied` | `expired` | `cancelled`; every transition out of
//! `pending` happens once, under the broker's lock; it is counted there, then audited and
//! persisted after the lock is released (so a woken session never waits for the disk).
//! A request waits for exactly one session: when the session goes away (the bot disconnected,
//! the agent shut down), dropping its [`Ticket`] cancels the request.
//!
//! Persistence: `<data_dir>/approvals.json`, rewritten (temp file, fsync, rename) on every
//! change. A restart closes every bot connection, so requests found pending at start-up are
//! marked `expired` ("agent restarted") and kept in the history; ids keep counting.

pub mod api;
pub mod auth;
pub mod client;
pub mod pg;
pub mod store_tls;
pub mod web;
pub mod webhook;

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    io::Write as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::{audit::Audit, lock, metrics::Metrics, obj};
use auth::Approver;

/// How many decided requests the broker keeps for the API and the CLI.
pub const HISTORY: usize = 200;

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }
}

/// A numbered serialization of the store (see [`StoreFile`]).
type Snapshot = (u64, Vec<u8>);

/// One approver's vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub subject: String,
    pub comment: Option<String>,
    pub at: String,
}

/// A held operation, as the API shows it and the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub id: u64,
    pub status: Status,
    /// The requesting identity (policy name).
    pub identity: Option<String>,
    /// The workload's own subject (workload OIDC), which may not approve either.
    pub workload_subject: Option<String>,
    pub target: String,
    pub protocol: String,
    pub session: String,
    /// The operation as the audit log shows it (masked).
    pub operation: String,
    /// The statement kind or operation class that needed approval.
    pub kind: String,
    pub rule: String,
    /// Groups whose members may approve (empty: any authenticated approver).
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    pub created: String,
    pub created_ms: u64,
    pub expires: String,
    pub expires_ms: u64,
    pub decided: Option<String>,
    /// Approvals so far, one per distinct subject.
    pub approvals: Vec<Vote>,
    /// Who denied it, if anyone.
    pub denied_by: Option<Vote>,
    /// Why it ended when no approver ended it (expiry, cancellation).
    pub reason: Option<String>,
    /// The agent (`[agent] host_id`) whose session waits on it; only in a shared store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

/// What a handler asks for.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub identity: Option<String>,
    pub workload_subject: Option<String>,
    pub target: String,
    pub protocol: String,
    pub session: String,
    pub operation: String,
    pub kind: String,
    pub rule: String,
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    pub timeout: Duration,
}

impl ApprovalRequest {
    /// A new pending request `id` for `n`, created at `created` (ms since the epoch), held by
    /// `holder` (the agent whose bot waits; None in the embedded store).
    pub fn pending(
        id: u64,
        n: NewRequest,
        created: u64,
        holder: Option<String>,
    ) -> ApprovalRequest {
        let expires = created + n.timeout.as_millis() as u64;
        ApprovalRequest {
            id,
            status: Status::Pending,
            identity: n.identity,
            workload_subject: n.workload_subject,
            target: n.target,
            protocol: n.protocol,
            session: n.session,
            operation: n.operation,
            kind: n.kind,
            rule: n.rule,
            approvers: n.approvers,
            min_approvals: n.min_approvals.max(1),
            created: rfc3339(created),
            created_ms: created,
            expires: rfc3339(expires),
            expires_ms: expires,
            decided: None,
            approvals: Vec::new(),
            denied_by: None,
            reason: None,
            holder,
        }
    }
}

/// An approver's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Deny,
}

/// Why an approver's call changed nothing. Each maps to one HTTP status in `api.rs`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecideError {
    /// No request with this id (it never existed or fell out of the history).
    #[error("no approval request #{0}")]
    NotFound(u64),
    /// The request was already decided, expired or cancelled.
    #[error("approval request #{id} is already {status}")]
    Closed { id: u64, status: &'static str },
    /// The approver may not decide this request.
    #[error("{0}")]
    Forbidden(String),
    /// This approver already approved; `min_approvals` needs other people.
    #[error("{0}")]
    AlreadyVoted(String),
    /// The shared approval store cannot be reached; nothing changed.
    #[error("approval store unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so that [`ApprovalStore`] stays object-safe.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a request could not be opened or read: the shared store is unreachable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("approval store unavailable: {0}")]
pub struct StoreUnavailable(pub String);

/// Where requests live: the embedded [`Broker`] (this agent only) or the fleet-wide
/// PostgreSQL store ([`pg::PgStore`]). Handlers, the admin API and the CLI see only this.
pub trait ApprovalStore: Send + Sync {
    /// Hold an operation (see [`Broker::open_request`]).
    fn open(self: Arc<Self>, n: NewRequest) -> BoxFut<'static, Result<Ticket, StoreUnavailable>>;
    /// Pending requests (oldest first) and the decided ones (newest first).
    #[allow(clippy::type_complexity)]
    fn list(
        &self,
    ) -> BoxFut<'_, Result<(Vec<ApprovalRequest>, Vec<ApprovalRequest>), StoreUnavailable>>;
    /// One request.
    fn get(&self, id: u64) -> BoxFut<'_, Result<Option<ApprovalRequest>, StoreUnavailable>>;
    /// An approver approves or denies request `id` (authorized inside, atomically).
    fn decide<'a>(
        &'a self,
        id: u64,
        who: &'a Approver,
        verdict: Verdict,
        comment: Option<String>,
    ) -> BoxFut<'a, Result<ApprovalRequest, DecideError>>;
    /// Persist what is pending before shutdown (embedded store).
    fn flush(&self) {}
}

/// The store side of a [`Ticket`].
pub trait Holder: Send + Sync {
    /// The wait ended (woken or deadline): close request `id` as expired with `reason` if it
    /// is still pending, and return its final state (None: lost from the store).
    fn finish(&self, id: u64, reason: String) -> BoxFut<'_, Option<ApprovalRequest>>;
    /// The ticket was dropped before its wait ended: cancel request `id`.
    fn cancel(&self, id: u64, reason: String);
}

/// Record `who`'s verdict on pending request `r` (authorization, one vote per subject,
/// `min_approvals`). `Ok(None)`: an approval vote was recorded and more are needed;
/// `Ok(Some(status))`: the request is now decided (the caller closes it). On error `r` is
/// unchanged. Shared by both stores so they decide alike.
pub fn apply_verdict(
    r: &mut ApprovalRequest,
    who: &Approver,
    verdict: Verdict,
    comment: Option<String>,
    now: u64,
) -> Result<(Option<Status>, Vote), DecideError> {
    authorize(r, who)?;
    let vote = Vote {
        subject: who.subject.clone(),
        comment: comment.filter(|c| !c.trim().is_empty()),
        at: rfc3339(now),
    };
    match verdict {
        Verdict::Deny => {
            r.denied_by = Some(vote.clone());
            Ok((Some(Status::Denied), vote))
        }
        Verdict::Approve => {
            if r.approvals.iter().any(|v| v.subject == who.subject) {
                return Err(DecideError::AlreadyVoted(format!(
                    "{} already approved #{}; it needs {} approvals from distinct approvers ({} so far)",
                    who.subject,
                    r.id,
                    r.min_approvals,
                    r.approvals.len()
                )));
            }
            r.approvals.push(vote.clone());
            if (r.approvals.len() as u32) < r.min_approvals {
                Ok((None, vote))
            } else {
                Ok((Some(Status::Approved), vote))
            }
        }
    }
}

struct Entry {
    req: ApprovalRequest,
    /// Wakes the waiting session; taken when the request leaves `pending`.
    wake: Option<oneshot::Sender<()>>,
}

struct State {
    /// Number of the latest snapshot (see [`Broker::written`]).
    version: u64,
    next_id: u64,
    pending: BTreeMap<u64, Entry>,
    history: VecDeque<ApprovalRequest>,
}

#[derive(Serialize, Deserialize, Default)]
struct Persisted {
    next_id: u64,
    requests: Vec<ApprovalRequest>,
}

/// The embedded approval store and its waiters.
pub struct Broker {
    state: Mutex<State>,
    path: Option<PathBuf>,
    store: Arc<StoreFile>,
    audit: Option<Arc<Audit>>,
    metrics: Arc<Metrics>,
    webhook: Option<webhook::Notifier>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// "5m", "2s", "1h 30m": how a timeout is shown to bots and approvers.
pub fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

impl Broker {
    /// A broker persisting to `<data_dir>/approvals.json`. Requests left pending by a previous
    /// run are closed as expired (their bots' connections died with that run).
    pub fn open(
        data_dir: &Path,
        audit: Option<Arc<Audit>>,
        metrics: Arc<Metrics>,
        webhook: Option<webhook::Notifier>,
    ) -> std::io::Result<Broker> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("approvals.json");
        let persisted: Persisted = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a valid approvals store ({e}); move it aside to start empty",
                        path.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e),
        };
        let b = Broker::with_store(Some(path), audit, metrics, webhook);
        {
            let mut st = lock(&b.state);
            st.next_id = persisted.next_id.max(1);
            let now = now_ms();
            for mut r in persisted.requests {
                st.next_id = st.next_id.max(r.id + 1);
                if r.status == Status::Pending {
                    r.status = Status::Expired;
                    r.decided = Some(rfc3339(now));
                    r.reason = Some(
                        "the agent restarted while the request was pending (the bot's connection was closed)"
                            .into(),
                    );
                    b.audit_event(&r, "expired", None, None);
                    b.metrics
                        .approvals_total
                        .with_label_values(&["expired"])
                        .inc();
                }
                st.history.push_back(r);
            }
            while st.history.len() > HISTORY {
                st.history.pop_front();
            }
            let snap = b.snapshot(&mut st);
            drop(st);
            b.write(snap);
        }
        Ok(b)
    }

    /// A broker with an optional store file (None: memory only, for tests).
    pub fn with_store(
        path: Option<PathBuf>,
        audit: Option<Arc<Audit>>,
        metrics: Arc<Metrics>,
        webhook: Option<webhook::Notifier>,
    ) -> Broker {
        Broker {
            state: Mutex::new(State {
                version: 0,
                next_id: 1,
                pending: BTreeMap::new(),
                history: VecDeque::new(),
            }),
            store: Arc::new(StoreFile {
                path: path.clone(),
                written: Mutex::new(0),
            }),
            path,
            audit,
            metrics,
            webhook,
        }
    }

    /// Hold an operation: the request is pending until approved, denied, expired (after
    /// `timeout`) or cancelled (the returned ticket is dropped).
    pub fn open_request(self: &Arc<Self>, n: NewRequest) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let created = now_ms();
        let timeout = n.timeout;
        let req = {
            let mut st = lock(&self.state);
            let id = st.next_id;
            st.next_id += 1;
            let req = ApprovalRequest::pending(id, n, created, None);
            st.pending.insert(
                id,
                Entry {
                    req: req.clone(),
                    wake: Some(tx),
                },
            );
            self.metrics.approvals_pending.set(st.pending.len() as i64);
            let snap = self.snapshot(&mut st);
            drop(st);
            self.write(snap);
            req
        };
        self.audit_event(&req, "requested", None, None);
        if let Some(w) = &self.webhook {
            w.notify(&req);
        }
        Ticket::new(self.clone(), req.id, timeout, rx)
    }

    /// Pending requests (oldest first) and the decided ones (newest first).
    pub fn list(&self) -> (Vec<ApprovalRequest>, Vec<ApprovalRequest>) {
        let st = lock(&self.state);
        (
            st.pending.values().map(|e| e.req.clone()).collect(),
            st.history.iter().rev().cloned().collect(),
        )
    }

    pub fn get(&self, id: u64) -> Option<ApprovalRequest> {
        let st = lock(&self.state);
        st.pending
            .get(&id)
            .map(|e| e.req.clone())
            .or_else(|| st.history.iter().find(|r| r.id == id).cloned())
    }

    /// An approver approves or denies request `id`. Authorization happens here, under the
    /// lock, so a request never changes for a caller that may not change it.
    pub fn decide(
        &self,
        id: u64,
        who: &Approver,
        verdict: Verdict,
        comment: Option<String>,
    ) -> Result<ApprovalRequest, DecideError> {
        let mut st = lock(&self.state);
        let Some(entry) = st.pending.get_mut(&id) else {
            return match st.history.iter().find(|r| r.id == id) {
                Some(r) => Err(DecideError::Closed {
                    id,
                    status: r.status.as_str(),
                }),
                None => Err(DecideError::NotFound(id)),
            };
        };
        let (status, vote) = apply_verdict(&mut entry.req, who, verdict, comment, now_ms())?;
        let Some(status) = status else {
            let r = entry.req.clone();
            let snap = self.snapshot(&mut st);
            drop(st);
            self.write(snap);
            self.audit_event(&r, "approval_vote", Some(&vote), None);
            return Ok(r);
        };
        let r = self.settle(&mut st, id, status, None);
        drop(st);
        match r {
            Some((r, snap)) => {
                self.write(snap);
                let action = r.status.as_str();
                self.audit_event(&r, action, Some(&vote), None);
                Ok(r)
            }
            None => Err(DecideError::NotFound(id)),
        }
    }

    /// Move request `id` out of `pending` (if it still is), wake its waiter, count it and keep
    /// it in the history. Called with the lock held.
    fn settle(
        &self,
        st: &mut State,
        id: u64,
        status: Status,
        reason: Option<String>,
    ) -> Option<(ApprovalRequest, Option<Snapshot>)> {
        let mut e = st.pending.remove(&id)?;
        let now = now_ms();
        e.req.status = status;
        e.req.decided = Some(rfc3339(now));
        e.req.reason = reason;
        if let Some(w) = e.wake.take() {
            let _ = w.send(());
        }
        let m = &self.metrics;
        m.approvals_pending.set(st.pending.len() as i64);
        m.approvals_total
            .with_label_values(&[status.as_str()])
            .inc();
        m.approval_wait
            .observe(now.saturating_sub(e.req.created_ms) as f64 / 1000.0);
        st.history.push_back(e.req.clone());
        while st.history.len() > HISTORY {
            st.history.pop_front();
        }
        let snap = self.snapshot(st);
        Some((e.req, snap))
    }

    /// Close a pending request without an approver (expiry, cancellation); returns the final
    /// state whoever closed it.
    fn close(&self, id: u64, status: Status, reason: String) -> Option<ApprovalRequest> {
        let mut st = lock(&self.state);
        match self.settle(&mut st, id, status, Some(reason)) {
            Some((r, snap)) => {
                drop(st);
                self.write(snap);
                self.audit_event(&r, status.as_str(), None, r.reason.as_deref());
                Some(r)
            }
            None => st.history.iter().find(|r| r.id == id).cloned(),
        }
    }

    fn audit_event(
        &self,
        r: &ApprovalRequest,
        action: &str,
        vote: Option<&Vote>,
        reason: Option<&str>,
    ) {
        let Some(a) = &self.audit else {
            return;
        };
        let mut ev: Map<String, Value> = obj(json!({
            "event": "approval",
            "session": r.session,
            "identity": r.identity,
            "target": r.target,
            "protocol": r.protocol,
            "operation": r.operation,
            "kind": r.kind,
            "action": action,
            "rule": r.rule,
            "approval_id": r.id,
            "approvers": r.approvers,
            "min_approvals": r.min_approvals,
            "approvals": r.approvals.iter().map(|v| v.subject.as_str()).collect::<Vec<_>>(),
        }));
        if let Some(v) = vote {
            ev.insert("approver".into(), v.subject.clone().into());
            ev.insert("comment".into(), json!(v.comment));
        }
        if let Some(reason) = reason {
            ev.insert("reason".into(), reason.into());
        }
        a.write(ev);
    }

    /// Serialize the store (called with the state lock held); [`Broker::write`] it after the
    /// lock is released.
    fn snapshot(&self, st: &mut State) -> Option<Snapshot> {
        self.path.as_ref()?;
        st.version += 1;
        let p = Persisted {
            next_id: st.next_id,
            requests: st
                .history
                .iter()
                .cloned()
                .chain(st.pending.values().map(|e| e.req.clone()))
                .collect(),
        };
        match serde_json::to_vec(&p) {
            Ok(b) => Some((st.version, b)),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize the approvals store");
                None
            }
        }
    }

    /// Write the current state to disk now (shutdown, tests).
    pub fn flush(&self) {
        let snap = self.snapshot(&mut lock(&self.state));
        if let Some(snap) = snap {
            self.store.write(snap);
        }
    }

    /// Persist a snapshot off the async threads: the fsync must not delay the session this
    /// decision just woke (tokio runs a woken task on the waker's thread, after it yields).
    fn write(&self, snap: Option<Snapshot>) {
        let Some(snap) = snap else {
            return;
        };
        let store = self.store.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(move || store.write(snap));
            }
            Err(_) => store.write(snap),
        }
    }
}

/// `<data_dir>/approvals.json`. Snapshots are serialized under the broker's lock (numbered, so
/// they are ordered) and written here after it is released.
struct StoreFile {
    path: Option<PathBuf>,
    /// The number of the last snapshot written.
    written: Mutex<u64>,
}

impl StoreFile {
    /// Rewrite the file: temp file, fsync, rename, so a crash leaves the old or the new file,
    /// never half of one. A snapshot older than the one on disk is skipped.
    fn write(&self, (version, bytes): Snapshot) {
        let Some(path) = &self.path else {
            return;
        };
        let mut written = lock(&self.written);
        if *written >= version {
            return;
        }
        let tmp = path.with_extension("json.tmp");
        let r = (|| -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt as _;
            // Never written through a planted link: O_EXCL|O_NOFOLLOW after removing a stale one.
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, path)
        })();
        match r {
            Ok(()) => *written = version,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot persist the approvals store")
            }
        }
    }
}

/// May `who` decide `r`? Group membership and self-approval; the reason is shown to the caller.
pub fn authorize(r: &ApprovalRequest, who: &Approver) -> Result<(), DecideError> {
    let own = r.identity.as_deref() == Some(who.subject.as_str())
        || r.workload_subject.as_deref() == Some(who.subject.as_str());
    if own {
        return Err(DecideError::Forbidden(format!(
            "{} is the requesting identity of #{}; nobody may approve their own request",
            who.subject, r.id
        )));
    }
    if who.all_groups || r.approvers.is_empty() {
        return Ok(());
    }
    if r.approvers.iter().any(|g| who.groups.contains(g)) {
        return Ok(());
    }
    Err(DecideError::Forbidden(format!(
        "{} is not in any approver group of rule \"{}\" (needs one of: {}; has: {})",
        who.subject,
        r.rule,
        r.approvers.join(", "),
        if who.groups.is_empty() {
            "none".to_string()
        } else {
            who.groups.join(", ")
        }
    )))
}

/// A session's claim on its pending request. `wait` resolves it; dropping it before that
/// cancels the request (the bot went away, or the session was cancelled at shutdown).
pub struct Ticket {
    holder: Arc<dyn Holder>,
    id: u64,
    timeout: Duration,
    deadline: tokio::time::Instant,
    wake: Option<oneshot::Receiver<()>>,
    done: bool,
}

impl Ticket {
    /// A ticket for request `id` of `holder`, woken through `wake` (a dropped sender wakes it
    /// too), expiring after `timeout` from now.
    pub fn new(
        holder: Arc<dyn Holder>,
        id: u64,
        timeout: Duration,
        wake: oneshot::Receiver<()>,
    ) -> Ticket {
        Ticket {
            holder,
            id,
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
            wake: Some(wake),
            done: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Wait until an approver decides or the request expires; the request's final state.
    pub async fn wait(&mut self) -> ApprovalRequest {
        if let Some(rx) = self.wake.as_mut() {
            tokio::select! {
                _ = rx => {}
                _ = tokio::time::sleep_until(self.deadline) => {}
            }
            self.wake = None;
        }
        let expired = format!("expired after {}", human(self.timeout));
        let r = self.holder.finish(self.id, expired).await;
        self.done = true;
        r.unwrap_or_else(|| self.missing())
    }

    /// Only reachable if the history dropped the request while its session still waited.
    fn missing(&self) -> ApprovalRequest {
        ApprovalRequest {
            id: self.id,
            status: Status::Expired,
            identity: None,
            workload_subject: None,
            target: String::new(),
            protocol: String::new(),
            session: String::new(),
            operation: String::new(),
            kind: String::new(),
            rule: String::new(),
            approvers: Vec::new(),
            min_approvals: 1,
            created: String::new(),
            created_ms: 0,
            expires: String::new(),
            expires_ms: 0,
            decided: None,
            approvals: Vec::new(),
            denied_by: None,
            reason: Some("request lost from the store".into()),
            holder: None,
        }
    }
}

impl Ticket {
    /// Withdraw the request because the client cancelled the held operation (psql's Ctrl-C
    /// sends a CancelRequest); the broker records it as cancelled with `reason`.
    pub fn withdraw(mut self, reason: &str) {
        self.done = true;
        self.holder.cancel(self.id, reason.to_string());
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.holder.cancel(
                self.id,
                "the session ended while waiting (the bot disconnected)".into(),
            );
        }
    }
}

impl Holder for Broker {
    fn finish(&self, id: u64, reason: String) -> BoxFut<'_, Option<ApprovalRequest>> {
        let r = self.close(id, Status::Expired, reason);
        Box::pin(std::future::ready(r))
    }

    fn cancel(&self, id: u64, reason: String) {
        self.close(id, Status::Cancelled, reason);
    }
}

impl ApprovalStore for Broker {
    fn open(self: Arc<Self>, n: NewRequest) -> BoxFut<'static, Result<Ticket, StoreUnavailable>> {
        let t = self.open_request(n);
        Box::pin(std::future::ready(Ok(t)))
    }

    fn list(
        &self,
    ) -> BoxFut<'_, Result<(Vec<ApprovalRequest>, Vec<ApprovalRequest>), StoreUnavailable>> {
        Box::pin(std::future::ready(Ok(Broker::list(self))))
    }

    fn get(&self, id: u64) -> BoxFut<'_, Result<Option<ApprovalRequest>, StoreUnavailable>> {
        Box::pin(std::future::ready(Ok(Broker::get(self, id))))
    }

    fn decide<'a>(
        &'a self,
        id: u64,
        who: &'a Approver,
        verdict: Verdict,
        comment: Option<String>,
    ) -> BoxFut<'a, Result<ApprovalRequest, DecideError>> {
        Box::pin(std::future::ready(Broker::decide(
            self, id, who, verdict, comment,
        )))
    }

    fn flush(&self) {
        Broker::flush(self);
    }
}

#[cfg(test)]
mod tests;
