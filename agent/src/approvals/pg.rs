//! The fleet-wide approval store: `[approvals] store = "postgres://..."`.
//!
//! Every agent of a fleet keeps its requests in one PostgreSQL database, so the admin API,
//! the CLI and the web page of any agent list and decide every request. The agent whose
//! session waits on a request (its *holder*, `[agent] host_id`) is woken through
//! LISTEN/NOTIFY.
//!
//! Layout: [`PgStore`] (the [`ApprovalStore`] and [`Holder`] of the fleet), [`migrate`] (the
//! schema, versioned), the listener task (`listen_loop`) and the connection helpers.
//!
//! Rows: `tollgate_approvals(id, holder, status, created_ms, expires_ms, doc)`; `doc` is the
//! [`ApprovalRequest`] as JSON, `status` mirrors `doc.status` for queries. Ids come from the
//! sequence `tollgate_approval_ids`. Every change of a row (vote, decision, expiry,
//! cancellation) is one transaction that locks the row (`SELECT ... FOR UPDATE`), applies the
//! same rules as the embedded store ([`apply_verdict`]), writes it back and sends
//! `NOTIFY tollgate_approvals, '<id>'`, delivered at commit. Two approvers on two hosts
//! racing are serialized by the row lock: the second sees the first's vote or decision.
//!
//! Who does what: the holder opens, expires (its ticket's deadline) and cancels (the bot went
//! away) its requests; any agent records votes and decisions. At start, and after each
//! reconnect of its listener, an agent closes the pending rows it holds but no session waits
//! on any more (`agent restarted`), and wakes its waiters whose rows were decided meanwhile.
//!
//! Failure: the store unreachable at start is fatal (`tollgate run` exits non-zero). While
//! running, opening a request fails closed at once ("approval store unavailable", the
//! handler's deny); waiters keep waiting while the listener reconnects (with backoff) for up
//! to [`LOST_GRACE`], then they are woken and fail closed; the API answers 503. Everything
//! that does not need an approval keeps working.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use serde_json::json;
use tokio::sync::{oneshot, Mutex};
use tokio_postgres::{config::Host, AsyncMessage, Client, Config};

use super::store_tls::{StoreTls, StoreTlsParams, StoreTlsStream};
use super::{
    apply_verdict, auth::Approver, now_ms, rfc3339, webhook, ApprovalRequest, ApprovalStore,
    BoxFut, DecideError, Holder, NewRequest, Status, StoreUnavailable, Ticket, Verdict, Vote,
    HISTORY,
};
use crate::{audit::Audit, lock, metrics::Metrics, obj};

/// The NOTIFY channel; the payload is the request id.
pub const CHANNEL: &str = "tollgate_approvals";
/// Bound on every store round trip: a store that hangs counts as unavailable.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long waiters keep waiting while the listener cannot reconnect, before they fail closed.
pub const LOST_GRACE: Duration = Duration::from_secs(10);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A pending row this long past its expiry has lost its holder: any agent listing closes it.
const ABANDONED_AFTER: Duration = Duration::from_secs(60);
/// Advisory lock key serializing migrations between agents starting at once.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

/// Schema versions, applied in order, each once (recorded in `tollgate_schema_version`).
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE SEQUENCE tollgate_approval_ids;
     CREATE TABLE tollgate_approvals (
         id bigint PRIMARY KEY,
         holder text NOT NULL,
         status text NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
         created_ms bigint NOT NULL,
         expires_ms bigint NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now(),
         doc jsonb NOT NULL
     );
     CREATE INDEX tollgate_approvals_pending ON tollgate_approvals (holder) WHERE status = 'pending';",
)];

