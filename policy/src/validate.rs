//! From the serde tree to a [`Policy`]: every check that toml's types cannot express.
//!
//! Errors are collected rather than returned at the first one, so `check-policy` can show them
//! all; each points at the offending value. Names are gathered from the raw tree first, so an
//! identity with a bad glob does not also make every rule naming it "unknown".

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::error::{suggest, PolicyError};
use crate::glob::{compile, GlobList, NameGlobs, Pattern};
use crate::index::Index;
use crate::model::{
    redact_url_password, Action, AgentConfig, ApprovalsConfig, Credential, FailMode, HttpMatch,
    Identity, IdentityOidc, KubeMatch, MaskRule, MaskStyle, Mode, NetnsScope, OidcConfig, Policy,
    Protocol, Rule, SqlMatch, SshMatch, StorePassword, Target, TargetAddress, TargetTls, TlsMode,
    DETECTORS, KUBE_VERBS, SQL_STATEMENTS, SQL_STATEMENT_GROUPS,
};
use crate::raw::{
    RawAgent, RawApprovals, RawCredential, RawHttp, RawIdentity, RawKube, RawMask, RawPolicy,
    RawRule, RawSql, RawSsh, RawTarget, RawTargetTls, S,
};
use crate::route::{canonical_ip, canonical_net};
use crate::shell::ExecPattern;

/// Secret-source keys of a credential; at most one may be set.
const SECRET_KEYS: &str = "password_file, key_file, token_file, env";

/// Error collector.
pub(crate) struct Cx<'a> {
    file: &'a str,
    text: &'a str,
    pub(crate) errors: Vec<PolicyError>,
}

impl<'a> Cx<'a> {
    pub(crate) fn new(file: &'a str, text: &'a str) -> Self {
        Cx {
            file,
            text,
            errors: Vec::new(),
        }
    }

    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.errors.push(PolicyError::at(
            self.file,
            self.text,
            span.start,
            message.into(),
        ));
    }

    fn line_of(&self, offset: usize) -> usize {
        crate::error::line_col(self.text, offset).0
    }
}

/// `value` as one of `choices`, or an error naming them all.
fn one_of<T: Copy>(
    cx: &mut Cx<'_>,
    value: &S,
    key: &str,
    what: &str,
    choices: &[(&str, T)],
) -> Option<T> {
    let v = value.get_ref();
    if let Some((_, t)) = choices.iter().find(|(name, _)| *name == v) {
        return Some(*t);
    }
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    let mut msg = format!(
        "invalid {key} \"{v}\"{what}: expected one of: {}",
        names.join(", ")
    );
    if let Some(s) = suggest(v, names.iter().copied()) {
        msg.push_str(&format!("; did you mean \"{s}\"?"));
    }
    cx.err(value.span(), msg);
    None
}

fn non_empty(cx: &mut Cx<'_>, value: &S, key: &str, what: &str) -> Option<String> {
    if value.get_ref().trim().is_empty() {
        cx.err(
            value.span(),
            format!("`{key}`{what} is empty: give a value or remove the key"),
        );
        None
    } else {
        Some(value.get_ref().clone())
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn env_name(cx: &mut Cx<'_>, value: &S, what: &str) -> Option<String> {
    let v = value.get_ref();
    let ok = v
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Some(v.clone())
    } else {
        cx.err(
            value.span(),
            format!(
                "`env`{what} must name an environment variable (letters, digits, `_`), e.g. \"DB_PASSWORD\"; put the secret itself in the agent's environment, not in the policy"
            ),
        );
        None
    }
}

fn path(cx: &mut Cx<'_>, value: &S, key: &str, what: &str) -> Option<PathBuf> {
    non_empty(cx, value, key, what).map(PathBuf::from)
}

fn duration(cx: &mut Cx<'_>, value: &S, key: &str, what: &str, zero_ok: bool) -> Option<Duration> {
    match humantime::parse_duration(value.get_ref().trim()) {
        Ok(d) if d.is_zero() && !zero_ok => {
            cx.err(
                value.span(),
                format!("`{key}`{what} must be longer than 0, e.g. \"30s\""),
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            cx.err(
                value.span(),
                format!(
                    "`{key}`{what}: bad duration \"{}\" ({e}): write e.g. \"10s\", \"5m\", \"1h\"",
                    value.get_ref()
                ),
            );
            None
        }
    }
}

fn socket_addr(cx: &mut Cx<'_>, value: &S, key: &str) -> Option<SocketAddr> {
    match value.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.err(
                value.span(),
                format!(
                    "`{key}` in [agent]: bad socket address \"{}\": write ip:port, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\"",
                    value.get_ref()
                ),
            );
            None
        }
    }
}

/// An optional listener: an address, or `"off"`.
fn optional_addr(
    cx: &mut Cx<'_>,
    value: Option<&S>,
    key: &str,
    default: Option<SocketAddr>,
) -> Option<SocketAddr> {
    match value {
        None => default,
        Some(v) if v.get_ref() == "off" => None,
        Some(v) => socket_addr(cx, v, key),
    }
}

/// Compile each glob, reporting bad ones at their own position.
fn globs(cx: &mut Cx<'_>, list: &[S], key: &str, what: &str, ci: bool) -> Vec<Pattern> {
    list.iter()
        .filter_map(|g| {
            if g.get_ref().is_empty() {
                cx.err(
                    g.span(),
                    format!("empty glob in `{key}`{what}: remove it, or use \"*\" for anything"),
                );
                return None;
            }
            match compile(g.get_ref(), ci) {
                Ok(p) => Some(p),
                Err(e) => {
                    cx.err(
                        g.span(),
                        format!("bad glob \"{}\" in `{key}`{what}: {e}", g.get_ref()),
                    );
                    None
                }
            }
        })
        .collect()
}

fn exec_patterns(cx: &mut Cx<'_>, list: &[S], key: &str, what: &str) -> Box<[ExecPattern]> {
    list.iter()
        .filter_map(|p| match ExecPattern::compile(p.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                cx.err(
                    p.span(),
                    format!("bad pattern \"{}\" in `{key}`{what}: {e}", p.get_ref()),
                );
                None
            }
        })
        .collect()
}

