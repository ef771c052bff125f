//! The composition root: loads the datapath, fills it, attaches, and starts the tasks (event
//! reader, control socket, the control actor); stops them in order.

use std::{
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};

use crate::{
    api,
    control::{Command, State, CONFLICT_POLICY_ID},
    datapath::{self as loader, lock::PinLock, pin, Enforcer, LoadOptions, Retired},
    events::{self, AuditRecord, Enricher},
    identity::{self, cgroup, Names, PolicyMeta},
    policy::{self, PolicySet},
    sinks::{
        fanout::Fanout,
        metrics::{self, Metrics},
        Sink,
    },
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
    /// The audit log's rotation, retention, fsync policy and checkpoint keys.
    pub audit: crate::sinks::AuditOptions,
    pub stdout: bool,
    /// How the audit log and stdout lines are written (`--format`, docs/ocsf.md).
    pub format: crate::sinks::Format,
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
    /// Records each `GET /v1/events` consumer may fall behind by before it gets a drop notice
    /// (docs/stream.md).
    pub stream_buffer: usize,
    /// Agent map size override (tests of a full map); `MAX_AGENTS` when None.
    pub agent_map_entries: Option<u32>,
    /// The agent socket (docs/agent-socket.md): where agents set their task and ask for access.
    /// Every policy's Unix allowlist gets it unless the policy says `agent_socket: false`.
    /// None: not served (`agentwall run` serves it at `api::agent::DEFAULT_AGENT_SOCKET`).
    pub agent_socket: Option<PathBuf>,
    /// Watch a policy directory (`PolicySource::Path`) and switch after each burst of changes
    /// (on by default; `agentwall reload` and SIGHUP work either way).
    pub watch_policy: bool,
    /// How long a request for access waits for a person before it expires (as denied).
    pub request_ttl: Duration,
    /// Live grants one agent may hold (`--max-grants-per-agent`): the grant tries are shared,
    /// and one agent must not fill them. Over it a grant is refused (403).
    pub max_grants_per_agent: usize,
    /// The enforcing DNS proxy (docs/dns.md): agents' port-53 traffic is steered to it. None:
    /// no proxy, and port 53 is judged by the policy like any other port.
    pub dns: Option<DnsOptions>,
    /// When another controller holds the pins: ask it to stop (SIGTERM) and take over once it
    /// has, instead of failing. The DNS proxy's sockets are bound first, so queries sent
    /// meanwhile wait for this controller instead of failing.
    pub takeover: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (docs/metrics.md); port 0: a free one
    /// (`Handle::metrics_addr`).
    pub metrics: Option<SocketAddr>,
    /// Publish the audit log to NATS JetStream (docs/nats.md); needs `audit_log`, its spool.
    pub nats: Option<crate::sinks::nats::NatsOptions>,
}

/// The DNS proxy's addresses and upstream.
#[derive(Debug, Clone)]
pub struct DnsOptions {
    /// Where allowed queries go (`--dns-upstream`; the node's resolver by default).
    pub upstream: SocketAddr,
    /// Loopback addresses the proxy listens on (port 0: a free one, the same for both).
    pub listen_v4: SocketAddrV4,
    pub listen_v6: Option<SocketAddrV6>,
}

/// The running DNS proxy: where it listens, its stop signal, its task.
type ProxyTask = (
    DnsListen,
    watch::Sender<bool>,
    JoinHandle<std::io::Result<()>>,
);

/// The running NATS publisher: its stop signal and its task.
type NatsTask = (
    watch::Sender<bool>,
    JoinHandle<Result<(), crate::sinks::nats::NatsError>>,
);

/// Where a running DNS proxy listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsListen {
    pub v4: SocketAddr,
    pub v6: Option<SocketAddr>,
}

