//! A target's secret (`password_file`, `token_file`, `key_file` or `env`), read when a
//! session logs in upstream, for every protocol.

use tollgate_policy::{Credential, SecretSource};

/// A secret that could not be read; never carries the secret itself.
#[derive(Debug, thiserror::Error)]
#[error("credential {credential}: {reason}")]
pub struct SecretError {
    /// The credential's name in the policy.
    pub credential: String,
    /// What went wrong (the file and its error, or the unset variable).
    pub reason: String,
}

/// The secret of credential `name`, if it has one: a file's content without trailing line
/// ends (what `echo secret > file` leaves), or an environment variable's value.
pub fn read_secret(name: &str, cred: &Credential) -> Result<Option<Vec<u8>>, SecretError> {
    let err = |reason: String| SecretError {
        credential: name.to_string(),
        reason,
    };
    match cred.secret_source() {
        None => Ok(None),
        Some(SecretSource::PasswordFile(p))
        | Some(SecretSource::TokenFile(p))
        | Some(SecretSource::KeyFile(p)) => crate::secret::read_secret_file(p)
            .map(Some)
            .map_err(|e| err(format!("{}: {e}", p.display()))),
        Some(SecretSource::Env(var)) => std::env::var(var)
            .map(|v| Some(v.into_bytes()))
            .map_err(|_| err(format!("environment variable {var} is not set"))),
    }
}
