//! The control plane, measured in fresh processes (`agentwall-bench __daemon ...`) so that
//! memory figures are the controller's alone:
//!
//! - `--mode load`: parse the 100k-rule policy, compile it alone (timed), then start a
//!   controller with it (`daemon::start`: compile, load the programs, install every prefix
//!   into the LPM trie, attach), timing that and the peak RSS it adds; then stop.
//! - `--mode daemon`: start the controller the way `agentwall run --policy FILE` does (from the
//!   file), register the agent cgroup, report RSS and the kernel memory of its maps, then on
//!   request insert single entries into its live IPv4 trie, timing each one, while the bench
//!   runs a TCP connect loop in the agent; then, on request, create cgroups that a policy
//!   selects and time how long each takes to be registered (its entry in the kernel's agent
//!   map); then stop and account for every event.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent_common::{
    entry, names, proto, AgentEntry, PortRule, PrefixV4, RuleSet, POLICY_PREFIX_BITS,
};
use agentwall::{
    daemon::{self, Options, PolicySource},
    identity::cgroup,
    policy::{self, PolicySet},
};
use anyhow::{bail, ensure, Context, Result};
use aya::maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapInfo};
use serde::{Deserialize, Serialize};

use crate::{
    cleanup,
    configs::{self, AuditFollower, EventCheck},
    load::{self, Kind as LoadKind},
    report::Plan,
    stats, sys,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Load,
    Daemon,
    /// Runtime control: grants and revokes against the kernel (runtime.rs).
    Runtime,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DaemonArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// The policy file (YAML; load mode) or directory (daemon mode).
    #[arg(long)]
    pub policy: PathBuf,
    /// The agent cgroup to register (daemon mode).
    #[arg(long)]
    pub agent: PathBuf,
    #[arg(long)]
    pub audit_log: PathBuf,
    #[arg(long)]
    pub wakeup_bytes: Option<u64>,
    /// Where the registration test creates cgroups (a policy selects `<this>/agent-*`).
    #[arg(long)]
    pub reg_parent: Option<PathBuf>,
    /// The loopback server the registration policy allows, and the canary it does not.
    #[arg(long)]
    pub server: Option<SocketAddrV4>,
    #[arg(long)]
    pub canary: Option<SocketAddrV4>,
    /// CPU for the verdict checks' processes.
    #[arg(long, default_value_t = 0)]
    pub cpu: usize,
    /// Runtime mode: grant/revoke cycles, revoke-to-reset samples, live grants, TCP connects.
    #[arg(long, default_value_t = 0)]
    pub cycles: usize,
    #[arg(long, default_value_t = 0)]
    pub resets: usize,
    #[arg(long, default_value_t = 0)]
    pub grants: usize,
    #[arg(long, default_value_t = 0)]
    pub tcp_ops: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadFigures {
    pub parse_ms: f64,
    pub compile_ms: f64,
    /// daemon::start with the parsed policy: compile + program load + install + attach.
    pub start_ms: f64,
    pub trie_entries: usize,
    pub rss_before_kib: u64,
    pub peak_kib: u64,
    pub peak_delta_kib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapMemory {
    pub name: String,
    pub map_type: String,
    pub max_entries: u64,
    /// The kernel's accounting of the map's memory (fdinfo `memlock`).
    pub memlock_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonFigures {
    /// From the policy file to enforcing: parse + compile + load + install + attach.
    pub start_ms: f64,
    pub rss_kib: u64,
    /// RssAnon: the controller's own (private) memory, without the mapped event ring, which is
    /// kernel memory mapped twice into the process and counted with the maps.
    #[serde(default)]
    pub anon_kib: u64,
    pub hwm_kib: u64,
    /// RSS after malloc_trim(0): what the daemon would hold if it gave freed heap back.
    pub rss_after_trim_kib: u64,
    pub maps: Vec<MapMemory>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateFigures {
    /// Each insert's time, ns.
    pub samples_ns: Vec<f64>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub trie_entries_before: usize,
}

/// The registration test of one round, in ms from each cgroup's mkdir.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegFigures {
    /// One cgroup at a time: mkdir to its agent entry in the kernel's map.
    pub single_ms: Vec<f64>,
    /// `batch` cgroups made at once: each one's mkdir to its entry.
    pub batch_ms: Vec<f64>,
    /// The batch: first mkdir to the last entry.
    pub batch_all_ms: f64,
    /// rmdir to the entry gone from the map (singles and batch).
    pub removal_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Reply {
    Load(LoadFigures),
    Runtime(crate::runtime::RuntimeFigures),
    Ready(DaemonFigures),
    Updates(UpdateFigures),
    Registrations(RegFigures),
    Stopped(EventCheck),
}

fn say(r: &Reply) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(r)?)?;
    out.flush()?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `__daemon`: the child's main.
pub fn child_main(args: DaemonArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match args.mode {
            Mode::Load => load_mode(&args).await,
            Mode::Daemon => daemon_mode(&args).await,
            Mode::Runtime => runtime_mode(&args).await,
        }
    })
}

async fn load_mode(args: &DaemonArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.policy)
        .with_context(|| format!("reading {}", args.policy.display()))?;
    let t = Instant::now();
    let p = policy::parse_policy(&args.policy, &text)?;
    let parse_ms = ms(t.elapsed());
    drop(text);
    let t = Instant::now();
    let compiled = policy::compile(&p)?;
    let compile_ms = ms(t.elapsed());
    let trie_entries = compiled.len();
    drop(compiled);
    let set = PolicySet { policies: vec![p] };
    let rss_before_kib = sys::status_kib("VmRSS")?;
    sys::reset_peak_rss()?;
    let opts = options(PolicySource::Fixed(set), &args.audit_log, args.wakeup_bytes);
    let t = Instant::now();
    let handle = daemon::start(opts).await?;
    let start_ms = ms(t.elapsed());
    let peak_kib = sys::status_kib("VmHWM")?;
    handle.shutdown().await?;
    say(&Reply::Load(LoadFigures {
        parse_ms,
        compile_ms,
        start_ms,
        trie_entries,
        rss_before_kib,
        peak_kib,
        peak_delta_kib: peak_kib.saturating_sub(rss_before_kib),
    }))
}

