//! The CLI's client of the control API: one HTTP/1 request per connection over the Unix socket.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper::{body::Bytes, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;

use super::wire::ApiError;

/// How long the whole exchange may take (a reload of a large directory included).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket is root's (0600): nothing else is wrong, and nothing else is said.
    #[error("permission denied: the agentwall control socket {0} is for root only")]
    PermissionDenied(PathBuf),
    #[error("cannot reach the agentwall controller at {0}: {1} (is `agentwall run` running?)")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("talking to the controller at {0}: {1}")]
    Io(PathBuf, String),
    #[error("the controller's reply is not valid: {0}")]
    Reply(String),
    /// The controller answered with an error (status, and the API's error body).
    #[error("the controller refused ({status}): {error}")]
    Api { status: u16, error: ApiError },
}

impl ClientError {
    /// The API error, when the controller answered with one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            Self::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Sends one request (blocking; the CLI's) and returns the JSON reply of a 2xx answer.
pub fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Io(socket.into(), e.to_string()))?;
    rt.block_on(async {
        match tokio::time::timeout(CLIENT_TIMEOUT, call_async(socket, method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Io(
                socket.into(),
                format!("no reply within {CLIENT_TIMEOUT:?}"),
            )),
        }
    })
}

/// As [`call`], inside a runtime.
pub async fn call_async(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.into()),
            _ => ClientError::Connect(socket.into(), e),
        })?;
    let io = |e: hyper::Error| ClientError::Io(socket.into(), chain(&e));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io)?;
    tokio::spawn(conn);
    let bytes = match &body {
        Some(v) => serde_json::to_vec(v).map_err(|e| ClientError::Reply(e.to_string()))?,
        None => Vec::new(),
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| ClientError::Io(socket.into(), e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(io)?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(io)?.to_bytes();
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| ClientError::Reply(e.to_string()));
    }
    let mut error: ApiError = serde_json::from_slice(&bytes).map_err(|_| {
        ClientError::Reply(format!(
            "{status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
        ))
    })?;
    error.status = status.as_u16();
    Err(ClientError::Api {
        status: status.as_u16(),
        error,
    })
}

/// An error and its sources, on one line (hyper's own message alone says little).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// Whether an answer was this status (tests, callers that treat one status apart).
pub fn is_status(e: &ClientError, s: StatusCode) -> bool {
    matches!(e, ClientError::Api { status, .. } if *status == s.as_u16())
}
