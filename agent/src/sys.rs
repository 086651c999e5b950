//! Every raw Linux call the agent makes lives here: bpf(2) link creation and pinning, mount
//! lookups, bpffs mounting, socket marks, sock_diag lookups and splice(2). Keeping them in one module keeps the
//! `unsafe` small and reviewable; everything else in the agent is safe Rust.

use std::{
    ffi::CString,
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::Mutex,
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

/// The four cgroup attach points tollgate uses, as kernel attach types.
///
/// There is deliberately no `sock_ops` hook: a cgroup sock_ops program at the root is called
/// about nine times for *every* TCP connection on the host (both ends, each handshake step),
/// which measured as ~1 us added to every connect(). The agent finds the client socket of an
/// accepted connection with a sock_diag lookup instead ([`SockDiag`]), a cost paid only by
/// redirected connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    GetPeerName4,
    GetPeerName6,
    /// `cgroup/connect_unix` (Linux 6.7+): loaded by the agent's own loader, not through aya,
    /// so not in [`Hook::ALL`] (see `crate::unix_redirect`).
    ConnectUnix,
}

impl Hook {
    pub const ALL: [Hook; 4] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::GetPeerName4,
        Hook::GetPeerName6,
    ];
    /// Program name in the eBPF object (the Rust function name).
    pub fn program(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::GetPeerName4 => "getpeername4",
            Hook::GetPeerName6 => "getpeername6",
            Hook::ConnectUnix => "connect_unix",
        }
    }
    /// The program to load for this hook on a kernel with `features` (the connect hooks come
    /// in three variants, see [`KernelFeatures::connect_variant`]).
    pub fn program_for(self, features: &KernelFeatures) -> &'static str {
        match (self, features.connect_variant()) {
            (Hook::Connect4, ConnectVariant::Full) => "connect4",
            (Hook::Connect4, ConnectVariant::Plain) => "connect4_plain",
            (Hook::Connect4, ConnectVariant::Legacy) => "connect4_legacy",
            (Hook::Connect6, ConnectVariant::Full) => "connect6",
            (Hook::Connect6, ConnectVariant::Plain) => "connect6_plain",
            (Hook::Connect6, ConnectVariant::Legacy) => "connect6_legacy",
            (h, _) => h.program(),
        }
    }
    fn attach_type(self) -> u32 {
        (match self {
            Hook::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
            Hook::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
            Hook::GetPeerName4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
            Hook::GetPeerName6 => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
            Hook::ConnectUnix => bpf_attach_type::BPF_CGROUP_UNIX_CONNECT,
        }) as u32
    }
}

/// Which connect program fits the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectVariant {
    /// `bpf_set_retval` and `bpf_skc_to_mptcp_sock`: Linux 5.19+ with MPTCP.
    Full,
    /// `bpf_set_retval` only: 5.18, or a kernel built without MPTCP.
    Plain,
    /// Neither: 5.10 to 5.17. A refused connect fails with `EPERM`, and an MPTCP subflow is
    /// redirected like TCP.
    Legacy,
}

/// Helpers the connect hooks use beyond Linux 5.10's set, probed at start by loading a tiny
/// `cgroup/connect4` program that calls each one (as libbpf's and Cilium's probes do: the
/// verifier of a kernel without the helper rejects it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `bpf_set_retval` (helper 187, Linux 5.18): refuse with `ECONNREFUSED` and
    /// `EPROTONOSUPPORT` rather than the verdict's own `EPERM`.
    pub set_retval: bool,
    /// `bpf_skc_to_mptcp_sock` (helper 196, Linux 5.19, only in kernels built with MPTCP).
    pub mptcp_helper: bool,
}

impl KernelFeatures {
    /// Probe this kernel.
    pub fn probe() -> KernelFeatures {
        KernelFeatures {
            set_retval: probe_connect4(&SET_RETVAL_PROBE).is_ok(),
            mptcp_helper: probe_connect4(&MPTCP_PROBE).is_ok(),
        }
    }

    pub fn connect_variant(&self) -> ConnectVariant {
        match (self.set_retval, self.mptcp_helper) {
            (true, true) => ConnectVariant::Full,
            (true, false) => ConnectVariant::Plain,
            // No kernel has the MPTCP helper (5.19) without bpf_set_retval (5.18); if a
            // backport did, the legacy program still loads.
            (false, _) => ConnectVariant::Legacy,
        }
    }

