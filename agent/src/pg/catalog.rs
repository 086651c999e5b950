//! Which result columns a column mask rule covers. RowDescription gives a table OID and an
//! attribute number for plain columns (also behind aliases); the names come from the server's
//! catalog, read once per (target, database) on the freshly logged-in upstream connection
//! before the client's first message, and cached for a short while so connection-per-
//! transaction bots don't pay a catalog round trip each time.
//!
//! The same snapshot keeps, for tables with at least one masked column, their columns in
//! attribute order (generated columns marked), so `COPY table TO STDOUT`, which has no
//! RowDescription, can tell which output positions column rules cover (`copy.rs`).
//!
//! Freshness: a session re-reads the snapshot on its own upstream connection when a statement
//! names a relation the snapshot does not know, or after DDL the session ran, before the
//! statement is decided (`handler.rs`, `ClientSide::refresh`); the answer is read by the same
//! [`Reader`] the login uses.

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::BytesMut;

use crate::{mask::Masker, pg::classify::Lineage, pg::upstream::Session, pg::wire};

/// One column of a table with masked columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// `attname`.
    pub name: String,
    /// Covered by a column rule.
    pub masked: bool,
    /// A generated column (left out of `COPY table` without a column list).
    pub generated: bool,
}

/// A table (or other relation) by schema.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Relation {
    /// `nspname`.
    pub schema: String,
    /// Non-dropped columns in attnum order; empty when none of them is masked (then the names
    /// are not kept).
    pub columns: Vec<Column>,
}

/// What column rules cover on one database.
#[derive(Debug, Default)]
pub struct Catalog {
    /// (table OID, attribute number) of every masked column, for RowDescription fields.
    pub masked: HashSet<(u32, i16)>,
    /// The columns of views derived from masked columns (masked as computed values, see
    /// `Masker::mask_derived`), also in `masked`.
    pub derived: HashSet<(u32, i16)>,
    /// OIDs of relations with a masked column: a whole-row reference to one of them (attribute
    /// number 0 in RowDescription) carries masked values.
    pub masked_oids: HashSet<u32>,
    /// Relations by name (several schemas may have one of the same name).
    by_name: HashMap<String, Vec<Relation>>,
    /// Names of masked columns, in any relation.
    masked_names: HashSet<String>,
    /// Names of every column of a relation with a masked column.
    known_names: HashSet<String>,
    /// Bare names of relations with a masked column (views derived from one included).
    masked_relations: HashSet<String>,
    /// Bare names of views whose every column is masked (their definition derives a value from
    /// a masked column): anything computed from them is masked too.
    opaque_relations: HashSet<String>,
    /// Bare names of the system relations (`pg_catalog`, `information_schema`), lowercased.
    system: HashSet<String>,
    /// Bare names of every user relation, lowercased.
    names: HashSet<String>,
}

/// Where masked values may flow in one statement (see [`Catalog::taint`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Taint {
    /// A computed result column (one the server's RowDescription does not name a table column
    /// for) may carry a masked value: such columns are masked.
    pub output: bool,
    /// A written row (INSERT, UPDATE SET, MERGE, CREATE TABLE AS) may receive a masked value:
    /// the statement is refused.
    pub write: bool,
}

/// The relation name without schema or database, lowercased.
fn bare(name: &str) -> String {
    name.rsplit('.').next().unwrap_or(name).to_lowercase()
}

impl Catalog {
    /// Whether the catalog has any masked column.
    pub fn any_masked(&self) -> bool {
        !self.masked_relations.is_empty()
    }

    /// Where masked values may flow in a statement with `lineage` touching `tables`. Names are
    /// matched without knowing which relation a reference belongs to, so this errs towards
    /// masking: a computed column is masked when the statement reads a masked column's name
    /// anywhere its value can reach a row, or reads a relation with masked columns through a
    /// name that is not one of that relation's columns (a whole row `c`, the function notation
    /// `c.text`), a star inside an expression or subquery, or a renaming alias list.
    pub fn taint(&self, lineage: &Lineage, tables: &[String]) -> Taint {
        if self.masked_relations.is_empty() {
            return Taint::default();
        }
        let touches = tables
            .iter()
            .any(|t| self.masked_relations.contains(&bare(t)));
        let opaque = tables
            .iter()
            .any(|t| self.opaque_relations.contains(&bare(t)));
        let bad = |n: &String| {
            self.masked_names.contains(n) || (touches && !self.known_names.contains(n))
        };
        let write = opaque || (touches && lineage.opaque) || lineage.refs.iter().any(bad);
        let output = write
            || (touches && lineage.returning_opaque)
            || lineage.returning_refs.iter().any(bad)
            || (touches
                && lineage
                    .bare_refs
                    .iter()
                    .any(|n| !self.known_names.contains(n)));
        Taint { output, write }
    }

