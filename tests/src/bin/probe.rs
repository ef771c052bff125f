//! A process for tests to run as (or outside) an agent: performs network steps in order and prints
//! one JSON line per step with its errno. Steps:
//!   join:PATH            move this process into the cgroup at PATH
//!   tcp:ADDR             new TCP socket, connect
//!   tfo:ADDR             new TCP socket, sendto(MSG_FASTOPEN)
//!   udp:ADDR             new UDP socket, sendto (unconnected)
//!   udpc:ADDR            new UDP socket, connect, send
//!   udpn:ADDR,N          new UDP socket, N unconnected sends (value: how many succeeded)
//!   mmsg:ADDR,ADDR,...   new UDP socket, one sendmmsg with one message per address
//!   hold-tcp:ADDR        create a TCP socket now (keep it and the address for later)
//!   connect-held         connect the held socket
//!   thread:STEP          run STEP on a new thread
//!   fork:STEP            run STEP in a forked child; report the child's result
//!   sock:FAMILY,TYPE,PROTO   socket(2) only, numbers as in the C API
//!   raw:ADDR             SOCK_RAW (IPPROTO_UDP) socket, sendto
//!   ping:ADDR            ICMP datagram ("ping") socket, sendto an echo request
//!   udplite:ADDR         UDP-Lite socket, sendto
//!   packet               AF_PACKET socket
//!   packet-udp:ADDR      AF_PACKET socket on lo, sends one IPv4 UDP datagram to ADDR as a
//!                        frame it built itself (no connect or send hook sees it)
//!   packet32             AF_PACKET socket through the 32-bit syscall entry (int 0x80, socket)
//!   packet32-socketcall  the same through socketcall(SYS_SOCKET)
//!   unix:NAME[,N]        Unix stream socket, connect to NAME: a path, or @name for an
//!                        abstract socket; N cuts the address to N bytes of sun_path
//!   unixdg:NAME          Unix datagram socket, sendto NAME (unconnected)
//!   http:PATH,METHOD,ROUTE[,BODY]   one HTTP/1.1 request over the Unix socket at PATH (BODY is
//!                        the rest, commas included); value: the status, detail: the reply body
//!   uring-connect:ADDR   TCP connect through io_uring
//!   uring-sendmsg:ADDR   unconnected UDP sendmsg through io_uring
//!   uring-packet[:async] AF_PACKET socket made by io_uring (IORING_OP_SOCKET); `async` makes
//!                        an io_uring worker thread do it (IOSQE_ASYNC)
//!   scm:CGROUP,ADDR      a child joins CGROUP and connects a TCP socket this process
//!                        created outside and passed over SCM_RIGHTS; reports the child's errno
//!   setuid:UID           drop to this uid (and gid)
//!   loop:ALLOWED,DENIED,MS   alternate TCP connects to both for MS milliseconds; value is the
//!                        number of attempts, ok only if every allowed one connected and every
//!                        denied one got EPERM (detail says what went wrong)
//!   write:PATH,TEXT      write TEXT to the existing file PATH (e.g. `write:<cg>/cgroup.procs,0`)
//!   unlink:PATH          remove the file PATH
//!   kill:PID,SIG         send signal SIG to process PID
//!   run:PROG,ARG,...     run PROG with the arguments; ok only if it exits 0 (detail: its output)
//!   capmask:FIELD        value: the mask of /proc/self/status FIELD (CapEff, CapPrm, CapInh,
//!                        CapBnd, CapAmb), or the first number of another field (Uid, Gid,
//!                        NoNewPrivs); `capmask:Groups` is the number of supplementary groups
//!   bpf-next-prog        BPF_PROG_GET_NEXT_ID (what a process needs to find and detach programs)
//!   exec:PROGRAM[,ARG...]    replace this process with PROGRAM (execv; steps after it are
//!                        not run, and the ones before have been printed)
//!   dns:SERVER,NAME,TYPE     a DNS query as glibc sends it: UDP socket, connect, send,
//!                        recvfrom; value: the reply's rcode, detail: JSON {"rcode", "answers"
//!                        (addresses), "ttls", "from" (recvfrom's address), "peer" (getpeername)}
//!   dnsu:SERVER,NAME,TYPE    the same as musl sends it: unconnected sendto, recvfrom ("peer"
//!                        is null)
//!   dnst:SERVER,NAME,TYPE    the same over TCP (2-byte length framing); "from" is the peer
//!   dnsraw:SERVER,HEX    the bytes HEX in one datagram on a connected UDP socket; value: the
//!                        bytes received back (0 when nothing came), detail: {"reply": hex}
//!   dnsbig:SERVER,N      one N-byte datagram: a query for big.test A padded with zeros; as dnsraw
//!   dnstraw:SERVER,HEX   the bytes HEX on a TCP connection (framing is the caller's), then
//!                        shutdown(SHUT_WR); value: the bytes read back until EOF (0 on none)
//!   dnstbig:SERVER,N     one TCP frame of N bytes (N <= 65535) as dnsbig's; as dnstraw
//! ADDR is a socket address: 127.0.0.1:80, [::1]:80, [::ffff:127.0.0.1]:80. SERVER is one
//! too; TYPE is A or AAAA. The DNS steps wait 2 s for a reply.

