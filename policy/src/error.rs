//! `PolicyError`: every problem in a policy file, as `file:line:col: message`.
//!
//! Syntax and type errors come from toml with a byte span; semantic errors carry the span of
//! the offending value (kept by `toml::Spanned` in the serde tree). Both become 1-based line
//! and column (columns count characters, not bytes). toml's own messages are reworded to name
//! the table and the fix, e.g. "unknown key `cgroups` in [[identity]] (expected one of: ...)".

use std::ops::Range;

use crate::raw::{ROOT_LABEL, TABLES};

/// A policy file problem at a position.
///
/// Display: `{file}:{line}:{col}: {message}`, line and column 1-based. `message` names the key
/// and the likely fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct PolicyError {
    /// File name as given to [`crate::parse`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl PolicyError {
    /// 1-based line.
    pub fn line(&self) -> usize {
        self.line
    }

    /// 1-based column, in characters.
    pub fn col(&self) -> usize {
        self.col
    }

    /// An error at byte `offset` of `text`.
    pub(crate) fn at(file: &str, text: &str, offset: usize, message: String) -> PolicyError {
        let (line, col) = line_col(text, offset);
        PolicyError {
            file: file.to_string(),
            line,
            col,
            message,
        }
    }

    /// A toml syntax or type error, reworded.
    pub(crate) fn from_toml(file: &str, text: &str, err: &toml::de::Error) -> PolicyError {
        let span = err.span();
        let offset = span.as_ref().map_or(0, |s| s.start);
        // toml splits some messages over lines ("invalid array\nexpected `]`").
        let flat = err
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        let message = reword(text, span, &flat);
        PolicyError::at(file, text, offset, message)
    }
}

/// 1-based (line, column) of byte `offset`; the column counts characters.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Words between backticks, in order.
fn backticked(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

/// Turn toml/serde wording into tollgate wording.
fn reword(text: &str, span: Option<Range<usize>>, msg: &str) -> String {
    let offset = span.as_ref().map_or(0, |s| s.start);
    if msg.is_empty() {
        // toml says nothing for `key =` with no value (at the end of the file).
        let before = text.get(..offset).unwrap_or(text).trim_end();
        return match (before.ends_with('='), key_before(text, offset)) {
            (true, Some(k)) => format!("`{k}` has no value: write one after `=`"),
            _ => "invalid TOML here: expected a value".to_string(),
        };
    }
    if msg.starts_with("unknown field `") {
        let words = backticked(msg);
        let Some((&key, expected)) = words.split_first() else {
            return msg.to_string();
        };
        let label = TABLES
            .iter()
            .find(|(keys, _)| *keys == expected)
            .map(|(_, label)| (*label).to_string())
            .map(|l| {
                if l.starts_with("[credential") {
                    header_at(text, offset).unwrap_or(l)
                } else {
                    l
                }
            })
            .or_else(|| header_at(text, offset))
            .unwrap_or_else(|| ROOT_LABEL.to_string());
        let place = place(&label);
        let mut out = if expected.is_empty() {
            format!("unknown key `{key}` {place} (it takes no keys)")
        } else {
            format!(
                "unknown key `{key}` {place} (expected one of: {})",
                expected.join(", ")
            )
        };
        if let Some(s) = suggest(key, expected.iter().copied()) {
            out.push_str(&format!("; did you mean `{s}`?"));
        }
        return out;
    }
    if msg.starts_with("missing field `") {
        let key = backticked(msg).first().copied().unwrap_or("?");
        let header = header_at(text, offset);
        let label = table_label_for_missing(key, header.as_deref());
        return format!("missing key `{key}` {}: add `{key} = ...`", place(&label));
    }
    if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        let key = key_before(text, offset);
        let place = place(&header_at(text, offset).unwrap_or_else(|| ROOT_LABEL.to_string()));
        return match key {
            Some(k) => format!("`{k}` {place}: {msg}"),
            None => format!("{place}: {msg}"),
        };
    }
    msg.to_string()
}

