//! `make run` stops as a whole however it ends (issue 19): the terminal closing, Ctrl-C,
//! or a kill of make or of the demo's shell.
//!
//! Each test runs the very recipe, `make run` (with the debug binary and without the
//! build step), the way a user does: typed into an interactive bash on a pseudo-terminal
//! that `script` holds, so the job control, the hang-up and Ctrl-C come from bash and the
//! kernel, not from the test. sluice and the demo backends run on ports the test picks
//! (deploy/demo.sh reads them from the environment). Then it checks that every process
//! the demo started is gone and that every port refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// How long make, python3 and sluice may take to come up on a loaded machine.
const START: Duration = Duration::from_secs(60);
/// How long the whole demo may take to stop. sluice's drain ends as soon as no
/// connection is open, so this is only a bound for a loaded machine.
const STOP: Duration = Duration::from_secs(20);
/// Between two looks at something the test waits for.
const POLL: Duration = Duration::from_millis(20);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// One process, as /proc shows it. `start` (clock ticks after boot) tells a process from
/// a later one that reuses its pid.
#[derive(Clone, Debug)]
struct Proc {
    pid: i32,
    ppid: i32,
    comm: String,
    state: char,
    start: u64,
}

fn stat(pid: i32) -> Option<Proc> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    Some(Proc {
        pid,
        comm: text[open + 1..close].to_string(),
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        start: rest.get(19)?.parse().ok()?,
    })
}

fn processes() -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(stat)
        .collect()
}

/// The processes below `pid`, children first.
fn descendants(pid: i32) -> Vec<Proc> {
    let all = processes();
    let mut found: Vec<Proc> = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            parents.push(p.pid);
            found.push(p.clone());
        }
    }
    found
}

/// Still running: the same process (not a later one with its pid), and not a zombie.
fn running(p: &Proc) -> bool {
    stat(p.pid).is_some_and(|now| now.start == p.start && now.state != 'Z')
}

fn signal(p: &Proc, sig: Signal) {
    if running(p) {
        let _ = kill_process(Pid::from_raw(p.pid).unwrap(), sig);
    }
}

/// `N` distinct ports nothing listens on now, for the demo to bind: from
/// [`common::free_port`], below the ephemeral range, so that no other test's connection
/// takes one before the demo binds it.
fn free_ports<const N: usize>() -> [u16; N] {
    let mut ports = [0; N];
    for i in 0..N {
        ports[i] = loop {
            let port = common::free_port().port();
            if !ports[..i].contains(&port) {
                break port;
            }
        };
    }
    ports
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An HTTP/1.0 GET: the response, or None if the connection or the exchange failed.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&local(port), Duration::from_secs(2)).ok()?;
    exchange(&mut stream, path)
}

