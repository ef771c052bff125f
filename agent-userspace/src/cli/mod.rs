//! The `agentwall` command line: the daemon (`run`) and clients of the control socket.

pub mod demo;

use std::{os::unix::process::CommandExt, path::PathBuf, process::ExitCode, time::Duration};

use crate::{
    api::{self, Request},
    daemon::{self, Options, PolicySource},
    datapath::pin,
    identity::{self, cgroup},
    policy,
};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "agentwall",
    version,
    about = "Kernel-level egress enforcement for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the controller: load and attach the programs, register agents, stream events.
    Run(RunArgs),
    /// Run a command as an agent (its cgroup is created when missing and registered first).
    Exec(ExecArgs),
    /// Policy files.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Ask the running controller to re-read its policy directory (as SIGHUP does).
    Reload(SocketArg),
    /// Counters and registered agents of the running controller.
    Status(SocketArg),
    /// Remove everything agentwall pinned (programs detach, maps go). Nothing else does this.
    Uninstall(UninstallArgs),
    /// Set up a demo on loopback: demo policy, servers, controller, one agent process.
    Demo(DemoArgs),
    #[command(hide = true)]
    DemoAgent,
}

#[derive(Args)]
struct SocketArg {
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    control_socket: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Directory of policy files (or one file).
    #[arg(long)]
    policy: PathBuf,
    /// Audit log: one JSON line per decision.
    #[arg(long, default_value = "/var/log/agentwall/audit.jsonl")]
    audit_log: PathBuf,
    /// Also write every record to stdout.
    #[arg(long)]
    stdout: bool,
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// Where bpffs is (mounted when missing).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// How often to look for new cgroups that policies select, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    rescan_ms: u64,
    /// Where maps and links are pinned [default: <bpffs>/agentwall/v1].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Pin nothing: enforcement stops with the controller (for trials only).
    #[arg(long, conflicts_with = "pin_dir")]
    no_pin: bool,
}

#[derive(Args)]
struct UninstallArgs {
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The pin directory [default: <bpffs>/agentwall/v1].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// Uninstall even though a controller answers on the control socket.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ExecArgs {
    /// Agent name: the cgroup <cgroup2>/<parent>/<NAME>.
    #[arg(long)]
    agent: String,
    /// Parent cgroup of agents, relative to the cgroup2 root.
    #[arg(long, default_value = "agentwall")]
    cgroup_parent: String,
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file or directory (no root needed).
    Check { path: PathBuf },
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo writes its audit log.
    #[arg(long, default_value = "agentwall-demo-audit.jsonl")]
    audit_log: PathBuf,
}

/// The `agentwall` binary: parse the command line, run it, exit.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Policy {
            cmd: PolicyCmd::Check { path },
        } => policy_check(path),
        Cmd::Exec(a) => exec(a),
        Cmd::DemoAgent => demo::agent(),
        Cmd::Reload(s) => print_reply(&s.control_socket, Request::Reload),
        Cmd::Status(s) => print_reply(&s.control_socket, Request::Status),
        Cmd::Uninstall(a) => uninstall(a),
        Cmd::Run(a) => runtime().and_then(|rt| rt.block_on(run(a))),
        Cmd::Demo(a) => runtime().and_then(|rt| rt.block_on(demo::run(a.audit_log))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentwall: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn policy_check(path: PathBuf) -> Result<()> {
    let set = policy::load_dir(&path)?;
    for p in &set.policies {
        let c = policy::compile(p)?;
        println!(
            "{}: policy {:?} ({}) ok: {} rules, {} IPv4 and {} IPv6 prefixes",
            p.source.display(),
            p.name,
            if p.mode.as_kernel() == agent_common::mode::AUDIT {
                "audit"
            } else {
                "enforce"
            },
            p.rules.len(),
            c.v4.len(),
            c.v6.len()
        );
    }
    println!("{}: {} policies valid", path.display(), set.policies.len());
    Ok(())
}

fn print_reply(socket: &std::path::Path, req: Request) -> Result<()> {
    let v = api::request(socket, &req)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    let mut opts = Options::new(PolicySource::Path(a.policy));
    opts.audit_log = Some(a.audit_log);
    opts.stdout = a.stdout;
    opts.control_socket = Some(a.control_socket);
    if !a.no_pin {
        opts.pin_dir = Some(a.pin_dir.unwrap_or_else(|| pin::default_dir(&a.bpffs)));
    }
    opts.bpffs = Some(a.bpffs);
    opts.rescan = Duration::from_millis(a.rescan_ms.max(10));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let handle = daemon::start(opts).await?;
    tracing::info!("agentwall running; SIGHUP reloads the policy, SIGINT/SIGTERM stop");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Err(e) = handle.request(Request::Reload).await {
                    tracing::error!("reload rejected, running policy kept: {e:#}");
                }
            }
        }
    }
    tracing::info!("stopping");
    handle.shutdown().await
}

