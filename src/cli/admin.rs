//! `warrant admin ...`: registering workloads, revoking, rotating keys.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::output::{Format, text, time};
use super::{Cli, CommandError};
use crate::proto;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Register, list and delete workloads: the registration entries that name an identity.
    #[command(subcommand, visible_alias = "entry")]
    Workload(WorkloadCommand),
    /// Revoke a lease, a task with all its leases, every task of a workload, or every lease of
    /// a scope; each revoked lease is reported on the revocation feed.
    #[command(group(clap::ArgGroup::new("target").required(true)))]
    Revoke {
        /// Revoke this task and every lease it holds.
        #[arg(long, group = "target")]
        task: Option<String>,
        /// Revoke only this lease.
        #[arg(long, group = "target")]
        lease: Option<String>,
        /// Revoke every active task of this workload (its identity stays: see revoke-identity).
        #[arg(long, group = "target")]
        workload: Option<String>,
        /// Revoke every issued lease of this scope (tool:<name> for a tool's call tokens).
        #[arg(long, group = "target")]
        scope: Option<String>,
    },
    /// Start signing with a new key; the old one stays published until its tokens expire.
    RotateKey,
    /// Rotate the X.509 CA: a new CA signs SVIDs after the activation delay; the current one
    /// stays in the trust bundle until every SVID it signed has expired.
    RotateCa {
        /// Seconds before the new CA signs (default 300, the bundle's refresh hint), so bundle
        /// consumers fetch its root first.
        #[arg(long)]
        activate_in: Option<u32>,
    },
    /// Make the broker read its policy directory again; an invalid set is refused with the
    /// validator's message and the set in force stays (SIGHUP does the same).
    ReloadPolicy,
    /// Create a one-time join token for a workload (shown only once): `warrant svid attest`
    /// trades it for the workload's first X.509-SVID.
    JoinToken {
        /// The workload's name.
        name: String,
        /// How long the token may wait for its use (at most 24h).
        #[arg(long, default_value = "10m", allow_hyphen_values = true)]
        ttl: String,
    },
    /// The kill switch: refuse every credential, SVID and join token of a workload from now on,
    /// and revoke each of its open tasks.
    RevokeIdentity {
        /// The workload's name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum WorkloadCommand {
    /// Register a workload and print its credential (shown only once).
    Create {
        /// A name for the workload, unique in this broker.
        name: String,
        /// Its SPIFFE ID, in the broker's trust domain (default:
        /// spiffe://<trust domain>/workload/<name>).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Role (repeatable): agent opens tasks; resource-server is a downstream API that
        /// introspects and follows revocations of its --audience; admin manages the broker;
        /// operator approves high-risk grants.
        #[arg(long = "role", value_enum, default_values_t = [RoleArg::Agent])]
        roles: Vec<RoleArg>,
        /// An audience a resource-server serves (repeatable; required for that role).
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// No bearer credential: the workload authenticates only with the X.509-SVID it gets
        /// from a join token (`warrant admin join-token`), and holds no long-lived secret.
        #[arg(long)]
        no_credential: bool,
        /// What the workload must prove to attest by Unix identity (repeatable):
        /// unix:uid:<uid>, unix:gid:<gid>, unix:sha256:<hex SHA-256 of its executable>.
        #[arg(long = "selector")]
        selectors: Vec<String>,
        /// A label for policy to read, as key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List registered workloads.
    List,
    /// Delete a workload's entry: the kill switch (`revoke-identity`), and its selectors are
    /// free for another entry. Its name and SPIFFE ID are never given out again.
    Delete {
        /// The workload's name.
        name: String,
    },
    /// Give a workload a new credential (shown only once); its earlier ones stop working now.
    Rotate {
        /// The workload's name.
        name: String,
    },
    /// Revoke every credential of a workload: its calls are refused from now on.
    Revoke {
        /// The workload's name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Agent,
    Admin,
    ResourceServer,
    Operator,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("'{text}' is not key=value"))
}

pub async fn run(
    cli: &Cli,
    command: &AdminCommand,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    cli.require_identity()?;
    let mut admin = cli.connect().await?.admin();
    match command {
        AdminCommand::Workload(WorkloadCommand::Create {
            name,
            roles,
            audiences,
            no_credential,
            selectors,
            spiffe_id,
            labels,
        }) => {
            let roles = roles
                .iter()
                .map(|role| match role {
                    RoleArg::Agent => proto::Role::Agent as i32,
                    RoleArg::Admin => proto::Role::Admin as i32,
                    RoleArg::ResourceServer => proto::Role::ResourceServer as i32,
                    RoleArg::Operator => proto::Role::Operator as i32,
                })
                .collect();
            let response = admin
                .create_workload(proto::CreateWorkloadRequest {
                    name: name.clone(),
                    roles,
                    audiences: audiences.clone(),
                    no_bearer_credential: *no_credential,
                    selectors: selectors.clone(),
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    labels: labels.iter().cloned().collect(),
                })
                .await?
                .into_inner();
            print_credential(
                format,
                response.workload,
                &response.credential,
                "Warrant keeps only its hash",
            )?;
        }
        AdminCommand::Workload(WorkloadCommand::Rotate { name }) => {
            let response = admin
                .rotate_workload_credential(proto::RotateWorkloadCredentialRequest {
                    name: name.clone(),
                })
                .await?
                .into_inner();
            print_credential(
                format,
                response.workload,
                &response.credential,
                "every earlier credential of this workload is revoked",
            )?;
        }
        AdminCommand::Workload(WorkloadCommand::Revoke { name }) => {
            let response = admin
                .revoke_workload_credentials(proto::RevokeWorkloadCredentialsRequest {
                    name: name.clone(),
                })
                .await?
                .into_inner();
            let value = workload_json(&response.workload.unwrap_or_default());
            format.print(&value, |value| {
                format!(
                    "workload {}: every credential revoked; its calls are refused from now on\n",
                    text(value, "name")
                )
            })?;
        }
        AdminCommand::Workload(WorkloadCommand::List) => {
            let workloads = admin
                .list_workloads(proto::ListWorkloadsRequest {})
                .await?
                .into_inner()
                .workloads;
            let value =
                json!({ "workloads": workloads.iter().map(workload_json).collect::<Vec<_>>() });
            format.print(&value, |value| {
                value["workloads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|workload| {
                        format!(
                            "{:<24} {:<48} {}\n",
                            text(workload, "name"),
                            text(workload, "spiffe_id"),
                            workload["roles"]
                        )
                    })
                    .collect()
            })?;
        }
        AdminCommand::Revoke {
            task,
            lease,
            workload,
            scope,
        } => {
            use proto::revoke_request::Target;
            // clap makes exactly one of them present.
            let target = task
                .clone()
                .map(Target::TaskId)
                .or_else(|| lease.clone().map(Target::LeaseId))
                .or_else(|| workload.clone().map(Target::Workload))
                .or_else(|| scope.clone().map(Target::Scope))
                .ok_or_else(|| {
                    CommandError::Usage("give --task, --lease, --workload or --scope".into())
                })?;
            let response = admin
                .revoke(proto::RevokeRequest {
                    target: Some(target),
                })
                .await?
                .into_inner();
            let value = json!({ "revoked_lease_ids": response.revoked_lease_ids });
            format.print(&value, |value| {
                value["revoked_lease_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|id| format!("revoked {}\n", id.as_str().unwrap_or_default()))
                    .collect()
            })?;
        }
        AdminCommand::JoinToken { name, ttl } => {
            let response = admin
                .create_join_token(proto::CreateJoinTokenRequest {
                    name: name.clone(),
                    ttl_seconds: super::ttl_seconds("--ttl", ttl)?,
                })
                .await?
                .into_inner();
            let value = json!({
                "join_token": response.join_token,
                "expires_at": time(response.expires_at.as_ref()),
            });
            format.print(&value, |value| {
                format!(
                    "join token {}
expires    {}
(shown only now; usable once: give it to the \
                     workload as WARRANT_JOIN_TOKEN for `warrant svid attest`)\n",
                    text(value, "join_token"),
                    text(value, "expires_at")
                )
            })?;
        }
        AdminCommand::RevokeIdentity { name } => {
            let response = admin
                .revoke_identity(proto::RevokeIdentityRequest { name: name.clone() })
                .await?
                .into_inner();
            print_identity_end(format, response, "")?;
        }
        AdminCommand::Workload(WorkloadCommand::Delete { name }) => {
            let response = admin
                .delete_workload(proto::DeleteWorkloadRequest { name: name.clone() })
                .await?
                .into_inner();
            print_identity_end(format, response, "entry deleted; ")?;
        }
        AdminCommand::RotateKey => {
            let response = admin
                .rotate_signing_key(proto::RotateSigningKeyRequest {})
                .await?
                .into_inner();
            let value = json!({
                "new_kid": response.new_kid,
                "retired_kid": response.retired_kid,
                "retired_key_published_until": time(response.retired_key_published_until.as_ref()),
            });
            format.print(&value, |value| {
                format!(
                    "signing with {}\nretired {} (published until {})\n",
                    text(value, "new_kid"),
                    text(value, "retired_kid"),
                    text(value, "retired_key_published_until")
                )
            })?;
        }
        AdminCommand::ReloadPolicy => {
            let response = admin
                .reload_policy(proto::ReloadPolicyRequest {})
                .await?
                .into_inner();
            let value = json!({
                "source": response.source,
                "digest": response.digest,
                "policies": response.policies,
                "approval_rules": response.approval_rules,
            });
            format.print(&value, |value| {
                format!(
                    "policy reloaded from {}
digest          {}
policies        {}
approval rules  {}
",
                    text(value, "source"),
                    text(value, "digest"),
                    response.policies.join(", "),
                    response.approval_rules.join(", ")
                )
            })?;
        }
        AdminCommand::RotateCa { activate_in } => {
            let response = admin
                .rotate_ca(proto::RotateCaRequest {
                    activation_delay_seconds: *activate_in,
                })
                .await?
                .into_inner();
            let value = json!({
                "new_ca_id": response.new_ca_id,
                "activates_at": time(response.activates_at.as_ref()),
                "retired_ca_id": response.retired_ca_id,
                "retired_ca_published_until": time(response.retired_ca_published_until.as_ref()),
            });
            format.print(&value, |value| {
                format!(
                    "new CA {} signs from {}\nretired CA {} (in the trust bundle until {})\n",
                    text(value, "new_ca_id"),
                    text(value, "activates_at"),
                    text(value, "retired_ca_id"),
                    text(value, "retired_ca_published_until")
                )
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A workload with its new credential, which is shown only now.
fn print_credential(
    format: &Format,
    workload: Option<proto::Workload>,
    credential: &str,
    note: &str,
) -> Result<(), CommandError> {
    let mut value = workload_json(&workload.unwrap_or_default());
    if credential.is_empty() {
        return format.print(&value, |value| {
            format!(
                "workload   {}\nspiffe id  {}\nno bearer credential: it authenticates with the \
                 X.509-SVID a join token buys (`warrant admin join-token {}`)\n",
                text(value, "name"),
                text(value, "spiffe_id"),
                text(value, "name")
            )
        });
    }
    value["credential"] = json!(credential);
    format.print(&value, |value| {
        format!(
            "workload   {}\nspiffe id  {}\ncredential {}\n(shown only now; {note})\n",
            text(value, "name"),
            text(value, "spiffe_id"),
            text(value, "credential")
        )
    })
}

/// What the kill switch did; `prefix` opens the text line.
fn print_identity_end(
    format: &Format,
    response: proto::RevokeIdentityResponse,
    prefix: &str,
) -> Result<(), CommandError> {
    let mut value = workload_json(&response.workload.unwrap_or_default());
    value["revoked_task_ids"] = json!(response.revoked_task_ids);
    value["revoked_leases"] = json!(response.revoked_leases);
    format.print(&value, |value| {
        format!(
            "workload {}: {prefix}every credential, SVID and join token refused from now on; \
             {} open task(s) and {} lease(s) revoked\n",
            text(value, "name"),
            value["revoked_task_ids"].as_array().map_or(0, Vec::len),
            value["revoked_leases"]
        )
    })
}

fn workload_json(workload: &proto::Workload) -> Value {
    json!({
        "name": workload.name,
        "spiffe_id": workload.spiffe_id,
        "roles": workload.roles().map(|role| role.as_str_name()).collect::<Vec<_>>(),
        "created_at": time(workload.created_at.as_ref()),
        "audiences": workload.audiences,
        "selectors": workload.selectors,
        "labels": workload.labels,
        "revoked_at": workload.revoked_at.as_ref().map(|at| time(Some(at))),
    })
}
