//! A controller restart under DNS load (issue 11, item 6), against the real kernel: controller A
//! (`agentwall run` with a pin directory and the DNS proxy) serves an agent that sends queries
//! for an allowed name at 200/s from a process of its own (dns_load); controller B starts with
//! `--takeover` and the same flags. A must exit cleanly, B must answer, and not one query may
//! fail (no valid answer within 2 s, SERVFAIL or REFUSED). An address resolved through A must
//! keep connecting while B starts (the resolved entries are pinned).

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentwall_tests::{
    dns_load::{mono_ns, LoadReport, LoadSpec},
    dns_server::{DnsServer, Rec},
    probe_in, sa, sibling_exe, tcp_server, wait, Daemon, TestCgroups,
};
use anyhow::{bail, ensure, Context, Result};

const NAME: &str = "api.restart.test";
const ADDR: &str = "127.0.21.1";
/// Any resolver address: the agent's port-53 traffic goes to the proxy.
const RESOLVER: &str = "127.0.0.99:53";
const RATE: u32 = 200;
const RUN_MS: u64 = 8_000;

fn controller(d: &Daemon, upstream: SocketAddr, port: u16, takeover: bool) -> Result<Child> {
    let log = d.dir.join(if takeover { "b.log" } else { "a.log" });
    let mut cmd = Command::new(&d.agentwall);
    cmd.arg("run")
        .arg("--policy")
        .arg(d.dir.join("policies"))
        .arg("--audit-log")
        .arg(&d.audit)
        .arg("--control-socket")
        .arg(&d.socket)
        .arg("--agent-socket")
        .arg(d.dir.join("agent.sock"))
        .arg("--pin-dir")
        .arg(&d.pin_dir)
        .args(["--rescan-ms", "100"])
        .arg("--dns-upstream")
        .arg(upstream.to_string())
        .arg("--dns-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--no-dns-ipv6");
    if takeover {
        cmd.arg("--takeover");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting agentwall run")
}

fn log(d: &Daemon, name: &str) -> String {
    std::fs::read_to_string(d.dir.join(name)).unwrap_or_default()
}

/// Stops a controller we started (SIGTERM, by pid) and returns how it ended.
fn stop(mut c: Child) -> Result<std::process::ExitStatus> {
    // SAFETY: our own child, by pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    Ok(c.wait()?)
}

/// The controllers still running (not yet reaped) when a test fails are stopped.
struct Running {
    a: Option<Child>,
    b: Option<Child>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in [self.a.take(), self.b.take()].into_iter().flatten() {
            let _ = stop(c);
        }
    }
}

/// One stub-resolver query from the agent: the rcode and the answers.
fn lookup(agent: &Path) -> Result<(String, String)> {
    let out = probe_in(agent, &[format!("dns:{RESOLVER},{NAME},A")])?;
    let o = &out[0];
    let v: serde_json::Value = serde_json::from_str(&o.detail)
        .with_context(|| format!("the probe's dns step said {o:?}"))?;
    Ok((
        v["rcode"].as_str().unwrap_or("").to_string(),
        v["answers"].to_string(),
    ))
}

