//! Exec command matching for `ssh = { exec = [...] }`: a command is read as a POSIX shell word
//! list, and matches a pattern only when the shell upstream would run exactly those words as one
//! simple command.
//!
//! The reader is an allow-list, because the upstream login shell parses the string again and
//! anything tollgate reads differently is an injection. A command is accepted only when it is
//! plain words separated by spaces or tabs, where each word is made of
//! - unquoted characters from `A-Z a-z 0-9 _ . / : = @ % + , -` (no `~` or `#` at the start
//!   of a word is needed: both are outside the set);
//! - single-quoted text (`'...'`, any printable ASCII but `'`);
//! - double-quoted text (`"..."`, printable ASCII except `$`, `` ` ``, `\`, `!` and `"`).
//!
//! Everything else is refused with the reason: operators (`; & | && || < > ( )`), substitutions
//! (`$`, `` ` ``), redirections, newlines and other control characters, backslash escapes, glob
//! characters (`* ? [ ]`: the remote shell would expand them), braces, `~`, `#`, `!`, non-ASCII
//! bytes, an unterminated quote, and a leading `NAME=value` assignment (`LD_PRELOAD=x cmd`).
//!
//! A pattern is a list of words split on whitespace. `*` inside a pattern word matches any run
//! of characters of one command word (including `/`); a final word that is exactly `*` matches
//! all remaining command words (zero or more). So `systemctl status *` matches
//! `systemctl status nginx` and `systemctl status a b`, never `systemctl status nginx; id`
//! (refused before matching) or `systemctl restart nginx`.
//!
//! The rules assume a POSIX-family login shell upstream (sh, bash, dash, zsh, ksh), whose
//! quoting rules agree on the accepted subset.

use crate::glob::{self, Pattern};

/// Why an exec command is not a plain word list (and therefore matches no pattern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// The command is empty or only blanks.
    Empty,
    /// A character the shell treats specially, outside quotes (operator, substitution,
    /// redirection, glob, escape...). Carries the character and its byte offset.
    Special(char, usize),
    /// A character refused even inside quotes (newline or other control character, non-ASCII,
    /// or `$`, `` ` ``, `\`, `!` inside double quotes). Carries the character and its offset.
    Quoted(char, usize),
    /// A quote that is never closed.
    Unterminated,
    /// The first word is a `NAME=value` assignment, which changes the command's environment.
    Assignment,
    /// The first word is a shell reserved word (`if`, `for`, `time`, `coproc`...), which would
    /// make the rest compound syntax rather than one simple command.
    Reserved,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Empty => f.write_str("empty command"),
            CommandError::Special(c, at) => {
                write!(
                    f,
                    "shell syntax {c:?} at byte {at} (only plain words match)"
                )
            }
            CommandError::Quoted(c, at) => {
                write!(
                    f,
                    "character {c:?} at byte {at} is not allowed in an exec command"
                )
            }
            CommandError::Unterminated => f.write_str("unterminated quote"),
            CommandError::Assignment => {
                f.write_str("leading VAR=value assignment (only plain words match)")
            }
            CommandError::Reserved => {
                f.write_str("first word is a shell reserved word (only plain words match)")
            }
        }
    }
}

impl std::error::Error for CommandError {}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'_' | b'.' | b'/' | b':' | b'=' | b'@' | b'%' | b'+' | b',' | b'-'
        )
}

