//! Host key trust without the server's key: the agent's SSH CA signs a host certificate for the
//! name or IP the bot dialled, and `tollgate ca export --ssh` prints the `@cert-authority` line
//! for the host-wide `/etc/ssh/ssh_known_hosts`. A bot that trusts neither this CA nor a
//! `host_key_file` sees OpenSSH's usual host-key error, never a silent accept.
//!
//! Files under `<data_dir>/ca/`: `ssh_ca_ed25519` (the CA) and `ssh_host_ed25519` (the key the
//! certificates certify), OpenSSH private keys created with mode 0600, `O_EXCL`, `O_NOFOLLOW`.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use russh::keys::{
    ssh_key::{
        certificate::{Builder, CertType},
        private::Ed25519Keypair,
        LineEnding,
    },
    Certificate, PrivateKey,
};

/// The agent's SSH CA of each data directory, loaded (or created) on first use: a field of the
/// SSH handler, so its connections share one CA without a process-wide cache.
#[derive(Default)]
pub struct Cas {
    by_data_dir: Mutex<HashMap<PathBuf, Arc<SshCa>>>,
}

impl Cas {
    /// The CA of `data_dir`, loaded once.
    pub fn get(&self, data_dir: &Path) -> Result<Arc<SshCa>, String> {
        let mut map = crate::lock(&self.by_data_dir);
        if let Some(ca) = map.get(data_dir) {
            return Ok(ca.clone());
        }
        let ca = Arc::new(SshCa::load_or_create(data_dir)?);
        map.insert(data_dir.to_path_buf(), ca.clone());
        Ok(ca)
    }
}

/// The agent's SSH CA and the host key it certifies.
pub struct SshCa {
    ca: PrivateKey,
    host: PrivateKey,
}

fn load_or_create_key(path: &Path) -> Result<PrivateKey, String> {
    if !path.exists() {
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&rand::random::<[u8; 32]>()));
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| format!("encoding {}: {e}", path.display()))?;
        let created = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
        match created {
            Ok(()) => {}
            // Another process (the agent, or `ca export`) created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("creating {}: {e}", path.display())),
        }
    }
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    PrivateKey::from_openssh(text.as_bytes())
        .map_err(|e| format!("{}: not an OpenSSH private key: {e}", path.display()))
}

impl SshCa {
    /// Load the CA from `<data_dir>/ca/`, creating it on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<SshCa, String> {
        let dir = data_dir.join("ca");
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(SshCa {
            ca: load_or_create_key(&dir.join("ssh_ca_ed25519"))?,
            host: load_or_create_key(&dir.join("ssh_host_ed25519"))?,
        })
    }

    /// The line for `/etc/ssh/ssh_known_hosts` (narrow `*` to the protected hosts if wanted).
    pub fn authority_line(&self) -> Result<String, String> {
        let public = self
            .ca
            .public_key()
            .to_openssh()
            .map_err(|e| e.to_string())?;
        Ok(format!("@cert-authority * {public} tollgate-ssh-ca\n"))
    }

    /// The host key the certificates certify.
    pub fn host_key(&self) -> PrivateKey {
        self.host.clone()
    }

    /// A host certificate for `principals` (the names and IPs the bot may have dialled), valid
    /// from an hour ago for a day: made per connection, so it never needs renewing.
    pub fn host_cert(&self, principals: &[String]) -> Result<Certificate, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut b = Builder::new(
            rand::random::<[u8; 32]>().to_vec(),
            self.host.public_key().key_data().clone(),
            now.saturating_sub(3600),
            now + 86_400,
        )
        .map_err(|e| e.to_string())?;
        b.cert_type(CertType::Host).map_err(|e| e.to_string())?;
        b.key_id("tollgate").map_err(|e| e.to_string())?;
        for p in principals {
            b.valid_principal(p.clone()).map_err(|e| e.to_string())?;
        }
        b.sign(&self.ca).map_err(|e| e.to_string())
    }
}
