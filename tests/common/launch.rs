//! Starting sluice as systemd would: the harness binds a Unix datagram socket, names it
//! in `NOTIFY_SOCKET`, and waits for `READY=1`, whose `STATUS=` names the admin
//! endpoint. Until then an early exit fails the start, with sluice's output.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::eventually::eventually;
use super::sluice::Sluice;

/// How to start sluice: built by [`Sluice::with`] or [`Sluice::with_file`], run by
/// [`Launch::start`] (or [`Launch::start_fails`] for a start that must fail).
pub struct Launch {
    config: Source,
    nofile: Option<u32>,
    env: Vec<(String, String)>,
    /// A `[runtime]` table added to the config text (and to each rewrite of it).
    runtime: Option<String>,
    quiet: bool,
    /// The sluice binary to run, in place of the one cargo built (a copy an upgrade test
    /// replaces, say).
    binary: Option<PathBuf>,
    /// A program (and its arguments) that runs sluice, such as `systemd-socket-activate`.
    wrapper: Vec<String>,
}

pub(super) enum Source {
    Text(String),
    /// A file the test laid out itself in a directory it hands over.
    File(tempfile::TempDir, PathBuf),
}

impl Launch {
    pub(super) fn new(config: Source) -> Launch {
        Launch {
            config,
            nofile: None,
            env: Vec::new(),
            runtime: None,
            quiet: false,
            binary: None,
            wrapper: Vec::new(),
        }
    }

    /// Runs the sluice binary at `path` rather than the one cargo built.
    pub fn binary(mut self, path: &std::path::Path) -> Launch {
        self.binary = Some(path.to_path_buf());
        self
    }

    /// Runs sluice through `program` and `args`, which start it (and pass on the
    /// environment): `systemd-socket-activate -l ADDRESS`.
    pub fn wrapped(mut self, program: &str, args: &[&str]) -> Launch {
        self.wrapper = std::iter::once(program)
            .chain(args.iter().copied())
            .map(str::to_string)
            .collect();
        self
    }

    /// The process's open-file limit (`ulimit -n`).
    pub fn nofile(mut self, limit: u32) -> Launch {
        self.nofile = Some(limit);
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `[runtime] mode = "per_core"` with `threads` workers.
    pub fn per_core(self, threads: usize) -> Launch {
        self.runtime(format!(
            "[runtime]\nmode = \"per_core\"\nworker_threads = {threads}\n"
        ))
    }

    /// `[runtime] mode = "multi_thread"`, one worker per core.
    pub fn multi_thread(self) -> Launch {
        self.runtime("[runtime]\nmode = \"multi_thread\"\n".to_string())
    }

    fn runtime(mut self, table: String) -> Launch {
        self.runtime = Some(table);
        self
    }

    /// Logs at sluice's production level (info), without echoing it: for benchmarks.
    pub fn quiet(mut self) -> Launch {
        self.quiet = true;
        self
    }

    /// Starts sluice and waits until it reports ready; panics, with its log, if it
    /// exits first or takes too long.
    pub async fn start(self) -> Sluice {
        let (process, config_path) = self.spawn();
        let ready = eventually("sluice to notify READY=1", async || {
            if let Some(status) = process.try_wait() {
                process.drain_output();
                panic!(
                    "sluice exited with {status} before it was ready; output:\n{}",
                    process.lines().join("\n")
                );
            }
            let found = process
                .notifications()
                .into_iter()
                .find(|n| n.starts_with("READY=1"));
            found.ok_or_else(|| {
                format!(
                    "no READY=1 yet; output so far:\n{}",
                    process.lines().join("\n")
                )
            })
        })
        .await;
        let admin = admin_address(&ready);
        Sluice::ready(process, admin, config_path).await
    }

    /// Starts sluice where it must not start, and waits for it to exit; panics if it
    /// becomes ready instead.
    pub async fn start_fails(self) -> Exited {
        let (process, _) = self.spawn();
        let status = eventually("sluice to exit", async || {
            if let Some(ready) = process
                .notifications()
                .into_iter()
                .find(|n| n.starts_with("READY=1"))
            {
                panic!("sluice started where it should have failed: {ready:?}");
            }
            process.try_wait()
        })
        .await;
        process.drain_output();
        Exited {
            status,
            stdout: process.output.stdout(),
            stderr: process.output.stderr(),
        }
    }

    fn spawn(self) -> (Process, PathBuf) {
        let (dir, config_path) = match self.config {
            Source::Text(text) => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("sluice.toml");
                std::fs::write(&path, complete(&text, self.runtime.as_deref())).unwrap();
                (dir, path)
            }
            Source::File(dir, path) => {
                assert!(
                    self.runtime.is_none(),
                    "a runtime for a config file the test wrote: write it into the file"
                );
                (dir, path)
            }
        };
        // Beside the config, not in its directory: sluice watches that one.
        let notify_dir = tempfile::tempdir().unwrap();
        let notify_path = notify_dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_nonblocking(true).unwrap();

        let binary = self
            .binary
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")));
        let mut command = match (self.nofile, self.wrapper.split_first()) {
            (None, None) => Command::new(&binary),
            (Some(n), None) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(&binary);
                c
            }
            (None, Some((program, args))) => {
                let mut c = Command::new(program);
                c.args(args).arg(&binary);
                c
            }
            (Some(_), Some(_)) => panic!("nofile and a wrapper: set the limit in the wrapper"),
        };
        // Tests read the per-connection line, which is at debug; benchmarks (quiet) run
        // at the production default. SLUICE_LOG overrides both, to measure the cost of
        // logging in benchmarks.
        let level = std::env::var("SLUICE_LOG").unwrap_or_else(|_| {
            if self.quiet {
                "info"
            } else {
                "info,sluice::conn=debug"
            }
            .to_string()
        });
        let mut child = command
            .args(["run", "--config"])
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", level)
            .envs(self.env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let output = Output::default();
        let readers = vec![
            output.read(child.stdout.take().unwrap(), false, !self.quiet),
            output.read(child.stderr.take().unwrap(), true, !self.quiet),
        ];
        let process = Process {
            child: Mutex::new(child),
            output,
            readers: Mutex::new(readers),
            notify,
            notified: Mutex::new(Vec::new()),
            runtime: self.runtime,
            _dirs: (dir, notify_dir),
        };
        (process, config_path)
    }
}

