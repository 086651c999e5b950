//! Small process and filesystem helpers shared by the tasks.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The release build of the agent: under `$CARGO_TARGET_DIR` when it is set (cargo builds
/// there), else under the workspace's `target/`.
pub fn release_agent() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root().join(d) })
        .unwrap_or_else(|| root().join("target"))
        .join("release/tollgate")
}

/// The agent a bench measures: `$TOLLGATE_BENCH_BIN` (another build, e.g. an older commit's,
/// measured with the same method), else [`release_agent`]. Printed.
pub fn bench_agent() -> PathBuf {
    let bin = std::env::var_os("TOLLGATE_BENCH_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(release_agent);
    println!("agent binary: {}", bin.display());
    bin
}

/// Where `setup` puts bpf-linker: `$TOLLGATE_TOOLS` or `~/.cache/tollgate/tools`.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("TOLLGATE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tollgate/tools")
        })
}

/// PATH with the tools dir in front, for cargo builds that need bpf-linker.
pub fn path_with_tools() -> std::ffi::OsString {
    let mut paths = vec![tools_dir().join("bin")];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap_or_default()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root()).env("PATH", path_with_tools());
    c
}

/// Run a command, inheriting stdio; fail with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !st.success() {
        bail!("{} failed: {st}", show(cmd));
    }
    Ok(())
}

/// Run a command and capture stdout (stderr inherited).
pub fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !o.status.success() {
        bail!("{} failed: {}", show(cmd), o.status);
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/mounts")
}

/// Send a signal to a pid we started.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this process spawned.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The median of `v` (the upper middle for an even count); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// User + system CPU time of process `pid` so far (all its threads), in milliseconds (0 if
/// unreadable).
pub fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the ")" that closes comm: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) * 1000.0 / hz
}

/// A bench's rounds: `default`, or `TOLLGATE_BENCH_ROUNDS` (1 to 9: a quick look while
/// profiling, or more rounds for a before/after of two builds).
pub fn rounds(default: usize) -> usize {
    std::env::var("TOLLGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=9).contains(n))
        .unwrap_or(default)
}

/// `pid` and its child processes (nginx's master and its workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let children =
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// [`cpu_ms`] of `pid` and its child processes.
pub fn tree_cpu_ms(pid: u32) -> f64 {
    with_children(pid).into_iter().map(cpu_ms).sum()
}

/// `perf record -g` on the agent while it lives (`TOLLGATE_BENCH_PERF=DIR`: a profile of the
/// agent during a bench's steady phase; that phase's figures then include perf's cost).
pub struct PerfRecord(std::process::Child);

impl PerfRecord {
    pub fn start(pid: u32, out: &Path) -> Result<PerfRecord> {
        let child = Command::new("perf")
            .args(["record", "-q", "-p", &pid.to_string()])
            // TOLLGATE_BENCH_PERF_ARGS: other sampling options (`--call-graph dwarf`).
            .args(
                std::env::var("TOLLGATE_BENCH_PERF_ARGS")
                    .unwrap_or_else(|_| "-g".into())
                    .split_whitespace(),
            )
            .arg("-o")
            .arg(out)
            .stdout(Stdio::null())
            .spawn()
            .context("perf record")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(PerfRecord(child))
    }
}

impl Drop for PerfRecord {
    fn drop(&mut self) {
        // perf writes its file on SIGINT.
        kill(self.0.id(), libc::SIGINT);
        let _ = self.0.wait();
    }
}

/// System calls the processes `pids` make (all threads) while `f` runs, counted by `strace -c -f`.
pub fn syscalls_during(pids: &[u32], f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let out =
        std::env::temp_dir().join(format!("tollgate-bench-strace-{}.txt", std::process::id()));
    let mut strace = Command::new("strace")
        .args(["-c", "-f", "-o"])
        .arg(&out)
        .args(pids.iter().flat_map(|p| ["-p".to_string(), p.to_string()]))
        .stderr(Stdio::piped())
        .spawn()
        .context("strace (cargo xtask setup installs it)")?;
    // strace says "attached" on stderr once it traces every thread.
    let mut err = BufReader::new(strace.stderr.take().context("strace stderr")?);
    let mut line = String::new();
    let mut said = String::new();
    while err.read_line(&mut line)? > 0 && !line.contains("attached") {
        said.push_str(&line);
        line.clear();
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    std::thread::sleep(Duration::from_millis(300));
    let ran = f();
    kill(strace.id(), libc::SIGINT);
    strace.wait()?;
    ran?;
    let text = fs::read_to_string(&out)?;
    let _ = fs::remove_file(&out);
    // TOLLGATE_BENCH_PERF=DIR keeps each count's table (which system calls) there.
    if let Some(dir) = std::env::var_os("TOLLGATE_BENCH_PERF") {
        let n = fs::read_dir(&dir).map_or(0, |d| d.count());
        let _ = fs::write(Path::new(&dir).join(format!("strace-{n}.txt")), &text);
    }
    text.lines()
        .find(|l| l.trim_end().ends_with(" total"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .with_context(|| format!("no total in strace -c output:\n{text}\nstrace said:\n{said}"))
}

/// Send a signal to the process group `pgid` of a child we started in its own group.
pub fn kill_group(pgid: u32, sig: i32) {
    // SAFETY: kill(2) on the negative pgid of a process group this process created.
    unsafe { libc::kill(-(pgid as i32), sig) };
}
