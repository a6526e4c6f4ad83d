//! Checking the whole trail: the hash chain from the first event, every checkpoint signature and
//! position, and the stored head (which exposes a truncated tail).

use super::chain::{ChainWalk, Problem, checkpoint_message};
use crate::error::Result;
use crate::issuer::VerifyingKey;
use crate::store::Store;

const PAGE: usize = 1000;

/// The outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Sealed events checked before the first problem (or all of them).
    pub events_checked: i64,
    pub checkpoints_checked: usize,
    /// The position the latest checkpoint covers (0 without checkpoints).
    pub last_checkpoint_seq: i64,
    /// Events written but not sealed yet (normal for the last fraction of a second).
    pub unsealed: i64,
    pub problem: Option<Problem>,
}

/// Walks the trail and reports the first problem.
pub async fn verify(store: &dyn Store) -> Result<Report> {
    let checkpoints = store.checkpoints().await?;
    let mut walk = ChainWalk::new(checkpoints.iter().map(|checkpoint| checkpoint.seq));
    let mut after = 0;
    let mut problem = None;
    'pages: loop {
        let page = store.sealed_audit_events(after, PAGE).await?;
        for record in &page {
            if let Err(found) = walk.check(&record.event) {
                problem = Some(found);
                break 'pages;
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE => after = last.event.seq,
            _ => break,
        }
    }
    let last_seq = walk.last_seq();
    let mut checkpoints_checked = 0;
    if problem.is_none() {
        let (head_seq, _) = store.audit_head().await?;
        for checkpoint in &checkpoints {
            let describe = |description: String| Problem {
                seq: checkpoint.seq,
                event_id: String::new(),
                description,
            };
            let key = store.signing_public_key(&checkpoint.kid).await?;
            let is_signed = key.as_ref().is_some_and(|(algorithm, public_key)| {
                VerifyingKey::new(*algorithm, public_key.clone()).verify(
                    &checkpoint_message(checkpoint.seq, &checkpoint.head_hash),
                    &checkpoint.signature,
                )
            });
            if !is_signed {
                problem = Some(describe(format!(
                    "checkpoint at event {} has no valid signature (key {})",
                    checkpoint.seq, checkpoint.kid
                )));
                break;
            }
            if checkpoint.seq > last_seq {
                problem = Some(describe(format!(
                    "the trail was truncated: a signed checkpoint covers events up to {}, but it ends at {last_seq}",
                    checkpoint.seq
                )));
                break;
            }
            if walk.hash_at(checkpoint.seq) != Some(checkpoint.head_hash.as_str()) {
                problem = Some(describe(format!(
                    "events up to {} differ from what the signed checkpoint recorded (the chain was rewritten)",
                    checkpoint.seq
                )));
                break;
            }
            checkpoints_checked += 1;
        }
        if problem.is_none() && head_seq > last_seq {
            problem = Some(Problem {
                seq: last_seq + 1,
                event_id: String::new(),
                description: format!(
                    "the trail was truncated: events {} to {head_seq} are missing",
                    last_seq + 1
                ),
            });
        }
    }
    Ok(Report {
        last_checkpoint_seq: checkpoints.last().map_or(0, |checkpoint| checkpoint.seq),
        events_checked: last_seq,
        checkpoints_checked,
        unsealed: store.unsealed_audit_events().await?,
        problem,
    })
}
