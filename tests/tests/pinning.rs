//! Fail closed: enforcement outlives the controller. SIGKILL during a connect loop changes no
//! verdict; a restart adopts the pinned programs and maps and writes the events of the down
//! time; an upgrade retires an older pinned layout the same way; a pinned map of the wrong shape
//! and a newer layout are refused; uninstall removes everything.

use std::{collections::HashSet, os::unix::process::ExitStatusExt, time::Duration};

use agentwall_tests::{
    pin_wrong_map, probe_in, probe_status_in, tcp_server, Daemon, TestCgroups, EPERM,
};
use anyhow::{ensure, Result};

fn policy(base: &str, port: u16) -> String {
    format!(
        "name: pin\nagents:\n  cgroups:\n    - {base}/pinned\negress:\n  - name: api\n    cidr: 127.0.0.1/32\n    ports: [{port}]\n    protocol: tcp\n"
    )
}

/// Every attempt is in the audit log exactly once or counted as lost, and the records' seq
/// runs 1, 2, 3, ... with no gap and no repeat across the kill and the restart, all in one boot:
/// the restarted controller continues the sequence and does not write again the decision a
/// kill between write and consume leaves in the ring.
#[track_caller]
fn assert_every_attempt_recorded(d: &Daemon, attempts: u64) -> Result<()> {
    let records = d.records()?;
    let mut unique: HashSet<(u64, u32, String)> = HashSet::new();
    for r in &records {
        if let Some(x) = &r.decision {
            assert!(
                unique.insert((x.ktime_ns, x.tid, x.hook.clone())),
                "a decision written twice: seq {}",
                r.seq
            );
        }
    }
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "the sequence has a gap or a repeat");
    let boots: HashSet<&str> = records.iter().map(|r| r.boot_id.as_str()).collect();
    assert!(
        boots.len() == 1 && !boots.contains(""),
        "one boot id on every record: {boots:?}"
    );
    let lost: u64 = records.iter().filter_map(|r| r.lost).sum();
    assert_eq!(
        unique.len() as u64 + lost,
        attempts,
        "{} decisions + {lost} lost for {attempts} attempts",
        unique.len(),
    );
    Ok(())
}

/// Starts a connect loop of `loop_ms` in the agent (allowed and denied alternately), lets it
/// run, then SIGKILLs the controller mid-loop. Returns the loop, still running.
fn kill_during_a_loop(
    d: &mut Daemon,
    cg: &TestCgroups,
    allowed: &str,
    denied: &str,
    loop_ms: u64,
) -> Result<std::process::Child> {
    let lp = d.spawn_probe(
        &cg.base,
        "pinned",
        &[format!("loop:{allowed},{denied},{loop_ms}")],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let status = d.signal(libc::SIGKILL)?;
    ensure!(!status.success(), "the daemon was not killed: {status}");
    Ok(lp)
}

/// A new agent process is judged as before: allowed connects, denied gets EPERM.
#[track_caller]
fn assert_still_judged(cg: &TestCgroups, allowed: &str, denied: &str, when: &str) -> Result<()> {
    let out = probe_in(
        &cg.path("pinned"),
        &[format!("tcp:{allowed}"), format!("tcp:{denied}")],
    )?;
    assert_eq!((out[0].errno, out[1].errno), (0, EPERM), "{when}: {out:?}");
    Ok(())
}

/// A new agent process that makes a packet socket is killed before socket() returns.
#[track_caller]
fn assert_packet_socket_kills(cg: &TestCgroups, when: &str) -> Result<()> {
    let (status, out) = probe_status_in(&cg.path("pinned"), &["packet".into()])?;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{when}: a packet socket did not kill the agent ({status}): {out:?}"
    );
    Ok(())
}

/// Waits for the loop: no verdict changed during it. Returns its attempts.
#[track_caller]
fn loop_attempts(lp: std::process::Child, around: &str) -> Result<u64> {
    let looped = Daemon::wait_probe(lp)?;
    assert!(
        looped[0].ok,
        "verdicts changed around the {around}: {}",
        looped[0].detail
    );
    let attempts = looped[0].value as u64;
    assert!(attempts > 20, "the loop barely ran: {attempts}");
    Ok(attempts)
}

