//! Which destinations are protected, and by which target: the route table built from the
//! policy's `[[target]]` addresses (plus resolved host names), and the keys the kernel's LPM
//! tries need.
//!
//! Loopback aliasing: a target on a loopback address (127.0.0.0/8 or ::1) also protects the
//! same port on every other loopback address, on `0.0.0.0` and on `::`. A server bound to
//! 0.0.0.0 answers on all of them, so leaving any out would be a bypass.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tollgate_common::{TargetKey4, TargetKey6};
use tollgate_policy::{Policy, TargetAddress};

/// `(prefix_len, key data, target index)` for the IPv4 trie.
pub type KeySet4 = BTreeSet<(u32, TargetKey4, u32)>;
/// The same for the IPv6 trie.
pub type KeySet6 = BTreeSet<(u32, TargetKey6, u32)>;

/// One protected prefix and port, and the index of its target in `Policy::targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub net: IpNet,
    pub port: u16,
    pub target: usize,
}

/// The route table for one policy generation.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

/// Normalise an IPv4-mapped IPv6 address to IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn is_loopback_net(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).is_ok_and(|lo| lo.contains(n)),
        IpNet::V6(n) => n.prefix_len() == 128 && n.addr() == Ipv6Addr::LOCALHOST,
    }
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(canonical(ip))
}

impl Routes {
    /// Build the table. `resolved` holds the current addresses of host-name targets.
    pub fn build(policy: &Policy, resolved: &HashMap<String, Vec<IpAddr>>) -> Routes {
        let mut routes = Vec::new();
        for (idx, t) in policy.targets.iter().enumerate() {
            let mut push = |net: IpNet, port: u16| {
                let loopback = is_loopback_net(&net);
                routes.push(Route {
                    net,
                    port,
                    target: idx,
                });
                if loopback {
                    for alias in loopback_aliases() {
                        routes.push(Route {
                            net: alias,
                            port,
                            target: idx,
                        });
                    }
                }
            };
            for a in &t.address {
                match a {
                    TargetAddress::Exact(sa) => push(host_net(sa.ip()), sa.port()),
                    TargetAddress::Cidr(net, port) => push(net.trunc(), *port),
                    TargetAddress::Host(h, port) => {
                        for ip in resolved.get(h).into_iter().flatten() {
                            push(host_net(*ip), *port);
                        }
                    }
                }
            }
        }
        Routes { routes }
    }

    /// The target protecting `addr`, longest prefix first; explicit routes win over aliases of
    /// equal length because they come first.
    pub fn lookup(&self, addr: SocketAddr) -> Option<usize> {
        let ip = canonical(addr.ip());
        self.routes
            .iter()
            .filter(|r| r.port == addr.port() && r.net.contains(&ip))
            .fold(None::<&Route>, |best, r| match best {
                Some(b) if b.net.prefix_len() >= r.net.prefix_len() => Some(b),
                _ => Some(r),
            })
            .map(|r| r.target)
    }

    /// LPM keys for the kernel: `(prefix_len, data)` with the port in front (see
    /// `tollgate_common::TargetKey4`).
    pub fn bpf_keys(&self) -> (KeySet4, KeySet6) {
        let mut v4 = BTreeSet::new();
        let mut v6 = BTreeSet::new();
        for r in &self.routes {
            let p = r.port.to_be_bytes();
            match r.net {
                IpNet::V4(n) => {
                    let o = n.network().octets();
                    v4.insert((
                        16 + u32::from(n.prefix_len()),
                        [p[0], p[1], o[0], o[1], o[2], o[3]],
                        r.target as u32,
                    ));
                }
                IpNet::V6(n) => {
                    let mut d = [0u8; 18];
                    d[..2].copy_from_slice(&p);
                    d[2..].copy_from_slice(&n.network().octets());
                    v6.insert((16 + u32::from(n.prefix_len()), d, r.target as u32));
                }
            }
        }
        (v4, v6)
    }
}

fn loopback_aliases() -> [IpNet; 4] {
    [
        IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap_or_default()),
        IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 32).unwrap_or_default()),
        IpNet::V6(Ipv6Net::new(Ipv6Addr::LOCALHOST, 128).unwrap_or_default()),
        IpNet::V6(Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 128).unwrap_or_default()),
    ]
}

/// Host names that need resolving, with nothing else.
pub fn host_names(policy: &Policy) -> BTreeSet<String> {
    policy
        .targets
        .iter()
        .flat_map(|t| t.address.iter())
        .filter_map(|a| match a {
            TargetAddress::Host(h, _) => Some(h.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(addrs: &str) -> Policy {
        let text = format!(
            "[[identity]]\nname = \"a\"\nuid = 1\n\n[[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = [{addrs}]\n\n[[target]]\nname = \"net\"\nprotocol = \"tcp\"\naddress = [\"10.0.0.0/24:5432\"]\n"
        );
        tollgate_policy::parse(&text, "t.toml").expect("valid policy")
    }

    #[test]
    fn loopback_targets_cover_aliases_and_mapped() {
        let p = policy("\"127.0.0.1:5432\"");
        let r = Routes::build(&p, &HashMap::new());
        for a in [
            "127.0.0.1:5432",
            "127.0.0.2:5432",
            "0.0.0.0:5432",
            "[::1]:5432",
            "[::]:5432",
            "[::ffff:127.0.0.1]:5432",
        ] {
            assert_eq!(r.lookup(a.parse().expect("addr")), Some(0), "{a}");
        }
        assert_eq!(r.lookup("127.0.0.1:5433".parse().expect("addr")), None);
        assert_eq!(r.lookup("10.0.0.7:5432".parse().expect("addr")), Some(1));
        assert_eq!(r.lookup("10.0.1.7:5432".parse().expect("addr")), None);
    }

    #[test]
    fn bpf_keys_put_port_first() {
        let p = policy("\"127.0.0.1:5432\"");
        let (v4, v6) = Routes::build(&p, &HashMap::new()).bpf_keys();
        assert!(v4.contains(&(48, [0x15, 0x38, 127, 0, 0, 1], 0)));
        assert!(v4.contains(&(24, [0x15, 0x38, 127, 0, 0, 0], 0)));
        assert!(v4.contains(&(40, [0x15, 0x38, 10, 0, 0, 0], 1)));
        assert_eq!(v6.len(), 2);
    }

    #[test]
    fn resolved_hosts_are_routed() {
        let p = policy("\"db.internal:5432\"");
        let mut res = HashMap::new();
        res.insert(
            "db.internal".to_string(),
            vec!["192.0.2.10".parse().expect("ip")],
        );
        let r = Routes::build(&p, &res);
        assert_eq!(r.lookup("192.0.2.10:5432".parse().expect("addr")), Some(0));
        assert_eq!(r.lookup("192.0.2.11:5432".parse().expect("addr")), None);
    }
}
