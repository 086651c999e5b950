use super::*;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("tg-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sessions")).expect("mkdir");
        Dir(d)
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.0.join("audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const SMALL: u64 = 64 * 1024;

/// A sink for `name` under `dir` (a recording when `kind` says so).
fn sink(dir: &Dir, name: &str, kind: FileKind, health: &Arc<Health>) -> Arc<Sink> {
    let create_new = kind == FileKind::Recording;
    Arc::new(Sink::open(dir.0.join(name), create_new, kind, health.clone()).expect("sink"))
}

/// A journal over `dir` without its drain thread (the test drains), and the audit sink.
fn open(dir: &Dir) -> (Arc<Journal>, Arc<Sink>) {
    let health = Arc::new(Health::default());
    let sink = sink(dir, "audit.jsonl", FileKind::Audit, &health);
    let j = Journal::open_with(&dir.0, sink.clone(), health, SMALL, false).expect("journal");
    (j, sink)
}

/// Die like kill -9: nothing drained, nothing cleaned.
fn crash(j: Arc<Journal>) {
    j.crashed.store(true, Ordering::Release);
    drop(j);
}

fn line(i: usize) -> Vec<u8> {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 300)).into_bytes()
}

fn numbers(text: &str) -> Vec<u64> {
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("whole JSON line");
            v["n"].as_u64().expect("n")
        })
        .collect()
}

#[test]
fn lines_reach_their_files_in_order_across_many_laps() {
    let dir = Dir::new("laps");
    let (j, _) = open(&dir);
    let rec = sink(
        &dir,
        "sessions/s-1.00.jsonl",
        FileKind::Recording,
        &Arc::default(),
    );
    let id = j.register(rec);
    // About 20 laps of a 64 KiB ring, drained every 50 lines.
    for i in 0..4000 {
        j.append(AUDIT, b"", &line(i), false);
        j.append(id, b"s-1.00.jsonl", &line(i), false);
        if i % 50 == 49 {
            j.drain_now();
        }
    }
    j.append(id, b"s-1.00.jsonl", b"", true);
    j.drain_now();
    assert_eq!(j.backlog(), 0);
    let want: Vec<u64> = (0..4000).collect();
    assert_eq!(numbers(&dir.audit()), want);
    let rec = std::fs::read_to_string(dir.0.join("sessions/s-1.00.jsonl")).expect("read");
    assert_eq!(numbers(&rec), want);
    assert!(
        !lock(&j.dests).contains_key(&id),
        "a closed recording's file is released"
    );
}

#[test]
fn a_crash_leaves_lines_that_the_next_open_writes_once() {
    let dir = Dir::new("replay");
    let (j, _) = open(&dir);
    for i in 0..10 {
        j.append(AUDIT, b"", &line(i), false);
    }
    j.drain_now();
    let rec = sink(
        &dir,
        "sessions/s-2.ab.jsonl",
        FileKind::Recording,
        &Arc::default(),
    );
    let id = j.register(rec);
    for i in 10..25 {
        j.append(AUDIT, b"", &line(i), false);
        j.append(id, b"s-2.ab.jsonl", &line(i), false);
    }
    crash(j);
    assert_eq!(numbers(&dir.audit()), (0..10).collect::<Vec<_>>());
    // The next agent writes the 15 left lines, once; a third open adds nothing.
    for _ in 0..2 {
        let (j, _) = open(&dir);
        assert_eq!(j.backlog(), 0);
        assert_eq!(numbers(&dir.audit()), (0..25).collect::<Vec<_>>());
        let rec = std::fs::read_to_string(dir.0.join("sessions/s-2.ab.jsonl")).expect("read");
        assert_eq!(numbers(&rec), (10..25).collect::<Vec<_>>());
        // New lines after a replay go on after the old ones.
        j.append(AUDIT, b"", &line(1000), false);
        j.drain_now();
        assert_eq!(numbers(&dir.audit()).last(), Some(&1000));
        let text = dir.audit();
        let mut lines = text.lines().collect::<Vec<_>>();
        lines.pop();
        std::fs::write(dir.0.join("audit.jsonl"), lines.join("\n") + "\n").expect("trim");
    }
}

