//! The agent's SSH client to the real server: host key checked against the target's
//! `known_hosts` file (unknown or changed fails closed, naming the file), login with the
//! target's credential (`key_file` or `password_file`), which the bot never sees.

use std::{path::PathBuf, sync::Arc};

use russh::{
    client,
    keys::{self, PrivateKeyWithHashAlg, PublicKey},
};
use tokio::net::TcpStream;

/// Why the upstream SSH login failed; the message is shown to the bot on stderr, so it never
/// contains a secret (paths and host names only).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The target has no `known_hosts`: the agent cannot check whom it talks to.
    #[error("target has no `known_hosts` file configured: add `known_hosts = \"/path\"` to its [[target]] (the agent never trusts an unchecked host key)")]
    NoKnownHosts,
    /// The server's host key is not in the file.
    #[error("host key of {host} is not in {file} (fails closed: add the server's key with `ssh-keyscan -p PORT HOST >> {file}`)")]
    UnknownKey { host: String, file: String },
    /// The server's host key differs from the one in the file.
    #[error("host key of {host} CHANGED: it does not match line {line} of {file} (fails closed; possible man-in-the-middle)")]
    ChangedKey {
        host: String,
        file: String,
        line: usize,
    },
    /// The known_hosts file could not be read.
    #[error("cannot read {file}: {reason}")]
    KnownHostsUnreadable { file: String, reason: String },
    /// No credential, or an unreadable one.
    #[error("credential: {0}")]
    Credential(String),
    /// The server refused the injected credential.
    #[error("the upstream server refused the injected credential for user {0}")]
    Refused(String),
    /// SSH protocol error.
    #[error("ssh: {0}")]
    Ssh(String),
}

/// The russh client handler: checks the host key, keeps what it found for the error message.
pub struct UpstreamClient {
    known_hosts: Option<PathBuf>,
    hosts: Vec<(String, u16)>,
    /// Set by `check_server_key` when it refuses: the precise reason.
    refusal: Arc<std::sync::Mutex<Option<UpstreamError>>>,
}

impl client::Handler for UpstreamClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                check_host_key(self.known_hosts.as_ref(), &self.hosts, key)
            }
            // Host certificates upstream are not trusted in this version: fail closed.
            russh::keys::PublicKeyOrCertificate::Certificate(_) => Err(UpstreamError::Ssh(
                "the upstream server presented a host certificate; only plain host keys in known_hosts are supported".into(),
            )),
        };
        let ok = verdict.is_ok();
        if let Err(e) = verdict {
            *crate::lock(&self.refusal) = Some(e);
        }
        Ok(ok)
    }
}

/// Check `key` against `known_hosts` for any of `hosts` (the dialled name and the IP).
pub fn check_host_key(
    known_hosts: Option<&PathBuf>,
    hosts: &[(String, u16)],
    key: &PublicKey,
) -> Result<(), UpstreamError> {
    let file = known_hosts.ok_or(UpstreamError::NoKnownHosts)?;
    let shown = file.display().to_string();
    for (host, port) in hosts {
        match keys::check_known_hosts_path(host, *port, key, file) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(keys::Error::KeyChanged { line }) => {
                return Err(UpstreamError::ChangedKey {
                    host: host_port(host, *port),
                    file: shown,
                    line,
                })
            }
            Err(e) => {
                return Err(UpstreamError::KnownHostsUnreadable {
                    file: shown,
                    reason: e.to_string(),
                })
            }
        }
    }
    Err(UpstreamError::UnknownKey {
        host: hosts
            .first()
            .map(|(h, p)| host_port(h, *p))
            .unwrap_or_default(),
        file: shown,
    })
}

