//! The validated policy: what `parse` returns and `decide` reads.
//!
//! These types are built only by [`crate::parse`]; matchers carry private precompiled globs
//! (and [`Policy`] a private lookup index), so treat a parsed `Policy` as read-only and parse
//! again to change it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::glob::{GlobList, NameGlobs, Pattern};
use crate::index::Index;
use crate::shell::ExecPattern;

/// A parsed, validated policy file.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `[agent]`: listeners, directories and failure behaviour (defaults if absent).
    pub agent: AgentConfig,
    /// `[[identity]]` tables, in file order (the first match wins in [`Policy::identify`]).
    pub identities: Vec<Identity>,
    /// `[[target]]` tables, in file order.
    pub targets: Vec<Target>,
    /// `[credential.NAME]` tables, by name.
    pub credentials: BTreeMap<String, Credential>,
    /// `[[rule]]` tables, in file order (file order breaks ties between equal actions).
    pub rules: Vec<Rule>,
    /// `[approvals]`, if present; absent means the embedded in-agent queue.
    pub approvals: Option<ApprovalsConfig>,
    /// `[[mask]]` tables, in file order.
    pub masks: Vec<MaskRule>,
    /// `[[test]]` tables, in file order: expected decisions for `tollgate policy test`.
    pub cases: Vec<crate::PolicyCase>,
    pub(crate) index: Index,
}

/// `[agent]`: how the agent itself runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Key `listen`: where redirected connections arrive. Default `["127.0.0.1:15001", "[::1]:15001"]`.
    pub listen: Vec<SocketAddr>,
    /// Key `metrics`: Prometheus `/metrics` address, `"off"` for none. Default `127.0.0.1:9464`.
    pub metrics: Option<SocketAddr>,
    /// Key `admin`: approvals API, web page and health address, `"off"` for none. Default `127.0.0.1:9465`.
    pub admin: Option<SocketAddr>,
    /// Key `data_dir`: audit log, recordings, CA and state. Default `/var/lib/tollgate`.
    pub data_dir: PathBuf,
    /// Key `fail_mode`: what happens to connections when the agent cannot decide. Default `closed`.
    pub fail_mode: FailMode,
    /// Key `mode`: `enforce` blocks; `observe` decides and audits but never blocks. Default `enforce`.
    pub mode: Mode,
    /// Key `bpf_pin_path`: bpffs directory for pinned maps and links. Default `/sys/fs/bpf/tollgate`.
    pub bpf_pin_path: PathBuf,
    /// Key `max_connections`: cap on concurrent proxied connections. Default 4096.
    pub max_connections: usize,
    /// Key `drain_timeout`: how long shutdown waits for open sessions. Default 10s.
    pub drain_timeout: Duration,
    /// Key `dns_refresh`: how often host-name target addresses are re-resolved. Default 30s.
    pub dns_refresh: Duration,
    /// Key `namespace`: which network namespaces the connect hooks act in. Default `all`.
    pub namespace: NetnsScope,
    /// Key `host_id`: this agent's name in a shared approval store (`None`: the host name).
    /// Set it when several agents share one host (one per network namespace).
    pub host_id: Option<String>,
    /// Key `unix_dir`: where the agent puts its own Unix socket, to which connects to a
    /// target's `unix_socket` are redirected (Linux 6.7+). The agent creates it owned by root,
    /// mode 0711: bots can reach the socket in it but create nothing there. Default
    /// `/run/tollgate`.
    pub unix_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 15001)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 15001)),
            ],
            metrics: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9465))),
            data_dir: PathBuf::from("/var/lib/tollgate"),
            fail_mode: FailMode::Closed,
            mode: Mode::Enforce,
            bpf_pin_path: PathBuf::from("/sys/fs/bpf/tollgate"),
            max_connections: 4096,
            drain_timeout: Duration::from_secs(10),
            dns_refresh: Duration::from_secs(30),
            namespace: NetnsScope::All,
            host_id: None,
            unix_dir: PathBuf::from("/run/tollgate"),
        }
    }
}

/// Size of `sockaddr_un.sun_path`: a Unix socket path must be shorter.
pub const UNIX_PATH_MAX: usize = 108;
/// The agent's own socket in `[agent] unix_dir`.
pub const AGENT_SOCKET_NAME: &str = "agent.sock";

/// Key `fail_mode`: what happens when the agent cannot decide (policy error, internal fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FailMode {
    /// `closed`: refuse the connection (default).
    #[default]
    Closed,
    /// `open`: let the connection through unproxied.
    Open,
}

