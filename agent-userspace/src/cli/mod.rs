//! The `agentwall` command line: the daemon (`run`) and clients of the control socket.

mod audit;
pub mod demo;
mod events;
mod exec;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use crate::{
    api,
    daemon::{self, Options, PolicySource},
    datapath::{
        lock::{LockError, PinLock},
        pin,
    },
    policy,
};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hyper::Method;
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
    Exec(exec::ExecArgs),
    /// Policy files.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Ask the running controller to re-read its policy directory (as SIGHUP does).
    Reload(SocketArg),
    /// Counters and registered agents of the running controller.
    Status(SocketArg),
    /// The live stream of records as they are written (`--follow`), filtered by the
    /// controller (docs/stream.md).
    Events(events::EventsArgs),
    /// An agent's current task: its records carry the task id and intent.
    Task {
        #[command(subcommand)]
        cmd: TaskCmd,
    },
    /// Grant an agent access to a destination until a deadline the kernel checks; prints the
    /// grant id.
    Grant(GrantArgs),
    /// The live grants.
    Grants(SocketArg),
    /// End a grant at once (its live connections are destroyed).
    Revoke {
        /// The grant id (`agentwall grants` lists them).
        id: u64,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// What the kernel would decide now for an agent and a destination, and why (rule, grant,
    /// task, default deny, dead-man), read from the live maps; nothing is connected.
    Explain(ExplainArgs),
    /// The pending requests for access (agents' own under `approve: manual`, and those made
    /// from denied records).
    Requests(SocketArg),
    /// Approve a pending request: creates its grant (same checks as `grant`); prints the grant
    /// id.
    Approve {
        /// The request id (`agentwall requests` lists them).
        id: u64,
        /// Shorten the grant to this ttl ("90s", "5m"); never longer than requested.
        #[arg(long, value_parser = parse_secs)]
        ttl: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Deny a pending request.
    Deny {
        /// The request id.
        id: u64,
        /// Why, for the records and the agent.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Turn a denied connection record into a pending request for that agent, destination,
    /// port and protocol; prints the request id.
    Request(RequestArgs),
    /// Remove everything agentwall pinned (programs detach, maps go). Nothing else does this.
    Uninstall(UninstallArgs),
    /// The audit log: verify its hash chain and signed checkpoints, make a checkpoint key.
    Audit {
        #[command(subcommand)]
        cmd: audit::AuditCmd,
    },
    /// Set up a demo on loopback: demo policy, servers, controller, one agent process.
    Demo(DemoArgs),
    #[command(hide = true)]
    DemoAgent,
    #[command(hide = true)]
    DemoTool { target: String },
}

#[derive(Args)]
struct SocketArg {
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    control_socket: PathBuf,
}

#[derive(Args)]
struct RequestArgs {
    /// The denied decision record's `seq` in the audit log (this controller's run).
    #[arg(long)]
    from_event: u64,
    /// The grant's ttl once approved ("90s", "5m") [default: the policy's max_grant_ttl].
    #[arg(long, value_parser = parse_secs)]
    ttl: Option<u64>,
    /// Why, for the records.
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
struct ExplainArgs {
    /// Agent name or cgroup path (with --policy: its cgroup path under the cgroup2 root).
    #[arg(long)]
    agent: String,
    /// ADDR:PORT ([v6]:port for IPv6).
    #[arg(long)]
    to: String,
    /// tcp or udp.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// Dry run: judge by this policy directory (or file) instead of the running controller.
    #[arg(long)]
    policy: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArg,
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
    /// Record format of the audit log and stdout: native (docs/records.md) or ocsf (OCSF
    /// 1.8.0, docs/ocsf.md).
    #[arg(long, default_value = "native")]
    format: crate::sinks::Format,
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// The agent socket, where agents set their own task and ask for access (0666; see
    /// docs/agent-socket.md) [default: agent.sock beside the control socket,
    /// /run/agentwall/agent.sock].
    #[arg(long)]
    agent_socket: Option<PathBuf>,
    /// Serve no agent socket.
    #[arg(long, conflicts_with = "agent_socket")]
    no_agent_socket: bool,
    /// Do not watch the policy directory (changes then apply on `reload` or SIGHUP only).
    #[arg(long)]
    no_watch_policy: bool,
    /// Where bpffs is (mounted when missing).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// How often to scan the cgroup tree for cgroups that policies select, in milliseconds: a
    /// backstop only, new cgroups are registered from inotify when they appear.
    #[arg(long, default_value_t = 30_000)]
    rescan_ms: u64,
    /// Where maps and links are pinned [default: <bpffs>/agentwall/v<layout>].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Pin nothing: enforcement stops with the controller (for trials only).
    #[arg(long, conflicts_with = "pin_dir")]
    no_pin: bool,
    /// How long a request for access waits for a person before it expires as denied
    /// ("90s", "5m").
    #[arg(long, value_parser = parse_secs, default_value = "5m")]
    request_ttl: u64,
    /// Live grants one agent may hold; one more is refused (the grant tries are shared by
    /// every agent, and one agent must not fill them).
    #[arg(long, default_value_t = crate::control::grants::DEFAULT_MAX_GRANTS_PER_AGENT as u64,
          value_parser = clap::value_parser!(u64).range(1..=agent_common::MAX_GRANT_PREFIXES as u64))]
    max_grants_per_agent: u64,
    /// Where the DNS proxy sends the queries agents may make (ADDR:PORT; default: the first
    /// nameserver of /etc/resolv.conf, read once at start).
    #[arg(long)]
    dns_upstream: Option<std::net::SocketAddr>,
    /// Loopback address the DNS proxy listens on; agents' DNS is steered there in the kernel.
    #[arg(long, default_value_t = crate::dns::proxy::DEFAULT_LISTEN_V4)]
    dns_listen: std::net::SocketAddrV4,
    /// No IPv6 listener (agents' IPv6 DNS is then refused); by default [::1] on the same port.
    #[arg(long)]
    no_dns_ipv6: bool,
    /// No DNS proxy: agents' port-53 traffic is judged by their policies like any other port,
    /// and host-name rules allow nothing.
    #[arg(long)]
    no_dns: bool,
    /// Another controller serves these pins: ask it to stop and take over (an upgrade or a
    /// restart with no DNS query lost: this one's proxy sockets take new queries first).
    #[arg(long)]
    takeover: bool,
    #[command(flatten)]
    audit: audit::AuditRunArgs,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (docs/metrics.md), e.g.
    /// 127.0.0.1:9464. Unauthenticated: bind it where only the scraper reaches.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// NATS JetStream publishing (boxed: the flags are many, `Cmd` stays small).
    #[command(flatten)]
    nats: Box<NatsArgs>,
}

/// `run --nats URL ...` (docs/nats.md).
#[derive(Args)]
struct NatsArgs {
    /// Publish every audit record to NATS JetStream at this URL (nats://HOST:PORT), at least
    /// once, from the audit log as its spool (docs/nats.md).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Subjects are PREFIX.<node>.<kind>.
    #[arg(long, value_name = "PREFIX", requires = "nats",
          default_value = crate::sinks::nats::DEFAULT_SUBJECT_PREFIX)]
    nats_subject: String,
    /// The JetStream stream, created for PREFIX.> when missing.
    #[arg(long, value_name = "NAME", requires = "nats",
          default_value = crate::sinks::nats::DEFAULT_STREAM)]
    nats_stream: String,
    /// What is published: native (the audit line) or ocsf (OCSF 1.8.0, docs/ocsf.md).
    #[arg(long, requires = "nats", default_value = "native", value_parser = ["native", "ocsf"])]
    nats_format: String,
    /// Where the publisher keeps its place in the audit log, its spool [default:
    /// <audit-log>.nats-cursor].
    #[arg(long, value_name = "PATH", requires = "nats")]
    nats_cursor: Option<PathBuf>,
}

