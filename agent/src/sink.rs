//! The files the agent appends JSON lines to (audit.jsonl, recordings): [`Sink`], whole-line
//! appends that cut a failed write back ([`append_whole`]), safe opening ([`open_append`]),
//! and the shared write [`Health`]. Below both `audit.rs` and `journal.rs`.
//!
//! Layout: [`Sink`], [`FileKind`], [`Health`], then the file helpers.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
};

/// An append-only JSON-lines file (audit.jsonl or one recording): the file, its length as
/// written through it, and the shared [`Health`] its failures are reported to.
pub struct Sink {
    path: PathBuf,
    kind: FileKind,
    health: Arc<Health>,
    file: Mutex<SinkFile>,
}

struct SinkFile {
    file: File,
    dev: u64,
    ino: u64,
    /// The file's length after our last write (the journal's in-flight note uses it).
    len: u64,
}

impl Sink {
    /// Open `path` for appending (see [`open_append`]).
    pub fn open(
        path: PathBuf,
        create_new: bool,
        kind: FileKind,
        health: Arc<Health>,
    ) -> std::io::Result<Sink> {
        let file = SinkFile::open(&path, create_new)?;
        Ok(Sink {
            path,
            kind,
            health,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append whole lines with one write(2); `false` (reported to the health) on failure.
    pub fn append(&self, bytes: &[u8]) -> bool {
        let mut f = crate::lock(&self.file);
        match append_whole(&mut f.file, bytes) {
            Ok(()) => {
                f.len += bytes.len() as u64;
                drop(f);
                self.health.ok(self.kind);
                true
            }
            Err(e) => {
                if let Ok(md) = f.file.metadata() {
                    f.len = md.len();
                }
                drop(f);
                self.health.failed(self.kind, &self.path, &e);
                false
            }
        }
    }

    /// The file's device, inode and length as written through this sink.
    pub fn identity(&self) -> Option<(u64, u64, u64)> {
        let f = crate::lock(&self.file);
        Some((f.dev, f.ino, f.len))
    }

    /// Open the path again (after a rotation); the old file is kept if that fails.
    pub fn reopen(&self) -> std::io::Result<()> {
        let file = SinkFile::open(&self.path, false)?;
        *crate::lock(&self.file) = file;
        Ok(())
    }
}

impl SinkFile {
    fn open(path: &Path, create_new: bool) -> std::io::Result<SinkFile> {
        let file = open_append(path, create_new)?;
        let md = file.metadata()?;
        use std::os::unix::fs::MetadataExt as _;
        Ok(SinkFile {
            dev: md.dev(),
            ino: md.ino(),
            len: md.len(),
            file,
        })
    }
}

/// Which kind of file a write failure concerns (the `file` label of the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `audit.jsonl`.
    Audit,
    /// A session recording under `sessions/`.
    Recording,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Audit => "audit",
            FileKind::Recording => "recording",
        }
    }
}

/// Whether the audit log and the recordings can be written. One atomic load on the hot path
/// while everything is fine.
#[derive(Default)]
pub struct Health {
    pub(crate) any: AtomicBool,
    pub(crate) audit: Mutex<Option<String>>,
    recording: Mutex<Option<String>>,
    counter: OnceLock<prometheus::IntCounterVec>,
    /// `<data_dir>/sessions`, where a recording probe is written.
    pub(crate) sessions_dir: OnceLock<PathBuf>,
}

impl Health {
    /// The counter of failed writes (`tollgate_audit_write_errors_total{file}`).
    pub fn set_counter(&self, c: prometheus::IntCounterVec) {
        let _ = self.counter.set(c);
    }

    fn slot(&self, kind: FileKind) -> &Mutex<Option<String>> {
        match kind {
            FileKind::Audit => &self.audit,
            FileKind::Recording => &self.recording,
        }
    }

    /// A write of `kind` failed.
    pub fn failed(&self, kind: FileKind, path: &Path, e: &std::io::Error) {
        if let Some(c) = self.counter.get() {
            c.with_label_values(&[kind.as_str()]).inc();
        }
        let msg = format!("{} {}: {e}", kind.as_str(), path.display());
        let mut slot = crate::lock(self.slot(kind));
        if slot.is_none() {
            tracing::error!(error = %msg, "audit write failed: new connections and statements are refused until it can be written (fail_mode = \"closed\")");
        }
        *slot = Some(msg);
        self.any.store(true, Ordering::Release);
    }

    /// A write of `kind` succeeded.
    pub fn ok(&self, kind: FileKind) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut slot = crate::lock(self.slot(kind));
        if slot.take().is_some() {
            tracing::warn!(file = kind.as_str(), "audit writes succeed again");
        }
        drop(slot);
        if crate::lock(&self.audit).is_none() && crate::lock(&self.recording).is_none() {
            self.any.store(false, Ordering::Release);
        }
    }

    /// The current failure, if any (for `/healthz`), without trying to write.
    pub fn failure(&self) -> Option<String> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let a = crate::lock(&self.audit).clone();
        let r = crate::lock(&self.recording).clone();
        match (a, r) {
            (None, None) => None,
            (Some(x), None) | (None, Some(x)) => Some(x),
            (Some(a), Some(r)) => Some(format!("{a}; {r}")),
        }
    }

    /// Try the failed recording path again with a small probe file (the audit log is retried
    /// by [`Audit::check`] itself).
    pub(crate) fn probe_recording(&self) {
        if crate::lock(&self.recording).is_none() {
            return;
        }
        let Some(dir) = self.sessions_dir.get() else {
            return;
        };
        let path = dir.join(format!(".write-probe-{}", std::process::id()));
        let r = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&[b'\n'; 512]).and_then(|()| f.sync_data()));
        let _ = std::fs::remove_file(&path);
        match r {
            Ok(()) => self.ok(FileKind::Recording),
            Err(e) => self.failed(FileKind::Recording, dir, &e),
        }
    }
}

/// Open a JSON-lines file for appending: never through a symlink, created 0600. A file
/// whose last byte is not a newline (a crash in the middle of a line) gets one, so the next
/// line starts on its own.
pub(crate) fn open_append(path: &Path, create_new: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.append(true)
        .read(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    if create_new {
        o.create_new(true);
    } else {
        o.create(true);
    }
    let mut f = o.open(path)?;
    let len = f.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")?;
        }
    }
    Ok(f)
}

/// Append `bytes` with one write(2) (more only after a short write). On failure the bytes of
/// this call that did reach the file are cut off again (the file is opened `O_APPEND` and
/// written under its lock, so they are its last bytes), so no partial line is left behind.
/// No extra syscall when the write succeeds.
pub(crate) fn append_whole(f: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match f.write(&bytes[written..]) {
            Ok(0) => return Err(cut(f, written, std::io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(cut(f, written, e)),
        }
    }
    Ok(())
}

/// Remove the `written` bytes a failed append left at the end of `f`; returns `e`.
fn cut(f: &File, written: usize, e: std::io::Error) -> std::io::Error {
    if written > 0 {
        let r = f
            .metadata()
            .and_then(|m| f.set_len(m.len().saturating_sub(written as u64)));
        if let Err(t) = r {
            tracing::error!(error = %t, "cannot cut a partial line back");
        }
    }
    e
}