/// Key `namespace`: which network namespaces the agent's connect hooks act in. The hooks are
/// attached at the cgroup v2 root, which sees every namespace on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NetnsScope {
    /// `all`: connections from every network namespace are redirected to this agent
    /// (default; skipping other namespaces silently would be a bypass).
    #[default]
    All,
    /// `own`: only sockets in the agent's own network namespace are redirected; other
    /// namespaces need their own agent (one agent per namespace).
    Own,
}

impl NetnsScope {
    /// The policy spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NetnsScope::All => "all",
            NetnsScope::Own => "own",
        }
    }
}

/// Key `mode`: whether decisions are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// `enforce`: block what the policy denies (default).
    #[default]
    Enforce,
    /// `observe`: decide and audit, never block.
    Observe,
}

impl FailMode {
    /// The policy-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Closed => "closed",
            FailMode::Open => "open",
        }
    }
}

impl Mode {
    /// The policy-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Observe => "observe",
        }
    }
}

/// `[[identity]]`: a workload, attributed from kernel facts, never from what it says.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Key `name`: referenced by rules.
    pub name: String,
    /// Key `cgroup`: glob on the cgroup v2 path (`*` also matches `/`).
    pub cgroup: Option<String>,
    /// Key `uid`: exact uid.
    pub uid: Option<u32>,
    /// Key `user`: exact user name.
    pub user: Option<String>,
    /// Key `exe`: glob on the executable path. The agent passes a path only when the file
    /// the process runs is the file at that path in the agent's own mount namespace (device
    /// and inode compared), so a bind mount in the bot's namespace cannot borrow a path.
    pub exe: Option<String>,
    /// Key `exe_foreign_userns` (default false): let `exe` match a process in a user
    /// namespace other than the agent's. Such a process can build its own mount namespace, so
    /// exe matching is refused for it unless the identity opts in.
    pub exe_foreign_userns: bool,
    /// Key `comm`: glob on the process command name (`comm`, 15 bytes max in the kernel).
    pub comm: Option<String>,
    /// Key `oidc`: token-based attribution (parsed and stored; not used for matching yet).
    pub oidc: Option<IdentityOidc>,
    pub(crate) cgroup_glob: Option<Pattern>,
    pub(crate) exe_glob: Option<Pattern>,
    pub(crate) comm_glob: Option<Pattern>,
}

/// `oidc = { issuer, audience, require_claims }` inside `[[identity]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityOidc {
    /// Key `issuer`: the token issuer URL.
    pub issuer: String,
    /// Key `audience`: expected `aud` claim.
    pub audience: Option<String>,
    /// Key `require_claims`: claim name to accepted values (any one value suffices), e.g. `groups`.
    pub require_claims: BTreeMap<String, Vec<String>>,
}

/// Kernel facts about the connecting process.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadFacts<'a> {
    /// cgroup v2 path, e.g. `/system.slice/ci-runner.service`.
    pub cgroup: &'a str,
    /// Real uid.
    pub uid: u32,
    /// User name for `uid`, if it resolves.
    pub user: Option<&'a str>,
    /// Executable path, if readable and verified to be the file the process runs.
    pub exe: Option<&'a str>,
    /// Command name.
    pub comm: &'a str,
    /// The process is in a user namespace other than the agent's (or that could not be
    /// told): `exe` then matches only identities with `exe_foreign_userns = true`.
    pub foreign_userns: bool,
}

impl Identity {
    /// Whether every selector this identity gives matches `facts`. An identity with no selector
    /// never matches (the parser rejects those anyway).
    pub fn matches(&self, facts: &WorkloadFacts<'_>) -> bool {
        let mut any = false;
        if let Some(g) = &self.cgroup_glob {
            any = true;
            if !g.is_match(facts.cgroup) {
                return false;
            }
        }
        if let Some(uid) = self.uid {
            any = true;
            if uid != facts.uid {
                return false;
            }
        }
        if let Some(user) = &self.user {
            any = true;
            if facts.user != Some(user.as_str()) {
                return false;
            }
        }
        if let Some(g) = &self.exe_glob {
            any = true;
            if facts.foreign_userns && !self.exe_foreign_userns {
                return false;
            }
            match facts.exe {
                Some(exe) if g.is_match(exe) => {}
                _ => return false,
            }
        }
        if let Some(g) = &self.comm_glob {
            any = true;
            if !g.is_match(facts.comm) {
                return false;
            }
        }
        any
    }
}

/// Key `protocol` of a target: which interceptor handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `postgres`: PostgreSQL wire protocol; `sql` matchers.
    Postgres,
    /// `ssh`; `ssh` matchers.
    Ssh,
    /// `http`; `http` matchers.
    Http,
    /// `https` (terminated by the agent); `http` matchers.
    Https,
    /// `kubernetes` API server; `kubernetes` matchers.
    Kubernetes,
    /// `tcp`: opaque bytes; whole-connection rules only.
    Tcp,
}

