//! `tollgate policy explain` and `tollgate policy test`: what the agent would decide for one
//! operation, with the rules it considered, and the `[[test]]` cases of a policy file checked
//! against it.
//!
//! Both go through the agent's own code: identities are attributed with
//! [`Policy::identify`], the connection and SSH, HTTP and Kubernetes requests are decided with
//! [`tollgate_policy::decide`], and SQL is classified by the agent's classifier
//! ([`classify::classify`]) and decided statement by statement with the pg handler's
//! [`verdict`] functions (strictest kind, dangerous-flag and never-allowed gates, PREPARE/EXECUTE
//! within the text). What needs a live server is noted rather than guessed: whether a called
//! function is a built-in the catalog calls plain (a rule must name the others), and masking.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tollgate_policy::{
    decide, Action, CaseOp, CaseWho, Decision, DecisionReason, Operation, Policy, PolicyCase,
    Request,
};

use crate::pg::classify::{self, Statement};
use crate::pg::verdict::{self, Asker};

/// What the agent would do, and why.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The decision that stands (the strictest over the operation's parts).
    pub decision: Decision,
    /// Human-readable reasoning, one line each, indented by depth.
    pub trace: Vec<String>,
    /// What could not be checked without a live server.
    pub notes: Vec<String>,
}

fn describe(d: &Decision) -> String {
    match (&d.rule, d.reason) {
        (Some(r), _) => format!("{} by rule \"{r}\"", d.action.as_str()),
        (None, DecisionReason::NoMatchingRule) => {
            format!("{} (no rule matches: default deny)", d.action.as_str())
        }
        (None, DecisionReason::UnknownIdentity) => {
            format!("{} (unknown identity)", d.action.as_str())
        }
        (None, DecisionReason::UnknownTarget) => format!("{} (unknown target)", d.action.as_str()),
        (None, DecisionReason::Matched) => d.action.as_str().to_string(),
    }
}

fn names(list: &[String], name: &str) -> bool {
    list.iter().any(|n| n == "*" || n == name)
}

/// The rules naming this identity and target, each with whether it covers `op`.
fn considered(
    policy: &Policy,
    identity: Option<&str>,
    target: &str,
    op: &Operation<'_>,
    indent: &str,
    trace: &mut Vec<String>,
) {
    let Some(identity) = identity else { return };
    let mut any = false;
    for r in &policy.rules {
        if !names(&r.identities, identity) || !names(&r.targets, target) {
            continue;
        }
        any = true;
        let hit = r.covers(op);
        let whole =
            r.sql.is_none() && r.ssh.is_none() && r.http.is_none() && r.kubernetes.is_none();
        let verdict = match (op, hit) {
            (Operation::Connect, false) if r.action != Action::Deny => {
                "lets the connection in; it decides operations one by one"
            }
            (Operation::Connect, false) => "decides operations only",
            (_, true) if whole => "matches (whole connection)",
            (_, true) => "matches",
            (_, false) => "does not match",
        };
        let claims = if r.claims.is_empty() {
            ""
        } else {
            " (needs workload claims)"
        };
        trace.push(format!(
            "{indent}{} \"{}\": {verdict}{claims}",
            r.action.as_str(),
            r.name,
        ));
    }
    if !any {
        trace.push(format!(
            "{indent}no rule names identity \"{identity}\" and target \"{target}\""
        ));
    }
}

/// The identity name `who` is attributed to.
pub fn identity_of<'p>(policy: &'p Policy, who: &'p CaseWho) -> Option<&'p str> {
    match who {
        CaseWho::Identity(n) => policy
            .identities
            .iter()
            .find(|i| &i.name == n)
            .map(|i| i.name.as_str()),
        CaseWho::Facts(f) => policy.identify(&f.workload()).map(|i| i.name.as_str()),
    }
}

