//! The live stream's fan-out: each record the audit log accepted goes to every consumer of
//! `GET /v1/events` (docs/stream.md). One `tokio::sync::broadcast` ring: publishing never waits,
//! and a consumer that falls more than the ring's size behind loses the oldest records from its
//! own view only, and is told how many (`{"kind":"stream-dropped","count":N}`) before the next
//! one it gets. Filters are applied per consumer, on its own task.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
};

use ipnet::IpNet;
use thiserror::Error;
use tokio::sync::broadcast;

use super::AuditRecord;

/// Records a consumer may fall behind by before it loses the oldest (the ring is shared: the
/// memory is this many records, whatever the number of consumers).
pub const DEFAULT_BUFFER: usize = 4096;

/// Streams served at once; the control socket keeps the rest of its connections for commands.
pub const MAX_CONSUMERS: usize = 64;

/// Cheap to clone; the sink publishes, the control API subscribes.
#[derive(Clone)]
pub struct Fanout {
    tx: broadcast::Sender<Arc<AuditRecord>>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    consumers: AtomicUsize,
    dropped: AtomicU64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FanoutError {
    #[error("{MAX_CONSUMERS} event streams are open already")]
    TooMany,
    #[error("the controller is shutting down")]
    Stopped,
}

impl Fanout {
    /// A fan-out whose consumers may each fall `buffer` records behind (at least 1).
    pub fn new(buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(1));
        Self {
            tx,
            shared: Arc::default(),
        }
    }

    /// Hands a written record to the consumers; never waits. Without any, it costs no copy.
    pub fn publish(&self, rec: &AuditRecord) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(rec.clone()));
        }
    }

    /// Every record published from now on, unfiltered (tests, in-process readers).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AuditRecord>> {
        self.tx.subscribe()
    }

    /// A stream consumer: the records from now on that `filter` selects. Refused over
    /// [`MAX_CONSUMERS`].
    pub fn consumer(&self, filter: Filter) -> Result<Consumer, FanoutError> {
        self.shared.consumer(&self.tx, filter)
    }

    /// A handle that makes consumers without keeping the fan-out open: once the sink (and the
    /// daemon's handle) are gone, every consumer's stream ends.
    pub fn subscriber(&self) -> Subscriber {
        Subscriber {
            tx: self.tx.downgrade(),
            shared: self.shared.clone(),
        }
    }

    /// Stream consumers connected now.
    pub fn consumers(&self) -> usize {
        self.shared.consumers.load(Ordering::Acquire)
    }

    /// Records skipped by consumers that fell behind, summed over consumers, since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// What the control API holds: makes consumers while the fan-out lives (see
/// [`Fanout::subscriber`]).
#[derive(Clone)]
pub struct Subscriber {
    tx: broadcast::WeakSender<Arc<AuditRecord>>,
    shared: Arc<Shared>,
}

impl Subscriber {
    /// As [`Fanout::consumer`]; refused once the controller stops.
    pub fn consumer(&self, filter: Filter) -> Result<Consumer, FanoutError> {
        let tx = self.tx.upgrade().ok_or(FanoutError::Stopped)?;
        self.shared.consumer(&tx, filter)
    }
}

impl Shared {
    fn consumer(
        self: &Arc<Self>,
        tx: &broadcast::Sender<Arc<AuditRecord>>,
        filter: Filter,
    ) -> Result<Consumer, FanoutError> {
        self.consumers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONSUMERS).then_some(n + 1)
            })
            .map_err(|_| FanoutError::TooMany)?;
        Ok(Consumer {
            rx: tx.subscribe(),
            filter,
            shared: self.clone(),
        })
    }
}

/// What a consumer gets next.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Record(Arc<AuditRecord>),
    /// This consumer fell behind: this many records (before filtering) went by unseen.
    Dropped(u64),
}

/// One stream's place in the fan-out; dropping it unsubscribes.
pub struct Consumer {
    rx: broadcast::Receiver<Arc<AuditRecord>>,
    filter: Filter,
    shared: Arc<Shared>,
}

