//! A bot that moves very large values over the PostgreSQL protocol without holding them: it
//! writes a generated value into a Bind in pieces and hashes the values of result rows as they
//! arrive, so a 500 MB bytea costs it a few MB of memory, not several copies.
//!
//! Usage: `tg-pglarge HOST PORT STEP...`, each STEP one argument, run in order on one session
//! (startup as `user=bot database=app`, any password request answered with a wrong password):
//! - `q:SQL`: a simple query.
//! - `insert:ID:SIZE:SEED:FORMAT`: `INSERT INTO big VALUES ($1, $2)` with the generated value
//!   of SIZE bytes (seed SEED) as `$2`, in FORMAT (0: text, `\x` hex; 1: binary).
//! - `fetch:FORMAT:SQL`: the extended protocol with results in FORMAT (0 or 1).
//! - `expect:SIZE:SEED`: print the SHA-256 of the generated value (HOST `-`: no server).
//! - `toolong:LEN`: a Bind whose length field is LEN (beyond PostgreSQL's limit), then wait for
//!   what the server says.
//! - `longsql:SIZE`: a simple query of SIZE bytes of SQL text.
//! - `copyin:ID:SIZE:SEED`: `COPY big FROM STDIN` with the generated value in one CopyData.
//!   (`q:COPY ... TO STDOUT` hashes each CopyData as it streams in, into `values`.)
//!
//! Prints one JSON object per step: `errors` (`SQLSTATE: message`, with `FATAL ` in front of a
//! fatal one), `values` (per DataRow value: `{text}` up to 256 bytes, else `{len, wire_len,
//! sha256}` of its bytes, text-format `\x` hex decoded first, so text and binary results
//! compare), `closed` (the connection ended).

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// The generated value: xorshift64* bytes, so it is incompressible (TOAST stores it as is)
/// and reproducible from its seed.
struct Gen(u64);

impl Gen {
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Calls `f` with the generated value in pieces (of 1 MiB, a multiple of 8).
fn generate(size: u64, seed: u64, mut f: impl FnMut(&[u8])) {
    let mut g = Gen(seed | 1);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        g.fill(&mut chunk[..n]);
        f(&chunk[..n]);
        left -= n as u64;
    }
}

/// The SHA-256 (hex) of the value generated from `size` and `seed`.
fn expected(size: &str, seed: &str) -> String {
    let mut h = Sha256::new();
    generate(
        size.parse().expect("size"),
        seed.parse().expect("seed"),
        |p| h.update(p),
    );
    vm_tests::hex(&h.finalize())
}

