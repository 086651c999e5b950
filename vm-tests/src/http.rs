//! HTTP test peers: a real HTTPS server on loopback (Python's `http.server` with `ssl`, from
//! Debian's python3) that logs every request it receives as JSON lines, and a raw TLS client
//! for request-smuggling tricks no well-behaved client sends.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{free_port, pg::TestCa, wait_for, TempDir};

/// The server (after [`WS_PY`]): a WebSocket GET is echoed frame by frame; GET answers `{"path": <path as received>, "ok": true}` plus, under
/// `/api/v1/customers`, a JSON document with an email and a card number; POST and PUT read
/// the body (Content-Length or chunked) and answer its length and SHA-256.
const SERVER: &str = r#"
import base64, hashlib, json, ssl, struct, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, cert, key, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
logf = open(log, "a", buffering=1)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def record(self, extra=None):
        e = {"method": self.command, "path": self.path,
             "authorization": self.headers.get("Authorization"),
             "host": self.headers.get("Host"), "peer": self.client_address[1]}
        pc = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
        if pc:
            e["client_issuer"] = [v for rdn in pc.get("issuer", ()) for (k, v) in rdn if k == "commonName"]
        e.update(extra or {})
        logf.write(json.dumps(e) + "\n")
    def reply(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b)
    def do_GET(self):
        if (self.headers.get("Upgrade") or "").lower() == "websocket":
            return self.websocket()
        if self.path.startswith("/api/v1/download?bytes="):
            return self.download(int(self.path.split("=", 1)[1]))
        if self.path == "/api/v1/partial":
            # A part of a customer document, as a server honouring a Range would send it,
            # whether asked or not.
            self.record({"range": self.headers.get("Range")})
            b = b'123456789'
            self.send_response(206)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Range", "bytes 19-27/120")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            return self.wfile.write(b)
        if self.path.startswith("/api/v1/customers"):
            return self.customers(int(self.path.split("n=", 1)[1]) if "n=" in self.path else 2)
        if self.path == "/api/v1/disguised":
            # Masked keys spelled with escapes, in another case and repeated; a card number
            # escaped and as a JSON number; sent in 3-byte chunks, so keys and escapes are cut.
            self.record()
            b = b'{"s\\u0073n":"123-45-6789","ssn":"987-65-4320","\\u0053SN":"555-12-3456","note":"card 4111\\u00201111\\u00201111\\u00201111","n":4111111111111111,"ok":true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(b), 3):
                c = b[i:i + 3]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            return self.wfile.write(b"0\r\n\r\n")
        if self.path.startswith("/api/v1/echo"):
            # Echoes the request: its headers as JSON (and the Authorization in a header, in
            # base64, JSON-escaped and percent-encoded), in 5-byte chunks so the echoes are cut;
            # `/api/v1/echo-gz` compresses whatever the request asked for.
            self.record({"accept_encoding": self.headers.get("Accept-Encoding")})
            auth = self.headers.get("Authorization") or ""
            from urllib.parse import quote
            token = auth.split(" ", 1)[-1]
            b = json.dumps({"headers": dict(self.headers.items()),
                            "b64": base64.b64encode(token.encode()).decode(),
                            "pct": quote(token, safe=""),
                            "escaped": token.replace("/", "\\/")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Echo-Authorization", auth)
            if self.path == "/api/v1/echo-gz":
                import gzip
                b = gzip.compress(b)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(b), 5):
                c = b[i:i + 5]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            return self.wfile.write(b"0\r\n\r\n")
        if self.path == "/api/v1/page":
            self.record()
            b = b"<html>ssn 123-45-6789</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            return self.wfile.write(b)
        if self.path == "/api/v1/gz":
            import gzip
            self.record({"accept_encoding": self.headers.get("Accept-Encoding")})
            b = gzip.compress(json.dumps({"ssn": "123-45-6789"}).encode())
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            return self.wfile.write(b)
        self.record()
        self.reply(200, {"path": self.path, "ok": True})
    def customers(self, n):
        # {"items":[...]} with n customers (an SSN, an email under spec, a card number in a
        # note), streamed chunked in pieces of about 64 KiB.
        self.record({"accept_encoding": self.headers.get("Accept-Encoding"),
                     "range": self.headers.get("Range")})
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        def chunk(b):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
        buf = [b'{"kind":"CustomerList","items":[']
        size = len(buf[0])
        for i in range(n):
            item = json.dumps({"id": i, "ssn": "123-45-%04d" % (i % 10000),
                               "spec": {"email": "user%d@example.com" % i, "name": "n%d" % i},
                               "note": "paid with 4111 1111 1111 1111"}).encode()
            buf.append((b"," if i else b"") + item)
            size += len(buf[-1])
            if size > 65536:
                chunk(b"".join(buf)); buf = []; size = 0
        buf.append(b"]}")
        chunk(b"".join(buf))
        chunk(b"")
    def download(self, n):
        # n bytes of a fixed pattern (byte i of each 64 KiB block is i % 251), streamed.
        self.record({"bytes": n})
        block = bytes(i % 251 for i in range(65536))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        while n > 0:
            k = min(n, len(block))
            self.wfile.write(block[:k])
            n -= k
    def websocket(self):
        self.record({"upgrade": "websocket"})
        key = self.headers["Sec-WebSocket-Key"]
        acc = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", acc)
        self.end_headers()
        self.wfile.flush()
        ws_echo(self.rfile, self.wfile)
        self.close_connection = True
    do_HEAD = do_GET
    do_DELETE = do_GET
    def do_TRACE(self):
        # What TRACE is for: the request as received, headers and all.
        self.record()
        b = ("%s %s %s\r\n" % (self.command, self.path, self.request_version)).encode() + bytes(self.headers)
        self.send_response(200)
        self.send_header("Content-Type", "message/http")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def body(self):
        h = hashlib.sha256(); n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""): pass
                    break
                left = size
                while left:
                    c = self.rfile.read(min(left, 65536)); h.update(c); n += len(c); left -= len(c)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                c = self.rfile.read(min(left, 65536))
                if not c: break
                h.update(c); n += len(c); left -= len(c)
        return n, h.hexdigest()
    def do_POST(self):
        n, digest = self.body()
        self.record({"bytes": n})
        self.reply(200, {"path": self.path, "bytes": n, "sha256": digest})
    do_PUT = do_POST
    do_PATCH = do_POST
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if len(sys.argv) > 5:
    # mTLS: a client certificate from this CA is required.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(sys.argv[5])
