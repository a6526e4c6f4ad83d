//! Replicas sharing one database learn each other's changes: `LISTEN/NOTIFY` as the wake-up,
//! and a poll behind it, since notifications sent while a listener reconnects are lost.
//!
//! - The *announcer* sends a notification on channel [`CHANNEL`] after each local commit that
//!   others must see (the topic name as payload), from a task of its own and after the commit,
//!   so a committing transaction never takes the server's notification lock. It also sends a
//!   heartbeat, `ping:<replica>`, twice a second.
//! - The *listener* turns notifications into local [`Changes`]. It expects its own heartbeat
//!   back: a connection that stays silent (half-open, a stopped server) is taken for lost,
//!   reconnected, and meanwhile the revocation state is marked not current.
//! - The *follower* reads the feed from where it left off on every change and every
//!   [`FOLLOW_POLL_INTERVAL`], records other replicas' endings in the revocation state, and
//!   tells it how current it is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::feed;
use crate::store::{Changes, RevocationState, Topic};

/// The notification channel every replica listens on.
pub const CHANNEL: &str = "warrant_changes";
/// How often each replica sends itself a heartbeat through the channel.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// A listener that has not heard its own heartbeat for this long is taken for lost.
const HEARTBEAT_LOST_AFTER: Duration = Duration::from_secs(2);
/// How often the follower re-reads the feed without a notification.
const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How soon the follower reads again when the feed holds committed events back.
const HELD_BACK_RETRY: Duration = Duration::from_millis(2);
/// Events the follower reads per page.
const FOLLOW_PAGE: usize = 1000;
/// The longest pause between attempts to reconnect the listener.
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);

/// Announces local commits, here at once and to the other replicas through the database.
#[derive(Clone)]
pub struct Announcer {
    changes: Arc<Changes>,
    outbox: mpsc::UnboundedSender<Topic>,
}

impl Announcer {
    pub fn announce(&self, topic: Topic) {
        self.changes.notify(topic);
        let _ = self.outbox.send(topic);
    }
}

/// Starts the announcer, listener and follower of one store; they stop when `shutdown` turns
/// true. `cursor` is where the follower starts reading the feed.
pub fn start(
    pool: PgPool,
    changes: Arc<Changes>,
    revocations: Arc<RevocationState>,
    cursor: u64,
    shutdown: watch::Receiver<bool>,
) -> (Announcer, Vec<JoinHandle<()>>) {
    let replica = crate::domain::ids::hex(&crate::issuer::random::bytes::<8>());
    let (outbox, pending) = mpsc::unbounded_channel();
    let announcer = Announcer {
        changes: changes.clone(),
        outbox,
    };
    let tasks = vec![
        tokio::spawn(send_notifications(
            pool.clone(),
            pending,
            replica.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(listen(
            pool.clone(),
            changes.clone(),
            revocations.clone(),
            replica,
            shutdown.clone(),
        )),
        tokio::spawn(follow(pool, changes, revocations, cursor, shutdown)),
    ];
    (announcer, tasks)
}

/// Sends each locally committed topic (several commits of one topic in one notification) and
/// the heartbeat.
async fn send_notifications(
    pool: PgPool,
    mut pending: mpsc::UnboundedReceiver<Topic>,
    replica: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let heartbeat = format!("ping:{replica}");
    let mut beats = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        let mut payloads: Vec<&str> = Vec::new();
        tokio::select! {
            topic = pending.recv() => {
                let Some(topic) = topic else { return };
                payloads.push(topic.as_str());
                while let Ok(topic) = pending.try_recv() {
                    if !payloads.contains(&topic.as_str()) {
                        payloads.push(topic.as_str());
                    }
                }
            }
            _ = beats.tick() => payloads.push(&heartbeat),
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
        for payload in payloads {
            if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload)
                .execute(&pool)
                .await
            {
                tracing::debug!(%error, "cannot notify the other replicas; they will poll");
            }
        }
    }
}

/// Listens for other replicas' changes, reconnecting whenever the connection is lost or falls
/// silent.
async fn listen(
    pool: PgPool,
    changes: Arc<Changes>,
    revocations: Arc<RevocationState>,
    replica: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let heartbeat = format!("ping:{replica}");
    let mut delay = Duration::from_millis(50);
    loop {
        let mut listener = match connect(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for other replicas' changes; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|stopping| *stopping) => return,
                }
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                continue;
            }
        };
        delay = Duration::from_millis(50);
        revocations.set_listening(true);
        // Whatever changed while no one listened is read again.
        for topic in Topic::ALL {
            changes.notify(topic);
        }
        let mut heard_heartbeat = Instant::now();
        let mut watchdog = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            tokio::select! {
                notification = listener.try_recv() => match notification {
                    Ok(Some(notification)) => {
                        let payload = notification.payload();
                        if payload == heartbeat {
                            heard_heartbeat = Instant::now();
                        } else if let Some(topic) = Topic::parse(payload) {
                            changes.notify(topic);
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!("lost the connection that listens for other replicas' changes");
                        break;
                    }
                },
                _ = watchdog.tick() => {
                    if heard_heartbeat.elapsed() > HEARTBEAT_LOST_AFTER {
                        tracing::warn!("the change listener has not heard its heartbeat; reconnecting");
                        break;
                    }
                }
                _ = shutdown.wait_for(|stopping| *stopping) => return,
            }
        }
        revocations.set_listening(false);
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Follows the feed into the revocation state.
async fn follow(
    pool: PgPool,
    changes: Arc<Changes>,
    revocations: Arc<RevocationState>,
    mut cursor: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut feed_changes = changes.subscribe(Topic::Feed);
    loop {
        feed_changes.mark_unchanged();
        let read_started = Instant::now();
        let wait = match read_to_end(&pool, &revocations, &mut cursor).await {
            Ok(is_held_back) => {
                revocations.set_caught_up(read_started, is_held_back.then_some(cursor));
                if is_held_back {
                    HELD_BACK_RETRY
                } else {
                    FOLLOW_POLL_INTERVAL
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot follow the revocation feed; retrying");
                FOLLOW_POLL_INTERVAL
            }
        };
        tokio::select! {
            _ = feed_changes.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// Reads every visible event after `cursor` into the state; whether events wait held back.
async fn read_to_end(
    pool: &PgPool,
    revocations: &RevocationState,
    cursor: &mut u64,
) -> crate::error::Result<bool> {
    loop {
        let page = feed::after(pool, *cursor, FOLLOW_PAGE).await?;
        let events: Vec<_> = page
            .records
            .iter()
            .map(|record| record.event.clone())
            .collect();
        revocations.record(&events);
        *cursor = page.cursor;
        if page.records.len() < FOLLOW_PAGE {
            return Ok(page.is_held_back);
        }
    }
}
