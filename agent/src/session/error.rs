//! Data-path errors, tagged by the side they came from.

use std::{io, net::SocketAddr};

/// Where an error on the data path came from (pingora's habit): it decides the metric label
/// and what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    /// The client misbehaved or went away.
    #[error("client: {0}")]
    Client(io::Error),
    /// The upstream could not be reached or failed.
    #[error("upstream {addr}: {source}")]
    Upstream { addr: SocketAddr, source: io::Error },
    /// Policy ended the session: the decision that did (its rule and reason, never the
    /// operation's text).
    #[error("policy: {} (rule {}, {})", .0.action.as_str(), .0.rule.as_deref().unwrap_or("none"), .0.reason)]
    Policy(tollgate_policy::Decision),
    /// A bug or resource problem in the agent.
    #[error("internal: {0}")]
    Internal(#[from] InternalError),
}

/// What went wrong inside the agent, by kind.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// A message the agent built does not fit its protocol's limits (a field too long, too
    /// many columns).
    #[error("cannot encode a message: {0}")]
    Encode(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A state the handler's own logic rules out (a bug): names the state.
    #[error("unexpected state: {0}")]
    Unreachable(&'static str),
    /// The target's configuration cannot be used as it is (a key file that does not load);
    /// the message names the file and the fix.
    #[error("target configuration: {0}")]
    Config(String),
}

impl InternalError {
    /// [`InternalError::Encode`] of any error.
    pub fn encode(e: impl std::error::Error + Send + Sync + 'static) -> DataPathError {
        DataPathError::Internal(InternalError::Encode(Box::new(e)))
    }

    /// [`InternalError::Unreachable`] as a data-path error.
    pub fn unreachable(state: &'static str) -> DataPathError {
        DataPathError::Internal(InternalError::Unreachable(state))
    }
}

impl DataPathError {
    /// The one place errors become a bounded label.
    pub fn label(&self) -> &'static str {
        match self {
            DataPathError::Client(_) => "client",
            DataPathError::Upstream { .. } => "upstream",
            DataPathError::Policy(_) => "policy",
            DataPathError::Internal(_) => "internal",
        }
    }
}
