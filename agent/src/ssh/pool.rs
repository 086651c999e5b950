//! Upstream connection reuse: when a bot connection ends cleanly, its logged-in upstream SSH
//! connection is kept (idle, bounded) for the next connection of the same identity to the same
//! server with the same login, which then opens its channels on it and skips the upstream key
//! exchange and login. On by default; `pool = false` on the target turns it off.
//!
//! Nothing session-specific lives on an SSH connection between channels (env, pty and forwards
//! are per channel), so a kept connection is as good as a fresh one; each channel is still
//! decided under the policy of the moment.
//!
//! The kept connections are a [`Pool`], a field of the SSH handler (built once): a reload closes
//! those of targets it changed or removed, shutdown disconnects the rest.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use super::channel::Upstream;
use crate::session::kept::{Kept, KeptConn, KeptKey};

/// What must be equal for a connection to be reused.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub target: String,
    pub identity: Option<String>,
    pub server: SocketAddr,
    pub user: String,
    pub key_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
}

impl KeptKey for PoolKey {
    const IDLE: Duration = Duration::from_secs(60);
    const PER_KEY: usize = 4;
    fn target(&self) -> &str {
        &self.target
    }
}

impl KeptConn for Arc<Upstream> {
    /// Open, and not shared with a channel still running.
    fn is_open(&self) -> bool {
        !self.handle.is_closed() && Arc::strong_count(self) == 1
    }
}

/// Idle upstream connections by what must match to reuse them.
pub type Pool = Kept<PoolKey, Arc<Upstream>>;
