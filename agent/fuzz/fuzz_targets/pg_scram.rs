//! Fuzzes the SCRAM client's handling of the upstream server's messages (server-first, then
//! server-final): arbitrary bytes must give an error, never a panic, and a server-final message
//! can only verify after a server-first message that extended our nonce.
//!
//! Input: server-first and server-final separated by the first 0xff byte. Iteration counts
//! above 4096 are skipped so a run is not spent in PBKDF2 (the agent itself caps at 1e8).
//! Run: `cargo +nightly fuzz run pg_scram fuzz/corpus/pg_scram` from `agent/`.
#![no_main]

use tollgate::pg::scram::{SaltedPasswords, Scram};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (first, last) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let expensive = std::str::from_utf8(first).ok().is_some_and(|t| {
        t.split(',')
            .filter_map(|a| a.strip_prefix("i="))
            .any(|i| i.parse::<u64>().map_or(false, |n| n > 4096))
    });
    if expensive {
        return;
    }
    let cache = SaltedPasswords::default();
    let mut s = Scram::with_fixed_nonce_for_fuzzing(b"pencil", "fuzznonce");
    let updated = s.update(first, &cache).is_ok();
    if updated {
        let m = std::str::from_utf8(s.message()).expect("client-final is ASCII");
        assert!(m.starts_with("c=eSws,r=fuzznonce"), "{m}");
        assert!(m.contains(",p="), "{m}");
    }
    let finished = s.finish(last).is_ok();
    assert!(!finished || updated, "final verified without a valid first message");
    // A second round is always out of order.
    assert!(s.update(first, &cache).is_err() && s.finish(last).is_err());
});
