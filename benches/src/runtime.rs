//! Runtime control measured against the kernel (`agentwall-bench __daemon --mode runtime`), in
//! a controller of its own whose policy lets 127.64.0.0/16 and the loopback server be granted:
//!
//! - grant and revoke latency: an agent process connects in a tight loop to a granted address
//!   (`__load --kind flip`) and stamps each change of the kernel's answer; the time is from
//!   `Handle::grant` (or `revoke`) returning to the first connect allowed (or refused);
//! - revoke to reset: an agent process holds an established connection that a grant allowed;
//!   the time is from calling `revoke` to the server side's read() ending (RST or EOF);
//! - the agent's TCP connect rate with 1,000 live grants of its own and a rate limit configured
//!   (1,000,000/s, never reached: every call takes a token), the connections allowed only by
//!   one of the grants (compared with the floor of the same round by the report), and the
//!   time of the last 100 grant calls made before it;
//! - to split the latency: each call's own time, and the agent's run-queue wait in each sample
//!   (`/proc/PID/schedstat`).

use std::{
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Child,
    time::Duration,
};

use agentwall::{
    control::{Caller, GrantRequest},
    daemon::Handle,
    identity::cgroup,
};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    cleanup,
    configs::Ctx,
    daemon::{DaemonChild, Reply},
    load::{self, Flip, Kind as LoadKind},
    report::Plan,
    sys,
};

/// The grantable network; the agent's policy allows none of it by itself.
const GRANTABLE: &str = "127.64.0.0/16";
/// How long each bench grant lives (far beyond the test: revokes end them, or the controller).
const GRANT_TTL_S: u64 = 600;
/// A change of the kernel's answer must show within this, or the test fails.
const FLIP_DEADLINE: Duration = Duration::from_secs(2);
/// The server must see a revoked connection end within this, or the test fails.
const RESET_DEADLINE: Duration = Duration::from_secs(5);

/// One round's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuntimeFigures {
    /// `grant` returned to the agent's first connect allowed, µs.
    pub grant_us: Vec<f64>,
    /// `revoke` returned to the agent's first connect refused (EPERM), µs.
    pub revoke_us: Vec<f64>,
    /// The calls themselves: `grant` / `revoke` called to returned, µs (the kernel map is
    /// written inside, before the reply).
    pub grant_call_us: Vec<f64>,
    pub revoke_call_us: Vec<f64>,
    /// For each sample of `grant_us` / `revoke_us`: how long the agent's connect loop waited
    /// on a run queue (not running, its CPU taken) in that window, µs, from the delta of
    /// `/proc/PID/schedstat` between the call returning and the flip being read. A sample
    /// mostly made of this is the scheduler's, not the controller's or the kernel map's.
    pub grant_wait_us: Vec<f64>,
    pub revoke_wait_us: Vec<f64>,
    /// The last 100 grant calls of the connect-rate test, made with up to `grants` live grants
    /// of the agent, µs: what a grant costs the controller when an agent holds many.
    pub grant_call_full_us: Vec<f64>,
    /// `revoke` called to the server's read() of the live connection ending, µs.
    pub reset_us: Vec<f64>,
    /// How the server saw those ends: reset (RST) or EOF.
    pub resets_rst: usize,
    pub resets_eof: usize,
    /// Live grants of the agent while the TCP loop ran.
    pub live_grants: usize,
    pub tcp_with_grants_ns_per_op: f64,
    /// The same loop from a sub-agent inside the agent's cgroup (delegation): allowed by the
    /// sub-agent's own rule, then by the agent's grant among its 1,000.
    #[serde(default)]
    pub tcp_sub_agent_ns_per_op: f64,
    pub tcp_ops: u64,
}

/// The runtime child's inputs (from `DaemonArgs`).
pub struct Params {
    pub exe: PathBuf,
    pub agent: PathBuf,
    pub agent_rel: String,
    pub server: SocketAddrV4,
    pub cpu: usize,
    pub cycles: usize,
    pub resets: usize,
    pub grants: usize,
    pub tcp_ops: u64,
}

