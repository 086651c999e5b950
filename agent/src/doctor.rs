//! `tollgate doctor`: can this host run the agent? Each check prints the fix when it fails.

use std::{path::Path, process::ExitCode};

use crate::sys;

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: &'static str,
}

/// The oldest kernel tollgate runs on: the hooks exist from 5.8 (getpeername, cgroup
/// bpf_links), 5.8 and 5.9 were short-lived and are untested, 5.10 is tested under qemu by
/// `cargo xtask kernels` (see README, requirements).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    (major, minor) >= want
}

/// Where PostgreSQL puts its Unix sockets by default (Debian's, then upstream's).
const PG_SOCKET_DIRS: [&str; 3] = ["/var/run/postgresql", "/run/postgresql", "/tmp"];

/// What `doctor` says about the Unix socket of a local PostgreSQL target on `port`: always a
/// warning that the redirect does not cover it, then, for each socket file found in `dirs`,
/// whether every user can connect to it (mode o+w) or only its owner and group.
fn unix_socket_lines(target: &str, port: u16, dirs: &[&Path]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = vec![format!(
        "warn  Unix socket of postgres target \"{target}\" is not redirected\n      fix: {}",
        crate::targets::unix_socket_warning(target, port)
    )];
    let mut seen = std::collections::BTreeSet::new();
    for dir in dirs {
        let path = dir.join(format!(".s.PGSQL.{port}"));
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        // /var/run is usually a link to /run: report each socket once.
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o002 != 0 {
            out.push(format!(
                "warn  {} is mode {mode:04o}: every local user, bots included, can reach the \
                 database through it, around tollgate\n      fix: unix_socket_permissions = 0770 \
                 and unix_socket_group = <a group no bot is in> in postgresql.conf, then restart \
                 PostgreSQL",
                path.display()
            ));
        } else {
            out.push(format!(
                "ok    {} is mode {mode:04o} (uid {}, gid {}): only its owner and group can connect; \
                 keep bots out of that group",
                path.display(),
                meta.uid(),
                meta.gid()
            ));
        }
    }
    out
}

/// The policy `doctor` looks at: `--policy`, else the default path when it exists.
fn doctor_policy(policy: Option<&Path>) -> Option<Result<tollgate_policy::Policy, String>> {
    let default = Path::new("/etc/tollgate/policy.toml");
    let path = match policy {
        Some(p) => p,
        None if default.exists() => default,
        None => return None,
    };
    Some(crate::run::load_policy(path).map_err(|e| format!("{}: {e:#}", path.display())))
}

pub fn doctor(policy: Option<&Path>) -> ExitCode {
    let release = sys::kernel_release();
    let caps = sys::effective_caps();
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let cg = sys::cgroup2_mount();
    let checks = [
        Check {
            name: "kernel >= 5.10 (oldest tested; cgroup bpf_links and getpeername hooks need 5.8)",
            ok: kernel_at_least(&release, MIN_KERNEL),
            detail: release.clone(),
            fix: "upgrade the kernel to 5.10 or newer (Debian 11, RHEL 9, Ubuntu 22.04 and later all qualify)",
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
    // Not fatal: what the kernel offers beyond 5.10, probed as `tollgate run` does (the same
    // text as its start log line).
    match crate::bpf::probe_for_doctor() {
        Ok((features, exec)) => {
            let (weaker, text) = crate::bpf::kernel_summary(&features, exec);
            let tag = if weaker { "warn " } else { "ok   " };
            println!("{tag} kernel features {release}: {text}");
            if weaker {
                println!(
                    "      fix: Linux 5.18+ for ECONNREFUSED refusals, 6.10+ (or boot with lsm=...,bpf) for                      race-free exec attribution; the agent enforces without them"
                );
            }
        }
        Err(e) => println!("warn  kernel features: cannot probe ({e})"),
    }
    match doctor_policy(policy) {
        None => println!(
            "note: no policy checked (pass --policy FILE to check what its targets need from this host)"
        ),
        Some(Err(e)) => {
            failed += 1;
            println!("FAIL  policy {e}");
        }
        Some(Ok(p)) => {
            let local = sys::interface_addrs().unwrap_or_default();
            let dirs: Vec<&Path> = PG_SOCKET_DIRS.iter().map(Path::new).collect();
            let named = |t: &str| p.target(t).is_some_and(|t| t.unix_socket.is_some());
            for (target, port) in crate::targets::local_postgres_ports(&p, &local) {
                if named(&target) {
                    continue;
                }
                for line in unix_socket_lines(&target, port, &dirs) {
                    println!("{line}");
                }
            }
            let kernel = crate::unix_redirect::kernel_supports();
            for t in &p.targets {
                let Some(sock) = &t.unix_socket else { continue };
                match crate::unix_redirect::socket_warning(&t.name, sock, &kernel) {
                    Some(w) if kernel.is_err() => println!(
                        "warn  Unix socket of postgres target \"{}\" is not redirected\n      fix: {w}",
                        t.name
                    ),
                    Some(w) => println!(
                        "warn  Unix socket of postgres target \"{}\" is redirected, but reachable under other names\n      fix: {w}",
                        t.name
                    ),
                    None => println!(
                        "ok    Unix socket {} of postgres target \"{}\" is redirected to the agent (cgroup/connect_unix) and closed to other users by its permissions",
                        sock.display(),
                        t.name
                    ),
                }
            }
        }
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
    use std::{os::unix::fs::PermissionsExt as _, path::Path};

    #[test]
    fn unix_socket_lines_warn_and_judge_the_socket_mode() {
        let dir = std::env::temp_dir().join(format!("tg-doctor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(".s.PGSQL.5999");
        let _sock = std::os::unix::net::UnixListener::bind(&path).expect("bind socket");
        let dirs = [dir.as_path(), Path::new("/nonexistent-tg")];

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let open = super::unix_socket_lines("db", 5999, &dirs);
        assert!(
            open[0].starts_with("warn  Unix socket of postgres target \"db\""),
            "{open:?}"
        );
        assert!(
            open[0].contains("unix_socket_permissions = 0770"),
            "{open:?}"
        );
        assert_eq!(open.len(), 2, "{open:?}");
        assert!(
            open[1].starts_with("warn  ") && open[1].contains("mode 0777"),
            "{open:?}"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o770)).expect("chmod");
        let closed = super::unix_socket_lines("db", 5999, &dirs);
        assert!(
            closed[1].starts_with("ok    ") && closed[1].contains("mode 0770"),
            "{closed:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    #[test]
    fn parses_kernel_versions() {
        assert!(super::kernel_at_least("6.18.44-fc-v782", (5, 8)));
        assert!(!super::kernel_at_least("5.4.0-100-generic", (5, 8)));
        assert!(super::kernel_at_least("5.8.0", (5, 8)));
    }
}
