//! Configuration: zero-configuration dev defaults (`serve --dev`) or a TOML file
//! (`serve --config FILE`), then environment overrides. Every error names the field, and the
//! binary exits 64 on it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::caller_limits::CallerLimitSettings;
use crate::domain::TrustDomain;
use crate::https_client::HttpsUrl;
use crate::identity::jwt_attestor::{DEFAULT_MIN_REFRESH, JwksSource, JwtIssuerConfig};
use crate::issuer::KeyAlgorithm;
use crate::policy::PolicySource;
use crate::store::StoreSettings;
use crate::webhook::WebhookConfig;

/// Data directory for `--dev` (files created on first start).
pub const ENV_DATA_DIR: &str = "WARRANT_DATA_DIR";
/// gRPC listen address.
pub const ENV_GRPC_ADDR: &str = "WARRANT_GRPC_ADDR";
/// HTTP listen address (JWKS, discovery, health).
pub const ENV_HTTP_ADDR: &str = "WARRANT_HTTP_ADDR";
/// Database URL (`sqlite://...` or `postgres://...`).
pub const ENV_DATABASE_URL: &str = "WARRANT_DATABASE_URL";
/// The master key itself, base64 (takes precedence over a master key file).
pub const ENV_MASTER_KEY: &str = "WARRANT_MASTER_KEY";
/// The token issuer (`iss`); replicas behind one address must share it.
pub const ENV_ISSUER: &str = "WARRANT_ISSUER";
/// How often an idle revocation feed subscriber receives a heartbeat (`limits.feed_heartbeat`).
pub const ENV_FEED_HEARTBEAT: &str = "WARRANT_FEED_HEARTBEAT";
/// The local Unix socket for attestation by Unix identity (`server.unix_socket`); empty for
/// none.
pub const ENV_UNIX_SOCKET: &str = "WARRANT_UNIX_SOCKET";
/// Calls per second one caller may sustain (`limits.caller_rate`).
pub const ENV_CALLER_RATE: &str = "WARRANT_CALLER_RATE";
/// Calls one caller may make at once after being idle (`limits.caller_burst`).
pub const ENV_CALLER_BURST: &str = "WARRANT_CALLER_BURST";
/// Calls of one caller in flight at once (`limits.caller_concurrency`).
pub const ENV_CALLER_CONCURRENCY: &str = "WARRANT_CALLER_CONCURRENCY";

const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:7400";
const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7401";
/// Where `--dev` keeps its files unless `WARRANT_DATA_DIR` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "./warrant-data";
const DEV_TRUST_DOMAIN: &str = "warrant.local";
const DEFAULT_MAX_TASK_TTL: Duration = Duration::from_secs(8 * 3600);
const DEFAULT_REAPER_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
const DEFAULT_AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_FEED_HEARTBEAT: Duration = Duration::from_secs(5);
const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_CALLER_LIMITS: CallerLimitSettings = CallerLimitSettings::DEFAULT;
/// Next to the configuration file unless `keys.first_admin_file` says otherwise.
const DEFAULT_FIRST_ADMIN_FILE: &str = "first-admin.credential";

/// Where the master key comes from. `Debug` never shows an inline key.
#[derive(Clone)]
pub enum MasterKeySource {
    /// A file holding the base64 key; created on first start when `create` is set (dev).
    File { path: PathBuf, create: bool },
    /// The base64 key itself, from the environment.
    Inline(String),
}

impl std::fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterKeySource::File { path, create } => f
                .debug_struct("File")
                .field("path", path)
                .field("create", create)
                .finish(),
            MasterKeySource::Inline(_) => f.write_str("Inline([redacted])"),
        }
    }
}

/// The server's TLS identity, read at start.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity { key: [redacted] }")
    }
}

/// An intermediate CA from `[identity.upstream_ca]`, read at start: Warrant signs SVIDs with
/// it, and the trust bundle is the organisation's roots.
#[derive(Clone)]
pub struct UpstreamCaFiles {
    /// The CA certificate Warrant signs with, then any further intermediates up to a root.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The roots the chain ends at: the trust bundle.
    pub bundle_pem: Vec<u8>,
}

impl std::fmt::Debug for UpstreamCaFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamCaFiles { key: [redacted] }")
    }
}

