//! A real OpenID Connect provider for tests: `vm-tests/oidc/provider.mjs` (npm `oidc-provider`,
//! installed into `vm-tests/oidc/node_modules` by `cargo xtask setup`) on a loopback port of
//! its own choosing.
//!
//! [`OidcProvider::start`] waits for the script's JSON ready line (issuer, client secrets);
//! dropping the guard closes the script's stdin (it exits on EOF) and kills it by pid if it is
//! still there a moment later. Tokens are fetched over plain HTTP on loopback:
//! - [`OidcProvider::workload_token`]: client_credentials for a workload client (`deploy-bot`
//!   in `deployers`, `report-bot` in `analysts`);
//! - [`OidcProvider::token_for`]: an approver's access token (`sub` = the user, `groups` = the
//!   user's groups, `aud` = `tollgate`), through the script's TEST-ONLY `test-approver-<user>`
//!   clients, so no browser is needed. A real IdP has no such clients; the browser login (code
//!   plus PKCE, users `alice`/`bob` in `dba`, `carol` in `dev`, password `<user>-pw`) is the real
//!   path and is what the headless Chromium tests drive;
//! - [`OidcProvider::expired_token_for`]: the same through the TEST-ONLY `test-expired-<user>`
//!   clients, whose tokens lapsed before they were issued (`exp` = issue time - 60 s);
//! - [`OidcProvider::rotate_keys`]: the TEST-ONLY `POST /-/rotate`, a new signing key.

