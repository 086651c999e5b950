//! The session's close: audit and metrics exactly once (ztunnel's `ConnectionResult` habit).

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use serde_json::{json, Map, Value};
use tracing::warn;

use super::{Agent, DataPathError, SessionCx};
use crate::relay::Totals;

/// Writes the session's close event and metrics exactly once: `finish` normally, `Drop` as the
/// fallback when the task is cancelled (shutdown deadline).
pub(super) struct SessionGuard {
    protocol: &'static str,
    done: bool,
    agent: Arc<Agent>,
    base: Map<String, Value>,
    started: Instant,
}

impl SessionGuard {
    pub(super) fn new(cx: &SessionCx, protocol: &'static str) -> SessionGuard {
        cx.agent
            .metrics
            .sessions_active
            .with_label_values(&[protocol])
            .inc();
        SessionGuard {
            protocol,
            done: false,
            agent: cx.agent.clone(),
            base: cx.base(),
            started: cx.started,
        }
    }

    pub(super) fn finish(mut self, cx: &SessionCx, result: Result<Totals, DataPathError>) {
        let t = Totals {
            bytes_up: cx.bytes.0.load(Ordering::Relaxed),
            bytes_down: cx.bytes.1.load(Ordering::Relaxed),
        };
        let (status, error) = match &result {
            Ok(_) => ("ok", None),
            Err(e) => (e.label(), Some(e.to_string())),
        };
        if let Err(e) = &result {
            warn!(error = %e, "session ended with an error");
        }
        self.close(t, status, error);
    }

    fn close(&mut self, t: Totals, status: &str, error: Option<String>) {
        if self.done {
            return;
        }
        self.done = true;
        let m = &self.agent.metrics;
        m.sessions_active.with_label_values(&[self.protocol]).dec();
        m.relay_bytes
            .with_label_values(&[self.protocol, "upstream"])
            .inc_by(t.bytes_up);
        m.relay_bytes
            .with_label_values(&[self.protocol, "downstream"])
            .inc_by(t.bytes_down);
        let secs = self.started.elapsed().as_secs_f64();
        m.session_seconds
            .with_label_values(&[self.protocol])
            .observe(secs);
        let mut ev = self.base.clone();
        ev.insert("event".into(), "close".into());
        ev.insert("operation".into(), "close".into());
        ev.insert("status".into(), status.into());
        ev.insert("error".into(), json!(error));
        ev.insert("bytes_up".into(), t.bytes_up.into());
        ev.insert("bytes_down".into(), t.bytes_down.into());
        ev.insert("duration_ms".into(), ((secs * 1000.0) as u64).into());
        self.agent.audit.write(ev);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.close(
            Totals::default(),
            "aborted",
            Some("session cancelled at shutdown".into()),
        );
    }
}
