use std::sync::Arc;

use super::*;
use crate::mask::{MaskStyle, Masker};

fn opts(sql: &str) -> CopyOptions {
    copy_outs(sql).expect("parse")[0]
        .clone()
        .expect("copy out")
        .options
        .expect("options")
}

fn values(row: &[u8], o: &CopyOptions) -> Vec<Option<Vec<u8>>> {
    fields(row, o)
        .expect("fields")
        .into_iter()
        .map(|f| f.value.map(|v| v.into_owned()))
        .collect()
}

/// Values that exercise every escape and quoting rule.
fn nasty() -> Vec<Option<Vec<u8>>> {
    vec![
        Some(b"plain".to_vec()),
        None,
        Some(b"".to_vec()),
        Some(b"tab\there".to_vec()),
        Some(b"new\nline\r\n".to_vec()),
        Some(b"back\\slash \\N".to_vec()),
        Some(b"\\N".to_vec()),
        Some(b"quote \" and ,comma; semi|pipe".to_vec()),
        Some(b"\"\"".to_vec()),
        Some(b"\\.".to_vec()),
        Some(vec![0x08, 0x0b, 0x0c, 0x01, 0x7f]),
        Some("unicode é ✓".as_bytes().to_vec()),
    ]
}

fn encode_row(vals: &[Option<Vec<u8>>], o: &CopyOptions) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in vals.iter().enumerate() {
        if i > 0 {
            out.push(o.delimiter);
        }
        encode_field(v.as_deref(), o, &mut out);
    }
    out.push(b'\n');
    out
}

#[test]
fn round_trips_in_every_format() {
    for sql in [
        "COPY t TO STDOUT",
        "COPY t TO STDOUT (FORMAT csv)",
        "COPY t TO STDOUT WITH CSV DELIMITER ';' QUOTE '''' ESCAPE '\\' NULL 'NULL'",
        "COPY t TO STDOUT (FORMAT csv, DELIMITER '|', QUOTE '\"', ESCAPE '!', NULL '\\N')",
        "COPY t TO STDOUT (DELIMITER '|', NULL 'nil')",
        "COPY t TO STDOUT (DELIMITER ',', NULL '')",
    ] {
        let o = opts(sql);
        let vals = nasty();
        let row = encode_row(&vals, &o);
        let mut expect = vals.clone();
        if o.format == Format::Text && o.null.is_empty() {
            // PostgreSQL writes an empty text value and NULL alike here: it reads back as NULL.
            expect[2] = None;
        }
        assert_eq!(
            values(&row, &o),
            expect,
            "{sql}: {}",
            String::from_utf8_lossy(&row)
        );
        // Split into single bytes, the splitter still finds exactly this one row.
        let mut s = RowSplitter::default();
        let mut rows = Vec::new();
        for b in &row {
            s.feed(std::slice::from_ref(b), &o, |r| {
                rows.push(r.to_vec());
                Ok(())
            })
            .expect("feed");
        }
        assert_eq!(rows, vec![row.clone()], "{sql}");
        assert_eq!(s.finish().expect("finish"), None);
    }
}

#[test]
fn text_escapes_as_postgres_writes_them() {
    let o = CopyOptions::default();
    let v = values(b"a\\tb\tc\\\\d\t\\N\t\\101\\x41\\x4g\\q\n", &o);
    assert_eq!(
        v,
        vec![
            Some(b"a\tb".to_vec()),
            Some(b"c\\d".to_vec()),
            None,
            Some(b"AA\x04gq".to_vec()),
        ]
    );
    // An escaped delimiter does not split.
    assert_eq!(values(b"a\\\tb\n", &o), vec![Some(b"a\tb".to_vec())]);
    assert!(fields(b"trailing\\", &o).is_err());
}

#[test]
fn csv_quoting_and_null() {
    let o = opts("COPY t TO STDOUT (FORMAT csv)");
    let v = values(b"1,,\"\",\"a,b\",\"x\"\"y\",\"multi\nline\"\n", &o);
    assert_eq!(
        v,
        vec![
            Some(b"1".to_vec()),
            None,
            Some(Vec::new()),
            Some(b"a,b".to_vec()),
            Some(b"x\"y".to_vec()),
            Some(b"multi\nline".to_vec()),
        ]
    );
    assert!(fields(b"\"open", &o).is_err());
    // A newline inside quotes does not end the row, across message boundaries too.
    let mut s = RowSplitter::default();
    let mut rows = Vec::new();
    for part in [&b"1,\"a\n"[..], b"b\"\n2,c\n3"] {
        s.feed(part, &o, |r| {
            rows.push(r.to_vec());
            Ok(())
        })
        .expect("feed");
    }
    assert_eq!(rows, vec![b"1,\"a\nb\"\n".to_vec(), b"2,c\n".to_vec()]);
    assert_eq!(s.finish().expect("finish"), Some(b"3".to_vec()));
}

