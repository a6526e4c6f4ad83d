//! The revocation feed table: events appended in the transaction that ends the leases, read back
//! by cursor.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::Store;
use super::records::corrupt;
use super::sql::{placeholder_rows, rows_per_statement, spell};
use crate::audit::AuditEvent;
use crate::domain::{RevocationReason, UnixMillis};
use crate::error::{Error, Result};

/// One revocation: a lease (`lease_id` set) or a whole task (`lease_id` empty) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    pub lease_id: Option<String>,
    pub task_id: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub reason: RevocationReason,
    /// When the concerned tokens expire anyway.
    pub not_after: UnixMillis,
    pub occurred_at: UnixMillis,
}

/// An event with its position in the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedRecord {
    pub seq: i64,
    pub event: FeedEvent,
}

impl Store {
    /// Up to `limit` events after `cursor`, in order.
    pub async fn feed_after(&self, cursor: i64, limit: i64) -> Result<Vec<FeedRecord>> {
        let rows = sqlx::query(
            "SELECT seq, lease_id, task_id, scope, audience, reason, not_after, occurred_at \
             FROM revocation_feed WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(cursor)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(feed_record).collect()
    }

    /// The sequence number of the latest event.
    pub async fn feed_head(&self) -> Result<i64> {
        let row = sqlx::query("SELECT last_seq FROM feed_head WHERE id = 1")
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get("last_seq")?)
    }
}

/// Appends `events`, each with the actor that caused it, inside the caller's transaction (and
/// their audit events), and returns the last sequence number.
/// Numbers are taken from `feed_head`, whose row lock is held until commit, so events become
/// visible in sequence order and a reader that has seen `n` never later finds an event below `n`.
pub(super) async fn append(
    connection: &mut sqlx::AnyConnection,
    events: &[(FeedEvent, &str)],
) -> Result<i64> {
    const COLUMNS: usize = 8;
    let count = i64::try_from(events.len()).map_err(Error::internal)?;
    let row = sqlx::query(
        "UPDATE feed_head SET last_seq = last_seq + $1 WHERE id = 1 RETURNING last_seq",
    )
    .bind(count)
    .fetch_one(&mut *connection)
    .await?;
    let last_seq: i64 = row.try_get("last_seq")?;
    let numbered: Vec<(i64, &FeedEvent)> = (last_seq - count + 1..)
        .zip(events.iter().map(|(event, _)| event))
        .collect();
    for chunk in numbered.chunks(rows_per_statement(COLUMNS)) {
        let sql = spell(
            connection,
            format!(
                "INSERT INTO revocation_feed (seq, lease_id, task_id, scope, audience, reason, not_after, occurred_at) \
             VALUES {}",
                placeholder_rows(chunk.len(), COLUMNS)
            ),
        );
        let mut insert = sqlx::query(&sql);
        for (seq, event) in chunk {
            insert = insert
                .bind(*seq)
                .bind(event.lease_id.as_deref())
                .bind(&event.task_id)
                .bind(event.scope.as_deref())
                .bind(event.audience.as_deref())
                .bind(event.reason.as_str())
                .bind(event.not_after.0)
                .bind(event.occurred_at.0);
        }
        insert.execute(&mut *connection).await?;
    }
    let audit: Vec<AuditEvent> = events
        .iter()
        .map(|(event, actor)| audit_twin(event, actor))
        .collect();
    super::audit::insert_events(connection, &audit).await?;
    Ok(last_seq)
}

/// `events` paired with the one actor that caused them all, for [`append`].
pub(super) fn caused_by<'a>(events: &[FeedEvent], actor: &'a str) -> Vec<(FeedEvent, &'a str)> {
    events.iter().map(|event| (event.clone(), actor)).collect()
}

/// The audit event recording a revocation-feed event.
fn audit_twin(event: &FeedEvent, actor: &str) -> AuditEvent {
    let event_type = match (&event.lease_id, event.reason) {
        (Some(_), RevocationReason::LeaseExpired | RevocationReason::TaskExpired) => {
            "lease.expired"
        }
        (Some(_), _) => "lease.revoked",
        (None, RevocationReason::TaskCompleted) => "task.completed",
        (None, RevocationReason::TaskExpired | RevocationReason::LeaseExpired) => "task.expired",
        (None, RevocationReason::Revoked) => "task.revoked",
    };
    let mut audit = AuditEvent::new(event_type, "confirmed", actor)
        .task(&event.task_id)
        .with("reason", event.reason.as_str())
        .with("not_after", event.not_after.0);
    audit.occurred_at = event.occurred_at;
    if let Some(lease_id) = &event.lease_id {
        audit = audit.lease(lease_id);
    }
    if let Some(scope) = &event.scope {
        audit = audit.scope(scope);
    }
    audit
}

fn feed_record(row: &AnyRow) -> Result<FeedRecord> {
    let reason: String = row.try_get("reason")?;
    Ok(FeedRecord {
        seq: row.try_get("seq")?,
        event: FeedEvent {
            lease_id: row.try_get("lease_id")?,
            task_id: row.try_get("task_id")?,
            scope: row.try_get("scope")?,
            audience: row.try_get("audience")?,
            reason: RevocationReason::from_stored(&reason)
                .ok_or_else(|| corrupt("revocation_feed.reason", &reason))?,
            not_after: UnixMillis(row.try_get("not_after")?),
            occurred_at: UnixMillis(row.try_get("occurred_at")?),
        },
    })
}
