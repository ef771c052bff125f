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
    daemon::{self, Handle, Options, PolicySource},
    events::{AuditRecord, DecisionRecord},
    identity::cgroup,
    policy::{self, PolicySet},
};
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use tokio::sync::mpsc;

pub mod audit;
pub mod dns_load;
pub mod dns_server;
pub mod inproc;
pub mod nats_server;
pub mod wait;

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
        let handle = daemon::start(opts).await?;
        handle.register(&agent).await?;
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
    #[serde(default)]
    pub detail: String,
}

/// Runs the probe with `steps`; returns one outcome per step.
pub fn probe(steps: &[String]) -> Result<Vec<Outcome>> {
    let (status, outcomes) = probe_status(steps)?;
    ensure!(status.success(), "probe exited with {status}");
    ensure!(outcomes.len() == steps.len(), "probe output: {outcomes:?}");
    Ok(outcomes)
}

/// Runs the probe with `steps`, however it ends; returns how, and the outcomes it printed
/// (one line per finished step).
pub fn probe_status(steps: &[String]) -> Result<(std::process::ExitStatus, Vec<Outcome>)> {
    let out = Command::new(sibling_exe("probe")?)
        .args(steps)
        .output()
        .context("running the probe")?;
    let text = String::from_utf8(out.stdout)?;
    let outcomes: Vec<Outcome> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("probe output: {text}"))?;
    if !out.status.success() && out.status.code().is_some() {
        bail!("probe failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((out.status, outcomes))
}

/// Runs `steps` in a probe that first joins `cgroup`; returns the outcomes after the join.
pub fn probe_in(cgroup: &Path, steps: &[String]) -> Result<Vec<Outcome>> {
    let (status, out) = probe_status_in(cgroup, steps)?;
    ensure!(status.success(), "probe exited with {status}");
    ensure!(out.len() == steps.len(), "probe output: {out:?}");
    Ok(out)
}

/// As `probe_in`, however the probe ends: how it ended and the outcomes of the steps after the
/// join that finished.
pub fn probe_status_in(
    cgroup: &Path,
    steps: &[String],
) -> Result<(std::process::ExitStatus, Vec<Outcome>)> {
    let mut all = vec![format!("join:{}", cgroup.display())];
    all.extend_from_slice(steps);
    let (status, mut out) = probe_status(&all)?;
    ensure!(
        out.first().is_some_and(|o| o.ok),
        "joining {}: {out:?}",
        cgroup.display()
    );
    Ok((status, out.split_off(1)))
}

/// Sets sysctls for as long as it lives, then restores them (tests that need a kernel knob
/// turned for a moment).
pub struct Sysctls(Vec<(String, String)>);

impl Sysctls {
    pub fn set(values: &[(&str, &str)]) -> Result<Self> {
        let mut old = Vec::new();
        for (path, v) in values {
            let path = format!("/proc/sys/{path}");
            let was = std::fs::read_to_string(&path).with_context(|| path.clone())?;
            std::fs::write(&path, v).with_context(|| path.clone())?;
            old.push((path, was));
        }
        Ok(Self(old))
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        for (path, was) in self.0.iter().rev() {
            let _ = std::fs::write(path, was);
        }
    }
}

/// A TCP listener on a loopback address with a free port. A thread accepts and closes every
/// connection so the backlog never fills, however many connects a test makes.
pub fn tcp_server(ip: &str) -> Result<(TcpListener, SocketAddr)> {
    tcp_server_at(SocketAddr::new(ip.parse()?, 0))
}

/// The same at exactly `at` (a fixed port).
pub fn tcp_server_at(at: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(at).with_context(|| format!("binding TCP on {at}"))?;
    let a = l.local_addr()?;
    let acceptor = l.try_clone()?;
    std::thread::spawn(move || {
        for conn in acceptor.incoming() {
            drop(conn);
        }
    });
    Ok((l, a))
}

/// Creates a BPF array map (key 4 B, value 8 B, 1 entry) and pins it at `path`: a map of the
/// wrong shape for tests of the pinned-map check.
pub fn pin_wrong_map(path: &Path) -> Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _pad: [u32; 11],
    }
    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut create = MapCreate {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        ..Default::default()
    };
    // SAFETY: BPF_MAP_CREATE (0) with a zero-padded attr of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &mut create as *mut MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut pin = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: BPF_OBJ_PIN (6) with a valid path and our map fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            &mut pin as *mut ObjPin,
            std::mem::size_of::<ObjPin>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd we created; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    ensure!(rc == 0, "BPF_OBJ_PIN {}: {err}", path.display());
    Ok(())
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

/// `agentwall run` as a child process with its own policy dir, audit log, control socket and
/// pin directory, all under one temp dir. Dropping it stops the daemon (by pid) and uninstalls
/// what it pinned.
pub struct Daemon {
    child: Option<std::process::Child>,
    pub agentwall: PathBuf,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub audit: PathBuf,
    pub pin_dir: PathBuf,
}

impl Daemon {
    /// A temp dir with an empty `policies/` directory, not started yet.
    pub fn prepare(tag: &str) -> Result<Self> {
        require_root()?;
        let dir = std::env::temp_dir().join(format!(
            "agentwall-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies"))?;
        agentwall::datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
        Ok(Self {
            child: None,
            agentwall: sibling_exe("agentwall")?,
            socket: dir.join("control.sock"),
            audit: dir.join("audit.jsonl"),
            pin_dir: PathBuf::from(format!(
                "/sys/fs/bpf/agentwall-test-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::SeqCst)
            )),
            dir,
        })
    }

