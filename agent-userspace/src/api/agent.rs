//! The agent socket: a Unix socket every agent can reach (0666), where an agent sets its own task
//! and asks for access. HTTP/JSON (axum). The caller is whoever the kernel says connected: the
//! peer's pidfd and pid (SO_PEERPIDFD, SO_PEERCRED) -> its cgroup -> the nearest registered
//! agent. Nothing in a request names the caller; a body naming another agent is refused.
//! See docs/agent-socket.md.

use std::{
    collections::HashMap,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::PermissionsExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use axum::{
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch, Semaphore},
};

use crate::{
    control::{Access, Caller, Command, ControlError, GrantRequest, RuntimeReply, TaskStart},
    identity::Names,
};

/// Where agents find the socket unless `agentwall run --agent-socket` says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/agentwall/agent.sock";

/// The admin socket's limits: connections served at once, time to send the request.
pub const MAX_CONNECTIONS: usize = 128;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections one agent may hold at once: one agent cannot take every slot from the others.
pub const MAX_CONNECTIONS_PER_AGENT: usize = 8;
/// Largest request body (a task's intent, a grant's reason).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// A connection's whole life: request, the controller's answer, the reply.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum AgentSocketError {
    #[error("{0}: another controller is serving here")]
    InUse(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] io::Error),
    /// SO_PEERPIDFD came with Linux 6.5: without it a caller cannot be told apart from a
    /// process that took its pid, so the socket is not served at all.
    #[error(
        "this kernel has no SO_PEERPIDFD (Linux 6.5+): the agent socket cannot identify callers \
         safely ({0}); run with --no-agent-socket to go without it"
    )]
    NoPeerPidfd(#[source] io::Error),
}

/// Binds the socket (0666: every agent may connect; the Unix guard lets it through unless the
/// agent's policy says `agent_socket: false`).
pub fn bind(path: &Path) -> Result<UnixListener, AgentSocketError> {
    let err = |e| AgentSocketError::Io(path.to_path_buf(), e);
    check_peer_pidfd().map_err(AgentSocketError::NoPeerPidfd)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentSocketError::InUse(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    Ok(listener)
}

/// Serves until `shutdown`, then removes the socket.
pub async fn serve(
    path: PathBuf,
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    names: Arc<RwLock<Names>>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_agent: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let stream = match conn {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("agent socket: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Every slot busy: closed at once (memory stays bounded).
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("agent socket: every connection slot is busy");
                    continue;
                };
                let (commands, names, per_agent) = (commands.clone(), names.clone(), per_agent.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let identity = identify(&stream, &names);
                    // Non-agents share one budget, each agent has its own.
                    let key = identity.as_ref().map_or(0, |p| p.cgroup_id);
                    let Some(_held) = Held::take(&per_agent, key) else {
                        return;
                    };
                    if let Err(e) = &identity {
                        tracing::debug!("agent socket: refused: {e}");
                    }
                    let router = router(Arc::new(Conn { identity, commands }));
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(REQUEST_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(stream),
                            hyper_util::service::TowerToHyperService::new(router),
                        );
                    match tokio::time::timeout(CONNECTION_TIMEOUT, served).await {
                        Ok(Err(e)) => tracing::debug!("agent socket connection: {e}"),
                        Err(_) => tracing::debug!("agent socket connection timed out"),
                        Ok(Ok(())) => {}
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// One agent's share of the connections, given back on drop.
struct Held(Arc<Mutex<HashMap<u64, usize>>>, u64);

impl Held {
    fn take(counts: &Arc<Mutex<HashMap<u64, usize>>>, key: u64) -> Option<Held> {
        let mut c = counts.lock().expect("agent socket counts");
        let n = c.entry(key).or_default();
        if *n >= MAX_CONNECTIONS_PER_AGENT {
            tracing::debug!(
                cgroup_id = key,
                "agent socket: this agent holds too many connections"
            );
            return None;
        }
        *n += 1;
        Some(Held(counts.clone(), key))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut c = self.0.lock().expect("agent socket counts");
        if let Some(n) = c.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.1);
            }
        }
    }
}

/// The agent at the other end, as the kernel identified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// The agent's name (last component of its cgroup path).
    pub agent: String,
    /// The agent's cgroup, relative to the cgroup2 root.
    pub cgroup: String,
    /// The agent cgroup's id (the caller may be in a cgroup below it).
    pub cgroup_id: u64,
    pub policy: String,
    /// The process that connected, and the cgroup it is in.
    pub pid: u32,
    pub process_cgroup: String,
}

impl Peer {
    fn caller(&self) -> Caller {
        Caller::Agent {
            cgroup_id: self.cgroup_id,
            pid: self.pid,
        }
    }

    /// Whether `named` (from a request body) is this agent: its name or its cgroup path.
    fn is(&self, named: &str) -> bool {
        named == self.agent || named.trim_start_matches('/') == self.cgroup
    }
}

/// Why a caller is not served.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Unidentified {
    #[error("the kernel gave no peer process for this connection")]
    NoPeer,
    #[error("identifying the caller (pid {0}): {1}")]
    Read(i32, String),
    #[error("the calling process (pid {0}) exited before it was identified")]
    Gone(i32),
    #[error(
        "the calling process (pid {pid}, cgroup /{cgroup}) is not in a registered agent's cgroup"
    )]
    NotAnAgent { pid: i32, cgroup: String },
}

