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
        /// Only sessions started at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let r = match cli.cmd {
        Cmd::Run { policy } => run::run(&policy),
        Cmd::CheckPolicy { file } => return check_policy(&file),
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
                },
        } => data_dir(&policy, dd).and_then(|d| {
            let f = tollgate::replay::Filter {
                identity,
                target,
                since,
            };
            for l in tollgate::replay::list(&d, &f)? {
                println!("{l}");
            }
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
        Cmd::Replay {
            id,
            policy,
            data_dir: dd,
        } => data_dir(&policy, dd).and_then(|d| {
            for l in tollgate::replay::replay(&d, &id)? {
                println!("{l}");
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

fn approvals(cmd: ApprovalsCmd, conn: AdminConn) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use hyper::Method;
    use tollgate::approvals::client;
    // The policy is needed only for what the flags do not give.
    let policy = if conn.admin.is_none() || conn.token_file.is_none() {
        Some(run::load_policy(&conn.policy))
    } else {
        None
    };
    let addr = match (conn.admin, &policy) {
        (Some(a), _) => a,
        (None, Some(Ok(p))) => p.agent.admin.with_context(|| {
            format!(
                "{} has `admin = \"off\"`: the agent has no admin API (pass --admin ADDR if it runs elsewhere)",
                conn.policy.display()
            )
        })?,
        (None, Some(Err(e))) => {
            return Err(anyhow::anyhow!("{e:#}")).context("pass --admin ADDR, or --policy FILE")
        }
        (None, None) => unreachable!("policy is loaded when --admin is absent"),
    };
    let token = match (&conn.token_file, std::env::var("TOLLGATE_TOKEN")) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?,
        (None, Ok(t)) if !t.trim().is_empty() => t,
        _ => {
            let dir = match &policy {
                Some(Ok(p)) => p.agent.data_dir.clone(),
                _ => tollgate_policy::AgentConfig::default().data_dir,
            };
            let f = dir.join("admin.token");
            std::fs::read_to_string(&f).with_context(|| {
                format!(
                    "no approver token: pass --token-file FILE or set TOLLGATE_TOKEN (the local admin token {} is not readable)",
                    f.display()
                )
            })?
        }
    };
    let token = token.trim().to_string();
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
