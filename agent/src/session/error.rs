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
    /// Policy refused the connection or an operation.
    #[error("policy: {0}")]
    Policy(String),
    /// A bug or resource problem in the agent.
    #[error("internal: {0}")]
    Internal(String),
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
