//! The audit journal: `<data_dir>/journal`, a ring of whole audit and recording lines in a
//! `MAP_SHARED` file mapping, so a statement's lines survive a crash of the agent (`kill -9`)
//! without a `write(2)` per statement.
//!
//! Why it holds: a store into a shared file mapping is in the page cache the moment it is
//! made and outlives the process; only the host losing power loses it (out of scope, as it
//! is for `write(2)` without `fsync`). The hot path copies a line into the ring under a short
//! mutex (no syscall) before the statement is forwarded. A background thread drains the ring
//! in order into `audit.jsonl` and the recordings, one `write(2)` per file per batch, and at
//! start-up [`Journal::open`] writes out what a crashed agent had not drained.
//!
//! Layout: a 4 KiB header page, then `capacity` bytes of ring addressed by a logical position
//! that only grows (`offset = position % capacity`). A record starts 8-aligned with three
//! 8-byte words: its own position (written last: a record whose first word is not its
//! position is absent or torn), `len | MAGIC << 32`, and `dest | name_len << 32 | flags << 48`;
//! then the destination's file name (empty for the audit log) and the line bytes, wrapping
//! at the ring's end.
//!
//! None twice: the drainer writes each destination's lines of a batch in one `write(2)` and
//! then flags those records drained; while the write is in flight the header names it (the
//! file's device, inode and length before), so a crash between the write and the flags is
//! resolved at start-up by the file's length. `drained` (in the header) moves past the
//! flagged prefix. A file rotated (renamed) in exactly that window may get that one batch
//! again in its successor: never lost, at worst once more in the new file.
//!
//! Full ring (the drainer cannot keep up, or cannot write at all): the writer drains itself
//! and retries, then writes its line directly; a line never waits for room and is never
//! dropped by the journal. The file is 0600, opened `O_NOFOLLOW`, locked with `flock` (one
//! agent per data_dir) and preallocated, so a full disk cannot fault a store into it. It
//! holds exactly what audit.jsonl and the recordings hold: masked text, never credentials.
//!
//! Layout: [`Journal`] (open, replay, append, drain), the drain thread, and the header and
//! record codecs; tests in `journal/tests.rs`.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    os::unix::{
        fs::{MetadataExt as _, OpenOptionsExt as _},
        io::AsRawFd as _,
    },
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::{
        atomic::{fence, AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::Duration,
};

use crate::{
    lock,
    sink::{FileKind, Health, Sink},
};

/// Ring bytes of a new journal: at 20k statements a second (about 1 KiB of lines each) 50 ms
/// of lines, while the drainer writes every 1 to 5 ms (a full ring is drained by the writer
/// itself, never dropped). Small enough to stay in the caches: a 288-byte line took 300 ns to
/// append to a 4 MiB ring and 150 ns to a 1, 0.5 or 0.25 MiB one (the stores into a ring
/// larger than the L2 cache miss it; measured with the drainer running, 2 million lines).
pub const DEFAULT_CAPACITY: u64 = 1 << 20;
/// The header page.
const HEADER: usize = 4096;
const FILE_MAGIC: [u8; 8] = *b"TGJRNL01";
/// A record's magic (second word, high half).
const REC_MAGIC: u64 = 0x4c4a_4754;
/// A record's three header words.
const REC_HDR: u64 = 24;
/// Flag: written to its file.
const DRAINED: u64 = 1 << 48;
/// Flag: the destination's last record (a recording closed); its file is released.
const CLOSE: u64 = 2 << 48;
/// The audit log's destination id.
pub const AUDIT: u32 = 0;
/// How long the drainer waits between batches while lines keep coming.
const BATCH_INTERVAL: Duration = Duration::from_millis(1);
/// A batch of at least this many lines means a busy agent: the drainer then waits
/// [`BUSY_INTERVAL`], so each file gets fewer, larger writes (the lines are safe in the
/// journal meanwhile; only their arrival in the files waits). At 256, 32 https bots making
/// 70 thousand requests a second stayed under it with 1 ms batches, and the drainer made
/// half a write(2) per request (one per recording file per batch). At 32 it waits 5 ms
/// there; `bench http` measured agent CPU per request at 0.92x, 1.00x and 1.02x the build
/// with 256 in three runs: fewer system calls, no gain above the noise.
const BUSY_LINES: usize = 32;
/// The wait between batches of a busy agent.
const BUSY_INTERVAL: Duration = Duration::from_millis(5);
/// How often lines held back by a failing file are tried again.
const FAILING_RETRY: Duration = Duration::from_millis(50);
/// Idle batches before the drainer parks (then the next append wakes it at once).
const IDLE_ROUNDS: u32 = 10;

/// The header page (repr(C), at the start of the mapping).
#[repr(C)]
struct Header {
    magic: [u8; 8],
    capacity: AtomicU64,
    /// Every record before this position is in its file.
    drained: AtomicU64,
    /// The next destination id (ids stay unique across restarts while old records wait).
    next_dest: AtomicU64,
    /// The group write in flight: its first record's position + 1 (0: none), the batch's end,
    /// and the file's device, inode and length before the write.
    inflight: AtomicU64,
    inflight_end: AtomicU64,
    inflight_dev: AtomicU64,
    inflight_ino: AtomicU64,
    inflight_len: AtomicU64,
}

/// Why the journal cannot be used (the agent then writes each line directly).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another process holds the journal's lock.
    #[error("{path} is locked by another tollgate agent using the same data_dir; give each agent its own [agent] data_dir")]
    Locked { path: String },
    /// Not a journal of this format.
    #[error("{path} is not a tollgate journal (size {size}); move it away to let the agent create a new one")]
    Foreign { path: String, size: u64 },
    /// Creating, sizing, mapping or replaying it failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// What the drainer reuses from batch to batch.
#[derive(Default)]
struct DrainState {
    /// Per destination: the records' positions and their lines, in journal order.
    groups: HashMap<u32, (Vec<u64>, Vec<u8>)>,
    /// Destination order of first appearance in the batch.
    order: Vec<u32>,
    closed: Vec<u32>,
}

pub struct Journal {
    path: PathBuf,
    data_dir: PathBuf,
    /// Kept open for the `flock`.
    _file: File,
    map: NonNull<u8>,
    map_len: usize,
    cap: u64,
    /// The append lock and the next free position.
    head: Mutex<u64>,
    /// The end of the complete records (the drainer reads up to here).
    committed: AtomicU64,
    /// Destination id to its file.
    dests: Mutex<HashMap<u32, Arc<Sink>>>,
    drain: Mutex<DrainState>,
    health: Arc<Health>,
    /// The drainer is parked: the next append unparks it.
    sleeping: AtomicBool,
    stop: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
    /// Tests: die like `kill -9` (Drop neither drains nor clears anything).
    #[cfg(test)]
    crashed: AtomicBool,
    /// Tests: the next drain dies right after its first group's write(2).
    #[cfg(test)]
    die_after_write: AtomicBool,
}

// SAFETY: the mapping is plain shared memory; every concurrent access goes through atomics
// (header words, record header words, `committed`/`drained` with acquire/release) or is to
// ring bytes that one side owns at a time: a writer owns [head, head+len) under `head` until
// it publishes `committed`; the drainer reads only below `committed` and writers reuse bytes
// only below the `drained` it publishes after reading them.
unsafe impl Send for Journal {}
// SAFETY: as above.
unsafe impl Sync for Journal {}

fn align8(n: u64) -> u64 {
    (n + 7) & !7
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A recording's file name as the journal may name it: the recorder's own alphabet.
fn safe_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name[0] != b'.'
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

impl Journal {
    /// Open (or create) `<data_dir>/journal`, write out what a previous agent left undrained
    /// into `audit` and the recordings it names, and start the drain thread.
    pub fn open(
        data_dir: &Path,
        audit: Arc<Sink>,
        health: Arc<Health>,
        capacity: u64,
    ) -> Result<Arc<Journal>, JournalError> {
        Journal::open_with(data_dir, audit, health, capacity, true)
    }

    /// [`Journal::open`]; `spawn`: start the drain thread (tests drain by hand).
    fn open_with(
        data_dir: &Path,
        audit: Arc<Sink>,
        health: Arc<Health>,
        capacity: u64,
        spawn: bool,
    ) -> Result<Arc<Journal>, JournalError> {
        let path = data_dir.join("journal");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(JournalError::Locked {
                path: path.display().to_string(),
            });
        }
        let mut file = file;
        // Twice when a journal of another size is made again (see below), under the same lock.
        loop {
            let md = file.metadata().map_err(io_err(&path))?;
            let foreign = |size| JournalError::Foreign {
                path: path.display().to_string(),
                size,
            };
            if !md.is_file() {
                return Err(foreign(md.len()));
            }
            let fresh = md.len() == 0;
            let wanted = capacity.max(64 * 1024) & !7;
            let cap = if fresh {
                let cap = wanted;
                // Allocate every block now: a store into a hole on a full disk would be SIGBUS.
                // SAFETY: posix_fallocate on a descriptor we own.
                let r = unsafe {
                    libc::posix_fallocate(file.as_raw_fd(), 0, (HEADER as u64 + cap) as i64)
                };
                if r != 0 {
                    let _ = std::fs::remove_file(&path);
                    return Err(io_err(&path)(std::io::Error::from_raw_os_error(r)));
                }
                cap
            } else {
                md.len().saturating_sub(HEADER as u64)
            };
            let map_len = HEADER + cap as usize;
            if md.len() != 0 && (md.len() < HEADER as u64 + 64 * 1024 || cap % 8 != 0) {
                return Err(foreign(md.len()));
            }
            // SAFETY: a new shared read-write mapping of the whole file, which is `map_len`
            // bytes long (checked or allocated above); unmapped in Drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io_err(&path)(std::io::Error::last_os_error()));
            }
            let map = NonNull::new(p.cast::<u8>()).ok_or_else(|| foreign(md.len()))?;
            let j = Journal {
                path: path.clone(),
                data_dir: data_dir.to_path_buf(),
                _file: file,
                map,
                map_len,
                cap,
                head: Mutex::new(0),
                committed: AtomicU64::new(0),
                dests: Mutex::new(HashMap::new()),
                drain: Mutex::new(DrainState::default()),
                health: health.clone(),
                sleeping: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                thread: OnceLock::new(),
                #[cfg(test)]
                crashed: AtomicBool::new(false),
                #[cfg(test)]
                die_after_write: AtomicBool::new(false),
            };
            let h = j.header();
            // A journal whose header was never written (the agent died right after creating it)
            // is a new one.
            let fresh = fresh || (h.magic == [0; 8] && h.capacity.load(Ordering::Relaxed) == 0);
            if fresh {
                // SAFETY: the header page is ours alone until the journal is shared.
                unsafe { std::ptr::copy_nonoverlapping(FILE_MAGIC.as_ptr(), j.map.as_ptr(), 8) };
                h.capacity.store(cap, Ordering::Relaxed);
                // Positions start at one lap, so the zeroed ring never looks like a record.
                h.drained.store(cap, Ordering::Relaxed);
                h.next_dest.store(1, Ordering::Relaxed);
            } else if h.magic != FILE_MAGIC || h.capacity.load(Ordering::Relaxed) != cap {
                return Err(foreign(md.len()));
            }
            let end = j.replay_prepare(&audit)?;
            *lock(&j.head) = end;
            j.committed.store(end, Ordering::Release);
            lock(&j.dests).insert(AUDIT, audit.clone());
            let j = Arc::new(j);
            // What a crashed agent left is written out before anything new is appended.
            j.drain_now();
            let leftover = j.header().drained.load(Ordering::Acquire) != end;
            if !leftover {
                lock(&j.dests).retain(|id, _| *id == AUDIT);
                if j.cap != wanted {
                    // A journal of another size (an earlier version's default) with nothing left
                    // in it: made again at the size asked for, under the same lock (the copied
                    // descriptor shares it while the mapping goes). One with leftovers keeps its
                    // size until they are written.
                    file = j._file.try_clone().map_err(io_err(&path))?;
                    drop(j);
                    file.set_len(0).map_err(io_err(&path))?;
                    continue;
                }
            }
            if !spawn {
                return Ok(j);
            }
            let weak = Arc::downgrade(&j);
            let t = std::thread::Builder::new()
                .name("tollgate-journal".into())
                .spawn(move || drain_loop(weak))
                .map_err(io_err(&path))?;
            let _ = j.thread.set(t.thread().clone());
            return Ok(j);
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with the header page, page-aligned, and lives as long
        // as `self`; all of Header's mutable fields are atomics.
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    /// The ring word at logical position `pos` (8-aligned).
    fn word(&self, pos: u64) -> &AtomicU64 {
        let off = HEADER + (pos % self.cap) as usize;
        // SAFETY: `off` is 8-aligned (HEADER and cap are multiples of 8, pos is 8-aligned)
        // and `off + 8 <= map_len`; the mapping outlives `self`.
        unsafe { &*self.map.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// Copy `bytes` into the ring at `pos`, wrapping.
    ///
    /// # Safety
    /// The caller owns [pos, pos + bytes.len()) of the ring (see the Sync comment).
    unsafe fn put(&self, pos: u64, bytes: &[u8]) {
        let off = (pos % self.cap) as usize;
        let first = bytes.len().min(self.cap as usize - off);
        // SAFETY: both pieces lie inside the ring (bytes.len() <= cap / 4); the caller owns
        // them.
        unsafe {
            let base = self.map.as_ptr().add(HEADER);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(off), first);
            std::ptr::copy_nonoverlapping(bytes.as_ptr().add(first), base, bytes.len() - first);
        }
    }

    /// Append the ring bytes at [pos, pos + len) to `out`, wrapping.
    ///
    /// # Safety
    /// Nobody writes [pos, pos + len) meanwhile (it is committed and not yet drained).
    unsafe fn get(&self, pos: u64, len: usize, out: &mut Vec<u8>) {
        let off = (pos % self.cap) as usize;
        let first = len.min(self.cap as usize - off);
        // SAFETY: both pieces lie inside the ring (len <= cap / 4); nobody writes them.
        unsafe {
            let base = self.map.as_ptr().add(HEADER);
            out.extend_from_slice(std::slice::from_raw_parts(base.add(off), first));
            out.extend_from_slice(std::slice::from_raw_parts(base, len - first));
        }
    }

    /// The record at `pos`, if a whole one starts there: (total size, len, dest, name_len,
    /// flags word).
    fn record(&self, pos: u64) -> Option<(u64, u64, u32, u64, u64)> {
        if self.word(pos).load(Ordering::Acquire) != pos {
            return None;
        }
        let w1 = self.word(pos + 8).load(Ordering::Relaxed);
        let w2 = self.word(pos + 16).load(Ordering::Relaxed);
        let len = w1 & 0xffff_ffff;
        let name_len = (w2 >> 32) & 0xffff;
        if w1 >> 32 != REC_MAGIC || name_len > len || REC_HDR + len > self.cap / 4 {
            return None;
        }
        Some((align8(REC_HDR + len), len, w2 as u32, name_len, w2))
    }

    /// A new destination id for `sink`; its records name its file (under `sessions/`) for
    /// a replay.
    pub fn register(&self, sink: Arc<Sink>) -> u32 {
        let mut id = 0;
        while id == AUDIT {
            id = self.header().next_dest.fetch_add(1, Ordering::Relaxed) as u32;
        }
        lock(&self.dests).insert(id, sink);
        id
    }

    /// Append `line` (whole lines) for `dest` named `name`; `close` ends the destination.
    /// `false` when the ring has no room for it now (or it is too long for the ring).
    pub fn try_append(&self, dest: u32, name: &[u8], line: &[u8], close: bool) -> bool {
        let len = (name.len() + line.len()) as u64;
        let total = align8(REC_HDR + len);
        if REC_HDR + len > self.cap / 4 || name.len() > 0xffff {
            return false;
        }
        let mut head = lock(&self.head);
        let pos = *head;
        if pos + total - self.header().drained.load(Ordering::Acquire) > self.cap {
            return false;
        }
        // SAFETY: [pos, pos + total) is below `drained + cap` (checked) and at or after
        // `head`, so no reader and no other writer touches it until `committed` moves.
        unsafe {
            self.put(pos + REC_HDR, name);
            self.put(pos + REC_HDR + name.len() as u64, line);
        }
        self.word(pos + 8)
            .store(len | REC_MAGIC << 32, Ordering::Relaxed);
        let flags = if close { CLOSE } else { 0 };
        self.word(pos + 16).store(
            dest as u64 | (name.len() as u64) << 32 | flags,
            Ordering::Relaxed,
        );
        // Last: the record exists once its first word is its position.
        self.word(pos).store(pos, Ordering::Release);
        *head = pos + total;
        self.committed.store(pos + total, Ordering::Release);
        drop(head);
        // Pairs with the drainer's fence between `sleeping = true` and its last look.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
        true
    }

    /// Append, and when the ring is full drain it here and try again; a line too long for
    /// the ring (or a ring that cannot be drained) is written directly after everything
    /// before it. Returns once the line is in the journal or its file.
    pub fn append(&self, dest: u32, name: &[u8], line: &[u8], close: bool) {
        if self.try_append(dest, name, line, close) {
            return;
        }
        let mut st = lock(&self.drain);
        self.drain_locked(&mut st);
        if self.try_append(dest, name, line, close) {
            return;
        }
        // Still no room: the earlier lines could not be written (their file's disk is full)
        // or this one is larger than a quarter of the ring. Write it where it belongs; the
        // file's health reports a failure.
        if !line.is_empty() {
            if let Some(d) = lock(&self.dests).get(&dest).cloned() {
                d.append(line);
            }
        }
        if close {
            lock(&self.dests).remove(&dest);
        }
    }

    /// Drain everything committed so far, here (SIGHUP, a full ring, a health probe).
    pub fn drain_now(&self) {
        #[cfg(test)]
        if self.crashed.load(Ordering::Acquire) {
            return;
        }
        let mut st = lock(&self.drain);
        self.drain_locked(&mut st);
    }

    /// Run `f` with nothing left undrained and the drainer held off (a rotation swaps the
    /// audit file in between).
    pub fn drained<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut st = lock(&self.drain);
        self.drain_locked(&mut st);
        f()
    }

    /// One batch: every committed record not yet drained, one write(2) per destination.
    /// Returns how many records it wrote.
    fn drain_locked(&self, st: &mut DrainState) -> usize {
        let h = self.header();
        let start = h.drained.load(Ordering::Acquire);
        let end = self.committed.load(Ordering::Acquire);
        if start == end {
            return 0;
        }
        for (p, b) in st.groups.values_mut() {
            p.clear();
            b.clear();
        }
        st.order.clear();
        st.closed.clear();
        let mut pos = start;
        while pos < end {
            let Some((total, len, dest, name_len, w2)) = self.record(pos) else {
                // Cannot happen below `committed`; stop rather than read garbage.
                tracing::error!(pos, "journal record missing below the committed end");
                break;
            };
            if w2 & DRAINED == 0 {
                let (ps, bytes) = st.groups.entry(dest).or_default();
                if ps.is_empty() {
                    st.order.push(dest);
                }
                ps.push(pos);
                // SAFETY: committed and not yet drained: no writer reuses it.
                unsafe { self.get(pos + REC_HDR + name_len, (len - name_len) as usize, bytes) };
                if w2 & CLOSE != 0 {
                    st.closed.push(dest);
                }
            }
            pos += total;
        }
        let mut written = 0;
        let order = std::mem::take(&mut st.order);
        for dest in &order {
            let Some((ps, bytes)) = st.groups.get(dest) else {
                continue;
            };
            let d = lock(&self.dests).get(dest).cloned();
            let ok = match d {
                None => {
                    // A destination the journal no longer knows (cannot happen: it is
                    // released only after its CLOSE record is drained).
                    tracing::error!(dest, "journal lines for an unknown destination dropped");
                    true
                }
                Some(_) if bytes.is_empty() => true,
                Some(d) => self.write_group(&d, ps[0], end, bytes),
            };
            #[cfg(test)]
            if self.die_after_write.swap(false, Ordering::AcqRel) {
                self.crashed.store(true, Ordering::Release);
                return written;
            }
            if ok {
                for p in ps {
                    self.word(p + 16).fetch_or(DRAINED, Ordering::Release);
                }
                written += ps.len();
            }
            h.inflight.store(0, Ordering::Release);
        }
        st.order = order;
        // Move `drained` past the flagged prefix.
        let mut pos = start;
        while pos < end {
            match self.record(pos) {
                Some((total, .., w2)) if w2 & DRAINED != 0 => pos += total,
                _ => break,
            }
        }
        h.drained.store(pos, Ordering::Release);
        if !st.closed.is_empty() {
            let mut dests = lock(&self.dests);
            for d in &st.closed {
                dests.remove(d);
            }
        }
        // Groups of destinations gone quiet are dropped with their buffers.
        if st.groups.len() > 64 {
            st.groups.retain(|_, (p, _)| !p.is_empty());
        }
        written
    }

    /// One destination's lines of a batch, with the in-flight note around the write(2).
    fn write_group(&self, sink: &Sink, first: u64, end: u64, bytes: &[u8]) -> bool {
        let h = self.header();
        let Some((dev, ino, len)) = sink.identity() else {
            return sink.append(bytes);
        };
        h.inflight_end.store(end, Ordering::Relaxed);
        h.inflight_dev.store(dev, Ordering::Relaxed);
        h.inflight_ino.store(ino, Ordering::Relaxed);
        h.inflight_len.store(len, Ordering::Relaxed);
        h.inflight.store(first + 1, Ordering::Release);
        let ok = sink.append(bytes);
        // The records' DRAINED flags are set by the caller right after; a crash before that
        // is resolved from the note (see replay_prepare).
        if !ok {
            h.inflight.store(0, Ordering::Release);
        }
        ok
    }

    /// At open: find the end of the whole records, settle a group write a crash
    /// interrupted, and register a destination for every file the leftovers name.
    /// Returns the end (the next free position).
    fn replay_prepare(&self, audit: &Arc<Sink>) -> Result<u64, JournalError> {
        let h = self.header();
        let start = h.drained.load(Ordering::Acquire);
        let mut end = start;
        while let Some((total, ..)) = self.record(end) {
            end += total;
            if end - start > self.cap {
                break;
            }
        }
        let inflight = h.inflight.load(Ordering::Acquire);
        if inflight != 0 && (start..end).contains(&(inflight - 1)) {
            self.settle_inflight(
                inflight - 1,
                end.min(h.inflight_end.load(Ordering::Relaxed)),
                audit,
            );
        }
        h.inflight.store(0, Ordering::Release);
        // The audit file may have been cut back: the sink learns its length again.
        audit.reopen().map_err(io_err(audit.path()))?;
        // A destination per leftover recording (audit is registered by the caller).
        let mut dests = lock(&self.dests);
        let mut pos = start;
        let mut count = 0u64;
        while pos < end {
            let Some((total, _, dest, name_len, w2)) = self.record(pos) else {
                break;
            };
            if w2 & DRAINED == 0 {
                count += 1;
                if dest != AUDIT && !dests.contains_key(&dest) {
                    let mut name = Vec::new();
                    // SAFETY: no other thread exists yet.
                    unsafe { self.get(pos + REC_HDR, name_len as usize, &mut name) };
                    match self.replay_sink(&name) {
                        Some(sink) => {
                            dests.insert(dest, sink);
                        }
                        None => tracing::error!(
                            name = %String::from_utf8_lossy(&name),
                            "journal names a recording that cannot be opened; its lines stay in the journal"
                        ),
                    }
                }
            }
            pos += total;
        }
        if count > 0 {
            tracing::warn!(
                lines = count,
                journal = %self.path.display(),
                "writing out audit and recording lines a previous agent left in its journal"
            );
        }
        Ok(end)
    }

    /// A recording file named in the journal, opened for appending (created if an
    /// administrator removed it meanwhile).
    fn replay_sink(&self, name: &[u8]) -> Option<Arc<Sink>> {
        if !safe_name(name) {
            return None;
        }
        let name = std::str::from_utf8(name).ok()?;
        let path = self.data_dir.join("sessions").join(name);
        Sink::open(path, false, FileKind::Recording, self.health.clone())
            .ok()
            .map(Arc::new)
    }

    /// The group write that was in flight when the agent died: if its file (same device and
    /// inode) holds all of it, flag its records drained; if part of it, cut that part off so
    /// it is written again whole.
    fn settle_inflight(&self, first: u64, end: u64, audit: &Arc<Sink>) {
        let h = self.header();
        let Some((_, _, dest, name_len, _)) = self.record(first) else {
            return;
        };
        let path = if dest == AUDIT {
            audit.path().to_path_buf()
        } else {
            let mut name = Vec::new();
            // SAFETY: no other thread exists yet.
            unsafe { self.get(first + REC_HDR, name_len as usize, &mut name) };
            if !safe_name(&name) {
                return;
            }
            self.data_dir
                .join("sessions")
                .join(String::from_utf8_lossy(&name).as_ref())
        };
        let mut ps = Vec::new();
        let mut bytes = 0u64;
        let mut pos = first;
        while pos < end {
            let Some((total, len, d, nl, w2)) = self.record(pos) else {
                break;
            };
            if d == dest && w2 & DRAINED == 0 {
                ps.push(pos);
                bytes += len - nl;
            }
            pos += total;
        }
        let Ok(f) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            return;
        };
        let Ok(md) = f.metadata() else {
            return;
        };
        let before = h.inflight_len.load(Ordering::Relaxed);
        if md.dev() != h.inflight_dev.load(Ordering::Relaxed)
            || md.ino() != h.inflight_ino.load(Ordering::Relaxed)
        {
            return;
        }
        if md.len() >= before + bytes {
            for p in ps {
                self.word(p + 16).fetch_or(DRAINED, Ordering::Release);
            }
        } else if md.len() > before {
            if let Err(e) = f.set_len(before) {
                tracing::error!(error = %e, path = %path.display(), "cannot cut a partial batch back");
            }
        }
    }

    /// For commands that read the record (`sessions list`, `replay`): if an agent stopped
    /// with lines still in `<data_dir>/journal` and no agent holds it now, write them out
    /// (as the next agent start would, each once). Nothing happens while an agent runs (it
    /// drains its journal itself) or when there is no journal.
    pub fn recover(data_dir: &Path) {
        if std::fs::symlink_metadata(data_dir.join("journal")).is_err() {
            return;
        }
        let health = Arc::new(Health::default());
        let Ok(audit) = Sink::open(
            data_dir.join("audit.jsonl"),
            false,
            FileKind::Audit,
            health.clone(),
        ) else {
            return;
        };
        // Drop drains and releases the lock; a Locked error means an agent runs.
        let _ = Journal::open_with(data_dir, Arc::new(audit), health, DEFAULT_CAPACITY, false);
    }

    /// The data_dir whose `sessions/` the recordings it names are in.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Undrained bytes (for tests and status).
    pub fn backlog(&self) -> u64 {
        self.committed.load(Ordering::Acquire) - self.header().drained.load(Ordering::Acquire)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let st = self.drain.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut st = std::mem::take(st);
        #[cfg(test)]
        let crashed = self.crashed.load(Ordering::Acquire);
        #[cfg(not(test))]
        let crashed = false;
        if !crashed {
            self.drain_locked(&mut st);
        }
        // SAFETY: the mapping made in `open`, unmapped once; nothing refers to it after.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// The drain thread: a batch every [`BATCH_INTERVAL`] while lines come ([`BUSY_INTERVAL`]
/// while many do), parked when idle
/// (the next append unparks it, so a lone statement's lines reach their files at once).
fn drain_loop(j: Weak<Journal>) {
    let mut idle = 0u32;
    loop {
        let Some(jj) = j.upgrade() else {
            return;
        };
        if jj.stop.load(Ordering::Acquire) {
            return;
        }
        let n = {
            let mut st = lock(&jj.drain);
            jj.drain_locked(&mut st)
        };
        if n > 0 || jj.backlog() > 0 {
            idle = 0;
            // Lines held back by a failing file (disk full): retry at a calmer pace; the
            // gate's own retries (Audit::check) drain at once when asked.
            let pause = if n == 0 && jj.health.failure().is_some() {
                FAILING_RETRY
            } else if n >= BUSY_LINES {
                BUSY_INTERVAL
            } else {
                BATCH_INTERVAL
            };
            drop(jj);
            std::thread::sleep(pause);
            continue;
        }
        idle += 1;
        if idle < IDLE_ROUNDS {
            drop(jj);
            std::thread::sleep(BATCH_INTERVAL);
            continue;
        }
        // Going to sleep: the buffers kept for each destination of the last batches go too
        // (a host of idle sessions keeps none).
        drop(std::mem::take(&mut lock(&jj.drain).groups));
        jj.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let pending = jj.backlog() > 0;
        drop(jj);
        if pending {
            continue;
        }
        // Woken by an append (or once a second to notice the journal is gone).
        std::thread::park_timeout(Duration::from_secs(1));
        idle = 0;
        if let Some(jj) = j.upgrade() {
            jj.sleeping.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests;
