//! Compiles `proto/warrant/v1/*.proto` and the SPIFFE Workload API with protox (pure Rust), so building needs no system
//! `protoc`, and writes the descriptor set that gRPC reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "warrant/v1/tasks.proto",
    "warrant/v1/tokens.proto",
    "warrant/v1/admin.proto",
    "warrant/v1/attestation.proto",
    "warrant/v1/approvals.proto",
    "spiffe/workload.proto",
];

/// Must match the `Debug` impls in src/proto.rs.
const SECRET_BEARING_MESSAGES: &[&str] = &[
    "warrant.v1.Lease",
    "warrant.v1.CreateWorkloadResponse",
    "warrant.v1.RotateWorkloadCredentialResponse",
    "warrant.v1.IntrospectRequest",
    "warrant.v1.AttestRequest",
    "warrant.v1.AttestRequest.method",
    "warrant.v1.X509Svid",
    "warrant.v1.CreateJoinTokenResponse",
    ".X509SVID",
    ".JWTSVID",
    ".ValidateJWTSVIDRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // Tests that need PostgreSQL are compiled as `#[ignore]`d unless this is set, so that
    // `cargo test` without a database reports them as skipped rather than passing silently.
    println!("cargo:rerun-if-env-changed=WARRANT_TEST_DATABASE_URL");
    println!("cargo::rustc-check-cfg=cfg(warrant_postgres_tests)");
    if std::env::var_os("WARRANT_TEST_DATABASE_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo::rustc-cfg=warrant_postgres_tests");
    }

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    for proto in PROTOS {
        compiler.open_file(proto)?;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("warrant_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // Messages that carry a secret get a hand-written, redacting `Debug` (src/proto.rs), so a
    // `{:?}` in a log line or an error never prints a credential.
    tonic_prost_build::configure()
        .skip_debug(SECRET_BEARING_MESSAGES)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
