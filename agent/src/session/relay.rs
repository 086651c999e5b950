//! The opaque TCP relay: `protocol = "tcp"` targets, and whole-connection allows of protocols
//! whose handler does not inspect operations. Part of the session layer because the layer
//! itself falls back to it.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;
use tollgate_policy::Protocol;

use super::{BoxFuture, DataPathError, ProtocolHandler, SessionCx};
use crate::relay::{self, RelayKind, Totals};

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
    ) -> BoxFuture<'a, Result<Totals, DataPathError>> {
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
