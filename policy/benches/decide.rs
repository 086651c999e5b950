//! `decide()` on a 1,000-rule policy.
//!
//! `distinct`: 1,000 identities and targets, one rule each (mixed actions, SQL matchers), plus
//! two wildcard rules; the questions concern identities near the end of the file.
//! `one_identity`: 1,000 SQL rules for one identity and target, where only the last one
//! matches, so every candidate rule is evaluated (the worst case for a single workload).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate_policy::{decide, parse, Action, Operation, Policy, Request};

const N: usize = 1000;

fn distinct_policy() -> Policy {
    let mut t = String::new();
    for i in 0..N {
        t += &format!(
            "[[identity]]\nname = \"bot-{i}\"\ncgroup = \"/system.slice/bot-{i}.service*\"\n\n"
        );
        t += &format!(
            "[[target]]\nname = \"db-{i}\"\nprotocol = \"postgres\"\naddress = [\"10.{}.{}.1:5432\"]\n\n",
            i / 256,
            i % 256
        );
    }
    for i in 0..N {
        let (action, extra) = match i % 3 {
            0 => ("allow", format!("sql = {{ statements = [\"select\", \"insert\"], tables = [\"orders_{i}\", \"public.items_*\"] }}")),
            1 => ("deny", format!("sql = {{ statements = [\"drop\", \"truncate\"], tables = [\"orders_{i}\"] }}")),
            _ => ("approve", "sql = { statements = [\"alter\"] }\napprovers = [\"dba\"]\ntimeout = \"5m\"".to_string()),
        };
        t += &format!(
            "[[rule]]\nname = \"rule {i}\"\nidentities = [\"bot-{i}\"]\ntargets = [\"db-{i}\"]\naction = \"{action}\"\n{extra}\n\n"
        );
    }
    t += "[[rule]]\nname = \"nobody drops\"\nidentities = [\"*\"]\ntargets = [\"*\"]\naction = \"deny\"\nsql = { statements = [\"drop\"] }\n\n";
    t += "[[rule]]\nname = \"everyone reads catalog\"\nidentities = [\"*\"]\ntargets = [\"*\"]\naction = \"allow\"\nsql = { statements = [\"select\"], tables = [\"pg_catalog.*\"] }\n";
    parse(&t, "bench.toml").expect("bench policy parses")
}

fn one_identity_policy() -> Policy {
    let mut t = String::from(
        "[[identity]]\nname = \"ci\"\nuid = 1000\n\n[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.1:5432\"]\n\n",
    );
    for i in 0..N {
        let action = ["allow", "approve"][i % 2];
        t += &format!(
            "[[rule]]\nname = \"rule {i}\"\nidentities = [\"ci\"]\ntargets = [\"db\"]\naction = \"{action}\"\nsql = {{ statements = [\"select\", \"update\"], tables = [\"table_{i}\", \"schema_{i}.*\"] }}\n\n"
        );
    }
    parse(&t, "bench.toml").expect("bench policy parses")
}

fn bench(c: &mut Criterion) {
    let p = distinct_policy();
    let tables = vec!["orders_996".to_string(), "public.items_7".to_string()];
    let none: Vec<String> = Vec::new();

    let connect = Request {
        claims: None,
        inspected: true,
        identity: Some("bot-996"),
        target: "db-996",
        op: Operation::Connect,
    };
    assert_eq!(decide(&p, &connect).action, Action::Allow);
    c.bench_function("distinct/connect", |b| {
        b.iter(|| decide(black_box(&p), black_box(&connect)))
    });

    let select = Request {
        claims: None,
        inspected: true,
        identity: Some("bot-996"),
        target: "db-996",
        op: Operation::Sql {
            statement: "select",
            tables: &tables,
            functions: &none,
        },
    };
    assert_eq!(decide(&p, &select).rule.as_deref(), Some("rule 996"));
    c.bench_function("distinct/sql_select_near_end", |b| {
        b.iter(|| decide(black_box(&p), black_box(&select)))
    });

    let p = one_identity_policy();
    let tables = vec!["schema_998.t".to_string()];
    let update = Request {
        claims: None,
        inspected: true,
        identity: Some("ci"),
        target: "db",
        op: Operation::Sql {
            statement: "update",
            tables: &tables,
            functions: &none,
        },
    };
    let d = decide(&p, &update);
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Allow, Some("rule 998"))
    );
    c.bench_function("one_identity/sql_update_near_end", |b| {
        b.iter(|| decide(black_box(&p), black_box(&update)))
    });
    let connect = Request {
        claims: None,
        inspected: true,
        identity: Some("ci"),
        target: "db",
        op: Operation::Connect,
    };
    c.bench_function("one_identity/connect", |b| {
        b.iter(|| decide(black_box(&p), black_box(&connect)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
