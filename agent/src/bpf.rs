//! The kernel side, seen from the agent: load the embedded eBPF object, configure it, attach it
//! at the cgroup v2 root, pin it (fail closed) or keep it process-owned (fail open), keep the
//! target tries in step with the policy, and answer "where was this connection going, and who
//! opened it?" (a sock_diag lookup finds the client socket's cookie, `SOCK_ORIG` holds the
//! record connect4/6 stored under it).
//!
//! Layout under `bpf_pin_path`: `links/<program>` (one pinned bpf_link per hook; a pinned link
//! keeps its program and maps alive after the agent dies) and `maps/<MAP>` (for inspection with
//! bpftool). A starting agent attaches its own programs first, then replaces the old pins, so
//! there is no instant at which a protected destination is reachable directly.

use crate::lock;
use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, IterableMap as _, LpmTrie, MapData, PerCpuArray},
    programs::{CgroupSockAddr, Lsm, RawTracePoint},
    Ebpf,
};
use tollgate_common::{
    counter, maps, port_bit, Config, ConnInfo, TargetKey4, TargetKey6, TargetValue, UnixPath,
    UnixTarget, PORT_WORDS, UNIX_PATH_MAX,
};
use tollgate_policy::{FailMode, NetnsScope};

use crate::{
    sys::{self, Hook, SysError},
    targets::Routes,
};

/// `SO_MARK` on the agent's own upstream sockets; the connect hooks let marked sockets through.
/// Setting a mark needs CAP_NET_ADMIN, which a bot does not have.
pub const AGENT_MARK: u32 = 0x7467_0001;

#[cfg(not(tollgate_ebpf_stub))]
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate-ebpf"));
#[cfg(tollgate_ebpf_stub)]
pub(crate) static OBJECT: &[u8] = &[];

/// Errors from the kernel side. Verifier logs are kept inside `Load`.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The binary was built without bpf-linker.
    #[error("this tollgate binary was built without its eBPF object (bpf-linker was missing): run `cargo xtask build`")]
    NoObject,
    /// Loading the object or a program failed; the verifier log is in the source.
    #[error("loading eBPF {what} failed: {source:?}")]
    Load {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    /// A host interface failed.
    #[error(transparent)]
    Sys(#[from] SysError),
}

fn load_err(
    what: impl Into<String>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> BpfError {
    BpfError::Load {
        what: what.into(),
        source: Box::new(e),
    }
}

type Installed = (BTreeSet<(u32, TargetKey4)>, BTreeSet<(u32, TargetKey6)>);

/// The loaded, attached data path.
pub struct Datapath {
    targets4: Mutex<LpmTrie<MapData, TargetKey4, TargetValue>>,
    targets6: Mutex<LpmTrie<MapData, TargetKey6, TargetValue>>,
    /// The `PORTS` bitmap (connect4/6's fast path), kept a superset of the tries' ports.
    ports: Mutex<Array<MapData, u64>>,
    sock_orig: HashMap<MapData, u64, ConnInfo>,
    /// Finds the client socket (and so its cookie) of an accepted connection.
    diag: sys::SockDiag,
    counters: PerCpuArray<MapData, u64>,
    exec_gen: HashMap<MapData, u32, u64>,
    /// Keys currently in the tries, to delete stale ones on reload.
    installed: Mutex<Installed>,
    /// Process-owned links (fail open): dropping them detaches the programs.
    _links: Vec<OwnedFd>,
    /// What the kernel offered at start (probed), for the log and metrics.
    pub features: sys::KernelFeatures,
    /// Which hook marks execs for the exec-race check.
    pub exec_guard: ExecGuard,
    _config: Array<MapData, Config>,
    /// `UNIX_TARGETS`: protected Unix socket paths (see `crate::unix_redirect`).
    unix_targets: Mutex<HashMap<MapData, UnixPath, UnixTarget>>,
    /// Unix-socket redirect state; `agent_path` is None until [`Datapath::enable_unix`]
    /// attached connect_unix.
    unix: Mutex<UnixState>,
    _ebpf: Ebpf,
}

/// Ids of protected Unix socket paths (stable for the agent's life, never reused) and the
/// keys currently in `UNIX_TARGETS`.
#[derive(Default)]
struct UnixState {
    agent_path: Option<[u8; UNIX_PATH_MAX]>,
    ids: std::collections::BTreeMap<PathBuf, u32>,
    installed: BTreeSet<[u8; UNIX_PATH_MAX]>,
    /// connect_unix's link while this process owns it (fail open).
    link: Option<OwnedFd>,
}

/// Whether connects to targets' `unix_socket` paths are redirected, for the start log and
/// `doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixRedirect {
    /// No target names a `unix_socket`.
    NotConfigured,
    /// connect_unix is attached.
    Active,
    /// The kernel cannot (Linux before 6.7, or the load failed): why.
    Unavailable(String),
}

/// Listener addresses as the kernel config wants them.
fn config_for(listen: &[SocketAddr]) -> Config {
    let mut cfg = Config {
        agent_mark: AGENT_MARK,
        ..Config::default()
    };
    for a in listen {
        match a.ip() {
            IpAddr::V4(v4) if cfg.listen4_port == 0 => {
                cfg.listen4_ip = u32::from_ne_bytes(v4.octets());
                cfg.listen4_port = u32::from(u16::from_ne_bytes(a.port().to_be_bytes()));
            }
            IpAddr::V6(v6) if cfg.listen6_port == 0 => {
                let o = v6.octets();
                for (i, w) in cfg.listen6_ip.iter_mut().enumerate() {
                    *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                cfg.listen6_port = u32::from(u16::from_ne_bytes(a.port().to_be_bytes()));
            }
            _ => {}
        }
    }
    cfg
}

/// An address as `ConnInfo::orig_ip` stores it: four network-order words, IPv4 mapped.
pub fn ip_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let mut w = [0u32; 4];
    for (i, w) in w.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
    }
    w
}

