//! Binary upgrade: on SIGUSR2 sluice starts its binary, hands it every listening socket,
//! and drains once the new process is ready; a failed upgrade changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_every_socket_to_a_new_process_and_the_old_one_drains_and_exits_0() {
    reap_successors();
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]).set("drain_timeout = \"60s\""))
        .per_core(2)
        .start()
        .await;
    let addr = sluice.addr("front");
    assert_eq!(listening_sockets(sluice.pid(), addr), 2, "one per worker");
    let sent = data(4 * MIB, 7);
    let (first, second) = sent.split_at(2 * MIB);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(first).await.unwrap();
    let mut got = read_n(&mut stream, first.len()).await;
    let started = sluice
        .metrics()
        .await
        .value("sluice_start_time_seconds", &[]);

    sluice.signal("USR2");
    let new = successor(&sluice, 1).await;
    // Two worker sockets and the admin endpoint's.
    sluice
        .wait_log(&format!("handing over 3 sockets to pid {}", new.pid))
        .await;
    sluice
        .wait_log(&format!(
            "upgrade: the new process is ready; no longer accepting, draining pid={}",
            new.pid
        ))
        .await;
    // The same two sockets, now the new process's alone.
    assert_eq!(listening_sockets(new.pid, addr), 2);
    eventually("the old process to let go of its sockets", async || {
        listening_sockets(sluice.pid(), addr) == 0
    })
    .await;
    let fresh = data(100_000, 8);
    assert_eq!(
        exchange(addr, &fresh).await,
        fresh,
        "the new process serves"
    );
    // The admin endpoint is the new process's alone once the old one let go of it.
    sluice
        .wait_metrics("the new process's start time", |m| {
            m.value("sluice_start_time_seconds", &[]) > started
        })
        .await;
    let notified = sluice.notifications();
    assert!(
        notified.contains(&format!(
            "MAINPID={0}\nSTATUS=handed over to pid {0}; draining",
            new.pid
        )),
        "the old process names its successor to systemd: {notified:?}"
    );
    assert!(
        !notified.iter().any(|n| n.starts_with("STOPPING=1")),
        "the unit is not stopping: {notified:?}"
    );

    // Draining: a stream in flight finishes, byte for byte; an upgrade is refused.
    sluice.signal("USR2");
    sluice
        .wait_log("upgrade refused: this process is draining after an upgrade")
        .await;
    got.extend(exchange_on(&mut stream, second).await);
    assert_eq!(got.len(), sent.len());
    assert_eq!(sha256(&got), sha256(&sent));
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    sluice.wait_log("drained, exiting cut=0").await;
    assert!(new.alive());
    assert_eq!(successor_pids(&sluice), [new.pid], "one upgrade");

    new.signal("TERM");
    assert_eq!(new.exit_code().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_exits_1_changes_nothing_and_a_later_upgrade_works() {
    reap_successors();
    let dir = tempfile::tempdir().unwrap();
    let binary = own_binary(dir.path());
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]))
        .binary(&binary)
        .per_core(2)
        .start()
        .await;
    let addr = sluice.addr("front");
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"before").await.unwrap();
    assert_eq!(read_n(&mut held, 6).await, b"before");
    let open_before = sluice.open_files();

    replace_binary(
        &binary,
        b"#!/bin/sh\necho 'this binary refuses to start' >&2\nexit 1\n",
    );
    sluice.signal("USR2");
    let line = sluice.wait_log("upgrade failed; still serving").await;
    assert!(line.contains("exited with exit status: 1"), "{line}");
    assert!(
        line.contains("this binary refuses to start"),
        "the child's last line: {line}"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_upgrades_total", &[("result", "failure")]),
        1.0
    );
    assert_eq!(
        m.value("sluice_upgrades_total", &[("result", "success")]),
        0.0
    );
    assert_eq!(listening_sockets(sluice.pid(), addr), 2, "its sockets kept");
    sluice.wait_open_files_at_most(open_before).await;
    let sent = data(200_000, 3);
    assert_eq!(exchange(addr, &sent).await, sent, "still serving");
    held.write_all(b"still").await.unwrap();
    assert_eq!(read_n(&mut held, 5).await, b"still");
    assert!(successor_pids(&sluice).is_empty());
    assert_eq!(sluice.get("/readyz").await.0, 200);

    // One that crashes.
    replace_binary(
        &binary,
        b"#!/bin/sh\necho 'about to crash' >&2\nkill -SEGV $$\n",
    );
    sluice.signal("USR2");
    let line = sluice
        .wait_log_where("a second failed upgrade", |l| {
            l.contains("upgrade failed; still serving") && l.contains("about to crash")
        })
        .await;
    assert!(line.contains("exited with signal: 11 (SIGSEGV)"), "{line}");
    sluice
        .wait_metrics("two failures", |m| {
            m.value("sluice_upgrades_total", &[("result", "failure")]) == 2.0
        })
        .await;
    assert_eq!(exchange(addr, &sent).await, sent, "still serving");

    // A later upgrade, to a binary that works.
    restore_binary(&binary);
    sluice.signal("USR2");
    let new = successor(&sluice, 1).await;
    sluice.wait_log("upgrade: the new process is ready").await;
    assert_eq!(exchange(addr, &sent).await, sent, "the new process serves");
    held.write_all(b"old").await.unwrap();
    assert_eq!(read_n(&mut held, 3).await, b"old", "the old one drains");
    drop(held);
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    assert!(new.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_broken_config_changes_nothing() {
    reap_successors();
    let backend = Backend::echo().await;
    let fixture = Fixture::front(&[backend.addr]);
    let sluice = Sluice::with(fixture.clone()).start().await;
    let addr = sluice.addr("front");

    sluice.rewrite(format!("drain_timeout = \"soon\"\n{fixture}"));
    // The file watch tries it first, and refuses it.
    sluice.wait_log("config reload failed").await;
    sluice.signal("USR2");
    let line = sluice.wait_log("upgrade failed; still serving").await;
    assert!(line.contains("exited with exit status: 64"), "{line}");
    assert!(
        line.contains("sluice.toml:1:17"),
        "the config error, file:line:col: {line}"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_upgrades_total", &[("result", "failure")]),
        1.0
    );
    let sent = data(100_000, 4);
    assert_eq!(exchange(addr, &sent).await, sent, "still serving");
    assert!(successor_pids(&sluice).is_empty());

    sluice.rewrite(&fixture);
    sluice.signal("USR2");
    let new = successor(&sluice, 1).await;
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    assert_eq!(exchange(addr, &sent).await, sent, "the new process serves");
    assert!(new.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_deadline_shorter_than_a_stream_cuts_it_at_the_deadline() {
    reap_successors();
    let backend = Backend::echo().await;
    let sluice = Sluice::start(Fixture::front(&[backend.addr]).set("drain_timeout = \"1s\"")).await;
    let addr = sluice.addr("front");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"long-lived").await.unwrap();
    assert_eq!(read_n(&mut stream, 10).await, b"long-lived");

    sluice.signal("USR2");
    let new = successor(&sluice, 1).await;
    sluice.wait_log("upgrade: the new process is ready").await;
    let closed = until_closed(&mut stream).await;
    assert!(matches!(closed, Err(_) | Ok(0)), "cut: {closed:?}");
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    sluice.wait_log("drained, exiting cut=1").await;
    assert!(
        sluice
            .log()
            .iter()
            .any(|l| l.contains("reason=\"shutdown\""))
    );
    let sent = data(10_000, 5);
    assert_eq!(exchange(addr, &sent).await, sent, "the new process serves");
    assert!(new.alive());
}

/// A new process that never reports ready is killed at `upgrade_timeout`, with its
/// last lines in the log, and the old one serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_not_ready_within_upgrade_timeout_is_killed_and_nothing_changes() {
    reap_successors();
    let dir = tempfile::tempdir().unwrap();
    let binary = own_binary(dir.path());
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]).set("upgrade_timeout = \"1s\""))
        .binary(&binary)
        .start()
        .await;
    let addr = sluice.addr("front");
    let sockets = listening_sockets(sluice.pid(), addr);
    // Stands for a binary that hangs at start.
    replace_binary(
        &binary,
        b"#!/bin/sh\necho 'stuck at start' >&2\nexec sleep 600\n",
    );
    sluice.signal("USR2");
    let handing = sluice.wait_log(" sockets to pid ").await;
    let pid: u32 = handing
        .rsplit("to pid ")
        .next()
        .and_then(|p| p.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let line = sluice.wait_log("upgrade failed; still serving").await;
    assert!(
        line.contains(&format!(
            "the new process (pid {pid}) was not ready within 1s and was killed"
        )),
        "{line}"
    );
    assert!(line.contains("stuck at start"), "{line}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_upgrades_total", &[("result", "failure")]),
        1.0
    );
    let sent = data(10_000, 12);
    assert_eq!(exchange(addr, &sent).await, sent, "still serving");
    assert_eq!(
        listening_sockets(sluice.pid(), addr),
        sockets,
        "its sockets kept"
    );
}

