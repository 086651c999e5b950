//! `<data_dir>/audit.jsonl`: one JSON object per line, through the journal (`journal.rs`) or
//! appended with a single write(2) per event, so concurrent sessions never interleave
//! partial lines. The file primitives are in `sink.rs` (re-exported here).
//!
//! Writes are fail-closed: a failed or short write (disk full, I/O error) is cut back to the
//! file's length before it (so no half line is left and the next line starts on its own),
//! counted in `tollgate_audit_write_errors_total{file}`, and recorded in [`Health`]; while
//! that holds, [`Health::check`] refuses new connections and statements (under
//! `fail_mode = "closed"`) and `/healthz` answers 503 with the reason.

use std::{path::Path, sync::atomic::Ordering, sync::Arc, time::SystemTime};

use serde_json::{Map, Value};

use crate::journal::Journal;
pub(crate) use crate::sink::{append_whole, open_append};
pub use crate::sink::{FileKind, Health, Sink};

/// The audit log. Cheap to clone: clones share the file, its lock and its [`Health`] (the
/// approvals broker writes through a clone, so a rotation reopens both).
#[derive(Clone)]
pub struct Audit {
    inner: Arc<AuditInner>,
}

struct AuditInner {
    sink: Arc<Sink>,
    health: Arc<Health>,
    /// The crash-safe journal the lines go through (see `journal.rs`); None: each line is
    /// written directly.
    journal: Option<Arc<Journal>>,
}

/// RFC 3339 timestamp with milliseconds, UTC.
pub fn now_ts() -> String {
    ts_of(SystemTime::now())
}

/// [`now_ts`] for `t`.
fn ts_of(t: SystemTime) -> String {
    let mut b = Vec::with_capacity(24);
    push_ts(t, &mut b);
    // ASCII digits and separators only.
    String::from_utf8(b).unwrap_or_default()
}

/// `t` as [`now_ts`] writes it, appended to `out`. Every audit and recording line carries one
/// (two per statement), so the date and time of day are formatted once per second per thread
/// and only the milliseconds each time.
fn push_ts(t: SystemTime, out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        /// The second last formatted, and its text up to the seconds ("2026-11-29T15:40:31").
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != secs {
            let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            *prefix = humantime::format_rfc3339_seconds(whole).to_string();
            prefix.pop(); // the 'Z'
            *cached = secs;
        }
        out.extend_from_slice(prefix.as_bytes());
    });
    out.extend_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
}

impl Audit {
    /// The audit log with each line written directly (one write(2) per line).
    pub fn open(data_dir: &Path) -> std::io::Result<Audit> {
        std::fs::create_dir_all(data_dir)?;
        let health = Arc::new(Health::default());
        let _ = health.sessions_dir.set(data_dir.join("sessions"));
        let sink = Sink::open(
            data_dir.join("audit.jsonl"),
            false,
            FileKind::Audit,
            health.clone(),
        )?;
        Ok(Audit {
            inner: Arc::new(AuditInner {
                sink: Arc::new(sink),
                health,
                journal: None,
            }),
        })
    }

    /// The agent's audit log: lines go through `<data_dir>/journal` (see `journal.rs`), and
    /// what a crashed agent left there is written out first. If the journal cannot be used
    /// (another agent holds it, no room for it) each line is written directly, as
    /// [`Audit::open`] does, with a warning.
    pub fn open_journaled(data_dir: &Path) -> std::io::Result<Audit> {
        let direct = Audit::open(data_dir)?;
        let inner = &direct.inner;
        match Journal::open(
            data_dir,
            inner.sink.clone(),
            inner.health.clone(),
            crate::journal::DEFAULT_CAPACITY,
        ) {
            Ok(j) => Ok(Audit {
                inner: Arc::new(AuditInner {
                    sink: inner.sink.clone(),
                    health: inner.health.clone(),
                    journal: Some(j),
                }),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "audit journal unavailable: every audit and recording line is written with its own write(2)");
                Ok(direct)
            }
        }
    }

    /// The write health shared by this log and the recordings.
    pub fn health(&self) -> &Arc<Health> {
        &self.inner.health
    }

