//! `decide()`: who may do what, as a pure function of the policy and one request.
//!
//! Precedence is deny > approve > allow, file order among equals, and no match is a deny. A
//! rule without an operation matcher decides the whole connection and every operation on it.
//! `Connect` also lets a connection in when some operation-scoped allow or approve rule could
//! apply to it, so that each operation can then be checked on its own.

use std::fmt;

use crate::index::{KIND_HTTP, KIND_KUBE, KIND_SQL, KIND_SSH};
use crate::model::{statement_bit, Action, HttpMatch, KubeMatch, Policy, Rule, SqlMatch, SshMatch};
use crate::shell;

/// One question for [`decide`].
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Identity name from [`Policy::identify`]; `None` = unknown workload.
    pub identity: Option<&'a str>,
    /// Target name (from [`Policy::target_for`]).
    pub target: &'a str,
    /// What is being attempted.
    pub op: Operation<'a>,
    /// The session's verified workload OIDC claims (claim name to values), if any; rules with
    /// a `claims` condition match only when they fit.
    pub claims: Option<&'a std::collections::BTreeMap<String, Vec<String>>>,
    /// Whether the connection's handler checks every operation itself (the agent knows which
    /// protocols have such a handler). Only then may `Connect` let a connection in because an
    /// operation-scoped rule, or one whose `claims` are presented later, could apply.
    pub inspected: bool,
}

/// What a workload attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation<'a> {
    /// Opening the connection.
    Connect,
    /// One SQL statement.
    Sql {
        /// Statement kind: lowercase first keyword, e.g. `"select"`, `"drop"`.
        statement: &'a str,
        /// Tables it touches, as written (`users` or `public.users`).
        tables: &'a [String],
        /// Functions it calls.
        functions: &'a [String],
    },
    /// One SSH channel request.
    Ssh {
        /// Which kind of request.
        kind: SshOpKind,
        /// Exec command line, subsystem name, or forward destination (`""` for a shell).
        command: &'a str,
    },
    /// One HTTP request.
    Http {
        /// Request method.
        method: &'a str,
        /// Request path.
        path: &'a str,
        /// Request host (Host header or authority).
        host: &'a str,
    },
    /// One Kubernetes API request.
    Kube {
        /// API verb (`get`, `create`, ...).
        verb: &'a str,
        /// `resource` or `resource/subresource` (`pods/exec`).
        resource: &'a str,
        /// Namespace, `""` for cluster-scoped.
        namespace: &'a str,
        /// Object name, `""` for collections.
        name: &'a str,
        /// The command of a `pods/exec` (its `command` query arguments); `None` for any
        /// other request.
        command: Option<&'a [String]>,
    },
}

impl Operation<'_> {
    /// Bounded label for metrics and audit: `connect`, `sql`, `ssh`, `http` or `kubernetes`.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Operation::Connect => "connect",
            Operation::Sql { .. } => "sql",
            Operation::Ssh { .. } => "ssh",
            Operation::Http { .. } => "http",
            Operation::Kube { .. } => "kubernetes",
        }
    }
}

/// Kind of SSH channel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SshOpKind {
    /// `exec` request (`ssh host cmd`).
    Exec,
    /// Interactive `shell` request.
    Shell,
    /// `subsystem` request (`sftp`).
    Subsystem,
    /// Port forwarding (`direct-tcpip`, `tcpip-forward`).
    Forward,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// Name of the deciding rule; `None` for default deny, unknown identity or unknown target.
    pub rule: Option<std::sync::Arc<str>>,
    /// Why.
    pub reason: DecisionReason,
}

/// Why a [`Decision`] was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionReason {
    /// A rule matched (`Decision::rule` names it).
    Matched,
    /// No rule matched: default deny.
    NoMatchingRule,
    /// The workload matched no `[[identity]]` (or the name is not in the policy).
    UnknownIdentity,
    /// The target name is not in the policy.
    UnknownTarget,
}

