//! Network namespaces for tests, each joined to the host by a veth pair with private
//! addresses, removed on drop (also when the test panics).
//!
//! Processes are put into a namespace with `setns(CLONE_NEWNET)` only (see
//! [`crate::Cgroup::command_in_netns`] and [`NetNs::command`]), never with `ip netns exec`,
//! which also unshares the mount namespace and remounts /sys, hiding the cgroup2 and bpffs
//! mounts the agent needs.

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`ip netns add`) with its loopback up and one veth pair to the
/// host: `host_addr` on the host side, `ns_addr` inside, in a /30.
pub struct NetNs {
    pub name: String,
    /// The host side's address (reachable from inside the namespace).
    pub host_addr: Ipv4Addr,
    /// The namespace side's address (reachable from the host).
    pub ns_addr: Ipv4Addr,
    host_if: String,
}

impl NetNs {
    /// `index` picks the subnet `10.231.<index>.0/30` (1..=254); `tag` names things. The
    /// name includes the test process id, so parallel test binaries never collide.
    pub fn new(tag: &str, index: u8) -> NetNs {
        let pid = std::process::id();
        let name = format!("tollgate-{tag}-{pid}");
        // Interface names are limited to 15 bytes.
        let host_if = format!("tgh{index}x{}", pid % 100_000);
        let ns_if = format!("tgn{index}x{}", pid % 100_000);
        let host_addr = Ipv4Addr::new(10, 231, index, 1);
        let ns_addr = Ipv4Addr::new(10, 231, index, 2);
        // Leftovers of an earlier run with the same pid (a killed test) go first.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs {
            name,
            host_addr,
            ns_addr,
            host_if,
        };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            &ns.name,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ns_addr}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        // Everything else (other test subnets) goes through the host side too.
        ip(&[
            "-n",
            &ns.name,
            "route",
            "add",
            "10.231.0.0/16",
            "via",
            &host_addr.to_string(),
        ]);
        ns
    }

    /// The `/run/netns/<name>` file to `setns` into.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A `Command` for `program` that runs (as the caller's user) inside this namespace.
    pub fn command(&self, program: &Path) -> Command {
        let f = fs::File::open(self.path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()));
        let mut cmd = Command::new(program);
        // SAFETY: setns(2) in the forked child before exec; the file is owned by the closure.
        unsafe {
            cmd.pre_exec(move || {
                use std::os::fd::AsRawFd;
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, which takes the host end with it;
        // the explicit link delete covers a namespace some process still holds open.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
