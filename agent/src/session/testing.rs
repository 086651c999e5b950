//! The in-process tier's constructors: an [`Agent`] without the kernel (no programs, no
//! marks, no kernel records), so handlers are served directly through
//! [`SessionCx::for_test`](super::SessionCx::for_test) against fake or real upstreams on
//! loopback, without root (ztunnel's `tests/direct.rs` habit).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tollgate_common::ConnInfo;
use tollgate_policy::Policy;

use super::{Agent, ConnSource, Generation};
use crate::{audit::Audit, identity::Resolver, metrics::Metrics, targets::Routes};

/// No kernel: no connection has a record (the accept path refuses every one).
pub struct NoKernel;

impl ConnSource for NoKernel {
    fn take_conn(&self, _peer: SocketAddr, _local: SocketAddr) -> Option<ConnInfo> {
        None
    }
    fn exec_gen(&self, _pid: u32) -> u64 {
        0
    }
}

impl Agent {
    /// An agent for `policy` with its audit log in `policy.agent.data_dir`, upstream sockets
    /// unmarked, no approval broker and only the opaque relay registered.
    pub fn in_process(policy: Policy) -> std::io::Result<Agent> {
        let audit = Audit::open(&policy.agent.data_dir)?;
        let routes = Routes::build(&policy, &Default::default(), &Default::default());
        let mut agent = Agent::new(
            Generation { policy, routes },
            Arc::new(NoKernel),
            Resolver::new(PathBuf::from("/sys/fs/cgroup")),
            audit,
            Metrics::new(),
        );
        agent.upstream_mark = None;
        Ok(agent)
    }
}
