//! `warrant svid ...`: trading a join token for an X.509-SVID, and renewing it. The SVID lives
//! in a directory (`svid.pem`, `svid.key` readable only by its owner, `bundle.pem`) that other
//! commands use through `--svid-dir` / `WARRANT_SVID_DIR`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::output::{Format, text};
use super::{Cli, CommandError};
use crate::client::Connection;
use crate::proto;

/// The files of an SVID directory.
pub const CERTIFICATE_FILE: &str = "svid.pem";
pub const KEY_FILE: &str = "svid.key";
pub const BUNDLE_FILE: &str = "bundle.pem";

#[derive(Subcommand)]
pub enum SvidCommand {
    /// Get this workload's X.509-SVID, written to --out: for the join token in
    /// WARRANT_JOIN_TOKEN (read from the environment only, never from the command line); with
    /// --jwt-file, for the platform's token in that file (a Kubernetes service-account token, a
    /// CI OIDC token); or, with --unix-socket, for this process's Unix identity (uid, gid,
    /// executable).
    Attest {
        /// Directory for svid.pem, svid.key (mode 0600) and bundle.pem; created if missing.
        #[arg(long)]
        out: PathBuf,
        /// Attest by Unix identity on the broker's local socket (`server.unix_socket`; under
        /// `--dev`, warrant-data/warrant.sock).
        #[arg(long, env = "WARRANT_UNIX_SOCKET", conflicts_with = "jwt_file")]
        unix_socket: Option<PathBuf>,
        /// Attest with the JWT in this file, from an issuer the broker trusts
        /// (`[[identity.jwt_issuer]]`).
        #[arg(long, env = "WARRANT_JWT_FILE")]
        jwt_file: Option<PathBuf>,
    },
    /// Replace the SVID in --svid-dir with a fresh one, authenticating with the current one.
    Renew,
}

pub async fn run(
    cli: &Cli,
    command: &SvidCommand,
    format: &Format,
) -> Result<ExitCode, CommandError> {
    let (svid, dir) = match command {
        SvidCommand::Attest {
            out,
            unix_socket: Some(socket),
            ..
        } => {
            let svid = Connection::open_unix(socket)
                .await?
                .attestation()
                .attest(proto::AttestRequest {
                    method: Some(proto::attest_request::Method::Unix(
                        proto::UnixAttestation {},
                    )),
                })
                .await?
                .into_inner()
                .svid;
            (svid, out.clone())
        }
        SvidCommand::Attest {
            out,
            unix_socket: None,
            jwt_file,
        } => {
            let method = match jwt_file {
                Some(path) => {
                    let token = std::fs::read_to_string(path).map_err(|error| {
                        CommandError::Usage(format!("--jwt-file {}: {error}", path.display()))
                    })?;
                    proto::attest_request::Method::Jwt(token.trim().to_owned())
                }
                None => proto::attest_request::Method::JoinToken(
                    std::env::var("WARRANT_JOIN_TOKEN").map_err(|_| {
                        CommandError::Usage(
                            "set WARRANT_JOIN_TOKEN to the join token from `warrant admin \
                             join-token`, or attest with --jwt-file or --unix-socket"
                                .into(),
                        )
                    })?,
                ),
            };
            let svid = cli
                .connect()
                .await?
                .attestation()
                .attest(proto::AttestRequest {
                    method: Some(method),
                })
                .await?
                .into_inner()
                .svid;
            (svid, out.clone())
        }
        SvidCommand::Renew => {
            let dir = cli.svid_dir.clone().ok_or_else(|| {
                CommandError::Usage("renewal needs --svid-dir or WARRANT_SVID_DIR".into())
            })?;
            let svid = cli
                .connect()
                .await?
                .attestation()
                .renew_svid(proto::RenewSvidRequest {})
                .await?
                .into_inner()
                .svid;
            (svid, dir)
        }
    };
    let svid = svid.unwrap_or_default();
    write_svid(&dir, &svid)
        .map_err(|error| CommandError::Usage(format!("{}: {error}", dir.display())))?;
    let value = json!({
        "spiffe_id": svid.spiffe_id,
        "expires_at": crate::domain::UnixMillis(svid.expires_at.saturating_mul(1000)).to_string(),
        "thumbprint": svid.thumbprint,
        "dir": dir.display().to_string(),
    });
    format.print(&value, |value| {
        format!(
            "spiffe id  {}\nexpires    {}\nwritten to {} ({CERTIFICATE_FILE}, {KEY_FILE}, {BUNDLE_FILE})\n",
            text(value, "spiffe_id"),
            text(value, "expires_at"),
            text(value, "dir")
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the SVID's files into `dir`, each replaced whole (written beside, then renamed), the
/// key readable only by its owner.
fn write_svid(dir: &Path, svid: &proto::X509Svid) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    replace_file(&dir.join(KEY_FILE), svid.private_key_pem.as_bytes())?;
    replace_file(&dir.join(CERTIFICATE_FILE), svid.certificate_pem.as_bytes())?;
    replace_file(&dir.join(BUNDLE_FILE), svid.bundle_pem.as_bytes())
}

fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let staging = path.with_extension("new");
    match std::fs::remove_file(&staging) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    crate::issuer::master_key::write_private_file(&staging, contents)?;
    std::fs::rename(&staging, path)
}
