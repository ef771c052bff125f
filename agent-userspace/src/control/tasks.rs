//! The actor's runtime-control operations: tasks stamped into the agent's kernel entry, grants
//! written to the grant tries, revocation (with the agent's live sockets to the destination
//! destroyed), expiry, and the state file that outlives the controller. Each step is an audit
//! record (`events::Notice`) naming who did it.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use agent_common::{entry, AgentEntry, GrantSet};
use serde_json::json;

use super::{
    grants::{self, LiveGrant, Runtime, Task},
    revoke,
    runtime::{
        Caller, ControlError, GrantInfo, GrantRequest, Revoked, TaskEnded, TaskInfo, TaskStart,
    },
    State,
};
use crate::{
    datapath::{boottime_ns, Datapath, GrantPrefix},
    events::Notice,
    identity::TaskMeta,
};

/// Longest task or grant ttl accepted (30 days).
const MAX_TTL_SECS: u64 = 30 * 86_400;
const MAX_ID_LEN: usize = 128;
pub(super) const MAX_TEXT_LEN: usize = 1024;

/// What the actor keeps for runtime control.
#[derive(Default)]
pub(crate) struct RuntimeState {
    pub(crate) rt: Runtime,
    /// Where `rt` is persisted (pinned controllers only).
    file: Option<PathBuf>,
    /// What this controller wrote to the grant tries.
    pub(crate) written: BTreeMap<(u64, GrantPrefix), GrantSet>,
}

