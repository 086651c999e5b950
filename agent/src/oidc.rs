//! OIDC bearer tokens: verify a JWT access token (or ID token) from an OpenID Connect provider.
//!
//! Used for approvers (the admin API, the CLI's token, the web page's session) and for
//! workloads (`oidc = {...}` on an `[[identity]]`: a PostgreSQL bot's password carries a JWT).
//!
//! Layout: [`OidcVerifier::discover`] fetches the provider's discovery document and JWKS with
//! the `openidconnect` crate (its HTTP client hook is served by [`http_fetch`], a small hyper
//! client: http for loopback issuers only, https with the system's CA bundle);
//! [`OidcVerifier::verify_bearer`] checks one token; [`WorkloadVerifiers`] keeps one verifier
//! per (issuer, audience) for the data path, discovered on first use.
//!
//! Checks, in order: size, shape (three base64url parts), header (`alg` must be an asymmetric
//! JWS algorithm: never `none`, never HS* — a provider's public key must not double as an HMAC
//! secret; no `crit`), key (by `kid` in the cached JWKS, `use` = `sig` if given; an unknown
//! `kid` refreshes the JWKS once, at most one fetch per [`MIN_REFRESH`], which is how key
//! rotation works), signature (openidconnect's JWK verification), then the claims: `iss`
//! equals the issuer, `aud` (string or array) holds the audience, `exp` is in the future and
//! `nbf`/`iat` are not, with [`LEEWAY`] either way, and `sub` is a non-empty string.
//!
//! Errors ([`OidcError`]) are safe to return to the caller: they never contain the token, and
//! the few token-derived values they name (`alg`, `kid`) are length-capped and restricted to
//! printable ASCII.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use openidconnect::{
    core::{CoreJsonWebKey, CoreJsonWebKeySet, CoreJwsSigningAlgorithm, CoreProviderMetadata},
    HttpRequest, HttpResponse, IssuerUrl, JsonWebKey as _, JsonWebKeySetUrl,
};
use serde_json::{Map, Value};
use tokio::net::TcpSocket;

use crate::lock;

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Largest token accepted (PostgreSQL's own cap on a password message is 64 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// At most one JWKS fetch per this interval, however many unknown `kid`s arrive; a request
/// that needs a fetch sooner waits for the interval instead of failing, so a real rotation
/// never rejects a good token.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Keys are refetched after this long even if every `kid` is known, so a key the provider
/// withdrew (compromised) stops verifying.
pub const MAX_KEYS_AGE: Duration = Duration::from_secs(600);
/// Timeout of one HTTP exchange with the provider.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery document or JWKS read.
const MAX_HTTP_BODY: usize = 1024 * 1024;

/// Why a token (or the provider) was rejected. The Display text is safe to send to the caller
/// that presented the token: it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// Discovery failed (network, HTTP status, JSON, or the document names another issuer).
    #[error("cannot discover the OIDC provider {issuer}: {reason}")]
    Discovery { issuer: String, reason: String },
    /// The issuer URL is not usable: not a URL, or plain http to a non-loopback host (anyone on
    /// the path could then substitute the signing keys).
    #[error("invalid OIDC issuer {issuer}: {reason}")]
    Issuer { issuer: String, reason: String },
    /// The JWKS could not be fetched or parsed.
    #[error("cannot fetch the OIDC provider's signing keys: {0}")]
    Jwks(String),
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token too large (more than {MAX_TOKEN_LEN} bytes)")]
    TooLarge,
    /// Not a compact JWS (three base64url parts with a JSON header and payload).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg` is `none`, symmetric (HS*), or unknown.
    #[error(
        "token algorithm {0} is not accepted (only asymmetric signatures: RS*, PS*, ES*, EdDSA)"
    )]
    Algorithm(String),
    /// The header has a `crit` parameter, whose extensions this verifier does not implement.
    #[error("token has critical header extensions, which are not supported")]
    CriticalHeader,
    /// No key in the provider's JWKS (even after a refresh) matches `kid` and `alg`.
    #[error("token signed with a key the provider does not publish (kid {0})")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not {0}")]
    WrongIssuer(String),
    /// `aud` does not contain the configured audience.
    #[error("token audience does not include {0}")]
    WrongAudience(String),
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// A required claim is missing or has the wrong type.
    #[error("token has no valid `{0}` claim")]
    MissingClaim(&'static str),
    /// A claim the identity's `require_claims` names has none of the accepted values.
    #[error("token claim `{0}` has none of the values the policy requires")]
    ClaimMismatch(String),
}

