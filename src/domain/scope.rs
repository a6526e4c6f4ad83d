//! The scope catalog: which scopes exist, which audience and lifetime each has, and which
//! workloads may ask for it. Anything not in the catalog is refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::labels::Labels;
use super::tool::{ArgumentType, CALL_SCOPE_PREFIX, ToolDefinition, ToolEntry};
use super::workload::{Caller, WorkloadName};
use crate::error::Error;

/// The longest lifetime any scope may declare: tokens are meant to be short-lived.
pub const LONGEST_SCOPE_TTL: Duration = Duration::from_secs(24 * 3600);

/// A scope name such as `crm.contacts:read`: 1 to 128 bytes of letters, digits and `._:-/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeName(String);

impl ScopeName {
    pub fn parse(field: &str, text: &str) -> Result<Self, Error> {
        let is_allowed = |b: u8| b.is_ascii_alphanumeric() || b"._:-/".contains(&b);
        if text.is_empty() {
            Err(Error::invalid(field, "is required"))
        } else if text.len() > 128 {
            Err(Error::invalid(field, "is longer than 128 bytes"))
        } else if !text.bytes().all(is_allowed) {
            Err(Error::invalid(
                field,
                "may hold only letters, digits and '.', '_', ':', '-', '/'",
            ))
        } else {
            Ok(ScopeName(text.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScopeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of secret a scope's lease carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// An RFC 9068 access token signed by the broker.
    Jwt,
    /// An opaque key ([`crate::issuer::api_key`]), handed out once, checked by introspection.
    ApiKey,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Jwt => "jwt",
            CredentialKind::ApiKey => "api_key",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "jwt" => Some(CredentialKind::Jwt),
            "api_key" => Some(CredentialKind::ApiKey),
            _ => None,
        }
    }
}

/// Which workloads may request a scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedWorkloads {
    /// Any workload with the agent role (`workloads = ["*"]`).
    Any,
    /// Only the named workloads.
    Named(BTreeSet<WorkloadName>),
}

/// One scope of the catalog.
#[derive(Clone, Debug)]
pub struct ScopeDefinition {
    pub name: ScopeName,
    pub description: String,
    /// The downstream API the credential is for: the token's `aud`.
    pub audience: String,
    pub kind: CredentialKind,
    /// Lifetime of a lease when the request names none.
    pub default_ttl: Duration,
    /// Longest lifetime of a lease, counted from its first issuance, renewals included.
    pub max_ttl: Duration,
    pub allowed_workloads: AllowedWorkloads,
    /// What policy reads of it (`labels = { access = "write" }`).
    pub labels: Labels,
    /// How many times introspection accepts one lease's credential; `None` for no limit. Each
    /// accepted introspection counts as one use, exactly, across replicas.
    pub max_uses: Option<u32>,
}

/// The parsed scope catalog, built once at start and shared.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    scopes: HashMap<ScopeName, ScopeDefinition>,
    tools: HashMap<String, ToolDefinition>,
    /// Every argument any tool declares, with its type: what `context.arguments` holds in the
    /// policy schema (one name has one type across the catalog).
    tool_arguments: BTreeMap<String, ArgumentType>,
}

/// An invalid catalog file: `field` names the entry and key, such as `scope[2].max_ttl`.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CatalogError {
    pub field: String,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    scope: Vec<ScopeEntry>,
    #[serde(default)]
    tool: Vec<ToolEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeEntry {
    name: String,
    #[serde(default)]
    description: String,
    audience: String,
    kind: String,
    default_ttl: String,
    max_ttl: String,
    workloads: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    max_uses: Option<i64>,
}

/// The largest `max_uses` a scope may declare.
pub const LARGEST_MAX_USES: u32 = 1_000_000;

impl Catalog {
    /// Parses a catalog in TOML (see `deploy/scopes.toml` for an annotated example).
    pub fn from_toml(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile = toml::from_str(text).map_err(|error| CatalogError {
            field: "catalog".into(),
            message: error.to_string(),
        })?;
        let mut scopes = HashMap::new();
        for (index, entry) in file.scope.into_iter().enumerate() {
            let definition = entry.into_definition(index)?;
            if let Some(previous) = scopes.insert(definition.name.clone(), definition) {
                return Err(CatalogError {
                    field: format!("scope[{index}].name"),
                    message: format!("scope '{}' is defined twice", previous.name),
                });
            }
        }
        let mut tools = HashMap::new();
        let mut tool_arguments = BTreeMap::new();
        for (index, entry) in file.tool.into_iter().enumerate() {
            let definition = entry.into_definition(index)?;
            for (name, spec) in &definition.arguments {
                match tool_arguments.insert(name.clone(), spec.kind) {
                    Some(other) if other != spec.kind => {
                        return Err(CatalogError {
                            field: format!("tool[{index}].arguments.{name}"),
                            message: format!(
                                "is a {} here and a {} in another tool: policy reads every \
                                 tool's arguments as context.arguments, so one name has one type",
                                spec.kind.cedar_type(),
                                other.cedar_type()
                            ),
                        });
                    }
                    _ => {}
                }
            }
            if let Some(previous) = tools.insert(definition.name.clone(), definition) {
                return Err(CatalogError {
                    field: format!("tool[{index}].name"),
                    message: format!("tool '{}' is defined twice", previous.name),
                });
            }
        }
        Ok(Catalog {
            scopes,
            tools,
            tool_arguments,
        })
    }