impl Protocol {
    /// Every protocol, in documentation order.
    pub const ALL: [Protocol; 6] = [
        Protocol::Postgres,
        Protocol::Ssh,
        Protocol::Http,
        Protocol::Https,
        Protocol::Kubernetes,
        Protocol::Tcp,
    ];

    /// Lowercase policy-file spelling, also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Ssh => "ssh",
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Kubernetes => "kubernetes",
            Protocol::Tcp => "tcp",
        }
    }

    /// The `KIND_*` bit of the rule matcher that applies to this protocol (0 for tcp).
    pub(crate) fn matcher_kind(self) -> u8 {
        use crate::index::{KIND_HTTP, KIND_KUBE, KIND_SQL, KIND_SSH};
        match self {
            Protocol::Postgres => KIND_SQL,
            Protocol::Ssh => KIND_SSH,
            Protocol::Http | Protocol::Https => KIND_HTTP,
            Protocol::Kubernetes => KIND_KUBE,
            Protocol::Tcp => 0,
        }
    }

    /// The rule matcher key that applies to this protocol (`None` for tcp).
    pub fn matcher_key(self) -> Option<&'static str> {
        match self {
            Protocol::Postgres => Some("sql"),
            Protocol::Ssh => Some("ssh"),
            Protocol::Http | Protocol::Https => Some("http"),
            Protocol::Kubernetes => Some("kubernetes"),
            Protocol::Tcp => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[target]]`: something protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Key `name`: referenced by rules and masks.
    pub name: String,
    /// Key `protocol`.
    pub protocol: Protocol,
    /// Key `address`: where the target listens.
    pub address: Vec<TargetAddress>,
    /// Key `credential`: name of the `[credential.NAME]` injected upstream.
    pub credential: Option<String>,
    /// Key `tls`: how the agent secures its own connection to the target.
    pub tls: TargetTls,
    /// Key `pool` (default true; `pool = false` turns reuse off). SSH: a bot
    /// connection that ends cleanly leaves its logged-in upstream connection for the same
    /// identity's next one (see the agent's `ssh/pool.rs`). PostgreSQL: a session that ends cleanly (Terminate,
    /// idle, not in a transaction) leaves its upstream connection, reset with `DISCARD ALL`,
    /// for the next session of the same identity with the same upstream user, database and
    /// startup parameters. HTTP, HTTPS and Kubernetes: a bot connection's idle upstream
    /// connections are kept 30 s for the same identity's next one.
    pub pool: bool,
    /// Key `unix_socket` (PostgreSQL only): the server's Unix socket, e.g.
    /// `/var/run/postgresql/.s.PGSQL.5432`. On Linux 6.7+ a connect to it is redirected to the
    /// agent like a TCP connect (and served upstream over the target's first IP address); on
    /// older kernels `doctor` and the agent's log warn that it is not covered.
    pub unix_socket: Option<PathBuf>,
    /// Key `known_hosts` (ssh): OpenSSH `known_hosts` file holding the upstream server's host
    /// key; an unknown or changed key fails closed. Required for ssh targets the agent proxies.
    pub known_hosts: Option<PathBuf>,
    /// Key `host_key_file` (ssh): the upstream server's own host private key, which the agent
    /// presents to bots so their `known_hosts` stays as it is.
    pub host_key_file: Option<PathBuf>,
    /// Key `inspect` (http, https, kubernetes; default true): `false` relays the connection
    /// as it is, without terminating its TLS: only whole-connection rules decide it (no
    /// per-request policy, credential, masking or request recording).
    pub inspect: bool,
    /// Key `record_bodies` (http, https, kubernetes; default false): each request's recording
    /// line also carries the start of its request and response bodies (up to 64 KiB each),
    /// masked by the target's `[[mask]]` rules and the secret detectors.
    pub record_bodies: bool,
}

/// `tls = { mode = "...", ca_file = "...", server_name = "..." }` of a target: the agent's
/// connection to the real server (the bot's side is separate: a PostgreSQL bot that asks for
/// TLS gets a certificate minted by the agent's CA).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetTls {
    /// Key `mode`.
    pub mode: TlsMode,
    /// Key `ca_file`: PEM CA certificates trusted for `verify-ca` and `verify-full` (default:
    /// none, so both require it).
    pub ca_file: Option<PathBuf>,
    /// Key `server_name`: the name the certificate must carry (default: the host part of the
    /// target address the bot dialled, or its IP).
    pub server_name: Option<String>,
}

/// How the agent connects to a target (PostgreSQL `sslmode` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TlsMode {
    /// `disable`: plaintext (the default; right for loopback and unix-socket-like setups).
    #[default]
    Disable,
    /// `prefer`: TLS if the server offers it, without verification; plaintext otherwise.
    Prefer,
    /// `require`: TLS, without verifying the certificate.
    Require,
    /// `verify-ca`: TLS, the certificate chains to `ca_file`; its names are not checked.
    VerifyCa,
    /// `verify-full`: TLS, the certificate chains to `ca_file` and names `server_name`.
    VerifyFull,
}

impl TlsMode {
    /// Every mode, in the order of increasing strictness.
    pub const ALL: [TlsMode; 5] = [
        TlsMode::Disable,
        TlsMode::Prefer,
        TlsMode::Require,
        TlsMode::VerifyCa,
        TlsMode::VerifyFull,
    ];

    /// The mode as written in a policy (libpq's `sslmode` words).
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// The mode named `word`, if any.
    pub fn from_word(word: &str) -> Option<TlsMode> {
        TlsMode::ALL.into_iter().find(|m| m.as_str() == word)
    }

    /// Whether the server's certificate must chain to a configured CA (`verify-ca`,
    /// `verify-full`), which therefore needs one.
    pub fn checks_chain(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

/// One entry of a target's `address` list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddress {
    /// `"127.0.0.1:5432"` or `"[::1]:5432"` (IPv4-mapped IPv6 is stored as IPv4).
    Exact(SocketAddr),
    /// `"10.0.0.0/24:5432"` or `"[fd00::/64]:5432"` (stored truncated to the network).
    Cidr(ipnet::IpNet, u16),
    /// `"db.internal:5432"`: resolved by the agent every `dns_refresh`.
    Host(String, u16),
}

impl TargetAddress {
    /// The port this address protects.
    pub fn port(&self) -> u16 {
        match self {
            TargetAddress::Exact(a) => a.port(),
            TargetAddress::Cidr(_, p) | TargetAddress::Host(_, p) => *p,
        }
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddress::Exact(a) => write!(f, "{a}"),
            TargetAddress::Cidr(net @ ipnet::IpNet::V4(_), p) => write!(f, "{net}:{p}"),
            TargetAddress::Cidr(net @ ipnet::IpNet::V6(_), p) => write!(f, "[{net}]:{p}"),
            TargetAddress::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// `[credential.NAME]`: injected upstream so the bot never holds the real secret.
///
/// Holds only where the secret lives (paths, a variable name), never the secret itself, so
/// `Debug` is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Credential {
    /// Key `user`: upstream user name.
    pub user: Option<String>,
    /// Key `password_file`: file holding a password.
    pub password_file: Option<PathBuf>,
    /// Key `key_file`: file holding a private key (ssh).
    pub key_file: Option<PathBuf>,
    /// Key `cert_file` (only beside `key_file`): for ssh, an OpenSSH user certificate for that
    /// key (`ssh-keygen -s CA -I ID -n USER key.pub` writes `key-cert.pub`), for servers that
    /// trust a user CA (`TrustedUserCAKeys`) instead of `authorized_keys`; for https and
    /// kubernetes, the PEM client certificate chain presented upstream (mTLS).
    pub cert_file: Option<PathBuf>,
    /// Key `token_file`: file holding a bearer token (http, kubernetes).
    pub token_file: Option<PathBuf>,
    /// Key `env`: name of the agent's environment variable holding the secret.
    pub env: Option<String>,
}

/// Where a credential's secret comes from (at most one per credential).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource<'a> {
    /// `password_file`.
    PasswordFile(&'a Path),
    /// `key_file`.
    KeyFile(&'a Path),
    /// `token_file`.
    TokenFile(&'a Path),
    /// `env`.
    Env(&'a str),
}

impl Credential {
    /// The secret source, if any (the parser guarantees at most one).
    pub fn secret_source(&self) -> Option<SecretSource<'_>> {
        if let Some(p) = &self.password_file {
            Some(SecretSource::PasswordFile(p))
        } else if let Some(p) = &self.key_file {
            Some(SecretSource::KeyFile(p))
        } else if let Some(p) = &self.token_file {
            Some(SecretSource::TokenFile(p))
        } else {
            self.env.as_deref().map(SecretSource::Env)
        }
    }
}

/// Key `action` of a rule. Precedence: deny beats approve beats allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `allow`.
    Allow,
    /// `deny`.
    Deny,
    /// `approve`: hold until a human approves.
    Approve,
}

impl Action {
    /// How strict the action is, for picking the strictest of several decisions of one
    /// operation: deny, then approve, then allow.
    pub fn strictness(self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::Approve => 1,
            Action::Deny => 2,
        }
    }

    /// Lowercase policy-file spelling, also used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Approve => "approve",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[rule]]`: who may do what to which target.
