//! Passwords written into SQL never reach the audit log or a recording.
//!
//! A bot that runs `ALTER ROLE app PASSWORD 'hunter2'`, `CREATE USER MAPPING ... OPTIONS
//! (user 'u', password 'p')`, `SELECT dblink_connect('host=db password=p')` or
//! `CREATE SUBSCRIPTION ... CONNECTION 'postgresql://u:p@db/app'` puts a credential in the
//! statement's text, which the agent audits and records. Before that, the text is read with
//! PostgreSQL's own scanner (`pg_query::scan_tokens`), and these literals become
//! `'[redacted]'`:
//! - the string right after `PASSWORD` (the keyword, or `password` as an option name);
//! - a string holding `password` (a libpq connection string, JSON) or a URI with userinfo
//!   (`scheme://user:pass@host`).
//!
//! Text without `password` or `://` is passed as it is (one scan for the two words); text the
//! scanner cannot read is shown only up to the first of them.

use std::borrow::Cow;

use pg_query::protobuf::Token;

const REDACTED: &str = "'[redacted]'";

/// `sql` with its password literals redacted (borrowed when there are none).
pub fn redact(sql: &str) -> Cow<'_, str> {
    let first = [find_ci(sql, "password"), sql.find("://")]
        .into_iter()
        .flatten()
        .min();
    let Some(first) = first else {
        return Cow::Borrowed(sql);
    };
    let Ok(tokens) = pg_query::scan_tokens(sql) else {
        return Cow::Owned(format!("{}[redacted]", &sql[..first]));
    };
    let text = |t: &pg_query::protobuf::ScanToken| sql.get(t.start as usize..t.end as usize);
    let is_string = |t: &pg_query::protobuf::ScanToken| {
        t.token == Token::Sconst as i32 || t.token == Token::Usconst as i32
    };
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut after_password = false;
    for t in &tokens {
        let word = text(t).unwrap_or("");
        if is_string(t) && (after_password || secret_literal(word)) {
            spans.push((t.start as usize, t.end as usize));
        }
        after_password = t.token == Token::Password as i32
            || ((t.token == Token::Ident as i32 || t.token == Token::Uident as i32)
                && word.trim_matches('"').eq_ignore_ascii_case("password"));
    }
    if spans.is_empty() {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    for (s, e) in spans {
        if s < at || e > sql.len() || !sql.is_char_boundary(s) || !sql.is_char_boundary(e) {
            return Cow::Owned(format!("{}[redacted]", &sql[..first]));
        }
        out.push_str(&sql[at..s]);
        out.push_str(REDACTED);
        at = e;
    }
    out.push_str(&sql[at..]);
    Cow::Owned(out)
}

/// A literal that carries a password: `password` in it, or a URI with userinfo.
fn secret_literal(lit: &str) -> bool {
    if find_ci(lit, "password").is_some() {
        return true;
    }
    lit.find("://").is_some_and(|i| {
        let rest = &lit[i + 3..];
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        authority.contains('@')
    })
}

/// Where `needle` (lowercase ASCII, not empty) first occurs in `hay`, ignoring ASCII case:
/// candidates by their first byte (memchr, so a statement without one costs a vector scan).
fn find_ci(hay: &str, needle: &str) -> Option<usize> {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    let first = n[0];
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), h).find(|&i| {
        h.get(i..i + n.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_literals_are_redacted() {
        for (sql, shown) in [
            (
                "ALTER ROLE app PASSWORD 'hunter2' VALID UNTIL '2030-01-01'",
                "ALTER ROLE app PASSWORD '[redacted]' VALID UNTIL '2030-01-01'",
            ),
            (
                "create user bob with encrypted password E'hun\\'ter2'",
                "create user bob with encrypted password '[redacted]'",
            ),
            (
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', \"password\" 'p4ss')",
                "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', \"password\" '[redacted]')",
            ),
            (
                "SELECT dblink_connect('c', 'host=db user=u password=s3cret')",
                "SELECT dblink_connect('c', '[redacted]')",
            ),
            (
                "CREATE SUBSCRIPTION s CONNECTION 'postgresql://u:s3cret@db/app' PUBLICATION p",
                "CREATE SUBSCRIPTION s CONNECTION '[redacted]' PUBLICATION p",
            ),
            (
                "ALTER ROLE app PASSWORD $q$hunter2$q$",
                "ALTER ROLE app PASSWORD '[redacted]'",
            ),
        ] {
            assert_eq!(redact(sql), shown, "{sql}");
        }
    }

    #[test]
    fn other_text_is_left_alone() {
        for sql in [
            "SELECT * FROM customers",
            "SELECT password_hint FROM users",
            "SELECT 'see https://example.com/x'",
            "ALTER ROLE app PASSWORD NULL",
        ] {
            assert!(matches!(redact(sql), Cow::Borrowed(_)), "{sql}");
        }
        // Unreadable text stops where a password could begin.
        assert_eq!(
            redact("ALTER ROLE app PASSWORD 'unterminated"),
            "ALTER ROLE app [redacted]"
        );
    }
}
