//! TLS on both sides of a session.
//!
//! **Bot side.** A bot that asks for TLS gets it from the agent, with a leaf certificate minted
//! on the fly by the agent's own CA for the name it sent in SNI and the IP it dialled. The CA
//! lives in `<data_dir>/ca/` (key readable by root only) and is created on first use;
//! `tollgate ca export` prints its certificate for the bots' trust stores. Leaves are short-lived
//! and cached in memory.
//!
//! **Upstream side.** The agent's own connection to a target follows the target's `tls` table:
//! `disable`, `prefer`, `require` (encrypted, certificate not checked), `verify-ca` (the chain
//! ends at `ca_file`, the names are not checked) or `verify-full` (the chain ends at `ca_file`
//! and the certificate names `server_name`). The server's certificate also feeds SCRAM channel
//! binding (`tls-server-end-point`).

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{
    pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tollgate_policy::{TargetTls, TlsMode};

use crate::lock;

/// ALPN protocol id of PostgreSQL (17+ clients send it; direct TLS requires it).
pub const ALPN_POSTGRES: &[u8] = b"postgresql";

/// How long a minted leaf certificate is valid, and when a cached one is replaced.
const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// Bound on cached leaves (one per name and IP pair).
const LEAF_CACHE: usize = 1024;

/// The agent's certificate authority for the bot side.
pub struct Ca {
    key: KeyPair,
    /// The CA certificate as stored (what bots trust).
    der: CertificateDer<'static>,
    pem: String,
    /// The CA re-issued in memory from the stored parameters and key: rcgen signs leaves with a
    /// `Certificate`, and subject and key (all a chain check uses) are the stored ones.
    issuer: rcgen::Certificate,
    leaves: Mutex<HashMap<LeafKey, (SystemTime, Arc<CertifiedKey>)>>,
}

/// Cached leaves are per (SNI name, dialled IP).
type LeafKey = (Option<String>, IpAddr);

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// Paths of the CA certificate and key under `data_dir`.
pub fn ca_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("ca");
    (dir.join("ca.pem"), dir.join("ca.key"))
}

