//! Redirecting a PostgreSQL target's Unix socket (`unix_socket = "..."`) to the agent, on
//! Linux 6.7+ (`cgroup/connect_unix`).
//!
//! Layout:
//! - [`load_program`]: aya 0.14 can neither load a program with `expected_attach_type =
//!   BPF_CGROUP_UNIX_CONNECT` nor resolve kfuncs, so the `connect_unix` program of the embedded
//!   object is loaded here: aya-obj parses and relocates it against the maps aya created, its
//!   two placeholder calls become kfunc calls (BTF ids from `/sys/kernel/btf/vmlinux`), and
//!   `sys::prog_load_sock_addr` loads it. `bpf::Datapath` attaches and pins it like the other
//!   hooks.
//! - [`keys_for`]: the spellings of a configured path the kernel program matches.
//! - `crate::unix_accept` (apart, because it sits above the session layer while this module
//!   sits below `bpf`): the agent's own socket `<unix_dir>/agent.sock` (directory
//!   root-owned 0711, socket 0666: bots can connect after the rewrite, nobody else can bind
//!   there), accept, attribute by the client socket's cookie (unix_diag), then hand the
//!   connection to the same session code as TCP ([`crate::session::Agent::handle_attributed`])
//!   through a loopback TCP pair, and serve it upstream over the target's first IP address.

