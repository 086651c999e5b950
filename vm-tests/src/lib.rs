//! End-to-end tests of tollgate on a real kernel, as root.
//!
//! Layout: this file is the harness; `src/bin/tg-probe.rs` is the "bot" (one TCP connection,
//! one JSON line of what it saw); `tests/*.rs` are the tests, one concern per file.
//!
//! Every test builds its own world from RAII guards and tears it down again, so tests are
//! independent and may run two at a time:
//! - [`Cgroup`]: a fresh cgroup v2 directory; bots are spawned into it, unprivileged (uid/gid
//!   65534), by a `pre_exec` that writes their pid into `cgroup.procs` before `exec`.
//! - [`AgentProc`]: a `tollgate run` with its own policy file, data dir, ports and pin path;
//!   dropping it kills the agent and runs `tollgate uninstall`, so no pinned program outlives
//!   the test (a left-over fail-closed pin would refuse connections on the host).
//! - [`EchoServer`]: the protected (or unprotected) service, on 127.0.0.1 and ::1.
//! - [`Prometheus`]: a real Prometheus server scraping the agent.
//!
//! A test that cannot run fails: [`require_root`] panics when not root, and a missing agent
//! binary panics with the command that builds it. Nothing here skips quietly.
//!
//! Running: `cargo xtask test` builds the agent and runs everything; on its own, build the
//! agent (`cargo build -p tollgate` with bpf-linker on PATH), then, as root,
//! `cargo test -p vm-tests -- --test-threads=1` (add `--no-fail-fast` to run every test file
//! even when one fails). `TOLLGATE_BIN` and `PROMETHEUS_BIN` override the binaries used.
//!
//! Ports come from [`free_port`]: a per-process sequence below the ephemeral range, each port
//! checked by binding it on both loopback addresses. Names (cgroups, pins, temp dirs) carry the
//! test's tag, the process id and a sequence number, so parallel tests never share state, and
//! state left by a crashed run (dead pid) is cleaned up on the next run.

pub mod browser;
pub mod http;
pub mod kube;
pub mod netns;
pub mod oidc;
pub mod pg;
pub mod psql;
pub mod ssh;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        mpsc, Arc, Mutex, Once, OnceLock,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The unprivileged uid and gid bots run as (`nobody` / `nogroup`).
pub const BOT_UID: u32 = 65534;

/// Path of the `tg-probe` binary; a macro so that `env!` is expanded in the integration test,
/// where Cargo defines `CARGO_BIN_EXE_tg-probe`.
#[macro_export]
macro_rules! probe_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_tg-probe"))
    };
}

// ---------------------------------------------------------------------------------------------
// Preconditions and names
// ---------------------------------------------------------------------------------------------

/// Panic unless running as root: these tests attach eBPF programs at the cgroup root, create
/// cgroups and pin objects. A privileged test that silently skipped would "pass" while testing
/// nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "vm-tests must run as root (euid is {euid}): they load eBPF programs, create cgroups \
         and pin objects. Run them with `cargo xtask test` or as root; they never skip."
    );
    static CLEAN: Once = Once::new();
    CLEAN.call_once(cleanup_stale);
}

/// The running kernel's (major, minor), from `uname -r`.
pub fn kernel_version() -> (u32, u32) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("read osrelease");
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// The errno a bot sees when it dials a protected destination while no agent listens (fail
/// closed): `ECONNREFUSED`, set by the hook with `bpf_set_retval` (Linux 5.18+); before 5.18
/// the hook can only fail the connect with the verdict's own `EPERM` (README, requirements).
pub fn no_agent_errno() -> i64 {
    if kernel_version() >= (5, 18) {
        libc::ECONNREFUSED as i64
    } else {
        libc::EPERM as i64
    }
}

/// Whether the running kernel can run this test: false (after saying so) when it is older than
/// `min`; the test then returns at once.
///
/// A skip is intentional and visible: it prints `KERNEL-SKIP: <test>: needs Linux X.Y (why),
/// running A.B`, which `cargo xtask kernels` shows as `skip` in its table, and it only happens
/// in a guest of that runner (`TOLLGATE_IN_GUEST=1`). Anywhere else (the host suite of `cargo
/// xtask test`) a kernel too old for a test is a failure: the suite never passes by testing
/// nothing.
pub fn require_kernel(min: (u32, u32), why: &str) -> bool {
    let have = kernel_version();
    if have >= min {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    let msg = format!(
        "KERNEL-SKIP: {test}: needs Linux {}.{} ({why}), running {}.{}",
        min.0, min.1, have.0, have.1
    );
    assert!(
        std::env::var_os("TOLLGATE_IN_GUEST").is_some(),
        "{msg}; only `cargo xtask kernels` guests may skip a test for its kernel"
    );
    println!("{msg}");
    eprintln!("{msg}");
    false
}

/// The cgroup v2 mount point, from /proc/mounts (hybrid hosts: /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let (_dev, mp, ty) = (it.next()?, it.next()?, it.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(mp.replace("\\040", " ")))
        })
        .expect("no cgroup2 filesystem in /proc/mounts: these tests need cgroup v2")
}

