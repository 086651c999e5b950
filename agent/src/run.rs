//! `tollgate run`: wire the pieces together, then reload on SIGHUP or file change and drain on
//! SIGTERM/SIGINT.

use crate::obj;
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde_json::json;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tollgate_policy::{FailMode, Policy};
use tracing::{error, info, warn};

use crate::{
    audit::Audit,
    bpf::Datapath,
    identity::Resolver,
    metrics::{self, Metrics},
    session::{Agent, Generation},
    sys,
    targets::{self, Routes},
};

pub fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    Ok(tollgate_policy::parse(&text, &path.display().to_string())?)
}

pub fn run(policy_path: &Path) -> anyhow::Result<()> {
    limit_malloc_arenas();
    let policy = load_policy(policy_path)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // pg_query recurses deeply on nested statements (over 1.5 MiB of stack in debug
        // builds for the deepest trees it accepts).
        .thread_stack_size(8 << 20)
        .build()
        .context("tokio runtime")?
        .block_on(run_async(policy_path.to_path_buf(), policy))
}

/// One glibc malloc arena per core (instead of eight), unless `MALLOC_ARENA_MAX` says
/// otherwise. Sessions are accepted on one thread and served on another, so with an arena per
/// thread their small long-lived allocations spread over more arenas and pin more pages:
/// measured with `cargo xtask bench pg --only memory`, idle-session RSS growth was 15.3-16.6
/// KiB per session with the default and 9.2-9.3 KiB with two arenas. Called before any thread
/// starts.
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = i32::try_from(cores).unwrap_or(i32::MAX);
    // SAFETY: mallopt only changes a malloc tunable; it runs before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

async fn resolve_all(
    policy: &Policy,
    agent: Option<&Agent>,
) -> std::collections::HashMap<String, Vec<IpAddr>> {
    let mut out = std::collections::HashMap::new();
    for host in targets::host_names(policy) {
        let looked_up = tokio::net::lookup_host((host.clone(), 0))
            .await
            .map(|it| it.collect::<Vec<_>>());
        match looked_up {
            Ok(addrs) => {
                let mut ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
                ips.sort();
                ips.dedup();
                out.insert(host, ips);
            }
            Err(e) => {
                // Keep the last known addresses rather than dropping protection on a DNS blip.
                warn!(host, error = %e, "cannot resolve target host; keeping previous addresses");
                if let Some(prev) = agent.and_then(|a| a.resolved_snapshot().remove(&host)) {
                    out.insert(host, prev);
                }
            }
        }
    }
    out
}

