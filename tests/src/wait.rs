//! Waiting on a condition, never on time. A condition is checked, and checked again only when
//! something it reads has changed: a file in one of the watched directories (inotify), or, for
//! a question to the controller itself (its status), at once: the answer is the pacing.

use std::{
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use inotify::{Inotify, WatchMask};

/// Waits until `cond` returns Some; between checks, blocks until a file in one of `dirs` is
/// created, written, renamed or removed. With no `dirs`, re-checks at once (for conditions that
/// ask the controller, or spawn a process to ask the kernel). Fails naming `what` after
/// `timeout`.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    dirs: &[&Path],
    mut cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    // Watches first, then the first check: a change between the two is not missed.
    let mut inotify = match dirs {
        [] => None,
        dirs => {
            let i = Inotify::init().context("inotify")?;
            let mask = WatchMask::CREATE
                | WatchMask::MODIFY
                | WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::DELETE
                | WatchMask::ATTRIB;
            for d in dirs {
                i.watches()
                    .add(d, mask)
                    .with_context(|| format!("watching {}", d.display()))?;
            }
            Some(i)
        }
    };
    let mut buf = [0u8; 4096];
    loop {
        if let Some(v) = cond()? {
            return Ok(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "timed out after {timeout:?} waiting for {what}"
        );
        if let Some(i) = &mut inotify {
            let mut pfd = libc::pollfd {
                fd: i.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
                // Drain: what changed does not matter, the condition is checked again.
                while i
                    .read_events(&mut buf)
                    .is_ok_and(|mut e| e.next().is_some())
                {}
            }
        }
    }
}

/// The directory a file lives in (what `until` watches for it).
pub fn dir_of(file: &Path) -> &Path {
    file.parent().unwrap_or(Path::new("/"))
}

/// `until` from an async test whose controller runs in the same (multi-threaded) runtime:
/// the blocking wait leaves the runtime's other worker to the controller.
pub async fn until_async<T>(
    what: &str,
    timeout: Duration,
    dirs: &[&Path],
    cond: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    tokio::task::block_in_place(|| until(what, timeout, dirs, cond))
}

/// Asks the controller (an async question, e.g. its status) until the answer says Some; each
/// question is the pacing, and the runtime is yielded between them.
pub async fn until_answer<T, F, Fut>(what: &str, timeout: Duration, mut ask: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = ask().await? {
            return Ok(v);
        }
        ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::task::yield_now().await;
    }
}