///
/// A rule with no operation matcher (`sql`, `ssh`, `http`, `kubernetes` all absent) decides the
/// whole connection and every operation on it.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Key `name`: unique; reported in decisions and audit lines (shared with each
    /// [`crate::Decision`] it makes, which then costs no copy of it).
    pub name: std::sync::Arc<str>,
    /// Key `identities`: identity names, or `"*"` for every known identity.
    pub identities: Vec<String>,
    /// Key `targets`: target names, or `"*"` for every target.
    pub targets: Vec<String>,
    /// Key `action`.
    pub action: Action,
    /// Key `sql`: matches SQL statements (postgres targets).
    pub sql: Option<SqlMatch>,
    /// Key `ssh`: matches SSH channel requests (ssh targets).
    pub ssh: Option<SshMatch>,
    /// Key `http`: matches HTTP requests (http and https targets).
    pub http: Option<HttpMatch>,
    /// Key `kubernetes`: matches Kubernetes API requests (kubernetes targets).
    pub kubernetes: Option<KubeMatch>,
    /// Key `approvers`: who may approve (approve rules only; empty = any approver).
    pub approvers: Vec<String>,
    /// Key `timeout`: how long a request waits for approval before it is denied (approve rules only).
    pub timeout: Option<Duration>,
    /// Key `min_approvals`: approvals needed (approve rules only; `None` = 1).
    pub min_approvals: Option<u32>,
    /// Key `claims`: the rule applies only to sessions whose workload OIDC token carries, for
    /// every listed claim, one of the listed values (`claims = { groups = ["deployers"] }`).
    /// Empty: no condition. A session without a verified token never matches such a rule.
    pub claims: BTreeMap<String, Vec<String>>,
    /// Target indices (None = `"*"`), resolved at parse time.
    pub(crate) target_ids: Option<Box<[u32]>>,
}

