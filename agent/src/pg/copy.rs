//! COPY ... TO STDOUT on a masked target: what the statement asked for ([`copy_outs`]), which
//! output columns column rules cover ([`CopyPlan`]), and a streaming codec for the text and CSV
//! formats ([`RowSplitter`], [`fields`], [`encode_field`]) so every value is decoded, masked
//! and re-encoded before it reaches the client.
//!
//! Layout: options from the parse tree (`copy_outs`, [`CopyOptions`]); the plan (`CopyPlan`,
//! built from the catalog in `catalog.rs`); the codec. Tests are in `copy/tests.rs`; the fuzz
//! target `agent/fuzz/fuzz_targets/pg_copy.rs` feeds arbitrary upstream bytes to the codec.
//!
//! # Why the options come from the statement
//! CopyOutResponse says only "text or binary": the delimiter, NULL string, quote and escape,
//! CSV or not, and whether a header line comes first are in the COPY statement. They are read
//! from PostgreSQL's own parse tree of the text the server receives. An option this module
//! does not know is refused (fail closed): a new option could change the output format.
//!
//! # Rows and messages
//! PostgreSQL sends one row per CopyData, but the protocol allows any split: a message may hold
//! part of a row or several rows. [`RowSplitter`] keeps the unfinished tail of a row (bounded by
//! [`MAX_ROW_LEN`]) and yields whole rows; a text-format row ends at the first raw newline (a
//! newline in a value is always written `\n`), a CSV row at the first newline outside quotes.
//!
//! # What cannot be masked, and is refused
//! - Binary format: values are typed binary; column positions could be found, but detectors
//!   could not read them. Refused on any masked target.
//! - `COPY (query) TO STDOUT` on a target with column rules: which table column an output column
//!   comes from is only known to the server (a Describe of the inner query cannot be slipped
//!   into the stream here without reordering the client's own messages). Refused; with
//!   detectors only, every value is scanned.
//! - `ENCODING` other than UTF-8: the server would then write bytes this codec cannot read.

use std::{borrow::Cow, collections::HashMap};

use pg_query::{protobuf, NodeEnum, ParserOptions};

use crate::{mask::Masker, pg::catalog::Catalog};

/// Longest unfinished row kept while waiting for the rest of it (the same cap as one message).
pub const MAX_ROW_LEN: usize = crate::pg::wire::MAX_MESSAGE_LEN;

/// Why a COPY TO STDOUT cannot be streamed masked. Every variant means "deny" (before the
/// statement runs) or "withhold the rest of the output" (mid-stream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The statement text did not parse (the classifier accepted it, so this is unexpected).
    #[error("COPY statement could not be parsed: {0}")]
    Parse(String),
    /// Binary COPY output cannot be masked.
    #[error("binary COPY output cannot be masked; use the text or CSV format")]
    Binary,
    /// An option this version does not know (or a value it cannot read).
    #[error("COPY option {0} is not supported on a masked target")]
    Option(String),
    /// An ENCODING other than UTF-8.
    #[error("COPY ENCODING {0} is not supported on a masked target; use UTF8")]
    Encoding(String),
    /// The table is not in the catalog snapshot used for column rules.
    #[error("table {0} is not in the catalog snapshot tollgate masks by (it was re-read when the statement came, unless messages were in flight); check the name or qualify it")]
    UnknownTable(String),
    /// A row from the server does not follow the format (or has an unexpected column count).
    #[error("COPY output row is malformed: {0}")]
    Malformed(&'static str),
    /// A row grew past [`MAX_ROW_LEN`].
    #[error("a COPY output row is longer than {MAX_ROW_LEN} bytes")]
    RowTooLong,
}

/// Text or CSV (binary is refused before a plan exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PostgreSQL's text format: delimiter-separated, backslash escapes, `\N` for NULL.
    Text,
    /// CSV: quoting with QUOTE/ESCAPE, NULL as an unquoted string (empty by default).
    Csv,
    /// Binary (only ever refused).
    Binary,
}

