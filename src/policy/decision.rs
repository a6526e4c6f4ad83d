//! What policy answers: allow, deny, or allow once humans approve (step-up), with the ids of the
//! policies that decided, and for a step-up who must approve, how many, and for how long the
//! request may wait. The approval requirement is written as annotations on `@approval` policies.

use std::time::Duration;

use crate::domain::Labels;

/// The annotation that marks a policy as an approval rule.
pub const APPROVAL: &str = "approval";
/// How many distinct approvers the rule needs (default 1).
pub const QUORUM: &str = "quorum";
/// A label (`key=value`) every approver must carry, e.g. `team=finance` (default: none).
pub const APPROVER_LABEL: &str = "approver_label";
/// How long the request may wait for its quorum, e.g. `15m` (default [`DEFAULT_WAIT`]).
pub const WAIT: &str = "wait";

/// The annotation keys that only mean something on an `@approval` policy.
pub const REQUIREMENT_KEYS: [&str; 3] = [QUORUM, APPROVER_LABEL, WAIT];
/// A policy's own name.
pub const ID: &str = "id";
/// Every annotation Warrant reads; any other is refused at load, so that a misspelt
/// `@aproval` cannot turn an approval rule into a plain permit.
pub const KNOWN_ANNOTATIONS: [&str; 5] = [ID, APPROVAL, QUORUM, APPROVER_LABEL, WAIT];

/// The most approvers a rule may ask for.
pub const MAX_QUORUM: u32 = 10;
/// How long a request waits when its rule does not say.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(15 * 60);
/// The longest a rule may let a request wait.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The shortest wait a rule may set.
pub const MIN_WAIT: Duration = Duration::from_secs(10);

/// The policy's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// The permit policies that matched.
        policies: Vec<String>,
    },
    Deny {
        /// The forbid policies that matched, or the policies that failed to evaluate; empty
        /// when no policy permits the request (deny by default).
        policies: Vec<String>,
        reason: String,
    },
    /// Allowed once the requirement is met.
    StepUp {
        /// The permit policies that allowed the request.
        policies: Vec<String>,
        requirement: ApprovalRequirement,
    },
}

impl Decision {
    /// `allowed`, `denied` or `step_up`: the audit outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allowed",
            Decision::Deny { .. } => "denied",
            Decision::StepUp { .. } => "step_up",
        }
    }

    /// The ids of the policies that decided.
    pub fn policies(&self) -> Vec<&str> {
        match self {
            Decision::Allow { policies }
            | Decision::Deny { policies, .. }
            | Decision::StepUp { policies, .. } => policies.iter().map(String::as_str).collect(),
        }
    }
}

/// Who must approve a stepped-up request, and by when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRequirement {
    /// Distinct operators needed.
    pub quorum: u32,
    /// Labels (`key=value`) every approver must carry besides the `operator` role, sorted.
    pub approver_labels: Vec<String>,
    /// How long the request may wait.
    pub wait: Duration,
    /// The `@approval` policies that asked for it.
    pub rules: Vec<String>,
}

impl ApprovalRequirement {
    /// The strictest combination of several rules that matched: the largest quorum, every
    /// label any rule names, the shortest wait.
    pub fn combine(rules: impl IntoIterator<Item = (String, ApprovalRule)>) -> Option<Self> {
        let mut combined: Option<ApprovalRequirement> = None;
        for (id, rule) in rules {
            let entry = combined.get_or_insert_with(|| ApprovalRequirement {
                quorum: 0,
                approver_labels: Vec::new(),
                wait: MAX_WAIT,
                rules: Vec::new(),
            });
            entry.quorum = entry.quorum.max(rule.quorum);
            entry.wait = entry.wait.min(rule.wait);
            if let Some(label) = rule.approver_label
                && !entry.approver_labels.contains(&label)
            {
                entry.approver_labels.push(label);
                entry.approver_labels.sort();
            }
            entry.rules.push(id);
        }
        combined
    }

    /// Says what is needed, for an error message or a console.
    pub fn describe(&self) -> String {
        let from = if self.approver_labels.is_empty() {
            "operators".to_owned()
        } else {
            format!("operators with {}", self.approver_labels.join(", "))
        };
        format!(
            "{} approval(s) from {from} within {}",
            self.quorum,
            humantime::format_duration(self.wait)
        )
    }
}