srv = ThreadingHTTPServer(("127.0.0.1", port), H)
srv.daemon_threads = True
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// A real HTTPS server on 127.0.0.1 with a certificate for `localhost` and `127.0.0.1` from
/// its own test CA. Stopped (by its pid) on drop.
pub struct HttpsServer {
    pub port: u16,
    /// The test CA's certificate, for the target's `tls.ca_file`.
    pub ca_file: PathBuf,
    pub server: PyTlsServer,
}

/// WebSocket frames in Python (RFC 6455): `ws_frame(op, data, mask)`, `ws_read(f)` ->
/// (op, data) or None, and `ws_echo(rfile, wfile)` echoing until a close frame.
pub const WS_PY: &str = r#"
import os as _os, struct as _struct
def ws_frame(op, data, mask=False):
    n = len(data)
    head = bytes([0x80 | op])
    mbit = 0x80 if mask else 0
    if n < 126: head += bytes([mbit | n])
    elif n < 65536: head += bytes([mbit | 126]) + _struct.pack(">H", n)
    else: head += bytes([mbit | 127]) + _struct.pack(">Q", n)
    if mask:
        k = _os.urandom(4)
        return head + k + bytes(b ^ k[i % 4] for i, b in enumerate(data))
    return head + data
def ws_read(f):
    h = f.read(2)
    if len(h) < 2: return None
    op, n = h[0] & 0x0f, h[1] & 0x7f
    if n == 126: n = _struct.unpack(">H", f.read(2))[0]
    elif n == 127: n = _struct.unpack(">Q", f.read(8))[0]
    k = f.read(4) if h[1] & 0x80 else b"\0\0\0\0"
    d = f.read(n)
    return op, bytes(b ^ k[i % 4] for i, b in enumerate(d))
def ws_echo(rfile, wfile):
    while True:
        m = ws_read(rfile)
        if m is None: break
        op, data = m
        if op == 8:
            wfile.write(ws_frame(8, data)); wfile.flush(); break
        wfile.write(ws_frame(op, data)); wfile.flush()
"#;

/// A Python TLS server script started on a free loopback port with a certificate for
/// `localhost` and `127.0.0.1` from its own test CA: `python3 SCRIPT PORT CERT KEY LOG ARGS...`,
/// which prints `ready` once listening. Shared by [`HttpsServer`] and the fake API server.
pub struct PyTlsServer {
    pub port: u16,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    pub log: PathBuf,
    pub child: Child,
    pub dir: TempDir,
}

