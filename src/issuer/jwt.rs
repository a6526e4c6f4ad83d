//! RFC 9068 access tokens: compact JWS with `typ: at+jwt`, signed and checked with ring.
//!
//! Verification is strict because anything a downstream API feeds it may be hostile: the
//! algorithm must be the one the key id's key was made for (no algorithm confusion, no `none`),
//! critical headers are refused, the size is bounded, and every time claim is checked. Claims
//! this version does not know are ignored, so a later issuer adding one (`cnf`, `act`) does not
//! break deployed verifiers; a header that marks an extension critical is refused whatever its
//! value, since this version cannot honour it.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::keys::{KeyAlgorithm, SigningKey, VerifyingKey};
use crate::domain::UnixMillis;

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of a Warrant access token (RFC 9068 plus `task_id`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    pub iss: String,
    /// The workload's SPIFFE ID.
    pub sub: String,
    /// The scope's audience.
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    /// The lease id.
    pub jti: String,
    pub scope: String,
    /// The workload's registered name.
    pub client_id: String,
    pub task_id: String,
    /// The client certificate the token is bound to (RFC 8705), for a caller that
    /// authenticated with its X.509-SVID: only a request over that certificate may use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// For a call token (scope `tool:<name>`): the tool it authorizes one call of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// For a call token: `sha256:` and the hex digest of the arguments the call was
    /// authorized with (compact JSON, keys sorted), which the tool's service compares with the
    /// arguments it received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_digest: Option<String>,
    /// For a lease limited in uses (a scope's `max_uses`, a call token's one call): how many
    /// uses the broker's introspection accepts. It tells any verifier that a local check
    /// cannot count uses, so the token must be introspected at each one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
}

/// RFC 8705's confirmation claim: the certificate's thumbprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// Base64url SHA-256 of the certificate's DER.
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

impl AccessTokenClaims {
    /// Whether the client that presented the certificate with thumbprint `presented` may use
    /// this token: a token bound to a certificate (`cnf`) only with that one (RFC 8705), so
    /// that without it, or with another, it is refused, as a stolen token would be.
    pub fn is_usable_with(&self, presented: Option<&str>) -> bool {
        match (&self.cnf, presented) {
            (None, _) => true,
            (Some(bound), Some(presented)) => {
                super::credential::digests_match(bound.x5t_s256.as_bytes(), presented.as_bytes())
            }
            (Some(_), None) => false,
        }
    }
}

/// Signs `claims` as a compact JWS with `key`.
pub fn sign(key: &SigningKey, claims: &AccessTokenClaims) -> String {
    // Serializing a struct of strings and integers cannot fail.
    let payload = serde_json::to_vec(claims).expect("claims serialize");
    let mut token = String::with_capacity(key.encoded_header().len() + payload.len() * 4 / 3 + 100);
    token.push_str(key.encoded_header());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut token);
    let signature = key.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    token
}

/// Why a token is not valid. Downstream code reports all of these as "invalid token";
/// the distinction is for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unsupported header: {0}")]
    UnsupportedHeader(&'static str),
    #[error("no key with id {0:?}")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("issued by {0:?}, not this issuer")]
    WrongIssuer(String),
    #[error("audience {0:?} is not the expected one")]
    WrongAudience(String),
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("issued in the future")]
    IssuedInFuture,
}

/// What a valid token must match.
#[derive(Clone, Copy, Debug)]
pub struct Expectations<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub now: UnixMillis,
    /// Tolerated clock difference, in seconds, for `exp` and `nbf`.
    pub leeway_seconds: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
    kid: Option<String>,
    /// Whether the header names `crit` at all: `"crit": null` counts, since a verifier that
    /// read null as absent would skip an extension its issuer meant to be mandatory.
    #[serde(default, deserialize_with = "is_present")]
    crit: bool,
}

fn is_present<'de, D: serde::Deserializer<'de>>(value: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(value)?;
    Ok(true)
}

/// The parts of a token after decoding but before any check against keys or time.
pub struct DecodedToken {
    kid: String,
    algorithm: KeyAlgorithm,
    signing_input_len: usize,
    signature: Vec<u8>,
    claims: AccessTokenClaims,
}

impl DecodedToken {
    /// The key id the token names.
    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// A compact JWS (bounded in size) split at its dots and base64url-decoded. Nothing is
/// trusted yet. The JWTs of other profiles (JWT-SVIDs, external platform tokens) are read
/// through this too, with [`JwsParts::json_header`] refusing critical headers for them all.
pub struct JwsParts {
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
    /// The length of `header.payload`, the signing input, in the token's text.
    pub signing_input_len: usize,
}

impl JwsParts {
    pub fn split(token: &str) -> Result<JwsParts, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not three dot-separated parts"));
        };
        let base64 = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| TokenError::Malformed("bad base64url"))
        };
        Ok(JwsParts {
            header: base64(header)?,
            payload: base64(payload)?,
            signature: base64(signature)?,
            signing_input_len: token.len() - signature.len() - 1,
        })
    }

    /// The header as a JSON object; one naming `crit` is refused, as [`decode`] refuses it.
    pub fn json_header(&self) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
        let header =
            json_object(&self.header).ok_or(TokenError::Malformed("header is not JSON"))?;
        if header.contains_key("crit") {
            return Err(TokenError::UnsupportedHeader("crit"));
        }
        Ok(header)
    }

    /// The claims as a JSON object.
    pub fn json_claims(&self) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
        json_object(&self.payload).ok_or(TokenError::Malformed("claims"))
    }
}

