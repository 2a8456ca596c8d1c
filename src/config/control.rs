//! The `[control]` table: the control socket that `sluice ctl` talks to (runtime
//! drain, maint, weight, readiness, reload). Absent: no control socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::address;

/// Where the control socket is created when `[control]` names no `socket`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/sluice/ctl.sock";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    socket: Option<Spanned<PathBuf>>,
    tcp: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
    state_file: Option<Spanned<PathBuf>>,
}

/// The control socket, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Control {
    /// The Unix socket, created mode 0600 at start.
    pub socket: PathBuf,
    /// A loopback TCP address that also serves the control routes, to a bearer token.
    pub tcp: Option<SocketAddr>,
    /// Holds the bearer token; required with `tcp`.
    pub token_file: Option<PathBuf>,
    /// Where runtime overrides are kept across restarts; `None`: they last until exit.
    pub state_file: Option<PathBuf>,
}

impl RawControl {
    pub(super) fn validate(self, config: &Path) -> Result<Control, Invalid> {
        let dir = config.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
        let non_empty = |p: Spanned<PathBuf>, key: &str| -> Result<PathBuf, Invalid> {
            if p.get_ref().as_os_str().is_empty() {
                return Err((p.span(), format!("`{key}` must not be empty")));
            }
            Ok(resolve(p.into_inner()))
        };
        let socket = match self.socket {
            Some(s) => non_empty(s, "socket")?,
            None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
        };
        let tcp = match &self.tcp {
            None => None,
            Some(t) => {
                let a = address(t)?;
                if !a.ip().is_loopback() {
                    return Err((
                        t.span(),
                        format!(
                            "`tcp` must be a loopback address (127.0.0.1 or [::1]), not {a}: the control socket changes what sluice runs"
                        ),
                    ));
                }
                Some(a)
            }
        };
        let token_file = self
            .token_file
            .map(|t| non_empty(t, "token_file"))
            .transpose()?;
        if let (Some(t), None) = (&self.tcp, &token_file) {
            return Err((
                t.span(),
                "`tcp` needs a `token_file`: the TCP control socket is refused without a bearer token"
                    .to_string(),
            ));
        }
        let state_file = self
            .state_file
            .map(|s| non_empty(s, "state_file"))
            .transpose()?;
        Ok(Control {
            socket,
            tcp,
            token_file,
            state_file,
        })
    }
}
