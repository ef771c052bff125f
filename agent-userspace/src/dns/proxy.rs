//! The enforcing DNS proxy: the kernel steers every agent's port-53 traffic here (agent-ebpf's
//! dns.rs). For each query: who asked (the kernel remembered the socket, by cookie), whether the
//! agent's policy allows the name (the control actor), the upstream's answer, its addresses
//! written into that agent's kernel entries, and only then the answer released; a record for
//! every query.
//!
//! Sockets are bound with SO_REUSEPORT and a group program that sends every new datagram and
//! connection to the newest socket: a controller that starts while another runs takes the
//! traffic over at once, and the old one answers what it already received, then closes.

use std::{
    cell::RefCell,
    io,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::op::ResponseCode;
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};

use super::{
    upstream::{read_frame, write_frame, Upstream},
    wire::{self, Query, MAX_MESSAGE},
};
use crate::{
    control::{
        dns::{Answered, NameVerdict, Written},
        Command,
    },
    datapath::{sock_diag, DnsSocks},
    events::Notice,
    policy::{self, DeniedAnswer},
};

/// Where the proxy listens unless `agentwall run --dns-listen` says otherwise (loopback only:
/// the kernel steers agents here; nothing else should reach it).
pub const DEFAULT_LISTEN_V4: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1053);
/// Queries the proxy holds at once (each waits for its upstream answer), and of those, how many
/// one agent may hold: one agent's flood of slow names must not starve the others' lookups.
const MAX_IN_FLIGHT: usize = 4096;
const MAX_IN_FLIGHT_PER_AGENT: usize = 128;
/// Past its 128, an agent's queries wait for its own to finish, up to this many; only beyond is
/// one REFUSED. A burst is served, not refused: a takeover's backlog (every query sent while the
/// new controller started, 1,000/s for a second) is one agent's burst.
const MAX_WAITING_PER_AGENT: usize = 2048;
/// TCP connections served at once, and how long one may sit idle.
const MAX_TCP: usize = 256;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Receive buffer of the UDP sockets: a takeover queues queries here while the new controller
/// waits for the old one to stop.
const UDP_RCVBUF: usize = 8 << 20;
/// A controller that stops answers what it already received: it drains until its sockets
/// stay quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// The proxy's sockets, bound (and steering new traffic to themselves) before the controller
/// takes its lock.
pub struct Listeners {
    pub v4: SocketAddrV4,
    pub v6: Option<SocketAddrV6>,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// Binds UDP and TCP at `v4` (port 0: a free one) and, when given, at `v6` on the same port
    /// (a missing IPv6 loopback only logs: agents' IPv6 DNS is then refused in the kernel).
    pub fn bind(v4: SocketAddrV4, v6: Option<SocketAddrV6>) -> io::Result<Listeners> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::try_bind(v4, v6) {
                // Port 0: the UDP port the kernel picked may be taken for TCP; pick again.
                Err(e) if v4.port() == 0 && tries < 16 && e.kind() == io::ErrorKind::AddrInUse => {}
                r => return r,
            }
        }
    }

    fn try_bind(v4: SocketAddrV4, v6: Option<SocketAddrV6>) -> io::Result<Listeners> {
        let udp4 = bind_udp(SocketAddr::V4(v4))?;
        let port = udp4.local_addr()?.port();
        let v4 = SocketAddrV4::new(*v4.ip(), port);
        let tcp4 = bind_tcp(SocketAddr::V4(v4))?;
        let mut out = Listeners {
            v4,
            v6: None,
            udp: vec![udp4],
            tcp: vec![tcp4],
        };
        if let Some(v6) = v6 {
            let v6 = SocketAddrV6::new(*v6.ip(), port, 0, 0);
            match (bind_udp(SocketAddr::V6(v6)), bind_tcp(SocketAddr::V6(v6))) {
                (Ok(u), Ok(t)) => {
                    out.udp.push(u);
                    out.tcp.push(t);
                    out.v6 = Some(v6);
                }
                (Err(e), _) | (_, Err(e)) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(
                        "DNS proxy: no IPv6 listener at {v6} ({e}): agents' IPv6 DNS is refused"
                    );
                }
            }
        }
        Ok(out)
    }
}

