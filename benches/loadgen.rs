//! Warrant's load generator: starts real `warrant serve` processes and drives them over loopback
//! gRPC with the generated client, next to references measured in the same run, so every figure
//! is also a ratio that means something on any machine.
//!
//! `cargo bench --bench loadgen` runs everything (see BENCHMARKS.md); `-- --help` lists options.
//! PostgreSQL scenarios use `WARRANT_TEST_DATABASE_URL` (skipped without it).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Connection as _;
use tokio::sync::mpsc;
use tonic::Status;
use warrant::client::{ClientIdentity, Connection};
use warrant::domain::{SpiffeId, TrustDomain, UnixMillis};
use warrant::identity::Ca;
use warrant::issuer::{KeyAlgorithm, SigningKey};
use warrant::proto;
use warrant::verifier::{Verifier, VerifierConfig, VerifyError};

/// The broker's allocator, so that the echo reference (served by this program) runs on the same
/// runtime settings as the broker it is compared with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CRM_AUDIENCE: &str = "https://crm.example.internal";

/// The scope catalog of every broker the load generator starts: the demo catalog's scopes, with
/// lifetimes longer than a run, so that leases issued by one scenario do not all expire (and keep
/// the reaper busy) in the middle of a later one.
const CATALOG: &str = r#"
[[scope]]
name = "crm.contacts:read"
audience = "https://crm.example.internal"
kind = "jwt"
default_ttl = "1h"
max_ttl = "2h"
workloads = ["*"]

[[scope]]
name = "tickets:write"
audience = "https://tickets.example.internal"
kind = "jwt"
default_ttl = "1h"
max_ttl = "2h"
workloads = ["*"]

[[scope]]
name = "search:query"
audience = "https://search.example.internal"
kind = "api_key"
default_ttl = "1h"
max_ttl = "2h"
workloads = ["*"]

[[tool]]
name = "payments.refund"
audience = "https://payments.example.internal"
workloads = ["*"]
call_ttl = "5m"

[tool.arguments]
order_id = { type = "string" }
amount_cents = { type = "long" }
"#;

/// One measured figure, as printed and as written to JSON.
#[derive(Serialize)]
struct Row {
    scenario: String,
    backend: String,
    concurrency: usize,
    operations: u64,
    per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    reference: String,
    ratio: Option<f64>,
}

impl Row {
    /// A single timing, such as a start-up.
    fn one_off(scenario: String, backend: &str, milliseconds: f64) -> Row {
        Row {
            scenario,
            backend: backend.into(),
            concurrency: 0,
            operations: 1,
            per_second: 0.0,
            p50_ms: milliseconds,
            p90_ms: milliseconds,
            p99_ms: milliseconds,
            max_ms: milliseconds,
            reference: String::new(),
            ratio: None,
        }
    }
}

