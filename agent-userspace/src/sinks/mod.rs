//! Where records go: the audit log, stdout, an in-process tap.

use std::{
    fs::{File, OpenOptions},
    io::{self, LineWriter, Write},
    path::Path,
};

use tokio::sync::mpsc;

use crate::events::AuditRecord;

mod health;

pub use health::{Health, HealthState};

/// Where records go: the audit file, stdout, and an in-process tap. The file is written a line
/// at a time while the ring record is still held, so the ring's consumer position passes a
/// record only once it is in the file: a controller killed at any moment loses no record (at
/// worst one is written twice, with the same time and thread).
pub struct Sink {
    file: Option<LineWriter<File>>,
    stdout: bool,
    tap: Option<mpsc::UnboundedSender<AuditRecord>>,
}

impl Sink {
    pub fn new(
        audit_log: Option<&Path>,
        stdout: bool,
        tap: Option<mpsc::UnboundedSender<AuditRecord>>,
    ) -> io::Result<Self> {
        let file = match audit_log {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some(LineWriter::new(
                    OpenOptions::new().create(true).append(true).open(p)?,
                ))
            }
            None => None,
        };
        Ok(Self { file, stdout, tap })
    }

    pub fn write(&mut self, rec: &AuditRecord) -> io::Result<()> {
        let line = serde_json::to_string(rec).map_err(io::Error::other)?;
        if let Some(f) = &mut self.file {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
        }
        if self.stdout {
            println!("{line}");
        }
        if let Some(tap) = &self.tap {
            let _ = tap.send(rec.clone());
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.file {
            f.flush()?;
        }
        Ok(())
    }
}
