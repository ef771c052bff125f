//! A process for tests to run as (or outside) an agent: performs network steps in order and prints
//! one JSON line per step with its errno. Steps:
//!   join:PATH            move this process into the cgroup at PATH
//!   tcp:ADDR             new TCP socket, connect
//!   tfo:ADDR             new TCP socket, sendto(MSG_FASTOPEN)
//!   udp:ADDR             new UDP socket, sendto (unconnected)
//!   udpc:ADDR            new UDP socket, connect, send
//!   mmsg:ADDR,ADDR,...   new UDP socket, one sendmmsg with one message per address
//!   hold-tcp:ADDR        create a TCP socket now (keep it and the address for later)
//!   connect-held         connect the held socket
//!   thread:STEP          run STEP on a new thread
//!   fork:STEP            run STEP in a forked child; report the child's result
//!   sleep:MS             wait (keeps the process alive while its events are enriched)
//! ADDR is a socket address: 127.0.0.1:80, [::1]:80, [::ffff:127.0.0.1]:80.

use std::{io, net::SocketAddr, os::fd::AsRawFd, time::Duration};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(serde::Serialize)]
struct Outcome {
    step: String,
    ok: bool,
    errno: i32,
    /// Messages sent (mmsg) or bytes sent.
    value: i64,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn addr(s: &str) -> io::Result<SocketAddr> {
    s.parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{s}: {e}")))
}

fn socket(a: &SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(*a), ty, Some(proto))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

struct Held(Option<(Socket, SocketAddr)>);

fn step(held: &mut Held, spec: &str) -> io::Result<i64> {
    let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
    match kind {
        "join" => {
            std::fs::write(
                format!("{arg}/cgroup.procs"),
                std::process::id().to_string(),
            )?;
            Ok(0)
        }
        "tcp" => {
            let a = addr(arg)?;
            let s = socket(&a, Type::STREAM, Protocol::TCP)?;
            s.set_linger(Some(Duration::ZERO))?;
            s.connect_timeout(&a.into(), Duration::from_secs(2))?;
            Ok(0)
        }
        "tfo" => {
            let a = addr(arg)?;
            let s = socket(&a, Type::STREAM, Protocol::TCP)?;
            s.set_linger(Some(Duration::ZERO))?;
            let n = s.send_to_with_flags(b"tfo", &a.into(), libc::MSG_FASTOPEN)?;
            Ok(n as i64)
        }
        "udp" => {
            let a = addr(arg)?;
            let s = socket(&a, Type::DGRAM, Protocol::UDP)?;
            Ok(s.send_to(b"udp", &a.into())? as i64)
        }
        "udpc" => {
            let a = addr(arg)?;
            let s = socket(&a, Type::DGRAM, Protocol::UDP)?;
            s.connect(&a.into())?;
            Ok(s.send(b"udpc")? as i64)
        }
        "mmsg" => mmsg(arg),
        "hold-tcp" => {
            let a = addr(arg)?;
            held.0 = Some((socket(&a, Type::STREAM, Protocol::TCP)?, a));
            Ok(0)
        }
        "connect-held" => {
            let (s, a) = held
                .0
                .take()
                .ok_or_else(|| io::Error::other("no held socket"))?;
            s.set_linger(Some(Duration::ZERO))?;
            s.connect_timeout(&a.into(), Duration::from_secs(2))?;
            Ok(0)
        }
        "thread" => {
            let inner = arg.to_string();
            std::thread::spawn(move || step(&mut Held(None), &inner))
                .join()
                .map_err(|_| io::Error::other("thread panicked"))?
        }
        "fork" => fork(arg),
        "sleep" => {
            let ms: u64 = arg
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "sleep:MS"))?;
            std::thread::sleep(Duration::from_millis(ms));
            Ok(0)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown step {spec:?}"),
        )),
    }
}

/// One sendmmsg call with one message per destination, on one unconnected UDP socket.
fn mmsg(arg: &str) -> io::Result<i64> {
    let dests: Vec<SockAddr> = arg
        .split(',')
        .map(|s| addr(s).map(SockAddr::from))
        .collect::<io::Result<_>>()?;
    let first = addr(arg.split(',').next().unwrap_or_default())?;
    let s = socket(&first, Type::DGRAM, Protocol::UDP)?;
    let mut payload = *b"mmsg";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = dests
        .iter()
        .map(|d| {
            // SAFETY: zeroed mmsghdr is valid; pointers stay alive for the call.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = d.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = d.len();
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs points to msgs.len() initialised headers.
    let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as i64)
}

/// Runs a step in a forked child; the child's errno comes back as its exit status.
fn fork(arg: &str) -> io::Result<i64> {
    // SAFETY: the probe is single-threaded here; the child only runs the step and exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            let code = match step(&mut Held(None), arg) {
                Ok(_) => 0,
                Err(e) => errno(&e).clamp(1, 255),
            };
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            match libc::WEXITSTATUS(status) {
                0 => Ok(0),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
    }
}

fn main() {
    let mut held = Held(None);
    for spec in std::env::args().skip(1) {
        let out = match step(&mut held, &spec) {
            Ok(value) => Outcome {
                step: spec,
                ok: true,
                errno: 0,
                value,
            },
            Err(e) => Outcome {
                step: spec,
                ok: false,
                errno: errno(&e),
                value: -1,
            },
        };
        println!("{}", serde_json::to_string(&out).expect("serialize"));
    }
}