/// The runtime policy: nothing the tests use is allowed by a rule; 127.64.0.0/16 (TCP) and
/// the loopback TCP server may be granted. A rate limit is configured, the highest a policy
/// takes (never reached here), so every call pays for the kernel's token bucket.
pub fn policy_yaml(agent_rel: &str, server: SocketAddrV4) -> String {
    format!(
        "name: bench-runtime\nmode: enforce\nagents:\n  cgroups:\n    - {agent_rel}\n\
         rate_limit:\n  per_second: 1000000\n  burst: 1000000\n\
         egress:\n  - cidr: 192.0.2.0/24\n    ports: [443]\n    protocol: tcp\n\
         grantable:\n  - cidr: {GRANTABLE}\n    protocol: tcp\n\
         \x20 - cidr: {}/32\n    ports: [{}]\n    protocol: tcp\n\
         max_grant_ttl: 1h\napprove: manual\n",
        server.ip(),
        server.port()
    )
}

/// A sub-agent's policy (`<agent>/sub`): the loopback server only. Each of its connects is
/// judged by it and by the agent enclosing it (delegation).
pub fn sub_policy_yaml(agent_rel: &str, server: SocketAddrV4) -> String {
    format!(
        "name: bench-runtime-sub\nmode: enforce\nagents:\n  cgroups:\n    - {agent_rel}/sub\n\
         egress:\n  - cidr: {}/32\n    ports: [{}]\n    protocol: tcp\n",
        server.ip(),
        server.port()
    )
}

const ADMIN: Caller = Caller::Admin { uid: 0 };

async fn grant(h: &Handle, agent: &str, to: String, ports: Option<String>) -> Result<u64> {
    let req = GrantRequest {
        agent: agent.to_string(),
        to: to.clone(),
        ports,
        protocol: Some("tcp".into()),
        ttl_secs: GRANT_TTL_S,
        task: None,
        reason: "agentwall-bench".into(),
    };
    let g = h
        .grant(req, ADMIN)
        .await
        .map_err(|e| anyhow!("grant to {to}: {e}"))?;
    Ok(g.id)
}

async fn revoke(h: &Handle, id: u64) -> Result<u64> {
    let r = h
        .revoke(id, ADMIN)
        .await
        .map_err(|e| anyhow!("revoke {id}: {e}"))?;
    Ok(r.sockets_destroyed)
}

fn spec(p: &Params, kind: LoadKind, target: SocketAddrV4) -> load::Spec {
    load::Spec {
        kind,
        target,
        proxy: None,
        program: None,
        n: 0,
        warmup: 0,
        until_signal: Some(120.0),
        cgroup: p.agent.clone(),
        cpu: p.cpu,
    }
}

/// Stops a flip or hold process (SIGUSR1) and checks that it ended well.
fn stop(mut child: Child, what: &str) -> Result<()> {
    let pid = child.id();
    // SAFETY: our own unreaped child.
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait();
    cleanup::forget_child(pid);
    let status = status.with_context(|| format!("waiting for the {what}"))?;
    ensure!(
        status.success(),
        "the {what} failed ({status}): {}",
        err.trim()
    );
    Ok(())
}

/// The child's side: every measurement, with the controller `h` running.
pub async fn measure(h: &Handle, p: &Params) -> Result<RuntimeFigures> {
    let mut f = RuntimeFigures::default();
    latency(h, p, &mut f)
        .await
        .context("grant/revoke latency")?;
    resets(h, p, &mut f).await.context("revoke to reset")?;
    rate(h, p, &mut f)
        .await
        .context("TCP connect rate with live grants")?;
    Ok(f)
}

async fn next_flip(rx: &mut mpsc::UnboundedReceiver<String>, want: bool) -> Result<Flip> {
    loop {
        let line = tokio::time::timeout(FLIP_DEADLINE, rx.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "the agent's connects were not {} within {FLIP_DEADLINE:?}",
                    if want { "allowed" } else { "refused" }
                )
            })?
            .context("the flip process ended")?;
        if line.contains("started") {
            continue;
        }
        let fl: Flip =
            serde_json::from_str(&line).with_context(|| format!("flip process said {line:?}"))?;
        ensure!(fl.ok == want, "the kernel's answer flipped twice: {line}");
        return Ok(fl);
    }
}

