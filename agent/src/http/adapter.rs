//! The HTTP handler as a [`ProtocolHandler`]: the one place that knows the session layer's
//! entry point.

use tokio::net::TcpStream;
use tollgate_policy::Protocol;

use crate::{
    relay::Totals,
    session::{BoxFuture, DataPathError, ProtocolHandler, SessionCx},
};

/// `http`, `https` and `kubernetes` targets (one instance per protocol).
pub struct HttpHandler {
    pub protocol: Protocol,
    /// Upstream connections ended sessions left for their identity's next ones.
    kept: super::upstream::Kept,
    /// Credential scanners, one per injected value (`scrub.rs`).
    scrubs: super::scrub::ScrubCache,
}

impl HttpHandler {
    pub fn new(protocol: Protocol) -> HttpHandler {
        HttpHandler {
            protocol,
            kept: Default::default(),
            scrubs: Default::default(),
        }
    }
}

impl ProtocolHandler for HttpHandler {
    fn protocol(&self) -> Protocol {
        self.protocol
    }
    /// Every request is decided on its own.
    fn inspects(&self) -> bool {
        true
    }
    fn serve<'a>(
        &'a self,
        cx: &'a SessionCx,
        client: TcpStream,
    ) -> BoxFuture<'a, Result<Totals, DataPathError>> {
        Box::pin(super::serve::serve(&self.kept, &self.scrubs, cx, client))
    }
    fn on_reload(&self, old: &crate::session::Generation, new: &tollgate_policy::Policy) {
        // Kept upstream connections of a target the new policy changed, removed or stopped
        // pooling: dropped (which closes them), as the other handlers' are.
        let closed = self
            .kept
            .remove_targets(|name| crate::session::target_changed(&old.policy, new, name))
            .len();
        if closed > 0 {
            tracing::info!(
                closed,
                "closed kept HTTP upstream connections of changed targets"
            );
        }
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.kept.remove_targets(|_| true);
        Box::pin(async {})
    }
}
