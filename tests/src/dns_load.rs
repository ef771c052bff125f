//! A DNS load generator for a process of its own (the `dns_load` binary; the bench's
//! `__dnsload`): joins a cgroup (an agent's, so its port-53 traffic is steered to the proxy, or
//! not), then sends A queries on one connected UDP socket, as glibc's stub resolver does:
//!
//! - paced (`rate` > 0): open loop, query `i` due at `start + i / rate` whatever came back, and
//!   its latency counted from when it was due (a stall shows in every query it delays);
//! - closed (`rate` 0): `outstanding` queries in flight, each answer sends the next.
//!
//! A query fails when no valid answer (same id and name, NOERROR, an A record) comes within
//! `timeout_ms`, or the answer is SERVFAIL, REFUSED or another error. Output: one JSON line
//! `{"started":..}` after the warm-up, then a [`LoadReport`].

use std::{
    collections::HashMap,
    io::{self, Write},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
};

use anyhow::{bail, ensure, Context, Result};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use serde::{Deserialize, Serialize};

/// What to send, where and how fast.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    /// The resolver the queries are sent to (an agent's go to the proxy whatever this is).
    pub server: SocketAddr,
    /// Names asked for, in turn.
    pub names: Vec<String>,
    /// Queries per second (open loop); 0: closed loop with `outstanding` in flight.
    pub rate: u32,
    pub outstanding: usize,
    /// How long to send after the warm-up.
    pub duration_ms: u64,
    /// Queries answered before the timed part (not counted).
    pub warmup: u64,
    pub timeout_ms: u64,
    /// cgroup to join first (its directory).
    pub cgroup: Option<PathBuf>,
    pub cpu: Option<usize>,
}

/// One failed query.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    /// When it was due (paced) or sent, ms after the timed part began.
    pub at_ms: f64,
    /// "timeout", or the answer's rcode ("SERVFAIL", "REFUSED", ...), or "no-address".
    pub kind: String,
}

/// What the load generator prints at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub timeouts: u64,
    pub servfail: u64,
    pub refused: u64,
    /// Other rcodes, or a NOERROR answer without an A record.
    pub other: u64,
    /// Answers matching no query in flight (late after a timeout, or garbled).
    pub stray: u64,
    /// The first 200 failures.
    pub failures: Vec<Failure>,
    /// Each valid answer's latency, µs (paced: from when it was due; closed: from the send).
    pub latencies_us: Vec<f64>,
    /// The slowest valid answer, µs, and when it was due, ms after the timed part began.
    pub max_latency_us: f64,
    pub max_latency_at_ms: f64,
    /// CLOCK_MONOTONIC when the timed part began and ended (the last answer or timeout), ns.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Sends made more than 1 ms after they were due (the client itself fell behind).
    pub late_sends: u64,
}

impl LoadReport {
    /// Valid answers per second over the timed part.
    pub fn ok_per_s(&self) -> f64 {
        self.ok as f64 / ((self.end_ns - self.start_ns) as f64 / 1e9).max(1e-9)
    }
}

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; `cpu` is below CPU_SETSIZE on any machine
    // this runs on.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: this thread and a valid set.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    ensure!(
        rc == 0,
        "pinning to CPU {cpu}: {}",
        io::Error::last_os_error()
    );
    Ok(())
}

/// An rcode as DNS tools print it (`SERVFAIL`, `REFUSED`, `NXDOMAIN`, ...).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        c => format!("RCODE{}", u16::from(c)),
    }
}

/// A query for `name` (A, recursion desired) with id 0; the id is patched per send.
fn query_bytes(name: &str) -> Result<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(0)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).with_context(|| format!("name {name:?}"))?,
            RecordType::A,
        ));
    Ok(m.to_vec()?)
}

/// A query in flight: when it counts from, and which name it asked.
struct Pending {
    from_ns: u64,
    name: usize,
}

struct Run<'a> {
    spec: &'a LoadSpec,
    sock: UdpSocket,
    queries: Vec<Vec<u8>>,
    lower: Vec<String>,
    pending: HashMap<u16, Pending>,
    next_id: u16,
    next_name: usize,
    rep: LoadReport,
    /// Counting (after the warm-up) or not.
    timed: bool,
    buf: Vec<u8>,
}

