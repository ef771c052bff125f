//! Events: the ring reader. It drains on readiness AND on a short timer, because the programs
//! submit without a wake-up until a threshold of bytes is pending (MEASURED.md); each record is
//! decoded, enriched and written before the ring's consumer position passes it. When the audit
//! log cannot be written the reader stops consuming (records wait in the ring; what does not
//! fit is counted lost by the kernel) and retries; it never dies of a sink error.

mod decode;
mod enrich;
mod loss;
pub mod resume;

use std::{
    collections::VecDeque,
    io,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

pub use crate::sinks::{AuditRecord, DecisionRecord};
pub use decode::Decision;
pub use enrich::{node_name, Clock, Enricher};
pub use loss::{link as loss_link, LossInbox, LossReports};
pub use resume::Resume;

use crate::sinks::{AuditError, Health, Sink};

/// Something the controller itself has to report in the audit stream (the agent map is full, a
/// cgroup could not be registered, ...): written as a record of `kind` carrying `detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: &'static str,
    pub detail: serde_json::Value,
    /// CLOCK_BOOTTIME (ns) when it happened: the reader writes it between the kernel's
    /// decisions by this stamp, so the file keeps the order things happened in.
    pub at_ns: u64,
}

impl Notice {
    pub fn new(kind: &'static str, detail: serde_json::Value) -> Self {
        Self {
            kind,
            detail,
            at_ns: crate::datapath::boottime_ns(),
        }
    }
}

/// How often the reader drains without a wake-up.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Retries of a failing audit log: the first after this, then doubling up to RETRY_MAX.
pub const RETRY_MIN: Duration = Duration::from_millis(50);
pub const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long the reader keeps retrying a failing audit log once the controller stops.
pub const FINAL_GRACE: Duration = Duration::from_secs(2);

/// What the reader receives besides the ring.
pub struct Inputs {
    /// The kernel's lost count; the reader ends once the control actor drops the other end.
    pub losses: LossInbox,
    pub notices: mpsc::UnboundedReceiver<Notice>,
    /// Reopen the audit log (SIGHUP).
    pub reopen: mpsc::UnboundedReceiver<()>,
    /// Where the last controller of this boot stopped (`resume::from_audit_log`).
    pub resume: Resume,
}

