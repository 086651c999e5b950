//! Turning kernel facts into a workload identity: cgroup id -> cgroup path (cached, rebuilt
//! when an unknown id shows up, so new and removed cgroups are handled), uid -> user name,
//! pid -> executable. Nothing here looks at bytes the client sent.

use crate::lock;
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use tollgate_common::ConnInfo;

/// Facts about the process that opened a connection, as recorded in the kernel.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Facts {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    /// cgroup v2 path relative to the cgroup2 mount, e.g. `/system.slice/ci.service`; None if
    /// the cgroup could not be found (then no identity matches: fail closed).
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    /// The executable's path as `/proc/<pid>/exe` names it (the process's own view: audited,
    /// but only trusted for identity when `exe_verified`).
    pub exe: Option<String>,
    /// Device and inode of the file the process runs (fstat of the opened `/proc/<pid>/exe`).
    pub exe_dev: Option<u64>,
    pub exe_ino: Option<u64>,
    /// `exe` names, in the agent's own mount namespace, the very file the process runs (same
    /// device and inode). A bind mount in the bot's namespace makes this false.
    pub exe_verified: bool,
    /// The process's user namespace is not the agent's (or could not be read).
    pub foreign_userns: bool,
    pub comm: String,
}

/// What `/proc/<pid>/exe` says about a process's executable.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExeFacts {
    pub path: Option<String>,
    pub dev_ino: Option<(u64, u64)>,
    pub verified: bool,
}

/// Open `/proc/<pid>/exe` (the file itself, whatever mount namespace the process is in) and
/// compare its device and inode with the file at the path it claims, looked up in the agent's
/// own mount namespace. Opened first and named second: a process that execs in between is
/// caught by the caller's exec-generation check.
pub fn exe_facts(pid: u32) -> ExeFacts {
    let link = format!("/proc/{pid}/exe");
    let dev_ino = fs::File::open(&link)
        .and_then(|f| f.metadata())
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let path = fs::read_link(&link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let verified = match (&path, dev_ino) {
        // lstat: the kernel's name for an executable is never a symlink, so a symlink at that
        // path in our namespace is not the file either.
        (Some(p), Some(di)) => fs::symlink_metadata(p)
            .is_ok_and(|m| m.file_type().is_file() && (m.dev(), m.ino()) == di),
        _ => false,
    };
    ExeFacts {
        path,
        dev_ino,
        verified,
    }
}

/// Whether `pid` lives in a user namespace other than the agent's. Unreadable counts as
/// foreign (fail closed for exe matching).
pub fn foreign_userns(pid: u32) -> bool {
    let ns = |p: &str| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    match (
        ns("/proc/self/ns/user"),
        ns(&format!("/proc/{pid}/ns/user")),
    ) {
        (Some(own), Some(theirs)) => own != theirs,
        _ => true,
    }
}

/// Resolves ids to names with caches.
pub struct Resolver {
    cgroup_root: PathBuf,
    cgroups: Mutex<CgroupCache>,
    users: Mutex<HashMap<u32, Option<String>>>,
}

struct CgroupCache {
    by_id: HashMap<u64, String>,
}

/// Walk the cgroup2 tree and map each directory's inode (its cgroup id) to its path.
fn scan(root: &Path) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(md) = fs::metadata(&dir) {
            let rel = dir
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.insert(md.ino(), format!("/{rel}"));
        }
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

impl Resolver {
    pub fn new(cgroup_root: PathBuf) -> Resolver {
        let by_id = scan(&cgroup_root);
        Resolver {
            cgroup_root,
            cgroups: Mutex::new(CgroupCache { by_id }),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Path of cgroup `id`. An unknown id always triggers a rescan (serialised by the lock),
    /// which also drops cgroups that have gone away: a job in a cgroup created a moment ago
    /// must be attributed, not treated as unknown.
    pub fn cgroup_path(&self, id: u64) -> Option<String> {
        let mut c = lock(&self.cgroups);
        if let Some(p) = c.by_id.get(&id) {
            return Some(p.clone());
        }
        c.by_id = scan(&self.cgroup_root);
        c.by_id.get(&id).cloned()
    }

    pub fn user_name(&self, uid: u32) -> Option<String> {
        let mut u = lock(&self.users);
        u.entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    /// All facts for a recorded connection. The executable is read from /proc while the
    /// connecting process still exists; if it is gone, `exe` is None and exe-based identities
    /// do not match (fail closed).
    pub fn facts(&self, info: &ConnInfo) -> Facts {
        let comm_len = info
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(info.comm.len());
        let exe = exe_facts(info.pid);
        Facts {
            pid: info.pid,
            uid: info.uid,
            gid: info.gid,
            user: self.user_name(info.uid),
            cgroup: self.cgroup_path(info.cgroup_id),
            cgroup_id: info.cgroup_id,
            exe: exe.path,
            exe_dev: exe.dev_ino.map(|d| d.0),
            exe_ino: exe.dev_ino.map(|d| d.1),
            exe_verified: exe.verified,
            foreign_userns: foreign_userns(info.pid),
            comm: String::from_utf8_lossy(&info.comm[..comm_len]).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_maps_inodes_to_relative_paths() {
        let dir = std::env::temp_dir().join(format!("tg-scan-{}", std::process::id()));
        fs::create_dir_all(dir.join("a/b")).expect("mkdir");
        let m = scan(&dir);
        let ino = fs::metadata(dir.join("a/b")).expect("md").ino();
        assert_eq!(m.get(&ino).map(String::as_str), Some("/a/b"));
        let root = fs::metadata(&dir).expect("md").ino();
        assert_eq!(m.get(&root).map(String::as_str), Some("/"));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn own_exe_is_verified_and_in_the_agents_user_namespace() {
        let pid = std::process::id();
        let e = exe_facts(pid);
        assert!(e.verified, "{e:?}");
        let me = fs::metadata(std::env::current_exe().expect("exe")).expect("md");
        assert_eq!(e.dev_ino, Some((me.dev(), me.ino())));
        assert!(!foreign_userns(pid));
        assert_eq!(exe_facts(u32::MAX), ExeFacts::default());
        assert!(foreign_userns(u32::MAX), "unreadable counts as foreign");
    }

    #[test]
    fn root_user_resolves() {
        let r = Resolver {
            cgroup_root: PathBuf::from("/nonexistent"),
            cgroups: Mutex::new(CgroupCache {
                by_id: HashMap::new(),
            }),
            users: Mutex::new(HashMap::new()),
        };
        assert_eq!(r.user_name(0).as_deref(), Some("root"));
        assert_eq!(r.cgroup_path(12345), None);
    }
}