    /// The errno a bot sees when a protected destination is refused because no agent listens.
    pub fn no_agent_errno(&self) -> &'static str {
        if self.set_retval {
            "ECONNREFUSED"
        } else {
            "EPERM"
        }
    }
}

/// One eBPF instruction (`struct bpf_insn`, little-endian: code, dst/src registers, offset,
/// immediate).
pub(crate) const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst | (src << 4)) as u64) << 8)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const LDX_DW: u8 = 0x79;
const JEQ_IMM: u8 = 0x15;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// `bpf_set_retval(-ECONNREFUSED); return 1;`
const SET_RETVAL_PROBE: [u64; 4] = [
    insn(MOV64_IMM, 1, 0, 0, -111),
    insn(CALL, 0, 0, 0, 187),
    insn(MOV64_IMM, 0, 0, 0, 1),
    insn(EXIT, 0, 0, 0, 0),
];

/// `if (ctx->sk) bpf_skc_to_mptcp_sock(ctx->sk); return 1;` (`sk` is at offset 64 of
/// `struct bpf_sock_addr`). A kernel built without MPTCP knows the helper but has no BTF for
/// its return type and rejects the program: for the connect hooks that is the same as absent.
const MPTCP_PROBE: [u64; 6] = [
    insn(LDX_DW, 2, 1, 64, 0),
    insn(JEQ_IMM, 2, 0, 2, 0),
    insn(MOV64_REG, 1, 2, 0, 0),
    insn(CALL, 0, 0, 0, 196),
    insn(MOV64_IMM, 0, 0, 0, 1),
    insn(EXIT, 0, 0, 0, 0),
];

/// Load `insns` as a `cgroup/connect4` program (never attached; the descriptor is closed at
/// once). Err carries the errno and the verifier's first line, for the debug log.
fn probe_connect4(insns: &[u64]) -> Result<(), String> {
    prog_load_sock_addr(insns, Hook::Connect4, 4096).map(drop)
}

/// Load `insns` as a cgroup sock_addr program for `hook` (its `expected_attach_type`). Err
/// carries the errno and the verifier's last line.
pub fn prog_load_sock_addr(insns: &[u64], hook: Hook, log_size: usize) -> Result<OwnedFd, String> {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u64 = 18;
    let license = c"GPL";
    let mut log = vec![0u8; log_size];
    let mut attr = [0u64; 16];
    // bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt | insns | license | log_level, log_size
    // | log_buf | kern_version, prog_flags | prog_name[16] | prog_ifindex, expected_attach_type
    attr[0] = BPF_PROG_TYPE_CGROUP_SOCK_ADDR | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | ((log.len() as u64) << 32);
    attr[4] = log.as_mut_ptr() as u64;
    // prog_name (bytes 48..64): what bpftool shows.
    let mut name = [0u8; 16];
    let n = hook.program().len().min(15);
    name[..n].copy_from_slice(&hook.program().as_bytes()[..n]);
    attr[6] = u64::from_ne_bytes(name[..8].try_into().unwrap_or_default());
    attr[7] = u64::from_ne_bytes(name[8..].try_into().unwrap_or_default());
    attr[8] = (hook.attach_type() as u64) << 32;
    match bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        // SAFETY: the kernel returned a new program descriptor that we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(format!("{e}: {last}"))
        }
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

/// Open a pinned bpf object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> Result<OwnedFd, SysError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| SysError::Io {
        what: format!("pin path {} contains NUL", path.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let mut attr = [0u64; 16];
    // obj_get: { u64 pathname; u32 bpf_fd; u32 file_flags; ... }
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr).map_err(|source| SysError::Bpf {
        call: "BPF_OBJ_GET",
        source,
    })?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Detach a link from its hook now (BPF_LINK_DETACH). Unpinning alone drops the last
