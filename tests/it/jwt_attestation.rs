//! The `jwt` attestor end to end: a platform token (a Kubernetes-style service-account token
//! signed RS256, a CI-style OIDC token signed ES256) buys the SVID of the entry its `jwt:`
//! selectors match; forged, expired, wrong-audience, unknown-issuer, unknown-key and
//! `alg: none` tokens buy nothing and are audited.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use tonic::Code;
use warrant::domain::UnixMillis;
use warrant::https_client::HttpsUrl;
use warrant::identity::jwt_attestor::{DEFAULT_MIN_REFRESH, JwksSource, JwtIssuerConfig};
use warrant::proto;

use crate::support::*;

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "warrant";

/// The external issuer's two keys, as a platform would hold them.
struct Platform {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
}

impl Platform {
    fn new(dir: &std::path::Path) -> Platform {
        // ring cannot generate RSA keys; the openssl CLI makes one, as an operator would.
        let der = dir.join("rsa.der");
        let made = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .args(["-outform", "DER", "-out"])
            .arg(&der)
            .output()
            .expect("openssl runs");
        assert!(made.status.success(), "{made:?}");
        // OpenSSL writes an RSA key as DER in the PKCS#1 form.
        let rsa = RsaKeyPair::from_der(&std::fs::read(der).unwrap()).unwrap();
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let ec = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        Platform { rsa, ec }
    }

