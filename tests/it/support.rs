//! Starting real brokers for tests: in-process on random ports (`TestApp`), or as the real
//! binary (`BrokerProcess`), on SQLite or on a fresh PostgreSQL database.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::Connection as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warrant::app::App;
use warrant::client::Connection;
use warrant::config::{Config, MasterKeySource};
use warrant::domain::TrustDomain;
use warrant::issuer::KeyAlgorithm;
use warrant::policy::PolicySource;
use warrant::proto;

/// The scopes every test broker knows.
pub const TEST_CATALOG: &str = r#"
[[scope]]
name = "crm.contacts:read"
audience = "https://crm.test"
kind = "jwt"
default_ttl = "5m"
max_ttl = "10m"
workloads = ["*"]

[[scope]]
name = "tickets:write"
audience = "https://tickets.test"
kind = "jwt"
default_ttl = "5m"
max_ttl = "10m"
workloads = ["*"]

[[scope]]
name = "payments:refund"
audience = "https://payments.test"
kind = "jwt"
default_ttl = "1m"
max_ttl = "2m"
workloads = ["billing-agent"]

[[scope]]
name = "flash:read"
audience = "https://flash.test"
kind = "jwt"
default_ttl = "1s"
max_ttl = "3s"
workloads = ["*"]

[[scope]]
name = "reports:export"
audience = "https://reports.test"
kind = "jwt"
default_ttl = "5m"
max_ttl = "10m"
workloads = ["*"]
max_uses = 3

[[scope]]
name = "search:query"
audience = "https://search.test"
kind = "api_key"
default_ttl = "5m"
max_ttl = "10m"
workloads = ["*"]

[[scope]]
name = "flash:key"
audience = "https://search.test"
kind = "api_key"
default_ttl = "1s"
max_ttl = "3s"
workloads = ["*"]

[[scope]]
name = "payments:key"
audience = "https://payments.test"
kind = "api_key"
default_ttl = "1m"
max_ttl = "2m"
workloads = ["*"]
labels = { domain = "payments" }

[[tool]]
name = "payments.refund"
audience = "https://payments.test"
workloads = ["*"]
labels = { domain = "payments" }

[tool.arguments]
order_id = { type = "string" }
amount_cents = { type = "long" }
card_number = { type = "string", required = false, sensitive = true }

[[tool]]
name = "email.send"
audience = "https://mail.test"
workloads = ["*"]

[tool.arguments]
to = { type = "string" }

[[tool]]
name = "shell.run"
audience = "https://ops.test"
workloads = ["ops-agent"]
"#;

pub const CRM: &str = "https://crm.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where a test broker keeps its state; survives restarts of the broker within one test.
pub struct TestData {
    pub dir: tempfile::TempDir,
    pub database_url: String,
}

impl TestData {
    pub async fn new(backend: Backend) -> TestData {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("scopes.toml"), TEST_CATALOG).expect("write catalog");
        let database_url = match backend {
            Backend::Sqlite => format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("warrant.db").display()
            ),
            Backend::Postgres => fresh_postgres_database().await,
        };
        TestData { dir, database_url }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> Config {
        Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            database_url: self.database_url.clone(),
            master_key: MasterKeySource::File {
                path: self.path().join("master.key"),
                create: true,
            },
            catalog_file: self.path().join("scopes.toml"),
            create_demo_catalog: false,
            policy: PolicySource::BuiltIn,
            create_default_policy: false,
            issuer: None,
            trust_domain: TrustDomain::parse("trust_domain", "test.local").unwrap(),
            signing_algorithm: KeyAlgorithm::EdDsa,
            tls: None,
            max_task_ttl: Duration::from_secs(3600),
            reaper_interval: Duration::from_millis(200),
            audit_checkpoint_interval: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(5),
            feed_heartbeat_interval: Duration::from_secs(5),
            first_admin_file: None,
            store: warrant::store::StoreSettings::default(),
            caller_limits: warrant::caller_limits::CallerLimitSettings::DEFAULT,
            unix_socket: None,
            svid_ttl: Duration::from_secs(3600),
            jwt_issuers: Vec::new(),
            upstream_ca: None,
            approval_webhook: None,
            bearer_credentials: true,
        }
    }
}

