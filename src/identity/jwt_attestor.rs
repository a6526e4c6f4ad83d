//! The `jwt` attestor: a workload proves what it is with a token its platform issued to it (a
//! Kubernetes projected service-account token, a CI OIDC token such as GitHub Actions'),
//! checked against that issuer's JWKS and the audience configured for it. It observes the
//! selectors `jwt:iss:<iss>`, `jwt:sub:<sub>` and `jwt:claim:<name>:<value>` for each claim the
//! issuer's configuration names.
//!
//! The JWKS is a file the operator keeps current (for Kubernetes, `kubectl get --raw
//! /openid/v1/jwks`) or an HTTPS URL (a CI provider's `.well-known/jwks`). A file is read at
//! start (an unreadable one stops the start); a URL is fetched at start, and while it cannot be
//! fetched that issuer's tokens are refused (fail closed, the broker still starts). Either is
//! read again when a token names a key it does not hold, at most once per the issuer's
//! `min_refresh`, so a flood of made-up key ids cannot turn into a flood of reads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use rustls::RootCertStore;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::domain::UnixMillis;
use crate::https_client::{self, HttpsUrl};
use crate::issuer::jwt::{JwsParts, TokenError, audience_names};

/// The default shortest time between two reads of one issuer's JWKS.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
const LEEWAY_SECONDS: i64 = 30;

/// One trusted external issuer, from the configuration (`[[identity.jwt_issuer]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtIssuerConfig {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// The `aud` its tokens must carry for Warrant.
    pub audience: String,
    pub jwks: JwksSource,
    /// Top-level string claims observed as `jwt:claim:<name>:<value>` selectors.
    pub claims: Vec<String>,
    /// The shortest time between two reads of the JWKS.
    pub min_refresh: Duration,
}

/// Where an issuer's JWKS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// Fetched with the roots in `ca_file` (PEM), or the system's CA bundle.
    Https {
        url: HttpsUrl,
        ca_file: Option<PathBuf>,
    },
}

impl JwksSource {
    fn describe(&self) -> String {
        match self {
            JwksSource::File(path) => format!("jwks_file {}", path.display()),
            JwksSource::Https { url, .. } => format!("jwks_url {}", url.as_str()),
        }
    }
}

/// A source ready to read: HTTPS roots loaded.
enum Reader {
    File(PathBuf),
    Https {
        url: HttpsUrl,
        roots: Arc<RootCertStore>,
    },
}

impl Reader {
    async fn read(&self) -> Result<HashMap<String, ExternalKey>, String> {
        let document = match self {
            Reader::File(path) => tokio::fs::read(path)
                .await
                .map_err(|error| error.to_string())?,
            Reader::Https { url, roots } => https_client::fetch(url, roots.clone()).await?,
        };
        parse_jwks(&document)
    }
}

/// Why a token was refused, as the audit trail records it; the caller is told less.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
}

fn refuse(reason: &'static str) -> Refusal {
    Refusal { reason }
}

/// A verification key from a JWKS.
enum ExternalKey {
    Rs256 {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed P-256 point.
    Es256(Vec<u8>),
}

struct Keys {
    by_kid: Arc<HashMap<String, ExternalKey>>,
    /// When the JWKS was last read (or a read last began); `None` before the first success
    /// of a URL that could not be fetched at start.
    read_at: Option<Instant>,
}

struct TrustedIssuer {
    config: JwtIssuerConfig,
    reader: Reader,
    keys: Mutex<Keys>,
}

/// The configured issuers and their keys.
pub struct JwtAttestor {
    issuers: Vec<TrustedIssuer>,
}

/// A JWKS file that could not be used at start.
#[derive(Debug, thiserror::Error)]
#[error("identity.jwt_issuer {issuer}: {location}: {reason}")]
pub struct JwksError {
    issuer: String,
    location: String,
    reason: String,
}

impl JwtAttestor {
    /// Reads every issuer's JWKS. A file that cannot be read (or holds no usable key), or CA
    /// roots that cannot be loaded, fail the start; a URL that cannot be fetched now is retried
    /// when a token of its issuer comes.
    pub async fn load(configs: &[JwtIssuerConfig]) -> Result<JwtAttestor, JwksError> {
        let mut issuers = Vec::with_capacity(configs.len());
        for config in configs {
            let failed = |reason: String| JwksError {
                issuer: config.issuer.clone(),
                location: config.jwks.describe(),
                reason,
            };
            let reader = match &config.jwks {
                JwksSource::File(path) => Reader::File(path.clone()),
                JwksSource::Https { url, ca_file } => Reader::Https {
                    url: url.clone(),
                    roots: Arc::new(https_client::roots(ca_file.as_deref()).map_err(failed)?),
                },
            };
            let keys = match (reader.read().await, &reader) {
                (Ok(by_kid), _) => Keys {
                    by_kid: Arc::new(by_kid),
                    read_at: Some(Instant::now()),
                },
                (Err(reason), Reader::Https { .. }) => {
                    tracing::warn!(issuer = %config.issuer, %reason, "cannot fetch the JWKS; this issuer's tokens are refused until it can be");
                    Keys {
                        by_kid: Arc::default(),
                        read_at: None,
                    }
                }
                (Err(reason), Reader::File(_)) => return Err(failed(reason)),
            };
            issuers.push(TrustedIssuer {
                config: config.clone(),
                reader,
                keys: Mutex::new(keys),
            });
        }
        Ok(JwtAttestor { issuers })
    }

