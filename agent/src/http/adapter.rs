//! The HTTP handler as a [`ProtocolHandler`]: the one place that knows the session layer's
//! entry point.

use std::{future::Future, pin::Pin};

use tokio::net::TcpStream;
use tollgate_policy::Protocol;

use crate::{
    proxy::{DataPathError, ProtocolHandler, SessionCx},
    relay::Totals,
};

/// `http`, `https` and `kubernetes` targets.
pub struct HttpHandler {
    pub protocol: Protocol,
}

impl ProtocolHandler for HttpHandler {
    fn protocol(&self) -> Protocol {
        self.protocol
    }
    fn serve<'a>(
        &'a self,
        cx: &'a SessionCx,
        client: TcpStream,
    ) -> Pin<Box<dyn Future<Output = Result<Totals, DataPathError>> + Send + 'a>> {
        Box::pin(super::serve::serve(cx, client))
    }
}
