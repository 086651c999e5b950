//! The shared state below every session: the agent (services and handlers) and one policy
//! generation.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tollgate_common::ConnInfo;
use tollgate_policy::Policy;

use super::Registry;
use crate::{
    audit::Audit,
    bpf::{self, AGENT_MARK},
    identity::Resolver,
    lock,
    metrics::Metrics,
    oidc::WorkloadVerifiers,
    relay::RelayKind,
    targets::Routes,
};

/// Where the original destination and kernel facts of an accepted connection come from: the
/// eBPF maps in production, a table in in-process tests.
pub trait ConnSource: Send + Sync {
    /// The record of the client at `peer` whose connection was accepted on `local`.
    fn take_conn(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnInfo>;
    /// The process's current exec generation (see `ConnInfo::exec_gen`).
    fn exec_gen(&self, pid: u32) -> u64;
}

impl ConnSource for bpf::Datapath {
    fn take_conn(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnInfo> {
        bpf::Datapath::take_conn(self, peer, local)
    }
    fn exec_gen(&self, pid: u32) -> u64 {
        bpf::Datapath::exec_gen(self, pid)
    }
}

/// One policy generation: the parsed policy and the routes built from it.
pub struct Generation {
    pub policy: Policy,
    pub routes: Routes,
}

/// Shared agent state.
pub struct Agent {
    pub gen: ArcSwap<Generation>,
    pub conns: Arc<dyn ConnSource>,
    pub resolver: Resolver,
    pub audit: Audit,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub resolved: Mutex<HashMap<String, Vec<IpAddr>>>,
    /// The addresses on this network namespace's interfaces (followed through netlink): a
    /// local target protects its port on each of them.
    pub local: Mutex<crate::targets::LocalAddrs>,
    /// Held while routes are rebuilt, written to the kernel and swapped in, so a policy reload,
    /// a DNS refresh and an address change never interleave.
    pub routes_update: Mutex<()>,
    pub relay_kind: RelayKind,
    pub upstream_timeout: Duration,
    /// `SO_MARK` for upstream sockets (None only in in-process tests, which load no programs).
    pub upstream_mark: Option<u32>,
    /// Key of the `hash` masking style: stable per installation (`<data_dir>/mask.key`).
    pub hash_key: [u8; 32],
    /// The agent's CA for bot-side TLS (None: bots' TLS requests are refused).
    pub ca: Option<Arc<crate::tls::Ca>>,
    /// The approval broker (None: no way to approve, so `approve` decisions are refused).
    pub approvals: Option<Arc<dyn crate::approvals::ApprovalStore>>,
    /// Session threads (None: sessions run on the runtime that accepted them, as in-process
    /// tests do).
    pub plane: Option<crate::plane::Plane>,
    /// The protocol handlers, built once at start (only the opaque relay until the daemon or
    /// a test registers more).
    pub handlers: Registry,
    /// Workload token verifiers, one per (issuer, audience), discovered on first use.
    pub workload: WorkloadVerifiers,
    next_session: AtomicU64,
    started_ms: u64,
}

impl Agent {
    pub fn new(
        gen: Generation,
        conns: Arc<dyn ConnSource>,
        resolver: Resolver,
        audit: Audit,
        metrics: Arc<Metrics>,
    ) -> Agent {
        let max = gen.policy.agent.max_connections.max(1);
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Agent {
            gen: ArcSwap::from_pointee(gen),
            conns,
            resolver,
            audit,
            metrics,
            limiter: Arc::new(Semaphore::new(max)),
            tracker: TaskTracker::new(),
            resolved: Mutex::new(HashMap::new()),
            local: Mutex::new(crate::targets::LocalAddrs::new()),
            routes_update: Mutex::new(()),
            relay_kind: RelayKind::from_env(),
            upstream_timeout: Duration::from_secs(10),
            upstream_mark: Some(AGENT_MARK),
            hash_key: [0; 32],
            ca: None,
            approvals: None,
            plane: None,
            handlers: Registry::new(RelayKind::from_env()),
            workload: WorkloadVerifiers::default(),
            next_session: AtomicU64::new(1),
            started_ms,
        }
    }

    pub(crate) fn session_id(&self) -> String {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", self.started_ms)
    }

    /// Re-resolve host-name targets and rebuild routes when an address changed.
    pub fn set_resolved(&self, name: String, addrs: Vec<IpAddr>) -> bool {
        let mut r = lock(&self.resolved);
        let changed = r.get(&name) != Some(&addrs);
        r.insert(name, addrs);
        changed
    }

    pub fn resolved_snapshot(&self) -> HashMap<String, Vec<IpAddr>> {
        lock(&self.resolved).clone()
    }

    /// Record the current interface addresses; true if they changed.
    pub fn set_local(&self, addrs: crate::targets::LocalAddrs) -> bool {
        let mut l = lock(&self.local);
        let changed = *l != addrs;
        *l = addrs;
        changed
    }

    /// The route table for `policy` with the current resolved and local addresses.
    pub fn routes_for(&self, policy: &tollgate_policy::Policy) -> crate::targets::Routes {
        let local = lock(&self.local).clone();
        crate::targets::Routes::build(policy, &self.resolved_snapshot(), &local)
    }
}
