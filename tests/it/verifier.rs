//! The downstream verifier library against a live broker.

use std::time::Duration;

use warrant::proto;
use warrant::verifier::{Verifier, VerifierConfig, VerifyError};

use crate::support::*;

backend_tests!(verifier_validates_offline_and_learns_revocations_and_rotations_from_the_broker);

async fn verifier_validates_offline_and_learns_revocations_and_rotations_from_the_broker(
    backend: Backend,
) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let downstream = app.resource_server("crm-api", &[CRM]).await;
    let verifier = Verifier::connect(VerifierConfig::new(app.address(), CRM, downstream))
        .await
        .unwrap();
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    let token = task.leases[0].credential.clone();

    let claims = verifier.verify(&token).await.unwrap();
    assert_eq!(claims.task_id, task.task_id);
    assert!(
        matches!(
            verifier.verify(&task.leases[1].credential).await,
            Err(VerifyError::Invalid(_))
        ),
        "wrong audience"
    );

    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    let revoked = eventually(Duration::from_secs(3), || async {
        matches!(verifier.verify_cached(&token), Err(VerifyError::Revoked))
    })
    .await;
    assert!(
        revoked,
        "the revocation reached the verifier through the feed"
    );

    app.admin()
        .await
        .admin()
        .rotate_signing_key(proto::RotateSigningKeyRequest {})
        .await
        .unwrap();
    let fresh = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    let claims = verifier
        .verify(&fresh.leases[0].credential)
        .await
        .expect("unknown kid triggers a JWKS refresh");
    assert_eq!(claims.task_id, fresh.task_id);
}

/// A verifier configured to fall back to introspection asks the broker about each token while
/// its feed is stale, and the broker's answer (with its durable use record) is what decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_verifier_configured_to_introspect_asks_the_broker() {
    use warrant::verifier::WhenStale;
    let data = TestData::new(Backend::Sqlite).await;
    let mut config = data.config();
    // No heartbeat during the test, so the feed goes stale after the verifier's short bound.
    config.feed_heartbeat_interval = Duration::from_secs(60);
    let app = TestApp::spawn_with(config).await;
    let downstream = app.resource_server("crm-api", &[CRM]).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    let token = task.leases[0].credential.clone();
    let connect = |when_stale| {
        let mut config = VerifierConfig::new(app.address(), CRM, downstream.clone());
        config.staleness_bound = Some(Duration::from_millis(200));
        config.when_stale = when_stale;
        Verifier::connect(config)
    };
    let refusing = connect(WhenStale::Refuse).await.unwrap();
    let introspecting = connect(WhenStale::Introspect).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let introspections = || async {
        app.admin()
            .await
            .admin()
            .query_audit(proto::QueryAuditRequest {
                r#type: "token.introspected".into(),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .len()
    };

    assert!(matches!(
        refusing.verify(&token).await,
        Err(VerifyError::Stale { .. })
    ));
    assert_eq!(introspections().await, 0, "a refusing verifier asks nobody");
    let claims = introspecting
        .verify(&token)
        .await
        .expect("active, per the broker");
    assert_eq!(claims.jti, task.leases[0].lease_id);
    assert_eq!(introspections().await, 1, "the broker was asked");
    assert!(
        matches!(
            introspecting.verify_cached(&token),
            Err(VerifyError::Stale { .. })
        ),
        "the cache-only check never falls back"
    );
}
