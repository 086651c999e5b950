//! The CLI contracts the tests elsewhere do not reach: `check-policy` exit codes and its
//! `file:line:col:` messages.

use vm_tests::*;

fn has_location(stderr: &str, file: &str) -> Option<(usize, usize)> {
    stderr.lines().find_map(|l| {
        let rest = l.strip_prefix(file)?.strip_prefix(':')?;
        let mut it = rest.splitn(3, ':');
        let line = it.next()?.parse().ok()?;
        let col = it.next()?.parse().ok()?;
        it.next()?;
        Some((line, col))
    })
}

#[test]
fn check_policy_reports_file_line_col_and_exits_1() {
    require_root();
    let dir = TempDir::new("cli");

    // A syntax error on line 3.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[agent]\nfail_mode = \"closed\"\n[[identity]\nname = \"x\"\n",
    )
    .expect("write");
    let file = broken.display().to_string();
    let (code, _out, err) = tollgate(&["check-policy", &file]);
    assert_eq!(code, 1, "broken policy must exit 1; stderr: {err}");
    let (line, col) = has_location(&err, &file)
        .unwrap_or_else(|| panic!("no `{file}:line:col:` in stderr: {err}"));
    assert_eq!(line, 3, "{err}");
    assert!(col >= 1, "{err}");

    // A typo in a key, on line 6: the message names the key.
    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[agent]\nfail_mode = \"closed\"\n\n[[identity]]\nname = \"ci-bot\"\ncgroups = \"/ci*\"\n",
    )
    .expect("write");
    let file = typo.display().to_string();
    let (code, _out, err) = tollgate(&["check-policy", &file]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(has_location(&err, &file).map(|l| l.0), Some(6), "{err}");
    assert!(err.contains("cgroups"), "{err}");

    // A good file passes.
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        [
            "[agent]\nfail_mode = \"closed\"\n\n[[identity]]\nname = \"ci-bot\"\ncgroup = \"/ci*\"\n\n",
            &tcp_target("db", &["127.0.0.1:5432".to_string()]),
            &rule("ci may use db", &["ci-bot"], &["db"], "allow"),
        ]
        .concat(),
    )
    .expect("write");
    let (code, out, err) = tollgate(&["check-policy", &good.display().to_string()]);
    assert_eq!(code, 0, "good policy: {out} {err}");
    assert!(out.contains("ok"), "{out}");
}

/// Item 10 of the security issue: what used to be silently wrong in a policy gets a
/// `file:line:col: warning:` and the exit status stays 0.
#[test]
fn check_policy_warns_about_what_is_silently_wrong() {
    require_root();
    let dir = TempDir::new("cliwarn");
    let p = dir.path().join("warn.toml");
    let missing = dir.path().join("no-such-secret");
    std::fs::write(
        &p,
        format!(
            r#"[agent]
fail_mode = "closed"

[[identity]]
name = "ci-bot"
cgroup = "system.slice/ci.service"

[[target]]
name = "a"
protocol = "tcp"
address = ["127.0.0.1:5432"]

[[target]]
name = "b"
protocol = "postgres"
address = ["127.0.0.0/8:5432"]
credential = "rw"

[credential.rw]
user = "app"
password_file = "{missing}"

[[rule]]
name = "r"
identities = ["ci-bot"]
targets = ["a", "b"]
action = "allow"

[[mask]]
targets = ["b"]
columns = ["db.public.customers.email"]
"#,
            missing = missing.display()
        ),
    )
    .expect("write");
    let file = p.display().to_string();
    let (code, out, err) = tollgate(&["check-policy", &file]);
    assert_eq!(code, 0, "warnings keep exit 0: {out} {err}");
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with(&format!("{file}:")) && l.contains(": warning: "))
        .collect();
    for (what, line) in [
        ("does not start with `/`", 6),
        ("cannot be read", 21),
        ("dots", 31),
    ] {
        let w = warnings
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no warning about {what}: {err}"));
        assert_eq!(has_location(w, &file).map(|l| l.0), Some(line), "{w}");
    }
    assert!(
        warnings.iter().any(|l| l.contains("overlap")),
        "no warning about overlapping targets: {err}"
    );
}
