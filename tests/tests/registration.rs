//! Registration against the real kernel: cgroups recreated under a selector's parent beside a
//! connect loop (no denied connect gets through, no stale entries), a full agent map (fails
//! closed, reported), the delay from mkdir to registered, and an invalid huge reload under a
//! 1 s dead-man policy (no allowed connect is denied meanwhile).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agentwall::{
    daemon::{self, Handle, Options, PolicySource},
    events::AuditRecord,
    policy::{self, PolicySet},
};
use agentwall_tests::{
    probe_in, probe_status_in, tcp_server, wait::until_answer, TestCgroups, EPERM,
};
use anyhow::{bail, ensure, Context, Result};
use tokio::sync::mpsc;

/// A controller over one fixed policy (`{base}` is the test's cgroup subtree).
async fn start(
    cg: &TestCgroups,
    yaml: &str,
    tune: impl FnOnce(&mut Options),
) -> Result<(Handle, mpsc::UnboundedReceiver<AuditRecord>)> {
    let p = policy::parse_policy(Path::new("reg.yaml"), &yaml.replace("{base}", &cg.base))?;
    let (tap, records) = mpsc::unbounded_channel();
    let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: vec![p] }));
    opts.control_socket = None;
    opts.tap = Some(tap);
    tune(&mut opts);
    Ok((daemon::start(opts).await?, records))
}

fn policy_allowing(port: u16) -> String {
    format!(
        "name: reg\nagents:\n  cgroups: [\"{{base}}/agent-*\"]\negress:\n  - cidr: 127.0.0.1/32\n    \
         ports: [{port}]\n    protocol: tcp\n"
    )
}

/// Waits until `cond` holds on the controller's status (each check asks the controller).
async fn wait_status(
    h: &Handle,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    until_answer(what, Duration::from_secs(10), || async {
        let s = h.status().await?;
        Ok(cond(&s).then_some(s))
    })
    .await
}