/// Creates an empty database on the test PostgreSQL server and returns its URL.
async fn fresh_postgres_database() -> String {
    let base = std::env::var("WARRANT_TEST_DATABASE_URL")
        .expect("WARRANT_TEST_DATABASE_URL must be set for PostgreSQL tests");
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("PostgreSQL at WARRANT_TEST_DATABASE_URL is unreachable");
    let name = format!(
        "warrant_it_{}",
        warrant::domain::ids::hex(&warrant::issuer::random::bytes::<8>())
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create test database");
    let (prefix, query) = match base.split_once('?') {
        Some((prefix, query)) => (prefix, format!("?{query}")),
        None => (base.as_str(), String::new()),
    };
    let server = prefix.rsplit_once('/').map_or(prefix, |(server, _)| server);
    format!("{server}/{name}{query}")
}

/// A broker running inside the test process.
pub struct TestApp {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub issuer: String,
    /// The admin credential created on first start (empty after a restart).
    pub admin_token: String,
    stop: Option<oneshot::Sender<()>>,
    running: Option<JoinHandle<Result<(), warrant::app::StartError>>>,
}

impl TestApp {
    pub async fn spawn(data: &TestData) -> TestApp {
        Self::spawn_with(data.config()).await
    }

    pub async fn spawn_with(config: Config) -> TestApp {
        let mut app = App::build(config).await.expect("broker starts");
        let admin_token = app
            .take_first_admin_credential()
            .map(|c| c.expose().to_owned())
            .unwrap_or_default();
        let (stop, stopped) = oneshot::channel::<()>();
        let (grpc_addr, http_addr, issuer) =
            (app.grpc_addr(), app.http_addr(), app.issuer().to_owned());
        let running = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        TestApp {
            grpc_addr,
            http_addr,
            issuer,
            admin_token,
            stop: Some(stop),
            running: Some(running),
        }
    }

    pub fn address(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub async fn connect(&self, credential: Option<&str>) -> Connection {
        Connection::open(&self.address(), credential, None)
            .await
            .expect("connect to the test broker")
    }

    pub async fn admin(&self) -> Connection {
        self.connect(Some(&self.admin_token)).await
    }

    /// Registers a workload with the given roles and returns its credential.
    pub async fn workload(&self, name: &str, roles: &[proto::Role]) -> String {
        self.register(name, roles, &[]).await
    }

    /// Registers a resource server of `audiences` and returns its credential.
    pub async fn resource_server(&self, name: &str, audiences: &[&str]) -> String {
        self.register(name, &[proto::Role::ResourceServer], audiences)
            .await
    }

    async fn register(&self, name: &str, roles: &[proto::Role], audiences: &[&str]) -> String {
        let request = proto::CreateWorkloadRequest {
            name: name.into(),
            roles: roles.iter().map(|r| *r as i32).collect(),
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            no_bearer_credential: false,
            selectors: Vec::new(),
            ..Default::default()
        };
        self.admin()
            .await
            .admin()
            .create_workload(request)
            .await
            .expect("create workload")
            .into_inner()
            .credential
    }

    /// Registers an agent and returns a connection that acts as it.
    pub async fn agent(&self, name: &str) -> Connection {
        let credential = self.workload(name, &[proto::Role::Agent]).await;
        self.connect(Some(&credential)).await
    }

    /// Registers agent `name` and opens a task for `scopes` as it.
    pub async fn begin_as(&self, name: &str, scopes: &[&str]) -> proto::BeginTaskResponse {
        self.agent(name)
            .await
            .tasks()
            .begin_task(begin(scopes))
            .await
            .expect("begin task")
            .into_inner()
    }

    /// Whether the broker's introspection says `token` is active for `audience`.
    pub async fn is_active(&self, token: &str, audience: &str) -> bool {
        introspect_as(&self.admin().await, token, audience)
            .await
            .active
    }

    /// Stops the broker gracefully and waits until it has closed its store.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            running
                .await
                .expect("broker task")
                .expect("broker stops cleanly");
        }
    }

    pub fn http(&self, path: &str) -> serde_json::Value {
        http_get_json(self.http_addr, path)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A minimal HTTP/1.1 GET returning (status, body); enough for the broker's JSON endpoints.
/// Status 0 when the server closed the connection without an answer.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect HTTP");
    // A server that closes the connection early (a TLS listener refusing plaintext) gives
    // status 0, not a panic.
    let mut response = String::new();
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .and_then(|()| stream.read_to_string(&mut response));
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `POST /oauth2/introspect` with `credential` (none when `None`); (status, body).
pub fn http_introspect(
    addr: std::net::SocketAddr,
    credential: Option<&str>,
    form: &str,
) -> (u16, String) {
    http_post(
        addr,
        "/oauth2/introspect",
        credential,
        "application/x-www-form-urlencoded",
        form,
    )
}

/// `POST path` with a JSON `body` and `credential` (none when `None`); (status, body as JSON).
pub fn http_post_json(
    addr: std::net::SocketAddr,
    path: &str,
    credential: Option<&str>,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (status, body) = http_post(
        addr,
        path,
        credential,
        "application/json",
        &body.to_string(),
    );
    let body = serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("POST {path}: not JSON ({error}): {body}"));
    (status, body)
}

/// A minimal HTTP/1.1 POST of `body` as `content_type`; (status, body).
fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    credential: Option<&str>,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let authorization = credential
        .map(|credential| format!("Authorization: Bearer {credential}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{authorization}\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

pub fn http_get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http_get(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("GET {path}: not JSON ({error}): {body}"))
}

/// The first page of what waits for operators, as `operator` sees it.
pub async fn pending_requests(operator: &Connection) -> Vec<proto::PendingGrant> {
    operator
        .approvals()
        .list_pending(proto::ListPendingRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests
}

/// Opens a one-hour task with no scopes as `agent`; its id.
pub async fn open_task(agent: &Connection) -> String {
    agent
        .tasks()
        .begin_task(begin(&[]))
        .await
        .unwrap()
        .into_inner()
        .task_id
}

/// A request to authorize one call of `tool` with the JSON `arguments` in task `task_id`.
pub fn tool_call(task_id: &str, tool: &str, arguments: &str) -> proto::AuthorizeToolCallRequest {
    proto::AuthorizeToolCallRequest {
        task_id: task_id.into(),
        tool: tool.into(),
        arguments_json: arguments.into(),
        risk: None,
    }
}

/// A begin-task request for `scopes` with a one-hour task.
pub fn begin(scopes: &[&str]) -> proto::BeginTaskRequest {
    proto::BeginTaskRequest {
        purpose: "summarise open tickets".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: 3600,
        context: Some(proto::TaskContext {
            prompt_digest: format!("sha256:{}", "ab".repeat(32)),
            planned_tools: vec!["crm.search".into()],
            labels: [("ticket".to_string(), "T-1".to_string())].into(),
        }),
        idempotency_key: String::new(),
        risk: None,
    }
}

pub fn grant_request(task_id: &str, scope: &str, ttl_seconds: u32) -> proto::RequestGrantRequest {
    proto::RequestGrantRequest {
        task_id: task_id.into(),
        scope: scope.into(),
        ttl_seconds,
        risk: None,
    }
}

pub fn renew_request(lease_id: &str, ttl_seconds: u32) -> proto::RenewLeaseRequest {
    proto::RenewLeaseRequest {
        lease_id: lease_id.into(),
        ttl_seconds,
    }
}

pub fn complete_request(task_id: &str) -> proto::CompleteTaskRequest {
    proto::CompleteTaskRequest {
        task_id: task_id.into(),
    }
}

/// Decodes a JWT's payload without checking anything (to read claims in assertions).
pub fn claims_of(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("JWT payload");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

pub fn header_of(token: &str) -> serde_json::Value {
    use base64::Engine;
    let header = token.split('.').next().expect("JWT header");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap()
}

/// Counts rows in the broker's database directly, to check that refused calls stored nothing.
pub async fn count_rows(data: &TestData, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    if data.database_url.starts_with("sqlite:") {
        let connection = sqlite_connection(data);
        return connection
            .query_row(&sql, [], |row| row.get(0))
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }
    let mut connection = sqlx::PgConnection::connect(&data.database_url)
        .await
        .expect("open test database");
    let row = sqlx::query(&sql).fetch_one(&mut connection).await.unwrap();
    sqlx::Row::get::<i64, _>(&row, 0)
}

/// Runs `sql` against the broker's database directly (to tamper with it, or break it).
pub async fn execute_sql(data: &TestData, sql: &str) {
    if data.database_url.starts_with("sqlite:") {
        sqlite_connection(data)
            .execute_batch(sql)
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
        return;
    }
    let mut connection = sqlx::PgConnection::connect(&data.database_url)
        .await
        .expect("open test database");
    sqlx::raw_sql(sql)
        .execute(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
}

/// A direct connection to a test broker's SQLite file, beside the broker's own.
fn sqlite_connection(data: &TestData) -> rusqlite::Connection {
    let path = data.path().join("warrant.db");
    let connection = rusqlite::Connection::open(&path).expect("open test database");
    connection
        .busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    connection
}

/// The path of the `warrant` binary built for these tests.
pub fn warrant_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_warrant"))
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    mut condition: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Python with PyJWT and prometheus_client, in a virtual environment created once under the
/// target directory. `None` (the caller skips) when Python or the package index is unavailable;
/// under CI that fails the test instead, so the independent checks always run there.
pub fn python_venv() -> Option<PathBuf> {
    use std::process::Command;
    use std::sync::Mutex;
    static VENV: Mutex<Option<Option<PathBuf>>> = Mutex::new(None);
    let mut cached = VENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let python = cached
        .get_or_insert_with(|| {
            let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
            let python = venv.join("bin/python");
            let has_packages = |python: &PathBuf| {
                Command::new(python)
                    .args(["-c", "import jwt, cryptography, prometheus_client"])
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !has_packages(&python) {
                let created = Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&venv)
                    .status()
                    .is_ok_and(|s| s.success());
                let installed = created
                    && Command::new(&python)
                        .args([
                            "-m",
                            "pip",
                            "install",
                            "--quiet",
                            "--disable-pip-version-check",
                        ])
                        .args(["pyjwt[crypto]>=2.8,<3", "prometheus-client>=0.20,<1"])
                        .status()
                        .is_ok_and(|s| s.success());
                if !installed {
                    return None;
                }
            }
            has_packages(&python).then_some(python)
        })
        .clone();
    if python.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to create the Python test environment"
        );
        eprintln!(
            "skipped: no Python environment (python3 -m venv + pip install pyjwt[crypto] prometheus-client failed)"
        );
    }
    python
}

/// A directory with Node's `jose` installed (npm, once per target directory), for the README's
/// JavaScript example. `None` (the caller skips) when Node or the registry is unavailable;
/// under CI that fails the test instead.
pub fn node_env() -> Option<PathBuf> {
    use std::process::Command;
    use std::sync::Mutex;
    static ENV: Mutex<Option<Option<PathBuf>>> = Mutex::new(None);
    let mut cached = ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = cached
        .get_or_insert_with(|| {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-env");
            if !dir.join("node_modules/jose/package.json").exists() {
                std::fs::create_dir_all(&dir).ok()?;
                let installed = Command::new("npm")
                    .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&dir)
                    .arg("jose@6")
                    .status()
                    .is_ok_and(|status| status.success());
                if !installed {
                    return None;
                }
            }
            Some(dir)
        })
        .clone();
    if dir.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to install Node's jose for the README example"
        );
        eprintln!("skipped: no Node environment (npm install jose failed)");
    }
    dir
}

