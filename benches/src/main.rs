//! agentwall-bench: agentwall measured against what a user would pick instead, the same way
//! every time, in one run on one machine. `cargo xtask bench` builds and runs it as root.
//!
//! Method (docs/benchmarks.md has the long form): the configurations (nothing attached,
//! agentwall enforcing with 1,000 and 100,000 rules and logging every decision, agentwall in
//! audit mode, the same policy in nftables with `socket cgroupv2` matching, a tinyproxy CONNECT
//! allowlist) are set up and torn down in turn within every round, over at least 4 rounds. Each
//! workload is a child process that joins the agent cgroup (or a cgroup that is not an agent),
//! pins itself to one CPU while the loopback servers run on the other, and times a loop of
//! operations (network operations, a syscall, or fork+exec+wait of a tiny static program).
//! Figures are medians over the rounds with min and max; comparisons are ratios to the floor of
//! the same round. Each round ends with the control-plane measurements in separate processes
//! (`daemon`): loading, memory, single trie updates, and how soon new cgroups that a policy
//! selects are registered; then runtime control (`runtime`): grant and revoke latency as the
//! kernel decides, revoke to reset of a live connection, and the connect rate with 1,000 live
//! grants. After the rounds, the DNS proxy's rows (`dns`): lookup latency against the upstream
//! asked directly, the proxy's time split, saturation, and a controller restart under load.

mod cleanup;
mod configs;
mod daemon;
mod dns;
mod load;
mod report;
mod rules;
mod runtime;
mod servers;
mod stats;
mod sys;
mod tiny;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agentwall::{identity::cgroup, policy};
use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use configs::{Active, Config, Ctx, Kind, Teardown};
use load::Kind as LoadKind;
use report::{EventRecord, Plan, Raw, Sample, SetupRecord};

#[derive(Parser)]
#[command(
    name = "agentwall-bench",
    about = "agentwall benchmarks against nothing, nftables and an HTTP CONNECT proxy (root)"
)]
struct Cli {
    #[command(subcommand)]
    internal: Option<Internal>,
    /// A short run (under a minute): fewer operations per run, still 4 rounds.
    #[arg(long)]
    quick: bool,
    /// Rounds (at least 4).
    #[arg(long)]
    rounds: Option<usize>,
    /// Before each round, wait up to this long for other processes to go quiet (default 30,
    /// 0 with --quick).
    #[arg(long)]
    idle_wait: Option<f64>,
    /// Override the controller's ring-buffer wake-up threshold in bytes (`Options::wakeup_bytes`;
    /// default: the controller's own), to compare event-delivery strategies.
    #[arg(long)]
    wakeup_bytes: Option<u64>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/latest.json")]
    json: PathBuf,
    /// Run only these rows (`runtime`: the floor's TCP row and the runtime-control rows;
    /// `dns`: the DNS proxy's rows).
    #[arg(long, value_enum)]
    only: Option<Only>,
}

/// A subset of the rows (`--only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Only {
    /// Grant and revoke latency, revoke to reset, the connect rate with live grants, and the
    /// floor's TCP connect that rate is compared with.
    Runtime,
    /// The DNS proxy: lookup latency against the upstream asked directly, the proxy's time
    /// split, queries/s at saturation, and queries failed across a controller restart.
    Dns,
}

#[derive(Subcommand)]
enum Internal {
    #[command(name = "__load", hide = true)]
    Load(load::LoadArgs),
    #[command(name = "__daemon", hide = true)]
    Daemon(daemon::DaemonArgs),
    #[command(name = "__dnsload", hide = true)]
    DnsLoad(dns::LoadArgs),
}

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    TcpAgent,
    UdpAgent,
    UdpcAgent,
    TcpOther,
    UdpOther,
    SyscallOther,
    ExecOther,
    TcpProxy,
}

const _: () = assert!(matches!(
    Workload::ALL[Workload::ALL.len() - 1],
    Workload::TcpProxy
));