    /// The journal lines go through, if any.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.inner.journal.as_ref()
    }

    /// Write out what the journal holds (at a clean stop); nothing to do without one.
    pub fn flush(&self) {
        if let Some(j) = &self.inner.journal {
            j.drain_now();
        }
    }

    /// Open the file again at its path (after logrotate renamed it: SIGHUP). Lines written
    /// before the swap are in the old file, lines after it in the new one; none is lost or
    /// split. If the path cannot be opened the old file is kept.
    pub fn reopen(&self) -> std::io::Result<()> {
        match &self.inner.journal {
            Some(j) => j.drained(|| self.inner.sink.reopen()),
            None => self.inner.sink.reopen(),
        }
    }

    /// Write one event; `ts` is added first. A failure is cut back, counted and makes
    /// [`Audit::check`] refuse new work until a write succeeds again.
    pub fn write(&self, event: Map<String, Value>) {
        let mut obj = Map::new();
        obj.insert("ts".into(), Value::String(now_ts()));
        obj.extend(event);
        let mut line = Value::Object(obj).to_string();
        line.push('\n');
        self.append(line.as_bytes());
    }

    /// Write one event built with [`Line`] (the per-statement hot path: no map; with the
    /// journal no syscall, else one write).
    pub fn write_line(&self, line: Line) {
        self.append(&line.finish());
    }

    /// Append whole lines: into the journal, or directly.
    fn append(&self, line: &[u8]) {
        match &self.inner.journal {
            Some(j) => j.append(crate::journal::AUDIT, b"", line, false),
            None => {
                self.inner.sink.append(line);
            }
        }
    }

    /// `Err(reason)` while the audit log or recordings cannot be written. In that state each
    /// call retries: a probe line (`audit_resumed`) for the log (with the journal: the lines
    /// it holds are written, then that line), a probe file for recordings; if they succeed,
    /// service resumes at once. One atomic load when all is well.
    pub fn check(&self) -> Result<(), String> {
        let h = &self.inner.health;
        if !h.any.load(Ordering::Acquire) {
            return Ok(());
        }
        let audit_err = crate::lock(&h.audit).clone();
        if let Some(err) = audit_err {
            let line = Line::new("")
                .str("event", "audit_resumed")
                .str("after_error", &err)
                .finish();
            match &self.inner.journal {
                Some(j) => {
                    j.drain_now();
                    if crate::lock(&h.audit).is_none() {
                        self.append(&line);
                    } else if j.backlog() == 0 {
                        // Nothing held back: the failure was a direct write's; probe directly.
                        j.drained(|| self.inner.sink.append(&line));
                    }
                }
                None => {
                    self.inner.sink.append(&line);
                }
            }
        }
        h.probe_recording();
        match h.failure() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Whether JSON needs `v` escaped: a control character, `"` or `\` in it. Eight bytes at a
/// time (the strings are short: names, paths, statements).
fn needs_escape(v: &[u8]) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // A byte below n (n <= 128) in x.
    let below = |x: u64, n: u64| x.wrapping_sub(LO * n) & !x & HI != 0;
    let zero = |x: u64| below(x, 1);
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_le_bytes(w);
        if below(x, 0x20) || zero(x ^ (LO * u64::from(b'"'))) || zero(x ^ (LO * u64::from(b'\\'))) {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A JSON-lines event written field by field: `{"ts":...` then the fields in the order they
/// are added. The hot paths (one audit line and one recording line per statement) use it
/// instead of building a `serde_json::Map` per event; values are escaped by serde_json.
pub struct Line(Vec<u8>);

impl Line {
    /// A line starting with `ts` (now) and then `fields`, a pre-serialized run of
    /// `"key":value` pairs (see [`Line::fields`]); empty for none.
    pub fn new(fields: &str) -> Line {
        // A buffer an earlier line of this thread finished with, if there is one.
        let mut b = SPARE_LINES
            .try_with(|s| s.try_borrow_mut().ok()?.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        b.reserve(256 + fields.len());
        b.extend_from_slice(b"{\"ts\":\"");
        push_ts(SystemTime::now(), &mut b);
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

    /// A key: the agent's own names, which never need escaping.
    fn key(&mut self, k: &str) {
        debug_assert!(!needs_escape(k.as_bytes()), "{k:?}");
        self.0.reserve(k.len() + 4);
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(k.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    /// `v` as a JSON string: copied as it is when nothing in it needs escaping (the usual
    /// case: names, most statements), else escaped by serde_json.
    fn string(&mut self, v: &str) {
        if !needs_escape(v.as_bytes()) {
            self.0.reserve(v.len() + 2);
            self.0.push(b'"');
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(b'"');
        } else {
            let _ = serde_json::to_writer(&mut self.0, v);
        }
    }

    pub fn str(mut self, k: &str, v: &str) -> Line {
        self.key(k);
        self.string(v);
        self
    }

    /// A string or `null`.
    pub fn opt(mut self, k: &str, v: Option<&str>) -> Line {
        self.key(k);
        match v {
            Some(v) => self.string(v),
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

    /// The finished line, newline included. Its buffer serves a later line of this thread
    /// once the [`Finished`] is dropped.
    pub fn finish(mut self) -> Finished {
        self.0.extend_from_slice(b"}\n");
        Finished(std::mem::take(&mut self.0))
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        keep_spare(std::mem::take(&mut self.0));
    }
}

/// A finished [`Line`]'s bytes. Dropped, its buffer is kept for the next line of this thread:
/// the hot paths make an audit line and a recording line or two per statement and request,
/// each copied into the journal at once, so a few buffers per thread serve them all without
/// an allocation each.
pub struct Finished(Vec<u8>);

impl Finished {
    /// The bytes, as a buffer of their own (not kept for reuse).
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for Finished {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        keep_spare(std::mem::take(&mut self.0));
    }
}

/// Buffers kept per thread for [`Line::new`], at most this many...
const SPARE_LINES_KEPT: usize = 4;
/// ...of at most this capacity (a line of a long statement gives its buffer back to the
/// allocator).
const SPARE_LINE_CAPACITY: usize = 4096;

thread_local! {
    /// This thread's spare line buffers (see [`Finished`]).
    static SPARE_LINES: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keep `b` (emptied) for a later [`Line::new`] of this thread, if it is worth keeping.
fn keep_spare(mut b: Vec<u8>) {
    if b.capacity() == 0 || b.capacity() > SPARE_LINE_CAPACITY {
        return;
    }
    b.clear();
    // try_with: a line dropped while the thread's locals are torn down is simply freed.
    let _ = SPARE_LINES.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < SPARE_LINES_KEPT {
                s.push(b);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn line_strings_are_what_serde_json_writes() {
        for v in [
            "",
            "plain text",
            "SELECT \"q\" FROM t WHERE a = 'x\\y'",
            "tab\tnewline\ncr\r\u{1}\u{1f}",
            "del \u{7f} and ünïcødé ☃",
            "\"",
            "\\",
            "0123456\"",
            "01234567\\",
            "0123456789abcdef\u{1f}",
            "0123456789abcdef~\u{7f}\u{80}",
            "ÿÿÿÿÿÿÿÿ\"",
            "\u{1f}0123456789abcdef",
        ] {
            let line = Line(Vec::new())
                .str("k", v)
                .opt("n", None)
                .opt("o", Some(v));
            let got = String::from_utf8(line.finish().into_vec()).expect("utf-8");
            let want = format!(
                ",\"k\":{0},\"n\":null,\"o\":{0}}}\n",
                serde_json::to_string(v).expect("json")
            );
            assert_eq!(got, want, "{v:?}");
        }
        let ts = String::from_utf8(Line::new("").finish().into_vec()).expect("utf-8");
        let v: Value = serde_json::from_str(&ts).expect("json");
        let ts = v["ts"].as_str().expect("ts");
        assert!(
            humantime::parse_rfc3339(ts).is_ok() && ts.len() == 24,
            "{ts}"
        );
    }

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
    fn a_partial_last_line_is_ended_before_the_next_and_health_tracks_failures() {
        let dir = std::env::temp_dir().join(format!("tg-audit-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("audit.jsonl"), b"{\"ts\":\"x\"}\n{\"cut").expect("seed");
        let a = Audit::open(&dir).expect("open");
        a.write_line(Line::new("").str("event", "next"));
        let text = std::fs::read_to_string(dir.join("audit.jsonl")).expect("read");
        let last: Value = serde_json::from_str(text.lines().last().expect("line")).expect("json");
        assert_eq!(last["event"], "next", "{text}");
        assert!(a.check().is_ok());

        let h = a.health().clone();
        let c = prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["file"])
            .expect("counter");
        h.set_counter(c.clone());
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        h.failed(FileKind::Recording, &dir.join("sessions/x.jsonl"), &full);
        assert_eq!(c.with_label_values(&["recording"]).get(), 1);
        assert!(h.failure().is_some_and(|e| e.contains("No space left")));
        // The recording probe succeeds here (sessions/ exists and has room): service resumes.
        std::fs::create_dir_all(dir.join("sessions")).expect("mkdir");
        assert!(a.check().is_ok());
        assert_eq!(h.failure(), None);
        let _ = std::fs::remove_dir_all(&dir);
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