impl Ca {
    /// Load the CA from `<data_dir>/ca/`, creating it on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Ca> {
        let (cert_path, key_path) = ca_paths(data_dir);
        if !cert_path.exists() || !key_path.exists() {
            Self::create(&cert_path, &key_path)?;
        }
        let pem = fs::read_to_string(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a PEM private key", key_path.display()))?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .with_context(|| format!("{}: not a PEM certificate", cert_path.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&pem)
            .with_context(|| format!("{}: not a CA certificate", cert_path.display()))?;
        let issuer = params.self_signed(&key).with_context(|| {
            format!(
                "{} does not match {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
        Ok(Ca {
            key,
            der,
            pem,
            issuer,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    fn create(cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
        let dir = cert_path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "tollgate");
        dn.push(
            DnType::CommonName,
            format!(
                "tollgate agent CA {} {:08x}",
                hostname(),
                rand::random::<u32>()
            ),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        // Key first (0600), then the certificate: a reader needs both.
        let tmp = |p: &Path| p.with_extension(format!("tmp.{}", std::process::id()));
        let kt = tmp(key_path);
        let mut f = fresh(&kt, 0o600).with_context(|| format!("creating {}", kt.display()))?;
        f.write_all(key.serialize_pem().as_bytes())?;
        f.sync_all()?;
        fs::rename(&kt, key_path)?;
        let ct = tmp(cert_path);
        fresh(&ct, 0o644)
            .and_then(|mut f| f.write_all(cert.pem().as_bytes()))
            .with_context(|| format!("creating {}", ct.display()))?;
        fs::rename(&ct, cert_path)?;
        tracing::info!(cert = %cert_path.display(), "created the agent's CA for bot-side TLS");
        Ok(())
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf for `name` (from SNI) and the dialled `ip`, minted or cached.
    fn leaf(&self, name: Option<&str>, ip: IpAddr) -> Result<Arc<CertifiedKey>, rcgen::Error> {
        let key = (name.map(str::to_ascii_lowercase), ip);
        let now = SystemTime::now();
        if let Some((expires, ck)) = lock(&self.leaves).get(&key) {
            if *expires > now + LEAF_RENEW_BEFORE {
                return Ok(ck.clone());
            }
        }
        let leaf_key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            key.0.clone().unwrap_or_else(|| ip.to_string()),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        if let Some(n) = &key.0 {
            params
                .subject_alt_names
                .push(SanType::DnsName(n.clone().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let t = time::OffsetDateTime::now_utc();
        params.not_before = t - time::Duration::hours(1);
        params.not_after = t + time::Duration::seconds(LEAF_LIFETIME.as_secs() as i64);
        params.serial_number = Some(rand::random::<u64>().into());
        let cert = params.signed_by(&leaf_key, &self.issuer, &self.key)?;
        let der_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der_key)
            .map_err(|_| rcgen::Error::RingUnspecified)?;
        let ck = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.der.clone()],
            signing,
        ));
        let mut cache = lock(&self.leaves);
        if cache.len() >= LEAF_CACHE {
            cache.clear();
        }
        cache.insert(key, (now + LEAF_LIFETIME, ck.clone()));
        Ok(ck)
    }

    /// Server configuration for one bot connection that dialled `ip`, as the handler's
    /// protocol wants it (`how`: ALPN ids, client certificates).
    pub fn server_config(self: &Arc<Self>, ip: IpAddr, how: &ServerTls) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder();
        let builder = match &how.client_auth {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_cert_resolver(Arc::new(Resolver {
            ca: self.clone(),
            ip,
        }));
        cfg.alpn_protocols = how.alpn.clone();
        // A configuration serves one connection, so its session cache is never hit by another
        // one; rustls's default holds 256 entries per connection. Two keep the two TLS 1.3
        // tickets rustls sends after the handshake (clients such as `openssl s_client` report
        // the handshake finished once they read them), at a fraction of the memory.
        cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(2);
        Arc::new(cfg)
    }
}

/// How a handler terminates its bots' TLS with a leaf of the agent's CA: the ALPN protocol
/// ids it accepts (a client offering only others fails the handshake, as rustls does), and a
/// client-certificate verifier when the protocol authenticates bots by certificate.
#[derive(Clone)]
pub struct ServerTls {
    /// ALPN ids, in preference order (empty: no ALPN).
    pub alpn: Vec<Vec<u8>>,
    /// None: no client certificate asked for.
    pub client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl ServerTls {
    /// PostgreSQL: ALPN `postgresql` (PostgreSQL 17 clients send it; direct TLS requires
    /// it), no client certificates.
    pub fn postgres() -> ServerTls {
        ServerTls {
            alpn: vec![ALPN_POSTGRES.to_vec()],
            client_auth: None,
        }
    }
}

/// A new file at `p` with `mode`. A stale temp file (a crash) is removed, never written
/// through: O_EXCL|O_NOFOLLOW.
fn fresh(p: &Path, mode: u32) -> io::Result<fs::File> {
    let _ = fs::remove_file(p);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// Write `pem` as `<dir>/tollgate.crt` (0644, replaced atomically) and, with `update`, run
/// `update-ca-certificates` so the system bundle includes it. Returns the file's path.
pub fn install_ca(pem: &str, dir: &Path, update: bool) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("tollgate.crt");
    let tmp = dir.join(format!(".tollgate.crt.{}", std::process::id()));
    fresh(&tmp, 0o644)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    if update {
        let st = std::process::Command::new("update-ca-certificates")
            .status()
            .context("running update-ca-certificates (Debian's ca-certificates package)")?;
        anyhow::ensure!(st.success(), "update-ca-certificates failed: {st}");
    }
    Ok(path)
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[derive(Debug)]
struct Resolver {
    ca: Arc<Ca>,
    ip: IpAddr,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.ca.leaf(hello.server_name(), self.ip) {
            Ok(ck) => Some(ck),
            Err(e) => {
                tracing::warn!(error = %e, "cannot mint a certificate for a bot's TLS session");
                None
            }
        }
    }
}

/// A byte stream that is plain TCP or TLS over TCP (either side).
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

type TlsOverTcp = tokio_rustls::TlsStream<TcpStream>;

/// The read half of a [`Conn`] (lock-free for plain TCP).
pub enum ReadHalf {
    Plain(tokio::net::tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsOverTcp>),
}

/// The write half of a [`Conn`].
pub enum WriteHalf {
    Plain(tokio::net::tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsOverTcp>),
}

impl Conn {
    /// Split into independently usable halves (lock-free for plain TCP).
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Conn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// Put halves of the same connection back together (None: they were not one connection).
    pub fn reunite(r: ReadHalf, w: WriteHalf) -> Option<Conn> {
        match (r, w) {
            (ReadHalf::Plain(r), WriteHalf::Plain(w)) => r.reunite(w).ok().map(Conn::Plain),
            (ReadHalf::Tls(r), WriteHalf::Tls(w)) if r.is_pair_of(&w) => {
                Some(Conn::Tls(Box::new(r.unsplit(w))))
            }
            _ => None,
        }
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why the agent's TLS connection to a target failed. Safe to show the bot.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("the server does not support TLS, and the target's tls mode is \"{0}\"")]
    NotOffered(&'static str),
    #[error("cannot read tls ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("invalid tls server_name \"{0}\"")]
    ServerName(String),
    #[error("TLS handshake with the server failed: {0}")]
    Handshake(io::Error),
    #[error("the client certificate cannot be used: {0}")]
    ClientCert(String),
}

/// Client configuration for a target's `tls` table. `host` is the name the certificate must
/// carry when `server_name` is not set.
pub fn client_config(tls: &TargetTls) -> Result<Arc<ClientConfig>, UpstreamTlsError> {
    client_config_alpn(tls, &[ALPN_POSTGRES], None, false)
}

/// A client certificate the agent presents upstream (mTLS): a credential's `cert_file` and
/// its `key_file`.
pub struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// SHA-256 over the chain and the key: which configurations may share a session cache.
    fingerprint: [u8; 32],
}

impl ClientCert {
    /// From the PEM certificate chain in `cert_file` and the PEM private key `key_pem`; the
    /// error says what is wrong (never the key).
    pub fn load(cert_file: &Path, key_pem: &[u8]) -> Result<ClientCert, String> {
        let chain = CertificateDer::pem_file_iter(cert_file)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read cert_file {}: {e}", cert_file.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "cert_file {} holds no certificate",
                cert_file.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|_| "key_file holds no PEM private key".to_string())?;
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for c in &chain {
            h.update((c.len() as u64).to_be_bytes());
            h.update(c);
        }
        h.update(key.secret_der());
        Ok(ClientCert {
            chain,
            key,
            fingerprint: h.finalize().into(),
        })
    }
}

/// [`client_config`] offering the ALPN protocols `alpn`, presenting `client` if given.
fn client_config_alpn(
    tls: &TargetTls,
    alpn: &[&[u8]],
    client: Option<&ClientCert>,
    resume: bool,
) -> Result<Arc<ClientConfig>, UpstreamTlsError> {
    let key = ConfigKey {
        verifier: verifier_key(tls)?,
        alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        client: client.map(|c| c.fingerprint),
        resume,
    };
    static CONFIGS: Cache<ConfigKey, Arc<ClientConfig>> = Mutex::new(None);
    cached(&CONFIGS, key, |key| build_client_config(tls, key, client))
}

/// A client configuration as `key` describes it (see [`client_config_alpn`]).
fn build_client_config(
    tls: &TargetTls,
    key: &ConfigKey,
    client: Option<&ClientCert>,
) -> Result<Arc<ClientConfig>, UpstreamTlsError> {
    static VERIFIERS: Cache<VerifierKey, Arc<dyn ServerCertVerifier>> = Mutex::new(None);
    let verifier = cached(&VERIFIERS, key.verifier.clone(), |_| {
        server_verifier(tls, provider())
    })?;
    let builder = ClientConfig::builder_with_provider(provider().clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamTlsError::Handshake(io::Error::other(e)))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .map_err(|e| UpstreamTlsError::ClientCert(e.to_string()))?,
    };
    cfg.alpn_protocols = key.alpn.clone();
    // Shared by every connection with the same settings (the same verifier from the same CA
    // file, ALPN ids and client certificate), so a session resumed from its cache was made
    // under exactly these settings and skips only the certificate checks already done.
    cfg.resumption = if key.resume {
        rustls::client::Resumption::in_memory_sessions(SESSIONS_KEPT)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(cfg))
}

/// A process-wide cache of what TLS settings were built into (verifiers, client
/// configurations), keyed by what they were built from.
type Cache<K, V> = Mutex<Option<HashMap<K, V>>>;
/// Distinct entries a [`Cache`] keeps (a policy names a few CA files; past this, the cache
/// starts over).
const CACHE_KEPT: usize = 64;

/// The value `cache` holds for `key`, built by `build` when it holds none.
fn cached<K: Eq + std::hash::Hash, V: Clone, E>(
    cache: &Cache<K, V>,
    key: K,
    build: impl FnOnce(&K) -> Result<V, E>,
) -> Result<V, E> {
    if let Some(v) = crate::lock(cache).as_ref().and_then(|c| c.get(&key)) {
        return Ok(v.clone());
    }
    let v = build(&key)?;
    let mut cache = crate::lock(cache);
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= CACHE_KEPT {
        cache.clear();
    }
    cache.insert(key, v.clone());
    Ok(v)
}
/// TLS sessions kept for resumption per client configuration (rustls keys them by server
/// name).
const SESSIONS_KEPT: usize = 64;

/// What a shared client configuration was built from.
#[derive(PartialEq, Eq, Hash)]
struct ConfigKey {
    verifier: VerifierKey,
    alpn: Vec<Vec<u8>>,
    /// The client certificate's fingerprint ([`ClientCert`]).
    client: Option<[u8; 32]>,
    resume: bool,
}

/// Debian's bundle of the system's trusted roots (`ca-certificates`).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Client configuration for an `https` or `kubernetes` target: always TLS, offering `alpn`.
/// The certificate is checked as `verify-full` against `ca_file`, or against the system's
/// roots when the target names none; `verify-ca` checks the chain only; `require` and
/// `prefer` (an explicit choice in the policy) check nothing but the handshake signature.
pub fn http_client_config(
    tls: &TargetTls,
    alpn: &[&[u8]],
    client: Option<&ClientCert>,
) -> Result<Arc<ClientConfig>, UpstreamTlsError> {
    let mut effective = tls.clone();
    if effective.ca_file.is_none() {
        effective.ca_file = Some(PathBuf::from(SYSTEM_ROOTS));
    }
    if effective.mode == TlsMode::Disable {
        effective.mode = TlsMode::VerifyFull;
    }
    client_config_alpn(&effective, alpn, client, true)
}

/// The crypto provider every client configuration uses (one, built once).
fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// What a verifier is built from: the mode, the CA file's path and the identity of its
/// contents then (device, inode, length, modification time), so a CA file replaced or
/// rewritten is read again on the next connection. Reading and parsing the system's roots
/// (about 140 certificates) took 0.65 ms per connection; a `stat` now.
#[derive(Clone, PartialEq, Eq, Hash)]
struct VerifierKey {
    mode: TlsMode,
    ca_file: Option<PathBuf>,
    file: Option<(u64, u64, u64, i64, i64)>,
}

fn verifier_key(tls: &TargetTls) -> Result<VerifierKey, UpstreamTlsError> {
    use std::os::unix::fs::MetadataExt as _;
    let reads_file = matches!(tls.mode, TlsMode::VerifyFull | TlsMode::VerifyCa);
    let file = match (&tls.ca_file, reads_file) {
        (Some(path), true) => {
            let m = fs::metadata(path).map_err(|e| ca_file_error(tls, e.to_string()))?;
            Some((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        }
        _ => None,
    };
    Ok(VerifierKey {
        mode: tls.mode,
        ca_file: tls.ca_file.clone().filter(|_| reads_file),
        file,
    })
}

/// How the server's certificate is checked under `tls.mode`.
fn server_verifier(
    tls: &TargetTls,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, UpstreamTlsError> {
    Ok(match tls.mode {
        TlsMode::VerifyFull => rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(tls)?),
            provider.clone(),
        )
        .build()
        .map_err(|e| ca_file_error(tls, e.to_string()))?,
        TlsMode::VerifyCa => Arc::new(VerifyCa {
            roots: roots(tls)?,
            signatures: NoVerify(provider.clone()),
        }),
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => {
            Arc::new(NoVerify(provider.clone()))
        }
    })
}

/// `tls.ca_file` cannot be used, because of `reason`.
fn ca_file_error(tls: &TargetTls, reason: String) -> UpstreamTlsError {
    UpstreamTlsError::CaFile {
        path: tls
            .ca_file
            .as_deref()
            .unwrap_or(Path::new(""))
            .display()
            .to_string(),
        reason,
    }
}

/// The certificates of `tls.ca_file`.
fn roots(tls: &TargetTls) -> Result<RootCertStore, UpstreamTlsError> {
    let ca_err = |reason: String| ca_file_error(tls, reason);
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(tls.ca_file.as_deref().unwrap_or(Path::new("")))
        .map_err(|e| ca_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(ca_err("no certificate in the file".into()));
    }
    for c in certs {
        roots.add(c).map_err(|e| ca_err(e.to_string()))?;
    }
    Ok(roots)
}

/// The name to verify (or send as SNI) for a connection to `ip`, dialled as `host` if known.
pub fn server_name(
    tls: &TargetTls,
    host: Option<&str>,
    ip: IpAddr,
) -> Result<ServerName<'static>, UpstreamTlsError> {
    match tls.server_name.as_deref().or(host) {
        Some(n) => ServerName::try_from(n.to_string())
            .map_err(|_| UpstreamTlsError::ServerName(n.to_string())),
        None => Ok(ServerName::IpAddress(ip.into())),
    }
}

/// `require`/`prefer`: encrypt, but accept any certificate (signatures are still checked, so
/// the server must hold the key of the certificate it shows).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (libpq's meaning): the certificate must chain to `ca_file` and be valid now,
/// but its names are not checked. For servers whose certificate does not name the address the
/// agent dials (Cloud SQL's certificates name the instance, not a host); the handshake
/// signature is still checked, so the server must hold the certified key.
#[derive(Debug)]
struct VerifyCa {
    roots: RootCertStore,
    /// Handshake signatures are checked as under `require`.
    signatures: NoVerify,
}

impl ServerCertVerifier for VerifyCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.signatures.0.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// RFC 5929 `tls-server-end-point` channel-binding data: the hash of the server's certificate
/// with the hash of its signature algorithm (SHA-256 for MD5, SHA-1 and unknown algorithms,
/// as PostgreSQL does).
pub fn server_end_point(cert: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let oid = x509_parser::parse_x509_certificate(cert)
        .ok()
        .map(|(_, c)| c.signature_algorithm.algorithm.to_id_string());
    match oid.as_deref() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        Some("1.2.840.113549.1.1.12") | Some("1.2.840.10045.4.3.3") => {
            sha2::Sha384::digest(cert).to_vec()
        }
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        Some("1.2.840.113549.1.1.13") | Some("1.2.840.10045.4.3.4") => {
            sha2::Sha512::digest(cert).to_vec()
        }
        _ => sha2::Sha256::digest(cert).to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is built from a CA file is reused while the file is unchanged, and the file
    /// is read again once it is rewritten (a rotated CA is trusted, a broken one refused).
    #[test]
    fn verifiers_are_reused_until_their_ca_file_changes() {
        let dir = std::env::temp_dir().join(format!("tollgate-verifiers-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("ca.pem");
        let pem = |name: &str| {
            rcgen::generate_simple_self_signed(vec![name.to_string()])
                .expect("cert")
                .cert
                .pem()
        };
        let tls = TargetTls {
            mode: TlsMode::VerifyFull,
            ca_file: Some(file.clone()),
            server_name: None,
        };
        fs::write(&file, pem("one")).expect("write");
        let a = http_client_config(&tls, &[b"h2"], None).expect("first");
        let b = http_client_config(&tls, &[b"h2"], None).expect("again");
        assert!(
            Arc::ptr_eq(&a, &b),
            "an unchanged CA file is not read again"
        );
        fs::write(&file, format!("{}{}", pem("one"), pem("two"))).expect("rewrite");
        let c = http_client_config(&tls, &[b"h2"], None).expect("rotated");
        assert!(!Arc::ptr_eq(&a, &c), "a rewritten CA file is read again");
        fs::write(&file, "not a certificate").expect("break");
        assert!(matches!(
            http_client_config(&tls, &[b"h2"], None),
            Err(UpstreamTlsError::CaFile { .. })
        ));
        // Whole configurations are shared by the same settings only (their session caches
        // with them): not across client certificates or ALPN lists.
        fs::write(&file, pem("one")).expect("restore");
        let cert = |name: &str| {
            let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("cert");
            let f = dir.join(format!("{name}.pem"));
            fs::write(&f, c.cert.pem()).expect("write cert");
            ClientCert::load(&f, c.key_pair.serialize_pem().as_bytes()).expect("client cert")
        };
        let (one, two) = (cert("c1"), cert("c2"));
        let cfg = |alpn: &[&[u8]], c: Option<&ClientCert>| {
            http_client_config(&tls, alpn, c).expect("config")
        };
        assert!(Arc::ptr_eq(&cfg(&[b"h2"], None), &cfg(&[b"h2"], None)));
        assert!(Arc::ptr_eq(
            &cfg(&[b"h2"], Some(&one)),
            &cfg(&[b"h2"], Some(&one))
        ));
        assert!(!Arc::ptr_eq(
            &cfg(&[b"h2"], Some(&one)),
            &cfg(&[b"h2"], Some(&two))
        ));
        assert!(!Arc::ptr_eq(
            &cfg(&[b"h2"], None),
            &cfg(&[b"h2"], Some(&one))
        ));
        assert!(!Arc::ptr_eq(
            &cfg(&[b"h2"], None),
            &cfg(&[b"http/1.1"], None)
        ));
        fs::remove_file(&file).expect("remove");
        assert!(matches!(
            http_client_config(&tls, &[b"h2"], None),
            Err(UpstreamTlsError::CaFile { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    /// The handler's choices reach the handshake: its ALPN ids are negotiated, and a
    /// required client certificate turns away a bot without one.
    #[tokio::test]
    async fn server_config_takes_the_handlers_alpn_and_client_auth() {
        let dir = std::env::temp_dir().join(format!("tollgate-servertls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = Arc::new(Ca::load_or_create(&dir).expect("ca"));
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).expect("root");
        let roots = Arc::new(roots);
        let client = |alpn: &[&[u8]]| {
            let mut c = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            tokio_rustls::TlsConnector::from(Arc::new(c))
        };
        // A handshake over an in-memory pipe: the ALPN id the client ended with, or an error.
        let handshake = |how: ServerTls, offer: &'static [&'static [u8]]| {
            let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(ip, &how));
            let connector = client(offer);
            async move {
                let (a, b) = tokio::io::duplex(64 * 1024);
                let server = tokio::spawn(async move {
                    let mut s = acceptor.accept(b).await.ok()?;
                    use tokio::io::AsyncWriteExt as _;
                    s.write_all(b"x").await.ok()?;
                    s.flush().await.ok()
                });
                let name = ServerName::try_from("127.0.0.1").expect("name");
                let r = async {
                    let mut c = connector.connect(name, a).await?;
                    use tokio::io::AsyncReadExt as _;
                    let mut one = [0u8; 1];
                    c.read_exact(&mut one).await?;
                    Ok::<_, io::Error>(c.get_ref().1.alpn_protocol().map(|p| p.to_vec()))
                }
                .await;
                let _ = server.await;
                r
            }
        };
        let web = ServerTls {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            client_auth: None,
        };
        assert_eq!(
            handshake(web.clone(), &[b"http/1.1"]).await.expect("tls"),
            Some(b"http/1.1".to_vec())
        );
        assert_eq!(
            handshake(ServerTls::postgres(), &[b"postgresql"])
                .await
                .expect("tls"),
            Some(ALPN_POSTGRES.to_vec())
        );
        assert!(
            handshake(ServerTls::postgres(), &[b"h2"]).await.is_err(),
            "a protocol the handler does not speak fails the handshake"
        );
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone())
            .build()
            .expect("verifier");
        let mtls = ServerTls {
            client_auth: Some(verifier),
            ..web
        };
        assert!(
            handshake(mtls, &[b"h2"]).await.is_err(),
            "no client certificate, no session"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn ca_is_created_once_and_leaves_chain_to_it() {
        let dir = std::env::temp_dir().join(format!("tollgate-ca-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = Ca::load_or_create(&dir).expect("create");
        let (cert_path, key_path) = ca_paths(&dir);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&key_path).expect("key").permissions().mode();
        assert_eq!(mode & 0o077, 0, "CA key must not be readable by others");
        let again = Ca::load_or_create(&dir).expect("load");
        assert_eq!(ca.pem(), again.pem(), "the CA is stable across loads");
        assert_eq!(fs::read_to_string(cert_path).expect("pem"), ca.pem());

        // A leaf minted by the reloaded CA verifies against the stored CA certificate.
        let leaf = again
            .leaf(Some("DB.internal"), "127.0.0.1".parse().expect("ip"))
            .expect("leaf");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der.clone()).expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .expect("verifier");
        let now = UnixTime::now();
        for name in ["db.internal", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &leaf.cert[0],
                    &leaf.cert[1..],
                    &ServerName::try_from(name).expect("name"),
                    &[],
                    now,
                )
                .unwrap_or_else(|e| panic!("leaf does not verify for {name}: {e}"));
        }
        assert!(verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &ServerName::try_from("other.internal").expect("name"),
                &[],
                now,
            )
            .is_err());
        // Cached: the same leaf comes back.
        let same = again
            .leaf(Some("db.internal"), "127.0.0.1".parse().expect("ip"))
            .expect("leaf");
        assert!(Arc::ptr_eq(&leaf, &same));
        let _ = fs::remove_dir_all(&dir);
    }

    /// verify-ca checks the chain and not the names; verify-full checks both; require neither.
    #[test]
    fn verify_ca_checks_the_chain_but_not_the_name() {
        let base = std::env::temp_dir().join(format!("tollgate-verify-ca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (ours, theirs) = (
            Ca::load_or_create(&base.join("ours")).expect("ca"),
            Ca::load_or_create(&base.join("theirs")).expect("ca"),
        );
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let good = ours.leaf(Some("db.internal"), ip).expect("leaf");
        let foreign = theirs.leaf(Some("db.internal"), ip).expect("leaf");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check = |mode: TlsMode, leaf: &CertifiedKey, name: &str| {
            let tls = TargetTls {
                mode,
                ca_file: Some(ca_paths(&base.join("ours")).0),
                server_name: None,
            };
            server_verifier(&tls, &provider)
                .expect("verifier")
                .verify_server_cert(
                    &leaf.cert[0],
                    &leaf.cert[1..],
                    &ServerName::try_from(name.to_string()).expect("name"),
                    &[],
                    UnixTime::now(),
                )
                .is_ok()
        };
        assert!(check(TlsMode::VerifyCa, &good, "db.internal"));
        assert!(
            check(TlsMode::VerifyCa, &good, "instance-name.other"),
            "verify-ca does not check the name"
        );
        assert!(
            !check(TlsMode::VerifyCa, &foreign, "db.internal"),
            "verify-ca refuses a certificate from another CA"
        );
        assert!(check(TlsMode::VerifyFull, &good, "db.internal"));
        assert!(!check(TlsMode::VerifyFull, &good, "instance-name.other"));
        assert!(!check(TlsMode::VerifyFull, &foreign, "db.internal"));
        assert!(check(TlsMode::Require, &foreign, "anything.at.all"));
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let cert = CertificateParams::new(vec!["x".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(server_end_point(cert.der()).len(), 48);
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["x".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(server_end_point(cert.der()).len(), 32);
    }
}
