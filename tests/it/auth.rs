//! Caller authentication and roles.

use tonic::Code;
use warrant::proto;

use crate::support::*;

backend_tests!(
    calls_without_a_valid_credential_are_unauthenticated,
    agents_cannot_call_admin_rpcs_and_admins_cannot_open_tasks,
);

async fn calls_without_a_valid_credential_are_unauthenticated(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let real = app.workload("crm-agent", &[proto::Role::Agent]).await;
    let (id, secret) = real.rsplit_once('_').unwrap();
    let wrong_secret = format!(
        "{id}_{}",
        if secret.starts_with('A') {
            secret.replacen('A', "B", 1)
        } else {
            format!("A{}", &secret[1..])
        }
    );
    let unknown_id = format!("wrt_{}_{}", "0".repeat(32), secret);

    for credential in [
        None,
        Some("not-a-credential"),
        Some(wrong_secret.as_str()),
        Some(unknown_id.as_str()),
    ] {
        let connection = app.connect(credential).await;
        let begin_status = connection
            .tasks()
            .begin_task(begin(&["crm.contacts:read"]))
            .await
            .unwrap_err();
        assert_eq!(
            begin_status.code(),
            Code::Unauthenticated,
            "{credential:?}: {}",
            begin_status.message()
        );
        let introspect = connection
            .tokens()
            .introspect(proto::IntrospectRequest {
                token: "x".into(),
                audience: CRM.into(),
            })
            .await;
        assert_eq!(introspect.unwrap_err().code(), Code::Unauthenticated);
        let feed = connection
            .tokens()
            .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
            .await;
        assert_eq!(feed.err().map(|s| s.code()), Some(Code::Unauthenticated));
        let admin = connection
            .admin()
            .list_workloads(proto::ListWorkloadsRequest {})
            .await;
        assert_eq!(admin.unwrap_err().code(), Code::Unauthenticated);
    }
    assert_eq!(count_rows(&data, "tasks").await, 0);

    let public = app
        .connect(None)
        .await
        .tokens()
        .get_jwks(proto::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(public.keys.len(), 1, "the JWKS is public");
}

async fn agents_cannot_call_admin_rpcs_and_admins_cannot_open_tasks(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("crm-agent").await;

    let mut admin_calls = agent.admin();
    let create = admin_calls
        .create_workload(proto::CreateWorkloadRequest {
            name: "sneaky".into(),
            roles: vec![proto::Role::Admin as i32],
        })
        .await
        .unwrap_err();
    let rotate = admin_calls
        .rotate_signing_key(proto::RotateSigningKeyRequest {})
        .await
        .unwrap_err();
    let revoke = admin_calls
        .revoke(proto::RevokeRequest {
            target: Some(proto::revoke_request::Target::TaskId(format!(
                "task_{}",
                "0".repeat(32)
            ))),
        })
        .await
        .unwrap_err();
    for status in [create, rotate, revoke] {
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status.message().contains("'admin' role"),
            "{}",
            status.message()
        );
    }
    assert_eq!(
        count_rows(&data, "workloads").await,
        2,
        "admin and crm-agent only"
    );

    let status = app
        .admin()
        .await
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut admin = app.admin().await.admin();
    let duplicate = admin
        .create_workload(proto::CreateWorkloadRequest {
            name: "crm-agent".into(),
            roles: vec![proto::Role::Agent as i32],
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    let no_role = admin
        .create_workload(proto::CreateWorkloadRequest {
            name: "x".into(),
            roles: vec![],
        })
        .await
        .unwrap_err();
    assert!(
        no_role.message().starts_with("roles:"),
        "{}",
        no_role.message()
    );
    let bad_name = admin
        .create_workload(proto::CreateWorkloadRequest {
            name: "Bad Name".into(),
            roles: vec![1],
        })
        .await
        .unwrap_err();
    assert!(
        bad_name.message().starts_with("name:"),
        "{}",
        bad_name.message()
    );
    let bad_role = admin
        .create_workload(proto::CreateWorkloadRequest {
            name: "y".into(),
            roles: vec![99],
        })
        .await
        .unwrap_err();
    assert!(
        bad_role.message().starts_with("roles[0]:"),
        "{}",
        bad_role.message()
    );
}
