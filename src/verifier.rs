//! Offline validation of Warrant access tokens for downstream Rust APIs.
//!
//! A [`Verifier`] keeps the broker's JWKS and follows its revocation feed in the background, so
//! checking a token costs one signature verification and two hash lookups, with no call to the
//! broker. It refetches the JWKS when a token names a key it does not know (a rotation), at most
//! once per [`KEY_REFRESH_INTERVAL`], and resumes the feed from its cursor after a reconnect.
//!
//! It fails closed when the feed goes quiet. The broker sends a heartbeat while it has no
//! revocations to send; once nothing has been heard for the staleness bound (by default three
//! of the broker's heartbeat intervals), a revocation may be on its way that the verifier
//! cannot see, so it refuses every token with [`VerifyError::Stale`], or, with
//! [`WhenStale::Introspect`], asks the broker about each token instead. HTTP/2 keepalive on the
//! connection turns a half-open connection into a reconnect.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use warrant::verifier::{Verifier, VerifierConfig};
//! let verifier = Verifier::connect(VerifierConfig::new(
//!     "http://127.0.0.1:7400",
//!     "https://crm.example.internal",
//!     "wrt_...", // a workload credential, to follow the revocation feed
//! ))
//! .await?;
//! let claims = verifier.verify("eyJ...").await?;
//! println!("{} may use {}", claims.sub, claims.scope);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

use crate::client::{ClientError, Connection};
use crate::domain::UnixMillis;
use crate::issuer::jwt::{self, AccessTokenClaims, Expectations, TokenError};
use crate::issuer::{Jwk, VerifyingKey};
use crate::proto;

/// The shortest interval between two JWKS fetches triggered by unknown key ids, so a flood of
/// forged kids cannot turn the verifier into a load generator against the broker.
pub const KEY_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// How long [`Verifier::connect`] waits for the revocation feed to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(5);
/// How many heartbeat intervals of silence make the revocation state stale by default.
pub const HEARTBEATS_BEFORE_STALE: u32 = 3;
/// The heartbeat interval assumed until the broker announces its own (and for a broker that
/// announces none): the broker's default.
const ASSUMED_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// What [`Verifier::verify`] does with a token while the revocation feed is stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenStale {
    /// Refuse every token with [`VerifyError::Stale`] (fail closed).
    #[default]
    Refuse,
    /// Ask the broker (`Tokens.Introspect`, which needs a credential allowed to introspect this
    /// audience); refuse with [`VerifyError::Stale`] if it cannot answer either.
    Introspect,
}

/// How to reach the broker and what tokens must match. `Debug` never shows the credential.
#[derive(Clone)]
pub struct VerifierConfig {
    /// The broker's gRPC address.
    pub address: String,
    /// The audience this API serves; tokens for any other audience are refused.
    pub audience: String,
    /// A workload credential, needed to follow the revocation feed.
    pub credential: String,
    /// The expected issuer; `None` takes the one the broker announces with its keys.
    pub issuer: Option<String>,
    /// Tolerated clock difference for `exp` and `nbf`.
    pub leeway: Duration,
    /// CA certificate (PEM) of an `https://` broker.
    pub ca_pem: Option<Vec<u8>>,
    /// How long the feed may stay silent before the revocation state counts as stale; `None`
    /// takes [`HEARTBEATS_BEFORE_STALE`] of the broker's heartbeat intervals.
    pub staleness_bound: Option<Duration>,
    /// What to do with tokens while the revocation state is stale.
    pub when_stale: WhenStale,
}

impl VerifierConfig {
    pub fn new(
        address: impl Into<String>,
        audience: impl Into<String>,
        credential: impl Into<String>,
    ) -> Self {
        VerifierConfig {
            address: address.into(),
            audience: audience.into(),
            credential: credential.into(),
            issuer: None,
            leeway: Duration::from_secs(5),
            ca_pem: None,
            staleness_bound: None,
            when_stale: WhenStale::Refuse,
        }
    }
}