/// Latencies and throughput of one run.
struct Measurement {
    operations: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64()
    }

    fn row(
        mut self,
        scenario: &str,
        backend: &str,
        concurrency: usize,
        reference: Option<(&str, f64)>,
    ) -> Row {
        self.latencies.sort();
        let percentile = |p: f64| {
            let index = ((self.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
            self.latencies
                .get(index)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        let per_second = self.per_second();
        Row {
            scenario: scenario.into(),
            backend: backend.into(),
            concurrency,
            operations: self.operations,
            per_second,
            p50_ms: percentile(0.50),
            p90_ms: percentile(0.90),
            p99_ms: percentile(0.99),
            max_ms: percentile(1.0),
            reference: reference
                .map(|(name, _)| name.to_owned())
                .unwrap_or_default(),
            ratio: reference.map(|(_, rate)| per_second / rate),
        }
    }
}

type Operation =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), Status>> + Send>> + Send + Sync>;

/// What an operation drawing on a prepared supply (tasks to complete) returns once it is used up:
/// the worker stops there, and the rate counts only the time the supply lasted.
fn supply_used_up() -> Status {
    Status::resource_exhausted("prepared supply used up")
}

/// Runs `operation` from `concurrency` workers for `duration` (or until its supply is used up),
/// recording each call's latency.
async fn drive(concurrency: usize, duration: Duration, operation: Operation) -> Measurement {
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let operation = operation.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let call = Instant::now();
                    match operation().await {
                        Ok(()) => latencies.push(call.elapsed()),
                        Err(status) if status.message() == supply_used_up().message() => break,
                        Err(status) => panic!("operation failed: {status}"),
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    Measurement {
        operations: latencies.len() as u64,
        elapsed: started.elapsed(),
        latencies,
    }
}

/// A child process serving gRPC, stopped when dropped.
struct Server {
    child: Child,
    grpc: String,
    admin_credential: Option<String>,
    /// From spawning the process to `/readyz` answering (brokers only).
    ready_after: Duration,
    data: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Lines a child prints, collected by a thread.
fn collect_lines(pipe: impl std::io::Read + Send + 'static) -> Arc<std::sync::Mutex<Vec<String>>> {
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// Waits until a line satisfying `find` appears.
fn wait_for_line<T>(lines: &std::sync::Mutex<Vec<String>>, find: impl Fn(&str) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = lines.lock().unwrap().iter().find_map(|line| find(line)) {
            return found;
        }
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Server {
    /// `warrant serve --dev` on a fresh data directory (and database, when `database_url`).
    fn broker(data: tempfile::TempDir, database_url: Option<&str>) -> Server {
        Self::broker_with(data, database_url, &[])
    }

    /// [`Server::broker`] with `extra_env` set, such as a shared issuer and master key for a
    /// second replica.
    fn broker_with(
        data: tempfile::TempDir,
        database_url: Option<&str>,
        extra_env: &[(&str, &str)],
    ) -> Server {
        let mut command = Self::warrant_command(&data, &["serve", "--dev"]);
        command
            .envs(extra_env.iter().copied())
            .env("WARRANT_DATA_DIR", data.path())
            .env("WARRANT_GRPC_ADDR", "127.0.0.1:0")
            .env("WARRANT_HTTP_ADDR", "127.0.0.1:0");
        match database_url {
            Some(url) => command.env("WARRANT_DATABASE_URL", url),
            None => command.env_remove("WARRANT_DATABASE_URL"),
        };
        let spawned = Instant::now();
        let (child, stdout, grpc, http) = Self::launch(command);
        while http_status(&http, "/readyz") != Some(200) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let ready_after = spawned.elapsed();
        // Printed only on a fresh store, before the broker serves; standard output is read on its
        // own thread, so allow it a moment to arrive.
        let banner_deadline = Instant::now() + Duration::from_secs(2);
        let admin_credential = loop {
            let found = stdout.lock().unwrap().iter().find_map(|line| {
                line.trim()
                    .strip_prefix("export WARRANT_TOKEN=")
                    .map(str::to_owned)
            });
            if found.is_some() || Instant::now() > banner_deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Server {
            child,
            grpc: format!("http://{grpc}"),
            admin_credential,
            ready_after,
            data: Some(data),
        }
    }

    /// `warrant <args>` with the catalog written into `data`, logging JSON, and caller limits
    /// raised: one agent and one API drive the whole load, so measure the broker, not a
    /// caller's fair share (the limiter still runs on every call).
    fn warrant_command(data: &tempfile::TempDir, args: &[&str]) -> Command {
        let catalog = data.path().join("scopes.toml");
        if !catalog.exists() {
            std::fs::write(&catalog, CATALOG).expect("write the scope catalog");
        }
        let mut command = Command::new(env!("CARGO_BIN_EXE_warrant"));
        command
            .args(args)
            .env("WARRANT_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn,warrant::cli=info")
            .env("WARRANT_CALLER_RATE", "10000000")
            .env("WARRANT_CALLER_BURST", "10000000")
            .env("WARRANT_CALLER_CONCURRENCY", "100000");
        command
    }

    /// Starts `command` and waits for the log line naming its listeners: the child, its
    /// standard output's lines, and the gRPC and HTTP addresses.
    fn launch(mut command: Command) -> (Child, Arc<std::sync::Mutex<Vec<String>>>, String, String) {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start warrant");
        let stdout = collect_lines(child.stdout.take().expect("stdout"));
        let stderr = collect_lines(child.stderr.take().expect("stderr"));
        let (grpc, http) = wait_for_line(&stderr, |line| {
            let log: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = log.get("fields")?;
            Some((
                fields.get("grpc")?.as_str()?.to_owned(),
                fields.get("http")?.as_str()?.to_owned(),
            ))
        });
        (child, stdout, grpc, http)
    }

    /// `warrant serve --config` as deployed: TLS on both listeners with a self-signed
    /// `localhost` certificate, a fresh SQLite store in `data`. Returns the server certificate
    /// (PEM) too, for clients to trust; ready once its first admin credential is written.
    fn tls_broker(data: tempfile::TempDir) -> (Server, Vec<u8>) {
        let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("server certificate");
        let dir = data.path();
        std::fs::write(dir.join("server.crt"), server.cert.pem()).expect("write");
        std::fs::write(dir.join("server.key"), server.signing_key.serialize_pem()).expect("write");
        use base64::Engine;
        let master_key = base64::engine::general_purpose::STANDARD
            .encode(warrant::issuer::random::bytes::<32>());
        std::fs::write(dir.join("master.key"), master_key).expect("write");
        std::fs::write(
            dir.join("warrant.toml"),
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
             [tls]\ncert_file = \"server.crt\"\nkey_file = \"server.key\"\n\
             [storage]\ndatabase_url = \"sqlite://warrant.db?mode=rwc\"\n\
             [keys]\nmaster_key_file = \"master.key\"\n\
             [issuer]\nurl = \"https://localhost\"\ntrust_domain = \"bench.local\"\n\
             [catalog]\nscopes_file = \"scopes.toml\"\n",
        )
        .expect("write the configuration");
        let mut command = Self::warrant_command(&data, &["serve", "--config", "warrant.toml"]);
        command
            .current_dir(dir)
            .env_remove("WARRANT_DATABASE_URL")
            .env_remove("WARRANT_MASTER_KEY");
        let spawned = Instant::now();
        let (child, _, grpc, _) = Self::launch(command);
        let credential_file = dir.join("first-admin.credential");
        let deadline = Instant::now() + Duration::from_secs(60);
        let admin_credential = loop {
            if let Ok(text) = std::fs::read_to_string(&credential_file)
                && !text.trim().is_empty()
            {
                break text.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "no first admin credential");
            std::thread::sleep(Duration::from_millis(5));
        };
        let port = grpc.rsplit(':').next().expect("a port").to_owned();
        let broker = Server {
            child,
            grpc: format!("https://localhost:{port}"),
            admin_credential: Some(admin_credential),
            ready_after: spawned.elapsed(),
            data: Some(data),
        };
        (broker, server.cert.pem().into_bytes())
    }

    /// This program again, as a plain tonic server of the standard health service: the cost of
    /// a trivial unary call on the same runtime and transport, in its own process like a broker.
    fn echo() -> Server {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("--serve-echo")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start echo server");
        let stdout = collect_lines(child.stdout.take().expect("stdout"));
        let grpc = wait_for_line(&stdout, |line| {
            line.strip_prefix("listening ").map(str::to_owned)
        });
        Server {
            child,
            grpc: format!("http://{grpc}"),
            admin_credential: None,
            ready_after: Duration::ZERO,
            data: None,
        }
    }

    /// Stops the broker (SIGTERM, drained) and hands back its data directory.
    fn stop(mut self) -> tempfile::TempDir {
        let data = self.data.take().expect("a broker has a data directory");
        drop(self);
        data
    }

    /// Resident memory of the server process, in MiB.
    fn resident_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

/// The status of `GET path` on `addr`, or `None` when nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Serves grpc.health.v1 on a random loopback port and prints it (the `--serve-echo` mode).
async fn serve_echo() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("listening {}", listener.local_addr().expect("address"));
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await
        .expect("echo server");
}

/// Several HTTP/2 connections, so that one connection's ordering is not the bottleneck.
async fn connections(address: &str, credential: Option<&str>, count: usize) -> Vec<Connection> {
    let mut connections = Vec::new();
    for _ in 0..count {
        connections.push(
            Connection::open(address, credential, None)
                .await
                .expect("connect"),
        );
    }
    connections
}

/// Each call goes to the next connection in turn.
fn round_robin<T: Clone + Send + Sync + 'static>(
    clients: Vec<T>,
) -> impl Fn() -> T + Send + Sync + 'static {
    let next = std::sync::atomic::AtomicUsize::new(0);
    move || clients[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % clients.len()].clone()
}

/// Raw Ed25519 signing and verification on one core with the broker's own key code.
/// A set of `count` policies shaped like a fleet's: a label-reading forbid, an approval rule
/// reading the risk signal (which the measured requests keep low), one permit per scope by name,
/// and last the permit that matches `matched`.
fn fleet_policies(count: usize, matched: &str) -> String {
    let mut text = String::from(
        "@id(\"frozen\") forbid (principal, action, resource) when { resource.labels.contains(\"frozen=true\") };\n\
         @id(\"risky\") @approval permit (principal, action, resource) when { context has risk && context.risk >= 50 };\n",
    );
    for index in 2..count.saturating_sub(1) {
        text.push_str(&format!(
            "@id(\"scope-{index}\") permit (principal in Warrant::Role::\"agent\", action, \
             resource == Warrant::Scope::\"scope:{index}\") when {{ context.requested_ttl_secs <= 86400 }};\n"
        ));
    }
    text.push_str(&format!(
        "@id(\"matched\") permit (principal in Warrant::Role::\"agent\", action, \
         resource == Warrant::Scope::\"{matched}\") when {{ context.requested_ttl_secs <= 86400 }};\n"
    ));
    text
}

/// BeginTask on a `--dev` broker deciding with a set of 1,000 policies, as a ratio of the same
/// run's BeginTask on one with the default policy (one permit).
async fn policy_issuance(levels: &[usize], duration: Duration) -> Vec<Row> {
    let mut rows = Vec::new();
    let default = Server::broker(tempfile::tempdir().expect("temporary directory"), None);
    let large_data = tempfile::tempdir().expect("temporary directory");
    let policy_dir = large_data.path().join("policy");
    std::fs::create_dir(&policy_dir).expect("policy directory");
    std::fs::write(
        policy_dir.join("fleet.cedar"),
        fleet_policies(1000, "crm.contacts:read"),
    )
    .expect("write the policy set");
    let large = Server::broker(large_data, None);
    let mut default_rates = HashMap::new();
    for (server, name) in [(&default, "default"), (&large, "large")] {
        let admin = Connection::open(&server.grpc, server.admin_credential.as_deref(), None)
            .await
            .expect("connect");
        let credential = agent_credential(&admin, &format!("policy-{name}-agent")).await;
        let agents = connections(&server.grpc, Some(&credential), 4).await;
        for &concurrency in levels {
            eprintln!("sqlite: BeginTask with the {name} policy set, K={concurrency}");
            let measured = drive(concurrency, duration, issuance(&agents)).await;
            if name == "default" {
                default_rates.insert(concurrency, measured.per_second());
                rows.push(measured.row(
                    "reference: BeginTask, default policy (1 permit)",
                    "sqlite",
                    concurrency,
                    None,
                ));
            } else {
                let reference = default_rates.get(&concurrency).copied().unwrap_or(f64::NAN);
                rows.push(measured.row(
                    "BeginTask, 1,000 policies",
                    "sqlite",
                    concurrency,
                    Some(("BeginTask, default policy", reference)),
                ));
            }
        }
    }
    rows
}

/// How long after the quorum's last `Approve` returns the agent's `WatchGrant` stream delivers
/// the credential: one request at a time on a `--dev` broker where `tickets:write` waits for
/// one operator. Each round opens the stream (and reads its pending message) before the
/// approval, so the time measured is the broker's wake-up and delivery.
async fn approval_latency(duration: Duration) -> Row {
    let (server, admin, operator) = approval_broker().await;
    let agent_token = agent_credential(&admin, "approval-agent").await;
    let agent = Connection::open(&server.grpc, Some(&agent_token), None)
        .await
        .expect("connect");
    let task = open_task(&agent).await;
    eprintln!("sqlite: approval to WatchGrant delivery");
    let started = Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < duration {
        let lease_id = ask_to_wait(&agent, &task).await;
        latencies.push(approve_and_time(&agent, &operator, lease_id).await);
    }
    Measurement {
        operations: latencies.len() as u64,
        elapsed: started.elapsed(),
        latencies,
    }
    .row(
        "approval -> WatchGrant credential (1 at a time)",
        "sqlite",
        1,
        None,
    )
}

/// A `--dev` broker on SQLite where `tickets:write` waits for one operator: the server, its
/// admin and an operator.
async fn approval_broker() -> (Server, Connection, Connection) {
    let data = tempfile::tempdir().expect("temporary directory");
    let policy_dir = data.path().join("policy");
    std::fs::create_dir(&policy_dir).expect("policy directory");
    std::fs::write(
        policy_dir.join("approvals.cedar"),
        "permit (principal in Warrant::Role::\"agent\", action, resource);\n\
         @approval permit (principal, action, resource == Warrant::Scope::\"tickets:write\");\n",
    )
    .expect("write the policy set");
    let server = Server::broker(data, None);
    let admin = Connection::open(&server.grpc, server.admin_credential.as_deref(), None)
        .await
        .expect("connect");
    let operator_token = admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "bench-operator".into(),
            roles: vec![proto::Role::Operator as i32],
            ..Default::default()
        })
        .await
        .expect("create the operator")
        .into_inner()
        .credential;
    let operator = Connection::open(&server.grpc, Some(&operator_token), None)
        .await
        .expect("connect");
    (server, admin, operator)
}

/// Opens a one-hour task with no scope as `agent`.
async fn open_task(agent: &Connection) -> String {
    agent
        .tasks()
        .begin_task(begin_request(&[], 3600))
        .await
        .expect("open task")
        .into_inner()
        .task_id
}

fn tickets_write(task: &str) -> proto::RequestGrantRequest {
    proto::RequestGrantRequest {
        task_id: task.to_owned(),
        scope: "tickets:write".into(),
        ttl_seconds: 0,
        risk: None,
    }
}

/// Asks for `tickets:write` in `task`, which waits for an operator: the request's id.
async fn ask_to_wait(agent: &Connection, task: &str) -> String {
    agent
        .tasks()
        .request_grant(tickets_write(task))
        .await
        .expect("request")
        .into_inner()
        .pending
        .expect("the grant waits")
        .lease_id
}

/// Opens the agent's `WatchGrant` on `lease_id` (and reads its pending message), has the
/// operator approve, and times from `Approve` returning to the credential on the stream.
async fn approve_and_time(agent: &Connection, operator: &Connection, lease_id: String) -> Duration {
    let mut stream = agent
        .tasks()
        .watch_grant(proto::WatchGrantRequest {
            lease_id: lease_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("pending status");
    operator
        .approvals()
        .approve(proto::AnswerRequest {
            lease_id,
            reason: "load test".into(),
            request_digest: String::new(),
        })
        .await
        .expect("approve");
    let approved = Instant::now();
    while stream
        .message()
        .await
        .expect("status")
        .expect("open stream")
        .lease
        .is_none()
    {}
    approved.elapsed()
}

/// Requests one workload may have waiting (the broker's cap).
const PENDING_CAP: usize = 20;

/// `agents` agents each at their cap of waiting requests (500 make 10,000): the time to make
/// them wait, then with all of them waiting, `ListPending`'s first page, a walk through every
/// page, `WatchPending` delivering the backlog, and one more request travelling to the
/// operator's stream and, approved, to the agent's `WatchGrant`.
async fn approval_flood(agents: usize, duration: Duration) -> Vec<Row> {
    let waiting = agents * PENDING_CAP;
    let (server, admin, operator) = approval_broker().await;
    let mut rows = Vec::new();

    eprintln!("sqlite: flood: {waiting} requests waiting");
    let started = Instant::now();
    let mut fills = tokio::task::JoinSet::new();
    let grpc = Arc::new(server.grpc.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    for index in 0..agents {
        let token = agent_credential(&admin, &format!("flood-agent-{index}")).await;
        let (grpc, gate) = (grpc.clone(), gate.clone());
        fills.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("gate");
            let agent = Connection::open(&grpc, Some(&token), None)
                .await
                .expect("connect");
            let task = open_task(&agent).await;
            for _ in 0..PENDING_CAP {
                ask_to_wait(&agent, &task).await;
            }
            let over = agent.tasks().request_grant(tickets_write(&task)).await;
            assert_eq!(
                over.map(drop).unwrap_err().code(),
                tonic::Code::ResourceExhausted,
                "one past the cap is refused"
            );
        });
    }
    fills.join_all().await;
    rows.push(Row::one_off(
        format!("flood: {waiting} requests made to wait ({agents} agents at the cap of {PENDING_CAP}, 16 at once)"),
        "sqlite",
        started.elapsed().as_secs_f64() * 1000.0,
    ));

    let list_page = |page_size: u32, page_token: String| {
        let mut approvals = operator.approvals();
        async move {
            approvals
                .list_pending(proto::ListPendingRequest {
                    page_size,
                    page_token,
                    filter: None,
                })
                .await
                .expect("list")
                .into_inner()
        }
    };
    let started = Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < duration {
        let began = Instant::now();
        let page = list_page(100, String::new()).await;
        latencies.push(began.elapsed());
        assert_eq!(page.requests.len(), 100);
    }
    rows.push(
        Measurement {
            operations: latencies.len() as u64,
            elapsed: started.elapsed(),
            latencies,
        }
        .row(
            &format!("ListPending, first page of 100, {waiting} waiting"),
            "sqlite",
            1,
            None,
        ),
    );
    let started = Instant::now();
    let (mut listed, mut token) = (0, String::new());
    loop {
        let page = list_page(500, token).await;
        listed += page.requests.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, waiting);
    rows.push(Row::one_off(
        format!("ListPending, every page of 500 through {waiting} waiting"),
        "sqlite",
        started.elapsed().as_secs_f64() * 1000.0,
    ));

    let started = Instant::now();
    let mut stream = operator
        .approvals()
        .watch_pending(proto::WatchPendingRequest::default())
        .await
        .expect("watch")
        .into_inner();
    for _ in 0..waiting {
        stream
            .message()
            .await
            .expect("backlog")
            .expect("open stream");
    }
    rows.push(Row::one_off(
        format!("WatchPending: the {waiting} waiting delivered"),
        "sqlite",
        started.elapsed().as_secs_f64() * 1000.0,
    ));

    // One more agent, below its cap: each request it makes is approved at once.
    let token = agent_credential(&admin, "flood-latecomer").await;
    let agent = Connection::open(&server.grpc, Some(&token), None)
        .await
        .expect("connect");
    let task = open_task(&agent).await;
    let (mut to_operator, mut to_agent) = (Vec::new(), Vec::new());
    let started = Instant::now();
    while started.elapsed() < duration {
        let asked = Instant::now();
        let lease_id = ask_to_wait(&agent, &task).await;
        let seen = stream
            .message()
            .await
            .expect("new request")
            .expect("open stream");
        assert_eq!(seen.lease_id, lease_id);
        to_operator.push(asked.elapsed());
        to_agent.push(approve_and_time(&agent, &operator, lease_id).await);
    }
    for (latencies, scenario) in [
        (to_operator, "request -> operator's WatchPending"),
        (to_agent, "approval -> WatchGrant credential"),
    ] {
        rows.push(
            Measurement {
                operations: latencies.len() as u64,
                elapsed: started.elapsed(),
                latencies,
            }
            .row(&format!("{scenario}, {waiting} waiting"), "sqlite", 1, None),
        );
    }
    rows
}

/// The raw signing rate measured at the start of the run.
fn signing_rate_of(rows: &[Row]) -> f64 {
    rows.iter()
        .find(|row| row.scenario.starts_with("reference: raw Ed25519 sign"))
        .map_or(f64::NAN, |row| row.per_second)
}

/// Times `LoadedPolicy::decide` on one thread against a set of `count` policies shaped like a
/// fleet's: one permit per scope by name, a label-reading permit and forbid, and approval rules
/// reading the context; the decided request matches a permit near the end of the set.
fn policy_decisions(count: usize, duration: Duration) -> Measurement {
    use warrant::domain::scope::AllowedWorkloads;
    use warrant::domain::{
        Caller, CredentialKind, Labels, Role, ScopeDefinition, ScopeName, SpiffeId, TaskContext,
        UnixMillis, WorkloadName,
    };
    use warrant::policy::load::{PolicyFile, from_files, schema_for};
    let matched = format!("scope:{}", count - 1);
    let text = fleet_policies(count, &matched);
    let policy = from_files(
        vec![PolicyFile {
            name: "bench.cedar".into(),
            text,
        }],
        "bench".into(),
        &schema_for(&Default::default()),
    )
    .expect("the benchmark policy set loads");
    let labels = |pairs: &[(&str, &str)]| {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Labels::parse("labels", owned.iter().map(|(k, v)| (k, v))).expect("labels")
    };
    let caller = Caller {
        workload_id: "w".into(),
        name: WorkloadName::parse("name", "bench-agent").expect("name"),
        spiffe_id: SpiffeId::from_stored("spiffe://bench/bench-agent".into()),
        roles: vec![Role::Agent],
        audiences: Vec::new(),
        certificate_thumbprint: None,
        labels: labels(&[("team", "support")]),
    };
    let scope = ScopeDefinition {
        name: ScopeName::parse("scope", &matched).expect("scope"),
        description: String::new(),
        audience: "https://bench".into(),
        kind: CredentialKind::Jwt,
        default_ttl: Duration::from_secs(300),
        max_ttl: Duration::from_secs(900),
        allowed_workloads: AllowedWorkloads::Any,
        labels: labels(&[("access", "write")]),
        max_uses: None,
    };
    let context = TaskContext::default();
    let started = Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < duration {
        let began = Instant::now();
        let decision = policy.decide(&warrant::policy::GrantQuery {
            caller: &caller,
            scope: &scope,
            facts: warrant::policy::TaskFacts {
                purpose: "bench",
                context: &context,
                requested_ttl: Duration::from_secs(300),
                delegation_depth: 0,
                now: UnixMillis::now(),
                risk: Some(10),
            },
        });
        latencies.push(began.elapsed());
        std::hint::black_box(decision);
    }
    Measurement {
        operations: latencies.len() as u64,
        elapsed: started.elapsed(),
        latencies,
    }
}

fn raw_signature_rates(duration: Duration) -> (Measurement, Measurement) {
    let (key, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
    let message = [7u8; 300]; // about the size of a token's signing input
    let signature = key.sign(&message);
    let time = |operation: &dyn Fn()| {
        let started = Instant::now();
        let mut operations = 0;
        while started.elapsed() < duration {
            for _ in 0..100 {
                operation();
            }
            operations += 100;
        }
        Measurement {
            operations,
            elapsed: started.elapsed(),
            latencies: Vec::new(),
        }
    };
    let signing = time(&|| {
        std::hint::black_box(key.sign(std::hint::black_box(&message)));
    });
    let verifying = time(&|| {
        assert!(
            key.verifying_key()
                .verify(std::hint::black_box(&message), &signature)
        );
    });
    (signing, verifying)
}

/// X.509-SVID issuance (a fresh P-256 key and a leaf signed by the CA) on one core, with the
/// broker's own CA code: the raw reference for attestation.
fn raw_leaf_rate(duration: Duration) -> Measurement {
    let trust_domain = TrustDomain::parse("trust_domain", "bench.local").expect("trust domain");
    let ca = Ca::in_memory(&trust_domain).expect("CA");
    let name = warrant::domain::WorkloadName::parse("name", "bench").expect("name");
    let spiffe_id = SpiffeId::for_workload(&trust_domain, &name);
    let started = Instant::now();
    let mut operations = 0;
    while started.elapsed() < duration {
        let svid = ca
            .issue(&spiffe_id, Duration::from_secs(3600), UnixMillis::now())
            .expect("leaf");
        std::hint::black_box(svid);
        operations += 1;
    }
    Measurement {
        operations,
        elapsed: started.elapsed(),
        latencies: Vec::new(),
    }
}

/// Join-token attestation at K = 16 and 64: each call trades one join token (made beforehand
/// by the admin) for an SVID, consuming the token durably and recording the SVID.
async fn attestation(
    broker: &Server,
    admin: &Connection,
    backend: &str,
    options: &Options,
) -> Vec<Row> {
    let duration = options.duration;
    let leaf = raw_leaf_rate(duration.min(Duration::from_secs(3)));
    let leaf_rate = leaf.per_second();
    let mut rows = vec![leaf.row(
        "reference: raw X.509-SVID issuance (P-256 key + leaf, 1 core)",
        backend,
        1,
        None,
    )];
    admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "load-attester".into(),
            roles: vec![proto::Role::Agent as i32],
            audiences: Vec::new(),
            no_bearer_credential: true,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .expect("create workload");
    let anonymous = connections(&broker.grpc, None, 4).await;
    for concurrency in two_levels(options) {
        eprintln!("{backend}: Attest (join token) K={concurrency}");
        // Tokens for up to 3,000 attestations a second, made by 16 concurrent admin calls for
        // at most the duration itself; attestation is measured for as long as they last.
        let wanted = (duration.as_secs_f64() * 3000.0) as usize + 200;
        let deadline = Instant::now() + duration;
        let (sender, receiver) = mpsc::unbounded_channel::<String>();
        let makers: Vec<_> = (0..16)
            .map(|index| {
                let mut admin = admin.admin();
                let sender = sender.clone();
                let count = wanted / 16 + usize::from(index < wanted % 16);
                tokio::spawn(async move {
                    for _ in 0..count {
                        if Instant::now() > deadline {
                            break;
                        }
                        let token = admin
                            .create_join_token(proto::CreateJoinTokenRequest {
                                name: "load-attester".into(),
                                ttl_seconds: 3600,
                            })
                            .await
                            .expect("join token")
                            .into_inner()
                            .join_token;
                        sender.send(token).expect("queue");
                    }
                })
            })
            .collect();
        for maker in makers {
            maker.await.expect("token maker");
        }
        drop(sender);
        let queue = Arc::new(tokio::sync::Mutex::new(receiver));
        let next = Arc::new(round_robin(
            anonymous.iter().map(Connection::attestation).collect(),
        ));
        let attest: Operation = Arc::new(move || {
            let mut attestation = next();
            let queue = queue.clone();
            Box::pin(async move {
                let Some(token) = queue.lock().await.recv().await else {
                    return Err(supply_used_up());
                };
                attestation
                    .attest(proto::AttestRequest {
                        method: Some(proto::attest_request::Method::JoinToken(token)),
                    })
                    .await
                    .map(|_| ())
            })
        });
        rows.push(drive(concurrency, duration, attest).await.row(
            "join-token attestation: Attest (token consumed, SVID recorded)",
            backend,
            concurrency,
            Some(("raw SVID issuance", leaf_rate)),
        ));
    }
    rows
}

/// The concurrencies of the two-level scenarios (16 and 64) that this run measures.
fn two_levels(options: &Options) -> Vec<usize> {
    [16, 64]
        .into_iter()
        .filter(|k| options.concurrency.len() > 1 || options.concurrency.contains(k))
        .collect()
}

/// Registers agent `name` with a bearer credential, which it returns.
async fn agent_credential(admin: &Connection, name: &str) -> String {
    admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: name.into(),
            roles: vec![proto::Role::Agent as i32],
            ..Default::default()
        })
        .await
        .expect("create workload")
        .into_inner()
        .credential
}

/// A broker deployed with TLS (SQLite): issuance by an agent presenting its X.509-SVID
/// (mTLS) and by the same agent with its bearer credential over TLS, each against a plaintext
/// `--dev` broker's bearer issuance measured just before at the same K; and `RenewSvid` over
/// mTLS against raw leaf signing.
async fn mtls(options: &Options) -> Vec<Row> {
    let duration = options.duration;
    let levels = two_levels(options);
    let leaf = raw_leaf_rate(duration.min(Duration::from_secs(3)));
    let leaf_rate = leaf.per_second();
    let mut rows = vec![leaf.row(
        "reference: raw X.509-SVID issuance (P-256 key + leaf, 1 core)",
        "-",
        1,
        None,
    )];
    let mut plaintext_rates = HashMap::new();
    {
        let plain = Server::broker(tempfile::tempdir().expect("temporary directory"), None);
        let admin = Connection::open(&plain.grpc, plain.admin_credential.as_deref(), None)
            .await
            .expect("connect");
        let credential = agent_credential(&admin, "load-plain-agent").await;
        let agents = connections(&plain.grpc, Some(&credential), 4).await;
        for &concurrency in &levels {
            eprintln!("sqlite: BeginTask, plaintext bearer, K={concurrency}");
            let measured = drive(concurrency, duration, issuance(&agents)).await;
            plaintext_rates.insert(concurrency, measured.per_second());
            rows.push(measured.row(
                "reference: BeginTask, bearer credential, plaintext (--dev)",
                "sqlite",
                concurrency,
                None,
            ));
        }
    }

    let (broker, server_ca) = Server::tls_broker(tempfile::tempdir().expect("temporary directory"));
    let open = |credential: Option<String>, identity: Option<ClientIdentity>| {
        let (address, server_ca) = (broker.grpc.clone(), server_ca.clone());
        async move {
            Connection::open_as(
                &address,
                credential.as_deref(),
                Some(&server_ca),
                identity.as_ref(),
            )
            .await
            .expect("connect over TLS")
        }
    };
    let admin = open(broker.admin_credential.clone(), None).await;
    let credential = agent_credential(&admin, "load-mtls-agent").await;
    let join_token = admin
        .admin()
        .create_join_token(proto::CreateJoinTokenRequest {
            name: "load-mtls-agent".into(),
            ttl_seconds: 600,
        })
        .await
        .expect("join token")
        .into_inner()
        .join_token;
    let svid = open(None, None)
        .await
        .attestation()
        .attest(proto::AttestRequest {
            method: Some(proto::attest_request::Method::JoinToken(join_token)),
        })
        .await
        .expect("attest")
        .into_inner()
        .svid
        .expect("an SVID");
    let identity = ClientIdentity {
        certificate_pem: svid.certificate_pem.into_bytes(),
        private_key_pem: svid.private_key_pem.into_bytes(),
    };
    let (mut bearer_agents, mut svid_agents) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        bearer_agents.push(open(Some(credential.clone()), None).await);
        svid_agents.push(open(None, Some(identity.clone())).await);
    }
    for &concurrency in &levels {
        let plaintext = ("plaintext bearer", plaintext_rates[&concurrency]);
        for (agents, scenario) in [
            (&bearer_agents, "BeginTask over TLS, bearer credential"),
            (
                &svid_agents,
                "BeginTask over mTLS, X.509-SVID (token bound to it)",
            ),
        ] {
            eprintln!("sqlite: {scenario} K={concurrency}");
            rows.push(drive(concurrency, duration, issuance(agents)).await.row(
                scenario,
                "sqlite",
                concurrency,
                Some(plaintext),
            ));
        }
    }
    let next = Arc::new(round_robin(
        svid_agents.iter().map(Connection::attestation).collect(),
    ));
    for &concurrency in &levels {
        eprintln!("sqlite: RenewSvid K={concurrency}");
        let next = next.clone();
        let renew: Operation = Arc::new(move || {
            let mut attestation = next();
            Box::pin(async move {
                attestation
                    .renew_svid(proto::RenewSvidRequest {})
                    .await
                    .map(|_| ())
            })
        });
        rows.push(drive(concurrency, duration, renew).await.row(
            "RenewSvid over mTLS (new key and leaf, SVID recorded)",
            "sqlite",
            concurrency,
            Some(("raw SVID issuance", leaf_rate)),
        ));
    }
    rows
}

/// One small row per transaction, one after another, on the same database with the broker's
/// durability settings: the rate a broker without shared commits could at best reach.
async fn raw_commit_rate(database_url: &str, duration: Duration) -> Measurement {
    let started = Instant::now();
    let mut latencies = Vec::new();
    if database_url.starts_with("sqlite:") {
        let url = database_url.to_owned();
        latencies = tokio::task::spawn_blocking(move || {
            let connection = warrant::store::sqlite::tool_connection(&url).expect("open database");
            connection
                .execute_batch(
                    "CREATE TABLE IF NOT EXISTS commit_probe (id INTEGER PRIMARY KEY, note TEXT NOT NULL)",
                )
                .expect("create probe table");
            let mut insert = connection
                .prepare("INSERT INTO commit_probe (id, note) VALUES (?1, 'x')")
                .expect("prepare");
            let mut latencies = Vec::new();
            let mut id: i64 = 0;
            while started.elapsed() < duration {
                id += 1;
                let call = Instant::now();
                insert.execute([id]).expect("insert");
                latencies.push(call.elapsed());
            }
            latencies
        })
        .await
        .expect("raw commit thread");
    } else {
        let mut connection = sqlx::PgConnection::connect(database_url)
            .await
            .expect("open database");
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS commit_probe (id BIGINT PRIMARY KEY, note TEXT NOT NULL)",
        )
        .execute(&mut connection)
        .await
        .expect("create probe table");
        let mut id: i64 = 0;
        while started.elapsed() < duration {
            id += 1;
            let call = Instant::now();
            sqlx::query("INSERT INTO commit_probe (id, note) VALUES ($1, 'x')")
                .bind(id)
                .execute(&mut connection)
                .await
                .expect("insert");
            latencies.push(call.elapsed());
        }
    }
    Measurement {
        operations: latencies.len() as u64,
        elapsed: started.elapsed(),
        latencies,
    }
}

