//! Persistence on SQLite (embedded, one file) or PostgreSQL (shared by several replicas),
//! chosen by the database URL.
//!
//! Both backends run the same SQL through sqlx's `Any` driver: the schema keeps to types both
//! share (64-bit integers for instants, text, bytes) and `$n` placeholders, which SQLite accepts
//! too. That keeps one implementation of every query instead of two that drift apart; what
//! differs (schema types, connection set-up) lives in `migrations/{sqlite,postgres}` and
//! [`Store::connect`].
//!
//! SQLite gets a single writer connection: SQLite serializes writers anyway, and one
//! connection avoids `SQLITE_BUSY` on lock upgrades. Readers use their own pool (WAL mode lets
//! them run beside the writer). Commits are durable: `synchronous=FULL` on SQLite, and the
//! PostgreSQL server's default `synchronous_commit=on`.

mod audit;
mod batch;
mod committer;
mod feed;
mod keys;
mod records;
mod sql;
mod tasks;
mod workloads;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use audit::{AuditFilter, AuditRecord, Checkpoint};
pub use feed::{FeedEvent, FeedRecord};
pub use records::{LeaseRecord, StoredSigningKey, TaskRecord, WorkloadRecord};
pub use tasks::{CompletionOutcome, EndedLease, NewLeaseOutcome, RenewalOutcome};

/// Which database a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The broker's database.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    writer: AnyPool,
    reader: AnyPool,
    /// Hot writes (issuance, renewal, completion, audit-only events) go through group commit.
    committer: committer::Committer,
    credential_cache: std::sync::Arc<workloads::CredentialCache>,
}

/// A store that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database_url: unsupported scheme (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// Concurrent group-commit transactions on PostgreSQL (each holds a pooled connection while it
/// writes; the server flushes their commits together).
const POSTGRES_COMMITTERS: usize = 6;

/// How long a caller waits for a pooled connection before the call fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

impl Store {
    /// Opens the database at `url` (creating a SQLite file if needed) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let options = AnyConnectOptions::from_str(url).map_err(StoreError::Connect)?;
        let store = match backend {
            Backend::Sqlite => {
                let writer = sqlite_pool(1)
                    .connect_with(options.clone())
                    .await
                    .map_err(StoreError::Connect)?;
                sqlx::migrate!("migrations/sqlite")
                    .run(&writer)
                    .await
                    .map_err(StoreError::Migrate)?;
                let reader = sqlite_pool(4)
                    .connect_with(options)
                    .await
                    .map_err(StoreError::Connect)?;
                let committer = committer::Committer::start(writer.clone(), 1);
                Store {
                    backend,
                    writer,
                    reader,
                    committer,
                    credential_cache: Default::default(),
                }
            }
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(StoreError::Connect)?;
                sqlx::migrate!("migrations/postgres")
                    .run(&pool)
                    .await
                    .map_err(StoreError::Migrate)?;
                let committer = committer::Committer::start(pool.clone(), POSTGRES_COMMITTERS);
                Store {
                    backend,
                    writer: pool.clone(),
                    reader: pool,
                    committer,
                    credential_cache: Default::default(),
                }
            }
        };
        Ok(store)
    }

    /// Whether audit events are chained in the transactions that write them (SQLite, the only
    /// writer of its file) rather than afterwards by the sealer (PostgreSQL).
    pub fn chains_on_write(&self) -> bool {
        self.backend == Backend::Sqlite
    }

    /// Whether the database answers; `/readyz` reports this.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.reader).await.is_ok()
    }

    /// Waits for connections in use to be returned, then closes every connection.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// Settings of every SQLite connection: WAL (readers beside the writer), a commit is on disk
/// before it returns (`synchronous = FULL`), and statement journals stay in memory (a
/// multi-row insert otherwise spills one to a temporary file on every batch).
pub const SQLITE_PRAGMAS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA foreign_keys = ON",
    "PRAGMA temp_store = MEMORY",
];

/// A pool of SQLite connections, each set up with [`SQLITE_PRAGMAS`].
fn sqlite_pool(connections: u32) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|connection, _| {
            Box::pin(async move {
                for pragma in SQLITE_PRAGMAS {
                    connection.execute(*pragma).await?;
                }
                Ok(())
            })
        })
}
