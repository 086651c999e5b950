//! The agent's end of the Unix-socket redirect (`crate::unix_redirect` loads the kernel side):
//! [`listen`] on `<unix_dir>/agent.sock` (directory root-owned 0711, socket 0666: bots can
//! connect after the rewrite, nobody else can bind there), and [`serve`]: accept, attribute by
//! the client socket's cookie (unix_diag), then hand the connection to the same session code as
//! TCP ([`crate::session::Agent::handle_attributed`]) through a loopback TCP pair, served
//! upstream over the target's first IP address.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tollgate_common::FAMILY_UNIX;
use tollgate_policy::{Policy, TargetAddress};
use tracing::{debug, warn};

use crate::{
    session::Agent,
    unix_redirect::{agent_socket, keys_for},
};

/// Where a redirected Unix connection came from: the target and the socket path it named.
#[derive(Debug, Clone)]
pub struct Via {
    pub target: String,
    pub path: String,
}

/// Create `unix_dir` as root's, mode 0711 (or check an existing one: root's, not writable by
/// group or others, nor under such a directory without the sticky bit), and bind the agent's
/// socket in it, mode 0666 so that any redirected bot may connect. A stale socket of an
/// earlier agent is replaced.
pub fn listen(unix_dir: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // Made 0711 when the agent creates it; an existing directory keeps its mode (a shared
    // one such as /run must stay listable) as long as only root can write it.
    let created = match std::fs::DirBuilder::new().mode(0o711).create(unix_dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(e),
    };
    let md = std::fs::symlink_metadata(unix_dir)?;
    // Only root may be able to create or replace entries here: after the agent dies, the
    // rewritten path must lead nowhere rather than to someone else's listener.
    if !md.is_dir() || md.uid() != 0 || md.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory owned by root and not writable by group or others (mode {:04o}): run `chown root {0} && chmod 0711 {0}`",
                unix_dir.display(),
                md.mode() & 0o7777
            ),
        ));
    }
    // A directory above it that others may write (without the sticky bit) would let them
    // move `unix_dir` aside and put their own in its place.
    for dir in unix_dir.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(dir) else {
            continue;
        };
        if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} (above [agent] unix_dir) is writable by group or others without the sticky bit (mode {:04o}): choose a unix_dir under root-owned directories",
                    dir.display(),
                    m.mode() & 0o7777
                ),
            ));
        }
    }
    if created {
        std::fs::set_permissions(unix_dir, std::fs::Permissions::from_mode(0o711))?;
    }
    let path = agent_socket(unix_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

/// The target whose `unix_socket` has any of the spellings of `path`, with the address the
/// agent serves it from (its first IP address).
pub fn target_for(policy: &Policy, path: &Path) -> Option<(String, SocketAddr)> {
    policy.targets.iter().find_map(|t| {
        let sock = t.unix_socket.as_deref()?;
        if sock != path && !keys_for(sock).iter().any(|k| k == path) {
            return None;
        }
        let addr = t.address.iter().find_map(|a| match a {
            TargetAddress::Exact(sa) => Some(*sa),
            _ => None,
        })?;
        Some((t.name.clone(), addr))
    })
}

/// Accept loop of the agent's Unix socket; returns when `stop` fires.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    paths: Arc<dyn Fn(u32) -> Option<PathBuf> + Send + Sync>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let Ok(permit) = agent.limiter.clone().try_acquire_owned() else {
                        agent.metrics.rejected.with_label_values(&["limit"]).inc();
                        continue;
                    };
                    let agent2 = agent.clone();
                    let paths = paths.clone();
                    agent.tracker.spawn(async move {
                        one(agent2, stream, paths).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept on the agent's Unix socket failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

/// One redirected Unix connection: attribute, find the target, bridge, serve.
async fn one(
    agent: Arc<Agent>,
    client: UnixStream,
    paths: Arc<dyn Fn(u32) -> Option<PathBuf> + Send + Sync>,
) {
    let info = agent
        .conns
        .take_unix(client.as_fd())
        .filter(|i| i.family == FAMILY_UNIX);
    let Some(info) = info else {
        // Not redirected by connect_unix (dialled directly, or the record is gone).
        agent
            .metrics
            .rejected
            .with_label_values(&["unattributed"])
            .inc();
        warn!("Unix connection without a kernel record refused");
        return;
    };
    let Some(path) = paths(info.orig_ip[0]) else {
        agent
            .metrics
            .rejected
            .with_label_values(&["no_target"])
            .inc();
        warn!(
            id = info.orig_ip[0],
            "Unix connection to a socket path no longer protected refused"
        );
        return;
    };
    let gen = agent.gen.load_full();
    let Some((target, orig)) = target_for(&gen.policy, &path) else {
        agent
            .metrics
            .rejected
            .with_label_values(&["no_target"])
            .inc();
        warn!(path = %path.display(), "no target names this Unix socket any more; refused");
        return;
    };
    let (inner, outer) = match tcp_pair(agent.upstream_mark).await {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "cannot bridge a Unix connection to the session code");
            return;
        }
    };
    let peer = match inner.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    debug!(path = %path.display(), %target, pid = info.pid, "Unix socket connection redirected");
    tokio::spawn(bridge(client, inner));
    let via = Via {
        target,
        path: path.display().to_string(),
    };
    agent
        .handle_attributed(outer, peer, info, orig, Some(via))
        .await;
}

/// Copy bytes both ways between the bot's Unix connection and the agent's end of the pair
/// until either side closes.
async fn bridge(mut client: UnixStream, mut inner: TcpStream) {
    let _ = tokio::io::copy_bidirectional(&mut client, &mut inner).await;
}

/// A connected loopback TCP pair (the session code takes a `TcpStream`): the connecting end
/// carries the agent's mark so no hook redirects it, and the accepted end is checked to be
/// that very connection (another local process could dial the ephemeral listener).
async fn tcp_pair(mark: Option<u32>) -> io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let sock = TcpSocket::new_v4()?;
    if let Some(m) = mark {
        socket2::SockRef::from(&sock).set_mark(m)?;
    }
    let addr = l.local_addr()?;
    let pair = async {
        let a = sock.connect(addr).await?;
        let want = a.local_addr()?;
        loop {
            let (b, from) = l.accept().await?;
            if from == want {
                let _ = a.set_nodelay(true);
                return Ok::<_, io::Error>((a, b));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), pair)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "loopback bridge timed out"))?
}