impl Options {
    pub fn new(policy: PolicySource) -> Self {
        Self {
            policy,
            cgroup_root: None,
            attach_to: None,
            audit_log: None,
            audit: crate::sinks::AuditOptions::default(),
            stdout: false,
            format: crate::sinks::Format::Native,
            control_socket: Some(api::DEFAULT_SOCKET.into()),
            bpffs: Some("/sys/fs/bpf".into()),
            // A backstop: new cgroups are seen by inotify when they appear.
            rescan: Duration::from_secs(30),
            wakeup_bytes: loader::DEFAULT_WAKEUP_BYTES,
            ring_bytes: None,
            drain_interval: events::DRAIN_INTERVAL,
            pin_dir: None,
            tap: None,
            stream_buffer: crate::sinks::fanout::DEFAULT_BUFFER,
            agent_map_entries: None,
            agent_socket: None,
            watch_policy: true,
            request_ttl: crate::control::requests::DEFAULT_REQUEST_TTL,
            max_grants_per_agent: crate::control::grants::DEFAULT_MAX_GRANTS_PER_AGENT,
            dns: None,
            takeover: false,
            metrics: None,
            nats: None,
        }
    }
}

/// A running controller.
pub struct Handle {
    commands: mpsc::Sender<Command>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<()>>>,
    pub cgroup_root: PathBuf,
    /// Asks the event reader to reopen the audit log (SIGHUP).
    reopen: mpsc::UnboundedSender<()>,
    /// The live stream's fan-out: records the audit log accepted.
    records: Fanout,
    /// The DNS proxy: where it listens, its stop signal and its task. It stops first, answering
    /// what it holds, while the control actor still runs.
    dns: Option<Box<ProxyTask>>,
    /// Where the metrics endpoint listens (`Options::metrics`).
    metrics_addr: Option<SocketAddr>,
    /// The NATS publisher's stop signal and task: it stops last, after the records the other
    /// tasks wrote last.
    nats: Option<NatsTask>,
    /// Held while this controller serves its pins; released after the tasks have stopped.
    _lock: Option<PinLock>,
}

impl Handle {
    /// Where the DNS proxy listens (None: no proxy).
    pub fn dns_listen(&self) -> Option<DnsListen> {
        self.dns.as_ref().map(|p| p.0)
    }

    /// Every record written from now on, as `GET /v1/events` consumers get them (unfiltered).
    pub fn subscribe_records(&self) -> broadcast::Receiver<Arc<AuditRecord>> {
        self.records.subscribe()
    }

    /// The live stream's fan-out (consumer counts, drops).
    pub fn records(&self) -> &Fanout {
        &self.records
    }

    /// Where the metrics endpoint listens (None: not served).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Reopens the audit log before the next record (after a rotation, on SIGHUP).
    pub fn reopen_audit_log(&self) {
        let _ = self.reopen.send(());
    }

