//! Policy push: every way a new policy reaches the kernel (`agentwall reload`, SIGHUP, a change
//! in the watched policy directory, `agentwall policy apply`) goes through one path. The files
//! are read and compiled off the actor; the actor only switches (see `apply::switch`), one
//! switch at a time. A rejected set leaves the running policy in place and is reported in the
//! log and the audit stream (`policy-rejected`, with file:line:column).

use std::{
    collections::VecDeque,
    fmt::Write as _,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use notify::{
    event::{AccessKind, AccessMode},
    EventKind, RecursiveMode, Watcher,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use super::{apply, Command, Reloaded, Reply, State};
use crate::{datapath::Datapath, events::Notice, policy::PolicySet};

/// Quiet time after the last change before the directory is read: a burst of writes (an editor
/// save, a ConfigMap update, `cp *.yaml`) is one switch.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// A directory that never goes quiet is still read this long after its first change.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// Who asked for a policy switch (named in logs and audit notices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum PolicyOrigin {
    /// `agentwall reload` or SIGHUP: the configured directory re-read.
    Reload,
    /// A change in the watched policy directory.
    Watch,
    /// `agentwall policy apply` through the API.
    Apply { caller: super::Caller },
}

/// A switch asked for: the path to read, who asked, and everyone waiting for its result.
struct Job {
    path: PathBuf,
    origin: PolicyOrigin,
    replies: Vec<Reply<Reloaded>>,
}

/// Switches waiting for a result: the one being read and compiled, and those that came in after
/// it started (they need a fresh read: the files may have changed since).
#[derive(Default)]
pub(crate) struct Pending {
    running: Option<Job>,
    queued: VecDeque<Job>,
}

impl Pending {
    /// Queues a switch to `path`; starts reading it when none is under way. Requests for the
    /// same path that wait together share one read.
    pub(crate) fn push(
        &mut self,
        path: PathBuf,
        origin: PolicyOrigin,
        reply: Reply<Reloaded>,
        done: &mpsc::UnboundedSender<Result<apply::Prepared>>,
    ) {
        match self.queued.back_mut() {
            Some(last) if last.path == path => {
                // An explicit request among them makes the read a forced switch.
                if last.origin == PolicyOrigin::Watch {
                    last.origin = origin;
                }
                last.replies.push(reply)
            }
            _ => self.queued.push_back(Job {
                path,
                origin,
                replies: vec![reply],
            }),
        }
        self.start_next(done);
    }

    fn start_next(&mut self, done: &mpsc::UnboundedSender<Result<apply::Prepared>>) {
        if self.running.is_some() {
            return;
        }
        if let Some(job) = self.queued.pop_front() {
            start_prepare(job.path.clone(), done.clone());
            self.running = Some(job);
        }
    }

    /// The read of the running job is done: switches to it (in the actor), answers everyone
    /// waiting for it, reports the outcome, and starts the next job.
    pub(crate) fn finish<D: Datapath>(
        &mut self,
        state: &mut State<D>,
        prepared: Result<apply::Prepared>,
        done: &mpsc::UnboundedSender<Result<apply::Prepared>>,
    ) {
        let Some(job) = self.running.take() else {
            return;
        };
        let outcome = state.switch_to(&job, prepared);
        for reply in job.replies {
            let _ = reply.send(outcome.clone());
        }
        self.start_next(done);
    }
}

impl<D: Datapath> State<D> {
    /// A switch asked for (`path` None: the configured directory).
    pub(crate) fn push_policy(
        &mut self,
        pending: &mut Pending,
        path: Option<PathBuf>,
        origin: PolicyOrigin,
        reply: Reply<Reloaded>,
        done: &mpsc::UnboundedSender<Result<apply::Prepared>>,
    ) {
        match path.or_else(|| self.source.clone()) {
            Some(path) => pending.push(path, origin, reply, done),
            None => {
                let _ = reply.send(Err("this controller runs a fixed policy set: there is \
                                        nothing to re-read"
                    .into()));
            }
        }
    }

    /// Switches to a prepared set. A watch event whose set is the one running (a ConfigMap
    /// swap or a touched file with the same content) changes nothing: no new version, no map
    /// writes. An explicit request (reload, SIGHUP, apply) always switches: every cgroup is
    /// re-judged under a new version.
    fn switch_to(
        &mut self,
        job: &Job,
        prepared: Result<apply::Prepared>,
    ) -> Result<Reloaded, String> {
        let path = job.path.display().to_string();
        let result = prepared.and_then(|p| {
            if job.origin == PolicyOrigin::Watch && self.policy_digest == Some(p.digest) {
                return Ok(false);
            }
            self.switch(p).map(|()| true)
        });
        match result {
            Ok(changed) => {
                if changed {
                    tracing::info!(path, origin = ?job.origin, generation = self.generation,
                        "policy switched");
                    let _ = self.notices.send(Notice::new(
                        "policy-applied",
                        json!({
                            "path": path,
                            "origin": job.origin,
                            "generation": self.generation,
                            "policies": self.installed.keys().collect::<Vec<_>>(),
                        }),
                    ));
                } else {
                    tracing::info!(path, origin = ?job.origin, generation = self.generation,
                        "policy unchanged: nothing to switch");
                }
                Ok(Reloaded {
                    generation: self.generation,
                })
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(path, origin = ?job.origin, generation = self.generation,
                    "policy rejected, the running policy stays: {error}");
                let _ = self.notices.send(Notice::new(
                    "policy-rejected",
                    json!({
                        "path": path,
                        "origin": job.origin,
                        "error": error,
                        "running_generation": self.generation,
                    }),
                ));
                Err(error)
            }
        }
    }
}

/// Reads and compiles `path` on a blocking thread; the result comes back to the actor, which
/// only switches the maps.
fn start_prepare(path: PathBuf, done: mpsc::UnboundedSender<Result<apply::Prepared>>) {
    tokio::spawn(async move {
        let result = tokio::task::spawn_blocking(move || apply::prepare_dir(&path))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("reading the policy: {e}")));
        let _ = done.send(result);
    });
}

