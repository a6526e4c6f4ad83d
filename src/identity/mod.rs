//! Workload identity: the CA that signs X.509-SVIDs, and the one-time join tokens a workload
//! trades for its first SVID.

pub mod ca;
pub mod join_token;
pub mod jwt_attestor;
pub mod jwt_svid;
pub mod pem;
pub mod selectors;
pub mod trust_bundle;
pub mod upstream;

pub use ca::{Ca, CaRotation, IssuedSvid, thumbprint};

/// What the broker proves and issues identities with: its CA (X.509- and JWT-SVIDs) and the
/// `jwt` attestor's trusted external issuers.
pub struct IdentityAuthority {
    pub ca: Ca,
    pub jwt_attestor: jwt_attestor::JwtAttestor,
}
pub use join_token::JoinToken;
