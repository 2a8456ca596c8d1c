//! The test harness: the real `sluice` binary on port 0, in front of real backends on
//! loopback, driven the way an operator or systemd would drive it.
//!
//! - [`sluice`]: the process driver, a [`Sluice`] started by [`Sluice::with`]; it learns
//!   readiness from `$NOTIFY_SOCKET` and its addresses from the admin endpoint, never
//!   from log text.
//! - [`fixture`]: the one config builder, [`Fixture`].
//! - [`backends`]: fake backends (echo, tagged, refusing, blackhole).
//! - [`io`]: payloads and exchanges, HTTP GET, text files.
//! - [`eventually`]: the one way to wait, [`eventually()`], and its deadlines.
//! - [`metrics`]: the exposition parser, [`Metrics`].
//! - [`kernel`]: socket state the kernel shows (accept queues, listening sockets).
//! - [`pki`]: certificates made by `openssl`, and `openssl s_server` / `s_client`.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

// Private but for `pki`, which tests name: a glob import of a module `sluice` would
// shadow the crate.
mod backends;
mod eventually;
mod fixture;
mod io;
mod kernel;
mod metrics;
pub mod pki;
mod sluice;

pub use backends::*;
pub use eventually::*;
pub use fixture::*;
pub use io::*;
pub use kernel::*;
pub use metrics::*;
pub use sluice::*;
