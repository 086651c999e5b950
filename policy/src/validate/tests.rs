//! Every validation error, with its exact position. `BASE` is prepended to each case and its
//! lines are subtracted, so positions below are within the case text (1-based).

use std::net::SocketAddr;
use std::time::Duration;

use crate::{parse, parse_all, AgentConfig, FailMode, MaskStyle, Mode, PolicyError, TargetAddress};

use super::target_address;

const BASE: &str = r#"[[identity]]
name = "ci-bot"
uid = 1000

[[target]]
name = "db"
protocol = "postgres"
address = ["127.0.0.1:5432"]

[[target]]
name = "web"
protocol = "http"
address = ["127.0.0.1:80"]

[[target]]
name = "raw"
protocol = "tcp"
address = ["127.0.0.1:9"]

[credential.db-rw]
user = "app"
password_file = "/etc/tollgate/db"
"#;

/// The first error of BASE + `case`, as (line within `case`, col, message).
fn err(case: &str) -> (usize, usize, String) {
    let text = format!("{BASE}{case}");
    match parse(&text, "p.toml") {
        Ok(_) => panic!("expected an error for:\n{case}"),
        Err(e) => {
            let base_lines = BASE.lines().count();
            assert!(e.line > base_lines, "error inside BASE: {e}");
            (e.line - base_lines, e.col, e.message)
        }
    }
}

/// Assert position and that the message contains every fragment.
#[track_caller]
fn check(case: &str, line: usize, col: usize, fragments: &[&str]) {
    let (l, c, msg) = err(case);
    assert_eq!((l, c), (line, col), "position of: {msg}");
    for f in fragments {
        assert!(msg.contains(f), "message {msg:?} lacks {f:?}");
    }
}

fn rule(extra: &str) -> String {
    format!("[[rule]]\nname = \"r\"\nidentities = [\"ci-bot\"]\ntargets = [\"db\"]\naction = \"allow\"\n{extra}")
}

#[test]
fn base_is_valid() {
    let p = parse(BASE, "p.toml").expect("BASE parses");
    assert_eq!(p.targets.len(), 3);
}

#[test]
fn display_is_file_line_col_message() {
    let e = parse("[agent]\nmode = \"loud\"\n", "/etc/tollgate/policy.toml").expect_err("bad");
    assert_eq!(
        e.to_string(),
        "/etc/tollgate/policy.toml:2:8: invalid mode \"loud\" in [agent]: expected one of: enforce, observe"
    );
    assert_eq!((e.line(), e.col()), (2, 8));
}

#[test]
fn unknown_keys_name_the_table_and_the_fix() {
    let (l, c, msg) = err("[[identity]]\nname = \"x\"\ncgroups = \"/a\"\n");
    assert_eq!((l, c), (3, 1));
    assert_eq!(
        msg,
        "unknown key `cgroups` in [[identity]] (expected one of: name, cgroup, uid, user, exe, exe_foreign_userns, comm, oidc); did you mean `cgroup`?"
    );
    let e = parse("identities = []\n", "p.toml").expect_err("top-level typo");
    assert_eq!((e.line, e.col), (1, 1));
    assert!(
        e.message.starts_with(
            "unknown key `identities` at the top level (expected one of: agent, identity, target,"
        ),
        "{e}"
    );
    assert!(e.message.ends_with("did you mean `identity`?"), "{e}");
    check(
        "[agent]\nlisen = []\n",
        2,
        1,
        &["`lisen` in [agent]", "did you mean `listen`?"],
    );
    check(
        "[[target]]\nname = \"t\"\nprotocl = \"tcp\"\n",
        3,
        1,
        &["in [[target]]", "`protocol`"],
    );
    check(
        "[credential.x]\nuser = \"u\"\npasword_file = \"/p\"\n",
        3,
        1,
        &["in [credential.x]", "`password_file`"],
    );
    check(
        &rule("approver = [\"x\"]\n"),
        6,
        1,
        &["in [[rule]]", "`approvers`"],
    );
    check(
        &rule("sql = { statement = [\"select\"] }\n"),
        6,
        9,
        &["`statement` in `sql` of [[rule]]", "`statements`"],
    );
    check(
        &rule("ssh = { execs = [] }\n"),
        6,
        9,
        &["`ssh` of [[rule]]", "`exec`"],
    );
    check(
        &rule("http = { method = [] }\n"),
        6,
        10,
        &["`http` of [[rule]]", "`methods`"],
    );
    check(
        &rule("kubernetes = { verb = [] }\n"),
        6,
        16,
        &["`kubernetes` of [[rule]]", "`verbs`"],
    );
    check(
        "[approvals]\nhook = \"x\"\n",
        2,
        1,
        &[
            "in [approvals]",
            "store, store_password_file, store_password_env, webhook, oidc",
        ],
    );
    check(
        "[approvals.oidc]\nissuer = \"https://i\"\nclient = \"x\"\n",
        3,
        1,
        &["in [approvals.oidc]"],
    );
    check(
        "[[mask]]\ntargets = [\"db\"]\ncolumn = [\"a.b\"]\n",
        3,
        1,
        &["in [[mask]]", "`columns`"],
    );
    check(
        "[[identity]]\nname = \"x\"\nuid = 1\noidc = { issuer = \"https://i\", aud = \"x\" }\n",
        4,
        32,
        &[
            "`aud` in `oidc` of [[identity]]",
            "issuer, audience, require_claims",
        ],
    );
}

