//! The closed sets of label values: each enum's values, their count and their text are
//! derived from its definition (strum), so a new variant is exported, counted and named
//! without a list kept beside it. Per-scope handles are arrays indexed by [`Label::index`].

use strum::{EnumCount, IntoStaticStr, VariantArray};

/// A label enum: every value, in declaration order, with its exported text.
pub trait Label: Copy + VariantArray + Into<&'static str> + 'static {
    /// The position of this value in [`VariantArray::VARIANTS`]: the handle arrays'
    /// index. Fieldless enums without explicit discriminants number their variants in
    /// declaration order, as strum lists them; `labels_index_their_arrays` checks it.
    fn index(self) -> usize;
}

/// Implements [`Label`], and an inherent `as_str`, for enums whose discriminants are
/// their positions.
macro_rules! label {
    ($($t:ty),* $(,)?) => {$(
        impl Label for $t {
            fn index(self) -> usize {
                self as usize
            }
        }

        impl $t {
            /// The exported label value.
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    )*};
}

label!(
    RejectReason,
    End,
    CheckResult,
    ConnectFailure,
    AcceptFailure,
    HandshakeResult,
    Direction,
    AdminState,
    CtlResult,
    ResolutionResult
);

/// One handle per value of label `L`, built by `make` for each value.
pub(super) fn per_value<L: Label + EnumCount, H, const N: usize>(
    make: impl FnMut(L) -> H,
) -> [H; N] {
    const { assert!(N == L::COUNT, "one handle per label value") };
    let mut make = make;
    std::array::from_fn(|i| make(L::VARIANTS[i]))
}

/// Why a client connection was closed without reaching a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum RejectReason {
    /// Every backend tried refused, reset or timed out.
    UpstreamUnavailable,
    /// No backend is available: all down, ejected, or weight 0.
    NoHealthyBackend,
    /// Every backend at its limit and the queue full.
    QueueFull,
    /// Waited in the queue past its timeout.
    QueueTimeout,
    /// The client closed its connection while waiting for a backend.
    ClientLeft,
    /// The TLS handshake failed or timed out.
    TlsHandshake,
    /// A PROXY header was missing, malformed, too long or too slow, or the peer is
    /// not trusted to send one.
    ProxyProtocol,
    /// On a passthrough listener: not TLS, a malformed or oversize ClientHello, or none
    /// within `hello_timeout`.
    ClientHello,
    /// On a passthrough listener: no route matched the server name and there is no
    /// default upstream.
    NoRoute,
    /// The client's address is in the listener's `deny` list, or not in its `allow`.
    Denied,
    /// The client already has `max_connections_per_client` open on the listener.
    ClientLimit,
    /// The client opened connections faster than the listener's `client_rate`.
    ClientRate,
}

/// How a relayed connection ended (the relay's outcome, and the `reason` of its log
/// line, access-log entry and `sluice_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum End {
    /// Both directions finished with a FIN.
    Closed,
    ClientReset,
    BackendReset,
    IdleTimeout,
    /// The upstream's `max_lifetime` passed.
    MaxLifetime,
    /// A reload removed the backend (`on_backend_removed` drain or close).
    BackendRemoved,
    /// An operator closed the backend's connections (`sluice ctl close`, maint with
    /// close, the end of a drain's `close_after`).
    BackendClosed,
    /// Cut at the end of the shutdown drain.
    Shutdown,
    /// A reload's `allow`/`deny` deny the client (`close_denied_on_reload`).
    Denied,
}

/// The outcome of one active health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum CheckResult {
    Success,
    Failure,
    Timeout,
}

/// Why one connect attempt to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum ConnectFailure {
    Refused,
    Timeout,
    Reset,
    Unreachable,
    /// The TCP connect worked but the TLS handshake failed (certificate, protocol).
    Tls,
    Other,
}

impl ConnectFailure {
    pub fn of(e: &std::io::Error) -> ConnectFailure {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => ConnectFailure::Refused,
            TimedOut => ConnectFailure::Timeout,
            ConnectionReset | ConnectionAborted => ConnectFailure::Reset,
            HostUnreachable | NetworkUnreachable | AddrNotAvailable => ConnectFailure::Unreachable,
            _ => ConnectFailure::Other,
        }
    }
}

