//! Where records go: the audit log, stdout, an in-process tap.

use std::{
    io::{self, Write},
    path::Path,
};

use tokio::sync::mpsc;

mod audit;
mod health;
mod record;

pub use audit::{AuditError, AuditFile, ROTATION_CHECK};
pub use health::{Health, HealthState};
pub use record::{AuditRecord, DecisionRecord};

/// Where records go: the audit file, stdout, and an in-process tap. The audit file is the
/// record of truth: a record counts as written once its whole line is in it, and a write error
/// there is returned (the reader then stops consuming the ring). Stdout is a mirror: its errors
/// are logged, not retried.
pub struct Sink {
    file: Option<AuditFile>,
    stdout: bool,
    stdout_failing: bool,
    tap: Option<mpsc::UnboundedSender<AuditRecord>>,
}

impl Sink {
    /// Opens the audit log: an unwritable path fails here, before anything is loaded.
    pub fn new(
        audit_log: Option<&Path>,
        stdout: bool,
        tap: Option<mpsc::UnboundedSender<AuditRecord>>,
    ) -> Result<Self, AuditError> {
        Ok(Self {
            file: audit_log.map(AuditFile::open).transpose()?,
            stdout,
            stdout_failing: false,
            tap,
        })
    }

    /// The audit log's path, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(AuditFile::path)
    }

    /// Writes one record: all of it to the audit log, or nothing.
    pub fn write(&mut self, rec: &AuditRecord) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(rec)?;
        line.push(b'\n');
        if let Some(f) = &mut self.file {
            f.append(&line)?;
        }
        if self.stdout {
            match io::stdout().lock().write_all(&line) {
                Ok(()) => self.stdout_failing = false,
                Err(e) if !self.stdout_failing => {
                    self.stdout_failing = true;
                    tracing::error!("writing audit records to stdout: {e}");
                }
                Err(_) => {}
            }
        }
        if let Some(tap) = &self.tap {
            let _ = tap.send(rec.clone());
        }
        Ok(())
    }

    /// Makes what was written durable (before a loss is recorded as reported).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        match &mut self.file {
            Some(f) => f.sync(),
            None => Ok(()),
        }
    }

    /// Reopens the audit log before the next write (SIGHUP).
    pub fn request_reopen(&mut self) {
        if let Some(f) = &mut self.file {
            f.request_reopen();
        }
    }

    /// Reopens the audit log if it was asked to, or rotated away.
    pub fn maintain(&mut self) -> Result<(), AuditError> {
        match &mut self.file {
            Some(f) => f.maintain(),
            None => Ok(()),
        }
    }
}
