//! The protocol handlers this agent serves, built once at start: the one place that names
//! them. A new protocol is a folder (`pg/`, `ssh/`, `http/`) implementing
//! [`ProtocolHandler`](crate::session::ProtocolHandler) and one line here.

use std::sync::Arc;

use tollgate_policy::Protocol;

use crate::{http::HttpHandler, pg::handler::PgHandler, relay::RelayKind, session::Registry};

/// The opaque relay, and an inspecting handler per protocol that has one.
pub fn registry(relay_kind: RelayKind) -> Registry {
    let mut r = Registry::new(relay_kind)
        .with(Arc::new(PgHandler::new()))
        .with(Arc::new(crate::ssh::SshHandler::default()));
    for protocol in [Protocol::Http, Protocol::Https, Protocol::Kubernetes] {
        r = r.with(Arc::new(HttpHandler::new(protocol)));
    }
    r
}
