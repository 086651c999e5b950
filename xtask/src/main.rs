//! Project tasks: `cargo xtask setup | build | test | kernels | demo | bench | package`.
//!
//! Layout: `setup.rs` (toolchain, bpf-linker, Debian packages), `demo.rs` (the README demo and
//! the process/cgroup/PostgreSQL guards it needs), `bench.rs` (side-by-side ratios; `bench_pg.rs`, `bench_ssh.rs` and `bench_http.rs` per protocol),
//! `kernels.rs` (the kernel matrix under qemu), `package.rs` (the .deb), `modcycles.rs` (no import cycle between the
//! agent's modules), `statics.rs` (no handler state in a `static`), `util.rs` (process helpers).

mod bench;
mod bench_http;
mod bench_pg;
mod bench_ssh;
mod demo;
mod kernels;
mod modcycles;
mod package;
mod setup;
mod statics;
mod util;

use std::process::Command;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::util::{cargo, run};

#[derive(Parser)]
#[command(about = "tollgate project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: rust-src, bpf-linker (built against nightly's libLLVM), Debian packages.
    Setup,
    /// Build the agent with its eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: formatting, clippy, unit and in-process tests, then the real-kernel vm-tests.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the kernel matrix (`cargo xtask kernels`: Debian's 5.10, 6.1 and 6.12 under
        /// qemu), which CI runs.
        #[arg(long)]
        no_kernels: bool,
    },
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under qemu (TCG) and run a set of vm-tests in
    /// each; prints a kernel x test table (needs root).
    Kernels {
        /// Kernels to run (5.10, 6.1, 6.12); default all.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Only these tests (labels of the table); default all.
        #[arg(long)]
        only: Vec<String>,
        /// Guests at a time (each with one vCPU).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Guest memory.
        #[arg(long, default_value = "1G")]
        memory: String,
        /// Extra kernel command-line words (repeatable), e.g. `--append lsm=bpf`.
        #[arg(long)]
        append: Vec<String>,
    },
    /// Check that the agent's top-level modules import each other without a cycle, and that no
    /// handler state (agent/src/{pg,ssh,http}) is a `static`.
    Modcycles,
    /// Show the agent gating a local PostgreSQL (needs root).
    Demo,
    /// Build a Debian package (target/debian/tollgate_VERSION-1_ARCH.deb) and lint it.
    Package {
        /// Package this binary instead of a fresh release build.
        #[arg(long)]
        bin: Option<std::path::PathBuf>,
        /// Where to write the .deb (default target/debian).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Skip lintian.
        #[arg(long)]
        no_lint: bool,
    },
    /// Print side-by-side performance ratios (needs root).
    Bench {
        /// `pg` for the pgbench table, `ssh` for the SSH handler, `http` for the HTTPS handler; nothing for the interception figures.
        what: Option<String>,
        /// Run only one part: connect, first-byte or throughput; for `pg`: table, memory or
        /// approvals.
        #[arg(long)]
        only: Option<String>,
    },
}

fn build(release: bool) -> Result<()> {
    setup::setup(false)?;
    let mut c = cargo();
    c.args(["build", "-p", "tollgate"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn test(no_lint: bool, no_kernels: bool) -> Result<()> {
    if !util::is_root() {
        bail!("`cargo xtask test` includes the real-kernel vm-tests: run it as root (a skipped privileged test is a failure)");
    }
    setup::setup(true)?;
    modcycles::check(&util::root())?;
    statics::check(&util::root())?;
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--check"]))?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    build(false)?;
    let root = util::root();
    let bin = root.join("target/debug/tollgate");
    for ex in std::fs::read_dir(root.join("policy/examples"))?.flatten() {
        if ex.path().extension().is_some_and(|e| e == "toml") {
            run(Command::new(&bin).arg("check-policy").arg(ex.path()))?;
        }
    }
    // The shipped examples' [[test]] cases, decided as the agent decides.
    run(Command::new(&bin)
        .args(["policy", "test"])
        .arg(root.join("policy/examples")))?;
    // The Prometheus alerting rules, and their unit tests (one or more per alert).
    let rules = root.join("agent/dist/prometheus");
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules.join("tollgate-alerts.yml")))?;
    run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(rules.join("tollgate-alerts.test.yml")))?;
    run(cargo().args(["test", "--workspace", "--exclude", "vm-tests"]))?;
    run(cargo()
        .args([
            "test",
            "-p",
            "vm-tests",
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ])
        .env("TOLLGATE_BIN", &bin))?;
    leftovers()?;
    if no_kernels {
        println!("kernel matrix skipped (--no-kernels): run `cargo xtask kernels` before merging");
        return Ok(());
    }
    // The kernel matrix: every kernel, the whole guest set, two 1-vCPU guests at a time.
    kernels::kernels(&kernels::Options {
        kernels: Vec::new(),
        only: Vec::new(),
        jobs: 2,
        memory: "1G".into(),
        append: Vec::new(),
    })
}

/// Tests must leave no pins or cgroups behind.
fn leftovers() -> Result<()> {
    let mut left = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        left.extend(
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tollgate")),
        );
    }
    if let Ok(cg) = util::cgroup2_root() {
        if let Ok(rd) = std::fs::read_dir(cg) {
            left.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("tg-") || n.starts_with("tollgate")),
            );
        }
    }
    if !left.is_empty() {
        bail!("tests left these behind: {left:?}");
    }
    println!("no pins or cgroups left behind");
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(true),
        Cmd::Package { bin, out, no_lint } => package::package(bin, out, !no_lint).map(|_| ()),
        Cmd::Build { release } => build(release),
        Cmd::Test {
            no_lint,
            no_kernels,
        } => test(no_lint, no_kernels),
        Cmd::Kernels {
            kernels,
            only,
            jobs,
            memory,
            append,
        } => {
            setup::setup(true)?;
            kernels::kernels(&kernels::Options {
                kernels,
                only,
                jobs,
                memory,
                append,
            })
        }
        Cmd::Modcycles => {
            modcycles::check(&util::root())?;
            statics::check(&util::root())
        }
        Cmd::Demo => {
            setup::setup(true)?;
            build(false)?;
            demo::demo()
        }
        Cmd::Bench { what, only } => {
            setup::setup(true)?;
            build(true)?;
            match what.as_deref() {
                None => bench::bench(only.as_deref()),
                Some("pg") => bench_pg::bench_pg(only.as_deref()),
                Some("ssh") => bench_ssh::bench_ssh(),
                Some("http") => bench_http::bench_http(),
                Some(other) => bail!("unknown benchmark {other:?}: use `cargo xtask bench`, `cargo xtask bench pg`, `cargo xtask bench ssh` or `cargo xtask bench http`"),
            }
        }
    }
}
