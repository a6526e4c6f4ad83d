//! `warrant token ...`: what a downstream API does with a token it receives.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::output::{Format, text};
use super::{Cli, CommandError};
use crate::proto;
use crate::verifier::{Verifier, VerifierConfig, VerifyError};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Ask the broker whether a token is active for an audience (RFC 7662).
    Introspect {
        /// The token, or - to read it from standard input.
        #[arg(value_name = "TOKEN")]
        access_token: String,
        /// The audience your API serves (a URL from the scope catalog).
        #[arg(long)]
        audience: String,
        /// The client certificate (PEM) the token came with: a token bound to a certificate
        /// is active only with that one.
        #[arg(long)]
        client_cert: Option<PathBuf>,
        /// What your API is about to do with the token (e.g. invoices.delete): the broker's
        /// policy then decides whether its holder may (UseToken).
        #[arg(long)]
        action: Option<String>,
        /// What the action is on (e.g. invoice/42); needs --action.
        #[arg(long, requires = "action")]
        resource: Option<String>,
    },
    /// Verify a token offline against the broker's JWKS and revocation feed, as the verifier
    /// library does. Exits 0 when valid, 1 when not, 69 when it could not be checked (broker
    /// unreachable, or its revocation feed silent).
    Verify {
        /// The token, or - to read it from standard input.
        #[arg(value_name = "TOKEN")]
        access_token: String,
        /// The audience your API serves; tokens for another audience are invalid.
        #[arg(long)]
        audience: String,
        /// Tolerated clock difference.
        #[arg(long, default_value = "5s")]
        leeway: String,
        /// The client certificate (PEM) the token came with: a token bound to a certificate
        /// is valid only with that one.
        #[arg(long)]
        client_cert: Option<PathBuf>,
    },
}

pub async fn run(
    cli: &Cli,
    command: &TokenCommand,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    match command {
        TokenCommand::Introspect {
            access_token,
            audience,
            client_cert,
            action,
            resource,
        } => {
            cli.require_identity()?;
            let thumbprint = client_certificate(client_cert.as_deref())?
                .map(|der| crate::identity::thumbprint(&der))
                .unwrap_or_default();
            let request = proto::IntrospectRequest {
                token: read_token(access_token)?,
                audience: audience.clone(),
                client_certificate_thumbprint: thumbprint,
                action: action.clone().unwrap_or_default(),
                resource: resource.clone().unwrap_or_default(),
            };
            let response = cli
                .connect()
                .await?
                .tokens()
                .introspect(request)
                .await?
                .into_inner();
            let value = if response.active {
                json!({
                    "active": true, "scope": response.scope, "client_id": response.client_id, "sub": response.sub,
                    "aud": response.aud, "iss": response.iss, "exp": response.exp, "iat": response.iat,
                    "nbf": response.nbf, "jti": response.jti, "task_id": response.task_id,
                    "token_type": response.token_type, "cnf_x5t_s256": response.cnf_x5t_s256,
                    "tool": response.tool, "arguments_digest": response.arguments_digest,
                    "uses": response.uses,
                })
            } else {
                json!({ "active": false, "reason": response.reason })
            };
            format.print(&value, |value| {
                if value["active"] == true {
                    // A call token also names the call it is for.
                    let call = match text(value, "tool") {
                        "" => String::new(),
                        tool => format!(
                            "  tool   {tool}\n  args   {}\n",
                            text(value, "arguments_digest")
                        ),
                    };
                    let uses = match value["uses"].as_u64() {
                        Some(uses) if uses > 0 => format!("  uses   {uses}\n"),
                        _ => String::new(),
                    };
                    format!(
                        "active: true\n  scope  {}\n  sub    {}\n  task   {}\n  jti    {}\n{call}{uses}",
                        text(value, "scope"),
                        text(value, "sub"),
                        text(value, "task_id"),
                        text(value, "jti")
                    )
                } else {
                    match text(value, "reason") {
                        "" => "active: false\n".to_owned(),
                        reason => format!("active: false\n  reason {reason}\n"),
                    }
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Verify {
            access_token,
            audience,
            leeway,
            client_cert,
        } => {
            let credential = cli.require_token()?.to_owned();
            let leeway = humantime::parse_duration(leeway)
                .map_err(|error| CommandError::Usage(format!("--leeway: {error}")))?;
            let ca_pem = cli
                .ca_cert
                .as_ref()
                .map(|path| {
                    std::fs::read(path)
                        .map_err(|error| CommandError::Usage(format!("--ca-cert: {error}")))
                })
                .transpose()?;
            let config = VerifierConfig {
                leeway,
                ca_pem,
                ..VerifierConfig::new(&cli.addr, audience, credential)
            };
            let certificate = client_certificate(client_cert.as_deref())?;
            let verifier = Verifier::connect(config).await?;
            let verdict = verifier
                .verify_from_client(&read_token(access_token)?, certificate.as_deref())
                .await;
            let (value, code) = match verdict {
                Ok(claims) => (
                    json!({ "valid": true, "claims": claims }),
                    ExitCode::SUCCESS,
                ),
                Err(error @ VerifyError::Stale { .. }) => (
                    json!({ "valid": false, "checked": false, "reason": error.to_string() }),
                    ExitCode::from(super::EXIT_UNAVAILABLE),
                ),
                Err(error) => (
                    json!({ "valid": false, "reason": error.to_string() }),
                    ExitCode::from(super::EXIT_FAILURE),
                ),
            };
            format.print(&value, |value| {
                if value["valid"] == true {
                    let claims = &value["claims"];
                    format!(
                        "valid\n  scope  {}\n  sub    {}\n  task   {}\n  expires in {}\n",
                        text(claims, "scope"),
                        text(claims, "sub"),
                        text(claims, "task_id"),
                        remaining(claims["exp"].as_i64().unwrap_or_default()),
                    )
                } else if value["checked"] == false {
                    format!("not checked: {}\n", text(value, "reason"))
                } else {
                    format!("invalid: {}\n", text(value, "reason"))
                }
            })?;
            Ok(code)
        }
    }
}

/// The DER of the certificate in the PEM file `--client-cert`, if given.
fn client_certificate(path: Option<&Path>) -> Result<Option<Vec<u8>>, CommandError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let refuse =
        |why: String| CommandError::Usage(format!("--client-cert {}: {why}", path.display()));
    let pem = std::fs::read_to_string(path).map_err(|error| refuse(error.to_string()))?;
    crate::identity::pem::first_certificate_der(&pem)
        .map(Some)
        .ok_or_else(|| refuse("no PEM certificate in it".into()))
}

/// The token argument, or standard input for `-`, trimmed.
fn read_token(argument: &str) -> Result<String, CommandError> {
    if argument != "-" {
        return Ok(argument.trim().to_owned());
    }
    let mut token = String::new();
    std::io::stdin()
        .take(16 * 1024)
        .read_to_string(&mut token)
        .map_err(|error| {
            CommandError::Usage(format!("reading the token from standard input: {error}"))
        })?;
    Ok(token.trim().to_owned())
}

fn remaining(exp: i64) -> String {
    let now = crate::domain::UnixMillis::now().as_seconds();
    let seconds = u64::try_from(exp - now).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}