use std::{
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::Value;

use crate::{url_encode, TempDir};

/// Users the provider knows (password `<user>-pw`): alice and bob are in `dba`, carol in `dev`.
pub const USERS: &[(&str, &[&str])] =
    &[("alice", &["dba"]), ("bob", &["dba"]), ("carol", &["dev"])];

/// The running provider; killed on drop.
pub struct OidcProvider {
    child: Child,
    stdin: Option<ChildStdin>,
    info: Value,
    addr: SocketAddr,
    issuer: String,
    stderr_path: PathBuf,
    _dir: TempDir,
}

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

impl OidcProvider {
    /// Start the provider with no redirect URI for the `tollgate` web client.
    pub fn start(tag: &str) -> OidcProvider {
        OidcProvider::start_with(tag, &[])
    }

    /// Start the provider; `redirect_uris` are the `tollgate` web client's redirect URIs.
    /// A provider that has not said it is ready after 60 s is stopped and started once more
    /// (one CI run saw node hang at start-up, after its import warnings, while every other
    /// start of it took under 2 s); a second such start fails the test with both stderrs.
    pub fn start_with(tag: &str, redirect_uris: &[&str]) -> OidcProvider {
        let first = match OidcProvider::try_start(tag, redirect_uris, Duration::from_secs(60)) {
            Ok(p) => return p,
            Err(e) => e,
        };
        eprintln!("{first}; starting it again");
        OidcProvider::try_start(tag, redirect_uris, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}\n(the first start: {first})"))
    }

    /// One start; `Err` when no ready line came within `wait` (the process is stopped).
    fn try_start(
        tag: &str,
        redirect_uris: &[&str],
        wait: Duration,
    ) -> Result<OidcProvider, String> {
        let dir = oidc_dir();
        assert!(
            dir.join("node_modules/oidc-provider/package.json")
                .is_file(),
            "the test OIDC provider's npm packages are missing in {}: run `cargo xtask setup`",
            dir.display()
        );
        let tmp = TempDir::new(&format!("oidc-{tag}"));
        let stderr_path = tmp.path().join("provider.stderr");
        let stderr = fs::File::create(&stderr_path).expect("provider stderr file");
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("provider.mjs"))
            .args(["--port", "0"])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for uri in redirect_uris {
            cmd.args(["--redirect-uri", uri]);
        }
        let mut child = cmd
            .spawn()
            .expect("cannot start node (Debian's nodejs): run `cargo xtask setup`");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("provider stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining: a closed pipe would kill the script on its next write (EPIPE).
            let _ = io::copy(&mut r, &mut io::sink());
        });
        let mut guard = OidcProvider {
            child,
            stdin,
            info: Value::Null,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            issuer: String::new(),
            stderr_path,
            _dir: tmp,
        };
        // Generous: node start-up plus key generation on a loaded 2-core machine.
        let line = match rx.recv_timeout(wait) {
            Ok(l) if !l.trim().is_empty() => l,
            Ok(_) => {
                // Its stdout closed: say how it ended (a crash, a missing module...).
                let status = (0..50).find_map(|_| {
                    let s = guard.child.try_wait().ok().flatten();
                    if s.is_none() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    s
                });
                panic!(
                    "the OIDC provider closed its output without a ready line (exit: {status:?}); its stderr:\n{}",
                    guard.stderr_text()
                )
            }
            Err(_) => {
                return Err(format!(
                    "the OIDC provider printed no ready line within {} s (still running: {}); its stderr:\n{}",
                    wait.as_secs(),
                    matches!(guard.child.try_wait(), Ok(None)),
                    guard.stderr_text()
                ))
            }
        };
        let info: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad ready line from the OIDC provider ({e}): {line}"));
        let port = info["port"].as_u64().expect("ready line has a port") as u16;
        guard.issuer = info["issuer"].as_str().expect("issuer").to_string();
        guard.addr = SocketAddr::from(([127, 0, 0, 1], port));
        guard.info = info;
        Ok(guard)
    }

    /// The issuer URL (`http://127.0.0.1:<port>`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The provider's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The provider's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The random secret of a confidential client (`tollgate`, `deploy-bot`, ...).
    pub fn client_secret(&self, client: &str) -> String {
        self.info["clients"][client]
            .as_str()
            .unwrap_or_else(|| panic!("the OIDC provider has no confidential client {client:?}"))
            .to_string()
    }

    /// An approver access token for `user` (audience `tollgate`); TEST-ONLY client, see the
    /// module doc.
    pub fn token_for(&self, user: &str) -> String {
        self.token_for_audience(user, "tollgate")
    }

    /// An approver access token for `user` with audience `aud`.
    pub fn token_for_audience(&self, user: &str, aud: &str) -> String {
        self.client_credentials(&format!("test-approver-{user}"), aud)
    }

    /// An approver access token for `user` (audience `tollgate`) that expired 60 s before it
    /// was issued (TEST-ONLY `test-expired-<user>` client): signed by the provider's current
    /// key like any other token, refused only for its `exp`.
    pub fn expired_token_for(&self, user: &str) -> String {
        self.client_credentials(&format!("test-expired-{user}"), "tollgate")
    }

    /// A workload's client_credentials access token (JWT, audience `tollgate`).
    pub fn workload_token(&self, client: &str) -> String {
        self.client_credentials(client, "tollgate")
    }

    /// A workload's client_credentials access token with audience `aud`.
    pub fn workload_token_for_audience(&self, client: &str, aud: &str) -> String {
        self.client_credentials(client, aud)
    }

    fn client_credentials(&self, client: &str, aud: &str) -> String {
        let secret = self.client_secret(client);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            url_encode(client),
            url_encode(&secret)
        ));
        let body = format!(
            "grant_type=client_credentials&resource={}",
            url_encode(&format!("urn:aud:{aud}"))
        );
        let (status, text) = http_request(
            self.addr,
            "POST",
            "/token",
            &[
                ("Authorization", &format!("Basic {basic}")),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            body.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("token request to the OIDC provider: {e}"));
        assert_eq!(status, 200, "token request for {client} failed: {text}");
        let v: Value = serde_json::from_str(&text).expect("token response JSON");
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {text}"))
            .to_string()
    }

    /// Rotate the signing key (TEST-ONLY endpoint); `keep_old` keeps the old key in the JWKS.
    /// Returns the new key id.
    pub fn rotate_keys(&self, keep_old: bool) -> String {
        let path = if keep_old {
            "/-/rotate?keep_old=1"
        } else {
            "/-/rotate"
        };
        let (status, text) = http_request(self.addr, "POST", path, &[], b"")
            .unwrap_or_else(|e| panic!("rotate request to the OIDC provider: {e}"));
        assert_eq!(status, 200, "key rotation failed: {text}");
        let v: Value = serde_json::from_str(&text).expect("rotate response JSON");
        v["kid"].as_str().expect("new kid").to_string()
    }

    /// What the provider wrote on stderr so far.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        // EOF on stdin makes the script exit; kill it by pid if it has not a moment later.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 request with `Connection: close` (chromedriver refuses HTTP/1.0), reading
/// to EOF and undoing chunked transfer encoding: `(status, body)`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<(u16, String)> {
    let timeout = Duration::from_secs(30);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    // Read until the body is complete by Content-Length or the chunked terminator (some
    // servers, chromedriver among them, keep the connection open despite `close`), else EOF.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            let got = raw.len() - split - 4;
            let len = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if len.is_some_and(|n| got >= n)
                || (head.contains("chunked") && raw.ends_with(b"0\r\n\r\n"))
            {
                break;
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("malformed HTTP response from {addr}")))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line from {addr}: {head}")))?;
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        body = dechunk(&body)
            .ok_or_else(|| io::Error::other(format!("bad chunked body from {addr}")))?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// The claims of a JWT, decoded without verification (for assertions in tests).
pub fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("JWT payload is base64url");
    serde_json::from_slice(&bytes).expect("JWT payload is JSON")
}
