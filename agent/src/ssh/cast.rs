//! Terminal recordings as asciicast v2 (`asciinema play FILE`): a header line, then one
//! `[seconds, "o", text]` line per output chunk and `[seconds, "r", "COLSxROWS"]` per resize.
//! Input is not recorded (it may carry what a human typed at a password prompt).
//!
//! Files are `<data_dir>/sessions/<session>.<16 hex>.<channel>.cast`, created like the JSON-lines
//! recordings (`O_EXCL`, `O_NOFOLLOW`); the session's JSON-lines recording names the file.
//! Output is masked with the SSH detectors (`private_key`, `aws_access_key`, `jwt`,
//! `bearer_token`) across the chunks it arrives in: the trailing word of each chunk (what
//! follows the last whitespace), a `Bearer` word with it, and an open `-----BEGIN ...` block
//! wait for the next chunk, so a secret that a program prints over several reads is masked
//! whole. What waits is written with the next output or when the channel ends (the recording
//! may lag the terminal by a word).

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
    carry: MaskedOutput,
}

/// Output masked across the chunks it arrives in (see the module docs): what may be the first
/// part of a secret waits for the next chunk. The cast's, and the JSON-lines output of a
/// `kubectl exec` without a terminal.
#[derive(Default)]
pub struct MaskedOutput {
    /// Output not yet written (see [`stable_prefix`]).
    carry: Mutex<Vec<u8>>,
}

impl MaskedOutput {
    /// `bytes` after what waited: the masked text to write now, if any.
    pub fn push(&self, bytes: &[u8], masker: &Masker) -> Option<String> {
        let mut carry = lock(&self.carry);
        carry.extend_from_slice(bytes);
        let cut = stable_prefix(&carry);
        let chunk: Vec<u8> = carry.drain(..cut).collect();
        drop(carry);
        masked_text(&chunk, masker)
    }

    /// The output ended (or switches streams): what waited, masked.
    pub fn flush(&self, masker: &Masker) -> Option<String> {
        let chunk = std::mem::take(&mut *lock(&self.carry));
        masked_text(&chunk, masker)
    }
}

fn masked_text(chunk: &[u8], masker: &Masker) -> Option<String> {
    if chunk.is_empty() {
        return None;
    }
    Some(match masker.mask_text(chunk, false) {
        Some(Masked::Value(v, _)) => String::from_utf8_lossy(&v).into_owned(),
        Some(Masked::Null(_)) => String::new(),
        None => String::from_utf8_lossy(chunk).into_owned(),
    })
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
            carry: MaskedOutput::default(),
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

    /// Record terminal output (masked by `masker`); what may continue a secret waits.
    pub fn output(&self, bytes: &[u8], masker: &Masker) {
        if let Some(t) = self.carry.push(bytes, masker) {
            self.event("o", &t);
        }
    }

    /// The channel ended: write what was waiting.
    pub fn finish(&self, masker: &Masker) {
        if let Some(t) = self.carry.flush(masker) {
            self.event("o", &t);
        }
    }

    /// Record a terminal resize.
    pub fn resize(&self, cols: u32, rows: u32) {
        self.event("r", &format!("{cols}x{rows}"));
    }
}

/// A `-----BEGIN` block waits for its `-----END` up to this size, a trailing word up to
/// [`WORD_MAX`]; beyond, the text is written (masked as it stands: a key block without its end
/// is masked to the end of what is written).
const BLOCK_MAX: usize = 1 << 20;
const WORD_MAX: usize = 16 << 10;

/// How much of `b` can be masked and written now: up to its last whitespace, except that an
/// open `-----BEGIN ` block and a `Bearer` word before the last one wait with the rest (the
/// detectors need them whole), and an incomplete UTF-8 sequence at the end waits for its tail.
fn stable_prefix(b: &[u8]) -> usize {
    if let Some(begin) = memchr::memmem::rfind(b, b"-----BEGIN ") {
        if memchr::memmem::find(&b[begin..], b"-----END ").is_none() && b.len() - begin <= BLOCK_MAX
        {
            return whitespace_cut(&b[..begin]);
        }
    }
    let cut = whitespace_cut(b);
    if b.len() - cut > WORD_MAX {
        return utf8_complete(b);
    }
    cut
}

