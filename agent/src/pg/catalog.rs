//! Which result columns a column mask rule covers. RowDescription gives a table OID and an
//! attribute number for plain columns (also behind aliases); the names come from the server's
//! catalog, read once per (target, database) on the freshly logged-in upstream connection
//! before the client's first message, and cached for a short while so connection-per-
//! transaction bots don't pay a catalog round trip each time.
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

type Cached = (Instant, Arc<HashSet<(u32, i16)>>);
static CACHE: LazyLock<Mutex<HashMap<(String, String), Cached>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
const TTL: Duration = Duration::from_secs(30);

const QUERY: &str = "SELECT c.oid::int8, n.nspname || '.' || c.relname, a.attnum::int4, a.attname \
     FROM pg_catalog.pg_attribute a \
     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r','v','m','p','f') \
     AND n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%'";

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The (table OID, attribute number) pairs masked by column rules.
pub async fn masked_columns(
    s: &mut Session,
    masker: &Masker,
    target: &str,
    database: &str,
) -> io::Result<Arc<HashSet<(u32, i16)>>> {
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
                    let (Some(oid), Some(table), Some(att), Some(col)) =
                        (text(0), text(1), text(2), text(3))
                    else {
                        continue;
                    };
                    let (Ok(oid), Ok(att)) = (oid.parse::<u32>(), att.parse::<i16>()) else {
                        continue;
                    };
                    if masker.column_masked(Some(&table), &col) {
                        set.insert((oid, att));
                    }
                }
                b'E' => {
                    let en = wire::decode_error_notice(&raw).map_err(bad)?;
                    return Err(io::Error::other(format!(
                        "catalog query failed: {}",
                        en.message().unwrap_or("?")
                    )));
                }
                b'Z' => {
                    let set = Arc::new(set);
                    crate::lock(&CACHE).insert(key, (Instant::now(), set.clone()));
                    return Ok(set);
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
