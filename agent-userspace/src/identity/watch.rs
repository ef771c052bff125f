//! Watches the cgroup tree below the watched parents with inotify (cgroupfs reports mkdir and
//! rmdir of cgroups as IN_CREATE / IN_DELETE of directories), so a new cgroup is registered
//! when it appears rather than at the next scan. The scan stays as a backstop (a queue
//! overflow asks for one at once).

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    fs, io,
    path::{Path, PathBuf},
};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::sync::{mpsc, watch};

/// A directory to watch: its whole subtree (a watched parent), or only its own entries (the
/// nearest existing ancestor of a watched parent that does not exist yet, so the parent is seen
/// the moment it is created and its subtree watched from then on).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Root {
    pub path: PathBuf,
    pub deep: bool,
}

/// A change in the cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A cgroup directory appeared (or was found when its parent's watch was added).
    Created(PathBuf),
    /// A cgroup directory was removed.
    Removed(PathBuf),
    /// Events were dropped (the inotify queue overflowed): rescan.
    Overflow,
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::ONLYDIR);

/// The watcher: one inotify instance, a watch per directory of the watched subtrees.
struct Watcher {
    inotify: inotify::Watches,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Roots whose subtrees are watched, and directories watched for their own entries only.
    deep: HashSet<PathBuf>,
    shallow: HashSet<PathBuf>,
    out: mpsc::Sender<Change>,
}

impl Watcher {
    /// Watches `dir` and every directory below it; reports the subdirectories found (they may
    /// have appeared before the watch existed).
    async fn add_tree(&mut self, dir: &Path, report: bool) {
        let mut stack = vec![(dir.to_path_buf(), false)];
        while let Some((d, report_this)) = stack.pop() {
            match self.inotify.add(&d, MASK) {
                Ok(wd) => {
                    self.dirs.insert(wd, d.clone());
                }
                // Gone already, or not a directory: its removal is or was reported.
                Err(e) => {
                    tracing::debug!(dir = %d.display(), "inotify watch: {e}");
                    continue;
                }
            }
            if report_this && self.out.send(Change::Created(d.clone())).await.is_err() {
                return;
            }
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), report));
                }
            }
        }
    }

    async fn on_event(&mut self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            let _ = self.out.send(Change::Overflow).await;
            return;
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(wd);
            return;
        }
        let (Some(dir), Some(name)) = (self.dirs.get(wd), name) else {
            return;
        };
        if !mask.contains(EventMask::ISDIR) {
            return;
        }
        let shallow = self.shallow.contains(dir);
        let path = dir.join(name);
        if mask.contains(EventMask::CREATE) {
            // The cgroup first, then its watch and anything created below it meanwhile. Below a
            // shallow root only the cgroup is reported: the controller makes it a deep root if
            // it is a watched parent.
            if self.out.send(Change::Created(path.clone())).await.is_err() || shallow {
                return;
            }
            self.add_tree(&path, true).await;
        } else if mask.contains(EventMask::DELETE) {
            let _ = self.out.send(Change::Removed(path)).await;
        }
    }

    /// Watches the subtrees (or, for shallow roots, the entries) of `roots` not watched yet.
    async fn watch_roots(&mut self, roots: &[Root]) {
        for r in roots {
            if r.deep {
                if !self.deep.contains(&r.path) {
                    self.deep.insert(r.path.clone());
                    self.add_tree(&r.path, true).await;
                }
            } else if !self.dirs.values().any(|d| d == &r.path) {
                match self.inotify.add(&r.path, MASK) {
                    Ok(wd) => {
                        self.dirs.insert(wd, r.path.clone());
                        self.shallow.insert(r.path.clone());
                    }
                    Err(e) => {
                        tracing::debug!(dir = %r.path.display(), "inotify watch: {e}");
                        continue;
                    }
                }
                // What was created before the watch existed.
                for e in fs::read_dir(&r.path).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir())
                        && self.out.send(Change::Created(e.path())).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
}

/// Runs until `roots` is closed (the control actor is gone): watches every directory below
/// each root (the controller keeps the list current) and sends what changes to `out`.
pub async fn run(
    mut roots: watch::Receiver<Vec<Root>>,
    out: mpsc::Sender<Change>,
) -> io::Result<()> {
    let inotify = Inotify::init()?;
    let watches = inotify.watches();
    let mut events = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
    let mut w = Watcher {
        inotify: watches,
        dirs: HashMap::new(),
        deep: HashSet::new(),
        shallow: HashSet::new(),
        out,
    };
    let first = roots.borrow_and_update().clone();
    w.watch_roots(&first).await;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ev)) => w.on_event(&ev.wd, ev.mask, ev.name.as_deref()).await,
                Some(Err(e)) => {
                    tracing::warn!("reading cgroup events: {e}; the periodic scan covers");
                    let _ = w.out.send(Change::Overflow).await;
                }
                None => return Ok(()),
            },
            changed = roots.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = roots.borrow_and_update().clone();
                w.watch_roots(&now).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(rx: &mut mpsc::Receiver<Change>) -> Change {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a change within 5 s")
            .expect("watcher running")
    }

    /// inotify on an ordinary directory tree behaves as on cgroupfs for mkdir and rmdir.
    #[tokio::test]
    async fn reports_new_and_removed_directories_at_any_depth() {
        let base = std::env::temp_dir().join(format!("aw-watch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("pre/existing")).unwrap();
        let (roots_tx, roots) = watch::channel(vec![Root {
            path: base.clone(),
            deep: true,
        }]);
        let (tx, mut rx) = mpsc::channel(64);
        let task = tokio::spawn(run(roots, tx));
        let mut seen = vec![next(&mut rx).await, next(&mut rx).await];
        seen.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            seen,
            [
                Change::Created(base.join("pre")),
                Change::Created(base.join("pre/existing"))
            ]
        );
        fs::create_dir(base.join("a")).unwrap();
        assert_eq!(next(&mut rx).await, Change::Created(base.join("a")));
        fs::create_dir(base.join("a/b")).unwrap();
        assert_eq!(next(&mut rx).await, Change::Created(base.join("a/b")));
        fs::remove_dir(base.join("a/b")).unwrap();
        assert_eq!(next(&mut rx).await, Change::Removed(base.join("a/b")));
        drop(roots_tx);
        task.await.unwrap().unwrap();
        fs::remove_dir_all(&base).unwrap();
    }
}
