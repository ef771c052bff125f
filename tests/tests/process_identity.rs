//! The process in the record is the one that acted: the executable, parent and parent's
//! executable are copied in the kernel at decision time (exec tracker, see docs/events.md), so a
//! process that exits at once, or execs another program right after its call, is still named
//! by the program that made the call.

use std::process::{Command, Stdio};

use agentwall_tests::{probe_in, sa, sibling_exe, tcp_server, Harness};
use anyhow::{ensure, Context, Result};

fn policy(port: u16) -> String {
    format!(
        "name: t\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress:\n  - name: web\n    cidr: \
         \"127.0.0.1/32\"\n    ports: [{port}]\n    protocol: tcp\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_process_is_named_by_its_own_executable() -> Result<()> {
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&policy(addr.port())).await?;
    let probe = sibling_exe("probe")?.display().to_string();
    // The probe connects and exits at once; its records are enriched after it is gone.
    let out = probe_in(
        &h.agent,
        &[
            format!("tcp:{}", sa(addr)),
            format!("tcp:127.0.0.2:{}", addr.port()),
        ],
    )?;
    assert_eq!(
        out.iter().map(|o| o.errno).collect::<Vec<_>>(),
        [0, libc::EPERM]
    );
    let d = h.decisions(2).await?;
    assert_eq!(d.len(), 2, "{d:#?}");
    for r in &d {
        assert_eq!(r.exe.as_deref(), Some(probe.as_str()), "{r:#?}");
        assert_eq!(r.exe_source.as_deref(), Some("kernel"), "{r:#?}");
        // Its parent is this test process.
        assert_eq!(r.ppid, Some(std::process::id()), "{r:#?}");
    }
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_then_exec_records_the_program_that_connected() -> Result<()> {
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&policy(addr.port())).await?;
    let probe = sibling_exe("probe")?.display().to_string();
    let true_bin = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("no `true` binary to exec")?;
    // The denied connect, then the same process becomes another program (and exits).
    let steps = [
        format!("tcp:127.0.0.2:{}", addr.port()),
        format!("exec:{true_bin}"),
    ];
    let mut all = vec![format!("join:{}", h.agent.display())];
    all.extend_from_slice(&steps);
    let out = Command::new(&probe).args(&all).output()?;
    ensure!(
        out.status.success(),
        "{} exited with {}",
        true_bin,
        out.status
    );
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        text.lines().count() == 2 && text.contains("\"errno\":1"),
        "probe output (join, denied connect): {text}"
    );
    let d = h.decisions(1).await?;
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].action, "blocked");
    assert_eq!(d[0].exe.as_deref(), Some(probe.as_str()), "{:#?}", d[0]);
    assert_eq!(d[0].exe_source.as_deref(), Some("kernel"));
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parent_is_the_agent_process_that_started_the_tool() -> Result<()> {
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let mut h = Harness::start(&policy(addr.port())).await?;
    let probe = sibling_exe("probe")?.display().to_string();
    let sh = ["/bin/sh", "/usr/bin/sh"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("no /bin/sh")?;
    // An "agent" shell joins the cgroup and starts the tool, which connects; `; :` keeps the
    // shell from exec'ing the tool in its place.
    let script = format!(
        "echo $$ > {}/cgroup.procs && {probe} tcp:{} ; :",
        h.agent.display(),
        sa(addr)
    );
    let child = Command::new(sh)
        .arg("-c")
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()?;
    let sh_pid = child.id();
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sh: {}", out.status);
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"),
        "tool output: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // And a child the tool forks (no exec): it runs the tool's program, its parent is the tool.
    let forked = probe_in(&h.agent, &[format!("fork:tcp:{}", sa(addr))])?;
    assert_eq!(forked[0].errno, 0, "{forked:#?}");

    let d = h.decisions(2).await?;
    assert_eq!(d.len(), 2, "{d:#?}");
    let tool = &d[0];
    assert_eq!(tool.exe.as_deref(), Some(probe.as_str()), "{tool:#?}");
    assert_eq!(tool.ppid, Some(sh_pid), "{tool:#?}");
    assert_eq!(tool.parent_exe.as_deref(), Some(sh), "{tool:#?}");
    let child = &d[1];
    assert_eq!(child.exe.as_deref(), Some(probe.as_str()), "{child:#?}");
    assert_eq!(child.exe_source.as_deref(), Some("kernel"));
    assert_ne!(child.ppid, Some(std::process::id()), "{child:#?}");
    assert_eq!(
        child.parent_exe.as_deref(),
        Some(probe.as_str()),
        "{child:#?}"
    );
    h.stop().await
}