#[test]
fn csv_with_a_separate_escape_across_splits() {
    let o = opts("COPY t TO STDOUT (FORMAT csv, ESCAPE '\\')");
    let row = b"\"a\\\"\n,b\"\n";
    let mut s = RowSplitter::default();
    let mut rows = Vec::new();
    for b in row.iter() {
        s.feed(std::slice::from_ref(b), &o, |r| {
            rows.push(r.to_vec());
            Ok(())
        })
        .expect("feed");
    }
    assert_eq!(rows, vec![row.to_vec()]);
    assert_eq!(values(row, &o), vec![Some(b"a\"\n,b".to_vec())]);
    let mut s = RowSplitter::default();
    s.feed(b"\"open", &o, |_| Ok(())).expect("feed");
    assert!(s.finish().is_err(), "unterminated quote at CopyDone");
}

#[test]
fn options_refused_when_unreadable() {
    let one = |sql: &str| copy_outs(sql).expect("parse")[0].clone().expect("copy");
    assert_eq!(
        one("COPY t TO STDOUT (FORMAT binary)").options,
        Err(CopyError::Binary)
    );
    assert_eq!(
        one("COPY t TO STDOUT BINARY").options,
        Err(CopyError::Binary)
    );
    assert!(matches!(
        one("COPY t TO STDOUT (ENCODING 'SJIS')").options,
        Err(CopyError::Encoding(_))
    ));
    assert!(one("COPY t TO STDOUT (ENCODING 'UTF-8')").options.is_ok());
    assert!(matches!(
        one("COPY t TO STDOUT (DELIMITER 'n')").options,
        Err(CopyError::Option(_))
    ));
    assert!(matches!(
        one("COPY t TO STDOUT (HEADER match)").options,
        Err(CopyError::Option(_))
    ));
    assert!(
        one("COPY t TO STDOUT (HEADER)")
            .options
            .expect("header")
            .header
    );
    assert!(
        !one("COPY t TO STDOUT (HEADER off)")
            .options
            .expect("h")
            .header
    );
    assert_eq!(
        one("COPY public.t (a, \"B\") TO STDOUT").source,
        Source::Table {
            schema: Some("public".into()),
            name: "t".into(),
            columns: vec!["a".into(), "B".into()],
        }
    );
    assert_eq!(one("COPY (SELECT 1) TO STDOUT").source, Source::Query);
    let all =
        copy_outs("SELECT 1; COPY t TO STDOUT; COPY t FROM STDIN; COPY t TO '/x'").expect("parse");
    assert_eq!(all.len(), 4);
    assert!(all[0].is_none() && all[1].is_some() && all[2].is_none() && all[3].is_none());
}

fn masker() -> Masker {
    let policy = tollgate_policy::parse(
        r#"
[[target]]
name = "db"
protocol = "postgres"
address = ["127.0.0.1:5432"]

[[mask]]
targets = ["db"]
columns = ["*.email", "customers.card_number"]
detectors = ["email", "credit_card"]
style = "full"
"#,
        "p.toml",
    )
    .expect("policy");
    Masker::for_target(&policy, "db", [7; 32]).expect("masker")
}

fn catalog() -> Catalog {
    Catalog::from_tables(&[
        (
            "public",
            "customers",
            &[
                ("id", false, false),
                ("email", true, false),
                ("card_number", true, false),
                ("note", false, false),
                ("g", false, true),
            ],
        ),
        ("public", "orders", &[("id", false, false)]),
    ])
}

fn run(plan: CopyPlan, chunks: &[&[u8]]) -> Result<(String, usize), CopyError> {
    let m = masker();
    let mut cm = CopyMasker::new(Arc::new(plan));
    let mut out = Vec::new();
    let mut fired = 0;
    for c in chunks {
        fired += cm.feed(c, &m, &mut out)?.len();
    }
    fired += cm.finish(&m, &mut out)?.len();
    Ok((String::from_utf8(out).expect("utf8"), fired))
}

