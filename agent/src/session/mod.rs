//! The protocol-neutral session layer: everything a protocol handler shares, so that a handler
//! is a folder that plugs in (`pg/`, `ssh/`, `http/`) and the accept path (`proxy.rs`) and the daemon
//! (`run.rs`) do not grow with each protocol.
//!
//! Layout: `agent.rs` (the shared state: [`Agent`], one policy [`Generation`], where kernel
//! records come from), `handler.rs` (the [`ProtocolHandler`] trait and the [`Registry`] built
//! once at start), `cx.rs` ([`SessionCx`]: the connection decision, then one policy snapshot
//! per operation for its decision, audit line and approval, claims always passed), `guard.rs`
//! (the close event and metrics, exactly once), `approval.rs` (open, wait and hold an approval
//! with withdrawal), `upstream.rs` (connect to the original destination), `credentials.rs`
//! (read a target's secret), `kept.rs` (upstream connections kept between sessions), `workload.rs` (workload OIDC token checks), `error.rs` (typed
//! data-path errors), `relay.rs` (the opaque TCP relay, the handler of `tcp` targets and
//! of whole-connection allows) and `testing.rs` (the in-process tier's constructors).
//!
//! Dependencies point one way: handlers use `session`, `session` names no handler. A
//! protocol-specific reply (a PostgreSQL FATAL) reaches the shared code only as a handler's
//! own method ([`ProtocolHandler::refuse`]).

mod agent;
mod approval;
pub mod credentials;
mod cx;
mod error;
mod guard;
mod handler;
pub mod kept;
pub mod live;
mod relay;
pub mod testing;
mod upstream;
pub mod workload;

pub use agent::{Agent, ConnSource, Generation};
pub use approval::{ApprovalOutcome, Withdrawn, DEFAULT_APPROVAL_TIMEOUT};
pub use cx::{audit_refusal, reset, SessionCx};
pub use error::{DataPathError, InternalError};
pub use handler::{target_changed, BoxFuture, ProtocolHandler, Refusal, Registry};
pub use relay::TcpHandler;

#[cfg(test)]
mod tests;
