//! Upstreams: named groups of backends, how a backend is picked and connected to, and
//! how its health is known.
//!
//! | file | what |
//! |---|---|
//! | `backend.rs` | one backend: identity (address) and live state (weight, active count, health, retirement) |
//! | `health.rs` | a backend's health as atomics: the checks' verdict and passive ejection |
//! | `balance/` | the balancing algorithms, one file each, behind one trait |
//! | `pool.rs` | an upstream's backends as slots: balancer plus per-backend limit |
//! | `queue.rs` | the FIFO wait for a slot, over the small `Slots` interface |
//! | `connect.rs` | `Upstream`: pool, queue and settings; connect with timeout and retry |
//! | `check.rs` | active health checks, one task per backend |
//!
//! Imports run down this table: nothing here imports a file above it, and no file outside
//! imports anything but what this module re-exports or the files' public items.

pub mod backend;
pub mod balance;
pub mod check;
pub mod connect;
pub mod health;
pub mod pool;
pub mod queue;

pub use backend::Backend;
pub use connect::{
    BACKEND_KEEPALIVE_AFTER, Carried, ConnectError, Ends, Header, KEEPALIVE, Lease, Upstream,
    backend_keepalive,
};
