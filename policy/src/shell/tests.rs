use super::*;
use crate::{decide, parse, Action, Operation, Request, SshOpKind};

fn words(cmd: &str) -> Vec<String> {
    split_command(cmd).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

#[test]
fn plain_words_and_quotes() {
    assert_eq!(
        words("systemctl status nginx"),
        ["systemctl", "status", "nginx"]
    );
    assert_eq!(words("  a \t b  "), ["a", "b"]);
    assert_eq!(
        words("git-upload-pack 'org/repo.git'"),
        ["git-upload-pack", "org/repo.git"]
    );
    assert_eq!(words("echo 'a; b' \"c | d\""), ["echo", "a; b", "c | d"]);
    assert_eq!(words("echo a'b'\"c\"d ''"), ["echo", "abcd", ""]);
    assert_eq!(
        words("rsync --server --sender -vlogDtpre.iLsfxCIvu . /srv/x"),
        [
            "rsync",
            "--server",
            "--sender",
            "-vlogDtpre.iLsfxCIvu",
            ".",
            "/srv/x"
        ]
    );
    assert_eq!(
        words("scp -t -- /tmp/a,b@c:d%e+f"),
        ["scp", "-t", "--", "/tmp/a,b@c:d%e+f"]
    );
    // `=` later in a word or in a later word is no assignment.
    assert_eq!(words("dd if=/dev/zero"), ["dd", "if=/dev/zero"]);
    assert_eq!(words("'A=1' x"), ["A=1", "x"]);
}

#[test]
fn refusals_name_the_reason() {
    let e = |cmd: &str| split_command(cmd).expect_err(cmd);
    assert_eq!(e(""), CommandError::Empty);
    assert_eq!(e(" \t "), CommandError::Empty);
    assert_eq!(e("a; b"), CommandError::Special(';', 1));
    assert_eq!(e("a $(b)"), CommandError::Special('$', 2));
    assert_eq!(e("a\nb"), CommandError::Quoted('\n', 1));
    assert_eq!(e("a \"$x\""), CommandError::Quoted('$', 3));
    assert_eq!(e("a 'b"), CommandError::Unterminated);
    assert_eq!(e("a \u{e9}"), CommandError::Quoted('\u{e9}', 2));
    assert_eq!(e("A=1 b"), CommandError::Assignment);
    assert_eq!(e("_x=1"), CommandError::Assignment);
    assert_eq!(e("if x"), CommandError::Reserved);
    assert_eq!(e("'time' x"), CommandError::Reserved);
    assert_eq!(e("~/x"), CommandError::Special('~', 0));
    assert_eq!(e("a #b"), CommandError::Special('#', 2));
    assert_eq!(e("ls *"), CommandError::Special('*', 3));
    assert!(e("a;b").to_string().contains("';'"), "{}", e("a;b"));
}

fn pattern(p: &str) -> ExecPattern {
    ExecPattern::compile(p).unwrap_or_else(|e| panic!("{p:?}: {e}"))
}

#[test]
fn pattern_words() {
    let m = |p: &str, cmd: &str| any_matches(&[pattern(p)], cmd);
    assert!(m("systemctl status *", "systemctl status nginx"));
    assert!(m("systemctl status *", "systemctl status a b c"));
    assert!(m("systemctl status *", "systemctl status"));
    assert!(m("systemctl  status   *", "systemctl status 'x y'"));
    assert!(!m("systemctl status *", "systemctl restart nginx"));
    assert!(!m("systemctl status *", "systemctl status nginx; id"));
    assert!(!m("systemctl status *", "systemctl"));
    // Without a final `*` the word count is exact.
    assert!(m("uptime", "uptime"));
    assert!(!m("uptime", "uptime -p"));
    // `*` inside a word stays inside that word (and matches `/`).
    assert!(m("cat /var/log/app/*.log", "cat /var/log/app/x/y.log"));
    assert!(!m(
        "cat /var/log/app/*.log",
        "cat /var/log/app/a.log /etc/shadow"
    ));
    assert!(!m("cat /var/log/app/*.log", "cat /etc/shadow"));
    assert!(m("journalctl -u app-*", "journalctl -u app-web"));
    assert!(m("git-upload-pack *", "git-upload-pack 'org/repo.git'"));
    // A lone `*` pattern matches any single word; `* *` any command.
    assert!(m("*", "ls"));
    assert!(!m("*", "ls -l"));
    assert!(m("* *", "ls -l /"));
    // Quoting does not smuggle a different first word.
    assert!(m("echo *", "'echo' hi"));
    assert!(!m("echo *", "'echo hi'"));
}

#[test]
fn bad_patterns_are_errors() {
    assert!(ExecPattern::compile("").is_err());
    assert!(ExecPattern::compile("   ").is_err());
    assert!(ExecPattern::compile("ls [ab]").is_err());
    assert!(ExecPattern::compile("ls {a,b}").is_err());
    let p = parse(
        "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\naddress = [\"127.0.0.1:22\"]\n\
         [[rule]]\nname = \"r\"\nidentities = [\"*\"]\ntargets = [\"box\"]\naction = \"allow\"\n\
         ssh = { exec = [\"ls [ab]\"] }\n",
        "p.toml",
    )
    .expect_err("a bad exec pattern is an error")
    .to_string();
    assert!(
        p.starts_with("p.toml:10:17: bad pattern \"ls [ab]\" in `ssh.exec`"),
        "{p}"
    );
}

const INJECTIONS: &[&str] = include!("injections.rs");

#[test]
fn injection_attempts_are_denied() {
    assert!(INJECTIONS.len() >= 20);
    let policy = parse(
        r#"
[[identity]]
name = "ci"
uid = 1000

[[target]]
name = "box"
protocol = "ssh"
address = ["127.0.0.1:22"]

[[rule]]
name = "echo only"
identities = ["ci"]
targets = ["box"]
action = "allow"
ssh = { exec = ["echo *", "systemctl status *"] }
"#,
        "p.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ask = |cmd: &str| {
        decide(
            &policy,
            &Request {
                identity: Some("ci"),
                target: "box",
                op: Operation::Ssh {
                    kind: SshOpKind::Exec,
                    command: cmd,
                },
                claims: None,
                inspected: true,
            },
        )
        .action
    };
    // The allow-list does work for plain commands, including quoted shell syntax (harmless).
    assert_eq!(ask("echo hi"), Action::Allow);
    assert_eq!(ask("echo 'hi; touch /tmp/m'"), Action::Allow);
    assert_eq!(ask("systemctl status nginx"), Action::Allow);
    assert_eq!(ask("systemctl status nginx; id"), Action::Deny);
    for attempt in INJECTIONS {
        let cmd = attempt.replace("MARKER", "/tmp/m");
        assert_eq!(ask(&cmd), Action::Deny, "{cmd:?} was allowed");
    }
}