fn glob_list(cx: &mut Cx<'_>, list: &[S], key: &str, what: &str, ci: bool) -> GlobList {
    GlobList::new(globs(cx, list, key, what, ci))
}

fn name_globs(cx: &mut Cx<'_>, list: &[S], key: &str, what: &str) -> NameGlobs {
    NameGlobs::new(globs(cx, list, key, what, true))
}

fn single_glob(cx: &mut Cx<'_>, value: &S, key: &str, what: &str) -> Option<Pattern> {
    globs(cx, std::slice::from_ref(value), key, what, false).pop()
}

/// Words from a fixed vocabulary (or `"*"`), stored lowercase.
fn words(cx: &mut Cx<'_>, list: &[S], key: &str, what: &str, known: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(list.len());
    for w in list {
        let lower = w.get_ref().to_ascii_lowercase();
        if lower == "*" || known.contains(&lower.as_str()) {
            out.push(lower);
            continue;
        }
        let mut msg = format!("unknown {key} entry \"{}\"{what}", w.get_ref());
        match suggest(&lower, known.iter().copied()) {
            Some(s) => msg.push_str(&format!(": did you mean \"{s}\"?")),
            None => msg.push_str(&format!(
                " (expected one of: {}, or \"*\")",
                known.join(", ")
            )),
        }
        cx.err(w.span(), msg);
    }
    out
}

fn strings(list: &[S]) -> Vec<String> {
    list.iter().map(|s| s.get_ref().clone()).collect()
}

/// Parse one `address` entry.
pub(crate) fn target_address(s: &str) -> Result<TargetAddress, String> {
    const FORMS: &str =
        "write ip:port, [ipv6]:port, cidr:port, [ipv6-cidr]:port or host:port, e.g. \"10.0.0.0/24:5432\"";
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(format!(
                "port 0 in \"{s}\": give the port the target listens on (1-65535)"
            ));
        }
        return Ok(TargetAddress::Exact(SocketAddr::new(
            canonical_ip(sa.ip()),
            sa.port(),
        )));
    }
    let (host, port, bracketed) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("bad address \"{s}\": missing `]:port`; {FORMS}"))?;
        (h, p, true)
    } else {
        let (h, p) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("bad address \"{s}\": missing port; {FORMS}"))?;
        if h.contains(':') {
            return Err(format!(
                "bad address \"{s}\": IPv6 addresses need brackets, e.g. \"[::1]:5432\" or \"[fd00::/64]:5432\""
            ));
        }
        (h, p, false)
    };
    let port: u16 = port.parse().map_err(|_| {
        format!("bad port \"{port}\" in \"{s}\": expected a number from 1 to 65535")
    })?;
    if port == 0 {
        return Err(format!(
            "port 0 in \"{s}\": give the port the target listens on (1-65535)"
        ));
    }
    if host.contains('/') {
        let net: IpNet = host.parse().map_err(|e| {
            format!("bad CIDR \"{host}\" in \"{s}\": {e}; e.g. \"10.0.0.0/24:5432\"")
        })?;
        return Ok(TargetAddress::Cidr(canonical_net(net), port));
    }
    if bracketed {
        return Err(format!(
            "bad IPv6 address \"{host}\" in \"{s}\"; e.g. \"[::1]:5432\""
        ));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "bad IPv4 address \"{host}\" in \"{s}\"; e.g. \"127.0.0.1:5432\""
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(format!("bad host name \"{host}\" in \"{s}\"; {FORMS}"));
    }
    Ok(TargetAddress::Host(name.to_ascii_lowercase(), port))
}

fn url(cx: &mut Cx<'_>, value: &S, key: &str, schemes: &[&str], example: &str) -> Option<String> {
    let v = value.get_ref();
    if schemes
        .iter()
        .any(|s| v.starts_with(s) && v.len() > s.len())
    {
        Some(v.clone())
    } else {
        cx.err(
            value.span(),
            format!(
                "`{key}` must be a {} URL, e.g. \"{example}\"",
                schemes.join(" or ")
            ),
        );
        None
    }
}

