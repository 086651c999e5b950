use crate::{
    decide, parse, Action, Decision, DecisionReason, Operation, Policy, Request, SshOpKind,
};

const HEAD: &str = r#"
[[identity]]
name = "ci"
uid = 1000

[[identity]]
name = "ops"
uid = 1001

[[target]]
name = "db"
protocol = "postgres"
address = ["127.0.0.1:5432"]

[[target]]
name = "db2"
protocol = "postgres"
address = ["127.0.0.1:5433"]

[[target]]
name = "box"
protocol = "ssh"
address = ["127.0.0.1:22"]

[[target]]
name = "web"
protocol = "http"
address = ["127.0.0.1:80"]

[[target]]
name = "k8s"
protocol = "kubernetes"
address = ["127.0.0.1:6443"]

[[target]]
name = "raw"
protocol = "tcp"
address = ["127.0.0.1:9000"]
"#;

fn policy(rules: &str) -> Policy {
    let text = format!("{HEAD}\n{rules}");
    match parse(&text, "t.toml") {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn ask(p: &Policy, identity: &str, target: &str, op: Operation<'_>) -> Decision {
    decide(
        p,
        &Request {
            claims: None,
            identity: Some(identity),
            target,
            op,
            // As the agent registers handlers (handlers.rs): every protocol but the opaque `tcp`
            // relay has an inspecting handler (postgres, ssh, http, https, kubernetes).
            inspected: p
                .target(target)
                .is_some_and(|t| t.protocol != crate::Protocol::Tcp),
        },
    )
}

fn matched(action: Action, rule: &str) -> Decision {
    Decision {
        action,
        rule: Some(rule.into()),
        reason: DecisionReason::Matched,
    }
}

fn denied(reason: DecisionReason) -> Decision {
    Decision {
        action: Action::Deny,
        rule: None,
        reason,
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn sql<'a>(statement: &'a str, tables: &'a [String], functions: &'a [String]) -> Operation<'a> {
    Operation::Sql {
        statement,
        tables,
        functions,
    }
}

fn rule(name: &str, ids: &str, targets: &str, action: &str, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nidentities = [{ids}]\ntargets = [{targets}]\naction = \"{action}\"\n{extra}\n"
    )
}

#[test]
fn unknown_identity_and_target() {
    let p = policy(&rule("all", "\"*\"", "\"*\"", "allow", ""));
    let req = Request {
        claims: None,
        identity: None,
        target: "db",
        op: Operation::Connect,
        inspected: true,
    };
    assert_eq!(decide(&p, &req), denied(DecisionReason::UnknownIdentity));
    // "*" never matches a name the policy does not define.
    assert_eq!(
        ask(&p, "stranger", "db", Operation::Connect),
        denied(DecisionReason::UnknownIdentity)
    );
    assert_eq!(
        ask(&p, "ci", "nowhere", Operation::Connect),
        denied(DecisionReason::UnknownTarget)
    );
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        matched(Action::Allow, "all")
    );
}

#[test]
fn no_rule_is_deny() {
    let p = policy(&rule("ops db", "\"ops\"", "\"db\"", "allow", ""));
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        denied(DecisionReason::NoMatchingRule)
    );
    assert_eq!(
        ask(&p, "ops", "db2", Operation::Connect),
        denied(DecisionReason::NoMatchingRule)
    );
    assert_eq!(
        ask(&p, "ops", "db", Operation::Connect),
        matched(Action::Allow, "ops db")
    );
}

#[test]
fn deny_beats_approve_beats_allow_whatever_the_order() {
    let rules = [
        rule("allow", "\"ci\"", "\"db\"", "allow", ""),
        rule("approve", "\"*\"", "\"db\"", "approve", ""),
        rule("deny", "\"ci\"", "\"*\"", "deny", ""),
    ];
    for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]] {
        let text: String = order.iter().map(|&i| rules[i].clone()).collect();
        let p = policy(&text);
        assert_eq!(
            ask(&p, "ci", "db", Operation::Connect),
            matched(Action::Deny, "deny")
        );
        assert_eq!(
            ask(&p, "ops", "db", Operation::Connect),
            matched(Action::Approve, "approve")
        );
        let p = policy(&format!("{}{}", rules[0], rules[1]));
        assert_eq!(
            ask(&p, "ci", "db", Operation::Connect),
            matched(Action::Approve, "approve")
        );
    }
}

