//! `tollgate check-policy` warnings that need the file system (the policy crate does no I/O),
//! and the printing of the policy crate's own warnings. Warnings keep the exit status 0.

use std::path::Path;

/// A warning for every `password_file`, `key_file` or `token_file` that cannot be opened for
/// reading by whoever runs `check-policy` (run it as the agent's user to see what the agent
/// will see): the agent would fail each upstream login with it.
pub fn secret_file_warnings(text: &str, file_name: &str) -> Vec<String> {
    tollgate_policy::secret_files(text, file_name)
        .into_iter()
        .filter_map(|r| {
            let why = match std::fs::metadata(&r.path) {
                Err(e) => e.to_string(),
                Ok(m) if m.is_dir() => "it is a directory".to_string(),
                Ok(_) => match std::fs::File::open(Path::new(&r.path)) {
                    Ok(_) => return None,
                    Err(e) => e.to_string(),
                },
            };
            Some(
                r.warning(format!(
                    "warning: {} \"{}\" of [credential.{}] cannot be read ({why}): every upstream login with this credential will fail",
                    r.key, r.path, r.credential
                ))
                .to_string(),
            )
        })
        .collect()
}

/// The policy crate's warnings (cgroup globs, mask columns, overlapping targets).
pub fn policy_warnings(
    text: &str,
    file_name: &str,
    policy: &tollgate_policy::Policy,
) -> Vec<String> {
    tollgate_policy::warnings(text, file_name, policy)
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_unreadable_secret_file_is_warned_and_a_readable_one_is_not() {
        let dir = std::env::temp_dir().join(format!("tg-lint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ok = dir.join("ok");
        std::fs::write(&ok, "pw\n").expect("write");
        let text = format!(
            "[credential.a]\nuser = \"u\"\npassword_file = \"{}\"\n\n[credential.b]\nuser = \"u\"\ntoken_file = \"{}\"\n\n[credential.c]\nuser = \"u\"\nkey_file = \"{}\"\n",
            ok.display(),
            dir.join("missing").display(),
            dir.display()
        );
        let w = secret_file_warnings(&text, "p.toml");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("p.toml:7:14: warning: token_file")
                && w[0].contains("[credential.b]")
                && w[0].contains("No such file"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("p.toml:11:12: warning: key_file") && w[1].contains("directory"),
            "{w:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
