//! `tg-probe`: the "bot" of the end-to-end tests. It opens one TCP connection the way any
//! workload would, optionally pushes a deterministic payload through it and reads what comes
//! back, then prints exactly one JSON line with what it saw (the last line on stdout):
//!
//! ```text
//! {"connected":true,"error":null,"errno":null,"reset":false,"peer":"127.0.0.1:20001",
//!  "local":"127.0.0.1:43122","pid":123,"uid":65534,"cap_eff":"0000000000000000",
//!  "sent_bytes":1048576,"sent_sha256":"..","recv_bytes":1048576,"recv_sha256":"..",
//!  "echo_ok":true}
//! ```
//!
//! Usage: `tg-probe --connect ADDR [--v6-socket] [--mptcp] [--fastopen] [--send-bytes N] [--expect-echo]
//! [--hold-ms N | --hold-stdin] [--fork-exec "PATH ARG.."] [--timeout-ms N]`, or
//! `tg-probe --listen ADDR [--timeout-ms N]`
//!
//! - `--v6-socket`: use an AF_INET6 socket; an IPv4 `ADDR` becomes `::ffff:a.b.c.d`.
//! - `--mptcp`: open the socket with `IPPROTO_MPTCP` (262) instead of TCP, as an MPTCP-enabled
//!   client (or `mptcpize`) does.
//! - `--fastopen`: connect with `sendto(MSG_FASTOPEN)` (TCP Fast Open, no payload in the SYN)
//!   instead of `connect()`: another kernel path into the same connect hooks.
//! - `--expect-echo`: read back each chunk before going on; `echo_ok` says whether the bytes
//!   that came back are exactly the bytes sent.
//! - `--hold-ms N` / `--hold-stdin`: send the first half, (read its echo,) print a
//!   `{"held":true,...}` line, then wait N ms or until stdin reaches EOF before sending the
//!   second half. This keeps a relay open while a test changes something around it.
//! - `--fork-exec "PATH ARG.."`: right after connecting, fork; the child carries on with the
//!   connection (and prints the report), while the process that called `connect()` execs
//!   `PATH ARG..`. This is how a bot would dress up as another executable after the kernel
//!   recorded its pid, to test that the agent's exe attribution is not read too late.
//! - `--listen ADDR`: the other side, for a bot that tries to serve on a port it should not
//!   get: print `{"listening":bool,...}`, accept one connection within the timeout, read what
//!   it sends for up to a second, and print `{"accepted":bool,"peer":..,"recv_bytes":..}`.
//!
//! The exit status is 0 whenever the JSON line was printed (the test judges it), 2 on usage
//! errors.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV6, TcpStream},
    time::Duration,
};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};

struct Args {
    connect: SocketAddr,
    listen: Option<SocketAddr>,
    fork_exec: Option<Vec<String>>,
    v6_socket: bool,
    mptcp: bool,
    fastopen: bool,
    send_bytes: usize,
    expect_echo: bool,
    hold_ms: Option<u64>,
    hold_stdin: bool,
    timeout: Duration,
}