#[test]
fn first_in_file_order_among_equals() {
    let p = policy(&format!(
        "{}{}{}",
        rule("second", "\"*\"", "\"db\"", "allow", ""),
        rule("first", "\"ci\"", "\"db\"", "allow", ""),
        rule("third", "\"ci\"", "\"*\"", "allow", ""),
    ));
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        matched(Action::Allow, "second")
    );
    let p = policy(&format!(
        "{}{}{}",
        rule("d1", "\"ci\"", "\"db\"", "deny", ""),
        rule("d0", "\"*\"", "\"*\"", "deny", ""),
        rule("d2", "\"ci\"", "\"db\"", "deny", ""),
    ));
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        matched(Action::Deny, "d1")
    );
    assert_eq!(
        ask(&p, "ops", "db", Operation::Connect),
        matched(Action::Deny, "d0")
    );
}

#[test]
fn connect_with_op_scoped_rules() {
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "ops denies drop",
            "\"ops\"",
            "\"db\"",
            "deny",
            "sql = { statements = [\"drop\"] }"
        ),
        rule(
            "ci reads",
            "\"ci\"",
            "\"db\"",
            "allow",
            "sql = { statements = [\"select\"] }"
        ),
        rule(
            "ci alters",
            "\"ci\"",
            "\"db2\"",
            "approve",
            "sql = { statements = [\"alter\"] }"
        ),
    ));
    // An op-scoped allow or approve lets the connection in, as Allow.
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        matched(Action::Allow, "ci reads")
    );
    assert_eq!(
        ask(&p, "ci", "db2", Operation::Connect),
        matched(Action::Allow, "ci alters")
    );
    // An op-scoped deny alone does not.
    assert_eq!(
        ask(&p, "ops", "db", Operation::Connect),
        denied(DecisionReason::NoMatchingRule)
    );
}

#[test]
fn connect_whole_connection_deny_and_approve_win_over_op_scoped_allow() {
    let p = policy(&format!(
        "{}{}",
        rule("ci reads", "\"ci\"", "\"db\"", "allow", "sql = {}"),
        rule("ci needs approval", "\"ci\"", "\"db\"", "approve", ""),
    ));
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        matched(Action::Approve, "ci needs approval")
    );
    let p = policy(&format!(
        "{}{}",
        rule("ci reads", "\"ci\"", "\"db\"", "allow", "sql = {}"),
        rule("ci out", "\"ci\"", "\"*\"", "deny", ""),
    ));
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        matched(Action::Deny, "ci out")
    );
}

#[test]
fn wildcard_target_op_rule_lets_in_only_fitting_protocols() {
    let p = policy(&rule(
        "reads anywhere",
        "\"ci\"",
        "\"*\"",
        "allow",
        "sql = { statements = [\"select\"] }",
    ));
    assert_eq!(
        ask(&p, "ci", "db", Operation::Connect),
        matched(Action::Allow, "reads anywhere")
    );
    // A SQL rule must not open a raw TCP or SSH connection.
    for t in ["raw", "box", "web", "k8s"] {
        assert_eq!(
            ask(&p, "ci", t, Operation::Connect),
            denied(DecisionReason::NoMatchingRule),
            "{t}"
        );
    }
}

