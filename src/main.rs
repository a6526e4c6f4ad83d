//! The `warrant` binary: everything lives in the library; see `warrant --help`.
#![forbid(unsafe_code)]

/// mimalloc instead of the system allocator: glibc's malloc and free took about 15% of the
/// broker's CPU under load; with mimalloc an issuance costs 112 µs of CPU instead of 131 µs
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    warrant::cli::run()
}