/// Decide `op` for `who` on `target` as the agent would.
pub fn evaluate(policy: &Policy, who: &CaseWho, target: &str, op: &CaseOp) -> Outcome {
    let mut trace = Vec::new();
    let mut notes = Vec::new();
    let identity = identity_of(policy, who);
    match (who, identity) {
        (CaseWho::Facts(f), Some(i)) => trace.push(format!(
            "identity: {i} (attributed from facts {})",
            facts_text(f)
        )),
        (CaseWho::Facts(f), None) => trace.push(format!(
            "identity: unknown (no [[identity]] matches {})",
            facts_text(f)
        )),
        (CaseWho::Identity(_), Some(i)) => trace.push(format!("identity: {i}")),
        (CaseWho::Identity(n), None) => trace.push(format!("identity: \"{n}\" is not defined")),
    }
    match policy.target(target) {
        Some(t) => trace.push(format!("target: {target} ({})", t.protocol)),
        None => trace.push(format!("target: \"{target}\" is not defined")),
    }
    if policy.agent.mode == tollgate_policy::Mode::Observe {
        notes.push(
            "this policy runs in observe mode: the agent audits this decision but blocks nothing"
                .into(),
        );
    }
    // Whether the agent serves this target's protocol with an inspecting handler (the
    // registry is the one place that knows; the connection decision depends on it).
    let inspected = policy.target(target).is_some_and(|t| {
        t.inspect
            && crate::handlers::registry(crate::relay::RelayKind::Copy)
                .inspecting(t.protocol)
                .is_some()
    });
    let ask = |op: Operation<'_>| {
        decide(
            policy,
            &Request {
                identity,
                target,
                op,
                claims: None,
                inspected,
            },
        )
    };
    let connect = ask(Operation::Connect);
    trace.push(format!("connect: {}", describe(&connect)));
    considered(
        policy,
        identity,
        target,
        &Operation::Connect,
        "  ",
        &mut trace,
    );
    // The agent decides on the normalised path (`..`, `//` and percent-encoding resolved) and
    // refuses a path it cannot normalise: so does the test.
    let (normal, refused) = match op {
        CaseOp::Http { path, .. } => match tollgate_policy::http::normalize_path(path) {
            Ok(n) => (Some(n.decoded), None),
            Err(e) => (None, Some(e.to_string())),
        },
        _ => (None, None),
    };
    let decision = match op {
        CaseOp::Connect => connect,
        _ if connect.action == Action::Deny => {
            trace.push("the connection is refused, so no operation reaches the target".into());
            connect
        }
        CaseOp::Sql(sql) => sql_outcome(
            &Asker {
                policy,
                identity,
                target,
                claims: None,
            },
            sql,
            &mut trace,
            &mut notes,
        ),
        CaseOp::Http { .. } if refused.is_some() => {
            let e = refused.as_deref().unwrap_or_default();
            trace.push(format!("{}: refused by the agent: {e}", op_text(op)));
            Decision {
                action: Action::Deny,
                rule: None,
                reason: DecisionReason::NoMatchingRule,
            }
        }
        other => {
            let o = match other {
                CaseOp::Ssh(kind, command) => Operation::Ssh {
                    kind: *kind,
                    command,
                },
                CaseOp::Http { method, path, host } => Operation::Http {
                    method,
                    path: normal.as_deref().unwrap_or(path),
                    host,
                },
                CaseOp::Kube {
                    verb,
                    resource,
                    namespace,
                    name,
                    command,
                } => Operation::Kube {
                    verb,
                    resource,
                    namespace,
                    name,
                    command: command.as_deref(),
                },
                CaseOp::Connect | CaseOp::Sql(_) => Operation::Connect,
            };
            let d = ask(o);
            trace.push(format!("{}: {}", op_text(other), describe(&d)));
            considered(policy, identity, target, &o, "  ", &mut trace);
            d
        }
    };
    trace.push(format!("decision: {}", describe(&decision)));
    Outcome {
        decision,
        trace,
        notes,
    }
}

fn facts_text(f: &tollgate_policy::CaseFacts) -> String {
    let w = f.workload();
    let mut s = format!("cgroup={} uid={}", w.cgroup, w.uid);
    for (k, v) in [("user", w.user), ("exe", w.exe)] {
        if let Some(v) = v {
            let _ = write!(s, " {k}={v}");
        }
    }
    if !w.comm.is_empty() {
        let _ = write!(s, " comm={}", w.comm);
    }
    s
}

