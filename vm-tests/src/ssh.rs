//! A real OpenSSH `sshd` on loopback for the SSH handler's tests: its own host key, config and
//! `authorized_keys`, which holds only the agent's key (the bot's key is one it rejects), and
//! helpers to run the unmodified `ssh`/`scp`/`sftp` clients as the unprivileged bot.

use std::{
    fs,
    os::unix::fs::{chown, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use crate::{free_port, wait_child, wait_for, Cgroup, TempDir, BOT_UID};

/// Where Debian's openssh-server puts the daemon (`cargo xtask setup` installs it).
pub const SSHD: &str = "/usr/sbin/sshd";

pub struct SshServer {
    pub port: u16,
    pub dir: TempDir,
    /// The server's host private key (also the target's `host_key_file`).
    pub host_key: PathBuf,
    /// `[127.0.0.1]:PORT <host public key>`: a known_hosts line for this server.
    pub known_hosts_line: String,
    /// The key the agent logs in with (the only authorized one).
    pub agent_key: PathBuf,
    /// The bot's own key: the server rejects it.
    pub bot_key: PathBuf,
    /// A directory owned by the bot (its HOME, control sockets, transfer files).
    pub bot_home: PathBuf,
    /// The bot's known_hosts: the real server's key, as on a host without tollgate.
    pub bot_known_hosts: PathBuf,
    child: Option<Child>,
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tollgate-test", "-f"])
        .arg(path)
        .status()
        .expect("run ssh-keygen (cargo xtask setup installs openssh-client)");
    assert!(st.success(), "ssh-keygen {}", path.display());
}

impl SshServer {
    /// Start `sshd -D` on a free loopback port and wait until it accepts connections.
    pub fn start(tag: &str) -> SshServer {
        SshServer::start_with(tag, "")
    }

    /// Like [`SshServer::start`], with `extra` lines appended to `sshd_config`.
    pub fn start_with(tag: &str, extra: &str) -> SshServer {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} missing: run `cargo xtask setup` (installs openssh-server)"
        );
        let _ = fs::create_dir_all("/run/sshd");
        let dir = TempDir::new(&format!("sshd-{tag}"));
        let d = dir.path().to_path_buf();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let host_key = d.join("host_ed25519");
        let agent_key = d.join("agent_ed25519");
        keygen(&host_key);
        keygen(&agent_key);
        let bot_home = d.join("bot");
        fs::create_dir(&bot_home).expect("mkdir bot home");
        chown(&bot_home, Some(BOT_UID), Some(BOT_UID)).expect("chown bot home");
        let bot_key = bot_home.join("id_ed25519");
        keygen(&bot_key);
        for f in [&bot_key, &bot_key.with_extension("pub")] {
            chown(f, Some(BOT_UID), Some(BOT_UID)).expect("chown bot key");
        }
        let authorized = d.join("authorized_keys");
        fs::copy(agent_key.with_extension("pub"), &authorized).expect("authorized_keys");
        let port = free_port();
        let config = d.join("sshd_config");
        fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 AllowTcpForwarding yes\nAllowAgentForwarding yes\nX11Forwarding no\n\
                 MaxSessions 50\nMaxStartups 100\nAcceptEnv LANG LC_*\n\
                 Subsystem sftp internal-sftp\nLogLevel VERBOSE\n{extra}",
                host_key.display(),
                d.join("sshd.pid").display(),
                authorized.display(),
            ),
        )
        .expect("write sshd_config");
        let log = d.join("sshd.log");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sshd");
        wait_for(Duration::from_secs(10), "sshd listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let public = fs::read_to_string(host_key.with_extension("pub")).expect("host pub");
        let mut parts = public.split_whitespace();
        let known_hosts_line = format!(
            "[127.0.0.1]:{port} {} {}\n",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        );
        let bot_known_hosts = bot_home.join("known_hosts");
        fs::write(&bot_known_hosts, &known_hosts_line).expect("bot known_hosts");
        chown(&bot_known_hosts, Some(BOT_UID), Some(BOT_UID)).expect("chown known_hosts");
        SshServer {
            port,
            dir,
            host_key,
            known_hosts_line,
            agent_key,
            bot_key,
            bot_home,
            bot_known_hosts,
            child: Some(child),
        }
    }

    /// The `[[target]]` and `[credential]` of this server for a policy (target `name`, with the
    /// agent's own known_hosts file written beside).
    pub fn target_toml(&self, name: &str) -> String {
        self.target_toml_with(name, true)
    }

    /// Like [`SshServer::target_toml`]; without `host_key_file` when `host_key` is false (the
    /// agent then shows a host certificate from its own SSH CA).
    pub fn target_toml_with(&self, name: &str, host_key: bool) -> String {
        let kh = self.dir.path().join("agent_known_hosts");
        fs::write(&kh, &self.known_hosts_line).expect("agent known_hosts");
        let host_key_line = if host_key {
            format!("host_key_file = \"{}\"\n", self.host_key.display())
        } else {
            String::new()
        };
        format!(
            "[[target]]\nname = \"{name}\"\nprotocol = \"ssh\"\naddress = [\"127.0.0.1:{}\"]\n\
             credential = \"{name}-login\"\nknown_hosts = \"{}\"\n{host_key_line}\n\
             [credential.{name}-login]\nuser = \"root\"\nkey_file = \"{}\"\n\n",
            self.port,
            kh.display(),
            self.agent_key.display()
        )
    }

    /// The common options of the bot's OpenSSH clients: no config file, the bot's own key and
    /// known_hosts, strict host key checking, no prompts.
    pub fn client_opts(&self) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.bot_key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.bot_known_hosts.display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "ConnectTimeout=20".into(),
        ]
    }

    /// Run `program` (ssh, scp, sftp...) as the bot in `cg` with `args`, bounded to 120 s.
    pub fn run_as_bot(
        &self,
        cg: &Cgroup,
        program: &str,
        args: &[String],
    ) -> (ExitStatus, String, String) {
        let child = cg
            .command(Path::new(program))
            .args(args)
            .env("HOME", &self.bot_home)
            .current_dir(&self.bot_home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        wait_child(child, Duration::from_secs(120), program)
    }

    /// `ssh -p PORT root@127.0.0.1 [extra...] -- command` as the bot.
    pub fn ssh(&self, cg: &Cgroup, extra: &[&str], command: &str) -> (ExitStatus, String, String) {
        let mut args = self.client_opts();
        args.push("-p".into());
        args.push(self.port.to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("root@127.0.0.1".into());
        args.push("--".into());
        args.push(command.into());
        self.run_as_bot(cg, "/usr/bin/ssh", &args)
    }

    /// The pid of the listening `sshd -D` this helper started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The sshd log (for assertions and failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
