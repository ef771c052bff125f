//! Revoke ends access for connected UDP sockets too, and in every network namespace the agent
//! uses: the kernel's sock_diag SOCK_DESTROY aborts the agent's socket (its blocked read fails)
//! and the record counts it.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
};

use agentwall::control::{Caller, GrantRequest};
use agentwall_tests::inproc::Ctl;
use anyhow::{ensure, Context, Result};

const ADMIN: Caller = Caller::Admin { uid: 0 };

const POLICY: &str = r#"
name: revoke-udp
agents:
  cgroups: ["{base}/agent"]
egress: []
grantable:
  - cidr: 127.0.0.0/8
    protocol: udp
max_grant_ttl: 1h
"#;

/// bash joins the agent's cgroup (in a network namespace of its own when `netns`), connects a
/// UDP socket to `to`, says so, and blocks reading it until the socket ends.
fn agent_reader(c: &Ctl, to: &str, netns: bool) -> Result<Child> {
    let (ip, port) = to.rsplit_once(':').context("addr")?;
    let read = format!("exec 3<>/dev/udp/{ip}/{port} && echo connected && cat <&3");
    let inner = if netns {
        // A fresh namespace's loopback is down: bring it up, then the same.
        format!("unshare -n bash -c 'ip link set lo up && {read}'")
    } else {
        read
    };
    let script = format!(
        "echo $$ > {}/cgroup.procs && {inner}",
        c.path("agent").display()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        // A group of its own, so a failed test ends the whole reader (cat below unshare).
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    ensure!(
        line.trim() == "connected",
        "the agent did not connect: {line:?}"
    );
    Ok(child)
}

async fn revoke_aborts_the_read(netns: bool, to: &str) -> Result<()> {
    let mut c = Ctl::start(&[POLICY], &["agent"]).await?;
    let (ip, port) = to.rsplit_once(':').context("addr")?;
    let g = c
        .h()
        .grant(
            GrantRequest {
                agent: "agent".into(),
                to: ip.into(),
                ports: Some(port.into()),
                protocol: Some("udp".into()),
                ttl_secs: 600,
                task: None,
                reason: "revoke test".into(),
            },
            ADMIN,
        )
        .await?;
    let mut child = agent_reader(&c, to, netns)?;
    let r = c.h().revoke(g.id, ADMIN).await?;
    if r.sockets_destroyed != 1 {
        // The reader would block for ever: end its group (its pid is the group id).
        // SAFETY: plain syscall on our own child's process group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        anyhow::bail!(
            "revoke destroyed {} sockets, not 1: {r:?}",
            r.sockets_destroyed
        );
    }
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the agent's read ended cleanly: {stderr}"
    );
    ensure!(
        stderr.contains("abort"),
        "the agent's read did not fail with an abort: {stderr}"
    );
    let rec = c.wait_record(|r| r.kind == "revoked").await?;
    assert_eq!(rec.detail.expect("detail")["sockets_destroyed"], 1);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_aborts_a_connected_udp_socket() -> Result<()> {
    revoke_aborts_the_read(false, "127.0.0.11:9911").await
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_reaches_the_agents_sockets_in_another_network_namespace() -> Result<()> {
    revoke_aborts_the_read(true, "127.0.0.12:9912").await
}