impl OidcError {
    /// Whether the provider (not the token) is at fault: discovery or JWKS unavailable. An API
    /// answers these with 503 rather than 401.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, OidcError::Discovery { .. } | OidcError::Jwks(_))
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `sub`.
    pub subject: String,
    /// The groups claim (name configurable): an array of strings, or one string. Missing: empty.
    pub groups: Vec<String>,
    /// `exp`.
    pub expires_at: SystemTime,
    /// Every claim of the token as sent (including `sub`, `iss`, `aud`, `exp` and the groups
    /// claim), for claim matching.
    pub extra: Map<String, Value>,
}

/// The socket mark put on the verifier's own connections (the agent's `AGENT_MARK`), so the
/// kernel hooks never redirect them, even if the IdP's address is a protected target. 0 = none.
static OUTBOUND_MARK: AtomicU32 = AtomicU32::new(0);

/// Mark the verifier's connections to OIDC providers with `mark` (the agent sets its own).
pub fn set_outbound_mark(mark: u32) {
    OUTBOUND_MARK.store(mark, Ordering::Relaxed);
}

struct KeyCache {
    set: Arc<CoreJsonWebKeySet>,
    fetched: Instant,
}

/// Verifies bearer tokens of one issuer for one audience. Cheap to share (`Arc`); keys are
/// cached and refreshed on an unknown `kid`.
pub struct OidcVerifier {
    issuer: String,
    audience: String,
    groups_claim: String,
    jwks_uri: JsonWebKeySetUrl,
    keys: Mutex<KeyCache>,
    /// Serialises JWKS fetches.
    refresh: tokio::sync::Mutex<()>,
    min_refresh: Duration,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("groups_claim", &self.groups_claim)
            .finish_non_exhaustive()
    }
}

impl OidcVerifier {
    /// Fetch `<issuer>/.well-known/openid-configuration` and the JWKS it names. The document's
    /// `issuer` must equal `issuer` exactly. `audience` is the `aud` value tokens must carry;
    /// `groups_claim` names the claim read into [`Claims::groups`].
    pub async fn discover(
        issuer: &str,
        audience: &str,
        groups_claim: &str,
    ) -> Result<OidcVerifier, OidcError> {
        let bad = |reason: String| OidcError::Issuer {
            issuer: issuer.to_string(),
            reason,
        };
        let url = IssuerUrl::new(issuer.to_string()).map_err(|e| bad(e.to_string()))?;
        check_scheme(url.url()).map_err(bad)?;
        let meta = CoreProviderMetadata::discover_async(url, &http_client())
            .await
            .map_err(|e| OidcError::Discovery {
                issuer: issuer.to_string(),
                reason: error_chain(&e),
            })?;
        check_scheme(meta.jwks_uri().url()).map_err(|reason| OidcError::Discovery {
            issuer: issuer.to_string(),
            reason: format!("jwks_uri: {reason}"),
        })?;
        Ok(OidcVerifier {
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            groups_claim: groups_claim.to_string(),
            jwks_uri: meta.jwks_uri().clone(),
            keys: Mutex::new(KeyCache {
                set: Arc::new(meta.jwks().clone()),
                fetched: Instant::now(),
            }),
            refresh: tokio::sync::Mutex::new(()),
            min_refresh: MIN_REFRESH,
        })
    }