#[test]
fn sigkill_changes_no_verdict_and_a_restart_adopts() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("pin")?;
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let denied = format!("127.0.0.1:{}", addr.port() ^ 1);
    d.write_policy("pin.yaml", &policy(&cg.base, addr.port()))?;
    d.start()?;

    // A connect loop runs through the kill and the restart.
    let allowed = addr.to_string();
    let lp = kill_during_a_loop(&mut d, &cg, &allowed, &denied, 2500)?;

    // Down: the pinned programs still decide, for the loop and for a new process alike; the
    // packet-socket guard too.
    std::thread::sleep(Duration::from_millis(300));
    assert_still_judged(&cg, &allowed, &denied, "while down")?;
    assert_packet_socket_kills(&cg, "while down")?;
    std::thread::sleep(Duration::from_millis(300));

    d.start()?;
    let attempts = loop_attempts(lp, "crash")?;
    let agent = cg.path("pinned");
    // The restart replaced the guard's pinned link (a tracing link cannot switch programs):
    // one pin, and one program judging (one record below, not two).
    let links: Vec<String> = std::fs::read_dir(d.pin_dir.join("links"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        links
            .iter()
            .filter(|l| l.starts_with("net_raw_use"))
            .count(),
        1,
        "{links:?}"
    );
    assert_packet_socket_kills(&cg, "after the restart")?;

    // Every attempt (loop, the three while down, the packet socket after) is in the audit log
    // or counted as lost.
    std::thread::sleep(Duration::from_millis(300));
    let status = d.signal(libc::SIGTERM)?;
    ensure!(
        status.success(),
        "stop after restart: {status}: {}",
        d.log()
    );
    assert_every_attempt_recorded(&d, attempts + 4)?;
    assert!(d.log().contains("adopted pinned programs"), "{}", d.log());

    // Stopped cleanly but still pinned: still enforcing. Uninstall ends that.
    let out = probe_in(&agent, &[format!("tcp:{denied}")])?;
    assert_eq!(out[0].errno, EPERM, "after SIGTERM: {out:?}");
    let (ok, msg) = d.uninstall()?;
    ensure!(ok, "uninstall: {msg}");
    assert!(!d.pin_dir.exists());
    let out = probe_in(&agent, &[format!("tcp:{denied}")])?;
    assert_ne!(
        out[0].errno, EPERM,
        "still enforced after uninstall: {out:?}"
    );
    Ok(())
}

/// An upgrade across pinned-layout versions: a controller whose layout is v2 finds v1 pinned
/// beside its own directory, switches each of v1's links to its own program and pins it under
/// v2, writes what v1's ring still holds and removes v1. No verdict changes on the way, and no
/// event is dropped.
#[test]
fn an_older_pinned_layout_is_retired_without_a_window() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("layout")?;
    let base = d.pin_dir.clone();
    d.pin_dir = base.join("v1");
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let denied = format!("127.0.0.1:{}", addr.port() ^ 1);
    d.write_policy("pin.yaml", &policy(&cg.base, addr.port()))?;
    d.start()?;
    // Long enough to run through the kill, the down time and the upgraded start.
    let allowed = addr.to_string();
    let lp = kill_during_a_loop(&mut d, &cg, &allowed, &denied, 3000)?;
    // Decisions while nobody reads: they wait in v1's ring.
    assert_still_judged(&cg, &allowed, &denied, "while down")?;

    d.pin_dir = base.join("v2");
    d.start()?;
    let attempts = loop_attempts(lp, "upgrade")?;
    assert!(!base.join("v1").exists(), "v1 is still pinned");
    assert!(base.join("v2/links/connect4").exists(), "v2 is not pinned");
    assert!(
        d.log().contains("retired an older pinned layout"),
        "{}",
        d.log()
    );
    assert_still_judged(&cg, &allowed, &denied, "after")?;

    std::thread::sleep(Duration::from_millis(300));
    let status = d.signal(libc::SIGTERM)?;
    ensure!(status.success(), "stop: {status}: {}", d.log());
    assert_every_attempt_recorded(&d, attempts + 4)?;
    let (ok, msg) = d.uninstall()?;
    ensure!(ok, "uninstall: {msg}");
    assert!(!base.exists(), "{} is left", base.display());
    Ok(())
}

