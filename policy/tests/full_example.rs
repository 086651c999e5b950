//! `examples/full.toml` exercises every key of the contract; this checks it parses to what it says.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tollgate_policy::{
    decide, parse, Action, DecisionReason, FailMode, MaskStyle, Mode, Operation, Protocol, Request,
    SecretSource, SshOpKind, TargetAddress,
};

const FULL: &str = include_str!("../examples/full.toml");

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

#[test]
fn full_example_parses_every_key() {
    let p = parse(FULL, "examples/full.toml").expect("full.toml parses");

    let a = &p.agent;
    assert_eq!(a.listen, vec![sa("127.0.0.1:15001"), sa("[::1]:15001")]);
    assert_eq!(a.metrics, Some(sa("127.0.0.1:9464")));
    assert_eq!(a.admin, Some(sa("127.0.0.1:9465")));
    assert_eq!(a.data_dir, Path::new("/var/lib/tollgate"));
    assert_eq!(a.fail_mode, FailMode::Closed);
    assert_eq!(a.mode, Mode::Enforce);
    assert_eq!(a.bpf_pin_path, Path::new("/sys/fs/bpf/tollgate"));
    assert_eq!(a.max_connections, 4096);
    assert_eq!(a.drain_timeout, Duration::from_secs(10));
    assert_eq!(a.dns_refresh, Duration::from_secs(30));
    assert_eq!(a.namespace, tollgate_policy::NetnsScope::All);
    assert_eq!(a.host_id.as_deref(), Some("db-host-1"));

    assert_eq!(p.identities.len(), 3);
    let report = p.identity("report-bot").expect("report-bot");
    assert_eq!(report.uid, Some(1001));
    assert_eq!(report.user.as_deref(), Some("reports"));
    assert_eq!(report.exe.as_deref(), Some("/usr/bin/python3*"));
    assert_eq!(report.comm.as_deref(), Some("python3*"));
    let ops = p.identity("ops-bot").expect("ops-bot");
    let oidc = ops.oidc.as_ref().expect("ops-bot oidc");
    assert_eq!(oidc.issuer, "https://idp.example");
    assert_eq!(oidc.audience.as_deref(), Some("tollgate"));
    assert_eq!(
        oidc.require_claims.get("groups"),
        Some(&vec!["ops".to_string(), "sre".to_string()])
    );

    let db = p.target("orders-db").expect("orders-db");
    assert_eq!(db.protocol, Protocol::Postgres);
    assert_eq!(db.credential.as_deref(), Some("orders-rw"));
    assert_eq!(
        db.address,
        vec![
            TargetAddress::Exact(sa("127.0.0.1:5432")),
            TargetAddress::Exact(sa("[::1]:5432")),
            TargetAddress::Host("db.internal".into(), 5432),
            TargetAddress::Cidr("10.0.0.0/24".parse().expect("net"), 5432),
            TargetAddress::Cidr("fd00::/64".parse().expect("net"), 5432),
        ]
    );
    let protocols: Vec<Protocol> = p.targets.iter().map(|t| t.protocol).collect();
    for proto in Protocol::ALL {
        assert!(protocols.contains(&proto), "{proto} not exercised");
    }

    let sources: Vec<SecretSource<'_>> = p
        .credentials
        .values()
        .filter_map(|c| c.secret_source())
        .collect();
    assert_eq!(sources.len(), 5);
    assert!(sources.contains(&SecretSource::Env("TOLLGATE_CACHE_PASSWORD")));
    let rw = p.credential_for("orders-db").expect("orders-rw");
    assert_eq!(rw.user.as_deref(), Some("app_rw"));
    assert_eq!(
        rw.password_file.as_deref(),
        Some(Path::new("/etc/tollgate/secrets/orders-rw"))
    );
    assert_eq!(
        p.credentials["bastion-key"].key_file.as_deref(),
        Some(Path::new("/etc/tollgate/secrets/bastion.key"))
    );
    assert_eq!(
        p.credentials["bastion-key"].cert_file.as_deref(),
        Some(Path::new("/etc/tollgate/secrets/bastion.key-cert.pub"))
    );
    let bastion = p
        .targets
        .iter()
        .find(|t| t.name == "bastion")
        .expect("bastion");
    assert!(bastion.pool, "ssh reuse on");

    let dba = p.rule("schema changes need a dba").expect("rule");
    assert_eq!(dba.action, Action::Approve);
    assert_eq!(dba.approvers, vec!["dba".to_string()]);
    assert_eq!(dba.timeout, Some(Duration::from_secs(300)));
    assert_eq!(dba.min_approvals, Some(2));
    let ssh = p.rule("ops may check services").expect("rule");
    let m = ssh.ssh.as_ref().expect("ssh matcher");
    assert_eq!(m.shell, Some(false));
    assert_eq!(m.forwarding, Some(false));
    assert_eq!(m.subsystems, vec!["sftp".to_string()]);
    let http = p.rule("reports read billing").expect("rule");
    let h = http.http.as_ref().expect("http matcher");
    assert_eq!(h.methods, vec!["GET".to_string(), "HEAD".to_string()]);
    let kube = p.rule("no exec into prod pods").expect("rule");
    let k = kube.kubernetes.as_ref().expect("kube matcher");
    assert_eq!(
        k.resources,
        vec!["pods/exec".to_string(), "pods/attach".to_string()]
    );
    assert_eq!(k.names, vec!["*".to_string()]);
    assert!(p
        .rule("ci uses the cache")
        .expect("rule")
        .is_whole_connection());

    let ap = p.approvals.as_ref().expect("approvals");
    assert_eq!(
        ap.store.as_deref(),
        Some("postgres://tollgate@db.internal/tollgate")
    );
    assert_eq!(
        ap.store_password,
        Some(tollgate_policy::StorePassword::File(
            "/etc/tollgate/secrets/approval-store".into()
        ))
    );
    assert!(ap
        .webhook
        .as_deref()
        .is_some_and(|w| w.starts_with("https://hooks.example/")));
    let o = ap.oidc.as_ref().expect("approvals.oidc");
    assert_eq!(o.issuer, "https://idp.example");
    assert_eq!(o.client_id.as_deref(), Some("tollgate"));
    assert_eq!(
        o.client_secret_file.as_deref(),
        Some(Path::new("/etc/tollgate/secrets/oidc-client"))
    );
    assert_eq!(o.audience.as_deref(), Some("tollgate"));
    assert_eq!(o.groups_claim, "groups");

    let styles: Vec<MaskStyle> = p.masks.iter().map(|m| m.style).collect();
    assert_eq!(
        styles,
        vec![
            MaskStyle::Partial,
            MaskStyle::Hash,
            MaskStyle::Null,
            MaskStyle::Full
        ]
    );
    assert_eq!(p.masks[0].detectors.len(), tollgate_policy::DETECTORS.len());
    assert!(p.masks[0].matches_column("public.customers", "EMAIL"));
    assert!(p.masks[0].matches_column("customers", "card_number"));
    assert!(!p.masks[0].matches_column("customers", "name"));
    assert!(p.masks[2].matches_column("people", "ssn"));
    assert_eq!(p.masks_for("orders-db").count(), 3);
    assert_eq!(p.masks_for("billing-api").count(), 2);
}