    /// The issuer this verifier accepts.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The audience this verifier requires.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Verify `token` (a compact JWS, without any `Bearer ` prefix) now.
    pub async fn verify_bearer(&self, token: &str) -> Result<Claims, OidcError> {
        self.verify_at(token, SystemTime::now()).await
    }

    /// Verify `token` as of `now`.
    pub(crate) async fn verify_at(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<Claims, OidcError> {
        let jwt = Jwt::parse(token)?;
        let key = self.key_for(&jwt).await?;
        key.verify_signature(&jwt.alg, jwt.signed.as_bytes(), &jwt.signature)
            .map_err(|_| OidcError::BadSignature)?;
        self.check_claims(jwt.payload, now)
    }

    /// The key that must have signed `jwt`: from the cache, else after one refresh.
    async fn key_for(&self, jwt: &Jwt<'_>) -> Result<CoreJsonWebKey, OidcError> {
        let asked = Instant::now();
        let (set, fetched) = {
            let c = lock(&self.keys);
            (c.set.clone(), c.fetched)
        };
        if fetched.elapsed() < MAX_KEYS_AGE {
            if let Some(k) = find_key(&set, jwt) {
                return Ok(k);
            }
        }
        // Unknown kid (or stale keys): refresh, one fetch at a time and at most one per
        // min_refresh. Whoever waited on the lock while another refreshed uses that result.
        let _g = self.refresh.lock().await;
        let (set, fetched) = {
            let c = lock(&self.keys);
            (c.set.clone(), c.fetched)
        };
        if fetched >= asked {
            return find_key(&set, jwt).ok_or_else(|| OidcError::UnknownKey(jwt.kid_label()));
        }
        let since = fetched.elapsed();
        if since < self.min_refresh {
            tokio::time::sleep(self.min_refresh - since).await;
        }
        let fresh = CoreJsonWebKeySet::fetch_async(&self.jwks_uri, &http_client())
            .await
            .map_err(|e| OidcError::Jwks(error_chain(&e)))?;
        let fresh = Arc::new(fresh);
        {
            let mut c = lock(&self.keys);
            c.set = fresh.clone();
            c.fetched = Instant::now();
        }
        find_key(&fresh, jwt).ok_or_else(|| OidcError::UnknownKey(jwt.kid_label()))
    }

    fn check_claims(
        &self,
        payload: Map<String, Value>,
        now: SystemTime,
    ) -> Result<Claims, OidcError> {
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let leeway = LEEWAY.as_secs_f64();
        if payload.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(OidcError::WrongIssuer(self.issuer.clone()));
        }
        let aud_ok = match payload.get("aud") {
            Some(Value::String(a)) => *a == self.audience,
            Some(Value::Array(v)) => v.iter().any(|a| a.as_str() == Some(&self.audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(OidcError::WrongAudience(self.audience.clone()));
        }
        let exp = payload
            .get("exp")
            .and_then(Value::as_f64)
            .filter(|e| e.is_finite() && *e >= 0.0)
            .ok_or(OidcError::MissingClaim("exp"))?;
        if now_s > exp + leeway {
            return Err(OidcError::Expired);
        }
        for k in ["nbf", "iat"] {
            match payload.get(k) {
                None => {}
                Some(v) => {
                    let t = v.as_f64().ok_or(OidcError::MissingClaim(if k == "nbf" {
                        "nbf"
                    } else {
                        "iat"
                    }))?;
                    if t > now_s + leeway {
                        return Err(OidcError::NotYetValid);
                    }
                }
            }
        }
        let subject = payload
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(OidcError::MissingClaim("sub"))?
            .to_string();
        let groups = match payload.get(&self.groups_claim) {
            Some(Value::Array(v)) => v
                .iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(g)) => vec![g.clone()],
            _ => Vec::new(),
        };
        Ok(Claims {
            subject,
            groups,
            expires_at: UNIX_EPOCH + Duration::from_secs_f64(exp),
            extra: payload,
        })
    }
}

/// Whether `claims` satisfy an identity's `require_claims`: for each named claim, the token's
/// value (a string, or any element of an array; numbers and booleans compare as their JSON
/// text) must be one of the accepted values.
pub fn check_required_claims(
    claims: &Claims,
    required: &BTreeMap<String, Vec<String>>,
) -> Result<(), OidcError> {
    for (name, accepted) in required {
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        let values: Vec<String> = match claims.extra.get(name) {
            Some(Value::Array(v)) => v.iter().filter_map(scalar).collect(),
            Some(v) => scalar(v).into_iter().collect(),
            None => Vec::new(),
        };
        if !values.iter().any(|v| accepted.contains(v)) {
            return Err(OidcError::ClaimMismatch(printable(name, 64)));
        }
    }
    Ok(())
}

/// A parsed, not yet verified, compact JWS.
struct Jwt<'a> {
    alg: CoreJwsSigningAlgorithm,
    kid: Option<String>,
    /// `header.payload`, the signed bytes.
    signed: &'a str,
    signature: Vec<u8>,
    payload: Map<String, Value>,
}

