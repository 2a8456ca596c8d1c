//! Binary upgrades as a test drives them: the sluice the harness started hands over to a
//! process it starts itself, which hands over to the next, and so on. The test process
//! makes itself their reaper ([`reap_successors`]), so each becomes its child once its
//! parent exits: its exit status can be read, and it is stopped by its own pid.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::process::{Pid, Signal, WaitOptions};

use super::eventually::eventually;
use super::sluice::Sluice;

/// Makes this test process the reaper of orphaned descendants (PR_SET_CHILD_SUBREAPER).
/// nextest runs each test in a process of its own, so this touches no other test.
pub fn reap_successors() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("become a child subreaper");
}

/// A sluice started by an upgrade; killed by its pid when dropped if still running.
pub struct Successor {
    pub pid: u32,
    /// Its exit code once reaped (`-signal` if a signal ended it).
    exit: Mutex<Option<i32>>,
}

impl Successor {
    /// A sluice this test did not start directly (one a wrapper started, say), by pid.
    pub fn of(pid: u32) -> Successor {
        Successor {
            pid,
            exit: Mutex::new(None),
        }
    }

    fn pid_of(&self) -> Pid {
        Pid::from_raw(self.pid as i32).expect("a pid above 0")
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Reaps it if it exited; `None` while it runs, or while its parent (the sluice it
    /// replaced) still runs, since it is not this process's child until then.
    fn try_reap(&self) -> Option<i32> {
        let mut exit = self.exit.lock().unwrap();
        if exit.is_none()
            && let Ok(Some((_, status))) =
                rustix::process::waitpid(Some(self.pid_of()), WaitOptions::NOHANG)
        {
            *exit = Some(match (status.exit_status(), status.terminating_signal()) {
                (Some(code), _) => code,
                (None, Some(signal)) => -signal,
                (None, None) => i32::MIN,
            });
        }
        *exit
    }

    /// Waits for it to exit; its exit code (`-signal` if a signal ended it).
    pub async fn exit_code(&self) -> i32 {
        let what = format!("the upgraded sluice (pid {}) to exit", self.pid);
        eventually(&what, async || {
            self.try_reap().ok_or_else(|| {
                let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
                    .unwrap_or_else(|e| format!("no /proc entry: {e}"));
                let state: Vec<&str> = status
                    .lines()
                    .filter(|l| l.starts_with("State:") || l.starts_with("PPid:"))
                    .collect();
                format!(
                    "{state:?}; waitpid: {:?}",
                    rustix::process::waitpid(Some(self.pid_of()), WaitOptions::NOHANG)
                )
            })
        })
        .await
    }

    /// Whether it still runs (or is a zombie not yet reaped).
    pub fn alive(&self) -> bool {
        self.try_reap().is_none() && Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if self.try_reap().is_none() {
            let _ = rustix::process::kill_process(self.pid_of(), Signal::KILL);
            // Our child by now unless its parent still runs (then ECHILD, at once).
            let _ = rustix::process::waitpid(Some(self.pid_of()), WaitOptions::empty());
        }
    }
}

/// The pids that said `READY=1` with `MAINPID=`: each process an upgrade started, in
/// the order they became ready.
pub fn successor_pids(sluice: &Sluice) -> Vec<u32> {
    sluice
        .notifications()
        .iter()
        .filter(|n| n.starts_with("READY=1"))
        .filter_map(|n| n.lines().find_map(|l| l.strip_prefix("MAINPID=")))
        .map(|pid| pid.parse().unwrap())
        .collect()
}

/// Waits until the `nth` (from 1) upgrade's process is ready, and returns it.
pub async fn successor(sluice: &Sluice, nth: usize) -> Successor {
    let pid = eventually(&format!("upgrade {nth} to be ready"), async || {
        let pids = successor_pids(sluice);
        pids.get(nth - 1)
            .copied()
            .ok_or_else(|| format!("ready so far: {pids:?}"))
    })
    .await;
    Successor::of(pid)
}

/// A sluice binary of the test's own in `dir`, to replace as a package manager would: a
/// hard link to the one cargo built (a copy where links cannot be made).
pub fn own_binary(dir: &Path) -> PathBuf {
    let path = dir.join("sluice");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_sluice"), &path).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_sluice"), &path).unwrap();
    }
    path
}

/// Replaces the file at `path` with `contents`, executable, renamed over it as package
/// managers do (the running process's `/proc/self/exe` then ends in " (deleted)").
pub fn replace_binary(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let new = path.with_extension("new");
    std::fs::write(&new, contents).unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, path).unwrap();
}

/// Puts cargo's sluice back at `path` (a fresh link, renamed over what is there).
pub fn restore_binary(path: &Path) {
    let new = path.with_extension("new");
    let _ = std::fs::remove_file(&new);
    if std::fs::hard_link(env!("CARGO_BIN_EXE_sluice"), &new).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_sluice"), &new).unwrap();
    }
    std::fs::rename(&new, path).unwrap();
}
