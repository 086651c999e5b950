//! The serde tree: the policy file exactly as written, with source spans.
//!
//! Every struct denies unknown keys, so a typo is an error rather than silence. Values that
//! need checking beyond their TOML type (enums, addresses, globs, durations) are kept as
//! `Spanned<String>` here and converted in `validate`, which can then point at the exact
//! value with a message that names the fix. Field lists (`*_KEYS`) mirror the serde fields;
//! `error.rs` uses them to name the table in "unknown key" messages, and a test keeps them in
//! sync.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string value with its byte span in the file.
pub(crate) type S = Spanned<String>;

/// The whole policy file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawPolicy {
    /// `[agent]`: listeners, directories, failure behaviour.
    pub agent: RawAgent,
    /// `[[identity]]`: who, from kernel facts.
    pub identity: Vec<Spanned<RawIdentity>>,
    /// `[[target]]`: what is protected.
    pub target: Vec<Spanned<RawTarget>>,
    /// `[credential.NAME]`: secrets injected upstream.
    pub credential: BTreeMap<String, Spanned<RawCredential>>,
    /// `[[rule]]`: who may do what to which target.
    pub rule: Vec<Spanned<RawRule>>,
    /// `[approvals]`: where approval requests go, who may approve.
    pub approvals: Option<RawApprovals>,
    /// `[[mask]]`: response masking.
    pub mask: Vec<Spanned<RawMask>>,
    /// `[[test]]`: expected decisions, checked by `tollgate policy test` (the agent ignores
    /// them).
    pub test: Vec<Spanned<RawTest>>,
}
pub(crate) const ROOT_KEYS: &[&str] = &[
    "agent",
    "identity",
    "target",
    "credential",
    "rule",
    "approvals",
    "mask",
    "test",
];

/// `[agent]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawAgent {
    /// Listener socket addresses, e.g. `"127.0.0.1:15001"`.
    pub listen: Option<Spanned<Vec<S>>>,
    /// Prometheus endpoint address, or `"off"`.
    pub metrics: Option<S>,
    /// Admin/approvals endpoint address, or `"off"`.
    pub admin: Option<S>,
    /// Directory for audit log, recordings, CA and state.
    pub data_dir: Option<S>,
    /// `closed` or `open`.
    pub fail_mode: Option<S>,
    /// `enforce` or `observe`.
    pub mode: Option<S>,
    /// bpffs directory where maps and links are pinned.
    pub bpf_pin_path: Option<S>,
    /// Cap on concurrent proxied connections.
    pub max_connections: Option<Spanned<i64>>,
    /// Human duration, e.g. `"10s"`.
    pub drain_timeout: Option<S>,
    /// Human duration, e.g. `"30s"`.
    pub dns_refresh: Option<S>,
    /// `all` or `own`: which network namespaces the eBPF programs act in.
    pub namespace: Option<S>,
    /// This agent's name in a shared approval store (default: the host name).
    pub host_id: Option<S>,
    /// Directory of the agent's own Unix socket (Unix-socket redirects).
    pub unix_dir: Option<S>,
}
pub(crate) const AGENT_KEYS: &[&str] = &[
    "listen",
    "metrics",
    "admin",
    "data_dir",
    "fail_mode",
    "mode",
    "bpf_pin_path",
    "max_connections",
    "drain_timeout",
    "dns_refresh",
    "namespace",
    "host_id",
    "unix_dir",
];

/// `[[identity]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    /// Name used by rules.
    pub name: S,
    /// Glob on the cgroup v2 path.
    pub cgroup: Option<S>,
    /// Exact uid.
    pub uid: Option<Spanned<i64>>,
    /// Exact user name.
    pub user: Option<S>,
    /// Glob on the executable path.
    pub exe: Option<S>,
    /// Let `exe` match processes in another user namespace.
    pub exe_foreign_userns: Option<Spanned<bool>>,
    /// Glob on the process command name.
    pub comm: Option<S>,
    /// OIDC-attributed identity (stored, not used yet).
    pub oidc: Option<Spanned<RawIdentityOidc>>,
}
pub(crate) const IDENTITY_KEYS: &[&str] = &[
    "name",
    "cgroup",
    "uid",
    "user",
    "exe",
    "exe_foreign_userns",
    "comm",
    "oidc",
];