impl PyTlsServer {
    pub fn start(tag: &str, script_text: &str, args: &[&str]) -> PyTlsServer {
        let dir = TempDir::new(tag);
        let ca = TestCa::new(tag);
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        let ca_file = dir.path().join("ca.pem");
        fs::write(&cert, &ca.cert_pem).expect("cert");
        fs::write(&key, &ca.key_pem).expect("key");
        fs::write(&ca_file, &ca.ca_pem).expect("ca");
        let script = dir.path().join("server.py");
        fs::write(&script, script_text).expect("script");
        let log = dir.path().join("access.jsonl");
        fs::write(&log, "").expect("log");
        let port = free_port();
        let mut child = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(&cert)
            .arg(&key)
            .arg(&log)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 test server");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        assert_eq!(line.trim(), "ready", "the {tag} test server did not start");
        wait_for(Duration::from_secs(5), "test server listening", || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()
        });
        PyTlsServer {
            port,
            ca,
            ca_file,
            log,
            child,
            dir,
        }
    }

    /// Every line of its access log, parsed.
    pub fn access_log(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for PyTlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HttpsServer {
    pub fn start(tag: &str) -> HttpsServer {
        HttpsServer::start_opts(tag, &[])
    }

    /// A server that requires a client certificate issued by the CA in `client_ca` (mTLS).
    pub fn start_mtls(tag: &str, client_ca: &std::path::Path) -> HttpsServer {
        HttpsServer::start_opts(tag, &[&client_ca.display().to_string()])
    }

    fn start_opts(tag: &str, args: &[&str]) -> HttpsServer {
        let s = PyTlsServer::start(&format!("{tag}-https"), &format!("{WS_PY}{SERVER}"), args);
        HttpsServer {
            port: s.port,
            ca_file: s.ca_file.clone(),
            server: s,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Every request the server received, in order.
    pub fn access_log(&self) -> Vec<Value> {
        self.server.access_log()
    }
}

/// A raw TLS client run as the bot: sends `request` bytes (Python escapes allowed, e.g.
/// `\r\n`) to 127.0.0.1:`port` with SNI `sni`, trusting `ca_file`, and prints everything the
/// server answers within two seconds.
pub const RAW_CLIENT: &str = r#"
import socket, ssl, sys
port, ca, sni, req = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
s = socket.create_connection(("127.0.0.1", port), timeout=5)
t = ctx.wrap_socket(s, server_hostname=sni)
t.sendall(req.encode("latin-1").decode("unicode_escape").encode("latin-1"))
t.settimeout(2)
out = b""
try:
    while True:
        c = t.recv(65536)
        if not c: break
        out += c
except Exception:
    pass
sys.stdout.write(out.decode("latin-1"))
"#;

/// A WebSocket client run as the bot (after [`WS_PY`]): opens `path` on 127.0.0.1:`port`
/// (SNI and Host `localhost`, trusting `ca_file`), sends `text` as a masked text frame and
/// prints `{"status": N, "echo": "..."}`.
pub const WS_CLIENT: &str = r#"
import base64, json, os, socket, ssl, sys
port, ca, path, text = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
key = base64.b64encode(os.urandom(16)).decode()
t.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, key)).encode())
f = t.makefile("rb")
status = int(f.readline().split()[1])
while f.readline() not in (b"\r\n", b""): pass
echo = None
if status == 101:
    t.sendall(ws_frame(1, text.encode(), mask=True))
    m = ws_read(f)
    echo = m[1].decode() if m else None
    t.sendall(ws_frame(8, b"", mask=True))
print(json.dumps({"status": status, "echo": echo}))
"#;

/// Write [`RAW_CLIENT`] where the unprivileged bot can read it.
pub fn raw_client(dir: &Path) -> PathBuf {
    bot_script(dir, "rawtls.py", RAW_CLIENT)
}

/// Write [`WS_CLIENT`] (with [`WS_PY`]) where the unprivileged bot can read it.
pub fn ws_client(dir: &Path) -> PathBuf {
    bot_script(dir, "wsclient.py", &format!("{WS_PY}{WS_CLIENT}"))
}

fn bot_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(name);
    fs::write(&p, text).expect("bot script");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

/// The status codes of every HTTP/1.x response in `text`.
pub fn statuses(text: &str) -> Vec<u16> {
    text.split("HTTP/1.")
        .skip(1)
        .filter_map(|r| r.get(2..5).and_then(|c| c.parse().ok()))
        .collect()
}