use std::{io, net::SocketAddr, os::fd::AsRawFd, time::Duration};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(serde::Serialize)]
struct Outcome {
    step: String,
    ok: bool,
    errno: i32,
    /// Messages sent (mmsg) or bytes sent.
    value: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    detail: String,
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
        "udpn" => {
            let (a, n) = arg
                .rsplit_once(',')
                .ok_or_else(|| io::Error::other("udpn:ADDR,N"))?;
            let a = addr(a)?;
            let n: u32 = n.parse().map_err(|_| io::Error::other("udpn:ADDR,N"))?;
            let s = socket(&a, Type::DGRAM, Protocol::UDP)?;
            let dest = SockAddr::from(a);
            Ok((0..n).filter(|_| s.send_to(b"n", &dest).is_ok()).count() as i64)
        }
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
        "sock" => {
            let n: Vec<i32> = arg
                .split(',')
                .map(|x| x.parse().map_err(|_| io::Error::other("sock:F,T,P")))
                .collect::<io::Result<_>>()?;
            let [f, t, p] = n[..] else {
                return Err(io::Error::other("sock:F,T,P"));
            };
            Socket::new(Domain::from(f), Type::from(t), Some(Protocol::from(p)))?;
            Ok(0)
        }
        "raw" => {
            let a = addr(arg)?;
            let s = socket(&a, Type::RAW, Protocol::UDP)?;
            Ok(s.send_to(&[0u8; 8], &a.into())? as i64)
        }
        "ping" => {
            let a = addr(arg)?;
            let p = if a.is_ipv4() {
                Protocol::ICMPV4
            } else {
                Protocol::ICMPV6
            };
            let s = socket(&a, Type::DGRAM, p)?;
            // Echo request: type 8 (v4) / 128 (v6), code 0; the kernel fills id and checksum.
            let t = if a.is_ipv4() { 8 } else { 128 };
            Ok(s.send_to(&[t, 0, 0, 0, 0, 0, 0, 1], &a.into())? as i64)
        }
        "udplite" => {
            let a = addr(arg)?;
            let s = socket(&a, Type::DGRAM, Protocol::from(libc::IPPROTO_UDPLITE))?;
            Ok(s.send_to(b"lite", &a.into())? as i64)
        }
        "packet" => {
            Socket::new(
                Domain::PACKET,
                Type::RAW,
                Some(Protocol::from((libc::ETH_P_ALL as u16).to_be() as i32)),
            )?;
            Ok(0)
        }
        "packet-udp" => packet_udp(arg),
        "packet32" => packet32(false),
        "packet32-socketcall" => packet32(true),
        "unix" => {
            let (name, cut) = match arg.split_once(',') {
                Some((n, c)) => (
                    n,
                    Some(c.parse().map_err(|_| io::Error::other("unix:NAME,N"))?),
                ),
                None => (arg, None),
            };
            let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            s.connect(&unix_addr(name, cut)?)?;
            Ok(0)
        }
        "http" => http(arg),
        "unixdg" => {
            let s = Socket::new(Domain::UNIX, Type::DGRAM, None)?;
            Ok(s.send_to(b"unix", &unix_addr(arg, None)?)? as i64)
        }
        "loop" => connect_loop(arg),
        "uring-connect" => uring(arg, true),
        "uring-sendmsg" => uring(arg, false),
        "uring-packet" => uring_packet(arg == "async"),
        "scm" => scm(arg),
        "setuid" => {
            let id: u32 = arg.parse().map_err(|_| io::Error::other("setuid:UID"))?;
            // SAFETY: plain syscalls; gid first, while still privileged.
            if unsafe { libc::setgid(id) } != 0 || unsafe { libc::setuid(id) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(0)
        }
        "exec" => exec(arg),
        "dns" => dns::query(arg, dns::Via::Connected),
        "dnsu" => dns::query(arg, dns::Via::Unconnected),
        "dnst" => dns::query(arg, dns::Via::Tcp),
        "dnsraw" => dns::raw_arg(arg, false),
        "dnstraw" => dns::raw_arg(arg, true),
        "dnsbig" => dns::big(arg, false),
        "dnstbig" => dns::big(arg, true),
        "write" => {
            let (path, text) = arg
                .split_once(',')
                .ok_or_else(|| io::Error::other("write:PATH,TEXT"))?;
            use std::io::Write;
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .write_all(text.as_bytes())?;
            Ok(0)
        }
        "unlink" => {
            std::fs::remove_file(arg)?;
            Ok(0)
        }
        "kill" => {
            let (pid, sig) = arg
                .split_once(',')
                .and_then(|(p, s)| Some((p.parse().ok()?, s.parse().ok()?)))
                .ok_or_else(|| io::Error::other("kill:PID,SIG"))?;
            // SAFETY: plain syscall; the test names the pid.
            if unsafe { libc::kill(pid, sig) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(0)
        }
        "run" => {
            let mut parts = arg.split(',');
            let prog = parts
                .next()
                .ok_or_else(|| io::Error::other("run:PROG,..."))?;
            let out = std::process::Command::new(prog).args(parts).output()?;
            if out.status.success() {
                return Ok(0);
            }
            Err(io::Error::other(format!(
                "{prog} {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
        "capmask" => {
            let status = std::fs::read_to_string("/proc/self/status")?;
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(arg)?.strip_prefix(':'))
                .map(str::trim)
                .ok_or_else(|| io::Error::other(format!("no {arg} in /proc/self/status")))?;
            let bad = |_| io::Error::other(format!("{arg}: {value:?}"));
            if arg.starts_with("Cap") {
                return i64::from_str_radix(value, 16).map_err(bad);
            }
            if arg == "Groups" {
                return Ok(value.split_whitespace().count() as i64);
            }
            value
                .split_whitespace()
                .next()
                .unwrap_or("")
                .parse()
                .map_err(bad)
        }
        "bpf-next-prog" => {
            // union bpf_attr for BPF_PROG_GET_NEXT_ID: start_id, next_id, open_flags.
            let mut attr = [0u32; 4];
            // SAFETY: BPF_PROG_GET_NEXT_ID (11) with a zeroed attr of the size we pass.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    11,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(attr[1] as i64)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown step {spec:?}"),
        )),
    }
}

/// A Unix socket address: a path, or `@name` for an abstract socket; `cut` sets how many bytes
/// of sun_path the address length covers (to hand the kernel a name cut short).
/// An Ethernet frame with an IPv4 UDP datagram to `arg`, sent on lo through a packet socket.
fn packet_udp(arg: &str) -> io::Result<i64> {
    let SocketAddr::V4(a) = addr(arg)? else {
        return Err(io::Error::other("packet-udp takes an IPv4 address"));
    };
    let payload = b"frame";
    let mut f = vec![0u8; 12]; // destination and source MAC: lo takes any
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = libc::IPPROTO_UDP as u8;
    ip[12..16].copy_from_slice(&[127, 0, 0, 1]);
    ip[16..20].copy_from_slice(&a.ip().octets());
    let sum = ip
        .chunks(2)
        .fold(0u32, |s, w| s + u16::from_be_bytes([w[0], w[1]]) as u32);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&a.port().to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed on IPv4)
    f.extend_from_slice(payload);
    let s = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from((libc::ETH_P_IP as u16).to_be() as i32)),
    )?;
    // SAFETY: a zeroed sockaddr_ll with family, protocol and interface set.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    ll.sll_ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) } as i32;
    // SAFETY: valid socket, buffer and address of the given lengths.
    let n = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            f.as_ptr().cast(),
            f.len(),
            0,
            (&ll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as i64)
}