/// A fresh PostgreSQL database next to the one in `base`; returns its URL.
async fn fresh_postgres(base: &str) -> String {
    let mut admin = sqlx::PgConnection::connect(base)
        .await
        .expect("PostgreSQL reachable");
    let name = format!(
        "warrant_bench_{}",
        warrant::domain::ids::hex(&warrant::issuer::random::bytes::<6>())
    );
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let (prefix, query) = base
        .split_once('?')
        .map_or((base, String::new()), |(p, q)| (p, format!("?{q}")));
    let server = prefix.rsplit_once('/').map_or(prefix, |(server, _)| server);
    format!("{server}/{name}{query}")
}

/// Drops a database made by [`fresh_postgres`] once its scenarios are over, so that the
/// server's background work on the rows they wrote (autovacuum, analyze) does not run into the
/// scenarios measured after them.
async fn drop_postgres(base: &str, url: &str) {
    let name = url
        .rsplit_once('/')
        .and_then(|(_, tail)| tail.split('?').next())
        .expect("database name in URL");
    let mut admin = sqlx::PgConnection::connect(base)
        .await
        .expect("PostgreSQL reachable");
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop database");
}

/// Opens a one-scope task per call, spread over `agents`: the durable issuance scenario.
fn issuance(agents: &[Connection]) -> Operation {
    issuance_of(agents, "crm.contacts:read")
}

