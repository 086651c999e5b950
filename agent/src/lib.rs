//! The tollgate host agent as a library: the `tollgate` binary is a thin CLI over it, and fuzz
//! targets and tests link it directly.
//!
//! Layout: `run.rs` (daemon wiring, reload, shutdown), `proxy.rs` (sessions and the
//! protocol-handler trait), `relay.rs` (opaque relays), `bpf.rs` (kernel side), `targets.rs`
//! (routes), `identity.rs` (kernel facts to identity), `audit.rs`, `metrics.rs`, `doctor.rs`,
//! and `sys.rs` (every raw syscall).

pub mod audit;
pub mod bpf;
pub mod doctor;
pub mod identity;
pub mod mask;
pub mod metrics;
pub mod pg;
pub mod proxy;
pub mod recording;
pub mod relay;
pub mod replay;
pub mod run;
pub mod sys;
pub mod targets;
