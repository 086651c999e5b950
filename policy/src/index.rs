//! Lookup tables built once at parse time: names to positions, rules by identity, and
//! addresses to targets. They make `decide` and `target_for` independent of how many rules and
//! targets other workloads have.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::model::{Rule, Target, TargetAddress};

#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    identities: HashMap<String, usize>,
    targets: HashMap<String, usize>,
    /// For each identity (by position), the rules naming it explicitly, in file order.
    rules_by_identity: Vec<Box<[u32]>>,
    /// Rules whose `identities` contain `"*"`, in file order.
    rules_any_identity: Box<[u32]>,
    exact: HashMap<SocketAddr, usize>,
    /// (host, port, target), file order.
    hosts: Vec<(String, u16, usize)>,
    /// (network, port, target), longest prefix first, then file order.
    cidrs: Vec<(IpNet, u16, usize)>,
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as IPv4; everything else unchanged.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
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
        let mut by_identity: Vec<Vec<u32>> = vec![Vec::new(); identity_names.len()];
        let mut any = Vec::new();
        for (ri, rule) in rules.iter().enumerate() {
            let ri = ri as u32;
            if rule.identities.iter().any(|i| i == "*") {
                any.push(ri);
                continue;
            }
            for name in &rule.identities {
                if let Some(&ii) = identities.get(name) {
                    let list = &mut by_identity[ii];
                    if list.last() != Some(&ri) {
                        list.push(ri);
                    }
                }
            }
        }
        let mut exact = HashMap::new();
        let mut hosts = Vec::new();
        let mut cidrs = Vec::new();
        for (ti, t) in targets.iter().enumerate() {
            for a in &t.address {
                match a {
                    TargetAddress::Exact(sa) => {
                        exact.entry(*sa).or_insert(ti);
                    }
                    TargetAddress::Host(h, p) => hosts.push((h.clone(), *p, ti)),
                    TargetAddress::Cidr(net, p) => cidrs.push((*net, *p, ti)),
                }
            }
        }
        // Stable sort keeps file order among equal prefixes.
        cidrs.sort_by_key(|(net, _, _)| std::cmp::Reverse(net.prefix_len()));
        Index {
            identities,
            targets: target_map,
            rules_by_identity: by_identity.into_iter().map(Vec::into_boxed_slice).collect(),
            rules_any_identity: any.into_boxed_slice(),
            exact,
            hosts,
            cidrs,
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

    pub(crate) fn target_for(
        &self,
        addr: SocketAddr,
        resolved: &dyn Fn(&str) -> Vec<IpAddr>,
    ) -> Option<usize> {
        let ip = canonical_ip(addr.ip());
        let port = addr.port();
        if let Some(&ti) = self.exact.get(&SocketAddr::new(ip, port)) {
            return Some(ti);
        }
        for (host, p, ti) in &self.hosts {
            if *p == port && resolved(host).into_iter().any(|r| canonical_ip(r) == ip) {
                return Some(*ti);
            }
        }
        self.cidrs
            .iter()
            .find(|(net, p, _)| *p == port && net.contains(&ip))
            .map(|(_, _, ti)| *ti)
    }
}

/// Two ascending lists of rule positions, merged without allocating.
pub(crate) struct Merge<'a> {
    a: &'a [u32],
    b: &'a [u32],
}

impl Iterator for Merge<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(x), Some(y)) => x < y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let list = if take_a { &mut self.a } else { &mut self.b };
        let (first, rest) = list.split_first()?;
        *list = rest;
        Some(*first as usize)
    }
}
