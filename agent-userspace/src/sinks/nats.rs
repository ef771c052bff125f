//! The NATS JetStream publisher: a tailer of the audit log. It reads the audit files in order
//! from a cursor (file, byte offset, last sequence), publishes each line and moves the cursor
//! only once the broker has acknowledged it, so the audit files themselves are the on-disk
//! spool: while the broker is away the cursor just stays, also across controller restarts (it
//! is persisted beside the audit log). Nothing here can slow the event reader or enforcement:
//! the publisher only reads files the reader has written. A segment deleted by retention before
//! it was published is reported as a `lost` record (`where: nats-spool`) through the notices.

use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use async_nats::{
    header::HeaderMap,
    jetstream::{self, stream},
    ConnectOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

pub use super::ocsf::Format;
use super::AuditRecord;
use crate::events::Notice;

/// The default subject prefix: records go to `<prefix>.<node>.<kind>`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "agentwall";
/// The default stream, created with the subjects `<prefix>.>` when missing.
pub const DEFAULT_STREAM: &str = "AGENTWALL";
/// The broker drops a message whose `Nats-Msg-Id` it saw within this window.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Lines published before their acknowledgements are awaited.
const BATCH_LINES: usize = 512;
const BATCH_BYTES: usize = 1 << 20;
/// How often an idle tailer looks for new lines.
const POLL: Duration = Duration::from_millis(25);
/// How long one acknowledgement (and a JetStream API call) may take.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// The cursor is written at most this often while a backlog drains (and whenever idle).
const PERSIST_EVERY: Duration = Duration::from_millis(500);
/// Retries of an unreachable broker: from RETRY_MIN, doubling up to RETRY_MAX.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long the publisher keeps publishing after the controller stopped.
const FINAL_GRACE: Duration = Duration::from_secs(2);

/// `agentwall run --nats URL ...`.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// nats://host:port (or a comma-separated list of servers).
    pub url: String,
    /// Subjects are `<prefix>.<node>.<kind>`.
    pub subject_prefix: String,
    /// The JetStream stream; created (subjects `<prefix>.>`, file storage) when missing.
    pub stream: String,
    /// Used only when this publisher creates the stream.
    pub duplicate_window: Duration,
    pub format: Format,
    /// Where the cursor is kept [default: `<audit log>.nats-cursor`].
    pub cursor: Option<PathBuf>,
}

