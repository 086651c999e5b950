//! `cargo xtask setup`: idempotently install everything the build and tests need, through the
//! package registries only: rust-src for nightly, bpf-linker built against nightly's own
//! libLLVM (rebuilt when that library changes), the Debian packages the tests use, and the npm
//! packages of the test OIDC provider (`vm-tests/oidc/`) and of the node-postgres client tests
//! (`vm-tests/clients/`), each from its committed package-lock.json, and the Python client
//! libraries (psycopg 3, asyncpg) in a venv.

use std::{fs, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, output, run, tools_dir};

/// Debian packages the tests, demo and benchmarks start for real.
const APT_PACKAGES: &[&str] = &[
    "postgresql",
    "postgresql-contrib",
    "prometheus",
    "pgbouncer",
    "wrk",
    // `cargo xtask bench http`: the HTTPS upstream and the reverse proxy it is compared with.
    "nginx",
    "hyperfine",
    // `cargo xtask bench pg` counts the proxies' system calls.
    "strace",
    "iproute2",
    "curl",
    "procps",
    "util-linux",
    "libclang-dev",
    // The test OIDC provider (`vm-tests/oidc/provider.mjs`) runs on Debian's Node.js.
    "nodejs",
    // Headless browser tests (the OIDC login page, the approvals web page).
    "chromium",
    "chromium-driver",
    // PostgreSQL's regression suite (`vm-tests/tests/pg_regress.rs`): pg_regress and the PGXS
    // build files, and what `apt-get source` and the test modules' build need.
    "postgresql-server-dev-15",
    "dpkg-dev",
    "make",
    "gcc",
    "python3-venv",
    // The HTTP handler's tests: Python `requests` as an unmodified bot.
    "python3-requests",
    // `cargo xtask package` and its test: lint the .deb; systemd-analyze verifies the unit.
    "lintian",
    "systemd",
    // The SSH handler's tests (`vm-tests/tests/ssh.rs`): a real sshd and the unmodified
    // OpenSSH clients, rsync and git over ssh, an interactive shell under tmux, asciinema.
    "openssh-server",
    "openssh-client",
    "openssh-sftp-server",
    "rsync",
    "git",
    "tmux",
    "asciinema",
];

pub fn setup(apt: bool) -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    if apt {
        apt_packages()?;
        npm_ci("vm-tests/oidc", "oidc-provider", "the test OIDC provider")?;
        npm_ci("vm-tests/clients", "pg", "the node-postgres client tests")?;
        pg_regress_suite()?;
        python_clients()?;
    }
    Ok(())
}

