//! Validation: introspection, the revocation feed, the published keys.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::Code;
use warrant::issuer::jwt::{self, AccessTokenClaims};
use warrant::issuer::{KeyAlgorithm, SigningKey};
use warrant::proto;

use crate::support::*;

backend_tests!(
    introspection_reports_claims_of_an_active_token,
    introspection_is_inactive_for_wrong_audience_forged_unknown_key_and_garbage,
    introspection_is_inactive_once_the_token_expires,
    admin_revocation_makes_a_token_inactive,
    revocations_stream_from_a_cursor_and_resume_after_reconnect,
    jwks_over_http_and_grpc_publish_the_signing_key,
);

async fn introspection_reports_claims_of_an_active_token(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let task = app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let lease = &task.leases[0];

    let answer = app
        .admin()
        .await
        .tokens()
        .introspect(proto::IntrospectRequest {
            token: lease.credential.clone(),
            audience: CRM.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    assert!(answer.active);
    assert_eq!(answer.jti, lease.lease_id);
    assert_eq!(answer.task_id, task.task_id);
    assert_eq!(answer.scope, "crm.contacts:read");
    assert_eq!(answer.sub, "spiffe://test.local/workload/crm-agent");
    assert_eq!(answer.aud, CRM);
    assert_eq!(answer.iss, app.issuer);
    assert_eq!(answer.exp, lease.expires_at.unwrap().seconds);

    let missing = app
        .admin()
        .await
        .tokens()
        .introspect(proto::IntrospectRequest {
            token: lease.credential.clone(),
            audience: String::new(),
            ..Default::default()
        })
        .await;
    let status = missing.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("audience:"));
}

/// A token with the real token's header (and kid) and `claims`, signed by `key`.
fn resigned(real: &str, claims: &serde_json::Value, key: &SigningKey) -> String {
    let header = real.split('.').next().unwrap();
    let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()))
    )
}

async fn introspection_is_inactive_for_wrong_audience_forged_unknown_key_and_garbage(
    backend: Backend,
) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let task = app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let real = task.leases[0].credential.clone();
    let (attacker, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
    let mut widened = claims_of(&real);
    widened["scope"] = "payments:refund".into();
    widened["aud"] = "https://payments.test".into();
    let parts: Vec<&str> = real.split('.').collect();
    let claims: AccessTokenClaims = serde_json::from_value(claims_of(&real)).unwrap();
    let es256_header = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"alg":"ES256","typ":"at+jwt","kid":"{}"}}"#,
        header_of(&real)["kid"].as_str().unwrap()
    ));
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"at+jwt"}"#);
    let flipped = if parts[2].starts_with('A') { "B" } else { "A" };
    // Introspected first, the real token is known to be well signed: the cases below must still
    // be refused (the broker skips only the signature check of that exact text).
    assert!(app.is_active(&real, CRM).await, "the real token is active");

    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong audience", real.clone(), "https://tickets.test"),
        (
            "one signature character changed",
            format!("{}.{}.{flipped}{}", parts[0], parts[1], &parts[2][1..]),
            CRM,
        ),
        (
            "forged signature under the real kid",
            resigned(&real, &widened, &attacker),
            "https://payments.test",
        ),
        (
            "payload altered, signature kept",
            format!(
                "{}.{}.{}",
                parts[0],
                URL_SAFE_NO_PAD.encode(widened.to_string()),
                parts[2]
            ),
            "https://payments.test",
        ),
        (
            "signed by an unknown key",
            jwt::sign(&attacker, &claims),
            CRM,
        ),
        (
            "algorithm switched to ES256",
            format!("{es256_header}.{}.{}", parts[1], parts[2]),
            CRM,
        ),
        ("alg none", format!("{none_header}.{}.", parts[1]), CRM),
        (
            "signature stripped",
            format!("{}.{}.", parts[0], parts[1]),
            CRM,
        ),
        ("garbage", "not.a.token".into(), CRM),
        ("empty", String::new(), CRM),
        ("oversized", "a".repeat(60_000), CRM),
    ];
    for (case, token, audience) in cases {
        assert!(
            !app.is_active(&token, audience).await,
            "{case} must be inactive"
        );
    }
    assert!(
        app.is_active(&real, CRM).await,
        "the real token is still active"
    );
}

async fn introspection_is_inactive_once_the_token_expires(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let task = app.begin_as("crm-agent", &["flash:read"]).await;
    let token = task.leases[0].credential.clone();
    let exp = claims_of(&token)["exp"].as_i64().unwrap();

    let expired = eventually(Duration::from_secs(5), || async {
        !app.is_active(&token, "https://flash.test").await
    })
    .await;

    assert!(expired);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(now >= exp, "inactive only once exp has passed");
}