/// A controller with no control socket, logging to `audit_log`, scanning once an hour.
fn options(
    policy: PolicySource,
    audit_log: &std::path::Path,
    wakeup_bytes: Option<u64>,
) -> Options {
    let mut opts = Options::new(policy);
    opts.control_socket = None;
    opts.audit_log = Some(audit_log.to_path_buf());
    // The backstop scan out of the way: the registration test measures the inotify path.
    opts.rescan = Duration::from_secs(3600);
    if let Some(w) = wakeup_bytes {
        opts.wakeup_bytes = w;
    }
    opts
}

/// A controller with the runtime policy (a file), the agent registered, then runtime.rs's
/// measurements.
async fn runtime_mode(args: &DaemonArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.policy)
        .with_context(|| format!("reading {}", args.policy.display()))?;
    let p = policy::parse_policy(&args.policy, &text)?;
    let sub = policy::parse_policy(
        std::path::Path::new("bench-runtime-sub.yaml"),
        &crate::runtime::sub_policy_yaml(
            &crate::runtime::agent_rel(&args.agent)?,
            args.server.context("--server")?,
        ),
    )?;
    let mut opts = options(
        PolicySource::Fixed(PolicySet {
            policies: vec![p, sub],
        }),
        &args.audit_log,
        args.wakeup_bytes,
    );
    // The connect-rate test holds `--grants` live grants of one agent.
    opts.max_grants_per_agent = opts.max_grants_per_agent.max(args.grants);
    let handle = daemon::start(opts).await?;
    let result = async {
        handle.register(&args.agent).await?;
        let params = crate::runtime::Params {
            exe: std::env::current_exe()?,
            agent: args.agent.clone(),
            agent_rel: crate::runtime::agent_rel(&args.agent)?,
            server: args.server.context("--server")?,
            cpu: args.cpu,
            cycles: args.cycles,
            resets: args.resets,
            grants: args.grants,
            tcp_ops: args.tcp_ops,
        };
        crate::runtime::measure(&handle, &params).await
    }
    .await;
    handle.shutdown().await?;
    say(&Reply::Runtime(result?))
}