fn hex_into(data: &[u8], out: &mut Vec<u8>) {
    const H: &[u8; 16] = b"0123456789abcdef";
    out.clear();
    for b in data {
        out.push(H[(b >> 4) as usize]);
        out.push(H[(b & 15) as usize]);
    }
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

#[derive(Default)]
struct Seen {
    errors: Vec<String>,
    values: Vec<Value>,
    rows: usize,
    closed: bool,
    /// The server is waiting for COPY FROM STDIN data.
    copy_in: bool,
}

impl Conn {
    fn read_exact(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b).ok()?;
        Some(b)
    }

    fn i32(&mut self) -> Option<i32> {
        let b = self.read_exact(4)?;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads messages up to ReadyForQuery (or the end of the connection), hashing DataRow
    /// values as they stream in.
    fn answers(&mut self, seen: &mut Seen) {
        loop {
            let Some(tag) = self.read_exact(1) else {
                seen.closed = true;
                return;
            };
            let Some(len) = self.i32() else {
                seen.closed = true;
                return;
            };
            let len = len as usize - 4;
            match tag[0] {
                b'D' => {
                    seen.rows += 1;
                    let Some(n) = self.read_exact(2) else {
                        seen.closed = true;
                        return;
                    };
                    for _ in 0..i16::from_be_bytes([n[0], n[1]]) {
                        let Some(vlen) = self.i32() else {
                            seen.closed = true;
                            return;
                        };
                        if vlen < 0 {
                            seen.values.push(Value::Null);
                            continue;
                        }
                        match self.hash_value(vlen as usize) {
                            Some(v) => seen.values.push(v),
                            None => {
                                seen.closed = true;
                                return;
                            }
                        }
                    }
                }
                b'd' => match self.hash_value(len) {
                    // COPY TO STDOUT data: hashed as it streams in, as a value.
                    Some(v) => seen.values.push(v),
                    None => {
                        seen.closed = true;
                        return;
                    }
                },
                b'G' => {
                    // COPY FROM STDIN: the caller sends the data.
                    let _ = self.read_exact(len);
                    seen.copy_in = true;
                    return;
                }
                t => {
                    let Some(body) = self.read_exact(len) else {
                        seen.closed = true;
                        return;
                    };
                    match t {
                        b'E' => seen.errors.push(error_text(&body)),
                        b'Z' => return,
                        _ => {}
                    }
                }
            }
        }
    }

    /// Streams one value of `len` bytes into a SHA-256 (a `\x` hex text value is decoded
    /// first).
    fn hash_value(&mut self, len: usize) -> Option<Value> {
        if len <= 256 {
            let b = self.read_exact(len)?;
            return Some(json!({"text": String::from_utf8_lossy(&b)}));
        }
        let mut h = Sha256::new();
        let mut left = len;
        let mut chunk = vec![0u8; 1 << 20];
        let mut first = true;
        let mut hex = false;
        let mut decoded = 0usize;
        let mut raw = Vec::new();
        while left > 0 {
            let n = left.min(chunk.len());
            self.r.read_exact(&mut chunk[..n]).ok()?;
            left -= n;
            let mut piece = &chunk[..n];
            if first {
                first = false;
                if piece.starts_with(b"\\x") {
                    hex = true;
                    piece = &piece[2..];
                }
            }
            if hex {
                // Pieces are even-sized after the 2-byte prefix: 1 MiB chunks, then the rest.
                raw.clear();
                for pair in piece.chunks(2) {
                    let d = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                    raw.push(d(pair[0]) << 4 | d(*pair.get(1).unwrap_or(&b'0')));
                }
                decoded += raw.len();
                h.update(&raw);
            } else {
                decoded += piece.len();
                h.update(piece);
            }
        }
        Some(json!({"len": decoded, "wire_len": len, "sha256": vm_tests::hex(&h.finalize())}))
    }
}

fn error_text(body: &[u8]) -> String {
    let mut code = String::new();
    let mut message = String::new();
    let mut severity = String::new();
    for f in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&f[1..]).into_owned();
        match f[0] {
            b'C' => code = v,
            b'M' => message = v,
            b'V' => severity = v,
            _ => {}
        }
    }
    let fatal = if severity == "FATAL" { "FATAL " } else { "" };
    format!("{fatal}{code}: {message}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (host, port) = (&args[1], &args[2]);
    if host == "-" {
        // No server: `expect` steps only.
        for step in &args[3..] {
            let (size, seed) = step
                .strip_prefix("expect:")
                .and_then(|r| r.split_once(':'))
                .expect("expect:SIZE:SEED");
            println!("{}", json!({"step": step, "sha256": expected(size, seed)}));
        }
        return;
    }
    let s = TcpStream::connect(format!("{host}:{port}")).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(600)))
        .expect("timeout");
    let w = s.try_clone().expect("clone");
    let mut c = Conn {
        r: BufReader::with_capacity(1 << 16, s),
        w,
    };
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", "bot"), ("database", "app")] {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    c.w.write_all(&startup).expect("startup");
    loop {
        let tag = c.read_exact(1).expect("login answer");
        let len = c.i32().expect("length") as usize - 4;
        let b = c.read_exact(len).expect("body");
        match tag[0] {
            b'R' if b.get(..4) == Some(&[0, 0, 0, 3]) => {
                let mut p = Vec::new();
                cstr(&mut p, "wrong");
                c.w.write_all(&msg(b'p', &p)).expect("password");
            }
            b'E' => {
                println!("{}", json!({"step": "login", "errors": [error_text(&b)]}));
                return;
            }
            b'Z' => break,
            _ => {}
        }
    }
    for step in &args[3..] {
        let mut seen = Seen::default();
        let (op, rest) = step.split_once(':').unwrap_or((step, ""));
        let sent = match op {
            "q" => {
                let mut q = Vec::new();
                cstr(&mut q, rest);
                c.w.write_all(&msg(b'Q', &q))
            }
            "insert" => insert(&mut c, rest),
            "fetch" => {
                let (format, sql) = rest.split_once(':').expect("fetch:FORMAT:SQL");
                let format: i16 = format.parse().expect("format");
                let mut p = Vec::new();
                cstr(&mut p, "");
                cstr(&mut p, sql);
                p.extend_from_slice(&0i16.to_be_bytes());
                let mut b = Vec::new();
                cstr(&mut b, "");
                cstr(&mut b, "");
                b.extend_from_slice(&0i16.to_be_bytes());
                b.extend_from_slice(&0i16.to_be_bytes());
                b.extend_from_slice(&1i16.to_be_bytes());
                b.extend_from_slice(&format.to_be_bytes());
                let mut e = Vec::new();
                cstr(&mut e, "");
                e.extend_from_slice(&0i32.to_be_bytes());
                let all = [msg(b'P', &p), msg(b'B', &b), msg(b'E', &e), msg(b'S', &[])].concat();
                c.w.write_all(&all)
            }
            "expect" => {
                let (size, seed) = rest.split_once(':').expect("expect:SIZE:SEED");
                println!("{}", json!({"step": step, "sha256": expected(size, seed)}));
                continue;
            }
            "toolong" => {
                let len: u32 = rest.parse().expect("len");
                let mut m = vec![b'B'];
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(b"\0\0\0\0\0\x01");
                c.w.write_all(&m)
            }
            "copyin" => {
                let mut q = Vec::new();
                cstr(&mut q, "COPY big FROM STDIN");
                let r = c.w.write_all(&msg(b'Q', &q));
                c.answers(&mut seen);
                if !seen.copy_in {
                    // Refused: there is no COPY to send data to, and the answers are in.
                    println!(
                        "{}",
                        json!({"step": step, "errors": seen.errors, "values": seen.values, "rows": seen.rows, "closed": seen.closed})
                    );
                    continue;
                }
                r.and_then(|()| copy_in(&mut c, rest))
            }
            "longsql" => {
                let size: usize = rest.parse().expect("size");
                let mut q = b"SELECT '".to_vec();
                q.resize(size - 2, b'a');
                q.push(b'\'');
                q.push(0);
                c.w.write_all(&msg(b'Q', &q))
            }
            other => panic!("unknown step {other:?}"),
        };
        if sent.is_err() {
            seen.closed = true;
        } else {
            c.answers(&mut seen);
        }
        let shown = if step.len() > 80 { &step[..80] } else { step };
        println!(
            "{}",
            json!({"step": shown, "errors": seen.errors, "values": seen.values, "rows": seen.rows, "closed": seen.closed})
        );
        if seen.closed {
            return;
        }
    }
    let _ = c.w.write_all(&msg(b'X', &[]));
}

