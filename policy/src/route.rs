//! Which target protects an address: one canonical form for addresses and one precedence rule,
//! shared by [`Policy::target_for`](crate::Policy::target_for) and the agent's route table
//! (whose LPM keys the kernel's tries hold, so the kernel and both lookups agree).

use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};

use crate::model::TargetAddress;

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as IPv4; everything else unchanged. The kernel's
/// connect6 looks mapped destinations up as IPv4, so both sides use this one form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// A network truncated to its prefix, and one inside `::ffff:0:0/96` as the IPv4 network it is
/// (a mapped prefix among IPv6 routes would protect nothing).
pub fn canonical_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// One protected prefix and port, and the position of its target in `Policy::targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The protected network ([`canonical_net`]); a single address is a full-length prefix.
    pub net: IpNet,
    /// The protected port.
    pub port: u16,
    /// Position of the target in `Policy::targets`.
    pub target: usize,
    /// Added because the target's address is local to the host (not written in the policy):
    /// a route written in the policy with the same prefix wins over it.
    pub alias: bool,
}

impl TargetAddress {
    /// The prefixes this address protects (all on [`TargetAddress::port`]): an exact address
    /// as a full-length prefix, a CIDR as written, a host name as each of its current
    /// addresses (`resolved(host)`; the agent resolves, this crate does no I/O).
    pub fn prefixes(&self, resolved: &dyn Fn(&str) -> Vec<IpAddr>) -> Vec<IpNet> {
        match self {
            TargetAddress::Exact(sa) => vec![IpNet::from(canonical_ip(sa.ip()))],
            TargetAddress::Cidr(net, _) => vec![canonical_net(*net)],
            TargetAddress::Host(h, _) => resolved(h)
                .into_iter()
                .map(|ip| IpNet::from(canonical_ip(ip)))
                .collect(),
        }
    }
}

/// The target protecting `addr` among `routes`: the longest prefix on `addr`'s port holding
/// it ([`canonical_ip`] first); at equal length a route written in the policy beats a local
/// alias, then the earlier route (targets in file order).
pub fn lookup<'a>(routes: impl IntoIterator<Item = &'a Route>, addr: SocketAddr) -> Option<usize> {
    let ip = canonical_ip(addr.ip());
    let rank = |r: &Route| (r.net.prefix_len(), !r.alias);
    routes
        .into_iter()
        .filter(|r| r.port == addr.port() && r.net.contains(&ip))
        .fold(None::<&Route>, |best, r| match best {
            Some(b) if rank(b) >= rank(r) => Some(b),
            _ => Some(r),
        })
        .map(|r| r.target)
}
