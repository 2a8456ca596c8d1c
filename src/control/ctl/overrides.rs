//! Runtime overrides set through the control socket (admin state, weight), kept by the
//! backend *entry* as configured: its upstream's name and the address string written in
//! the config. One entry may stand for several endpoints (a DNS name resolved to many
//! addresses): an override applies to every backend of the entry. The store is applied
//! to each snapshot the control plane builds (start and every reload), so an override
//! survives reloads; an entry that leaves the config loses its override. With a
//! `state_file`, the store is written atomically after each change and read at start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::metrics::AdminState;
use crate::snapshot::Snapshot;
use crate::upstream::{Backend, Upstream};

/// A backend entry as configured: what an override is kept by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub upstream: String,
    /// The entry's `address` as the config writes it.
    pub backend: String,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.upstream, self.backend)
    }
}

/// What an operator set on one entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// `None`: ready.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "admin_text")]
    pub state: Option<AdminState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// When the admin state was last set (Unix seconds).
    #[serde(default)]
    pub since: f64,
    /// Who set it last: `uid 1000` or `token`.
    #[serde(default)]
    pub by: String,
    /// Counts changes, so a drain's `close_after` timer knows whether its drain still
    /// stands. Not kept in the state file.
    #[serde(skip)]
    pub epoch: u64,
}

impl Override {
    pub fn is_empty(&self) -> bool {
        self.state.is_none() && self.weight.is_none()
    }
}

/// The state file's content.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    overrides: Vec<Kept>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kept {
    #[serde(flatten)]
    entry: Entry,
    #[serde(flatten)]
    set: Override,
}

const STATE_FILE_VERSION: u32 = 1;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the control state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the control state file {path} is not valid: {message} (it is written by sluice; delete it to start without runtime overrides)"
    )]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write the control state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The overrides in force, by entry.
pub struct Overrides {
    set: Mutex<BTreeMap<Entry, Override>>,
    state_file: Option<PathBuf>,
    /// The next change's [`Override::epoch`]: unique across entries and their removal.
    epochs: AtomicU64,
}

