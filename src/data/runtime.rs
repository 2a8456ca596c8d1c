//! The runtimes connections run on, as `[runtime] mode` chooses.
//!
//! - `multi_thread`: one tokio multi-thread runtime runs everything. [`Workers`] is its
//!   one handle; each listening address has one socket, and tokio moves tasks between
//!   its threads, which wake each other to do so.
//! - `per_core`: [`PerCore`] starts one thread per worker, each running a current-thread
//!   runtime. Each listening address gets one SO_REUSEPORT socket per worker (see
//!   `listener.rs`), so the kernel spreads new connections over the threads, and a
//!   connection lives its whole life on the thread whose socket accepted it. The control
//!   plane ([`crate::run`]: reload, admin, health checks, signals) runs in a
//!   current-thread runtime of its own on the main thread.
//!
//! Everything a connection shares with other threads (the snapshot, atomics, semaphores,
//! cancellation tokens, the task tracker) works across runtimes; timers and sockets
//! belong to the runtime of the task that created them.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The runtimes that accept and serve connections; never empty.
#[derive(Clone, Debug)]
pub struct Workers(Vec<Handle>);

impl Workers {
    /// A single runtime, such as the multi-thread one whose threads share the work.
    pub fn single(handle: Handle) -> Workers {
        Workers(vec![handle])
    }

    pub fn handles(&self) -> &[Handle] {
        &self.0
    }

    /// The threads that run connections, over all the runtimes.
    pub fn threads(&self) -> usize {
        self.0.iter().map(|h| h.metrics().num_workers()).sum()
    }
}

/// One current-thread runtime per OS thread (`sluice-worker-{i}`), each running until
/// [`PerCore::stop`] (or drop). Stopping drops the runtimes with whatever tasks they
/// still hold, as dropping a multi-thread runtime does.
pub struct PerCore {
    workers: Workers,
    /// A send (or drop) on a thread's sender ends its `block_on`.
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl PerCore {
    /// Starts `threads` workers (at least one).
    pub fn start(threads: usize) -> io::Result<PerCore> {
        let mut started = PerCore {
            workers: Workers(Vec::with_capacity(threads)),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads.max(1) {
            // Built here so an error reaches the caller; a current-thread runtime runs on
            // whichever thread calls `block_on`.
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            // On an error, `started` drops and stops the threads already running.
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || {
                    // Spawned tasks run while this waits; a dropped sender ends it too.
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            () = sentinel() => {}
                        }
                    });
                    // The runtime drops here, on its own thread, with the tasks it holds.
                })?;
            started.workers.0.push(handle);
            started.threads.push((stop, thread));
        }
        Ok(started)
    }

    pub fn workers(&self) -> Workers {
        self.workers.clone()
    }

    /// Stops every worker and waits for its thread to end.
    pub fn stop(self) {
        drop(self);
    }
}

/// How far ahead each worker's own timer always is: see [`sentinel`].
const SENTINEL: Duration = Duration::from_secs(1);

/// A timer that never lets the worker's clock go unset for more than [`SENTINEL`].
///
/// tokio writes its runtime's eventfd whenever a timer is set earlier than every timer
/// there was when the thread last went to sleep (it cannot know that the thread setting
/// it is the one that sleeps). A connection's connect timeout (3 s by default) set
/// while the others only have their idle timeouts (an hour) is such a timer, so
/// without this each such connection paid a `write` to the eventfd and a wake-up of
/// `epoll_wait` to read it. With this tick always at most a second ahead, a timer
/// longer than a second is never the earliest. It costs one wake-up a second.
async fn sentinel() {
    let mut tick = tokio::time::interval(SENTINEL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

impl Drop for PerCore {
    fn drop(&mut self) {
        // Tell every worker first, so they wind down together.
        let threads: Vec<_> = self
            .threads
            .drain(..)
            .map(|(stop, thread)| {
                // A worker already gone has dropped its receiver: nothing to tell.
                let _ = stop.send(());
                thread
            })
            .collect();
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_run_spawned_tasks_and_stop() {
        let pool = PerCore::start(2).unwrap();
        let workers = pool.workers();
        assert_eq!(workers.handles().len(), 2);
        let (tx, rx) = std::sync::mpsc::channel();
        for h in workers.handles() {
            let tx = tx.clone();
            h.spawn(async move {
                let name = std::thread::current().name().map(str::to_string);
                tx.send(name).unwrap();
            });
        }
        let mut names: Vec<_> = (0..2).map(|_| rx.recv().unwrap().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["sluice-worker-0", "sluice-worker-1"]);
        pool.stop();
    }
}
