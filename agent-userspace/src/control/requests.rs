//! Approvals: requests for access that wait for a person. An agent's own request under
//! `approve: manual` (or a denied connection record an admin picks, `--from-event`) is checked
//! exactly as a grant would be, then queued; an admin approves it (a grant, through the same
//! path as `grant`) or denies it, or it expires and counts as denied. Every step is an audit
//! record naming who did it. Bounded per agent and in all; kept in a state file beside the
//! runtime state's, so a restarted controller still knows them.
//!
//! The denied-decision index lives here too: the event reader feeds it (one short lock per
//! record, never across an await) so `--from-event SEQ` can name a recent denied connect.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use agent_common::proto;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    grants::{self, LiveGrant},
    runtime::{
        Access, Approved, Caller, ControlError, FromEvent, GrantRequest, RequestInfo, RequestState,
    },
    tasks::{check_text, MAX_TEXT_LEN},
    State,
};
use crate::{
    datapath::{boottime_ns, Datapath},
    events::Notice,
};

/// How long a request waits for a person before it expires (`agentwall run --request-ttl`).
pub const DEFAULT_REQUEST_TTL: Duration = Duration::from_secs(300);
/// Pending requests one agent may have at once.
pub const MAX_PENDING_PER_AGENT: usize = 16;
/// Pending requests in all.
pub const MAX_PENDING: usize = 1024;
/// Decided requests kept for their agent to read the outcome.
pub const DECIDED_KEPT: usize = 1024;
/// Denied connect/send decisions remembered for `--from-event`.
pub const DENIED_KEPT: usize = 4096;

/// A request as the controller keeps (and persists) it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub agent_id: u64,
    pub agent: String,
    /// The agent's cgroup path: what the grant names at approval.
    pub cgroup: String,
    /// Normalized network text (as grants keep it).
    pub to: String,
    pub ports: Vec<(u16, u16)>,
    pub protocols: u32,
    pub ttl_secs: u64,
    pub task: Option<String>,
    pub reason: String,
    pub by: Caller,
    /// RFC 3339.
    pub created: String,
    pub expires: String,
    /// CLOCK_BOOTTIME deadline of the pending state.
    pub deadline_ns: u64,
    pub from_event: Option<u64>,
    pub state: RequestState,
    pub grant: Option<u64>,
    pub decided_by: Option<Caller>,
    pub decision_reason: Option<String>,
}

impl Request {
    pub fn info(&self) -> RequestInfo {
        RequestInfo {
            id: self.id,
            agent: self.agent.clone(),
            to: self.to.clone(),
            ports: grants::ports_text(&self.ports),
            protocol: crate::policy::protocols_name(self.protocols).to_string(),
            ttl_secs: self.ttl_secs,
            task: self.task.clone(),
            reason: self.reason.clone(),
            state: self.state,
            created: self.created.clone(),
            expires: self.expires.clone(),
            by: self.by.clone(),
            from_event: self.from_event,
            grant: self.grant,
            decided_by: self.decided_by.clone(),
            decision_reason: self.decision_reason.clone(),
        }
    }

    /// The grant request its approval makes (`ttl_secs` as approved).
    fn grant_request(&self, ttl_secs: u64) -> GrantRequest {
        GrantRequest {
            agent: self.cgroup.clone(),
            to: self.to.clone(),
            ports: (self.ports != [(0, u16::MAX)]).then(|| grants::ports_text(&self.ports)),
            protocol: Some(crate::policy::protocols_name(self.protocols).to_string()),
            ttl_secs,
            task: self.task.clone(),
            reason: self.reason.clone(),
        }
    }

    /// The audit record's detail of this request.
    fn detail(&self) -> serde_json::Value {
        json!({ "request": self.id, "agent": self.agent, "to": self.to,
                "ports": grants::ports_text(&self.ports),
                "protocol": crate::policy::protocols_name(self.protocols),
                "ttl_secs": self.ttl_secs, "task": self.task, "reason": self.reason })
    }
}

