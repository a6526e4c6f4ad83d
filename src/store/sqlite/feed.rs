//! The revocation feed on SQLite: events numbered from `feed_head` by the one writer, so numbers
//! follow commit order and a reader that has seen `n` never later finds an event below it.

use rusqlite::{Connection, Row, params};

use super::audit;
use super::writer::Write;
use crate::domain::UnixMillis;
use crate::error::{Error, Result};
use crate::store::Topic;
use crate::store::events::feed_audit_event;
use crate::store::records::{FeedColumns, FeedEvent, FeedPage, FeedRecord};

const FEED_COLUMNS: &str = "lease_id, task_id, scope, audience, reason, not_after, occurred_at";

/// Appends `events`, caused by `actor`, with their audit events, in the current write; they
/// reach the revocation state and subscribers once the batch commits.
pub fn append(write: &mut Write<'_>, events: Vec<FeedEvent>, actor: &str) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let count = i64::try_from(events.len()).map_err(Error::internal)?;
    let last: i64 = write
        .connection
        .prepare_cached(
            "UPDATE feed_head SET last_seq = last_seq + ?1 WHERE id = 1 RETURNING last_seq",
        )?
        .query_row([count], |row| row.get(0))?;
    {
        let mut insert = write.connection.prepare_cached(&format!(
            "INSERT INTO revocation_feed (seq, {FEED_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ))?;
        for (seq, event) in (last - count + 1..).zip(&events) {
            insert.execute(params![
                seq,
                event.lease_id,
                event.task_id,
                event.scope,
                event.audience,
                event.reason.as_str(),
                event.not_after.0,
                event.occurred_at.0,
            ])?;
        }
    }
    let twins: Vec<_> = events
        .iter()
        .map(|event| feed_audit_event(event, actor))
        .collect();
    audit::insert_events(write, &twins)?;
    write.ended.extend(events);
    write.topics.push(Topic::Feed);
    Ok(())
}

/// See [`crate::store::Store::prune_feed`].
pub fn prune(write: &mut Write<'_>, horizon: UnixMillis, limit: usize) -> Result<u64> {
    let deleted = write
        .connection
        .prepare_cached(
            // The newest event stays, so the feed's head never moves back.
            "DELETE FROM revocation_feed WHERE seq IN \
             (SELECT seq FROM revocation_feed WHERE not_after < ?1 \
              AND seq < (SELECT MAX(seq) FROM revocation_feed) ORDER BY not_after LIMIT ?2)",
        )?
        .execute(params![horizon.0, i64::try_from(limit).unwrap_or(i64::MAX)])?;
    Ok(deleted as u64)
}

pub fn after(connection: &Connection, cursor: u64, limit: usize) -> Result<FeedPage> {
    let cursor_seq = i64::try_from(cursor).unwrap_or(i64::MAX);
    let records: Vec<FeedRecord> = connection
        .prepare_cached(&format!(
            "SELECT seq, {FEED_COLUMNS} FROM revocation_feed WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?
        .query_map(params![cursor_seq, limit as i64], |row| {
            Ok((row.get::<_, i64>(0)?, columns(row, 1)?))
        })?
        .map(|row| {
            let (seq, columns) = row?;
            Ok(FeedRecord {
                cursor: u64::try_from(seq).map_err(Error::internal)?,
                event: columns.into_event()?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(FeedPage {
        cursor: records.last().map_or(cursor, |record| record.cursor),
        records,
        is_held_back: false,
    })
}

pub fn head(connection: &Connection) -> Result<u64> {
    let last: i64 = connection
        .prepare_cached("SELECT last_seq FROM feed_head WHERE id = 1")?
        .query_row([], |row| row.get(0))?;
    u64::try_from(last).map_err(Error::internal)
}

/// Events whose tokens may still be valid at `now`: what introspection must know on start.
pub fn unexpired(connection: &Connection, now: UnixMillis) -> Result<Vec<FeedEvent>> {
    connection
        .prepare_cached(&format!(
            "SELECT {FEED_COLUMNS} FROM revocation_feed WHERE not_after >= ?1"
        ))?
        .query_map([now.0], |row| columns(row, 0))?
        .map(|columns| columns?.into_event())
        .collect()
}

fn columns(row: &Row<'_>, first: usize) -> rusqlite::Result<FeedColumns> {
    Ok(FeedColumns {
        lease_id: row.get(first)?,
        task_id: row.get(first + 1)?,
        scope: row.get(first + 2)?,
        audience: row.get(first + 3)?,
        reason: row.get(first + 4)?,
        not_after: row.get(first + 5)?,
        occurred_at: row.get(first + 6)?,
    })
}
