//! `cargo xtask bench ssh`: the SSH handler against the same `sshd` directly, in one run of
//! interleaved rounds (odd rounds put the agent's block first, so a drift of the machine over
//! time falls on both columns alike). Figures: `scp` of 256 MiB up and down (throughput and
//! the ratio to direct), `ssh host true` round trips with connection reuse (`pool`, the default)
//! and without, the agent's CPU time per MiB copied, and the agent's memory per idle session.
//!
//! The server is a throwaway OpenSSH `sshd` on loopback (the demo's, which accepts only the
//! agent's key); the bench process and its clients join the bench identity's cgroup for the
//! agent's blocks, where the bot's own key (which the server rejects) is enough because the
//! agent injects its own. Never fails on slow numbers, only on broken setups.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench_pg::{free_port, held_session_memory, Held, InBenchCgroup, HEAP_STATS},
    demo::{AgentProc, Sshd},
    util::{self, cpu_ms, median},
};

const WORK: &str = "/tmp/tollgate-bench-ssh";
/// The scp payload.
const MIB: u64 = 256;
/// Rounds of every measurement; each figure is the median over them.
const ROUNDS: usize = 3;
/// `ssh host true` runs per round and column.
const TRUE_RUNS: usize = 20;
/// Idle sessions held for the memory figure.
const IDLE: usize = 20;

/// One client configuration: the key it logs in with and the server it dials.
struct Client {
    key: PathBuf,
    port: u16,
}

