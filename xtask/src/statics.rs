//! `cargo xtask modcycles` (second half): no handler state in a `static`.
//!
//! A protocol handler's state (pools, caches, cancel keys, CAs) is a field of the handler the
//! registry builds once (`agent/src/handlers.rs`), reached through `&self` or the `SessionCx`,
//! so a reload or shutdown reaches it and two agents in one process (the in-process tests) never
//! share it. This scan fails on any `static` item (`static`, `static mut`, a `thread_local!`
//! or `lazy_static!` entry) in the handler folders, unless [`ALLOWED`] names it with a reason.

use std::path::Path;

use anyhow::{bail, Result};

/// The handler folders under `agent/src/`.
pub const HANDLER_DIRS: &[&str] = &["pg", "ssh", "http"];

/// `(file under agent/src, static's name, why it is not handler state)`.
pub const ALLOWED: &[(&str, &str, &str)] = &[(
    "pg/inprocess.rs",
    "N",
    "test-only counter naming each in-process test's scratch directory",
)];

/// The names of the `static` items in `src` (comments left out).
pub fn statics(src: &str) -> Vec<String> {
    let src = crate::modcycles::strip_comments(src);
    let mut out = Vec::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find("static") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "static".len()..];
        // `'static` is a lifetime; `foo_static`/`staticfoo` are other words.
        if before.is_some_and(|c| c == '\'' || c.is_ascii_alphanumeric() || c == '_')
            || !rest.starts_with(char::is_whitespace)
        {
            continue;
        }
        let mut r = rest.trim_start();
        for word in ["mut", "ref"] {
            if let Some(after) = r
                .strip_prefix(word)
                .filter(|a| a.starts_with(char::is_whitespace))
            {
                r = after.trim_start();
            }
        }
        let name = crate::modcycles::ident_at(r);
        if !name.is_empty() && r[name.len()..].trim_start().starts_with(':') {
            out.push(name.to_string());
        }
    }
    out
}

/// The check: every `static` in a handler folder is on [`ALLOWED`].
pub fn check(root: &Path) -> Result<()> {
    let src = root.join("agent/src");
    let mut found = Vec::new();
    let mut scanned = 0;
    for dir in HANDLER_DIRS {
        let mut files = Vec::new();
        crate::modcycles::walk(&src.join(dir), &mut files)?;
        for f in files {
            scanned += 1;
            let rel = f.strip_prefix(&src)?.to_string_lossy().into_owned();
            for name in statics(&std::fs::read_to_string(&f)?) {
                if !ALLOWED
                    .iter()
                    .any(|(file, n, _)| *file == rel && *n == name)
                {
                    found.push(format!("{rel}: static {name}"));
                }
            }
        }
    }
    if found.is_empty() {
        println!(
            "statics: {scanned} files in agent/src/{{{}}}, no handler state in a static ({} allowed)",
            HANDLER_DIRS.join(","),
            ALLOWED.len()
        );
        return Ok(());
    }
    for f in &found {
        eprintln!("{f}");
    }
    bail!(
        "{} static(s) in handler folders: make each a field of the handler (built once in \
         agent/src/handlers.rs) or of a struct it owns, or, for a true process constant, add it to \
         ALLOWED in xtask/src/statics.rs with the reason",
        found.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_items_are_found_and_lifetimes_comments_and_words_are_not() {
        let src = r#"
static POOL: LazyLock<Mutex<u8>> = LazyLock::new(Default::default);
fn f() -> &'static str {
    static CACHE: OnceLock<u8> = OnceLock::new(); // static NOT: in a comment
    "x"
}
pub(crate) static mut COUNT: u32 = 0;
thread_local! { static BUF: RefCell<String> = RefCell::new(String::new()); }
lazy_static! { static ref SEEDS: [u8; 2] = [0, 0]; }
/// static DOC: u8
fn g(x: &'static [u8], y: Box<dyn Fn() + 'static>) {}
let not_static = 1; let staticky: u8 = 2;
"#;
        assert_eq!(statics(src), ["POOL", "CACHE", "COUNT", "BUF", "SEEDS"]);
    }

    #[test]
    fn the_agents_handler_folders_hold_no_unlisted_static() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        check(&root).expect("no handler state in a static");
    }
}
