//! SQL statement classification with PostgreSQL's own parser (pg_query), for policy decisions.
//!
//! [`classify`] turns one simple-query string into one [`Statement`] per statement: what it does
//! (`kind`, `kinds`, words of [`tollgate_policy::SQL_STATEMENTS`]), the tables it touches, the
//! functions it calls, and the dangerous things in it. The caller decides each statement once per
//! entry of `kinds` and lets the strictest answer win; if any statement is denied, nothing of the
//! string runs.
//!
//! Layout: public API ([`Statement`], [`classify`], [`cache_key`], [`ClassifyCache`]); the
//! per-statement rules (`classify_node`); DO blocks (`classify_do`); the tree walk (`Scan`); word
//! lists (kinds, dangerous functions). Tests are in `classify/tests.rs`.
//!
//! # How the tree is walked
//! pg_query's summary helpers are not a classifier (a data-modifying CTE reports `SelectStmt`), so
//! every statement's tree is walked here. The walk is a `serde::Serializer` fed by the protobuf
//! tree's derived `Serialize`: that visits every field of every one of the ~270 node types, so no
//! table, function or nested `DELETE` can hide in a node type a hand-written walker forgot. The
//! statement-level rules (EXPLAIN ANALYZE, COPY, PREPARE, ...) use the typed tree.
//!
//! CTE names are scoped like PostgreSQL does: a `FROM d` that names a CTE in scope is not a table;
//! a CTE's own body and earlier siblings see only earlier CTEs (unless `RECURSIVE`); the target of
//! INSERT/UPDATE/DELETE/MERGE and `SELECT INTO` is always a real table.
//!
//! # DO blocks
//! A DO block's body is wrapped in a `CREATE FUNCTION` and parsed with `pg_query::parse_plpgsql`,
//! which returns every embedded SQL statement and expression with its parse mode; each is parsed
//! and classified like top-level SQL, so `DELETE` in a body makes the block a `delete` too.
//! `EXECUTE` of a string (and `FOR .. IN EXECUTE`, `OPEN .. FOR EXECUTE`): constant strings
//! (including `'a' || 'b'`) are parsed and classified; anything computed is marked
//! `do:dynamic_sql` and its text is keyword-scanned for the kinds it may perform. Bodies in other
//! languages cannot be parsed: they are marked `do:language:<name>` and keyword-scanned. A body
//! that does not parse as PL/pgSQL is an error (PostgreSQL would reject it too). A body with a
//! backslash is also keyword-scanned and marked `do:escapes`: the server compiles it with the
//! session's `standard_conforming_strings`, which may be off (see below).
//!
//! # Escapes and encodings
//! With `standard_conforming_strings = off` (a client can `SET` it), `'a\'' ; DROP ...` is a
//! string and a DROP for the server but one string for a default parser. When the caller knows
//! the setting the server will lex with ([`Escapes`]: the handler knows it from the server's
//! ParameterStatus while nothing that may change it is in flight), the text is parsed once that
//! way ([`classify_as`]). Otherwise a text with a backslash is parsed both ways, and if the two
//! readings classify differently it is refused ([`ClassifyError::AmbiguousEscapes`]). Client encodings such as SJIS or BIG5 have characters
//! whose last byte is a backslash, which changes where strings end; the classifier reads UTF-8, so
//! `SET client_encoding`/`SET NAMES` to anything else is dangerous (`set:client_encoding`), and the
//! caller must check that the session's client_encoding (startup parameter, ParameterStatus) is
//! UTF8.
//!
//! # Caching
//! [`cache_key`] is `pg_query::normalize` (constants become `$n`); not the fingerprint, which
//! ignores schema names and digits in table names and would merge statements on different tables.
//! Classification never looks at a constant's value except for DO bodies, EXPLAIN option values
//! and `SET client_encoding`; those statements, and any text with a backslash (see above), are
//! cached only under their exact text.
//!
//! # Known limits
//! - What objects created earlier do is invisible: a column DEFAULT, trigger, rule, view or
//!   user-defined function or operator may write or call anything (creating them is `ddl:code` or
//!   at least `create`; user functions are listed in `functions`).
//! - `nextval('seq')` names its sequence in a string, which is not resolved to a table.
//! - Trees deeper than pg_query's protobuf decoder accepts (about 100 nested messages: 46 chained
//!   `+`, 23 nested subqueries) are refused as [`ClassifyError::TooDeep`]; so are DO blocks nested
//!   more than 4 deep.
//! - Stack: `pg_query::parse` of the deepest accepted trees needs more than 1.5 MiB of stack in
//!   debug builds (the walk here about 250 KiB; release builds need under 256 KiB in all), so
//!   classify on threads with at least the default 2 MiB.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex, PoisonError};

use pg_query::protobuf::{
    self, AExprKind, CmdType, CoercionForm, ObjectType, OnConflictAction, SubLinkType,
    TransactionStmtKind, VariableSetKind,
};
use pg_query::{NodeEnum, ParserOptions};
use serde::ser::{self, Serialize, Serializer};
use serde_json::Value;

/// One classified SQL statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// One of [`tollgate_policy::SQL_STATEMENTS`], by what the statement does: a CTE that deletes
    /// is `delete`; `EXPLAIN ANALYZE <dml>` is that dml's kind (plain `EXPLAIN` is `explain`);
    /// `SELECT ... INTO newtab` is `create`; `DO` is `do`; `CALL` is `call`; `EXECUTE` of a
    /// prepared statement is `execute`; `PREPARE p AS <stmt>` is `<stmt>`'s kind. `START` is
    /// `begin`, `END` is `commit`, `ABORT` is `rollback`; `TABLE t` and `VALUES` are `select`.
    pub kind: &'static str,
    /// Every kind the statement performs, most dangerous first (a SELECT with a deleting CTE:
    /// `["delete", "select"]`); always contains `kind`. Besides nested statements this includes
    /// `update` for `ON CONFLICT DO UPDATE`, MERGE's actions, and `nextval`/`setval` (sequence
    /// writes), `lock` for `FOR UPDATE`/`FOR SHARE`, `notify` for `pg_notify`, `insert` for
    /// `COPY FROM` and `select` for `COPY TO`.
    pub kinds: Vec<&'static str>,
    /// Tables and other relations touched, lowercased, schema-qualified when written so
    /// (`public.users`), else bare (`users`); CTE names are left out. Sorted, deduplicated.
    pub tables: Vec<String>,
    /// Functions called anywhere in the tree (CTEs, subqueries, defaults, trigger functions,
    /// functions named in GRANT/DROP), lowercased, schema-qualified when written so. Sorted,
    /// deduplicated.
    pub functions: Vec<String>,
    /// Operators used by name, each of which runs the function behind it: written ones
    /// (`a !!! b`, `x = ANY(...)`, `OPERATOR(public.+)` as `public.+`, `ORDER BY x USING <`),
    /// and the `=` of `IN (...)`, `IS [NOT] DISTINCT FROM`, `NULLIF`, `CASE x WHEN`, JOIN
    /// `USING`/`NATURAL` and the `~~` of `LIKE`, the `>=`, `<=`, `<`, `>` of `BETWEEN`. Sorted,
    /// deduplicated. The caller looks up what runs behind them (functions.rs).
    pub operators: Vec<String>,
    /// Target types of casts (`x::t`, `CAST(x AS t)`, `t 'literal'`), whose input function and
    /// cast functions run, and types of columns a statement defines (CREATE TABLE, ALTER TABLE
    /// ADD/ALTER COLUMN, composite types), whose functions will run on the rows: lowercased,
    /// schema-qualified when written so (`::int` is the parser's `pg_catalog.int4`), array types
    /// by their element type. Sorted, deduplicated.
    pub casts: Vec<String>,
    /// DDL that may change what an operator name or a cast runs (CREATE/ALTER OPERATOR, TYPE,
    /// DOMAIN, CAST, AGGREGATE, renames and schema moves): the caller re-reads its function
    /// snapshot before the next statement that uses one.
    pub redefines: bool,
    /// Dangerous things found, as short stable strings: `function:<name>` (file access, large
    /// objects, dblink, backend signalling, `set_config`, query-executing XML functions, ...),
    /// `copy:program`, `copy:file`, `ddl:code` (CREATE FUNCTION/PROCEDURE/TRIGGER/RULE/EVENT
    /// TRIGGER/LANGUAGE), `alter:system`, `extension:create`, `extension:alter`, `load`,
    /// `do:dynamic_sql`, `do:language:<name>`, `do:escapes` (a backslash in a DO body, which the
    /// server may read with standard_conforming_strings off), `set:client_encoding` (to anything but UTF-8: the
    /// server would then read quotes and backslashes differently from this classifier). Sorted.
    pub dangerous: Vec<String>,
    /// Whether the statement only reads: every kind is a reading one (select, show, explain,
    /// transaction control, cursors, prepare/deallocate, listen, `COPY TO STDOUT`), nothing is
    /// dangerous, and no known writing function (`nextval`, `setval`, `pg_notify`) is called.
    /// User-defined functions are opaque: check `functions` too.
    pub read_only: bool,
    /// The statement's own text, cut from the original string by the parser's locations. For a
    /// [`ClassifyCache`] hit this is the text of the first string that filled the entry (it may
    /// differ in constants from the current one).
    pub text: String,
    /// `PREPARE name`, `EXECUTE name`, `DEALLOCATE name` (also an EXECUTE run by
    /// `EXPLAIN ANALYZE` or `CREATE TABLE .. AS`): the prepared statement's name. The caller keeps
    /// each session's PREPARE classifications by name, and when `kinds` contains `execute` also
    /// decides the kinds of the prepared statement it runs (or denies an unknown name).
    pub prepared_name: Option<String>,
    /// Whether the classification read a constant's value (a DO block body, an EXPLAIN option
    /// value); [`ClassifyCache`] never shares such statements between texts that normalize alike.
    pub literal_dependent: bool,
    /// Where column values can flow: into the result or into written rows (for column masks).
    pub lineage: Lineage,
}

