//! The configurations compared: what is set up before a round's workloads and removed after.
//! Each one is set up and torn down again in every round, so configurations interleave.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use agentwall::datapath::Counters;
use agentwall::{
    daemon::{self, Handle, Options, PolicySource},
    policy::PolicySet,
};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    cleanup,
    load::{self, Kind as LoadKind},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Nothing attached: the floor every other figure is divided by.
    Floor,
    /// agentwall's controller in this process, enforcing (or auditing) `rules` generated CIDR
    /// rules, every decision written to an audit log file.
    Agentwall { rules: usize, audit: bool },
    /// The same policy as an nftables table: `socket cgroupv2` match, interval set.
    Nft { rules: usize },
    /// tinyproxy as an HTTP CONNECT allowlist; the agent connects through it. With `log`,
    /// tinyproxy logs every connection (LogLevel Connect), and it fsyncs every log line.
    Proxy { log: bool },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub id: String,
    pub label: String,
    pub kind: Kind,
}

pub fn short_count(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

impl Config {
    pub fn new(kind: Kind) -> Config {
        let (id, label) = match kind {
            Kind::Floor => ("floor".to_string(), "floor: nothing attached".to_string()),
            Kind::Agentwall { rules, audit } => {
                let k = short_count(rules);
                if audit {
                    (
                        format!("agentwall-audit-{k}"),
                        format!("agentwall audit mode, {k} rules + log"),
                    )
                } else {
                    (
                        format!("agentwall-enforce-{k}"),
                        format!("agentwall enforcing, {k} rules + log"),
                    )
                }
            }
            Kind::Nft { rules } => {
                let k = short_count(rules);
                (format!("nft-{k}"), format!("nftables cgroupv2, {k} set"))
            }
            Kind::Proxy { log: false } => (
                "tinyproxy".to_string(),
                "tinyproxy CONNECT allowlist".to_string(),
            ),
            Kind::Proxy { log: true } => (
                "tinyproxy-log".to_string(),
                "tinyproxy CONNECT allowlist + connection log".to_string(),
            ),
        };
        Config { id, label, kind }
    }
}

/// What the configurations share.
pub struct Ctx {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub agent: PathBuf,
    pub other: PathBuf,
    /// The parent below which the registration test creates cgroups (`<base>/reg`): a policy
    /// of the control-plane daemon selects `<base>/reg/agent-*`.
    pub reg_parent: PathBuf,
    /// The static exit(0) program of the exec workload (see `tiny`).
    pub exit0: PathBuf,
    pub client_cpu: usize,
    pub server_cpu: usize,
    /// The loopback servers (see `servers`).
    pub tcp: SocketAddrV4,
    pub udp: SocketAddrV4,
    pub canary: SocketAddrV4,
    /// By (rules, audit).
    pub policies: HashMap<(usize, bool), PolicySet>,
    /// By rule count: the ruleset file for `nft -f`.
    pub nft_files: HashMap<usize, PathBuf>,
    pub nft_table: String,
    /// tinyproxy configuration without and with connection logging.
    pub proxy_conf: [PathBuf; 2],
    pub proxy_log: PathBuf,
    pub proxy_port: u16,
    /// Overrides the controller's ring-buffer wake-up threshold (`Options::wakeup_bytes`).
    pub wakeup_bytes: Option<u64>,
}

impl Ctx {
    pub fn spec(&self, kind: LoadKind, agent: bool, target: SocketAddrV4) -> load::Spec {
        load::Spec {
            kind,
            target,
            proxy: None,
            program: None,
            n: 0,
            warmup: 0,
            until_signal: None,
            cgroup: if agent {
                self.agent.clone()
            } else {
                self.other.clone()
            },
            cpu: self.client_cpu,
        }
    }

    pub fn proxy_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.proxy_port)
    }
}

/// A configuration while it is set up.
pub enum Active {
    Floor,
    Agentwall {
        handle: Box<Handle>,
        follower: AuditFollower,
    },
    Nft,
    Proxy {
        child: Child,
    },
}

/// Set-up figures of one configuration in one round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SetupInfo {
    /// Time to set the configuration up (controller start + register; nft -f; proxy start).
    pub setup_ms: f64,
    /// cgroup socket and tracing programs (such as another agentwall's exec tracking) loaded
    /// by others while the floor was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreign_cgroup_programs: Option<usize>,
}

/// The event accounting of one agentwall configuration in one round.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventCheck {
    /// Decisions the kernel counted (allowed + denied + audited).
    pub decisions: u64,
    /// Decision records in the audit log.
    pub records: u64,
    /// Events the kernel could not queue (its `lost` counter).
    pub lost_kernel: u64,
    /// Sum of the `lost` records in the audit log.
    pub lost_records: u64,
    /// Decisions neither written nor counted as lost.
    pub missing: u64,
    /// Longest wait, after a workload ended, until its last record was in the audit log.
    pub catch_up_ms_max: f64,
}