fn usage(msg: &str) -> ! {
    eprintln!("tg-probe: {msg}");
    eprintln!(
        "usage: tg-probe --connect ADDR [--v6-socket] [--mptcp] [--fastopen] [--send-bytes N] [--expect-echo] \
         [--hold-ms N | --hold-stdin] [--timeout-ms N]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut connect = None;
    let mut a = Args {
        connect: SocketAddr::from(([127, 0, 0, 1], 0)),
        listen: None,
        fork_exec: None,
        v6_socket: false,
        mptcp: false,
        fastopen: false,
        send_bytes: 0,
        expect_echo: false,
        hold_ms: None,
        hold_stdin: false,
        timeout: Duration::from_secs(10),
    };
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--connect" => {
                let v = value("--connect");
                connect = Some(
                    v.parse::<SocketAddr>()
                        .unwrap_or_else(|e| usage(&format!("bad address {v}: {e}"))),
                );
            }
            "--listen" => {
                let v = value("--listen");
                a.listen = Some(
                    v.parse::<SocketAddr>()
                        .unwrap_or_else(|e| usage(&format!("bad address {v}: {e}"))),
                );
            }
            "--fork-exec" => {
                let v = value("--fork-exec");
                let argv: Vec<String> = v.split_whitespace().map(str::to_string).collect();
                if argv.is_empty() {
                    usage("--fork-exec needs a command");
                }
                a.fork_exec = Some(argv);
            }
            "--v6-socket" => a.v6_socket = true,
            "--mptcp" => a.mptcp = true,
            "--fastopen" => a.fastopen = true,
            "--send-bytes" => {
                a.send_bytes = value("--send-bytes")
                    .parse()
                    .unwrap_or_else(|e| usage(&format!("bad --send-bytes: {e}")));
            }
            "--expect-echo" => a.expect_echo = true,
            "--hold-ms" => {
                a.hold_ms = Some(
                    value("--hold-ms")
                        .parse()
                        .unwrap_or_else(|e| usage(&format!("bad --hold-ms: {e}"))),
                );
            }
            "--hold-stdin" => a.hold_stdin = true,
            "--timeout-ms" => {
                let ms: u64 = value("--timeout-ms")
                    .parse()
                    .unwrap_or_else(|e| usage(&format!("bad --timeout-ms: {e}")));
                a.timeout = Duration::from_millis(ms.max(1));
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    match (connect, a.listen) {
        (Some(c), None) => a.connect = c,
        (None, Some(_)) => {}
        _ => usage("exactly one of --connect and --listen is required"),
    }
    a
}

/// The payload for `n` bytes: deterministic (xorshift), so a test can recompute its digest.
fn payload(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ n as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// This process's effective capability mask, as /proc shows it (hex).
fn cap_eff() -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What went wrong first, if anything, and whether any operation saw a reset.
#[derive(Default)]
struct Outcome {
    error: Option<String>,
    errno: Option<i32>,
    reset: bool,
}

impl Outcome {
    fn fail(&mut self, what: &str, e: &std::io::Error) {
        // The kernel reports a received RST once, to whichever call comes first (the writer
        // thread or the reader); the other then sees EPIPE or a plain EOF. So a reset counts
        // wherever it showed up, not only in the first error.
        if matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE)) {
            self.reset = true;
        }
        if self.error.is_none() {
            self.error = Some(format!("{what}: {e}"));
            self.errno = e.raw_os_error();
        }
    }
    fn failed(&self) -> bool {
        self.error.is_some()
    }
    fn reset(&self) -> bool {
        self.reset
    }
}

struct Conn {
    stream: TcpStream,
    recv: Sha256,
    recv_bytes: u64,
}

impl Conn {
    /// Send `chunk` from a second thread while this one reads `want` bytes back (0: none), so
    /// a large echo never deadlocks on full socket buffers.
    fn exchange(&mut self, chunk: &[u8], want: usize, out: &mut Outcome) {
        let writer = match self.stream.try_clone() {
            Ok(s) => s,
            Err(e) => return out.fail("dup socket", &e),
        };
        let data = chunk.to_vec();
        let w = std::thread::spawn(move || {
            let mut s = writer;
            s.write_all(&data)
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while got < want {
            let room = (want - got).min(buf.len());
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    out.fail(
                        "read",
                        &std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("EOF after {got} of {want} echoed bytes"),
                        ),
                    );
                    break;
                }
                Ok(n) => {
                    self.recv.update(&buf[..n]);
                    self.recv_bytes += n as u64;
                    got += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    out.fail("read", &e);
                    break;
                }
            }
        }
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => out.fail("write", &e),
            Err(_) => out.fail("write", &std::io::Error::other("writer thread panicked")),
        }
    }

    /// Half-close, then read whatever is left until EOF.
    fn finish(&mut self, out: &mut Outcome) {
        if let Err(e) = self.stream.shutdown(Shutdown::Write) {
            if e.kind() != std::io::ErrorKind::NotConnected {
                out.fail("shutdown", &e);
            }
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.recv.update(&buf[..n]);
                    self.recv_bytes += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    out.fail("read", &e);
                    break;
                }
            }
        }
    }
}

fn print(v: &Value) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
    let _ = o.flush();
}

/// `--fork-exec`: the caller of `connect()` becomes `argv`; the forked child returns and keeps
/// the connection. Called while the process is still single-threaded.
fn fork_exec(argv: &[String]) {
    let cargs: Vec<std::ffi::CString> = argv
        .iter()
        .map(|s| std::ffi::CString::new(s.as_str()).unwrap_or_else(|_| usage("NUL in --fork-exec")))
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: no other thread exists yet, so the child may carry on with normal Rust code;
    // the parent only calls execv (and _exit if that fails) on data prepared before the fork.
    match unsafe { libc::fork() } {
        0 => {}
        pid if pid > 0 => unsafe {
            libc::execv(ptrs[0], ptrs.as_ptr());
            libc::_exit(127);
        },
        _ => {
            eprintln!("tg-probe: fork: {}", std::io::Error::last_os_error());
            std::process::exit(2);
        }
    }
}

