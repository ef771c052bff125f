//! The audit log file: whole lines appended, a failed write cut back to the last complete line,
//! reopened when rotated away (rename or delete) or on request (SIGHUP).

use std::{
    fs::{File, OpenOptions},
    io::{self, Seek, Write},
    os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How often the path is compared with the open file (one stat).
pub const ROTATION_CHECK: Duration = Duration::from_secs(1);

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
}

impl AuditFile {
    /// Opens (creates) the log for appending; refuses what is not a writable regular file.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(AuditError::io(path, "creating its directory"))?;
        }
        let file = open_append(path)?;
        let mut f = Self {
            path: path.to_path_buf(),
            id: (0, 0),
            file,
            checked: Instant::now(),
            reopen: None,
            cut: None,
        };
        f.id = f.check_file()?;
        f.cut_partial_tail()?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line (with its newline). On a failed or short write the bytes that did go
    /// in are cut off again, so the file never holds a partial line.
    pub fn append(&mut self, line: &[u8]) -> Result<(), AuditError> {
        if let Some(len) = self.cut {
            self.file
                .set_len(len)
                .map_err(AuditError::io(&self.path, "cutting a partial line"))?;
            self.cut = None;
        }
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

    /// The file's data on disk (for records whose writing is recorded elsewhere).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.file
            .sync_data()
            .map_err(AuditError::io(&self.path, "syncing"))
    }

    /// Reopens before the next write (SIGHUP).
    pub fn request_reopen(&mut self) {
        self.reopen = Some("SIGHUP");
    }

    /// Reopens the path when asked to, or when (checked at most every ROTATION_CHECK) it no
    /// longer names the open file: logrotate's `create` mode renames the log, then creates a
    /// new one.
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
        let Some(reason) = self.reopen else {
            return Ok(());
        };
        let file = open_append(&self.path)?;
        let old = std::mem::replace(&mut self.file, file);
        match self.check_file() {
            Ok(id) => self.id = id,
            Err(e) => {
                self.file = old;
                return Err(e);
            }
        }
        self.reopen = None;
        self.cut = None;
        self.checked = Instant::now();
        tracing::info!(path = %self.path.display(), reason, "audit log reopened");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("agentwall-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("audit.jsonl")
    }

    #[test]
    fn a_partial_last_line_is_cut_at_open() {
        let p = temp("tail");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{\"seq\":1}\n{\"seq\":2}\n{\"se").unwrap();
        let mut f = AuditFile::open(&p).unwrap();
        f.append(b"{\"seq\":3}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"seq\":1}\n{\"seq\":2}\n{\"seq\":3}\n"
        );
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
        f.append(b"1\n").unwrap();
        let rotated = p.with_extension("1");
        std::fs::rename(&p, &rotated).unwrap();
        f.maintain().unwrap(); // not checked again within ROTATION_CHECK
        f.append(b"2\n").unwrap();
        f.checked -= ROTATION_CHECK;
        f.maintain().unwrap();
        f.append(b"3\n").unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "1\n2\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "3\n");
        f.request_reopen();
        f.maintain().unwrap();
        f.append(b"4\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "3\n4\n");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