fn bind_udp(at: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(at), Type::DGRAM, Some(Protocol::UDP))?;
    prepare(&s, at)?;
    // Root may go past rmem_max; anyone else gets what the sysctl allows.
    if s.set_recv_buffer_size(UDP_RCVBUF).is_ok() {
        let _ = force_rcvbuf(&s, UDP_RCVBUF);
    }
    s.bind(&at.into())?;
    steer_to_newest(&s)?;
    Ok(s.into())
}

fn bind_tcp(at: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
    prepare(&s, at)?;
    s.bind(&at.into())?;
    s.listen(1024)?;
    steer_to_newest(&s)?;
    Ok(s.into())
}

fn prepare(s: &Socket, at: SocketAddr) -> io::Result<()> {
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    if at.is_ipv6() {
        s.set_only_v6(true)?;
    }
    Ok(())
}

fn force_rcvbuf(s: &Socket, bytes: usize) -> io::Result<()> {
    let v = bytes as libc::c_int;
    // SAFETY: a valid socket and an int option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The reuseport group's selector, a classic BPF program "return 1": with the socket of a
/// controller that runs and the one of a controller starting beside it, index 1 is the newest,
/// which then gets every new datagram and connection; alone, 1 is past the end and the kernel
/// falls back to its hash (the one socket).
fn steer_to_newest(s: &Socket) -> io::Result<()> {
    const BPF_RET_K: u16 = 0x06;
    let mut filter = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: a valid socket and a one-instruction program that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What every query handler shares.
struct Ctx {
    control: mpsc::Sender<Command>,
    socks: DnsSocks,
    upstream: Upstream,
    notices: mpsc::UnboundedSender<Notice>,
    /// Per agent: its in-flight slots, and its queries holding or waiting for one.
    busy: std::sync::Mutex<std::collections::HashMap<u64, (Arc<Semaphore>, usize)>>,
}

/// One agent's query, counted until dropped; in flight once it holds one of the agent's slots.
struct InFlight<'a> {
    ctx: &'a Ctx,
    agent: u64,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<'a> InFlight<'a> {
    /// Waits for one of the agent's MAX_IN_FLIGHT_PER_AGENT slots; None when
    /// MAX_WAITING_PER_AGENT of its queries already wait.
    async fn take(ctx: &'a Ctx, agent: u64) -> Option<InFlight<'a>> {
        let slots = {
            let mut busy = ctx.busy.lock().expect("in-flight counts");
            let (slots, n) = busy
                .entry(agent)
                .or_insert_with(|| (Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_AGENT)), 0));
            if *n >= MAX_IN_FLIGHT_PER_AGENT + MAX_WAITING_PER_AGENT {
                return None;
            }
            *n += 1;
            slots.clone()
        };
        // Counted from here, so a waiter dropped with its task is uncounted too.
        let mut this = InFlight {
            ctx,
            agent,
            _slot: None,
        };
        this._slot = Some(slots.acquire_owned().await.ok()?);
        Some(this)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut busy = self.ctx.busy.lock().expect("in-flight counts");
        if let Some((_, n)) = busy.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.agent);
            }
        }
    }
}

/// Serves queries on `listeners` until `stop`; then answers what the sockets already hold and
/// every query in flight, and returns (the control actor must outlive this).
pub async fn serve(
    listeners: Listeners,
    control: mpsc::Sender<Command>,
    socks: DnsSocks,
    upstream: Upstream,
    notices: mpsc::UnboundedSender<Notice>,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let ctx = Arc::new(Ctx {
        control,
        socks,
        upstream,
        notices,
        busy: Default::default(),
    });
    let mut servers = JoinSet::new();
    for u in listeners.udp {
        let sock = Arc::new(UdpSocket::from_std(u)?);
        servers.spawn(udp_loop(sock, ctx.clone(), stop.clone()));
    }
    for t in listeners.tcp {
        let l = TcpListener::from_std(t)?;
        servers.spawn(tcp_loop(l, ctx.clone(), stop.clone()));
    }
    while servers.join_next().await.is_some() {}
    Ok(())
}

