//! `cargo xtask modcycles`: no import cycle between the agent's top-level modules (and, in
//! `statics.rs`, no handler state in a `static`).
//!
//! Every `crate::name` path in `agent/src` (in `use` lines and inline paths, comments left
//! out) is an edge from the file's top-level module (`pg` for `pg/handler.rs`, `proxy` for
//! `proxy/tests.rs`) to `name`. A cycle among those edges fails the check and is printed. A
//! folder (`session/`, `pg/`) is one module: its files may refer to each other freely, but a
//! handler folder may use `session`, never the other way round. A small scan rather than
//! cargo-modules: that tool needs rust-analyzer's crates and minutes per run; this reads
//! `use` lines in milliseconds and runs in `cargo xtask test`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{bail, Context, Result};

/// Top-level module of a file under `src/` (None for the crate roots).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The source with `//` comments (doc comments included) removed.
pub(crate) fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| {
            // Good enough for this codebase: no `//` inside the string literals that matter.
            match l.find("//") {
                Some(i) if !l[..i].contains('"') => &l[..i],
                _ => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a source text names through `crate::`.
pub fn crate_refs(src: &str) -> BTreeSet<String> {
    let src = strip_comments(src);
    let mut out = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find("crate::") {
        // `tollgate_policy::crate::` never occurs; a preceding identifier char means another
        // word (e.g. `foocrate::`).
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let r = rest.trim_start();
        if let Some(group) = r.strip_prefix('{') {
            // `crate::{a, b::{..}, c::d}`: the names at depth one.
            let mut depth = 1;
            let mut expect_name = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect_name = true,
                    c if depth == 1 && expect_name && !c.is_whitespace() => {
                        let name = ident_at(&group[j..]);
                        if !name.is_empty() {
                            out.insert(name.to_string());
                        }
                        expect_name = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident_at(r);
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

pub(crate) fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, files)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
    Ok(())
}

/// The module graph of the crate whose sources are in `src`.
pub fn graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = Vec::new();
    walk(src, &mut files)?;
    let mut modules = BTreeSet::new();
    for f in &files {
        if let Some(m) = f.strip_prefix(src).ok().and_then(module_of) {
            modules.insert(m);
        }
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(from) = f.strip_prefix(src).ok().and_then(module_of) else {
            continue;
        };
        let text = std::fs::read_to_string(f)?;
        let deps = g.entry(from.clone()).or_default();
        for to in crate_refs(&text) {
            // Helpers in lib.rs (`lock`, `obj`) are not modules.
            if to != from && modules.contains(&to) {
                deps.insert(to);
            }
        }
    }
    Ok(g)
}

/// Every cycle's modules (strongly connected components of more than one module).
pub fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability by DFS from each node; ~30 modules, so quadratic is fine.
    let reach = |start: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.to_string()];
        while let Some(n) = stack.pop() {
            for d in g.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|k| (k, reach(k))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for a in g.keys() {
        if done.contains(a) {
            continue;
        }
        let scc: Vec<String> = g
            .keys()
            .filter(|b| *b == a || (reachable[a].contains(*b) && reachable[*b].contains(a)))
            .cloned()
            .collect();
        if scc.len() > 1 {
            done.extend(scc.iter().cloned());
            out.push(scc);
        }
    }
    out
}

/// The check: fails naming each cycle and the edges inside it.
pub fn check(root: &Path) -> Result<()> {
    let src = root.join("agent/src");
    let g = graph(&src)?;
    let found = cycles(&g);
    if found.is_empty() {
        println!("modcycles: {} agent modules, no import cycle", g.len());
        return Ok(());
    }
    for scc in &found {
        eprintln!("import cycle among: {}", scc.join(", "));
        for a in scc {
            for b in g[a].iter().filter(|b| scc.contains(b)) {
                eprintln!("  {a} -> {b}");
            }
        }
    }
    bail!("{} import cycle(s) between agent modules", found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_groups_and_paths_are_found_and_comments_are_not() {
        let src = "use crate::{lock, obj};\nuse crate::{\n  audit::Line,\n  pg::{a, b::{c}},\n  proxy::X,\n};\nlet x = crate::tls::Ca::new(); // crate::doc\n/// [`crate::run`]\n";
        let r: Vec<String> = crate_refs(src).into_iter().collect();
        assert_eq!(r, ["audit", "lock", "obj", "pg", "proxy", "tls"]);
    }

    #[test]
    fn a_cycle_is_found_and_a_chain_is_not() {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let e = |g: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
            g.entry(a.into()).or_default().insert(b.into());
            g.entry(b.into()).or_default();
        };
        e(&mut g, "proxy", "session");
        e(&mut g, "pg", "session");
        assert!(cycles(&g).is_empty());
        e(&mut g, "session", "pg");
        assert_eq!(
            cycles(&g),
            vec![vec!["pg".to_string(), "session".to_string()]]
        );
    }
}