/// The original destination recorded in a `ConnInfo`.
pub fn orig_dst(info: &ConnInfo) -> SocketAddr {
    let mut o = [0u8; 16];
    for (i, w) in info.orig_ip.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let ip = std::net::Ipv6Addr::from(o);
    SocketAddr::new(
        tollgate_policy::route::canonical_ip(IpAddr::V6(ip)),
        info.orig_port,
    )
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| {
        load_err(
            format!("map {name}"),
            std::io::Error::other("missing from object"),
        )
    })?;
    T::try_from(map).map_err(|source| BpfError::Map { map: name, source })
}

fn remove_file_if_exists(p: &Path) -> Result<(), SysError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SysError::Io {
            what: format!("remove {}", p.display()),
            source,
        }),
    }
}

fn io_dup(source: std::io::Error) -> BpfError {
    BpfError::Sys(SysError::Io {
        what: "dup map fd".into(),
        source,
    })
}

fn pin_map(dir: &Path, name: &str, map: &MapData) -> Result<(), BpfError> {
    let p = dir.join(name);
    remove_file_if_exists(&p)?;
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(io_dup)?;
    sys::obj_pin(fd.as_fd(), &p)?;
    Ok(())
}

impl Datapath {
    /// Load, configure, attach. With `FailMode::Closed` the links and maps are pinned under
    /// `pin_dir` (replacing an earlier agent's pins); with `Open` they live as long as this
    /// process and stale pins are removed.
    pub fn install(
        listen: &[SocketAddr],
        fail_mode: FailMode,
        pin_dir: &Path,
        routes: &Routes,
        netns: NetnsScope,
    ) -> Result<Datapath, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        let cgroup_root = sys::cgroup2_mount()?;
        let cgroup = fs::File::open(&cgroup_root).map_err(|source| SysError::Io {
            what: format!("open cgroup2 root {}", cgroup_root.display()),
            source,
        })?;
        if fail_mode == FailMode::Closed {
            sys::ensure_bpffs(pin_dir)?;
        }

        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| load_err("object", e))?;
        let mut config: Array<MapData, Config> = take(&mut ebpf, maps::CONFIG)?;
        let mut cfg = config_for(listen);
        if netns == NetnsScope::Own {
            cfg.netns_cookie = sys::netns_cookie()?;
        }
        config.set(0, cfg, 0).map_err(|source| BpfError::Map {
            map: maps::CONFIG,
            source,
        })?;
        let sock_orig: HashMap<MapData, u64, ConnInfo> = take(&mut ebpf, maps::SOCK_ORIG)?;
        let dp_targets4: LpmTrie<MapData, TargetKey4, TargetValue> =
            take(&mut ebpf, maps::TARGETS4)?;
        let dp_targets6: LpmTrie<MapData, TargetKey6, TargetValue> =
            take(&mut ebpf, maps::TARGETS6)?;
        let ports: Array<MapData, u64> = take(&mut ebpf, maps::PORTS)?;
        let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, maps::COUNTERS)?;
        let exec_gen: HashMap<MapData, u32, u64> = take(&mut ebpf, maps::EXEC_GEN)?;
        let unix_targets: HashMap<MapData, UnixPath, UnixTarget> =
            take(&mut ebpf, maps::UNIX_TARGETS)?;

        let mut dp = Datapath {
            targets4: Mutex::new(dp_targets4),
            targets6: Mutex::new(dp_targets6),
            ports: Mutex::new(ports),
            sock_orig,
            diag: sys::SockDiag::new(AGENT_MARK)?,
            counters,
            exec_gen,
            installed: Mutex::new((BTreeSet::new(), BTreeSet::new())),
            _links: Vec::new(),
            features: sys::KernelFeatures {
                set_retval: false,
                mptcp_helper: false,
            },
            exec_guard: ExecGuard::LateTracepoint,
            _config: config,
            unix_targets: Mutex::new(unix_targets),
            unix: Mutex::new(UnixState::default()),
            _ebpf: ebpf,
        };
        // Targets go in before anything is attached.
        dp.set_routes(routes)?;

        // Exec/exit tracking only matters while the agent runs, so these links stay owned by
        // the loaded object (never pinned) and go away with the process.
        for (prog, tp) in [
            ("tollgate_exec", "sched_process_exec"),
            ("tollgate_exit", "sched_process_exit"),
        ] {
            attach_raw_tp(&mut dp._ebpf, prog, tp)?;
        }
        // An exec must be marked before the exe switches: the sched_prepare_exec tracepoint
        // (6.10+), else BPF LSM; with neither, only the late tracepoint remains (a small race
        // window, reported here and by `doctor`).
        let exec_guard =
            match attach_raw_tp(&mut dp._ebpf, "tollgate_prepare_exec", "sched_prepare_exec") {
                Ok(()) => ExecGuard::PrepareExec,
                Err(tp) => match attach_bprm_hook(&mut dp._ebpf) {
                    Ok(()) => {
                        tracing::debug!(%tp, "sched_prepare_exec unavailable");
                        ExecGuard::BpfLsm
                    }
                    Err(lsm) => {
                        tracing::debug!(%tp, %lsm, "sched_prepare_exec and BPF LSM unavailable");
                        ExecGuard::LateTracepoint
                    }
                },
            };
        let features = sys::KernelFeatures::probe();
        dp.exec_guard = exec_guard;
        dp.features = features;
        let (level_warn, text) = kernel_summary(&features, exec_guard);
        if level_warn {
            tracing::warn!(kernel = %sys::kernel_release(), "{text}");
        } else {
            tracing::info!(kernel = %sys::kernel_release(), "{text}");
        }

        let mut links = Vec::new();
        for hook in Hook::ALL {
            let fd = load_sock_addr(&mut dp._ebpf, hook.program_for(&features))?;
            links.push((hook, sys::link_create(fd.as_fd(), cgroup.as_fd(), hook)?));
        }

        match fail_mode {
            FailMode::Closed => {
                let links_dir = pin_dir.join("links");
                let maps_dir = pin_dir.join("maps");
                for d in [&links_dir, &maps_dir] {
                    fs::create_dir_all(d).map_err(|source| SysError::Io {
                        what: format!("create {}", d.display()),
                        source,
                    })?;
                }
                // Our links are attached (we hold their fds), so replacing an old agent's pins
                // now never leaves a protected destination unguarded.
                for (hook, fd) in &links {
                    let p = links_dir.join(hook.program());
                    remove_file_if_exists(&p)?;
                    sys::obj_pin(fd.as_fd(), &p)?;
                }
                pin_map(&maps_dir, maps::CONFIG, dp._config.map())?;
                pin_map(&maps_dir, maps::SOCK_ORIG, dp.sock_orig.map())?;
                pin_map(&maps_dir, maps::PORTS, lock(&dp.ports).map())?;
                pin_map(&maps_dir, maps::TARGETS4, lock(&dp.targets4).map())?;
                pin_map(&maps_dir, maps::TARGETS6, lock(&dp.targets6).map())?;
                pin_map(&maps_dir, maps::COUNTERS, dp.counters.map())?;
                pin_map(&maps_dir, maps::UNIX_TARGETS, lock(&dp.unix_targets).map())?;
                // Pins an older agent left that we do not replace (a hook or map this version
                // no longer has, such as the former sock_ops link) would keep old programs
                // attached: remove them.
                // connect_unix is replaced (or removed) by `enable_unix`, right after.
                let ours_links: Vec<&str> = links
                    .iter()
                    .map(|(h, _)| h.program())
                    .chain([Hook::ConnectUnix.program()])
                    .collect();
                remove_pins_except(&links_dir, &ours_links)?;
                remove_pins_except(
                    &maps_dir,
                    &[
                        maps::CONFIG,
                        maps::SOCK_ORIG,
                        maps::PORTS,
                        maps::TARGETS4,
                        maps::TARGETS6,
                        maps::COUNTERS,
                        maps::UNIX_TARGETS,
                    ],
                )?;
                // The pins hold the links from here on; our fds can close.
            }
            FailMode::Open => {
                // A previous fail-closed agent may have left pins. Ours are attached, so those
                // can go; our own links die with this process, cleanly or not.
                uninstall(pin_dir)?;
                dp._links = links.into_iter().map(|(_, fd)| fd).collect();
            }
        }
        Ok(dp)
    }

    /// Bring the kernel tries in line with `routes`: set the port bits of new ports, insert
    /// new keys, remove stale keys, then clear the bits of ports no longer used. The bitmap is
    /// a superset of the tries' ports at every instant, so no protected connect takes the
    /// fast path.
    pub fn set_routes(&self, routes: &Routes) -> Result<(), BpfError> {
        let (want4, want6) = routes.bpf_keys();
        let mut installed = lock(&self.installed);
        let key_port = |d: &[u8]| u16::from_be_bytes([d[0], d[1]]);
        let old_ports: BTreeSet<u16> = (installed.0.iter().map(|(_, d)| key_port(d)))
            .chain(installed.1.iter().map(|(_, d)| key_port(d)))
            .collect();
        let new_ports: BTreeSet<u16> = (want4.iter().map(|(_, d, _)| key_port(d)))
            .chain(want6.iter().map(|(_, d, _)| key_port(d)))
            .collect();
        self.write_ports(old_ports.union(&new_ports))?;
        {
            let mut t4 = lock(&self.targets4);
            for (plen, data, target) in &want4 {
                t4.insert(
                    &Key::new(*plen, *data),
                    TargetValue {
                        target_id: *target,
                        flags: 0,
                    },
                    0,
                )
                .map_err(|source| BpfError::Map {
                    map: maps::TARGETS4,
                    source,
                })?;
            }
            let keep: BTreeSet<(u32, TargetKey4)> =
                want4.iter().map(|(p, d, _)| (*p, *d)).collect();
            for (plen, data) in installed.0.difference(&keep) {
                let _ = t4.remove(&Key::new(*plen, *data));
            }
            installed.0 = keep;
        }
        {
            let mut t6 = lock(&self.targets6);
            for (plen, data, target) in &want6 {
                t6.insert(
                    &Key::new(*plen, *data),
                    TargetValue {
                        target_id: *target,
                        flags: 0,
                    },
                    0,
                )
                .map_err(|source| BpfError::Map {
                    map: maps::TARGETS6,
                    source,
                })?;
            }
            let keep: BTreeSet<(u32, TargetKey6)> =
                want6.iter().map(|(p, d, _)| (*p, *d)).collect();
            for (plen, data) in installed.1.difference(&keep) {
                let _ = t6.remove(&Key::new(*plen, *data));
            }
            installed.1 = keep;
        }
        if new_ports != old_ports {
            self.write_ports(new_ports.iter())?;
        }
        Ok(())
    }

    /// Write the `PORTS` bitmap so that exactly `ports` are set.
    fn write_ports<'a>(&self, ports: impl Iterator<Item = &'a u16>) -> Result<(), BpfError> {
        let mut words = vec![0u64; PORT_WORDS as usize];
        for p in ports {
            let (i, bit) = port_bit(*p);
            words[i as usize] |= bit;
        }
        let mut map = lock(&self.ports);
        for (i, w) in words.iter().enumerate() {
            // Only words that change: the bitmap is 1024 words, a policy uses a few.
            if map.get(&(i as u32), 0).ok() != Some(*w) {
                map.set(i as u32, *w, 0).map_err(|source| BpfError::Map {
                    map: maps::PORTS,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// What connect4/6 recorded about the client of an accepted connection (`peer` and
    /// `local` as `accept()` and `getsockname()` report them). The client socket is found by
    /// its 4-tuple (sock_diag) and the record by that socket's cookie; the record stays, since
    /// the client's getpeername still needs it.
    pub fn take_conn(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnInfo> {
        let cookie = match self.diag.cookie(peer, local) {
            Ok(c) => c?,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "sock_diag lookup of the client socket failed");
                return None;
            }
        };
        let info = self.sock_orig.get(&cookie, 0).ok()?;
        // Belt and braces: the record names the socket it was stored for.
        (info.cookie == cookie).then_some(info)
    }

    /// Attach connect_unix (Linux 6.7+) when some target names a `unix_socket`, sending those
    /// paths to the agent's socket in `unix_dir`; otherwise remove an earlier agent's
    /// connect_unix pin. An `Unavailable` result leaves the Unix socket as before (warned).
    pub fn enable_unix(
        &self,
        wanted: bool,
        unix_dir: &Path,
        fail_mode: FailMode,
        pin_dir: &Path,
    ) -> UnixRedirect {
        let pin = pin_dir.join("links").join(Hook::ConnectUnix.program());
        if !wanted {
            if fail_mode == FailMode::Closed {
                if let Ok(fd) = sys::obj_get(&pin) {
                    let _ = sys::link_detach(fd.as_fd());
                }
                let _ = remove_file_if_exists(&pin);
            }
            return UnixRedirect::NotConfigured;
        }
        let agent_path = crate::unix_redirect::agent_socket(unix_dir);
        let Some(agent_key) = crate::unix_redirect::key(&agent_path) else {
            return UnixRedirect::Unavailable(format!(
                "{} is too long for a Unix socket address",
                agent_path.display()
            ));
        };
        match self.attach_unix(fail_mode, &pin) {
            Ok(()) => {
                lock(&self.unix).agent_path = Some(agent_key.bytes);
                UnixRedirect::Active
            }
            Err(why) => {
                // An older agent's pin would send bots to a socket nobody serves: remove it.
                if let Ok(fd) = sys::obj_get(&pin) {
                    let _ = sys::link_detach(fd.as_fd());
                }
                let _ = remove_file_if_exists(&pin);
                UnixRedirect::Unavailable(why)
            }
        }
    }

    fn attach_unix(&self, fail_mode: FailMode, pin: &Path) -> Result<(), String> {
        use std::os::fd::AsRawFd as _;
        let prog = {
            let t4 = lock(&self.targets4);
            let t6 = lock(&self.targets6);
            let ports = lock(&self.ports);
            let unix = lock(&self.unix_targets);
            let fds = [
                (maps::CONFIG, self._config.map().fd().as_fd().as_raw_fd()),
                (
                    maps::SOCK_ORIG,
                    self.sock_orig.map().fd().as_fd().as_raw_fd(),
                ),
                (maps::TARGETS4, t4.map().fd().as_fd().as_raw_fd()),
                (maps::TARGETS6, t6.map().fd().as_fd().as_raw_fd()),
                (maps::PORTS, ports.map().fd().as_fd().as_raw_fd()),
                (maps::COUNTERS, self.counters.map().fd().as_fd().as_raw_fd()),
                (maps::EXEC_GEN, self.exec_gen.map().fd().as_fd().as_raw_fd()),
                (maps::UNIX_TARGETS, unix.map().fd().as_fd().as_raw_fd()),
            ];
            crate::unix_redirect::load_program(OBJECT, &fds).map_err(|e| e.to_string())?
        };
        let root = sys::cgroup2_mount().map_err(|e| e.to_string())?;
        let cgroup = fs::File::open(&root).map_err(|e| format!("open {}: {e}", root.display()))?;
        let link = sys::link_create(prog.as_fd(), cgroup.as_fd(), Hook::ConnectUnix)
            .map_err(|e| e.to_string())?;
        match fail_mode {
            FailMode::Closed => {
                // Attached (we hold the link), so replacing an old pin leaves no gap.
                remove_file_if_exists(pin).map_err(|e| e.to_string())?;
                sys::obj_pin(link.as_fd(), pin).map_err(|e| e.to_string())?;
            }
            FailMode::Open => lock(&self.unix).link = Some(link),
        }
        Ok(())
    }

    /// Bring `UNIX_TARGETS` in line with the `unix_socket` paths of `policy` (each under all
    /// its spellings, see `unix_redirect::keys_for`). Nothing while connect_unix is not
    /// attached.
    pub fn set_unix_targets(&self, policy: &tollgate_policy::Policy) -> Result<(), BpfError> {
        let mut st = lock(&self.unix);
        let Some(agent_path) = st.agent_path else {
            return Ok(());
        };
        let mut want = std::collections::BTreeMap::new();
        for t in &policy.targets {
            let Some(sock) = &t.unix_socket else { continue };
            let next = st.ids.len() as u32 + 1;
            let id = *st.ids.entry(sock.clone()).or_insert(next);
            for p in crate::unix_redirect::keys_for(sock) {
                if let Some(k) = crate::unix_redirect::key(&p) {
                    want.insert(k.bytes, id);
                }
            }
        }
        let mut map = lock(&self.unix_targets);
        for (k, id) in &want {
            let v = UnixTarget {
                target_id: *id,
                flags: 0,
                agent_path,
            };
            map.insert(UnixPath { bytes: *k }, v, 0)
                .map_err(|source| BpfError::Map {
                    map: maps::UNIX_TARGETS,
                    source,
                })?;
        }
        let keep: BTreeSet<[u8; UNIX_PATH_MAX]> = want.keys().copied().collect();
        for k in st.installed.difference(&keep) {
            let _ = map.remove(&UnixPath { bytes: *k });
        }
        st.installed = keep;
        Ok(())
    }

    /// Whether connect_unix is attached (a `unix_socket` added by a reload when it is not
    /// takes effect only after a restart).
    pub fn unix_active(&self) -> bool {
        lock(&self.unix).agent_path.is_some()
    }

    /// The configured socket path a connect_unix record's id stands for.
    pub fn unix_path(&self, id: u32) -> Option<PathBuf> {
        lock(&self.unix)
            .ids
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(p, _)| p.clone())
    }

    /// What connect_unix recorded about the client of an accepted Unix connection
    /// (`accepted`: the agent's end), found by the client socket's cookie (unix_diag). The
    /// record stays until LRU eviction, as for TCP.
    pub fn take_unix(&self, accepted: std::os::fd::BorrowedFd<'_>) -> Option<ConnInfo> {
        let cookie = match self.diag.unix_peer_cookie(accepted) {
            Ok(c) => c?,
            Err(e) => {
                tracing::warn!(error = %e, "unix_diag lookup of the client socket failed");
                return None;
            }
        };
        let info = self.sock_orig.get(&cookie, 0).ok()?;
        (info.cookie == cookie).then_some(info)
    }

    /// Current exec generation of process `pid` (0 if it has not exec'd or exited since the
    /// agent started).
    pub fn exec_gen(&self, pid: u32) -> u64 {
        self.exec_gen.get(&pid, 0).unwrap_or(0)
    }

    /// Sum of the per-CPU counters, indexed by `tollgate_common::counter`.
    pub fn counters(&self) -> [u64; counter::COUNT as usize] {
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.counters.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }
}

/// Load the cgroup sock_addr program `name`; returns a descriptor of it to link.
fn load_sock_addr(ebpf: &mut Ebpf, name: &str) -> Result<OwnedFd, BpfError> {
    let prog = ebpf.program_mut(name).ok_or_else(|| {
        load_err(
            format!("program {name}"),
            std::io::Error::other("missing from object"),
        )
    })?;
    let p: &mut CgroupSockAddr = prog.try_into().map_err(|e| load_err(name, e))?;
    p.load().map_err(|e| load_err(name, e))?;
    p.fd()
        .map_err(|e| load_err(name, e))?
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_dup)
}

/// Which hook marks an exec for the exec-race check (`ConnInfo::exec_gen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecGuard {
    /// `raw_tp/sched_prepare_exec` (Linux 6.10+): before the exe switches, no race.
    PrepareExec,
    /// BPF LSM `bprm_check_security` (kernels with `lsm=...,bpf`): before the exe switches.
    BpfLsm,
    /// Only `raw_tp/sched_process_exec`, after the exe switched: a short window in which a
    /// process that execs right after connecting is attributed by its new exe.
    LateTracepoint,
}

