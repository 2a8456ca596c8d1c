//! `sluice ctl`: the control socket's client. One request per run over the Unix socket
//! (or loopback TCP with a bearer token), a table by default or the JSON as answered
//! with `--json`, and an exit status a script can test.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::config::{Config, DEFAULT_CONTROL_SOCKET};

/// Done.
pub const EXIT_OK: u8 = 0;
/// The operation failed (a reload refused: the error, with file:line:col, on stderr).
pub const EXIT_FAILED: u8 = 1;
/// The request was refused as invalid (a bad value, an unknown state).
pub const EXIT_BAD_REQUEST: u8 = 64;
/// Unknown upstream or backend (the error names the ones that exist).
pub const EXIT_NOT_FOUND: u8 = 3;
/// Not permitted: no access to the socket, or a missing or wrong token.
pub const EXIT_NOT_PERMITTED: u8 = 4;
/// sluice is not running there (no socket, nobody listening), or did not answer.
pub const EXIT_NOT_RUNNING: u8 = 5;

/// For `--help`; the README lists the same.
pub const EXIT_CODES: &str = "Exit status:
  0    done
  1    the operation failed (a reload refused, an upgrade failed: the error on stderr)
  2    the command line is wrong
  3    unknown upstream or backend (the error lists the ones that exist)
  4    not permitted (no access to the socket, missing or wrong token)
  5    sluice is not running there (no socket, nobody listening, no answer)
  64   the request was refused as invalid (a bad weight or duration)";

/// The longest a request may take (a reload loads certificates; it says if it is slow).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
/// The largest answer read: the backend list of a very large config.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

#[derive(Args)]
pub struct CtlArgs {
    /// The control socket; default: the `[control] socket` of --config, else /run/sluice/ctl.sock.
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Read the socket's path from this config file's `[control]` table.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Use the loopback TCP control address instead of the Unix socket (needs --token-file).
    #[arg(long, value_name = "ADDRESS", global = true, requires = "token_file")]
    tcp: Option<std::net::SocketAddr>,
    /// The bearer token's file, for --tcp.
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Print the answer as JSON, as the control socket sent it.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// List upstreams and backends: health, admin state, weights, connections, queue.
    Backends,
    /// Put a backend back into service (admin state ready).
    Ready { upstream: String, backend: String },
    /// No new connections to a backend; open ones continue.
    Drain {
        upstream: String,
        backend: String,
        /// Close the connections still open after this long (e.g. 30s).
        #[arg(long, value_name = "DURATION")]
        close_after: Option<String>,
        /// Close the open connections now.
        #[arg(long)]
        close: bool,
    },
    /// No new connections and health checks paused.
    Maint {
        upstream: String,
        backend: String,
        /// Close the open connections now.
        #[arg(long)]
        close: bool,
    },
    /// Set a backend's weight (0: no new connections by balancing); `config` for the configured one.
    Weight {
        upstream: String,
        backend: String,
        weight: String,
    },
    /// Drop a backend's overrides: ready, with its configured weight.
    Clear { upstream: String, backend: String },
    /// Close a backend's open connections now; it stays in service.
    Close { upstream: String, backend: String },
    /// Fail the process's readiness: /readyz answers 503, traffic continues.
    Unready,
    /// Restore the process's readiness.
    ReadyProcess,
    /// Reload the config file; prints the generation, or the error.
    Reload,
    /// Upgrade to a new binary as SIGUSR2 does: the new process takes over the
    /// listening sockets, this one drains. Prints the new pid, or why it failed.
    Upgrade {
        /// The binary to start (default: sluice's own path, as it reads now).
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
    },
}

/// Runs one `sluice ctl` command; returns the exit status.
pub fn run(args: CtlArgs) -> u8 {
    let (method, path, body) = match request(&args.command) {
        Ok(r) => r,
        Err(message) => {
            eprintln!("error: {message}");
            return EXIT_BAD_REQUEST;
        }
    };
    let target = match target(&args) {
        Ok(t) => t,
        Err((code, message)) => {
            eprintln!("error: {message}");
            return code;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return EXIT_FAILED;
        }
    };
    let answer = runtime.block_on(async {
        tokio::time::timeout(REQUEST_TIMEOUT, send(&target, method, path, body)).await
    });
    let (status, value) = match answer {
        Err(_) => {
            eprintln!("error: sluice did not answer within {REQUEST_TIMEOUT:?}");
            return EXIT_NOT_RUNNING;
        }
        Ok(Err((code, message))) => {
            eprintln!("error: {message}");
            return code;
        }
        Ok(Ok(a)) => a,
    };
    if status != 200 {
        let message = value["error"].as_str().unwrap_or("no reason given");
        eprintln!("error: {message}");
        return match status {
            404 => EXIT_NOT_FOUND,
            401 | 403 => EXIT_NOT_PERMITTED,
            400 | 405 | 413 => EXIT_BAD_REQUEST,
            503 => EXIT_NOT_RUNNING,
            _ => EXIT_FAILED,
        };
    }
    if args.json {
        println!("{value:#}");
    } else {
        print!("{}", human(&args.command, &value));
    }
    EXIT_OK
}

