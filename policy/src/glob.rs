//! Precompiled glob matchers, built once at parse time so `decide` never compiles or allocates.
//!
//! Every glob treats `*` as matching `/` too (globset's `literal_separator(false)`), so
//! `/system.slice/ci.service*` matches `/system.slice/ci.service/sub` and `/api/*` matches
//! `/api/v1/x`. Each pattern is validated by globset; the common shapes (`*`, `lit`, `lit*`,
//! `*lit`, `*lit*`) then match with plain string comparisons, because a globset call costs
//! about a microsecond and a rule list is scanned once per operation. Anything else keeps the
//! globset matcher. Case-insensitive fast paths fold ASCII only, like PostgreSQL's folding of
//! unquoted identifiers; a non-ASCII case-insensitive pattern keeps globset's Unicode folding.

use globset::{GlobBuilder, GlobMatcher};

/// One compiled glob.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    kind: Kind,
    /// ASCII case-insensitive (fast kinds only; `Kind::Glob` carries its own setting).
    ci: bool,
    /// The pattern contains a `.` (used by [`NameGlobs`]).
    dotted: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Contains(Box<str>),
    /// Boxed: a `GlobMatcher` is large and rare, and `Pattern`s are scanned in arrays.
    Glob(Box<GlobMatcher>),
}

/// Compile one glob; the error is globset's description of what is wrong.
pub(crate) fn compile(pattern: &str, case_insensitive: bool) -> Result<Pattern, String> {
    let glob = GlobBuilder::new(pattern)
        .literal_separator(false)
        .case_insensitive(case_insensitive)
        .backslash_escape(true)
        .build()
        .map_err(|e| e.kind().to_string())?;
    let dotted = pattern.contains('.');
    let fast = |kind| Pattern {
        kind,
        ci: case_insensitive,
        dotted,
    };
    let is_meta = |c: char| matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\');
    if case_insensitive && !pattern.is_ascii() {
        return Ok(fast(Kind::Glob(Box::new(glob.compile_matcher()))));
    }
    let lead = pattern.starts_with('*');
    let trail = pattern.len() > 1 && pattern.ends_with('*');
    let core = &pattern[usize::from(lead)..pattern.len() - usize::from(trail)];
    if core.contains(is_meta) {
        return Ok(fast(Kind::Glob(Box::new(glob.compile_matcher()))));
    }
    let core: Box<str> = core.into();
    Ok(fast(match (lead, trail) {
        (true, _) if core.is_empty() => Kind::Any,
        (false, false) => Kind::Exact(core),
        (false, true) => Kind::Prefix(core),
        (true, false) => Kind::Suffix(core),
        (true, true) => Kind::Contains(core),
    }))
}