    pub fn write_policy(&self, file: &str, yaml: &str) -> Result<()> {
        Ok(std::fs::write(self.dir.join("policies").join(file), yaml)?)
    }

    /// Starts `agentwall run` and waits for its control socket.
    pub fn start(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "already running");
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(&self.agentwall)
            .arg("run")
            .arg("--policy")
            .arg(self.dir.join("policies"))
            .arg("--audit-log")
            .arg(&self.audit)
            .arg("--control-socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["--rescan-ms", "100"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("daemon.log"))?)
            .spawn()
            .context("starting agentwall run")?;
        self.child = Some(child);
        // The socket appears in `dir`, and so does anything the daemon says before it exits.
        let dir = self.dir.clone();
        wait::until(
            "the control socket",
            Duration::from_secs(20),
            &[&dir],
            || {
                if self.socket.exists() {
                    return Ok(Some(()));
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    self.child = None;
                    bail!("agentwall run exited at start: {status}: {}", self.log());
                }
                Ok(None)
            },
        )?;
        Ok(())
    }

    /// `agentwall <args> --control-socket <socket>` as uid/gid 65534 (nobody): it must fail;
    /// returns its stderr.
    pub fn cli_as_nobody(&self, args: &[&str]) -> Result<String> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.agentwall);
        cmd.args(args).arg("--control-socket").arg(&self.socket);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output()?;
        ensure!(!out.status.success(), "{args:?} ran as nobody");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Sends `signal` to the daemon (our own child, by pid) and waits for it.
    pub fn signal(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        // SAFETY: signalling the child we started, by its pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        Ok(child.wait()?)
    }

    /// `agentwall <args> --control-socket <socket>`; returns (success, stdout+stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new(&self.agentwall)
            .args(args)
            .arg("--control-socket")
            .arg(&self.socket)
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    fn exec_command(&self, cgroup_parent: &str, agent: &str, steps: &[String]) -> Result<Command> {
        let mut cmd = Command::new(&self.agentwall);
        cmd.args(["exec", "--agent", agent, "--cgroup-parent", cgroup_parent])
            .arg("--control-socket")
            .arg(&self.socket)
            .arg("--")
            .arg(sibling_exe("probe")?)
            .args(steps);
        Ok(cmd)
    }

    /// `agentwall exec` a probe; returns (exit ok, outcomes, stderr).
    pub fn exec_probe(
        &self,
        cgroup_parent: &str,
        agent: &str,
        steps: &[String],
    ) -> Result<(bool, Vec<Outcome>, String)> {
        let out = self.exec_command(cgroup_parent, agent, steps)?.output()?;
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

    /// Starts an exec'd probe without waiting (collect with `wait_probe`).
    pub fn spawn_probe(
        &self,
        cgroup_parent: &str,
        agent: &str,
        steps: &[String],
    ) -> Result<std::process::Child> {
        Ok(self
            .exec_command(cgroup_parent, agent, steps)?
            .stdout(std::process::Stdio::piped())
            .spawn()?)
    }

    pub fn wait_probe(child: std::process::Child) -> Result<Vec<Outcome>> {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "probe exited with {}", out.status);
        Ok(String::from_utf8(out.stdout)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<Vec<Outcome>, _>>()?)
    }

    /// Every record in the audit log.
    pub fn records(&self) -> Result<Vec<AuditRecord>> {
        let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
        Ok(text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    }

    /// `agentwall uninstall` for this daemon's pin directory.
    pub fn uninstall(&self) -> Result<(bool, String)> {
        let pin_dir = self.pin_dir.display().to_string();
        self.cli(&["uninstall", "--pin-dir", &pin_dir])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.signal(libc::SIGTERM);
        }
        let _ = agentwall::datapath::pin::uninstall(&self.pin_dir);
        // A test that moved pin_dir into layout directories (<test dir>/v1, v2...): all of them.
        if let Some(parent) = self.pin_dir.parent() {
            let ours = parent
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("agentwall-test-"));
            if ours {
                for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                    let _ = agentwall::datapath::pin::uninstall(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pid of the process serving a Unix socket (SO_PEERCRED).
pub fn unix_server_pid(socket: &Path) -> Result<i32> {
    use std::os::fd::AsRawFd;
    let s = std::os::unix::net::UnixStream::connect(socket)?;
    // SAFETY: an all-zero ucred is valid; getsockopt fills at most `len` bytes.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a connected socket we own and an out-parameter of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    ensure!(rc == 0, "SO_PEERCRED: {}", std::io::Error::last_os_error());
    Ok(cred.pid)
}

/// A policy for `Harness` (its `{agent}`): TCP to 127.0.0.1:`port` only, rule `api`.
pub fn one_port_policy(port: u16) -> String {
    format!(
        "name: t\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress:\n  - name: api\n    cidr: \
         \"127.0.0.1/32\"\n    ports: [{port}]\n    protocol: tcp\n"
    )
}

/// An address on the server's host with a port `one_port_policy` does not allow.
pub fn denied(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip(), a.port() ^ 1)
}
