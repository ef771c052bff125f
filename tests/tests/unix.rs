//! Unix sockets: an agent reaches a Unix socket only by a path, a directory or an abstract name
//! its policy lists (cgroup/connect_unix and cgroup/sendmsg_unix). Each denied attempt fails with
//! EPERM, reaches nothing, and is recorded with the name the kernel would have used.

use std::{
    os::{
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram, UnixListener},
    },
    path::PathBuf,
};

use agentwall_tests::{probe, probe_in, Harness, EPERM};
use anyhow::{ensure, Context, Result};

/// A directory for the test's sockets, removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Result<Self> {
        let d = std::env::temp_dir().join(format!("agentwall-unix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("tools"))?;
        Ok(Self(d))
    }

    fn path(&self, rel: &str) -> String {
        self.0.join(rel).display().to_string()
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn listen(path: &str) -> Result<UnixListener> {
    let l = UnixListener::bind(path).with_context(|| format!("binding {path}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn listen_abstract(name: &str) -> Result<UnixListener> {
    let l = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Connections waiting to be accepted (each taken off the queue).
fn accepted(l: &UnixListener) -> usize {
    std::iter::from_fn(|| l.accept().ok()).count()
}

fn datagrams(s: &UnixDatagram) -> usize {
    let mut buf = [0u8; 64];
    std::iter::from_fn(|| s.recv(&mut buf).ok()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_are_reached_only_by_listed_names() -> Result<()> {
    let dir = SocketDir::new()?;
    let tag = format!("agentwall-test-{}", std::process::id());
    let allowed = listen(&dir.path("allowed.sock"))?;
    let tool = listen(&dir.path("tools/tool.sock"))?;
    let secret = listen(&dir.path("secret"))?;
    let abs_ok = listen_abstract(&format!("{tag}-ok"))?;
    let abs_no = listen_abstract(&format!("{tag}-no"))?;
    let dg_ok = UnixDatagram::bind(dir.path("dg-ok.sock"))?;
    let dg_no = UnixDatagram::bind(dir.path("dg-no.sock"))?;
    for s in [&dg_ok, &dg_no] {
        s.set_nonblocking(true)?;
    }
    let policy = format!(
        "name: t\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress: []\nunix:\n  - {}\n  - {}\n  \
         - {}\n  - \"@{tag}-ok\"\n  - {}\n",
        dir.path("allowed.sock"),
        dir.path("tools/"),
        dir.path("secretX"),
        dir.path("dg-ok.sock"),
    );
    let mut h = Harness::start(&policy).await?;

    // Outside the agent every socket is reachable, and nothing is recorded.
    let outside = probe(&[
        format!("unix:{}", dir.path("secret")),
        format!("unix:@{tag}-no"),
        format!("unixdg:{}", dir.path("dg-no.sock")),
    ])?;
    ensure!(
        outside.iter().all(|o| o.ok),
        "outside the agent: {outside:#?}"
    );
    assert_eq!(
        (accepted(&secret), accepted(&abs_no), datagrams(&dg_no)),
        (1, 1, 1)
    );
    h.no_decisions().await?;

    let secret_x = dir.path("secretX");
    let steps = [
        format!("unix:{}", dir.path("allowed.sock")),
        format!("unix:{}", dir.path("tools/tool.sock")),
        format!("unix:{}", dir.path("secret")),
        // Climbing out of the listed directory.
        format!("unix:{}", dir.path("tools/../secret")),
        // The listed secretX, with an address length that cuts it to the unlisted secret.
        format!("unix:{secret_x},{}", secret_x.len() - 1),
        format!("unix:@{tag}-ok"),
        format!("unix:@{tag}-no"),
        format!("unixdg:{}", dir.path("dg-ok.sock")),
        format!("unixdg:{}", dir.path("dg-no.sock")),
    ];
    let out = probe_in(&h.agent, &steps)?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(
        errnos,
        [0, 0, EPERM, EPERM, EPERM, 0, EPERM, 0, EPERM],
        "{out:#?}"
    );
    // What was refused reached nothing; what was allowed arrived.
    assert_eq!(
        (accepted(&allowed), accepted(&tool), accepted(&secret)),
        (1, 1, 0)
    );
    assert_eq!((accepted(&abs_ok), accepted(&abs_no)), (1, 0));
    assert_eq!((datagrams(&dg_ok), datagrams(&dg_no)), (1, 0));

    let d = h.decisions(steps.len()).await?;
    let seen: Vec<(&str, &str, &str, &str)> = d
        .iter()
        .map(|r| {
            (
                r.hook.as_str(),
                r.unix_path.as_deref().unwrap_or("-"),
                r.action.as_str(),
                r.reason.as_str(),
            )
        })
        .collect();
    let (allowed_p, tool_p, secret_p) = (
        dir.path("allowed.sock"),
        dir.path("tools/tool.sock"),
        dir.path("secret"),
    );
    let climb = dir.path("tools/../secret");
    let (ok_name, no_name) = (format!("@{tag}-ok"), format!("@{tag}-no"));
    let (dg_ok_p, dg_no_p) = (dir.path("dg-ok.sock"), dir.path("dg-no.sock"));
    let no_match = "default-deny:no-path-match";
    assert_eq!(
        seen,
        [
            ("connect_unix", allowed_p.as_str(), "allowed", "rule"),
            ("connect_unix", tool_p.as_str(), "allowed", "rule"),
            ("connect_unix", secret_p.as_str(), "blocked", no_match),
            (
                "connect_unix",
                climb.as_str(),
                "blocked",
                "deny:path-dotdot"
            ),
            // Recorded as the name the kernel would have used.
            ("connect_unix", secret_p.as_str(), "blocked", no_match),
            ("connect_unix", ok_name.as_str(), "allowed", "rule"),
            ("connect_unix", no_name.as_str(), "blocked", no_match),
            ("sendmsg_unix", dg_ok_p.as_str(), "allowed", "rule"),
            ("sendmsg_unix", dg_no_p.as_str(), "blocked", no_match),
        ]
    );
    // Allowed decisions name the entry that allowed them.
    let entries: Vec<Option<&str>> = d.iter().map(|r| r.rule_name.as_deref()).collect();
    let tools = dir.path("tools/");
    assert_eq!(entries[1], Some(tools.as_str()));
    assert_eq!(entries[5], Some(ok_name.as_str()));
    assert_eq!(
        (
            d[0].family.as_str(),
            d[0].protocol.as_str(),
            d[7].protocol.as_str()
        ),
        ("unix", "stream", "dgram")
    );
    h.stop().await
}