use std::{
    collections::HashSet,
    os::fd::{OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use tollgate_common::{UnixPath, KFUNC_CAST_TO_KERN_CTX, KFUNC_SET_SUN_PATH, UNIX_PATH_MAX};
use tollgate_policy::AGENT_SOCKET_NAME;

use crate::sys;

/// Why the Unix-socket redirect could not be loaded (the agent then warns, as on kernels
/// before 6.7).
#[derive(Debug, thiserror::Error)]
pub enum UnixBpfError {
    /// The kernel's BTF lacks a kfunc the program needs: Linux before 6.7.
    #[error("the kernel has no kfunc {0} (needs Linux 6.7+ with BTF)")]
    NoKfunc(&'static str),
    /// The embedded object could not be parsed or relocated.
    #[error("preparing connect_unix from the eBPF object failed: {0}")]
    Object(String),
    /// BPF_PROG_LOAD refused it; carries the verifier's last line.
    #[error("loading connect_unix failed: {0}")]
    Load(String),
}

/// BTF id of the kernel function `name` (kind FUNC) in the running kernel.
fn kfunc_id(btf: &aya_obj::btf::Btf, name: &'static str) -> Result<u32, UnixBpfError> {
    btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func)
        .map_err(|_| UnixBpfError::NoKfunc(name))
}

/// `BPF_PSEUDO_KFUNC_CALL`: `src_reg` of a call to a kernel function by BTF id.
const PSEUDO_KFUNC_CALL: u8 = 2;
const CALL: u8 = 0x85;

/// Rewrite the placeholder helper calls in `insns` into kfunc calls. Returns how many were
/// patched; any call the placeholders name but the map lacks is an error.
fn patch_kfuncs(insns: &mut [u64], ids: &[(u32, u32)]) -> usize {
    let mut n = 0;
    for w in insns.iter_mut() {
        let code = (*w & 0xff) as u8;
        let regs = ((*w >> 8) & 0xff) as u8;
        let imm = (*w >> 32) as u32;
        if code != CALL || regs >> 4 != 0 {
            continue;
        }
        if let Some((_, id)) = ids.iter().find(|(magic, _)| *magic == imm) {
            *w = sys::insn(CALL, regs & 0xf, PSEUDO_KFUNC_CALL, 0, *id as i32);
            n += 1;
        }
    }
    n
}

/// Whether this kernel has what connect_unix needs (its two kfuncs, Linux 6.7+), for
/// `doctor` and `check-policy`; the agent itself finds out by loading the program.
pub fn kernel_supports() -> Result<(), String> {
    let btf = aya_obj::btf::Btf::from_sys_fs()
        .map_err(|e| format!("no kernel BTF at /sys/kernel/btf/vmlinux ({e})"))?;
    kfunc_id(&btf, "bpf_cast_to_kern_ctx").map_err(|e| e.to_string())?;
    kfunc_id(&btf, "bpf_sock_addr_set_sun_path").map_err(|e| e.to_string())?;
    Ok(())
}

/// Whether every local user may connect to the socket at `path` (mode o+w): then a bot can
/// reach it under another spelling (its own symlink, a relative path, a bind mount in its
/// own namespace), which connect_unix, matching paths, does not see.
pub fn world_connectable(path: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.mode() & 0o002 != 0)
}

/// What to tell the operator about a target's `unix_socket` on this kernel (`kernel`: the
/// result of [`kernel_supports`]): None when it is redirected and closed to other spellings.
pub fn socket_warning(target: &str, sock: &Path, kernel: &Result<(), String>) -> Option<String> {
    let close = "close it to bots by its permissions: in postgresql.conf set \
                 `unix_socket_permissions = 0770` and `unix_socket_group` to a group no bot is in, \
                 then restart PostgreSQL";
    match kernel {
        Err(why) => Some(format!(
            "target \"{target}\" names unix_socket {} but this kernel cannot redirect Unix \
             sockets ({why}; needs Linux 6.7+): it is NOT covered by the redirect, so any bot \
             that can open it reaches the database directly; {close}",
            sock.display()
        )),
        Ok(()) if world_connectable(sock) == Some(true) => Some(format!(
            "target \"{target}\": unix_socket {} is redirected to the agent under that path \
             (and its resolved spelling), but the socket is world-connectable, so a bot that \
             names it otherwise (its own symlink, a relative path, a bind mount) reaches the \
             database directly; {close}. Redirected bots keep working: the kernel checks the \
             agent's socket, not this one",
            sock.display()
        )),
        Ok(()) => None,
    }
}

/// Load the `connect_unix` program of the eBPF `object` (`bpf::OBJECT`). `map_fds` names the descriptor of every map aya created
/// for the object (the program shares them with connect4/6).
pub fn load_program(object: &[u8], map_fds: &[(&str, RawFd)]) -> Result<OwnedFd, UnixBpfError> {
    let btf = aya_obj::btf::Btf::from_sys_fs().map_err(|e| UnixBpfError::Object(e.to_string()))?;
    let ids = [
        (
            KFUNC_CAST_TO_KERN_CTX,
            kfunc_id(&btf, "bpf_cast_to_kern_ctx")?,
        ),
        (
            KFUNC_SET_SUN_PATH,
            kfunc_id(&btf, "bpf_sock_addr_set_sun_path")?,
        ),
    ];
    let mut insns = relocated(object, map_fds)?;
    let patched = patch_kfuncs(&mut insns, &ids);
    if patched < ids.len() {
        return Err(UnixBpfError::Object(format!(
            "expected at least {} kfunc call sites in connect_unix, found {patched}",
            ids.len()
        )));
    }
    sys::prog_load_sock_addr(&insns, sys::Hook::ConnectUnix, 1 << 20).map_err(UnixBpfError::Load)
}

/// The instructions of `connect_unix` with map references and BPF-to-BPF calls resolved, as
/// aya does for the programs it loads itself.
fn relocated(object: &[u8], map_fds: &[(&str, RawFd)]) -> Result<Vec<u64>, UnixBpfError> {
    let err = |e: &dyn std::fmt::Display| UnixBpfError::Object(e.to_string());
    let mut obj = aya_obj::Object::parse(object).map_err(|e| err(&e))?;
    let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(name, m)| {
            map_fds
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, fd)| (name.clone(), *fd, m.clone()))
                .ok_or_else(|| UnixBpfError::Object(format!("no descriptor for map {name}")))
        })
        .collect::<Result<_, _>>()?;
    let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    obj.relocate_maps(maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)), &text)
        .map_err(|e| err(&e))?;
    obj.relocate_calls(&text).map_err(|e| err(&e))?;
    let prog = obj
        .programs
        .get(sys::Hook::ConnectUnix.program())
        .ok_or_else(|| UnixBpfError::Object("no connect_unix program in the object".into()))?;
    let f = obj
        .functions
        .get(&prog.function_key())
        .ok_or_else(|| UnixBpfError::Object("connect_unix has no code".into()))?;
    Ok(f.instructions
        .iter()
        .map(|i| sys::insn(i.code, i.dst_reg(), i.src_reg(), i.off, i.imm))
        .collect())
}