/// `oidc = { ... }` inside `[[identity]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentityOidc {
    /// Token issuer URL.
    pub issuer: S,
    /// Expected audience.
    pub audience: Option<S>,
    /// Claim name to accepted values.
    #[serde(default)]
    pub require_claims: BTreeMap<String, Vec<S>>,
}
pub(crate) const IDENTITY_OIDC_KEYS: &[&str] = &["issuer", "audience", "require_claims"];

/// `[[target]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTarget {
    /// Name used by rules and masks.
    pub name: S,
    /// `postgres`, `ssh`, `http`, `https`, `kubernetes` or `tcp`.
    pub protocol: S,
    /// Addresses: `ip:port`, `[ip6]:port`, `cidr:port`, `[cidr6]:port`, `host:port`.
    pub address: Spanned<Vec<S>>,
    /// Name of a `[credential.NAME]` injected upstream.
    pub credential: Option<S>,
    /// How the agent secures its own connection to the target.
    pub tls: Option<toml::Spanned<RawTargetTls>>,
    /// Whether finished sessions' upstream connections are kept for the next session.
    pub pool: Option<toml::Spanned<bool>>,
    /// The server's Unix socket path, redirected like its TCP address (Linux 6.7+).
    pub unix_socket: Option<S>,
    /// ssh: OpenSSH `known_hosts` file the upstream server's host key must be in.
    pub known_hosts: Option<S>,
    /// ssh: the server's own host private key, which the agent presents to bots.
    pub host_key_file: Option<S>,
}
pub(crate) const TARGET_KEYS: &[&str] = &[
    "name",
    "protocol",
    "address",
    "credential",
    "tls",
    "pool",
    "unix_socket",
    "known_hosts",
    "host_key_file",
];

/// `tls = { ... }` inside `[[target]]`: the agent's connection to the target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTargetTls {
    /// `disable`, `prefer`, `require`, `verify-ca` or `verify-full`.
    pub mode: S,
    /// PEM file with the CA(s) that sign the target's certificate (`verify-ca`, `verify-full`).
    pub ca_file: Option<S>,
    /// Name to verify the certificate against (default: the host the bot dialled).
    pub server_name: Option<S>,
}
pub(crate) const TARGET_TLS_KEYS: &[&str] = &["mode", "ca_file", "server_name"];

/// `[credential.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCredential {
    /// Upstream user name.
    pub user: Option<S>,
    /// File holding a password.
    pub password_file: Option<S>,
    /// File holding a private key.
    pub key_file: Option<S>,
    /// File holding an OpenSSH certificate for `key_file`.
    pub cert_file: Option<S>,
    /// File holding a bearer token.
    pub token_file: Option<S>,
    /// Environment variable holding the secret.
    pub env: Option<S>,
}
pub(crate) const CREDENTIAL_KEYS: &[&str] = &[
    "user",
    "password_file",
    "key_file",
    "cert_file",
    "token_file",
    "env",
];

/// `[[rule]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    /// Name reported in decisions and audit lines.
    pub name: S,
    /// Identity names, or `"*"`.
    pub identities: Spanned<Vec<S>>,
    /// Target names, or `"*"`.
    pub targets: Spanned<Vec<S>>,
    /// `allow`, `deny` or `approve`.
    pub action: S,
    /// SQL operation matcher (postgres targets).
    pub sql: Option<Spanned<RawSql>>,
    /// SSH operation matcher (ssh targets).
    pub ssh: Option<Spanned<RawSsh>>,
    /// HTTP operation matcher (http/https targets).
    pub http: Option<Spanned<RawHttp>>,
    /// Kubernetes API matcher (kubernetes targets).
    pub kubernetes: Option<Spanned<RawKube>>,
    /// Who may approve (approve rules only).
    pub approvers: Option<Spanned<Vec<S>>>,
    /// How long a request waits for approval (approve rules only).
    pub timeout: Option<S>,
    /// Approvals needed (approve rules only).
    pub min_approvals: Option<Spanned<i64>>,
    /// Workload token claims the rule requires: claim name to accepted values.
    pub claims: Option<Spanned<BTreeMap<String, Vec<S>>>>,
}
pub(crate) const RULE_KEYS: &[&str] = &[
    "name",
    "identities",
    "targets",
    "action",
    "sql",
    "ssh",
    "http",
    "kubernetes",
    "approvers",
    "timeout",
    "min_approvals",
    "claims",
];

