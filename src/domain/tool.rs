//! Tools of the catalog (`[[tool]]` in scopes.toml): what an agent may call, which downstream
//! service checks its call tokens, and the arguments each takes. A call is checked against the
//! declaration before policy sees it, so policy reads typed values, an undeclared argument is
//! refused, and arguments marked sensitive never reach the audit trail or the operators' view.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::labels::Labels;
use super::scope::{
    AllowedWorkloads, CatalogError, CredentialKind, ScopeDefinition, ScopeName, error_message,
    parse_ttl, parse_workloads,
};
use crate::error::Error;

/// What a call token's lease is named: `tool:<tool name>` (a name no catalog scope may take).
pub const CALL_SCOPE_PREFIX: &str = "tool:";
/// The largest arguments object a call may carry (its JSON text).
pub const MAX_ARGUMENTS_BYTES: usize = 16 * 1024;
/// The arguments one tool may declare.
pub const MAX_TOOL_ARGUMENTS: usize = 32;
/// The longest string argument, and the most items a list argument holds.
const MAX_STRING_BYTES: usize = 4096;
const MAX_LIST_ITEMS: usize = 64;
const MAX_ARGUMENT_NAME_BYTES: usize = 64;
/// A call token's lifetime unless the tool says otherwise, and the longest it may say: the
/// token authorizes one call about to happen.
const DEFAULT_CALL_TTL: Duration = Duration::from_secs(60);
const LONGEST_CALL_TTL: Duration = Duration::from_secs(300);
/// What a sensitive argument's value is replaced by wherever a call is shown.
pub const REDACTED: &str = "[redacted]";

/// The type of a declared argument, as policy reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgumentType {
    String,
    /// A whole number (JSON integer).
    Long,
    Bool,
    /// A list of strings (a Cedar set).
    Strings,
}

impl ArgumentType {
    const ALL: [ArgumentType; 4] = [
        ArgumentType::String,
        ArgumentType::Long,
        ArgumentType::Bool,
        ArgumentType::Strings,
    ];

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }

    /// Its name in the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            ArgumentType::String => "string",
            ArgumentType::Long => "long",
            ArgumentType::Bool => "bool",
            ArgumentType::Strings => "strings",
        }
    }

    /// The Cedar schema type.
    pub fn cedar_type(self) -> &'static str {
        match self {
            ArgumentType::String => "String",
            ArgumentType::Long => "Long",
            ArgumentType::Bool => "Bool",
            ArgumentType::Strings => "Set<String>",
        }
    }
}

/// One declared argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgumentSpec {
    pub kind: ArgumentType,
    /// Never shown: the audit trail and operators see its digest only.
    pub sensitive: bool,
    pub required: bool,
}

/// One tool of the catalog.
#[derive(Clone, Debug)]
pub struct ToolDefinition {
    pub name: String,
    pub description: String,
    /// The service that runs the tool and introspects its call tokens (their `aud`).
    pub audience: String,
    pub allowed_workloads: AllowedWorkloads,
    pub labels: Labels,
    pub arguments: BTreeMap<String, ArgumentSpec>,
    /// The lease a call token is: named `tool:<name>`, living `call_ttl`.
    pub call_scope: ScopeDefinition,
}

/// A value of a checked argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgumentValue {
    String(String),
    Long(i64),
    Bool(bool),
    Strings(Vec<String>),
}

/// A tool call's arguments, checked against the tool's declaration.
#[derive(Clone, Debug)]
pub struct CheckedArguments {
    pub values: BTreeMap<String, ArgumentValue>,
    /// `sha256:` and the hex SHA-256 of the arguments as compact JSON with sorted keys (RFC
    /// 8785's form for these types): what the call token is bound to, and what the tool's
    /// service recomputes from the arguments it receives.
    pub digest: String,
    /// The arguments with every sensitive value replaced by [`REDACTED`].
    pub shown: Value,
}

impl ToolDefinition {
    /// Checks the JSON object `text` against the declared arguments: every key declared, each
    /// value of its type and size, every required one present.
    pub fn check_arguments(&self, text: &str) -> Result<CheckedArguments, Error> {
        if text.len() > MAX_ARGUMENTS_BYTES {
            return Err(Error::invalid(
                "arguments_json",
                format!("is longer than {MAX_ARGUMENTS_BYTES} bytes"),
            ));
        }
        let text = if text.trim().is_empty() { "{}" } else { text };
        let parsed: Value = serde_json::from_str(text)
            .map_err(|error| Error::invalid("arguments_json", format!("is not JSON: {error}")))?;
        let Value::Object(object) = parsed else {
            return Err(Error::invalid("arguments_json", "must be a JSON object"));
        };
        let mut values = BTreeMap::new();
        for (name, value) in object {
            let field = format!("arguments_json.{}", shown_name(&name));
            let spec = self.arguments.get(&name).ok_or_else(|| {
                Error::invalid(
                    &field,
                    format!("tool '{}' declares no such argument", self.name),
                )
            })?;
            values.insert(name, checked_value(&field, spec.kind, value)?);
        }
        if let Some((missing, _)) = self
            .arguments
            .iter()
            .find(|(name, spec)| spec.required && !values.contains_key(*name))
        {
            return Err(Error::invalid(
                format!("arguments_json.{missing}"),
                "is required",
            ));
        }
        let canonical: serde_json::Map<String, Value> = values
            .iter()
            .map(|(name, value)| (name.clone(), json_value(value)))
            .collect();
        // Keys are inserted in sorted order (a BTreeMap), which the map keeps.
        let digest = format!(
            "sha256:{}",
            super::ids::sha256_hex(Value::Object(canonical).to_string().as_bytes())
        );
        let shown = values
            .iter()
            .map(|(name, value)| {
                let shown = if self.arguments[name].sensitive {
                    Value::String(REDACTED.into())
                } else {
                    json_value(value)
                };
                (name.clone(), shown)
            })
            .collect::<serde_json::Map<_, _>>();
        Ok(CheckedArguments {
            values,
            digest,
            shown: Value::Object(shown),
        })
    }
}