impl NatsOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.into(),
            stream: DEFAULT_STREAM.into(),
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            format: Format::Native,
            cursor: None,
        }
    }

    /// The cursor file of the audit log at `audit_log`.
    pub fn cursor_path(&self, audit_log: &Path) -> PathBuf {
        self.cursor.clone().unwrap_or_else(|| {
            let mut p = audit_log.as_os_str().to_owned();
            p.push(".nats-cursor");
            p.into()
        })
    }

    /// Refuses a prefix that is not a valid subject (checked at start).
    pub fn validate(&self) -> Result<(), NatsError> {
        let bad = self.subject_prefix.is_empty()
            || self
                .subject_prefix
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>', ' ', '\t', '\r', '\n']));
        if bad {
            return Err(NatsError::Config(format!(
                "--nats-subject {:?}: tokens separated by '.', none empty, without '*', '>' or \
                 white space",
                self.subject_prefix
            )));
        }
        if self.stream.is_empty() || self.stream.contains(['.', '*', '>', ' ', '/', '\\']) {
            return Err(NatsError::Config(format!(
                "--nats-stream {:?}: a name without '.', '*', '>', '/' or white space",
                self.stream
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("NATS publisher: {0}")]
    Config(String),
    #[error("NATS cursor {}: {what}: {source}", path.display())]
    Cursor {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("NATS cursor {}: {source}", path.display())]
    CursorFormat {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("reading the audit log {}: {source}", path.display())]
    Audit {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One audit file: its rotation counter (None: the live PATH) and identity.
#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    counter: Option<u64>,
    id: (u64, u64),
}

/// The audit files in order (`sinks::audit::segments`), with counter and identity.
fn listing(path: &Path) -> io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    for p in super::audit::segments(path)? {
        let m = match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => m,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // removed meanwhile
            Err(e) => return Err(e),
        };
        let counter = (p != path)
            .then(|| p.extension().and_then(|e| e.to_str()?.parse().ok()))
            .flatten();
        out.push(Segment {
            id: (m.dev(), m.ino()),
            path: p,
            counter,
        });
    }
    Ok(out)
}

/// Where the publisher is: the next byte to publish, in which file, and the last record
/// acknowledged. Persisted as JSON (root only), replaced atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// (st_dev, st_ino) of the file: the live file keeps them when it is renamed to PATH.<n>.
    pub dev: u64,
    pub ino: u64,
    /// Its rotation counter when known; else the highest counter seen while it was the live
    /// file (its own will be higher).
    pub counter: Option<u64>,
    pub floor: u64,
    pub offset: u64,
    pub boot_id: String,
    pub seq: u64,
    /// False before anything was published: start at the oldest audit file.
    pub started: bool,
}

impl Cursor {
    pub fn load(path: &Path) -> Result<Option<Self>, NatsError> {
        match std::fs::read(path) {
            Ok(b) => {
                serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|source| NatsError::CursorFormat {
                        path: path.into(),
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NatsError::Cursor {
                path: path.into(),
                what: "reading",
                source,
            }),
        }
    }

    /// Writes a temp file beside `path` (mode 0600), syncs it, renames it over `path`.
    pub fn store(&self, path: &Path) -> Result<(), NatsError> {
        let err = |what| {
            move |source| NatsError::Cursor {
                path: path.into(),
                what,
                source,
            }
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err("creating"))?;
        let body = serde_json::to_vec(self).expect("a cursor serializes");
        f.write_all(&body).map_err(err("writing"))?;
        f.sync_data().map_err(err("syncing"))?;
        std::fs::rename(&tmp, path).map_err(err("replacing"))
    }
}

/// One audit line to publish.
#[derive(Debug, Clone)]
pub struct Line {
    pub subject: String,
    pub msg_id: String,
    pub payload: bytes::Bytes,
}

/// Lines of one file, and what the cursor is once all of them are acknowledged.
#[derive(Debug, Default)]
pub struct Batch {
    pub lines: Vec<Line>,
    pub end: Cursor,
}

/// A loss found while tailing: records that were rotated away before they were published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// Records missing by sequence (a lower bound when `at_least`).
    pub records: u64,
    pub at_least: bool,
    pub after_seq: u64,
    pub next_seq: u64,
}

/// Reads the audit files forward from a cursor; hands out whole lines only.
pub struct Tailer {
    path: PathBuf,
    node_fallback: String,
    boot_fallback: String,
    prefix: String,
    format: Format,
    file: Option<File>,
    /// Where the next read starts (the cursor is the acknowledged position).
    pos: Cursor,
    /// After switching files: compare the next record's seq with the last one.
    check_gap: bool,
    losses: Vec<Loss>,
    skipped: u64,
}

impl Tailer {
    /// Starts at `cursor`, or at the oldest audit file when there is none.
    pub fn new(path: &Path, cursor: Option<Cursor>, prefix: &str, format: Format) -> Self {
        let resumed = cursor.as_ref().is_some_and(|c| c.started);
        Self {
            path: path.to_path_buf(),
            node_fallback: crate::events::node_name(),
            boot_fallback: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            prefix: prefix.to_string(),
            format,
            file: None,
            pos: cursor.unwrap_or_default(),
            check_gap: resumed,
            losses: Vec::new(),
            skipped: 0,
        }
    }

    /// The losses found since the last call.
    pub fn take_losses(&mut self) -> Vec<Loss> {
        std::mem::take(&mut self.losses)
    }

    /// Lines that were not audit records (skipped), since the last call.
    pub fn take_skipped(&mut self) -> u64 {
        std::mem::take(&mut self.skipped)
    }

    /// The next lines (of one file), or an empty batch when there is nothing new.
    pub fn next_batch(&mut self) -> Result<Batch, NatsError> {
        let path = self.path.clone();
        if self.file.is_none() && !self.open_current().map_err(audit_err(&path))? {
            return Ok(Batch::default());
        }
        loop {
            let batch = self.read_lines().map_err(audit_err(&path))?;
            if !batch.lines.is_empty() {
                return Ok(batch);
            }
            // At the end of this file: is there a newer one?
            let list = listing(&path).map_err(audit_err(&path))?;
            let me = (self.pos.dev, self.pos.ino);
            let mine = list.iter().position(|s| s.id == me);
            match mine {
                Some(i) => {
                    if let Some(c) = list[i].counter {
                        self.pos.counter = Some(c);
                    } else {
                        self.pos.floor = list.iter().filter_map(|s| s.counter).max().unwrap_or(0);
                    }
                    if i + 1 == list.len() {
                        return Ok(Batch::default());
                    }
                }
                None if self.file.is_some() && list.is_empty() => return Ok(Batch::default()),
                None => {}
            }
            // Rotated away: what was appended before the rename is read first.
            let tail = self.read_lines().map_err(audit_err(&path))?;
            if !tail.lines.is_empty() {
                return Ok(tail);
            }
            let after = self.pos.counter.unwrap_or(self.pos.floor);
            let next = list
                .into_iter()
                .find(|s| s.id != me && s.counter.is_none_or(|c| c > after));
            let Some(next) = next else {
                return Ok(Batch::default());
            };
            if !self.switch_to(&next).map_err(audit_err(&path))? {
                return Ok(Batch::default());
            }
        }
    }

    /// Opens the cursor's file, or the right one after it when it is gone. False: no audit
    /// file yet.
    fn open_current(&mut self) -> io::Result<bool> {
        let list = listing(&self.path)?;
        if !self.pos.started {
            return match list.first() {
                Some(first) => self.switch_to(first),
                None => Ok(false),
            };
        }
        let me = (self.pos.dev, self.pos.ino);
        if let Some(s) = list.iter().find(|s| s.id == me) {
            let f = File::open(&s.path)?;
            let len = f.metadata()?.len();
            // A file of that identity but not ours (the inode was reused): the offset must
            // sit at a line's start within it.
            let at_line_start = self.pos.offset == 0
                || (self.pos.offset <= len && {
                    let mut b = [0u8; 1];
                    f.read_exact_at(&mut b, self.pos.offset - 1).is_ok() && b[0] == b'\n'
                });
            if at_line_start {
                if let Some(c) = s.counter {
                    self.pos.counter = Some(c);
                }
                self.file = Some(f);
                self.check_gap = false;
                return Ok(true);
            }
            tracing::warn!(path = %s.path.display(), offset = self.pos.offset,
                "NATS cursor does not match its audit file: continuing after it");
        }
        // Gone (retention) or replaced: the first file after it.
        let after = self.pos.counter.unwrap_or(self.pos.floor);
        match list
            .iter()
            .find(|s| s.id != me && s.counter.is_none_or(|c| c > after))
        {
            Some(next) => self.switch_to(next),
            None => Ok(false),
        }
    }

    /// Starts reading `seg` from its beginning.
    fn switch_to(&mut self, seg: &Segment) -> io::Result<bool> {
        let f = match File::open(&seg.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let m = f.metadata()?;
        if self.pos.started {
            self.check_gap = true;
        }
        self.pos.dev = m.dev();
        self.pos.ino = m.ino();
        self.pos.counter = seg.counter;
        self.pos.offset = 0;
        self.file = Some(f);
        Ok(true)
    }

    /// Whole lines from `pos.offset` on (up to a batch), advancing `pos`.
    fn read_lines(&mut self) -> io::Result<Batch> {
        let Some(f) = &self.file else {
            return Ok(Batch::default());
        };
        let len = f.metadata()?.len();
        if len < self.pos.offset {
            tracing::error!(path = %self.path.display(), offset = self.pos.offset, len,
                "the audit file being published was truncated: continuing at its end");
            self.pos.offset = len;
        }
        let want = ((len - self.pos.offset) as usize).min(BATCH_BYTES);
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match f.read_at(&mut buf[got..], self.pos.offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if let Some(l) = self.line(line) {
                lines.push(l);
            }
            if lines.len() == BATCH_LINES {
                break;
            }
        }
        self.pos.offset += start as u64;
        self.pos.started = true;
        Ok(Batch {
            lines,
            end: self.pos.clone(),
        })
    }

    /// One line as a message; None (counted) for what is not a record.
    fn line(&mut self, raw: &[u8]) -> Option<Line> {
        // Checkpoints sign the file's chain; they are not records (docs/nats.md).
        if raw.iter().all(u8::is_ascii_whitespace) || super::chain::is_checkpoint(raw) {
            return None;
        }
        let Some((h, is_ocsf)) = Head::parse(raw) else {
            self.skipped += 1;
            return None;
        };
        let node = h
            .node
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.node_fallback);
        let boot = h
            .boot_id
            .as_deref()
            .filter(|b| !b.is_empty())
            .unwrap_or(&self.boot_fallback)
            .to_string();
        if self.check_gap {
            self.check_gap = false;
            if boot == self.pos.boot_id && h.seq > self.pos.seq + 1 {
                self.losses.push(Loss {
                    records: h.seq - self.pos.seq - 1,
                    at_least: false,
                    after_seq: self.pos.seq,
                    next_seq: h.seq,
                });
            } else if boot != self.pos.boot_id && !self.pos.boot_id.is_empty() && h.seq > 1 {
                // Another boot: its records before this one are missing at least.
                self.losses.push(Loss {
                    records: h.seq - 1,
                    at_least: true,
                    after_seq: 0,
                    next_seq: h.seq,
                });
            }
        }
        let subject = format!(
            "{}.{}.{}",
            self.prefix,
            token(node),
            token(h.kind.as_deref().unwrap_or("record"))
        );
        let msg_id = format!("{node}.{boot}.{}", h.seq);
        self.pos.seq = h.seq;
        self.pos.boot_id = boot;
        let payload = match self.format {
            // The audit line as written (with whatever the audit log adds, e.g. its chain); an
            // OCSF audit log's lines are OCSF already.
            _ if is_ocsf => bytes::Bytes::copy_from_slice(raw),
            Format::Native => bytes::Bytes::copy_from_slice(raw),
            Format::Ocsf => match serde_json::from_slice::<AuditRecord>(raw)
                .and_then(|r| serde_json::to_vec(&super::ocsf::to_ocsf(&r)))
            {
                Ok(v) => v.into(),
                Err(_) => {
                    self.skipped += 1;
                    return None;
                }
            },
        };
        Some(Line {
            subject,
            msg_id,
            payload,
        })
    }
}

type Text<'a> = Option<std::borrow::Cow<'a, str>>;

/// What names a record, read from its line without parsing the rest.
#[derive(Deserialize)]
struct Head<'a> {
    seq: u64,
    #[serde(borrow, default)]
    node: Text<'a>,
    #[serde(borrow, default)]
    boot_id: Text<'a>,
    #[serde(borrow, default)]
    kind: Text<'a>,
}