async fn latency(h: &Handle, p: &Params, f: &mut RuntimeFigures) -> Result<()> {
    let addr = Ipv4Addr::new(127, 64, 0, 1);
    let listener = TcpListener::bind((addr, 0)).with_context(|| format!("binding {addr}"))?;
    // std listens with a backlog of 128: a full accept queue (the accept thread not scheduled
    // for a few ms) drops a SYN, and the connect then waits a 1 s retransmission.
    // SAFETY: listen(2) again on our listening socket only resizes its backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listen backlog");
    }
    let target = SocketAddrV4::new(addr, listener.local_addr()?.port());
    // Accept and drop: the agent's connects complete.
    std::thread::spawn(move || listener.incoming().for_each(drop));
    // This controller's threads (actor, event reader, the accept thread) go to the other CPU
    // while the agent's loop runs: the bench's own work must not take the agent's CPU (the
    // servers' rule for every workload). The flip process pins itself back to `p.cpu`.
    let all = sys::allowed_cpus()?;
    let other: Vec<usize> = all.iter().copied().filter(|c| *c != p.cpu).collect();
    sys::pin_process(&other)?;
    let r = flips(h, p, target).await;
    sys::pin_process(&all)?;
    let samples = r?;
    f.grant_us.extend(samples.grant_us);
    f.revoke_us.extend(samples.revoke_us);
    f.grant_call_us.extend(samples.grant_call_us);
    f.revoke_call_us.extend(samples.revoke_call_us);
    f.grant_wait_us.extend(samples.grant_wait_us);
    f.revoke_wait_us.extend(samples.revoke_wait_us);
    Ok(())
}

/// The grant/revoke cycles against the agent's flip loop connecting to `target`.
async fn flips(h: &Handle, p: &Params, target: SocketAddrV4) -> Result<RuntimeFigures> {
    let mut f = RuntimeFigures::default();
    let addr = *target.ip();
    let mut child = spec(p, LoadKind::Flip, target).spawn(&p.exe)?;
    let waited = run_queue_wait(child.id());
    let out = child.stdout.take().context("stdout")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = async {
        next_flip(&mut rx, false)
            .await
            .context("before any grant, the agent must be refused")?;
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
        for _ in 0..p.cycles {
            let called = sys::mono_ns();
            let id = grant(h, &p.agent_rel, format!("{addr}/32"), None).await?;
            let t0 = sys::mono_ns();
            let w0 = waited();
            let on = next_flip(&mut rx, true).await?;
            f.grant_wait_us.push(us(w0, waited()));
            f.grant_us.push(us(t0, on.ns));
            f.grant_call_us.push(us(called, t0));
            tokio::time::sleep(Duration::from_millis(1)).await;
            let called = sys::mono_ns();
            revoke(h, id).await?;
            let t0 = sys::mono_ns();
            let w0 = waited();
            let off = next_flip(&mut rx, false).await?;
            f.revoke_wait_us.push(us(w0, waited()));
            f.revoke_us.push(us(t0, off.ns));
            f.revoke_call_us.push(us(called, t0));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let stopped = stop(child, "flip process");
    match (result, stopped) {
        (Err(e), Err(s)) => Err(e.context(format!("{s:#}"))),
        (r, s) => r.and(s).map(|()| f),
    }
}

/// The time process `pid` has spent waiting on a run queue so far, ns (the second field of
/// `/proc/PID/schedstat`; 0 when it cannot be read).
fn run_queue_wait(pid: u32) -> impl Fn() -> u64 {
    let path = format!("/proc/{pid}/schedstat");
    move || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }
}

async fn resets(h: &Handle, p: &Params, f: &mut RuntimeFigures) -> Result<()> {
    ensure!(p.resets <= 250 * 250, "at most 62,500 resets");
    for i in 0..p.resets {
        let addr = Ipv4Addr::new(127, 64, 1 + (i / 250) as u8, 1 + (i % 250) as u8);
        let listener = TcpListener::bind((addr, 0)).with_context(|| format!("binding {addr}"))?;
        let target = SocketAddrV4::new(addr, listener.local_addr()?.port());
        let id = grant(h, &p.agent_rel, format!("{addr}/32"), None).await?;
        let mut holder = spec(p, LoadKind::Hold, target).spawn(&p.exe)?;
        let out = holder.stdout.take().context("stdout")?;
        let r = async {
            let started = tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(out).read_line(&mut line).map(|_| line)
            })
            .await??;
            ensure!(
                started.contains("started"),
                "the agent's connection to {target} was not made (a grant allows it)"
            );
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(RESET_DEADLINE))?;
            let reader = std::thread::spawn(move || {
                let mut b = [0u8; 16];
                let r = conn.read(&mut b);
                (r, sys::mono_ns())
            });
            let t0 = sys::mono_ns();
            let destroyed = revoke(h, id).await?;
            let (r, t1) = tokio::task::spawn_blocking(move || reader.join())
                .await?
                .map_err(|_| anyhow!("the reader thread panicked"))?;
            match r {
                Ok(0) => f.resets_eof += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => f.resets_rst += 1,
                Ok(n) => bail!("the server read {n} bytes instead of the connection's end"),
                Err(e) => bail!(
                    "the server never saw the revoked connection end ({e}); revoke said it \
                     destroyed {destroyed} sockets"
                ),
            }
            ensure!(
                destroyed >= 1,
                "revoke destroyed no socket, yet the connection ended"
            );
            f.reset_us.push(t1.saturating_sub(t0) as f64 / 1e3);
            Ok(())
        }
        .await;
        let stopped = stop(holder, "holding process");
        match (r, stopped) {
            (Err(e), Err(s)) => return Err(e.context(format!("{s:#}"))),
            (r, s) => r.and(s)?,
        }
    }
    Ok(())
}

