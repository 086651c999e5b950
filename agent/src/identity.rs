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
    pub exe: Option<String>,
    pub comm: String,
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
        Facts {
            pid: info.pid,
            uid: info.uid,
            gid: info.gid,
            user: self.user_name(info.uid),
            cgroup: self.cgroup_path(info.cgroup_id),
            cgroup_id: info.cgroup_id,
            exe: fs::read_link(format!("/proc/{}/exe", info.pid))
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
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
