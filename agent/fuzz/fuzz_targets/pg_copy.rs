//! Fuzzes the COPY TO STDOUT codec (`pg::copy`), which reads rows an upstream server sends:
//! the first byte picks the options, the second where the payload is split into two CopyData
//! messages, the rest is the payload. Beyond "no panic", it asserts:
//! - splitting a payload anywhere gives the same output as sending it whole;
//! - every row that decodes re-encodes to the same values (the codec round-trips);
//! - with the `full` style, no detector finds anything in the masked output.
//!
//! Run: `cargo +nightly fuzz run pg_copy` from `agent/`.
#![no_main]

use std::sync::{Arc, OnceLock};

use tollgate::mask::{MaskStyle, Masker, DETECTORS};
use tollgate::pg::copy::{self, CopyMasker, CopyOptions, CopyPlan};

const STATEMENTS: [&str; 6] = [
    "COPY t TO STDOUT",
    "COPY t TO STDOUT (FORMAT csv)",
    "COPY t TO STDOUT (FORMAT csv, HEADER, DELIMITER ';', QUOTE '''', ESCAPE '\\', NULL 'NULL')",
    "COPY t TO STDOUT (FORMAT csv, ESCAPE '!')",
    "COPY t TO STDOUT (DELIMITER '|', NULL '')",
    "COPY t TO STDOUT (HEADER, NULL 'x')",
];

fn setup() -> &'static (Masker, Vec<CopyOptions>) {
    static S: OnceLock<(Masker, Vec<CopyOptions>)> = OnceLock::new();
    S.get_or_init(|| {
        let opts = STATEMENTS
            .iter()
            .map(|s| {
                copy::copy_outs(s).expect("parse")[0]
                    .clone()
                    .expect("copy")
                    .options
                    .expect("options")
            })
            .collect();
        (Masker::with_detectors(DETECTORS, MaskStyle::Full, [0x5a; 32]), opts)
    })
}

fn run(plan: &Arc<CopyPlan>, m: &Masker, parts: &[&[u8]]) -> Option<Vec<u8>> {
    let mut cm = CopyMasker::new(plan.clone());
    let mut out = Vec::new();
    for p in parts {
        cm.feed(p, m, &mut out).ok()?;
    }
    cm.finish(m, &mut out).ok()?;
    Some(out)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [pick, split, payload @ ..] = data else {
        return;
    };
    let (m, opts) = setup();
    let o = &opts[usize::from(*pick) % opts.len()];
    let plan = Arc::new(CopyPlan {
        options: o.clone(),
        masked: vec![false, true],
        widths: Vec::new(),
        mask_all: false,
    });
    let at = usize::from(*split).min(payload.len());
    let whole = run(&plan, m, &[payload]);
    let parts = run(&plan, m, &[&payload[..at], &payload[at..]]);
    assert_eq!(whole, parts, "a split changed the output");

    // Round trip of every row that decodes.
    for line in payload.split_inclusive(|&b| b == b'\n') {
        if o.format == copy::Format::Csv {
            break; // quoted newlines: rows are not lines
        }
        let Ok(fs) = copy::fields(line, o) else { continue };
        let mut again = Vec::new();
        for (i, f) in fs.iter().enumerate() {
            if i > 0 {
                again.push(o.delimiter);
            }
            copy::encode_field(f.value.as_deref(), o, &mut again);
        }
        let back = copy::fields(&again, o).expect("re-encoded row decodes");
        let a: Vec<_> = fs.iter().map(|f| f.value.as_deref()).collect();
        let b: Vec<_> = back.iter().map(|f| f.value.as_deref()).collect();
        if !(o.null.is_empty() && a.iter().any(|v| v == &Some(&b""[..]))) {
            assert_eq!(a, b, "round trip");
        }
    }

    // Nothing a detector finds survives the `full` style.
    if let Some(out) = whole {
        if o.format == copy::Format::Text {
            for line in out.split(|&b| b == b'\n') {
                let Ok(fs) = copy::fields(line, o) else { continue };
                for f in fs {
                    if let Some(v) = f.value {
                        assert!(m.mask_text(&v, false).is_none(), "{:?}", String::from_utf8_lossy(&v));
                    }
                }
            }
        }
    }
});
