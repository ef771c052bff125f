//! The control socket: one JSON request per connection, one JSON reply. `agentwall exec` uses it
//! to have an agent's cgroup registered BEFORE the agent runs, so no agent ever runs unenforced.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot, watch},
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
    let mut stream =
        UnixStream::connect(socket).map_err(|e| ClientError::Connect(socket.into(), e))?;
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
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = match conn {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!(error = %e, "control socket accept"); continue; }
                };
                let commands = commands.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, commands).await {
                        tracing::debug!(error = %e, "control connection");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(
    stream: tokio::net::UnixStream,
    commands: mpsc::Sender<Command>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(rd.take(MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::err(format!("bad request: {e}")),
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Api(req, tx)).await.is_err() {
                Response::err("the controller is shutting down")
            } else {
                rx.await
                    .unwrap_or_else(|_| Response::err("the controller is shutting down"))
            }
        }
    };
    let mut out = serde_json::to_string(&resp).map_err(std::io::Error::other)?;
    out.push('\n');
    wr.write_all(out.as_bytes()).await
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
