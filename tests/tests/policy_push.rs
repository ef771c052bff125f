//! Policy push through the watched policy directory (no explicit reload): a connect loop runs
//! while the policy flips between "A only" and "B only"; every decision matches the policy of
//! the version its record names, never a mix. An invalid file is rejected with
//! file:line:column (log and audit) and the running policy keeps enforcing.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use agentwall_tests::{tcp_server, wait::until, Daemon, TestCgroups, EPERM};
use anyhow::{bail, ensure, Context, Result};

/// Switches made during the loop.
const FLIPS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    A,
    B,
}

fn policy(base: &str, port: u16) -> String {
    format!(
        "name: push\nagents:\n  cgroups:\n    - {base}/pusher\negress:\n  - name: only\n    \
         cidr: 127.0.0.1/32\n    ports: [{port}]\n    protocol: tcp\n"
    )
}

/// Writes `p.yaml` as editors and tools do: in place, or a temp file renamed over it.
fn write(d: &Daemon, yaml: &str, rename: bool) -> Result<()> {
    let dir = d.dir.join("policies");
    if rename {
        let tmp = dir.join(".p.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join("p.yaml"))?;
    } else {
        std::fs::write(dir.join("p.yaml"), yaml)?;
    }
    Ok(())
}

fn generation(d: &Daemon) -> Result<u64> {
    let (ok, out) = d.cli(&["status"])?;
    ensure!(ok, "status: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    v["generation"].as_u64().context("status has no generation")
}

/// Waits until `cond` holds (fails with `what` after 10 s): re-checked whenever the daemon
/// writes in its directory (the audit log, its own log), which every switch, rejection or
/// decision does.
fn wait_for(d: &Daemon, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    until(what, Duration::from_secs(10), &[&d.dir], || {
        Ok(cond()?.then_some(()))
    })
}

/// The pusher's connect decisions in the audit log: (policy version, port, decision).
fn decisions(d: &Daemon) -> Result<Vec<(u32, u16, String)>> {
    Ok(d.records()?
        .into_iter()
        .filter_map(|r| r.decision)
        .filter(|r| r.agent.as_deref() == Some("pusher") && r.hook.starts_with("connect"))
        .map(|r| (r.policy_version, r.port, r.decision))
        .collect())
}

#[test]
fn every_decision_matches_the_version_it_names_while_the_directory_flips() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("push")?;
    let (_a, a) = tcp_server("127.0.0.1")?;
    let (_b, b) = tcp_server("127.0.0.1")?;
    let port = |w| if w == Which::A { a.port() } else { b.port() };
    d.write_policy("p.yaml", &policy(&cg.base, a.port()))?;
    d.start()?;
    let mut versions: BTreeMap<u32, Which> = BTreeMap::new();
    let first = generation(&d)?;
    versions.insert(first as u32, Which::A);

    // The agent: a tight loop connecting to A then B (its own pass/fail tally is ignored: the
    // policy changes under it; the records are checked instead).
    let steps = [format!("loop:{a},{b},60000")];
    let mut agent = d.spawn_probe(&cg.base, "pusher", &steps)?;
    let result = (|| -> Result<()> {
        wait_for(&d, "the loop's first decisions", || {
            Ok(decisions(&d)?.iter().any(|x| x.0 == first as u32))
        })?;
        let mut gen = first;
        let mut which = Which::A;
        for i in 0..FLIPS {
            which = if which == Which::A {
                Which::B
            } else {
                Which::A
            };
            write(&d, &policy(&cg.base, port(which)), i % 2 == 0)?;
            wait_for(
                &d,
                &format!("switch {} applied by the watch", i + 1),
                || Ok(generation(&d)? > gen),
            )?;
            let now = generation(&d)?;
            ensure!(now == gen + 1, "one write made {} switches", now - gen);
            gen = now;
            versions.insert(gen as u32, which);
            // Decisions under the new version, both destinations, before the next flip.
            wait_for(&d, &format!("decisions under version {gen}"), || {
                let got = decisions(&d)?;
                let under = |p: u16| got.iter().any(|x| x.0 == gen as u32 && x.1 == p);
                Ok(under(a.port()) && under(b.port()))
            })?;
        }
        Ok(())
    })();
    // Our own child, by pid.
    let _ = agent.kill();
    let _ = agent.wait();
    result.with_context(|| d.log())?;

    let got = decisions(&d)?;
    let mut checked = 0;
    for (version, p, decision) in &got {
        let Some(&w) = versions.get(version) else {
            bail!("a decision names version {version}, which was never applied: {versions:?}");
        };
        let want = if *p == port(w) { "allow" } else { "deny" };
        ensure!(
            decision == want,
            "version {version} ({w:?} only) judged port {p} as {decision}, not {want} \
             (A={}, B={})",
            a.port(),
            b.port()
        );
        checked += 1;
    }
    for v in versions.keys() {
        ensure!(
            got.iter().any(|x| x.0 == *v),
            "no decision under version {v}"
        );
    }
    ensure!(checked > 4 * FLIPS, "only {checked} decisions");
    eprintln!(
        "{checked} decisions over {} versions, each the verdict of its version",
        versions.len()
    );

    // The audit stream names each switch.
    let applied = d
        .records()?
        .into_iter()
        .filter(|r| r.kind == "policy-applied")
        .count();
    assert_eq!(applied, FLIPS, "policy-applied notices");
    Ok(())
}

#[test]
fn an_invalid_file_in_the_directory_is_rejected_and_the_running_policy_stays() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("push-bad")?;
    let (_a, a) = tcp_server("127.0.0.1")?;
    let (_b, b) = tcp_server("127.0.0.1")?;
    d.write_policy("p.yaml", &policy(&cg.base, a.port()))?;
    d.start()?;
    let before = generation(&d)?;
    let probe = |d: &Daemon, a: SocketAddr, b: SocketAddr| -> Result<(i32, i32)> {
        let (ok, out, err) = d.exec_probe(
            &cg.base,
            "pusher",
            &[format!("tcp:{a}"), format!("tcp:{b}")],
        )?;
        ensure!(ok, "exec: {err}");
        Ok((out[0].errno, out[1].errno))
    };
    assert_eq!(probe(&d, a, b)?, (0, EPERM));

    // Line 5, column 11: the CIDR.
    d.write_policy(
        "broken.yaml",
        "name: broken\nagents:\n  cgroups: [x]\negress:\n  - cidr: 10.0.0.300/8\n",
    )?;
    wait_for(&d, "the rejection in the audit log", || {
        Ok(d.records()?.iter().any(|r| r.kind == "policy-rejected"))
    })?;
    let rejected = d
        .records()?
        .into_iter()
        .find(|r| r.kind == "policy-rejected")
        .and_then(|r| r.detail)
        .context("no detail")?;
    let error = rejected["error"].as_str().unwrap_or_default();
    assert!(error.contains("broken.yaml:5:11:"), "{rejected}");
    assert_eq!(rejected["origin"]["by"], "watch", "{rejected}");
    assert!(
        d.log().contains("broken.yaml:5:11:"),
        "the log does not name file:line:column: {}",
        d.log()
    );
    assert_eq!(generation(&d)?, before, "a rejected set was switched to");
    // The old policy keeps enforcing: A allowed, B denied.
    assert_eq!(probe(&d, a, b)?, (0, EPERM));

    // Fixed (the broken file removed, p.yaml now allows B): the watch applies it.
    std::fs::remove_file(d.dir.join("policies/broken.yaml"))?;
    d.write_policy("p.yaml", &policy(&cg.base, b.port()))?;
    wait_for(&d, "the fixed set", || Ok(generation(&d)? == before + 1))?;
    assert_eq!(probe(&d, a, b)?, (EPERM, 0));
    // The same content written again: the watch reads it and switches nothing (an explicit
    // reload would: it re-judges every cgroup under a new version).
    let unchanged = |d: &Daemon| d.log().matches("policy unchanged").count();
    let seen = unchanged(&d);
    d.write_policy("p.yaml", &policy(&cg.base, b.port()))?;
    wait_for(&d, "the watch's read of the unchanged file", || {
        Ok(unchanged(&d) > seen)
    })?;
    assert_eq!(
        generation(&d)?,
        before + 1,
        "an unchanged set made a new version"
    );
    Ok(())
}

