//! The control actor: one task owns the datapath (the loaded eBPF object) and the registry of
//! cgroups it wrote to the agent map; everything else (control socket, cgroup watcher, the
//! daemon) sends it typed commands, each with its own reply channel.
//!
//! Agents are keyed by cgroup id. A selector's fixed parent gets a watch entry, so a cgroup
//! that appears below it is judged by the kernel's pending fallback until it is registered
//! here (see docs/identity.md).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_common::{entry, entry_flags, mode, AgentEntry, MAX_AGENT_CHAIN, MAX_CGROUP_LEVEL};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    datapath::{Datapath, Enforcer, LoaderError, PrefixKeys},
    events::Notice,
    identity::{
        agent_name, cgroup,
        watch::{Change, Root},
        AgentMeta, Names,
    },
    policy::PolicySet,
};

pub mod apply;
#[cfg(test)]
mod delegation_tests;
pub mod dns;
#[cfg(test)]
mod dns_tests;
pub mod explain;
#[cfg(test)]
mod explain_tests;
pub mod grants;
pub mod policy_watch;
pub mod registry;
pub mod requests;
pub mod revoke;
pub mod runtime;
#[cfg(test)]
mod runtime_tests;
mod state_file;
mod tasks;
#[cfg(test)]
mod tests;

use registry::{Class, Entry};
pub use runtime::{
    Access, Approved, Caller, ControlError, FromEvent, GrantInfo, GrantRequest, RequestInfo,
    RequestState, Revoked, TaskEnded, TaskInfo, TaskStart,
};

/// Policy id given to a cgroup that two policies select: it has no rules, so the agent is denied
/// everything until the conflict is fixed (fail closed, never unenforced). Watch and exempt
/// entries carry it too (they have no rules of their own).
pub const CONFLICT_POLICY_ID: u32 = 0;

/// How often the controller signals liveness to the kernel's dead-man switches.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// A reply: the result, or the error as the API shows it.
pub type Reply<T> = oneshot::Sender<Result<T, String>>;

/// One operation on the controller, with its reply channel.
pub enum Command {
    /// Register the cgroup at this absolute path as an agent (its policy found by selector).
    Register {
        cgroup: PathBuf,
        reply: Reply<Registration>,
    },
    /// Re-read the policy directory; on any error the running policy stays.
    Reload {
        reply: Reply<Reloaded>,
    },
    /// Read and switch to the policy at `path` (a directory or one file; None: the configured
    /// directory, as `Reload`). On any error the running policy stays.
    ApplyPolicy {
        path: Option<PathBuf>,
        origin: policy_watch::PolicyOrigin,
        reply: Reply<Reloaded>,
    },
    /// What `agentwall status` shows.
    Status {
        reply: Reply<serde_json::Value>,
    },
    /// Runtime control (tasks, grants): typed errors the API maps to HTTP statuses.
    TaskStart {
        req: TaskStart,
        by: Caller,
        reply: RuntimeReply<TaskInfo>,
    },
    TaskEnd {
        agent: String,
        by: Caller,
        reply: RuntimeReply<TaskEnded>,
    },
    Grant {
        req: GrantRequest,
        by: Caller,
        reply: RuntimeReply<GrantInfo>,
    },
    Grants {
        reply: RuntimeReply<Vec<GrantInfo>>,
    },
    Revoke {
        id: u64,
        by: Caller,
        reply: RuntimeReply<Revoked>,
    },
    /// What the kernel would decide now for an agent and a destination, and why.
    Explain {
        req: explain::ExplainRequest,
        reply: RuntimeReply<explain::Explanation>,
    },
    /// Approvals (control/requests.rs): an agent's own request for access (granted at once or
    /// pending, as its policy says), the pending list, one request, a denied record turned
    /// into a request, and a person's decision.
    Access {
        req: GrantRequest,
        by: Caller,
        reply: RuntimeReply<Access>,
    },
    Requests {
        reply: RuntimeReply<Vec<RequestInfo>>,
    },
    Request {
        id: u64,
        by: Caller,
        reply: RuntimeReply<RequestInfo>,
    },
    RequestFromEvent {
        req: FromEvent,
        by: Caller,
        reply: RuntimeReply<RequestInfo>,
    },
    Approve {
        id: u64,
        ttl_secs: Option<u64>,
        by: Caller,
        reply: RuntimeReply<Approved>,
    },
    Deny {
        id: u64,
        reason: Option<String>,
        by: Caller,
        reply: RuntimeReply<RequestInfo>,
    },
    /// The DNS proxy (control/dns.rs): may this agent resolve this name; and an allowed
    /// answer's addresses, to write before the answer is released.
    DnsQuery {
        agent: u64,
        name: String,
        reply: oneshot::Sender<dns::NameVerdict>,
    },
    DnsAnswer {
        plan: dns::WritePlan,
        answers: Vec<dns::Answered>,
        reply: oneshot::Sender<dns::Written>,
    },
}

