//! The policy half of deciding one classified SQL statement, without a session: which kind of
//! the statement decides, and the gates that a blanket allow does not pass (dangerous flags,
//! functions that must be named). The pg handler calls these per statement with its session's
//! identity and claims; `tollgate policy explain` and `policy test` call them with a case's, so
//! both answer exactly as the agent does.

use std::collections::BTreeMap;

use tollgate_policy::{decide, Action, Decision, DecisionReason, Operation, Policy, Request};

use crate::pg::classify::{self, Statement};

/// Who asks, about which target.
#[derive(Clone, Copy)]
pub struct Asker<'a> {
    /// The parsed policy of the current generation.
    pub policy: &'a Policy,
    /// Attributed identity; `None` = unknown.
    pub identity: Option<&'a str>,
    /// Target name.
    pub target: &'a str,
    /// Verified workload claims, if any.
    pub claims: Option<&'a BTreeMap<String, Vec<String>>>,
}

/// Dangerous flags no rule can allow, with why. The policy language has no word that names
/// them, and the statement kind alone (`set`) would let a rule written for
/// `SET statement_timeout` allow them too. (COPY to or from server files and programs are policy
/// decisions: `copy_server_files` / `copy_program` in a rule's `sql`, see [`dangerous_gate`].)
pub const NEVER_ALLOWED: &[(&str, &str)] = &[(
    "set:client_encoding",
    "changing client_encoding away from UTF8 is not allowed through tollgate (the statement classifier reads UTF-8)",
)];

/// The first flag of `s` that no rule can allow, with the reason.
pub fn never_allowed(s: &Statement) -> Option<&'static (&'static str, &'static str)> {
    s.dangerous
        .iter()
        .find_map(|f| NEVER_ALLOWED.iter().find(|(n, _)| n == f))
}

/// Decide one statement: each kind it performs, strictest answer wins; the deciding kind with
/// it.
pub fn decide_statement(a: &Asker<'_>, s: &Statement) -> (Decision, &'static str) {
    let mut worst: Option<(Decision, &'static str)> = None;
    let single = [s.kind];
    let kinds: &[&'static str] = if s.kinds.is_empty() {
        &single
    } else {
        &s.kinds
    };
    for &kind in kinds {
        let d = decide(
            a.policy,
            &Request {
                claims: a.claims,
                identity: a.identity,
                target: a.target,
                inspected: true,
                op: Operation::Sql {
                    statement: kind,
                    tables: &s.tables,
                    functions: &s.functions,
                },
            },
        );
        if worst
            .as_ref()
            .is_none_or(|(w, _)| d.action.strictness() > w.action.strictness())
        {
            worst = Some((d, kind));
        }
    }
    worst.unwrap_or((Decision::deny(DecisionReason::NoMatchingRule), s.kind))
}

/// A statement flagged dangerous (server file access, COPY PROGRAM, dynamic SQL in DO, ...)
/// is allowed only by a rule that names what it allows: explicit `functions` for dangerous
/// functions, explicit `statements` for the rest. A blanket allow does not cover it.
pub fn dangerous_gate(policy: &Policy, s: &Statement, d: Decision) -> Decision {
    if s.dangerous.is_empty() || d.action != Action::Allow {
        return d;
    }
    let explicit = d
        .rule
        .as_deref()
        .and_then(|r| policy.rule(r))
        .and_then(|r| r.sql.as_ref())
        .is_some_and(|m| {
            s.dangerous.iter().all(|flag| {
                // Its SQL text is never classified: only the exact name allows it.
                let sql_text = flag
                    .strip_prefix("function:")
                    .is_some_and(classify::runs_sql_text);
                m.allows_flag(flag, sql_text)
            })
        });
    if explicit {
        d
    } else {
        Decision {
            action: Action::Deny,
            rule: d.rule,
            reason: DecisionReason::NoMatchingRule,
        }
    }
}

/// Functions that are not plain (functions.rs) run only under an allow rule whose `functions`
/// names them: `decide` already checked that every function matches such a rule's globs, so
/// what is left is a rule that names no functions at all (`select` alone).
pub fn function_gate(policy: &Policy, named: &[&str], d: Decision) -> Decision {
    if named.is_empty() || d.action != Action::Allow {
        return d;
    }
    let names_them = d
        .rule
        .as_deref()
        .and_then(|r| policy.rule(r))
        .and_then(|r| r.sql.as_ref())
        .is_some_and(|m| !m.functions.is_empty());
    if names_them {
        d
    } else {
        Decision {
            action: Action::Deny,
            rule: d.rule,
            reason: DecisionReason::NoMatchingRule,
        }
    }
}
