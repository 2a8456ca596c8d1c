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
        config::Balance::LeastConnections => Box::new(LeastConnections::default()),
        config::Balance::PowerOfTwo => Box::new(PowerOfTwo),
        config::Balance::Random => Box::new(Random),
        config::Balance::Maglev => Box::new(Maglev::new(backends)),
    }
}

/// True when `a` carries less load for its weight than `b` (active / weight, compared
/// without division). Only backends with weight above zero are ever eligible.
fn lighter(a: &Backend, b: &Backend) -> bool {
    u128::from(a.active()) * u128::from(b.weight())
        < u128::from(b.active()) * u128::from(a.weight())
}

/// The `k`-th eligible index (0-based), scanning in order.
fn nth_eligible(n: usize, k: usize, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
    (0..n).filter(|&i| eligible(i)).nth(k)
}

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
        let weight = |i: usize| u64::from(backends[i].weight());
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

/// Size of the Maglev lookup table: a prime well above 100 x the backends of any sane
/// upstream, which keeps each backend's share within about 1% of its weight.
pub const MAGLEV_TABLE_SIZE: usize = 65_537;

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016) on the client's IP address,
/// with weights. The hash functions are fixed (FNV-1a, then a splitmix64 finalizer),
/// so a client maps to the same backend across builds and restarts, and removing one of
/// N backends moves about 1/N of the clients.
///
/// When the client's backend is not eligible (down, full, tried), the lookup walks the
/// table on from the client's slot; the walk is the same for every connection of that
/// client, so its fallback backend is stable too.
pub struct Maglev {
    /// Backend index for each slot; empty when every weight is 0.
    table: Box<[u16]>,
}

impl Maglev {
    pub fn new(backends: &[config::Backend]) -> Maglev {
        let m = MAGLEV_TABLE_SIZE as u64;
        let divisor = backends
            .iter()
            .map(|b| b.weight)
            .filter(|w| *w > 0)
            .fold(0, gcd)
            .max(1);
        let prefs: Vec<(u64, u64, u32)> = backends
            .iter()
            .map(|b| {
                let name = b.address.to_string();
                let offset = hash(name.as_bytes(), 0) % m;
                let skip = hash(name.as_bytes(), 1) % (m - 1) + 1;
                (offset, skip, b.weight / divisor)
            })
            .collect();
        if prefs.iter().all(|p| p.2 == 0) || backends.len() > usize::from(u16::MAX) {
            return Maglev {
                table: Box::new([]),
            };
        }
        const EMPTY: u16 = u16::MAX;
        let mut table = vec![EMPTY; MAGLEV_TABLE_SIZE];
        let mut next = vec![0u64; backends.len()];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip, turns)) in prefs.iter().enumerate() {
                for _ in 0..turns {
                    loop {
                        let slot = ((offset + next[i] * skip) % m) as usize;
                        next[i] += 1;
                        if table[slot] == EMPTY {
                            table[slot] = i as u16;
                            filled += 1;
                            break;
                        }
                    }
                    if filled == MAGLEV_TABLE_SIZE {
                        break 'fill;
                    }
                }
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
        }
    }

    /// The slot a client address hashes to.
    fn slot(client: SocketAddr) -> usize {
        let h = match client.ip() {
            std::net::IpAddr::V4(ip) => hash(&ip.octets(), 2),
            std::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => hash(&v4.octets(), 2),
                None => hash(&ip.octets(), 2),
            },
        };
        (h % MAGLEV_TABLE_SIZE as u64) as usize
    }
}

impl Balance for Maglev {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        client: SocketAddr,
        cursor: &mut Option<usize>,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        // With nothing eligible, the walk below would ask all 65,537 slots; with
        // something eligible it stops at the first slot that maps to it.
        if !(0..backends.len()).any(eligible) {
            return None;
        }
        let start = *cursor.get_or_insert_with(|| Maglev::slot(client));
        let len = self.table.len();
        (0..len)
            .map(|k| usize::from(self.table[(start + k) % len]))
            .find(|&i| eligible(i))
    }
}

/// FNV-1a with a seed mixed in, then the splitmix64 finalizer. Fixed forever: changing
/// it would move every Maglev client.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
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
}