/// The agent binary: `$TOLLGATE_BIN`, else `target/debug/tollgate` of this workspace.
pub fn tollgate_bin() -> PathBuf {
    let p = match std::env::var_os("TOLLGATE_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tollgate"),
    };
    assert!(
        p.is_file(),
        "the tollgate agent binary is missing at {}: build it first with `cargo xtask test` \
         (or `cargo build -p tollgate` with bpf-linker on PATH), or point TOLLGATE_BIN at it",
        p.display()
    );
    p.canonicalize().unwrap_or(p)
}

const PIN_PREFIX: &str = "tollgate-vmtest-";
const CGROUP_PREFIX: &str = "tgvm-";

/// `<tag>-<pid>-<seq>` with a fixed-width sequence, so that no name is a prefix of another
/// (identities match cgroups with `"/<name>*"` globs).
pub fn unique(tag: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = sanitize(tag);
    format!("{tag}-{}-{n:04}", std::process::id())
}

/// The glob matching every [`Cgroup`] this process creates with `tag` (`"/tgvm-<tag>-<pid>-*"`).
pub fn cgroup_family_glob(tag: &str) -> String {
    let tag = sanitize(tag);
    format!("/{CGROUP_PREFIX}{tag}-{}-*", std::process::id())
}

fn sanitize(tag: &str) -> String {
    tag.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn pid_of_name(name: &str) -> Option<u32> {
    let mut parts = name.rsplit('-');
    let _seq = parts.next()?;
    parts.next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove pins and empty cgroups that a crashed earlier run left behind (their pid is dead).
/// A stale fail-closed pin would otherwise keep refusing connects to its ports.
fn cleanup_stale() {
    if let Ok(rd) = fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PIN_PREFIX) else {
                continue;
            };
            if pid_of_name(rest).is_some_and(|p| !pid_alive(p)) {
                eprintln!("vm-tests: removing stale pins {}", e.path().display());
                let _ = Command::new(tollgate_bin())
                    .args(["uninstall", "--pin-path"])
                    .arg(e.path())
                    .stdout(Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(rd) = fs::read_dir(cgroup2_root()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(CGROUP_PREFIX) {
                if pid_of_name(rest).is_some_and(|p| !pid_alive(p)) {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// The terminal recording (`.cast`) under `data_dir/sessions`, once written: asciicast v2
/// begun at 80x24, holding `typed` and the resize event `resize` (`"100x30"`), which
/// `asciinema play` plays showing `typed`. Returns its text.
pub fn checked_cast(data_dir: &Path, typed: &str, resize: &str) -> String {
    let sessions = data_dir.join("sessions");
    let cast = wait_for(Duration::from_secs(10), "a .cast file", || {
        fs::read_dir(&sessions)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "cast"))
    });
    let text = fs::read_to_string(&cast).expect("read cast");
    let header: Value =
        serde_json::from_str(text.lines().next().unwrap_or_default()).expect("cast header");
    assert_eq!(header["version"], 2, "{header}");
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24)),
        "{header}"
    );
    assert!(text.contains(typed), "{text}");
    assert!(text.contains(&format!("\"r\",\"{resize}\"")), "{text}");
    let out = Command::new("asciinema")
        .args(["play", "-i", "0.05"])
        .arg(&cast)
        .output()
        .expect("asciinema");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(typed));
    text
}

/// `tollgate replay SESSION --data-dir DATA_DIR`: (stdout, stderr).
pub fn replay(data_dir: &Path, session: &str) -> (String, String) {
    let out = Command::new(tollgate_bin())
        .args(["replay", session, "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("tollgate replay");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Poll `f` every 20 ms until it returns `Some`, or panic after `timeout` naming `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// `f()` until it gives a value, polled every 20 ms; `None` after `timeout`.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// A port that is free on both 127.0.0.1 and ::1 right now. Ports come from a per-process
/// sequence in 20000..32000 (below the ephemeral range, so no outgoing connection takes one in
/// between), starting at an offset derived from the pid; each candidate is checked by binding.
pub fn free_port() -> u16 {
    const LO: u32 = 20000;
    const SPAN: u32 = 12000;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new((std::process::id().wrapping_mul(97)) % SPAN));
    for _ in 0..SPAN {
        let port = (LO + next.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, port));
        if v4.is_ok() && v6.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000");
}

// ---------------------------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------------------------

/// A directory under the system temp dir, removed on drop (kept, and named, if the test failed).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("tg-vm-{}", unique(tag)));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("vm-tests: keeping {} for inspection", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Write `text` to `path` atomically (temp file + rename), so a watcher never reads half.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Cgroups and bots
// ---------------------------------------------------------------------------------------------

/// A cgroup v2 directory of our own. Bots spawned through it start inside it, unprivileged.
/// Drop kills the processes we spawned that are still in it, then removes the directory.
pub struct Cgroup {
    name: String,
    path: PathBuf,
    spawned: Mutex<Vec<u32>>,
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let name = format!("{CGROUP_PREFIX}{}", unique(tag));
        let path = cgroup2_root().join(&name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Cgroup {
            name,
            path,
            spawned: Mutex::new(Vec::new()),
        }
    }

    /// Directory name, e.g. `tgvm-ci-1234-0003`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path relative to the cgroup2 mount, as the agent reports it: `/tgvm-ci-1234-0003`.
    pub fn rel(&self) -> String {
        format!("/{}", self.name)
    }

    /// The policy glob matching this cgroup (and its children).
    pub fn glob(&self) -> String {
        format!("/{}*", self.name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids currently in the cgroup.
    pub fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// A `Command` for `program` that, between fork and exec, joins this cgroup and drops to
    /// uid/gid 65534 with no supplementary groups.
    pub fn command(&self, program: &Path) -> Command {
        self.command_opts(program, None)
    }

    /// Like [`Cgroup::command`], inside the network namespace `netns` (a `/run/netns/NAME`
    /// file): only the network namespace changes (unlike `ip netns exec`, which also remounts
    /// /sys and would hide the cgroup2 and bpffs mounts).
    pub fn command_in_netns(&self, program: &Path, netns: &Path) -> Command {
        let f =
            fs::File::open(netns).unwrap_or_else(|e| panic!("open netns {}: {e}", netns.display()));
        self.command_opts(program, Some(f))
    }

    fn command_opts(&self, program: &Path, netns: Option<fs::File>) -> Command {
        let procs = CString::new(
            self.path
                .join("cgroup.procs")
                .to_string_lossy()
                .into_owned(),
        )
        .expect("cgroup path has no NUL");
        let mut cmd = Command::new(program);
        if let Some(f) = netns {
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) in the forked child (still root), before the cgroup join and
            // the uid drop registered below; the file was opened before the fork and is owned
            // by the closure, so it lives as long as the Command.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe syscalls (open, write, close, setgroups, setgid, setuid) on data
        // prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut buf = [0u8; 16];
                let mut i = buf.len();
                let mut pid = libc::getpid() as u32;
                loop {
                    i -= 1;
                    buf[i] = b'0' + (pid % 10) as u8;
                    pid /= 10;
                    if pid == 0 {
                        break;
                    }
                }
                let n = buf.len() - i;
                let w = libc::write(fd, buf[i..].as_ptr().cast(), n);
                let werr = io::Error::last_os_error();
                libc::close(fd);
                if w != n as isize {
                    return Err(werr);
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(BOT_UID) != 0
                    || libc::setuid(BOT_UID) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Spawn `tg-probe` with `args` in this cgroup, unprivileged.
    pub fn spawn_probe(&self, probe: &Path, args: &[&str], stdin_piped: bool) -> Child {
        let child = self
            .command(probe)
            .args(args)
            .stdin(if stdin_piped {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} in {}: {e}", probe.display(), self.rel()));
        self.spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
        child
    }

    /// Run one probe to completion (bounded to 60 s) and parse its report.
    pub fn probe(&self, probe: &Path, args: &[&str]) -> ProbeResult {
        let child = self.spawn_probe(probe, args, false);
        let pid = child.id();
        let (status, out, err) = wait_child(child, Duration::from_secs(60), "tg-probe");
        ProbeResult::parse(pid, status, &out, &err, args)
    }

    /// Start a probe with `--hold-stdin` (added here); [`RunningProbe::wait_held`] then waits
    /// until it holds its connection open after the first half of the payload.
    pub fn probe_held(&self, probe: &Path, args: &[&str]) -> RunningProbe {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--hold-stdin");
        self.probe_running(probe, &all)
    }

    /// Start a probe and return at once; its stdout lines arrive through
    /// [`RunningProbe::next_json`]. Its stdin is a pipe, closed by [`RunningProbe::finish`].
    pub fn probe_running(&self, probe: &Path, args: &[&str]) -> RunningProbe {
        let mut child = self.spawn_probe(probe, args, true);
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("probe stdout is piped");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        RunningProbe {
            pid: child.id(),
            args: args.iter().map(|s| s.to_string()).collect(),
            child: Some(child),
            stdin,
            lines: rx,
            reader: Some(reader),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let ours = self
            .spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for pid in self.procs() {
            if ours.contains(&pid) {
                // SAFETY: kill(2) on a pid we spawned that is still in our cgroup.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) => {
                    if Instant::now() >= deadline {
                        eprintln!(
                            "vm-tests: cannot remove cgroup {}: {e} (procs: {:?})",
                            self.path.display(),
                            self.procs()
                        );
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// Wait for `child` (bounded), collecting stdout and stderr; kill it and panic on timeout.
pub fn wait_child(mut child: Child, timeout: Duration, what: &str) -> (ExitStatus, String, String) {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} (pid {}) did not finish within {timeout:?}",
                    child.id()
                );
            }
            Err(e) => panic!("wait for {what}: {e}"),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    (status, out, err)
}

/// What a probe reported (its last JSON line), plus its pid.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub pid: u32,
    pub json: Value,
    pub stderr: String,
}

impl ProbeResult {
    fn parse(pid: u32, status: ExitStatus, out: &str, err: &str, args: &[&str]) -> ProbeResult {
        let last = out.lines().rev().find(|l| !l.trim().is_empty());
        let json = last
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or_else(|| {
                panic!(
                    "tg-probe {args:?} (pid {pid}) printed no JSON report; status {status}, \
                     stdout {out:?}, stderr {err:?}"
                )
            });
        assert!(
            status.success(),
            "tg-probe {args:?} exited with {status}: {json} {err}"
        );
        ProbeResult {
            pid,
            json,
            stderr: err.to_string(),
        }
    }
    pub fn connected(&self) -> bool {
        self.json["connected"] == true
    }
    pub fn echo_ok(&self) -> bool {
        self.json["echo_ok"] == true
    }
    /// The connection was reset (ECONNRESET or EPIPE) after it was accepted.
    pub fn reset(&self) -> bool {
        self.json["reset"] == true
    }
    pub fn errno(&self) -> Option<i64> {
        self.json["errno"].as_i64()
    }
    pub fn peer(&self) -> Option<&str> {
        self.json["peer"].as_str()
    }
    pub fn recv_bytes(&self) -> u64 {
        self.json["recv_bytes"].as_u64().unwrap_or(0)
    }
    pub fn sent_sha256(&self) -> &str {
        self.json["sent_sha256"].as_str().unwrap_or("")
    }
    pub fn recv_sha256(&self) -> &str {
        self.json["recv_sha256"].as_str().unwrap_or("")
    }
    /// Denied by the agent: the kernel completed the connect (to the listener), then the agent
    /// reset it before a single byte came back.
    pub fn was_denied(&self) -> bool {
        self.connected() && self.reset() && self.recv_bytes() == 0 && !self.echo_ok()
    }
}

impl std::fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.json)
    }
}

/// A probe still running (e.g. holding its connection open, see `tg-probe --hold-stdin`).
/// Dropping it kills it.
pub struct RunningProbe {
    pub pid: u32,
    args: Vec<String>,
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

impl RunningProbe {
    /// The next JSON line the probe prints (bounded).
    pub fn next_json(&mut self, timeout: Duration) -> Value {
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "probe {:?} (pid {}) printed nothing within {timeout:?}: {e}",
                self.args, self.pid
            )
        });
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("probe printed non-JSON {line:?}: {e}"))
    }

    /// Wait for the `{"held":true}` line; panics if the probe reports a failure instead.
    pub fn wait_held(&mut self, timeout: Duration) -> Value {
        let v = self.next_json(timeout);
        assert!(
            v["held"] == true,
            "probe {:?} failed before holding: {v}",
            self.args
        );
        v
    }

    /// Close its stdin (a held probe then sends the rest) and wait for its final report.
    pub fn finish(mut self, timeout: Duration) -> ProbeResult {
        drop(self.stdin.take());
        let mut child = self.child.take().expect("child present until finished");
        let mut stderr = child.stderr.take();
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("probe {:?} did not finish within {timeout:?}", self.args);
                }
                Err(e) => panic!("wait for probe: {e}"),
            }
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let out: Vec<String> = self.lines.try_iter().collect();
        let mut err = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_string(&mut err);
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        ProbeResult::parse(self.pid, status, &out.join("\n"), &err, &args)
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Echo server
// ---------------------------------------------------------------------------------------------

/// What the service does with the bytes it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoMode {
    /// Send every byte back; close after the client half-closes.
    Echo,
    /// Keep a digest of the bytes, send nothing back; close after the client half-closes.
    Record,
}

/// One connection the server saw, once it has ended.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Default)]
struct EchoState {
    accepted: AtomicUsize,
    done: Mutex<Vec<ConnRecord>>,
}

/// A TCP service on one port of 127.0.0.1 and ::1 (and any extra loopback addresses), run by
/// std threads. It counts accepted connections, which is how tests prove that a denied or
/// refused connection never reached it.
pub struct EchoServer {
    port: u16,
    stop: Arc<AtomicBool>,
    state: Arc<EchoState>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(mode: EchoMode) -> EchoServer {
        EchoServer::start_on(mode, &[])
    }

    /// Also listen on `extra` addresses (e.g. 127.0.0.2) with the same port.
    pub fn start_on(mode: EchoMode, extra: &[IpAddr]) -> EchoServer {
        let mut ips: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
        ips.extend_from_slice(extra);
        EchoServer::start_exactly(mode, &ips)
    }

    /// Listen on `[::]` (dual-stack) only: every address of the host, IPv4 and IPv6, as a
    /// server bound to all interfaces does.
    pub fn start_any(mode: EchoMode) -> EchoServer {
        EchoServer::start_exactly(mode, &[Ipv6Addr::UNSPECIFIED.into()])
    }

    fn start_exactly(mode: EchoMode, ips: &[IpAddr]) -> EchoServer {
        let (port, listeners) = (0..200)
            .find_map(|_| {
                let port = free_port();
                let ls: Result<Vec<TcpListener>, _> = ips
                    .iter()
                    .map(|ip| TcpListener::bind(SocketAddr::new(*ip, port)))
                    .collect();
                ls.ok().map(|ls| (port, ls))
            })
            .expect("cannot bind the echo server on any port");
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(EchoState::default());
        let threads = listeners
            .into_iter()
            .map(|l| {
                let (stop, state) = (stop.clone(), state.clone());
                std::thread::spawn(move || accept_loop(l, mode, &stop, &state))
            })
            .collect();
        EchoServer {
            port,
            stop,
            state,
            threads,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn v4(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.port)
    }

    /// Connections accepted so far (counted at accept time).
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// Connections that have ended.
    pub fn finished(&self) -> Vec<ConnRecord> {
        self.state
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn accept_loop(l: TcpListener, mode: EchoMode, stop: &AtomicBool, state: &Arc<EchoState>) {
    if l.set_nonblocking(true).is_err() {
        return;
    }
    while !stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((s, peer)) => {
                state.accepted.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                std::thread::spawn(move || serve_conn(s, peer, mode, &state));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve_conn(mut s: TcpStream, peer: SocketAddr, mode: EchoMode, state: &EchoState) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
    let local = s
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut h = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                bytes += n as u64;
                if mode == EchoMode::Echo && s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    state
        .done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(ConnRecord {
            peer,
            local,
            bytes,
            sha256: hex(&h.finalize()),
        });
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP and metrics
// ---------------------------------------------------------------------------------------------

/// A minimal HTTP/1.0 GET (no dependencies, no chunked encoding): `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("malformed HTTP response from {addr}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line from {addr}: {head}")))?;
    Ok((status, body.to_string()))
}

/// Percent-encode a query-string value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parse the Prometheus text format (enough of it for the agent's output).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((n, rest)) => (n.to_string(), parse_labels(rest.trim_end_matches('}'))),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .skip_while(|c| *c == ',' || c.is_whitespace())
            .take_while(|c| *c != '=')
            .collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(o) => val.push(o),
                    None => break,
                },
                '"' => break,
                o => val.push(o),
            }
        }
        out.insert(key, val);
    }
    out
}

/// Sum of the samples named `name` whose labels include all of `want` (0 if none).
pub fn metric_sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------------------------

/// `fail_mode` of the agent under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Closed,
    Open,
}

impl FailMode {
    fn as_str(self) -> &'static str {
        match self {
            FailMode::Closed => "closed",
            FailMode::Open => "open",
        }
    }
}

