//! Fuzz HTTP request attribution: any path and query must normalise or give an error, never
//! panic; a normalised path is stable (its encoded form normalises to itself), has no `.`/`..`
//! or empty segment, and Kubernetes attribution of it never panics; nor does reading the text's
//! lines as `name: value` headers for impersonation, each of which is a request of verb
//! `impersonate` with a resource.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_policy::http::{kube_attributes, kube_impersonation, normalize_path, KubeRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let headers = text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n, v.as_bytes()));
    if let Ok(all) = kube_impersonation(headers) {
        for a in all {
            assert!(a.verb == "impersonate" && !a.resource.is_empty(), "{text:?}");
        }
    }
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    let Ok(n) = normalize_path(path) else {
        return;
    };
    assert!(n.decoded.starts_with('/'));
    let inner = n.decoded.trim_end_matches('/');
    for seg in inner.split('/').skip(1) {
        assert!(!matches!(seg, "" | "." | ".."), "{path:?} -> {:?}", n.decoded);
    }
    assert_eq!(normalize_path(&n.encoded).as_ref(), Ok(&n), "{path:?}");
    for method in ["GET", "POST", "DELETE", "PATCH", "PUT", "OPTIONS"] {
        if let Ok(KubeRequest::Resource(a)) = kube_attributes(method, &n.decoded, query) {
            assert!(!a.verb.is_empty() && !a.resource.is_empty(), "{path:?}");
        }
    }
});
