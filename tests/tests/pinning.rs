//! Fail closed: enforcement outlives the controller. SIGKILL during a connect loop changes no
//! verdict; a restart adopts the pinned programs and maps and writes the events of the down
//! time; a pinned map of the wrong shape is refused; uninstall removes everything.

use std::{collections::HashSet, time::Duration};

use agentwall_tests::{pin_wrong_map, probe_in, tcp_server, Daemon, TestCgroups, EPERM};
use anyhow::{ensure, Result};

fn policy(base: &str, port: u16) -> String {
    format!(
        "name: pin\nagents:\n  cgroups:\n    - {base}/pinned\negress:\n  - name: api\n    cidr: 127.0.0.1/32\n    ports: [{port}]\n    protocol: tcp\n"
    )
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
    let lp = d.spawn_probe(&cg.base, "pinned", &[format!("loop:{addr},{denied},2500")])?;
    std::thread::sleep(Duration::from_millis(500));
    let status = d.signal(libc::SIGKILL)?;
    ensure!(!status.success(), "the daemon was not killed: {status}");

    // Down: the pinned programs still decide, for the loop and for a new process alike.
    std::thread::sleep(Duration::from_millis(300));
    let agent = cg.path("pinned");
    let out = probe_in(&agent, &[format!("tcp:{addr}"), format!("tcp:{denied}")])?;
    assert_eq!(
        (out[0].errno, out[1].errno),
        (0, EPERM),
        "while down: {out:?}"
    );
    std::thread::sleep(Duration::from_millis(300));

    d.start()?;
    let looped = Daemon::wait_probe(lp)?;
    assert!(
        looped[0].ok,
        "verdicts changed around the crash: {}",
        looped[0].detail
    );
    let attempts = looped[0].value as u64;
    assert!(attempts > 20, "the loop barely ran: {attempts}");

    // Every attempt (loop + the two while down) is in the audit log or counted as lost. A
    // record may be written twice when the kill lands between write and consume: count each
    // (time, thread) once.
    std::thread::sleep(Duration::from_millis(300));
    let status = d.signal(libc::SIGTERM)?;
    ensure!(
        status.success(),
        "stop after restart: {status}: {}",
        d.log()
    );
    let records = d.records()?;
    let unique: HashSet<(String, u32)> = records
        .iter()
        .filter_map(|r| r.decision.as_ref().map(|x| (r.time.clone(), x.tid)))
        .collect();
    let lost: u64 = records.iter().filter_map(|r| r.lost).sum();
    assert_eq!(
        unique.len() as u64 + lost,
        attempts + 2,
        "{} decisions + {lost} lost for {} attempts",
        unique.len(),
        attempts + 2
    );
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