/// Two brokers sharing one fresh PostgreSQL database and issuer, as replicas behind a load
/// balancer would; the second answers to the first's admin credential.
pub async fn postgres_replicas() -> (TestData, TestApp, TestApp) {
    let data = TestData::new(Backend::Postgres).await;
    let mut config = data.config();
    config.issuer = Some("https://warrant.test".into());
    let first = TestApp::spawn_with(config.clone()).await;
    let mut second = TestApp::spawn_with(config).await;
    second.admin_token = first.admin_token.clone();
    (data, first, second)
}

/// What the broker's introspection answers `server` for `token` and `audience`.
pub async fn introspect_as(
    server: &Connection,
    token: &str,
    audience: &str,
) -> proto::IntrospectResponse {
    introspect_with(
        server,
        proto::IntrospectRequest {
            token: token.into(),
            audience: audience.into(),
            ..Default::default()
        },
    )
    .await
}

/// What the broker's introspection answers `server` for `request`.
pub async fn introspect_with(
    server: &Connection,
    request: proto::IntrospectRequest,
) -> proto::IntrospectResponse {
    server
        .tokens()
        .introspect(request)
        .await
        .expect("introspect")
        .into_inner()
}

/// The audit events of `event_type` (up to 100), as `admin` queries them.
pub async fn audit_events_of_type(admin: &Connection, event_type: &str) -> Vec<proto::AuditEvent> {
    admin
        .admin()
        .query_audit(proto::QueryAuditRequest {
            r#type: event_type.into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}
