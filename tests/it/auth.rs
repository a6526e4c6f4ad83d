//! Caller authentication and roles.

use tonic::Code;
use warrant::proto;

use crate::support::*;

backend_tests!(
    calls_without_a_valid_credential_are_unauthenticated,
    agents_cannot_call_admin_rpcs_and_admins_cannot_open_tasks,
    workload_credentials_are_rotated_and_revoked_at_once,
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
                ..Default::default()
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
    assert_eq!(public.keys.len(), 2, "the JWKS is public");
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
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
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
            status.message().contains("needs the role admin"),
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
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    let no_role = admin
        .create_workload(proto::CreateWorkloadRequest {
            name: "x".into(),
            roles: vec![],
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
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
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
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
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        bad_role.message().starts_with("roles[0]:"),
        "{}",
        bad_role.message()
    );
}

/// A rotation hands out a new credential and the old one stops working on the next call (the
/// credential cache is invalidated, not left to expire); a revocation stops every credential;
/// an admin cannot revoke itself; unknown workloads are NOT_FOUND.
async fn workload_credentials_are_rotated_and_revoked_at_once(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let old = app.workload("crm-agent", &[proto::Role::Agent]).await;
    let opens_tasks = |credential: String| {
        let app = &app;
        async move {
            app.connect(Some(&credential))
                .await
                .tasks()
                .begin_task(begin(&["crm.contacts:read"]))
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };
    assert_eq!(opens_tasks(old.clone()).await, Ok(()), "cached as valid");

    let mut admin = app.admin().await.admin();
    let rotated = admin
        .rotate_workload_credential(proto::RotateWorkloadCredentialRequest {
            name: "crm-agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.credential, old);
    assert_eq!(
        opens_tasks(old.clone()).await,
        Err(Code::Unauthenticated),
        "the old credential stops at once"
    );
    assert_eq!(opens_tasks(rotated.credential.clone()).await, Ok(()));

    let listed = admin
        .list_workloads(proto::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .workloads;
    assert!(listed.iter().any(|workload| workload.name == "crm-agent"));

    admin
        .revoke_workload_credentials(proto::RevokeWorkloadCredentialsRequest {
            name: "crm-agent".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        opens_tasks(rotated.credential.clone()).await,
        Err(Code::Unauthenticated)
    );

    let refused = admin
        .revoke_workload_credentials(proto::RevokeWorkloadCredentialsRequest {
            name: "admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::FailedPrecondition,
        "{}",
        refused.message()
    );
    for name in ["no-such-workload", "Not A Name"] {
        let missing = admin
            .rotate_workload_credential(proto::RotateWorkloadCredentialRequest {
                name: name.into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(missing.code(), Code::NotFound | Code::InvalidArgument),
            "{name}: {missing:?}"
        );
        assert!(missing.message().contains("name") || missing.message().contains("workload"));
    }
    let agent = app.connect(Some(&old)).await;
    let not_admin = agent
        .admin()
        .rotate_workload_credential(proto::RotateWorkloadCredentialRequest {
            name: "crm-agent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_admin.code(), Code::Unauthenticated);
}

/// A credential revoked on one replica stops working on the other within a second, although
/// the other had it cached as valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn a_credential_revoked_on_one_replica_is_refused_by_the_other_within_a_second() {
    let (_data, first, second) = postgres_replicas().await;
    let credential = first.workload("crm-agent", &[proto::Role::Agent]).await;
    let mut on_second = second.connect(Some(&credential)).await.tasks();
    on_second
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .expect("valid, and now cached on the second replica");
    first
        .admin()
        .await
        .admin()
        .revoke_workload_credentials(proto::RevokeWorkloadCredentialsRequest {
            name: "crm-agent".into(),
        })
        .await
        .unwrap();
    let refused = eventually(std::time::Duration::from_secs(1), || {
        let mut tasks = on_second.clone();
        async move {
            tasks
                .begin_task(begin(&["crm.contacts:read"]))
                .await
                .is_err_and(|status| status.code() == Code::Unauthenticated)
        }
    })
    .await;
    assert!(refused, "the second replica still accepted it after 1 s");
}
