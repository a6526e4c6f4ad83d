//! Opening connections to the database file, with the settings every connection needs.

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::store::StoreError;

/// Where the database is, from a `sqlite://PATH[?mode=rwc]` URL.
#[derive(Clone, Debug)]
pub struct DatabaseFile {
    pub path: PathBuf,
    /// Create the file if it does not exist (`mode=rwc`).
    pub create: bool,
}

impl DatabaseFile {
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or(StoreError::UnsupportedUrl)?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            return Err(StoreError::Open(
                "database_url: a sqlite:// URL needs a file path".into(),
            ));
        }
        let mut create = false;
        for parameter in query.split('&').filter(|parameter| !parameter.is_empty()) {
            match parameter {
                "mode=rwc" => create = true,
                "mode=rw" => create = false,
                other => {
                    return Err(StoreError::Open(format!(
                        "database_url: unsupported SQLite URL parameter '{other}' (only mode=rwc or mode=rw)"
                    )));
                }
            }
        }
        Ok(DatabaseFile {
            path: PathBuf::from(path),
            create,
        })
    }

    /// The lock file held while a broker has the database open.
    pub fn lock_path(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".lock");
        PathBuf::from(name)
    }
}

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements each connection keeps (every statement the store runs, with room).
const STATEMENT_CACHE: usize = 128;

/// The writer's page cache, in KiB: the pages a batch touches stay in memory between batches
/// instead of being read back from the file.
const WRITER_CACHE_KIB: u32 = 64 * 1024;

/// Whether a connection writes or only reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Writer,
    Reader,
}

/// Opens a connection set up for the store: WAL (readers beside the writer), a commit is on disk
/// before it returns (`synchronous = FULL`), statement journals in memory (a multi-row statement
/// otherwise spills one to a temporary file), and readers that cannot write by mistake.
pub fn open(file: &DatabaseFile, role: Role) -> Result<Connection, StoreError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if file.create && role == Role::Writer {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let failed =
        |error: rusqlite::Error| StoreError::Open(format!("{}: {error}", file.path.display()));
    let connection = Connection::open_with_flags(&file.path, flags).map_err(failed)?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(failed)?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let synchronous = synchronous_setting();
    let mut pragmas = vec![
        "PRAGMA journal_mode = WAL".to_owned(),
        format!("PRAGMA synchronous = {synchronous}"),
        "PRAGMA foreign_keys = ON".to_owned(),
        "PRAGMA temp_store = MEMORY".to_owned(),
    ];
    match role {
        Role::Reader => pragmas.push("PRAGMA query_only = ON".to_owned()),
        Role::Writer => pragmas.push(format!("PRAGMA cache_size = -{WRITER_CACHE_KIB}")),
    }
    for pragma in pragmas {
        // `journal_mode` answers with a row; the others with none.
        connection
            .query_row(&pragma, [], |_| Ok(()))
            .or_else(|error| match error {
                rusqlite::Error::QueryReturnedNoRows => Ok(()),
                other => Err(other),
            })
            .map_err(failed)?;
    }
    Ok(connection)
}

/// The `synchronous` setting: always `FULL`. Debug builds (the test suite's binary) accept
/// `WARRANT_TEST_SQLITE_SYNCHRONOUS=OFF`, so the power-loss test can show that it catches a
/// broker that does not flush its commits; a release build has no way to turn durability off.
fn synchronous_setting() -> &'static str {
    #[cfg(debug_assertions)]
    if std::env::var("WARRANT_TEST_SQLITE_SYNCHRONOUS").is_ok_and(|value| value == "OFF") {
        tracing::warn!(
            "SQLite durability is OFF (WARRANT_TEST_SQLITE_SYNCHRONOUS): test builds only"
        );
        return "OFF";
    }
    "FULL"
}