impl Workload {
    /// Every workload, the proxy's last (`for_config` relies on that).
    pub const ALL: [Workload; 8] = [
        Workload::TcpAgent,
        Workload::UdpAgent,
        Workload::UdpcAgent,
        Workload::TcpOther,
        Workload::UdpOther,
        Workload::SyscallOther,
        Workload::ExecOther,
        Workload::TcpProxy,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            Workload::TcpAgent => "TCP connect+close, agent",
            Workload::UdpAgent => "UDP sendto (unconnected), agent",
            Workload::UdpcAgent => "UDP send (connected), agent",
            Workload::TcpOther => "TCP connect+close, not an agent",
            Workload::UdpOther => "UDP sendto, not an agent",
            Workload::SyscallOther => "getppid() syscall, not an agent",
            Workload::ExecOther => "fork+exec+wait of a static exit(0), not an agent",
            Workload::TcpProxy => "TCP connect through the proxy, agent",
        }
    }

    /// The floor workload this one is compared with.
    pub fn floor(&self) -> Workload {
        match self {
            Workload::TcpProxy => Workload::TcpAgent,
            w => *w,
        }
    }

    fn for_config(kind: Kind) -> &'static [Workload] {
        let (direct, proxy) = Self::ALL.split_at(Self::ALL.len() - 1);
        match kind {
            Kind::Proxy { .. } => proxy,
            _ => direct,
        }
    }

    fn spec(&self, ctx: &Ctx, plan: &Plan, config: Kind) -> load::Spec {
        let (kind, agent, target, n) = match self {
            Workload::TcpAgent => (LoadKind::Tcp, true, ctx.tcp, plan.tcp_ops),
            Workload::UdpAgent => (LoadKind::Udp, true, ctx.udp, plan.udp_ops),
            Workload::UdpcAgent => (LoadKind::Udpc, true, ctx.udp, plan.udp_ops),
            Workload::TcpOther => (LoadKind::Tcp, false, ctx.tcp, plan.tcp_ops),
            Workload::UdpOther => (LoadKind::Udp, false, ctx.udp, plan.udp_ops),
            Workload::SyscallOther => (LoadKind::Syscall, false, ctx.udp, plan.syscall_ops),
            Workload::ExecOther => (LoadKind::Exec, false, ctx.udp, plan.exec_ops),
            Workload::TcpProxy => {
                // tinyproxy fsyncs each log line: with its log on, 1/20 of the connections.
                let n = if config == (Kind::Proxy { log: true }) {
                    (plan.proxy_ops / 20).max(10)
                } else {
                    plan.proxy_ops
                };
                (LoadKind::Proxy, true, ctx.tcp, n)
            }
        };
        let mut s = ctx.spec(kind, agent, target);
        s.n = n;
        s.warmup = (n / plan.warmup_divisor).max(10);
        if *self == Workload::TcpProxy {
            s.proxy = Some(ctx.proxy_addr());
        }
        if *self == Workload::ExecOther {
            s.program = Some(ctx.exit0.clone());
        }
        s
    }
}

