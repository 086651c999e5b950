//! Heap bytes in use, for the benches' idle-memory figures. mimalloc keeps freed memory for
//! reuse, so the agent's RSS barely moves when sessions come and go and cannot say what a
//! session holds. With `TOLLGATE_HEAP_STATS=1` in its environment, the binary's global
//! allocator counts the bytes it hands out and takes back, and `/metrics` shows the balance as
//! `tollgate_heap_bytes_in_use`, and how many allocations it made as
//! `tollgate_heap_allocations_total` (the benches' allocations per transaction and request).
//! Off (the default), each allocation pays one relaxed load.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

static COUNTING: AtomicBool = AtomicBool::new(false);
static IN_USE: AtomicI64 = AtomicI64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Start counting if `TOLLGATE_HEAP_STATS=1`. Call before the runtime starts: what was
/// allocated earlier and freed later makes the balance lower, so only differences between two
/// readings mean anything.
pub fn count_from_env() {
    if std::env::var_os("TOLLGATE_HEAP_STATS").is_some_and(|v| v == "1") {
        COUNTING.store(true, Ordering::Relaxed);
    }
}

/// Whether the allocator counts.
pub fn counting() -> bool {
    COUNTING.load(Ordering::Relaxed)
}

/// The allocator's hook: `delta` bytes allocated (negative: freed).
#[inline]
pub fn note(delta: i64) {
    if COUNTING.load(Ordering::Relaxed) {
        IN_USE.fetch_add(delta, Ordering::Relaxed);
    }
}

/// The allocator's hook for a new block (or a block moved by realloc) of `bytes`.
#[inline]
pub fn note_allocation(bytes: i64) {
    if COUNTING.load(Ordering::Relaxed) {
        IN_USE.fetch_add(bytes, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Allocations (and reallocations) since counting started.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Bytes allocated and not freed since counting started.
pub fn in_use() -> i64 {
    IN_USE.load(Ordering::Relaxed)
}