fn host_port(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// What the agent logs in with.
pub struct Login {
    pub user: String,
    pub key_file: Option<PathBuf>,
    /// An OpenSSH user certificate for `key_file` (then the login is by certificate).
    pub cert_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
}

/// Handshake on `stream`, check the host key, log in.
pub async fn connect(
    stream: TcpStream,
    known_hosts: Option<PathBuf>,
    hosts: Vec<(String, u16)>,
    login: &Login,
) -> Result<client::Handle<UpstreamClient>, UpstreamError> {
    let refusal = Arc::new(std::sync::Mutex::new(None));
    let handler = UpstreamClient {
        known_hosts,
        hosts,
        refusal: refusal.clone(),
    };
    let config = Arc::new(client::Config {
        nodelay: true,
        ..Default::default()
    });
    let mut handle = match client::connect_stream(config, stream, handler).await {
        Ok(h) => h,
        Err(e) => {
            return Err(crate::lock(&refusal)
                .take()
                .unwrap_or(UpstreamError::Ssh(e.to_string())))
        }
    };
    let ok = if let Some(path) = &login.key_file {
        let key = keys::load_secret_key(path, None).map_err(|e| {
            UpstreamError::Credential(format!("cannot load key_file {}: {e}", path.display()))
        })?;
        if let Some(cert_path) = &login.cert_file {
            let cert = keys::load_openssh_certificate(cert_path).map_err(|e| {
                UpstreamError::Credential(format!(
                    "cannot load cert_file {}: {e}",
                    cert_path.display()
                ))
            })?;
            if cert.public_key() != key.public_key().key_data() {
                return Err(UpstreamError::Credential(format!(
                    "cert_file {} is not a certificate for key_file {}",
                    cert_path.display(),
                    path.display()
                )));
            }
            let ok = handle
                .authenticate_openssh_cert(login.user.clone(), Arc::new(key), cert)
                .await
                .map_err(|e| UpstreamError::Ssh(e.to_string()))?
                .success();
            return if ok {
                Ok(handle)
            } else {
                Err(UpstreamError::Refused(login.user.clone()))
            };
        }
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| UpstreamError::Ssh(e.to_string()))?
            .flatten();
        handle
            .authenticate_publickey(
                login.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), hash),
            )
            .await
            .map_err(|e| UpstreamError::Ssh(e.to_string()))?
            .success()
    } else if let Some(path) = &login.password_file {
        let password = crate::secret::read_secret_text(path).map_err(|e| {
            UpstreamError::Credential(format!("cannot read password_file {}: {e}", path.display()))
        })?;
        handle
            .authenticate_password(login.user.clone(), password)
            .await
            .map_err(|e| UpstreamError::Ssh(e.to_string()))?
            .success()
    } else {
        return Err(UpstreamError::Credential(
            "the target's credential has neither key_file nor password_file".into(),
        ));
    };
    if !ok {
        return Err(UpstreamError::Refused(login.user.clone()));
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        let k = keys::PrivateKey::from(keys::ssh_key::private::Ed25519Keypair::from_seed(
            &[seed; 32],
        ));
        k.public_key().clone()
    }

    #[test]
    fn known_hosts_match_unknown_changed_and_missing() {
        let dir = std::env::temp_dir().join(format!("tg-ssh-kh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("known_hosts");
        let good = key(1);
        std::fs::write(
            &file,
            format!("[127.0.0.1]:2222 {}\n", good.to_openssh().expect("openssh")),
        )
        .expect("write");
        let hosts = vec![("127.0.0.1".to_string(), 2222)];
        assert!(check_host_key(Some(&file), &hosts, &good).is_ok());
        let e = check_host_key(Some(&file), &hosts, &key(2)).expect_err("changed");
        assert!(
            matches!(&e, UpstreamError::ChangedKey { line: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        let other = vec![("127.0.0.1".to_string(), 2223)];
        let e = check_host_key(Some(&file), &other, &good).expect_err("unknown");
        assert!(matches!(e, UpstreamError::UnknownKey { .. }), "{e}");
        assert!(matches!(
            check_host_key(None, &hosts, &good),
            Err(UpstreamError::NoKnownHosts)
        ));
        let missing = dir.join("nope");
        assert!(check_host_key(Some(&missing), &hosts, &good).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
