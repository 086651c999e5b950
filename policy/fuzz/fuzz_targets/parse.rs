//! Fuzz the policy parser: any UTF-8 text must give a policy or a positioned error, never a
//! panic, and a parsed policy must answer `decide` and `target_for` without panicking.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tollgate_policy::{decide, parse, Operation, Request, SshOpKind, WorkloadFacts};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text, "fuzz.toml") {
        Err(e) => {
            // Positions are 1-based and inside the text (or one past its end).
            assert!(e.line >= 1 && e.col >= 1, "{e}");
            assert!(e.line <= text.lines().count() + 1, "{e}");
            assert!(!e.message.is_empty());
            assert!(e.to_string().starts_with("fuzz.toml:"));
        }
        Ok(policy) => {
            let facts = WorkloadFacts {
                cgroup: "/system.slice/x.service",
                uid: 1000,
                user: Some("x"),
                exe: Some("/usr/bin/x"),
                comm: "x",
                foreign_userns: false,
            };
            let identity = policy.identify(&facts).map(|i| i.name.clone());
            let addr = SocketAddr::from(([127, 0, 0, 1], 5432));
            let _ = policy.target_for(addr, &|_| vec![addr.ip()]);
            let tables = vec!["public.users".to_string()];
            let ops = [
                Operation::Connect,
                Operation::Sql {
                    statement: "select",
                    tables: &tables,
                    functions: &tables,
                },
                Operation::Ssh {
                    kind: SshOpKind::Exec,
                    command: "ls",
                },
                Operation::Http {
                    method: "GET",
                    path: "/",
                    host: "h",
                },
                Operation::Kube {
                    verb: "get",
                    resource: "pods",
                    namespace: "",
                    name: "",
                    command: None,
                },
            ];
            for t in &policy.targets {
                for i in policy
                    .identities
                    .iter()
                    .map(|i| Some(i.name.as_str()))
                    .chain([identity.as_deref(), None])
                {
                    for op in ops {
                        let _ = decide(
                            &policy,
                            &Request {
                                claims: None,
                                inspected: true,
                                identity: i,
                                target: &t.name,
                                op,
                            },
                        );
                    }
                }
            }
        }
    }
});
