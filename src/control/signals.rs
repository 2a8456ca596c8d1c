//! Signals and file changes become one stream of [`Event`]s that the server loop reads:
//! SIGHUP and a settled change of a watched file ask for a reload, SIGUSR1 reopens the
//! access log, SIGUSR2 upgrades the binary (`upgrade.rs`), SIGTERM and SIGINT shut down. A second SIGTERM or SIGINT during the drain
//! exits at once.

use std::io;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// Exit status when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Pending events at most. A reload request that finds the queue full is dropped: one
/// already queued reads the same, latest file. A shutdown request waits for room.
const PENDING: usize = 16;

/// What the server loop is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Reload(Trigger),
    ReopenAccessLog,
    /// Start the binary at sluice's own path and hand it the listening sockets.
    Upgrade,
    /// Shut down gracefully; the signal's name.
    Shutdown(&'static str),
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    File,
    Signal,
    /// `sluice ctl reload`, through the control socket.
    Ctl,
}

/// Where events are sent from: the signal task and the file watch.
#[derive(Clone)]
pub struct Events(mpsc::Sender<Event>);

impl Events {
    /// Asks for a reload unless enough events are already pending.
    pub fn reload(&self, trigger: Trigger) {
        let _ = self.0.try_send(Event::Reload(trigger));
    }
}

/// Starts listening for signals; returns the sender (for the file watch) and the stream.
pub fn listen() -> io::Result<(Events, mpsc::Receiver<Event>)> {
    let (tx, rx) = mpsc::channel(PENDING);
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let events = Events(tx.clone());
    let reloads = events.clone();
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            let name = tokio::select! {
                _ = hup.recv() => {
                    reloads.reload(Trigger::Signal);
                    continue;
                }
                _ = usr1.recv() => {
                    let _ = tx.try_send(Event::ReopenAccessLog);
                    continue;
                }
                _ = usr2.recv() => {
                    // Never dropped silently: a refused upgrade is logged by the loop.
                    let _ = tx.send(Event::Upgrade).await;
                    continue;
                }
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if stopping {
                tracing::warn!(
                    signal = name,
                    "second signal: exiting without finishing the drain"
                );
                std::process::exit(EXIT_INTERRUPTED);
            }
            stopping = true;
            if tx.send(Event::Shutdown(name)).await.is_err() {
                // The server loop is gone: nothing is left to shut down gracefully.
                std::process::exit(EXIT_INTERRUPTED);
            }
        }
    });
    Ok((events, rx))
}
