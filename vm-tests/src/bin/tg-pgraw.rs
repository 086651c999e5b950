//! A bot that writes PostgreSQL protocol messages by hand, in any order a client may choose
//! (including orders no common driver uses), for the extended-protocol attacks.
//!
//! Usage: `tg-pgraw HOST PORT SCRIPT [KEY=VALUE ...]`; the extra arguments are startup
//! parameters (`user=bot database=app` by default). SCRIPT has one message per line:
//! `Q sql`, `P name|sql`, `PT name|sql|oid,oid` (parameter types fixed by OID),
//! `B portal|statement`, `B1 portal|statement` (binary results), `BV portal|statement|v,v`
//! (text parameter values),
//! `D S|name`, `D P|name`, `E portal`, `C S|name`, `C P|name`, `H` (Flush), `S` (Sync),
//! `F oid|arg|arg...` (a fast-path FunctionCall: arguments as int4 when they are integers,
//! else text, all in binary format; result in binary), `L name` (looks up
//! `SELECT 'name'::regproc::oid` into the variable `name`). In `F`, the OID and each argument
//! may be a variable: a name recorded by `L`, `$last` (the last int4 function result) or
//! `$rN` (the N-th function result, when it was an int4). After each `S`, `Q` or `F` the answers
//! are read up to ReadyForQuery. `SN` is a Sync whose answers are read with the next `S` (a
//! client that pipelines past a Sync); `W` sends nothing and reads up to the next
//! ErrorResponse (after an `H`: a client that waits to see an error before it goes on); `QN sql`
//! is a Query whose answers are not read (one sent while the server skips to a Sync gets none).
//! Prints one JSON
//! object: `rows` (every DataRow, values as text or null), `errors` (SQLSTATE: message, then
//! `@position` when the error has one), `results` (FunctionCallResponse values: int4 results as
//! numbers, others as text, null as null), `fatal`.

use std::io::{Read, Write};
use std::net::TcpStream;

use serde_json::{json, Value};

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

fn split2(s: &str) -> (&str, &str) {
    s.split_once('|').unwrap_or((s, ""))
}

/// One script line as protocol bytes. `vars` are names recorded by `L` and `$last`.
fn encode(line: &str, vars: &std::collections::HashMap<String, String>) -> Vec<u8> {
    let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
    let mut b = Vec::new();
    match op {
        "F" => {
            let mut parts = rest.split('|');
            let oid = parts.next().unwrap_or("0");
            let oid = vars.get(oid).map_or(oid, String::as_str);
            let oid: u32 = oid.parse().expect("oid");
            let args: Vec<&str> = parts
                .map(|a| vars.get(a).map_or(a, String::as_str))
                .collect();
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes()); // one format code: binary for all
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&(args.len() as i16).to_be_bytes());
            for a in args {
                let v = match a.parse::<i32>() {
                    Ok(n) => n.to_be_bytes().to_vec(),
                    Err(_) => a.as_bytes().to_vec(),
                };
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(&v);
            }
            b.extend_from_slice(&1i16.to_be_bytes()); // binary result
            msg(b'F', &b)
        }
        "Q" | "QN" => {
            cstr(&mut b, rest);
            msg(b'Q', &b)
        }
        "P" => {
            let (name, sql) = split2(rest);
            cstr(&mut b, name);
            cstr(&mut b, sql);
            b.extend_from_slice(&0i16.to_be_bytes());
            msg(b'P', &b)
        }
        "PT" => {
            let mut parts = rest.splitn(3, '|');
            let (name, sql) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let oids: Vec<u32> = parts
                .next()
                .unwrap_or("")
                .split(',')
                .map(|o| o.trim().parse().expect("type oid"))
                .collect();
            cstr(&mut b, name);
            cstr(&mut b, sql);
            b.extend_from_slice(&(oids.len() as i16).to_be_bytes());
            for o in oids {
                b.extend_from_slice(&o.to_be_bytes());
            }
            msg(b'P', &b)
        }
        "BV" => {
            let mut parts = rest.splitn(3, '|');
            let (portal, stmt) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let values: Vec<&str> = parts.next().unwrap_or("").split(',').collect();
            cstr(&mut b, portal);
            cstr(&mut b, stmt);
            b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: text
            b.extend_from_slice(&(values.len() as i16).to_be_bytes());
            for v in values {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            b.extend_from_slice(&0i16.to_be_bytes());
            msg(b'B', &b)
        }
        "B" | "B1" => {
            let (portal, stmt) = split2(rest);
            cstr(&mut b, portal);
            cstr(&mut b, stmt);
            b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats
            b.extend_from_slice(&0i16.to_be_bytes()); // parameters
            if op == "B1" {
                b.extend_from_slice(&1i16.to_be_bytes());
                b.extend_from_slice(&1i16.to_be_bytes());
            } else {
                b.extend_from_slice(&0i16.to_be_bytes());
            }
            msg(b'B', &b)
        }
        "D" | "C" => {
            let (kind, name) = split2(rest);
            b.push(kind.as_bytes().first().copied().unwrap_or(b'S'));
            cstr(&mut b, name);
            msg(op.as_bytes()[0], &b)
        }
        "E" => {
            cstr(&mut b, rest);
            b.extend_from_slice(&0i32.to_be_bytes());
            msg(b'E', &b)
        }
        "H" => msg(b'H', &b),
        "S" | "SN" => msg(b'S', &b),
        "W" => Vec::new(),
        other => panic!("unknown script op {other:?}"),
    }
}

