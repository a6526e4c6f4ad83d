//! A request in Cedar's terms: the workload as principal (a member of its roles), the scope or
//! tool as resource, and the task, time and (for a tool call) its arguments as context, typed
//! as `schema.cedarschema` says.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request, RestrictedExpression,
    Schema,
};

use crate::domain::tool::{ArgumentValue, CheckedArguments};
use crate::domain::{Caller, Role, ScopeDefinition, TaskContext, ToolDefinition, UnixMillis};

struct Types {
    role: EntityTypeName,
    workload: EntityTypeName,
    scope: EntityTypeName,
    tool: EntityTypeName,
    request_grant: EntityUid,
    call_tool: EntityUid,
    list_tools: EntityUid,
    use_token: EntityUid,
}

static TYPES: LazyLock<Types> = LazyLock::new(|| {
    let name = |text: &str| EntityTypeName::from_str(text).expect("a valid built-in type name");
    let action =
        |id: &str| EntityUid::from_type_name_and_id(name("Warrant::Action"), EntityId::new(id));
    Types {
        role: name("Warrant::Role"),
        workload: name("Warrant::Workload"),
        scope: name("Warrant::Scope"),
        tool: name("Warrant::Tool"),
        request_grant: action("RequestGrant"),
        call_tool: action("CallTool"),
        list_tools: action("ListTools"),
        use_token: action("UseToken"),
    }
});

/// What a task asks of policy, besides the caller and the resource.
pub struct TaskFacts<'a> {
    pub purpose: &'a str,
    pub context: &'a TaskContext,
    /// The lifetime asked for: the lease's, or the call token's.
    pub requested_ttl: Duration,
    pub delegation_depth: u32,
    pub now: UnixMillis,
    /// The caller's risk signal, 0 to [`crate::domain::task::MAX_RISK`].
    pub risk: Option<u32>,
}

/// Everything policy reads about one request for a scope.
pub struct GrantQuery<'a> {
    pub caller: &'a Caller,
    pub scope: &'a ScopeDefinition,
    pub facts: TaskFacts<'a>,
}

/// Which tool action is asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolAction {
    Call,
    List,
}

/// Everything policy reads about one tool call (or one tool being listed: no arguments).
pub struct ToolQuery<'a> {
    pub caller: &'a Caller,
    pub tool: &'a ToolDefinition,
    pub action: ToolAction,
    pub arguments: Option<&'a CheckedArguments>,
    pub facts: TaskFacts<'a>,
}

/// Everything policy reads about one use of a token: its holder, its scope, the task it was
/// issued to, and what the resource server is about to do with it.
pub struct UseQuery<'a> {
    /// The token's holder (its certificate thumbprint set when the token is bound to one).
    pub holder: &'a Caller,
    pub scope: &'a ScopeDefinition,
    pub facts: TaskFacts<'a>,
    pub action: &'a str,
    pub resource: &'a str,
    /// The resource server asking.
    pub checked_by: &'a str,
}

impl GrantQuery<'_> {
    /// The Cedar request and the entities it refers to.
    pub fn to_cedar(&self, schema: Option<&Schema>) -> Result<(Request, Entities), String> {
        build(
            self.caller,
            TYPES.request_grant.clone(),
            scope_entity(self.scope)?,
            self.facts.context_pairs(),
            schema,
        )
    }
}

impl UseQuery<'_> {
    /// The Cedar request and the entities it refers to.
    pub fn to_cedar(&self, schema: Option<&Schema>) -> Result<(Request, Entities), String> {
        let mut context = self.facts.context_pairs();
        context.extend([
            ("use_action".to_owned(), string(self.action)),
            ("use_resource".to_owned(), string(self.resource)),
            ("checked_by".to_owned(), string(self.checked_by)),
        ]);
        build(
            self.holder,
            TYPES.use_token.clone(),
            scope_entity(self.scope)?,
            context,
            schema,
        )
    }
}

/// A catalog scope as a Cedar entity.
fn scope_entity(scope: &ScopeDefinition) -> Result<Entity, String> {
    let uid =
        EntityUid::from_type_name_and_id(TYPES.scope.clone(), EntityId::new(scope.name.as_str()));
    Entity::new(
        uid,
        HashMap::from([
            ("name".into(), string(scope.name.as_str())),
            ("audience".into(), string(&scope.audience)),
            ("kind".into(), string(scope.kind.as_str())),
            ("max_ttl_secs".into(), seconds(scope.max_ttl)),
            (
                "max_uses".into(),
                RestrictedExpression::new_long(i64::from(scope.max_uses.unwrap_or(0))),
            ),
            ("labels".into(), strings(scope.labels.pairs())),
        ]),
        HashSet::new(),
    )
    .map_err(|error| error.to_string())
}