fn exchange(stream: &mut TcpStream, path: &str) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn refuses(port: u16) -> bool {
    matches!(
        TcpStream::connect_timeout(&local(port), Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Polls `done` until it holds or `limit` passes.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

struct Ports {
    web: u16,
    admin: u16,
    a: u16,
    b: u16,
}

impl Ports {
    fn all(&self) -> [(&'static str, u16); 4] {
        [
            ("sluice's listener", self.web),
            ("sluice's admin endpoint", self.admin),
            ("backend a", self.a),
            ("backend b", self.b),
        ]
    }
}

/// `make run` in an interactive bash on a pseudo-terminal.
struct Demo {
    /// `script`, the terminal: it holds the pseudo-terminal's master side.
    terminal: Child,
    /// What the test types into the terminal.
    keyboard: ChildStdin,
    /// Everything the terminal showed.
    screen: Arc<Mutex<Vec<u8>>>,
    /// The interactive bash, the session leader.
    shell: Proc,
    /// What `make run` started, make included, recorded once the demo was up.
    started: Vec<Proc>,
    ports: Ports,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start() -> Demo {
        let [web, admin, a, b] = free_ports::<4>();
        let ports = Ports { web, admin, a, b };
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sluice.toml");
        std::fs::write(
            &config,
            format!(
                r#"[admin]
bind = "127.0.0.1:{admin}"

[[listener]]
name = "web"
bind = ["127.0.0.1:{web}"]
upstream = "web"
max_connections = 100

[[upstream]]
name = "web"

[[upstream.backend]]
address = "127.0.0.1:{a}"

[[upstream.backend]]
address = "127.0.0.1:{b}"
"#
            ),
        )
        .unwrap();

        let mut terminal = Command::new("script")
            .args(["--quiet", "--flush", "--return", "--command"])
            .arg("exec bash --norc --noprofile --noediting -i")
            .arg("/dev/null")
            .current_dir(root())
            // script runs its command with $SHELL -c.
            .env("SHELL", "/bin/sh")
            .env("HISTFILE", "/dev/null")
            .env("PS1", "$ ")
            .env("TERM", "dumb")
            .env("RUST_LOG", "info")
            .env("DEMO_CONFIG", &config)
            .env("DEMO_PORT_A", a.to_string())
            .env("DEMO_PORT_B", b.to_string())
            .env("DEMO_DIR", dir.path().join("demo"))
            // Not a sub-make of a `make test` that may be running this, nor a systemd
            // service.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run script (util-linux; make test installs it)");
        let keyboard = terminal.stdin.take().unwrap();
        let screen = Arc::new(Mutex::new(Vec::new()));
        // Read the terminal all along: a full pseudo-terminal would block sluice's log.
        for mut stream in [
            Box::new(terminal.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(terminal.stderr.take().unwrap()),
        ] {
            let screen = Arc::clone(&screen);
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    screen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        let pid = i32::try_from(terminal.id()).unwrap();
        let mut demo = Demo {
            terminal,
            keyboard,
            screen,
            shell: Proc {
                pid: 0,
                ppid: pid,
                comm: String::new(),
                state: 'R',
                start: 0,
            },
            started: Vec::new(),
            ports,
            _dir: dir,
        };
        // Typed before bash is ready, the line waits in the terminal's input queue.
        demo.type_keys(
            format!(
                "make -o build -o deps-run RELEASE={} run\n",
                env!("CARGO_BIN_EXE_sluice")
            )
            .as_bytes(),
        );

        let up = wait_for(START, || {
            assert!(
                demo.terminal.try_wait().unwrap().is_none(),
                "the terminal ended:\n{}",
                demo.screen()
            );
            let Some(shell) = descendants(pid).into_iter().find(|p| p.ppid == pid) else {
                return false;
            };
            let started = descendants(shell.pid);
            let count = |prefix: &str| {
                started
                    .iter()
                    .filter(|p| p.comm.starts_with(prefix))
                    .count()
            };
            if count("sluice") != 1 || count("python") != 2 {
                return false;
            }
            // Recorded each time, so the last look is what ran once all was up.
            demo.shell = shell;
            demo.started = started;
            // The backends first: connections sluice cannot forward would eject them
            // (passive ejection) for 10 s.
            [demo.ports.a, demo.ports.b]
                .into_iter()
                .all(|port| TcpStream::connect(local(port)).is_ok())
                && get(demo.ports.admin, "/readyz").is_some_and(|r| r.contains(" 200 "))
                && get(demo.ports.web, "/").is_some_and(|r| r.contains("hello from backend"))
        });
        assert!(
            up,
            "the demo did not come up; processes {:?}; terminal:\n{}",
            demo.started,
            demo.screen()
        );
        demo
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.keyboard.write_all(keys).unwrap();
        self.keyboard.flush().unwrap();
    }

    /// The one process of the demo named `comm`.
    fn process(&self, comm: &str) -> Proc {
        let found: Vec<&Proc> = self.started.iter().filter(|p| p.comm == comm).collect();
        assert_eq!(found.len(), 1, "{comm} in {:?}", self.started);
        found[0].clone()
    }

    /// The terminal goes away (its window closed, the ssh connection dropped): its
    /// master side closes, and the kernel hangs up the session.
    fn hang_up(&mut self) {
        self.terminal.kill().unwrap();
        self.terminal.wait().unwrap();
    }

    /// Every process `make run` started exits within [`STOP`], and every port refuses.
    fn assert_stopped(&self, what: &str) {
        let stopped = wait_for(STOP, || !self.started.iter().any(running));
        let left: Vec<&Proc> = self.started.iter().filter(|p| running(p)).collect();
        assert!(
            stopped,
            "after {what}, still running: {left:?} (of {:?}); terminal:\n{}",
            self.started,
            self.screen()
        );
        for (name, port) in self.ports.all() {
            assert!(
                refuses(port),
                "after {what}, {name} (port {port}) does not refuse connections"
            );
        }
    }
}

impl Drop for Demo {
    /// Stops whatever is left, by pid, so that a failed test leaves nothing running.
    fn drop(&mut self) {
        let _ = self.terminal.kill();
        let _ = self.terminal.wait();
        for p in self.started.iter().chain([&self.shell]) {
            signal(p, Signal::KILL);
        }
    }
}

#[test]
fn a_terminal_hang_up_stops_sluice_and_both_backends() {
    let mut demo = Demo::start();
    demo.hang_up();
    demo.assert_stopped("the terminal hung up");
}

#[test]
fn ctrl_c_lets_a_connection_in_flight_finish_then_stops_everything() {
    let mut demo = Demo::start();
    let mut in_flight = TcpStream::connect(local(demo.ports.web)).unwrap();
    // Proxied through to a backend before the drain starts: sluice counts it open.
    let counted = wait_for(STOP, || {
        get(demo.ports.admin, "/metrics").is_some_and(|m| {
            m.lines()
                .any(|l| l.starts_with("sluice_connections_active{") && l.ends_with(" 1"))
        })
    });
    assert!(counted, "sluice never counted the connection open");
    demo.type_keys(b"\x03");
    // sluice drains: new connections are refused while the open one continues.
    assert!(
        wait_for(STOP, || refuses(demo.ports.web)),
        "sluice did not stop accepting after Ctrl-C; terminal:\n{}",
        demo.screen()
    );
    let response = exchange(&mut in_flight, "/").unwrap_or_default();
    assert!(
        response.contains("hello from backend"),
        "the connection in flight was cut (a second signal reached sluice?): {response:?}; terminal:\n{}",
        demo.screen()
    );
    drop(in_flight);
    demo.assert_stopped("Ctrl-C");
}

#[test]
fn a_kill_of_make_stops_everything() {
    let demo = Demo::start();
    signal(&demo.process("make"), Signal::TERM);
    demo.assert_stopped("kill (TERM) of make");
}

#[test]
fn a_kill_of_the_demo_shell_stops_everything() {
    let demo = Demo::start();
    let make = demo.process("make");
    let shells: Vec<&Proc> = demo
        .started
        .iter()
        .filter(|p| p.ppid == make.pid && p.comm == "sh")
        .collect();
    assert_eq!(shells.len(), 1, "the recipe's shell in {:?}", demo.started);
    signal(shells[0], Signal::TERM);
    demo.assert_stopped("kill (TERM) of the recipe's shell");
}
