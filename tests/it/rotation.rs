//! Signing key rotation with overlap.

use std::time::Duration;

use warrant::proto;

use crate::support::*;

backend_tests!(rotation_signs_with_a_new_key_and_keeps_old_tokens_valid_until_they_expire);

async fn rotation_signs_with_a_new_key_and_keeps_old_tokens_valid_until_they_expire(
    backend: Backend,
) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let before = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    let old_token = before.leases[0].credential.clone();
    let old_kid = header_of(&old_token)["kid"].as_str().unwrap().to_owned();
    // What a verifier holds when the rotation happens: the JWKS fetched just before it.
    let jwks_before = published_kids(&app);
    assert_eq!(jwks_before.len(), 2, "the current key and the next key");
    assert_eq!(jwks_before[0], old_kid, "the current key first");

    let rotation = app
        .admin()
        .await
        .admin()
        .rotate_signing_key(proto::RotateSigningKeyRequest {})
        .await
        .unwrap()
        .into_inner();

    assert_eq!(rotation.retired_kid, old_kid);
    assert_ne!(rotation.new_kid, old_kid);
    let published_until = rotation.retired_key_published_until.unwrap().seconds;
    assert!(
        published_until >= claims_of(&old_token)["exp"].as_i64().unwrap(),
        "published at least as long as its tokens live"
    );

    let after = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    let new_token = &after.leases[0].credential;
    assert_eq!(header_of(new_token)["kid"], rotation.new_kid);
    assert!(
        jwks_before.contains(&rotation.new_kid),
        "the key signing after the rotation was published before it: {jwks_before:?}"
    );

    let kids = published_kids(&app);
    assert_eq!(kids.len(), 3, "{kids:?}");
    assert_eq!(kids[0], rotation.new_kid, "the current key first");
    assert!(!jwks_before.contains(&kids[1]), "a fresh next key second");
    assert_eq!(kids[2], old_kid, "the retired key kept");

    let mut tokens = app.admin().await.tokens();
    for token in [&old_token, new_token] {
        let answer = tokens
            .introspect(proto::IntrospectRequest {
                token: token.clone(),
                audience: CRM.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(answer.into_inner().active);
    }

    // Renewing an old lease re-signs it with the current key.
    let renewed = agent
        .renew_lease(renew_request(&before.leases[0].lease_id, 360))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(header_of(&renewed.credential)["kid"], rotation.new_kid);

    // A restart loads both keys back from the store.
    app.stop().await;
    let restarted = TestApp::spawn(&data).await;
    assert_eq!(
        published_kids(&restarted),
        kids,
        "current, next and retired keys, in that order"
    );
}

/// The kids of the served JWKS, in order.
fn published_kids(app: &TestApp) -> Vec<String> {
    app.http("/.well-known/jwks.json")["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn replicas_sharing_postgres_follow_each_others_rotation() {
    let (_data, first, second) = postgres_replicas().await;
    let credential = first.workload("crm-agent", &[proto::Role::Agent]).await;

    first
        .admin()
        .await
        .admin()
        .rotate_signing_key(proto::RotateSigningKeyRequest {})
        .await
        .unwrap();
    let task = first
        .connect(Some(&credential))
        .await
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();

    assert!(
        second.is_active(&task.leases[0].credential, CRM).await,
        "the other replica loads the new key on first sight"
    );
    second
        .connect(Some(&credential))
        .await
        .tasks()
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    // Exact at once on the replica that completed; the other learns it through the feed it
    // follows (LISTEN/NOTIFY), within milliseconds (BENCHMARKS.md measures it).
    assert!(
        !second.is_active(&task.leases[0].credential, CRM).await,
        "the completing replica knows at once"
    );
    assert!(
        eventually(Duration::from_secs(1), || async {
            !first.is_active(&task.leases[0].credential, CRM).await
        })
        .await,
        "a completion on one replica is seen by the other"
    );
}

/// A token signed before a rotation stays valid until its own expiry, then stops; its retired
/// key leaves the JWKS once every token it signed has expired (here within seconds: the only
/// scope lives at most 6 s, long enough for a loaded CI machine to rotate and ask in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_token_stops_at_its_expiry_and_its_retired_key_then_leaves_the_jwks() {
    let data = TestData::new(Backend::Sqlite).await;
    // Only the flash scope: no tool either (a call token's lifetime would keep the key).
    let flash_only = TEST_CATALOG
        .split("[[tool]]")
        .next()
        .unwrap()
        .split("[[scope]]")
        .filter(|entry| entry.contains("flash:read"))
        .map(|entry| format!("[[scope]]{entry}"))
        .collect::<String>()
        .replace(r#"max_ttl = "3s""#, r#"max_ttl = "6s""#);
    assert!(flash_only.contains(r#"max_ttl = "6s""#));
    std::fs::write(data.path().join("scopes.toml"), flash_only).unwrap();
    let app = TestApp::spawn(&data).await;
    let task = app.begin_as("flash-agent", &["flash:read"]).await;
    let old_token = task.leases[0].credential.clone();
    let old_kid = header_of(&old_token)["kid"].as_str().unwrap().to_owned();
    app.admin()
        .await
        .admin()
        .rotate_signing_key(proto::RotateSigningKeyRequest {})
        .await
        .unwrap();

    assert!(
        app.is_active(&old_token, "https://flash.test").await,
        "valid until its expiry"
    );
    assert!(published_kids(&app).contains(&old_kid));
    let expired = eventually(Duration::from_secs(10), || async {
        !app.is_active(&old_token, "https://flash.test").await
    })
    .await;
    assert!(expired, "the old token stops at its expiry");
    let key_gone = eventually(Duration::from_secs(15), || async {
        !published_kids(&app).contains(&old_kid)
    })
    .await;
    assert!(
        key_gone,
        "the retired key leaves the JWKS: {:?}",
        published_kids(&app)
    );
    assert_eq!(
        published_kids(&app).len(),
        2,
        "the current and the next key remain"
    );
}
