//! `cargo xtask bench http`: the HTTPS handler against the same upstream directly and against
//! nginx configured as the same TLS-terminating, re-encrypting reverse proxy (verifying the
//! upstream, keep-alive upstream connections, adding an `Authorization` header), in one run of
//! interleaved rounds (the columns' order rotates every round, so a drift of the machine over
//! time falls on all of them alike). Figures: `wrk` requests per second and p50/p99 latency for
//! a small answer over keep-alive connections, a 1 GiB download, the agent's CPU time per
//! request, and the agent's memory per idle keep-alive connection (heap in use). A second nginx
//! proxy writes a buffered access log line per request, as tollgate writes an audit line, and
//! is measured in the same rounds as a fourth column.
//!
//! The upstream is nginx serving static files over TLS on loopback (a certificate from a
//! throwaway CA made with `openssl`); the bench process and its clients join the bench
//! identity's cgroup for the agent's column. Clients do not verify the certificate they get
//! (`wrk` never does, `curl -k`): every column still does a full TLS handshake and encryption.
//! Never fails on slow numbers, only on broken setups.

use std::{
    fs,
    io::Write as _,
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench_pg::{self, free_port, held_session_memory, Held, InBenchCgroup, HEAP_STATS},
    demo::AgentProc,
    util::{self, median, run},
};

const WORK: &str = "/tmp/tollgate-bench-http";
/// The download (a sparse file: no disk used; nginx sends it as is, nothing compresses it).
const DOWNLOAD_MIB: u64 = 1024;
/// Rounds of every measurement; each figure is the median over them.
const ROUNDS: usize = 3;
/// `wrk` duration per round and column.
const WRK_SECS: u32 = 5;
/// `wrk` keep-alive connections.
const CONNS: usize = 32;
/// `wrk` duration per round and column with a new connection per request.
const FRESH_SECS: u32 = 2;
/// `wrk` connections (each one request, then closed) for that figure.
const FRESH_CONNS: usize = 8;
/// Idle keep-alive connections held for the memory figure.
const IDLE: usize = 50;
/// The small answer.
const SMALL: &str = "{\"ok\":true,\"items\":[1,2,3],\"note\":\"a small JSON answer\"}\n";

/// One nginx (`daemon off`, so the child is the master), stopped on drop. Also the demo's
/// HTTPS target.
pub struct Nginx(Child);