/// `BeginTask` with the one scope `scope`, checking that its credential came with it.
fn issuance_of(agents: &[Connection], scope: &'static str) -> Operation {
    let next = round_robin(agents.iter().map(Connection::tasks).collect());
    Arc::new(move || {
        let mut tasks = next();
        Box::pin(async move {
            let task = tasks
                .begin_task(begin_request(&[scope], 3600))
                .await?
                .into_inner();
            match task.leases.first() {
                Some(lease) if !lease.credential.is_empty() => Ok(()),
                _ => Err(Status::internal("no credential came with the task")),
            }
        })
    })
}

fn begin_request(scopes: &[&str], ttl_seconds: u32) -> proto::BeginTaskRequest {
    proto::BeginTaskRequest {
        purpose: "load test".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds,
        context: None,
        idempotency_key: String::new(),
        risk: None,
    }
}

struct Options {
    duration: Duration,
    concurrency: Vec<usize>,
    postgres: Option<String>,
    json: Option<PathBuf>,
    /// Active leases preloaded for the scale scenario.
    scale_leases: i64,
    /// Runs only the scenarios whose name is given (references always run).
    only: Option<String>,
    /// Agents that each fill their cap of pending requests in the flood scenario.
    flood_agents: usize,
}

/// Names accepted by `--only`.
const SCENARIOS: &[&str] = &[
    "issuance",
    "grant",
    "complete",
    "introspect",
    "verify",
    "propagation",
    "replicas",
    "scale",
    "startup",
    "attest",
    "mtls",
    "policy",
    "toolcall",
    "flood",
    "apikey",
];

