//! Tokens validated by independent JWT implementations (Python's PyJWT with `cryptography`,
//! Node's `jose`), which discover the keys through `/.well-known/openid-configuration` like any
//! OAuth client; and the README's downstream examples, run word for word.

use std::path::{Path, PathBuf};
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

/// The code block of README.md between `<!-- example:NAME:start -->` and `:end -->`.
fn readme_example(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = format!("<!-- example:{name}:start -->");
    let section = readme
        .split(&start)
        .nth(1)
        .and_then(|rest| rest.split(&format!("<!-- example:{name}:end -->")).next())
        .unwrap_or_else(|| panic!("README.md has no {name} example"));
    let lines: Vec<&str> = section.trim().lines().collect();
    // Without the fence lines.
    lines[1..lines.len() - 1].join("\n") + "\n"
}

/// Runs a README example against `app` for `token`: (exit status ok, output).
fn run_example(
    program: &Path,
    script: &Path,
    app: &TestApp,
    credential: &str,
    token: &str,
) -> (bool, String) {
    let output = Command::new(program)
        .arg(script)
        .env("WARRANT_ISSUER", &app.issuer)
        .env("WARRANT_AUDIENCE", CRM)
        .env("WARRANT_TOKEN", credential)
        .env("ACCESS_TOKEN", token)
        .output()
        .expect("run the example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Each README example accepts a valid token, refuses another audience's and a tampered one,
/// and refuses the token once its task completed (revocation through HTTP introspection).
async fn readme_example_validates_and_sees_revocation(program: PathBuf, script: PathBuf) {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let credential = app.resource_server("crm-api", &[CRM]).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    let (crm_token, tickets_token) = (
        task.leases[0].credential.clone(),
        task.leases[1].credential.clone(),
    );
    let mut tampered = crm_token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let app = std::sync::Arc::new(app);
    let check = |token: String| {
        let (program, script, app, credential) = (
            program.clone(),
            script.clone(),
            app.clone(),
            credential.clone(),
        );
        tokio::task::spawn_blocking(move || {
            run_example(&program, &script, &app, &credential, &token)
        })
    };

    let (valid, output) = check(crm_token.clone()).await.unwrap();
    assert!(
        valid && output.contains("valid: crm.contacts:read"),
        "{output}"
    );
    for (token, why) in [
        (tickets_token, "another audience"),
        (tampered, "a damaged signature"),
    ] {
        let (valid, output) = check(token).await.unwrap();
        assert!(!valid && output.contains("invalid"), "{why}: {output}");
    }
    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    let (valid, output) = check(crm_token).await.unwrap();
    assert!(!valid && output.contains("revoked"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_example_validates_tokens_and_sees_revocation() {
    let Some(python) = python_venv() else { return };
    let script = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readme_example.py");
    std::fs::write(&script, readme_example("python")).unwrap();
    readme_example_validates_and_sees_revocation(python, script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_node_example_validates_tokens_and_sees_revocation() {
    let Some(dir) = node_env() else { return };
    let script = dir.join("check.mjs");
    std::fs::write(&script, readme_example("node")).unwrap();
    readme_example_validates_and_sees_revocation(PathBuf::from("node"), script).await;
}
