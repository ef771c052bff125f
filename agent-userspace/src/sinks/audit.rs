//! The audit log file: chained lines (sinks/chain.rs) appended whole, a failed write cut back
//! to the last complete line (the chain advances only past whole lines); rotated by size and
//! age into `PATH.<n>` (8 digits, only growing), the oldest removed past `keep`; made durable by
//! the fsync policy; a signed checkpoint every few seconds, at each rotation and at shutdown;
//! reopened when rotated away by someone else (rename or delete) or on request (SIGHUP).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead, Seek, Write},
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use super::chain::{self, ChainError, Link, NoteBody, Signer, GENESIS};

/// How often the path is compared with the open file (one stat).
pub const ROTATION_CHECK: Duration = Duration::from_secs(1);
/// Why a reopen is pending after a rotation whose new file could not be opened.
const ROTATED: &str = "a rotation whose new file could not be opened";
pub const DEFAULT_ROTATE_SIZE: u64 = 100 << 20;
pub const DEFAULT_ROTATE_AGE: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_KEEP: usize = 10;
pub const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("audit log {}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("encoding an audit record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("chaining an audit record: {0}")]
    Chain(#[from] ChainError),
}

impl AuditError {
    fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    }
}

/// When written lines are made durable (fsync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After each batch the event reader writes.
    Batch,
    /// At most this often (and at rotation and shutdown).
    Interval(Duration),
    /// Left to the kernel (losses reported, rotation and shutdown still sync).
    Never,
}

impl FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "batch" => Ok(Self::Batch),
            "never" => Ok(Self::Never),
            _ => match s.strip_prefix("interval:") {
                Some(d) => humantime::parse_duration(d)
                    .map_err(|e| format!("{s:?}: {e}"))
                    .and_then(|d| {
                        if d.is_zero() {
                            Err(format!("{s:?}: the interval must not be zero"))
                        } else {
                            Ok(Self::Interval(d))
                        }
                    }),
                None => Err(format!(
                    "{s:?}: expected batch, interval:DURATION (\"interval:1s\") or never"
                )),
            },
        }
    }
}

/// Rotation, retention, durability and checkpoints of the audit log.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Rotate once the file holds this many bytes (0: never by size).
    pub rotate_size: u64,
    /// Rotate a file this old (ZERO: never by age): counted from when this controller opened
    /// or started it.
    pub rotate_age: Duration,
    /// Rotated files kept; older ones are removed (0: all kept).
    pub keep: usize,
    pub fsync: Fsync,
    pub checkpoint_every: Duration,
    /// Who signs checkpoints; none: the chain is written, no checkpoint.
    pub signers: Arc<Vec<Signer>>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            rotate_size: DEFAULT_ROTATE_SIZE,
            rotate_age: DEFAULT_ROTATE_AGE,
            keep: DEFAULT_KEEP,
            fsync: Fsync::Batch,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            signers: Arc::default(),
        }
    }
}

pub struct AuditFile {
    path: PathBuf,
    file: File,
    /// (st_dev, st_ino) of the open file, to notice that the path now names another one.
    id: (u64, u64),
    checked: Instant,
    /// Why the file must be reopened before the next write (rotation seen, SIGHUP, or a
    /// reopen that failed and is retried).
    reopen: Option<&'static str>,
    /// A partial line that could not be cut at once: its start, cut before the next write.
    cut: Option<u64>,
    opts: AuditOptions,
    /// The last whole line's chain value, and how many lines the chain has (known when
    /// checkpoints are signed; see `recover`).
    head: Link,
    count: u64,
    /// Bytes in the open file, and since when it is written.
    size: u64,
    started: Instant,
    /// The next rotated file's number.
    next_n: u64,
    removed: u64,
    dirty: bool,
    synced: Instant,
    since_checkpoint: u64,
    checkpointed: Instant,
    buf: Vec<u8>,
}