#[test]
fn syntax_type_and_missing_key_errors() {
    check("[agent\n", 1, 7, &[]);
    let e = parse("[agent]\nmode =", "p.toml").expect_err("no value");
    assert_eq!(
        (e.line, e.col, e.message.as_str()),
        (2, 7, "`mode` has no value: write one after `=`")
    );
    check(
        "[[identity]]\nname = \"x\"\nuid = \"1000\"\n",
        3,
        7,
        &["`uid` in [[identity]]", "invalid type"],
    );
    check(
        "[[identity]]\nuid = 1\n",
        1,
        1,
        &["missing key `name` in [[identity]]", "add `name = ...`"],
    );
    check(
        "[[target]]\nname = \"t\"\naddress = [\"1.2.3.4:1\"]\n",
        1,
        1,
        &["missing key `protocol` in [[target]]"],
    );
    check(
        "[approvals.oidc]\naudience = \"x\"\n",
        1,
        1,
        &["missing key `issuer` in [approvals.oidc]"],
    );
    check(
        "[[rule]]\nname = \"r\"\nidentities = [\"*\"]\ntargets = [\"*\"]\n",
        1,
        1,
        &["missing key `action`"],
    );
    check("[[identity]]\nname = \"ci-bot\"\nuid = 1\n[[identity]]\nname = \"x\"\nuid = 1\nname = \"y\"\n", 7, 1, &["duplicate key"]);
}

#[test]
fn rule_references() {
    let (l, c, msg) = err("[[rule]]\nname = \"x\"\nidentities = [\"ci-bott\"]\ntargets = [\"db\"]\naction = \"allow\"\n");
    assert_eq!((l, c), (3, 15));
    assert!(
        msg.starts_with("rule \"x\" names unknown identity \"ci-bott\""),
        "{msg}"
    );
    assert!(msg.contains("did you mean \"ci-bot\"?"), "{msg}");
    check(
        "[[rule]]\nname = \"x\"\nidentities = [\"*\"]\ntargets = [\"db\", \"wbe\"]\naction = \"deny\"\n",
        4,
        18,
        &["rule \"x\" names unknown target \"wbe\"", "did you mean \"web\"?"],
    );
    check(
        "[[rule]]\nname = \"x\"\nidentities = []\ntargets = [\"db\"]\naction = \"deny\"\n",
        3,
        14,
        &["`identities` of rule \"x\" is empty", "\"*\""],
    );
}

#[test]
fn target_references_credential() {
    check(
        "[[target]]\nname = \"t\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.2:5432\"]\ncredential = \"db-ro\"\n",
        5,
        14,
        &["target \"t\" names unknown credential \"db-ro\"", "did you mean \"db-rw\"?"],
    );
    check(
        "[[target]]\nname = \"t\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.2:5432\"]\ncredential = \"zzzzzzzz\"\n",
        5,
        14,
        &["add a [credential.zzzzzzzz] table"],
    );
}

#[test]
fn duplicate_names() {
    check(
        "[[identity]]\nname = \"ci-bot\"\nuid = 2\n",
        2,
        8,
        &["duplicate identity name \"ci-bot\" (first defined on line 2)"],
    );
    check(
        "[[target]]\nname = \"web\"\nprotocol = \"http\"\naddress = [\"127.0.0.1:81\"]\n",
        2,
        8,
        &["duplicate target name \"web\" (first defined on line 11)"],
    );
    let first = format!(
        "duplicate rule name \"r\" (first defined on line {})",
        BASE.lines().count() + 2
    );
    check(&format!("{}{}", rule(""), rule("")), 7, 8, &[&first]);
    check(
        "[[identity]]\nname = \"*\"\nuid = 2\n",
        2,
        8,
        &["identity name \"*\" is reserved"],
    );
}

fn target(address: &str) -> String {
    format!(
        "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = [\"127.0.0.9:1\", {address}]\n"
    )
}

#[test]
fn bad_addresses() {
    // `address = ["127.0.0.9:1", ` is 26 characters, so the second entry starts at column 27.
    check(
        &target("\"127.0.0.1:0\""),
        4,
        27,
        &["port 0 in \"127.0.0.1:0\""],
    );
    check(&target("\"10.0.0.0/24:0\""), 4, 27, &["port 0"]);
    check(&target("\"[::1]:0\""), 4, 27, &["port 0"]);
    check(&target("\"db.internal:0\""), 4, 27, &["port 0"]);
    check(&target("\"127.0.0.1\""), 4, 27, &["missing port"]);
    check(&target("\"127.0.0.1:http\""), 4, 27, &["bad port \"http\""]);
    check(
        &target("\"127.0.0.1:70000\""),
        4,
        27,
        &["bad port \"70000\""],
    );
    check(
        &target("\"::1:5432\""),
        4,
        27,
        &["IPv6 addresses need brackets"],
    );
    check(
        &target("\"10.0.0.0/33:1\""),
        4,
        27,
        &["bad CIDR \"10.0.0.0/33\""],
    );
    check(&target("\"[fd00::/129]:1\""), 4, 27, &["bad CIDR"]);
    check(&target("\"[::zz]:1\""), 4, 27, &["bad IPv6 address"]);
    check(&target("\"300.1.1.1:1\""), 4, 27, &["bad IPv4 address"]);
    check(&target("\"db..internal:1\""), 4, 27, &["bad host name"]);
    check(&target("\"db internal:1\""), 4, 27, &["bad host name"]);
    check(&target("\"[::1]5432\""), 4, 27, &["missing `]:port`"]);
    check(
        "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = []\n",
        4,
        11,
        &["target \"t\" has no `address`"],
    );
}