/// The format options of one COPY, with PostgreSQL's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Text, CSV or binary.
    pub format: Format,
    /// Field delimiter (one byte).
    pub delimiter: u8,
    /// How NULL is written.
    pub null: Vec<u8>,
    /// CSV quote (one byte).
    pub quote: u8,
    /// CSV escape (one byte; defaults to `quote`).
    pub escape: u8,
    /// Whether the first line is a header of column names.
    pub header: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            format: Format::Text,
            delimiter: b'\t',
            null: b"\\N".to_vec(),
            quote: b'"',
            escape: b'"',
            header: false,
        }
    }
}

/// What one COPY TO STDOUT reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `COPY [schema.]table [(columns)]`.
    Table {
        /// Schema, if written.
        schema: Option<String>,
        /// Table name (as the parser folded it).
        name: String,
        /// Listed columns, empty for "all".
        columns: Vec<String>,
    },
    /// `COPY (query)`.
    Query,
}

/// One COPY TO STDOUT statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    /// What it reads.
    pub source: Source,
    /// Its format options (or why they are refused).
    pub options: Result<CopyOptions, CopyError>,
}

/// For each statement of `sql` (aligned with [`crate::pg::classify::classify`]'s output), the
/// COPY TO STDOUT it is, if it is one.
pub fn copy_outs(sql: &str) -> Result<Vec<Option<CopyOut>>, CopyError> {
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql, ParserOptions::DEFAULT))
        .map_err(|_| CopyError::Parse("parser panic".into()))?
        .map_err(|e| CopyError::Parse(e.to_string()))?;
    Ok(parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|raw| raw.stmt.as_deref().and_then(|n| n.node.as_ref()))
        .map(|node| match node {
            NodeEnum::CopyStmt(c) if !c.is_from && !c.is_program && c.filename.is_empty() => {
                Some(copy_out(c))
            }
            _ => None,
        })
        .collect())
}

fn copy_out(c: &protobuf::CopyStmt) -> CopyOut {
    let source = match (&c.relation, c.query.is_some()) {
        (Some(r), false) => Source::Table {
            schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()),
            name: r.relname.clone(),
            columns: c
                .attlist
                .iter()
                .filter_map(|n| match n.node.as_ref() {
                    Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                    _ => None,
                })
                .collect(),
        },
        _ => Source::Query,
    };
    CopyOut {
        source,
        options: options(&c.options),
    }
}

/// The value of an option as text (`Sconst`, identifier, number or boolean).
fn arg_text(arg: &Option<Box<protobuf::Node>>) -> Option<String> {
    match arg.as_deref().and_then(|n| n.node.as_ref())? {
        NodeEnum::String(s) => Some(s.sval.clone()),
        NodeEnum::Integer(i) => Some(i.ival.to_string()),
        NodeEnum::Boolean(b) => Some(if b.boolval { "true" } else { "false" }.into()),
        NodeEnum::Float(f) => Some(f.fval.clone()),
        _ => None,
    }
}

fn one_byte(name: &str, v: Option<String>) -> Result<u8, CopyError> {
    match v.as_deref().map(str::as_bytes) {
        Some([b]) if b.is_ascii() => Ok(*b),
        _ => Err(CopyError::Option(name.to_uppercase())),
    }
}