/// Reads the ring buffer until the control actor is gone (it sends its final loss total
/// first), then drains the ring a last time. Errors only if the ring itself cannot be polled.
pub async fn run(
    ring: RingBuf<MapData>,
    enricher: Enricher,
    sink: Sink,
    inputs: Inputs,
    health: Health,
    drain_interval: Duration,
) -> io::Result<()> {
    let Inputs {
        losses,
        mut notices,
        mut reopen,
        resume,
    } = inputs;
    let mut enricher = enricher;
    enricher.resume_after(resume.last_seq);
    let mut r = Reader {
        already_written: resume.last_decision,
        enricher,
        sink,
        health,
        losses,
        notices: VecDeque::new(),
        pending: None,
        undecodable: 0,
        written: 0,
        failing: None,
    };
    // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd owns it.
    let mut afd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    let mut tick = tokio::time::interval(drain_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    enum Wake {
        Work,
        Notice(Notice),
        Reopen,
        Stop,
    }
    loop {
        let retry_at = r.failing.as_ref().map(|f| f.next);
        let paused = retry_at.is_some();
        let wake = tokio::select! {
            more = r.losses.changed() => if more { Wake::Work } else { Wake::Stop },
            Some(n) = notices.recv() => Wake::Notice(n),
            Some(()) = reopen.recv() => Wake::Reopen,
            guard = afd.readable_mut(), if !paused => {
                guard?.clear_ready();
                Wake::Work
            }
            _ = tick.tick(), if !paused => Wake::Work,
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now).into()),
                if paused => Wake::Work,
        };
        match wake {
            Wake::Stop => break,
            Wake::Notice(n) => r.notices.push_back(n),
            Wake::Reopen => r.sink.request_reopen(),
            Wake::Work => {}
        }
        // While failing, only the retry timer writes: the rest just queues.
        if r.failing.as_ref().is_some_and(|f| Instant::now() < f.next) {
            continue;
        }
        let result = r.step(afd.get_mut());
        r.settle(result);
    }
    // The control actor is gone (its final loss total is in): write what is left.
    while let Ok(n) = notices.try_recv() {
        r.notices.push_back(n);
    }
    let deadline = Instant::now() + FINAL_GRACE;
    loop {
        let result = r.step(afd.get_mut());
        let ok = result.is_ok();
        r.settle(result);
        if ok {
            return Ok(());
        }
        let next = r.failing.as_ref().map_or(deadline, |f| f.next);
        if next >= deadline {
            tracing::error!(
                "stopping with the audit log still failing: the records left in the event ring \
                 are written by the next controller if the ring is pinned, and lost otherwise"
            );
            return Ok(());
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

/// What a record that could not be written was, so it is retried (same seq) before anything
/// newer and the file keeps the order of seq.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// The record at the ring's consumer position (still in the ring).
    Head,
    Loss,
    Notice,
    Undecodable,
}

struct Failing {
    since: Instant,
    attempts: u64,
    backoff: Duration,
    next: Instant,
}

struct Reader {
    /// The last record the previous controller wrote, when it was a decision: the ring may still
    /// hold it (it died between the write and moving the consumer position). Checked against
    /// the first decision read, then cleared.
    already_written: Option<resume::EventId>,
    enricher: Enricher,
    sink: Sink,
    health: Health,
    losses: LossInbox,
    notices: VecDeque<Notice>,
    pending: Option<(Pending, AuditRecord)>,
    /// Ring records of an unknown size, consumed and not yet reported as lost.
    undecodable: u64,
    /// Records written since the last `settle`.
    written: u64,
    failing: Option<Failing>,
}

impl Reader {
    /// Writes everything due, in order; stops at the first error, leaving the rest queued.
    fn step(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), AuditError> {
        self.sink.maintain()?;
        if let Some((kind, rec)) = self.pending.take() {
            match kind {
                Pending::Head => {
                    self.pending = Some((kind, rec));
                    self.drain(ring)?;
                }
                Pending::Loss => self.write_loss(Some(rec))?,
                Pending::Notice | Pending::Undecodable => self.emit(kind, rec)?,
            }
        }
        self.write_loss(None)?;
        // Decisions first: notices older than one are written before it (in drain), the rest
        // are newer than everything in the ring.
        self.drain(ring)?;
        while let Some(n) = self.notices.pop_front() {
            let rec = self.enricher.notice(&n);
            self.emit(Pending::Notice, rec)?;
        }
        if self.undecodable > 0 {
            tracing::error!(
                records = self.undecodable,
                "records of an unknown size in the event ring: reported as lost"
            );
            let rec = self
                .enricher
                .lost(std::mem::take(&mut self.undecodable), "undecodable");
            self.emit(Pending::Undecodable, rec)?;
        }
        // The end of a batch: durable now under `--audit-fsync batch`.
        self.sink.flush_batch()
    }

    fn emit(&mut self, kind: Pending, rec: AuditRecord) -> Result<(), AuditError> {
        match self.sink.write(&rec) {
            Ok(()) => {
                self.written += 1;
                Ok(())
            }
            Err(e) => {
                self.pending = Some((kind, rec));
                Err(e)
            }
        }
    }

    /// A `lost` record for what the kernel lost beyond what is already written; only once it
    /// is written and synced does the new total go back to the controller, which records it
    /// as reported. (A failed sync may report a loss twice, never not at all.)
    fn write_loss(&mut self, pending: Option<AuditRecord>) -> Result<(), AuditError> {
        let (total, done) = (self.losses.total(), self.losses.written());
        if total <= done {
            return Ok(());
        }
        let mut rec = pending.unwrap_or_else(|| self.enricher.lost(0, "kernel-ring"));
        rec.lost = Some(total - done);
        self.emit(Pending::Loss, rec)?;
        self.sink.sync()?;
        self.losses.mark_written(total);
        tracing::warn!(lost = total - done, "events lost: the ring buffer was full");
        Ok(())
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), AuditError> {
        while let Some(item) = ring.next() {
            let rec = match self.pending.take() {
                Some((Pending::Head, rec)) => rec,
                other => {
                    self.pending = other;
                    match Decision::from_record(&item) {
                        Some(d) if self.already_written.take().is_some_and(|w| w.is(&d)) => {
                            tracing::info!(
                                "the first event in the ring was written before the restart: \
                                 not written again"
                            );
                            continue;
                        }
                        Some(d) => {
                            // What the controller did before this decision was taken goes first.
                            while self.notices.front().is_some_and(|n| n.at_ns <= d.boot_ns) {
                                let n = self.notices.pop_front().expect("a front notice");
                                let rec = self.enricher.notice(&n);
                                if let Err(e) = self.emit(Pending::Notice, rec) {
                                    // The decision stays in the ring, read again on the retry.
                                    std::mem::forget(item);
                                    return Err(e);
                                }
                            }
                            self.enricher.decision(&d)
                        }
                        None => {
                            self.undecodable += 1;
                            continue;
                        }
                    }
                }
            };
            if let Err(e) = self.sink.write(&rec) {
                // Forgotten, the item leaves the consumer position on its record: it stays in
                // the ring and is read again on the retry.
                std::mem::forget(item);
                self.pending = Some((Pending::Head, rec));
                return Err(e);
            }
            self.written += 1;
            // Dropping the item moves the consumer position: only after the record is written.
            drop(item);
        }
        if let Some((Pending::Head, rec)) = &self.pending {
            tracing::error!(seq = rec.seq, "a record held for a retry left the ring");
            self.pending = None;
        }
        Ok(())
    }

    /// Health for `status`, and the log: one error when writes start failing, one line when
    /// they work again.
    fn settle(&mut self, result: Result<(), AuditError>) {
        if self.written > 0 {
            self.health.wrote(std::mem::take(&mut self.written));
        }
        let path = self.sink.path().map(|p| p.display().to_string());
        match (result, &mut self.failing) {
            (Ok(()), None) => {}
            (Ok(()), Some(f)) => {
                tracing::warn!(
                    path,
                    failed_for = ?f.since.elapsed(),
                    attempts = f.attempts,
                    "audit log writable again: reading events again"
                );
                self.health.recovered();
                self.failing = None;
            }
            (Err(e), None) => {
                tracing::error!(
                    "{e}: event reading paused (events wait in the kernel ring; what does \
                     not fit is counted lost and reported once writes succeed); retrying"
                );
                self.health.failed(&e);
                self.failing = Some(Failing {
                    since: Instant::now(),
                    attempts: 1,
                    backoff: RETRY_MIN,
                    next: Instant::now() + RETRY_MIN,
                });
            }
            (Err(e), Some(f)) => {
                self.health.failed(&e);
                f.attempts += 1;
                f.backoff = (f.backoff * 2).min(RETRY_MAX);
                f.next = Instant::now() + f.backoff;
            }
        }
    }
}

/// Writes what an older layout's ring still holds, and the losses its controller never
/// reported, before that layout's maps are removed. A write error leaves the unwritten records
/// in that ring and fails.
pub fn drain_retired(
    retired: &mut crate::datapath::Retired,
    enricher: &mut Enricher,
    sink: &mut Sink,
) -> Result<(), AuditError> {
    let mut lost = retired.lost;
    if let Some(ring) = &mut retired.ring {
        while let Some(item) = ring.next() {
            let Some(d) = Decision::from_record(&item) else {
                lost += 1;
                continue;
            };
            if let Err(e) = sink.write(&enricher.decision(&d)) {
                std::mem::forget(item);
                return Err(e);
            }
        }
    }
    if lost > 0 {
        sink.write(&enricher.lost(lost, "retired-ring"))?;
    }
    sink.sync()
}