#[test]
fn addresses_claimed_twice() {
    check(
        &target("\"127.0.0.1:5432\""),
        4,
        27,
        &["already claimed by target \"db\""],
    );
    check(
        &target("\"127.0.0.9:1\""),
        4,
        27,
        &["listed twice in target \"t\""],
    );
    check(
        &target("\"[::ffff:127.0.0.1]:5432\""),
        4,
        27,
        &["already claimed by target \"db\""],
    );
}

#[test]
fn address_forms() {
    let ok = |s: &str| target_address(s).expect(s);
    let sa = |s: &str| s.parse::<SocketAddr>().expect(s);
    assert_eq!(
        ok("127.0.0.1:5432"),
        TargetAddress::Exact(sa("127.0.0.1:5432"))
    );
    assert_eq!(ok("[::1]:5432"), TargetAddress::Exact(sa("[::1]:5432")));
    assert_eq!(
        ok("[::ffff:10.1.2.3]:5432"),
        TargetAddress::Exact(sa("10.1.2.3:5432"))
    );
    let net = |s: &str| s.parse::<ipnet::IpNet>().expect(s);
    assert_eq!(
        ok("10.0.0.0/24:5432"),
        TargetAddress::Cidr(net("10.0.0.0/24"), 5432)
    );
    assert_eq!(
        ok("10.0.0.77/24:5432"),
        TargetAddress::Cidr(net("10.0.0.0/24"), 5432)
    );
    assert_eq!(
        ok("127.0.0.0/8:5432"),
        TargetAddress::Cidr(net("127.0.0.0/8"), 5432)
    );
    assert_eq!(
        ok("[fd00::/64]:5432"),
        TargetAddress::Cidr(net("fd00::/64"), 5432)
    );
    assert_eq!(
        ok("[::ffff:10.0.0.0/104]:1"),
        TargetAddress::Cidr(net("10.0.0.0/8"), 1)
    );
    assert_eq!(
        ok("db.internal:5432"),
        TargetAddress::Host("db.internal".into(), 5432)
    );
    assert_eq!(
        ok("DB.Internal.:5432"),
        TargetAddress::Host("db.internal".into(), 5432)
    );
    assert_eq!(
        ok("localhost:1"),
        TargetAddress::Host("localhost".into(), 1)
    );
    assert_eq!(ok("[fd00::/64]:5432").to_string(), "[fd00::/64]:5432");
    assert_eq!(ok("10.0.0.0/24:5432").to_string(), "10.0.0.0/24:5432");
    assert_eq!(ok("db.internal:5432").port(), 5432);
}

#[test]
fn bad_globs() {
    check(
        "[[identity]]\nname = \"x\"\ncgroup = \"/a/[b\"\n",
        3,
        10,
        &[
            "bad glob \"/a/[b\" in `cgroup` of identity \"x\"",
            "unclosed",
        ],
    );
    check(
        "[[identity]]\nname = \"x\"\nexe = \"/usr/{a\"\n",
        3,
        7,
        &["bad glob", "`exe`"],
    );
    check(
        "[[identity]]\nname = \"x\"\ncomm = \"\"\n",
        3,
        8,
        &["empty glob in `comm`"],
    );
    check(
        &rule("sql = { tables = [\"ok\", \"[x\"] }\n"),
        6,
        25,
        &["bad glob \"[x\" in `sql.tables` of rule \"r\""],
    );
    check(
        "[[mask]]\ntargets = [\"db\"]\ncolumns = [\"a.{b\"]\n",
        3,
        12,
        &["bad glob \"a.{b\" in `columns`"],
    );
    check(
        &format!(
            "[[target]]\nname = \"k8s\"\nprotocol = \"kubernetes\"\naddress = [\"10.0.0.9:443\"]\n{}",
            rule("kubernetes = { exec = [\"ls [ab]\"] }\n").replace("\"db\"", "\"k8s\"")
        ),
        10,
        24,
        &["bad pattern \"ls [ab]\" in `kubernetes.exec` of rule \"r\""],
    );
}

#[test]
fn identity_needs_a_selector() {
    check(
        "[[identity]]\nname = \"nobody\"\n",
        1,
        1,
        &[
            "identity \"nobody\" has no selector",
            "cgroup, uid, user, exe, comm",
        ],
    );
    check(
        "[[identity]]\nname = \"sso\"\noidc = { issuer = \"https://idp\" }\n",
        1,
        1,
        &["has no selector"],
    );
    check(
        "[[identity]]\nname = \"x\"\nuid = -1\n",
        3,
        7,
        &["`uid` of identity \"x\" must be between 0 and 4294967295"],
    );
    check(
        "[[identity]]\nname = \"x\"\nuser = \" \"\n",
        3,
        8,
        &["`user` of identity \"x\" is empty"],
    );
    check(
        "[[identity]]\nname = \"x\"\nuid = 1\noidc = { issuer = \"idp\" }\n",
        4,
        19,
        &["`oidc.issuer` must be a https:// or http:// URL"],
    );
}

#[test]
fn invalid_enum_values() {
    check(
        &rule("").replace("\"allow\"", "\"alow\""),
        5,
        10,
        &[
            "invalid action \"alow\" of rule \"r\"",
            "allow, deny, approve",
            "did you mean \"allow\"?",
        ],
    );
    check(
        "[[target]]\nname = \"t\"\nprotocol = \"pg\"\naddress = [\"127.0.0.9:1\"]\n",
        3,
        12,
        &[
            "invalid protocol \"pg\" for target \"t\"",
            "postgres, ssh, http, https, kubernetes, tcp",
        ],
    );
    check(
        "[agent]\nfail_mode = \"opne\"\n",
        2,
        13,
        &[
            "invalid fail_mode \"opne\" in [agent]",
            "closed, open",
            "did you mean \"open\"?",
        ],
    );
    check(
        "[agent]\nmode = \"Observe\"\n",
        2,
        8,
        &["invalid mode \"Observe\"", "did you mean \"observe\"?"],
    );
    check(
        "[[mask]]\ntargets = [\"db\"]\ncolumns = [\"*.email\"]\nstyle = \"blur\"\n",
        4,
        9,
        &[
            "invalid style \"blur\" in [[mask]]",
            "full, partial, hash, null",
        ],
    );
}