/// Where to send: the Unix socket, or TCP with its token.
enum Target {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr, String),
}

fn target(args: &CtlArgs) -> Result<Target, (u8, String)> {
    if let Some(address) = args.tcp {
        // clap requires the token file with --tcp.
        let file = args.token_file.clone().unwrap_or_default();
        let text = std::fs::read_to_string(&file).map_err(|e| {
            (
                EXIT_NOT_PERMITTED,
                format!("cannot read the token file {}: {e}", file.display()),
            )
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        return Ok(Target::Tcp(address, token));
    }
    if let Some(socket) = &args.socket {
        return Ok(Target::Unix(socket.clone()));
    }
    if let Some(file) = &args.config {
        let config = Config::load(file).map_err(|e| (EXIT_FAILED, e.to_string()))?;
        return match config.control {
            Some(c) => Ok(Target::Unix(c.socket)),
            None => Err((
                EXIT_NOT_RUNNING,
                format!(
                    "{} has no [control] table: sluice runs no control socket with it",
                    file.display()
                ),
            )),
        };
    }
    Ok(Target::Unix(PathBuf::from(DEFAULT_CONTROL_SOCKET)))
}

type Body = Option<Value>;

/// The route, method and body for a command.
fn request(command: &CtlCommand) -> Result<(hyper::Method, &'static str, Body), String> {
    use hyper::Method;
    let backend = |u: &str, b: &str| json!({ "upstream": u, "backend": b });
    Ok(match command {
        CtlCommand::Backends => (Method::GET, "/v1/backends", None),
        CtlCommand::Ready {
            upstream,
            backend: b,
        } => {
            let mut v = backend(upstream, b);
            v["state"] = json!("ready");
            (Method::POST, "/v1/backend/state", Some(v))
        }
        CtlCommand::Drain {
            upstream,
            backend: b,
            close_after,
            close,
        } => {
            let mut v = backend(upstream, b);
            v["state"] = json!("drain");
            v["close"] = json!(close);
            if let Some(d) = close_after {
                v["close_after"] = json!(d);
            }
            (Method::POST, "/v1/backend/state", Some(v))
        }
        CtlCommand::Maint {
            upstream,
            backend: b,
            close,
        } => {
            let mut v = backend(upstream, b);
            v["state"] = json!("maint");
            v["close"] = json!(close);
            (Method::POST, "/v1/backend/state", Some(v))
        }
        CtlCommand::Weight {
            upstream,
            backend: b,
            weight,
        } => {
            let mut v = backend(upstream, b);
            v["weight"] = match weight.as_str() {
                "config" => Value::Null,
                w => json!(w.parse::<u32>().map_err(|_| format!(
                    "invalid weight {w:?}: expected a whole number (0 to 1000), or `config` for the configured weight"
                ))?),
            };
            (Method::POST, "/v1/backend/weight", Some(v))
        }
        CtlCommand::Clear {
            upstream,
            backend: b,
        } => (
            Method::POST,
            "/v1/backend/clear",
            Some(backend(upstream, b)),
        ),
        CtlCommand::Close {
            upstream,
            backend: b,
        } => (
            Method::POST,
            "/v1/backend/close",
            Some(backend(upstream, b)),
        ),
        CtlCommand::Unready => (
            Method::POST,
            "/v1/readiness",
            Some(json!({ "ready": false })),
        ),
        CtlCommand::ReadyProcess => (
            Method::POST,
            "/v1/readiness",
            Some(json!({ "ready": true })),
        ),
        CtlCommand::Reload => (Method::POST, "/v1/reload", Some(json!({}))),
        CtlCommand::Upgrade { binary } => (
            Method::POST,
            "/v1/upgrade",
            Some(json!({ "binary": binary })),
        ),
    })
}

/// Sends one request; the answer's status and JSON.
async fn send(
    target: &Target,
    method: hyper::Method,
    path: &str,
    body: Body,
) -> Result<(u16, Value), (u8, String)> {
    let unreachable = |what: String, e: std::io::Error| {
        let code = match e.kind() {
            std::io::ErrorKind::PermissionDenied => EXIT_NOT_PERMITTED,
            _ => EXIT_NOT_RUNNING,
        };
        (
            code,
            format!("cannot reach sluice's control socket {what}: {e}"),
        )
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "sluice")
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Target::Tcp(_, token) = target {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
    let req = req
        .body(Full::new(body))
        .map_err(|e| (EXIT_FAILED, e.to_string()))?;
    let response = match target {
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| unreachable(path.display().to_string(), e))?;
            exchange(stream, req).await?
        }
        Target::Tcp(address, _) => {
            let stream = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| unreachable(address.to_string(), e))?;
            exchange(stream, req).await?
        }
    };
    Ok(response)
}