/// Validate the whole tree. Returns `None` if any error was recorded.
pub(crate) fn build(cx: &mut Cx<'_>, raw: RawPolicy) -> Option<Policy> {
    let identity_names: Vec<&str> = raw
        .identity
        .iter()
        .map(|i| i.get_ref().name.get_ref().as_str())
        .collect();
    let target_names: Vec<&str> = raw
        .target
        .iter()
        .map(|t| t.get_ref().name.get_ref().as_str())
        .collect();
    let target_protocols: HashMap<&str, Option<Protocol>> = raw
        .target
        .iter()
        .map(|t| {
            let t = t.get_ref();
            (t.name.get_ref().as_str(), protocol_of(t.protocol.get_ref()))
        })
        .collect();
    let opaque_targets: Vec<&str> = raw
        .target
        .iter()
        .map(|t| t.get_ref())
        .filter(|t| t.inspect.as_ref().is_some_and(|v| !*v.get_ref()))
        .map(|t| t.name.get_ref().as_str())
        .collect();

    let agent = agent(cx, &raw.agent);

    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut identities = Vec::with_capacity(raw.identity.len());
    for i in &raw.identity {
        check_name(cx, &i.get_ref().name, "identity", &mut seen);
        if let Some(id) = identity(cx, i.get_ref(), i.span()) {
            identities.push(id);
        }
    }

    let mut credentials = BTreeMap::new();
    for (name, c) in &raw.credential {
        if let Some(cred) = credential(cx, name, c.get_ref(), c.span()) {
            credentials.insert(name.clone(), cred);
        }
    }

    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut claimed: HashMap<TargetAddress, &str> = HashMap::new();
    let mut targets = Vec::with_capacity(raw.target.len());
    for t in &raw.target {
        let rt = t.get_ref();
        check_name(cx, &rt.name, "target", &mut seen);
        if let Some(tg) = target(cx, rt, &raw.credential, &mut claimed) {
            targets.push(tg);
        }
    }

    let target_index: HashMap<&str, u32> = target_names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i as u32))
        .rev()
        .collect();
    let names = Names {
        identities: &identity_names,
        targets: &target_names,
        target_protocols: &target_protocols,
        opaque_targets: &opaque_targets,
        target_index: &target_index,
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut rules = Vec::with_capacity(raw.rule.len());
    for r in &raw.rule {
        check_name(cx, &r.get_ref().name, "rule", &mut seen);
        if let Some(rule) = rule(cx, r.get_ref(), &names) {
            rules.push(rule);
        }
    }

    let approvals = raw.approvals.as_ref().and_then(|a| approvals(cx, a));
    let masks: Vec<MaskRule> = raw
        .mask
        .iter()
        .filter_map(|m| mask(cx, m.get_ref(), m.span(), &names))
        .collect();

    let rule_names: Vec<&str> = raw
        .rule
        .iter()
        .map(|r| r.get_ref().name.get_ref().as_str())
        .collect();
    let case_names = case::CaseNames {
        identities: &identity_names,
        targets: &target_protocols,
        rules: &rule_names,
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut cases = Vec::with_capacity(raw.test.len());
    for t in &raw.test {
        check_name(cx, &t.get_ref().name, "test", &mut seen);
        if let Some(c) = case::case(cx, t.get_ref(), &case_names) {
            cases.push(c);
        }
    }

    if !cx.errors.is_empty() {
        return None;
    }
    let names: Vec<&str> = identities
        .iter()
        .map(|i: &Identity| i.name.as_str())
        .collect();
    let index = Index::build(&names, &targets, &rules);
    Some(Policy {
        agent: agent.unwrap_or_default(),
        identities,
        targets,
        credentials,
        rules,
        approvals,
        masks,
        cases,
        index,
    })
}

/// Names defined in the file, for reference checks.
struct Names<'a> {
    identities: &'a [&'a str],
    targets: &'a [&'a str],
    target_protocols: &'a HashMap<&'a str, Option<Protocol>>,
    /// Targets with `inspect = false` (relayed whole: no operation matcher applies).
    opaque_targets: &'a [&'a str],
    /// First position of each target name (targets with errors included, so positions match
    /// only when the policy is valid, which is the only time they are used).
    target_index: &'a HashMap<&'a str, u32>,
}

const PROTOCOLS: &[(&str, Protocol)] = &[
    ("postgres", Protocol::Postgres),
    ("ssh", Protocol::Ssh),
    ("http", Protocol::Http),
    ("https", Protocol::Https),
    ("kubernetes", Protocol::Kubernetes),
    ("tcp", Protocol::Tcp),
];

fn protocol_of(s: &str) -> Option<Protocol> {
    PROTOCOLS.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
}

/// Names must be non-empty, not `*`, and unique within their kind.
fn check_name<'r>(cx: &mut Cx<'_>, name: &'r S, kind: &str, seen: &mut HashMap<&'r str, usize>) {
    let n = name.get_ref().as_str();
    if n.trim().is_empty() {
        cx.err(
            name.span(),
            format!("{kind} `name` is empty: give it a name"),
        );
    } else if n == "*" && kind != "rule" {
        cx.err(
            name.span(),
            format!("{kind} name \"*\" is reserved (it means every {kind} in rules): rename it"),
        );
    } else if let Some(&first) = seen.get(n) {
        let first = cx.line_of(first);
        cx.err(
            name.span(),
            format!("duplicate {kind} name \"{n}\" (first defined on line {first}): rename one"),
        );
    } else {
        // Byte offset; the line is only worked out for the message.
        seen.insert(n, name.span().start);
    }
}

fn agent(cx: &mut Cx<'_>, a: &RawAgent) -> Option<AgentConfig> {
    let d = AgentConfig::default();
    let before = cx.errors.len();
    let listen = match &a.listen {
        None => d.listen.clone(),
        Some(list) => {
            if list.get_ref().is_empty() {
                cx.err(
                    list.span(),
                    "`listen` in [agent] is empty: give at least one address, e.g. [\"127.0.0.1:15001\"]",
                );
            }
            list.get_ref()
                .iter()
                .filter_map(|s| socket_addr(cx, s, "listen"))
                .collect()
        }
    };
    let metrics = optional_addr(cx, a.metrics.as_ref(), "metrics", d.metrics);
    let admin = optional_addr(cx, a.admin.as_ref(), "admin", d.admin);
    let data_dir = a.data_dir.as_ref().map_or(Some(d.data_dir.clone()), |p| {
        path(cx, p, "data_dir", " in [agent]")
    });
    let bpf_pin_path = a
        .bpf_pin_path
        .as_ref()
        .map_or(Some(d.bpf_pin_path.clone()), |p| {
            path(cx, p, "bpf_pin_path", " in [agent]")
        });
    let fail_mode = a.fail_mode.as_ref().map_or(Some(d.fail_mode), |v| {
        one_of(
            cx,
            v,
            "fail_mode",
            " in [agent]",
            &[("closed", FailMode::Closed), ("open", FailMode::Open)],
        )
    });
    let mode = a.mode.as_ref().map_or(Some(d.mode), |v| {
        one_of(
            cx,
            v,
            "mode",
            " in [agent]",
            &[("enforce", Mode::Enforce), ("observe", Mode::Observe)],
        )
    });
    let max_connections = match &a.max_connections {
        None => Some(d.max_connections),
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                cx.err(
                    v.span(),
                    format!(
                        "`max_connections` in [agent] must be a positive number, got {}",
                        v.get_ref()
                    ),
                );
                None
            }
        },
    };
    let drain_timeout = a.drain_timeout.as_ref().map_or(Some(d.drain_timeout), |v| {
        duration(cx, v, "drain_timeout", " in [agent]", true)
    });
    let dns_refresh = a.dns_refresh.as_ref().map_or(Some(d.dns_refresh), |v| {
        duration(cx, v, "dns_refresh", " in [agent]", false)
    });
    let namespace = a.namespace.as_ref().map_or(Some(d.namespace), |v| {
        one_of(
            cx,
            v,
            "namespace",
            " in [agent]",
            &[("all", NetnsScope::All), ("own", NetnsScope::Own)],
        )
    });
    let host_id = match &a.host_id {
        None => None,
        Some(v) => {
            let ok = !v.get_ref().is_empty()
                && v.get_ref().len() <= 128
                && v.get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !ok {
                cx.err(
                    v.span(),
                    format!(
                        "invalid host_id \"{}\" in [agent]: use 1 to 128 characters from A-Z a-z 0-9 - _ . :",
                        v.get_ref()
                    ),
                );
            }
            Some(v.get_ref().clone())
        }
    };
    let unix_dir = a.unix_dir.as_ref().map_or(Some(d.unix_dir.clone()), |v| {
        let p = path(cx, v, "unix_dir", " in [agent]")?;
        // `<unix_dir>/agent.sock` must fit sun_path (107 bytes and a NUL).
        let longest = crate::model::UNIX_PATH_MAX - 1 - crate::model::AGENT_SOCKET_NAME.len() - 1;
        if !p.is_absolute() || p.as_os_str().len() > longest {
            cx.err(
                v.span(),
                format!("`unix_dir` in [agent] must be an absolute path of at most {longest} bytes (the agent's socket in it must fit a Unix socket address), e.g. \"/run/tollgate\""),
            );
            return None;
        }
        Some(p)
    });
    if cx.errors.len() != before {
        return None;
    }
    Some(AgentConfig {
        listen,
        metrics,
        admin,
        data_dir: data_dir?,
        fail_mode: fail_mode?,
        mode: mode?,
        bpf_pin_path: bpf_pin_path?,
        max_connections: max_connections?,
        drain_timeout: drain_timeout?,
        dns_refresh: dns_refresh?,
        namespace: namespace?,
        host_id,
        unix_dir: unix_dir?,
    })
}