    /// Looks tool `name` up and checks that `caller` may call it.
    pub fn authorize_tool(&self, caller: &Caller, name: &str) -> Result<&ToolDefinition, Error> {
        let definition = self.tools.get(name).ok_or_else(|| {
            Error::invalid(
                "tool",
                format!(
                    "unknown tool '{}'",
                    name.chars().take(64).collect::<String>()
                ),
            )
        })?;
        match &definition.allowed_workloads {
            AllowedWorkloads::Any => Ok(definition),
            AllowedWorkloads::Named(names) if names.contains(&caller.name) => Ok(definition),
            AllowedWorkloads::Named(_) => Err(Error::PermissionDenied(format!(
                "tool: workload '{}' may not call tool '{name}': the catalog does not list it \
                 among the tool's workloads",
                caller.name
            ))),
        }
    }

    /// The definition of tool `name`, if the catalog has it.
    pub fn tool(&self, name: &str) -> Option<&ToolDefinition> {
        self.tools.get(name)
    }

    /// The tools, by name.
    pub fn tools(&self) -> impl Iterator<Item = &ToolDefinition> {
        let mut tools: Vec<_> = self.tools.values().collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        tools.into_iter()
    }

    /// Every argument a tool declares, with its type.
    pub fn tool_arguments(&self) -> &BTreeMap<String, ArgumentType> {
        &self.tool_arguments
    }

    /// What a lease named `scope` is issued as: the catalog scope, or the call scope of a tool
    /// (`tool:<name>`).
    pub fn lease_definition(&self, scope: &ScopeName) -> Option<&ScopeDefinition> {
        match scope.as_str().strip_prefix(CALL_SCOPE_PREFIX) {
            Some(tool) => self.tools.get(tool).map(|tool| &tool.call_scope),
            None => self.scopes.get(scope),
        }
    }

    /// Looks `scope` up and checks that `caller` may request it. `field` names the request field
    /// that carried the scope, for the error message.
    pub fn authorize(
        &self,
        caller: &Caller,
        field: &str,
        scope: &ScopeName,
    ) -> Result<&ScopeDefinition, Error> {
        let definition = self
            .scopes
            .get(scope)
            .ok_or_else(|| Error::invalid(field, format!("unknown scope '{scope}'")))?;
        match &definition.allowed_workloads {
            AllowedWorkloads::Any => Ok(definition),
            AllowedWorkloads::Named(names) if names.contains(&caller.name) => Ok(definition),
            AllowedWorkloads::Named(_) => Err(Error::PermissionDenied(format!(
                "{field}: workload '{}' may not request scope '{scope}': the catalog does not \
                 list it among the scope's workloads",
                caller.name
            ))),
        }
    }

    /// Whether some scope of the catalog issues tokens for `audience`.
    pub fn has_audience(&self, audience: &str) -> bool {
        self.scopes.values().any(|scope| scope.audience == audience)
            || self.tools.values().any(|tool| tool.audience == audience)
    }

    /// The definition of `scope`, if the catalog has it.
    pub fn get(&self, scope: &ScopeName) -> Option<&ScopeDefinition> {
        self.scopes.get(scope)
    }

    /// Whether the catalog defines `scope`.
    pub fn contains(&self, scope: &ScopeName) -> bool {
        self.scopes.contains_key(scope)
    }