#[test]
fn whole_connection_rules_cover_operations() {
    let p = policy(&format!(
        "{}{}",
        rule("ci all", "\"ci\"", "\"db\"", "allow", ""),
        rule(
            "no drop",
            "\"*\"",
            "\"db\"",
            "deny",
            "sql = { statements = [\"drop\"] }"
        ),
    ));
    let t = names(&["users"]);
    assert_eq!(
        ask(&p, "ci", "db", sql("select", &t, &[])),
        matched(Action::Allow, "ci all")
    );
    assert_eq!(
        ask(&p, "ci", "db", sql("drop", &t, &[])),
        matched(Action::Deny, "no drop")
    );
    assert_eq!(
        ask(&p, "ops", "db", sql("select", &t, &[])),
        denied(DecisionReason::NoMatchingRule)
    );
}

#[test]
fn op_kind_must_match_matcher_kind() {
    let p = policy(&rule("sql any", "\"ci\"", "\"*\"", "allow", "sql = {}"));
    let http = Operation::Http {
        method: "GET",
        path: "/",
        host: "x",
    };
    assert_eq!(
        ask(&p, "ci", "db", http),
        denied(DecisionReason::NoMatchingRule)
    );
    assert_eq!(
        ask(&p, "ci", "db", sql("select", &[], &[])),
        matched(Action::Allow, "sql any")
    );
}

#[test]
fn sql_statements() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "rw",
            "\"ci\"",
            "\"db\"",
            "allow",
            "sql = { statements = [\"SELECT\", \"insert\"] }"
        ),
        rule(
            "star",
            "\"ops\"",
            "\"db\"",
            "allow",
            "sql = { statements = [\"*\"] }"
        ),
    ));
    assert_eq!(
        ask(&p, "ci", "db", sql("select", &[], &[])).action,
        Action::Allow
    );
    assert_eq!(
        ask(&p, "ci", "db", sql("INSERT", &[], &[])).action,
        Action::Allow
    );
    assert_eq!(
        ask(&p, "ci", "db", sql("delete", &[], &[])).action,
        Action::Deny
    );
    assert_eq!(
        ask(&p, "ops", "db", sql("vacuum", &[], &[])).action,
        Action::Allow
    );
}

#[test]
fn sql_tables_allow_needs_every_table() {
    let p = policy(&rule(
        "orders only",
        "\"ci\"",
        "\"db\"",
        "allow",
        "sql = { tables = [\"orders\", \"audit.*\"] }",
    ));
    let d = |tables: &[&str]| ask(&p, "ci", "db", sql("select", &names(tables), &[])).action;
    assert_eq!(d(&["orders"]), Action::Allow);
    assert_eq!(
        d(&["public.orders"]),
        Action::Allow,
        "bare glob matches qualified name"
    );
    assert_eq!(d(&["PUBLIC.Orders"]), Action::Allow, "case-insensitive");
    assert_eq!(d(&["audit.log"]), Action::Allow);
    assert_eq!(d(&["orders", "audit.log"]), Action::Allow);
    assert_eq!(
        d(&["orders", "users"]),
        Action::Deny,
        "every table must match"
    );
    assert_eq!(d(&["log"]), Action::Deny, "qualified glob needs the schema");
    assert_eq!(d(&[]), Action::Allow, "no tables touched passes an allow");
}

#[test]
fn sql_tables_deny_needs_any_table() {
    let p = policy(&format!(
        "{}{}",
        rule("ci all", "\"ci\"", "\"db\"", "allow", ""),
        rule(
            "secrets",
            "\"ci\"",
            "\"db\"",
            "deny",
            "sql = { tables = [\"secrets\", \"vault.*\"] }",
        ),
    ));
    let d = |tables: &[&str]| ask(&p, "ci", "db", sql("select", &names(tables), &[])).rule;
    assert_eq!(d(&["orders", "public.secrets"]).as_deref(), Some("secrets"));
    assert_eq!(d(&["vault.keys"]).as_deref(), Some("secrets"));
    assert_eq!(d(&["orders"]).as_deref(), Some("ci all"));
    assert_eq!(
        d(&[]).as_deref(),
        Some("ci all"),
        "no tables touched: deny does not match"
    );
}