/// One `@approval` policy's requirement, read from its annotations when the set loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRule {
    pub quorum: u32,
    /// `key=value`
    pub approver_label: Option<String>,
    pub wait: Duration,
}

impl ApprovalRule {
    /// Reads the requirement annotations (`annotation` looks one up by key); the error names
    /// the annotation.
    pub fn from_annotations<'a>(
        annotation: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Self, String> {
        let quorum = match annotation(QUORUM) {
            None => 1,
            Some(text) => match text.parse::<u32>() {
                Ok(quorum @ 1..=MAX_QUORUM) => quorum,
                _ => {
                    return Err(format!(
                        "@{QUORUM}(\"{text}\") must be a whole number from 1 to {MAX_QUORUM}"
                    ));
                }
            },
        };
        let approver_label = match annotation(APPROVER_LABEL) {
            None => None,
            Some(text) => {
                let (key, value) = text.split_once('=').ok_or_else(|| {
                    format!("@{APPROVER_LABEL}(\"{text}\") must be key=value, e.g. team=finance")
                })?;
                let (key, value) = (key.to_owned(), value.to_owned());
                Labels::parse(APPROVER_LABEL, [(&key, &value)])
                    .map_err(|error| format!("@{APPROVER_LABEL}: {error}"))?;
                Some(text.to_owned())
            }
        };
        let wait = match annotation(WAIT) {
            None => DEFAULT_WAIT,
            Some(text) => humantime::parse_duration(text)
                .ok()
                .filter(|wait| (MIN_WAIT..=MAX_WAIT).contains(wait))
                .ok_or_else(|| {
                    format!(
                        "@{WAIT}(\"{text}\") must be a duration from {} to {}, e.g. \"15m\"",
                        humantime::format_duration(MIN_WAIT),
                        humantime::format_duration(MAX_WAIT)
                    )
                })?,
        };
        Ok(ApprovalRule {
            quorum,
            approver_label,
            wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(annotations: &[(&str, &str)]) -> Result<ApprovalRule, String> {
        ApprovalRule::from_annotations(|key| {
            annotations
                .iter()
                .find(|(name, _)| *name == key)
                .map(|(_, value)| *value)
        })
    }

    #[test]
    fn reads_requirement_annotations_with_defaults() {
        assert_eq!(
            rule(&[]).unwrap(),
            ApprovalRule {
                quorum: 1,
                approver_label: None,
                wait: DEFAULT_WAIT
            }
        );
        let strict = rule(&[
            (QUORUM, "2"),
            (APPROVER_LABEL, "team=finance"),
            (WAIT, "10m"),
        ])
        .unwrap();
        assert_eq!(strict.quorum, 2);
        assert_eq!(strict.approver_label.as_deref(), Some("team=finance"));
        assert_eq!(strict.wait, Duration::from_secs(600));
    }

    #[test]
    fn refuses_malformed_annotations_naming_them() {
        for (annotations, named) in [
            (vec![(QUORUM, "0")], "@quorum"),
            (vec![(QUORUM, "eleven")], "@quorum"),
            (vec![(APPROVER_LABEL, "finance")], "@approver_label"),
            (vec![(APPROVER_LABEL, "Team=x")], "@approver_label"),
            (vec![(WAIT, "2s")], "@wait"),
            (vec![(WAIT, "3d")], "@wait"),
        ] {
            let error = rule(&annotations).unwrap_err();
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn combines_rules_into_the_strictest_requirement() {
        let combined = ApprovalRequirement::combine([
            ("writes".to_owned(), rule(&[(WAIT, "1h")]).unwrap()),
            (
                "payments".to_owned(),
                rule(&[
                    (QUORUM, "2"),
                    (APPROVER_LABEL, "team=finance"),
                    (WAIT, "2h"),
                ])
                .unwrap(),
            ),
        ])
        .unwrap();
        assert_eq!(combined.quorum, 2);
        assert_eq!(combined.wait, Duration::from_secs(3600));
        assert_eq!(combined.approver_labels, ["team=finance"]);
        assert_eq!(combined.rules, ["writes", "payments"]);
        assert!(ApprovalRequirement::combine([]).is_none());
    }
}
