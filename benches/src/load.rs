//! The workload process (`agentwall-bench __load ...`): joins a cgroup, pins itself to the client
//! CPU, runs a loop of one kind of operation (network operations against a loopback server, a
//! syscall, or fork+exec+wait of a tiny program) and prints how long it took. It is a child of the bench so that the cgroup it joins (an agent's, or not) is
//! the only thing that differs between runs.
//!
//! Output, one JSON line each: `{"started":true}` after the warm-up, then the result.

use std::{
    ffi::{CStr, CString},
    io::{self, Write},
    net::SocketAddrV4,
    os::{fd::RawFd, unix::ffi::OsStrExt},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{cleanup, sys};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// socket() + SO_LINGER 0 + connect() + close(), one connection per operation.
    Tcp,
    /// sendto() of 32 bytes on one unconnected UDP socket.
    Udp,
    /// send() of 32 bytes on one connected UDP socket.
    Udpc,
    /// getppid(): the cheapest syscall, so any cost a hook puts on every syscall of every
    /// process shows (agentwall's packet-socket guard runs on capability checks instead).
    Syscall,
    /// fork() + execve() of `--program` (a static exit(0)) + waitpid(): what the tracepoints
    /// on sched_process_fork/exec/exit cost a process's life cycle.
    Exec,
    /// A TCP connection through an HTTP CONNECT proxy: connect to the proxy, CONNECT to the
    /// target, read the proxy's reply (must be 200), close.
    Proxy,
    /// One attempt to reach the target (directly, or through `--proxy`); prints whether it
    /// was allowed instead of timing anything.
    Check,
    /// TCP connects in a tight loop until SIGUSR1; prints a [`Flip`] line each time the
    /// kernel's answer changes (allowed, or refused with EPERM): what a grant or revoke does,
    /// seen from the agent.
    Flip,
    /// One TCP connection, held open until SIGUSR1 (the revoke-to-reset test).
    Hold,
}

/// What `--kind flip` prints when the kernel's answer changes: `ok` allowed, else EPERM;
/// `ns` CLOCK_MONOTONIC when that answer came back.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Flip {
    pub ok: bool,
    pub ns: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The loopback server.
    #[arg(long)]
    pub target: SocketAddrV4,
    /// The HTTP CONNECT proxy (kinds proxy and check).
    #[arg(long)]
    pub proxy: Option<SocketAddrV4>,
    /// The program kind exec runs.
    #[arg(long)]
    pub program: Option<PathBuf>,
    /// Operations to time.
    #[arg(long, default_value_t = 0)]
    pub n: u64,
    /// Operations before timing starts.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Run until SIGUSR1 arrives (at most this many seconds) instead of `n` operations.
    #[arg(long)]
    pub until_signal: Option<f64>,
    /// cgroup to join first (its directory).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// CPU to pin to.
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// What the workload prints at the end.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LoadResult {
    pub ops: u64,
    pub ns: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl LoadResult {
    pub fn ns_per_op(&self) -> f64 {
        self.ns as f64 / self.ops.max(1) as f64
    }
}

/// What `--kind check` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub allowed: bool,
    pub detail: String,
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

const SA_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn socket(ty: libc::c_int) -> io::Result<RawFd> {
    // SAFETY: plain syscall.
    check(unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0) })
}

fn close(fd: RawFd) {
    // SAFETY: we own fd.
    unsafe { libc::close(fd) };
}

/// A TCP socket that resets on close (SO_LINGER 0): no TIME_WAIT piles up on the client.
fn tcp_socket() -> io::Result<RawFd> {
    let fd = socket(libc::SOCK_STREAM)?;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, option and length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if let Err(e) = check(rc) {
        close(fd);
        return Err(e);
    }
    Ok(fd)
}

fn connect(fd: RawFd, sa: &libc::sockaddr_in) -> io::Result<()> {
    // SAFETY: valid fd and address.
    check(unsafe { libc::connect(fd, sa as *const _ as *const libc::sockaddr, SA_LEN) })?;
    Ok(())
}

