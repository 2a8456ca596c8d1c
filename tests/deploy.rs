//! The deploy files, checked with what this machine can run: systemd-analyze for the
//! unit, the Kubernetes schemas (kubernetes-validate) and yamllint for the manifests,
//! sluice itself for the config they carry. The Dockerfile cannot be built here (no
//! container engine); its inputs are checked to exist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice::config::Config;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (make test installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("sluice.service");
    let text = std::fs::read_to_string(root().join("deploy/sluice.service")).unwrap();
    // verify checks that the binaries exist: point it at the one just built.
    std::fs::write(
        &unit,
        text.replace("/usr/local/bin/sluice", env!("CARGO_BIN_EXE_sluice")),
    )
    .unwrap();
    let (ok, output) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    // An unknown directive is only a warning with exit 0, so any output fails too.
    assert!(
        ok && output.trim().is_empty(),
        "systemd-analyze verify:\n{output}"
    );
    for needed in [
        "Type=notify",
        "ExecReload=/usr/local/bin/sluice check",
        "LimitNOFILE=",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "TimeoutStopSec=60s",
    ] {
        assert!(text.contains(needed), "{needed}");
    }
}

#[test]
fn the_kubernetes_manifests_match_the_schemas() {
    let manifests = root().join("deploy/kubernetes/sluice.yaml");
    let (ok, output) = run(Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&manifests));
    assert!(ok, "kubernetes-validate:\n{output}");
    assert_eq!(output.matches("passed").count(), 3, "{output}");
    let (ok, output) = run(Command::new("yamllint")
        .args(["-d", "relaxed"])
        .arg(root().join("deploy/kubernetes")));
    assert!(ok, "yamllint:\n{output}");
    let text = std::fs::read_to_string(&manifests).unwrap();
    assert!(
        !text.contains("subPath:"),
        "a subPath mount freezes the file: hot reload needs the directory"
    );
    assert!(text.contains("path: /readyz"));
}

#[test]
fn the_configmap_carries_the_same_valid_config_as_the_file() {
    // PyYAML comes with kubernetes-validate.
    let script = "import sys, yaml\nfor d in yaml.safe_load_all(open(sys.argv[1])):\n    if d['kind'] == 'ConfigMap':\n        sys.stdout.write(d['data']['sluice.toml'])\n";
    let (ok, embedded) = run(Command::new("python3")
        .args(["-c", script])
        .arg(root().join("deploy/kubernetes/sluice.yaml")));
    assert!(ok, "{embedded}");
    let file = root().join("deploy/kubernetes/sluice.toml");
    let from_map =
        Config::parse(&embedded, &file).unwrap_or_else(|e| panic!("the ConfigMap's config: {e}"));
    let from_file = Config::load(&file).unwrap();
    assert_eq!(
        from_map, from_file,
        "the ConfigMap and deploy/kubernetes/sluice.toml differ"
    );
    assert!(
        from_file.drain_timeout.as_secs() < 60,
        "below terminationGracePeriodSeconds"
    );
}

#[test]
fn the_dockerfile_copies_files_that_exist() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let mut copied = 0;
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root().join(src).exists(), "{src} in {line}");
            copied += 1;
        }
    }
    assert!(copied >= 4);
    assert!(text.contains("USER 10001"), "runs as a non-root user");
}
