//! `cargo xtask bench pg`: pgbench TPS in one run, one table. Columns: direct; tollgate as a
//! plain `tcp` relay with kernel splicing off (a bare userspace relay); tollgate with the
//! `postgres` handler (classification plus a masking rule); pgbouncer in session mode; each
//! cell the median of interleaved rounds. Rows:
//! `-S`, `-S -M prepared`, TPC-B-like, `-S -C`; the proxies' CPU per transaction; one client's
//! latency per transaction (p50/p99, each column); connect + first byte and the proxies'
//! system calls per transaction and per connection (strace, first round); all of these alone
//! with `--only table`. Then idle session memory (`--only memory`),
//! approvals (`--only approvals`: pgbench -S with and without approvals configured, in ABBA
//! order, and the approval wake-up latency) and masking throughput. Never fails on slow
//! numbers.
//!
//! `TOLLGATE_BENCH_BASELINE=PATH` adds a fifth column, another build of the agent (e.g. an
//! older commit's) run as the same postgres target in the same interleaved rounds: a
//! before/after comparison that the machine's drift cannot tilt.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    demo::{AgentProc, Cgroup, Postgres},
    util::{self, run},
};

const WORK: &str = "/tmp/tollgate-bench-pg";
const PW: &str = "bench-upstream-password";
const SECONDS: &str = "8";

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Run pgbench against 127.0.0.1:`port` and return its TPS.
fn pgbench(port: u16, password: &str, args: &[&str]) -> Result<f64> {
    Ok(pgbench_cpu(port, password, args, None)?.tps)
}

/// One pgbench run: TPS, and the CPU time (user + system, all threads) the proxy process
/// spent per transaction, when there is one.
#[derive(Clone, Copy)]
struct Run {
    tps: f64,
    proxy_us_per_tx: Option<f64>,
}

/// [`pgbench`], also measuring the CPU time `proxy` (a process id) spends per transaction.
fn pgbench_cpu(port: u16, password: &str, args: &[&str], proxy: Option<u32>) -> Result<Run> {
    let before = proxy.map(|pid| (pid, util::cpu_ms(pid)));
    let out = Command::new("pgbench")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app_rw",
            "-n",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            SECONDS,
        ])
        .args(args)
        .arg("bench")
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", "disable")
        .stderr(Stdio::piped())
        .output()
        .context("pgbench")?;
    let spent_us = before.map(|(pid, ms)| (util::cpu_ms(pid) - ms) * 1000.0);
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(prefix)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
    };
    let (tps, txs) = (
        field("tps = "),
        field("number of transactions actually processed: "),
    );
    let (Some(tps), Some(txs)) = (tps, txs) else {
        bail!(
            "pgbench {args:?} printed no tps:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    Ok(Run {
        tps,
        proxy_us_per_tx: spent_us.filter(|_| txs > 0.0).map(|us| us / txs),
    })
}

fn policy(pg_port: u16, listen: u16, metrics: u16, protocol: &str) -> String {
    let extra = if protocol == "postgres" {
        r#"credential = "bench"

[credential.bench]
user = "app_rw"
password_file = "/tmp/tollgate-bench-pg/pw"

[[rule]]
name = "pgbench"
identities = ["bench"]
targets = ["db"]
action = "allow"
sql = { statements = ["select", "update", "insert", "begin", "commit", "end", "set", "show"] }

[[mask]]
targets = ["db"]
detectors = ["email"]
style = "partial"
"#
        .to_string()
    } else {
        "\n[[rule]]\nname = \"pgbench\"\nidentities = [\"bench\"]\ntargets = [\"db\"]\naction = \"allow\"\n".to_string()
    };
    format!(
        r#"[agent]
listen = ["127.0.0.1:{listen}", "[::1]:{listen}"]
metrics = "127.0.0.1:{metrics}"
admin = "off"
data_dir = "{WORK}/data"
bpf_pin_path = "/sys/fs/bpf/tollgate-bench-pg"
fail_mode = "open"

[[identity]]
name = "bench"
cgroup = "/tollgate-bench-pg*"

[[target]]
name = "db"
protocol = "{protocol}"
address = ["127.0.0.1:{pg_port}"]
{extra}"#
    )
}

/// psql as the bench bot to the protected server: through the postgres target its own
/// password does not matter (the agent injects the credential).
fn bot_psql(pg_port: u16) -> Command {
    let mut c = Command::new("psql");
    c.args(["-h", "127.0.0.1", "-p", &pg_port.to_string()])
        .args(["-U", "app_rw", "-d", "bench", "-X"])
        .env("PGPASSWORD", "not-the-password")
        .env("PGSSLMODE", "disable");
    c
}

fn metrics_addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Resident memory of `pid` in bytes.
fn rss(pid: u32) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024.0)
}

