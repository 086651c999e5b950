//! `[[test]]` tables to [`PolicyCase`]s: references to identities, targets and rules checked
//! like a rule's, and exactly one way to say who and at most one operation.

use std::collections::HashMap;

use crate::case::{CaseFacts, CaseOp, CaseWho, PolicyCase};
use crate::model::{Action, Protocol};
use crate::raw::RawTest;
use crate::SshOpKind;

use super::{one_of, suggest, Cx};

/// Names a case may refer to.
pub(super) struct CaseNames<'a> {
    pub identities: &'a [&'a str],
    pub targets: &'a HashMap<&'a str, Option<Protocol>>,
    pub rules: &'a [&'a str],
}

pub(super) fn case(cx: &mut Cx<'_>, t: &RawTest, names: &CaseNames<'_>) -> Option<PolicyCase> {
    let name = t.name.get_ref().clone();
    let owner = format!("test \"{name}\"");
    let before = cx.errors.len();
    let known = |cx: &mut Cx<'_>, v: &crate::raw::S, kind: &str, defined: &[&str]| {
        let s = v.get_ref().as_str();
        if !defined.contains(&s) {
            let mut msg = format!("{owner} names unknown {kind} \"{s}\"");
            match suggest(s, defined.iter().copied()) {
                Some(g) => msg.push_str(&format!(": did you mean \"{g}\"?")),
                None => msg.push_str(&format!(": define it in a [[{kind}]] table")),
            }
            cx.err(v.span(), msg);
        }
    };
    let who = match (&t.identity, &t.facts) {
        (Some(i), None) => {
            known(cx, i, "identity", names.identities);
            Some(CaseWho::Identity(i.get_ref().clone()))
        }
        (None, Some(f)) => {
            let r = f.get_ref();
            let uid = r.uid.as_ref().and_then(|u| {
                u32::try_from(*u.get_ref())
                    .map_err(|_| {
                        cx.err(
                            u.span(),
                            format!("`uid` of {owner} must be between 0 and 4294967295"),
                        )
                    })
                    .ok()
            });
            Some(CaseWho::Facts(CaseFacts {
                cgroup: r.cgroup.as_ref().map(|v| v.get_ref().clone()),
                uid,
                user: r.user.as_ref().map(|v| v.get_ref().clone()),
                exe: r.exe.as_ref().map(|v| v.get_ref().clone()),
                comm: r.comm.as_ref().map(|v| v.get_ref().clone()),
            }))
        }
        (Some(i), Some(_)) => {
            cx.err(
                i.span(),
                format!("{owner} has both `identity` and `facts`: keep one (facts are attributed to an identity as the agent does)"),
            );
            None
        }
        (None, None) => {
            cx.err(
                t.name.span(),
                format!("{owner} says nothing about who: add `identity = \"NAME\"` or `facts = {{ cgroup = \"...\", uid = N }}`"),
            );
            None
        }
    };
    let target_names: Vec<&str> = names.targets.keys().copied().collect();
    known(cx, &t.target, "target", &target_names);
    let protocol = names
        .targets
        .get(t.target.get_ref().as_str())
        .copied()
        .flatten();
    let expect = one_of(
        cx,
        &t.expect,
        "expect",
        &format!(" of {owner}"),
        &[
            ("allow", Action::Allow),
            ("deny", Action::Deny),
            ("approve", Action::Approve),
        ],
    );
    let rule = t.rule.as_ref().map(|r| {
        if !r.get_ref().is_empty() {
            known(cx, r, "rule", names.rules);
        }
        r.get_ref().clone()
    });

    let mut ops = Vec::new();
    if let Some(s) = &t.sql {
        ops.push(("sql", s.span(), CaseOp::Sql(s.get_ref().clone())));
    }
    if let Some(s) = &t.ssh {
        let r = s.get_ref();
        let mut kinds = Vec::new();
        if let Some(e) = &r.exec {
            kinds.push(CaseOp::Ssh(SshOpKind::Exec, e.get_ref().clone()));
        }
        if r.shell.as_ref().is_some_and(|b| *b.get_ref()) {
            kinds.push(CaseOp::Ssh(SshOpKind::Shell, String::new()));
        }
        if let Some(e) = &r.subsystem {
            kinds.push(CaseOp::Ssh(SshOpKind::Subsystem, e.get_ref().clone()));
        }
        if let Some(e) = &r.forward {
            kinds.push(CaseOp::Ssh(SshOpKind::Forward, e.get_ref().clone()));
        }
        if kinds.len() != 1 {
            cx.err(
                s.span(),
                format!("`ssh` of {owner} must give exactly one of exec = \"CMD\", shell = true, subsystem = \"NAME\", forward = \"HOST:PORT\""),
            );
        }
        if let Some(op) = kinds.into_iter().next() {
            ops.push(("ssh", s.span(), op));
        }
    }
    if let Some(h) = &t.http {
        let r = h.get_ref();
        ops.push((
            "http",
            h.span(),
            CaseOp::Http {
                method: r.method.get_ref().clone(),
                path: r.path.get_ref().clone(),
                host: r
                    .host
                    .as_ref()
                    .map(|v| v.get_ref().clone())
                    .unwrap_or_default(),
            },
        ));
    }
    if let Some(k) = &t.kubernetes {
        let r = k.get_ref();
        let opt =
            |v: &Option<crate::raw::S>| v.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default();
        ops.push((
            "kubernetes",
            k.span(),
            CaseOp::Kube {
                verb: r.verb.get_ref().clone(),
                resource: r.resource.get_ref().clone(),
                namespace: opt(&r.namespace),
                name: opt(&r.name),
                command: r
                    .command
                    .as_ref()
                    .map(|c| c.iter().map(|w| w.get_ref().clone()).collect()),
            },
        ));
    }
    if ops.len() > 1 {
        cx.err(
            ops[1].1.clone(),
            format!("{owner} gives more than one operation: keep one of sql, ssh, http, kubernetes per test (none tests the connection)"),
        );
    }
    if let (Some((key, span, _)), Some(p)) = (ops.first(), protocol) {
        let fits = match p {
            Protocol::Postgres => Some("sql"),
            Protocol::Ssh => Some("ssh"),
            Protocol::Http | Protocol::Https => Some("http"),
            Protocol::Kubernetes => Some("kubernetes"),
            Protocol::Tcp => None,
        };
        if fits != Some(*key) {
            cx.err(
                span.clone(),
                format!(
                    "`{key}` of {owner} does not fit target \"{}\" (protocol {p}){}",
                    t.target.get_ref(),
                    fits.map(|f| format!(": use `{f} = ...`"))
                        .unwrap_or_else(
                            || ": tcp targets take no operation, test the connection".into()
                        )
                ),
            );
        }
    }
    let op = ops
        .into_iter()
        .next()
        .map(|(_, _, op)| op)
        .unwrap_or(CaseOp::Connect);
    if cx.errors.len() != before {
        return None;
    }
    Some(PolicyCase {
        name,
        line: cx.line_of(t.name.span().start),
        who: who?,
        target: t.target.get_ref().clone(),
        op,
        expect: expect?,
        rule,
    })
}
