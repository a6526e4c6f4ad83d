//! The SPIFFE Workload API on the local socket, driven by an existing SPIFFE client library
//! (rust-spiffe, not code written here): it fetches an X.509-SVID and the bundle, receives the
//! rotated SVID on its stream before half the first one's lifetime is over, and loses its
//! identity when its entry is deleted; it gets a JWT-SVID, which checks out through
//! `ValidateJWTSVID` and against the JWT bundle. A call without the security header is refused.

use std::time::{Duration, Instant};

use spiffe::{TrustDomain, WorkloadApiClient};
use tokio_stream::StreamExt;
use tonic::Code;
use warrant::client::Connection;
use warrant::domain::UnixMillis;
use warrant::proto;
use warrant::proto::spiffe_workload::X509svidRequest;
use warrant::proto::spiffe_workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

use crate::identity::{own_executable_sha256, own_uid};
use crate::support::*;

/// SVIDs live this long here, so the stream's re-issue (at half of it) comes within seconds.
const SVID_TTL: Duration = Duration::from_secs(4);

pub const THIS_TEST: &str = "spiffe://test.local/workload/this-test";

/// A broker with its local socket, and this test process registered by its Unix identity; the
/// data directory lives as long as the returned `TestData`.
async fn broker_with_this_process_registered() -> (TestData, TestApp, std::path::PathBuf) {
    broker_with_this_process_registered_for(SVID_TTL).await
}

