use std::net::{IpAddr, SocketAddr};

use crate::{parse, Policy, WorkloadFacts};

fn policy(text: &str) -> Policy {
    match parse(text, "t.toml") {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn facts<'a>(
    cgroup: &'a str,
    uid: u32,
    user: Option<&'a str>,
    exe: Option<&'a str>,
    comm: &'a str,
) -> WorkloadFacts<'a> {
    WorkloadFacts {
        cgroup,
        uid,
        user,
        exe,
        comm,
        foreign_userns: false,
    }
}

const IDENTITIES: &str = r#"
[[identity]]
name = "ci"
cgroup = "/system.slice/ci-runner.service*"

[[identity]]
name = "py-reports"
uid = 1001
exe = "/usr/bin/python3*"

[[identity]]
name = "by-user"
user = "deploy"

[[identity]]
name = "by-comm"
comm = "psql"

[[identity]]
name = "catch-uid-1001"
uid = 1001
"#;

fn identify<'p>(p: &'p Policy, f: &WorkloadFacts<'_>) -> Option<&'p str> {
    p.identify(f).map(|i| i.name.as_str())
}

#[test]
fn cgroup_glob_star_crosses_slashes() {
    let p = policy(IDENTITIES);
    let c = |cg| identify(&p, &facts(cg, 0, None, None, "x"));
    assert_eq!(c("/system.slice/ci-runner.service"), Some("ci"));
    assert_eq!(c("/system.slice/ci-runner.service/sub"), Some("ci"));
    assert_eq!(c("/system.slice/ci-runner.service-2/a/b"), Some("ci"));
    assert_eq!(c("/user.slice/ci-runner.service"), None);
    assert_eq!(c("/system.slice/CI-runner.service"), None, "case-sensitive");
}

#[test]
fn every_given_key_must_match() {
    let p = policy(IDENTITIES);
    let exe = Some("/usr/bin/python3.11");
    assert_eq!(
        identify(&p, &facts("/", 1001, None, exe, "python3")),
        Some("py-reports")
    );
    // uid matches but exe does not: falls through to the next identity in file order.
    assert_eq!(
        identify(&p, &facts("/", 1001, None, Some("/usr/bin/perl"), "perl")),
        Some("catch-uid-1001")
    );
    // Unknown exe cannot satisfy an exe glob.
    assert_eq!(
        identify(&p, &facts("/", 1001, None, None, "python3")),
        Some("catch-uid-1001")
    );
    assert_eq!(identify(&p, &facts("/", 1002, None, exe, "python3")), None);
}

#[test]
fn exe_in_a_foreign_user_namespace_matches_only_when_the_identity_opts_in() {
    let p = policy(
        r#"
[[identity]]
name = "psql"
exe = "/usr/lib/postgresql/*/bin/psql"

[[identity]]
name = "psql-in-containers"
exe = "/usr/lib/postgresql/*/bin/psql"
exe_foreign_userns = true
uid = 1000
"#,
    );
    let exe = Some("/usr/lib/postgresql/15/bin/psql");
    let mut f = facts("/bots/a", 1000, None, exe, "psql");
    assert_eq!(identify(&p, &f), Some("psql"));
    f.foreign_userns = true;
    assert_eq!(identify(&p, &f), Some("psql-in-containers"));
    f.uid = 1001;
    assert_eq!(
        identify(&p, &f),
        None,
        "foreign userns without opt-in: no match"
    );
    let e = parse(
        "[[identity]]\nname = \"x\"\nuid = 1\nexe_foreign_userns = true\n",
        "t.toml",
    )
    .expect_err("opt-in without exe");
    assert!(e.to_string().contains("without `exe`"), "{e}");
}

#[test]
fn user_is_exact_and_comm_is_a_glob() {
    let p = policy(IDENTITIES);
    assert_eq!(
        identify(&p, &facts("/", 5, Some("deploy"), None, "x")),
        Some("by-user")
    );
    assert_eq!(
        identify(&p, &facts("/", 5, Some("deployer"), None, "x")),
        None
    );
    assert_eq!(
        identify(&p, &facts("/", 5, Some("Deploy"), None, "x")),
        None
    );
    assert_eq!(
        identify(&p, &facts("/", 5, None, None, "psql")),
        Some("by-comm")
    );
    assert_eq!(identify(&p, &facts("/", 5, None, None, "psql2")), None);
}

