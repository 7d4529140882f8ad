//! Which requests are let in: per-client limits on requests in flight and on request rate, so that one
//! client (a leaked key, a runaway job, a script in a loop) cannot take the whole service from the others.
//!
//! A client is its API key when it sends a valid one, else its address: a caller without a valid key
//! cannot get a fresh allowance by sending a new made-up key each time. Without keys, every caller on one
//! address is one client (behind a reverse proxy: the proxy; per-client limits are then the proxy's job).
//! Over a limit the answer is HTTP 429 with `Retry-After`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The limits per client; 0 switches one off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Requests per second, sustained.
    pub requests_per_second: u32,
    /// Requests a client may send at once above the sustained rate (the bucket's size).
    pub burst: u32,
    /// Requests of one client being served at the same time.
    pub concurrent_requests: usize,
}

/// Who a request counts against.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum ClientId {
    /// A valid API key, by the first bytes of its digest (never the key).
    Key([u8; 8]),
    Address(IpAddr),
}

/// Why a request was not let in, and when the client may try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Rate { retry_after: Duration },
    Concurrency,
}

pub struct Admission {
    limits: ClientLimits,
    rate: Option<DefaultKeyedRateLimiter<ClientId>>,
    in_flight: dashmap::DashMap<ClientId, usize>,
    admitted: AtomicU64,
}

impl Admission {
    /// Forget clients idle long enough to have a full allowance again, every this many admissions, so that
    /// many short-lived addresses cannot grow the limiter's table without bound.
    const FORGET_EVERY: u64 = 4096;

    pub fn new(limits: ClientLimits) -> Self {
        let rate = NonZeroU32::new(limits.requests_per_second).map(|rate| {
            let burst = NonZeroU32::new(limits.burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limits,
            rate,
            in_flight: dashmap::DashMap::new(),
            admitted: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> ClientLimits {
        self.limits
    }

    /// Lets a request of `client` in, or says why not. The ticket counts it as in flight until dropped.
    pub fn admit(self: &Arc<Self>, client: ClientId) -> Result<Ticket, Refusal> {
        let concurrent = self.limits.concurrent_requests;
        if concurrent > 0 {
            let mut in_flight = self.in_flight.entry(client.clone()).or_insert(0);
            if *in_flight >= concurrent {
                return Err(Refusal::Concurrency);
            }
            *in_flight += 1;
        }
        let ticket = Ticket {
            admission: self.clone(),
            client,
        };
        if let Some(rate) = &self.rate {
            if self
                .admitted
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(Self::FORGET_EVERY)
            {
                rate.retain_recent();
            }
            if let Err(not_until) = rate.check_key(&ticket.client) {
                // The ticket's drop gives the slot back.
                return Err(Refusal::Rate {
                    retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                });
            }
        }
        Ok(ticket)
    }
}

/// A request let in; dropping it ends its count as in flight.
pub struct Ticket {
    admission: Arc<Admission>,
    client: ClientId,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.admission.limits.concurrent_requests == 0 {
            return;
        }
        // Forget a client with nothing in flight: the table holds only active clients.
        self.admission
            .in_flight
            .remove_if_mut(&self.client, |_, in_flight| {
                *in_flight = in_flight.saturating_sub(1);
                *in_flight == 0
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(n: u8) -> ClientId {
        ClientId::Address(IpAddr::from([10, 0, 0, n]))
    }

    #[test]
    fn requests_in_flight_are_capped_per_client_and_released_on_drop() {
        let admission = Arc::new(Admission::new(ClientLimits {
            requests_per_second: 0,
            burst: 0,
            concurrent_requests: 2,
        }));
        let first = admission.admit(client(1)).unwrap();
        let _second = admission.admit(client(1)).unwrap();
        assert_eq!(admission.admit(client(1)).err(), Some(Refusal::Concurrency));
        // Another client is not affected.
        let _other = admission.admit(client(2)).unwrap();
        drop(first);
        let _third = admission.admit(client(1)).unwrap();
    }

    #[test]
    fn the_table_forgets_clients_with_nothing_in_flight() {
        let admission = Arc::new(Admission::new(ClientLimits {
            requests_per_second: 0,
            burst: 0,
            concurrent_requests: 4,
        }));
        for n in 0..=255 {
            drop(admission.admit(client(n)).unwrap());
        }
        assert!(admission.in_flight.is_empty());
    }

    #[test]
    fn the_rate_allows_a_burst_then_refuses_with_a_wait_and_refusals_hold_no_slot() {
        let admission = Arc::new(Admission::new(ClientLimits {
            requests_per_second: 1,
            burst: 3,
            concurrent_requests: 1,
        }));
        for _ in 0..3 {
            drop(admission.admit(client(1)).unwrap());
        }
        match admission.admit(client(1)) {
            Err(Refusal::Rate { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1))
            }
            other => panic!("expected a rate refusal, got {:?}", other.err()),
        }
        // The refused request gave its slot back.
        assert!(admission.in_flight.is_empty());
        // Keys and addresses are separate clients.
        drop(admission.admit(ClientId::Key([1; 8])).unwrap());
    }
}