/// [`broker_with_this_process_registered`], with SVIDs that live `svid_ttl`.
pub async fn broker_with_this_process_registered_for(
    svid_ttl: Duration,
) -> (TestData, TestApp, std::path::PathBuf) {
    let data = TestData::new(Backend::Sqlite).await;
    let socket = data.path().join("warrant.sock");
    let mut config = data.config();
    config.unix_socket = Some(socket.clone());
    config.svid_ttl = svid_ttl;
    let app = TestApp::spawn_with(config).await;
    app.admin()
        .await
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "this-test".into(),
            roles: vec![proto::Role::Agent as i32],
            no_bearer_credential: true,
            selectors: vec![
                format!("unix:uid:{}", own_uid()),
                format!("unix:sha256:{}", own_executable_sha256()),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    (data, app, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_client_library_fetches_and_rotates_its_x509_svid() {
    let (_data, app, socket) = broker_with_this_process_registered().await;
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .expect("the client library connects");

    let svid = client.fetch_x509_svid().await.expect("an X.509-SVID");
    assert_eq!(svid.spiffe_id().to_string(), THIS_TEST);
    let bundles = client.fetch_x509_bundles().await.expect("the bundles");
    let trust_domain = TrustDomain::new("test.local").unwrap();
    let bundle = bundles
        .get(&trust_domain)
        .expect("our trust domain's bundle");
    let attested = Connection::open_unix(&socket)
        .await
        .unwrap()
        .attestation()
        .attest(proto::AttestRequest {
            method: Some(proto::attest_request::Method::Unix(
                proto::UnixAttestation {},
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let ca = warrant::identity::pem::first_certificate_der(&attested.bundle_pem).unwrap();
    assert_eq!(
        bundle
            .authorities()
            .iter()
            .map(|authority| authority.as_bytes().to_vec())
            .collect::<Vec<_>>(),
        vec![ca],
        "the bundle is the broker's CA"
    );

    let mut updates = client.stream_x509_svids().await.unwrap();
    let started = Instant::now();
    let first = updates.next().await.unwrap().expect("the first SVID");
    let second = tokio::time::timeout(SVID_TTL, updates.next())
        .await
        .expect("a fresh SVID before the first one expires")
        .unwrap()
        .expect("the rotated SVID");
    let waited = started.elapsed();
    assert_eq!(second.spiffe_id().to_string(), THIS_TEST);
    assert_ne!(
        first.leaf().as_bytes(),
        second.leaf().as_bytes(),
        "a new certificate"
    );
    assert_ne!(
        first.private_key().as_bytes(),
        second.private_key().as_bytes(),
        "with a new key"
    );
    assert!(
        waited >= SVID_TTL / 2 - Duration::from_millis(500) && waited < SVID_TTL,
        "re-issued at half its lifetime, not at once and not after expiry: {waited:?}"
    );

    // Deleting the entry ends the identity: the stream's next re-issue is refused.
    delete_this_test(&app).await;
    let after_delete = tokio::time::timeout(SVID_TTL, updates.next())
        .await
        .expect("the stream answers by the next re-issue");
    assert!(
        matches!(after_delete, Some(Err(_)) | None),
        "no SVID after the entry is gone: {after_delete:?}"
    );
    let refused = client.fetch_x509_svid().await;
    assert!(refused.is_err(), "a new call is refused too: {refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_api_call_without_the_security_header_or_an_identity_is_refused() {
    let (_data, app, socket) = broker_with_this_process_registered().await;
    let channel = Connection::open_unix(&socket).await.unwrap().channel();

    let without_header = SpiffeWorkloadApiClient::new(channel.clone())
        .fetch_x509svid(X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(without_header.code(), Code::InvalidArgument);
    assert!(
        without_header.message().contains("workload.spiffe.io"),
        "{without_header:?}"
    );

    delete_this_test(&app).await;
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let unregistered = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
        .unwrap_err();
    assert_eq!(
        unregistered.code(),
        Code::PermissionDenied,
        "a process no entry matches has no identity: {unregistered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_client_library_gets_a_jwt_svid_checked_by_the_api_and_by_the_bundle() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (_data, app, socket) = broker_with_this_process_registered().await;
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();

    let svid = client
        .fetch_jwt_svid(["https://crm.test"], None)
        .await
        .expect("a JWT-SVID");
    assert_eq!(svid.spiffe_id().to_string(), THIS_TEST);
    assert_eq!(svid.audience(), ["https://crm.test".to_owned()]);
    let lifetime = svid.expiry().unix_timestamp() - UnixMillis::now().as_seconds();
    assert!((1..=300).contains(&lifetime), "short-lived: {lifetime} s");

    let validated = client
        .validate_jwt_token("https://crm.test", svid.token())
        .await
        .expect("ValidateJWTSVID accepts it for its audience");
    assert_eq!(validated.spiffe_id().to_string(), THIS_TEST);
    assert!(
        client
            .validate_jwt_token("https://billing.test", svid.token())
            .await
            .is_err(),
        "another audience is refused"
    );
    let (signing_input, signature) = svid.token().rsplit_once('.').unwrap();
    let mut forged_signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    forged_signature[0] ^= 1;
    let forged = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(forged_signature)
    );
    assert!(
        client
            .validate_jwt_token("https://crm.test", &forged)
            .await
            .is_err(),
        "a bad signature is refused"
    );

    // Through the bundle, as a validator without the API would: the JWK the client library
    // parsed for the token's key id verifies its ES256 signature (checked here with ring).
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(svid.token().split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ES256");
    let bundles = client.fetch_jwt_bundles().await.expect("the JWT bundles");
    let bundle = bundles
        .get(&TrustDomain::new("test.local").unwrap())
        .expect("our trust domain's JWT bundle");
    let authority = bundle
        .find_jwt_authority(svid.key_id())
        .expect("the token's key is in the bundle");
    let jwk: serde_json::Value = serde_json::from_slice(authority.jwk_json()).unwrap();
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    let coordinate = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
    let point = [vec![0x04], coordinate("x"), coordinate("y")].concat();
    let public_key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point);
    let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    assert!(
        public_key
            .verify(signing_input.as_bytes(), &signature)
            .is_ok()
    );
    let forged_input = signing_input.replacen('.', ".e30", 1);
    assert!(
        public_key
            .verify(forged_input.as_bytes(), &signature)
            .is_err()
    );
    // The kill switch reaches JWT-SVIDs checked by the API at once.
    delete_this_test(&app).await;
    assert!(
        client
            .validate_jwt_token("https://crm.test", svid.token())
            .await
            .is_err(),
        "the deleted entry's JWT-SVID is refused"
    );
}

/// Deletes this test process's entry: the kill switch.
async fn delete_this_test(app: &TestApp) {
    app.admin()
        .await
        .admin()
        .delete_workload(proto::DeleteWorkloadRequest {
            name: "this-test".into(),
        })
        .await
        .unwrap();
}
