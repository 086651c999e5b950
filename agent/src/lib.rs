//! The tollgate host agent as a library: the `tollgate` binary is a thin CLI over it, and fuzz
//! targets and tests link it directly.
//!
//! Layout: `approvals/` (the approval broker, admin API, CLI client, webhook), `run.rs`
//! (daemon wiring, reload, shutdown), `proxy.rs` (the accept path), `session/` (the
//! protocol-neutral session layer: `SessionCx`, the handler trait and registry, decisions,
//! approvals, upstream, credentials, workload tokens), `handlers.rs` (the registry of protocol
//! handlers, the one place naming them), `pg/` (the PostgreSQL handler), `ssh/` (the SSH
//! handler), `relay.rs` (opaque relays), `bpf.rs` (kernel side), `targets.rs` (routes over
//! `tollgate_policy::route`), `identity.rs` (kernel facts to
//! identity), `http/` (the HTTP, HTTPS and Kubernetes handler), `audit.rs`, `metrics.rs`, `doctor.rs`,
//! `status.rs` (`GET /v1/status`), `cli/` (`policy test|explain`, `sessions list`, status text),
//! `secret.rs` (reading a secret file: the one trim), `tls.rs` (the agent CA, bot-side TLS per
//! handler and upstream TLS) and `sys.rs` (every raw syscall).

pub mod approvals;
pub mod audit;
pub mod bpf;
pub mod cli;
pub mod datadir;
pub mod doctor;
pub mod handlers;
pub mod heap;
pub mod http;
pub mod identity;
pub mod journal;
pub mod mask;
pub mod metrics;
pub mod oidc;
pub mod pg;
pub mod plane;
pub mod policy_lint;
pub mod proxy;
pub mod recording;
pub mod relay;
pub mod replay;
pub mod run;
pub mod secret;
pub mod session;
pub mod sink;
pub mod ssh;
pub mod status;
pub mod sys;
pub mod targets;
pub mod tls;

/// Lock a mutex, recovering from poisoning. Every mutex in the agent guards data that stays
/// consistent across a panic (caches, kernel map handles, append-only files), so a poisoned
/// lock is safe to keep using.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `json!({...})` literal as the field map the audit log and recordings take.
pub(crate) fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}
pub mod unix_accept;
pub mod unix_redirect;