struct Reader {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let body = self.buf[5..1 + len].to_vec();
                    self.buf.drain(..1 + len);
                    return Some((tag, body));
                }
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let code = body[i];
        let end = body[i + 1..]
            .iter()
            .position(|&c| c == 0)
            .map_or(body.len(), |p| i + 1 + p);
        out.push((
            code,
            String::from_utf8_lossy(&body[i + 1..end]).into_owned(),
        ));
        i = end + 1;
    }
    out
}

fn data_row(body: &[u8]) -> Value {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut vals = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            vals.push(Value::Null);
        } else {
            let l = len as usize;
            vals.push(json!(String::from_utf8_lossy(&body[at..at + l])));
            at += l;
        }
    }
    Value::Array(vals)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (host, port, script) = (&args[1], &args[2], &args[3]);
    let mut params: Vec<(String, String)> = vec![
        ("user".into(), "bot".into()),
        ("database".into(), "app".into()),
    ];
    for kv in &args[4..] {
        let (k, v) = kv.split_once('=').expect("KEY=VALUE");
        params.retain(|(n, _)| n != k);
        params.push((k.into(), v.into()));
    }
    let s = TcpStream::connect(format!("{host}:{port}")).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = Reader { s, buf: Vec::new() };
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in &params {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    w.write_all(&startup).expect("startup");

    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut results = Vec::new();
    let mut vars: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut fatal = Value::Null;
    // Login: answer a password request with a wrong password (tollgate ignores it).
    let mut ready = false;
    while let Some((tag, b)) = r.next() {
        match tag {
            b'R' if b.get(..4) == Some(&[0, 0, 0, 3]) => {
                let mut p = Vec::new();
                cstr(&mut p, "wrong");
                w.write_all(&msg(b'p', &p)).expect("password");
            }
            b'E' => {
                let f = fields(&b);
                let get = |c: u8| f.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone());
                fatal = json!(format!(
                    "{}: {}",
                    get(b'C').unwrap_or_default(),
                    get(b'M').unwrap_or_default()
                ));
                break;
            }
            b'Z' => {
                ready = true;
                break;
            }
            _ => {}
        }
    }
    if ready {
        // ReadyForQuery answers owed for `SN` lines, read with the next `S`.
        let mut owed = 0;
        'script: for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            // `L name`: look up a function's OID into the variable `name`.
            let lookup = line.strip_prefix("L ").map(str::to_string);
            let sent = match &lookup {
                Some(name) => {
                    let mut q = Vec::new();
                    cstr(&mut q, &format!("SELECT '{name}'::regproc::oid"));
                    msg(b'Q', &q)
                }
                None => encode(line, &vars),
            };
            w.write_all(&sent).expect("write");
            if line == "SN" {
                owed += 1;
            }
            if !(line == "S"
                || line == "W"
                || line.starts_with("Q ")
                || line.starts_with("F ")
                || lookup.is_some())
            {
                continue;
            }
            let mut readies = if line == "W" {
                0
            } else {
                std::mem::take(&mut owed)
            };
            loop {
                let Some((tag, b)) = r.next() else {
                    break 'script;
                };
                match tag {
                    b'D' if lookup.is_some() => {
                        if let (Some(name), Some(oid)) = (&lookup, data_row(&b)[0].as_str()) {
                            vars.insert(name.clone(), oid.to_string());
                        }
                    }
                    b'D' => rows.push(data_row(&b)),
                    b'V' => {
                        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        let v = if len < 0 {
                            Value::Null
                        } else if len == 4 {
                            let n = i32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                            vars.insert("$last".into(), n.to_string());
                            vars.insert(format!("$r{}", results.len() + 1), n.to_string());
                            json!(n)
                        } else {
                            json!(String::from_utf8_lossy(&b[4..4 + len as usize]))
                        };
                        results.push(v);
                    }
                    b'E' => {
                        let f = fields(&b);
                        let get = |c: u8| f.iter().find(|(k, _)| *k == c).map(|(_, v)| v.clone());
                        let at = get(b'P').map(|p| format!("@{p}")).unwrap_or_default();
                        errors.push(json!(format!(
                            "{}: {}{at}",
                            get(b'C').unwrap_or_default(),
                            get(b'M').unwrap_or_default()
                        )));
                        if line == "W" {
                            break;
                        }
                    }
                    b'Z' if readies > 0 => readies -= 1,
                    b'Z' => break,
                    _ => {}
                }
            }
        }
        let _ = w.write_all(&msg(b'X', &[]));
    }
    println!(
        "{}",
        json!({"rows": rows, "errors": errors, "results": results, "fatal": fatal})
    );
}
