//! The loopback servers, threads of the bench pinned to the server CPU: a TCP server that
//! accepts and closes, a UDP sink, and a "canary" TCP listener that no policy allows (the
//! per-configuration check that enforcement is really on connects to it).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::sys;

pub struct Servers {
    pub tcp: SocketAddrV4,
    pub udp: SocketAddrV4,
    pub canary: SocketAddrV4,
    _canary: TcpListener,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("bound on 127.0.0.1"),
    }
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) {
    // SAFETY: valid fd, option and length; failure only leaves the default.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const _ as *const libc::c_void,
            size_of::<i32>() as libc::socklen_t,
        )
    };
}

impl Servers {
    pub fn start(cpu: usize) -> Result<Self> {
        let lo = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_l = TcpListener::bind(lo).context("binding the TCP server on 127.0.0.1")?;
        // A deep accept queue: a dropped SYN would cost the client a 1 s retransmission.
        // SAFETY: listen again on a listening socket only changes its backlog.
        unsafe { libc::listen(tcp_l.as_raw_fd(), 4096) };
        let tcp = v4(tcp_l.local_addr()?);
        let udp_s = UdpSocket::bind(lo).context("binding the UDP server on 127.0.0.1")?;
        setsockopt_int(
            udp_s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            8 << 20,
        );
        udp_s.set_read_timeout(Some(Duration::from_millis(50)))?;
        let udp = v4(udp_s.local_addr()?);
        let canary_l = TcpListener::bind(lo).context("binding the canary on 127.0.0.1")?;
        let canary = v4(canary_l.local_addr()?);

        let mut threads = Vec::new();
        let s = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name("tcp-server".into())
                .spawn(move || {
                    let _ = sys::pin_current_thread(cpu);
                    while !s.load(Ordering::Relaxed) {
                        // Accept and close at once: the client resets anyway (SO_LINGER 0).
                        let _ = tcp_l.accept();
                    }
                })?,
        );
        let s = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name("udp-server".into())
                .spawn(move || {
                    let _ = sys::pin_current_thread(cpu);
                    let mut buf = [0u8; 2048];
                    while !s.load(Ordering::Relaxed) {
                        let _ = udp_s.recv_from(&mut buf);
                    }
                })?,
        );
        Ok(Self {
            tcp,
            udp,
            canary,
            _canary: canary_l,
            stop,
            threads,
        })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop (the UDP loop wakes on its read timeout).
        let _ = TcpStream::connect_timeout(&SocketAddr::V4(self.tcp), Duration::from_secs(1));
        for t in self.threads {
            let _ = t.join();
        }
    }
}
