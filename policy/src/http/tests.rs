use super::*;

fn norm(p: &str) -> Result<String, PathError> {
    normalize_path(p).map(|n| n.decoded)
}

#[test]
fn plain_paths_stay() {
    assert_eq!(norm("/").expect("normalises"), "/");
    assert_eq!(
        norm("/api/v1/invoices").expect("normalises"),
        "/api/v1/invoices"
    );
    assert_eq!(norm("/api/v1/").expect("normalises"), "/api/v1/");
    let n = normalize_path("/a%20b/c~d").expect("normalises");
    assert_eq!(
        (n.decoded.as_str(), n.encoded.as_str()),
        ("/a b/c~d", "/a%20b/c~d")
    );
}

#[test]
fn dots_and_slashes_resolve() {
    for (raw, want) in [
        ("/api/v1/../admin", "/api/admin"),
        ("/api/v1/%2e%2e/admin", "/api/admin"),
        ("/api/v1/%2E%2E/../admin", "/admin"),
        ("/api/v1/.%2e/admin", "/api/admin"),
        ("/api/v1/./x", "/api/v1/x"),
        ("/api/v1/%2e/x", "/api/v1/x"),
        ("//api//v1///x", "/api/v1/x"),
        ("/api/v1/x/..", "/api/v1/"),
        ("/api/v1/x/.", "/api/v1/x/"),
        ("/a/..", "/"),
        ("/%61pi/v1", "/api/v1"),
    ] {
        assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
    }
}

#[test]
fn ambiguous_paths_are_errors() {
    for (raw, want) in [
        ("/api/v1/..%2fadmin", PathError::EncodedSeparator),
        ("/api/v1%2F..%2Fadmin", PathError::EncodedSeparator),
        ("/api/v1/..%5cadmin", PathError::EncodedSeparator),
        ("/api/v1\\..\\admin", PathError::AmbiguousChar),
        ("/api/v1/%252e%252e/admin", PathError::DoubleEncoding),
        ("/api/v1/..;/admin", PathError::AmbiguousChar),
        ("/api/v1/x%00", PathError::AmbiguousChar),
        ("/api/v1/x%0d%0a", PathError::AmbiguousChar),
        ("/api/v1/%zz", PathError::BadEscape),
        ("/api/v1/%2", PathError::BadEscape),
        ("/api/v1/%ff", PathError::NotUtf8),
        ("/..", PathError::AboveRoot),
        ("/a/../../admin", PathError::AboveRoot),
        ("*", PathError::NotAbsolute),
        ("", PathError::NotAbsolute),
        ("http://x/a", PathError::NotAbsolute),
    ] {
        assert_eq!(norm(raw), Err(want), "{raw}");
    }
    assert_eq!(norm(&"/a".repeat(5000)), Err(PathError::TooLong));
}

#[test]
fn encoding_is_canonical_and_idempotent() {
    for raw in ["/a%20b/%C3%A9t%C3%A9/x:y@z", "/a b", "/%7e/x?"] {
        let Ok(n) = normalize_path(raw) else { continue };
        let again = normalize_path(&n.encoded).expect("normalises");
        assert_eq!(again, n, "{raw}");
    }
    assert_eq!(normalize_path("/%7e").expect("normalises").encoded, "/~");
}

fn kube(method: &str, path: &str, query: Option<&str>) -> KubeAttrs {
    match kube_attributes(method, path, query) {
        Ok(KubeRequest::Resource(a)) => a,
        other => panic!("{method} {path}: {other:?}"),
    }
}

fn summary(a: &KubeAttrs) -> (String, String, String, String, String) {
    (
        a.verb.clone(),
        a.group.clone(),
        a.resource_path(),
        a.namespace.clone(),
        a.name.clone(),
    )
}

