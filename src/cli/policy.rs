//! `warrant policy ...`: validate a policy set and try requests against it before loading it,
//! offline: the same loader and evaluator the broker uses, no broker needed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::output::{Format, text};
use super::{CommandError, key_values};
use crate::broker::IntendedUse;
use crate::domain::task::{MAX_RISK, parse_risk, parse_ttl_seconds};
use crate::domain::{
    Caller, Catalog, Labels, Role, ScopeName, SpiffeId, TaskContext, UnixMillis, WorkloadName,
};
use crate::policy::{
    Decision, GrantQuery, PolicySource, TaskFacts, ToolAction, ToolQuery, UseQuery,
};

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing would only obscure the arguments"
)]
pub enum PolicyCommand {
    /// Print Warrant's Cedar schema: what every request carries, what policies may read
    /// (`context.arguments` typed by the catalog's tools).
    Schema {
        /// The scope catalog whose tools' arguments the schema declares (default: the --dev
        /// data directory's scopes.toml, if there is one).
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Parse and validate a policy directory against its schema, as a reload would.
    Check {
        /// The directory of *.cedar files (default: the --dev data directory's policy/).
        dir: Option<PathBuf>,
        /// The scope catalog (default: the --dev data directory's scopes.toml, if any).
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
    /// Decide one grant request against a policy directory and print the answer.
    Test {
        /// The directory of *.cedar files (default: the --dev data directory's policy/).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The scope catalog the scope is read from (default: the --dev data directory's
        /// scopes.toml).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// The workload asking (its registration entry's name).
        #[arg(long)]
        workload: String,
        /// A role of the workload (repeatable; default: agent).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// A label KEY=VALUE of the workload's entry (repeatable).
        #[arg(long = "workload-label")]
        workload_labels: Vec<String>,
        /// The scope asked for (or --call).
        #[arg(long, conflicts_with = "call", required_unless_present = "call")]
        scope: Option<String>,
        /// A tool call to decide instead of a scope: the tool, from the catalog's [[tool]].
        #[arg(long)]
        call: Option<String>,
        /// The call's arguments, a JSON object, e.g. '{"order_id":"A-1","amount_cents":500}'.
        #[arg(long = "args", default_value = "{}", requires = "call")]
        arguments: String,
        /// Decide one use of a --scope token instead of its grant (UseToken): the action the
        /// resource server names when it introspects, e.g. contacts.delete.
        #[arg(long = "use", value_name = "ACTION", requires = "scope")]
        use_action: Option<String>,
        /// What the use is on, e.g. contact/42 (with --use).
        #[arg(long = "on", value_name = "RESOURCE", requires = "use_action")]
        use_resource: Option<String>,
        /// The resource server asking (with --use).
        #[arg(long = "checked-by", value_name = "NAME", requires = "use_action")]
        checked_by: Option<String>,
        #[arg(long, default_value = "policy test")]
        purpose: String,
        /// The lease lifetime asked for, e.g. 5m (default: the scope's).
        #[arg(long)]
        ttl: Option<String>,
        /// A tool the task plans to call (repeatable).
        #[arg(long = "tool")]
        tools: Vec<String>,
        /// A task label KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// The caller's risk signal, 0 to 100.
        #[arg(long)]
        risk: Option<u32>,
        /// Decide at this hour (UTC, 0-23) of today (default: now).
        #[arg(long)]
        hour: Option<u8>,
        /// Whether the workload authenticates with its X.509-SVID (else a bearer credential).
        #[arg(long)]
        svid: bool,
        /// Exit 1 unless the answer is this one: allow, deny or step-up.
        #[arg(long)]
        expect: Option<String>,
    },
}

/// The catalog at `path`, else the --dev data directory's; without either, an empty one
/// unless `required`.
fn read_catalog(path: Option<&PathBuf>, required: bool) -> Result<Catalog, CommandError> {
    let file = path
        .cloned()
        .unwrap_or_else(|| data_dir().join("scopes.toml"));
    if path.is_none() && !required && !file.exists() {
        return Ok(Catalog::default());
    }
    let text = std::fs::read_to_string(&file)
        .map_err(|error| CommandError::Usage(format!("--catalog {}: {error}", file.display())))?;
    Catalog::from_toml(&text).map_err(|error| CommandError::Usage(format!("--catalog: {error}")))
}

fn schema_for(catalog: &Catalog) -> String {
    crate::policy::load::schema_for(catalog.tool_arguments())
}

pub fn run(command: &PolicyCommand, format: &Format) -> Result<ExitCode, CommandError> {
    match command {
        PolicyCommand::Schema { catalog } => {
            let catalog = read_catalog(catalog.as_ref(), false)?;
            print!("{}", schema_for(&catalog));
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check { dir, catalog } => {
            let catalog = read_catalog(catalog.as_ref(), false)?;
            let source =
                PolicySource::Dir(dir.clone().unwrap_or_else(|| data_dir().join("policy")));
            let loaded = crate::policy::load::load(&source, &schema_for(&catalog))
                .map_err(|error| CommandError::Usage(format!("policy refused: {error}")))?;
            let summary = &loaded.summary;
            let value = json!({
                "source": summary.source,
                "digest": summary.digest,
                "policies": summary.decision_policies,
                "approval_rules": summary.approval_rules,
            });
            format.print(&value, |value| {
                format!(
                    "ok: {} policies and {} approval rules in {}\ndigest  {}\n",
                    summary.decision_policies.len(),
                    summary.approval_rules.len(),
                    text(value, "source"),
                    text(value, "digest"),
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test {
            dir,
            catalog,
            workload,
            roles,
            workload_labels,
            scope,
            call,
            arguments,
            use_action,
            use_resource,
            checked_by,
            purpose,
            ttl,
            tools,
            labels,
            risk,
            hour,
            svid,
            expect,
        } => {
            let usage = |error: crate::error::Error| CommandError::Usage(error.to_string());
            let source =
                PolicySource::Dir(dir.clone().unwrap_or_else(|| data_dir().join("policy")));
            let catalog = read_catalog(catalog.as_ref(), true)?;
            let loaded = crate::policy::load::load(&source, &schema_for(&catalog))
                .map_err(|error| CommandError::Usage(format!("policy refused: {error}")))?;
            let roles = match roles.as_slice() {
                [] => vec![Role::Agent],
                roles => roles
                    .iter()
                    .map(|role| {
                        Role::parse(role).ok_or_else(|| {
                            CommandError::Usage(format!(
                                "--role {role}: one of agent, operator, admin, resource_server"
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            };
            let name = WorkloadName::parse("--workload", workload).map_err(usage)?;
            let entry_labels = key_values("--workload-label", workload_labels)?;
            let caller = Caller {
                workload_id: String::new(),
                spiffe_id: SpiffeId::from_stored(format!("spiffe://policy-test/{name}")),
                name,
                roles,
                audiences: Vec::new(),
                certificate_thumbprint: svid.then(String::new),
                labels: Labels::parse("--workload-label", entry_labels.iter().map(|(k, v)| (k, v)))
                    .map_err(usage)?,
            };
            let context = TaskContext::parse("", tools.clone(), key_values("--label", labels)?)
                .map_err(usage)?;
            let risk = parse_risk("--risk", *risk).map_err(usage)?;
            let now = match hour {
                Some(hour @ 0..=23) => {
                    let today = UnixMillis::now().0.div_euclid(MILLIS_PER_DAY) * MILLIS_PER_DAY;
                    UnixMillis(today + i64::from(*hour) * 3_600_000)
                }
                Some(_) => return Err(CommandError::Usage("--hour: 0 to 23".into())),
                None => UnixMillis::now(),
            };
            let facts = |requested_ttl| TaskFacts {
                purpose,
                context: &context,
                requested_ttl,
                delegation_depth: 0,
                now,
                risk,
            };
            let decision = match (scope, call) {
                (Some(scope), _) => {
                    let scope = ScopeName::parse("--scope", scope).map_err(usage)?;
                    let definition = catalog
                        .authorize(&caller, "--scope", &scope)
                        .map_err(usage)?;
                    // The broker's own TTL rules: whole seconds, at most the scope's max_ttl.
                    let ttl_seconds = match ttl {
                        Some(text) => super::ttl_seconds("--ttl", text)?,
                        None => 0,
                    };
                    let requested_ttl = parse_ttl_seconds("--ttl", ttl_seconds, definition.max_ttl)
                        .map_err(usage)?
                        .unwrap_or(definition.default_ttl);
                    let intended = IntendedUse::parse(
                        use_action.as_deref().unwrap_or_default(),
                        use_resource.as_deref().unwrap_or_default(),
                    )
                    .map_err(|error| {
                        // Named as this command spells them.
                        let message = error.to_string();
                        let renamed = match message.strip_prefix("action") {
                            Some(rest) => format!("--use{rest}"),
                            None => message.replacen("resource", "--on", 1),
                        };
                        CommandError::Usage(renamed)
                    })?;
                    match intended {
                        Some(intended) => loaded.decide_use(&UseQuery {
                            holder: &caller,
                            scope: definition,
                            facts: facts(requested_ttl),
                            action: &intended.action,
                            resource: &intended.resource,
                            checked_by: checked_by.as_deref().unwrap_or_default(),
                        }),
                        None => loaded.decide(&GrantQuery {
                            caller: &caller,
                            scope: definition,
                            facts: facts(requested_ttl),
                        }),
                    }
                }
                (None, Some(tool)) => {
                    let definition = catalog.authorize_tool(&caller, tool).map_err(usage)?;
                    let arguments = definition.check_arguments(arguments).map_err(|error| {
                        // Named as this command spells it.
                        CommandError::Usage(error.to_string().replacen(
                            "arguments_json",
                            "--args",
                            1,
                        ))
                    })?;
                    loaded.decide_tool(&ToolQuery {
                        caller: &caller,
                        tool: definition,
                        action: ToolAction::Call,
                        arguments: Some(&arguments),
                        facts: facts(definition.call_scope.default_ttl),
                    })
                }
                (None, None) => {
                    return Err(CommandError::Usage("name --scope or --call".into()));
                }
            };
            print_decision(&decision, format)?;
            let answer = answer_name(&decision);
            match expect.as_deref() {
                None => Ok(ExitCode::SUCCESS),
                Some(expected) if ["allow", "deny", "step-up"].contains(&expected) => {
                    if expected == answer {
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!("expected {expected}, policy answered {answer}");
                        Ok(ExitCode::FAILURE)
                    }
                }
                Some(other) => Err(CommandError::Usage(format!(
                    "--expect {other}: one of allow, deny, step-up (risk is 0 to {MAX_RISK})"
                ))),
            }
        }
    }
}

const MILLIS_PER_DAY: i64 = 86_400_000;

fn answer_name(decision: &Decision) -> &'static str {
    match decision {
        Decision::Allow { .. } => "allow",
        Decision::Deny { .. } => "deny",
        Decision::StepUp { .. } => "step-up",
    }
}

fn print_decision(decision: &Decision, format: &Format) -> Result<(), CommandError> {
    let mut value = json!({
        "decision": answer_name(decision),
        "policies": decision.policies(),
    });
    match decision {
        Decision::Allow { .. } => {}
        Decision::Deny { reason, .. } => value["reason"] = reason.as_str().into(),
        Decision::StepUp { requirement, .. } => {
            value["approval"] = json!({
                "quorum": requirement.quorum,
                "approver_role": Role::Operator.as_str(),
                "approver_labels": requirement.approver_labels,
                "wait_seconds": requirement.wait.as_secs(),
                "rules": requirement.rules,
            });
        }
    }
    format.print(&value, |value| {
        let mut out = format!(
            "decision  {}\npolicies  {}\n",
            text(value, "decision"),
            decision.policies().join(", ")
        );
        match decision {
            Decision::Allow { .. } => {}
            Decision::Deny { reason, .. } => out.push_str(&format!("reason    {reason}\n")),
            Decision::StepUp { requirement, .. } => out.push_str(&format!(
                "needs     {} (rules: {})\n",
                requirement.describe(),
                requirement.rules.join(", ")
            )),
        }
        out
    })?;
    Ok(())
}

/// The `--dev` data directory, where `serve --dev` keeps its policy and catalog.
fn data_dir() -> PathBuf {
    PathBuf::from(
        crate::config::process_environment(crate::config::ENV_DATA_DIR)
            .unwrap_or_else(|| crate::config::DEFAULT_DATA_DIR.into()),
    )
}