/// Just after the last whitespace of `b`, moved back before a `Bearer` word that precedes it.
fn whitespace_cut(b: &[u8]) -> usize {
    let Some(ws) = b.iter().rposition(u8::is_ascii_whitespace) else {
        return 0;
    };
    let cut = ws + 1;
    // The word before the whitespace run.
    let word_end = b[..cut]
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |p| p + 1);
    let word_start = b[..word_end]
        .iter()
        .rposition(u8::is_ascii_whitespace)
        .map_or(0, |p| p + 1);
    if b[word_start..word_end].eq_ignore_ascii_case(b"bearer") {
        word_start
    } else {
        cut
    }
}

/// The length of `b` without an incomplete UTF-8 sequence at its end.
fn utf8_complete(b: &[u8]) -> usize {
    match std::str::from_utf8(b) {
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        _ => b.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(pieces: &[&str]) -> String {
        let dir = std::env::temp_dir().join(format!(
            "tg-cast-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let masker = Masker::with_detectors(
            crate::ssh::SSH_DETECTORS,
            tollgate_policy::MaskStyle::Full,
            [7; 32],
        );
        let cast = Cast::create(&dir, "s", 0, 80, 24, "xterm").expect("create");
        for p in pieces {
            cast.output(p.as_bytes(), &masker);
        }
        cast.finish(&masker);
        let text = std::fs::read_to_string(&cast.path).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        // The output events' text, concatenated.
        text.lines()
            .skip(1)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v[1] == "o")
            .filter_map(|v| v[2].as_str().map(str::to_string))
            .collect()
    }

    #[test]
    fn secrets_split_across_chunks_are_masked_whole() {
        let aws = "AKIAIOSFODNN7EXAMPLE";
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2lnbmF0dXJlLXZhbHVlLWhlcmU";
        let token = "abcdefghijklmnopqrstuvwxyz012345";
        let body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ";
        let cases: Vec<(String, Vec<String>)> = vec![
            (
                aws.into(),
                vec!["key: AKIAIOSF".into(), "ODNN7EXAMPLE done\r\n".into()],
            ),
            (
                jwt.into(),
                vec![format!("t={}", &jwt[..25]), format!("{}\n", &jwt[25..])],
            ),
            (
                token.into(),
                vec!["Authorization: Bearer ".into(), format!("{token}\r\n")],
            ),
            (
                token.into(),
                vec!["Authorization: Bear".into(), format!("er {token}\r\n")],
            ),
            (
                body.into(),
                vec![
                    "-----BEGIN OPENSSH PRIVATE KEY-----\n".into(),
                    body[..20].to_string(),
                    format!("{}\n-----END OPENSSH ", &body[20..]),
                    "PRIVATE KEY-----\n$ ".into(),
                ],
            ),
        ];
        for (secret, pieces) in cases {
            let whole: String = pieces.concat();
            assert!(whole.contains(&secret));
            let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
            let out = recorded(&refs);
            for part in [&secret[..10], &secret[secret.len() - 10..]] {
                assert!(!out.contains(part), "{part:?} of {secret} kept: {out:?}");
            }
            // Everything else is kept, in order.
            assert!(out.ends_with('\n') || out.ends_with("$ "), "{out:?}");
        }
        // Plain output passes unchanged, a multibyte character split across chunks too.
        let out = recorded(&["h\u{e9}llo w", "orld \u{1f600}"]);
        assert_eq!(out, "h\u{e9}llo world \u{1f600}");
        let bytes = "\u{1f600}".as_bytes();
        let dir = std::env::temp_dir().join(format!("tg-cast-utf8-{}", std::process::id()));
        let masker = Masker::with_detectors(&[], tollgate_policy::MaskStyle::Full, [7; 32]);
        let cast = Cast::create(&dir, "s", 0, 80, 24, "xterm").expect("create");
        cast.output(&bytes[..2], &masker);
        cast.output(&bytes[2..], &masker);
        cast.finish(&masker);
        let text = std::fs::read_to_string(&cast.path).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            text.contains('\u{1f600}') && !text.contains('\u{fffd}'),
            "{text}"
        );
    }
}