async fn udp_loop(sock: Arc<UdpSocket>, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("DNS proxy socket: {e}");
            return;
        }
    };
    let mut inflight = JoinSet::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut stopping = false;
    loop {
        let received = if stopping {
            match tokio::time::timeout(DRAIN_QUIET, sock.recv_from(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = sock.recv_from(&mut buf) => r,
                _ = stop.changed() => { stopping = true; continue; }
                Some(_) = inflight.join_next(), if !inflight.is_empty() => continue,
            }
        };
        let (n, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("DNS proxy receive: {e}");
                continue;
            }
        };
        while inflight.len() >= MAX_IN_FLIGHT {
            inflight.join_next().await;
        }
        let (sock, ctx, bytes) = (sock.clone(), ctx.clone(), buf[..n].to_vec());
        inflight.spawn(async move {
            if let Some(reply) = handle(&ctx, &bytes, peer, local, Transport::Udp).await {
                if let Err(e) = sock.send_to(&reply, peer).await {
                    tracing::debug!(%peer, "DNS proxy reply: {e}");
                }
            }
        });
    }
    while inflight.join_next().await.is_some() {}
}

async fn tcp_loop(l: TcpListener, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    let mut stopping = false;
    loop {
        let accepted = if stopping {
            match tokio::time::timeout(DRAIN_QUIET, l.accept()).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = l.accept() => r,
                _ = stop.changed() => { stopping = true; continue; }
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            }
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("DNS proxy accept: {e}");
                continue;
            }
        };
        while conns.len() >= MAX_TCP {
            conns.join_next().await;
        }
        conns.spawn(tcp_conn(stream, peer, ctx.clone(), stop.clone()));
    }
    while conns.join_next().await.is_some() {}
}