/// `--listen`: bind, accept one connection, report what arrived.
fn listen(addr: SocketAddr, timeout: Duration) {
    let l = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            return print(&json!({
                "listening": false, "addr": addr.to_string(), "pid": std::process::id(),
                "error": format!("bind: {e}"), "errno": e.raw_os_error(),
            }))
        }
    };
    print(&json!({"listening": true, "addr": addr.to_string(), "pid": std::process::id()}));
    let _ = l.set_nonblocking(true);
    let deadline = std::time::Instant::now() + timeout;
    let (mut s, peer) = loop {
        match l.accept() {
            Ok(x) => break x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return print(&json!({"accepted": false, "recv_bytes": 0}));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return print(&json!({"accepted": false, "error": format!("accept: {e}")})),
        }
    };
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut got = 0usize;
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    print(&json!({"accepted": true, "peer": peer.to_string(), "recv_bytes": got}));
}

fn main() {
    let a = parse_args();
    if let Some(addr) = a.listen {
        return listen(addr, a.timeout);
    }
    let target = match (a.connect, a.v6_socket) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (t, _) => t,
    };
    let data = payload(a.send_bytes);
    let sent_sha = hex(&Sha256::digest(&data));
    let base = |connected: bool| {
        json!({
            "connected": connected,
            "target": target.to_string(),
            "pid": std::process::id(),
            // SAFETY: getuid cannot fail and touches no memory.
            "uid": unsafe { libc::getuid() },
            "cap_eff": cap_eff(),
            "sent_bytes": a.send_bytes,
            "sent_sha256": sent_sha,
            "mptcp": a.mptcp,
        })
    };
    let mut out = Outcome::default();

    let sock = match Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(if a.mptcp {
            Protocol::MPTCP
        } else {
            Protocol::TCP
        }),
    ) {
        Ok(s) => s,
        Err(e) => {
            out.fail("socket", &e);
            return report(base(false), &out, None, None);
        }
    };
    if target.is_ipv6() {
        // Needed for ::ffff:a.b.c.d; Linux defaults to dual-stack, but say so.
        let _ = sock.set_only_v6(false);
    }
    // A blocking connect bounded by SO_SNDTIMEO: it reports the handshake itself, so a
    // connection the agent accepts and then resets still counts as connected (the reset shows
    // up on the first read or write), while a refused one fails here.
    let _ = sock.set_write_timeout(Some(a.timeout));
    let connected = if a.fastopen {
        sock.send_to_with_flags(&[], &target.into(), libc::MSG_FASTOPEN)
            .map(|_| ())
    } else {
        sock.connect(&target.into())
    };
    if let Err(e) = connected {
        out.fail("connect", &e);
        return report(base(false), &out, None, None);
    }
    if let Some(argv) = &a.fork_exec {
        fork_exec(argv);
    }
    let stream: TcpStream = sock.into();
    let _ = stream.set_read_timeout(Some(a.timeout));
    let _ = stream.set_write_timeout(Some(a.timeout));
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|p| p.to_string()).ok();
    let local = stream.local_addr().map(|p| p.to_string()).ok();
    let mut conn = Conn {
        stream,
        recv: Sha256::new(),
        recv_bytes: 0,
    };

    let hold = a.hold_ms.is_some() || a.hold_stdin;
    let split = if hold { data.len() / 2 } else { data.len() };
    let (first, second) = data.split_at(split);
    let want = |c: &[u8]| if a.expect_echo { c.len() } else { 0 };
    conn.exchange(first, want(first), &mut out);
    if hold && !out.failed() {
        let mut v = base(true);
        v["held"] = json!(true);
        v["peer"] = json!(peer);
        v["local"] = json!(local);
        v["recv_bytes"] = json!(conn.recv_bytes);
        print(&v);
        if let Some(ms) = a.hold_ms {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if a.hold_stdin {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        }
    }
    if !out.failed() && !second.is_empty() {
        conn.exchange(second, want(second), &mut out);
    }
    if !out.failed() {
        conn.finish(&mut out);
    }
    let mut v = base(true);
    v["recv_bytes"] = json!(conn.recv_bytes);
    v["recv_sha256"] = json!(hex(&conn.recv.finalize()));
    v["echo_ok"] = json!(!out.failed() && a.expect_echo && v["recv_sha256"] == v["sent_sha256"]);
    report(v, &out, peer, local)
}

fn report(mut v: Value, out: &Outcome, peer: Option<String>, local: Option<String>) {
    v["error"] = json!(out.error);
    v["errno"] = json!(out.errno);
    v["reset"] = json!(out.reset());
    v["peer"] = json!(peer);
    v["local"] = json!(local);
    if v.get("recv_bytes").is_none() {
        v["recv_bytes"] = json!(0);
    }
    print(&v);
}