impl std::fmt::Debug for VerifierConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierConfig")
            .field("address", &self.address)
            .field("audience", &self.audience)
            .field("credential", &"[redacted]")
            .field("issuer", &self.issuer)
            .field("leeway", &self.leeway)
            .field("staleness_bound", &self.staleness_bound)
            .field("when_stale", &self.when_stale)
            .finish()
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("invalid token: {0}")]
    Invalid(#[from] TokenError),
    /// Revoked, as the feed reported, or inactive, as the broker answered when asked.
    #[error("token revoked")]
    Revoked,
    /// The token is bound to a client certificate (RFC 8705 `cnf`) other than the one it came
    /// with, or came without one.
    #[error("token bound to another client certificate")]
    CertificateMismatch,
    /// A token limited in uses (a tool call's token, a scope's `max_uses`), which only the
    /// broker's introspection may accept: a local check cannot count its uses.
    #[error(
        "a token limited in uses (a call token, or max_uses) is checked with the broker's Introspect at each use"
    )]
    UseNeedsIntrospection,
    /// Nothing was heard from the revocation feed for longer than the staleness bound, so a
    /// revocation may have been missed; the token itself was otherwise valid.
    #[error(
        "cannot check revocation: no word from the broker's revocation feed for {}s",
        silent_for.as_secs()
    )]
    Stale { silent_for: Duration },
}

/// Why a verifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("broker refused: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the revocation feed did not catch up within {0:?}")]
    FeedTimeout(Duration),
}

/// Revocations known from the feed, each kept until the tokens concerned expire anyway.
struct Revocations {
    leases: HashMap<String, UnixMillis>,
    tasks: HashMap<String, UnixMillis>,
    cursor: u64,
    caught_up: bool,
    /// When the last message arrived that left this state complete: a caught-up batch of the
    /// current subscription, not a page of a backlog still being replayed.
    last_vouched: Instant,
    /// The broker's heartbeat interval, as it last announced it.
    heartbeat_interval: Duration,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            leases: HashMap::new(),
            tasks: HashMap::new(),
            cursor: 0,
            caught_up: false,
            last_vouched: Instant::now(),
            heartbeat_interval: ASSUMED_HEARTBEAT_INTERVAL,
        }
    }
}

struct Shared {
    audience: String,
    issuer: RwLock<String>,
    leeway_seconds: i64,
    keys: RwLock<HashMap<String, VerifyingKey>>,
    revocations: RwLock<Revocations>,
    last_key_refresh: Mutex<Option<Instant>>,
    connection: Connection,
    fixed_issuer: bool,
    staleness_bound: Option<Duration>,
    when_stale: WhenStale,
}

