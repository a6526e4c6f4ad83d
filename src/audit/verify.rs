//! Checking the whole trail: the hash chain from the first event, every checkpoint signature and
//! position, the stored head (which exposes a truncated tail), and, when one is given, a trust
//! anchor kept outside the database.
//!
//! Without an anchor the checkpoints and keys stored beside the trail are trusted, so someone
//! who can write the database can rewrite events, recompute the chain, delete the checkpoints
//! or sign new ones with a key row of their own, and still get "intact". An anchor (a signed
//! checkpoint and the public keys, exported earlier by `warrant audit anchor`) closes that: the
//! chain must still pass through the anchor's checkpoint, that checkpoint must still be stored,
//! and stored checkpoints count as trusted only when a key of the anchor signed them.

use std::collections::HashMap;

use super::chain::{ChainWalk, Problem, checkpoint_message};
use crate::error::Result;
use crate::issuer::VerifyingKey;
use crate::store::{Checkpoint, Store};

const PAGE: usize = 1000;

/// A trust anchor kept outside the database.
pub struct Anchor {
    pub checkpoint: Checkpoint,
    /// The keys trusted to sign checkpoints, by kid.
    pub keys: HashMap<String, VerifyingKey>,
}

/// The outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Sealed events checked before the first problem (or all of them).
    pub events_checked: i64,
    pub checkpoints_checked: usize,
    /// The position the latest checkpoint covers (0 without checkpoints).
    pub last_checkpoint_seq: i64,
    /// The last position a trusted signature vouches for: the anchor's keys with an anchor,
    /// the stored keys without one.
    pub trusted_through_seq: i64,
    /// Events written but not sealed yet (normal for the last fraction of a second).
    pub unsealed: i64,
    pub problem: Option<Problem>,
}

/// Walks the trail up to the head as it was when the walk began (events sealed meanwhile are
/// not expected, so a busy broker never looks truncated) and reports the first problem.
pub async fn verify(store: &dyn Store, anchor: Option<&Anchor>) -> Result<Report> {
    let (head_seq, _) = store.audit_head().await?;
    let checkpoints: Vec<Checkpoint> = store
        .checkpoints()
        .await?
        .into_iter()
        .filter(|checkpoint| checkpoint.seq <= head_seq)
        .collect();
    let remembered = checkpoints
        .iter()
        .map(|checkpoint| checkpoint.seq)
        .chain(anchor.map(|anchor| anchor.checkpoint.seq));
    let mut walk = ChainWalk::new(remembered);
    let mut problem = walk_chain(store, &mut walk, head_seq).await?;
    let last_seq = walk.last_seq();
    let mut checkpoints_checked = 0;
    let mut trusted_through_seq = 0;
    if problem.is_none()
        && let Some(anchor) = anchor
    {
        problem = check_anchor(anchor, &walk, &checkpoints);
        trusted_through_seq = anchor.checkpoint.seq;
    }
    if problem.is_none() {
        for checkpoint in &checkpoints {
            let describe = |description: String| Problem {
                seq: checkpoint.seq,
                event_id: String::new(),
                description,
            };
            let stored_key = store
                .signing_public_key(&checkpoint.kid)
                .await?
                .map(|(algorithm, public_key)| VerifyingKey::new(algorithm, public_key));
            let trusted_key = anchor.and_then(|anchor| anchor.keys.get(&checkpoint.kid));
            if let (Some(trusted), Some(stored)) = (trusted_key, &stored_key)
                && trusted.public_key != stored.public_key
            {
                problem = Some(describe(format!(
                    "the stored key {} differs from the anchor's (the key table was altered)",
                    checkpoint.kid
                )));
                break;
            }
            let message = checkpoint_message(checkpoint.seq, &checkpoint.head_hash);
            let is_signed = trusted_key
                .or(stored_key.as_ref())
                .is_some_and(|key| key.verify(&message, &checkpoint.signature));
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
            // Without an anchor every stored key is trusted; with one, only the anchor's.
            if anchor.is_none() || trusted_key.is_some() {
                trusted_through_seq = trusted_through_seq.max(checkpoint.seq);
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
        trusted_through_seq,
        events_checked: last_seq,
        checkpoints_checked,
        unsealed: store.unsealed_audit_events().await?,
        problem,
    })
}

/// Checks sealed events in order up to `head_seq`; the first problem, if any.
async fn walk_chain(
    store: &dyn Store,
    walk: &mut ChainWalk,
    head_seq: i64,
) -> Result<Option<Problem>> {
    let mut after = 0;
    loop {
        let page = store.sealed_audit_events(after, PAGE).await?;
        for record in page.iter().filter(|record| record.event.seq <= head_seq) {
            if let Err(found) = walk.check(&record.event) {
                return Ok(Some(found));
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE && last.event.seq < head_seq => {
                after = last.event.seq;
            }
            _ => return Ok(None),
        }
    }
}

/// The anchor's checkpoint is signed by one of its keys, the chain still passes through it,
/// and the database still holds it.
fn check_anchor(anchor: &Anchor, walk: &ChainWalk, stored: &[Checkpoint]) -> Option<Problem> {
    let checkpoint = &anchor.checkpoint;
    let describe = |description: String| {
        Some(Problem {
            seq: checkpoint.seq,
            event_id: String::new(),
            description,
        })
    };
    let message = checkpoint_message(checkpoint.seq, &checkpoint.head_hash);
    let is_signed = anchor
        .keys
        .get(&checkpoint.kid)
        .is_some_and(|key| key.verify(&message, &checkpoint.signature));
    if !is_signed {
        return describe(format!(
            "the anchor's checkpoint at event {} does not verify with the anchor's keys",
            checkpoint.seq
        ));
    }
    if checkpoint.seq > walk.last_seq() {
        return describe(format!(
            "the trail was truncated: the anchor covers events up to {}, but it ends at {}",
            checkpoint.seq,
            walk.last_seq()
        ));
    }
    if walk.hash_at(checkpoint.seq) != Some(checkpoint.head_hash.as_str()) {
        return describe(format!(
            "events up to {} differ from the anchor's checkpoint (the chain was rewritten)",
            checkpoint.seq
        ));
    }
    let still_stored = stored.iter().any(|kept| {
        kept.seq == checkpoint.seq
            && kept.head_hash == checkpoint.head_hash
            && kept.signature == checkpoint.signature
    });
    if !still_stored {
        return describe(format!(
            "the anchor's checkpoint at event {} is no longer in the database (checkpoints were deleted)",
            checkpoint.seq
        ));
    }
    None
}
