//! Tokens validated by an independent JWT implementation (Python's PyJWT with `cryptography`),
//! which discovers the keys through `/.well-known/openid-configuration` like any OAuth client.

use std::path::PathBuf;
use std::process::Command;

use warrant::issuer::KeyAlgorithm;
use warrant::proto;

use crate::support::*;

const VERIFY_SCRIPT: &str = r#"
import json, sys, urllib.request
import jwt
issuer, token, audience = sys.argv[1:4]
discovery = json.load(urllib.request.urlopen(issuer + "/.well-known/openid-configuration"))
assert discovery["issuer"] == issuer
signing_key = jwt.PyJWKClient(discovery["jwks_uri"]).get_signing_key_from_jwt(token)
claims = jwt.decode(token, signing_key.key, algorithms=["EdDSA", "ES256"], audience=audience,
                    issuer=issuer, options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]})
assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
print(json.dumps(claims))
"#;

fn pyjwt_verify(
    python: &PathBuf,
    issuer: &str,
    token: &str,
    audience: &str,
) -> Result<serde_json::Value, String> {
    let output = Command::new(python)
        .args(["-c", VERIFY_SCRIPT, issuer, token, audience])
        .output()
        .expect("run python");
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("claims JSON"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

async fn independent_library_validates_tokens_against_served_jwks(algorithm: KeyAlgorithm) {
    let Some(python) = python_venv() else { return };
    let data = TestData::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.signing_algorithm = algorithm;
    let app = TestApp::spawn_with(config).await;
    let task = app.begin_as("crm-agent", &["crm.contacts:read"]).await;
    let token = task.leases[0].credential.clone();
    let (issuer, python_for_task) = (app.issuer.clone(), python.clone());

    let verify = move |token: String, audience: &'static str| {
        let (python, issuer) = (python_for_task.clone(), issuer.clone());
        tokio::task::spawn_blocking(move || pyjwt_verify(&python, &issuer, &token, audience))
    };
    let claims = verify(token.clone(), CRM)
        .await
        .unwrap()
        .expect("PyJWT accepts the token");
    assert_eq!(claims["jti"], task.leases[0].lease_id);
    assert_eq!(claims["scope"], "crm.contacts:read");
    assert_eq!(header_of(&token)["alg"], algorithm.jws_name());

    assert!(
        verify(token.clone(), "https://tickets.test")
            .await
            .unwrap()
            .is_err(),
        "PyJWT refuses the wrong audience"
    );
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert!(
        verify(tampered, CRM).await.unwrap().is_err(),
        "PyJWT refuses a damaged signature"
    );

    app.admin()
        .await
        .admin()
        .rotate_signing_key(proto::RotateSigningKeyRequest {})
        .await
        .unwrap();
    assert!(
        verify(token, CRM).await.unwrap().is_ok(),
        "the retired key is still published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyjwt_validates_eddsa_tokens_against_served_jwks() {
    independent_library_validates_tokens_against_served_jwks(KeyAlgorithm::EdDsa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyjwt_validates_es256_tokens_against_served_jwks() {
    independent_library_validates_tokens_against_served_jwks(KeyAlgorithm::Es256).await;
}