impl AuditFile {
    /// Opens (creates) the log for appending with the default options.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, AuditOptions::default())
    }

    /// Opens (creates) the log for appending; refuses what is not a writable regular file.
    /// The chain continues from the last line of the newest file (live or rotated).
    pub fn open_with(path: &Path, opts: AuditOptions) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(AuditError::io(path, "creating its directory"))?;
        }
        let file = open_append(path)?;
        let now = Instant::now();
        let mut f = Self {
            path: path.to_path_buf(),
            id: (0, 0),
            file,
            checked: now,
            reopen: None,
            cut: None,
            head: GENESIS,
            count: 0,
            size: 0,
            started: now,
            next_n: 1,
            removed: 0,
            dirty: false,
            synced: now,
            since_checkpoint: 0,
            checkpointed: now,
            buf: Vec::with_capacity(4096),
            opts,
        };
        f.id = f.check_file()?;
        f.cut_partial_tail()?;
        f.size = f
            .file
            .metadata()
            .map_err(AuditError::io(path, "reading its metadata"))?
            .len();
        f.next_n = rotated(path)
            .map_err(AuditError::io(path, "listing rotated files"))?
            .last()
            .map_or(1, |(n, _)| n + 1);
        f.recover()?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rotated files removed since start (past `keep`): the only way records leave the log.
    pub fn segments_removed(&self) -> u64 {
        self.removed
    }

    /// Appends one record: a JSON object (with its newline), chained. On a failed or short
    /// write the bytes that did go in are cut off again, so the file never holds a partial line
    /// and the chain does not advance.
    pub fn append(&mut self, line: &[u8]) -> Result<(), AuditError> {
        if self.reopen == Some(ROTATED) {
            // Never into a file already rotated away.
            self.reopen_file()?;
        }
        if self.opts.rotate_size > 0 && self.size >= self.opts.rotate_size {
            self.rotate("size")?;
        }
        if self.size == 0 && !self.opts.signers.is_empty() {
            // A file's first line is a checkpoint: any suffix of the rotated set can be
            // verified from it.
            self.checkpoint()?;
        }
        self.write_chained(line)
    }

    /// The file's data on disk (for records whose writing is recorded elsewhere).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.file
            .sync_data()
            .map_err(AuditError::io(&self.path, "syncing"))?;
        self.dirty = false;
        self.synced = Instant::now();
        Ok(())
    }

    /// The end of a batch: fsync as the policy says.
    pub fn flush_batch(&mut self) -> Result<(), AuditError> {
        match self.opts.fsync {
            _ if !self.dirty => Ok(()),
            Fsync::Batch => self.sync(),
            Fsync::Interval(d) if self.synced.elapsed() >= d => self.sync(),
            Fsync::Interval(_) | Fsync::Never => Ok(()),
        }
    }

    /// Reopens before the next write (SIGHUP).
    pub fn request_reopen(&mut self) {
        self.reopen = Some("SIGHUP");
    }

    /// Between batches: reopens the path when asked to, or when (checked at most every
    /// ROTATION_CHECK) it no longer names the open file (logrotate's `create` mode renames the
    /// log, then creates a new one); rotates by age; writes a checkpoint when one is due; ends
    /// the last batch (fsync policy).
    pub fn maintain(&mut self) -> Result<(), AuditError> {
        if self.reopen.is_none() && self.checked.elapsed() >= ROTATION_CHECK {
            self.checked = Instant::now();
            self.reopen = match std::fs::metadata(&self.path) {
                Ok(m) if (m.dev(), m.ino()) == self.id => None,
                Ok(_) => Some("the path names a new file (renamed away)"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Some("the file was renamed or removed")
                }
                Err(e) => return Err(AuditError::io(&self.path, "checking for rotation")(e)),
            };
        }
        if let Some(reason) = self.reopen {
            self.reopen_file()?;
            tracing::info!(path = %self.path.display(), reason, "audit log reopened");
        }
        if !self.opts.rotate_age.is_zero()
            && self.size > 0
            && self.started.elapsed() >= self.opts.rotate_age
        {
            self.rotate("age")?;
        }
        if !self.opts.signers.is_empty()
            && self.since_checkpoint > 0
            && self.checkpointed.elapsed() >= self.opts.checkpoint_every
        {
            self.checkpoint()?;
        }
        self.flush_batch()
    }

    fn reopen_file(&mut self) -> Result<(), AuditError> {
        let file = open_append(&self.path)?;
        let old = std::mem::replace(&mut self.file, file);
        match self.check_file() {
            Ok(id) => self.id = id,
            Err(e) => {
                self.file = old;
                return Err(e);
            }
        }
        self.size = self
            .file
            .metadata()
            .map_err(AuditError::io(&self.path, "reading its metadata"))?
            .len();
        self.started = Instant::now();
        self.reopen = None;
        self.cut = None;
        self.checked = Instant::now();
        Ok(())
    }

    /// Closes the file with a checkpoint, renames it to the next `PATH.<n>`, starts a new one
    /// and removes the oldest rotated files past `keep`.
    fn rotate(&mut self, why: &'static str) -> Result<(), AuditError> {
        if !self.opts.signers.is_empty() && self.since_checkpoint > 0 {
            self.checkpoint()?;
        }
        self.sync()?;
        let mut to = rotated_path(&self.path, self.next_n);
        while to.exists() {
            self.next_n += 1;
            to = rotated_path(&self.path, self.next_n);
        }
        std::fs::rename(&self.path, &to)
            .map_err(AuditError::io(&self.path, "renaming it for rotation"))?;
        self.next_n += 1;
        // The path names no file now: a failed open is retried before the next write.
        self.reopen = Some(ROTATED);
        self.reopen_file()?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // The rename is durable too (best effort: some file systems refuse it).
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        tracing::info!(path = %self.path.display(), to = %to.display(), why, "audit log rotated");
        self.prune();
        Ok(())
    }

    fn prune(&mut self) {
        if self.opts.keep == 0 {
            return;
        }
        let Ok(old) = rotated(&self.path) else {
            return;
        };
        let excess = old.len().saturating_sub(self.opts.keep);
        for (_, p) in &old[..excess] {
            match std::fs::remove_file(p) {
                Ok(()) => {
                    self.removed += 1;
                    tracing::warn!(
                        path = %p.display(),
                        removed = self.removed,
                        keep = self.opts.keep,
                        "removed the oldest rotated audit log (--audit-keep): its records are \
                         no longer on this node"
                    );
                }
                Err(e) => tracing::warn!(path = %p.display(), "removing an old audit log: {e}"),
            }
        }
    }

    /// A checkpoint line: a signed note over the chain's head.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        let note = chain::sign_note(
            &NoteBody {
                origin: self.opts.signers[0].name().to_string(),
                count: self.count,
                head: self.head,
            },
            &self.opts.signers,
        );
        let time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        self.write_chained(&chain::checkpoint_object(&time, &note))?;
        self.since_checkpoint = 0;
        self.checkpointed = Instant::now();
        Ok(())
    }

    /// Seals `object` onto the chain and writes the line; the chain advances once it is in.
    fn write_chained(&mut self, object: &[u8]) -> Result<(), AuditError> {
        if let Some(len) = self.cut {
            self.file
                .set_len(len)
                .map_err(AuditError::io(&self.path, "cutting a partial line"))?;
            self.cut = None;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let result = match chain::seal_into(&mut buf, &self.head, object) {
            Ok(link) => self.write_all(&buf).map(|()| link),
            Err(e) => Err(e.into()),
        };
        let len = buf.len() as u64;
        self.buf = buf;
        self.head = result?;
        self.count += 1;
        self.size += len;
        self.dirty = true;
        self.since_checkpoint += 1;
        Ok(())
    }

    fn write_all(&mut self, line: &[u8]) -> Result<(), AuditError> {
        let mut done = 0;
        while done < line.len() {
            match self.file.write(&line[done..]) {
                Ok(0) => return Err(self.undo(done, io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.undo(done, e)),
            }
        }
        Ok(())
    }

    /// The chain's head from the last line of the newest file; with signers, also how many
    /// lines the chain has: from the last checkpoint (its count, plus the lines after it).
    fn recover(&mut self) -> Result<(), AuditError> {
        let files =
            segments(&self.path).map_err(AuditError::io(&self.path, "listing its files"))?;
        let Some((file, last)) = files
            .iter()
            .rev()
            .find_map(|f| last_line(f).ok().flatten().map(|l| (f, l)))
        else {
            return Ok(());
        };
        match chain::split(&last) {
            Some((_, head)) => self.head = head,
            None => {
                tracing::warn!(
                    path = %file.display(),
                    "the audit log's last line carries no chain value: a new chain starts"
                );
                return Ok(());
            }
        }
        if self.opts.signers.is_empty() {
            return Ok(());
        }
        if chain::is_checkpoint(&last) {
            if let Some(n) = chain::note_of(&last) {
                self.count = n.count + 1;
                return Ok(());
            }
        }
        // After a crash: count back to the last checkpoint.
        self.since_checkpoint = 1;
        let mut after = 0u64;
        for f in files.iter().rev() {
            let (lines, checkpoint) = count_lines(f).map_err(AuditError::io(
                &self.path,
                "counting the lines of its files",
            ))?;
            match checkpoint {
                Some((count, lines_after)) => {
                    self.count = count + 1 + lines_after + after;
                    return Ok(());
                }
                None => after += lines,
            }
        }
        self.count = after;
        Ok(())
    }

    /// After a failed write of which `done` bytes went in: cuts them off (or remembers to).
    fn undo(&mut self, done: usize, error: io::Error) -> AuditError {
        if done > 0 {
            // O_APPEND: the offset is the end of what this write added.
            match self.file.stream_position() {
                Ok(end) => {
                    let start = end.saturating_sub(done as u64);
                    if self.file.set_len(start).is_err() {
                        self.cut = Some(start);
                    }
                }
                Err(_) => self.reopen = Some("the offset of a partial line is unknown"),
            }
        }
        AuditError::io(&self.path, "writing")(error)
    }

    fn check_file(&self) -> Result<(u64, u64), AuditError> {
        let m = self
            .file
            .metadata()
            .map_err(AuditError::io(&self.path, "reading its metadata"))?;
        if !m.is_file() {
            return Err(AuditError::NotAFile {
                path: self.path.clone(),
            });
        }
        Ok((m.dev(), m.ino()))
    }

    /// A line cut short by a crash of an earlier controller is not a record: it goes, so the
    /// next record starts a line.
    fn cut_partial_tail(&mut self) -> Result<(), AuditError> {
        let read = AuditError::io(&self.path, "reading its last line");
        let len = match self.file.metadata() {
            Ok(m) => m.len(),
            Err(e) => return Err(read(e)),
        };
        let mut end = len;
        let mut buf = vec![0u8; 4096];
        while end > 0 {
            let start = end.saturating_sub(buf.len() as u64);
            let chunk = &mut buf[..(end - start) as usize];
            if let Err(e) = self.file.read_exact_at(chunk, start) {
                return Err(read(e));
            }
            if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
                end = start + i as u64 + 1;
                break;
            }
            end = start;
        }
        if end == len {
            return Ok(());
        }
        self.file
            .set_len(end)
            .map_err(AuditError::io(&self.path, "cutting a partial last line"))?;
        tracing::warn!(
            path = %self.path.display(),
            bytes = len - end,
            "cut a partial last line left by an earlier writer"
        );
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(AuditError::io(path, "opening for appending"))
}

impl Drop for AuditFile {
    /// Shutdown: a last checkpoint over everything written, and the data on disk.
    fn drop(&mut self) {
        if !self.opts.signers.is_empty() && self.since_checkpoint > 0 {
            if let Err(e) = self.checkpoint() {
                tracing::error!("the final audit checkpoint: {e}");
            }
        }
        if self.dirty {
            if let Err(e) = self.sync() {
                tracing::error!("{e}");
            }
        }
    }
}

fn rotated_path(path: &Path, n: u64) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n:08}"));
    PathBuf::from(s)
}

