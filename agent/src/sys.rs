//! Every raw Linux call the agent makes lives here: bpf(2) link creation and pinning, mount
//! lookups, bpffs mounting, socket marks and splice(2). Keeping them in one module keeps the
//! `unsafe` small and reviewable; everything else in the agent is safe Rust.

use std::{
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

/// Errors from the host's kernel interfaces; each message names the likely fix.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// No cgroup2 filesystem in /proc/mounts.
    #[error("no cgroup v2 mount found in /proc/mounts: mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified` (or boot with systemd.unified_cgroup_hierarchy=1)")]
    NoCgroup2,
    /// bpffs is not mounted where pins are kept and mounting it failed.
    #[error("bpffs not mounted at {path} and mounting failed ({source}): run `mount -t bpf bpf {path}` as root")]
    Bpffs {
        /// The directory that should be a bpffs.
        path: String,
        /// The mount error.
        source: io::Error,
    },
    /// A bpf(2) call failed.
    #[error("bpf({call}) failed: {source}")]
    Bpf {
        /// Which command.
        call: &'static str,
        /// errno.
        source: io::Error,
    },
    /// Any other I/O error with its context.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        source: io::Error,
    },
}

/// The five attach points tollgate uses, as kernel attach types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    SockOps,
    GetPeerName4,
    GetPeerName6,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::SockOps,
        Hook::GetPeerName4,
        Hook::GetPeerName6,
    ];
    /// Program name in the eBPF object (the Rust function name).
    pub fn program(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::SockOps => "tollgate_sockops",
            Hook::GetPeerName4 => "getpeername4",
            Hook::GetPeerName6 => "getpeername6",
        }
    }
    fn attach_type(self) -> u32 {
        (match self {
            Hook::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
            Hook::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
            Hook::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
            Hook::GetPeerName4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
            Hook::GetPeerName6 => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
        }) as u32
    }
}

/// Find the cgroup v2 mount point from /proc/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, pure-v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, SysError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|source| SysError::Io {
        what: "read /proc/mounts".into(),
        source,
    })?;
    mount_point_of(&mounts, "cgroup2").ok_or(SysError::NoCgroup2)
}

/// The first mount point of filesystem type `fstype` in a /proc/mounts text.
pub fn mount_point_of(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (_dev, mp, ty) = (it.next()?, it.next()?, it.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape_mount(mp)))
    })
}

/// Whether `path` is itself a mount point of type `fstype`.
pub fn is_mounted(path: &Path, fstype: &str) -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut it = l.split_whitespace();
            let _ = it.next();
            matches!((it.next(), it.next()), (Some(mp), Some(ty)) if ty == fstype && Path::new(&unescape_mount(mp)) == path)
        })
    })
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// Make sure the bpffs that will hold `pin_dir` is mounted (mounting /sys/fs/bpf if needed),
/// then create `pin_dir`.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), SysError> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_mounted(root, "bpf") {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| SysError::Bpffs {
            path: root.display().to_string(),
            source: io::Error::from(e),
        })?;
    }
    fs::create_dir_all(pin_dir).map_err(|source| SysError::Io {
        what: format!("create {}", pin_dir.display()),
        source,
    })
}

fn bpf(cmd: bpf_cmd, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised 128-byte buffer laid out as the kernel's
    // `union bpf_attr` member for `cmd`; the kernel reads at most `size` bytes of it and checks
    // that the unused tail is zero.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Attach `prog` to the cgroup `cgroup` through a bpf_link (BPF_LINK_CREATE). Cgroup links
/// always have multi-attach semantics, so other programs on the same cgroup keep working.
/// aya 0.14 cannot turn a cgroup_sock_addr link into a pinnable `FdLink`, hence this call.
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    hook: Hook,
) -> Result<OwnedFd, SysError> {
    let mut attr = [0u64; 16];
    // link_create: { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; ... }
    attr[0] = (prog.as_raw_fd() as u32 as u64) | ((cgroup.as_raw_fd() as u32 as u64) << 32);
    attr[1] = hook.attach_type() as u64;
    let fd = bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(|source| SysError::Bpf {
        call: "BPF_LINK_CREATE",
        source,
    })?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Pin a bpf object (link, map, program) at `path` on a bpffs (BPF_OBJ_PIN).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), SysError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| SysError::Io {
        what: format!("pin path {} contains NUL", path.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let mut attr = [0u64; 16];
    // obj_pin: { u64 pathname; u32 bpf_fd; u32 file_flags; ... }
    attr[0] = c.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u32 as u64;
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map_err(|source| SysError::Bpf {
        call: "BPF_OBJ_PIN",
        source,
    })?;
    Ok(())
}

/// splice(2) between two descriptors, non-blocking, moving pages where possible.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors the caller keeps open for the duration of the call;
    // null offsets mean "use the file position", which sockets and pipes require.
    let r = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A non-blocking pipe with a 1 MiB buffer (when the host allows it), for splice relays.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(io::Error::from)?;
    // Bigger pipes mean fewer syscalls per MiB; failure (pipe-max-size) is harmless.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((r, w))
}

/// Kernel release string, e.g. "6.18.44".
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Effective capability mask of this process (from /proc/self/status).
pub fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            mount_point_of(m, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_point_of(m, "bpf"), None);
    }

    #[test]
    fn unescapes_spaces() {
        let m = "none /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(
            mount_point_of(m, "cgroup2"),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }
}