/// Errors of the PostgreSQL store, as start-up reports them.
#[derive(Debug, thiserror::Error)]
pub enum PgStoreError {
    /// The `store` URL does not parse as a PostgreSQL connection string.
    #[error("[approvals] store {url}: not a valid PostgreSQL URL ({reason})")]
    BadUrl { url: String, reason: String },
    /// The TLS words of the URL are wrong, or the CA file cannot be used.
    #[error("[approvals] store {url}: {reason}")]
    Tls { url: String, reason: String },
    /// The password file or variable could not be read.
    #[error("[approvals] store password: {0}")]
    Password(String),
    /// Connecting or migrating failed.
    #[error("cannot use the approval store {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// One waiter of this agent: wakes its ticket.
type Waiters = HashMap<u64, oneshot::Sender<()>>;

/// The fleet-wide store.
pub struct PgStore {
    config: Config,
    /// TLS to the store (None: `sslmode=disable`).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The URL without its password, for messages.
    shown: String,
    host_id: String,
    /// The connection for queries and transactions (one at a time; reconnected on demand).
    client: Mutex<Option<Client>>,
    /// Requests this agent's sessions wait on.
    waiters: StdMutex<Waiters>,
    audit: Option<Arc<Audit>>,
    metrics: Arc<Metrics>,
    webhook: Option<webhook::Notifier>,
    /// This store, for work spawned from `&self` (a ticket's `Drop`).
    me: std::sync::Weak<PgStore>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreUnavailable {
    StoreUnavailable(e.to_string())
}

impl PgStore {
    /// Parse `url` (with the password from `password` if given), connect, migrate, close the
    /// pending requests an earlier run of this agent left, and start the listener. Any failure
    /// here is fatal for the agent.
    pub async fn start(
        url: &str,
        password: Option<String>,
        host_id: String,
        audit: Option<Arc<Audit>>,
        metrics: Arc<Metrics>,
        webhook: Option<webhook::Notifier>,
    ) -> Result<Arc<PgStore>, PgStoreError> {
        let shown = tollgate_policy::redact_url_password(url);
        let tls_err = |reason: String| PgStoreError::Tls {
            url: shown.clone(),
            reason,
        };
        let words = StoreTlsParams::from_url(url).map_err(tls_err)?;
        let tls = words.client_config().map_err(tls_err)?;
        let mut config: Config =
            words
                .url
                .parse()
                .map_err(|e: tokio_postgres::Error| PgStoreError::BadUrl {
                    url: shown.clone(),
                    reason: e.to_string(),
                })?;
        config.ssl_mode(words.ssl_mode());
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_application_name().is_none() {
            config.application_name("tollgate-agent");
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        let store = Arc::new_cyclic(|me| PgStore {
            me: me.clone(),
            config,
            tls,
            shown: shown.clone(),
            host_id,
            client: Mutex::new(None),
            waiters: StdMutex::new(HashMap::new()),
            audit,
            metrics,
            webhook,
        });
        let fail = |reason: String| PgStoreError::Unreachable {
            url: shown.clone(),
            reason,
        };
        let client = connect(&store.config, &store.tls).await.map_err(fail)?;
        migrate(&client).await.map_err(fail)?;
        *store.client.lock().await = Some(client);
        let closed = store
            .close_orphans(
                "the agent restarted while the request was pending (the bot's connection was closed)",
            )
            .await
            .map_err(|e| fail(e.0))?;
        if closed > 0 {
            tracing::info!(
                closed,
                host_id = %store.host_id,
                "closed approval requests this agent held before it restarted"
            );
        }
        // The listener's first connection is made before start returns, so that a request
        // opened right after start is never decided unheard.
        let (conn_ready_tx, conn_ready_rx) = oneshot::channel();
        tokio::spawn(listen_loop(Arc::downgrade(&store), Some(conn_ready_tx)));
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, conn_ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(fail(format!("LISTEN {CHANNEL}: {e}"))),
            _ => return Err(fail(format!("LISTEN {CHANNEL}: no connection"))),
        }
        tracing::info!(store = %shown, host_id = %store.host_id, "approval requests are kept in the shared store");
        Ok(store)
    }

