//! Reading a policy set: a directory of `*.cedar` files (and, for reference, a copy of
//! Warrant's schema). Every policy is named (its `@id`, else
//! `<file>#<position>`), validated against the schema in strict mode, and sorted into the
//! decision set or the `@approval` rules. Whatever is wrong is reported with its file, line and
//! column; a set that fails loads nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{Effect, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;

use super::decision::{APPROVAL, ApprovalRule, ID, KNOWN_ANNOTATIONS, REQUIREMENT_KEYS};
use super::index::IndexedPolicies;
use crate::domain::tool::ArgumentType;
use crate::issuer::master_key::write_private_file;

/// Warrant's schema for a catalog without tools (see [`schema_for`]).
pub const BUILT_IN_SCHEMA: &str = include_str!("schema.cedarschema");
/// The line of [`BUILT_IN_SCHEMA`] that [`schema_for`] fills with the catalog's arguments.
const TOOL_ARGUMENTS_LINE: &str = "  type ToolArguments = {};";
/// The policy `serve --dev` starts with.
pub const DEFAULT_POLICIES: &str = include_str!("default.cedar");
/// The schema's file name in a policy directory.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// The default policy file's name in a directory `serve --dev` creates.
pub const DEFAULT_POLICY_FILE: &str = "policies.cedar";

/// The longest policy id.
const MAX_POLICY_ID_BYTES: usize = 128;

/// Where the policy set comes from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// Warrant's default policy, for a configuration without `[policy]`.
    BuiltIn,
    /// A directory of `*.cedar` files.
    Dir(PathBuf),
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySource::BuiltIn => f.write_str("the built-in default policy"),
            PolicySource::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// Why a policy set was refused: the file (and where in it) and what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{location}: {message}")]
pub struct PolicyError {
    pub location: String,
    pub message: String,
}

impl PolicyError {
    fn new(location: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError {
            location: location.into(),
            message: message.into(),
        }
    }
}

/// One source file of a set.
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

/// A validated policy set, ready to decide.
pub struct LoadedPolicy {
    /// The policies that allow or deny.
    pub(super) decisions: IndexedPolicies,
    /// The `@approval` permits, consulted once a request is allowed.
    pub(super) approvals: IndexedPolicies,
    pub(super) rules: HashMap<PolicyId, ApprovalRule>,
    pub summary: PolicySummary,
}

/// What a loaded set holds, for the audit trail and the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySummary {
    /// The ids of the policies that allow or deny, sorted.
    pub decision_policies: Vec<String>,
    /// The ids of the `@approval` rules, sorted.
    pub approval_rules: Vec<String>,
    /// SHA-256 (hex) over the schema and every file, naming this version of the set.
    pub digest: String,
    pub source: String,
}

impl PolicySummary {
    /// The start of the digest, short enough for every decision's audit event.
    pub fn version(&self) -> &str {
        &self.digest[..VERSION_CHARS]
    }
}

/// The characters of the digest [`PolicySummary::version`] keeps.
const VERSION_CHARS: usize = 16;

/// Warrant's schema for a catalog whose tools declare `arguments`: what it puts in every
/// request (`warrant policy schema` prints it), `context.arguments` typed with each argument.
pub fn schema_for(arguments: &BTreeMap<String, ArgumentType>) -> String {
    if arguments.is_empty() {
        return BUILT_IN_SCHEMA.to_owned();
    }
    let declared: String = arguments
        .iter()
        .map(|(name, kind)| format!("    \"{name}\"?: {},\n", kind.cedar_type()))
        .collect();
    BUILT_IN_SCHEMA.replace(
        TOOL_ARGUMENTS_LINE,
        &format!("  type ToolArguments = {{\n{declared}  }};"),
    )
}

/// Reads and validates the set at `source` against `schema` (from [`schema_for`]).
pub fn load(source: &PolicySource, schema: &str) -> Result<LoadedPolicy, PolicyError> {
    match source {
        PolicySource::BuiltIn => from_files(
            vec![PolicyFile {
                name: DEFAULT_POLICY_FILE.into(),
                text: DEFAULT_POLICIES.into(),
            }],
            source.to_string(),
            schema,
        ),
        PolicySource::Dir(dir) => from_files(read_dir(dir, schema)?, source.to_string(), schema),
    }
}