fn main() -> ExitCode {
    // Started as `agentwall` (dns.rs's restart row): the agentwall binary's main, whole.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new("agentwall")) {
        return agentwall::cli::main();
    }
    let cli = Cli::parse();
    let result = match cli.internal {
        Some(Internal::Load(a)) => load::main(a),
        Some(Internal::DnsLoad(a)) => dns::load_main(a),
        Some(Internal::Daemon(a)) => {
            init_tracing();
            daemon::child_main(a)
        }
        None => {
            init_tracing();
            tokio::runtime::Runtime::new()
                .context("starting the tokio runtime")
                .and_then(|rt| {
                    rt.block_on(bench(
                        cli.quick,
                        cli.rounds,
                        cli.idle_wait,
                        cli.wakeup_bytes,
                        cli.json,
                        cli.only,
                    ))
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentwall-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Warnings of the controller (lost events, above all) go to stderr.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
}

/// Other processes' CPU use above this share of one CPU marks a round as disturbed.
pub const FOREIGN_CPU_WARN: f64 = 0.05;

fn plan(
    quick: bool,
    rounds: Option<usize>,
    idle_wait: Option<f64>,
    only: Option<Only>,
) -> Result<Plan> {
    let rounds = rounds.unwrap_or(if quick { 4 } else { 8 });
    ensure!(rounds >= 4, "at least 4 rounds (got {rounds})");
    let idle_wait_s = idle_wait.unwrap_or(if quick { 0.0 } else { 30.0 });
    Ok(if quick {
        Plan {
            quick,
            only,
            rounds,
            tcp_ops: 2_000,
            udp_ops: 15_000,
            syscall_ops: 300_000,
            exec_ops: 3_000,
            proxy_ops: 300,
            warmup_divisor: 10,
            quiesce_ms: 50,
            idle_wait_s,
            wakeup_bytes: 0,
            updates: 250,
            reg_singles: 10,
            reg_batch: 100,
            small_rules: 1_000,
            large_rules: 100_000,
            grant_cycles: 50,
            reset_samples: 20,
            live_grants: 1_000,
        }
    } else {
        Plan {
            quick,
            only,
            rounds,
            tcp_ops: 20_000,
            udp_ops: 200_000,
            syscall_ops: 3_000_000,
            exec_ops: 10_000,
            proxy_ops: 2_000,
            warmup_divisor: 20,
            quiesce_ms: 250,
            idle_wait_s,
            wakeup_bytes: 0,
            updates: 2_000,
            reg_singles: 25,
            reg_batch: 100,
            small_rules: 1_000,
            large_rules: 100_000,
            grant_cycles: 200,
            reset_samples: 50,
            live_grants: 1_000,
        }
    })
}

/// nft resolves `socket cgroupv2` paths relative to /sys/fs/cgroup.
fn nft_cgroup_path(abs: &Path) -> Result<String> {
    let rel = abs.strip_prefix("/sys/fs/cgroup").with_context(|| {
        format!(
            "nftables resolves `socket cgroupv2` paths below /sys/fs/cgroup, but the agent \
             cgroup is {}: the nftables configuration cannot run on this machine",
            abs.display()
        )
    })?;
    Ok(rel.to_string_lossy().into_owned())
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(l.local_addr()?.port())
}

fn need(cmd: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
                .any(|d| d.join(cmd).is_file())
        })
        .unwrap_or(false);
    ensure!(
        found,
        "`{cmd}` is missing (Debian package {package}): run `cargo xtask setup` as root, or \
         `cargo xtask bench`, which runs it first"
    );
    Ok(())
}

async fn bench(
    quick: bool,
    rounds: Option<usize>,
    idle_wait: Option<f64>,
    wakeup_bytes: Option<u64>,
    json: PathBuf,
    only: Option<Only>,
) -> Result<()> {
    sys::require_root()?;
    if only.is_none() {
        need("nft", "nftables")?;
        need("tinyproxy", "tinyproxy-bin")?;
    }
    let mut plan = plan(quick, rounds, idle_wait, only)?;
    plan.wakeup_bytes = wakeup_bytes.unwrap_or(agentwall::datapath::DEFAULT_WAKEUP_BYTES);
    let _guard = cleanup::Guard;
    cleanup::install_signal_handlers()?;
    let t0 = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let machine = sys::Machine::probe();
    let cpus = sys::allowed_cpus()?;
    ensure!(
        cpus.len() >= 2,
        "the bench pins client and server to different CPUs and needs 2; this process may use {cpus:?}"
    );
    let (client_cpu, server_cpu) = (cpus[0], cpus[1]);

    // Cgroups and the temp dir, registered for cleanup before anything goes in them.
    let pid = std::process::id();
    let root = cgroup::cgroup2_mount()?;
    let base = root.join(format!("agentwall-bench-{pid}"));
    let agent = base.join("agent");
    let other = base.join("other");
    let reg_parent = base.join("reg");
    for cg in [&base, &agent, &other, &reg_parent] {
        cleanup::add_cgroup(cg.clone());
        cgroup::create(cg)?;
    }
    let dir = std::env::temp_dir().join(format!("agentwall-bench-{pid}"));
    cleanup::add_dir(dir.clone());
    std::fs::create_dir_all(&dir)?;
    let exit0 = tiny::write(&dir)?;

    let servers = servers::Servers::start(server_cpu)?;
    let ports = [servers.tcp.port(), servers.udp.port()];
    let agent_rel = cgroup::relative(&root, &agent)?;
    let level = cgroup::level(&agent_rel);
    let nft_path = nft_cgroup_path(&agent)?;
    let nft_table = format!("agentwall_bench_{pid}");

    eprintln!("agentwall-bench: generating the policies");
    let mut policies = HashMap::new();
    let mut nft_files = HashMap::new();
    let mut large_policy_file = PathBuf::new();
    // `--only runtime` runs none of the rule configurations: no rule policies to generate.
    let sizes = match only {
        None => vec![plan.small_rules, plan.large_rules],
        Some(Only::Runtime | Only::Dns) => Vec::new(),
    };
    for n in sizes {
        let cidrs = rules::cidrs(n);
        let name = format!("bench-{}", configs::short_count(n));
        let yaml = rules::policy_yaml(&name, false, &agent_rel, &cidrs, ports);
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &yaml)?;
        let p = policy::parse_policy(&file, &yaml)?;
        ensure!(
            p.rules.len() == n + 1,
            "policy {name}: {} rules",
            p.rules.len()
        );
        if n == plan.large_rules {
            large_policy_file = file;
            // Audit mode: the same policy, only the mode differs.
            let mut audit = p.clone();
            audit.mode = policy::Mode::Audit;
            policies.insert(
                (n, true),
                policy::PolicySet {
                    policies: vec![audit],
                },
            );
        }
        policies.insert((n, false), policy::PolicySet { policies: vec![p] });
        let nft = rules::nft_ruleset(&nft_table, &nft_path, level, &cidrs, ports);
        let file = dir.join(format!("nft-{}.nft", configs::short_count(n)));
        std::fs::write(&file, nft)?;
        nft_files.insert(n, file);
    }

    // The control-plane daemon serves a directory: the large policy and one that selects the
    // registration test's cgroups (`<base>/reg/agent-*`), from inotify alone.
    let daemon_policies = dir.join("daemon-policies");
    std::fs::create_dir_all(&daemon_policies)?;
    if only.is_none() {
        std::fs::copy(
            &large_policy_file,
            daemon_policies.join(large_policy_file.file_name().context("policy file name")?),
        )?;
    }
    let reg_rel = cgroup::relative(&root, &reg_parent)?;
    let reg_yaml = rules::registration_policy_yaml(&reg_rel, ports);
    let reg_file = daemon_policies.join("bench-reg.yaml");
    std::fs::write(&reg_file, &reg_yaml)?;
    policy::parse_policy(&reg_file, &reg_yaml)?;
    let control_files = daemon::ControlFiles {
        policy_file: large_policy_file.clone(),
        policy_dir: daemon_policies,
    };

    let proxy_port = free_port()?;
    let proxy_log = dir.join("tinyproxy.log");
    let filter = dir.join("tinyproxy.filter");
    std::fs::write(&filter, "^127\\.0\\.0\\.1$\n")?;
    let proxy_conf = [false, true].map(|log| dir.join(format!("tinyproxy-log-{log}.conf")));
    for (file, level) in proxy_conf.iter().zip(["Critical", "Connect"]) {
        std::fs::write(
            file,
            format!(
                "Port {proxy_port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 1024\n\
                 Allow 127.0.0.1\nConnectPort {}\nFilter \"{}\"\nFilterExtended Yes\n\
                 FilterDefaultDeny Yes\nLogFile \"{}\"\nLogLevel {level}\n",
                servers.tcp.port(),
                filter.display(),
                proxy_log.display()
            ),
        )?;
    }

    let ctx = Arc::new(Ctx {
        exe: std::env::current_exe()?,
        dir: dir.clone(),
        agent: agent.clone(),
        other,
        reg_parent,
        exit0,
        client_cpu,
        server_cpu,
        tcp: servers.tcp,
        udp: servers.udp,
        canary: servers.canary,
        policies,
        nft_files,
        nft_table,
        proxy_conf,
        proxy_log,
        proxy_port,
        wakeup_bytes,
    });

    let configs: Vec<Config> = [
        Kind::Floor,
        Kind::Agentwall {
            rules: plan.small_rules,
            audit: false,
        },
        Kind::Agentwall {
            rules: plan.large_rules,
            audit: false,
        },
        Kind::Agentwall {
            rules: plan.large_rules,
            audit: true,
        },
        Kind::Nft {
            rules: plan.small_rules,
        },
        Kind::Nft {
            rules: plan.large_rules,
        },
        Kind::Proxy { log: false },
        Kind::Proxy { log: true },
    ]
    .into_iter()
    // `--only runtime`: the floor alone, for the connect-rate comparison.
    .filter(|k| only.is_none() || *k == Kind::Floor)
    .map(Config::new)
    .collect();

    println!("agentwall-bench: {}", machine.line());
    if only == Some(Only::Dns) {
        println!(
            "agentwall-bench: the DNS proxy rows only; clients on CPU {client_cpu}, upstream and \
             controller on CPU {server_cpu}; cgroups under {}",
            base.display()
        );
    } else {
        println!(
            "agentwall-bench: {} rounds of {} configurations; client on CPU {client_cpu}, servers \
             on CPU {server_cpu}; cgroups under {}",
            plan.rounds,
            configs.len(),
            base.display()
        );
    }

    if only == Some(Only::Dns) {
        let d = dns_rows(&ctx, &plan).await?;
        servers.stop();
        let mut o = String::new();
        o.push_str(&format!(
            "agentwall bench ({}), DNS rows\nmachine: {}\ncommand: cargo xtask bench{} --only dns\n\n",
            if quick { "quick" } else { "full" },
            machine.line(),
            if quick { " --quick" } else { "" }
        ));
        o.push_str(&d.render());
        o.push_str("\n| goal | target | measured | result |\n|---|---|---|---|\n");
        for g in d.goals() {
            o.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                g.goal,
                g.target,
                g.measured,
                if g.pass { "PASS" } else { "MISS" }
            ));
        }
        o.push_str(&format!(
            "\nRan in {:.0} s. MISS marks a goal not met in this run, it does not fail the bench.\n",
            t0.elapsed().as_secs_f64()
        ));
        println!();
        print!("{o}");
        if let Some(parent) = json.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let out = serde_json::json!({
            "schema": 1,
            "command": format!("cargo xtask bench{} --only dns", if quick { " --quick" } else { "" }),
            "started_unix": started_unix,
            "machine": machine,
            "dns": d,
            "goals": d.goals(),
        });
        std::fs::write(&json, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", json.display()))?;
        println!("JSON: {}", json.display());
        cleanup::run_all();
        return Ok(());
    }

    let mut samples = Vec::new();
    let mut setups = Vec::new();
    let mut events = Vec::new();
    let mut control = Vec::new();
    let mut runtime_reps = Vec::new();
    let mut rounds = Vec::new();
    let quiesce = Duration::from_millis(plan.quiesce_ms);
    for round in 0..plan.rounds {
        let idle_wait_s = wait_for_idle(plan.idle_wait_s).await;
        let rt = Instant::now();
        let foreign0 = sys::foreign_cpu_s();
        for cfg in &configs {
            let (mut active, info) = configs::setup(cfg, &ctx, round)
                .await
                .with_context(|| format!("setting up {}", cfg.label))?;
            // Let what the set-up (or the last teardown) left to the kernel finish first.
            tokio::time::sleep(quiesce).await;
            if let Some(n) = info.foreign_cgroup_programs.filter(|&n| n > 0) {
                eprintln!(
                    "agentwall-bench: warning: {n} cgroup socket or tracing programs of others \
                     are loaded while the floor is measured (another agentwall or test run?): every \
                     figure of this round may be off"
                );
            }
            setups.push(SetupRecord {
                config: cfg.id.clone(),
                round,
                info,
            });
            let measured = measure(cfg, &ctx, &plan, &mut active, round).await;
            let td = configs::teardown(active, &ctx).await;
            let measured = measured.with_context(|| format!("measuring {}", cfg.label))?;
            match td.with_context(|| format!("tearing down {}", cfg.label))? {
                Teardown::Events(check) => events.push(EventRecord {
                    config: cfg.id.clone(),
                    round,
                    check,
                }),
                Teardown::None => {}
            }
            samples.extend(measured);
            tokio::time::sleep(quiesce).await;
        }
        if only.is_none() {
            let c = ctx.clone();
            let p = plan.clone();
            let files = control_files.clone();
            let rep =
                tokio::task::spawn_blocking(move || daemon::control_rep(&c, &files, round, &p))
                    .await?
                    .context("control-plane measurements")?;
            control.push(rep);
        }
        let c = ctx.clone();
        let p = plan.clone();
        let rep = tokio::task::spawn_blocking(move || runtime::runtime_rep(&c, round, &p))
            .await?
            .context("runtime-control measurements")?;
        runtime_reps.push(rep);
        let wall_s = rt.elapsed().as_secs_f64();
        let foreign_cpu_s = (sys::foreign_cpu_s() - foreign0).max(0.0);
        eprintln!(
            "agentwall-bench: round {}/{} done in {wall_s:.1} s",
            round + 1,
            plan.rounds,
        );
        if foreign_cpu_s > FOREIGN_CPU_WARN * wall_s {
            eprintln!(
                "agentwall-bench: warning: other processes used {foreign_cpu_s:.1} CPU-seconds \
                 during this round ({:.0} % of one CPU): the figures of this round are disturbed",
                100.0 * foreign_cpu_s / wall_s
            );
        }
        rounds.push(report::RoundInfo {
            round,
            wall_s,
            foreign_cpu_s,
            idle_wait_s,
        });
    }
    let dns = match only {
        None => Some(dns_rows(&ctx, &plan).await?),
        Some(_) => None,
    };
    servers.stop();

    let mut mode = if quick { " --quick" } else { "" }.to_string();
    if let Some(w) = wakeup_bytes {
        mode.push_str(&format!(" -- --wakeup-bytes {w}"));
    }
    if only == Some(Only::Runtime) {
        mode.push_str(" --only runtime");
    }
    let raw = Raw {
        machine,
        plan,
        configs,
        samples,
        setups,
        events,
        control,
        runtime: runtime_reps,
        rounds,
        dns,
        started_unix,
        duration_s: t0.elapsed().as_secs_f64(),
        command: format!("cargo xtask bench{mode}"),
    };
    let report = raw.report();
    println!();
    print!("{}", report.render());
    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("JSON: {}", json.display());
    cleanup::run_all();
    Ok(())
}

