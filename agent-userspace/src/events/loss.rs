//! Loss accounting between the control actor, which reads the kernel's lost counter, and the
//! reader, which writes the `lost` records. Both ends speak in CUMULATIVE totals of the kernel
//! counter, so nothing is counted twice or dropped when a message is superseded; a loss counts
//! as reported (the pinned LOST_REPORTED) only once its record is in the audit log.

use std::time::Duration;

use tokio::sync::watch;

/// Both ends, starting from the total already reported (LOST_REPORTED).
pub fn link(reported: u64) -> (LossReports, LossInbox) {
    let (total_tx, total_rx) = watch::channel(reported);
    let (written_tx, written_rx) = watch::channel(reported);
    (
        LossReports {
            total: total_tx,
            written: written_rx,
        },
        LossInbox {
            total: total_rx,
            written: written_tx,
        },
    )
}

/// The control actor's end. Dropping it tells the reader to finish.
#[derive(Debug)]
pub struct LossReports {
    total: watch::Sender<u64>,
    written: watch::Receiver<u64>,
}

impl LossReports {
    /// The kernel's cumulative lost count, as just read.
    pub fn observe(&self, kernel_total: u64) {
        self.total.send_if_modified(|t| {
            let more = kernel_total > *t;
            if more {
                *t = kernel_total;
            }
            more
        });
    }

    /// The cumulative total whose `lost` records are written and synced.
    pub fn written(&self) -> u64 {
        *self.written.borrow()
    }

    /// Waits (at most `timeout`) until every loss observed so far is written; false if not.
    pub async fn settled(&mut self, timeout: Duration) -> bool {
        let want = *self.total.borrow();
        matches!(
            tokio::time::timeout(timeout, self.written.wait_for(|w| *w >= want)).await,
            Ok(Ok(_))
        )
    }
}

/// The reader's end.
#[derive(Debug)]
pub struct LossInbox {
    total: watch::Receiver<u64>,
    written: watch::Sender<u64>,
}

impl LossInbox {
    /// The kernel's cumulative lost count, as last observed.
    pub fn total(&self) -> u64 {
        *self.total.borrow()
    }

    /// The cumulative total already written.
    pub fn written(&self) -> u64 {
        *self.written.borrow()
    }

    /// After the `lost` record up to `total` is written and synced.
    pub fn mark_written(&self, total: u64) {
        self.written.send_replace(total);
    }

    /// Waits for a new total; false once the control actor is gone.
    pub async fn changed(&mut self) -> bool {
        self.total.changed().await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loss_is_settled_only_once_written() {
        let (mut reports, inbox) = link(5);
        assert!(reports.settled(Duration::from_millis(1)).await);
        reports.observe(9);
        reports.observe(7); // an older reading never lowers the total
        assert_eq!(inbox.total(), 9);
        assert!(!reports.settled(Duration::from_millis(20)).await);
        inbox.mark_written(9);
        assert!(reports.settled(Duration::from_millis(1)).await);
        assert_eq!(reports.written(), 9);
    }

    #[tokio::test]
    async fn the_reader_learns_that_control_is_gone() {
        let (reports, mut inbox) = link(0);
        reports.observe(1);
        assert!(inbox.changed().await);
        drop(reports);
        assert!(!inbox.changed().await);
    }
}
