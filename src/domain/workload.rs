//! Who is calling: workload names, roles, SPIFFE IDs, and the authenticated caller.

use std::fmt;

use super::labels::Labels;
use crate::error::Error;

/// A workload's registered name: 1 to 64 bytes of `a-z`, `0-9`, `-`, `_`, `.`, starting with a
/// letter or digit. It is the last segment of the workload's SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadName(String);

impl WorkloadName {
    pub fn parse(field: &str, text: &str) -> Result<Self, Error> {
        let is_allowed =
            |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
        match text.as_bytes().first() {
            None => Err(Error::invalid(field, "is required")),
            Some(_) if text.len() > 64 => Err(Error::invalid(field, "is longer than 64 bytes")),
            Some(first) if !first.is_ascii_lowercase() && !first.is_ascii_digit() => Err(
                Error::invalid(field, "must start with a lowercase letter or a digit"),
            ),
            Some(_) if !text.bytes().all(is_allowed) => Err(Error::invalid(
                field,
                "may hold only lowercase letters, digits, '-', '_' and '.'",
            )),
            Some(_) => Ok(WorkloadName(text.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkloadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE trust domain name (the host part of a SPIFFE ID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Accepts what the SPIFFE ID specification allows: lowercase letters, digits, `.`, `-`
    /// and `_`, at most 255 bytes.
    pub fn parse(field: &str, text: &str) -> Result<Self, Error> {
        let is_allowed =
            |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
        if text.is_empty() || text.len() > 255 || !text.bytes().all(is_allowed) {
            return Err(Error::invalid(
                field,
                "must be 1 to 255 bytes of lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        Ok(TrustDomain(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A SPIFFE ID (`spiffe://<trust domain>/<path>`), the `sub` of every token a workload receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// The identity Warrant gives a workload registered under `name`.
    pub fn for_workload(trust_domain: &TrustDomain, name: &WorkloadName) -> Self {
        SpiffeId(format!(
            "spiffe://{}/workload/{}",
            trust_domain.as_str(),
            name
        ))
    }

    /// Parses a SPIFFE ID by the rules of the SPIFFE ID specification: the `spiffe` scheme, a
    /// trust domain of lowercase letters, digits, `.`, `-` and `_`, no port, user info, query
    /// or fragment, and a path of non-empty segments of letters, digits, `.`, `-` and `_`
    /// other than `.` and `..`, without a trailing `/`; at most 2048 bytes. Warrant issues
    /// identities of its own trust domain only, so `trust_domain` must be the host.
    pub fn parse(field: &str, text: &str, trust_domain: &TrustDomain) -> Result<Self, Error> {
        let bad = |why: &str| Err(Error::invalid(field, why.to_owned()));
        if text.len() > 2048 {
            return bad("is longer than 2048 bytes");
        }
        let Some(rest) = text.strip_prefix("spiffe://") else {
            return bad("must start with 'spiffe://' (lowercase)");
        };
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if TrustDomain::parse(field, host).is_err() {
            return bad(
                "has a trust domain other than 1 to 255 bytes of lowercase letters, digits, '.', \
                 '-' and '_' (no port, user info or upper case)",
            );
        }
        if host != trust_domain.as_str() {
            return Err(Error::invalid(
                field,
                format!(
                    "must be in this broker's trust domain '{}'",
                    trust_domain.as_str()
                ),
            ));
        }
        let Some(path) = path.strip_prefix('/') else {
            return bad("needs a path: a workload's ID is spiffe://<trust domain>/<path>");
        };
        let is_allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_.".contains(&b);
        for segment in path.split('/') {
            if segment.is_empty() {
                return bad("has an empty path segment (or a trailing '/')");
            }
            if segment == "." || segment == ".." {
                return bad("has a '.' or '..' path segment");
            }
            if !segment.bytes().all(is_allowed) {
                return bad(
                    "has a path character other than letters, digits, '.', '-' and '_' \
                     (no query, fragment or percent-encoding)",
                );
            }
        }
        Ok(SpiffeId(text.to_owned()))
    }

    pub fn from_stored(text: String) -> Self {
        SpiffeId(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a workload may do at the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Opens tasks and receives credentials.
    Agent,
    /// Registers workloads, revokes, rotates keys.
    Admin,
    /// A human who approves high-risk grants. The approval service that this role calls comes
    /// with approvals; until then it may call nothing but `RenewSvid`.
    Operator,
    /// A downstream API: introspects tokens of its own audiences and follows the revocation
    /// feed filtered to them, nothing else.
    ResourceServer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::ResourceServer => "resource_server",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "agent" => Some(Role::Agent),
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "resource_server" => Some(Role::ResourceServer),
            _ => None,
        }
    }
}

/// An authenticated caller, as established by the gRPC authentication layer.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The workload's row id in the store.
    pub workload_id: String,
    pub name: WorkloadName,
    pub spiffe_id: SpiffeId,
    pub roles: Vec<Role>,
    /// The audiences it serves as a `resource_server`.
    pub audiences: Vec<String>,
    /// The thumbprint of the X.509-SVID it authenticated with; `None` for a bearer credential.
    pub certificate_thumbprint: Option<String>,
    /// Its entry's labels, for policy.
    pub labels: Labels,
}

impl Caller {
    /// Whether the caller serves `audience` as a resource server.
    pub fn serves(&self, audience: &str) -> bool {
        self.roles.contains(&Role::ResourceServer)
            && self.audiences.iter().any(|served| served == audience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_are_restricted_to_spiffe_path_safe_characters() {
        assert!(WorkloadName::parse("name", "crm-agent.v2_1").is_ok());
        for bad in ["", "-lead", "Upper", "has space", "slash/", &"a".repeat(65)] {
            let error = WorkloadName::parse("name", bad).unwrap_err();
            assert!(error.to_string().starts_with("name: "), "{error}");
        }
    }

    #[test]
    fn spiffe_ids_follow_the_specification() {
        let domain = TrustDomain::parse("trust_domain", "example.org").unwrap();
        for good in [
            "spiffe://example.org/a",
            "spiffe://example.org/ns/prod/sa/Crm-Agent_1.v2",
        ] {
            assert!(
                SpiffeId::parse("spiffe_id", good, &domain).is_ok(),
                "{good}"
            );
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(2030));
        for bad in [
            "",
            "SPIFFE://example.org/a",
            "https://example.org/a",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a/",
            "spiffe://example.org//a",
            "spiffe://example.org/./a",
            "spiffe://example.org/a/..",
            "spiffe://example.org/a?b",
            "spiffe://example.org/a#b",
            "spiffe://example.org/a%20b",
            "spiffe://Example.org/a",
            "spiffe://example.org:443/a",
            "spiffe://user@example.org/a",
            "spiffe://other.org/a",
            long.as_str(),
        ] {
            let error = SpiffeId::parse("spiffe_id", bad, &domain).unwrap_err();
            assert!(
                error.to_string().starts_with("spiffe_id: "),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn workload_spiffe_id_uses_trust_domain_and_name() {
        let domain = TrustDomain::parse("trust_domain", "example.org").unwrap();
        let name = WorkloadName::parse("name", "crm-agent").unwrap();
        assert_eq!(
            SpiffeId::for_workload(&domain, &name).as_str(),
            "spiffe://example.org/workload/crm-agent"
        );
    }
}
