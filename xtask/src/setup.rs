//! `cargo xtask setup`: idempotently install everything the build and tests need, through the
//! package registries only: rust-src for nightly, bpf-linker built against nightly's own
//! libLLVM (rebuilt when that library changes), the Debian packages the tests use, and the npm
//! packages of the test OIDC provider (`vm-tests/oidc/`, from its committed package-lock.json).

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
    "hyperfine",
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
];

pub fn setup(apt: bool) -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    if apt {
        apt_packages()?;
        oidc_provider()?;
    }
    Ok(())
}

/// `npm ci` the test OIDC provider's packages into `vm-tests/oidc/node_modules` (gitignored),
/// exactly as `package-lock.json` pins them. Skipped when the installed `oidc-provider` already
/// has the version `package.json` pins.
fn oidc_provider() -> Result<()> {
    let dir = util::root().join("vm-tests/oidc");
    let pinned = package_version(&dir.join("package.json"), "dependencies")?;
    let installed = fs::read_to_string(dir.join("node_modules/oidc-provider/package.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    if installed.as_deref() == Some(pinned.as_str()) {
        return Ok(());
    }
    eprintln!("installing oidc-provider {pinned} for the OIDC tests (npm ci)");
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(&dir))
    .context(
        "npm (Node.js) is needed for the test OIDC provider: install Debian's `nodejs` and npm",
    )
}

/// The exact version `package.json` pins for `oidc-provider` (no ranges: the lock file is the
/// truth, and this is only the cheap "already installed?" check).
fn package_version(path: &std::path::Path, section: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    v[section]["oidc-provider"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{} pins no oidc-provider version", path.display()))
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