impl ExecGuard {
    pub fn describe(self) -> &'static str {
        match self {
            ExecGuard::PrepareExec => "exec-race protection: sched_prepare_exec tracepoint (marks an exec before the exe switches; no race)",
            ExecGuard::BpfLsm => "exec-race protection: BPF LSM bprm_check_security (sched_prepare_exec needs Linux 6.10; marks an exec before the exe switches; no race)",
            ExecGuard::LateTracepoint => "exec-race protection: sched_process_exec tracepoint only (neither sched_prepare_exec, Linux 6.10+, nor BPF LSM, boot parameter lsm=...,bpf, is available): a process that execs right after connecting may be attributed by its new executable for a moment",
        }
    }
}

/// One line for the start log and `doctor`: the connect program chosen, the errno of a refusal
/// while the agent is down, MPTCP handling, and the exec-race protection. The bool says
/// whether anything is weaker than on a current kernel (logged as a warning).
pub fn kernel_summary(f: &sys::KernelFeatures, exec: ExecGuard) -> (bool, String) {
    let connect = match f.connect_variant() {
        sys::ConnectVariant::Full => "connect hooks: full (bpf_set_retval, MPTCP subflows refused with EPROTONOSUPPORT)".to_string(),
        sys::ConnectVariant::Plain => "connect hooks: without the MPTCP subflow helper (bpf_skc_to_mptcp_sock needs Linux 5.19 built with MPTCP); refusals carry ECONNREFUSED".to_string(),
        sys::ConnectVariant::Legacy => "connect hooks: legacy (no bpf_set_retval before Linux 5.18): while the agent is down a protected destination fails with EPERM instead of ECONNREFUSED; an MPTCP connect to a protected target is redirected as TCP (its getpeername shows the agent's listener) instead of refused".to_string(),
    };
    let weaker =
        f.connect_variant() == sys::ConnectVariant::Legacy || exec == ExecGuard::LateTracepoint;
    (weaker, format!("{connect}; {}", exec.describe()))
}