impl Rule {
    /// Whether `claims` (a session's verified workload token claims, each claim's values as
    /// strings) satisfy this rule's `claims` condition.
    pub fn claims_match(&self, claims: Option<&BTreeMap<String, Vec<String>>>) -> bool {
        if self.claims.is_empty() {
            return true;
        }
        let Some(have) = claims else {
            return false;
        };
        self.claims.iter().all(|(name, accepted)| {
            have.get(name)
                .is_some_and(|vals| vals.iter().any(|v| accepted.contains(v)))
        })
    }

    /// Whether this rule decides the whole connection (it has no operation matcher).
    pub fn is_whole_connection(&self) -> bool {
        self.sql.is_none() && self.ssh.is_none() && self.http.is_none() && self.kubernetes.is_none()
    }

    /// Whether one of this rule's matchers can match operations on a target of `protocol`.
    pub fn has_matcher_for(&self, protocol: Protocol) -> bool {
        match protocol {
            Protocol::Postgres => self.sql.is_some(),
            Protocol::Ssh => self.ssh.is_some(),
            Protocol::Http | Protocol::Https => self.http.is_some(),
            Protocol::Kubernetes => self.kubernetes.is_some(),
            Protocol::Tcp => false,
        }
    }
}

/// `sql = { statements, tables, functions, copy_server_files, copy_program, dangerous }`.
///
/// `tables` and `functions` are case-insensitive globs; a glob without a `.` also matches the
/// bare name of a schema-qualified one (`users` matches `public.users`). For an allow rule every
/// touched table must match (a statement touching none passes); for deny and approve rules one
/// matching table is enough (a statement touching none does not match). Empty lists match anything.
///
/// Operations the agent flags dangerous (server files, server-side code, dynamic SQL) are allowed
/// only by a rule that asks for them: see [`SqlMatch::allows_flag`].
#[derive(Debug, Clone)]
pub struct SqlMatch {
    /// Key `statements`: statement kinds, lowercase first keyword (`select`, `drop`, ...), with
    /// the groups of [`SQL_STATEMENT_GROUPS`] replaced by their kinds; `"*"` = any.
    pub statements: Vec<String>,
    /// Key `tables`: table globs.
    pub tables: Vec<String>,
    /// Key `functions`: function globs.
    pub functions: Vec<String>,
    /// Key `copy_server_files`: COPY to or from a file on the database server is allowed
    /// (default: denied whatever the statements say).
    pub copy_server_files: bool,
    /// Key `copy_program`: COPY to or from PROGRAM (a shell command on the database server) is
    /// allowed (default: denied whatever the statements say).
    pub copy_program: bool,
    /// Key `dangerous`: statements flagged dangerous are allowed even though this rule gives
    /// its kinds only as `"*"` or groups.
    pub dangerous: bool,
    /// Every kind was written by name: no `"*"`, no group, not empty.
    pub(crate) kinds_by_name: bool,
    pub(crate) any_statement: bool,
    pub(crate) table_globs: NameGlobs,
    pub(crate) function_globs: NameGlobs,
}