/// What the state file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Book {
    pub pending: BTreeMap<u64, Request>,
    /// The last decided ones, oldest first (bounded by `DECIDED_KEPT`).
    pub decided: BTreeMap<u64, Request>,
    pub last_id: u64,
}

/// What the actor keeps for approvals.
pub(crate) struct Requests {
    pub(crate) book: Book,
    /// How long a request stays pending.
    pub(crate) ttl: Duration,
    file: Option<PathBuf>,
    /// Recent denied decisions, fed by the event reader.
    pub(crate) denied: DeniedIndex,
}

impl Default for Requests {
    fn default() -> Self {
        Self {
            book: Book::default(),
            ttl: DEFAULT_REQUEST_TTL,
            file: None,
            denied: DeniedIndex::default(),
        }
    }
}

/// A denied connect or send, as `--from-event` needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedConn {
    pub seq: u64,
    /// The agent that decided (its cgroup id).
    pub agent_id: u64,
    pub addr: IpAddr,
    pub port: u16,
    /// `proto::TCP` or `proto::UDP`.
    pub protocol: u32,
}

/// What the index knows of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Denied(DeniedConn),
    /// A decision that allowed.
    Allowed,
    /// Within the window, but no connect or send that was denied (a notice, a Unix or socket
    /// decision, a lost-events record).
    NotADeniedConnect,
    /// Older than what is kept.
    TooOld {
        oldest: u64,
    },
    /// No such record (yet) from this controller.
    Unknown {
        last: u64,
    },
}

#[derive(Debug, Default)]
struct Recent {
    denied: VecDeque<DeniedConn>,
    allowed: VecDeque<u64>,
    last_seq: u64,
    /// The seq of the last denied decision pushed out of the window.
    evicted: u64,
}

/// The most recent denied decisions (and the seqs of allowed ones, to say why a seq does not
/// fit), shared by the event reader (writer) and the control actor (reader). Bounded; O(1)
/// per record; the lock is held for a push only.
#[derive(Debug, Clone, Default)]
pub struct DeniedIndex(Arc<Mutex<Recent>>);

impl DeniedIndex {
    /// Notes a record the reader wrote: `conn` when it is a denied inet connect or send.
    pub fn observe(&self, seq: u64, allowed: bool, conn: Option<DeniedConn>) {
        let mut r = self.0.lock().expect("denied index");
        r.last_seq = r.last_seq.max(seq);
        match (allowed, conn) {
            (false, Some(c)) => {
                if r.denied.len() == DENIED_KEPT {
                    r.evicted = r.denied.pop_front().map_or(r.evicted, |c| c.seq);
                }
                r.denied.push_back(c);
            }
            (true, _) => {
                if r.allowed.len() == DENIED_KEPT {
                    r.allowed.pop_front();
                }
                r.allowed.push_back(seq);
            }
            _ => {}
        }
    }

    /// What record `seq` was, as far as the index knows.
    pub fn find(&self, seq: u64) -> Seen {
        let r = self.0.lock().expect("denied index");
        if seq == 0 || seq > r.last_seq {
            return Seen::Unknown { last: r.last_seq };
        }
        if let Ok(i) = r.denied.binary_search_by_key(&seq, |c| c.seq) {
            return Seen::Denied(r.denied[i]);
        }
        if r.allowed.binary_search(&seq).is_ok() {
            return Seen::Allowed;
        }
        match r.denied.front() {
            Some(c) if seq <= r.evicted => Seen::TooOld { oldest: c.seq },
            _ => Seen::NotADeniedConnect,
        }
    }
}

/// Where the requests of the controller pinned at `pin_dir` are kept: beside its runtime state.
pub fn state_path(pin_dir: &Path) -> PathBuf {
    let runtime = grants::state_path(pin_dir);
    let stem = runtime
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    runtime.with_file_name(format!("{stem}.requests.json"))
}

/// Reads the requests file; none yet is an empty book.
pub fn load(path: &Path) -> Result<Book, String> {
    super::state_file::load(path, "requests file")
}

