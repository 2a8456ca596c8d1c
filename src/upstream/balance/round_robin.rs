//! Smooth weighted round robin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config;
use crate::upstream::backend::Backend;
use crate::upstream::balance::Balance;

/// Smooth weighted round robin (the nginx algorithm): weights 5,1,1 give
/// a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
///
/// The whole cycle is computed once when the snapshot is built, so a pick is one atomic
/// increment and an array read, with no lock on the connection path.
pub struct RoundRobin {
    /// One cycle of backend indices; its length is the sum of the weights over their gcd.
    pub(super) cycle: Box<[u32]>,
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
        backends: &[Arc<Backend>],
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
        let mut first = None;
        for i in (0..len).map(|k| self.cycle[(start + k) % len] as usize) {
            if !eligible(i) {
                continue;
            }
            // Slow start: the cycle is fixed, so a ramping backend keeps its turns but
            // takes each with the probability of its ramp; a skipped turn passes on.
            let ramp = backends.get(i).map_or(1.0, |b| b.ramp_fraction());
            if ramp >= 1.0 || fastrand::f64() < ramp {
                return Some(i);
            }
            first.get_or_insert(i);
        }
        first
    }
}

pub(super) fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}