/// Everything the broker needs to start. `Debug` hides the database password.
#[derive(Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub database_url: String,
    pub master_key: MasterKeySource,
    pub catalog_file: PathBuf,
    /// Write the demo catalog to `catalog_file` if it does not exist (dev only).
    pub create_demo_catalog: bool,
    /// Where the policy set is read from (`[policy] dir`).
    pub policy: PolicySource,
    /// Write Warrant's schema and default policy into the policy directory if it does not
    /// exist (dev only).
    pub create_default_policy: bool,
    /// The `iss` of tokens; `None` derives `http://<bound HTTP address>` (dev only).
    pub issuer: Option<String>,
    pub trust_domain: TrustDomain,
    pub signing_algorithm: KeyAlgorithm,
    pub tls: Option<TlsIdentity>,
    pub max_task_ttl: Duration,
    pub reaper_interval: Duration,
    /// How often the audit chain head is signed.
    pub audit_checkpoint_interval: Duration,
    pub drain_timeout: Duration,
    /// How often an idle revocation feed subscriber receives a heartbeat; verifiers refuse
    /// tokens after a few intervals of silence.
    pub feed_heartbeat_interval: Duration,
    /// Where a fresh store's first admin credential is written (mode 0600), so that it never
    /// reaches a log stream; `None` prints it on standard output (dev only).
    pub first_admin_file: Option<PathBuf>,
    /// How the store paces writes (its queue bound and commit timeout).
    pub store: StoreSettings,
    /// How much one caller may do.
    pub caller_limits: CallerLimitSettings,
    /// The local Unix socket where processes attest by their Unix identity; `None` for none.
    pub unix_socket: Option<PathBuf>,
    /// How long an X.509-SVID is valid.
    pub svid_ttl: Duration,
    /// Whether callers may authenticate with bearer credentials (`identity.bearer_credentials`).
    pub bearer_credentials: bool,
    /// The external issuers the `jwt` attestor trusts (`[[identity.jwt_issuer]]`).
    pub jwt_issuers: Vec<JwtIssuerConfig>,
    /// An intermediate CA to sign SVIDs with instead of Warrant's own CA.
    pub upstream_ca: Option<UpstreamCaFiles>,
    /// Where requests that start to wait for operators are announced (`[approvals]`).
    pub approval_webhook: Option<WebhookConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("database_url", &without_password(&self.database_url))
            .field("master_key", &self.master_key)
            .field("catalog_file", &self.catalog_file)
            .field("create_demo_catalog", &self.create_demo_catalog)
            .field("policy", &self.policy)
            .field("issuer", &self.issuer)
            .field("trust_domain", &self.trust_domain)
            .field("signing_algorithm", &self.signing_algorithm)
            .field("tls", &self.tls)
            .field("max_task_ttl", &self.max_task_ttl)
            .field("reaper_interval", &self.reaper_interval)
            .field("audit_checkpoint_interval", &self.audit_checkpoint_interval)
            .field("drain_timeout", &self.drain_timeout)
            .field("feed_heartbeat_interval", &self.feed_heartbeat_interval)
            .field("first_admin_file", &self.first_admin_file)
            .field("store", &self.store)
            .field("approval_webhook", &self.approval_webhook)
            .finish()
    }
}

/// `url` with the password of its user info (`scheme://user:password@host`) replaced, for
/// output; a password may also sit in a query parameter, which is dropped whole.
pub fn without_password(url: &str) -> String {
    let (url, had_query) = match url.split_once('?') {
        Some((base, query)) if query.contains("password") => (base, true),
        _ => (url, false),
    };
    let shown = match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user_info, host)) => {
                let user = user_info
                    .split_once(':')
                    .map_or(user_info, |(user, _)| user);
                if user_info.contains(':') {
                    format!("{scheme}://{user}:[redacted]@{host}")
                } else {
                    format!("{scheme}://{user}@{host}")
                }
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    };
    if had_query {
        format!("{shown}?[redacted]")
    } else {
        shown
    }
}

/// A configuration error naming its field, such as `tls.cert_file`.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn error(field: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.to_string(),
    }
}