impl Overrides {
    /// The store, read from `state_file` if it exists.
    pub fn load(state_file: Option<PathBuf>) -> Result<Arc<Overrides>, StateError> {
        let mut set = BTreeMap::new();
        if let Some(path) = &state_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let file: StateFile =
                        serde_json::from_str(&text).map_err(|e| StateError::Invalid {
                            path: path.clone(),
                            message: e.to_string(),
                        })?;
                    if file.version != STATE_FILE_VERSION {
                        return Err(StateError::Invalid {
                            path: path.clone(),
                            message: format!(
                                "version {} (this sluice writes {STATE_FILE_VERSION})",
                                file.version
                            ),
                        });
                    }
                    for k in file.overrides {
                        set.insert(k.entry, k.set);
                    }
                    tracing::info!(state_file = %path.display(), overrides = set.len(), "runtime overrides read from the state file");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StateError::Read {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(Arc::new(Overrides {
            set: Mutex::new(set),
            state_file,
            epochs: AtomicU64::new(1),
        }))
    }

    pub fn next_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed)
    }

    /// Each entry with its override, for `/config`.
    pub fn to_json(&self) -> serde_json::Value {
        let locked = self.lock();
        let list: Vec<serde_json::Value> = locked
            .set
            .iter()
            .map(|(e, o)| {
                serde_json::json!({
                    "upstream": e.upstream,
                    "backend": e.backend,
                    "state": o.state.map(AdminState::as_str),
                    "weight": o.weight,
                    "since": o.since,
                    "by": o.by,
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// The store, locked: every change and every snapshot build hold it, so an
    /// operator's change and a reload never interleave.
    pub fn lock(&self) -> Locked<'_> {
        Locked {
            // Each change completes under the lock before the state is read again, so
            // a poisoned lock holds a consistent map.
            set: self.set.lock().unwrap_or_else(|p| p.into_inner()),
            state_file: self.state_file.as_deref(),
        }
    }
}

/// The store while locked.
pub struct Locked<'a> {
    pub set: MutexGuard<'a, BTreeMap<Entry, Override>>,
    state_file: Option<&'a Path>,
}

impl Locked<'_> {
    /// Sets each backend of `snapshot` to what the store says (ready and the configured
    /// weight where it says nothing), after dropping the entries the config no longer
    /// has. Called for every snapshot before it is swapped in.
    pub fn apply(&mut self, snapshot: &Snapshot) {
        let before = self.set.len();
        self.set.retain(|entry, _| {
            let kept = snapshot
                .upstream(&entry.upstream)
                .is_some_and(|u| !backends_of(u, &entry.backend).is_empty());
            if !kept {
                tracing::info!(backend = %entry, "runtime override dropped: the backend is no longer in the config");
            }
            kept
        });
        for upstream in &snapshot.upstreams {
            let mut weights_changed = false;
            for b in upstream.backends() {
                let entry = entry_of(upstream, b);
                let set = self.set.get(&entry).cloned().unwrap_or_default();
                weights_changed |= b.weight_override() != set.weight;
                set_backend(b, &set);
            }
            if weights_changed {
                upstream.pool.rebalance();
            }
        }
        if self.set.len() != before
            && let Err(e) = self.save()
        {
            tracing::error!(error = %e, "runtime overrides not saved");
        }
    }

    /// Writes the store to the state file, if there is one: a temporary file beside it,
    /// synced, then renamed over it, so a crash leaves the old file or the new one.
    /// Written in place on the control thread, under the lock, so that writes land in
    /// the order of the changes; it runs only when an operator changes something.
    pub fn save(&self) -> Result<(), StateError> {
        let Some(path) = self.state_file else {
            return Ok(());
        };
        let file = StateFile {
            version: STATE_FILE_VERSION,
            overrides: self
                .set
                .iter()
                .map(|(entry, set)| Kept {
                    entry: entry.clone(),
                    set: set.clone(),
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| StateError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        write_atomically(path, text.as_bytes()).map_err(|source| StateError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Sets a backend's admin state and weight override to `set`.
pub fn set_backend(b: &Backend, set: &Override) {
    let state = set.state.unwrap_or(AdminState::Ready);
    if b.admin_state() != state {
        b.set_admin_state(state);
    }
    if b.weight_override() != set.weight {
        b.set_weight_override(set.weight);
    }
}

/// The entry a live backend belongs to. Backends are IP literals today, so the entry
/// is the address; a DNS entry will map its endpoints back to the name written.
pub fn entry_of(upstream: &Upstream, b: &Backend) -> Entry {
    Entry {
        upstream: upstream.name.clone(),
        backend: b.address.to_string(),
    }
}

/// The backends of `upstream` that entry `backend` stands for.
pub fn backends_of<'a>(upstream: &'a Upstream, backend: &str) -> Vec<&'a Arc<Backend>> {
    upstream
        .backends()
        .iter()
        .filter(|b| entry_of(upstream, b).backend == backend)
        .collect()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    // The rename itself is durable once the directory is synced.
    std::fs::File::open(dir)?.sync_all()
}

/// A new file beside `path`, mode 0600 (the state names backends and who changed them).
fn tempfile_in(dir: &Path, path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    Ok((tmp, file))
}

/// The admin state as its label text in the state file.
mod admin_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use strum::VariantArray;

    use crate::metrics::AdminState;

    pub(super) fn serialize<S: Serializer>(
        s: &Option<AdminState>,
        ser: S,
    ) -> Result<S::Ok, S::Error> {
        match s {
            Some(s) => ser.serialize_str(s.as_str()),
            None => ser.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<AdminState>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_state(&text)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown state {text:?}")))
    }

    pub(super) fn all() -> &'static [AdminState] {
        AdminState::VARIANTS
    }
}

/// An admin state from its text: `ready`, `drain` or `maint`.
pub fn parse_state(text: &str) -> Option<AdminState> {
    admin_text::all()
        .iter()
        .copied()
        .find(|s| s.as_str() == text)
}
