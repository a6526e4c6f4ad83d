//! Workload identity end to end over TLS: a join token traded once for an X.509-SVID (checked
//! by openssl, an independent X.509 implementation), calls over mTLS with it, tokens bound to
//! it, renewal, foreign certificates, and the kill switch.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic::Code;
use warrant::client::{ClientIdentity, Connection};
use warrant::config::{Config, TlsIdentity};
use warrant::proto;

use crate::support::*;

/// A broker on TLS (a `localhost` server certificate), as outside `--dev`.
pub struct TlsBroker {
    app: TestApp,
    server_ca: Vec<u8>,
}

impl TlsBroker {
    pub async fn start(data: &TestData, adjust: impl FnOnce(&mut Config)) -> TlsBroker {
        let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let mut config = data.config();
        config.tls = Some(TlsIdentity {
            cert_pem: server.cert.pem().into_bytes(),
            key_pem: server.signing_key.serialize_pem().into_bytes(),
        });
        adjust(&mut config);
        TlsBroker {
            app: TestApp::spawn_with(config).await,
            server_ca: server.cert.pem().into_bytes(),
        }
    }

    fn address(&self) -> String {
        format!("https://localhost:{}", self.app.grpc_addr.port())
    }

    pub async fn connect(
        &self,
        credential: Option<&str>,
        identity: Option<&ClientIdentity>,
    ) -> Result<Connection, warrant::client::ClientError> {
        Connection::open_as(&self.address(), credential, Some(&self.server_ca), identity).await
    }

    pub async fn admin(&self) -> Connection {
        self.connect(Some(&self.app.admin_token), None)
            .await
            .unwrap()
    }

    /// Registers workload `name` with `roles` and returns a join token for it.
    pub async fn register(&self, name: &str, roles: &[proto::Role], audiences: &[&str]) -> String {
        let admin = self.admin().await;
        admin
            .admin()
            .create_workload(proto::CreateWorkloadRequest {
                name: name.into(),
                roles: roles.iter().map(|role| *role as i32).collect(),
                audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
                no_bearer_credential: false,
                selectors: Vec::new(),
                ..Default::default()
            })
            .await
            .unwrap();
        self.join_token(name, 600).await
    }

    pub async fn join_token(&self, name: &str, ttl_seconds: u32) -> String {
        self.admin()
            .await
            .admin()
            .create_join_token(proto::CreateJoinTokenRequest {
                name: name.into(),
                ttl_seconds,
            })
            .await
            .unwrap()
            .into_inner()
            .join_token
    }

    pub async fn attest(&self, join_token: &str) -> Result<proto::X509Svid, tonic::Status> {
        let anonymous = self.connect(None, None).await.unwrap();
        let answer = anonymous
            .attestation()
            .attest(proto::AttestRequest {
                method: Some(proto::attest_request::Method::JoinToken(join_token.into())),
            })
            .await?;
        Ok(answer.into_inner().svid.unwrap())
    }
}

pub fn identity_of(svid: &proto::X509Svid) -> ClientIdentity {
    ClientIdentity {
        certificate_pem: svid.certificate_pem.clone().into_bytes(),
        private_key_pem: svid.private_key_pem.clone().into_bytes(),
    }
}

