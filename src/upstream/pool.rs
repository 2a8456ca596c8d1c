//! An upstream's backends as slots: the balancer picks among the available backends that
//! have room under `max_connections_per_backend`, and a slot is taken on the one picked.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::upstream::backend::Backend;
use crate::upstream::balance::Balance;
use crate::upstream::queue::Slots;

/// The backends of one upstream as one snapshot has them, with their balancer and limit.
pub struct Pool {
    /// Shared with the snapshots before and after this one: see [`Backend`].
    pub backends: Vec<Arc<Backend>>,
    balancer: Box<dyn Balance>,
    /// Per-backend cap; `None` for unlimited backends.
    limit: Option<u64>,
    /// The backends have more than one SRV priority: a pick then first finds the lowest
    /// priority with an available backend. False (no extra work) otherwise.
    tiered: bool,
}

impl Pool {
    pub fn new(
        backends: Vec<Arc<Backend>>,
        balancer: Box<dyn Balance>,
        limit: Option<u64>,
    ) -> Pool {
        let tiered = backends
            .windows(2)
            .any(|w| w[0].priority() != w[1].priority());
        Pool {
            backends,
            balancer,
            limit,
            tiered,
        }
    }

    /// Whether backends take only so many connections (then clients may wait in a queue).
    pub fn is_limited(&self) -> bool {
        self.limit.is_some()
    }
}

impl Slots for Pool {
    type Slot = Arc<Backend>;

    fn take(
        &self,
        client: SocketAddr,
        tried: &[SocketAddr],
        cursor: &mut Option<usize>,
    ) -> Option<Arc<Backend>> {
        let limit = self.limit.unwrap_or(u64::MAX);
        // SRV failover: the lowest priority that still has an available backend (not yet
        // tried by this client); u32::MAX when untiered, so every priority passes.
        let tier = match self.tiered {
            false => u32::MAX,
            true => self
                .backends
                .iter()
                .filter(|b| b.available() && !tried.contains(&b.address))
                .map(|b| b.priority())
                .min()
                .unwrap_or(u32::MAX),
        };
        let eligible = |i: usize| {
            let b = &self.backends[i];
            b.available()
                && b.priority() <= tier
                && b.active() < limit
                && !tried.contains(&b.address)
        };
        let i = self
            .balancer
            .pick(&self.backends, client, cursor, &eligible)?;
        let b = &self.backends[i];
        b.take();
        Some(Arc::clone(b))
    }

    fn any_available(&self, tried: &[SocketAddr]) -> bool {
        self.backends
            .iter()
            .any(|b| b.available() && !tried.contains(&b.address))
    }

    fn give_back(slot: Arc<Backend>) {
        slot.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::upstream::balance;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn pool(limit: Option<u64>, backends: &[(u16, u32)]) -> Pool {
        let configured: Vec<config::Backend> = backends
            .iter()
            .map(|&(port, weight)| config::Backend {
                address: addr(port),
                weight,
                entry: None,
                priority: 0,
            })
            .collect();
        let live = backends
            .iter()
            .map(|&(port, weight)| Arc::new(Backend::for_test(addr(port), weight, 0)))
            .collect();
        Pool::new(
            live,
            balance::for_upstream(config::Balance::RoundRobin, &configured),
            limit,
        )
    }

    #[test]
    fn slots_stop_at_the_limit_and_come_back_when_given_back() {
        let p = pool(Some(2), &[(1, 1), (2, 1)]);
        let slots: Vec<_> = (0..4)
            .map(|_| p.take(addr(9), &[], &mut None).expect("room"))
            .collect();
        assert!(p.take(addr(9), &[], &mut None).is_none(), "both full");
        assert!(p.backends.iter().all(|b| b.active() == 2));
        assert!(p.any_available(&[]), "full is not unavailable");
        let mut slots = slots.into_iter();
        Pool::give_back(slots.next().unwrap());
        assert!(p.take(addr(9), &[], &mut None).is_some());
    }

    #[test]
    fn tried_backends_weight_zero_and_retired_ones_are_skipped() {
        let p = pool(None, &[(1, 1), (2, 0), (3, 1)]);
        p.backends[2].retire();
        let b = p.take(addr(9), &[], &mut None).expect("backend 1");
        assert_eq!(b.address, addr(1));
        assert!(p.take(addr(9), &[addr(1)], &mut None).is_none());
        assert!(!p.any_available(&[addr(1)]));
        p.backends[2].revive();
        assert!(p.any_available(&[addr(1)]));
        assert_eq!(
            p.take(addr(9), &[addr(1)], &mut None).unwrap().address,
            addr(3)
        );
    }
}
