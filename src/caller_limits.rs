//! Per-caller admission: a sustained call rate with a burst allowance (a token bucket) and a
//! cap on calls in flight, so that one busy or misbehaving workload cannot take the broker's
//! capacity from the others. Callers are counted by workload, after authentication, so the
//! table holds at most one entry per workload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::error::Error;

/// How much each caller may do; set by `limits.caller_*` in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerLimitSettings {
    /// Calls per second a caller may sustain.
    pub rate_per_second: u32,
    /// Calls a caller may make at once after being idle.
    pub burst: u32,
    /// Calls of one caller being answered at the same time.
    pub concurrency: u32,
}

impl CallerLimitSettings {
    /// Generous for one agent or API, yet a small share of what the broker serves in all.
    pub const DEFAULT: CallerLimitSettings = CallerLimitSettings {
        rate_per_second: 2_000,
        burst: 4_000,
        concurrency: 128,
    };
}

/// Which limit refused a call, for the metric's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Rate,
    Concurrency,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::Rate => "rate",
            Limit::Concurrency => "concurrency",
        }
    }
}

/// One caller's bucket and in-flight count.
struct Allowance {
    tokens: f64,
    refilled_at: Instant,
    in_flight: u32,
}

type Allowances = HashMap<String, Allowance>;

/// The admission state of every caller seen.
pub struct CallerLimits {
    settings: CallerLimitSettings,
    allowances: Arc<Mutex<Allowances>>,
}

/// A call admitted; dropping it ends the call's share of its caller's concurrency.
pub struct Admitted {
    caller: String,
    allowances: Arc<Mutex<Allowances>>,
}

impl CallerLimits {
    pub fn new(settings: CallerLimitSettings) -> Self {
        CallerLimits {
            settings,
            allowances: Arc::default(),
        }
    }

    /// Admits one call of the workload `caller` now, or says which limit it is over.
    pub fn admit(&self, caller: &str) -> Result<Admitted, (Limit, Error)> {
        let now = Instant::now();
        let settings = self.settings;
        let mut allowances = lock(&self.allowances);
        let allowance = allowances
            .entry(caller.to_owned())
            .or_insert_with(|| Allowance {
                tokens: f64::from(settings.burst),
                refilled_at: now,
                in_flight: 0,
            });
        let elapsed = now.duration_since(allowance.refilled_at).as_secs_f64();
        allowance.tokens = (allowance.tokens + elapsed * f64::from(settings.rate_per_second))
            .min(f64::from(settings.burst));
        allowance.refilled_at = now;
        if allowance.in_flight >= settings.concurrency {
            return Err((
                Limit::Concurrency,
                Error::ResourceExhausted(format!(
                    "this caller already has {} calls in flight (limits.caller_concurrency); \
                     retry when one has finished",
                    settings.concurrency
                )),
            ));
        }
        if allowance.tokens < 1.0 {
            return Err((
                Limit::Rate,
                Error::ResourceExhausted(format!(
                    "this caller is over {} calls per second (limits.caller_rate); retry later",
                    settings.rate_per_second
                )),
            ));
        }
        allowance.tokens -= 1.0;
        allowance.in_flight += 1;
        Ok(Admitted {
            caller: caller.to_owned(),
            allowances: self.allowances.clone(),
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(allowance) = lock(&self.allowances).get_mut(&self.caller) {
            allowance.in_flight = allowance.in_flight.saturating_sub(1);
        }
    }
}

fn lock(allowances: &Mutex<Allowances>) -> MutexGuard<'_, Allowances> {
    allowances
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate_per_second: u32, burst: u32, concurrency: u32) -> CallerLimits {
        CallerLimits::new(CallerLimitSettings {
            rate_per_second,
            burst,
            concurrency,
        })
    }

    #[test]
    fn a_burst_is_admitted_then_the_rate_holds() {
        let limits = limits(1, 3, 100);
        let admitted: Vec<_> = (0..3).map(|_| limits.admit("a").unwrap()).collect();
        let (limit, error) = limits.admit("a").err().unwrap();
        assert_eq!(limit, Limit::Rate);
        assert!(matches!(error, Error::ResourceExhausted(_)));
        // Another caller has its own bucket.
        assert!(limits.admit("b").is_ok());
        drop(admitted);
        // Finishing calls gives back concurrency, not rate.
        assert_eq!(limits.admit("a").err().unwrap().0, Limit::Rate);
    }

    #[test]
    fn calls_in_flight_are_capped_and_given_back_when_they_end() {
        let limits = limits(1_000_000, 1_000, 2);
        let first = limits.admit("a").unwrap();
        let _second = limits.admit("a").unwrap();
        assert_eq!(limits.admit("a").err().unwrap().0, Limit::Concurrency);
        drop(first);
        assert!(limits.admit("a").is_ok());
    }
}