/// `openssl <args>` in `dir`: (succeeded, standard output and error).
pub fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_buys_one_svid_that_follows_the_spiffe_rules() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |_| {}).await;
    let token = broker
        .register("crm-agent", &[proto::Role::Agent], &[])
        .await;
    let svid = broker.attest(&token).await.expect("a fresh token attests");
    assert_eq!(svid.spiffe_id, "spiffe://test.local/workload/crm-agent");

    let dir = data.path();
    std::fs::write(dir.join("svid.pem"), &svid.certificate_pem).unwrap();
    std::fs::write(dir.join("bundle.pem"), &svid.bundle_pem).unwrap();
    let (verified, text) = openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            "bundle.pem",
            "-purpose",
            "sslclient",
            "svid.pem",
        ],
    );
    assert!(verified, "chains to the bundle as a TLS client: {text}");
    let (_, text) = openssl(dir, &["x509", "-in", "svid.pem", "-noout", "-text"]);
    let uri_sans = text.matches("URI:").count();
    assert_eq!(uri_sans, 1, "exactly one URI SAN: {text}");
    assert!(
        text.contains("URI:spiffe://test.local/workload/crm-agent"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "a leaf, not a CA: {text}");
    assert!(
        text.contains("X509v3 Key Usage: critical\n                Digital Signature\n"),
        "digital signature only, critical: {text}"
    );
    assert!(!text.contains("Certificate Sign") && !text.contains("CRL Sign"));
    assert!(
        text.contains("TLS Web Client Authentication"),
        "usable for mTLS: {text}"
    );
    let (_, dates) = openssl(dir, &["x509", "-in", "svid.pem", "-noout", "-subject"]);
    assert_eq!(dates.trim(), "subject=", "an empty subject: {dates}");
    let lifetime = svid.expires_at - warrant::domain::UnixMillis::now().as_seconds();
    assert!((3500..=3600).contains(&lifetime), "one hour: {lifetime}s");

    // Used once: a second use, or a made-up token, is refused the same way, and stores nothing.
    let svids = count_rows(&data, "svids").await;
    for presented in [
        token.clone(),
        format!("wjt_{}_{}", "0".repeat(32), "A".repeat(43)),
    ] {
        let refused = broker.attest(&presented).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(
            refused
                .message()
                .contains("unknown, already used or expired")
        );
    }
    assert_eq!(count_rows(&data, "svids").await, svids, "nothing stored");
    let refusals =
        audit_events_of_type(&broker.admin().await, "identity.attestation_refused").await;
    assert_eq!(refusals.len(), 2, "each refusal is audited");
    let trail = serde_json::to_string(&format!("{refusals:?}")).unwrap();
    assert!(!trail.contains(&token[36..]), "the token's secret is not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_join_token_is_refused() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |_| {}).await;
    broker
        .register("crm-agent", &[proto::Role::Agent], &[])
        .await;
    let short = broker.join_token("crm-agent", 1).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let refused = broker.attest(&short).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svid_authenticates_over_mtls_and_binds_the_tokens_issued_to_it() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |config| config.bearer_credentials = true).await;
    let agent_token = broker
        .register("crm-agent", &[proto::Role::Agent], &[])
        .await;
    let api_token = broker
        .register("crm-api", &[proto::Role::ResourceServer], &[CRM])
        .await;
    let svid = broker.attest(&agent_token).await.unwrap();
    let api_svid = broker.attest(&api_token).await.unwrap();
    let agent = broker
        .connect(None, Some(&identity_of(&svid)))
        .await
        .unwrap();
    let api = broker
        .connect(None, Some(&identity_of(&api_svid)))
        .await
        .unwrap();

    let task = agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .expect("the SVID is the caller's identity")
        .into_inner();
    let token = task.leases[0].credential.clone();
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], "spiffe://test.local/workload/crm-agent");
    assert_eq!(claims["cnf"]["x5t#S256"], svid.thumbprint.as_str());

    let introspect = |thumbprint: &str| {
        let (api, token, thumbprint) = (api.clone(), token.clone(), thumbprint.to_owned());
        async move {
            api.tokens()
                .introspect(proto::IntrospectRequest {
                    token,
                    audience: CRM.into(),
                    client_certificate_thumbprint: thumbprint,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let with_its_certificate = introspect(&svid.thumbprint).await;
    assert!(with_its_certificate.active);
    assert_eq!(with_its_certificate.cnf_x5t_s256, svid.thumbprint);
    assert!(
        !introspect("").await.active,
        "a stolen bound token presented without its certificate is inactive"
    );
    assert!(
        !introspect(&api_svid.thumbprint).await.active,
        "nor with another certificate"
    );

    // The offline verifier holds bound tokens to the same rule.
    use warrant::verifier::{Verifier, VerifierConfig, VerifyError};
    let verifier = Verifier::connect(VerifierConfig {
        ca_pem: Some(broker.server_ca.clone()),
        ..VerifierConfig::new(broker.address(), CRM, broker.app.admin_token.clone())
    })
    .await
    .unwrap();
    let der = |svid: &proto::X509Svid| {
        warrant::identity::pem::first_certificate_der(&svid.certificate_pem).unwrap()
    };
    let verified = verifier
        .verify_from_client(&token, Some(&der(&svid)))
        .await
        .expect("valid with its certificate");
    assert_eq!(verified.jti, task.leases[0].lease_id);
    assert!(matches!(
        verifier.verify(&token).await,
        Err(VerifyError::CertificateMismatch)
    ));
    assert!(matches!(
        verifier
            .verify_from_client(&token, Some(&der(&api_svid)))
            .await,
        Err(VerifyError::CertificateMismatch)
    ));

    // Renewal over mTLS gives a new certificate; the old one keeps working until it expires.
    let renewed = agent
        .attestation()
        .renew_svid(proto::RenewSvidRequest {})
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_ne!(renewed.thumbprint, svid.thumbprint);
    assert_eq!(renewed.spiffe_id, svid.spiffe_id);
    let renewed_agent = broker
        .connect(None, Some(&identity_of(&renewed)))
        .await
        .unwrap();
    renewed_agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .expect("the renewed SVID authenticates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_or_none_gets_nothing() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |config| config.bearer_credentials = false).await;
    // A certificate with the right SPIFFE ID, signed by a CA Warrant does not trust.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://test.local/workload/admin".try_into().unwrap(),
    )];
    let key = rcgen::KeyPair::generate().unwrap();
    let forged = params.self_signed(&key).unwrap();
    let forged = ClientIdentity {
        certificate_pem: forged.pem().into_bytes(),
        private_key_pem: key.serialize_pem().into_bytes(),
    };
    let refused = match broker.connect(None, Some(&forged)).await {
        Err(_) => true,
        Ok(connection) => connection
            .admin()
            .list_workloads(proto::ListWorkloadsRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "the handshake (or the call) refuses a foreign CA");

    let anonymous = broker.connect(None, None).await.unwrap();
    let status = anonymous
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // With bearer credentials switched off, even the first admin's is refused, saying why.
    let status = broker
        .admin()
        .await
        .admin()
        .list_workloads(proto::ListWorkloadsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("identity.bearer_credentials"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_on_http_introspection_is_audited_too() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let made_up = "wrt_not_a_real_credential";
    let (status, _) = http_introspect(app.http_addr, Some(made_up), "token=x");
    assert_eq!(status, 401);
    let events = audit_events_of_type(&app.admin().await, "identity.authentication_refused").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        events[0].detail_json.contains("\"method\":\"bearer\""),
        "{events:?}"
    );
    assert!(!events[0].detail_json.contains(made_up));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_svid_is_refused_on_an_open_connection_and_at_the_handshake() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |config| config.svid_ttl = Duration::from_secs(2)).await;
    let join_token = broker
        .register("short-lived", &[proto::Role::Agent], &[])
        .await;
    let svid = broker.attest(&join_token).await.unwrap();
    let open = broker
        .connect(None, Some(&identity_of(&svid)))
        .await
        .unwrap();
    open.tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .expect("valid while it lasts");

    // Past its expiry by more than the second to which certificate times are rounded.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let status = open
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");

    let refused = match broker.connect(None, Some(&identity_of(&svid))).await {
        Err(_) => true,
        Ok(connection) => connection
            .tasks()
            .begin_task(begin(&["crm.contacts:read"]))
            .await
            .is_err(),
    };
    assert!(refused, "a new connection with it fails its handshake");
    let admin = broker.admin().await;
    let audited = || async {
        audit_events_of_type(&admin, "identity.authentication_refused")
            .await
            .iter()
            .any(|event| event.detail_json.contains("certificate_expired"))
    };
    assert!(
        eventually(Duration::from_secs(5), audited).await,
        "the refused handshake is audited: {:?}",
        audit_events_of_type(&admin, "identity.authentication_refused").await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_authentications_are_audited_with_the_reason_and_never_the_secret() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |_| {}).await;
    let admin = broker.admin().await;

    // A certificate from a CA Warrant does not trust: refused at the handshake.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://test.local/workload/admin".try_into().unwrap(),
    )];
    let key = rcgen::KeyPair::generate().unwrap();
    let forged = ClientIdentity {
        certificate_pem: params.self_signed(&key).unwrap().pem().into_bytes(),
        private_key_pem: key.serialize_pem().into_bytes(),
    };
    if let Ok(connection) = broker.connect(None, Some(&forged)).await {
        let refused = connection
            .admin()
            .list_workloads(proto::ListWorkloadsRequest {})
            .await;
        assert!(refused.is_err());
    }

    // A certificate Warrant issued, for an identity since revoked: refused on the call.
    let join_token = broker
        .register("gone-agent", &[proto::Role::Agent], &[])
        .await;
    let svid = broker.attest(&join_token).await.unwrap();
    admin
        .admin()
        .revoke_identity(proto::RevokeIdentityRequest {
            name: "gone-agent".into(),
        })
        .await
        .unwrap();
    let revoked = broker
        .connect(None, Some(&identity_of(&svid)))
        .await
        .unwrap();
    let status = revoked
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A bearer credential with a wrong secret.
    let credential = admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "bearer-agent".into(),
            roles: vec![proto::Role::Agent as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .credential;
    // The same credential id with one character of its secret changed.
    let replacement = if credential.ends_with('A') { "B" } else { "A" };
    let wrong = format!("{}{replacement}", &credential[..credential.len() - 1]);
    let status = broker
        .connect(Some(&wrong), None)
        .await
        .unwrap()
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let reasons = || async {
        audit_events_of_type(&admin, "identity.authentication_refused")
            .await
            .iter()
            .map(|event| event.detail_json.clone())
            .collect::<Vec<_>>()
    };
    let all_three = || async {
        let details = reasons().await;
        [
            "certificate_from_another_ca",
            "not_a_current_svid",
            "unknown_or_revoked_credential",
        ]
        .iter()
        .all(|reason| details.iter().any(|detail| detail.contains(reason)))
    };
    assert!(
        eventually(Duration::from_secs(5), all_three).await,
        "each refusal is audited with its reason: {:?}",
        reasons().await
    );
    for detail in reasons().await {
        assert!(detail.contains("127.0.0.1"), "the peer is named: {detail}");
        assert!(
            !detail.contains(&wrong) && !detail.contains(&credential),
            "{detail}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_refuses_the_identity_and_revokes_its_open_tasks() {
    let data = TestData::new(Backend::Sqlite).await;
    let broker = TlsBroker::start(&data, |_| {}).await;
    let token = broker
        .register("crm-agent", &[proto::Role::Agent], &[])
        .await;
    let spare_token = broker.join_token("crm-agent", 600).await;
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
    let admin = broker.admin().await;
    let mut feed = admin
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .unwrap()
        .into_inner();

    let revoked = admin
        .admin()
        .revoke_identity(proto::RevokeIdentityRequest {
            name: "crm-agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_task_ids, vec![task.task_id.clone()]);
    assert_eq!(revoked.revoked_leases, 1);

    let status = agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "the SVID is refused at once"
    );
    let refused = broker.attest(&spare_token).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "unused join tokens too"
    );
    let no_new_token = admin
        .admin()
        .create_join_token(proto::CreateJoinTokenRequest {
            name: "crm-agent".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(
        no_new_token.code(),
        Code::FailedPrecondition,
        "nor new ones"
    );
    let token_active = admin
        .tokens()
        .introspect(proto::IntrospectRequest {
            token: task.leases[0].credential.clone(),
            audience: CRM.into(),
            client_certificate_thumbprint: svid.thumbprint.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .active;
    assert!(!token_active, "its tokens are revoked");
    let reported = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let message = feed.message().await.unwrap().unwrap();
            if message
                .events
                .iter()
                .any(|event| event.task_id == task.task_id)
            {
                return;
            }
        }
    })
    .await;
    assert!(reported.is_ok(), "the revocation is on the feed");

    let status = admin
        .admin()
        .revoke_identity(proto::RevokeIdentityRequest {
            name: "admin".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "not the caller itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_bundle_is_served_over_http_as_pem_and_as_a_spiffe_bundle() {
    use base64::Engine;
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let (status, pem) = http_get(app.http_addr, "/trust-bundle.pem");
    assert_eq!(status, 200);
    std::fs::write(data.path().join("bundle.pem"), &pem).unwrap();
    let (parsed, text) = openssl(
        data.path(),
        &["x509", "-in", "bundle.pem", "-noout", "-text"],
    );
    assert!(parsed, "{text}");
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("URI:spiffe://test.local"), "{text}");
    assert!(text.contains("Certificate Sign"), "{text}");

    let bundle = app.http("/trust-bundle.json");
    let key = &bundle["keys"][0];
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    let der = base64::engine::general_purpose::STANDARD
        .decode(key["x5c"][0].as_str().unwrap())
        .unwrap();
    let from_pem: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(from_pem)
            .unwrap(),
        der,
        "both forms carry the same CA certificate"
    );
}

/// The SHA-256 (hex) of this test process's executable, as the `unix` attestor sees it.
pub fn own_executable_sha256() -> String {
    let bytes = std::fs::read("/proc/self/exe").unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_process_attests_by_its_unix_identity_on_the_local_socket_only() {
    let data = TestData::new(Backend::Sqlite).await;
    let socket = data.path().join("warrant.sock");
    let mut config = data.config();
    config.unix_socket = Some(socket.clone());
    let app = TestApp::spawn_with(config).await;
    let admin = app.admin().await;
    let register = |name: &str, selectors: Vec<String>| {
        let (admin, name) = (admin.clone(), name.to_owned());
        async move {
            admin
                .admin()
                .create_workload(proto::CreateWorkloadRequest {
                    name,
                    roles: vec![proto::Role::Agent as i32],
                    audiences: Vec::new(),
                    no_bearer_credential: true,
                    selectors,
                    ..Default::default()
                })
                .await
        }
    };
    let uid = format!("unix:uid:{}", own_uid());
    let exe = format!("unix:sha256:{}", own_executable_sha256());
    // Any process of this user, and (more specific) this very executable of this user.
    register("any-tool", vec![uid.clone()]).await.unwrap();
    register("this-test", vec![exe.clone(), uid.clone()])
        .await
        .unwrap();
    register("other-user", vec!["unix:uid:4242".into()])
        .await
        .unwrap();

    let unix = || proto::AttestRequest {
        method: Some(proto::attest_request::Method::Unix(
            proto::UnixAttestation {},
        )),
    };
    let local = Connection::open_unix(&socket).await.unwrap();
    let svid = local
        .attestation()
        .attest(unix())
        .await
        .expect("this process matches")
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(
        svid.spiffe_id, "spiffe://test.local/workload/this-test",
        "the most specific registration names the identity"
    );

    let over_tcp = app.connect(None).await.attestation().attest(unix()).await;
    let refused = over_tcp.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("local Unix socket"),
        "{refused:?}"
    );

    // Bad selectors are refused naming the field; a second registration with the same set is
    // refused too, since a process could not tell the two apart.
    let bad = register("bad", vec!["unix:uid:me".into()])
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("selectors[0]:"), "{bad:?}");
    let twin = register("twin", vec![uid.clone(), exe.clone()])
        .await
        .unwrap_err();
    assert_eq!(twin.code(), Code::AlreadyExists, "{twin:?}");

    // Without a matching registration, nothing is issued.
    admin
        .admin()
        .revoke_identity(proto::RevokeIdentityRequest {
            name: "this-test".into(),
        })
        .await
        .unwrap();
    let svids = count_rows(&data, "svids").await;
    let next = local
        .attestation()
        .attest(unix())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next.svid.unwrap().spiffe_id,
        "spiffe://test.local/workload/any-tool",
        "a revoked identity no longer matches; the broader registration does"
    );
    assert_eq!(count_rows(&data, "svids").await, svids + 1);
}