impl Consumer {
    /// The next record the filter selects, or a drop notice; None once the controller stops.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            match self.rx.recv().await {
                Ok(r) if self.filter.matches(&r) => return Some(Item::Record(r)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.shared.dropped.fetch_add(n, Ordering::Relaxed);
                    return Some(Item::Dropped(n));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shared.consumers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Which records a consumer gets. Each field set must match a decision record; records that
/// are not decisions pass an empty filter, and loss records (`kind: lost`) pass any filter,
/// since a loss may hide a record the filter would have selected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The agent's name or its cgroup path (as the record carries them).
    pub agent: Option<String>,
    /// The policy's verdict (`decision`, not `action`: an audit-mode deny is `deny`).
    pub decision: Option<Verdict>,
    /// The destination address lies in this network.
    pub dst: Option<IpNet>,
    /// The agent's task id at decision time.
    pub task: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// A filter value that cannot be used; `field` names the query parameter.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{reason}")]
pub struct FilterError {
    pub field: &'static str,
    pub reason: String,
}

impl Filter {
    /// Parses the filter's parameters as they come in a query; an empty value is an error.
    pub fn parse(
        agent: Option<&str>,
        decision: Option<&str>,
        dst: Option<&str>,
        task: Option<&str>,
    ) -> Result<Self, FilterError> {
        let err = |field, reason: String| FilterError { field, reason };
        let nonempty = |field, v: Option<&str>| match v {
            Some(s) if s.trim().is_empty() => Err(err(field, "must not be empty".into())),
            v => Ok(v.map(str::to_string)),
        };
        let agent = nonempty("agent", agent)?.map(|a| a.trim_end_matches('/').to_string());
        let task = nonempty("task", task)?;
        let decision = match nonempty("decision", decision)?.as_deref() {
            None => None,
            Some("allow") => Some(Verdict::Allow),
            Some("deny") => Some(Verdict::Deny),
            Some(v) => return Err(err("decision", format!("{v:?} is not allow or deny"))),
        };
        let dst = match nonempty("dst", dst)? {
            None => None,
            Some(s) => Some(
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        err(
                            "dst",
                            format!("{s:?} is not a CIDR or an IP address (e.g. 10.0.0.0/8)"),
                        )
                    })?
                    .trunc(),
            ),
        };
        Ok(Self {
            agent,
            decision,
            dst,
            task,
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn matches(&self, rec: &AuditRecord) -> bool {
        if rec.kind == "lost" {
            return true;
        }
        let Some(d) = &rec.decision else {
            return self.is_empty();
        };
        if let Some(a) = &self.agent {
            let by_cgroup = d
                .agent_cgroup
                .as_deref()
                .is_some_and(|c| c.trim_end_matches('/') == a.as_str());
            if d.agent.as_deref() != Some(a.as_str()) && !by_cgroup {
                return false;
            }
        }
        if let Some(v) = self.decision {
            if d.decision != v.as_str() {
                return false;
            }
        }
        if let Some(net) = &self.dst {
            // sock_create and Unix-socket decisions have no address: no CIDR selects them.
            match d.dst.parse::<IpAddr>() {
                Ok(ip) if net.contains(&ip) => {}
                _ => return false,
            }
        }
        if let Some(t) = &self.task {
            if d.task.as_deref() != Some(t.as_str()) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(agent: &str, verdict: &str, dst: &str, task: Option<&str>) -> AuditRecord {
        serde_json::from_value(serde_json::json!({
            "seq": 0, "time": "", "node": "n", "kind": "decision", "decision": {
            "agent": agent, "agent_cgroup": format!("agents/{agent}"), "cgroup_id": 1,
            "cgroup": null, "pid": 1, "tid": 1, "comm": "c", "exe": null, "uid": 0, "gid": 0,
            "hook": "connect4", "family": "inet", "protocol": "tcp", "dst": dst, "port": 80,
            "decision": verdict, "mode": "enforce", "action": "allowed", "reason": "rule",
            "rule": null, "rule_name": null, "policy": null, "policy_version": 1, "task": task,
        }}))
        .expect("a decision record")
    }

    fn other(kind: &str) -> AuditRecord {
        serde_json::from_value(serde_json::json!({"seq":0,"time":"","node":"n","kind":kind}))
            .expect("a record")
    }

    fn filter(a: Option<&str>, d: Option<&str>, n: Option<&str>, t: Option<&str>) -> Filter {
        Filter::parse(a, d, n, t).expect("a valid filter")
    }

    #[test]
    fn each_field_selects_and_all_must_match() {
        let r = decision("a", "deny", "10.1.2.3", Some("T-1"));
        assert!(filter(None, None, None, None).matches(&r));
        assert!(filter(Some("a"), None, None, None).matches(&r));
        assert!(filter(Some("agents/a/"), None, None, None).matches(&r));
        assert!(!filter(Some("b"), None, None, None).matches(&r));
        assert!(filter(None, Some("deny"), None, None).matches(&r));
        assert!(!filter(None, Some("allow"), None, None).matches(&r));
        assert!(filter(None, None, Some("10.0.0.0/8"), None).matches(&r));
        assert!(filter(None, None, Some("10.1.2.3"), None).matches(&r));
        assert!(!filter(None, None, Some("10.1.2.4/32"), None).matches(&r));
        assert!(!filter(None, None, Some("::/0"), None).matches(&r));
        assert!(filter(None, None, None, Some("T-1")).matches(&r));
        assert!(!filter(None, None, None, Some("T-2")).matches(&r));
        assert!(filter(Some("a"), Some("deny"), Some("10.0.0.0/8"), Some("T-1")).matches(&r));
        assert!(!filter(Some("a"), Some("allow"), Some("10.0.0.0/8"), Some("T-1")).matches(&r));
        // No address (sock_create): no CIDR selects it.
        let r = decision("a", "deny", "", None);
        assert!(!filter(None, None, Some("0.0.0.0/0"), None).matches(&r));
        assert!(!filter(None, None, None, Some("T-1")).matches(&r));
        let r = decision("a", "allow", "::1", None);
        assert!(filter(None, None, Some("::1/128"), None).matches(&r));
    }

    #[test]
    fn losses_pass_every_filter_and_notices_only_an_empty_one() {
        let f = filter(Some("a"), Some("deny"), None, None);
        assert!(f.matches(&other("lost")));
        assert!(!f.matches(&other("task-started")));
        assert!(filter(None, None, None, None).matches(&other("task-started")));
    }

    #[test]
    fn bad_values_name_their_parameter() {
        let e = Filter::parse(None, Some("maybe"), None, None).unwrap_err();
        assert_eq!(e.field, "decision");
        assert!(e.reason.contains("allow or deny"), "{e}");
        let e = Filter::parse(None, None, Some("10.0.0.0/33"), None).unwrap_err();
        assert_eq!(e.field, "dst");
        let e = Filter::parse(None, None, Some("example.com"), None).unwrap_err();
        assert_eq!(e.field, "dst");
        let e = Filter::parse(Some(" "), None, None, None).unwrap_err();
        assert_eq!((e.field, e.reason.as_str()), ("agent", "must not be empty"));
        let e = Filter::parse(None, None, None, Some("")).unwrap_err();
        assert_eq!(e.field, "task");
        // Host bits are dropped: 10.1.2.3/8 means 10.0.0.0/8.
        let f = filter(None, None, Some("10.1.2.3/8"), None);
        assert_eq!(f.dst, Some("10.0.0.0/8".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_consumer_that_falls_behind_is_told_how_many_and_keeps_receiving() {
        let fan = Fanout::new(4);
        let mut slow = fan.consumer(Filter::default()).unwrap();
        let mut fast = fan.consumer(Filter::default()).unwrap();
        let rec = |seq| AuditRecord {
            seq,
            ..other("lost")
        };
        for seq in 0..10 {
            fan.publish(&rec(seq));
            // The fast one keeps up: it sees every record, never a notice.
            assert_eq!(fast.next().await, Some(Item::Record(Arc::new(rec(seq)))));
        }
        // The slow one: 6 of 10 went by (the ring holds 4), then the 4 newest, in order.
        assert_eq!(slow.next().await, Some(Item::Dropped(6)));
        for seq in 6..10 {
            assert_eq!(slow.next().await, Some(Item::Record(Arc::new(rec(seq)))));
        }
        fan.publish(&rec(10));
        assert_eq!(slow.next().await, Some(Item::Record(Arc::new(rec(10)))));
        assert_eq!(fan.dropped(), 6);
    }

    #[tokio::test]
    async fn filters_apply_per_consumer_and_a_dropped_consumer_is_released() {
        let fan = Fanout::new(16);
        let mut allow = fan
            .consumer(filter(None, Some("allow"), None, None))
            .unwrap();
        let mut deny = fan
            .consumer(filter(Some("a"), Some("deny"), None, None))
            .unwrap();
        for (agent, v) in [("a", "allow"), ("a", "deny"), ("b", "deny"), ("b", "allow")] {
            fan.publish(&decision(agent, v, "127.0.0.1", None));
        }
        drop(fan.clone());
        let seen = |i: Option<Item>| match i {
            Some(Item::Record(r)) => {
                let d = r.decision.clone().unwrap();
                (d.agent.unwrap(), d.decision)
            }
            i => panic!("{i:?}"),
        };
        assert_eq!(seen(allow.next().await), ("a".into(), "allow".into()));
        assert_eq!(seen(allow.next().await), ("b".into(), "allow".into()));
        assert_eq!(seen(deny.next().await), ("a".into(), "deny".into()));
        assert_eq!(fan.consumers(), 2);
        drop(deny);
        assert_eq!(fan.consumers(), 1);
        assert_eq!(fan.tx.receiver_count(), 1);
    }

    #[test]
    fn consumers_are_capped_and_nothing_is_copied_without_any() {
        let fan = Fanout::new(4);
        fan.publish(&other("lost"));
        assert_eq!(fan.tx.len(), 0);
        let held: Vec<_> = (0..MAX_CONSUMERS)
            .map(|_| fan.consumer(Filter::default()).unwrap())
            .collect();
        assert_eq!(
            fan.consumer(Filter::default()).err(),
            Some(FanoutError::TooMany)
        );
        drop(held);
        assert!(fan.consumer(Filter::default()).is_ok());
    }

    #[tokio::test]
    async fn streams_end_when_the_fan_out_goes() {
        let fan = Fanout::new(4);
        let sub = fan.subscriber();
        let mut c = sub.consumer(Filter::default()).unwrap();
        fan.publish(&other("lost"));
        drop(fan);
        assert!(matches!(c.next().await, Some(Item::Record(_))));
        assert_eq!(c.next().await, None);
        assert_eq!(
            sub.consumer(Filter::default()).err(),
            Some(FanoutError::Stopped)
        );
    }
}