fn op_text(op: &CaseOp) -> String {
    match op {
        CaseOp::Connect => "connect".into(),
        CaseOp::Sql(s) => format!("sql {s:?}"),
        CaseOp::Ssh(kind, c) => format!("ssh {kind:?} {c:?}").to_lowercase(),
        CaseOp::Http { method, path, host } => format!("http {method} {path} (host {host:?})"),
        CaseOp::Kube {
            verb,
            resource,
            namespace,
            name,
            command,
        } => format!(
            "kubernetes {verb} {resource} namespace={namespace:?} name={name:?}{}",
            command
                .as_ref()
                .map(|c| format!(" command={c:?}"))
                .unwrap_or_default()
        ),
    }
}

/// One SQL string, as the pg handler decides it: classify, then each statement (a SQL-level
/// EXECUTE decides what an earlier PREPARE in the same text prepared); the first denial
/// stands, else an approval, else allow.
fn sql_outcome(
    a: &Asker<'_>,
    sql: &str,
    trace: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Decision {
    let statements = match classify::classify(sql) {
        Ok(s) => s,
        Err(e) => {
            trace.push(format!("sql: not classified ({e}): denied"));
            return Decision::deny(DecisionReason::NoMatchingRule);
        }
    };
    if statements.is_empty() {
        trace.push("sql: no statement (empty or comments only): nothing to decide".into());
        return Decision {
            action: Action::Allow,
            rule: None,
            reason: DecisionReason::Matched,
        };
    }
    let mut prepared: HashMap<String, Statement> = HashMap::new();
    let mut held: Option<Decision> = None;
    let mut allowed: Option<Decision> = None;
    for (i, st) in statements.iter().enumerate() {
        let effective: Vec<&Statement> = match st
            .prepared_name
            .as_deref()
            .filter(|_| st.kind == "execute")
        {
            Some(name) => match prepared.get(name) {
                Some(p) => vec![p],
                None => {
                    notes.push(format!(
                        "EXECUTE {name}: the agent decides what the session's PREPARE {name} prepared; offline it is decided as EXECUTE"
                    ));
                    vec![st]
                }
            },
            None => vec![st],
        };
        for s in effective {
            trace.push(format!("statement {}: {}", i + 1, s.text.trim()));
            let mut facts = format!("  kind {}", s.kind);
            if s.kinds.len() > 1 {
                let _ = write!(facts, " (performs {})", s.kinds.join(", "));
            }
            if !s.tables.is_empty() {
                let _ = write!(facts, "; tables {}", s.tables.join(", "));
            }
            if !s.functions.is_empty() {
                let _ = write!(facts, "; functions {}", s.functions.join(", "));
            }
            if !s.dangerous.is_empty() {
                let _ = write!(facts, "; flagged {}", s.dangerous.join(", "));
            }
            trace.push(facts);
            if let Some((flag, why)) = verdict::never_allowed(s) {
                trace.push(format!("  {flag}: {why}: denied"));
                return Decision::deny(DecisionReason::NoMatchingRule);
            }
            let kinds: Vec<&str> = if s.kinds.is_empty() {
                vec![s.kind]
            } else {
                s.kinds.clone()
            };
            for kind in kinds {
                let op = Operation::Sql {
                    statement: kind,
                    tables: &s.tables,
                    functions: &s.functions,
                };
                trace.push(format!("  as {kind}:"));
                considered(a.policy, a.identity, a.target, &op, "    ", trace);
            }
            let (d, kind) = verdict::decide_statement(a, s);
            let gated = verdict::dangerous_gate(a.policy, s, d.clone());
            if gated.action != d.action {
                trace.push(format!(
                    "  flagged {}: rule \"{}\" does not name it explicitly: denied",
                    s.dangerous.join(", "),
                    d.rule.as_deref().unwrap_or("?")
                ));
            }
            if gated.action == Action::Allow && !s.functions.is_empty() {
                let names_them = gated
                    .rule
                    .as_deref()
                    .and_then(|r| a.policy.rule(r))
                    .and_then(|r| r.sql.as_ref())
                    .is_some_and(|m| !m.functions.is_empty());
                if !names_them {
                    notes.push(format!(
                        "statement {} calls {}: the agent allows that under rule \"{}\" only if PostgreSQL's catalog says each is a built-in immutable or stable function (not checked offline); otherwise the rule must name them in `functions`",
                        i + 1,
                        s.functions.join(", "),
                        gated.rule.as_deref().unwrap_or("?")
                    ));
                }
            }
            trace.push(format!("  decided as {kind}: {}", describe(&gated)));
            match gated.action {
                Action::Deny => return gated,
                Action::Approve => {
                    held.get_or_insert(gated);
                }
                Action::Allow => {
                    allowed.get_or_insert(gated);
                }
            }
        }
        if st.kinds.contains(&"prepare") {
            if let Some(name) = st.prepared_name.as_deref() {
                prepared.insert(name.to_string(), st.clone());
            }
        }
    }
    // A later denial returned above; an approval holds the whole text; else the first
    // statement's rule names the allow.
    held.or(allowed)
        .unwrap_or_else(|| Decision::deny(DecisionReason::NoMatchingRule))
}

/// The result of one `[[test]]` case.
#[derive(Debug)]
pub struct CaseResult {
    /// The case.
    pub case: PolicyCase,
    /// What the agent would decide.
    pub outcome: Outcome,
    /// `None`: passed; else what differs.
    pub failure: Option<String>,
}

/// Check one case.
pub fn run_case(policy: &Policy, case: &PolicyCase) -> CaseResult {
    let outcome = evaluate(policy, &case.who, &case.target, &case.op);
    let d = &outcome.decision;
    let mut failure = None;
    if d.action != case.expect {
        failure = Some(format!(
            "expected {}, got {}",
            case.expect.as_str(),
            describe(d)
        ));
    } else if let Some(want) = &case.rule {
        let got = d.rule.as_deref().unwrap_or("");
        if got != want {
            failure = Some(format!(
                "expected {} by {}, got {}",
                case.expect.as_str(),
                if want.is_empty() {
                    "no rule (default deny)".to_string()
                } else {
                    format!("rule \"{want}\"")
                },
                describe(d)
            ));
        }
    }
    CaseResult {
        case: case.clone(),
        outcome,
        failure,
    }
}

/// The policy files `paths` stand for: files as given, directories' `*.toml` (sorted).
pub fn policy_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml") && f.is_file())
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Totals of a `policy test` run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Files that did not parse.
    pub broken_files: usize,
}

