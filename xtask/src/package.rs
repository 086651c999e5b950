//! `cargo xtask package`: a Debian package of the agent, built with `dpkg-deb` from files kept
//! in `agent/dist/` (systemd unit, commented policy, logrotate file, maintainer scripts,
//! copyright), the README, the example policies, the Grafana dashboard and the Prometheus
//! alert rules. `lintian` checks it (no errors allowed).
//!
//! | installed path | from |
//! |---|---|
//! | `/usr/bin/tollgate` | the release build (or `--bin`), stripped |
//! | `/lib/systemd/system/tollgate.service` | `agent/dist/tollgate.service` |
//! | `/etc/tollgate/policy.toml` (conffile) | `agent/dist/policy.toml` |
//! | `/etc/logrotate.d/tollgate` (conffile) | `agent/dist/logrotate` |
//! | `/usr/share/doc/tollgate/` | README.md, ARCHITECTURE.md, copyright, changelog, `examples/` |
//! | `/usr/share/tollgate/` | `grafana/tollgate.json`, `prometheus/tollgate-alerts.yml` |
//! | `/var/lib/tollgate` (0700 root) | created by the postinst |

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, output, run};

/// Package a binary: `bin` (default: a fresh release build) into `out` (default
/// `target/debian`). Returns the `.deb` path.
pub fn package(bin: Option<PathBuf>, out: Option<PathBuf>, lint: bool) -> Result<PathBuf> {
    let root = util::root();
    let bin = match bin {
        Some(b) => b,
        None => {
            crate::build(true)?;
            util::release_agent()
        }
    };
    if !bin.is_file() {
        bail!("{} is not a file: build the agent first", bin.display());
    }
    let version = crate_version();
    let deb_version = format!("{version}-1");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let arch = arch.trim();
    let out = out.unwrap_or_else(|| root.join("target/debian"));
    let stage = out.join(format!("tollgate_{deb_version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clean {}", stage.display()))?;
    }
    let dist = root.join("agent/dist");
    let put = |from: &Path, to: &str, mode: u32| -> Result<()> {
        let dest = stage.join(to);
        if let Some(d) = dest.parent() {
            mkdirs(&stage, d)?;
        }
        fs::copy(from, &dest).with_context(|| format!("copy {} to {to}", from.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    };

    put(&bin, "usr/bin/tollgate", 0o755)?;
    run(Command::new("strip")
        .args([
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
        ])
        .arg(stage.join("usr/bin/tollgate")))?;
    put(
        &dist.join("tollgate.service"),
        "lib/systemd/system/tollgate.service",
        0o644,
    )?;
    put(&dist.join("policy.toml"), "etc/tollgate/policy.toml", 0o644)?;
    put(&dist.join("logrotate"), "etc/logrotate.d/tollgate", 0o644)?;
    let doc = "usr/share/doc/tollgate";
    put(
        &dist.join("debian/copyright"),
        &format!("{doc}/copyright"),
        0o644,
    )?;
    put(&root.join("README.md"), &format!("{doc}/README.md"), 0o644)?;
    put(
        &root.join("ARCHITECTURE.md"),
        &format!("{doc}/ARCHITECTURE.md"),
        0o644,
    )?;
    for ex in fs::read_dir(root.join("policy/examples"))?.flatten() {
        let p = ex.path();
        if p.extension().is_some_and(|e| e == "toml") {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            put(
                &p,
                &format!("{doc}/examples/{}", name.unwrap_or_default()),
                0o644,
            )?;
        }
    }
    put(
        &dist.join("grafana/tollgate.json"),
        "usr/share/tollgate/grafana/tollgate.json",
        0o644,
    )?;
    put(
        &dist.join("prometheus/tollgate-alerts.yml"),
        "usr/share/tollgate/prometheus/tollgate-alerts.yml",
        0o644,
    )?;
    // changelog.Debian.gz: gzip -9n, as lintian expects (no name or time stamp).
    let date = output(Command::new("date").arg("-R"))?;
    let changelog = format!(
        "tollgate ({deb_version}) unstable; urgency=medium\n\n  * Package built by `cargo xtask package`.\n\n -- tollgate maintainers <tollgate@example.invalid>  {}\n",
        date.trim()
    );
    let cl = stage.join(format!("{doc}/changelog.Debian"));
    fs::write(&cl, changelog)?;
    run(Command::new("gzip").args(["-9n"]).arg(&cl))?;
    fs::set_permissions(
        stage.join(format!("{doc}/changelog.Debian.gz")),
        fs::Permissions::from_mode(0o644),
    )?;

    let control = stage.join("DEBIAN");
    mkdirs(&stage, &control)?;
    for s in ["postinst", "prerm", "postrm"] {
        put(&dist.join("debian").join(s), &format!("DEBIAN/{s}"), 0o755)?;
    }
    fs::write(
        control.join("conffiles"),
        "/etc/logrotate.d/tollgate\n/etc/tollgate/policy.toml\n",
    )?;
    let (md5sums, size_kib) = md5sums(&stage)?;
    fs::write(control.join("md5sums"), md5sums)?;
    fs::write(
        control.join("control"),
        format!(
            "Package: tollgate\n\
             Version: {deb_version}\n\
             Architecture: {arch}\n\
             Maintainer: tollgate maintainers <tollgate@example.invalid>\n\
             Installed-Size: {size_kib}\n\
             Depends: libc6 (>= 2.34), libgcc-s1 (>= 4.2), init-system-helpers (>= 1.54~)\n\
             Recommends: logrotate\n\
             Section: net\n\
             Priority: optional\n\
             Homepage: https://example.invalid/tollgate\n\
             Description: least privilege for non-human identities, on the data path\n \
             tollgate is a host agent: an eBPF program sends every connection to a protected\n \
             target (PostgreSQL, SSH, HTTP, Kubernetes, TCP) to a local proxy that knows\n \
             which workload opened it, checks each operation against policy, holds risky\n \
             ones for human approval, injects upstream credentials, masks sensitive values,\n \
             records sessions and exports Prometheus metrics.\n"
        ),
    )?;
    for f in ["control", "conffiles", "md5sums"] {
        fs::set_permissions(control.join(f), fs::Permissions::from_mode(0o644))?;
    }
    let deb = out.join(format!("tollgate_{deb_version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    fs::remove_dir_all(&stage)?;
    if lint {
        lintian(&deb)?;
    }
    println!("{}", deb.display());
    Ok(deb)
}

/// `lintian` must report no errors (warnings are printed).
pub fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb)
        .output()
        .context("lintian (Debian package `lintian`: cargo xtask setup)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{text}");
    if !out.status.success() || text.lines().any(|l| l.starts_with("E: ")) {
        bail!("lintian found errors in {}", deb.display());
    }
    Ok(())
}

/// Create `dir` and its parents inside `stage` as 0755 (umask-independent, as lintian wants).
fn mkdirs(stage: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut d = dir.to_path_buf();
    while d.starts_with(stage) && d != stage {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        if !d.pop() {
            break;
        }
    }
    Ok(())
}

/// `DEBIAN/md5sums` of every file outside `DEBIAN/`, and the installed size in KiB.
fn md5sums(stage: &Path) -> Result<(String, u64)> {
    let mut files = Vec::new();
    collect(stage, stage, &mut files)?;
    files.sort();
    let mut sums = String::new();
    let mut bytes = 0u64;
    for rel in &files {
        let p = stage.join(rel);
        bytes += fs::metadata(&p)?.len();
        let line = output(Command::new("md5sum").arg(&p))?;
        let sum = line.split_whitespace().next().unwrap_or_default();
        let _ = writeln!(sums, "{sum}  {}", rel.display());
    }
    Ok((sums, bytes.div_ceil(1024)))
}

fn collect(stage: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)?.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(stage)?.to_path_buf();
        if rel.starts_with("DEBIAN") {
            continue;
        }
        if p.is_dir() {
            collect(stage, &p, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

/// The workspace version (xtask shares it with the agent: `version.workspace = true`).
fn crate_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