fn options(list: &[protobuf::Node]) -> Result<CopyOptions, CopyError> {
    let mut format = Format::Text;
    let (mut delimiter, mut null, mut quote, mut escape) = (None, None, None, None);
    let mut header = false;
    for n in list {
        let Some(NodeEnum::DefElem(d)) = n.node.as_ref() else {
            return Err(CopyError::Option("(unreadable)".into()));
        };
        let name = d.defname.to_ascii_lowercase();
        match name.as_str() {
            "format" => {
                format = match arg_text(&d.arg).map(|s| s.to_ascii_lowercase()).as_deref() {
                    Some("text") => Format::Text,
                    Some("csv") => Format::Csv,
                    Some("binary") => Format::Binary,
                    _ => return Err(CopyError::Option("FORMAT".into())),
                }
            }
            "delimiter" => delimiter = Some(one_byte(&name, arg_text(&d.arg))?),
            "quote" => quote = Some(one_byte(&name, arg_text(&d.arg))?),
            "escape" => escape = Some(one_byte(&name, arg_text(&d.arg))?),
            "null" => {
                null = Some(
                    arg_text(&d.arg)
                        .ok_or_else(|| CopyError::Option("NULL".into()))?
                        .into_bytes(),
                )
            }
            "header" => {
                // defGetBoolean: no value means true. `match` is for COPY FROM only.
                header = match d.arg.as_ref() {
                    None => true,
                    Some(_) => match arg_text(&d.arg).map(|s| s.to_ascii_lowercase()).as_deref() {
                        Some("true" | "on" | "1") => true,
                        Some("false" | "off" | "0") => false,
                        _ => return Err(CopyError::Option("HEADER".into())),
                    },
                }
            }
            "encoding" => {
                let v = arg_text(&d.arg).unwrap_or_default();
                let norm: String = v
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .map(|c| c.to_ascii_lowercase())
                    .collect();
                if !matches!(norm.as_str(), "utf8" | "unicode") {
                    return Err(CopyError::Encoding(v));
                }
            }
            // Only changes which values are quoted: the decoder reads quoted values anyway.
            "force_quote" => {}
            other => return Err(CopyError::Option(other.to_uppercase())),
        }
    }
    if format == Format::Binary {
        return Err(CopyError::Binary);
    }
    let csv = format == Format::Csv;
    let delimiter = delimiter.unwrap_or(if csv { b',' } else { b'\t' });
    let quote = quote.unwrap_or(b'"');
    let o = CopyOptions {
        format,
        delimiter,
        null: null.unwrap_or_else(|| if csv { Vec::new() } else { b"\\N".to_vec() }),
        quote,
        escape: escape.unwrap_or(quote),
        header,
    };
    // PostgreSQL refuses these too; refusing them here keeps the row splitter unambiguous.
    // In text format a delimiter that is a letter or digit would read as an escape (`\n`).
    let bad = |b: u8| b == b'\n' || b == b'\r' || (!csv && b == b'\\');
    let text_bad = !csv && (o.delimiter.is_ascii_alphanumeric() || o.delimiter == b'.');
    if bad(o.delimiter)
        || text_bad
        || o.null.iter().any(|&b| b == b'\n' || b == b'\r')
        || (csv && (bad(o.quote) || bad(o.escape) || o.quote == o.delimiter))
    {
        return Err(CopyError::Option("DELIMITER/QUOTE/ESCAPE/NULL".into()));
    }
    Ok(o)
}

/// How to mask the rows of one COPY TO STDOUT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyPlan {
    /// Format options.
    pub options: CopyOptions,
    /// Output positions covered by a column rule (empty: detectors only).
    pub masked: Vec<bool>,
    /// Column counts a row may have (empty: any). A row with another count is refused, so a
    /// wrong guess about the table cannot shift masked columns onto the wrong positions.
    pub widths: Vec<usize>,
    /// Every position is covered by a column rule (`COPY (query)` whose values may derive from
    /// a masked column).
    pub mask_all: bool,
}

/// The plan for `copy` on a target masked by `masker`, with `catalog` for column rules.
/// `query_taint`: for `COPY (query)`, whether its output may carry a masked value (from the
/// statement's lineage, see `Catalog::taint`); then every value is masked, since which output
/// column is which table column is only known to the server.
pub fn plan(
    copy: &CopyOut,
    masker: &Masker,
    catalog: &Catalog,
    query_taint: bool,
) -> Result<CopyPlan, CopyError> {
    let options = copy.options.clone()?;
    if !masker.has_column_rules() {
        return Ok(CopyPlan {
            options,
            masked: Vec::new(),
            widths: Vec::new(),
            mask_all: false,
        });
    }
    let Source::Table {
        schema,
        name,
        columns,
    } = &copy.source
    else {
        return Ok(CopyPlan {
            options,
            masked: Vec::new(),
            widths: Vec::new(),
            mask_all: query_taint,
        });
    };
    // An unqualified name resolves through the session's search_path, which the client can
    // change: every table of that name is a candidate and their masked positions are merged.
    let candidates: Vec<&crate::pg::catalog::Relation> = catalog
        .relations(name)
        .iter()
        .filter(|r| schema.as_deref().is_none_or(|s| s == r.schema))
        .collect();
    if candidates.is_empty() {
        let shown = match schema {
            Some(s) => format!("{s}.{name}"),
            None => name.clone(),
        };
        return Err(CopyError::UnknownTable(shown));
    }
    let mut masked = Vec::new();
    let mut widths = Vec::new();
    let mut any_width = false;
    for r in candidates {
        // A table without masked columns keeps no column list: nothing to mask, any width.
        if r.columns.is_empty() {
            any_width = true;
            continue;
        }
        let positions: Vec<bool> = if columns.is_empty() {
            r.columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| c.masked)
                .collect()
        } else {
            // A listed column this table lacks: the server resolves which table of that name
            // is meant, and this one would fail on the missing column.
            columns
                .iter()
                .map(|col| r.columns.iter().any(|c| &c.name == col && c.masked))
                .collect()
        };
        if !widths.contains(&positions.len()) {
            widths.push(positions.len());
        }
        if masked.len() < positions.len() {
            masked.resize(positions.len(), false);
        }
        for (i, m) in positions.into_iter().enumerate() {
            masked[i] |= m;
        }
    }
    if any_width {
        widths.clear();
    }
    Ok(CopyPlan {
        options,
        masked,
        widths,
        mask_all: false,
    })
}

