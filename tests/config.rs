//! Config errors: every invalid case parsed in-process by `Config::parse`, which must
//! point at its line and column and say what is wrong; and `sluice check` / `sluice run`
//! end to end on a few files, for their exit codes and the `file:line:col` they print.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use sluice::config::Config;

const LISTENER: &str =
    "[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:7000\"]\nupstream = \"app\"\n";
const UPSTREAM: &str =
    "[[upstream]]\nname = \"app\"\n[[upstream.backend]]\naddress = \"127.0.0.1:8000\"\n";

/// An invalid config: its text, the `(line, column)` its error points at, and a
/// fragment of what the error says.
struct Invalid {
    name: &'static str,
    text: String,
    at: (usize, usize),
    says: &'static str,
}

fn invalid(
    name: &'static str,
    text: impl Into<String>,
    at: (usize, usize),
    says: &'static str,
) -> Invalid {
    Invalid {
        name,
        text: text.into(),
        at,
        says,
    }
}

/// `UPSTREAM` with `extra` lines after its name (line 7 of LISTENER + UPSTREAM).
fn with_upstream_keys(extra: &str) -> String {
    format!("{LISTENER}{UPSTREAM}").replace(
        "name = \"app\"\n[[",
        &format!("name = \"app\"\n{extra}\n[["),
    )
}

/// LISTENER with `extra` after its keys (from line 5), then UPSTREAM.
fn with_listener_keys(extra: &str) -> String {
    format!("{LISTENER}{extra}\n{UPSTREAM}")
}

/// LISTENER + UPSTREAM and a `[runtime]` table with `keys` (from line 10).
fn with_runtime(keys: &str) -> String {
    format!("{LISTENER}{UPSTREAM}[runtime]\n{keys}\n")
}