fn tcp_once(sa: &libc::sockaddr_in) -> io::Result<()> {
    let fd = tcp_socket()?;
    let r = connect(fd, sa);
    close(fd);
    r
}

/// One connection through the proxy; returns the status line of its reply.
fn proxy_once(proxy: &libc::sockaddr_in, request: &[u8]) -> io::Result<String> {
    let fd = tcp_socket()?;
    let r = (|| {
        connect(fd, proxy)?;
        let mut off = 0;
        while off < request.len() {
            // SAFETY: valid fd and buffer.
            let n = check(unsafe {
                libc::send(
                    fd,
                    request[off..].as_ptr() as *const libc::c_void,
                    request.len() - off,
                    libc::MSG_NOSIGNAL,
                ) as libc::c_int
            })?;
            off += n as usize;
        }
        let mut buf = [0u8; 1024];
        let mut len = 0;
        loop {
            // SAFETY: valid fd and buffer.
            let n = check(unsafe {
                libc::recv(
                    fd,
                    buf[len..].as_mut_ptr() as *mut libc::c_void,
                    buf.len() - len,
                    0,
                ) as libc::c_int
            })?;
            len += n as usize;
            let head = &buf[..len];
            if n == 0 || head.windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                let text = String::from_utf8_lossy(head);
                return Ok(text.lines().next().unwrap_or("").to_string());
            }
        }
    })();
    close(fd);
    r
}

/// One fork + execve + waitpid; the child must exit 0.
fn exec_once(program: &CStr, argv: &[*const libc::c_char; 2]) -> Result<()> {
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: the __load process is single-threaded, and the child only calls execve and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(explain("fork", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: NUL-terminated path and NULL-terminated argv/envp that outlive the call.
        unsafe {
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(explain("waitpid", e));
        }
    }
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{program:?} did not exit 0 (wait status {status:#x}; 127: execve failed)"
    );
    Ok(())
}

fn is_200(status_line: &str) -> bool {
    let mut parts = status_line.split_whitespace();
    parts.next().is_some_and(|v| v.starts_with("HTTP/")) && parts.next() == Some("200")
}

fn explain(what: &str, e: io::Error) -> anyhow::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => {
            " (EPERM: denied by a policy; the bench's policy must allow its server)"
        }
        Some(libc::ECONNREFUSED) => " (nothing listens there, or a firewall rejected it)",
        _ => "",
    };
    anyhow::anyhow!("{what}: {e}{hint}")
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs `op` for the warm-up and then `n` times (or until SIGUSR1), timing the latter.
fn timed(args: &LoadArgs, mut op: impl FnMut() -> Result<()>) -> Result<LoadResult> {
    if args.until_signal.is_some() {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t) };
    }
    for _ in 0..args.warmup {
        op()?;
    }
    let mut out = io::stdout().lock();
    writeln!(out, "{{\"started\":true}}")?;
    out.flush()?;
    let start = sys::mono_ns();
    let mut ops = 0u64;
    match args.until_signal {
        None => {
            for _ in 0..args.n {
                op()?;
            }
            ops = args.n;
        }
        Some(s) => {
            let limit = (s * 1e9) as u64;
            while !STOP.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    op()?;
                }
                ops += 64;
                if sys::mono_ns() - start > limit {
                    bail!("no SIGUSR1 within {s} s");
                }
            }
        }
    }
    let end = sys::mono_ns();
    Ok(LoadResult {
        ops,
        ns: end - start,
        start_ns: start,
        end_ns: end,
    })
}

/// Seconds `flip` and `hold` run at most without SIGUSR1.
fn signal_limit(args: &LoadArgs) -> (u64, f64) {
    let s = args.until_signal.unwrap_or(60.0);
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t) };
    ((s * 1e9) as u64, s)
}

