//! The controller: one task owns the loaded eBPF object (the Enforcer) and the registry of agents;
//! everything else (control socket, signals) sends it commands. Events run in their own task.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_common::{mode, AgentEntry, MAX_CGROUP_LEVEL};
use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    api::{self, Request, Response},
    cgroup,
    events::{self, AuditRecord, Enricher, Sink},
    identity::{agent_name, AgentMeta, Names, PolicyMeta},
    loader::{self, Enforcer, LoadOptions, PrefixKeys, Retired},
    pin,
    policy::{self, PolicySet},
};

/// Policy id given to a cgroup that two policies select: it has no rules, so the agent is denied
/// everything until the conflict is fixed (fail closed, never unenforced).
pub const CONFLICT_POLICY_ID: u32 = 0;

/// How often the controller signals liveness to the kernel's dead-man switches.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// Where the policy comes from.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// A directory (or file) re-read on reload.
    Path(PathBuf),
    /// A fixed set (the demo, tests).
    Fixed(PolicySet),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub policy: PolicySource,
    /// cgroup2 mount; found in /proc/self/mountinfo when None.
    pub cgroup_root: Option<PathBuf>,
    /// Where programs attach; the cgroup2 root when None (tests may use a subtree).
    pub attach_to: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub stdout: bool,
    pub control_socket: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    /// How often the cgroup tree is scanned for new cgroups that selectors match.
    pub rescan: Duration,
    pub wakeup_bytes: u64,
    /// Event ring size override (tests of the lost-event path).
    pub ring_bytes: Option<u32>,
    /// How often the event reader drains without a wake-up.
    pub drain_interval: Duration,
    /// Pin maps and links here (enforcement outlives the controller; a restart adopts them).
    /// None: nothing pinned (tests, demo): programs detach when the controller stops.
    pub pin_dir: Option<PathBuf>,
    /// In-process copy of every record (tests, demo).
    pub tap: Option<mpsc::UnboundedSender<AuditRecord>>,
}

impl Options {
    pub fn new(policy: PolicySource) -> Self {
        Self {
            policy,
            cgroup_root: None,
            attach_to: None,
            audit_log: None,
            stdout: false,
            control_socket: Some(api::DEFAULT_SOCKET.into()),
            bpffs: Some("/sys/fs/bpf".into()),
            rescan: Duration::from_secs(1),
            wakeup_bytes: loader::DEFAULT_WAKEUP_BYTES,
            ring_bytes: None,
            drain_interval: events::DRAIN_INTERVAL,
            pin_dir: None,
            tap: None,
        }
    }
}

/// Sent to the controller task.
pub enum Command {
    Api(Request, oneshot::Sender<Response>),
}

/// A running controller.
pub struct Handle {
    commands: mpsc::Sender<Command>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<()>>>,
    pub cgroup_root: PathBuf,
}

impl Handle {
    /// Sends a request as the control socket would.
    pub async fn request(&self, req: Request) -> Result<serde_json::Value> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Api(req, tx))
            .await
            .context("controller stopped")?;
        let resp = rx.await.context("controller stopped")?;
        if resp.ok {
            Ok(resp.result.unwrap_or_default())
        } else {
            bail!(resp.error.unwrap_or_default())
        }
    }

    /// Stops: detaches the programs, drains the last events, closes the socket.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            t.await.context("controller task panicked")??;
        }
        Ok(())
    }
}

struct Installed {
    id: u32,
    /// The prefixes written for this policy (their rule sets live only in the kernel).
    keys: PrefixKeys,
    mode: u32,
}

struct Registered {
    rel: String,
    level: u32,
    policy_id: u32,
}

struct State {
    enforcer: Enforcer,
    /// The policy directory re-read on reload; None for a fixed set, which is not kept (the
    /// controller holds no copy of the rules once they are in the kernel).
    source: Option<PathBuf>,
    root: PathBuf,
    set: PolicySet,
    installed: BTreeMap<String, Installed>,
    agents: HashMap<u64, Registered>,
    next_policy_id: u32,
    generation: u32,
    names: Arc<RwLock<Names>>,
    last_lost: u64,
    lost_tx: mpsc::UnboundedSender<u64>,
    /// Levels of an adopted map's agents, kept in the mask until they are re-registered.
    adopted_levels: u32,
}