impl SqlMatch {
    /// Whether this rule, once it allowed a statement, also allows the statement's dangerous
    /// flag `flag` (the PostgreSQL handler's words: `copy:file`, `copy:program`, `function:NAME`,
    /// `do:dynamic_sql`, `load`, ...). `runs_sql_text` says whether a `function:` flag names a
    /// function that runs SQL text given as an argument (never classified).
    ///
    /// - `copy:file` needs `copy_server_files = true`, `copy:program` needs `copy_program = true`;
    ///   nothing else allows them.
    /// - A function that runs SQL text needs its exact name in `functions` (a glob never does).
    /// - Another dangerous function needs a non-empty `functions`.
    /// - Anything else needs the kinds written by name (not `"*"`, not a group), or
    ///   `dangerous = true`.
    pub fn allows_flag(&self, flag: &str, runs_sql_text: bool) -> bool {
        match flag {
            "copy:file" => self.copy_server_files,
            "copy:program" => self.copy_program,
            _ => match flag.strip_prefix("function:") {
                Some(name) if runs_sql_text => self.functions.iter().any(|g| {
                    !g.contains(['*', '?'])
                        && (g.eq_ignore_ascii_case(name)
                            || g.to_lowercase().ends_with(&format!(".{name}")))
                }),
                Some(_) => !self.functions.is_empty(),
                None => self.kinds_by_name || self.dangerous,
            },
        }
    }
}

/// Groups accepted in `sql.statements`, each an alias for the kinds it lists (every kind of
/// [`SQL_STATEMENTS`] is in exactly one group, so the six together are every kind).
///
/// A group, like `"*"`, does not name kinds one by one: a rule that gives its kinds only by
/// groups or `"*"` allows a dangerous statement only with `dangerous = true`.
pub const SQL_STATEMENT_GROUPS: &[(&str, &[&str])] = &[
    (
        "read",
        &[
            "close", "declare", "explain", "fetch", "move", "select", "show", "table", "values",
            "with",
        ],
    ),
    (
        "write",
        &["copy", "delete", "insert", "merge", "truncate", "update"],
    ),
    (
        "ddl",
        &["alter", "comment", "create", "drop", "import", "security"],
    ),
    ("dcl", &["grant", "reassign", "revoke"]),
    (
        "transaction",
        &[
            "abort",
            "begin",
            "commit",
            "end",
            "release",
            "rollback",
            "savepoint",
            "start",
        ],
    ),
    (
        "utility",
        &[
            "analyze",
            "call",
            "checkpoint",
            "cluster",
            "deallocate",
            "discard",
            "do",
            "execute",
            "listen",
            "load",
            "lock",
            "notify",
            "prepare",
            "refresh",
            "reindex",
            "reset",
            "set",
            "unlisten",
            "vacuum",
        ],
    ),
];

/// Statement kinds accepted in `sql.statements`: the first keyword of every PostgreSQL command,
/// sorted (so [`statement_bit`] can binary-search).
pub const SQL_STATEMENTS: &[&str] = &[
    "abort",
    "alter",
    "analyze",
    "begin",
    "call",
    "checkpoint",
    "close",
    "cluster",
    "comment",
    "commit",
    "copy",
    "create",
    "deallocate",
    "declare",
    "delete",
    "discard",
    "do",
    "drop",
    "end",
    "execute",
    "explain",
    "fetch",
    "grant",
    "import",
    "insert",
    "listen",
    "load",
    "lock",
    "merge",
    "move",
    "notify",
    "prepare",
    "reassign",
    "refresh",
    "reindex",
    "release",
    "reset",
    "revoke",
    "rollback",
    "savepoint",
    "security",
    "select",
    "set",
    "show",
    "start",
    "table",
    "truncate",
    "unlisten",
    "update",
    "vacuum",
    "values",
    "with",
];

/// Verbs accepted in `kubernetes.verbs` (Kubernetes authorization verbs).
pub const KUBE_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "impersonate",
    "bind",
    "escalate",
    "use",
    "approve",
    "sign",
];

