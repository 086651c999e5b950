//! The Debian package on this machine (issue 18): `cargo xtask package` builds and lints it
//! (lintian, no errors), `dpkg -i` installs it, `systemd-analyze verify` accepts the unit, the
//! unit's own command line runs under exactly the unit's capability bounding set (setpriv: no
//! systemd runs here) and gates a bot, and `dpkg -r` stops the agent and leaves no pins or
//! processes; `dpkg -P` removes the configuration and data_dir.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use vm_tests::{
    free_port, http_get, identity_for, probe_bin, require_root, rule, tcp_target, tollgate_bin,
    unique, wait_for, Cgroup, EchoMode, EchoServer, TempDir,
};

fn repo() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .canonicalize()
        .expect("repo root")
}

fn sh(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Purges the package, stops the agent we started and unpins, whatever happened.
struct Installed {
    agent: Option<Child>,
    pin_path: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("dpkg").args(["-P", "tollgate"]).output();
        let _ = Command::new(tollgate_bin())
            .args(["uninstall", "--pin-path"])
            .arg(&self.pin_path)
            .output();
    }
}

/// `Key=value words` of a unit file's `[Service]` section (the last one wins).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .trim()
        .to_string()
}

/// CapEff of a process, as a bit mask.
fn cap_eff(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = s
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex")
}

fn cap_bit(name: &str) -> u64 {
    let n = match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("unexpected capability {other} in the unit: extend this test"),
    };
    1 << n
}

