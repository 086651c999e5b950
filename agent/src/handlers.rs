//! The protocol handlers this agent serves, built once at start: the one place that names
//! them. A new protocol is a folder (`pg/`, `ssh/`, next `http/`) implementing
//! [`ProtocolHandler`](crate::session::ProtocolHandler) and one line here.

use std::sync::Arc;

use crate::{pg::handler::PgHandler, relay::RelayKind, session::Registry};

/// The opaque relay, and an inspecting handler per protocol that has one.
pub fn registry(relay_kind: RelayKind) -> Registry {
    Registry::new(relay_kind)
        .with(Arc::new(PgHandler::new()))
        .with(Arc::new(crate::ssh::SshHandler))
}