/// Which column references can carry a value into a result row or a written row, for column
/// mask rules. Names are the last field of a column reference as the parser folded it
/// (`c.email` -> `email`). Clauses that only filter or order rows (WHERE, HAVING, JOIN ON,
/// GROUP BY, ORDER BY, LIMIT/OFFSET, window PARTITION/ORDER BY, MERGE's join condition) are left
/// out: their values never appear in a row (a documented limit of masks: a WHERE clause can still
/// test a value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Columns whose values reach a result or a written row through an expression, a subquery, a
    /// CTE, a set operation, a function in FROM, VALUES, SET or INSERT values (not RETURNING).
    pub refs: Vec<String>,
    /// Columns referenced in RETURNING lists.
    pub returning_refs: Vec<String>,
    /// Top-level SELECT targets that are a bare column reference: the server's RowDescription
    /// names their table column (or has none, for `c.text`-style function notation).
    pub bare_refs: Vec<String>,
    /// A whole-row or star reference inside an expression or subquery (`row_to_json(c)`,
    /// `(c.*)::text`, `SELECT * FROM (SELECT * ...)`), or a column alias list that renames
    /// columns (`AS c(a, b)`), outside RETURNING.
    pub opaque: bool,
    /// The same inside a RETURNING list.
    pub returning_opaque: bool,
}

impl Lineage {
    fn absorb(&mut self, other: Lineage) {
        self.refs.extend(other.refs);
        self.returning_refs.extend(other.returning_refs);
        self.bare_refs.extend(other.bare_refs);
        self.opaque |= other.opaque;
        self.returning_opaque |= other.returning_opaque;
    }

    fn finish(&mut self) {
        for v in [
            &mut self.refs,
            &mut self.returning_refs,
            &mut self.bare_refs,
        ] {
            v.sort();
            v.dedup();
        }
    }
}

/// Why a string could not be classified. Every variant means "deny with this message".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// PostgreSQL's grammar rejects the text (this includes comments inside keywords,
    /// `DR/**/OP`).
    #[error("SQL syntax error: {0}; fix the statement (tollgate only forwards SQL that PostgreSQL's parser accepts)")]
    Syntax(String),
    /// The text contains a NUL byte, which no PostgreSQL query string can hold.
    #[error("SQL text contains a NUL byte: remove it")]
    NulByte,
    /// The tree nests deeper than the parser's decoder or the DO-block recursion limit allows.
    #[error("statement nests too deeply to classify ({0}): flatten the expression or split the statement")]
    TooDeep(String),
    /// The parser produced a statement type that has no classification rule.
    #[error(
        "statement type {0} has no classification rule in this tollgate version, so it is denied"
    )]
    Unsupported(&'static str),
    /// A DO block's body (or an SQL text inside it) does not parse as PL/pgSQL.
    #[error("DO block does not parse as PL/pgSQL: {0}")]
    Plpgsql(String),
    /// The text classifies differently with `standard_conforming_strings` on and off.
    #[error("statement means different things with standard_conforming_strings on and off: write backslash escapes in E'...' strings")]
    AmbiguousEscapes,
    /// The parser library panicked on this input.
    #[error("the SQL parser failed internally on this statement: report it as a tollgate bug")]
    ParserPanic,
}

/// How the server will lex backslashes in `'...'` strings: its `standard_conforming_strings`,
/// when the session knows it for certain (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escapes {
    /// Not known (a statement that may change it is in flight): a text with a backslash is
    /// parsed both ways and refused if the readings differ.
    Unknown,
    /// `standard_conforming_strings = on`: backslashes are plain characters in `'...'`.
    Standard,
    /// `standard_conforming_strings = off`: backslashes escape in `'...'` as in `E'...'`.
    Backslash,
}

impl Escapes {
    /// From the value of a `standard_conforming_strings` ParameterStatus.
    pub fn from_setting(value: &str) -> Escapes {
        match value {
            "on" => Escapes::Standard,
            "off" => Escapes::Backslash,
            _ => Escapes::Unknown,
        }
    }

    fn options(self) -> ParserOptions {
        match self {
            Escapes::Backslash => ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS,
            Escapes::Unknown | Escapes::Standard => ParserOptions::DEFAULT,
        }
    }
}

/// Classify every statement of `sql` (one simple-query string), in order. An empty string, or
/// one of only comments, gives an empty vector.
pub fn classify(sql: &str) -> Result<Vec<Statement>, ClassifyError> {
    classify_as(sql, Escapes::Unknown)
}

/// [`classify`] `sql` as the server reads it under `escapes`.
pub fn classify_as(sql: &str, escapes: Escapes) -> Result<Vec<Statement>, ClassifyError> {
    let parsed = match parse(sql, escapes.options()) {
        // Not a syntax error if the server may be reading backslashes as escapes.
        Err(ClassifyError::Syntax(_))
            if escapes == Escapes::Unknown
                && sql.contains('\\')
                && parse(sql, Escapes::Backslash.options()).is_ok() =>
        {
            return Err(ClassifyError::AmbiguousEscapes)
        }
        r => r?,
    };
    let list = statements(sql, &parsed)?;
    // With standard_conforming_strings off, backslashes escape quotes in '...' strings; a text
    // without backslashes reads the same either way.
    if escapes == Escapes::Unknown && sql.contains('\\') {
        if let Ok(alt) = parse(sql, ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS) {
            match statements(sql, &alt) {
                Ok(other) if same_meaning(&list, &other) => {}
                _ => return Err(ClassifyError::AmbiguousEscapes),
            }
        }
    }
    Ok(list)
}

/// The key under which [`ClassifyCache`] stores `sql`: `pg_query::normalize`, i.e. the text
/// with every constant replaced by `$n`. Errors when `sql` does not parse.
pub fn cache_key(sql: &str) -> Result<String, ClassifyError> {
    match catch_unwind(|| pg_query::normalize(sql)) {
        Ok(Ok(key)) => Ok(key),
        Ok(Err(e)) => Err(from_pg(e)),
        Err(_) => Err(ClassifyError::ParserPanic),
    }
}

/// A cheap stand-in for [`cache_key`] on plain texts, computed without the parser: every
/// `'...'` string becomes `?` and every digit run that does not continue an identifier becomes
/// `#`; every other byte is kept as it is. Two texts with the same key differ only in the
/// contents of such strings and numbers, so PostgreSQL reads them with the same token structure.
///
/// Only texts whose lexing is beyond doubt get a key: printable ASCII (plus tab, CR, LF) with
/// no backslash (standard_conforming_strings), `$` (dollar quotes, parameters), `"` (quoted
/// identifiers), `&` (`U&` escapes), comments, or prefixed strings (`E'..'`, `B'..'`, `X'..'`,
/// `N'..'`, `date'..'`). Everything else returns `None` and goes through [`cache_key`].
/// Classifications that read a constant ([`Statement::literal_dependent`]) are never shared.
pub fn fast_key(sql: &str) -> Option<String> {
    let mut key = String::new();
    fast_key_into(sql, &mut key).then_some(key)
}

/// [`fast_key`] written into `key` (cleared first; its capacity reused): whether `sql` has one.
pub fn fast_key_into(sql: &str, key: &mut String) -> bool {
    // The NUL marks the key space apart from cache_key's (no SQL text holds one).
    fast_scan(sql, "\0", "?", "#", key)
}

/// Another text with the same [`fast_key`] as `sql` (every such string `'z'`, every such
/// number `9`), for tests and fuzzing of the key's promise.
#[doc(hidden)]
pub fn fast_key_sibling(sql: &str) -> Option<String> {
    let mut key = String::new();
    fast_scan(sql, "", "'z'", "9", &mut key).then_some(key)
}

fn fast_scan(sql: &str, prefix: &str, string: &str, number: &str, key: &mut String) -> bool {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    key.clear();
    key.reserve(b.len() + prefix.len());
    key.push_str(prefix);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && ident(b[i - 1]);
        match c {
            b'\'' if !prev_ident => {
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return false,
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
                        Some(b'\'') => break,
                        Some(&x) if x == b'\\' || !(x.is_ascii_graphic() || x == b' ') => {
                            // Backslashes and control or non-ASCII bytes: leave it to the parser.
                            if x != b'\t' && x != b'\n' && x != b'\r' {
                                return false;
                            }
                            j += 1;
                        }
                        Some(_) => j += 1,
                    }
                }
                key.push_str(string);
                i = j + 1;
            }
            b'0'..=b'9' if !prev_ident => {
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                key.push_str(number);
            }
            b'\'' | b'\\' | b'$' | b'"' | b'&' => return false,
            b'-' if b.get(i + 1) == Some(&b'-') => return false,
            b'/' if b.get(i + 1) == Some(&b'*') => return false,
            b' ' | b'\t' | b'\n' | b'\r' => {
                key.push(c as char);
                i += 1;
            }
            _ if c.is_ascii_graphic() => {
                key.push(c as char);
                i += 1;
            }
            _ => return false,
        }
    }
    true
}

/// Texts longer than this are classified but never cached.
pub const MAX_CACHED_SQL_LEN: usize = 16 * 1024;

/// Average bytes (key plus statement texts) budgeted per cache entry: a cache of capacity `cap`
/// keeps at most about `cap` KiB of text per map, whatever the statements' sizes.
const BYTES_PER_ENTRY: usize = 1024;

/// A bounded cache of classifications, so hot statements are not parsed again.
///
/// Two maps share the classifications: one by exact text (a hash lookup, for repeated texts such
/// as `BEGIN` or prepared statements), one by [`cache_key`] (statements differing only in
/// constants share one entry and one `Arc`). A statement whose classification read a constant
/// ([`Statement::literal_dependent`]) or a text with a backslash (see the module docs) goes only
/// into the exact map. Errors are not cached.
///
/// Each map evicts in two generations: when the young half is full (by entries or bytes) it
/// becomes the old half, dropping the previous old one; a hit in the old half moves the entry
/// back, so entries in use survive.
pub struct ClassifyCache {
    half: usize,
    half_bytes: usize,
    maps: Mutex<Maps>,
}

#[derive(Default)]
struct Maps {
    exact: Generations,
    normalized: Generations,
}

#[derive(Default)]
struct Generations {
    young: HashMap<Box<str>, Arc<Vec<Statement>>>,
    young_bytes: usize,
    old: HashMap<Box<str>, Arc<Vec<Statement>>>,
}

impl ClassifyCache {
    /// A cache of at most `cap` entries per map (at least 2).
    pub fn new(cap: usize) -> Self {
        let half = (cap / 2).max(1);
        ClassifyCache {
            half,
            half_bytes: half.saturating_mul(BYTES_PER_ENTRY),
            maps: Mutex::new(Maps::default()),
        }
    }

    /// [`classify`] `sql`, through the cache.
    pub fn classify(&self, sql: &str) -> Result<Arc<Vec<Statement>>, ClassifyError> {
        self.classify_as(sql, Escapes::Unknown)
    }