// ---------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------

/// Splits a stream of CopyData payloads into whole rows (each with its trailing newline).
#[derive(Debug, Default)]
pub struct RowSplitter {
    /// The unfinished tail of a row.
    pending: Vec<u8>,
    /// CSV: inside a quoted section.
    in_quotes: bool,
    /// CSV: the previous byte was an escape inside quotes (escape differs from quote).
    escaped: bool,
}

impl RowSplitter {
    /// Bytes held for an unfinished row.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Feed one payload; `row` is called with each whole row, in order. A row held over from
    /// earlier payloads is copied once; rows inside one payload are passed without copying.
    pub fn feed(
        &mut self,
        data: &[u8],
        o: &CopyOptions,
        mut row: impl FnMut(&[u8]) -> Result<(), CopyError>,
    ) -> Result<(), CopyError> {
        let csv = o.format == Format::Csv;
        let mut start = 0;
        for (i, &b) in data.iter().enumerate() {
            if csv {
                if self.escaped {
                    self.escaped = false;
                    if b == o.quote || b == o.escape {
                        continue;
                    }
                }
                if self.in_quotes && b == o.escape && o.escape != o.quote {
                    self.escaped = true;
                    continue;
                }
                if b == o.quote {
                    self.in_quotes = !self.in_quotes;
                    continue;
                }
            }
            if b == b'\n' && !self.in_quotes {
                if self.pending.is_empty() {
                    row(&data[start..=i])?;
                } else {
                    self.pending.extend_from_slice(&data[start..=i]);
                    let whole = std::mem::take(&mut self.pending);
                    row(&whole)?;
                    // Keep the allocation for the next held-over row.
                    self.pending = whole;
                    self.pending.clear();
                }
                start = i + 1;
            }
        }
        let rest = &data[start..];
        if self.pending.len() + rest.len() > MAX_ROW_LEN {
            return Err(CopyError::RowTooLong);
        }
        self.pending.extend_from_slice(rest);
        Ok(())
    }

    /// At CopyDone: the last row if it lacked a newline (PostgreSQL always ends rows with one;
    /// an unterminated quote is malformed).
    pub fn finish(&mut self) -> Result<Option<Vec<u8>>, CopyError> {
        if self.in_quotes || self.escaped {
            return Err(CopyError::Malformed("unterminated quoted value at the end"));
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        Ok(Some(std::mem::take(&mut self.pending)))
    }
}

/// One field of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    /// Its bytes as written (quotes and escapes included), to copy unchanged fields exactly.
    pub raw: &'a [u8],
    /// Its decoded value; `None` for NULL.
    pub value: Option<Cow<'a, [u8]>>,
}

/// The fields of one row (its trailing newline, if any, is ignored).
pub fn fields<'a>(row: &'a [u8], o: &CopyOptions) -> Result<Vec<Field<'a>>, CopyError> {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let (field, next) = match o.format {
            Format::Csv => csv_field(row, pos, o)?,
            _ => text_field(row, pos, o)?,
        };
        out.push(field);
        match next {
            Some(n) => pos = n,
            None => return Ok(out),
        }
    }
}