/// The same in an OCSF line (`--format ocsf` audit logs, sinks/ocsf.rs).
#[derive(Deserialize)]
struct OcsfHead<'a> {
    #[serde(borrow)]
    metadata: OcsfMetadata<'a>,
    #[serde(borrow, default)]
    device: Option<OcsfDevice<'a>>,
}

#[derive(Deserialize)]
struct OcsfMetadata<'a> {
    sequence: u64,
    #[serde(borrow, default)]
    event_code: Text<'a>,
}

#[derive(Deserialize)]
struct OcsfDevice<'a> {
    #[serde(borrow, default)]
    hostname: Text<'a>,
    #[serde(borrow, default)]
    boot_uid: Text<'a>,
}

impl<'a> Head<'a> {
    /// A native line, or an OCSF one (true).
    fn parse(raw: &'a [u8]) -> Option<(Self, bool)> {
        if let Ok(h) = serde_json::from_slice::<Head>(raw) {
            return Some((h, false));
        }
        let o = serde_json::from_slice::<OcsfHead>(raw).ok()?;
        let (node, boot_id) = o.device.map_or((None, None), |d| (d.hostname, d.boot_uid));
        Some((
            Head {
                seq: o.metadata.sequence,
                node,
                boot_id,
                kind: o.metadata.event_code,
            },
            true,
        ))
    }
}