async fn daemon_mode(args: &DaemonArgs) -> Result<()> {
    let opts = options(
        PolicySource::Path(args.policy.clone()),
        &args.audit_log,
        args.wakeup_bytes,
    );
    let t = Instant::now();
    let handle = daemon::start(opts).await?;
    let start_ms = ms(t.elapsed());
    handle.register(&args.agent).await?;
    let rss_kib = sys::status_kib("VmRSS")?;
    let hwm_kib = sys::status_kib("VmHWM")?;
    // SAFETY: glibc's malloc_trim only returns free heap memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    say(&Reply::Ready(DaemonFigures {
        start_ms,
        rss_kib,
        anon_kib: sys::status_kib("RssAnon")?,
        hwm_kib,
        rss_after_trim_kib: sys::status_kib("VmRSS")?,
        maps: own_maps()?,
    }))?;
    let agent_id = cgroup::cgroup_id(&args.agent)?;
    // Commands, one per line; end of input stops the daemon like "stop".
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("updates"), Some(n)) => {
                let n: usize = n.parse().context("updates N")?;
                let figures =
                    tokio::task::spawn_blocking(move || single_updates(n, agent_id)).await??;
                say(&Reply::Updates(figures))?;
            }
            (Some("registrations"), Some(prefix)) => {
                let mut n = words.map(str::parse::<usize>);
                let (Some(Ok(singles)), Some(Ok(batch))) = (n.next(), n.next()) else {
                    bail!("registrations PREFIX SINGLES BATCH: {line:?}");
                };
                let test = RegTest::new(args, prefix)?;
                let figures =
                    tokio::task::spawn_blocking(move || test.run(singles, batch)).await??;
                say(&Reply::Registrations(figures))?;
            }
            (Some("stop"), _) => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    let c = configs::counters(&handle).await?;
    handle.shutdown().await?;
    let mut follower = AuditFollower::new(args.audit_log.clone());
    follower.poll()?;
    say(&Reply::Stopped(EventCheck {
        decisions: c.decisions(),
        records: follower.records,
        lost_kernel: c.lost,
        lost_records: follower.lost_sum,
        missing: c.decisions().saturating_sub(follower.records + c.lost),
        catch_up_ms_max: 0.0,
    }))
}

/// This process's BPF maps, from /proc/self/fdinfo (memlock) and the kernel's map info (name).
fn own_maps() -> Result<Vec<MapMemory>> {
    let mut seen = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(&fd)) else {
            continue;
        };
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let num = |k: &str| field(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let id = num("map_id") as u32;
        if id == 0 || seen.contains_key(&id) {
            continue;
        }
        let name = MapInfo::from_id(id)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_string))
            .unwrap_or_default();
        seen.insert(
            id,
            MapMemory {
                name,
                map_type: map_type_name(num("map_type")),
                max_entries: num("max_entries"),
                memlock_bytes: num("memlock"),
            },
        );
    }
    ensure!(!seen.is_empty(), "no BPF map fds in /proc/self/fd");
    Ok(seen.into_values().collect())
}

fn map_type_name(t: u64) -> String {
    match t {
        1 => "hash",
        2 => "array",
        6 => "percpu_array",
        11 => "lpm_trie",
        27 => "ringbuf",
        _ => return format!("type {t}"),
    }
    .to_string()
}

/// The id of one of this process's maps, by name.
fn own_map_id(name: &str) -> Result<u32> {
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let entry = entry?;
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if MapInfo::from_id(id)
            .ok()
            .is_some_and(|i| i.name_as_str() == Some(name))
        {
            return Ok(id);
        }
    }
    bail!("this process holds no BPF map named {name}")
}

/// Inserts `n` single /32 entries (198.18.0.0/15, never used by the generated rules) into the
/// live IPv4 trie under the agent's policy, one at a time, timing each; removes them after.
fn single_updates(n: usize, agent_cgroup_id: u64) -> Result<UpdateFigures> {
    let agents: BpfHashMap<MapData, u64, AgentEntry> =
        Map::HashMap(MapData::from_id(own_map_id(names::AGENTS_MAP)?)?).try_into()?;
    let policy_id = agents
        .get(&agent_cgroup_id, 0)
        .context("the agent cgroup is not registered")?
        .policy_id;
    let mut trie: LpmTrie<MapData, PrefixV4, RuleSet> =
        Map::LpmTrie(MapData::from_id(own_map_id(names::RULES_V4_MAP)?)?).try_into()?;
    let trie_entries_before = trie.keys().count();
    let mut rules = RuleSet::EMPTY;
    rules.count = 1;
    rules.rules[0] = PortRule {
        port_lo: 443,
        port_hi: 443,
        protocols: proto::TCP,
        rule_id: 0,
    };
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    ensure!(n < 1 << 17, "at most {} updates", 1 << 17);
    let key = |i: usize| {
        Key::new(
            POLICY_PREFIX_BITS + 32,
            PrefixV4 {
                policy: policy_id.to_be_bytes(),
                addr: (base + i as u32).to_be_bytes(),
            },
        )
    };
    let mut samples_ns = Vec::with_capacity(n);
    let start_ns = sys::mono_ns();
    for i in 0..n {
        let k = key(i);
        let t = Instant::now();
        trie.insert(&k, rules, 0)?;
        samples_ns.push(t.elapsed().as_nanos() as f64);
        // Single updates as a controller makes them, not a batch.
        std::thread::sleep(Duration::from_micros(200));
    }
    let end_ns = sys::mono_ns();
    for i in 0..n {
        trie.remove(&key(i))?;
    }
    Ok(UpdateFigures {
        samples_ns,
        start_ns,
        end_ns,
        trie_entries_before,
    })
}