/// Every invalid config, one per way of being wrong.
fn invalid_configs() -> Vec<Invalid> {
    vec![
        invalid(
            "unknown_key",
            "[[listener]]\nname = \"front\"\nbnd = [\"127.0.0.1:7000\"]\nupstream = \"app\"\n",
            (3, 1),
            "unknown field `bnd`, expected one of `name`, `bind`",
        ),
        invalid(
            "unknown_top_level_table",
            format!("{LISTENER}{UPSTREAM}\n[metrics]\nbind = \"127.0.0.1:1\"\n"),
            (10, 2),
            "unknown field `metrics`",
        ),
        invalid(
            "duplicate_listener_name",
            format!(
                "{LISTENER}\n[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:7001\"]\nupstream = \"app\"\n{UPSTREAM}"
            ),
            (7, 8),
            "duplicate listener name \"front\"",
        ),
        invalid(
            "duplicate_upstream_name",
            format!("{LISTENER}{UPSTREAM}{UPSTREAM}"),
            (10, 8),
            "duplicate upstream name \"app\"",
        ),
        invalid(
            "listener_naming_a_missing_upstream",
            format!("{}{UPSTREAM}", LISTENER.replace("\"app\"", "\"ap\"")),
            (4, 12),
            "names upstream \"ap\", which is not defined; expected one of [\"app\"]",
        ),
        invalid(
            "upstream_without_backends",
            format!("{LISTENER}\n[[upstream]]\nname = \"app\"\nretries = 1\n"),
            (7, 8),
            "upstream \"app\" has no backends",
        ),
        invalid(
            "unparsable_listener_address_points_at_the_element",
            format!(
                "{}{UPSTREAM}",
                LISTENER.replace(
                    "[\"127.0.0.1:7000\"]",
                    "[\"127.0.0.1:7000\", \"localhost:7001\"]"
                )
            ),
            (3, 27),
            "invalid address \"localhost:7001\": expected an IP address and port",
        ),
        invalid(
            "unparsable_backend_address",
            format!(
                "{LISTENER}{}",
                UPSTREAM.replace("127.0.0.1:8000", "127.0.0.1")
            ),
            (8, 11),
            "invalid address \"127.0.0.1\"",
        ),
        invalid(
            "backend_name_without_port",
            format!(
                "{LISTENER}{}",
                UPSTREAM.replace("127.0.0.1:8000", "db.internal:")
            ),
            (8, 11),
            "invalid address \"db.internal:\": the port is missing",
        ),
        invalid(
            "backend_name_with_port_out_of_range",
            format!(
                "{LISTENER}{}",
                UPSTREAM.replace("127.0.0.1:8000", "db.internal:99999")
            ),
            (8, 11),
            "port 99999 is out of range (1 to 65535)",
        ),
        invalid(
            "backend_name_with_a_space",
            format!(
                "{LISTENER}{}",
                UPSTREAM.replace("127.0.0.1:8000", "db internal:5432")
            ),
            (8, 11),
            "' ' is not allowed in a host name",
        ),
        invalid(
            "backend_name_twice",
            format!(
                "{LISTENER}{UPSTREAM}[[upstream.backend]]\naddress = \"a.internal:1\"\n[[upstream.backend]]\naddress = \"a.internal:1\"\n"
            ),
            (12, 11),
            "backend a.internal:1 appears twice in upstream \"app\"",
        ),
        invalid(
            "srv_name_with_a_space",
            with_upstream_keys("discover = { srv = \"_pg._tcp.db svc\" }"),
            (7, 20),
            "invalid SRV name \"_pg._tcp.db svc\"",
        ),
        invalid(
            "discover_without_srv",
            with_upstream_keys("discover = { a = \"x\" }"),
            (7, 14),
            "unknown field `a`, expected `srv`",
        ),
        invalid(
            "resolver_nameserver_not_an_ip",
            format!("{LISTENER}{UPSTREAM}[resolver]\nnameservers = [\"dns.local\"]\n"),
            (10, 16),
            "invalid nameserver \"dns.local\"",
        ),
        invalid(
            "resolver_zero_timeout",
            format!("{LISTENER}{UPSTREAM}[resolver]\ntimeout = \"0s\"\n"),
            (10, 11),
            "`timeout` must be greater than zero",
        ),
        invalid(
            "resolver_zero_attempts",
            format!("{LISTENER}{UPSTREAM}[resolver]\nattempts = 0\n"),
            (10, 12),
            "`attempts` must be at least 1",
        ),
        invalid(
            "resolver_max_interval_below_min",
            format!(
                "{LISTENER}{UPSTREAM}[resolver]\nmin_interval = \"10s\"\nmax_interval = \"1s\"\n"
            ),
            (11, 16),
            "`max_interval` must not be below `min_interval`",
        ),
        invalid(
            "address_bound_twice",
            format!(
                "{}{UPSTREAM}",
                LISTENER.replace(
                    "[\"127.0.0.1:7000\"]",
                    "[\"127.0.0.1:7000\", \"127.0.0.1:7000\"]"
                )
            ),
            (3, 27),
            "address 127.0.0.1:7000 is bound twice",
        ),
        invalid(
            "unparsable_duration",
            format!("drain_timeout = \"10 seconds\"\n{LISTENER}{UPSTREAM}"),
            (1, 17),
            "invalid duration \"10 seconds\": expected a whole number with a unit",
        ),
        invalid(
            "unparsable_upstream_duration",
            format!("{LISTENER}{UPSTREAM}").replace(
                "name = \"app\"\n[[",
                "name = \"app\"\nconnect_timeout = 3\n[[",
            ),
            (7, 19),
            "invalid type: integer `3`, expected a string",
        ),
        invalid(
            "zero_timeout_is_refused",
            format!("{LISTENER}{UPSTREAM}").replace(
                "name = \"app\"\n[[",
                "name = \"app\"\nidle_timeout = \"0s\"\n[[",
            ),
            (7, 16),
            "`idle_timeout` must be greater than zero",
        ),
        invalid(
            "zero_upgrade_timeout_is_refused",
            format!("upgrade_timeout = \"0s\"\n{LISTENER}{UPSTREAM}"),
            (1, 19),
            "`upgrade_timeout` must be greater than zero",
        ),
        invalid(
            "weight_out_of_range",
            format!("{LISTENER}{UPSTREAM}weight = 1001\n"),
            (9, 10),
            "`weight` must be between 0 and 1000",
        ),
        invalid(
            "missing_required_key",
            "[[listener]]\nname = \"front\"\nupstream = \"app\"\n",
            (1, 1),
            "missing field `bind`",
        ),
        invalid(
            "toml_syntax_error",
            "[[listener]\nname = \"front\"\n",
            (1, 12),
            "expected `]`",
        ),
        invalid(
            "unknown_balance_algorithm",
            with_upstream_keys("balance = \"fastest\""),
            (7, 11),
            "unknown variant `fastest`, expected one of `round_robin`, `least_connections`, `power_of_two`, `random`, `maglev`",
        ),
        invalid(
            "health_check_timeout_longer_than_interval",
            with_upstream_keys("health_check = { interval = \"1s\", timeout = \"2s\" }"),
            (7, 16),
            "health_check `timeout` must not exceed its `interval`",
        ),
        invalid(
            "health_check_rise_zero",
            with_upstream_keys("health_check = { rise = 0 }"),
            (7, 25),
            "`rise` must be at least 1",
        ),
        invalid(
            "unknown_key_in_queue",
            with_upstream_keys("queue = { size = 5 }"),
            (7, 11),
            "unknown field `size`, expected `max` or `timeout`",
        ),
        invalid(
            "max_connections_per_backend_zero",
            with_upstream_keys("max_connections_per_backend = 0"),
            (7, 31),
            "`max_connections_per_backend` must be at least 1",
        ),
        invalid(
            "lifetime_jitter_without_lifetime",
            with_upstream_keys("max_lifetime_jitter = \"1m\""),
            (7, 23),
            "`max_lifetime_jitter` needs `max_lifetime`",
        ),
        invalid(
            "an_untrusted_network_that_is_not_a_cidr",
            format!(
                "{LISTENER}proxy_protocol = {{ trusted = [\"10.0.0.0/8\", \"10.0.0.0/33\"] }}\n{UPSTREAM}"
            ),
            (5, 45),
            "invalid network \"10.0.0.0/33\"",
        ),
        invalid(
            "tls_and_passthrough_routes_on_one_listener",
            format!(
                "{LISTENER}tls = {{ certificates = [{{ cert = \"a.pem\", key = \"a.key\" }}] }}\n[[listener.route]]\nsni = [\"a.test\"]\nupstream = \"app\"\n{UPSTREAM}"
            ),
            (5, 7),
            "not both",
        ),
        invalid(
            "a_session_cache_too_large",
            format!(
                "{LISTENER}tls = {{ certificates = [{{ cert = \"a.pem\", key = \"a.key\" }}], session_cache_size = 2000000 }}\n{UPSTREAM}"
            ),
            (5, 82),
            "`session_cache_size` must be at most 1000000",
        ),
        invalid(
            "a_bad_server_name_in_a_route",
            format!(
                "[[listener]]\nname = \"sni\"\nbind = [\"127.0.0.1:7000\"]\n[[listener.route]]\nsni = [\"ok.test\", \"*.*.bad\"]\nupstream = \"app\"\n{UPSTREAM}"
            ),
            (5, 19),
            "invalid server name \"*.*.bad\"",
        ),
        invalid(
            "a_listener_without_upstream_or_routes",
            format!("[[listener]]\nname = \"lost\"\nbind = [\"127.0.0.1:7000\"]\n{UPSTREAM}"),
            (2, 8),
            "has no `upstream`",
        ),
        invalid(
            "upstream_tls_without_a_ca",
            format!("{LISTENER}{UPSTREAM}[upstream.tls]\nsni = \"db.internal\"\n"),
            (9, 1),
            "needs `ca`",
        ),
        invalid(
            "unknown_runtime_mode",
            with_runtime("mode = \"per_cpu\""),
            (10, 8),
            "unknown variant `per_cpu`, expected `multi_thread` or `per_core`",
        ),
        invalid(
            "unknown_key_in_runtime",
            with_runtime("workers = 2"),
            (10, 1),
            "unknown field `workers`, expected `mode` or `worker_threads`",
        ),
        invalid(
            "too_many_worker_threads",
            with_runtime("worker_threads = 5000"),
            (10, 18),
            "`worker_threads` must be between 0 (one per CPU core) and 1024",
        ),
        invalid(
            "negative_worker_threads",
            with_runtime("worker_threads = -1"),
            (10, 18),
            "invalid value: integer `-1`, expected u64",
        ),
        invalid(
            "splice_that_is_not_a_boolean",
            format!("{LISTENER}{UPSTREAM}[relay]\nsplice = \"yes\"\n"),
            (10, 10),
            "expected a boolean",
        ),
        invalid(
            "unknown_key_in_relay",
            format!("{LISTENER}{UPSTREAM}[relay]\nbuffer = 4096\n"),
            (10, 1),
            "unknown field `buffer`, expected `splice`",
        ),
        invalid("an_empty_file_is_invalid", "", (1, 1), "no [[listener]]"),
        invalid(
            "allow_with_host_bits",
            with_listener_keys("allow = [\"10.0.0.1/8\"]"),
            (5, 10),
            "host bits are set after the prefix; the network is 10.0.0.0/8",
        ),
        invalid(
            "deny_prefix_over_128",
            with_listener_keys("deny = [\"::/129\"]"),
            (5, 9),
            "prefix length 129 is over 128",
        ),
        invalid(
            "deny_not_a_network",
            with_listener_keys("deny = [\"10.0.0.0/8\", \"db.internal\"]"),
            (5, 23),
            "invalid `deny` entry \"db.internal\"",
        ),
        invalid(
            "empty_allow",
            with_listener_keys("allow = []"),
            (5, 9),
            "empty `allow` would refuse every client",
        ),
        invalid(
            "client_rate_zero",
            with_listener_keys("client_rate = { per_second = 0 }"),
            (5, 30),
            "`client_rate.per_second` must be above 0",
        ),
        invalid(
            "client_burst_below_one",
            with_listener_keys("client_rate = { per_second = 5, burst = 0 }"),
            (5, 41),
            "`client_rate.burst` must be at least 1",
        ),
        invalid(
            "client_ipv6_prefix_over_128",
            with_listener_keys("client_ipv6_prefix = 129"),
            (5, 22),
            "`client_ipv6_prefix` 129 is out of range",
        ),
        invalid(
            "client_ipv4_prefix_over_32",
            with_listener_keys("client_ipv4_prefix = 33"),
            (5, 22),
            "from 0 to 32",
        ),
        invalid(
            "max_connections_per_client_zero",
            with_listener_keys("max_connections_per_client = 0"),
            (5, 30),
            "`max_connections_per_client` must be at least 1",
        ),
        invalid(
            "client_table_size_zero",
            with_listener_keys("client_table_size = 0"),
            (5, 21),
            "`client_table_size` must be from 1",
        ),
        invalid(
            "slow_start_zero",
            with_upstream_keys("slow_start = \"0s\""),
            (7, 14),
            "`slow_start` must be greater than zero",
        ),
    ]
}

