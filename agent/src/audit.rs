//! `<data_dir>/audit.jsonl`: one JSON object per line, appended with a single write(2) per
//! event so concurrent sessions never interleave partial lines.

use std::{
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use serde_json::{Map, Value};

pub struct Audit {
    path: PathBuf,
    file: Mutex<File>,
}

/// RFC 3339 timestamp with milliseconds, UTC.
pub fn now_ts() -> String {
    ts_of(SystemTime::now())
}

/// [`now_ts`] for `t`. Every audit and recording line carries one (two per statement), so the
/// date and time of day are formatted once per second per thread and only the milliseconds
/// each time.
fn ts_of(t: SystemTime) -> String {
    use std::cell::RefCell;
    thread_local! {
        /// The second last formatted, and its text up to the seconds ("2026-11-29T15:40:31").
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != secs {
            let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            *prefix = humantime::format_rfc3339_seconds(whole).to_string();
            prefix.pop(); // the 'Z'
            *cached = secs;
        }
        let mut s = String::with_capacity(prefix.len() + 5);
        s.push_str(prefix);
        let _ = write!(s, ".{:03}Z", since.subsec_millis());
        s
    })
}

impl Audit {
    pub fn open(data_dir: &Path) -> std::io::Result<Audit> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("audit.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Audit {
            path,
            file: Mutex::new(file),
        })
    }

    /// Open the file again at its path (after logrotate renamed it: SIGHUP). Lines written
    /// before the swap are in the old file, lines after it in the new one; none is lost or
    /// split. If the path cannot be opened the old file is kept.
    pub fn reopen(&self) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        *crate::lock(&self.file) = file;
        Ok(())
    }

    /// Write one event; `ts` is added first. An audit write failure is logged, never fatal
    /// for the session (the decision itself was already enforced).
    pub fn write(&self, event: Map<String, Value>) {
        append_json_line(&self.file, &self.path, event);
    }

    /// Write one event built with [`Line`] (the per-statement hot path: no map, one write).
    pub fn write_line(&self, line: Line) {
        append_line(&self.file, &self.path, &line.finish());
    }
}

/// A JSON-lines event written field by field: `{"ts":...` then the fields in the order they
/// are added. The hot paths (one audit line and one recording line per statement) use it
/// instead of building a `serde_json::Map` per event; values are escaped by serde_json.
pub struct Line(Vec<u8>);

impl Line {
    /// A line starting with `ts` (now) and then `fields`, a pre-serialized run of
    /// `"key":value` pairs (see [`Line::fields`]); empty for none.
    pub fn new(fields: &str) -> Line {
        let mut b = Vec::with_capacity(256 + fields.len());
        b.extend_from_slice(b"{\"ts\":\"");
        b.extend_from_slice(now_ts().as_bytes());
        b.push(b'"');
        if !fields.is_empty() {
            b.push(b',');
            b.extend_from_slice(fields.as_bytes());
        }
        Line(b)
    }

    /// Serialize `event`'s fields as a run of `"key":value` pairs (no braces), to be reused
    /// by many lines.
    pub fn fields(event: &Map<String, Value>) -> String {
        let s = Value::Object(event.clone()).to_string();
        s[1..s.len() - 1].to_string()
    }

    fn key(&mut self, k: &str) {
        self.0.push(b',');
        let _ = serde_json::to_writer(&mut self.0, k);
        self.0.push(b':');
    }

    pub fn str(mut self, k: &str, v: &str) -> Line {
        self.key(k);
        let _ = serde_json::to_writer(&mut self.0, v);
        self
    }

    /// A string or `null`.
    pub fn opt(mut self, k: &str, v: Option<&str>) -> Line {
        self.key(k);
        match v {
            Some(v) => {
                let _ = serde_json::to_writer(&mut self.0, v);
            }
            None => self.0.extend_from_slice(b"null"),
        }
        self
    }

    /// Any serializable value (numbers, booleans, options of them).
    pub fn val<T: serde::Serialize>(mut self, k: &str, v: T) -> Line {
        self.key(k);
        if serde_json::to_writer(&mut self.0, &v).is_err() {
            self.0.extend_from_slice(b"null");
        }
        self
    }

    /// The finished line, newline included.
    pub fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(b"}\n");
        self.0
    }
}

fn append_line(file: &Mutex<File>, path: &Path, line: &[u8]) {
    let mut f = crate::lock(file);
    if let Err(e) = f.write_all(line) {
        tracing::error!(path = %path.display(), error = %e, "append to JSON-lines file failed");
    }
}

/// Append `{"ts": now, ...event}` and a newline with a single write(2), so concurrent writers
/// never interleave partial lines and a crash loses at most the line in flight.
fn append_json_line(file: &Mutex<File>, path: &Path, event: Map<String, Value>) {
    let mut obj = Map::new();
    obj.insert("ts".into(), Value::String(now_ts()));
    obj.extend(event);
    let mut line = Value::Object(obj).to_string();
    line.push('\n');
    append_line(file, path, line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_match_rfc3339_millis_across_seconds() {
        let base = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_998);
        for ms in [0u64, 1, 2, 3, 1000, 1001, 59_002, 86_400_000, 0, 5] {
            let t = base + std::time::Duration::from_millis(ms);
            assert_eq!(
                ts_of(t),
                humantime::format_rfc3339_millis(t).to_string(),
                "+{ms} ms"
            );
        }
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let dir = std::env::temp_dir().join(format!("tg-audit-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Audit::open(&dir).expect("open");
        a.write_line(Line::new("").str("event", "before"));
        std::fs::rename(dir.join("audit.jsonl"), dir.join("audit.jsonl.1")).expect("rotate");
        a.write_line(Line::new("").str("event", "still the old file"));
        a.reopen().expect("reopen");
        a.write_line(Line::new("").str("event", "after"));
        let old = std::fs::read_to_string(dir.join("audit.jsonl.1")).expect("old");
        let new = std::fs::read_to_string(dir.join("audit.jsonl")).expect("new");
        assert_eq!(old.lines().count(), 2, "{old}");
        assert!(
            old.contains("\"before\"") && old.contains("still the old file"),
            "{old}"
        );
        assert_eq!(new.lines().count(), 1, "{new}");
        assert!(new.contains("\"after\""), "{new}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_line_is_the_same_json_as_the_map_it_replaces() {
        let base =
            crate::obj(json!({"session": "s1", "identity": null, "pid": 7, "exe": "/bin/\"x\""}));
        let line = Line::new(&Line::fields(&base))
            .str("event", "operation")
            .str("operation", "select 'a\u{1}b\n'")
            .opt("rule", None)
            .opt("flags", Some("lo_*"))
            .val("enforced", true)
            .finish();
        assert!(line.ends_with(b"}\n"));
        let v: Value = serde_json::from_slice(&line).expect("valid JSON");
        let mut want = base.clone();
        want.extend(crate::obj(
            json!({"event": "operation", "operation": "select 'a\u{1}b\n'",
            "rule": null, "flags": "lo_*", "enforced": true}),
        ));
        let mut got = v.as_object().expect("object").clone();
        assert!(got.remove("ts").is_some_and(|t| t.is_string()));
        assert_eq!(got, want);
        let empty: Value = serde_json::from_slice(&Line::new("").finish()).expect("json");
        assert!(empty["ts"].is_string());
    }
}
