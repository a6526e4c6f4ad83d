//! Read connections, used directly on the calling thread.
//!
//! An indexed read in WAL mode takes microseconds, less than handing it to another thread and
//! waking the caller again, so short reads run where they are asked for. Long reads (an audit
//! query of thousands of events, a page of the feed) run on the blocking pool instead, so they do
//! not hold an async worker. A semaphore bounds the connections in use; each read borrows one
//! and returns it, even if the read panics.

use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connection::{self, DatabaseFile, Role};
use crate::error::{Error, Result};
use crate::store::StoreError;

/// The read connections of one store.
pub struct Readers {
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// A borrowed connection, given back when dropped.
struct Borrowed<'r> {
    readers: &'r Readers,
    connection: Option<Connection>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            self.readers.lock().push(connection);
        }
    }
}

impl Readers {
    pub fn open(file: &DatabaseFile, count: usize) -> Result<Self, StoreError> {
        let connections = (0..count)
            .map(|_| connection::open(file, Role::Reader))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Readers {
            idle: Mutex::new(connections),
            permits: Arc::new(Semaphore::new(count)),
        })
    }

    /// Runs a short read on the calling thread.
    pub async fn read<T>(&self, read: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let borrowed = self.borrow().await?;
        read(borrowed.connection())
    }

    /// Runs a long read on the blocking pool.
    pub async fn read_long<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.clone();
        let permit = self.acquire().await?;
        tokio::task::spawn_blocking(move || {
            let borrowed = readers.take(permit)?;
            read(borrowed.connection())
        })
        .await
        .map_err(|error| Error::internal(format!("a read failed: {error}")))?
    }

    /// Stops lending connections and closes the idle ones.
    pub fn close(&self) {
        self.permits.close();
        self.lock().clear();
    }

    async fn borrow(&self) -> Result<Borrowed<'_>> {
        let permit = self.acquire().await?;
        self.take(permit)
    }

    async fn acquire(&self) -> Result<OwnedSemaphorePermit> {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Unavailable("the store is closed".into()))
    }

    fn take(&self, permit: OwnedSemaphorePermit) -> Result<Borrowed<'_>> {
        // Each permit stands for one idle connection, and a borrowed connection is always given
        // back (also when its read panics), so one is there.
        let connection = self
            .lock()
            .pop()
            .ok_or_else(|| Error::internal("no idle read connection"))?;
        Ok(Borrowed {
            readers: self,
            connection: Some(connection),
            _permit: permit,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Borrowed<'_> {
    fn connection(&self) -> &Connection {
        // Set at construction and taken only on drop.
        self.connection
            .as_ref()
            .expect("a borrowed connection is present until dropped")
    }
}