/// The DNS proxy's rows (dns.rs), once per run after the rounds.
async fn dns_rows(ctx: &Arc<Ctx>, plan: &Plan) -> Result<dns::DnsSummary> {
    eprintln!("agentwall-bench: the DNS proxy rows");
    let _ = wait_for_idle(plan.idle_wait_s).await;
    dns::measure(ctx, plan).await.context("the DNS proxy rows")
}

/// Waits until other processes use less than FOREIGN_CPU_WARN of one CPU over a second, for at
/// most `max_s`; returns how long it waited.
async fn wait_for_idle(max_s: f64) -> f64 {
    let start = Instant::now();
    let mut said = false;
    while start.elapsed().as_secs_f64() < max_s {
        let before = sys::foreign_cpu_s();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if sys::foreign_cpu_s() - before < FOREIGN_CPU_WARN {
            break;
        }
        if !said {
            eprintln!(
                "agentwall-bench: other processes are busy; waiting up to {max_s:.0} s for \
                 them to go quiet before the round"
            );
            said = true;
        }
    }
    start.elapsed().as_secs_f64()
}

/// The loopback servers' threads, left out of the controller's CPU time.
const SERVER_THREADS: &[&str] = &["tcp-server", "udp-server"];

/// One configuration in one round: the checks, then every workload.
async fn measure(
    cfg: &Config,
    ctx: &Arc<Ctx>,
    plan: &Plan,
    active: &mut Active,
    round: usize,
) -> Result<Vec<Sample>> {
    configs::check(cfg, ctx).await?;
    let mut out = Vec::new();
    for &w in Workload::for_config(cfg.kind)
        .iter()
        .filter(|w| plan.only.is_none() || **w == Workload::TcpAgent)
    {
        let spec = w.spec(ctx, plan, cfg.kind);
        let exe = ctx.exe.clone();
        let before = match active {
            Active::Agentwall { handle, .. } => Some((
                sys::own_cpu_ns_except(SERVER_THREADS),
                configs::counters(handle).await?.decisions(),
            )),
            _ => None,
        };
        let r = tokio::task::spawn_blocking(move || spec.run(&exe))
            .await?
            .with_context(|| w.label())?;
        if r.ops == 0 {
            bail!("{}: no operations ran", w.label());
        }
        let mut sample = Sample {
            config: cfg.id.clone(),
            workload: w,
            round,
            ops: r.ops,
            ns: r.ns,
            controller_cpu_ns: None,
            decisions: None,
        };
        if let Active::Agentwall { handle, follower } = active {
            let (cpu0, d0) = before.expect("read above");
            sample.controller_cpu_ns = Some(sys::own_cpu_ns_except(SERVER_THREADS) - cpu0);
            sample.decisions = Some(configs::counters(handle).await?.decisions() - d0);
            let c = configs::settle(handle, follower).await?;
            if w == Workload::TcpAgent || w == Workload::UdpAgent {
                ensure!(
                    c.decisions() >= r.ops,
                    "{}: agentwall counted {} decisions for {} operations: the agent is not \
                     being judged",
                    w.label(),
                    c.decisions(),
                    r.ops
                );
            }
        }
        out.push(sample);
    }
    Ok(out)
}