/// What is wrong with how `Config::parse` refused `case`, if anything. Only the error's
/// text is read, as `sluice check` prints it: the error type is the library's business.
fn refused_as_expected(case: &Invalid, path: &Path) -> Result<(), String> {
    let shown = match Config::parse(&case.text, path) {
        Ok(_) => return Err("accepted".to_string()),
        Err(e) => e.to_string(),
    };
    let (line, col) = case.at;
    let at = format!("{}:{line}:{col}: ", path.display());
    if !shown.starts_with(&at) {
        return Err(format!("expected {at} in:\n{shown}"));
    }
    if !shown.contains(case.says) {
        return Err(format!("expected {:?} in:\n{shown}", case.says));
    }
    // The offending line is shown with a caret under the column.
    let offending = case.text.lines().nth(line - 1).unwrap_or("");
    if !shown.contains(&format!("{line} | {offending}")) {
        return Err(format!("the line is not shown:\n{shown}"));
    }
    Ok(())
}

#[test]
fn every_invalid_config_is_refused_at_its_line_and_column_saying_why() {
    let path = Path::new("/etc/sluice/sluice.toml");
    let failures: Vec<String> = invalid_configs()
        .iter()
        .filter_map(|case| {
            refused_as_expected(case, path)
                .err()
                .map(|why| format!("{}: {why}", case.name))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---- end to end: `sluice check` and `sluice run` ------------------------------------

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .expect("run sluice")
}

/// Writes `text` to a file named `name` and runs `sluice check` on it.
fn check(name: &str, text: &str) -> (Option<i32>, String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let out = sluice(&["check", path.to_str().unwrap()]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    (out.status.code(), stderr, path, dir)
}

/// Asserts that `sluice check` refuses `text` with exit 64 and an error at `line:col`
/// saying `what`.
fn assert_invalid(text: &str, line: usize, col: usize, what: &str) {
    let (code, stderr, path, _dir) = check("sluice.toml", text);
    assert_eq!(code, Some(64), "stderr: {stderr}");
    let at = format!("{}:{line}:{col}: ", path.display());
    assert!(
        stderr.starts_with(&format!("error: {at}")),
        "expected {at} in:\n{stderr}"
    );
    assert!(stderr.contains(what), "expected {what:?} in:\n{stderr}");
    // The offending line is shown with a caret under the column.
    let shown = text.lines().nth(line - 1).unwrap();
    assert!(stderr.contains(&format!("{line} | {shown}")), "{stderr}");
}

#[test]
fn a_valid_config_passes() {
    let (code, stderr, _, _dir) = check("ok.toml", &format!("{LISTENER}{UPSTREAM}"));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn every_config_in_the_repository_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files = vec![
        root.join("sluice.toml"),
        root.join("../deploy/kubernetes/sluice.toml"),
    ];
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "toml"))
    {
        let out = sluice(&["check", f.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_runtime_table_passes() {
    for mode in ["per_core", "multi_thread"] {
        let text = with_runtime(&format!("mode = \"{mode}\"\nworker_threads = 2"));
        let (code, stderr, _, _dir) = check("ok.toml", &text);
        assert_eq!(code, Some(0), "{mode}: {stderr}");
    }
}

#[test]
fn unknown_key() {
    let text = "[[listener]]\nname = \"front\"\nbnd = [\"127.0.0.1:7000\"]\nupstream = \"app\"\n";
    assert_invalid(
        text,
        3,
        1,
        "unknown field `bnd`, expected one of `name`, `bind`",
    );
}

#[test]
fn toml_syntax_error() {
    assert_invalid("[[listener]\nname = \"front\"\n", 1, 12, "expected `]`");
}

#[test]
fn an_empty_file_is_invalid() {
    let (code, stderr, _, _dir) = check("empty.toml", "");
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("empty.toml:1:1: no [[listener]]"),
        "{stderr}"
    );
}

#[test]
fn missing_file() {
    let out = sluice(&["check", "/nonexistent/sluice.toml"]);
    assert_eq!(
        out.status.code(),
        Some(66),
        "EX_NOINPUT, not a config error"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("/nonexistent/sluice.toml: cannot read config"),
        "{stderr}"
    );
}

#[test]
fn a_missing_certificate_file_is_named() {
    let text = format!(
        "{LISTENER}tls = {{ certificates = [{{ cert = \"missing.pem\", key = \"missing.key\" }}] }}\n{UPSTREAM}"
    );
    let (code, stderr, path, _dir) = check("sluice.toml", &text);
    assert_eq!(code, Some(64), "{stderr}");
    // Resolved against the config file's directory, and reported at the key naming it.
    let expected = path.parent().unwrap().join("missing.pem");
    let named = format!(
        "{}:5:34: {}: cannot read",
        path.display(),
        expected.display()
    );
    assert!(stderr.contains(&named), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_names_the_key_of_a_missing_certificate_and_says_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{LISTENER}tls = {{ certificates = [{{ cert = \"missing.pem\", key = \"missing.key\" }}] }}\n{UPSTREAM}"
    );
    std::fs::write(&path, text).unwrap();
    let out = Sluice::with_file(dir, path.clone()).start_fails().await;
    assert_eq!(out.status.code(), Some(64), "{}", out.stderr);
    let named = format!("{}:7:34: ", path.display());
    assert_eq!(out.stderr.matches(&named).count(), 1, "{}", out.stderr);
    assert!(!out.stdout.contains("missing.pem"), "once: {}", out.stdout);
    assert!(
        !out.stdout.contains("listening"),
        "nothing is bound before the certificates load: {}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_invalid_config_with_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "drain_timeout = \"soon\"\n").unwrap();
    let out = Sluice::with_file(dir, path).start_fails().await;
    assert_eq!(out.status.code(), Some(64));
    assert!(
        out.stderr.contains("bad.toml:1:17: invalid duration"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_1_when_a_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let backend = "127.0.0.1:8000".parse().unwrap();
    let fixture = Fixture::front(&[backend]).bind(&[&format!("127.0.0.1:{port}")]);

    let out = Sluice::with(fixture).start_fails().await;

    assert_eq!(out.status.code(), Some(1));
    let error = format!("cannot bind listener \"front\" to 127.0.0.1:{port}");
    assert!(out.stderr.contains(&error), "{}", out.stderr);
    assert!(!out.stdout.contains(&error), "said once: {}", out.stdout);
}