/// Writes the requests file atomically, root's only (it names agents and their reasons).
pub fn save(path: &Path, book: &Book) -> Result<(), String> {
    super::state_file::save(path, book)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn controller() -> serde_json::Value {
    json!({ "kind": "controller" })
}

fn admin_only(by: &Caller, what: &str) -> Result<(), ControlError> {
    match by {
        Caller::Agent { .. } => Err(ControlError::Refused(format!(
            "an agent cannot {what} requests"
        ))),
        Caller::Admin { .. } => Ok(()),
    }
}

impl<D: Datapath> State<D> {
    /// Reads the requests file of a pinned controller (those past their deadline expire on the
    /// first tick, recorded).
    pub(crate) fn restore_requests(&mut self) {
        let file = self.enforcer.pin_dir().map(|d| state_path(&d));
        let book = match &file {
            Some(f) => load(f).unwrap_or_else(|e| {
                tracing::error!("pending requests not restored, starting empty: {e}");
                Book::default()
            }),
            None => Book::default(),
        };
        if !book.pending.is_empty() {
            tracing::info!(pending = book.pending.len(), "pending requests restored");
        }
        self.requests.book = book;
        self.requests.file = file;
    }

    fn persist_requests(&self) {
        if let Some(f) = &self.requests.file {
            if let Err(e) = save(f, &self.requests.book) {
                tracing::error!("saving the pending requests: {e}");
            }
        }
    }

    fn request_notice(&self, kind: &'static str, detail: serde_json::Value) {
        let _ = self.notices.send(Notice::new(kind, detail));
    }

    /// An agent's own request for access (the agent socket's `POST /v1/access`): granted at
    /// once under `approve: auto`, else checked as a grant would be and queued.
    pub(crate) fn access(&mut self, req: GrantRequest, by: Caller) -> Result<Access, ControlError> {
        let (agent, _, policy) = self.resolve(&req.agent)?;
        let Caller::Agent { cgroup_id, .. } = &by else {
            return self.grant(req, by).map(Access::Granted);
        };
        if *cgroup_id != agent {
            return Err(ControlError::Refused(
                "an agent asks for access for itself only".into(),
            ));
        }
        if self.approves_at_once(&policy) {
            return self.grant(req, by).map(Access::Granted);
        }
        let g = self.check_grant(&req, &by)?;
        self.queue(g, req.ttl_secs, by, None).map(Access::Pending)
    }

    /// `request --from-event SEQ`: the denied connect or send of record SEQ as a pending request
    /// (admin only).
    pub(crate) fn request_from_event(
        &mut self,
        req: FromEvent,
        by: Caller,
    ) -> Result<RequestInfo, ControlError> {
        admin_only(&by, "make")?;
        let seq = req.seq;
        let conn = match self.requests.denied.find(seq) {
            Seen::Denied(c) => c,
            Seen::Allowed => {
                return Err(ControlError::invalid(
                    "from_event",
                    format!("record {seq} is an allowed decision: there is nothing to request"),
                ))
            }
            Seen::NotADeniedConnect => {
                return Err(ControlError::invalid(
                    "from_event",
                    format!(
                        "record {seq} is not a denied connect or send of an agent (only those \
                         can become requests)"
                    ),
                ))
            }
            Seen::TooOld { oldest } => {
                return Err(ControlError::NotFound(format!(
                    "record {seq} is too old: the controller remembers the last {DENIED_KEPT} \
                     denied decisions (the oldest now is {oldest})"
                )))
            }
            Seen::Unknown { last } => {
                return Err(ControlError::NotFound(format!(
                    "no record {seq} from this controller (the last one is {last}; seqs start \
                     again at 1 when the controller restarts)"
                )))
            }
        };
        let cgroup = self
            .names
            .read()
            .expect("names")
            .agents
            .get(&conn.agent_id)
            .map(|a| a.cgroup.clone())
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "the agent of record {seq} (cgroup id {}) is no longer registered",
                    conn.agent_id
                ))
            })?;
        let (_, _, policy) = self.resolve(&cgroup)?;
        let ttl_secs = match req.ttl_secs {
            Some(t) => t,
            None => self
                .set
                .get(&policy)
                .map(|p| p.grants.max_ttl_secs)
                .filter(|t| *t > 0)
                .ok_or_else(|| {
                    ControlError::Refused(format!(
                        "policy {policy:?} allows no grants (it has no `grantable`)"
                    ))
                })?,
        };
        let addr = match conn.addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(conn.addr, IpAddr::V4),
            a => a,
        };
        let gr = GrantRequest {
            agent: cgroup,
            to: addr.to_string(),
            ports: Some(conn.port.to_string()),
            protocol: Some(crate::policy::protocols_name(conn.protocol).to_string()),
            ttl_secs,
            task: None,
            reason: req.reason,
        };
        let g = self.check_grant(&gr, &by)?;
        self.queue(g, ttl_secs, by, Some(seq))
    }

    /// Queues the checked grant `g` as a pending request; the same one again (same agent,
    /// destination, ports, protocol and task) is the one already pending.
    fn queue(
        &mut self,
        g: LiveGrant,
        ttl_secs: u64,
        by: Caller,
        from_event: Option<u64>,
    ) -> Result<RequestInfo, ControlError> {
        let book = &self.requests.book;
        if let Some(same) = book.pending.values().find(|r| {
            r.agent_id == g.agent_id
                && r.to == g.to
                && r.ports == g.ports
                && r.protocols == g.protocols
                && r.task == g.task
        }) {
            return Ok(same.info());
        }
        let of_agent = book
            .pending
            .values()
            .filter(|r| r.agent_id == g.agent_id)
            .count();
        if of_agent >= MAX_PENDING_PER_AGENT {
            return Err(ControlError::TooMany(format!(
                "agent {:?} has {of_agent} pending requests, the most it may have: wait for a \
                 decision or for them to expire",
                g.agent
            )));
        }
        if book.pending.len() >= MAX_PENDING {
            return Err(ControlError::TooMany(format!(
                "{MAX_PENDING} requests are pending, the most the controller keeps"
            )));
        }
        let cgroup = self
            .entries
            .get(&g.agent_id)
            .map(|e| e.rel.clone())
            .ok_or_else(|| ControlError::NotFound(format!("agent {:?} is gone", g.agent)))?;
        let now = SystemTime::now();
        let ttl = self.requests.ttl;
        self.requests.book.last_id += 1;
        let r = Request {
            id: self.requests.book.last_id,
            agent_id: g.agent_id,
            agent: g.agent,
            cgroup,
            to: g.to,
            ports: g.ports,
            protocols: g.protocols,
            ttl_secs,
            task: g.task,
            reason: g.reason,
            by: by.clone(),
            created: rfc3339(now),
            expires: rfc3339(now + ttl),
            deadline_ns: boottime_ns() + ttl.as_nanos() as u64,
            from_event,
            state: RequestState::Pending,
            grant: None,
            decided_by: None,
            decision_reason: None,
        };
        self.requests.book.pending.insert(r.id, r.clone());
        self.persist_requests();
        let mut detail = r.detail();
        detail["expires"] = json!(r.expires);
        detail["from_event"] = json!(r.from_event);
        detail["by"] = json!(by);
        self.request_notice("request-created", detail);
        Ok(r.info())
    }

    /// The pending requests, oldest first.
    pub(crate) fn requests(&self) -> Vec<RequestInfo> {
        self.requests
            .book
            .pending
            .values()
            .map(Request::info)
            .collect()
    }

    /// One request, pending or decided; an agent sees its own only (another's is "no such").
    pub(crate) fn request(&self, id: u64, by: &Caller) -> Result<RequestInfo, ControlError> {
        let book = &self.requests.book;
        let found = book.pending.get(&id).or_else(|| book.decided.get(&id));
        match (found, by) {
            (Some(r), Caller::Agent { cgroup_id, .. }) if r.agent_id != *cgroup_id => None,
            (found, _) => found,
        }
        .map(Request::info)
        .ok_or_else(|| ControlError::NotFound(format!("no request {id}")))
    }

    /// A pending request by id, or why not.
    fn pending(&self, id: u64) -> Result<&Request, ControlError> {
        if let Some(r) = self.requests.book.pending.get(&id) {
            return Ok(r);
        }
        Err(match self.requests.book.decided.get(&id) {
            Some(r) => ControlError::Conflict(format!(
                "request {id} is no longer pending: {}",
                serde_json::to_value(r.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )),
            None => ControlError::NotFound(format!("no pending request {id}")),
        })
    }

    /// Moves a pending request to the decided ones.
    fn decide(&mut self, id: u64, state: RequestState, by: Option<Caller>) -> Option<Request> {
        let mut r = self.requests.book.pending.remove(&id)?;
        r.state = state;
        r.decided_by = by;
        let decided = &mut self.requests.book.decided;
        decided.insert(id, r.clone());
        while decided.len() > DECIDED_KEPT {
            decided.pop_first();
        }
        Some(r)
    }

    /// Approves a pending request: a grant through the same path as `grant` (scope, ttl and
    /// the kernel's deadline apply); `ttl_secs` may shorten the requested ttl, never lengthen it.
    pub(crate) fn approve(
        &mut self,
        id: u64,
        ttl_secs: Option<u64>,
        by: Caller,
    ) -> Result<Approved, ControlError> {
        admin_only(&by, "approve")?;
        let r = self.pending(id)?;
        let ttl = match ttl_secs {
            Some(t) if t == 0 || t > r.ttl_secs => {
                return Err(ControlError::invalid(
                    "ttl_secs",
                    format!(
                        "{t} out of range: 1 to the requested {}s (an approval may shorten a \
                         request, never lengthen it)",
                        r.ttl_secs
                    ),
                ))
            }
            Some(t) => t,
            None => r.ttl_secs,
        };
        // The agent it was made for, not a cgroup made since at the same path.
        let (agent, _, _) = self.resolve(&r.cgroup)?;
        if agent != r.agent_id {
            return Err(ControlError::NotFound(format!(
                "the agent of request {id} ({}) is gone",
                r.cgroup
            )));
        }
        let req = r.grant_request(ttl);
        // On refusal (the policy changed, the task ended, the agent left) nothing changes.
        let grant = self.grant(req, by.clone())?;
        let mut r = self
            .decide(id, RequestState::Approved, Some(by.clone()))
            .expect("pending: checked above");
        r.grant = Some(grant.id);
        r.ttl_secs = ttl;
        self.requests.book.decided.insert(id, r.clone());
        self.persist_requests();
        let mut detail = r.detail();
        detail["grant"] = json!(grant.id);
        detail["expires"] = json!(grant.expires);
        detail["by"] = json!(by);
        self.request_notice("request-approved", detail);
        Ok(Approved {
            request: r.info(),
            grant,
        })
    }

    /// Denies a pending request.
    pub(crate) fn deny(
        &mut self,
        id: u64,
        reason: Option<String>,
        by: Caller,
    ) -> Result<RequestInfo, ControlError> {
        admin_only(&by, "deny")?;
        self.pending(id)?;
        if let Some(t) = &reason {
            check_text("reason", t, MAX_TEXT_LEN)?;
        }
        let mut r = self
            .decide(id, RequestState::Denied, Some(by.clone()))
            .expect("pending: checked above");
        r.decision_reason = reason;
        self.requests.book.decided.insert(id, r.clone());
        self.persist_requests();
        let mut detail = r.detail();
        detail["denied_because"] = json!(r.decision_reason);
        detail["by"] = json!(by);
        self.request_notice("request-denied", detail);
        Ok(r.info())
    }

    /// Expires the requests past their deadline (they count as denied).
    pub(crate) fn expire_requests(&mut self) {
        let now = boottime_ns();
        let ids: Vec<u64> = self
            .requests
            .book
            .pending
            .values()
            .filter(|r| r.deadline_ns <= now)
            .map(|r| r.id)
            .collect();
        if ids.is_empty() {
            return;
        }
        for id in ids {
            if let Some(r) = self.decide(id, RequestState::Expired, None) {
                let mut detail = r.detail();
                detail["expires"] = json!(r.expires);
                detail["by"] = controller();
                self.request_notice("request-expired", detail);
            }
        }
        self.persist_requests();
    }
}

