//! Upstream connections kept between sessions: when a bot connection ends, the handler may
//! leave its idle upstream connections here for the next session with an equal key (the same
//! identity, target and upstream settings, as each handler's key says), for a while. The SSH
//! and HTTP handlers keep theirs in a [`Kept`] field (PostgreSQL's pool also resets and
//! watches its connections: `pg/pool.rs`).
//!
//! A reload drops the connections of targets it changed ([`Kept::remove_targets`] with
//! [`super::target_changed`]); dropping a connection closes it.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

/// What must be equal for a kept connection to be reused, and how it is kept.
pub trait KeptKey: Eq + Hash {
    /// How long an idle connection is kept.
    const IDLE: Duration;
    /// Idle connections kept per key.
    const PER_KEY: usize;
    /// The target it belongs to.
    fn target(&self) -> &str;
}

/// A kept connection.
pub trait KeptConn {
    /// Whether it can still carry a session (not closed by either side).
    fn is_open(&self) -> bool;
}

/// Idle upstream connections by key, newest last.
pub struct Kept<K, V> {
    idle: Mutex<HashMap<K, Vec<(V, Instant)>>>,
}

impl<K, V> Default for Kept<K, V> {
    fn default() -> Self {
        Kept {
            idle: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: KeptKey, V: KeptConn> Kept<K, V> {
    /// The newest kept connection for `key` that is still open and not expired, if any.
    pub fn take(&self, key: &K) -> Option<V> {
        let mut kept = crate::lock(&self.idle);
        let idle = kept.get_mut(key)?;
        while let Some((c, since)) = idle.pop() {
            if since.elapsed() < K::IDLE && c.is_open() {
                return Some(c);
            }
        }
        None
    }

    /// Keep `c` for the next session of `key`; given back when closed or when the key already
    /// has [`KeptKey::PER_KEY`]. Expired and closed connections of every key go first.
    pub fn put(&self, key: K, c: V) -> Result<(), V> {
        if !c.is_open() {
            return Err(c);
        }
        let mut kept = crate::lock(&self.idle);
        kept.retain(|_, idle| {
            idle.retain(|(c, since)| since.elapsed() < K::IDLE && c.is_open());
            !idle.is_empty()
        });
        let idle = kept.entry(key).or_default();
        if idle.len() >= K::PER_KEY {
            return Err(c);
        }
        idle.push((c, Instant::now()));
        Ok(())
    }

    /// Idle connections kept.
    pub fn kept(&self) -> usize {
        crate::lock(&self.idle).values().map(Vec::len).sum()
    }

    /// Take out the kept connections of every target `stale` names (all of them at
    /// shutdown): the caller says goodbye or drops them.
    pub fn remove_targets(&self, stale: impl Fn(&str) -> bool) -> Vec<V> {
        crate::lock(&self.idle)
            .extract_if(|k, _| stale(k.target()))
            .flat_map(|(_, idle)| idle.into_iter().map(|(c, _)| c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(PartialEq, Eq, Hash)]
    struct Key(&'static str, u8);

    impl KeptKey for Key {
        const IDLE: Duration = Duration::from_millis(200);
        const PER_KEY: usize = 2;
        fn target(&self) -> &str {
            self.0
        }
    }

    /// A connection: its number and whether it is open.
    struct C(u8, bool);

    impl KeptConn for C {
        fn is_open(&self) -> bool {
            self.1
        }
    }

    #[test]
    fn kept_connections_go_to_equal_keys_only_newest_first_bounded_and_expiring() {
        let k: Kept<Key, C> = Kept::default();
        assert!(k.put(Key("a", 1), C(1, true)).is_ok());
        assert!(k.put(Key("a", 1), C(2, true)).is_ok());
        assert!(k.put(Key("a", 1), C(3, true)).is_err(), "two per key");
        assert!(
            k.put(Key("a", 1), C(4, false)).is_err(),
            "closed ones are not kept"
        );
        assert!(k.take(&Key("a", 2)).is_none(), "another key gets nothing");
        assert_eq!(k.take(&Key("a", 1)).map(|c| c.0), Some(2), "newest first");
        assert!(k.put(Key("b", 1), C(5, true)).is_ok());
        assert_eq!(k.kept(), 2);
        let gone = k.remove_targets(|t| t == "b");
        assert_eq!(gone.iter().map(|c| c.0).collect::<Vec<_>>(), [5]);
        std::thread::sleep(Key::IDLE);
        assert!(k.take(&Key("a", 1)).is_none(), "expired");
    }
}
