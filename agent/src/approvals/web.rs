//! The approvals web page (`/ui/` on the admin listener) and its login.
//!
//! Layout: [`WebUi`] holds the OIDC web client (`[approvals.oidc] client_id`,
//! `client_secret_file`), the logins in progress and the sessions; [`WebUi::handle`] serves
//! `/ui/...`; the API (`api.rs`) asks [`WebUi::session_approver`] when a call carries the
//! session cookie instead of a bearer token. The page itself is static (`ui/index.html`,
//! `ui/app.js`, `ui/app.css`, embedded) and only calls the JSON API, so nothing from a request
//! (operation text comes from bots) is ever rendered by the server.
//!
//! Login: authorization code + PKCE (S256) with `state` and `nonce`, through the `openidconnect`
//! crate (discovery, the authorize URL, the code exchange, and the ID token's signature,
//! issuer, audience = `client_id`, expiry and nonce checks). The `state` is also bound to the
//! browser that started the login by a short-lived `tollgate_login` cookie (SameSite=Lax, so it
//! comes back on the IdP's cross-site redirect), so nobody can complete a login they did not
//! start in that browser (login CSRF).
//!
//! Session: a random 256-bit id in the `tollgate_session` cookie (`HttpOnly; SameSite=Strict;
//! Path=/`, plus `Secure` when the redirect URI is https), kept in memory under its SHA-256
//! (a restart signs everyone out), expiring after [`SESSION_TTL`]. It holds the approver's
//! subject and groups as the IdP said at login, and a per-session CSRF token that every
//! state-changing call with the cookie must echo in `X-Tollgate-CSRF` (bearer calls need
//! none: a browser never attaches a bearer token by itself).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Method, Request, Response, StatusCode,
};
use openidconnect::{
    core::{CoreAuthenticationFlow, CoreClient, CoreJwsSigningAlgorithm, CoreProviderMetadata},
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce,
    OAuth2TokenResponse as _, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    TokenResponse as _,
};
use serde_json::{json, Value};
use sha2::Digest as _;

use super::auth::{Approver, ApproverAuth};
use crate::lock;

/// How long a web session lasts (absolute; groups are those of the login).
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// How long a login may take between `/ui/login` and `/ui/callback`.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Most logins in progress kept (the oldest is dropped beyond this).
const MAX_LOGINS: usize = 1024;
/// Most sessions kept (the one expiring first is dropped beyond this).
const MAX_SESSIONS: usize = 10_000;
/// Provider metadata (endpoints, signing keys) is reused for this long.
const META_TTL: Duration = Duration::from_secs(60);

pub const SESSION_COOKIE: &str = "tollgate_session";
const LOGIN_COOKIE: &str = "tollgate_login";
/// The header a cookie-authenticated state-changing call must carry.
pub const CSRF_HEADER: &str = "x-tollgate-csrf";

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// No inline script or style, nothing from elsewhere, never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The web page: on (OIDC web client configured) or off with the reason shown at `/ui/`.
pub enum Web {
    Off(String),
    On(Arc<WebUi>),
}

impl Web {
    /// From `[approvals.oidc]`; `admin` is the admin listener's address (the redirect URI is
    /// `http://<admin>/ui/callback`). Fails only when `client_secret_file` cannot be read.
    pub fn from_config(
        oidc: Option<&tollgate_policy::OidcConfig>,
        admin: std::net::SocketAddr,
        bearer: Arc<dyn ApproverAuth>,
    ) -> std::io::Result<Web> {
        let Some(oidc) = oidc else {
            return Ok(Web::Off("The approvals web page needs an OIDC provider: set [approvals.oidc] with issuer, client_id and client_secret_file in the policy. (The local admin token is for the CLI only.)".into()));
        };
        let Some(client_id) = oidc.client_id.clone() else {
            return Ok(Web::Off("The approvals web page needs [approvals.oidc] client_id (and client_secret_file for a confidential client) to log approvers in.".into()));
        };
        if admin.ip().is_unspecified() {
            // The redirect URI is derived from the admin address; 0.0.0.0 or :: names no host a
            // browser could come back to (and the admin listener belongs on loopback).
            return Ok(Web::Off(format!("The approvals web page needs [agent] admin to be a specific address (not {admin}): its login redirect URI is http://<admin>/ui/callback.")));
        }
        let client_secret = match &oidc.client_secret_file {
            Some(p) => {
                let s = crate::secret::read_secret_text(p).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot read [approvals.oidc] client_secret_file {}: {e}",
                            p.display()
                        ),
                    )
                })?;
                Some(s)
            }
            None => None,
        };
        Ok(Web::On(Arc::new(WebUi {
            issuer: oidc.issuer.clone(),
            client_id,
            client_secret,
            redirect: format!("http://{admin}/ui/callback"),
            groups_claim: oidc.groups_claim.clone(),
            bearer,
            logins: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            meta: tokio::sync::Mutex::new(None),
        })))
    }
}

