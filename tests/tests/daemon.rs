//! The `agentwall` binary end to end: `run` as a daemon, `exec` an agent through the control
//! socket, `reload` with a broken policy (refused, enforcement unchanged), SIGTERM, audit log.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentwall::events::AuditRecord;
use agentwall_tests::{sibling_exe, tcp_server, Outcome, TestCgroups, EPERM};
use anyhow::{bail, ensure, Context, Result};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started, by its pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn policy(base: &str, port: u16) -> String {
    format!(
        "name: e2e\nagents:\n  cgroups:\n    - {base}/e2e\negress:\n  - name: api\n    cidr: 127.0.0.1/32\n    ports: [{port}]\n    protocol: tcp\n"
    )
}

/// `agentwall exec` a probe; returns (exit ok, outcomes, stderr).
fn exec_probe(
    agentwall: &Path,
    socket: &Path,
    base: &str,
    agent: &str,
    steps: &[String],
) -> Result<(bool, Vec<Outcome>, String)> {
    let out = Command::new(agentwall)
        .args([
            "exec",
            "--agent",
            agent,
            "--cgroup-parent",
            base,
            "--control-socket",
        ])
        .arg(socket)
        .arg("--")
        .arg(sibling_exe("probe")?)
        .args(steps)
        .output()?;
    let outcomes = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Outcome>, _>>()?;
    Ok((
        out.status.success(),
        outcomes,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn run_exec_reload_and_stop() -> Result<()> {
    let cg = TestCgroups::new()?;
    let agentwall = sibling_exe("agentwall")?;
    let dir = std::env::temp_dir().join(format!("agentwall-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies"))?;
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    std::fs::write(dir.join("policies/e2e.yaml"), policy(&cg.base, addr.port()))?;
    let socket = dir.join("control.sock");
    let audit = dir.join("audit.jsonl");
    let daemon = Daemon(
        Command::new(&agentwall)
            .arg("run")
            .arg("--policy")
            .arg(dir.join("policies"))
            .arg("--audit-log")
            .arg(&audit)
            .arg("--control-socket")
            .arg(&socket)
            .args(["--rescan-ms", "100"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting agentwall run")?,
    );
    wait_for(&socket)?;

    let allowed = format!("tcp:{addr}");
    let denied = format!("tcp:127.0.0.1:{}", addr.port() ^ 1);
    let (ok, out, err) = exec_probe(
        &agentwall,
        &socket,
        &cg.base,
        "e2e",
        &[allowed.clone(), denied.clone()],
    )?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!((out[0].errno, out[1].errno), (0, EPERM), "{out:?}");

    // No policy selects this agent: exec refuses and the command never runs.
    let (ok, out, err) = exec_probe(
        &agentwall,
        &socket,
        &cg.base,
        "stranger",
        std::slice::from_ref(&allowed),
    )?;
    assert!(
        !ok && out.is_empty(),
        "exec ran an unselected agent: {out:?}"
    );
    assert!(err.contains("no policy selects"), "{err}");

    // A broken policy is refused with file:line:column; the running one stays.
    std::fs::write(
        dir.join("policies/broken.yaml"),
        "name: broken\nagents:\n  cgroups: [x]\negress:\n  - cidr: 10.0.0.300/8\n",
    )?;
    let reload = Command::new(&agentwall)
        .arg("reload")
        .arg("--control-socket")
        .arg(&socket)
        .output()?;
    let msg = String::from_utf8_lossy(&reload.stderr);
    assert!(
        !reload.status.success(),
        "reload of a broken policy succeeded"
    );
    assert!(
        msg.contains("broken.yaml:5:"),
        "error does not name file:line:column: {msg}"
    );
    let (ok, out, err) = exec_probe(
        &agentwall,
        &socket,
        &cg.base,
        "e2e",
        &[allowed.clone(), denied.clone()],
    )?;
    ensure!(ok, "exec after refused reload: {err}");
    assert_eq!((out[0].errno, out[1].errno), (0, EPERM), "{out:?}");

    // A valid change applies: the denied port is now allowed too.
    std::fs::remove_file(dir.join("policies/broken.yaml"))?;
    let widened = policy(&cg.base, addr.port()).replace(
        &format!("[{}]", addr.port()),
        &format!("[{}, {}]", addr.port(), addr.port() ^ 1),
    );
    std::fs::write(dir.join("policies/e2e.yaml"), widened)?;
    let reload = Command::new(&agentwall)
        .arg("reload")
        .arg("--control-socket")
        .arg(&socket)
        .output()?;
    ensure!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    let (_, out, _) = exec_probe(
        &agentwall,
        &socket,
        &cg.base,
        "e2e",
        std::slice::from_ref(&denied),
    )?;
    assert_ne!(
        out[0].errno, EPERM,
        "the reloaded policy did not apply: {out:?}"
    );

    // SIGTERM: a clean stop, every decision in the audit log.
    let mut daemon = daemon;
    // SAFETY: our own child, by pid.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = daemon.0.wait()?;
    assert!(status.success(), "agentwall run exited with {status}");
    std::mem::forget(daemon);
    assert!(!socket.exists(), "the control socket was left behind");
    let records: Vec<AuditRecord> = std::fs::read_to_string(&audit)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let got: Vec<(String, u16, String, u32)> = records
        .iter()
        .filter_map(|r| r.decision.as_ref())
        .map(|d| {
            (
                d.agent.clone().unwrap_or_default(),
                d.port,
                d.action.clone(),
                d.policy_version,
            )
        })
        .collect();
    let (a, d) = (addr.port(), addr.port() ^ 1);
    let want: Vec<(String, u16, String, u32)> = vec![
        ("e2e".into(), a, "allowed".into(), 1),
        ("e2e".into(), d, "blocked".into(), 1),
        ("e2e".into(), a, "allowed".into(), 1),
        ("e2e".into(), d, "blocked".into(), 1),
        ("e2e".into(), d, "allowed".into(), 2),
    ];
    if got != want {
        bail!("audit log:\n{got:#?}\nwanted:\n{want:#?}");
    }
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir(cg.path("e2e"));
    let _ = std::fs::remove_dir(cg.path("stranger"));
    Ok(())
}