/// The index entry of a decision record, as the event reader sees it: a denied connect or
/// send (TCP or UDP, to an address) of a registered agent.
pub fn denied_conn(
    seq: u64,
    agent_id: u64,
    decision: &str,
    dst: IpAddr,
    port: u16,
    protocol: &str,
    inet: bool,
) -> (bool, Option<DeniedConn>) {
    let allowed = decision != "deny";
    let protocol = match protocol {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        _ => 0,
    };
    let conn = (!allowed && inet && protocol != 0 && agent_id != 0).then_some(DeniedConn {
        seq,
        agent_id,
        addr: dst,
        port,
        protocol,
    });
    (allowed, conn)
}

#[cfg(test)]
mod tests {
    use super::{
        super::tests::{one_policy, setup, T},
        *,
    };

    const POLICY: &str =
        "name: r\nagents:\n  cgroups: [\"aw/*\"]\negress:\n  - cidr: 127.0.0.1/32\n\
        grantable:\n  - cidr: 127.0.0.0/8\n    ports: 1000-2000\n    protocol: tcp\n\
        max_grant_ttl: 1m\n";
    const ADMIN: Caller = Caller::Admin { uid: 0 };

    fn t() -> T {
        let mut t = setup(64, &["aw/a", "aw/b"], one_policy(POLICY));
        t.kinds();
        t
    }

