//! The enforcing DNS proxy, measured against the same upstream queried directly (issue 11):
//!
//! - latency at 1,000 queries/s (open loop, paced): a load process in the agent cgroup asks
//!   127.0.0.99:53 (the kernel steers it to the proxy), the same process in a cgroup that is
//!   not an agent asks the upstream itself; p50 and p99 of each, and the difference;
//! - the proxy's own split of each query (policy, upstream, kernel write, total), from the
//!   `timing_us` of its "dns" records (the in-process tap);
//! - queries/s at saturation (closed loop, `OUTSTANDING` in flight), through the proxy and
//!   direct;
//! - a controller restart under 1,000 queries/s: controller A is `agentwall run` with a pin
//!   directory, B the same with `--takeover`; queries failed (no valid answer within 2 s,
//!   SERVFAIL or REFUSED) and the longest answer delay.
//!
//! The upstream is a hickory-server on loopback (agentwall_tests::dns_server); the load
//! processes are agentwall_tests::dns_load, run as `agentwall-bench __dnsload`. The restart's
//! controllers are this binary started under the name `agentwall`, which runs
//! `agentwall::cli::main` (the agentwall binary's main) instead of the bench.

use std::{
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use agentwall::{
    daemon::{self, DnsOptions, Options, PolicySource},
    identity::cgroup,
    policy::{self, PolicySet},
    sinks::AuditRecord,
};
use agentwall_tests::{
    dns_load::{LoadReport, LoadSpec},
    dns_server::{DnsServer, Rec},
};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    cleanup,
    configs::Ctx,
    report::{Pct, Plan},
    stats, sys,
};

/// Goals (issue 11): at 1,000 queries/s, the proxy's p50 within 100 µs and p99 within 1 ms of
/// the upstream queried directly; no query failed across a controller restart.
const P50_ADDED_US: f64 = 100.0;
const P99_ADDED_US: f64 = 1000.0;
/// The paced rate of the latency and restart rows.
const RATE: u32 = 1000;
/// Queries in flight at saturation.
const OUTSTANDING: usize = 32;
/// A query without a valid answer within this failed.
const TIMEOUT_MS: u64 = 2000;
/// Any resolver address: an agent's port-53 traffic goes to the proxy whatever it names.
const STEERED: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 99), 53));
/// The zone: NAMES names under it, each with its own loopback address.
const ZONE: &str = "bench.agentwall.test";
const NAMES: usize = 64;

/// `__dnsload`: one load process (agentwall_tests::dns_load).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// The load spec (JSON, agentwall_tests::dns_load::LoadSpec).
    pub spec: String,
}

pub fn load_main(a: LoadArgs) -> Result<()> {
    agentwall_tests::dns_load::main_with(Some(a.spec))
}

/// How long each part runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DnsPlan {
    /// Repetitions of (direct paced, proxy paced, direct saturated, proxy saturated).
    pub reps: usize,
    pub paced_ms: u64,
    pub saturated_ms: u64,
    pub restart_ms: u64,
}

impl DnsPlan {
    pub fn of(plan: &Plan) -> DnsPlan {
        if plan.quick {
            DnsPlan {
                reps: 2,
                paced_ms: 4_000,
                saturated_ms: 2_000,
                restart_ms: 8_000,
            }
        } else {
            DnsPlan {
                reps: 4,
                paced_ms: 10_000,
                saturated_ms: 5_000,
                restart_ms: 15_000,
            }
        }
    }
}

/// The restart row.
#[derive(Debug, Clone, Serialize)]
pub struct Restart {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub timeouts: u64,
    pub servfail: u64,
    pub refused: u64,
    pub other: u64,
    /// The first failures: (ms after B was started, kind).
    pub failures: Vec<(f64, String)>,
    /// The longest answer delay, µs, and when its query was due, ms after B was started.
    pub max_delay_us: f64,
    pub max_delay_at_ms: f64,
    /// B started to A's exit, and to B serving (its control socket), ms.
    pub a_exited_ms: f64,
    pub b_ready_ms: f64,
    pub latency_us: Pct,
}