async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> Result<(u16, Value), (u8, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let lost = |e: hyper::Error| {
        (
            EXIT_NOT_RUNNING,
            format!("the control connection failed: {e}"),
        )
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(lost)?;
    tokio::spawn(connection);
    let response = sender.send_request(req).await.map_err(lost)?;
    let status = response.status().as_u16();
    let bytes = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| (EXIT_NOT_RUNNING, format!("reading the answer failed: {e}")))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).map_err(|e| {
        (
            EXIT_FAILED,
            format!("the answer is not JSON ({e}): is that a sluice control socket?"),
        )
    })?;
    Ok((status, value))
}

/// The answer for a person.
fn human(command: &CtlCommand, v: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    match command {
        CtlCommand::Backends => table(v),
        CtlCommand::Ready { .. } | CtlCommand::Drain { .. } | CtlCommand::Maint { .. } => {
            let closed = match v["closed"].as_u64() {
                Some(n) if n > 0 => format!(", {n} connection(s) closed"),
                _ => String::new(),
            };
            format!(
                "{}/{}: {} (was {}){closed}\n",
                s(&v["upstream"]),
                s(&v["backend"]),
                s(&v["state"]),
                s(&v["before"])
            )
        }
        CtlCommand::Weight { .. } => format!(
            "{}/{}: weight {}{}\n",
            s(&v["upstream"]),
            s(&v["backend"]),
            s(&v["weight"]),
            if v["override"].is_null() {
                " (as configured)"
            } else {
                ""
            }
        ),
        CtlCommand::Clear { .. } => format!(
            "{}/{}: overrides cleared (ready, configured weight)\n",
            s(&v["upstream"]),
            s(&v["backend"])
        ),
        CtlCommand::Close { .. } => format!(
            "{}/{}: {} connection(s) closed\n",
            s(&v["upstream"]),
            s(&v["backend"]),
            s(&v["closed"])
        ),
        CtlCommand::Unready | CtlCommand::ReadyProcess => {
            if v["unready_by_operator"] == json!(true) {
                "not ready: /readyz answers 503 (sluice ctl ready-process to restore)\n".to_string()
            } else {
                format!("readiness restored: /readyz ready = {}\n", s(&v["ready"]))
            }
        }
        CtlCommand::Reload => format!("reloaded: generation {}\n", s(&v["generation"])),
        CtlCommand::Upgrade { .. } => format!(
            "upgraded: pid {} serves; this process drains and exits\n",
            s(&v["pid"])
        ),
    }
}

/// The backend list as aligned columns; `*` marks a value an operator set.
fn table(v: &Value) -> String {
    let mut rows = vec![
        [
            "UPSTREAM",
            "BACKEND",
            "HEALTH",
            "ADMIN",
            "WEIGHT",
            "CONFIGURED",
            "ACTIVE",
            "QUEUE",
            "SET BY",
        ]
        .map(String::from),
    ];
    let empty = Vec::new();
    for u in v["upstreams"].as_array().unwrap_or(&empty) {
        for b in u["backends"].as_array().unwrap_or(&empty) {
            let over = &b["override"];
            let mark = |set: bool| if set { "*" } else { "" };
            let health = match (b["health"].as_str(), b["ejected"].as_bool()) {
                (Some("up"), Some(true)) => "ejected".to_string(),
                (Some(h), _) => h.to_string(),
                _ => "-".to_string(),
            };
            rows.push([
                u["name"].as_str().unwrap_or("-").to_string(),
                b["backend"].as_str().unwrap_or("-").to_string(),
                health,
                format!(
                    "{}{}",
                    b["admin_state"].as_str().unwrap_or("-"),
                    mark(!over["state"].is_null())
                ),
                match (b["effective_weight"].as_f64(), b["weight"].as_f64()) {
                    // Slow start ramping it up: the weight balancing uses now.
                    (Some(e), Some(w)) if e < w => format!(
                        "{}{} (slow start: {e:.2})",
                        b["weight"],
                        mark(!over["weight"].is_null())
                    ),
                    _ => format!("{}{}", b["weight"], mark(!over["weight"].is_null())),
                },
                b["configured_weight"].to_string(),
                b["active"].to_string(),
                u["queue_length"].to_string(),
                over["by"].as_str().unwrap_or("").to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if v["unready_by_operator"] == json!(true) {
        out.push_str("process: not ready (sluice ctl unready): /readyz answers 503\n");
    }
    out
}
