//! The programs. Every context field is read and written with a separate volatile 32-bit
//! access: LLVM otherwise merges adjacent 32-bit context accesses into one 64-bit access, which
//! the verifier rejects as `invalid bpf_context access` (see shared/TOOLCHAIN.md).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_addr, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
        BPF_F_CURRENT_NETNS,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_set_retval, bpf_sk_lookup_tcp,
            bpf_sk_release, bpf_skc_to_mptcp_sock,
        },
    },
    macros::{cgroup_sock_addr, lsm, map, raw_tracepoint},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::{LsmContext, RawTracePointContext, SockAddrContext},
    EbpfContext,
};
use tollgate_common::{
    counter, Config, ConnInfo, TargetKey4, TargetKey6, TargetValue, UnixPath, UnixTarget,
    FAMILY_UNIX, KFUNC_CAST_TO_KERN_CTX, KFUNC_SET_SUN_PATH, PORT_WORDS, UNIX_PATH_MAX,
    V4_MAPPED_WORD,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_MPTCP: u32 = 262;
/// cgroup/connect*: 1 lets the (possibly rewritten) connect proceed, 0 fails it with EPERM.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

#[map]
static TARGETS4: LpmTrie<TargetKey4, TargetValue> = LpmTrie::with_max_entries(16384, 0);
#[map]
static TARGETS6: LpmTrie<TargetKey6, TargetValue> = LpmTrie::with_max_entries(16384, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static SOCK_ORIG: LruHashMap<u64, ConnInfo> = LruHashMap::with_max_entries(65536, 0);
/// Bitmap of the ports that appear in any target (bit `port % 64` of word `port / 64`, host
/// order): a connect to any other port is decided by one inlined array load, without walking
/// the LPM trie. Every connect on the host pays for this path.
#[map]
static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
/// Per-process generation, bumped on every exec and every process exit (see `ConnInfo::exec_gen`).
#[map]
static EXEC_GEN: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65536, 0);
/// Protected Unix socket paths (as the bot spells them) and the agent's socket to send them to.
#[map]
static UNIX_TARGETS: HashMap<UnixPath, UnixTarget> = HashMap::with_max_entries(1024, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// What the kernel offers a connect hook beyond Linux 5.10's set; the agent probes for both
/// and loads the matching program (`connect4`, `connect4_plain`, `connect4_legacy`).
#[derive(Clone, Copy)]
struct Has {
    /// `bpf_set_retval` (helper 187, Linux 5.18+): refuse with an errno of our choice.
    set_retval: bool,
    /// `bpf_skc_to_mptcp_sock` (helper 196, Linux 5.19+, kernels built with MPTCP).
    mptcp_helper: bool,
}

/// Both helpers: Linux 5.19+ with MPTCP.
const HAS_ALL: Has = Has {
    set_retval: true,
    mptcp_helper: true,
};
/// `bpf_set_retval` only: 5.18, or a kernel built without MPTCP.
const HAS_RETVAL: Has = Has {
    set_retval: true,
    mptcp_helper: false,
};
/// Neither: Linux 5.10 to 5.17.
const HAS_NONE: Has = Has {
    set_retval: false,
    mptcp_helper: false,
};

/// Refuse a protected connect because the agent is not there: the caller sees
/// `ECONNREFUSED`, as if the service itself were down (not `EPERM`, which would suggest a
/// permission problem on the bot's side). Without `bpf_set_retval` (before 5.18) the verdict's
/// own error is all a connect hook can give: `EPERM`.
#[inline(always)]
fn refuse_no_agent(has: Has) -> i32 {
    count(counter::NO_AGENT);
    const ECONNREFUSED: i32 = 111;
    if has.set_retval {
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REFUSE
}

/// Refuse an MPTCP connect to a protected destination with `EPROTONOSUPPORT`. Redirecting it
/// would work (the agent accepts the first subflow as TCP), but `getpeername` runs on the
/// MPTCP socket while this hook ran on its subflow, under another socket cookie, so the bot
/// would see the agent's listener as its peer. Refused, the bot learns nothing and reaches
/// nothing; a client that wants the target speaks plain TCP. (`EPERM` without
/// `bpf_set_retval`.)
#[inline(always)]
fn refuse_mptcp(has: Has) -> i32 {
    count(counter::MPTCP);
    const EPROTONOSUPPORT: i32 = 93;
    if has.set_retval {
        unsafe { bpf_set_retval(-EPROTONOSUPPORT) };
    }
    REFUSE
}

/// Whether the connecting socket is MPTCP. The kernel runs the connect hooks of an MPTCP
/// socket on its first subflow, a TCP socket (`mptcp_connect` calls the subflow's
/// `pre_connect`), so `protocol` reads IPPROTO_TCP there; `bpf_skc_to_mptcp_sock` recognises
/// the subflow. `protocol == IPPROTO_MPTCP` covers a kernel that runs the hook on the MPTCP
/// socket itself.
///
/// `subflow_helper` is false in the `_plain` programs for kernels built without MPTCP, where
/// the helper's return type has no BTF and the verifier rejects any program calling it (and
/// where no MPTCP socket can exist), and in the `_legacy` programs for kernels before 5.19,
/// which do not have the helper: there an MPTCP subflow is redirected like TCP (the agent's
/// listener makes it fall back to TCP; only the bot's getpeername shows the listener).
#[inline(always)]
fn is_mptcp(sa: *mut bpf_sock_addr, subflow_helper: bool) -> bool {
    // Its own volatile 32-bit load: LLVM would merge it with the neighbouring `type` read
    // into one 64-bit context access, which the verifier rejects.
    let protocol = unsafe { read_volatile(addr_of!((*sa).protocol)) };
    if protocol == IPPROTO_MPTCP {
        return true;
    }
    if !subflow_helper {
        return false;
    }
    let sk = unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return false;
    }
    // Non-null for a TCP socket that is an MPTCP subflow (`sk_is_mptcp`), null otherwise.
    // Helper 196 (Linux 5.19+), available to cgroup sock_addr programs of a loader with
    // CAP_PERFMON.
    !unsafe { bpf_skc_to_mptcp_sock(sk.cast()) }.is_null()
}

/// A TCP socket (`SOCK_STREAM` with protocol TCP; protocol 0 was resolved to TCP at
/// `socket()`): the only kind the agent's listener can take. SCTP's `SOCK_STREAM` sockets, for
/// one, are refused here rather than sent to a TCP listener they cannot reach.
#[inline(always)]
fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // Separate volatile 32-bit loads: LLVM would merge these adjacent fields into one 64-bit
    // context access, which the verifier rejects.
    let sock_type = unsafe { read_volatile(addr_of!((*sa).type_)) };
    let protocol = unsafe { read_volatile(addr_of!((*sa).protocol)) };
    sock_type == SOCK_STREAM && protocol == IPPROTO_TCP
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer can race with us.
        unsafe { *p += 1 };
    }
}