    /// Sends one command to the control actor and waits for its reply.
    async fn command<T: serde::Serialize>(
        &self,
        make: impl FnOnce(crate::control::Reply<T>) -> Command,
    ) -> Result<serde_json::Value> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| anyhow::anyhow!("the controller is shutting down"))?;
        let v = rx
            .await
            .map_err(|_| anyhow::anyhow!("the controller is shutting down"))?
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(serde_json::to_value(v)?)
    }

    /// Registers the cgroup at `cgroup` (absolute path) as an agent, as `agentwall exec` does.
    pub async fn register(&self, cgroup: &std::path::Path) -> Result<serde_json::Value> {
        let cgroup = cgroup.to_path_buf();
        self.command(|reply| Command::Register { cgroup, reply })
            .await
    }

    /// Re-reads the policy directory; on any error the running policy stays.
    pub async fn reload(&self) -> Result<serde_json::Value> {
        self.command(|reply| Command::Reload { reply }).await
    }

    /// What `agentwall status` shows.
    pub async fn status(&self) -> Result<serde_json::Value> {
        self.command(|reply| Command::Status { reply }).await
    }

    /// Sends a runtime-control command and waits for its typed reply.
    async fn runtime<T>(
        &self,
        make: impl FnOnce(crate::control::RuntimeReply<T>) -> Command,
    ) -> Result<T, crate::control::ControlError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || crate::control::ControlError::Internal("the controller stopped".into());
        self.commands.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Sets an agent's current task (as root on the admin socket).
    pub async fn task_start(
        &self,
        req: crate::control::TaskStart,
        by: crate::control::Caller,
    ) -> Result<crate::control::TaskInfo, crate::control::ControlError> {
        self.runtime(|reply| Command::TaskStart { req, by, reply })
            .await
    }

    /// Ends an agent's task and revokes its grants.
    pub async fn task_end(
        &self,
        agent: String,
        by: crate::control::Caller,
    ) -> Result<crate::control::TaskEnded, crate::control::ControlError> {
        self.runtime(|reply| Command::TaskEnd { agent, by, reply })
            .await
    }

    /// Grants access until a deadline the kernel checks; the reply carries the grant id.
    pub async fn grant(
        &self,
        req: crate::control::GrantRequest,
        by: crate::control::Caller,
    ) -> Result<crate::control::GrantInfo, crate::control::ControlError> {
        self.runtime(|reply| Command::Grant { req, by, reply })
            .await
    }

    /// The live grants.
    pub async fn grants(
        &self,
    ) -> Result<Vec<crate::control::GrantInfo>, crate::control::ControlError> {
        self.runtime(|reply| Command::Grants { reply }).await
    }

    /// Ends a grant at once and destroys the connections it allowed.
    pub async fn revoke(
        &self,
        id: u64,
        by: crate::control::Caller,
    ) -> Result<crate::control::Revoked, crate::control::ControlError> {
        self.runtime(|reply| Command::Revoke { id, by, reply })
            .await
    }

    /// An agent's own request for access, as the agent socket sends it: granted at once
    /// (`approve: auto`) or pending a person's approval.
    pub async fn access(
        &self,
        req: crate::control::GrantRequest,
        by: crate::control::Caller,
    ) -> Result<crate::control::Access, crate::control::ControlError> {
        self.runtime(|reply| Command::Access { req, by, reply })
            .await
    }

    /// The pending requests.
    pub async fn requests(
        &self,
    ) -> Result<Vec<crate::control::RequestInfo>, crate::control::ControlError> {
        self.runtime(|reply| Command::Requests { reply }).await
    }

    /// One request, pending or decided (an agent caller sees its own only).
    pub async fn request(
        &self,
        id: u64,
        by: crate::control::Caller,
    ) -> Result<crate::control::RequestInfo, crate::control::ControlError> {
        self.runtime(|reply| Command::Request { id, by, reply })
            .await
    }

    /// A denied connection record (its audit `seq`) turned into a pending request.
    pub async fn request_from_event(
        &self,
        req: crate::control::FromEvent,
        by: crate::control::Caller,
    ) -> Result<crate::control::RequestInfo, crate::control::ControlError> {
        self.runtime(|reply| Command::RequestFromEvent { req, by, reply })
            .await
    }

    /// Approves a pending request: a grant, through the same path as `grant`.
    pub async fn approve(
        &self,
        id: u64,
        ttl_secs: Option<u64>,
        by: crate::control::Caller,
    ) -> Result<crate::control::Approved, crate::control::ControlError> {
        self.runtime(|reply| Command::Approve {
            id,
            ttl_secs,
            by,
            reply,
        })
        .await
    }

    /// Denies a pending request.
    pub async fn deny(
        &self,
        id: u64,
        reason: Option<String>,
        by: crate::control::Caller,
    ) -> Result<crate::control::RequestInfo, crate::control::ControlError> {
        self.runtime(|reply| Command::Deny {
            id,
            reason,
            by,
            reply,
        })
        .await
    }

    /// What the kernel would decide now for an agent and a destination, and why (nothing is
    /// connected).
    pub async fn explain(
        &self,
        req: crate::control::explain::ExplainRequest,
    ) -> Result<crate::control::explain::Explanation, crate::control::ControlError> {
        self.runtime(|reply| Command::Explain { req, reply }).await
    }

    /// Reads and switches to the policy at `path` (a directory or one file), as `agentwall policy
    /// apply` does; None re-reads the configured directory. On any error (file:line:column) the
    /// running policy stays. The reply names the version now running.
    pub async fn apply_policy(
        &self,
        path: Option<PathBuf>,
        origin: crate::control::policy_watch::PolicyOrigin,
    ) -> Result<crate::control::Reloaded> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::ApplyPolicy {
                path,
                origin,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the controller stopped"))?;
        match answer.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => bail!(e),
            Err(_) => bail!("the controller stopped"),
        }
    }

    /// Stops: detaches the programs, drains the last events, closes the socket.
    pub async fn shutdown(self) -> Result<()> {
        if let Some((_, stop, task)) = self.dns.map(|b| *b) {
            // The proxy answers the queries it holds while the actor can still judge them.
            let _ = stop.send(true);
            match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("DNS proxy: {e}"),
                Ok(Err(e)) => tracing::warn!("DNS proxy task: {e}"),
                Err(_) => tracing::warn!("DNS proxy: queries still in flight at shutdown"),
            }
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            t.await.context("controller task panicked")??;
        }
        if let Some((stop, task)) = self.nats {
            let _ = stop.send(true);
            task.await.context("NATS publisher panicked")??;
        }
        Ok(())
    }
}

