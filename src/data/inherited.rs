//! Listening sockets this process did not bind: handed over by the sluice it replaces
//! (`control/upgrade.rs`), or passed by systemd socket activation (`LISTEN_FDS`). The
//! first apply adopts the ones whose address it listens on ([`Inherited::take`]) and
//! closes the rest ([`Inherited::close_rest`]).
//!
//! A handed-over socket carries its key, the listener name and the address as configured
//! (`web@127.0.0.1:0`, or `admin@127.0.0.1:9555`), so an address with port 0 finds its
//! socket again, and a changed address is not taken for the old one. A socket from
//! systemd has no key: it is adopted by the address it is bound to.

use std::net::{SocketAddr, TcpListener};

/// One inherited listening socket.
#[derive(Debug)]
pub struct InheritedSocket {
    /// The handing-over process's key for it; `None` from systemd.
    pub key: Option<String>,
    /// The address it is bound to (port 0 resolved).
    pub local: SocketAddr,
    pub socket: TcpListener,
}

/// The inherited sockets not adopted yet.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<InheritedSocket>,
}

/// The key of a listener's address in a handover: its name and the address as configured.
pub fn listener_key(listener: &str, address: SocketAddr) -> String {
    format!("{listener}@{address}")
}

/// The admin endpoint's key in a handover: its address as configured.
pub fn admin_key(address: SocketAddr) -> String {
    format!("admin@{address}")
}

impl Inherited {
    pub fn new(sockets: Vec<InheritedSocket>) -> Inherited {
        Inherited { sockets }
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Takes every socket for `key` (several with `per_core`, one per old worker); if
    /// none has that key, those bound to exactly `address` (never for port 0, which
    /// names no address).
    pub fn take(&mut self, key: &str, address: SocketAddr) -> Vec<TcpListener> {
        let by_key = self.sockets.iter().any(|s| s.key.as_deref() == Some(key));
        let (taken, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|s| {
                if by_key {
                    s.key.as_deref() == Some(key)
                } else {
                    address.port() != 0 && s.local == address
                }
            });
        self.sockets = rest;
        taken.into_iter().map(|s| s.socket).collect()
    }

    /// Closes what no listener adopted; returns how many, each logged.
    pub fn close_rest(&mut self) -> usize {
        let rest = std::mem::take(&mut self.sockets);
        for s in &rest {
            tracing::info!(
                key = s.key.as_deref().unwrap_or("(socket activation)"),
                address = %s.local,
                "closing an inherited socket that the config does not listen on"
            );
        }
        rest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(key: Option<&str>) -> InheritedSocket {
        let socket = TcpListener::bind("127.0.0.1:0").unwrap();
        InheritedSocket {
            key: key.map(str::to_string),
            local: socket.local_addr().unwrap(),
            socket,
        }
    }

    #[test]
    fn takes_by_key_then_by_bound_address() {
        let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let a = socket(Some("web@127.0.0.1:0"));
        let b = socket(Some("web@127.0.0.1:0"));
        let activated = socket(None);
        let activated_at = activated.local;
        let admin = admin_key(zero);
        let mut pool = Inherited::new(vec![a, socket(Some(&admin)), b, activated]);
        assert_eq!(pool.take(&listener_key("web", zero), zero).len(), 2);
        assert_eq!(
            pool.take("other@127.0.0.1:0", zero).len(),
            0,
            "port 0 never matches by address"
        );
        assert_eq!(pool.take("other", activated_at).len(), 1);
        let moved: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            pool.take(&admin_key(moved), moved).len(),
            0,
            "a changed address"
        );
        assert_eq!(pool.take(&admin, zero).len(), 1);
        assert!(pool.is_empty());
        assert_eq!(pool.close_rest(), 0);
    }
}