/// A Kubernetes ConfigMap volume: `p.yaml -> ..data/p.yaml`, `..data -> ..<timestamp>`. The
/// kubelet updates it by writing a new timestamped directory and renaming a new `..data` link
/// over the old one; the watch sees the swap and applies the new content.
#[test]
fn a_configmap_symlink_swap_is_applied() -> Result<()> {
    use std::os::unix::fs::symlink;
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("push-cm")?;
    let (_a, a) = tcp_server("127.0.0.1")?;
    let (_b, b) = tcp_server("127.0.0.1")?;
    let dir = d.dir.join("policies");
    std::fs::create_dir(dir.join("..2026_01"))?;
    std::fs::write(dir.join("..2026_01/p.yaml"), policy(&cg.base, a.port()))?;
    symlink("..2026_01", dir.join("..data"))?;
    symlink("..data/p.yaml", dir.join("p.yaml"))?;
    d.start()?;
    let before = generation(&d)?;
    let probe = |d: &Daemon| -> Result<(i32, i32)> {
        let steps = [format!("tcp:{a}"), format!("tcp:{b}")];
        let (ok, out, err) = d.exec_probe(&cg.base, "pusher", &steps)?;
        ensure!(ok, "exec: {err}");
        Ok((out[0].errno, out[1].errno))
    };
    assert_eq!(probe(&d)?, (0, EPERM));

    // The kubelet's update, step by step.
    std::fs::create_dir(dir.join("..2026_02"))?;
    std::fs::write(dir.join("..2026_02/p.yaml"), policy(&cg.base, b.port()))?;
    symlink("..2026_02", dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    std::fs::remove_dir_all(dir.join("..2026_01"))?;
    wait_for(&d, "the swapped ConfigMap applied", || {
        Ok(generation(&d)? > before)
    })?;
    assert_eq!(generation(&d)?, before + 1, "{}", d.log());
    assert_eq!(probe(&d)?, (EPERM, 0));
    Ok(())
}
