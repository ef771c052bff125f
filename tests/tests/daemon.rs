//! The `agentwall` binary end to end: `run` as a daemon, `exec` an agent through the control
//! socket (packet sockets refused unless listed), `reload` with a broken policy (refused,
//! enforcement unchanged), SIGTERM, audit log.

use agentwall_tests::{tcp_server, Daemon, TestCgroups, EPERM};
use anyhow::{bail, ensure, Result};

fn policy(base: &str, ports: &str) -> String {
    format!(
        "name: e2e\nagents:\n  cgroups:\n    - {base}/e2e\negress:\n  - name: api\n    cidr: 127.0.0.1/32\n    ports: [{ports}]\n    protocol: tcp\n"
    )
}

#[test]
fn run_exec_reload_and_stop() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("e2e")?;
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let (a, b) = (addr.port(), addr.port() ^ 1);
    d.write_policy("e2e.yaml", &policy(&cg.base, &a.to_string()))?;
    d.write_policy(
        "packets.yaml",
        &format!(
            "name: packets\nagents:\n  cgroups: [{}/packets]\nsockets: [packet]\negress: []\n",
            cg.base
        ),
    )?;
    d.start()?;

    let allowed = format!("tcp:{addr}");
    let denied = format!("tcp:127.0.0.1:{b}");
    let (ok, out, err) = d.exec_probe(&cg.base, "e2e", &[allowed.clone(), denied.clone()])?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!((out[0].errno, out[1].errno), (0, EPERM), "{out:?}");

    // Packet sockets pass every cgroup socket hook: exec drops CAP_NET_RAW, so the kernel
    // refuses them (and raw sockets) itself, unless the policy lists them. The capability
    // check records each (hook `socket`).
    let (ok, out, err) = d.exec_probe(
        &cg.base,
        "e2e",
        &["packet".into(), format!("raw:127.0.0.1:{b}")],
    )?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!(
        (out[0].errno, out[1].errno),
        (EPERM, EPERM),
        "a packet or raw socket was created: {out:?}"
    );
    let (ok, out, err) = d.exec_probe(&cg.base, "packets", &["packet".into()])?;
    ensure!(ok, "exec failed: {err}");
    assert_eq!(
        out[0].errno, 0,
        "a listed packet socket was refused: {out:?}"
    );

    // No policy selects this agent: exec refuses and the command never runs.
    let (ok, out, err) = d.exec_probe(&cg.base, "stranger", std::slice::from_ref(&allowed))?;
    assert!(
        !ok && out.is_empty(),
        "exec ran an unselected agent: {out:?}"
    );
    assert!(err.contains("no policy selects"), "{err}");

    // A broken policy is refused with file:line:column; the running one stays.
    d.write_policy(
        "broken.yaml",
        "name: broken\nagents:\n  cgroups: [x]\negress:\n  - cidr: 10.0.0.300/8\n",
    )?;
    let (ok, msg) = d.cli(&["reload"])?;
    assert!(!ok, "reload of a broken policy succeeded");
    assert!(
        msg.contains("broken.yaml:5:"),
        "error does not name file:line:column: {msg}"
    );
    let (ok, out, err) = d.exec_probe(&cg.base, "e2e", &[allowed.clone(), denied.clone()])?;
    ensure!(ok, "exec after refused reload: {err}");
    assert_eq!((out[0].errno, out[1].errno), (0, EPERM), "{out:?}");

    // A valid change applies: the denied port is now allowed too.
    std::fs::remove_file(d.dir.join("policies/broken.yaml"))?;
    d.write_policy("e2e.yaml", &policy(&cg.base, &format!("{a}, {b}")))?;
    let (ok, msg) = d.cli(&["reload"])?;
    ensure!(ok, "{msg}");
    let (_, out, _) = d.exec_probe(&cg.base, "e2e", std::slice::from_ref(&denied))?;
    assert_ne!(
        out[0].errno, EPERM,
        "the reloaded policy did not apply: {out:?}"
    );

    // SIGTERM: a clean stop, every decision in the audit log.
    let status = d.signal(libc::SIGTERM)?;
    assert!(status.success(), "agentwall run exited with {status}");
    assert!(!d.socket.exists(), "the control socket was left behind");
    let records = d.records()?;
    let got: Vec<(String, u16, String, u32)> = records
        .iter()
        .filter_map(|r| r.decision.as_ref())
        .map(|r| {
            (
                r.agent.clone().unwrap_or_default(),
                r.port,
                r.action.clone(),
                r.policy_version,
            )
        })
        .collect();
    let want: Vec<(String, u16, String, u32)> = vec![
        ("e2e".into(), a, "allowed".into(), 1),
        ("e2e".into(), b, "blocked".into(), 1),
        ("e2e".into(), 0, "blocked".into(), 1),
        ("e2e".into(), 0, "blocked".into(), 1),
        ("packets".into(), 0, "allowed".into(), 1),
        ("e2e".into(), a, "allowed".into(), 1),
        ("e2e".into(), b, "blocked".into(), 1),
        ("e2e".into(), b, "allowed".into(), 2),
    ];
    if got != want {
        bail!("audit log:\n{got:#?}\nwanted:\n{want:#?}");
    }
    let sockets: Vec<(&str, Option<&str>)> = records
        .iter()
        .filter_map(|r| r.decision.as_ref())
        .filter(|r| r.port == 0)
        .map(|r| (r.hook.as_str(), r.socket.as_deref()))
        .collect();
    assert_eq!(
        sockets,
        [
            ("socket", Some("packet")),
            ("socket", Some("raw")),
            ("socket", Some("packet"))
        ]
    );
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());
    let (ok, msg) = d.uninstall()?;
    ensure!(ok, "uninstall: {msg}");
    assert!(
        !d.pin_dir.exists(),
        "uninstall left {}",
        d.pin_dir.display()
    );
    Ok(())
}