/// The caller's agent: the peer's pidfd is taken from the socket (it names the process that
/// connected, whatever happens to its pid), its cgroup read from /proc/PID/cgroup, and the pidfd
/// checked alive afterwards: a live process still holds its pid, so the file read was its own.
pub fn identify(stream: &UnixStream, names: &RwLock<Names>) -> Result<Peer, Unidentified> {
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .filter(|p| *p > 0)
        .ok_or(Unidentified::NoPeer)?;
    let pidfd = peer_pidfd(stream).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => Unidentified::Gone(pid),
        _ => Unidentified::Read(pid, e.to_string()),
    })?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|_| Unidentified::Gone(pid))?;
    if exited(&pidfd).map_err(|e| Unidentified::Read(pid, e.to_string()))? {
        return Err(Unidentified::Gone(pid));
    }
    let cgroup = unified_path(&text)
        .ok_or_else(|| Unidentified::Read(pid, "no cgroup2 line in /proc/PID/cgroup".into()))?;
    nearest_agent(&names.read().expect("names"), &cgroup)
        .map(|(id, meta)| Peer {
            agent: meta.name.clone(),
            cgroup: meta.cgroup.clone(),
            cgroup_id: id,
            policy: meta.policy.clone(),
            pid: pid as u32,
            process_cgroup: cgroup.clone(),
        })
        .ok_or(Unidentified::NotAnAgent { pid, cgroup })
}

/// The cgroup2 path of a /proc/PID/cgroup text, relative (no leading '/').
fn unified_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/').to_string())
}

/// The registered agent at `rel` or its nearest ancestor.
fn nearest_agent<'a>(names: &'a Names, rel: &str) -> Option<(u64, &'a crate::identity::AgentMeta)> {
    let by_path: HashMap<&str, u64> = names
        .agents
        .iter()
        .map(|(id, m)| (m.cgroup.as_str(), *id))
        .collect();
    let mut at = rel;
    loop {
        if let Some(id) = by_path.get(at) {
            return names.agents.get(id).map(|m| (*id, m));
        }
        at = at.rsplit_once('/')?.0;
    }
}

fn peer_pidfd(stream: &impl AsRawFd) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a socket we own and an out-parameter of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            &mut fd as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd is readable once its process has exited.
fn exited(pidfd: &OwnedFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    match unsafe { libc::poll(&mut p, 1, 0) } {
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Ok(n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0),
    }
}

/// Whether the kernel hands out peer pidfds (a socketpair asks it).
fn check_peer_pidfd() -> io::Result<()> {
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    peer_pidfd(&a).map(drop)
}

/// One connection's context.
struct Conn {
    identity: Result<Peer, Unidentified>,
    commands: mpsc::Sender<Command>,
}

impl Conn {
    fn me(&self) -> Result<&Peer, ApiError> {
        self.identity.as_ref().map_err(|e| ApiError {
            status: StatusCode::FORBIDDEN,
            code: "permission-denied",
            field: None,
            message: format!("permission denied: {e}; the agent socket serves agents only"),
        })
    }

    async fn call<T>(&self, make: impl FnOnce(RuntimeReply<T>) -> Command) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let gone = || {
            ApiError::from(ControlError::Internal(
                "the controller is shutting down".into(),
            ))
        };
        self.commands.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(ApiError::from)
    }
}

