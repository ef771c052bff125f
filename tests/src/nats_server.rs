//! Harness for the NATS tests: a real nats-server (Debian's package) with JetStream on
//! 127.0.0.1, started and stopped by pid with its own store directory, and a reader of what
//! a stream holds.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;

/// The nats-server binary: on PATH, or where Debian installs it. Fails (never skips) when absent.
pub fn nats_server_bin() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .context(
            "nats-server is missing: the NATS tests need Debian's nats-server package \
             (`cargo xtask setup` installs it; or `apt-get install nats-server`)",
        )
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A nats-server with JetStream, listening on 127.0.0.1:`port`, storing in `store`. Dropping it
/// kills it (by pid).
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub store: PathBuf,
}

impl NatsServer {
    /// Starts it and waits until it accepts connections.
    pub fn start(store: &Path, port: u16) -> Result<Self> {
        let bin = nats_server_bin()?;
        std::fs::create_dir_all(store)?;
        let log = store.join("nats-server.log");
        let child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut s = Self {
            child: Some(child),
            port,
            store: store.to_path_buf(),
        };
        // It writes its log as it comes up (and when it listens): each write wakes the wait.
        crate::wait::until(
            "nats-server listening",
            Duration::from_secs(10),
            &[crate::wait::dir_of(&log)],
            || {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Some(()));
                }
                if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    s.child = None;
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    bail!("nats-server exited with {status}: {text}");
                }
                Ok(None)
            },
        )?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGTERM to its pid) and waits until it has exited.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of the child this value started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait().context("waiting for nats-server to exit")?;
        }
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One message of the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub stream_seq: u64,
    pub subject: String,
    pub msg_id: String,
    pub record: serde_json::Value,
}

/// Reads a stream in full; a core subscription on its subjects paces the waits (each message
/// published wakes the reader).
pub struct StreamReader {
    js: async_nats::jetstream::Context,
    stream: String,
    live: async_nats::Subscriber,
    seen: Vec<Stored>,
}

impl StreamReader {
    pub async fn connect(url: &str, stream: &str, subjects: &str) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .reconnect_delay_callback(|_| Duration::from_millis(100))
            .connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let live = client.subscribe(subjects.to_string()).await?;
        Ok(Self {
            js: async_nats::jetstream::new(client),
            stream: stream.into(),
            live,
            seen: Vec::new(),
        })
    }

    /// Every message stored so far, in stream order; an error while the broker is away or the
    /// stream not there yet.
    pub async fn read(&mut self) -> Result<&[Stored]> {
        let mut s = self.js.get_stream(&self.stream).await?;
        let last = s.info().await?.state.last_sequence;
        let from = self.seen.last().map_or(1, |m| m.stream_seq + 1);
        for seq in from..=last {
            let m = s.get_raw_message(seq).await?;
            let msg_id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_string())
                .with_context(|| format!("stream message {seq} has no Nats-Msg-Id"))?;
            self.seen.push(Stored {
                stream_seq: seq,
                subject: m.subject.to_string(),
                msg_id,
                record: serde_json::from_slice(&m.payload)
                    .with_context(|| format!("stream message {seq} is not JSON"))?,
            });
        }
        Ok(&self.seen)
    }

    /// Reads until `done` says Some (fails after `timeout`); between reads, waits for the next
    /// live message (or a second).
    pub async fn until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Stored]) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            match self.read().await {
                Ok(all) => {
                    if let Some(v) = done(all)? {
                        return Ok(v);
                    }
                }
                Err(e) => last_err = Some(e),
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; the stream holds {} \
                     messages; last error: {last_err:?}",
                    self.seen.len()
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.live.next()).await;
        }
    }
}
