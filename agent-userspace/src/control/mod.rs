//! The control actor: one task owns the datapath (the loaded eBPF object) and the registry of
//! agents; everything else (control socket, signals, the daemon) sends it typed commands.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_common::{mode, AgentEntry, MAX_CGROUP_LEVEL};
use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    api::{Request, Response},
    datapath::{Enforcer, PrefixKeys},
    identity::{agent_name, cgroup, AgentMeta, Names, PolicyMeta},
    policy::{self, PolicySet},
};

/// Policy id given to a cgroup that two policies select: it has no rules, so the agent is denied
/// everything until the conflict is fixed (fail closed, never unenforced).
pub const CONFLICT_POLICY_ID: u32 = 0;

/// How often the controller signals liveness to the kernel's dead-man switches.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// Sent to the controller task.
pub enum Command {
    Api(Request, oneshot::Sender<Response>),
}

/// An installed policy version.
pub(crate) struct Installed {
    pub(crate) id: u32,
    /// The prefixes written for this policy (their rule sets live only in the kernel).
    pub(crate) keys: PrefixKeys,
    pub(crate) mode: u32,
}

pub(crate) struct Registered {
    pub(crate) rel: String,
    pub(crate) level: u32,
    pub(crate) policy_id: u32,
}

pub(crate) struct State {
    pub(crate) enforcer: Enforcer,
    /// The policy directory re-read on reload; None for a fixed set, which is not kept (the
    /// controller holds no copy of the rules once they are in the kernel).
    pub(crate) source: Option<PathBuf>,
    pub(crate) root: PathBuf,
    pub(crate) set: PolicySet,
    pub(crate) installed: BTreeMap<String, Installed>,
    pub(crate) agents: HashMap<u64, Registered>,
    pub(crate) next_policy_id: u32,
    pub(crate) generation: u32,
    pub(crate) names: Arc<RwLock<Names>>,
    pub(crate) last_lost: u64,
    pub(crate) lost_tx: mpsc::UnboundedSender<u64>,
    /// The controller's own reports into the audit stream.
    pub(crate) notices: mpsc::UnboundedSender<crate::events::Notice>,
    /// The audit log's health, shown by `status`.
    pub(crate) audit: crate::sinks::Health,
    /// Levels of an adopted map's agents, kept in the mask until they are re-registered.
    pub(crate) adopted_levels: u32,
}

