//! Workload OIDC (`oidc = {...}` on an identity): the bot presents a token in its protocol's
//! own way (a PostgreSQL password, an SSH password, an HTTP `Authorization` header); the
//! check, its audit event and observe mode are the same for every protocol.

use serde_json::json;
use tollgate_policy::{IdentityOidc, Mode};

use super::SessionCx;
use crate::{
    obj,
    oidc::{self, Claims, OidcError},
};

/// What the workload token check decided.
pub enum WorkloadAuth {
    /// The token verified and matched `require_claims`.
    Verified(Claims),
    /// Observe mode: the check failed, was audited, and is not enforced.
    Unverified,
    /// Refuse the session: the handler tells the bot why in its protocol
    /// ([`OidcError::is_unavailable`] separates "try again" from "wrong token").
    Refused(OidcError),
}

impl SessionCx {
    /// Verify the token the bot presented for identity OIDC `o` (issuer, audience,
    /// signature, expiry, then `require_claims`) and audit the outcome as an `auth` event.
    /// The token is never logged, audited or recorded: only the outcome and its `sub`. The
    /// caller sets [`SessionCx::claims`] from a verified token.
    pub async fn check_workload_token(&self, o: &IdentityOidc, token: &str) -> WorkloadAuth {
        let audience = o
            .audience
            .as_deref()
            .unwrap_or(oidc::DEFAULT_WORKLOAD_AUDIENCE);
        let result = if token.is_empty() {
            Err(OidcError::Malformed(
                "empty password: the bot sent no token",
            ))
        } else {
            match self.agent.workload.get(&o.issuer, audience).await {
                Ok(v) => match v.verify_bearer(token).await {
                    Ok(c) => oidc::check_required_claims(&c, &o.require_claims).map(|()| c),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(c) => {
                self.audit_event(
                    "auth",
                    obj(
                        json!({"method": "oidc", "outcome": "allowed", "oidc_subject": c.subject,
                               "oidc_issuer": o.issuer, "oidc_groups": c.groups}),
                    ),
                );
                WorkloadAuth::Verified(c)
            }
            Err(e) => {
                let observe = self.agent.gen.load().policy.agent.mode == Mode::Observe;
                self.audit_event(
                    "auth",
                    obj(
                        json!({"method": "oidc", "outcome": "denied", "reason": e.to_string(),
                               "oidc_issuer": o.issuer, "enforced": !observe}),
                    ),
                );
                if observe {
                    WorkloadAuth::Unverified
                } else {
                    WorkloadAuth::Refused(e)
                }
            }
        }
    }
}
