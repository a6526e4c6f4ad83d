//! The role x RPC matrix, cell by cell: every role calls every RPC of every service, and only
//! the cells the README's table allows get past authorization. The list of RPCs is checked
//! against the served descriptors, so a new RPC without a row here fails the test.

use prost::Message;
use tonic::Code;
use warrant::client::Connection;
use warrant::proto;

use crate::support::*;

const AGENT: &str = "agent";
const RESOURCE_SERVER: &str = "resource_server";
const ADMIN: &str = "admin";
const OPERATOR: &str = "operator";

/// (RPC, the roles that may call it). Deny by default: a role not listed must be refused.
const MATRIX: &[(&str, &[&str])] = &[
    ("warrant.v1.Tasks/BeginTask", &[AGENT]),
    ("warrant.v1.Tasks/RequestGrant", &[AGENT]),
    ("warrant.v1.Tasks/WatchGrant", &[AGENT]),
    ("warrant.v1.Tasks/AuthorizeToolCall", &[AGENT]),
    ("warrant.v1.Tasks/ListTools", &[AGENT]),
    ("warrant.v1.Approvals/ListPending", &[OPERATOR]),
    ("warrant.v1.Approvals/WatchPending", &[OPERATOR]),
    ("warrant.v1.Approvals/Approve", &[OPERATOR]),
    ("warrant.v1.Approvals/Deny", &[OPERATOR]),
    ("warrant.v1.Tasks/RenewLease", &[AGENT]),
    ("warrant.v1.Tasks/CompleteTask", &[AGENT]),
    ("warrant.v1.Tokens/Introspect", &[RESOURCE_SERVER, ADMIN]),
    (
        "warrant.v1.Tokens/GetJwks",
        &[AGENT, RESOURCE_SERVER, ADMIN, OPERATOR],
    ),
    (
        "warrant.v1.Tokens/WatchRevocations",
        &[RESOURCE_SERVER, ADMIN],
    ),
    ("warrant.v1.Admin/CreateWorkload", &[ADMIN]),
    ("warrant.v1.Admin/ListWorkloads", &[ADMIN]),
    ("warrant.v1.Admin/RotateWorkloadCredential", &[ADMIN]),
    ("warrant.v1.Admin/RevokeWorkloadCredentials", &[ADMIN]),
    ("warrant.v1.Admin/Revoke", &[ADMIN]),
    ("warrant.v1.Admin/RotateSigningKey", &[ADMIN]),
    ("warrant.v1.Admin/RotateCa", &[ADMIN]),
    ("warrant.v1.Admin/ReloadPolicy", &[ADMIN]),
    ("warrant.v1.Admin/QueryAudit", &[ADMIN]),
    ("warrant.v1.Admin/ExportAudit", &[ADMIN]),
    ("warrant.v1.Admin/VerifyAudit", &[ADMIN]),
    ("warrant.v1.Admin/GetAuditAnchor", &[ADMIN]),
    ("warrant.v1.Admin/AuditHash", &[ADMIN]),
    ("warrant.v1.Admin/CreateJoinToken", &[ADMIN]),
    ("warrant.v1.Admin/RevokeIdentity", &[ADMIN]),
    ("warrant.v1.Admin/DeleteWorkload", &[ADMIN]),
    // Attestation needs no identity: the attestation is the proof.
    (
        "warrant.v1.Attestation/Attest",
        &[AGENT, RESOURCE_SERVER, ADMIN, OPERATOR],
    ),
    (
        "warrant.v1.Attestation/RenewSvid",
        &[AGENT, RESOURCE_SERVER, ADMIN, OPERATOR],
    ),
];

