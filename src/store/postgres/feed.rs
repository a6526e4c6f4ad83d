//! The revocation feed on PostgreSQL, without a shared counter.
//!
//! An event's position is its writing transaction's id and its ordinal within the
//! transaction's one append; the cursor a subscriber sees packs both into one number
//! (`tx_id << 20 | ordinal`). Readers see only events below the oldest transaction still
//! running (`pg_snapshot_xmin`): every transaction below it has committed or aborted, so that
//! prefix of the feed never changes, and a subscriber resuming after any cursor can never have
//! skipped an event that committed late. The price is that one long transaction anywhere on the
//! server holds the feed back (delayed, never lost); the store reports it as held back, and
//! introspection then reads the database instead of trusting its in-memory state.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::audit;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::store::events::feed_audit_event;
use crate::store::records::{FeedColumns, FeedEvent, FeedPage, FeedRecord};

/// Bits of a cursor that hold the ordinal within a transaction.
const ORDINAL_BITS: u32 = 20;
/// The most events one transaction may append.
pub const MAX_EVENTS_PER_TRANSACTION: usize = 1 << ORDINAL_BITS;

/// The feed columns every read and write names, in the order [`columns`] decodes them.
macro_rules! feed_columns {
    () => {
        "lease_id, task_id, scope, audience, reason, not_after, occurred_at"
    };
}

/// The position of the latest visible event.
const HEAD: &str = concat!(
    "SELECT tx_id, ordinal FROM revocation_feed WHERE tx_id < ",
    horizon!(),
    " ORDER BY tx_id DESC, ordinal DESC LIMIT 1"
);

/// Packs a feed position into a cursor.
fn cursor(tx_id: i64, ordinal: i32) -> Result<u64> {
    let tx_id = u64::try_from(tx_id).map_err(Error::internal)?;
    let ordinal = u64::try_from(ordinal).map_err(Error::internal)?;
    if tx_id >= 1 << (63 - ORDINAL_BITS) {
        return Err(Error::internal(
            "transaction id beyond the feed cursor's range",
        ));
    }
    Ok(tx_id << ORDINAL_BITS | ordinal)
}

/// Unpacks a cursor into the position it names.
fn position(cursor: u64) -> (i64, i32) {
    let tx_id = i64::try_from(cursor >> ORDINAL_BITS).unwrap_or(i64::MAX);
    // The mask keeps 20 bits, which always fit.
    let ordinal = i32::try_from(cursor & ((1 << ORDINAL_BITS) - 1)).unwrap_or(i32::MAX);
    (tx_id, ordinal)
}