/// Split `command` into the words a POSIX shell would pass to the program, or say why it is not
/// a plain word list (see the module docs for what is accepted).
pub fn split_command(command: &str) -> Result<Vec<String>, CommandError> {
    let bytes = command.as_bytes();
    let mut words = Vec::new();
    let mut word: Option<Vec<u8>> = None;
    // The first word's part before any quote, to recognise `NAME=value`.
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
                i += 1;
            }
            b'\'' => {
                let w = word.get_or_insert_with(Vec::new);
                let end = bytes[i + 1..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .ok_or(CommandError::Unterminated)?;
                for (k, &c) in bytes[i + 1..i + 1 + end].iter().enumerate() {
                    if !(0x20..0x7f).contains(&c) {
                        return Err(CommandError::Quoted(char_at(command, i + 1 + k), i + 1 + k));
                    }
                    w.push(c);
                }
                i += end + 2;
            }
            b'"' => {
                let w = word.get_or_insert_with(Vec::new);
                let end = bytes[i + 1..]
                    .iter()
                    .position(|&c| c == b'"')
                    .ok_or(CommandError::Unterminated)?;
                for (k, &c) in bytes[i + 1..i + 1 + end].iter().enumerate() {
                    if !(0x20..0x7f).contains(&c) || matches!(c, b'$' | b'`' | b'\\' | b'!') {
                        return Err(CommandError::Quoted(char_at(command, i + 1 + k), i + 1 + k));
                    }
                    w.push(c);
                }
                i += end + 2;
            }
            _ if plain(b) => {
                word.get_or_insert_with(Vec::new).push(b);
                i += 1;
            }
            _ if (0x20..0x7f).contains(&b) => {
                return Err(CommandError::Special(b as char, i));
            }
            _ => return Err(CommandError::Quoted(char_at(command, i), i)),
        }
    }
    if let Some(w) = word.take() {
        words.push(w);
    }
    if words.is_empty() {
        return Err(CommandError::Empty);
    }
    if is_assignment(command) {
        return Err(CommandError::Assignment);
    }
    if RESERVED.contains(&words[0].as_slice()) {
        return Err(CommandError::Reserved);
    }
    // Every byte pushed is printable ASCII, so this cannot fail.
    Ok(words
        .into_iter()
        .map(|w| String::from_utf8_lossy(&w).into_owned())
        .collect())
}

/// Reserved words of sh, bash, ksh and zsh that can start a compound command (quoting one does
/// not help in every shell, so a quoted one is refused too).
const RESERVED: &[&[u8]] = &[
    b"case",
    b"coproc",
    b"do",
    b"done",
    b"elif",
    b"else",
    b"esac",
    b"fi",
    b"for",
    b"foreach",
    b"function",
    b"if",
    b"in",
    b"repeat",
    b"select",
    b"then",
    b"time",
    b"until",
    b"while",
];

/// The first unquoted word starts with `NAME=` (shell assignment syntax).
fn is_assignment(command: &str) -> bool {
    let s = command.trim_start_matches([' ', '\t']);
    let name_len = s
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    name_len > 0 && !s.as_bytes()[0].is_ascii_digit() && s.as_bytes().get(name_len) == Some(&b'=')
}

fn char_at(s: &str, at: usize) -> char {
    // `at` may fall inside a multi-byte character: report the byte's own value then.
    s.get(at..)
        .and_then(|t| t.chars().next())
        .unwrap_or(char::from(s.as_bytes()[at]))
}

/// One compiled `exec` pattern.
#[derive(Debug, Clone)]
pub(crate) struct ExecPattern {
    words: Box<[Pattern]>,
    /// The last pattern word was a lone `*`: the remaining command words all match.
    rest: bool,
}

impl ExecPattern {
    /// Compile `pattern`; the error says what is wrong with it.
    pub(crate) fn compile(pattern: &str) -> Result<Self, String> {
        let mut parts: Vec<&str> = pattern.split_ascii_whitespace().collect();
        if parts.is_empty() {
            return Err("empty exec pattern".into());
        }
        let rest = parts.len() > 1 && parts.last() == Some(&"*");
        if rest {
            parts.pop();
        }
        let mut words = Vec::with_capacity(parts.len());
        for p in parts {
            if p.contains(['[', ']', '{', '}', '\\']) {
                return Err(format!(
                    "exec pattern word {p:?}: only `*` and `?` are wildcards here"
                ));
            }
            words.push(glob::compile(p, false)?);
        }
        Ok(ExecPattern {
            words: words.into_boxed_slice(),
            rest,
        })
    }

    /// Whether the split command `words` matches.
    pub(crate) fn matches(&self, words: &[String]) -> bool {
        let n = self.words.len();
        let len_ok = if self.rest {
            words.len() >= n
        } else {
            words.len() == n
        };
        len_ok && self.words.iter().zip(words).all(|(p, w)| p.is_match(w))
    }
}

/// Whether `command` is a plain word list matching one of `patterns`.
pub(crate) fn any_matches(patterns: &[ExecPattern], command: &str) -> bool {
    match split_command(command) {
        Ok(words) => patterns.iter().any(|p| p.matches(&words)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests;