/// A `tollgate run` of our own. Dropping it kills the agent (if it still runs) and runs
/// `tollgate uninstall --pin-path`, so no pinned program outlives the test.
pub struct AgentProc {
    pub listen_port: u16,
    pub metrics: SocketAddr,
    /// The admin API (approvals), when started with [`AgentProc::start_with_admin`].
    pub admin: Option<SocketAddr>,
    pub pin_path: PathBuf,
    pub policy_path: PathBuf,
    pub data_dir: PathBuf,
    pub stderr_path: PathBuf,
    agent_section: String,
    child: Option<Child>,
    dir: TempDir,
}

impl AgentProc {
    /// Write a policy (`[agent]` generated here, then `body`), start the agent and wait until
    /// it is ready (its metrics endpoint answers, which it binds only after the eBPF programs
    /// are attached).
    pub fn start(tag: &str, fail_mode: FailMode, body: &str) -> AgentProc {
        AgentProc::start_opts(tag, fail_mode, body, None, "")
    }

    /// Like [`AgentProc::start`] with `namespace = "own"`: for an agent started from a thread
    /// inside a test's own network namespace ([`netns::ThreadNetns`]), which must leave every
    /// other namespace alone.
    pub fn start_own_netns(tag: &str, fail_mode: FailMode, body: &str) -> AgentProc {
        AgentProc::start_opts(tag, fail_mode, body, None, "namespace = \"own\"\n")
    }

