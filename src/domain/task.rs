//! Tasks and their leases: states, the context an agent declares, and the rules that bound a
//! lease's lifetime.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ids::TaskId;
use super::scope::{ScopeDefinition, ScopeName};
use super::time::UnixMillis;
use crate::error::Error;

/// Longest purpose text, in bytes.
/// The longest `purpose` a task may have (the CLI checks it before sending).
pub const MAX_PURPOSE_BYTES: usize = 512;
const MAX_SCOPES_PER_REQUEST: usize = 32;
const MAX_PLANNED_TOOLS: usize = 32;
const MAX_TOOL_BYTES: usize = 128;
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY_BYTES: usize = 64;
const MAX_LABEL_VALUE_BYTES: usize = 256;
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// The state of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    Active,
    Completed,
    Expired,
    Revoked,
}

/// The state of a lease (an issued grant, or a grant on its way to being one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    PendingApproval,
    Issued,
    Denied,
    Expired,
    Revoked,
}

/// The state of a grant request that waits for operators' approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantRequestState {
    Pending,
    /// The quorum approved: the lease with the request's id exists.
    Issued,
    /// An operator denied it.
    Denied,
    /// Not decided in time.
    Expired,
    /// Its task ended first.
    Cancelled,
}

/// An operator's answer to a grant request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Deny,
}

/// Why a lease or task stopped being valid, as the revocation feed reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevocationReason {
    TaskCompleted,
    Revoked,
    LeaseExpired,
    TaskExpired,
}

/// Maps an enum to the text stored in the database and back, so the spelling lives in one place.
macro_rules! stored_names {
    ($type:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $type {
            pub fn as_str(self) -> &'static str {
                match self { $($type::$variant => $text),+ }
            }
            pub fn from_stored(text: &str) -> Option<Self> {
                match text { $($text => Some($type::$variant),)+ _ => None }
            }
        }
    };
}

stored_names!(TaskState { Active => "active", Completed => "completed", Expired => "expired", Revoked => "revoked" });
stored_names!(LeaseState {
    PendingApproval => "pending_approval",
    Issued => "issued",
    Denied => "denied",
    Expired => "expired",
    Revoked => "revoked",
});
stored_names!(GrantRequestState {
    Pending => "pending",
    Issued => "issued",
    Denied => "denied",
    Expired => "expired",
    Cancelled => "cancelled",
});
stored_names!(Verdict { Approve => "approve", Deny => "deny" });
stored_names!(RevocationReason {
    TaskCompleted => "task_completed",
    Revoked => "revoked",
    LeaseExpired => "lease_expired",
    TaskExpired => "task_expired",
});

/// What an agent says about the work a task does; recorded for policy and audit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskContext {
    /// `sha256:<hex>` of the prompt; never the prompt itself.
    pub prompt_digest: Option<String>,
    pub planned_tools: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

impl TaskContext {
    /// The context as JSON, the form the store and the audit trail keep; made once per request
    /// and shared by every event that records it.
    pub fn to_json(&self) -> std::sync::Arc<str> {
        // A struct of strings, a list and a string map always serializes.
        serde_json::to_string(self)
            .expect("a task context serializes")
            .into()
    }

    /// Validates the context fields of a request.
    pub fn parse(
        prompt_digest: &str,
        planned_tools: Vec<String>,
        labels: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let prompt_digest = match prompt_digest {
            "" => None,
            digest => {
                let is_sha256 = digest.strip_prefix("sha256:").is_some_and(|hex| {
                    hex.len() == 64
                        && hex
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                });
                if !is_sha256 {
                    return Err(Error::invalid(
                        "context.prompt_digest",
                        "must be 'sha256:' followed by 64 lowercase hex digits (send the digest, never the prompt)",
                    ));
                }
                Some(digest.to_owned())
            }
        };
        if planned_tools.len() > MAX_PLANNED_TOOLS {
            return Err(Error::invalid(
                "context.planned_tools",
                format!("holds more than {MAX_PLANNED_TOOLS} tools"),
            ));
        }
        for (index, tool) in planned_tools.iter().enumerate() {
            check_text(
                &format!("context.planned_tools[{index}]"),
                tool,
                MAX_TOOL_BYTES,
            )?;
        }
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        if labels.len() > MAX_LABELS {
            return Err(Error::invalid(
                "context.labels",
                format!("holds more than {MAX_LABELS} labels"),
            ));
        }
        for (key, value) in &labels {
            check_text("context.labels", key, MAX_LABEL_KEY_BYTES)?;
            if value.len() > MAX_LABEL_VALUE_BYTES || value.chars().any(char::is_control) {
                return Err(Error::invalid(
                    format!("context.labels[{key}]"),
                    format!(
                        "must be at most {MAX_LABEL_VALUE_BYTES} bytes without control characters"
                    ),
                ));
            }
        }
        Ok(TaskContext {
            prompt_digest,
            planned_tools,
            labels,
        })
    }
}

/// The highest risk signal a caller may send: its guardrail is certain of an attack.
pub const MAX_RISK: u32 = 100;