impl<'a> Jwt<'a> {
    fn parse(token: &'a str) -> Result<Jwt<'a>, OidcError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(OidcError::TooLarge);
        }
        let token = token.trim();
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(OidcError::Malformed(
                "not a JWS in compact form (three dot-separated parts)",
            ));
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: Map<String, Value> = b64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(OidcError::Malformed("header is not base64url JSON"))?;
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(OidcError::Malformed("header has no alg"))?;
        let alg = accepted_alg(alg_name)?;
        if header.contains_key("crit") {
            return Err(OidcError::CriticalHeader);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(OidcError::Malformed("kid is not a string")),
        };
        let payload: Map<String, Value> = b64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(OidcError::Malformed("payload is not base64url JSON"))?;
        let signature = b64
            .decode(s)
            .map_err(|_| OidcError::Malformed("signature is not base64url"))?;
        if signature.is_empty() {
            return Err(OidcError::Malformed("empty signature"));
        }
        Ok(Jwt {
            alg,
            kid,
            signed: &token[..h.len() + 1 + p.len()],
            signature,
            payload,
        })
    }

    fn kid_label(&self) -> String {
        self.kid
            .as_deref()
            .map(|k| printable(k, 64))
            .unwrap_or_else(|| "(none)".into())
    }
}

/// Asymmetric JWS algorithms only: `none` would accept anything, and HS* would let anyone
/// holding the provider's *public* key (everyone) mint tokens if a key were ever used as an
/// HMAC secret.
fn accepted_alg(name: &str) -> Result<CoreJwsSigningAlgorithm, OidcError> {
    use CoreJwsSigningAlgorithm as A;
    let alg = match name {
        "RS256" => A::RsaSsaPkcs1V15Sha256,
        "RS384" => A::RsaSsaPkcs1V15Sha384,
        "RS512" => A::RsaSsaPkcs1V15Sha512,
        "PS256" => A::RsaSsaPssSha256,
        "PS384" => A::RsaSsaPssSha384,
        "PS512" => A::RsaSsaPssSha512,
        "ES256" => A::EcdsaP256Sha256,
        "ES384" => A::EcdsaP384Sha384,
        "EdDSA" => A::EdDsa,
        other => return Err(OidcError::Algorithm(printable(other, 16))),
    };
    Ok(alg)
}

/// A signing key of `set` for `jwt`: same `kid` (any key if the token names none), usable for
/// signatures, and of a type and `alg` compatible with the token's algorithm.
fn find_key(set: &CoreJsonWebKeySet, jwt: &Jwt<'_>) -> Option<CoreJsonWebKey> {
    set.keys()
        .iter()
        .filter(|k| match (&jwt.kid, k.key_id()) {
            (Some(want), Some(have)) => want.as_str() == have.as_str(),
            (Some(_), None) => false,
            (None, _) => true,
        })
        .filter(|k| {
            k.key_use()
                .is_none_or(|u| matches!(u, openidconnect::core::CoreJsonWebKeyUse::Signature))
        })
        .find(|k| key_fits(k, &jwt.alg))
        .cloned()
}