/// What `doctor` reports: probe the helpers, and find the exec hook the agent would use by
/// loading and attaching it briefly (the same attempt `run` makes, in the same order).
pub fn probe_for_doctor() -> Result<(sys::KernelFeatures, ExecGuard), BpfError> {
    if OBJECT.is_empty() {
        return Err(BpfError::NoObject);
    }
    let features = sys::KernelFeatures::probe();
    let mut ebpf = Ebpf::load(OBJECT).map_err(|e| load_err("object", e))?;
    let exec = if attach_raw_tp(&mut ebpf, "tollgate_prepare_exec", "sched_prepare_exec").is_ok() {
        ExecGuard::PrepareExec
    } else if attach_bprm_hook(&mut ebpf).is_ok() {
        ExecGuard::BpfLsm
    } else {
        ExecGuard::LateTracepoint
    };
    Ok((features, exec))
}

/// The BPF LSM hook that marks an exec before the exe switches (see ebpf `tollgate_bprm`).
///
/// Only where the BPF LSM is *active*: a kernel built with `CONFIG_BPF_LSM` but without `bpf`
/// in its LSM list (Debian 11's 5.10 by default) loads and attaches the program without
/// complaint and then never calls it, so a successful attach proves nothing.
fn attach_bprm_hook(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    match sys::bpf_lsm_active() {
        Some(true) => {}
        Some(false) => {
            return Err(load_err(
                "tollgate_bprm",
                std::io::Error::other("the BPF LSM is not in the kernel's active LSM list (boot with lsm=...,bpf)"),
            ))
        }
        None => {
            return Err(load_err(
                "tollgate_bprm",
                std::io::Error::other("cannot tell whether the BPF LSM is active: /sys/kernel/security/lsm is unreadable (securityfs not mounted) and the command line has no lsm="),
            ))
        }
    }
    let btf = aya::Btf::from_sys_fs().map_err(|e| load_err("kernel BTF", e))?;
    let p: &mut Lsm = ebpf
        .program_mut("tollgate_bprm")
        .ok_or_else(|| {
            load_err(
                "program tollgate_bprm",
                std::io::Error::other("missing from object"),
            )
        })?
        .try_into()
        .map_err(|e| load_err("tollgate_bprm", e))?;
    p.load("bprm_check_security", &btf)
        .map_err(|e| load_err("tollgate_bprm", e))?;
    p.attach().map_err(|e| load_err("tollgate_bprm", e))?;
    Ok(())
}