#[test]
fn masks_table_columns_by_position() {
    let c = copy_outs("COPY customers TO STDOUT").expect("p")[0]
        .clone()
        .expect("c");
    let p = plan(&c, &masker(), &catalog(), false).expect("plan");
    assert_eq!(p.masked, vec![false, true, true, false]);
    assert_eq!(p.widths, vec![4]);
    let (out, fired) = run(
        p.clone(),
        &[
            b"1\ta@b.co\t4111",
            b"111111111111\tnote bob@example.org\n2\t\\N\tx\t",
            b"y\n",
        ],
    )
    .expect("masked");
    assert_eq!(
        out,
        "1\t********\t********\tnote ********\n2\t\\N\t********\ty\n"
    );
    assert_eq!(fired, 4);
    // A row of another width is refused: the table guess would be wrong.
    assert!(matches!(run(p, &[b"1\t2\n"]), Err(CopyError::Malformed(_))));

    // Listed columns, in their order.
    let c = copy_outs("COPY customers (note, email) TO STDOUT (FORMAT csv, HEADER)").expect("p")[0]
        .clone()
        .expect("c");
    let p = plan(&c, &masker(), &catalog(), false).expect("plan");
    assert_eq!(p.masked, vec![false, true]);
    let (out, _) = run(p, &[b"note,email\n\"x,y\",\"q\"\"@r\"\n"]).expect("masked");
    assert_eq!(out, "note,email\n\"x,y\",********\n");
}

#[test]
fn refuses_what_it_cannot_mask() {
    let m = masker();
    let one = |sql: &str| copy_outs(sql).expect("parse")[0].clone().expect("copy");
    // COPY (query): every value is masked when its lineage may carry a masked value, none by
    // column rules otherwise (detectors still run).
    let q = one("COPY (SELECT upper(email) FROM customers) TO STDOUT");
    let p = plan(&q, &m, &catalog(), true).expect("plan");
    assert!(p.mask_all);
    let (out, _) = run(
        p,
        &[b"A@B.CO	plain
"],
    )
    .expect("masked");
    assert_eq!(
        out,
        "********	********
"
    );
    let p = plan(&q, &m, &catalog(), false).expect("plan");
    assert!(!p.mask_all && p.masked.is_empty());
    assert!(matches!(
        plan(&one("COPY nosuch TO STDOUT"), &m, &catalog(), false),
        Err(CopyError::UnknownTable(_))
    ));
    assert_eq!(
        plan(
            &one("COPY customers TO STDOUT (FORMAT binary)"),
            &m,
            &catalog(),
            false
        ),
        Err(CopyError::Binary)
    );
    // A table without masked columns: detectors only, any width.
    let p = plan(&one("COPY orders TO STDOUT"), &m, &catalog(), false).expect("plan");
    assert!(p.masked.iter().all(|x| !x) && p.widths.is_empty());
    // Detectors only: COPY (query) is fine, every value is scanned.
    let d = Masker::with_detectors(&["email"], MaskStyle::Full, [1; 32]);
    let p = plan(&one("COPY (SELECT 1) TO STDOUT"), &d, &catalog(), false).expect("plan");
    let mut cm = CopyMasker::new(Arc::new(p));
    let mut out = Vec::new();
    cm.feed(b"x a@b.co\n", &d, &mut out).expect("feed");
    assert_eq!(out, b"x ********\n");
}

#[test]
fn unqualified_names_merge_every_schema() {
    let cat = Catalog::from_tables(&[
        (
            "public",
            "t",
            &[("id", false, false), ("email", true, false)],
        ),
        (
            "other",
            "t",
            &[
                ("email", true, false),
                ("id", false, false),
                ("x", false, false),
            ],
        ),
    ]);
    let c = copy_outs("COPY t TO STDOUT").expect("p")[0]
        .clone()
        .expect("c");
    let p = plan(&c, &masker(), &cat, false).expect("plan");
    assert_eq!(p.masked, vec![true, true, false]);
    assert_eq!(p.widths, vec![2, 3]);
    let c = copy_outs("COPY other.t TO STDOUT").expect("p")[0]
        .clone()
        .expect("c");
    let p = plan(&c, &masker(), &cat, false).expect("plan");
    assert_eq!(p.masked, vec![true, false, false]);
}

#[test]
fn masked_values_never_read_back_as_null_or_split() {
    // Column style `null` gives NULL; a masked text equal to the NULL string is escaped.
    let o = opts("COPY t TO STDOUT (NULL '********')");
    let mut out = Vec::new();
    encode_field(Some(b"********"), &o, &mut out);
    assert_ne!(out, b"********");
    assert_eq!(
        values(&[out.clone(), b"\n".to_vec()].concat(), &o),
        vec![Some(b"********".to_vec())]
    );
}