#[test]
fn sql_functions() {
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "ci funcs",
            "\"ci\"",
            "\"db\"",
            "allow",
            "sql = { functions = [\"now\", \"pg_catalog.*\"] }"
        ),
        rule(
            "no sleep",
            "\"*\"",
            "\"db\"",
            "deny",
            "sql = { functions = [\"pg_sleep*\"] }"
        ),
        rule(
            "approve lo",
            "\"ops\"",
            "\"db\"",
            "approve",
            "sql = { functions = [\"lo_*\"] }"
        ),
    ));
    let d = |id: &str, f: &[&str]| ask(&p, id, "db", sql("select", &[], &names(f))).action;
    assert_eq!(d("ci", &["now"]), Action::Allow);
    assert_eq!(d("ci", &["NOW", "pg_catalog.version"]), Action::Allow);
    assert_eq!(d("ci", &["now", "md5"]), Action::Deny);
    assert_eq!(d("ci", &["pg_catalog.pg_sleep"]), Action::Deny);
    assert_eq!(d("ops", &["lo_import", "now"]), Action::Approve);
    assert_eq!(d("ops", &[]), Action::Deny);
}

#[test]
fn sql_tables_and_statements_combine() {
    let p = policy(&rule(
        "drop temp",
        "\"ci\"",
        "\"db\"",
        "approve",
        "sql = { statements = [\"drop\"], tables = [\"tmp_*\"] }",
    ));
    let t = names(&["tmp_1"]);
    let u = names(&["users"]);
    assert_eq!(
        ask(&p, "ci", "db", sql("drop", &t, &[])).action,
        Action::Approve
    );
    assert_eq!(
        ask(&p, "ci", "db", sql("drop", &u, &[])).action,
        Action::Deny
    );
    assert_eq!(
        ask(&p, "ci", "db", sql("select", &t, &[])).action,
        Action::Deny
    );
}

fn ssh(kind: SshOpKind, command: &str) -> Operation<'_> {
    Operation::Ssh { kind, command }
}

#[test]
fn ssh_matchers() {
    let p = policy(&format!(
        "{}{}{}{}",
        rule(
            "status",
            "\"ci\"",
            "\"box\"",
            "allow",
            "ssh = { exec = [\"systemctl status *\", \"uptime\"] }"
        ),
        rule(
            "sftp",
            "\"ci\"",
            "\"box\"",
            "allow",
            "ssh = { subsystems = [\"sftp\"] }"
        ),
        rule(
            "shell",
            "\"ci\"",
            "\"box\"",
            "approve",
            "ssh = { shell = true }"
        ),
        rule(
            "no fwd",
            "\"*\"",
            "\"box\"",
            "deny",
            "ssh = { forwarding = true }"
        ),
    ));
    let d = |kind, cmd| ask(&p, "ci", "box", ssh(kind, cmd)).rule;
    assert_eq!(
        d(SshOpKind::Exec, "systemctl status nginx").as_deref(),
        Some("status")
    );
    assert_eq!(
        d(SshOpKind::Exec, "systemctl status a/b c").as_deref(),
        Some("status")
    );
    assert_eq!(d(SshOpKind::Exec, "uptime").as_deref(), Some("status"));
    assert_eq!(d(SshOpKind::Exec, "systemctl stop nginx"), None);
    assert_eq!(d(SshOpKind::Subsystem, "sftp").as_deref(), Some("sftp"));
    assert_eq!(d(SshOpKind::Subsystem, "netconf"), None);
    assert_eq!(d(SshOpKind::Shell, "").as_deref(), Some("shell"));
    assert_eq!(d(SshOpKind::Forward, "db:5432").as_deref(), Some("no fwd"));
    // The forwarding deny does not touch exec.
    assert_eq!(
        ask(&p, "ci", "box", ssh(SshOpKind::Exec, "uptime")).action,
        Action::Allow
    );
}