#[test]
fn matcher_must_fit_target_protocol() {
    // `rule()` names target "db" (postgres).
    check(
        &rule("http = { methods = [\"GET\"] }\n"),
        6,
        8,
        &[
            "`http` matcher does not fit target \"db\" (protocol postgres)",
            "use `sql = { ... }`",
        ],
    );
    check(
        &rule("ssh = {}\n"),
        6,
        7,
        &["`ssh` matcher does not fit target \"db\""],
    );
    check(
        &rule("kubernetes = {}\n"),
        6,
        14,
        &["`kubernetes` matcher does not fit"],
    );
    let on = |target: &str, extra: &str| rule(extra).replace("[\"db\"]", target);
    check(
        &on("[\"web\"]", "sql = {}\n"),
        6,
        7,
        &[
            "`sql` matcher does not fit target \"web\" (protocol http)",
            "applies to postgres targets",
        ],
    );
    check(
        &on("[\"db\", \"web\"]", "sql = {}\n"),
        6,
        7,
        &["target \"web\""],
    );
    check(
        &on("[\"raw\"]", "sql = {}\n"),
        6,
        7,
        &[
            "target \"raw\" is tcp, which takes no operation matcher",
            "remove `sql`",
        ],
    );
    check(&on("[\"raw\"]", "http = {}\n"), 6, 8, &["is tcp"]);
    // Fitting combinations parse, including http on https and any matcher on "*".
    let https =
        format!(
        "{BASE}[[target]]\nname = \"s\"\nprotocol = \"https\"\naddress = [\"127.0.0.1:443\"]\n{}{}",
        rule("http = {}\n").replace("[\"db\"]", "[\"s\", \"web\"]"),
        rule("sql = {}\nssh = {}\n").replace("[\"db\"]", "[\"*\"]").replace("\"r\"", "\"r2\""),
    );
    parse(&https, "p.toml").expect("fitting matchers parse");
}

#[test]
fn approval_keys_need_an_approve_rule() {
    check(
        &rule("approvers = [\"dba\"]\n"),
        6,
        13,
        &[
            "rule \"r\": `approvers` only applies to approve rules (action is \"allow\")",
            "set action = \"approve\"",
        ],
    );
    check(
        &rule("timeout = \"5m\"\n"),
        6,
        11,
        &["`timeout` only applies to approve rules"],
    );
    check(
        &rule("min_approvals = 2\n").replace("\"allow\"", "\"deny\""),
        6,
        17,
        &["`min_approvals` only applies", "(action is \"deny\")"],
    );
    let approve = |extra: &str| rule(extra).replace("\"allow\"", "\"approve\"");
    check(
        &approve("timeout = \"soon\"\n"),
        6,
        11,
        &["`timeout` of rule \"r\": bad duration \"soon\"", "\"5m\""],
    );
    check(
        &approve("timeout = \"0s\"\n"),
        6,
        11,
        &["must be longer than 0"],
    );
    check(
        &approve("min_approvals = 0\n"),
        6,
        17,
        &["`min_approvals` of rule \"r\" must be at least 1"],
    );
    let p = parse(
        &format!(
            "{BASE}{}",
            approve("approvers = [\"dba\", \"sre\"]\ntimeout = \"1h 30m\"\nmin_approvals = 2\n")
        ),
        "p.toml",
    )
    .expect("approve rule parses");
    assert_eq!(p.rules[0].timeout, Some(Duration::from_secs(5400)));
    assert_eq!(
        p.rules[0].approvers,
        vec!["dba".to_string(), "sre".to_string()]
    );
}

#[test]
fn matcher_vocabularies() {
    check(
        &rule("sql = { statements = [\"select\", \"selcet\"] }\n"),
        6,
        33,
        &[
            "unknown sql.statements entry \"selcet\"",
            "did you mean \"select\"?",
        ],
    );
    let on = |target: &str, extra: &str| rule(extra).replace("[\"db\"]", target);
    check(
        &on("[\"web\"]", "http = { methods = [\"GET /\"] }\n"),
        6,
        21,
        &["bad HTTP method \"GET /\""],
    );
    let k8s = format!(
        "[[target]]\nname = \"k\"\nprotocol = \"kubernetes\"\naddress = [\"127.0.0.1:6443\"]\n{}",
        on("[\"k\"]", "kubernetes = { verbs = [\"lsit\"] }\n")
    );
    check(
        &k8s,
        10,
        25,
        &[
            "unknown kubernetes.verbs entry \"lsit\"",
            "did you mean \"list\"?",
        ],
    );
}

#[test]
fn masks() {
    check(
        "[[mask]]\ntargets = [\"dbb\"]\ndetectors = [\"email\"]\n",
        2,
        12,
        &["mask names unknown target \"dbb\"", "did you mean \"db\"?"],
    );
    check(
        "[[mask]]\ntargets = [\"db\"]\ndetectors = [\"emial\"]\n",
        3,
        14,
        &[
            "unknown detector \"emial\" in [[mask]]",
            "did you mean \"email\"?",
        ],
    );
    check("[[mask]]\ntargets = [\"db\"]\ndetectors = [\"dna\"]\n", 3, 14, &["expected one of: email, credit_card, us_ssn, iban, phone, jwt, aws_access_key, private_key, bearer_token"]);
    check(
        "[[mask]]\ntargets = [\"db\"]\n",
        1,
        1,
        &["mask has neither `columns` nor `detectors`"],
    );
    let p = parse(
        &format!("{BASE}[[mask]]\ntargets = [\"*\"]\ncolumns = [\"ssn\"]\n"),
        "p.toml",
    )
    .expect("mask");
    assert_eq!(p.masks[0].style, MaskStyle::Full, "default style");
}

