//! Rows as the store returns them, decoded into domain types.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::domain::task::LeaseWindow;
use crate::domain::{
    CredentialKind, LeaseId, LeaseState, Role, ScopeName, SpiffeId, TaskContext, TaskId, TaskState,
    UnixMillis, WorkloadName,
};
use crate::error::Error;
use crate::issuer::KeyAlgorithm;

/// A registered workload.
#[derive(Clone, Debug)]
pub struct WorkloadRecord {
    pub id: String,
    pub name: WorkloadName,
    pub spiffe_id: SpiffeId,
    pub roles: Vec<Role>,
    pub created_at: UnixMillis,
}

/// A signing key as stored: public half in clear, private half sealed under the master key.
#[derive(Clone, Debug)]
pub struct StoredSigningKey {
    pub kid: String,
    pub algorithm: KeyAlgorithm,
    pub public_key: Vec<u8>,
    pub sealed_private_key: Vec<u8>,
    pub created_at: UnixMillis,
    pub retired_at: Option<UnixMillis>,
    pub publish_until: Option<UnixMillis>,
}

/// A task.
#[derive(Clone, Debug)]
pub struct TaskRecord {
    pub id: TaskId,
    pub workload_id: String,
    pub purpose: String,
    pub context: TaskContext,
    pub state: TaskState,
    pub created_at: UnixMillis,
    pub deadline: UnixMillis,
    pub ended_at: Option<UnixMillis>,
    pub idempotency_key: Option<String>,
    pub request_digest: Option<String>,
}

/// A lease of a task.
#[derive(Clone, Debug)]
pub struct LeaseRecord {
    pub id: LeaseId,
    pub task_id: TaskId,
    pub scope: ScopeName,
    pub kind: CredentialKind,
    pub audience: String,
    pub state: LeaseState,
    pub kid: Option<String>,
    pub window: LeaseWindow,
    pub ended_at: Option<UnixMillis>,
}

/// The error for a stored value the code cannot read back: a damaged or foreign database.
pub(super) fn corrupt(column: &str, value: &str) -> Error {
    Error::internal(format!(
        "unreadable stored value in column {column}: {value:?}"
    ))
}

fn millis(row: &AnyRow, column: &str) -> Result<UnixMillis, sqlx::Error> {
    row.try_get::<i64, _>(column).map(UnixMillis)
}

fn optional_millis(row: &AnyRow, column: &str) -> Result<Option<UnixMillis>, sqlx::Error> {
    Ok(row.try_get::<Option<i64>, _>(column)?.map(UnixMillis))
}

pub(super) const WORKLOAD_COLUMNS: &str = "w.id, w.name, w.spiffe_id, w.roles, w.created_at";

impl WorkloadRecord {
    pub(super) fn from_row(row: &AnyRow) -> Result<Self, Error> {
        let name: String = row.try_get("name")?;
        let roles_text: String = row.try_get("roles")?;
        let roles = roles_text
            .split_whitespace()
            .map(|role| Role::parse(role).ok_or_else(|| corrupt("workloads.roles", role)))
            .collect::<Result<_, _>>()?;
        Ok(WorkloadRecord {
            id: row.try_get("id")?,
            name: WorkloadName::parse("workloads.name", &name)
                .map_err(|_| corrupt("workloads.name", &name))?,
            spiffe_id: SpiffeId::from_stored(row.try_get("spiffe_id")?),
            roles,
            created_at: millis(row, "created_at")?,
        })
    }
}

pub(super) const KEY_COLUMNS: &str =
    "kid, algorithm, public_key, sealed_private_key, created_at, retired_at, publish_until";

impl StoredSigningKey {
    pub(super) fn from_row(row: &AnyRow) -> Result<Self, Error> {
        let algorithm: String = row.try_get("algorithm")?;
        Ok(StoredSigningKey {
            kid: row.try_get("kid")?,
            algorithm: KeyAlgorithm::from_jws_name(&algorithm)
                .ok_or_else(|| corrupt("signing_keys.algorithm", &algorithm))?,
            public_key: row.try_get("public_key")?,
            sealed_private_key: row.try_get("sealed_private_key")?,
            created_at: millis(row, "created_at")?,
            retired_at: optional_millis(row, "retired_at")?,
            publish_until: optional_millis(row, "publish_until")?,
        })
    }
}

pub(super) const TASK_COLUMNS: &str = "t.id, t.workload_id, t.purpose, t.context_json, t.state, t.created_at, \
     t.deadline, t.ended_at, t.idempotency_key, t.request_digest";

impl TaskRecord {
    pub(super) fn from_row(row: &AnyRow) -> Result<Self, Error> {
        let state: String = row.try_get("state")?;
        let context: String = row.try_get("context_json")?;
        Ok(TaskRecord {
            id: TaskId::from_stored(row.try_get("id")?),
            workload_id: row.try_get("workload_id")?,
            purpose: row.try_get("purpose")?,
            context: serde_json::from_str(&context)
                .map_err(|_| corrupt("tasks.context_json", &context))?,
            state: TaskState::from_stored(&state).ok_or_else(|| corrupt("tasks.state", &state))?,
            created_at: millis(row, "created_at")?,
            deadline: millis(row, "deadline")?,
            ended_at: optional_millis(row, "ended_at")?,
            idempotency_key: row.try_get("idempotency_key")?,
            request_digest: row.try_get("request_digest")?,
        })
    }
}

pub(super) const LEASE_COLUMNS: &str = "l.id, l.task_id, l.scope, l.kind, l.audience, l.state, l.kid, \
     l.issued_at, l.expires_at, l.renewable_until, l.ended_at";

impl LeaseRecord {
    pub(super) fn from_row(row: &AnyRow) -> Result<Self, Error> {
        let state: String = row.try_get("state")?;
        let kind: String = row.try_get("kind")?;
        let scope: String = row.try_get("scope")?;
        Ok(LeaseRecord {
            id: LeaseId::from_stored(row.try_get("id")?),
            task_id: TaskId::from_stored(row.try_get("task_id")?),
            scope: ScopeName::parse("leases.scope", &scope)
                .map_err(|_| corrupt("leases.scope", &scope))?,
            kind: CredentialKind::parse(&kind).ok_or_else(|| corrupt("leases.kind", &kind))?,
            audience: row.try_get("audience")?,
            state: LeaseState::from_stored(&state)
                .ok_or_else(|| corrupt("leases.state", &state))?,
            kid: row.try_get("kid")?,
            window: LeaseWindow {
                issued_at: millis(row, "issued_at")?,
                expires_at: millis(row, "expires_at")?,
                renewable_until: millis(row, "renewable_until")?,
            },
            ended_at: optional_millis(row, "ended_at")?,
        })
    }
}
