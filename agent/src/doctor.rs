//! `tollgate doctor`: can this host run the agent? Each check prints the fix when it fails.

use std::{path::Path, process::ExitCode};

use crate::sys;

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: &'static str,
}

fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    (major, minor) >= want
}

pub fn doctor() -> ExitCode {
    let release = sys::kernel_release();
    let caps = sys::effective_caps();
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let cg = sys::cgroup2_mount();
    let checks = [
        Check {
            name: "kernel >= 5.8 (bpf_link on cgroups, getpeername hooks)",
            ok: kernel_at_least(&release, (5, 8)),
            detail: release.clone(),
            fix: "upgrade the kernel to 5.8 or newer",
        },
        Check {
            name: "cgroup v2 mounted",
            ok: cg.is_ok(),
            detail: cg.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string()),
            fix: "mount -t cgroup2 none /sys/fs/cgroup/unified (or boot with systemd.unified_cgroup_hierarchy=1)",
        },
        Check {
            name: "bpffs mounted at /sys/fs/bpf",
            ok: sys::is_mounted(Path::new("/sys/fs/bpf"), "bpf"),
            detail: String::new(),
            fix: "mount -t bpf bpf /sys/fs/bpf (the agent also mounts it when fail_mode = \"closed\")",
        },
        Check {
            name: "BTF at /sys/kernel/btf/vmlinux",
            ok: Path::new("/sys/kernel/btf/vmlinux").exists(),
            detail: String::new(),
            fix: "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        },
        Check {
            name: "CAP_BPF or CAP_SYS_ADMIN",
            ok: has(CAP_BPF) || has(CAP_SYS_ADMIN),
            detail: format!("CapEff={caps:#x}"),
            fix: "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (systemd: AmbientCapabilities=)",
        },
        Check {
            name: "CAP_NET_ADMIN (SO_MARK on upstream sockets)",
            ok: has(CAP_NET_ADMIN),
            detail: format!("CapEff={caps:#x}"),
            fix: "run as root or grant CAP_NET_ADMIN",
        },
    ];
    let mut failed = 0;
    for c in &checks {
        if c.ok {
            println!("ok    {} {}", c.name, c.detail);
        } else {
            failed += 1;
            println!("FAIL  {} {}\n      fix: {}", c.name, c.detail, c.fix);
        }
    }
    // Not fatal: without sched_prepare_exec the agent falls back to the sched_process_exec
    // tracepoint, which leaves a short window in which an exec is not yet seen.
    if kernel_at_least(&release, (6, 10)) {
        println!(
            "ok    exec attribution without a race (sched_prepare_exec, kernel >= 6.10) {release}"
        );
    } else {
        println!(
            "warn  exec attribution without a race (sched_prepare_exec, kernel >= 6.10) {release}\n      \
             fix: upgrade to Linux 6.10 or newer; until then a process that execs right after connecting \
             may be attributed by its old executable path for a moment (the agent logs a warning at start)"
        );
    }
    println!("note: root on this host can detach tollgate's programs; the threat model covers unprivileged workloads only.");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        println!("{failed} check(s) failed");
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_kernel_versions() {
        assert!(super::kernel_at_least("6.18.44-fc-v782", (5, 8)));
        assert!(!super::kernel_at_least("5.4.0-100-generic", (5, 8)));
        assert!(super::kernel_at_least("5.8.0", (5, 8)));
    }
}