/// socket(AF_PACKET, SOCK_RAW, ETH_P_ALL) through the 32-bit entry, int 0x80: the ia32 socket
/// syscall (359), or socketcall (102) with SYS_SOCKET and its arguments in memory below 4 GiB.
#[cfg(target_arch = "x86_64")]
fn packet32(socketcall: bool) -> io::Result<i64> {
    let proto = (libc::ETH_P_ALL as u16).to_be() as u32;
    let (nr, b, c, d) = if socketcall {
        // SAFETY: anonymous mapping; MAP_32BIT puts it where a 32-bit pointer reaches.
        let block = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            )
        };
        if block == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let args = [libc::AF_PACKET as u32, libc::SOCK_RAW as u32, proto];
        // SAFETY: the mapping holds 4096 writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(args.as_ptr(), block.cast(), 3) };
        (102u64, 1u64, block as u64, 0u64)
    } else {
        (
            359,
            libc::AF_PACKET as u64,
            libc::SOCK_RAW as u64,
            proto as u64,
        )
    };
    let ret: i64;
    // SAFETY: a 32-bit syscall with valid arguments; rbx is LLVM's, so it is swapped in and
    // out; the compat entry may clobber r8-r11.
    unsafe {
        std::arch::asm!(
            "xchg {b}, rbx",
            "int 0x80",
            "xchg {b}, rbx",
            b = inout(reg) b => _,
            inlateout("rax") nr => ret,
            in("rcx") c,
            in("rdx") d,
            out("r8") _,
            out("r9") _,
            out("r10") _,
            out("r11") _,
        );
    }
    let ret = ret as i32;
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    Ok(ret as i64)
}

