//! The audit sink's health, shared with the control actor so `status` shows a failing sink.

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// What `status` reports about the audit log.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HealthState {
    /// False while writes fail: the reader has stopped consuming the event ring and retries.
    pub ok: bool,
    /// The last write error, while writes fail.
    pub error: Option<String>,
    /// Failed attempts in the current failure episode.
    pub failed_attempts: u64,
    /// Records written since start.
    pub written: u64,
}

/// Cheap to clone; the reader writes it, `status` reads it.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<HealthState>>);

impl Health {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(HealthState {
            ok: true,
            ..HealthState::default()
        })))
    }

    /// `n` more records written.
    pub fn wrote(&self, n: u64) {
        self.0.lock().expect("health").written += n;
    }

    /// A write (or reopen) failed; the reader retries.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let mut s = self.0.lock().expect("health");
        s.ok = false;
        s.error = Some(error.to_string());
        s.failed_attempts += 1;
    }

    /// Writes succeed again.
    pub fn recovered(&self) {
        let mut s = self.0.lock().expect("health");
        s.ok = true;
        s.error = None;
        s.failed_attempts = 0;
    }

    pub fn snapshot(&self) -> HealthState {
        self.0.lock().expect("health").clone()
    }
}