/// `sql = { ... }`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawSql {
    /// Statement kinds, e.g. `select`.
    pub statements: Vec<S>,
    /// Table globs.
    pub tables: Vec<S>,
    /// Function globs.
    pub functions: Vec<S>,
    /// Allow COPY to or from a file on the database server.
    pub copy_server_files: bool,
    /// Allow COPY to or from a program run on the database server.
    pub copy_program: bool,
    /// Allow statements flagged dangerous although the kinds are given by `"*"` or a group.
    pub dangerous: bool,
}
pub(crate) const SQL_KEYS: &[&str] = &[
    "statements",
    "tables",
    "functions",
    "copy_server_files",
    "copy_program",
    "dangerous",
];

/// `ssh = { ... }`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawSsh {
    /// Command globs for exec requests.
    pub exec: Vec<S>,
    /// Interactive shells.
    pub shell: Option<bool>,
    /// Subsystem globs, e.g. `sftp`.
    pub subsystems: Vec<S>,
    /// Port forwarding.
    pub forwarding: Option<bool>,
}
pub(crate) const SSH_KEYS: &[&str] = &["exec", "shell", "subsystems", "forwarding"];

/// `http = { ... }`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawHttp {
    /// Request methods.
    pub methods: Vec<S>,
    /// Path globs.
    pub paths: Vec<S>,
    /// Host header globs.
    pub hosts: Vec<S>,
}
pub(crate) const HTTP_KEYS: &[&str] = &["methods", "paths", "hosts"];

/// `kubernetes = { ... }`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawKube {
    /// API verbs.
    pub verbs: Vec<S>,
    /// Resource globs, e.g. `pods/exec`.
    pub resources: Vec<S>,
    /// Namespace globs.
    pub namespaces: Vec<S>,
    /// Object name globs.
    pub names: Vec<S>,
}
pub(crate) const KUBE_KEYS: &[&str] = &["verbs", "resources", "namespaces", "names"];

/// `[approvals]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawApprovals {
    /// PostgreSQL URL of a fleet-wide queue.
    pub store: Option<S>,
    /// File holding the store's password (instead of one in the URL).
    pub store_password_file: Option<S>,
    /// Environment variable holding the store's password.
    pub store_password_env: Option<S>,
    /// Slack-compatible webhook URL.
    pub webhook: Option<S>,
    /// `[approvals.oidc]`.
    pub oidc: Option<RawOidc>,
}
pub(crate) const APPROVALS_KEYS: &[&str] = &[
    "store",
    "store_password_file",
    "store_password_env",
    "webhook",
    "oidc",
];

/// `[approvals.oidc]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOidc {
    /// Issuer URL.
    pub issuer: S,
    /// Client id for the web page login.
    pub client_id: Option<S>,
    /// File holding the client secret.
    pub client_secret_file: Option<S>,
    /// Expected audience of bearer tokens.
    pub audience: Option<S>,
    /// Claim carrying group names.
    pub groups_claim: Option<S>,
}
pub(crate) const OIDC_KEYS: &[&str] = &[
    "issuer",
    "client_id",
    "client_secret_file",
    "audience",
    "groups_claim",
];

/// `[[mask]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMask {
    /// Target names, or `"*"`.
    pub targets: Spanned<Vec<S>>,
    /// `table.column` globs.
    #[serde(default)]
    pub columns: Vec<S>,
    /// Detector names.
    #[serde(default)]
    pub detectors: Vec<S>,
    /// `full`, `partial`, `hash` or `null`.
    pub style: Option<S>,
}
pub(crate) const MASK_KEYS: &[&str] = &["targets", "columns", "detectors", "style"];