async fn tcp_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(TCP_IDLE, read_frame(&mut stream)) => f,
            // A stopping controller finishes the query it is reading, not the connection.
            _ = stop.changed() => return,
        };
        let bytes = match frame {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "DNS proxy TCP read: {e}");
                return;
            }
        };
        let Some(reply) = handle(&ctx, &bytes, peer, local, Transport::Tcp).await else {
            return;
        };
        if write_frame(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// One query, start to end: the reply to send, if any.
async fn handle(
    ctx: &Ctx,
    bytes: &[u8],
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let mut rec = QueryRecord::new(transport);
    // Who asked: only the kernel can say (a socket it steered).
    let asker = identify(ctx, peer, local, transport);
    if let Some((agent, resolver)) = asker {
        rec.agent_id = Some(agent);
        rec.resolver = Some(resolver);
    }
    let query = match wire::parse_query(bytes) {
        Ok(q) => q,
        Err(e) => {
            rec.reason = "malformed";
            rec.error = Some(e.to_string());
            rec.rcode = e.reply.as_ref().map(|r| rcode_of(r));
            ctx.record(rec, None);
            return e.reply;
        }
    };
    rec.name = query.name.clone();
    rec.qtype = query.record_type().to_string();
    let Some((agent, _)) = asker else {
        // Not a query the kernel steered: a process that is no agent, or a socket whose entry
        // aged out. Answered REFUSED, never forwarded.
        rec.reason = "not-steered";
        return Some(ctx.refuse(rec, &query, ResponseCode::Refused, None));
    };
    let Some(_slot) = InFlight::take(ctx, agent).await else {
        rec.reason = "too-many-in-flight";
        return Some(ctx.refuse(rec, &query, ResponseCode::Refused, None));
    };
    let Some(name) = policy::normalize_name(&query.name) else {
        rec.reason = "malformed-name";
        return Some(ctx.refuse(rec, &query, ResponseCode::Refused, None));
    };
    let t_policy = Instant::now();
    let verdict = match ctx
        .ask(|reply| Command::DnsQuery { agent, name, reply })
        .await
    {
        Some(v) => v,
        None => {
            rec.reason = "controller-stopped";
            return Some(ctx.refuse(rec, &query, ResponseCode::ServFail, None));
        }
    };
    rec.timing.policy_us = t_policy.elapsed().as_micros() as u64;
    rec.reason = verdict.reason;
    if !verdict.forwards() {
        let code = match verdict.denied_answer {
            DeniedAnswer::Refused => ResponseCode::Refused,
            DeniedAnswer::NxDomain => ResponseCode::NXDomain,
        };
        return Some(ctx.refuse(rec, &query, code, Some(verdict)));
    }
    let t_up = Instant::now();
    let (response, _) = match ctx
        .upstream
        .exchange(&query, transport == Transport::Tcp)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            rec.timing.upstream_us = t_up.elapsed().as_micros() as u64;
            rec.reason = "upstream-error";
            rec.error = Some(e.to_string());
            return Some(ctx.refuse(rec, &query, ResponseCode::ServFail, Some(verdict)));
        }
    };
    rec.timing.upstream_us = t_up.elapsed().as_micros() as u64;
    let found = wire::answer_addresses(&query, &response);
    let t_kernel = Instant::now();
    // Written to the kernel before the answer goes out: the agent never holds an address it
    // cannot use, nor one the kernel would open only later.
    let written = match &verdict.plan {
        Some(plan) if !found.is_empty() => {
            let answers = found
                .iter()
                .map(|r| Answered {
                    addr: r.addr,
                    ttl: r.ttl,
                })
                .collect();
            match ctx
                .ask(|reply| Command::DnsAnswer {
                    plan: plan.clone(),
                    answers,
                    reply,
                })
                .await
            {
                Some(w) => w,
                None => {
                    rec.reason = "controller-stopped";
                    return Some(ctx.refuse(rec, &query, ResponseCode::ServFail, Some(verdict)));
                }
            }
        }
        // Audit mode: nothing written, the answer goes out whole (the kernel records the
        // connections it would have refused).
        _ => Written {
            kept: found.iter().map(|r| (r.addr, r.ttl, None)).collect(),
            dropped: Vec::new(),
        },
    };
    rec.timing.kernel_us = t_kernel.elapsed().as_micros() as u64;
    let keep: Vec<IpAddr> = written.kept.iter().map(|(a, _, _)| *a).collect();
    let limit = (transport == Transport::Udp).then(|| wire::udp_limit(&query));
    let reply = match wire::release(&query, &response, &keep, limit) {
        Ok(r) => r,
        Err(e) => {
            rec.reason = "answer-error";
            rec.error = Some(e.to_string());
            return Some(ctx.refuse(rec, &query, ResponseCode::ServFail, Some(verdict)));
        }
    };
    rec.rcode = Some(rcode_name(response.response_code()));
    rec.answers = written.kept;
    rec.dropped = written.dropped;
    rec.timing.total_us = started.elapsed().as_micros() as u64;
    ctx.record(rec, Some(&verdict));
    Some(reply)
}

thread_local! {
    /// One sock_diag socket per worker thread: a query's identity costs one netlink round trip.
    static DIAG: RefCell<Option<OwnedFd>> = const { RefCell::new(None) };
}