impl DecisionReason {
    /// Bounded label for metrics and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::Matched => "matched",
            DecisionReason::NoMatchingRule => "no_matching_rule",
            DecisionReason::UnknownIdentity => "unknown_identity",
            DecisionReason::UnknownTarget => "unknown_target",
        }
    }
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Decision {
    /// The stricter of `self` and `other` ([`Action::strictness`]); `self` on a tie.
    pub fn stricter(self, other: Decision) -> Decision {
        if other.action.strictness() > self.action.strictness() {
            other
        } else {
            self
        }
    }

    /// A denial that no rule made (`rule: None`), for `reason`.
    pub fn deny(reason: DecisionReason) -> Decision {
        Decision {
            action: Action::Deny,
            rule: None,
            reason,
        }
    }

    fn matched(action: Action, rule: &Rule) -> Decision {
        Decision {
            action,
            rule: Some(rule.name.clone()),
            reason: DecisionReason::Matched,
        }
    }
}

/// Decide `req` under `policy`. Deterministic; allocates nothing (the rule name is shared).
pub fn decide(policy: &Policy, req: &Request<'_>) -> Decision {
    let Some(ii) = req.identity.and_then(|name| policy.index.identity(name)) else {
        return Decision::deny(DecisionReason::UnknownIdentity);
    };
    let Some(ti) = policy.index.target(req.target) else {
        return Decision::deny(DecisionReason::UnknownTarget);
    };
    let Some(target) = policy.targets.get(ti) else {
        return Decision::deny(DecisionReason::UnknownTarget);
    };
    let ti = ti as u32;
    let rules = &policy.rules[..];
    // At connect time a workload's token has not been presented yet: rules with a `claims`
    // condition can only let the connection in to have its operations checked (with the
    // claims) one by one, and only where the handler checks operations.
    let connecting = matches!(req.op, Operation::Connect) && req.claims.is_none() && req.inspected;
    let candidates = policy
        .index
        .rules_for_identity(ii)
        .filter(|h| h.names_target(ti, rules))
        .filter(|h| {
            rules.get(h.rule as usize).is_some_and(|r| {
                r.claims_match(req.claims) || (connecting && r.action != Action::Deny)
            })
        });

    let mut approve: Option<&Rule> = None;
    let mut allow: Option<&Rule> = None;
    let mut pick = |action: Action, ri: u32| -> Option<&Rule> {
        let rule = rules.get(ri as usize)?;
        match action {
            Action::Deny => return Some(rule),
            Action::Approve => {
                approve.get_or_insert(rule);
            }
            Action::Allow => {
                allow.get_or_insert(rule);
            }
        }
        None
    };
    match req.op {
        Operation::Connect => {
            let fits = target.protocol.matcher_kind();
            for h in candidates {
                if h.kinds == 0 {
                    if let Some(deny) = pick(h.action, h.rule) {
                        return Decision::matched(Action::Deny, deny);
                    }
                } else if h.action != Action::Deny && h.kinds & fits != 0 {
                    // Let the connection in so its operations can be checked one by one.
                    pick(Action::Allow, h.rule);
                }
            }
        }
        op => {
            let (kind, statement) = match op {
                Operation::Sql { statement, .. } => (KIND_SQL, statement_bit(statement)),
                Operation::Ssh { .. } => (KIND_SSH, u64::MAX),
                Operation::Http { .. } => (KIND_HTTP, u64::MAX),
                Operation::Kube { .. } => (KIND_KUBE, u64::MAX),
                // Handled above; only whole-connection rules would match.
                Operation::Connect => (0, 0),
            };
            for h in candidates {
                let hit = h.kinds == 0
                    || (h.kinds & kind != 0
                        && h.statements & statement != 0
                        && rules
                            .get(h.rule as usize)
                            .is_some_and(|r| op_matches(r, &op)));
                if hit {
                    if let Some(deny) = pick(h.action, h.rule) {
                        return Decision::matched(Action::Deny, deny);
                    }
                }
            }
        }
    }
    if let Some(rule) = approve {
        Decision::matched(Action::Approve, rule)
    } else if let Some(rule) = allow {
        Decision::matched(Action::Allow, rule)
    } else {
        Decision::deny(DecisionReason::NoMatchingRule)
    }
}

impl Rule {
    /// Whether this rule speaks about `op`, claims aside: a rule without an operation matcher
    /// decides the whole connection (so covers everything on it); otherwise its matcher of the
    /// operation's kind must match, the SQL statement kind included. For explaining a
    /// decision; [`decide`] itself uses the precompiled index.
    pub fn covers(&self, op: &Operation<'_>) -> bool {
        let whole = self.sql.is_none()
            && self.ssh.is_none()
            && self.http.is_none()
            && self.kubernetes.is_none();
        if whole {
            return true;
        }
        let statement_fits = match op {
            Operation::Sql { statement, .. } => self
                .sql
                .as_ref()
                .is_some_and(|m| m.any_statement || word_in(&m.statements, statement)),
            _ => true,
        };
        statement_fits && op_matches(self, op)
    }
}

