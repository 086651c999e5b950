//! `cargo xtask bench`: side-by-side figures from one run on this machine. Not a test: it never
//! fails on slow numbers, only on broken setups.
//!
//! 1. connect() latency to an *unprotected* port with tollgate's programs detached vs attached;
//! 2. connect + first byte to a protected port through the agent vs the same server directly;
//! 3. 1 GiB relay throughput through the agent (splice relay, and the userspace copy relay as
//!    the bare-relay baseline) vs direct.

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    thread,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    demo::{AgentProc, Cgroup},
    util,
};

const WORK: &str = "/tmp/tollgate-bench";
const GIB: u64 = 1 << 30;

/// Echo one byte exchange per connection; also used as the plain accept-and-close server.
fn echo_server(l: TcpListener) {
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut s = s;
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Read to EOF, answer with the byte count.
fn sink_server(l: TcpListener) {
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut s = s;
                let mut b = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes());
            });
        }
    });
}

fn bind() -> Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0")?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median microseconds of `n` plain connects.
fn connect_us(port: u16, n: usize) -> Result<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect(("127.0.0.1", port))?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
        drop(s);
    }
    Ok(median(&mut v))
}

/// Median microseconds of connect + 1-byte round trip.
fn first_byte_us(port: u16, n: usize) -> Result<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .context("no echo (is the agent allowing the bench identity?)")?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(&mut v))
}

/// Seconds to push 1 GiB and get the sink's count back.
fn gib_secs(port: u16) -> Result<f64> {
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    for _ in 0..(GIB >> 20) {
        s.write_all(&buf)?;
    }
    s.shutdown(Shutdown::Write)?;
    let mut c = [0u8; 8];
    s.read_exact(&mut c)?;
    let secs = t.elapsed().as_secs_f64();
    if u64::from_be_bytes(c) != GIB {
        bail!(
            "sink received {} bytes, expected {GIB}",
            u64::from_be_bytes(c)
        );
    }
    Ok(secs)
}

fn policy(echo: u16, sink: u16, listen: u16, metrics: u16) -> String {
    format!(
        r#"[agent]
listen = ["127.0.0.1:{listen}", "[::1]:{listen}"]
metrics = "127.0.0.1:{metrics}"
admin = "off"
data_dir = "{WORK}/data"
bpf_pin_path = "/sys/fs/bpf/tollgate-bench"
fail_mode = "open"

[[identity]]
name = "bench"
cgroup = "/tollgate-bench*"

[[target]]
name = "echo"
protocol = "tcp"
address = ["127.0.0.1:{echo}"]

[[target]]
name = "sink"
protocol = "tcp"
address = ["127.0.0.1:{sink}"]

[[rule]]
name = "bench may connect"
identities = ["bench"]
targets = ["echo", "sink"]
action = "allow"
"#
    )
}

struct Joined(std::path::PathBuf);
impl Drop for Joined {
    fn drop(&mut self) {
        // Move back to the root cgroup so ours can be removed.
        if let Some(root) = self.0.parent() {
            let _ = fs::write(root.join("cgroup.procs"), std::process::id().to_string());
        }
    }
}

pub fn bench(only: Option<&str>) -> Result<()> {
    let want = |part: &str| only.is_none_or(|o| o == part);
    if !util::is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    let root = util::root();
    let bin = root.join("target/release/tollgate");
    let work = Path::new(WORK);
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work)?;

    let (echo_p, echo_d, sink_p, sink_d) = (bind()?, bind()?, bind()?, bind()?);
    let ports =
        [&echo_p, &echo_d, &sink_p, &sink_d].map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0));
    let [echo_prot, echo_direct, sink_prot, sink_direct] = ports;
    echo_server(echo_p);
    echo_server(echo_d);
    sink_server(sink_p);
    sink_server(sink_d);
    let (listen, metrics) = {
        let (a, b) = (bind()?, bind()?);
        (a.local_addr()?.port(), b.local_addr()?.port())
    };
    let pol = work.join("bench.toml");
    fs::write(&pol, policy(echo_prot, sink_prot, listen, metrics))?;

    // This process becomes the "bot": its sockets are attributed to the bench cgroup.
    let cg = Cgroup::create("tollgate-bench")?;
    fs::write(cg.0.join("cgroup.procs"), std::process::id().to_string())?;
    let joined = Joined(cg.0.clone());
    let log = work.join("agent.log");
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let start = |env: &[(&str, &str)]| -> Result<AgentProc> {
        let mut a = AgentProc::start(&bin, &pol, &log, env)?;
        a.wait_ready(&metrics_addr, &log)?;
        Ok(a)
    };

    println!("tollgate bench: one run, 2-core machine, loopback; medians. Ratios > 1 mean slower/faster as labelled.\n");

    // 1. Unprotected connect latency, detached vs attached, interleaved to spread the noise.
    let n = 3000;
    let (mut det, mut att) = (Vec::new(), Vec::new());
    for _ in 0..(if want("connect") { 3 } else { 0 }) {
        det.push(connect_us(echo_direct, n)?);
        let mut a = start(&[])?;
        att.push(connect_us(echo_direct, n)?);
        a.stop();
    }
    if want("connect") {
        let (d, a) = (median(&mut det), median(&mut att));
        println!("1. connect() to an unprotected port ({n} connects x3 rounds each)");
        println!("   programs detached {d:>8.2} us   attached {a:>8.2} us   difference {:+.2} us (goal < 1 us)\n", a - d);
    }

    // 2 + 3 with the splice relay.
    let mut agent = start(&[])?;
    if want("first-byte") {
        let m = 2000;
        let direct_fb = first_byte_us(echo_direct, m)?;
        let agent_fb = first_byte_us(echo_prot, m)?;
        println!("2. connect + first byte ({m} connections)");
        println!("   direct {direct_fb:>8.1} us   through tollgate {agent_fb:>8.1} us   ratio {:.2}x direct\n", agent_fb / direct_fb);
    }
    if !want("throughput") {
        agent.stop();
        drop(joined);
        drop(cg);
        let _ = fs::remove_dir_all(work);
        return Ok(());
    }

    let mut direct_t = Vec::new();
    let mut splice_t = Vec::new();
    for _ in 0..3 {
        direct_t.push(gib_secs(sink_direct)?);
        splice_t.push(gib_secs(sink_prot)?);
    }
    agent.stop();
    let mut copy = start(&[("TOLLGATE_RELAY", "copy")])?;
    let mut copy_t = Vec::new();
    for _ in 0..3 {
        copy_t.push(gib_secs(sink_prot)?);
    }
    copy.stop();
    let gbps = |s: f64| (GIB as f64 / s) / 1e9;
    let (dt, st, ct) = (
        median(&mut direct_t),
        median(&mut splice_t),
        median(&mut copy_t),
    );
    println!("3. 1 GiB relay throughput (median of 3)");
    println!("   direct                 {:>6.2} GB/s", gbps(dt));
    println!(
        "   tollgate, splice relay {:>6.2} GB/s   {:.2}x direct (goal >= 0.8x)",
        gbps(st),
        dt / st
    );
    println!(
        "   tollgate, copy relay   {:>6.2} GB/s   {:.2}x direct (bare userspace relay)",
        gbps(ct),
        dt / ct
    );

    drop(joined);
    drop(cg);
    let _ = fs::remove_dir_all(work);
    Ok(())
}