    /// This agent's name in the store.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Run `f` on the query connection, connecting first if needed; a failure (or a hang past
    /// [`OP_TIMEOUT`]) drops the connection so that the next call reconnects.
    async fn with_client<T, F>(&self, f: F) -> Result<T, StoreUnavailable>
    where
        F: for<'c> FnOnce(&'c mut Client) -> BoxFut<'c, Result<T, tokio_postgres::Error>>,
    {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            match connect(&self.config, &self.tls).await {
                Ok(c) => *guard = Some(c),
                Err(e) => return Err(StoreUnavailable(e)),
            }
        }
        let Some(client) = guard.as_mut() else {
            return Err(StoreUnavailable("no connection".into()));
        };
        match tokio::time::timeout(OP_TIMEOUT, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if client.is_closed() || e.is_closed() {
                    *guard = None;
                }
                Err(unavailable(db_error(&e)))
            }
            Err(_) => {
                *guard = None;
                Err(StoreUnavailable(format!(
                    "no answer within {}s",
                    OP_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// Change request `id` in one transaction: lock the row, let `change` edit it (or refuse
    /// with its error, leaving the row as it was), write it back and notify its holder.
    /// `Ok(Err(e))`: `change` refused; `Ok(Ok(None))`: no such row.
    async fn update<E: Send + 'static>(
        &self,
        id: u64,
        change: impl FnOnce(&mut ApprovalRequest) -> Result<bool, E> + Send + 'static,
    ) -> Result<Result<Option<ApprovalRequest>, E>, StoreUnavailable> {
        self.with_client(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let row = tx
                    .query_opt(
                        "SELECT doc FROM tollgate_approvals WHERE id = $1 FOR UPDATE",
                        &[&(id as i64)],
                    )
                    .await?;
                let Some(row) = row else {
                    return Ok(Ok(None));
                };
                let doc: serde_json::Value = row.get(0);
                let Ok(mut req) = serde_json::from_value::<ApprovalRequest>(doc) else {
                    return Ok(Ok(None));
                };
                match change(&mut req) {
                    Err(e) => Ok(Err(e)),
                    Ok(false) => Ok(Ok(Some(req))),
                    Ok(true) => {
                        let doc = serde_json::to_value(&req).unwrap_or_default();
                        tx.execute(
                            "UPDATE tollgate_approvals SET status = $2, doc = $3, updated_at = now() WHERE id = $1",
                            &[&(id as i64), &req.status.as_str(), &doc],
                        )
                        .await?;
                        // Only a request that left `pending` wakes its holder: a vote that
                        // still needs more approvals must not end the wait.
                        if req.status != Status::Pending {
                            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &id.to_string()])
                                .await?;
                        }
                        tx.commit().await?;
                        Ok(Ok(Some(req)))
                    }
                }
            })
        })
        .await
    }

    /// Close every pending row this agent holds that no session of it waits on (it restarted,
    /// or a ticket's own close failed while the store was away). Returns how many.
    async fn close_orphans(&self, reason: &'static str) -> Result<u64, StoreUnavailable> {
        let waiting: Vec<i64> = lock(&self.waiters).keys().map(|&id| id as i64).collect();
        let host = self.host_id.clone();
        let ids: Vec<i64> = self
            .with_client(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT id FROM tollgate_approvals WHERE holder = $1 AND status = 'pending' AND NOT (id = ANY($2))",
                            &[&host, &waiting],
                        )
                        .await?;
                    Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
                })
            })
            .await?;
        let mut n = 0;
        for id in ids {
            let now = now_ms();
            let r = self
                .update::<()>(id as u64, move |r| {
                    if r.status != Status::Pending {
                        return Ok(false);
                    }
                    r.status = Status::Expired;
                    r.decided = Some(rfc3339(now));
                    r.reason = Some(reason.into());
                    Ok(true)
                })
                .await?;
            if let Ok(Some(r)) = r {
                if r.status == Status::Expired && r.reason.as_deref() == Some(reason) {
                    n += 1;
                    self.count(&r);
                    self.audit_event(&r, "expired", None, Some(reason));
                }
            }
        }
        Ok(n)
    }

    /// Wake the local waiters whose requests are no longer pending in the store (after a
    /// reconnect: their NOTIFY may have been missed).
    async fn wake_decided(&self) -> Result<(), StoreUnavailable> {
        let waiting: Vec<i64> = lock(&self.waiters).keys().map(|&id| id as i64).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let done: Vec<i64> = self
            .with_client(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT id FROM tollgate_approvals WHERE id = ANY($1) AND status <> 'pending'",
                            &[&waiting],
                        )
                        .await?;
                    Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
                })
            })
            .await?;
        for id in done {
            self.wake(id as u64);
        }
        Ok(())
    }

    /// Wake the waiter of `id`, if it is one of ours.
    fn wake(&self, id: u64) {
        let w = {
            let mut ws = lock(&self.waiters);
            let w = ws.remove(&id);
            self.metrics.approvals_pending.set(ws.len() as i64);
            w
        };
        if let Some(w) = w {
            let _ = w.send(());
        }
    }

    /// Wake every waiter (the store is gone for longer than [`LOST_GRACE`]): each then fails
    /// closed in its `finish`, unless the store answers again by then.
    fn wake_all(&self) {
        let ws: Vec<_> = {
            let mut ws = lock(&self.waiters);
            let v = ws.drain().collect();
            self.metrics.approvals_pending.set(0);
            v
        };
        for (_, w) in ws {
            let _ = w.send(());
        }
    }

    /// A decided or closed request of ours: count it once (its holder counts it).
    fn count(&self, r: &ApprovalRequest) {
        let m = &self.metrics;
        m.approvals_total
            .with_label_values(&[r.status.as_str()])
            .inc();
        m.approval_wait
            .observe(now_ms().saturating_sub(r.created_ms) as f64 / 1000.0);
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
        let mut ev = obj(json!({
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
            "holder": r.holder,
            "store": "postgres",
            "host_id": self.host_id,
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

    /// Close `id` (ours) as `status` unless it was decided already; the final state.
    async fn close(
        &self,
        id: u64,
        status: Status,
        reason: String,
    ) -> Result<Option<ApprovalRequest>, StoreUnavailable> {
        let now = now_ms();
        let why = reason.clone();
        let r = self
            .update::<()>(id, move |r| {
                if r.status != Status::Pending {
                    return Ok(false);
                }
                r.status = status;
                r.decided = Some(rfc3339(now));
                r.reason = Some(why);
                Ok(true)
            })
            .await?;
        Ok(r.unwrap_or(None))
    }

    /// The end of one of our waits: the final state, counted and audited once.
    async fn finish_inner(&self, id: u64, reason: String) -> ApprovalRequest {
        self.wake(id); // deregister (a deadline, not a NOTIFY, may have ended the wait)
        let now = now_ms();
        let closed = self
            .update::<()>(id, move |r| {
                if r.status != Status::Pending {
                    return Ok(false);
                }
                r.status = Status::Expired;
                r.decided = Some(rfc3339(now));
                // Woken before the deadline with the request still pending: the store was
                // gone long enough for the waiters to be failed closed.
                r.reason = Some(if now + 50 < r.expires_ms {
                    "could not be decided: approval store unavailable for a while".into()
                } else {
                    reason
                });
                Ok(true)
            })
            .await
            .map(|r| r.unwrap_or(None));
        let r = match closed {
            Ok(Some(r)) => r,
            Ok(None) => lost(id, "request lost from the approval store".into()),
            Err(e) => {
                tracing::warn!(approval_id = id, error = %e, "approval store unavailable: the held operation fails closed");
                let r = lost(
                    id,
                    format!("could not be decided: approval store unavailable ({})", e.0),
                );
                self.metrics
                    .approvals_total
                    .with_label_values(&["unavailable"])
                    .inc();
                return r;
            }
        };
        self.count(&r);
        match r.status {
            Status::Expired => self.audit_event(&r, "expired", None, r.reason.as_deref()),
            Status::Approved => {
                // The decision was audited by the agent that took it; the holder records
                // that its held operation now runs, and who let it.
                self.audit_event(&r, "approved", r.approvals.last(), None)
            }
            Status::Denied => self.audit_event(&r, "denied", r.denied_by.as_ref(), None),
            Status::Cancelled | Status::Pending => {}
        }
        r
    }
}

/// A request we cannot read: it ends the wait as not approved, with `reason`.
fn lost(id: u64, reason: String) -> ApprovalRequest {
    ApprovalRequest {
        id,
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
        reason: Some(reason),
        holder: None,
    }
}

impl Holder for PgStore {
    fn finish(&self, id: u64, reason: String) -> BoxFut<'_, Option<ApprovalRequest>> {
        Box::pin(async move { Some(self.finish_inner(id, reason).await) })
    }

    fn cancel(&self, id: u64, reason: String) {
        self.wake(id);
        // Called from Drop: the update runs on its own task. If it cannot run (no runtime,
        // store down), the row is closed by the next orphan sweep (reconnect or restart).
        let Ok(h) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(me) = self.me.upgrade() else {
            return;
        };
        h.spawn(async move {
            match me.close(id, Status::Cancelled, reason.clone()).await {
                Ok(Some(r)) if r.status == Status::Cancelled => {
                    me.count(&r);
                    me.audit_event(&r, "cancelled", None, Some(&reason));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(approval_id = id, error = %e, "cannot cancel the approval request now; it is closed when the store is back")
                }
            }
        });
    }
}

impl ApprovalStore for PgStore {
    fn open(self: Arc<Self>, n: NewRequest) -> BoxFut<'static, Result<Ticket, StoreUnavailable>> {
        Box::pin(async move {
            // The id first, so the waiter is registered before the row exists: an orphan
            // sweep never closes a request whose session is about to wait on it.
            let id: i64 = self
                .with_client(|c| {
                    Box::pin(async move {
                        let row = c
                            .query_one("SELECT nextval('tollgate_approval_ids')", &[])
                            .await?;
                        Ok(row.get(0))
                    })
                })
                .await?;
            let id = id as u64;
            let (tx, rx) = oneshot::channel();
            {
                let mut ws = lock(&self.waiters);
                ws.insert(id, tx);
                self.metrics.approvals_pending.set(ws.len() as i64);
            }
            let created = now_ms();
            let timeout = n.timeout;
            let req = ApprovalRequest::pending(id, n, created, Some(self.host_id.clone()));
            let expires = req.expires_ms;
            let doc = serde_json::to_value(&req).unwrap_or_default();
            let host = self.host_id.clone();
            let inserted = self
                .with_client(move |c| {
                    Box::pin(async move {
                        c.execute(
                            "INSERT INTO tollgate_approvals (id, holder, status, created_ms, expires_ms, doc) VALUES ($1, $2, 'pending', $3, $4, $5)",
                            &[&(id as i64), &host, &(created as i64), &(expires as i64), &doc],
                        )
                        .await
                    })
                })
                .await;
            if let Err(e) = inserted {
                self.wake(id);
                return Err(e);
            }
            self.audit_event(&req, "requested", None, None);
            if let Some(w) = &self.webhook {
                w.notify(&req);
            }
            let holder: Arc<dyn Holder> = self.clone();
            Ok(Ticket::new(holder, id, timeout, rx))
        })
    }

    fn list(
        &self,
    ) -> BoxFut<'_, Result<(Vec<ApprovalRequest>, Vec<ApprovalRequest>), StoreUnavailable>> {
        Box::pin(async move {
            let now = now_ms() as i64;
            let (p, r) = self
                .with_client(move |c| {
                    Box::pin(async move {
                        // Rows whose holder never closed them (it died and did not come back)
                        // are closed by whoever lists, ABANDONED_AFTER past their expiry.
                        c.execute(
                            "UPDATE tollgate_approvals SET status = 'expired', updated_at = now(),
                                 doc = doc || jsonb_build_object('status', 'expired', 'reason', $2::text,
                                     'decided', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))
                             WHERE status = 'pending' AND expires_ms < $1",
                            &[
                                &(now - ABANDONED_AFTER.as_millis() as i64),
                                &"expired: the agent holding it did not close it (it stopped and has not come back)",
                            ],
                        )
                        .await?;
                        let p = c
                            .query(
                                "SELECT doc FROM tollgate_approvals WHERE status = 'pending' ORDER BY id",
                                &[],
                            )
                            .await?;
                        let r = c
                            .query(
                                "SELECT doc FROM tollgate_approvals WHERE status <> 'pending' ORDER BY id DESC LIMIT $1",
                                &[&(HISTORY as i64)],
                            )
                            .await?;
                        Ok((p, r))
                    })
                })
                .await?;
            let docs = |rows: Vec<tokio_postgres::Row>| {
                rows.iter()
                    .filter_map(|r| {
                        serde_json::from_value::<ApprovalRequest>(r.get::<_, serde_json::Value>(0))
                            .ok()
                    })
                    .collect::<Vec<_>>()
            };
            Ok((docs(p), docs(r)))
        })
    }

    fn get(&self, id: u64) -> BoxFut<'_, Result<Option<ApprovalRequest>, StoreUnavailable>> {
        Box::pin(async move {
            let row = self
                .with_client(move |c| {
                    Box::pin(async move {
                        c.query_opt(
                            "SELECT doc FROM tollgate_approvals WHERE id = $1",
                            &[&(id as i64)],
                        )
                        .await
                    })
                })
                .await?;
            Ok(row.and_then(|r| serde_json::from_value(r.get::<_, serde_json::Value>(0)).ok()))
        })
    }

    fn decide<'a>(
        &'a self,
        id: u64,
        who: &'a Approver,
        verdict: Verdict,
        comment: Option<String>,
    ) -> BoxFut<'a, Result<ApprovalRequest, DecideError>> {
        Box::pin(async move {
            let approver = who.clone();
            let now = now_ms();
            let r = self
                .update(id, move |r| {
                    if r.status != Status::Pending {
                        return Err(DecideError::Closed {
                            id,
                            status: r.status.as_str(),
                        });
                    }
                    // Its holder expires it at the deadline; a vote after it is refused here
                    // too (the holder may be gone).
                    if now >= r.expires_ms {
                        return Err(DecideError::Closed {
                            id,
                            status: "expired",
                        });
                    }
                    let (status, vote) = apply_verdict(r, &approver, verdict, comment, now)?;
                    if let Some(s) = status {
                        r.status = s;
                        r.decided = Some(rfc3339(now));
                    }
                    let _ = vote;
                    Ok(true)
                })
                .await
                .map_err(|e| DecideError::Unavailable(e.0))?;
            let r = match r {
                Ok(Some(r)) => r,
                Ok(None) => return Err(DecideError::NotFound(id)),
                Err(e) => return Err(e),
            };
            let vote = match r.status {
                Status::Denied => r.denied_by.clone(),
                _ => r
                    .approvals
                    .iter()
                    .rev()
                    .find(|v| v.subject == who.subject)
                    .cloned(),
            };
            let action = match r.status {
                Status::Pending => "approval_vote",
                s => s.as_str(),
            };
            self.audit_event(&r, action, vote.as_ref(), None);
            Ok(r)
        })
    }
}

