//! What happens to a client's connection before a backend is picked.

pub mod client_hello;
pub mod proxy_protocol;
pub mod tls;
