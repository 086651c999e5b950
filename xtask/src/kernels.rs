//! `cargo xtask kernels`: run a chosen set of vm-tests on the kernels SREs run (Debian's 5.10,
//! 6.1 and 6.12), each booted under qemu in software emulation (TCG) through virtme-ng with
//! this host's root filesystem shared read-only.
//!
//! Layout of the cache (`<tools>/kernels/`): `apt/` is a private apt configuration (its own
//! sources, lists and archive cache: the host's sources are never touched), `5.10/`, `6.1/`,
//! `6.12/` hold
//! each unpacked kernel package (`boot/vmlinuz-<release>`, `lib/modules/<release>` after
//! `depmod`). Each run gets a fresh output directory per guest,
//! `<target>/kernel-runs/<kernel>/`, shared with the guest (`--rwdir`): the guest script writes one result line per test, the test's log, and a final
//! `exit` file with its own status. `vng` itself always exits 255 here, so the results come
//! from those files (the console's `script exited with code N` line is a cross-check).

use std::{
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context as _, Result};

use crate::{
    setup,
    util::{self, cargo, output, run, tools_dir},
};

/// A kernel of the matrix: the Debian suite whose `linux-image-amd64` pulls it in.
pub struct Kernel {
    pub name: &'static str,
    suite: &'static str,
    /// Version prefix of the image package the meta package depends on (`linux-image-<prefix>`).
    prefix: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        suite: "bullseye",
        prefix: "5.10.",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        prefix: "6.1.",
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
        prefix: "6.12.",
    },
];

/// One vm-test run in a guest: a label for the table, the test file, and a test-name filter
/// (exact names: each picked for what it shows on an older kernel).
pub struct GuestTest {
    pub label: &'static str,
    file: &'static str,
    filter: &'static str,
}

/// The set run on every kernel (and in CI). Chosen to cover the kernel-facing behaviour within
/// CI's budget under TCG: redirect + attribution, every loopback and IPv4-mapped spelling,
/// fail closed after kill -9, reload, PostgreSQL end to end, getpeername, exec-race
/// protection, and MPTCP refusal (which needs 5.19: it reports a skip on 5.10; on 6.1 the
/// kernel itself refuses MPTCP fast open, which came in 6.2, and the test expects that).
/// The Unix-socket test redirects PostgreSQL's socket on 6.12 (connect_unix, 6.7+) and checks
/// the warning path on 5.10 and 6.1.
pub const TESTS: &[GuestTest] = &[
    GuestTest {
        label: "redirect+attribution",
        file: "redirect",
        filter: "allowed_bot_is_attributed_from_kernel_facts",
    },
    GuestTest {
        label: "getpeername",
        file: "redirect",
        filter: "getpeername_shows_the_original_destination",
    },
    GuestTest {
        label: "aliases+v4-mapped",
        file: "aliases",
        filter: "exact_loopback_target_covers_every_loopback_spelling",
    },
    GuestTest {
        label: "fail-closed-kill9",
        file: "failure_modes",
        filter: "fail_closed_refuses_after_kill9_until_restart_or_uninstall",
    },
    GuestTest {
        label: "reload",
        file: "reload",
        filter: "reload_applies_to_new_connections_and_rejects_broken_policy",
    },
    GuestTest {
        label: "postgres-e2e",
        file: "postgres",
        filter: "psql_select_is_masked_and_ddl_denied_without_ending_the_session",
    },
    GuestTest {
        label: "exec-race",
        file: "attribution",
        filter: "exe_identity_is_not_taken_from_an_exec_after_connect",
    },
    GuestTest {
        label: "unix-socket",
        file: "unix_socket",
        filter: "postgres_unix_socket_is_redirected_to_the_agent",
    },
    GuestTest {
        label: "mptcp",
        file: "mptcp",
        filter: "mptcp_to_a_protected_target_is_refused_and_never_bypasses",
    },
];

/// Process groups of the running guests (vng, virtme-run and qemu share one), for the
/// SIGINT/SIGTERM handler: the guests run in their own groups (so a timeout can kill each one
/// whole), which also means a Ctrl-C at the terminal does not reach them by itself.
static GUEST_GROUPS: [AtomicI32; 4] = [const { AtomicI32::new(0) }; 4];