    fn agent(t: &T, rel: &str) -> Caller {
        Caller::Agent {
            cgroup_id: t.id(rel),
            pid: 7,
        }
    }

    fn ask(to: &str, ports: &str, ttl: u64) -> GrantRequest {
        GrantRequest {
            agent: "a".into(),
            to: to.into(),
            ports: Some(ports.into()),
            protocol: Some("tcp".into()),
            ttl_secs: ttl,
            task: None,
            reason: "fetch".into(),
        }
    }

    fn pending(a: Result<Access, ControlError>) -> RequestInfo {
        match a {
            Ok(Access::Pending(r)) => r,
            other => panic!("expected a pending request: {other:?}"),
        }
    }

    #[test]
    fn requests_pending_is_an_agents_own_in_scope_request_under_manual() {
        let mut t = t();
        let me = agent(&t, "aw/a");
        let r = pending(t.state.access(ask("127.0.0.5", "1500", 30), me.clone()));
        assert_eq!(
            (r.state, r.by.clone(), r.ttl_secs),
            (RequestState::Pending, me.clone(), 30)
        );
        assert_eq!((r.to.as_str(), r.ports.as_str()), ("127.0.0.5/32", "1500"));
        // Nothing granted yet.
        assert!(t.state.enforcer.grants.is_empty());
        // The same request again is the one pending, with no new record.
        let again = pending(t.state.access(ask("127.0.0.5", "1500", 30), me.clone()));
        assert_eq!(again.id, r.id);
        assert_eq!(t.kinds(), ["request-created"]);
        assert_eq!(t.state.requests().len(), 1);
        // Out of scope: refused with the reason, never queued.
        for (req, want) in [
            (ask("10.0.0.1", "1500", 30), "grantable"),
            (ask("127.0.0.5", "80", 30), "grantable"),
            (ask("127.0.0.5", "1500", 61), "max_grant_ttl"),
        ] {
            match t.state.access(req, me.clone()) {
                Err(ControlError::Refused(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            t.state.access(ask("127.0.0.1/8", "1500", 30), me.clone()),
            Err(ControlError::Invalid { ref field, .. }) if field == "to"
        ));
        // For another agent: refused.
        let other = agent(&t, "aw/b");
        assert!(matches!(
            t.state.access(ask("127.0.0.5", "1500", 30), other.clone()),
            Err(ControlError::Refused(m)) if m.contains("itself only")
        ));
        assert_eq!(t.state.requests().len(), 1);
        assert!(t.kinds().is_empty());
        // Its agent reads it; another agent cannot, an admin can.
        assert_eq!(t.state.request(r.id, &me).unwrap().id, r.id);
        assert!(matches!(
            t.state.request(r.id, &other),
            Err(ControlError::NotFound(_))
        ));
        assert!(t.state.request(r.id, &ADMIN).is_ok());
    }

    #[test]
    fn requests_approved_become_grants_through_the_grant_path() {
        let mut t = t();
        let me = agent(&t, "aw/a");
        let r = pending(t.state.access(ask("127.0.0.5", "1500", 30), me.clone()));
        t.kinds();
        // An agent never approves or denies.
        assert!(matches!(
            t.state.approve(r.id, None, me.clone()),
            Err(ControlError::Refused(_))
        ));
        assert!(matches!(
            t.state.deny(r.id, None, me.clone()),
            Err(ControlError::Refused(_))
        ));
        // Longer than requested: 400, nothing changes.
        assert!(matches!(
            t.state.approve(r.id, Some(31), ADMIN),
            Err(ControlError::Invalid { ref field, .. }) if field == "ttl_secs"
        ));
        assert!(t.state.enforcer.grants.is_empty());
        let a = t.state.approve(r.id, Some(10), ADMIN).unwrap();
        assert_eq!(a.request.state, RequestState::Approved);
        assert_eq!(a.request.grant, Some(a.grant.id));
        assert_eq!(a.request.ttl_secs, 10);
        assert_eq!(a.grant.by, ADMIN);
        assert_eq!(t.state.enforcer.grants.len(), 1);
        assert_eq!(t.kinds(), ["granted", "request-approved"]);
        // Decided: its agent reads the outcome; a second decision conflicts.
        let seen = t.state.request(r.id, &me).unwrap();
        assert_eq!(
            (seen.state, seen.grant),
            (RequestState::Approved, Some(a.grant.id))
        );
        assert!(matches!(
            t.state.approve(r.id, None, ADMIN),
            Err(ControlError::Conflict(_))
        ));
        assert!(matches!(
            t.state.deny(999, None, ADMIN),
            Err(ControlError::NotFound(_))
        ));
        assert!(t.state.requests().is_empty());
    }

    #[test]
    fn requests_denied_and_expired_are_recorded_and_grant_nothing() {
        let mut t = t();
        let me = agent(&t, "aw/a");
        let r = pending(t.state.access(ask("127.0.0.5", "1500", 30), me.clone()));
        let r2 = pending(t.state.access(ask("127.0.0.6", "1500", 30), me.clone()));
        t.kinds();
        assert!(matches!(
            t.state.deny(r.id, Some("bad\u{7}".into()), ADMIN),
            Err(ControlError::Invalid { ref field, .. }) if field == "reason"
        ));
        let d = t.state.deny(r.id, Some("not today".into()), ADMIN).unwrap();
        assert_eq!(d.state, RequestState::Denied);
        assert_eq!(d.decision_reason.as_deref(), Some("not today"));
        // Expiry: past its deadline, it counts as denied.
        t.state
            .requests
            .book
            .pending
            .get_mut(&r2.id)
            .unwrap()
            .deadline_ns = 1;
        t.state.expire_requests();
        let e = t.state.request(r2.id, &me).unwrap();
        assert_eq!(e.state, RequestState::Expired);
        assert!(t.state.enforcer.grants.is_empty());
        assert_eq!(t.kinds(), ["request-denied", "request-expired"]);
    }

    #[test]
    fn requests_are_bounded_per_agent() {
        let mut t = t();
        let me = agent(&t, "aw/a");
        for p in 0..MAX_PENDING_PER_AGENT as u16 {
            pending(
                t.state
                    .access(ask("127.0.0.5", &(1000 + p).to_string(), 30), me.clone()),
            );
        }
        t.kinds();
        assert!(matches!(
            t.state.access(ask("127.0.0.5", "1999", 30), me.clone()),
            Err(ControlError::TooMany(m)) if m.contains("pending requests")
        ));
        assert!(
            t.kinds().is_empty(),
            "a refusal over the cap writes no record"
        );
        // Another agent still may ask.
        let other = agent(&t, "aw/b");
        let mut req = ask("127.0.0.5", "1999", 30);
        req.agent = "b".into();
        pending(t.state.access(req, other));
    }

    #[test]
    fn requests_from_a_denied_record_name_why_a_seq_does_not_fit() {
        let mut t = t();
        let id = t.id("aw/a");
        let ix = t.state.requests.denied.clone();
        let denied = |seq, port| {
            denied_conn(
                seq,
                id,
                "deny",
                "127.0.0.5".parse().unwrap(),
                port,
                "tcp",
                true,
            )
        };
        let (a, c) = denied(3, 1500);
        ix.observe(3, a, c);
        let (a, c) = denied_conn(4, id, "allow", "127.0.0.1".parse().unwrap(), 9, "tcp", true);
        ix.observe(4, a, c);
        ix.observe(5, false, None);
        let from = |seq| FromEvent {
            seq,
            ttl_secs: None,
            reason: "looks fine".into(),
        };
        let r = t.state.request_from_event(from(3), ADMIN).unwrap();
        assert_eq!(r.from_event, Some(3));
        assert_eq!(
            (r.to.as_str(), r.ports.as_str(), r.protocol.as_str()),
            ("127.0.0.5/32", "1500", "tcp")
        );
        // No ttl given: the policy's max_grant_ttl.
        assert_eq!(r.ttl_secs, 60);
        assert_eq!(r.by, ADMIN);
        let field =
            |e| matches!(e, Err(ControlError::Invalid { ref field, .. }) if field == "from_event");
        assert!(field(t.state.request_from_event(from(4), ADMIN)));
        assert!(field(t.state.request_from_event(from(5), ADMIN)));
        // Older than every denied one kept, but nothing was pushed out: not a denied connect.
        assert!(field(t.state.request_from_event(from(1), ADMIN)));
        assert!(matches!(
            t.state.request_from_event(from(6), ADMIN),
            Err(ControlError::NotFound(m)) if m.contains("no record 6")
        ));
        // Out of scope: refused, not queued.
        let (a, c) = denied(7, 80);
        ix.observe(7, a, c);
        assert!(matches!(
            t.state.request_from_event(from(7), ADMIN),
            Err(ControlError::Refused(m)) if m.contains("grantable")
        ));
        // An agent cannot.
        assert!(matches!(
            t.state.request_from_event(from(3), agent(&t, "aw/a")),
            Err(ControlError::Refused(_))
        ));
        // Beyond the window: too old.
        for seq in 100..100 + DENIED_KEPT as u64 {
            let (a, c) = denied(seq, 1500);
            ix.observe(seq, a, c);
        }
        assert!(matches!(
            t.state.request_from_event(from(3), ADMIN),
            Err(ControlError::NotFound(m)) if m.contains("too old")
        ));
        assert_eq!(t.state.requests().len(), 1);
    }

    #[test]
    fn requests_file_round_trips_and_is_for_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("aw-requests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state/x.requests.json");
        let mut t = t();
        let me = agent(&t, "aw/a");
        pending(t.state.access(ask("127.0.0.5", "1500", 30), me));
        save(&path, &t.state.requests.book).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.pending, t.state.requests.book.pending);
        assert_eq!(back.last_id, 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            state_path(Path::new("/sys/fs/bpf/agentwall/v5")),
            PathBuf::from("/run/agentwall/state/sys_fs_bpf_agentwall_v5.requests.json")
        );
    }
}
