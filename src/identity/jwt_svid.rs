//! JWT-SVIDs: short-lived JWTs whose `sub` is the workload's SPIFFE ID, for the audiences it
//! asks for, signed with ES256 (the SPIFFE JWT-SVID profile allows RS, ES and PS algorithms,
//! not EdDSA, and SPIFFE clients refuse others). The key is stored sealed under the master key,
//! one for every replica, and published as the trust domain's JWT bundle.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

use crate::domain::{SpiffeId, TrustDomain, UnixMillis};
use crate::error::{Error, Result};
use crate::issuer::jwt::{JwsParts, TokenError, audience_names};
use crate::issuer::{KeyAlgorithm, MasterKey, SigningKey};
use crate::store::{Store, StoredJwtSvidKey};

/// The one JWT-SVID key's id: replicas starting together all store it, the first one wins.
const FIRST_KEY_ID: &str = "jwt-svid-1";
/// How long a JWT-SVID lives: a bearer token, so minutes (SPIRE's default is the same).
pub const JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// How often a bundle consumer should fetch the JWT bundle again, in seconds.
const BUNDLE_REFRESH_HINT_SECONDS: u64 = 300;

/// Signs and checks the trust domain's JWT-SVIDs.
pub struct JwtSvidKey {
    key: SigningKey,
    /// The base64url JWS header of every JWT-SVID: ES256, `typ: JWT`, this key's `kid`.
    encoded_header: String,
    trust_domain: TrustDomain,
}

impl JwtSvidKey {
    /// The stored key, or a new one stored first (a fresh store).
    pub async fn load_or_create(
        store: &dyn Store,
        master_key: &MasterKey,
        trust_domain: &TrustDomain,
    ) -> Result<JwtSvidKey> {
        let (_, pkcs8) = SigningKey::generate(KeyAlgorithm::Es256);
        let candidate = StoredJwtSvidKey {
            id: FIRST_KEY_ID.to_owned(),
            sealed_private_key: master_key.seal(&seal_context(FIRST_KEY_ID), &pkcs8),
            created_at: UnixMillis::now(),
        };
        let stored = store.insert_jwt_svid_key(candidate).await?;
        let pkcs8 = master_key
            .open(&seal_context(&stored.id), &stored.sealed_private_key)
            .map_err(|error| Error::internal(format!("cannot open the JWT-SVID key: {error}")))?;
        let key = SigningKey::from_pkcs8(KeyAlgorithm::Es256, &pkcs8)
            .map_err(|error| Error::internal(format!("the JWT-SVID key: {error}")))?;
        Ok(Self::new(key, trust_domain))
    }

    /// A key kept only in memory (the benchmark's reference CA).
    pub fn in_memory(trust_domain: &TrustDomain) -> JwtSvidKey {
        Self::new(SigningKey::generate(KeyAlgorithm::Es256).0, trust_domain)
    }

    fn new(key: SigningKey, trust_domain: &TrustDomain) -> JwtSvidKey {
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": key.kid() });
        JwtSvidKey {
            encoded_header: URL_SAFE_NO_PAD.encode(header.to_string()),
            key,
            trust_domain: trust_domain.clone(),
        }
    }

