//! The `warrant` binary: everything lives in the library; see `warrant --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    warrant::cli::run()
}
