//! Instants as milliseconds since the Unix epoch: the unit stored in both databases.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    pub fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        UnixMillis(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    /// This instant moved `duration` later (saturating).
    pub fn plus(self, duration: Duration) -> Self {
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        UnixMillis(self.0.saturating_add(millis))
    }

    /// Rounded down to a whole second, the resolution of JWT time claims, so that a lease's
    /// stored expiry and its token's `exp` are the same instant.
    pub fn floor_to_second(self) -> Self {
        UnixMillis(self.0 - self.0.rem_euclid(1000))
    }

    /// Whole seconds since the epoch, as JWT `exp`/`iat`/`nbf` use.
    pub fn as_seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn from_seconds(seconds: i64) -> Self {
        UnixMillis(seconds.saturating_mul(1000))
    }
}

/// RFC 3339 in UTC to the second, for messages people read (`2026-12-02T06:14:36Z`).
impl std::fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = u64::try_from(self.as_seconds()).unwrap_or(0);
        let instant = UNIX_EPOCH + Duration::from_secs(seconds);
        write!(f, "{}", humantime::format_rfc3339_seconds(instant))
    }
}