/// Validates Warrant tokens offline. Stops following the feed when dropped.
pub struct Verifier {
    shared: Arc<Shared>,
    follower: AbortHandle,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl Verifier {
    /// Fetches the keys, starts following the revocation feed and waits until it has caught up.
    pub async fn connect(config: VerifierConfig) -> Result<Self, VerifierError> {
        let connection = Connection::open(
            &config.address,
            Some(&config.credential),
            config.ca_pem.as_deref(),
        )
        .await?;
        let shared = Arc::new(Shared {
            audience: config.audience,
            fixed_issuer: config.issuer.is_some(),
            issuer: RwLock::new(config.issuer.unwrap_or_default()),
            leeway_seconds: i64::try_from(config.leeway.as_secs()).unwrap_or(i64::MAX),
            keys: RwLock::new(HashMap::new()),
            revocations: RwLock::new(Revocations::default()),
            last_key_refresh: Mutex::new(None),
            connection,
            staleness_bound: config.staleness_bound,
            when_stale: config.when_stale,
        });
        shared.refresh_keys().await?;
        let follower = tokio::spawn(follow_feed(shared.clone())).abort_handle();
        let verifier = Verifier { shared, follower };
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        while !verifier.shared.read_revocations().caught_up {
            if Instant::now() > deadline {
                return Err(VerifierError::FeedTimeout(CATCH_UP_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(verifier)
    }

    /// Checks `token` with the cached keys and revocations, refetching the keys once if the
    /// token names an unknown key. While the feed is stale, asks the broker instead if so
    /// configured ([`WhenStale::Introspect`]). A token bound to a client certificate is
    /// refused: use [`Verifier::verify_from_client`] for those.
    pub async fn verify(&self, token: &str) -> Result<AccessTokenClaims, VerifyError> {
        self.verify_from_client(token, None).await
    }

    /// [`Verifier::verify`] for a token that arrived over mTLS with the client certificate
    /// `client_certificate` (DER): a certificate-bound token (RFC 8705 `cnf`) is accepted only
    /// with the certificate it is bound to.
    pub async fn verify_from_client(
        &self,
        token: &str,
        client_certificate: Option<&[u8]>,
    ) -> Result<AccessTokenClaims, VerifyError> {
        let thumbprint = client_certificate.map(crate::identity::thumbprint);
        let claims = match self.check_signed_and_unrevoked(token, thumbprint.as_deref()) {
            Err(VerifyError::Invalid(TokenError::UnknownKey(_)))
                if self.shared.may_refresh_keys() =>
            {
                if let Err(error) = self.shared.refresh_keys().await {
                    tracing::warn!(%error, "JWKS refresh failed");
                }
                self.check_signed_and_unrevoked(token, thumbprint.as_deref())
            }
            outcome => outcome,
        }?;
        match self.shared.silence() {
            None => Ok(claims),
            Some(silent_for) if self.shared.when_stale == WhenStale::Introspect => {
                self.introspect(token, thumbprint.as_deref(), claims, silent_for)
                    .await
            }
            Some(silent_for) => Err(VerifyError::Stale { silent_for }),
        }
    }

    /// Checks `token` with the cached keys and revocations only: no I/O, for hot paths.
    pub fn verify_cached(&self, token: &str) -> Result<AccessTokenClaims, VerifyError> {
        let claims = self.check_signed_and_unrevoked(token, None)?;
        match self.shared.silence() {
            Some(silent_for) => Err(VerifyError::Stale { silent_for }),
            None => Ok(claims),
        }
    }

    /// The token's signature, header and claims, and the revocations known so far.
    fn check_signed_and_unrevoked(
        &self,
        token: &str,
        client_thumbprint: Option<&str>,
    ) -> Result<AccessTokenClaims, VerifyError> {
        let decoded = jwt::decode(token)?;
        let key = self
            .shared
            .keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(decoded.kid())
            .cloned()
            .ok_or_else(|| TokenError::UnknownKey(decoded.kid().to_owned()))?;
        let issuer = self
            .shared
            .issuer
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let expected = Expectations {
            issuer: &issuer,
            audience: &self.shared.audience,
            now: UnixMillis::now(),
            leeway_seconds: self.shared.leeway_seconds,
        };
        let claims = jwt::check(token, decoded, &key, expected)?;
        let revocations = self.shared.read_revocations();
        if revocations.leases.contains_key(&claims.jti)
            || revocations.tasks.contains_key(&claims.task_id)
        {
            return Err(VerifyError::Revoked);
        }
        if !claims.is_usable_with(client_thumbprint) {
            return Err(VerifyError::CertificateMismatch);
        }
        if claims.max_uses.is_some()
            || claims
                .scope
                .starts_with(crate::domain::tool::CALL_SCOPE_PREFIX)
        {
            return Err(VerifyError::UseNeedsIntrospection);
        }
        Ok(claims)
    }

    /// The fallback while the feed is stale: the token passed every local check (`claims`),
    /// and the broker says whether it is still active.
    async fn introspect(
        &self,
        token: &str,
        client_thumbprint: Option<&str>,
        claims: AccessTokenClaims,
        silent_for: Duration,
    ) -> Result<AccessTokenClaims, VerifyError> {
        let answer = self
            .shared
            .connection
            .tokens()
            .introspect(proto::IntrospectRequest {
                token: token.to_owned(),
                audience: self.shared.audience.clone(),
                client_certificate_thumbprint: client_thumbprint.unwrap_or_default().to_owned(),
                ..Default::default()
            })
            .await;
        match answer {
            Ok(response) if response.get_ref().active => Ok(claims),
            Ok(_) => Err(VerifyError::Revoked),
            Err(status) => {
                tracing::warn!(code = ?status.code(), "introspection fallback failed");
                Err(VerifyError::Stale { silent_for })
            }
        }
    }
}

impl Shared {
    /// How long the feed has been silent, if longer than the staleness bound.
    fn silence(&self) -> Option<Duration> {
        let revocations = self.read_revocations();
        let bound = self
            .staleness_bound
            .unwrap_or(revocations.heartbeat_interval * HEARTBEATS_BEFORE_STALE);
        let silent_for = revocations.last_vouched.elapsed();
        (silent_for > bound).then_some(silent_for)
    }

    fn read_revocations(&self) -> std::sync::RwLockReadGuard<'_, Revocations> {
        self.revocations
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether an unknown kid may trigger a JWKS fetch now (rate limited); records the attempt.
    fn may_refresh_keys(&self) -> bool {
        let mut last = self
            .last_key_refresh
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let allowed = last.is_none_or(|at| at.elapsed() >= KEY_REFRESH_INTERVAL);
        if allowed {
            *last = Some(Instant::now());
        }
        allowed
    }

    async fn refresh_keys(&self) -> Result<(), VerifierError> {
        let response = self
            .connection
            .tokens()
            .get_jwks(proto::GetJwksRequest {})
            .await?
            .into_inner();
        let keys: HashMap<String, VerifyingKey> = response
            .keys
            .into_iter()
            .filter_map(|key| {
                let jwk = Jwk::from(key);
                VerifyingKey::from_jwk(&jwk)
                    .map_err(|error| tracing::warn!(%error, kid = %jwk.kid, "ignoring JWK"))
                    .ok()
            })
            .map(|key| (key.kid.clone(), key))
            .collect();
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = keys;
        if !self.fixed_issuer {
            *self
                .issuer
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = response.issuer;
        }
        Ok(())
    }

    fn apply(&self, batch: proto::WatchRevocationsResponse) {
        let now = UnixMillis::now();
        let mut revocations = self
            .revocations
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for event in batch.events {
            let not_after = event.not_after.map_or(now, |at| {
                UnixMillis::from_seconds(at.seconds).plus(Duration::from_secs(1))
            });
            if event.lease_id.is_empty() {
                revocations.tasks.insert(event.task_id, not_after);
            } else {
                revocations.leases.insert(event.lease_id, not_after);
            }
        }
        // Entries whose tokens have expired (with leeway) can no longer matter.
        let horizon = UnixMillis(now.0 - self.leeway_seconds.saturating_mul(1000));
        revocations
            .leases
            .retain(|_, not_after| *not_after > horizon);
        revocations
            .tasks
            .retain(|_, not_after| *not_after > horizon);
        revocations.cursor = batch.cursor.max(revocations.cursor);
        revocations.caught_up |= batch.caught_up;
        if batch.caught_up {
            revocations.last_vouched = Instant::now();
        }
        if batch.heartbeat_interval_ms > 0 {
            revocations.heartbeat_interval =
                Duration::from_millis(u64::from(batch.heartbeat_interval_ms));
        }
    }
}

/// Follows the revocation feed forever, reconnecting from the last applied cursor.
async fn follow_feed(shared: Arc<Shared>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let cursor = shared.read_revocations().cursor;
        match shared
            .connection
            .tokens()
            .watch_revocations(proto::WatchRevocationsRequest { cursor })
            .await
        {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(batch)) => {
                            delay = Duration::from_millis(100);
                            shared.apply(batch);
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(%status, "revocation feed interrupted; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::warn!(%status, "cannot subscribe to the revocation feed; retrying")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_DELAY_MAX);
    }
}
