//! First start of a broker: the master key, the scope catalog, the policy set and the first
//! admin credential.
//! A restart finds them and reuses them.

use std::path::Path;

use crate::broker::Broker;
use crate::config::MasterKeySource;
use crate::domain::scope::CatalogError;
use crate::domain::{Catalog, WorkloadName};
use crate::error::Result;
use crate::issuer::master_key::{MasterKeyError, write_private_file};
use crate::issuer::{BearerCredential, MasterKey};
use crate::policy::{PolicyEngine, PolicyError, PolicySource};

/// The demo catalog `serve --dev` starts with (also the annotated example in `deploy/`).
pub const DEMO_CATALOG: &str = include_str!("../deploy/scopes.toml");

/// The name of the admin workload created on first start.
pub const FIRST_ADMIN: &str = "admin";

/// Loads the master key from its source.
pub fn master_key(source: &MasterKeySource) -> Result<MasterKey, MasterKeyError> {
    match source {
        MasterKeySource::File { path, create } => MasterKey::load_or_create(path, *create),
        MasterKeySource::Inline(text) => {
            MasterKey::from_base64(crate::config::ENV_MASTER_KEY, text)
        }
    }
}

/// A catalog that could not be loaded; names the file and, when parsing failed, the field.
#[derive(Debug, thiserror::Error)]
pub enum CatalogLoadError {
    #[error("catalog file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("catalog file {path}: {source}")]
    Invalid { path: String, source: CatalogError },
}

/// Reads the catalog at `path`, first writing the demo catalog there if `create_demo` is set
/// and the file does not exist.
pub fn catalog(path: &Path, create_demo: bool) -> Result<Catalog, CatalogLoadError> {
    let display = path.display().to_string();
    if create_demo && !path.exists() {
        write_private_file(path, DEMO_CATALOG.as_bytes()).map_err(|source| {
            CatalogLoadError::Io {
                path: display.clone(),
                source,
            }
        })?;
    }
    let text = std::fs::read_to_string(path).map_err(|source| CatalogLoadError::Io {
        path: display.clone(),
        source,
    })?;
    Catalog::from_toml(&text).map_err(|source| CatalogLoadError::Invalid {
        path: display,
        source,
    })
}

/// Why the policy set could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("cannot create the policy directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("policy refused: {0}")]
    Invalid(#[from] PolicyError),
}

/// Loads the policy set against Warrant's schema for `catalog`, first writing Warrant's default
/// into its directory if `create_default` is set and the directory does not exist.
pub fn policy(
    source: &PolicySource,
    catalog: &Catalog,
    create_default: bool,
) -> Result<PolicyEngine, PolicyLoadError> {
    let schema = crate::policy::load::schema_for(catalog.tool_arguments());
    if let (PolicySource::Dir(dir), true) = (source, create_default) {
        crate::policy::load::create_default_dir(dir, &schema).map_err(|source| {
            PolicyLoadError::Io {
                path: dir.display().to_string(),
                source,
            }
        })?;
    }
    let engine = PolicyEngine::load(source.clone(), schema)?;
    let summary = &engine.current().summary;
    tracing::info!(
        source = %summary.source,
        policies = summary.decision_policies.len(),
        approval_rules = summary.approval_rules.len(),
        digest = %summary.digest,
        "policy loaded"
    );
    Ok(engine)
}

/// On a store with no workloads, registers the `admin` workload and returns its credential,
/// which the caller shows once; the store keeps only its hash.
pub async fn first_admin(broker: &Broker) -> Result<Option<BearerCredential>> {
    if broker.store().has_workloads().await? {
        return Ok(None);
    }
    // A constant that satisfies the workload name rules.
    let name = WorkloadName::parse("name", FIRST_ADMIN).expect("valid built-in name");
    broker.create_first_admin(name).await.map(Some)
}