/// Keep a dedicated LISTEN connection up while the store exists: wake waiters on NOTIFY;
/// on loss, reconnect with backoff, then re-read what was missed; after [`LOST_GRACE`]
/// without a connection, fail the waiters closed. `ready` reports the first LISTEN.
async fn listen_loop(
    store: std::sync::Weak<PgStore>,
    mut ready: Option<oneshot::Sender<Result<(), String>>>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut lost_since: Option<tokio::time::Instant> = None;
    let mut first = true;
    loop {
        let Some(s) = store.upgrade() else {
            return;
        };
        let config = s.config.clone();
        let tls = s.tls.clone();
        let shown = s.shown.clone();
        drop(s);
        match listen_once(&config, &tls).await {
            Ok((client, mut notes, conn_task)) => {
                backoff = BACKOFF_MIN;
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
                if !first {
                    tracing::info!(store = %shown, "approval store listener reconnected");
                    if let Some(s) = store.upgrade() {
                        // Anything decided while we were away: wake its waiter; anything we
                        // hold that nobody waits on any more: close it.
                        if let Err(e) = s.wake_decided().await {
                            tracing::warn!(error = %e, "cannot re-read pending approvals after reconnecting");
                        }
                        if let Err(e) = s
                            .close_orphans("the agent lost the request while the approval store was unavailable")
                            .await
                        {
                            tracing::warn!(error = %e, "cannot close orphaned approval requests");
                        }
                    }
                }
                first = false;
                while let Some(payload) = notes.recv().await {
                    let Some(s) = store.upgrade() else {
                        return;
                    };
                    if let Ok(id) = payload.trim().parse::<u64>() {
                        s.wake(id);
                    }
                }
                drop(client);
                conn_task.abort();
                tracing::warn!(store = %shown, "approval store listener lost its connection; reconnecting");
                lost_since = Some(tokio::time::Instant::now());
                continue;
            }
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                    return;
                }
                let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= LOST_GRACE {
                    if let Some(s) = store.upgrade() {
                        if !lock(&s.waiters).is_empty() {
                            tracing::error!(store = %shown, error = %e, "approval store unavailable for {}s: held operations fail closed", LOST_GRACE.as_secs());
                            s.wake_all();
                        }
                    }
                } else {
                    tracing::warn!(store = %shown, error = %e, "approval store listener cannot reconnect yet");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One LISTEN connection: its client (kept alive), the NOTIFY payloads, and the task driving
/// it (the channel closes when the connection ends).
async fn listen_once(
    config: &Config,
    tls: &Option<Arc<rustls::ClientConfig>>,
) -> Result<
    (
        Client,
        tokio::sync::mpsc::UnboundedReceiver<String>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let (client, mut conn) = connect_raw(config, tls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "approval store listener connection error");
                    return;
                }
                None => return,
            }
        }
    });
    match tokio::time::timeout(
        OP_TIMEOUT,
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await
    {
        Ok(Ok(())) => Ok((client, rx, task)),
        Ok(Err(e)) => {
            task.abort();
            Err(db_error(&e))
        }
        Err(_) => {
            task.abort();
            Err("LISTEN timed out".into())
        }
    }
}

