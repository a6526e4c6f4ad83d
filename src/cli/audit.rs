//! `warrant audit ...`: investigating what happened, and checking that the record is intact.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use serde_json::{Value, json};

use super::output::{Format, emit, text, time};
use super::{Cli, CommandError, EXIT_FAILURE};
use crate::domain::UnixMillis;
use crate::issuer::Jwk;
use crate::proto;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Events matching filters, oldest first.
    Query {
        /// Events of this task.
        #[arg(long)]
        task: Option<String>,
        /// Events concerning or caused by this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Events concerning this scope.
        #[arg(long)]
        scope: Option<String>,
        /// Event type, such as lease.issued or grant.decided.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// From this instant: RFC 3339 (2026-11-25T10:00:00Z) or an age such as 1h.
        #[arg(long)]
        since: Option<String>,
        /// Up to this instant, same forms.
        #[arg(long)]
        until: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// A task's whole decision path as a timeline.
    Task {
        /// The task, as `task begin` printed it.
        task_id: String,
    },
    /// Every sealed event as JSON lines, for a SIEM; resume with --after the last seq seen.
    Export {
        /// Start after this sequence number (0: from the first event).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Check the hash chain and signed checkpoints; exits 1 and names the first problem.
    Verify {
        /// A trust anchor written earlier by `audit anchor` and kept outside the database.
        /// Without it, the checkpoints and keys stored in the database are trusted.
        #[arg(long, value_name = "FILE")]
        anchor: Option<PathBuf>,
    },
    /// Print a trust anchor (the latest signed checkpoint and the public keys) as JSON: keep
    /// it outside the database, and give it to `audit verify --anchor` later.
    Anchor,
    /// The HMAC the trail holds for a secret (token, credential), to search for it.
    Hash {
        /// The secret; the trail never holds it, only this keyed hash.
        value: String,
    },
}

pub async fn run(
    cli: &Cli,
    command: &AuditCommand,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    cli.require_identity()?;
    let mut admin = cli.connect().await?.admin();
    match command {
        AuditCommand::Query {
            task,
            workload,
            scope,
            event_type,
            since,
            until,
            limit,
        } => {
            let request = proto::QueryAuditRequest {
                task_id: task.clone().unwrap_or_default(),
                workload: workload.clone().unwrap_or_default(),
                scope: scope.clone().unwrap_or_default(),
                r#type: event_type.clone().unwrap_or_default(),
                since: since
                    .as_deref()
                    .map(|text| instant("--since", text))
                    .transpose()?,
                until: until
                    .as_deref()
                    .map(|text| instant("--until", text))
                    .transpose()?,
                limit: *limit,
            };
            let events = admin.query_audit(request).await?.into_inner().events;
            print_events(format, &events)?;
        }
        AuditCommand::Task { task_id } => {
            let request = proto::QueryAuditRequest {
                task_id: task_id.clone(),
                ..Default::default()
            };
            let events = admin.query_audit(request).await?.into_inner().events;
            if events.is_empty() {
                return Err(CommandError::Usage(format!(
                    "no audit events for task {task_id}"
                )));
            }
            print_events(format, &events)?;
        }
        AuditCommand::Export { after } => {
            let mut stream = admin
                .export_audit(proto::ExportAuditRequest { after_seq: *after })
                .await?
                .into_inner();
            while let Some(event) = stream.message().await? {
                if !emit(&format!("{}\n", event_json(&event))) {
                    break;
                }
            }
        }
        AuditCommand::Anchor => {
            let anchor = admin
                .get_audit_anchor(proto::GetAuditAnchorRequest {})
                .await?
                .into_inner();
            emit(&format!("{}\n", anchor_json(&anchor)));
        }
        AuditCommand::Verify { anchor } => {
            let anchor = anchor.as_deref().map(read_anchor).transpose()?;
            let report = admin
                .verify_audit(proto::VerifyAuditRequest { anchor })
                .await?
                .into_inner();
            let value = json!({
                "intact": report.intact,
                "events_checked": report.events_checked,
                "checkpoints_checked": report.checkpoints_checked,
                "unsealed": report.unsealed,
                "problem_seq": report.problem_seq,
                "problem_event_id": report.problem_event_id,
                "problem": report.problem,
                "anchored": report.anchored,
                "trusted_through_seq": report.trusted_through_seq,
                "events_after_trusted": report.events_after_trusted,
            });
            format.print(&value, |value| {
                if value["intact"] != true {
                    return format!("TAMPERED: {}\n", text(value, "problem"));
                }
                let trust = if value["anchored"] == true {
                    "a key of the anchor"
                } else {
                    "a key stored in the database (no --anchor: someone who can write the database could have rewritten both)"
                };
                format!(
                    "intact: {} events chained, {} signed checkpoints verified ({} awaiting sealing)\n\
                     events 1 to {} are vouched for by {trust}; the last {} rely on the hash chain and the stored head only\n",
                    value["events_checked"],
                    value["checkpoints_checked"],
                    value["unsealed"],
                    value["trusted_through_seq"],
                    value["events_after_trusted"],
                )
            })?;
            if !report.intact {
                return Ok(ExitCode::from(EXIT_FAILURE));
            }
        }
        AuditCommand::Hash { value } => {
            let hmac = admin
                .audit_hash(proto::AuditHashRequest {
                    value: value.clone(),
                })
                .await?
                .into_inner()
                .hmac;
            format.print(&json!({ "hmac": hmac }), |value| {
                format!("{}\n", text(value, "hmac"))
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The anchor as a file keeps it: JSON with the signature in base64 and the keys as JWKs.
fn anchor_json(anchor: &proto::AuditAnchor) -> Value {
    let checkpoint = anchor.checkpoint.clone().unwrap_or_default();
    let keys: Vec<Jwk> = anchor.keys.iter().cloned().map(Jwk::from).collect();
    json!({
        "warrant_audit_anchor": 1,
        "checkpoint": {
            "seq": checkpoint.seq,
            "head_hash": checkpoint.head_hash,
            "kid": checkpoint.kid,
            "signature": STANDARD.encode(&checkpoint.signature),
        },
        "keys": keys,
    })
}

/// Reads an anchor file written by `audit anchor`.
fn read_anchor(path: &Path) -> Result<proto::AuditAnchor, CommandError> {
    let bad = |why: String| CommandError::Usage(format!("--anchor {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|error| bad(error.to_string()))?;
    let value: Value = serde_json::from_str(&text).map_err(|error| bad(error.to_string()))?;
    let checkpoint = &value["checkpoint"];
    let field = |name: &str| {
        checkpoint[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("checkpoint.{name} is missing")))
    };
    let signature = STANDARD
        .decode(field("signature")?)
        .map_err(|_| bad("checkpoint.signature is not base64".into()))?;
    let keys: Vec<Jwk> = serde_json::from_value(value["keys"].clone())
        .map_err(|error| bad(format!("keys: {error}")))?;
    Ok(proto::AuditAnchor {
        checkpoint: Some(proto::AuditCheckpoint {
            seq: checkpoint["seq"]
                .as_u64()
                .ok_or_else(|| bad("checkpoint.seq is missing".into()))?,
            head_hash: field("head_hash")?,
            kid: field("kid")?,
            signature,
        }),
        keys: keys.into_iter().map(proto::Jwk::from).collect(),
    })
}

fn event_json(event: &proto::AuditEvent) -> Value {
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    json!({
        "seq": event.seq,
        "id": event.id,
        "occurred_at": precise_time(event.occurred_at.as_ref()),
        "type": event.r#type,
        "outcome": event.outcome,
        "actor": event.actor,
        "workload": event.workload,
        "task_id": event.task_id,
        "scope": event.scope,
        "lease_id": event.lease_id,
        "detail": parse(&event.detail_json),
        "context": parse(&event.context_json),
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    })
}

fn print_events(format: &Format, events: &[proto::AuditEvent]) -> Result<(), CommandError> {
    let value = json!({ "events": events.iter().map(event_json).collect::<Vec<_>>() });
    format.print(&value, |value| {
        value["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(timeline_line)
            .collect()
    })
}

/// One readable line per event: when, what, outcome, who, and the detail that explains it.
fn timeline_line(event: &Value) -> String {
    let mut line = format!(
        "{}  {:<20} {:<10} by {}",
        text(event, "occurred_at"),
        text(event, "type"),
        text(event, "outcome"),
        text(event, "actor")
    );
    for key in ["scope", "lease_id"] {
        if !text(event, key).is_empty() {
            line.push_str(&format!("  {key}={}", text(event, key)));
        }
    }
    if let Some(detail) = event["detail"].as_object() {
        for (key, value) in detail {
            let shown = match (value.as_i64(), is_instant_field(key)) {
                (Some(millis), true) => UnixMillis(millis).to_string(),
                _ => value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_owned),
            };
            line.push_str(&format!("  {key}={shown}"));
        }
    }
    if event["type"] == "task.begun" && event["context"].is_object() {
        line.push_str(&format!("  context={}", event["context"]));
    }
    line.push('\n');
    line
}

/// Detail fields that hold an instant in Unix milliseconds: shown in RFC 3339 to people, kept
/// raw in `--json`.
fn is_instant_field(key: &str) -> bool {
    matches!(key, "deadline" | "not_after") || key.ends_with("_at")
}

/// RFC 3339 with milliseconds, so a timeline keeps the order of events within a second.
fn precise_time(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(|at| {
        let seconds = u64::try_from(at.seconds).ok()?;
        let instant = UNIX_EPOCH
            + Duration::from_secs(seconds)
            + Duration::from_nanos(u64::try_from(at.nanos).ok()?);
        Some(humantime::format_rfc3339_millis(instant).to_string())
    })
    .unwrap_or_else(|| time(at))
}

/// An RFC 3339 instant, or an age such as `15m` counted back from now.
fn instant(flag: &str, text: &str) -> Result<prost_types::Timestamp, CommandError> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => {
            let age = humantime::parse_duration(text).map_err(|_| {
                CommandError::Usage(format!(
                    "{flag}: '{text}' is neither RFC 3339 nor an age such as 1h"
                ))
            })?;
            SystemTime::now() - age
        }
    };
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or_default(),
    })
}