/// Everything the DNS rows measured.
#[derive(Debug, Clone, Serialize)]
pub struct DnsSummary {
    pub plan: DnsPlan,
    pub direct_us: Pct,
    pub proxy_us: Pct,
    /// Failed queries in the paced runs (direct, proxy).
    pub paced_failed: (u64, u64),
    /// The proxy's records during its paced runs, µs.
    pub policy_us: Pct,
    pub upstream_us: Pct,
    pub kernel_us: Pct,
    pub total_us: Pct,
    /// Answers per second at saturation, median over the repetitions [min–max].
    pub direct_qps: stats::Spread,
    pub proxy_qps: stats::Spread,
    pub saturated_failed: (u64, u64),
    pub restart: Restart,
}

impl DnsSummary {
    pub fn goals(&self) -> Vec<crate::report::Goal> {
        let added50 = self.proxy_us.p50 - self.direct_us.p50;
        let added99 = self.proxy_us.p99 - self.direct_us.p99;
        let r = &self.restart;
        vec![
            crate::report::Goal {
                goal: "DNS lookup through the proxy at 1,000/s: p50 added to direct".into(),
                target: format!("<= {P50_ADDED_US:.0} µs"),
                measured: format!("{added50:.0} µs"),
                pass: added50 <= P50_ADDED_US,
            },
            crate::report::Goal {
                goal: "DNS lookup through the proxy at 1,000/s: p99 added to direct".into(),
                target: format!("<= {P99_ADDED_US:.0} µs"),
                measured: format!("{added99:.0} µs"),
                pass: added99 <= P99_ADDED_US,
            },
            crate::report::Goal {
                goal: format!(
                    "DNS queries failed across a controller restart (--takeover) at 1,000/s \
                     ({} sent)",
                    r.sent
                ),
                target: "0".into(),
                measured: r.failed.to_string(),
                pass: r.failed == 0 && r.sent > 0,
            },
        ]
    }

    /// The table (Markdown).
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let us = |p: &Pct| format!("{:.0} / {:.0} / {:.0} µs", p.p50, p.p99, p.max);
        let qps = |s: &stats::Spread| {
            format!(
                "{:.1} k/s [{:.1}–{:.1}]",
                s.median / 1e3,
                s.min / 1e3,
                s.max / 1e3
            )
        };
        let p = &self.plan;
        let _ = writeln!(
            o,
            "| DNS proxy ({} repetitions of {} s paced and {} s saturated; one UDP socket per \
             client, A queries over {NAMES} names) | figure |",
            p.reps,
            p.paced_ms / 1000,
            p.saturated_ms / 1000
        );
        let _ = writeln!(o, "|---|---|");
        let mut line = |what: String, v: String| {
            let _ = writeln!(o, "| {what} | {v} |");
        };
        line(
            format!(
                "lookup at {RATE}/s, not an agent, upstream asked directly ({}): p50 / p99 / max",
                self.direct_us.n
            ),
            us(&self.direct_us),
        );
        line(
            format!(
                "lookup at {RATE}/s, agent, steered to the proxy ({}): p50 / p99 / max",
                self.proxy_us.n
            ),
            us(&self.proxy_us),
        );
        line(
            "added by the proxy: p50 / p99".into(),
            format!(
                "{:.0} / {:.0} µs",
                self.proxy_us.p50 - self.direct_us.p50,
                self.proxy_us.p99 - self.direct_us.p99
            ),
        );
        line(
            "queries failed in those runs: direct / proxy".into(),
            format!("{} / {}", self.paced_failed.0, self.paced_failed.1),
        );
        line(
            format!(
                "the proxy's split, from its records ({}): policy (control actor) p50 / p99 / max",
                self.policy_us.n
            ),
            us(&self.policy_us),
        );
        line(
            "upstream exchange p50 / p99 / max".into(),
            us(&self.upstream_us),
        );
        line(
            "kernel write of the answer's addresses p50 / p99 / max".into(),
            us(&self.kernel_us),
        );
        line(
            "total in the proxy p50 / p99 / max".into(),
            us(&self.total_us),
        );
        line(
            format!("saturation ({OUTSTANDING} in flight): direct"),
            qps(&self.direct_qps),
        );
        line(
            format!("saturation ({OUTSTANDING} in flight): through the proxy"),
            qps(&self.proxy_qps),
        );
        line(
            "proxy / direct at saturation (medians)".into(),
            format!("{:.3}", self.proxy_qps.median / self.direct_qps.median),
        );
        line(
            "queries failed at saturation: direct / proxy".into(),
            format!("{} / {}", self.saturated_failed.0, self.saturated_failed.1),
        );
        let r = &self.restart;
        line(
            format!(
                "controller restart at {RATE}/s (`agentwall run --takeover` beside a pinned one): \
                 queries failed of sent"
            ),
            format!(
                "{} of {} ({} timeouts, {} SERVFAIL, {} REFUSED, {} other)",
                r.failed, r.sent, r.timeouts, r.servfail, r.refused, r.other
            ),
        );
        line(
            "longest answer delay in that run (query due at, from B's start)".into(),
            format!(
                "{:.1} ms (at {:.0} ms)",
                r.max_delay_us / 1e3,
                r.max_delay_at_ms
            ),
        );
        line(
            "B started to A exited / to B serving".into(),
            format!("{:.0} ms / {:.0} ms", r.a_exited_ms, r.b_ready_ms),
        );
        line(
            "latency across the restart run p50 / p99 / max".into(),
            us(&r.latency_us),
        );
        if !r.failures.is_empty() {
            let first: Vec<String> = r
                .failures
                .iter()
                .take(10)
                .map(|(at, k)| format!("{k} at {at:.0} ms"))
                .collect();
            line("first failures".into(), first.join(", "));
        }
        o
    }
}

