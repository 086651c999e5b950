//! The audit guarantee under `kill -9` (issue 17): once a statement reaches the server, its
//! audit line survives a crash of the agent, and so does its recording line. The agent keeps
//! its lines in a shared-memory journal (`<data_dir>/journal`) instead of a write(2) per
//! statement; this test kills it at random points of a burst of statements from three bots
//! (unmodified psql, unprivileged), 20 times, and after each restart compares the server's own
//! log (`log_statement = all`) with audit.jsonl and the recordings: every statement the server
//! received has exactly one audit line and one recording line.

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use vm_tests::{
    pg::{app_target, PgGate},
    wait_child, wait_for,
};

const ROUNDS: usize = 20;
const BOTS: usize = 3;
const STATEMENTS: usize = 20_000;

/// The token of a statement of this test (`tgk-ROUND-BOT-N`), if `text` holds one.
fn token(text: &str) -> Option<&str> {
    let i = text.find("tgk-")?;
    let rest = &text[i..];
    let end = rest.find(|c: char| c != '-' && !c.is_ascii_alphanumeric())?;
    Some(&rest[..end])
}

/// A small xorshift: the kill points vary from run to run (the seed is printed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One bot: psql reading `STATEMENTS` statements from stdin (written by a thread).
fn bot_psql(gate: &PgGate, round: usize, bot: usize) -> Child {
    let conn = format!(
        "host=127.0.0.1 port={} user=bot dbname=app password=wrong-on-purpose sslmode=disable connect_timeout=10",
        gate.pg.port
    );
    let mut child = gate
        .bot
        .command(Path::new("/usr/bin/psql"))
        .arg(conn)
        .args(["-X", "-q", "-At", "-f", "-"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::spawn(move || {
        let mut script = String::with_capacity(STATEMENTS * 32);
        for i in 0..STATEMENTS {
            script.push_str(&format!("select 'tgk-{round}-{bot}-{i}';\n"));
        }
        // psql dies with the agent: a broken pipe here is expected.
        let _ = stdin.write_all(script.as_bytes());
    });
    child
}

/// Tokens of this test's statements the server received, by round (`log_statement = all`).
fn server_statements(gate: &PgGate) -> HashSet<String> {
    let log = std::fs::read_to_string(gate.pg.dir.path().join("log")).expect("server log");
    log.lines()
        .filter(|l| l.contains("statement: "))
        .filter_map(|l| token(l).map(str::to_string))
        .collect()
}

/// Each of this test's tokens in `lines` (JSON lines) whose `field` holds it, with how many
/// times; `event` filters on the event.
fn counted(text: &str, event: &str, field: &str, into: &mut HashMap<String, usize>) {
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("a line that is not whole JSON ({e}): {l:?}"));
        if v["event"] != event {
            continue;
        }
        if let Some(t) = v[field].as_str().and_then(token) {
            *into.entry(t.to_string()).or_default() += 1;
        }
    }
}

#[test]
fn every_statement_the_server_received_is_audited_once_across_20_kill9() {
    let started = Instant::now();
    let mut gate = PgGate::start("auditcrash", |pg, bot, secret| {
        format!(
            "[[identity]]\nname = \"bot\"\ncgroup = \"{}\"\n\n{}\n[[rule]]\nname = \"reads\"\n\
             identities = [\"bot\"]\ntargets = [\"app-db\"]\naction = \"allow\"\n\
             sql = {{ statements = [\"select\"] }}\n",
            bot.glob(),
            app_target(pg, secret, "")
        )
    });
    gate.pg.restart_with("-c log_statement=all");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("audit_crash: kill points seeded with {seed}");
    let mut rng = Rng(seed);
    let data = gate.agent.data_dir.clone();
    let mut total_received = 0usize;
    let mut replays = 0usize;
    for round in 0..ROUNDS {
        let bots: Vec<Child> = (0..BOTS).map(|b| bot_psql(&gate, round, b)).collect();
        // Once the burst has reached the server, kill somewhere in it.
        let this_round = format!("tgk-{round}-");
        wait_for(Duration::from_secs(30), "the burst at the server", || {
            let log = std::fs::read_to_string(gate.pg.dir.path().join("log")).ok()?;
            log.contains(&this_round).then_some(())
        });
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        gate.agent.kill9();
        for b in bots {
            wait_child(b, Duration::from_secs(30), "psql after the agent died");
        }
        let before = gate
            .agent
            .stderr_text()
            .matches("left in its journal")
            .count();
        gate.agent.restart();
        if gate
            .agent
            .stderr_text()
            .matches("left in its journal")
            .count()
            > before
        {
            replays += 1;
        }

        // The server's log against the audit log and the recordings, after the restart.
        let received = server_statements(&gate);
        let audit = std::fs::read_to_string(gate.agent.audit_path()).expect("audit.jsonl");
        let mut audited = HashMap::new();
        counted(&audit, "operation", "operation", &mut audited);
        let mut recorded = HashMap::new();
        for e in std::fs::read_dir(data.join("sessions"))
            .expect("sessions/")
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).expect("recording");
            counted(&text, "statement", "text", &mut recorded);
        }
        let got: Vec<&String> = received
            .iter()
            .filter(|t| t.starts_with(&this_round))
            .collect();
        assert!(
            !got.is_empty(),
            "round {round}: no statement reached the server before the kill (seed {seed})"
        );
        total_received += got.len();
        let missing: Vec<&&String> = got.iter().filter(|t| !audited.contains_key(**t)).collect();
        assert!(
            missing.is_empty(),
            "round {round} (seed {seed}): {} of {} statements the server received have no audit line, e.g. {:?}",
            missing.len(),
            got.len(),
            &missing[..missing.len().min(5)]
        );
        let unrecorded: Vec<&&String> =
            got.iter().filter(|t| !recorded.contains_key(**t)).collect();
        assert!(
            unrecorded.is_empty(),
            "round {round} (seed {seed}): {} statements the server received are not in a recording, e.g. {:?}",
            unrecorded.len(),
            &unrecorded[..unrecorded.len().min(5)]
        );
        let twice: Vec<(&String, &usize)> = audited.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "round {round} (seed {seed}): audit lines written twice: {twice:?}"
        );
        let twice: Vec<(&String, &usize)> = recorded.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "round {round} (seed {seed}): recording lines written twice: {twice:?}"
        );
        let mut seen = HashSet::new();
        for l in audit.lines() {
            assert!(seen.insert(l), "round {round}: an audit line twice: {l}");
        }
    }
    eprintln!(
        "audit_crash: {ROUNDS} kills, {total_received} statements received by the server, all audited and recorded once; {replays} restarts wrote out journal leftovers; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        replays > 0,
        "no kill ever left lines in the journal: the test did not exercise the replay"
    );
    assert!(
        started.elapsed() < Duration::from_secs(180),
        "over 3 minutes"
    );
}
