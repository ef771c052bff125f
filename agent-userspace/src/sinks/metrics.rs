//! Prometheus metrics (`agentwall run --metrics ADDR:PORT`, docs/metrics.md): what the records
//! written say (decisions, losses, DNS queries), counted as each is written; what the control
//! actor knows (map occupancy, policy versions), set on its 200 ms tick; and what is read only
//! when scraped (the event ring's fill, the audit log's health).
//!
//! Per record the cost is a hash of the record's label values and one atomic add: the counter
//! handle of each label set is cached by the writer (`Observer`), never looked up in the
//! registry's locked map again.

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{text, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

use super::{AuditRecord, Health};

/// The content type of the exposition (prometheus-client writes OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A record's label value when the record has none (an unnamed agent, a loss of no known place).
const UNKNOWN: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    agent: String,
    decision: String,
    reason: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    agent: String,
    decision: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhereLabels {
    r#where: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

/// The registry and the handles of its metrics. Shared (`Arc`) by the writer's `Observer`, the
/// control actor and the HTTP endpoint.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    dns_queries: Family<DnsLabels, Counter>,
    records: Family<KindLabels, Counter>,
    lost: Family<WhereLabels, Counter>,
    audit_write_errors: Counter,
    audit_healthy: Gauge,
    last_record: Gauge<f64, AtomicU64>,
    ring_pending: Gauge,
    ring_capacity: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    policy_version: Family<PolicyLabels, Gauge>,
    policy_generation: Gauge,
    /// The policies last set, so a removed one's series goes.
    policies: Mutex<(u32, Vec<String>)>,
    /// Read when scraped.
    ring: OnceLock<RingFill>,
    health: OnceLock<Health>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("agentwall");
        let m = Self {
            decisions: Family::default(),
            dns_queries: Family::default(),
            records: Family::default(),
            lost: Family::default(),
            audit_write_errors: Counter::default(),
            audit_healthy: Gauge::default(),
            last_record: Gauge::default(),
            ring_pending: Gauge::default(),
            ring_capacity: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            policy_version: Family::default(),
            policy_generation: Gauge::default(),
            policies: Mutex::new((0, Vec::new())),
            ring: OnceLock::new(),
            health: OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register(
            "decisions",
            "Decisions written, by agent, decision (allow/deny), reason and mode",
            m.decisions.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries the proxy judged, by agent, decision and reason",
            m.dns_queries.clone(),
        );
        registry.register(
            "records_written",
            "Records written to the sinks, by kind",
            m.records.clone(),
        );
        registry.register(
            "records_lost",
            "Events lost, as the loss records written report them, by where they were lost",
            m.lost.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed writes, syncs and reopens of the audit log",
            m.audit_write_errors.clone(),
        );
        registry.register(
            "audit_log_healthy",
            "1 while the audit log is written, 0 while writes fail (event reading paused)",
            m.audit_healthy.clone(),
        );
        registry.register(
            "last_record_timestamp_seconds",
            "Unix time when the last record was written",
            m.last_record.clone(),
        );
        registry.register(
            "ring_pending_bytes",
            "Bytes the kernel has reserved in the event ring that the reader has not consumed",
            m.ring_pending.clone(),
        );
        registry.register(
            "ring_capacity_bytes",
            "Size of the event ring's data area",
            m.ring_capacity.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in a kernel map, as this controller wrote them",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Most entries a kernel map holds",
            m.map_capacity.clone(),
        );
        registry.register(
            "policy_version",
            "The version (generation) of each installed policy, as records carry it",
            m.policy_version.clone(),
        );
        registry.register(
            "policy_generation",
            "The running policy set's generation",
            m.policy_generation.clone(),
        );
        Arc::new(Self { registry, ..m })
    }

    /// The writer's per-record end.
    pub fn observer(self: &Arc<Self>) -> Observer {
        Observer {
            metrics: self.clone(),
            decisions: LabelCache::default(),
            dns: LabelCache::default(),
            kinds: Vec::new(),
            losses: Vec::new(),
        }
    }

    /// Reports the event ring's fill when scraped (a read-only mapping of its positions).
    pub fn watch_ring(&self, ring: BorrowedFd<'_>) -> io::Result<()> {
        let fill = RingFill::new(ring)?;
        self.ring_capacity.set(fill.capacity as i64);
        let _ = self.ring.set(fill);
        Ok(())
    }

    /// Reports the audit log's health when scraped.
    pub fn watch_health(&self, health: Health) {
        let _ = self.health.set(health);
    }

    /// A kernel map's occupancy (the control actor, periodically).
    pub fn set_map(&self, map: &str, entries: usize, capacity: u32) {
        let l = MapLabels { map: map.into() };
        self.map_entries.get_or_create(&l).set(entries as i64);
        self.map_capacity.get_or_create(&l).set(i64::from(capacity));
    }

    /// The installed policies and their version; does nothing while `generation` is unchanged.
    pub fn set_policies<'a>(&self, generation: u32, names: impl Iterator<Item = &'a str>) {
        let mut last = self.policies.lock().expect("policies");
        if last.0 == generation && generation != 0 {
            return;
        }
        let names: Vec<String> = names.map(str::to_string).collect();
        for gone in last.1.iter().filter(|n| !names.contains(n)) {
            self.policy_version.remove(&PolicyLabels {
                policy: gone.clone(),
            });
        }
        for n in &names {
            self.policy_version
                .get_or_create(&PolicyLabels { policy: n.clone() })
                .set(i64::from(generation));
        }
        self.policy_generation.set(i64::from(generation));
        *last = (generation, names);
    }

    /// The exposition, with what is read at scrape time read now.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        if let Some(r) = self.ring.get() {
            self.ring_pending.set(r.pending() as i64);
        }
        if let Some(h) = self.health.get() {
            self.audit_healthy.set(i64::from(h.snapshot().ok));
        }
        let mut out = String::with_capacity(4096);
        text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Counts what each written record says; owned by the sink (one writer, no lock).