impl Options {
    fn parse() -> Options {
        let mut options = Options {
            duration: Duration::from_secs(10),
            concurrency: vec![1, 16, 64],
            postgres: std::env::var("WARRANT_TEST_DATABASE_URL")
                .ok()
                .filter(|url| !url.is_empty()),
            json: None,
            scale_leases: 1_000_000,
            flood_agents: 500,
            only: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    options.duration = Duration::from_secs_f64(
                        args.next()
                            .and_then(|v| v.parse().ok())
                            .expect("--seconds N"),
                    )
                }
                "--quick" => {
                    options.duration = Duration::from_millis(1500);
                    options.concurrency = vec![16];
                    options.scale_leases = 20_000;
                    options.flood_agents = 50;
                }
                "--sqlite-only" => options.postgres = None,
                "--json" => options.json = args.next().map(PathBuf::from),
                "--only" => {
                    let name = args.next().unwrap_or_default();
                    assert!(
                        SCENARIOS.contains(&name.as_str()),
                        "--only takes one of {SCENARIOS:?}"
                    );
                    options.only = Some(name);
                }
                "--bench" => {} // added by `cargo bench`
                "--help" | "-h" => {
                    println!(
                        "loadgen [--seconds N] [--quick] [--sqlite-only] [--json FILE] [--only SCENARIO]\n\
                         scenarios: {}",
                        SCENARIOS.join(", ")
                    );
                    std::process::exit(0);
                }
                other => panic!("unknown argument {other} (see --help)"),
            }
        }
        options
    }

    /// Whether scenario `name` (one of [`SCENARIOS`]) is to run.
    fn runs(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == name)
    }
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if std::env::args().any(|arg| arg == "--serve-echo") {
        runtime.block_on(serve_echo());
        return;
    }
    let options = Options::parse();
    let rows = runtime.block_on(run(&options));
    print_table(&rows);
    let json = serde_json::to_string_pretty(&rows).expect("rows serialize");
    match &options.json {
        Some(path) => std::fs::write(path, json).expect("write JSON"),
        None => println!("\n{json}"),
    }
}

