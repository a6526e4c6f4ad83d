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
