//! sluice: a TCP reverse proxy and load balancer for connection-heavy services.
//!
//! # Layout
//!
//! Folders are planes. A module imports only modules in rows below its own (and its own
//! row's where no circle results); `tests/layout.rs` checks it.
//!
//! | module | plane |
//! |---|---|
//! | [`control`] | the control plane: start and reload (one `apply`), signals as events, the file watch, the drain, retirement of what a reload removed, the admin endpoint and its status page, the control socket and `sluice ctl`, backends by name (DNS re-resolution) |
//! | [`data`] | the data plane: listeners (bind, accept under `max_connections`), one connection's stages (`conn`), the relay, the counting gates, the runtimes |
//! | [`snapshot`] | [`snapshot::Snapshot`], everything a connection needs, and [`snapshot::SnapshotDiff`], what applying a config changes |
//! | [`upstream`] | backends and their state, the pool (balancer + slots), the queue, connect with retry, health checks, `balance/` |
//! | [`edge`] | the client side before a backend is picked: PROXY protocol, admission (allow/deny, per-client limits and their table), ClientHello, TLS material (also used to connect to backends) |
//! | [`access_log`] | the access log through a bounded non-blocking writer |
//! | [`metrics`], [`shutdown`], [`stream`] | metric names, label values and scopes; the shutdown tokens; plain or TLS streams |
//! | [`config`] | the TOML file parsed into a validated [`config::Config`]; errors carry file:line:col |
//!
//! # The life of a connection
//!
//! 1. A listener's accept loop (`data::listener`) takes a `max_connections` permit,
//!    accepts, loads the current snapshot once and spawns `data::conn::handle` with it;
//!    the connection keeps that `Arc` for its whole life. In `per_core` mode each worker
//!    thread has its own socket and accept loop for the address, and the connection runs
//!    on that thread to its end.
//! 2. At the edge, a trusted peer's PROXY header names the real client; the listener's
//!    `allow`/`deny` and per-client limits admit that client or close it at once; then TLS is
//!    terminated, or on a passthrough listener the ClientHello's server name picks the
//!    upstream. Each stage has its own timeout and its own rejection reason.
//! 3. The listener's route names an upstream; the upstream's pool asks its balancer for a
//!    backend that is available (up, not ejected, weight above 0, admin state ready), has room under
//!    `max_connections_per_backend` and was not yet tried. When every such backend is
//!    full, the client waits in the upstream's FIFO queue. sluice connects under
//!    `connect_timeout` and on failure tries another backend, up to `retries` more
//!    times. A client that cannot be served is closed and counted in
//!    `sluice_connections_rejected_total` with its reason.
//! 4. `data::relay` moves bytes both ways until both sides have closed (a FIN is passed
//!    on as a FIN), either side resets, nothing moves for `idle_timeout`, the connection
//!    reaches `max_lifetime`, or the shutdown drain reaches its deadline.
//! 5. Counters and histograms are recorded through handles resolved when the snapshot was
//!    built, and one log line records the connection.

// Every `pub` item is reachable from the crate root, or says `pub(crate)`: what the
// library exports is deliberate. (For the library only: test helpers are `pub` by habit.)
#![warn(unreachable_pub)]
// Tests may panic on a broken expectation; the data path may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod access_log;
pub mod config;
pub mod control;
pub mod data;
pub mod edge;
pub mod metrics;
pub mod shutdown;
pub mod snapshot;
pub mod stream;
pub mod upstream;

pub use control::{Error, run};