/// `[[test]]`: one expected decision.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTest {
    /// What the case checks, named in failures.
    pub name: S,
    /// Identity name, as `identify` would give it.
    pub identity: Option<S>,
    /// Kernel facts of the workload, attributed with `identify` as the agent does.
    pub facts: Option<Spanned<RawTestFacts>>,
    /// Target name.
    pub target: S,
    /// One SQL string (the agent classifies it).
    pub sql: Option<S>,
    /// One SSH channel request.
    pub ssh: Option<Spanned<RawTestSsh>>,
    /// One HTTP request.
    pub http: Option<Spanned<RawTestHttp>>,
    /// One Kubernetes API request.
    pub kubernetes: Option<Spanned<RawTestKube>>,
    /// `allow`, `deny` or `approve`.
    pub expect: S,
    /// The deciding rule's name; `""` for a denial no rule made.
    pub rule: Option<S>,
}
pub(crate) const TEST_KEYS: &[&str] = &[
    "name",
    "identity",
    "facts",
    "target",
    "sql",
    "ssh",
    "http",
    "kubernetes",
    "expect",
    "rule",
];

/// `facts = { ... }` of `[[test]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawTestFacts {
    /// cgroup v2 path.
    pub cgroup: Option<S>,
    /// Real uid.
    pub uid: Option<Spanned<i64>>,
    /// User name.
    pub user: Option<S>,
    /// Executable path.
    pub exe: Option<S>,
    /// Command name.
    pub comm: Option<S>,
}
pub(crate) const TEST_FACTS_KEYS: &[&str] = &["cgroup", "uid", "user", "exe", "comm"];

/// `ssh = { ... }` of `[[test]]`: exactly one key.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawTestSsh {
    /// Exec command line.
    pub exec: Option<S>,
    /// An interactive shell.
    pub shell: Option<Spanned<bool>>,
    /// Subsystem name (`sftp`).
    pub subsystem: Option<S>,
    /// Forward destination `host:port`.
    pub forward: Option<S>,
}
pub(crate) const TEST_SSH_KEYS: &[&str] = &["exec", "shell", "subsystem", "forward"];

/// `http = { ... }` of `[[test]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTestHttp {
    /// Request method.
    pub method: S,
    /// Request path.
    pub path: S,
    /// Host header (default: empty).
    #[serde(default)]
    pub host: Option<S>,
}
pub(crate) const TEST_HTTP_KEYS: &[&str] = &["method", "path", "host"];

/// `kubernetes = { ... }` of `[[test]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTestKube {
    /// API verb.
    pub verb: S,
    /// `resource` or `resource/subresource`.
    pub resource: S,
    /// Namespace (default: cluster-scoped).
    #[serde(default)]
    pub namespace: Option<S>,
    /// Object name (default: a collection).
    #[serde(default)]
    pub name: Option<S>,
}
pub(crate) const TEST_KUBE_KEYS: &[&str] = &["verb", "resource", "namespace", "name"];

/// Label of the file's root table.
pub(crate) const ROOT_LABEL: &str = "the top level";

/// Every table kind, with the label used in messages.
pub(crate) const TABLES: &[(&[&str], &str)] = &[
    (ROOT_KEYS, ROOT_LABEL),
    (AGENT_KEYS, "[agent]"),
    (IDENTITY_KEYS, "[[identity]]"),
    (IDENTITY_OIDC_KEYS, "`oidc` of [[identity]]"),
    (TARGET_KEYS, "[[target]]"),
    (TARGET_TLS_KEYS, "`tls` of [[target]]"),
    (CREDENTIAL_KEYS, "[credential.NAME]"),
    (RULE_KEYS, "[[rule]]"),
    (SQL_KEYS, "`sql` of [[rule]]"),
    (SSH_KEYS, "`ssh` of [[rule]]"),
    (HTTP_KEYS, "`http` of [[rule]]"),
    (KUBE_KEYS, "`kubernetes` of [[rule]]"),
    (APPROVALS_KEYS, "[approvals]"),
    (OIDC_KEYS, "[approvals.oidc]"),
    (MASK_KEYS, "[[mask]]"),
    (TEST_KEYS, "[[test]]"),
    (TEST_FACTS_KEYS, "`facts` of [[test]]"),
    (TEST_SSH_KEYS, "`ssh` of [[test]]"),
    (TEST_HTTP_KEYS, "`http` of [[test]]"),
    (TEST_KUBE_KEYS, "`kubernetes` of [[test]]"),
];