async fn run(options: &Options) -> Vec<Row> {
    let mut rows = Vec::new();
    let duration = options.duration;

    eprintln!("references: raw Ed25519, gRPC echo");
    let (signing, verifying) = raw_signature_rates(duration.min(Duration::from_secs(3)));
    let verify_rate = verifying.per_second();
    rows.push(signing.row("reference: raw Ed25519 sign (1 core)", "-", 1, None));
    rows.push(verifying.row("reference: raw Ed25519 verify (1 core)", "-", 1, None));
    let echo = Server::echo();
    let echo_connections = connections(&echo.grpc, None, 4).await;
    let next = round_robin(
        echo_connections
            .iter()
            .map(|c| tonic_health::pb::health_client::HealthClient::new(c.channel()))
            .collect(),
    );
    let echo_call: Operation = Arc::new(move || {
        let mut client = next();
        Box::pin(async move {
            client
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .map(|_| ())
        })
    });
    let echo_measurement = drive(64, duration, echo_call).await;
    let echo_rate = echo_measurement.per_second();
    rows.push(echo_measurement.row("reference: gRPC echo (tonic health check)", "-", 64, None));
    drop(echo);
    if options.runs("policy") {
        let sign_rate = signing_rate_of(&rows);
        for policies in [10, 100, 1000] {
            eprintln!("policy: decisions with {policies} policies");
            let measured = policy_decisions(policies, duration.min(Duration::from_secs(3)));
            rows.push(measured.row(
                &format!("policy decision, {policies} policies (in process, 1 core)"),
                "-",
                1,
                Some(("raw Ed25519 sign", sign_rate)),
            ));
            if let Some(row) = rows.last() {
                eprintln!(
                    "policy: {policies} policies: p50 {:.1} us, p99 {:.1} us",
                    row.p50_ms * 1000.0,
                    row.p99_ms * 1000.0
                );
            }
        }
        rows.extend(policy_issuance(&two_levels(options), duration).await);
        rows.push(approval_latency(duration.min(Duration::from_secs(5))).await);
    }
    if options.runs("flood") {
        rows.extend(
            approval_flood(options.flood_agents, duration.min(Duration::from_secs(5))).await,
        );
    }

    let mut backends: Vec<(&str, Option<String>)> = vec![("sqlite", None)];
    if let Some(base) = &options.postgres {
        backends.push(("postgres", Some(fresh_postgres(base).await)));
    }
    for (backend, database_url) in &backends {
        // The server's base URL, for the PostgreSQL backend.
        let postgres_base = database_url.as_ref().and(options.postgres.as_deref());
        eprintln!("{backend}: raw commit rate");
        let probe_dir = tempfile::tempdir().expect("temporary directory");
        let probe_url = match postgres_base {
            Some(base) => fresh_postgres(base).await,
            None => format!(
                "sqlite://{}?mode=rwc",
                probe_dir.path().join("probe.db").display()
            ),
        };
        let commits = raw_commit_rate(&probe_url, duration.min(Duration::from_secs(5))).await;
        if let Some(base) = postgres_base {
            drop_postgres(base, &probe_url).await;
        }
        let commit_rate = commits.per_second();
        rows.push(commits.row(
            "reference: raw commit (1 row per transaction)",
            backend,
            1,
            None,
        ));

        let broker = Server::broker(
            tempfile::tempdir().expect("temporary directory"),
            database_url.as_deref(),
        );
        rows.extend(
            broker_scenarios(
                &broker,
                backend,
                options,
                echo_rate,
                commit_rate,
                verify_rate,
            )
            .await,
        );
        let empty_rate = rows
            .iter()
            .find(|row| {
                row.backend == *backend
                    && row.scenario.starts_with("durable issuance")
                    && row.concurrency == 64
            })
            .map(|row| row.per_second);
        drop(broker);
        if let (Some(base), Some(url)) = (postgres_base, database_url) {
            drop_postgres(base, url).await;
        }
        if let Some(base) = postgres_base
            && options.runs("replicas")
        {
            eprintln!("postgres: two replicas, revocation propagation");
            rows.extend(replica_propagation(base).await);
        }
        if options.runs("scale") {
            let scale_url = match postgres_base {
                Some(base) => Some(fresh_postgres(base).await),
                None => None,
            };
            rows.extend(scale(backend, scale_url.clone(), options, empty_rate).await);
            if let (Some(base), Some(url)) = (postgres_base, &scale_url) {
                drop_postgres(base, url).await;
            }
        }
    }

    if options.runs("mtls") {
        rows.extend(mtls(options).await);
    }

    if options.runs("startup") {
        eprintln!("start-up");
        let fresh = Server::broker(tempfile::tempdir().expect("temporary directory"), None);
        let ready_ms = fresh.ready_after.as_secs_f64() * 1000.0;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_mib = fresh.resident_mib();
        rows.push(Row::one_off(
            format!("serve --dev start-up to ready (idle RSS {idle_mib:.1} MiB)"),
            "sqlite",
            ready_ms,
        ));
    }
    rows
}

async fn broker_scenarios(
    broker: &Server,
    backend: &str,
    options: &Options,
    echo_rate: f64,
    commit_rate: f64,
    verify_rate: f64,
) -> Vec<Row> {
    let duration = options.duration;
    let mut rows = Vec::new();
    let admin = Connection::open(&broker.grpc, broker.admin_credential.as_deref(), None)
        .await
        .expect("connect");
    let agent_credential = admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "load-agent".into(),
            roles: vec![proto::Role::Agent as i32],
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .expect("create workload")
        .into_inner()
        .credential;
    // The downstream API's credential, for the verifier: a resource server of the CRM audience.
    let api_credential = admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "load-api".into(),
            roles: vec![proto::Role::ResourceServer as i32],
            audiences: vec![CRM_AUDIENCE.into()],
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .expect("create workload")
        .into_inner()
        .credential;
    let agents = connections(&broker.grpc, Some(&agent_credential), 4).await;
    let next_tasks = Arc::new(round_robin(agents.iter().map(Connection::tasks).collect()));

    if options.runs("issuance") {
        for &concurrency in &options.concurrency {
            eprintln!("{backend}: BeginTask K={concurrency}");
            let before = CpuTimes::now(broker.child.id());
            let measured = drive(concurrency, duration, issuance(&agents)).await;
            if concurrency == 64 {
                let spent = CpuTimes::now(broker.child.id()).since(&before);
                rows.push(Row::one_off(
                    format!(
                        "CPU during K=64 issuance: {:.2} of 2 cores busy; broker {:.0}%, PostgreSQL {:.0}%, \
                         load generator and kernel {:.0}%",
                        spent.busy_cores(measured.elapsed),
                        spent.share(spent.broker),
                        spent.share(spent.postgres),
                        100.0 - spent.share(spent.broker) - spent.share(spent.postgres),
                    ),
                    backend,
                    0.0,
                ));
            }
            let reference = if concurrency == 1 {
                ("raw commit", commit_rate)
            } else {
                ("gRPC echo", echo_rate)
            };
            rows.push(measured.row(
                "durable issuance: BeginTask, 1 JWT scope",
                backend,
                concurrency,
                Some(reference),
            ));
        }
    }
    if options.runs("apikey") {
        eprintln!("{backend}: BeginTask K=16, an API key against a JWT");
        let jwt = drive(16, duration, issuance(&agents)).await;
        let jwt_rate = jwt.per_second();
        rows.push(jwt.row(
            "BeginTask, 1 JWT scope (the API keys' reference)",
            backend,
            16,
            Some(("gRPC echo", echo_rate)),
        ));
        rows.push(
            drive(16, duration, issuance_of(&agents, "search:query"))
                .await
                .row(
                    "BeginTask, 1 api_key scope (key hash stored with the lease)",
                    backend,
                    16,
                    Some(("JWT issuance", jwt_rate)),
                ),
        );
    }
    if options.runs("grant") {
        eprintln!("{backend}: RequestGrant");
        let open_task = open_task(&agents[0]).await;
        let next = next_tasks.clone();
        let grant: Operation = Arc::new(move || {
            let mut tasks = next();
            let request = proto::RequestGrantRequest {
                task_id: open_task.clone(),
                scope: "tickets:write".into(),
                ttl_seconds: 0,
                risk: None,
            };
            Box::pin(async move { tasks.request_grant(request).await.map(|_| ()) })
        });
        rows.push(drive(16, duration, grant).await.row(
            "RequestGrant on an open task",
            backend,
            16,
            Some(("gRPC echo", echo_rate)),
        ));
    }
    if options.runs("toolcall") {
        eprintln!("{backend}: AuthorizeToolCall K=64");
        let open_task = open_task(&agents[0]).await;
        let next = next_tasks.clone();
        // The dev policy allows a refund up to 10000 cents at once: every call is decided by
        // policy, audited, and stored as a single-use call token.
        let call: Operation = Arc::new(move || {
            let mut tasks = next();
            let request = proto::AuthorizeToolCallRequest {
                task_id: open_task.clone(),
                tool: "payments.refund".into(),
                arguments_json: r#"{"order_id":"A-1","amount_cents":500}"#.into(),
                risk: None,
            };
            Box::pin(async move {
                let answer = tasks.authorize_tool_call(request).await?.into_inner();
                match answer.call_token {
                    Some(_) => Ok(()),
                    None => Err(Status::internal("the call was not allowed")),
                }
            })
        });
        rows.push(drive(64, duration, call).await.row(
            "AuthorizeToolCall, allowed (policy, audit, call token)",
            backend,
            64,
            Some(("gRPC echo", echo_rate)),
        ));
    }
    if options.runs("complete") {
        eprintln!("{backend}: CompleteTask (5 leases)");
        let (sender, receiver) = mpsc::unbounded_channel::<String>();
        // Tasks for a completion rate of up to 4,000/s over the whole duration, prepared by 16
        // concurrent clients for at most the duration itself; completion is measured for as long
        // as they last.
        let prepared = (duration.as_secs_f64() * 4000.0) as usize + 200;
        let preparation_deadline = Instant::now() + duration;
        let preparers: Vec<_> = (0..16)
            .map(|index| {
                let mut tasks = agents[0].tasks();
                let sender = sender.clone();
                let count = prepared / 16 + usize::from(index < prepared % 16);
                tokio::spawn(async move {
                    for _ in 0..count {
                        if Instant::now() > preparation_deadline {
                            break;
                        }
                        let task = tasks
                            .begin_task(begin_request(
                                &["crm.contacts:read", "tickets:write"],
                                3600,
                            ))
                            .await
                            .expect("task")
                            .into_inner();
                        for _ in 0..3 {
                            let request = proto::RequestGrantRequest {
                                task_id: task.task_id.clone(),
                                scope: "crm.contacts:read".into(),
                                ttl_seconds: 0,
                                risk: None,
                            };
                            tasks.request_grant(request).await.expect("grant");
                        }
                        sender.send(task.task_id).expect("queue");
                    }
                })
            })
            .collect();
        for preparer in preparers {
            preparer.await.expect("preparer");
        }
        let queue = Arc::new(tokio::sync::Mutex::new(receiver));
        let next = next_tasks.clone();
        let complete: Operation = Arc::new(move || {
            let mut tasks = next();
            let queue = queue.clone();
            Box::pin(async move {
                let Some(task_id) = queue.lock().await.recv().await else {
                    return Err(supply_used_up());
                };
                tasks
                    .complete_task(proto::CompleteTaskRequest { task_id })
                    .await
                    .map(|_| ())
            })
        });
        drop(sender);
        rows.push(drive(16, duration, complete).await.row(
            "CompleteTask of a task holding 5 leases",
            backend,
            16,
            Some(("gRPC echo", echo_rate)),
        ));
    }
    if options.runs("attest") {
        rows.extend(attestation(broker, &admin, backend, options).await);
    }
    if options.runs("introspect") {
        eprintln!("{backend}: Introspect K=64");
        let mut sample_tokens = Vec::new();
        for index in 0..200 {
            let mut tasks = agents[0].tasks();
            let task = tasks
                .begin_task(begin_request(&["crm.contacts:read"], 3600))
                .await
                .expect("task")
                .into_inner();
            sample_tokens.push(task.leases[0].credential.clone());
            if index % 2 == 1 {
                tasks
                    .complete_task(proto::CompleteTaskRequest {
                        task_id: task.task_id,
                    })
                    .await
                    .expect("complete");
            }
        }
        let sample_tokens = Arc::new(sample_tokens);
        let admins = connections(&broker.grpc, broker.admin_credential.as_deref(), 4).await;
        let next_tokens = round_robin(admins.iter().map(Connection::tokens).collect());
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let introspect: Operation = Arc::new(move || {
            let mut tokens = next_tokens();
            let index =
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % sample_tokens.len();
            let request = proto::IntrospectRequest {
                token: sample_tokens[index].clone(),
                audience: CRM_AUDIENCE.into(),
                ..Default::default()
            };
            Box::pin(async move { tokens.introspect(request).await.map(|_| ()) })
        });
        rows.push(drive(64, duration, introspect).await.row(
            "Introspect, active and revoked tokens mixed",
            backend,
            64,
            Some(("gRPC echo", echo_rate)),
        ));
    }
    if backend == "sqlite" && options.runs("verify") {
        eprintln!("offline verification");
        let token = agents[0]
            .tasks()
            .begin_task(begin_request(&["crm.contacts:read"], 3600))
            .await
            .expect("task")
            .into_inner()
            .leases[0]
            .credential
            .clone();
        let config = VerifierConfig::new(&broker.grpc, CRM_AUDIENCE, api_credential.clone());
        let verifier = Verifier::connect(config).await.expect("verifier");
        let started = Instant::now();
        let mut operations = 0;
        while started.elapsed() < duration.min(Duration::from_secs(3)) {
            for _ in 0..100 {
                verifier
                    .verify_cached(std::hint::black_box(&token))
                    .expect("valid");
            }
            operations += 100;
        }
        let measured = Measurement {
            operations,
            elapsed: started.elapsed(),
            latencies: Vec::new(),
        };
        rows.push(measured.row(
            "offline verification (verifier library, 1 core)",
            "-",
            1,
            Some(("raw Ed25519 verify", verify_rate)),
        ));
    }

    if options.runs("propagation") {
        eprintln!("{backend}: revocation propagation");
        rows.extend(revocation_propagation(broker, backend, &agents[0], &api_credential).await);
    }
    rows
}