#[test]
fn ssh_empty_and_negative_matchers() {
    let p = policy(&format!(
        "{}{}",
        rule("anything", "\"ci\"", "\"box\"", "allow", "ssh = {}"),
        rule(
            "no shell",
            "\"ops\"",
            "\"box\"",
            "allow",
            "ssh = { shell = false }"
        ),
    ));
    for kind in [
        SshOpKind::Exec,
        SshOpKind::Shell,
        SshOpKind::Subsystem,
        SshOpKind::Forward,
    ] {
        assert_eq!(
            ask(&p, "ci", "box", ssh(kind, "x")).action,
            Action::Allow,
            "{kind:?}"
        );
    }
    assert_eq!(
        ask(&p, "ops", "box", ssh(SshOpKind::Exec, "ls")).action,
        Action::Allow
    );
    assert_eq!(
        ask(&p, "ops", "box", ssh(SshOpKind::Shell, "")).action,
        Action::Deny
    );
}

#[test]
fn http_matchers() {
    let p = policy(&rule(
        "api reads",
        "\"ci\"",
        "\"web\"",
        "allow",
        "http = { methods = [\"get\", \"HEAD\"], paths = [\"/api/*\"], hosts = [\"*.example.com\"] }",
    ));
    let d =
        |method, path, host| ask(&p, "ci", "web", Operation::Http { method, path, host }).action;
    assert_eq!(d("GET", "/api/v1/users", "www.example.com"), Action::Allow);
    assert_eq!(d("head", "/api/x", "API.EXAMPLE.COM"), Action::Allow);
    assert_eq!(d("POST", "/api/x", "www.example.com"), Action::Deny);
    assert_eq!(d("GET", "/admin", "www.example.com"), Action::Deny);
    assert_eq!(
        d("GET", "/API/x", "www.example.com"),
        Action::Deny,
        "paths are case-sensitive"
    );
    assert_eq!(d("GET", "/api/x", "example.org"), Action::Deny);
}

#[test]
fn kube_matchers() {
    let p = policy(&format!(
        "{}{}",
        rule("read", "\"ci\"", "\"k8s\"", "allow", "kubernetes = { verbs = [\"get\", \"list\"] }"),
        rule(
            "exec",
            "\"*\"",
            "\"k8s\"",
            "approve",
            "kubernetes = { verbs = [\"create\"], resources = [\"pods/exec\"], namespaces = [\"prod-*\"], names = [\"web-*\"] }",
        ),
    ));
    let d = |verb, resource, namespace, name| {
        ask(
            &p,
            "ci",
            "k8s",
            Operation::Kube {
                verb,
                resource,
                namespace,
                name,
                command: None,
            },
        )
        .action
    };
    assert_eq!(d("list", "pods", "prod-eu", ""), Action::Allow);
    assert_eq!(d("GET", "secrets", "", "x"), Action::Allow);
    assert_eq!(d("delete", "pods", "prod-eu", "web-1"), Action::Deny);
    assert_eq!(
        d("create", "pods/exec", "prod-eu", "web-1"),
        Action::Approve
    );
    assert_eq!(d("create", "pods/exec", "dev", "web-1"), Action::Deny);
    assert_eq!(d("create", "pods/exec", "prod-eu", "db-1"), Action::Deny);
    assert_eq!(d("create", "pods/attach", "prod-eu", "web-1"), Action::Deny);
}

