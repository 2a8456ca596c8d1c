//! `sluice ctl`, run as a user runs it: the binary with its arguments, off the test's
//! runtime (it waits for the process).

use std::path::Path;

/// What one `sluice ctl` run did.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `sluice ctl ARGS`.
pub async fn ctl_args(args: Vec<String>) -> Ran {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("ctl")
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    Ran {
        code: out.status.code().expect("an exit status, not a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `sluice ctl --socket SOCKET ARGS`.
pub async fn ctl_at(socket: &Path, args: &[&str]) -> Ran {
    let mut all = vec!["--socket".to_string(), socket.display().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    ctl_args(all).await
}
