use super::*;

const POLICY: &str = r#"
[[identity]]
name = "ci-bot"
cgroup = "/ci/*"

[[identity]]
name = "ops"
uid = 1500

[[target]]
name = "orders-db"
protocol = "postgres"
address = ["127.0.0.1:5432"]

[[target]]
name = "web"
protocol = "ssh"
address = ["127.0.0.1:22"]

[[rule]]
name = "ci reads and writes"
identities = ["ci-bot"]
targets = ["orders-db"]
action = "allow"
sql = { statements = ["select", "insert", "update", "prepare", "execute"] }

[[rule]]
name = "deletes need a dba"
identities = ["ci-bot"]
targets = ["orders-db"]
action = "approve"
approvers = ["dba"]
sql = { statements = ["delete"] }

[[rule]]
name = "no ddl"
identities = ["ci-bot"]
targets = ["orders-db"]
action = "deny"
sql = { statements = ["drop"] }

[[rule]]
name = "ops status"
identities = ["ops"]
targets = ["web"]
action = "allow"
ssh = { exec = ["systemctl status *"] }
"#;

fn policy(extra: &str) -> Policy {
    tollgate_policy::parse(&format!("{POLICY}{extra}"), "p.toml").expect("policy parses")
}

fn sql(p: &Policy, who: &str, text: &str) -> Outcome {
    evaluate(
        p,
        &CaseWho::Identity(who.into()),
        "orders-db",
        &CaseOp::Sql(text.into()),
    )
}

#[test]
fn sql_is_classified_by_what_it_does() {
    let p = policy("");
    let d = sql(&p, "ci-bot", "SELECT * FROM orders").decision;
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Allow, Some("ci reads and writes"))
    );
    // A deleting CTE inside a SELECT is a delete: held for approval, not allowed as a select.
    let d = sql(
        &p,
        "ci-bot",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
    )
    .decision;
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Approve, Some("deletes need a dba"))
    );
    // A later statement's denial beats an earlier approval.
    let d = sql(&p, "ci-bot", "DELETE FROM orders; DROP TABLE orders").decision;
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Deny, Some("no ddl"))
    );
    // EXECUTE decides what PREPARE prepared.
    let d = sql(&p, "ci-bot", "PREPARE p AS DROP TABLE orders; EXECUTE p").decision;
    assert_eq!(d.action, Action::Deny);
    // Unparseable text is denied.
    let o = sql(&p, "ci-bot", "SELEC 1");
    assert_eq!(o.decision.action, Action::Deny);
    assert!(
        o.trace.iter().any(|l| l.contains("not classified")),
        "{:?}",
        o.trace
    );
    // Unknown identity: the connection is refused.
    let d = sql(&p, "nobody", "SELECT 1").decision;
    assert_eq!(
        (d.action, d.reason),
        (Action::Deny, DecisionReason::UnknownIdentity)
    );
}

#[test]
fn dangerous_statements_need_an_explicit_rule() {
    let p = policy("");
    let o = sql(&p, "ci-bot", "SELECT pg_read_file('/etc/passwd')");
    assert_eq!(o.decision.action, Action::Deny, "{:?}", o.trace);
    assert!(
        o.trace
            .iter()
            .any(|l| l.contains("does not name it explicitly")),
        "{:?}",
        o.trace
    );
}

#[test]
fn facts_are_attributed_like_the_agent() {
    let p = policy("");
    let facts = CaseWho::Facts(tollgate_policy::CaseFacts {
        cgroup: Some("/ci/runner-7".into()),
        ..Default::default()
    });
    let o = evaluate(&p, &facts, "orders-db", &CaseOp::Sql("SELECT 1".into()));
    assert_eq!(o.decision.action, Action::Allow);
    assert!(o.trace[0].contains("ci-bot (attributed"), "{:?}", o.trace);
    let nobody = CaseWho::Facts(tollgate_policy::CaseFacts {
        cgroup: Some("/other".into()),
        uid: Some(1501),
        ..Default::default()
    });
    let o = evaluate(&p, &nobody, "orders-db", &CaseOp::Connect);
    assert_eq!(o.decision.reason, DecisionReason::UnknownIdentity);
}