fn json_object(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(bytes).ok()? {
        serde_json::Value::Object(object) => Some(object),
        _ => None,
    }
}

/// Whether the `aud` claim (one string, or an array of them) names `audience`.
pub fn audience_names(claims: &serde_json::Map<String, serde_json::Value>, audience: &str) -> bool {
    match claims.get("aud") {
        Some(serde_json::Value::String(one)) => one == audience,
        Some(serde_json::Value::Array(many)) => many.iter().any(|aud| aud == audience),
        _ => false,
    }
}

/// Decodes a token's structure. Nothing is trusted yet.
pub fn decode(token: &str) -> Result<DecodedToken, TokenError> {
    let parts = JwsParts::split(token)?;
    let header: Header = serde_json::from_slice(&parts.header)
        .map_err(|_| TokenError::Malformed("header is not JSON"))?;
    if header.crit {
        return Err(TokenError::UnsupportedHeader("crit"));
    }
    if !matches!(header.typ.as_deref(), Some("at+jwt" | "application/at+jwt")) {
        return Err(TokenError::UnsupportedHeader("typ must be at+jwt"));
    }
    let algorithm =
        KeyAlgorithm::from_jws_name(&header.alg).ok_or(TokenError::UnsupportedHeader("alg"))?;
    let kid = header
        .kid
        .ok_or(TokenError::UnsupportedHeader("kid missing"))?;
    let claims: AccessTokenClaims =
        serde_json::from_slice(&parts.payload).map_err(|_| TokenError::Malformed("claims"))?;
    Ok(DecodedToken {
        kid,
        algorithm,
        signing_input_len: parts.signing_input_len,
        signature: parts.signature,
        claims,
    })
}

/// Checks a decoded token against `key` and `expected`, returning its claims when valid.
/// `token` must be the text `decoded` came from.
pub fn check(
    token: &str,
    decoded: DecodedToken,
    key: &VerifyingKey,
    expected: Expectations<'_>,
) -> Result<AccessTokenClaims, TokenError> {
    check_header(&decoded, key)?;
    if !key.verify(
        &token.as_bytes()[..decoded.signing_input_len],
        &decoded.signature,
    ) {
        return Err(TokenError::BadSignature);
    }
    check_claims(decoded.claims, expected)
}

/// [`check`] for a token whose exact text was already found well signed by `key`: everything
/// but the signature, which cannot have changed.
pub fn check_verified(
    decoded: DecodedToken,
    key: &VerifyingKey,
    expected: Expectations<'_>,
) -> Result<AccessTokenClaims, TokenError> {
    check_header(&decoded, key)?;
    check_claims(decoded.claims, expected)
}

/// The header names `key`, with the algorithm `key` was made for.
fn check_header(decoded: &DecodedToken, key: &VerifyingKey) -> Result<(), TokenError> {
    if key.kid != decoded.kid {
        return Err(TokenError::UnknownKey(decoded.kid.clone()));
    }
    if key.algorithm != decoded.algorithm {
        return Err(TokenError::UnsupportedHeader("alg does not match the key"));
    }
    Ok(())
}