#[test]
fn a_torn_last_record_is_ignored_and_overwritten() {
    let dir = Dir::new("torn");
    let (j, _) = open(&dir);
    for i in 0..5 {
        j.append(AUDIT, b"", &line(i), false);
    }
    // Killed inside the append lock: payload and two header words written, not the first.
    let pos = *lock(&j.head);
    let torn = line(99);
    // SAFETY: the test owns the ring past head.
    unsafe { j.put(pos + REC_HDR, &torn[..torn.len() / 2]) };
    j.word(pos + 8)
        .store(torn.len() as u64 | REC_MAGIC << 32, Ordering::Relaxed);
    crash(j);
    let (j, _) = open(&dir);
    assert_eq!(numbers(&dir.audit()), (0..5).collect::<Vec<_>>());
    j.append(AUDIT, b"", &line(5), false);
    j.drain_now();
    crash(j);
    let (_j, _) = open(&dir);
    assert_eq!(numbers(&dir.audit()), (0..6).collect::<Vec<_>>());
}

#[test]
fn a_crash_between_the_write_and_its_flags_writes_nothing_twice() {
    let dir = Dir::new("inflight");
    let (j, _) = open(&dir);
    for i in 0..20 {
        j.append(AUDIT, b"", &line(i), false);
    }
    j.die_after_write.store(true, Ordering::Release);
    j.drain_now();
    crash(j);
    // The write(2) happened, the flags did not.
    assert_eq!(numbers(&dir.audit()).len(), 20);
    let (j, _) = open(&dir);
    assert_eq!(numbers(&dir.audit()), (0..20).collect::<Vec<_>>());
    drop(j);

    // A write cut short by the crash: its part is cut off and the batch written whole.
    let dir = Dir::new("inflight-partial");
    let (j, _) = open(&dir);
    j.append(AUDIT, b"", &line(0), false);
    j.drain_now();
    let before = std::fs::metadata(dir.0.join("audit.jsonl"))
        .expect("md")
        .len();
    for i in 1..20 {
        j.append(AUDIT, b"", &line(i), false);
    }
    j.die_after_write.store(true, Ordering::Release);
    j.drain_now();
    crash(j);
    let f = OpenOptions::new()
        .write(true)
        .open(dir.0.join("audit.jsonl"))
        .expect("open");
    let full = f.metadata().expect("md").len();
    f.set_len(before + (full - before) / 2).expect("cut");
    let (_j, _) = open(&dir);
    assert_eq!(numbers(&dir.audit()), (0..20).collect::<Vec<_>>());
}

