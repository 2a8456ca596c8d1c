//! An upstream's backends as slots: the balancer picks among the available backends that
//! have room under `max_connections_per_backend`, and a slot is taken on the one picked.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config;
use crate::upstream::backend::Backend;
use crate::upstream::balance::{self, Balance};
use crate::upstream::queue::Slots;

/// The backends of one upstream as one snapshot has them, with their balancer and limit.
pub struct Pool {
    /// Shared with the snapshots before and after this one: see [`Backend`].
    pub backends: Vec<Arc<Backend>>,
    /// Replaced when an operator changes a weight: round robin and Maglev build their
    /// tables from the weights, the others read `Backend::weight` live.
    balancer: ArcSwap<Box<dyn Balance>>,
    kind: config::Balance,
    /// Per-backend cap; `None` for unlimited backends.
    limit: Option<u64>,
    /// With more than one SRV priority among the backends: the backends of each, lowest
    /// priority first, with a balancer of their own, so weights balance within a tier.
    /// Empty otherwise (no extra work per pick).
    tiers: Vec<Tier>,
}

/// The backends of one SRV priority, and their balancer (rebuilt with the pool's).
pub struct Tier {
    pub backends: Vec<Arc<Backend>>,
    balancer: ArcSwap<Box<dyn Balance>>,
}

impl Pool {
    /// A pool balancing `backends` with `kind`, built from their effective weights.
    pub fn new(backends: Vec<Arc<Backend>>, kind: config::Balance, limit: Option<u64>) -> Pool {
        let balancer = ArcSwap::from_pointee(balance::for_upstream(kind, &weights(&backends)));
        Pool {
            backends,
            balancer,
            kind,
            limit,
            tiers: Vec::new(),
        }
    }

    /// SRV failover: clients go to the first of `tiers` (the backends of each priority,
    /// lowest first) that has an available backend they have not tried.
    pub fn with_tiers(mut self, tiers: Vec<Vec<Arc<Backend>>>) -> Pool {
        let kind = self.kind;
        self.tiers = tiers
            .into_iter()
            .map(|backends| Tier {
                balancer: ArcSwap::from_pointee(balance::for_upstream(kind, &weights(&backends))),
                backends,
            })
            .collect();
        self
    }

    /// Rebuilds the balancer from the backends' effective weights now: after an
    /// operator's weight change, so that every algorithm honours it.
    pub fn rebalance(&self) {
        let balancer = balance::for_upstream(self.kind, &weights(&self.backends));
        self.balancer.store(Arc::new(balancer));
        for tier in &self.tiers {
            let balancer = balance::for_upstream(self.kind, &weights(&tier.backends));
            tier.balancer.store(Arc::new(balancer));
        }
    }

    /// Whether backends take only so many connections (then clients may wait in a queue).
    pub fn is_limited(&self) -> bool {
        self.limit.is_some()
    }
}

/// The backends as a balancer is built from: address and effective weight.
fn weights(backends: &[Arc<Backend>]) -> Vec<config::Backend> {
    backends
        .iter()
        .map(|b| config::Backend {
            address: b.address,
            weight: b.weight(),
            entry: None,
            priority: 0,
        })
        .collect()
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
        let (backends, balancer) = match self.tiers.iter().find(|t| {
            t.backends
                .iter()
                .any(|b| b.available() && !tried.contains(&b.address))
        }) {
            Some(t) => (&t.backends, &t.balancer),
            None => (&self.backends, &self.balancer),
        };
        let eligible = |i: usize| {
            let b = &backends[i];
            b.available() && b.active() < limit && !tried.contains(&b.address)
        };
        let i = balancer.load().pick(backends, client, cursor, &eligible)?;
        let b = &backends[i];
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

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn pool(limit: Option<u64>, backends: &[(u16, u32)]) -> Pool {
        let live = backends
            .iter()
            .map(|&(port, weight)| Arc::new(Backend::for_test(addr(port), weight, 0)))
            .collect();
        Pool::new(live, config::Balance::RoundRobin, limit)
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

    /// Each algorithm honours an operator's weight: the table-building ones once the
    /// pool is rebalanced, the others at once.
    #[test]
    fn a_weight_override_takes_effect_in_every_algorithm() {
        use config::Balance::*;
        for kind in [RoundRobin, LeastConnections, PowerOfTwo, Random, Maglev] {
            let live: Vec<_> = (1..=2)
                .map(|port| Arc::new(Backend::for_test(addr(port), 1, 0)))
                .collect();
            let p = Pool::new(live, kind, None);
            p.backends[0].set_weight_override(Some(0));
            p.rebalance();
            for client in 0..50u16 {
                let b = p.take(
                    SocketAddr::from(([10, 0, 0, client as u8], client)),
                    &[],
                    &mut None,
                );
                assert_eq!(b.expect("backend 2").address, addr(2), "{kind:?}");
            }
            p.backends[0].set_weight_override(Some(9));
            p.backends[1].set_weight_override(Some(0));
            p.rebalance();
            let b = p.take(addr(9), &[], &mut None).expect("backend 1");
            assert_eq!(b.address, addr(1), "{kind:?}");
            p.backends[1].set_weight_override(None);
            assert_eq!(p.backends[1].weight(), 1, "the configured weight again");
        }
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
