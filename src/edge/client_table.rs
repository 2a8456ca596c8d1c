//! Per-client state for a listener's per-client limits: connections open now and a
//! token bucket of new connections, for each client (an address, or the network of its
//! configured prefix), in a table with a fixed bound.
//!
//! Hand-written rather than a cache crate: an entry is changed in place on every accept
//! and close (an open count and a bucket), an entry with connections open must never be
//! evicted (its count would be lost and the limit bypassed), and the one thing needed
//! from a crate, a bounded map, is a few lines over `HashMap`. The table is sharded:
//! `SHARDS` mutexes, a client always in the same one (by a hash with a per-process
//! random key, so sources cannot be chosen to crowd one shard). A connection takes one
//! shard's lock at its accept and once more at its close, for a few hundred
//! nanoseconds; no lock is shared by all connections.
//!
//! Bound: each shard holds at most `table_size / SHARDS` (rounded up) entries of clients
//! without open connections. When a shard is full, entries whose bucket has refilled
//! (so forgetting them changes nothing) are removed first; then the idle entry seen
//! longest ago is evicted and counted (that client's rate state starts afresh). Clients
//! with connections open are never evicted; there are at most the listener's
//! `max_connections` of them, so the table never holds more than `table_size` plus
//! that.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::config::ClientLimits;

/// Shards of a table: enough that two worker threads rarely meet on one lock.
const SHARDS: usize = 64;

/// A client: the leading bits of its address kept by the configured prefix, as one
/// 16-byte address (an IPv4 client as IPv4-mapped, `::ffff:a.b.c.d`, its prefix applied
/// to the last 32 bits). No IPv6 client can share a key with an IPv4 one: an IPv6
/// address inside `::ffff:0:0/96` is counted as the IPv4 address it maps, and any
/// other keeps a bit outside that pattern whatever its prefix. `Ipv6Addr` is a byte
/// array, so a [`ClientSlot`] costs an open connection 24 bytes, no padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(Ipv6Addr);

impl ClientKey {
    /// The client `ip` belongs to under `limits`' prefixes (an IPv4 address seen on an
    /// IPv6 socket counts as IPv4).
    pub fn of(ip: IpAddr, limits: &ClientLimits) -> ClientKey {
        let mask = |bits: u32, prefix: u8| -> u128 {
            match u32::from(prefix) {
                0 => 0,
                p if p >= bits => u128::MAX,
                p => !(u128::MAX >> p) >> (128 - bits),
            }
        };
        ClientKey(match ip.to_canonical() {
            IpAddr::V4(a) => {
                let kept = u32::from(a) & (mask(32, limits.ipv4_prefix) as u32);
                Ipv4Addr::from(kept).to_ipv6_mapped()
            }
            IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) & mask(128, limits.ipv6_prefix)),
        })
    }
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// It has `max_connections_per_client` open.
    Connections,
    /// Its bucket is empty.
    Rate,
}

#[derive(Debug)]
struct Entry {
    open: u32,
    /// Tokens in the bucket at `refilled`.
    tokens: f64,
    refilled: Instant,
}

impl Entry {
    /// Adds the tokens earned since the last refill.
    fn refill(&mut self, now: Instant, limits: &ClientLimits) {
        if let Some(rate) = &limits.rate {
            let earned =
                now.saturating_duration_since(self.refilled).as_secs_f64() * rate.per_second;
            self.tokens = (self.tokens + earned).min(f64::from(rate.burst));
        }
        self.refilled = now;
    }

    /// Nothing would change if this entry were forgotten: no connection open and a full
    /// bucket (as a new entry would have).
    fn expired(&self, now: Instant, limits: &ClientLimits) -> bool {
        self.open == 0
            && limits.rate.is_none_or(|rate| {
                let earned =
                    now.saturating_duration_since(self.refilled).as_secs_f64() * rate.per_second;
                self.tokens + earned >= f64::from(rate.burst)
            })
    }
}

/// The per-client table of one listener, kept across reloads.
pub struct ClientTable {
    shards: Box<[Mutex<HashMap<ClientKey, Entry>>]>,
    hasher: RandomState,
    /// Entries allowed per shard for clients without connections open.
    per_shard: AtomicUsize,
    /// Entries in all shards.
    len: AtomicUsize,
    evicted: AtomicU64,
}

