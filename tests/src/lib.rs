//! Harness for the kernel tests: a unique cgroup subtree per test, a controller with a test
//! policy, servers on loopback, and the probe process run inside (or outside) the agent.
//! Everything a test creates is removed when it ends; links close with the controller.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use agentwall::{
    api::Request,
    cgroup,
    controller::{self, Handle, Options, PolicySource},
    events::{AuditRecord, DecisionRecord},
    policy::{self, PolicySet},
};
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use tokio::sync::mpsc;

pub const EPERM: i32 = libc::EPERM;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails (never skips) when the kernel tests cannot run.
pub fn require_root() -> Result<()> {
    // SAFETY: plain getter.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "kernel tests need root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN): run `cargo xtask test` as root"
    );
    Ok(())
}

/// A cgroup subtree unique to one test: <cgroup2>/agentwall-test-<pid>-<n>.
pub struct TestCgroups {
    pub root: PathBuf,
    /// Relative to the cgroup2 root.
    pub base: String,
}

impl TestCgroups {
    pub fn new() -> Result<Self> {
        require_root()?;
        let root = cgroup::cgroup2_mount()?;
        let base = format!(
            "agentwall-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        cgroup::create(&root.join(&base))?;
        Ok(Self { root, base })
    }

    /// Creates `<base>/<rel>` and returns its absolute path.
    pub fn make(&self, rel: &str) -> Result<PathBuf> {
        let p = self.path(rel);
        cgroup::create(&p)?;
        Ok(p)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(&self.base).join(rel)
    }

    /// `<base>/<rel>` relative to the cgroup2 root, for policy selectors.
    pub fn rel(&self, rel: &str) -> String {
        format!("{}/{}", self.base, rel)
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        // Deepest first; the probes have exited, so the cgroups are empty.
        let mut dirs = cgroup::walk(&self.root.join(&self.base));
        dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        for d in dirs {
            let _ = std::fs::remove_dir(self.root.join(&self.base).join(d));
        }
        let _ = std::fs::remove_dir(self.root.join(&self.base));
    }
}

/// A running controller for one test, enforcing one policy on `<base>/agent`.
pub struct Harness {
    pub cgroups: TestCgroups,
    pub agent: PathBuf,
    pub handle: Option<Handle>,
    records: mpsc::UnboundedReceiver<AuditRecord>,
}

impl Harness {
    /// `policy_yaml` may use `{agent}` for the agent cgroup's selector (relative path).
    pub async fn start(policy_yaml: &str) -> Result<Self> {
        Self::start_with(policy_yaml, |_| {}).await
    }

    /// As `start`, with the controller's options adjusted by `tune`.
    pub async fn start_with(policy_yaml: &str, tune: impl FnOnce(&mut Options)) -> Result<Self> {
        let cgroups = TestCgroups::new()?;
        let agent = cgroups.make("agent")?;
        let yaml = policy_yaml.replace("{agent}", &cgroups.rel("agent"));
        let p = policy::parse_policy(Path::new("test-policy.yaml"), &yaml)?;
        let (tap, records) = mpsc::unbounded_channel();
        let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: vec![p] }));
        opts.control_socket = None;
        opts.tap = Some(tap);
        tune(&mut opts);
        let handle = controller::start(opts).await?;
        handle
            .request(Request::Register {
                cgroup: agent.clone(),
            })
            .await?;
        Ok(Self {
            cgroups,
            agent,
            handle: Some(handle),
            records,
        })
    }

    /// Records from now until `n` have arrived (fails after 5 s), then any that follow within
    /// a short grace, so a test sees extra events too.
    pub async fn decisions(&mut self, n: usize) -> Result<Vec<DecisionRecord>> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.records.recv()).await {
                Ok(Some(r)) => out.push(r),
                _ => bail!("expected {n} audit records, got {}: {out:#?}", out.len()),
            }
        }
        while let Ok(Some(r)) =
            tokio::time::timeout(Duration::from_millis(150), self.records.recv()).await
        {
            out.push(r);
        }
        out.into_iter()
            .map(|r| match r.decision {
                Some(d) => Ok(d),
                None => bail!("expected a decision record, got lost={:?}", r.lost),
            })
            .collect()
    }

    /// Asserts no record arrives within a grace period.
    pub async fn no_decisions(&mut self) -> Result<()> {
        if let Ok(Some(r)) =
            tokio::time::timeout(Duration::from_millis(300), self.records.recv()).await
        {
            bail!("expected no audit record, got {r:?}");
        }
        Ok(())
    }

    /// Stops the controller and returns every record that was still to come (the final drain).
    pub async fn stop_and_collect(mut self) -> Result<Vec<AuditRecord>> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        let mut out = Vec::new();
        while let Ok(r) = self.records.try_recv() {
            out.push(r);
        }
        Ok(out)
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        Ok(())
    }
}

/// A binary of this workspace built beside the test (target/<profile>/NAME); the integration
/// test itself runs from target/<profile>/deps.
pub fn sibling_exe(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me
        .parent()
        .and_then(Path::parent)
        .context("test binary has no parent directory")?;
    let exe = dir.join(name);
    ensure!(
        exe.exists(),
        "{} is missing: build the workspace binaries first (cargo xtask test does)",
        exe.display()
    );
    Ok(exe)
}

/// One step's result as the probe reports it.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub step: String,
    pub ok: bool,
    pub errno: i32,
    pub value: i64,
}

/// Runs the probe with `steps`; returns one outcome per step.
pub fn probe(steps: &[String]) -> Result<Vec<Outcome>> {
    let out = Command::new(sibling_exe("probe")?)
        .args(steps)
        .output()
        .context("running the probe")?;
    ensure!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let outcomes: Vec<Outcome> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(outcomes.len() == steps.len(), "probe output: {text}");
    Ok(outcomes)
}

/// Runs `steps` in a probe that first joins `cgroup`; returns the outcomes after the join.
pub fn probe_in(cgroup: &Path, steps: &[String]) -> Result<Vec<Outcome>> {
    let mut all = vec![format!("join:{}", cgroup.display())];
    all.extend_from_slice(steps);
    let mut out = probe(&all)?;
    ensure!(
        out[0].ok,
        "joining {}: errno {}",
        cgroup.display(),
        out[0].errno
    );
    Ok(out.split_off(1))
}

/// A TCP listener on a loopback address with a free port.
pub fn tcp_server(ip: &str) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(SocketAddr::new(ip.parse()?, 0))
        .with_context(|| format!("binding TCP on {ip}"))?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// A UDP socket on a loopback address with a free port (non-blocking reads with a timeout).
pub fn udp_server(ip: &str) -> Result<(UdpSocket, SocketAddr)> {
    let s = UdpSocket::bind(SocketAddr::new(ip.parse()?, 0))
        .with_context(|| format!("binding UDP on {ip}"))?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let a = s.local_addr()?;
    Ok((s, a))
}

/// Datagrams waiting on `s` (reads until the timeout).
pub fn received(s: &UdpSocket) -> usize {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while s.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// `addr` in the probe's form.
pub fn sa(a: SocketAddr) -> String {
    a.to_string()
}
