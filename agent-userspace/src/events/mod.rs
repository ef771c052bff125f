//! Events: the ring reader. It drains on readiness AND on a short timer, because the programs
//! submit without a wake-up until a threshold of bytes is pending (MEASURED.md); each record is
//! decoded, enriched and written before the ring's consumer position passes it.

mod decode;
mod enrich;
mod record;

use std::{io, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

pub use decode::Decision;
pub use enrich::{node_name, Clock, Enricher};
pub use record::{AuditRecord, DecisionRecord};

use crate::sinks::{Health, Sink};

/// Something the controller itself has to report in the audit stream (the agent map is full, a
/// cgroup could not be registered, ...): written as a record of `kind` carrying `detail`.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: &'static str,
    pub detail: serde_json::Value,
}

/// How often the reader drains without a wake-up.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Reads the ring buffer until `shutdown` turns true; lost-event counts arrive on `lost`.
pub async fn run(
    ring: RingBuf<MapData>,
    mut enricher: Enricher,
    mut sink: Sink,
    mut lost: mpsc::UnboundedReceiver<u64>,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    health: Health,
    mut shutdown: watch::Receiver<bool>,
    drain_interval: Duration,
) -> io::Result<()> {
    let _ = &health;
    // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd owns it.
    let mut afd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    let mut tick = tokio::time::interval(drain_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = afd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut enricher, &mut sink)?;
                guard.clear_ready();
            }
            _ = tick.tick() => drain(afd.get_mut(), &mut enricher, &mut sink)?,
            Some(n) = notices.recv() => {
                sink.write(&enricher.notice(&n))?;
                sink.flush()?;
            }
            Some(n) = lost.recv() => {
                tracing::warn!(lost = n, "events lost: the ring buffer was full");
                sink.write(&enricher.lost(n))?;
                sink.flush()?;
            }
            _ = shutdown.changed() => {
                drain(afd.get_mut(), &mut enricher, &mut sink)?;
                while let Ok(n) = lost.try_recv() {
                    sink.write(&enricher.lost(n))?;
                }
                sink.flush()?;
                return Ok(());
            }
        }
    }
}

/// Writes what an older layout's ring still holds, and the losses its controller never
/// reported, before that layout's maps are removed.
pub fn drain_retired(
    retired: &mut crate::datapath::Retired,
    enricher: &mut Enricher,
    sink: &mut Sink,
) -> io::Result<()> {
    if let Some(ring) = &mut retired.ring {
        drain(ring, enricher, sink)?;
    }
    if retired.lost > 0 {
        sink.write(&enricher.lost(retired.lost))?;
    }
    sink.flush()
}

fn drain(ring: &mut RingBuf<MapData>, enricher: &mut Enricher, sink: &mut Sink) -> io::Result<()> {
    let mut any = false;
    let mut undecodable = 0;
    while let Some(item) = ring.next() {
        any = true;
        match Decision::from_record(&item) {
            Some(d) => sink.write(&enricher.decision(&d))?,
            None => undecodable += 1,
        }
        // Dropping the item moves the consumer position: only after the record is written.
        drop(item);
    }
    if undecodable > 0 {
        tracing::error!(
            records = undecodable,
            "records of an unknown size in the event ring: reported as lost"
        );
        sink.write(&enricher.lost(undecodable))?;
    }
    if any {
        sink.flush()?;
    }
    Ok(())
}
