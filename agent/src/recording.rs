//! Session recordings: one JSON-lines file per session under `<data_dir>/sessions/`.
//! Callers only ever pass masked values; credentials never reach a recording.
//!
//! With the agent's journal (`journal.rs`, [`Recorder::open_in`]) every line goes into the
//! journal at once, with no syscall, and reaches the file with the next drain: a crash loses
//! none. Without it every write is a single write(2) of whole lines, and a statement's line is
//! deferred ([`Recorder::defer`]) to go out in the same write(2) as the next event, normally
//! the statement's result, so a statement costs one write instead of two; a crash then loses
//! at most the statement in flight (its line and its result), never an earlier one.
//!
//! File names are `<session id>.<16 random hex digits>.jsonl`, created with `O_EXCL` and
//! `O_NOFOLLOW`: nobody can plant a file or symlink at the path a session will write. A failed
//! write is cut back and reported to the shared [`Health`] (see `audit.rs`).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::{Map, Value};

use crate::{
    audit::{Audit, FileKind, Health, Line, Sink},
    journal::Journal,
    lock,
};

/// One operation as [`Recorder::operation`] records it.
pub struct OperationEvent<'a> {
    /// `ssh`, `http`, `kubernetes`, ...
    pub protocol: &'a str,
    /// The operation's kind (`exec`, `GET`, `pods/exec`).
    pub kind: &'a str,
    /// What was attempted, as the audit log shows it (masked).
    pub text: &'a str,
    /// `allow`, `deny` or `approve`.
    pub decision: &'a str,
    /// What the client was told when it was refused.
    pub error: Option<&'a str>,
    /// The protocol's own fields.
    pub fields: Map<String, Value>,
}

pub struct Recorder {
    path: PathBuf,
    sink: Arc<Sink>,
    /// The journal, this recording's destination id in it, and its file name.
    journal: Option<(Arc<Journal>, u32, String)>,
    /// Deferred lines (statements waiting for their result), written with the next event.
    pending: Mutex<Vec<u8>>,
}

/// Deferred bytes beyond which a deferred line is written at once (a long pipeline).
const PENDING_CAP: usize = 64 * 1024;

