//! Terminal recordings as asciicast v2 (`asciinema play FILE`): a header line, then one
//! `[seconds, "o", text]` line per output chunk and `[seconds, "r", "COLSxROWS"]` per resize.
//! Input is not recorded (it may carry what a human typed at a password prompt).
//!
//! Files are `<data_dir>/sessions/<session>.<16 hex>.<channel>.cast`, created like the JSON-lines
//! recordings (`O_EXCL`, `O_NOFOLLOW`); the session's JSON-lines recording names the file.
//! Output is masked chunk by chunk with the SSH detectors: a secret split across two chunks
//! can escape the detectors (a documented limit).

use std::{fs::File, path::PathBuf, sync::Mutex, time::Instant};

use serde_json::json;

use crate::{
    audit::{append_whole, open_append},
    lock,
    mask::{Masked, Masker},
};

pub struct Cast {
    path: PathBuf,
    file: Mutex<File>,
    started: Instant,
    /// Bytes of an incomplete UTF-8 sequence at the end of the last chunk.
    carry: Mutex<Vec<u8>>,
}

impl Cast {
    /// Create the file and write the header.
    pub fn create(
        data_dir: &std::path::Path,
        session: &str,
        channel: u32,
        width: u32,
        height: u32,
        term: &str,
    ) -> std::io::Result<Cast> {
        let dir = data_dir.join("sessions");
        std::fs::create_dir_all(&dir)?;
        let safe: String = session
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!(
            "{safe}.{:016x}.{channel}.cast",
            rand::random::<u64>()
        ));
        let mut file = open_append(&path, true)?;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = json!({
            "version": 2, "width": width.max(1), "height": height.max(1),
            "timestamp": timestamp, "env": {"TERM": term},
        });
        append_whole(&mut file, format!("{header}\n").as_bytes())?;
        Ok(Cast {
            path,
            file: Mutex::new(file),
            started: Instant::now(),
            carry: Mutex::new(Vec::new()),
        })
    }

    /// The file's name (what the JSON-lines recording refers to).
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn event(&self, kind: &str, data: &str) {
        let t = self.started.elapsed().as_secs_f64();
        let line = format!("{}\n", json!([(t * 1e6).round() / 1e6, kind, data]));
        let _ = append_whole(&mut lock(&self.file), line.as_bytes());
    }

    /// Record terminal output (masked by `masker`).
    pub fn output(&self, bytes: &[u8], masker: &Masker) {
        let mut carry = lock(&self.carry);
        carry.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&carry) {
            Ok(_) => carry.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => carry.len(),
        };
        let chunk: Vec<u8> = carry.drain(..valid).collect();
        drop(carry);
        if chunk.is_empty() {
            return;
        }
        let text = match masker.mask_text(&chunk, false) {
            Some(Masked::Value(v, _)) => String::from_utf8_lossy(&v).into_owned(),
            Some(Masked::Null(_)) => String::new(),
            None => String::from_utf8_lossy(&chunk).into_owned(),
        };
        self.event("o", &text);
    }

    /// Record a terminal resize.
    pub fn resize(&self, cols: u32, rows: u32) {
        self.event("r", &format!("{cols}x{rows}"));
    }
}