fn attach_raw_tp(ebpf: &mut Ebpf, prog: &str, tp: &str) -> Result<(), BpfError> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| {
            load_err(
                format!("program {prog}"),
                std::io::Error::other("missing from object"),
            )
        })?
        .try_into()
        .map_err(|e| load_err(prog, e))?;
    p.load().map_err(|e| load_err(prog, e))?;
    p.attach(tp).map_err(|e| load_err(prog, e))?;
    Ok(())
}

/// Remove the pins in `dir` whose names are not in `keep`.
fn remove_pins_except(dir: &Path, keep: &[&str]) -> Result<(), SysError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if !keep.iter().any(|k| e.file_name() == **k) {
            remove_file_if_exists(&e.path())?;
        }
    }
    Ok(())
}

/// Remove every pin under `pin_dir` (detaching the programs if no agent holds them) and the
/// directory itself. Missing pins are not an error.
pub fn uninstall(pin_dir: &Path) -> Result<(), SysError> {
    for sub in ["links", "maps"] {
        let d = pin_dir.join(sub);
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if sub == "links" {
                // Detach first, synchronously: when uninstall returns, no hook runs any more.
                match sys::obj_get(&e.path()) {
                    Ok(fd) => {
                        if let Err(err) = sys::link_detach(fd.as_fd()) {
                            tracing::warn!(link = %e.path().display(), error = %err, "detaching a pinned link failed; unpinning it anyway");
                        }
                    }
                    Err(err) => {
                        tracing::warn!(link = %e.path().display(), error = %err, "cannot open a pinned link; unpinning it anyway")
                    }
                }
            }
            remove_file_if_exists(&e.path())?;
        }
        let _ = fs::remove_dir(&d);
    }
    let _ = fs::remove_dir(pin_dir);
    Ok(())
}

