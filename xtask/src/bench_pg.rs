//! `cargo xtask bench pg`: pgbench TPS in one run, one table. Columns: direct; tollgate as a
//! plain `tcp` relay with kernel splicing off (a bare userspace relay); tollgate with the
//! `postgres` handler (classification plus a masking rule); pgbouncer in session mode. Rows:
//! `-S`, `-S -M prepared`, TPC-B-like, `-S -C`. Never fails on slow numbers.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    demo::{AgentProc, Cgroup, Postgres},
    util::{self, run},
};

const WORK: &str = "/tmp/tollgate-bench-pg";
const PW: &str = "bench-upstream-password";
const SECONDS: &str = "8";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Run pgbench against 127.0.0.1:`port` and return its TPS.
fn pgbench(port: u16, password: &str, args: &[&str]) -> Result<f64> {
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
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .with_context(|| {
            format!(
                "pgbench {args:?} printed no tps:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
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

/// `tollgate_sessions_active{protocol="postgres"}` from the agent's metrics.
fn active_sessions(metrics: &str) -> Result<f64> {
    let text = crate::demo::http_get(metrics, "/metrics")?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_sessions_active{protocol=\"postgres\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Open N idle psql sessions through the agent (each waits on its stdin) and return N and the
/// agent's RSS growth per session. The sessions are ended (stdin closed) before returning.
fn idle_session_memory(agent_pid: u32, pg_port: u16, metrics: &str) -> Result<(usize, f64)> {
    // Below the server's default max_connections (100, minus reserved slots).
    const N: usize = 80;
    // Warm up allocator arenas and caches with a few sessions first, so the measurement is
    // of sessions, not of first-use initialisation.
    let spawn = |n: usize| -> Result<Vec<std::process::Child>> {
        (0..n)
            .map(|_| {
                Command::new("psql")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &pg_port.to_string(),
                        "-U",
                        "app_rw",
                        "-d",
                        "bench",
                        "-X",
                        "-q",
                    ])
                    .env("PGPASSWORD", "not-the-password")
                    .env("PGSSLMODE", "disable")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("psql")
            })
            .collect()
    };
    let wait_active = |want: f64| -> Result<()> {
        for _ in 0..300 {
            if active_sessions(metrics)? == want {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        bail!("the agent did not reach {want} active postgres sessions")
    };
    let end = |children: Vec<std::process::Child>| {
        for mut c in children {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    };
    let warm = spawn(10)?;
    wait_active(10.0)?;
    end(warm);
    wait_active(0.0)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = rss(agent_pid)?;
    let held = spawn(N)?;
    wait_active(N as f64)?;
    // Let every session go idle (past its buffers' idle trim).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let after = rss(agent_pid)?;
    end(held);
    wait_active(0.0)?;
    Ok((N, (after - before).max(0.0) / N as f64))
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

pub fn bench_pg(only: Option<&str>) -> Result<()> {
    let tps = match only {
        None => true,
        Some("memory") => false,
        Some(o) => bail!("unknown part {o:?} of `bench pg`: use --only memory or nothing"),
    };
    if !util::is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    let work = Path::new(WORK);
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work)?;
    fs::write(work.join("pw"), format!("{PW}\n"))?;
    let bin = util::root().join("target/release/tollgate");
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

    let rows: [(&str, &[&str]); 4] = [
        ("-S", &["-S"]),
        ("-S -M prepared", &["-S", "-M", "prepared"]),
        ("TPC-B (default)", &[]),
        ("-S -C (connect per transaction)", &["-S", "-C"]),
    ];
    let mut table: Vec<[f64; 4]> = vec![[0.0; 4]; rows.len()];

    // Direct and pgbouncer first, with no agent loaded (it would redirect pgbouncer too).
    let bport = free_port()?;
    let bouncer = Bouncer::start(pg_port, bport)?;
    for (i, (_, args)) in rows.iter().enumerate().filter(|_| tps) {
        table[i][0] = pgbench(pg_port, PW, args)?;
        table[i][3] = pgbench(bport, PW, args)?;
    }
    drop(bouncer);

    // The bot: this process and its pgbench children in the bench cgroup.
    let cg = Cgroup::create("tollgate-bench-pg")?;
    fs::write(cg.0.join("cgroup.procs"), std::process::id().to_string())?;
    struct Back(std::path::PathBuf);
    impl Drop for Back {
        fn drop(&mut self) {
            if let Some(root) = self.0.parent() {
                let _ = fs::write(root.join("cgroup.procs"), std::process::id().to_string());
            }
        }
    }
    let back = Back(cg.0.clone());
    let (listen, metrics) = (free_port()?, free_port()?);
    let mut idle = None;
    for (col, protocol, env) in [
        (1usize, "tcp", &[("TOLLGATE_RELAY", "copy")][..]),
        (2, "postgres", &[][..]),
    ] {
        if !tps && protocol != "postgres" {
            continue;
        }
        let pol = work.join(format!("{protocol}.toml"));
        fs::write(&pol, policy(pg_port, listen, metrics, protocol))?;
        let log = work.join(format!("agent-{protocol}.log"));
        let mut agent = AgentProc::start(&bin, &pol, &log, env)?;
        agent.wait_ready(&format!("127.0.0.1:{metrics}"), &log)?;
        if protocol == "postgres" {
            idle = Some(idle_session_memory(
                agent.child.id(),
                pg_port,
                &metrics_addr(metrics),
            )?);
        }
        for (i, (_, args)) in rows.iter().enumerate().filter(|_| tps) {
            // Through tollgate the bot's password does not matter (postgres mode injects it);
            // the tcp relay passes authentication through, so it needs the real one.
            let pw = if protocol == "postgres" {
                "not-the-password"
            } else {
                PW
            };
            table[i][col] = pgbench(pg_port, pw, args)?;
        }
        agent.stop();
    }
    drop(back);
    drop(cg);

    if !tps {
        if let Some((n, per)) = idle {
            println!(
                "idle postgres session memory: {:.1} KiB per session over {n} sessions",
                per / 1024.0
            );
        }
        drop(pg);
        let _ = fs::remove_dir_all(work);
        return Ok(());
    }
    println!("\npgbench TPS, -c4 -j2 -T{SECONDS}, scale 1, one run on this machine (2 cores shared by client, proxy and server)\n");
    println!(
        "{:<32} {:>10} {:>12} {:>14} {:>11}   {:>12} {:>12} {:>10}",
        "",
        "direct",
        "tcp relay",
        "tollgate pg",
        "pgbouncer",
        "pg/relay",
        "pg/pgbouncer",
        "pg/direct"
    );
    for (i, (name, _)) in rows.iter().enumerate() {
        let [d, r, p, b] = table[i];
        println!(
            "{name:<32} {d:>10.0} {r:>12.0} {p:>14.0} {b:>11.0}   {:>11.2}x {:>11.2}x {:>9.2}x",
            p / r,
            p / b,
            p / d
        );
    }
    println!(
        "\ngoals: pg/relay >= 0.9 every row; pg/pgbouncer >= 1.1 every row; -C pg/direct >= 2.0"
    );
    if let Some((n, per)) = idle {
        println!(
            "\nidle postgres session memory: {:.1} KiB per session (agent RSS growth over {n} idle psql sessions; goal <= 16 KiB)",
            per / 1024.0
        );
    }
    mask_throughput()?;
    drop(pg);
    let _ = fs::remove_dir_all(work);
    Ok(())
}
