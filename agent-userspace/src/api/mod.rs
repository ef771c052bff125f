//! The control socket: one JSON request per connection, one JSON reply. `agentwall exec` uses it
//! to have an agent's cgroup registered BEFORE the agent runs, so no agent ever runs unenforced.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore},
};

use crate::control::Command;

pub const DEFAULT_SOCKET: &str = "/run/agentwall/control.sock";

/// Requests are capped so a client cannot make the controller buffer without bound.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Register the cgroup at this absolute path as an agent (its policy is found by selector).
    Register { cgroup: PathBuf },
    /// Re-read the policy directory; on any error the running policy stays.
    Reload,
    /// Counters and registered agents.
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            result: Some(result),
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            result: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket is root's (0600): nothing else is wrong, and nothing else is said.
    #[error("permission denied: the agentwall control socket {0} is for root only")]
    PermissionDenied(PathBuf),
    #[error("cannot reach the agentwall controller at {0}: {1} (is `agentwall run` running?)")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("talking to the controller at {0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("the controller's reply is not valid: {0}")]
    Reply(#[from] serde_json::Error),
    #[error("the controller refused: {0}")]
    Refused(String),
}

/// Sends one request and waits for the reply (blocking; used by the CLI).
pub fn request(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.into()),
        _ => ClientError::Connect(socket.into(), e),
    })?;
    let io = |e| ClientError::Io(socket.into(), e);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    let resp: Response = serde_json::from_str(&reply)?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Refused(resp.error.unwrap_or_default()))
    }
}

/// Most connections served at once. Beyond it a new connection takes the slot of the oldest one
/// that has not sent its request yet, or is closed at once when every slot is busy with a
/// request: memory stays bounded and an idle flood cannot starve a real request.
pub const MAX_CONNECTIONS: usize = 128;

/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long writing a reply may take (a client that does not read gives its slot back).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed accept (EMFILE, ENFILE) leaves the connection queued: wait before trying again
/// rather than spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Maps a wire request to its typed command and the typed reply back to the wire.
pub async fn dispatch(commands: &mpsc::Sender<Command>, req: Request) -> Response {
    async fn call<T: Serialize>(
        commands: &mpsc::Sender<Command>,
        make: impl FnOnce(crate::control::Reply<T>) -> Command,
    ) -> Response {
        let (tx, rx) = oneshot::channel();
        if commands.send(make(tx)).await.is_err() {
            return Response::err("the controller is shutting down");
        }
        match rx.await {
            Ok(Ok(v)) => Response::ok(serde_json::to_value(v).unwrap_or_default()),
            Ok(Err(e)) => Response::err(e),
            Err(_) => Response::err("the controller is shutting down"),
        }
    }
    match req {
        Request::Register { cgroup } => {
            call(commands, |reply| Command::Register { cgroup, reply }).await
        }
        Request::Reload => call(commands, |reply| Command::Reload { reply }).await,
        Request::Status => call(commands, |reply| Command::Status { reply }).await,
    }
}

/// Binds the socket (root-only, 0600) and serves until `shutdown`.
pub async fn serve(
    path: PathBuf,
    commands: mpsc::Sender<Command>,
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
                let root = peer_is_root(&stream);
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
                let (commands, stats) = (commands.clone(), stats.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let served = if root {
                        handle(stream, commands, evict_rx).await
                    } else {
                        refuse(stream, evict_rx, NOT_ROOT).await
                    };
                    match served {
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

/// The reply to a peer that is not root (the socket is 0600; this holds if it is opened up).
const NOT_ROOT: &str = "permission denied: the control socket serves root only";

/// Reads the request (so the client's write does not fail) and answers `error`.
async fn refuse(
    stream: tokio::net::UnixStream,
    evict: oneshot::Receiver<()>,
    error: &str,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    read_request(rd, evict).await?;
    let mut out = serde_json::to_string(&Response::err(error)).map_err(std::io::Error::other)?;
    out.push('\n');
    tokio::time::timeout(REPLY_TIMEOUT, wr.write_all(out.as_bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "writing the reply"))?
}

fn peer_is_root(stream: &tokio::net::UnixStream) -> bool {
    stream.peer_cred().is_ok_and(|c| c.uid() == 0)
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

async fn handle(
    stream: tokio::net::UnixStream,
    commands: mpsc::Sender<Command>,
    evict: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let line = read_request(rd, evict).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::err(format!("bad request: {e}")),
        Ok(req) => dispatch(&commands, req).await,
    };
    let mut out = serde_json::to_string(&resp).map_err(std::io::Error::other)?;
    out.push('\n');
    tokio::time::timeout(REPLY_TIMEOUT, wr.write_all(out.as_bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "writing the reply"))?
}

/// One request line: at most [`MAX_REQUEST_BYTES`], within [`REQUEST_TIMEOUT`], unless the
/// connection is evicted first. Past this point it can no longer be evicted.
async fn read_request(
    rd: tokio::net::unix::OwnedReadHalf,
    evict: oneshot::Receiver<()>,
) -> std::io::Result<String> {
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(rd.take(MAX_REQUEST_BYTES));
    tokio::select! {
        r = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)) => {
            r.map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
        }
        _ = evict => {
            return Err(std::io::Error::other("closed for a newer connection (limit reached)"));
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_a_tagged_json_form() {
        let r: Request =
            serde_json::from_str(r#"{"op":"register","cgroup":"/sys/fs/cgroup/a"}"#).unwrap();
        assert_eq!(
            r,
            Request::Register {
                cgroup: "/sys/fs/cgroup/a".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"nuke"}"#).is_err());
    }
}
