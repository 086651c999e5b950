//! Request attribution for `http`, `https` and `kubernetes` targets: what a request *is*, as
//! the upstream server will understand it, before [`crate::decide`] is asked about it.
//!
//! Pure and allocation-bounded by the input. Everything ambiguous is an error, and the handler
//! denies it: a path two servers could read two ways (an encoded `/`, a `..` above the root, a
//! `;` parameter, a backslash, a double-encoded `%`) is never given the benefit of the doubt.
//!
//! - [`normalize_path`]: the request target's path, percent-decoded once, `.`/`..`/`//`
//!   resolved, then re-encoded canonically. The handler decides on the decoded form and
//!   forwards the canonical one, so the upstream sees exactly the path that was decided.
//! - [`kube_attributes`]: the Kubernetes API server's own request attributes (verb, API group,
//!   resource, subresource, namespace, name), following `k8s.io/apiserver`'s
//!   `RequestInfoFactory`, or [`KubeRequest::Discovery`] for the read-only discovery documents
//!   kubectl fetches before anything else.

use std::fmt::Write as _;

/// Longest request path attributed (bytes, before decoding); longer is refused.
pub const MAX_PATH: usize = 8 * 1024;

/// Why a request path cannot be attributed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not origin-form (`/...`): `*`, an empty path, or something else.
    #[error("the request path does not start with /")]
    NotAbsolute,
    /// Longer than [`MAX_PATH`].
    #[error("the request path is longer than {MAX_PATH} bytes")]
    TooLong,
    /// `%` not followed by two hex digits.
    #[error("the request path has a malformed percent-escape")]
    BadEscape,
    /// An encoded `/` or `\` (`%2F`, `%5C`): servers disagree on whether it separates segments.
    #[error("the request path has an encoded slash or backslash (%2F, %5C)")]
    EncodedSeparator,
    /// An encoded `%` (`%25`): a server that decodes twice would see another path.
    #[error(
        "the request path has an encoded percent sign (%25), which a server could decode again"
    )]
    DoubleEncoding,
    /// A backslash, a `;` path parameter, a control character or NUL: read differently by
    /// different servers (Windows paths, Java path parameters, C strings).
    #[error("the request path has a character servers read differently (backslash, ';', control character)")]
    AmbiguousChar,
    /// The decoded path is not UTF-8.
    #[error("the request path is not UTF-8 once decoded")]
    NotUtf8,
    /// `..` above the root.
    #[error("the request path climbs above / with ..")]
    AboveRoot,
}

/// A request path, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// Decoded, with `.`, `..` and empty segments resolved: what policy globs see.
    pub decoded: String,
    /// `decoded` percent-encoded canonically: what the upstream is sent.
    pub encoded: String,
}

/// Normalise the path of a request target (`path` without the query; pass `uri.path()`).
///
/// Decodes each `%XX` once, resolves `.` and `..` segments and collapses empty ones (`//`),
/// keeps a trailing `/`, and refuses everything listed in [`PathError`].
pub fn normalize_path(path: &str) -> Result<NormalPath, PathError> {
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let trailing = raw.len() > 1 && raw.ends_with(b"/");
    // One pass: each segment decoded into `seg`, then appended to `decoded` as `/seg` (a
    // decoded segment never holds `/`, so `..` removes back to the last `/`).
    let mut decoded = String::with_capacity(path.len() + 1);
    let mut seg = Vec::with_capacity(64);
    let mut dir_tail = false;
    for part in path.split('/') {
        seg.clear();
        decode_segment(part.as_bytes(), &mut seg)?;
        let s = std::str::from_utf8(&seg).map_err(|_| PathError::NotUtf8)?;
        // `/a/..` and `/a/.` name a directory: the trailing slash they imply is kept.
        dir_tail = matches!(s, "." | "..");
        match s {
            "" | "." => {}
            ".." => match decoded.rfind('/') {
                Some(at) => decoded.truncate(at),
                None => return Err(PathError::AboveRoot),
            },
            _ => {
                decoded.push('/');
                decoded.push_str(s);
            }
        }
    }
    let mut encoded = String::with_capacity(decoded.len() + 8);
    for s in decoded.split('/').skip(1) {
        encoded.push('/');
        encode_segment(s, &mut encoded);
    }
    if decoded.is_empty() || trailing || dir_tail {
        decoded.push('/');
        encoded.push('/');
    }
    Ok(NormalPath { decoded, encoded })
}

