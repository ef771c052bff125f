//! The audit log fails loudly and loses nothing silently: a full disk pauses the reader (records
//! wait in the ring, the rest is counted lost) and every attempt ends up a record or a counted
//! loss; rotation by rename reopens the log without losing or repeating a record; SIGHUP
//! reopens it; an unwritable path is refused before anything is loaded or pinned.

use std::time::Duration;

use agentwall_tests::{
    audit::{assert_contiguous, read_log, read_log_so_far, tally, Tmpfs},
    denied, one_port_policy, probe_in, tcp_server,
    wait::{dir_of, until, until_answer, until_async},
    Daemon, Harness, TestCgroups,
};
use anyhow::{ensure, Context, Result};

fn daemon_policy(base: &str, port: u16) -> String {
    format!(
        "name: audit\nagents:\n  cgroups:\n    - {base}/agent\negress:\n  - name: api\n    \
         cidr: 127.0.0.1/32\n    ports: [{port}]\n    protocol: tcp\n"
    )
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_the_reader_and_every_attempt_is_a_record_or_counted_lost() -> Result<()>
{
    let fs = Tmpfs::mount("full", 1 << 20, false)?;
    let log = fs.path("audit.jsonl");
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    // A small ring: while the reader is paused most of the loop's events cannot be queued.
    let h = Harness::start_with(&one_port_policy(tcp.port()), |o| {
        o.audit_log = Some(log.clone());
        o.ring_bytes = Some(16 * 1024);
    })
    .await?;
    let out = probe_in(&h.agent, &[format!("tcp:{tcp}")])?;
    assert!(out[0].ok, "{out:?}");
    until_async(
        "the first record",
        Duration::from_secs(5),
        &[dir_of(&log)],
        || Ok((tally(&read_log_so_far(&log)?).0 == 1).then_some(())),
    )
    .await?;

    let filler = fs.fill("filler")?;
    let out = probe_in(&h.agent, &[format!("loop:{tcp},{},1500", denied(tcp))])?;
    let attempts = 1 + out[0].value as u64;
    ensure!(attempts > 200, "only {attempts} attempts");

    // Shown in status at once, retried, and nothing partial in the file meanwhile.
    let handle = h.handle.as_ref().context("running")?;
    let failing = until_answer("the failure in status", Duration::from_secs(5), || async {
        let s = handle.status().await?["audit_log"].clone();
        Ok((s["ok"] == false && s["failed_attempts"].as_u64() >= Some(3)).then_some(s))
    })
    .await?;
    let error = failing["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("No space left on device") && error.contains("audit.jsonl"),
        "{failing}"
    );
    let (decisions, _) = tally(&read_log(&log)?);
    assert!(
        decisions < attempts,
        "{decisions} of {attempts} written to a full disk"
    );

    // Space again: the ring's records and a count of what did not fit.
    std::fs::remove_file(&filler)?;
    let (decisions, lost) = until_async(
        "the paused records",
        Duration::from_secs(10),
        &[dir_of(&log)],
        || {
            let (d, l) = tally(&read_log_so_far(&log)?);
            Ok((d + l >= attempts).then_some((d, l)))
        },
    )
    .await?;
    assert_eq!(
        decisions + lost,
        attempts,
        "decisions {decisions} + lost {lost} != attempts {attempts}"
    );
    assert!(
        lost > 0,
        "the small ring lost nothing: the test proves nothing"
    );
    let s = handle.status().await?["audit_log"].clone();
    assert_eq!(
        (s["ok"].as_bool(), s["failed_attempts"].as_u64()),
        (Some(true), Some(0)),
        "{s}"
    );

    h.stop().await?;
    let records = read_log(&log)?;
    assert_contiguous(&records)?;
    let (decisions, lost) = tally(&records);
    assert_eq!(
        decisions + lost,
        attempts,
        "after shutdown: {decisions} + {lost}"
    );
    Ok(())
}

#[test]
fn a_failing_audit_log_is_logged_once_per_episode() -> Result<()> {
    let cg = TestCgroups::new()?;
    let fs = Tmpfs::mount("episode", 1 << 20, false)?;
    let mut d = Daemon::prepare("audit-episode")?;
    d.audit = fs.path("audit.jsonl");
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    d.write_policy("audit.yaml", &daemon_policy(&cg.base, tcp.port()))?;
    d.start()?;
    let (ok, out, err) = d.exec_probe(&cg.base, "agent", &[format!("tcp:{tcp}")])?;
    ensure!(ok && out[0].ok, "{out:?} {err}");
    until(
        "the first record",
        Duration::from_secs(5),
        &[dir_of(&d.audit)],
        || Ok((tally(&read_log_so_far(&d.audit)?).0 == 1).then_some(())),
    )?;

    let filler = fs.fill("filler")?;
    let (ok, out, err) = d.exec_probe(
        &cg.base,
        "agent",
        &[format!("loop:{tcp},{},300", denied(tcp))],
    )?;
    ensure!(ok, "{out:?} {err}");
    let attempts = 1 + out[0].value as u64;
    until(
        "several failed attempts",
        Duration::from_secs(10),
        &[],
        || {
            let s = d.status()?["audit_log"].clone();
            Ok((s["ok"] == false && s["failed_attempts"].as_u64() >= Some(4)).then_some(()))
        },
    )?;
    let log = d.log();
    assert_eq!(lines_with(&log, "event reading paused"), 1, "{log}");
    assert!(lines_with(&log, "No space left on device") >= 1, "{log}");

    std::fs::remove_file(&filler)?;
    until("recovery", Duration::from_secs(10), &[], || {
        Ok((d.status()?["audit_log"]["ok"] == true).then_some(()))
    })?;
    let log = d.log();
    assert_eq!(lines_with(&log, "event reading paused"), 1, "{log}");
    assert_eq!(lines_with(&log, "audit log writable again"), 1, "{log}");
    until(
        "every attempt",
        Duration::from_secs(10),
        &[dir_of(&d.audit)],
        || {
            let (d, l) = tally(&read_log_so_far(&d.audit)?);
            Ok((d + l >= attempts).then_some(()))
        },
    )?;
    let status = d.signal(libc::SIGTERM)?;
    assert!(status.success(), "{status}: {}", d.log());
    let (decisions, lost) = tally(&read_log(&d.audit)?);
    assert_eq!(decisions + lost, attempts);
    Ok(())
}

#[test]
fn a_renamed_log_is_reopened_and_no_record_is_lost_or_repeated() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("audit-rotate")?;
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    d.write_policy("audit.yaml", &daemon_policy(&cg.base, tcp.port()))?;
    d.start()?;
    let probe = d.spawn_probe(
        &cg.base,
        "agent",
        &[format!("loop:{tcp},{},2500", denied(tcp))],
    )?;
    until(
        "records before the rotation",
        Duration::from_secs(5),
        &[dir_of(&d.audit)],
        || Ok((tally(&read_log_so_far(&d.audit)?).0 >= 20).then_some(())),
    )?;
    // logrotate's `create` mode: rename, then (here: the controller) a new file at the path.
    let rotated = d.dir.join("audit.jsonl.1");
    std::fs::rename(&d.audit, &rotated)?;
    until(
        "the reopened log",
        Duration::from_secs(5),
        &[dir_of(&d.audit)],
        || Ok((tally(&read_log_so_far(&d.audit)?).0 > 0).then_some(())),
    )?;
    let out = Daemon::wait_probe(probe)?;
    let attempts = out[0].value as u64;
    let all = || -> Result<Vec<_>> {
        let mut r = read_log(&rotated)?;
        r.extend(read_log(&d.audit)?);
        Ok(r)
    };
    until(
        "every attempt",
        Duration::from_secs(10),
        &[dir_of(&d.audit)],
        || {
            let mut so_far = read_log_so_far(&rotated)?;
            so_far.extend(read_log_so_far(&d.audit)?);
            let (d, l) = tally(&so_far);
            Ok((d + l >= attempts).then_some(()))
        },
    )?;
    let records = all()?;
    assert_contiguous(&records)?;
    let (decisions, lost) = tally(&records);
    assert_eq!(decisions + lost, attempts);
    assert!(
        !read_log(&rotated)?.is_empty() && !read_log(&d.audit)?.is_empty(),
        "both files hold records"
    );
    let log = d.log();
    assert_eq!(lines_with(&log, "audit log reopened"), 1, "{log}");
    Ok(())
}

