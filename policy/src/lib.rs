//! tollgate's policy language: parse a TOML policy file, validate it, and decide.
//!
//! Everything here is pure: no I/O, no async, no global state. The agent reads the file, calls
//! [`parse`], attributes each connection with [`Policy::identify`] and its route table (built
//! from [`Policy::routes`], looked up with [`route::lookup`], the rule [`Policy::target_for`]
//! follows too), and asks [`decide`] about the connection and then about each operation on it.
//!
//! # Layout
//!
//! - `raw`: the serde tree, the file exactly as written, with `toml::Spanned` positions and
//!   `deny_unknown_fields` everywhere.
//! - `validate`: raw tree to [`Policy`]: enums, addresses, globs, durations and cross-references
//!   checked, each error pointing at the offending value.
//! - `model`: the public validated types, with private precompiled glob matchers.
//! - `index`: name and rule lookup tables built once at parse time.
//! - [`route`]: which target protects an address (canonical addresses, longest prefix), shared
//!   with the agent's route table.
//! - `glob`: compiled glob helpers (`*` matches `/` too).
//! - [`http`]: request attribution for HTTP and Kubernetes (path normalisation, API verbs).
//! - `shell`: exec commands read as POSIX shell word lists, and `ssh.exec` patterns.
//! - `decide`: [`Request`], [`Operation`], [`Decision`] and [`decide`].
//! - `error`: [`PolicyError`], `file:line:col: message`.
//!
//! ```
//! use tollgate_policy::{decide, parse, Action, Operation, Request, WorkloadFacts};
//!
//! let policy = parse(
//!     r#"
//! [[identity]]
//! name = "ci-bot"
//! cgroup = "/system.slice/ci-runner.service*"
//!
//! [[target]]
//! name = "orders-db"
//! protocol = "postgres"
//! address = ["127.0.0.1:5432"]
//!
//! [[rule]]
//! name = "ci reads"
//! identities = ["ci-bot"]
//! targets = ["orders-db"]
//! action = "allow"
//! sql = { statements = ["select"] }
//! "#,
//!     "policy.toml",
//! )?;
//! let facts = WorkloadFacts {
//!     cgroup: "/system.slice/ci-runner.service",
//!     uid: 1001,
//!     user: Some("ci"),
//!     exe: Some("/usr/bin/psql"),
//!     comm: "psql",
//!     foreign_userns: false,
//! };
//! let identity = policy.identify(&facts).map(|i| i.name.as_str());
//! let target = policy
//!     .target_for("127.0.0.1:5432".parse()?, &|_host| Vec::new())
//!     .map(|t| t.name.as_str());
//! assert_eq!((identity, target), (Some("ci-bot"), Some("orders-db")));
//!
//! let connect = Request { identity, target: "orders-db", op: Operation::Connect, claims: None, inspected: true };
//! assert_eq!(decide(&policy, &connect).action, Action::Allow);
//! let tables = vec!["public.orders".to_string()];
//! let drop = Operation::Sql { statement: "drop", tables: &tables, functions: &[] };
//! let d = decide(&policy, &Request { identity, target: "orders-db", op: drop, claims: None, inspected: true });
//! assert_eq!((d.action, d.rule), (Action::Deny, None));
//!
//! let err = parse("[[identity]]\nname = \"x\"\ncgroups = \"/a\"\n", "policy.toml").unwrap_err();
//! assert!(err.to_string().starts_with("policy.toml:3:1: unknown key `cgroups` in [[identity]]"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Treat a parsed [`Policy`] as read-only: its matchers and index are compiled from the parsed
//! values, so changing a public field afterwards is not seen by [`decide`]; parse again.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod case;
mod decide;
mod error;
mod glob;
pub mod http;
mod index;
mod lint;
mod model;
mod raw;
pub mod route;
mod shell;
mod validate;

pub use case::{CaseFacts, CaseOp, CaseWho, PolicyCase};
pub use decide::{decide, Decision, DecisionReason, Operation, Request, SshOpKind};
pub use error::PolicyError;
pub use lint::{secret_files, warnings, SecretFileRef};
pub use model::{
    redact_url_password, Action, AgentConfig, ApprovalsConfig, Credential, FailMode, HttpMatch,
    Identity, IdentityOidc, KubeMatch, MaskRule, MaskStyle, Mode, NetnsScope, OidcConfig, Policy,
    Protocol, Rule, SecretSource, SqlMatch, SshMatch, StorePassword, Target, TargetAddress,
    TargetTls, TlsMode, WorkloadFacts, AGENT_SOCKET_NAME, DETECTORS, KUBE_VERBS, SQL_STATEMENTS,
    SQL_STATEMENT_GROUPS, UNIX_PATH_MAX,
};
pub use shell::{split_command, CommandError};

/// Parse and validate a policy file. `file_name` is only used in error messages.
///
/// Returns the first problem in file order; [`parse_all`] returns every one.
pub fn parse(text: &str, file_name: &str) -> Result<Policy, PolicyError> {
    parse_all(text, file_name).map_err(|errors| {
        errors.into_iter().next().unwrap_or_else(|| PolicyError {
            file: file_name.to_string(),
            line: 1,
            col: 1,
            message: "policy rejected without a reason (bug in tollgate-policy)".to_string(),
        })
    })
}

/// Parse and validate a policy file, reporting every problem found, sorted by position.
///
/// A syntax or type error stops parsing, so it is reported alone.
pub fn parse_all(text: &str, file_name: &str) -> Result<Policy, Vec<PolicyError>> {
    let raw: raw::RawPolicy = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(vec![PolicyError::from_toml(file_name, text, &e)]),
    };
    let mut cx = validate::Cx::new(file_name, text);
    match validate::build(&mut cx, raw) {
        Some(policy) if cx.errors.is_empty() => Ok(policy),
        _ => {
            let mut errors = cx.errors;
            errors.sort_by_key(|e| (e.line, e.col));
            Err(errors)
        }
    }
}