#[test]
fn a_newer_pinned_layout_refuses_the_start() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("newer")?;
    let base = d.pin_dir.clone();
    d.pin_dir = base.join("v2");
    d.write_policy("pin.yaml", &policy(&cg.base, 1))?;
    std::fs::create_dir_all(base.join("v3"))?;
    let err = d.start().expect_err("started beside a newer layout");
    let _ = std::fs::remove_dir(base.join("v3"));
    let _ = std::fs::remove_dir(&base);
    let msg = format!("{err:#}");
    assert!(msg.contains("newer pinned layout (v3)"), "{msg}");
    assert!(!base.join("v2").exists(), "it pinned before refusing");
    Ok(())
}

#[test]
fn a_pinned_map_of_the_wrong_shape_is_refused() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("shape")?;
    d.write_policy("pin.yaml", &policy(&cg.base, 1))?;
    // An array where the agent hash map belongs.
    let maps = d.pin_dir.join("maps");
    std::fs::create_dir_all(&maps)?;
    pin_wrong_map(&maps.join("AW_AGENTS"))?;
    let err = d.start().expect_err("a wrong pinned map was reused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("AW_AGENTS") && msg.contains("refusing to reuse"),
        "{msg}"
    );
    assert!(msg.contains("expected Hash"), "{msg}");
    Ok(())
}

#[test]
fn dead_man_switch_falls_back_in_the_kernel_when_the_controller_is_silent() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("deadman")?;
    let (_a, allowed) = tcp_server("127.0.0.1")?;
    let (_b, other) = tcp_server("127.0.0.1")?;
    let policy = |name: &str, fallback: &str| {
        format!(
            "name: {name}\nagents:\n  cgroups:\n    - {base}/{name}\ndeadman:\n  after_seconds: 1\n  fallback: {fallback}\negress:\n  - cidr: 127.0.0.1/32\n    ports: [{port}]\n    protocol: tcp\n",
            base = cg.base,
            port = allowed.port()
        )
    };
    d.write_policy("strict.yaml", &policy("strict", "deny-all"))?;
    d.write_policy("lenient.yaml", &policy("lenient", "audit-all"))?;
    d.start()?;
    let steps = [format!("tcp:{allowed}"), format!("tcp:{other}")];
    for agent in ["strict", "lenient"] {
        let (ok, out, err) = d.exec_probe(&cg.base, agent, &steps)?;
        ensure!(ok, "{err}");
        assert_eq!(
            (out[0].errno, out[1].errno),
            (0, EPERM),
            "{agent} with the controller up: {out:?}"
        );
    }

    d.signal(libc::SIGKILL)?;
    std::thread::sleep(Duration::from_millis(1600));
    // Silent past the dead-man time: deny-all denies even what the policy allows; audit-all
    // lets even the denied destination through.
    let strict = probe_in(&cg.path("strict"), &steps)?;
    assert_eq!(
        (strict[0].errno, strict[1].errno),
        (EPERM, EPERM),
        "strict, controller silent: {strict:?}"
    );
    let lenient = probe_in(&cg.path("lenient"), &steps)?;
    assert_eq!(
        (lenient[0].errno, lenient[1].errno),
        (0, 0),
        "lenient, controller silent: {lenient:?}"
    );

    // Back: the policy applies again.
    d.start()?;
    let strict = probe_in(&cg.path("strict"), &steps)?;
    assert_eq!(
        (strict[0].errno, strict[1].errno),
        (0, EPERM),
        "strict, controller back: {strict:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    d.signal(libc::SIGTERM)?;
    let records = d.records()?;
    let deadman: Vec<_> = records
        .iter()
        .filter_map(|r| r.decision.as_ref())
        .filter(|r| r.reason == "deadman:deny-all")
        .collect();
    assert_eq!(
        deadman.len(),
        2,
        "deny-all decisions while silent: {deadman:#?}"
    );
    let audited: Vec<_> = records
        .iter()
        .filter_map(|r| r.decision.as_ref())
        .filter(|r| r.agent.as_deref() == Some("lenient") && r.mode == "audit")
        .collect();
    assert_eq!(
        audited.len(),
        2,
        "audit-all decisions while silent: {audited:#?}"
    );
    assert_eq!(
        (audited[1].decision.as_str(), audited[1].action.as_str()),
        ("deny", "allowed")
    );
    Ok(())
}
