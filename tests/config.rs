//! `sluice check` and `sluice run` on good and bad config files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LISTENER: &str =
    "[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:7000\"]\nupstream = \"app\"\n";
const UPSTREAM: &str =
    "[[upstream]]\nname = \"app\"\n[[upstream.backend]]\naddress = \"127.0.0.1:8000\"\n";

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

/// Asserts that `text` is refused with exit 64 and an error at `line:col` saying `what`.
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
fn unknown_top_level_table() {
    let text = format!("{LISTENER}{UPSTREAM}\n[metrics]\nbind = \"127.0.0.1:1\"\n");
    assert_invalid(&text, 10, 2, "unknown field `metrics`");
}

#[test]
fn duplicate_listener_name() {
    let text = format!(
        "{LISTENER}\n[[listener]]\nname = \"front\"\nbind = [\"127.0.0.1:7001\"]\nupstream = \"app\"\n{UPSTREAM}"
    );
    assert_invalid(&text, 7, 8, "duplicate listener name \"front\"");
}

#[test]
fn duplicate_upstream_name() {
    let text = format!("{LISTENER}{UPSTREAM}{UPSTREAM}");
    assert_invalid(&text, 10, 8, "duplicate upstream name \"app\"");
}

#[test]
fn listener_naming_a_missing_upstream() {
    let text = format!("{}{UPSTREAM}", LISTENER.replace("\"app\"", "\"ap\""));
    assert_invalid(
        &text,
        4,
        12,
        "names upstream \"ap\", which is not defined; expected one of [\"app\"]",
    );
}

#[test]
fn upstream_without_backends() {
    let text = format!("{LISTENER}\n[[upstream]]\nname = \"app\"\nretries = 1\n");
    assert_invalid(&text, 7, 8, "upstream \"app\" has no backends");
}

#[test]
fn unparsable_listener_address_points_at_the_element() {
    let text = format!(
        "{}{UPSTREAM}",
        LISTENER.replace(
            "[\"127.0.0.1:7000\"]",
            "[\"127.0.0.1:7000\", \"localhost:7001\"]"
        )
    );
    assert_invalid(
        &text,
        3,
        27,
        "invalid address \"localhost:7001\": expected an IP address and port",
    );
}

#[test]
fn unparsable_backend_address() {
    let text = format!(
        "{LISTENER}{}",
        UPSTREAM.replace("127.0.0.1:8000", "127.0.0.1")
    );
    assert_invalid(&text, 8, 11, "invalid address \"127.0.0.1\"");
}

#[test]
fn address_bound_twice() {
    let text = format!(
        "{}{UPSTREAM}",
        LISTENER.replace(
            "[\"127.0.0.1:7000\"]",
            "[\"127.0.0.1:7000\", \"127.0.0.1:7000\"]"
        )
    );
    assert_invalid(&text, 3, 27, "address 127.0.0.1:7000 is bound twice");
}

#[test]
fn unparsable_duration() {
    let text = format!("drain_timeout = \"10 seconds\"\n{LISTENER}{UPSTREAM}");
    assert_invalid(
        &text,
        1,
        17,
        "invalid duration \"10 seconds\": expected a whole number with a unit",
    );
}

#[test]
fn unparsable_upstream_duration() {
    let text = format!("{LISTENER}{UPSTREAM}").replace(
        "name = \"app\"\n[[",
        "name = \"app\"\nconnect_timeout = 3\n[[",
    );
    assert_invalid(&text, 7, 19, "invalid type: integer `3`, expected a string");
}

#[test]
fn zero_timeout_is_refused() {
    let text = format!("{LISTENER}{UPSTREAM}").replace(
        "name = \"app\"\n[[",
        "name = \"app\"\nidle_timeout = \"0s\"\n[[",
    );
    assert_invalid(&text, 7, 16, "`idle_timeout` must be greater than zero");
}

#[test]
fn weight_out_of_range() {
    let text = format!("{LISTENER}{UPSTREAM}weight = 1001\n");
    assert_invalid(&text, 9, 10, "`weight` must be between 0 and 1000");
}

#[test]
fn missing_required_key() {
    let text = "[[listener]]\nname = \"front\"\nupstream = \"app\"\n";
    assert_invalid(text, 1, 1, "missing field `bind`");
}

#[test]
fn toml_syntax_error() {
    assert_invalid("[[listener]\nname = \"front\"\n", 1, 12, "expected `]`");
}

