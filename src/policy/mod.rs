//! Policy-as-code: a Cedar policy set decides every grant request, deny by default, and says
//! when a permitted request must first be approved by operators (step-up). The set is parsed
//! and validated once per load; a reload that fails leaves the set in force unchanged.

pub mod decision;
mod index;
pub mod load;
pub mod request;

use std::sync::{Arc, RwLock};

use cedar_policy::{Authorizer, Entities, PolicySet, Request, Response};

pub use decision::{ApprovalRequirement, Decision};
pub use load::{LoadedPolicy, PolicyError, PolicySource, PolicySummary};
pub use request::{GrantQuery, TaskFacts, ToolAction, ToolQuery, UseQuery};

/// The policy set in force, replaceable while requests are being decided.
pub struct PolicyEngine {
    source: PolicySource,
    /// The schema every load validates against (Warrant's, with the catalog's tool arguments).
    schema: Arc<str>,
    current: RwLock<Arc<LoadedPolicy>>,
    /// Serializes reloads, so that each one records the set it replaces and sets publish in
    /// the order they were read.
    reloading: tokio::sync::Mutex<()>,
}

impl PolicyEngine {
    /// Loads the set at `source` against `schema` ([`load::schema_for`]); refusing to start on
    /// a set that does not load.
    pub fn load(source: PolicySource, schema: String) -> Result<Self, PolicyError> {
        let loaded = load::load(&source, &schema)?;
        Ok(PolicyEngine {
            source,
            schema: schema.into(),
            current: RwLock::new(Arc::new(loaded)),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The set in force.
    pub fn current(&self) -> Arc<LoadedPolicy> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the source again (off the async threads), has `record` note the outcome with the
    /// summary of the set in force, and only then publishes a set that loaded: no set decides
    /// before its reload is recorded, and when recording fails the set in force stays. The
    /// outer error is `record`'s; the inner one says why the set was refused.
    pub async fn reload<Record, Recorded>(
        &self,
        record: Record,
    ) -> crate::error::Result<Result<PolicySummary, PolicyError>>
    where
        Record: FnOnce(&Result<PolicySummary, PolicyError>, &PolicySummary) -> Recorded,
        Recorded: std::future::Future<Output = crate::error::Result<()>>,
    {
        let _serialized = self.reloading.lock().await;
        let in_force = self.current();
        let source = self.source.clone();
        let schema = self.schema.clone();
        let loaded = tokio::task::spawn_blocking(move || load::load(&source, &schema))
            .await
            .map_err(crate::error::Error::internal)?;
        let outcome = loaded
            .as_ref()
            .map(|set| set.summary.clone())
            .map_err(Clone::clone);
        record(&outcome, &in_force.summary).await?;
        if let Ok(loaded) = loaded {
            *self
                .current
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
        }
        Ok(outcome)
    }
}

impl LoadedPolicy {
    /// Decides `query`: the decision set first, then, once it allows, the approval rules. A
    /// policy that fails to evaluate denies, since a forbid that errors would otherwise stop
    /// forbidding.
    pub fn decide(&self, query: &GrantQuery<'_>) -> Decision {
        self.decide_request(query.to_cedar(None))
    }

    /// Decides a tool call (or whether a tool may be listed), as [`Self::decide`] a grant.
    pub fn decide_tool(&self, query: &ToolQuery<'_>) -> Decision {
        self.decide_request(query.to_cedar(None))
    }

    /// Decides one use of a token, as [`Self::decide`] a grant.
    pub fn decide_use(&self, query: &UseQuery<'_>) -> Decision {
        self.decide_request(query.to_cedar(None))
    }

    fn decide_request(&self, built: Result<(Request, Entities), String>) -> Decision {
        let (request, entities) = match built {
            Ok(built) => built,
            Err(error) => {
                return Decision::Deny {
                    policies: Vec::new(),
                    reason: format!("the request does not fit the policy schema: {error}"),
                };
            }
        };
        let resource = request.resource();
        let decided = evaluate(&request, self.decisions.for_resource(resource), &entities);
        if let Some(failed) = evaluation_failure(&decided) {
            return failed;
        }
        let policies = determining(&decided);
        if decided.decision() == cedar_policy::Decision::Deny {
            let reason = if policies.is_empty() {
                "no policy permits it (deny by default)".to_owned()
            } else {
                format!("forbidden by policy {}", policies.join(", "))
            };
            return Decision::Deny { policies, reason };
        }
        if self.rules.is_empty() {
            return Decision::Allow { policies };
        }
        let matched = evaluate(&request, self.approvals.for_resource(resource), &entities);
        if let Some(failed) = evaluation_failure(&matched) {
            return failed;
        }
        let mut rules: Vec<_> = matched
            .diagnostics()
            .reason()
            .filter_map(|id| {
                self.rules
                    .get(id)
                    .map(|rule| (id.to_string(), rule.clone()))
            })
            .collect();
        rules.sort_by(|(a, _), (b, _)| a.cmp(b));
        match ApprovalRequirement::combine(rules) {
            Some(requirement) => Decision::StepUp {
                policies,
                requirement,
            },
            None => Decision::Allow { policies },
        }
    }
}

fn evaluate(request: &Request, policies: &PolicySet, entities: &Entities) -> Response {
    Authorizer::new().is_authorized(request, policies, entities)
}

/// A deny naming the policies that failed to evaluate, if any did.
fn evaluation_failure(response: &Response) -> Option<Decision> {
    let errors: Vec<String> = response
        .diagnostics()
        .errors()
        .map(ToString::to_string)
        .collect();
    if errors.is_empty() {
        return None;
    }
    let mut policies: Vec<String> = response
        .diagnostics()
        .errors()
        .map(
            |cedar_policy::AuthorizationError::PolicyEvaluationError(error)| {
                error.policy_id().to_string()
            },
        )
        .collect();
    policies.sort();
    Some(Decision::Deny {
        policies,
        reason: format!("denied because {}", errors.join("; ")),
    })
}

fn determining(response: &Response) -> Vec<String> {
    sorted(response.diagnostics().reason().map(ToString::to_string))
}

fn sorted<T: Ord>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut items: Vec<T> = items.collect();
    items.sort();
    items
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::load::{PolicyFile, from_files};
    use super::*;
    use crate::domain::scope::AllowedWorkloads;
    use crate::domain::{
        Caller, CredentialKind, Labels, Role, ScopeDefinition, ScopeName, SpiffeId, TaskContext,
        UnixMillis, WorkloadName,
    };

    fn set(text: &str) -> Result<LoadedPolicy, PolicyError> {
        from_files(
            vec![PolicyFile {
                name: "fleet.cedar".into(),
                text: text.into(),
            }],
            "test".into(),
            load::BUILT_IN_SCHEMA,
        )
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Labels::parse("labels", owned.iter().map(|(k, v)| (k, v))).unwrap()
    }

    fn decide(
        policy: &LoadedPolicy,
        scope: &str,
        scope_labels: &[(&str, &str)],
        hour: i64,
        risk: Option<u32>,
    ) -> Decision {
        let caller = Caller {
            workload_id: "w".into(),
            name: WorkloadName::parse("name", "billing-agent").unwrap(),
            spiffe_id: SpiffeId::from_stored("spiffe://test/billing-agent".into()),
            roles: vec![Role::Agent],
            audiences: Vec::new(),
            certificate_thumbprint: None,
            labels: labels(&[("team", "billing")]),
        };
        let scope = ScopeDefinition {
            name: ScopeName::parse("scope", scope).unwrap(),
            description: String::new(),
            audience: "https://api".into(),
            kind: CredentialKind::Jwt,
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(600),
            allowed_workloads: AllowedWorkloads::Any,
            labels: labels(scope_labels),
            max_uses: None,
        };
        policy.decide(&GrantQuery {
            caller: &caller,
            scope: &scope,
            facts: TaskFacts {
                purpose: "refund order 42",
                context: &TaskContext::default(),
                requested_ttl: Duration::from_secs(60),
                delegation_depth: 0,
                now: UnixMillis(hour * 3_600_000),
                risk,
            },
        })
    }

    const FLEET: &str = r#"
        @id("reads-are-free")
        permit (principal in Warrant::Role::"agent", action == Warrant::Action::"RequestGrant", resource)
        when { resource.labels.contains("access=read") };

        @id("writes-with-approval")
        permit (principal in Warrant::Role::"agent", action == Warrant::Action::"RequestGrant", resource)
        when { resource.labels.contains("access=write") };

        @id("writes-need-one")
        @approval
        permit (principal, action, resource) when { resource.labels.contains("access=write") };

        @id("payments-need-finance")
        @approval @quorum("2") @approver_label("team=finance") @wait("10m")
        permit (principal, action, resource) when { resource.name like "payments:*" };

        @id("risky-needs-a-human")
        @approval
        permit (principal, action, resource) when { context has risk && context.risk >= 50 };

        forbid (principal, action, resource) when { resource.labels.contains("frozen=true") };
    "#;

    #[test]
    fn decides_allow_deny_and_step_up_naming_the_policies() {
        let policy = set(FLEET).unwrap();
        assert_eq!(
            decide(&policy, "crm:read", &[("access", "read")], 10, None),
            Decision::Allow {
                policies: vec!["reads-are-free".into()]
            }
        );
        match decide(&policy, "tickets:write", &[("access", "write")], 10, None) {
            Decision::StepUp {
                policies,
                requirement,
            } => {
                assert_eq!(policies, ["writes-with-approval"]);
                assert_eq!(requirement.quorum, 1);
                assert_eq!(requirement.rules, ["writes-need-one"]);
            }
            other => panic!("expected a step-up, got {other:?}"),
        }
        match decide(&policy, "payments:refund", &[("access", "write")], 10, None) {
            Decision::StepUp { requirement, .. } => {
                assert_eq!(requirement.quorum, 2);
                assert_eq!(requirement.approver_labels, ["team=finance"]);
                assert_eq!(requirement.wait, Duration::from_secs(600));
            }
            other => panic!("expected a step-up, got {other:?}"),
        }
        // Deny by default: nothing permits a scope without an access label.
        assert_eq!(
            decide(&policy, "misc:do", &[], 10, None),
            Decision::Deny {
                policies: vec![],
                reason: "no policy permits it (deny by default)".into()
            }
        );
        // A forbid wins over a permit, and is named.
        match decide(
            &policy,
            "crm:read",
            &[("access", "read"), ("frozen", "true")],
            10,
            None,
        ) {
            Decision::Deny { policies, .. } => assert_eq!(policies, ["fleet.cedar#6"]),
            other => panic!("expected a deny, got {other:?}"),
        }
    }

    #[test]
    fn policies_naming_one_scope_decide_requests_for_it_and_no_other() {
        let policy = set(r#"
            @id("reads") permit (principal, action, resource) when { resource.labels.contains("access=read") };
            @id("crm-frozen") forbid (principal, action, resource == Warrant::Scope::"crm:read");
            @id("tickets") permit (principal, action, resource == Warrant::Scope::"tickets:write");
            @id("tickets-approval") @approval permit (principal, action, resource == Warrant::Scope::"tickets:write");
        "#)
        .unwrap();
        let read = [("access", "read")];
        match decide(&policy, "crm:read", &read, 10, None) {
            Decision::Deny { policies, .. } => assert_eq!(policies, ["crm-frozen"]),
            other => panic!("expected a deny, got {other:?}"),
        }
        assert!(matches!(
            decide(&policy, "docs:read", &read, 10, None),
            Decision::Allow { .. }
        ));
        match decide(&policy, "tickets:write", &[], 10, None) {
            Decision::StepUp {
                policies,
                requirement,
            } => {
                assert_eq!(policies, ["tickets"]);
                assert_eq!(requirement.rules, ["tickets-approval"]);
            }
            other => panic!("expected a step-up, got {other:?}"),
        }
        assert!(matches!(
            decide(&policy, "misc:write", &[], 10, None),
            Decision::Deny { .. }
        ));
    }

    #[test]
    fn a_risk_signal_turns_a_free_scope_into_a_step_up() {
        let policy = set(FLEET).unwrap();
        let read = [("access", "read")];
        assert!(matches!(
            decide(&policy, "crm:read", &read, 10, Some(10)),
            Decision::Allow { .. }
        ));
        match decide(&policy, "crm:read", &read, 10, Some(80)) {
            Decision::StepUp { requirement, .. } => {
                assert_eq!(requirement.rules, ["risky-needs-a-human"])
            }
            other => panic!("expected a step-up, got {other:?}"),
        }
    }

    #[test]
    fn a_policy_that_fails_to_evaluate_denies() {
        // Validates, then overflows at evaluation: a forbid that errors must still deny.
        let policy = set(r#"
            @id("all")
            permit (principal, action, resource);
            @id("broken-forbid")
            forbid (principal, action, resource) when { context.now * 9223372036854775807 > 0 };
            "#)
        .unwrap();
        match decide(&policy, "crm:read", &[], 10, None) {
            Decision::Deny { policies, reason } => {
                assert_eq!(policies, ["broken-forbid"]);
                assert!(reason.contains("overflow"), "{reason}");
            }
            other => panic!("expected a deny, got {other:?}"),
        }
    }

    #[test]
    fn a_directory_schema_must_be_warrants_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("fleet.cedar"),
            "permit (principal, action, resource);",
        )
        .unwrap();
        std::fs::write(dir.path().join(".#fleet.cedar"), "not cedar at all").unwrap();
        let source = PolicySource::Dir(dir.path().to_owned());
        let schema = dir.path().join(load::SCHEMA_FILE);
        std::fs::write(&schema, format!("// a copy\n{}", load::BUILT_IN_SCHEMA)).unwrap();
        load::load(&source, load::BUILT_IN_SCHEMA)
            .expect("a copy of the schema (and an editor's dotfile) loads");
        let widened = load::BUILT_IN_SCHEMA.replace("entity Role;", "entity Role;\n  entity Team;");
        std::fs::write(&schema, widened).unwrap();
        let error = load::load(&source, load::BUILT_IN_SCHEMA).err().unwrap();
        assert!(
            error.message.contains("differs from Warrant's schema"),
            "{error}"
        );
    }

    #[test]
    fn refuses_sets_that_do_not_validate_naming_file_and_line() {
        let error = set("permit (principal, action, resource) when { context.nope == 1 };")
            .err()
            .unwrap();
        assert!(error.location.starts_with("fleet.cedar:1:"), "{error}");
        assert!(error.message.contains("schema"), "{error}");
        let error = set("permit (principal, action, resource\n").err().unwrap();
        assert!(error.location.starts_with("fleet.cedar:"), "{error}");
        let error = set("@approval\nforbid (principal, action, resource);")
            .err()
            .unwrap();
        assert!(error.message.contains("permit policies only"), "{error}");
        let error = set("@quorum(\"2\")\npermit (principal, action, resource);")
            .err()
            .unwrap();
        assert!(error.message.contains("@quorum"), "{error}");
        let error = set("@id(\"a\") permit (principal, action, resource);\n@id(\"a\") permit (principal, action, resource);").err().unwrap();
        assert!(error.message.contains("used twice"), "{error}");
        let error = set("permit (principal == ?principal, action, resource);")
            .err()
            .unwrap();
        assert!(error.message.contains("template"), "{error}");
    }
}
