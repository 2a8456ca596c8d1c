//! The access log: structured lines per connection, never stalling connections, and
//! reopened on SIGUSR1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

/// `front` in front of `backends`, with an access log at `path` and `extra` keys in it.
fn with_log(path: &Path, extra: &str, backends: &[std::net::SocketAddr]) -> Fixture {
    Fixture::front(backends)
        .upstream_keys("retries = 0")
        .table(&format!(
            "[access_log]\npath = \"{}\"\n{extra}",
            path.display()
        ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_line_per_connection_with_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let live = Backend::echo().await;
    let sluice = Sluice::start(with_log(&path, "format = \"json\"", &[live.addr])).await;
    let sent = data(12_345, 1);
    assert_eq!(exchange(sluice.addr("front"), &sent).await, sent);

    let got = wait_lines(&path, 1).await;
    let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(v["listener"], "front");
    assert_eq!(v["upstream"], "app");
    assert_eq!(v["backend"], live.addr.to_string());
    assert_eq!(v["bytes_in"], 12_345);
    assert_eq!(v["bytes_out"], 12_345);
    assert_eq!(v["reason"], "closed");
    assert!(v["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_connection_is_logged_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let dead = refusing();
    let sluice = Sluice::start(with_log(&path, "", &[dead.addr])).await;
    let mut s = tokio::net::TcpStream::connect(sluice.addr("front"))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await.unwrap(), 0);

    let got = wait_lines(&path, 1).await;
    assert!(got[0].contains(" backend=- "), "{}", got[0]);
    assert!(
        got[0].ends_with(" reason=upstream_unavailable"),
        "{}",
        got[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_blocks_never_stalls_connections_and_drops_are_counted() {
    const CONNECTIONS: usize = 30;
    const BUFFER: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    // A FIFO with no reader: opening it for writing blocks until someone reads.
    let path = dir.path().join("access.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap()
            .success()
    );
    let live = Backend::echo().await;
    let sluice = Sluice::start(with_log(&path, &format!("buffer = {BUFFER}"), &[live.addr])).await;

    for i in 0..CONNECTIONS {
        let sent = data(1000, i as u64);
        assert_eq!(exchange(sluice.addr("front"), &sent).await, sent);
    }
    // A scrape reads one metric after another, so the last connection may record its
    // drop after this counter was read and be gone before the gauge is: wait for both.
    let dropped = (CONNECTIONS - BUFFER) as f64;
    let m = sluice
        .wait_metrics("every connection closed and its line dropped", |m| {
            m.value("sluice_connections_active", &[]) == 0.0
                && m.value("sluice_access_log_dropped_total", &[]) >= dropped
        })
        .await;
    assert_eq!(
        m.value("sluice_access_log_dropped_total", &[]),
        dropped,
        "all but the queued lines dropped"
    );

    // A reader appears: the queued lines come out, while sluice still runs.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let fifo = std::fs::File::open(&path).unwrap();
        for line in std::io::BufReader::new(fifo).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    for i in 0..BUFFER {
        let line = rx
            .recv_timeout(PROMPTLY)
            .unwrap_or_else(|_| panic!("line {i} never came"));
        assert!(line.contains("reason=closed"), "{line}");
    }
    drop(sluice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_after_logrotate_moved_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let live = Backend::echo().await;
    let sluice = Sluice::start(with_log(&path, "", &[live.addr])).await;
    for i in 0..3 {
        exchange(sluice.addr("front"), &data(10, i)).await;
    }
    wait_lines(&path, 3).await;

    std::fs::rename(&path, &rotated).unwrap();
    sluice.signal("USR1");
    eventually("the file reopened", async || path.exists()).await;
    for i in 0..2 {
        exchange(sluice.addr("front"), &data(10, i)).await;
    }

    assert_eq!(wait_lines(&path, 2).await.len(), 2);
    assert_eq!(
        lines(&rotated).len(),
        3,
        "nothing more went to the rotated file"
    );
}
