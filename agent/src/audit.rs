//! `<data_dir>/audit.jsonl`: one JSON object per line, appended with a single write(2) per
//! event so concurrent sessions never interleave partial lines.

use std::{
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
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
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

    /// Write one event; `ts` is added first. An audit write failure is logged, never fatal
    /// for the session (the decision itself was already enforced).
    pub fn write(&self, event: Map<String, Value>) {
        append_json_line(&self.file, &self.path, event);
    }
}

/// Append `{"ts": now, ...event}` and a newline with a single write(2), so concurrent writers
/// never interleave partial lines and a crash loses at most the line in flight. Shared by the
/// audit log and session recordings.
pub fn append_json_line(file: &Mutex<File>, path: &Path, event: Map<String, Value>) {
    let mut obj = Map::new();
    obj.insert("ts".into(), Value::String(now_ts()));
    obj.extend(event);
    let mut line = Value::Object(obj).to_string();
    line.push('\n');
    let mut f = crate::lock(file);
    if let Err(e) = f.write_all(line.as_bytes()) {
        tracing::error!(path = %path.display(), error = %e, "append to JSON-lines file failed");
    }
}
