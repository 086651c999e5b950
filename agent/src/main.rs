//! `tollgate`: the CLI over the agent library (see `lib.rs` for the layout).

use tollgate::{bpf, doctor, run};

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Least privilege for non-human identities, on the data path"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "TOLLGATE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run {
        /// The policy file (TOML).
        #[arg(long)]
        policy: PathBuf,
    },
    /// Validate a policy file; exit 1 with file:line:col messages if it is broken.
    CheckPolicy { file: PathBuf },
    /// Test a policy's `[[test]]` cases, or explain one decision, as the agent decides.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Is the agent up, and how is it doing (through its admin API).
    Status {
        #[command(flatten)]
        conn: AdminConn,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check that this host can run the agent, with the fix for each failure.
    Doctor {
        /// Also check what this policy's targets need from the host (e.g. PostgreSQL's Unix
        /// socket permissions); default /etc/tollgate/policy.toml when it exists.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// List recorded sessions.
    Sessions {
        #[command(subcommand)]
        cmd: SessionsCmd,
    },
    /// Print a recorded session as a timeline.
    Replay {
        /// Session id (from `tollgate sessions list`).
        id: String,
        /// Read `data_dir` from this policy file (default /etc/tollgate/policy.toml).
        #[arg(long, default_value = "/etc/tollgate/policy.toml")]
        policy: PathBuf,
        /// The data directory (overrides --policy).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The agent's certificate authority, which signs what bots see when they ask for TLS.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Pending and recent approval requests; approve or deny one (through the agent's admin
    /// API, with an approver's token).
    Approvals {
        #[command(subcommand)]
        cmd: ApprovalsCmd,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Remove every pinned program and map: protected destinations become directly reachable.
    Uninstall {
        /// Read `bpf_pin_path` from this policy file.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// The pin directory (default /sys/fs/bpf/tollgate).
        #[arg(long)]
        pin_path: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Check every `[[test]]` case of the policy files (directories: their *.toml); exit 1 on
    /// a failed case or a broken file, naming it.
    Test {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also print the reasoning of passing cases.
        #[arg(long, short)]
        verbose: bool,
    },
    /// What the agent would decide for one operation, and the rules it considered.
    Explain(Box<ExplainArgs>),
}

#[derive(clap::Args)]
struct ExplainArgs {
    #[arg(long, default_value = "/etc/tollgate/policy.toml")]
    policy: PathBuf,
    /// Identity name (or give kernel facts: --cgroup, --uid, --user, --exe, --comm).
    #[arg(long)]
    identity: Option<String>,
    /// cgroup v2 path of the workload, attributed to an identity as the agent does.
    #[arg(long)]
    cgroup: Option<String>,
    #[arg(long)]
    uid: Option<u32>,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    exe: Option<String>,
    #[arg(long)]
    comm: Option<String>,
    /// Target name.
    #[arg(long)]
    target: String,
    /// One SQL string, classified by the agent's classifier.
    #[arg(long, group = "op")]
    sql: Option<String>,
    /// An SSH exec command line.
    #[arg(long, group = "op")]
    ssh_exec: Option<String>,
    /// An interactive SSH shell.
    #[arg(long, group = "op")]
    ssh_shell: bool,
    /// An SSH subsystem (sftp).
    #[arg(long, group = "op")]
    ssh_subsystem: Option<String>,
    /// An HTTP request, "METHOD PATH".
    #[arg(long, group = "op")]
    http: Option<String>,
    /// Host of --http.
    #[arg(long, requires = "http")]
    host: Option<String>,
    /// A Kubernetes request, "VERB RESOURCE [NAMESPACE [NAME]] [-- COMMAND...]".
    #[arg(long, group = "op")]
    kube: Option<String>,
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// Pending requests, then the most recent decided ones.
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve request ID (with `min_approvals = N`, each distinct approver calls this).
    Approve {
        id: u64,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Deny request ID; the bot gets the comment in its error.
    Deny {
        id: u64,
        #[arg(long)]
        comment: Option<String>,
    },
}

/// Where the agent's admin API is and who is calling it.
#[derive(clap::Args)]
struct AdminConn {
    /// The agent's admin address (default: `[agent] admin` of --policy).
    #[arg(long, global = true)]
    admin: Option<std::net::SocketAddr>,
    /// The policy file to read `[agent] admin` and `data_dir` from.
    #[arg(long, global = true, default_value = "/etc/tollgate/policy.toml")]
    policy: PathBuf,
    /// A file holding the approver's bearer token (default: $TOLLGATE_TOKEN, else
    /// `<data_dir>/admin.token` when readable).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Print the CA certificate (PEM) for bots' trust stores, e.g. PostgreSQL's
    /// `sslrootcert` with `sslmode=verify-full`. Creates the CA if the agent has not yet.
    Export {
        #[arg(long, default_value = "/etc/tollgate/policy.toml")]
        policy: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the SSH CA as an `@cert-authority` line for `/etc/ssh/ssh_known_hosts`
        /// instead (ssh targets without `host_key_file` show certificates it signs).
        #[arg(long)]
        ssh: bool,
    },
    /// Trust the CA host-wide (curl, Python, Go and most clients read the system bundle):
    /// writes `<dir>/tollgate.crt` and runs Debian's `update-ca-certificates`.
    Install {
        #[arg(long, default_value = "/etc/tollgate/policy.toml")]
        policy: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where local CA certificates go.
        #[arg(long, default_value = "/usr/local/share/ca-certificates")]
        dir: PathBuf,
        /// Write the file only; do not run `update-ca-certificates`.
        #[arg(long)]
        no_update: bool,
    },
}

#[derive(Subcommand)]
enum SessionsCmd {
    /// One line per session, oldest first.
    List {
        #[arg(long, default_value = "/etc/tollgate/policy.toml")]
        policy: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only this identity.
        #[arg(long)]
        identity: Option<String>,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Only sessions started at or after this RFC 3339 time, or this long ago (`2h`).
        #[arg(long)]
        since: Option<String>,
        /// Only sessions that are: open, ended, stopped (cut off by an agent stop), crashed
        /// (cut off by an agent crash), cut-off (either), denied (had a denial), approval
        /// (had an approval request).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(tollgate::cli::sessions::STATUSES))]
        status: Option<String>,
    },
}

fn data_dir(policy: &std::path::Path, data_dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match data_dir {
        Some(d) => Ok(d),
        None => Ok(run::load_policy(policy)?.agent.data_dir),
    }
}

/// The operational log on stderr. `TOLLGATE_LOG` takes `level` and `target=level` directives,
/// comma-separated (`info`, `tollgate=debug,hyper=warn`). The filter is static: unlike
/// `EnvFilter` it keeps no per-span state, so entering a session's span on every poll of its
/// future takes no lock shared by the session threads.
fn init_logging(json: bool) {
    use tracing_subscriber::{
        filter::Targets, layer::SubscriberExt as _, util::SubscriberInitExt as _,
    };
    let spec = std::env::var("TOLLGATE_LOG").ok();
    let parsed = spec.as_deref().map(str::parse::<Targets>);
    let filter = match &parsed {
        Some(Ok(f)) => f.clone(),
        _ => Targets::new().with_default(tracing::Level::INFO),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    if let (Some(spec), Some(Err(e))) = (spec, parsed) {
        tracing::warn!(TOLLGATE_LOG = %spec, error = %e, "TOLLGATE_LOG not understood; logging at info");
    }
}

/// mimalloc: the data path allocates per message and per request (buffers, audit lines, hyper's
/// headers); glibc's malloc took 11 % of the agent's CPU under `bench http`. Counted for
/// `tollgate_heap_bytes_in_use` and `tollgate_heap_allocations_total` when asked (see `heap.rs`).
#[global_allocator]
static GLOBAL: Counted = Counted(mimalloc::MiMalloc);

struct Counted(mimalloc::MiMalloc);

// SAFETY: every call is mimalloc's, unchanged; the counting only reads the sizes.
unsafe impl std::alloc::GlobalAlloc for Counted {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.alloc(l) };
        if !p.is_null() {
            tollgate::heap::note_allocation(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { self.0.alloc_zeroed(l) };
        if !p.is_null() {
            tollgate::heap::note_allocation(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.dealloc(p, l) };
        tollgate::heap::note(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let q = unsafe { self.0.realloc(p, l, new) };
        if !q.is_null() {
            tollgate::heap::note_allocation(new as i64 - l.size() as i64);
        }
        q
    }
}

fn main() -> ExitCode {
    tollgate::heap::count_from_env();
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let r = match cli.cmd {
        Cmd::Run { policy } => run::run(&policy),
        Cmd::CheckPolicy { file } => return check_policy(&file),
        Cmd::Policy {
            cmd: PolicyCmd::Test { paths, verbose },
        } => return policy_test(&paths, verbose),
        Cmd::Policy {
            cmd: PolicyCmd::Explain(args),
        } => explain(*args),
        Cmd::Status { conn, json } => status(conn, json),
        Cmd::Doctor { policy } => return doctor::doctor(policy.as_deref()),
        Cmd::Uninstall { policy, pin_path } => uninstall(policy, pin_path),
        Cmd::Approvals { cmd, conn } => approvals(cmd, conn),
        Cmd::Sessions {
            cmd:
                SessionsCmd::List {
                    policy,
                    data_dir: dd,
                    identity,
                    target,
                    since,
                    status,
                },
        } => data_dir(&policy, dd).and_then(|d| {
            use tollgate::cli::sessions;
            let f = sessions::Filter {
                identity,
                target,
                since: since
                    .as_deref()
                    .map(sessions::parse_since)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!(e))?,
                status,
            };
            print!("{}", sessions::render(&sessions::list(&d, &f)?));
            Ok(())
        }),
        Cmd::Ca {
            cmd:
                CaCmd::Export {
                    policy,
                    data_dir: dd,
                    ssh,
                },
        } => data_dir(&policy, dd).and_then(|d| {
            if ssh {
                let ca =
                    tollgate::ssh::ca::SshCa::load_or_create(&d).map_err(anyhow::Error::msg)?;
                print!("{}", ca.authority_line().map_err(anyhow::Error::msg)?);
            } else {
                print!("{}", tollgate::tls::Ca::load_or_create(&d)?.pem());
            }
            Ok(())
        }),
        Cmd::Ca {
            cmd:
                CaCmd::Install {
                    policy,
                    data_dir: dd,
                    dir,
                    no_update,
                },
        } => data_dir(&policy, dd).and_then(|d| {
            let ca = tollgate::tls::Ca::load_or_create(&d)?;
            let path = tollgate::tls::install_ca(ca.pem(), &dir, !no_update)?;
            println!("installed the tollgate CA as {}", path.display());
            Ok(())
        }),
        Cmd::Replay {
            id,
            policy,
            data_dir: dd,
        } => data_dir(&policy, dd).and_then(|d| {
            for l in tollgate::replay::replay(&d, &id)? {
                println!("{l}");
            }
            // How it closed (or did not): from the recording and the audit log.
            let p = tollgate::replay::recording_path(&d, &id);
            let audit = tollgate::cli::sessions::AuditIndex::read(&d);
            if let Some(sum) = tollgate::cli::sessions::summarize(&p, &audit) {
                println!("{}", tollgate::cli::sessions::status_line(&sum));
            }
            Ok(())
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn policy_test(paths: &[PathBuf], verbose: bool) -> ExitCode {
    use tollgate::cli::policy;
    let files = match policy::policy_files(paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = String::new();
    let t = policy::test_files(&files, verbose, &mut out);
    print!("{out}");
    if t.failed == 0 && t.broken_files == 0 && !files.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    use tollgate_policy::{CaseFacts, CaseOp, CaseWho, SshOpKind};
    let ExplainArgs {
        policy,
        identity,
        cgroup,
        uid,
        user,
        exe,
        comm,
        target,
        sql,
        ssh_exec,
        ssh_shell,
        ssh_subsystem,
        http,
        host,
        kube,
    } = args;
    let p = run::load_policy(&policy)?;
    let facts = CaseFacts {
        cgroup,
        uid,
        user,
        exe,
        comm,
    };
    let who = match identity {
        Some(i) if facts == CaseFacts::default() => CaseWho::Identity(i),
        Some(_) => {
            anyhow::bail!("give --identity or kernel facts (--cgroup, --uid, ...), not both")
        }
        None if facts == CaseFacts::default() => {
            anyhow::bail!("say who: --identity NAME, or kernel facts such as --cgroup PATH --uid N")
        }
        None => CaseWho::Facts(facts),
    };
    let op = if let Some(s) = sql {
        CaseOp::Sql(s)
    } else if let Some(c) = ssh_exec {
        CaseOp::Ssh(SshOpKind::Exec, c)
    } else if ssh_shell {
        CaseOp::Ssh(SshOpKind::Shell, String::new())
    } else if let Some(c) = ssh_subsystem {
        CaseOp::Ssh(SshOpKind::Subsystem, c)
    } else if let Some(h) = http {
        let (method, path) = h.split_once(' ').ok_or_else(|| {
            anyhow::anyhow!("--http takes \"METHOD PATH\", e.g. \"GET /api/orders\"")
        })?;
        CaseOp::Http {
            method: method.to_string(),
            path: path.trim().to_string(),
            host: host.unwrap_or_default(),
        }
    } else if let Some(k) = kube {
        // `create pods/exec prod web-1 -- ls -l`: the words after `--` are an exec's command.
        let (k, command) = match k.split_once(" -- ") {
            Some((k, c)) => (k, Some(c.split_whitespace().map(str::to_string).collect())),
            None => (k.as_str(), None),
        };
        let mut w = k.split_whitespace().map(str::to_string);
        let (Some(verb), Some(resource)) = (w.next(), w.next()) else {
            anyhow::bail!(
                "--kube takes \"VERB RESOURCE [NAMESPACE [NAME]] [-- COMMAND...]\", e.g. \"create pods/exec prod web-1 -- ls -l\""
            );
        };
        CaseOp::Kube {
            verb,
            resource,
            namespace: w.next().unwrap_or_default(),
            name: w.next().unwrap_or_default(),
            command,
        }
    } else {
        CaseOp::Connect
    };
    if p.target(&target).is_none() {
        anyhow::bail!(
            "{} has no target \"{target}\" (targets: {})",
            policy.display(),
            p.targets
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let o = tollgate::cli::policy::evaluate(&p, &who, &target, &op);
    for l in &o.trace {
        println!("{l}");
    }
    for n in &o.notes {
        println!("note: {n}");
    }
    Ok(())
}

fn check_policy(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    match tollgate_policy::parse_all(&text, &file.display().to_string()) {
        Ok(p) => {
            print_warnings(&text, file, &p);
            warn_unix_sockets(file, &p);
            println!(
                "{}: ok ({} identities, {} targets, {} rules)",
                file.display(),
                p.identities.len(),
                p.targets.len(),
                p.rules.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// check-policy warnings (issue 12, item 10): secret files that cannot be read, cgroup globs
/// without a leading `/`, mask columns with more than two dots, overlapping targets. Printed
/// to stderr as `file:line:col: warning: ...`; they do not change the exit status.
fn print_warnings(text: &str, file: &std::path::Path, p: &tollgate_policy::Policy) {
    let name = file.display().to_string();
    let mut w = tollgate::policy_lint::policy_warnings(text, &name, p);
    w.extend(tollgate::policy_lint::secret_file_warnings(text, &name));
    for line in w {
        eprintln!("{line}");
    }
}

/// What the redirect cannot cover: a PostgreSQL target on a local address also listens on a
/// Unix socket, which only its permissions can close to bots (warnings, not errors).
fn warn_unix_sockets(file: &std::path::Path, p: &tollgate_policy::Policy) {
    let local = tollgate::sys::interface_addrs().unwrap_or_default();
    for w in tollgate::targets::unix_socket_warnings(p, &local) {
        eprintln!("{}: warning: {w}", file.display());
    }
}

fn uninstall(policy: Option<PathBuf>, pin_path: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match (pin_path, policy) {
        (Some(p), _) => p,
        (None, Some(f)) => run::load_policy(&f)?.agent.bpf_pin_path,
        (None, None) => tollgate_policy::AgentConfig::default().bpf_pin_path,
    };
    let had = bpf::pinned_links(&dir).len();
    bpf::uninstall(&dir)?;
    println!(
        "removed {had} pinned links under {}; protected destinations are now reachable directly",
        dir.display()
    );
    Ok(())
}

/// The admin address and bearer token from the flags, `TOLLGATE_TOKEN`, and only for what
/// those do not give, the policy file: with `--admin` and a token the policy is never read, so
/// a broken policy does not block approving in an incident.
fn admin_conn(conn: &AdminConn) -> anyhow::Result<(std::net::SocketAddr, String)> {
    use anyhow::Context as _;
    use tollgate::secret::read_secret_text;
    let env_token = std::env::var("TOLLGATE_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let needs_policy = conn.admin.is_none() || (conn.token_file.is_none() && env_token.is_none());
    let policy = needs_policy.then(|| run::load_policy(&conn.policy));
    let addr = match (conn.admin, &policy) {
        (Some(a), _) => a,
        (None, Some(Ok(p))) => p.agent.admin.with_context(|| {
            format!(
                "{} has `admin = \"off\"`: the agent has no admin API (pass --admin ADDR if it runs elsewhere)",
                conn.policy.display()
            )
        })?,
        (None, Some(Err(e))) => {
            return Err(anyhow::anyhow!("{e:#}")).context(
                "pass --admin ADDR (and --token-file FILE or TOLLGATE_TOKEN), or fix --policy FILE",
            )
        }
        (None, None) => anyhow::bail!("pass --admin ADDR"),
    };
    let token = match (&conn.token_file, env_token) {
        (Some(f), _) => read_secret_text(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?,
        (None, Some(t)) => t,
        (None, None) => {
            let dir = match &policy {
                Some(Ok(p)) => p.agent.data_dir.clone(),
                _ => tollgate_policy::AgentConfig::default().data_dir,
            };
            let f = dir.join("admin.token");
            read_secret_text(&f).with_context(|| {
                format!(
                    "no token: pass --token-file FILE or set TOLLGATE_TOKEN (the local admin token {} is not readable)",
                    f.display()
                )
            })?
        }
    };
    Ok((addr, token))
}

fn status(conn: AdminConn, json: bool) -> anyhow::Result<()> {
    use tollgate::approvals::client;
    let (addr, token) = admin_conn(&conn)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt
        .block_on(client::call(
            addr,
            &token,
            hyper::Method::GET,
            "/v1/status",
            None,
        ))
        .map_err(|e| anyhow::anyhow!("agent at {addr} is not answering: {e}"))?;
    let (text, healthy) = tollgate::cli::status::render(&v);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{text}");
    }
    if healthy {
        Ok(())
    } else {
        anyhow::bail!("the agent is up but not healthy (see above)")
    }
}

fn approvals(cmd: ApprovalsCmd, conn: AdminConn) -> anyhow::Result<()> {
    use hyper::Method;
    use tollgate::approvals::client;
    let (addr, token) = admin_conn(&conn)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let call = |method: Method, path: String, body: Option<serde_json::Value>| {
        rt.block_on(client::call(addr, &token, method, &path, body))
    };
    match cmd {
        ApprovalsCmd::List { json } => {
            let v = call(Method::GET, "/v1/approvals".into(), None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", client::render_list(&v)?);
            }
        }
        ApprovalsCmd::Approve { id, comment } => decide(&call, id, "approve", comment)?,
        ApprovalsCmd::Deny { id, comment } => decide(&call, id, "deny", comment)?,
    }
    Ok(())
}

fn decide(
    call: &dyn Fn(
        hyper::Method,
        String,
        Option<serde_json::Value>,
    ) -> Result<serde_json::Value, tollgate::approvals::client::ClientError>,
    id: u64,
    verb: &str,
    comment: Option<String>,
) -> anyhow::Result<()> {
    use tollgate::approvals::{client, Status};
    let v = call(
        hyper::Method::POST,
        format!("/v1/approvals/{id}/{verb}"),
        Some(serde_json::json!({ "comment": comment })),
    )?;
    let r = client::request_of(&v)?;
    match r.status {
        Status::Pending => println!(
            "approval #{id}: your approval is recorded; {} of {} distinct approvals so far",
            r.approvals.len(),
            r.min_approvals
        ),
        Status::Approved => println!(
            "approval #{id} approved: {} on {} for {} proceeds",
            r.kind,
            r.target,
            r.identity.as_deref().unwrap_or("unknown")
        ),
        Status::Denied => println!(
            "approval #{id} denied: {} gets the error{}",
            r.identity.as_deref().unwrap_or("the bot"),
            r.denied_by
                .as_ref()
                .and_then(|v| v.comment.as_deref())
                .map(|c| format!(" \"{c}\""))
                .unwrap_or_default()
        ),
        s => println!("approval #{id} is {}", s.as_str()),
    }
    Ok(())
}
