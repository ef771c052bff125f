//! The audit sink's health, shared with the control actor so `status` shows a failing sink.

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// What `status` reports about the audit log.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HealthState {
    /// Whether the last write succeeded.
    pub ok: bool,
    /// The last write error, while writes fail.
    pub error: Option<String>,
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

    pub fn wrote(&self, n: u64) {
        let mut s = self.0.lock().expect("health");
        s.ok = true;
        s.error = None;
        s.written += n;
    }

    pub fn failed(&self, error: &std::io::Error) {
        let mut s = self.0.lock().expect("health");
        s.ok = false;
        s.error = Some(error.to_string());
    }

    pub fn snapshot(&self) -> HealthState {
        self.0.lock().expect("health").clone()
    }
}