pub struct Observer {
    metrics: Arc<Metrics>,
    decisions: LabelCache<4>,
    dns: LabelCache<3>,
    /// Few kinds and places of loss: a short list beats a hash.
    kinds: Vec<(String, Counter)>,
    losses: Vec<(String, Counter)>,
}

impl Observer {
    /// One record was written.
    pub fn written(&mut self, rec: &AuditRecord) {
        let m = &self.metrics;
        cached(&mut self.kinds, &rec.kind, |k| {
            m.records
                .get_or_create_owned(&KindLabels { kind: k.into() })
        })
        .inc();
        if let Some(d) = &rec.decision {
            let agent = d.agent.as_deref().unwrap_or(UNKNOWN);
            self.decisions
                .get(
                    [agent, &d.decision, &d.reason, &d.mode],
                    |[agent, decision, reason, mode]| {
                        m.decisions.get_or_create_owned(&DecisionLabels {
                            agent,
                            decision,
                            reason,
                            mode,
                        })
                    },
                )
                .inc();
        }
        match rec.kind.as_str() {
            "lost" => {
                let n = rec.lost.unwrap_or(0);
                cached(&mut self.losses, loss_where(rec), |w| {
                    m.lost
                        .get_or_create_owned(&WhereLabels { r#where: w.into() })
                })
                .inc_by(n);
            }
            "dns" => {
                let field = |k: &str| {
                    rec.detail
                        .as_ref()
                        .and_then(|d| d.get(k))
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or(UNKNOWN)
                };
                let labels = [field("agent"), field("decision"), field("reason")];
                self.dns
                    .get(labels, |[agent, decision, reason]| {
                        m.dns_queries.get_or_create_owned(&DnsLabels {
                            agent,
                            decision,
                            reason,
                        })
                    })
                    .inc();
            }
            _ => {}
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        m.last_record.set(now.as_secs_f64());
    }

    /// A write, sync or reopen of the audit log failed.
    pub fn write_error(&self) {
        self.metrics.audit_write_errors.inc();
    }
}

/// Where a loss record says its events were lost (`detail.where`: kernel-ring, undecodable,
/// ...); one without it (an older controller's) is the kernel's: the ring was full.
fn loss_where(rec: &AuditRecord) -> &str {
    rec.detail
        .as_ref()
        .and_then(|d| d.get("where"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("kernel-ring")
}

fn cached<'a>(
    list: &'a mut Vec<(String, Counter)>,
    key: &str,
    make: impl FnOnce(&str) -> Counter,
) -> &'a Counter {
    let i = match list.iter().position(|(k, _)| k == key) {
        Some(i) => i,
        None => {
            list.push((key.to_string(), make(key)));
            list.len() - 1
        }
    };
    &list[i].1
}

/// Counter handles by label values, found without allocating: by a hash of the values, then
/// compared.
struct LabelCache<const N: usize> {
    by_hash: HashMap<u64, Bucket<N>, BuildHasherDefault<Prehashed>>,
    state: RandomState,
}

impl<const N: usize> Default for LabelCache<N> {
    fn default() -> Self {
        Self {
            by_hash: HashMap::default(),
            state: RandomState::new(),
        }
    }
}

impl<const N: usize> LabelCache<N> {
    fn get(&mut self, values: [&str; N], make: impl FnOnce([String; N]) -> Counter) -> &Counter {
        let bucket = self.by_hash.entry(self.state.hash_one(values)).or_default();
        let i = match bucket
            .iter()
            .position(|(k, _)| k.iter().zip(values).all(|(a, b)| a == b))
        {
            Some(i) => i,
            None => {
                let owned = values.map(str::to_string);
                bucket.push((owned.clone(), make(owned)));
                bucket.len() - 1
            }
        };
        &bucket[i].1
    }
}

/// Label sets whose values hash alike.
type Bucket<const N: usize> = Vec<([String; N], Counter)>;

/// The keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The event ring's positions, mapped read-only (the kernel allows a read-only mapping of the
/// consumer and producer pages; aya keeps its own mapping private). Pending bytes are
/// producer - consumer: records reserved (committed or not) and not yet consumed.
struct RingFill {
    /// The consumer page, then the producer page.
    pages: NonNull<libc::c_void>,
    page: usize,
    capacity: u64,
}

// SAFETY: the mapping is read-only and only read through atomics.
unsafe impl Send for RingFill {}
unsafe impl Sync for RingFill {}

impl RingFill {
    fn new(ring: BorrowedFd<'_>) -> io::Result<Self> {
        let map = aya::maps::MapData::from_fd(ring.try_clone_to_owned()?)
            .map_err(|e| io::Error::other(format!("the event ring: {e}")))?;
        let capacity = map
            .info()
            .map_err(|e| io::Error::other(format!("the event ring's size: {e}")))?
            .max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh shared read-only mapping of the ring map's first two pages, which the
        // kernel keeps valid (and the map alive) until munmap.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            pages: NonNull::new(p).ok_or_else(|| io::Error::other("mmap returned null"))?,
            page,
            capacity: u64::from(capacity),
        })
    }

    fn pos(&self, offset: usize) -> u64 {
        // SAFETY: page-aligned and inside the mapping; the kernel writes it atomically.
        unsafe { AtomicU64::from_ptr(self.pages.as_ptr().byte_add(offset).cast()) }
            .load(Ordering::Acquire)
    }

    fn pending(&self) -> u64 {
        let consumer = self.pos(0);
        let producer = self.pos(self.page);
        producer.saturating_sub(consumer).min(self.capacity)
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.pages.as_ptr(), 2 * self.page) };
    }
}

