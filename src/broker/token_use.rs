//! The checks introspection makes at each use of a genuine, live token: the use limit of its
//! scope (`max_uses`, a call token's one call) and, when the resource server says what it is
//! about to do, the policy set's `UseToken` decision for the token's holder. A token that passes
//! them is active for this one use; the audit event of the introspection records both.

use std::borrow::Cow;

use super::Broker;
use crate::audit::AuditEvent;
use crate::domain::tool::CALL_SCOPE_PREFIX;
use crate::domain::{
    Caller, LeaseId, ScopeDefinition, ScopeName, TaskId, UnixMillis, WorkloadName,
};
use crate::error::{Error, Result};
use crate::issuer::jwt::AccessTokenClaims;
use crate::policy::{Decision, LoadedPolicy, TaskFacts, UseQuery};

/// The longest `action` a resource server may name.
pub const MAX_USE_ACTION_BYTES: usize = 256;
/// The longest `resource` a resource server may name.
pub const MAX_USE_RESOURCE_BYTES: usize = 1024;

/// What a resource server is about to do with a token, in its own words: the `UseToken`
/// decision reads it as `context.use_action` and `context.use_resource`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntendedUse {
    pub action: String,
    pub resource: String,
}

impl IntendedUse {
    /// The intended use an introspection names, if any: none when both fields are empty; a
    /// resource needs its action.
    pub fn parse(action: &str, resource: &str) -> Result<Option<Self>> {
        if action.is_empty() {
            return match resource.is_empty() {
                true => Ok(None),
                false => Err(Error::invalid(
                    "action",
                    "is required when resource is given: policy decides an action on a resource",
                )),
            };
        }
        check_text("action", action, MAX_USE_ACTION_BYTES)?;
        check_text("resource", resource, MAX_USE_RESOURCE_BYTES)?;
        Ok(Some(IntendedUse {
            action: action.to_owned(),
            resource: resource.to_owned(),
        }))
    }
}

fn check_text(field: &str, text: &str, limit: usize) -> Result<()> {
    if text.len() > limit {
        Err(Error::invalid(
            field,
            format!("is longer than {limit} bytes"),
        ))
    } else if text.chars().any(char::is_control) {
        Err(Error::invalid(field, "may not hold control characters"))
    } else {
        Ok(())
    }
}

/// Why introspection found a token inactive, with its claims when they were verified (a genuine
/// token whose lease has ended, or whose use was refused); never the claims of a forged or
/// malformed token.
pub(super) struct Inactive {
    pub reason: Cow<'static, str>,
    pub verified_claims: Option<AccessTokenClaims>,
    /// Whether a check of this use refused a genuine, live token (its use limit, policy): the
    /// one reason the caller is told. Any other inactive token is answered without a reason,
    /// as RFC 7662 advises, so introspection reveals nothing of the broker's state.
    pub refused_use: bool,
}

impl Inactive {
    pub fn because(reason: &'static str) -> Self {
        Inactive {
            reason: Cow::Borrowed(reason),
            verified_claims: None,
            refused_use: false,
        }
    }

    pub fn of(claims: AccessTokenClaims, reason: impl Into<Cow<'static, str>>) -> Self {
        Inactive {
            reason: reason.into(),
            verified_claims: Some(claims),
            refused_use: false,
        }
    }

    /// A genuine, live token whose use a check refused, for `reason`.
    fn refused_use(claims: AccessTokenClaims, reason: impl Into<Cow<'static, str>>) -> Self {
        Inactive {
            refused_use: true,
            ..Inactive::of(claims, reason)
        }
    }
}

/// What the audit trail keeps of a `UseToken` decision, as of a grant's.
pub(super) struct UseDecision {
    pub outcome: &'static str,
    pub policies: Vec<String>,
    /// The version of the policy set that decided.
    pub version: String,
}

/// What the audit event of an introspection records of the use checks.
#[derive(Default)]
pub(super) struct UseNotes {
    /// The `UseToken` decision, when policy was asked.
    pub policy: Option<UseDecision>,
    /// The uses counted so far, this one included, for a limited lease.
    pub uses: Option<u32>,
}

impl UseNotes {
    /// Adds what was checked to the introspection's audit `event`.
    pub fn annotate(&self, mut event: AuditEvent, intended: Option<&IntendedUse>) -> AuditEvent {
        if let Some(intended) = intended {
            event = event
                .with("use_action", intended.action.as_str())
                .with("use_resource", intended.resource.as_str());
        }
        if let Some(decision) = &self.policy {
            event = event
                .with("use_decision", decision.outcome)
                .with("policies", decision.policies.clone())
                .with("policy_version", decision.version.as_str());
        }
        if let Some(uses) = self.uses {
            event = event.with("uses", uses);
        }
        event
    }
}