#[test]
fn kube_exec_commands() {
    let p = policy(&format!(
        "{}{}{}",
        rule(
            "ls",
            "\"ci\"",
            "\"k8s\"",
            "allow",
            "kubernetes = { resources = [\"pods/exec\"], namespaces = [\"dev\"], exec = [\"ls *\", \"cat /etc/hostname\"] }",
        ),
        rule(
            "psql",
            "\"ci\"",
            "\"k8s\"",
            "approve",
            "kubernetes = { resources = [\"pods/exec\"], exec = [\"psql *\"] }",
        ),
        rule("read", "\"ci\"", "\"k8s\"", "allow", "kubernetes = { verbs = [\"get\"] }"),
    ));
    let d = |resource, namespace, command: Option<&[&str]>| {
        let words: Option<Vec<String>> = command.map(|c| c.iter().map(|w| w.to_string()).collect());
        ask(
            &p,
            "ci",
            "k8s",
            Operation::Kube {
                verb: "create",
                resource,
                namespace,
                name: "web-1",
                command: words.as_deref(),
            },
        )
        .action
    };
    assert_eq!(d("pods/exec", "dev", Some(&["ls"])), Action::Allow);
    assert_eq!(
        d("pods/exec", "dev", Some(&["ls", "-l", "/tmp"])),
        Action::Allow
    );
    assert_eq!(
        d("pods/exec", "dev", Some(&["cat", "/etc/hostname"])),
        Action::Allow
    );
    assert_eq!(
        d("pods/exec", "dev", Some(&["cat", "/etc/shadow"])),
        Action::Deny
    );
    // Words are matched as the runtime receives them: no shell joins or splits them.
    assert_eq!(d("pods/exec", "dev", Some(&["ls; rm -rf /"])), Action::Deny);
    assert_eq!(
        d("pods/exec", "dev", Some(&["sh", "-c", "ls"])),
        Action::Deny
    );
    assert_eq!(d("pods/exec", "dev", Some(&[])), Action::Deny);
    // attach carries no command: an `exec` rule never matches it.
    assert_eq!(d("pods/attach", "dev", Some(&[])), Action::Deny);
    assert_eq!(d("pods/exec", "prod", Some(&["ls"])), Action::Deny);
    assert_eq!(
        d("pods/exec", "prod", Some(&["psql", "-c", "select 1"])),
        Action::Approve
    );
    // A rule with `exec` says nothing about requests without a command.
    assert_eq!(d("pods", "dev", None), Action::Deny);
}

#[test]
fn whole_connection_approve_applies_to_operations_too() {
    let p = policy(&format!(
        "{}{}",
        rule("watch ci", "\"ci\"", "\"db\"", "approve", ""),
        rule("ci reads", "\"ci\"", "\"db\"", "allow", "sql = {}"),
    ));
    assert_eq!(
        ask(&p, "ci", "db", sql("select", &[], &[])),
        matched(Action::Approve, "watch ci")
    );
}

#[test]
fn identity_listed_with_others() {
    let p = policy(&rule(
        "both",
        "\"ops\", \"ci\"",
        "\"db\", \"db2\"",
        "allow",
        "",
    ));
    for id in ["ci", "ops"] {
        for t in ["db", "db2"] {
            assert_eq!(ask(&p, id, t, Operation::Connect).action, Action::Allow);
        }
        assert_eq!(ask(&p, id, "raw", Operation::Connect).action, Action::Deny);
    }
}

#[test]
fn statement_bits() {
    use crate::model::statement_bit;
    use crate::SQL_STATEMENTS;
    assert!(SQL_STATEMENTS.len() < 63);
    assert!(
        SQL_STATEMENTS.windows(2).all(|w| w[0] < w[1]),
        "sorted and unique"
    );
    for (i, s) in SQL_STATEMENTS.iter().enumerate() {
        assert_eq!(statement_bit(s), 1 << i);
        assert_eq!(statement_bit(&s.to_uppercase()), 1 << i);
    }
    assert_eq!(statement_bit("frobnicate"), 1 << 63);
    assert_eq!(statement_bit(""), 1 << 63);
}

#[test]
fn unknown_statement_kinds_only_match_any() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "reads",
            "\"ci\"",
            "\"db\"",
            "allow",
            "sql = { statements = [\"select\"] }"
        ),
        rule(
            "anything",
            "\"ops\"",
            "\"db\"",
            "allow",
            "sql = { statements = [\"*\"] }"
        ),
    ));
    assert_eq!(
        ask(&p, "ci", "db", sql("frobnicate", &[], &[])).action,
        Action::Deny
    );
    assert_eq!(
        ask(&p, "ops", "db", sql("frobnicate", &[], &[])).action,
        Action::Allow
    );
}

