//! Clients held back, made visible. A client over a listener's `max_connections` or the
//! process cap is not accepted: it waits in the kernel's accept queue, where no counter
//! of sluice's own sees it. This module keeps, for each listener, what the admin
//! endpoint samples when `/metrics` is scraped (never on the accept path):
//!
//! - the accept queues of its listening sockets: their length now and their limit, read
//!   from `/proc/net/tcp` and `/proc/net/tcp6` (a listening socket's `rx_queue` there is
//!   its accept queue), matched by the sockets' inode numbers. `TCP_INFO` on the socket
//!   would give the same two numbers, but reading it needs `unsafe` (no safe wrapper in
//!   rustix or socket2), which this crate forbids. The kernel caps the limit at
//!   `net.core.somaxconn`, read at each sample; it queues one more than the limit.
//! - the time its accept loops spent waiting for a slot ([`AtCap`]);
//! - its per-client table's size and evictions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::edge::admission::Revocations;
use crate::edge::client_table::ClientTable;
use crate::snapshot::Snapshot;

/// Time a listener's accept loops spent unable to take a slot: from the moment the
/// first of them found both caps' slots gone until one of them got one. Its lock is
/// taken only on that slow path and at a scrape.
#[derive(Default)]
pub struct AtCap(Mutex<AtCapState>);

#[derive(Default)]
struct AtCapState {
    waiting: usize,
    since: Option<Instant>,
    total: Duration,
}

impl AtCap {
    /// One accept loop starts to wait; the wait ends when the guard is dropped.
    pub fn waiting(self: &Arc<Self>) -> Waiting {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.waiting += 1;
        if s.waiting == 1 {
            s.since = Some(Instant::now());
        }
        Waiting(Arc::clone(self))
    }

    /// Time at the cap so far, the current stretch included.
    pub fn total(&self) -> Duration {
        let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.total + s.since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// An accept loop waiting for a slot: see [`AtCap::waiting`].
pub struct Waiting(Arc<AtCap>);

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut s = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        s.waiting = s.waiting.saturating_sub(1);
        if s.waiting == 0
            && let Some(since) = s.since.take()
        {
            s.total += since.elapsed();
        }
    }
}

/// What one listener exposes to the sampler.
pub struct Watched {
    pub at_cap: Arc<AtCap>,
    pub clients: Arc<ClientTable>,
    /// Its `allow`/`deny` as in force, for `close_denied_on_reload`.
    pub revocations: Arc<Revocations>,
    /// The configured `backlog` of its sockets.
    pub backlog: u32,
    /// Inode numbers of its listening sockets, by configured address.
    pub sockets: HashMap<std::net::SocketAddr, Vec<u64>>,
}

/// Every listener's [`Watched`], by name; written by `Listeners::apply`, read at a
/// scrape. The lock is the control plane's only.
#[derive(Default)]
pub struct Held(pub Mutex<HashMap<String, Watched>>);

impl Held {
    /// Sets the sampled gauges of every listener of `snapshot`, and the effective weight
    /// of every backend.
    pub fn sample(&self, snapshot: &Snapshot) {
        let queues = accept_queues();
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(4096);
        let now = Instant::now();
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for route in &snapshot.listeners {
            let Some(w) = held.get(&route.listener) else {
                continue;
            };
            let inodes: HashSet<u64> = w.sockets.values().flatten().copied().collect();
            let queued: u64 = inodes.iter().filter_map(|i| queues.get(i)).sum();
            let m = &route.metrics;
            m.accept_queue
                .set(i64::try_from(queued).unwrap_or(i64::MAX));
            let limit = u64::from(w.backlog).min(somaxconn) * inodes.len() as u64;
            m.accept_queue_limit
                .set(i64::try_from(limit).unwrap_or(i64::MAX));
            let at_cap = w.at_cap.total().as_secs_f64();
            if at_cap > m.at_cap.get() {
                m.at_cap.inc_by(at_cap - m.at_cap.get());
            }
            w.clients.sweep(now, route.client_limits.as_ref());
            m.client_entries
                .set(i64::try_from(w.clients.len()).unwrap_or(i64::MAX));
            let evicted = w.clients.evicted();
            if evicted > m.client_evictions.get() {
                m.client_evictions
                    .inc_by(evicted - m.client_evictions.get());
            }
        }
        drop(held);
        for upstream in &snapshot.upstreams {
            for b in upstream.backends() {
                b.metrics.effective_weight.set(b.effective_weight());
            }
        }
    }
}

/// The accept-queue length of every listening TCP socket of this network namespace, by
/// inode. The kernel lists listening sockets first (its listening hash, then the
/// established one), so the read stops at the first other line: its cost is the
/// listening sockets', not the hundreds of thousands of connections (and TIME_WAIT
/// entries) a busy host lists after them.
fn accept_queues() -> HashMap<u64, u64> {
    use std::io::BufRead;
    let mut queues = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(f) = std::fs::File::open(file) else {
            continue;
        };
        for line in std::io::BufReader::new(f).lines().skip(1) {
            let Ok(line) = line else {
                break;
            };
            // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                break;
            }
            let rx = f[4]
                .split_once(':')
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok());
            if let (Some(rx), Ok(inode)) = (rx, f[9].parse::<u64>()) {
                queues.insert(inode, rx);
            }
        }
    }
    queues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_at_cap_counts_overlapping_waits_once() {
        let at_cap = Arc::new(AtCap::default());
        assert_eq!(at_cap.total(), Duration::ZERO);
        let a = at_cap.waiting();
        let b = at_cap.waiting();
        drop(a);
        // Time must pass for time to be counted; the bound below is the sleep's own.
        std::thread::sleep(Duration::from_millis(2));
        drop(b);
        let t = at_cap.total();
        assert!(t >= Duration::from_millis(2), "{t:?}");
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(at_cap.total(), t, "no loop waits: no time added");
    }

    #[test]
    fn a_listening_socket_is_found_with_its_queue() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let inode = rustix::fs::fstat(&l).unwrap().st_ino;
        // The handshake's last ACK may be processed just after connect returns.
        let seen = (0..500)
            .map(|_| {
                std::thread::yield_now();
                accept_queues().get(&inode).copied()
            })
            .find(|q| *q == Some(1));
        assert_eq!(seen, Some(Some(1)), "one connection waits");
    }
}
