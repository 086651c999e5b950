//! Who is calling the admin API. [`ApproverAuth`] turns a bearer token into an [`Approver`];
//! authorization (groups, self-approval, distinct approvers) is the broker's job
//! ([`super::authorize`]), so every implementation gets the same rules.
//!
//! Implementations:
//! - [`LocalToken`]: used when `[approvals.oidc]` is absent. A random token in
//!   `<data_dir>/admin.token` (mode 0600, created by the agent, readable by root only); its
//!   holder is approver `local:root`, in every group.
//! - [`OidcApprovers`]: `[approvals.oidc]` is set: access tokens from the IdP, checked by
//!   `oidc.rs` (signature, issuer, audience, expiry); the groups come from `groups_claim`.
//! - [`NoVerifier`]: refuses every call (503), never lets one through.

use std::{future::Future, path::Path, pin::Pin};

/// An authenticated approver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// Stable subject (OIDC `sub`, or `local:root`); compared for self-approval and distinct
    /// approvers.
    pub subject: String,
    /// Groups from the IdP's groups claim.
    pub groups: Vec<String>,
    /// Member of every group (the local admin token only; never set from a token's claims).
    pub all_groups: bool,
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No usable credentials (missing, malformed, forged, expired or wrong-audience token):
    /// HTTP 401.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The verifier cannot decide now (IdP unreachable, OIDC not available in this build):
    /// HTTP 503, and nothing changes.
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
}

/// The future an [`ApproverAuth`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Approver, AuthError>> + Send + 'a>>;

/// Turns the bearer token of an admin API call into an approver. Object-safe (boxed future) so
/// the agent picks an implementation at run time from the policy.
pub trait ApproverAuth: Send + Sync {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a>;
}

/// The subject the local admin token authenticates as.
pub const LOCAL_SUBJECT: &str = "local:root";

/// The local admin token (`<data_dir>/admin.token`).
pub struct LocalToken {
    token: String,
}

impl LocalToken {
    /// Read the token, creating it (32 random bytes, hex, mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<LocalToken> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = data_dir.join("admin.token");
        match crate::secret::read_secret_text(&path) {
            Ok(token) if token.len() >= 32 => return Ok(LocalToken { token }),
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is too short to be an admin token; remove it to create a new one",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(data_dir)?;
        let bytes: [u8; 32] = rand::random();
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        Ok(LocalToken { token })
    }

    pub fn new(token: String) -> LocalToken {
        LocalToken { token }
    }
}

/// Compare without an early exit, so response time does not reveal a matching prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApproverAuth for LocalToken {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            if same(bearer.as_bytes(), self.token.as_bytes()) {
                Ok(Approver {
                    subject: LOCAL_SUBJECT.into(),
                    groups: Vec::new(),
                    all_groups: true,
                })
            } else {
                Err(AuthError::Unauthenticated(
                    "the bearer token is not this agent's admin token".into(),
                ))
            }
        })
    }
}

/// `[approvals.oidc]` is set but no OIDC verifier is available: fail closed.
pub struct NoVerifier;

impl ApproverAuth for NoVerifier {
    fn authenticate<'a>(&'a self, _bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(async {
            Err(AuthError::Unavailable(
                "[approvals.oidc] is configured but this agent cannot verify OIDC tokens yet; remove [approvals.oidc] to use the local admin token".into(),
            ))
        })
    }
}

/// `[approvals.oidc]`: approvers present an access token from the organisation's IdP. The
/// issuer is discovered on first use (and again after a failed discovery), so an IdP that is
/// down when the agent starts only makes calls answer 503 until it is back.
pub struct OidcApprovers {
    issuer: String,
    audience: String,
    groups_claim: String,
    verifier: tokio::sync::Mutex<Option<std::sync::Arc<crate::oidc::OidcVerifier>>>,
}

impl OidcApprovers {
    pub fn new(cfg: &tollgate_policy::OidcConfig) -> OidcApprovers {
        OidcApprovers {
            issuer: cfg.issuer.clone(),
            audience: cfg
                .audience
                .clone()
                .or_else(|| cfg.client_id.clone())
                .unwrap_or_else(|| "tollgate".into()),
            groups_claim: cfg.groups_claim.clone(),
            verifier: tokio::sync::Mutex::new(None),
        }
    }

    async fn verifier(&self) -> Result<std::sync::Arc<crate::oidc::OidcVerifier>, AuthError> {
        let mut v = self.verifier.lock().await;
        if let Some(v) = v.as_ref() {
            return Ok(v.clone());
        }
        let found =
            crate::oidc::OidcVerifier::discover(&self.issuer, &self.audience, &self.groups_claim)
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let found = std::sync::Arc::new(found);
        *v = Some(found.clone());
        Ok(found)
    }
}

impl ApproverAuth for OidcApprovers {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let verifier = self.verifier().await?;
            match verifier.verify_bearer(bearer).await {
                Ok(c) => Ok(Approver {
                    subject: c.subject,
                    groups: c.groups,
                    all_groups: false,
                }),
                Err(e) if e.is_unavailable() => Err(AuthError::Unavailable(e.to_string())),
                Err(e) => Err(AuthError::Unauthenticated(e.to_string())),
            }
        })
    }
}