#[test]
fn missing_file() {
    let out = sluice(&["check", "/nonexistent/sluice.toml"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("/nonexistent/sluice.toml: cannot read config"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_an_invalid_config_with_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "drain_timeout = \"soon\"\n").unwrap();
    let out = sluice(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("bad.toml:1:17: invalid duration")
    );
}

#[test]
fn run_exits_1_when_a_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let text = format!(
        "{}{UPSTREAM}[admin]\nbind = \"127.0.0.1:0\"\n",
        LISTENER.replace("7000", &port.to_string())
    );
    std::fs::write(&path, text).unwrap();

    let out = sluice(&["run", "--config", path.to_str().unwrap()]);

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!(
            "cannot bind listener \"front\" to 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
}

/// `UPSTREAM` with `extra` lines after its name (line 7 of LISTENER + UPSTREAM).
fn with_upstream_keys(extra: &str) -> String {
    format!("{LISTENER}{UPSTREAM}").replace(
        "name = \"app\"\n[[",
        &format!("name = \"app\"\n{extra}\n[["),
    )
}

#[test]
fn unknown_balance_algorithm() {
    assert_invalid(
        &with_upstream_keys("balance = \"fastest\""),
        7,
        11,
        "unknown variant `fastest`, expected one of `round_robin`, `least_connections`, `power_of_two`, `random`, `maglev`",
    );
}

#[test]
fn health_check_timeout_longer_than_interval() {
    assert_invalid(
        &with_upstream_keys("health_check = { interval = \"1s\", timeout = \"2s\" }"),
        7,
        16,
        "health_check `timeout` must not exceed its `interval`",
    );
}

#[test]
fn health_check_rise_zero() {
    assert_invalid(
        &with_upstream_keys("health_check = { rise = 0 }"),
        7,
        25,
        "`rise` must be at least 1",
    );
}

#[test]
fn unknown_key_in_queue() {
    assert_invalid(
        &with_upstream_keys("queue = { size = 5 }"),
        7,
        11,
        "unknown field `size`, expected `max` or `timeout`",
    );
}

#[test]
fn max_connections_per_backend_zero() {
    assert_invalid(
        &with_upstream_keys("max_connections_per_backend = 0"),
        7,
        31,
        "`max_connections_per_backend` must be at least 1",
    );
}

#[test]
fn lifetime_jitter_without_lifetime() {
    assert_invalid(
        &with_upstream_keys("max_lifetime_jitter = \"1m\""),
        7,
        23,
        "`max_lifetime_jitter` needs `max_lifetime`",
    );
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
fn an_untrusted_network_that_is_not_a_cidr() {
    let text = format!(
        "{LISTENER}proxy_protocol = {{ trusted = [\"10.0.0.0/8\", \"10.0.0.0/33\"] }}\n{UPSTREAM}"
    );
    assert_invalid(&text, 5, 45, "invalid network \"10.0.0.0/33\"");
}

#[test]
fn tls_and_passthrough_routes_on_one_listener() {
    let text = format!(
        "{LISTENER}tls = {{ certificates = [{{ cert = \"a.pem\", key = \"a.key\" }}] }}\n[[listener.route]]\nsni = [\"a.test\"]\nupstream = \"app\"\n{UPSTREAM}"
    );
    assert_invalid(&text, 5, 7, "not both");
}

#[test]
fn a_bad_server_name_in_a_route() {
    let text = "[[listener]]\nname = \"sni\"\nbind = [\"127.0.0.1:7000\"]\n[[listener.route]]\nsni = [\"ok.test\", \"*.*.bad\"]\nupstream = \"app\"\n";
    assert_invalid(
        &format!("{text}{UPSTREAM}"),
        5,
        19,
        "invalid server name \"*.*.bad\"",
    );
}

#[test]
fn a_listener_without_upstream_or_routes() {
    let text = "[[listener]]\nname = \"lost\"\nbind = [\"127.0.0.1:7000\"]\n";
    assert_invalid(&format!("{text}{UPSTREAM}"), 2, 8, "has no `upstream`");
}

#[test]
fn upstream_tls_without_a_ca() {
    let text = format!("{LISTENER}{UPSTREAM}[upstream.tls]\nsni = \"db.internal\"\n");
    assert_invalid(&text, 9, 1, "needs `ca`");
}

#[test]
fn a_missing_certificate_file_is_named() {
    let text = format!(
        "{LISTENER}tls = {{ certificates = [{{ cert = \"missing.pem\", key = \"missing.key\" }}] }}\n{UPSTREAM}"
    );
    let (code, stderr, path, _dir) = check("sluice.toml", &text);
    assert_eq!(code, Some(64), "{stderr}");
    // Resolved against the config file's directory.
    let expected = path.parent().unwrap().join("missing.pem");
    assert!(
        stderr.contains(&format!("{}: cannot read", expected.display())),
        "{stderr}"
    );
}

/// LISTENER + UPSTREAM and a `[runtime]` table with `keys` (from line 10).
fn with_runtime(keys: &str) -> String {
    format!("{LISTENER}{UPSTREAM}[runtime]\n{keys}\n")
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
fn unknown_runtime_mode() {
    assert_invalid(
        &with_runtime("mode = \"per_cpu\""),
        10,
        8,
        "unknown variant `per_cpu`, expected `multi_thread` or `per_core`",
    );
}

#[test]
fn unknown_key_in_runtime() {
    assert_invalid(
        &with_runtime("workers = 2"),
        10,
        1,
        "unknown field `workers`, expected `mode` or `worker_threads`",
    );
}

#[test]
fn too_many_worker_threads() {
    assert_invalid(
        &with_runtime("worker_threads = 5000"),
        10,
        18,
        "`worker_threads` must be between 0 (one per CPU core) and 1024",
    );
}

#[test]
fn negative_worker_threads() {
    assert_invalid(
        &with_runtime("worker_threads = -1"),
        10,
        18,
        "invalid value: integer `-1`, expected u64",
    );
}

#[test]
fn splice_that_is_not_a_boolean() {
    let text = format!("{LISTENER}{UPSTREAM}[relay]\nsplice = \"yes\"\n");
    assert_invalid(&text, 10, 10, "expected a boolean");
}

#[test]
fn unknown_key_in_relay() {
    let text = format!("{LISTENER}{UPSTREAM}[relay]\nbuffer = 4096\n");
    assert_invalid(&text, 10, 1, "unknown field `buffer`, expected `splice`");
}