fn audit_err(path: &Path) -> impl FnOnce(io::Error) -> NatsError + '_ {
    move |source| NatsError::Audit {
        path: path.to_path_buf(),
        source,
    }
}

/// One subject token: what NATS gives a meaning to ('.', '*', '>', white space) becomes '_'.
pub fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}

/// A connected JetStream context with the stream in place.
struct Broker {
    client: async_nats::Client,
    js: jetstream::Context,
}

async fn connect(opts: &NatsOptions) -> anyhow::Result<Broker> {
    use anyhow::Context as _;
    let client = ConnectOptions::new()
        .name("agentwall")
        .connection_timeout(ACK_TIMEOUT)
        .request_timeout(Some(ACK_TIMEOUT))
        // Reconnects quickly after an outage; the publisher retries what was not acknowledged.
        .reconnect_delay_callback(|n| {
            (RETRY_MIN * 2u32.saturating_pow(n.min(8) as u32)).min(RETRY_MAX)
        })
        .max_reconnects(None)
        .connect(opts.url.as_str())
        .await
        .with_context(|| format!("connecting to {}", opts.url))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(ACK_TIMEOUT);
    let subjects = format!("{}.>", opts.subject_prefix);
    // Created when missing; an existing stream is used as the broker's operator set it up.
    let mut s = js
        .get_or_create_stream(stream::Config {
            name: opts.stream.clone(),
            subjects: vec![subjects.clone()],
            storage: stream::StorageType::File,
            duplicate_window: opts.duplicate_window,
            ..Default::default()
        })
        .await
        .with_context(|| format!("ensuring the stream {} for {subjects}", opts.stream))?;
    let info = s.info().await.context("reading the stream's config")?;
    if !info.config.subjects.iter().any(|x| covers(x, &subjects)) {
        tracing::warn!(stream = %opts.stream, subjects = ?info.config.subjects,
            want = %subjects, "the NATS stream does not take all of this publisher's subjects");
    }
    Ok(Broker { client, js })
}

