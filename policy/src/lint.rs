//! Warnings: what parses and validates but is probably not what was meant (`tollgate
//! check-policy` prints them as `file:line:col: warning: ...` and still exits 0).
//!
//! Pure like the rest of the crate: whether a secret file exists is for the caller to check;
//! [`secret_files`] only says where the file names are.

use std::net::IpAddr;

use toml::Spanned;

use crate::{error::PolicyError, raw, Policy, TargetAddress};

/// A secret file named by the policy, with the position of its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFileRef {
    /// The key: `password_file`, `key_file` or `token_file`.
    pub key: &'static str,
    /// `[credential.NAME]`.
    pub credential: String,
    /// The path as written.
    pub path: String,
    /// `file:line:col` of the value, with an empty message.
    pub at: PolicyError,
}

impl SecretFileRef {
    /// A warning at this reference.
    pub fn warning(&self, message: String) -> PolicyError {
        PolicyError {
            message,
            ..self.at.clone()
        }
    }
}

fn raw_tree(text: &str) -> Option<raw::RawPolicy> {
    toml::from_str(text).ok()
}

/// Every `password_file`, `key_file` and `token_file` of `[credential.*]`, in file order.
/// Empty if the file does not parse.
pub fn secret_files(text: &str, file_name: &str) -> Vec<SecretFileRef> {
    let Some(raw) = raw_tree(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, c) in &raw.credential {
        let c = c.get_ref();
        for (key, v) in [
            ("password_file", &c.password_file),
            ("key_file", &c.key_file),
            ("token_file", &c.token_file),
        ] {
            if let Some(v) = v {
                out.push(SecretFileRef {
                    key,
                    credential: name.clone(),
                    path: v.get_ref().clone(),
                    at: PolicyError::at(file_name, text, v.span().start, String::new()),
                });
            }
        }
    }
    out.sort_by_key(|r| (r.at.line, r.at.col));
    out
}

/// Warnings for a policy that parses (`policy` is its parsed form): cgroup globs without a
/// leading `/`, mask columns with more than two dots, and targets whose addresses overlap.
/// Sorted by position.
pub fn warnings(text: &str, file_name: &str, policy: &Policy) -> Vec<PolicyError> {
    let Some(raw) = raw_tree(text) else {
        return Vec::new();
    };
    let at = |span: std::ops::Range<usize>, message: String| {
        PolicyError::at(file_name, text, span.start, format!("warning: {message}"))
    };
    let mut out = Vec::new();
    cgroup_globs(&raw, &mut |s, m| out.push(at(s, m)));
    mask_columns(&raw, &mut |s, m| out.push(at(s, m)));
    overlapping_targets(&raw, policy, &mut |s, m| out.push(at(s, m)));
    unnamed_credential_targets(&raw, policy, &mut |s, m| out.push(at(s, m)));
    out.sort_by_key(|e| (e.line, e.col));
    out
}

type Sink<'a> = dyn FnMut(std::ops::Range<usize>, String) + 'a;

/// cgroup paths always start with `/`: a glob that starts with anything but `/` or a
/// wildcard never matches.
fn cgroup_globs(raw: &raw::RawPolicy, out: &mut Sink<'_>) {
    for i in &raw.identity {
        let i = i.get_ref();
        if let Some(g) = &i.cgroup {
            let v = g.get_ref();
            if !v.starts_with(['/', '*', '?', '[']) {
                out(
                    g.span(),
                    format!(
                        "cgroup \"{v}\" of identity \"{}\" does not start with `/`: cgroup paths always do, so it never matches; write \"/{v}\"",
                        i.name.get_ref()
                    ),
                );
            }
        }
    }
}

/// A column is `column`, `table.column` or `schema.table.column`: more dots never match.
fn mask_columns(raw: &raw::RawPolicy, out: &mut Sink<'_>) {
    for m in &raw.mask {
        for c in &m.get_ref().columns {
            let dots = c.get_ref().matches('.').count();
            if dots > 2 {
                out(
                    c.span(),
                    format!(
                        "mask column \"{}\" has {dots} dots: a column is `table.column` or `schema.table.column` (a database name is not part of it), so it never matches",
                        c.get_ref()
                    ),
                );
            }
        }
    }
}

/// Whether two target addresses protect a common (address, port). Loopback and unspecified
/// addresses are one (the agent aliases them all), as are an address and a CIDR holding it.
fn overlap(a: &TargetAddress, b: &TargetAddress) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let local = |ip: &IpAddr| ip.is_loopback() || ip.is_unspecified();
    match (a, b) {
        (TargetAddress::Exact(x), TargetAddress::Exact(y)) => {
            x.ip() == y.ip() || (local(&x.ip()) && local(&y.ip()))
        }
        (TargetAddress::Exact(x), TargetAddress::Cidr(n, _))
        | (TargetAddress::Cidr(n, _), TargetAddress::Exact(x)) => n.contains(&x.ip()),
        (TargetAddress::Cidr(n, _), TargetAddress::Cidr(m, _)) => {
            n.contains(&m.network()) || m.contains(&n.network())
        }
        (TargetAddress::Host(h, _), TargetAddress::Host(k, _)) => h.eq_ignore_ascii_case(k),
        // A host name's addresses are known only when the agent resolves it.
        _ => false,
    }
}