fn flip(args: &LoadArgs, target: &libc::sockaddr_in) -> Result<()> {
    let (limit, s) = signal_limit(args);
    let mut out = io::stdout().lock();
    writeln!(out, "{{\"started\":true}}")?;
    out.flush()?;
    let start = sys::mono_ns();
    let mut last = None;
    while !STOP.load(Ordering::Relaxed) {
        let ok = match tcp_once(target) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => false,
            // A revoke destroyed this socket mid-connect: not a decision of the hook.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => return Err(explain(&format!("TCP connect to {}", args.target), e)),
        };
        let ns = sys::mono_ns();
        if last != Some(ok) {
            writeln!(out, "{}", serde_json::to_string(&Flip { ok, ns })?)?;
            out.flush()?;
            last = Some(ok);
        }
        if ns - start > limit {
            bail!("no SIGUSR1 within {s} s");
        }
    }
    Ok(())
}

fn hold(args: &LoadArgs, target: &libc::sockaddr_in) -> Result<()> {
    let (limit, s) = signal_limit(args);
    let fd = tcp_socket().context("TCP socket")?;
    connect(fd, target).map_err(|e| explain(&format!("TCP connect to {}", args.target), e))?;
    println!("{{\"started\":true}}");
    io::stdout().flush()?;
    let start = sys::mono_ns();
    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(1));
        if sys::mono_ns() - start > limit {
            close(fd);
            bail!("no SIGUSR1 within {s} s");
        }
    }
    close(fd);
    Ok(())
}

