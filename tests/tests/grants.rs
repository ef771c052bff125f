//! Runtime control against the real kernel: a grant allows what the policy denies until its
//! deadline (also with no controller running), revoke resets a live connection, a grant
//! outside the policy's scope is refused, and the task is carried in the agent's records.

use std::{
    io::Read,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agentwall::{
    control::{Caller, ControlError, GrantRequest, TaskStart},
    daemon::{self, Handle, Options, PolicySource},
    events::{AuditRecord, DecisionRecord},
    policy::{self, PolicySet},
};
use agentwall_tests::{
    inproc::{connect_errno, next_decision_to, next_record, wait_denied},
    tcp_server, TestCgroups, EPERM,
};
use anyhow::{bail, ensure, Context, Result};
use tokio::sync::mpsc;

const ADMIN: Caller = Caller::Admin { uid: 0 };

/// Allows 127.0.0.1 only; anything on 127.0.0.0/8 over TCP may be granted for up to an hour.
const POLICY: &str = r#"
name: grants-test
agents:
  cgroups: ["{agent}"]
egress:
  - cidr: 127.0.0.1/32
    ports: "9"
grantable:
  - cidr: 127.0.0.0/8
    protocol: tcp
  - cidr: ::1/128
    protocol: tcp
max_grant_ttl: 1h
"#;

/// A controller enforcing POLICY on `<base>/agent`, with every record it writes.
struct Ctl {
    _cgroups: TestCgroups,
    agent: PathBuf,
    handle: Option<Handle>,
    records: mpsc::UnboundedReceiver<AuditRecord>,
}

fn options(cgroups: &TestCgroups) -> Result<(Options, mpsc::UnboundedReceiver<AuditRecord>)> {
    let yaml = POLICY.replace("{agent}", &cgroups.rel("agent"));
    let p = policy::parse_policy(Path::new("grants.yaml"), &yaml)?;
    let (tap, records) = mpsc::unbounded_channel();
    let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: vec![p] }));
    opts.control_socket = None;
    opts.tap = Some(tap);
    Ok((opts, records))
}

impl Ctl {
    async fn start() -> Result<Ctl> {
        let cgroups = TestCgroups::new()?;
        let agent = cgroups.make("agent")?;
        let (opts, records) = options(&cgroups)?;
        let handle = daemon::start(opts).await?;
        handle.register(&agent).await?;
        Ok(Ctl {
            _cgroups: cgroups,
            agent,
            handle: Some(handle),
            records,
        })
    }

    fn h(&self) -> &Handle {
        self.handle.as_ref().expect("running")
    }

    /// Records until one matches `want` (fails after 5 s).
    async fn wait_record(&mut self, want: impl Fn(&AuditRecord) -> bool) -> Result<AuditRecord> {
        next_record(&mut self.records, Duration::from_secs(5), want).await
    }

    /// The next decision record about `dst`.
    async fn decision_to(&mut self, dst: SocketAddr) -> Result<DecisionRecord> {
        let r = next_decision_to(&mut self.records, dst).await?;
        Ok(r.decision.expect("a decision"))
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        Ok(())
    }
}