/// `tollgate_sessions_active{protocol="PROTOCOL"}` from the agent's metrics.
fn active_sessions(metrics: &str, protocol: &str) -> Result<f64> {
    let text = crate::demo::http_get(metrics, "/metrics")?;
    let prefix = format!("tollgate_sessions_active{{protocol=\"{protocol}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Open N idle psql sessions through the agent (each waits on its stdin) and return N and what
/// each holds ([`Held`]). The sessions are ended (stdin closed) before returning.
fn idle_session_memory(agent_pid: u32, pg_port: u16, metrics: &str) -> Result<(usize, Held)> {
    // Below the server's default max_connections (100, minus reserved slots).
    const N: usize = 80;
    let per = held_session_memory(agent_pid, metrics, "postgres", N, 10, || {
        bot_psql(pg_port)
            .arg("-q")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("psql")
    })?;
    Ok((N, per))
}

/// What an idle session holds, per session: the agent's RSS growth, and its heap growth
/// (bytes allocated and not freed, `tollgate_heap_bytes_in_use`, when the agent was started
/// with `TOLLGATE_HEAP_STATS=1`; [`HEAP_STATS`]). mimalloc keeps freed memory for reuse, so
/// RSS growth stays near 0 while sessions fit in what earlier ones freed; the heap figure is
/// the one that says what a session holds.
#[derive(Clone, Copy)]
pub(crate) struct Held {
    pub rss: f64,
    pub heap: Option<f64>,
}

impl Held {
    /// `label: H KiB per session of heap (RSS growth R KiB)`.
    pub(crate) fn describe(&self, per: &str) -> String {
        match self.heap {
            Some(h) => format!(
                "{:.1} KiB per {per} of heap in use (RSS growth {:.1} KiB)",
                h / 1024.0,
                self.rss / 1024.0
            ),
            None => format!("{:.1} KiB per {per} of RSS growth", self.rss / 1024.0),
        }
    }
}

/// The environment that makes the agent count its heap (see `agent/src/heap.rs`).
pub(crate) const HEAP_STATS: (&str, &str) = ("TOLLGATE_HEAP_STATS", "1");

/// `tollgate_heap_bytes_in_use` from the agent's metrics, when it counts.
fn heap_in_use(metrics: &str) -> Result<Option<f64>> {
    heap_metric(metrics, "tollgate_heap_bytes_in_use")
}

/// One of the agent's heap metrics (`heap.rs`), when it counts.
pub(crate) fn heap_metric(metrics: &str, name: &str) -> Result<Option<f64>> {
    let text = crate::demo::http_get(metrics, "/metrics")?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok()))
}

/// Transactions of each allocation count (one client, after a warm-up run).
const ALLOC_TXNS: usize = 5000;

/// The agent's heap allocations per transaction of pgbench with `args` (one client,
/// [`ALLOC_TXNS`] transactions; its login and Terminate are in the count, spread over them).
fn allocations_per_transaction(pg_port: u16, metrics: &str, args: &[&str]) -> Result<f64> {
    let count = || -> Result<f64> {
        heap_metric(metrics, "tollgate_heap_allocations_total")?
            .context("the agent does not count its allocations (TOLLGATE_HEAP_STATS=1)")
    };
    let run = || -> Result<()> {
        let st = Command::new("pgbench")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg_port.to_string(),
                "-U",
                "app_rw",
            ])
            .args(["-n", "-c", "1", "-t", &ALLOC_TXNS.to_string()])
            .args(args)
            .arg("bench")
            .env("PGPASSWORD", "not-the-password")
            .env("PGSSLMODE", "disable")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("pgbench")?;
        ensure!(st.success(), "pgbench {args:?} through the agent failed");
        Ok(())
    };
    // First-use caches (classification, catalog snapshots) are filled by a first run.
    run()?;
    let before = count()?;
    run()?;
    Ok((count()? - before) / ALLOC_TXNS as f64)
}