/// `npm ci` the packages of `dir` (relative to the repository) into its `node_modules`
/// (gitignored), exactly as its committed `package-lock.json` pins them: the test OIDC
/// provider (`vm-tests/oidc/`) and node-postgres (`vm-tests/clients/`). Skipped when the
/// installed `main_pkg` already has the version `package.json` pins.
fn npm_ci(dir: &str, main_pkg: &str, what: &str) -> Result<()> {
    let dir = util::root().join(dir);
    let pinned = package_version(&dir.join("package.json"), main_pkg)?;
    let installed =
        fs::read_to_string(dir.join("node_modules").join(main_pkg).join("package.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["version"].as_str().map(str::to_string));
    if installed.as_deref() == Some(pinned.as_str()) {
        return Ok(());
    }
    eprintln!("installing {main_pkg} {pinned} for {what} (npm ci)");
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(&dir))
    .with_context(|| {
        format!("npm (Node.js) is needed for {what}: install Debian's `nodejs` and npm")
    })
}

/// The exact version `package.json` pins for `pkg` in `dependencies` (no ranges: the lock file
/// is the truth, and this is only the cheap "already installed?" check).
fn package_version(path: &std::path::Path, pkg: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    v["dependencies"][pkg]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{} pins no {pkg} version", path.display()))
}

/// PostgreSQL 15's regression suite for `vm-tests/tests/pg_regress.rs`, under
/// `<tools>/pg-regress/`: the Debian source package of the installed `postgresql-15` (fetched
/// with a private apt configuration, so the host's sources and lists are untouched) and the
/// test modules (`regress.so`, `autoinc.so`, `refint.so`) built with PGXS. The stamp holds the
/// version; a server upgrade fetches and builds again.
fn pg_regress_suite() -> Result<()> {
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "postgresql-15"]))
        .context("postgresql-15 is not installed")?;
    let version = version.trim().to_string();
    let dir = tools_dir().join("pg-regress");
    let stamp = dir.join("version");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(version.as_str())
        && dir.join("src/test/regress/parallel_schedule").exists()
        && dir.join("modules/regress.so").exists()
    {
        return Ok(());
    }
    if !util::is_root() {
        bail!("PostgreSQL's regression suite is not set up: run `cargo xtask setup` as root");
    }
    eprintln!(
        "fetching PostgreSQL {version}'s source package for its regression suite (Debian deb-src)"
    );
    let _ = fs::remove_dir_all(&dir);
    let apt = dir.join("apt");
    for d in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt.join(d))?;
    }
    // Same mirror and suites as the image's own deb entries, as deb-src.
    fs::write(
        apt.join("sources.list.d/postgresql-src.sources"),
        "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
         Types: deb-src\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
         Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )?;
    let apt_opts = |c: &mut Command| {
        c.arg("-o")
            .arg("Dir::Etc::SourceList=/dev/null")
            .arg("-o")
            .arg(format!(
                "Dir::Etc::SourceParts={}",
                apt.join("sources.list.d").display()
            ))
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", apt.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt.join("cache").display()))
            .arg("-o")
            .arg("Dir::State::status=/dev/null");
    };
    let mut update = Command::new("apt-get");
    apt_opts(&mut update);
    run(update.args(["update", "-q"]))?;
    let unpack = dir.join("unpack");
    fs::create_dir_all(&unpack)?;
    // The installed version first; if the mirror cannot serve its source (a security update
    // whose files it lacks), the newest other one it lists: the regression suite of a nearby
    // minor release runs the same both ways, which is what the test compares.
    let mut showsrc = Command::new("apt-cache");
    apt_opts(&mut showsrc);
    let listed = output(showsrc.args(["showsrc", "postgresql-15"]))?;
    let mut versions = vec![version.clone()];
    let mut others: Vec<String> = listed
        .lines()
        .filter_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_string())
        .filter(|v| *v != version)
        .collect();
    others.sort_by(|a, b| {
        let newer = Command::new("dpkg")
            .args(["--compare-versions", a, "gt", b])
            .status()
            .is_ok_and(|s| s.success());
        if newer {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });
    versions.extend(others);
    let mut fetched = None;
    for v in &versions {
        let mut source = Command::new("apt-get");
        apt_opts(&mut source);
        if run(source
            .args(["source", "-q"])
            .arg(format!("postgresql-15={v}"))
            .current_dir(&unpack))
        .is_ok()
        {
            fetched = Some(v.clone());
            break;
        }
        eprintln!("the source of postgresql-15 {v} could not be fetched; trying the next one");
        let _ = fs::remove_dir_all(&unpack);
        fs::create_dir_all(&unpack)?;
    }
    let fetched = fetched.with_context(|| {
        format!("no source package of postgresql-15 could be fetched (tried {versions:?})")
    })?;
    fs::write(dir.join("source-version"), &fetched)?;
    let tree = fs::read_dir(&unpack)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("apt-get source unpacked no directory")?;
    fs::rename(&tree, dir.join("src-tree"))?;
    fs::remove_dir_all(&unpack)?;
    // Keep only what the suite needs: src/test/regress and contrib/spi.
    let tree = dir.join("src-tree");
    fs::create_dir_all(dir.join("src/test"))?;
    fs::rename(tree.join("src/test/regress"), dir.join("src/test/regress"))?;
    let modules = dir.join("modules");
    fs::create_dir_all(&modules)?;
    for (from, name) in [
        ("src/test/regress/regress.c", "regress.c"),
        ("contrib/spi/autoinc.c", "autoinc.c"),
        ("contrib/spi/refint.c", "refint.c"),
    ] {
        let from = if from.starts_with("src/test/regress") {
            dir.join(from)
        } else {
            tree.join(from)
        };
        fs::copy(from, modules.join(name))?;
    }
    fs::remove_dir_all(&tree)?;
    // contrib/spi's own Makefile sets REFINT_VERBOSE: the triggers test expects its notices.
    fs::write(
        modules.join("Makefile"),
        "MODULES = regress autoinc refint\nPG_CPPFLAGS = -DREFINT_VERBOSE\nPG_CONFIG = pg_config\n\
         PGXS := $(shell $(PG_CONFIG) --pgxs)\ninclude $(PGXS)\n",
    )?;
    run(Command::new("make")
        .args(["-s", "with_llvm=no"])
        .current_dir(&modules))
    .context("building the regression test modules (needs postgresql-server-dev-15, make, gcc)")?;
    fs::write(&stamp, &version)?;
    Ok(())
}