#[test]
fn takeover_under_dns_load_fails_no_query() -> Result<()> {
    let cg = TestCgroups::new()?;
    let agent = cg.make("agent")?;
    let upstream = DnsServer::start(&[Rec::a(NAME, ADDR, 300)])?;
    let (_server, target) = tcp_server(ADDR)?;
    let d = Daemon::prepare("dns-restart")?;
    d.write_policy(
        "agent.yaml",
        &format!(
            "name: dns-restart\nagents:\n  cgroups: [\"{}\"]\negress:\n  - host: {NAME}\n    \
             ports: [{}]\n    protocol: tcp\n",
            cg.rel("agent"),
            target.port()
        ),
    )?;
    let port = agentwall_tests::dns_load::free_dns_port()?;
    let mut running = Running {
        a: Some(controller(&d, upstream.addr(), port, false)?),
        b: None,
    };

    // A serves: its control socket, and a lookup through its proxy.
    let sock_dir = wait::dir_of(&d.socket).to_path_buf();
    wait::until(
        "controller A's control socket",
        Duration::from_secs(20),
        &[&sock_dir],
        || {
            if let Some(s) = running.a.as_mut().expect("A").try_wait()? {
                running.a = None;
                bail!("controller A exited at start ({s}): {}", log(&d, "a.log"));
            }
            Ok(d.socket.exists().then_some(()))
        },
    )?;
    let (rcode, answers) = lookup(&agent)?;
    ensure!(
        rcode == "NOERROR" && answers.contains(ADDR),
        "through controller A, {NAME} gave {rcode} {answers}: {}",
        log(&d, "a.log")
    );
    let connect = format!("tcp:{}", sa(target));
    let c = probe_in(&agent, std::slice::from_ref(&connect))?;
    ensure!(
        c[0].ok,
        "{ADDR}, resolved through A, does not connect: {c:?}"
    );

    // The load: 200 queries/s from the agent for RUN_MS.
    let spec = LoadSpec {
        server: RESOLVER.parse()?,
        names: vec![NAME.to_string()],
        rate: RATE,
        outstanding: 0,
        duration_ms: RUN_MS,
        warmup: 20,
        timeout_ms: 2000,
        cgroup: Some(agent.clone()),
        cpu: None,
    };
    let before = upstream.queries(NAME);
    let mut client = Command::new(sibling_exe("dns_load")?)
        .arg(serde_json::to_string(&spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting dns_load")?;
    let mut out = BufReader::new(client.stdout.take().context("stdout")?);
    let mut started = String::new();
    out.read_line(&mut started)?;
    if !started.contains("started") {
        let mut e = String::new();
        let _ = client.stderr.take().map(|mut s| s.read_to_string(&mut e));
        let st = client.wait()?;
        bail!("the DNS load did not start ({st}): {e}");
    }
    let load_start: u64 = serde_json::from_str::<serde_json::Value>(&started)?["ns"]
        .as_u64()
        .context("started line")?;

    // A quarter of the load answered through A (each answer is a record in A's audit log, which
    // wakes the wait): B takes over.
    let quarter = u64::from(RATE) * RUN_MS / 4_000;
    wait::until(
        "a quarter of the load answered through controller A",
        Duration::from_millis(RUN_MS),
        &[&d.dir],
        || Ok((upstream.queries(NAME) >= before + quarter).then_some(())),
    )?;
    let _ = std::fs::remove_file(&d.socket);
    let b_start = mono_ns();
    running.b = Some(controller(&d, upstream.addr(), port, true)?);
    // Until A is gone and B serves: the address A resolved connects, every time.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut a_status = None;
    let mut a_exit_ms = 0.0;
    let (mut connects, mut connects_before_b, mut connects_no_controller) = (0, 0, 0);
    loop {
        if a_status.is_none() {
            if let Some(s) = running.a.as_mut().expect("A").try_wait()? {
                running.a = None;
                a_status = Some(s);
                a_exit_ms = (mono_ns() - b_start) as f64 / 1e6;
            }
        }
        if let Some(s) = running.b.as_mut().expect("B").try_wait()? {
            running.b = None;
            bail!("controller B exited ({s}): {}", log(&d, "b.log"));
        }
        let b_ready = d.socket.exists();
        if a_status.is_some() && b_ready {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no handover within 40 s (A exited: {a_status:?}, B serving: {b_ready})\nA: {}\nB: {}",
            log(&d, "a.log"),
            log(&d, "b.log")
        );
        let c = probe_in(&agent, std::slice::from_ref(&connect))?;
        ensure!(
            c[0].ok,
            "while B starts ({:.0} ms after it was started; A exited: {a_status:?}), {ADDR}, \
             resolved through A, does not connect: {c:?}",
            (mono_ns() - b_start) as f64 / 1e6
        );
        connects += 1;
        if !b_ready {
            connects_before_b += 1;
            if a_status.is_some() {
                connects_no_controller += 1;
            }
        }
    }
    let b_ready_ms = (mono_ns() - b_start) as f64 / 1e6;
    let a_status = a_status.expect("looped until A exited");
    ensure!(
        a_status.success(),
        "controller A, taken over, ended with {a_status}: {}",
        log(&d, "a.log")
    );
    ensure!(
        connects_before_b >= 1,
        "no connect was tried while B was starting (it was ready {b_ready_ms:.0} ms after it \
         was started)"
    );

    // The load's end: not one query failed.
    let mut rest = String::new();
    out.read_to_string(&mut rest)?;
    let mut err = String::new();
    let _ = client.stderr.take().map(|mut s| s.read_to_string(&mut err));
    let st = client.wait()?;
    ensure!(st.success(), "dns_load failed ({st}): {err}");
    let rep: LoadReport = serde_json::from_str(rest.lines().last().context("no report")?)?;
    let b_at_ms = b_start.saturating_sub(load_start) as f64 / 1e6;
    let failures: Vec<String> = rep
        .failures
        .iter()
        .map(|f| format!("{} at {:+.0} ms from B's start", f.kind, f.at_ms - b_at_ms))
        .collect();
    eprintln!(
        "dns_restart: {} sent, {} answered, {} failed; longest answer {:.1} ms (due {:+.0} ms \
         from B's start); A exited {a_exit_ms:.0} ms and B served {b_ready_ms:.0} ms after B \
         was started; {connects} connects to {ADDR} during the handover ({connects_before_b} \
         before B served, {connects_no_controller} with no controller running)",
        rep.sent,
        rep.ok,
        rep.failed,
        rep.max_latency_us / 1e3,
        rep.max_latency_at_ms - b_at_ms
    );
    ensure!(
        rep.sent >= u64::from(RATE) * RUN_MS / 1000 * 9 / 10,
        "the load sent {} queries in {RUN_MS} ms at {RATE}/s",
        rep.sent
    );
    // The proxies' own records of the queries they did not answer NOERROR (the first few).
    let refused: Vec<String> = d
        .records()
        .unwrap_or_default()
        .iter()
        .filter(|r| r.kind == "dns")
        .filter_map(|r| r.detail.as_ref())
        .filter(|v| v["rcode"].as_str() != Some("NOERROR"))
        .take(3)
        .map(|v| v.to_string())
        .collect();
    ensure!(
        rep.failed == 0 && rep.ok == rep.sent,
        "{} of {} queries failed across the takeover ({} timeouts, {} SERVFAIL, {} REFUSED, {} \
         other; {} answered): {failures:?}\nthe proxies' records of them: {refused:#?}\nA: {}\n\
         B: {}",
        rep.failed,
        rep.sent,
        rep.timeouts,
        rep.servfail,
        rep.refused,
        rep.other,
        rep.ok,
        log(&d, "a.log"),
        log(&d, "b.log")
    );

    // B answers, and what it resolves connects.
    let (rcode, answers) = lookup(&agent)?;
    ensure!(
        rcode == "NOERROR" && answers.contains(ADDR),
        "through controller B, {NAME} gave {rcode} {answers}: {}",
        log(&d, "b.log")
    );
    let c = probe_in(&agent, std::slice::from_ref(&connect))?;
    ensure!(
        c[0].ok,
        "{ADDR}, resolved through B, does not connect: {c:?}"
    );

    // Clean up: B stopped, the pins uninstalled (the cgroups go with `cg`).
    let st = stop(running.b.take().expect("B"))?;
    ensure!(
        st.success(),
        "controller B ended with {st}: {}",
        log(&d, "b.log")
    );
    let (ok, said) = d.uninstall()?;
    ensure!(ok, "agentwall uninstall --pin-dir: {said}");
    ensure!(
        !d.pin_dir.exists(),
        "{} is still there after uninstall",
        d.pin_dir.display()
    );
    Ok(())
}

/// A takeover's backlog is one agent's burst: every query sent while B started reaches B at
/// once. Past the 128 an agent may have in flight, its queries wait for its own to finish; a
/// burst of 600 from one agent is answered whole, none REFUSED.
#[tokio::test(flavor = "multi_thread")]
async fn one_agents_burst_past_its_in_flight_bound_is_served_not_refused() -> Result<()> {
    use agentwall::{
        daemon::{self, DnsOptions, Options, PolicySource},
        policy::{self, PolicySet},
    };
    let cg = TestCgroups::new()?;
    let agent = cg.make("agent")?;
    let upstream = DnsServer::start(&[Rec::a(NAME, ADDR, 300)])?;
    let yaml = format!(
        "name: dns-burst\nagents:\n  cgroups: [\"{}\"]\negress:\n  - host: {NAME}\n    \
         ports: [80]\n    protocol: tcp\n",
        cg.rel("agent")
    );
    let p = policy::parse_policy(Path::new("burst.yaml"), &yaml)?;
    let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: vec![p] }));
    opts.control_socket = None;
    opts.dns = Some(DnsOptions {
        upstream: upstream.addr(),
        listen_v4: "127.0.0.1:0".parse()?,
        listen_v6: None,
    });
    let h = daemon::start(opts).await?;
    let result = async {
        h.register(&agent).await?;
        // Closed loop with 600 in flight: 600 queries at once, then one per answer.
        let spec = LoadSpec {
            server: RESOLVER.parse()?,
            names: vec![NAME.to_string()],
            rate: 0,
            outstanding: 600,
            duration_ms: 1000,
            warmup: 5,
            timeout_ms: 2000,
            cgroup: Some(agent.clone()),
            cpu: None,
        };
        let out = tokio::task::spawn_blocking(move || {
            Command::new(sibling_exe("dns_load")?)
                .arg(serde_json::to_string(&spec)?)
                .output()
                .context("running dns_load")
        })
        .await??;
        ensure!(
            out.status.success(),
            "dns_load failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        let rep: LoadReport = serde_json::from_str(text.lines().last().context("no report")?)?;
        ensure!(rep.sent >= 600, "only {} queries sent", rep.sent);
        ensure!(
            rep.failed == 0 && rep.ok == rep.sent,
            "{} of {} queries of one agent's burst failed ({} REFUSED, {} SERVFAIL, {} timeouts, \
             {} other): {:?}",
            rep.failed,
            rep.sent,
            rep.refused,
            rep.servfail,
            rep.timeouts,
            rep.other,
            rep.failures.iter().take(5).collect::<Vec<_>>()
        );
        Ok(())
    }
    .await;
    h.shutdown().await?;
    result
}
