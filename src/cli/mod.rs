//! The `warrant` command line: `serve` runs a broker; the other commands are gRPC clients of one.

mod admin;
mod approvals;
mod audit;
mod output;
mod policy;
mod serve;
mod svid;
mod task;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{ClientIdentity, Connection};

/// Exit code for a refused or failed call to the broker, and for an invalid token.
const EXIT_FAILURE: u8 = 1;
/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code when the broker could not be reached or could not answer, so nothing was decided
/// (sysexits EX_UNAVAILABLE): a token that "could not be checked" is not an invalid one.
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "warrant",
    version,
    about = "Short-lived, task-scoped credentials for AI agents"
)]
pub struct Cli {
    /// gRPC address of the broker.
    #[arg(
        long,
        global = true,
        env = "WARRANT_ADDR",
        default_value = "http://127.0.0.1:7400"
    )]
    addr: String,
    /// Workload credential to call the broker with.
    #[arg(long, global = true, env = "WARRANT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed an https:// broker's certificate.
    #[arg(long, global = true, env = "WARRANT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Directory holding this workload's X.509-SVID (from `warrant svid attest`): calls
    /// present it as TLS client certificate instead of a bearer credential.
    #[arg(long, global = true, env = "WARRANT_SVID_DIR")]
    svid_dir: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Print only this field of the result (dotted path into the JSON form, e.g. `task_id`).
    #[arg(long, global = true)]
    field: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Open, extend and complete tasks (as an agent).
    #[command(subcommand)]
    Task(task::TaskCommand),
    /// Check access tokens (as a downstream API).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Manage the broker (as an admin).
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Investigate the audit trail and check its integrity (as an admin).
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Get and renew this workload's X.509-SVID (its identity without a long-lived secret).
    #[command(subcommand)]
    Svid(svid::SvidCommand),
    /// See and answer the grants that wait for approval (as an operator).
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Validate a policy set and try requests against it, offline (as an admin).
    #[command(subcommand)]
    Policy(Box<policy::PolicyCommand>),
}

/// Parses the command line and runs the command.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async move {
        let format = output::Format::new(cli.json, cli.field.clone());
        let result = match &cli.command {
            Command::Serve(args) => return serve::run(args).await,
            Command::Task(command) => task::run(&cli, command, &format).await,
            Command::Token(command) => token::run(&cli, command, &format).await,
            Command::Admin(command) => admin::run(&cli, command, &format).await,
            Command::Audit(command) => audit::run(&cli, command, &format).await,
            Command::Svid(command) => svid::run(&cli, command, &format).await,
            Command::Policy(command) => policy::run(command, &format),
            Command::Approvals(command) => approvals::run(&cli, command, &format).await,
        };
        match result {
            Ok(code) => code,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(error.exit_code())
            }
        }
    })
}

/// A client command's failure.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] crate::client::ClientError),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error(transparent)]
    Verifier(#[from] crate::verifier::VerifierError),
}

impl CommandError {
    fn exit_code(&self) -> u8 {
        match self {
            CommandError::Usage(_) => EXIT_USAGE,
            CommandError::Connect(_) | CommandError::Verifier(_) => EXIT_UNAVAILABLE,
            CommandError::Rpc(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) =>
            {
                EXIT_UNAVAILABLE
            }
            CommandError::Rpc(_) => EXIT_FAILURE,
        }
    }
}

impl Cli {
    /// Connects to the broker with the configured credential.
    async fn connect(&self) -> Result<Connection, CommandError> {
        let ca = self
            .ca_cert
            .as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|error| {
                    CommandError::Usage(format!("--ca-cert {}: {error}", path.display()))
                })
            })
            .transpose()?;
        let identity = self
            .svid_dir
            .as_ref()
            .map(|dir| {
                let read = |file: &str| {
                    std::fs::read(dir.join(file)).map_err(|error| {
                        CommandError::Usage(format!(
                            "--svid-dir {}: {file}: {error}",
                            dir.display()
                        ))
                    })
                };
                Ok::<_, CommandError>(ClientIdentity {
                    certificate_pem: read(svid::CERTIFICATE_FILE)?,
                    private_key_pem: read(svid::KEY_FILE)?,
                })
            })
            .transpose()?;
        Ok(Connection::open_as(
            &self.addr,
            self.token.as_deref(),
            ca.as_deref(),
            identity.as_ref(),
        )
        .await?)
    }

    /// Refuses a command that needs an identity when neither an SVID nor a credential is set.
    fn require_identity(&self) -> Result<(), CommandError> {
        match (&self.svid_dir, &self.token) {
            (None, None) => Err(CommandError::Usage(
                "this command needs an identity: --svid-dir / WARRANT_SVID_DIR (an X.509-SVID) \
                 or --token / WARRANT_TOKEN (a workload credential)"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    fn require_token(&self) -> Result<&str, CommandError> {
        self.token.as_deref().ok_or_else(|| {
            CommandError::Usage(
                "this command needs a workload credential: --token or WARRANT_TOKEN".into(),
            )
        })
    }
}

/// Parses a duration such as `10m` into whole seconds for a request field, refusing in words
/// what the broker would refuse or misread (0 means "the default" on the wire).
fn ttl_seconds(flag: &str, text: &str) -> Result<u32, CommandError> {
    let refuse = |why: &str| {
        CommandError::Usage(format!(
            "{flag} {text}: {why}; give a positive duration such as 90s, 10m or 1h"
        ))
    };
    if text.trim_start().starts_with('-') {
        return Err(refuse("a duration cannot be negative"));
    }
    let duration = humantime::parse_duration(text.trim()).map_err(|_| refuse("not a duration"))?;
    match u32::try_from(duration.as_secs()) {
        Ok(0) => Err(refuse("shorter than one second")),
        Ok(seconds) => Ok(seconds),
        Err(_) => Err(refuse("too long")),
    }
}

/// `KEY=VALUE` arguments of a repeatable flag as pairs.
fn key_values(flag: &str, pairs: &[String]) -> Result<Vec<(String, String)>, CommandError> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .ok_or_else(|| CommandError::Usage(format!("{flag} {pair}: expected KEY=VALUE")))
        })
        .collect()
}

/// Refuses a text flag longer than the broker accepts, before sending it: a much longer one
/// would otherwise be cut off by the transport's message limit with an error naming no field.
fn check_length(flag: &str, text: &str, max_bytes: usize) -> Result<(), CommandError> {
    if text.len() > max_bytes {
        return Err(CommandError::Usage(format!(
            "{flag}: {} bytes is longer than the {max_bytes} bytes the broker accepts",
            text.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_refused_in_words() {
        assert_eq!(ttl_seconds("--ttl", "10m").unwrap(), 600);
        for (text, why) in [
            ("-1", "negative"),
            ("-5m", "negative"),
            ("0", "shorter than one second"),
            ("500ms", "shorter than one second"),
            ("ten", "not a duration"),
            ("10", "not a duration"),
        ] {
            let message = ttl_seconds("--ttl", text).unwrap_err().to_string();
            assert!(message.starts_with(&format!("--ttl {text}: ")), "{message}");
            assert!(message.contains(why), "{text}: {message}");
        }
    }
}