/// Whether any target uses this port (`port_be` as in `user_port`). False means "not
/// protected" for certain; true still needs the trie lookup.
#[inline(always)]
fn port_protected(port_be: u16) -> bool {
    let port = u16::from_be(port_be) as u32;
    match PORTS.get(port >> 6) {
        Some(w) => *w & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

#[inline(always)]
fn lookup4(ip_be: u32, port_be: u16) -> bool {
    let mut data: TargetKey4 = [0; 6];
    let p = port_be.to_ne_bytes();
    let a = ip_be.to_ne_bytes();
    data[0] = p[0];
    data[1] = p[1];
    data[2] = a[0];
    data[3] = a[1];
    data[4] = a[2];
    data[5] = a[3];
    TARGETS4.get(Key::new(48, data)).is_some()
}

#[inline(always)]
fn lookup6(ip: &[u32; 4], port_be: u16) -> bool {
    let mut data: TargetKey6 = [0; 18];
    let p = port_be.to_ne_bytes();
    data[0] = p[0];
    data[1] = p[1];
    let mut i = 0;
    while i < 4 {
        let w = ip[i].to_ne_bytes();
        data[2 + i * 4] = w[0];
        data[3 + i * 4] = w[1];
        data[4 + i * 4] = w[2];
        data[5 + i * 4] = w[3];
        i += 1;
    }
    TARGETS6.get(Key::new(144, data)).is_some()
}

/// `[agent] namespace = "own"`: true when the connecting socket lives in another network
/// namespace than the agent's, which another agent (or none, by the operator's choice) serves.
/// Only reached for protected destinations, so the fast path of every other connect is
/// unchanged.
#[inline(always)]
fn other_netns(ctx: &SockAddrContext, cfg: &Config) -> bool {
    if cfg.netns_cookie == 0 {
        return false;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    cookie != cfg.netns_cookie
}

/// True when the socket carries the agent's mark: the agent's own upstream connections.
#[inline(always)]
fn is_agent(sa: *mut bpf_sock_addr, cfg: &Config) -> bool {
    if cfg.agent_mark == 0 {
        return false;
    }
    let sk = unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return false;
    }
    let mark = unsafe { read_volatile(addr_of!((*sk).mark)) };
    mark == cfg.agent_mark
}

/// Whether the socket listening at `ip:port` (network order) carries the agent's mark. After
/// the agent dies its (unprivileged) port could be bound by anyone, and the pinned redirect
/// would hand that process the bot's traffic; only a socket with the agent's mark, which needs
/// CAP_NET_ADMIN, may receive it.
#[inline(always)]
fn agent_listens4(ctx: &SockAddrContext, ip: u32, port: u32, mark: u32) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: 0,
                daddr: ip,
                sport: 0,
                dport: port as u16,
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>();
    listener_has_mark(ctx, &mut tuple, size as u32, mark)
}

#[inline(always)]
fn agent_listens6(ctx: &SockAddrContext, ip: [u32; 4], port: u32, mark: u32) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: [0; 4],
                daddr: ip,
                sport: 0,
                dport: port as u16,
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>();
    listener_has_mark(ctx, &mut tuple, size as u32, mark)
}

