#![no_main]
// A StartupMessage's parameters are bot bytes: reading them as settings must return Ok or Err,
// never panic, and every accepted setting has a non-empty name with no `-` (PostgreSQL reads
// long options' dashes as underscores) and comes from `options` only if `options` was given.
use tollgate::pg::startup::settings;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let mut params = Vec::new();
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        params.push((k.to_string(), v.to_string()));
    }
    if let Ok(s) = settings(&params) {
        let has_options = params.iter().any(|(k, _)| k == "options");
        for st in s {
            assert!(!st.name.is_empty() || !st.from_options, "{params:?}");
            assert!(!st.from_options || (has_options && !st.name.contains('-')), "{params:?}");
        }
    }
});