/// The new process reads the file afresh, so an upgrade applies what only a restart
/// applies, such as `[runtime]`: with one worker instead of two it adopts both sockets
/// of the address, and serves both accept queues from that worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_fewer_workers_adopts_every_socket() {
    reap_successors();
    let backend = Backend::echo().await;
    let fixture = Fixture::front(&[backend.addr]);
    let sluice = Sluice::with(fixture.clone()).per_core(2).start().await;
    let addr = sluice.addr("front");
    sluice.rewrite(fixture.table("[runtime]\nmode = \"per_core\"\nworker_threads = 1"));
    sluice
        .wait_log("[runtime] changes take effect at restart")
        .await;

    sluice.signal("USR2");
    let new = successor(&sluice, 1).await;
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    assert_eq!(listening_sockets(new.pid, addr), 2, "both sockets adopted");
    let threads = std::fs::read_dir(format!("/proc/{}/task", new.pid))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("sluice-worker"))
        .count();
    assert_eq!(threads, 1, "one worker");
    // The kernel spreads connections over both sockets: each must be served.
    for i in 0..40 {
        let sent = data(1000, i);
        assert_eq!(exchange(addr, &sent).await, sent, "connection {i}");
    }
}

/// Both processes append to one access log; after logrotate's rename, SIGUSR1 makes
/// each reopen it, the draining one too, so the old process's last line lands in the
/// new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_processes_write_one_access_log_and_reopen_it() {
    reap_successors();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let backend = Backend::echo().await;
    let sluice = Sluice::start(
        Fixture::front(&[backend.addr])
            .set("drain_timeout = \"60s\"")
            .table(&format!(
                "[access_log]\npath = \"{}\"\nformat = \"json\"",
                path.display()
            )),
    )
    .await;
    let addr = sluice.addr("front");
    let mut held = TcpStream::connect(addr).await.unwrap();
    held.write_all(b"old").await.unwrap();
    assert_eq!(read_n(&mut held, 3).await, b"old");
    let before = data(111, 1);
    assert_eq!(exchange(addr, &before).await, before);
    wait_lines(&path, 1).await;

    sluice.signal("USR2");
    let new = successor(&sluice, 1).await;
    sluice.wait_log("upgrade: the new process is ready").await;
    let after = data(222, 2);
    assert_eq!(exchange(addr, &after).await, after);
    let lines = wait_lines(&path, 2).await;
    assert!(
        lines[1].contains("\"bytes_in\":222"),
        "the new process's line: {lines:?}"
    );

    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    sluice.signal("USR1");
    new.signal("USR1");
    for pid in [sluice.pid(), new.pid] {
        eventually(&format!("pid {pid} to reopen the access log"), async || {
            holds_open(pid, &path)
        })
        .await;
    }
    let third = data(333, 3);
    assert_eq!(exchange(addr, &third).await, third);
    wait_lines(&path, 1).await;
    // The old process's connection ends now: its line goes to the new file.
    held.shutdown().await.unwrap();
    assert_eq!(until_closed(&mut held).await.unwrap(), 0);
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    let lines = wait_lines(&path, 2).await;
    assert!(
        lines.iter().any(|l| l.contains("\"bytes_in\":3,")),
        "the old process's line: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"bytes_in\":333")),
        "{lines:?}"
    );
    assert_eq!(
        crate::lines(&rotated).len(),
        2,
        "nothing else in the rotated file"
    );
}