#[test]
fn first_identity_in_file_order_wins() {
    let p = policy(
        "[[identity]]\nname = \"a\"\nuid = 7\n[[identity]]\nname = \"b\"\nuid = 7\ncomm = \"x\"\n",
    );
    assert_eq!(identify(&p, &facts("/", 7, None, None, "x")), Some("a"));
    assert!(p
        .identity("b")
        .is_some_and(|i| i.matches(&facts("/", 7, None, None, "x"))));
}

const TARGETS: &str = r#"
[[target]]
name = "wide"
protocol = "tcp"
address = ["10.0.0.0/8:5432", "[fd00::/16]:5432"]

[[target]]
name = "narrow"
protocol = "postgres"
address = ["10.1.2.0/24:5432", "[fd00:1::/64]:5432"]

[[target]]
name = "named"
protocol = "postgres"
address = ["db.internal:5432"]

[[target]]
name = "exact"
protocol = "postgres"
address = ["10.1.2.3:5432", "[fd00:1::9]:5432"]

[[target]]
name = "loopback"
protocol = "postgres"
address = ["127.0.0.0/8:5432"]
"#;

fn resolve(host: &str) -> Vec<IpAddr> {
    match host {
        "db.internal" => vec![
            "10.1.2.50".parse().expect("ip"),
            "::ffff:10.1.2.51".parse().expect("ip"),
        ],
        _ => Vec::new(),
    }
}

fn target_for<'p>(p: &'p Policy, addr: &str) -> Option<&'p str> {
    let addr: SocketAddr = addr.parse().expect("addr");
    p.target_for(addr, &resolve).map(|t| t.name.as_str())
}

#[test]
fn the_longest_prefix_wins_exact_and_host_addresses_being_full_length() {
    let p = policy(TARGETS);
    assert_eq!(target_for(&p, "10.1.2.3:5432"), Some("exact"));
    assert_eq!(target_for(&p, "10.1.2.50:5432"), Some("named"));
    assert_eq!(
        target_for(&p, "10.1.2.51:5432"),
        Some("named"),
        "mapped resolver answers count"
    );
    assert_eq!(target_for(&p, "10.1.2.4:5432"), Some("narrow"));
    assert_eq!(target_for(&p, "10.9.9.9:5432"), Some("wide"));
    assert_eq!(target_for(&p, "11.0.0.1:5432"), None);
    assert_eq!(target_for(&p, "10.1.2.3:5433"), None, "port must match");
    assert_eq!(target_for(&p, "127.0.0.1:5432"), Some("loopback"));
    assert_eq!(target_for(&p, "127.255.0.1:5432"), Some("loopback"));
    assert_eq!(target_for(&p, "[fd00:1::9]:5432"), Some("exact"));
    assert_eq!(target_for(&p, "[fd00:1::8]:5432"), Some("narrow"));
    assert_eq!(target_for(&p, "[fd00:2::8]:5432"), Some("wide"));
}

#[test]
fn ipv4_mapped_ipv6_is_normalised() {
    let p = policy(TARGETS);
    assert_eq!(target_for(&p, "[::ffff:10.1.2.3]:5432"), Some("exact"));
    assert_eq!(target_for(&p, "[::ffff:10.1.2.50]:5432"), Some("named"));
    assert_eq!(target_for(&p, "[::ffff:10.1.2.4]:5432"), Some("narrow"));
    assert_eq!(target_for(&p, "[::ffff:127.0.0.1]:5432"), Some("loopback"));
    let p = policy(
        "[[target]]\nname = \"m\"\nprotocol = \"tcp\"\naddress = [\"[::ffff:192.168.0.1]:1\"]\n",
    );
    assert_eq!(target_for(&p, "192.168.0.1:1"), Some("m"));
}

#[test]
fn equal_prefixes_go_to_the_first_target() {
    let p = policy(
        "[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = [\"10.0.0.0/24:1\"]\n[[target]]\nname = \"b\"\nprotocol = \"tcp\"\naddress = [\"10.0.0.0/24:2\", \"10.0.0.0/16:1\"]\n",
    );
    assert_eq!(target_for(&p, "10.0.0.1:1"), Some("a"));
    assert_eq!(target_for(&p, "10.0.0.1:2"), Some("b"));
    assert_eq!(target_for(&p, "10.0.1.1:1"), Some("b"));
}

#[test]
fn lookups_by_name() {
    let p = policy(TARGETS);
    assert_eq!(
        p.target("named").map(|t| t.protocol.as_str()),
        Some("postgres")
    );
    assert!(p.target("nope").is_none());
    assert!(p.credential_for("named").is_none());
}