#[test]
fn sighup_reopens_the_log_and_still_reloads() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("audit-hup")?;
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    d.write_policy("audit.yaml", &daemon_policy(&cg.base, tcp.port()))?;
    d.start()?;
    let generation = |d: &Daemon| -> Result<u64> {
        d.status()?["generation"]
            .as_u64()
            .context("status has no generation")
    };
    let before = generation(&d)?;
    d.hup()?;
    until(
        "the reopen on SIGHUP",
        Duration::from_secs(5),
        &[&d.dir],
        || {
            let log = d.log();
            Ok(log
                .lines()
                .any(|l| l.contains("audit log reopened") && l.contains("SIGHUP"))
                .then_some(()))
        },
    )?;
    until("the reload on SIGHUP", Duration::from_secs(5), &[], || {
        Ok((generation(&d)? > before).then_some(()))
    })?;
    let (ok, out, err) = d.exec_probe(&cg.base, "agent", &[format!("tcp:{tcp}")])?;
    ensure!(ok && out[0].ok, "{out:?} {err}");
    until(
        "a record after the reopen",
        Duration::from_secs(5),
        &[dir_of(&d.audit)],
        || Ok((tally(&read_log_so_far(&d.audit)?).0 == 1).then_some(())),
    )?;
    Ok(())
}

#[test]
fn an_unwritable_audit_log_is_refused_before_anything_is_pinned() -> Result<()> {
    let ro = Tmpfs::mount("audit-ro", 1 << 16, true)?;
    for case in 0..3 {
        let mut d = Daemon::prepare("audit-refused")?;
        let (path, why) = match case {
            0 => (d.dir.clone(), "Is a directory"),
            1 => (ro.path("audit.jsonl"), "Read-only file system"),
            _ => (
                "/proc/agentwall-none/audit.jsonl".into(),
                "creating its directory",
            ),
        };
        d.audit = path;
        d.write_policy(
            "none.yaml",
            "name: none\nagents:\n  cgroups: [nothing-here]\negress: []\n",
        )?;
        let err = match d.start() {
            Ok(()) => anyhow::bail!("started with an unwritable audit log {}", d.audit.display()),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&d.audit.display().to_string()) && err.contains(why),
            "the refusal does not name the path and the reason ({why}): {err}"
        );
        assert!(!err.contains("exit status: 0"), "{err}");
        let pinned = d.pinned_files();
        assert!(pinned.is_empty(), "pinned before refusing: {pinned:?}");
    }
    Ok(())
}