/// The second SIGUSR2 arrives while the first upgrade's process is still starting: the
/// new binary is a script that waits on a FIFO the test writes, then runs sluice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigusr2_during_an_upgrade_is_refused() {
    reap_successors();
    let dir = tempfile::tempdir().unwrap();
    let binary = own_binary(dir.path());
    let real = dir.path().join("sluice-real");
    std::fs::hard_link(&binary, &real)
        .or_else(|_| std::fs::copy(&binary, &real).map(|_| ()))
        .unwrap();
    let fifo = dir.path().join("go");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let backend = Backend::echo().await;
    let sluice = Sluice::with(Fixture::front(&[backend.addr]))
        .binary(&binary)
        .start()
        .await;
    let addr = sluice.addr("front");
    replace_binary(
        &binary,
        format!(
            "#!/bin/sh\nread go < '{}'\nexec '{}' \"$@\"\n",
            fifo.display(),
            real.display()
        )
        .as_bytes(),
    );

    sluice.signal("USR2");
    let handing = sluice.wait_log(" sockets to pid ").await;
    sluice.signal("USR2");
    let refused = sluice.wait_log("upgrade refused").await;
    assert!(
        refused.contains("an upgrade is already in progress"),
        "{refused}"
    );
    let pid = handing
        .rsplit("to pid ")
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        refused.contains(&format!("pid {pid}")),
        "names the new process: {refused}"
    );
    let m = sluice.metrics().await;
    assert_eq!(
        m.value("sluice_upgrades_total", &[("result", "refused")]),
        1.0
    );
    let sent = data(10_000, 6);
    assert_eq!(
        exchange(addr, &sent).await,
        sent,
        "the old process serves on"
    );

    let go = fifo.clone();
    tokio::task::spawn_blocking(move || std::fs::write(go, "go\n").unwrap())
        .await
        .unwrap();
    let new = successor(&sluice, 1).await;
    assert_eq!(new.pid.to_string(), pid, "exec kept the pid");
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    assert_eq!(exchange(addr, &sent).await, sent, "the new process serves");
    assert_eq!(successor_pids(&sluice), [new.pid], "one upgrade, not two");
}