/// Bit of a statement kind in `Hot::statements`: one per [`SQL_STATEMENTS`] entry, and bit 63
/// for anything else. Case-insensitive.
pub(crate) fn statement_bit(statement: &str) -> u64 {
    match SQL_STATEMENTS.binary_search_by(|k| {
        k.bytes()
            .cmp(statement.bytes().map(|b| b.to_ascii_lowercase()))
    }) {
        Ok(i) if i < 63 => 1 << i,
        _ => 1 << 63,
    }
}

/// `ssh = { exec, shell, subsystems, forwarding }`.
///
/// An empty matcher (`ssh = {}`) matches every SSH operation. Otherwise each key selects a kind
/// of request: `exec` globs match exec commands, `shell = true` shells, `subsystems` globs
/// subsystem names, `forwarding = true` port forwarding. Kinds the matcher does not select match
/// only while it selects nothing (so `{ shell = false }` is "anything but a shell"), which is why
/// an empty `exec` means "any exec" only when no other kind is selected.
#[derive(Debug, Clone)]
pub struct SshMatch {
    /// Key `exec`: command patterns, matched word by word against the command read as a POSIX
    /// shell word list (see [`crate::split_command`]).
    pub exec: Vec<String>,
    /// Key `shell`: `true` matches interactive shells, `false` excludes them.
    pub shell: Option<bool>,
    /// Key `subsystems`: globs on subsystem names (`sftp`).
    pub subsystems: Vec<String>,
    /// Key `forwarding`: `true` matches port forwarding, `false` excludes it.
    pub forwarding: Option<bool>,
    pub(crate) exec_patterns: Box<[ExecPattern]>,
    pub(crate) subsystem_globs: GlobList,
}

/// `http = { methods, paths, hosts }`: all given keys must match; empty lists match anything.
#[derive(Debug, Clone)]
pub struct HttpMatch {
    /// Key `methods`: request methods, case-insensitive; `"*"` = any.
    pub methods: Vec<String>,
    /// Key `paths`: globs on the request path (`*` also matches `/`).
    pub paths: Vec<String>,
    /// Key `hosts`: case-insensitive globs on the request host.
    pub hosts: Vec<String>,
    pub(crate) path_globs: GlobList,
    pub(crate) host_globs: GlobList,
}

/// `kubernetes = { verbs, resources, namespaces, names, exec }`: all given keys must match;
/// empty lists match anything.
#[derive(Debug, Clone)]
pub struct KubeMatch {
    /// Key `verbs`: API verbs (`get`, `create`, ...), case-insensitive; `"*"` = any.
    pub verbs: Vec<String>,
    /// Key `resources`: globs on `resource` or `resource/subresource` (`pods/exec`).
    pub resources: Vec<String>,
    /// Key `namespaces`: namespace globs (cluster-scoped requests have namespace `""`).
    pub namespaces: Vec<String>,
    /// Key `names`: object name globs.
    pub names: Vec<String>,
    /// Key `exec`: command patterns for `pods/exec`, matched word by word against the
    /// command's arguments as the query string gives them (no shell reads them), with the
    /// pattern syntax of `ssh.exec`. Given, the rule matches only requests with a command.
    pub exec: Vec<String>,
    pub(crate) exec_patterns: Box<[ExecPattern]>,
    pub(crate) resource_globs: GlobList,
    pub(crate) namespace_globs: GlobList,
    pub(crate) name_globs: GlobList,
}

/// `[approvals]`: where approval requests go and who may approve.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApprovalsConfig {
    /// Key `store`: `postgres://` URL of a fleet-wide queue; absent = in the agent. May carry
    /// a password; never log it (see [`ApprovalsConfig::store_display`]).
    pub store: Option<String>,
    /// Keys `store_password_file` / `store_password_env`: where the store's password comes
    /// from when the URL has none.
    pub store_password: Option<StorePassword>,
    /// Key `webhook`: URL receiving Slack-compatible JSON on each new request.
    pub webhook: Option<String>,
    /// Key `oidc` (`[approvals.oidc]`): the organisation's IdP for approvers.
    pub oidc: Option<OidcConfig>,
}

/// Where the approval store's password is read from (at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorePassword {
    /// `store_password_file`: the file's content, trailing newline removed.
    File(PathBuf),
    /// `store_password_env`: an environment variable of the agent.
    Env(String),
}

impl ApprovalsConfig {
    /// The store URL with any password replaced by `***`, for messages and logs.
    pub fn store_display(&self) -> Option<String> {
        self.store.as_deref().map(redact_url_password)
    }
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth_end, _) = rest
        .char_indices()
        .find(|(_, c)| *c == '/' || *c == '?')
        .unwrap_or((rest.len(), ' '));
    let authority = &rest[..auth_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// `[approvals.oidc]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// Key `issuer`: issuer URL.
    pub issuer: String,
    /// Key `client_id`: for the web page login (authorization code + PKCE).
    pub client_id: Option<String>,
    /// Key `client_secret_file`: file holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// Key `audience`: expected audience of bearer tokens on the API and CLI.
    pub audience: Option<String>,
    /// Key `groups_claim`: claim carrying the approver's groups. Default `"groups"`.
    pub groups_claim: String,
}