/// `__load`: the child's main.
pub fn main(args: LoadArgs) -> Result<()> {
    if let Some(cg) = &args.cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    if let Some(cpu) = args.cpu {
        sys::pin_current_thread(cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    let target = sockaddr(args.target);
    let payload = [0x5au8; 32];
    let result = match args.kind {
        Kind::Tcp => timed(&args, || {
            tcp_once(&target).map_err(|e| explain(&format!("TCP connect to {}", args.target), e))
        })?,
        Kind::Udp => {
            let fd = socket(libc::SOCK_DGRAM).context("UDP socket")?;
            timed(&args, || {
                // SAFETY: valid fd, buffer and address.
                let n = unsafe {
                    libc::sendto(
                        fd,
                        payload.as_ptr() as *const libc::c_void,
                        payload.len(),
                        0,
                        &target as *const _ as *const libc::sockaddr,
                        SA_LEN,
                    )
                };
                if n != payload.len() as isize {
                    return Err(explain(
                        &format!("UDP sendto {}", args.target),
                        io::Error::last_os_error(),
                    ));
                }
                Ok(())
            })?
        }
        Kind::Udpc => {
            let fd = socket(libc::SOCK_DGRAM).context("UDP socket")?;
            connect(fd, &target)
                .map_err(|e| explain(&format!("UDP connect to {}", args.target), e))?;
            timed(&args, || {
                // SAFETY: valid fd and buffer.
                let n = unsafe {
                    libc::send(
                        fd,
                        payload.as_ptr() as *const libc::c_void,
                        payload.len(),
                        0,
                    )
                };
                if n != payload.len() as isize {
                    return Err(explain(
                        &format!("UDP send to {}", args.target),
                        io::Error::last_os_error(),
                    ));
                }
                Ok(())
            })?
        }
        Kind::Syscall => timed(&args, || {
            // SAFETY: no arguments; the raw syscall, since libc may cache getppid.
            unsafe { libc::syscall(libc::SYS_getppid) };
            Ok(())
        })?,
        Kind::Exec => {
            let program = args
                .program
                .as_ref()
                .context("--kind exec needs --program")?;
            let program = CString::new(program.as_os_str().as_bytes())
                .context("a program path with a NUL byte")?;
            let argv = [program.as_ptr(), std::ptr::null()];
            timed(&args, || exec_once(&program, &argv))?
        }
        Kind::Proxy => {
            let proxy_addr = args.proxy.context("--kind proxy needs --proxy")?;
            let proxy = sockaddr(proxy_addr);
            let t = args.target;
            let request = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").into_bytes();
            timed(&args, || {
                let status = proxy_once(&proxy, &request)
                    .map_err(|e| explain(&format!("CONNECT {t} via {proxy_addr}"), e))?;
                ensure!(
                    is_200(&status),
                    "CONNECT {t} via {proxy_addr}: the proxy answered {status:?}"
                );
                Ok(())
            })?
        }
        Kind::Flip => return flip(&args, &target),
        Kind::Hold => return hold(&args, &target),
        Kind::Check => {
            let res = match args.proxy {
                None => match tcp_once(&target) {
                    Ok(()) => CheckResult {
                        allowed: true,
                        detail: "connected".into(),
                    },
                    Err(e) => CheckResult {
                        allowed: false,
                        detail: e.to_string(),
                    },
                },
                Some(p) => {
                    let t = args.target;
                    let request = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").into_bytes();
                    match proxy_once(&sockaddr(p), &request) {
                        Ok(status) => CheckResult {
                            allowed: is_200(&status),
                            detail: status,
                        },
                        Err(e) => CheckResult {
                            allowed: false,
                            detail: e.to_string(),
                        },
                    }
                }
            };
            println!("{}", serde_json::to_string(&res)?);
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// How the bench starts a workload.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    pub target: SocketAddrV4,
    pub proxy: Option<SocketAddrV4>,
    /// The program kind exec runs.
    pub program: Option<PathBuf>,
    pub n: u64,
    pub warmup: u64,
    pub until_signal: Option<f64>,
    pub cgroup: PathBuf,
    pub cpu: usize,
}

impl Spec {
    fn command(&self, exe: &std::path::Path) -> Command {
        let mut cmd = Command::new(exe);
        cmd.arg("__load")
            .arg("--kind")
            .arg(format!("{:?}", self.kind).to_lowercase())
            .arg("--target")
            .arg(self.target.to_string())
            .arg("--n")
            .arg(self.n.to_string())
            .arg("--warmup")
            .arg(self.warmup.to_string())
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--cpu")
            .arg(self.cpu.to_string());
        if let Some(p) = self.proxy {
            cmd.arg("--proxy").arg(p.to_string());
        }
        if let Some(p) = &self.program {
            cmd.arg("--program").arg(p);
        }
        if let Some(s) = self.until_signal {
            cmd.arg("--until-signal").arg(s.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the workload; the caller waits with [`finish`].
    pub fn spawn(&self, exe: &std::path::Path) -> Result<Child> {
        if cleanup::aborting() {
            bail!("interrupted");
        }
        let child = self
            .command(exe)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        cleanup::add_child(child.id());
        Ok(child)
    }

    /// Runs the workload to the end and returns its last output line.
    pub fn run_line(&self, exe: &std::path::Path) -> Result<String> {
        finish(self.spawn(exe)?, &format!("{:?} workload", self.kind))
    }

    pub fn run(&self, exe: &std::path::Path) -> Result<LoadResult> {
        let line = self.run_line(exe)?;
        serde_json::from_str(&line).with_context(|| format!("workload output {line:?}"))
    }

    pub fn check(&self, exe: &std::path::Path) -> Result<CheckResult> {
        let line = self.run_line(exe)?;
        serde_json::from_str(&line).with_context(|| format!("check output {line:?}"))
    }
}

/// Waits for a workload and returns its last stdout line; fails with its stderr.
pub fn finish(child: Child, what: &str) -> Result<String> {
    let pid = child.id();
    let out = child.wait_with_output();
    cleanup::forget_child(pid);
    let out = out.with_context(|| format!("waiting for the {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    stdout
        .lines()
        .last()
        .map(str::to_string)
        .with_context(|| format!("the {what} printed nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_status_lines() {
        assert!(is_200("HTTP/1.0 200 Connection established"));
        assert!(!is_200("HTTP/1.1 403 Filtered"));
        assert!(!is_200(""));
    }
}
