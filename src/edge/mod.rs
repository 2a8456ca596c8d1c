//! What happens to a client's connection before a backend is picked.

pub mod admission;
pub mod client_hello;
pub mod client_table;
pub mod proxy_protocol;
pub mod tls;