fn registered(s: &serde_json::Value, rel: &str) -> bool {
    s["agents"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["cgroup"] == rel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreated_cgroups_never_run_unenforced_and_leave_no_entries() -> Result<()> {
    let cg = TestCgroups::new()?;
    let (_ok_srv, ok) = tcp_server("127.0.0.1")?;
    let (_srv, denied) = tcp_server("127.0.0.2")?;
    // The scan is far away: only the watch entry and the cgroup watcher stand in the way.
    let (h, _records) = start(&cg, &policy_allowing(ok.port()), |o| {
        o.rescan = Duration::from_secs(600)
    })
    .await?;
    let steps: Vec<String> = (0..10).map(|_| format!("tcp:{denied}")).collect();
    let (mut passed, mut attempts) = (0, 0);
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..40 {
        let rel = format!("agent-{}", i % 2);
        let path = cg.make(&rel)?;
        ids.insert(agentwall::identity::cgroup::cgroup_id(&path)?);
        // Joins at once: the cgroup is usually not registered yet.
        let out = probe_in(&path, &steps)?;
        attempts += out.len();
        passed += out.iter().filter(|o| o.errno != EPERM).count();
        std::fs::remove_dir(&path).with_context(|| format!("rmdir {}", path.display()))?;
    }
    ensure!(ids.len() > 2, "the cgroups were not recreated with new ids");
    assert_eq!(
        passed, 0,
        "{passed} of {attempts} denied connects got through"
    );
    // Every removed cgroup's entry goes: the watch is all that is left.
    let s = wait_status(&h, "stale entries removed", |s| {
        s["agent_map"]["used"] == 1 && s["kernel"]["agent_entries"] == 1
    })
    .await?;
    println!(
        "{attempts} denied connects from 40 recreated cgroups: 0 through; map {}",
        s["agent_map"]
    );
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_created_after_start_is_watched_from_its_creation() -> Result<()> {
    let cg = TestCgroups::new()?;
    let (_ok_srv, ok) = tcp_server("127.0.0.1")?;
    let (_srv, denied) = tcp_server("127.0.0.2")?;
    // The selector's fixed parent `{base}/late` does not exist when the controller starts.
    let yaml = policy_allowing(ok.port()).replace("{base}/agent-*", "{base}/late/agent-*");
    let (h, _records) = start(&cg, &yaml, |o| o.rescan = Duration::from_secs(600)).await?;
    let parent = cg.make("late")?;
    // The parent is watched in the kernel once created (no scan runs for 600 s).
    wait_status(&h, "the late parent watched", |s| {
        s["watches"]
            .as_array()
            .is_some_and(|w| w.iter().any(|x| x["cgroup"] == cg.rel("late")))
    })
    .await?;
    let steps: Vec<String> = (0..10).map(|_| format!("tcp:{denied}")).collect();
    let mut passed = 0;
    for i in 0..10 {
        let path = cg.make(&format!("late/agent-{i}"))?;
        // Joins at once: pending until registered, then the policy; never allowed.
        let out = probe_in(&path, &steps)?;
        passed += out.iter().filter(|o| o.errno != EPERM).count();
        std::fs::remove_dir(&path)?;
    }
    assert_eq!(passed, 0, "{passed} denied connects got through");
    std::fs::remove_dir(&parent)?;
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_delay_from_mkdir() -> Result<()> {
    let cg = TestCgroups::new()?;
    let (_srv, ok) = tcp_server("127.0.0.1")?;
    let (h, _records) = start(&cg, &policy_allowing(ok.port()), |o| {
        o.rescan = Duration::from_secs(600)
    })
    .await?;
    let mut delays = Vec::new();
    for i in 0..20 {
        let rel = format!("agent-d{i}");
        let t0 = Instant::now();
        let path = cg.make(&rel)?;
        wait_status(&h, "registered", |s| registered(s, &cg.rel(&rel))).await?;
        delays.push(t0.elapsed());
        // Registered means enforced by the agent's own policy: the allowed connect passes.
        let out = probe_in(&path, &[format!("tcp:{ok}")])?;
        assert_eq!(out[0].errno, 0, "{out:?}");
        std::fs::remove_dir(&path)?;
    }
    delays.sort();
    println!(
        "mkdir to registered (inotify, status polled every 5 ms): median {:?}, max {:?}",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    // The scan runs every 600 s: only the watcher can have registered them this fast.
    ensure!(
        delays[delays.len() - 1] < Duration::from_secs(2),
        "{delays:?}"
    );
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_agent_map_fails_closed_and_is_reported() -> Result<()> {
    let cg = TestCgroups::new()?;
    let (_srv, ok) = tcp_server("127.0.0.1")?;
    // Room for the watch and two agents.
    let (h, mut records) = start(&cg, &policy_allowing(ok.port()), |o| {
        o.agent_map_entries = Some(3);
        o.rescan = Duration::from_secs(600);
    })
    .await?;
    let mut paths = Vec::new();
    for i in 0..4 {
        paths.push(cg.make(&format!("agent-{i}"))?);
    }
    let s = wait_status(&h, "two cgroups unregistered", |s| {
        s["agents_unregistered"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    })
    .await?;
    assert_eq!(s["agent_map"]["capacity"], 3, "{s:#}");
    assert_eq!(s["agent_map"]["used"], 3, "{s:#}");
    assert_eq!(s["kernel"]["ok"], false, "{s:#}");
    let unregistered: Vec<String> = serde_json::from_value(s["agents_unregistered"].clone())?;
    // An unregistered agent is judged by the pending fallback: even its allowed connect fails.
    let path = cg.root.join(&unregistered[0]);
    let out = probe_in(&path, &[format!("tcp:{ok}")])?;
    assert_eq!(out[0].errno, EPERM, "{out:?}");
    // One notice for the episode, and a pending-identity decision.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut notices, mut pending) = (0, 0);
    while Instant::now() < deadline && (notices == 0 || pending == 0) {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(100), records.recv()).await
        {
            if r.kind == "agent-map-full" {
                notices += 1;
            }
            if r.decision
                .as_ref()
                .is_some_and(|d| d.reason == "pending-identity")
            {
                pending += 1;
            }
        }
    }
    assert_eq!(
        (notices, pending > 0),
        (1, true),
        "notices {notices}, pending {pending}"
    );
    // Room again: the waiting cgroups are registered once others go.
    for p in &paths {
        if !unregistered.iter().any(|u| p.ends_with(u)) {
            std::fs::remove_dir(p)?;
        }
    }
    wait_status(&h, "recovered", |s| {
        s["agents_unregistered"]
            .as_array()
            .is_some_and(|a| a.is_empty())
            && s["kernel"]["ok"] == true
    })
    .await?;
    let out = probe_in(&path, &[format!("tcp:{ok}")])?;
    assert_eq!(out[0].errno, 0, "{out:?}");
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_huge_reload_denies_no_allowed_connect_under_a_deadman() -> Result<()> {
    let cg = TestCgroups::new()?;
    let (_srv, ok) = tcp_server("127.0.0.1")?;
    let dir = std::env::temp_dir().join(format!("aw-reg-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("a.yaml"),
        format!(
            "name: dm\nagents:\n  cgroups: [\"{}/agent-dm\"]\ndeadman:\n  after_seconds: 1\n  \
             fallback: deny-all\negress:\n  - cidr: 127.0.0.1/32\n    ports: [{}]\n    protocol: tcp\n",
            cg.base,
            ok.port()
        ),
    )?;
    let agent = cg.make("agent-dm")?;
    let mut opts = Options::new(PolicySource::Path(dir.clone()));
    opts.control_socket = None;
    let (tap, mut records) = mpsc::unbounded_channel();
    opts.tap = Some(tap);
    let h = daemon::start(opts).await?;
    h.register(&agent).await?;
    // 262,144 rules and one broken at the end: read and parsed in full, then refused.
    let mut big = String::from("name: huge\nagents:\n  cgroups: [\"nowhere/huge\"]\negress:\n");
    for i in 0..262_144u32 {
        let [_, b, c, d] = (0x0a00_0000 + i).to_be_bytes();
        big.push_str(&format!("  - cidr: 10.{b}.{c}.{d}/32\n"));
    }
    big.push_str("  - cidr: 10.0.0.300/32\n");
    std::fs::write(dir.join("b.yaml"), big)?;
    let denied = "127.0.0.1:1".to_string();
    let loop_ms = 45_000;
    let probe = {
        let agent = agent.clone();
        let step = format!("loop:{ok},{denied},{loop_ms}");
        std::thread::spawn(move || probe_status_in(&agent, &[step]))
    };
    // The loop runs before, during and after the reload: its first record is seen first.
    tokio::time::timeout(Duration::from_secs(10), records.recv())
        .await
        .context("the loop's first record")?
        .context("the controller stopped")?;
    let t0 = Instant::now();
    let err = h.reload().await.expect_err("the reload must be refused");
    let took = t0.elapsed();
    println!("invalid 262,144-rule reload refused after {took:?}: {err:#}");
    ensure!(
        took + Duration::from_millis(1000) < Duration::from_millis(loop_ms),
        "the reload ({took:?}) outlasted the connect loop"
    );
    let (status, out) = probe.join().expect("probe thread")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() || out.len() != 1 || !out[0].ok {
        bail!("connect loop during the reload: {status}: {out:?}");
    }
    println!(
        "{} connects during the reload, none wrongly decided",
        out[0].value
    );
    h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_link_pin_removed_behind_the_controllers_back() -> Result<()> {
    let cg = TestCgroups::new()?;
    let pin_dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/agentwall-test-reg-{}",
        std::process::id()
    ));
    agentwall::datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    let (h, _records) = start(&cg, &policy_allowing(1), |o| {
        o.pin_dir = Some(pin_dir.clone());
    })
    .await?;
    let result = async {
        let s = h.status().await?;
        assert_eq!(s["kernel"]["ok"], true, "{s:#}");
        assert_eq!(s["kernel"]["pinned"], true, "{s:#}");
        // The only reference to a pinned link is its pin: removing it detaches the program.
        std::fs::remove_file(pin_dir.join("links/connect4"))?;
        let s = h.status().await?;
        assert_eq!(s["kernel"]["ok"], false, "{s:#}");
        let problems = s["kernel"]["problems"].to_string();
        ensure!(problems.contains("connect4"), "{problems}");
        Ok(())
    }
    .await;
    h.shutdown().await?;
    agentwall::datapath::pin::uninstall(&pin_dir)?;
    let _ = std::fs::remove_dir_all(&pin_dir);
    result
}