impl ClientTable {
    pub fn new(table_size: usize) -> Arc<ClientTable> {
        let table = ClientTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: AtomicUsize::new(1),
            len: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
        };
        table.resize(table_size);
        Arc::new(table)
    }

    /// Sets the bound (a reload); a shard over a lowered one shrinks at its next insert
    /// or sweep.
    pub fn resize(&self, table_size: usize) {
        self.per_shard
            .store(table_size.div_ceil(SHARDS).max(1), Ordering::Relaxed);
    }

    /// Entries now, for the gauge.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted (not expired) since the table was made, for the counter.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn shard(&self, key: &ClientKey) -> MutexGuard<'_, HashMap<ClientKey, Entry>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        // A panic while the lock is held leaves counts that are still counts.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection from `ip` if `limits` allow it; the slot gives it back
    /// when dropped.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &ClientLimits,
        now: Instant,
    ) -> Result<ClientSlot, Over> {
        let key = ClientKey::of(ip, limits);
        let mut shard = self.shard(&key);
        if !shard.contains_key(&key) {
            let full = shard.len() >= self.per_shard.load(Ordering::Relaxed);
            if full {
                self.make_room(&mut shard, now, limits);
            }
            let tokens = limits.rate.map_or(0.0, |r| f64::from(r.burst));
            shard.insert(
                key,
                Entry {
                    open: 0,
                    tokens,
                    refilled: now,
                },
            );
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        // Inserted just above if it was missing.
        let Some(entry) = shard.get_mut(&key) else {
            return Err(Over::Connections);
        };
        entry.refill(now, limits);
        if limits.max_connections.is_some_and(|max| entry.open >= max) {
            return Err(Over::Connections);
        }
        if limits.rate.is_some() {
            if entry.tokens < 1.0 {
                return Err(Over::Rate);
            }
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        drop(shard);
        Ok(ClientSlot {
            table: Arc::clone(self),
            key,
        })
    }

    /// Removes expired entries of a full shard; if it is still full, evicts the idle
    /// entry refilled longest ago. Entries with connections open stay.
    fn make_room(
        &self,
        shard: &mut HashMap<ClientKey, Entry>,
        now: Instant,
        limits: &ClientLimits,
    ) {
        let before = shard.len();
        shard.retain(|_, e| !e.expired(now, limits));
        self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
        if shard.len() < self.per_shard.load(Ordering::Relaxed) {
            return;
        }
        let oldest = shard
            .iter()
            .filter(|(_, e)| e.open == 0)
            .min_by_key(|(_, e)| e.refilled)
            .map(|(k, _)| *k);
        if let Some(k) = oldest {
            shard.remove(&k);
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes every expired entry, one shard at a time (from the control plane, at a
    /// scrape, so the gauge shows clients that still count).
    pub fn sweep(&self, now: Instant, limits: Option<&ClientLimits>) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            match limits {
                Some(limits) => shard.retain(|_, e| !e.expired(now, limits)),
                // Limits turned off: only open counts are left to keep.
                None => shard.retain(|_, e| e.open > 0),
            }
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    fn release(&self, key: &ClientKey) {
        let mut shard = self.shard(key);
        if let Some(e) = shard.get_mut(key) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

/// One connection counted against its client; given back when dropped.
pub struct ClientSlot {
    table: Arc<ClientTable>,
    key: ClientKey,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.table.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ClientRate;

    fn limits(max: Option<u32>, rate: Option<(f64, u32)>, table_size: usize) -> ClientLimits {
        ClientLimits {
            max_connections: max,
            rate: rate.map(|(per_second, burst)| ClientRate { per_second, burst }),
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            table_size,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn open_connections_are_capped_per_client_and_given_back() {
        let l = limits(Some(2), None, 100);
        let t = ClientTable::new(l.table_size);
        let now = Instant::now();
        let a = t.admit(ip("10.0.0.1"), &l, now).unwrap();
        let _b = t.admit(ip("10.0.0.1"), &l, now).unwrap();
        assert_eq!(
            t.admit(ip("10.0.0.1"), &l, now).err(),
            Some(Over::Connections)
        );
        assert!(t.admit(ip("10.0.0.2"), &l, now).is_ok(), "another client");
        drop(a);
        assert!(t.admit(ip("10.0.0.1"), &l, now).is_ok());
    }

    #[test]
    fn ipv6_clients_are_grouped_by_prefix() {
        let l = limits(Some(1), None, 100);
        let t = ClientTable::new(l.table_size);
        let now = Instant::now();
        let _a = t.admit(ip("2001:db8:0:1::1"), &l, now).unwrap();
        assert!(
            t.admit(ip("2001:db8:0:1::ffff"), &l, now).is_err(),
            "same /64"
        );
        assert!(
            t.admit(ip("2001:db8:0:2::1"), &l, now).is_ok(),
            "another /64"
        );
        let _v4 = t.admit(ip("::ffff:10.0.0.1"), &l, now).unwrap();
        assert!(t.admit(ip("10.0.0.1"), &l, now).is_err(), "mapped is IPv4");
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let l = limits(None, Some((2.0, 3)), 100);
        let t = ClientTable::new(l.table_size);
        let start = Instant::now();
        for _ in 0..3 {
            drop(t.admit(ip("10.0.0.1"), &l, start).unwrap());
        }
        assert_eq!(t.admit(ip("10.0.0.1"), &l, start).err(), Some(Over::Rate));
        let later = start + Duration::from_millis(500);
        assert!(
            t.admit(ip("10.0.0.1"), &l, later).is_ok(),
            "one token in 0.5 s"
        );
        assert!(t.admit(ip("10.0.0.1"), &l, later).is_err());
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_clients_with_open_connections() {
        let l = limits(Some(10), Some((1.0, 5)), 640);
        let t = ClientTable::new(l.table_size);
        let now = Instant::now();
        let held: Vec<ClientSlot> = (0..100u32)
            .map(|i| t.admit(IpAddr::from([10, 1, 0, i as u8]), &l, now).unwrap())
            .collect();
        for i in 0..100_000u32 {
            let a = IpAddr::from((0x0b00_0000 + i).to_be_bytes());
            drop(t.admit(a, &l, now).unwrap());
        }
        assert!(t.len() <= 640 + 100 + SHARDS, "{} entries", t.len());
        assert!(t.evicted() > 90_000, "{}", t.evicted());
        // The held clients are all still counted: one more each reaches 10 only after 9.
        for (i, _) in held.iter().enumerate() {
            let key = ClientKey::of(IpAddr::from([10, 1, 0, i as u8]), &l);
            assert_eq!(t.shard(&key).get(&key).map(|e| e.open), Some(1));
        }
        drop(held);
        t.sweep(now + Duration::from_secs(10), Some(&l));
        assert_eq!(t.len(), 0, "every bucket refilled after 10 s: all expired");
    }
}
