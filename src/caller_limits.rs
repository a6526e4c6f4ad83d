//! Per-caller admission: a sustained call rate with a burst allowance (a token bucket) and a
//! cap on calls in flight, so that one busy or misbehaving workload cannot take the broker's
//! capacity from the others. Callers are workloads (after authentication) or, for attestation,
//! peer addresses; the table forgets callers that are idle and refuses new ones once it holds
//! [`MAX_CALLERS`] busy ones, so many addresses cannot grow it without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::error::Error;

/// Callers tracked at most.
pub const MAX_CALLERS: usize = 65_536;

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

impl Allowance {
    fn is_idle(&self, now: Instant, settings: CallerLimitSettings) -> bool {
        let refill = now.duration_since(self.refilled_at).as_secs_f64()
            * f64::from(settings.rate_per_second);
        self.in_flight == 0 && self.tokens + refill >= f64::from(settings.burst)
    }
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
        if allowances.len() >= MAX_CALLERS && !allowances.contains_key(caller) {
            // A caller with no call in flight and a full bucket is as if never seen.
            allowances.retain(|_, allowance| !allowance.is_idle(now, settings));
            if allowances.len() >= MAX_CALLERS {
                return Err((
                    Limit::Concurrency,
                    Error::ResourceExhausted(format!(
                        "the broker is tracking {MAX_CALLERS} busy callers; retry later"
                    )),
                ));
            }
        }
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
    fn idle_callers_are_forgotten_and_busy_ones_bound_the_table() {
        let limits = limits(1_000_000, 10, 10);
        let busy: Vec<_> = (0..MAX_CALLERS)
            .map(|n| limits.admit(&format!("peer-{n}")).unwrap())
            .collect();
        assert_eq!(
            limits.admit("one-more").err().unwrap().0,
            Limit::Concurrency,
            "a full table of busy callers refuses a new one"
        );
        drop(busy);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(limits.admit("one-more").is_ok(), "idle callers made room");
        assert!(lock(&limits.allowances).len() <= 2);
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