/// `tollgate policy test`: check every case of every file, writing a report to `out`.
pub fn test_files(files: &[PathBuf], verbose: bool, out: &mut String) -> Totals {
    let mut t = Totals::default();
    for f in files {
        test_file(f, verbose, out, &mut t);
    }
    let _ = writeln!(
        out,
        "{} passed, {} failed{}",
        t.passed,
        t.failed,
        if t.broken_files > 0 {
            format!(", {} policy file(s) broken", t.broken_files)
        } else {
            String::new()
        }
    );
    t
}

fn test_file(f: &Path, verbose: bool, out: &mut String, t: &mut Totals) {
    let name = f.display().to_string();
    let text = match std::fs::read_to_string(f) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(out, "{name}: cannot read: {e}");
            t.broken_files += 1;
            return;
        }
    };
    let policy = match tollgate_policy::parse_all(&text, &name) {
        Ok(p) => p,
        Err(errors) => {
            for e in errors {
                let _ = writeln!(out, "{e}");
            }
            t.broken_files += 1;
            return;
        }
    };
    if policy.cases.is_empty() {
        let _ = writeln!(
            out,
            "{name}: no [[test]] cases (add some: see the README's policy reference)"
        );
    }
    for case in &policy.cases {
        let r = run_case(&policy, case);
        match &r.failure {
            None => {
                t.passed += 1;
                let _ = writeln!(out, "ok    {name}:{}: {}", case.line, case.name);
                if verbose {
                    for l in &r.outcome.trace {
                        let _ = writeln!(out, "      {l}");
                    }
                }
            }
            Some(why) => {
                t.failed += 1;
                let _ = writeln!(
                    out,
                    "FAIL  {name}:{}: test \"{}\": {why}",
                    case.line, case.name
                );
                for l in &r.outcome.trace {
                    let _ = writeln!(out, "      {l}");
                }
            }
        }
        for n in &r.outcome.notes {
            let _ = writeln!(out, "      note: {n}");
        }
    }
}

#[cfg(test)]
mod tests;