/// Who ended something by itself.
fn controller() -> serde_json::Value {
    json!({ "kind": "controller" })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

impl<D: Datapath> State<D> {
    /// Reads the state file of a pinned controller and makes the kernel match it: tasks are
    /// stamped as agents register, grant tries rewritten, entries no live grant wants removed.
    pub(crate) fn restore_runtime(&mut self) {
        let file = self.enforcer.pin_dir().map(|d| grants::state_path(&d));
        let mut rt = match &file {
            Some(f) => grants::load(f).unwrap_or_else(|e| {
                tracing::error!("runtime state not restored, starting empty: {e}");
                Runtime::default()
            }),
            None => Runtime::default(),
        };
        // A grant the file names but the kernel no longer holds was revoked while the file
        // could not be rewritten (or the maps are new): it stays gone, fail closed.
        for g in rt.keep_only_in_kernel(&self.enforcer.grant_entries()) {
            tracing::warn!(grant = g.id, agent = %g.agent,
                "the state file names a grant the kernel does not hold: dropped, not restored");
            self.notice(
                "grant-dropped",
                json!({ "grant": g.id, "agent": g.agent, "to": g.to,
                        "cause": "not in the kernel at restart" }),
            );
        }
        // Addresses the last controller's DNS proxy resolved stay allowed until their deadlines.
        let adopted = rt.adopt_resolved(&self.enforcer.grant_entries(), boottime_ns());
        if adopted > 0 {
            tracing::info!(
                addresses = adopted,
                "adopted the resolved addresses in the kernel"
            );
        }
        // New resolution ids start past the adopted ones: a reused id would name another host.
        let last_id = rt
            .resolved
            .values()
            .flat_map(|m| m.values().flatten())
            .map(|i| i.id & !agent_common::RESOLVED_ID_BIT)
            .max()
            .unwrap_or(0);
        self.dns.continue_after(last_id);
        {
            let mut names = self.names.write().expect("names");
            for (slot, (id, intent)) in &rt.ended {
                names.tasks.insert(
                    *slot,
                    TaskMeta {
                        id: id.clone(),
                        intent: intent.clone(),
                    },
                );
            }
            for t in rt.tasks.values() {
                names.tasks.insert(
                    t.slot,
                    TaskMeta {
                        id: t.id.clone(),
                        intent: t.intent.clone(),
                    },
                );
            }
        }
        self.runtime = RuntimeState {
            rt,
            file,
            written: BTreeMap::new(),
        };
        // The adopted tries are whatever the last controller wrote: keep only what the state
        // says, then write it all.
        let wanted: BTreeMap<(u64, GrantPrefix), GrantSet> = self
            .runtime
            .rt
            .granted_agents()
            .into_iter()
            .flat_map(|a| {
                self.runtime
                    .rt
                    .trie_for(a, None)
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |(p, s)| ((a, p), s))
            })
            .collect();
        for (agent, prefix, set) in self.enforcer.grant_entries() {
            if wanted.get(&(agent, prefix)) != Some(&set) {
                if let Err(e) = self.enforcer.remove_grants(agent, prefix) {
                    tracing::error!("removing a stale grant entry: {e}");
                }
            }
        }
        for ((agent, prefix), set) in wanted {
            match self.enforcer.set_grants(agent, prefix, &set) {
                Ok(()) => {
                    self.runtime.written.insert((agent, prefix), set);
                }
                Err(e) => tracing::error!("restoring a grant entry: {e}"),
            }
        }
        if !self.runtime.rt.grants.is_empty() || !self.runtime.rt.tasks.is_empty() {
            tracing::info!(
                tasks = self.runtime.rt.tasks.len(),
                grants = self.runtime.rt.grants.len(),
                "runtime state restored"
            );
        }
    }

    /// `wanted` with the agent's live task stamped in (kept across re-registration and reload).
    pub(crate) fn with_task(&self, id: u64, mut wanted: AgentEntry) -> AgentEntry {
        if wanted.kind == entry::AGENT {
            if let Some(t) = self.runtime.rt.tasks.get(&id) {
                wanted.task_slot = t.slot;
                wanted.task_deadline_ns = t.deadline_ns;
            }
        }
        wanted
    }

    fn persist(&self) {
        if let Some(f) = &self.runtime.file {
            if let Err(e) = grants::save(f, &self.runtime.rt) {
                tracing::error!("saving the runtime state: {e}");
            }
        }
    }

    fn notice(&self, kind: &'static str, detail: serde_json::Value) {
        let _ = self.notices.send(Notice::new(kind, detail));
    }

    /// The registered agent `name` names: its name or its cgroup path.
    pub(crate) fn resolve(&self, name: &str) -> Result<(u64, String, String), ControlError> {
        if name.is_empty() {
            return Err(ControlError::invalid("agent", "empty"));
        }
        let path = name.trim_matches('/');
        let names = self.names.read().expect("names");
        let found: Vec<_> = names
            .agents
            .iter()
            .filter(|(id, a)| {
                (a.name == name || a.cgroup == path)
                    && self
                        .entries
                        .get(id)
                        .is_some_and(|e| e.entry.kind == entry::AGENT)
            })
            .map(|(id, a)| (*id, a.name.clone(), a.policy.clone()))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(ControlError::NotFound(format!(
                "no registered agent {name:?}"
            ))),
            _ => Err(ControlError::invalid(
                "agent",
                format!(
                    "{name:?} names {} agents: give its cgroup path",
                    found.len()
                ),
            )),
        }
    }

    /// Writes the agent's kernel entry with its current task (or none).
    fn stamp(&mut self, agent: u64) -> Result<(), ControlError> {
        let Some(e) = self.entries.get(&agent) else {
            return Ok(());
        };
        let mut wanted = e.entry;
        wanted.task_slot = 0;
        wanted.task_deadline_ns = 0;
        let wanted = self.with_task(agent, wanted);
        self.enforcer.set_agent(agent, wanted).map_err(internal)?;
        if let Some(e) = self.entries.get_mut(&agent) {
            e.entry = wanted;
        }
        Ok(())
    }

    /// Makes the grant-trie entries that `g` touches (its prefix and the narrower ones of its
    /// agent inside it) what the live grants call for, after `g` was added or removed: one
    /// grant's change rewrites only those, never the agent's whole trie.
    fn sync_grant(&mut self, g: &LiveGrant) -> Result<(), ControlError> {
        let agent = g.agent_id;
        for (prefix, set) in self.runtime.rt.touched_by(g, None)? {
            let key = (agent, prefix);
            match set {
                Some(set) if self.runtime.written.get(&key) != Some(&set) => {
                    self.enforcer
                        .set_grants(agent, prefix, &set)
                        .map_err(internal)?;
                    self.runtime.written.insert(key, set);
                }
                Some(_) => {}
                None if self.runtime.written.contains_key(&key) => {
                    self.enforcer
                        .remove_grants(agent, prefix)
                        .map_err(internal)?;
                    self.runtime.written.remove(&key);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Destroys the agent's live sockets that `gone` allowed.
    fn destroy_sockets(&self, agent: u64, gone: &[LiveGrant]) -> u64 {
        let Some(e) = self.entries.get(&agent) else {
            return 0;
        };
        let targets: Vec<&dyn revoke::Target> =
            gone.iter().map(|g| g as &dyn revoke::Target).collect();
        if targets.is_empty() {
            return 0;
        }
        match revoke::destroy(&self.root.join(&e.rel), &targets) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(agent, "destroying the agent's sockets: {e}");
                0
            }
        }
    }

    /// Removes grants from the tries at once, then ends the connections they allowed.
    fn take_grants(&mut self, ids: &[u64]) -> (Vec<LiveGrant>, u64) {
        let gone: Vec<LiveGrant> = ids
            .iter()
            .filter_map(|id| self.runtime.rt.grants.remove(id))
            .collect();
        for g in &gone {
            if let Err(e) = self.sync_grant(g) {
                tracing::error!(
                    agent = g.agent_id,
                    grant = g.id,
                    "rewriting the grant tries: {e}"
                );
            }
        }
        let mut agents: Vec<u64> = gone.iter().map(|g| g.agent_id).collect();
        agents.sort_unstable();
        agents.dedup();
        let mut destroyed = 0;
        for a in agents {
            let of_agent: Vec<LiveGrant> =
                gone.iter().filter(|g| g.agent_id == a).cloned().collect();
            destroyed += self.destroy_sockets(a, &of_agent);
        }
        (gone, destroyed)
    }

    pub(crate) fn task_start(
        &mut self,
        req: TaskStart,
        by: Caller,
    ) -> Result<TaskInfo, ControlError> {
        let (agent, name, _) = self.resolve(&req.agent)?;
        if let Caller::Agent { cgroup_id, .. } = &by {
            if *cgroup_id != agent {
                return Err(ControlError::Refused(
                    "an agent sets only its own task".into(),
                ));
            }
        }
        check_text("id", &req.id, MAX_ID_LEN)?;
        check_text("intent", &req.intent, MAX_TEXT_LEN)?;
        let ttl = match req.ttl_secs {
            Some(s) if s == 0 || s > MAX_TTL_SECS => {
                return Err(ControlError::invalid(
                    "ttl_secs",
                    format!("{s} out of range: 1 to {MAX_TTL_SECS}"),
                ))
            }
            t => t,
        };
        // A new task replaces the current one, which ends (and its grants with it).
        if self.runtime.rt.tasks.contains_key(&agent) {
            self.end_task(agent, by.clone(), "replaced")?;
        }
        let now = SystemTime::now();
        let slot = self.runtime.rt.next_slot();
        let task = Task {
            agent_id: agent,
            agent: name,
            id: req.id,
            intent: req.intent,
            started: rfc3339(now),
            expires: ttl.map(|s| rfc3339(now + Duration::from_secs(s))),
            deadline_ns: ttl.map_or(0, |s| boottime_ns() + s * 1_000_000_000),
            slot,
            by: by.clone(),
        };
        self.names.write().expect("names").tasks.insert(
            slot,
            TaskMeta {
                id: task.id.clone(),
                intent: task.intent.clone(),
            },
        );
        self.runtime.rt.tasks.insert(agent, task.clone());
        if let Err(e) = self.stamp(agent) {
            self.runtime.rt.tasks.remove(&agent);
            return Err(e);
        }
        self.persist();
        self.notice(
            "task-started",
            json!({ "agent": task.agent, "task": task.id, "intent": task.intent, "slot": slot,
                    "expires": task.expires, "by": by }),
        );
        Ok(task.info())
    }

    pub(crate) fn task_end(&mut self, agent: &str, by: Caller) -> Result<TaskEnded, ControlError> {
        let (id, _, _) = self.resolve(agent)?;
        if let Caller::Agent { cgroup_id, .. } = &by {
            if *cgroup_id != id {
                return Err(ControlError::Refused(
                    "an agent ends only its own task".into(),
                ));
            }
        }
        self.end_task(id, by, "ended")
    }

    /// Ends the task of `agent`: the kernel stops stamping it, its grants are revoked.
    fn end_task(&mut self, agent: u64, by: Caller, how: &str) -> Result<TaskEnded, ControlError> {
        let by = serde_json::to_value(&by).unwrap_or_default();
        self.finish_task(agent, by, how)
    }

    fn finish_task(
        &mut self,
        agent: u64,
        by: serde_json::Value,
        how: &str,
    ) -> Result<TaskEnded, ControlError> {
        let Some(task) = self.runtime.rt.tasks.remove(&agent) else {
            return Err(ControlError::NotFound("the agent has no task".into()));
        };
        if let Err(e) = self.stamp(agent) {
            tracing::error!(agent, "clearing the task stamp: {e}");
        }
        self.runtime.rt.remember_ended(&task);
        let ids: Vec<u64> = self
            .runtime
            .rt
            .grants
            .values()
            .filter(|g| g.agent_id == agent && g.task.as_deref() == Some(task.id.as_str()))
            .map(|g| g.id)
            .collect();
        let (gone, destroyed) = self.take_grants(&ids);
        self.persist();
        for g in &gone {
            self.notice(
                "revoked",
                json!({ "grant": g.id, "agent": g.agent, "to": g.to, "cause": "task-ended",
                        "task": task.id, "by": by }),
            );
        }
        self.notice(
            "task-ended",
            json!({ "agent": task.agent, "task": task.id, "intent": task.intent, "how": how,
                    "grants_revoked": ids, "sockets_destroyed": destroyed, "by": by }),
        );
        Ok(TaskEnded {
            agent: task.agent,
            id: task.id,
            grants_revoked: ids,
            sockets_destroyed: destroyed,
        })
    }

    pub(crate) fn grant(
        &mut self,
        req: GrantRequest,
        by: Caller,
    ) -> Result<GrantInfo, ControlError> {
        let (agent, name, policy) = self.resolve(&req.agent)?;
        // An agent asks for itself only; its request is granted at once when its policy says
        // `approve: auto` (and, like any grant, lies inside `grantable`). Under `approve:
        // manual` its request waits for a person: `access` (control/requests.rs) queues it.
        if let Caller::Agent { cgroup_id, .. } = &by {
            if *cgroup_id != agent {
                return Err(ControlError::Refused(
                    "an agent asks for access for itself only".into(),
                ));
            }
            if !self.approves_at_once(&policy) {
                return Err(ControlError::Refused(format!(
                    "agent {name:?}'s policy approves its own requests by a person \
                     (`approve: manual`): its request becomes a pending request (POST \
                     /v1/access on the agent socket), never a grant at once"
                )));
            }
        }
        let g = self.check_grant(&req, &by)?;
        self.runtime.rt.next_grant_id();
        self.runtime.rt.grants.insert(g.id, g.clone());
        if let Err(e) = self.sync_grant(&g) {
            self.runtime.rt.grants.remove(&g.id);
            let _ = self.sync_grant(&g);
            return Err(e);
        }
        self.persist();
        self.notice(
            "granted",
            json!({ "grant": g.id, "agent": g.agent, "to": g.to, "ports": grants::ports_text(&g.ports),
                    "protocol": crate::policy::protocols_name(g.protocols), "expires": g.expires,
                    "task": g.task, "reason": g.reason, "by": by }),
        );
        Ok(g.info())
    }

    /// Whether the agent policy `policy` grants an agent's own requests at once (`approve: auto`).
    pub(crate) fn approves_at_once(&self, policy: &str) -> bool {
        self.set
            .get(policy)
            .is_some_and(|p| p.grants.approve == crate::policy::Approve::Auto)
    }

    /// Everything `grant` checks (agent, fields, task, the policy's scope, room in the tries),
    /// nothing written: the grant it would make now.
    pub(crate) fn check_grant(
        &self,
        req: &GrantRequest,
        by: &Caller,
    ) -> Result<LiveGrant, ControlError> {
        let (agent, name, policy) = self.resolve(&req.agent)?;
        let net = crate::policy::parse_cidr(req.to.trim())
            .map(grants::normalize)
            .map_err(|e| ControlError::invalid("to", e))?;
        let ports = match req.ports.as_deref() {
            None => vec![(0, u16::MAX)],
            Some(p) => {
                crate::policy::parse_ports(p).map_err(|e| ControlError::invalid("ports", e))?
            }
        };
        let protocols = crate::policy::parse_protocol(req.protocol.as_deref().unwrap_or("any"))
            .map_err(|e| ControlError::invalid("protocol", e))?;
        if req.ttl_secs == 0 || req.ttl_secs > MAX_TTL_SECS {
            return Err(ControlError::invalid(
                "ttl_secs",
                format!("{} out of range: 1 to {MAX_TTL_SECS}", req.ttl_secs),
            ));
        }
        check_text("reason", &req.reason, MAX_TEXT_LEN)?;
        if let Some(t) = &req.task {
            let current = self.runtime.rt.tasks.get(&agent).map(|t| t.id.as_str());
            if current != Some(t.as_str()) {
                return Err(ControlError::invalid(
                    "task",
                    format!("{t:?} is not agent {name:?}'s current task"),
                ));
            }
        }
        let Some(p) = self.set.get(&policy) else {
            return Err(ControlError::Refused(format!(
                "agent {name:?} runs no single policy ({policy}): nothing may be granted"
            )));
        };
        grants::check_scope(&policy, &p.grants, &net, &ports, protocols, req.ttl_secs)?;
        let g = LiveGrant {
            id: self.runtime.rt.last_grant_id + 1,
            agent_id: agent,
            agent: name,
            to: net.to_string(),
            ports,
            protocols,
            deadline_ns: boottime_ns() + req.ttl_secs * 1_000_000_000,
            expires: rfc3339(SystemTime::now() + Duration::from_secs(req.ttl_secs)),
            task: req.task.clone(),
            reason: req.reason.clone(),
            by: by.clone(),
        };
        // Refused before anything is written when the agent holds its most or a prefix would
        // overflow.
        self.runtime
            .rt
            .check_cap(agent, &g.agent, self.max_grants_per_agent)?;
        self.runtime.rt.touched_by(&g, Some(&g))?;
        Ok(g)
    }

    pub(crate) fn grants(&self) -> Vec<GrantInfo> {
        self.runtime
            .rt
            .grants
            .values()
            .map(LiveGrant::info)
            .collect()
    }

    pub(crate) fn revoke(&mut self, id: u64, by: Caller) -> Result<Revoked, ControlError> {
        if matches!(by, Caller::Agent { .. }) {
            return Err(ControlError::Refused(
                "an agent cannot revoke grants".into(),
            ));
        }
        if !self.runtime.rt.grants.contains_key(&id) {
            return Err(ControlError::NotFound(format!("no live grant {id}")));
        }
        let (gone, destroyed) = self.take_grants(&[id]);
        self.persist();
        for g in &gone {
            self.notice(
                "revoked",
                json!({ "grant": g.id, "agent": g.agent, "to": g.to, "cause": "revoke",
                        "sockets_destroyed": destroyed, "by": by }),
            );
        }
        Ok(Revoked {
            id,
            sockets_destroyed: destroyed,
        })
    }

    /// Ends what passed its deadline (the kernel already stopped honouring it): grants leave
    /// the tries and their connections are destroyed; tasks end.
    pub(crate) fn expire(&mut self) {
        let now = boottime_ns();
        let ids: Vec<u64> = self
            .runtime
            .rt
            .grants
            .values()
            .filter(|g| g.deadline_ns <= now)
            .map(|g| g.id)
            .collect();
        if !ids.is_empty() {
            let (gone, destroyed) = self.take_grants(&ids);
            self.persist();
            for g in &gone {
                self.notice(
                    "grant-expired",
                    json!({ "grant": g.id, "agent": g.agent, "to": g.to, "expires": g.expires,
                            "sockets_destroyed": destroyed, "by": controller() }),
                );
            }
        }
        let tasks: Vec<u64> = self
            .runtime
            .rt
            .tasks
            .values()
            .filter(|t| t.deadline_ns != 0 && t.deadline_ns <= now)
            .map(|t| t.agent_id)
            .collect();
        for agent in tasks {
            if let Err(e) = self.finish_task(agent, controller(), "ttl") {
                tracing::error!(agent, "ending an expired task: {e}");
            }
        }
    }
}

pub(super) fn check_text(field: &str, s: &str, max: usize) -> Result<(), ControlError> {
    if s.trim().is_empty() {
        return Err(ControlError::invalid(field, "empty"));
    }
    if s.len() > max {
        return Err(ControlError::invalid(
            field,
            format!("longer than {max} bytes"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ControlError::invalid(field, "has control characters"));
    }
    Ok(())
}