/// Socket activation: systemd-socket-activate binds the address, starts sluice on the
/// first connection with LISTEN_FDS=1, and sluice adopts that socket, binds nothing of
/// its own there, and serves the connection that woke it. An upgrade hands it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_from_systemd_is_adopted_at_start_and_handed_on() {
    reap_successors();
    let addr = free_port();
    let backend = Backend::echo().await;
    let listen = addr.to_string();
    let launch = Sluice::with(Fixture::front(&[backend.addr]).bind(&[&listen]))
        .per_core(2)
        .wrapped(
            "systemd-socket-activate",
            &["-l", &listen, "-E", "NOTIFY_SOCKET", "-E", "RUST_LOG"],
        );
    // The activator starts sluice only once a client connects.
    let first = async move {
        let mut s = eventually("the activator to listen", async || {
            TcpStream::connect(addr).await.ok()
        })
        .await;
        let sent = data(50_000, 9);
        assert_eq!(exchange_on(&mut s, &sent).await, sent);
    };
    let ((), sluice) = tokio::join!(first, launch.start());
    // The activator execs sluice: the harness's own child, with LISTEN_PID its pid.
    let ready = sluice.wait_log("sluice ready").await;
    let pid: u32 = ready
        .split("pid=")
        .nth(1)
        .and_then(|p| p.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pid, sluice.pid());
    sluice
        .wait_log("inherited listening sockets sockets=1 upgrade=false")
        .await;
    sluice
        .wait_log("the inherited socket has no SO_REUSEPORT: the workers share its accept queue")
        .await;
    assert_eq!(
        listening_sockets(pid, addr),
        1,
        "the activator's socket, nothing bound beside it"
    );
    let sent = data(50_000, 10);
    assert_eq!(exchange(addr, &sent).await, sent);

    sluice.signal("USR2");
    let new = successor(&sluice, 1).await;
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    assert_eq!(listening_sockets(new.pid, addr), 1, "the same socket");
    assert_eq!(exchange(addr, &sent).await, sent, "the new process serves");
}