/// Look up the TCP socket that would take a connection for `tuple` and compare its mark.
#[inline(always)]
fn listener_has_mark(
    ctx: &SockAddrContext,
    tuple: &mut bpf_sock_tuple,
    size: u32,
    mark: u32,
) -> bool {
    let sk: *mut bpf_sock =
        unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return false;
    }
    let m = unsafe { read_volatile(addr_of!((*sk).mark)) };
    // Every successful lookup must be released, or the verifier rejects the program.
    unsafe { bpf_sk_release(sk.cast()) };
    m == mark
}

/// For a connect to a protected destination: the configuration, or the verdict when the
/// connect is not ours to redirect (no configuration: refuse; another network namespace under
/// `namespace = "own"`, or the agent's own marked socket: proceed), already counted.
#[inline(always)]
fn handled_here(ctx: &SockAddrContext) -> Result<&'static Config, i32> {
    let Some(cfg) = CONFIG.get(0) else {
        count(counter::REFUSED);
        return Err(REFUSE);
    };
    if other_netns(ctx, cfg) {
        count(counter::PASSED);
        return Err(PROCEED);
    }
    if is_agent(ctx.sock_addr, cfg) {
        count(counter::EXEMPT);
        return Err(PROCEED);
    }
    Ok(cfg)
}

/// Store the original destination and the caller's facts under the socket cookie.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig_ip: [u32; 4], port_be: u16, family: u32) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let info = ConnInfo {
        orig_ip,
        orig_port: u16::from_be(port_be),
        family: family as u16,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        exec_gen: unsafe { EXEC_GEN.get(&((pid_tgid >> 32) as u32)) }
            .copied()
            .unwrap_or(0),
    };
    SOCK_ORIG.insert(&cookie, &info, 0).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    connect4_body(ctx, HAS_ALL)
}

/// `connect4` for kernels with `bpf_set_retval` but without the MPTCP helper (see `is_mptcp`);
/// the agent loads it only there.
#[cgroup_sock_addr(connect4)]
pub fn connect4_plain(ctx: SockAddrContext) -> i32 {
    connect4_body(ctx, HAS_RETVAL)
}

/// `connect4` for kernels before 5.18 (no `bpf_set_retval`, no MPTCP helper).
#[cgroup_sock_addr(connect4)]
pub fn connect4_legacy(ctx: SockAddrContext) -> i32 {
    connect4_body(ctx, HAS_NONE)
}

