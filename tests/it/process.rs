//! The real `warrant` binary: dev start and restart, graceful stop, configuration errors, TLS,
//! health and reflection, and the README walk-through word for word.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warrant::client::Connection;
use warrant::proto;

use crate::support::*;

/// A `warrant serve` child process with its output captured.
pub(crate) struct BrokerProcess {
    pub(crate) child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl BrokerProcess {
    pub(crate) fn start(args: &[&str], data_dir: &Path) -> BrokerProcess {
        Self::start_logging(args, data_dir, "info")
    }

    fn start_logging(args: &[&str], data_dir: &Path, log_level: &str) -> BrokerProcess {
        Self::start_on(args, data_dir, log_level, ("127.0.0.1:0", "127.0.0.1:0"))
    }

    /// Starts on fixed (gRPC, HTTP) addresses, as a restart of the same broker does: in dev mode
    /// the issuer is derived from the HTTP address.
    fn start_on(
        args: &[&str],
        data_dir: &Path,
        log_level: &str,
        addresses: (&str, &str),
    ) -> BrokerProcess {
        Self::start_in(
            args,
            data_dir,
            &data_dir.join("warrant-data"),
            log_level,
            addresses,
            &[],
        )
    }

    /// Starts in `dir` with its data in `data_dir`, on fixed (gRPC, HTTP) addresses, with
    /// `extra_env` set (it may set the database URL and master key too).
    pub(crate) fn start_in(
        args: &[&str],
        dir: &Path,
        data_dir: &Path,
        log_level: &str,
        (grpc, http): (&str, &str),
        extra_env: &[(&str, &str)],
    ) -> BrokerProcess {
        let mut child = Command::new(warrant_binary())
            .args(args)
            .current_dir(dir)
            .env("WARRANT_DATA_DIR", data_dir)
            .env("WARRANT_GRPC_ADDR", grpc)
            .env("WARRANT_HTTP_ADDR", http)
            .env("WARRANT_LOG_FORMAT", "json")
            .env("RUST_LOG", log_level)
            .env_remove("WARRANT_DATABASE_URL")
            .env_remove("WARRANT_MASTER_KEY")
            .envs(extra_env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start warrant");
        let capture = |pipe: Box<dyn std::io::Read + Send>| {
            let buffer = Arc::new(Mutex::new(String::new()));
            let sink = buffer.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut sink = sink.lock().unwrap();
                    sink.push_str(&line);
                    sink.push('\n');
                }
            });
            buffer
        };
        let stdout = capture(Box::new(child.stdout.take().unwrap()));
        let stderr = capture(Box::new(child.stderr.take().unwrap()));
        BrokerProcess {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for the "serving" log line and returns (gRPC, HTTP) addresses.
    pub(crate) fn wait_until_serving(&mut self) -> (SocketAddr, SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self
                .stderr()
                .lines()
                .find(|line| line.contains("Warrant is serving"))
            {
                let log: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
                let address = |key: &str| log["fields"][key].as_str().unwrap().parse().unwrap();
                return (address("grpc"), address("http"));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("broker exited with {status}: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "broker did not start: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The admin credential the broker printed on first start. Standard output is read on its
    /// own thread, so the banner may trail the "serving" log line a little: wait up to 3 s.
    pub(crate) fn admin_credential(&self) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let stdout = self.stdout();
            if let Some(start) = stdout.find("export WARRANT_TOKEN=") {
                let rest = &stdout[start + "export WARRANT_TOKEN=".len()..];
                return rest.split_whitespace().next().map(str::to_owned);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and returns the exit code.
    pub(crate) fn terminate(mut self) -> (i32, String) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return (status.code().unwrap_or(-1), self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "broker did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with `args` in `dir`; returns (exit code, stdout, stderr).
fn run_warrant(args: &[&str], dir: &Path) -> (i32, String, String) {
    let output = Command::new(warrant_binary())
        .args(args)
        .current_dir(dir)
        .env("WARRANT_DATA_DIR", dir.join("warrant-data"))
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_start_shows_the_admin_credential_once_and_a_restart_reuses_all_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = BrokerProcess::start(&["serve", "--dev"], dir.path());
    let (grpc, http) = first.wait_until_serving();
    let admin = first
        .admin_credential()
        .expect("first start prints the admin credential");
    assert_eq!(http_get(http, "/readyz").0, 200);
    let connection = Connection::open(&format!("http://{grpc}"), Some(&admin), None)
        .await
        .unwrap();
    let workloads = connection
        .admin()
        .list_workloads(proto::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .workloads;
    assert_eq!(workloads.len(), 1);
    let kid = http_get_json(http, "/.well-known/jwks.json")["keys"][0]["kid"].clone();
    let (code, stderr) = first.terminate();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains(&admin),
        "the credential never reaches the logs"
    );
    for file in ["master.key", "warrant.db", "scopes.toml"] {
        assert!(
            dir.path().join("warrant-data").join(file).exists(),
            "{file}"
        );
    }

    let mut second = BrokerProcess::start(&["serve", "--dev"], dir.path());
    let (grpc, http) = second.wait_until_serving();
    assert_eq!(
        second.admin_credential(),
        None,
        "no new admin credential on restart"
    );
    assert!(!second.stdout().contains("wrt_"));
    let connection = Connection::open(&format!("http://{grpc}"), Some(&admin), None)
        .await
        .unwrap();
    connection
        .admin()
        .list_workloads(proto::ListWorkloadsRequest {})
        .await
        .expect("the first credential still works");
    assert_eq!(
        http_get_json(http, "/.well-known/jwks.json")["keys"][0]["kid"],
        kid,
        "the signing key is reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(&["serve", "--dev"], dir.path());
    let (grpc, _) = broker.wait_until_serving();
    let admin = broker.admin_credential().unwrap();
    let connection = Connection::open(&format!("http://{grpc}"), Some(&admin), None)
        .await
        .unwrap();
    let mut stream = connection
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("caught-up message");

    let started = Instant::now();
    let (code, stderr) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .unwrap();

    assert_eq!(code, 0, "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the open stream did not hold up the stop"
    );
    assert!(
        stderr.contains("draining") && stderr.contains("stopped"),
        "{stderr}"
    );
    assert!(
        matches!(stream.message().await, Ok(None) | Err(_)),
        "the stream ended"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("warrant.toml");
    std::fs::write(dir.path().join("server.crt"), "certificate").unwrap();
    std::fs::write(dir.path().join("server.key"), "key").unwrap();
    std::fs::write(
        dir.path().join("master.key"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    )
    .unwrap();
    std::fs::write(dir.path().join("scopes.toml"), TEST_CATALOG).unwrap();
    let tls = "[tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n";
    let base = format!(
        "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n{tls}[storage]\ndatabase_url = \"sqlite://w.db?mode=rwc\"\n\
         [keys]\n[issuer]\nurl = \"https://warrant.test\"\ntrust_domain = \"test.local\"\n[catalog]\nscopes_file = \"scopes.toml\"\n"
    );
    let cases = [
        (base.replace(tls, ""), "tls:"),
        (
            base.replace("[keys]", "[keys]\nsigning_algorithm = \"RS256\""),
            "keys.signing_algorithm:",
        ),
        (base.replace("[server]", "[server]\nport = 1"), "port:"),
        (base.replace("server.crt", "absent.pem"), "tls.cert_file:"),
        (
            base.replace("https://warrant.test", "http://warrant.test"),
            "issuer.url:",
        ),
        (base.clone(), "tls.cert_file:"),
        (
            base.replace("[keys]", "[keys]\nmaster_key_file = \"lost.key\""),
            "keys.master_key_file:",
        ),
    ];
    for (text, field) in cases {
        std::fs::write(&config, text).unwrap();
        let (code, _, stderr) =
            run_warrant(&["serve", "--config", config.to_str().unwrap()], dir.path());
        assert_eq!(code, 64, "{stderr}");
        assert!(stderr.contains(field), "expected {field} in: {stderr}");
    }
    let (code, _, stderr) = run_warrant(&["serve"], dir.path());
    assert_eq!(code, 64, "{stderr}");

    std::fs::create_dir_all(dir.path().join("warrant-data")).unwrap();
    std::fs::write(
        dir.path().join("warrant-data/scopes.toml"),
        TEST_CATALOG.replace("max_ttl = \"10m\"", "max_ttl = \"2d\""),
    )
    .unwrap();
    let (code, _, stderr) = run_warrant(&["serve", "--dev"], dir.path());
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("scope[0].max_ttl"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_mode_serves_grpc_and_http_over_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("server.crt"), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("server.key"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(dir.path().join("scopes.toml"), TEST_CATALOG).unwrap();
    std::fs::write(
        dir.path().join("master.key"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    )
    .unwrap();
    let config = "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n[tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n\
                  [storage]\ndatabase_url = \"sqlite://warrant.db?mode=rwc\"\n[keys]\nmaster_key_file = \"master.key\"\nsigning_algorithm = \"ES256\"\n\
                  [issuer]\nurl = \"https://warrant.test\"\ntrust_domain = \"test.local\"\n[catalog]\nscopes_file = \"scopes.toml\"\n";
    std::fs::write(dir.path().join("warrant.toml"), config).unwrap();
    let mut broker = BrokerProcess::start(&["serve", "--config", "warrant.toml"], dir.path());
    let (grpc, http) = broker.wait_until_serving();
    let admin = first_admin_from_file(&broker, &dir.path().join("first-admin.credential"));

    let tls_address = format!("https://localhost:{}", grpc.port());
    let connection = Connection::open(
        &tls_address,
        Some(&admin),
        Some(certified.cert.pem().as_bytes()),
    )
    .await
    .unwrap();
    let jwks = connection
        .tokens()
        .get_jwks(proto::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwks.keys[0].alg, "ES256");
    assert_eq!(jwks.issuer, "https://warrant.test");

    let plaintext = Connection::open(&format!("http://{grpc}"), Some(&admin), None).await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(connection) => connection
            .tokens()
            .get_jwks(proto::GetJwksRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "plaintext gRPC is not served");
    let (status, _) = tokio::task::spawn_blocking(move || http_get(http, "/healthz"))
        .await
        .unwrap();
    assert_ne!(status, 200, "plaintext HTTP is not served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection_are_served() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let channel = tonic::transport::Endpoint::from_shared(app.address())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "warrant.v1.Tasks".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "warrant.v1.Tasks",
        "warrant.v1.Tokens",
        "warrant.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|name| name == service),
            "{service} missing from {names:?}"
        );
    }
}

/// Python's reflection clients, grpc-requests and older grpcurl speak only v1alpha.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_describes_the_services() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let channel = tonic::transport::Endpoint::from_shared(app.address())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "warrant.v1.Tokens".into(),
        )),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected the file that defines warrant.v1.Tokens");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

/// Outside `--dev` the first admin credential is written to a file only its owner can read,
/// and appears in neither standard output nor the logs.
fn first_admin_from_file(broker: &BrokerProcess, path: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let credential = eventually_read(path);
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credential file is private");
    let output = format!("{}{}", broker.stdout(), broker.stderr());
    assert!(
        !output.contains(&credential),
        "the credential reached the output"
    );
    assert!(
        output.contains("first-admin.credential"),
        "the log says where it is"
    );
    credential
}

fn eventually_read(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.trim().is_empty()
        {
            return text.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no credential in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The shell blocks of README.md between `<!-- {name}:start -->` and `<!-- {name}:end -->`,
/// joined.
fn readme_walkthrough(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split(&format!("<!-- {name}:start -->"))
        .nth(1)
        .and_then(|rest| rest.split(&format!("<!-- {name}:end -->")).next())
        .expect("walk-through markers in README.md");
    section
        .split("```sh")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the README walk-through `name` word for word against a fresh `serve --dev` broker, as
/// its admin; its standard output.
async fn run_dev_walkthrough(name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(&["serve", "--dev"], dir.path());
    let (grpc, _) = broker.wait_until_serving();
    let admin = broker.admin_credential().unwrap();
    let script = readme_walkthrough(name);
    let binary_dir = warrant_binary().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(dir.path())
            .env("PATH", path)
            .env("WARRANT_TOKEN", admin)
            .env("WARRANT_ADDR", format!("http://{grpc}"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_works_verbatim() {
    let stdout = run_dev_walkthrough("walkthrough").await;
    let valid = stdout.find("valid\n").expect("token verify printed valid");
    let revoked = stdout
        .find("active: false")
        .expect("introspection after completion printed active: false");
    assert!(valid < revoked);
    assert!(stdout.contains("invalid: token revoked"), "{stdout}");
    assert!(
        stdout.contains("decision  allow\npolicies  agents-request-catalog-scopes"),
        "{stdout}"
    );
}

/// The approvals walk-through, word for word: the agent's stream delivers the credential once
/// the operator approves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_approvals_walkthrough_works_verbatim() {
    let stdout = run_dev_walkthrough("approvals-walkthrough").await;
    assert!(stdout.contains("asks for payments:refund"), "{stdout}");
    assert!(
        stdout.contains("GRANT_STATE_ISSUED: 1 of 1 approval(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("active: true"), "{stdout}");
}

/// The tool-call walk-through, word for word: a small refund allowed at once, a large one
/// shown to the operator with its arguments, approved and delivered on the agent's stream, and
/// its call token accepted by introspection once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_tool_call_walkthrough_works_verbatim() {
    let stdout = run_dev_walkthrough("tool-call-walkthrough").await;
    assert!(
        stdout.contains("asks for tool:payments.refund\n  call       payments.refund"),
        "{stdout}"
    );
    assert!(stdout.contains(r#""amount_cents":25000"#), "{stdout}");
    let accepted = stdout.find("active: true").expect("first use accepted");
    let replayed = stdout.find("active: false").expect("replay refused");
    assert!(accepted < replayed, "{stdout}");
    assert!(stdout.contains("  tool   payments.refund\n"), "{stdout}");
}

/// The API-key walk-through, word for word: the key introspects active, then inactive once its
/// task is completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_api_key_walkthrough_works_verbatim() {
    let stdout = run_dev_walkthrough("api-key-walkthrough").await;
    let active = stdout
        .find("active: true\n  scope  search:query")
        .expect("the key is active");
    let ended = stdout.find("active: false").expect("then inactive");
    assert!(active < ended, "{stdout}");
}

/// The identity walk-through, word for word, from a directory laid out as the repository is:
/// a deployed broker on TLS, a workload with no bearer credential attesting with a join token,
/// calls over mTLS, a bound token, renewal and the kill switch.
#[test]
fn readme_identity_walkthrough_works_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("deploy")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/scopes.toml"),
        dir.path().join("deploy/scopes.toml"),
    )
    .unwrap();
    let binary_dir = warrant_binary().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The broker the script starts is stopped by the script's own `trap ... EXIT`, also when
    // the script fails; its output goes to a file, so reading the script's pipes ends with it.
    let mut script = std::process::Command::new("bash")
        .args([
            "-euo",
            "pipefail",
            "-c",
            &readme_walkthrough("identity-walkthrough"),
        ])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("WARRANT_TOKEN")
        .env_remove("WARRANT_ADDR")
        .env_remove("WARRANT_SVID_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read as _;
    script
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    script
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = script.wait().unwrap();
    assert!(status.success(), "walk-through failed:\n{stdout}\n{stderr}");
    let bound = stdout
        .find("active: true")
        .expect("active with its certificate");
    let unbound = stdout.find("active: false").expect("inactive without it");
    assert!(bound < unbound, "{stdout}");
    for expected in [
        "URI:spiffe://example.internal/workload/svid-agent",
        "valid\n  scope  crm.contacts:read",
        "invalid: token bound to another client certificate\nrefused without the certificate",
        "refused: the join token was used",
        "spiffe id  spiffe://example.internal/workload/local-tool",
        "retired CA ca-1 (in the trust bundle until",
        "\n2\nagent-svid/svid.pem: OK",
        "1 open task(s) and 1 lease(s) revoked",
        "refused: the identity is revoked",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(
        stderr.contains("join_token: unknown, already used or expired"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_audit_trail_or_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start_logging(&["serve", "--dev"], dir.path(), "trace");
    let (grpc, _) = broker.wait_until_serving();
    let address = format!("http://{grpc}");
    let admin_credential = broker.admin_credential().unwrap();
    let admin = Connection::open(&address, Some(&admin_credential), None)
        .await
        .unwrap();
    let agent_credential = admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "crm-agent".into(),
            roles: vec![proto::Role::Agent as i32],
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .credential;
    let mut agent = Connection::open(&address, Some(&agent_credential), None)
        .await
        .unwrap()
        .tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    let granted = agent
        .request_grant(grant_request(&task.task_id, "crm.contacts:read", 0))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let renewed = agent
        .renew_lease(renew_request(&granted.lease_id, 600))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let mut tokens = admin.tokens();
    for token in [
        &task.leases[0].credential,
        &renewed.credential,
        &"forged.token.value".to_string(),
    ] {
        let request = proto::IntrospectRequest {
            token: token.clone(),
            audience: "https://crm.example.internal".into(),
            ..Default::default()
        };
        tokens.introspect(request).await.unwrap();
    }
    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    // A join token traded for an SVID (plaintext --dev serves attestation too), then replayed.
    let join_token = admin
        .admin()
        .create_join_token(proto::CreateJoinTokenRequest {
            name: "crm-agent".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .join_token;
    let mut attestation = admin.attestation();
    let attest = || proto::AttestRequest {
        method: Some(proto::attest_request::Method::JoinToken(join_token.clone())),
    };
    let svid = attestation
        .attest(attest())
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    attestation.attest(attest()).await.unwrap_err();
    let token_hmac = admin
        .admin()
        .audit_hash(proto::AuditHashRequest {
            value: renewed.credential.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .hmac;
    let (code, logs) = tokio::task::spawn_blocking(move || broker.terminate())
        .await
        .unwrap();
    assert_eq!(code, 0);

    let connection =
        rusqlite::Connection::open(dir.path().join("warrant-data/warrant.db")).unwrap();
    let trail: String = connection
        .prepare(
            "SELECT id || event_type || outcome || actor || COALESCE(workload, '') || COALESCE(task_id, '') || \
             COALESCE(scope, '') || COALESCE(lease_id, '') || detail_json || COALESCE(context_json, '') FROM audit_events",
        )
        .unwrap()
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();

    assert!(
        trail.contains(&token_hmac),
        "positive control: the trail holds the renewed token's HMAC"
    );
    assert!(
        logs.contains("task opened"),
        "positive control: debug logs were captured"
    );
    let master_key = std::fs::read_to_string(dir.path().join("warrant-data/master.key")).unwrap();
    let mut secrets = vec![
        admin_credential.clone(),
        agent_credential.clone(),
        master_key.trim().to_owned(),
    ];
    for credential in [&admin_credential, &agent_credential] {
        secrets.push(credential[credential.len() - 43..].to_owned()); // the secret part
    }
    for token in task
        .leases
        .iter()
        .map(|l| &l.credential)
        .chain([&granted.credential, &renewed.credential])
    {
        secrets.push(token.clone());
        secrets.push(token.rsplit('.').next().unwrap().to_owned());
    }
    secrets.push(join_token.clone());
    secrets.push(join_token[join_token.len() - 43..].to_owned());
    // The SVID key's base64 body, line by line (a line is 64 characters of the key).
    secrets.extend(
        svid.private_key_pem
            .lines()
            .filter(|line| !line.starts_with("-----") && line.len() >= 20)
            .map(str::to_owned),
    );
    for secret in &secrets {
        assert!(secret.len() >= 20);
        assert!(
            !trail.contains(secret.as_str()),
            "a secret reached the audit trail"
        );
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_received_before_sigkill_are_stored_and_revocable_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addresses = (free_address(), free_address());
    let on = (addresses.0.as_str(), addresses.1.as_str());
    let mut broker = BrokerProcess::start_on(&["serve", "--dev"], dir.path(), "info", on);
    let (grpc, _) = broker.wait_until_serving();
    let admin_credential = broker.admin_credential().unwrap();
    let address = format!("http://{grpc}");
    let admin = Connection::open(&address, Some(&admin_credential), None)
        .await
        .unwrap();
    let request = proto::CreateWorkloadRequest {
        name: "crm-agent".into(),
        roles: vec![proto::Role::Agent as i32],
        audiences: Vec::new(),
        no_bearer_credential: false,
        selectors: Vec::new(),
        ..Default::default()
    };
    let agent_credential = admin
        .admin()
        .create_workload(request)
        .await
        .unwrap()
        .into_inner()
        .credential;
    let agent = Connection::open(&address, Some(&agent_credential), None)
        .await
        .unwrap();

    // Many concurrent issuances; the broker is killed the moment the last answer arrives.
    let issuances = (0..32).map(|_| {
        let mut tasks = agent.tasks();
        tokio::spawn(async move {
            tasks
                .begin_task(begin(&["crm.contacts:read"]))
                .await
                .map(|r| r.into_inner())
        })
    });
    let mut received = Vec::new();
    for issuance in issuances {
        received.push(issuance.await.unwrap().expect("issued"));
    }
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    drop(broker);

    let mut restarted = BrokerProcess::start_on(&["serve", "--dev"], dir.path(), "info", on);
    let (grpc, _) = restarted.wait_until_serving();
    let address = format!("http://{grpc}");
    let mut tokens = Connection::open(&address, Some(&admin_credential), None)
        .await
        .unwrap()
        .tokens();
    let mut tasks = Connection::open(&address, Some(&agent_credential), None)
        .await
        .unwrap()
        .tasks();
    let audience = "https://crm.example.internal";
    for task in &received {
        let token = task.leases[0].credential.clone();
        let request = proto::IntrospectRequest {
            token: token.clone(),
            audience: audience.into(),
            ..Default::default()
        };
        let lease_rows: i64 =
            rusqlite::Connection::open(dir.path().join("warrant-data/warrant.db"))
                .unwrap()
                .query_row(
                    "SELECT COUNT(*) FROM leases WHERE id = ?1 AND state = 'issued'",
                    [&task.leases[0].lease_id],
                    |row| row.get(0),
                )
                .unwrap();
        assert_eq!(lease_rows, 1, "lease lost by the crash");
        assert!(
            tokens
                .introspect(request.clone())
                .await
                .unwrap()
                .into_inner()
                .active,
            "credential valid after restart"
        );
        let completed = tasks
            .complete_task(complete_request(&task.task_id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            completed.revoked_lease_ids,
            vec![task.leases[0].lease_id.clone()]
        );
        assert!(
            !tokens
                .introspect(request)
                .await
                .unwrap()
                .into_inner()
                .active,
            "still revocable"
        );
    }
}

/// A loopback address with a port that was free a moment ago.
pub(crate) fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}