fn identity(cx: &mut Cx<'_>, i: &RawIdentity, table: Range<usize>) -> Option<Identity> {
    let name = i.name.get_ref().clone();
    let what = format!(" of identity \"{name}\"");
    let before = cx.errors.len();
    if i.cgroup.is_none()
        && i.uid.is_none()
        && i.user.is_none()
        && i.exe.is_none()
        && i.comm.is_none()
    {
        cx.err(
            table,
            format!(
                "identity \"{name}\" has no selector: add at least one of cgroup, uid, user, exe, comm (all given keys must match)"
            ),
        );
    }
    let uid = i
        .uid
        .as_ref()
        .and_then(|u| match u32::try_from(*u.get_ref()) {
            Ok(v) => Some(v),
            Err(_) => {
                cx.err(
                    u.span(),
                    format!(
                        "`uid`{what} must be between 0 and 4294967295, got {}",
                        u.get_ref()
                    ),
                );
                None
            }
        });
    let user = i
        .user
        .as_ref()
        .and_then(|u| non_empty(cx, u, "user", &what));
    let cgroup_glob = i
        .cgroup
        .as_ref()
        .and_then(|g| single_glob(cx, g, "cgroup", &what));
    let exe_glob = i
        .exe
        .as_ref()
        .and_then(|g| single_glob(cx, g, "exe", &what));
    let comm_glob = i
        .comm
        .as_ref()
        .and_then(|g| single_glob(cx, g, "comm", &what));
    if let (Some(b), None) = (&i.exe_foreign_userns, &i.exe) {
        cx.err(
            b.span(),
            format!(
                "`exe_foreign_userns`{what} has no effect without `exe`: remove it or add `exe`"
            ),
        );
    }
    let oidc = i.oidc.as_ref().and_then(|o| {
        let o = o.get_ref();
        let issuer = url(
            cx,
            &o.issuer,
            "oidc.issuer",
            &["https://", "http://"],
            "https://idp.example",
        )?;
        let mut require_claims = BTreeMap::new();
        for (claim, values) in &o.require_claims {
            let vals: Vec<String> = values
                .iter()
                .filter_map(|v| non_empty(cx, v, "oidc.require_claims", &what))
                .collect();
            require_claims.insert(claim.clone(), vals);
        }
        Some(IdentityOidc {
            issuer,
            audience: o
                .audience
                .as_ref()
                .and_then(|a| non_empty(cx, a, "oidc.audience", &what)),
            require_claims,
        })
    });
    if cx.errors.len() != before {
        return None;
    }
    Some(Identity {
        name,
        cgroup: i.cgroup.as_ref().map(|s| s.get_ref().clone()),
        uid,
        user,
        exe: i.exe.as_ref().map(|s| s.get_ref().clone()),
        exe_foreign_userns: i.exe_foreign_userns.as_ref().is_some_and(|b| *b.get_ref()),
        comm: i.comm.as_ref().map(|s| s.get_ref().clone()),
        oidc,
        cgroup_glob,
        exe_glob,
        comm_glob,
    })
}

fn credential(
    cx: &mut Cx<'_>,
    name: &str,
    c: &RawCredential,
    table: Range<usize>,
) -> Option<Credential> {
    let what = format!(" of [credential.{name}]");
    let before = cx.errors.len();
    let sources = [
        ("password_file", &c.password_file),
        ("key_file", &c.key_file),
        ("token_file", &c.token_file),
        ("env", &c.env),
    ];
    let mut first: Option<&str> = None;
    for (key, v) in sources {
        if let Some(v) = v {
            if let Some(f) = first {
                cx.err(
                    v.span(),
                    format!(
                        "credential \"{name}\" has both `{f}` and `{key}`: keep exactly one secret source ({SECRET_KEYS})"
                    ),
                );
            } else {
                first = Some(key);
            }
        }
    }
    if let (Some(cert), None) = (&c.cert_file, &c.key_file) {
        cx.err(
            cert.span(),
            format!("`cert_file` of credential \"{name}\" needs `key_file` beside it: the certificate is for that private key"),
        );
    }
    if first.is_none() && c.user.is_none() && c.cert_file.is_none() {
        cx.err(
            table,
            format!("credential \"{name}\" is empty: set `user` and one of {SECRET_KEYS}"),
        );
    }
    let cred = Credential {
        user: c
            .user
            .as_ref()
            .and_then(|v| non_empty(cx, v, "user", &what)),
        password_file: c
            .password_file
            .as_ref()
            .and_then(|v| path(cx, v, "password_file", &what)),
        key_file: c
            .key_file
            .as_ref()
            .and_then(|v| path(cx, v, "key_file", &what)),
        cert_file: c
            .cert_file
            .as_ref()
            .and_then(|v| path(cx, v, "cert_file", &what)),
        token_file: c
            .token_file
            .as_ref()
            .and_then(|v| path(cx, v, "token_file", &what)),
        env: c.env.as_ref().and_then(|v| env_name(cx, v, &what)),
    };
    (cx.errors.len() == before).then_some(cred)
}