/// Appends `events`, each caused by its actor, with their audit events, in the caller's
/// transaction. A transaction appends once (its ordinals start at 0).
pub async fn append(connection: &mut PgConnection, events: &[(FeedEvent, &str)]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    if events.len() > MAX_EVENTS_PER_TRANSACTION {
        return Err(Error::internal(
            "too many revocation events for one transaction",
        ));
    }
    let ordinals: Vec<i32> = (0..events.len())
        .map(|ordinal| i32::try_from(ordinal).unwrap_or(i32::MAX))
        .collect();
    let feed_events = || events.iter().map(|(event, _)| event);
    sqlx::query(concat!(
        "INSERT INTO revocation_feed (ordinal, ",
        feed_columns!(),
        ") SELECT * FROM UNNEST($1::int[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::bigint[], $8::bigint[])"
    ))
    .bind(ordinals)
    .bind(
        feed_events()
            .map(|event| event.lease_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        feed_events()
            .map(|event| event.task_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        feed_events()
            .map(|event| event.scope.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        feed_events()
            .map(|event| event.audience.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        feed_events()
            .map(|event| event.reason.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        feed_events()
            .map(|event| event.not_after.0)
            .collect::<Vec<_>>(),
    )
    .bind(
        feed_events()
            .map(|event| event.occurred_at.0)
            .collect::<Vec<_>>(),
    )
    .execute(&mut *connection)
    .await?;
    let twins: Vec<_> = events
        .iter()
        .map(|(event, actor)| feed_audit_event(event, actor))
        .collect();
    audit::insert_events(connection, &twins.iter().collect::<Vec<_>>()).await
}

pub async fn after(pool: &PgPool, cursor_after: u64, limit: usize) -> Result<FeedPage> {
    let (tx_id, ordinal) = position(cursor_after);
    let rows = sqlx::query(concat!(
        "SELECT f.tx_id, f.ordinal, ",
        feed_columns!(),
        ", h.horizon FROM revocation_feed f, (SELECT ",
        horizon!(),
        " AS horizon) h WHERE (f.tx_id, f.ordinal) > ($1, $2) ORDER BY f.tx_id, f.ordinal LIMIT $3"
    ))
    .bind(tx_id)
    .bind(ordinal)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    let mut page = FeedPage {
        cursor: cursor_after,
        ..FeedPage::default()
    };
    for row in &rows {
        let (tx_id, ordinal, horizon): (i64, i32, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(9)?);
        if tx_id >= horizon {
            page.is_held_back = true;
            break;
        }
        page.cursor = cursor(tx_id, ordinal)?;
        page.records.push(FeedRecord {
            cursor: page.cursor,
            event: columns(row, 2)?.into_event()?,
        });
    }
    Ok(page)
}

/// See [`crate::store::Store::prune_feed`]. The newest event stays, so the feed's head never
/// moves back.
pub async fn prune(pool: &PgPool, horizon: UnixMillis, limit: usize) -> Result<u64> {
    let deleted = sqlx::query(
        "DELETE FROM revocation_feed WHERE (tx_id, ordinal) IN ( \
           SELECT tx_id, ordinal FROM revocation_feed WHERE not_after < $1 \
           AND (tx_id, ordinal) < (SELECT tx_id, ordinal FROM revocation_feed \
                                   ORDER BY tx_id DESC, ordinal DESC LIMIT 1) \
           ORDER BY not_after LIMIT $2)",
    )
    .bind(horizon.0)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

pub async fn head(pool: &PgPool) -> Result<u64> {
    let row = sqlx::query(HEAD).fetch_optional(pool).await?;
    match row {
        Some(row) => cursor(row.try_get(0)?, row.try_get(1)?),
        None => Ok(0),
    }
}

/// Events whose tokens may still be valid at `now`, and the cursor to follow the feed from,
/// read from one snapshot so that following from the cursor misses nothing.
pub async fn unexpired(pool: &PgPool, now: UnixMillis) -> Result<(Vec<FeedEvent>, u64)> {
    let mut transaction = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *transaction)
        .await?;
    let events = sqlx::query(concat!(
        "SELECT tx_id, ordinal, ",
        feed_columns!(),
        " FROM revocation_feed WHERE not_after >= $1 AND tx_id < ",
        horizon!()
    ))
    .bind(now.0)
    .fetch_all(&mut *transaction)
    .await?
    .iter()
    .map(|row| columns(row, 2)?.into_event())
    .collect::<Result<Vec<_>>>()?;
    let head = sqlx::query(HEAD).fetch_optional(&mut *transaction).await?;
    transaction.commit().await?;
    let cursor = match head {
        Some(row) => cursor(row.try_get(0)?, row.try_get(1)?)?,
        None => 0,
    };
    Ok((events, cursor))
}

fn columns(row: &PgRow, first: usize) -> Result<FeedColumns> {
    Ok(FeedColumns {
        lease_id: row.try_get(first)?,
        task_id: row.try_get(first + 1)?,
        scope: row.try_get(first + 2)?,
        audience: row.try_get(first + 3)?,
        reason: row.try_get(first + 4)?,
        not_after: row.try_get(first + 5)?,
        occurred_at: row.try_get(first + 6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_order_as_positions_and_round_trip() {
        let a = cursor(1000, 5).unwrap();
        let b = cursor(1000, 6).unwrap();
        let c = cursor(1001, 0).unwrap();
        assert!(a < b && b < c);
        assert_eq!(position(b), (1000, 6));
        assert!(cursor(1 << 43, 0).is_err());
    }
}