impl EventCheck {
    pub fn lost(&self) -> u64 {
        self.lost_kernel.max(self.lost_records) + self.missing
    }
}

/// Reads an audit log as it grows and counts its records.
pub struct AuditFollower {
    pub path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
    pub records: u64,
    pub lost_records: u64,
    pub lost_sum: u64,
    pub catch_up_ms_max: f64,
}

impl AuditFollower {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: None,
            partial: Vec::new(),
            records: 0,
            lost_records: 0,
            lost_sum: 0,
            catch_up_ms_max: 0.0,
        }
    }

    pub fn poll(&mut self) -> Result<()> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e).context(format!("opening {}", self.path.display())),
            }
        }
        let f = self.file.as_mut().expect("opened above");
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .with_context(|| format!("reading {}", self.path.display()))?;
        self.partial.extend_from_slice(&buf);
        let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.partial.drain(..=last_nl).collect();
        for line in complete.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if contains(line, br#""kind":"lost""#) {
                self.lost_records += 1;
                let v: serde_json::Value =
                    serde_json::from_slice(line).context("a lost record in the audit log")?;
                self.lost_sum += v["lost"].as_u64().unwrap_or(0);
            } else {
                self.records += 1;
            }
        }
        Ok(())
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The controller's counters, as `agentwall status` shows them.
pub async fn counters(handle: &Handle) -> Result<Counters> {
    let v = handle.status().await?;
    Ok(serde_json::from_value(v["counters"].clone())?)
}