#[inline(always)]
fn connect4_body(ctx: SockAddrContext, has: Has) -> i32 {
    let sa = ctx.sock_addr;
    let port = unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16;
    // The fast path for every unprotected connect on the host: one bitmap load.
    if !port_protected(port) {
        count(counter::PASSED);
        return PROCEED;
    }
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    if !lookup4(ip, port) {
        count(counter::PASSED);
        return PROCEED;
    }
    let cfg = match handled_here(&ctx) {
        Ok(cfg) => cfg,
        Err(verdict) => return verdict,
    };
    if is_mptcp(sa, has.mptcp_helper) {
        return refuse_mptcp(has);
    }
    if !is_tcp(sa) || cfg.listen4_port == 0 {
        // A protected destination is reachable only through the agent, which speaks TCP.
        count(counter::REFUSED);
        return REFUSE;
    }
    if !agent_listens4(&ctx, cfg.listen4_ip, cfg.listen4_port, cfg.agent_mark) {
        return refuse_no_agent(has);
    }
    if !remember(&ctx, [0, 0, V4_MAPPED_WORD, ip], port, AF_INET) {
        count(counter::MAP_FULL);
        return REFUSE;
    }
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), cfg.listen4_ip);
        write_volatile(addr_of_mut!((*sa).user_port), cfg.listen4_port);
    }
    count(counter::REDIRECTED);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    connect6_body(ctx, HAS_ALL)
}

/// `connect6` with `bpf_set_retval` but without the MPTCP helper (see `connect4_plain`).
#[cgroup_sock_addr(connect6)]
pub fn connect6_plain(ctx: SockAddrContext) -> i32 {
    connect6_body(ctx, HAS_RETVAL)
}

/// `connect6` for kernels before 5.18 (see `connect4_legacy`).
#[cgroup_sock_addr(connect6)]
pub fn connect6_legacy(ctx: SockAddrContext) -> i32 {
    connect6_body(ctx, HAS_NONE)
}

#[inline(always)]
fn connect6_body(ctx: SockAddrContext, has: Has) -> i32 {
    let sa = ctx.sock_addr;
    let port = unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16;
    if !port_protected(port) {
        count(counter::PASSED);
        return PROCEED;
    }
    let ip = unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    };
    // An AF_INET6 socket connecting to ::ffff:a.b.c.d never reaches connect4: treat it as the
    // IPv4 destination it is, or it would be a bypass.
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD;
    let hit = if mapped {
        lookup4(ip[3], port)
    } else {
        lookup6(&ip, port)
    };
    if !hit {
        count(counter::PASSED);
        return PROCEED;
    }
    let cfg = match handled_here(&ctx) {
        Ok(cfg) => cfg,
        Err(verdict) => return verdict,
    };
    if is_mptcp(sa, has.mptcp_helper) {
        return refuse_mptcp(has);
    }
    let (new_ip, new_port) = if mapped {
        ([0, 0, V4_MAPPED_WORD, cfg.listen4_ip], cfg.listen4_port)
    } else {
        (cfg.listen6_ip, cfg.listen6_port)
    };
    if !is_tcp(sa) || new_port == 0 {
        count(counter::REFUSED);
        return REFUSE;
    }
    let listening = if mapped {
        agent_listens4(&ctx, cfg.listen4_ip, cfg.listen4_port, cfg.agent_mark)
    } else {
        agent_listens6(&ctx, cfg.listen6_ip, cfg.listen6_port, cfg.agent_mark)
    };
    if !listening {
        return refuse_no_agent(has);
    }
    if !remember(&ctx, ip, port, AF_INET6) {
        count(counter::MAP_FULL);
        return REFUSE;
    }
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), new_ip[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), new_ip[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), new_ip[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), new_ip[3]);
        write_volatile(addr_of_mut!((*sa).user_port), new_port);
    }
    count(counter::REDIRECTED);
    PROCEED
}

// ---------------------------------------------------------------------------------------------
// cgroup/connect_unix (Linux 6.7+)
// ---------------------------------------------------------------------------------------------