/// The rotated files of `path` (`PATH.<n>`, n of 8 or more digits), oldest first.
fn rotated(path: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let file_name = e.file_name();
        let Some(n) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(name))
            .and_then(|f| f.strip_prefix('.'))
            .filter(|d| d.len() >= 8 && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
        else {
            continue;
        };
        out.push((n, dir.join(file_name)));
    }
    out.sort_unstable();
    Ok(out)
}

/// The audit log's files in order: the rotated ones (`PATH.00000001`, ...), then PATH itself
/// when it exists.
pub fn segments(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = rotated(path)?.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    Ok(out)
}

/// The last whole line of a file (without its newline), if any.
fn last_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut want = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(want);
        let mut buf = vec![0u8; (len - start) as usize];
        f.read_exact_at(&mut buf, start)?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return Ok(None);
        };
        match buf[..end].iter().rposition(|b| *b == b'\n') {
            Some(i) => return Ok(Some(buf[i + 1..end].to_vec())),
            None if start == 0 => return Ok(Some(buf[..end].to_vec())),
            None => want *= 4,
        }
    }
}

/// A file's whole lines, and its last checkpoint's count with the lines after it.
fn count_lines(path: &Path) -> io::Result<(u64, Option<(u64, u64)>)> {
    let mut r = io::BufReader::with_capacity(1 << 20, File::open(path)?);
    let (mut lines, mut checkpoint) = (0u64, None);
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 || !line.ends_with(b"\n") {
            return Ok((lines, checkpoint));
        }
        lines += 1;
        match chain::is_checkpoint(&line)
            .then(|| chain::note_of(&line[..line.len() - 1]))
            .flatten()
        {
            Some(n) => checkpoint = Some((n.count, 0)),
            None => {
                if let Some((_, after)) = &mut checkpoint {
                    *after += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::chain::{verify, Checker, Line};

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("agentwall-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("audit.jsonl")
    }

    /// The records of a file, chain members taken off.
    fn records(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .filter(|l| !chain::is_checkpoint(l.as_bytes()))
            .map(|l| match chain::split(l.as_bytes()) {
                Some((body, _)) => format!("{}}}", String::from_utf8_lossy(body)),
                None => l.to_string(),
            })
            .collect()
    }

    fn rec(seq: u64) -> Vec<u8> {
        format!("{{\"seq\":{seq},\"pad\":\"{}\"}}\n", "x".repeat(100)).into_bytes()
    }

    fn lines_of(files: &[PathBuf]) -> Vec<Line> {
        let mut out = Vec::new();
        for (i, f) in files.iter().enumerate() {
            for (n, l) in std::fs::read(f).unwrap().split(|b| *b == b'\n').enumerate() {
                if !l.is_empty() {
                    out.push(Line {
                        file: i,
                        number: n as u64 + 1,
                        bytes: l.to_vec(),
                        partial: false,
                    });
                }
            }
        }
        out
    }

    #[test]
    fn a_partial_last_line_is_cut_at_open() {
        let p = temp("tail");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{\"seq\":1}\n{\"seq\":2}\n{\"se").unwrap();
        let mut f = AuditFile::open(&p).unwrap();
        f.append(b"{\"seq\":3}\n").unwrap();
        drop(f);
        assert_eq!(records(&p), ["{\"seq\":1}", "{\"seq\":2}", "{\"seq\":3}"]);
        std::fs::write(&p, b"no newline at all").unwrap();
        AuditFile::open(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn a_directory_is_refused() {
        let p = temp("dir");
        std::fs::create_dir_all(&p).unwrap();
        let e = AuditFile::open(&p).err().unwrap().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn a_renamed_log_is_reopened_at_its_path() {
        let p = temp("rename");
        let mut f = AuditFile::open(&p).unwrap();
        f.append(b"{\"n\":1}\n").unwrap();
        let rotated = p.with_extension("1");
        std::fs::rename(&p, &rotated).unwrap();
        f.maintain().unwrap(); // not checked again within ROTATION_CHECK
        f.append(b"{\"n\":2}\n").unwrap();
        f.checked -= ROTATION_CHECK;
        f.maintain().unwrap();
        f.append(b"{\"n\":3}\n").unwrap();
        assert_eq!(records(&rotated), ["{\"n\":1}", "{\"n\":2}"]);
        assert_eq!(records(&p), ["{\"n\":3}"]);
        f.request_reopen();
        f.maintain().unwrap();
        f.append(b"{\"n\":4}\n").unwrap();
        assert_eq!(records(&p), ["{\"n\":3}", "{\"n\":4}"]);
        // One chain across both files.
        verify(&[], lines_of(&[rotated, p.clone()])).unwrap();
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn rotation_by_size_names_files_in_order_keeps_n_and_continues_the_chain() {
        let p = temp("size");
        let (private, public) = chain::generate("unit/audit").unwrap();
        let opts = AuditOptions {
            rotate_size: 1000,
            keep: 3,
            signers: Arc::new(vec![Signer::parse_ed25519(&private).unwrap()]),
            ..AuditOptions::default()
        };
        let mut f = AuditFile::open_with(&p, opts.clone()).unwrap();
        for seq in 1..=40 {
            f.append(&rec(seq)).unwrap();
        }
        let removed = f.segments_removed();
        drop(f);
        let files = segments(&p).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(removed > 0);
        let n = |s: &str| s.rsplit('.').next().unwrap().parse::<u64>().unwrap();
        assert_eq!(names[0].len(), "audit.jsonl.00000001".len(), "{names:?}");
        assert!(n(&names[0]) < n(&names[1]) && n(&names[1]) < n(&names[2]));
        assert_eq!(names[3], "audit.jsonl");
        let checker = [Checker::parse_verifier(&public).unwrap()];
        let sum = verify(&checker, lines_of(&files)).unwrap();
        assert!(matches!(
            sum.anchor,
            chain::Anchor::Checkpoint { signed: true, .. }
        ));
        assert_eq!(sum.tail, 0, "closed by the shutdown checkpoint");

        // A restart continues the numbering and the chain (and its count).
        let mut f = AuditFile::open_with(&p, opts).unwrap();
        let before = rotated(&p).unwrap().last().unwrap().0;
        for seq in 41..=60 {
            f.append(&rec(seq)).unwrap();
        }
        drop(f);
        assert!(rotated(&p).unwrap().last().unwrap().0 > before);
        let files = segments(&p).unwrap();
        verify(&checker, lines_of(&files)).unwrap();
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn a_restart_after_a_crash_counts_back_to_the_last_checkpoint() {
        let p = temp("crash");
        let (private, public) = chain::generate("unit/audit").unwrap();
        let opts = AuditOptions {
            signers: Arc::new(vec![Signer::parse_ed25519(&private).unwrap()]),
            ..AuditOptions::default()
        };
        let mut f = AuditFile::open_with(&p, opts.clone()).unwrap();
        for seq in 1..=5 {
            f.append(&rec(seq)).unwrap();
        }
        std::mem::forget(f); // no shutdown checkpoint
        let mut f = AuditFile::open_with(&p, opts).unwrap();
        assert_eq!(f.count, 6, "an opening checkpoint and five records");
        f.append(&rec(6)).unwrap();
        drop(f);
        let checker = [Checker::parse_verifier(&public).unwrap()];
        let sum = verify(&checker, lines_of(std::slice::from_ref(&p))).unwrap();
        assert_eq!((sum.records, sum.checkpoints), (6, 2));
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn rotation_by_age_skips_an_empty_file() {
        let p = temp("age");
        let opts = AuditOptions {
            rotate_age: Duration::from_secs(60),
            ..AuditOptions::default()
        };
        let mut f = AuditFile::open_with(&p, opts).unwrap();
        f.started -= Duration::from_secs(61);
        f.maintain().unwrap();
        assert_eq!(
            segments(&p).unwrap(),
            std::slice::from_ref(&p),
            "nothing to rotate yet"
        );
        f.append(&rec(1)).unwrap();
        f.started -= Duration::from_secs(61);
        f.maintain().unwrap();
        f.append(&rec(2)).unwrap();
        drop(f);
        let files = segments(&p).unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files[0].to_string_lossy().ends_with(".00000001"));
        verify(&[], lines_of(&files)).unwrap();
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn the_fsync_policy_parses() {
        assert_eq!("batch".parse(), Ok(Fsync::Batch));
        assert_eq!("never".parse(), Ok(Fsync::Never));
        assert_eq!(
            "interval:250ms".parse(),
            Ok(Fsync::Interval(Duration::from_millis(250)))
        );
        assert!("interval:0s".parse::<Fsync>().is_err());
        assert!("always".parse::<Fsync>().is_err());
    }
}
