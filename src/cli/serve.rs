//! `warrant serve`: run a broker until SIGTERM or SIGINT, then drain.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::EXIT_USAGE;
use crate::app::{App, StartError};
use crate::config::{Config, process_environment};

#[derive(Args)]
pub struct ServeArgs {
    /// Zero-configuration local broker: SQLite in ./warrant-data (WARRANT_DATA_DIR), plaintext
    /// on 127.0.0.1. Not for production.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// Deployment configuration file (TOML; see deploy/warrant.toml). TLS is required.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub async fn run(args: &ServeArgs) -> ExitCode {
    crate::telemetry::init();
    let config = match (&args.config, args.dev) {
        (Some(path), _) => Config::from_file(path, &process_environment),
        (None, true) => Config::dev(&process_environment),
        (None, false) => {
            eprintln!(
                "error: choose --dev (local, zero configuration) or --config FILE (deployment)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match serve(config.map_err(StartError::from), args.dev).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(1))
        }
    }
}

async fn serve(config: Result<Config, StartError>, is_dev: bool) -> Result<(), StartError> {
    let config = config?;
    let first_admin_file = config.first_admin_file.clone();
    let mut app = App::build(config).await?;
    if is_dev {
        tracing::warn!(
            "dev mode: plaintext listeners on loopback, keys in the data directory; not for production"
        );
    }
    if let Some(credential) = app.take_first_admin_credential() {
        match &first_admin_file {
            Some(path) => write_first_admin(path, credential.expose())?,
            None => print_first_admin(credential.expose()),
        }
    }
    tracing::info!(grpc = %app.grpc_addr(), http = %app.http_addr(), issuer = app.issuer(), "Warrant is serving");
    app.run_until_stopped(shutdown_signal()).await
}

/// Dev only: the credential on standard output, for the walk-through. Shown once: the store
/// keeps only its hash. A closed stdout must not stop the broker.
fn print_first_admin(credential: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "\nFirst start: created the admin credential. It is shown only now; Warrant keeps only its hash.\n\
         Use it in another terminal:\n\n    export WARRANT_TOKEN={credential}\n"
    );
    let _ = stdout.flush();
}

/// Outside dev: the credential goes to a file only its owner can read, never to standard
/// output or the logs, where a log collector would keep it. An existing file is not
/// overwritten (it may hold the credential of an earlier deployment).
fn write_first_admin(path: &Path, credential: &str) -> Result<(), StartError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(path)
        .and_then(|mut file| writeln!(file, "{credential}").and_then(|()| file.sync_all()));
    match written {
        Ok(()) => {
            tracing::warn!(
                file = %path.display(),
                "first start: created the admin credential and wrote it to this file (mode 0600); \
                 move it to your secret store and delete the file"
            );
            Ok(())
        }
        Err(error) => Err(StartError::Serve(format!(
            "keys.first_admin_file: cannot write the first admin credential to {}: {error}",
            path.display()
        ))),
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the broker");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