// The two kfuncs `connect_unix` needs are called through placeholder call numbers
// (`KFUNC_*`). aya 0.14 resolves no kfuncs (an extern lands in a `.ksyms` section it cannot
// load), so the program calls these numbers as if they were helpers, and the agent's own
// loader (`agent/src/unix_redirect.rs`) rewrites each such `call` into a kfunc call
// (`src_reg = BPF_PSEUDO_KFUNC_CALL`, `imm` = the function's BTF id in
// `/sys/kernel/btf/vmlinux`) before `BPF_PROG_LOAD`. No kernel has helpers with numbers this
// high, so an unpatched program is rejected, never misread.

/// The kernel's `struct bpf_sock_addr_kern` (include/linux/filter.h, Linux 6.7+, where
/// `uaddrlen` was added). Reads of it are checked by the verifier against the kernel's BTF.
#[repr(C)]
struct SockAddrKern {
    sk: *mut core::ffi::c_void,
    uaddr: *mut u8,
    tmp_reg: u64,
    t_ctx: *mut core::ffi::c_void,
    uaddrlen: u32,
}

/// `struct sockaddr_un`: 2 bytes of family, then `sun_path`.
const SOCKADDR_UN_LEN: usize = 2 + UNIX_PATH_MAX;

/// `bpf_cast_to_kern_ctx(ctx)` (kfunc, Linux 6.3+): the kernel's view of the context, the
/// only way to reach `sun_path`.
#[inline(always)]
fn cast_to_kern_ctx(sa: *mut bpf_sock_addr) -> *mut SockAddrKern {
    let f: unsafe extern "C" fn(*mut bpf_sock_addr) -> *mut SockAddrKern =
        unsafe { core::mem::transmute(KFUNC_CAST_TO_KERN_CTX as usize) };
    unsafe { f(sa) }
}

/// `bpf_sock_addr_set_sun_path(sa_kern, path, len)` (kfunc, Linux 6.7+): 0 on success.
#[inline(always)]
fn set_sun_path(kern: *mut SockAddrKern, path: *const u8, len: u32) -> i32 {
    let f: unsafe extern "C" fn(*mut SockAddrKern, *const u8, u32) -> i32 =
        unsafe { core::mem::transmute(KFUNC_SET_SUN_PATH as usize) };
    unsafe { f(kern, path, len) }
}

