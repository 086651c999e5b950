//! Session threads: one single-threaded tokio runtime per core, each running the sessions
//! handed to it from start to end.
//!
//! A session's two directions wake each other on every round trip. On the work-stealing
//! runtime those wake-ups often cross worker threads (a futex wake per statement, measured
//! with strace under pgbench), and the tasks migrate between cores. Here a session stays on the
//! thread it was handed to, as pgbouncer's event loop does, and the threads share nothing on
//! the data path. The control plane (accept loops, metrics, the admin API, reloads) stays on the
//! main multi-threaded runtime.

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::runtime::{Builder, Handle};

thread_local! {
    static THREAD: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The index of the session thread running the caller (None off the session threads).
pub fn current() -> Option<usize> {
    THREAD.get()
}

/// The session runtimes; sessions are handed out round-robin.
pub struct Plane {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Plane {
    /// Start `threads` session threads (at least one). Each runs until the process exits.
    pub fn start(threads: usize) -> io::Result<Plane> {
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rt = Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("tollgate-session-{i}"))
                // pg_query recurses deeply on nested statements (over 1.5 MiB of stack in debug
                // builds for the deepest trees it accepts); sessions run on this thread's stack.
                .stack_size(8 << 20)
                .spawn(move || {
                    THREAD.set(Some(i));
                    rt.block_on(std::future::pending::<()>())
                })?;
        }
        Ok(Plane {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// How many session threads to run: `TOLLGATE_SESSION_THREADS`, else one per core. `0`
    /// runs sessions on the main runtime's workers instead (for comparisons).
    pub fn threads_from_env() -> usize {
        std::env::var("TOLLGATE_SESSION_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Run `fut` on the next session thread.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_spread_over_the_threads_and_run_to_the_end() {
        let plane = Plane::start(2).expect("start");
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            plane.spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let _ = tx.send(std::thread::current().name().map(str::to_string));
            });
        }
        let mut names: Vec<_> = (0..4)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("session ran")
                    .expect("named thread")
            })
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names, ["tollgate-session-0", "tollgate-session-1"]);
    }
}
