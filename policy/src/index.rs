//! Lookup tables built once at parse time: names to positions and rules by identity. They make
//! `decide` independent of how many rules and targets other workloads have. (Addresses to
//! targets: `route.rs`.)

use crate::model::{statement_bit, Action, Rule, Target};
use std::collections::HashMap;

/// `Hot::target` for a rule naming `"*"`.
pub(crate) const ANY_TARGET: u32 = u32::MAX;
/// `Hot::target` for a rule naming several targets (see `Rule::target_ids`).
pub(crate) const MANY_TARGETS: u32 = u32::MAX - 1;
pub(crate) const KIND_SQL: u8 = 1;
pub(crate) const KIND_SSH: u8 = 2;
pub(crate) const KIND_HTTP: u8 = 4;
pub(crate) const KIND_KUBE: u8 = 8;

/// What `decide` needs to pass over a rule without touching the rule itself: packed into one
/// contiguous array, so scanning many rules stays in cache. A prefilter only: a rule it lets
/// through is still checked in full.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hot {
    /// Position in `Policy::rules`.
    pub(crate) rule: u32,
    /// Target position, [`ANY_TARGET`] or [`MANY_TARGETS`].
    pub(crate) target: u32,
    /// Statement kinds the `sql` matcher may accept ([`statement_bit`]); all ones = any.
    pub(crate) statements: u64,
    pub(crate) action: Action,
    /// `KIND_*` bits of the matchers present; 0 = whole-connection rule.
    pub(crate) kinds: u8,
}

impl Hot {
    fn new(ri: u32, rule: &Rule) -> Hot {
        let target = match rule.target_ids.as_deref() {
            None => ANY_TARGET,
            Some([one]) => *one,
            Some(_) => MANY_TARGETS,
        };
        let statements = match &rule.sql {
            Some(m) if !m.any_statement => {
                m.statements.iter().fold(0, |acc, s| acc | statement_bit(s))
            }
            _ => u64::MAX,
        };
        let kinds = [
            (rule.sql.is_some(), KIND_SQL),
            (rule.ssh.is_some(), KIND_SSH),
            (rule.http.is_some(), KIND_HTTP),
            (rule.kubernetes.is_some(), KIND_KUBE),
        ]
        .iter()
        .filter(|(present, _)| *present)
        .fold(0, |acc, (_, bit)| acc | bit);
        Hot {
            rule: ri,
            target,
            statements,
            action: rule.action,
            kinds,
        }
    }

    /// Whether the rule names target position `ti`.
    pub(crate) fn names_target(&self, ti: u32, rules: &[Rule]) -> bool {
        match self.target {
            ANY_TARGET => true,
            MANY_TARGETS => rules
                .get(self.rule as usize)
                .and_then(|r| r.target_ids.as_deref())
                .is_some_and(|ids| ids.contains(&ti)),
            t => t == ti,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    identities: HashMap<String, usize>,
    targets: HashMap<String, usize>,
    /// For each identity (by position), the rules naming it explicitly, in file order.
    rules_by_identity: Vec<Box<[Hot]>>,
    /// Rules whose `identities` contain `"*"`, in file order.
    rules_any_identity: Box<[Hot]>,
}

impl Index {
    pub(crate) fn build(identity_names: &[&str], targets: &[Target], rules: &[Rule]) -> Index {
        let identities: HashMap<String, usize> = identity_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), i))
            .collect();
        let target_map = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let mut by_identity: Vec<Vec<Hot>> = vec![Vec::new(); identity_names.len()];
        let mut any = Vec::new();
        for (ri, rule) in rules.iter().enumerate() {
            let hot = Hot::new(ri as u32, rule);
            if rule.identities.iter().any(|i| i == "*") {
                any.push(hot);
                continue;
            }
            for name in &rule.identities {
                if let Some(list) = identities.get(name).and_then(|&ii| by_identity.get_mut(ii)) {
                    if list.last().map(|h| h.rule) != Some(hot.rule) {
                        list.push(hot);
                    }
                }
            }
        }
        Index {
            identities,
            targets: target_map,
            rules_by_identity: by_identity.into_iter().map(Vec::into_boxed_slice).collect(),
            rules_any_identity: any.into_boxed_slice(),
        }
    }

    pub(crate) fn identity(&self, name: &str) -> Option<usize> {
        self.identities.get(name).copied()
    }

    pub(crate) fn target(&self, name: &str) -> Option<usize> {
        self.targets.get(name).copied()
    }

    /// Rules naming identity `ii` or `"*"`, merged in file order.
    pub(crate) fn rules_for_identity(&self, ii: usize) -> Merge<'_> {
        Merge {
            a: self.rules_by_identity.get(ii).map_or(&[][..], |b| &b[..]),
            b: &self.rules_any_identity,
        }
    }
}

/// Two lists of rules in file order, merged without allocating.
pub(crate) struct Merge<'a> {
    a: &'a [Hot],
    b: &'a [Hot],
}

impl<'a> Iterator for Merge<'a> {
    type Item = &'a Hot;

    fn next(&mut self) -> Option<&'a Hot> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(x), Some(y)) => x.rule < y.rule,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = list.split_first()?;
        *list = rest;
        Some(first)
    }
}