/// Waits until every decision the kernel counted is in the audit log or counted as lost.
pub async fn settle(handle: &Handle, follower: &mut AuditFollower) -> Result<Counters> {
    let start = Instant::now();
    loop {
        let c = counters(handle).await?;
        follower.poll()?;
        if follower.records + c.lost >= c.decisions() {
            let ms = start.elapsed().as_secs_f64() * 1e3;
            follower.catch_up_ms_max = follower.catch_up_ms_max.max(ms);
            return Ok(c);
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "the audit log {} has {} records after 120 s, but the kernel counted {} \
                 decisions and {} lost: the event pipeline is stuck",
                follower.path.display(),
                follower.records,
                c.decisions(),
                c.lost
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts cgroup socket and tracing programs loaded on the machine (ours are all unloaded at
/// this point), waiting up to 1 s for ours to go.
fn foreign_cgroup_programs() -> usize {
    // BPF_PROG_TYPE_CGROUP_SKB, _SOCK, _SOCK_ADDR, _SOCKOPT; _TRACING (tp_btf, fentry).
    const TYPES: [u32; 5] = [8, 9, 18, 25, 26];
    let count = || {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| TYPES.contains(&(p.program_type() as u32)))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let n = count();
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_nft(file: &Path) -> Result<()> {
    let out = Command::new("nft")
        .arg("-f")
        .arg(file)
        .output()
        .context("running nft (Debian package nftables; `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "nft -f {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn start_proxy(ctx: &Ctx, log: bool) -> Result<Child> {
    let cpu = ctx.server_cpu;
    let mut cmd = Command::new("tinyproxy");
    cmd.arg("-d")
        .arg("-c")
        .arg(&ctx.proxy_conf[usize::from(log)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only sched_setaffinity (async-signal-safe) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context(
        "starting tinyproxy (Debian package tinyproxy-bin; `cargo xtask setup` installs it)",
    )?;
    cleanup::add_child(child.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait()? {
            cleanup::forget_child(child.id());
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let log = std::fs::read_to_string(&ctx.proxy_log).unwrap_or_default();
            bail!(
                "tinyproxy exited at start ({status}): {}\n{}",
                err.trim(),
                log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
            );
        }
        if TcpStream::connect_timeout(&ctx.proxy_addr().into(), Duration::from_millis(100)).is_ok()
        {
            return Ok(child);
        }
        if Instant::now() > deadline {
            stop_proxy(child);
            bail!(
                "tinyproxy did not listen on {} within 5 s",
                ctx.proxy_addr()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM by pid, then SIGKILL after 3 s.
fn stop_proxy(mut child: Child) {
    let pid = child.id();
    // SAFETY: our own unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            cleanup::forget_child(pid);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    cleanup::forget_child(pid);
}

pub async fn setup(cfg: &Config, ctx: &Ctx, round: usize) -> Result<(Active, SetupInfo)> {
    let start = Instant::now();
    let mut info = SetupInfo::default();
    let active = match cfg.kind {
        Kind::Floor => {
            info.foreign_cgroup_programs =
                Some(tokio::task::spawn_blocking(foreign_cgroup_programs).await?);
            Active::Floor
        }
        Kind::Agentwall { rules, audit } => {
            let set = ctx
                .policies
                .get(&(rules, audit))
                .context("policy not generated")?
                .clone();
            let log = ctx.dir.join(format!("audit-{}-r{round}.jsonl", cfg.id));
            let mut opts = Options::new(PolicySource::Fixed(set));
            opts.control_socket = None;
            opts.audit_log = Some(log.clone());
            if let Some(w) = ctx.wakeup_bytes {
                opts.wakeup_bytes = w;
            }
            let handle = daemon::start(opts)
                .await
                .context("starting the in-process agentwall controller")?;
            handle
                .register(&ctx.agent)
                .await
                .context("registering the bench's agent cgroup")?;
            Active::Agentwall {
                handle: Box::new(handle),
                follower: AuditFollower::new(log),
            }
        }
        Kind::Nft { rules } => {
            let file = ctx
                .nft_files
                .get(&rules)
                .context("nft rules not generated")?;
            cleanup::add_nft_table(&ctx.nft_table);
            let file = file.clone();
            tokio::task::spawn_blocking(move || run_nft(&file)).await??;
            Active::Nft
        }
        Kind::Proxy { log } => {
            let child = tokio::task::block_in_place(|| start_proxy(ctx, log))?;
            Active::Proxy { child }
        }
    };
    info.setup_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok((active, info))
}

/// Proves the configuration does what it claims before it is measured: the agent may not reach
/// the canary (a listener no policy allows) when something enforces, a non-agent always may.
pub async fn check(cfg: &Config, ctx: &Ctx) -> Result<()> {
    let (agent_expected, how) = match cfg.kind {
        Kind::Floor => (true, "nothing enforces"),
        Kind::Agentwall { audit: true, .. } => (true, "audit mode records but never blocks"),
        Kind::Agentwall { audit: false, .. } => (false, "agentwall enforces"),
        Kind::Nft { .. } => (false, "the nftables table enforces"),
        Kind::Proxy { .. } => (false, "tinyproxy allows only the server's port"),
    };
    let canary = ctx.canary;
    let mut agent = ctx.spec(LoadKind::Check, true, canary);
    let mut other = ctx.spec(LoadKind::Check, false, canary);
    let proxy = matches!(cfg.kind, Kind::Proxy { .. });
    if proxy {
        agent.proxy = Some(ctx.proxy_addr());
        other.proxy = Some(ctx.proxy_addr());
    }
    let exe = ctx.exe.clone();
    let (a, o) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((agent.check(&exe)?, other.check(&exe)?))
    })
    .await??;
    ensure!(
        a.allowed == agent_expected,
        "{}: an agent's connection to the canary {canary} was {} ({}), but {how}: the \
         configuration is not what it claims, refusing to measure it",
        cfg.label,
        if a.allowed { "allowed" } else { "refused" },
        a.detail
    );
    if !proxy {
        ensure!(
            o.allowed,
            "{}: a process that is not an agent could not reach the canary {canary} ({})",
            cfg.label,
            o.detail
        );
    }
    Ok(())
}

/// What the teardown reports.
pub enum Teardown {
    None,
    Events(EventCheck),
}

pub async fn teardown(active: Active, ctx: &Ctx) -> Result<Teardown> {
    match active {
        Active::Floor => Ok(Teardown::None),
        Active::Agentwall {
            handle,
            mut follower,
        } => {
            let settled = settle(&handle, &mut follower).await;
            let shut = (*handle).shutdown().await;
            let c = settled?;
            shut.context("stopping the in-process controller")?;
            follower.poll()?;
            let written = follower.records;
            let check = EventCheck {
                decisions: c.decisions(),
                records: written,
                lost_kernel: c.lost,
                lost_records: follower.lost_sum,
                missing: c.decisions().saturating_sub(written + c.lost),
                catch_up_ms_max: follower.catch_up_ms_max,
            };
            let _ = std::fs::remove_file(&follower.path);
            Ok(Teardown::Events(check))
        }
        Active::Nft => {
            let table = ctx.nft_table.clone();
            tokio::task::spawn_blocking(move || cleanup::delete_nft_table(&table)).await??;
            Ok(Teardown::None)
        }
        Active::Proxy { child } => {
            tokio::task::spawn_blocking(move || stop_proxy(child)).await?;
            let _ = std::fs::remove_file(&ctx.proxy_log);
            Ok(Teardown::None)
        }
    }
}
