//! PostgreSQL messages up to PostgreSQL's own limits through tollgate (issue 13 item 4): a
//! 500 MB bytea goes in through a bound parameter and comes back, in text (a 1 GB DataRow) and
//! binary format, streamed through the agent in bounded memory; a message over PostgreSQL's
//! limit gets PostgreSQL's own error; under a mask, a value too large to mask gets 54000, never
//! a raw value or a silent drop. A real kernel, a real PostgreSQL 15 server, and a raw protocol
//! bot (`tg-pglarge`, which streams values and hashes them as they arrive) in a bot cgroup.

use std::path::Path;

use serde_json::Value;
use vm_tests::{
    pg::{app_target, PgGate, PgServer},
    Cgroup,
};

/// 500 MB: its text form (`\x` and 1e9 hex digits) is a 1 GB Bind and DataRow, just under
/// PostgreSQL's 1 GiB limit.
const BIG: u64 = 500_000_000;

/// The value copied in and out with COPY (a 200 MB CopyData each way).
const COPY: u64 = 100_000_000;

fn policy(pg: &PgServer, bot: &Cgroup, secret: &Path, extra: &str) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

{target}
{extra}
[[rule]]
name = "ci works on big"
identities = ["ci-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "insert", "copy", "create", "drop"] }}
"#,
        glob = bot.glob(),
        target = app_target(pg, secret, ""),
    )
}

/// The shared gate (`vm_tests::pg::PgGate`) with this file's helpers.
struct Fixture(PgGate);

impl std::ops::Deref for Fixture {
    type Target = PgGate;
    fn deref(&self) -> &PgGate {
        &self.0
    }
}

fn fixture(tag: &str, extra: &str) -> Fixture {
    Fixture(PgGate::start(tag, |pg, bot, secret| {
        policy(pg, bot, secret, extra)
    }))
}

impl Fixture {
    /// tg-pglarge as the bot through the agent: one JSON object per step.
    fn run(&self, steps: &[&str]) -> Vec<Value> {
        let o = self
            .bot
            .command(Path::new(env!("CARGO_BIN_EXE_tg-pglarge")))
            .args(["127.0.0.1", &self.pg.port.to_string()])
            .args(steps)
            .output()
            .expect("tg-pglarge");
        let out: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(
            out.len(),
            steps.len(),
            "tg-pglarge stopped early: {out:?}\n{}\n--- agent ---\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.agent.stderr_text()
        );
        out
    }

    /// The agent's peak resident memory (VmHWM), in bytes.
    fn agent_peak_rss(&self) -> u64 {
        let pid = self.agent.pid().expect("agent pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kb * 1024
    }
}

fn expected_sha256(size: u64, seed: u64) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tg-pglarge"))
        .args(["-", "-", &format!("expect:{size}:{seed}")])
        .output()
        .expect("tg-pglarge");
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    v["sha256"].as_str().expect("sha256").to_string()
}

