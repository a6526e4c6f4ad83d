//! The hash chain: how a sealed event's hash is computed, how checkpoints are signed, and how a
//! sequence of stored events is checked. Pure functions, so the rules can be read and tested
//! apart from the database.

/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A sealed event as stored: every column the hash covers, exactly as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedEvent {
    pub seq: i64,
    pub id: String,
    pub occurred_at: i64,
    pub event_type: String,
    pub outcome: String,
    pub actor: String,
    pub workload: Option<String>,
    pub task_id: Option<String>,
    pub scope: Option<String>,
    pub lease_id: Option<String>,
    pub detail_json: String,
    pub context_json: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

/// SHA-256 (hex) over the event's fields and its predecessor's hash, serialized as a compact
/// JSON array so that no two different events share an encoding.
pub fn event_hash(event: &SealedEvent) -> String {
    crate::domain::ids::hex(
        ring::digest::digest(&ring::digest::SHA256, &canonical_form(event)).as_ref(),
    )
}

/// The bytes an event's hash covers: `["warrant-audit-event/v1", seq, id, .., prev_hash]`,
/// written straight from the fields (a tuple is a JSON array to serde).
fn canonical_form(event: &SealedEvent) -> Vec<u8> {
    let fields = (
        "warrant-audit-event/v1",
        event.seq,
        &event.id,
        event.occurred_at,
        &event.event_type,
        &event.outcome,
        &event.actor,
        &event.workload,
        &event.task_id,
        &event.scope,
        &event.lease_id,
        &event.detail_json,
        &event.context_json,
        &event.prev_hash,
    );
    // Strings, integers and options of strings always serialize.
    serde_json::to_vec(&fields).expect("an audit event serializes")
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(seq: i64, head_hash: &str) -> Vec<u8> {
    format!("warrant-audit-checkpoint/v1\n{seq}\n{head_hash}").into_bytes()
}

/// The first integrity problem found, naming the event concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub seq: i64,
    pub event_id: String,
    pub description: String,
}

/// Walks sealed events in `seq` order, remembering what a later check needs.
pub struct ChainWalk {
    expected_seq: i64,
    previous_hash: String,
    hashes_at_checkpoints: std::collections::HashMap<i64, String>,
    checkpoint_seqs: std::collections::HashSet<i64>,
}

impl ChainWalk {
    /// A walk that will remember the hashes at the given checkpoint positions.
    pub fn new(checkpoint_seqs: impl IntoIterator<Item = i64>) -> Self {
        ChainWalk {
            expected_seq: 1,
            previous_hash: GENESIS_HASH.to_owned(),
            hashes_at_checkpoints: Default::default(),
            checkpoint_seqs: checkpoint_seqs.into_iter().collect(),
        }
    }

    /// Checks the next stored event; the first problem ends the walk.
    pub fn check(&mut self, event: &SealedEvent) -> Result<(), Problem> {
        let problem = |seq: i64, description: String| Problem {
            seq,
            event_id: event.id.clone(),
            description,
        };
        if event.seq > self.expected_seq {
            return Err(problem(
                self.expected_seq,
                format!(
                    "event {} is missing (removed): the trail jumps from {} to {}",
                    self.expected_seq,
                    self.expected_seq - 1,
                    event.seq
                ),
            ));
        }
        if event.seq < self.expected_seq {
            return Err(problem(
                event.seq,
                format!("event {} appears twice or out of order", event.seq),
            ));
        }
        if event.prev_hash != self.previous_hash {
            return Err(problem(
                event.seq,
                format!(
                    "event {} ({}) does not follow event {}: events were reordered, or an earlier one removed or replaced",
                    event.seq,
                    event.id,
                    event.seq - 1
                ),
            ));
        }
        if event_hash(event) != event.hash {
            return Err(problem(
                event.seq,
                format!(
                    "event {} ({}) was altered: its content no longer matches its hash",
                    event.seq, event.id
                ),
            ));
        }
        if self.checkpoint_seqs.contains(&event.seq) {
            self.hashes_at_checkpoints
                .insert(event.seq, event.hash.clone());
        }
        self.previous_hash = event.hash.clone();
        self.expected_seq += 1;
        Ok(())
    }

    /// The last sequence number checked.
    pub fn last_seq(&self) -> i64 {
        self.expected_seq - 1
    }

    /// The hash the chain had at `seq`, if the walk passed a checkpoint there.
    pub fn hash_at(&self, seq: i64) -> Option<&str> {
        self.hashes_at_checkpoints.get(&seq).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(length: i64) -> Vec<SealedEvent> {
        let mut previous = GENESIS_HASH.to_owned();
        (1..=length)
            .map(|seq| {
                let mut event = SealedEvent {
                    seq,
                    id: format!("evt_{seq:04}"),
                    occurred_at: 1000 + seq,
                    event_type: "task.begun".into(),
                    outcome: "ok".into(),
                    actor: "agent".into(),
                    workload: Some("agent".into()),
                    task_id: Some("task_1".into()),
                    scope: None,
                    lease_id: None,
                    detail_json: "{}".into(),
                    context_json: None,
                    prev_hash: previous.clone(),
                    hash: String::new(),
                };
                event.hash = event_hash(&event);
                previous = event.hash.clone();
                event
            })
            .collect()
    }

    fn first_problem(events: &[SealedEvent]) -> Option<Problem> {
        let mut walk = ChainWalk::new([]);
        events.iter().find_map(|event| walk.check(event).err())
    }

    #[test]
    fn the_canonical_form_is_the_v1_json_array() {
        // Chains already stored were hashed over this exact encoding; it must never change.
        let mut event = chain(1).remove(0);
        event.detail_json = r#"{"reason":"quote \" and \\ and \u00e9"}"#.into();
        event.scope = Some("crm:read".into());
        let expected = serde_json::json!([
            "warrant-audit-event/v1",
            event.seq,
            event.id,
            event.occurred_at,
            event.event_type,
            event.outcome,
            event.actor,
            event.workload,
            event.task_id,
            event.scope,
            event.lease_id,
            event.detail_json,
            event.context_json,
            event.prev_hash,
        ])
        .to_string();
        assert_eq!(String::from_utf8(canonical_form(&event)).unwrap(), expected);
    }

    #[test]
    fn intact_chain_passes() {
        assert_eq!(first_problem(&chain(5)), None);
    }

    #[test]
    fn altered_removed_and_reordered_events_are_named() {
        let mut altered = chain(5);
        altered[2].detail_json = r#"{"reason":"nothing to see"}"#.into();
        assert_eq!(first_problem(&altered).unwrap().seq, 3);

        let mut removed = chain(5);
        removed.remove(1);
        let problem = first_problem(&removed).unwrap();
        assert_eq!(problem.seq, 2);
        assert!(problem.description.contains("missing"));

        let mut reordered = chain(5);
        reordered.swap(1, 3);
        reordered[1].seq = 2;
        reordered[3].seq = 4;
        assert_eq!(first_problem(&reordered).unwrap().seq, 2);
    }
}