/// A validated `BeginTask` request.
#[derive(Clone, Debug)]
pub struct NewTask {
    pub purpose: String,
    pub scopes: Vec<ScopeName>,
    pub ttl: Duration,
    pub context: TaskContext,
    pub idempotency_key: Option<String>,
    /// The caller's risk signal for policy (0 to [`MAX_RISK`]); not part of the task.
    pub risk: Option<u32>,
}

/// A validated `RequestGrant` request.
#[derive(Clone, Debug)]
pub struct NewGrant {
    pub task_id: TaskId,
    pub scope: ScopeName,
    /// 0 for the scope's default.
    pub ttl_seconds: u32,
    pub risk: Option<u32>,
}

/// Checks a caller's risk signal (`field` names it).
pub fn parse_risk(field: &str, risk: Option<u32>) -> Result<Option<u32>, Error> {
    match risk {
        Some(risk) if risk > MAX_RISK => Err(Error::invalid(
            field,
            format!("must be from 0 (no risk seen) to {MAX_RISK} (certain attack)"),
        )),
        risk => Ok(risk),
    }
}

impl NewTask {
    /// Validates the fields of a `BeginTask` request; `max_ttl` is the broker's task TTL limit.
    pub fn parse(
        purpose: String,
        scopes: &[String],
        ttl_seconds: u32,
        context: TaskContext,
        idempotency_key: String,
        max_ttl: Duration,
        risk: Option<u32>,
    ) -> Result<Self, Error> {
        let risk = parse_risk("risk", risk)?;
        check_text("purpose", &purpose, MAX_PURPOSE_BYTES)?;
        if scopes.len() > MAX_SCOPES_PER_REQUEST {
            return Err(Error::invalid(
                "scopes",
                format!("holds more than {MAX_SCOPES_PER_REQUEST} scopes"),
            ));
        }
        let mut parsed: Vec<ScopeName> = Vec::with_capacity(scopes.len());
        for (index, text) in scopes.iter().enumerate() {
            let field = format!("scopes[{index}]");
            let scope = ScopeName::parse(&field, text)?;
            if parsed.contains(&scope) {
                return Err(Error::invalid(
                    field,
                    format!("scope '{scope}' is listed twice"),
                ));
            }
            parsed.push(scope);
        }
        let ttl = parse_ttl_seconds("ttl_seconds", ttl_seconds, max_ttl)?.ok_or_else(|| {
            Error::invalid(
                "ttl_seconds",
                "is required (the task's lifetime in seconds)",
            )
        })?;
        let idempotency_key = match idempotency_key.as_str() {
            "" => None,
            key if key.len() > MAX_IDEMPOTENCY_KEY_BYTES
                || !key.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                return Err(Error::invalid(
                    "idempotency_key",
                    format!("must be at most {MAX_IDEMPOTENCY_KEY_BYTES} printable ASCII bytes"),
                ));
            }
            _ => Some(idempotency_key),
        };
        Ok(NewTask {
            purpose,
            scopes: parsed,
            ttl,
            context,
            idempotency_key,
            risk,
        })
    }

    /// A digest of everything the request asks for, so that a retry with the same idempotency
    /// key can be told apart from a different request reusing the key.
    pub fn request_digest(&self) -> String {
        // Keys in sorted order: serde_json keeps insertion order when a dependency turns on
        // its `preserve_order` feature (cedar-policy does), and digests stored before must
        // still match.
        let context = &self.context;
        let canonical = serde_json::json!({
            "context": {
                "labels": context.labels,
                "planned_tools": context.planned_tools,
                "prompt_digest": context.prompt_digest,
            },
            "purpose": self.purpose,
            "scopes": self.scopes.iter().map(ScopeName::as_str).collect::<Vec<_>>(),
            "ttl_seconds": self.ttl.as_secs(),
        });
        super::ids::sha256_hex(canonical.to_string().as_bytes())
    }
}

/// Parses an optional TTL in seconds (0 means "not given"), at most `max`.
pub fn parse_ttl_seconds(
    field: &str,
    seconds: u32,
    max: Duration,
) -> Result<Option<Duration>, Error> {
    let ttl = Duration::from_secs(u64::from(seconds));
    if seconds == 0 {
        Ok(None)
    } else if ttl > max {
        Err(Error::invalid(
            field,
            format!("{seconds}s exceeds the maximum of {}s", max.as_secs()),
        ))
    } else {
        Ok(Some(ttl))
    }
}

/// When a lease ends and how far renewals may push it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseWindow {
    pub issued_at: UnixMillis,
    pub expires_at: UnixMillis,
    /// The lease's hard end: first issuance plus the scope's `max_ttl`, or the task deadline.
    pub renewable_until: UnixMillis,
}

