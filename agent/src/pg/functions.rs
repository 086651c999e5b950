//! Which functions a `sql` rule may let run without naming them: functions are allowed by
//! list, not caught by a deny list of known-bad names.
//!
//! A function is *plain* when PostgreSQL's own catalog says it is built in (an OID below
//! `FirstNormalObjectId`, 16384) and cannot change anything (`provolatile` immutable or stable,
//! or one of the few volatile built-ins that only read the clock or a random source), and it is
//! not one of the built-ins that run SQL text or reach outside the database
//! ([`crate::pg::classify::dangerous_function`]). Everything else (user-defined functions,
//! extension functions, volatile built-ins such as `txid_current`, `pg_advisory_lock`,
//! `pg_logical_emit_message`, `nextval`) must be named by the deciding rule's `functions`.
//!
//! An unqualified name is plain only if every function of that name, in every schema, is: the
//! session's `search_path` (which a client can change) decides which one a call reaches, so a
//! `public.lower` shadows nothing. The snapshot is read on the upstream connection at login and
//! cached 30 s per (target, database) like the masking catalog; a statement that names a
//! function the snapshot does not have (or a fast-path call of an unknown OID) makes the session
//! re-read it in band before deciding (`handler.rs`), so a function created since is judged by
//! what it is. (A shadowing function of a name the snapshot already has, created by someone
//! else, may still pass for up to 30 s: see the README's security notes.)
//!
//! # Functions that run without being named
//! A statement can run a function it never names. The snapshot also maps operator names and
//! type names to the functions behind them that are not plain, and the handler counts those as
//! called (`Functions::behind`), so the rule's `functions` must name them like any other:
//! - **Operators** (`SELECT 1 !!! 2` after `CREATE OPERATOR !!! (FUNCTION = evil, ...)`), also
//!   written `OPERATOR(public.!!!)`, as `= ANY/ALL (...)`, in `ORDER BY x USING !!!`, in
//!   sublinks, and the operators the parser picks by name: `=` of `IN`, `IS [NOT] DISTINCT
//!   FROM`, `NULLIF`, `CASE x WHEN`, `JOIN ... USING`/`NATURAL JOIN`; `~~` of `LIKE`; `>=`,
//!   `<=`, `<`, `>` of `BETWEEN` ([`crate::pg::classify::Statement::operators`]). An unqualified
//!   name stands for every operator of that name in every schema, whatever its argument types:
//!   a user `+` on its own types (or on `int, int` in `public`, reached by changing
//!   `search_path`) makes every `+` need its function named.
//! - **Casts** (`1::evil_t`, `CAST(1 AS evil_t)`, `evil_t '1'`, `'{1}'::evil_t[]`): every
//!   function of a `pg_cast` to the type, the type's input/output/receive/send/typmod
//!   functions, the functions its domain CHECK constraints call (`pg_depend`), the support
//!   functions and operators of its default operator classes (what sorting, grouping and
//!   hashing the type run; a non-default class runs only where an index names it, see below),
//!   and all of those of the types it holds:
//!   a domain's base type, an array's element, a composite type's columns, a range's subtype
//!   ([`crate::pg::classify::Statement::casts`]).
//! - **Parameters** whose type a Parse message fixes by OID (`SELECT $1` with `$1` a domain):
//!   the type's functions run at Bind ([`Functions::behind_type_oids`]); an OID the snapshot
//!   does not have stands for itself.
//! - **Columns**: a table's (view's, ...) row type is a composite type of its name, so the
//!   same functions of its columns' types count as called by any statement that touches the
//!   relation (`SELECT * FROM t` runs a column type's output function, `ORDER BY` its btree
//!   support function, `INSERT` a cast to it, a domain column its CHECK).
//!
//! Built-in operators, casts and types (plain functions) cost nothing, and neither do the
//! functions an extension installed that are not volatile (`citext`'s `=` and I/O, `vector`'s,
//! `geometry`'s): a database with such an extension keeps working under a select-only rule,
//! while a call of such a function by name still needs naming as before. An operator or cast name
//! the snapshot does not have makes the session re-read it in band (as for functions); still
//! unknown, the name stands for itself (only a rule naming it lets the statement run). An
//! unknown relation adds nothing (the masking catalog and the server decide about it).
//! CREATE/ALTER OPERATOR, TYPE, DOMAIN, CAST, renames and schema moves the session runs mark its
//! snapshot stale.
//!
//! Still open:
//! - Functions reached through a function's result type (`SELECT f()` of a plain built-in
//!   returning a user type) or a relation only a function or view body names.
//! - An operator, cast or type created by another session with a name the snapshot already has
//!   (a shadowing `public.+`, a new cast to `int4`), or a column added by another session to a
//!   known table, passes for up to 30 s, as for functions.
//! - Support functions of a non-default operator class run when a table with an index using
//!   the class is written: they are not counted (creating an operator class takes a superuser).
//! - `tollgate policy explain`/`policy test` decide without a catalog, so they do not add these.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io,
    sync::Arc,
};

