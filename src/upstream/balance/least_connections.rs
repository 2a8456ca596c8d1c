//! Least connections, relative to weight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::upstream::backend::Backend;
use crate::upstream::balance::Balance;
use crate::upstream::balance::lighter;

/// The backend with the fewest active connections relative to its weight. Ties go to
/// the first found from a rotating start, so equal backends share new connections.
#[derive(Default)]
pub struct LeastConnections {
    next: AtomicUsize,
}

impl Balance for LeastConnections {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _client: SocketAddr,
        _cursor: &mut Option<usize>,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<usize> = None;
        for i in (0..n).map(|k| (start + k) % n).filter(|&i| eligible(i)) {
            if best.is_none_or(|b| lighter(&backends[i], &backends[b])) {
                best = Some(i);
            }
        }
        best
    }
}