#[derive(Args)]
struct UninstallArgs {
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The pin directory [default: <bpffs>/agentwall/v1].
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Accepted for compatibility: whether a controller serves is known from its lock.
    #[arg(long = "control-socket", hide = true)]
    _control_socket: Option<PathBuf>,
    /// Uninstall even though a controller holds the pin directory's lock (it keeps running
    /// without its pins: nothing enforces until it is restarted).
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum TaskCmd {
    /// Set the agent's current task (replacing the one it has).
    Start {
        /// Agent name (its cgroup's last component) or cgroup path.
        #[arg(long)]
        agent: String,
        /// The task id (a ticket, a run id).
        #[arg(long)]
        id: String,
        /// What the agent is doing, for the records.
        #[arg(long)]
        intent: String,
        /// The task ends by itself after this long ("90s", "5m"), revoking its grants.
        #[arg(long, value_parser = parse_secs)]
        ttl: Option<u64>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// End the agent's task and revoke its grants.
    End {
        #[arg(long)]
        agent: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Args)]
struct GrantArgs {
    /// Agent name (its cgroup's last component) or cgroup path.
    #[arg(long)]
    agent: String,
    /// A network or an address (as a policy rule's `cidr`).
    #[arg(long)]
    to: String,
    /// "443", "8000-8099", comma-separated [default: all ports].
    #[arg(long)]
    ports: Option<String>,
    /// tcp or udp [default: both].
    #[arg(long, value_parser = ["tcp", "udp", "any"])]
    protocol: Option<String>,
    /// How long the grant lasts ("90s", "5m"); the kernel checks the deadline.
    #[arg(long, value_parser = parse_secs)]
    ttl: u64,
    /// Tie the grant to this task of the agent: ending the task revokes it.
    #[arg(long)]
    task: Option<String>,
    /// Why, for the records.
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    socket: SocketArg,
}

/// A duration ("90s", "5m", "1h 30m") in whole seconds, at least one.
fn parse_secs(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
        return Err(format!("{s:?}: a whole number of seconds, at least 1s"));
    }
    Ok(d.as_secs())
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file or directory (no root needed).
    Check { path: PathBuf },
    /// Apply a policy file or directory now through the running controller (one step per
    /// agent; an invalid one is refused with file:line:column and the running policy stays).
    Apply {
        path: PathBuf,
        #[command(flatten)]
        socket: SocketArg,
    },
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
    let result =
        match cli.cmd {
            Cmd::Policy {
                cmd: PolicyCmd::Check { path },
            } => policy_check(path),
            Cmd::Policy {
                cmd: PolicyCmd::Apply { path, socket },
            } => policy_apply(&path, &socket.control_socket),
            Cmd::Exec(a) => exec::run(a),
            Cmd::DemoAgent => demo::agent(),
            Cmd::DemoTool { target } => demo::tool(&target),
            Cmd::Reload(s) => call(&s.control_socket, Method::POST, "/v1/reload", None)
                .and_then(|v| print_json(&v)),
            Cmd::Status(s) => call(&s.control_socket, Method::GET, "/v1/status", None)
                .and_then(|v| print_json(&v)),
            Cmd::Events(a) => events::run(a),
            Cmd::Task { cmd } => task(cmd),
            Cmd::Grant(a) => grant(a),
            Cmd::Grants(s) => call(&s.control_socket, Method::GET, "/v1/grants", None)
                .and_then(|v| print_json(&v)),
            Cmd::Revoke { id, socket } => call(
                &socket.control_socket,
                Method::DELETE,
                &format!("/v1/grants/{id}"),
                None,
            )
            .and_then(|v| print_json(&v)),
            Cmd::Explain(a) => explain(a),
            Cmd::Requests(s) => call(&s.control_socket, Method::GET, "/v1/requests", None)
                .and_then(|v| print_json(&v)),
            Cmd::Approve { id, ttl, socket } => approve(id, ttl, &socket.control_socket),
            Cmd::Deny { id, reason, socket } => {
                let body = api::wire::DenyBody { reason };
                serde_json::to_value(body)
                    .map_err(Into::into)
                    .and_then(|b| {
                        call(
                            &socket.control_socket,
                            Method::POST,
                            &format!("/v1/requests/{id}/deny"),
                            Some(b),
                        )
                    })
                    .and_then(|v| print_json(&v))
            }
            Cmd::Request(a) => request(a),
            Cmd::Uninstall(a) => uninstall(a),
            Cmd::Audit { cmd } => audit::run(cmd),
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

/// Sends the absolute path: the controller (root) reads the files itself.
fn policy_apply(path: &std::path::Path, socket: &std::path::Path) -> Result<()> {
    let abs = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
    let body = serde_json::json!({ "path": abs });
    let v = call(socket, Method::POST, "/v1/policy/apply", Some(body))?;
    print_json(&v)
}

/// Accepts exactly what `run` accepts: the same loader, compiler and map capacities.
fn policy_check(path: PathBuf) -> Result<()> {
    let set = policy::load_dir(&path)?;
    let mut compiled = Vec::with_capacity(set.policies.len());
    let mut errors = Vec::new();
    for p in &set.policies {
        match policy::compile(p) {
            Ok(mut c) => {
                // As `run` serves it by default: one more Unix entry per policy.
                policy::allow_agent_socket(p, &mut c, api::agent::DEFAULT_AGENT_SOCKET);
                compiled.push(c);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    let usage: Vec<_> = set
        .policies
        .iter()
        .zip(&compiled)
        .map(|(p, c)| (p.source.as_path(), policy::Usage::of(c)))
        .collect();
    policy::check_capacity(&usage, policy::Usage::default())?;
    for (p, c) in set.policies.iter().zip(&compiled) {
        println!(
            "{}: policy {:?} ({}) ok: {} rules, {} IPv4 and {} IPv6 prefixes, {} Unix entries",
            p.source.display(),
            p.name,
            p.mode,
            p.rules.len(),
            c.v4.len(),
            c.v6.len(),
            c.unix.len()
        );
    }
    println!("{}: {} policies valid", path.display(), set.policies.len());
    Ok(())
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn call(
    socket: &std::path::Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    Ok(api::client::call(socket, method, path, body)?)
}

fn task(cmd: TaskCmd) -> Result<()> {
    let v = match cmd {
        TaskCmd::Start {
            agent,
            id,
            intent,
            ttl,
            socket,
        } => {
            let body = api::wire::TaskStartBody {
                agent,
                id,
                intent,
                ttl_secs: ttl,
            };
            call(
                &socket.control_socket,
                Method::POST,
                "/v1/tasks",
                Some(serde_json::to_value(body)?),
            )?
        }
        TaskCmd::End { agent, socket } => {
            // One path segment per cgroup component: a cgroup path names an agent too.
            let path: Vec<String> = agent.split('/').map(percent_encode).collect();
            call(
                &socket.control_socket,
                Method::DELETE,
                &format!("/v1/tasks/{}", path.join("/")),
                None,
            )?
        }
    };
    print_json(&v)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn grant(a: GrantArgs) -> Result<()> {
    let body = api::wire::GrantBody {
        agent: a.agent,
        to: a.to,
        ports: a.ports,
        protocol: a.protocol,
        ttl_secs: a.ttl,
        task: a.task,
        reason: a.reason,
    };
    let v = call(
        &a.socket.control_socket,
        Method::POST,
        "/v1/grants",
        Some(serde_json::to_value(body)?),
    )?;
    let id = v["id"]
        .as_u64()
        .with_context(|| format!("the controller's reply has no grant id: {v}"))?;
    println!("{id}");
    Ok(())
}

fn approve(id: u64, ttl: Option<u64>, socket: &std::path::Path) -> Result<()> {
    let body = api::wire::ApproveBody { ttl_secs: ttl };
    let v = call(
        socket,
        Method::POST,
        &format!("/v1/requests/{id}/approve"),
        Some(serde_json::to_value(body)?),
    )?;
    let grant = v["grant"]["id"]
        .as_u64()
        .with_context(|| format!("the controller's reply has no grant id: {v}"))?;
    println!("{grant}");
    Ok(())
}

fn request(a: RequestArgs) -> Result<()> {
    let body = api::wire::FromEventBody {
        from_event: a.from_event,
        ttl_secs: a.ttl,
        reason: a.reason,
    };
    let v = call(
        &a.socket.control_socket,
        Method::POST,
        "/v1/requests",
        Some(serde_json::to_value(body)?),
    )?;
    let id = v["id"]
        .as_u64()
        .with_context(|| format!("the controller's reply has no request id: {v}"))?;
    println!("{id}");
    Ok(())
}

fn explain(a: ExplainArgs) -> Result<()> {
    let Some(dir) = a.policy else {
        let body = api::wire::ExplainBody {
            agent: a.agent,
            to: a.to,
            protocol: Some(a.protocol),
        };
        let v = call(
            &a.socket.control_socket,
            Method::POST,
            "/v1/explain",
            Some(serde_json::to_value(body)?),
        )?;
        return print_json(&v);
    };
    let to: std::net::SocketAddr =
        a.to.parse()
            .with_context(|| format!("--to {:?}: expected ADDR:PORT", a.to))?;
    let protocol = crate::control::explain::parse_protocol(Some(&a.protocol))
        .map_err(|e| anyhow::anyhow!("--protocol: {e}"))?;
    let set = if dir.is_dir() {
        crate::policy::load_dir(&dir)?
    } else {
        crate::policy::PolicySet {
            policies: vec![crate::policy::load_file(&dir)?],
        }
    };
    let e = crate::control::explain::dry_run(&set, &a.agent, to, protocol)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    print_json(&serde_json::to_value(api::wire::Explanation::from(e))?)
}

/// The soft open-file limit raised to the hard one: the controller holds map, link and
/// connection descriptors, and a refused accept (EMFILE) must not be what stops it answering.
fn raise_nofile_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    "raising the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

async fn run(a: RunArgs) -> Result<()> {
    raise_nofile_limit();
    let mut opts = Options::new(PolicySource::Path(a.policy));
    opts.audit_log = Some(a.audit_log);
    opts.stdout = a.stdout;
    opts.format = a.format;
    opts.watch_policy = !a.no_watch_policy;
    if !a.no_agent_socket {
        opts.agent_socket = Some(
            a.agent_socket
                .unwrap_or_else(|| a.control_socket.with_file_name("agent.sock")),
        );
    }
    opts.control_socket = Some(a.control_socket);
    if !a.no_pin {
        opts.pin_dir = Some(a.pin_dir.unwrap_or_else(|| pin::default_dir(&a.bpffs)));
    }
    opts.bpffs = Some(a.bpffs);
    opts.rescan = Duration::from_millis(a.rescan_ms.max(10));
    opts.request_ttl = Duration::from_secs(a.request_ttl);
    opts.max_grants_per_agent = a.max_grants_per_agent as usize;
    opts.takeover = a.takeover;
    opts.audit = a.audit.options()?;
    opts.metrics = a.metrics;
    let nats = *a.nats;
    opts.nats = nats.nats.map(|url| {
        let mut n = crate::sinks::nats::NatsOptions::new(url);
        n.subject_prefix = nats.nats_subject;
        n.stream = nats.nats_stream;
        n.cursor = nats.nats_cursor;
        n
    });
    if let Some(n) = &mut opts.nats {
        n.format = nats.nats_format.parse()?;
    }
    opts.dns = if a.no_dns {
        None
    } else {
        let upstream = match a.dns_upstream {
            Some(u) => u,
            None => crate::dns::upstream::system_resolver().context(
                "no nameserver in /etc/resolv.conf: give --dns-upstream ADDR:PORT (or --no-dns)",
            )?,
        };
        Some(daemon::DnsOptions {
            upstream,
            listen_v4: a.dns_listen,
            listen_v6: (!a.no_dns_ipv6).then(|| {
                std::net::SocketAddrV6::new(
                    std::net::Ipv6Addr::LOCALHOST,
                    a.dns_listen.port(),
                    0,
                    0,
                )
            }),
        })
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let handle = daemon::start(opts).await?;
    tracing::info!(
        "agentwall running; SIGHUP reloads the policy and reopens the audit log, SIGINT/SIGTERM stop"
    );
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                handle.reopen_audit_log();
                if let Err(e) = handle.reload().await {
                    tracing::error!("reload rejected, running policy kept: {e:#}");
                }
            }
        }
    }
    tracing::info!("stopping");
    handle.shutdown().await
}

fn uninstall(a: UninstallArgs) -> Result<()> {
    // Without --pin-dir: every layout version agentwall pinned under this bpffs.
    let (dirs, lock_for) = match a.pin_dir {
        Some(d) => (vec![d.clone()], d),
        None => (pin::all_layouts(&a.bpffs), pin::default_dir(&a.bpffs)),
    };
    // Held to the end: no controller starts on these pins while they are being removed.
    let _lock = match PinLock::acquire_existing(&lock_for) {
        Ok(lock) => lock,
        Err(e @ LockError::Held { .. }) if a.force => {
            eprintln!("agentwall: --force: uninstalling although {e}");
            None
        }
        Err(e @ LockError::Held { .. }) => {
            bail!("{e}; or pass --force to remove its pins anyway")
        }
        Err(e) => return Err(e.into()),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("agentwall").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn requests_commands_parse_as_documented() {
        let Ok(Cmd::Run(r)) = parse(&["run", "--policy", "p", "--request-ttl", "90s"]) else {
            panic!("run --request-ttl");
        };
        assert_eq!(r.request_ttl, 90);
        let Ok(Cmd::Run(r)) = parse(&["run", "--policy", "p"]) else {
            panic!("run");
        };
        assert_eq!(r.request_ttl, 300, "5 minutes by default");
        assert!(matches!(parse(&["requests"]), Ok(Cmd::Requests(_))));
        assert!(matches!(
            parse(&["approve", "3", "--ttl", "5m"]),
            Ok(Cmd::Approve {
                id: 3,
                ttl: Some(300),
                ..
            })
        ));
        assert!(matches!(
            parse(&["deny", "4", "--reason", "no"]),
            Ok(Cmd::Deny {
                id: 4,
                reason: Some(_),
                ..
            })
        ));
        let Ok(Cmd::Request(a)) = parse(&["request", "--from-event", "42", "--reason", "r"]) else {
            panic!("request --from-event");
        };
        assert_eq!((a.from_event, a.ttl), (42, None));
        assert!(
            parse(&["request", "--from-event", "42"]).is_err(),
            "--reason is required"
        );
        assert!(parse(&["approve", "x"]).is_err());
        assert!(parse(&["approve", "3", "--ttl", "0s"]).is_err());
    }
}
