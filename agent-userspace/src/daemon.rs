//! The composition root: loads the datapath, fills it, attaches, and starts the tasks (event
//! reader, control socket, the control actor); stops them in order.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    api::{self, Request},
    control::{Command, State, CONFLICT_POLICY_ID},
    datapath::{self as loader, pin, Enforcer, LoadOptions, Retired},
    events::{self, AuditRecord, Enricher},
    identity::{cgroup, Names, PolicyMeta},
    policy::{self, PolicySet},
    sinks::Sink,
};

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

    /// Registers the cgroup at `cgroup` (absolute path) as an agent, as `agentwall exec` does.
    pub async fn register(&self, cgroup: &std::path::Path) -> Result<serde_json::Value> {
        self.request(Request::Register {
            cgroup: cgroup.to_path_buf(),
        })
        .await
    }

    /// Re-reads the policy directory; on any error the running policy stays.
    pub async fn reload(&self) -> Result<serde_json::Value> {
        self.request(Request::Reload).await
    }

    /// What `agentwall status` shows.
    pub async fn status(&self) -> Result<serde_json::Value> {
        self.request(Request::Status).await
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
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let audit_health = crate::sinks::Health::new();
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
        notices: notice_tx,
        audit: audit_health.clone(),
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
        events::run(
            ring,
            enricher,
            sink,
            lost_rx,
            notice_rx,
            audit_health,
            rx,
            drain,
        )
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
