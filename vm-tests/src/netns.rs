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

/// A fresh network namespace that the *calling thread* enters: `setns(2)` changes only the
/// calling thread, and the sockets it opens, the threads it starts and the processes it spawns
/// afterwards all live in the namespace. A test can so run an agent (with `namespace = "own"`,
/// see [`crate::AgentProc::start_own_netns`]), servers and bots with addresses of their own
/// (192.0.2.x, fd00::x, link-local), never the machine's. Create it first in a test, so it is
/// dropped last: the thread goes back to its namespace and the namespace is deleted.
pub struct ThreadNetns {
    pub name: String,
    home: fs::File,
}

impl ThreadNetns {
    pub fn enter(tag: &str) -> ThreadNetns {
        let name = format!("tollgate-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        // The thread's own namespace (not /proc/self, which is the main thread's).
        let home = fs::File::open("/proc/thread-self/ns/net").expect("open own netns");
        ip(&["netns", "add", &name]);
        let ns = ThreadNetns { name, home };
        ns.ip(&["link", "set", "lo", "up"]);
        let f = fs::File::open(Path::new("/run/netns").join(&ns.name)).expect("open new netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a namespace file we hold open; only this thread moves.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        ns
    }

    /// `ip -n <name> ARGS`, asserting success.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Add `addr` (a CIDR) to `dev`; IPv6 addresses skip duplicate address detection.
    pub fn add_addr(&self, addr: &str, dev: &str) {
        if addr.contains(':') {
            self.ip(&["addr", "add", addr, "dev", dev, "nodad"]);
        } else {
            self.ip(&["addr", "add", addr, "dev", dev]);
        }
    }

    /// The interface index of `dev` in this namespace (the scope id of its link-local
    /// addresses); the calling thread must be inside it.
    pub fn if_index(&self, dev: &str) -> u32 {
        let c = std::ffi::CString::new(dev).expect("no NUL");
        // SAFETY: if_nametoindex reads a NUL-terminated name; it asks this thread's namespace.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(i, 0, "no interface {dev} in {}", self.name);
        i
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) back to the namespace this thread started in.
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