/// A connect to a protected Unix socket path is rewritten to the agent's own socket, with the
/// caller's kernel facts stored under the socket cookie exactly as connect4/6 store them.
///
/// Compiled under the `cgroup/connect4` section only because aya-ebpf-macros 0.2 knows no
/// `connect_unix`; the agent never lets aya load it and loads it itself with
/// `expected_attach_type = BPF_CGROUP_UNIX_CONNECT`.
///
/// Paths are matched as the bot spells them: another spelling of the same socket (a symlink,
/// a relative path, a bind mount) is not seen here; see the README's note on Unix sockets.
#[cgroup_sock_addr(connect4)]
pub fn connect_unix(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let kern = cast_to_kern_ctx(sa);
    if kern.is_null() {
        return PROCEED;
    }
    let uaddr = unsafe { read_volatile(addr_of!((*kern).uaddr)) };
    let len = unsafe { read_volatile(addr_of!((*kern).uaddrlen)) };
    // The kernel copied the caller's address into a sockaddr_storage (128 bytes), so the whole
    // sockaddr_un is always readable; what lies past `len` is masked below.
    let mut raw = [0u8; SOCKADDR_UN_LEN];
    if unsafe {
        bpf_probe_read_kernel(
            raw.as_mut_ptr().cast(),
            SOCKADDR_UN_LEN as u32,
            uaddr as *const core::ffi::c_void,
        )
    } != 0
    {
        return PROCEED;
    }
    let mut key = UnixPath {
        bytes: [0; UNIX_PATH_MAX],
    };
    // The kernel reads sun_path up to the first NUL or the address length (unix_mkname_bsd);
    // the key is those bytes, NUL-padded. An abstract name (leading NUL) gives the empty key.
    let n = (len as usize).saturating_sub(2);
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        let b = raw[2 + i];
        if i >= n || b == 0 {
            break;
        }
        key.bytes[i] = b;
        i += 1;
    }
    let Some(t) = (unsafe { UNIX_TARGETS.get(&key) }) else {
        count(counter::PASSED);
        return PROCEED;
    };
    if let Err(verdict) = handled_here(&ctx) {
        return verdict;
    }
    // PostgreSQL's socket is a stream socket, and so is the agent's: any other kind could
    // not talk to either, and is refused here so that it never reaches the server.
    let sock_type = unsafe { read_volatile(addr_of!((*sa).type_)) };
    if sock_type != SOCK_STREAM {
        count(counter::REFUSED);
        return REFUSE;
    }
    if !remember(&ctx, [t.target_id, 0, 0, 0], 0, FAMILY_UNIX as u32) {
        count(counter::MAP_FULL);
        return REFUSE;
    }
    // Fail closed without a probe of our own: the agent's socket lives in a directory only
    // root can write, so after the agent dies the rewritten path is either gone (ENOENT) or
    // a socket nobody listens on (ECONNREFUSED), and nobody else can bind it.
    if set_sun_path(kern, t.agent_path.as_ptr(), UNIX_PATH_MAX as u32) != 0 {
        count(counter::REFUSED);
        return REFUSE;
    }
    count(counter::REDIRECTED);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    // Only a socket whose real peer is the agent's listener can have been redirected: any
    // other socket returns here, without generating a cookie or touching SOCK_ORIG.
    let peer_port = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) };
    match CONFIG.get(0) {
        Some(cfg) if cfg.listen4_port != 0 && peer_port == cfg.listen4_port => {}
        // getpeername programs must return 1.
        _ => return 1,
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(info) = unsafe { SOCK_ORIG.get(&cookie) } {
        let sa = ctx.sock_addr;
        let ip = info.orig_ip[3];
        let port = info.orig_port.to_be() as u32;
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip4), ip);
            write_volatile(addr_of_mut!((*sa).user_port), port);
        }
    }
    // getpeername programs must return 1.
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    // As in getpeername4; an IPv4-mapped client was sent to the IPv4 listener's port.
    let peer_port = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) };
    match CONFIG.get(0) {
        Some(cfg)
            if peer_port != 0
                && (peer_port == cfg.listen6_port || peer_port == cfg.listen4_port) => {}
        _ => return 1,
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(info) = unsafe { SOCK_ORIG.get(&cookie) } {
        let sa = ctx.sock_addr;
        let ip = info.orig_ip;
        let port = info.orig_port.to_be() as u32;
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), ip[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), ip[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), ip[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), ip[3]);
            write_volatile(addr_of_mut!((*sa).user_port), port);
        }
    }
    1
}

#[inline(always)]
fn bump_exec_gen() {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = EXEC_GEN.insert(&tgid, &now, 0);
}

/// An exec is about to replace the process image. This LSM hook runs *before* the kernel
/// switches `/proc/<pid>/exe`, so an agent that reads the exe and then finds the generation
/// unchanged knows the exe it read is the one that connected. Never denies anything.
#[lsm(hook = "bprm_check_security")]
pub fn tollgate_bprm(_ctx: LsmContext) -> i32 {
    bump_exec_gen();
    0
}

/// The same mark from the `sched_prepare_exec` tracepoint (Linux 6.10+), which fires in
/// begin_new_exec before the exe switches: the fallback where BPF LSM (a trampoline) cannot be
/// loaded, as on kernels in lockdown.
#[raw_tracepoint(tracepoint = "sched_prepare_exec")]
pub fn tollgate_prepare_exec(_ctx: RawTracePointContext) -> i32 {
    bump_exec_gen();
    0
}

/// A process replaced its image: connections it made before no longer describe its exe. This
/// fires after the exe switch; it is the fallback on hosts without BPF LSM (small race window,
/// reported by `tollgate doctor`).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn tollgate_exec(_ctx: RawTracePointContext) -> i32 {
    bump_exec_gen();
    0
}

/// A process ended: its pid may be reused by another executable.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn tollgate_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == pid_tgid as u32 {
        bump_exec_gen();
    }
    0
}