/// reference through a deferred work item, so the program could still run for a moment after
/// `tollgate uninstall` returned.
pub fn link_detach(link: BorrowedFd<'_>) -> Result<(), SysError> {
    let mut attr = [0u64; 16];
    // link_detach: { u32 link_fd; }
    attr[0] = link.as_raw_fd() as u32 as u64;
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map_err(|source| SysError::Bpf {
        call: "BPF_LINK_DETACH",
        source,
    })?;
    Ok(())
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

/// Finds the socket cookie of a local TCP socket by its exact 4-tuple through
/// `NETLINK_SOCK_DIAG` (what `ss` uses): for an accepted connection, the cookie of the
/// *client's* socket, under which connect4/6 stored the original destination. One netlink
/// round trip per accepted connection, in this network namespace.
pub struct SockDiag(Mutex<OwnedFd>);

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u8 = 10;
/// `INET_DIAG_NOCOOKIE`: match any cookie.
const NO_COOKIE: u32 = !0;
/// nlmsghdr (16) + inet_diag_req_v2 (56).
const REQ_LEN: usize = 16 + 56;
/// Offset of `inet_diag_msg.id` in a reply (after the 16-byte nlmsghdr and 4 bytes of
/// family/state/timer/retrans).
const ID_OFF: usize = 16 + 4;

/// The inet_diag_sockid bytes (ports, addresses, interface 0; without the cookie) for a socket bound to `local` and
/// connected to `remote`; both must be of the same family.
fn diag_sockid(local: SocketAddr, remote: SocketAddr) -> [u8; 40] {
    let mut id = [0u8; 40];
    id[0..2].copy_from_slice(&local.port().to_be_bytes());
    id[2..4].copy_from_slice(&remote.port().to_be_bytes());
    for (off, ip) in [(4, local.ip()), (20, remote.ip())] {
        match ip {
            IpAddr::V4(v4) => id[off..off + 4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => id[off..off + 16].copy_from_slice(&v6.octets()),
        }
    }
    id
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is: a dual-stack client connected to
/// an IPv4 listener is hashed (and found) as IPv4.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

impl SockDiag {
    /// Open the netlink socket and check that it can find a TCP socket. `mark` is put on the
    /// test connection so that no connect hook (an earlier agent's pins) redirects it.
    pub fn new(mark: u32) -> Result<SockDiag, SysError> {
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(SysError::Io {
                what: "open NETLINK_SOCK_DIAG socket".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A reply always comes at once; never let a kernel surprise hang an agent thread.
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a correctly sized timeval on our descriptor.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let diag = SockDiag(Mutex::new(fd));
        diag.self_test(mark).map_err(|source| SysError::Io {
            what: "sock_diag cannot find TCP sockets by address, so no accepted connection could be attributed (needs CONFIG_INET_DIAG and tcp_diag: `modprobe tcp_diag`)".into(),
            source,
        })?;
        Ok(diag)
    }

    /// Find a loopback connection of our own. Without tcp_diag the kernel answers ENOENT,
    /// which would look like "client gone" for every connection: fail at start instead.
    fn self_test(&self, mark: u32) -> io::Result<()> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        // Needs CAP_NET_ADMIN; without it (unit tests) the mark is simply not set.
        let _ = client.set_mark(mark);
        client.connect_timeout(&l.local_addr()?.into(), std::time::Duration::from_secs(1))?;
        // Never block start-up on an accept that cannot come.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let (accepted, peer) = loop {
            match l.accept() {
                Ok(a) => break a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(io::Error::from(io::ErrorKind::TimedOut));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
        };
        let found = self.cookie(peer, accepted.local_addr()?)?;
        drop(client);
        match found {
            Some(_) => Ok(()),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        }
    }

    /// Cookie of the TCP socket bound to `local` and connected to `remote` (for the client of
    /// an accepted connection: `local` = the accepted peer address, `remote` = the accepted
    /// socket's local address). `Ok(None)` when no such socket exists (any more).
    pub fn cookie(&self, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
        let (local, remote) = (unmap(local), unmap(remote));
        let family = match (local, remote) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => libc::AF_INET,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => libc::AF_INET6,
            _ => return Ok(None),
        };
        let id = diag_sockid(local, remote);
        let mut req = [0u8; REQ_LEN];
        // nlmsghdr: len, type, flags (a request for one socket, no dump), seq, pid.
        req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        // inet_diag_req_v2: family, protocol, ext, pad, states, then the sockid.
        req[16] = family as u8;
        req[17] = libc::IPPROTO_TCP as u8;
        req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        req[24..64].copy_from_slice(&id);
        // idiag_if = 0 (bytes 60..64), idiag_cookie = INET_DIAG_NOCOOKIE.
        req[64..68].copy_from_slice(&NO_COOKIE.to_ne_bytes());
        req[68..72].copy_from_slice(&NO_COOKIE.to_ne_bytes());
        let mut buf = [0u8; 512];
        let n = self.round_trip(&req, &mut buf)?;
        parse_diag_reply(&buf[..n], &id)
    }

    /// Send one request on the netlink socket and read its reply into `buf`.
    fn round_trip(&self, req: &[u8], buf: &mut [u8]) -> io::Result<usize> {
        let fd = crate::lock(&self.0);
        // SAFETY: send/recv on our netlink descriptor with buffers that outlive the calls.
        let n = unsafe {
            if libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn ne_u16(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

fn ne_u32(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// A sock_diag `NLMSG_ERROR` reply: ENOENT means "no such socket", anything else is an error.
fn diag_errno<T>(b: &[u8]) -> io::Result<Option<T>> {
    let errno = ne_u32(b, 16).map_or(0, |e| -(e as i32));
    if errno == libc::ENOENT {
        Ok(None)
    } else {
        Err(io::Error::from_raw_os_error(errno))
    }
}

/// The cookie in a sock_diag reply to an exact lookup, checked against the asked-for sockid.
fn parse_diag_reply(b: &[u8], id: &[u8; 40]) -> io::Result<Option<u64>> {
    let u16_at = |o: usize| ne_u16(b, o);
    let u32_at = |o: usize| ne_u32(b, o);
    match u16_at(4) {
        Some(t) if t == libc::NLMSG_ERROR as u16 => diag_errno(b),
        Some(SOCK_DIAG_BY_FAMILY) => {
            let (Some(state), Some(ports), Some(lo), Some(hi)) = (
                b.get(17),
                b.get(ID_OFF..ID_OFF + 4),
                u32_at(ID_OFF + 40),
                u32_at(ID_OFF + 44),
            ) else {
                return Err(io::Error::other("short sock_diag reply"));
            };
            // The kernel matched the exact 4-tuple, but falls back to a listener on the
            // client's port; a listener is never the client. (Addresses are not compared: a
            // dual-stack client found through its IPv4 hash reports IPv4-mapped addresses.)
            if *state == TCP_LISTEN || ports != &id[0..4] {
                return Ok(None);
            }
            Ok(Some(u64::from(lo) | (u64::from(hi) << 32)))
        }
        _ => Err(io::Error::other("unexpected sock_diag reply")),
    }
}

/// `UNIX_DIAG_PEER`: the inode of the socket's peer.
const UNIX_DIAG_PEER: u16 = 2;
/// `UDIAG_SHOW_PEER`.
const UDIAG_SHOW_PEER: u32 = 0x4;

impl SockDiag {
    /// Socket cookie of the *client* of an accepted Unix stream connection `accepted` (under
    /// which connect_unix stored the caller's facts): unix_diag gives the peer's inode, then
    /// the peer's cookie. `Ok(None)` when the client is gone. Needs `unix_diag` (autoloaded).
    pub fn unix_peer_cookie(&self, accepted: BorrowedFd<'_>) -> io::Result<Option<u64>> {
        let st = nix::sys::stat::fstat(accepted.as_raw_fd()).map_err(io::Error::from)?;
        let Some((_, peer_ino)) = self.unix_query(st.st_ino as u32, UDIAG_SHOW_PEER)? else {
            return Ok(None);
        };
        match peer_ino {
            Some(ino) if ino != 0 => Ok(self.unix_query(ino, 0)?.map(|(cookie, _)| cookie)),
            _ => Ok(None),
        }
    }

    /// One exact unix_diag lookup of socket inode `ino`: its cookie and, with
    /// `UDIAG_SHOW_PEER`, its peer's inode.
    fn unix_query(&self, ino: u32, show: u32) -> io::Result<Option<(u64, Option<u32>)>> {
        const LEN: usize = 16 + 24;
        let mut req = [0u8; LEN];
        req[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        // unix_diag_req: family, protocol, pad, states, ino, show, cookie[2].
        req[16] = libc::AF_UNIX as u8;
        req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
        req[24..28].copy_from_slice(&ino.to_ne_bytes());
        req[28..32].copy_from_slice(&show.to_ne_bytes());
        req[32..36].copy_from_slice(&NO_COOKIE.to_ne_bytes());
        req[36..40].copy_from_slice(&NO_COOKIE.to_ne_bytes());
        let mut buf = [0u8; 512];
        let n = self.round_trip(&req, &mut buf)?;
        parse_unix_diag_reply(&buf[..n], ino)
    }
}

/// A unix_diag reply: (cookie, peer inode if shown), checked against the asked-for inode.
fn parse_unix_diag_reply(b: &[u8], ino: u32) -> io::Result<Option<(u64, Option<u32>)>> {
    let u16_at = |o: usize| ne_u16(b, o);
    let u32_at = |o: usize| ne_u32(b, o);
    match u16_at(4) {
        Some(t) if t == libc::NLMSG_ERROR as u16 => diag_errno(b),
        Some(SOCK_DIAG_BY_FAMILY) => {
            // unix_diag_msg: family, type, state, pad, ino, cookie[2]; then attributes.
            let (Some(len), Some(got), Some(lo), Some(hi)) =
                (u32_at(0), u32_at(20), u32_at(24), u32_at(28))
            else {
                return Err(io::Error::other("short unix_diag reply"));
            };
            if got != ino {
                return Ok(None);
            }
            let end = (len as usize).min(b.len());
            let mut peer = None;
            let mut off = 32;
            while off + 4 <= end {
                let (Some(alen), Some(atype)) = (u16_at(off), u16_at(off + 2)) else {
                    break;
                };
                if alen < 4 {
                    break;
                }
                if atype == UNIX_DIAG_PEER {
                    peer = u32_at(off + 4);
                }
                off += (alen as usize + 3) & !3;
            }
            Ok(Some((u64::from(lo) | (u64::from(hi) << 32), peer)))
        }
        _ => Err(io::Error::other("unexpected unix_diag reply")),
    }
}

// ---------------------------------------------------------------------------------------------
// Interface addresses (NETLINK_ROUTE)
// ---------------------------------------------------------------------------------------------

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// Legacy multicast group bits for `sockaddr_nl.nl_groups` (RTNLGRP_IPV4_IFADDR = 5,
/// RTNLGRP_IPV6_IFADDR = 9).
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

fn netlink_route_socket(groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid; family and groups are set below.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = groups;
    // SAFETY: bind with a correctly sized sockaddr_nl on our descriptor.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn set_rcvtimeo(fd: &OwnedFd, t: std::time::Duration) {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt with a correctly sized timeval on our descriptor.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

/// Every address on an interface of this network namespace (IPv4 and IPv6, link-local and
/// tentative ones included) with its interface index, by an `RTM_GETADDR` dump. The connect hooks treat them as
/// spellings of "this host" (see `targets::is_local_net`).
pub fn interface_addrs() -> Result<std::collections::BTreeMap<IpAddr, u32>, SysError> {
    let err = |source| SysError::Io {
        what: "list the interface addresses (NETLINK_ROUTE RTM_GETADDR)".into(),
        source,
    };
    let fd = netlink_route_socket(0).map_err(err)?;
    set_rcvtimeo(&fd, std::time::Duration::from_secs(2));
    // nlmsghdr (16) + ifaddrmsg (8, family AF_UNSPEC: both families).
    let mut req = [0u8; 24];
    req[0..4].copy_from_slice(&24u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETADDR.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: send on our netlink descriptor with a buffer that outlives the call.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let mut out = std::collections::BTreeMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv into a buffer we own, of the length we pass.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err(e));
        }
        match parse_addr_dump(&buf[..n as usize], &mut out).map_err(err)? {
            true => return Ok(out),
            false if n == 0 => return Err(err(io::Error::other("netlink dump ended early"))),
            false => {}
        }
    }
}

/// Parse one datagram of an `RTM_GETADDR` dump into `out`; true once `NLMSG_DONE` was seen.
fn parse_addr_dump(
    b: &[u8],
    out: &mut std::collections::BTreeMap<IpAddr, u32>,
) -> io::Result<bool> {
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let align = |n: usize| (n + 3) & !3;
    let mut off = 0;
    while off + 16 <= b.len() {
        let len = u32_at(b, off).unwrap_or(0) as usize;
        let ty = u16_at(b, off + 4).unwrap_or(0);
        if len < 16 || off + len > b.len() {
            return Err(io::Error::other("malformed netlink message"));
        }
        let msg = &b[off..off + len];
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(msg, 16).map_or(0, |e| -(e as i32));
                return Err(io::Error::from_raw_os_error(errno));
            }
            RTM_NEWADDR if msg.len() >= 24 => {
                let family = i32::from(msg[16]);
                let index = u32_at(msg, 20).unwrap_or(0);
                // IFA_LOCAL is the local address; IFA_ADDRESS is the peer's on a
                // point-to-point link and the local one otherwise (IPv6: always).
                let (mut local, mut address) = (None, None);
                let mut a = 24;
                while a + 4 <= msg.len() {
                    let alen = usize::from(u16_at(msg, a).unwrap_or(0));
                    let aty = u16_at(msg, a + 2).unwrap_or(0);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    let data = &msg[a + 4..a + alen];
                    let ip = match (family, data.len()) {
                        (libc::AF_INET, 4) => {
                            Some(IpAddr::from(<[u8; 4]>::try_from(data).unwrap_or_default()))
                        }
                        (libc::AF_INET6, 16) => {
                            Some(IpAddr::from(<[u8; 16]>::try_from(data).unwrap_or_default()))
                        }
                        _ => None,
                    };
                    match aty {
                        IFA_LOCAL => local = ip,
                        IFA_ADDRESS => address = ip,
                        _ => {}
                    }
                    a += align(alen);
                }
                if let Some(ip) = local.or(address) {
                    out.insert(ip, index);
                }
            }
            _ => {}
        }
        off += align(len);
    }
    Ok(false)
}

/// A NETLINK_ROUTE socket subscribed to IPv4 and IPv6 address changes of this network
/// namespace. [`AddrWatch::wait`] returns when something changed (or may have: a lost
/// notification, or the periodic timeout); the caller then reads [`interface_addrs`] again.
pub struct AddrWatch(OwnedFd);

impl AddrWatch {
    pub fn new() -> Result<AddrWatch, SysError> {
        let fd =
            netlink_route_socket(RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR).map_err(|source| {
                SysError::Io {
                what: "subscribe to address changes (NETLINK_ROUTE RTNLGRP_IPV4_IFADDR/IPV6_IFADDR)"
                    .into(),
                source,
            }
            })?;
        Ok(AddrWatch(fd))
    }

    /// Block until a notification arrives or `timeout` passes, then drain what else is queued
    /// (a burst of changes costs one re-read). Returns false on timeout.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        set_rcvtimeo(&self.0, timeout);
        let mut buf = vec![0u8; 16 * 1024];
        let mut flags = 0;
        let mut got = false;
        loop {
            // SAFETY: recv into a buffer we own, of the length we pass.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Notifications were dropped (ENOBUFS): something changed.
                    Some(libc::ENOBUFS) => got = true,
                    _ => {}
                }
                return got;
            }
            got = true;
            flags = libc::MSG_DONTWAIT;
        }
    }
}

/// The congestion control for the agent's loopback legs: one that does not pace.
pub const LOOPBACK_CONGESTION: &str = "cubic";

/// Give a socket whose peer is on this host ([`LOOPBACK_CONGESTION`]) a congestion control
/// that sends as fast as the receiver reads. The host default may pace (BBR does, on this
/// machine): on loopback there is no bottleneck queue to protect, and pacing only adds a
/// timer per burst and throttles the relay (1 GiB through the agent: 0.75x direct paced,
/// 0.9x unpaced). Sockets to other hosts keep the host's choice. Returns whether it was set;
/// a kernel built without cubic gets reno (always built in, also unpaced), and if even that
/// fails the default stays.
pub fn unpaced_on_loopback(sock: socket2::SockRef<'_>, peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
        && [LOOPBACK_CONGESTION, "reno"]
            .iter()
            .any(|cc| sock.set_tcp_congestion(cc.as_bytes()).is_ok())
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
/// The cookie of this process's network namespace (`SO_NETNS_COOKIE` on a fresh socket, Linux
/// 5.14+), as `bpf_get_netns_cookie` returns it in the connect hooks.
pub fn netns_cookie() -> Result<u64, SysError> {
    let io_err = |source| SysError::Io {
        what: "read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14+)".into(),
        source,
    };
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).map_err(io_err)?;
    let mut c = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_NETNS_COOKIE) into a u64 of the stated size, on a socket we own.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut c).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    Ok(c)
}

/// Whether the BPF LSM is among the kernel's active LSMs: from securityfs
/// (`/sys/kernel/security/lsm`, e.g. `lockdown,capability,yama,apparmor,bpf`), else from an
/// `lsm=` word on the kernel command line; None when neither says.
pub fn bpf_lsm_active() -> Option<bool> {
    if let Ok(list) = fs::read_to_string("/sys/kernel/security/lsm") {
        return Some(lsm_list_has_bpf(&list));
    }
    let cmdline = fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("lsm="))
        .next_back()
        .map(lsm_list_has_bpf)
}