impl Client {
    fn opts(&self, port_flag: &str) -> Vec<String> {
        let work = Path::new(WORK);
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                work.join("ssh/known_hosts").display()
            ),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            port_flag.into(),
            self.port.to_string(),
        ]
    }

    fn ssh(&self, command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.opts("-p"))
            .arg("root@127.0.0.1")
            .arg(command)
            .stdin(Stdio::null());
        c
    }

    /// `scp` of `from` to `to` (one of them `root@127.0.0.1:PATH`); the seconds it took.
    fn scp(&self, from: &str, to: &str) -> Result<f64> {
        let t = Instant::now();
        let out = Command::new("scp")
            .args(self.opts("-P"))
            .arg("-q")
            .args([from, to])
            .stdin(Stdio::null())
            .output()
            .context("scp")?;
        if !out.status.success() {
            bail!(
                "scp {from} {to}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// `ssh host true`, timed; fails unless it exits 0.
    fn true_ms(&self) -> Result<f64> {
        let t = Instant::now();
        let out = self.ssh("true").output().context("ssh")?;
        if !out.status.success() {
            bail!(
                "ssh true: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t.elapsed().as_secs_f64() * 1000.0)
    }
}

/// A column's samples.
#[derive(Default)]
struct Samples {
    up_s: Vec<f64>,
    down_s: Vec<f64>,
    true_ms: Vec<f64>,
    /// Agent CPU milliseconds per MiB copied (both directions together).
    cpu_ms_per_mib: Vec<f64>,
}

fn policy(ssh_port: u16, listen: u16, metrics: u16, pool: bool) -> String {
    crate::bench::bench_agent_toml("tollgate-bench-ssh", WORK, listen, metrics)
        + &format!(
            r#"
[[target]]
name = "box"
protocol = "ssh"
address = ["127.0.0.1:{ssh_port}"]
credential = "box-login"
known_hosts = "{WORK}/ssh/known_hosts"
host_key_file = "{WORK}/ssh/host_ed25519"
pool = {pool}

[credential.box-login]
user = "root"
key_file = "{WORK}/secrets/build-box-key"

[[rule]]
name = "bench"
identities = ["bench"]
targets = ["box"]
action = "allow"
ssh = {{ exec = ["true", "cat", "scp *"], subsystems = ["sftp"] }}
"#
        )
}

/// `MIB` MiB that do not compress (xorshift), so no layer can shortcut the copy.
fn payload(path: &Path) -> Result<()> {
    let mut f = std::io::BufWriter::new(fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..MIB {
        for chunk in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

/// The copies and round trips of one column, appended to `s`; `agent` is the agent's pid for
/// its CPU time. The copies are compared with the original in the first round.
fn measure(c: &Client, s: &mut Samples, agent: Option<u32>, check: bool) -> Result<()> {
    let work = Path::new(WORK);
    let src = work.join("payload");
    let remote_up = work.join("up.bin");
    let local_down = work.join("down.bin");
    let before = agent.map(cpu_ms);
    s.up_s.push(c.scp(
        &src.display().to_string(),
        &format!("root@127.0.0.1:{}", remote_up.display()),
    )?);
    s.down_s.push(c.scp(
        &format!("root@127.0.0.1:{}", src.display()),
        &local_down.display().to_string(),
    )?);
    if let (Some(pid), Some(b)) = (agent, before) {
        s.cpu_ms_per_mib.push((cpu_ms(pid) - b) / (2 * MIB) as f64);
    }
    if check {
        for copy in [&remote_up, &local_down] {
            let same = Command::new("cmp")
                .arg("-s")
                .arg(&src)
                .arg(copy)
                .status()?
                .success();
            if !same {
                bail!("{} differs from the payload", copy.display());
            }
        }
    }
    let _ = fs::remove_file(&remote_up);
    let _ = fs::remove_file(&local_down);
    for _ in 0..TRUE_RUNS {
        s.true_ms.push(c.true_ms()?);
    }
    Ok(())
}

/// An agent for the bench target, ready; with its metrics address.
fn start_agent(
    bin: &Path,
    ssh_port: u16,
    pool: bool,
    env: &[(&str, &str)],
) -> Result<(AgentProc, String)> {
    let work = Path::new(WORK);
    let (listen, metrics) = (free_port()?, free_port()?);
    let pol = work.join(format!("pool-{pool}.toml"));
    fs::write(&pol, policy(ssh_port, listen, metrics, pool))?;
    let log = work.join(format!("agent-pool-{pool}.log"));
    let mut agent = AgentProc::start(bin, &pol, &log, env)?;
    let metrics = format!("127.0.0.1:{metrics}");
    agent.wait_ready(&metrics, &log)?;
    Ok((agent, metrics))
}

/// Agent RSS growth per idle session: `IDLE` sessions each running `cat` on an open stdin.
fn idle_session_memory(c: &Client, agent_pid: u32, metrics: &str) -> Result<Held> {
    held_session_memory(agent_pid, metrics, "ssh", IDLE, 5, || {
        c.ssh("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("ssh")
    })
}

pub fn bench_ssh() -> Result<()> {
    if !util::is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    let work = Path::new(WORK);
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work.join("secrets"))?;
    let bin = util::bench_agent();
    let ssh_port = free_port()?;
    let sshd = Sshd::start(&work.join("ssh"), &work.join("secrets"), ssh_port)?;
    payload(&work.join("payload"))?;
    // Direct: the agent's key, which the server accepts. Through the agent: the bot's own key,
    // which the server rejects (the agent logs in upstream with its key).
    let direct = Client {
        key: work.join("secrets/build-box-key"),
        port: ssh_port,
    };
    let bot = Client {
        key: work.join("ssh/bot/id_ed25519"),
        port: ssh_port,
    };
    // Columns: direct, agent (pool on, the default), agent with pool = false (round trips only).
    let mut cols: [Samples; 3] = Default::default();
    let mut idle = None;
    for round in 0..ROUNDS {
        let check = round == 0;
        let direct_block = |cols: &mut [Samples; 3]| measure(&direct, &mut cols[0], None, check);
        let agent_block = |cols: &mut [Samples; 3], idle: &mut Option<Held>| -> Result<()> {
            let _cg = InBenchCgroup::enter("tollgate-bench-ssh")?;
            if idle.is_none() {
                // On an agent of its own, before any copy has grown its heap.
                let (mut agent, metrics) = start_agent(&bin, ssh_port, true, &[HEAP_STATS])?;
                *idle = Some(idle_session_memory(&bot, agent.child.id(), &metrics)?);
                agent.stop();
            }
            let (mut agent, _) = start_agent(&bin, ssh_port, true, &[])?;
            measure(&bot, &mut cols[1], Some(agent.child.id()), check)?;
            agent.stop();
            let (mut agent, _) = start_agent(&bin, ssh_port, false, &[])?;
            bot.true_ms()?; // the first login of this agent
            for _ in 0..TRUE_RUNS {
                cols[2].true_ms.push(bot.true_ms()?);
            }
            agent.stop();
            Ok(())
        };
        if round % 2 == 1 {
            agent_block(&mut cols, &mut idle)?;
            direct_block(&mut cols)?;
        } else {
            direct_block(&mut cols)?;
            agent_block(&mut cols, &mut idle)?;
        }
    }
    drop(sshd);
    let _ = fs::remove_dir_all(work);

    let med = |v: &[f64]| median(&mut v.to_vec());
    let mbps = |s: f64| MIB as f64 / s;
    let [d, a, nopool] = &cols;
    println!("\nssh through tollgate vs the same sshd directly, median of {ROUNDS} interleaved rounds on this machine (2 cores shared by client, agent and server)\n");
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "", "direct", "tollgate", "ratio"
    );
    for (name, dv, av) in [
        ("scp 256 MiB up (MiB/s)", &d.up_s, &a.up_s),
        ("scp 256 MiB down (MiB/s)", &d.down_s, &a.down_s),
    ] {
        let (x, y) = (mbps(med(dv)), mbps(med(av)));
        println!("{name:<44} {x:>10.1} {y:>10.1} {:>9.2}x", y / x);
    }
    let (x, y, z) = (med(&d.true_ms), med(&a.true_ms), med(&nopool.true_ms));
    println!(
        "{:<44} {x:>10.1} {y:>10.1} {:>9.2}x",
        "ssh host true, pool on (ms)",
        y / x
    );
    println!(
        "{:<44} {x:>10.1} {z:>10.1} {:>9.2}x",
        "ssh host true, pool = false (ms)",
        z / x
    );
    println!("\neach round (up ratio, down ratio, true ratio with pool):");
    for k in 0..ROUNDS {
        let r = |dv: &[f64], av: &[f64]| dv[k] / av[k];
        let t = |v: &[f64]| med(&v[k * TRUE_RUNS..(k + 1) * TRUE_RUNS]);
        println!(
            "  round {k}: {:.2}  {:.2}  {:.2}",
            r(&d.up_s, &a.up_s),
            r(&d.down_s, &a.down_s),
            t(&a.true_ms) / t(&d.true_ms)
        );
    }
    println!(
        "\nagent CPU per MiB copied (user + system, all threads): {:.2} ms",
        med(&a.cpu_ms_per_mib)
    );
    if let Some(per) = idle {
        println!(
            "idle ssh session memory over {IDLE} idle `ssh host cat` sessions, each with its own upstream connection: {}",
            per.describe("session")
        );
    }
    println!("\ngoals: scp ratio >= 0.6x; ssh host true with pool <= 1.0x direct");
    Ok(())
}
