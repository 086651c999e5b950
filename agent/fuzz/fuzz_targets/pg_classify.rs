#![no_main]
// Classification of arbitrary UTF-8 (what a bot can send in a Query or Parse message) must
// return Ok or Err, never panic; so must the cache keys. And the fast key's promise holds: a
// text that shares it (other string and number contents) classifies the same, unless the
// classification read a constant (then the cache never shares it).
use tollgate::pg::classify::{cache_key, classify, fast_key, fast_key_sibling, Lineage, Statement};

type Shape = (Vec<&'static str>, Vec<String>, Vec<String>, Vec<String>, bool, Lineage);

fn shape(v: &[Statement]) -> Vec<Shape> {
    v.iter()
        .map(|s| {
            (
                s.kinds.clone(),
                s.tables.clone(),
                s.functions.clone(),
                s.dangerous.clone(),
                s.read_only,
                s.lineage.clone(),
            )
        })
        .collect()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let first = classify(s);
        let _ = cache_key(s);
        if let (Some(key), Ok(a)) = (fast_key(s), &first) {
            if a.iter().any(|st| st.literal_dependent) {
                return;
            }
            let sibling = fast_key_sibling(s).expect("same lexing as fast_key");
            assert_eq!(fast_key(&sibling).as_deref(), Some(key.as_str()), "{s:?} / {sibling:?}");
            match classify(&sibling) {
                Ok(b) => assert_eq!(shape(a), shape(&b), "{s:?} vs {sibling:?}"),
                // A constant's value can make a text invalid (e.g. a typmod of 9 digits);
                // an error is a deny, never a wrong allow.
                Err(_) => {}
            }
        }
    }
});
