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
        Box::pin(super::serve::serve(cx, client))
    }
}