/// Whether process `pid` has `path` open (by that name: a renamed file shows its new one).
fn holds_open(pid: u32, path: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .any(|target| target == path)
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------
// Under load: wrk, long streams and idle connections through ten upgrades in a row.

/// An HTTP backend for wrk: answers each request and closes.
async fn http_backend() -> Backend {
    Backend::start(|mut s: TcpStream| async move {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            .await;
        let _ = s.shutdown().await;
    })
    .await
}

/// A long stream: chunks sent and echoed until `stop`, every byte hashed both ways.
/// `served` counts it once its first chunk has come back: a process has accepted it.
async fn long_stream(
    addr: SocketAddr,
    seed: u64,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
) -> Result<usize, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sent_hash, mut got_hash) = (Sha256::new(), Sha256::new());
    let mut total = 0;
    // Bounded: at most 100,000 chunks (1.6 GB) however long the upgrades take.
    for i in 0..100_000u64 {
        if stop.load(Ordering::SeqCst) && i > 0 {
            break;
        }
        let chunk = data(16 * 1024, seed * 1_000_003 + i);
        sent_hash.update(&chunk);
        s.write_all(&chunk)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut back = vec![0; chunk.len()];
        tokio::time::timeout(STUCK, s.read_exact(&mut back))
            .await
            .map_err(|_| "stuck".to_string())?
            .map_err(|e| format!("read after {total} bytes: {e}"))?;
        got_hash.update(&back);
        if i == 0 {
            served.fetch_add(1, Ordering::SeqCst);
        }
        total += chunk.len();
    }
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .await
        .map_err(|e| format!("final read: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the end", rest.len()));
    }
    if sent_hash.finalize() != got_hash.finalize() {
        return Err(format!("the echo of {total} bytes differs"));
    }
    Ok(total)
}

/// What the prober saw: one request at a time, each on a new connection.
#[derive(Default)]
struct Probe {
    requests: AtomicU64,
    errors: AtomicU64,
    /// The longest connect-to-response, in microseconds.
    longest_us: AtomicU64,
}

async fn probe(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Probe>) -> Vec<String> {
    let mut errors = Vec::new();
    // Bounded in count; the stop flag ends it first.
    for _ in 0..1_000_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let began = Instant::now();
        let answer = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        };
        match tokio::time::timeout(STUCK, answer).await {
            Ok(Ok(got)) if got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"ok") => {
                seen.requests.fetch_add(1, Ordering::SeqCst);
                let us = began.elapsed().as_micros() as u64;
                seen.longest_us.fetch_max(us, Ordering::SeqCst);
            }
            other => {
                seen.errors.fetch_add(1, Ordering::SeqCst);
                errors.push(format!("{other:?}"));
            }
        }
    }
    errors
}

/// Packets dropped by the listening sockets at `addr` (skmem's `d`, `ss -ltnm`): a listen
/// drop (a full accept queue) raises it, and so does a packet dropped for other causes
/// (one that found the socket's backlog full while a thread held its lock, under heavy
/// CPU contention), which `TcpExtListenDrops` does not count.
fn socket_drops(addr: SocketAddr) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-Hltnm", &format!("sport = :{}", addr.port())])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(['(', ',', ')'])
        .filter_map(|f| f.strip_prefix('d'))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// `nstat -asz` counters, machine-wide (other processes move them too: reported, not
