//! The upstream connection: to the original destination, marked so the hooks let it pass.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::net::{TcpSocket, TcpStream};
use tollgate_policy::TargetAddress;

use super::{DataPathError, SessionCx};
use crate::lock;

impl SessionCx {
    /// The target host name the bot dialled, if the original destination is one of the
    /// target's `host:port` addresses as last resolved.
    pub fn dialled_host(&self) -> Option<String> {
        let resolved = lock(&self.agent.resolved);
        self.target.address.iter().find_map(|a| match a {
            TargetAddress::Host(h, port)
                if *port == self.orig_dst.port()
                    && resolved
                        .get(h)
                        .is_some_and(|ips| ips.contains(&self.orig_dst.ip())) =>
            {
                Some(h.clone())
            }
            _ => None,
        })
    }

    /// Connect to the original destination. The socket carries the agent's mark, so the
    /// kernel hooks never redirect it back to us.
    pub async fn connect_upstream(&self) -> Result<TcpStream, DataPathError> {
        let mut addr = self.orig_dst;
        // The kernel record has no scope id: a link-local address of this host is reached on
        // the interface that holds it.
        if let SocketAddr::V6(v6) = &mut addr {
            if v6.scope_id() == 0 && v6.ip().is_unicast_link_local() {
                if let Some(index) = lock(&self.agent.local).get(&IpAddr::V6(*v6.ip())) {
                    v6.set_scope_id(*index);
                }
            }
        }
        let up = |source| DataPathError::Upstream { addr, source };
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(up)?;
        if let Some(mark) = self.agent.upstream_mark {
            socket2::SockRef::from(&sock).set_mark(mark).map_err(up)?;
        }
        crate::sys::unpaced_on_loopback(socket2::SockRef::from(&sock), addr.ip());
        match tokio::time::timeout(self.agent.upstream_timeout, sock.connect(addr)).await {
            Ok(r) => r.map_err(up),
            Err(_) => Err(up(io::Error::new(
                io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }
}
