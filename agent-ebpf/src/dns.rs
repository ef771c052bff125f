//! DNS steering: an agent's TCP and UDP to port 53, at any resolver address, goes to the
//! controller's DNS proxy instead, which judges the name (agent-userspace/src/dns). The socket's
//! cookie is remembered with the agent and the resolver it addressed, so the proxy knows who
//! asked (from the kernel, not from anything the agent sends), and the answer's source (recvmsg)
//! and the socket's peer (getpeername) read as that resolver again: stub resolvers drop answers
//! from an address they did not ask.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::generated::bpf_get_socket_cookie, programs::SockAddrContext,
};

use agent_common::{DnsConfig, DnsSock};

use crate::maps::{DNS_CONFIG, DNS_SOCKS};

/// Port 53 as `user_port` holds it (network byte order in the low 16 bits).
const DNS_PORT: u32 = 53u16.to_be() as u32;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `::ffff:0:0/96`'s third word as `user_ip6` holds it.
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// What steering did with a call.
pub(crate) enum Steer {
    /// Not a DNS query, or steering is off: judge the call as usual.
    No,
    /// Rewritten to the proxy: allowed.
    Steered,
    /// A DNS query that cannot be steered (an IPv6 resolver and no IPv6 proxy; or its socket
    /// could not be remembered, so the proxy would not know who asked): denied.
    Refused,
}

/// Where agents' DNS goes, when steering is on.
#[inline(always)]
fn steering() -> Option<&'static DnsConfig> {
    DNS_CONFIG.get(0).filter(|c| c.enabled != 0)
}

/// A DNS query: TCP or UDP to port 53.
#[inline(always)]
pub(crate) fn is_query(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    sa.user_port == DNS_PORT && (sa.protocol == IPPROTO_TCP || sa.protocol == IPPROTO_UDP)
}

/// Steers an agent's IPv4 DNS query (`is_query`) to the proxy. A function of its own: the hooks'
/// stacks are full. Returns a `STEER_*` as a scalar its caller uses (see decide::judge_into).
#[inline(never)]
pub(crate) fn steer4(ctx: &SockAddrContext, agent: u64) -> u32 {
    let Some(cfg) = steering() else {
        return STEER_NO;
    };
    let sa = ctx.sock_addr;
    // SAFETY: a valid context; these fields are readable and writable in connect4 and sendmsg4.
    unsafe {
        let sock = DnsSock {
            agent,
            addr: [0, 0, MAPPED_WORD, read(&(*sa).user_ip4)],
            port: read(&(*sa).user_port),
            family: AF_INET,
        };
        if !remember(sa, &sock) {
            return STEER_REFUSED;
        }
        core::ptr::write_volatile(&mut (*sa).user_ip4, cfg.ip4);
        core::ptr::write_volatile(&mut (*sa).user_port, cfg.port);
    }
    STEER_STEERED
}

/// The same for IPv6 sockets: an IPv4-mapped resolver goes to the IPv4 proxy (through its
/// mapped address), any other to the IPv6 one, or is refused when there is none.
#[inline(never)]
pub(crate) fn steer6(ctx: &SockAddrContext, agent: u64) -> u32 {
    let Some(cfg) = steering() else {
        return STEER_NO;
    };
    let sa = ctx.sock_addr;
    // SAFETY: a valid context; these fields are readable and writable in connect6 and sendmsg6.
    unsafe {
        let ip = [
            read(&(*sa).user_ip6[0]),
            read(&(*sa).user_ip6[1]),
            read(&(*sa).user_ip6[2]),
            read(&(*sa).user_ip6[3]),
        ];
        let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_WORD;
        if !mapped && cfg.has_ip6 == 0 {
            return STEER_REFUSED;
        }
        let sock = DnsSock {
            agent,
            addr: ip,
            port: read(&(*sa).user_port),
            family: AF_INET6,
        };
        if !remember(sa, &sock) {
            return STEER_REFUSED;
        }
        if mapped {
            set_ip6(sa, &[0, 0, MAPPED_WORD, cfg.ip4]);
        } else {
            set_ip6(sa, &cfg.ip6);
        }
        core::ptr::write_volatile(&mut (*sa).user_port, cfg.port);
    }
    STEER_STEERED
}

