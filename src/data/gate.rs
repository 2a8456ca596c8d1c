//! A counting limit on open connections (a listener's `max_connections`, the process
//! cap) that takes no lock on its common paths.
//!
//! tokio's `Semaphore` takes its waiter mutex on every release, and these limits are
//! shared by every connection on every worker thread. Here a slot is taken with a
//! compare-and-swap on the count and given back with a subtraction and
//! `Notify::notify_one`, which takes `Notify`'s lock only when an accept loop is
//! waiting. Waiters are woken in the order they began to wait, but a slot is not
//! reserved for the one woken: an accept loop that asks at that moment may take it first
//! (the woken one then waits again). A reload may resize the limit while connections are
//! open: lowering it below the slots in use lets no one in until enough have closed.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

pub struct Gate {
    used: AtomicUsize,
    max: AtomicUsize,
    /// Wakes waiters when a slot is given back or the limit grows.
    freed: Notify,
}

impl Gate {
    pub fn new(max: usize) -> Arc<Gate> {
        Arc::new(Gate {
            used: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            freed: Notify::new(),
        })
    }

    /// Sets the limit; slots in use beyond a lowered one stay until they are given back.
    pub fn resize(&self, max: usize) {
        self.max.store(max, Ordering::SeqCst);
        self.freed.notify_waiters();
    }

    /// Slots taken and not yet given back.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// Takes a slot if one is free.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used < self.max.load(Ordering::SeqCst)).then_some(used + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    /// Takes a slot, waiting until one is free.
    pub async fn take(self: &Arc<Self>) -> Slot {
        loop {
            if let Some(slot) = self.try_take() {
                return slot;
            }
            // Registered before the second look, so a slot given back in between wakes
            // this wait rather than going unseen.
            let mut freed = pin!(self.freed.notified());
            freed.as_mut().enable();
            if let Some(slot) = self.try_take() {
                return slot;
            }
            freed.await;
        }
    }
}

/// One slot of a [`Gate`], given back when dropped.
pub struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::SeqCst);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_given_back() {
        let gate = Gate::new(2);
        let a = gate.try_take().expect("first");
        let b = gate.try_take().expect("second");
        assert!(gate.try_take().is_none(), "the limit holds");
        assert_eq!(gate.used(), 2);
        drop(a);
        let c = gate.try_take().expect("a slot given back is free again");
        drop((b, c));
        assert_eq!(gate.used(), 0);
    }

    #[test]
    fn lowering_the_limit_waits_for_slots_in_use_to_close() {
        let gate = Gate::new(3);
        let slots: Vec<Slot> = (0..3).map(|_| gate.try_take().expect("free")).collect();
        gate.resize(1);
        let mut slots = slots.into_iter();
        drop(slots.next());
        assert!(gate.try_take().is_none(), "2 in use, limit 1");
        drop(slots.next());
        assert!(gate.try_take().is_none(), "1 in use, limit 1");
        drop(slots.next());
        assert!(gate.try_take().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_gets_the_slot_given_back_or_the_room_a_resize_adds() {
        let gate = Gate::new(1);
        let held = gate.try_take().expect("free");
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.take().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let slot = waiter.await.expect("the waiter gets the slot");
        assert_eq!(gate.used(), 1);

        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.take().await }
        });
        gate.resize(2);
        let second = waiter.await.expect("the resize lets it in");
        assert_eq!(gate.used(), 2);
        drop((slot, second));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_takers_never_exceed_the_limit_and_all_finish() {
        let gate = Gate::new(3);
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (gate, peak) = (Arc::clone(&gate), Arc::clone(&peak));
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let slot = gate.take().await;
                        peak.fetch_max(gate.used(), Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        drop(slot);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("every taker finishes");
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(gate.used(), 0);
    }
}