/// PostgreSQL client libraries for the vm-tests, pinned, in a venv under `<tools>/pyvenv`
/// (PyPI only): psycopg 3 with its binary wheel (which bundles its own libpq, 18.x: the
/// encrypted CancelRequest path of libpq 17+), and asyncpg (its own protocol implementation,
/// binary results by default).
const PY_CLIENTS: &[&str] = &["psycopg[binary]==3.3.9", "asyncpg==0.32.0"];

fn python_clients() -> Result<()> {
    let venv = tools_dir().join("pyvenv");
    let stamp = venv.join("tollgate-clients");
    let want = PY_CLIENTS.join("\n");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!("installing {PY_CLIENTS:?} into {} (pip)", venv.display());
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv))
    .context("python3 -m venv needs Debian's python3-venv")?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(PY_CLIENTS))?;
    fs::write(&stamp, want)?;
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup with a nightly toolchain is required to build the eBPF programs")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// bpf-linker linked against the libLLVM that ships with nightly rustc, so the linker's LLVM
/// equals rustc's by construction. The stamp records which library it was built against.
fn bpf_linker() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?
        .trim()
        .to_string();
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read nightly's LLVM version")?
        .to_string();
    let lib = fs::read_dir(format!("{sysroot}/lib"))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .context("nightly toolchain has no libLLVM-*.so")?;
    let lib = lib
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    let tools = tools_dir();
    let stamp = tools.join("bpf-linker.llvm");
    let want = format!("{lib}\n");
    if tools.join("bin/bpf-linker").exists()
        && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str())
    {
        return Ok(());
    }
    eprintln!("building bpf-linker 0.13.0 against {lib} (about a minute)");
    fs::create_dir_all(&tools)?;
    run(Command::new("cargo")
        .args([
            "+stable",
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .arg("--features")
        .arg(format!("llvm-{llvm_major},no-llvm-linking"))
        .arg("--root")
        .arg(&tools)
        .env(
            "RUSTFLAGS",
            format!("-L native={sysroot}/lib -l dylib={lib} -C link-arg=-Wl,-rpath,{sysroot}/lib"),
        ))?;
    fs::write(&stamp, want)?;
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_packages() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// Debian packages `cargo xtask kernels` needs: qemu (software emulation, TCG), and what
/// virtme-ng uses to build the guest's initramfs and load modules.
const KERNEL_APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "cpio",
    "busybox-static",
    "python3-venv",
];

/// virtme-ng from PyPI, pinned (1.42 is the version the TOOLCHAIN recipe verified).
const VIRTME_NG: &str = "virtme-ng==1.42";

/// Install what `cargo xtask kernels` needs and return the path of `vng`: the Debian packages
/// above, and virtme-ng in a venv under the tools dir (`<tools>/vng-venv`).
pub fn kernel_tools() -> Result<std::path::PathBuf> {
    apt_install(KERNEL_APT_PACKAGES)?;
    let venv = tools_dir().join("vng-venv");
    let vng = venv.join("bin/vng");
    let stamp = venv.join("tollgate.stamp");
    if vng.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(VIRTME_NG) {
        return Ok(vng);
    }
    eprintln!("installing {VIRTME_NG} into {}", venv.display());
    fs::create_dir_all(tools_dir())?;
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        "--disable-pip-version-check",
        VIRTME_NG,
    ]))?;
    fs::write(&stamp, VIRTME_NG)?;
    Ok(vng)
}

/// `apt-get install` the packages of `list` that are not installed yet.
pub fn apt_install(list: &[&str]) -> Result<()> {
    let missing: Vec<&str> = list
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root");
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}