/// A context field, read as one 4-byte load at its own offset (LLVM must not fold the reads of
/// two fields into one load at a computed offset: the verifier refuses that on the context).
#[inline(always)]
fn read(field: &u32) -> u32 {
    // SAFETY: a reference to a context field.
    unsafe { core::ptr::read_volatile(field) }
}

/// Remembers the socket as steered, under its cookie: false when the map refused it.
///
/// # Safety
/// `sa` is the program's context.
#[inline(always)]
unsafe fn remember(sa: *mut bpf_sock_addr, sock: &DnsSock) -> bool {
    // SAFETY: the caller's; the helper takes a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    DNS_SOCKS.insert(cookie, sock, 0).is_ok()
}

pub(crate) const STEER_NO: u32 = 0;
pub(crate) const STEER_STEERED: u32 = 1;
pub(crate) const STEER_REFUSED: u32 = 2;

#[inline(always)]
pub(crate) fn steer_kind(v: u32) -> Steer {
    match v {
        STEER_STEERED => Steer::Steered,
        STEER_REFUSED => Steer::Refused,
        _ => Steer::No,
    }
}

/// recvmsg4 and getpeername4: an address that is the proxy's, on a socket whose DNS was steered,
/// reads as the resolver the agent addressed. Costs every other process one array lookup and
/// two compares.
#[inline(always)]
pub(crate) fn restore4(ctx: &SockAddrContext) {
    let Some(cfg) = steering() else {
        return;
    };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: a valid context; recvmsg4 and getpeername4 may read and write these fields.
    unsafe {
        if read(&(*sa).user_ip4) != cfg.ip4 || read(&(*sa).user_port) != cfg.port {
            return;
        }
        let cookie = bpf_get_socket_cookie(sa as *mut c_void);
        if let Some(s) = DNS_SOCKS.get(cookie) {
            core::ptr::write_volatile(&mut (*sa).user_ip4, s.addr[3]);
            core::ptr::write_volatile(&mut (*sa).user_port, s.port);
        }
    }
}

/// recvmsg6 and getpeername6: the same, for the IPv6 proxy and the IPv4 one seen through an
/// IPv4-mapped address.
#[inline(always)]
pub(crate) fn restore6(ctx: &SockAddrContext) {
    let Some(cfg) = steering() else {
        return;
    };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in restore4.
    unsafe {
        if read(&(*sa).user_port) != cfg.port {
            return;
        }
        let ip = [
            read(&(*sa).user_ip6[0]),
            read(&(*sa).user_ip6[1]),
            read(&(*sa).user_ip6[2]),
            read(&(*sa).user_ip6[3]),
        ];
        if !is_proxy6(cfg, &ip) {
            return;
        }
        let cookie = bpf_get_socket_cookie(sa as *mut c_void);
        if let Some(s) = DNS_SOCKS.get(cookie) {
            set_ip6(sa, &s.addr);
            core::ptr::write_volatile(&mut (*sa).user_port, s.port);
        }
    }
}

/// `user_ip6`, a word at a time: the context takes only 4-byte stores there on every kernel.
///
/// # Safety
/// `sa` is the program's context, in a hook that may write `user_ip6`.
#[inline(always)]
unsafe fn set_ip6(sa: *mut bpf_sock_addr, ip: &[u32; 4]) {
    // SAFETY: the caller's.
    unsafe {
        let p = core::ptr::addr_of_mut!((*sa).user_ip6) as *mut u32;
        core::ptr::write_volatile(p, ip[0]);
        core::ptr::write_volatile(p.add(1), ip[1]);
        core::ptr::write_volatile(p.add(2), ip[2]);
        core::ptr::write_volatile(p.add(3), ip[3]);
    }
}

#[inline(always)]
fn is_proxy6(cfg: &DnsConfig, ip: &[u32; 4]) -> bool {
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_WORD && ip[3] == cfg.ip4;
    let native = cfg.has_ip6 != 0
        && ip[0] == cfg.ip6[0]
        && ip[1] == cfg.ip6[1]
        && ip[2] == cfg.ip6[2]
        && ip[3] == cfg.ip6[3];
    mapped || native
}
