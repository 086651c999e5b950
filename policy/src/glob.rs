//! Precompiled glob matchers, built once at parse time so `decide` never compiles or allocates.
//!
//! Every glob here treats `*` as matching `/` too (globset's `literal_separator(false)`), so
//! `/system.slice/ci.service*` matches `/system.slice/ci.service/sub` and `/api/*` matches
//! `/api/v1/x`.

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

/// Compile one glob; the error is globset's description of what is wrong.
pub(crate) fn glob(pattern: &str, case_insensitive: bool) -> Result<Glob, String> {
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .case_insensitive(case_insensitive)
        .backslash_escape(true)
        .build()
        .map_err(|e| e.kind().to_string())
}

/// One compiled glob.
#[derive(Debug, Clone)]
pub(crate) struct Glob1(GlobMatcher);

impl Glob1 {
    pub(crate) fn new(g: &Glob) -> Self {
        Glob1(g.compile_matcher())
    }

    pub(crate) fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

/// A list of globs where an empty list means "anything".
#[derive(Debug, Clone, Default)]
pub(crate) struct GlobList(Option<GlobSet>);

impl GlobList {
    pub(crate) fn new(globs: Vec<Glob>) -> Result<Self, String> {
        if globs.is_empty() {
            return Ok(GlobList(None));
        }
        let mut b = GlobSetBuilder::new();
        for g in globs {
            b.add(g);
        }
        b.build()
            .map(|s| GlobList(Some(s)))
            .map_err(|e| e.to_string())
    }

    /// No globs were given.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Some glob matches `s` (false for an empty list).
    pub(crate) fn any_glob_matches(&self, s: &str) -> bool {
        self.0.as_ref().is_some_and(|set| set.is_match(s))
    }

    /// The list is empty or some glob matches `s`.
    pub(crate) fn allows(&self, s: &str) -> bool {
        match &self.0 {
            None => true,
            Some(set) => set.is_match(s),
        }
    }
}

/// Globs over dotted names (`schema.table`, `table.column`), case-insensitive. A glob without a
/// `.` is matched against the last component only, so `users` matches `public.users`.
#[derive(Debug, Clone, Default)]
pub(crate) struct NameGlobs {
    /// Globs containing a `.`, matched against the whole name.
    qualified: Option<GlobSet>,
    /// Globs without a `.`, matched against the last component.
    bare: Option<GlobSet>,
}

impl NameGlobs {
    pub(crate) fn new(globs: Vec<Glob>) -> Result<Self, String> {
        let mut q = GlobSetBuilder::new();
        let mut b = GlobSetBuilder::new();
        let (mut nq, mut nb) = (0, 0);
        for g in globs {
            if g.glob().contains('.') {
                q.add(g);
                nq += 1;
            } else {
                b.add(g);
                nb += 1;
            }
        }
        let build = |builder: GlobSetBuilder, n: usize| -> Result<Option<GlobSet>, String> {
            if n == 0 {
                Ok(None)
            } else {
                builder.build().map(Some).map_err(|e| e.to_string())
            }
        };
        Ok(NameGlobs {
            qualified: build(q, nq)?,
            bare: build(b, nb)?,
        })
    }

    /// No globs were given.
    pub(crate) fn is_empty(&self) -> bool {
        self.qualified.is_none() && self.bare.is_none()
    }

    /// Some glob matches `name`.
    pub(crate) fn matches(&self, name: &str) -> bool {
        if let Some(q) = &self.qualified {
            if q.is_match(name) {
                return true;
            }
        }
        if let Some(b) = &self.bare {
            let last = name.rsplit('.').next().unwrap_or(name);
            if b.is_match(last) {
                return true;
            }
        }
        false
    }

    /// Whether `names` pass: empty globs pass anything; with `all`, every name must match (no
    /// names passes); otherwise some name must match (no names fails).
    pub(crate) fn check(&self, names: &[String], all: bool) -> bool {
        if self.is_empty() {
            return true;
        }
        if all {
            names.iter().all(|n| self.matches(n))
        } else {
            names.iter().any(|n| self.matches(n))
        }
    }

    /// Column selection for masks: qualified globs see `table.column` (with the table's bare
    /// name too, when it is schema-qualified), bare globs see the column name.
    pub(crate) fn matches_column(&self, table: &str, column: &str) -> bool {
        if let Some(b) = &self.bare {
            if b.is_match(column) {
                return true;
            }
        }
        if let Some(q) = &self.qualified {
            if q.is_match(format!("{table}.{column}")) {
                return true;
            }
            if let Some((_, bare_table)) = table.rsplit_once('.') {
                if q.is_match(format!("{bare_table}.{column}")) {
                    return true;
                }
            }
        }
        false
    }
}