struct PendingLogin {
    /// SHA-256 of the `tollgate_login` cookie of the browser that started it.
    binding: [u8; 32],
    nonce: String,
    pkce_verifier: String,
    started: Instant,
}

struct Session {
    subject: String,
    groups: Vec<String>,
    csrf: String,
    expires: Instant,
}

pub struct WebUi {
    issuer: String,
    client_id: String,
    client_secret: Option<String>,
    redirect: String,
    groups_claim: String,
    /// The API's bearer verifier: reads the groups from the access token when the ID token
    /// has none.
    bearer: Arc<dyn ApproverAuth>,
    /// By `state`.
    logins: Mutex<HashMap<String, PendingLogin>>,
    /// By SHA-256 of the session id (hex).
    sessions: Mutex<HashMap<String, Session>>,
    meta: tokio::sync::Mutex<Option<(Instant, CoreProviderMetadata)>>,
}

fn random_hex() -> String {
    let b: [u8; 32] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn digest(s: &str) -> [u8; 32] {
    sha2::Sha256::digest(s.as_bytes()).into()
}

fn digest_hex(s: &str) -> String {
    digest(s).iter().map(|x| format!("{x:02x}")).collect()
}

/// Compare without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// `s` with HTML's special characters escaped (server-rendered messages only).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A response with the page's security headers.
fn page(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A small server-rendered HTML page (no script): `message` is escaped.
fn message_page(
    status: StatusCode,
    title: &str,
    message: &str,
    link: Option<(&str, &str)>,
) -> Response<Full<Bytes>> {
    let link = link
        .map(|(href, text)| format!("<p><a href=\"{}\">{}</a></p>", esc(href), esc(text)))
        .unwrap_or_default();
    page(
        status,
        "text/html; charset=utf-8",
        format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tollgate: {t}</title><link rel=\"stylesheet\" href=\"/ui/app.css\"></head><body><h1>{t}</h1><p id=\"message\">{m}</p>{link}</body></html>\n",
            t = esc(title),
            m = esc(message)
        ),
    )
}

fn json_page(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    page(status, "application/json", format!("{v}\n"))
}

fn redirect(to: &str, cookies: &[String]) -> Response<Full<Bytes>> {
    let mut r = page(StatusCode::SEE_OTHER, "text/plain", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

/// What `/ui/...` answers when the page is off.
pub fn handle_off(reason: &str, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/ui/app.css" => page(StatusCode::OK, "text/css", APP_CSS),
        _ => message_page(
            StatusCode::NOT_FOUND,
            "approvals web page unavailable",
            reason,
            None,
        ),
    }
}

impl WebUi {
    fn cookie_attrs(&self) -> &'static str {
        if self.redirect.starts_with("https://") {
            "; HttpOnly; Secure"
        } else {
            // The admin listener is plain http (loopback): a Secure cookie would never be sent.
            "; HttpOnly"
        }
    }

    /// The approver a session cookie stands for, and the session's CSRF token.
    pub fn session_approver(&self, headers: &hyper::HeaderMap) -> Option<(Approver, String)> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let key = digest_hex(id);
        let mut s = lock(&self.sessions);
        match s.get(&key) {
            Some(sess) if sess.expires > Instant::now() => Some((
                Approver {
                    subject: sess.subject.clone(),
                    groups: sess.groups.clone(),
                    all_groups: false,
                },
                sess.csrf.clone(),
            )),
            Some(_) => {
                s.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Whether the request's CSRF header matches `expected`.
    pub fn csrf_ok(headers: &hyper::HeaderMap, expected: &str) -> bool {
        headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| same(v.as_bytes(), expected.as_bytes()))
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/ui") => redirect("/ui/", &[]),
            (&Method::GET, "/ui/app.js") => {
                page(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS)
            }
            (&Method::GET, "/ui/app.css") => {
                page(StatusCode::OK, "text/css; charset=utf-8", APP_CSS)
            }
            (&Method::GET, "/ui/") => {
                if self.session_approver(req.headers()).is_some() {
                    page(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
                } else {
                    redirect("/ui/login", &[])
                }
            }
            (&Method::GET, "/ui/session") => match self.session_approver(req.headers()) {
                Some((who, csrf)) => json_page(
                    StatusCode::OK,
                    json!({"subject": who.subject, "groups": who.groups, "csrf": csrf}),
                ),
                None => json_page(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "not signed in (or the session expired): open /ui/login", "status": 401}),
                ),
            },
            (&Method::GET, "/ui/login") => self.login().await,
            (&Method::GET, "/ui/callback") => self.callback(&req).await,
            (&Method::POST, "/ui/logout") => self.logout(req.headers()),
            (_, "/ui/logout") => json_page(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "sign out with POST /ui/logout and the X-Tollgate-CSRF header", "status": 405}),
            ),
            _ => message_page(
                StatusCode::NOT_FOUND,
                "not found",
                &format!("no page {path}"),
                Some(("/ui/", "approvals")),
            ),
        }
    }

    /// The provider's metadata, rediscovered after [`META_TTL`] (keys rotate).
    async fn metadata(&self) -> Result<CoreProviderMetadata, String> {
        let mut m = self.meta.lock().await;
        if let Some((at, meta)) = m.as_ref() {
            if at.elapsed() < META_TTL {
                return Ok(meta.clone());
            }
        }
        let url = IssuerUrl::new(self.issuer.clone()).map_err(|e| e.to_string())?;
        crate::oidc::check_scheme(url.url())?;
        let meta = CoreProviderMetadata::discover_async(url, &crate::oidc::http_client())
            .await
            .map_err(|e| crate::oidc::error_chain(&e))?;
        crate::oidc::check_scheme(meta.authorization_endpoint().url())
            .map_err(|e| format!("authorization_endpoint: {e}"))?;
        if let Some(t) = meta.token_endpoint() {
            crate::oidc::check_scheme(t.url()).map_err(|e| format!("token_endpoint: {e}"))?;
        }
        *m = Some((Instant::now(), meta.clone()));
        Ok(meta)
    }

    fn client(&self, meta: CoreProviderMetadata) -> Result<ClientOf, String> {
        let redirect = RedirectUrl::new(self.redirect.clone()).map_err(|e| e.to_string())?;
        Ok(CoreClient::from_provider_metadata(
            meta,
            ClientId::new(self.client_id.clone()),
            self.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect))
    }

    /// `/ui/login`: remember state, nonce and PKCE verifier; send the browser to the IdP.
    async fn login(&self) -> Response<Full<Bytes>> {
        let meta = match self.metadata().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "web login: OIDC discovery failed");
                return message_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sign-in unavailable",
                    &format!("cannot reach the OIDC provider {}: {e}", self.issuer),
                    Some(("/ui/login", "try again")),
                );
            }
        };
        let client = match self.client(meta) {
            Ok(c) => c,
            Err(e) => {
                return message_page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "sign-in unavailable",
                    &e,
                    None,
                )
            }
        };
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("groups".into()))
            .set_pkce_challenge(challenge)
            .url();
        let binding = random_hex();
        {
            let mut l = lock(&self.logins);
            l.retain(|_, p| p.started.elapsed() < LOGIN_TTL);
            while l.len() >= MAX_LOGINS {
                let oldest = l
                    .iter()
                    .min_by_key(|(_, p)| p.started)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => l.remove(&k),
                    None => break,
                };
            }
            l.insert(
                state.secret().clone(),
                PendingLogin {
                    binding: digest(&binding),
                    nonce: nonce.secret().clone(),
                    pkce_verifier: verifier.secret().clone(),
                    started: Instant::now(),
                },
            );
        }
        // Lax: the IdP's redirect back is a cross-site top-level GET, which Strict would strip.
        let c = format!(
            "{LOGIN_COOKIE}={binding}; Path=/ui/callback; Max-Age={}; SameSite=Lax{}",
            LOGIN_TTL.as_secs(),
            self.cookie_attrs()
        );
        redirect(url.as_str(), &[c])
    }

    /// `/ui/callback`: check state and its browser binding, exchange the code (with the PKCE
    /// verifier and the client secret), verify the ID token, start a session.
    async fn callback(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let fail = |status: StatusCode, msg: &str| {
            let clear = format!(
                "{LOGIN_COOKIE}=; Path=/ui/callback; Max-Age=0; SameSite=Lax{}",
                self.cookie_attrs()
            );
            let mut r = message_page(
                status,
                "sign-in failed",
                msg,
                Some(("/ui/login", "sign in again")),
            );
            if let Ok(v) = HeaderValue::from_str(&clear) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        };
        let query = req.uri().query().unwrap_or("");
        let params: HashMap<String, String> =
            openidconnect::url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
        if let Some(err) = params.get("error") {
            let desc = params
                .get("error_description")
                .map(String::as_str)
                .unwrap_or("");
            return fail(
                StatusCode::BAD_REQUEST,
                &format!("the OIDC provider refused: {err} {desc}"),
            );
        }
        let (Some(code), Some(state)) = (params.get("code"), params.get("state")) else {
            return fail(StatusCode::BAD_REQUEST, "the callback has no code or state");
        };
        let pending = lock(&self.logins).remove(state);
        let Some(pending) = pending.filter(|p| p.started.elapsed() < LOGIN_TTL) else {
            return fail(
                StatusCode::BAD_REQUEST,
                "unknown or expired login (state); start again",
            );
        };
        let bound =
            cookie(req.headers(), LOGIN_COOKIE).is_some_and(|c| same(&digest(c), &pending.binding));
        if !bound {
            return fail(
                StatusCode::BAD_REQUEST,
                "this login was not started in this browser",
            );
        }
        let meta = match self.metadata().await {
            Ok(m) => m,
            Err(e) => {
                return fail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("cannot reach the OIDC provider: {e}"),
                )
            }
        };
        let client = match self.client(meta) {
            Ok(c) => c,
            Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, &e),
        };
        let exchange = match client.exchange_code(AuthorizationCode::new(code.clone())) {
            Ok(x) => x,
            Err(e) => {
                return fail(
                    StatusCode::BAD_GATEWAY,
                    &format!("the provider has no token endpoint: {e}"),
                )
            }
        };
        let token = match exchange
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier))
            .request_async(&crate::oidc::http_client())
            .await
        {
            Ok(t) => t,
            Err(e) => {
                let e = crate::oidc::error_chain(&e);
                tracing::warn!(error = %e, "web login: code exchange failed");
                return fail(
                    StatusCode::BAD_GATEWAY,
                    &format!("code exchange failed: {e}"),
                );
            }
        };
        let Some(id_token) = token.id_token() else {
            return fail(StatusCode::BAD_GATEWAY, "the provider returned no ID token");
        };
        use CoreJwsSigningAlgorithm as A;
        // Asymmetric signatures only (never HS* with the client secret, never none).
        let verifier = client.id_token_verifier().set_allowed_algs([
            A::RsaSsaPkcs1V15Sha256,
            A::RsaSsaPkcs1V15Sha384,
            A::RsaSsaPkcs1V15Sha512,
            A::RsaSsaPssSha256,
            A::RsaSsaPssSha384,
            A::RsaSsaPssSha512,
            A::EcdsaP256Sha256,
            A::EcdsaP384Sha384,
            A::EdDsa,
        ]);
        let claims = match id_token.claims(&verifier, &Nonce::new(pending.nonce)) {
            Ok(c) => c,
            Err(e) => {
                let e = crate::oidc::error_chain(&e);
                tracing::warn!(error = %e, "web login: ID token rejected");
                return fail(
                    StatusCode::UNAUTHORIZED,
                    &format!("the ID token was rejected: {e}"),
                );
            }
        };
        let subject = claims.subject().as_str().to_string();
        // The groups: the ID token's groups claim (it verified, so its payload is trusted), else
        // the access token's, if it verifies as a bearer token of the same subject.
        let mut groups = groups_of(&id_token.to_string(), &self.groups_claim);
        if groups.is_none() {
            if let Ok(a) = self
                .bearer
                .authenticate(token.access_token().secret())
                .await
            {
                if a.subject == subject {
                    groups = Some(a.groups);
                }
            }
        }
        let groups = groups.unwrap_or_default();
        let id = random_hex();
        let csrf = random_hex();
        {
            let mut s = lock(&self.sessions);
            let now = Instant::now();
            s.retain(|_, v| v.expires > now);
            while s.len() >= MAX_SESSIONS {
                let first = s
                    .iter()
                    .min_by_key(|(_, v)| v.expires)
                    .map(|(k, _)| k.clone());
                match first {
                    Some(k) => s.remove(&k),
                    None => break,
                };
            }
            s.insert(
                digest_hex(&id),
                Session {
                    subject: subject.clone(),
                    groups: groups.clone(),
                    csrf,
                    expires: now + SESSION_TTL,
                },
            );
        }
        tracing::info!(subject = %subject, groups = ?groups, "web login");
        let session = format!(
            "{SESSION_COOKIE}={id}; Path=/; Max-Age={}; SameSite=Strict{}",
            SESSION_TTL.as_secs(),
            self.cookie_attrs()
        );
        let clear = format!(
            "{LOGIN_COOKIE}=; Path=/ui/callback; Max-Age=0; SameSite=Lax{}",
            self.cookie_attrs()
        );
        // A page that moves on by itself rather than a redirect: the browser arrived here from
        // the IdP (cross-site), and a redirect would carry that on, so the SameSite=Strict
        // cookie would not be sent with the next request for /ui/.
        let mut r = page(
            StatusCode::OK,
            "text/html; charset=utf-8",
            format!(
                "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url=/ui/\"><title>tollgate: signed in</title><link rel=\"stylesheet\" href=\"/ui/app.css\"></head><body><p>Signed in as {}. <a href=\"/ui/\">Continue to the approvals</a>.</p></body></html>\n",
                esc(&subject)
            ),
        );
        for c in [session, clear] {
            if let Ok(v) = HeaderValue::from_str(&c) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        r
    }

    /// `POST /ui/logout` (with the CSRF header): end the session, clear the cookie.
    fn logout(&self, headers: &hyper::HeaderMap) -> Response<Full<Bytes>> {
        let Some((_, csrf)) = self.session_approver(headers) else {
            return json_page(
                StatusCode::UNAUTHORIZED,
                json!({"error": "not signed in", "status": 401}),
            );
        };
        if !Self::csrf_ok(headers, &csrf) {
            return json_page(
                StatusCode::FORBIDDEN,
                json!({"error": "missing or wrong X-Tollgate-CSRF header", "status": 403}),
            );
        }
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            lock(&self.sessions).remove(&digest_hex(id));
        }
        let mut r = json_page(StatusCode::OK, json!({"signed_out": true}));
        let clear = format!(
            "{SESSION_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict{}",
            self.cookie_attrs()
        );
        if let Ok(v) = HeaderValue::from_str(&clear) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        r
    }
}