/// The registration test, run in the daemon child (whose controller holds the agent map).
struct RegTest {
    parent: PathBuf,
    prefix: String,
    agents: BpfHashMap<MapData, u64, AgentEntry>,
    server: SocketAddrV4,
    canary: SocketAddrV4,
    cpu: usize,
}

/// Cgroups the test made, with their ids.
type Cgroups = Vec<(PathBuf, u64)>;

/// How long a cgroup may take to be registered, or its entry to go, before the test fails: far
/// beyond inotify, far below the 1-hour scan the daemon is given.
const REG_DEADLINE: Duration = Duration::from_secs(10);

impl RegTest {
    fn new(args: &DaemonArgs, prefix: &str) -> Result<Self> {
        let agents = Map::HashMap(MapData::from_id(own_map_id(names::AGENTS_MAP)?)?).try_into()?;
        Ok(Self {
            parent: args.reg_parent.clone().context("--reg-parent")?,
            prefix: prefix.to_string(),
            agents,
            server: args.server.context("--server")?,
            canary: args.canary.context("--canary")?,
            cpu: args.cpu,
        })
    }

    fn registered(&self, id: u64) -> bool {
        self.agents
            .get(&id, 0)
            .is_ok_and(|e| e.kind == entry::AGENT)
    }

    fn present(&self, id: u64) -> bool {
        self.agents.get(&id, 0).is_ok()
    }

