//! Which destinations are protected, and by which target: the route table built from the
//! policy's `[[target]]` addresses (plus resolved host names), and the keys the kernel's LPM
//! tries need.
//!
//! Local aliasing: a target whose address is local to the host (any loopback address, `0.0.0.0`,
//! `::`, any address on an interface of the agent's network namespace, or a CIDR holding one
//! of those) protects the same port on *every* local address: all of 127.0.0.0/8, `::1`,
//! `0.0.0.0`, `::` and each interface address (IPv6 link-local included; IPv4-mapped IPv6 is
//! looked up in the IPv4 trie by connect6). A server bound to `0.0.0.0`/`::` answers on all of
//! them, so leaving any out would be a bypass. The interface addresses come from netlink
//! ([`crate::sys::interface_addrs`]) and are kept current by the agent
//! ([`crate::sys::AddrWatch`]), so the set follows address changes.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tollgate_common::{TargetKey4, TargetKey6};
pub use tollgate_policy::route::Route;
use tollgate_policy::{
    route::{canonical_ip, canonical_net},
    Policy, Protocol, TargetAddress,
};

/// `(prefix_len, key data, target index)` for the IPv4 trie.
pub type KeySet4 = BTreeSet<(u32, TargetKey4, u32)>;
/// The same for the IPv6 trie.
pub type KeySet6 = BTreeSet<(u32, TargetKey6, u32)>;

/// The addresses on the interfaces of the agent's network namespace, each with the index of
/// its interface (the scope of a link-local address). Loopback and the unspecified addresses
/// are always local and need not be in it.
pub type LocalAddrs = std::collections::BTreeMap<IpAddr, u32>;

/// The route table for one policy generation.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

fn is_loopback_net(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).is_ok_and(|lo| lo.contains(n)),
        IpNet::V6(n) => n.prefix_len() == 128 && n.addr() == Ipv6Addr::LOCALHOST,
    }
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(canonical_ip(ip))
}