/// Whether the stream subject `have` takes every subject of `want` (`<prefix>.>`).
fn covers(have: &str, want: &str) -> bool {
    let (h, w): (Vec<_>, Vec<_>) = (have.split('.').collect(), want.split('.').collect());
    for (i, t) in h.iter().enumerate() {
        match (*t, w.get(i)) {
            (">", Some(_)) => return true,
            (_, Some(&">")) | (_, None) => return false,
            ("*", Some(_)) => {}
            (a, Some(b)) if a == *b => {}
            _ => return false,
        }
    }
    h.len() == w.len()
}

/// Publishes one batch and waits for every acknowledgement; the count of duplicates the
/// broker dropped.
async fn publish(b: &Broker, batch: &Batch) -> anyhow::Result<u64> {
    let mut acks = Vec::with_capacity(batch.lines.len());
    for l in &batch.lines {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", l.msg_id.as_str());
        acks.push(
            b.js.publish_with_headers(l.subject.clone(), h, l.payload.clone())
                .await?,
        );
    }
    let mut dup = 0;
    // In order; the first failure fails the batch (the rest are retried with it).
    for a in acks {
        dup += u64::from(a.await?.duplicate);
    }
    Ok(dup)
}

/// Publishes the audit log at `audit_log` until `stop` turns true, then what is already written
/// (for at most FINAL_GRACE). Broker and file errors are logged and retried; it never fails.
pub async fn run(
    opts: NatsOptions,
    audit_log: PathBuf,
    notices: mpsc::UnboundedSender<Notice>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NatsError> {
    let cursor_path = opts.cursor_path(&audit_log);
    let cursor = Cursor::load(&cursor_path)?;
    if let Some(c) = &cursor {
        tracing::info!(cursor = %cursor_path.display(), seq = c.seq, offset = c.offset,
            "NATS publisher resuming from its cursor");
    }
    let mut tailer = Tailer::new(
        &audit_log,
        cursor.clone(),
        &opts.subject_prefix,
        opts.format,
    );
    let mut acked = cursor.unwrap_or_default();
    let mut stored = acked.clone();
    let mut stored_at = Instant::now();
    let mut broker: Option<Broker> = None;
    let mut pending: Option<Batch> = None;
    let mut failing: Option<Failing> = None;
    let mut deadline: Option<Instant> = None;
    let mut published: u64 = 0;
    loop {
        if deadline.is_none() && (*stop.borrow() || stop.has_changed().is_err()) {
            deadline = Some(Instant::now() + FINAL_GRACE);
        }
        let stopping = deadline.is_some();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if pending.is_some() {
                tracing::warn!(
                    "NATS publisher stopping with records unpublished: the next \
                    controller publishes them from the cursor"
                );
            }
            break;
        }
        // Wait for the next try (a failure) or for new lines (idle), unless stopping.
        let wait = failing
            .as_ref()
            .map(|f| f.next.saturating_duration_since(Instant::now()));
        if let Some(w) = wait.filter(|w| !w.is_zero()) {
            let w = deadline.map_or(w, |d| w.min(d.saturating_duration_since(Instant::now())));
            tokio::select! {
                _ = tokio::time::sleep(w) => {}
                _ = stopped(&mut stop), if !stopping => {}
            }
            continue;
        }
        if broker.is_none() {
            let connecting = connect(&opts);
            let r = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), connecting)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("stopping"))),
                None => tokio::select! {
                    r = connecting => r,
                    _ = stopped(&mut stop) => continue,
                },
            };
            match r {
                Ok(b) => {
                    tracing::info!(url = %opts.url, stream = %opts.stream, "NATS publisher connected");
                    broker = Some(b);
                }
                Err(e) => {
                    failing = Some(fail(failing, &format!("{e:#}")));
                    continue;
                }
            }
        }
        let b = broker.as_ref().expect("connected");
        let batch = match pending.take() {
            Some(batch) => batch,
            None => match tailer.next_batch() {
                Ok(batch) => {
                    report(&mut tailer, &notices);
                    batch
                }
                Err(e) => {
                    failing = Some(fail(failing, &e.to_string()));
                    continue;
                }
            },
        };
        if batch.lines.is_empty() {
            // Idle: the cursor catches up with what is acknowledged, then a short wait.
            if stored != acked {
                store(&acked, &cursor_path, &mut stored, &mut stored_at);
            }
            if stopping {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stopped(&mut stop) => {}
            }
            continue;
        }
        if b.client.connection_state() != async_nats::connection::State::Connected {
            pending = Some(batch);
            failing = Some(fail(failing, "disconnected from the broker"));
            continue;
        }
        let sent = publish(b, &batch);
        // A publish can wait on a lost connection: a stop request ends the wait.
        let r = match deadline {
            Some(d) => Some(
                tokio::time::timeout_at(d.into(), sent)
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("stopping"))),
            ),
            None => tokio::select! {
                r = sent => Some(r),
                _ = stopped(&mut stop) => None,
            },
        };
        let Some(r) = r else {
            pending = Some(batch);
            continue;
        };
        match r {
            Ok(dup) => {
                published += batch.lines.len() as u64 - dup;
                acked = batch.end;
                if let Some(f) = failing.take() {
                    tracing::warn!(failed_for = ?f.since.elapsed(), published,
                        "NATS publisher publishing again");
                }
                if stored_at.elapsed() >= PERSIST_EVERY {
                    store(&acked, &cursor_path, &mut stored, &mut stored_at);
                }
            }
            Err(e) => {
                pending = Some(batch);
                failing = Some(fail(failing, &format!("publishing: {e:#}")));
                // A stream deleted meanwhile is created again on the next connection.
                if e.downcast_ref::<jetstream::context::PublishError>()
                    .is_some_and(|p| {
                        p.kind() == jetstream::context::PublishErrorKind::StreamNotFound
                    })
                {
                    broker = None;
                }
            }
        }
    }
    if stored != acked {
        store(&acked, &cursor_path, &mut stored, &mut stored_at);
    }
    Ok(())
}

