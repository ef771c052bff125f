//! The control plane cannot be turned against enforcement: a second controller on the same pins
//! refuses before touching them, `uninstall` refuses while a controller holds the lock, the
//! policy loader reads no file outside its directory and quotes none, `policy check` accepts
//! what `run` accepts, an idle-connection flood does not stop the controller answering, and a
//! non-root caller is told "permission denied".

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use agentwall_tests::{
    probe_in, tcp_server, unix_server_pid, wait::until, Daemon, TestCgroups, EPERM,
};
use anyhow::{bail, ensure, Context, Result};

fn policy(name: &str, cgroup: &str, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "name: {name}\nagents:\n  cgroups:\n    - {cgroup}\negress:\n  - name: api\n    cidr: 127.0.0.1/32\n    ports: [{}]\n    protocol: tcp\n",
        ports.join(", ")
    )
}

fn status(d: &Daemon) -> Result<serde_json::Value> {
    let (ok, out) = d.cli(&["status"])?;
    ensure!(ok, "status: {out}");
    Ok(serde_json::from_str(&out)?)
}

/// Waits until `status` lists an agent for the cgroup `rel` (each check asks the controller).
fn wait_registered(d: &Daemon, rel: &str) -> Result<serde_json::Value> {
    until(
        &format!("{rel} registered"),
        Duration::from_secs(10),
        &[],
        || {
            let s = status(d)?;
            let listed = s["agents"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["cgroup"] == rel));
            Ok(listed.then_some(s))
        },
    )
}

/// The parts of `status` a second controller must not change.
fn registry(s: &serde_json::Value) -> (serde_json::Value, serde_json::Value) {
    (s["agents"].clone(), s["policies"].clone())
}

#[test]
fn a_second_controller_refuses_before_touching_the_pins() -> Result<()> {
    let cg = TestCgroups::new()?;
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let (a, b) = (addr.port(), addr.port() ^ 1);
    let agent = format!("{}/lock", cg.base);
    let mut first = Daemon::prepare("lock-a")?;
    first.write_policy("p.yaml", &policy("p", &agent, &[a]))?;
    first.start()?;
    let pid = unix_server_pid(&first.socket)?;
    cg.make("lock")?;
    let before = wait_registered(&first, &agent)?;
    let out = probe_in(&cg.path("lock"), &[format!("tcp:127.0.0.1:{b}")])?;
    assert_eq!(out[0].errno, EPERM, "A denies {b}: {out:?}");

    // B allows more, on the same pins.
    let mut second = Daemon::prepare("lock-b")?;
    second.pin_dir = first.pin_dir.clone();
    second.write_policy("p.yaml", &policy("p", &agent, &[a, b]))?;
    let err = second
        .start()
        .expect_err("a second controller started on the same pins");
    // Its Drop must not uninstall the first controller's pins.
    second.pin_dir = second.dir.join("never-pinned");
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("pid {pid}")), "{msg}");
    assert!(msg.contains("another agentwall controller"), "{msg}");
    assert!(
        !msg.contains("loading eBPF"),
        "it got as far as loading: {msg}"
    );

    // The first controller's state is its own: registry unchanged, B's port still denied,
    // before and after a reload of A.
    assert_eq!(registry(&status(&first)?), registry(&before));
    let out = probe_in(
        &cg.path("lock"),
        &[format!("tcp:{addr}"), format!("tcp:127.0.0.1:{b}")],
    )?;
    assert_eq!((out[0].errno, out[1].errno), (0, EPERM), "{out:?}");
    let (ok, out) = first.cli(&["reload"])?;
    ensure!(ok, "reload: {out}");
    let out = probe_in(
        &cg.path("lock"),
        &[format!("tcp:{addr}"), format!("tcp:127.0.0.1:{b}")],
    )?;
    assert_eq!(
        (out[0].errno, out[1].errno),
        (0, EPERM),
        "after the reload: {out:?}"
    );
    let after = status(&first)?;
    assert_eq!(registry(&after), registry(&before));
    let decisions = first
        .records()?
        .into_iter()
        .filter_map(|r| r.decision)
        .filter(|r| r.port == b && r.action != "blocked")
        .count();
    assert_eq!(decisions, 0, "a connection to {b} was let through");

    let status = first.signal(libc::SIGTERM)?;
    ensure!(status.success(), "stop: {status}: {}", first.log());
    // Released with the controller: a new one starts.
    first.start()?;
    Ok(())
}