#[cfg(not(target_arch = "x86_64"))]
fn packet32(_socketcall: bool) -> io::Result<i64> {
    Err(io::Error::other("the 32-bit syscall entry is x86-64's"))
}

fn unix_addr(name: &str, cut: Option<usize>) -> io::Result<SockAddr> {
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, len) = match name.strip_prefix('@') {
        Some(n) => ([&[0u8][..], n.as_bytes()].concat(), 1 + n.len()),
        None => (name.as_bytes().to_vec(), name.len() + 1),
    };
    if bytes.len() > sun.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    for (d, b) in sun.sun_path.iter_mut().zip(&bytes) {
        *d = *b as libc::c_char;
    }
    let path_len = cut.unwrap_or(len).min(sun.sun_path.len());
    let total = (std::mem::size_of::<libc::sa_family_t>() + path_len) as libc::socklen_t;
    // SAFETY: the storage holds a sockaddr_un; `total` is within it.
    let (_, addr) = unsafe {
        SockAddr::try_init(|storage, len| {
            std::ptr::copy_nonoverlapping(
                &sun as *const libc::sockaddr_un as *const u8,
                storage as *mut u8,
                std::mem::size_of::<libc::sockaddr_un>(),
            );
            *len = total;
            Ok(())
        })
    }?;
    Ok(addr)
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