/// Whether pinned links exist under `pin_dir` (used by `doctor` and `uninstall`).
pub fn pinned_links(pin_dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(pin_dir.join("links"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_words_are_v4_mapped() {
        let w = ip_words("127.0.0.1".parse().expect("addr"));
        let b: Vec<u8> = w.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
    }

    #[test]
    fn orig_dst_round_trips() {
        let info = ConnInfo {
            orig_ip: ip_words("10.1.2.3".parse().expect("addr")),
            orig_port: 5432,
            ..ConnInfo::default()
        };
        assert_eq!(
            orig_dst(&info),
            "10.1.2.3:5432".parse::<SocketAddr>().expect("addr")
        );
        let info6 = ConnInfo {
            orig_ip: ip_words("fd00::1".parse().expect("addr")),
            orig_port: 443,
            ..ConnInfo::default()
        };
        assert_eq!(
            orig_dst(&info6),
            "[fd00::1]:443".parse::<SocketAddr>().expect("addr")
        );
    }

    #[test]
    fn config_uses_network_order() {
        let c = config_for(&[
            "127.0.0.1:15001".parse().expect("a"),
            "[::1]:15001".parse().expect("a"),
        ]);
        assert_eq!(c.listen4_ip.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(
            (c.listen4_port as u16).to_ne_bytes(),
            15001u16.to_be_bytes()
        );
        assert_eq!(c.listen6_ip[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
