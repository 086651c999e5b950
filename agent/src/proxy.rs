//! The accept path: accept a redirected connection, attribute it (kernel facts), find its
//! target, and hand it to the session layer (`session/`), which decides the connection and
//! serves it with the protocol's handler from the registry. This file names no protocol.
//!
//! Phases of a session (see ARCHITECTURE.md): accept -> attribute (kernel facts) -> target ->
//! [`SessionCx`] (`decide(Connect)`, handler from [`crate::session::Registry`]) -> handler
//! (`on_operation` decisions through [`SessionCx::decide`], upstream through
//! [`SessionCx::connect_upstream`]) -> close (the session guard).

use crate::obj;
use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tollgate_policy::WorkloadFacts;
use tracing::{warn, Instrument};

use crate::bpf;
use crate::session::{reset, Agent, SessionCx};

impl Agent {
    /// Accept loop for one listener; returns when `stop` fires.
    pub async fn serve_listener(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let Ok(permit) = self.limiter.clone().try_acquire_owned() else {
                            // Over the concurrency cap: refuse fast rather than queue unboundedly.
                            self.metrics.rejected.with_label_values(&["limit"]).inc();
                            reset(stream);
                            continue;
                        };
                        let agent = self.clone();
                        match &self.plane {
                            Some(plane) => {
                                // Handed over as a std socket: a tokio socket belongs to the
                                // runtime that registered it.
                                let stream = match stream.into_std() {
                                    Ok(s) => s,
                                    Err(e) => {
                                        warn!(error = %e, "cannot hand a connection to a session thread");
                                        continue;
                                    }
                                };
                                plane.spawn(self.tracker.track_future(async move {
                                    match TcpStream::from_std(stream) {
                                        Ok(stream) => agent.handle(stream, peer).await,
                                        Err(e) => warn!(error = %e, "session thread cannot take a connection"),
                                    }
                                    drop(permit);
                                }));
                            }
                            None => {
                                self.tracker.spawn(async move {
                                    agent.handle(stream, peer).await;
                                    drop(permit);
                                });
                            }
                        }
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
    }

    /// One connection, start to end.
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let info = stream
            .local_addr()
            .ok()
            .and_then(|local| self.conns.take_conn(peer, local));
        let Some(info) = info else {
            // Not redirected by our hooks (someone dialled the listener directly, or the record
            // was lost): nothing to attribute, nothing to allow.
            self.metrics
                .rejected
                .with_label_values(&["unattributed"])
                .inc();
            warn!(%peer, "connection without a kernel record refused");
            reset(stream);
            return;
        };
        let orig = bpf::orig_dst(&info);
        let mut facts = self.resolver.facts(&info);
        // /proc/<pid>/exe was read after the connect; if the process exec'd (or exited and its
        // pid was reused) in between, that path describes another program: don't trust it.
        if self.conns.exec_gen(info.pid) != info.exec_gen {
            warn!(
                pid = info.pid,
                "process exec'd after connecting; its exe is not used for identity"
            );
            facts.exe = None;
            facts.exe_verified = false;
        }
        let gen = self.gen.load_full();
        let id = self.session_id();
        let span = tracing::info_span!("conn", conn_id = %id, %peer, orig_dst = %orig, identity = tracing::field::Empty, target = tracing::field::Empty, protocol = tracing::field::Empty);
        async move {
            // An unresolvable cgroup matches no identity (fail closed).
            let identity = facts.cgroup.as_deref().and_then(|cgroup| {
                gen.policy
                    .identify(&WorkloadFacts {
                        cgroup,
                        uid: facts.uid,
                        user: facts.user.as_deref(),
                        // Only a path that names the very file the process runs.
                        exe: facts.exe.as_deref().filter(|_| facts.exe_verified),
                        comm: &facts.comm,
                        foreign_userns: facts.foreign_userns,
                    })
                    .map(|i| i.name.clone())
            });
            let target = gen.routes.lookup(orig).and_then(|i| gen.policy.targets.get(i)).cloned();
            let span = tracing::Span::current();
            span.record("identity", identity.as_deref().unwrap_or("unknown"));
            let Some(target) = target else {
                // The route vanished between the kernel redirect and now (policy reload).
                self.metrics.rejected.with_label_values(&["no_target"]).inc();
                self.audit.write(obj(json!({
                    "event": "connect", "session": id, "identity": identity, "target": null,
                    "protocol": null, "operation": "connect", "action": "deny", "rule": null,
                    "reason": "unknown_target", "orig_dst": orig.to_string(), "peer": peer.to_string(),
                    "pid": facts.pid, "uid": facts.uid, "user": facts.user, "cgroup": facts.cgroup, "exe": facts.exe, "comm": facts.comm,
                    "exe_dev": facts.exe_dev, "exe_ino": facts.exe_ino, "exe_verified": facts.exe_verified, "foreign_userns": facts.foreign_userns,
                })));
                reset(stream);
                return;
            };
            span.record("target", target.name.as_str());
            span.record("protocol", target.protocol.as_str());
            let cx = SessionCx::new(self.clone(), gen.clone(), id, identity, target, facts, orig, peer);
            cx.run(stream).await;
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests;