async fn run_async(policy_path: PathBuf, policy: Policy) -> anyhow::Result<()> {
    let cfg = policy.agent.clone();
    // Before anything is written there: data_dir must be the agent's own.
    crate::datadir::prepare(&cfg.data_dir).context("[agent] data_dir cannot be trusted")?;
    let audit = Audit::open_journaled(&cfg.data_dir)
        .with_context(|| format!("cannot open audit log in {}", cfg.data_dir.display()))?;
    let metrics = Metrics::new();
    audit
        .health()
        .set_counter(metrics.audit_write_errors.clone());

    // Listeners first: once the kernel starts redirecting, someone must be there.
    let mut listeners = Vec::new();
    for a in &cfg.listen {
        let l =
            listen_marked(*a).with_context(|| format!("cannot listen on {a} ([agent] listen)"))?;
        listeners.push(l);
    }
    // The agent's Unix socket, for targets that name a `unix_socket` (Linux 6.7+ redirects
    // their socket there).
    let wants_unix = policy.targets.iter().any(|t| t.unix_socket.is_some());
    let unix_listener = if wants_unix {
        Some(crate::unix_accept::listen(&cfg.unix_dir).with_context(|| {
            format!(
                "cannot listen in {} ([agent] unix_dir)",
                cfg.unix_dir.display()
            )
        })?)
    } else {
        None
    };

    // The approval store before the data path: a shared store that is unreachable stops the
    // start here, before anything is attached or pinned.
    let approvals = match cfg.admin {
        Some(_) => {
            let host_id = cfg
                .host_id
                .clone()
                .unwrap_or_else(crate::approvals::pg::default_host_id);
            Some(
                approvals_setup(
                    &policy.approvals,
                    &cfg.data_dir,
                    &audit,
                    metrics.clone(),
                    host_id,
                )
                .await?,
            )
        }
        None => None,
    };

    // Subscribe to address changes before reading the addresses, so no change falls between.
    let addr_watch = sys::AddrWatch::new()?;
    let local = sys::interface_addrs()?;
    let resolved = resolve_all(&policy, None).await;
    let routes = Routes::build(&policy, &resolved, &local);
    let dp = Arc::new(
        Datapath::install(
            &cfg.listen,
            cfg.fail_mode,
            &cfg.bpf_pin_path,
            &routes,
            cfg.namespace,
        )
        .context("cannot install the eBPF data path (try `tollgate doctor`)")?,
    );
    metrics.register_datapath(dp.clone());
    match dp.enable_unix(wants_unix, &cfg.unix_dir, cfg.fail_mode, &cfg.bpf_pin_path) {
        crate::bpf::UnixRedirect::Active => {
            dp.set_unix_targets(&policy)
                .context("cannot write the protected Unix socket paths to the kernel")?;
            info!(socket = %crate::unix_redirect::agent_socket(&cfg.unix_dir).display(), "Unix sockets of targets are redirected to the agent (cgroup/connect_unix)");
        }
        crate::bpf::UnixRedirect::Unavailable(why) => {
            for t in policy.targets.iter().filter(|t| t.unix_socket.is_some()) {
                warn!(target = %t.name, %why, "the target's unix_socket is NOT redirected on this kernel (needs Linux 6.7+): close the socket to bots by its permissions (unix_socket_permissions = 0770 and unix_socket_group in postgresql.conf)");
            }
        }
        crate::bpf::UnixRedirect::NotConfigured => {}
    }
    crate::status::register_gauges(&metrics.registry, &cfg.bpf_pin_path, &cfg.data_dir)?;
    let resolver = Resolver::new(sys::cgroup2_mount()?);
    let gen_policy_approvals = policy.approvals.clone();
    // The verifier's connections to OIDC providers are the agent's own: never redirected.
    crate::oidc::set_outbound_mark(crate::bpf::AGENT_MARK);
    let mut agent = Agent::new(
        Generation { policy, routes },
        dp.clone(),
        resolver,
        audit,
        metrics.clone(),
    );
    agent.hash_key = load_or_create_key(&cfg.data_dir.join("mask.key"))?;
    agent.plane = match crate::plane::Plane::threads_from_env() {
        0 => None,
        n => Some(crate::plane::Plane::start(n).context("cannot start the session threads")?),
    };
    // Bot-side TLS, for every handler that terminates it: without a usable CA, bots' TLS
    // requests are refused (libpq's default sslmode=prefer falls back to plaintext), so this
    // is not fatal.
    agent.ca = match crate::tls::Ca::load_or_create(&cfg.data_dir) {
        Ok(ca) => Some(Arc::new(ca)),
        Err(e) => {
            warn!(error = %format!("{e:#}"), "no CA for bot-side TLS; bots asking for TLS are refused");
            None
        }
    };
    // Approvals: the broker exists when there is a way to approve (the admin listener);
    // without one, `approve` decisions are refused at once with a clear message.
    let mut admin_api = None;
    if let (Some(admin_addr), Some((broker, auth))) = (cfg.admin, approvals) {
        agent.approvals = Some(broker.clone());
        let web = crate::approvals::web::Web::from_config(
            gen_policy_approvals.as_ref().and_then(|a| a.oidc.as_ref()),
            admin_addr,
            auth.clone(),
        )?;
        admin_api = Some(Arc::new(crate::approvals::api::Admin {
            broker: Some(broker),
            auth,
            web,
            audit: Some(agent.audit.clone()),
            status: std::sync::OnceLock::new(),
        }));
    }
    agent.set_local(local);
    // The protocol handlers, built once; each registers its own metrics.
    agent.handlers = crate::handlers::registry(agent.relay_kind);
    agent.handlers.register_metrics(&metrics.registry);
    let agent = Arc::new(agent);
    if let Some(api) = &admin_api {
        let _ = api.status.set(Arc::new(crate::status::Status {
            agent: agent.clone(),
            policy_path: policy_path.clone(),
            started: std::time::Instant::now(),
            started_at: SystemTime::now(),
        }));
    }
    for (h, ips) in resolved {
        agent.set_resolved(h, ips);
    }

    if let Some(addr) = cfg.metrics {
        let l = metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ([agent] metrics)"))?;
        tokio::spawn(metrics::serve(l, metrics::metrics_handler(metrics.clone())));
    }
    if let Some(addr) = cfg.admin {
        let l = metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ([agent] admin)"))?;
        match admin_api.clone() {
            Some(api) => tokio::spawn(crate::approvals::api::serve(l, api)),
            None => tokio::spawn(metrics::serve(l, admin_handler(agent.audit.clone()))),
        };
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut accepts = Vec::new();
    for l in listeners {
        accepts.push(tokio::spawn(
            agent.clone().serve_listener(l, stop_rx.clone()),
        ));
    }
    if let Some(l) = unix_listener {
        let dp = dp.clone();
        accepts.push(tokio::spawn(crate::unix_accept::serve(
            agent.clone(),
            l,
            Arc::new(move |id| dp.unix_path(id)),
            stop_rx.clone(),
        )));
    }
    agent.audit.write(obj(json!({"event": "agent_start", "policy": policy_path.display().to_string(), "fail_mode": cfg.fail_mode.as_str(), "mode": cfg.mode.as_str(), "pid": std::process::id()})));
    info!(listen = ?cfg.listen, fail_mode = cfg.fail_mode.as_str(), mode = cfg.mode.as_str(), "tollgate running");

    tokio::spawn(watch_policy(agent.clone(), dp.clone(), policy_path.clone()));
    tokio::spawn(refresh_dns(agent.clone(), dp.clone()));
    follow_local_addrs(addr_watch, agent.clone(), dp.clone())?;

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
    }
    let _ = stop_tx.send(true);
    for a in accepts {
        let _ = a.await;
    }
    agent.tracker.close();
    let drain = agent.gen.load().policy.agent.drain_timeout;
    if tokio::time::timeout(drain, agent.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = agent.tracker.len(),
            "drain deadline passed; closing remaining sessions"
        );
    }
    // What handlers keep (pooled upstream connections): say goodbye to the servers rather
    // than vanish.
    agent.handlers.shutdown().await;
    if let Some(b) = &agent.approvals {
        b.flush();
    }
    agent.audit.write(obj(
        json!({"event": "agent_stop", "pid": std::process::id()}),
    ));
    // Everything in the journal reaches the files before the process goes.
    agent.audit.flush();
    if cfg.fail_mode == FailMode::Closed {
        info!(pins = %cfg.bpf_pin_path.display(), "stopped; protected destinations refuse connections until the agent is back (`tollgate uninstall` restores direct access)");
    }
    Ok(())
}

