//! Operating tollgate (issue 18) on a real kernel with a real PostgreSQL and a real Prometheus:
//! `tollgate status` reports a live, held session and the pending approval; the approvals CLI
//! works in an incident where the policy file is broken (with `--admin` and a token alone);
//! every panel query of the shipped Grafana dashboard returns data from Prometheus scraping
//! the running agent; and `tollgate policy test` passes on the shipped examples and fails a
//! broken expectation by name.

use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use vm_tests::{
    pg::{app_target, PgServer, APP_PASSWORD},
    psql::Psql,
    require_root, tollgate, tollgate_bin, wait_for, wait_until, AgentProc, Cgroup, FailMode,
    Prometheus, TempDir,
};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn body(pg: &PgServer, bot: &Cgroup, secret: &Path) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

{target}
[[rule]]
name = "ci reads and writes rows"
identities = ["ci-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "insert", "update", "set", "show", "begin", "commit", "rollback"] }}

[[rule]]
name = "deletes need a dba"
identities = ["ci-bot"]
targets = ["app-db"]
action = "approve"
sql = {{ statements = ["delete"] }}
approvers = ["dba"]
timeout = "5m"

[[mask]]
targets = ["app-db"]
columns = ["customers.email"]
style = "partial"
"#,
        glob = bot.glob(),
        target = app_target(pg, secret, ""),
    )
}