/// A digest of a loaded set (every field of every policy, the source paths included): equal
/// digests mean the same policy. Streamed through the hasher, so a large set is not copied.
pub(crate) fn digest(set: &PolicySet) -> u64 {
    struct Feed<H>(H);
    impl<H: Hasher> std::fmt::Write for Feed<H> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            s.hash(&mut self.0);
            Ok(())
        }
    }
    let mut feed = Feed(std::hash::DefaultHasher::new());
    let _ = write!(feed, "{set:?}");
    feed.0.finish()
}

/// Whether a change to directory entry `name` can change what the loader reads: a policy file
/// (`*.yaml`, `*.yml`), or a Kubernetes ConfigMap volume's `..data` link and `..<timestamp>`
/// directories. Editor swap and backup files are not.
fn relevant(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    name.starts_with("..")
        || (!name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")))
}

/// Whether a notify event is a change worth a reload (our own reads open the files: those
/// access events are not).
fn is_change(event: &notify::Event, file: Option<&std::ffi::OsStr>) -> bool {
    let kind = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    kind && event.paths.iter().any(|p| {
        p.file_name().is_some_and(|n| {
            file.map_or(relevant(n), |f| {
                n == f || n.to_str().is_some_and(|s| s.starts_with(".."))
            })
        })
    })
}

/// Watches the policy directory (or the directory of a single policy file) and asks the actor to
/// switch after each burst of changes. Runs until `shutdown`; a watch that cannot be set up
/// is an error (the caller logs it: reload and SIGHUP still work).
pub async fn run(
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (dir, file) = if path.is_dir() {
        (path.clone(), None)
    } else {
        let file = path.file_name().map(|f| f.to_os_string());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        (dir, file)
    };
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let _ = tx.send(res);
    })
    .context("creating the policy directory watch")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "watching the policy directory");
    // The first change of a burst not yet applied, and the last.
    let mut burst: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
    loop {
        let due = burst.map(|(first, last)| (last + DEBOUNCE).min(first + MAX_DELAY));
        tokio::select! {
            ev = events.recv() => match ev {
                None => return Ok(()),
                Some(Ok(ev)) if is_change(&ev, file.as_deref()) => {
                    let now = tokio::time::Instant::now();
                    burst = Some((burst.map_or(now, |(first, _)| first), now));
                }
                Some(Ok(_)) => {}
                // An overflowed queue lost events: read the directory to be sure.
                Some(Err(e)) => {
                    tracing::warn!(dir = %dir.display(), "policy directory watch: {e}");
                    let now = tokio::time::Instant::now();
                    burst = Some((burst.map_or(now, |(first, _)| first), now));
                }
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                if due.is_some() => {
                burst = None;
                let (reply, answer) = oneshot::channel();
                let cmd = Command::ApplyPolicy { path: None, origin: PolicyOrigin::Watch, reply };
                if commands.send(cmd).await.is_err() {
                    return Ok(());
                }
                // Changes during the switch start the next burst; the actor logs the outcome.
                let _ = answer.await;
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, name: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from("/etc/agentwall/policies").join(name))
    }

    #[test]
    fn changes_that_can_change_the_set_count_reads_do_not() {
        use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
        let dir = None;
        assert!(is_change(
            &ev(EventKind::Create(CreateKind::File), "a.yaml"),
            dir
        ));
        assert!(is_change(
            &ev(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "a.yml"),
            dir
        ));
        assert!(is_change(
            &ev(EventKind::Remove(RemoveKind::File), "a.yaml"),
            dir
        ));
        assert!(is_change(
            &ev(EventKind::Create(CreateKind::Any), "..data"),
            dir
        ));
        assert!(is_change(
            &ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "a.yaml"
            ),
            dir
        ));
        // Our own reads, editor swap files, unrelated files.
        assert!(!is_change(
            &ev(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "a.yaml"
            ),
            dir
        ));
        assert!(!is_change(
            &ev(EventKind::Create(CreateKind::File), ".a.yaml.swp"),
            dir
        ));
        assert!(!is_change(
            &ev(EventKind::Create(CreateKind::File), "notes.txt"),
            dir
        ));
        // A single watched file: only its own name (and ConfigMap links) count.
        let file = Some(std::ffi::OsStr::new("p.yaml"));
        assert!(is_change(
            &ev(EventKind::Create(CreateKind::File), "p.yaml"),
            file
        ));
        assert!(!is_change(
            &ev(EventKind::Create(CreateKind::File), "q.yaml"),
            file
        ));
    }

    #[test]
    fn the_digest_tells_sets_apart() {
        let p = |cidr: &str| {
            crate::policy::parse_policy(
                Path::new("p.yaml"),
                &format!(
                    "name: p\nagents:\n  cgroups: [a/b]\negress:\n  - cidr: {cidr}\n    ports: [1]\n"
                ),
            )
            .unwrap()
        };
        let set = |cidr| PolicySet {
            policies: vec![p(cidr)],
        };
        assert_eq!(digest(&set("127.0.0.1/32")), digest(&set("127.0.0.1/32")));
        assert_ne!(digest(&set("127.0.0.1/32")), digest(&set("127.0.0.2/32")));
    }
}