/// The installation's masking key: 32 random bytes, created once with mode 0600. Keeping it
/// stable keeps `hash`-masked values joinable across sessions and restarts.
fn load_or_create_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Ok(b) = std::fs::read(path) {
        if let Ok(k) = <[u8; 32]>::try_from(b.as_slice()) {
            return Ok(k);
        }
        anyhow::bail!(
            "{} is not a 32-byte key; remove it to create a new one",
            path.display()
        );
    }
    let key: [u8; 32] = rand::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&key)?;
    Ok(key)
}

/// The approval store (embedded in `data_dir`, or the shared PostgreSQL store of
/// `[approvals] store`), its webhook, and the authenticator of the admin API: the local admin
/// token, or the organisation's OIDC provider when `[approvals.oidc]` is set. A shared store
/// that cannot be reached or migrated is fatal: the agent must not start without the queue
/// its policy names.
async fn approvals_setup(
    cfg: &Option<tollgate_policy::ApprovalsConfig>,
    data_dir: &Path,
    audit: &Audit,
    metrics: Arc<Metrics>,
    host_id: String,
) -> anyhow::Result<(
    Arc<dyn crate::approvals::ApprovalStore>,
    Arc<dyn crate::approvals::auth::ApproverAuth>,
)> {
    use crate::approvals::{auth, pg::PgStore, webhook, ApprovalStore, Broker};
    let notifier = match cfg.as_ref().and_then(|a| a.webhook.as_deref()) {
        Some(url) => Some(webhook::start(url)?),
        None => None,
    };
    // The agent's own log (a clone shares the file, rotation and write health).
    let audit = Arc::new(audit.clone());
    let store: Arc<dyn ApprovalStore> = match cfg.as_ref().and_then(|a| a.store.as_deref()) {
        Some(url) => {
            let password = match cfg.as_ref().and_then(|a| a.store_password.as_ref()) {
                None => None,
                Some(tollgate_policy::StorePassword::File(p)) => {
                    Some(crate::secret::read_secret_text(p).with_context(|| {
                        format!(
                            "cannot read [approvals] store_password_file {}",
                            p.display()
                        )
                    })?)
                }
                Some(tollgate_policy::StorePassword::Env(v)) => {
                    Some(std::env::var(v).with_context(|| {
                        format!("[approvals] store_password_env: variable {v} is not set")
                    })?)
                }
            };
            PgStore::start(url, password, host_id, Some(audit), metrics, notifier)
                .await
                .context("the shared approval store is unavailable at start")?
        }
        None => Arc::new(
            Broker::open(data_dir, Some(audit), metrics, notifier)
                .context("cannot open the approvals store")?,
        ),
    };
    let auth: Arc<dyn auth::ApproverAuth> =
        if let Some(oidc) = cfg.as_ref().and_then(|a| a.oidc.as_ref()) {
            Arc::new(auth::OidcApprovers::new(oidc))
        } else {
            Arc::new(auth::LocalToken::load_or_create(data_dir).with_context(|| {
                format!(
                    "cannot create the admin token {}",
                    data_dir.join("admin.token").display()
                )
            })?)
        };
    Ok((store, auth))
}