/// asserted).
fn nstat(name: &str) -> u64 {
    let out = std::process::Command::new("nstat")
        .args(["-asz", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

const UPGRADES: usize = 10;
const STREAMS: u64 = 20;
/// Long streams opened on each process an upgrade starts.
const STREAMS_PER_UPGRADE: u64 = 2;
const IDLE: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_load_lose_nothing() {
    reap_successors();
    let http = http_backend().await;
    let echo = Backend::echo().await;
    let fixture = Fixture::new()
        .set("drain_timeout = \"120s\"")
        .listener("web")
        .to("http")
        .listener("streams")
        .to("echo")
        .upstream("http")
        .backend(http.addr)
        .upstream("echo")
        .backend(echo.addr);
    let sluice = Sluice::with(fixture).per_core(2).quiet().start().await;
    let web = sluice.addr("web");
    let streams_at = sluice.addr("streams");
    let drops_before = (nstat("TcpExtListenDrops"), nstat("TcpExtListenOverflows"));

    // The load stops with `stop`; each process's streams with their own flag, oldest
    // first, so that each old process exits after the one before it and becomes this
    // test's child (its exit status readable here) before it exits.
    let stop = Arc::new(AtomicBool::new(false));
    let stops: Vec<Arc<AtomicBool>> = (0..=UPGRADES).map(|_| Arc::default()).collect();
    // Streams whose first chunk came back. A process's streams must be accepted by it
    // before the next upgrade: one still in the shared accept queue then would go to
    // the next process, leaving this one nothing to drain, so that it exited before its
    // parent, which reaped it instead of this test.
    let served = Arc::new(AtomicU64::new(0));
    let all_served = async |expect: u64| {
        eventually("the new streams' first echo", async || {
            served.load(Ordering::SeqCst) >= expect
        })
        .await;
    };
    let mut streams: Vec<Vec<_>> = vec![Vec::new()];
    for seed in 0..STREAMS {
        streams[0].push(tokio::spawn(long_stream(
            streams_at,
            seed,
            Arc::clone(&stops[0]),
            Arc::clone(&served),
        )));
    }
    all_served(STREAMS).await;
    let mut idle = Vec::new();
    for i in 0..IDLE {
        let mut s = TcpStream::connect(streams_at).await.unwrap();
        s.write_all(&[i as u8]).await.unwrap();
        assert_eq!(read_n(&mut s, 1).await, [i as u8]);
        idle.push(s);
    }
    let seen = Arc::new(Probe::default());
    let prober = tokio::spawn(probe(web, Arc::clone(&stop), Arc::clone(&seen)));
    let wrk = std::process::Command::new("wrk")
        .args(["-t2", "-c16", "-d300s", "-H", "Connection: close"])
        .arg(format!("http://{web}/"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("wrk (make deps-test installs it)");
    // wrk is running once requests go through.
    sluice
        .wait_metrics("wrk's first requests", |m| {
            m.value("sluice_connections_accepted_total", &[("listener", "web")]) > 100.0
        })
        .await;

    let mut successors: Vec<Successor> = Vec::new();
    let began = Instant::now();
    for (n, stop_mine) in stops.iter().enumerate().skip(1) {
        match successors.last() {
            None => sluice.signal("USR2"),
            Some(current) => current.signal("USR2"),
        }
        let next = successor(&sluice, n).await;
        // Each process holds long streams of its own when the next takes over: opened
        // once the one before has closed its listening sockets, so that only this one
        // can accept them.
        let before = successors.last().map_or(sluice.pid(), |s| s.pid);
        eventually("the old process to stop accepting", async || {
            listening_sockets(before, streams_at) == 0
        })
        .await;
        let mine = (0..STREAMS_PER_UPGRADE)
            .map(|i| {
                let seed = 1000 * n as u64 + i;
                tokio::spawn(long_stream(
                    streams_at,
                    seed,
                    Arc::clone(stop_mine),
                    Arc::clone(&served),
                ))
            })
            .collect();
        streams.push(mine);
        all_served(STREAMS + STREAMS_PER_UPGRADE * n as u64).await;
        successors.push(next);
        // Served by the new process before the next upgrade.
        let at = seen.requests.load(Ordering::SeqCst);
        eventually("requests through the new process", async || {
            seen.requests.load(Ordering::SeqCst) >= at + 20
        })
        .await;
    }
    let upgrading = began.elapsed();
    stop.store(true, Ordering::SeqCst);
    let kill = std::process::Command::new("kill")
        .args(["-INT", &wrk.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let wrk_out = tokio::task::spawn_blocking(move || wrk.wait_with_output().unwrap())
        .await
        .unwrap();
    let wrk_text = String::from_utf8_lossy(&wrk_out.stdout).into_owned();
    eprintln!(
        "wrk:\n{wrk_text}{}",
        String::from_utf8_lossy(&wrk_out.stderr)
    );

    let probe_errors = prober.await.unwrap();

    // Every old process exits 0 once its streams ended, oldest first; the last one
    // serves on.
    let mut bytes = 0;
    let mut streams = streams.into_iter();
    let mut end_streams = async |generation: usize| {
        stops[generation].store(true, Ordering::SeqCst);
        let mut total = 0;
        for s in streams.next().unwrap() {
            total += s
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("a long stream of process {generation}: {e}"));
        }
        total
    };
    bytes += end_streams(0).await;
    for (i, mut s) in idle.into_iter().enumerate() {
        s.write_all(&[i as u8]).await.unwrap();
        assert_eq!(read_n(&mut s, 1).await, [i as u8], "idle connection {i}");
        s.shutdown().await.unwrap();
        assert_eq!(until_closed(&mut s).await.unwrap(), 0);
    }
    assert_eq!(
        sluice.exit_status().await.code(),
        Some(0),
        "the first process"
    );
    for (n, s) in successors[..UPGRADES - 1].iter().enumerate() {
        bytes += end_streams(n + 1).await;
        assert_eq!(s.exit_code().await, 0, "process {} (pid {})", n + 1, s.pid);
    }
    bytes += end_streams(UPGRADES).await;
    let last = &successors[UPGRADES - 1];
    assert!(last.alive());
    let sent = data(10_000, 11);
    assert_eq!(exchange(streams_at, &sent).await, sent);

    let requests: u64 = wrk_text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{wrk_text}"));
    let drops_after = (nstat("TcpExtListenDrops"), nstat("TcpExtListenOverflows"));
    let ours = socket_drops(web) + socket_drops(streams_at);
    eprintln!(
        "FIGURES: {UPGRADES} upgrades in {upgrading:?}; wrk {requests} requests; prober {} requests, {} errors, longest connect-to-response {} ms; {} long streams, {bytes} bytes echoed; machine-wide ListenDrops {} -> {}, ListenOverflows {} -> {}; packets dropped by the listening sockets {ours}",
        seen.requests.load(Ordering::SeqCst),
        seen.errors.load(Ordering::SeqCst),
        seen.longest_us.load(Ordering::SeqCst) / 1000,
        STREAMS + STREAMS_PER_UPGRADE * UPGRADES as u64,
        drops_before.0,
        drops_after.0,
        drops_before.1,
        drops_after.1,
    );
    assert!(requests > 0);
    assert!(
        !wrk_text.contains("Socket errors"),
        "wrk saw errors:\n{wrk_text}"
    );
    assert!(
        !wrk_text.contains("Non-2xx"),
        "wrk saw failed requests:\n{wrk_text}"
    );
    assert!(
        probe_errors.is_empty(),
        "the prober saw errors: {probe_errors:?}"
    );
    // A listen drop on these sockets raises both their own count and the machine's
    // ListenDrops: one of them unmoved means there was none. (The machine's alone can
    // move with other processes' sockets; the sockets' alone with drops of other kinds.)
    assert!(
        ours == 0 || drops_after.0 == drops_before.0,
        "the listening sockets dropped {ours} packets and the machine counted {} listen drops",
        drops_after.0 - drops_before.0
    );
}

/// `sluice ctl ARGS` against the control socket at `socket`: its exit code.
async fn ctl(socket: &Path, args: &[&str]) -> i32 {
    ctl_at(socket, args).await.code
}

/// With a control socket: the old process lets go of it for the upgrade, takes it back
/// when the upgrade fails, and after a good one the new process answers on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_stays_after_a_failed_upgrade_and_moves_with_a_good_one_and_ctl_upgrades()
 {
    reap_successors();
    let dir = tempfile::tempdir().unwrap();
    let binary = own_binary(dir.path());
    let backend = Backend::echo().await;
    let fixture = Fixture::front(&[backend.addr]).table("[control]\nsocket = \"ctl.sock\"");
    let sluice = Sluice::with(fixture).binary(&binary).start().await;
    let socket = sluice.config_path.parent().unwrap().join("ctl.sock");
    let address = backend.addr.to_string();
    assert_eq!(ctl(&socket, &["backends"]).await, 0);

    replace_binary(&binary, b"#!/bin/sh\nexit 1\n");
    sluice.signal("USR2");
    sluice.wait_log("upgrade failed; still serving").await;
    sluice.wait_log("control socket listening again").await;
    assert_eq!(
        ctl(&socket, &["backends"]).await,
        0,
        "the old process answers"
    );
    // The same through `sluice ctl upgrade`: it waits for the outcome and says it failed.
    assert_eq!(
        ctl(&socket, &["upgrade"]).await,
        1,
        "a failed upgrade exits 1"
    );
    assert_eq!(
        ctl(&socket, &["backends"]).await,
        0,
        "the old process answers"
    );
    assert_eq!(
        sluice
            .metrics()
            .await
            .value("sluice_upgrades_total", &[("result", "failure")]),
        2.0
    );

    restore_binary(&binary);
    assert_eq!(ctl(&socket, &["upgrade"]).await, 0, "sluice ctl upgrade");
    let new = successor(&sluice, 1).await;
    sluice.wait_log("upgrade: the new process is ready").await;
    assert_eq!(sluice.exit_status().await.code(), Some(0));
    assert!(
        socket.exists(),
        "the old process left the new one's socket file"
    );
    // The admin endpoint is the new process's now: it shows what ctl changed.
    assert_eq!(ctl(&socket, &["drain", "app", &address]).await, 0);
    let m = sluice.metrics().await;
    assert_eq!(
        m.value(
            "sluice_backend_admin_state",
            &[("backend", address.as_str()), ("state", "drain")]
        ),
        1.0,
        "the new process took the drain"
    );
    new.signal("TERM");
    assert_eq!(new.exit_code().await, 0);
}
