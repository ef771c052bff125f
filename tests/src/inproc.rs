//! A controller in this process: fixed policies (YAML with `{base}` standing for the test's
//! cgroup prefix), every record it writes, and the waits the tests need on them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agentwall::{
    daemon::{self, Handle, Options, PolicySource},
    events::{AuditRecord, DecisionRecord},
    policy::{self, PolicySet},
};
use anyhow::{bail, Result};
use tokio::sync::mpsc;

use crate::{probe_in, sa, TestCgroups};

pub struct Ctl {
    pub cgroups: TestCgroups,
    handle: Option<Handle>,
    records: mpsc::UnboundedReceiver<AuditRecord>,
}

impl Ctl {
    /// Starts a controller enforcing `policies` (one YAML document each) after making the
    /// cgroups `make` (relative to the test prefix, parents first), and registers them.
    pub async fn start(policies: &[&str], make: &[&str]) -> Result<Ctl> {
        let cgroups = TestCgroups::new()?;
        let base = cgroups.base.clone();
        let mut set = Vec::new();
        for (i, yaml) in policies.iter().enumerate() {
            let yaml = yaml.replace("{base}", &base);
            set.push(policy::parse_policy(
                Path::new(&format!("p{i}.yaml")),
                &yaml,
            )?);
        }
        let made: Vec<PathBuf> = make
            .iter()
            .map(|m| cgroups.make(m))
            .collect::<Result<_>>()?;
        let (tap, records) = mpsc::unbounded_channel();
        let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: set }));
        opts.control_socket = None;
        opts.tap = Some(tap);
        let handle = daemon::start(opts).await?;
        for m in &made {
            handle.register(m).await?;
        }
        Ok(Ctl {
            cgroups,
            handle: Some(handle),
            records,
        })
    }

    pub fn h(&self) -> &Handle {
        self.handle.as_ref().expect("running")
    }

    /// The test cgroup at `rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.cgroups.path(rel)
    }

    /// Records until one matches `want` (fails after 5 s, listing what it saw).
    pub async fn wait_record(
        &mut self,
        want: impl Fn(&AuditRecord) -> bool,
    ) -> Result<AuditRecord> {
        next_record(&mut self.records, Duration::from_secs(5), want).await
    }

    /// The next decision record about `dst`.
    pub async fn decision_to(&mut self, dst: SocketAddr) -> Result<DecisionRecord> {
        let r = next_decision_to(&mut self.records, dst).await?;
        Ok(r.decision.expect("a decision"))
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        Ok(())
    }
}

/// Records from `records` until one matches `want` (fails after `limit`, listing what it saw).
pub async fn next_record(
    records: &mut mpsc::UnboundedReceiver<AuditRecord>,
    limit: Duration,
    want: impl Fn(&AuditRecord) -> bool,
) -> Result<AuditRecord> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, records.recv()).await {
            Ok(Some(r)) if want(&r) => return Ok(r),
            Ok(Some(r)) => seen.push(r),
            _ => bail!("no matching record; saw {seen:#?}"),
        }
    }
}

/// The next decision record about `dst` (within 5 s).
pub async fn next_decision_to(
    records: &mut mpsc::UnboundedReceiver<AuditRecord>,
    dst: SocketAddr,
) -> Result<AuditRecord> {
    let ip = dst.ip().to_string();
    next_record(records, Duration::from_secs(5), |r| {
        r.decision
            .as_ref()
            .is_some_and(|d| d.dst == ip && d.port == dst.port())
    })
    .await
}

/// A TCP connect from a process in `cgroup`: 0 when it connected, else the errno.
pub fn connect_errno(cgroup: &Path, to: SocketAddr) -> Result<i32> {
    let out = probe_in(cgroup, &[format!("tcp:{}", sa(to))])?;
    Ok(if out[0].ok { 0 } else { out[0].errno })
}

/// Connects from `agent` until refused with EPERM (fails after `limit`): how long that took.
/// Each try is a probe process asking the kernel, which paces the loop.
pub fn wait_denied(
    agent: &std::path::Path,
    to: std::net::SocketAddr,
    limit: std::time::Duration,
) -> anyhow::Result<std::time::Duration> {
    let start = std::time::Instant::now();
    loop {
        match connect_errno(agent, to)? {
            crate::EPERM => return Ok(start.elapsed()),
            0 => {}
            e => anyhow::bail!("connect to {to} failed with errno {e}, not EPERM"),
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "{to} still connected {limit:?} later"
        );
    }
}
