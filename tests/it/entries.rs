//! Registration entries: an explicit SPIFFE ID validated by the specification's rules, labels
//! for policy, the operator role, and deletion as a kill switch that frees the selectors but
//! never the name or the SPIFFE ID.

use std::collections::HashMap;

use tonic::Code;
use warrant::proto;

use crate::identity::{TlsBroker, identity_of};
use crate::support::*;

backend_tests!(
    an_entry_names_its_spiffe_id_and_labels_and_both_are_validated,
    deleting_an_entry_ends_its_identity_and_frees_only_its_selectors,
);

fn entry(name: &str, spiffe_id: &str, labels: &[(&str, &str)]) -> proto::CreateWorkloadRequest {
    proto::CreateWorkloadRequest {
        name: name.into(),
        roles: vec![proto::Role::Agent as i32],
        no_bearer_credential: true,
        spiffe_id: spiffe_id.into(),
        labels: labels
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
        ..Default::default()
    }
}

async fn an_entry_names_its_spiffe_id_and_labels_and_both_are_validated(backend: Backend) {
    let data = TestData::new(backend).await;
    let broker = TlsBroker::start(&data, |_| {}).await;
    let admin = broker.admin().await;
    let spiffe_id = "spiffe://test.local/ns/prod/sa/crm-agent";
    let created = admin
        .admin()
        .create_workload(entry("crm-agent", spiffe_id, &[("team", "crm")]))
        .await
        .unwrap()
        .into_inner()
        .workload
        .unwrap();
    assert_eq!(created.spiffe_id, spiffe_id);
    let listed = admin
        .admin()
        .list_workloads(proto::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .workloads;
    let listed = listed.iter().find(|w| w.name == "crm-agent").unwrap();
    assert_eq!(
        listed.labels,
        HashMap::from([("team".to_string(), "crm".to_string())])
    );
    let token = broker.join_token("crm-agent", 600).await;
    let svid = broker.attest(&token).await.unwrap();
    assert_eq!(svid.spiffe_id, spiffe_id, "the SVID carries the entry's ID");

    for (bad, field) in [
        ("spiffe://other.domain/crm", "spiffe_id"),
        ("spiffe://test.local/crm/", "spiffe_id"),
        ("spiffe://test.local/../crm", "spiffe_id"),
        ("spiffe://test.local/crm?x=1", "spiffe_id"),
        ("https://test.local/crm", "spiffe_id"),
    ] {
        let status = admin
            .admin()
            .create_workload(entry("other", bad, &[]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
        assert!(status.message().starts_with(field), "{bad}: {status:?}");
    }
    let status = admin
        .admin()
        .create_workload(entry("other", "", &[("Team", "crm")]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("labels"), "{status:?}");
    let status = admin
        .admin()
        .create_workload(entry("other", spiffe_id, &[]))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::AlreadyExists,
        "one entry per SPIFFE ID"
    );
    assert!(status.message().starts_with("spiffe_id"), "{status:?}");
    let names = admin
        .admin()
        .list_workloads(proto::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .workloads;
    assert!(
        names.iter().all(|w| w.name != "other"),
        "nothing refused was stored"
    );
}

async fn deleting_an_entry_ends_its_identity_and_frees_only_its_selectors(backend: Backend) {
    let data = TestData::new(backend).await;
    let broker = TlsBroker::start(&data, |_| {}).await;
    let admin = broker.admin().await;
    let selectors = vec!["unix:uid:4242".to_string()];
    admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            selectors: selectors.clone(),
            ..entry("crm-agent", "", &[])
        })
        .await
        .unwrap();
    let token = broker.join_token("crm-agent", 600).await;
    let svid = broker.attest(&token).await.unwrap();
    let agent = broker
        .connect(None, Some(&identity_of(&svid)))
        .await
        .unwrap();
    let task = agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner();

    let deleted = admin
        .admin()
        .delete_workload(proto::DeleteWorkloadRequest {
            name: "crm-agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.revoked_task_ids, vec![task.task_id]);
    let status = agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "its SVID is refused");
    let listed = admin
        .admin()
        .list_workloads(proto::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .workloads;
    assert!(listed.iter().all(|w| w.name != "crm-agent"), "not listed");
    let again = admin
        .admin()
        .delete_workload(proto::DeleteWorkloadRequest {
            name: "crm-agent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    let no_token = admin
        .admin()
        .create_join_token(proto::CreateJoinTokenRequest {
            name: "crm-agent".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(no_token.code(), Code::NotFound, "{no_token:?}");

    let reused = admin
        .admin()
        .create_workload(entry("crm-agent", "", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        reused.code(),
        Code::AlreadyExists,
        "the name stays reserved"
    );
    let reused_id = admin
        .admin()
        .create_workload(entry(
            "crm-agent-2",
            "spiffe://test.local/workload/crm-agent",
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        reused_id.code(),
        Code::AlreadyExists,
        "so does the SPIFFE ID"
    );
    admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            selectors,
            ..entry("crm-agent-2", "", &[])
        })
        .await
        .expect("its selectors are free for another entry");
}