fn target<'r>(
    cx: &mut Cx<'_>,
    t: &'r RawTarget,
    credentials: &BTreeMap<String, toml::Spanned<RawCredential>>,
    claimed: &mut HashMap<TargetAddress, &'r str>,
) -> Option<Target> {
    let name = t.name.get_ref().as_str();
    let before = cx.errors.len();
    let protocol = one_of(
        cx,
        &t.protocol,
        "protocol",
        &format!(" for target \"{name}\""),
        PROTOCOLS,
    );
    if t.address.get_ref().is_empty() {
        cx.err(
            t.address.span(),
            format!(
                "target \"{name}\" has no `address`: add at least one, e.g. [\"127.0.0.1:5432\"]"
            ),
        );
    }
    let mut address = Vec::with_capacity(t.address.get_ref().len());
    for a in t.address.get_ref() {
        match target_address(a.get_ref()) {
            Ok(addr) => {
                if let Some(other) = claimed.get(&addr) {
                    let msg = if *other == name {
                        format!(
                            "address \"{}\" is listed twice in target \"{name}\": remove one",
                            a.get_ref()
                        )
                    } else {
                        format!(
                            "address \"{}\" of target \"{name}\" is already claimed by target \"{other}\": an address belongs to one target",
                            a.get_ref()
                        )
                    };
                    cx.err(a.span(), msg);
                } else {
                    claimed.insert(addr.clone(), name);
                }
                address.push(addr);
            }
            Err(msg) => cx.err(a.span(), format!("`address` of target \"{name}\": {msg}")),
        }
    }
    let credential = t.credential.as_ref().and_then(|c| {
        let cname = c.get_ref();
        if credentials.contains_key(cname) {
            return Some(cname.clone());
        }
        let mut msg = format!("target \"{name}\" names unknown credential \"{cname}\"");
        match suggest(cname, credentials.keys().map(String::as_str)) {
            Some(s) => msg.push_str(&format!(": did you mean \"{s}\"?")),
            None => msg.push_str(&format!(
                ": add a [credential.{cname}] table or fix the name"
            )),
        }
        cx.err(c.span(), msg);
        None
    });
    let tls = t
        .tls
        .as_ref()
        .map(|tls| target_tls(cx, name, tls))
        .unwrap_or_default();
    if cx.errors.len() != before {
        return None;
    }
    let protocol = protocol?;
    // https and kubernetes targets always use TLS upstream (`tls` chooses how the server is
    // checked); plain `http`, `ssh` and `tcp` have no TLS of the agent's own.
    if tls.mode != TlsMode::Disable
        && !matches!(
            protocol,
            Protocol::Postgres | Protocol::Https | Protocol::Kubernetes
        )
    {
        if let Some(span) = t.tls.as_ref().map(|s| s.span()) {
            cx.err(
                span,
                format!("`tls` of target \"{name}\": upstream TLS is only supported for protocols \"postgres\", \"https\" and \"kubernetes\"; remove it"),
            );
            return None;
        }
    }
    if let Some(pool) = &t.pool {
        if !matches!(
            protocol,
            Protocol::Postgres
                | Protocol::Ssh
                | Protocol::Http
                | Protocol::Https
                | Protocol::Kubernetes
        ) {
            cx.err(
                pool.span(),
                format!("`pool` of target \"{name}\": connection pooling is only supported for protocols \"postgres\", \"ssh\", \"http\", \"https\" and \"kubernetes\"; remove it"),
            );
            return None;
        }
    }
    let unix_socket = match &t.unix_socket {
        None => None,
        Some(v) => Some(target_unix_socket(cx, name, protocol, &address, v)?),
    };
    for (key, v) in [
        ("known_hosts", &t.known_hosts),
        ("host_key_file", &t.host_key_file),
    ] {
        if let Some(v) = v {
            if protocol != Protocol::Ssh {
                cx.err(
                    v.span(),
                    format!(
                        "`{key}` of target \"{name}\": only protocol \"ssh\" uses it; remove it"
                    ),
                );
                return None;
            }
        }
    }
    // A certificate is an OpenSSH user certificate (ssh) or a TLS client certificate (https,
    // kubernetes); and an HTTP target's `key_file` is only ever a client certificate's key
    // (never sent as a token).
    if let (Some(c), Some(raw)) = (
        &t.credential,
        credential
            .as_ref()
            .and_then(|c| credentials.get(c.as_str())),
    ) {
        let raw = raw.get_ref();
        let has_cert = matches!(
            protocol,
            Protocol::Https | Protocol::Kubernetes | Protocol::Ssh
        );
        if raw.cert_file.is_some() && !has_cert {
            cx.err(
                c.span(),
                format!("`credential` of target \"{name}\": its `cert_file` is only used by \"ssh\" (an OpenSSH user certificate), \"https\" and \"kubernetes\" (a TLS client certificate) targets"),
            );
            return None;
        }
        let http = matches!(
            protocol,
            Protocol::Http | Protocol::Https | Protocol::Kubernetes
        );
        if http && raw.key_file.is_some() && raw.cert_file.is_none() {
            cx.err(
                c.span(),
                format!("`credential` of target \"{name}\": for an HTTP target `key_file` is a client certificate's key and needs `cert_file` (a bearer token is `token_file`)"),
            );
            return None;
        }
    }
    let inspect = match &t.inspect {
        None => true,
        Some(v) => {
            if !matches!(
                protocol,
                Protocol::Http | Protocol::Https | Protocol::Kubernetes
            ) {
                cx.err(
                    v.span(),
                    format!("`inspect` of target \"{name}\": only protocols \"http\", \"https\" and \"kubernetes\" use it; remove it"),
                );
                return None;
            }
            if !*v.get_ref() {
                if let Some(c) = &t.credential {
                    cx.err(
                        c.span(),
                        format!("`credential` of target \"{name}\": a target with `inspect = false` is relayed without decrypting, so no credential can be injected; remove one of them"),
                    );
                    return None;
                }
            }
            *v.get_ref()
        }
    };
    let record_bodies = match &t.record_bodies {
        None => false,
        Some(v) => {
            if !matches!(
                protocol,
                Protocol::Http | Protocol::Https | Protocol::Kubernetes
            ) || !inspect
            {
                cx.err(
                    v.span(),
                    format!("`record_bodies` of target \"{name}\": only inspected \"http\", \"https\" and \"kubernetes\" targets have bodies to record; remove it"),
                );
                return None;
            }
            *v.get_ref()
        }
    };
    Some(Target {
        name: name.to_string(),
        inspect,
        record_bodies,
        protocol,
        address,
        credential,
        tls,
        pool: t.pool.as_ref().is_none_or(|p| *p.get_ref()),
        known_hosts: t.known_hosts.as_ref().map(|p| PathBuf::from(p.get_ref())),
        host_key_file: t.host_key_file.as_ref().map(|p| PathBuf::from(p.get_ref())),
        unix_socket,
    })
}

