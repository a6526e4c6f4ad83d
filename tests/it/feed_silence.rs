//! A verifier fails closed when the revocation feed goes quiet: a broker stopped with SIGSTOP
//! keeps its connections open but sends nothing, and a verifier that trusted its cache would
//! accept a token revoked meanwhile until the token's expiry.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use warrant::client::Connection;
use warrant::proto;
use warrant::verifier::{Verifier, VerifierConfig, VerifyError};

use crate::process::BrokerProcess;
use crate::support::*;

/// The brokers here send a heartbeat every 200 ms, so a verifier's default bound is 600 ms.
const HEARTBEAT: &str = "200ms";
/// Generous room above the bound for a loaded test machine.
const WITHIN_THE_BOUND: Duration = Duration::from_secs(3);

struct Broker {
    process: BrokerProcess,
    address: String,
}

impl Broker {
    /// A `serve --dev` process in `dir` with the test catalog, and `env` on top.
    fn start(dir: &Path, env: &[(&str, &str)]) -> Broker {
        let data_dir = dir.join("warrant-data");
        std::fs::create_dir_all(&data_dir).unwrap();
        std::fs::write(data_dir.join("scopes.toml"), TEST_CATALOG).unwrap();
        let mut env = env.to_vec();
        env.push(("WARRANT_FEED_HEARTBEAT", HEARTBEAT));
        let mut process = BrokerProcess::start_in(
            &["serve", "--dev"],
            dir,
            &data_dir,
            "info",
            ("127.0.0.1:0", "127.0.0.1:0"),
            &env,
        );
        let (grpc, _) = process.wait_until_serving();
        Broker {
            process,
            address: format!("http://{grpc}"),
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.process.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name}");
    }

    async fn connect(&self, credential: &str) -> Connection {
        Connection::open(&self.address, Some(credential), None)
            .await
            .unwrap()
    }
}

async fn create_workload(broker: &Broker, admin: &str, name: &str) -> String {
    broker
        .connect(admin)
        .await
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: name.into(),
            roles: vec![proto::Role::Agent as i32],
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .credential
}

async fn open_task(agent: &Connection) -> proto::BeginTaskResponse {
    agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await
        .unwrap()
        .into_inner()
}

/// Waits until `verifier` gives `token` an answer `matches` accepts; false after `limit`.
async fn verifier_answers(
    verifier: &Verifier,
    token: &str,
    limit: Duration,
    matches: impl Fn(&Result<warrant::issuer::jwt::AccessTokenClaims, VerifyError>) -> bool,
) -> bool {
    eventually(limit, || async { matches(&verifier.verify_cached(token)) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_refuses_while_the_broker_is_stopped_and_accepts_once_it_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let admin = broker.process.admin_credential().unwrap();
    let agent = broker
        .connect(&create_workload(&broker, &admin, "crm-agent").await)
        .await;
    let token = open_task(&agent).await.leases[0].credential.clone();
    let verifier = Verifier::connect(VerifierConfig::new(&broker.address, CRM, admin.clone()))
        .await
        .unwrap();
    // Several heartbeat intervals with no revocation at all: heartbeats keep it fresh.
    tokio::time::sleep(Duration::from_secs(2)).await;
    verifier
        .verify_cached(&token)
        .expect("an idle but live feed is not stale");

    broker.signal("-STOP");
    let refused = verifier_answers(&verifier, &token, WITHIN_THE_BOUND, |answer| {
        matches!(answer, Err(VerifyError::Stale { .. }))
    })
    .await;
    broker.signal("-CONT");
    assert!(refused, "a silent feed makes the verifier refuse");
    assert!(
        verifier_answers(&verifier, &token, WITHIN_THE_BOUND, Result::is_ok).await,
        "accepted again once the broker resumed"
    );
}

/// Two replicas on one PostgreSQL: the verifier follows the first, which is stopped while the
/// second revokes the task. Nothing may accept the revoked token, neither while the first
/// replica is silent nor after it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(warrant_postgres_tests),
    ignore = "set WARRANT_TEST_DATABASE_URL to run the PostgreSQL tests"
)]
async fn a_revocation_made_while_the_followed_replica_is_stopped_is_honoured_after_it_resumes() {
    let data = TestData::new(Backend::Postgres).await;
    let master_key = warrant::issuer::random::bytes::<32>();
    let master_key = base64_standard(&master_key);
    let env = [
        ("WARRANT_DATABASE_URL", data.database_url.as_str()),
        ("WARRANT_MASTER_KEY", master_key.as_str()),
        ("WARRANT_ISSUER", "http://warrant.test"),
    ];
    let first_dir = tempfile::tempdir().unwrap();
    let first = Broker::start(first_dir.path(), &env);
    let admin = first.process.admin_credential().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let second = Broker::start(second_dir.path(), &env);

    let credential = create_workload(&first, &admin, "crm-agent").await;
    let revoked = open_task(&first.connect(&credential).await).await;
    let kept = open_task(&first.connect(&credential).await).await;
    let verifier = Verifier::connect(VerifierConfig::new(&first.address, CRM, admin.clone()))
        .await
        .unwrap();
    verifier
        .verify_cached(&revoked.leases[0].credential)
        .unwrap();

    first.signal("-STOP");
    second
        .connect(&admin)
        .await
        .admin()
        .revoke(proto::RevokeRequest {
            target: Some(proto::revoke_request::Target::TaskId(
                revoked.task_id.clone(),
            )),
        })
        .await
        .unwrap();
    let refused = verifier_answers(
        &verifier,
        &revoked.leases[0].credential,
        WITHIN_THE_BOUND,
        |answer| matches!(answer, Err(VerifyError::Stale { .. })),
    )
    .await;
    first.signal("-CONT");
    assert!(refused, "refused while the followed replica is silent");
    assert!(
        verifier_answers(
            &verifier,
            &kept.leases[0].credential,
            WITHIN_THE_BOUND,
            Result::is_ok
        )
        .await,
        "accepts an unrevoked token once the replica resumed"
    );
    assert!(
        matches!(
            verifier.verify_cached(&revoked.leases[0].credential),
            Err(VerifyError::Revoked)
        ),
        "the revocation made meanwhile is known by the time the feed is fresh again"
    );
}

fn base64_standard(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