async fn rate(h: &Handle, p: &Params, f: &mut RuntimeFigures) -> Result<()> {
    ensure!(p.grants >= 1 && p.grants < 60_000, "1 to 59,999 grants");
    // The others first, /32s from 127.64.16.0 up (clear of the tests above).
    let base = u32::from(Ipv4Addr::new(127, 64, 16, 0));
    for i in 0..p.grants - 1 {
        let a = Ipv4Addr::from(base + i as u32);
        let called = sys::mono_ns();
        grant(h, &p.agent_rel, format!("{a}/32"), None).await?;
        if i + 101 >= p.grants {
            f.grant_call_full_us
                .push((sys::mono_ns() - called) as f64 / 1e3);
        }
    }
    grant(
        h,
        &p.agent_rel,
        format!("{}/32", p.server.ip()),
        Some(p.server.port().to_string()),
    )
    .await?;
    let live = h.grants().await.map_err(|e| anyhow!("grants: {e}"))?.len();
    ensure!(
        live >= p.grants,
        "{live} live grants, {} made: some did not stay",
        p.grants
    );
    f.live_grants = live;
    let mut s = spec(p, LoadKind::Tcp, p.server);
    s.until_signal = None;
    s.n = p.tcp_ops;
    s.warmup = (p.tcp_ops / 10).max(10);
    let exe = p.exe.clone();
    let sub_spec = s.clone();
    let r = tokio::task::spawn_blocking(move || s.run(&exe)).await??;
    f.tcp_with_grants_ns_per_op = r.ns_per_op();
    f.tcp_ops = r.ops;

    // The same loop from a sub-agent: its rule, then the agent's grant (delegation).
    let sub = p.agent.join("sub");
    cgroup::create(&sub)?;
    let measured = async {
        h.register(&sub).await?;
        let mut s = sub_spec;
        s.cgroup = sub.clone();
        let exe = p.exe.clone();
        let r = tokio::task::spawn_blocking(move || s.run(&exe)).await??;
        anyhow::Ok(r.ns_per_op())
    }
    .await;
    // Its processes have exited: the cgroup goes (the controller forgets it on the event).
    let _ = std::fs::remove_dir(&sub);
    f.tcp_sub_agent_ns_per_op = measured.context("the sub-agent's TCP loop")?;
    Ok(())
}

/// One round's runtime measurements, as the bench sees them.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeRep {
    pub round: usize,
    #[serde(flatten)]
    pub figures: RuntimeFigures,
}

/// The parent's side: a runtime child with its own controller and policy.
pub fn runtime_rep(ctx: &Ctx, round: usize, plan: &Plan) -> Result<RuntimeRep> {
    let file = ctx.dir.join("bench-runtime.yaml");
    std::fs::write(&file, policy_yaml(&agent_rel(&ctx.agent)?, ctx.tcp))?;
    let log = ctx.dir.join(format!("audit-runtime-r{round}.jsonl"));
    let extra = [
        format!("--cycles={}", plan.grant_cycles),
        format!("--resets={}", plan.reset_samples),
        format!("--grants={}", plan.live_grants),
        format!("--tcp-ops={}", plan.tcp_ops),
    ];
    let mut d = DaemonChild::spawn(ctx, "runtime", &file, &log, &extra)?;
    let figures = match d.reply()? {
        Reply::Runtime(f) => f,
        r => bail!("unexpected reply {r:?}"),
    };
    d.wait()?;
    let _ = std::fs::remove_file(&log);
    Ok(RuntimeRep { round, figures })
}

/// The agent's path relative to the cgroup2 mount, as policies and grants name it.
pub fn agent_rel(agent: &Path) -> Result<String> {
    Ok(cgroup::relative(&cgroup::cgroup2_mount()?, agent)?)
}
