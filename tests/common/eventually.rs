//! Waiting for something to become true: one helper, [`eventually`], that polls a
//! condition and fails naming what it waited for. No test sleeps to let a thing happen.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// Upper bound for anything that should happen "promptly": generous, so a loaded 2-core
/// CI machine does not fail a test, yet far below any timeout the tests configure.
pub const PROMPTLY: Duration = Duration::from_secs(20);
/// After this long a transfer is taken to be stuck, and the test fails rather than hangs.
pub const STUCK: Duration = Duration::from_secs(60);
/// Between two looks at a condition.
const POLL: Duration = Duration::from_millis(20);

/// What a condition of [`eventually`] returns: done with a value, or not yet.
pub trait Outcome {
    type Value;
    /// `Err(Some(seen))` says what the condition saw, for the failure message.
    fn settle(self) -> Result<Self::Value, Option<String>>;
}

impl Outcome for bool {
    type Value = ();
    fn settle(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn settle(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

/// `Err(seen)`: not yet, and `seen` is shown if the wait fails.
impl<T, E: Display> Outcome for Result<T, E> {
    type Value = T;
    fn settle(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

/// Polls `condition` until it is true (or `Some`, or `Ok`) and returns its value; panics
/// after [`PROMPTLY`] with `what` it waited for and the last thing it saw.
pub async fn eventually<O: Outcome>(what: &str, condition: impl AsyncFnMut() -> O) -> O::Value {
    eventually_within(what, PROMPTLY, condition).await
}

/// [`eventually`] with a deadline of its own, for a peer that is slow to start.
pub async fn eventually_within<O: Outcome>(
    what: &str,
    limit: Duration,
    mut condition: impl AsyncFnMut() -> O,
) -> O::Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // A condition that hangs (a peer that never answers) fails the wait too.
        let seen = match tokio::time::timeout(left, condition()).await {
            Ok(outcome) => match outcome.settle() {
                Ok(value) => return value,
                Err(seen) => seen,
            },
            Err(_) => Some("(the last look did not finish)".to_string()),
        };
        if Instant::now() >= deadline {
            match seen {
                Some(seen) => panic!("waited {limit:?} for {what}; last seen:\n{seen}"),
                None => panic!("waited {limit:?} for {what}"),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