/// Why `accept` failed on a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum AcceptFailure {
    /// EMFILE / ENFILE: out of file descriptors.
    FileLimit,
    /// ENOBUFS / ENOMEM.
    Memory,
    /// ECONNABORTED and friends: the client gave up before we accepted.
    Aborted,
    Other,
}

/// How a TLS handshake on a listener ended, for `sluice_tls_handshakes_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum HandshakeResult {
    Success,
    Timeout,
    /// Not TLS, or broken TLS: garbage, plain HTTP, a malformed message.
    #[strum(serialize = "protocol_error")]
    Protocol,
    /// A client certificate missing (when required) or not trusted.
    ClientCertificate,
    /// No common version, cipher suite or ALPN protocol.
    Incompatible,
    /// The client refused sluice's certificate (unknown CA, expired, wrong name): the
    /// most common failure after a certificate change.
    CertificateRejected,
    /// The client closed or reset the connection mid-handshake, or another failure.
    Aborted,
}

/// Which way relayed bytes went, for `sluice_bytes_total{direction}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Direction {
    ClientToBackend,
    BackendToClient,
}

/// A backend's admin state, set by an operator through the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum AdminState {
    /// Takes new connections (if healthy and weighted).
    Ready,
    /// No new connections; open ones continue.
    Drain,
    /// No new connections, health checks paused.
    Maint,
}

/// How a control socket request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum CtlResult {
    /// Done (or, for a read, answered).
    Ok,
    /// Malformed JSON, a bad value, a body over the limit.
    BadRequest,
    /// TCP without the right bearer token.
    Unauthorized,
    /// An unknown route, upstream or backend.
    NotFound,
    /// A GET to a mutation or a POST to a read.
    MethodNotAllowed,
    /// The operation was valid but failed (a reload refused by the config check).
    Failed,
}

/// How one resolution of a backend name ended (`control/discovery.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, VariantArray, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum ResolutionResult {
    /// Records came back.
    Ok,
    /// NXDOMAIN, or the name exists with no record of the type asked.
    Empty,
    /// Timeout, SERVFAIL, refused, no nameserver reachable: the last good set is kept.
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<L: Label + EnumCount + std::fmt::Debug>(expected: &[&str]) {
        assert_eq!(L::VARIANTS.len(), L::COUNT);
        for (i, v) in L::VARIANTS.iter().enumerate() {
            assert_eq!(v.index(), i, "{v:?} indexes the slot of another value");
        }
        let texts: Vec<&str> = L::VARIANTS.iter().map(|v| (*v).into()).collect();
        assert_eq!(texts, expected);
    }

    /// The exported texts are an interface (dashboards, alerts): a rename shows here.
    #[test]
    fn labels_index_their_arrays_and_keep_their_texts() {
        check::<RejectReason>(&[
            "upstream_unavailable",
            "no_healthy_backend",
            "queue_full",
            "queue_timeout",
            "client_left",
            "tls_handshake",
            "proxy_protocol",
            "client_hello",
            "no_route",
            "denied",
            "client_limit",
            "client_rate",
        ]);
        check::<End>(&[
            "closed",
            "client_reset",
            "backend_reset",
            "idle_timeout",
            "max_lifetime",
            "backend_removed",
            "backend_closed",
            "shutdown",
            "denied",
        ]);
        check::<CheckResult>(&["success", "failure", "timeout"]);
        check::<ConnectFailure>(&["refused", "timeout", "reset", "unreachable", "tls", "other"]);
        check::<AcceptFailure>(&["file_limit", "memory", "aborted", "other"]);
        check::<HandshakeResult>(&[
            "success",
            "timeout",
            "protocol_error",
            "client_certificate",
            "incompatible",
            "certificate_rejected",
            "aborted",
        ]);
        check::<Direction>(&["client_to_backend", "backend_to_client"]);
        check::<AdminState>(&["ready", "drain", "maint"]);
        check::<CtlResult>(&[
            "ok",
            "bad_request",
            "unauthorized",
            "not_found",
            "method_not_allowed",
            "failed",
        ]);
        check::<ResolutionResult>(&["ok", "empty", "error"]);
    }
}