fn names() -> Vec<String> {
    (0..NAMES).map(|i| format!("n{i}.{ZONE}")).collect()
}

fn records() -> Vec<Rec> {
    (0..NAMES)
        .map(|i| Rec::a(&format!("n{i}.{ZONE}"), &format!("127.77.0.{}", i + 1), 300))
        .collect()
}

fn policy_yaml(agent_rel: &str) -> String {
    format!(
        "name: bench-dns\nmode: enforce\nagents:\n  cgroups:\n    - {agent_rel}\n\
         egress:\n  - hosts: [\"*.{ZONE}\"]\n    ports: [80]\n    protocol: tcp\n"
    )
}

/// Runs one load process to its end.
fn load(ctx: &Ctx, spec: &LoadSpec) -> Result<LoadReport> {
    let child = spawn_load(ctx, spec)?;
    let line = crate::load::finish(child, "DNS load process")?;
    serde_json::from_str(&line).with_context(|| format!("DNS load output {line:?}"))
}

fn spawn_load(ctx: &Ctx, spec: &LoadSpec) -> Result<Child> {
    if cleanup::aborting() {
        bail!("interrupted");
    }
    let child = Command::new(&ctx.exe)
        .arg("__dnsload")
        .arg(serde_json::to_string(spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a DNS load process")?;
    cleanup::add_child(child.id());
    Ok(child)
}

fn spec(ctx: &Ctx, server: SocketAddr, agent: bool, rate: u32, ms: u64) -> LoadSpec {
    LoadSpec {
        server,
        names: names(),
        rate,
        outstanding: if rate == 0 { OUTSTANDING } else { 0 },
        duration_ms: ms,
        warmup: 200,
        timeout_ms: TIMEOUT_MS,
        cgroup: Some(if agent {
            ctx.agent.clone()
        } else {
            ctx.other.clone()
        }),
        cpu: Some(ctx.client_cpu),
    }
}

/// Every DNS row: the in-process controller's rows, then the restart.
pub async fn measure(ctx: &Arc<Ctx>, plan: &Plan) -> Result<DnsSummary> {
    let dp = DnsPlan::of(plan);
    let upstream = DnsServer::start(&records()).context("starting the upstream DNS server")?;
    let agent_rel = cgroup::relative(&cgroup::cgroup2_mount()?, &ctx.agent)?;
    // The upstream, the controller and this process on the server CPU; the clients on theirs.
    let all = sys::allowed_cpus()?;
    sys::pin_process(&[ctx.server_cpu])?;
    let r = inproc(ctx, &dp, &agent_rel, upstream.addr()).await;
    let r = match r {
        Ok(mut s) => restart(ctx, &dp, &agent_rel, upstream.addr())
            .await
            .context("the controller restart")
            .map(|rs| {
                s.restart = rs;
                s
            }),
        Err(e) => Err(e),
    };
    sys::pin_process(&all)?;
    r
}

/// The tap's "dns" records so far: (policy, upstream, kernel, total) µs each.
fn timings(rx: &mut mpsc::UnboundedReceiver<AuditRecord>) -> Vec<[f64; 4]> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        if r.kind != "dns" {
            continue;
        }
        let Some(t) = r.detail.as_ref().and_then(|d| d.get("timing_us")) else {
            continue;
        };
        let f = |k: &str| t.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        out.push([
            f("policy_us"),
            f("upstream_us"),
            f("kernel_us"),
            f("total_us"),
        ]);
    }
    out
}

