//! Operator commands that are more than a call into the daemon's modules: `policy test` and
//! `policy explain` (`policy.rs`), `sessions list` (`sessions.rs`), and rendering `status`
//! (`status.rs`).

pub mod policy;
pub mod sessions;

pub mod status;