/// The client type [`CoreClient::from_provider_metadata`] builds, with a redirect URI.
type ClientOf = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

/// The groups claim of a (verified) JWT's payload: an array of strings or one string; `None`
/// when the claim is absent.
fn groups_of(jwt: &str, claim: &str) -> Option<Vec<String>> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    match v.get(claim)? {
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
        ),
        Value::String(s) => Some(vec![s.clone()]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = hyper::HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; tollgate_session_x=2"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("tollgate_session=abc"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "a"), Some("1"));
        assert_eq!(cookie(&h, "b"), None);
    }

    #[test]
    fn escaping_and_groups() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"groups":["dba"],"g2":"x"}"#);
        let jwt = format!("h.{p}.s");
        assert_eq!(groups_of(&jwt, "groups"), Some(vec!["dba".to_string()]));
        assert_eq!(groups_of(&jwt, "g2"), Some(vec!["x".to_string()]));
        assert_eq!(groups_of(&jwt, "none"), None);
    }

    #[test]
    fn without_oidc_the_page_explains_why() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9465));
        let web = Web::from_config(None, addr, Arc::new(super::super::auth::NoVerifier))
            .expect("no file to read");
        let Web::Off(reason) = web else {
            panic!("the page is on without OIDC");
        };
        assert!(
            reason.contains("OIDC provider") && reason.contains("CLI"),
            "{reason}"
        );
        let oidc = tollgate_policy::OidcConfig {
            issuer: "https://idp.example".into(),
            client_id: Some("tollgate".into()),
            client_secret_file: None,
            audience: None,
            groups_claim: "groups".into(),
        };
        let any = std::net::SocketAddr::from(([0, 0, 0, 0], 9465));
        let web = Web::from_config(Some(&oidc), any, Arc::new(super::super::auth::NoVerifier))
            .expect("no file to read");
        assert!(matches!(&web, Web::Off(r) if r.contains("specific address")));
        let web = Web::from_config(Some(&oidc), addr, Arc::new(super::super::auth::NoVerifier))
            .expect("no file to read");
        assert!(matches!(&web, Web::On(w) if w.redirect == "http://127.0.0.1:9465/ui/callback"));
        let r = handle_off(&reason, "/ui/");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
        assert!(r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .is_ok_and(|c| c.contains("script-src 'self'")));
    }

    #[test]
    fn csrf_header_must_match() {
        let mut h = hyper::HeaderMap::new();
        assert!(!WebUi::csrf_ok(&h, "tok"));
        h.insert(CSRF_HEADER, HeaderValue::from_static("tok2"));
        assert!(!WebUi::csrf_ok(&h, "tok"));
        h.insert(CSRF_HEADER, HeaderValue::from_static("tok"));
        assert!(WebUi::csrf_ok(&h, "tok"));
    }
}
