//! The test harness: the real `sluice` binary on port 0, in front of real backends on
//! loopback, driven the way an operator or systemd would drive it.
//!
//! - [`sluice`]: the process driver, a [`Sluice`]; it learns its addresses from the
//!   admin endpoint, never from log text.
//! - [`launch`]: how it starts, [`Sluice::with`] and [`Launch`]; readiness comes from
//!   `$NOTIFY_SOCKET`.
//! - [`fixture`]: the one config builder, [`Fixture`].
//! - [`backends`]: fake backends (echo, tagged, refusing, blackhole).
//! - [`dns`]: a real DNS server (dnsmasq) on a loopback port, [`Dns`].
//! - [`io`]: payloads and exchanges, HTTP GET, text files.
//! - [`eventually`]: the one way to wait, [`eventually()`], and its deadlines.
//! - [`metrics`]: the exposition parser, [`Metrics`].
//! - [`kernel`]: socket state the kernel shows (accept queues, listening sockets).
//! - [`pki`]: certificates made by `openssl`, and `openssl s_server` / `s_client`.
//! - [`browser`]: headless Chromium: a page's DOM, the requests it made, screenshots.
//! - [`ctl`]: `sluice ctl` runs and what they printed.
//! - [`upgrade`]: the processes a binary upgrade starts ([`Successor`]), and binaries to
//!   upgrade to.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

// Private but for `pki`, which tests name: a glob import of a module `sluice` would
// shadow the crate.
mod backends;
mod browser;
mod ctl;
mod dns;
mod eventually;
mod fixture;
mod io;
mod kernel;
mod launch;
mod metrics;
pub mod pki;
mod sluice;
mod upgrade;

pub use backends::*;
pub use browser::*;
pub use ctl::*;
pub use dns::*;
pub use eventually::*;
pub use fixture::*;
pub use io::*;
pub use kernel::*;
pub use launch::*;
pub use metrics::*;
pub use sluice::*;
pub use upgrade::*;