/// CPU time spent so far, in clock ticks: by the whole machine (busy, not idle), by the broker
/// process and by every PostgreSQL server process.
struct CpuTimes {
    machine: u64,
    broker: u64,
    postgres: u64,
}

impl CpuTimes {
    fn now(broker_pid: u32) -> CpuTimes {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let machine = stat
            .lines()
            .next()
            .map(|line| {
                let fields: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|f| f.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: everything but idle and iowait.
                fields
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != 3 && *i != 4)
                    .map(|(_, v)| v)
                    .sum()
            })
            .unwrap_or(0);
        let process = |pid: &str| -> Option<(String, u64)> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (name, rest) = stat.split_once(") ")?;
            let name = name.split_once('(')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some((
                name,
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
            ))
        };
        let broker = process(&broker_pid.to_string()).map_or(0, |(_, ticks)| ticks);
        let postgres = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| process(entry.file_name().to_str()?))
            .filter(|(name, _)| name == "postgres")
            .map(|(_, ticks)| ticks)
            .sum();
        CpuTimes {
            machine,
            broker,
            postgres,
        }
    }

    fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            machine: self.machine.saturating_sub(earlier.machine),
            broker: self.broker.saturating_sub(earlier.broker),
            postgres: self.postgres.saturating_sub(earlier.postgres),
        }
    }

    /// Percent of the machine's busy time.
    fn share(&self, ticks: u64) -> f64 {
        ticks as f64 * 100.0 / self.machine.max(1) as f64
    }

    /// Cores busy on average over `elapsed` (clock ticks are 1/100 s on Linux).
    fn busy_cores(&self, elapsed: Duration) -> f64 {
        self.machine as f64 / 100.0 / elapsed.as_secs_f64()
    }
}

/// Two brokers sharing one PostgreSQL database (one issuer, one master key, as replicas behind
/// a load balancer): the time from `CompleteTask` returning on the first until the second's
/// `WatchRevocations` subscriber, and separately its introspection, know of the revocation.
async fn replica_propagation(base: &str) -> Vec<Row> {
    let database_url = fresh_postgres(base).await;
    let issuer = "http://warrant-replicas.invalid";
    let first = Server::broker_with(
        tempfile::tempdir().expect("temporary directory"),
        Some(&database_url),
        &[("WARRANT_ISSUER", issuer)],
    );
    let master_key = std::fs::read_to_string(
        first
            .data
            .as_ref()
            .expect("broker data")
            .path()
            .join("master.key"),
    )
    .expect("master key");
    let second = Server::broker_with(
        tempfile::tempdir().expect("temporary directory"),
        Some(&database_url),
        &[
            ("WARRANT_ISSUER", issuer),
            ("WARRANT_MASTER_KEY", master_key.trim()),
        ],
    );
    let admin_credential = first.admin_credential.clone().expect("admin credential");
    let admin = Connection::open(&first.grpc, Some(&admin_credential), None)
        .await
        .expect("connect");
    let agent_credential = admin
        .admin()
        .create_workload(proto::CreateWorkloadRequest {
            name: "replica-agent".into(),
            roles: vec![proto::Role::Agent as i32],
            audiences: Vec::new(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        })
        .await
        .expect("create workload")
        .into_inner()
        .credential;
    let mut tasks = Connection::open(&first.grpc, Some(&agent_credential), None)
        .await
        .expect("connect")
        .tasks();
    let other = Connection::open(&second.grpc, Some(&admin_credential), None)
        .await
        .expect("connect");
    let mut seen_receiver = watch_task_endings(&other).await;
    let mut introspection = other.tokens();
    let (mut feed_latencies, mut introspection_latencies) = (Vec::new(), Vec::new());
    let mut early: HashMap<String, Instant> = HashMap::new();
    let started = Instant::now();
    for _ in 0..200 {
        let task = tasks
            .begin_task(begin_request(&["crm.contacts:read"], 3600))
            .await
            .expect("task")
            .into_inner();
        let request = proto::IntrospectRequest {
            token: task.leases[0].credential.clone(),
            audience: CRM_AUDIENCE.into(),
            ..Default::default()
        };
        assert!(
            introspection
                .introspect(request.clone())
                .await
                .expect("introspect")
                .into_inner()
                .active,
            "the other replica accepts the token before the revocation"
        );
        tasks
            .complete_task(proto::CompleteTaskRequest {
                task_id: task.task_id.clone(),
            })
            .await
            .expect("complete");
        let returned = Instant::now();
        while introspection
            .introspect(request.clone())
            .await
            .expect("introspect")
            .into_inner()
            .active
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        introspection_latencies.push(returned.elapsed());
        let seen_at = loop {
            if let Some(at) = early.remove(&task.task_id) {
                break at;
            }
            let (task_id, at) = seen_receiver.recv().await.expect("feed open");
            early.insert(task_id, at);
        };
        feed_latencies.push(seen_at.saturating_duration_since(returned));
    }
    let elapsed = started.elapsed();
    drop((first, second));
    drop_postgres(base, &database_url).await;
    let measurement = |latencies: Vec<Duration>| Measurement {
        operations: latencies.len() as u64,
        elapsed,
        latencies,
    };
    vec![
        measurement(feed_latencies).row(
            "revocation seen by the other replica's WatchRevocations subscriber",
            "postgres",
            1,
            None,
        ),
        measurement(introspection_latencies).row(
            "revocation seen by the other replica's introspection",
            "postgres",
            1,
            None,
        ),
    ]
}

/// Follows the revocation feed on `connection` from its start; once it has caught up, every
/// task-level event arrives on the returned channel with the instant it was received.
async fn watch_task_endings(connection: &Connection) -> mpsc::UnboundedReceiver<(String, Instant)> {
    let mut stream = connection
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .expect("watch")
        .into_inner();
    while !stream
        .message()
        .await
        .expect("feed")
        .expect("open")
        .caught_up
    {}
    let (seen, seen_receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(batch)) = stream.message().await {
            let now = Instant::now();
            for event in batch
                .events
                .into_iter()
                .filter(|event| event.lease_id.is_empty())
            {
                let _ = seen.send((event.task_id, now));
            }
        }
    });
    seen_receiver
}