#[test]
fn many_threads_append_at_once_with_the_drain_thread_running() {
    let dir = Dir::new("threads");
    let health = Arc::new(Health::default());
    let sink = sink(&dir, "audit.jsonl", FileKind::Audit, &health);
    let j = Journal::open(&dir.0, sink, health, SMALL).expect("journal");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                for i in 0..3000 {
                    let l = format!("{{\"n\":{},\"t\":{t}}}\n", t * 100_000 + i);
                    j.append(AUDIT, b"", l.as_bytes(), false);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    // A line longer than a quarter of the ring is written directly, after the others.
    let big = format!("{{\"n\":999999,\"pad\":\"{}\"}}\n", "y".repeat(20_000));
    j.append(AUDIT, b"", big.as_bytes(), false);
    j.drain_now();
    let got = numbers(&dir.audit());
    assert_eq!(got.len(), 8 * 3000 + 1);
    assert_eq!(got.last(), Some(&999_999));
    for t in 0..8u64 {
        let mine: Vec<u64> = got
            .iter()
            .copied()
            .filter(|n| *n / 100_000 == t && *n != 999_999)
            .collect();
        let want: Vec<u64> = (0..3000).map(|i| t * 100_000 + i).collect();
        assert_eq!(mine, want, "thread {t}: each line once, in its order");
    }
}

#[test]
fn a_foreign_or_locked_journal_is_refused_and_the_file_is_private() {
    let dir = Dir::new("foreign");
    let (j, _) = open(&dir);
    let mode = std::fs::metadata(dir.0.join("journal")).expect("md").mode() & 0o777;
    assert_eq!(mode, 0o600);
    let health = Arc::new(Health::default());
    let sink = sink(&dir, "audit.jsonl", FileKind::Audit, &health);
    let e = Journal::open_with(&dir.0, sink.clone(), health.clone(), SMALL, false)
        .err()
        .expect("locked");
    assert!(e.to_string().contains("another tollgate agent"), "{e}");
    drop(j);
    std::fs::write(dir.0.join("journal"), b"not a journal").expect("write");
    let e = Journal::open_with(&dir.0, sink.clone(), health.clone(), SMALL, false)
        .err()
        .expect("foreign");
    assert!(e.to_string().contains("not a tollgate journal"), "{e}");
    // Created and sized, header never written (died in between): taken as a new journal.
    std::fs::write(dir.0.join("journal"), vec![0u8; HEADER + SMALL as usize]).expect("zeros");
    let j = Journal::open_with(&dir.0, sink.clone(), health.clone(), SMALL, false)
        .expect("an unwritten journal is a new one");
    j.append(AUDIT, b"", &line(7), false);
    drop(j);
    assert_eq!(numbers(&dir.audit()), [7]);
    std::fs::remove_file(dir.0.join("journal")).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", dir.0.join("journal")).expect("symlink");
    assert!(Journal::open_with(&dir.0, sink, health, SMALL, false).is_err());
}

#[test]
fn a_command_writes_out_a_stopped_agents_leftovers_but_not_a_running_ones() {
    let dir = Dir::new("recover");
    Journal::recover(&dir.0);
    assert!(
        !dir.0.join("journal").exists(),
        "no journal is created by a reader"
    );
    let (j, _) = open(&dir);
    j.append(AUDIT, b"", &line(1), false);
    // The agent runs (holds the lock): the command leaves its journal alone.
    Journal::recover(&dir.0);
    assert_eq!(dir.audit(), "");
    crash(j);
    Journal::recover(&dir.0);
    assert_eq!(numbers(&dir.audit()), [1]);
    Journal::recover(&dir.0);
    assert_eq!(numbers(&dir.audit()), [1], "written once");
}

#[test]
fn a_journal_of_another_size_is_made_again_at_the_size_asked_for_once_written_out() {
    let dir = Dir::new("resize");
    let len = || {
        std::fs::metadata(dir.0.join("journal"))
            .expect("journal")
            .len()
    };
    let (j, sink) = open(&dir);
    assert_eq!(len(), HEADER as u64 + SMALL);
    for i in 0..3 {
        j.append(AUDIT, b"", &line(i), false);
    }
    crash(j);
    // A newer agent asks for a larger ring: the old one's lines are written out first, then
    // the journal is made again at the new size, and the lines go on in order.
    let health = Arc::new(Health::default());
    let reopen = |cap| Journal::open_with(&dir.0, sink.clone(), health.clone(), cap, false);
    let j = reopen(2 * SMALL).expect("journal");
    assert_eq!(numbers(&dir.audit()), [0, 1, 2]);
    assert_eq!(len(), HEADER as u64 + 2 * SMALL);
    // The lock is still held across the re-creation: no second agent gets in.
    assert!(matches!(
        reopen(2 * SMALL),
        Err(JournalError::Locked { .. })
    ));
    j.append(AUDIT, b"", &line(3), false);
    drop(j);
    // Opened again at the same size: kept as it is, the lines go on.
    let j = reopen(2 * SMALL).expect("journal");
    j.append(AUDIT, b"", &line(4), false);
    drop(j);
    assert_eq!(numbers(&dir.audit()), [0, 1, 2, 3, 4]);
    assert_eq!(len(), HEADER as u64 + 2 * SMALL);
}