/// A sluice that exited, as [`Launch::start_fails`] saw it.
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// `text` with an admin endpoint on a port of the kernel's choosing and `runtime`,
/// each unless it has its own.
pub(super) fn complete(text: &str, runtime: Option<&str>) -> String {
    let mut config = text.to_string();
    match runtime {
        Some(runtime) if !config.contains("[runtime]") => {
            config.push('\n');
            config.push_str(runtime);
        }
        _ => {}
    }
    if !config.contains("[admin]") {
        config.push_str("\n[admin]\nbind = \"127.0.0.1:0\"\n");
    }
    config
}

/// The admin address from READY's `STATUS=ready; admin endpoint on ADDRESS`.
fn admin_address(ready: &str) -> SocketAddr {
    ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .and_then(|s| s.rsplit_once(" on "))
        .and_then(|(_, a)| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no admin address in the READY notification {ready:?}"))
}

/// The child process and what it wrote; killed when dropped, so that a start that
/// fails its wait leaves nothing running.
pub(super) struct Process {
    child: Mutex<Child>,
    output: Output,
    /// The threads reading `output`, until the child's pipes close.
    readers: Mutex<Vec<JoinHandle<()>>>,
    notify: UnixDatagram,
    /// Every datagram received on `notify` so far.
    notified: Mutex<Vec<String>>,
    runtime: Option<String>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Process {
    pub(super) fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    pub(super) fn try_wait(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().unwrap()
    }

    /// Every line the child wrote so far, standard output and error.
    pub(super) fn lines(&self) -> Vec<String> {
        self.output.lines()
    }

    /// The `[runtime]` table the start added to the config text, if any.
    pub(super) fn runtime(&self) -> Option<&str> {
        self.runtime.as_deref()
    }

    pub(super) fn notifications(&self) -> Vec<String> {
        let mut notified = self.notified.lock().unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            notified.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        notified.clone()
    }

    /// After the exit: waits until every line the process wrote has been read.
    pub(super) fn drain_output(&self) {
        let readers: Vec<_> = self.readers.lock().unwrap().drain(..).collect();
        for r in readers {
            r.join().unwrap();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Lines from the child's stdout and stderr, in the order they were read.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<(bool, String)>>>);

impl Output {
    /// Reads `stream` (stderr if `is_stderr`) line by line on a thread of its own.
    fn read(
        &self,
        stream: impl std::io::Read + Send + 'static,
        is_stderr: bool,
        echo: bool,
    ) -> JoinHandle<()> {
        let lines = Arc::clone(&self.0);
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[sluice] {line}");
                }
                lines.lock().unwrap().push((is_stderr, line));
            }
        })
    }

    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn of(&self, stderr: bool) -> String {
        let lines = self.0.lock().unwrap();
        let mine: Vec<&str> = lines
            .iter()
            .filter(|(e, _)| *e == stderr)
            .map(|(_, l)| l.as_str())
            .collect();
        mine.join("\n")
    }

    fn stdout(&self) -> String {
        self.of(false)
    }

    fn stderr(&self) -> String {
        self.of(true)
    }
}
