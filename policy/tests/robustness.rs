//! A cheap stand-in for the fuzz target that runs in `cargo test`: mangle `examples/full.toml`
//! (truncate it, drop each line, duplicate each line) and check every result is a policy or an
//! error positioned inside the text, never a panic.

use tollgate_policy::{parse, parse_all};

const FULL: &str = include_str!("../examples/full.toml");

fn check(text: &str) {
    match parse_all(text, "m.toml") {
        Ok(_) => {}
        Err(errors) => {
            assert!(!errors.is_empty());
            let lines = text.lines().count().max(1);
            for e in &errors {
                assert!(
                    e.line >= 1 && e.line <= lines + 1,
                    "{e} (text has {lines} lines)"
                );
                assert!(e.col >= 1, "{e}");
                let line_len = text
                    .lines()
                    .nth(e.line - 1)
                    .map_or(0, |l| l.chars().count());
                assert!(
                    e.col <= line_len + 1,
                    "{e}: column past the end of the line"
                );
                assert!(!e.message.is_empty() && !e.message.contains('\n'), "{e}");
            }
            let first = parse(text, "m.toml").expect_err("parse agrees with parse_all");
            assert_eq!(first, errors[0]);
        }
    }
}

#[test]
fn truncations() {
    let mut cut = 0;
    while cut < FULL.len() {
        if FULL.is_char_boundary(cut) {
            check(&FULL[..cut]);
        }
        cut += 5;
    }
}

#[test]
fn dropped_and_duplicated_lines() {
    let lines: Vec<&str> = FULL.lines().collect();
    for i in 0..lines.len() {
        let mut dropped = lines.clone();
        dropped.remove(i);
        check(&dropped.join("\n"));
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        check(&doubled.join("\n"));
    }
}

#[test]
fn odd_inputs() {
    for text in [
        "",
        "\n\n\n",
        "\u{feff}[agent]",
        "[[rule]]",
        "[credential]\nx = 1",
        "[credential.\"\"]\nuser = \"u\"",
        "[[target]]\nname = \"\"\nprotocol = \"tcp\"\naddress = [\"é:1\"]",
        "[[identity]]\nname = \"x\"\ncgroup = \"*\"\n[[rule]]\nname = \"\"\nidentities = [\"x\"]\ntargets = [\"*\"]\naction = \"deny\"",
        "agent = 5",
        "[agent]\nlisten = [\"[::1]:1\", 5]",
    ] {
        check(text);
    }
}