    /// Polls `done` for each of `ids` until all are true; returns when each one became true.
    /// 50 µs between sweeps: fine enough, without taking a CPU from the controller.
    fn wait_each(
        &self,
        what: &str,
        ids: &[(PathBuf, u64)],
        done: impl Fn(&Self, u64) -> bool,
    ) -> Result<Vec<Instant>> {
        let start = Instant::now();
        let mut seen: Vec<Option<Instant>> = vec![None; ids.len()];
        loop {
            for (i, (_, id)) in ids.iter().enumerate() {
                if seen[i].is_none() && done(self, *id) {
                    seen[i] = Some(Instant::now());
                }
            }
            if seen.iter().all(Option::is_some) {
                return Ok(seen.into_iter().map(|t| t.expect("all seen")).collect());
            }
            if start.elapsed() > REG_DEADLINE {
                let (path, _) = &ids[seen.iter().position(Option::is_none).expect("one left")];
                bail!(
                    "{}: {what} within {} s (the controller's scan is set to 1 hour, so only \
                     its inotify watch can do it)",
                    path.display(),
                    REG_DEADLINE.as_secs()
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Makes the cgroups, in order, each timed from just before its mkdir.
    fn make(&self, names: &[String]) -> Result<(Cgroups, Vec<Instant>)> {
        let mut ids = Vec::with_capacity(names.len());
        let mut t0 = Vec::with_capacity(names.len());
        for n in names {
            let path = self.parent.join(n);
            t0.push(Instant::now());
            std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
            ids.push((path.clone(), cgroup::cgroup_id(&path)?));
        }
        Ok((ids, t0))
    }

    /// Removes the cgroups and times each until its entry is gone from the map.
    fn remove(&self, ids: &[(PathBuf, u64)]) -> Result<Vec<f64>> {
        let mut t0 = Vec::with_capacity(ids.len());
        for (path, _) in ids {
            t0.push(Instant::now());
            remove_cgroup(path)?;
        }
        let gone = self.wait_each("entry not removed after rmdir", ids, |s, id| !s.present(id))?;
        Ok(gone.iter().zip(&t0).map(|(g, t)| ms(*g - *t)).collect())
    }

    /// Proves that a registered cgroup gets its policy's verdict, not the pending fallback
    /// (which would deny the server too): the server is reached, the canary is not.
    fn check_verdict(&self, cgroup: &Path) -> Result<()> {
        let exe = std::env::current_exe()?;
        for (target, expected) in [(self.server, true), (self.canary, false)] {
            let spec = load::Spec {
                kind: LoadKind::Check,
                target,
                proxy: None,
                program: None,
                n: 0,
                warmup: 0,
                until_signal: None,
                cgroup: cgroup.to_path_buf(),
                cpu: self.cpu,
            };
            let r = spec.check(&exe)?;
            ensure!(
                r.allowed == expected,
                "a process in the registered cgroup {} was {} connecting to {target} ({}): \
                 the registration policy {} it",
                cgroup.display(),
                if r.allowed { "allowed" } else { "refused" },
                r.detail,
                if expected { "allows" } else { "does not allow" }
            );
        }
        Ok(())
    }

    fn run(self, singles: usize, batch: usize) -> Result<RegFigures> {
        // SAFETY: sets this thread's timer slack (1 µs), so the 50 µs polls sleep about that.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64) };
        let mut f = RegFigures::default();
        for i in 0..singles {
            let (ids, t0) = self.make(&[format!("{}-s{i}", self.prefix)])?;
            let seen = self.wait_each("not registered", &ids, Self::registered)?;
            f.single_ms.push(ms(seen[0] - t0[0]));
            if i == 0 {
                self.check_verdict(&ids[0].0)?;
            }
            f.removal_ms.extend(self.remove(&ids)?);
        }
        if batch > 0 {
            let names: Vec<String> = (0..batch)
                .map(|i| format!("{}-b{i}", self.prefix))
                .collect();
            let (ids, t0) = self.make(&names)?;
            let seen = self.wait_each("not registered", &ids, Self::registered)?;
            f.batch_ms = seen.iter().zip(&t0).map(|(s, t)| ms(*s - *t)).collect();
            let last = seen.iter().max().expect("batch > 0");
            f.batch_all_ms = ms(*last - t0[0]);
            f.removal_ms.extend(self.remove(&ids)?);
        }
        Ok(f)
    }
}

/// rmdir, retried while the cgroup is still busy (a check process that is exiting).
fn remove_cgroup(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", path.display())),
        }
    }
}

/// The control-plane child's inputs: the 100k-rule policy file (load mode) and the directory
/// the daemon serves (that policy and the registration test's).
#[derive(Debug, Clone)]
pub struct ControlFiles {
    pub policy_file: PathBuf,
    pub policy_dir: PathBuf,
}

/// One repetition of the control-plane measurements, as the bench sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ControlRep {
    pub round: usize,
    pub load: LoadFigures,
    pub daemon: DaemonFigures,
    pub update_p50_us: f64,
    pub update_p99_us: f64,
    pub update_max_us: f64,
    #[serde(skip)]
    pub update_samples_ns: Vec<f64>,
    pub updates: usize,
    pub trie_entries_before: usize,
    /// The TCP loop's time per connection while the updates ran.
    pub tcp_during_updates_ns_per_op: f64,
    pub registration: RegFigures,
    pub events: EventCheck,
}

pub(crate) struct DaemonChild {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl DaemonChild {
    pub(crate) fn spawn(
        ctx: &configs::Ctx,
        mode: &str,
        policy: &Path,
        log: &Path,
        extra: &[String],
    ) -> Result<Self> {
        if cleanup::aborting() {
            bail!("interrupted");
        }
        let mut cmd = Command::new(&ctx.exe);
        cmd.args(["__daemon", "--mode", mode, "--policy"])
            .arg(policy)
            .arg("--agent")
            .arg(&ctx.agent)
            .arg("--audit-log")
            .arg(log);
        if let Some(w) = ctx.wakeup_bytes {
            cmd.arg("--wakeup-bytes").arg(w.to_string());
        }
        cmd.arg("--reg-parent")
            .arg(&ctx.reg_parent)
            .arg("--server")
            .arg(ctx.tcp.to_string())
            .arg("--canary")
            .arg(ctx.canary.to_string())
            .arg("--cpu")
            .arg(ctx.client_cpu.to_string())
            .args(extra);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the control-plane child")?;
        cleanup::add_child(child.id());
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    pub(crate) fn reply(&mut self) -> Result<Reply> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            cleanup::forget_child(self.child.id());
            bail!("the control-plane child exited ({status}) before answering");
        }
        serde_json::from_str(&line).with_context(|| format!("control-plane child said {line:?}"))
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        Ok(())
    }

