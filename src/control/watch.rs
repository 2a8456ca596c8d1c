//! The file watch: the config file's directory (and those of the TLS files it names)
//! watched with inotify. A change is debounced, then asks for a reload; `apply.rs` reads
//! and validates the whole file.
//!
//! Watching the directory rather than the file catches every way of saving one: an
//! in-place write, an editor's write-then-rename, and Kubernetes' ConfigMap volumes,
//! where the file is a symlink through `..data`, itself a symlink swapped atomically.
//! Any event in the directory leads to a read; only a change of content is a reload.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::control::signals::{Events, Trigger};

/// Quiet time after the last event before the file is read: long enough for an editor
/// to finish its write-and-rename, short enough to feel immediate.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Updates the set of TLS files watched besides the config file.
pub struct FileWatch {
    files: watch::Sender<Vec<PathBuf>>,
}

impl FileWatch {
    /// Watches these TLS files too (replacing the previous set), so a rotated
    /// certificate reloads even though the config file did not change.
    pub fn watch_files(&self, files: &[PathBuf]) {
        self.files.send_if_modified(|now| {
            let changed = now.as_slice() != files;
            if changed {
                *now = files.to_vec();
            }
            changed
        });
    }
}

/// A file's directory, `.` for a bare name.
fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn add_watch(fd: &OwnedFd, dir: &Path) -> io::Result<()> {
    inotify::add_watch(
        fd,
        dir,
        WatchFlags::CLOSE_WRITE
            | WatchFlags::MODIFY
            | WatchFlags::MOVED_TO
            | WatchFlags::MOVED_FROM
            | WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::ATTRIB,
    )?;
    Ok(())
}

fn file_name(path: &Path) -> Vec<u8> {
    path.file_name()
        .map(|n| n.as_encoded_bytes().to_vec())
        .unwrap_or_default()
}

/// Watches the directory of the config file at `path`; settled changes ask `events` for
/// a reload.
pub fn start(path: &Path, events: Events) -> io::Result<FileWatch> {
    let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
    add_watch(&fd, directory(path))?;
    // Deprecated because a registered fd might be closed by someone else while tokio
    // watches it; an OwnedFd moved in here is closed only when the AsyncFd drops. Its
    // replacement, `register`, is `unsafe`, which this crate forbids.
    #[allow(deprecated)]
    let fd = AsyncFd::new(fd)?;
    let name = file_name(path);
    let (files, files_rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        if let Err(e) = watch(fd, name, files_rx, events).await {
            tracing::error!(error = %e, "config file watch stopped; SIGHUP still reloads");
        }
    });
    Ok(FileWatch { files })
}

async fn watch(
    fd: AsyncFd<OwnedFd>,
    config_name: Vec<u8>,
    mut files: watch::Receiver<Vec<PathBuf>>,
    events: Events,
) -> io::Result<()> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    // Names that matter in any watched directory. A file of the same name in another
    // watched directory costs a read that finds nothing changed, nothing more.
    let mut names = vec![config_name.clone(), b"..data".to_vec()];
    loop {
        tokio::select! {
            r = next_events(&fd, &names, &mut buf) => r?,
            changed = files.changed() => {
                if changed.is_err() {
                    // The server is gone; nothing more to watch.
                    return Ok(());
                }
                names.truncate(2);
                for f in files.borrow_and_update().iter() {
                    if let Err(e) = add_watch(fd.get_ref(), directory(f)) {
                        tracing::warn!(file = %f.display(), error = %e, "cannot watch a TLS file's directory; SIGHUP reloads it");
                    }
                    names.push(file_name(f));
                }
                continue;
            }
        }
        while let Ok(more) = timeout(DEBOUNCE, next_events(&fd, &names, &mut buf)).await {
            more?;
        }
        events.reload(Trigger::File);
    }
}

/// Waits until an event concerns the config file (`name`), Kubernetes' `..data` link,
/// or may have been lost (queue overflow); consumes every queued event. Events for other
/// files in the directory (logs, an editor's swap files) are ignored, so writing beside
/// the config never triggers a reload.
async fn next_events(
    fd: &AsyncFd<OwnedFd>,
    names: &[Vec<u8>],
    buf: &mut [MaybeUninit<u8>],
) -> io::Result<()> {
    loop {
        let mut ready = fd.readable().await?;
        let drained = ready.try_io(|inner| {
            let mut reader = inotify::Reader::new(inner.get_ref(), &mut *buf);
            let mut relevant = 0usize;
            loop {
                match reader.next() {
                    Ok(event) => {
                        let overflow = event.events().contains(ReadFlags::QUEUE_OVERFLOW);
                        let ours = event
                            .file_name()
                            .is_some_and(|n| names.iter().any(|w| w.as_slice() == n.to_bytes()));
                        if overflow || ours {
                            relevant += 1;
                        }
                    }
                    // Nothing of ours: report WouldBlock, which makes tokio clear the
                    // readiness so that the next wait really waits.
                    Err(rustix::io::Errno::WOULDBLOCK) if relevant == 0 => {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Err(rustix::io::Errno::WOULDBLOCK) => return Ok(relevant),
                    Err(e) => return Err(io::Error::from(e)),
                }
            }
        });
        match drained {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}