/// Key type and the key's own `alg` (if it has one) agree with `alg`. (openidconnect checks
/// this again when verifying; filtering here picks the right key when `kid` is absent.)
fn key_fits(k: &CoreJsonWebKey, alg: &CoreJwsSigningAlgorithm) -> bool {
    use openidconnect::{core::CoreJsonWebKeyType as T, JsonWebKeyAlgorithm as KA};
    use CoreJwsSigningAlgorithm as A;
    let type_ok = match alg {
        A::RsaSsaPkcs1V15Sha256
        | A::RsaSsaPkcs1V15Sha384
        | A::RsaSsaPkcs1V15Sha512
        | A::RsaSsaPssSha256
        | A::RsaSsaPssSha384
        | A::RsaSsaPssSha512 => matches!(k.key_type(), T::RSA),
        A::EcdsaP256Sha256 | A::EcdsaP384Sha384 => matches!(k.key_type(), T::EllipticCurve),
        A::EdDsa => matches!(k.key_type(), T::OctetKeyPair),
        _ => false,
    };
    type_ok
        && match k.signing_alg() {
            KA::Algorithm(a) => a == alg,
            KA::Unspecified => true,
            KA::Unsupported => false,
        }
}

/// `s` cut to `max` chars, with anything but printable ASCII replaced by `?`.
fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// The error and its sources, joined (discovery errors keep the cause in `source()`).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

/// https, or http to a loopback host (the test provider; a local IdP sidecar).
pub(crate) fn check_scheme(url: &openidconnect::url::Url) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(url) => Ok(()),
        "http" => Err("plain http is only accepted for a loopback issuer; use https".into()),
        other => Err(format!("unsupported scheme {other}")),
    }
}

fn is_loopback_host(url: &openidconnect::url::Url) -> bool {
    use openidconnect::url::Host;
    match url.host() {
        Some(Host::Ipv4(a)) => a.is_loopback(),
        Some(Host::Ipv6(a)) => a.is_loopback(),
        Some(Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client for openidconnect (hyper, one request per connection)
// ---------------------------------------------------------------------------------------------

/// An HTTP failure talking to the provider.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

type HttpFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send>>;

pub(crate) fn http_client() -> impl Fn(HttpRequest) -> HttpFuture {
    |req| Box::pin(http_fetch(req))
}

/// One HTTP/1.1 exchange: no redirects, no proxies, [`HTTP_TIMEOUT`] in all, bodies capped at
/// [`MAX_HTTP_BODY`].
pub async fn http_fetch(req: HttpRequest) -> Result<HttpResponse, HttpError> {
    http_fetch_with(req, None).await
}

/// [`http_fetch`], trusting `tls` instead of the system CA bundle when given.
pub async fn http_fetch_with(
    req: HttpRequest,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<HttpResponse, HttpError> {
    match tokio::time::timeout(HTTP_TIMEOUT, exchange(req, tls)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError(format!(
            "no answer within {}s",
            HTTP_TIMEOUT.as_secs()
        ))),
    }
}

async fn exchange(
    req: HttpRequest,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<HttpResponse, HttpError> {
    let uri = req.uri().clone();
    let e = |what: &str, err: &dyn std::fmt::Display| HttpError(format!("{what} {uri}: {err}"));
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(HttpError(format!("unsupported URL {uri}"))),
    };
    let host = uri
        .host()
        .ok_or_else(|| HttpError(format!("no host in {uri}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|err| e("cannot resolve", &err))?
        .next()
        .ok_or_else(|| HttpError(format!("{host} has no address")))?;
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|err| e("socket for", &err))?;
    let mark = OUTBOUND_MARK.load(Ordering::Relaxed);
    if mark != 0 {
        socket2::SockRef::from(&sock)
            .set_mark(mark)
            .map_err(|err| e("SO_MARK for", &err))?;
    }
    let tcp = sock
        .connect(addr)
        .await
        .map_err(|err| e("cannot connect to", &err))?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let (parts, body) = req.into_parts();
    let mut out = hyper::Request::builder()
        .method(parts.method)
        .uri(path)
        .header(hyper::header::HOST, authority);
    for (k, v) in parts.headers.iter() {
        out = out.header(k, v);
    }
    let out = out
        .body(Full::new(Bytes::from(body)))
        .map_err(|err| e("bad request for", &err))?;
    if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|err| e("bad TLS name in", &err))?;
        let cfg = match tls {
            Some(cfg) => cfg,
            None => tls_config().map_err(|m| e(&m, &""))?,
        };
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|err| e("TLS handshake with", &err))?;
        send(hyper_util::rt::TokioIo::new(tls), out, &uri).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), out, &uri).await
    }
}