/// Serves GET /metrics on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    use axum::{extract::State, http::header, response::IntoResponse, routing::get};
    async fn scrape(State(m): State<Arc<Metrics>>) -> axum::response::Response {
        match m.encode() {
            Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
            Err(e) => (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the metrics: {e}"),
            )
                .into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// Names of the metric samples an exposition carries (a counter `x` is sampled as `x_total`).
pub fn exposed_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                names.insert(match kind {
                    "counter" => format!("{name}_total"),
                    _ => name.to_string(),
                });
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::DecisionRecord;

    fn decision(agent: &str, decision: &str, reason: &str) -> AuditRecord {
        let d: DecisionRecord = serde_json::from_value(serde_json::json!({
            "agent": agent, "agent_cgroup": null, "cgroup_id": 1, "cgroup": null, "pid": 1,
            "tid": 1, "comm": "c", "exe": null, "uid": 0, "gid": 0, "hook": "connect4",
            "family": "inet", "protocol": "tcp", "dst": "127.0.0.1", "port": 1,
            "decision": decision, "mode": "enforce", "action": "allowed", "reason": reason,
            "rule": null, "rule_name": null, "policy": null, "policy_version": 1
        }))
        .expect("a decision record");
        AuditRecord {
            decision: Some(d),
            ..other("decision", None, None)
        }
    }

    fn other(kind: &str, lost: Option<u64>, detail: Option<serde_json::Value>) -> AuditRecord {
        // From JSON: fields added to the record later take their defaults.
        serde_json::from_value(serde_json::json!({
            "seq": 2, "time": "", "node": "n", "kind": kind, "lost": lost, "detail": detail,
        }))
        .expect("a record")
    }

    /// The value of the sample `name{labels}` (labels as the exposition writes them).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn records_are_counted_by_their_labels() {
        let m = Metrics::new();
        let mut o = m.observer();
        for _ in 0..3 {
            o.written(&decision("a", "allow", "rule"));
        }
        o.written(&decision("a", "deny", "default-deny:no-address-match"));
        o.written(&decision("b", "deny", "default-deny:no-address-match"));
        o.written(&other("lost", Some(7), None));
        o.written(&other(
            "lost",
            Some(2),
            Some(serde_json::json!({ "where": "stream" })),
        ));
        o.written(&other(
            "dns",
            None,
            Some(serde_json::json!({ "agent": "a", "decision": "deny", "reason": "no-rule" })),
        ));
        o.write_error();
        m.set_map("agents", 3, 16);
        m.set_policies(2, ["p", "q"].into_iter());
        m.set_policies(3, ["p"].into_iter());
        let t = m.encode().unwrap();
        let s = |series| sample(&t, series).unwrap_or_else(|| panic!("{series} in\n{t}"));
        assert_eq!(
            s(
                r#"agentwall_decisions_total{agent="a",decision="allow",reason="rule",mode="enforce"}"#
            ),
            3.0
        );
        assert_eq!(
            s(
                r#"agentwall_decisions_total{agent="b",decision="deny",reason="default-deny:no-address-match",mode="enforce"}"#
            ),
            1.0
        );
        assert_eq!(
            s(r#"agentwall_records_written_total{kind="decision"}"#),
            5.0
        );
        assert_eq!(s(r#"agentwall_records_written_total{kind="lost"}"#), 2.0);
        assert_eq!(
            s(r#"agentwall_records_lost_total{where="kernel-ring"}"#),
            7.0
        );
        assert_eq!(s(r#"agentwall_records_lost_total{where="stream"}"#), 2.0);
        assert_eq!(
            s(r#"agentwall_dns_queries_total{agent="a",decision="deny",reason="no-rule"}"#),
            1.0
        );
        assert_eq!(s("agentwall_audit_write_errors_total"), 1.0);
        assert_eq!(s(r#"agentwall_map_entries{map="agents"}"#), 3.0);
        assert_eq!(s(r#"agentwall_map_capacity{map="agents"}"#), 16.0);
        assert_eq!(s(r#"agentwall_policy_version{policy="p"}"#), 3.0);
        assert!(
            !t.contains(r#"policy="q""#),
            "a removed policy's series goes:\n{t}"
        );
        assert!(s("agentwall_last_record_timestamp_seconds") > 1.7e9);
    }

    /// Every metric the Grafana dashboard queries is one the registry exposes.
    #[test]
    fn the_dashboard_queries_only_exposed_metrics() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/grafana/agentwall-dashboard.json");
        let text = std::fs::read_to_string(&path).expect("the dashboard");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
        let mut exprs = Vec::new();
        collect_exprs(&dash, &mut exprs);
        assert!(exprs.len() >= 8, "the dashboard's queries: {exprs:?}");
        // A family without series is not exposed at all: one record of each kind first.
        let m = Metrics::new();
        let mut o = m.observer();
        o.written(&decision("a", "deny", "rule"));
        o.written(&other("lost", Some(1), None));
        o.written(&other(
            "dns",
            None,
            Some(serde_json::json!({ "decision": "deny" })),
        ));
        m.set_map("agents", 1, 2);
        m.set_policies(1, ["p"].into_iter());
        let exposed = exposed_names(&m.encode().unwrap());
        let mut queried = std::collections::BTreeSet::new();
        for e in &exprs {
            let mut rest = e.as_str();
            while let Some(i) = rest.find("agentwall_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
        assert!(!queried.is_empty());
        let missing: Vec<_> = queried.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "the dashboard queries {missing:?}, not exposed (exposed: {exposed:?})"
        );
    }

    fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect_exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
            _ => {}
        }
    }
}