/// Apply the schema migrations not yet recorded, under a transaction-scoped advisory lock so
/// that agents starting together migrate once.
pub async fn migrate(client: &Client) -> Result<(), String> {
    let run = async {
        client.batch_execute("BEGIN").await?;
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS tollgate_schema_version (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
        let current: i32 = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM tollgate_schema_version",
                &[],
            )
            .await?
            .get(0);
        for (v, sql) in MIGRATIONS {
            if *v > current {
                client.batch_execute(sql).await?;
                client
                    .execute(
                        "INSERT INTO tollgate_schema_version (version) VALUES ($1)",
                        &[v],
                    )
                    .await?;
                tracing::info!(version = v, "approval store schema migrated");
            }
        }
        client.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>(())
    };
    match tokio::time::timeout(OP_TIMEOUT * 4, run).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(format!("schema migration failed: {}", db_error(&e)))
        }
        Err(_) => Err("schema migration timed out".into()),
    }
}

/// A PostgreSQL error with the server's message when there is one.
fn db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {} ({})", d.severity(), d.message(), d.code().code()),
        None => {
            // tokio-postgres keeps the cause (a TLS certificate error, an I/O error) apart.
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        }
    }
}

/// A query connection, its driver spawned.
async fn connect(
    config: &Config,
    tls: &Option<Arc<rustls::ClientConfig>>,
) -> Result<Client, String> {
    let (client, conn) = connect_raw(config, tls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "approval store connection ended");
        }
    });
    Ok(client)
}