/// Detector names accepted in `[[mask]] detectors`.
pub const DETECTORS: &[&str] = &[
    "email",
    "credit_card",
    "us_ssn",
    "iban",
    "phone",
    "jwt",
    "aws_access_key",
    "private_key",
    "bearer_token",
];

/// `[[mask]]`: values to mask in responses.
#[derive(Debug, Clone)]
pub struct MaskRule {
    /// Key `targets`: target names, or `"*"`.
    pub targets: Vec<String>,
    /// Key `columns`: case-insensitive `table.column` globs (`*.email`); a glob without `.`
    /// matches the column name in any table.
    pub columns: Vec<String>,
    /// Key `detectors`: names from [`DETECTORS`].
    pub detectors: Vec<String>,
    /// Key `style`: how masked values look. Default `full`.
    pub style: MaskStyle,
    pub(crate) column_globs: NameGlobs,
}

impl MaskRule {
    /// Whether this mask applies to the target named `target`.
    pub fn applies_to(&self, target: &str) -> bool {
        self.targets.iter().any(|t| t == "*" || t == target)
    }

    /// Whether `columns` selects `column` of `table` (`table` may be schema-qualified).
    pub fn matches_column(&self, table: &str, column: &str) -> bool {
        self.column_globs.matches_column(table, column)
    }
}

/// Key `style` of a mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MaskStyle {
    /// `full`: replace the whole value (default).
    #[default]
    Full,
    /// `partial`: keep a few characters (`j***@example.com`).
    Partial,
    /// `hash`: a stable keyed hash, so equal values stay joinable.
    Hash,
    /// `null`: SQL NULL / JSON null.
    Null,
}

impl MaskStyle {
    /// The policy-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MaskStyle::Full => "full",
            MaskStyle::Partial => "partial",
            MaskStyle::Hash => "hash",
            MaskStyle::Null => "null",
        }
    }
}

impl Policy {
    /// First `[[identity]]` (file order) whose given keys all match `facts`. `None` = unknown.
    pub fn identify(&self, facts: &WorkloadFacts<'_>) -> Option<&Identity> {
        self.identities.iter().find(|i| i.matches(facts))
    }

    /// The routes of every target's addresses, in file order (`resolved(host)` gives the
    /// current addresses of a host-name target; the agent resolves, this crate does no I/O).
    /// The agent adds its local aliases to these.
    pub fn routes(&self, resolved: &dyn Fn(&str) -> Vec<IpAddr>) -> Vec<crate::route::Route> {
        let mut out = Vec::new();
        for (target, t) in self.targets.iter().enumerate() {
            for a in &t.address {
                out.extend(
                    a.prefixes(resolved)
                        .into_iter()
                        .map(|net| crate::route::Route {
                            net,
                            port: a.port(),
                            target,
                            alias: false,
                        }),
                );
            }
        }
        out
    }

    /// Target protecting `addr`: the longest prefix holding it on its port (an exact address
    /// or a host name's address is a full-length prefix), then file order; IPv4-mapped IPv6
    /// (`::ffff:a.b.c.d`) counts as IPv4 ([`crate::route::lookup`], the rule the agent's
    /// routes and the kernel's tries follow). Without the agent's local aliases: a loopback
    /// target here protects only the addresses written.
    pub fn target_for(
        &self,
        addr: SocketAddr,
        resolved: &dyn Fn(&str) -> Vec<IpAddr>,
    ) -> Option<&Target> {
        crate::route::lookup(&self.routes(resolved), addr).and_then(|i| self.targets.get(i))
    }

    /// Target by name.
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.index.target(name).and_then(|i| self.targets.get(i))
    }

    /// Identity by name.
    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.index
            .identity(name)
            .and_then(|i| self.identities.get(i))
    }

    /// Rule by name.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| *r.name == *name)
    }

    /// Credential of the target named `target`, if it has one.
    pub fn credential_for(&self, target: &str) -> Option<&Credential> {
        let name = self.target(target)?.credential.as_deref()?;
        self.credentials.get(name)
    }

    /// Masks that apply to the target named `target`, in file order.
    pub fn masks_for<'a>(&'a self, target: &'a str) -> impl Iterator<Item = &'a MaskRule> + 'a {
        self.masks.iter().filter(move |m| m.applies_to(target))
    }
}

#[cfg(test)]
mod tests;
