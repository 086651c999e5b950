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

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::channel::Upstream;

/// How long an idle upstream connection is kept.
pub const IDLE: Duration = Duration::from_secs(60);
/// Idle connections kept per key.
const PER_KEY: usize = 4;

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

type Idle = Vec<(Arc<Upstream>, Instant)>;

/// Idle upstream connections by what must match to reuse them.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Idle>>,
}

impl Pool {
    /// A kept connection for `key` that is still open, if any.
    pub fn take(&self, key: &PoolKey) -> Option<Arc<Upstream>> {
        let mut pool = crate::lock(&self.idle);
        let idle = pool.get_mut(key)?;
        while let Some((up, since)) = idle.pop() {
            if since.elapsed() < IDLE && !up.handle.is_closed() {
                return Some(up);
            }
        }
        None
    }

    /// Keep `up` for the next session of `key` (refused when the key already has enough, or
    /// when it is shared with a channel still running).
    pub fn put(&self, key: PoolKey, up: Arc<Upstream>) -> Result<(), Arc<Upstream>> {
        if up.handle.is_closed() || Arc::strong_count(&up) > 1 {
            return Err(up);
        }
        let mut pool = crate::lock(&self.idle);
        // Expired connections go first (their drop closes them).
        pool.retain(|_, idle| {
            idle.retain(|(u, since)| since.elapsed() < IDLE && !u.handle.is_closed());
            !idle.is_empty()
        });
        let idle = pool.entry(key).or_default();
        if idle.len() >= PER_KEY {
            return Err(up);
        }
        idle.push((up, Instant::now()));
        Ok(())
    }

    /// Idle upstream connections kept.
    pub fn kept(&self) -> usize {
        crate::lock(&self.idle).values().map(Vec::len).sum()
    }

    /// Take out the kept connections of every target `stale` names (all of them at shutdown);
    /// the caller disconnects them (dropping one closes it too).
    pub fn remove_targets(&self, stale: impl Fn(&str) -> bool) -> Vec<Arc<Upstream>> {
        crate::lock(&self.idle)
            .extract_if(|k, _| stale(&k.target))
            .flat_map(|(_, idle)| idle.into_iter().map(|(up, _)| up))
            .collect()
    }
}
