//! Logging: human-readable lines by default, JSON lines with `WARRANT_LOG_FORMAT=json`;
//! the level comes from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Selects the log format.
pub const ENV_LOG_FORMAT: &str = "WARRANT_LOG_FORMAT";

/// Installs the global subscriber, writing to standard error so standard output stays for
/// command results.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let is_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(is_terminal);
    let installed = if std::env::var(ENV_LOG_FORMAT).is_ok_and(|format| format == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A subscriber installed earlier (as in tests) is kept.
    drop(installed);
}
