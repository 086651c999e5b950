//! Live sessions by (identity, target), kept by the session guard for `GET /v1/status`.
//! Identities and targets are policy names (or `unknown`), so the map stays bounded.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{Map, Value};

/// Open sessions per (identity, target) of one agent.
#[derive(Debug, Default)]
pub struct LiveSessions(Mutex<BTreeMap<(String, String), u64>>);

fn key(base: &Map<String, Value>) -> (String, String) {
    let s = |k: &str| {
        base.get(k)
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string()
    };
    (s("identity"), s("target"))
}

impl LiveSessions {
    /// A session with these audit base fields (`identity`, `target`) started.
    pub fn open(&self, base: &Map<String, Value>) {
        *crate::lock(&self.0).entry(key(base)).or_default() += 1;
    }

    /// The session started with [`LiveSessions::open`] ended.
    pub fn close(&self, base: &Map<String, Value>) {
        let mut m = crate::lock(&self.0);
        let k = key(base);
        if let Some(n) = m.get_mut(&k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&k);
            }
        }
    }

    /// ((identity, target), open sessions), in key order.
    pub fn snapshot(&self) -> Vec<((String, String), u64)> {
        crate::lock(&self.0)
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }
}