/// An argument name as an error message may show it (it came from the network).
fn shown_name(name: &str) -> String {
    name.chars()
        .take(MAX_ARGUMENT_NAME_BYTES)
        .filter(|c| !c.is_control())
        .collect()
}

fn checked_value(field: &str, kind: ArgumentType, value: Value) -> Result<ArgumentValue, Error> {
    let long_string = || Error::invalid(field, format!("is longer than {MAX_STRING_BYTES} bytes"));
    match (kind, value) {
        (ArgumentType::String, Value::String(text)) if text.len() > MAX_STRING_BYTES => {
            Err(long_string())
        }
        (ArgumentType::String, Value::String(text)) => Ok(ArgumentValue::String(text)),
        (ArgumentType::Long, Value::Number(number)) => number
            .as_i64()
            .map(ArgumentValue::Long)
            .ok_or_else(|| Error::invalid(field, "must be a whole number within 64 bits")),
        (ArgumentType::Bool, Value::Bool(flag)) => Ok(ArgumentValue::Bool(flag)),
        (ArgumentType::Strings, Value::Array(items)) => {
            if items.len() > MAX_LIST_ITEMS {
                return Err(Error::invalid(
                    field,
                    format!("holds more than {MAX_LIST_ITEMS} items"),
                ));
            }
            items
                .into_iter()
                .map(|item| match item {
                    Value::String(text) if text.len() > MAX_STRING_BYTES => Err(long_string()),
                    Value::String(text) => Ok(text),
                    _ => Err(Error::invalid(field, "must be a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(ArgumentValue::Strings)
        }
        (kind, _) => Err(Error::invalid(
            field,
            format!(
                "must be {}",
                match kind {
                    ArgumentType::String => "a string",
                    ArgumentType::Long => "a whole number",
                    ArgumentType::Bool => "true or false",
                    ArgumentType::Strings => "a list of strings",
                }
            ),
        )),
    }
}

fn json_value(value: &ArgumentValue) -> Value {
    match value {
        ArgumentValue::String(text) => Value::String(text.clone()),
        ArgumentValue::Long(number) => Value::from(*number),
        ArgumentValue::Bool(flag) => Value::Bool(*flag),
        ArgumentValue::Strings(items) => {
            Value::Array(items.iter().cloned().map(Value::String).collect())
        }
    }
}

/// What a call token is bound to: one tool, called with the arguments of one digest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct CallBinding {
    pub tool: String,
    pub arguments_digest: String,
}

/// A `[[tool]]` entry of the catalog file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ToolEntry {
    name: String,
    #[serde(default)]
    description: String,
    audience: String,
    workloads: Vec<String>,
    #[serde(default)]
    call_ttl: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    arguments: BTreeMap<String, ArgumentEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArgumentEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    sensitive: bool,
    #[serde(default = "required_by_default")]
    required: bool,
}

fn required_by_default() -> bool {
    true
}

impl ToolEntry {
    pub(super) fn into_definition(self, index: usize) -> Result<ToolDefinition, CatalogError> {
        let field = |key: &str| format!("tool[{index}].{key}");
        let fail = |key: &str, message: String| CatalogError {
            field: field(key),
            message,
        };
        let is_allowed = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        if self.name.is_empty() || self.name.len() > 64 || !self.name.bytes().all(is_allowed) {
            return Err(fail(
                "name",
                "must be 1 to 64 bytes of letters, digits and '.', '_', '-'".into(),
            ));
        }
        if self.audience.is_empty() || self.audience.len() > 512 {
            return Err(fail("audience", "must be 1 to 512 bytes".into()));
        }
        let call_ttl = match &self.call_ttl {
            None => DEFAULT_CALL_TTL,
            Some(text) => {
                let ttl = parse_ttl(text).map_err(|message| fail("call_ttl", message))?;
                if ttl > LONGEST_CALL_TTL {
                    return Err(fail(
                        "call_ttl",
                        format!("'{text}' is longer than 5m: a call token is for one call now"),
                    ));
                }
                ttl
            }
        };
        let allowed_workloads = parse_workloads(&field, &self.workloads)?;
        let labels = Labels::parse(&field("labels"), &self.labels)
            .map_err(|error| fail("labels", error_message(error)))?;
        if self.arguments.len() > MAX_TOOL_ARGUMENTS {
            return Err(fail(
                "arguments",
                format!("declares more than {MAX_TOOL_ARGUMENTS} arguments"),
            ));
        }
        let mut arguments = BTreeMap::new();
        for (name, entry) in self.arguments {
            let key = format!("arguments.{name}");
            let starts_well = name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
            let is_identifier = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !starts_well || !is_identifier || name.len() > MAX_ARGUMENT_NAME_BYTES {
                return Err(fail(
                    &key,
                    format!(
                        "an argument name must be 1 to {MAX_ARGUMENT_NAME_BYTES} letters, digits \
                         and '_', not starting with a digit (policy reads it as \
                         context.arguments.<name>)"
                    ),
                ));
            }
            let kind = ArgumentType::parse(&entry.kind).ok_or_else(|| {
                fail(
                    &format!("{key}.type"),
                    format!(
                        "'{}' is not an argument type (string, long, bool, strings)",
                        entry.kind
                    ),
                )
            })?;
            arguments.insert(
                name,
                ArgumentSpec {
                    kind,
                    sensitive: entry.sensitive,
                    required: entry.required,
                },
            );
        }
        let call_scope = ScopeDefinition {
            name: ScopeName::parse("name", &format!("{CALL_SCOPE_PREFIX}{}", self.name))
                .map_err(|error| fail("name", error_message(error)))?,
            description: self.description.clone(),
            audience: self.audience.clone(),
            kind: CredentialKind::Jwt,
            default_ttl: call_ttl,
            max_ttl: call_ttl,
            allowed_workloads: allowed_workloads.clone(),
            labels: labels.clone(),
            // A call token is for its one call.
            max_uses: Some(1),
        };
        Ok(ToolDefinition {
            name: self.name,
            description: self.description,
            audience: self.audience,
            allowed_workloads,
            labels,
            arguments,
            call_scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Catalog;

    const CATALOG: &str = r#"
        [[tool]]
        name = "payments.refund"
        audience = "https://payments.example"
        workloads = ["*"]
        [tool.arguments]
        order_id = { type = "string" }
        amount = { type = "long" }
        note = { type = "string", sensitive = true, required = false }
        tags = { type = "strings", required = false }
    "#;

    fn refund() -> ToolDefinition {
        Catalog::from_toml(CATALOG)
            .unwrap()
            .tool("payments.refund")
            .unwrap()
            .clone()
    }

    #[test]
    fn checked_arguments_have_a_digest_independent_of_key_order_and_hide_sensitive_values() {
        let tool = refund();
        let one = tool
            .check_arguments(r#"{"order_id":"A-1","amount":1200,"note":"card 4111"}"#)
            .unwrap();
        let two = tool
            .check_arguments(r#"{ "note": "card 4111", "amount": 1200, "order_id": "A-1" }"#)
            .unwrap();
        assert_eq!(one.digest, two.digest);
        // The digest of `{"amount":1200,"note":"card 4111","order_id":"A-1"}`.
        assert_eq!(
            one.digest,
            format!(
                "sha256:{}",
                crate::domain::ids::sha256_hex(
                    br#"{"amount":1200,"note":"card 4111","order_id":"A-1"}"#
                )
            )
        );
        assert_eq!(one.shown["note"], REDACTED);
        assert_eq!(one.shown["amount"], 1200);
        assert!(!one.shown.to_string().contains("4111"));
        let other = tool
            .check_arguments(r#"{"order_id":"A-1","amount":1201}"#)
            .unwrap();
        assert_ne!(one.digest, other.digest);
    }

    #[test]
    fn bad_arguments_are_refused_naming_the_argument() {
        let tool = refund();
        let field = |text: &str| match tool.check_arguments(text).unwrap_err() {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(
            field(r#"{"order_id":"A","amount":"12"}"#),
            "arguments_json.amount"
        );
        assert_eq!(
            field(r#"{"order_id":"A","amount":1.5}"#),
            "arguments_json.amount"
        );
        assert_eq!(field(r#"{"order_id":"A"}"#), "arguments_json.amount");
        assert_eq!(
            field(r#"{"order_id":"A","amount":1,"to":"x"}"#),
            "arguments_json.to"
        );
        assert_eq!(
            field(r#"{"order_id":"A","amount":1,"tags":[1]}"#),
            "arguments_json.tags"
        );
        assert_eq!(field("[1]"), "arguments_json");
        assert_eq!(field("{"), "arguments_json");
        let oversized = format!(r#"{{"order_id":"{}","amount":1}}"#, "x".repeat(20_000));
        assert_eq!(field(&oversized), "arguments_json");
    }
}