/// `unix_socket = "/var/run/postgresql/.s.PGSQL.5432"` of a target: an absolute path that fits
/// a Unix socket address, on a PostgreSQL target that also names an IP address (the agent
/// serves redirected socket clients upstream over TCP, with the target's credential).
fn target_unix_socket(
    cx: &mut Cx<'_>,
    name: &str,
    protocol: Protocol,
    address: &[TargetAddress],
    v: &S,
) -> Option<PathBuf> {
    let p = PathBuf::from(v.get_ref());
    let msg = if protocol != Protocol::Postgres {
        format!("`unix_socket` of target \"{name}\": only protocol \"postgres\" targets can name a Unix socket; remove it")
    } else if !p.is_absolute() || p.as_os_str().len() >= crate::model::UNIX_PATH_MAX {
        format!("`unix_socket` of target \"{name}\" must be an absolute path shorter than {} bytes, e.g. \"/var/run/postgresql/.s.PGSQL.5432\"", crate::model::UNIX_PATH_MAX)
    } else if !address.iter().any(|a| matches!(a, TargetAddress::Exact(_))) {
        format!("target \"{name}\" names a `unix_socket` but no IP `address` such as \"127.0.0.1:5432\": the agent reaches the server over TCP")
    } else {
        return Some(p);
    };
    cx.err(v.span(), msg);
    None
}

/// `tls = { mode, ca_file, server_name }` of a target.
fn target_tls(cx: &mut Cx<'_>, name: &str, t: &toml::Spanned<RawTargetTls>) -> TargetTls {
    let what = format!(" of `tls` of target \"{name}\"");
    let raw = t.get_ref();
    let modes = TlsMode::ALL.map(|m| (m.as_str(), m));
    let mode = one_of(cx, &raw.mode, "mode", &what, &modes).unwrap_or_default();
    let ca_file = raw
        .ca_file
        .as_ref()
        .and_then(|v| path(cx, v, "ca_file", &what));
    let server_name = raw
        .server_name
        .as_ref()
        .and_then(|v| non_empty(cx, v, "server_name", &what));
    if mode.checks_chain() && ca_file.is_none() {
        cx.err(
            t.span(),
            format!("`mode = \"{}\"`{what} needs `ca_file`: the PEM file of the CA that signs the server's certificate", mode.as_str()),
        );
    }
    if !mode.checks_chain() && ca_file.is_some() {
        cx.err(
            t.span(),
            format!("`ca_file`{what} is only used with `mode = \"verify-ca\"` or `\"verify-full\"`: set one of them or remove it"),
        );
    }
    if mode != TlsMode::VerifyFull && server_name.is_some() {
        cx.err(
            t.span(),
            format!("`server_name`{what} is only used with `mode = \"verify-full\"` (verify-ca does not check names): set that mode or remove it"),
        );
    }
    TargetTls {
        mode,
        ca_file,
        server_name,
    }
}

/// Check each entry of a rule's or mask's `identities`/`targets` list names something defined.
fn references(
    cx: &mut Cx<'_>,
    list: &toml::Spanned<Vec<S>>,
    key: &str,
    kind: &str,
    owner: &str,
    defined: &[&str],
) {
    if list.get_ref().is_empty() {
        cx.err(
            list.span(),
            format!("`{key}` of {owner} is empty: name at least one {kind}, or \"*\" for all"),
        );
    }
    for n in list.get_ref() {
        let v = n.get_ref().as_str();
        if v == "*" || defined.contains(&v) {
            continue;
        }
        let mut msg = format!("{owner} names unknown {kind} \"{v}\"");
        match suggest(v, defined.iter().copied()) {
            Some(s) => msg.push_str(&format!(": did you mean \"{s}\"?")),
            None => msg.push_str(&format!(": define it in a [[{kind}]] table, or use \"*\"")),
        }
        cx.err(n.span(), msg);
    }
}