impl Run<'_> {
    fn send(&mut self, from_ns: u64) -> Result<()> {
        // An id not in flight (at most 65,535 are).
        let mut id = self.next_id;
        while self.pending.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        let name = self.next_name;
        self.next_name = (self.next_name + 1) % self.queries.len();
        let q = &mut self.queries[name];
        q[..2].copy_from_slice(&id.to_be_bytes());
        match self.sock.send(q) {
            Ok(_) => {}
            // A full socket buffer or a refused send: the query is lost, as a resolver's would be.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN) | Some(libc::ECONNREFUSED) | Some(libc::ENOBUFS)
                ) => {}
            Err(e) => return Err(e).context("send"),
        }
        self.pending.insert(id, Pending { from_ns, name });
        if self.timed {
            self.rep.sent += 1;
        }
        Ok(())
    }

    fn fail(&mut self, from_ns: u64, kind: &str) {
        if !self.timed {
            return;
        }
        self.rep.failed += 1;
        match kind {
            "timeout" => self.rep.timeouts += 1,
            "SERVFAIL" => self.rep.servfail += 1,
            "REFUSED" => self.rep.refused += 1,
            _ => self.rep.other += 1,
        }
        if self.rep.failures.len() < 200 {
            self.rep.failures.push(Failure {
                at_ms: from_ns.saturating_sub(self.rep.start_ns) as f64 / 1e6,
                kind: kind.to_string(),
            });
        }
    }

    /// Reads every answer waiting; returns how many queries finished (answered or failed).
    fn receive(&mut self) -> Result<usize> {
        let mut done = 0;
        loop {
            let n = match self.sock.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(done),
                // ICMP port unreachable of an earlier send (nothing listening for a moment).
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                Err(e) => return Err(e).context("recv"),
            };
            let now = mono_ns();
            let Ok(m) = Message::from_vec(&self.buf[..n]) else {
                self.rep.stray += u64::from(self.timed);
                continue;
            };
            let Some(p) = self.pending.get(&m.id()) else {
                self.rep.stray += u64::from(self.timed);
                continue;
            };
            let same_name = m.queries().first().is_some_and(|q| {
                q.name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase()
                    == self.lower[p.name]
            });
            if m.message_type() != MessageType::Response || !same_name {
                self.rep.stray += u64::from(self.timed);
                continue;
            }
            let p = self.pending.remove(&m.id()).expect("found above");
            done += 1;
            match m.response_code() {
                ResponseCode::NoError
                    if m.answers().iter().any(|r| matches!(r.data(), RData::A(_))) =>
                {
                    if self.timed {
                        self.rep.ok += 1;
                        let us = now.saturating_sub(p.from_ns) as f64 / 1e3;
                        self.rep.latencies_us.push(us);
                        if us > self.rep.max_latency_us {
                            self.rep.max_latency_us = us;
                            self.rep.max_latency_at_ms =
                                p.from_ns.saturating_sub(self.rep.start_ns) as f64 / 1e6;
                        }
                    }
                }
                ResponseCode::NoError => self.fail(p.from_ns, "no-address"),
                code => self.fail(p.from_ns, &rcode_name(code)),
            }
        }
    }

    /// Fails the queries in flight for longer than the timeout; returns how many.
    fn expire(&mut self, now: u64) -> usize {
        let limit = self.spec.timeout_ms * 1_000_000;
        let old: Vec<(u16, u64)> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.from_ns) > limit)
            .map(|(id, p)| (*id, p.from_ns))
            .collect();
        for (id, from) in &old {
            self.pending.remove(id);
            self.fail(*from, "timeout");
        }
        old.len()
    }

    /// Waits for an answer for at most `ns` (poll).
    fn wait(&self, ns: u64) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = ns.div_ceil(1_000_000).min(100) as libc::c_int;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).context("poll");
            }
        }
        Ok(())
    }

    /// The warm-up: `warmup` queries, one at a time, each must be answered.
    fn warm_up(&mut self) -> Result<()> {
        for i in 0..self.spec.warmup {
            self.send(mono_ns())?;
            let deadline = mono_ns() + self.spec.timeout_ms * 1_000_000;
            while !self.pending.is_empty() {
                self.receive()?;
                let now = mono_ns();
                ensure!(
                    now < deadline || self.pending.is_empty(),
                    "warm-up query {i} to {} was not answered within {} ms",
                    self.spec.server,
                    self.spec.timeout_ms
                );
                self.wait(deadline.saturating_sub(now).min(1_000_000))?;
            }
        }
        Ok(())
    }

    fn paced(&mut self) -> Result<()> {
        let period = 1_000_000_000 / u64::from(self.spec.rate);
        let start = self.rep.start_ns;
        let end = start + self.spec.duration_ms * 1_000_000;
        let mut i = 0u64;
        loop {
            let due = start + i * period;
            if due >= end {
                break;
            }
            let now = mono_ns();
            if now >= due {
                if now - due > 1_000_000 {
                    self.rep.late_sends += 1;
                }
                self.send(due)?;
                i += 1;
                continue;
            }
            self.receive()?;
            self.expire(mono_ns());
            let now = mono_ns();
            if now < due {
                // poll sleeps whole ms: spin for the last one.
                if due - now > 1_000_000 {
                    self.wait(due - now - 1_000_000)?;
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        Ok(())
    }

    fn closed(&mut self) -> Result<()> {
        let end = self.rep.start_ns + self.spec.duration_ms * 1_000_000;
        for _ in 0..self.spec.outstanding.max(1) {
            self.send(mono_ns())?;
        }
        loop {
            let now = mono_ns();
            if now >= end {
                break;
            }
            let done = self.receive()? + self.expire(now);
            for _ in 0..done {
                self.send(mono_ns())?;
            }
            if done == 0 {
                self.wait(end - now)?;
            }
        }
        Ok(())
    }

    /// After the last send: every query in flight answered or timed out.
    fn drain(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.receive()?;
            let now = mono_ns();
            self.expire(now);
            if !self.pending.is_empty() {
                self.wait(10_000_000)?;
            }
        }
        Ok(())
    }
}

/// Runs the load as `spec` says, printing `{"started":..}` after the warm-up; returns the report.
pub fn run(spec: &LoadSpec) -> Result<LoadReport> {
    if let Some(cg) = &spec.cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    if let Some(cpu) = spec.cpu {
        pin_to(cpu)?;
    }
    ensure!(!spec.names.is_empty(), "no names to ask for");
    ensure!(
        spec.rate > 0 || spec.outstanding > 0,
        "a rate or a number of queries in flight"
    );
    let bind: SocketAddr = if spec.server.is_ipv4() {
        "127.0.0.1:0".parse()?
    } else {
        "[::1]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).context("binding the client socket")?;
    // Connected, as glibc's resolver: the kernel steers an agent's socket here (connect).
    sock.connect(spec.server)
        .with_context(|| format!("connecting to {}", spec.server))?;
    sock.set_nonblocking(true)?;
    let mut run = Run {
        spec,
        sock,
        queries: spec
            .names
            .iter()
            .map(|n| query_bytes(n))
            .collect::<Result<_>>()?,
        lower: spec
            .names
            .iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect(),
        pending: HashMap::new(),
        next_id: (std::process::id() as u16).wrapping_mul(7919),
        next_name: 0,
        rep: LoadReport::default(),
        timed: false,
        buf: vec![0u8; 65_535],
    };
    run.warm_up()?;
    run.timed = true;
    run.rep.start_ns = mono_ns();
    {
        let mut out = io::stdout().lock();
        writeln!(out, "{{\"started\":true,\"ns\":{}}}", run.rep.start_ns)?;
        out.flush()?;
    }
    if spec.rate > 0 {
        run.paced()?;
    } else {
        run.closed()?;
    }
    run.drain()?;
    run.rep.end_ns = mono_ns();
    Ok(run.rep)
}

/// A binary's main: the spec as one JSON argument; the report as the last line of stdout.
pub fn main_with(spec_json: Option<String>) -> Result<()> {
    let Some(text) = spec_json else {
        bail!("usage: dns_load SPEC-JSON (see agentwall_tests::dns_load::LoadSpec)");
    };
    let spec: LoadSpec = serde_json::from_str(&text).context("the load spec")?;
    let rep = run(&spec)?;
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

/// A port of 127.0.0.1 free for both UDP and TCP (two controllers' `--dns-listen` share it).
pub fn free_dns_port() -> anyhow::Result<u16> {
    use std::net::{Ipv4Addr, TcpListener, UdpSocket};
    for _ in 0..32 {
        let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = u.local_addr()?.port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no port of 127.0.0.1 free for both UDP and TCP")
}