#[test]
fn deb_installs_runs_under_the_units_capabilities_and_removes_cleanly() {
    require_root();
    let (installed_already, _) = sh(Command::new("dpkg").args(["-s", "tollgate"]));
    assert!(
        !installed_already,
        "a tollgate package is already installed on this machine: remove it (dpkg -P tollgate) before running this test"
    );
    let out = TempDir::new("deb");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (ok, log) = sh(Command::new(cargo)
        .current_dir(repo())
        .args(["run", "-q", "-p", "xtask", "--", "package", "--bin"])
        .arg(tollgate_bin())
        .arg("--out")
        .arg(out.path()));
    assert!(ok, "cargo xtask package (with lintian) failed:\n{log}");
    assert!(!log.contains("\nE: "), "lintian errors:\n{log}");
    let deb = std::fs::read_dir(out.path())
        .expect("out dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("no .deb in {}:\n{log}", out.path().display()));

    let pin_path = PathBuf::from(format!("/sys/fs/bpf/tollgate-vmtest-{}", unique("pkg")));
    let mut guard = Installed {
        agent: None,
        pin_path: pin_path.clone(),
    };
    let (ok, log) = sh(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i:\n{log}");
    let data = std::fs::metadata("/var/lib/tollgate").expect("/var/lib/tollgate");
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(data.mode() & 0o7777, 0o700, "data_dir mode");
    assert_eq!(data.uid(), 0);
    let unit_path = "/lib/systemd/system/tollgate.service";
    let (ok, log) = sh(Command::new("systemd-analyze").args(["verify", unit_path]));
    assert!(
        ok && log.trim().is_empty(),
        "systemd-analyze verify:\n{log}"
    );
    // The packaged default policy is valid as shipped.
    let (ok, log) =
        sh(Command::new("/usr/bin/tollgate").args(["check-policy", "/etc/tollgate/policy.toml"]));
    assert!(ok, "{log}");

    // A policy for this test in the packaged location: an echo target, one allowed bot, one
    // intruder; pins under a test-unique path.
    let echo = EchoServer::start(EchoMode::Echo);
    let ci = Cgroup::new("pkg-ci");
    let intruder = Cgroup::new("pkg-intruder");
    let listen = free_port();
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let policy = format!(
        "[agent]\nlisten = [\"127.0.0.1:{listen}\", \"[::1]:{listen}\"]\nmetrics = \"{metrics}\"\nadmin = \"off\"\ndata_dir = \"/var/lib/tollgate\"\nbpf_pin_path = \"{}\"\nfail_mode = \"closed\"\n\n{}{}{}{}",
        pin_path.display(),
        identity_for("ci-bot", &ci),
        identity_for("intruder", &intruder),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("ci may use echo", &["ci-bot"], &["echo"], "allow"),
    );
    std::fs::write("/etc/tollgate/policy.toml", policy).expect("write policy");

    // The unit's command lines, under the unit's capability bounding set and no_new_privs.
    let unit = std::fs::read_to_string(unit_path).expect("unit");
    let caps: Vec<String> = unit_value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        unit_value(&unit, "AmbientCapabilities"),
        caps.join(" "),
        "ambient and bounding sets differ"
    );
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    assert_eq!(
        unit_value(&unit, "RestrictAddressFamilies"),
        "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    );
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    );
    let setpriv = |cmdline: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs"])
            .arg(format!("--bounding-set={bounding}"))
            .arg("--")
            .args(cmdline.split_whitespace());
        c
    };
    let (ok, log) = sh(&mut setpriv(&unit_value(&unit, "ExecStartPre")));
    assert!(ok, "ExecStartPre:\n{log}");
    let logs = TempDir::new("pkg-agent-log");
    let stderr = logs.path().join("stderr");
    let child = setpriv(&unit_value(&unit, "ExecStart"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("log"))
        .spawn()
        .expect("spawn the unit's ExecStart");
    let pid = child.id();
    guard.agent = Some(child);
    let agent_log = || std::fs::read_to_string(&stderr).unwrap_or_default();
    wait_for(
        Duration::from_secs(30),
        "the packaged agent to be ready",
        || {
            if let Some(Ok(Some(s))) = guard.agent.as_mut().map(|c| c.try_wait()) {
                panic!("the agent exited with {s}:\n{}", agent_log());
            }
            matches!(
                http_get(metrics, "/metrics", Duration::from_secs(2)),
                Ok((200, _))
            )
            .then_some(())
        },
    );
    let want: u64 = caps.iter().map(|c| cap_bit(c)).sum();
    assert_eq!(
        cap_eff(pid),
        want,
        "the agent runs with exactly the unit's capabilities"
    );
    assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"), "{caps:?}");

    // It gates: the allowed bot reaches the echo server through the agent, the intruder not.
    let args = [
        "--connect",
        &echo.v4().to_string(),
        "--send-bytes",
        "300",
        "--expect-echo",
    ];
    let r = ci.probe(probe_bin!(), &args);
    assert!(r.echo_ok(), "{r}\n{}", agent_log());
    let r = intruder.probe(probe_bin!(), &args);
    assert!(r.was_denied(), "{r}");
    let audit = std::fs::read_to_string("/var/lib/tollgate/audit.jsonl").expect("audit");
    assert!(
        audit.contains("\"identity\":\"intruder\"") && audit.contains("\"action\":\"deny\""),
        "{audit}"
    );
    // CAP_SYS_PTRACE at work: the unprivileged bot's executable was opened and verified.
    assert!(audit.contains("\"exe_verified\":true"), "{audit}");
    assert!(pin_path.join("links").is_dir(), "pins while running");

    // dpkg -r: the prerm stops the agent and unpins; nothing is left running or pinned.
    let (ok, log) = sh(Command::new("dpkg").args(["-r", "tollgate"]));
    assert!(ok, "dpkg -r:\n{log}");
    let status = guard
        .agent
        .take()
        .map(|mut c| c.wait().expect("wait"))
        .expect("agent");
    assert!(
        status.success(),
        "the agent drained and exited: {status}\n{}",
        agent_log()
    );
    assert!(
        !pin_path.exists(),
        "pins left behind at {}",
        pin_path.display()
    );
    assert!(!Path::new("/usr/bin/tollgate").exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // With the pins gone, the protected destination is reachable directly again.
    let r = intruder.probe(probe_bin!(), &args);
    assert!(r.echo_ok(), "{r}");
    // Conffiles stay until purge; purge removes them and data_dir.
    assert!(Path::new("/etc/tollgate/policy.toml").exists());
    let (ok, log) = sh(Command::new("dpkg").args(["-P", "tollgate"]));
    assert!(ok, "dpkg -P:\n{log}");
    assert!(!Path::new("/etc/tollgate").exists());
    assert!(!Path::new("/var/lib/tollgate").exists());
    drop(guard);
}