fn rule(cx: &mut Cx<'_>, r: &RawRule, names: &Names<'_>) -> Option<Rule> {
    let name = r.name.get_ref().as_str();
    let owner = format!("rule \"{name}\"");
    let what = format!(" of rule \"{name}\"");
    let before = cx.errors.len();
    references(
        cx,
        &r.identities,
        "identities",
        "identity",
        &owner,
        names.identities,
    );
    references(cx, &r.targets, "targets", "target", &owner, names.targets);
    let action = one_of(
        cx,
        &r.action,
        "action",
        &what,
        &[
            ("allow", Action::Allow),
            ("deny", Action::Deny),
            ("approve", Action::Approve),
        ],
    );

    // Each matcher must fit every target the rule names.
    let matchers: [(&str, Option<Range<usize>>); 4] = [
        ("sql", r.sql.as_ref().map(|m| m.span())),
        ("ssh", r.ssh.as_ref().map(|m| m.span())),
        ("http", r.http.as_ref().map(|m| m.span())),
        ("kubernetes", r.kubernetes.as_ref().map(|m| m.span())),
    ];
    for (key, span) in matchers {
        let Some(span) = span else { continue };
        for t in r.targets.get_ref() {
            let Some(Some(protocol)) = names.target_protocols.get(t.get_ref().as_str()) else {
                continue;
            };
            if names.opaque_targets.contains(&t.get_ref().as_str()) {
                cx.err(
                    span.clone(),
                    format!(
                        "{owner}: target \"{}\" has `inspect = false` (relayed without decrypting), so it takes no operation matcher: remove `{key}` (its rules decide the whole connection)",
                        t.get_ref()
                    ),
                );
                continue;
            }
            match protocol.matcher_key() {
                Some(k) if k == key => {}
                Some(k) => {
                    let fits = match key {
                        "sql" => "postgres",
                        "ssh" => "ssh",
                        "http" => "http and https",
                        _ => "kubernetes",
                    };
                    cx.err(
                        span.clone(),
                        format!(
                            "{owner}: `{key}` matcher does not fit target \"{}\" (protocol {protocol}); `{key}` applies to {fits} targets: use `{k} = {{ ... }}` or name a {fits} target",
                            t.get_ref()
                        ),
                    );
                }
                None => cx.err(
                    span.clone(),
                    format!(
                        "{owner}: target \"{}\" is tcp, which takes no operation matcher: remove `{key}` (tcp rules decide the whole connection)",
                        t.get_ref()
                    ),
                ),
            }
        }
    }
    let sql = r.sql.as_ref().map(|m| sql(cx, m.get_ref(), &what));
    let ssh = r.ssh.as_ref().map(|m| ssh(cx, m.get_ref(), &what));
    let http = r.http.as_ref().map(|m| http(cx, m.get_ref(), &what));
    let kubernetes = r.kubernetes.as_ref().map(|m| kube(cx, m.get_ref(), &what));

    // Approval settings only make sense on approve rules.
    if let Some(a) = action.filter(|a| *a != Action::Approve) {
        let approval_keys: [(&str, Option<Range<usize>>); 3] = [
            ("approvers", r.approvers.as_ref().map(|v| v.span())),
            ("timeout", r.timeout.as_ref().map(|v| v.span())),
            ("min_approvals", r.min_approvals.as_ref().map(|v| v.span())),
        ];
        for (key, span) in approval_keys {
            if let Some(span) = span {
                cx.err(
                    span,
                    format!(
                        "{owner}: `{key}` only applies to approve rules (action is \"{a}\"): remove it or set action = \"approve\""
                    ),
                );
            }
        }
    }
    let approvers = r.approvers.as_ref().map_or_else(Vec::new, |list| {
        list.get_ref()
            .iter()
            .filter_map(|v| non_empty(cx, v, "approvers", &what))
            .collect()
    });
    let timeout = r
        .timeout
        .as_ref()
        .and_then(|v| duration(cx, v, "timeout", &what, false));
    let min_approvals = r
        .min_approvals
        .as_ref()
        .and_then(|v| match u32::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                cx.err(
                    v.span(),
                    format!(
                        "`min_approvals`{what} must be at least 1, got {}",
                        v.get_ref()
                    ),
                );
                None
            }
        });
    if cx.errors.len() != before {
        return None;
    }
    let targets = strings(r.targets.get_ref());
    let target_ids = if targets.iter().any(|t| t == "*") {
        None
    } else {
        let mut ids: Vec<u32> = targets
            .iter()
            .filter_map(|t| names.target_index.get(t.as_str()).copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        Some(ids.into_boxed_slice())
    };
    let mut claims = BTreeMap::new();
    if let Some(c) = &r.claims {
        for (claim, values) in c.get_ref() {
            if claim.trim().is_empty() || values.is_empty() {
                cx.err(
                    c.span(),
                    format!("`claims`{what}: claim \"{claim}\" needs a non-empty name and at least one accepted value, e.g. claims = {{ groups = [\"deployers\"] }}"),
                );
                continue;
            }
            claims.insert(claim.clone(), strings(values));
        }
    }
    Some(Rule {
        name: name.into(),
        identities: strings(r.identities.get_ref()),
        targets,
        action: action?,
        sql,
        ssh,
        http,
        kubernetes,
        approvers,
        timeout,
        min_approvals,
        claims,
        target_ids,
    })
}