use bytes::BytesMut;

use crate::pg::{catalog::Snapshots, classify::dangerous_function, upstream::Session, wire};

/// Volatile built-ins that only read the clock or a random source, or wait.
const VOLATILE_PLAIN: &[&str] = &[
    "clock_timestamp",
    "gen_random_uuid",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "random",
    "random_normal",
    "timeofday",
];

/// Built-ins marked stable that still change state: they assign the transaction an ID (a
/// write to the commit log that a read-only transaction never makes).
const STABLE_WRITERS: &[&str] = &["pg_current_xact_id", "txid_current"];

/// PostgreSQL's `FirstNormalObjectId`: OIDs below it were made by initdb.
const FIRST_NORMAL_OID: u32 = 16384;

/// Plain function names of one database (see the module docs), and every function by OID (for
/// fast-path calls, which name the function by OID only).
#[derive(Debug, Default)]
pub struct Functions {
    /// Unqualified names all of whose functions are plain.
    plain: HashSet<String>,
    /// `schema.name` whose functions are all plain.
    plain_qualified: HashSet<String>,
    /// Every function of the snapshot by OID.
    by_oid: HashMap<u32, Function>,
    /// Every name of the snapshot, bare and `schema.name`.
    names: HashSet<String>,
    /// OIDs of the functions that are not plain.
    not_plain: HashSet<u32>,
    /// Operator names, bare and `schema.name`, with the functions behind them that are not
    /// plain (`schema.name`), of any operator of that name (any argument types).
    operators: HashMap<String, BTreeSet<String>>,
    /// Type names, lowercased, bare and `schema.name`, with the functions that are not plain
    /// that a cast to the type or a value of it may run: its input, output, receive, send and
    /// typmod functions, the cast functions to it, the functions its domain CHECK constraints
    /// call, and those of the types a domain is over.
    types: HashMap<String, BTreeSet<String>>,
    /// Every type by OID, with the same functions (as a Parse message names a parameter's
    /// type).
    type_oids: HashMap<u32, BTreeSet<String>>,
}

/// What a row of the catalog query other than a function's describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// An operator and its function (`pg_operator.oprcode`; 0: none).
    Operator {
        schema: String,
        name: String,
        function: u32,
    },
    /// A type's name.
    Type {
        schema: String,
        name: String,
        oid: u32,
    },
    /// A function a value of the type or a cast to it may run: its I/O and typmod functions,
    /// a cast to it, a domain CHECK, a support function or operator of its default operator
    /// classes (sorting, hashing).
    Runs { ty: u32, function: u32 },
    /// A type that holds values of another: a domain its base type, an array its element, a
    /// composite type (a table's row type) its columns' types, a range its subtype.
    Holds { whole: u32, part: u32 },
    /// A function an extension installed that is not volatile: an extension's types (`citext`,
    /// `vector`, `geometry`) and operators run such functions without counting as called.
    Extension { function: u32 },
}

/// One function of the catalog snapshot, as a fast-path call names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// Its schema (`pg_catalog`).
    pub schema: String,
    /// Its name (`lo_open`).
    pub name: String,
    /// The OID of its result type (`prorettype`).
    pub result_type: u32,
}

