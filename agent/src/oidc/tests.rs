//! Verifier tests against a local discovery/JWKS server with locally minted ES256 tokens (ring
//! generates P-256 keys instantly; RS256 from a real provider is covered by vm-tests/oidc).

use super::*;
use ring::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn b64(d: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}

struct Key {
    kid: String,
    pair: EcdsaKeyPair,
}

impl Key {
    fn new(kid: &str) -> Key {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("keygen");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pkcs8");
        Key {
            kid: kid.into(),
            pair,
        }
    }
    fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..65]),
               "kid": self.kid, "alg": "ES256", "use": "sig"})
    }
    fn sign_with_header(&self, header: Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signed.as_bytes())
            .expect("sign");
        format!("{signed}.{}", b64(sig.as_ref()))
    }
    fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            json!({"alg": "ES256", "typ": "at+jwt", "kid": self.kid}),
            claims,
        )
    }
}

/// A discovery + JWKS server on 127.0.0.1 whose key set can be swapped.
struct Idp {
    issuer: String,
    jwks: Arc<Mutex<Value>>,
    doc_issuer: Arc<Mutex<Option<String>>>,
    fetches: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn idp(keys: &[&Key]) -> Idp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let issuer = format!("http://{}", listener.local_addr().expect("addr"));
    let jwks = Arc::new(Mutex::new(
        json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}),
    ));
    let doc_issuer: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let fetches = Arc::new(AtomicU32::new(0));
    let (j, d, f, iss) = (
        jwks.clone(),
        doc_issuer.clone(),
        fetches.clone(),
        issuer.clone(),
    );
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (j, d, f, iss) = (j.clone(), d.clone(), f.clone(), iss.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&buf);
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                let body = if path == "/.well-known/openid-configuration" {
                    let doc_iss = lock(&d).clone().unwrap_or(iss.clone());
                    json!({
                        "issuer": doc_iss,
                        "authorization_endpoint": format!("{iss}/auth"),
                        "token_endpoint": format!("{iss}/token"),
                        "jwks_uri": format!("{iss}/jwks"),
                        "response_types_supported": ["code"],
                        "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["ES256", "RS256"],
                    })
                    .to_string()
                } else if path == "/jwks" {
                    f.fetch_add(1, Ordering::SeqCst);
                    lock(&j).to_string()
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    Idp {
        issuer,
        jwks,
        doc_issuer,
        fetches,
        task,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(iss: &str) -> Value {
    json!({"iss": iss, "aud": "tollgate", "sub": "deploy-bot", "exp": now() + 300,
           "iat": now(), "groups": ["deployers", "ci"], "client_id": "deploy-bot"})
}

async fn verifier(idp: &Idp) -> OidcVerifier {
    let mut v = OidcVerifier::discover(&idp.issuer, "tollgate", "groups")
        .await
        .expect("discover");
    v.min_refresh = Duration::from_millis(50);
    v
}

/// Errors never echo the token or any part of it.
fn assert_safe(err: &OidcError, token: &str) {
    let text = err.to_string();
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(!text.contains(part), "error text leaks the token: {text}");
    }
}

#[tokio::test]
async fn valid_token_gives_claims() {
    let k = Key::new("k1");
    let idp = idp(&[&k]).await;
    let v = verifier(&idp).await;
    let c = v
        .verify_bearer(&k.sign(&claims(&idp.issuer)))
        .await
        .expect("valid");
    assert_eq!(c.subject, "deploy-bot");
    assert_eq!(c.groups, vec!["deployers", "ci"]);
    assert_eq!(c.extra["client_id"], "deploy-bot");
    assert!(c.expires_at > SystemTime::now());
    // aud as an array, a single-string groups claim, a custom groups claim name.
    let mut cl = claims(&idp.issuer);
    cl["aud"] = json!(["other", "tollgate"]);
    cl["roles"] = json!("dba");
    let c = v.verify_bearer(&k.sign(&cl)).await.expect("aud array");
    assert_eq!(c.groups, vec!["deployers", "ci"]);
    let v2 = OidcVerifier::discover(&idp.issuer, "tollgate", "roles")
        .await
        .expect("discover");
    assert_eq!(
        v2.verify_bearer(&k.sign(&cl)).await.expect("roles").groups,
        vec!["dba"]
    );
    // A token without a kid is matched against every compatible key.
    let t = k.sign_with_header(json!({"alg": "ES256"}), &claims(&idp.issuer));
    v.verify_bearer(&t).await.expect("no kid");
}

#[tokio::test]
async fn forged_and_tampered_tokens_are_rejected() {
    let k = Key::new("k1");
    let idp = idp(&[&k]).await;
    let v = verifier(&idp).await;
    // Signed by another key claiming the provider's kid.
    let forger = Key::new("k1");
    let t = forger.sign(&claims(&idp.issuer));
    let e = v.verify_bearer(&t).await.expect_err("forged");
    assert_eq!(e, OidcError::BadSignature);
    assert_safe(&e, &t);
    // A real token with its payload swapped.
    let t = k.sign(&claims(&idp.issuer));
    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
    let mut cl = claims(&idp.issuer);
    cl["groups"] = json!(["dba"]);
    parts[1] = b64(cl.to_string().as_bytes());
    let e = v
        .verify_bearer(&parts.join("."))
        .await
        .expect_err("tampered");
    assert_eq!(e, OidcError::BadSignature);
    // Signature truncated / garbage.
    let e = v
        .verify_bearer(&format!("{}.{}.AAAA", parts[0], parts[1]))
        .await;
    assert_eq!(e.expect_err("short sig"), OidcError::BadSignature);
}

#[tokio::test]
async fn alg_none_and_hmac_with_the_public_key_are_rejected() {
    let k = Key::new("k1");
    let idp = idp(&[&k]).await;
    let v = verifier(&idp).await;
    let cl = claims(&idp.issuer);
    let payload = b64(cl.to_string().as_bytes());
    for alg in ["none", "None", "NONE"] {
        let h = b64(json!({"alg": alg, "kid": "k1"}).to_string().as_bytes());
        for t in [format!("{h}.{payload}."), format!("{h}.{payload}.c2ln")] {
            let e = v.verify_bearer(&t).await.expect_err("alg none");
            assert!(matches!(e, OidcError::Algorithm(_)), "{alg}: {e}");
            assert_safe(&e, &t);
        }
    }
    // HS256 keyed with the provider's public JWK (the classic key-confusion attack).
    let h = b64(json!({"alg": "HS256", "kid": "k1"}).to_string().as_bytes());
    let signed = format!("{h}.{payload}");
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.jwk().to_string().as_bytes());
    let sig = ring::hmac::sign(&secret, signed.as_bytes());
    let t = format!("{signed}.{}", b64(sig.as_ref()));
    let e = v.verify_bearer(&t).await.expect_err("hs256");
    assert_eq!(e, OidcError::Algorithm("HS256".into()));
    // crit is refused.
    let t = k.sign_with_header(
        json!({"alg": "ES256", "kid": "k1", "crit": ["x"], "x": 1}),
        &cl,
    );
    assert_eq!(
        v.verify_bearer(&t).await.expect_err("crit"),
        OidcError::CriticalHeader
    );
    // A key's own alg must agree with the token's: an ES256 key cannot verify ES384.
    let h = b64(json!({"alg": "ES384", "kid": "k1"}).to_string().as_bytes());
    let e = v
        .verify_bearer(&format!("{h}.{payload}.c2ln"))
        .await
        .expect_err("es384");
    assert!(matches!(e, OidcError::UnknownKey(_)), "{e}");
}