/// Loads, fills the maps, attaches, and starts the tasks. Returns once enforcement is on.
pub async fn start(opts: Options) -> Result<Handle> {
    if let Some(bpffs) = &opts.bpffs {
        loader::ensure_bpffs(bpffs)?;
    }
    let root = match &opts.cgroup_root {
        Some(r) => r.clone(),
        None => cgroup::cgroup2_mount()?,
    };
    let set = match &opts.policy {
        PolicySource::Path(p) => policy::load_dir(p)?,
        PolicySource::Fixed(s) => s.clone(),
    };
    // A newer layout pinned beside ours refuses the start before anything is loaded.
    let older_layouts = match &opts.pin_dir {
        Some(dir) => pin::older_layouts(dir)?,
        None => Vec::new(),
    };
    let mut enforcer = Enforcer::load(&LoadOptions {
        wakeup_bytes: opts.wakeup_bytes,
        ring_bytes: opts.ring_bytes,
        pin_dir: opts.pin_dir.clone(),
    })
    .context("loading eBPF programs")?;
    let ring = enforcer.take_events().context("event ring already taken")?;
    let names = Arc::new(RwLock::new(Names::default()));
    names.write().expect("names").policies.insert(
        CONFLICT_POLICY_ID,
        PolicyMeta {
            name: "conflict:deny-all".into(),
            version: 0,
            rules: vec![],
            unix: vec![],
        },
    );
    let (lost_tx, lost_rx) = mpsc::unbounded_channel();
    // An adopted map holds the previous controller's policy ids: new ones must not collide.
    let adopted = enforcer.adopted();
    let previous_ids = enforcer.rule_policy_ids();
    let next_policy_id = previous_ids
        .iter()
        .copied()
        .chain(enforcer.agent_entries().iter().map(|(_, e)| e.policy_id))
        .max()
        .map_or(CONFLICT_POLICY_ID + 1, |m| m + 1);
    let last_lost = enforcer.lost_reported()?;
    let enforcer_levels = enforcer.agent_levels();
    let mut state = State {
        enforcer,
        source: match &opts.policy {
            PolicySource::Path(p) => Some(p.clone()),
            PolicySource::Fixed(_) => None,
        },
        root: root.clone(),
        set: PolicySet { policies: vec![] },
        installed: BTreeMap::new(),
        agents: HashMap::new(),
        next_policy_id,
        generation: 0,
        names: names.clone(),
        last_lost,
        lost_tx,
        adopted_levels: if adopted { enforcer_levels } else { 0 },
    };
    // Maps first, then attach: enforcement starts complete. When adopting, the previous
    // controller's entries keep enforcing until each is replaced, then the leftovers go.
    state.apply(set)?;
    if adopted {
        state.drop_leftovers()?;
        tracing::info!(
            pin_dir = ?opts.pin_dir,
            "adopted pinned programs and maps; switching the links to this controller's programs"
        );
    }
    let attach_to = opts.attach_to.clone().unwrap_or_else(|| root.clone());
    state.enforcer.attach(&attach_to, &older_layouts)?;
    tracing::info!(cgroup = %attach_to.display(), "programs attached");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let mut sink = Sink::new(opts.audit_log.as_deref(), opts.stdout, opts.tap.clone())
        .with_context(|| format!("opening the audit log {:?}", opts.audit_log))?;
    let mut tasks: Vec<JoinHandle<Result<()>>> = Vec::new();
    let mut enricher = Enricher::new(names, root.clone());
    // An upgrade across layout versions: the older layout's links now run this controller's
    // programs (switched in one step, pinned here too), so its own pins can go; its ring is
    // read to the end (nothing writes to it any more) and its maps removed.
    for dir in &older_layouts {
        pin::unpin_links(dir)?;
        let mut retired = Retired::open(dir)?;
        events::drain_retired(&mut retired, &mut enricher, &mut sink)
            .context("writing the events of an older layout")?;
        drop(retired);
        pin::uninstall(dir)?;
        tracing::info!(dir = %dir.display(), "retired an older pinned layout");
    }
    let rx = shutdown_rx.clone();
    let drain = opts.drain_interval;
    tasks.push(tokio::spawn(async move {
        events::run(ring, enricher, sink, lost_rx, rx, drain)
            .await
            .context("event reader")
    }));
    if let Some(sock) = opts.control_socket.clone() {
        let (tx, rx) = (cmd_tx.clone(), shutdown_rx.clone());
        // Bind before returning so `exec` can rely on the socket once start() has returned.
        let ready = std::os::unix::net::UnixStream::connect(&sock).is_ok();
        if ready {
            bail!("{}: another controller is serving here", sock.display());
        }
        tasks.push(tokio::spawn(async move {
            api::serve(sock, tx, rx).await.context("control socket")
        }));
        tokio::task::yield_now().await;
    }
    let rescan = opts.rescan;
    tasks.push(tokio::spawn(async move {
        state.run(cmd_rx, shutdown_rx, rescan).await
    }));
    Ok(Handle {
        commands: cmd_tx,
        shutdown: shutdown_tx,
        tasks,
        cgroup_root: root,
    })
}

impl State {
    async fn run(
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
    fn drop_leftovers(&mut self) -> Result<()> {
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
    fn apply(&mut self, set: PolicySet) -> Result<()> {
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