#[test]
fn ssh_and_rules_considered() {
    let p = policy("");
    let who = CaseWho::Identity("ops".into());
    let ok = evaluate(
        &p,
        &who,
        "web",
        &CaseOp::Ssh(
            tollgate_policy::SshOpKind::Exec,
            "systemctl status nginx".into(),
        ),
    );
    assert_eq!(ok.decision.action, Action::Allow);
    let no = evaluate(
        &p,
        &who,
        "web",
        &CaseOp::Ssh(tollgate_policy::SshOpKind::Exec, "rm -rf /".into()),
    );
    assert_eq!(no.decision.action, Action::Deny);
    assert!(
        no.trace
            .iter()
            .any(|l| l.contains("allow \"ops status\": does not match")),
        "{:?}",
        no.trace
    );
}

#[test]
fn cases_pass_and_a_broken_expectation_names_the_case() {
    let p = policy(
        r#"
[[test]]
name = "ci selects"
identity = "ci-bot"
target = "orders-db"
sql = "SELECT id FROM orders"
expect = "allow"
rule = "ci reads and writes"

[[test]]
name = "ci drops"
facts = { cgroup = "/ci/x" }
target = "orders-db"
sql = "DROP TABLE orders"
expect = "allow"

[[test]]
name = "stranger"
facts = { uid = 4242 }
target = "orders-db"
expect = "deny"
rule = ""
"#,
    );
    assert_eq!(p.cases.len(), 3);
    let results: Vec<_> = p.cases.iter().map(|c| run_case(&p, c)).collect();
    assert!(results[0].failure.is_none(), "{:?}", results[0].failure);
    assert_eq!(
        results[1].failure.as_deref(),
        Some("expected allow, got deny by rule \"no ddl\"")
    );
    assert!(results[2].failure.is_none(), "{:?}", results[2].failure);

    let dir = std::env::temp_dir().join(format!("tg-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let f = dir.join("p.toml");
    std::fs::write(&f, format!("{POLICY}\n[[test]]\nname = \"ci drops\"\nidentity = \"ci-bot\"\ntarget = \"orders-db\"\nsql = \"DROP TABLE x\"\nexpect = \"allow\"\n")).expect("write");
    std::fs::write(dir.join("notes.txt"), "not a policy").expect("write");
    let mut out = String::new();
    let t = test_files(
        &policy_files(std::slice::from_ref(&dir)).expect("list"),
        false,
        &mut out,
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert_eq!(
        t,
        Totals {
            passed: 0,
            failed: 1,
            broken_files: 0
        }
    );
    assert!(
        out.contains("test \"ci drops\": expected allow, got deny by rule \"no ddl\""),
        "{out}"
    );
}

#[test]
fn bad_cases_are_policy_errors() {
    let bad = |case: &str| {
        tollgate_policy::parse(&format!("{POLICY}\n[[test]]\n{case}"), "p.toml")
            .expect_err("the case is refused")
            .to_string()
    };
    let e =
        bad("name = \"t\"\nidentity = \"ci-bott\"\ntarget = \"orders-db\"\nexpect = \"allow\"\n");
    assert!(e.contains("did you mean \"ci-bot\""), "{e}");
    let e = bad("name = \"t\"\nidentity = \"ci-bot\"\ntarget = \"orders-db\"\nexpect = \"allw\"\n");
    assert!(e.contains("did you mean \"allow\""), "{e}");
    let e = bad("name = \"t\"\nidentity = \"ci-bot\"\ntarget = \"web\"\nsql = \"SELECT 1\"\nexpect = \"deny\"\n");
    assert!(e.contains("does not fit target \"web\""), "{e}");
    let e = bad("name = \"t\"\nidentity = \"ci-bot\"\ntarget = \"orders-db\"\nexpect = \"deny\"\nrule = \"no-ddl\"\n");
    assert!(
        e.contains("unknown rule \"no-ddl\": did you mean \"no ddl\""),
        "{e}"
    );
    let e = bad("name = \"t\"\nidentity = \"ci-bot\"\ntarget = \"orders-db\"\nexpect = \"deny\"\nsqll = \"x\"\n");
    assert!(e.contains("unknown key `sqll` in [[test]]"), "{e}");
    let e = bad("name = \"t\"\ntarget = \"orders-db\"\nexpect = \"deny\"\n");
    assert!(e.contains("says nothing about who"), "{e}");
}