fn grant(agent: &str, to: SocketAddr, ttl_secs: u64, task: Option<&str>) -> GrantRequest {
    GrantRequest {
        agent: agent.into(),
        to: to.ip().to_string(),
        ports: Some(to.port().to_string()),
        protocol: Some("tcp".into()),
        ttl_secs,
        task: task.map(str::to_string),
        reason: "kernel test".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_allows_a_denied_destination_until_its_deadline() -> Result<()> {
    let mut c = Ctl::start().await?;
    let (_l, to) = tcp_server("127.0.0.2")?;
    assert_eq!(
        connect_errno(&c.agent, to)?,
        EPERM,
        "denied without a grant"
    );
    let d = c.decision_to(to).await?;
    assert_eq!(d.decision, "deny");

    let g = c.h().grant(grant("agent", to, 2, None), ADMIN).await?;
    let granted = Instant::now();
    assert_eq!(connect_errno(&c.agent, to)?, 0, "the grant allows it");
    let d = c.decision_to(to).await?;
    assert_eq!((d.decision.as_str(), d.reason.as_str()), ("allow", "grant"));
    assert_eq!(d.grant, Some(g.id));
    assert_eq!(d.rule, Some(g.id as u32));
    // Another port of the same host stays denied: the grant names one port.
    let other = SocketAddr::new(to.ip(), to.port().wrapping_add(1).max(1));
    assert_eq!(connect_errno(&c.agent, other)?, EPERM);

    wait_denied(&c.agent, to, Duration::from_secs(5))?;
    let at = granted.elapsed();
    ensure!(
        at >= Duration::from_millis(1900),
        "the grant stopped after {at:?}, before its 2 s deadline"
    );
    let r = c
        .wait_record(|r| r.kind == "grant-expired")
        .await
        .context("the controller records the expiry")?;
    assert_eq!(r.detail.as_ref().unwrap()["grant"], g.id);
    assert!(c.h().grants().await?.is_empty());
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_ends_a_grant_on_time_with_no_controller_running() -> Result<()> {
    agentwall::datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    let cgroups = TestCgroups::new()?;
    let agent = cgroups.make("agent")?;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/agentwall-test-grants-{}",
        std::process::id()
    ));
    let (l, to) = tcp_server("127.0.0.6")?;
    let (mut opts, records) = options(&cgroups)?;
    opts.pin_dir = Some(pin_dir.clone());
    // A controller on a runtime of its own, killed (its runtime dropped, no shutdown) once the
    // grant is in: pinned programs and maps keep enforcing, nothing of it runs.
    let agent2 = agent.clone();
    let granted = std::thread::spawn(move || -> Result<Instant> {
        let rt = tokio::runtime::Runtime::new()?;
        let at = rt.block_on(async {
            let h = daemon::start(opts).await?;
            h.register(&agent2).await?;
            h.grant(grant("agent", to, 2, None), ADMIN).await?;
            let at = Instant::now();
            std::mem::forget(h);
            anyhow::Ok(at)
        })?;
        rt.shutdown_background();
        Ok(at)
    })
    .join()
    .expect("controller thread")?;
    drop(records);
    let result = (|| -> Result<()> {
        assert_eq!(connect_errno(&agent, to)?, 0, "the grant allows it");
        wait_denied(&agent, to, Duration::from_secs(5))?;
        let at = granted.elapsed();
        ensure!(
            at >= Duration::from_millis(1900),
            "stopped after {at:?}, before the deadline"
        );
        Ok(())
    })();
    drop(l);
    agentwall::datapath::pin::uninstall(&pin_dir)?;
    let _ = std::fs::remove_file(agentwall::control::grants::state_path(&pin_dir));
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_resets_an_established_connection() -> Result<()> {
    let mut c = Ctl::start().await?;
    let listener = TcpListener::bind("127.0.0.3:0")?;
    let to = listener.local_addr()?;
    let g = c.h().grant(grant("agent", to, 600, None), ADMIN).await?;
    // bash joins the agent, connects, and blocks reading until the connection ends.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec 3<>/dev/tcp/{}/{} && echo connected && cat <&3",
        c.agent.display(),
        to.ip(),
        to.port()
    );
    let child = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (mut peer, _) = listener.accept()?;
    peer.set_read_timeout(Some(Duration::from_secs(5)))?;
    let r = c.h().revoke(g.id, ADMIN).await?;
    assert_eq!(r.sockets_destroyed, 1, "{r:?}");
    // The peer sees the reset.
    let mut buf = [0u8; 16];
    match peer.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(0) => {}
        other => bail!("the peer read {other:?}, not a reset"),
    }
    // The agent's socket errors: its read ends with an error.
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the agent's read ended cleanly: {stderr}"
    );
    ensure!(
        stderr.contains("abort") || stderr.contains("reset"),
        "the agent's read did not fail with an abort: {stderr}"
    );
    let rec = c.wait_record(|r| r.kind == "revoked").await?;
    let detail = rec.detail.expect("detail");
    assert_eq!(detail["sockets_destroyed"], 1);
    assert_eq!(detail["by"]["kind"], "admin");
    // And no new connection is allowed.
    assert_eq!(connect_errno(&c.agent, to)?, EPERM);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_outside_the_scope_is_refused_and_changes_nothing() -> Result<()> {
    let mut c = Ctl::start().await?;
    let (_l, to) = tcp_server("127.0.0.4")?;
    // UDP is not grantable.
    let mut udp = grant("agent", to, 60, None);
    udp.protocol = Some("udp".into());
    match c.h().grant(udp, ADMIN).await {
        Err(ControlError::Refused(m)) => assert!(m.contains("grantable"), "{m}"),
        other => bail!("{other:?}"),
    }
    match c.h().grant(grant("agent", to, 7200, None), ADMIN).await {
        Err(ControlError::Refused(m)) => assert!(m.contains("max_grant_ttl"), "{m}"),
        other => bail!("{other:?}"),
    }
    let mut far = grant("agent", to, 60, None);
    far.to = "10.0.0.0/8".into();
    match c.h().grant(far, ADMIN).await {
        Err(ControlError::Refused(m)) => assert!(m.contains("outside"), "{m}"),
        other => bail!("{other:?}"),
    }
    assert!(c.h().grants().await?.is_empty());
    assert_eq!(connect_errno(&c.agent, to)?, EPERM);
    let d = c.decision_to(to).await?;
    assert_eq!(d.decision, "deny");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn records_carry_the_task_until_it_ends_and_its_end_revokes_its_grants() -> Result<()> {
    let mut c = Ctl::start().await?;
    let (_l, to) = tcp_server("127.0.0.5")?;
    let task = c
        .h()
        .task_start(
            TaskStart {
                agent: "agent".into(),
                id: "TICKET-42".into(),
                intent: "read the build logs".into(),
                ttl_secs: None,
            },
            ADMIN,
        )
        .await?;
    assert_ne!(task.slot, 0);
    let g = c
        .h()
        .grant(grant("agent", to, 600, Some("TICKET-42")), ADMIN)
        .await?;
    assert_eq!(connect_errno(&c.agent, to)?, 0);
    let d = c.decision_to(to).await?;
    assert_eq!(d.reason, "grant");
    assert_eq!(d.task.as_deref(), Some("TICKET-42"));
    assert_eq!(d.intent.as_deref(), Some("read the build logs"));
    // A denied call carries the task too.
    let denied: SocketAddr = "127.0.0.7:9".parse()?;
    assert_eq!(connect_errno(&c.agent, denied)?, EPERM);
    let d = c.decision_to(denied).await?;
    assert_eq!(d.task.as_deref(), Some("TICKET-42"));

    let ended = c.h().task_end("agent".into(), ADMIN).await?;
    assert_eq!(ended.grants_revoked, [g.id]);
    let rec = c.wait_record(|r| r.kind == "task-ended").await?;
    assert_eq!(rec.detail.unwrap()["task"], "TICKET-42");
    assert_eq!(
        connect_errno(&c.agent, to)?,
        EPERM,
        "the task's grant is gone"
    );
    let d = c.decision_to(to).await?;
    assert_eq!(d.task, None);
    assert!(c.h().grants().await?.is_empty());
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_judge_ipv6_and_ipv4_mapped_destinations() -> Result<()> {
    let mut c = Ctl::start().await?;
    let (_l6, to6) = tcp_server("::1")?;
    let (_l4, to4) = tcp_server("127.0.0.8")?;
    let mapped: SocketAddr = format!("[::ffff:127.0.0.8]:{}", to4.port()).parse()?;
    assert_eq!(connect_errno(&c.agent, to6)?, EPERM);
    assert_eq!(connect_errno(&c.agent, mapped)?, EPERM);
    let g6 = c.h().grant(grant("agent", to6, 600, None), ADMIN).await?;
    // Granted as an IPv4 address, reached through its IPv4-mapped IPv6 form.
    let g4 = c.h().grant(grant("agent", to4, 600, None), ADMIN).await?;
    assert_eq!(connect_errno(&c.agent, to6)?, 0);
    let d = c
        .wait_record(|r| {
            r.decision
                .as_ref()
                .is_some_and(|d| d.port == to6.port() && d.decision == "allow")
        })
        .await?
        .decision
        .expect("a decision");
    assert_eq!((d.reason.as_str(), d.grant), ("grant", Some(g6.id)));
    assert_eq!(connect_errno(&c.agent, mapped)?, 0);
    let d = c
        .wait_record(|r| {
            r.decision
                .as_ref()
                .is_some_and(|d| d.port == to4.port() && d.decision == "allow")
        })
        .await?
        .decision
        .expect("a decision");
    assert_eq!((d.reason.as_str(), d.grant), ("grant", Some(g4.id)));
    c.h().revoke(g6.id, ADMIN).await?;
    assert_eq!(connect_errno(&c.agent, to6)?, EPERM);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_lists_and_revokes_the_grants_and_tasks_it_finds() -> Result<()> {
    agentwall::datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    let cgroups = TestCgroups::new()?;
    let agent = cgroups.make("agent")?;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/agentwall-test-grants-restart-{}",
        std::process::id()
    ));
    let (_l, to) = tcp_server("127.0.0.9")?;
    let result = async {
        let (mut opts, _records) = options(&cgroups)?;
        opts.pin_dir = Some(pin_dir.clone());
        let h = daemon::start(opts).await?;
        h.register(&agent).await?;
        let task = h
            .task_start(
                TaskStart {
                    agent: "agent".into(),
                    id: "T-restart".into(),
                    intent: "survive a restart".into(),
                    ttl_secs: None,
                },
                ADMIN,
            )
            .await?;
        let g = h.grant(grant("agent", to, 600, None), ADMIN).await?;
        h.shutdown().await?;
        // Nothing runs: the pinned grant still allows it.
        assert_eq!(connect_errno(&agent, to)?, 0);

        let (mut opts, mut records) = options(&cgroups)?;
        opts.pin_dir = Some(pin_dir.clone());
        let h = daemon::start(opts).await?;
        h.register(&agent).await?;
        let listed = h.grants().await?;
        ensure!(
            listed.iter().any(|l| l.id == g.id),
            "grant {} not listed: {listed:?}",
            g.id
        );
        assert_eq!(connect_errno(&agent, to)?, 0);
        // Its records still carry the task, named by the new controller.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = tokio::time::timeout(left, records.recv())
                .await
                .context("no record of the allowed connect")?
                .context("record channel closed")?;
            if let Some(d) = r.decision.filter(|d| d.port == to.port()) {
                assert_eq!(d.task.as_deref(), Some(task.id.as_str()));
                assert_eq!(d.reason, "grant");
                break;
            }
        }
        let next = h.grant(grant("agent", to, 600, None), ADMIN).await?;
        ensure!(
            next.id > g.id,
            "grant ids restarted: {} after {}",
            next.id,
            g.id
        );
        h.revoke(g.id, ADMIN).await?;
        h.revoke(next.id, ADMIN).await?;
        assert_eq!(connect_errno(&agent, to)?, EPERM);
        h.task_end("agent".into(), ADMIN).await?;
        h.shutdown().await?;
        anyhow::Ok(())
    }
    .await;
    agentwall::datapath::pin::uninstall(&pin_dir)?;
    let _ = std::fs::remove_file(agentwall::control::grants::state_path(&pin_dir));
    result
}