/// Alternating allowed and denied connects for a while; any wrong outcome is an error whose
/// message lists the counts.
fn connect_loop(arg: &str) -> io::Result<i64> {
    let parts: Vec<&str> = arg.split(',').collect();
    let [allowed, denied, ms] = parts[..] else {
        return Err(io::Error::other("loop:ALLOWED,DENIED,MS"));
    };
    let (allowed, denied) = (addr(allowed)?, addr(denied)?);
    let ms: u64 = ms.parse().map_err(|_| io::Error::other("loop: MS"))?;
    let end = std::time::Instant::now() + Duration::from_millis(ms);
    let try_connect = |a: &SocketAddr| -> io::Result<()> {
        let s = socket(a, Type::STREAM, Protocol::TCP)?;
        s.set_linger(Some(Duration::ZERO))?;
        s.connect_timeout(&(*a).into(), Duration::from_secs(2))
    };
    let (mut attempts, mut allowed_failed, mut denied_passed) = (0i64, 0, 0);
    while std::time::Instant::now() < end {
        if try_connect(&allowed).is_err() {
            allowed_failed += 1;
        }
        match try_connect(&denied) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            _ => denied_passed += 1,
        }
        attempts += 2;
        std::thread::sleep(Duration::from_millis(2));
    }
    if allowed_failed + denied_passed > 0 {
        return Err(io::Error::other(format!(
            "{attempts} attempts: {allowed_failed} allowed connects failed, \
             {denied_passed} denied connects got through"
        )));
    }
    Ok(attempts)
}

/// A TCP connect or an unconnected UDP sendmsg submitted through io_uring.
fn uring(arg: &str, connect: bool) -> io::Result<i64> {
    use io_uring::{opcode, types};
    let a = addr(arg)?;
    let s = if connect {
        socket(&a, Type::STREAM, Protocol::TCP)?
    } else {
        socket(&a, Type::DGRAM, Protocol::UDP)?
    };
    let dest = SockAddr::from(a);
    let mut payload = *b"uring";
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer outlives the submission.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dest.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = dest.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let fd = types::Fd(s.as_raw_fd());
    let entry = if connect {
        opcode::Connect::new(fd, dest.as_ptr() as *const libc::sockaddr, dest.len()).build()
    } else {
        opcode::SendMsg::new(fd, &msg).build()
    };
    // SAFETY: the entry's buffers live until `submit_one` has reaped its completion.
    unsafe { submit_one(&entry) }
}

