//! Balancing algorithms behind one trait. An upstream asks its balancer for a backend
//! among those still eligible for this connection (not yet tried, weight above zero).
//!
//! Algorithms read the backends' own state (weights, active counts); they keep no copy.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config;
use crate::upstream::backend::Backend;

mod least_connections;
mod maglev;
mod power_of_two;
mod random;
mod round_robin;

pub use least_connections::LeastConnections;
pub use maglev::Maglev;
pub use power_of_two::PowerOfTwo;
pub use random::Random;
pub use round_robin::RoundRobin;

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
        config::Balance::LeastConnections => Box::new(LeastConnections::default()),
        config::Balance::PowerOfTwo => Box::new(PowerOfTwo),
        config::Balance::Random => Box::new(Random),
        config::Balance::Maglev => Box::new(Maglev::new(backends)),
    }
}

/// True when `a` carries less load for its weight than `b` (active / weight, compared
/// without division). Only backends with weight above zero are ever eligible. The
/// weights are as ramped by slow start (`Backend::balance_weight`).
pub(crate) fn lighter(a: &Backend, b: &Backend) -> bool {
    u128::from(a.active()) * u128::from(b.balance_weight())
        < u128::from(b.active()) * u128::from(a.balance_weight())
}

/// The `k`-th eligible index (0-based), scanning in order.
pub(crate) fn nth_eligible(n: usize, k: usize, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
    (0..n).filter(|&i| eligible(i)).nth(k)
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
                entry: None,
                priority: 0,
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

    fn live(weights_and_active: &[(u32, u64)]) -> Vec<Arc<Backend>> {
        weights_and_active
            .iter()
            .enumerate()
            .map(|(i, &(w, a))| {
                Arc::new(Backend::for_test(
                    SocketAddr::from(([10, 0, 0, i as u8], 5432)),
                    w,
                    a,
                ))
            })
            .collect()
    }

    #[test]
    fn least_connections_weighs_active_by_weight() {
        let lc = LeastConnections::default();
        // Loads 4/1, 3/1, 5/2: the third is lightest.
        let b = live(&[(1, 4), (1, 3), (2, 5)]);
        for _ in 0..10 {
            assert_eq!(lc.pick(&b, client(), &mut None, &|_| true), Some(2));
        }
        assert_eq!(lc.pick(&b, client(), &mut None, &|i| i != 2), Some(1));
        // Ties are shared rather than always going to the first.
        let even = live(&[(1, 0), (1, 0), (1, 0)]);
        let mut seen = [false; 3];
        for _ in 0..3 {
            seen[lc.pick(&even, client(), &mut None, &|_| true).unwrap()] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn power_of_two_never_picks_the_busiest() {
        let b = live(&[(1, 2), (1, 9), (1, 1), (1, 3)]);
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[PowerOfTwo.pick(&b, client(), &mut None, &|_| true).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0, "{counts:?}");
        // The lightest wins every draw it is in: 3 of the 6 pairs.
        assert!(counts[2] > 1700, "{counts:?}");
        assert_eq!(
            PowerOfTwo.pick(&b, client(), &mut None, &|i| i == 1),
            Some(1)
        );
        assert_eq!(PowerOfTwo.pick(&b, client(), &mut None, &|_| false), None);
    }

    #[test]
    fn random_honours_weights() {
        let b = live(&[(1, 0), (3, 0), (0, 0)]);
        let eligible = |i: usize| b[i].weight() > 0;
        let mut counts = [0usize; 3];
        for _ in 0..100_000 {
            counts[Random.pick(&b, client(), &mut None, &eligible).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        let share = counts[1] as f64 / 100_000.0;
        assert!((share - 0.75).abs() < 0.01, "{counts:?}");
    }

    fn ip(n: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + n), 40000))
    }

    #[test]
    fn maglev_is_stable_and_weighted() {
        let cfg = backends(&[1, 1, 2]);
        let m = Maglev::new(&cfg);
        let again = Maglev::new(&cfg);
        let b = live(&[(1, 0), (1, 0), (2, 0)]);
        let mut counts = [0usize; 3];
        for n in 0..30_000 {
            let first = m.pick(&b, ip(n), &mut None, &|_| true).unwrap();
            // The same client, another port, a rebuilt table: the same backend.
            let mut other_port = ip(n);
            other_port.set_port(1);
            assert_eq!(
                again.pick(&b, other_port, &mut None, &|_| true),
                Some(first)
            );
            counts[first] += 1;
        }
        let share = counts[2] as f64 / 30_000.0;
        assert!((share - 0.5).abs() < 0.03, "{counts:?}");
        // The mapping is fixed across builds: this client has always gone here.
        assert_eq!(
            m.pick(&b, ip(12345), &mut None, &|_| true),
            Some(MAGLEV_FIXED)
        );
    }

    /// Where 10.0.48.57 goes among 127.0.0.1:1000..1002 weighted 1,1,2. A change here
    /// means every Maglev user's clients would move on upgrade.
    const MAGLEV_FIXED: usize = 2;

    #[test]
    fn maglev_removing_one_of_n_moves_about_one_nth() {
        const N: usize = 10;
        const KEYS: u32 = 100_000;
        let all = backends(&[1; N]);
        let removed = 3;
        let mut fewer = all.clone();
        fewer.remove(removed);
        let (before, after) = (Maglev::new(&all), Maglev::new(&fewer));
        let (b_all, b_fewer) = (live(&[(1, 0); N]), live(&[(1, 0); N - 1]));
        let (mut moved, mut moved_elsewhere) = (0, 0);
        for n in 0..KEYS {
            let was = all[before.pick(&b_all, ip(n), &mut None, &|_| true).unwrap()].address;
            let now = fewer[after.pick(&b_fewer, ip(n), &mut None, &|_| true).unwrap()].address;
            if was != now {
                moved += 1;
                if was != all[removed].address {
                    moved_elsewhere += 1;
                }
            }
        }
        let fraction = f64::from(moved) / f64::from(KEYS);
        eprintln!("moved {fraction:.4} of keys; {moved_elsewhere} not from the removed backend");
        assert!((fraction - 1.0 / N as f64).abs() < 0.02, "moved {fraction}");
        assert!(
            f64::from(moved_elsewhere) / f64::from(KEYS) < 0.01,
            "{moved_elsewhere}"
        );
    }

    #[test]
    fn maglev_falls_back_along_the_table_for_an_ineligible_backend() {
        let m = Maglev::new(&backends(&[1, 1, 1]));
        let b = live(&[(1, 0); 3]);
        let home = m.pick(&b, ip(7), &mut None, &|_| true).unwrap();
        let mut cursor = None;
        let fallback = m.pick(&b, ip(7), &mut cursor, &|i| i != home).unwrap();
        assert_ne!(fallback, home);
        // Stable: the same fallback every time.
        assert_eq!(m.pick(&b, ip(7), &mut None, &|i| i != home), Some(fallback));
    }

    #[test]
    fn maglev_asks_each_backend_once_when_none_is_eligible() {
        let m = Maglev::new(&backends(&[1, 1, 1, 1]));
        let b = live(&[(1, 0); 4]);
        let calls = std::cell::Cell::new(0);
        let none = |_: usize| {
            calls.set(calls.get() + 1);
            false
        };
        assert_eq!(m.pick(&b, ip(1), &mut None, &none), None);
        assert_eq!(calls.get(), 4, "not once per slot of the table");
    }

    #[test]
    fn common_factor_is_divided_out() {
        assert_eq!(RoundRobin::new(&backends(&[1000, 500])).cycle.len(), 3);
    }

    /// Slow start: a backend ramping at its floor (10%) gets a small share from every
    /// algorithm where weight counts; one without slow start gets its share at once.
    #[test]
    fn a_ramping_backend_gets_a_fraction_of_its_share() {
        let b = live(&[(1, 0), (1, 0)]);
        b[0].start_ramp();
        assert_eq!(b[0].ramp_fraction(), 1.0, "no slow_start: no ramp");
        b[0].set_slow_start(Some(std::time::Duration::from_secs(3600)));
        b[0].start_ramp();
        assert_eq!(b[0].balance_weight(), 100, "10% of 1 × RAMP_SCALE");
        assert_eq!(b[1].balance_weight(), 1000);
        const PICKS: usize = 20_000;
        let share = |pick: &dyn Fn() -> usize| {
            (0..PICKS).filter(|_| pick() == 0).count() as f64 / PICKS as f64
        };
        let random = share(&|| Random.pick(&b, client(), &mut None, &|_| true).unwrap());
        assert!((random - 0.1 / 1.1).abs() < 0.02, "random {random}");
        let rr = RoundRobin::new(&backends(&[1, 1]));
        let round_robin = share(&|| rr.pick(&b, client(), &mut None, &|_| true).unwrap());
        assert!(
            round_robin > 0.02 && round_robin < 0.09,
            "round robin {round_robin}"
        );
        // Least connections: the ramping backend stays at a tenth of the other's load.
        let lc = LeastConnections::default();
        for _ in 0..1100 {
            let i = lc.pick(&b, client(), &mut None, &|_| true).unwrap();
            b[i].take();
        }
        assert_eq!((b[0].active(), b[1].active()), (100, 1000));
        assert!(
            !lighter(&b[0], &b[1]),
            "at 10% of the load it is as loaded as the other"
        );
    }
}