    /// [`classify_as`] `sql`, through the cache. Texts with a backslash read under a known
    /// setting are not cached: the entries are shared with [`Escapes::Unknown`] lookups, whose
    /// results must also hold under the other setting.
    pub fn classify_as(
        &self,
        sql: &str,
        escapes: Escapes,
    ) -> Result<Arc<Vec<Statement>>, ClassifyError> {
        self.classify_with(sql, escapes, &mut String::new())
    }

    /// [`Self::classify_as`] with `key` as the buffer for the text's [`fast_key`] (a session
    /// keeps one, so a cache hit costs no allocation).
    pub fn classify_with(
        &self,
        sql: &str,
        escapes: Escapes,
        key: &mut String,
    ) -> Result<Arc<Vec<Statement>>, ClassifyError> {
        if sql.len() > MAX_CACHED_SQL_LEN || (escapes != Escapes::Unknown && sql.contains('\\')) {
            return classify_as(sql, escapes).map(Arc::new);
        }
        if let Some(hit) = self.lock().exact.get(sql, self.half, self.half_bytes) {
            return Ok(hit);
        }
        // Plain texts first, without the parser.
        let fast = fast_key_into(sql, key);
        if fast {
            if let Some(hit) = self.lock().normalized.get(key, self.half, self.half_bytes) {
                return Ok(hit);
            }
        }
        let fast = fast.then(|| key.as_str().into());
        // Normalizing would hide a backslash trick inside a constant (see the module docs).
        let normalized = if sql.contains('\\') {
            None
        } else {
            cache_key(sql).ok()
        };
        if let Some(key) = &normalized {
            if let Some(hit) = self.lock().normalized.get(key, self.half, self.half_bytes) {
                return Ok(hit);
            }
        }
        let statements = Arc::new(classify(sql)?);
        let mut maps = self.lock();
        if !statements.iter().any(|s| s.literal_dependent) {
            for key in [normalized, fast].into_iter().flatten() {
                maps.normalized
                    .insert(key.into(), statements.clone(), self.half, self.half_bytes);
            }
        }
        maps.exact
            .insert(sql.into(), statements.clone(), self.half, self.half_bytes);
        Ok(statements)
    }

    /// Number of cached entries (both maps).
    pub fn len(&self) -> usize {
        let maps = self.lock();
        [&maps.exact, &maps.normalized]
            .iter()
            .map(|g| g.young.len() + g.old.len())
            .sum()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // The maps stay consistent even if a holder panicked: every update is one insert/remove.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Generations {
    fn get(&mut self, key: &str, half: usize, half_bytes: usize) -> Option<Arc<Vec<Statement>>> {
        if let Some(hit) = self.young.get(key) {
            return Some(hit.clone());
        }
        let (key, hit) = self.old.remove_entry(key)?;
        self.insert(key, hit.clone(), half, half_bytes);
        Some(hit)
    }

    fn insert(
        &mut self,
        key: Box<str>,
        value: Arc<Vec<Statement>>,
        half: usize,
        half_bytes: usize,
    ) {
        let bytes = key.len() + value.iter().map(|s| s.text.len()).sum::<usize>() + 64;
        if self.young.len() >= half || self.young_bytes.saturating_add(bytes) > half_bytes {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young_bytes += bytes;
        self.young.insert(key, value);
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing and statements
// ---------------------------------------------------------------------------------------------

/// How deep DO blocks (and constant dynamic SQL) may nest inside each other.
const MAX_NESTING: u8 = 4;

fn parse(sql: &str, options: ParserOptions) -> Result<protobuf::ParseResult, ClassifyError> {
    match catch_unwind(|| pg_query::parse(sql, options)) {
        Ok(Ok(parsed)) => Ok(parsed.protobuf),
        Ok(Err(e)) => Err(from_pg(e)),
        Err(_) => Err(ClassifyError::ParserPanic),
    }
}

/// Where PostgreSQL's grammar rejects `sql` under `escapes`: the 1-based character position
/// of the error (what the server sends as the ErrorResponse `P` field), if the parser gives
/// one. The `pg_query` crate drops the parser's cursor position, so this asks libpg_query
/// (linked in through that crate) directly; only called for texts that failed to parse.
pub fn syntax_error_position(sql: &str, escapes: Escapes) -> Option<u32> {
    use std::ffi::{c_char, c_int, CString};
    #[repr(C)]
    struct PgQueryError {
        message: *mut c_char,
        funcname: *mut c_char,
        filename: *mut c_char,
        lineno: c_int,
        cursorpos: c_int,
        context: *mut c_char,
    }
    #[repr(C)]
    struct PgQueryProtobuf {
        len: usize,
        data: *mut c_char,
    }
    #[repr(C)]
    struct PgQueryProtobufParseResult {
        parse_tree: PgQueryProtobuf,
        stderr_buffer: *mut c_char,
        error: *mut PgQueryError,
    }
    extern "C" {
        fn pg_query_parse_protobuf_opts(
            input: *const c_char,
            parser_options: c_int,
        ) -> PgQueryProtobufParseResult;
        fn pg_query_free_protobuf_parse_result(result: PgQueryProtobufParseResult);
    }
    let input = CString::new(sql).ok()?;
    let bits = escapes.options().bits();
    catch_unwind(|| {
        // SAFETY: the declarations match libpg_query's pg_query.h (the version the pg_query
        // crate builds); the input is NUL-terminated and outlives the call, the error is read
        // before the result is freed, and the result is freed exactly once.
        unsafe {
            let result = pg_query_parse_protobuf_opts(input.as_ptr(), bits);
            let pos = match result.error.as_ref() {
                Some(e) if e.cursorpos > 0 => u32::try_from(e.cursorpos).ok(),
                _ => None,
            };
            pg_query_free_protobuf_parse_result(result);
            pos
        }
    })
    .ok()
    .flatten()
}

fn from_pg(e: pg_query::Error) -> ClassifyError {
    match e {
        pg_query::Error::Conversion(_) => ClassifyError::NulByte,
        pg_query::Error::Decode(e) => ClassifyError::TooDeep(e.to_string()),
        pg_query::Error::Parse(m) if m.contains("stack depth") => ClassifyError::TooDeep(m),
        pg_query::Error::InvalidJson(m) => ClassifyError::Plpgsql(m),
        pg_query::Error::Parse(m)
        | pg_query::Error::Scan(m)
        | pg_query::Error::Split(m)
        | pg_query::Error::IsUtility(m) => ClassifyError::Syntax(m),
        pg_query::Error::InvalidPointer => ClassifyError::ParserPanic,
    }
}

fn statements(sql: &str, parsed: &protobuf::ParseResult) -> Result<Vec<Statement>, ClassifyError> {
    let mut out = Vec::with_capacity(parsed.stmts.len());
    for raw in &parsed.stmts {
        let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let text = statement_text(sql, raw.stmt_location, raw.stmt_len);
        out.push(classify_node(node, 0)?.into_statement(text));
    }
    Ok(out)
}

/// The statement's slice of `sql` (`len` 0 means "to the end"), trimmed; the whole string if the
/// locations do not fall on character boundaries.
fn statement_text(sql: &str, location: i32, len: i32) -> String {
    let start = usize::try_from(location).unwrap_or(0);
    let end = match usize::try_from(len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(len) => start.saturating_add(len).min(sql.len()),
    };
    sql.get(start..end).unwrap_or(sql).trim().to_owned()
}

/// Whether two readings of one text classify alike (texts aside).
fn same_meaning(a: &[Statement], b: &[Statement]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.kind == b.kind
                && a.kinds == b.kinds
                && a.tables == b.tables
                && a.functions == b.functions
                && a.operators == b.operators
                && a.casts == b.casts
                && a.redefines == b.redefines
                && a.dangerous == b.dangerous
                && a.prepared_name == b.prepared_name
                && a.read_only == b.read_only
                && a.lineage == b.lineage
        })
}

// ---------------------------------------------------------------------------------------------
// Kinds
// ---------------------------------------------------------------------------------------------

/// Every statement kind, most dangerous first: the order of [`Statement::kinds`]. A permutation
/// of [`tollgate_policy::SQL_STATEMENTS`] (a test checks).
const RANK: &[&str] = &[
    "drop",
    "truncate",
    "delete",
    "merge",
    "update",
    "insert",
    "alter",
    "create",
    "grant",
    "revoke",
    "reassign",
    "security",
    "comment",
    "do",
    "call",
    "execute",
    "copy",
    "load",
    "import",
    "refresh",
    "vacuum",
    "cluster",
    "reindex",
    "analyze",
    "lock",
    "checkpoint",
    "notify",
    "prepare",
    "declare",
    "fetch",
    "move",
    "close",
    "deallocate",
    "listen",
    "unlisten",
    "set",
    "reset",
    "discard",
    "begin",
    "start",
    "savepoint",
    "release",
    "commit",
    "end",
    "rollback",
    "abort",
    "show",
    "explain",
    "select",
    "table",
    "values",
    "with",
];

/// Kinds that only read (see [`Statement::read_only`]). `copy` is here because COPY's writing
/// forms add `insert` (FROM) or a dangerous entry (files, programs).
const READ_KINDS: &[&str] = &[
    "select",
    "table",
    "values",
    "with",
    "show",
    "explain",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "declare",
    "fetch",
    "move",
    "close",
    "prepare",
    "deallocate",
    "listen",
    "unlisten",
    "copy",
];

/// A set of kinds, one bit per [`RANK`] position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KindSet(u64);

impl KindSet {
    fn insert(&mut self, kind: &'static str) {
        let bit = RANK.iter().position(|k| *k == kind);
        debug_assert!(bit.is_some(), "kind {kind:?} is missing from RANK");
        if let Some(bit) = bit {
            self.0 |= 1 << bit;
        }
    }

    fn union(self, other: KindSet) -> KindSet {
        KindSet(self.0 | other.0)
    }

    /// The kinds, most dangerous first.
    fn iter(self) -> impl Iterator<Item = &'static str> {
        RANK.iter()
            .enumerate()
            .filter(move |(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, kind)| *kind)
    }

    /// The most dangerous kind.
    fn first(self) -> Option<&'static str> {
        self.iter().next()
    }
}