/// Whether the rule's matcher of the operation's kind matches it.
fn op_matches(rule: &Rule, op: &Operation<'_>) -> bool {
    match *op {
        Operation::Connect => false,
        // The statement kind was already checked exactly by `Hot::statements` (the parser only
        // admits kinds from SQL_STATEMENTS, each with its own bit).
        Operation::Sql {
            tables, functions, ..
        } => rule
            .sql
            .as_ref()
            .is_some_and(|m| m.matches_objects(rule.action, tables, functions)),
        Operation::Ssh { kind, command } => {
            rule.ssh.as_ref().is_some_and(|m| m.matches(kind, command))
        }
        Operation::Http { method, path, host } => rule
            .http
            .as_ref()
            .is_some_and(|m| m.matches(method, path, host)),
        Operation::Kube {
            verb,
            resource,
            namespace,
            name,
            command,
        } => rule
            .kubernetes
            .as_ref()
            .is_some_and(|m| m.matches(verb, resource, namespace, name, command)),
    }
}

/// `list` is empty, contains `"*"`, or contains `word` (ASCII case-insensitive).
fn word_in(list: &[String], word: &str) -> bool {
    list.is_empty()
        || list
            .iter()
            .any(|w| w == "*" || w.eq_ignore_ascii_case(word))
}

impl SqlMatch {
    /// Whether a statement of kind `statement` touching `tables` and calling `functions` matches,
    /// for a rule with `action` (allow rules need every table/function to match; deny and
    /// approve rules need one).
    pub fn matches(
        &self,
        action: Action,
        statement: &str,
        tables: &[String],
        functions: &[String],
    ) -> bool {
        (self.any_statement || word_in(&self.statements, statement))
            && self.matches_objects(action, tables, functions)
    }

    /// The `tables` and `functions` half of [`SqlMatch::matches`].
    fn matches_objects(&self, action: Action, tables: &[String], functions: &[String]) -> bool {
        let all = action == Action::Allow;
        self.table_globs.check(tables, all) && self.function_globs.check(functions, all)
    }
}

impl SshMatch {
    /// Whether an SSH request of `kind` with `command` matches (see the type's docs).
    pub fn matches(&self, kind: SshOpKind, command: &str) -> bool {
        let selects_any = !self.exec_patterns.is_empty()
            || self.shell == Some(true)
            || !self.subsystem_globs.is_empty()
            || self.forwarding == Some(true);
        match kind {
            // No patterns: the rule decides every exec request, whatever its syntax.
            SshOpKind::Exec if self.exec_patterns.is_empty() => !selects_any,
            SshOpKind::Exec => shell::any_matches(&self.exec_patterns, command),
            SshOpKind::Shell => match self.shell {
                Some(s) => s,
                None => !selects_any,
            },
            SshOpKind::Subsystem if self.subsystem_globs.is_empty() => !selects_any,
            SshOpKind::Subsystem => self.subsystem_globs.any_glob_matches(command),
            SshOpKind::Forward => match self.forwarding {
                Some(f) => f,
                None => !selects_any,
            },
        }
    }
}

impl HttpMatch {
    /// Whether a request matches every given key.
    pub fn matches(&self, method: &str, path: &str, host: &str) -> bool {
        word_in(&self.methods, method)
            && self.path_globs.allows(path)
            && self.host_globs.allows(host)
    }
}

impl KubeMatch {
    /// Whether an API request matches every given key. With `exec` patterns, only a request
    /// carrying a command (`pods/exec`) can match, and its argument words must match one
    /// pattern (the words go to the container's runtime as they are: no shell reads them).
    pub fn matches(
        &self,
        verb: &str,
        resource: &str,
        namespace: &str,
        name: &str,
        command: Option<&[String]>,
    ) -> bool {
        let exec_ok = self.exec_patterns.is_empty()
            || command.is_some_and(|words| {
                !words.is_empty() && self.exec_patterns.iter().any(|p| p.matches(words))
            });
        word_in(&self.verbs, verb)
            && self.resource_globs.allows(resource)
            && self.namespace_globs.allows(namespace)
            && self.name_globs.allows(name)
            && exec_ok
    }
}

#[cfg(test)]
mod tests;