type RawConn = tokio_postgres::Connection<Socket, StoreTlsStream>;

/// Connect to the first reachable host of `config` with a socket carrying the agent's mark,
/// so the connect hooks never redirect the agent's own store traffic (the store may well sit
/// behind a protected address).
async fn connect_raw(
    config: &Config,
    tls: &Option<Arc<rustls::ClientConfig>>,
) -> Result<(Client, RawConn), String> {
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    if hosts.is_empty() {
        return Err("no host in the store URL".into());
    }
    let mut last = String::new();
    for (i, h) in hosts.iter().enumerate() {
        let port = ports
            .get(i)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        // A Unix socket stays on the host: no TLS (as libpq).
        let mut plain;
        let (config, tls) = match h {
            Host::Tcp(name) => (
                config,
                StoreTls {
                    config: tls.clone(),
                    host: name.clone(),
                },
            ),
            Host::Unix(_) => {
                plain = config.clone();
                plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                (
                    &plain,
                    StoreTls {
                        config: None,
                        host: String::new(),
                    },
                )
            }
        };
        let sock = match h {
            Host::Tcp(name) => tcp(name, port).await,
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                tokio::net::UnixStream::connect(&path)
                    .await
                    .map(Socket::Unix)
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
        };
        match sock {
            Ok(s) => {
                match tokio::time::timeout(CONNECT_TIMEOUT, config.connect_raw(s, tls)).await {
                    Ok(Ok(c)) => return Ok(c),
                    Ok(Err(e)) => last = db_error(&e),
                    Err(_) => last = "login timed out".into(),
                }
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn tcp(name: &str, port: u16) -> Result<Socket, String> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((name, port))
        .await
        .map_err(|e| format!("{name}: {e}"))?
        .collect();
    let mut last = format!("{name}: no address");
    for a in addrs {
        let s = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        if let Err(e) = socket2::SockRef::from(&s).set_mark(crate::bpf::AGENT_MARK) {
            last = format!("SO_MARK: {e}");
            continue;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, s.connect(a)).await {
            Ok(Ok(t)) => {
                let _ = t.set_nodelay(true);
                return Ok(Socket::Tcp(t));
            }
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => last = format!("{a}: connect timed out"),
        }
    }
    Err(last)
}

/// A TCP or Unix stream to the store.
pub enum Socket {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl tokio::io::AsyncRead for Socket {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Socket {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The host id when `[agent] host_id` is not set: the kernel's host name.
pub fn default_host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
