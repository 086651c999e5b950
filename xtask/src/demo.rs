//! `cargo xtask demo`: a throwaway PostgreSQL, the agent with policy/examples/quickstart.toml,
//! and two "bots" in their own cgroups: one allowed, one denied. Prints what happened from the
//! bot's, the audit log's and Prometheus' point of view, then cleans everything up.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, run};

const PG_PORT: u16 = 15432;
const WORK: &str = "/tmp/tollgate-demo";

fn pg_bin() -> Result<PathBuf> {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = fs::read_dir(base)
        .context("PostgreSQL server not installed (cargo xtask setup installs it)")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no PostgreSQL server binaries under /usr/lib/postgresql")
}

/// A PostgreSQL cluster in a temp dir, stopped on drop.
pub struct Postgres {
    pub dir: PathBuf,
    bin: PathBuf,
}

impl Postgres {
    /// initdb + start as the `postgres` user on 127.0.0.1:`port`, trust auth on loopback.
    pub fn start(dir: &Path, port: u16) -> Result<Postgres> {
        let bin = pg_bin()?;
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        run(Command::new("chown").args(["postgres:postgres"]).arg(dir))?;
        let data = dir.join("data");
        let as_pg = |prog: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
            c
        };
        run(as_pg("initdb")
            .args(["--auth=trust", "-U", "postgres", "-D"])
            .arg(&data)
            .stdout(Stdio::null()))?;
        run(as_pg("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .arg("-o")
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={}",
                dir.display()
            ))
            .args(["-w", "start"])
            .stdout(Stdio::null()))?;
        Ok(Postgres {
            dir: dir.to_path_buf(),
            bin,
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
    }
}

/// A cgroup we created, removed on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn create(rel: &str) -> Result<Cgroup> {
        let p = util::cgroup2_root()?.join(rel.trim_start_matches('/'));
        fs::create_dir_all(&p).with_context(|| format!("create cgroup {}", p.display()))?;
        Ok(Cgroup(p))
    }
    /// A shell prefix that moves the shell into this cgroup, then execs the rest.
    pub fn wrap(&self, user: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec runuser -u {user} -- \"$@\"",
                self.0.display()
            ))
            .arg("sh")
            .args(argv);
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// The agent process, SIGTERMed on drop.
pub struct AgentProc {
    pub child: Child,
}

impl AgentProc {
    pub fn start(bin: &Path, policy: &Path, log: &Path, env: &[(&str, &str)]) -> Result<AgentProc> {
        let logf = fs::File::create(log)?;
        let child = Command::new(bin)
            .args(["run", "--policy"])
            .arg(policy)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(AgentProc { child })
    }

    /// Wait until `addr` accepts (the metrics endpoint is bound after the data path is up).
    pub fn wait_ready(&mut self, addr: &str, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "agent exited ({st}):\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            sleep(Duration::from_millis(50));
        }
        bail!(
            "agent not ready after 20 s:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        )
    }

