//! Plain types and rules of the broker: ids, time, workloads, scopes, tasks and leases.
//! Nothing here does I/O; the gRPC layer parses requests into these types, so code past the edge
//! never re-checks input.

pub mod ids;
pub mod labels;
pub mod scope;
pub mod task;
pub mod time;
pub mod tool;
pub mod workload;

pub use ids::{LeaseId, TaskId};
pub use labels::Labels;
pub use scope::{Catalog, CredentialKind, ScopeDefinition, ScopeName};
pub use task::{LeaseState, RevocationReason, TaskContext, TaskState};
pub use time::UnixMillis;
pub use tool::ToolDefinition;
pub use workload::{Caller, Role, SpiffeId, TrustDomain, WorkloadName};
