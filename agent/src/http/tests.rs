use hyper::{header, HeaderMap, Method, StatusCode, Uri};
use tollgate_policy::Protocol;

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn attr(
    protocol: Protocol,
    method: &str,
    uri: &str,
    h: &[(&str, &str)],
    sni: Option<&str>,
) -> Result<Attributed, Unattributable> {
    let uri: Uri = uri.parse().expect("uri");
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    attribute(protocol, &method, &uri, &headers(h), sni)
}

#[test]
fn plain_request_is_attributed_and_canonical() {
    let a = attr(
        Protocol::Https,
        "GET",
        "/api//v1/./x/%2e%2e/invoices?limit=5",
        &[("host", "Billing.Internal:8443")],
        Some("billing.internal"),
    )
    .expect("attributed");
    assert_eq!(a.path, "/api/v1/invoices");
    assert_eq!(a.forward, "/api/v1/invoices?limit=5");
    assert_eq!(a.host, "billing.internal");
    assert_eq!(a.text(), "GET /api/v1/invoices");
}

#[test]
fn smuggling_and_host_tricks_are_refused() {
    let h = ("host", "b.internal");
    for (uri, hs, sni, status) in [
        (
            "/x",
            vec![h, ("content-length", "5"), ("transfer-encoding", "chunked")],
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/x",
            vec![h, ("content-length", "5"), ("content-length", "6")],
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/x",
            vec![h, ("transfer-encoding", "gzip, chunked")],
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/x",
            vec![h, ("host", "other")],
            None,
            StatusCode::BAD_REQUEST,
        ),
        ("https://other/x", vec![h], None, StatusCode::BAD_REQUEST),
        (
            "/x",
            vec![h],
            Some("other.internal"),
            StatusCode::MISDIRECTED_REQUEST,
        ),
        ("/x", vec![], None, StatusCode::BAD_REQUEST),
        ("/a/%2e%2e/%2e%2e/etc", vec![h], None, StatusCode::FORBIDDEN),
        ("/a/..%2fadmin", vec![h], None, StatusCode::FORBIDDEN),
    ] {
        let e = attr(Protocol::Https, "POST", uri, &hs, sni).expect_err(uri);
        assert_eq!(e.status, status, "{uri} {hs:?}: {}", e.message);
        assert!(e.message.starts_with("tollgate: "), "{}", e.message);
    }
    // An absolute-form URI naming the same host is fine.
    assert!(attr(
        Protocol::Https,
        "GET",
        "https://b.internal/x",
        &[h],
        Some("b.internal")
    )
    .is_ok());
}

#[test]
fn kubernetes_requests_carry_attributes() {
    let h = [("host", "127.0.0.1:6443")];
    let a = attr(
        Protocol::Kubernetes,
        "GET",
        "/api/v1/namespaces/prod/pods?watch=1",
        &h,
        None,
    )
    .expect("attributed");
    let Some(Some(k)) = &a.kube else {
        panic!("{a:?}")
    };
    assert_eq!((k.verb.as_str(), k.namespace.as_str()), ("watch", "prod"));
    assert_eq!(
        a.text(),
        "GET /api/v1/namespaces/prod/pods (watch pods -n prod)"
    );
    let d = attr(Protocol::Kubernetes, "GET", "/apis/apps/v1", &h, None).expect("discovery");
    assert_eq!(d.kube, Some(None));
    let e = attr(Protocol::Kubernetes, "GET", "/metrics", &h, None).expect_err("non-resource");
    assert_eq!(e.status, StatusCode::FORBIDDEN);
}

#[test]
fn kubernetes_refusal_is_a_status() {
    let r = refusal(
        Protocol::Kubernetes,
        StatusCode::FORBIDDEN,
        "tollgate: no",
        Some("r1"),
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.headers().get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
}

#[test]
fn hop_by_hop_and_bot_credentials_are_stripped() {
    let mut h = headers(&[
        ("authorization", "Bearer stolen"),
        ("connection", "close, x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "5"),
        ("accept", "*/*"),
    ]);
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(h.contains_key("accept"));
    // Every listed name, repeated ones whole, and nothing else.
    let mut h = headers(&[
        ("Authorization", "Bearer one"),
        ("authorization", "Basic two"),
        ("proxy-authorization", "Basic three"),
        ("proxy-authenticate", "Basic"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x-t"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("x-keep", "1"),
        ("x-keep", "2"),
    ]);
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(h.get_all("x-keep").iter().count(), 2);
    let mut none = headers(&[("accept", "*/*"), ("host", "a")]);
    strip_hop_by_hop(&mut none);
    assert_eq!(none.len(), 2);
}

#[test]
fn exec_commands_are_shown_word_by_word() {
    let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(super::command_text(&w(&["ls", "-l", "/tmp"])), "ls -l /tmp");
    assert_eq!(
        super::command_text(&w(&["sh", "-c", "echo hi; id"])),
        "sh -c 'echo hi; id'"
    );
    assert_eq!(super::command_text(&w(&["a'b", "x\ny"])), r"'a\'b' 'x\ny'");
    assert_eq!(super::command_text(&w(&[""])), "''");
}

#[test]
fn method_overrides_and_impersonation_are_attributed() {
    let h = ("host", "b.internal");
    let a = attr(
        Protocol::Https,
        "POST",
        "/api/v1/x?_method=delete&_method=post",
        &[
            h,
            ("x-http-method-override", " Delete "),
            ("x-method-override", "PATCH"),
        ],
        None,
    )
    .expect("attributed");
    // Uppercase, once each, the request's own method left out.
    assert_eq!(a.overrides, ["DELETE", "PATCH"]);
    assert_eq!(a.text(), "POST /api/v1/x (as DELETE, PATCH)");
    // A percent-encoded key is the same key to the frameworks that read it.
    let encoded = attr(
        Protocol::Https,
        "POST",
        "/api/v1/x?%5Fmethod=DELETE",
        &[h],
        None,
    )
    .expect("attributed");
    assert_eq!(encoded.overrides, ["DELETE"]);
    let plain = attr(Protocol::Https, "GET", "/api/v1/x", &[h], None).expect("attributed");
    assert!(plain.overrides.is_empty() && plain.impersonate.is_empty());

    // Kubernetes: no method overrides (the API server reads none), impersonation instead.
    let k = attr(
        Protocol::Kubernetes,
        "GET",
        "/api/v1/namespaces/ci/pods",
        &[
            h,
            ("x-http-method-override", "DELETE"),
            ("impersonate-user", "admin"),
        ],
        None,
    )
    .expect("attributed");
    assert!(k.overrides.is_empty());
    assert_eq!(
        k.text(),
        "GET /api/v1/namespaces/ci/pods (list pods -n ci; impersonate users admin)"
    );
    let err = attr(
        Protocol::Kubernetes,
        "GET",
        "/api/v1/pods",
        &[h, ("impersonate-group", "system:masters")],
        None,
    )
    .expect_err("a group without a user");
    assert_eq!(err.status, StatusCode::FORBIDDEN);
}

/// An unattributable request is audited without its query or userinfo.
#[test]
fn audited_targets_carry_no_query_or_userinfo() {
    for (uri, shown) in [
        ("/x%zz/y?api_key=s3cret", "/x%zz/y?..."),
        (
            "https://user:s3cret@billing.internal:8443/a/../../b?token=s3cret",
            "https://billing.internal:8443/a/../../b?...",
        ),
        ("/plain", "/plain"),
    ] {
        let u: Uri = uri.parse().expect("uri");
        assert_eq!(super::serve::audit_target(&u), shown);
    }
}