/// Submits one io_uring entry on a new ring and waits for its result.
///
/// # Safety
/// Whatever the entry points to must stay valid until this returns.
unsafe fn submit_one(entry: &io_uring::squeue::Entry) -> io::Result<i64> {
    let mut ring = io_uring::IoUring::new(4)?;
    // SAFETY: the caller keeps the entry's buffers alive until the completion below.
    unsafe { ring.submission().push(entry) }.map_err(|_| io::Error::other("sq full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(cqe.result() as i64)
}

fn uring_packet(worker: bool) -> io::Result<i64> {
    use io_uring::{opcode, squeue::Flags};
    let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
    let mut entry = opcode::Socket::new(libc::AF_PACKET, libc::SOCK_RAW, proto).build();
    if worker {
        entry = entry.flags(Flags::ASYNC);
    }
    // SAFETY: the entry holds no pointers.
    unsafe { submit_one(&entry) }
}

/// SCM_RIGHTS: this process (outside any agent) creates a TCP socket and passes it to a forked
/// child that has joined CGROUP; the child connects it. The child's errno is the result.
fn scm(arg: &str) -> io::Result<i64> {
    use std::os::unix::net::UnixDatagram;
    let (cg, target) = arg
        .split_once(',')
        .ok_or_else(|| io::Error::other("scm:CGROUP,ADDR"))?;
    let a = addr(target)?;
    let (parent_end, child_end) = UnixDatagram::pair()?;
    // SAFETY: single-threaded here; the child only joins, receives, connects and exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(parent_end);
            let code = (|| -> io::Result<()> {
                std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())?;
                let fd = recv_fd(&child_end)?;
                // SAFETY: a fresh descriptor received over SCM_RIGHTS, owned from here on.
                let s = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                s.set_linger(Some(Duration::ZERO))?;
                s.connect_timeout(&a.into(), Duration::from_secs(2))
            })();
            let code = match code {
                Ok(()) => 0,
                Err(e) => errno(&e).clamp(1, 255),
            };
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        pid => {
            drop(child_end);
            let s = socket(&a, Type::STREAM, Protocol::TCP)?;
            send_fd(&parent_end, s.as_raw_fd())?;
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

/// A one-byte message with room for one SCM_RIGHTS descriptor; `f` gets the header.
fn with_fd_msg<R>(f: impl FnOnce(&mut libc::msghdr) -> io::Result<R>) -> io::Result<R> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE of one int; the buffer is u64-aligned and large enough.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut buf = vec![0u64; space.div_ceil(8)];
    // SAFETY: a zeroed msghdr is valid; its pointers outlive `f`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = buf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    f(&mut msg)
}

fn send_fd(sock: &std::os::unix::net::UnixDatagram, fd: i32) -> io::Result<()> {
    with_fd_msg(|msg| {
        // SAFETY: the control buffer holds one cmsghdr with one int.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd);
            if libc::sendmsg(sock.as_raw_fd(), msg, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    })
}

fn recv_fd(sock: &std::os::unix::net::UnixDatagram) -> io::Result<i32> {
    with_fd_msg(|msg| {
        // SAFETY: recvmsg fills buffers we own; the cmsg is checked before it is read.
        unsafe {
            if libc::recvmsg(sock.as_raw_fd(), msg, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            let c = libc::CMSG_FIRSTHDR(msg);
            if c.is_null() || (*c).cmsg_type != libc::SCM_RIGHTS {
                return Err(io::Error::other("no descriptor received"));
            }
            Ok(std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32))
        }
    })
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

/// What a step that succeeded has to say (the `http` step's reply body).
static DETAIL: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// `http:PATH,METHOD,ROUTE[,BODY]`: one request, `Connection: close`, the reply read to the end.
fn http(arg: &str) -> io::Result<i64> {
    use std::io::{Read, Write};
    let mut parts = arg.splitn(4, ',');
    let (Some(path), Some(method), Some(route)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(io::Error::other("http:PATH,METHOD,ROUTE[,BODY]"));
    };
    let body = parts.next().unwrap_or("");
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {route} HTTP/1.1\r\nHost: agentwall\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let status = reply
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP reply: {reply:?}")))?;
    *DETAIL.lock().expect("detail") = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok(status)
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
                detail: std::mem::take(&mut *DETAIL.lock().expect("detail")),
            },
            Err(e) => Outcome {
                step: spec,
                ok: false,
                errno: errno(&e),
                value: -1,
                detail: e.to_string(),
            },
        };
        println!("{}", serde_json::to_string(&out).expect("serialize"));
    }
}

/// Replaces this process with `PROGRAM[,ARG...]`; returns only when execv fails.
fn exec(arg: &str) -> io::Result<i64> {
    use std::io::Write;
    let args: Vec<std::ffi::CString> = arg
        .split(',')
        .map(|a| std::ffi::CString::new(a).map_err(|_| io::Error::other("exec: NUL in argument")))
        .collect::<io::Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    io::stdout().flush()?;
    // SAFETY: NUL-terminated strings and a null-terminated argv that outlive the call.
    unsafe { libc::execv(argv[0], argv.as_ptr()) };
    Err(io::Error::last_os_error())
}

/// The DNS steps: queries built and replies read with hickory-proto, sent the ways stub
/// resolvers send them.
mod dns {
    use std::{
        io::{self, Read, Write},
        net::{SocketAddr, TcpStream, UdpSocket},
        time::Duration,
    };

    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, RecordType},
    };
    use socket2::{Domain, Protocol, Socket, Type};

    use super::{addr, DETAIL};

    const WAIT: Duration = Duration::from_secs(2);

    pub enum Via {
        /// connect, send, recvfrom (glibc).
        Connected,
        /// sendto, recvfrom (musl).
        Unconnected,
        /// TCP, 2-byte length framing.
        Tcp,
    }

    fn invalid(what: impl std::fmt::Display) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
    }

    /// A recursive query for NAME/TYPE with a fresh id.
    fn build(name: &str, ty: &str) -> io::Result<(u16, Vec<u8>)> {
        let rtype = match ty {
            "A" => RecordType::A,
            "AAAA" => RecordType::AAAA,
            _ => return Err(invalid(format!("TYPE is A or AAAA, not {ty}"))),
        };
        let mut name = Name::from_ascii(name).map_err(invalid)?;
        name.set_fqdn(true);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let id = (nanos ^ std::process::id().rotate_left(16)) as u16;
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name, rtype));
        Ok((id, m.to_vec().map_err(invalid)?))
    }

    /// A socket as stub resolvers make it: no bind, the kernel picks the source at connect or
    /// send.
    fn socket(server: &SocketAddr, tcp: bool) -> io::Result<Socket> {
        let (ty, proto) = if tcp {
            (Type::STREAM, Protocol::TCP)
        } else {
            (Type::DGRAM, Protocol::UDP)
        };
        let s = Socket::new(Domain::for_address(*server), ty, Some(proto))?;
        s.set_read_timeout(Some(WAIT))?;
        s.set_write_timeout(Some(WAIT))?;
        Ok(s)
    }

    fn udp(server: &SocketAddr, connect: bool) -> io::Result<UdpSocket> {
        let s = socket(server, false)?;
        if connect {
            s.connect(&(*server).into())?;
        }
        Ok(s.into())
    }

    fn tcp(server: &SocketAddr) -> io::Result<TcpStream> {
        let s = socket(server, true)?;
        s.connect_timeout(&(*server).into(), WAIT)?;
        Ok(s.into())
    }

    /// `SERVER,NAME,TYPE`: value is the reply's rcode; the detail names the answers and where
    /// the reply seemed to come from.
    pub fn query(arg: &str, via: Via) -> io::Result<i64> {
        let mut parts = arg.splitn(3, ',');
        let (Some(server), Some(name), Some(ty)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("SERVER,NAME,TYPE"));
        };
        let server = addr(server)?;
        let (id, q) = build(name, ty)?;
        let mut buf = vec![0u8; 65535];
        let (reply, from, peer) = match via {
            Via::Connected | Via::Unconnected => {
                let connected = matches!(via, Via::Connected);
                let s = udp(&server, connected)?;
                if connected {
                    s.send(&q)?;
                } else {
                    s.send_to(&q, server)?;
                }
                let (n, from) = s.recv_from(&mut buf)?;
                let peer = connected.then(|| s.peer_addr()).transpose()?;
                (&buf[..n], from, peer)
            }
            Via::Tcp => {
                let mut s = tcp(&server)?;
                let mut framed = (q.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&q);
                s.write_all(&framed)?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len)?;
                let n = u16::from_be_bytes(len) as usize;
                s.read_exact(&mut buf[..n])?;
                let peer = s.peer_addr()?;
                (&buf[..n], peer, Some(peer))
            }
        };
        let m = Message::from_vec(reply).map_err(|e| io::Error::other(format!("reply: {e}")))?;
        if m.id() != id || m.message_type() != MessageType::Response {
            return Err(io::Error::other(format!(
                "not the reply to query {id}: id {}, {:?}",
                m.id(),
                m.message_type()
            )));
        }
        let mut answers = Vec::new();
        let mut ttls = Vec::new();
        for r in m.answers() {
            match r.data() {
                RData::A(a) => answers.push(a.0.to_string()),
                RData::AAAA(a) => answers.push(a.0.to_string()),
                _ => continue,
            }
            ttls.push(r.ttl());
        }
        *DETAIL.lock().expect("detail") = serde_json::json!({
            "rcode": rcode_name(u16::from(m.response_code())),
            "answers": answers,
            "ttls": ttls,
            "from": from.to_string(),
            "peer": peer.map(|p| p.to_string()),
        })
        .to_string();
        Ok(u16::from(m.response_code()) as i64)
    }

    /// The mnemonic of RFC 1035 and 2136 (what dig prints and records carry).
    fn rcode_name(code: u16) -> String {
        match code {
            0 => "NOERROR".into(),
            1 => "FORMERR".into(),
            2 => "SERVFAIL".into(),
            3 => "NXDOMAIN".into(),
            4 => "NOTIMP".into(),
            5 => "REFUSED".into(),
            n => n.to_string(),
        }
    }

    /// `SERVER,HEX`.
    pub fn raw_arg(arg: &str, over_tcp: bool) -> io::Result<i64> {
        let (server, hex) = arg.split_once(',').ok_or_else(|| invalid("SERVER,HEX"))?;
        let bytes = hex::decode(hex).map_err(invalid)?;
        raw(&addr(server)?, &bytes, over_tcp)
    }

    /// `SERVER,N`: N bytes (one datagram, or one TCP frame) holding a query for big.test A and
    /// zeros after it.
    pub fn big(arg: &str, over_tcp: bool) -> io::Result<i64> {
        let (server, n) = arg.split_once(',').ok_or_else(|| invalid("SERVER,N"))?;
        let n: usize = n.parse().map_err(invalid)?;
        if n > 65535 {
            return Err(invalid("N is at most 65535"));
        }
        let (_, mut msg) = build("big.test", "A")?;
        msg.resize(n.max(msg.len()), 0);
        msg.truncate(n);
        if over_tcp {
            let mut framed = (n as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&msg);
            msg = framed;
        }
        raw(&addr(server)?, &msg, over_tcp)
    }

    /// Sends `bytes` and reads what comes back within the wait: one datagram, or a TCP stream
    /// to its end (after shutting down writing). Nothing back is 0, not an error; a refused
    /// port or connection is an error (nothing was steered there).
    fn raw(server: &SocketAddr, bytes: &[u8], over_tcp: bool) -> io::Result<i64> {
        let timed_out = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        };
        let mut got = Vec::new();
        if over_tcp {
            let mut s = tcp(server)?;
            s.write_all(bytes)?;
            s.shutdown(std::net::Shutdown::Write)?;
            match s.read_to_end(&mut got) {
                Ok(_) => {}
                // A peer that closes on bad input may reset instead of ending cleanly.
                Err(e) if timed_out(&e) || e.kind() == io::ErrorKind::ConnectionReset => {}
                Err(e) => return Err(e),
            }
        } else {
            let s = udp(server, true)?;
            s.send(bytes)?;
            let mut buf = vec![0u8; 65535];
            match s.recv(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(e),
            }
        }
        *DETAIL.lock().expect("detail") =
            serde_json::json!({ "reply": hex::encode(&got) }).to_string();
        Ok(got.len() as i64)
    }
}
