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

use std::{
    collections::{HashMap, HashSet},
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
        }
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

const QUERY: &str =
    "SELECT n.nspname, p.proname, p.oid::int8, p.provolatile::text, p.prorettype::int8 \
     FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace";

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
                    if let (Some(schema), Some(name), Some(Ok(oid)), Some(vol), Some(Ok(ret))) = (
                        text(0),
                        text(1),
                        text(2).map(|o| o.parse::<u32>()),
                        text(3),
                        text(4).map(|o| o.parse::<u32>()),
                    ) {
                        self.rows.push((schema, name, oid, vol, ret));
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
                return Some(Ok(Functions::from_catalog(rows.iter().map(
                    |(s, n, o, v, r)| (s.as_str(), n.as_str(), *o, v.as_str(), *r),
                ))));
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
}