async fn send<I>(
    io: I,
    req: hyper::Request<Full<Bytes>>,
    uri: &hyper::Uri,
) -> Result<HttpResponse, HttpError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|err| HttpError(format!("HTTP with {uri}: {err}")))?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|err| HttpError(format!("HTTP request to {uri}: {err}")));
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            conn.abort();
            return Err(e);
        }
    };
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, MAX_HTTP_BODY)
        .collect()
        .await
        .map_err(|err| HttpError(format!("reading the answer of {uri}: {err}")))?
        .to_bytes()
        .to_vec();
    conn.abort();
    Ok(HttpResponse::from_parts(parts, body))
}

/// rustls client config trusting the system CA bundle (`SSL_CERT_FILE`, else Debian's
/// `/etc/ssl/certs/ca-certificates.crt`).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CFG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CFG.get_or_init(|| {
        use rustls_pki_types::pem::PemObject as _;
        let path = std::env::var("SSL_CERT_FILE")
            .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".into());
        let mut roots = rustls::RootCertStore::empty();
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&path)
            .map_err(|e| format!("cannot read the CA bundle {path} ({e}) for"))?;
        for c in certs.flatten() {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(format!("no CA certificate in {path} to verify"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup ({e}) for"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// Workload verifiers (data path)
// ---------------------------------------------------------------------------------------------

/// A verifier being discovered, or discovered.
type VerifierCell = tokio::sync::OnceCell<Arc<OidcVerifier>>;

/// One verifier per (issuer, audience), discovered on first use and kept for the life of the
/// agent. A failed discovery is not cached (the next connection tries again).
#[derive(Default)]
pub struct WorkloadVerifiers {
    map: Mutex<HashMap<(String, String), Arc<VerifierCell>>>,
}

/// Audience a workload token must carry when the identity's `oidc` gives none.
pub const DEFAULT_WORKLOAD_AUDIENCE: &str = "tollgate";

impl WorkloadVerifiers {
    /// The verifier for `issuer` and `audience` (groups claim `groups`).
    pub async fn get(&self, issuer: &str, audience: &str) -> Result<Arc<OidcVerifier>, OidcError> {
        let cell = lock(&self.map)
            .entry((issuer.to_string(), audience.to_string()))
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            OidcVerifier::discover(issuer, audience, "groups")
                .await
                .map(Arc::new)
        })
        .await
        .cloned()
    }
}

#[cfg(test)]
mod tests;

/// Every claim of a verified token as strings, for policy rules' `claims` conditions: a string
/// claim is one value, an array its string/number/bool elements, numbers and bools their text;
/// objects and nulls are left out.
pub fn claim_values(c: &Claims) -> std::collections::BTreeMap<String, Vec<String>> {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in &c.extra {
        let vals: Vec<String> = match v {
            Value::Array(a) => a.iter().filter_map(scalar).collect(),
            v => scalar(v).into_iter().collect(),
        };
        out.insert(k.clone(), vals);
    }
    out.insert("sub".into(), vec![c.subject.clone()]);
    out
}