/// The reply channel of a runtime-control command.
pub type RuntimeReply<T> = oneshot::Sender<Result<T, ControlError>>;

/// A registered agent, as `exec` needs it.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    pub agent: String,
    pub cgroup: String,
    pub policy: String,
    /// `exec` keeps CAP_NET_RAW only for agents allowed raw or packet sockets.
    pub sockets: Vec<&'static str>,
    /// The capabilities `exec` keeps (none when the policy names none).
    pub capabilities: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    pub generation: u32,
}

/// An installed policy version.
pub(crate) struct Installed {
    pub(crate) id: u32,
    /// The prefixes written for this policy (their rule sets live only in the kernel).
    pub(crate) keys: PrefixKeys,
    pub(crate) mode: u32,
}

pub(crate) struct State<D: Datapath = Enforcer> {
    pub(crate) enforcer: D,
    /// The policy directory re-read on reload; None for a fixed set, which is not kept (the
    /// controller holds no copy of the rules once they are in the kernel).
    pub(crate) source: Option<PathBuf>,
    pub(crate) root: PathBuf,
    pub(crate) set: PolicySet,
    pub(crate) installed: BTreeMap<String, Installed>,
    /// Every entry this controller wrote to the agent map (agents, watches, exempt), by id.
    pub(crate) entries: HashMap<u64, Entry>,
    /// The same entries by cgroup path: the enclosing agents of a path, and the entries below
    /// one, without a scan of them all.
    pub(crate) by_path: BTreeMap<String, u64>,
    /// Watched parents (relative paths) and their pending mode.
    pub(crate) parents: BTreeMap<String, u32>,
    /// Cgroups that should have an entry but found the agent map full: they stay under their
    /// watch (the pending fallback) and are retried when room appears.
    pub(crate) unregistered: BTreeSet<String>,
    /// A full-map episode is under way (reported once, when it starts).
    pub(crate) map_full: bool,
    pub(crate) next_policy_id: u32,
    pub(crate) generation: u32,
    /// The digest of the running set (`policy_watch::digest`): a push of the same set is a no-op.
    pub(crate) policy_digest: Option<u64>,
    pub(crate) names: Arc<RwLock<Names>>,
    /// The kernel's lost count recorded as reported (LOST_REPORTED): its records are written.
    pub(crate) last_lost: u64,
    /// To the event reader: the kernel's cumulative lost count; back: what it has written.
    pub(crate) lost_tx: crate::events::LossReports,
    /// The controller's own reports into the audit stream.
    pub(crate) notices: mpsc::UnboundedSender<Notice>,
    /// The audit log's health, shown by `status`.
    pub(crate) audit: crate::sinks::Health,
    /// Levels of an adopted map's agents, kept in the mask until they are re-registered.
    pub(crate) adopted_levels: u32,
    /// The directories the cgroup watcher watches (the existing watched parents).
    pub(crate) watch_paths: watch::Sender<Vec<Root>>,
    /// Tasks and grants (control/tasks.rs).
    pub(crate) runtime: tasks::RuntimeState,
    /// Requests waiting for a person, and the recent denied decisions (control/requests.rs).
    pub(crate) requests: requests::Requests,
    /// The agent socket's path: every policy's Unix allowlist gets it unless the policy says
    /// `agent_socket: false` (set by the daemon before the first apply).
    pub(crate) agent_socket: Option<String>,
    /// Live grants one agent may hold (`Options::max_grants_per_agent`).
    pub(crate) max_grants_per_agent: usize,
    /// The DNS proxy's query buckets and resolution ids (control/dns.rs).
    pub(crate) dns: dns::DnsState,
    /// Map occupancy and policy versions for `--metrics` (set by the daemon).
    pub(crate) metrics: Option<Arc<crate::sinks::metrics::Metrics>>,
}