#[tokio::test]
async fn expiry_nbf_audience_issuer_and_subject_are_checked() {
    let k = Key::new("k1");
    let idp = idp(&[&k]).await;
    let v = verifier(&idp).await;
    let check = |mutate: &dyn Fn(&mut Value)| {
        let mut cl = claims(&idp.issuer);
        mutate(&mut cl);
        k.sign(&cl)
    };
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Mutation, OidcError)> = vec![
        (
            Box::new(|c| c["exp"] = json!(now() - 120)),
            OidcError::Expired,
        ),
        (
            Box::new(|c| c["nbf"] = json!(now() + 120)),
            OidcError::NotYetValid,
        ),
        (
            Box::new(|c| c["iat"] = json!(now() + 3600)),
            OidcError::NotYetValid,
        ),
        (
            Box::new(|c| c["aud"] = json!("other-api")),
            OidcError::WrongAudience("tollgate".into()),
        ),
        (
            Box::new(|c| c["aud"] = json!(["a", "b"])),
            OidcError::WrongAudience("tollgate".into()),
        ),
        (
            Box::new(|c| {
                c.as_object_mut().expect("obj").remove("aud");
            }),
            OidcError::WrongAudience("tollgate".into()),
        ),
        (
            Box::new(|c| c["iss"] = json!("http://127.0.0.1:1")),
            OidcError::WrongIssuer(idp.issuer.clone()),
        ),
        (
            Box::new(|c| {
                c.as_object_mut().expect("obj").remove("exp");
            }),
            OidcError::MissingClaim("exp"),
        ),
        (
            Box::new(|c| c["exp"] = json!("soon")),
            OidcError::MissingClaim("exp"),
        ),
        (
            Box::new(|c| c["sub"] = json!("")),
            OidcError::MissingClaim("sub"),
        ),
        (
            Box::new(|c| c["sub"] = json!(42)),
            OidcError::MissingClaim("sub"),
        ),
    ];
    for (mutate, want) in cases {
        let t = check(&*mutate);
        let e = v.verify_bearer(&t).await.expect_err("must fail");
        assert_eq!(e, want);
        assert_safe(&e, &t);
    }
    // Within the leeway is fine.
    v.verify_bearer(&check(&|c| c["exp"] = json!(now() - 5)))
        .await
        .expect("leeway exp");
    v.verify_bearer(&check(&|c| c["nbf"] = json!(now() + 5)))
        .await
        .expect("leeway nbf");
}