/// Issuer, audience and time claims as `expected`.
fn check_claims(
    claims: AccessTokenClaims,
    expected: Expectations<'_>,
) -> Result<AccessTokenClaims, TokenError> {
    if claims.iss != expected.issuer {
        return Err(TokenError::WrongIssuer(claims.iss));
    }
    if claims.aud != expected.audience {
        return Err(TokenError::WrongAudience(claims.aud));
    }
    let now = expected.now.as_seconds();
    if now >= claims.exp.saturating_add(expected.leeway_seconds) {
        return Err(TokenError::Expired);
    }
    if now < claims.nbf.saturating_sub(expected.leeway_seconds) {
        return Err(TokenError::NotYetValid);
    }
    if now < claims.iat.saturating_sub(expected.leeway_seconds) {
        return Err(TokenError::IssuedInFuture);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> AccessTokenClaims {
        AccessTokenClaims {
            iss: "https://warrant.test".into(),
            sub: "spiffe://test/workload/agent".into(),
            aud: "https://crm.test".into(),
            exp: now + 60,
            iat: now,
            nbf: now,
            jti: "lease_1".into(),
            scope: "crm:read".into(),
            client_id: "agent".into(),
            task_id: "task_1".into(),
            cnf: None,
            tool: None,
            arguments_digest: None,
            max_uses: None,
        }
    }

    fn expect(now: i64) -> Expectations<'static> {
        Expectations {
            issuer: "https://warrant.test",
            audience: "https://crm.test",
            now: UnixMillis::from_seconds(now),
            leeway_seconds: 0,
        }
    }

    fn verify(
        token: &str,
        key: &VerifyingKey,
        expected: Expectations<'_>,
    ) -> Result<AccessTokenClaims, TokenError> {
        check(token, decode(token)?, key, expected)
    }

    #[test]
    fn valid_token_round_trips_for_both_algorithms() {
        for algorithm in [KeyAlgorithm::EdDsa, KeyAlgorithm::Es256] {
            let (key, _) = SigningKey::generate(algorithm);
            let token = sign(&key, &claims(1000));
            assert_eq!(
                verify(&token, key.verifying_key(), expect(1000)).unwrap(),
                claims(1000)
            );
        }
    }

    #[test]
    fn refuses_expired_early_wrong_audience_and_wrong_issuer() {
        let (key, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
        let token = sign(&key, &claims(1000));
        let vk = key.verifying_key();
        assert_eq!(verify(&token, vk, expect(1060)), Err(TokenError::Expired));
        assert_eq!(
            verify(&token, vk, expect(999)),
            Err(TokenError::NotYetValid)
        );
        let leeway = Expectations {
            leeway_seconds: 5,
            ..expect(1062)
        };
        assert!(verify(&token, vk, leeway).is_ok());
        let wrong_audience = Expectations {
            audience: "https://payments.test",
            ..expect(1000)
        };
        assert!(matches!(
            verify(&token, vk, wrong_audience),
            Err(TokenError::WrongAudience(_))
        ));
        let wrong_issuer = Expectations {
            issuer: "https://evil.test",
            ..expect(1000)
        };
        assert!(matches!(
            verify(&token, vk, wrong_issuer),
            Err(TokenError::WrongIssuer(_))
        ));
    }

    #[test]
    fn ignores_unknown_claims_and_refuses_an_iat_in_the_future() {
        let (key, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
        let vk = key.verifying_key();
        let mut payload = serde_json::to_value(claims(1000)).unwrap();
        payload["authorization_details"] = serde_json::json!([{"type": "future"}]);
        payload["act"] = serde_json::json!({"sub": "spiffe://test/workload/parent"});
        let mut token = key.encoded_header().to_owned();
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap()));
        let signature = URL_SAFE_NO_PAD.encode(key.sign(token.as_bytes()));
        token = format!("{token}.{signature}");
        assert_eq!(verify(&token, vk, expect(1000)).unwrap(), claims(1000));

        let mut early = claims(1000);
        early.iat = 1030;
        early.nbf = 990;
        let token = sign(&key, &early);
        assert_eq!(
            verify(&token, vk, expect(1000)),
            Err(TokenError::IssuedInFuture)
        );
        let leeway = Expectations {
            leeway_seconds: 30,
            ..expect(1000)
        };
        assert!(verify(&token, vk, leeway).is_ok());
    }

    #[test]
    fn refuses_forged_altered_and_algorithm_confused_tokens() {
        let (key, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
        let (attacker, _) = SigningKey::generate(KeyAlgorithm::EdDsa);
        let vk = key.verifying_key();

        let forged = sign(&attacker, &claims(1000));
        assert!(verify(&forged, vk, expect(1000)).is_err());

        let token = sign(&key, &claims(1000));
        let parts: Vec<&str> = token.split('.').collect();
        let mut widened = claims(1000);
        widened.scope = "payments:transfer".into();
        let altered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&widened).unwrap()),
            parts[2]
        );
        assert_eq!(
            verify(&altered, vk, expect(1000)),
            Err(TokenError::BadSignature)
        );

        let none_header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"none","typ":"at+jwt","kid":"{}"}}"#,
            vk.kid
        ));
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert!(matches!(
            verify(&unsigned, vk, expect(1000)),
            Err(TokenError::UnsupportedHeader(_))
        ));

        let es_header = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"ES256","typ":"at+jwt","kid":"{}"}}"#,
            vk.kid
        ));
        let confused = format!("{es_header}.{}.{}", parts[1], parts[2]);
        assert!(matches!(
            verify(&confused, vk, expect(1000)),
            Err(TokenError::UnsupportedHeader(_))
        ));

        let plain_jwt = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#,
            vk.kid
        ));
        let id_token_shaped = format!("{plain_jwt}.{}.{}", parts[1], parts[2]);
        assert!(verify(&id_token_shaped, vk, expect(1000)).is_err());

        for crit in ["null", r#"["exp"]"#, "[]", r#""x""#] {
            let header = URL_SAFE_NO_PAD.encode(format!(
                r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{}","crit":{crit}}}"#,
                vk.kid
            ));
            let critical = format!("{header}.{}.{}", parts[1], parts[2]);
            assert_eq!(
                decode(&critical).err(),
                Some(TokenError::UnsupportedHeader("crit")),
                "crit: {crit}"
            );
        }

        for junk in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &"a".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert!(
                matches!(decode(junk), Err(TokenError::Malformed(_))),
                "{junk:.20}"
            );
        }
    }
}
