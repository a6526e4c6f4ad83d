//! API-key leases: a key is handed out by the answer that first carries its lease, and never
//! again, since only its hash is kept. A lease issued at once stores the hash with itself; one
//! issued by operators' approval gets it at its first delivery. Introspection accepts a key as
//! it accepts a JWT, by its lease.

use super::token_use::Inactive;
use super::{Broker, Credential, IssuedLease, is_live};
use crate::audit::AuditEvent;
use crate::domain::{Caller, CredentialKind, UnixMillis};
use crate::error::Result;
use crate::issuer::api_key;
use crate::issuer::credential::digests_match;
use crate::issuer::jwt::AccessTokenClaims;

impl Broker {
    /// Hands out the key of each API-key lease among `leases` that is live and has no key yet
    /// (one an approval issued):
    /// the key's hash is stored (with its audit event) before the key is returned, and only by
    /// the first answer to get there, so a key is shown once even to concurrent retries.
    pub(super) async fn hand_out_keys(
        &self,
        caller: &Caller,
        leases: &mut [IssuedLease],
    ) -> Result<()> {
        let now = UnixMillis::now();
        for lease in leases.iter_mut().filter(|lease| {
            lease.record.kind == CredentialKind::ApiKey
                && lease.record.secret_sha256.is_none()
                && lease.credential.is_none()
                && is_live(&lease.record, now)
        }) {
            let (key, secret_sha256) = api_key::generate(&lease.record.id);
            let record = &lease.record;
            let event = AuditEvent::new("lease.key_handed_out", "ok", caller.name.as_str())
                .workload(&caller.name)
                .task(&record.task_id)
                .lease(&record.id)
                .scope(&record.scope)
                .with("credential_hmac", self.audit_key.hash(&key));
            if self
                .timed(
                    "set_api_key",
                    self.store
                        .set_api_key(&record.id, secret_sha256, vec![event]),
                )
                .await?
            {
                lease.credential = Some(Credential(key));
            }
        }
        Ok(())
    }

    /// Checks API key `key` for `audience`, as `check_token` checks a JWT: `Err` says why it
    /// is inactive, with the key's claims once its secret matched.
    pub(super) async fn check_api_key(
        &self,
        key: &str,
        audience: &str,
    ) -> Result<std::result::Result<AccessTokenClaims, Inactive>> {
        let Some((lease_id, presented)) = api_key::parse(key) else {
            return Ok(Err(Inactive::because("malformed")));
        };
        let found = self.store.find_api_key(&lease_id).await?;
        let Some(found) = found.filter(|found| {
            found
                .lease
                .secret_sha256
                .as_deref()
                .is_some_and(|stored| digests_match(stored, &presented))
        }) else {
            return Ok(Err(Inactive::because("unknown key")));
        };
        let lease = &found.lease;
        let claims = self.lease_claims(lease, &found.spiffe_id, &found.workload_name);
        let now = UnixMillis::now();
        if lease.audience != audience {
            return Ok(Err(Inactive::of(claims, "wrong audience")));
        }
        if !is_live(lease, now)
            || !self
                .store
                .is_lease_live(&lease.id, &lease.task_id, now)
                .await?
        {
            return Ok(Err(Inactive::of(
                claims,
                "lease revoked, expired or unknown",
            )));
        }
        Ok(Ok(claims))
    }
}