/// Decode one path segment onto `out`, refusing what [`PathError`] lists.
fn decode_segment(seg: &[u8], out: &mut Vec<u8>) -> Result<(), PathError> {
    let mut i = 0;
    while i < seg.len() {
        let b = seg[i];
        let b = if b == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                seg.get(i + 1).copied().and_then(hex),
                seg.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            i += 2;
            match (h * 16 + l) as u8 {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                b'%' => return Err(PathError::DoubleEncoding),
                d => d,
            }
        } else {
            b
        };
        if b == b'\\' || b == b';' || b < 0x20 || b == 0x7f {
            return Err(PathError::AmbiguousChar);
        }
        out.push(b);
        i += 1;
    }
    Ok(())
}

/// Percent-encode a decoded segment: RFC 3986 `pchar` stays as is, everything else is escaped.
fn encode_segment(s: &str, out: &mut String) {
    for &b in s.as_bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
            );
        if plain {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Decode a query component the way Go's `url.ParseQuery` does (`+` is a space). `None` when
/// an escape is malformed or the result is not UTF-8.
pub fn decode_query_component(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let h = b.get(i + 1).copied().and_then(hex)?;
                let l = b.get(i + 2).copied().and_then(hex)?;
                out.push((h * 16 + l) as u8);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Every value of query parameter `key`, decoded, in order. `None` when any parameter of the
/// query is malformed (the API server would reject or misread it: deny).
pub fn query_values(query: Option<&str>, key: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        // Go refuses `;` in queries since 1.17.
        if pair.contains(';') {
            return None;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode_query_component(k)?;
        let v = decode_query_component(v)?;
        if k == key {
            out.push(v);
        }
    }
    Some(out)
}

/// The API server's attributes of one resource request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubeAttrs {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`, or
    /// `proxy` (the deprecated `/proxy/` prefix).
    pub verb: String,
    /// API group, `""` for the core group (`/api/v1`).
    pub group: String,
    /// API version (`v1`).
    pub version: String,
    /// Resource (`pods`).
    pub resource: String,
    /// Subresource (`exec`, `log`, `status`), `""` if none.
    pub subresource: String,
    /// Namespace, `""` for cluster-scoped requests.
    pub namespace: String,
    /// Object name, `""` for collections.
    pub name: String,
}

impl KubeAttrs {
    /// `resource` or `resource/subresource`, as `kubernetes.resources` globs see it.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// What a request to a Kubernetes API server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeRequest {
    /// A resource request, decided by `kubernetes` rules.
    Resource(KubeAttrs),
    /// A read of an API discovery document (`/api`, `/apis/apps/v1`, `/version`,
    /// `/openapi/v2`, ...): schema, no objects; every client needs them first, and the API
    /// server grants them to every authenticated user (`system:discovery`).
    Discovery,
}

/// Why a Kubernetes request cannot be attributed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    /// The path itself is refused.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A non-resource URL that is not a discovery document read.
    #[error("{0} is not an API resource path or a discovery document")]
    NonResource(String),
    /// A method the API server maps to no verb.
    #[error("method {0} has no Kubernetes verb")]
    Method(String),
    /// A `/watch/` or `/proxy/` prefix with nothing after it, or a malformed query.
    #[error("the request cannot be attributed: {0}")]
    Malformed(&'static str),
}

/// Attribute a request to a Kubernetes API server, as its `RequestInfoFactory` would.
/// `path` is the normalised (decoded) path, `query` the raw query string.
pub fn kube_attributes(
    method: &str,
    path: &str,
    query: Option<&str>,
) -> Result<KubeRequest, KubeError> {
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let read = matches!(method, "GET" | "HEAD");
    let discovery = || {
        if read {
            Ok(KubeRequest::Discovery)
        } else {
            Err(KubeError::NonResource(path.to_string()))
        }
    };
    match parts.as_slice() {
        // /api, /api/v1, /apis, /apis/apps, /apis/apps/v1
        ["api"] | ["api", _] | ["apis"] | ["apis", _] | ["apis", _, _] => return discovery(),
        ["version"] | ["openapi", "v2"] | ["openapi", "v3"] | ["openapi", "v3", ..] => {
            return discovery()
        }
        ["api", ..] | ["apis", ..] => {}
        _ => return Err(KubeError::NonResource(path.to_string())),
    }
    let mut a = KubeAttrs::default();
    let mut rest: &[&str] = &parts[1..];
    if parts[0] == "apis" {
        a.group = rest[0].to_string();
        rest = &rest[1..];
    }
    a.version = rest[0].to_string();
    rest = &rest[1..];
    if matches!(rest[0], "watch" | "proxy") {
        if rest.len() < 2 {
            return Err(KubeError::Malformed(
                "unable to determine kind and namespace from the url",
            ));
        }
        a.verb = rest[0].to_string();
        rest = &rest[1..];
    } else {
        a.verb = match method {
            "POST" => "create",
            "GET" | "HEAD" => "get",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            other => return Err(KubeError::Method(other.to_string())),
        }
        .to_string();
    }
    if rest[0] == "namespaces" && rest.len() > 1 {
        a.namespace = rest[1].to_string();
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }
    if rest.len() >= 3 && a.verb != "proxy" {
        a.subresource = rest[2].to_string();
    }
    if rest.len() >= 2 {
        a.name = rest[1].to_string();
    }
    a.resource = rest[0].to_string();
    if a.name.is_empty() && a.verb == "get" {
        let watch = query_values(query, "watch").ok_or(KubeError::Malformed("bad query"))?;
        // The API server reads the first value; anything but false/0 (and empty) is a watch.
        a.verb = match watch.first().map(|v| v.to_ascii_lowercase()) {
            Some(v) if !matches!(v.as_str(), "false" | "0" | "") => "watch",
            _ => "list",
        }
        .to_string();
        // `fieldSelector=metadata.name=x` narrows a list or watch to one name.
        let fs = query_values(query, "fieldSelector").ok_or(KubeError::Malformed("bad query"))?;
        if let Some(name) = fs.first().and_then(|f| exact_name(f)) {
            a.name = name;
        }
    }
    if a.name.is_empty() && a.verb == "delete" {
        a.verb = "deletecollection".to_string();
    }
    Ok(KubeRequest::Resource(a))
}

/// What a request's `Impersonate-*` headers ask the API server to check, as it does
/// (`filters/impersonation.go`): each is a request of verb `impersonate` on `users`,
/// `serviceaccounts` (for `system:serviceaccount:<namespace>:<name>`), `groups`, `uids` or
/// `userextras/<key>`, named by the header's value. `headers` yields each header's name
/// (lowercase) and value. A header under `impersonate-` the API server does not know, a value
/// that is not text, or a group, uid or extra without a user is an error: such a request
/// cannot be attributed.
pub fn kube_impersonation<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<KubeAttrs>, KubeError> {
    let mut out = Vec::new();
    let mut user = false;
    for (name, value) in headers {
        let Some(what) = name.strip_prefix("impersonate-") else {
            continue;
        };
        let value = std::str::from_utf8(value)
            .map_err(|_| KubeError::Malformed("an Impersonate header is not text"))?;
        let mut a = KubeAttrs {
            verb: "impersonate".into(),
            name: value.to_string(),
            ..KubeAttrs::default()
        };
        match what {
            "user" => {
                user = true;
                match value
                    .strip_prefix("system:serviceaccount:")
                    .and_then(|r| r.split_once(':'))
                {
                    Some((ns, sa)) => {
                        a.resource = "serviceaccounts".into();
                        a.namespace = ns.to_string();
                        a.name = sa.to_string();
                    }
                    None => a.resource = "users".into(),
                }
            }
            "group" => a.resource = "groups".into(),
            "uid" => {
                a.group = "authentication.k8s.io".into();
                a.resource = "uids".into();
            }
            _ => match what.strip_prefix("extra-") {
                Some(key) if !key.is_empty() => {
                    a.group = "authentication.k8s.io".into();
                    a.resource = "userextras".into();
                    a.subresource = decode_query_component(key)
                        .filter(|k| !k.is_empty())
                        .ok_or(KubeError::Malformed("a malformed Impersonate-Extra header"))?
                        .to_ascii_lowercase();
                }
                _ => {
                    return Err(KubeError::Malformed(
                        "an Impersonate header the API server does not know",
                    ))
                }
            },
        }
        out.push(a);
    }
    if !out.is_empty() && !user {
        return Err(KubeError::Malformed(
            "Impersonate-Group, -Uid or -Extra without Impersonate-User",
        ));
    }
    // In a fixed order (user, groups, extras, uid), whatever order the headers came in (Go's
    // HTTP/2 client sends them in map order), so the audit text is stable.
    out.sort_by_key(|a| match a.resource.as_str() {
        "users" | "serviceaccounts" => 0,
        "groups" => 1,
        "userextras" => 2,
        _ => 3,
    });
    Ok(out)
}

/// `metadata.name=x` (or `==`) as the only requirement of a field selector, with a valid name.
fn exact_name(selector: &str) -> Option<String> {
    if selector.contains(',') {
        return None;
    }
    let v = selector
        .strip_prefix("metadata.name==")
        .or_else(|| selector.strip_prefix("metadata.name="))?;
    let valid = !v.is_empty()
        && v != "."
        && v != ".."
        && !v.contains(['/', '%', '!', '=', '\\', ','])
        && !v.chars().any(char::is_whitespace);
    valid.then(|| v.to_string())
}

#[cfg(test)]
mod tests;
