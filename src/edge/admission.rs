//! Whether a client may connect to a listener, asked once its real address is known
//! (after a trusted PROXY header) and before anything else is spent on it: a TLS
//! handshake, a backend pick, a place in a queue. First the listener's `deny` and
//! `allow` lists, then its per-client limits (`client_table.rs`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{Access, ClientLimits};
use crate::edge::client_table::{ClientSlot, ClientTable, Over};
use crate::metrics::RejectReason;
use crate::shutdown::{self, Stopped};

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

/// A listener's `allow`/`deny` as the latest config has them, for connections opened
/// under an older one on a listener with `close_denied_on_reload`: each waits on the
/// token of the lists in force, and when a reload changes them, checks its client
/// against the new ones. Kept across reloads with the listener.
pub struct Revocations(ArcSwap<Lists>);

struct Lists {
    access: Option<Access>,
    /// Cancelled when newer lists replace these.
    replaced: CancellationToken,
}

impl Revocations {
    pub fn new(access: Option<Access>) -> Arc<Revocations> {
        Arc::new(Revocations(ArcSwap::from_pointee(Lists {
            access,
            replaced: CancellationToken::new(),
        })))
    }

    /// Puts `access` in force; connections waiting in [`Revocations::denied`] look again
    /// if it differs from the lists before.
    pub fn update(&self, access: Option<&Access>) {
        if self.0.load().access.as_ref() == access {
            return;
        }
        let old = self.0.swap(Arc::new(Lists {
            access: access.cloned(),
            replaced: CancellationToken::new(),
        }));
        shutdown::cancel(&old.replaced);
    }

    /// Resolves once the lists in force deny `ip`.
    pub async fn denied(&self, ip: IpAddr) {
        loop {
            let lists = self.0.load_full();
            if lists.access.as_ref().is_some_and(|a| a.check(ip).is_err()) {
                return;
            }
            Stopped::new(&lists.replaced).await;
        }
    }
}
