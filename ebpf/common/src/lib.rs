//! `#[repr(C)]` types shared by tollgate's eBPF programs and the agent.
//!
//! Layout: one file. Every type here crosses the user/kernel boundary through a BPF map, so
//! field order, sizes and byte orders are part of an ABI between `ebpf/` and `agent/`; both
//! sides are built from the same commit, and the agent refuses pinned objects it did not load.
#![no_std]

/// LPM-trie key data for IPv4 targets: `[port (network order, 2 bytes), ipv4 (4 bytes)]`.
/// The port comes first so that a prefix length of `16 + cidr_bits` matches the whole port and
/// the CIDR prefix of the address in one lookup.
pub type TargetKey4 = [u8; 6];
/// LPM-trie key data for IPv6 targets: `[port (network order, 2 bytes), ipv6 (16 bytes)]`.
pub type TargetKey6 = [u8; 18];

/// Value stored for a protected destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetValue {
    /// Index of the target in the agent's policy at the time the map was filled (diagnostics).
    pub target_id: u32,
    /// Reserved; always 0.
    pub flags: u32,
}

/// The agent's listeners and exemption, written by the agent into `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// IPv4 listener address as stored in `bpf_sock_addr.user_ip4` (network byte order).
    pub listen4_ip: u32,
    /// IPv4 listener port as stored in `bpf_sock_addr.user_port` (network byte order in the low
    /// 16 bits). 0 means "no IPv4 listener": protected IPv4 connects are refused.
    pub listen4_port: u32,
    /// IPv6 listener address, four network-order words as in `user_ip6`.
    pub listen6_ip: [u32; 4],
    /// IPv6 listener port (network order in the low 16 bits); 0 = no IPv6 listener.
    pub listen6_port: u32,
    /// Sockets carrying this `SO_MARK` belong to the agent and are never redirected. Setting a
    /// mark needs CAP_NET_ADMIN, which bots do not have.
    pub agent_mark: u32,
    /// `[agent] namespace = "own"`: the agent's network namespace cookie
    /// (`SO_NETNS_COOKIE`); the connect hooks leave sockets of any other namespace alone.
    /// 0 (`all`, the default) acts in every namespace.
    pub netns_cookie: u64,
}

/// What the connect hooks recorded about a redirected socket: the original destination and the
/// kernel's facts about the process that called `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnInfo {
    /// Original destination, four network-order words; IPv4 is stored IPv4-mapped
    /// (`::ffff:a.b.c.d`).
    pub orig_ip: [u32; 4],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// Address family of the connecting socket (AF_INET = 2, AF_INET6 = 10).
    pub family: u16,
    /// Thread-group id (the process id as userspace knows it).
    pub pid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// `comm` of the calling task, NUL padded.
    pub comm: [u8; 16],
    /// `EXEC_GEN[tgid]` when the connect happened (0 if the process has not exec'd or exited
    /// since the agent started). The agent re-reads it after reading /proc/<pid>/exe: a
    /// different value means the process exec'd after connecting, so the exe is not trusted.
    pub exec_gen: u64,
}

/// Number of `u64` words in the `PORTS` bitmap (one bit per port).
/// `UNIX_PATH_MAX`: the size of `sockaddr_un.sun_path`.
pub const UNIX_PATH_MAX: usize = 108;

/// `ConnInfo::family` of a record made by `connect_unix` (`AF_UNIX`). Such a record has no
/// address: `orig_ip[0]` carries the `UnixTarget::target_id` of the protected socket path the
/// client dialled, the other words and `orig_port` are 0.
pub const FAMILY_UNIX: u16 = 1;

/// Call numbers the `connect_unix` program uses in place of the kfuncs
/// `bpf_cast_to_kern_ctx` and `bpf_sock_addr_set_sun_path`; the agent's loader patches them
/// into kfunc calls (see `ebpf/src/programs.rs`).
pub const KFUNC_CAST_TO_KERN_CTX: u32 = 0x7ff0_0001;
pub const KFUNC_SET_SUN_PATH: u32 = 0x7ff0_0002;

/// A Unix socket path as `connect_unix` looks it up in `UNIX_TARGETS`: the bytes of
/// `sun_path` up to the first NUL (or the address length), NUL-padded to `UNIX_PATH_MAX`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPath {
    pub bytes: [u8; UNIX_PATH_MAX],
}

/// Value of `UNIX_TARGETS`: which protected socket a path names, and where the agent listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixTarget {
    /// The agent's id for this protected path (stored in the connection record, see
    /// `FAMILY_UNIX`).
    pub target_id: u32,
    /// Reserved; always 0.
    pub flags: u32,
    /// The agent's own listening socket, NUL-padded (at most `UNIX_PATH_MAX - 1` bytes long):
    /// `connect_unix` rewrites the bot's `sun_path` to it.
    pub agent_path: [u8; UNIX_PATH_MAX],
}

pub const PORT_WORDS: u32 = 65536 / 64;

/// Word index and bit mask of `port` (host order) in the `PORTS` bitmap.
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port >> 6) as u32, 1u64 << (port & 63))
}

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    /// A connect to a protected destination was redirected to the agent.
    pub const REDIRECTED: u32 = 0;
    /// A connect was inspected and left alone (destination not protected).
    pub const PASSED: u32 = 1;
    /// Recording the original destination failed (map full): the connect was refused.
    pub const MAP_FULL: u32 = 2;
    /// A connect from the agent itself (marked socket) was left alone.
    pub const EXEMPT: u32 = 3;
    /// A protected connect was refused because no listener of its family is configured, or it
    /// was not TCP.
    pub const REFUSED: u32 = 4;
    /// A protected connect was refused because the listener it would be sent to is not the
    /// agent's (agent down and someone else bound its port).
    pub const NO_AGENT: u32 = 5;
    /// An MPTCP connect to a protected destination was refused (`EPROTONOSUPPORT`).
    pub const MPTCP: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;
}

/// The IPv4-mapped IPv6 prefix word `0000:ffff` in network byte order, as it appears in the
/// third word of an address read from a BPF context on a little- or big-endian host.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Map names, shared so that the agent cannot drift from the object.
pub mod maps {
    pub const TARGETS4: &str = "TARGETS4";
    pub const TARGETS6: &str = "TARGETS6";
    pub const CONFIG: &str = "CONFIG";
    pub const SOCK_ORIG: &str = "SOCK_ORIG";
    pub const PORTS: &str = "PORTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EXEC_GEN: &str = "EXEC_GEN";
    pub const UNIX_TARGETS: &str = "UNIX_TARGETS";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are plain-old-data `#[repr(C)]` structs with no padding-dependent
    // invariants; any bit pattern is a valid value.
    unsafe impl aya::Pod for super::TargetValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::ConnInfo {}
    unsafe impl aya::Pod for super::UnixPath {}
    unsafe impl aya::Pod for super::UnixTarget {}
}
