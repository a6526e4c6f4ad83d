//! Policies indexed by the scope they name. Cedar evaluates every policy of the set it is
//! given, so a fleet's set of a thousand per-scope permits would cost a thousand evaluations
//! per request; a policy whose head says `resource == Warrant::Scope::"x"` can only match a
//! request for that scope, so each scope gets the set of the policies naming it plus those
//! that name no single scope, built once per load.

use std::collections::HashMap;

use cedar_policy::{EntityUid, PolicySet, ResourceConstraint};

/// A policy set, and for each scope named in a policy head the subset a request for it needs.
pub struct IndexedPolicies {
    all: PolicySet,
    /// The policies that name no single resource.
    general: PolicySet,
    by_resource: HashMap<EntityUid, PolicySet>,
}

impl IndexedPolicies {
    /// Fails only as [`PolicySet::add`] does (on a duplicate id, which `all` cannot hold).
    pub fn new(all: PolicySet) -> Result<Self, String> {
        let add = |set: &mut PolicySet, policy: &cedar_policy::Policy| {
            set.add(policy.clone()).map_err(|error| error.to_string())
        };
        let mut general = PolicySet::new();
        let mut named: HashMap<EntityUid, Vec<cedar_policy::Policy>> = HashMap::new();
        for policy in all.policies() {
            match policy.resource_constraint() {
                ResourceConstraint::Eq(resource) => {
                    named.entry(resource).or_default().push(policy.clone())
                }
                _ => add(&mut general, policy)?,
            }
        }
        let mut by_resource = HashMap::with_capacity(named.len());
        for (resource, policies) in named {
            let mut set = general.clone();
            for policy in &policies {
                add(&mut set, policy)?;
            }
            by_resource.insert(resource, set);
        }
        Ok(IndexedPolicies {
            all,
            general,
            by_resource,
        })
    }

    /// Every policy, for validation and listing.
    pub fn all(&self) -> &PolicySet {
        &self.all
    }

    /// The policies that can match a request for `resource`: the same answer as [`Self::all`]
    /// gives for it, from fewer evaluations.
    pub fn for_resource(&self, resource: Option<&EntityUid>) -> &PolicySet {
        resource
            .and_then(|resource| self.by_resource.get(resource))
            .unwrap_or(&self.general)
    }
}
