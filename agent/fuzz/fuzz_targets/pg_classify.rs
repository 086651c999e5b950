#![no_main]
// Classification of arbitrary UTF-8 (what a bot can send in a Query or Parse message) must
// return Ok or Err, never panic; so must the cache key.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = tollgate::pg::classify::classify(s);
        let _ = tollgate::pg::classify::cache_key(s);
    }
});
