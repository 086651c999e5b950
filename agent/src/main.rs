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
    Doctor,
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
enum CaCmd {
    /// Print the CA certificate (PEM) for bots' trust stores, e.g. PostgreSQL's
    /// `sslrootcert` with `sslmode=verify-full`. Creates the CA if the agent has not yet.
    Export {
        #[arg(long, default_value = "/etc/tollgate/policy.toml")]
        policy: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
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

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let r = match cli.cmd {
        Cmd::Run { policy } => run::run(&policy),
        Cmd::CheckPolicy { file } => return check_policy(&file),
        Cmd::Doctor => return doctor::doctor(),
        Cmd::Uninstall { policy, pin_path } => uninstall(policy, pin_path),
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
            cmd: CaCmd::Export {
                policy,
                data_dir: dd,
            },
        } => data_dir(&policy, dd).and_then(|d| {
            print!("{}", tollgate::tls::Ca::load_or_create(&d)?.pem());
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