/// The kind of a statement node, by its protobuf struct name (default for the variants whose
/// kind depends on fields, e.g. `TransactionStmt`); `None` for non-statements.
fn struct_kind(name: &str) -> Option<&'static str> {
    Some(match name {
        "SelectStmt" => "select",
        "InsertStmt" => "insert",
        "UpdateStmt" => "update",
        "DeleteStmt" => "delete",
        "MergeStmt" => "merge",
        "CreateSchemaStmt"
        | "CreateStmt"
        | "CreateTableSpaceStmt"
        | "CreateExtensionStmt"
        | "CreateFdwStmt"
        | "CreateForeignServerStmt"
        | "CreateForeignTableStmt"
        | "CreateUserMappingStmt"
        | "CreatePolicyStmt"
        | "CreateAmStmt"
        | "CreateTrigStmt"
        | "CreateEventTrigStmt"
        | "CreatePLangStmt"
        | "CreateRoleStmt"
        | "CreateSeqStmt"
        | "DefineStmt"
        | "CreateDomainStmt"
        | "CreateOpClassStmt"
        | "CreateOpFamilyStmt"
        | "IndexStmt"
        | "CreateStatsStmt"
        | "CreateFunctionStmt"
        | "RuleStmt"
        | "CompositeTypeStmt"
        | "CreateEnumStmt"
        | "CreateRangeStmt"
        | "ViewStmt"
        | "CreatedbStmt"
        | "CreateTableAsStmt"
        | "CreateConversionStmt"
        | "CreateCastStmt"
        | "CreateTransformStmt"
        | "CreatePublicationStmt"
        | "CreateSubscriptionStmt" => "create",
        "AlterTableStmt"
        | "ReplicaIdentityStmt"
        | "AlterCollationStmt"
        | "AlterDomainStmt"
        | "AlterDefaultPrivilegesStmt"
        | "AlterTableSpaceOptionsStmt"
        | "AlterTableMoveAllStmt"
        | "AlterExtensionStmt"
        | "AlterExtensionContentsStmt"
        | "AlterFdwStmt"
        | "AlterForeignServerStmt"
        | "AlterUserMappingStmt"
        | "AlterPolicyStmt"
        | "AlterEventTrigStmt"
        | "AlterRoleStmt"
        | "AlterRoleSetStmt"
        | "AlterSeqStmt"
        | "AlterOpFamilyStmt"
        | "AlterStatsStmt"
        | "AlterFunctionStmt"
        | "RenameStmt"
        | "AlterObjectDependsStmt"
        | "AlterObjectSchemaStmt"
        | "AlterOwnerStmt"
        | "AlterOperatorStmt"
        | "AlterTypeStmt"
        | "AlterEnumStmt"
        | "AlterDatabaseStmt"
        | "AlterDatabaseRefreshCollStmt"
        | "AlterDatabaseSetStmt"
        | "AlterSystemStmt"
        | "AlterTsDictionaryStmt"
        | "AlterTsConfigurationStmt"
        | "AlterPublicationStmt"
        | "AlterSubscriptionStmt" => "alter",
        "DropTableSpaceStmt"
        | "DropUserMappingStmt"
        | "DropRoleStmt"
        | "DropStmt"
        | "DropdbStmt"
        | "DropOwnedStmt"
        | "DropSubscriptionStmt" => "drop",
        "GrantStmt" | "GrantRoleStmt" => "grant",
        "CopyStmt" => "copy",
        "VariableSetStmt" | "ConstraintsSetStmt" => "set",
        "VariableShowStmt" => "show",
        "ImportForeignSchemaStmt" => "import",
        "TruncateStmt" => "truncate",
        "CommentStmt" => "comment",
        "SecLabelStmt" => "security",
        "DeclareCursorStmt" => "declare",
        "ClosePortalStmt" => "close",
        "FetchStmt" => "fetch",
        "DoStmt" => "do",
        "CallStmt" => "call",
        "NotifyStmt" => "notify",
        "ListenStmt" => "listen",
        "UnlistenStmt" => "unlisten",
        "TransactionStmt" => "begin",
        "LoadStmt" => "load",
        "ClusterStmt" => "cluster",
        "VacuumStmt" => "vacuum",
        "ExplainStmt" => "explain",
        "RefreshMatViewStmt" => "refresh",
        "CheckPointStmt" => "checkpoint",
        "DiscardStmt" => "discard",
        "LockStmt" => "lock",
        "ReindexStmt" => "reindex",
        "PrepareStmt" => "prepare",
        "ExecuteStmt" => "execute",
        "DeallocateStmt" => "deallocate",
        "ReassignOwnedStmt" => "reassign",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Per-statement rules
// ---------------------------------------------------------------------------------------------

/// A classification in progress.
#[derive(Debug, Default)]
struct Classified {
    kind: &'static str,
    kinds: KindSet,
    tables: BTreeSet<String>,
    functions: BTreeSet<String>,
    operators: BTreeSet<String>,
    casts: BTreeSet<String>,
    redefines: bool,
    dangerous: BTreeSet<String>,
    /// Something writes that `kinds` does not say (a CALL, a sequence write, 2PC commit).
    writes: bool,
    literal_dependent: bool,
    prepared_name: Option<String>,
    lineage: Lineage,
}

impl Classified {
    /// Take in everything `other` does (its kinds, objects and prepared name; not its `kind`).
    fn absorb(&mut self, other: Classified) {
        if self.prepared_name.is_none() {
            self.prepared_name = other.prepared_name;
        }
        self.kinds = self.kinds.union(other.kinds);
        self.tables.extend(other.tables);
        self.functions.extend(other.functions);
        self.operators.extend(other.operators);
        self.casts.extend(other.casts);
        self.redefines |= other.redefines;
        self.dangerous.extend(other.dangerous);
        self.writes |= other.writes;
        self.literal_dependent |= other.literal_dependent;
        self.lineage.absorb(other.lineage);
    }

    fn into_statement(mut self, text: String) -> Statement {
        self.kinds.insert(self.kind);
        let kinds: Vec<&'static str> = self.kinds.iter().collect();
        let read_only = !self.writes
            && self.dangerous.is_empty()
            && kinds.iter().all(|k| READ_KINDS.contains(k));
        Statement {
            kind: self.kind,
            kinds,
            tables: self.tables.into_iter().collect(),
            functions: self.functions.into_iter().collect(),
            operators: self.operators.into_iter().collect(),
            casts: self.casts.into_iter().collect(),
            redefines: self.redefines,
            dangerous: self.dangerous.into_iter().collect(),
            read_only,
            text,
            prepared_name: self.prepared_name,
            literal_dependent: self.literal_dependent,
            lineage: {
                let mut l = self.lineage;
                l.finish();
                l
            },
        }
    }
}

/// The node inside an optional boxed `Node` field.
fn inner(node: &Option<Box<protobuf::Node>>) -> Option<&NodeEnum> {
    node.as_deref().and_then(|n| n.node.as_ref())
}

/// Classify one statement node. `depth` counts enclosing DO blocks.
fn classify_node(node: &NodeEnum, depth: u8) -> Result<Classified, ClassifyError> {
    if depth > MAX_NESTING {
        return Err(ClassifyError::TooDeep(format!(
            "DO blocks or dynamic SQL nested more than {MAX_NESTING} deep"
        )));
    }
    let scanned = Scan::run(node);
    let nested = scanned.nested;
    let mut c = scanned.objects;
    // Kinds of nested statements and clauses: what the statement runs besides its own kind.
    c.kinds = nested.union(scanned.extra);
    c.redefines = matches!(
        node,
        NodeEnum::DefineStmt(_)
            | NodeEnum::CreateDomainStmt(_)
            | NodeEnum::CreateCastStmt(_)
            | NodeEnum::CreateEnumStmt(_)
            | NodeEnum::CreateRangeStmt(_)
            | NodeEnum::CompositeTypeStmt(_)
            | NodeEnum::AlterOperatorStmt(_)
            | NodeEnum::AlterTypeStmt(_)
            | NodeEnum::AlterDomainStmt(_)
            | NodeEnum::AlterEnumStmt(_)
            | NodeEnum::RenameStmt(_)
            | NodeEnum::AlterObjectSchemaStmt(_)
            | NodeEnum::CreateSchemaStmt(_)
    );
    let own = match node {
        NodeEnum::SelectStmt(_)
        | NodeEnum::InsertStmt(_)
        | NodeEnum::UpdateStmt(_)
        | NodeEnum::DeleteStmt(_)
        | NodeEnum::MergeStmt(_) => {
            let own = struct_kind(scanned.top).unwrap_or("select");
            let mut statements = nested;
            statements.insert(own);
            // A deleting CTE makes the statement a delete; SELECT INTO makes it a create.
            c.kind = statements.first().unwrap_or(own);
            c.kinds.insert(own);
            if let NodeEnum::SelectStmt(sel) = node {
                if sel.into_clause.is_some() {
                    // SELECT ... INTO writes its targets to a new table: a bare column is a
                    // written value, and a star writes every column.
                    let bare = std::mem::take(&mut c.lineage.bare_refs);
                    c.lineage.refs.extend(bare);
                    c.lineage.opaque |= sel.target_list.iter().any(|t| {
                        matches!(&t.node, Some(NodeEnum::ResTarget(r))
                            if matches!(inner(&r.val), Some(NodeEnum::ColumnRef(cr))
                                if cr.fields.iter().any(|f| matches!(f.node, Some(NodeEnum::AStar(_))))))
                    });
                }
            }
            return Ok(c);
        }
        NodeEnum::ExplainStmt(e) => {
            // Plain EXPLAIN plans without running: only its objects count.
            c.kinds = KindSet::default();
            let (analyze, had_value) = explain_analyze(&e.options);
            c.literal_dependent |= had_value;
            if let (true, Some(query)) = (analyze, inner(&e.query)) {
                let ran = classify_node(query, depth)?;
                c.kinds.insert("explain");
                c.kind = ran.kind;
                c.absorb(ran);
                return Ok(c);
            }
            "explain"
        }
        NodeEnum::PrepareStmt(p) => {
            c.prepared_name = Some(p.name.clone());
            if let Some(query) = inner(&p.query) {
                let prepared = classify_node(query, depth)?;
                c.kinds.insert("prepare");
                c.kind = prepared.kind;
                c.absorb(prepared);
                return Ok(c);
            }
            "prepare"
        }
        NodeEnum::ExecuteStmt(e) => {
            c.prepared_name = Some(e.name.clone());
            c.writes = true;
            "execute"
        }
        NodeEnum::DeallocateStmt(d) => {
            if !d.isall {
                c.prepared_name = Some(d.name.clone());
            }
            "deallocate"
        }
        NodeEnum::CopyStmt(copy) => {
            if let Some(query) = inner(&copy.query) {
                let ran = classify_node(query, depth)?;
                c.absorb(ran);
            } else if copy.relation.is_some() && !copy.is_from {
                c.kinds.insert("select");
            }
            if copy.is_from {
                c.kinds.insert("insert");
                c.writes = true;
            }
            // Whether a file is named is read from a constant (pg_query gives STDOUT and `TO ''`
            // the same empty filename), so COPY is never shared between texts that differ only
            // in constants (found by the pg_classify fuzz target: `TO ''` vs `TO 'file'`).
            c.literal_dependent = true;
            if copy.is_program {
                c.dangerous.insert("copy:program".to_owned());
            } else if !copy.filename.is_empty() {
                c.dangerous.insert("copy:file".to_owned());
            }
            "copy"
        }
        NodeEnum::DeclareCursorStmt(d) => {
            if let Some(query) = inner(&d.query) {
                let ran = classify_node(query, depth)?;
                c.absorb(ran);
            }
            "declare"
        }
        NodeEnum::CreateTableAsStmt(ct) => {
            if let Some(query) = inner(&ct.query) {
                let ran = classify_node(query, depth)?;
                c.absorb(ran);
            }
            "create"
        }
        NodeEnum::DoStmt(d) => {
            let body = classify_do(d, depth)?;
            c.absorb(body);
            "do"
        }
        NodeEnum::CallStmt(_) => {
            c.writes = true;
            "call"
        }
        NodeEnum::DropStmt(d) => {
            drop_objects(d, &mut c);
            "drop"
        }
        NodeEnum::TransactionStmt(t) => match TransactionStmtKind::try_from(t.kind) {
            Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
                "begin"
            }
            Ok(TransactionStmtKind::TransStmtCommit) => "commit",
            Ok(
                TransactionStmtKind::TransStmtRollback | TransactionStmtKind::TransStmtRollbackTo,
            ) => "rollback",
            Ok(TransactionStmtKind::TransStmtSavepoint) => "savepoint",
            Ok(TransactionStmtKind::TransStmtRelease) => "release",
            // Two-phase commit: PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED.
            Ok(TransactionStmtKind::TransStmtPrepare) => {
                c.writes = true;
                "prepare"
            }
            Ok(TransactionStmtKind::TransStmtCommitPrepared) => {
                c.writes = true;
                "commit"
            }
            Ok(TransactionStmtKind::TransStmtRollbackPrepared) => {
                c.writes = true;
                "rollback"
            }
            Ok(TransactionStmtKind::Undefined) | Err(_) => {
                return Err(ClassifyError::Unsupported("TransactionStmt"))
            }
        },
        NodeEnum::VariableSetStmt(v) => match VariableSetKind::try_from(v.kind) {
            Ok(VariableSetKind::VarReset | VariableSetKind::VarResetAll) => "reset",
            _ => {
                if v.name.eq_ignore_ascii_case("client_encoding") {
                    c.literal_dependent = true;
                    if !utf8_encoding(&v.args) {
                        c.dangerous.insert("set:client_encoding".to_owned());
                    }
                }
                "set"
            }
        },
        NodeEnum::GrantStmt(g) if !g.is_grant => "revoke",
        NodeEnum::GrantRoleStmt(g) if !g.is_grant => "revoke",
        NodeEnum::FetchStmt(f) if f.ismove => "move",
        NodeEnum::VacuumStmt(v) if !v.is_vacuumcmd => "analyze",
        NodeEnum::CreateFunctionStmt(_)
        | NodeEnum::CreateTrigStmt(_)
        | NodeEnum::RuleStmt(_)
        | NodeEnum::CreateEventTrigStmt(_)
        | NodeEnum::CreatePlangStmt(_) => {
            // Code that runs later, possibly as another role: policy denies by "ddl:code".
            c.dangerous.insert("ddl:code".to_owned());
            "create"
        }
        NodeEnum::AlterSystemStmt(_) => {
            c.dangerous.insert("alter:system".to_owned());
            "alter"
        }
        NodeEnum::CreateExtensionStmt(_) => {
            c.dangerous.insert("extension:create".to_owned());
            "create"
        }
        NodeEnum::AlterExtensionStmt(_) => {
            // ALTER EXTENSION ... UPDATE runs the extension's scripts.
            c.dangerous.insert("extension:alter".to_owned());
            "alter"
        }
        NodeEnum::LoadStmt(_) => {
            c.dangerous.insert("load".to_owned());
            "load"
        }
        _ => match struct_kind(scanned.top) {
            Some(kind) => kind,
            None => return Err(ClassifyError::Unsupported(scanned.top)),
        },
    };
    c.kind = own;
    c.kinds.insert(own);
    Ok(c)
}

/// Whether EXPLAIN's options turn ANALYZE on, and whether that came from an option value.
/// Values other than false/off/0 count as on (PostgreSQL rejects the rest anyway).
fn explain_analyze(options: &[protobuf::Node]) -> (bool, bool) {
    let mut analyze = (false, false);
    for option in options {
        let Some(NodeEnum::DefElem(e)) = &option.node else {
            continue;
        };
        if !e.defname.eq_ignore_ascii_case("analyze") {
            continue;
        }
        analyze = match inner(&e.arg) {
            None => (true, false),
            Some(NodeEnum::String(s)) => (
                !(s.sval.eq_ignore_ascii_case("false") || s.sval.eq_ignore_ascii_case("off")),
                true,
            ),
            Some(NodeEnum::Boolean(b)) => (b.boolval, true),
            Some(NodeEnum::Integer(i)) => (i.ival != 0, true),
            Some(_) => (true, true),
        };
    }
    analyze
}

/// Whether `SET client_encoding` / `SET NAMES` keeps UTF-8 (or the default). Other encodings
/// (SJIS, BIG5, GBK, ...) have multibyte characters ending in a backslash byte, so the server
/// would read quotes and escapes differently from this classifier, which reads UTF-8.
fn utf8_encoding(args: &[protobuf::Node]) -> bool {
    let value = match args.first().and_then(|a| a.node.as_ref()) {
        None => return true,
        Some(NodeEnum::AConst(a)) => match &a.val {
            Some(protobuf::a_const::Val::Sval(s)) => s.sval.as_str(),
            _ => return false,
        },
        Some(NodeEnum::String(s)) => s.sval.as_str(),
        Some(_) => return false,
    };
    let value: String = value
        .chars()
        .filter(|ch| ch.is_ascii_alphanumeric())
        .map(|ch| ch.to_ascii_lowercase())
        .collect();
    args.len() == 1 && matches!(value.as_str(), "utf8" | "unicode" | "default")
}

/// DROP's objects: relations into `tables`, (the table of) rules, triggers and policies too.
/// Functions come from the scan (`ObjectWithArgs`).
fn drop_objects(d: &protobuf::DropStmt, c: &mut Classified) {
    let relation = matches!(
        ObjectType::try_from(d.remove_type),
        Ok(ObjectType::ObjectTable
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectSequence
            | ObjectType::ObjectForeignTable
            | ObjectType::ObjectIndex)
    );
    let on_table = matches!(
        ObjectType::try_from(d.remove_type),
        Ok(ObjectType::ObjectRule | ObjectType::ObjectTrigger | ObjectType::ObjectPolicy)
    );
    if !relation && !on_table {
        return;
    }
    for object in &d.objects {
        let Some(NodeEnum::List(list)) = &object.node else {
            continue;
        };
        let mut parts: Vec<String> = list
            .items
            .iter()
            .filter_map(|item| match &item.node {
                Some(NodeEnum::String(s)) => Some(s.sval.to_lowercase()),
                _ => None,
            })
            .collect();
        if on_table {
            // `DROP TRIGGER trg ON schema.table`: the last name is the trigger's.
            parts.pop();
        }
        if !parts.is_empty() {
            c.tables.insert(parts.join("."));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DO blocks
// ---------------------------------------------------------------------------------------------

/// A DO block: `do`, plus what its body does (see the module docs).
fn classify_do(d: &protobuf::DoStmt, depth: u8) -> Result<Classified, ClassifyError> {
    let mut c = Classified {
        kind: "do",
        writes: true,
        literal_dependent: true,
        ..Classified::default()
    };
    c.kinds.insert("do");
    let mut body = None;
    let mut language = "plpgsql".to_owned();
    for arg in &d.args {
        let Some(NodeEnum::DefElem(e)) = &arg.node else {
            continue;
        };
        let Some(NodeEnum::String(value)) = inner(&e.arg) else {
            continue;
        };
        match e.defname.as_str() {
            "as" => body = Some(value.sval.as_str()),
            "language" => language = value.sval.to_lowercase(),
            _ => {}
        }
    }
    let Some(body) = body else {
        return Ok(c);
    };
    if body.contains('\\') {
        // The server compiles the body with the session's standard_conforming_strings, which may
        // be off, and this parser cannot be told so: where strings end is uncertain. Count every
        // keyword, and let policy see the uncertainty.
        c.dangerous.insert("do:escapes".to_owned());
        keyword_scan(body, &mut c);
    }
    if language == "plpgsql" {
        let tag = dollar_tag(body);
        let function = format!(
            "CREATE FUNCTION tollgate_do() RETURNS void LANGUAGE plpgsql AS ${tag}${body}${tag}$"
        );
        let tree = match catch_unwind(|| pg_query::parse_plpgsql(&function)) {
            Ok(Ok(tree)) => tree,
            Ok(Err(pg_query::Error::Conversion(_))) => return Err(ClassifyError::NulByte),
            Ok(Err(e)) => return Err(ClassifyError::Plpgsql(e.to_string())),
            Err(_) => return Err(ClassifyError::ParserPanic),
        };
        walk_plpgsql(&tree, false, depth, &mut c)?;
    } else {
        let name: String = language
            .chars()
            .filter(|ch| ch.is_ascii_alphanumeric() || *ch == '_')
            .take(63)
            .collect();
        c.dangerous.insert(format!("do:language:{name}"));
        keyword_scan(body, &mut c);
    }
    Ok(c)
}

/// A dollar-quote tag `tollgate<n>x` such that `$tag` does not occur in `body`, so
/// `$tag$body$tag$` ends exactly where `body` does. One pass over `body`: the tags it contains are
/// collected first (trying candidates one by one would be quadratic in a hostile body).
fn dollar_tag(body: &str) -> String {
    const PREFIX: &str = "$tollgate";
    let mut taken = HashSet::new();
    for (at, _) in body.match_indices(PREFIX) {
        let rest = &body[at + PREFIX.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if rest.as_bytes().get(digits) == Some(&b'x') {
            taken.insert(&rest[..digits]);
        }
    }
    let mut n = 0u64;
    while taken.contains(n.to_string().as_str()) {
        n += 1;
    }
    format!("tollgate{n}x")
}

/// PL/pgSQL statements whose named fields hold SQL text built at run time.
const DYNAMIC_SQL_STMTS: &[(&str, &str)] = &[
    ("PLpgSQL_stmt_dynexecute", "query"),
    ("PLpgSQL_stmt_dynfors", "query"),
    ("PLpgSQL_stmt_open", "dynquery"),
    ("PLpgSQL_stmt_return_query", "dynquery"),
];

/// Walk `parse_plpgsql`'s JSON: classify every embedded expression (`PLpgSQL_expr`).
fn walk_plpgsql(
    value: &Value,
    dynamic: bool,
    depth: u8,
    c: &mut Classified,
) -> Result<(), ClassifyError> {
    match value {
        Value::Array(items) => {
            for item in items {
                walk_plpgsql(item, false, depth, c)?;
            }
        }
        Value::Object(map) => {
            for (key, field) in map {
                match key.as_str() {
                    "PLpgSQL_expr" => plpgsql_expr(field, dynamic, depth, c)?,
                    "PLpgSQL_stmt_commit" => c.kinds.insert("commit"),
                    "PLpgSQL_stmt_rollback" => c.kinds.insert("rollback"),
                    _ => {
                        let dynamic_field = DYNAMIC_SQL_STMTS
                            .iter()
                            .find(|(stmt, _)| *stmt == key.as_str())
                            .map(|(_, f)| *f);
                        match (dynamic_field, field) {
                            (Some(dynamic_field), Value::Object(fields)) => {
                                for (name, v) in fields {
                                    walk_plpgsql(v, name == dynamic_field, depth, c)?;
                                }
                            }
                            _ => walk_plpgsql(field, false, depth, c)?,
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// One PL/pgSQL expression: `{"query": text, "parseMode": mode}`. Mode 0 is a whole SQL
/// statement; the others are expressions and assignments.
fn plpgsql_expr(
    expr: &Value,
    dynamic: bool,
    depth: u8,
    c: &mut Classified,
) -> Result<(), ClassifyError> {
    let Some(query) = expr.get("query").and_then(Value::as_str) else {
        return Ok(());
    };
    let mode = expr.get("parseMode").and_then(Value::as_i64).unwrap_or(0);
    let mode = i32::try_from(mode)
        .map_err(|_| ClassifyError::Plpgsql(format!("unknown expression parse mode {mode}")))?;
    let parsed = parse(query, ParserOptions::from(mode)).map_err(|e| match e {
        ClassifyError::Syntax(m) => ClassifyError::Plpgsql(m),
        e => e,
    })?;
    for raw in &parsed.stmts {
        let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        if mode == 0 {
            let statement = classify_node(node, depth + 1)?;
            c.absorb(statement);
        } else {
            let scanned = Scan::run(node);
            let mut objects = scanned.objects;
            objects.kinds = scanned.nested.union(scanned.extra);
            c.absorb(objects);
        }
        if dynamic {
            dynamic_sql(node, query, depth, c)?;
        }
    }
    Ok(())
}

/// `EXECUTE <expr>` in PL/pgSQL: a constant string is classified; anything else is flagged.
fn dynamic_sql(
    node: &NodeEnum,
    text: &str,
    depth: u8,
    c: &mut Classified,
) -> Result<(), ClassifyError> {
    let constant = match node {
        NodeEnum::SelectStmt(s)
            if s.target_list.len() == 1 && s.from_clause.is_empty() && s.where_clause.is_none() =>
        {
            match &s.target_list[0].node {
                Some(NodeEnum::ResTarget(t)) => inner(&t.val).and_then(constant_string),
                _ => None,
            }
        }
        _ => None,
    };
    let Some(sql) = constant else {
        c.dangerous.insert("do:dynamic_sql".to_owned());
        keyword_scan(text, c);
        return Ok(());
    };
    match parse(&sql, ParserOptions::DEFAULT) {
        Ok(parsed) => {
            for raw in &parsed.stmts {
                if let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) {
                    let statement = classify_node(node, depth + 1)?;
                    c.absorb(statement);
                }
            }
        }
        Err(_) => {
            c.dangerous.insert("do:dynamic_sql".to_owned());
            keyword_scan(&sql, c);
        }
    }
    Ok(())
}

/// The value of a constant string expression: a literal, a cast of one, or `||` of such.
fn constant_string(node: &NodeEnum) -> Option<String> {
    match node {
        NodeEnum::AConst(a) => match &a.val {
            Some(protobuf::a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        NodeEnum::TypeCast(t) => inner(&t.arg).and_then(constant_string),
        NodeEnum::AExpr(e)
            if e.name.len() == 1
                && matches!(&e.name[0].node, Some(NodeEnum::String(op)) if op.sval == "||") =>
        {
            let left = inner(&e.lexpr).and_then(constant_string)?;
            let right = inner(&e.rexpr).and_then(constant_string)?;
            Some(left + &right)
        }
        _ => None,
    }
}

/// Words that imply a kind when they appear in SQL text that cannot be parsed.
const KIND_WORDS: &[&str] = &[
    "insert", "update", "delete", "merge", "drop", "truncate", "alter", "create", "grant",
    "revoke", "copy", "call", "execute", "lock", "vacuum", "reindex", "cluster", "refresh",
    "reassign", "import", "load", "notify", "comment",
];

/// Conservative reading of SQL-ish text nobody can parse (computed dynamic SQL, bodies in other
/// languages): every kind word and every dangerous function name in it counts.
fn keyword_scan(text: &str, c: &mut Classified) {
    let (mut copy, mut program) = (false, false);
    for word in text
        .split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
        .filter(|w| !w.is_empty())
    {
        let word = word.to_lowercase();
        if let Some(kind) = KIND_WORDS.iter().find(|k| **k == word) {
            c.kinds.insert(kind);
        }
        if dangerous_function(&word) {
            c.dangerous.insert(format!("function:{word}"));
        }
        copy |= word == "copy";
        program |= word == "program";
    }
    if copy && program {
        c.dangerous.insert("copy:program".to_owned());
    }
}

// ---------------------------------------------------------------------------------------------
// Dangerous functions
// ---------------------------------------------------------------------------------------------

/// Functions that read or write server files, signal backends, reach other servers, change
/// settings, or run SQL given as text, by exact (unqualified, lowercase) name.
const DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_log_backend_memory_contexts",
    "pg_drop_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_replication_slot_advance",
    "pg_import_system_collations",
    "set_config",
    "loread",
    "lowrite",
    "ts_stat",
    "ts_rewrite",
];

/// Same, by name prefix: large objects, dblink, directory listings, adminpack file functions,
/// `query_to_xml`-style functions that run a query string, replication origins, stats resets.
const DANGEROUS_PREFIXES: &[&str] = &[
    "lo_",
    "dblink",
    "pg_ls_",
    "pg_read_",
    "pg_file_",
    "pg_logdir_",
    "query_to_xml",
    "table_to_xml",
    "cursor_to_xml",
    "schema_to_xml",
    "database_to_xml",
    "pg_replication_origin_",
    "pg_logical_slot_",
    "pg_stat_reset",
    "binary_upgrade_",
];

/// Built-ins that run SQL text given as an argument (`ts_rewrite(q, 'SELECT ...')`,
/// `query_to_xml('...')`, dblink): the text is never classified, so only a rule that names the
/// function exactly (no wildcard) can allow one.
pub fn runs_sql_text(name: &str) -> bool {
    matches!(name, "ts_rewrite" | "ts_stat")
        || [
            "query_to_xml",
            "table_to_xml",
            "cursor_to_xml",
            "schema_to_xml",
            "database_to_xml",
            "dblink",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Whether `name` (unqualified, lowercase) is a dangerous function.
pub fn dangerous_function(name: &str) -> bool {
    DANGEROUS_FUNCTIONS.contains(&name) || DANGEROUS_PREFIXES.iter().any(|p| name.starts_with(p))
}

// ---------------------------------------------------------------------------------------------
// The tree walk
// ---------------------------------------------------------------------------------------------

/// What a scan of one statement's tree found.
struct Scanned {
    /// The struct name of the scanned node (`"SelectStmt"`).
    top: &'static str,
    /// Kinds of statements nested below the top one (a CTE's DELETE; SELECT INTO's `create`).
    nested: KindSet,
    /// Kinds implied by clauses and functions (ON CONFLICT DO UPDATE, FOR UPDATE, nextval).
    extra: KindSet,
    /// Tables, functions, dangerous entries and `writes`; `kind`/`kinds` unset.
    objects: Classified,
}

/// A query level (SELECT/INSERT/UPDATE/DELETE/MERGE) and the CTEs its WITH defines.
#[derive(Default)]
struct Frame {
    ctes: Vec<String>,
    recursive: bool,
}

/// An enclosing query level; `cte` is set while walking the body of its `cte`-th CTE.
#[derive(Clone, Copy)]
struct Scope {
    frame: usize,
    cte: Option<usize>,
}

/// A `serde::Serializer` that walks a parse tree (see the module docs). Scalars are ignored
/// except while `capturing`, when strings, bools and integers are recorded for the field being
/// read.
struct Scan {
    top: Option<&'static str>,
    nested: KindSet,
    extra: KindSet,
    objects: Classified,
    frames: Vec<Frame>,
    path: Vec<Scope>,
    /// Unqualified relation names seen inside query levels, resolved against CTEs at the end.
    pending: Vec<(String, Vec<Scope>)>,
    /// The struct and field being serialized (the parent of the next struct entered).
    parent: (&'static str, &'static str),
    /// Inside `FOR UPDATE OF name, ...`: those names are FROM items (often aliases), not tables.
    in_locking_clause: u32,
    capturing: bool,
    strings: Vec<String>,
    last_bool: bool,
    last_int: i64,
    /// The struct and field being serialized, ignoring the `Node` wrappers (restored when the
    /// field ends, unlike `parent`).
    field: (&'static str, &'static str),
    /// Lineage: depth inside clauses whose values never reach a row (WHERE, ORDER BY, ...).
    filtering: u32,
    /// Lineage: depth inside RETURNING lists.
    returning: u32,
    /// Set by the `val` of a top-level SELECT target; taken by the next struct that is not a
    /// `Node` wrapper (a bare `ColumnRef` there is attributed by the server's RowDescription).
    bare_pending: bool,
    /// Set while capturing a ColumnRef's fields when one of them is `*`.
    saw_star: bool,
    /// Structs entered so far (whether an optional field held one).
    structs: u64,
}

/// Fields whose values only filter, group or order rows: they never appear in a result row.
const FILTER_FIELDS: &[(&str, &str)] = &[
    ("SelectStmt", "where_clause"),
    ("SelectStmt", "having_clause"),
    ("SelectStmt", "group_clause"),
    ("SelectStmt", "sort_clause"),
    ("SelectStmt", "limit_offset"),
    ("SelectStmt", "limit_count"),
    ("SelectStmt", "distinct_clause"),
    ("JoinExpr", "quals"),
    ("JoinExpr", "using_clause"),
    ("UpdateStmt", "where_clause"),
    ("DeleteStmt", "where_clause"),
    ("MergeStmt", "join_condition"),
    ("OnConflictClause", "where_clause"),
    ("WindowDef", "partition_clause"),
    ("WindowDef", "order_clause"),
];

impl Scan {
    fn run(node: &NodeEnum) -> Scanned {
        let mut scan = Scan {
            top: None,
            nested: KindSet::default(),
            extra: KindSet::default(),
            objects: Classified::default(),
            frames: Vec::new(),
            path: Vec::new(),
            pending: Vec::new(),
            parent: ("", ""),
            in_locking_clause: 0,
            capturing: false,
            strings: Vec::new(),
            last_bool: false,
            last_int: 0,
            field: ("", ""),
            filtering: 0,
            returning: 0,
            bare_pending: false,
            saw_star: false,
            structs: 0,
        };
        // Infallible: no method of `Scan` returns an error.
        let _ = node.serialize(&mut scan);
        scan.resolve_pending();
        Scanned {
            top: scan.top.unwrap_or("unknown node"),
            nested: scan.nested,
            extra: scan.extra,
            objects: scan.objects,
        }
    }

    /// Add the pending relation names that do not name a CTE in scope where they were written.
    fn resolve_pending(&mut self) {
        for (name, scopes) in std::mem::take(&mut self.pending) {
            let is_cte = scopes.iter().any(|scope| {
                self.frames.get(scope.frame).is_some_and(|frame| {
                    frame.ctes.iter().enumerate().any(|(i, cte)| {
                        *cte == name
                            && match scope.cte {
                                None => true,
                                Some(within) => frame.recursive || i < within,
                            }
                    })
                })
            });
            if !is_cte {
                self.objects.tables.insert(name.to_lowercase());
            }
        }
    }

    fn capture_strings<T: ?Sized + Serialize>(&mut self, value: &T) -> Vec<String> {
        let was = std::mem::replace(&mut self.capturing, true);
        let saved = std::mem::take(&mut self.strings);
        let _ = value.serialize(&mut *self);
        self.capturing = was;
        std::mem::replace(&mut self.strings, saved)
    }

    fn capture_string<T: ?Sized + Serialize>(&mut self, value: &T) -> String {
        self.capture_strings(value).concat()
    }

    fn capture_bool<T: ?Sized + Serialize>(&mut self, value: &T) -> bool {
        self.last_bool = false;
        let was = std::mem::replace(&mut self.capturing, true);
        let _ = value.serialize(&mut *self);
        self.capturing = was;
        self.last_bool
    }

    fn capture_int<T: ?Sized + Serialize>(&mut self, value: &T) -> i64 {
        self.last_int = 0;
        let was = std::mem::replace(&mut self.capturing, true);
        let _ = value.serialize(&mut *self);
        self.capturing = was;
        self.last_int
    }

    /// A `RangeVar`. `direct` means it is a statement's own field (the target of
    /// INSERT/UPDATE/DELETE/MERGE, `SELECT INTO`, COPY...), not a FROM item, so never a CTE.
    fn relation(&mut self, [catalog, schema, name]: [String; 3], direct: bool) {
        if name.is_empty() || self.in_locking_clause > 0 {
            return;
        }
        if catalog.is_empty() && schema.is_empty() && !direct && !self.path.is_empty() {
            self.pending.push((name, self.path.clone()));
            return;
        }
        let full: Vec<&str> = [catalog.as_str(), schema.as_str(), name.as_str()]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        self.objects.tables.insert(full.join(".").to_lowercase());
    }

    /// A `ColumnRef` with its name fields; `star` if one field is `*`, `bare` if it is a whole
    /// top-level SELECT target.
    fn column_ref(&mut self, names: &[String], star: bool, bare: bool) {
        if self.filtering > 0 {
            return;
        }
        let returning = self.returning > 0;
        let lineage = &mut self.objects.lineage;
        if star {
            // `SELECT *` / `SELECT c.*` at the top expands to plain columns the server names.
            if !bare {
                if returning {
                    lineage.returning_opaque = true;
                } else {
                    lineage.opaque = true;
                }
            }
            return;
        }
        let Some(last) = names.last() else {
            return;
        };
        let list = if bare {
            &mut lineage.bare_refs
        } else if returning {
            &mut lineage.returning_refs
        } else {
            &mut lineage.refs
        };
        list.push(last.clone());
    }

    /// A function name: called (`FuncCall`), or referenced (trigger functions, `ObjectWithArgs`
    /// in GRANT/DROP/ALTER FUNCTION). `sql_syntax` drops the `pg_catalog.` that SQL-syntax
    /// calls (`EXTRACT(...)`, `TRIM(...)`) get without the user writing it.
    fn function(&mut self, parts: &[String], sql_syntax: bool, called: bool) {
        let mut parts: Vec<String> = parts.iter().map(|p| p.to_lowercase()).collect();
        if sql_syntax && parts.len() == 2 && parts.first().is_some_and(|p| p == "pg_catalog") {
            parts.remove(0);
        }
        let Some(last) = parts.last() else {
            return;
        };
        // ObjectWithArgs also names operators (`DROP OPERATOR +(int, int)`).
        if !last.starts_with(|ch: char| ch.is_alphabetic() || ch == '_') {
            return;
        }
        if dangerous_function(last) {
            self.objects.dangerous.insert(format!("function:{last}"));
        }
        if called {
            match last.as_str() {
                // Sequence writes are not transactional and change state: treat as updates.
                "nextval" | "setval" => {
                    self.extra.insert("update");
                    self.objects.writes = true;
                }
                "pg_notify" => {
                    self.extra.insert("notify");
                    self.objects.writes = true;
                }
                _ => {}
            }
        }
        self.objects.functions.insert(parts.join("."));
    }

    /// An operator used by name (`parts`: `["public", "!!!"]` for `OPERATOR(public.!!!)`).
    fn operator(&mut self, parts: &[String]) {
        if parts.last().is_some_and(|p| !p.is_empty()) {
            self.objects.operators.insert(parts.join("."));
        }
    }
}

/// Column types the parser turns into an integer with a sequence default.
const SERIAL_TYPES: &[&str] = &[
    "serial",
    "serial2",
    "serial4",
    "serial8",
    "smallserial",
    "bigserial",
];

/// Never produced: [`Scan`] has no failure, but `serde` wants an error type.
#[derive(Debug)]
struct ScanError;

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("parse tree walk failed")
    }
}

impl std::error::Error for ScanError {}

impl ser::Error for ScanError {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        ScanError
    }
}

type ScanResult = Result<(), ScanError>;

macro_rules! scan_ints {
    ($($method:ident: $ty:ty),*) => {$(
        fn $method(self, v: $ty) -> ScanResult {
            // Enum fields are i32; wrapping the odd u64 is harmless (never compared).
            self.last_int = v as i64;
            Ok(())
        }
    )*};
}

impl<'a> Serializer for &'a mut Scan {
    type Ok = ();
    type Error = ScanError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = StructScan<'a>;
    type SerializeStructVariant = Self;

    scan_ints!(serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_u8: u8, serialize_u16: u16, serialize_u32: u32, serialize_u64: u64);

    fn serialize_bool(self, v: bool) -> ScanResult {
        self.last_bool = v;
        Ok(())
    }
    fn serialize_f32(self, _v: f32) -> ScanResult {
        Ok(())
    }
    fn serialize_f64(self, _v: f64) -> ScanResult {
        Ok(())
    }
    fn serialize_char(self, _v: char) -> ScanResult {
        Ok(())
    }
    fn serialize_str(self, v: &str) -> ScanResult {
        if self.capturing {
            self.strings.push(v.to_owned());
        }
        Ok(())
    }
    fn serialize_bytes(self, _v: &[u8]) -> ScanResult {
        Ok(())
    }
    fn serialize_none(self) -> ScanResult {
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> ScanResult {
        value.serialize(self)
    }
    fn serialize_unit(self) -> ScanResult {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> ScanResult {
        Ok(())
    }
    fn serialize_unit_variant(self, _n: &'static str, _i: u32, _v: &'static str) -> ScanResult {
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        value: &T,
    ) -> ScanResult {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        value: &T,
    ) -> ScanResult {
        value.serialize(self)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, ScanError> {
        Ok(self)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self, ScanError> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self, ScanError> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, ScanError> {
        Ok(self)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self, ScanError> {
        Ok(self)
    }
    fn serialize_struct(
        self,
        name: &'static str,
        _len: usize,
    ) -> Result<StructScan<'a>, ScanError> {
        Ok(StructScan::enter(self, name))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self, ScanError> {
        Ok(self)
    }
}

impl ser::SerializeSeq for &mut Scan {
    type Ok = ();
    type Error = ScanError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> ScanResult {
        value.serialize(&mut **self)
    }
    fn end(self) -> ScanResult {
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Scan {
    type Ok = ();
    type Error = ScanError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> ScanResult {
        value.serialize(&mut **self)
    }
    fn end(self) -> ScanResult {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Scan {
    type Ok = ();
    type Error = ScanError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> ScanResult {
        value.serialize(&mut **self)
    }
    fn end(self) -> ScanResult {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut Scan {
    type Ok = ();
    type Error = ScanError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> ScanResult {
        value.serialize(&mut **self)
    }
    fn end(self) -> ScanResult {
        Ok(())
    }
}

impl ser::SerializeMap for &mut Scan {
    type Ok = ();
    type Error = ScanError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> ScanResult {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> ScanResult {
        value.serialize(&mut **self)
    }
    fn end(self) -> ScanResult {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Scan {
    type Ok = ();
    type Error = ScanError;
    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        _key: &'static str,
        value: &T,
    ) -> ScanResult {
        value.serialize(&mut **self)
    }
    fn end(self) -> ScanResult {
        Ok(())
    }
}

/// One struct of the tree being walked, with what its fields told so far.
struct StructScan<'a> {
    scan: &'a mut Scan,
    name: &'static str,
    /// Inside a capture: just forward to the scalars.
    passthrough: bool,
    /// RangeVar: catalog, schema, name; and whether it is a direct field (see `Scan::relation`).
    relation: [String; 3],
    direct: bool,
    /// FuncCall / trigger / ObjectWithArgs: the name parts.
    names: Option<Vec<String>>,
    sql_syntax: bool,
    /// WithClause / CommonTableExpr: the `scan.path` index of the query level that owns it.
    owner: Option<usize>,
    /// CommonTableExpr: its index among its WITH's CTEs.
    cte: Option<usize>,
    /// Query levels push a scope, popped at `end`.
    frame: bool,
    /// ColumnRef: its name fields and whether one is `*`.
    column: Option<(Vec<String>, bool)>,
    /// ColumnRef: a whole top-level SELECT target.
    bare: bool,
    /// AExpr: its kind.
    op_kind: i64,
    /// TypeName: the type of a TypeCast.
    cast_type: bool,
}

impl<'a> StructScan<'a> {
    fn enter(scan: &'a mut Scan, name: &'static str) -> Self {
        let mut s = StructScan {
            passthrough: scan.capturing,
            direct: scan.parent.0 != "Node",
            scan,
            name,
            relation: Default::default(),
            names: None,
            sql_syntax: false,
            owner: None,
            cte: None,
            frame: false,
            column: None,
            bare: false,
            op_kind: 0,
            cast_type: false,
        };
        s.scan.structs += 1;
        if s.passthrough {
            if name == "AStar" {
                s.scan.saw_star = true;
            }
            return s;
        }
        if name == "ResTarget" {
            // A target of the top SELECT (`field` skips the `Node` wrappers).
            s.scan.bare_pending = false;
            s.bare = s.scan.field == ("SelectStmt", "target_list");
        } else if name != "Node" {
            s.bare = std::mem::take(&mut s.scan.bare_pending);
        }
        let top = s.scan.top.is_none();
        if top {
            s.scan.top = Some(name);
        } else if name != "SelectStmt" && name != "VariableSetStmt" {
            // Nested SELECTs only read (VALUES of an INSERT, subqueries); nested SETs are values
            // (ALTER SYSTEM/ROLE/FUNCTION ... SET); other nested statements run (CTEs, CREATE
            // SCHEMA's elements) or may run later (rule actions, SQL function bodies).
            if let Some(kind) = struct_kind(name) {
                s.scan.nested.insert(kind);
            }
        }
        match name {
            "IntoClause" => s.scan.nested.insert("create"),
            "LockingClause" => {
                s.scan.extra.insert("lock");
                s.scan.in_locking_clause += 1;
            }
            "WithClause" | "CommonTableExpr" => s.owner = s.scan.path.len().checked_sub(1),
            "TypeName" => {
                s.cast_type = matches!(s.scan.field, ("TypeCast" | "ColumnDef", "type_name"))
            }
            "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                let frame = s.scan.frames.len();
                s.scan.frames.push(Frame::default());
                s.scan.path.push(Scope { frame, cte: None });
                s.frame = true;
            }
            _ => {}
        }
        s
    }

    /// The frame owning this WithClause / CommonTableExpr.
    fn owner_frame(&mut self) -> Option<&mut Frame> {
        let scope = *self.scan.path.get(self.owner?)?;
        self.scan.frames.get_mut(scope.frame)
    }
}

impl ser::SerializeStruct for StructScan<'_> {
    type Ok = ();
    type Error = ScanError;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> ScanResult {
        if self.passthrough {
            return value.serialize(&mut *self.scan);
        }
        self.scan.parent = (self.name, key);
        let saved = self.scan.field;
        if self.name != "Node" {
            self.scan.field = (self.name, key);
        }
        let filter = FILTER_FIELDS.contains(&(self.name, key));
        let returning = key == "returning_clause";
        self.scan.filtering += u32::from(filter);
        self.scan.returning += u32::from(returning);
        let r = self.field(key, value);
        self.scan.filtering -= u32::from(filter);
        self.scan.returning -= u32::from(returning);
        self.scan.field = saved;
        r
    }

    fn end(self) -> ScanResult {
        self.finish()
    }
}

impl StructScan<'_> {
    fn field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> ScanResult {
        match (self.name, key) {
            ("ColumnRef", "fields") => {
                self.scan.saw_star = false;
                let names = self.scan.capture_strings(value);
                let star = std::mem::take(&mut self.scan.saw_star);
                self.column = Some((names, star));
            }
            ("Alias", "colnames") | ("CommonTableExpr", "aliascolnames") => {
                // Column alias lists rename columns, so names no longer say where values
                // came from.
                if !self.scan.capture_strings(value).is_empty() && self.scan.filtering == 0 {
                    if self.scan.returning > 0 {
                        self.scan.objects.lineage.returning_opaque = true;
                    } else {
                        self.scan.objects.lineage.opaque = true;
                    }
                }
            }
            ("ResTarget", "val") => {
                let top_target =
                    self.scan.top == Some("SelectStmt") && self.scan.path.len() == 1 && self.bare;
                self.scan.bare_pending = top_target;
                value.serialize(&mut *self.scan)?;
                self.scan.bare_pending = false;
            }
            ("RangeVar", "catalogname") => self.relation[0] = self.scan.capture_string(value),
            ("RangeVar", "schemaname") => self.relation[1] = self.scan.capture_string(value),
            ("RangeVar", "relname") => self.relation[2] = self.scan.capture_string(value),
            ("FuncCall" | "CreateTrigStmt" | "CreateEventTrigStmt", "funcname")
            | ("ObjectWithArgs", "objname")
            | ("AExpr", "name")
            | ("TypeName", "names") => {
                self.names = Some(self.scan.capture_strings(value));
            }
            ("AExpr", "kind") | ("SubLink", "sub_link_type") => {
                self.op_kind = self.scan.capture_int(value);
            }
            ("SortBy", "use_op") | ("SubLink", "oper_name") => {
                let mut names = self.scan.capture_strings(value);
                if names.is_empty()
                    && self.name == "SubLink"
                    && self.op_kind == SubLinkType::AnySublink as i64
                {
                    // `x IN (SELECT ...)` is `x = ANY (SELECT ...)`.
                    names.push("=".into());
                }
                self.scan.operator(&names);
            }
            ("CaseExpr", "arg") => {
                // `CASE x WHEN y` compares with `=`.
                let before = self.scan.structs;
                value.serialize(&mut *self.scan)?;
                if self.scan.structs > before {
                    self.scan.operator(&["=".to_string()]);
                }
            }
            ("JoinExpr", "is_natural") => {
                if self.scan.capture_bool(value) {
                    self.scan.operator(&["=".to_string()]);
                }
            }
            ("JoinExpr", "using_clause") => {
                if !self.scan.capture_strings(value).is_empty() {
                    self.scan.operator(&["=".to_string()]);
                }
            }
            ("FuncCall", "funcformat") => {
                self.sql_syntax =
                    self.scan.capture_int(value) == CoercionForm::CoerceSqlSyntax as i64;
            }
            ("CommonTableExpr", "ctename") => {
                let name = self.scan.capture_string(value);
                if let Some(frame) = self.owner_frame() {
                    let index = frame.ctes.len();
                    frame.ctes.push(name);
                    self.cte = Some(index);
                }
            }
            ("CommonTableExpr", "ctequery") => {
                let scope = self.owner.and_then(|p| self.scan.path.get_mut(p));
                match (scope, self.cte) {
                    (Some(scope), Some(index)) => {
                        scope.cte = Some(index);
                        value.serialize(&mut *self.scan)?;
                        if let Some(scope) = self.owner.and_then(|p| self.scan.path.get_mut(p)) {
                            scope.cte = None;
                        }
                    }
                    _ => value.serialize(&mut *self.scan)?,
                }
            }
            ("WithClause", "recursive") => {
                let recursive = self.scan.capture_bool(value);
                if let Some(frame) = self.owner_frame() {
                    frame.recursive = recursive;
                }
            }
            ("OnConflictClause", "action") => {
                if self.scan.capture_int(value) == OnConflictAction::OnconflictUpdate as i64 {
                    self.scan.extra.insert("update");
                }
            }
            ("MergeWhenClause", "command_type") => {
                let command = i32::try_from(self.scan.capture_int(value)).unwrap_or(0);
                match CmdType::try_from(command) {
                    Ok(CmdType::CmdUpdate) => self.scan.extra.insert("update"),
                    Ok(CmdType::CmdInsert) => self.scan.extra.insert("insert"),
                    Ok(CmdType::CmdDelete) => self.scan.extra.insert("delete"),
                    _ => {}
                }
            }
            _ => value.serialize(&mut *self.scan)?,
        }
        Ok(())
    }

    fn finish(self) -> ScanResult {
        if self.passthrough {
            return Ok(());
        }
        match self.name {
            "RangeVar" => self.scan.relation(self.relation, self.direct),
            "ColumnRef" => {
                if let Some((names, star)) = &self.column {
                    self.scan.column_ref(names, *star, self.bare);
                }
            }
            "FuncCall" | "CreateTrigStmt" | "CreateEventTrigStmt" | "ObjectWithArgs" => {
                if let Some(names) = &self.names {
                    self.scan
                        .function(names, self.sql_syntax, self.name == "FuncCall");
                }
            }
            "AExpr" => {
                let between = [
                    AExprKind::AexprBetween,
                    AExprKind::AexprNotBetween,
                    AExprKind::AexprBetweenSym,
                    AExprKind::AexprNotBetweenSym,
                ];
                if between.iter().any(|k| *k as i64 == self.op_kind) {
                    // Its name is `BETWEEN`: it compares with these.
                    for op in [">=", "<=", "<", ">"] {
                        self.scan.operator(&[op.to_string()]);
                    }
                } else if let Some(names) = &self.names {
                    self.scan.operator(names);
                }
            }
            "TypeName" if self.cast_type => {
                if let Some(names) = &self.names {
                    let name: Vec<String> = names.iter().map(|p| p.to_lowercase()).collect();
                    // `serial` & co. are no types: an integer with a sequence default.
                    let serial = name.len() == 1
                        && SERIAL_TYPES.contains(&name[0].as_str())
                        && self.scan.field.0 == "ColumnDef";
                    if !serial && name.last().is_some_and(|n| !n.is_empty()) {
                        self.scan.objects.casts.insert(name.join("."));
                    }
                }
            }
            _ => {}
        }
        if self.frame {
            self.scan.path.pop();
        }
        if self.name == "LockingClause" {
            self.scan.in_locking_clause = self.scan.in_locking_clause.saturating_sub(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