/// Reads environment variables; a function so tests can supply their own.
pub type Environment<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, with empty values treated as unset.
pub fn process_environment(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

impl Config {
    /// The zero-configuration local broker: SQLite, master key and catalog in the data
    /// directory, plaintext on loopback.
    pub fn dev(env: Environment<'_>) -> Result<Self, ConfigError> {
        let data_dir = PathBuf::from(env(ENV_DATA_DIR).unwrap_or_else(|| DEFAULT_DATA_DIR.into()));
        create_private_dir(&data_dir).map_err(|e| {
            error(
                ENV_DATA_DIR,
                format!("cannot create {}: {e}", data_dir.display()),
            )
        })?;
        let database_file = data_dir.join("warrant.db");
        let mut config = Config {
            grpc_addr: parse_addr("grpc_addr", DEFAULT_GRPC_ADDR)?,
            http_addr: parse_addr("http_addr", DEFAULT_HTTP_ADDR)?,
            database_url: format!("sqlite://{}?mode=rwc", database_file.display()),
            master_key: MasterKeySource::File {
                path: data_dir.join("master.key"),
                create: true,
            },
            catalog_file: data_dir.join("scopes.toml"),
            create_demo_catalog: true,
            policy: PolicySource::Dir(data_dir.join("policy")),
            create_default_policy: true,
            issuer: None,
            trust_domain: TrustDomain::parse("trust_domain", DEV_TRUST_DOMAIN)
                .map_err(|e| error("trust_domain", e))?,
            signing_algorithm: KeyAlgorithm::EdDsa,
            tls: None,
            max_task_ttl: DEFAULT_MAX_TASK_TTL,
            reaper_interval: DEFAULT_REAPER_INTERVAL,
            audit_checkpoint_interval: DEFAULT_AUDIT_CHECKPOINT_INTERVAL,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            feed_heartbeat_interval: DEFAULT_FEED_HEARTBEAT,
            first_admin_file: None,
            store: StoreSettings::default(),
            caller_limits: DEFAULT_CALLER_LIMITS,
            unix_socket: Some(data_dir.join("warrant.sock")),
            svid_ttl: DEFAULT_SVID_TTL,
            bearer_credentials: true,
            jwt_issuers: Vec::new(),
            upstream_ca: None,
            approval_webhook: None,
        };
        config.apply_environment(env)?;
        // Plaintext, a dev master key and a printed admin credential: never on a network.
        for (name, addr) in [
            (ENV_GRPC_ADDR, config.grpc_addr),
            (ENV_HTTP_ADDR, config.http_addr),
        ] {
            if !addr.ip().is_loopback() {
                return Err(error(
                    name,
                    format!(
                        "{addr} is not a loopback address: --dev serves plaintext and prints \
                         its admin credential, so it listens on loopback only (use \
                         serve --config with TLS to serve a network)"
                    ),
                ));
            }
        }
        Ok(config)
    }

    /// A deployment configuration from a TOML file (see `deploy/warrant.toml`). TLS is required.
    pub fn from_file(path: &Path, env: Environment<'_>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| error("--config", format!("cannot read {}: {e}", path.display())))?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| toml_error(&e))?;
        // Relative paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |relative: &Path| base.join(relative);
        let tls = file.tls.ok_or_else(|| {
            error(
                "tls",
                "is required outside --dev: set tls.cert_file and tls.key_file",
            )
        })?;
        let read = |field: &str, file: &Path| {
            std::fs::read(resolve(file)).map_err(|e| {
                error(
                    field,
                    format!("cannot read {}: {e}", resolve(file).display()),
                )
            })
        };
        let issuer = file.issuer.url;
        if !issuer.starts_with("https://") {
            return Err(error(
                "issuer.url",
                "must be an https:// URL (the token issuer that clients discover)",
            ));
        }
        let mut config = Config {
            grpc_addr: parse_addr("server.grpc_addr", &file.server.grpc_addr)?,
            http_addr: parse_addr("server.http_addr", &file.server.http_addr)?,
            database_url: file.storage.database_url,
            master_key: MasterKeySource::File {
                path: resolve(
                    &file
                        .keys
                        .master_key_file
                        .unwrap_or_else(|| "master.key".into()),
                ),
                create: false,
            },
            catalog_file: resolve(&file.catalog.scopes_file),
            create_demo_catalog: false,
            policy: file.policy.map_or(PolicySource::BuiltIn, |policy| {
                PolicySource::Dir(resolve(&policy.dir))
            }),
            create_default_policy: false,
            issuer: Some(issuer.trim_end_matches('/').to_owned()),
            trust_domain: TrustDomain::parse("issuer.trust_domain", &file.issuer.trust_domain)
                .map_err(|e| error("issuer.trust_domain", e))?,
            signing_algorithm: KeyAlgorithm::from_jws_name(&file.keys.signing_algorithm)
                .ok_or_else(|| error("keys.signing_algorithm", "must be \"EdDSA\" or \"ES256\""))?,
            tls: Some(TlsIdentity {
                cert_pem: read("tls.cert_file", &tls.cert_file)?,
                key_pem: read("tls.key_file", &tls.key_file)?,
            }),
            max_task_ttl: parse_duration(
                "limits.max_task_ttl",
                file.limits.max_task_ttl.as_deref(),
                DEFAULT_MAX_TASK_TTL,
            )?,
            reaper_interval: parse_duration(
                "limits.reaper_interval",
                file.limits.reaper_interval.as_deref(),
                DEFAULT_REAPER_INTERVAL,
            )?,
            audit_checkpoint_interval: parse_duration(
                "limits.audit_checkpoint_interval",
                file.limits.audit_checkpoint_interval.as_deref(),
                DEFAULT_AUDIT_CHECKPOINT_INTERVAL,
            )?,
            drain_timeout: parse_duration(
                "limits.drain_timeout",
                file.limits.drain_timeout.as_deref(),
                DEFAULT_DRAIN_TIMEOUT,
            )?,
            feed_heartbeat_interval: parse_duration(
                "limits.feed_heartbeat",
                file.limits.feed_heartbeat.as_deref(),
                DEFAULT_FEED_HEARTBEAT,
            )?,
            first_admin_file: Some(resolve(
                &file
                    .keys
                    .first_admin_file
                    .unwrap_or_else(|| DEFAULT_FIRST_ADMIN_FILE.into()),
            )),
            store: StoreSettings {
                write_queue: match file.limits.write_queue {
                    None => StoreSettings::default().write_queue,
                    Some(0) => return Err(error("limits.write_queue", "must be at least 1")),
                    Some(bound) => bound,
                },
                write_timeout: parse_duration(
                    "limits.write_timeout",
                    file.limits.write_timeout.as_deref(),
                    StoreSettings::default().write_timeout,
                )?,
            },
            unix_socket: file.server.unix_socket.as_deref().map(resolve),
            svid_ttl: parse_duration(
                "identity.svid_ttl",
                file.identity.svid_ttl.as_deref(),
                DEFAULT_SVID_TTL,
            )?,
            bearer_credentials: file.identity.bearer_credentials.unwrap_or(true),
            jwt_issuers: jwt_issuers(file.identity.jwt_issuer, &resolve)?,
            upstream_ca: match &file.identity.upstream_ca {
                None => None,
                Some(section) => Some(UpstreamCaFiles {
                    cert_pem: read("identity.upstream_ca.cert_file", &section.cert_file)?,
                    key_pem: read("identity.upstream_ca.key_file", &section.key_file)?,
                    bundle_pem: read("identity.upstream_ca.bundle_file", &section.bundle_file)?,
                }),
            },
            approval_webhook: match file.approvals {
                None => None,
                Some(section) => Some(WebhookConfig {
                    url: HttpsUrl::parse_allowing_loopback(&section.webhook_url)
                        .map_err(|reason| error("approvals.webhook_url", reason))?,
                    secret: crate::webhook::read_secret(&resolve(&section.webhook_secret_file))
                        .map_err(|reason| error("approvals.webhook_secret_file", reason))?,
                    ca_file: section.webhook_ca_file.as_deref().map(resolve),
                }),
            },
            caller_limits: CallerLimitSettings {
                rate_per_second: positive(
                    "limits.caller_rate",
                    file.limits.caller_rate,
                    DEFAULT_CALLER_LIMITS.rate_per_second,
                )?,
                burst: positive(
                    "limits.caller_burst",
                    file.limits.caller_burst,
                    DEFAULT_CALLER_LIMITS.burst,
                )?,
                concurrency: positive(
                    "limits.caller_concurrency",
                    file.limits.caller_concurrency,
                    DEFAULT_CALLER_LIMITS.concurrency,
                )?,
            },
        };
        config.apply_environment(env)?;
        Ok(config)
    }

    fn apply_environment(&mut self, env: Environment<'_>) -> Result<(), ConfigError> {
        if let Some(addr) = env(ENV_GRPC_ADDR) {
            self.grpc_addr = parse_addr(ENV_GRPC_ADDR, &addr)?;
        }
        if let Some(addr) = env(ENV_HTTP_ADDR) {
            self.http_addr = parse_addr(ENV_HTTP_ADDR, &addr)?;
        }
        if let Some(url) = env(ENV_DATABASE_URL) {
            self.database_url = url;
        }
        if let Some(key) = env(ENV_MASTER_KEY) {
            self.master_key = MasterKeySource::Inline(key);
        }
        if let Some(interval) = env(ENV_FEED_HEARTBEAT) {
            self.feed_heartbeat_interval =
                parse_duration(ENV_FEED_HEARTBEAT, Some(&interval), DEFAULT_FEED_HEARTBEAT)?;
        }
        let from_env = |name: &str, current: u32| match env(name) {
            None => Ok(current),
            Some(text) => text
                .parse()
                .ok()
                .filter(|value| *value > 0)
                .ok_or_else(|| error(name, format!("'{text}' is not a whole number above 0"))),
        };
        let limits = &mut self.caller_limits;
        limits.rate_per_second = from_env(ENV_CALLER_RATE, limits.rate_per_second)?;
        limits.burst = from_env(ENV_CALLER_BURST, limits.burst)?;
        limits.concurrency = from_env(ENV_CALLER_CONCURRENCY, limits.concurrency)?;
        if let Some(path) = env(ENV_UNIX_SOCKET) {
            self.unix_socket =
                Some(PathBuf::from(path)).filter(|path| !path.as_os_str().is_empty());
        }
        if let Some(issuer) = env(ENV_ISSUER) {
            // Plain HTTP only for a broker that serves plaintext itself (dev).
            let scheme_ok = issuer.starts_with("https://")
                || (self.tls.is_none() && issuer.starts_with("http://"));
            if !scheme_ok {
                return Err(error(
                    ENV_ISSUER,
                    "must be an https:// URL (http:// only in --dev)",
                ));
            }
            self.issuer = Some(issuer.trim_end_matches('/').to_owned());
        }
        if !(self.database_url.starts_with("sqlite:") || self.database_url.starts_with("postgres"))
        {
            return Err(error(
                "storage.database_url",
                "must start with sqlite:// or postgres://",
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    server: ServerSection,
    tls: Option<TlsSection>,
    storage: StorageSection,
    keys: KeysSection,
    issuer: IssuerSection,
    catalog: CatalogSection,
    policy: Option<PolicySection>,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    identity: IdentitySection,
    approvals: Option<ApprovalsSection>,
}

/// `[approvals]`: the webhook that announces each request that starts to wait.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalsSection {
    webhook_url: String,
    /// A file holding the shared signing secret (at least 32 bytes).
    webhook_secret_file: PathBuf,
    /// Roots for the receiver's certificate; default: the system's CA bundle.
    webhook_ca_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IdentitySection {
    svid_ttl: Option<String>,
    bearer_credentials: Option<bool>,
    #[serde(default)]
    jwt_issuer: Vec<JwtIssuerSection>,
    upstream_ca: Option<UpstreamCaSection>,
}

/// `[identity.upstream_ca]`: an intermediate CA, its key, and the roots it chains to.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamCaSection {
    cert_file: PathBuf,
    key_file: PathBuf,
    bundle_file: PathBuf,
}

/// One `[[identity.jwt_issuer]]`: an external issuer whose tokens the `jwt` attestor accepts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtIssuerSection {
    issuer: String,
    audience: String,
    jwks_file: Option<PathBuf>,
    jwks_url: Option<String>,
    jwks_ca_file: Option<PathBuf>,
    jwks_min_refresh: Option<String>,
    #[serde(default)]
    claims: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    grpc_addr: String,
    http_addr: String,
    unix_socket: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageSection {
    database_url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysSection {
    master_key_file: Option<PathBuf>,
    first_admin_file: Option<PathBuf>,
    #[serde(default = "default_algorithm")]
    signing_algorithm: String,
}

fn default_algorithm() -> String {
    "EdDSA".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerSection {
    url: String,
    trust_domain: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogSection {
    scopes_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    /// A directory of `*.cedar` files (validated against Warrant's schema).
    dir: PathBuf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_task_ttl: Option<String>,
    reaper_interval: Option<String>,
    audit_checkpoint_interval: Option<String>,
    drain_timeout: Option<String>,
    write_queue: Option<usize>,
    write_timeout: Option<String>,
    feed_heartbeat: Option<String>,
    caller_rate: Option<u32>,
    caller_burst: Option<u32>,
    caller_concurrency: Option<u32>,
}

/// Creates `dir` (and parents) if missing; the directory itself is readable only by its owner,
/// since it holds the master key and the database.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn parse_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        error(
            field,
            format!("'{text}' is not an address such as 127.0.0.1:7400"),
        )
    })
}

/// A count setting: `default` when absent, refused when 0.
fn positive(field: &str, value: Option<u32>, default: u32) -> Result<u32, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(error(field, "must be at least 1")),
        Some(value) => Ok(value),
    }
}

/// The `[[identity.jwt_issuer]]` tables, checked: each names a distinct issuer, an audience,
/// and claims that can form selectors (letters, digits, `_`, `-`, `.`; not `iss` or `sub`,
/// which are always observed).
fn jwt_issuers(
    sections: Vec<JwtIssuerSection>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<JwtIssuerConfig>, ConfigError> {
    let mut issuers: Vec<JwtIssuerConfig> = Vec::with_capacity(sections.len());
    for (index, section) in sections.into_iter().enumerate() {
        let field = |name: &str| format!("identity.jwt_issuer[{index}].{name}");
        if section.issuer.is_empty() || section.issuer.chars().any(char::is_control) {
            return Err(error(&field("issuer"), "must be the tokens' exact `iss`"));
        }
        if issuers.iter().any(|known| known.issuer == section.issuer) {
            return Err(error(&field("issuer"), "is configured twice"));
        }
        if section.audience.is_empty() {
            return Err(error(
                &field("audience"),
                "is required: the `aud` the tokens carry for Warrant",
            ));
        }
        for (claim_index, claim) in section.claims.iter().enumerate() {
            let is_name = !claim.is_empty()
                && claim.len() <= 64
                && claim
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                && claim != "iss"
                && claim != "sub";
            if !is_name {
                return Err(error(
                    &format!("{}[{claim_index}]", field("claims")),
                    "must be a top-level claim name (letters, digits, '_', '-', '.'), not iss or sub",
                ));
            }
        }
        let jwks = match (section.jwks_file, section.jwks_url, section.jwks_ca_file) {
            (Some(file), None, None) => JwksSource::File(resolve(&file)),
            (None, Some(url), ca_file) => JwksSource::Https {
                url: HttpsUrl::parse(&url).map_err(|reason| error(&field("jwks_url"), reason))?,
                ca_file: ca_file.as_deref().map(resolve),
            },
            (Some(_), None, Some(_)) => {
                return Err(error(&field("jwks_ca_file"), "goes with jwks_url only"));
            }
            _ => {
                return Err(error(
                    &field("jwks_file"),
                    "name exactly one of jwks_file and jwks_url",
                ));
            }
        };
        issuers.push(JwtIssuerConfig {
            issuer: section.issuer,
            audience: section.audience,
            jwks,
            claims: section.claims,
            min_refresh: parse_duration(
                &field("jwks_min_refresh"),
                section.jwks_min_refresh.as_deref(),
                DEFAULT_MIN_REFRESH,
            )?,
        });
    }
    Ok(issuers)
}

fn parse_duration(
    field: &str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        None => Ok(default),
        Some(text) => match humantime::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => Ok(duration),
            _ => Err(error(
                field,
                format!("'{text}' is not a positive duration such as \"30s\""),
            )),
        },
    }
}