/// Time from `CompleteTask` returning until a `WatchRevocations` subscriber, and separately the
/// verifier library's cache, know of the revocation. The subscriber is an admin (it sees the
/// task-level events); the verifier holds `api_credential`, a resource server's.
async fn revocation_propagation(
    broker: &Server,
    backend: &str,
    agent: &Connection,
    api_credential: &str,
) -> Vec<Row> {
    let watcher = Connection::open(&broker.grpc, broker.admin_credential.as_deref(), None)
        .await
        .expect("connect");
    let mut seen_receiver = watch_task_endings(&watcher).await;
    let verifier = Verifier::connect(VerifierConfig::new(
        &broker.grpc,
        CRM_AUDIENCE,
        api_credential,
    ))
    .await
    .expect("verifier");
    let mut tasks = agent.tasks();
    let (mut feed_latencies, mut cache_latencies) = (Vec::new(), Vec::new());
    let mut early: HashMap<String, Instant> = HashMap::new();
    let started = Instant::now();
    for _ in 0..200 {
        let task = tasks
            .begin_task(begin_request(&["crm.contacts:read"], 3600))
            .await
            .expect("task")
            .into_inner();
        let token = task.leases[0].credential.clone();
        tasks
            .complete_task(proto::CompleteTaskRequest {
                task_id: task.task_id.clone(),
            })
            .await
            .expect("complete");
        let returned = Instant::now();
        while !matches!(verifier.verify_cached(&token), Err(VerifyError::Revoked)) {
            tokio::task::yield_now().await;
        }
        cache_latencies.push(returned.elapsed());
        let seen_at = loop {
            if let Some(at) = early.remove(&task.task_id) {
                break at;
            }
            let (task_id, at) = seen_receiver.recv().await.expect("feed open");
            early.insert(task_id, at);
        };
        feed_latencies.push(seen_at.saturating_duration_since(returned));
    }
    let elapsed = started.elapsed();
    let measurement = |latencies: Vec<Duration>| Measurement {
        operations: latencies.len() as u64,
        elapsed,
        latencies,
    };
    vec![
        measurement(feed_latencies).row(
            "revocation seen by a WatchRevocations subscriber",
            backend,
            1,
            None,
        ),
        measurement(cache_latencies).row(
            "revocation seen by the verifier library's cache",
            backend,
            1,
            None,
        ),
    ]
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<58} {:<9} {:>4} {:>10} {:>8} {:>8} {:>8} {:>8}  ratio to reference",
        "scenario", "backend", "K", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
    );
    for row in rows {
        let ratio = row.ratio.map_or(String::new(), |ratio| {
            format!("{:.1}% of {}", ratio * 100.0, row.reference)
        });
        println!(
            "{:<58} {:<9} {:>4} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
            row.scenario,
            row.backend,
            row.concurrency,
            row.per_second,
            row.p50_ms,
            row.p90_ms,
            row.p99_ms,
            row.max_ms,
            ratio
        );
    }
}

/// The broker holding many active leases: preloaded with one generated `INSERT ... SELECT` while
/// it is stopped, then start-up time to ready, resident memory, and issuance at K = 64 compared
/// with the same scenario on the empty store.
async fn scale(
    backend: &str,
    database_url: Option<String>,
    options: &Options,
    empty_rate: Option<f64>,
) -> Vec<Row> {
    let leases = options.scale_leases;
    eprintln!("{backend}: scale, {leases} active leases");
    let broker = Server::broker(
        tempfile::tempdir().expect("temporary directory"),
        database_url.as_deref(),
    );
    let admin = Connection::open(&broker.grpc, broker.admin_credential.as_deref(), None)
        .await
        .expect("connect");
    let request = proto::CreateWorkloadRequest {
        name: "scale-agent".into(),
        roles: vec![proto::Role::Agent as i32],
        audiences: Vec::new(),
        no_bearer_credential: false,
        selectors: Vec::new(),
        ..Default::default()
    };
    let credential = admin
        .admin()
        .create_workload(request)
        .await
        .expect("workload")
        .into_inner()
        .credential;
    let data = broker.stop();
    let url = database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", data.path().join("warrant.db").display()));
    let preload_started = Instant::now();
    preload(&url, leases).await;
    let preload_seconds = preload_started.elapsed().as_secs_f64();

    let broker = Server::broker(data, database_url.as_deref());
    let ready_ms = broker.ready_after.as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resident = broker.resident_mib();
    let agents = connections(&broker.grpc, Some(&credential), 4).await;
    let issued = drive(64, options.duration, issuance(&agents)).await;
    let reference = empty_rate.map(|rate| ("empty-store issuance", rate));
    let label = format!("{leases} active leases");
    vec![
        Row::one_off(
            format!(
                "scale: start-up to ready with {label} (RSS {resident:.1} MiB; preload {preload_seconds:.0} s)"
            ),
            backend,
            ready_ms,
        ),
        issued.row(
            &format!("scale: BeginTask with {label}"),
            backend,
            64,
            reference,
        ),
    ]
}

/// Inserts `leases` issued leases (1,000 per task) owned by the `scale-agent` workload, signed by
/// the current key and valid for an hour, directly in the broker's database.
async fn preload(database_url: &str, leases: i64) {
    let now = warrant::domain::UnixMillis::now().0;
    let expires = now + 3_600_000;
    let context = r#"{"prompt_digest":null,"planned_tools":[],"labels":{}}"#;
    let tasks = (leases + 999) / 1000;
    if database_url.starts_with("sqlite:") {
        let url = database_url.to_owned();
        tokio::task::spawn_blocking(move || {
            let connection = warrant::store::sqlite::tool_connection(&url).expect("open database");
            connection
                .execute(
                    "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?1) \
                     INSERT INTO tasks (id, workload_id, purpose, context_json, state, created_at, deadline) \
                     SELECT printf('task_%032x', i), (SELECT id FROM workloads WHERE name = 'scale-agent'), \
                     'preloaded', ?2, 'active', ?3, ?4 FROM n",
                    rusqlite::params![tasks, context, now, expires],
                )
                .expect("preload tasks");
            connection
                .execute(
                    "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?1) \
                     INSERT INTO leases (id, task_id, scope, kind, audience, state, kid, issued_at, expires_at, renewable_until) \
                     SELECT printf('lease_%032x', i), printf('task_%032x', i / 1000), 'crm.contacts:read', 'jwt', ?2, \
                     'issued', (SELECT kid FROM signing_keys WHERE retired_at IS NULL AND activated_at IS NOT NULL), ?3, ?4, ?4 FROM n",
                    rusqlite::params![leases, CRM_AUDIENCE, now, expires],
                )
                .expect("preload leases");
        })
        .await
        .expect("preload thread");
        return;
    }
    let mut connection = sqlx::PgConnection::connect(database_url)
        .await
        .expect("open database");
    sqlx::query(
        "INSERT INTO tasks (id, workload_id, purpose, context_json, state, created_at, deadline) \
         SELECT 'task_' || lpad(to_hex(i), 32, '0'), (SELECT id FROM workloads WHERE name = 'scale-agent'), \
         'preloaded', $2, 'active', $3, $4 FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(tasks)
    .bind(context)
    .bind(now)
    .bind(expires)
    .execute(&mut connection)
    .await
    .expect("preload tasks");
    sqlx::query(
        "INSERT INTO leases (id, task_id, scope, kind, audience, state, kid, issued_at, expires_at, renewable_until) \
         SELECT 'lease_' || lpad(to_hex(i), 32, '0'), 'task_' || lpad(to_hex(i / 1000), 32, '0'), 'crm.contacts:read', \
         'jwt', $2, 'issued', (SELECT kid FROM signing_keys WHERE retired_at IS NULL AND activated_at IS NOT NULL), $3, $4, $4 \
         FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(leases)
    .bind(CRM_AUDIENCE)
    .bind(now)
    .bind(expires)
    .execute(&mut connection)
    .await
    .expect("preload leases");
    // What a store that grew to this size would have had done meanwhile: its tables vacuumed
    // and analyzed, and the bulk load's dirty pages written out, so that the measurement does
    // not share the disk with the aftermath of a 1M-row load. (`ANALYZE` alone left the
    // vacuum to autovacuum, whose insert threshold a 1M-row load crosses: it could start in the
    // middle of the measurement.)
    for statement in ["VACUUM (ANALYZE)", "CHECKPOINT"] {
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .expect("settle the preloaded database");
    }
}