/// A path as the kernel program keys it (None: too long for `sun_path`).
pub fn key(path: &Path) -> Option<UnixPath> {
    use std::os::unix::ffi::OsStrExt;
    let b = path.as_os_str().as_bytes();
    if b.is_empty() || b.len() >= UNIX_PATH_MAX || b.contains(&0) {
        return None;
    }
    let mut k = UnixPath {
        bytes: [0; UNIX_PATH_MAX],
    };
    k.bytes[..b.len()].copy_from_slice(b);
    Some(k)
}

/// The spellings of a configured socket path that connect_unix matches: the path itself and,
/// when its directory resolves elsewhere (`/var/run` is a symlink to `/run` on Debian), the
/// resolved one. Any other spelling (a bot's own symlink, a relative path) is not matched:
/// see the README.
pub fn keys_for(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        if let Ok(real) = std::fs::canonicalize(dir) {
            let p = real.join(name);
            if p != path {
                out.push(p);
            }
        }
    }
    out
}

/// The agent's socket path for `unix_dir`.
pub fn agent_socket(unix_dir: &Path) -> PathBuf {
    unix_dir.join(AGENT_SOCKET_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_calls_become_kfunc_calls() {
        let mut insns = [
            sys::insn(0xbf, 6, 1, 0, 0),
            sys::insn(CALL, 0, 0, 0, KFUNC_CAST_TO_KERN_CTX as i32),
            sys::insn(CALL, 0, 0, 0, 113),
            sys::insn(CALL, 0, 0, 0, KFUNC_SET_SUN_PATH as i32),
            // A BPF-to-BPF call with the same immediate is not a placeholder.
            sys::insn(CALL, 0, 1, 0, KFUNC_SET_SUN_PATH as i32),
        ];
        let n = patch_kfuncs(
            &mut insns,
            &[(KFUNC_CAST_TO_KERN_CTX, 1111), (KFUNC_SET_SUN_PATH, 2222)],
        );
        assert_eq!(n, 2);
        assert_eq!(insns[1], sys::insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, 1111));
        assert_eq!(insns[2], sys::insn(CALL, 0, 0, 0, 113));
        assert_eq!(insns[3], sys::insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, 2222));
        assert_eq!(
            insns[4],
            sys::insn(CALL, 0, 1, 0, KFUNC_SET_SUN_PATH as i32)
        );
    }

    #[test]
    fn keys_are_nul_padded_and_bounded() {
        let k = key(Path::new("/run/postgresql/.s.PGSQL.5432")).expect("key");
        assert_eq!(&k.bytes[..30], b"/run/postgresql/.s.PGSQL.5432\0");
        assert!(k.bytes[29..].iter().all(|b| *b == 0));
        assert!(
            key(Path::new(&"/x".repeat(54))).is_none(),
            "108 bytes do not fit"
        );
        assert!(key(Path::new(&format!("/{}", "x".repeat(106)))).is_some());
    }

    #[test]
    fn a_path_under_a_symlinked_directory_also_matches_its_resolved_spelling() {
        let d = std::env::temp_dir().join(format!("tg-unix-{}", std::process::id()));
        let real = d.join("real");
        std::fs::create_dir_all(&real).expect("mkdir");
        let link = d.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let keys = keys_for(&link.join(".s.PGSQL.5432"));
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(
            keys[1],
            std::fs::canonicalize(&real)
                .expect("canon")
                .join(".s.PGSQL.5432")
        );
        std::fs::remove_dir_all(&d).expect("cleanup");
    }
}
