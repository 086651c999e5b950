use super::*;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn data_dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("tg-sessions-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(d.join("sessions")).expect("mkdir");
    Dir(d)
}

fn rec(dir: &Path, id: &str, lines: &[&str]) {
    fs::write(
        dir.join("sessions").join(format!("{id}.ab12.jsonl")),
        lines.join("\n") + "\n",
    )
    .expect("write recording");
}

fn start(id: &str, ts: &str) -> String {
    format!(
        r#"{{"event":"start","session":"{id}","ts":"{ts}","identity":"ci-bot","target":"app-db"}}"#
    )
}

#[test]
fn statuses_counts_and_filters() {
    let d = data_dir("st");
    let dir = &d.0;
    // Ended: two statements, one denied; an approval approved by alice.
    rec(
        dir,
        "s1",
        &[
            &start("s1", "2026-12-05T10:00:00.000Z"),
            r#"{"event":"statement","ts":"2026-12-05T10:00:01.000Z","text":"select 1"}"#,
            r#"{"event":"statement","ts":"2026-12-05T10:00:02.000Z","text":"drop table x","error":"denied"}"#,
            r#"{"event":"approval_requested","ts":"2026-12-05T10:00:03.000Z","approval_id":7}"#,
            r#"{"event":"approval","ts":"2026-12-05T10:00:09.000Z","approval_id":7,"outcome":"approved","approvers":["alice"]}"#,
            r#"{"event":"end","ts":"2026-12-05T10:01:30.000Z","error":null}"#,
        ],
    );
    // Cut off by an agent stop: no end, the audit's close says aborted.
    rec(dir, "s2", &[&start("s2", "2026-12-05T11:00:00.000Z")]);
    // Cut off by a crash: no end, no close, and a later agent start.
    rec(
        dir,
        "s3",
        &[
            &start("s3", "2026-12-05T12:00:00.000Z"),
            r#"{"event":"statement","ts":"2026-12-05T12:00:05.000Z","text":"select 1"}"#,
        ],
    );
    // Open: served by a running agent (this test's own pid stands in, see agent_alive).
    rec(dir, "s4", &[&start("s4", "2026-12-05T14:00:00.000Z")]);
    let audit = [
        r#"{"event":"agent_start","ts":"2026-12-05T09:00:00.000Z","pid":1}"#.to_string(),
        r#"{"event":"close","session":"s2","status":"aborted","ts":"2026-12-05T11:00:20.000Z"}"#
            .to_string(),
        r#"{"event":"agent_start","ts":"2026-12-05T13:00:00.000Z","pid":4000000}"#.to_string(),
    ];
    fs::write(dir.join("audit.jsonl"), audit.join("\n") + "\n").expect("audit");

    let all = list(dir, &Filter::default()).expect("list");
    let by: HashMap<&str, &Summary> = all.iter().map(|s| (s.id.as_str(), s)).collect();
    let s1 = by["s1"];
    assert_eq!(s1.status, Status::Ended(None));
    assert_eq!((s1.statements, s1.denials), (2, 1));
    assert_eq!(approvals_text(&s1.approvals), "#7 approved by alice");
    assert_eq!(s1.duration, Some(Duration::from_secs(90)));
    assert_eq!(by["s2"].status, Status::Stopped);
    assert_eq!(by["s2"].duration, Some(Duration::from_secs(20)));
    assert_eq!(by["s3"].status, Status::Crashed);
    assert_eq!(by["s3"].duration, Some(Duration::from_secs(5)));
    // s4's agent (pid 4000000) is not running: also a crash.
    assert_eq!(by["s4"].status, Status::Crashed);
    assert!(status_line(by["s3"]).contains("cut off by an agent crash"));

    let only = |status: &str| -> Vec<String> {
        list(
            dir,
            &Filter {
                status: Some(status.into()),
                ..Default::default()
            },
        )
        .expect("list")
        .into_iter()
        .map(|s| s.id)
        .collect()
    };
    assert_eq!(only("denied"), ["s1"]);
    assert_eq!(only("cut-off"), ["s2", "s3", "s4"]);
    assert_eq!(only("stopped"), ["s2"]);
    assert_eq!(only("approval"), ["s1"]);
    let since = list(
        dir,
        &Filter {
            since: Some(parse_since("2026-12-05T11:30:00Z").expect("since")),
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(since.len(), 2);
    let table = render(&all);
    assert!(table
        .lines()
        .next()
        .is_some_and(|h| h.starts_with("SESSION")));
    assert!(table.contains("cut-off-stop"), "{table}");
    assert!(parse_since("2h").is_ok() && parse_since("yesterday-ish").is_err());
}

#[test]
fn an_unended_session_whose_agent_pid_is_not_a_tollgate_is_cut_off() {
    let d = data_dir("open");
    let dir = &d.0;
    rec(dir, "s9", &[&start("s9", "2026-12-05T14:00:00.000Z")]);
    // The pid runs, but it is this test, not a tollgate agent (pids are reused): not open.
    let me = std::process::id();
    fs::write(
        dir.join("audit.jsonl"),
        format!("{{\"event\":\"agent_start\",\"ts\":\"2026-12-05T13:00:00.000Z\",\"pid\":{me}}}\n"),
    )
    .expect("audit");
    let s = list(dir, &Filter::default()).expect("list");
    assert_eq!(s[0].status, Status::Crashed);
}

/// Another protocol's neutral `operation` events count as statements, and a denied one as a
/// denial, like PostgreSQL's `statement` events.
#[test]
fn neutral_operation_events_are_counted() {
    let d = data_dir("neutral");
    rec(
        &d.0,
        "s-9",
        &[
            &start("s-9", "2026-12-05T10:00:00.000Z"),
            r#"{"event":"operation","session":"s-9","ts":"2026-12-05T10:00:01.000Z","protocol":"ssh","kind":"exec","text":"uptime","decision":"allow"}"#,
            r#"{"event":"operation","session":"s-9","ts":"2026-12-05T10:00:02.000Z","protocol":"ssh","kind":"exec","text":"rm -rf /","decision":"deny","error":"tollgate: exec denied"}"#,
            r#"{"event":"end","session":"s-9","ts":"2026-12-05T10:00:03.000Z"}"#,
        ],
    );
    let rows = list(&d.0, &Filter::default()).expect("list");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].statements, rows[0].denials), (2, 1), "{rows:?}");
}