impl ToolQuery<'_> {
    /// The Cedar request and the entities it refers to.
    pub fn to_cedar(&self, schema: Option<&Schema>) -> Result<(Request, Entities), String> {
        let types = &*TYPES;
        let resource =
            EntityUid::from_type_name_and_id(types.tool.clone(), EntityId::new(&self.tool.name));
        let tool = Entity::new(
            resource,
            HashMap::from([
                ("name".into(), string(&self.tool.name)),
                ("audience".into(), string(&self.tool.audience)),
                ("labels".into(), strings(self.tool.labels.pairs())),
            ]),
            HashSet::new(),
        )
        .map_err(|error| error.to_string())?;
        let arguments = self.arguments.map(|checked| {
            checked
                .values
                .iter()
                .map(|(name, value)| (name.clone(), argument(value)))
                .collect::<Vec<_>>()
        });
        let mut context = self.facts.context_pairs();
        context.push((
            "arguments".to_owned(),
            RestrictedExpression::new_record(arguments.unwrap_or_default())
                .map_err(|error| error.to_string())?,
        ));
        context.push((
            "arguments_digest".to_owned(),
            string(self.arguments.map_or("", |checked| checked.digest.as_str())),
        ));
        let action = match self.action {
            ToolAction::Call => types.call_tool.clone(),
            ToolAction::List => types.list_tools.clone(),
        };
        build(self.caller, action, tool, context, schema)
    }
}

impl TaskFacts<'_> {
    /// The context attributes every action shares.
    fn context_pairs(&self) -> Vec<(String, RestrictedExpression)> {
        let now_seconds = self.now.0.div_euclid(1000);
        let task_labels = self
            .context
            .labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"));
        let mut context = vec![
            ("purpose".to_owned(), string(self.purpose)),
            (
                "prompt_digest".to_owned(),
                string(self.context.prompt_digest.as_deref().unwrap_or_default()),
            ),
            (
                "planned_tools".to_owned(),
                strings(self.context.planned_tools.iter().cloned()),
            ),
            ("labels".to_owned(), strings(task_labels)),
            ("requested_ttl_secs".to_owned(), seconds(self.requested_ttl)),
            (
                "delegation_depth".to_owned(),
                RestrictedExpression::new_long(i64::from(self.delegation_depth)),
            ),
            (
                "now".to_owned(),
                RestrictedExpression::new_long(now_seconds),
            ),
            (
                "hour".to_owned(),
                RestrictedExpression::new_long(now_seconds.rem_euclid(86_400) / 3600),
            ),
        ];
        if let Some(risk) = self.risk {
            context.push((
                "risk".to_owned(),
                RestrictedExpression::new_long(i64::from(risk)),
            ));
        }
        context
    }
}

/// The request of `caller` for `action` on `resource`, with the caller's workload and role
/// entities.
fn build(
    caller: &Caller,
    action: EntityUid,
    resource: Entity,
    context: Vec<(String, RestrictedExpression)>,
    schema: Option<&Schema>,
) -> Result<(Request, Entities), String> {
    let types = &*TYPES;
    let role_uid = |role: &Role| {
        EntityUid::from_type_name_and_id(types.role.clone(), EntityId::new(role.as_str()))
    };
    let roles: HashSet<EntityUid> = caller.roles.iter().map(role_uid).collect();
    let principal = EntityUid::from_type_name_and_id(
        types.workload.clone(),
        EntityId::new(caller.name.as_str()),
    );
    let authenticated_by = if caller.certificate_thumbprint.is_some() {
        "svid"
    } else {
        "bearer"
    };
    let workload = Entity::new(
        principal.clone(),
        HashMap::from([
            ("name".into(), string(caller.name.as_str())),
            ("spiffe_id".into(), string(caller.spiffe_id.as_str())),
            ("labels".into(), strings(caller.labels.pairs())),
            ("authenticated_by".into(), string(authenticated_by)),
        ]),
        roles.clone(),
    )
    .map_err(|error| error.to_string())?;
    let resource_uid = resource.uid();
    let role_entities = roles
        .into_iter()
        .map(|uid| Entity::new_no_attrs(uid, HashSet::new()));
    let entities = Entities::from_entities(role_entities.chain([workload, resource]), schema)
        .map_err(|error| error.to_string())?;
    let context = Context::from_pairs(context).map_err(|error| error.to_string())?;
    let request = Request::new(principal, action, resource_uid, context, schema)
        .map_err(|error| error.to_string())?;
    Ok((request, entities))
}

