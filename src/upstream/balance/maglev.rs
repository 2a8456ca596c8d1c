//! Maglev consistent hashing on the client address.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config;
use crate::upstream::backend::Backend;
use crate::upstream::balance::Balance;
use crate::upstream::balance::round_robin::gcd;

/// Size of the Maglev lookup table: a prime well above 100 x the backends of any sane
/// upstream, which keeps each backend's share within about 1% of its weight.
pub(crate) const MAGLEV_TABLE_SIZE: usize = 65_537;

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
