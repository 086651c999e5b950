//! Fuzzes value masking: arbitrary bytes through a `Masker` with every detector, in each style,
//! as free text and as a masked column. Beyond "no panic", it asserts:
//! - a changed value names the detectors that fired, and only `null` gives SQL NULL;
//! - `full` (and `null`, which renders matches inside a text the same way) leaves nothing a
//!   scan would find again: no detected secret survives in the output;
//! - `hash` is stable: the same input gives the same output;
//! - a column value always comes out in its style's fixed shape.
//!
//! Run: `cargo +nightly fuzz run mask` from `agent/`.
#![no_main]

use std::sync::OnceLock;

use tollgate::mask::{MaskStyle, Masked, Masker, COLUMN, DETECTORS};

const STYLES: [MaskStyle; 4] = [
    MaskStyle::Full,
    MaskStyle::Partial,
    MaskStyle::Hash,
    MaskStyle::Null,
];

fn maskers() -> &'static [Masker; 4] {
    static MASKERS: OnceLock<[Masker; 4]> = OnceLock::new();
    MASKERS.get_or_init(|| STYLES.map(|s| Masker::with_detectors(DETECTORS, s, [0x5a; 32])))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let full = &maskers()[0];
    for (&style, m) in STYLES.iter().zip(maskers()) {
        let first = m.mask_text(data, false);
        match &first {
            None => {}
            Some(Masked::Null(labels)) => {
                assert_eq!(style, MaskStyle::Null, "only the null style gives NULL");
                assert!(!labels.is_empty());
            }
            Some(Masked::Value(out, labels)) => {
                assert!(!labels.is_empty(), "a change without a detector");
                assert!(labels.iter().all(|l| DETECTORS.contains(l)));
                if matches!(style, MaskStyle::Full | MaskStyle::Null) {
                    if let Some(again) = full.mask_text(out, false) {
                        panic!(
                            "masked output still matches {:?}: {:?} -> {:?}",
                            again.detectors(),
                            String::from_utf8_lossy(data),
                            String::from_utf8_lossy(out)
                        );
                    }
                }
            }
        }
        if style == MaskStyle::Hash {
            assert_eq!(m.mask_text(data, false), first, "hash must be stable");
        }
        match m.mask_column(data, style) {
            Masked::Null(labels) => {
                assert_eq!(style, MaskStyle::Null);
                assert_eq!(labels, [COLUMN]);
            }
            Masked::Value(out, labels) => {
                assert_eq!(labels, [COLUMN]);
                match style {
                    MaskStyle::Full => assert_eq!(out, b"********"),
                    MaskStyle::Hash => assert!(out.starts_with(b"hash:") && out.len() == 21),
                    // `****` and at most 4 characters of at most 4 bytes, or `j***@domain`.
                    MaskStyle::Partial => assert!(
                        (out.starts_with(b"****") && out.len() <= 4 + 16)
                            || out.windows(4).any(|w| w == b"***@")
                    ),
                    MaskStyle::Null => panic!("null column value must be SQL NULL"),
                }
            }
        }
    }
});
