//! The handler contract and the registry of handlers, built once at start.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc};

use tokio::net::TcpStream;
use tollgate_policy::Protocol;

use super::{DataPathError, Generation, SessionCx};
use crate::relay::{RelayKind, Totals};

/// A boxed future, as trait objects return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a connection is refused before its handler serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Policy refused the connection (or no identity matched).
    Denied,
    /// The audit log cannot be written under `fail_mode = "closed"`.
    AuditUnwritable,
}

/// A protocol handler (postgres, ssh, http/https/kubernetes, and the opaque tcp relay). The
/// agent has already attributed the connection and admitted it; the handler classifies
/// operations, asks [`SessionCx::decide`] (or [`SessionCx::decide_in`] with one
/// [`SessionCx::policy`] snapshot) for each, connects upstream with
/// [`SessionCx::connect_upstream`], applies its response hooks (masking) and returns the byte
/// totals when the session ends. Its state (pools, caches, cancel keys) lives in its own
/// fields: a handler is built once, in [`Registry`].
///
/// Hooks other than `serve` default to nothing, as pingora's `ProxyHttp` phases do.
pub trait ProtocolHandler: Send + Sync {
    /// The `protocol` of the targets it serves.
    fn protocol(&self) -> Protocol;

    /// Whether it decides every operation itself (statements, channels, requests). Only then
    /// may a connection be admitted because operation-scoped or `claims`-conditioned rules
    /// could apply; an opaque handler gets only whole-connection allows (fail closed).
    fn inspects(&self) -> bool {
        false
    }

    /// Serve one admitted connection to its end.
    fn serve<'a>(
        &'a self,
        cx: &'a SessionCx,
        client: TcpStream,
    ) -> BoxFuture<'a, Result<Totals, DataPathError>>;

    /// Refuse a connection in the client's own language (PostgreSQL: a FATAL after the
    /// startup message, so psql prints `message`). The default resets it.
    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        _why: Refusal,
        _message: &'a str,
    ) -> BoxFuture<'a, ()> {
        super::reset(client);
        Box::pin(async {})
    }

    /// A new policy generation is about to replace `old` (drop pooled upstreams of targets
    /// that changed, for example).
    fn on_reload(&self, _old: &Generation, _new: &tollgate_policy::Policy) {}

    /// The agent stops: close what the handler keeps (after sessions drained).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Register the handler's own metrics (called once, at start).
    fn register_metrics(&self, _registry: &prometheus::Registry) {}
}

/// Whether a reload from `old` to `new` leaves the kept upstream connections of target `name`
/// stale: the target changed, went away or stopped pooling. What a pooling handler's
/// [`ProtocolHandler::on_reload`] closes.
pub fn target_changed(
    old: &tollgate_policy::Policy,
    new: &tollgate_policy::Policy,
    name: &str,
) -> bool {
    match (old.target(name), new.target(name)) {
        (Some(was), Some(now)) => was != now || !now.pool,
        _ => true,
    }
}

/// Protocol to handler, built once at start. The opaque relay is always there: it serves
/// `tcp` targets and whole-connection allows of protocols without an inspecting handler.
#[derive(Clone)]
pub struct Registry {
    relay: Arc<dyn ProtocolHandler>,
    by_protocol: HashMap<Protocol, Arc<dyn ProtocolHandler>>,
}

impl Registry {
    /// Only the opaque relay.
    pub fn new(relay_kind: RelayKind) -> Registry {
        let relay: Arc<dyn ProtocolHandler> = Arc::new(super::TcpHandler { kind: relay_kind });
        let mut by_protocol = HashMap::new();
        by_protocol.insert(Protocol::Tcp, relay.clone());
        Registry { relay, by_protocol }
    }

    /// Add (or replace) the handler of its protocol.
    pub fn with(mut self, handler: Arc<dyn ProtocolHandler>) -> Registry {
        self.by_protocol.insert(handler.protocol(), handler);
        self
    }

    /// The handler registered for `protocol`, if any.
    pub fn get(&self, protocol: Protocol) -> Option<&Arc<dyn ProtocolHandler>> {
        self.by_protocol.get(&protocol)
    }

    /// The handler of `protocol` if it inspects operations.
    pub fn inspecting(&self, protocol: Protocol) -> Option<&Arc<dyn ProtocolHandler>> {
        self.get(protocol).filter(|h| h.inspects())
    }

    /// The opaque relay.
    pub fn relay(&self) -> &Arc<dyn ProtocolHandler> {
        &self.relay
    }

    /// Each distinct handler once.
    pub fn handlers(&self) -> impl Iterator<Item = &Arc<dyn ProtocolHandler>> {
        let relay = &self.relay;
        std::iter::once(relay).chain(
            self.by_protocol
                .values()
                .filter(move |h| !Arc::ptr_eq(h, relay)),
        )
    }

    /// [`ProtocolHandler::on_reload`] of every handler.
    pub fn on_reload(&self, old: &Generation, new: &tollgate_policy::Policy) {
        for h in self.handlers() {
            h.on_reload(old, new);
        }
    }

    /// [`ProtocolHandler::shutdown`] of every handler.
    pub async fn shutdown(&self) {
        for h in self.handlers() {
            h.shutdown().await;
        }
    }

    /// [`ProtocolHandler::register_metrics`] of every handler.
    pub fn register_metrics(&self, registry: &prometheus::Registry) {
        for h in self.handlers() {
            h.register_metrics(registry);
        }
    }
}
