//! sluice: a TCP reverse proxy and load balancer for connection-heavy services.
//!
//! # Layout
//!
//! | module | stage |
//! |---|---|
//! | [`config`] | the TOML file parsed into a validated [`config::Config`]; errors carry file:line:col |
//! | [`snapshot`] | [`snapshot::Snapshot`]: everything a connection needs, built from a config, shared through `ArcSwap` |
//! | [`runtime`] | where connections run: one multi-thread runtime, or a current-thread runtime per core |
//! | [`listener`] | bind (socket2; per core, one SO_REUSEPORT socket per worker), accept with a `max_connections` permit and EMFILE backoff |
//! | [`conn`] | one connection: the edge (PROXY header, TLS or ClientHello peek), pick, connect, relay, record |
//! | [`gate`] | the counting limits on connections (`max_connections`, the process cap), lock-free when not waiting |
//! | [`proxy_protocol`] | PROXY v1/v2 parsing (pure, incremental) and encoding |
//! | [`client_hello`] | the SNI of a ClientHello, for passthrough routing (pure, incremental) |
//! | [`tls`] | certificates and keys into rustls configs, SNI certificate choice |
//! | [`stream`] | plain or TLS streams at either end of a relay |
//! | [`upstream`] | backends, slots, connect with timeout and retry |
//! | [`queue`] | the FIFO wait queue of an upstream with `max_connections_per_backend` |
//! | [`health`] | active health checks and passive ejection |
//! | [`balance`] | balancing algorithms behind one trait: round robin, least connections, power of two, random, Maglev |
//! | [`relay`] | bidirectional byte relay with half-close, idle timeout, reset propagation |
//! | [`metrics`] | every metric name; handles resolved once per snapshot |
//! | [`admin`] | hyper on its own address: `/metrics`, `/healthz`, `/readyz` |
//! | [`shutdown`] | signals, stop accepting, drain with a deadline; `cancel` and `Stopped`, token waits without a lock per poll |
//!
//! # The life of a connection
//!
//! 1. A listener's accept loop takes a `max_connections` permit, accepts, loads the current
//!    snapshot once and spawns [`conn::handle`] with it; the connection keeps that `Arc`
//!    for its whole life. In `per_core` mode each worker thread has its own socket and
//!    accept loop for the address, and the connection runs on that thread to its end.
//! 2. At the edge, a trusted peer's PROXY header names the real client; then TLS is
//!    terminated, or on a passthrough listener the ClientHello's server name picks the
//!    upstream. Each stage has its own timeout and its own rejection reason.
//! 3. The listener's route names an upstream; the upstream's balancer picks a backend that
//!    is available (up, not ejected, weight above 0), has room under
//!    `max_connections_per_backend` and was not yet tried. When every such backend is
//!    full, the client waits in the upstream's FIFO [`queue`]. sluice connects under
//!    `connect_timeout` and on failure tries another backend, up to `retries` more
//!    times. A client that cannot be served is closed and counted in
//!    `sluice_connections_rejected_total` with its reason.
//! 4. [`relay::relay`] moves bytes both ways until both sides have closed (a FIN is passed
//!    on as a FIN), either side resets, nothing moves for `idle_timeout`, the connection
//!    reaches `max_lifetime`, or the shutdown drain reaches its deadline.
//! 5. Counters and histograms are recorded through handles resolved when the snapshot was
//!    built, and one log line records the connection.

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