impl Functions {
    /// From catalog rows `(schema, name, oid, provolatile)` (result types unknown: 0).
    pub fn from_rows<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, u32, &'a str)>) -> Self {
        Self::from_catalog(rows.into_iter().map(|(s, n, o, v)| (s, n, o, v, 0)))
    }

    /// From catalog rows `(schema, name, oid, provolatile, prorettype)`.
    pub fn from_catalog<'a>(
        rows: impl IntoIterator<Item = (&'a str, &'a str, u32, &'a str, u32)>,
    ) -> Self {
        // name -> all plain so far
        let mut bare: HashMap<String, bool> = HashMap::new();
        let mut qualified: HashMap<String, bool> = HashMap::new();
        let mut by_oid = HashMap::new();
        let mut names = HashSet::new();
        let mut not_plain = HashSet::new();
        for (schema, name, oid, volatility, result_type) in rows {
            names.insert(name.to_string());
            names.insert(format!("{schema}.{name}"));
            by_oid.insert(
                oid,
                Function {
                    schema: schema.to_string(),
                    name: name.to_string(),
                    result_type,
                },
            );
            let plain = oid < FIRST_NORMAL_OID
                && (volatility != "v" || VOLATILE_PLAIN.contains(&name))
                && !STABLE_WRITERS.contains(&name)
                && !dangerous_function(name);
            if !plain {
                not_plain.insert(oid);
            }
            *bare.entry(name.to_string()).or_insert(true) &= plain;
            *qualified.entry(format!("{schema}.{name}")).or_insert(true) &= plain;
        }
        let keep =
            |m: HashMap<String, bool>| m.into_iter().filter(|(_, p)| *p).map(|(n, _)| n).collect();
        Functions {
            plain: keep(bare),
            plain_qualified: keep(qualified),
            by_oid,
            names,
            not_plain,
            operators: HashMap::new(),
            types: HashMap::new(),
            type_oids: HashMap::new(),
        }
    }

    /// Add the catalog rows of operators and types (after the functions: a function is judged
    /// by its OID). What a type may run is handed up to every type that holds it, transitively.
    pub fn link(&mut self, rows: impl IntoIterator<Item = Link>) {
        let mut extension = HashSet::new();
        let mut operators = Vec::new();
        let mut types = Vec::new();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let mut holders: HashMap<u32, Vec<u32>> = HashMap::new();
        for row in rows {
            match row {
                Link::Operator {
                    schema,
                    name,
                    function,
                } => operators.push((schema, name, function)),
                Link::Type { schema, name, oid } => types.push((schema, name, oid)),
                Link::Runs { ty, function } => runs.push((ty, function)),
                Link::Holds { whole, part } => holders.entry(part).or_default().push(whole),
                Link::Extension { function } => {
                    extension.insert(function);
                }
            }
        }
        let counts =
            |oid: u32| oid != 0 && self.not_plain.contains(&oid) && !extension.contains(&oid);
        // type OID -> function OIDs, walked up through the types that hold it.
        let mut behind: HashMap<u32, BTreeSet<u32>> = HashMap::new();
        let mut todo: Vec<(u32, u32)> = runs.into_iter().filter(|(_, f)| counts(*f)).collect();
        while let Some((ty, f)) = todo.pop() {
            if behind.entry(ty).or_default().insert(f) {
                for whole in holders.get(&ty).into_iter().flatten() {
                    todo.push((*whole, f));
                }
            }
        }
        let name_of = |oid: u32| {
            self.by_oid
                .get(&oid)
                .map_or_else(|| oid.to_string(), |f| format!("{}.{}", f.schema, f.name))
        };
        let add = |map: &mut HashMap<String, BTreeSet<String>>,
                   schema: &str,
                   name: String,
                   functions: &mut dyn Iterator<Item = u32>| {
            let functions: Vec<String> = functions.map(name_of).collect();
            for key in [format!("{}.{name}", schema.to_lowercase()), name] {
                map.entry(key)
                    .or_default()
                    .extend(functions.iter().cloned());
            }
        };
        let mut ops = HashMap::new();
        for (schema, name, function) in operators {
            let mut f = Some(function).into_iter().filter(|f| counts(*f));
            add(&mut ops, &schema, name, &mut f);
        }
        let mut tys = HashMap::new();
        let mut by_oid = HashMap::new();
        for (schema, name, oid) in types {
            // Matched case-insensitively: a quoted `"Money"` and `money` both count.
            let mut f = behind.get(&oid).into_iter().flatten().copied();
            add(&mut tys, &schema, name.to_lowercase(), &mut f);
            let f = behind.get(&oid).into_iter().flatten().copied().map(name_of);
            by_oid.insert(oid, f.collect());
        }
        self.operators = ops;
        self.types = tys;
        self.type_oids = by_oid;
    }

    /// Whether the snapshot has an operator called `name` (as in `Statement::operators`).
    pub fn knows_operator(&self, name: &str) -> bool {
        self.operators.contains_key(last_two(name))
    }

    /// Whether the snapshot has a type called `name` (as in `Statement::casts`).
    pub fn knows_type(&self, name: &str) -> bool {
        self.types.contains_key(lower(last_two(name)).as_ref())
    }

    /// The functions that are not plain that reading or writing rows of `relations` (as in
    /// `Statement::tables`) may run: those of the types of their columns (a table's row type
    /// has the table's name). A name the snapshot does not have adds nothing (a relation made
    /// since, or not a relation).
    pub fn behind_relations(&self, relations: &[String]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for name in relations {
            if let Some(behind) = self.types.get(lower(last_two(name)).as_ref()) {
                out.extend(behind.iter().cloned());
            }
        }
        out
    }

    /// The functions that are not plain behind the `operators` and cast target `types` a
    /// statement uses (see the module docs), sorted: every function of every operator of each
    /// name (any schema unless qualified, any argument types), and every function a cast to
    /// each type or a value of it may run. A name the snapshot does not have stands for itself
    /// (fail closed: only a rule that names it lets it run).
    pub fn behind(&self, operators: &[String], types: &[String]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (map, names, fold) in [
            (&self.operators, operators, false),
            (&self.types, types, true),
        ] {
            for name in names {
                let key = last_two(name);
                let found = if fold {
                    map.get(lower(key).as_ref())
                } else {
                    map.get(key)
                };
                match found {
                    Some(behind) => out.extend(behind.iter().cloned()),
                    None => {
                        out.insert(name.clone());
                    }
                }
            }
        }
        out
    }

    /// The functions that are not plain that the input (text or binary) of parameters of these
    /// types runs, as a Parse message fixes them by OID (0: the server infers it from the
    /// statement, whose names count already). An OID the snapshot does not have stands for
    /// itself (`type 16999`): fail closed.
    pub fn behind_type_oids(&self, oids: &[u32]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for &oid in oids.iter().filter(|o| **o != 0) {
            match self.type_oids.get(&oid) {
                Some(f) => out.extend(f.iter().cloned()),
                None => {
                    out.insert(format!("type {oid}"));
                }
            }
        }
        out
    }

    /// The function with `oid`, if the snapshot has it.
    pub fn by_oid(&self, oid: u32) -> Option<&Function> {
        self.by_oid.get(&oid)
    }

    /// Whether the snapshot has a function called `name` (as in `Statement::functions`): one it
    /// does not have may have been created since it was read (the session then refreshes it).
    pub fn knows(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('.').collect();
        match parts.as_slice() {
            [one] => self.names.contains(*one),
            [.., schema, fname] => self.names.contains(&format!("{schema}.{fname}")),
            [] => false,
        }
    }

    /// Whether `name` (as in `Statement::functions`: lowercase, schema-qualified when written
    /// so, possibly with a database part) may run under a rule that does not name it.
    pub fn is_plain(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('.').collect();
        match parts.as_slice() {
            [one] => self.plain.contains(*one),
            [.., schema, fname] => self.plain_qualified.contains(&format!("{schema}.{fname}")),
            [] => false,
        }
    }
}