async fn admin_revocation_makes_a_token_inactive(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let task = app
        .begin_as("crm-agent", &["crm.contacts:read", "tickets:write"])
        .await;
    let mut admin = app.admin().await.admin();

    let revoked = admin
        .revoke(proto::RevokeRequest {
            target: Some(proto::revoke_request::Target::LeaseId(
                task.leases[0].lease_id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(
        revoked.revoked_lease_ids,
        vec![task.leases[0].lease_id.clone()]
    );
    assert!(!app.is_active(&task.leases[0].credential, CRM).await);
    assert!(
        app.is_active(&task.leases[1].credential, "https://tickets.test")
            .await
    );
    let again = admin
        .revoke(proto::RevokeRequest {
            target: Some(proto::revoke_request::Target::LeaseId(
                task.leases[0].lease_id.clone(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);

    admin
        .revoke(proto::RevokeRequest {
            target: Some(proto::revoke_request::Target::TaskId(task.task_id.clone())),
        })
        .await
        .unwrap();
    assert!(
        !app.is_active(&task.leases[1].credential, "https://tickets.test")
            .await
    );
}

async fn next_batch(
    stream: &mut tonic::Streaming<proto::WatchRevocationsResponse>,
) -> proto::WatchRevocationsResponse {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("feed answered in time")
        .unwrap()
        .unwrap()
}

async fn revocations_stream_from_a_cursor_and_resume_after_reconnect(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let watcher = app.admin().await;
    let mut stream = watcher
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = next_batch(&mut stream).await;
    assert!(first.caught_up && first.events.is_empty());

    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    let mut events = Vec::new();
    while events.len() < 3 {
        events.extend(next_batch(&mut stream).await.events);
    }
    let mut lease_ids: Vec<&str> = events
        .iter()
        .filter(|e| !e.lease_id.is_empty())
        .map(|e| e.lease_id.as_str())
        .collect();
    lease_ids.sort();
    let mut expected: Vec<&str> = task.leases.iter().map(|l| l.lease_id.as_str()).collect();
    expected.sort();
    assert_eq!(lease_ids, expected);
    assert!(
        events
            .iter()
            .all(|e| e.reason() == proto::RevocationReason::TaskCompleted
                && e.task_id == task.task_id)
    );
    let task_event = events
        .iter()
        .find(|e| e.lease_id.is_empty())
        .expect("a task-level event");
    let latest_lease_expiry = task
        .leases
        .iter()
        .map(|lease| lease.expires_at.unwrap().seconds)
        .max()
        .unwrap();
    assert_eq!(
        task_event.not_after.unwrap().seconds,
        latest_lease_expiry,
        "a task event lasts as long as the task's last token"
    );
    let cursor = events.last().unwrap().cursor;
    drop(stream);

    let second = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    agent
        .complete_task(complete_request(&second.task_id))
        .await
        .unwrap();
    let mut resumed = watcher
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor })
        .await
        .unwrap()
        .into_inner();
    let batch = next_batch(&mut resumed).await;
    assert!(batch.caught_up);
    assert_eq!(batch.events.len(), 2, "only what happened after the cursor");
    assert!(
        batch
            .events
            .iter()
            .all(|e| e.task_id == second.task_id && e.cursor > cursor)
    );
}

async fn jwks_over_http_and_grpc_publish_the_signing_key(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let task = app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let kid = header_of(&task.leases[0].credential)["kid"]
        .as_str()
        .unwrap()
        .to_owned();

    let discovery = app.http("/.well-known/openid-configuration");
    let jwks = app.http("/.well-known/jwks.json");
    let grpc = app
        .connect(None)
        .await
        .tokens()
        .get_jwks(proto::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();

    assert_eq!(discovery["issuer"], app.issuer);
    assert_eq!(
        discovery["jwks_uri"],
        format!("{}/.well-known/jwks.json", app.issuer)
    );
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "the current key and the next key");
    assert_eq!(keys[0]["kid"], kid);
    assert_eq!(keys[0]["kty"], "OKP");
    assert_eq!(keys[0]["crv"], "Ed25519");
    assert_eq!(keys[0]["alg"], "EdDSA");
    assert_eq!(keys[0]["use"], "sig");
    assert!(keys[0].get("d").is_none(), "no private key material");
    assert_eq!(grpc.keys[0].kid, kid);
    assert_eq!(grpc.keys[0].x, keys[0]["x"].as_str().unwrap());
    assert_eq!(grpc.issuer, app.issuer);
    assert_eq!(http_get(app.http_addr, "/readyz").0, 200);
}
