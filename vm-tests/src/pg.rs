//! A real PostgreSQL cluster for tests: initdb with SCRAM-SHA-256, a superuser and an
//! application role with passwords, sample data with planted secrets, started on a free
//! loopback port and stopped (by its pid file, through pg_ctl) on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{free_port, require_root, AgentProc, Cgroup, FailMode, TempDir};

/// The application role's password: it must never appear in anything the agent writes.
pub const APP_PASSWORD: &str = "Upstream-Secret-7f3a9c";
/// A planted value in a masked column.
pub const SECRET_EMAIL: &str = "alice.secret@example.com";
/// A planted Luhn-valid card number.
pub const SECRET_CARD: &str = "4111111111111111";

pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    /// The server options `pg_ctl start -o` was given (for [`PgServer::start_again`]).
    opts: String,
    pub dir: TempDir,
}

fn pg_bin() -> PathBuf {
    let mut v: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server is not installed: run `cargo xtask setup`")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    v.sort();
    v.pop().expect("no PostgreSQL server binaries")
}

fn run_as_postgres(bin: &Path, prog: &str, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(prog))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificates for a server with TLS: a test CA (PEM, for clients' trust) and its leaf for
/// `localhost` and 127.0.0.1.
pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("ca");
        let key = KeyPair::generate().expect("key");
        let mut leaf =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = leaf.signed_by(&key, &ca, &ca_key).expect("leaf");
        TestCa {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl PgServer {
    pub fn start(tag: &str) -> PgServer {
        PgServer::start_with(tag, None, &[])
    }

    /// A server that also listens on `extra` addresses (e.g. the host side of a test's veth
    /// pairs) and accepts SCRAM logins from `clients` (CIDRs, e.g. `10.231.0.0/16`).
    pub fn start_on(tag: &str, extra: &[&str], clients: &[&str]) -> PgServer {
        let pg = PgServer::start_with(tag, None, extra);
        if !clients.is_empty() {
            let hba = pg.data.join("pg_hba.conf");
            let mut text = fs::read_to_string(&hba).expect("pg_hba.conf");
            for c in clients {
                text.push_str(&format!("host all all {c} scram-sha-256\n"));
            }
            fs::write(&hba, text).expect("pg_hba.conf");
            pg.superuser_sql("SELECT pg_reload_conf()", "postgres");
        }
        pg
    }

    /// A server that accepts TCP logins only over TLS (`hostssl` in pg_hba.conf), with a
    /// certificate from `tls`.
    pub fn start_with_tls(tag: &str, tls: &TestCa) -> PgServer {
        PgServer::start_with(tag, Some(tls), &[])
    }

    fn start_with(tag: &str, tls: Option<&TestCa>, extra: &[&str]) -> PgServer {
        let dir = TempDir::new(&format!("pg-{tag}"));
        let bin = pg_bin();
        let data = dir.path().join("data");
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(status.success());
        let pwfile = dir.path().join("pw");
        fs::write(&pwfile, "postgres-superuser-pw\n").expect("pwfile");
        let _ = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&pwfile)
            .status();
        run_as_postgres(
            &bin,
            "initdb",
            &[
                "--auth=scram-sha-256",
                // UTF-8 whatever the caller's environment (without LANG initdb picks SQL_ASCII,
                // and clients then get bytes for text).
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "-U",
                "postgres",
                "--pwfile",
                &pwfile.to_string_lossy(),
                "-D",
                &data.to_string_lossy(),
            ],
        );
        let mut ssl_opts = String::new();
        if let Some(t) = tls {
            let own = |p: &Path, text: &str| {
                fs::write(p, text).expect("write tls file");
                let _ = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(p)
                    .status();
                let _ = Command::new("chmod").arg("600").arg(p).status();
            };
            let (crt, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            own(&crt, &t.cert_pem);
            own(&key, &t.key_pem);
            ssl_opts = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                crt.display(),
                key.display()
            );
            // TCP logins only over TLS; the Unix socket (superuser setup) stays as it is.
            let hba = data.join("pg_hba.conf");
            let text = fs::read_to_string(&hba).expect("pg_hba.conf");
            let text: String = text
                .lines()
                .map(|l| {
                    if l.starts_with("host ") || l.starts_with("host\t") {
                        format!("hostssl{}\n", &l[4..])
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            fs::write(&hba, text).expect("pg_hba.conf");
        }
        let port = free_port();
        let listen = std::iter::once("127.0.0.1")
            .chain(extra.iter().copied())
            .collect::<Vec<_>>()
            .join(",");
        let opts = format!(
            "-c listen_addresses={listen} -c port={port} -c unix_socket_directories={}{ssl_opts}",
            dir.path().display()
        );
        let pg = PgServer {
            port,
            bin,
            data,
            opts,
            dir,
        };
        pg.start_again();
        pg.superuser_sql(
            &format!("CREATE ROLE app_rw LOGIN PASSWORD '{APP_PASSWORD}'"),
            "postgres",
        );
        pg.superuser_sql("CREATE DATABASE app OWNER app_rw", "postgres");
        pg.superuser_sql(
            &format!(
                "SET ROLE app_rw;
                 CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card_number text, note text);
                 INSERT INTO customers VALUES
                   (1, 'Alice', '{SECRET_EMAIL}', '{SECRET_CARD}', 'vip'),
                   (2, 'Bob', 'bob@example.org', '5500 0000 0000 0004', 'contact bob@example.org');
                 CREATE TABLE orders (id int PRIMARY KEY, customer int, amount int);
                 INSERT INTO orders SELECT g, 1 + g % 2, g * 10 FROM generate_series(1, 10) g;
                 CREATE TABLE audit_log (id serial, msg text);"
            ),
            "app",
        );
        pg
    }

    /// Stop the server at once (`pg_ctl stop -m immediate`): clients see their connections
    /// drop, as when a database host dies.
    pub fn stop(&self) {
        run_as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Start the server (again) with the same data, port and options.
    pub fn start_again(&self) {
        run_as_postgres(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-l",
                &self.dir.path().join("log").to_string_lossy(),
                "-o",
                &self.opts,
                "-w",
                "start",
            ],
        );
    }

    /// Stop the server, add `extra` to its options (e.g. `-c unix_socket_permissions=0770`)
    /// and start it again.
    pub fn restart_with(&mut self, extra: &str) {
        self.stop();
        self.opts.push(' ');
        self.opts.push_str(extra);
        self.start_again();
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run SQL as the superuser over the Unix socket (not through tollgate).
    pub fn superuser_sql(&self, sql: &str, db: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                &self.dir.path().to_string_lossy(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", "postgres-superuser-pw")
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "superuser sql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A real PostgreSQL, an unprivileged bot's cgroup, and an agent (failing closed) gating the
/// server under the policy `policy` writes for them, given the file holding the application
/// role's password (the target's credential). Dropped in that order.
pub struct PgGate {
    pub pg: PgServer,
    pub bot: Cgroup,
    pub agent: AgentProc,
    _dir: TempDir,
}

impl PgGate {
    pub fn start(tag: &str, policy: impl FnOnce(&PgServer, &Cgroup, &Path) -> String) -> PgGate {
        require_root();
        let pg = PgServer::start(tag);
        let bot = Cgroup::new(&format!("{tag}-bot"));
        let dir = TempDir::new(&format!("{tag}-secret"));
        let secret = dir.path().join("app-rw.pw");
        fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
        let agent = AgentProc::start(tag, FailMode::Closed, &policy(&pg, &bot, &secret));
        PgGate {
            pg,
            bot,
            agent,
            _dir: dir,
        }
    }
}

/// The policy's `[[target]] app-db` for `pg` (protocol postgres, credential `app-rw` logging in
/// as `app_rw` with the password in `secret`), with `extra` target keys (e.g. a `tls = ...`
/// line), followed by its `[credential.app-rw]` table.
pub fn app_target(pg: &PgServer, secret: &Path, extra: &str) -> String {
    format!(
        "[[target]]\nname = \"app-db\"\nprotocol = \"postgres\"\naddress = [\"{}\"]\ncredential = \"app-rw\"\n{extra}\n[credential.app-rw]\nuser = \"app_rw\"\npassword_file = \"{}\"\n",
        pg.addr(),
        secret.display()
    )
}

/// Through the agent as `bot`, the pg client (`client`, tg-pgclient) runs `pg_sleep(30)` on
/// the server at `port` and cancels it: the server must answer 57014 within 2 s. `agent_log`
/// is shown if the client fails.
pub fn assert_sleep_cancelled_quickly(
    bot: &crate::Cgroup,
    client: &Path,
    port: u16,
    agent_log: impl Fn() -> String,
) {
    let o = bot
        .command(client)
        .arg(format!(
            "host=127.0.0.1 port={port} user=bot password=wrong dbname=app"
        ))
        .arg("--cancel")
        .output()
        .expect("client");
    assert!(
        o.status.success(),
        "{}{}\n--- agent ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        agent_log()
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        v["result"]["code"], "57014",
        "the query was cancelled by the server: {v}"
    );
    let ms = v["elapsed_ms"].as_u64().expect("elapsed");
    assert!(ms < 2000, "pg_sleep(30) cancelled after {ms} ms: {v}");
}

/// An unmodified psql in cgroup `bot` to the server at `port` (dialled directly: the eBPF
/// redirect takes it to the agent), as user `bot` with a WRONG password (identity comes from
/// the kernel), verbose errors (SQLSTATE shown).
pub fn bot_psql(bot: &Cgroup, port: u16, args: &[&str]) -> std::process::Output {
    let conn = format!("host=127.0.0.1 port={port} user=bot dbname=app password=wrong-on-purpose sslmode=disable connect_timeout=10");
    bot.command(Path::new("/usr/bin/psql"))
        .arg(conn)
        .args(["-X", "-v", "VERBOSITY=verbose"])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("psql")
}

/// A finished command's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