/// A listener carrying the agent's `SO_MARK`. The connect hooks only redirect to a listener
/// with that mark, so a process that binds the port while the agent is down (any user can bind
/// a port above 1024) receives nothing: the connect is refused instead.
fn listen_marked(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    let r = socket2::SockRef::from(&sock);
    r.set_mark(crate::bpf::AGENT_MARK)?;
    if addr.is_ipv6() {
        r.set_only_v6(true)?;
    }
    // Accepted connections inherit it: the bot's leg is always on this host.
    crate::sys::unpaced_on_loopback(r, addr.ip());
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

fn admin_handler(audit: Audit) -> metrics::Handler {
    Arc::new(move |req| match req.uri().path() {
        "/healthz" | "/readyz" => metrics::health_response(Some(&audit)),
        _ => metrics::text(
            hyper::StatusCode::NOT_FOUND,
            "application/json",
            "{\"error\":\"not found\"}\n",
        ),
    })
}

/// Apply a new policy file, or keep the old one and say why.
async fn reload(agent: &Agent, dp: &Datapath, path: &Path, why: &str) {
    let result = match load_policy(path) {
        Ok(p) => {
            let resolved = resolve_all(&p, Some(agent)).await;
            for (h, ips) in &resolved {
                agent.set_resolved(h.clone(), ips.clone());
            }
            let _updating = crate::lock(&agent.routes_update);
            let routes = agent.routes_for(&p);
            match dp
                .set_routes(&routes)
                .and_then(|()| dp.set_unix_targets(&p))
            {
                Ok(()) => {
                    let old = agent.gen.load();
                    if old.policy.agent.listen != p.agent.listen
                        || old.policy.agent.fail_mode != p.agent.fail_mode
                        || old.policy.agent.namespace != p.agent.namespace
                    {
                        warn!("[agent] listen/fail_mode/namespace changes take effect after a restart");
                    }
                    if !dp.unix_active() && p.targets.iter().any(|t| t.unix_socket.is_some()) {
                        warn!("a target's unix_socket is not redirected: the agent started without one (or on a kernel before 6.7); restart it to redirect the socket");
                    }
                    // Handlers drop what the new policy makes stale (pooled connections of
                    // changed targets) before it serves sessions.
                    agent.handlers.on_reload(&old, &p);
                    agent.gen.store(Arc::new(Generation { policy: p, routes }));
                    Ok(())
                }
                Err(e) => Err(format!("cannot update kernel targets: {e}")),
            }
        }
        Err(e) => Err(format!("{e:#}")),
    };
    match result {
        Ok(()) => {
            info!(why, "policy reloaded");
            agent
                .metrics
                .policy_reloads
                .with_label_values(&["ok"])
                .inc();
            agent.audit.write(obj(
                json!({"event": "policy_reload", "result": "ok", "trigger": why}),
            ));
        }
        Err(e) => {
            error!(why, error = %e, "policy reload rejected; the previous policy stays in force");
            agent
                .metrics
                .policy_reloads
                .with_label_values(&["error"])
                .inc();
            agent.audit.write(obj(
                json!({"event": "policy_reload", "result": "error", "trigger": why, "error": e}),
            ));
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

async fn watch_policy(agent: Arc<Agent>, dp: Arc<Datapath>, path: PathBuf) {
    let mut hup = match tokio::signal::unix::signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install SIGHUP handler");
            return;
        }
    };
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // SIGHUP is also logrotate's signal: follow a renamed audit.jsonl.
                if let Err(e) = agent.audit.reopen() {
                    error!(error = %e, "cannot reopen the audit log; still writing the old file");
                }
                last = stamp(&path);
                reload(&agent, &dp, &path, "sighup").await;
            }
            _ = tick.tick() => {
                let now = stamp(&path);
                if now != last && now.is_some() {
                    last = now;
                    reload(&agent, &dp, &path, "file_changed").await;
                }
            }
        }
    }
}