impl Broker {
    /// Checks one use of a genuine, live token: its call binding (for a call token), the
    /// `UseToken` policy for `intended` (not for a call token, whose call was decided when it
    /// was authorized), then its scope's use limit, counted last so that a refused use does not
    /// consume one.
    pub(super) async fn check_use(
        &self,
        checked_by: &Caller,
        claims: AccessTokenClaims,
        intended: Option<&IntendedUse>,
    ) -> Result<(std::result::Result<AccessTokenClaims, Inactive>, UseNotes)> {
        let mut notes = UseNotes::default();
        let definition = ScopeName::parse("scope", &claims.scope)
            .ok()
            .and_then(|scope| self.catalog.lease_definition(&scope));
        let Some(definition) = definition else {
            // The catalog no longer defines it, so its limits are unknown: refused.
            return Ok((
                Err(Inactive::of(claims, "scope is not in the broker's catalog")),
                notes,
            ));
        };
        let is_call_token = claims.scope.starts_with(CALL_SCOPE_PREFIX);
        if is_call_token && (claims.tool.is_none() || claims.arguments_digest.is_none()) {
            return Ok((
                Err(Inactive::of(
                    claims,
                    "call token without its tool and arguments",
                )),
                notes,
            ));
        }
        if let Some(intended) = intended.filter(|_| !is_call_token) {
            let policy = self.policy.current();
            let decision = self
                .decide_use(checked_by, &claims, definition, intended, &policy)
                .await?;
            self.count_decision(&decision);
            notes.policy = Some(UseDecision {
                outcome: decision.outcome(),
                policies: decision.policies().into_iter().map(str::to_owned).collect(),
                version: policy.summary.version().to_owned(),
            });
            let refusal = match decision {
                Decision::Allow { .. } => None,
                Decision::Deny { reason, .. } => Some(format!("policy denies this use: {reason}")),
                Decision::StepUp { .. } => Some(
                    "policy wants operators to approve this use, and a use cannot wait: ask \
                     for the grant again"
                        .to_owned(),
                ),
            };
            if let Some(reason) = refusal {
                return Ok((Err(Inactive::refused_use(claims, reason)), notes));
            }
        }
        if let Some(max_uses) = definition.max_uses {
            let Ok(lease_id) = LeaseId::parse("jti", &claims.jti) else {
                return Ok((Err(Inactive::of(claims, "jti is not an id")), notes));
            };
            let counted = self
                .timed(
                    "count_lease_use",
                    self.store
                        .count_lease_use(&lease_id, max_uses, UnixMillis::now()),
                )
                .await?;
            match counted {
                Some(uses) => notes.uses = Some(uses),
                None if is_call_token => {
                    return Ok((
                        Err(Inactive::refused_use(claims, "call token already used")),
                        notes,
                    ));
                }
                None => {
                    return Ok((
                        Err(Inactive::refused_use(
                            claims,
                            format!(
                                "use limit reached: the scope allows {max_uses} uses of a lease"
                            ),
                        )),
                        notes,
                    ));
                }
            }
        }
        Ok((Ok(claims), notes))
    }

    /// The `UseToken` decision for the token's holder, with the task it was issued to.
    async fn decide_use(
        &self,
        checked_by: &Caller,
        claims: &AccessTokenClaims,
        definition: &ScopeDefinition,
        intended: &IntendedUse,
        policy: &LoadedPolicy,
    ) -> Result<Decision> {
        let deny = |reason: &str| Decision::Deny {
            policies: Vec::new(),
            reason: reason.to_owned(),
        };
        let holder = match WorkloadName::parse("client_id", &claims.client_id) {
            Ok(name) => self.store.find_workload(&name).await?,
            Err(_) => None,
        };
        let Some(holder) = holder else {
            return Ok(deny("the token's holder is no longer registered"));
        };
        let task = match TaskId::parse("task_id", &claims.task_id) {
            Ok(task_id) => self.store.find_task(&task_id, &holder.id).await?,
            Err(_) => None,
        };
        let Some(task) = task else {
            return Ok(deny("the token's task is not its holder's"));
        };
        let holder = holder.into_caller(claims.cnf.as_ref().map(|cnf| cnf.x5t_s256.clone()));
        let lifetime = u64::try_from(claims.exp.saturating_sub(claims.iat)).unwrap_or(0);
        let query = UseQuery {
            holder: &holder,
            scope: definition,
            facts: TaskFacts {
                purpose: &task.purpose,
                context: &task.context,
                requested_ttl: std::time::Duration::from_secs(lifetime),
                delegation_depth: 0,
                now: UnixMillis::now(),
                risk: None,
            },
            action: &intended.action,
            resource: &intended.resource,
            checked_by: checked_by.name.as_str(),
        };
        Ok(policy.decide_use(&query))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intended_use_names_its_action() {
        assert_eq!(IntendedUse::parse("", "").unwrap(), None);
        let parsed = IntendedUse::parse("invoices.read", "invoice/42").unwrap();
        assert_eq!(parsed.unwrap().resource, "invoice/42");
        for (action, resource, field) in [
            ("", "invoice/42", "action"),
            ("a\nb", "", "action"),
            ("read", &"r".repeat(MAX_USE_RESOURCE_BYTES + 1), "resource"),
        ] {
            let error = IntendedUse::parse(action, resource).unwrap_err();
            assert!(error.to_string().starts_with(field), "{error}");
        }
    }
}