    /// Like [`AgentProc::start`] with more `[agent]` keys (`extra`, TOML lines).
    pub fn start_with_agent_keys(
        tag: &str,
        fail_mode: FailMode,
        body: &str,
        extra: &str,
    ) -> AgentProc {
        AgentProc::start_opts(tag, fail_mode, body, None, extra)
    }

    /// Like [`AgentProc::start`], with the admin API (approvals) on a free loopback port.
    pub fn start_with_admin(tag: &str, fail_mode: FailMode, body: &str) -> AgentProc {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        AgentProc::start_opts(tag, fail_mode, body, Some(admin), "")
    }

    /// `tollgate approvals ARGS` against this agent's admin API with its local admin token;
    /// its stdout (panics when the command fails).
    pub fn approvals(&self, args: &[&str]) -> String {
        let out = Command::new(tollgate_bin())
            .arg("approvals")
            .args(args)
            .arg("--admin")
            .arg(
                self.admin
                    .expect("an agent started with the admin API")
                    .to_string(),
            )
            .arg("--token-file")
            .arg(self.data_dir.join("admin.token"))
            .output()
            .expect("tollgate approvals");
        assert!(
            out.status.success(),
            "approvals {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The first pending approval request (its JSON from `approvals list --json`), once there
    /// is one (within 20 s).
    pub fn pending_approval(&self) -> Value {
        wait_for(
            Duration::from_secs(20),
            "a pending approval request",
            || {
                let v: Value = serde_json::from_str(&self.approvals(&["list", "--json"])).ok()?;
                let list = v.get("pending").unwrap_or(&v);
                list.as_array()?.first().cloned()
            },
        )
    }

    /// Like [`AgentProc::start_with_admin`] on a given admin address: for a caller that must
    /// know it first (an OIDC provider registering `http://<admin>/ui/callback`).
    pub fn start_with_admin_at(
        tag: &str,
        fail_mode: FailMode,
        body: &str,
        admin: SocketAddr,
    ) -> AgentProc {
        AgentProc::start_opts(tag, fail_mode, body, Some(admin), "")
    }

    fn start_opts(
        tag: &str,
        fail_mode: FailMode,
        body: &str,
        admin: Option<SocketAddr>,
        extra_agent_keys: &str,
    ) -> AgentProc {
        let dir = TempDir::new(&format!("agent-{tag}"));
        let listen_port = free_port();
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/{PIN_PREFIX}{}", unique(tag)));
        let data_dir = dir.path().join("data");
        let policy_path = dir.path().join("policy.toml");
        let stderr_path = dir.path().join("agent.stderr");
        let admin_value = admin.map_or("off".to_string(), |a| a.to_string());
        let agent_section = format!(
            "[agent]\nlisten = [\"127.0.0.1:{listen_port}\", \"[::1]:{listen_port}\"]\n\
             metrics = \"{metrics}\"\nadmin = \"{admin_value}\"\ndata_dir = \"{}\"\n\
             fail_mode = \"{}\"\nbpf_pin_path = \"{}\"\ndrain_timeout = \"2s\"\n{extra_agent_keys}\n",
            data_dir.display(),
            fail_mode.as_str(),
            pin_path.display()
        );
        write_atomic(&policy_path, &format!("{agent_section}{body}"));
        let mut a = AgentProc {
            listen_port,
            metrics,
            admin,
            pin_path,
            policy_path,
            data_dir,
            stderr_path,
            agent_section,
            child: None,
            dir,
        };
        a.restart();
        a
    }

    /// Start the agent again with the same policy file, ports and pin path.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open agent stderr file");
        let child = Command::new(tollgate_bin())
            .arg("run")
            .arg("--policy")
            .arg(&self.policy_path)
            .env("NO_COLOR", "1")
            .env("TOLLGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    panic!(
                        "tollgate run exited during startup with {status}:\n{}",
                        self.stderr_text()
                    );
                }
            }
            if matches!(
                http_get(self.metrics, "/metrics", Duration::from_secs(2)),
                Ok((200, _))
            ) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "tollgate did not become ready (metrics at {}) within 30 s:\n{}",
                    self.metrics,
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `kill -9` the agent and reap it (nothing of it runs any more afterwards).
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("agent is running");
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGTERM, then wait (bounded) for the drain to finish.
    pub fn terminate(&mut self) -> ExitStatus {
        let c = self.child.take().expect("agent is running");
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let (status, _, _) = wait_child(c, Duration::from_secs(20), "tollgate after SIGTERM");
        status
    }