    /// The longest `max_ttl` of any scope: how long a token signed now may remain valid.
    pub fn longest_max_ttl(&self) -> Duration {
        self.scopes
            .values()
            .chain(self.tools.values().map(|tool| &tool.call_scope))
            .map(|scope| scope.max_ttl)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

impl ScopeEntry {
    fn into_definition(self, index: usize) -> Result<ScopeDefinition, CatalogError> {
        let field = |key: &str| format!("scope[{index}].{key}");
        let fail = |key: &str, message: String| CatalogError {
            field: field(key),
            message,
        };
        let name = ScopeName::parse(&field("name"), &self.name)
            .map_err(|error| fail("name", error_message(error)))?;
        if self.name.starts_with(CALL_SCOPE_PREFIX) {
            return Err(fail(
                "name",
                format!("'{CALL_SCOPE_PREFIX}' names the call tokens of tools; pick another name"),
            ));
        }
        if self.audience.is_empty() || self.audience.len() > 512 {
            return Err(fail("audience", "must be 1 to 512 bytes".into()));
        }
        let kind = CredentialKind::parse(&self.kind).ok_or_else(|| {
            fail(
                "kind",
                format!(
                    "'{}' is not a credential kind (supported: jwt, api_key)",
                    self.kind
                ),
            )
        })?;
        let default_ttl =
            parse_ttl(&self.default_ttl).map_err(|message| fail("default_ttl", message))?;
        let max_ttl = parse_ttl(&self.max_ttl).map_err(|message| fail("max_ttl", message))?;
        if default_ttl > max_ttl {
            return Err(fail("default_ttl", "is longer than max_ttl".into()));
        }
        let allowed_workloads = parse_workloads(&field, &self.workloads)?;
        let labels = Labels::parse(&field("labels"), &self.labels)
            .map_err(|error| fail("labels", error_message(error)))?;
        let max_uses = self
            .max_uses
            .map(|uses| {
                u32::try_from(uses)
                    .ok()
                    .filter(|uses| (1..=LARGEST_MAX_USES).contains(uses))
                    .ok_or_else(|| {
                        fail(
                            "max_uses",
                            format!("must be 1 to {LARGEST_MAX_USES} (leave it out for no limit)"),
                        )
                    })
            })
            .transpose()?;
        Ok(ScopeDefinition {
            name,
            description: self.description,
            audience: self.audience,
            kind,
            default_ttl,
            max_ttl,
            allowed_workloads,
            labels,
            max_uses,
        })
    }
}

/// Who may ask for a catalog entry: `["*"]` for every agent, else the names listed.
pub(super) fn parse_workloads(
    field: &dyn Fn(&str) -> String,
    workloads: &[String],
) -> Result<AllowedWorkloads, CatalogError> {
    if workloads == ["*"] {
        return Ok(AllowedWorkloads::Any);
    }
    if workloads.is_empty() {
        return Err(CatalogError {
            field: field("workloads"),
            message: "must list workload names or be [\"*\"]".into(),
        });
    }
    let mut names = BTreeSet::new();
    for (position, text) in workloads.iter().enumerate() {
        let key = field(&format!("workloads[{position}]"));
        let name = WorkloadName::parse(&key, text).map_err(|error| CatalogError {
            field: key.clone(),
            message: error_message(error),
        })?;
        names.insert(name);
    }
    Ok(AllowedWorkloads::Named(names))
}

pub(super) fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text)
        .map_err(|error| format!("'{text}' is not a duration such as \"5m\" ({error})"))?;
    if ttl < Duration::from_secs(1) || ttl > LONGEST_SCOPE_TTL {
        return Err(format!("'{text}' must be between 1s and 24h"));
    }
    Ok(ttl)
}

/// The message of a field error, without the field name (the catalog adds its own).
pub(super) fn error_message(error: Error) -> String {
    match error {
        Error::InvalidArgument { message, .. } => message,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Role, SpiffeId};

    fn caller(name: &str) -> Caller {
        Caller {
            audiences: Vec::new(),
            workload_id: "w".into(),
            name: WorkloadName::parse("name", name).unwrap(),
            spiffe_id: SpiffeId::from_stored(format!("spiffe://test/workload/{name}")),
            roles: vec![Role::Agent],
            certificate_thumbprint: None,
            labels: Labels::default(),
        }
    }

    const CATALOG: &str = r#"
        [[scope]]
        name = "crm.contacts:read"
        audience = "https://crm.example"
        kind = "jwt"
        default_ttl = "5m"
        max_ttl = "15m"
        workloads = ["*"]

        [[scope]]
        name = "payments:transfer"
        audience = "https://payments.example"
        kind = "jwt"
        default_ttl = "1m"
        max_ttl = "2m"
        workloads = ["billing-agent"]
    "#;

    #[test]
    fn authorizes_listed_workloads_and_refuses_others_with_the_reason() {
        let catalog = Catalog::from_toml(CATALOG).unwrap();
        let transfer = ScopeName::parse("scope", "payments:transfer").unwrap();
        assert!(
            catalog
                .authorize(&caller("billing-agent"), "scope", &transfer)
                .is_ok()
        );
        let refusal = catalog
            .authorize(&caller("crm-agent"), "scopes[0]", &transfer)
            .unwrap_err();
        assert!(matches!(refusal, Error::PermissionDenied(ref m) if m.contains("crm-agent")));
    }

    #[test]
    fn unknown_scope_is_an_invalid_argument_naming_the_field() {
        let catalog = Catalog::from_toml(CATALOG).unwrap();
        let unknown = ScopeName::parse("scope", "nope:write").unwrap();
        let error = catalog
            .authorize(&caller("a"), "scopes[1]", &unknown)
            .unwrap_err();
        assert_eq!(error.to_string(), "scopes[1]: unknown scope 'nope:write'");
    }

    #[test]
    fn catalog_errors_name_the_entry_and_key() {
        let bad = CATALOG.replace("max_ttl = \"2m\"", "max_ttl = \"30s\"");
        let error = Catalog::from_toml(&bad).unwrap_err();
        assert_eq!(error.field, "scope[1].default_ttl");
        let bad = CATALOG.replace("kind = \"jwt\"", "kind = \"magic\"");
        assert_eq!(Catalog::from_toml(&bad).unwrap_err().field, "scope[0].kind");
        let bad = CATALOG.replace("max_ttl = \"15m\"", "max_ttl = \"48h\"");
        assert_eq!(
            Catalog::from_toml(&bad).unwrap_err().field,
            "scope[0].max_ttl"
        );
    }
}