/// `ID:SIZE:SEED`: one COPY text row (`ID`, tab, the value as `\\x` hex) in one CopyData
/// written in pieces, then CopyDone.
fn copy_in(c: &mut Conn, rest: &str) -> std::io::Result<()> {
    let parts: Vec<&str> = rest.split(':').collect();
    let [id, size, seed] = parts[..] else {
        panic!("copyin:ID:SIZE:SEED");
    };
    let size: u64 = size.parse().expect("size");
    let row_len = id.len() as u64 + 1 + 3 + 2 * size + 1;
    let mut m = vec![b'd'];
    m.extend_from_slice(&((4 + row_len) as u32).to_be_bytes());
    m.extend_from_slice(id.as_bytes());
    m.extend_from_slice(b"\t\\\\x");
    c.w.write_all(&m)?;
    let mut hex = Vec::new();
    let mut res = Ok(());
    generate(size, seed.parse().expect("seed"), |piece| {
        if res.is_ok() {
            hex_into(piece, &mut hex);
            res = c.w.write_all(&hex);
        }
    });
    res?;
    c.w.write_all(b"\n")?;
    c.w.write_all(&msg(b'c', &[]))
}

/// `ID:SIZE:SEED:FORMAT`: Parse, then a Bind written in pieces, Execute, Sync.
fn insert(c: &mut Conn, rest: &str) -> std::io::Result<()> {
    let parts: Vec<&str> = rest.split(':').collect();
    let [id, size, seed, format] = parts[..] else {
        panic!("insert:ID:SIZE:SEED:FORMAT");
    };
    let size: u64 = size.parse().expect("size");
    let seed: u64 = seed.parse().expect("seed");
    let format: i16 = format.parse().expect("format");
    let mut p = Vec::new();
    cstr(&mut p, "");
    cstr(&mut p, "INSERT INTO big VALUES ($1, $2)");
    p.extend_from_slice(&0i16.to_be_bytes());
    c.w.write_all(&msg(b'P', &p))?;
    let value_len = if format == 0 { 2 + 2 * size } else { size };
    let mut head = Vec::new();
    cstr(&mut head, "");
    cstr(&mut head, "");
    head.extend_from_slice(&2i16.to_be_bytes());
    head.extend_from_slice(&0i16.to_be_bytes());
    head.extend_from_slice(&format.to_be_bytes());
    head.extend_from_slice(&2i16.to_be_bytes());
    head.extend_from_slice(&(id.len() as i32).to_be_bytes());
    head.extend_from_slice(id.as_bytes());
    head.extend_from_slice(&(value_len as i32).to_be_bytes());
    let tail = 0i16.to_be_bytes();
    let len = 4 + head.len() as u64 + value_len + tail.len() as u64;
    let mut m = vec![b'B'];
    m.extend_from_slice(&(len as u32).to_be_bytes());
    m.extend_from_slice(&head);
    if format == 0 {
        m.extend_from_slice(b"\\x");
    }
    c.w.write_all(&m)?;
    let mut hex = Vec::new();
    let mut res = Ok(());
    generate(size, seed, |piece| {
        if res.is_err() {
            return;
        }
        res = if format == 0 {
            hex_into(piece, &mut hex);
            c.w.write_all(&hex)
        } else {
            c.w.write_all(piece)
        };
    });
    res?;
    let mut e = Vec::new();
    cstr(&mut e, "");
    e.extend_from_slice(&0i32.to_be_bytes());
    let end = [&tail[..], &msg(b'E', &e), &msg(b'S', &[])].concat();
    c.w.write_all(&end)
}