    /// `tollgate uninstall --pin-path <ours>`; panics if it fails.
    pub fn uninstall(&self) -> String {
        let out = Command::new(tollgate_bin())
            .args(["uninstall", "--pin-path"])
            .arg(&self.pin_path)
            .output()
            .expect("run tollgate uninstall");
        assert!(
            out.status.success(),
            "tollgate uninstall failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Replace the policy body (the `[agent]` section stays) atomically.
    pub fn write_policy(&self, body: &str) {
        write_atomic(&self.policy_path, &format!("{}{body}", self.agent_section));
    }

    /// Replace the whole policy file with `text` atomically.
    pub fn write_policy_raw(&self, text: &str) {
        write_atomic(&self.policy_path, text);
    }

    /// The `[agent]` section this harness generated.
    pub fn agent_section(&self) -> &str {
        &self.agent_section
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn audit_path(&self) -> PathBuf {
        self.data_dir.join("audit.jsonl")
    }

    /// Every audit event so far, read once the file has stopped growing: the journal writes
    /// lines out a few milliseconds after their events, so a check made just after a client
    /// exits would otherwise miss its last lines. Waits for 50 ms without a new line (at
    /// most 5 s); to wait for a given event, use [`Self::wait_audit`].
    pub fn audit(&self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut text = self.audit_now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let again = self.audit_now();
            if again == text || Instant::now() >= deadline {
                return parse_audit(&again);
            }
            text = again;
        }
    }

    fn audit_now(&self) -> String {
        fs::read_to_string(self.audit_path()).unwrap_or_default()
    }

    /// Wait (bounded) until at least `n` audit events match `pred` (lines reach audit.jsonl
    /// from the journal a few milliseconds after the event); all of them, in order.
    pub fn wait_audit_count(
        &self,
        what: &str,
        n: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got: Vec<Value> = parse_audit(&self.audit_now())
                .into_iter()
                .filter(&pred)
                .collect();
            if got.len() >= n {
                return got;
            }
            if Instant::now() >= deadline {
                // The caller's assertion says what is wrong with what came.
                eprintln!("only {} of {n} audit events {what} within 15 s", got.len());
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) for an audit event matching `pred`.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(v) = parse_audit(&self.audit_now()).into_iter().find(&pred) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no audit event {what} within 15 s; audit log:\n{}\nagent stderr:\n{}",
                    fs::read_to_string(self.audit_path()).unwrap_or_default(),
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `connect` event of the probe with pid `pid` (waits for it).
    pub fn connect_event(&self, pid: u32) -> Value {
        self.wait_audit(&format!("connect of pid {pid}"), |e| {
            e["event"] == "connect" && e["pid"] == pid
        })
    }

    /// The `close` event of the probe with pid `pid` (waits for it).
    pub fn close_event(&self, pid: u32) -> Value {
        self.wait_audit(&format!("close of pid {pid}"), |e| {
            e["event"] == "close" && e["pid"] == pid
        })
    }

    /// Scrape `/metrics` once.
    pub fn scrape(&self) -> Vec<Sample> {
        match http_get(self.metrics, "/metrics", Duration::from_secs(5)) {
            Ok((200, body)) => parse_metrics(&body),
            other => panic!("scrape of {} failed: {other:?}", self.metrics),
        }
    }

    /// The raw `/metrics` text.
    pub fn metrics_text(&self) -> String {
        match http_get(self.metrics, "/metrics", Duration::from_secs(5)) {
            Ok((200, body)) => body,
            other => panic!("scrape of {} failed: {other:?}", self.metrics),
        }
    }

    /// Sum of a metric over the series whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.scrape(), name, labels)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let out = Command::new(tollgate_bin())
            .args(["uninstall", "--pin-path"])
            .arg(&self.pin_path)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => eprintln!(
                "vm-tests: `tollgate uninstall --pin-path {}` failed: {other:?}",
                self.pin_path.display()
            ),
        }
        if self.pin_path.exists() {
            eprintln!(
                "vm-tests: pins left at {} after uninstall",
                self.pin_path.display()
            );
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agent stderr ({}, last 40 lines) ----\n{}\n---- audit ({}, last 20 lines) ----\n{}",
                self.stderr_path.display(),
                tail(&self.stderr_text(), 40),
                self.audit_path().display(),
                tail(&fs::read_to_string(self.audit_path()).unwrap_or_default(), 20)
            );
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run `tollgate <args>` to completion: (exit code, stdout, stderr).
pub fn tollgate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tollgate_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run tollgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Policy snippets
// ---------------------------------------------------------------------------------------------

/// `[[identity]]` selecting the processes of `cg` by cgroup glob.
pub fn identity_for(name: &str, cg: &Cgroup) -> String {
    format!(
        "[[identity]]\nname = \"{name}\"\ncgroup = \"{}\"\n\n",
        cg.glob()
    )
}

/// `[[target]]` with `protocol = "tcp"`.
pub fn tcp_target(name: &str, addresses: &[String]) -> String {
    let a: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[target]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddress = [{}]\n\n",
        a.join(", ")
    )
}

/// A whole-connection `[[rule]]`.
pub fn rule(name: &str, identities: &[&str], targets: &[&str], action: &str) -> String {
    let q = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[rule]]\nname = \"{name}\"\nidentities = [{}]\ntargets = [{}]\naction = \"{action}\"\n\n",
        q(identities),
        q(targets)
    )
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// A real Prometheus server (`/usr/bin/prometheus`, or `$PROMETHEUS_BIN`) scraping `targets`
/// every second. Dropping it kills it by pid.
pub struct Prometheus {
    pub addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Prometheus {
    pub fn start(targets: &[SocketAddr]) -> Prometheus {
        let bin = std::env::var_os("PROMETHEUS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"));
        assert!(
            bin.is_file(),
            "prometheus is missing at {}: `apt-get install --no-install-recommends prometheus` \
             (or set PROMETHEUS_BIN)",
            bin.display()
        );
        let dir = TempDir::new("prometheus");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let t: Vec<String> = targets.iter().map(|a| format!("'{a}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tollgate\n    scrape_interval: 1s\n    \
             scrape_timeout: 1s\n    static_configs:\n      - targets: [{}]\n",
            t.join(", ")
        );
        let cfg = dir.path().join("prometheus.yml");
        fs::write(&cfg, config).expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let logf = fs::File::create(&log).expect("create prometheus log");
        let errf = logf.try_clone().expect("dup prometheus log");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut p = Prometheus {
            addr,
            child: Some(child),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = p.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    p.child = None;
                    panic!("prometheus exited with {s}:\n{}", p.log_text());
                }
            }
            if matches!(
                http_get(addr, "/-/ready", Duration::from_secs(2)),
                Ok((200, _))
            ) {
                return p;
            }
            if Instant::now() >= deadline {
                panic!("prometheus not ready within 30 s:\n{}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run an instant query; returns `data.result`.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        match http_get(self.addr, &path, Duration::from_secs(5)) {
            Ok((200, body)) => {
                let v: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("prometheus answered non-JSON ({e}): {body}"));
                assert_eq!(v["status"], "success", "query {promql}: {v}");
                v["data"]["result"].as_array().cloned().unwrap_or_default()
            }
            other => panic!("prometheus query {promql} failed: {other:?}"),
        }
    }

