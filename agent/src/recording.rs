//! Session recordings: one JSON-lines file per session under `<data_dir>/sessions/`, written a
//! line at a time with a single write(2) each, so a crash loses at most the event in flight.
//! Callers only ever pass masked values; credentials never reach a recording.

use std::{
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde_json::{Map, Value};

use crate::audit::append_json_line;

pub struct Recorder {
    path: PathBuf,
    file: Mutex<File>,
}

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
    pub fn open(data_dir: &Path, session: &str) -> std::io::Result<Recorder> {
        let dir = data_dir.join("sessions");
        fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.jsonl", safe(session)));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Recorder {
            path,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event (`ts` first, then the given fields).
    pub fn write(&self, event: Map<String, Value>) {
        append_json_line(&self.file, &self.path, event);
    }
}
