//! Retrying transactions that PostgreSQL aborted to resolve a conflict.
//!
//! Every writer locks rows in one order (a batch locks all the tasks it touches in id order
//! before any lease; a lease is only locked by whoever holds its task, or with `SKIP LOCKED` by
//! the reaper), so deadlocks should not happen. Should one happen anyway (40P01), or a
//! serialization failure (40001), nothing was committed, so the whole transaction is run again.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sqlx::{Acquire, PgConnection, PgPool};

use crate::error::{Error, Result};

/// A future borrowing a connection, as transaction bodies return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How often a conflicting transaction is tried in all.
pub const ATTEMPTS: u32 = 5;

/// Whether `error` comes from a deadlock or a serialization failure.
pub fn is_conflict(error: &Error) -> bool {
    let Error::Internal(cause) = error else {
        return false;
    };
    cause
        .downcast_ref::<sqlx::Error>()
        .and_then(|error| error.as_database_error())
        .and_then(|error| error.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// A short, growing, jittered pause before attempt `attempt + 1`, so two conflicting
/// transactions do not collide again in lockstep.
pub async fn pause(attempt: u32) {
    let jitter = u64::from(crate::issuer::random::bytes::<1>()[0] % 8);
    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5 + jitter)).await;
}

/// Runs `body` in a transaction and commits it, again (up to [`ATTEMPTS`] times) when
/// PostgreSQL aborts it to resolve a conflict.
pub async fn in_transaction<T, F>(pool: &PgPool, mut body: F) -> Result<T>
where
    F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T>>,
{
    let mut attempt = 1;
    loop {
        let mut connection = pool.acquire().await?;
        let mut transaction = connection.begin().await?;
        let outcome = match body(&mut transaction).await {
            Ok(value) => transaction
                .commit()
                .await
                .map(|()| value)
                .map_err(Error::from),
            Err(error) => Err(error),
        };
        match outcome {
            Err(error) if attempt < ATTEMPTS && is_conflict(&error) => {
                tracing::debug!(%error, attempt, "transaction conflicted; retrying");
                pause(attempt).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}
