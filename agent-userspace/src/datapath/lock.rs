//! The controller lock: one controller (or one `uninstall`) at a time per pin directory.
//!
//! An exclusive, non-blocking `flock` on a directory, taken before any pinned map or link is
//! read or written. bpffs holds no regular files, so the lock is on a directory: the parent of a
//! layout directory `v<N>` (so every layout version under it, and a migration between them, is
//! covered), else the pin directory itself. The kernel drops the lock when its holder exits,
//! however it exits, so a crashed controller never leaves a stale lock behind.

use std::{
    fs::File,
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Who holds a lock, as /proc/locks and /proc/<pid>/comm tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    /// The holder's command name, when it could be read.
    pub comm: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(comm) = &self.comm {
            write!(f, " ({comm})")?;
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum LockError {
    #[error(
        "another agentwall controller ({}) holds {}: it serves these pins; stop it first",
        holder_text(.holder),
        .path.display()
    )]
    Held {
        path: PathBuf,
        /// None when /proc/locks did not name it (another pid namespace).
        holder: Option<Holder>,
    },
    #[error("locking {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn holder_text(h: &Option<Holder>) -> String {
    match h {
        Some(h) => h.to_string(),
        None => "pid unknown: not in this pid namespace".into(),
    }
}

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
    path: PathBuf,
}

impl PinLock {
    /// The directory locked for `pin_dir`: its parent when `pin_dir` is a layout directory
    /// (`v<N>`), else `pin_dir` itself.
    pub fn path_for(pin_dir: &Path) -> PathBuf {
        let layout = pin_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        match pin_dir.parent() {
            Some(parent) if layout && !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => pin_dir.to_path_buf(),
        }
    }

    /// Takes the lock for `pin_dir`, creating the locked directory when missing. Fails at once
    /// (never waits) when another process holds it, naming that process.
    pub fn acquire(pin_dir: &Path) -> Result<PinLock, LockError> {
        let path = Self::path_for(pin_dir);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // A holder may remove the directory (uninstall) just after we opened it: a lock on
        // the removed inode would guard nothing, so lock, then check it is still the one
        // at `path`, and retry on a fresh one otherwise.
        for _ in 0..8 {
            std::fs::create_dir_all(&path).map_err(io)?;
            let dir = open_dir(&path).map_err(io)?;
            match dir.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = holder_of(&dir);
                    return Err(LockError::Held { path, holder });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
            let held = dir.metadata().map_err(io)?;
            match std::fs::metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(PinLock { _dir: dir, path });
                }
                _ => continue,
            }
        }
        Err(io(io::Error::other(
            "the directory kept being replaced while it was locked",
        )))
    }

    /// Takes the lock for `pin_dir` when its directory exists (None when it does not: nothing
    /// is pinned there and no controller serves). For `uninstall`, which must not create it.
    pub fn acquire_existing(pin_dir: &Path) -> Result<Option<PinLock>, LockError> {
        match std::fs::metadata(Self::path_for(pin_dir)) {
            Ok(_) => Self::acquire(pin_dir).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LockError::Io {
                path: Self::path_for(pin_dir),
                source,
            }),
        }
    }

    /// The locked directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_dir(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
}

/// The process holding a FLOCK on `dir`'s inode, from /proc/locks (dev as major:minor, ino).
fn holder_of(dir: &File) -> Option<Holder> {
    let meta = dir.metadata().ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let lock = procfs::locks().ok()?.into_iter().find(|l| {
        l.lock_type == procfs::LockType::FLock
            && l.devmaj == major
            && l.devmin == minor
            && l.inode == meta.ino()
    })?;
    let pid = lock.pid?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_string());
    Some(Holder { pid, comm })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_dir_locks_its_parent() {
        assert_eq!(
            PinLock::path_for(Path::new("/sys/fs/bpf/agentwall/v3")),
            Path::new("/sys/fs/bpf/agentwall")
        );
        assert_eq!(
            PinLock::path_for(Path::new("/sys/fs/bpf/mine")),
            Path::new("/sys/fs/bpf/mine")
        );
        assert_eq!(
            PinLock::path_for(Path::new("/sys/fs/bpf/vx")),
            Path::new("/sys/fs/bpf/vx")
        );
        assert_eq!(PinLock::path_for(Path::new("v2")), Path::new("v2"));
    }

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("aw-lock-{}", std::process::id()));
        let pins = dir.join("v3");
        let first = PinLock::acquire(&pins).unwrap();
        assert_eq!(first.path(), dir);
        // flock locks belong to the open file: a second open in this process conflicts too.
        let err = PinLock::acquire(&pins).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        match err {
            LockError::Held { holder, .. } => {
                assert_eq!(holder.map(|h| h.pid), Some(std::process::id() as i32))
            }
            e => panic!("{e}"),
        }
        drop(first);
        let again = PinLock::acquire_existing(&pins).unwrap();
        assert!(again.is_some());
        drop(again);
        std::fs::remove_dir(&dir).unwrap();
        assert!(PinLock::acquire_existing(&pins).unwrap().is_none());
        assert!(!dir.exists());
    }
}