#[tokio::test]
async fn malformed_tokens_are_rejected() {
    let k = Key::new("k1");
    let idp = idp(&[&k]).await;
    let v = verifier(&idp).await;
    for t in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!.!!.!!",
        "e30.e30.",
        "bm90IGpzb24.e30.c2ln",
    ] {
        let e = v.verify_bearer(t).await.expect_err(t);
        assert!(
            matches!(e, OidcError::Malformed(_) | OidcError::Algorithm(_)),
            "{t}: {e}"
        );
    }
    let big = "a".repeat(MAX_TOKEN_LEN + 1);
    assert_eq!(
        v.verify_bearer(&big).await.expect_err("big"),
        OidcError::TooLarge
    );
    // A hostile kid is capped and sanitised in the message.
    let t = k.sign_with_header(
        json!({"alg": "ES256", "kid": format!("x\n{}", "y".repeat(500))}),
        &claims(&idp.issuer),
    );
    let e = v
        .verify_bearer(&t)
        .await
        .expect_err("unknown kid")
        .to_string();
    assert!(!e.contains('\n') && e.len() < 200, "{e}");
}

#[tokio::test]
async fn unknown_kid_refreshes_the_jwks_and_rotation_works() {
    let k1 = Key::new("k1");
    let idp = idp(&[&k1]).await;
    let v = verifier(&idp).await;
    assert_eq!(
        idp.fetches.load(Ordering::SeqCst),
        1,
        "discovery fetched the keys once"
    );
    v.verify_bearer(&k1.sign(&claims(&idp.issuer)))
        .await
        .expect("k1");
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1, "known kid: no fetch");

    // The provider rotates to k2 (dropping k1): a k2 token triggers one refresh and verifies.
    let k2 = Key::new("k2");
    *lock(&idp.jwks) = json!({"keys": [k2.jwk()]});
    v.verify_bearer(&k2.sign(&claims(&idp.issuer)))
        .await
        .expect("k2 after rotation");
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 2);
    // k1 is gone from the provider, so from the cache too.
    let e = v
        .verify_bearer(&k1.sign(&claims(&idp.issuer)))
        .await
        .expect_err("k1 withdrawn");
    assert_eq!(e, OidcError::UnknownKey("k1".into()));

    // A flood of unknown kids costs at most one fetch per min_refresh (50 ms here).
    let before = idp.fetches.load(Ordering::SeqCst);
    let started = Instant::now();
    let forger = Key::new("x");
    let mut tasks = Vec::new();
    let v = Arc::new(v);
    for i in 0..20 {
        let t = forger.sign_with_header(
            json!({"alg": "ES256", "kid": format!("bogus-{i}")}),
            &claims(&idp.issuer),
        );
        let v = v.clone();
        tasks.push(tokio::spawn(async move { v.verify_bearer(&t).await }));
    }
    for t in tasks {
        assert!(matches!(
            t.await.expect("join"),
            Err(OidcError::UnknownKey(_))
        ));
    }
    let fetched = idp.fetches.load(Ordering::SeqCst) - before;
    let allowed = 2 + (started.elapsed().as_millis() / 50) as u32;
    assert!(
        fetched <= allowed,
        "{fetched} fetches in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn discovery_checks_issuer_and_scheme() {
    let k = Key::new("k1");
    let idp = idp(&[&k]).await;
    *lock(&idp.doc_issuer) = Some("https://evil.example".into());
    let e = OidcVerifier::discover(&idp.issuer, "tollgate", "groups")
        .await
        .expect_err("issuer mismatch");
    assert!(matches!(e, OidcError::Discovery { .. }), "{e}");
    assert!(e.is_unavailable());
    let e = OidcVerifier::discover("http://idp.example", "tollgate", "groups")
        .await
        .expect_err("plain http");
    assert!(matches!(e, OidcError::Issuer { .. }), "{e}");
    let e = OidcVerifier::discover("not a url", "tollgate", "groups")
        .await
        .expect_err("bad url");
    assert!(matches!(e, OidcError::Issuer { .. }), "{e}");
    // Nothing listens there.
    let e = OidcVerifier::discover("http://127.0.0.1:9", "tollgate", "groups")
        .await
        .expect_err("down");
    assert!(e.is_unavailable(), "{e}");
}

