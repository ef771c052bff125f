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
    let resp = send(socket, method, path, body).await?;
    let io = |e: hyper::Error| ClientError::Io(socket.into(), chain(&e));
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(io)?.to_bytes();
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| ClientError::Reply(e.to_string()));
    }
    Err(refusal(status, &bytes))
}

/// Opens a stream (`GET /v1/events?...`): the controller's refusal as [`call`] returns it, or
/// the lines of its answer as they come.
pub async fn follow(socket: &Path, path: &str) -> Result<Lines, ClientError> {
    let resp = tokio::time::timeout(CLIENT_TIMEOUT, send(socket, Method::GET, path, None))
        .await
        .map_err(|_| {
            ClientError::Io(socket.into(), format!("no reply within {CLIENT_TIMEOUT:?}"))
        })??;
    let status = resp.status();
    if !status.is_success() {
        let io = |e: hyper::Error| ClientError::Io(socket.into(), chain(&e));
        let bytes = resp.into_body().collect().await.map_err(io)?.to_bytes();
        return Err(refusal(status, &bytes));
    }
    Ok(Lines {
        body: resp.into_body(),
        buf: Vec::new(),
        socket: socket.into(),
    })
}

/// The lines of a streamed answer.
pub struct Lines {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    socket: PathBuf,
}

impl Lines {
    /// The next line (without its newline); None at the end of the stream.
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(Some(line));
            }
            match self.body.frame().await {
                None if self.buf.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.buf))),
                Some(Err(e)) => return Err(ClientError::Io(self.socket.clone(), chain(&e))),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Sends one request; the answer's head, its body to read.
async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
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
    sender.send_request(req).await.map_err(io)
}

/// The error of an answer that is not 2xx.
fn refusal(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ApiError>(bytes) {
        Ok(mut error) => {
            error.status = status.as_u16();
            ClientError::Api {
                status: status.as_u16(),
                error,
            }
        }
        Err(_) => ClientError::Reply(format!(
            "{status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
        )),
    }
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