/// The pin lock of `pin_dir`, from the controller that holds it: asked to stop (SIGTERM), then
/// waited for (it answers its last DNS queries and drains its events first).
async fn take_over(pin_dir: &std::path::Path) -> Result<PinLock> {
    use crate::datapath::lock::LockError;
    let deadline = std::time::Instant::now() + TAKEOVER_WAIT;
    let mut signalled = false;
    loop {
        match PinLock::acquire(pin_dir) {
            Ok(lock) => return Ok(lock),
            Err(LockError::Held { holder, path }) => {
                if !signalled {
                    let Some(h) = holder else {
                        bail!(
                            "{}: held by a controller in another pid namespace; cannot take over",
                            path.display()
                        );
                    };
                    tracing::info!(
                        pid = h.pid,
                        "taking over: asking the running controller to stop"
                    );
                    // SAFETY: a plain kill(2) of the pid the lock names.
                    if unsafe { libc::kill(h.pid, libc::SIGTERM) } != 0 {
                        bail!(
                            "signalling controller pid {}: {}",
                            h.pid,
                            std::io::Error::last_os_error()
                        );
                    }
                    signalled = true;
                }
                if std::time::Instant::now() > deadline {
                    bail!("the running controller did not stop within {TAKEOVER_WAIT:?}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long a takeover waits for the running controller to stop.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Loads, fills the maps, attaches, and starts the tasks. Returns once enforcement is on.
pub async fn start(opts: Options) -> Result<Handle> {
    if let Some(bpffs) = &opts.bpffs {
        loader::ensure_bpffs(bpffs)?;
    }
    // The DNS proxy's sockets first: from here on new queries come to this controller (they
    // wait in its sockets while a controller it takes over from finishes).
    let dns_listeners = match &opts.dns {
        Some(d) => Some(
            crate::dns::proxy::Listeners::bind(d.listen_v4, d.listen_v6)
                .with_context(|| format!("binding the DNS proxy at {}", d.listen_v4))?,
        ),
        None => None,
    };
    // An address that cannot be bound refuses the start before anything is loaded.
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint at {addr}"))?,
        ),
        None => None,
    };
    // Before anything pinned is read or written: one controller per pin directory.
    let lock = match &opts.pin_dir {
        Some(dir) if opts.takeover => Some(take_over(dir).await?),
        Some(dir) => Some(PinLock::acquire(dir)?),
        None => None,
    };
    let root = match &opts.cgroup_root {
        Some(r) => r.clone(),
        None => cgroup::cgroup2_mount()?,
    };
    let set = match &opts.policy {
        PolicySource::Path(p) => policy::load_dir(p)?,
        PolicySource::Fixed(s) => s.clone(),
    };
    if let Some(n) = &opts.nats {
        n.validate()?;
        if opts.audit_log.is_none() {
            bail!("--nats publishes the audit log (its spool): it needs --audit-log");
        }
    }
    // An audit log that cannot be written refuses the start before anything is loaded.
    let mut sink = Sink::with_audit(
        opts.audit_log.as_deref(),
        opts.audit.clone(),
        opts.stdout,
        opts.tap.clone(),
    )?
    .with_format(opts.format);
    let records = Fanout::new(opts.stream_buffer);
    sink.set_fanout(records.clone());
    // A newer layout pinned beside ours refuses the start before anything is loaded.
    let older_layouts = match &opts.pin_dir {
        Some(dir) => pin::older_layouts(dir)?,
        None => Vec::new(),
    };
    let mut enforcer = Enforcer::load(&LoadOptions {
        wakeup_bytes: opts.wakeup_bytes,
        ring_bytes: opts.ring_bytes,
        pin_dir: opts.pin_dir.clone(),
        agent_map_entries: opts.agent_map_entries,
    })
    .context("loading eBPF programs")?;
    let ring = enforcer.take_events().context("event ring already taken")?;
    let metrics = match metrics_listener {
        Some(listener) => {
            let m = Metrics::new();
            m.watch_ring(std::os::fd::AsFd::as_fd(&ring))
                .context("mapping the event ring's positions for metrics")?;
            sink.observe(m.observer());
            Some((m, listener))
        }
        None => None,
    };
    // Agents' DNS goes to this controller's proxy from the moment the programs attach.
    enforcer
        .set_dns(dns_listeners.as_ref().map(|l| (l.v4, l.v6)))
        .context("configuring DNS steering")?;
    let dns_socks = match dns_listeners {
        Some(_) => Some(enforcer.dns_socks().context("the DNS socket map")?),
        None => None,
    };
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
    let (notice_tx, notice_rx) = mpsc::unbounded_channel();
    let dns_notices = notice_tx.clone();
    let nats_notices = notice_tx.clone();
    let audit_health = crate::sinks::Health::new();
    let adopted = enforcer.adopted();
    let last_lost = enforcer.lost_reported()?;
    let (lost_tx, losses) = events::loss_link(last_lost);
    let adopted_levels = if adopted { enforcer.agent_levels() } else { 0 };
    let mut state = State::new(
        enforcer,
        root.clone(),
        match &opts.policy {
            PolicySource::Path(p) => Some(p.clone()),
            PolicySource::Fixed(_) => None,
        },
        names.clone(),
        adopted_levels,
        lost_tx,
        notice_tx,
        audit_health.clone(),
    )?;
    state.requests.ttl = opts.request_ttl;
    state.max_grants_per_agent = opts.max_grants_per_agent;
    if let Some((m, _)) = &metrics {
        m.watch_health(audit_health.clone());
        state.metrics = Some(m.clone());
    }
    // Bound before the policy is applied, whose Unix allowlists name it.
    // Absolute: agents connect by this path, and the Unix guard matches it as written.
    let agent_socket = opts
        .agent_socket
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("agent socket path")?;
    let agent_listener = match &agent_socket {
        Some(path) => {
            state.agent_socket = Some(path.display().to_string());
            Some((
                path.clone(),
                api::agent::bind(path).context("agent socket")?,
            ))
        }
        None => None,
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
    let mut tasks: Vec<JoinHandle<Result<()>>> = Vec::new();
    if let Some((path, listener)) = agent_listener {
        let (tx, rx, names) = (cmd_tx.clone(), shutdown_rx.clone(), names.clone());
        tasks.push(tokio::spawn(async move {
            api::agent::serve(path, listener, tx, names, rx)
                .await
                .context("agent socket")
        }));
    }
    let mut enricher = Enricher::new(names, root.clone());
    enricher.index_denied(state.requests.denied.clone());
    // This boot's sequence continues where the last controller's audit log ends.
    let resume = opts
        .audit_log
        .as_deref()
        .map(|p| events::resume::from_audit_log(p, &enricher.boot_id))
        .unwrap_or_default();
    if resume.last_seq > 0 {
        tracing::info!(
            last_seq = resume.last_seq,
            "continuing the audit sequence of this boot"
        );
    }
    enricher.resume_after(resume.last_seq);
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
    let drain = opts.drain_interval;
    let (reopen_tx, reopen) = mpsc::unbounded_channel();
    let inputs = events::Inputs {
        losses,
        notices: notice_rx,
        reopen,
        resume,
    };
    // It ends after the control actor, whose final loss total it writes.
    tasks.push(tokio::spawn(async move {
        events::run(ring, enricher, sink, inputs, audit_health, drain)
            .await
            .context("event reader")
    }));
    // The NATS publisher tails the audit log the reader writes: it never holds the reader up.
    let nats = match (&opts.nats, &opts.audit_log) {
        (Some(n), Some(log)) => {
            let (stop_tx, stop_rx) = watch::channel(false);
            tracing::info!(url = %n.url, subjects = %format!("{}.>", n.subject_prefix),
                stream = %n.stream, "publishing the audit log to NATS JetStream");
            let task = tokio::spawn(crate::sinks::nats::run(
                n.clone(),
                log.clone(),
                nats_notices,
                stop_rx,
            ));
            Some((stop_tx, task))
        }
        _ => None,
    };
    if let Some(sock) = opts.control_socket.clone() {
        let (tx, rx) = (cmd_tx.clone(), shutdown_rx.clone());
        let subscriber = Some(records.subscriber());
        // Bind before returning so `exec` can rely on the socket once start() has returned.
        let ready = std::os::unix::net::UnixStream::connect(&sock).is_ok();
        if ready {
            bail!("{}: another controller is serving here", sock.display());
        }
        tasks.push(tokio::spawn(async move {
            api::serve(sock, tx, subscriber, rx)
                .await
                .context("control socket")
        }));
        tokio::task::yield_now().await;
    }
    let metrics_addr = match metrics {
        Some((m, listener)) => {
            let addr = listener
                .local_addr()
                .context("the metrics endpoint's address")?;
            let rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                metrics::serve(listener, m, rx)
                    .await
                    .context("metrics endpoint")
            }));
            tracing::info!(%addr, "serving metrics at /metrics");
            Some(addr)
        }
        None => None,
    };
    // New cgroups below the watched parents are registered when they appear.
    let (change_tx, change_rx) = mpsc::channel(1024);
    let watched = state.watched_paths();
    tokio::spawn(async move {
        if let Err(e) = identity::watch::run(watched, change_tx).await {
            tracing::error!("cgroup watcher stopped: {e}; only the periodic scan registers");
        }
    });
    if let (true, PolicySource::Path(dir)) = (opts.watch_policy, &opts.policy) {
        let (dir, tx, rx) = (dir.clone(), cmd_tx.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::control::policy_watch::run(dir, tx, rx).await {
                tracing::error!(
                    "policy directory watch stopped: {e:#}; reload or SIGHUP apply changes"
                );
            }
        });
    }
    let rescan = opts.rescan;
    tasks.push(tokio::spawn(async move {
        state.run(cmd_rx, change_rx, shutdown_rx, rescan).await
    }));
    let dns = match (dns_listeners, dns_socks, &opts.dns) {
        (Some(listeners), Some(socks), Some(d)) => {
            let listen = DnsListen {
                v4: SocketAddr::V4(listeners.v4),
                v6: listeners.v6.map(SocketAddr::V6),
            };
            let (stop_tx, stop_rx) = watch::channel(false);
            let upstream = crate::dns::upstream::Upstream::new(d.upstream);
            tracing::info!(listen = %listen.v4, v6 = ?listen.v6, upstream = %d.upstream,
                "DNS proxy serving; agents' DNS is steered to it");
            let task = tokio::spawn(crate::dns::proxy::serve(
                listeners,
                cmd_tx.clone(),
                socks,
                upstream,
                dns_notices,
                stop_rx,
            ));
            Some(Box::new((listen, stop_tx, task)))
        }
        _ => None,
    };
    Ok(Handle {
        dns,
        commands: cmd_tx,
        shutdown: shutdown_tx,
        tasks,
        cgroup_root: root,
        reopen: reopen_tx,
        metrics_addr,
        records,
        nats,
        _lock: lock,
    })
}