    pub(crate) fn wait(mut self) -> Result<()> {
        drop(self.stdin);
        let status = self.child.wait()?;
        cleanup::forget_child(self.child.id());
        ensure!(status.success(), "the control-plane child failed: {status}");
        Ok(())
    }
}

/// One repetition: a load child, then a daemon child with the single-update test and the
/// registration test.
pub fn control_rep(
    ctx: &configs::Ctx,
    files: &ControlFiles,
    round: usize,
    plan: &Plan,
) -> Result<ControlRep> {
    let log = ctx.dir.join(format!("audit-control-r{round}.jsonl"));
    let mut loader = DaemonChild::spawn(ctx, "load", &files.policy_file, &log, &[])?;
    let load = match loader.reply()? {
        Reply::Load(l) => l,
        r => bail!("unexpected reply {r:?}"),
    };
    loader.wait()?;
    let _ = std::fs::remove_file(&log);

    let mut d = DaemonChild::spawn(ctx, "daemon", &files.policy_dir, &log, &[])?;
    let daemon = match d.reply()? {
        Reply::Ready(f) => f,
        r => bail!("unexpected reply {r:?}"),
    };
    // The TCP loop runs until the updates are done (SIGUSR1).
    let mut spec = ctx.spec(LoadKind::Tcp, true, ctx.tcp);
    spec.warmup = 200;
    spec.until_signal = Some(60.0);
    let mut tcp = spec.spawn(&ctx.exe)?;
    let mut tcp_out = BufReader::new(tcp.stdout.take().context("stdout")?);
    let mut started = String::new();
    tcp_out.read_line(&mut started)?;
    let result = (|| -> Result<UpdateFigures> {
        ensure!(
            started.contains("started"),
            "the TCP loop did not start: {started:?}"
        );
        d.send(&format!("updates {}", plan.updates))?;
        match d.reply()? {
            Reply::Updates(u) => Ok(u),
            r => bail!("unexpected reply {r:?}"),
        }
    })();
    let pid = tcp.id();
    // SAFETY: our own unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut tcp_out, &mut rest)?;
    let status = tcp.wait()?;
    cleanup::forget_child(pid);
    let upd = result?;
    ensure!(status.success(), "the TCP loop failed: {status}");
    let line = rest
        .lines()
        .last()
        .context("the TCP loop printed nothing")?;
    let tcp_res: load::LoadResult = serde_json::from_str(line)?;
    ensure!(
        upd.start_ns >= tcp_res.start_ns && upd.end_ns <= tcp_res.end_ns,
        "the single updates did not run entirely while the TCP loop ran"
    );
    // The cgroups the child makes, registered here too: the child does not clean up.
    let prefix = format!("agent-r{round}");
    for i in 0..plan.reg_singles {
        cleanup::add_cgroup(ctx.reg_parent.join(format!("{prefix}-s{i}")));
    }
    for i in 0..plan.reg_batch {
        cleanup::add_cgroup(ctx.reg_parent.join(format!("{prefix}-b{i}")));
    }
    d.send(&format!(
        "registrations {prefix} {} {}",
        plan.reg_singles, plan.reg_batch
    ))?;
    let registration = match d.reply()? {
        Reply::Registrations(r) => r,
        r => bail!("unexpected reply {r:?}"),
    };
    d.send("stop")?;
    let events = match d.reply()? {
        Reply::Stopped(e) => e,
        r => bail!("unexpected reply {r:?}"),
    };
    d.wait()?;
    let _ = std::fs::remove_file(&log);
    let us = |p: f64| stats::percentile(&upd.samples_ns, p).unwrap_or(f64::NAN) / 1e3;
    Ok(ControlRep {
        round,
        load,
        daemon,
        update_p50_us: us(50.0),
        update_p99_us: us(99.0),
        update_max_us: us(100.0),
        updates: upd.samples_ns.len(),
        trie_entries_before: upd.trie_entries_before,
        update_samples_ns: upd.samples_ns,
        tcp_during_updates_ns_per_op: tcp_res.ns_per_op(),
        registration,
        events,
    })
}