impl Nginx {
    /// nginx with `server` (its `server { }` blocks) in `work/name`, on 127.0.0.1:`port`, with
    /// the certificate [`certificates`] made in `work/tls`.
    pub fn start(work: &Path, name: &str, server: &str, port: u16) -> Result<Nginx> {
        let prefix = work.join(name);
        fs::create_dir_all(&prefix)?;
        let p = prefix.display();
        let conf = format!(
            r#"daemon off;
worker_processes auto;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {w}/tls/server.crt;
    ssl_certificate_key {w}/tls/server.key;
{server}
}}
"#,
            w = work.display()
        );
        let path = prefix.join("nginx.conf");
        fs::write(&path, conf)?;
        let log = fs::File::create(prefix.join("stderr.log"))?;
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start nginx (cargo xtask setup installs it)")?;
        let mut n = Nginx(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if n.0.try_wait()?.is_some() || Instant::now() > deadline {
                bail!(
                    "nginx {name} did not start:\n{}",
                    fs::read_to_string(prefix.join("stderr.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(n)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        util::kill(self.0.id(), libc::SIGTERM);
        let _ = self.0.wait();
    }
}

/// A CA and a `localhost` server certificate it signs, in `work/tls`.
pub fn certificates(work: &Path) -> Result<()> {
    let tls = work.join("tls");
    fs::create_dir_all(&tls)?;
    let t = |f: &str| tls.join(f);
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=tollgate throwaway test CA", "-keyout"])
        .arg(t("ca.key"))
        .arg("-out")
        .arg(t("ca.crt"))
        .stderr(Stdio::null()))?;
    run(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(t("server.key"))
        .arg("-out")
        .arg(t("server.csr"))
        .stderr(Stdio::null()))?;
    fs::write(
        t("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(t("server.csr"))
        .arg("-CA")
        .arg(t("ca.crt"))
        .arg("-CAkey")
        .arg(t("ca.key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(t("ext.cnf"))
        .arg("-out")
        .arg(t("server.crt"))
        .stderr(Stdio::null()))?;
    Ok(())
}

fn policy(up: u16, listen: u16, metrics: u16) -> String {
    crate::bench::bench_agent_toml("tollgate-bench-http", WORK, listen, metrics)
        + &format!(
            r#"
[[target]]
name = "api"
protocol = "https"
address = ["127.0.0.1:{up}"]
credential = "api-token"
tls = {{ mode = "verify-full", ca_file = "{WORK}/tls/ca.crt", server_name = "localhost" }}

[credential.api-token]
token_file = "{WORK}/secrets/token"

[[rule]]
name = "bench reads"
identities = ["bench"]
targets = ["api"]
action = "allow"
http = {{ methods = ["GET"], paths = ["/*"] }}
"#
        )
}

/// One `wrk` run's figures.
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
}

/// `wrk`'s duration (`812.00us`, `1.23ms`, `2.00s`) in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

fn wrk(port: u16) -> Result<Wrk> {
    wrk_for(port, WRK_SECS)
}

fn wrk_for(port: u16, secs: u32) -> Result<Wrk> {
    wrk_with(port, secs, CONNS, &[])
}

/// `wrk` with `conns` connections and the extra arguments `extra`.
fn wrk_with(port: u16, secs: u32, conns: usize, extra: &[&str]) -> Result<Wrk> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s")])
        .args(extra)
        .arg("--latency")
        .arg(format!("https://127.0.0.1:{port}/small.json"))
        .stdin(Stdio::null())
        .output()
        .context("wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!(
            "wrk against port {port} failed or saw errors:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |key: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
    };
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    match (
        field("Requests/sec:").and_then(|v| v.parse().ok()),
        field("50%").and_then(wrk_ms),
        field("99%").and_then(wrk_ms),
        requests,
    ) {
        (Some(rps), Some(p50_ms), Some(p99_ms), Some(requests)) => Ok(Wrk {
            rps,
            p50_ms,
            p99_ms,
            requests,
        }),
        _ => bail!("cannot read wrk's output:\n{text}"),
    }
}

/// `curl -k` of the download through `port`: seconds; fails unless every byte arrived.
fn download(port: u16) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ])
        .arg(format!("https://127.0.0.1:{port}/big"))
        .stdin(Stdio::null())
        .output()
        .context("curl")?;
    let secs = t.elapsed().as_secs_f64();
    let got = String::from_utf8_lossy(&out.stdout).to_string();
    if got != format!("200 {}", DOWNLOAD_MIB << 20) {
        bail!(
            "download through port {port}: {got:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

/// A column's samples.
#[derive(Default)]
struct Samples {
    rps: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    down_s: Vec<f64>,
    /// Requests per second with a new connection (and TLS handshake) for each.
    fresh_rps: Vec<f64>,
    /// Proxy CPU microseconds per request.
    cpu_us: Vec<f64>,
    /// The proxy's system calls per request (all threads and processes), counted once.
    syscalls: Option<f64>,
}

/// With `TOLLGATE_BENCH_PERF=DIR`, the agent's (`proxy` marked `true`) profile into `DIR/name`
/// while the returned recorder lives, when `first`.
fn profile(
    proxy: Option<(u32, bool)>,
    first: bool,
    name: &str,
) -> Result<Option<util::PerfRecord>> {
    match (proxy, std::env::var_os("TOLLGATE_BENCH_PERF")) {
        (Some((pid, true)), Some(dir)) if first => Ok(Some(util::PerfRecord::start(
            pid,
            &Path::new(&dir).join(name),
        )?)),
        _ => Ok(None),
    }
}

/// One column's round: `wrk` (with the proxy's CPU per request when `proxy` is the pid of
/// the agent, or of nginx's master and its workers) and the download. With
/// `TOLLGATE_BENCH_PERF=DIR`, the agent's first `wrk` is profiled into `DIR/http.data`, and its
/// first run with a new connection per request into `DIR/http-fresh.data`.
fn measure(port: u16, s: &mut Samples, proxy: Option<(u32, bool)>) -> Result<()> {
    let before = proxy.map(|(pid, _)| util::tree_cpu_ms(pid));
    let _perf = profile(proxy, s.cpu_us.is_empty(), "http.data")?;
    let w = wrk(port)?;
    drop(_perf);
    if let (Some((pid, _)), Some(b)) = (proxy, before) {
        s.cpu_us
            .push((util::tree_cpu_ms(pid) - b) * 1000.0 / w.requests);
    }
    s.rps.push(w.rps);
    s.p50_ms.push(w.p50_ms);
    s.p99_ms.push(w.p99_ms);
    s.down_s.push(download(port)?);
    let _perf = profile(proxy, s.fresh_rps.is_empty(), "http-fresh.data")?;
    s.fresh_rps
        .push(wrk_with(port, FRESH_SECS, FRESH_CONNS, &["-H", "Connection: close"])?.rps);
    drop(_perf);
    if let (Some((pid, _)), None) = (proxy, s.syscalls) {
        let pids = util::with_children(pid);
        let mut requests = 0.0;
        // A figure for the table, not a reason to lose the run: a failed count is reported.
        match util::syscalls_during(&pids, || {
            requests = wrk_for(port, 2)?.requests;
            Ok(())
        }) {
            Ok(calls) => s.syscalls = Some(calls / requests),
            Err(e) => eprintln!("warning: system calls not counted: {e:#}"),
        }
    }
    Ok(())
}

/// `wrk` duration of the allocation count.
const ALLOC_SECS: u32 = 2;

/// The agent's heap allocations per keep-alive request (`tollgate_heap_allocations_total`,
/// an agent started with `TOLLGATE_HEAP_STATS=1`), over one `wrk` run after a warm-up run.
fn allocations_per_request(port: u16, metrics: &str) -> Result<f64> {
    let count = || -> Result<f64> {
        bench_pg::heap_metric(metrics, "tollgate_heap_allocations_total")?
            .context("the agent does not count its allocations (TOLLGATE_HEAP_STATS=1)")
    };
    wrk_for(port, 1)?;
    let before = count()?;
    let w = wrk_for(port, ALLOC_SECS)?;
    Ok((count()? - before) / w.requests)
}

/// Agent RSS growth per idle keep-alive connection: `IDLE` `openssl s_client` connections
/// that each made one request and then wait on their open stdin.
fn idle_connection_memory(port: u16, agent_pid: u32, metrics: &str) -> Result<Held> {
    held_session_memory(agent_pid, metrics, "https", IDLE, 5, || {
        let mut c = Command::new("openssl")
            .args(["s_client", "-quiet", "-no_ign_eof", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("openssl s_client")?;
        c.stdin
            .as_mut()
            .context("stdin")?
            .write_all(b"GET /small.json HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        Ok(c)
    })
}

pub fn bench_http() -> Result<()> {
    if !util::is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    let work = Path::new(WORK);
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work.join("www"))?;
    fs::create_dir_all(work.join("secrets"))?;
    let bin = util::bench_agent();
    certificates(work)?;
    fs::write(work.join("www/small.json"), SMALL)?;
    fs::File::create(work.join("www/big"))?.set_len(DOWNLOAD_MIB << 20)?;
    let token = work.join("secrets/token");
    fs::write(&token, "bench-token\n")?;
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600))?;

    let (up_port, proxy_port) = (free_port()?, free_port()?);
    let _upstream = Nginx::start(
        work,
        "upstream",
        &format!(
            r#"    server {{
        listen 127.0.0.1:{up_port} ssl;
        root {w}/www;
        default_type application/json;
    }}"#,
            w = work.display()
        ),
        up_port,
    )?;
    // nginx as the same reverse proxy; the second also writes an access log line per request
    // (buffered, as a busy nginx is set up), the counterpart of tollgate's audit line.
    let logged_port = free_port()?;
    let proxy_conf = |port: u16, log: &str| {
        format!(
            r#"    upstream api {{ server 127.0.0.1:{up_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        {log}
        location / {{
            proxy_pass https://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_set_header Authorization "Bearer bench-token";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {w}/tls/ca.crt;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_max_temp_file_size 0;
        }}
    }}"#,
            w = work.display()
        )
    };
    let proxy = Nginx::start(work, "proxy", &proxy_conf(proxy_port, ""), proxy_port)?;
    let logged = Nginx::start(
        work,
        "logged",
        &proxy_conf(
            logged_port,
            &format!(
                "access_log {}/logged/access.log combined buffer=64k flush=1s;",
                work.display()
            ),
        ),
        logged_port,
    )?;

    // TOLLGATE_BENCH_BASELINE: another build measured in the same rounds (a before/after).
    let baseline = std::env::var_os("TOLLGATE_BENCH_BASELINE").map(PathBuf::from);
    if let Some(b) = &baseline {
        println!("baseline agent binary: {}", b.display());
    }
    let start_agent = |bin: &Path, env: &[(&str, &str)]| -> Result<(AgentProc, String)> {
        let (listen, metrics) = (free_port()?, free_port()?);
        let pol = work.join("policy.toml");
        fs::write(&pol, policy(up_port, listen, metrics))?;
        let log = work.join("agent.log");
        let mut agent = AgentProc::start(bin, &pol, &log, env)?;
        let metrics = format!("127.0.0.1:{metrics}");
        agent.wait_ready(&metrics, &log)?;
        Ok((agent, metrics))
    };

    // Columns: direct, tollgate, nginx, nginx with its access log, and the baseline build
    // when there is one.
    let mut cols: [Samples; 5] = Default::default();
    let ncols = if baseline.is_some() { 5 } else { 4 };
    let mut idle = None;
    let rounds = util::rounds(ROUNDS);
    for round in 0..rounds {
        for k in 0..ncols {
            match (round + k) % ncols {
                0 => measure(up_port, &mut cols[0], None)?,
                2 => measure(proxy_port, &mut cols[2], Some((proxy.0.id(), false)))?,
                3 => measure(logged_port, &mut cols[3], Some((logged.0.id(), false)))?,
                col => {
                    let _cg = InBenchCgroup::enter("tollgate-bench-http")?;
                    if idle.is_none() && col == 1 {
                        // On an agent of its own, before the load has grown its heap.
                        let (mut agent, metrics) = start_agent(&bin, &[HEAP_STATS])?;
                        let held = idle_connection_memory(up_port, agent.child.id(), &metrics)?;
                        idle = Some((held, allocations_per_request(up_port, &metrics)?));
                        agent.stop();
                    }
                    let b = if col == 1 {
                        &bin
                    } else {
                        baseline.as_ref().unwrap_or(&bin)
                    };
                    let (mut agent, _) = start_agent(b, &[])?;
                    measure(up_port, &mut cols[col], Some((agent.child.id(), col == 1)))?;
                    agent.stop();
                }
            }
        }
    }
    drop(proxy);
    drop(logged);
    drop(_upstream);
    let _ = fs::remove_dir_all(work);

    let med = |v: &[f64]| median(&mut v.to_vec());
    let [d, a, n, logged, base] = &cols;
    println!(
        "\nhttps through tollgate vs the same nginx upstream directly and through nginx as a re-encrypting reverse proxy,\nmedian of {rounds} interleaved rounds on this machine (2 cores shared by wrk, proxy and upstream)\n"
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "direct", "tollgate", "nginx", "tg/nginx", "tg/direct"
    );
    let row = |name: &str, x: f64, y: f64, z: f64, higher_better: bool| {
        let (rn, rd) = if higher_better {
            (y / z, y / x)
        } else {
            (z / y, x / y)
        };
        println!("{name:<40} {x:>10.2} {y:>10.2} {z:>10.2} {rn:>9.2}x {rd:>9.2}x");
    };
    row(
        &format!("requests/s ({CONNS} keep-alive conns)"),
        med(&d.rps),
        med(&a.rps),
        med(&n.rps),
        true,
    );
    row(
        "p50 latency (ms)",
        med(&d.p50_ms),
        med(&a.p50_ms),
        med(&n.p50_ms),
        false,
    );
    row(
        "p99 latency (ms)",
        med(&d.p99_ms),
        med(&a.p99_ms),
        med(&n.p99_ms),
        false,
    );
    let mbps = |v: &[f64]| DOWNLOAD_MIB as f64 / med(v);
    row(
        &format!("{DOWNLOAD_MIB} MiB download (MiB/s)"),
        mbps(&d.down_s),
        mbps(&a.down_s),
        mbps(&n.down_s),
        true,
    );
    row(
        &format!("requests/s, new connection for each ({FRESH_CONNS})"),
        med(&d.fresh_rps),
        med(&a.fresh_rps),
        med(&n.fresh_rps),
        true,
    );
    println!("(latency ratios are inverted: above 1.0x means tollgate is faster)");
    println!("\neach round (requests/s direct, tollgate, nginx):");
    for k in 0..rounds {
        println!(
            "  round {k}: {:.0}  {:.0}  {:.0}",
            d.rps[k], a.rps[k], n.rps[k]
        );
    }
    println!(
        "\nproxy CPU per request (user + system, all threads and processes): tollgate {:.1} us, nginx {:.1} us ({:.2}x)",
        med(&a.cpu_us),
        med(&n.cpu_us),
        med(&a.cpu_us) / med(&n.cpu_us)
    );
    // Each round's ratio of tollgate's figure to another column's.
    let per_round = |x: &[f64], y: &[f64]| {
        (0..rounds)
            .map(|k| format!("{:.2}", x[k] / y[k]))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "nginx with a buffered access log (a line per request, as tollgate's audit): {:.0} requests/s (tollgate/that {:.2}x; per round {}), CPU per request {:.1} us (tollgate/that {:.2}x)",
        med(&logged.rps),
        med(&a.rps) / med(&logged.rps),
        per_round(&a.rps, &logged.rps),
        med(&logged.cpu_us),
        med(&a.cpu_us) / med(&logged.cpu_us),
    );
    if baseline.is_some() {
        println!(
            "baseline build: {:.0} requests/s (tollgate/baseline {:.2}x; per round {}), CPU per request {:.1} us (tollgate/baseline {:.2}x; per round {})",
            med(&base.rps),
            med(&a.rps) / med(&base.rps),
            per_round(&a.rps, &base.rps),
            med(&base.cpu_us),
            med(&a.cpu_us) / med(&base.cpu_us),
            per_round(&a.cpu_us, &base.cpu_us),
        );
    }
    println!(
        "proxy system calls per request (strace -c -f, one 2 s wrk run; strace slows it): tollgate {:.2}, nginx {:.2}",
        a.syscalls.unwrap_or(f64::NAN),
        n.syscalls.unwrap_or(f64::NAN)
    );
    if let Some((per, allocations)) = idle {
        println!(
            "idle https connection memory over {IDLE} idle keep-alive connections after one request, each with its upstream connection: {}",
            per.describe("connection")
        );
        println!(
            "agent heap allocations per request (keep-alive, {CONNS} connections, one {ALLOC_SECS} s wrk run): {allocations:.1}"
        );
    }
    println!("\ngoals: requests/s >= 1.0x nginx and >= 0.5x direct");
    Ok(())
}