#[test]
fn rules_naming_several_targets_and_identities() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "multi",
            "\"ops\", \"ci\"",
            "\"db2\", \"db\"",
            "deny",
            "sql = { statements = [\"drop\"] }"
        ),
        rule("all", "\"*\"", "\"*\"", "allow", ""),
    ));
    for id in ["ci", "ops"] {
        for t in ["db", "db2"] {
            assert_eq!(
                ask(&p, id, t, sql("drop", &[], &[])),
                matched(Action::Deny, "multi")
            );
            assert_eq!(
                ask(&p, id, t, sql("select", &[], &[])),
                matched(Action::Allow, "all")
            );
        }
    }
}

#[test]
fn claims_conditions_match_only_verified_tokens_that_carry_them() {
    let p = crate::parse(
        r#"[[identity]]
name = "bot"
uid = 1

[[target]]
name = "db"
protocol = "postgres"
address = ["127.0.0.1:5432"]

[[rule]]
name = "deployers update"
identities = ["bot"]
targets = ["db"]
action = "allow"
sql = { statements = ["update"] }
claims = { groups = ["deployers", "admins"] }
"#,
        "p.toml",
    )
    .expect("policy");
    let upd = Operation::Sql {
        statement: "update",
        tables: &[],
        functions: &[],
    };
    let decide_with = |claims: Option<&std::collections::BTreeMap<String, Vec<String>>>| {
        decide(
            &p,
            &Request {
                identity: Some("bot"),
                target: "db",
                op: upd,
                claims,
                inspected: true,
            },
        )
        .action
    };
    let mut c = std::collections::BTreeMap::new();
    assert_eq!(decide_with(None), Action::Deny, "no token, no match");
    c.insert("groups".to_string(), vec!["analysts".to_string()]);
    assert_eq!(decide_with(Some(&c)), Action::Deny, "other group");
    c.insert("groups".to_string(), vec!["x".into(), "admins".into()]);
    assert_eq!(decide_with(Some(&c)), Action::Allow);
    // At connect time (no token yet) the postgres connection is let in to be checked per
    // statement.
    let connect = |inspected| {
        decide(
            &p,
            &Request {
                identity: Some("bot"),
                target: "db",
                op: Operation::Connect,
                claims: None,
                inspected,
            },
        )
    };
    assert_eq!(connect(true).action, Action::Allow);
    // Without a handler that checks operations (an opaque relay) the claims could never be
    // checked: the connection stays out.
    assert_eq!(connect(false).action, Action::Deny);
    let e = crate::parse(
        "[[identity]]\nname = \"bot\"\nuid = 1\n[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.1:5432\"]\n[[rule]]\nname = \"r\"\nidentities = [\"bot\"]\ntargets = [\"db\"]\naction = \"allow\"\nclaims = { groups = [] }\n",
        "p.toml",
    )
    .expect_err("empty claim values");
    assert!(e.message.contains("at least one accepted value"), "{e}");
}

#[test]
fn statement_groups_decide_as_their_kinds() {
    let p = policy(&format!(
        "{}{}",
        rule(
            "ddl",
            "\"ci\"",
            "\"db\"",
            "allow",
            "sql = { statements = [\"ddl\", \"transaction\"] }"
        ),
        rule(
            "no-dcl",
            "\"ci\"",
            "\"db\"",
            "deny",
            "sql = { statements = [\"dcl\"] }"
        ),
    ));
    for kind in [
        "create",
        "alter",
        "drop",
        "comment",
        "begin",
        "commit",
        "savepoint",
    ] {
        assert_eq!(
            ask(&p, "ci", "db", sql(kind, &[], &[])),
            matched(Action::Allow, "ddl"),
            "{kind}"
        );
    }
    for kind in ["grant", "revoke", "reassign"] {
        assert_eq!(
            ask(&p, "ci", "db", sql(kind, &[], &[])),
            matched(Action::Deny, "no-dcl")
        );
    }
    for kind in ["select", "insert", "vacuum"] {
        assert_eq!(
            ask(&p, "ci", "db", sql(kind, &[], &[])),
            denied(DecisionReason::NoMatchingRule),
            "{kind}"
        );
    }
}