impl<D: Datapath> State<D> {
    /// A controller over `enforcer`, with nothing installed yet (see `apply`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        enforcer: D,
        root: PathBuf,
        source: Option<PathBuf>,
        names: Arc<RwLock<Names>>,
        adopted_levels: u32,
        lost_tx: crate::events::LossReports,
        notices: mpsc::UnboundedSender<Notice>,
        audit: crate::sinks::Health,
    ) -> Result<Self> {
        // An adopted map holds the previous controller's policy ids: new ones must not collide.
        let next_policy_id = enforcer
            .rule_policy_ids()
            .into_iter()
            .chain(enforcer.agent_entries().iter().map(|(_, e)| e.policy_id))
            .max()
            .map_or(CONFLICT_POLICY_ID + 1, |m| m + 1);
        let last_lost = enforcer.lost_reported()?;
        Ok(Self {
            enforcer,
            source,
            root,
            set: PolicySet::default(),
            installed: BTreeMap::new(),
            entries: HashMap::new(),
            by_path: BTreeMap::new(),
            parents: BTreeMap::new(),
            unregistered: BTreeSet::new(),
            map_full: false,
            next_policy_id,
            generation: 0,
            policy_digest: None,
            names,
            last_lost,
            lost_tx,
            notices,
            audit,
            adopted_levels,
            watch_paths: watch::channel(Vec::new()).0,
            runtime: Default::default(),
            requests: Default::default(),
            agent_socket: None,
            max_grants_per_agent: grants::DEFAULT_MAX_GRANTS_PER_AGENT,
            dns: dns::DnsState::new(),
            metrics: None,
        })
        .map(|mut s: Self| {
            s.restore_runtime();
            s.restore_requests();
            s
        })
    }

    /// The directories the cgroup watcher should watch, kept current by the actor.
    pub(crate) fn watched_paths(&self) -> watch::Receiver<Vec<Root>> {
        self.watch_paths.subscribe()
    }

    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut changes: mpsc::Receiver<Change>,
        mut shutdown: watch::Receiver<bool>,
        rescan: Duration,
    ) -> Result<()> {
        let mut scan = tokio::time::interval(rescan);
        let mut counters = tokio::time::interval(Duration::from_millis(200));
        // Grants and tasks past their deadline (the kernel already ignores them) are removed.
        let mut expiry = tokio::time::interval(Duration::from_millis(100));
        // Liveness from a task of its own when the datapath gives it a handle: a long command
        // in this loop then never silences the dead-man switches.
        let beat_task = self.enforcer.take_heartbeat().map(|mut beat| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
                loop {
                    tick.tick().await;
                    if let Err(e) = beat.beat() {
                        tracing::error!("heartbeat: {e}");
                    }
                }
            })
        });
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        let (prepared_tx, mut prepared) = mpsc::unbounded_channel();
        let mut pushes = policy_watch::Pending::default();
        loop {
            tokio::select! {
                Some(cmd) = commands.recv() => match cmd {
                    Command::Register { cgroup, reply } => {
                        let _ = reply.send(self.register_path(&cgroup).map_err(|e| format!("{e:#}")));
                    }
                    Command::Reload { reply } => self.push_policy(
                        &mut pushes, None, policy_watch::PolicyOrigin::Reload, reply, &prepared_tx),
                    Command::ApplyPolicy { path, origin, reply } => self.push_policy(
                        &mut pushes, path, origin, reply, &prepared_tx),
                    Command::Status { reply } => { let _ = reply.send(Ok(self.status())); }
                    Command::TaskStart { req, by, reply } => { let _ = reply.send(self.task_start(req, by)); }
                    Command::TaskEnd { agent, by, reply } => { let _ = reply.send(self.task_end(&agent, by)); }
                    Command::Grant { req, by, reply } => { let _ = reply.send(self.grant(req, by)); }
                    Command::Grants { reply } => { let _ = reply.send(Ok(self.grants())); }
                    Command::Revoke { id, by, reply } => { let _ = reply.send(self.revoke(id, by)); }
                    Command::Explain { req, reply } => { let _ = reply.send(self.explain(req)); }
                    Command::Access { req, by, reply } => { let _ = reply.send(self.access(req, by)); }
                    Command::Requests { reply } => { let _ = reply.send(Ok(self.requests())); }
                    Command::Request { id, by, reply } => { let _ = reply.send(self.request(id, &by)); }
                    Command::RequestFromEvent { req, by, reply } => {
                        let _ = reply.send(self.request_from_event(req, by));
                    }
                    Command::Approve { id, ttl_secs, by, reply } => {
                        let _ = reply.send(self.approve(id, ttl_secs, by));
                    }
                    Command::Deny { id, reason, by, reply } => { let _ = reply.send(self.deny(id, reason, by)); }
                    Command::DnsQuery { agent, name, reply } => { let _ = reply.send(self.judge_name(agent, &name)); }
                    Command::DnsAnswer { plan, answers, reply } => {
                        let _ = reply.send(self.write_answer(&plan, &answers));
                    }
                },
                Some(change) = changes.recv() => self.on_change(change),
                Some(result) = prepared.recv() => pushes.finish(&mut self, result, &prepared_tx),
                _ = scan.tick() => self.rescan(),
                _ = counters.tick() => {
                    self.report_lost();
                    self.update_metrics();
                }
                _ = expiry.tick() => {
                    self.expire();
                    self.expire_requests();
                    self.expire_resolved();
                }
                _ = heartbeat.tick(), if beat_task.is_none() => {
                    if let Err(e) = self.enforcer.heartbeat() {
                        tracing::error!("heartbeat: {e}");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        if let Some(t) = beat_task {
            t.abort();
        }
        // The final loss report is written before shutdown completes.
        self.report_lost();
        if !self.lost_tx.settled(Duration::from_secs(2)).await {
            tracing::warn!("the final lost-event record was not confirmed written");
        }
        // Only what is written: a total observed now would be written after this controller
        // stops recording, and counted again by the next.
        self.record_lost_reported();
        let pinned = self.enforcer.pinned();
        drop(self.enforcer);
        if pinned {
            tracing::info!(
                "programs stay attached and enforcing (pinned); `agentwall uninstall` removes them"
            );
        } else {
            tracing::info!("programs detached");
        }
        Ok(())
    }

    /// Passes the kernel's lost total to the reader; a loss counts as reported (pinned
    /// LOST_REPORTED) only once its record is written.
    fn report_lost(&mut self) {
        match self.enforcer.counters() {
            Ok(c) => self.lost_tx.observe(c.lost),
            Err(e) => tracing::warn!("reading the lost count: {e}"),
        }
        self.record_lost_reported();
    }

    /// Occupancy from this controller's own bookkeeping (what it wrote; no map walk) and the
    /// policy versions, for `--metrics`.
    fn update_metrics(&self) {
        use agent_common::{MAX_GRANT_PREFIXES, MAX_PREFIXES_V4, MAX_PREFIXES_V6, MAX_UNIX_PATHS};
        let Some(m) = &self.metrics else { return };
        m.set_map("agents", self.entries.len(), self.enforcer.agent_capacity());
        let count = |f: fn(&PrefixKeys) -> usize| self.installed.values().map(|i| f(&i.keys)).sum();
        m.set_map("rules_v4", count(|k| k.v4.len()), MAX_PREFIXES_V4);
        m.set_map("rules_v6", count(|k| k.v6.len()), MAX_PREFIXES_V6);
        m.set_map("unix_paths", count(|k| k.unix.len()), MAX_UNIX_PATHS);
        let v4 = self
            .runtime
            .written
            .keys()
            .filter(|(_, p)| matches!(p, crate::datapath::GrantPrefix::V4(..)))
            .count();
        m.set_map("grants_v4", v4, MAX_GRANT_PREFIXES);
        m.set_map(
            "grants_v6",
            self.runtime.written.len() - v4,
            MAX_GRANT_PREFIXES,
        );
        m.set_policies(self.generation, self.installed.keys().map(String::as_str));
    }

    fn record_lost_reported(&mut self) {
        let written = self.lost_tx.written();
        if written > self.last_lost {
            match self.enforcer.set_lost_reported(written) {
                Ok(()) => self.last_lost = written,
                Err(e) => tracing::warn!("recording the reported lost count: {e}"),
            }
        }
    }

    /// After adopting pinned maps: removes entries the current policy no longer wants and
    /// prefixes of policy versions no longer installed.
    pub(crate) fn drop_leftovers(&mut self) -> Result<()> {
        for (id, _) in self.enforcer.agent_entries() {
            if !self.entries.contains_key(&id) {
                self.enforcer.remove_agent(id)?;
            }
        }
        self.adopted_levels = 0;
        self.update_levels()?;
        let keep = self.installed.values().map(|i| i.id).collect();
        let n = self.enforcer.remove_rules_except(&keep)?;
        tracing::info!(
            stale_prefixes = n,
            "reconciled the adopted maps with the current policy"
        );
        // Entries of the old map that did not fit at first may fit now.
        self.retry_unregistered();
        Ok(())
    }

    fn register_path(&mut self, path: &Path) -> Result<Registration> {
        let rel = cgroup::relative(&self.root, path)?;
        // `exec` may have just created the agent's parent: watch it before the agent runs.
        if self
            .parents
            .keys()
            .any(|p| rel.starts_with(&format!("{p}/")) && !self.is_watching(p))
        {
            self.install_watches();
        }
        let id = cgroup::cgroup_id(path)?;
        let class = registry::classify(&self.set, &self.parents, &rel);
        let Class::Agent(matched) = &class else {
            bail!("no policy selects cgroup {rel:?}");
        };
        let name = match matched.as_slice() {
            [p] => p.name.clone(),
            _ => "conflict:deny-all".to_string(),
        };
        let level = cgroup::level(&rel);
        if level == 0 || level > MAX_CGROUP_LEVEL {
            bail!("cgroup {rel:?} is at level {level}; agents must be at levels 1..={MAX_CGROUP_LEVEL}");
        }
        self.ensure(id, &rel)?;
        self.update_levels()?;
        let policy = self.set.get(&name);
        Ok(Registration {
            agent: agent_name(&rel),
            cgroup: rel,
            sockets: policy.map(|p| p.socket_kind_names()).unwrap_or_default(),
            capabilities: policy.map(|p| p.kept_capabilities()).unwrap_or_default(),
            policy: name,
        })
    }

    /// The agents whose cgroups enclose `rel`, nearest first, as an entry's `enclosing` list,
    /// and its flags (`CHAIN_TOO_DEEP` when more enclose it than the list holds).
    fn enclosing(&self, rel: &str) -> ([u64; MAX_AGENT_CHAIN - 1], u32) {
        let mut list = [0u64; MAX_AGENT_CHAIN - 1];
        let mut n = 0;
        let mut anc = rel;
        while let Some((parent, _)) = anc.rsplit_once('/') {
            anc = parent;
            let Some(&id) = self.by_path.get(anc) else {
                continue;
            };
            if self
                .entries
                .get(&id)
                .is_some_and(|e| e.entry.kind == entry::AGENT)
            {
                if n == list.len() {
                    return (list, entry_flags::CHAIN_TOO_DEEP);
                }
                list[n] = id;
                n += 1;
            }
        }
        (list, 0)
    }

    /// Rewrites the entries below `rel` (an agent was added or removed there: their
    /// `enclosing` lists change).
    fn refresh_below(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let mut below: Vec<(u64, String)> = self
            .by_path
            .range(prefix.clone()..)
            .take_while(|(r, _)| r.starts_with(&prefix))
            .map(|(r, id)| (*id, r.clone()))
            .collect();
        // Outermost first, so each sees its own enclosing agents already rewritten.
        below.sort_by_key(|(_, r)| r.len());
        for (id, r) in below {
            if let Err(e) = self.ensure(id, &r) {
                tracing::warn!(cgroup = %r, "rewriting an entry below a changed agent: {e:#}");
            }
        }
    }

    /// The entry `class` calls for at cgroup `id`.
    fn entry_for(&self, class: &Class, rel: &str) -> Option<AgentEntry> {
        let (enclosing, flags) = self.enclosing(rel);
        let base = AgentEntry {
            policy_id: CONFLICT_POLICY_ID,
            mode: mode::ENFORCE,
            policy_version: self.generation,
            sockets: 0,
            deadman_secs: 0,
            deadman_mode: 0,
            kind: entry::AGENT,
            task_slot: 0,
            task_deadline_ns: 0,
            rate_interval_ns: 0,
            rate_burst_ns: 0,
            enclosing,
            flags,
            _reserved: 0,
        };
        match class {
            Class::None => None,
            Class::Watch(m) => Some(AgentEntry {
                mode: *m,
                kind: entry::WATCH,
                ..base
            }),
            Class::Exempt => Some(AgentEntry {
                kind: entry::EXEMPT,
                ..base
            }),
            Class::Agent(matched) => Some(match matched.as_slice() {
                [p] => {
                    let inst = self.installed.get(&p.name)?;
                    let (deadman_secs, deadman_mode) = p
                        .deadman
                        .map_or((0, 0), |d| (d.after_secs, d.fallback.as_kernel()));
                    let (rate_interval_ns, rate_burst_ns) =
                        p.rate_limit.map_or((0, 0), |r| r.kernel());
                    AgentEntry {
                        policy_id: inst.id,
                        mode: inst.mode,
                        sockets: p.sockets,
                        deadman_secs,
                        deadman_mode,
                        rate_interval_ns,
                        rate_burst_ns,
                        ..base
                    }
                }
                many => {
                    let list: Vec<_> = many.iter().map(|p| p.name.as_str()).collect();
                    tracing::error!(cgroup = rel, policies = ?list,
                        "several policies select this cgroup: it is denied everything until fixed");
                    base
                }
            }),
        }
    }

    /// Gives cgroup `id` at `rel` the entry its class calls for (or removes it). A full map
    /// leaves the cgroup under its watch and is reported.
    fn ensure(&mut self, id: u64, rel: &str) -> Result<()> {
        let class = registry::classify(&self.set, &self.parents, rel);
        let level = cgroup::level(rel);
        let Some(wanted) = self
            .entry_for(&class, rel)
            .filter(|_| (1..=MAX_CGROUP_LEVEL).contains(&level))
            .map(|w| self.with_task(id, w))
        else {
            if self.entries.contains_key(&id) {
                self.forget(id);
            }
            self.unregistered.remove(rel);
            return Ok(());
        };
        if self.entries.get(&id).is_some_and(|e| e.entry == wanted) {
            return Ok(());
        }
        if let Err(e) = self.enforcer.set_agent(id, wanted) {
            if matches!(e, LoaderError::Full(_)) {
                self.map_is_full(rel);
                bail!(
                    "the agent map is full ({} entries): cgroup {rel:?} stays under the pending \
                     fallback of its watched parent until an entry is free",
                    self.enforcer.agent_capacity()
                );
            }
            return Err(e).with_context(|| format!("writing the entry of cgroup {rel:?}"));
        }
        self.unregistered.remove(rel);
        if self.map_full && self.unregistered.is_empty() {
            self.map_full = false;
            tracing::info!("the agent map has room again: every selected cgroup is registered");
        }
        let new = !self.entries.contains_key(&id);
        let mut names = self.names.write().expect("names");
        match &class {
            Class::Agent(_) => {
                let meta = AgentMeta {
                    name: agent_name(rel),
                    cgroup: rel.to_string(),
                    policy: match class {
                        Class::Agent(ref m) if m.len() == 1 => m[0].name.clone(),
                        _ => "conflict:deny-all".into(),
                    },
                };
                if new {
                    tracing::info!(agent = %meta.name, cgroup = rel, policy = %meta.policy, "agent registered");
                }
                names.agents.insert(id, meta);
            }
            _ => {
                names.agents.remove(&id);
                if new {
                    tracing::debug!(cgroup = rel, kind = wanted.kind, "cgroup entry written");
                }
            }
        }
        drop(names);
        let was_agent = self
            .entries
            .get(&id)
            .is_some_and(|e| e.entry.kind == entry::AGENT);
        self.entries.insert(
            id,
            Entry {
                rel: rel.to_string(),
                level,
                entry: wanted,
            },
        );
        self.by_path.insert(rel.to_string(), id);
        if was_agent != (wanted.kind == entry::AGENT) {
            self.refresh_below(rel);
        }
        Ok(())
    }

    /// Starts (or continues) a full-map episode for `rel`: reported once per episode.
    fn map_is_full(&mut self, rel: &str) {
        self.unregistered.insert(rel.to_string());
        if self.map_full {
            return;
        }
        self.map_full = true;
        let capacity = self.enforcer.agent_capacity();
        let used = self.enforcer.agent_entries().len();
        let watch = self.covering_watch(rel);
        tracing::error!(
            cgroup = rel,
            capacity,
            used,
            "AGENT MAP FULL: new cgroups cannot be registered; they are judged by their watched \
             parent's pending fallback until entries are freed"
        );
        let _ = self.notices.send(Notice::new(
            "agent-map-full",
            json!({
                "cgroup": rel,
                "capacity": capacity,
                "used": used,
                "watched_parent": watch.as_ref().map(|(p, _)| p.clone()),
                "fallback": watch.map(|(_, m)| registry::pending_name(m)),
            }),
        ));
    }

    /// The watched parent above `rel` and its pending mode.
    fn covering_watch(&self, rel: &str) -> Option<(String, u32)> {
        self.parents
            .iter()
            .filter(|(p, _)| {
                rel.strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            })
            .max_by_key(|(p, _)| p.len())
            .map(|(p, m)| (p.clone(), *m))
    }

    /// Removes the entry of cgroup `id`.
    fn forget(&mut self, id: u64) {
        if let Err(e) = self.enforcer.remove_agent(id) {
            tracing::warn!(cgroup_id = id, "removing an agent map entry: {e}");
        }
        let removed = self.entries.remove(&id);
        if let Some(e) = &removed {
            // Only if the path is still this cgroup's (a recreated one has another id).
            if self.by_path.get(&e.rel) == Some(&id) {
                self.by_path.remove(&e.rel);
            }
        }
        self.names.write().expect("names").agents.remove(&id);
        if let Some(e) = removed {
            if e.entry.kind == entry::AGENT {
                tracing::info!(cgroup = %e.rel, cgroup_id = id, "agent unregistered");
                self.refresh_below(&e.rel);
            }
        }
    }

    /// Tries again the cgroups that found the map full.
    fn retry_unregistered(&mut self) {
        for rel in std::mem::take(&mut self.unregistered) {
            let path = self.root.join(&rel);
            match cgroup::cgroup_id(&path) {
                Ok(id) => {
                    let _ = self.ensure(id, &rel);
                }
                Err(_) => continue,
            }
        }
    }

    fn update_levels(&mut self) -> Result<()> {
        let mask = self
            .entries
            .values()
            .fold(self.adopted_levels, |m, e| m | (1 << e.level));
        self.enforcer.set_agent_levels(mask)?;
        Ok(())
    }

    /// Writes the watch entries of the current set's parents (before any agent is re-pointed,
    /// so a cgroup the new selectors match is covered from now on).
    pub(crate) fn install_watches(&mut self) {
        self.parents = registry::watched_parents(&self.set);
        let parents: Vec<String> = self.parents.keys().cloned().collect();
        for rel in parents {
            if let Ok(id) = cgroup::cgroup_id(&self.root.join(&rel)) {
                if let Err(e) = self.ensure(id, &rel) {
                    tracing::error!(cgroup = rel, "cannot watch: {e:#}");
                }
            }
        }
        if let Err(e) = self.update_levels() {
            tracing::error!("writing the agent levels: {e}");
        }
        self.publish_watch_paths();
    }

    /// Whether the watched parent `rel` has its entry in the kernel.
    fn is_watching(&self, rel: &str) -> bool {
        self.entries.values().any(|e| e.rel == rel)
    }

    /// The directories the watcher watches: each watched parent's subtree, and for a parent that
    /// does not exist yet its nearest existing ancestor's entries (so the parent is watched,
    /// and its cgroups judged, from the moment it is created, not at the next scan).
    fn publish_watch_paths(&self) {
        let mut paths: Vec<Root> = Vec::new();
        for p in self.parents.keys() {
            let path = self.root.join(p);
            let root = if path.is_dir() {
                Root { path, deep: true }
            } else {
                let Some(existing) = path.ancestors().skip(1).find(|a| a.is_dir()) else {
                    continue;
                };
                Root {
                    path: existing.to_path_buf(),
                    deep: false,
                }
            };
            if !paths.contains(&root) {
                paths.push(root);
            }
        }
        paths.sort();
        self.watch_paths.send_if_modified(|old| {
            let changed = *old != paths;
            if changed {
                *old = paths;
            }
            changed
        });
    }

    /// The backstop: re-judges every cgroup of the tree, and removes the entries of cgroups
    /// that are gone (a cgroup recreated at the same path has a new id: the old entry goes).
    pub(crate) fn rescan(&mut self) {
        let mut seen = HashSet::new();
        if !self.set.policies.is_empty() {
            for rel in cgroup::walk(&self.root) {
                let Ok(id) = cgroup::cgroup_id(&self.root.join(&rel)) else {
                    continue;
                };
                if let Err(e) = self.ensure(id, &rel) {
                    tracing::debug!(cgroup = rel, "cannot register: {e:#}");
                }
                if self.entries.contains_key(&id) {
                    seen.insert(id);
                }
            }
        }
        let gone: Vec<u64> = self
            .entries
            .keys()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.forget(id);
        }
        // Unregistered cgroups that are gone are no longer waiting.
        let root = self.root.clone();
        self.unregistered.retain(|rel| root.join(rel).is_dir());
        if self.map_full && self.unregistered.is_empty() {
            self.map_full = false;
        }
        if let Err(e) = self.update_levels() {
            tracing::error!("writing the agent levels: {e}");
        }
        self.publish_watch_paths();
    }

    /// A cgroup appeared or went, as the watcher saw it.
    pub(crate) fn on_change(&mut self, change: Change) {
        match change {
            Change::Created(path) => {
                let Ok(rel) = cgroup::relative(&self.root, &path) else {
                    return;
                };
                // Gone again already: the removal event follows.
                let Ok(id) = cgroup::cgroup_id(&path) else {
                    return;
                };
                if let Err(e) = self.ensure(id, &rel) {
                    tracing::warn!(cgroup = rel, "cannot register: {e:#}");
                }
                if let Err(e) = self.update_levels() {
                    tracing::error!("writing the agent levels: {e}");
                }
                // A watched parent (or an ancestor of one) that appeared: watch it from now on.
                self.publish_watch_paths();
            }
            Change::Removed(path) => {
                let Ok(rel) = cgroup::relative(&self.root, &path) else {
                    return;
                };
                // A cgroup recreated at once has a new id: keep only the live one's entry.
                let live = cgroup::cgroup_id(&path).ok();
                let gone: Vec<u64> = self
                    .entries
                    .iter()
                    .filter(|(id, e)| e.rel == rel && Some(**id) != live)
                    .map(|(id, _)| *id)
                    .collect();
                for id in &gone {
                    self.forget(*id);
                }
                if live.is_none() {
                    self.unregistered.remove(&rel);
                }
                if !gone.is_empty() {
                    if let Err(e) = self.update_levels() {
                        tracing::error!("writing the agent levels: {e}");
                    }
                    self.retry_unregistered();
                }
            }
            Change::Overflow => self.rescan(),
        }
    }

    /// What `agentwall status` shows, the kernel's side read back from the kernel.
    pub(crate) fn status(&self) -> serde_json::Value {
        let c = self.enforcer.counters().unwrap_or_default();
        let names = self.names.read().expect("names");
        let agents: Vec<_> = names
            .agents
            .values()
            .map(|a| json!({ "agent": a.name, "cgroup": a.cgroup, "policy": a.policy }))
            .collect();
        drop(names);
        let watches: Vec<_> = self
            .entries
            .values()
            .filter(|e| e.entry.kind == entry::WATCH)
            .map(|e| json!({ "cgroup": e.rel, "pending": registry::pending_name(e.entry.mode) }))
            .collect();
        let in_kernel = self.enforcer.agent_entries();
        let kernel_ids: HashSet<u64> = in_kernel.iter().map(|(id, _)| *id).collect();
        let unknown: Vec<u64> = in_kernel
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !self.entries.contains_key(id))
            .collect();
        let mut missing: Vec<&str> = self
            .entries
            .iter()
            .filter(|(id, _)| !kernel_ids.contains(id))
            .map(|(_, e)| e.rel.as_str())
            .collect();
        missing.sort_unstable();
        let k = self.enforcer.kernel_state();
        let mut problems = k.problems();
        if !missing.is_empty() {
            problems.push(format!(
                "{} registered cgroups have no entry in the kernel's agent map",
                missing.len()
            ));
        }
        if !unknown.is_empty() {
            problems.push(format!(
                "the kernel's agent map has {} entries this controller did not write",
                unknown.len()
            ));
        }
        if !self.unregistered.is_empty() {
            problems.push(format!(
                "{} selected cgroups could not be registered (agent map full)",
                self.unregistered.len()
            ));
        }
        json!({
            "generation": self.generation,
            "policies": self.installed.keys().collect::<Vec<_>>(),
            "agents": agents,
            "watches": watches,
            "agents_unregistered": self.unregistered,
            "agent_map": {
                "used": in_kernel.len(),
                "capacity": self.enforcer.agent_capacity(),
            },
            "counters": c,
            "audit_log": self.audit.snapshot(),
            "kernel": {
                "ok": problems.is_empty(),
                "problems": problems,
                "pinned": k.pinned,
                "links": k.links,
                "agent_entries": in_kernel.len(),
                "registry_entries": self.entries.len(),
                "unknown_entries": unknown,
                "missing_entries": missing,
            },
        })
    }
}