#[test]
fn kube_verbs_and_attributes() {
    let s = |v: &str, g: &str, r: &str, ns: &str, n: &str| {
        (v.into(), g.into(), r.into(), ns.into(), n.into())
    };
    for (method, path, query, want) in [
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            None,
            s("list", "", "pods", "prod", ""),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            Some("watch=true"),
            s("watch", "", "pods", "prod", ""),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            Some("watch=1&limit=5"),
            s("watch", "", "pods", "prod", ""),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            Some("watch=false"),
            s("list", "", "pods", "prod", ""),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            Some("watch=0&watch=1"),
            s("list", "", "pods", "prod", ""),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods",
            Some("fieldSelector=metadata.name%3Dweb&watch=1"),
            s("watch", "", "pods", "prod", "web"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods/web",
            None,
            s("get", "", "pods", "prod", "web"),
        ),
        (
            "HEAD",
            "/api/v1/namespaces/prod/pods/web",
            None,
            s("get", "", "pods", "prod", "web"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods/web/log",
            Some("follow=true"),
            s("get", "", "pods/log", "prod", "web"),
        ),
        (
            "POST",
            "/api/v1/namespaces/prod/pods/web/exec",
            Some("command=ls"),
            s("create", "", "pods/exec", "prod", "web"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods/web/exec",
            Some("command=ls"),
            s("get", "", "pods/exec", "prod", "web"),
        ),
        (
            "POST",
            "/api/v1/namespaces/prod/pods/web/portforward",
            None,
            s("create", "", "pods/portforward", "prod", "web"),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/prod/pods/web",
            None,
            s("delete", "", "pods", "prod", "web"),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/prod/pods",
            None,
            s("deletecollection", "", "pods", "prod", ""),
        ),
        (
            "PUT",
            "/api/v1/namespaces/prod/pods/web",
            None,
            s("update", "", "pods", "prod", "web"),
        ),
        (
            "PATCH",
            "/api/v1/namespaces/prod/pods/web/status",
            None,
            s("patch", "", "pods/status", "prod", "web"),
        ),
        (
            "POST",
            "/api/v1/namespaces/prod/pods",
            None,
            s("create", "", "pods", "prod", ""),
        ),
        ("GET", "/api/v1/pods", None, s("list", "", "pods", "", "")),
        (
            "GET",
            "/api/v1/nodes/n1",
            None,
            s("get", "", "nodes", "", "n1"),
        ),
        (
            "GET",
            "/api/v1/namespaces",
            None,
            s("list", "", "namespaces", "", ""),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod",
            None,
            s("get", "", "namespaces", "prod", "prod"),
        ),
        (
            "PUT",
            "/api/v1/namespaces/prod/finalize",
            None,
            s("update", "", "namespaces/finalize", "prod", "prod"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/secrets/db",
            None,
            s("get", "", "secrets", "prod", "db"),
        ),
        (
            "GET",
            "/apis/apps/v1/namespaces/prod/deployments/web",
            None,
            s("get", "apps", "deployments", "prod", "web"),
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/prod/deployments/web/scale",
            None,
            s("patch", "apps", "deployments/scale", "prod", "web"),
        ),
        (
            "GET",
            "/api/v1/watch/namespaces/prod/pods",
            None,
            s("watch", "", "pods", "prod", ""),
        ),
        (
            "GET",
            "/api/v1/watch/namespaces/prod/pods/web",
            None,
            s("watch", "", "pods", "prod", "web"),
        ),
        (
            "GET",
            "/api/v1/proxy/namespaces/prod/pods/web/x/y",
            None,
            s("proxy", "", "pods", "prod", "web"),
        ),
        (
            "GET",
            "/api/v1/namespaces/prod/pods/web/proxy/x/y",
            None,
            s("get", "", "pods/proxy", "prod", "web"),
        ),
    ] {
        assert_eq!(
            summary(&kube(method, path, query)),
            want,
            "{method} {path} {query:?}"
        );
    }
}

#[test]
fn kube_discovery_and_non_resource() {
    for p in [
        "/api",
        "/api/v1",
        "/apis",
        "/apis/apps",
        "/apis/apps/v1",
        "/version",
        "/openapi/v2",
        "/openapi/v3",
        "/openapi/v3/api/v1",
    ] {
        assert_eq!(
            kube_attributes("GET", p, None),
            Ok(KubeRequest::Discovery),
            "{p}"
        );
        assert!(kube_attributes("POST", p, None).is_err(), "{p}");
    }
    for p in [
        "/",
        "/healthz",
        "/metrics",
        "/logs/x",
        "/openapi",
        "/apix/v1/pods",
    ] {
        assert!(
            matches!(
                kube_attributes("GET", p, None),
                Err(KubeError::NonResource(_))
            ),
            "{p}"
        );
    }
    assert!(matches!(
        kube_attributes("OPTIONS", "/api/v1/pods", None),
        Err(KubeError::Method(_))
    ));
    assert!(kube_attributes("GET", "/api/v1/watch", None).is_err());
    assert!(kube_attributes("GET", "/api/v1/pods", Some("watch=%zz")).is_err());
    assert!(kube_attributes("GET", "/api/v1/pods", Some("a=1;watch=1")).is_err());
}

#[test]
fn query_values_decode_like_go() {
    assert_eq!(
        query_values(Some("command=sh&command=-c&command=echo+hi%21"), "command"),
        Some(vec!["sh".into(), "-c".into(), "echo hi!".into()])
    );
    assert_eq!(query_values(None, "x"), Some(vec![]));
    assert_eq!(query_values(Some("x=%"), "y"), None);
}

#[test]
fn impersonation_headers_are_requests_of_their_own() {
    let h = |pairs: &[(&'static str, &'static str)]| {
        kube_impersonation(pairs.iter().map(|(n, v)| (*n, v.as_bytes())))
    };
    assert_eq!(h(&[("accept", "*/*")]), Ok(vec![]));
    let got = h(&[
        ("impersonate-user", "system:serviceaccount:prod:deployer"),
        ("impersonate-group", "system:masters"),
        ("impersonate-extra-scopes%2Fa", "view"),
        ("impersonate-uid", "42"),
    ])
    .expect("attributable");
    let seen: Vec<_> = got
        .iter()
        .map(|a| {
            (
                a.verb.as_str(),
                a.resource_path(),
                a.namespace.as_str(),
                a.name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "impersonate",
                "serviceaccounts".to_string(),
                "prod",
                "deployer"
            ),
            ("impersonate", "groups".to_string(), "", "system:masters"),
            ("impersonate", "userextras/scopes/a".to_string(), "", "view"),
            ("impersonate", "uids".to_string(), "", "42"),
        ]
    );
    assert_eq!(
        h(&[("impersonate-user", "admin")]).expect("user")[0].resource,
        "users"
    );
    // The order of the headers does not change the order of the requests.
    let reordered = h(&[
        ("impersonate-uid", "42"),
        ("impersonate-group", "system:masters"),
        ("impersonate-extra-scopes%2Fa", "view"),
        ("impersonate-user", "system:serviceaccount:prod:deployer"),
    ])
    .expect("attributable");
    assert_eq!(reordered, got);
    // Unknown, unaccompanied or malformed: not attributable.
    assert!(h(&[("impersonate-user", "a"), ("impersonate-whatever", "b")]).is_err());
    assert!(h(&[("impersonate-group", "system:masters")]).is_err());
    assert!(h(&[("impersonate-user", "a"), ("impersonate-extra-", "b")]).is_err());
    assert!(h(&[("impersonate-user", "a"), ("impersonate-extra-%zz", "b")]).is_err());
}
