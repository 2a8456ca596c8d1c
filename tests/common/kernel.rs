//! What the kernel shows about sockets (`/proc/net/tcp`, `/proc/PID/fd`): the state a
//! test waits on when sluice itself has nothing to report, such as a client left
//! waiting in a listening socket's accept queue.

use std::collections::HashSet;
use std::net::SocketAddr;

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
struct Row {
    local: String,
    listening: bool,
    /// For a listening socket, the connections in its accept queue.
    rx_queue: usize,
    inode: u64,
}

fn rows(addr: SocketAddr) -> Vec<Row> {
    let table = if addr.is_ipv4() { "tcp" } else { "tcp6" };
    std::fs::read_to_string(format!("/proc/net/{table}"))
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Columns: sl, local, remote, state (0A is LISTEN), tx:rx queues, ..., inode
            // (the tenth).
            let (_, rx) = f[4].split_once(':')?;
            Some(Row {
                local: f[1].to_string(),
                listening: f[3] == "0A",
                rx_queue: usize::from_str_radix(rx, 16).ok()?,
                inode: f[9].parse().ok()?,
            })
        })
        .filter(|r| r.local == proc_address(addr))
        .collect()
}

/// `addr` as `/proc/net/tcp*` writes it: 127.0.0.1:8080 is 0100007F:1F90, each 32-bit
/// word of the address in host order.
fn proc_address(addr: SocketAddr) -> String {
    let ip = match addr {
        SocketAddr::V4(v4) => format!("{:08X}", u32::from_le_bytes(v4.ip().octets())),
        SocketAddr::V6(v6) => v6
            .ip()
            .octets()
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", addr.port())
}

/// Listening TCP sockets on `addr` that belong to process `pid`: its descriptors'
/// socket inodes matched against the kernel's table of sockets.
pub fn listening_sockets(pid: u32, addr: SocketAddr) -> usize {
    let ours: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            link.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    rows(addr)
        .iter()
        .filter(|r| r.listening && ours.contains(&r.inode))
        .count()
}

/// Connections that completed their handshake on `addr` and wait to be accepted, over
/// every listening socket there (one per worker with SO_REUSEPORT).
pub fn accept_queue(addr: SocketAddr) -> usize {
    rows(addr)
        .iter()
        .filter(|r| r.listening)
        .map(|r| r.rx_queue)
        .sum()
}

/// Waits until `n` connections wait in `addr`'s accept queue: clients that sluice, at
/// its connection cap, leaves there rather than accepting.
pub async fn wait_accept_queue(addr: SocketAddr, n: usize) {
    let what = format!("{n} connections waiting to be accepted on {addr}");
    super::eventually::eventually(&what, async || {
        let queued = accept_queue(addr);
        if queued == n {
            Ok(())
        } else {
            Err(format!("{queued} waiting"))
        }
    })
    .await
}

/// A loopback port free for TCP and UDP a moment ago, for a peer that must be told its
/// address (and may be stopped and started again on it): below the kernel's ephemeral
/// range, so that no other test's port 0, outgoing connection or DNS query takes it in
/// between.
pub fn free_port() -> SocketAddr {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let lowest: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    // Bounded: a few tries among thousands of ports.
    for _ in 0..100 {
        let addr = SocketAddr::from(([127, 0, 0, 1], fastrand::u16(10_000..lowest)));
        if std::net::TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port in 10000..{lowest}");
}

/// Established TCP sockets that `ss` lists for `filter` (such as `( dport = :8080 )`),
/// one line each, with their timers (`ss -tnoH`).
pub fn established(filter: &str) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The one established socket `ss` lists for `filter`; panics if there is not exactly one.
pub fn one_established(filter: &str) -> String {
    let found = established(filter);
    assert_eq!(found.len(), 1, "{filter}: {found:?}");
    found.into_iter().next().unwrap()
}

/// Whether an `ss -o` line shows sluice's keepalive timer (120 s idle time): 1 or 2
/// minutes left.
pub fn keepalive_of_two_minutes(line: &str) -> bool {
    line.contains("timer:(keepalive,1min") || line.contains("timer:(keepalive,2min")
}