/// A text-format field starting at `pos`; the position after its delimiter, or None at the end.
fn text_field<'a>(
    row: &'a [u8],
    pos: usize,
    o: &CopyOptions,
) -> Result<(Field<'a>, Option<usize>), CopyError> {
    let mut i = pos;
    let mut escapes = false;
    while i < row.len() {
        match row[i] {
            b'\\' => {
                escapes = true;
                i += 2;
            }
            b if b == o.delimiter => break,
            _ => i += 1,
        }
    }
    let end = i.min(row.len());
    let raw = &row[pos..end];
    let next = (end < row.len()).then_some(end + 1);
    if raw == o.null.as_slice() {
        return Ok((Field { raw, value: None }, next));
    }
    let value = if escapes {
        Cow::Owned(unescape_text(raw)?)
    } else {
        Cow::Borrowed(raw)
    };
    Ok((
        Field {
            raw,
            value: Some(value),
        },
        next,
    ))
}

/// Decodes text-format backslash escapes, as COPY FROM does.
fn unescape_text(raw: &[u8]) -> Result<Vec<u8>, CopyError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&c) = raw.get(i + 1) else {
            return Err(CopyError::Malformed("backslash at the end of a row"));
        };
        i += 2;
        match c {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// A CSV field starting at `pos` (quoted sections may appear anywhere in it, as PostgreSQL's
/// reader allows); the position after its delimiter, or None at the end.
fn csv_field<'a>(
    row: &'a [u8],
    pos: usize,
    o: &CopyOptions,
) -> Result<(Field<'a>, Option<usize>), CopyError> {
    let mut i = pos;
    let mut quoted = false;
    let mut plain = true;
    while i < row.len() {
        let b = row[i];
        if b == o.delimiter {
            break;
        }
        if b == o.quote {
            quoted = true;
            plain = false;
            i += 1;
            loop {
                let Some(&c) = row.get(i) else {
                    return Err(CopyError::Malformed("unterminated quoted value"));
                };
                if c == o.escape && o.escape != o.quote {
                    if row
                        .get(i + 1)
                        .is_some_and(|&n| n == o.quote || n == o.escape)
                    {
                        i += 2;
                        continue;
                    }
                } else if c == o.quote {
                    if o.escape == o.quote && row.get(i + 1) == Some(&o.quote) {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    let raw = &row[pos..i];
    let next = (i < row.len()).then_some(i + 1);
    if !quoted && raw == o.null.as_slice() {
        return Ok((Field { raw, value: None }, next));
    }
    let value = if plain {
        Cow::Borrowed(raw)
    } else {
        Cow::Owned(unquote_csv(raw, o))
    };
    Ok((
        Field {
            raw,
            value: Some(value),
        },
        next,
    ))
}

/// The value of a (well-formed) CSV field with quoted sections.
fn unquote_csv(raw: &[u8], o: &CopyOptions) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let mut inq = false;
    while i < raw.len() {
        let b = raw[i];
        if inq {
            if b == o.escape
                && raw
                    .get(i + 1)
                    .is_some_and(|&n| n == o.quote || n == o.escape)
            {
                // With escape == quote this is the doubled quote; a lone quote ends the section.
                if o.escape != o.quote || raw.get(i + 1) == Some(&o.quote) {
                    out.push(raw[i + 1]);
                    i += 2;
                    continue;
                }
            }
            if b == o.quote {
                inq = false;
            } else {
                out.push(b);
            }
        } else if b == o.quote {
            inq = true;
        } else {
            out.push(b);
        }
        i += 1;
    }
    out
}

/// Writes one field (`None` is NULL) so that [`fields`] reads it back unchanged.
pub fn encode_field(value: Option<&[u8]>, o: &CopyOptions, out: &mut Vec<u8>) {
    let Some(v) = value else {
        out.extend_from_slice(&o.null);
        return;
    };
    match o.format {
        Format::Csv => {
            let needs = v == o.null.as_slice()
                || v == b"\\."
                || v.iter().any(|&b| {
                    b == o.delimiter || b == o.quote || b == o.escape || b == b'\n' || b == b'\r'
                });
            if !needs {
                out.extend_from_slice(v);
                return;
            }
            out.push(o.quote);
            for &b in v {
                if b == o.quote || b == o.escape {
                    out.push(o.escape);
                }
                out.push(b);
            }
            out.push(o.quote);
        }
        _ => {
            let start = out.len();
            for &b in v {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    0x08 => out.extend_from_slice(b"\\b"),
                    0x0c => out.extend_from_slice(b"\\f"),
                    0x0b => out.extend_from_slice(b"\\v"),
                    b if b == o.delimiter => {
                        out.push(b'\\');
                        out.push(b);
                    }
                    b => out.push(b),
                }
            }
            // A value written exactly like the NULL string would read back as NULL.
            if out[start..] == o.null[..] {
                out.truncate(start);
                for &b in v {
                    out.extend_from_slice(format!("\\{:03o}", b).as_bytes());
                }
            }
        }
    }
}

/// Splits, masks and re-encodes the rows of one COPY TO STDOUT, message by message.
#[derive(Debug)]
pub struct CopyMasker {
    plan: std::sync::Arc<CopyPlan>,
    splitter: RowSplitter,
    /// The header line is still to come.
    header: bool,
    /// Rows seen (without the header).
    pub rows: u64,
}

/// What masking one row did: detector labels that fired, in order.
pub type Fired = Vec<&'static str>;

impl CopyMasker {
    /// Start masking under `plan`.
    pub fn new(plan: std::sync::Arc<CopyPlan>) -> Self {
        let header = plan.options.header;
        CopyMasker {
            plan,
            splitter: RowSplitter::default(),
            header,
            rows: 0,
        }
    }

    /// Mask one CopyData payload; masked whole rows are appended to `out` (the unfinished tail
    /// is held). Returns the detector labels that fired.
    pub fn feed(
        &mut self,
        data: &[u8],
        masker: &Masker,
        out: &mut Vec<u8>,
    ) -> Result<Fired, CopyError> {
        let mut fired = Vec::new();
        let plan = self.plan.clone();
        let header = &mut self.header;
        let rows = &mut self.rows;
        self.splitter.feed(data, &plan.options, |row| {
            let is_header = std::mem::take(header);
            if !is_header {
                *rows += 1;
            }
            mask_row(row, &plan, is_header, masker, out, &mut fired)
        })?;
        Ok(fired)
    }

    /// At CopyDone: mask a last row that had no newline.
    pub fn finish(&mut self, masker: &Masker, out: &mut Vec<u8>) -> Result<Fired, CopyError> {
        let mut fired = Vec::new();
        if let Some(row) = self.splitter.finish()? {
            let is_header = std::mem::take(&mut self.header);
            if !is_header {
                self.rows += 1;
            }
            mask_row(&row, &self.plan, is_header, masker, out, &mut fired)?;
        }
        Ok(fired)
    }
}

/// Mask one row into `out`. Unchanged fields are copied as written; the header line gets
/// detectors only (column names are not column values).
fn mask_row(
    row: &[u8],
    plan: &CopyPlan,
    header: bool,
    masker: &Masker,
    out: &mut Vec<u8>,
    fired: &mut Fired,
) -> Result<(), CopyError> {
    let fs = fields(row, &plan.options)?;
    if !header && !plan.widths.is_empty() && !plan.widths.contains(&fs.len()) {
        return Err(CopyError::Malformed(
            "column count differs from the table's in the catalog snapshot",
        ));
    }
    let mut changes: HashMap<usize, Option<Vec<u8>>> = HashMap::new();
    for (i, f) in fs.iter().enumerate() {
        let Some(v) = &f.value else { continue };
        let rule = !header && plan.masked.get(i).copied().unwrap_or(false);
        let masked = if !header && plan.mask_all {
            Some(masker.mask_derived(v))
        } else {
            masker.mask_text(v, rule)
        };
        match masked {
            None => {}
            Some(crate::mask::Masked::Value(nv, d)) => {
                fired.extend(d);
                changes.insert(i, Some(nv));
            }
            Some(crate::mask::Masked::Null(d)) => {
                fired.extend(d);
                changes.insert(i, None);
            }
        }
    }
    if changes.is_empty() {
        out.extend_from_slice(row);
        if !row.ends_with(b"\n") {
            out.push(b'\n');
        }
        return Ok(());
    }
    for (i, f) in fs.iter().enumerate() {
        if i > 0 {
            out.push(plan.options.delimiter);
        }
        match changes.get(&i) {
            Some(v) => encode_field(v.as_deref(), &plan.options, out),
            None => out.extend_from_slice(f.raw),
        }
    }
    out.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests;