    /// The selectors `token` proves at `now`, or why it proves nothing.
    pub async fn attest(&self, token: &str, now: UnixMillis) -> Result<Vec<String>, Refusal> {
        let parts = JwsParts::split(token).map_err(|_| refuse("malformed"))?;
        let header = parts.json_header().map_err(|error| match error {
            TokenError::UnsupportedHeader(_) => refuse("critical_header"),
            _ => refuse("malformed"),
        })?;
        let claims = parts.json_claims().map_err(|_| refuse("malformed"))?;
        let algorithm = header.get("alg").and_then(Value::as_str);
        if !matches!(algorithm, Some("RS256" | "ES256")) {
            return Err(refuse("algorithm"));
        }
        let issuer = claims
            .get("iss")
            .and_then(Value::as_str)
            .and_then(|iss| {
                self.issuers
                    .iter()
                    .find(|trusted| trusted.config.issuer == iss)
            })
            .ok_or(refuse("unknown_issuer"))?;
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let signing_input = &token.as_bytes()[..parts.signing_input_len];
        let keys = issuer.keys_holding(kid).await;
        if !verify(&keys, kid, algorithm, signing_input, &parts.signature) {
            return Err(refuse("signature"));
        }
        check_times(&claims, now.as_seconds())?;
        if !audience_names(&claims, &issuer.config.audience) {
            return Err(refuse("audience"));
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|sub| !sub.is_empty())
            .ok_or(refuse("no_subject"))?;
        let mut selectors = vec![
            format!("jwt:iss:{}", issuer.config.issuer),
            format!("jwt:sub:{subject}"),
        ];
        for name in &issuer.config.claims {
            if let Some(value) = claims.get(name).and_then(Value::as_str) {
                selectors.push(format!("jwt:claim:{name}:{value}"));
            }
        }
        Ok(selectors)
    }
}

impl TrustedIssuer {
    /// The issuer's keys, read again first (at most once per `min_refresh`, and without
    /// holding the lock while reading) when they do not hold `kid`.
    async fn keys_holding(&self, kid: &str) -> Arc<HashMap<String, ExternalKey>> {
        {
            let mut keys = self.lock();
            let due = !keys.by_kid.contains_key(kid)
                && keys
                    .read_at
                    .is_none_or(|at| at.elapsed() >= self.config.min_refresh);
            if !due {
                return keys.by_kid.clone();
            }
            keys.read_at = Some(Instant::now());
        }
        match self.reader.read().await {
            Ok(by_kid) => {
                let by_kid = Arc::new(by_kid);
                self.lock().by_kid = by_kid.clone();
                by_kid
            }
            Err(reason) => {
                tracing::warn!(issuer = %self.config.issuer, %reason, "cannot read the JWKS again; keeping the keys read before");
                self.lock().by_kid.clone()
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        match self.keys.lock() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Checks the signature with key `kid` of `keys`, whose type must be the one `algorithm`
/// names.
fn verify(
    keys: &HashMap<String, ExternalKey>,
    kid: &str,
    algorithm: Option<&str>,
    message: &[u8],
    signature: &[u8],
) -> bool {
    match (keys.get(kid), algorithm) {
        (Some(ExternalKey::Rs256 { n, e }), Some("RS256")) => RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
            .is_ok(),
        (Some(ExternalKey::Es256(point)), Some("ES256")) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .is_ok()
        }
        _ => false,
    }
}

/// `exp` is required and must not have passed; `nbf` and `iat`, when present, must not be in
/// the future (each with [`LEEWAY_SECONDS`]).
fn check_times(claims: &Map<String, Value>, now: i64) -> Result<(), Refusal> {
    let expires = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(refuse("no_expiry"))?;
    if expires + LEEWAY_SECONDS <= now {
        return Err(refuse("expired"));
    }
    for name in ["nbf", "iat"] {
        if let Some(at) = claims.get(name) {
            let at = at.as_i64().ok_or(refuse("malformed"))?;
            if at > now + LEEWAY_SECONDS {
                return Err(refuse("not_yet_valid"));
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Map<String, Value>>,
}

/// The usable keys of a JWKS document, by `kid`: RSA keys and P-256 keys, skipping other
/// types and keys marked for encryption.
fn parse_jwks(text: &[u8]) -> Result<HashMap<String, ExternalKey>, String> {
    let set: JwkSet =
        serde_json::from_slice(text).map_err(|error| format!("not a JWK Set: {error}"))?;
    let member = |jwk: &Map<String, Value>, name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .and_then(|text| URL_SAFE_NO_PAD.decode(text).ok())
    };
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        if jwk.get("use").and_then(Value::as_str) == Some("enc") {
            continue;
        }
        let kid = jwk
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let key = match (
            jwk.get("kty").and_then(Value::as_str),
            jwk.get("crv").and_then(Value::as_str),
        ) {
            (Some("RSA"), _) => match (member(jwk, "n"), member(jwk, "e")) {
                (Some(n), Some(e)) => ExternalKey::Rs256 { n, e },
                _ => continue,
            },
            (Some("EC"), Some("P-256")) => match (member(jwk, "x"), member(jwk, "y")) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                    ExternalKey::Es256([vec![0x04], x, y].concat())
                }
                _ => continue,
            },
            _ => continue,
        };
        keys.insert(kid, key);
    }
    if keys.is_empty() {
        return Err("holds no RSA or P-256 signing key".into());
    }
    Ok(keys)
}