/// A failure episode: since when, and the next try.
struct Failing {
    since: Instant,
    next: Instant,
    backoff: Duration,
}

/// The next try; the first failure of an episode is logged as an error.
fn fail(failing: Option<Failing>, why: &str) -> Failing {
    let (since, backoff) = match failing {
        None => {
            tracing::error!(
                "NATS publisher: {why}; records wait in the audit log (its spool) and are \
                 published in order once the broker is back"
            );
            (Instant::now(), RETRY_MIN)
        }
        Some(f) => {
            tracing::debug!("NATS publisher: {why}");
            (f.since, (f.backoff * 2).min(RETRY_MAX))
        }
    };
    Failing {
        since,
        next: Instant::now() + backoff,
        backoff,
    }
}

/// Until the controller asks to stop (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn store(c: &Cursor, path: &Path, stored: &mut Cursor, at: &mut Instant) {
    *at = Instant::now();
    match c.store(path) {
        Ok(()) => *stored = c.clone(),
        Err(e) => tracing::error!(
            "{e}: on a restart, records after the stored cursor are \
            published again (the broker drops duplicates by Nats-Msg-Id)"
        ),
    }
}

/// Losses and skipped lines: in the log, and as `lost` records through the notices.
fn report(tailer: &mut Tailer, notices: &mpsc::UnboundedSender<Notice>) {
    for l in tailer.take_losses() {
        tracing::error!(
            records = l.records,
            at_least = l.at_least,
            after_seq = l.after_seq,
            next_seq = l.next_seq,
            "NATS spool: audit records were rotated away before they were published"
        );
        let _ = notices.send(Notice::new(
            "lost",
            serde_json::json!({
                "where": "nats-spool",
                "lost": l.records,
                "at_least": l.at_least,
                "after_seq": l.after_seq,
                "next_seq": l.next_seq,
            }),
        ));
    }
    let skipped = tailer.take_skipped();
    if skipped > 0 {
        tracing::error!(
            lines = skipped,
            "NATS publisher: audit lines that are not records skipped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agentwall-nats-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rec(seq: u64) -> String {
        format!(
            "{{\"seq\":{seq},\"node\":\"n1.example\",\"boot_id\":\"b\",\"kind\":\"decision\"}}\n"
        )
    }

    fn append(p: &Path, seqs: std::ops::RangeInclusive<u64>) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        for s in seqs {
            f.write_all(rec(s).as_bytes()).unwrap();
        }
    }

    fn drain(t: &mut Tailer) -> (Vec<String>, Cursor) {
        let mut ids = Vec::new();
        let mut end = Cursor::default();
        loop {
            let b = t.next_batch().unwrap();
            if b.lines.is_empty() {
                return (ids, end);
            }
            ids.extend(b.lines.iter().map(|l| l.msg_id.clone()));
            end = b.end;
        }
    }

    fn ids(r: std::ops::RangeInclusive<u64>) -> Vec<String> {
        r.map(|s| format!("n1.example.b.{s}")).collect()
    }

    #[test]
    fn lines_follow_rotation_in_order_with_subject_and_id() {
        let d = dir("rotate");
        let p = d.join("audit.jsonl");
        append(&p, 1..=3);
        let mut t = Tailer::new(&p, None, "agentwall", Format::Native);
        let b = t.next_batch().unwrap();
        assert_eq!(b.lines[0].subject, "agentwall.n1_example.decision");
        assert_eq!(b.lines[0].msg_id, "n1.example.b.1");
        assert_eq!(&b.lines[0].payload[..], rec(1).trim_end().as_bytes());
        let got: Vec<_> = b.lines.iter().map(|l| l.msg_id.clone()).collect();
        assert_eq!(got, ids(1..=3));
        assert!(drain(&mut t).0.is_empty());
        // Rotated while being read: its tail first, then the next files in counter order.
        append(&p, 4..=5);
        std::fs::rename(&p, d.join("audit.jsonl.00000001")).unwrap();
        append(&d.join("audit.jsonl.00000002"), 6..=6);
        append(&p, 7..=8);
        let (got, end) = drain(&mut t);
        assert_eq!(got, ids(4..=8));
        assert!(t.take_losses().is_empty());
        assert_eq!((end.seq, end.counter), (8, None));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_cursor_resumes_and_a_deleted_segment_is_a_counted_loss() {
        let d = dir("resume");
        let p = d.join("audit.jsonl");
        append(&p, 1..=2);
        let mut t = Tailer::new(&p, None, "agentwall", Format::Native);
        let (_, end) = drain(&mut t);
        let cursor = d.join("cursor");
        end.store(&cursor).unwrap();
        assert_eq!(
            std::fs::metadata(&cursor).unwrap().mode() & 0o777,
            0o600,
            "root only"
        );
        // A restart: more lines, then resumed from the stored cursor.
        append(&p, 3..=4);
        let c = Cursor::load(&cursor).unwrap();
        let mut t = Tailer::new(&p, c.clone(), "agentwall", Format::Native);
        assert_eq!(drain(&mut t).0, ids(3..=4));
        // Rotated twice while the publisher was away (after the stored cursor), the older
        // segment deleted: resumed at the next one, and seq 3..=6 counted lost.
        append(&p, 5..=6);
        std::fs::rename(&p, d.join("audit.jsonl.00000001")).unwrap();
        append(&p, 7..=7);
        std::fs::rename(&p, d.join("audit.jsonl.00000002")).unwrap();
        append(&p, 8..=8);
        std::fs::remove_file(d.join("audit.jsonl.00000001")).unwrap();
        let mut t = Tailer::new(&p, c, "agentwall", Format::Native);
        assert_eq!(drain(&mut t).0, ids(7..=8));
        assert_eq!(
            t.take_losses(),
            vec![Loss {
                records: 4,
                at_least: false,
                after_seq: 2,
                next_seq: 7
            }]
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_partial_last_line_waits_and_junk_is_counted() {
        let d = dir("partial");
        let p = d.join("audit.jsonl");
        std::fs::write(&p, format!("{}not json\n{{\"seq\":2", rec(1))).unwrap();
        let mut t = Tailer::new(&p, None, "agentwall", Format::Native);
        assert_eq!(drain(&mut t).0, ids(1..=1));
        assert_eq!(t.take_skipped(), 1);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b",\"node\":\"n1.example\",\"boot_id\":\"b\",\"kind\":\"lost\"}\n")
            .unwrap();
        // A checkpoint of the chain is not a record: passed over, not counted.
        f.write_all(b"{\"kind\":\"checkpoint\",\"note\":\"x\"}\n")
            .unwrap();
        let b = t.next_batch().unwrap();
        assert_eq!(b.lines.len(), 1);
        assert_eq!(b.lines[0].subject, "agentwall.n1_example.lost");
        assert_eq!(b.lines[0].msg_id, "n1.example.b.2");
        assert_eq!(t.take_skipped(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn ocsf_lines_are_named_as_native_ones() {
        let native = "{\"seq\":9,\"time\":\"2026-01-01T00:00:00Z\",\"node\":\"n1.example\",\
                      \"boot_id\":\"b\",\"kind\":\"lost\",\"lost\":3}";
        let rec: AuditRecord = serde_json::from_str(native).unwrap();
        let ocsf = serde_json::to_vec(&super::super::ocsf::to_ocsf(&rec)).unwrap();
        let (h, is_ocsf) = Head::parse(&ocsf).unwrap();
        assert!(is_ocsf);
        assert_eq!(
            (
                h.seq,
                h.node.as_deref(),
                h.boot_id.as_deref(),
                h.kind.as_deref()
            ),
            (9, Some("n1.example"), Some("b"), Some("lost"))
        );
        // --nats-format ocsf converts a native audit log's lines.
        let d = dir("ocsf");
        let p = d.join("audit.jsonl");
        std::fs::write(&p, format!("{native}\n")).unwrap();
        let mut t = Tailer::new(&p, None, "agentwall", Format::Ocsf);
        let b = t.next_batch().unwrap();
        assert_eq!(b.lines[0].msg_id, "n1.example.b.9");
        let v: serde_json::Value = serde_json::from_slice(&b.lines[0].payload).unwrap();
        assert_eq!(v["metadata"]["sequence"], 9, "{v}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn subjects_and_prefixes() {
        assert_eq!(token("a.b*c>d e"), "a_b_c_d_e");
        assert_eq!(token(""), "_");
        assert!(NatsOptions::new("x").validate().is_ok());
        let mut o = NatsOptions::new("x");
        o.subject_prefix = "soc.agentwall".into();
        assert!(o.validate().is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b"] {
            o.subject_prefix = bad.into();
            assert!(o.validate().is_err(), "{bad:?}");
        }
        assert!(covers("agentwall.>", "agentwall.>"));
        assert!(covers(">", "agentwall.>"));
        assert!(!covers("agentwall.*", "agentwall.>"));
        assert!(!covers("other.>", "agentwall.>"));
        let o = NatsOptions::new("x");
        assert_eq!(
            o.cursor_path(Path::new("/var/log/agentwall/audit.jsonl")),
            Path::new("/var/log/agentwall/audit.jsonl.nats-cursor")
        );
    }
}
