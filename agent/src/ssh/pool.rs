//! Upstream connection reuse: when a bot connection ends cleanly, its logged-in upstream SSH
//! connection is kept (idle, bounded) for the next connection of the same identity to the same
//! server with the same login, which then opens its channels on it and skips the upstream key
//! exchange and login. On by default; `pool = false` on the target turns it off.
//!
//! Nothing session-specific lives on an SSH connection between channels (env, pty and forwards
//! are per channel), so a kept connection is as good as a fresh one; each channel is still
//! decided under the policy of the moment.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, LazyLock, Mutex},
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

static POOL: LazyLock<Mutex<HashMap<PoolKey, Idle>>> = LazyLock::new(Default::default);

/// A kept connection for `key` that is still open, if any.
pub fn take(key: &PoolKey) -> Option<Arc<Upstream>> {
    let mut pool = crate::lock(&POOL);
    let idle = pool.get_mut(key)?;
    while let Some((up, since)) = idle.pop() {
        if since.elapsed() < IDLE && !up.handle.is_closed() {
            return Some(up);
        }
    }
    None
}

/// Keep `up` for the next session of `key` (dropped when the key already has enough, or when
/// it is shared with a channel still running).
pub fn put(key: PoolKey, up: Arc<Upstream>) -> Result<(), Arc<Upstream>> {
    if up.handle.is_closed() || Arc::strong_count(&up) > 1 {
        return Err(up);
    }
    let mut pool = crate::lock(&POOL);
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

/// Idle upstream connections kept (for tests and metrics).
pub fn kept() -> usize {
    crate::lock(&POOL).values().map(Vec::len).sum()
}
