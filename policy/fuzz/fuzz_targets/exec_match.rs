//! Fuzz the `ssh.exec` command reader and matcher: any bytes must give words or a refusal,
//! never a panic; accepted commands hold only printable ASCII, survive a round trip through
//! single quoting, and are the only ones that can match an exec pattern.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tollgate_policy::{decide, parse, split_command, Action, Operation, Policy, Request, SshOpKind};

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        parse(
            "[[identity]]\nname = \"x\"\nuid = 1000\n\
             [[target]]\nname = \"box\"\nprotocol = \"ssh\"\naddress = [\"127.0.0.1:22\"]\n\
             [[rule]]\nname = \"r\"\nidentities = [\"*\"]\ntargets = [\"box\"]\naction = \"allow\"\n\
             ssh = { exec = [\"* *\", \"*\", \"echo *\", \"cat /var/log/*.log\"] }\n",
            "fuzz.toml",
        )
        .expect("fuzz policy parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = std::str::from_utf8(data) else {
        return;
    };
    let split = split_command(cmd);
    let action = decide(
        policy(),
        &Request {
            identity: Some("x"),
            target: "box",
            op: Operation::Ssh {
                kind: SshOpKind::Exec,
                command: cmd,
            },
            claims: None,
            inspected: true,
        },
    )
    .action;
    match split {
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert_eq!(action, Action::Deny, "refused {cmd:?} ({e}) was allowed");
        }
        Ok(words) => {
            assert!(!words.is_empty());
            assert!(cmd.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t'));
            for w in &words {
                assert!(w.bytes().all(|b| (0x20..0x7f).contains(&b)), "{w:?}");
            }
            // Quoting every word again (single quotes; a `'` as `"'"`) and reading it back
            // gives the same words (unless the first word is then reserved, which is refused).
            let quoted: Vec<String> = words
                .iter()
                .map(|w| format!("'{}'", w.replace('\'', "'\"'\"'")))
                .collect();
            if let Ok(again) = split_command(&quoted.join(" ")) {
                assert_eq!(again, words);
            }
            // Patterns `*` / `* *` cover every accepted command of one word or more.
            assert_eq!(action, Action::Allow, "{cmd:?} -> {words:?}");
        }
    }
});
