//! Startup parameters are policy: a client's StartupMessage can set any server setting (as a
//! parameter of its own, or inside `options` as `-c name=value`), including ones `SET` is
//! denied for and ones that load code into the backend (`session_preload_libraries`).
//!
//! [`settings`] turns the client's parameters into the settings they ask for. A short list of
//! client-facing settings ([`SAFE`]) passes as it is; every other setting is decided like a
//! `SET` of it by the caller, and some are never allowed ([`NEVER`]). `options` is parsed as
//! PostgreSQL parses it (`pg_split_opts`: words split on whitespace, a backslash keeps the next
//! character) and only `-c name=value`, `-cname=value` and `--name=value` are accepted: the
//! backend's other switches (`-e`, `-B`, `-o`, ...) are refused. Accepted settings are sent
//! upstream as parameters of their own, never inside `options`.

/// Settings a client may choose at startup without a rule: how the session's text is encoded
/// and shown to it, what it is called, and its own timeouts. `client_encoding` is checked
/// afterwards by the handler (the login's ParameterStatus): only UTF8 can be classified.
pub const SAFE: &[&str] = &[
    "application_name",
    "bytea_output",
    "client_encoding",
    "datestyle",
    "extra_float_digits",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "intervalstyle",
    "lock_timeout",
    "statement_timeout",
    "timezone",
];

/// Settings no rule can allow at startup, with why: they load a library into the backend (the
/// bot's own code, with a credential that permits it), or choose where libraries come from.
pub const NEVER: &[&str] = &[
    "dynamic_library_path",
    "jit_provider",
    "local_preload_libraries",
    "session_preload_libraries",
    "shared_preload_libraries",
];

/// Startup keys that are not settings: who logs in where, and the protocol's own.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// Why the startup parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    /// A switch in `options` other than `-c`/`--name=value`.
    #[error(
        "startup option {0:?} is not allowed through tollgate (only -c name=value settings are)"
    )]
    Switch(String),
    /// `-c` without `name=value`.
    #[error("startup option {0:?} is not a name=value setting")]
    Malformed(String),
}

/// One setting a client asked for at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Lowercased name (`-` read as `_`, as PostgreSQL does for long options).
    pub name: String,
    pub value: String,
    /// Given inside `options` (else as a parameter of its own).
    pub from_options: bool,
}

impl Setting {
    /// In [`SAFE`].
    pub fn is_safe(&self) -> bool {
        SAFE.contains(&self.name.as_str())
    }

    /// In [`NEVER`].
    pub fn is_never(&self) -> bool {
        NEVER.contains(&self.name.as_str())
    }
}

/// `options` split as PostgreSQL's `pg_split_opts` does.
fn split_options(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c.is_ascii_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
            continue;
        }
        in_word = true;
        if c == '\\' {
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else {
            cur.push(c);
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

fn name_value(word: &str, from_options: bool) -> Result<Setting, StartupError> {
    match word.split_once('=') {
        Some((n, v)) if !n.is_empty() => Ok(Setting {
            name: n.replace('-', "_").to_lowercase(),
            value: v.to_string(),
            from_options,
        }),
        _ => Err(StartupError::Malformed(word.to_string())),
    }
}

/// The settings `params` (the StartupMessage's key/value pairs) ask for, in order.
pub fn settings(params: &[(String, String)]) -> Result<Vec<Setting>, StartupError> {
    let mut out = Vec::new();
    for (k, v) in params {
        if k == "options" {
            let words = split_options(v);
            let mut it = words.iter();
            while let Some(w) = it.next() {
                if let Some(long) = w.strip_prefix("--") {
                    out.push(name_value(long, true)?);
                } else if w == "-c" {
                    let next = it
                        .next()
                        .ok_or_else(|| StartupError::Malformed(w.clone()))?;
                    out.push(name_value(next, true)?);
                } else if let Some(rest) = w.strip_prefix("-c") {
                    out.push(name_value(rest, true)?);
                } else {
                    return Err(StartupError::Switch(w.clone()));
                }
            }
        } else if NOT_SETTINGS.contains(&k.as_str()) || k.starts_with("_pq_.") {
            continue;
        } else {
            out.push(Setting {
                name: k.to_lowercase(),
                value: v.clone(),
                from_options: false,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names(s: &[Setting]) -> Vec<(&str, &str)> {
        s.iter()
            .map(|s| (s.name.as_str(), s.value.as_str()))
            .collect()
    }

    #[test]
    fn options_are_read_as_postgres_splits_them() {
        let s = settings(&p(&[
            ("user", "bot"),
            ("database", "app"),
            ("application_name", "psql"),
            (
                "options",
                "-c log_statement=none  -csession_replication_role=replica --search-path=evil\\ x",
            ),
            ("DateStyle", "ISO"),
        ]))
        .expect("settings");
        assert_eq!(
            names(&s),
            [
                ("application_name", "psql"),
                ("log_statement", "none"),
                ("session_replication_role", "replica"),
                ("search_path", "evil x"),
                ("datestyle", "ISO"),
            ]
        );
        assert!(s[0].is_safe() && !s[1].is_safe() && s[4].is_safe());
        assert!(s[1].from_options && !s[0].from_options);
        let s = settings(&p(&[(
            "options",
            "-c session_preload_libraries=/tmp/x/evil.so",
        )]))
        .expect("settings");
        assert!(s[0].is_never() && !s[0].is_safe());
    }

    #[test]
    fn other_backend_switches_and_malformed_settings_are_refused() {
        for o in [
            "-e", "-B 100", "-o -d5", "-c", "-c name", "-c =x", "-d 5", "-W 30",
        ] {
            assert!(
                settings(&p(&[("options", o)])).is_err(),
                "{o} should be refused"
            );
        }
        assert!(settings(&p(&[("options", "   ")]))
            .expect("blank")
            .is_empty());
    }
}