/// An HTTP-family target that sends an `Authorization` credential but has no name (no host
/// name in `address`, no `tls.server_name`): the agent cannot tell its own requests from
/// those naming another virtual host behind the same address, so the credential goes with
/// any `Host`.
fn unnamed_credential_targets(raw: &raw::RawPolicy, policy: &Policy, out: &mut Sink<'_>) {
    for rt in &raw.target {
        let rt = rt.get_ref();
        let Some(t) = policy.target(rt.name.get_ref()) else {
            continue;
        };
        let http = matches!(
            t.protocol,
            crate::Protocol::Http | crate::Protocol::Https | crate::Protocol::Kubernetes
        );
        let header_credential = t
            .credential
            .as_ref()
            .and_then(|c| policy.credentials.get(c))
            .is_some_and(|c| c.cert_file.is_none());
        let named = t.tls.server_name.is_some()
            || t.address
                .iter()
                .any(|a| matches!(a, TargetAddress::Host(..)));
        if http && t.inspect && header_credential && !named {
            out(
                rt.name.span(),
                format!(
                    "target \"{}\" sends its credential but has no name (no host name in `address`, no `tls.server_name`): the agent sends it with any Host the bot asks for, including another virtual host behind the same address; name the target",
                    t.name
                ),
            );
        }
    }
}

fn overlapping_targets(raw: &raw::RawPolicy, policy: &Policy, out: &mut Sink<'_>) {
    // (target name, address, its span), in file order.
    let mut seen: Vec<(&str, &TargetAddress, &Spanned<String>)> = Vec::new();
    for rt in &raw.target {
        let rt = rt.get_ref();
        let Some(t) = policy.target(rt.name.get_ref()) else {
            continue;
        };
        let spans = rt.address.get_ref();
        if spans.len() != t.address.len() {
            continue;
        }
        for (a, s) in t.address.iter().zip(spans) {
            if let Some((other, _, _)) = seen
                .iter()
                .find(|(n, b, _)| *n != t.name.as_str() && overlap(a, b))
            {
                out(
                    s.span(),
                    format!(
                        "address \"{}\" of target \"{}\" overlaps an address of target \"{other}\": a connection there goes to one of them only (exact beats host beats CIDR, then file order), so the other's rules never see it",
                        s.get_ref(),
                        t.name
                    ),
                );
            }
        }
        for (a, s) in t.address.iter().zip(spans) {
            seen.push((t.name.as_str(), a, s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warn(text: &str) -> Vec<String> {
        let p = crate::parse(text, "p.toml").expect("valid");
        warnings(text, "p.toml", &p)
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn a_cgroup_glob_without_a_leading_slash_is_warned_at_its_value() {
        let w = warn(
            "[[identity]]\nname = \"a\"\ncgroup = \"system.slice/ci.service\"\n\n[[identity]]\nname = \"b\"\ncgroup = \"*ci*\"\n\n[[identity]]\nname = \"c\"\ncgroup = \"/ok\"\n",
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("p.toml:3:10: warning: cgroup \"system.slice/ci.service\" of identity \"a\" does not start with `/`"),
            "{w:?}"
        );
    }

    #[test]
    fn a_mask_column_with_more_than_two_dots_is_warned() {
        let w = warn(
            "[[mask]]\ntargets = [\"*\"]\ncolumns = [\"public.users.email\", \"db.public.users.email\"]\n",
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "p.toml:3:34: warning: mask column \"db.public.users.email\" has 3 dots"
            ),
            "{w:?}"
        );
    }

    #[test]
    fn overlapping_target_addresses_are_warned_once_at_the_later_one() {
        let t = |name: &str, addrs: &str| {
            format!("[[target]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddress = [{addrs}]\n\n")
        };
        let text = [
            t("a", "\"10.0.0.5:5432\", \"127.0.0.1:6379\""),
            t("b", "\"10.0.0.0/24:5432\""),
            t("c", "\"10.0.0.5:5433\", \"[::1]:6379\""),
            t("d", "\"db.internal:5432\", \"10.0.1.0/24:5432\""),
        ]
        .concat();
        let w = warn(&text);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("p.toml:9:12: warning: address \"10.0.0.0/24:5432\" of target \"b\" overlaps an address of target \"a\""),
            "{w:?}"
        );
        assert!(
            w[1].contains(
                "address \"[::1]:6379\" of target \"c\" overlaps an address of target \"a\""
            ),
            "{w:?}"
        );
    }

    #[test]
    fn a_credential_target_without_a_name_is_warned() {
        let t = |name: &str, addr: &str| {
            format!("[[target]]\nname = \"{name}\"\nprotocol = \"https\"\naddress = [\"{addr}\"]\ncredential = \"c\"\n\n")
        };
        let text = [
            "[credential.c]\nenv = \"TOKEN\"\n\n".to_string(),
            t("bare", "10.0.0.1:443"),
            t("named", "api.internal:443"),
        ]
        .concat();
        let w = warn(&text);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("target \"bare\" sends its credential but has no name"),
            "{w:?}"
        );
    }

    #[test]
    fn secret_files_are_listed_with_their_positions() {
        let text = "[credential.a]\nuser = \"u\"\npassword_file = \"/nope\"\n\n[credential.b]\nuser = \"u\"\nenv = \"X\"\n";
        let r = secret_files(text, "p.toml");
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].key, r[0].path.as_str()), ("password_file", "/nope"));
        assert_eq!(
            r[0].warning("warning: x".into()).to_string(),
            "p.toml:3:17: warning: x"
        );
    }
}