/// Whether `net` reaches this host: it is loopback, holds an unspecified address (a connect
/// to `0.0.0.0`/`::` goes to the local host) or holds one of the interface addresses.
pub fn is_local_net(net: &IpNet, local: &LocalAddrs) -> bool {
    is_loopback_net(net)
        || net.contains(&IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        || net.contains(&IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        || local.keys().any(|ip| net.contains(&canonical_ip(*ip)))
}

/// Every spelling of "this host": loopback, unspecified and each interface address.
fn local_nets(local: &LocalAddrs) -> impl Iterator<Item = IpNet> + '_ {
    loopback_aliases()
        .into_iter()
        .chain(local.keys().map(|ip| host_net(*ip)))
}

impl Routes {
    /// Build the table. `resolved` holds the current addresses of host-name targets, `local`
    /// the addresses on this network namespace's interfaces.
    pub fn build(
        policy: &Policy,
        resolved: &HashMap<String, Vec<IpAddr>>,
        local: &LocalAddrs,
    ) -> Routes {
        let resolved = |h: &str| resolved.get(h).cloned().unwrap_or_default();
        let mut routes = Vec::new();
        // The policy's own routes (file order), each followed by the local aliases of a local
        // one: a server bound to 0.0.0.0/:: answers on all of them.
        for r in policy.routes(&resolved) {
            let aliases = is_local_net(&r.net, local).then(|| local_nets(local));
            let (port, target) = (r.port, r.target);
            routes.push(r);
            routes.extend(aliases.into_iter().flatten().map(|net| Route {
                net,
                port,
                target,
                alias: true,
            }));
        }
        Routes { routes }
    }

    /// The target protecting `addr` ([`tollgate_policy::route::lookup`]: longest prefix first;
    /// at equal length a route written in the policy wins over a local alias, then the earlier
    /// target).
    pub fn lookup(&self, addr: SocketAddr) -> Option<usize> {
        tollgate_policy::route::lookup(&self.routes, addr)
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

/// The `(target name, port)` of every `postgres` target with an address local to this host
/// (see [`is_local_net`]; the host name `localhost` counts as local). PostgreSQL on such a
/// port also listens on a Unix socket, which the connect hooks never see.
pub fn local_postgres_ports(policy: &Policy, local: &LocalAddrs) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for t in policy
        .targets
        .iter()
        .filter(|t| t.protocol == Protocol::Postgres)
    {
        let mut ports = BTreeSet::new();
        for a in &t.address {
            let (is_local, port) = match a {
                TargetAddress::Exact(sa) => (is_local_net(&host_net(sa.ip()), local), sa.port()),
                TargetAddress::Cidr(net, port) => {
                    (is_local_net(&canonical_net(*net), local), *port)
                }
                TargetAddress::Host(h, port) => {
                    let h = h.trim_end_matches('.').to_ascii_lowercase();
                    (h == "localhost" || h.ends_with(".localhost"), *port)
                }
            };
            if is_local {
                ports.insert(port);
            }
        }
        out.extend(ports.into_iter().map(|p| (t.name.clone(), p)));
    }
    out
}

/// The warning `check-policy` and `doctor` print for a local PostgreSQL target: its Unix
/// socket bypasses the redirect unless its permissions keep bots out.
pub fn unix_socket_warning(target: &str, port: u16) -> String {
    format!(
        "target \"{target}\" (postgres on a local address, port {port}): PostgreSQL's Unix socket \
         (/var/run/postgresql/.s.PGSQL.{port}, or /tmp/.s.PGSQL.{port}) is NOT covered by the \
         redirect, so any bot that can open it reaches the database directly. Close it to bots by \
         its permissions: in postgresql.conf set `unix_socket_permissions = 0770` and \
         `unix_socket_group` to a group no bot is in (or `unix_socket_directories = ''` to turn it \
         off), then restart PostgreSQL; admins use the socket through that group, or connect over \
         TCP as an identity of their own. On Linux 6.7+ the target can name it instead \
         (`unix_socket = \"/var/run/postgresql/.s.PGSQL.{port}\"`) to have it redirected to the \
         agent"
    )
}

/// One [`unix_socket_warning`] per local PostgreSQL target and port that names no
/// `unix_socket`, and what each target's `unix_socket` needs on this kernel
/// ([`crate::unix_redirect::socket_warning`]).
pub fn unix_socket_warnings(policy: &Policy, local: &LocalAddrs) -> Vec<String> {
    let named = |t: &str| policy.target(t).is_some_and(|t| t.unix_socket.is_some());
    let mut out: Vec<String> = local_postgres_ports(policy, local)
        .into_iter()
        .filter(|(t, _)| !named(t))
        .map(|(t, p)| unix_socket_warning(&t, p))
        .collect();
    if policy.targets.iter().any(|t| t.unix_socket.is_some()) {
        let kernel = crate::unix_redirect::kernel_supports();
        for t in &policy.targets {
            if let Some(sock) = &t.unix_socket {
                out.extend(crate::unix_redirect::socket_warning(&t.name, sock, &kernel));
            }
        }
    }
    out
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
        let r = Routes::build(&p, &HashMap::new(), &LocalAddrs::new());
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

    fn host(addrs: &[&str]) -> LocalAddrs {
        addrs.iter().map(|a| (a.parse().expect("ip"), 1)).collect()
    }

    const HOST_SPELLINGS: [&str; 9] = [
        "127.0.0.1:5432",
        "127.0.0.2:5432",
        "0.0.0.0:5432",
        "[::1]:5432",
        "[::]:5432",
        "192.0.2.2:5432",
        "[::ffff:192.0.2.2]:5432",
        "[fd00::2]:5432",
        "[fe80::2]:5432",
    ];

    #[test]
    fn a_local_target_covers_every_local_address() {
        let local = host(&["192.0.2.2", "fd00::2", "fe80::2"]);
        for target in [
            "\"127.0.0.1:5432\"",
            "\"[::1]:5432\"",
            "\"192.0.2.2:5432\"",
            "\"[fd00::2]:5432\"",
            "\"0.0.0.0:5432\"",
            "\"[::]:5432\"",
            "\"192.0.2.0/24:5432\"",
        ] {
            let r = Routes::build(&policy(target), &HashMap::new(), &local);
            for a in HOST_SPELLINGS {
                assert_eq!(r.lookup(a.parse().expect("addr")), Some(0), "{target}: {a}");
            }
            // Other hosts and other ports stay unprotected.
            assert_eq!(r.lookup("198.51.100.1:5432".parse().expect("addr")), None);
            assert_eq!(r.lookup("192.0.2.2:5433".parse().expect("addr")), None);
            let (v4, v6) = r.bpf_keys();
            assert!(
                v4.contains(&(48, [0x15, 0x38, 192, 0, 2, 2], 0)),
                "{target}"
            );
            let mut fe80 = [0u8; 18];
            fe80[..2].copy_from_slice(&[0x15, 0x38]);
            fe80[2..].copy_from_slice(&"fe80::2".parse::<Ipv6Addr>().expect("ip").octets());
            assert!(v6.contains(&(144, fe80, 0)), "{target}");
        }
    }

    #[test]
    fn a_remote_target_gets_no_local_aliases() {
        let local = host(&["192.0.2.2"]);
        let r = Routes::build(&policy("\"198.51.100.7:5432\""), &HashMap::new(), &local);
        assert_eq!(
            r.lookup("198.51.100.7:5432".parse().expect("addr")),
            Some(0)
        );
        for a in ["127.0.0.1:5432", "192.0.2.2:5432", "0.0.0.0:5432"] {
            assert_eq!(r.lookup(a.parse().expect("addr")), None, "{a}");
        }
    }

    #[test]
    fn an_explicit_route_beats_another_targets_local_alias() {
        let text = "[[identity]]\nname = \"a\"\nuid = 1\n\n[[target]]\nname = \"lo\"\nprotocol = \"tcp\"\naddress = [\"127.0.0.1:5432\"]\n\n[[target]]\nname = \"eth\"\nprotocol = \"tcp\"\naddress = [\"192.0.2.2:5432\"]\n";
        let p = tollgate_policy::parse(text, "t.toml").expect("valid policy");
        let r = Routes::build(&p, &HashMap::new(), &host(&["192.0.2.2"]));
        assert_eq!(r.lookup("127.0.0.1:5432".parse().expect("addr")), Some(0));
        assert_eq!(r.lookup("192.0.2.2:5432".parse().expect("addr")), Some(1));
        assert_eq!(r.lookup("[::1]:5432".parse().expect("addr")), Some(0));
    }

    #[test]
    fn local_postgres_targets_are_named_for_the_unix_socket_warning() {
        let text = "[[identity]]\nname = \"a\"\nuid = 1\n\n[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.1:5432\", \"[::1]:5432\", \"192.0.2.2:6432\"]\n\n[[target]]\nname = \"remote\"\nprotocol = \"postgres\"\naddress = [\"198.51.100.7:5432\"]\n\n[[target]]\nname = \"byname\"\nprotocol = \"postgres\"\naddress = [\"localhost:5433\"]\n\n[[target]]\nname = \"raw\"\nprotocol = \"tcp\"\naddress = [\"127.0.0.1:5434\"]\n";
        let p = tollgate_policy::parse(text, "t.toml").expect("valid policy");
        let got = local_postgres_ports(&p, &host(&["192.0.2.2"]));
        assert_eq!(
            got,
            [
                ("db".to_string(), 5432),
                ("db".to_string(), 6432),
                ("byname".to_string(), 5433)
            ]
        );
        let all = unix_socket_warnings(&p, &host(&["192.0.2.2"]));
        assert_eq!(all.len(), 3);
        let w = &all[0];
        assert!(w.contains("target \"db\""), "{w}");
        assert!(w.contains("/var/run/postgresql/.s.PGSQL.5432"), "{w}");
        assert!(w.contains("NOT covered by the redirect"), "{w}");
        assert!(w.contains("unix_socket_permissions = 0770"), "{w}");
        assert!(w.contains("unix_socket_group"), "{w}");
    }

    #[test]
    fn ipv4_mapped_cidrs_go_to_the_ipv4_trie() {
        let r = Routes::build(
            &policy("\"[::ffff:198.51.100.0/120]:5432\""),
            &HashMap::new(),
            &LocalAddrs::new(),
        );
        assert_eq!(
            r.lookup("198.51.100.9:5432".parse().expect("addr")),
            Some(0)
        );
        let (v4, _) = r.bpf_keys();
        assert!(
            v4.contains(&(40, [0x15, 0x38, 198, 51, 100, 0], 0)),
            "{v4:?}"
        );
    }

    #[test]
    fn bpf_keys_put_port_first() {
        let p = policy("\"127.0.0.1:5432\"");
        let (v4, v6) = Routes::build(&p, &HashMap::new(), &LocalAddrs::new()).bpf_keys();
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
        let r = Routes::build(&p, &res, &LocalAddrs::new());
        assert_eq!(r.lookup("192.0.2.10:5432".parse().expect("addr")), Some(0));
        assert_eq!(r.lookup("192.0.2.11:5432".parse().expect("addr")), None);
    }

    /// The agent's routes and `Policy::target_for` are one rule: off this host (no local
    /// aliases) they name the same target for every address, ties included.
    #[test]
    fn routes_and_the_policys_target_for_agree() {
        let text = r#"
[[target]]
name = "wide"
protocol = "tcp"
address = ["10.0.0.0/8:5432", "[fd00::/16]:5432"]
[[target]]
name = "named"
protocol = "tcp"
address = ["db.internal:5432"]
[[target]]
name = "exact"
protocol = "tcp"
address = ["10.1.2.3:5432", "10.1.2.50:5432", "[::ffff:10.1.2.9]:5432"]
[[target]]
name = "cidr32"
protocol = "tcp"
address = ["10.1.2.3/32:5432", "10.1.2.0/24:5432"]
"#;
        let p = tollgate_policy::parse(text, "t.toml").expect("valid policy");
        let mut res = HashMap::new();
        res.insert(
            "db.internal".to_string(),
            vec![
                "10.1.2.50".parse().expect("ip"),
                "::ffff:10.1.2.51".parse().expect("ip"),
            ],
        );
        let r = Routes::build(&p, &res, &LocalAddrs::new());
        let resolve = |h: &str| res.get(h).cloned().unwrap_or_default();
        let name = |i: Option<usize>| i.map(|i| p.targets[i].name.as_str());
        for (a, want) in [
            ("10.1.2.3:5432", Some("exact")),  // equal /32: the earlier target
            ("10.1.2.50:5432", Some("named")), // host name vs exact: the earlier target
            ("[::ffff:10.1.2.51]:5432", Some("named")),
            ("10.1.2.9:5432", Some("exact")),
            ("10.1.2.4:5432", Some("cidr32")),
            ("10.9.9.9:5432", Some("wide")),
            ("[fd00:1::1]:5432", Some("wide")),
            ("10.1.2.3:5433", None),
            ("11.0.0.1:5432", None),
        ] {
            let addr: std::net::SocketAddr = a.parse().expect("addr");
            assert_eq!(name(r.lookup(addr)), want, "routes: {a}");
            let policy = p.target_for(addr, &resolve).map(|t| t.name.as_str());
            assert_eq!(policy, want, "Policy::target_for: {a}");
        }
    }
}
