//! The outcome of the last config load (the start or a reload), kept for whoever
//! reports it: the status page (`/`, `/status.json`) and the control socket's reload
//! command. One small serde type, so every reader reports it the same way.
//!
//! Written only by the control loop (`apply.rs`), read by the admin endpoint: an
//! `ArcSwap`, so a reader never waits for a reload and a reload never waits for a reader.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::ConfigError;
use crate::control::signals::Trigger;

/// What started a config load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Start,
    /// The config file (or a TLS file it names) changed.
    File,
    /// SIGHUP.
    Signal,
    /// `sluice ctl reload`.
    Ctl,
}

impl From<Trigger> for Cause {
    fn from(t: Trigger) -> Cause {
        match t {
            Trigger::File => Cause::File,
            Trigger::Signal => Cause::Signal,
            Trigger::Ctl => Cause::Ctl,
        }
    }
}

/// How one config load ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum LoadResult {
    /// Applied as `generation`; `changes` is the diff's one-line summary.
    Applied { generation: u64, changes: String },
    /// Read and valid, but nothing a reload applies changed: `generation` stays.
    Unchanged { generation: u64 },
    /// Refused; the running config (still `generation`) is unchanged.
    Failed {
        generation: u64,
        /// The whole error as logged (for a config error, `file:line:col: message`
        /// and the offending line).
        error: String,
        /// Where in the config file, when the error points at a place in it.
        location: Option<Location>,
    },
}

/// A place in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

/// One config load: when, what asked for it, how it ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// Unix time (seconds).
    pub at: f64,
    pub cause: Cause,
    #[serde(flatten)]
    pub result: LoadResult,
}

impl Outcome {
    pub fn new(cause: Cause, result: LoadResult) -> Outcome {
        Outcome {
            at: crate::metrics::unix_now(),
            cause,
            result,
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self.result, LoadResult::Failed { .. })
    }
}

impl LoadResult {
    /// A refused load of `generation` from an error's text.
    pub fn failed(generation: u64, error: &str) -> LoadResult {
        LoadResult::Failed {
            generation,
            error: error.to_string(),
            location: None,
        }
    }

    /// A refused load of `generation` from a config error, with its place in the file.
    pub fn invalid(generation: u64, e: &ConfigError) -> LoadResult {
        let location = match e {
            ConfigError::Invalid(l) => Some(Location {
                file: display(&l.path),
                line: l.line,
                column: l.column,
            }),
            ConfigError::Read { .. } => None,
        };
        LoadResult::Failed {
            generation,
            error: e.to_string(),
            location,
        }
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// The last load's outcome, shared by its writer and its readers.
pub struct LastLoad(ArcSwap<Outcome>);

impl LastLoad {
    pub fn new(first: Outcome) -> LastLoad {
        LastLoad(ArcSwap::from_pointee(first))
    }

    pub fn set(&self, outcome: Outcome) {
        self.0.store(Arc::new(outcome));
    }

    pub fn get(&self) -> Arc<Outcome> {
        self.0.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_error_keeps_its_place_and_serializes_flat() {
        let text = "drain_timeout = 5\n";
        let e = crate::config::Config::parse(text, Path::new("/etc/sluice/sluice.toml"))
            .expect_err("an invalid config");
        let o = Outcome::new(Cause::File, LoadResult::invalid(3, &e));
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["cause"], "file");
        assert_eq!(json["result"], "failed");
        assert_eq!(json["generation"], 3);
        assert_eq!(json["location"]["file"], "/etc/sluice/sluice.toml");
        assert_eq!(json["location"]["line"], 1);
        assert!(
            json["error"]
                .as_str()
                .unwrap()
                .starts_with("/etc/sluice/sluice.toml:1:"),
            "{json}"
        );
        assert!(o.failed());
    }
}
