//! OIDC with a real provider (npm `oidc-provider`, `vm-tests/oidc/provider.mjs`): the provider
//! itself, and workload OIDC through the agent (a bot's PostgreSQL password carries a
//! client_credentials JWT).

use std::time::Duration;

use vm_tests::{
    http_get,
    oidc::{jwt_claims, OidcProvider},
};

#[test]
fn provider_serves_discovery_tokens_and_rotates_keys() {
    let idp = OidcProvider::start("oidcprov");
    let (status, body) = http_get(
        idp.addr(),
        "/.well-known/openid-configuration",
        Duration::from_secs(5),
    )
    .expect("discovery");
    assert_eq!(status, 200, "{body}");
    let disc: serde_json::Value = serde_json::from_str(&body).expect("discovery JSON");
    assert_eq!(disc["issuer"], idp.issuer());
    assert!(disc["code_challenge_methods_supported"]
        .as_array()
        .is_some_and(|m| m.iter().any(|v| v == "S256")));

    // Workload token: sub is the client, groups from its registration, aud tollgate.
    let t = idp.workload_token("deploy-bot");
    let c = jwt_claims(&t);
    assert_eq!(c["sub"], "deploy-bot");
    assert_eq!(c["aud"], "tollgate");
    assert_eq!(c["iss"], idp.issuer());
    assert_eq!(c["groups"], serde_json::json!(["deployers"]));

    // Approver tokens speak for the user.
    let c = jwt_claims(&idp.token_for("alice"));
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["groups"], serde_json::json!(["dba"]));
    let c = jwt_claims(&idp.token_for("carol"));
    assert_eq!(c["groups"], serde_json::json!(["dev"]));
    let c = jwt_claims(&idp.token_for_audience("bob", "other-api"));
    assert_eq!(c["aud"], "other-api");

    // Rotation: the JWKS changes and new tokens carry the new kid.
    let header = |t: &str| -> serde_json::Value {
        use base64::Engine as _;
        let h = t.split('.').next().expect("header");
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .expect("b64"),
        )
        .expect("json")
    };
    let old_kid = header(&t)["kid"].as_str().expect("kid").to_string();
    let kid = idp.rotate_keys(false);
    assert_ne!(kid, old_kid);
    let t2 = idp.workload_token("deploy-bot");
    assert_eq!(header(&t2)["kid"], kid.as_str());
    let (_, jwks) = http_get(idp.addr(), "/jwks", Duration::from_secs(5)).expect("jwks");
    assert!(jwks.contains(&kid) && !jwks.contains(&old_kid), "{jwks}");
}