fn lsm_list_has_bpf(list: &str) -> bool {
    list.trim().split(',').any(|l| l == "bpf")
}

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
    #[test]
    fn probe_instructions_encode_as_the_kernel_reads_them() {
        // r1 = -111: opcode 0xb7, dst r1, imm 0xffffff91.
        assert_eq!(super::SET_RETVAL_PROBE[0], 0xffff_ff91_0000_01b7);
        // call 187
        assert_eq!(super::SET_RETVAL_PROBE[1], (187u64 << 32) | 0x85);
        // r2 = *(u64 *)(r1 + 64): dst r2, src r1 -> regs byte 0x12, offset 64.
        assert_eq!(super::MPTCP_PROBE[0], (64u64 << 16) | (0x12 << 8) | 0x79);
        // if r2 == 0 goto +2
        assert_eq!(super::MPTCP_PROBE[1], (2u64 << 16) | (0x02 << 8) | 0x15);
    }

    #[test]
    fn lsm_list_parsing() {
        assert!(super::lsm_list_has_bpf(
            "lockdown,capability,yama,apparmor,bpf\n"
        ));
        assert!(!super::lsm_list_has_bpf(
            "lockdown,capability,yama,apparmor"
        ));
        assert!(!super::lsm_list_has_bpf("bpfx,yama"));
    }

    #[test]
    fn connect_variant_follows_the_probed_helpers() {
        use super::{ConnectVariant, KernelFeatures};
        let f = |set_retval, mptcp_helper| KernelFeatures {
            set_retval,
            mptcp_helper,
        };
        assert_eq!(f(true, true).connect_variant(), ConnectVariant::Full);
        assert_eq!(f(true, false).connect_variant(), ConnectVariant::Plain);
        assert_eq!(f(false, false).connect_variant(), ConnectVariant::Legacy);
        assert_eq!(f(false, true).connect_variant(), ConnectVariant::Legacy);
        assert_eq!(f(false, false).no_agent_errno(), "EPERM");
        assert_eq!(f(true, false).no_agent_errno(), "ECONNREFUSED");
    }

    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn only_loopback_peers_get_the_unpaced_congestion_control() {
        let cc = |s: &socket2::Socket| {
            String::from_utf8_lossy(&s.tcp_congestion().expect("TCP_CONGESTION"))
                .trim_end_matches('\0')
                .to_string()
        };
        let new = || {
            socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
                .expect("socket")
        };
        for peer in ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"] {
            let s = new();
            assert!(
                unpaced_on_loopback(socket2::SockRef::from(&s), peer.parse().expect("address")),
                "{peer}"
            );
            assert_eq!(cc(&s), LOOPBACK_CONGESTION, "{peer}");
        }
        for peer in ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1"] {
            let s = new();
            let before = cc(&s);
            assert!(
                !unpaced_on_loopback(socket2::SockRef::from(&s), peer.parse().expect("address")),
                "{peer}"
            );
            assert_eq!(cc(&s), before, "{peer}: the host's choice stays");
        }
    }

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let m = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            mount_point_of(m, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_point_of(m, "bpf"), None);
    }

    fn so_cookie(s: &impl AsRawFd) -> u64 {
        let mut c = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt(SO_COOKIE) into a u64 of the stated size.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                std::ptr::from_mut(&mut c).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "SO_COOKIE");
        c
    }

    /// The agent's view: find the client socket of an accepted connection by (peer, local).
    fn finds_client(listen: &str, connect: SocketAddr) {
        let l = std::net::TcpListener::bind(listen).expect("bind");
        let port = l.local_addr().expect("addr").port();
        let client =
            std::net::TcpStream::connect(SocketAddr::new(connect.ip(), port)).expect("connect");
        let (accepted, peer) = l.accept().expect("accept");
        let local = accepted.local_addr().expect("local");
        let diag = SockDiag::new(0).expect("sock_diag");
        assert_eq!(
            diag.cookie(peer, local).expect("lookup"),
            Some(so_cookie(&client))
        );
        // The accepted socket is not the client; a port nobody uses finds nothing.
        let other = SocketAddr::new(peer.ip(), 1);
        assert_eq!(diag.cookie(other, local).expect("lookup"), None);
    }

    #[test]
    fn sock_diag_finds_the_client_socket_v4() {
        finds_client("127.0.0.1:0", "127.0.0.1:0".parse().expect("a"));
    }

    #[test]
    fn sock_diag_finds_the_client_socket_v6() {
        finds_client("[::1]:0", "[::1]:0".parse().expect("a"));
    }

    #[test]
    fn sock_diag_finds_a_dual_stack_client_of_a_v4_listener() {
        // An AF_INET6 socket connecting to ::ffff:127.0.0.1 (what connect6 redirects to the
        // IPv4 listener), accepted as an IPv4 peer.
        finds_client("127.0.0.1:0", "[::ffff:127.0.0.1]:0".parse().expect("a"));
    }

    #[test]
    fn sock_diag_finds_a_client_that_already_closed() {
        // connect(); write(); close() before the agent gets to accept(): the client socket is
        // in FIN_WAIT2 and still carries its cookie.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = std::net::TcpStream::connect(l.local_addr().expect("a")).expect("c");
        std::io::Write::write_all(&mut client, b"x").expect("write");
        let cookie = so_cookie(&client);
        drop(client);
        let (accepted, peer) = l.accept().expect("accept");
        let local = accepted.local_addr().expect("local");
        let diag = SockDiag::new(0).expect("sock_diag");
        assert_eq!(diag.cookie(peer, local).expect("lookup"), Some(cookie));
    }

    #[test]
    fn unix_diag_finds_the_client_of_an_accepted_unix_connection() {
        let dir = std::env::temp_dir().join(format!("tg-udiag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let client = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let (accepted, _) = l.accept().expect("accept");
        let diag = SockDiag::new(0).expect("sock_diag");
        let found = diag.unix_peer_cookie(accepted.as_fd()).expect("lookup");
        assert_eq!(found, Some(so_cookie(&client)));
        // The client's own peer is the accepted socket, not the client.
        assert_ne!(
            diag.unix_peer_cookie(client.as_fd()).expect("lookup"),
            Some(so_cookie(&client))
        );
        // Gone: a closed client has no cookie to find.
        drop(client);
        assert_eq!(
            diag.unix_peer_cookie(accepted.as_fd()).expect("lookup"),
            None
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn unix_diag_reply_parsing_checks_the_inode_and_reads_the_peer() {
        // nlmsghdr(16) + unix_diag_msg(16) + one UNIX_DIAG_PEER attribute (8).
        let mut b = vec![0u8; 40];
        b[0..4].copy_from_slice(&40u32.to_ne_bytes());
        b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        b[20..24].copy_from_slice(&77u32.to_ne_bytes());
        b[24..28].copy_from_slice(&5u32.to_ne_bytes());
        b[28..32].copy_from_slice(&1u32.to_ne_bytes());
        b[32..34].copy_from_slice(&8u16.to_ne_bytes());
        b[34..36].copy_from_slice(&UNIX_DIAG_PEER.to_ne_bytes());
        b[36..40].copy_from_slice(&99u32.to_ne_bytes());
        assert_eq!(
            parse_unix_diag_reply(&b, 77).expect("ok"),
            Some(((1u64 << 32) | 5, Some(99)))
        );
        assert_eq!(parse_unix_diag_reply(&b, 78).expect("ok"), None);
        assert!(parse_unix_diag_reply(&b[..20], 77).is_err());
    }

    #[test]
    fn netns_cookie_is_stable_and_non_zero() {
        let a = netns_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0);
        assert_eq!(a, netns_cookie().expect("again"));
    }

    #[test]
    fn interface_addrs_include_loopback() {
        let a = interface_addrs().expect("RTM_GETADDR dump");
        assert!(a.contains_key(&IpAddr::from([127, 0, 0, 1])), "{a:?}");
    }

    #[test]
    fn addr_dump_parser_takes_ifa_local_over_peer() {
        // One RTM_NEWADDR (AF_INET, p2p: IFA_ADDRESS is the peer) and NLMSG_DONE.
        let mut m = Vec::new();
        m.extend_from_slice(&40u32.to_ne_bytes());
        m.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0, 1, 0, 0, 0]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&IFA_ADDRESS.to_ne_bytes());
        m.extend_from_slice(&[192, 0, 2, 9]);
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&IFA_LOCAL.to_ne_bytes());
        m.extend_from_slice(&[192, 0, 2, 1]);
        m.extend_from_slice(&16u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        let mut out = std::collections::BTreeMap::new();
        assert!(parse_addr_dump(&m, &mut out).expect("parse"));
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            [(IpAddr::from([192, 0, 2, 1]), 1)]
        );
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