#[test]
fn credentials() {
    check(
        "[credential.x]\npassword_file = \"/a\"\nenv = \"SECRET\"\n",
        3,
        7,
        &[
            "credential \"x\" has both `password_file` and `env`",
            "keep exactly one",
        ],
    );
    check(
        "[credential.x]\nkey_file = \"/a\"\ntoken_file = \"/b\"\n",
        3,
        14,
        &["both `key_file` and `token_file`"],
    );
    check(
        "[credential.x]\nuser = \"u\"\ncert_file = \"/c\"\n",
        3,
        13,
        &["`cert_file` of credential \"x\" needs `key_file` beside it"],
    );
    check("[credential.x]\n", 1, 1, &["credential \"x\" is empty"]);
    check(
        "[credential.x]\nenv = \"hunter2!\"\n",
        2,
        7,
        &["`env` of [credential.x] must name an environment variable"],
    );
    check(
        "[credential.x]\nuser = \"u\"\npassword_file = \"\"\n",
        3,
        17,
        &["`password_file` of [credential.x] is empty"],
    );
}

#[test]
fn agent_values() {
    check(
        "[agent]\nlisten = [\"127.0.0.1\"]\n",
        2,
        11,
        &[
            "`listen` in [agent]: bad socket address \"127.0.0.1\"",
            "ip:port",
        ],
    );
    check(
        "[agent]\nmetrics = \"localhost:9464\"\n",
        2,
        11,
        &["`metrics` in [agent]: bad socket address"],
    );
    check(
        "[agent]\nmax_connections = 0\n",
        2,
        19,
        &["`max_connections` in [agent] must be a positive number"],
    );
    check(
        "[agent]\ndrain_timeout = \"5 parsecs\"\n",
        2,
        17,
        &["`drain_timeout` in [agent]: bad duration"],
    );
    check(
        "[agent]\ndns_refresh = \"0s\"\n",
        2,
        15,
        &["`dns_refresh` in [agent] must be longer than 0"],
    );
    check(
        "[agent]\ndata_dir = \"\"\n",
        2,
        12,
        &["`data_dir` in [agent] is empty"],
    );
    check(
        "[approvals]\nstore = \"mysql://x\"\n",
        2,
        9,
        &["`store` must be a postgres:// or postgresql:// URL"],
    );
    check(
        "[approvals]\nwebhook = \"hooks.example\"\n",
        2,
        11,
        &["`webhook` must be a https:// or http:// URL"],
    );
}

#[test]
fn defaults() {
    let p = parse("", "empty.toml").expect("an empty policy is valid");
    assert_eq!(p.agent, AgentConfig::default());
    let a = &p.agent;
    assert_eq!(
        a.listen,
        vec![
            "127.0.0.1:15001".parse::<SocketAddr>().expect("addr"),
            "[::1]:15001".parse().expect("addr")
        ]
    );
    assert_eq!(a.metrics, Some("127.0.0.1:9464".parse().expect("addr")));
    assert_eq!(a.admin, Some("127.0.0.1:9465".parse().expect("addr")));
    assert_eq!(a.data_dir.to_str(), Some("/var/lib/tollgate"));
    assert_eq!(a.fail_mode, FailMode::Closed);
    assert_eq!(a.mode, Mode::Enforce);
    assert_eq!(a.bpf_pin_path.to_str(), Some("/sys/fs/bpf/tollgate"));
    assert_eq!(a.max_connections, 4096);
    assert_eq!(a.drain_timeout, Duration::from_secs(10));
    assert_eq!(a.dns_refresh, Duration::from_secs(30));
    assert!(p.identities.is_empty() && p.targets.is_empty() && p.rules.is_empty());
    assert!(p.approvals.is_none() && p.masks.is_empty() && p.credentials.is_empty());

    let p = parse(
        "[agent]\nmetrics = \"off\"\nadmin = \"[::1]:1\"\nmode = \"observe\"\nfail_mode = \"open\"\ndrain_timeout = \"0s\"\n[approvals]\n[approvals.oidc]\nissuer = \"https://i\"\n",
        "p.toml",
    )
    .expect("parses");
    assert_eq!(p.agent.metrics, None);
    assert_eq!(p.agent.admin, Some("[::1]:1".parse().expect("addr")));
    assert_eq!(p.agent.mode, Mode::Observe);
    assert_eq!(p.agent.fail_mode, FailMode::Open);
    assert_eq!(p.agent.drain_timeout, Duration::ZERO);
    let oidc = p.approvals.and_then(|a| a.oidc).expect("oidc");
    assert_eq!(oidc.groups_claim, "groups");
    assert_eq!(oidc.client_id, None);
}

#[test]
fn parse_all_reports_every_error_in_file_order() {
    let text = format!(
        "{BASE}[[rule]]\nname = \"r\"\nidentities = [\"nobody\"]\ntargets = [\"nowhere\"]\naction = \"maybe\"\n[agent]\nmode = \"x\"\n"
    );
    let errors: Vec<PolicyError> = match parse_all(&text, "p.toml") {
        Ok(_) => panic!("expected errors"),
        Err(e) => e,
    };
    let base = BASE.lines().count();
    let positions: Vec<(usize, usize)> = errors.iter().map(|e| (e.line - base, e.col)).collect();
    assert_eq!(positions, vec![(3, 15), (4, 12), (5, 10), (7, 8)]);
    // `parse` returns the first one.
    let first = parse(&text, "p.toml").expect_err("bad");
    assert_eq!(first, errors[0]);
}