fn argument(value: &ArgumentValue) -> RestrictedExpression {
    match value {
        ArgumentValue::String(text) => string(text),
        ArgumentValue::Long(number) => RestrictedExpression::new_long(*number),
        ArgumentValue::Bool(flag) => RestrictedExpression::new_bool(*flag),
        ArgumentValue::Strings(items) => strings(items.iter().cloned()),
    }
}

fn string(text: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(text.to_owned())
}

fn strings(texts: impl Iterator<Item = String>) -> RestrictedExpression {
    RestrictedExpression::new_set(texts.map(RestrictedExpression::new_string))
}

fn seconds(duration: Duration) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(duration.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::scope::AllowedWorkloads;
    use crate::domain::{CredentialKind, Labels, ScopeName, SpiffeId, WorkloadName};
    use crate::policy::load::{BUILT_IN_SCHEMA, schema_for};

    /// Decisions are made without the schema (it costs a validation per request), so the
    /// requests Warrant builds must conform to it: checked here with it, both with and without
    /// a risk signal, with labels in every set.
    #[test]
    fn requests_conform_to_warrants_schema() {
        let (schema, _) = Schema::from_cedarschema_str(BUILT_IN_SCHEMA).unwrap();
        let labels = Labels::parse("labels", [(&"team".to_owned(), &"x".to_owned())]).unwrap();
        let caller = Caller {
            workload_id: "w".into(),
            name: WorkloadName::parse("name", "probe").unwrap(),
            spiffe_id: SpiffeId::from_stored("spiffe://probe.local/probe".into()),
            roles: vec![Role::Agent, Role::Operator],
            audiences: Vec::new(),
            certificate_thumbprint: Some("t".into()),
            labels: labels.clone(),
        };
        let scope = ScopeDefinition {
            name: ScopeName::parse("name", "probe:read").unwrap(),
            description: String::new(),
            audience: "https://probe.local".into(),
            kind: CredentialKind::Jwt,
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(60),
            allowed_workloads: AllowedWorkloads::Any,
            labels,
            max_uses: None,
        };
        let context = TaskContext {
            prompt_digest: Some(format!("sha256:{}", "a".repeat(64))),
            planned_tools: vec!["crm.search".into()],
            labels: [("ticket".to_owned(), "T-1".to_owned())].into(),
        };
        for risk in [None, Some(0), Some(100)] {
            GrantQuery {
                caller: &caller,
                scope: &scope,
                facts: facts(&context, risk),
            }
            .to_cedar(Some(&schema))
            .unwrap();
        }
        UseQuery {
            holder: &caller,
            scope: &scope,
            facts: facts(&context, None),
            action: "invoices.read",
            resource: "invoice/42",
            checked_by: "billing-api",
        }
        .to_cedar(Some(&schema))
        .unwrap();
        let catalog = crate::domain::Catalog::from_toml(
            r#"
            [[tool]]
            name = "mail.send"
            audience = "https://mail.probe"
            workloads = ["*"]
            labels = { domain = "mail" }
            [tool.arguments]
            to = { type = "string" }
            count = { type = "long", required = false }
            urgent = { type = "bool", required = false }
            cc = { type = "strings", required = false }
            "#,
        )
        .unwrap();
        let (schema, _) =
            Schema::from_cedarschema_str(&schema_for(catalog.tool_arguments())).unwrap();
        let tool = catalog.tool("mail.send").unwrap();
        let arguments = tool
            .check_arguments(r#"{"to":"a@b","count":2,"urgent":true,"cc":["c@d"]}"#)
            .unwrap();
        for (action, arguments) in [
            (ToolAction::Call, Some(&arguments)),
            (ToolAction::List, None),
        ] {
            ToolQuery {
                caller: &caller,
                tool,
                action,
                arguments,
                facts: facts(&context, Some(3)),
            }
            .to_cedar(Some(&schema))
            .unwrap();
        }
    }

    fn facts(context: &TaskContext, risk: Option<u32>) -> TaskFacts<'_> {
        TaskFacts {
            purpose: "probe",
            context,
            requested_ttl: Duration::from_secs(60),
            delegation_depth: 0,
            now: UnixMillis(1_700_000_000_000),
            risk,
        }
    }
}
