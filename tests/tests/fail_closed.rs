//! A decision the kernel cannot make fails closed with exactly one record, reason `error`, in
//! either mode. The way in: connect() on an IPv6 TCP socket with an address of IPv6 length whose
//! family says AF_INET. The kernel runs the connect6 hook before it checks the family, and the
//! hook cannot judge an address that is not IPv6.

use std::{ffi::CString, mem::size_of, os::unix::ffi::OsStrExt, path::Path};

use agentwall_tests::{tcp_server, Harness, EPERM};
use anyhow::{bail, ensure, Context, Result};

fn policy(mode: &str, port: u16) -> String {
    format!(
        "name: t\nmode: {mode}\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress:\n  - name: \
         lo6\n    cidr: \"::1/128\"\n    ports: [{port}]\n    protocol: tcp\n"
    )
}

/// Forks a child that joins `cgroup` and connects an AF_INET6 socket to `[::1]:port` with
/// `sin6_family = AF_INET`; returns its pid and the errno of that connect (0: it succeeded).
fn connect6_with_v4_family(cgroup: &Path, port: u16) -> Result<(u32, i32)> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    addr.sin6_addr.s6_addr[15] = 1;
    // SAFETY: the child makes only raw syscalls (async-signal-safe) and leaves by _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(200);
            }
            let s = libc::socket(libc::AF_INET6, libc::SOCK_STREAM, 0);
            if s < 0 {
                libc::_exit(201);
            }
            let rc = libc::connect(
                s,
                (&addr as *const libc::sockaddr_in6).cast(),
                size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            );
            libc::_exit(if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            });
        }
    }
    ensure!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waits for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    ensure!(rc == pid, "waitpid: {}", std::io::Error::last_os_error());
    ensure!(
        libc::WIFEXITED(status),
        "child ended by signal: {status:#x}"
    );
    match libc::WEXITSTATUS(status) {
        200 => bail!("the child could not join {}", cgroup.display()),
        201 => bail!("the child could not create an AF_INET6 socket"),
        errno => Ok((pid as u32, errno)),
    }
}

async fn fails_closed_in(mode: &str) -> Result<()> {
    let (_t, server) = tcp_server("::1")?;
    let mut h = Harness::start(&policy(mode, server.port())).await?;
    let (pid, errno) = connect6_with_v4_family(&h.agent, server.port())
        .with_context(|| format!("in {mode} mode"))?;
    assert_eq!(
        errno, EPERM,
        "{mode}: the hook must deny what it cannot judge"
    );
    let d = h.decisions(1).await?;
    assert_eq!(d.len(), 1, "exactly one record: {d:#?}");
    let r = &d[0];
    assert_eq!(
        (
            r.hook.as_str(),
            r.reason.as_str(),
            r.decision.as_str(),
            r.mode.as_str(),
            r.action.as_str(),
            r.pid
        ),
        ("connect6", "error", "deny", "enforce", "blocked", pid),
        "{r:#?}"
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_the_hook_cannot_judge_is_denied_with_one_error_record() -> Result<()> {
    fails_closed_in("enforce").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_fails_closed_too() -> Result<()> {
    fails_closed_in("audit").await
}