/// "in [agent]", or "at the top level".
fn place(label: &str) -> String {
    if label == ROOT_LABEL {
        "at the top level".to_string()
    } else {
        format!("in {label}")
    }
}

/// Which table is missing `key`: the enclosing header, or an inline table inside it that
/// requires `key` (e.g. `oidc = { ... }` of `[[identity]]`).
fn table_label_for_missing(key: &str, header: Option<&str>) -> String {
    let Some(header) = header else {
        return ROOT_LABEL.to_string();
    };
    let generic = generic_header(header);
    let holds = |label: &str| {
        TABLES
            .iter()
            .any(|(keys, l)| *l == label && keys.contains(&key))
    };
    if holds(&generic) {
        return header.to_string();
    }
    TABLES
        .iter()
        .find(|(keys, l)| l.ends_with(&generic) && *l != generic && keys.contains(&key))
        .map_or_else(|| header.to_string(), |(_, l)| (*l).to_string())
}

/// `[credential.orders-rw]` -> `[credential.NAME]`; other headers unchanged.
fn generic_header(header: &str) -> String {
    if header.starts_with("[credential.") {
        "[credential.NAME]".to_string()
    } else {
        header.to_string()
    }
}

/// The last `[table]` / `[[array]]` header at or before byte `offset`.
fn header_at(text: &str, offset: usize) -> Option<String> {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    // Include the line holding `offset`, which may itself be the header.
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    text[..end].lines().rev().find_map(parse_header)
}

/// `[[ identity ]] # c` -> `[[identity]]`.
fn parse_header(line: &str) -> Option<String> {
    let line = line.split('#').next().unwrap_or("").trim();
    let (inner, double) = if let Some(l) = line.strip_prefix("[[") {
        (l.strip_suffix("]]")?, true)
    } else {
        (line.strip_prefix('[')?.strip_suffix(']')?, false)
    };
    let inner = inner.trim();
    let ok = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\'' | ' '));
    if !ok {
        return None;
    }
    Some(if double {
        format!("[[{inner}]]")
    } else {
        format!("[{inner}]")
    })
}

/// The `key` of `key = value` whose value starts at or contains `offset` (same line).
fn key_before(text: &str, offset: usize) -> Option<String> {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
    let eq = line.rfind('=')?;
    let key = line[..eq].trim();
    let key = key.rsplit(['{', ',']).next().unwrap_or(key).trim();
    let key = key.trim_matches('"');
    (!key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    .then(|| key.to_string())
}

/// Edit distance counting a swap of neighbours as one edit (optimal string alignment), for
/// "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// The closest candidate within a small edit distance (a third of the word, 1 to 3 edits).
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .map(|c| {
            (
                distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one_and_in_chars() {
        let t = "ab\ncdé\nf";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 2), (1, 3));
        assert_eq!(line_col(t, 3), (2, 1));
        // 'é' is two bytes; the 'f' line starts after it.
        assert_eq!(line_col(t, 8), (3, 1));
        assert_eq!(line_col(t, 7), (2, 4));
        assert_eq!(line_col(t, 999), (3, 2));
    }

    #[test]
    fn suggestions() {
        let keys = ["name", "cgroup", "uid"];
        assert_eq!(suggest("cgroups", keys.iter().copied()), Some("cgroup"));
        assert_eq!(suggest("nmae", keys.iter().copied()), Some("name"));
        assert_eq!(suggest("zzzzzz", keys.iter().copied()), None);
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_header("[[ identity ]] # x").as_deref(),
            Some("[[identity]]")
        );
        assert_eq!(
            parse_header("[credential.a-b]").as_deref(),
            Some("[credential.a-b]")
        );
        assert_eq!(parse_header("  [1, 2],"), None);
        assert_eq!(
            header_at("[agent]\nx = 1\n[[rule]]\ny = 2", 9).as_deref(),
            Some("[agent]")
        );
    }
}