/// Turns a TOML error into a field error: the key path when the parser knows it.
fn toml_error(parse_error: &toml::de::Error) -> ConfigError {
    let message = parse_error.message().to_owned();
    // serde reports missing and unknown keys in the message; name the field from there.
    let field = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|marker| {
            message
                .split_once(marker)
                .and_then(|(_, rest)| rest.split('`').next())
        })
        .unwrap_or("config")
        .to_owned();
    ConfigError { field, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const VALID: &str = r#"
        [server]
        grpc_addr = "0.0.0.0:7400"
        http_addr = "0.0.0.0:7401"
        [tls]
        cert_file = "server.crt"
        key_file = "server.key"
        [storage]
        database_url = "postgres://warrant@db/warrant"
        [keys]
        master_key_file = "master.key"
        [issuer]
        url = "https://warrant.example.com"
        trust_domain = "example.com"
        [catalog]
        scopes_file = "scopes.toml"
    "#;

    #[test]
    fn file_config_resolves_paths_next_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "server.crt", "cert");
        write(dir.path(), "server.key", "key");
        let config = Config::from_file(&write(dir.path(), "warrant.toml", VALID), &no_env).unwrap();
        assert_eq!(config.catalog_file, dir.path().join("scopes.toml"));
        assert_eq!(
            config.issuer.as_deref(),
            Some("https://warrant.example.com")
        );
    }

    #[test]
    fn file_config_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "server.crt", "cert");
        write(dir.path(), "server.key", "key");
        let cases = [
            (
                VALID.replace(
                    "[tls]\n        cert_file = \"server.crt\"\n        key_file = \"server.key\"",
                    "",
                ),
                "tls",
            ),
            (
                VALID.replace("server.key\"", "missing.key\""),
                "tls.key_file",
            ),
            (VALID.replace("0.0.0.0:7400", "nowhere"), "server.grpc_addr"),
            (
                VALID.replace("https://warrant", "http://warrant"),
                "issuer.url",
            ),
            (
                VALID.replace("[keys]", "[keys]\n        signing_algorithm = \"HS256\""),
                "keys.signing_algorithm",
            ),
            (
                VALID.replace(
                    "trust_domain = \"example.com\"",
                    "trust_domain = \"Example.com\"",
                ),
                "issuer.trust_domain",
            ),
            (
                VALID.replace("url = ", "colour = \"red\"\n        url = "),
                "colour",
            ),
            (
                VALID.replace(
                    "        database_url = \"postgres://warrant@db/warrant\"\n",
                    "",
                ),
                "database_url",
            ),
        ];
        for (text, field) in cases {
            let error =
                Config::from_file(&write(dir.path(), "bad.toml", &text), &no_env).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
    }

    #[test]
    fn jwt_issuers_are_read_with_paths_resolved_and_bad_ones_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "server.crt", "cert");
        write(dir.path(), "server.key", "key");
        let issuers = r#"