impl State {
    pub(crate) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: watch::Receiver<bool>,
        rescan: Duration,
    ) -> Result<()> {
        let mut scan = tokio::time::interval(rescan);
        let mut counters = tokio::time::interval(Duration::from_millis(200));
        let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            tokio::select! {
                Some(cmd) = commands.recv() => match cmd {
                    Command::Api(req, reply) => { let _ = reply.send(self.api(req)); }
                },
                _ = scan.tick() => self.rescan(),
                _ = counters.tick() => self.report_lost(),
                _ = heartbeat.tick() => {
                    if let Err(e) = self.enforcer.heartbeat() {
                        tracing::error!("heartbeat: {e}");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        self.report_lost();
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

    fn api(&mut self, req: Request) -> Response {
        match req {
            Request::Register { cgroup } => match self.register_path(&cgroup) {
                Ok(meta) => {
                    // `exec` keeps CAP_NET_RAW only for agents allowed raw or packet sockets.
                    let sockets = self
                        .set
                        .get(&meta.policy)
                        .map(|p| p.socket_kind_names())
                        .unwrap_or_default();
                    Response::ok(json!({
                        "agent": meta.name, "cgroup": meta.cgroup, "policy": meta.policy,
                        "sockets": sockets,
                    }))
                }
                Err(e) => Response::err(format!("{e:#}")),
            },
            Request::Reload => match self.reload() {
                Ok(()) => Response::ok(json!({ "generation": self.generation })),
                Err(e) => {
                    tracing::error!("reload rejected, running policy kept: {e:#}");
                    Response::err(format!("{e:#}"))
                }
            },
            Request::Status => {
                let c = self.enforcer.counters().unwrap_or_default();
                let names = self.names.read().expect("names");
                let agents: Vec<_> = names
                    .agents
                    .values()
                    .map(|a| {
                        json!({
                            "agent": a.name, "cgroup": a.cgroup, "policy": a.policy,
                        })
                    })
                    .collect();
                Response::ok(json!({
                    "generation": self.generation,
                    "policies": self.installed.keys().collect::<Vec<_>>(),
                    "agents": agents,
                    "counters": c,
                    "audit_log": self.audit.snapshot(),
                }))
            }
        }
    }

    fn report_lost(&mut self) {
        if let Ok(c) = self.enforcer.counters() {
            if c.lost > self.last_lost {
                let _ = self.lost_tx.send(c.lost - self.last_lost);
                self.last_lost = c.lost;
                if let Err(e) = self.enforcer.set_lost_reported(c.lost) {
                    tracing::warn!("recording the reported lost count: {e}");
                }
            }
        }
    }

    /// After adopting pinned maps: removes agent entries the current policy no longer selects
    /// and prefixes of policy versions no longer installed.
    pub(crate) fn drop_leftovers(&mut self) -> Result<()> {
        for (id, _) in self.enforcer.agent_entries() {
            if !self.agents.contains_key(&id) {
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
        Ok(())
    }

    fn reload(&mut self) -> Result<()> {
        let Some(dir) = &self.source else {
            bail!("this controller runs a fixed policy set: there is nothing to re-read");
        };
        let set = policy::load_dir(dir)?;
        self.apply(set)
    }

    /// Installs a policy set without a window: new rules go in under fresh policy ids, then each
    /// agent entry is switched in one map update, then the old rules are removed. If anything
    /// fails before the switch, what was added is removed and the running state stays.
    pub(crate) fn apply(&mut self, set: PolicySet) -> Result<()> {
        let mut compiled = Vec::with_capacity(set.policies.len());
        for p in &set.policies {
            compiled.push(policy::compile(p)?);
        }
        // Old and new rules sit in the tries together until the switch is done.
        for (v4, cap, family) in [
            (true, agent_common::MAX_PREFIXES_V4, "IPv4"),
            (false, agent_common::MAX_PREFIXES_V6, "IPv6"),
        ] {
            let new: usize = compiled
                .iter()
                .map(|c| if v4 { c.v4.len() } else { c.v6.len() })
                .sum();
            let old: usize = self
                .installed
                .values()
                .map(|i| if v4 { i.keys.v4.len() } else { i.keys.v6.len() })
                .sum();
            if new + old > cap as usize {
                bail!(
                    "the policies need {new} {family} prefixes and {old} are installed; the \
                     kernel map holds {cap} (old and new rules coexist while a reload switches)"
                );
            }
        }
        let new: usize = compiled.iter().map(|c| c.unix.len()).sum();
        let old: usize = self.installed.values().map(|i| i.keys.unix.len()).sum();
        let cap = agent_common::MAX_UNIX_PATHS as usize;
        if new + old > cap {
            bail!(
                "the policies need {new} Unix socket entries and {old} are installed; the kernel \
                 map holds {cap} (old and new entries coexist while a reload switches)"
            );
        }
        let generation = self.generation + 1;
        let mut fresh: BTreeMap<String, Installed> = BTreeMap::new();
        let mut metas = Vec::new();
        for (p, c) in set.policies.iter().zip(compiled) {
            let id = self.next_policy_id;
            self.next_policy_id = self
                .next_policy_id
                .checked_add(1)
                .context("policy ids exhausted")?;
            let keys = PrefixKeys::of(&c);
            if let Err(e) = self.enforcer.install_rules(id, &c) {
                let _ = self.enforcer.remove_rules(id, &keys);
                for inst in fresh.values() {
                    let _ = self.enforcer.remove_rules(inst.id, &inst.keys);
                }
                return Err(e).with_context(|| format!("installing policy {}", p.name));
            }
            metas.push((
                id,
                PolicyMeta {
                    name: p.name.clone(),
                    version: generation,
                    rules: p.rules.iter().map(|r| r.name.clone()).collect(),
                    unix: p.unix.iter().map(|u| u.to_string()).collect(),
                },
            ));
            fresh.insert(
                p.name.clone(),
                Installed {
                    id,
                    keys,
                    mode: p.mode.as_kernel(),
                },
            );
        }
        {
            let mut names = self.names.write().expect("names");
            for (id, m) in metas {
                names.policies.insert(id, m);
            }
        }
        let old = std::mem::replace(&mut self.installed, fresh);
        self.set = set;
        self.generation = generation;
        // Re-point every registered agent, then pick up cgroups the new selectors match.
        let ids: Vec<u64> = self.agents.keys().copied().collect();
        for id in ids {
            let rel = self.agents[&id].rel.clone();
            if let Err(e) = self.register(id, &rel) {
                tracing::info!(cgroup = %rel, "no longer an agent: {e:#}");
                self.unregister(id);
            }
        }
        self.rescan();
        for inst in old.values() {
            if let Err(e) = self.enforcer.remove_rules(inst.id, &inst.keys) {
                tracing::warn!(policy_id = inst.id, "removing old rules: {e}");
            }
        }
        // Selectors, modes and names are all the controller needs from here on; the rules live
        // in the kernel. Freed heap goes back to the system (a 100k-rule load peaks high).
        for p in &mut self.set.policies {
            p.rules = Vec::new();
        }
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::info!(
            generation,
            policies = self.installed.len(),
            "policy applied"
        );
        Ok(())
    }

    fn register_path(&mut self, path: &Path) -> Result<AgentMeta> {
        let rel = cgroup::relative(&self.root, path)?;
        let id = cgroup::cgroup_id(path)?;
        self.register(id, &rel)
    }

    /// Registers (or re-points) one cgroup; errors when no policy selects it.
    fn register(&mut self, id: u64, rel: &str) -> Result<AgentMeta> {
        let level = cgroup::level(rel);
        if level == 0 || level > MAX_CGROUP_LEVEL {
            bail!("cgroup {rel:?} is at level {level}; agents must be at levels 1..={MAX_CGROUP_LEVEL}");
        }
        let matches = self.set.find_for_cgroup(rel);
        let (deadman_secs, deadman_mode) = match matches.as_slice() {
            [p] => p
                .deadman
                .map_or((0, 0), |d| (d.after_secs, d.fallback.as_kernel())),
            _ => (0, 0),
        };
        let (policy_id, mode_, sockets_, policy_name) = match matches.as_slice() {
            [] => bail!("no policy selects cgroup {rel:?}"),
            [p] => {
                let inst = &self.installed[&p.name];
                (inst.id, inst.mode, p.sockets, p.name.clone())
            }
            many => {
                let list: Vec<_> = many.iter().map(|p| p.name.as_str()).collect();
                tracing::error!(cgroup = rel, policies = ?list,
                    "several policies select this cgroup: it is denied everything until fixed");
                (
                    CONFLICT_POLICY_ID,
                    mode::ENFORCE,
                    0,
                    "conflict:deny-all".to_string(),
                )
            }
        };
        let entry = AgentEntry {
            policy_id,
            mode: mode_,
            policy_version: self.generation,
            sockets: sockets_,
            deadman_secs,
            deadman_mode,
            kind: agent_common::entry::AGENT,
            _reserved: 0,
        };
        self.enforcer.set_agent(id, entry)?;
        let meta = AgentMeta {
            name: agent_name(rel),
            cgroup: rel.to_string(),
            policy: policy_name,
        };
        let new = !self.agents.contains_key(&id);
        self.agents.insert(
            id,
            Registered {
                rel: rel.to_string(),
                level,
                policy_id,
            },
        );
        self.names
            .write()
            .expect("names")
            .agents
            .insert(id, meta.clone());
        self.update_levels()?;
        if new {
            tracing::info!(agent = %meta.name, cgroup = rel, policy = %meta.policy, "agent registered");
        }
        Ok(meta)
    }

    fn unregister(&mut self, id: u64) {
        if let Err(e) = self.enforcer.remove_agent(id) {
            tracing::warn!(cgroup_id = id, "removing agent: {e}");
        }
        self.agents.remove(&id);
        self.names.write().expect("names").agents.remove(&id);
        let _ = self.update_levels();
    }

    fn update_levels(&mut self) -> Result<()> {
        let mask = self
            .agents
            .values()
            .fold(self.adopted_levels, |m, a| m | (1 << a.level));
        self.enforcer.set_agent_levels(mask)?;
        Ok(())
    }

    /// Registers cgroups that selectors match and forgets agents whose cgroup is gone.
    fn rescan(&mut self) {
        let gone: Vec<u64> = self
            .agents
            .iter()
            .filter(|(_, a)| !self.root.join(&a.rel).is_dir())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.unregister(id);
        }
        if self.set.policies.is_empty() {
            return;
        }
        for rel in cgroup::walk(&self.root) {
            if self.set.find_for_cgroup(&rel).is_empty() {
                continue;
            }
            let Ok(id) = cgroup::cgroup_id(&self.root.join(&rel)) else {
                continue;
            };
            let current = self.agents.get(&id).map(|a| a.policy_id);
            let wanted = match self.set.find_for_cgroup(&rel).as_slice() {
                [p] => self.installed.get(&p.name).map(|i| i.id),
                _ => Some(CONFLICT_POLICY_ID),
            };
            if current != wanted {
                if let Err(e) = self.register(id, &rel) {
                    tracing::warn!(cgroup = rel, "cannot register: {e:#}");
                }
            }
        }
    }
}