fn eq(a: &[u8], b: &[u8], ci: bool) -> bool {
    if ci {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

impl Pattern {
    pub(crate) fn is_match(&self, s: &str) -> bool {
        let (s, ci) = (s.as_bytes(), self.ci);
        match &self.kind {
            Kind::Any => true,
            Kind::Exact(p) => eq(s, p.as_bytes(), ci),
            Kind::Prefix(p) => s.len() >= p.len() && eq(&s[..p.len()], p.as_bytes(), ci),
            Kind::Suffix(p) => s.len() >= p.len() && eq(&s[s.len() - p.len()..], p.as_bytes(), ci),
            Kind::Contains(p) => {
                p.is_empty() || s.windows(p.len()).any(|w| eq(w, p.as_bytes(), ci))
            }
            Kind::Glob(g) => std::str::from_utf8(s).is_ok_and(|s| g.is_match(s)),
        }
    }
}

/// A list of globs where an empty list means "anything".
#[derive(Debug, Clone, Default)]
pub(crate) struct GlobList(Box<[Pattern]>);

impl GlobList {
    pub(crate) fn new(patterns: Vec<Pattern>) -> Self {
        GlobList(patterns.into_boxed_slice())
    }

    /// No globs were given.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Some glob matches `s` (false for an empty list).
    pub(crate) fn any_glob_matches(&self, s: &str) -> bool {
        self.0.iter().any(|p| p.is_match(s))
    }

    /// The list is empty or some glob matches `s`.
    pub(crate) fn allows(&self, s: &str) -> bool {
        self.is_empty() || self.any_glob_matches(s)
    }
}

/// Globs over dotted names (`schema.table`, `table.column`), case-insensitive. A glob without a
/// `.` is matched against the last component only, so `users` matches `public.users`.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameGlobs(Box<[Pattern]>);

impl NameGlobs {
    pub(crate) fn new(patterns: Vec<Pattern>) -> Self {
        NameGlobs(patterns.into_boxed_slice())
    }

    /// No globs were given.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Some glob matches `name`.
    pub(crate) fn matches(&self, name: &str) -> bool {
        // A byte scan: names are short, and this runs once per name per rule.
        let last = match name.as_bytes().iter().rposition(|&b| b == b'.') {
            Some(dot) => name.get(dot + 1..).unwrap_or(name),
            None => name,
        };
        self.0
            .iter()
            .any(|p| p.is_match(if p.dotted { name } else { last }))
    }

    /// Whether `names` pass: empty globs pass anything; with `all`, every name must match (no
    /// names passes); otherwise some name must match (no names fails).
    pub(crate) fn check(&self, names: &[String], all: bool) -> bool {
        if self.is_empty() {
            true
        } else if all {
            names.iter().all(|n| self.matches(n))
        } else {
            names.iter().any(|n| self.matches(n))
        }
    }

    /// Column selection for masks: dotted globs see `table.column` (and `bare_table.column` when
    /// the table is schema-qualified), other globs see the column name.
    pub(crate) fn matches_column(&self, table: &str, column: &str) -> bool {
        let full = format!("{table}.{column}");
        let short = table
            .rsplit_once('.')
            .map(|(_, bare)| format!("{bare}.{column}"));
        self.0.iter().any(|p| {
            if p.dotted {
                p.is_match(&full) || short.as_deref().is_some_and(|s| p.is_match(s))
            } else {
                p.is_match(column)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast paths must agree with globset on every pattern shape they take over.
    #[test]
    fn fast_paths_agree_with_globset() {
        let patterns = [
            "*",
            "users",
            "user*",
            "*users",
            "*ser*",
            "a.b",
            "public.*",
            "*.email",
            "**",
            "x",
            "/api/*",
            "/system.slice/ci.service*",
            "systemctl status *",
            "u?ers",
            "[ab]c",
            "{a,b}*",
            "a\\*b",
            "**/x",
            "*a*b*",
        ];
        let inputs = [
            "",
            "users",
            "USERS",
            "user",
            "users2",
            "myusers",
            "a.b",
            "A.B",
            "public.users",
            "x.email",
            "email",
            "/api/v1/x",
            "/API/v1",
            "/system.slice/ci.service/sub",
            "x",
            "systemctl status nginx",
            "ac",
            "bc",
            "a*b",
            "ab",
            "y/x",
            "aXbY",
            "é",
            "ÉE",
        ];
        for ci in [false, true] {
            for p in patterns {
                let fast = compile(p, ci).expect(p);
                let slow = GlobBuilder::new(p)
                    .literal_separator(false)
                    .case_insensitive(ci)
                    .backslash_escape(true)
                    .build()
                    .expect(p)
                    .compile_matcher();
                for s in inputs {
                    assert_eq!(
                        fast.is_match(s),
                        slow.is_match(s),
                        "pattern {p:?} ci={ci} on {s:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn fast_kinds_are_chosen() {
        let kind = |p: &str| match compile(p, true).expect(p).kind {
            Kind::Any => "any",
            Kind::Exact(_) => "exact",
            Kind::Prefix(_) => "prefix",
            Kind::Suffix(_) => "suffix",
            Kind::Contains(_) => "contains",
            Kind::Glob(_) => "glob",
        };
        assert_eq!(kind("*"), "any");
        assert_eq!(kind("users"), "exact");
        assert_eq!(kind("users*"), "prefix");
        assert_eq!(kind("*.email"), "suffix");
        assert_eq!(kind("*x*"), "contains");
        assert_eq!(kind("a?"), "glob");
        assert_eq!(kind("é*"), "glob");
    }

    #[test]
    fn bare_globs_see_the_last_component() {
        let g = NameGlobs::new(vec![
            compile("users", true).expect("g"),
            compile("audit.*", true).expect("g"),
        ]);
        assert!(g.matches("public.users"));
        assert!(g.matches("Users"));
        assert!(g.matches("audit.log"));
        assert!(!g.matches("log"));
        assert!(!g.matches("public.usersx"));
        let cols = NameGlobs::new(vec![
            compile("*.email", true).expect("g"),
            compile("customers.card", true).expect("g"),
            compile("ssn", true).expect("g"),
        ]);
        assert!(cols.matches_column("people", "email"));
        assert!(cols.matches_column("public.customers", "CARD"));
        assert!(cols.matches_column("x", "ssn"));
        assert!(!cols.matches_column("orders", "card"));
    }
}
