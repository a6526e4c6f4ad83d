//! The durable job queue's values: work that must happen eventually, once at a time, such as
//! revoking a credential held by an external system or delivering a webhook.
//!
//! A job is stored in the same transaction as the change that causes it, so the change and its
//! consequence commit together or not at all. A runner *claims* a job for a while (its claim
//! token and `claimed_until`); while the claim holds no other runner takes the job, and a runner
//! that dies mid-job lets its claim lapse, so the job is taken again. Finishing or failing a job
//! names the claim, so a runner whose claim lapsed cannot overwrite its successor's work.
//! Handlers must therefore be idempotent: a job can run again after a crash.

use std::time::Duration;

use crate::domain::UnixMillis;

/// A job to store with the change that causes it.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub id: String,
    /// Which handler runs it, such as `revoke.postgres` or `webhook.approval`.
    pub kind: String,
    /// What the handler needs, as JSON; never a secret in clear.
    pub payload: serde_json::Value,
    /// Not before this instant.
    pub run_after: UnixMillis,
}

impl NewJob {
    /// A job of `kind` with `payload`, due now.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value, now: UnixMillis) -> Self {
        NewJob {
            id: format!(
                "job_{}",
                crate::domain::ids::hex(&crate::issuer::random::bytes::<16>())
            ),
            kind: kind.into(),
            payload,
            run_after: now,
        }
    }
}

/// A job a runner holds a claim on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedJob {
    pub id: String,
    pub kind: String,
    pub payload: serde_json::Value,
    /// Attempts so far, this one included.
    pub attempts: u32,
    /// The claim's token: finishing the job must present it.
    pub claim: String,
    pub claimed_until: UnixMillis,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Done: the job is removed.
    Done,
    /// Failed: run again at `retry_at`, keeping `error` for operators to see.
    Failed { retry_at: UnixMillis, error: String },
}

/// A job still waiting (or failing), as operators see it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub kind: String,
    pub payload: serde_json::Value,
    pub attempts: u32,
    pub run_after: UnixMillis,
    pub claimed_until: Option<UnixMillis>,
    pub last_error: Option<String>,
    pub created_at: UnixMillis,
}

/// The first retry delay; each further failure doubles it, up to [`MAX_RETRY_DELAY`].
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts: a job is retried forever, never given up.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// How long to wait after the `attempts`-th failed attempt.
pub fn retry_delay(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    FIRST_RETRY_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// A fresh claim token.
pub fn claim_token() -> String {
    crate::domain::ids::hex(&crate::issuer::random::bytes::<16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_its_ceiling() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(2), Duration::from_secs(2));
        assert_eq!(retry_delay(4), Duration::from_secs(8));
        assert_eq!(retry_delay(40), MAX_RETRY_DELAY);
    }
}