fn sql(cx: &mut Cx<'_>, m: &RawSql, what: &str) -> SqlMatch {
    // Kinds and groups share one namespace (no group is also a kind): an unknown word gets a
    // suggestion from both.
    let known: Vec<&str> = SQL_STATEMENTS
        .iter()
        .copied()
        .chain(SQL_STATEMENT_GROUPS.iter().map(|(g, _)| *g))
        .collect();
    let written = words(cx, &m.statements, "sql.statements", what, &known);
    let mut by_name = !written.is_empty();
    let mut statements: Vec<String> = Vec::with_capacity(written.len());
    for w in written {
        match SQL_STATEMENT_GROUPS.iter().find(|(g, _)| *g == w) {
            Some((_, kinds)) => {
                by_name = false;
                statements.extend(kinds.iter().map(|k| (*k).to_owned()));
            }
            None => {
                by_name &= w != "*";
                statements.push(w);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    statements.retain(|s| seen.insert(s.clone()));
    SqlMatch {
        any_statement: statements.is_empty() || statements.iter().any(|s| s == "*"),
        kinds_by_name: by_name,
        statements,
        tables: strings(&m.tables),
        functions: strings(&m.functions),
        copy_server_files: m.copy_server_files,
        copy_program: m.copy_program,
        dangerous: m.dangerous,
        table_globs: name_globs(cx, &m.tables, "sql.tables", what),
        function_globs: name_globs(cx, &m.functions, "sql.functions", what),
    }
}

fn ssh(cx: &mut Cx<'_>, m: &RawSsh, what: &str) -> SshMatch {
    SshMatch {
        exec: strings(&m.exec),
        shell: m.shell,
        subsystems: strings(&m.subsystems),
        forwarding: m.forwarding,
        exec_patterns: exec_patterns(cx, &m.exec, "ssh.exec", what),
        subsystem_globs: glob_list(cx, &m.subsystems, "ssh.subsystems", what, false),
    }
}

fn http(cx: &mut Cx<'_>, m: &RawHttp, what: &str) -> HttpMatch {
    for method in &m.methods {
        let v = method.get_ref();
        let ok = v == "*"
            || (!v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        if !ok {
            cx.err(
                method.span(),
                format!("bad HTTP method \"{v}\" in `http.methods`{what}: write e.g. \"GET\", or \"*\" for any"),
            );
        }
    }
    HttpMatch {
        methods: strings(&m.methods),
        paths: strings(&m.paths),
        hosts: strings(&m.hosts),
        path_globs: glob_list(cx, &m.paths, "http.paths", what, false),
        host_globs: glob_list(cx, &m.hosts, "http.hosts", what, true),
    }
}

fn kube(cx: &mut Cx<'_>, m: &RawKube, what: &str) -> KubeMatch {
    KubeMatch {
        verbs: words(cx, &m.verbs, "kubernetes.verbs", what, KUBE_VERBS),
        resources: strings(&m.resources),
        namespaces: strings(&m.namespaces),
        names: strings(&m.names),
        exec: strings(&m.exec),
        exec_patterns: exec_patterns(cx, &m.exec, "kubernetes.exec", what),
        resource_globs: glob_list(cx, &m.resources, "kubernetes.resources", what, false),
        namespace_globs: glob_list(cx, &m.namespaces, "kubernetes.namespaces", what, false),
        name_globs: glob_list(cx, &m.names, "kubernetes.names", what, false),
    }
}

fn approvals(cx: &mut Cx<'_>, a: &RawApprovals) -> Option<ApprovalsConfig> {
    let before = cx.errors.len();
    let store = a.store.as_ref().and_then(|s| {
        url(
            cx,
            s,
            "store",
            &["postgres://", "postgresql://"],
            "postgres://tollgate@db.internal/tollgate",
        )
    });
    let store_password = match (&a.store_password_file, &a.store_password_env) {
        (Some(f), Some(e)) => {
            cx.err(
                e.span(),
                "give only one of `store_password_file` and `store_password_env` in [approvals]",
            );
            let _ = f;
            None
        }
        (Some(f), None) => {
            path(cx, f, "store_password_file", " in [approvals]").map(StorePassword::File)
        }
        (None, Some(e)) => env_name(cx, e, " in [approvals]").map(StorePassword::Env),
        (None, None) => None,
    };
    if let (Some(p), None) = (
        a.store_password_file
            .as_ref()
            .or(a.store_password_env.as_ref()),
        &a.store,
    ) {
        cx.err(
            p.span(),
            "a store password is given but [approvals] has no `store`: add store = \"postgres://...\" or remove the key",
        );
    }
    if let (Some(url), Some(_)) = (&store, &store_password) {
        if redact_url_password(url) != *url {
            cx.err(
                a.store.as_ref().map(|s| s.span()).unwrap_or(0..0),
                "`store` already carries a password: remove it from the URL or drop store_password_file/store_password_env",
            );
        }
    }
    let webhook = a.webhook.as_ref().and_then(|s| {
        url(
            cx,
            s,
            "webhook",
            &["https://", "http://"],
            "https://hooks.example/...",
        )
    });
    let oidc = a.oidc.as_ref().and_then(|o| {
        let what = " in [approvals.oidc]";
        let issuer = url(
            cx,
            &o.issuer,
            "issuer",
            &["https://", "http://"],
            "https://idp.example",
        );
        let groups_claim = match &o.groups_claim {
            None => Some("groups".to_string()),
            Some(g) => non_empty(cx, g, "groups_claim", what),
        };
        Some(OidcConfig {
            issuer: issuer?,
            client_id: o
                .client_id
                .as_ref()
                .and_then(|v| non_empty(cx, v, "client_id", what)),
            client_secret_file: o
                .client_secret_file
                .as_ref()
                .and_then(|v| path(cx, v, "client_secret_file", what)),
            audience: o
                .audience
                .as_ref()
                .and_then(|v| non_empty(cx, v, "audience", what)),
            groups_claim: groups_claim?,
        })
    });
    (cx.errors.len() == before).then_some(ApprovalsConfig {
        store,
        store_password,
        webhook,
        oidc,
    })
}

fn mask(cx: &mut Cx<'_>, m: &RawMask, table: Range<usize>, names: &Names<'_>) -> Option<MaskRule> {
    let before = cx.errors.len();
    references(cx, &m.targets, "targets", "target", "mask", names.targets);
    if m.columns.is_empty() && m.detectors.is_empty() {
        cx.err(
            table,
            "mask has neither `columns` nor `detectors`: add one, or remove the [[mask]]",
        );
    }
    let detectors: Vec<String> = m
        .detectors
        .iter()
        .filter_map(|d| {
            let v = d.get_ref().as_str();
            if DETECTORS.contains(&v) {
                return Some(v.to_string());
            }
            let mut msg = format!("unknown detector \"{v}\" in [[mask]]");
            match suggest(v, DETECTORS.iter().copied()) {
                Some(s) => msg.push_str(&format!(": did you mean \"{s}\"?")),
                None => msg.push_str(&format!(" (expected one of: {})", DETECTORS.join(", "))),
            }
            cx.err(d.span(), msg);
            None
        })
        .collect();
    let style = m.style.as_ref().map_or(Some(MaskStyle::Full), |s| {
        one_of(
            cx,
            s,
            "style",
            " in [[mask]]",
            &[
                ("full", MaskStyle::Full),
                ("partial", MaskStyle::Partial),
                ("hash", MaskStyle::Hash),
                ("null", MaskStyle::Null),
            ],
        )
    });
    let column_globs = name_globs(cx, &m.columns, "columns", " in [[mask]]");
    if cx.errors.len() != before {
        return None;
    }
    Some(MaskRule {
        targets: strings(m.targets.get_ref()),
        columns: strings(&m.columns),
        detectors,
        style: style?,
        column_globs,
    })
}

mod case;

#[cfg(test)]
mod tests;
