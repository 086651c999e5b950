//! A real Prometheus scrapes the agent and sees its decisions.

use std::time::Duration;

use vm_tests::*;

#[test]
fn prometheus_sees_allow_and_deny_decisions() {
    require_root();
    let echo = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new("prom-ci");
    let intruder = Cgroup::new("prom-intruder");
    let body = [
        identity_for("ci-bot", &ci),
        identity_for("intruder", &intruder),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start("prom", FailMode::Closed, &body);
    let addr = echo.v4().to_string();
    let args = [
        "--connect",
        addr.as_str(),
        "--send-bytes",
        "500",
        "--expect-echo",
    ];
    let r = ci.probe(probe_bin!(), &args);
    assert!(r.echo_ok(), "{r}");
    let r = intruder.probe(probe_bin!(), &args);
    assert!(r.was_denied(), "{r}");
    agent.connect_event(r.pid);

    let prom = Prometheus::start(&[agent.metrics]);
    let value = |q: &str| -> Option<f64> {
        prom.query(q)
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
    };
    let allow = r#"tollgate_decisions_total{identity="ci-bot",target="echo",protocol="tcp",action="allow"}"#;
    let deny = r#"tollgate_decisions_total{identity="intruder",target="echo",protocol="tcp",action="deny"}"#;
    let (a, d) = wait_for(
        Duration::from_secs(60),
        "prometheus to scrape both decisions",
        || Some((value(allow)?, value(deny)?)),
    );
    assert_eq!(a, 1.0, "allow decisions seen by prometheus");
    assert_eq!(d, 1.0, "deny decisions seen by prometheus");

    // The scrape target is healthy and the kernel counter came through too.
    let targets = prom.targets();
    let active = targets["data"]["activeTargets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        active.iter().any(|t| t["health"] == "up"),
        "no healthy target: {targets}"
    );
    let redirects = wait_for(Duration::from_secs(30), "tollgate_redirects_total", || {
        value("tollgate_redirects_total")
    });
    assert_eq!(redirects, 2.0);

    // The exposition passes Prometheus' own linter.
    let text = agent.metrics_text();
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian prometheus package) must be installed: cargo xtask setup");
    use std::io::Write as _;
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