async fn inproc(
    ctx: &Arc<Ctx>,
    dp: &DnsPlan,
    agent_rel: &str,
    upstream: SocketAddr,
) -> Result<DnsSummary> {
    let yaml = policy_yaml(agent_rel);
    let p = policy::parse_policy(Path::new("bench-dns.yaml"), &yaml)?;
    let (tap, mut rx) = mpsc::unbounded_channel();
    let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: vec![p] }));
    opts.control_socket = None;
    opts.tap = Some(tap);
    opts.rescan = Duration::from_secs(3600);
    opts.dns = Some(DnsOptions {
        upstream,
        listen_v4: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        listen_v6: None,
    });
    let handle = daemon::start(opts)
        .await
        .context("starting the controller")?;
    let result = async {
        handle.register(&ctx.agent).await?;
        let mut direct_us = Vec::new();
        let mut proxy_us = Vec::new();
        let mut paced_failed = (0, 0);
        let mut split = Vec::new();
        let mut direct_qps = Vec::new();
        let mut proxy_qps = Vec::new();
        let mut saturated_failed = (0, 0);
        for _ in 0..dp.reps {
            let c = ctx.clone();
            let run = |s: LoadSpec| {
                let c = c.clone();
                tokio::task::spawn_blocking(move || load(&c, &s))
            };
            let d = run(spec(ctx, upstream, false, RATE, dp.paced_ms)).await??;
            paced_failed.0 += d.failed;
            direct_us.extend(d.latencies_us);
            timings(&mut rx);
            let px = run(spec(ctx, STEERED, true, RATE, dp.paced_ms)).await??;
            paced_failed.1 += px.failed;
            proxy_us.extend(px.latencies_us.iter().copied());
            // The records of that run (the warm-up's included), once the reader caught up.
            tokio::time::sleep(Duration::from_millis(200)).await;
            split.extend(timings(&mut rx));
            let d = run(spec(ctx, upstream, false, 0, dp.saturated_ms)).await??;
            saturated_failed.0 += d.failed;
            direct_qps.push(d.ok_per_s());
            let px = run(spec(ctx, STEERED, true, 0, dp.saturated_ms)).await??;
            saturated_failed.1 += px.failed;
            ensure!(px.ok > 0, "no query through the proxy was answered");
            proxy_qps.push(px.ok_per_s());
            tokio::time::sleep(Duration::from_millis(200)).await;
            timings(&mut rx);
        }
        let col = |i: usize| -> Vec<f64> { split.iter().map(|t| t[i]).collect() };
        let spread = |v: &[f64]| {
            stats::Spread::of(v).unwrap_or(stats::Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            })
        };
        Ok(DnsSummary {
            plan: *dp,
            direct_us: Pct::of(&direct_us),
            proxy_us: Pct::of(&proxy_us),
            paced_failed,
            policy_us: Pct::of(&col(0)),
            upstream_us: Pct::of(&col(1)),
            kernel_us: Pct::of(&col(2)),
            total_us: Pct::of(&col(3)),
            direct_qps: spread(&direct_qps),
            proxy_qps: spread(&proxy_qps),
            saturated_failed,
            restart: Restart {
                sent: 0,
                ok: 0,
                failed: 0,
                timeouts: 0,
                servfail: 0,
                refused: 0,
                other: 0,
                failures: Vec::new(),
                max_delay_us: f64::NAN,
                max_delay_at_ms: f64::NAN,
                a_exited_ms: f64::NAN,
                b_ready_ms: f64::NAN,
                latency_us: Pct::of(&[]),
            },
        })
    }
    .await;
    handle.shutdown().await?;
    result
}

