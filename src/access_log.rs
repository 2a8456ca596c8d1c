//! The access log: one structured line per closed connection, written by a thread of its
//! own through a bounded queue. A connection never waits for the log. When the queue is
//! full (a slow disk, a pipe nobody reads), the line is dropped and counted in
//! `sluice_access_log_dropped_total`. SIGUSR1 makes the writer reopen its file, for
//! logrotate.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;

use crate::config::{AccessLogConfig, LogFormat};

/// How often an idle writer thread looks for a reopen request.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// One closed connection, as the access log records it.
pub struct Entry<'a> {
    pub listener: &'a str,
    pub client: SocketAddr,
    pub upstream: &'a str,
    /// `None` when no backend was reached.
    pub backend: Option<SocketAddr>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub reason: &'a str,
}

/// The sending side, shared by every connection.
pub struct AccessLog {
    tx: SyncSender<String>,
    format: LogFormat,
    dropped: IntCounter,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Starts the writer thread for `config`. The file is opened by that thread, so a
    /// destination that blocks on open (a FIFO) never blocks sluice.
    pub fn start(config: &AccessLogConfig, dropped: IntCounter) -> io::Result<AccessLog> {
        let (tx, rx) = sync_channel(config.buffer);
        let reopen = Arc::new(AtomicBool::new(false));
        let path = config.path.clone();
        let flag = Arc::clone(&reopen);
        std::thread::Builder::new()
            .name("sluice-access-log".to_string())
            .spawn(move || write_lines(&rx, path, &flag))?;
        Ok(AccessLog {
            tx,
            format: config.format,
            dropped,
            reopen,
        })
    }

    /// Queues a line for `entry`, or drops and counts it if the queue is full.
    pub fn record(&self, entry: &Entry<'_>) {
        let line = format_line(entry, self.format, SystemTime::now());
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Asks the writer to reopen its file (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

fn format_line(e: &Entry<'_>, format: LogFormat, now: SystemTime) -> String {
    let time = humantime::format_rfc3339_millis(now);
    let backend = e.backend.map_or_else(|| "-".to_string(), |b| b.to_string());
    let ms = e.duration.as_secs_f64() * 1000.0;
    let mut line = String::with_capacity(256);
    // Every value is a config name, an address, a number or a fixed reason: none
    // needs quoting in logfmt, and JSON escaping is only for the names.
    let _ = match format {
        LogFormat::Logfmt => writeln!(
            line,
            "time={time} listener={} client={} upstream={} backend={backend} bytes_in={} bytes_out={} duration_ms={ms:.3} reason={}",
            e.listener, e.client, e.upstream, e.bytes_in, e.bytes_out, e.reason
        ),
        LogFormat::Json => writeln!(
            line,
            "{{\"time\":\"{time}\",\"listener\":{},\"client\":\"{}\",\"upstream\":{},\"backend\":\"{backend}\",\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{ms:.3},\"reason\":\"{}\"}}",
            json_string(e.listener),
            e.client,
            json_string(e.upstream),
            e.bytes_in,
            e.bytes_out,
            e.reason
        ),
    };
    line
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

enum Sink {
    Stdout(io::Stdout),
    File(BufWriter<File>),
}

impl Sink {
    fn open(path: Option<&PathBuf>) -> io::Result<Sink> {
        match path {
            None => Ok(Sink::Stdout(io::stdout())),
            Some(p) => {
                let f = OpenOptions::new().create(true).append(true).open(p)?;
                Ok(Sink::File(BufWriter::with_capacity(64 * 1024, f)))
            }
        }
    }

    fn write(&mut self, line: &str) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => s.lock().write_all(line.as_bytes()),
            Sink::File(f) => f.write_all(line.as_bytes()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush(),
            Sink::File(f) => f.flush(),
        }
    }
}

/// The writer thread: writes lines as they come, flushes when the queue runs dry.
fn write_lines(rx: &Receiver<String>, path: Option<PathBuf>, reopen: &AtomicBool) {
    let mut sink = match Sink::open(path.as_ref()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("access log: cannot open {path:?}: {e}");
            None
        }
    };
    loop {
        let line = match rx.recv_timeout(IDLE_CHECK) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if reopen.swap(false, Ordering::Relaxed) || (sink.is_none() && path.is_some()) {
            if let Some(s) = sink.as_mut() {
                let _ = s.flush();
            }
            sink = Sink::open(path.as_ref()).ok();
        }
        let Some(s) = sink.as_mut() else { continue };
        if let Some(line) = line {
            let _ = s.write(&line);
            // Write everything already queued before paying for a flush.
            while let Ok(more) = rx.try_recv() {
                let _ = s.write(&more);
            }
        }
        let _ = s.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            listener: "pg",
            client: "10.0.0.9:50000".parse().unwrap(),
            upstream: "postgres",
            backend: Some("10.0.0.1:5432".parse().unwrap()),
            bytes_in: 12,
            bytes_out: 3400,
            duration: Duration::from_micros(1500),
            reason: "closed",
        }
    }

    #[test]
    fn logfmt_line() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            format_line(&entry(), LogFormat::Logfmt, t),
            "time=2027-01-15T08:00:00.000Z listener=pg client=10.0.0.9:50000 upstream=postgres backend=10.0.0.1:5432 bytes_in=12 bytes_out=3400 duration_ms=1.500 reason=closed\n"
        );
    }

    #[test]
    fn json_line_parses() {
        let line = format_line(&entry(), LogFormat::Json, SystemTime::now());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["listener"], "pg");
        assert_eq!(v["backend"], "10.0.0.1:5432");
        assert_eq!(v["bytes_out"], 3400);
        assert_eq!(v["duration_ms"], 1.5);
    }
}
