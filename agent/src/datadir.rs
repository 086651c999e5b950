//! `data_dir` is the agent's own. The agent runs as root and writes the audit log, recordings,
//! its CA key and tokens there; a directory that another user can write lets that user plant
//! symlinks or files at the paths the agent writes (issue 12, item 8). At start the agent
//! creates it (0700) or checks it: owned by the agent's effective uid and not writable by
//! group or others, and the same for `sessions/`, `ca/` and the files directly in them.
//! Otherwise it refuses to start, naming the path and the fix.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// Why `data_dir` cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Someone else owns a path the agent writes.
    #[error("{path} is owned by uid {owner}, not by the agent's uid {euid}: another user could replace what the agent writes there; run `chown {euid} {path}` (or pick another [agent] data_dir)")]
    Owner { path: String, owner: u32, euid: u32 },
    /// Group or others may write it.
    #[error("{path} is writable by group or others (mode {mode:04o}): another user could plant files or symlinks the agent then writes through; run `chmod go-w {path}`")]
    Writable { path: String, mode: u32 },
    /// A symlink where the agent expects its own directory or file.
    #[error("{path} is a symbolic link: the agent does not write through links inside data_dir; remove it (`rm {path}`)")]
    Symlink { path: String },
    /// Not a directory.
    #[error("{path} is not a directory")]
    NotDir { path: String },
    /// Cannot create or read it.
    #[error("cannot create or read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Check one existing path (not following a final symlink unless `follow`).
fn check_one(path: &Path, euid: u32, follow: bool) -> Result<fs::Metadata, DataDirError> {
    let shown = || path.display().to_string();
    let md = if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    }
    .map_err(io(path))?;
    if md.file_type().is_symlink() {
        return Err(DataDirError::Symlink { path: shown() });
    }
    if md.uid() != euid {
        return Err(DataDirError::Owner {
            path: shown(),
            owner: md.uid(),
            euid,
        });
    }
    if md.mode() & 0o022 != 0 {
        return Err(DataDirError::Writable {
            path: shown(),
            mode: md.mode() & 0o7777,
        });
    }
    Ok(md)
}

/// Create `dir` (0700) if missing, then check it and its entries.
fn dir_and_entries(dir: &Path, euid: u32, follow: bool) -> Result<(), DataDirError> {
    if fs::symlink_metadata(dir).is_err() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let md = check_one(dir, euid, follow)?;
    if !md.is_dir() {
        return Err(DataDirError::NotDir {
            path: dir.display().to_string(),
        });
    }
    Ok(())
}

/// Files directly in `dir` (not recursing): owned by us and not writable by others; symlinks
/// refused.
fn files_in(dir: &Path, euid: u32) -> Result<(), DataDirError> {
    for e in fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let p: PathBuf = e.path();
        let md = fs::symlink_metadata(&p).map_err(io(&p))?;
        if md.is_dir() {
            continue;
        }
        check_one(&p, euid, false)?;
    }
    Ok(())
}

/// Create or check `data_dir`, `sessions/` and `ca/` before anything is written there. The
/// top-level `data_dir` may itself be a symlink chosen by the administrator (it is followed
/// and its target checked); nothing inside it may be one.
pub fn prepare(data_dir: &Path) -> Result<(), DataDirError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    dir_and_entries(data_dir, euid, true)?;
    files_in(data_dir, euid)?;
    for sub in ["sessions", "ca"] {
        let d = data_dir.join(sub);
        dir_and_entries(&d, euid, false)?;
    }
    // Recordings can be many: their names are random and created O_EXCL|O_NOFOLLOW, so only
    // the directory is checked; the CA's few files are checked one by one.
    files_in(&data_dir.join("ca"), euid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tg-datadir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_new_data_dir_is_created_private_and_passes() {
        let d = tmp("new").join("data");
        prepare(&d).expect("fresh data_dir");
        let mode = fs::metadata(&d).expect("md").mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(d.join("sessions").is_dir() && d.join("ca").is_dir());
        prepare(&d).expect("again");
        let _ = fs::remove_dir_all(d.parent().expect("parent"));
    }

    #[test]
    fn world_writable_dirs_and_symlinks_are_refused_with_the_fix() {
        let d = tmp("ww");
        fs::create_dir_all(&d).expect("mkdir");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = prepare(&d).expect_err("world-writable").to_string();
        assert!(e.contains(&format!("chmod go-w {}", d.display())), "{e}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::create_dir_all(d.join("sessions")).expect("mkdir");
        fs::set_permissions(d.join("sessions"), fs::Permissions::from_mode(0o1777)).expect("chmod");
        let e = prepare(&d)
            .expect_err("sessions world-writable")
            .to_string();
        assert!(e.contains("sessions") && e.contains("go-w"), "{e}");
        fs::set_permissions(d.join("sessions"), fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::symlink("/etc/passwd", d.join("audit.jsonl")).expect("symlink");
        let e = prepare(&d).expect_err("symlink").to_string();
        assert!(e.contains("symbolic link"), "{e}");
        fs::remove_file(d.join("audit.jsonl")).expect("rm");
        prepare(&d).expect("fixed");
        let _ = fs::remove_dir_all(&d);
    }
}
