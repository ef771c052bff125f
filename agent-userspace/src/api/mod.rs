//! The control API: HTTP/JSON (axum) on the admin Unix socket, root only (0600 and a peer-uid
//! check). `agentwall exec` uses it to have an agent's cgroup registered BEFORE the agent runs,
//! so no agent ever runs unenforced; the CLI's other commands are clients of it too. Routes are
//! in [`routes`], wire types in [`wire`], the client in [`client`]; docs/api.md documents them.
//!
//! The accept loop keeps a connection limit of its own: a connection that has sent nothing yet
//! can be evicted for a newer one, so an idle flood never starves a real request.

pub mod agent;
pub mod client;
pub mod routes;
pub mod wire;

use std::{
    collections::VecDeque,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore},
};

pub use client::ClientError;

use crate::{
    control::{Caller, Command},
    sinks::fanout::Subscriber,
};

pub const DEFAULT_SOCKET: &str = "/run/agentwall/control.sock";

/// Request bodies are capped so a client cannot make the controller buffer without bound.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Most connections served at once. Beyond it a new connection takes the slot of the oldest one
/// that has not sent its request yet, or is closed at once when every slot is busy with a
/// request: memory stays bounded and an idle flood cannot starve a real request.
pub const MAX_CONNECTIONS: usize = 128;

/// How long a client has to start its request, then to send its headers, then its body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The most one connection may take from its first byte to its reply written (a client that
/// does not read its reply gives its slot back); the CLI waits as long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed accept (EMFILE, ENFILE) leaves the connection queued: wait before trying again
/// rather than spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds the socket (root-only, 0600) and serves until `shutdown`; `records` feeds
/// `GET /v1/events`.
pub async fn serve(
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    records: Option<Subscriber>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a controller that died is stale; a live one would be answering.
    if UnixStream::connect(&path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{}: another controller is serving here", path.display()),
        ));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let app = routes::router();
    let refusing = routes::refusing();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // One sender per connection still waiting for its request, oldest first; a closed sender
    // is a connection past that point (or gone).
    let mut waiting: VecDeque<oneshot::Sender<()>> = VecDeque::new();
    let stats = Arc::new(Stats::default());
    let mut summary = tokio::time::interval(Duration::from_secs(1));
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let stream = match conn {
                    Ok((s, _)) => s,
                    Err(e) => {
                        stats.count(&stats.accept_errors);
                        *stats.last_accept_error.lock().expect("stats") = Some(e.to_string());
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                // The socket is 0600; this holds if it is opened up by mistake.
                let uid = stream.peer_cred().ok().map(|c| c.uid());
                let root = uid == Some(0);
                if !root {
                    stats.count(&stats.not_root);
                }
                let Some(permit) = slot(&slots, &mut waiting, &stats).await else {
                    stats.count(&stats.busy);
                    continue;
                };
                let (evict_tx, evict_rx) = oneshot::channel();
                if waiting.len() >= 2 * MAX_CONNECTIONS {
                    waiting.retain(|tx| !tx.is_closed());
                }
                waiting.push_back(evict_tx);
                let streaming = routes::Streaming::default();
                let app = if root {
                    app.clone().with_state(routes::Ctx {
                        commands: commands.clone(),
                        caller: Caller::Admin { uid: uid.unwrap_or_default() },
                        records: records.clone(),
                        streaming: streaming.clone(),
                    })
                } else {
                    refusing.clone()
                };
                let stats = stats.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match connection(stream, app, evict_rx, streaming).await {
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                            stats.count(&stats.timed_out)
                        }
                        Err(e) => tracing::debug!(error = %e, "control connection"),
                        Ok(()) => {}
                    }
                });
            }
            _ = summary.tick() => stats.report(),
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// A free slot, or the slot of the oldest connection still waiting for its request.
async fn slot(
    slots: &Arc<Semaphore>,
    waiting: &mut VecDeque<oneshot::Sender<()>>,
    stats: &Stats,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Some(p);
    }
    while let Some(oldest) = waiting.pop_front() {
        if oldest.send(()).is_ok() {
            stats.count(&stats.evicted);
            // The evicted task returns at once; one that had just read its request in the
            // meantime keeps its slot, and the new connection is closed.
            return tokio::time::timeout(Duration::from_millis(100), slots.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok);
        }
    }
    None
}

/// What the control socket turned away, logged as one summary a second at most.
#[derive(Default)]
struct Stats {
    evicted: AtomicU64,
    timed_out: AtomicU64,
    busy: AtomicU64,
    not_root: AtomicU64,
    accept_errors: AtomicU64,
    last_accept_error: std::sync::Mutex<Option<String>>,
}

impl Stats {
    fn count(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self) {
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        let (evicted, timed_out, busy, not_root, accept_errors) = (
            take(&self.evicted),
            take(&self.timed_out),
            take(&self.busy),
            take(&self.not_root),
            take(&self.accept_errors),
        );
        if evicted + busy + not_root + accept_errors > 0 {
            let last_accept_error = self.last_accept_error.lock().expect("stats").take();
            tracing::warn!(
                idle_closed = evicted,
                busy_closed = busy,
                not_root,
                accept_errors,
                last_accept_error,
                limit = MAX_CONNECTIONS,
                "control socket: connections closed in the last second"
            );
        } else if timed_out > 0 {
            tracing::debug!(
                timed_out,
                "control socket: connections sent no request in time"
            );
        }
    }
}

/// Serves one connection: waits for its first byte (evictable until then, at most
/// [`REQUEST_TIMEOUT`]), then one HTTP/1 exchange, no keep-alive, within [`CONNECTION_TIMEOUT`]
/// unless its answer is an event stream, which lasts until the client closes.
async fn connection(
    stream: tokio::net::UnixStream,
    app: axum::Router,
    evict: oneshot::Receiver<()>,
    streaming: routes::Streaming,
) -> std::io::Result<()> {
    let timed_out = |what| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
    tokio::select! {
        r = tokio::time::timeout(REQUEST_TIMEOUT, first_byte(&stream)) => {
            r.map_err(|_| timed_out("no request in time"))??;
        }
        _ = evict => {
            return Err(std::io::Error::other("closed for a newer connection (limit reached)"));
        }
    }
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES.max(8192))
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    match tokio::time::timeout(CONNECTION_TIMEOUT, &mut conn).await {
        Ok(r) => r.map_err(std::io::Error::other),
        Err(_) if streaming.is_set() => conn.await.map_err(std::io::Error::other),
        Err(_) => Err(timed_out("the exchange took too long")),
    }
}

/// Returns once the peer has sent something (or closed). `readable()` alone may report a
/// socket ready that has nothing to read, which would take an idle connection out of reach of
/// eviction; a peek tells.
async fn first_byte(stream: &tokio::net::UnixStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        stream.readable().await?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut b = 0u8;
            // SAFETY: a one-byte peek into a local on our own socket.
            let n = unsafe {
                libc::recv(
                    stream.as_raw_fd(),
                    (&mut b as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        match peeked {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests;
