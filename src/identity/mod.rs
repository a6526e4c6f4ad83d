//! Workload identity: the CA that signs X.509-SVIDs, and the one-time join tokens a workload
//! trades for its first SVID.

pub mod ca;
pub mod join_token;
pub mod jwt_svid;
pub mod selectors;

pub use ca::{Ca, IssuedSvid, thumbprint};
pub use join_token::JoinToken;
