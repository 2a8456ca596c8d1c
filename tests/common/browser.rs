//! A real browser: headless Chromium from Debian (`make deps-test` installs it), run once
//! per look with a profile of its own. Each look records Chromium's net log, from which
//! [`Visit::page_requests`] lists every request made on behalf of the page (its
//! network isolation key is the page's site), whatever the page is; Chromium's own
//! background traffic (its time and update checks) has other keys and is left out.
//!
//! Every non-loopback host goes through a proxy that does not exist
//! (`--proxy-server=127.0.0.1:9`; loopback bypasses proxies), so a page that tries to
//! fetch from outside fails to load it, and the net log still shows the attempt.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backends::Backend;
use super::eventually::STUCK;

/// Flags for every look: headless, no sandbox (tests run as root), no first-run
/// chatter, and nothing but loopback reachable.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-pings",
    "--hide-scrollbars",
    "--proxy-server=http://127.0.0.1:9",
];

/// The browser, found on `PATH`; panics with how to install it when it is missing.
pub struct Chromium {
    binary: PathBuf,
    dir: tempfile::TempDir,
    looks: std::sync::atomic::AtomicUsize,
}

/// What one look saw.
pub struct Visit {
    /// The DOM after loading (and after the virtual time budget, with JavaScript on),
    /// serialized by Chromium (`--dump-dom`).
    pub dom: String,
    /// The URL of every request made on behalf of the page, in order.
    pub page_requests: Vec<String>,
}

impl Chromium {
    pub fn new() -> Chromium {
        let binary = ["chromium", "chromium-browser"]
            .iter()
            .find_map(|name| which(name))
            .unwrap_or_else(|| {
                panic!("chromium is not installed: `make deps-test` installs it (apt-get install chromium)")
            });
        Chromium {
            binary,
            dir: tempfile::tempdir().unwrap(),
            looks: Default::default(),
        }
    }

    /// Loads `url` and dumps its DOM after `run_for` of virtual time (timers fire,
    /// fetches complete), so the page's own script has run.
    pub async fn visit(&self, url: &str, run_for: Duration) -> Visit {
        let (dir, net_log) = self.look();
        let mut args = vec![format!("--log-net-log={}", net_log.display())];
        // A budget of 0 would wait for ever: without one, the DOM is dumped once loaded.
        if !run_for.is_zero() {
            args.push(format!("--virtual-time-budget={}", run_for.as_millis()));
        }
        args.push("--dump-dom".to_string());
        let dom = self.run(&dir, &args, url).await;
        let page_requests = page_requests(&net_log, url);
        Visit { dom, page_requests }
    }

    /// Loads `html` as a browser without JavaScript would show it, and dumps its DOM.
    ///
    /// Chromium's `--dump-dom` itself runs on JavaScript, so turning JavaScript off
    /// (`--blink-settings=scriptEnabled=false`) leaves it nothing to dump. Instead the
    /// page is served from loopback with `Content-Security-Policy: script-src 'none'`,
    /// which keeps every script of the page from running, and nothing else changes.
    pub async fn visit_without_javascript(&self, html: &str) -> Visit {
        let body = html.to_string();
        let server = Backend::start(move |s| serve_once(s, body.clone())).await;
        let url = format!("http://{}/", server.addr);
        self.visit(&url, Duration::ZERO).await
    }

    /// Saves a PNG of `url` at `width` x `height` to `path`, after `run_for` of
    /// virtual time.
    pub async fn screenshot(&self, url: &str, path: &Path, width: u32, height: u32) {
        let (dir, _) = self.look();
        let args = vec![
            format!("--window-size={width},{height}"),
            "--virtual-time-budget=500".to_string(),
            format!("--screenshot={}", path.display()),
        ];
        self.run(&dir, &args, url).await;
        let png = std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot at {path:?}: {e}"));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {path:?}");
    }

    /// A fresh profile directory and net log path for one look.
    fn look(&self) -> (PathBuf, PathBuf) {
        let n = self.looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = self.dir.path().join(format!("look-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let net_log = dir.join("net-log.json");
        (dir, net_log)
    }

    async fn run(&self, dir: &Path, args: &[String], url: &str) -> String {
        let mut command = std::process::Command::new(&self.binary);
        command
            .args(FLAGS)
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().expect("start chromium");
        let pid = child.id();
        let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
        let out = match tokio::time::timeout(STUCK, waited).await {
            Ok(out) => out.unwrap().unwrap(),
            Err(_) => {
                // The browser this look started, by its pid; its own children follow it.
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
                panic!("chromium did not finish with {url} within {STUCK:?}");
            }
        };
        assert!(
            out.status.success(),
            "chromium failed on {url}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Chromium {
    fn default() -> Chromium {
        Chromium::new()
    }
}

/// Answers one HTTP request with `html`, scripts forbidden.
async fn serve_once(mut s: TcpStream, html: String) {
    let mut request = [0u8; 4096];
    let _ = s.read(&mut request).await;
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Security-Policy: script-src 'none'\r\nContent-Length: {}\r\n\r\n",
        html.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(html.as_bytes()).await;
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// Requests in `net_log` made for the page at `url`: those whose network isolation key
/// is the page's site (`http://127.0.0.1 http://127.0.0.1` for a page on loopback).
fn page_requests(net_log: &Path, url: &str) -> Vec<String> {
    let text = std::fs::read_to_string(net_log)
        .unwrap_or_else(|e| panic!("chromium wrote no net log at {net_log:?}: {e}"));
    let log: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the net log at {net_log:?} is not JSON: {e}"));
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        .as_u64()
        .expect("URL_REQUEST_START_JOB in the net log's constants");
    // The site: scheme and host, without the port.
    let site = {
        let (scheme, rest) = url.split_once("://").expect("an absolute URL");
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        format!("{scheme}://{host}")
    };
    let key = format!("{site} {site}");
    log["events"]
        .as_array()
        .expect("events in the net log")
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start_job))
        .filter(|e| e["params"]["network_isolation_key"].as_str() == Some(key.as_str()))
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_string))
        .collect()
}
