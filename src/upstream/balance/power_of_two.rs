//! The power of two random choices.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::upstream::backend::Backend;
use crate::upstream::balance::Balance;
use crate::upstream::balance::{lighter, nth_eligible};

/// Two eligible backends drawn at random; the lighter one (relative to weight) wins.
pub struct PowerOfTwo;

impl Balance for PowerOfTwo {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _client: SocketAddr,
        _cursor: &mut Option<usize>,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        let count = (0..n).filter(|&i| eligible(i)).count();
        if count == 0 {
            return None;
        }
        let first = fastrand::usize(..count);
        let a = nth_eligible(n, first, eligible)?;
        if count == 1 {
            return Some(a);
        }
        // A second draw distinct from the first.
        let second = (first + 1 + fastrand::usize(..count - 1)) % count;
        let b = nth_eligible(n, second, eligible)?;
        Some(if lighter(&backends[b], &backends[a]) {
            b
        } else {
            a
        })
    }
}