    /// Scrape targets as Prometheus sees them (`/api/v1/targets`).
    pub fn targets(&self) -> Value {
        match http_get(self.addr, "/api/v1/targets", Duration::from_secs(5)) {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", self.log_text());
        }
    }
}

/// A tmux server run by the bot (`tmux -S SOCKET`), for terminal programs under test; ended
/// (with what runs in it) on drop, pass or fail.
pub struct BotTmux<'a> {
    bot: &'a Cgroup,
    socket: PathBuf,
    env: Vec<(String, String)>,
}

impl<'a> BotTmux<'a> {
    /// Start a detached `cols`x`rows` session running `shell_command` (by `sh -c`), with only
    /// `env` in its environment (plus `PATH`). `socket` must be in a directory the bot can write.
    pub fn start(
        bot: &'a Cgroup,
        socket: &Path,
        env: &[(&str, &str)],
        cols: u16,
        rows: u16,
        shell_command: &str,
    ) -> BotTmux<'a> {
        let t = BotTmux {
            bot,
            socket: socket.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        t.run(&[
            "new-session",
            "-d",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
            shell_command,
        ]);
        t
    }

    /// `tmux -S SOCKET ARGS...` as the bot; its stdout (panics when it fails).
    pub fn run(&self, args: &[&str]) -> String {
        let out = self
            .bot
            .command(Path::new("/usr/bin/tmux"))
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            // tmux runs commands with $SHELL, else the user's login shell (nologin for the bot).
            .env("SHELL", "/bin/sh")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the pane shows now.
    pub fn pane(&self) -> String {
        self.run(&["capture-pane", "-p"])
    }

    /// Type `keys` (tmux key names, e.g. `"Enter"`, `"C-c"`, or text).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        self.run(&args);
    }
}

impl Drop for BotTmux<'_> {
    fn drop(&mut self) {
        let _ = self
            .bot
            .command(Path::new("/usr/bin/tmux"))
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .env_clear()
            .output();
    }
}

/// The events of an audit file's text (a line still being written is skipped).
fn parse_audit(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