#[tokio::test]
async fn futures_are_send_and_workload_cache_reuses_verifiers() {
    fn is_send<T: Send>(_: &T) {}
    let k = Key::new("k1");
    let idp = idp(&[&k]).await;
    let f = OidcVerifier::discover(&idp.issuer, "tollgate", "groups");
    is_send(&f);
    let v = f.await.expect("discover");
    let t = k.sign(&claims(&idp.issuer));
    let f = v.verify_bearer(&t);
    is_send(&f);
    f.await.expect("valid");

    let cache = WorkloadVerifiers::default();
    let a = cache.get(&idp.issuer, "tollgate").await.expect("a");
    let b = cache.get(&idp.issuer, "tollgate").await.expect("b");
    assert!(Arc::ptr_eq(&a, &b));
    let c = cache.get(&idp.issuer, "other").await.expect("c");
    assert!(!Arc::ptr_eq(&a, &c));
}

#[test]
fn required_claims() {
    let mut extra = Map::new();
    extra.insert("groups".into(), json!(["deployers", "ci"]));
    extra.insert("client_id".into(), json!("deploy-bot"));
    extra.insert("level".into(), json!(3));
    let c = Claims {
        subject: "deploy-bot".into(),
        groups: vec![],
        expires_at: SystemTime::now(),
        extra,
    };
    let req = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    };
    assert!(check_required_claims(&c, &req(&[])).is_ok());
    assert!(check_required_claims(&c, &req(&[("groups", &["deployers"])])).is_ok());
    assert!(check_required_claims(&c, &req(&[("groups", &["x", "ci"])])).is_ok());
    assert!(check_required_claims(
        &c,
        &req(&[
            ("groups", &["ci"]),
            ("client_id", &["deploy-bot"]),
            ("level", &["3"])
        ])
    )
    .is_ok());
    assert_eq!(
        check_required_claims(&c, &req(&[("groups", &["dba"])])),
        Err(OidcError::ClaimMismatch("groups".into()))
    );
    assert!(check_required_claims(&c, &req(&[("missing", &["x"])])).is_err());
}