/// Writes Warrant's schema and default policy into `dir` unless it exists (`serve --dev`): into
/// a fresh directory beside it first, flushed, then renamed into place, so that a crash during
/// the first start never leaves a half-written set for the next start to refuse.
/// In a directory that exists, only the schema copy is rewritten: it is Warrant's file, and
/// the catalog's tools may have changed what it says.
pub fn create_default_dir(dir: &Path, schema: &str) -> std::io::Result<()> {
    if dir.exists() {
        let copy = dir.join(SCHEMA_FILE);
        if std::fs::read_to_string(&copy).is_ok_and(|text| text == schema) {
            return Ok(());
        }
        let fresh = dir.join(format!(".{SCHEMA_FILE}.new"));
        if fresh.exists() {
            std::fs::remove_file(&fresh)?;
        }
        write_private_file(&fresh, schema.as_bytes())?;
        return std::fs::rename(&fresh, &copy);
    }
    let staging = dir.with_extension("new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    write_private_file(&staging.join(SCHEMA_FILE), schema.as_bytes())?;
    write_private_file(
        &staging.join(DEFAULT_POLICY_FILE),
        DEFAULT_POLICIES.as_bytes(),
    )?;
    std::fs::File::open(&staging)?.sync_all()?;
    std::fs::rename(&staging, dir)?;
    if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The `*.cedar` files of `dir` (dotfiles, such as editors' lock files, skipped), read as they
/// are listed, by name. A `schema.cedarschema` there must be Warrant's own schema: Warrant builds
/// every request from it, so a different one could validate policies that name what Warrant
/// never supplies (a forbid on an attribute that never exists never fires).
fn read_dir(dir: &Path, schema: &str) -> Result<Vec<PolicyFile>, PolicyError> {
    let shown = dir.display().to_string();
    let cannot_read = |path: &Path, e: std::io::Error| {
        PolicyError::new(path.display().to_string(), format!("cannot read: {e}"))
    };
    let entries = std::fs::read_dir(dir).map_err(|e| cannot_read(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| cannot_read(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if name == SCHEMA_FILE {
            let text = std::fs::read_to_string(&path).map_err(|e| cannot_read(&path, e))?;
            if normalized(&text) != normalized(schema) {
                return Err(PolicyError::new(
                    path.display().to_string(),
                    "differs from Warrant's schema for this catalog, which every request is \
                     built from; delete it (policies are validated against Warrant's schema) or \
                     replace it with `warrant policy schema --catalog <scopes.toml>`",
                ));
            }
        } else if name.ends_with(".cedar") {
            let text = std::fs::read_to_string(&path).map_err(|e| cannot_read(&path, e))?;
            files.push(PolicyFile {
                name: path.display().to_string(),
                text,
            });
        }
    }
    if files.is_empty() {
        return Err(PolicyError::new(
            shown,
            "holds no *.cedar file (an empty set would deny every request; write the policies, \
             or one file with a comment to deny on purpose)",
        ));
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// A schema's text without comments and whitespace, to compare two copies.
fn normalized(schema: &str) -> String {
    schema
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .flat_map(str::split_whitespace)
        .collect()
}

/// Parses, names, sorts and validates a set against Warrant's schema.
pub fn from_files(
    files: Vec<PolicyFile>,
    source: String,
    schema_text: &str,
) -> Result<LoadedPolicy, PolicyError> {
    let (schema, warnings) = Schema::from_cedarschema_str(schema_text)
        .map_err(|error| located(SCHEMA_FILE, schema_text, &error))?;
    for warning in warnings {
        tracing::warn!(%warning, "policy schema");
    }
    let digest = digest(schema_text, &files);
    let mut decisions = PolicySet::new();
    let mut approvals = PolicySet::new();
    let mut rules = HashMap::new();
    // Which file each policy came from, to place validation errors.
    let mut origin: HashMap<PolicyId, &PolicyFile> = HashMap::new();
    for file in &files {
        let parsed = PolicySet::from_str(&file.text)
            .map_err(|error| located(&file.name, &file.text, &error))?;
        if let Some(template) = parsed.templates().next() {
            return Err(PolicyError::new(
                &file.name,
                format!(
                    "policy {} is a template (it has a slot such as ?principal); Warrant loads \
                     only static policies",
                    template.id()
                ),
            ));
        }
        // `from_str` names the policies policy0, policy1, .. in the order they appear.
        let mut policies: Vec<_> = parsed
            .policies()
            .map(|policy| (position_in_file(policy.id()), policy.clone()))
            .collect();
        policies.sort_by_key(|(position, _)| *position);
        for (position, policy) in policies {
            let id = policy_id(&file.name, position, policy.annotation(ID))?;
            if let Some((key, _)) = policy
                .annotations()
                .find(|(key, _)| !KNOWN_ANNOTATIONS.contains(key))
            {
                return Err(PolicyError::new(
                    &file.name,
                    format!(
                        "policy {id}: unknown annotation @{key} (Warrant reads @{})",
                        KNOWN_ANNOTATIONS.join(", @")
                    ),
                ));
            }
            let policy = policy.new_id(id.clone());
            if origin.insert(id.clone(), file).is_some() {
                return Err(PolicyError::new(
                    &file.name,
                    format!("policy id '{id}' is used twice"),
                ));
            }
            let is_approval = policy.annotation(APPROVAL).is_some();
            let add = |set: &mut PolicySet| {
                set.add(policy.clone())
                    .map_err(|error| PolicyError::new(&file.name, format!("policy {id}: {error}")))
            };
            if is_approval {
                if policy.effect() != Effect::Permit {
                    return Err(PolicyError::new(
                        &file.name,
                        format!(
                            "policy {id}: @{APPROVAL} applies to permit policies only (a forbid \
                             already denies)"
                        ),
                    ));
                }
                let rule = ApprovalRule::from_annotations(|key| policy.annotation(key)).map_err(
                    |message| PolicyError::new(&file.name, format!("policy {id}: {message}")),
                )?;
                add(&mut approvals)?;
                rules.insert(id, rule);
            } else {
                if let Some(key) = REQUIREMENT_KEYS
                    .iter()
                    .find(|key| policy.annotation(key).is_some())
                {
                    return Err(PolicyError::new(
                        &file.name,
                        format!(
                            "policy {id}: @{key} means something only on an @{APPROVAL} policy"
                        ),
                    ));
                }
                add(&mut decisions)?;
            }
        }
    }
    let validator = Validator::new(schema.clone());
    for set in [&decisions, &approvals] {
        let result = validator.validate(set, ValidationMode::Strict);
        if let Some(error) = result.validation_errors().next() {
            let refused = match origin.get(error.policy_id()) {
                Some(file) => located(&file.name, &file.text, error),
                None => PolicyError::new(SCHEMA_FILE, error.to_string()),
            };
            return Err(PolicyError {
                message: format!("does not validate against the schema: {}", refused.message),
                ..refused
            });
        }
        for warning in result.validation_warnings() {
            tracing::warn!(%warning, "policy");
        }
    }
    let ids = |set: &PolicySet| {
        let mut ids: Vec<String> = set
            .policies()
            .map(|policy| policy.id().to_string())
            .collect();
        ids.sort();
        ids
    };
    let index = |set: PolicySet| {
        IndexedPolicies::new(set).map_err(|error| PolicyError::new(&source, error))
    };
    let (decisions, approvals) = (index(decisions)?, index(approvals)?);
    let summary = PolicySummary {
        decision_policies: ids(decisions.all()),
        approval_rules: ids(approvals.all()),
        digest,
        source,
    };
    Ok(LoadedPolicy {
        decisions,
        approvals,
        rules,
        summary,
    })
}

/// The position `PolicySet::from_str` gave a policy (`policy<N>`, N from 0).
fn position_in_file(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|number| number.parse().ok())
        .expect("PolicySet::from_str names its policies policy0, policy1, ..")
}

/// A policy's id: its `@id` annotation, else `<file name>#<position from 1>`.
fn policy_id(
    file: &str,
    position: usize,
    annotated: Option<&str>,
) -> Result<PolicyId, PolicyError> {
    let id = match annotated {
        Some(id) => {
            let is_printable = id.chars().all(|c| c.is_ascii_graphic());
            if id.is_empty() || id.len() > MAX_POLICY_ID_BYTES || !is_printable {
                return Err(PolicyError::new(
                    file,
                    format!(
                        "@id(\"{}\") must be 1 to {MAX_POLICY_ID_BYTES} printable characters \
                         without spaces",
                        id.chars().take(40).collect::<String>()
                    ),
                ));
            }
            id.to_owned()
        }
        None => format!("{}#{}", base_name(file), position + 1),
    };
    Ok(PolicyId::new(id))
}

/// An error with the file, line and column its first label points at.
fn located(file: &str, text: &str, error: &(dyn Diagnostic + 'static)) -> PolicyError {
    let position = error
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| line_and_column(text, label.offset()));
    let location = match position {
        Some((line, column)) => format!("{file}:{line}:{column}"),
        None => file.to_owned(),
    };
    let mut message = error.to_string();
    if let Some(help) = error.help() {
        message.push_str(&format!(" ({help})"));
    }
    PolicyError::new(location, message)
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |newline| before.len() - newline - 1)
        + 1;
    (line, column)
}

fn digest(schema: &str, files: &[PolicyFile]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let named = files
        .iter()
        .flat_map(|file| [base_name(&file.name), file.text.as_str()]);
    for text in std::iter::once(schema).chain(named) {
        context.update(&(text.len() as u64).to_be_bytes());
        context.update(text.as_bytes());
    }
    crate::domain::ids::hex(context.finish().as_ref())
}

/// The file name of a path given as text.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
