//! tollgate's kernel programs, all in one object so that they share maps.
//!
//! Layout: `connect4`/`connect6` (cgroup/connect*) test the destination port against the
//! `PORTS` bitmap, then look the destination up in the `TARGETS4`/`TARGETS6` LPM tries; a
//! protected TCP connect is rewritten to the agent's listener and the original destination plus
//! the caller's kernel facts are stored in `SOCK_ORIG` by socket cookie. The agent finds the
//! client socket's cookie with sock_diag after `accept()` (no sock_ops program: it would run on
//! every TCP handshake of the host). `getpeername4`/`getpeername6` show the client its original
//! peer.
//! Per-CPU `COUNTERS` are read by the agent for metrics.
//!
//! On the host (any non-bpf target) this crate is an empty binary so that `cargo check
//! --workspace` keeps working; the real build is `agent/build.rs` through aya-build.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists only to link.
    loop {}
}

/// Helpers such as `bpf_get_current_cgroup_id` in these program types are GPL-only.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