/// What the heap-counting agent measured: idle sessions, and allocations per transaction.
#[derive(Clone)]
struct HeapFigures {
    sessions: usize,
    idle: Held,
    /// (row, allocations per transaction).
    allocations: Vec<(&'static str, f64)>,
}

impl HeapFigures {
    fn print(&self) {
        println!(
            "\nidle postgres session memory over {} idle psql sessions: {} (goal <= 16 KiB)",
            self.sessions,
            self.idle.describe("session")
        );
        let per: Vec<String> = self
            .allocations
            .iter()
            .map(|(row, n)| format!("{row} {n:.1}"))
            .collect();
        println!(
            "agent heap allocations per transaction (one client, {ALLOC_TXNS} transactions): {}",
            per.join(", ")
        );
    }
}

/// What each of `n` sessions of `protocol` that `spawn` starts (each a client waiting on its
/// piped stdin) holds while idle, after `warm` sessions opened and ended first (allocator
/// arenas and first-use caches, so the figure is of sessions). The sessions are ended (stdin
/// closed) before returning.
pub(crate) fn held_session_memory(
    agent_pid: u32,
    metrics: &str,
    protocol: &str,
    n: usize,
    warm: usize,
    spawn: impl Fn() -> Result<std::process::Child>,
) -> Result<Held> {
    let spawn_n = |k: usize| (0..k).map(|_| spawn()).collect::<Result<Vec<_>>>();
    let wait_active = |want: usize| -> Result<()> {
        for _ in 0..600 {
            if active_sessions(metrics, protocol)? == want as f64 {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bail!("the agent did not reach {want} active {protocol} sessions")
    };
    let end = |children: Vec<std::process::Child>| {
        for mut c in children {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    };
    let warmed = spawn_n(warm)?;
    wait_active(warm)?;
    end(warmed);
    wait_active(0)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (rss_before, heap_before) = (rss(agent_pid)?, heap_in_use(metrics)?);
    let held = spawn_n(n)?;
    wait_active(n)?;
    // Let every session go idle (past its buffers' idle trim).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (rss_after, heap_after) = (rss(agent_pid)?, heap_in_use(metrics)?);
    end(held);
    wait_active(0)?;
    Ok(Held {
        rss: (rss_after - rss_before).max(0.0) / n as f64,
        heap: heap_before.zip(heap_after).map(|(b, a)| (a - b) / n as f64),
    })
}

/// Masking throughput (DataRow-like fields through every detector, one core), from the
/// agent's own release-mode measurement.
fn mask_throughput() -> Result<()> {
    let out = Command::new("cargo")
        .args([
            "test",
            "-q",
            "--release",
            "-p",
            "tollgate",
            "--lib",
            "mask::tests::bench_throughput",
            "--",
            "--ignored",
            "--nocapture",
        ])
        .current_dir(util::root())
        .stderr(Stdio::null())
        .output()
        .context("cargo test (mask throughput)")?;
    println!("\nmasking throughput, one core:");
    for l in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("MB/s"))
    {
        println!("  {l}");
    }
    Ok(())
}

/// pgbouncer in session mode, run as the postgres user (it refuses root), stopped on drop.
struct Bouncer {
    pid: u32,
}

impl Bouncer {
    fn start(pg_port: u16, port: u16) -> Result<Bouncer> {
        let dir = Path::new(WORK).join("pgbouncer");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("userlist.txt"), format!("\"app_rw\" \"{PW}\"\n"))?;
        let ini = format!(
            "[databases]\nbench = host=127.0.0.1 port={pg_port} dbname=bench\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             auth_type = scram-sha-256\nauth_file = {d}/userlist.txt\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 20\n\
             unix_socket_dir =\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
            d = dir.display()
        );
        fs::write(dir.join("pgbouncer.ini"), ini)?;
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir))?;
        run(Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbouncer", "-d"])
            .arg(dir.join("pgbouncer.ini")))?;
        for _ in 0..100 {
            if let Ok(p) = fs::read_to_string(dir.join("pgbouncer.pid")) {
                if let Ok(pid) = p.trim().parse() {
                    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        return Ok(Bouncer { pid });
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bail!(
            "pgbouncer did not start; see {}/pgbouncer.log",
            dir.display()
        )
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        util::kill(self.pid, libc::SIGTERM);
    }
}

/// Which parts of `bench pg` run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    All,
    /// The pgbench table, the latency block, connection set-up and idle memory.
    Table,
    Memory,
    Approvals,
}

/// This process (and so its children: pgbench, psql, ssh...) in a bench cgroup, the bench
/// identity's, until dropped: then back in the cgroup root and the cgroup removed.
pub(crate) struct InBenchCgroup(Cgroup);

impl InBenchCgroup {
    pub(crate) fn enter(name: &str) -> Result<InBenchCgroup> {
        let cg = Cgroup::create(name)?;
        fs::write(cg.0.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(InBenchCgroup(cg))
    }
}

impl Drop for InBenchCgroup {
    fn drop(&mut self) {
        if let Some(root) = self.0 .0.parent() {
            let _ = fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
    }
}

pub fn bench_pg(only: Option<&str>) -> Result<()> {
    let part = match only {
        None => Part::All,
        Some("memory") => Part::Memory,
        Some("approvals") => Part::Approvals,
        Some("table") => Part::Table,
        Some(o) => bail!(
            "unknown part {o:?} of `bench pg`: use --only table, --only memory, --only approvals or nothing"
        ),
    };
    if !util::is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    let work = Path::new(WORK);
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work)?;
    fs::write(work.join("pw"), format!("{PW}\n"))?;
    let bin = util::bench_agent();
    let baseline = std::env::var_os("TOLLGATE_BENCH_BASELINE").map(std::path::PathBuf::from);
    if let Some(b) = &baseline {
        println!(
            "baseline agent binary (column \"baseline pg\"): {}",
            b.display()
        );
    }
    let pg_port = free_port()?;
    let pg = Postgres::start(&work.join("pg"), pg_port)?;
    pg.sql(
        pg_port,
        "postgres",
        &format!("CREATE ROLE app_rw LOGIN PASSWORD '{PW}'"),
    )?;
    pg.sql(pg_port, "postgres", "CREATE DATABASE bench OWNER app_rw")?;
    pg.sql(
        pg_port,
        "postgres",
        "ALTER SYSTEM SET max_connections = 200",
    )?;
    run(Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", "-h"])
        .arg(&pg.dir)
        .args(["-p", &pg_port.to_string(), "-U", "app_rw", "bench"])
        .env("PGPASSWORD", PW)
        .stdout(Stdio::null()))?;

    if part != Part::Approvals {
        table_and_memory(
            &bin,
            baseline.as_deref(),
            pg_port,
            matches!(part, Part::All | Part::Table),
        )?;
    }
    if matches!(part, Part::All | Part::Approvals) {
        approvals(&bin, &pg, pg_port)?;
    }
    if part == Part::All {
        mask_throughput()?;
    }
    drop(pg);
    let _ = fs::remove_dir_all(work);
    Ok(())
}

/// Environment of an agent run by the bench.
type AgentEnv<'a> = &'a [(&'a str, &'a str)];

/// Rounds of the pgbench table: each cell is the median of this many runs.
const ROUNDS: usize = 3;

/// The pgbench table (when `tps`) and the idle session memory. The table is [`ROUNDS`] rounds
/// of every cell; odd rounds run their blocks in the reverse order (the agents' block first,
/// postgres before relay; then pgbouncer before direct), so a drift of the machine over time
/// falls on every column alike. Each cell is the median of its runs.
fn table_and_memory(bin: &Path, baseline: Option<&Path>, pg_port: u16, tps: bool) -> Result<()> {
    let rows: Rows = [
        ("-S", &["-S"]),
        ("-S -M prepared", &["-S", "-M", "prepared"]),
        ("TPC-B (default)", &[]),
        ("-S -C (connect per transaction)", &["-S", "-C"]),
    ];
    // runs[row][column]: direct, tcp relay, tollgate pg, pgbouncer, baseline pg.
    let mut table = Table {
        runs: vec![Default::default(); rows.len()],
        baseline: baseline.is_some(),
        ..Table::default()
    };
    let mut idle = None;
    if !tps {
        agent_columns(bin, None, pg_port, &rows, None, false, &mut idle)?;
        if let Some(h) = idle {
            h.print();
        }
        return Ok(());
    }
    let rounds = util::rounds(ROUNDS);
    for round in 0..rounds {
        let reverse = round % 2 == 1;
        if !reverse {
            plain_columns(pg_port, &rows, &mut table, false)?;
        }
        let t = Some(&mut table);
        agent_columns(bin, baseline, pg_port, &rows, t, reverse, &mut idle)?;
        if reverse {
            plain_columns(pg_port, &rows, &mut table, true)?;
        }
    }
    let runs = &table.runs;

    println!("\npgbench TPS, -c4 -j2 -T{SECONDS}, scale 1, median of {rounds} interleaved rounds on this machine (2 cores shared by client, proxy and server)\n");
    let base = table.baseline;
    println!(
        "{:<32} {:>10} {:>12} {:>14} {:>11}   {:>12} {:>12} {:>10}{}",
        "",
        "direct",
        "tcp relay",
        "tollgate pg",
        "pgbouncer",
        "pg/relay",
        "pg/pgbouncer",
        "pg/direct",
        if base {
            format!(" {:>13} {:>13}", "baseline pg", "pg/baseline")
        } else {
            String::new()
        }
    );
    for (i, (name, _)) in rows.iter().enumerate() {
        let tps =
            |c: usize| util::median(&mut runs[i][c].iter().map(|r| r.tps).collect::<Vec<_>>());
        let [d, r, p, b] = [0, 1, 2, 3].map(tps);
        let extra = if base {
            let o = tps(4);
            format!(" {o:>13.0} {:>12.2}x", p / o)
        } else {
            String::new()
        };
        println!(
            "{name:<32} {d:>10.0} {r:>12.0} {p:>14.0} {b:>11.0}   {:>11.2}x {:>11.2}x {:>9.2}x{extra}",
            p / r,
            p / b,
            p / d
        );
    }
    println!("\neach round's ratios (pg/relay, pg/pgbouncer):");
    for (i, (name, _)) in rows.iter().enumerate() {
        let per: Vec<String> = (0..rounds)
            .map(|k| {
                let [r, p, b] = [1, 2, 3].map(|c| runs[i][c][k].tps);
                format!("{:.2} {:.2}", p / r, p / b)
            })
            .collect();
        println!("  {name:<32} {}", per.join("  |  "));
    }
    println!(
        "\ngoals (issue 17): pg/relay >= 0.9 every row; pg/pgbouncer >= 1.0 on -S and -S -M prepared; -C pg/direct >= 2.0"
    );
    // What each proxy costs: at the same TPS a proxy that spends more CPU per transaction
    // leaves less of the two cores to pgbench and the server.
    println!("\nproxy CPU per transaction (user + system, all threads; median of the rounds), microseconds:");
    println!(
        "{:<32} {:>12} {:>14} {:>11}{}",
        "",
        "tcp relay",
        "tollgate pg",
        "pgbouncer",
        if base {
            format!(" {:>13}", "baseline pg")
        } else {
            String::new()
        }
    );
    for (i, (name, _)) in rows.iter().enumerate() {
        let us = |c: usize| {
            let mut v: Vec<f64> = runs[i][c]
                .iter()
                .filter_map(|r| r.proxy_us_per_tx)
                .collect();
            if v.is_empty() {
                f64::NAN
            } else {
                util::median(&mut v)
            }
        };
        let extra = if base {
            format!(" {:>13.1}", us(4))
        } else {
            String::new()
        };
        println!(
            "{name:<32} {:>12.1} {:>14.1} {:>11.1}{extra}",
            us(1),
            us(2),
            us(3)
        );
    }
    println!("goal (issue 17): tollgate pg <= 1.2x pgbouncer on -S and -S -M prepared");
    // Each round's CPU per transaction, relative to pgbouncer's in the same round (and the
    // baseline build's, when there is one): the spread says what is noise.
    println!(
        "each round's tollgate pg CPU per transaction / pgbouncer's{}:",
        if base { " (and / baseline pg's)" } else { "" }
    );
    for (i, (name, _)) in rows.iter().enumerate() {
        let per: Vec<String> = (0..rounds)
            .map(|k| {
                let us = |c: usize| runs[i][c].get(k).and_then(|r| r.proxy_us_per_tx);
                let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                    _ => "-".into(),
                };
                if base {
                    format!("{} {}", ratio(us(2), us(3)), ratio(us(2), us(4)))
                } else {
                    ratio(us(2), us(3))
                }
            })
            .collect();
        println!("  {name:<32} {}", per.join("  |  "));
    }
    table.print_latency_and_setup();
    if let Some(h) = idle {
        h.print();
    }
    Ok(())
}

/// The table's runs and the latency and connection set-up figures, by column (direct, tcp
/// relay, tollgate pg, pgbouncer, and the baseline build when there is one).
#[derive(Default)]
struct Table {
    /// runs[row][column].
    runs: Vec<[Vec<Run>; COLUMNS]>,
    /// One client's (p50, p99) microseconds per transaction, per round.
    latency: [Vec<(f64, f64)>; COLUMNS],
    /// Median microseconds of connect + first byte, per round.
    first_byte: [Vec<f64>; COLUMNS],
    /// The proxy's system calls per transaction (-S) and per connection (-S -C, each a login,
    /// one SELECT and a Terminate), counted once by strace (first round).
    syscalls: [Option<(f64, f64)>; COLUMNS],
    /// Column 4 (another build, `TOLLGATE_BENCH_BASELINE`) is measured.
    baseline: bool,
}

/// Columns of the table: direct, tcp relay, tollgate pg, pgbouncer, baseline pg.
const COLUMNS: usize = 5;

/// Seconds of each one-client latency run.
const LATENCY_SECONDS: &str = "5";

/// Connections timed for connect + first byte, per column and round.
const FIRST_BYTES: usize = 300;

impl Table {
    /// The latency and set-up figures of column `col` (reached at `port`, through `proxy`).
    fn latency_and_setup(
        &mut self,
        col: usize,
        port: u16,
        password: &str,
        proxy: Option<u32>,
    ) -> Result<()> {
        self.latency[col].push(latency(port, password)?);
        self.first_byte[col].push(first_byte_us(port, FIRST_BYTES)?);
        if let (Some(pid), None) = (proxy, self.syscalls[col]) {
            let pgbench = |args: &[&str]| one_client(port, password, args);
            const TXS: u32 = 2000;
            const CONNS: u32 = 200;
            let per_tx = util::syscalls_during(&[pid], || pgbench(&["-t", &TXS.to_string()]))?;
            let per_conn =
                util::syscalls_during(&[pid], || pgbench(&["-C", "-t", &CONNS.to_string()]))?;
            self.syscalls[col] = Some((per_tx / f64::from(TXS), per_conn / f64::from(CONNS)));
        }
        Ok(())
    }

    fn print_latency_and_setup(&self) {
        let all = [
            "direct",
            "tcp relay",
            "tollgate pg",
            "pgbouncer",
            "baseline pg",
        ];
        let names = &all[..if self.baseline { 5 } else { 4 }];
        let lat: Vec<(f64, f64)> = self.latency[..names.len()]
            .iter()
            .map(|v| {
                let mut p50: Vec<f64> = v.iter().map(|l| l.0).collect();
                let mut p99: Vec<f64> = v.iter().map(|l| l.1).collect();
                (util::median(&mut p50), util::median(&mut p99))
            })
            .collect();
        println!("
latency per transaction, one client (pgbench -S -c1 -T{LATENCY_SECONDS}, per-transaction log), microseconds; median of the rounds:");
        println!("{:<14} {:>8} {:>8} {:>16}", "", "p50", "p99", "added p50");
        for (i, name) in names.iter().enumerate() {
            println!(
                "{name:<14} {:>8.0} {:>8.0} {:>16.0}",
                lat[i].0,
                lat[i].1,
                lat[i].0 - lat[0].0
            );
        }
        let (pg_added, bouncer_added) = (lat[2].0 - lat[0].0, lat[3].0 - lat[0].0);
        println!(
            "tollgate's added p50 / pgbouncer's: {:.2}x (goal <= 1.25x)",
            pg_added / bouncer_added
        );
        println!("
connect + first byte (an SSLRequest answered), median of {FIRST_BYTES} connections, median of the rounds; system calls of the proxy (strace -c -f, all threads):");
        println!(
            "{:<14} {:>10} {:>10} {:>16} {:>16}",
            "", "us", "/direct", "syscalls/txn", "syscalls/conn"
        );
        let fb: Vec<f64> = self.first_byte[..names.len()]
            .iter()
            .map(|v| util::median(&mut v.clone()))
            .collect();
        for (i, name) in names.iter().enumerate() {
            let (tx, conn) = match self.syscalls[i] {
                Some((t, c)) => (format!("{t:.1}"), format!("{c:.1}")),
                None => ("-".into(), "-".into()),
            };
            println!(
                "{name:<14} {:>10.0} {:>9.2}x {tx:>16} {conn:>16}",
                fb[i],
                fb[i] / fb[0]
            );
        }
        println!("goal: tollgate pg connect + first byte <= 1.5x direct (syscalls/conn: a login, one SELECT, a Terminate)");
    }
}

/// One client's latency per transaction through 127.0.0.1:`port`: pgbench -S -c1 with a
/// per-transaction log; (p50, p99) in microseconds.
fn latency(port: u16, password: &str) -> Result<(f64, f64)> {
    let dir = Path::new(WORK).join("latency");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let prefix = dir.join("tx");
    let prefix = prefix.to_str().context("latency log path")?;
    one_client(
        port,
        password,
        &["-T", LATENCY_SECONDS, "-l", "--log-prefix", prefix],
    )?;
    let mut us = Vec::new();
    for e in fs::read_dir(&dir)? {
        // client_id transaction_no latency_us script_no epoch epoch_us
        let text = fs::read_to_string(e?.path())?;
        us.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()),
        );
    }
    fs::remove_dir_all(&dir)?;
    if us.is_empty() {
        bail!("pgbench -c1 logged no transaction");
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

/// pgbench -S with one client through 127.0.0.1:`port`, plus `args`.
fn one_client(port: u16, password: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app_rw"])
        .args(["-n", "-c", "1", "-j", "1", "-S"])
        .args(args)
        .arg("bench")
        .env("PGPASSWORD", password)
        .env("PGSSLMODE", "disable")
        .output()
        .context("pgbench")?;
    if !out.status.success() {
        bail!(
            "pgbench -c1 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Median microseconds from connect() to the first byte of the answer to an SSLRequest (the
/// first thing libpq sends): the accept path of whoever answers.
fn first_byte_us(port: u16, n: usize) -> Result<f64> {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.write_all(&SSL_REQUEST)?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).context("no answer to an SSLRequest")?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(util::median(&mut v))
}

/// A pgbench table's rows: a name and pgbench's arguments.
type Rows<'a> = [(&'a str, &'a [&'a str]); 4];

/// One run of each row direct (column 0) and through pgbouncer (column 3), with no agent
/// loaded (it would redirect pgbouncer too); pgbouncer first when `reverse`.
fn plain_columns(pg_port: u16, rows: &Rows<'_>, table: &mut Table, reverse: bool) -> Result<()> {
    let bport = free_port()?;
    let bouncer = Bouncer::start(pg_port, bport)?;
    let mut cols = [(0, pg_port, None), (3, bport, Some(bouncer.pid))];
    if reverse {
        cols.reverse();
    }
    for (col, port, proxy) in cols {
        for (i, (_, args)) in rows.iter().enumerate() {
            table.runs[i][col].push(pgbench_cpu(port, PW, args, proxy)?);
        }
        table.latency_and_setup(col, port, PW, proxy)?;
    }
    Ok(())
}

/// One run of each row through the agent as a plain tcp relay (column 1) and as the postgres
/// target (column 2), postgres first when `reverse`; with `runs` None, only the postgres agent
/// runs, for the idle session memory. The memory is measured once, into `idle`.
fn agent_columns(
    bin: &Path,
    baseline: Option<&Path>,
    pg_port: u16,
    rows: &Rows<'_>,
    mut table: Option<&mut Table>,
    reverse: bool,
    idle: &mut Option<HeapFigures>,
) -> Result<()> {
    // The bot: this process and its pgbench children in the bench cgroup.
    let _cg = InBenchCgroup::enter("tollgate-bench-pg")?;
    let work = Path::new(WORK);
    let (listen, metrics) = (free_port()?, free_port()?);
    let mut agents: Vec<(usize, &str, AgentEnv, &Path)> = vec![
        (1, "tcp", &[("TOLLGATE_RELAY", "copy")], bin),
        (2, "postgres", &[], bin),
    ];
    if let Some(b) = baseline {
        agents.push((4, "postgres", &[], b));
    }
    if reverse {
        agents.reverse();
    }
    for (col, protocol, env, bin) in agents {
        if table.is_none() && protocol != "postgres" {
            continue;
        }
        let pol = work.join(format!("{protocol}.toml"));
        fs::write(&pol, policy(pg_port, listen, metrics, protocol))?;
        let log = work.join(format!("agent-{protocol}.log"));
        if col == 2 && idle.is_none() {
            // On an agent of its own that counts its heap (which costs the measured ones).
            let mut agent = AgentProc::start(bin, &pol, &log, &[HEAP_STATS])?;
            agent.wait_ready(&format!("127.0.0.1:{metrics}"), &log)?;
            let m = metrics_addr(metrics);
            let (sessions, held) = idle_session_memory(agent.child.id(), pg_port, &m)?;
            let mut allocations = Vec::new();
            for (row, args) in [
                ("-S", &["-S"][..]),
                ("-S -M prepared", &["-S", "-M", "prepared"]),
            ] {
                allocations.push((row, allocations_per_transaction(pg_port, &m, args)?));
            }
            *idle = Some(HeapFigures {
                sessions,
                idle: held,
                allocations,
            });
            agent.stop();
        }
        let mut agent = AgentProc::start(bin, &pol, &log, env)?;
        agent.wait_ready(&format!("127.0.0.1:{metrics}"), &log)?;
        if let Some(table) = table.as_deref_mut() {
            // Through tollgate the bot's password does not matter (postgres mode injects it);
            // the tcp relay passes authentication through, so it needs the real one.
            let pw = if protocol == "postgres" {
                "not-the-password"
            } else {
                PW
            };
            let pid = agent.child.id();
            for (i, (_, args)) in rows.iter().enumerate() {
                // The bare relay's profile too, to set tollgate's against.
                let name = if col == 2 { "row" } else { "relay-row" };
                let _perf = ((col == 1 || col == 2) && i < 2)
                    .then(|| std::env::var_os("TOLLGATE_BENCH_PERF"))
                    .flatten()
                    .map(|dir| {
                        util::PerfRecord::start(
                            pid,
                            &Path::new(&dir).join(format!("{name}{i}.data")),
                        )
                    })
                    .transpose()?;
                table.runs[i][col].push(pgbench_cpu(pg_port, pw, args, Some(pid))?);
            }
            table.latency_and_setup(col, pg_port, pw, Some(pid))?;
        }
        agent.stop();
    }
    Ok(())
}

/// Held DELETEs timed for the wake-up latency (plus one untimed warm-up).
const WAKE_RUNS: usize = 10;

/// Approvals configured vs not, for an auto-allowed statement: pgbench -S through the postgres
/// target, A = the table's policy (admin listener off), B = the same plus an `approve` rule on
/// DELETE and the admin listener on, in the order A B B A (an agent start per block), so a
/// drift of the machine over time cancels out of the means. Then, on B's agent, the wake-up
/// latency: a psql DELETE is held, approved through the admin API, and timed from the approve
/// call to the DELETE's result at psql.
fn approvals(bin: &Path, pg: &Postgres, pg_port: u16) -> Result<()> {
    pg.sql(
        pg_port,
        "bench",
        &format!(
            "CREATE TABLE held (id int PRIMARY KEY); \
             INSERT INTO held SELECT generate_series(1, {}); ALTER TABLE held OWNER TO app_rw",
            WAKE_RUNS + 1
        ),
    )?;
    let _cg = InBenchCgroup::enter("tollgate-bench-pg")?;
    let work = Path::new(WORK);
    let (listen, metrics, admin) = (free_port()?, free_port()?, free_port()?);
    let mut a_tps = Vec::new();
    let mut b_tps = Vec::new();
    let mut wake = Vec::new();
    for (block, configured) in [(0, false), (1, true), (2, false)] {
        let name = if configured { "approvals" } else { "plain" };
        let mut text = policy(pg_port, listen, metrics, "postgres");
        if configured {
            text = text.replace("admin = \"off\"", &format!("admin = \"127.0.0.1:{admin}\""));
            text.push_str(
                r#"
[[rule]]
name = "deletes need approval"
identities = ["bench"]
targets = ["db"]
action = "approve"
sql = { statements = ["delete"] }
approvers = ["dba"]
timeout = "1m"
"#,
            );
        }
        let pol = work.join(format!("{name}.toml"));
        fs::write(&pol, text)?;
        let log = work.join(format!("agent-{name}-{block}.log"));
        let mut agent = AgentProc::start(bin, &pol, &log, &[])?;
        agent.wait_ready(&format!("127.0.0.1:{metrics}"), &log)?;
        if configured {
            // B twice in a row (the middle of A B B A), then the wake-up runs.
            b_tps.push(pgbench(pg_port, "not-the-password", &["-S"])?);
            b_tps.push(pgbench(pg_port, "not-the-password", &["-S"])?);
            let token = wait_token(&work.join("data/admin.token"))?;
            let addr = format!("127.0.0.1:{admin}");
            for row in 1..=WAKE_RUNS + 1 {
                let sample = wake_up(pg_port, &addr, &token, row)
                    .with_context(|| format!("wake-up run {row}; agent log {}", log.display()))?;
                if row > 1 {
                    wake.push(sample);
                }
            }
        } else {
            a_tps.push(pgbench(pg_port, "not-the-password", &["-S"])?);
        }
        agent.stop();
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let spread = |v: &[f64]| (v[0] - v[1]).abs() / mean(v) * 100.0;
    let (a, b) = (mean(&a_tps), mean(&b_tps));
    println!("\napprovals configured, pgbench -S through the postgres target (-c4 -j2 -T{SECONDS}, order A B B A):");
    println!(
        "  A  no approve rule, admin off            {:>8.0} {:>8.0} tps   mean {a:>8.0}   (runs differ by {:.1}%)",
        a_tps[0],
        a_tps[1],
        spread(&a_tps)
    );
    println!(
        "  B  approve rule on DELETE, admin on      {:>8.0} {:>8.0} tps   mean {b:>8.0}   (runs differ by {:.1}%)",
        b_tps[0],
        b_tps[1],
        spread(&b_tps)
    );
    println!("  B/A ratio: {:.3}", b / a);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut after: Vec<Duration> = wake.iter().map(|w| w.after_return).collect();
    let mut total: Vec<Duration> = wake.iter().map(|w| w.after_start).collect();
    let mut call: Vec<Duration> = wake.iter().map(|w| w.call).collect();
    for v in [&mut after, &mut total, &mut call] {
        v.sort();
    }
    let med = |v: &[Duration]| v[v.len() / 2];
    println!(
        "approval wake-up, {} held DELETEs (psql), median [min, max]:\n  approve call returned -> DELETE result at psql  {:>7.1} ms [{:.1}, {:.1}]\n  approve call started  -> DELETE result at psql  {:>7.1} ms [{:.1}, {:.1}]\n  (the approve call itself                        {:>7.1} ms)",
        wake.len(),
        ms(med(&after)),
        ms(after[0]),
        ms(after[after.len() - 1]),
        ms(med(&total)),
        ms(total[0]),
        ms(total[total.len() - 1]),
        ms(med(&call)),
    );
    println!("goal: ratio within noise (~0.95-1.05); wake-up < 100 ms");
    Ok(())
}

/// The local admin token the agent writes at start-up (no OIDC configured).
fn wait_token(path: &Path) -> Result<String> {
    for _ in 0..200 {
        if let Ok(t) = fs::read_to_string(path) {
            if !t.trim().is_empty() {
                return Ok(t.trim().to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the agent wrote no admin token at {}", path.display())
}

struct WakeUp {
    /// The approve call's own duration.
    call: Duration,
    /// From the approve call's return to the result line at psql (zero if it came first).
    after_return: Duration,
    /// From the approve call's start to the result line at psql.
    after_start: Duration,
}

/// One held DELETE: psql (in the bench cgroup) runs it, the test waits for the approval notice,
/// approves through the admin API and times the result.
fn wake_up(pg_port: u16, admin: &str, token: &str, row: usize) -> Result<WakeUp> {
    let mut child = bot_psql(pg_port)
        .args(["-c", &format!("DELETE FROM held WHERE id = {row}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("psql")?;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (tx, rx) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().context("stdout")?) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().context("stderr")?),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), l));
            }
        });
    }
    drop(tx);
    let _child = Kill(child);
    let mut seen = Vec::new();
    let mut next = |what: &str, pred: &dyn Fn(&str) -> bool| -> Result<(Instant, String)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((at, l)) => {
                    seen.push(l.clone());
                    if pred(&l) {
                        return Ok((at, l));
                    }
                }
                Err(_) => bail!("psql printed no {what}; it printed:\n{}", seen.join("\n")),
            }
        }
    };
    let (_, notice) = next("approval notice", &|l| l.contains("waiting for approval #"))?;
    let id: u64 = notice
        .split("waiting for approval #")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .with_context(|| format!("no approval id in {notice:?}"))?;
    let t0 = Instant::now();
    let (status, body) = http_post(admin, &format!("/v1/approvals/{id}/approve"), token)?;
    let t1 = Instant::now();
    if status != 200 {
        bail!("approve #{id}: HTTP {status}: {body}");
    }
    let (t2, _) = next("DELETE result", &|l| l.starts_with("DELETE 1"))?;
    Ok(WakeUp {
        call: t1 - t0,
        after_return: t2.saturating_duration_since(t1),
        after_start: t2 - t0,
    })
}

/// POST an empty JSON body with a bearer token (HTTP/1.1, Connection: close).
fn http_post(addr: &str, path: &str, token: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