/// The agent that sent a query, and the resolver it addressed: the kernel remembered its
/// socket, by cookie, when it steered it. None for any other sender.
fn identify(
    ctx: &Ctx,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) -> Option<(u64, SocketAddr)> {
    let protocol = match transport {
        Transport::Udp => libc::IPPROTO_UDP as u8,
        Transport::Tcp => libc::IPPROTO_TCP as u8,
    };
    let cookie = DIAG.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = sock_diag::open().ok();
        }
        let nl = slot.as_ref()?;
        match sock_diag::cookie_of(nl, protocol, peer, local) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, "DNS proxy: looking up the asking socket: {e}");
                // A netlink socket in a bad state is replaced next time.
                *slot = None;
                None
            }
        }
    })?;
    let s = ctx.socks.get(cookie)?;
    // The words hold the address in network order in memory, as the kernel's context does.
    let mut raw = [0u8; 16];
    for (i, w) in s.addr.iter().enumerate() {
        raw[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let ip = std::net::Ipv6Addr::from(raw);
    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
    let port = u16::from_be(s.port as u16);
    Some((s.agent, SocketAddr::new(ip, port)))
}

impl Ctx {
    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.control.send(cmd(tx)).await.ok()?;
        rx.await.ok()
    }

    fn refuse(
        &self,
        mut rec: QueryRecord,
        query: &Query,
        code: ResponseCode,
        verdict: Option<NameVerdict>,
    ) -> Vec<u8> {
        rec.rcode = Some(rcode_name(code));
        self.record(rec, verdict.as_ref());
        wire::reply_code(query, code)
    }

    fn record(&self, rec: QueryRecord, verdict: Option<&NameVerdict>) {
        let _ = self.notices.send(Notice::new("dns", rec.detail(verdict)));
    }
}

/// What the record of one query says, gathered on the way.
struct QueryRecord {
    transport: Transport,
    agent_id: Option<u64>,
    resolver: Option<SocketAddr>,
    name: String,
    qtype: String,
    reason: &'static str,
    rcode: Option<String>,
    /// (address, its TTL, how long the kernel lets the agent use it).
    answers: Vec<(IpAddr, u32, Option<u32>)>,
    dropped: Vec<(IpAddr, String)>,
    error: Option<String>,
    timing: Timing,
}

/// Microseconds spent asking the control actor, the upstream, and writing the kernel entries.
#[derive(Default, serde::Serialize)]
struct Timing {
    policy_us: u64,
    upstream_us: u64,
    kernel_us: u64,
    total_us: u64,
}

impl QueryRecord {
    fn new(transport: Transport) -> Self {
        QueryRecord {
            transport,
            agent_id: None,
            resolver: None,
            name: String::new(),
            qtype: String::new(),
            reason: "",
            rcode: None,
            answers: Vec::new(),
            dropped: Vec::new(),
            error: None,
            timing: Timing::default(),
        }
    }

    fn detail(&self, v: Option<&NameVerdict>) -> serde_json::Value {
        let allowed = v.is_some_and(|v| v.decision == "allow");
        json!({
            "agent": v.map(|v| v.agent.clone()),
            "agent_cgroup_id": self.agent_id,
            "policy": v.and_then(|v| v.policy.clone()),
            "name": self.name,
            "type": self.qtype,
            "transport": self.transport.as_str(),
            "resolver": self.resolver.map(|r| r.to_string()),
            "decision": if allowed { "allow" } else { "deny" },
            "mode": v.map_or("enforce", |v| v.mode),
            "reason": self.reason,
            "rule": v.and_then(|v| v.rule),
            "rule_name": v.and_then(|v| v.rule_name.clone()),
            "decided_by": v.and_then(|v| v.decided_by.clone()),
            "rcode": self.rcode,
            "answers": self.answers.iter()
                .map(|(a, ttl, open)| json!({ "addr": a.to_string(), "ttl": ttl, "open_secs": open }))
                .collect::<Vec<_>>(),
            "dropped": self.dropped.iter()
                .map(|(a, why)| json!({ "addr": a.to_string(), "why": why }))
                .collect::<Vec<_>>(),
            "error": self.error,
            "timing_us": self.timing,
        })
    }
}

/// The rcode of an encoded reply (its header's low four bits of byte 3).
fn rcode_of(reply: &[u8]) -> String {
    let code = reply.get(3).map_or(0, |b| b & 0x0f);
    rcode_name(ResponseCode::from(0, code))
}

/// An rcode as DNS tools print it (NOERROR, NXDOMAIN, REFUSED, ...).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}