/// `tollgate ARGS` with `TOLLGATE_TOKEN` set (or removed when `None`).
fn tollgate_env(args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let mut c = Command::new(tollgate_bin());
    c.args(args).env_remove("TOLLGATE_TOKEN");
    if let Some(t) = token {
        c.env("TOLLGATE_TOKEN", t);
    }
    let out = c.output().expect("run tollgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn status_incident_approvals_and_every_dashboard_panel_has_data() {
    require_root();
    let pg = PgServer::start("ops");
    let bot = Cgroup::new("ops-bot");
    let dir = TempDir::new("ops-secret");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let policy = body(&pg, &bot, &secret);
    let agent = AgentProc::start_with_admin("ops", FailMode::Closed, &policy);
    let admin = agent.admin.expect("admin").to_string();
    wait_for(Duration::from_secs(10), "the admin API", || {
        matches!(
            vm_tests::http_get(
                agent.admin.expect("admin"),
                "/healthz",
                Duration::from_secs(2)
            ),
            Ok((200, _))
        )
        .then_some(())
    });
    let token_file = agent.data_dir.join("admin.token");
    let tf = token_file.display().to_string();
    let token = std::fs::read_to_string(&token_file).expect("admin token");
    let token = token.trim();

    // Traffic the dashboard shows: a masked read, a denial, and a held delete.
    let (ok, out) =
        Psql::spawn(&bot, pg.port, "x", &["-c", "SELECT email FROM customers"]).finish();
    assert!(ok, "{out}\n{}", agent.stderr_text());
    let (ok, out) = Psql::spawn(&bot, pg.port, "x", &["-c", "DROP TABLE orders"]).finish();
    assert!(!ok && out.contains("42501"), "{out}");
    let mut held = Psql::spawn(
        &bot,
        pg.port,
        "x",
        &["-c", "DELETE FROM orders WHERE id = 3"],
    );
    let id = held.approval_id();

    // `sessions list` while the delete is held: that session is open; the DROP's is denied.
    // (The agent's lines reach the files from its journal within milliseconds, later on a
    // loaded machine: poll briefly.)
    let dd = agent.data_dir.display().to_string();
    let list = |status: &str| {
        wait_until(Duration::from_secs(5), || {
            let (code, out, err) =
                tollgate(&["sessions", "list", "--data-dir", &dd, "--status", status]);
            assert_eq!(code, 0, "{err}");
            (out.lines().count() == 2).then_some(out.clone())
        })
        .unwrap_or_else(|| tollgate(&["sessions", "list", "--data-dir", &dd, "--status", status]).1)
    };
    let open = list("open");
    assert_eq!(
        open.lines().count(),
        2,
        "header and the held session:\n{open}"
    );
    assert!(
        open.contains("ci-bot -> app-db") && open.contains(&format!("#{id} pending")),
        "{open}"
    );
    let denied = list("denied");
    assert_eq!(denied.lines().count(), 2, "{denied}");
    let denied_row = denied.lines().nth(1).expect("row");
    assert!(denied_row.contains(" ended "), "{denied}");

    // `tollgate status` while the delete is held: its session is live, its request pending.
    // (Its exit status also reflects this machine's disk: under 1 GiB or 1% free in data_dir
    // is unhealthy.)
    let (code_json, json, err) =
        tollgate(&["status", "--json", "--admin", &admin, "--token-file", &tf]);
    let s: Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("status JSON ({e}): {json}{err}"));
    let free = s["audit"]["free_bytes"].as_u64().unwrap_or(0);
    let total = s["audit"]["total_bytes"].as_u64().unwrap_or(0);
    let disk_ok = free >= 1 << 30 && free * 100 >= total;
    assert_eq!(code_json, if disk_ok { 0 } else { 1 }, "{json}{err}");
    let (code, text, err) = tollgate(&["status", "--admin", &admin, "--token-file", &tf]);
    assert_eq!(code, code_json, "{text}{err}");
    assert!(text.contains("ci-bot -> app-db"), "{text}");
    assert!(text.contains("approvals: 1 pending"), "{text}");
    assert!(
        text.contains("programs attached and pinned under"),
        "{text}"
    );

    assert_eq!(s["up"], true);
    assert_eq!(s["policy"]["generation"], 1, "{s}");
    assert!(
        !s["datapath"]["pinned_links"]
            .as_array()
            .expect("links")
            .is_empty(),
        "{s}"
    );
    assert!(s["datapath"]["redirects_total"].as_u64() >= Some(3), "{s}");
    let live = s["sessions"]["by_identity_target"]
        .as_array()
        .expect("live");
    assert!(
        live.iter()
            .any(|e| e["identity"] == "ci-bot" && e["target"] == "app-db" && e["sessions"] == 1),
        "{s}"
    );
    assert_eq!(s["approvals"]["pending"], 1, "{s}");
    assert_eq!(s["audit"]["healthy"], true, "{s}");
    assert_eq!(s["audit"]["write_errors"], 0, "{s}");
    assert!(s["audit"]["free_bytes"].as_u64() > Some(0), "{s}");
    // A token the agent does not accept gets nothing.
    let bad = TempDir::new("ops-bad-token");
    let bad_file = bad.path().join("t");
    std::fs::write(&bad_file, "not-the-token").expect("bad token");
    let (code, text, err) = tollgate(&[
        "status",
        "--admin",
        &admin,
        "--token-file",
        &bad_file.display().to_string(),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(err.contains("401"), "{err}");
    assert!(!text.contains("ci-bot"), "{text}");

    // The incident: someone broke the policy file. The agent keeps the previous policy and
    // counts the rejected reload; approvers still act with --admin and a token alone.
    let policy_path = agent.policy_path.display().to_string();
    agent.write_policy_raw(&format!(
        "{}[[rule]]\nnam = \"typo\"\n",
        agent.agent_section()
    ));
    wait_for(Duration::from_secs(20), "the rejected reload", || {
        (agent.metric("tollgate_policy_reloads_total", &[("result", "error")]) >= 1.0).then_some(())
    });
    let (code, _, err) = tollgate_env(&["approvals", "list", "--policy", &policy_path], None);
    assert_ne!(code, 0);
    assert!(err.contains("pass --admin ADDR"), "{err}");
    let (code, out, err) = tollgate_env(
        &[
            "approvals",
            "list",
            "--policy",
            &policy_path,
            "--admin",
            &admin,
        ],
        Some(token),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("#{id}")), "{out}");
    let (code, out, err) = tollgate_env(
        &[
            "approvals",
            "approve",
            &id.to_string(),
            "--policy",
            &policy_path,
            "--admin",
            &admin,
            "--token-file",
            &tf,
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    let (ok, out) = held.finish();
    assert!(ok && out.contains("DELETE 1"), "{out}");
    // The approval in the list and in the replay: id, outcome, approver.
    let (_, appr, _) = tollgate(&[
        "sessions",
        "list",
        "--data-dir",
        &dd,
        "--status",
        "approval",
    ]);
    assert!(
        appr.contains(&format!("#{id} approved by local:root")),
        "{appr}"
    );
    let sid = appr
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("session id");
    let (code, replay, err) = tollgate(&["replay", sid, "--data-dir", &dd]);
    assert_eq!(code, 0, "{err}");
    assert!(
        replay.contains(&format!(
            "HOLD   approval #{id} under rule \"deletes need a dba\""
        )),
        "{replay}"
    );
    assert!(
        replay.contains(&format!("APPROVAL #{id} approved by local:root")),
        "{replay}"
    );
    assert!(replay.contains("STATUS ended after"), "{replay}");
    agent.write_policy(&policy);
    wait_for(Duration::from_secs(20), "the good reload", || {
        (agent.metric("tollgate_policy_reloads_total", &[("result", "ok")]) >= 1.0).then_some(())
    });

    // Every panel of the shipped dashboard, against a real Prometheus scraping this agent.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("agent/dist/grafana/tollgate.json"))
            .expect("dashboard JSON"),
    )
    .expect("dashboard parses");
    let prom = Prometheus::start(&[agent.metrics]);
    wait_for(
        Duration::from_secs(60),
        "a few scrapes of the agent",
        || {
            (prom
                .query("count_over_time(up{job=\"tollgate\"}[1m]) >= 3")
                .len()
                == 1)
                .then_some(())
        },
    );
    let mut queries = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            queries.push((p["title"].as_str().unwrap_or("?").to_string(), q));
        }
    }
    assert!(queries.len() >= 15, "{queries:?}");
    let mut empty = Vec::new();
    for (title, q) in &queries {
        let r = prom.query(q);
        if r.is_empty() {
            empty.push(format!("{title}: {q}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard panels without data:\n{}",
        empty.join("\n")
    );
    // And some of it is the traffic above, not just zeros.
    let v = |q: &str| -> f64 {
        prom.query(q)
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(v("sum(tollgate_masked_values_total)") >= 1.0);
    assert!(v("sum(tollgate_decisions_total{action=\"deny\"})") >= 1.0);
    assert_eq!(
        v("sum(tollgate_approvals_total{outcome=\"approved\"})"),
        1.0
    );
    assert!(v("tollgate_bpf_links_pinned") >= 1.0);
}

#[test]
fn policy_test_passes_the_examples_and_names_a_broken_case() {
    let examples = repo().join("policy/examples");
    let (code, out, err) = tollgate(&["policy", "test", &examples.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
    let dir = TempDir::new("policy-test");
    let f = dir.path().join("quickstart.toml");
    let text = std::fs::read_to_string(examples.join("quickstart.toml")).expect("example");
    // Flip one expectation: the DROP case now expects allow.
    let broken = text.replacen(
        "sql = \"DROP TABLE orders\"\nexpect = \"deny\"",
        "sql = \"DROP TABLE orders\"\nexpect = \"allow\"",
        1,
    );
    assert_ne!(broken, text, "the example changed: update this test");
    std::fs::write(&f, broken).expect("write");
    let (code, out, _) = tollgate(&["policy", "test", &f.display().to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL")
            && out.contains(
                "test \"ci may not drop tables\": expected allow, got deny by rule \"no-ddl\""
            ),
        "{out}"
    );
    // explain prints the decision and the rules considered.
    let (code, out, err) = tollgate(&[
        "policy",
        "explain",
        "--policy",
        &examples.join("quickstart.toml").display().to_string(),
        "--identity",
        "ci-bot",
        "--target",
        "orders-db",
        "--sql",
        "DELETE FROM orders",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("allow \"ci may read and write rows\": does not match"),
        "{out}"
    );
    assert!(
        out.contains("decision: deny (no rule matches: default deny)"),
        "{out}"
    );
}

#[test]
fn a_session_cut_off_by_an_agent_crash_is_marked() {
    require_root();
    let pg = PgServer::start("opscrash");
    let bot = Cgroup::new("opscrash-bot");
    let dir = TempDir::new("opscrash-secret");
    let secret = dir.path().join("app-rw.pw");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let mut agent = AgentProc::start("opscrash", FailMode::Closed, &body(&pg, &bot, &secret));
    let dd = agent.data_dir.display().to_string();
    // A session in the middle of its second statement when the agent is killed: the first
    // one, answered, is in the recording, and so is the second, in flight (the journal has
    // it before the server does).
    let p = Psql::spawn(
        &bot,
        pg.port,
        "x",
        &["-c", "SELECT 1", "-c", "SELECT pg_sleep(30)"],
    );
    wait_for(
        Duration::from_secs(10),
        "both statements in the recording",
        || {
            let (_, out, _) =
                tollgate(&["sessions", "list", "--data-dir", &dd, "--status", "open"]);
            let row = out.lines().nth(1)?;
            // SESSION STARTED STATUS DURATION IDENTITY -> TARGET STMTS ...
            (row.split_whitespace().nth(7) == Some("2")).then_some(())
        },
    );
    agent.kill9();
    let (ok, out) = p.finish();
    assert!(!ok, "{out}");
    let (code, list, err) =
        tollgate(&["sessions", "list", "--data-dir", &dd, "--status", "crashed"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(list.contains("cut-off-crash"), "{list}");
    let sid = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("id");
    let (_, replay, _) = tollgate(&["replay", sid, "--data-dir", &dd]);
    assert!(replay.contains("SQL    SELECT 1"), "{replay}");
    assert!(replay.contains("SELECT pg_sleep(30)"), "{replay}");
    assert!(
        replay
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("STATUS cut off by an agent crash")),
        "{replay}"
    );
    let (_, open, _) = tollgate(&["sessions", "list", "--data-dir", &dd, "--status", "open"]);
    assert_eq!(open.lines().count(), 1, "{open}");
}