    fn jwks(&self) -> Value {
        let components = signature::RsaPublicKeyComponents::<Vec<u8>>::from(self.rsa.public());
        let point = self.ec.public_key().as_ref();
        json!({ "keys": [
            { "kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
              "n": URL_SAFE_NO_PAD.encode(&components.n), "e": URL_SAFE_NO_PAD.encode(&components.e) },
            { "kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
              "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..]) },
        ]})
    }

    /// A token with `claims`, signed as `alg` by the key `kid` names.
    fn sign(&self, alg: &str, kid: &str, claims: &Value) -> String {
        self.sign_with_header(&json!({ "alg": alg, "kid": kid, "typ": "JWT" }), claims)
    }

    /// A token with `header` and `claims`, signed with the key the header's `alg` names.
    fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let alg = header["alg"].as_str().unwrap();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let signature = match alg {
            "RS256" => {
                let mut signature = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PKCS1_SHA256,
                        &rng,
                        input.as_bytes(),
                        &mut signature,
                    )
                    .unwrap();
                signature
            }
            _ => self
                .ec
                .sign(&rng, input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

fn now() -> i64 {
    UnixMillis::now().as_seconds()
}

fn service_account_claims() -> Value {
    json!({
        "iss": ISSUER, "aud": [AUDIENCE], "sub": "system:serviceaccount:prod:crm",
        "iat": now(), "exp": now() + 600,
    })
}

fn attest(token: String) -> proto::AttestRequest {
    proto::AttestRequest {
        method: Some(proto::attest_request::Method::Jwt(token)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_token_buys_the_matching_svid_and_a_bad_one_buys_nothing() {
    let data = TestData::new(Backend::Sqlite).await;
    let platform = Platform::new(data.path());
    let jwks_file = data.path().join("issuer-jwks.json");
    std::fs::write(&jwks_file, platform.jwks().to_string()).unwrap();
    let mut config = data.config();
    config.jwt_issuers = vec![JwtIssuerConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        jwks: JwksSource::File(jwks_file),
        claims: vec!["repository".into()],
        min_refresh: DEFAULT_MIN_REFRESH,
    }];
    let app = TestApp::spawn_with(config).await;
    let admin = app.admin().await;
    let register = |name: &str, selectors: &[&str]| {
        let (admin, name) = (admin.clone(), name.to_owned());
        let selectors = selectors.iter().map(|s| s.to_string()).collect();
        async move {
            admin
                .admin()
                .create_workload(proto::CreateWorkloadRequest {
                    name,
                    roles: vec![proto::Role::Agent as i32],
                    no_bearer_credential: true,
                    selectors,
                    ..Default::default()
                })
                .await
        }
    };
    register(
        "crm",
        &[
            "jwt:iss:https://issuer.test",
            "jwt:sub:system:serviceaccount:prod:crm",
        ],
    )
    .await
    .unwrap();
    register(
        "release",
        &[
            "jwt:iss:https://issuer.test",
            "jwt:claim:repository:acme/app",
        ],
    )
    .await
    .unwrap();
    let without_issuer = register("loose", &["jwt:sub:system:serviceaccount:prod:crm"])
        .await
        .unwrap_err();
    assert_eq!(without_issuer.code(), Code::InvalidArgument);
    assert!(
        without_issuer.message().contains("jwt:iss"),
        "{without_issuer:?}"
    );

    let attestation = || async { app.connect(None).await.attestation() };
    let svid = attestation()
        .await
        .attest(attest(platform.sign(
            "RS256",
            "rsa-1",
            &service_account_claims(),
        )))
        .await
        .expect("a service-account token signed RS256")
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://test.local/workload/crm");
    let ci_claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "repo:acme/app:ref:refs/heads/main",
        "repository": "acme/app", "exp": now() + 300,
    });
    let svid = attestation()
        .await
        .attest(attest(platform.sign("ES256", "ec-1", &ci_claims)))
        .await
        .expect("a CI token signed ES256, matched by a chosen claim")
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://test.local/workload/release");

    let svids = count_rows(&data, "svids").await;
    let good = platform.sign("RS256", "rsa-1", &service_account_claims());
    let (input, signature) = good.rsplit_once('.').unwrap();
    let mut flipped = URL_SAFE_NO_PAD.decode(signature).unwrap();
    flipped[10] ^= 1;
    let claims = |change: &dyn Fn(&mut Value)| {
        let mut claims = service_account_claims();
        change(&mut claims);
        claims
    };
    let unsigned_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"rsa-1"}"#);
    let unsigned_claims = URL_SAFE_NO_PAD.encode(service_account_claims().to_string());
    let refused_tokens = [
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(flipped)),
        platform.sign(
            "RS256",
            "rsa-1",
            &claims(&|c| c["iss"] = json!("https://evil.test")),
        ),
        platform.sign(
            "RS256",
            "rsa-1",
            &claims(&|c| c["aud"] = json!(["someone-else"])),
        ),
        platform.sign(
            "RS256",
            "rsa-1",
            &claims(&|c| c["exp"] = json!(now() - 3600)),
        ),
        platform.sign(
            "RS256",
            "rsa-1",
            &claims(&|c| c["nbf"] = json!(now() + 3600)),
        ),
        platform.sign("RS256", "unknown-kid", &service_account_claims()),
        platform.sign("ES256", "rsa-1", &service_account_claims()),
        platform.sign_with_header(
            &json!({ "alg": "RS256", "kid": "rsa-1", "crit": ["exp"] }),
            &service_account_claims(),
        ),
        format!("{unsigned_header}.{unsigned_claims}."),
        "not-a-jwt".into(),
    ];
    for token in &refused_tokens {
        let refused = attestation()
            .await
            .attest(attest(token.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::Unauthenticated,
            "{token}: {refused:?}"
        );
        assert!(refused.message().starts_with("jwt:"), "{refused:?}");
    }
    // A valid token whose selectors no entry holds: authenticated by its issuer, yet no one.
    let stranger = platform.sign(
        "RS256",
        "rsa-1",
        &claims(&|c| c["sub"] = json!("system:serviceaccount:dev:other")),
    );
    let refused = attestation()
        .await
        .attest(attest(stranger))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(count_rows(&data, "svids").await, svids, "nothing stored");

    let reasons: Vec<String> =
        audit_events_of_type(&app.admin().await, "identity.attestation_refused")
            .await
            .iter()
            .map(|event| format!("{event:?}"))
            .collect();
    for reason in [
        "critical_header",
        "signature",
        "unknown_issuer",
        "audience",
        "expired",
        "algorithm",
    ] {
        assert!(
            reasons.iter().any(|event| event.contains(reason)),
            "the trail names '{reason}': {reasons:?}"
        );
    }
}

/// A JWKS served over HTTPS by a stand-in for the platform, counting the fetches.
struct JwksServer {
    url: String,
    ca_file: std::path::PathBuf,
    document: std::sync::Arc<std::sync::Mutex<String>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl JwksServer {
    async fn start(dir: &std::path::Path, document: String) -> JwksServer {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let ca_file = dir.join("jwks-server.pem");
        std::fs::write(&ca_file, certified.cert.pem()).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://localhost:{}/jwks",
            listener.local_addr().unwrap().port()
        );
        let document = std::sync::Arc::new(std::sync::Mutex::new(document));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (served, counted) = (document.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let body = served.lock().unwrap().clone();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        JwksServer {
            url,
            ca_file,
            document,
            fetches,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_at_start_and_again_for_a_new_key_at_most_once_per_interval() {
    let data = TestData::new(Backend::Sqlite).await;
    let platform = Platform::new(data.path());
    let mut only_rsa = platform.jwks();
    only_rsa["keys"].as_array_mut().unwrap().truncate(1);
    let server = JwksServer::start(data.path(), only_rsa.to_string()).await;
    let min_refresh = std::time::Duration::from_secs(1);
    let mut config = data.config();
    config.jwt_issuers = vec![JwtIssuerConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        jwks: JwksSource::Https {
            url: HttpsUrl::parse(&server.url).unwrap(),
            ca_file: Some(server.ca_file.clone()),
        },
        claims: Vec::new(),
        min_refresh,
    }];
    let app = TestApp::spawn_with(config).await;
    assert_eq!(server.fetches(), 1, "fetched at start");
    app.admin()
        .await
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "crm".into(),
            roles: vec![proto::Role::Agent as i32],
            no_bearer_credential: true,
            selectors: vec![
                "jwt:iss:https://issuer.test".into(),
                "jwt:sub:system:serviceaccount:prod:crm".into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let attest_with = |token: String| {
        let app = &app;
        async move {
            app.connect(None)
                .await
                .attestation()
                .attest(attest(token))
                .await
        }
    };

    attest_with(platform.sign("RS256", "rsa-1", &service_account_claims()))
        .await
        .expect("a key from the fetched JWKS");
    assert_eq!(server.fetches(), 1, "a known key needs no fetch");

    // The platform adds a key; a token signed with it makes the broker fetch again.
    *server.document.lock().unwrap() = platform.jwks().to_string();
    tokio::time::sleep(min_refresh).await;
    attest_with(platform.sign("ES256", "ec-1", &service_account_claims()))
        .await
        .expect("the new key, fetched on demand");
    assert_eq!(server.fetches(), 2);

    // Made-up key ids within the interval cause no fetch at all.
    for _ in 0..5 {
        let refused = attest_with(platform.sign("RS256", "made-up", &service_account_claims()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    assert_eq!(server.fetches(), 2, "unknown key ids are rate-limited");
}