fn uninstall(a: UninstallArgs) -> Result<()> {
    if !a.force && std::os::unix::net::UnixStream::connect(&a.control_socket).is_ok() {
        bail!(
            "a controller is running (it answers on {}); stop it first, or pass --force",
            a.control_socket.display()
        );
    }
    // Without --pin-dir: every layout version agentwall pinned under this bpffs.
    let dirs = match a.pin_dir {
        Some(d) => vec![d],
        None => pin::all_layouts(&a.bpffs),
    };
    let mut total = 0;
    for dir in &dirs {
        let removed = pin::uninstall(dir)?;
        total += removed.len();
        println!("removed {} pins from {}", removed.len(), dir.display());
    }
    if total == 0 {
        println!("nothing pinned");
    } else {
        println!("agents are no longer enforced");
    }
    Ok(())
}

/// Packet sockets (AF_PACKET) bypass every cgroup socket hook, and the BPF LSM hook that would
/// see them is not on every kernel; without CAP_NET_RAW the kernel refuses them (and raw
/// sockets) itself. Dropped from every set, the bounding set included, so no exec gets it back;
/// where the bounding set cannot be changed (no CAP_SETPCAP), no_new_privs has the same effect.
fn drop_net_raw() -> Result<()> {
    use caps::{CapSet, Capability};
    let bounding = caps::drop(None, CapSet::Bounding, Capability::CAP_NET_RAW);
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::drop(None, set, Capability::CAP_NET_RAW)
            .with_context(|| format!("from the {set:?} set"))?;
    }
    if bounding.is_err() {
        // SAFETY: plain prctl with constant arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            bail!("setting no_new_privs: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Registers the agent's cgroup with the controller, joins it, then becomes the command. If the
/// controller does not confirm, the command does not run: an agent never runs unenforced.
fn exec(a: ExecArgs) -> Result<()> {
    if !identity::valid_agent_name(&a.agent) {
        bail!(
            "agent name {:?} must be one cgroup name: letters, digits, '-', '_', '.'",
            a.agent
        );
    }
    let root = cgroup::cgroup2_mount()?;
    let path = root.join(a.cgroup_parent.trim_matches('/')).join(&a.agent);
    let existed = path.is_dir();
    cgroup::create(&path)?;
    let reply = match api::request(
        &a.control_socket,
        &Request::Register {
            cgroup: path.clone(),
        },
    ) {
        Ok(r) => r,
        Err(e) => {
            if !existed {
                let _ = std::fs::remove_dir(&path);
            }
            return Err(e).with_context(|| format!("registering agent {:?}", a.agent));
        }
    };
    tracing::debug!(?reply, "registered");
    cgroup::move_pid(&path, std::process::id())?;
    let sockets: Vec<String> = reply
        .get("sockets")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default();
    if !sockets.iter().any(|s| s == "raw" || s == "packet") {
        drop_net_raw().context("dropping CAP_NET_RAW for the agent")?;
    }
    let err = std::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .exec();
    bail!("executing {:?}: {err}", a.command[0])
}