#[test]
fn columns_count_characters() {
    // "é" is two bytes but one column.
    let (l, c, _) = err("[[identity]]\nname = \"é\"\nuid = 1\ncomm = \"[\"\n");
    assert_eq!((l, c), (4, 8));
    let e = parse("# é\n[agent]\nmode = \"é\" ; x\n", "p.toml").expect_err("bad");
    assert_eq!((e.line, e.col), (3, 12));
}

#[test]
fn target_tls_is_validated() {
    let t = |tls: &str| {
        format!("[[target]]\nname = \"t2\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.1:6543\"]\ntls = {tls}\n")
    };
    let ok = parse(
        &format!(
            "{BASE}{}",
            t(r#"{ mode = "verify-full", ca_file = "/etc/ca.pem", server_name = "db.internal" }"#)
        ),
        "p.toml",
    )
    .expect("valid tls");
    let tg = ok.targets.iter().find(|x| x.name == "t2").expect("t2");
    assert_eq!(tg.tls.mode, crate::TlsMode::VerifyFull);
    assert_eq!(tg.tls.server_name.as_deref(), Some("db.internal"));
    let plain = parse(BASE, "p.toml").expect("base");
    assert_eq!(plain.targets[0].tls.mode, crate::TlsMode::Disable);

    check(
        &t(r#"{ mode = "verify" }"#),
        5,
        16,
        &["invalid mode \"verify\"", "verify-full"],
    );
    check(
        &t(r#"{ mode = "verify-full" }"#),
        5,
        7,
        &["needs `ca_file`"],
    );
    check(
        &t(r#"{ mode = "require", ca_file = "/x" }"#),
        5,
        7,
        &["only used with"],
    );
    let ca = parse(
        &format!(
            "{BASE}{}",
            t(r#"{ mode = "verify-ca", ca_file = "/etc/ca.pem" }"#)
        ),
        "p.toml",
    )
    .expect("verify-ca");
    let tg = ca.targets.iter().find(|x| x.name == "t2").expect("t2");
    assert_eq!(tg.tls.mode, crate::TlsMode::VerifyCa);
    check(
        &t(r#"{ mode = "verify-ca" }"#),
        5,
        7,
        &["`mode = \"verify-ca\"`", "needs `ca_file`"],
    );
    check(
        &t(r#"{ mode = "verify-ca", ca_file = "/x", server_name = "db" }"#),
        5,
        7,
        &["`server_name`", "verify-ca does not check names"],
    );
    check(
        &t(r#"{ mode = "require", sni = "x" }"#),
        5,
        27,
        &["unknown key `sni`", "`tls` of [[target]]"],
    );
    check(
        "[[target]]\nname = \"t3\"\nprotocol = \"tcp\"\naddress = [\"127.0.0.1:6544\"]\ntls = { mode = \"require\" }\n",
        5,
        7,
        &["only supported for protocols \"postgres\", \"https\" and \"kubernetes\""],
    );
    // https and kubernetes targets take `tls` (how the server's certificate is checked).
    parse(
        &format!("{BASE}[[target]]\nname = \"t5\"\nprotocol = \"https\"\naddress = [\"127.0.0.1:6546\"]\ntls = {{ mode = \"require\" }}\n"),
        "p.toml",
    )
    .expect("https with tls");
}

#[test]
fn target_pool_defaults_on_for_postgres_and_is_refused_elsewhere() {
    let t = |protocol: &str, pool: &str| {
        format!("[[target]]\nname = \"t4\"\nprotocol = \"{protocol}\"\naddress = [\"127.0.0.1:6545\"]\n{pool}")
    };
    let pooled = |text: &str| {
        parse(&format!("{BASE}{text}"), "p.toml")
            .expect("valid")
            .targets
            .iter()
            .find(|x| x.name == "t4")
            .expect("t4")
            .pool
    };
    assert!(pooled(&t("postgres", "")), "on by default");
    assert!(!pooled(&t("postgres", "pool = false\n")));
    assert!(pooled(&t("ssh", "")), "on by default for ssh too");
    assert!(!pooled(&t("ssh", "pool = false\n")));
    assert!(pooled(&t("https", "")), "and for http targets");
    assert!(!pooled(&t("https", "pool = false\n")));
    check(
        &t("tcp", "pool = true\n"),
        5,
        8,
        &[
            "`pool` of target \"t4\"",
            "only supported for protocols \"postgres\", \"ssh\", \"http\", \"https\" and \"kubernetes\"",
        ],
    );
    check(&t("postgres", "pool = \"yes\"\n"), 5, 8, &["pool"]);
}

#[test]
fn agent_namespace_and_host_id() {
    check(
        "[agent]\nnamespace = \"mine\"\n",
        2,
        13,
        &["invalid namespace \"mine\" in [agent]", "all, own"],
    );
    check(
        "[agent]\nhost_id = \"a b\"\n",
        2,
        11,
        &["invalid host_id \"a b\" in [agent]"],
    );
    let p = parse(
        &format!("{BASE}[agent]\nnamespace = \"own\"\nhost_id = \"agent-a\"\n"),
        "p.toml",
    )
    .expect("valid");
    assert_eq!(p.agent.namespace, crate::NetnsScope::Own);
    assert_eq!(p.agent.host_id.as_deref(), Some("agent-a"));
    let d = parse(BASE, "p.toml").expect("valid");
    assert_eq!(
        d.agent.namespace,
        crate::NetnsScope::All,
        "default: every namespace"
    );
    assert_eq!(d.agent.host_id, None);
}

#[test]
fn approval_store_password_sources() {
    check(
        "[approvals]\nstore = \"postgres://t:pw@db/t\"\nstore_password_file = \"/etc/pw\"\n",
        2,
        9,
        &["`store` already carries a password"],
    );
    check(
        "[approvals]\nstore = \"postgres://t@db/t\"\nstore_password_file = \"/etc/pw\"\nstore_password_env = \"PW\"\n",
        4,
        22,
        &["give only one of `store_password_file` and `store_password_env`"],
    );
    check(
        "[approvals]\nstore_password_env = \"PW\"\n",
        2,
        22,
        &["has no `store`"],
    );
    let p = parse(
        &format!("{BASE}[approvals]\nstore = \"postgres://t@db/t\"\nstore_password_env = \"PW\"\n"),
        "p.toml",
    )
    .expect("valid");
    let a = p.approvals.expect("approvals");
    assert_eq!(
        a.store_password,
        Some(crate::StorePassword::Env("PW".into()))
    );
    assert_eq!(
        crate::redact_url_password("postgres://t:s3cret@db:5432/t?x=1"),
        "postgres://t:***@db:5432/t?x=1"
    );
    assert_eq!(
        crate::redact_url_password("postgres://t@db/t"),
        "postgres://t@db/t"
    );
}

#[test]
fn statement_groups_expand_to_their_kinds() {
    let p = parse(
        &format!(
            "{BASE}{}",
            rule("sql = { statements = [\"ddl\", \"create\", \"Read\"] }\n")
        ),
        "p.toml",
    )
    .expect("valid");
    let m = p.rules[0].sql.as_ref().expect("sql");
    // Group kinds in group order, a kind written again (create) once.
    assert_eq!(
        m.statements[..6],
        ["alter", "comment", "create", "drop", "import", "security"]
    );
    assert_eq!(m.statements.iter().filter(|s| *s == "create").count(), 1);
    assert!(m.statements.iter().any(|s| s == "select"));
    assert!(!m.statements.iter().any(|s| s == "insert"));
    assert!(!m.kinds_by_name, "a group is not a kind by name");
    check(
        &rule("sql = { statements = [\"select\", \"dddl\"] }\n"),
        6,
        33,
        &[
            "unknown sql.statements entry \"dddl\"",
            "did you mean \"ddl\"?",
        ],
    );
    check(
        &rule("sql = { statements = [\"writes\"] }\n"),
        6,
        23,
        &["did you mean \"write\"?"],
    );
}

#[test]
fn statement_groups_partition_the_kinds() {
    use crate::{SQL_STATEMENTS, SQL_STATEMENT_GROUPS};
    let mut all: Vec<&str> = SQL_STATEMENT_GROUPS
        .iter()
        .flat_map(|(_, kinds)| kinds.iter().copied())
        .collect();
    all.sort_unstable();
    let n = all.len();
    all.dedup();
    assert_eq!(n, all.len(), "a kind is in two groups");
    assert_eq!(all, SQL_STATEMENTS, "every kind in exactly one group");
    for (g, _) in SQL_STATEMENT_GROUPS {
        assert!(!SQL_STATEMENTS.contains(g), "group {g} shadows a kind");
    }
}

#[test]
fn dangerous_flags_need_an_explicit_key() {
    let m = |sql: &str| {
        let p = parse(
            &format!("{BASE}{}", rule(&format!("sql = {sql}\n"))),
            "p.toml",
        )
        .expect("valid");
        p.rules[0].sql.clone().expect("sql")
    };
    let by_name = m("{ statements = [\"copy\", \"do\"] }");
    assert!(by_name.allows_flag("do:dynamic_sql", false));
    assert!(
        !by_name.allows_flag("copy:file", false),
        "copy:file needs its key"
    );
    assert!(!by_name.allows_flag("copy:program", false));
    let star = m("{ statements = [\"*\"] }");
    assert!(!star.allows_flag("do:dynamic_sql", false));
    let groups = m("{ statements = [\"write\", \"utility\"] }");
    assert!(!groups.allows_flag("load", false));
    let all = m("{ statements = [\"*\"], functions = [\"*\", \"pg_catalog.query_to_xml\"], dangerous = true, copy_server_files = true }");
    assert!(all.allows_flag("load", false));
    assert!(all.allows_flag("copy:file", false));
    assert!(
        !all.allows_flag("copy:program", false),
        "copy_program is its own key"
    );
    assert!(all.allows_flag("function:pg_read_file", false));
    assert!(all.allows_flag("function:query_to_xml", true));
    assert!(
        !all.allows_flag("function:ts_rewrite", true),
        "SQL text runners: exact names only"
    );
    let prog = m("{ statements = [\"copy\"], copy_program = true }");
    assert!(prog.allows_flag("copy:program", false));
    assert!(!prog.allows_flag("copy:file", false));
    check(
        &rule("sql = { statements = [\"copy\"], copy_server_files = \"yes\" }\n"),
        6,
        52,
        &["copy_server_files"],
    );
}

#[test]
fn unix_socket_of_a_target() {
    let t = |protocol: &str, address: &str, sock: &str| {
        format!(
            "[[target]]\nname = \"u\"\nprotocol = \"{protocol}\"\naddress = [{address}]\nunix_socket = \"{sock}\"\n"
        )
    };
    let ok = format!(
        "{BASE}{}",
        t(
            "postgres",
            "\"127.0.0.1:5499\"",
            "/var/run/postgresql/.s.PGSQL.5499"
        )
    );
    let p = parse(&ok, "p.toml").expect("valid");
    assert_eq!(
        p.target("u").and_then(|t| t.unix_socket.as_deref()),
        Some(std::path::Path::new("/var/run/postgresql/.s.PGSQL.5499"))
    );
    assert_eq!(p.target("db").and_then(|t| t.unix_socket.as_ref()), None);
    check(
        &t("tcp", "\"127.0.0.1:5499\"", "/run/x"),
        5,
        15,
        &["only protocol \"postgres\" targets can name a Unix socket"],
    );
    check(
        &t("postgres", "\"127.0.0.1:5499\"", "relative/.s.PGSQL.5499"),
        5,
        15,
        &["must be an absolute path shorter than 108 bytes"],
    );
    let long = format!("/{}", "x".repeat(107));
    check(
        &t("postgres", "\"127.0.0.1:5499\"", &long),
        5,
        15,
        &["shorter than 108 bytes"],
    );
    check(
        &t("postgres", "\"db.internal:5499\"", "/run/x"),
        5,
        15,
        &["no IP `address`", "over TCP"],
    );
}

#[test]
fn unix_dir_of_the_agent() {
    let p = parse("[agent]\nunix_dir = \"/run/tg\"\n", "p.toml").expect("valid");
    assert_eq!(p.agent.unix_dir, std::path::Path::new("/run/tg"));
    assert_eq!(
        parse("", "p.toml").expect("valid").agent.unix_dir,
        std::path::Path::new("/run/tollgate")
    );
    check(
        "[agent]\nunix_dir = \"run/tg\"\n",
        2,
        12,
        &["`unix_dir` in [agent] must be an absolute path"],
    );
    let long = format!("[agent]\nunix_dir = \"/{}\"\n", "d".repeat(96));
    check(&long, 2, 12, &["at most 96 bytes"]);
}

#[test]
fn inspect_false_takes_no_credential_and_no_operation_matcher() {
    let opaque = "[[target]]\nname = \"partner\"\nprotocol = \"https\"\naddress = [\"10.0.0.8:443\"]\ninspect = false\n";
    let ok = parse(
        &format!("{BASE}{opaque}[[rule]]\nname = \"r\"\nidentities = [\"ci-bot\"]\ntargets = [\"partner\"]\naction = \"allow\"\n"),
        "p.toml",
    )
    .expect("a whole-connection rule is fine");
    assert!(!ok.target("partner").expect("partner").inspect);
    assert!(ok.target("web").expect("web").inspect);
    let (_, _, msg) = err(&format!(
        "{opaque}[[rule]]\nname = \"r\"\nidentities = [\"ci-bot\"]\ntargets = [\"partner\"]\naction = \"allow\"\nhttp = {{ methods = [\"GET\"] }}\n"
    ));
    assert!(
        msg.contains("`inspect = false`") && msg.contains("remove `http`"),
        "{msg}"
    );
    let (_, _, msg) = err(&format!("{opaque}credential = \"db-rw\"\n"));
    assert!(msg.contains("no credential can be injected"), "{msg}");
    let (_, _, msg) = err(
        "[[target]]\nname = \"pg2\"\nprotocol = \"postgres\"\naddress = [\"10.0.0.9:5432\"]\ninspect = false\n",
    );
    assert!(
        msg.contains("only protocols \"http\", \"https\" and \"kubernetes\""),
        "{msg}"
    );
}

#[test]
fn client_certificates_need_their_key_and_a_tls_target() {
    let (_, _, msg) = err("[credential.mtls]\ncert_file = \"/etc/c.pem\"\n");
    assert!(msg.contains("needs `key_file` beside it"), "{msg}");
    let cred = "[credential.mtls]\ncert_file = \"/etc/c.pem\"\nkey_file = \"/etc/c.key\"\n";
    let (_, _, msg) = err(&format!(
        "{cred}[[target]]\nname = \"pg2\"\nprotocol = \"postgres\"\naddress = [\"10.0.0.9:5432\"]\ncredential = \"mtls\"\n"
    ));
    assert!(msg.contains("only used by \"ssh\""), "{msg}");
    let (_, _, msg) = err(
        "[credential.k]\nkey_file = \"/etc/k\"\n[[target]]\nname = \"api\"\nprotocol = \"https\"\naddress = [\"10.0.0.9:443\"]\ncredential = \"k\"\n",
    );
    assert!(msg.contains("needs `cert_file`"), "{msg}");
    let p = parse(
        &format!("{BASE}{cred}[[target]]\nname = \"api\"\nprotocol = \"kubernetes\"\naddress = [\"10.0.0.9:6443\"]\ncredential = \"mtls\"\n"),
        "p.toml",
    )
    .expect("a client certificate for a kubernetes target");
    assert!(p.credentials["mtls"].cert_file.is_some());
}

#[test]
fn record_bodies_is_for_inspected_http_targets() {
    let (_, _, msg) = err(
        "[[target]]\nname = \"pg2\"\nprotocol = \"postgres\"\naddress = [\"10.0.0.9:5432\"]\nrecord_bodies = true\n",
    );
    assert!(msg.contains("`record_bodies` of target \"pg2\""), "{msg}");
    let (_, _, msg) = err(
        "[[target]]\nname = \"p\"\nprotocol = \"https\"\naddress = [\"10.0.0.9:443\"]\ninspect = false\nrecord_bodies = true\n",
    );
    assert!(msg.contains("only inspected"), "{msg}");
}
