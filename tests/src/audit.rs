//! Harness for the audit-sink tests: a small tmpfs to fill, the audit log read line by line,
//! polling with a deadline, and SIGHUP for a running daemon.

use std::{
    ffi::CString,
    io::Write,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use agentwall::events::AuditRecord;
use anyhow::{bail, ensure, Context, Result};

use crate::{require_root, Daemon};

/// A tmpfs of `size` bytes mounted on a fresh temp dir; unmounted and removed on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(tag: &str, size: u64, read_only: bool) -> Result<Self> {
        require_root()?;
        let dir = std::env::temp_dir().join(format!(
            "agentwall-{tag}-{}-{}",
            std::process::id(),
            crate::SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir)?;
        let target = CString::new(dir.as_os_str().as_bytes())?;
        let opts = CString::new(format!("size={size},mode=0755"))?;
        let flags = if read_only { libc::MS_RDONLY } else { 0 };
        // SAFETY: valid NUL-terminated strings; mounting a new tmpfs on our own temp dir.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            bail!("mounting a tmpfs on {}: {e}", dir.display());
        }
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Fills the file system with `name` until a write fails with ENOSPC.
    pub fn fill(&self, name: &str) -> Result<PathBuf> {
        let p = self.path(name);
        let mut f = std::fs::File::create(&p)?;
        let block = vec![b'x'; 4096];
        loop {
            match f.write(&block) {
                Ok(n) if n > 0 => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).context("filling the tmpfs"),
            }
        }
        // Byte by byte into the last page, so not even a short line fits.
        while f.write(b"x").is_ok_and(|n| n == 1) {}
        Ok(p)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: unmounting the tmpfs this value mounted.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Every record of an audit log; fails on any line that is not a whole record.
pub fn read_log(path: &Path) -> Result<Vec<AuditRecord>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    ensure!(
        text.is_empty() || text.ends_with(b"\n"),
        "{}: the last line is partial",
        path.display()
    );
    let text = String::from_utf8(text)?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a record: {l:?}", path.display(), i + 1))
        })
        .collect()
}

/// The whole records of an audit log being written: a last line without its newline is a write
/// in progress (a read may see part of a write()), left out, not an error. For waits; the
/// final checks use `read_log`, which fails on it.
pub fn read_log_so_far(path: &Path) -> Result<Vec<AuditRecord>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&text[..whole]);
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a record: {l:?}", path.display(), i + 1))
        })
        .collect()
}

/// (decision records, sum of `lost` counts).
pub fn tally(records: &[AuditRecord]) -> (u64, u64) {
    let decisions = records.iter().filter(|r| r.kind == "decision").count() as u64;
    let lost = records.iter().filter_map(|r| r.lost).sum();
    (decisions, lost)
}

/// Seq numbers of `records` in order: each exactly once, no gap.
pub fn assert_contiguous(records: &[AuditRecord]) -> Result<()> {
    for w in records.windows(2) {
        ensure!(
            w[1].seq == w[0].seq + 1,
            "seq {} follows seq {}: a record lost or written twice",
            w[1].seq,
            w[0].seq
        );
    }
    Ok(())
}

impl Daemon {
    /// Sends SIGHUP to the running daemon (our child, by pid).
    pub fn hup(&self) -> Result<()> {
        let child = self.child.as_ref().context("not running")?;
        // SAFETY: signalling the child we started, by its pid.
        let rc = unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        ensure!(rc == 0, "SIGHUP: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// `agentwall status` as JSON.
    pub fn status(&self) -> Result<serde_json::Value> {
        let (ok, out) = self.cli(&["status"])?;
        ensure!(ok, "status failed: {out}");
        let start = out.find('{').context("no JSON in the status reply")?;
        serde_json::from_str(&out[start..]).with_context(|| out.clone())
    }

    /// Files left in the pin directory (pinned maps and links), however deep.
    pub fn pinned_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.pin_dir, &mut out);
        out
    }
}
