//! The deploy files, checked with what this machine can run: systemd-analyze for the
//! unit, the Kubernetes schemas (kubernetes-validate) and yamllint for the manifests,
//! what they say read back (who reaches the admin port, which image), sluice itself for
//! the config they carry. The Dockerfile cannot be built here (no container engine); its
//! inputs are checked to exist and to be in the build context, and its built-in config
//! to fail `sluice check` with an error that says to mount one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
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
        "NotifyAccess=all",
        "--kill-whom=main --signal=SIGUSR2",
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
    assert_eq!(output.matches("passed").count(), 5, "{output}");
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
    // The upgrade path in a cluster: a new pod ready before an old one goes, and a
    // pause before SIGTERM while the Service forgets the pod.
    assert!(
        text.contains("maxUnavailable: 0"),
        "a rolling update keeps every pod until its successor is ready"
    );
    assert!(text.contains("preStop:"));
}

/// The documents of a YAML file, as JSON (PyYAML comes with kubernetes-validate).
fn documents(file: &str) -> Vec<Value> {
    let script = "import sys, json, yaml\njson.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)\n";
    let (ok, text) = run(Command::new("python3")
        .args(["-c", script])
        .arg(root().join(file)));
    assert!(ok, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The one document of `kind` named `name`.
fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name}");
    found[0]
}

/// Whether every label in `selector` (a map) is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// A Service port, or a NetworkPolicy port, that reaches the container's admin port.
fn is_admin(port: &Value) -> bool {
    ["name", "port", "targetPort"]
        .iter()
        .any(|k| port[k] == "admin" || port[k] == 9555)
}

#[test]
fn only_prometheus_reaches_the_admin_port() {
    let docs = documents("deploy/kubernetes/sluice.yaml");
    let pods = &find(&docs, "Deployment", "sluice")["spec"]["template"]["metadata"]["labels"];
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();

    // Clients: the Service for them has the app port only.
    let clients = find(&docs, "Service", "sluice");
    let ports = clients["spec"]["ports"].as_array().unwrap();
    assert!(
        !ports.iter().any(is_admin),
        "the client-facing Service exposes the admin port: {ports:?}"
    );
    assert!(ports.iter().any(|p| p["targetPort"] == "app"));

    // Prometheus: the admin port only through the headless metrics Service, which the
    // ServiceMonitor selects (and not the client-facing one).
    let metrics = find(&docs, "Service", "sluice-metrics");
    for service in &services {
        if service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(is_admin)
        {
            assert_eq!(service["metadata"]["name"], "sluice-metrics");
        }
    }
    assert_eq!(
        metrics["spec"]["clusterIP"], "None",
        "headless: pod addresses"
    );
    assert!(selects(&metrics["spec"]["selector"], pods));
    let monitor = &documents("deploy/kubernetes/servicemonitor.yaml")[0];
    let wanted = &monitor["spec"]["selector"]["matchLabels"];
    assert!(selects(wanted, &metrics["metadata"]["labels"]));
    assert!(!selects(wanted, &clients["metadata"]["labels"]));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");

    // The NetworkPolicy: it covers sluice's pods, lets anyone reach the app port, and the
    // admin port only from Prometheus's pods. A rule without `ports` opens every port.
    let policy = find(&docs, "NetworkPolicy", "sluice");
    assert!(selects(&policy["spec"]["podSelector"]["matchLabels"], pods));
    assert!(
        policy["spec"]["policyTypes"]
            .as_array()
            .unwrap()
            .contains(&Value::from("Ingress"))
    );
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let mut app_open = false;
    for rule in rules {
        let ports = rule["ports"].as_array();
        let opens_admin = ports.is_none_or(|ports| ports.iter().any(is_admin));
        let from = rule["from"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if opens_admin {
            assert!(!from.is_empty(), "the admin port open to all: {rule}");
            for peer in from {
                assert_eq!(
                    peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "prometheus",
                    "the admin port open to more than Prometheus: {peer}"
                );
                assert!(
                    peer.get("ipBlock").is_none() && peer.get("namespaceSelector").is_some(),
                    "{peer}"
                );
            }
        } else if from.is_empty() && ports.unwrap().iter().any(|p| p["port"] == "app") {
            app_open = true;
        }
    }
    assert!(app_open, "clients cannot reach the app port: {rules:?}");
}

#[test]
fn the_deployment_pins_the_image_and_pulls_it_only_when_missing() {
    let docs = documents("deploy/kubernetes/sluice.yaml");
    let container =
        &find(&docs, "Deployment", "sluice")["spec"]["template"]["spec"]["containers"][0];
    // The tag the docs and the Dockerfile's comment build (docs/operations.md).
    assert_eq!(
        container["image"],
        format!("sluice:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    let docs_text = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    for needed in [
        "kind load docker-image",
        "minikube image load",
        "docker push",
    ] {
        assert!(docs_text.contains(needed), "docs/operations.md: {needed}");
    }
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

#[test]
fn the_build_context_holds_what_the_dockerfile_copies_and_not_target() {
    // `docker build -f deploy/Dockerfile .`: the context is the repository root, and the
    // .dockerignore there applies. It lists what is let in after excluding everything.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(patterns.first(), Some(&"*"), "everything is excluded first");
    assert!(
        !patterns.iter().any(|p| p.contains("target")),
        "target/ stays out of the context"
    );
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                patterns.contains(&format!("!{src}").as_str()),
                "{src} ({line}) is not in the build context: add !{src} to .dockerignore"
            );
        }
    }
}

#[test]
fn the_image_config_is_an_example_that_fails_check_saying_to_mount_one() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(text.contains("COPY deploy/image.toml /etc/sluice/sluice.toml"));
    assert!(text.contains(r#"CMD ["run", "--config", "/etc/sluice/sluice.toml"]"#));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check")
        .arg(root().join("deploy/image.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    // The error quotes the value, so the value is the message.
    assert!(
        stderr.contains("image.toml:")
            && stderr.contains(
                "no config mounted: mount a directory with your sluice.toml at /etc/sluice"
            ),
        "{stderr}"
    );
}

#[test]
fn the_backend_example_is_a_headless_service_whose_srv_name_the_config_follows() {
    let file = root().join("deploy/kubernetes/backend.yaml");
    let (ok, output) = run(Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&file));
    assert!(ok, "kubernetes-validate:\n{output}");
    assert_eq!(output.matches("passed").count(), 2, "{output}");
    let docs = documents("deploy/kubernetes/backend.yaml");
    let service = find(&docs, "Service", "app");
    assert_eq!(
        service["spec"]["clusterIP"], "None",
        "headless: pod addresses in DNS"
    );
    let port = &service["spec"]["ports"][0];
    let set = find(&docs, "StatefulSet", "app");
    assert_eq!(
        set["spec"]["serviceName"], "app",
        "pods named app-N.app in DNS"
    );
    assert!(selects(
        &service["spec"]["selector"],
        &set["spec"]["template"]["metadata"]["labels"]
    ));
    // The ConfigMap's config follows the SRV name of that Service's named port.
    let config = Config::load(&root().join("deploy/kubernetes/sluice.toml")).unwrap();
    let wanted = format!(
        "srv:_{}._{}.{}",
        port["name"].as_str().unwrap(),
        port["protocol"].as_str().unwrap().to_lowercase(),
        service["metadata"]["name"].as_str().unwrap()
    );
    let names: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| u.discovered.iter().map(|d| d.name.to_string()))
        .collect();
    assert_eq!(names, vec![wanted]);
}