/// The restart's files and pins; removed when dropped (pins by the library's uninstall, so a
/// failed run leaves no programs attached).
struct RestartFiles {
    dir: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
    policy: PathBuf,
    audit: PathBuf,
}

impl Drop for RestartFiles {
    fn drop(&mut self) {
        if let Err(e) = agentwall::datapath::pin::uninstall(&self.pin_dir) {
            eprintln!(
                "agentwall-bench: removing the pins at {}: {e:#}",
                self.pin_dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `agentwall ARGS`: this binary, started under the name `agentwall` (see `main`).
fn agentwall(ctx: &Ctx) -> Command {
    let mut c = Command::new(&ctx.exe);
    c.arg0("agentwall");
    c
}

fn controller(
    ctx: &Ctx,
    f: &RestartFiles,
    upstream: SocketAddr,
    port: u16,
    takeover: bool,
    log: &str,
) -> Result<Child> {
    let mut cmd = agentwall(ctx);
    cmd.arg("run")
        .arg("--policy")
        .arg(&f.policy)
        .arg("--audit-log")
        .arg(&f.audit)
        .arg("--control-socket")
        .arg(&f.socket)
        .arg("--no-agent-socket")
        .arg("--pin-dir")
        .arg(&f.pin_dir)
        .arg("--dns-upstream")
        .arg(upstream.to_string())
        .arg("--dns-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--no-dns-ipv6");
    if takeover {
        cmd.arg("--takeover");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(f.dir.join(log))?)
        .spawn()
        .context("starting agentwall run")?;
    cleanup::add_child(child.id());
    Ok(child)
}

fn stop(mut child: Child) -> Result<std::process::ExitStatus> {
    let pid = child.id();
    // SAFETY: our own unreaped child, by pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait();
    cleanup::forget_child(pid);
    Ok(status?)
}

/// Polls `cond` every 5 ms until it holds or `limit` passes.
fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    while !cond()? {
        ensure!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

async fn restart(
    ctx: &Arc<Ctx>,
    dp: &DnsPlan,
    agent_rel: &str,
    upstream: SocketAddr,
) -> Result<Restart> {
    let c = ctx.clone();
    let dp = *dp;
    let agent_rel = agent_rel.to_string();
    tokio::task::spawn_blocking(move || restart_blocking(&c, &dp, &agent_rel, upstream)).await?
}

fn restart_blocking(
    ctx: &Ctx,
    dp: &DnsPlan,
    agent_rel: &str,
    upstream: SocketAddr,
) -> Result<Restart> {
    let dir = ctx.dir.join("dns-restart");
    std::fs::create_dir_all(&dir)?;
    let f = RestartFiles {
        pin_dir: PathBuf::from(format!(
            "/sys/fs/bpf/agentwall-bench-{}-dns",
            std::process::id()
        )),
        socket: dir.join("control.sock"),
        policy: dir.join("bench-dns.yaml"),
        audit: dir.join("audit.jsonl"),
        dir,
    };
    std::fs::write(&f.policy, policy_yaml(agent_rel))?;
    let port = agentwall_tests::dns_load::free_dns_port()?;
    let mut a = controller(ctx, &f, upstream, port, false, "a.log")?;
    let log = |name: &str| std::fs::read_to_string(f.dir.join(name)).unwrap_or_default();
    let ready = until(
        "controller A's control socket",
        Duration::from_secs(30),
        || {
            if let Some(s) = a.try_wait()? {
                bail!("controller A exited at start ({s}): {}", log("a.log"));
            }
            Ok(f.socket.exists())
        },
    );
    if let Err(e) = ready {
        let _ = stop(a);
        return Err(e);
    }
    let mut s = spec(ctx, STEERED, true, RATE, dp.restart_ms);
    s.warmup = 50;
    let r = (|| -> Result<(Restart, Child)> {
        let mut client = spawn_load(ctx, &s)?;
        let mut out = BufReader::new(client.stdout.take().context("stdout")?);
        let mut started = String::new();
        out.read_line(&mut started)?;
        if !started.contains("started") {
            let status = client.wait()?;
            cleanup::forget_child(client.id());
            let mut e = String::new();
            if let Some(mut se) = client.stderr.take() {
                let _ = se.read_to_string(&mut e);
            }
            bail!(
                "the DNS load did not start through controller A ({status}): {}",
                e.trim()
            );
        }
        // A third into the run: B takes over.
        std::thread::sleep(Duration::from_millis(dp.restart_ms / 3));
        let b_start = sys::mono_ns();
        let _ = std::fs::remove_file(&f.socket);
        let mut b = controller(ctx, &f, upstream, port, true, "b.log")?;
        let mut a_exit = None;
        let mut b_ready = None;
        let waited = until("the handover", Duration::from_secs(40), || {
            if a_exit.is_none() {
                if let Some(st) = a.try_wait()? {
                    a_exit = Some((sys::mono_ns(), st));
                }
            }
            if b_ready.is_none() && f.socket.exists() {
                b_ready = Some(sys::mono_ns());
            }
            if let Some(st) = b.try_wait()? {
                bail!("controller B exited ({st})");
            }
            Ok(a_exit.is_some() && b_ready.is_some())
        });
        if let Err(e) = waited {
            let _ = stop(b);
            return Err(e.context(format!(
                "A said: {}\nB said: {}",
                log("a.log"),
                log("b.log")
            )));
        }
        let (a_ns, a_status) = a_exit.expect("waited for");
        cleanup::forget_child(a.id());
        let b_ns = b_ready.expect("waited for");
        let mut rest = String::new();
        out.read_to_string(&mut rest)?;
        let mut err = String::new();
        if let Some(mut se) = client.stderr.take() {
            let _ = se.read_to_string(&mut err);
        }
        let status = client.wait()?;
        cleanup::forget_child(client.id());
        ensure!(
            status.success(),
            "the DNS load process failed ({status}): {}",
            err.trim()
        );
        let line = rest
            .lines()
            .last()
            .context("the DNS load printed nothing")?;
        let rep: LoadReport =
            serde_json::from_str(line).with_context(|| format!("DNS load output {line:?}"))?;
        ensure!(
            a_status.success(),
            "controller A ended with {a_status} when taken over: {}",
            log("a.log")
        );
        // Times from B's start.
        let b_at_ms = b_start.saturating_sub(rep.start_ns) as f64 / 1e6;
        let restart = Restart {
            sent: rep.sent,
            ok: rep.ok,
            failed: rep.failed,
            timeouts: rep.timeouts,
            servfail: rep.servfail,
            refused: rep.refused,
            other: rep.other,
            failures: rep
                .failures
                .iter()
                .map(|x| (x.at_ms - b_at_ms, x.kind.clone()))
                .collect(),
            max_delay_us: rep.max_latency_us,
            max_delay_at_ms: rep.max_latency_at_ms - b_at_ms,
            a_exited_ms: a_ns.saturating_sub(b_start) as f64 / 1e6,
            b_ready_ms: b_ns.saturating_sub(b_start) as f64 / 1e6,
            latency_us: Pct::of(&rep.latencies_us),
        };
        Ok((restart, b))
    })();
    match r {
        Ok((restart, b)) => {
            let st = stop(b)?;
            ensure!(
                st.success(),
                "controller B ended with {st}: {}",
                log("b.log")
            );
            let out = agentwall(ctx)
                .args(["uninstall", "--pin-dir"])
                .arg(&f.pin_dir)
                .output()?;
            ensure!(
                out.status.success(),
                "agentwall uninstall --pin-dir {}: {}",
                f.pin_dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(restart)
        }
        Err(e) => {
            if a.try_wait().ok().flatten().is_none() {
                let _ = stop(a);
            }
            Err(e)
        }
    }
}