/// Calls `rpc` with a harmless request (nothing it could change exists) and returns the status
/// of the first answer.
async fn call(connection: &Connection, rpc: &str) -> Result<(), tonic::Status> {
    let no_task = format!("task_{}", "0".repeat(32));
    let no_lease = format!("lease_{}", "0".repeat(32));
    let (mut tasks, mut tokens, mut admin) =
        (connection.tasks(), connection.tokens(), connection.admin());
    match rpc {
        "warrant.v1.Tasks/BeginTask" => tasks.begin_task(begin(&["no.such:scope"])).await.map(drop),
        "warrant.v1.Tasks/RequestGrant" => tasks
            .request_grant(grant_request(&no_task, "crm.contacts:read", 0))
            .await
            .map(drop),
        // Unknown ids: refused after authorization, so nothing is decided.
        "warrant.v1.Tasks/WatchGrant" => tasks
            .watch_grant(proto::WatchGrantRequest {
                lease_id: no_lease.clone(),
            })
            .await
            .map(drop),
        "warrant.v1.Tasks/AuthorizeToolCall" => tasks
            .authorize_tool_call(proto::AuthorizeToolCallRequest {
                task_id: no_task.clone(),
                tool: "email.send".into(),
                arguments_json: r#"{"to":"a@example.com"}"#.into(),
                risk: None,
            })
            .await
            .map(drop),
        "warrant.v1.Tasks/ListTools" => tasks
            .list_tools(proto::ListToolsRequest {
                task_id: no_task.clone(),
            })
            .await
            .map(drop),
        "warrant.v1.Approvals/ListPending" => connection
            .approvals()
            .list_pending(proto::ListPendingRequest::default())
            .await
            .map(drop),
        "warrant.v1.Approvals/WatchPending" => connection
            .approvals()
            .watch_pending(proto::WatchPendingRequest::default())
            .await
            .map(drop),
        "warrant.v1.Approvals/Approve" => connection
            .approvals()
            .approve(proto::AnswerRequest {
                lease_id: no_lease.clone(),
                reason: "checking access".into(),
                request_digest: String::new(),
            })
            .await
            .map(drop),
        "warrant.v1.Approvals/Deny" => connection
            .approvals()
            .deny(proto::AnswerRequest {
                lease_id: no_lease.clone(),
                reason: "checking access".into(),
                request_digest: String::new(),
            })
            .await
            .map(drop),
        "warrant.v1.Tasks/RenewLease" => tasks
            .renew_lease(renew_request(&no_lease, 60))
            .await
            .map(drop),
        "warrant.v1.Tasks/CompleteTask" => tasks
            .complete_task(complete_request(&no_task))
            .await
            .map(drop),
        "warrant.v1.Tokens/Introspect" => tokens
            .introspect(proto::IntrospectRequest {
                token: "not.a.token".into(),
                audience: CRM.into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "warrant.v1.Tokens/GetJwks" => tokens.get_jwks(proto::GetJwksRequest {}).await.map(drop),
        "warrant.v1.Tokens/WatchRevocations" => {
            let mut stream = tokens
                .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
                .await?
                .into_inner();
            stream.message().await.map(drop)
        }
        "warrant.v1.Admin/CreateWorkload" => admin
            .create_workload(proto::CreateWorkloadRequest {
                name: "Not A Name".into(),
                roles: vec![proto::Role::Agent as i32],
                audiences: Vec::new(),
                no_bearer_credential: false,
                selectors: Vec::new(),
                ..Default::default()
            })
            .await
            .map(drop),
        "warrant.v1.Admin/ListWorkloads" => admin
            .list_workloads(proto::ListWorkloadsRequest {})
            .await
            .map(drop),
        "warrant.v1.Admin/RotateWorkloadCredential" => admin
            .rotate_workload_credential(proto::RotateWorkloadCredentialRequest {
                name: "nobody".into(),
            })
            .await
            .map(drop),
        "warrant.v1.Admin/RevokeWorkloadCredentials" => admin
            .revoke_workload_credentials(proto::RevokeWorkloadCredentialsRequest {
                name: "nobody".into(),
            })
            .await
            .map(drop),
        "warrant.v1.Admin/Revoke" => admin
            .revoke(proto::RevokeRequest {
                target: Some(proto::revoke_request::Target::TaskId(no_task)),
            })
            .await
            .map(drop),
        "warrant.v1.Admin/RotateSigningKey" => admin
            .rotate_signing_key(proto::RotateSigningKeyRequest {})
            .await
            .map(drop),
        // A delay over the limit: refused after authorization, so nothing rotates.
        "warrant.v1.Admin/RotateCa" => admin
            .rotate_ca(proto::RotateCaRequest {
                activation_delay_seconds: Some(86_401),
            })
            .await
            .map(drop),
        "warrant.v1.Admin/ReloadPolicy" => admin
            .reload_policy(proto::ReloadPolicyRequest {})
            .await
            .map(drop),
        "warrant.v1.Admin/QueryAudit" => admin
            .query_audit(proto::QueryAuditRequest {
                limit: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        "warrant.v1.Admin/ExportAudit" => {
            let mut stream = admin
                .export_audit(proto::ExportAuditRequest {
                    after_seq: u64::MAX - 1,
                })
                .await?
                .into_inner();
            stream.message().await.map(drop)
        }
        "warrant.v1.Admin/VerifyAudit" => admin
            .verify_audit(proto::VerifyAuditRequest::default())
            .await
            .map(drop),
        "warrant.v1.Admin/GetAuditAnchor" => admin
            .get_audit_anchor(proto::GetAuditAnchorRequest {})
            .await
            .map(drop),
        "warrant.v1.Admin/AuditHash" => admin
            .audit_hash(proto::AuditHashRequest { value: "x".into() })
            .await
            .map(drop),
        "warrant.v1.Admin/CreateJoinToken" => admin
            .create_join_token(proto::CreateJoinTokenRequest {
                name: "nobody".into(),
                ttl_seconds: 60,
            })
            .await
            .map(drop),
        "warrant.v1.Admin/RevokeIdentity" => admin
            .revoke_identity(proto::RevokeIdentityRequest {
                name: "nobody".into(),
            })
            .await
            .map(drop),
        "warrant.v1.Admin/DeleteWorkload" => admin
            .delete_workload(proto::DeleteWorkloadRequest {
                name: "nobody".into(),
            })
            .await
            .map(drop),
        "warrant.v1.Attestation/Attest" => connection
            .attestation()
            .attest(proto::AttestRequest { method: None })
            .await
            .map(drop),
        // Past authorization, renewal asks for the caller's SVID, which a bearer caller lacks:
        // that answer is the handler's own, so the role reached it.
        "warrant.v1.Attestation/RenewSvid" => match connection
            .attestation()
            .renew_svid(proto::RenewSvidRequest {})
            .await
        {
            Err(status) if status.message().starts_with("renewal needs") => Ok(()),
            other => other.map(drop),
        },
        other => panic!("no call for {other}: add it to MATRIX and to call()"),
    }
}

/// Every RPC the broker serves in `warrant.v1`, from its own descriptors.
fn served_rpcs() -> Vec<String> {
    let descriptors = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    descriptors
        .file
        .iter()
        .filter(|file| file.package() == "warrant.v1")
        .flat_map(|file| {
            file.service.iter().flat_map(|service| {
                service
                    .method
                    .iter()
                    .map(|method| format!("warrant.v1.{}/{}", service.name(), method.name()))
            })
        })
        .collect()
}

backend_tests!(
    every_role_reaches_exactly_the_rpcs_of_its_row,
    a_resource_server_sees_only_its_own_audiences,
);

async fn every_role_reaches_exactly_the_rpcs_of_its_row(backend: Backend) {
    let mut served = served_rpcs();
    let mut listed: Vec<String> = MATRIX.iter().map(|(rpc, _)| (*rpc).to_owned()).collect();
    served.sort();
    listed.sort();
    assert_eq!(served, listed, "every served RPC has a row, and only those");

    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let callers = [
        (
            AGENT,
            app.workload("crm-agent", &[proto::Role::Agent]).await,
        ),
        (
            RESOURCE_SERVER,
            app.resource_server("crm-api", &[CRM]).await,
        ),
        (ADMIN, app.admin_token.clone()),
        (
            OPERATOR,
            app.workload("alice", &[proto::Role::Operator]).await,
        ),
    ];
    for (role, credential) in &callers {
        let connection = app.connect(Some(credential)).await;
        for (rpc, allowed) in MATRIX {
            let outcome = call(&connection, rpc).await;
            let code = outcome.as_ref().err().map(tonic::Status::code);
            if allowed.contains(role) {
                assert!(
                    !matches!(code, Some(Code::PermissionDenied | Code::Unauthenticated)),
                    "{role} must reach {rpc}: {outcome:?}"
                );
            } else {
                assert_eq!(
                    code,
                    Some(Code::PermissionDenied),
                    "{role} must be refused {rpc}"
                );
            }
        }
    }
}

/// A resource server introspects only tokens of its audiences and follows only their
/// revocations: nothing of another workload's other tasks, leases or scopes reaches it.
async fn a_resource_server_sees_only_its_own_audiences(backend: Backend) {
    let data = TestData::new(backend).await;
    let app = TestApp::spawn(&data).await;
    let crm_api = app.resource_server("crm-api", &[CRM]).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    let mut tokens = app.connect(Some(&crm_api)).await.tokens();

    let own = tokens
        .introspect(proto::IntrospectRequest {
            token: task.leases[0].credential.clone(),
            audience: CRM.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(own.active);
    let other = tokens
        .introspect(proto::IntrospectRequest {
            token: task.leases[1].credential.clone(),
            audience: "https://tickets.test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(
        other.message().starts_with("audience:"),
        "{}",
        other.message()
    );

    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    let mut feed = tokens
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    loop {
        let batch = feed.message().await.unwrap().unwrap();
        seen.extend(batch.events);
        if batch.caught_up {
            break;
        }
    }
    assert_eq!(seen.len(), 1, "only the CRM lease's revocation: {seen:?}");
    assert_eq!(seen[0].lease_id, task.leases[0].lease_id);
    assert_eq!(seen[0].audience, CRM);

    let mut admin = app.admin().await.admin();
    for (roles, audiences, field) in [
        (vec![proto::Role::ResourceServer], vec![], "audiences"),
        (
            vec![proto::Role::ResourceServer],
            vec!["https://unknown.test".to_owned()],
            "audiences[0]",
        ),
        (vec![proto::Role::Agent], vec![CRM.to_owned()], "audiences"),
    ] {
        let refused = admin
            .create_workload(proto::CreateWorkloadRequest {
                name: "misconfigured".into(),
                roles: roles.iter().map(|role| *role as i32).collect(),
                audiences,
                no_bearer_credential: false,
                selectors: Vec::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().starts_with(&format!("{field}:")),
            "{}",
            refused.message()
        );
    }
}

/// HTTP introspection follows the gRPC rules: no credential is 401, an agent is refused, a
/// resource server only sees its own audience, and a revoked token is inactive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_introspection_applies_the_same_roles_and_audiences() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let crm_api = app.resource_server("crm-api", &[CRM]).await;
    let agent_credential = app.workload("crm-agent", &[proto::Role::Agent]).await;
    let mut agent = app.connect(Some(&agent_credential)).await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();
    let token = task.leases[0].credential.clone();
    let addr = app.http_addr;
    let ask = move |credential: Option<String>, form: String| {
        tokio::task::spawn_blocking(move || http_introspect(addr, credential.as_deref(), &form))
    };
    let form = format!("token={token}");

    let (status, body) = ask(None, form.clone()).await.unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, body) = ask(Some(agent_credential.clone()), form.clone())
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    let other_audience = format!("{form}&audience=https%3A%2F%2Ftickets.test");
    let (status, body) = ask(Some(crm_api.clone()), other_audience).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("audience:"), "{body}");
    // A form without its token is an RFC 6749 error naming what is wrong, not a bare 422.
    let (status, body) = ask(Some(crm_api.clone()), "audience=x".into())
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "invalid_request", "{body}");
    assert!(
        error["error_description"]
            .as_str()
            .unwrap()
            .contains("token"),
        "{body}"
    );

    let (status, body) = ask(Some(crm_api.clone()), form.clone()).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["active"], true);
    assert_eq!(answer["jti"], task.leases[0].lease_id);

    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    let (status, body) = ask(Some(crm_api), form).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), r#"{"active":false}"#);
}