const ROUTES: &str = "the agent socket serves GET /v1/self, POST and DELETE /v1/task, POST \
     /v1/access, GET /v1/requests/{id}";

fn router(conn: Arc<Conn>) -> Router {
    Router::new()
        .route("/v1/self", get(whoami))
        .route("/v1/task", post(task_start).delete(task_end))
        .route("/v1/access", post(access))
        .route("/v1/requests/{id}", get(own_request))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not-found",
                field: None,
                message: format!("no such route: {ROUTES}"),
            }
        })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                code: "method-not-allowed",
                field: None,
                message: format!("method not allowed: {ROUTES}"),
            }
        })
        .with_state(conn)
}

/// `POST /v1/task`: the caller's own task.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTask {
    /// May be given; must be the caller itself.
    #[serde(default)]
    pub agent: Option<String>,
    pub id: String,
    pub intent: String,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/access`: a grant for the caller itself (approved at once or not, as its policy says).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentAccess {
    /// May be given; must be the caller itself.
    #[serde(default)]
    pub agent: Option<String>,
    pub to: String,
    #[serde(default)]
    pub ports: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    pub ttl_secs: u64,
    #[serde(default)]
    pub task: Option<String>,
    pub reason: String,
}

async fn whoami(State(c): State<Arc<Conn>>) -> Result<Json<Peer>, ApiError> {
    Ok(Json(c.me()?.clone()))
}

async fn task_start(State(c): State<Arc<Conn>>, body: Body) -> Result<Response, ApiError> {
    let me = c.me()?;
    let t: AgentTask = read_json(body).await?;
    only_self(me, t.agent.as_deref())?;
    let req = TaskStart {
        agent: me.cgroup.clone(),
        id: t.id,
        intent: t.intent,
        ttl_secs: t.ttl_secs,
    };
    let by = me.caller();
    let info = c
        .call(|reply| Command::TaskStart { req, by, reply })
        .await?;
    Ok(Json(info).into_response())
}

async fn task_end(State(c): State<Arc<Conn>>) -> Result<Response, ApiError> {
    let me = c.me()?;
    let (agent, by) = (me.cgroup.clone(), me.caller());
    let ended = c
        .call(|reply| Command::TaskEnd { agent, by, reply })
        .await?;
    Ok(Json(ended).into_response())
}

async fn access(State(c): State<Arc<Conn>>, body: Body) -> Result<Response, ApiError> {
    let me = c.me()?;
    let a: AgentAccess = read_json(body).await?;
    only_self(me, a.agent.as_deref())?;
    let req = GrantRequest {
        agent: me.cgroup.clone(),
        to: a.to,
        ports: a.ports,
        protocol: a.protocol,
        ttl_secs: a.ttl_secs,
        task: a.task,
        reason: a.reason,
    };
    let by = me.caller();
    // Granted at once (`approve: auto`): 200 and the grant; else 202 and the pending request.
    match c.call(|reply| Command::Access { req, by, reply }).await? {
        Access::Granted(grant) => Ok(Json(grant).into_response()),
        Access::Pending(request) => Ok((StatusCode::ACCEPTED, Json(request)).into_response()),
    }
}

/// `GET /v1/requests/{id}`: one of the caller's own requests (another agent's is 404).
async fn own_request(
    State(c): State<Arc<Conn>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let me = c.me()?;
    let id: u64 = id.parse().map_err(|_| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid",
        field: Some("id".into()),
        message: format!("{id:?} is not a request id (a number)"),
    })?;
    let by = me.caller();
    let request = c.call(|reply| Command::Request { id, by, reply }).await?;
    Ok(Json(request).into_response())
}

/// An agent speaks only for itself.
fn only_self(me: &Peer, named: Option<&str>) -> Result<(), ApiError> {
    match named {
        Some(other) if !me.is(other) => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            code: "refused",
            field: Some("agent".into()),
            message: format!(
                "an agent speaks only for itself; this connection is agent {:?} (cgroup \
                 {:?}), not {other:?}",
                me.agent, me.cgroup
            ),
        }),
        _ => Ok(()),
    }
}

/// The body, bounded in size and time, as `T`; the error names the field.
async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bad = |status, message: String, field: Option<String>| ApiError {
        status,
        code: "invalid",
        field,
        message,
    };
    let bytes =
        match tokio::time::timeout(REQUEST_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES))
            .await
        {
            Err(_) => {
                return Err(ApiError {
                    code: "timeout",
                    ..bad(
                        StatusCode::REQUEST_TIMEOUT,
                        "the body did not arrive in time".into(),
                        None,
                    )
                })
            }
            Ok(Err(_)) => {
                return Err(ApiError {
                    code: "too-large",
                    ..bad(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                        None,
                    )
                })
            }
            Ok(Ok(b)) => b,
        };
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // "." is the body itself; "?" a place the parser could not name (a cut-off body).
        let field = (path != "." && path != "?").then_some(path);
        let reason = e.into_inner().to_string();
        bad(
            StatusCode::BAD_REQUEST,
            reason,
            Some(field.unwrap_or_else(|| "body".into())),
        )
    })
}

/// An error reply, in the admin API's shape: `{"error": kind, "field": ..., "message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    field: Option<String>,
    message: String,
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let (status, code, field, message) = match e {
            ControlError::Invalid { field, reason } => {
                (StatusCode::BAD_REQUEST, "invalid", Some(field), reason)
            }
            ControlError::NotFound(m) => (StatusCode::NOT_FOUND, "not-found", None, m),
            ControlError::Refused(m) => (StatusCode::FORBIDDEN, "refused", None, m),
            ControlError::Conflict(m) => (StatusCode::CONFLICT, "conflict", None, m),
            ControlError::TooMany(m) => (StatusCode::TOO_MANY_REQUESTS, "too-many", None, m),
            ControlError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None, m),
        };
        ApiError {
            status,
            code,
            field,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Wire<'a> {
            error: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            field: Option<&'a str>,
            message: &'a str,
        }
        let wire = Wire {
            error: self.code,
            message: &self.message,
            field: self.field.as_deref(),
        };
        (self.status, Json(wire)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AgentMeta;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn names(agents: &[(u64, &str)]) -> Names {
        let mut n = Names::default();
        for (id, cg) in agents {
            n.agents.insert(
                *id,
                AgentMeta {
                    name: crate::identity::agent_name(cg),
                    cgroup: cg.to_string(),
                    policy: "p".into(),
                },
            );
        }
        n
    }

    #[test]
    fn the_nearest_registered_ancestor_is_the_agent() {
        let n = names(&[(1, "a/outer"), (2, "a/outer/inner")]);
        assert_eq!(nearest_agent(&n, "a/outer/inner/x/y").unwrap().0, 2);
        assert_eq!(nearest_agent(&n, "a/outer/other").unwrap().0, 1);
        assert_eq!(nearest_agent(&n, "a/outer").unwrap().0, 1);
        assert!(nearest_agent(&n, "a/outerx").is_none());
        assert!(nearest_agent(&n, "a").is_none());
        assert!(nearest_agent(&n, "").is_none());
    }

    #[test]
    fn the_unified_line_is_read() {
        let text = "12:cpu:/x\n0::/agentwall/a b\n";
        assert_eq!(unified_path(text).as_deref(), Some("agentwall/a b"));
        assert_eq!(unified_path("0::/\n").as_deref(), Some(""));
        assert_eq!(unified_path("1:name=systemd:/\n"), None);
    }

    /// The socket served over a temp path, with this test process's own cgroup registered as
    /// the agent `me` (or nothing registered); the commands the controller would get come out.
    async fn serve_here(
        register: bool,
    ) -> (
        PathBuf,
        mpsc::Receiver<Command>,
        watch::Sender<bool>,
        String,
    ) {
        let own = unified_path(&std::fs::read_to_string("/proc/self/cgroup").unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "agentwall-agent-sock-{}-{}",
            std::process::id(),
            register
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("agent.sock");
        let listener = bind(&path).unwrap();
        let names = Arc::new(RwLock::new(if register {
            names(&[(42, &own)])
        } else {
            Names::default()
        }));
        let (tx, rx) = mpsc::channel(8);
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(path.clone(), listener, tx, names, stopped));
        (path, rx, stop, own)
    }

    async fn http(path: &Path, method: &str, route: &str, body: &str) -> (u16, serde_json::Value) {
        let mut s = UnixStream::connect(path).await.unwrap();
        let req = format!(
            "{method} {route} HTTP/1.1\r\nHost: agentwall\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1;
        (status, serde_json::from_str(body).unwrap_or_default())
    }

    #[tokio::test]
    async fn an_agent_speaks_for_itself_only() {
        let (path, mut rx, stop, own) = serve_here(true).await;
        let (status, me) = http(&path, "GET", "/v1/self", "").await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["cgroup_id"], 42);
        assert_eq!(me["cgroup"], own.as_str());
        assert_eq!(me["pid"], std::process::id());

        // The controller's answer comes back with its status; the request went out as ours.
        let client = tokio::spawn({
            let path = path.clone();
            async move {
                http(
                    &path,
                    "POST",
                    "/v1/task",
                    r#"{"id":"t1","intent":"read docs","ttl_secs":60}"#,
                )
                .await
            }
        });
        let Some(Command::TaskStart { req, by, reply }) = rx.recv().await else {
            panic!("expected a TaskStart command");
        };
        assert_eq!(req.agent, own);
        assert_eq!((req.id.as_str(), req.ttl_secs), ("t1", Some(60)));
        assert_eq!(
            by,
            Caller::Agent {
                cgroup_id: 42,
                pid: std::process::id()
            }
        );
        let _ = reply.send(Err(ControlError::Refused("outside grantable".into())));
        let (status, err) = client.await.unwrap();
        assert_eq!((status, err["error"].as_str()), (403, Some("refused")));

        let (status, err) = http(
            &path,
            "POST",
            "/v1/access",
            r#"{"agent":"someone-else","to":"127.0.0.1/32","ttl_secs":5,"reason":"x"}"#,
        )
        .await;
        assert_eq!(
            (status, err["field"].as_str()),
            (403, Some("agent")),
            "{err}"
        );

        let (status, err) = http(&path, "POST", "/v1/task", r#"{"id":"t","intent":5}"#).await;
        assert_eq!(
            (status, err["field"].as_str()),
            (400, Some("intent")),
            "{err}"
        );
        let (status, err) = http(&path, "POST", "/v1/task", r#"{"id":"t","#).await;
        assert_eq!(status, 400, "{err}");
        let (status, err) = http(
            &path,
            "POST",
            "/v1/task",
            r#"{"id":"t","intent":"i","grant":true}"#,
        )
        .await;
        assert_eq!(status, 400, "{err}");
        let big = format!(r#"{{"id":"t","intent":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
        let (status, _) = http(&path, "POST", "/v1/task", &big).await;
        assert_eq!(status, 413);
        let (status, _) = http(&path, "GET", "/v1/grants", "").await;
        assert_eq!(status, 404);
        let (status, err) = http(&path, "GET", "/v1/task", "").await;
        assert_eq!(
            (status, err["error"].as_str()),
            (405, Some("method-not-allowed"))
        );
        // Nothing but the one task request reached the controller.
        assert!(rx.try_recv().is_err());
        let _ = stop.send(true);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// The pid race: a caller that exited after connecting is never identified, even though its
    /// pid (not reaped yet) still shows the cgroup of an agent.
    #[tokio::test]
    async fn a_caller_that_exited_is_not_identified() {
        let own = unified_path(&std::fs::read_to_string("/proc/self/cgroup").unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!("agentwall-agent-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Built before the fork: the child only makes system calls.
        // SAFETY: an all-zero sockaddr_un is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *s as libc::c_char;
        }
        // SAFETY: the child connects and exits at once, touching no lock or allocation.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain system calls on values owned by this child.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::connect(
                    fd,
                    &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                libc::_exit(0);
            }
        }
        assert!(pid > 0);
        // Exited, not reaped: the pid is still its own.
        // SAFETY: waiting for our own child; an all-zero siginfo_t is valid.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            );
        }
        let (conn, _) = listener.accept().unwrap();
        conn.set_nonblocking(true).unwrap();
        let conn = UnixStream::from_std(conn).unwrap();
        let names = RwLock::new(names(&[(42, &own)]));
        assert_eq!(identify(&conn, &names), Err(Unidentified::Gone(pid)));
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_process_that_is_not_an_agent_is_refused() {
        let (path, mut rx, stop, _) = serve_here(false).await;
        for (method, route, body) in [
            ("GET", "/v1/self", ""),
            ("POST", "/v1/task", r#"{"id":"t","intent":"i"}"#),
            ("DELETE", "/v1/task", ""),
        ] {
            let (status, err) = http(&path, method, route, body).await;
            assert_eq!(
                (status, err["error"].as_str()),
                (403, Some("permission-denied")),
                "{err}"
            );
        }
        assert!(rx.try_recv().is_err());
        let _ = stop.send(true);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
