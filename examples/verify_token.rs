//! How a downstream Rust API validates Warrant tokens offline with `warrant::verifier`.
//!
//! ```sh
//! WARRANT_TOKEN=<a workload credential> cargo run --example verify_token -- <token> <audience>
//! ```
//! The verifier fetches the broker's keys once, follows its revocation feed in the background,
//! and then checks each token locally.

use std::process::ExitCode;

use warrant::verifier::{Verifier, VerifierConfig};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(token), Some(audience)) = (args.next(), args.next()) else {
        eprintln!(
            "usage: verify_token <token> <audience>   (WARRANT_TOKEN: a workload credential)"
        );
        return ExitCode::from(64);
    };
    let address = std::env::var("WARRANT_ADDR").unwrap_or_else(|_| "http://127.0.0.1:7400".into());
    let credential = std::env::var("WARRANT_TOKEN").unwrap_or_default();

    let verifier = match Verifier::connect(VerifierConfig::new(address, audience, credential)).await
    {
        Ok(verifier) => verifier,
        Err(error) => {
            eprintln!("cannot reach the broker: {error}");
            return ExitCode::FAILURE;
        }
    };
    match verifier.verify(&token).await {
        Ok(claims) => {
            println!(
                "valid: {} may use {} for task {} until {}",
                claims.sub, claims.scope, claims.task_id, claims.exp
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("refused: {error}");
            ExitCode::FAILURE
        }
    }
}