[[identity.jwt_issuer]]
issuer = "https://k8s.example"
audience = "warrant"
jwks_file = "k8s-jwks.json"
claims = ["repository"]
[[identity.jwt_issuer]]
issuer = "https://ci.example"
audience = "warrant"
jwks_url = "https://ci.example:8443/.well-known/jwks"
jwks_min_refresh = "5s"
"#;
        let text = format!("{VALID}{issuers}");
        let config = Config::from_file(&write(dir.path(), "warrant.toml", &text), &no_env).unwrap();
        let [file, url] = config.jwt_issuers.as_slice() else {
            panic!("two issuers: {:?}", config.jwt_issuers);
        };
        assert_eq!(
            file.jwks,
            JwksSource::File(dir.path().join("k8s-jwks.json"))
        );
        assert_eq!(file.min_refresh, DEFAULT_MIN_REFRESH);
        assert!(matches!(&url.jwks, JwksSource::Https { url, ca_file: None }
            if url.as_str() == "https://ci.example:8443/.well-known/jwks"));
        assert_eq!(url.min_refresh, Duration::from_secs(5));

        let cases = [
            (
                issuers.replace("https://ci.example:8443", "http://ci.example"),
                "identity.jwt_issuer[1].jwks_url",
            ),
            (
                issuers.replace("jwks_file = \"k8s-jwks.json\"\n", ""),
                "identity.jwt_issuer[0].jwks_file",
            ),
            (
                issuers.replace("https://ci.example\"", "https://k8s.example\""),
                "identity.jwt_issuer[1].issuer",
            ),
            (
                issuers.replacen("audience = \"warrant\"", "audience = \"\"", 1),
                "identity.jwt_issuer[0].audience",
            ),
            (
                issuers.replace("[\"repository\"]", "[\"sub\"]"),
                "identity.jwt_issuer[0].claims[0]",
            ),
            (
                issuers.replace("\"5s\"", "\"soon\""),
                "identity.jwt_issuer[1].jwks_min_refresh",
            ),
        ];
        for (issuers, field) in cases {
            let text = format!("{VALID}{issuers}");
            let error =
                Config::from_file(&write(dir.path(), "bad.toml", &text), &no_env).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
    }

    #[test]
    fn caller_limits_come_from_the_file_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "server.crt", "cert");
        write(dir.path(), "server.key", "key");
        let text = format!("{VALID}\n[limits]\ncaller_rate = 5\ncaller_concurrency = 3\n");
        let path = write(dir.path(), "warrant.toml", &text);
        let limits = Config::from_file(&path, &no_env).unwrap().caller_limits;
        assert_eq!((limits.rate_per_second, limits.burst), (5, 4_000));
        assert_eq!(limits.concurrency, 3);
        let env = |name: &str| (name == ENV_CALLER_RATE).then(|| "7".to_owned());
        let limits = Config::from_file(&path, &env).unwrap().caller_limits;
        assert_eq!(limits.rate_per_second, 7);

        let zero = write(dir.path(), "zero.toml", &text.replace("= 3", "= 0"));
        let error = Config::from_file(&zero, &no_env).unwrap_err();
        assert_eq!(error.field, "limits.caller_concurrency", "{error}");
        let words = |name: &str| (name == ENV_CALLER_BURST).then(|| "lots".to_owned());
        let error = Config::from_file(&path, &words).unwrap_err();
        assert_eq!(error.field, ENV_CALLER_BURST, "{error}");
    }

    #[test]
    fn debug_output_hides_the_database_password() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "server.crt", "cert");
        write(dir.path(), "server.key", "key");
        let text = VALID.replace("warrant@db", "warrant:s3cret-pw@db");
        let config = Config::from_file(&write(dir.path(), "warrant.toml", &text), &no_env).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret-pw"), "{printed}");
        assert!(printed.contains("postgres://warrant:[redacted]@db/warrant"));
        assert_eq!(
            without_password("postgres://db/warrant?user=w&password=s3cret-pw"),
            "postgres://db/warrant?[redacted]"
        );
    }

    #[test]
    fn the_approval_webhook_is_read_and_bad_settings_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "server.crt", "cert");
        write(dir.path(), "server.key", "key");
        let secret = "a webhook secret that is long enough";
        write(dir.path(), "webhook.secret", &format!("{secret}\n"));
        write(dir.path(), "short.secret", "short");
        let with = |url: &str, secret_file: &str| {
            let text = format!(
                "{VALID}\n[approvals]\nwebhook_url = \"{url}\"\nwebhook_secret_file = \"{secret_file}\"\n"
            );
            Config::from_file(&write(dir.path(), "warrant.toml", &text), &no_env)
        };
        let config = with("https://hooks.example.com/warrant", "webhook.secret").unwrap();
        let webhook = config.approval_webhook.as_ref().unwrap();
        assert_eq!(webhook.url.as_str(), "https://hooks.example.com/warrant");
        assert_eq!(webhook.secret, secret.as_bytes());
        assert!(
            !format!("{config:?}").contains(secret),
            "the secret is not printed"
        );
        for (url, secret_file, field) in [
            (
                "http://hooks.example.com/",
                "webhook.secret",
                "approvals.webhook_url",
            ),
            (
                "https://hooks.example.com/",
                "short.secret",
                "approvals.webhook_secret_file",
            ),
            (
                "https://hooks.example.com/",
                "missing.secret",
                "approvals.webhook_secret_file",
            ),
        ] {
            let refused = with(url, secret_file).unwrap_err().to_string();
            assert!(refused.starts_with(field), "{refused}");
        }
        assert!(
            Config::from_file(&write(dir.path(), "warrant.toml", VALID), &no_env)
                .unwrap()
                .approval_webhook
                .is_none()
        );
    }

    #[test]
    fn debug_output_hides_an_inline_master_key() {
        let source = MasterKeySource::Inline("c2VjcmV0LW1hc3Rlci1rZXk=".into());
        assert!(!format!("{source:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn environment_overrides_dev_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap().to_owned();
        let env = move |name: &str| match name {
            ENV_DATA_DIR => Some(data_dir.clone()),
            ENV_GRPC_ADDR => Some("127.0.0.1:0".into()),
            _ => None,
        };
        let config = Config::dev(&env).unwrap();
        assert_eq!(config.grpc_addr.port(), 0);
        assert!(config.database_url.contains(dir.path().to_str().unwrap()));
        let data_dir = dir.path().to_str().unwrap().to_owned();
        let bad = move |name: &str| match name {
            ENV_DATA_DIR => Some(data_dir.clone()),
            ENV_HTTP_ADDR => Some("localhost".into()),
            _ => None,
        };
        assert_eq!(Config::dev(&bad).unwrap_err().field, ENV_HTTP_ADDR);
        let data_dir = dir.path().to_str().unwrap().to_owned();
        let exposed = move |name: &str| match name {
            ENV_DATA_DIR => Some(data_dir.clone()),
            ENV_GRPC_ADDR => Some("0.0.0.0:7400".into()),
            _ => None,
        };
        let error = Config::dev(&exposed).unwrap_err();
        assert_eq!(error.field, ENV_GRPC_ADDR);
        assert!(error.message.contains("loopback"), "{error}");
    }
}
