//! Weighted random.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::upstream::backend::Backend;
use crate::upstream::balance::Balance;

/// Weighted random among eligible backends.
pub struct Random;

impl Balance for Random {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _client: SocketAddr,
        _cursor: &mut Option<usize>,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        // Ramped by slow start: see `Backend::balance_weight`.
        let weight = |i: usize| u64::from(backends[i].balance_weight());
        let total: u64 = (0..backends.len())
            .filter(|&i| eligible(i))
            .map(weight)
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(..total);
        for i in (0..backends.len()).filter(|&i| eligible(i)) {
            if r < weight(i) {
                return Some(i);
            }
            r -= weight(i);
        }
        None
    }
}
