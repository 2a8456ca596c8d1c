//! Whether a client may connect to a listener, asked once its real address is known
//! (after a trusted PROXY header) and before anything else is spent on it: a TLS
//! handshake, a backend pick, a place in a queue. First the listener's `deny` and
//! `allow` lists, then its per-client limits (`client_table.rs`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Access, ClientLimits};
use crate::edge::client_table::{ClientSlot, ClientTable, Over};
use crate::metrics::RejectReason;

/// A refused client: the counted reason and a one-line cause for the log.
pub type Refused = (RejectReason, String);

/// Admits a client at `ip`; with per-client limits, the slot counts its connection
/// until dropped.
pub fn admit(
    access: Option<&Access>,
    limits: Option<&ClientLimits>,
    table: &Arc<ClientTable>,
    ip: IpAddr,
) -> Result<Option<ClientSlot>, Refused> {
    if let Some(access) = access {
        access.check(ip).map_err(|e| (RejectReason::Denied, e))?;
    }
    let Some(limits) = limits else {
        return Ok(None);
    };
    match table.admit(ip, limits, Instant::now()) {
        Ok(slot) => Ok(Some(slot)),
        Err(Over::Connections) => Err((
            RejectReason::ClientLimit,
            format!(
                "the client has max_connections_per_client ({}) open",
                limits.max_connections.unwrap_or(0)
            ),
        )),
        Err(Over::Rate) => Err((
            RejectReason::ClientRate,
            "the client opens connections faster than client_rate".to_string(),
        )),
    }
}