extern "C" fn kill_guests_and_exit(sig: libc::c_int) {
    for g in &GUEST_GROUPS {
        let pgid = g.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: kill(2) is async-signal-safe; the group is one this process created.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

fn register_guest(pgid: u32, add: bool) {
    for g in &GUEST_GROUPS {
        if add {
            if g.compare_exchange(0, pgid as i32, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return;
            }
        } else if g.load(Ordering::SeqCst) == pgid as i32 {
            g.store(0, Ordering::SeqCst);
        }
    }
}

/// Per-guest wall-clock limit (boot + every test), after which the guest is killed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Per-test limit inside the guest.
const TEST_TIMEOUT_SECS: u32 = 420;

pub struct Options {
    pub kernels: Vec<String>,
    pub only: Vec<String>,
    pub jobs: usize,
    pub memory: String,
    /// Extra kernel command-line words for every guest.
    pub append: Vec<String>,
}

/// Entry point: fetch, build, boot, run, print the table. Fails if any test failed anywhere.
pub fn kernels(opts: &Options) -> Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask kernels` runs vm-tests as root inside the guests (and installs qemu): run it as root");
    }
    let selected: Vec<&Kernel> = if opts.kernels.is_empty() {
        KERNELS.iter().collect()
    } else {
        opts.kernels
            .iter()
            .map(|k| {
                KERNELS
                    .iter()
                    .find(|x| x.name == k)
                    .with_context(|| format!("unknown kernel {k:?}: choose from 5.10, 6.1, 6.12"))
            })
            .collect::<Result<_>>()?
    };
    let tests: Vec<&GuestTest> = TESTS
        .iter()
        .filter(|t| opts.only.is_empty() || opts.only.iter().any(|o| o == t.label))
        .collect();
    if tests.is_empty() {
        bail!("--only matched no test; labels: {:?}", labels());
    }
    let jobs = opts.jobs.clamp(1, GUEST_GROUPS.len());
    // SAFETY: the handler only calls async-signal-safe functions (kill, _exit) on atomics.
    unsafe {
        libc::signal(
            libc::SIGINT,
            kill_guests_and_exit as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            kill_guests_and_exit as *const () as libc::sighandler_t,
        );
    }
    let vng = setup::kernel_tools()?;
    let images = fetch(&selected)?;
    let bins = build_tests()?;

    // Per checkout (its target dir), so two checkouts can run the matrix at once; the guest
    // sees it because it shares the host's root filesystem (virtme-ng puts writable overlays
    // over /etc, /var, /tmp and a few more; the --rwdir writes through to the host).
    let runs_dir = target_dir().join("kernel-runs");
    let _ = fs::remove_dir_all(&runs_dir);
    fs::create_dir_all(&runs_dir)?;

    // Guests run `jobs` at a time, each with one vCPU.
    let mut results: Vec<GuestResult> = Vec::new();
    let started = Instant::now();
    let mut queue: Vec<(&Kernel, &Image)> = selected.iter().copied().zip(images.iter()).collect();
    queue.reverse();
    let mut running: Vec<Guest> = Vec::new();
    loop {
        while running.len() < jobs {
            let Some((k, img)) = queue.pop() else { break };
            running.push(Guest::start(&vng, k, img, &runs_dir, &bins, &tests, opts)?);
        }
        if running.is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(500));
        let mut i = 0;
        while i < running.len() {
            if let Some(r) = running[i].poll()? {
                results.push(r);
                running.remove(i);
            } else {
                i += 1;
            }
        }
    }
    results.sort_by_key(|r| KERNELS.iter().position(|k| k.name == r.kernel));
    let (table, failed) = report(&results, &tests);
    println!("{table}");
    println!(
        "kernels: {} guest(s), {} at a time, {:.0} s wall",
        results.len(),
        jobs,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!(
            "{failed} kernel test(s) failed (logs above; guest output under {})",
            runs_dir.display()
        );
    }
    Ok(())
}

fn labels() -> Vec<&'static str> {
    TESTS.iter().map(|t| t.label).collect()
}

/// An unpacked kernel: its release string and vmlinuz.
pub struct Image {
    release: String,
    vmlinuz: PathBuf,
}

/// The private apt configuration's `-o` options: its own sources, lists and archive cache, and
/// no dpkg status (so the host's installed packages play no part).
fn apt_opts(dir: &Path) -> Vec<String> {
    vec![
        "-o".into(),
        "Dir::Etc::SourceList=/dev/null".into(),
        "-o".into(),
        format!(
            "Dir::Etc::SourceParts={}",
            dir.join("sources.list.d").display()
        ),
        "-o".into(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        "-o".into(),
        format!("Dir::Cache={}", dir.join("cache").display()),
        "-o".into(),
        "Dir::State::status=/dev/null".into(),
        "-o".into(),
        "Debug::NoLocking=1".into(),
        // The cache belongs to root; apt's `_apt` sandbox user could not write it.
        "-o".into(),
        "APT::Sandbox::User=root".into(),
    ]
}

/// The Debian mirror the host uses (first `URIs:`/`deb` entry for `.../debian`), so the
/// kernels come from the same registry as every other package.
fn host_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            texts.push(fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    texts.push(fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for t in &texts {
        for l in t.lines() {
            let words: Vec<&str> = l.split_whitespace().collect();
            let uri = match words.first() {
                Some(&"URIs:") => words.get(1),
                Some(&"deb") => words.iter().find(|w| w.starts_with("http")),
                _ => None,
            };
            if let Some(u) = uri {
                if u.trim_end_matches('/').ends_with("/debian") {
                    return u.trim_end_matches('/').to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// Download (once) and unpack each kernel's image package with the private apt configuration.
fn fetch(kernels: &[&Kernel]) -> Result<Vec<Image>> {
    let base = tools_dir().join("kernels");
    let apt = base.join("apt");
    for d in [
        "sources.list.d",
        "lists/partial",
        "cache/archives/partial",
        "debs",
    ] {
        fs::create_dir_all(apt.join(d))?;
    }
    let mut images = Vec::new();
    let mut updated = false;
    for k in kernels {
        // A kernel already unpacked is reused without asking the mirror.
        if let Some(img) = unpacked(&base, k) {
            images.push(img);
            continue;
        }
        if !updated {
            let suites: Vec<&str> = KERNELS.iter().map(|k| k.suite).collect();
            fs::write(
                apt.join("sources.list.d/tollgate-kernels.sources"),
                format!(
                    "Types: deb\nURIs: {}\nSuites: {}\nComponents: main\nArchitectures: amd64\n\
                     Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                    host_mirror(),
                    suites.join(" ")
                ),
            )?;
            run(Command::new("apt-get")
                .args(apt_opts(&apt))
                .args(["update", "-q"]))?;
            updated = true;
        }
        // The meta package of the suite names the current image package.
        let show = output(
            Command::new("apt-cache")
                .args(apt_opts(&apt))
                .args(["show", "linux-image-amd64"]),
        )?;
        let want = format!("linux-image-{}", k.prefix);
        let pkg = show
            .lines()
            .filter_map(|l| l.strip_prefix("Depends: "))
            .flat_map(|d| d.split(',').map(str::trim))
            .filter_map(|d| d.split_whitespace().next())
            .find(|d| d.starts_with(&want) && d.ends_with("-amd64"))
            .with_context(|| format!("no {want}*-amd64 package in {} on the mirror", k.suite))?
            .to_string();
        let debs = apt.join("debs");
        run(Command::new("apt-get")
            .args(apt_opts(&apt))
            .args(["download", "-q", &pkg])
            .current_dir(&debs))?;
        let deb = fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download {pkg} left no .deb"))?;
        let release = pkg.trim_start_matches("linux-image-").to_string();
        let dir = base.join(k.name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        // Trixie's packages are merged-/usr (usr/lib/modules); depmod -b and virtme-ng look
        // in lib/modules.
        if !dir.join("lib").exists() && dir.join("usr/lib").exists() {
            std::os::unix::fs::symlink("usr/lib", dir.join("lib"))?;
        }
        run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))?;
        fs::write(dir.join("release"), &release)?;
        let _ = fs::remove_file(&deb);
        images.push(unpacked(&base, k).with_context(|| format!("{} did not unpack", pkg))?);
    }
    Ok(images)
}

fn unpacked(base: &Path, k: &Kernel) -> Option<Image> {
    let dir = base.join(k.name);
    let release = fs::read_to_string(dir.join("release"))
        .ok()?
        .trim()
        .to_string();
    let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
    vmlinuz.exists().then_some(Image { release, vmlinuz })
}

/// Test binaries by file name, and the agent, built on the host (the guest shares this
/// filesystem read-only).
struct Bins {
    tollgate: PathBuf,
    tests: Vec<(String, PathBuf)>,
}

fn build_tests() -> Result<Bins> {
    run(cargo().args(["build", "-p", "tollgate"]))?;
    let json = output(cargo().args([
        "test",
        "-p",
        "vm-tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut tests = Vec::new();
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["target"]["kind"][0] != "test" {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            tests.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(Bins {
        tollgate: target_dir().join("debug/tollgate"),
        tests,
    })
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::root().join("target"))
}

/// The script the guest runs: every test with a timeout, one line per test in `results.tsv`
/// (label, status, seconds), its output in `<label>.log`, and the script's own status in
/// `exit` last, so a guest that died half-way is told from one that finished.
fn guest_script(out: &Path, bins: &Bins, tests: &[&GuestTest]) -> Result<String> {
    let mut s = String::new();
    let o = out.display();
    writeln!(s, "#!/bin/bash\nset -u\nOUT={o}")?;
    // bpffs for the pins; virtme-ng mounts cgroup2 and /sys but not always bpffs.
    writeln!(
        s,
        "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
         uname -r > $OUT/uname\n\
         export TOLLGATE_BIN={}\n\
         export TOLLGATE_IN_GUEST=1\n\
         export RUST_BACKTRACE=1\n\
         \"$TOLLGATE_BIN\" doctor > $OUT/doctor.log 2>&1\n\
         status=0",
        bins.tollgate.display()
    )?;
    for t in tests {
        let exe = bins
            .tests
            .iter()
            .find(|(n, _)| n == t.file)
            .map(|(_, p)| p)
            .with_context(|| format!("vm-tests has no test file {}", t.file))?;
        writeln!(
            s,
            "start=$(date +%s.%N)\n\
             timeout -k 10 {TEST_TIMEOUT_SECS} {} --exact {} --test-threads=1 --nocapture > $OUT/{}.log 2>&1\n\
             rc=$?\n\
             end=$(date +%s.%N)\n\
             if [ $rc -eq 0 ] && grep -q 'KERNEL-SKIP:' $OUT/{}.log; then res=skip; elif [ $rc -eq 0 ]; then res=ok; else res=FAIL; status=1; fi\n\
             echo \"{}\t$res\t$(awk \"BEGIN{{print $end - $start}}\")\t$rc\" >> $OUT/results.tsv",
            exe.display(),
            t.filter,
            t.label,
            t.label,
            t.label
        )?;
    }
    writeln!(s, "echo $status > $OUT/exit\nexit $status")?;
    Ok(s)
}

struct Guest {
    kernel: &'static str,
    release: String,
    out: PathBuf,
    child: Child,
    started: Instant,
}

struct GuestResult {
    kernel: &'static str,
    release: String,
    /// (label, result, seconds) as the guest wrote them.
    rows: Vec<(String, String, f64)>,
    /// The script's status from the `exit` file; None if the guest never got there.
    exit: Option<i32>,
    /// `virtme-ng-init: script exited with code N` from the console.
    console_exit: Option<i32>,
    boot_to_end: f64,
    out: PathBuf,
}

impl Guest {
    fn start(
        vng: &Path,
        k: &'static Kernel,
        img: &Image,
        runs: &Path,
        bins: &Bins,
        tests: &[&GuestTest],
        opts: &Options,
    ) -> Result<Guest> {
        let out = runs.join(k.name);
        fs::create_dir_all(&out)?;
        let script = out.join("run.sh");
        fs::write(&script, guest_script(&out, bins, tests)?)?;
        let console = fs::File::create(out.join("console.log"))?;
        eprintln!("booting {} ({}) under qemu TCG", k.name, img.release);
        // vng runs virtme-run and friends from its venv's bin directory.
        let mut path = vec![vng.parent().map(Path::to_path_buf).unwrap_or_default()];
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let child = Command::new(vng)
            .env("PATH", std::env::join_paths(path)?)
            .arg("--verbose")
            .arg("-r")
            .arg(&img.vmlinuz)
            .args([
                "--disable-kvm",
                "--force-9p",
                "--cpus",
                "1",
                "-m",
                &opts.memory,
            ])
            // TCG emulates every instruction of the kernel's software Spectre/Meltdown
            // mitigations (retpolines, buffer clearing on each syscall return): off, a guest
            // ran the fail-closed test in 22 s instead of 36 s. The programs load the same:
            // the verifier skips speculation hardening for a CAP_PERFMON loader (root) either
            // way.
            .args(["--append", "mitigations=off"])
            .args(opts.append.iter().flat_map(|a| ["--append", a.as_str()]))
            .arg("--rwdir")
            .arg(&out)
            .arg("-e")
            .arg(format!(
                "bash {} > {}/guest.log 2>&1",
                script.display(),
                out.display()
            ))
            .current_dir(&out)
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            // Its own process group, so a timeout kills qemu with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", vng.display()))?;
        register_guest(child.id(), true);
        Ok(Guest {
            kernel: k.name,
            release: img.release.clone(),
            out,
            child,
            started: Instant::now(),
        })
    }

    fn poll(&mut self) -> Result<Option<GuestResult>> {
        let done = self.child.try_wait()?.is_some();
        if !done && self.started.elapsed() < GUEST_TIMEOUT {
            return Ok(None);
        }
        if !done {
            eprintln!(
                "{}: guest timed out after {:?}; killing it",
                self.kernel, GUEST_TIMEOUT
            );
            // The guest's process group: vng and the qemu it started.
            util::kill_group(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
        } else {
            // vng has exited; make sure no qemu of its group lingers.
            util::kill_group(self.child.id(), libc::SIGKILL);
        }
        register_guest(self.child.id(), false);
        let rows = fs::read_to_string(self.out.join("results.tsv"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((
                    f.first()?.to_string(),
                    f.get(1)?.to_string(),
                    f.get(2)?.parse().unwrap_or(0.0),
                ))
            })
            .collect();
        let exit = fs::read_to_string(self.out.join("exit"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let console = fs::read_to_string(self.out.join("console.log")).unwrap_or_default();
        let console_exit = console.lines().find_map(|l| {
            l.split("script exited with code ")
                .nth(1)
                .and_then(|r| r.trim().parse().ok())
        });
        Ok(Some(GuestResult {
            kernel: self.kernel,
            release: self.release.clone(),
            rows,
            exit,
            console_exit,
            boot_to_end: self.started.elapsed().as_secs_f64(),
            out: self.out.clone(),
        }))
    }
}

/// The kernel × test table (result and seconds per cell), then each failure's log tail.
/// Returns the text and the number of failures (a test with no result counts as failed).
fn report(results: &[GuestResult], tests: &[&GuestTest]) -> (String, usize) {
    let mut t = String::new();
    let mut failed = 0;
    let mut failures = String::new();
    let _ = write!(t, "\n{:<22}", "test \\ kernel");
    for r in results {
        let _ = write!(
            t,
            " {:<18}",
            format!(
                "{} ({})",
                r.kernel,
                r.release.split('-').next().unwrap_or("")
            )
        );
    }
    t.push('\n');
    for test in tests {
        let _ = write!(t, "{:<22}", test.label);
        for r in results {
            let cell = match r.rows.iter().find(|(l, _, _)| l == test.label) {
                Some((_, res, secs)) => {
                    if res == "FAIL" {
                        failed += 1;
                        let log = fs::read_to_string(r.out.join(format!("{}.log", test.label)))
                            .unwrap_or_default();
                        let _ = writeln!(
                            failures,
                            "\n---- {} on {} ({}): guest log {}/{}.log (last 60 lines)\n{}",
                            test.label,
                            r.kernel,
                            r.release,
                            r.out.display(),
                            test.label,
                            tail(&log, 60)
                        );
                    }
                    format!("{res} {secs:.1}s")
                }
                None => {
                    failed += 1;
                    "no result".to_string()
                }
            };
            let _ = write!(t, " {cell:<18}");
        }
        t.push('\n');
    }
    let _ = write!(t, "{:<22}", "guest total (boot..end)");
    for r in results {
        let _ = write!(t, " {:<18}", format!("{:.0}s", r.boot_to_end));
    }
    t.push('\n');
    for r in results {
        if r.exit.is_none() {
            // Its tests already count as "no result" (or as what they wrote before it died).
            let console = fs::read_to_string(r.out.join("console.log")).unwrap_or_default();
            let guest = fs::read_to_string(r.out.join("guest.log")).unwrap_or_default();
            let _ = writeln!(
                failures,
                "\n---- {}: the guest script never finished (console says exit {:?}); console tail:\n{}\nguest.log tail:\n{}",
                r.kernel,
                r.console_exit,
                tail(&console, 40),
                tail(&guest, 20)
            );
        } else if r.console_exit.is_some() && r.console_exit != r.exit {
            let _ = writeln!(
                failures,
                "\n---- {}: note: console reports exit {:?}, the exit file {:?}",
                r.kernel, r.console_exit, r.exit
            );
        }
    }
    // What each kernel got, in the words of `tollgate doctor` (run first in each guest).
    for r in results {
        let doctor = fs::read_to_string(r.out.join("doctor.log")).unwrap_or_default();
        let line = doctor
            .lines()
            .find(|l| l.contains("kernel features"))
            .unwrap_or("(no doctor output)");
        let _ = writeln!(t, "{}: {}", r.kernel, line.trim());
    }
    t.push_str(&failures);
    (t, failed)
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
