//! The broker's identity operations: join tokens, attestation into an X.509-SVID, SVID renewal
//! and the kill switch that ends an identity and everything it holds.

use std::time::Duration;

use super::{Broker, no_such_workload};
use crate::audit::AuditEvent;
use crate::domain::{Caller, SpiffeId, TaskId, UnixMillis, WorkloadName};
use crate::error::{Error, Result};
use crate::identity::jwt_svid::JWT_SVID_TTL;
use crate::identity::{IssuedSvid, JoinToken, selectors};
use crate::issuer::credential::digests_match;
use crate::store::{IdentityEnd, JoinTokenRecord, SvidRecord, WorkloadRecord};

/// The longest a join token may wait for its use.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Refused attestations, and refused authentications of each method, recorded per second at
/// most, so a flood cannot fill the trail.
pub const REFUSALS_AUDITED_PER_SECOND: u32 = 10;

/// What the kill switch ended.
#[derive(Debug)]
pub struct RevokedIdentity {
    pub workload: WorkloadRecord,
    pub revoked_tasks: Vec<TaskId>,
    pub revoked_leases: usize,
}

impl Broker {
    /// A one-time join token for workload `name`, usable within `ttl`.
    pub async fn create_join_token(
        &self,
        caller: &Caller,
        name: &WorkloadName,
        ttl: Duration,
    ) -> Result<(JoinToken, UnixMillis)> {
        if ttl.is_zero() || ttl > MAX_JOIN_TOKEN_TTL {
            return Err(Error::invalid(
                "ttl_seconds",
                format!(
                    "must be between 1 and {} seconds",
                    MAX_JOIN_TOKEN_TTL.as_secs()
                ),
            ));
        }
        let workload = self
            .store
            .list_workloads()
            .await?
            .into_iter()
            .find(|workload| workload.name == *name)
            .ok_or_else(|| no_such_workload(name))?;
        if workload.revoked_at.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "name: the identity of workload '{name}' was revoked; register a new workload"
            )));
        }
        let (token, stored) = JoinToken::generate();
        let now = UnixMillis::now();
        let expires_at = UnixMillis(now.0 + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let event = AuditEvent::new("identity.join_token_created", "ok", caller.name.as_str())
            .workload(name)
            .with("join_token_id", stored.id.as_str())
            .with("expires_at", expires_at.0);
        let record = JoinTokenRecord {
            id: stored.id,
            workload_id: workload.id,
            secret_sha256: stored.secret_sha256,
            created_at: now,
            expires_at,
            consumed_at: None,
        };
        self.store.insert_join_token(record, vec![event]).await?;
        Ok((token, expires_at))
    }

    /// Trades a join token for an X.509-SVID of its workload. The token is consumed and the
    /// SVID recorded in one transaction before the SVID is returned, so a token works once, on
    /// any replica. Every refusal reads the same to the caller; the trail says why.
    pub async fn attest_with_join_token(&self, presented: &str) -> Result<IssuedSvid> {
        let refused =
            || Error::Unauthenticated("join_token: unknown, already used or expired".into());
        let Some(parsed) = JoinToken::parse(presented.trim()) else {
            self.record_failed_attestation("join_token", "malformed", None)
                .await;
            return Err(refused());
        };
        let now = UnixMillis::now();
        let Some((token, workload)) = self.store.find_join_token(&parsed.id).await? else {
            self.record_failed_attestation("join_token", "unknown", Some(&parsed.id))
                .await;
            return Err(refused());
        };
        let reason = if !digests_match(&parsed.secret_sha256, &token.secret_sha256) {
            Some("wrong_secret")
        } else if token.consumed_at.is_some() {
            Some("already_used")
        } else if token.expires_at <= now {
            Some("expired")
        } else {
            None
        };
        if let Some(reason) = reason {
            self.record_failed_attestation("join_token", reason, Some(&token.id))
                .await;
            return Err(refused());
        }
        let svid = self
            .ca
            .issue(&workload.spiffe_id, self.settings.svid_ttl, now)?;
        let event = AuditEvent::new("identity.attested", "ok", workload.name.as_str())
            .workload(&workload.name)
            .with("method", "join_token")
            .with("join_token_id", token.id.as_str())
            .with("spiffe_id", svid.spiffe_id.as_str())
            .with("svid_serial", svid.serial.as_str())
            .with("svid_expires_at", svid.expires_at.0);
        let consumed = self
            .store
            .consume_join_token(
                &token.id,
                now,
                svid_record(&svid, &workload.id),
                vec![event],
            )
            .await?;
        if !consumed {
            // Another call (here or on another replica) used it first.
            self.record_failed_attestation("join_token", "already_used", Some(&token.id))
                .await;
            return Err(refused());
        }
        tracing::info!(workload = %workload.name, serial = %svid.serial, "workload attested");
        Ok(svid)
    }

    /// An X.509-SVID for the local process the kernel described with `observed` selectors
    /// ([`selectors::unix`]), the workload [`Self::match_selectors`] finds for it.
    pub async fn attest_unix(&self, observed: &[String]) -> Result<IssuedSvid> {
        self.attest_by_selectors("unix", observed).await
    }

    /// An X.509-SVID for the holder of `token`, a JWT from a configured external issuer: the
    /// workload whose selectors the token's `jwt:` selectors all satisfy.
    pub async fn attest_with_jwt(&self, token: &str) -> Result<IssuedSvid> {
        let observed = match self.jwt_attestor.attest(token, UnixMillis::now()).await {
            Ok(observed) => observed,
            Err(refusal) => {
                self.record_failed_attestation("jwt", refusal.reason, None)
                    .await;
                return Err(Error::Unauthenticated(
                    "jwt: the token is not accepted (its issuer, signature, audience and \
                     lifetime are checked; the audit trail names the reason)"
                        .into(),
                ));
            }
        };
        self.attest_by_selectors("jwt", &observed).await
    }

    /// An X.509-SVID for the workload [`Self::match_selectors`] finds for what attestor
    /// `method` observed.
    async fn attest_by_selectors(
        &self,
        method: &'static str,
        observed: &[String],
    ) -> Result<IssuedSvid> {
        let workload = self.match_selectors(method, observed).await?;
        let now = UnixMillis::now();
        let svid = self
            .ca
            .issue(&workload.spiffe_id, self.settings.svid_ttl, now)?;
        let event = AuditEvent::new("identity.attested", "ok", workload.name.as_str())
            .workload(&workload.name)
            .with("method", method)
            .with("selectors", observed.to_vec())
            .with("spiffe_id", svid.spiffe_id.as_str())
            .with("svid_serial", svid.serial.as_str())
            .with("svid_expires_at", svid.expires_at.0);
        self.store
            .insert_svid(svid_record(&svid, &workload.id), vec![event])
            .await?;
        tracing::info!(workload = %workload.name, serial = %svid.serial, method, "workload attested");
        Ok(svid)
    }

    /// A JWT-SVID for `audiences` for the local process described by `observed`, the workload
    /// [`Self::match_selectors`] finds for it; `spiffe_id`, when given, must be that workload's. It
    /// is audited (without the token) before it is returned.
    pub async fn issue_jwt_svid(
        &self,
        observed: &[String],
        audiences: &[String],
        spiffe_id: Option<&str>,
    ) -> Result<(SpiffeId, String)> {
        let workload = self.match_selectors("unix", observed).await?;
        if spiffe_id.is_some_and(|requested| requested != workload.spiffe_id.as_str()) {
            return Err(Error::Unauthenticated(
                "spiffe_id: this process is not entitled to that SPIFFE ID".into(),
            ));
        }
        let now = UnixMillis::now();
        let token = self
            .ca
            .jwt_svids()
            .issue(&workload.spiffe_id, audiences, now);
        let event = AuditEvent::new("identity.jwt_svid_issued", "ok", workload.name.as_str())
            .workload(&workload.name)
            .with("spiffe_id", workload.spiffe_id.as_str())
            .with("audiences", audiences.to_vec())
            .with("expires_at", now.plus(JWT_SVID_TTL).0);
        self.store.record_events(vec![event]).await?;
        Ok((workload.spiffe_id, token))
    }

    /// Checks a JWT-SVID for `audience` ([`JwtSvidKey::validate`](crate::identity::jwt_svid::JwtSvidKey::validate)),
    /// and that its workload is still registered and not revoked: the kill switch reaches
    /// JWT-SVIDs checked here at once (an offline validator learns only at their expiry).
    pub async fn validate_jwt_svid(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>)> {
        let (spiffe_id, claims) =
            self.ca
                .jwt_svids()
                .validate(token, audience, UnixMillis::now())?;
        let is_live = self
            .store
            .list_workloads()
            .await?
            .iter()
            .any(|workload| workload.spiffe_id == spiffe_id && workload.revoked_at.is_none());
        if !is_live {
            return Err(Error::invalid(
                "svid",
                "its identity is revoked or no longer registered",
            ));
        }
        Ok((spiffe_id, claims))
    }

    /// The registered workload whose selectors all appear in what attestor `method` observed,
    /// the most specific one if several do. Refused when none does, or when two equally
    /// specific ones do (the registrations are then ambiguous for this caller).
    async fn match_selectors(
        &self,
        method: &'static str,
        observed: &[String],
    ) -> Result<WorkloadRecord> {
        let refused = || {
            Error::Unauthenticated(format!(
                "{method}: no registered workload's selectors match this caller"
            ))
        };
        let mut candidates: Vec<WorkloadRecord> = self
            .store
            .list_workloads()
            .await?
            .into_iter()
            .filter(|workload| {
                workload.revoked_at.is_none()
                    && selectors::satisfied_by(&workload.selectors, observed)
            })
            .collect();
        candidates.sort_by_key(|workload| std::cmp::Reverse(workload.selectors.len()));
        let workload = match candidates.as_slice() {
            [] => None,
            [only] => Some(only),
            [first, second, ..] if first.selectors.len() > second.selectors.len() => Some(first),
            _ => None,
        };
        let Some(workload) = workload else {
            let reason = if candidates.is_empty() {
                "no_match"
            } else {
                "ambiguous"
            };
            self.record_failed_attestation(method, reason, None).await;
            return Err(refused());
        };
        Ok(workload.clone())
    }

    /// A fresh X.509-SVID for a caller that authenticated with its current one.
    pub async fn renew_svid(&self, caller: &Caller) -> Result<IssuedSvid> {
        let Some(current) = &caller.certificate_thumbprint else {
            return Err(Error::Unauthenticated(
                "renewal needs the caller's current X.509-SVID as its TLS client certificate"
                    .into(),
            ));
        };
        let svid = self
            .ca
            .issue(&caller.spiffe_id, self.settings.svid_ttl, UnixMillis::now())?;
        let event = AuditEvent::new("identity.svid_renewed", "ok", caller.name.as_str())
            .workload(&caller.name)
            .with("previous_thumbprint", current.as_str())
            .with("svid_serial", svid.serial.as_str())
            .with("svid_expires_at", svid.expires_at.0);
        self.store
            .insert_svid(svid_record(&svid, &caller.workload_id), vec![event])
            .await?;
        Ok(svid)
    }

    /// The kill switch: refuses every credential, SVID and join token of workload `name` from
    /// now on (at once here, within the change notification on other replicas), then revokes
    /// each of its open tasks, which the revocation feed reports. With
    /// [`IdentityEnd::Deleted`] its registration entry is deleted as well.
    pub async fn revoke_identity(
        &self,
        caller: &Caller,
        name: &WorkloadName,
        end: IdentityEnd,
    ) -> Result<RevokedIdentity> {
        if *name == caller.name {
            return Err(Error::FailedPrecondition(format!(
                "name: '{name}' is the calling workload; it cannot end its own identity"
            )));
        }
        let action = match end {
            IdentityEnd::Revoked => "identity.revoked",
            IdentityEnd::Deleted => "workload.deleted",
        };
        let event = AuditEvent::new(action, "ok", caller.name.as_str()).workload(name);
        let workload = self
            .store
            .revoke_identity(name, end, UnixMillis::now(), vec![event])
            .await?
            .ok_or_else(|| no_such_workload(name))?;
        let tasks = self.store.active_tasks_of(&workload.id).await?;
        let mut revoked = RevokedIdentity {
            workload,
            revoked_tasks: Vec::new(),
            revoked_leases: 0,
        };
        for task in tasks {
            match self
                .revoke(caller, &super::RevocationTarget::Task(task.clone()))
                .await
            {
                Ok(leases) => {
                    revoked.revoked_leases += leases.len();
                    revoked.revoked_tasks.push(task);
                }
                // It ended meanwhile (completed, expired, or revoked by another call).
                Err(Error::FailedPrecondition(_)) => {}
                Err(error) => return Err(error),
            }
        }
        tracing::info!(workload = %name, tasks = revoked.revoked_tasks.len(), "identity revoked");
        Ok(revoked)
    }

    /// Records a refused attestation (see [`Self::record_refusal`]).
    async fn record_failed_attestation(
        &self,
        method: &'static str,
        reason: &'static str,
        token_id: Option<&str>,
    ) {
        let mut event = AuditEvent::new("identity.attestation_refused", "refused", "unknown")
            .with("method", method)
            .with("reason", reason);
        if let Some(id) = token_id {
            event = event.with("join_token_id", id);
        }
        self.record_refusal("attestation", "attestation", reason, event)
            .await;
    }

    /// Records a refused authentication: a bearer credential that does not authenticate, or a
    /// client certificate that is not a current SVID of this broker (at the handshake or on a
    /// call), from `peer` (its IP address, if known). Never the presented secret itself.
    pub async fn record_failed_authentication(
        &self,
        method: &'static str,
        reason: &'static str,
        peer: Option<std::net::IpAddr>,
    ) {
        let mut event = AuditEvent::new("identity.authentication_refused", "refused", "unknown")
            .with("method", method)
            .with("reason", reason);
        if let Some(peer) = peer {
            event = event.with("peer", peer.to_string());
        }
        // One allowance per method, so that a flood of bad handshakes cannot hide a run of
        // guessed bearer credentials from the trail.
        let bucket = format!("authentication:{method}");
        self.record_refusal("authentication", &bucket, reason, event)
            .await;
    }

    /// Appends `event`, a refused `what` (attestation, authentication), to the audit trail: at
    /// most [`REFUSALS_AUDITED_PER_SECOND`] a second from each `bucket`, so that a flood
    /// cannot fill the trail; beyond, refusals are only logged.
    async fn record_refusal(
        &self,
        what: &'static str,
        bucket: &str,
        reason: &'static str,
        event: AuditEvent,
    ) {
        if self.failure_audit.admit(bucket).is_err() {
            tracing::warn!(reason, "{what} refused (not audited: too many refusals)");
            return;
        }
        tracing::info!(reason, "{what} refused");
        if let Err(error) = self.store.record_events(vec![event]).await {
            tracing::warn!(%error, "could not record a refused {what}");
        }
    }
}

fn svid_record(svid: &IssuedSvid, workload_id: &str) -> SvidRecord {
    SvidRecord {
        thumbprint: svid.thumbprint.clone(),
        workload_id: workload_id.to_owned(),
        serial: svid.serial.clone(),
        issued_at: svid.issued_at,
        expires_at: svid.expires_at,
    }
}