async fn refresh_dns(agent: Arc<Agent>, dp: Arc<Datapath>) {
    loop {
        let every = agent.gen.load().policy.agent.dns_refresh;
        tokio::time::sleep(every).await;
        let gen = agent.gen.load_full();
        if targets::host_names(&gen.policy).is_empty() {
            continue;
        }
        let resolved = resolve_all(&gen.policy, Some(&agent)).await;
        let mut changed = false;
        for (h, ips) in resolved {
            changed |= agent.set_resolved(h, ips);
        }
        if changed {
            match update_routes(&agent, &dp) {
                Ok(()) => info!("target addresses changed in DNS; routes updated"),
                Err(e) => error!(error = %e, "cannot update kernel targets after DNS change"),
            }
        }
    }
}

/// Rebuild the current generation's routes (new resolved or local addresses), write them to
/// the kernel and swap them in.
fn update_routes(agent: &Agent, dp: &Datapath) -> Result<(), crate::bpf::BpfError> {
    let _updating = crate::lock(&agent.routes_update);
    let gen = agent.gen.load_full();
    let routes = agent.routes_for(&gen.policy);
    dp.set_routes(&routes)?;
    agent.gen.store(Arc::new(Generation {
        policy: gen.policy.clone(),
        routes,
    }));
    Ok(())
}

/// Keep the local aliases current: on every address change in this network namespace (and
/// every 10 s, in case a notification was lost) re-read the interface addresses and, if they
/// changed, rebuild the routes. A target on a local address then covers an address added
/// after the start within milliseconds. A blocking thread: netlink reads are plain recv(2).
fn follow_local_addrs(
    watch: sys::AddrWatch,
    agent: Arc<Agent>,
    dp: Arc<Datapath>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("tollgate-addrs".into())
        .spawn(move || loop {
            watch.wait(Duration::from_secs(10));
            let now = match sys::interface_addrs() {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "cannot read the interface addresses; keeping the previous ones");
                    continue;
                }
            };
            if agent.set_local(now.clone()) {
                match update_routes(&agent, &dp) {
                    Ok(()) => {
                        info!(addresses = now.len(), "interface addresses changed; local targets cover them")
                    }
                    Err(e) => {
                        error!(error = %e, "cannot update kernel targets after an address change")
                    }
                }
            }
        })
        .context("cannot start the address watcher thread")?;
    Ok(())
}