#[test]
fn full_example_decides_like_its_comments_say() {
    let p = parse(FULL, "examples/full.toml").expect("full.toml parses");
    let tables = vec!["public.orders".to_string()];
    let none: Vec<String> = Vec::new();
    let sql = |statement| Operation::Sql {
        statement,
        tables: &tables,
        functions: &none,
    };
    let ask = |identity, target, op| {
        decide(
            &p,
            &Request {
                claims: None,
                // As the agent registers handlers (handlers.rs): every protocol but the opaque `tcp`
                // relay has an inspecting handler (postgres, ssh, http, https, kubernetes).
                inspected: p
                    .target(target)
                    .is_some_and(|t| t.protocol != tollgate_policy::Protocol::Tcp),
                identity: Some(identity),
                target,
                op,
            },
        )
    };

    let d = ask("ci-bot", "orders-db", Operation::Connect);
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Allow, Some("ci may read and write rows"))
    );
    assert_eq!(
        ask("ci-bot", "orders-db", sql("select")).action,
        Action::Allow
    );
    let d = ask("ci-bot", "orders-db", sql("drop"));
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Deny, Some("nobody drops tables"))
    );
    assert_eq!(
        ask("ci-bot", "orders-db", sql("alter")).action,
        Action::Approve
    );
    assert_eq!(
        ask("ci-bot", "orders-db", sql("delete")).reason,
        DecisionReason::NoMatchingRule
    );
    assert_eq!(
        ask("report-bot", "orders-db", Operation::Connect).action,
        Action::Deny
    );

    let exec = |command| Operation::Ssh {
        kind: SshOpKind::Exec,
        command,
    };
    assert_eq!(
        ask("ops-bot", "bastion", exec("systemctl status nginx")).action,
        Action::Allow
    );
    assert_eq!(
        ask("ops-bot", "bastion", exec("rm -rf /")).action,
        Action::Deny
    );
    let shell = Operation::Ssh {
        kind: SshOpKind::Shell,
        command: "",
    };
    assert_eq!(ask("ops-bot", "bastion", shell).action, Action::Approve);

    let get = Operation::Http {
        method: "get",
        path: "/api/v1/invoices/7",
        host: "BILLING.internal",
    };
    assert_eq!(ask("report-bot", "billing-api", get).action, Action::Allow);
    let post = Operation::Http {
        method: "POST",
        path: "/api/v1/invoices",
        host: "billing.internal",
    };
    assert_eq!(ask("report-bot", "billing-api", post).action, Action::Deny);

    let exec_pod = Operation::Kube {
        verb: "create",
        resource: "pods/exec",
        namespace: "prod-eu",
        name: "web-1",
        command: Some(&["ls".to_string()]),
    };
    assert_eq!(
        ask("ops-bot", "prod-cluster", exec_pod).action,
        Action::Deny
    );
    let list = Operation::Kube {
        verb: "list",
        resource: "pods",
        namespace: "prod-eu",
        name: "",
        command: None,
    };
    assert_eq!(ask("ops-bot", "prod-cluster", list).action, Action::Allow);

    assert_eq!(
        ask("ci-bot", "cache", Operation::Connect).action,
        Action::Allow
    );
    assert_eq!(
        ask("ops-bot", "cache", Operation::Connect).action,
        Action::Deny
    );
}

#[test]
fn every_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read example");
            if let Err(e) = parse(&text, &path.display().to_string()) {
                panic!("{e}");
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "examples/full.toml and examples/quickstart.toml");
}
