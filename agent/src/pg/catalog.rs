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
//! Limit: a table created after the snapshot is not covered by column rules until the cache
//! refreshes (30 s); detectors still apply to its values.

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{mask::Masker, pg::upstream::Session, pg::wire};

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
    /// Relations by name (several schemas may have one of the same name).
    by_name: HashMap<String, Vec<Relation>>,
}

impl Catalog {
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
        c
    }
}

/// `(name, masked, generated)`, for [`Catalog::from_tables`].
pub type TestColumn<'a> = (&'a str, bool, bool);

type Cached = (Instant, Arc<Catalog>);
static CACHE: LazyLock<Mutex<HashMap<(String, String), Cached>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const TTL: Duration = Duration::from_secs(30);

const QUERY: &str = "SELECT c.oid::int8, n.nspname, c.relname, a.attnum::int4, a.attname, \
     (a.attgenerated <> '')::text \
     FROM pg_catalog.pg_attribute a \
     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r','v','m','p','f') \
     AND n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%'";

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The columns masked by column rules, from the cache or the server.
pub async fn load(
    s: &mut Session,
    masker: &Masker,
    target: &str,
    database: &str,
) -> io::Result<Arc<Catalog>> {
    let key = (target.to_string(), database.to_string());
    if let Some((at, set)) = crate::lock(&CACHE).get(&key) {
        if at.elapsed() < TTL {
            return Ok(set.clone());
        }
    }
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(QUERY, &mut out)?;
    s.stream.write_all(&out).await?;
    let mut set = HashSet::new();
    // (schema, table) -> (attnum, column) for every column; trimmed to masked tables at the end.
    let mut all: HashMap<(String, String), Vec<(i16, Column)>> = HashMap::new();
    let buf = &mut s.rest;
    loop {
        while let Some((tag, raw)) = wire::parse_backend(buf).map_err(bad)? {
            match tag {
                b'D' => {
                    let v = wire::data_row_values(&raw).map_err(bad)?;
                    let text = |i: usize| {
                        v.get(i)
                            .copied()
                            .flatten()
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                    };
                    let (Some(oid), Some(schema), Some(table), Some(att), Some(col), Some(gen)) =
                        (text(0), text(1), text(2), text(3), text(4), text(5))
                    else {
                        continue;
                    };
                    let (Ok(oid), Ok(att)) = (oid.parse::<u32>(), att.parse::<i16>()) else {
                        continue;
                    };
                    let masked = masker.column_masked(Some(&format!("{schema}.{table}")), &col);
                    if masked {
                        set.insert((oid, att));
                    }
                    all.entry((schema, table)).or_default().push((
                        att,
                        Column {
                            name: col,
                            masked,
                            generated: gen == "true",
                        },
                    ));
                }
                b'E' => {
                    let en = wire::decode_error_notice(&raw).map_err(bad)?;
                    return Err(io::Error::other(format!(
                        "catalog query failed: {}",
                        en.message().unwrap_or("?")
                    )));
                }
                b'Z' => {
                    let mut by_name: HashMap<String, Vec<Relation>> = HashMap::new();
                    for ((schema, table), mut cols) in all.drain() {
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
                    let cat = Arc::new(Catalog {
                        masked: std::mem::take(&mut set),
                        by_name,
                    });
                    crate::lock(&CACHE).insert(key, (Instant::now(), cat.clone()));
                    return Ok(cat);
                }
                _ => {}
            }
        }
        if s.stream.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed during the catalog query",
            ));
        }
    }
}