/// `name` lowercased, without allocating when it already is (the classifier folds unquoted
/// names: every statement's relations and casts are looked up here).
fn lower(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) || !name.is_ascii() {
        std::borrow::Cow::Owned(name.to_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// `name` without a database part: `db.schema.name` is `schema.name`.
fn last_two(name: &str) -> &str {
    match name.rmatch_indices('.').nth(1) {
        Some((at, _)) => &name[at + 1..],
        None => name,
    }
}

/// Rows `(tag, schema, name, oid, volatility, oid)`: `f` functions (OID, volatility, result
/// type); `x` the functions extensions installed that are not volatile; `o` operators and their
/// function; `t` every type with its OID; `r` a type and a function a value of it or a cast to it
/// may run (I/O and typmod functions, casts to it, domain CHECK functions through `pg_depend`,
/// the support functions and operators of its default operator classes, which sorting and
/// hashing use), narrowed to user and volatile functions outside extensions (the Rust side
/// judges); `h` which type holds which (a domain its base, an array its element, a table's or
/// composite type's row its columns' types, a range its subtype), sent only when some `r` row
/// is: the walk up is done in Rust ([`Functions::link`]). No recursion: a recursive query's
/// cost estimate made the server JIT-compile it, 90 ms to 900 ms per read. A fresh
/// PostgreSQL 15 database: 3245 + 799 + 611 rows, about 4 ms.
const QUERY: &str = "WITH ext(f) AS (\
       SELECT d.objid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p ON p.oid = d.objid \
       WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass \
         AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass \
         AND d.deptype = 'e' AND p.provolatile <> 'v'), \
     runs(ty, f) AS (\
       SELECT ty.oid, f.f FROM pg_catalog.pg_type ty, \
         unnest(ARRAY[ty.typinput::oid, ty.typoutput::oid, ty.typreceive::oid, \
           ty.typsend::oid, ty.typmodin::oid, ty.typmodout::oid]) f(f) \
       UNION ALL SELECT k.casttarget, k.castfunc FROM pg_catalog.pg_cast k \
       UNION ALL SELECT k.contypid, d.refobjid FROM pg_catalog.pg_constraint k \
         JOIN pg_catalog.pg_depend d \
           ON d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass \
           AND d.objid = k.oid AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass \
         WHERE k.contypid <> 0 \
       UNION ALL SELECT c.opcintype, a.amproc::oid FROM pg_catalog.pg_opclass c \
         JOIN pg_catalog.pg_amproc a ON a.amprocfamily = c.opcfamily \
           AND a.amproclefttype = c.opcintype AND a.amprocrighttype = c.opcintype \
         WHERE c.opcdefault \
       UNION ALL SELECT c.opcintype, o.oprcode::oid FROM pg_catalog.pg_opclass c \
         JOIN pg_catalog.pg_amop a ON a.amopfamily = c.opcfamily \
           AND a.amoplefttype = c.opcintype AND a.amoprighttype = c.opcintype \
         JOIN pg_catalog.pg_operator o ON o.oid = a.amopopr \
         WHERE c.opcdefault), \
     counted(ty, f) AS (\
       SELECT DISTINCT r.ty, r.f FROM runs r JOIN pg_catalog.pg_proc p ON p.oid = r.f \
       WHERE (p.oid >= 16384 OR p.provolatile = 'v') AND p.oid NOT IN (SELECT f FROM ext)) \
     SELECT 'f', n.nspname, p.proname, p.oid::int8, p.provolatile::text, p.prorettype::int8 \
     FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
     UNION ALL SELECT 'x', '', '', f::int8, '', 0 FROM ext \
     UNION ALL SELECT 'o', n.nspname, o.oprname, o.oprcode::oid::int8, '', 0 \
     FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
     UNION ALL SELECT 't', n.nspname, ty.typname, ty.oid::int8, '', 0 \
     FROM pg_catalog.pg_type ty JOIN pg_catalog.pg_namespace n ON n.oid = ty.typnamespace \
     UNION ALL SELECT 'r', '', '', ty::int8, '', f::int8 FROM counted \
     UNION ALL SELECT 'h', '', '', h.whole::int8, '', h.part::int8 FROM (\
         SELECT oid AS whole, typbasetype AS part FROM pg_catalog.pg_type WHERE typtype = 'd' \
         UNION ALL SELECT oid, typelem FROM pg_catalog.pg_type WHERE typelem <> 0 \
         UNION ALL SELECT c.reltype, a.atttypid FROM pg_catalog.pg_attribute a \
           JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
           WHERE a.attnum > 0 AND NOT a.attisdropped AND c.reltype <> 0 \
         UNION ALL SELECT rngtypid, rngsubtype FROM pg_catalog.pg_range \
         UNION ALL SELECT rngmultitypid, rngtypid FROM pg_catalog.pg_range) h \
     WHERE EXISTS (SELECT 1 FROM counted)";

/// The plain functions of `database` on `target`, from the cache or the server.
pub async fn load(
    cache: &Snapshots<Functions>,
    s: &mut Session,
    target: &str,
    database: &str,
) -> io::Result<Arc<Functions>> {
    if let Some(f) = cache.fresh(target, database) {
        return Ok(f);
    }
    let mut out = BytesMut::new();
    query(&mut out)?;
    let mut reader = Reader::default();
    let f = Arc::new(
        crate::pg::upstream::query_until(s, &out, "function catalog query", |tag, raw| {
            reader.feed(tag, raw)
        })
        .await?,
    );
    cache.remember(target, database, f.clone());
    Ok(f)
}

/// The function catalog query as a Query message.
pub fn query(out: &mut BytesMut) -> io::Result<()> {
    postgres_protocol::message::frontend::query(QUERY, out)
}

/// Reads the answer to [`query`] one backend message at a time (login and in-band refresh).
#[derive(Default)]
pub struct Reader {
    rows: Vec<(String, String, u32, String, u32)>,
    links: Vec<Link>,
    failed: Option<String>,
}

impl Reader {
    /// Take one message of the answer; at its ReadyForQuery, the snapshot or the server's error.
    pub fn feed(&mut self, tag: u8, raw: &[u8]) -> Option<io::Result<Functions>> {
        match tag {
            b'D' => match wire::data_row_values(raw) {
                Ok(v) => {
                    let text = |i: usize| {
                        v.get(i)
                            .copied()
                            .flatten()
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                    };
                    let row = (
                        text(1),
                        text(2),
                        text(3).map(|o| o.parse::<u32>()),
                        text(4),
                        text(5).map(|o| o.parse::<u32>()),
                    );
                    if let (Some(schema), Some(name), Some(Ok(oid)), Some(vol), Some(Ok(ret))) = row
                    {
                        let link = match text(0).as_deref() {
                            Some("f") => {
                                self.rows.push((schema, name, oid, vol, ret));
                                None
                            }
                            Some("o") => Some(Link::Operator {
                                schema,
                                name,
                                function: oid,
                            }),
                            Some("t") => Some(Link::Type { schema, name, oid }),
                            Some("r") => Some(Link::Runs {
                                ty: oid,
                                function: ret,
                            }),
                            Some("h") => Some(Link::Holds {
                                whole: oid,
                                part: ret,
                            }),
                            Some("x") => Some(Link::Extension { function: oid }),
                            _ => None,
                        };
                        self.links.extend(link);
                    }
                }
                Err(e) => {
                    self.failed.get_or_insert(e.to_string());
                }
            },
            b'E' => {
                let m = wire::decode_error_notice(raw)
                    .ok()
                    .and_then(|en| en.message().map(str::to_string))
                    .unwrap_or_else(|| "?".into());
                self.failed.get_or_insert(m);
            }
            b'Z' => {
                if let Some(m) = self.failed.take() {
                    return Some(Err(io::Error::other(format!(
                        "function catalog query failed: {m}"
                    ))));
                }
                let rows = std::mem::take(&mut self.rows);
                let mut f = Functions::from_catalog(
                    rows.iter()
                        .map(|(s, n, o, v, r)| (s.as_str(), n.as_str(), *o, v.as_str(), *r)),
                );
                f.link(std::mem::take(&mut self.links));
                return Some(Ok(f));
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_means_built_in_unchanging_and_never_running_sql() {
        let f = Functions::from_rows([
            ("pg_catalog", "lower", 870, "i"),
            ("pg_catalog", "now", 1299, "s"),
            ("pg_catalog", "random", 1598, "v"),
            ("pg_catalog", "txid_current", 2943, "s"),
            ("pg_catalog", "pg_advisory_lock", 2880, "v"),
            ("pg_catalog", "ts_rewrite", 3684, "i"),
            ("pg_catalog", "query_to_xml", 2924, "s"),
            ("pg_catalog", "upper", 871, "i"),
            ("public", "upper", 16500, "i"),
            ("public", "wipe", 16501, "v"),
            ("app", "report", 16502, "s"),
        ]);
        for plain in [
            "lower",
            "now",
            "random",
            "pg_catalog.lower",
            "pg_catalog.upper",
        ] {
            assert!(f.is_plain(plain), "{plain}");
        }
        for not in [
            "txid_current",
            "pg_advisory_lock",
            "ts_rewrite",
            "pg_catalog.ts_rewrite",
            "query_to_xml",
            // A user function of the same name shadows the built-in through search_path.
            "upper",
            "public.upper",
            "wipe",
            "app.report",
            "report",
            "never_seen",
            "db.pg_catalog.ts_rewrite",
        ] {
            assert!(!f.is_plain(not), "{not}");
        }
        assert!(f.is_plain("db.pg_catalog.lower"));
        // Known (plain or not) vs created since the snapshot (re-read before deciding).
        assert!(f.knows("wipe") && f.knows("app.report") && f.knows("pg_catalog.lower"));
        assert!(!f.knows("never_seen") && !f.knows("public.report"));
        assert_eq!(
            f.by_oid(16501)
                .map(|f| (f.schema.as_str(), f.name.as_str())),
            Some(("public", "wipe"))
        );
        assert_eq!(f.by_oid(1), None);
    }

    #[test]
    fn operators_and_types_stand_for_their_functions_that_are_not_plain() {
        let mut f = Functions::from_rows([
            ("pg_catalog", "int4pl", 177, "i"),
            ("pg_catalog", "textcat", 1258, "i"),
            ("public", "evil", 16400, "v"),
            ("public", "evil_in", 16401, "i"),
            ("public", "tidy", 16402, "i"),
            ("app", "check_it", 16403, "s"),
            ("public", "citext_eq", 16404, "i"),
            ("public", "citextin", 16405, "i"),
        ]);
        let op = |schema: &str, name: &str, function| Link::Operator {
            schema: schema.into(),
            name: name.into(),
            function,
        };
        let ty = |schema: &str, name: &str, oid| Link::Type {
            schema: schema.into(),
            name: name.into(),
            oid,
        };
        let runs = |ty, function| Link::Runs { ty, function };
        let holds = |whole, part| Link::Holds { whole, part };
        f.link([
            op("pg_catalog", "+", 177),
            op("pg_catalog", "||", 1258),
            op("public", "!!!", 16400),
            // A user `+` on other types: every `+` then needs it named.
            op("public", "+", 16402),
            op("pg_catalog", "-", 0),
            // An extension's `=` (citext's) runs a function that is not volatile: no count.
            op("public", "=", 16404),
            Link::Extension { function: 16404 },
            Link::Extension { function: 16405 },
            ty("pg_catalog", "int4", 23),
            ty("public", "Evil_T", 17000),
            runs(17000, 16401),
            runs(17000, 16400),
            // Built-in functions that are plain never count.
            runs(23, 177),
            ty("app", "positive", 17001),
            runs(17001, 16403),
            // A domain over `positive`, a table with a column of it, an array of the table's rows.
            ty("app", "positive2", 17002),
            holds(17002, 17001),
            ty("public", "holder", 17003),
            holds(17003, 17002),
            holds(17003, 23),
            ty("public", "_holder", 17004),
            holds(17004, 17003),
            // An extension type's I/O function.
            ty("public", "citext", 17005),
            runs(17005, 16405),
            ty("public", "notes", 17006),
            holds(17006, 17005),
            // A cycle (a composite type holding an array of itself) ends.
            holds(17001, 17004),
        ]);
        let behind = |ops: &[&str], types: &[&str]| -> Vec<String> {
            let s = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            f.behind(&s(ops), &s(types)).into_iter().collect()
        };
        assert!(behind(&["||", "-", "pg_catalog.+"], &["pg_catalog.int4", "int4"]).is_empty());
        assert_eq!(behind(&["!!!"], &[]), ["public.evil"]);
        assert_eq!(
            behind(&["public.!!!", "db.public.!!!"], &[]),
            ["public.evil"]
        );
        assert_eq!(behind(&["+"], &[]), ["public.tidy"]);
        assert_eq!(
            behind(&[], &["evil_t", "public.evil_t", "positive"]),
            ["app.check_it", "public.evil", "public.evil_in"]
        );
        // A table's row type carries its columns' types' functions; unknown relations add none.
        let rel = |v: &[&str]| {
            let v: Vec<String> = v.iter().map(|n| n.to_string()).collect();
            f.behind_relations(&v).into_iter().collect::<Vec<_>>()
        };
        assert_eq!(
            rel(&["holder", "public.holder", "made_since"]),
            ["app.check_it"]
        );
        assert!(rel(&["pg_catalog.int4", "made_since", "notes", "citext"]).is_empty());
        assert_eq!(rel(&["_holder"]), ["app.check_it"]);
        assert!(behind(&["="], &["citext"]).is_empty());
        // Unknown names stand for themselves (fail closed) and are re-read first.
        assert_eq!(behind(&["@@@"], &["other_t"]), ["@@@", "other_t"]);
        assert!(f.knows_operator("!!!") && f.knows_operator("public.+"));
        assert!(!f.knows_operator("@@@") && !f.knows_operator("app.!!!"));
        assert!(f.knows_type("evil_t") && f.knows_type("public.evil_t"));
        assert!(!f.knows_type("other_t") && !f.knows_type("app.evil_t"));
    }
}