    pub fn stop(&mut self) {
        util::kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// GET a URL on loopback with a raw HTTP/1.0 request (no client dependency needed).
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

pub fn demo() -> Result<()> {
    if !util::is_root() {
        bail!("the demo loads eBPF programs and creates cgroups: run it as root");
    }
    let root = util::root();
    let bin = root.join("target/debug/tollgate");
    let policy = root.join("policy/examples/quickstart.toml");
    let work = Path::new(WORK);
    let _ = fs::remove_dir_all(work.join("data"));
    fs::create_dir_all(work)?;

    println!("\n== 1. A throwaway PostgreSQL on 127.0.0.1:{PG_PORT}");
    let _pg = Postgres::start(&work.join("pg"), PG_PORT)?;
    println!("   started (trust auth on loopback; this demo shows the connection-level gate)");

    println!("\n== 2. The agent, with policy/examples/quickstart.toml");
    run(Command::new(&bin).arg("check-policy").arg(&policy))?;
    let log = work.join("agent.log");
    let mut agent = AgentProc::start(&bin, &policy, &log, &[])?;
    agent.wait_ready("127.0.0.1:9464", &log)?;
    println!("   running: every connect to 127.0.0.1:{PG_PORT} on this host now goes through it");

    let ci = Cgroup::create("tollgate-demo/ci-bot")?;
    let batch = Cgroup::create("tollgate-demo/batch")?;
    let psql = |cg: &Cgroup, who: &str| -> Result<(bool, String)> {
        let o = cg
            .wrap(
                "nobody",
                &[
                    "psql",
                    &format!(
                        "postgresql://postgres@127.0.0.1:{PG_PORT}/postgres?connect_timeout=5"
                    ),
                    "-XAtc",
                    &format!("select 'hello from ' || '{who}', inet_server_port()"),
                ],
            )
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok((o.status.success(), text.trim().to_string()))
    };

    println!("\n== 3. ci-bot (cgroup /tollgate-demo/ci-bot, user nobody) runs psql, unchanged");
    let (ok1, out1) = psql(&ci, "ci-bot")?;
    println!(
        "   $ psql postgresql://postgres@127.0.0.1:{PG_PORT}/postgres -c \"select ...\"\n   {out1}"
    );
    println!(
        "   -> {}",
        if ok1 {
            "allowed"
        } else {
            "UNEXPECTEDLY REFUSED"
        }
    );

    println!("\n== 4. batch-job (cgroup /tollgate-demo/batch) runs the very same command");
    let (ok2, out2) = psql(&batch, "batch-job")?;
    println!("   {out2}");
    println!(
        "   -> {}",
        if ok2 {
            "UNEXPECTEDLY ALLOWED"
        } else {
            "denied: no rule lets batch-job reach orders-db"
        }
    );

    println!("\n== 5. The audit log ({}/data/audit.jsonl)", WORK);
    let audit = fs::read_to_string(work.join("data/audit.jsonl")).unwrap_or_default();
    for line in audit.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if v["event"] == "connect" || v["event"] == "close" {
            println!(
                "   {} {:7} identity={} target={} action={} rule={} pid={} uid={} cgroup={} exe={}{}",
                v["ts"].as_str().unwrap_or(""),
                v["event"].as_str().unwrap_or(""),
                v["identity"].as_str().unwrap_or("unknown"),
                v["target"].as_str().unwrap_or("-"),
                v["action"].as_str().unwrap_or("-"),
                v["rule"].as_str().map(|r| format!("{r:?}")).unwrap_or("-".into()),
                v["pid"],
                v["uid"],
                v["cgroup"].as_str().unwrap_or(""),
                v["exe"].as_str().unwrap_or("?"),
                if v["event"] == "close" { format!(" bytes_up={} bytes_down={}", v["bytes_up"], v["bytes_down"]) } else { String::new() },
            );
        }
    }

    println!("\n== 6. Prometheus metrics (http://127.0.0.1:9464/metrics)");
    let metrics = http_get("127.0.0.1:9464", "/metrics")?;
    for l in metrics.lines().filter(|l| {
        l.starts_with("tollgate_decisions_total")
            || l.starts_with("tollgate_redirects_total")
            || l.starts_with("tollgate_sessions_active")
    }) {
        println!("   {l}");
    }

    println!("\n== 7. Fail closed: stop the agent, then try again as ci-bot");
    agent.stop();
    let (ok3, out3) = psql(&ci, "ci-bot")?;
    println!("   {out3}");
    println!(
        "   -> {}",
        if ok3 {
            "UNEXPECTEDLY REACHED THE DATABASE"
        } else {
            "refused: the pinned programs still redirect to the (absent) agent"
        }
    );
    run(Command::new(&bin)
        .args(["uninstall", "--policy"])
        .arg(&policy))?;
    let (ok4, _) = psql(&ci, "ci-bot")?;
    println!(
        "   after `tollgate uninstall`: {}",
        if ok4 {
            "direct access restored"
        } else {
            "STILL REFUSED"
        }
    );

    drop(ci);
    drop(batch);
    if !ok1 || ok2 || ok3 || !ok4 {
        bail!("the demo did not behave as described above");
    }
    println!("\nDemo complete. Audit log kept at {WORK}/data/audit.jsonl.");
    Ok(())
}