#[test]
fn uninstall_refuses_while_a_controller_holds_the_lock() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("uninstall-lock")?;
    d.write_policy("p.yaml", &policy("p", &format!("{}/u", cg.base), &[1]))?;
    d.start()?;
    let pid = unix_server_pid(&d.socket)?;
    // Known from the lock, not from the socket: it refuses with the socket gone too.
    std::fs::remove_file(&d.socket)?;
    let (ok, msg) = d.uninstall()?;
    assert!(!ok, "uninstall ran beside a live controller: {msg}");
    assert!(msg.contains(&format!("pid {pid}")), "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    ensure!(
        d.pin_dir.join("links/connect4").exists(),
        "the pins went anyway"
    );

    let pin_dir = d.pin_dir.display().to_string();
    let (ok, msg) = d.cli(&["uninstall", "--pin-dir", &pin_dir, "--force"])?;
    ensure!(ok, "uninstall --force: {msg}");
    assert!(
        msg.contains(&format!("pid {pid}")),
        "--force says whom: {msg}"
    );
    assert!(!d.pin_dir.join("links").exists(), "--force left the links");
    Ok(())
}

#[test]
fn policy_check_accepts_exactly_what_run_accepts() -> Result<()> {
    let cg = TestCgroups::new()?;
    let cap = agent_common::MAX_UNIX_PATHS as usize;
    // Two files that each fit, and together need one Unix entry more than the map holds (each
    // policy also gets the agent socket's entry, as `run` serves it by default).
    let unix_policy = |name: &str, n: usize, from: usize| {
        let entries: Vec<String> = (from..from + n)
            .map(|i| format!("    - /run/t/{i}.sock\n"))
            .collect();
        format!(
            "name: {name}\nagents:\n  cgroups:\n    - {}/{name}\negress: []\nunix:\n{}",
            cg.base,
            entries.concat()
        )
    };
    let mut d = Daemon::prepare("check-cap")?;
    d.write_policy("a.yaml", &unix_policy("a", cap / 2 - 1, 0))?;
    d.write_policy("b.yaml", &unix_policy("b", cap / 2, cap))?;
    let dir = d.dir.join("policies").display().to_string();
    let check = |d: &Daemon| -> Result<(bool, String)> {
        let out = Command::new(&d.agentwall)
            .args(["policy", "check", &dir])
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (ok, msg) = check(&d)?;
    assert!(!ok, "policy check accepted {} Unix entries", cap + 1);
    assert!(msg.contains("b.yaml") && msg.contains("a.yaml"), "{msg}");
    assert!(
        msg.contains(&format!("need {} Unix socket entries", cap + 1)),
        "{msg}"
    );
    let err = d
        .start()
        .expect_err("run accepted what the map cannot hold");
    assert!(
        format!("{err:#}").contains(&format!("need {} Unix socket entries", cap + 1)),
        "{err:#}"
    );

    // One fewer: both accept.
    d.write_policy("b.yaml", &unix_policy("b", cap / 2 - 1, cap))?;
    let (ok, msg) = check(&d)?;
    ensure!(ok, "policy check refused a set that fits: {msg}");
    d.start()?;

    // A syntax error: file:line:column from both.
    d.write_policy(
        "c.yaml",
        "name: c\nagents:\n  cgroups: [x/c]\negress:\n  - cidr: 10.0.0.0/33\n",
    )?;
    let (ok, msg) = check(&d)?;
    assert!(!ok);
    assert!(msg.contains("c.yaml:5:"), "{msg}");
    let (ok, reply) = d.cli(&["reload"])?;
    assert!(!ok);
    assert!(reply.contains("c.yaml:5:"), "{reply}");
    Ok(())
}

#[test]
fn a_symlink_out_of_the_policy_directory_is_refused_unread() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("symlink")?;
    d.write_policy("p.yaml", &policy("p", &format!("{}/s", cg.base), &[1]))?;
    d.start()?;
    let hash = "S3CRETHASHabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let secret = d.dir.join("shadow");
    std::fs::write(&secret, format!("root:$6${hash}:19000:0:99999:7:::\n"))?;
    let policies = d.dir.join("policies");
    std::os::unix::fs::symlink(&secret, policies.join("abs.yaml"))?;
    std::os::unix::fs::symlink("../shadow", policies.join("rel.yaml"))?;
    // A link between the directory's own entries (a Kubernetes ConfigMap volume) is fine.
    std::fs::create_dir(policies.join("..data"))?;
    std::fs::write(
        policies.join("..data/q.yaml"),
        policy("q", &format!("{}/q", cg.base), &[2]),
    )?;
    std::os::unix::fs::symlink("..data/q.yaml", policies.join("q.yaml"))?;

    let (ok, reply) = d.cli(&["reload"])?;
    assert!(!ok, "reload accepted a link out of the directory: {reply}");
    for name in ["abs.yaml", "rel.yaml"] {
        assert!(
            reply.contains(&format!(
                "{name}: a symbolic link out of the policy directory"
            )),
            "{reply}"
        );
    }
    assert!(
        !reply.contains("q.yaml:"),
        "the in-directory link was refused: {reply}"
    );
    assert!(
        !reply.contains(hash) && !reply.contains("S3CRET"),
        "{reply}"
    );
    assert!(!d.log().contains("S3CRET"), "{}", d.log());
    let out = Command::new(&d.agentwall)
        .args(["policy", "check"])
        .arg(&policies)
        .output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("rel.yaml"), "{text}");
    assert!(!text.contains("S3CRET"), "{text}");

    // Without the outside links the set loads, the linked file included.
    std::fs::remove_file(policies.join("abs.yaml"))?;
    std::fs::remove_file(policies.join("rel.yaml"))?;
    let (ok, reply) = d.cli(&["reload"])?;
    ensure!(ok, "reload: {reply}");
    let s = status(&d)?;
    assert_eq!(s["policies"], serde_json::json!(["p", "q"]), "{s}");
    Ok(())
}

