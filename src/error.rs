//! One error type for everything a caller can be told, mapped once to a gRPC status.
//!
//! Internal failures (storage, I/O) are logged with their cause and reported to the caller only
//! as `INTERNAL`, so that nothing about the broker's internals or secrets leaks out.

use std::fmt;

/// An error the broker reports to a caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed or out of range; `field` names it as in the proto.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The caller presented no credential, or one that is unknown or revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this; the message says why.
    #[error("{0}")]
    PermissionDenied(String),
    /// The named object does not exist (or is not visible to this caller).
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// The object exists but is in a state that forbids the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The object to be created exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The broker is too busy to take the call now (a full queue, a limit reached); retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A service the broker needs (its database) does not answer; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Something inside the broker failed; the caller learns nothing more.
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// A malformed or out-of-range request field.
    pub fn invalid(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// Wraps an internal failure.
    pub fn internal(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Internal(error.into())
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                tracing::warn!(%error, "PostgreSQL unavailable");
                Error::Unavailable("the database does not answer; retry later".into())
            }
            other => Error::internal(other),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(error: rusqlite::Error) -> Self {
        let is_busy = matches!(
            error.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        if is_busy {
            tracing::warn!(%error, "SQLite database busy");
            Error::Unavailable("the database is busy; retry later".into())
        } else {
            Error::internal(error)
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(error.to_string()),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(error.to_string()),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(error.to_string()),
            Error::NotFound { .. } => tonic::Status::not_found(error.to_string()),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(error.to_string()),
            Error::AlreadyExists(_) => tonic::Status::already_exists(error.to_string()),
            Error::ResourceExhausted(_) => tonic::Status::resource_exhausted(error.to_string()),
            Error::Unavailable(_) => tonic::Status::unavailable(error.to_string()),
            Error::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                tonic::Status::internal("internal error; the broker's log has the cause")
            }
        }
    }
}

/// Shorthand for results whose error goes to a caller.
pub type Result<T, E = Error> = std::result::Result<T, E>;