/// Session ids become file names: keep them to a safe alphabet.
fn safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Recorder {
    /// Create the session's recording, written directly. A failure (disk full) is reported
    /// to `health` too.
    pub fn open(data_dir: &Path, session: &str, health: Arc<Health>) -> std::io::Result<Recorder> {
        let dir = data_dir.join("sessions");
        let path = dir.join(format!(
            "{}.{:016x}.jsonl",
            safe(session),
            rand::random::<u64>()
        ));
        let sink = fs::create_dir_all(&dir)
            .and_then(|()| Sink::open(path.clone(), true, FileKind::Recording, health.clone()))
            .inspect_err(|e| health.failed(FileKind::Recording, &path, e))?;
        Ok(Recorder {
            path,
            sink: Arc::new(sink),
            journal: None,
            pending: Mutex::new(Vec::new()),
        })
    }

    /// [`Recorder::open`] with `audit`'s health, its lines going through `audit`'s journal
    /// when it has one.
    pub fn open_in(data_dir: &Path, session: &str, audit: &Audit) -> std::io::Result<Recorder> {
        let mut r = Recorder::open(data_dir, session, audit.health().clone())?;
        if let Some(j) = audit.journal().filter(|j| j.data_dir() == data_dir) {
            let name = r
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let id = j.register(r.sink.clone());
            r.journal = Some((j.clone(), id, name));
        }
        Ok(r)
    }

    /// The neutral operation event every protocol can write (`tollgate replay` renders it for
    /// any protocol), with the protocol's own fields nested under its name
    /// (`{"ssh": {"channel": 2}}`). PostgreSQL keeps its `statement`/`result` events.
    pub fn operation(&self, session: &str, op: OperationEvent<'_>) {
        let mut ev = Map::new();
        ev.insert("event".into(), "operation".into());
        ev.insert("session".into(), session.into());
        ev.insert("protocol".into(), op.protocol.into());
        ev.insert("kind".into(), op.kind.into());
        ev.insert("text".into(), op.text.into());
        ev.insert("decision".into(), op.decision.into());
        ev.insert("error".into(), op.error.into());
        ev.insert(op.protocol.into(), Value::Object(op.fields));
        self.write(ev);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event (`ts` first, then the given fields), after any deferred lines.
    pub fn write(&self, event: Map<String, Value>) {
        self.write_sorted(event.iter().map(|(k, v)| (k.as_str(), v)));
    }

    /// One line of `fields`, in the order given.
    fn write_sorted<'v>(&self, fields: impl Iterator<Item = (&'v str, &'v Value)>) {
        let line = fields.fold(Line::new(""), |line, (k, v)| line.val(k, v));
        self.write_line(line);
    }

    /// Append one event built with [`Line`], after any deferred lines.
    pub fn write_line(&self, line: Line) {
        self.emit(&line.finish());
    }

    /// Keep `line` to write with the next event (see the module comment); with the journal
    /// it goes in at once.
    pub fn defer(&self, line: Line) {
        if let Some((j, id, name)) = &self.journal {
            return j.append(*id, name.as_bytes(), &line.finish(), false);
        }
        let mut p = lock(&self.pending);
        p.extend_from_slice(&line.finish());
        if p.len() >= PENDING_CAP {
            let out = std::mem::take(&mut *p);
            drop(p);
            self.sink.append(&out);
        }
    }

    fn emit(&self, line: &[u8]) {
        if let Some((j, id, name)) = &self.journal {
            return j.append(*id, name.as_bytes(), line, false);
        }
        let mut p = lock(&self.pending);
        if p.is_empty() {
            drop(p);
            self.sink.append(line);
        } else {
            p.extend_from_slice(line);
            let out = std::mem::take(&mut *p);
            drop(p);
            self.sink.append(&out);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some((j, id, name)) = &self.journal {
            // The journal releases the file once this recording's last line is written.
            return j.append(*id, name.as_bytes(), b"", true);
        }
        let p = std::mem::take(&mut *lock(&self.pending));
        if !p.is_empty() {
            self.sink.append(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(r: &Recorder) -> Vec<Value> {
        fs::read_to_string(r.path())
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn a_deferred_statement_reaches_the_file_with_the_next_event_in_order() {
        let dir = std::env::temp_dir().join(format!("tg-rec-{}", std::process::id()));
        let r = Recorder::open(&dir, "s/1", Arc::default()).expect("open");
        let name = r.path().file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            r.path().parent().is_some_and(|p| p.ends_with("sessions"))
                && name.starts_with("s_1.")
                && name.len() == "s_1.".len() + 16 + ".jsonl".len(),
            "{:?}",
            r.path()
        );
        r.write(crate::obj(json!({"event": "start"})));
        r.defer(
            Line::new("")
                .str("event", "statement")
                .str("text", "select '\"quoted\"\n\\'"),
        );
        assert_eq!(lines(&r).len(), 1, "the statement waits for its result");
        r.write_line(Line::new("").str("event", "result").val("rows", Some(3u64)));
        let got = lines(&r);
        let events: Vec<_> = got
            .iter()
            .map(|v| v["event"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(events, ["start", "statement", "result"]);
        assert_eq!(got[1]["text"], "select '\"quoted\"\n\\'");
        assert_eq!(got[2]["rows"], 3);
        assert!(got.iter().all(|v| v["ts"].is_string()));
        // A statement still deferred when the session ends is written, not lost.
        r.defer(Line::new("").str("event", "statement").opt("error", None));
        let path = r.path().to_path_buf();
        drop(r);
        let last = fs::read_to_string(&path).expect("read");
        let last: Value = serde_json::from_str(last.lines().last().expect("a line")).expect("json");
        assert_eq!(last["event"], "statement");
        assert!(last["error"].is_null());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_long_pipeline_of_deferred_lines_is_written_before_the_cap() {
        let dir = std::env::temp_dir().join(format!("tg-rec-cap-{}", std::process::id()));
        let r = Recorder::open(&dir, "cap", Arc::default()).expect("open");
        let text = "x".repeat(1000);
        for _ in 0..100 {
            r.defer(Line::new("").str("event", "statement").str("text", &text));
        }
        let n = lines(&r).len();
        assert!((60..100).contains(&n), "{n} lines on disk");
        let _ = fs::remove_dir_all(&dir);
    }
}