/// Raises this process's soft open-file limit to its hard limit (CAP_SYS_RESOURCE, which would
/// raise the hard one, may be missing in a container); returns it.
fn raise_nofile() -> Result<u64> {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        ensure!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0);
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        }
        Ok(lim.rlim_max)
    }
}

/// A forked child holding `n` idle connections to a Unix socket (one process's descriptor
/// limit may not hold them all); it exits when dropped.
struct IdleChild {
    pid: libc::pid_t,
    release: libc::c_int,
}

impl IdleChild {
    fn spawn(path: &Path, n: usize) -> Result<IdleChild> {
        use std::os::unix::ffi::OsStrExt;
        // Everything the child needs is prepared here: after fork it only makes system calls.
        // SAFETY: sockaddr_un is plain data.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        ensure!(bytes.len() < addr.sun_path.len(), "socket path too long");
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let (mut ready, mut release) = ([0; 2], [0; 2]);
        // SAFETY: arrays of two descriptors, as pipe2 wants.
        unsafe {
            ensure!(libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) == 0);
            ensure!(libc::pipe2(release.as_mut_ptr(), libc::O_CLOEXEC) == 0);
        }
        // SAFETY: the child makes only async-signal-safe calls (socket, connect, write, read,
        // _exit) on data prepared before the fork.
        let pid = unsafe { libc::fork() };
        ensure!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            unsafe {
                libc::close(ready[0]);
                libc::close(release[1]);
                let mut ok: u8 = 1;
                for _ in 0..n {
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                    if fd < 0
                        || libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0
                    {
                        ok = 0;
                        break;
                    }
                }
                libc::write(ready[1], &ok as *const u8 as *const libc::c_void, 1);
                let mut b = 0u8;
                libc::read(release[0], &mut b as *mut u8 as *mut libc::c_void, 1);
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copies of the child's ends, and reading one byte.
        let ok = unsafe {
            libc::close(ready[1]);
            libc::close(release[0]);
            let mut b = 0u8;
            let r = libc::read(ready[0], &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::close(ready[0]);
            r == 1 && b == 1
        };
        let child = IdleChild {
            pid,
            release: release[1],
        };
        ensure!(ok, "the child could not open {n} connections");
        Ok(child)
    }
}

impl Drop for IdleChild {
    fn drop(&mut self) {
        // SAFETY: closing our pipe end releases the child (our own, by pid), then reaping it.
        unsafe {
            libc::close(self.release);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

#[test]
fn twenty_thousand_idle_connections_do_not_stop_the_controller() -> Result<()> {
    const IDLE: usize = 20_000;
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("flood")?;
    d.write_policy("p.yaml", &policy("p", &format!("{}/f", cg.base), &[1]))?;
    d.start()?;
    let limit = raise_nofile()? as usize;
    let lines_before = d.log().lines().count();
    let started = Instant::now();
    // Half in a child, half here: each within its descriptor limit.
    let in_child = IDLE / 2;
    ensure!(
        limit > IDLE - in_child + 256,
        "RLIMIT_NOFILE {limit} is too low"
    );
    let child = IdleChild::spawn(&d.socket, in_child)?;
    let mut idle = Vec::with_capacity(IDLE - in_child);
    for i in 0..IDLE - in_child {
        let s = std::os::unix::net::UnixStream::connect(&d.socket)
            .with_context(|| format!("idle connection {i}"))?;
        idle.push(s);
    }
    let opened = started.elapsed();

    let t = Instant::now();
    let (ok, out) = d.cli(&["status"])?;
    let took = t.elapsed();
    ensure!(ok, "status beside {IDLE} idle connections: {out}");
    assert!(
        took < Duration::from_secs(3),
        "status took {took:?} beside {IDLE} idle connections"
    );
    // Twice, the second on a slot freed from an idle one as well.
    let (ok, out) = d.cli(&["status"])?;
    ensure!(ok, "second status: {out}");
    drop(idle);
    drop(child);
    let log = d.log();
    let lines = log.lines().count() - lines_before;
    // At most one summary a second while connections were being turned away, plus slack.
    let bound = 5 + 2 * (opened.as_secs() as usize + 2);
    eprintln!(
        "{IDLE} idle connections opened in {opened:?}; status in {took:?}; {lines} log lines"
    );
    assert!(
        lines <= bound,
        "{lines} log lines for {IDLE} idle connections (opened in {opened:?}):\n{log}"
    );
    assert!(
        log.contains("connections closed in the last second"),
        "no summary: {log}"
    );
    let status = d.signal(libc::SIGTERM)?;
    ensure!(status.success(), "stop: {status}: {}", d.log());
    Ok(())
}

#[test]
fn a_non_root_caller_is_told_permission_denied() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("nonroot")?;
    d.write_policy("p.yaml", &policy("p", &format!("{}/n", cg.base), &[1]))?;
    d.start()?;
    // The socket is root's (0600): connect fails with EACCES.
    let msg = d.cli_as_nobody(&["status"])?;
    assert!(msg.contains("permission denied"), "{msg}");
    assert!(!msg.contains("running?"), "misleading: {msg}");
    assert!(!msg.contains("os error"), "{msg}");

    // Opened up by mistake: the controller itself refuses a peer that is not root.
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666))?;
    let msg = d.cli_as_nobody(&["status"])?;
    assert!(msg.contains("permission denied"), "{msg}");
    assert!(!msg.contains("\"generation\""), "{msg}");
    Ok(())
}
