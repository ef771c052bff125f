//! Where records go: the audit log, stdout, an in-process tap.

use std::{
    io::{self, Write},
    path::Path,
};

use tokio::sync::mpsc;

mod audit;
pub mod chain;
pub mod fanout;
mod health;
pub mod metrics;
pub mod nats;
pub mod ocsf;
mod record;

pub use audit::{
    segments, AuditError, AuditFile, AuditOptions, Fsync, DEFAULT_KEEP, ROTATION_CHECK,
};
pub use health::{Health, HealthState};
pub use ocsf::Format;
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
    /// The live stream (`GET /v1/events`): records the audit log accepted.
    fanout: Option<fanout::Fanout>,
    /// Counts each record written, and the audit log's failures (`--metrics`).
    metrics: Option<metrics::Observer>,
    /// How the audit file and stdout lines are written (native by default).
    format: Format,
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
            fanout: None,
            metrics: None,
            format: Format::Native,
        })
    }

    /// As `new`, with the audit log rotated, kept, synced and checkpointed by `opts`.
    pub fn with_audit(
        audit_log: Option<&Path>,
        opts: AuditOptions,
        stdout: bool,
        tap: Option<mpsc::UnboundedSender<AuditRecord>>,
    ) -> Result<Self, AuditError> {
        let mut sink = Self::new(None, stdout, tap)?;
        sink.file = audit_log
            .map(|p| AuditFile::open_with(p, opts))
            .transpose()?;
        Ok(sink)
    }

    /// Rotated audit files removed past `--audit-keep` since start.
    pub fn segments_removed(&self) -> u64 {
        self.file.as_ref().map_or(0, AuditFile::segments_removed)
    }

    /// The end of a batch of records: the audit log is synced as `--audit-fsync` says.
    pub fn flush_batch(&mut self) -> Result<(), AuditError> {
        match &mut self.file {
            Some(f) => f.flush_batch(),
            None => Ok(()),
        }
    }

    /// Writes the audit file and stdout lines in `format` (`--format`).
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Counts every record written from now on.
    pub fn observe(&mut self, observer: metrics::Observer) {
        self.metrics = Some(observer);
    }

    /// (Of the field, so it borrows beside the audit file.)
    fn count_error(metrics: &Option<metrics::Observer>) {
        if let Some(m) = metrics {
            m.write_error();
        }
    }

    /// Publishes each record written to the live stream's consumers.
    pub fn set_fanout(&mut self, fanout: fanout::Fanout) {
        self.fanout = Some(fanout);
    }

    /// The audit log's path, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(AuditFile::path)
    }

    /// Writes one record: all of it to the audit log, or nothing.
    pub fn write(&mut self, rec: &AuditRecord) -> Result<(), AuditError> {
        let line = self.format.line(rec)?;
        if let Some(f) = &mut self.file {
            f.append(&line)
                .inspect_err(|_| Self::count_error(&self.metrics))?;
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
        if let Some(m) = &mut self.metrics {
            m.written(rec);
        }
        // After the audit log accepted it; never waits for a consumer.
        if let Some(f) = &self.fanout {
            f.publish(rec);
        }
        Ok(())
    }

    /// Makes what was written durable (before a loss is recorded as reported).
    pub fn sync(&mut self) -> Result<(), AuditError> {
        match &mut self.file {
            Some(f) => f.sync().inspect_err(|_| Self::count_error(&self.metrics)),
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
            Some(f) => f
                .maintain()
                .inspect_err(|_| Self::count_error(&self.metrics)),
            None => Ok(()),
        }
    }
}