    /// Fill the name sets from `by_name` (the relations that keep columns have a masked one).
    fn index_names(&mut self) {
        for (name, rels) in &self.by_name {
            self.names.insert(bare(name));
            for r in rels.iter().filter(|r| !r.columns.is_empty()) {
                self.masked_relations.insert(bare(name));
                for c in &r.columns {
                    self.known_names.insert(c.name.clone());
                    if c.masked {
                        self.masked_names.insert(c.name.clone());
                    }
                }
            }
        }
    }

    /// Take in the views: a view whose definition can carry a masked value into its result (a
    /// masked column, directly or computed) has every column masked, and counts as a relation
    /// with masked columns for the views and statements that read it. Views on views are
    /// resolved by repeating until nothing changes. A definition that cannot be classified is
    /// treated as masked.
    fn add_views(
        &mut self,
        views: &[(u32, String, String, String)],
        columns: &HashMap<u32, Vec<(i16, String)>>,
    ) {
        let parsed: Vec<Option<crate::pg::classify::Statement>> = views
            .iter()
            .map(|(_, _, _, def)| {
                crate::pg::classify::classify(def)
                    .ok()
                    .and_then(|mut v| (v.len() == 1).then(|| v.remove(0)))
            })
            .collect();
        let mut done = vec![false; views.len()];
        loop {
            let mut changed = false;
            for (i, (oid, _schema, name, _)) in views.iter().enumerate() {
                if done[i] {
                    continue;
                }
                let tainted = match &parsed[i] {
                    None => true,
                    Some(s) => {
                        self.taint(&s.lineage, &s.tables).output
                            || s.lineage
                                .bare_refs
                                .iter()
                                .any(|n| self.masked_names.contains(n))
                    }
                };
                if !tainted {
                    continue;
                }
                done[i] = true;
                changed = true;
                let key = bare(name);
                self.masked_relations.insert(key.clone());
                self.opaque_relations.insert(key);
                self.masked_oids.insert(*oid);
                for (att, col) in columns.get(oid).map(Vec::as_slice).unwrap_or(&[]) {
                    self.masked.insert((*oid, *att));
                    self.derived.insert((*oid, *att));
                    self.known_names.insert(col.clone());
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// Whether the snapshot knows a relation called `name` (as in `Statement::tables`), in any
    /// schema, system relations included. A name it does not know may be a relation created
    /// since the snapshot was read: the session refreshes it before deciding (`handler.rs`).
    pub fn knows(&self, name: &str) -> bool {
        let b = bare(name);
        self.names.contains(&b) || self.system.contains(&b)
    }

    /// Every relation called `name`, in any schema.
    pub fn relations(&self, name: &str) -> &[Relation] {
        self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A catalog for tests: `(schema, table, columns as (name, masked, generated))`.
    pub fn from_tables(tables: &[(&str, &str, &[TestColumn<'_>])]) -> Catalog {
        let mut c = Catalog::default();
        for (schema, table, cols) in tables {
            let any = cols.iter().any(|c| c.1);
            c.by_name
                .entry((*table).to_string())
                .or_default()
                .push(Relation {
                    schema: (*schema).to_string(),
                    columns: if any {
                        cols.iter()
                            .map(|(n, m, g)| Column {
                                name: (*n).to_string(),
                                masked: *m,
                                generated: *g,
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                });
        }
        c.index_names();
        c
    }

    /// A test catalog with views `(oid, name, definition, columns)` taken in.
    pub fn with_views(mut self, views: &[(u32, &str, &str, &[&str])]) -> Catalog {
        let list: Vec<(u32, String, String, String)> = views
            .iter()
            .map(|(oid, name, def, _)| (*oid, "public".into(), (*name).into(), (*def).into()))
            .collect();
        let columns = views
            .iter()
            .map(|(oid, _, _, cols)| {
                let cols = cols
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (i as i16 + 1, (*c).to_string()))
                    .collect();
                (*oid, cols)
            })
            .collect();
        self.add_views(&list, &columns);
        self
    }
}

/// `(name, masked, generated)`, for [`Catalog::from_tables`].
pub type TestColumn<'a> = (&'a str, bool, bool);

/// Snapshots read from the server per (target, database), fresh for [`TTL`]: the next
/// sessions of the same database start from them. A field of the handler (built once), for the
/// catalog and the function catalog alike.
pub struct Snapshots<T> {
    map: Mutex<HashMap<SnapshotKey, (Instant, Arc<T>)>>,
}

/// (target, database).
type SnapshotKey = (String, String);

impl<T> Default for Snapshots<T> {
    fn default() -> Self {
        Snapshots {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> Snapshots<T> {
    /// The snapshot of `database` on `target`, if one younger than [`TTL`] is kept.
    pub fn fresh(&self, target: &str, database: &str) -> Option<Arc<T>> {
        let key = (target.to_string(), database.to_string());
        crate::lock(&self.map)
            .get(&key)
            .filter(|(at, _)| at.elapsed() < TTL)
            .map(|(_, v)| v.clone())
    }

    /// Keep a snapshot (read at login or on a session's own connection, the in-band refresh).
    pub fn remember(&self, target: &str, database: &str, v: Arc<T>) {
        crate::lock(&self.map).insert(
            (target.to_string(), database.to_string()),
            (Instant::now(), v),
        );
    }
}

/// How long a kept snapshot serves new sessions.
pub const TTL: Duration = Duration::from_secs(30);

/// Every column of every user relation (a relation without columns once, with NULL column
/// fields, so zero-column tables are known), then every user view's definition, then the names
/// of the system relations (so a statement on `pg_class` does not count as naming a relation
/// the snapshot does not know): three result sets.
const QUERY: &str = "SELECT c.oid::int8, n.nspname, c.relname, a.attnum::int4, a.attname, \
     (a.attgenerated <> '')::text, c.relkind::text \
     FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
     WHERE c.relkind IN ('r','v','m','p','f') \
     AND n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%'; \
     SELECT c.oid::int8, n.nspname, c.relname, pg_catalog.pg_get_viewdef(c.oid) \
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('v','m') AND n.nspname NOT IN ('pg_catalog','information_schema'); \
     SELECT c.relname FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname IN ('pg_catalog','information_schema')";

/// The columns masked by column rules, from the cache or the server.
pub async fn load(
    cache: &Snapshots<Catalog>,
    s: &mut Session,
    masker: &Masker,
    target: &str,
    database: &str,
) -> io::Result<Arc<Catalog>> {
    if let Some(set) = cache.fresh(target, database) {
        return Ok(set);
    }
    let mut out = BytesMut::new();
    query(&mut out)?;
    let mut reader = Reader::default();
    let cat = Arc::new(
        crate::pg::upstream::query_until(s, &out, "catalog query", |tag, raw| {
            reader.feed(masker, tag, raw)
        })
        .await?,
    );
    cache.remember(target, database, cat.clone());
    Ok(cat)
}

/// The catalog query as a Query message (three result sets, one ReadyForQuery).
pub fn query(out: &mut BytesMut) -> io::Result<()> {
    postgres_protocol::message::frontend::query(QUERY, out)
}

/// Reads the answer to [`query`] one backend message at a time, so the same code serves the
/// login read and the in-band refresh (where the session's server side feeds it).
#[derive(Default)]
pub struct Reader {
    set: HashSet<(u32, i16)>,
    /// (schema, table) -> (attnum, column) for every column; trimmed to masked tables at the end.
    all: HashMap<(String, String), Vec<(i16, Column)>>,
    /// Views: (oid, schema, name, definition), and their columns by oid.
    views: Vec<(u32, String, String, String)>,
    view_columns: HashMap<u32, Vec<(i16, String)>>,
    system: HashSet<String>,
    result_set: usize,
    failed: Option<String>,
}

impl Reader {
    /// Take one message of the answer; at its ReadyForQuery, the snapshot (or the server's
    /// error). Other messages (ParameterStatus, notices) are ignored.
    pub fn feed(&mut self, masker: &Masker, tag: u8, raw: &[u8]) -> Option<io::Result<Catalog>> {
        match tag {
            b'C' => self.result_set += 1,
            b'D' => {
                let v = match wire::data_row_values(raw) {
                    Ok(v) => v,
                    Err(e) => {
                        self.failed.get_or_insert(e.to_string());
                        return None;
                    }
                };
                let text = |i: usize| {
                    v.get(i)
                        .copied()
                        .flatten()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                };
                match self.result_set {
                    0 => self.relation_row(masker, &text),
                    1 => {
                        if let (Some(Ok(oid)), Some(schema), Some(name), Some(def)) =
                            (text(0).map(|o| o.parse::<u32>()), text(1), text(2), text(3))
                        {
                            self.views.push((oid, schema, name, def));
                        }
                    }
                    _ => {
                        if let Some(name) = text(0) {
                            self.system.insert(name.to_lowercase());
                        }
                    }
                }
            }
            b'E' => {
                let m = wire::decode_error_notice(raw)
                    .ok()
                    .and_then(|en| en.message().map(str::to_string))
                    .unwrap_or_else(|| "?".into());
                self.failed.get_or_insert(m);
            }
            b'Z' => return Some(self.finish()),
            _ => {}
        }
        None
    }

    fn relation_row(&mut self, masker: &Masker, text: &dyn Fn(usize) -> Option<String>) {
        let (Some(oid), Some(schema), Some(table)) = (text(0), text(1), text(2)) else {
            return;
        };
        let (Some(att), Some(col), Some(gen)) = (text(3), text(4), text(5)) else {
            // A relation without columns: known, nothing to mask.
            self.all.entry((schema, table)).or_default();
            return;
        };
        let (Ok(oid), Ok(att)) = (oid.parse::<u32>(), att.parse::<i16>()) else {
            return;
        };
        if matches!(text(6).as_deref(), Some("v" | "m")) {
            self.view_columns
                .entry(oid)
                .or_default()
                .push((att, col.clone()));
        }
        let masked = masker.column_masked(Some(&format!("{schema}.{table}")), &col);
        if masked {
            self.set.insert((oid, att));
        }
        self.all.entry((schema, table)).or_default().push((
            att,
            Column {
                name: col,
                masked,
                generated: gen == "true",
            },
        ));
    }

    fn finish(&mut self) -> io::Result<Catalog> {
        if let Some(m) = self.failed.take() {
            return Err(io::Error::other(format!("catalog query failed: {m}")));
        }
        let mut by_name: HashMap<String, Vec<Relation>> = HashMap::new();
        for ((schema, table), mut cols) in self.all.drain() {
            let columns = if cols.iter().any(|(_, c)| c.masked) {
                cols.sort_by_key(|(att, _)| *att);
                cols.into_iter().map(|(_, c)| c).collect()
            } else {
                Vec::new()
            };
            by_name
                .entry(table)
                .or_default()
                .push(Relation { schema, columns });
        }
        let mut cat = Catalog {
            masked: std::mem::take(&mut self.set),
            by_name,
            system: std::mem::take(&mut self.system),
            ..Catalog::default()
        };
        cat.masked_oids = cat.masked.iter().map(|(oid, _)| *oid).collect();
        cat.index_names();
        let views = std::mem::take(&mut self.views);
        cat.add_views(&views, &self.view_columns);
        Ok(cat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::classify::classify;

    fn catalog() -> Catalog {
        Catalog::from_tables(&[
            (
                "public",
                "customers",
                &[
                    ("id", false, false),
                    ("name", false, false),
                    ("email", true, false),
                ],
            ),
            (
                "public",
                "orders",
                &[("id", false, false), ("note", false, false)],
            ),
        ])
        .with_views(&[
            (
                100,
                "contact_v",
                "SELECT customers.id, customers.email AS contact FROM customers",
                &["id", "contact"],
            ),
            (
                101,
                "names_v",
                "SELECT customers.id, customers.name FROM customers",
                &["id", "name"],
            ),
            (
                102,
                "nested_v",
                "SELECT contact_v.contact AS x FROM contact_v",
                &["x"],
            ),
        ])
    }

    fn taint(c: &Catalog, sql: &str) -> Taint {
        let s = classify(sql).expect("classify").remove(0);
        c.taint(&s.lineage, &s.tables)
    }

    #[test]
    fn computed_values_taint_only_when_they_may_carry_a_masked_value() {
        let c = catalog();
        for sql in [
            "SELECT upper(email) FROM customers",
            "SELECT c.text FROM customers c",
            "SELECT to_json(c) FROM customers c",
            "SELECT upper(x) FROM nested_v",
            "SELECT upper(contact) FROM contact_v",
            "SELECT e FROM customers c(a, b, e)",
        ] {
            assert!(taint(&c, sql).output, "{sql}");
        }
        for sql in [
            "SELECT count(*) FROM customers",
            "SELECT upper(name) FROM customers WHERE email LIKE 'a%'",
            "SELECT upper(name) FROM names_v",
            "SELECT id, email FROM customers",
            "SELECT upper(note) FROM orders",
        ] {
            assert!(!taint(&c, sql).output, "{sql}");
        }
        // Views: the one that exposes a masked column (directly or through another view) has
        // every column masked, the other none.
        assert!(c.masked.contains(&(100, 1)) && c.masked.contains(&(100, 2)));
        assert!(c.masked.contains(&(102, 1)));
        assert!(!c.masked.contains(&(101, 1)) && !c.masked.contains(&(101, 2)));
        // Writes: copying a masked value is a write taint, RETURNING it only an output one.
        assert!(taint(&c, "UPDATE customers SET name = email").write);
        let t = taint(&c, "UPDATE customers SET name = 'x' RETURNING upper(email)");
        assert!(t.output && !t.write);
        // Relations it knows by any schema-qualified spelling (a zero-column-rule table too);
        // an unknown name makes the session re-read the snapshot.
        assert!(c.knows("orders") && c.knows("public.customers") && c.knows("db.public.orders"));
        assert!(!c.knows("created_since"));
        // No column rules: nothing taints.
        let none = Catalog::default();
        assert_eq!(
            taint(&none, "SELECT upper(email) FROM customers"),
            Taint::default()
        );
    }
}