    /// A JWT-SVID for `spiffe_id`, valid for `audiences` until `now` + [`JWT_SVID_TTL`].
    pub fn issue(&self, spiffe_id: &SpiffeId, audiences: &[String], now: UnixMillis) -> String {
        let claims = json!({
            "sub": spiffe_id.as_str(),
            "aud": audiences,
            "iat": now.as_seconds(),
            "exp": now.plus(JWT_SVID_TTL).as_seconds(),
        });
        let signing_input = format!(
            "{}.{}",
            self.encoded_header,
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = URL_SAFE_NO_PAD.encode(self.key.sign(signing_input.as_bytes()));
        format!("{signing_input}.{signature}")
    }

    /// The trust domain's JWT bundle: a JWK Set with this key, `use: jwt-svid`.
    pub fn bundle_jwks(&self) -> Value {
        let mut jwk =
            serde_json::to_value(self.key.verifying_key().to_jwk()).unwrap_or_else(|_| json!({}));
        if let Some(jwk) = jwk.as_object_mut() {
            jwk.insert("use".into(), "jwt-svid".into());
        }
        json!({ "keys": [jwk], "spiffe_refresh_hint": BUNDLE_REFRESH_HINT_SECONDS })
    }

    /// Checks `token` as a JWT-SVID of this trust domain for `audience` at `now`; returns its
    /// SPIFFE ID and claims. Refusals are `INVALID_ARGUMENT` naming what is wrong with the token
    /// (never echoing it).
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        now: UnixMillis,
    ) -> Result<(SpiffeId, Map<String, Value>)> {
        let invalid = |reason: &str| Error::invalid("svid", reason);
        let not_a_jwt = |error: TokenError| Error::invalid("svid", error.to_string());
        let parts = JwsParts::split(token).map_err(not_a_jwt)?;
        let header = parts.json_header().map_err(not_a_jwt)?;
        if header.get("alg").and_then(Value::as_str) != Some("ES256") {
            return Err(invalid("alg must be ES256"));
        }
        if header
            .get("typ")
            .is_some_and(|typ| typ != "JWT" && typ != "JOSE")
        {
            return Err(invalid("typ must be JWT or JOSE"));
        }
        if header.get("kid").and_then(Value::as_str) != Some(self.key.kid()) {
            return Err(invalid(
                "signed by a key not in this trust domain's JWT bundle",
            ));
        }
        let signing_input = &token.as_bytes()[..parts.signing_input_len];
        if !self
            .key
            .verifying_key()
            .verify(signing_input, &parts.signature)
        {
            return Err(invalid("the signature does not verify"));
        }
        let claims = parts.json_claims().map_err(not_a_jwt)?;
        let expires = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| invalid("exp is missing"))?;
        if expires <= now.as_seconds() {
            return Err(invalid("expired"));
        }
        if !audience_names(&claims, audience) {
            return Err(invalid("the audience is not one the token names"));
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("sub is missing"))?;
        let spiffe_id = SpiffeId::parse("svid", subject, &self.trust_domain)?;
        Ok((spiffe_id, claims))
    }
}

fn seal_context(id: &str) -> Vec<u8> {
    format!("warrant-jwt-svid:{id}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> JwtSvidKey {
        JwtSvidKey::in_memory(&TrustDomain::parse("trust_domain", "test.local").unwrap())
    }

    fn agent() -> SpiffeId {
        let domain = TrustDomain::parse("trust_domain", "test.local").unwrap();
        SpiffeId::parse("spiffe_id", "spiffe://test.local/agent", &domain).unwrap()
    }

    fn reason(result: Result<(SpiffeId, Map<String, Value>)>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn a_jwt_svid_validates_for_its_audience_only_until_it_expires() {
        let key = key();
        let now = UnixMillis::now();
        let token = key.issue(&agent(), &["crm".into(), "billing".into()], now);

        let (spiffe_id, claims) = key.validate(&token, "billing", now).unwrap();
        assert_eq!(spiffe_id, agent());
        assert_eq!(claims["sub"], "spiffe://test.local/agent");
        assert!(reason(key.validate(&token, "payments", now)).contains("audience"));
        let later = now.plus(JWT_SVID_TTL);
        assert!(reason(key.validate(&token, "crm", later)).contains("expired"));
    }

    #[test]
    fn forged_altered_and_unsigned_tokens_are_refused() {
        let (key, other) = (key(), key());
        let now = UnixMillis::now();
        let foreign = other.issue(&agent(), &["crm".into()], now);
        assert!(reason(key.validate(&foreign, "crm", now)).contains("key not in"));

        let token = key.issue(&agent(), &["crm".into()], now);
        let parts: Vec<&str> = token.split('.').collect();
        let altered_claims = URL_SAFE_NO_PAD.encode(
            json!({"sub": "spiffe://test.local/admin", "aud": ["crm"], "exp": i64::MAX})
                .to_string(),
        );
        let altered = format!("{}.{altered_claims}.{}", parts[0], parts[2]);
        assert!(reason(key.validate(&altered, "crm", now)).contains("signature"));

        let critical_header = URL_SAFE_NO_PAD.encode(
            json!({"alg": "ES256", "typ": "JWT", "kid": key.key.kid(), "crit": ["exp"]})
                .to_string(),
        );
        let critical_input = format!("{critical_header}.{}", parts[1]);
        let critical = format!(
            "{critical_input}.{}",
            URL_SAFE_NO_PAD.encode(key.key.sign(critical_input.as_bytes()))
        );
        assert!(reason(key.validate(&critical, "crm", now)).contains("crit"));

        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"x"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(reason(key.validate(&unsigned, "crm", now)).contains("ES256"));
        assert!(key.validate("not.a-token", "crm", now).is_err());
    }
}