fn errors(step: &Value) -> Vec<&str> {
    step["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// A 500 MB bytea through the agent, inserted through a bound parameter in text format (a
/// 1 GB Bind) and in binary format, then selected back in text (a 1 GB DataRow) and binary
/// format: every copy hashes to the generated value, as the server's own sha256() says too
/// (and a 100 MB value goes in and out by COPY, a 200 MB CopyData each way). The
/// agent never holds the value: its peak RSS stays far under the value's size. A result over
/// PostgreSQL's 1 GiB limit gets the server's own error, as direct; a client message over the
/// limit gets PostgreSQL's "invalid message length" (08P01) and the session ends.
#[test]
fn a_500_mb_bytea_round_trips_in_text_and_binary_in_bounded_memory() {
    let f = fixture("pglarge", "");
    let want = expected_sha256(BIG, 7);
    let out = f.run(&["q:CREATE TABLE big (id int, v bytea)"]);
    assert!(errors(&out[0]).is_empty(), "{}", out[0]);
    let before = f.agent_peak_rss();
    let steps = [
        format!("insert:1:{BIG}:7:0"),
        format!("insert:2:{BIG}:7:1"),
        "q:SELECT id, length(v), encode(sha256(v), 'hex') FROM big ORDER BY id".to_string(),
        "fetch:0:SELECT v FROM big WHERE id = 1".to_string(),
        "fetch:1:SELECT v FROM big WHERE id = 2".to_string(),
        "q:SELECT 1".to_string(),
        // COPY both ways: a 200 MB CopyData row in, and out.
        format!("copyin:3:{COPY}:5"),
        "q:SELECT encode(sha256(v), 'hex') FROM big WHERE id = 3".to_string(),
        "q:COPY (SELECT v FROM big WHERE id = 3) TO STDOUT".to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = f.run(&steps);
    for s in &out {
        assert!(errors(s).is_empty(), "{s}");
        assert_eq!(s["closed"], false, "{s}");
    }
    // The server stored exactly the generated value, from both formats.
    let text = |v: &Value| v["text"].as_str().unwrap_or_default().to_string();
    let rows: Vec<String> = out[2]["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(text)
        .collect();
    assert_eq!(
        rows,
        ["1", &BIG.to_string(), &want, "2", &BIG.to_string(), &want],
        "{}",
        out[2]
    );
    // And both came back whole: 1e9 hex digits in text, 5e8 bytes in binary.
    let v = &out[3]["values"][0];
    assert_eq!(
        (
            v["len"].as_u64(),
            v["wire_len"].as_u64(),
            v["sha256"].as_str()
        ),
        (Some(BIG), Some(2 + 2 * BIG), Some(want.as_str())),
        "text"
    );
    let v = &out[4]["values"][0];
    assert_eq!(
        (
            v["len"].as_u64(),
            v["wire_len"].as_u64(),
            v["sha256"].as_str()
        ),
        (Some(BIG), Some(BIG), Some(want.as_str())),
        "binary"
    );
    assert_eq!(out[5]["values"][0]["text"], "1");
    assert_eq!(
        out[7]["values"][0]["text"],
        expected_sha256(COPY, 5),
        "COPY FROM STDIN"
    );
    // `\\x`, the hex digits, a newline.
    assert_eq!(
        out[8]["values"][0]["wire_len"].as_u64(),
        Some(3 + 2 * COPY + 1),
        "COPY TO STDOUT: {}",
        out[8]
    );
    let peak = f.agent_peak_rss();
    eprintln!(
        "agent peak RSS (VmHWM): {} MiB after login, {} MiB after 500 MB each way in text and binary",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak < 128 << 20,
        "the agent held the value: VmHWM {} MiB",
        peak >> 20
    );

    // A text result over 1 GiB: the server's own error, the same through the agent as direct.
    let over = "SELECT v || substring(v from 1 for 100000000) FROM big WHERE id = 1";
    let direct = std::process::Command::new("psql")
        .args([
            "-h",
            &f.pg.dir.path().to_string_lossy(),
            "-p",
            &f.pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "app",
            "-XAtq",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            over,
        ])
        .env("PGPASSWORD", "postgres-superuser-pw")
        .output()
        .expect("psql");
    let direct = String::from_utf8_lossy(&direct.stderr).into_owned();
    let out = f.run(&[&format!("fetch:0:{over}"), "q:SELECT 2"]);
    let through = errors(&out[0]);
    assert_eq!(through.len(), 1, "{}", out[0]);
    let (code, message) = through[0].split_once(": ").expect("code: message");
    assert!(
        direct.contains(&format!("ERROR:  {code}: {message}")),
        "direct: {direct}\nthrough: {}",
        out[0]
    );
    assert_eq!(out[1]["values"][0]["text"], "2", "the session goes on");

    // A client message over PostgreSQL's limit: its own message, 08P01, and the session ends
    // (the server would log it and close the connection).
    let out = f.run(&["q:DROP TABLE big", "toolong:1073741823"]);
    assert!(errors(&out[0]).is_empty(), "{}", out[0]);
    assert_eq!(
        errors(&out[1]),
        ["FATAL 08P01: invalid message length"],
        "{}",
        out[1]
    );
    assert_eq!(out[1]["closed"], true);
    assert_eq!(
        f.pg.superuser_sql("SELECT count(*) FROM pg_class WHERE relname = 'big'", "app")
            .trim(),
        "0"
    );
    assert!(f.agent.stderr_text().contains("invalid message length"));
}

/// Under a mask on the column, a value too large to mask (100 MB, over the 64 MiB bound) gets
/// 54000 in text and binary format: no DataRow, no raw value, and the session goes on. A
/// statement text over the bound gets 54000 too, and the session goes on.
#[test]
fn values_over_the_mask_bound_get_54000_not_a_drop_nor_the_value() {
    let f = fixture(
        "pglargemask",
        r#"[[mask]]
targets = ["app-db"]
columns = ["big.v"]
style = "full"
"#,
    );
    let size = 100_000_000u64;
    let steps = [
        "q:CREATE TABLE big (id int, v bytea)".to_string(),
        format!("insert:1:{size}:9:1"),
        "q:SELECT 2".to_string(),
        "fetch:1:SELECT v FROM big".to_string(),
        "fetch:0:SELECT id, v FROM big".to_string(),
        "q:SELECT v FROM big".to_string(),
        "q:SELECT 3".to_string(),
        "longsql:70000000".to_string(),
        "q:SELECT 4".to_string(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let out = f.run(&steps);
    for i in [0, 1, 2, 6, 8] {
        assert!(errors(&out[i]).is_empty(), "{}", out[i]);
    }
    assert_eq!(
        f.pg.superuser_sql("SELECT length(v) FROM big", "app")
            .trim(),
        size.to_string(),
        "the value went in whole (a Bind is not masked)"
    );
    for i in [3, 4, 5] {
        let e = errors(&out[i]);
        assert_eq!(e.len(), 1, "{}", out[i]);
        assert!(
            e[0].starts_with("54000: tollgate: a row of") && e[0].contains("too large to mask"),
            "{}",
            out[i]
        );
        assert_eq!(
            out[i]["rows"], 0,
            "no row of it reaches the client: {}",
            out[i]
        );
        assert_eq!(out[i]["closed"], false);
    }
    assert_eq!(out[6]["values"][0]["text"], "3", "the session goes on");
    let e = errors(&out[7]);
    assert_eq!(e.len(), 1, "{}", out[7]);
    assert!(
        e[0].starts_with("54000: tollgate: statement text of 70000000 bytes is too long"),
        "{}",
        out[7]
    );
    assert_eq!(out[8]["values"][0]["text"], "4", "the session goes on");
    let out = f.run(&["q:DROP TABLE big"]);
    assert!(errors(&out[0]).is_empty(), "{}", out[0]);
}
