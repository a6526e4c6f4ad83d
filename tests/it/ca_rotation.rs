//! CA rotation with overlap: a rotated CA signs new SVIDs from its activation on, the retired
//! one stays in the trust bundle (HTTP, attestation answers, the Workload API's streams) so
//! the SVIDs it signed keep working over mTLS, a pending rotation blocks another, a replica on
//! the same PostgreSQL adopts the rotation, and a CA close to its expiry is replaced without an
//! admin, once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spiffe::{TrustDomain, WorkloadApiClient};
use tokio_stream::StreamExt;
use tonic::Code;
use warrant::client::Connection;
use warrant::domain::{TrustDomain as OurTrustDomain, UnixMillis};
use warrant::identity::Ca;
use warrant::identity::jwt_svid::JwtSvidKey;
use warrant::issuer::MasterKey;
use warrant::proto;
use warrant::store::StoreSettings;

use crate::identity::{TlsBroker, identity_of, openssl};
use crate::support::*;
use crate::workload_api::{THIS_TEST, broker_with_this_process_registered_for};

async fn rotate(
    admin: &Connection,
    delay_seconds: u32,
) -> Result<proto::RotateCaResponse, tonic::Status> {
    admin
        .admin()
        .rotate_ca(proto::RotateCaRequest {
            activation_delay_seconds: Some(delay_seconds),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The number of PEM certificates in `pem`.
fn certificate_count(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

/// Whether `svid_pem` chains to one of the certificates in `ca_pem`, by the openssl CLI.
fn chains_to(dir: &Path, svid_pem: &str, ca_pem: &str) -> bool {
    std::fs::write(dir.join("leaf.pem"), svid_pem).unwrap();
    std::fs::write(dir.join("roots.pem"), ca_pem).unwrap();
    openssl(dir, &["verify", "-CAfile", "roots.pem", "leaf.pem"]).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_ca_signs_new_svids_and_the_retired_one_stays_trusted() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |_| {}).await;
    let admin = broker.admin().await;
    let join_token = broker
        .register("crm-agent", &[proto::Role::Agent], &[])
        .await;
    let old_svid = broker.attest(&join_token).await.unwrap();
    let old_bundle = old_svid.bundle_pem.clone();
    assert_eq!(certificate_count(&old_bundle), 1);
    let begin_as = |svid: proto::X509Svid| {
        let broker = &broker;
        async move {
            let agent = broker
                .connect(None, Some(&identity_of(&svid)))
                .await
                .map_err(|error| error.to_string())?;
            agent
                .tasks()
                .begin_task(begin(&["crm.contacts:read"]))
                .await
                .map(drop)
                .map_err(|status| status.to_string())
        }
    };
    begin_as(old_svid.clone())
        .await
        .expect("an SVID authenticates before the rotation");

    let rotation = rotate(&admin, 0).await.expect("an admin rotates the CA");
    assert_eq!(rotation.retired_ca_id, "ca-1");
    assert_ne!(rotation.new_ca_id, "ca-1");
    let published_until = rotation.retired_ca_published_until.unwrap().seconds;
    let activates_at = rotation.activates_at.unwrap().seconds;
    assert!(
        published_until >= activates_at + 3600,
        "the retired CA outlives the longest SVID it may have signed (1 h): {rotation:?}"
    );

    let new_svid = broker
        .attest(&broker.join_token("crm-agent", 60).await)
        .await
        .unwrap();
    let bundle = new_svid.bundle_pem.clone();
    assert_eq!(certificate_count(&bundle), 2, "old and new roots: {bundle}");
    assert!(
        bundle.starts_with(&old_bundle),
        "the retired root stays, first"
    );
    let new_root = bundle.trim_start_matches(&old_bundle);
    assert!(
        chains_to(data.path(), &new_svid.certificate_pem, new_root),
        "the new SVID is signed by the new CA"
    );
    assert!(
        !chains_to(data.path(), &new_svid.certificate_pem, &old_bundle),
        "and not by the retired one"
    );
    assert!(chains_to(data.path(), &old_svid.certificate_pem, &bundle));

    // Both SVIDs authenticate over mTLS: the listener's client check follows the bundle.
    for svid in [&old_svid, &new_svid] {
        begin_as(svid.clone())
            .await
            .expect("an SVID of either CA in the bundle is accepted");
    }

    // A rotation that waits for its activation: the current CA keeps signing, another
    // rotation is refused until then.
    let pending = rotate(&admin, 3600).await.unwrap();
    assert_eq!(pending.retired_ca_id, rotation.new_ca_id);
    let refused = rotate(&admin, 0).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let too_long = rotate(&admin, 86_401).await.unwrap_err();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(
        too_long.message().contains("activation_delay_seconds"),
        "{too_long:?}"
    );
    assert!(
        refused.message().contains(&pending.new_ca_id),
        "{refused:?}"
    );
    let meanwhile = broker
        .attest(&broker.join_token("crm-agent", 60).await)
        .await
        .unwrap();
    assert_eq!(certificate_count(&meanwhile.bundle_pem), 3);
    assert!(
        chains_to(data.path(), &meanwhile.certificate_pem, new_root),
        "before its activation the pending CA signs nothing"
    );

    let events = audit_events_of_type(&admin, "ca.rotated").await;
    assert_eq!(events.len(), 2, "each rotation is audited");
    assert!(events[0].detail_json.contains(&rotation.new_ca_id));
}

/// A broker with this process registered, and a SPIFFE client library on its socket. SVIDs
/// live long here, so what the streams send next comes from a rotation, not their half-life.
async fn workload_api_client() -> (TestData, TestApp, WorkloadApiClient) {
    let (data, app, socket) =
        broker_with_this_process_registered_for(Duration::from_secs(600)).await;
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();
    (data, app, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_client_library_receives_the_rotated_bundle_and_svid_on_its_streams() {
    let (_data, app, client) = workload_api_client().await;
    let trust_domain = TrustDomain::new("test.local").unwrap();
    let mut bundles = client.stream_x509_bundles().await.unwrap();
    let mut svids = client.stream_x509_svids().await.unwrap();
    let first_bundle = bundles.next().await.unwrap().unwrap();
    let first_svid = svids.next().await.unwrap().unwrap();
    assert_eq!(
        first_bundle.get(&trust_domain).unwrap().authorities().len(),
        1
    );

    rotate(&app.admin().await, 0).await.unwrap();
    let wait = Duration::from_secs(5);
    let rotated_bundle = tokio::time::timeout(wait, bundles.next())
        .await
        .expect("the bundle stream sends the rotated bundle at once")
        .unwrap()
        .unwrap();
    let authorities = rotated_bundle.get(&trust_domain).unwrap();
    assert_eq!(authorities.authorities().len(), 2, "old and new roots");
    let rotated_svid = tokio::time::timeout(wait, svids.next())
        .await
        .expect("the SVID stream sends a fresh SVID at once")
        .unwrap()
        .unwrap();
    assert_eq!(rotated_svid.spiffe_id().to_string(), THIS_TEST);
    assert_ne!(first_svid.leaf().as_bytes(), rotated_svid.leaf().as_bytes());
    let new_root = &authorities.authorities()[1];
    let dir = tempfile::tempdir().unwrap();
    let pem = |der: &[u8]| warrant::identity::pem::to_pem(der);
    assert!(
        chains_to(
            dir.path(),
            &pem(rotated_svid.leaf().as_bytes()),
            &pem(new_root.as_bytes())
        ),
        "the fresh SVID is signed by the new CA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_rotation_resends_the_same_svid_with_the_new_bundle() {
    let (_data, app, client) = workload_api_client().await;
    let trust_domain = TrustDomain::new("test.local").unwrap();
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let first = contexts.next().await.unwrap().unwrap();

    rotate(&app.admin().await, 3600).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), contexts.next())
        .await
        .expect("the stream sends the new bundle at once")
        .unwrap()
        .unwrap();
    let roots = |context: &spiffe::X509Context| {
        context
            .bundle_set()
            .get(&trust_domain)
            .unwrap()
            .authorities()
            .len()
    };
    assert_eq!((roots(&first), roots(&next)), (1, 2));
    let leaf =
        |context: &spiffe::X509Context| context.default_svid().unwrap().leaf().as_bytes().to_vec();
    assert_eq!(
        leaf(&first),
        leaf(&next),
        "the CA that signs has not changed, so neither has the SVID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn postgres_a_replica_adopts_a_rotation_and_concurrent_rotations_make_one_ca() {
    let (_data, first, second) = postgres_replicas().await;
    let (admin_first, admin_second) = (first.admin().await, second.admin().await);
    let (one, other) = tokio::join!(rotate(&admin_first, 3600), rotate(&admin_second, 3600));
    let outcomes = [one.is_ok(), other.is_ok()];
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "exactly one of two concurrent rotations wins: {one:?} {other:?}"
    );
    let refused = if one.is_ok() { other } else { one }.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    let both_serve_two_roots = || async {
        [&first, &second].iter().all(|app| {
            let pem = http_get(app.http_addr, "/trust-bundle.pem").1;
            let jwks = http_get_json(app.http_addr, "/trust-bundle.json");
            certificate_count(&pem) == 2 && jwks["keys"].as_array().map(Vec::len) == Some(2)
        })
    };
    assert!(
        eventually(Duration::from_secs(5), both_serve_two_roots).await,
        "both replicas serve the current and the pending root, as PEM and as a SPIFFE bundle"
    );
}

backend_tests!(a_ca_close_to_its_expiry_is_rotated_once_without_an_admin);

/// Two replicas' CAs (one store: the race is decided there on either backend) checking a month
/// before the CA's year is up: one rotates, and a pending rotation stops the next check.
async fn a_ca_close_to_its_expiry_is_rotated_once_without_an_admin(backend: Backend) {
    let data = TestData::new(backend).await;
    let store = warrant::store::open(&data.database_url, StoreSettings::default())
        .await
        .unwrap();
    let trust_domain = OurTrustDomain::parse("trust_domain", "test.local").unwrap();
    let master_key = Arc::new(MasterKey::ephemeral());
    let replica = || {
        let (store, master_key, trust_domain) =
            (store.clone(), master_key.clone(), trust_domain.clone());
        async move {
            let jwt_svids = JwtSvidKey::in_memory(&trust_domain);
            Ca::load_or_create(store.as_ref(), master_key, &trust_domain, jwt_svids)
                .await
                .unwrap()
        }
    };
    let (first, second) = (replica().await, replica().await);
    let svid_ttl = Duration::from_secs(3600);
    let now = UnixMillis::now();
    let fresh = first
        .rotate_if_expiring(store.as_ref(), svid_ttl, "test", now)
        .await;
    assert!(fresh.unwrap().is_none(), "a CA with a year left is not due");

    let late = now.plus(Duration::from_secs(340 * 24 * 3600));
    let (one, other) = tokio::join!(
        first.rotate_if_expiring(store.as_ref(), svid_ttl, "test", late),
        second.rotate_if_expiring(store.as_ref(), svid_ttl, "test", late),
    );
    let rotations: Vec<_> = [one.unwrap(), other.unwrap()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(
        rotations.len(),
        1,
        "exactly one replica rotates: {rotations:?}"
    );
    assert_eq!(rotations[0].retired_ca_id, "ca-1");
    for ca in [&first, &second] {
        ca.reload(store.as_ref()).await.unwrap();
        assert_eq!(ca.trust_bundle().certificates().count(), 2);
    }
    let again = first
        .rotate_if_expiring(store.as_ref(), svid_ttl, "test", late)
        .await;
    assert!(
        again.unwrap().is_none(),
        "the pending rotation stops another"
    );
}
