//! Balancing algorithms behind one trait. An upstream asks its balancer for a backend
//! among those still eligible for this connection (not yet tried, weight above zero).
//!
//! Algorithms read the backends' own state (weights, active counts); they keep no copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config;
use crate::upstream::Backend;

/// Picks the backend for a new connection.
pub trait Balance: Send + Sync {
    /// Index into `backends` of the backend to try next, among those `eligible` accepts;
    /// `None` when no eligible backend is left.
    ///
    /// `cursor` belongs to one client connection and starts as `None`; a balancer may keep
    /// its position there, so that the retries of one connection do not shift the order
    /// seen by every other connection.
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        client: SocketAddr,
        cursor: &mut Option<usize>,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<usize>;
}

/// The balancer for an upstream as configured.
pub fn for_upstream(kind: config::Balance, backends: &[config::Backend]) -> Box<dyn Balance> {
    match kind {
        config::Balance::RoundRobin => Box::new(RoundRobin::new(backends)),
    }
}

/// Smooth weighted round robin (the nginx algorithm): weights 5,1,1 give
/// a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
///
/// The whole cycle is computed once when the snapshot is built, so a pick is one atomic
/// increment and an array read, with no lock on the connection path.
pub struct RoundRobin {
    /// One cycle of backend indices; its length is the sum of the weights over their gcd.
    cycle: Box<[u32]>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(backends: &[config::Backend]) -> RoundRobin {
        let divisor = backends
            .iter()
            .map(|b| b.weight)
            .filter(|w| *w > 0)
            .fold(0, gcd)
            .max(1);
        let weights: Vec<i64> = backends
            .iter()
            .map(|b| i64::from(b.weight / divisor))
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += w;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            // Backend counts are bounded by the config, far below u32::MAX.
            cycle.push(best as u32);
        }
        RoundRobin {
            cycle: cycle.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }
}

impl Balance for RoundRobin {
    fn pick(
        &self,
        _backends: &[Arc<Backend>],
        _client: SocketAddr,
        cursor: &mut Option<usize>,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = self.cycle.len();
        if len == 0 {
            return None;
        }
        // A retry scans on from where this connection started; ineligible (tried)
        // backends are skipped by the scan.
        let start = *cursor.get_or_insert_with(|| self.next.fetch_add(1, Ordering::Relaxed));
        (0..len)
            .map(|k| self.cycle[(start + k) % len] as usize)
            .find(|&i| eligible(i))
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<config::Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| config::Backend {
                address: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                weight,
            })
            .collect()
    }

    fn client() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn smooth_order_spreads_the_heavy_backend() {
        let rr = RoundRobin::new(&backends(&[5, 1, 1]));
        let picks: Vec<usize> = (0..7)
            .map(|_| {
                rr.pick(&[], client(), &mut None, &|_| true)
                    .expect("a backend")
            })
            .collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_are_honoured_over_many_picks() {
        let rr = RoundRobin::new(&backends(&[3, 0, 1, 6]));
        let mut counts = [0usize; 4];
        for _ in 0..10_000 {
            counts[rr
                .pick(&[], client(), &mut None, &|_| true)
                .expect("a backend")] += 1;
        }
        assert_eq!(counts, [3000, 0, 1000, 6000]);
    }

    #[test]
    fn ineligible_backends_are_skipped_and_all_zero_picks_none() {
        let rr = RoundRobin::new(&backends(&[1, 1, 1]));
        for _ in 0..10 {
            assert_eq!(rr.pick(&[], client(), &mut None, &|i| i == 2), Some(2));
        }
        assert_eq!(rr.pick(&[], client(), &mut None, &|_| false), None);
        let zero = RoundRobin::new(&backends(&[0, 0]));
        assert_eq!(zero.pick(&[], client(), &mut None, &|_| true), None);
    }

    #[test]
    fn retries_of_one_connection_do_not_move_the_shared_order() {
        let rr = RoundRobin::new(&backends(&[1, 1, 1]));
        let mut cursor = None;
        assert_eq!(rr.pick(&[], client(), &mut cursor, &|_| true), Some(0));
        assert_eq!(rr.pick(&[], client(), &mut cursor, &|i| i != 0), Some(1));
        assert_eq!(rr.pick(&[], client(), &mut cursor, &|i| i > 1), Some(2));
        assert_eq!(rr.pick(&[], client(), &mut None, &|_| true), Some(1));
    }

    #[test]
    fn common_factor_is_divided_out() {
        assert_eq!(RoundRobin::new(&backends(&[1000, 500])).cycle.len(), 3);
    }
}
