//! An intermediate CA from the configuration (`[identity.upstream_ca]`): SVIDs chain through it
//! to the organisation's root, which is the whole trust bundle; they authenticate over mTLS;
//! rotation is left to the organisation; a broken setting stops the start, naming it.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use tonic::Code;
use warrant::config::{Config, UpstreamCaFiles};
use warrant::proto;

use crate::identity::{TlsBroker, identity_of, openssl};
use crate::support::*;

/// An organisation's PKI: a P-384 root and a P-256 intermediate it signed for Warrant.
struct Pki {
    root_pem: String,
    intermediate_pem: String,
    intermediate_key_pem: String,
}

fn ca_params(name: &str, constraint: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(constraint);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn pki() -> Pki {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let root_params = ca_params("Example Corp Root", BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let intermediate_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let intermediate = ca_params("Example Corp Warrant CA", BasicConstraints::Constrained(0))
        .signed_by(&intermediate_key, &root_issuer)
        .unwrap();
    Pki {
        root_pem: root.pem(),
        intermediate_pem: intermediate.pem(),
        intermediate_key_pem: intermediate_key.serialize_pem(),
    }
}

impl Pki {
    fn files(&self) -> UpstreamCaFiles {
        UpstreamCaFiles {
            cert_pem: self.intermediate_pem.clone().into_bytes(),
            key_pem: self.intermediate_key_pem.clone().into_bytes(),
            bundle_pem: self.root_pem.clone().into_bytes(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_from_an_upstream_ca_chain_to_the_organisations_root_and_work_over_mtls() {
    let data = TestData::new(Backend::Sqlite).await;
    let pki = pki();
    let broker = TlsBroker::start(&data, |config| config.upstream_ca = Some(pki.files())).await;
    let join_token = broker
        .register("crm-agent", &[proto::Role::Agent], &[])
        .await;
    let svid = broker.attest(&join_token).await.unwrap();

    assert_eq!(
        svid.bundle_pem, pki.root_pem,
        "the bundle is the root alone"
    );
    assert_eq!(
        svid.certificate_pem.matches("BEGIN CERTIFICATE").count(),
        2,
        "the leaf, then the intermediate"
    );
    assert!(svid.certificate_pem.ends_with(&pki.intermediate_pem));
    let dir = data.path();
    std::fs::write(dir.join("root.pem"), &pki.root_pem).unwrap();
    std::fs::write(dir.join("svid.pem"), &svid.certificate_pem).unwrap();
    std::fs::write(dir.join("intermediate.pem"), &pki.intermediate_pem).unwrap();
    let (verified, text) = openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "intermediate.pem",
            "-purpose",
            "sslclient",
            "svid.pem",
        ],
    );
    assert!(
        verified,
        "the SVID chains through the intermediate to the root: {text}"
    );
    let (alone, _) = openssl(dir, &["verify", "-CAfile", "root.pem", "svid.pem"]);
    assert!(
        !alone,
        "the leaf needs the intermediate: it is not signed by the root"
    );

    let agent = broker
        .connect(None, Some(&identity_of(&svid)))
        .await
        .unwrap();
    agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .expect("the SVID and its chain authenticate over mTLS");
    let renewed = agent
        .attestation()
        .renew_svid(proto::RenewSvidRequest {})
        .await
        .expect("renewal over mTLS")
        .into_inner()
        .svid
        .unwrap();
    assert!(renewed.certificate_pem.ends_with(&pki.intermediate_pem));

    let refused = broker
        .admin()
        .await
        .admin()
        .rotate_ca(proto::RotateCaRequest {
            activation_delay_seconds: Some(0),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("identity.upstream_ca"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_bundle_of_an_upstream_ca_carries_the_root_key() {
    let data = TestData::new(Backend::Sqlite).await;
    let pki = pki();
    let mut config = data.config();
    config.upstream_ca = Some(pki.files());
    let app = TestApp::spawn_with(config).await;
    let bundle = app.http("/trust-bundle.json");
    let keys = bundle["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{bundle}");
    assert_eq!(
        (keys[0]["kty"].as_str(), keys[0]["crv"].as_str()),
        (Some("EC"), Some("P-384"))
    );
    assert_eq!(
        keys[0]["x"].as_str().unwrap().len(),
        64,
        "48 bytes, base64url"
    );
    let (status, pem) = http_get(app.http_addr, "/trust-bundle.pem");
    assert_eq!((status, pem.as_str()), (200, pki.root_pem.as_str()));
}

/// The start-up error for `config`, which must not start.
async fn start_error(config: Config) -> String {
    match warrant::app::App::build(config).await {
        Ok(_) => panic!("the broker started"),
        Err(error) => {
            assert_eq!(error.exit_code(), 64, "a configuration error: {error}");
            error.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upstream_ca_stops_the_start_naming_the_setting() {
    let (pki, other) = (pki(), pki());
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["not-a-ca.example".into()])
        .unwrap()
        .self_signed(&leaf_key)
        .unwrap();
    let cases = [
        (
            UpstreamCaFiles {
                key_pem: other.intermediate_key_pem.clone().into_bytes(),
                ..pki.files()
            },
            "identity.upstream_ca.key_file",
        ),
        (
            UpstreamCaFiles {
                cert_pem: leaf.pem().into_bytes(),
                key_pem: leaf_key.serialize_pem().into_bytes(),
                ..pki.files()
            },
            "identity.upstream_ca.cert_file",
        ),
        (
            UpstreamCaFiles {
                bundle_pem: other.root_pem.clone().into_bytes(),
                ..pki.files()
            },
            "identity.upstream_ca.bundle_file",
        ),
        (
            UpstreamCaFiles {
                bundle_pem: b"no certificate here".to_vec(),
                ..pki.files()
            },
            "identity.upstream_ca.bundle_file",
        ),
    ];
    for (files, field) in cases {
        let data = TestData::new(Backend::Sqlite).await;
        let mut config = data.config();
        config.upstream_ca = Some(files);
        let error = start_error(config).await;
        assert!(error.starts_with(field), "{field}: {error}");
    }
}