impl LeaseWindow {
    /// The window of a lease issued `now` for `scope` in a task ending at `deadline`.
    /// `requested_ttl` has already been checked against the scope's maximum.
    pub fn new(
        now: UnixMillis,
        scope: &ScopeDefinition,
        requested_ttl: Option<Duration>,
        deadline: UnixMillis,
    ) -> Self {
        let issued_at = now.floor_to_second();
        let renewable_until = issued_at
            .plus(scope.max_ttl)
            .min(deadline)
            .floor_to_second();
        let ttl = requested_ttl.unwrap_or(scope.default_ttl);
        let expires_at = issued_at.plus(ttl).min(renewable_until);
        LeaseWindow {
            issued_at,
            expires_at,
            renewable_until,
        }
    }

    /// The window after renewing at `now` for `ttl`, or `None` when it would not end any later.
    pub fn renewed(self, now: UnixMillis, ttl: Duration) -> Option<Self> {
        let issued_at = now.floor_to_second();
        let expires_at = issued_at.plus(ttl).min(self.renewable_until);
        (expires_at > self.expires_at).then_some(LeaseWindow {
            issued_at,
            expires_at,
            ..self
        })
    }
}

/// Checks a required text field: not empty, at most `max_bytes`, no control characters.
fn check_text(field: &str, text: &str, max_bytes: usize) -> Result<(), Error> {
    if text.trim().is_empty() {
        Err(Error::invalid(field, "is required"))
    } else if text.len() > max_bytes {
        Err(Error::invalid(
            field,
            format!("is longer than {max_bytes} bytes"),
        ))
    } else if text.chars().any(char::is_control) {
        Err(Error::invalid(field, "must not contain control characters"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::scope::{AllowedWorkloads, CredentialKind};

    fn scope(default_secs: u64, max_secs: u64) -> ScopeDefinition {
        ScopeDefinition {
            name: ScopeName::parse("s", "crm:read").unwrap(),
            description: String::new(),
            audience: "aud".into(),
            kind: CredentialKind::Jwt,
            default_ttl: Duration::from_secs(default_secs),
            max_ttl: Duration::from_secs(max_secs),
            allowed_workloads: AllowedWorkloads::Any,
            labels: crate::domain::Labels::default(),
            max_uses: None,
        }
    }

    #[test]
    fn lease_never_outlives_task_deadline() {
        let now = UnixMillis(1_000_000);
        let window = LeaseWindow::new(now, &scope(300, 900), None, UnixMillis(1_060_000));
        assert_eq!(window.expires_at, UnixMillis(1_060_000));
        assert_eq!(window.renewable_until, UnixMillis(1_060_000));
    }

    #[test]
    fn renewal_stops_at_scope_max_ttl_from_first_issuance() {
        let start = UnixMillis(1_000_000);
        let window = LeaseWindow::new(start, &scope(300, 900), None, UnixMillis(10_000_000));
        assert_eq!(window.expires_at, UnixMillis(1_300_000));
        let renewed = window
            .renewed(UnixMillis(1_200_000), Duration::from_secs(300))
            .unwrap();
        assert_eq!(renewed.expires_at, UnixMillis(1_500_000));
        let capped = renewed
            .renewed(UnixMillis(1_800_000), Duration::from_secs(300))
            .unwrap();
        assert_eq!(capped.expires_at, UnixMillis(1_900_000));
        assert_eq!(
            capped.renewed(UnixMillis(1_850_000), Duration::from_secs(300)),
            None
        );
    }

    #[test]
    fn request_digest_changes_with_any_field() {
        let base = NewTask::parse(
            "p".into(),
            &["a:b".into()],
            60,
            TaskContext::default(),
            "k".into(),
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
        let mut other = base.clone();
        other.context.planned_tools.push("crm.search".into());
        assert_ne!(base.request_digest(), other.request_digest());
        assert_eq!(base.request_digest(), base.clone().request_digest());
        // Stored digests must keep matching retries after an upgrade: pinned.
        assert_eq!(
            base.request_digest(),
            "2a6bc2ae030876bdc84bde924877cd0715a9288a59fbf0e8db96747281a8b8e2"
        );
    }

    #[test]
    fn refuses_oversized_and_malformed_task_fields() {
        let max = Duration::from_secs(3600);
        let parse = |purpose: &str, scopes: &[String], ttl: u32| {
            NewTask::parse(
                purpose.into(),
                scopes,
                ttl,
                TaskContext::default(),
                String::new(),
                max,
                None,
            )
        };
        let field_of = |error: Error| match error {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("unexpected {other}"),
        };
        assert_eq!(field_of(parse("", &[], 60).unwrap_err()), "purpose");
        assert_eq!(
            field_of(parse(&"x".repeat(513), &[], 60).unwrap_err()),
            "purpose"
        );
        assert_eq!(field_of(parse("p", &[], 0).unwrap_err()), "ttl_seconds");
        assert_eq!(field_of(parse("p", &[], 3601).unwrap_err()), "ttl_seconds");
        assert_eq!(
            field_of(parse("p", &["a".into(), "a".into()], 60).unwrap_err()),
            "scopes[1]"
        );
        let digest = TaskContext::parse("sha256:abc", vec![], []).unwrap_err();
        assert_eq!(field_of(digest), "context.prompt_digest");
    }
}
