//! Reading a secret from a file: the one place a secret's trailing line end is trimmed. A leaf
//! module (it uses nothing of the crate), so the session layer's credentials, the approvals
//! (OIDC client secret, admin token, store password) and the CLI share it without an import
//! cycle.

use std::{fs, path::Path};

/// A secret file's content without trailing line ends (`\n`, `\r`: what `echo secret > file`
/// leaves). The one place a secret read from a file is trimmed: target credentials
/// (`session::credentials::read_secret`), the SSH
/// handler's `password_file`, the approval store's password, the OIDC client secret and the
/// admin token files.
pub fn read_secret_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = fs::read(path)?;
    while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        v.pop();
    }
    Ok(v)
}

/// [`read_secret_file`] as text: an error (never a lossy guess) when it is not UTF-8.
pub fn read_secret_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_secret_file(path)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text (a password or token is expected)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_trailing_line_ends_are_trimmed_and_text_must_be_utf8() {
        let dir = std::env::temp_dir().join(format!("tg-secret-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("s");
        fs::write(&f, b" pa ss\r\n\n").expect("write");
        assert_eq!(read_secret_file(&f).expect("read"), b" pa ss");
        assert_eq!(read_secret_text(&f).expect("text"), " pa ss");
        fs::write(&f, b"\xff\xfe\n").expect("write");
        assert_eq!(read_secret_file(&f).expect("read"), b"\xff\xfe");
        let e = read_secret_text(&f).expect_err("not UTF-8");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(!e.to_string().contains('\u{fffd}'), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
