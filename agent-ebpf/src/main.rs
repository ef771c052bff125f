//! agentwall's kernel side: cgroup sock_addr programs attached once at the cgroup2 root.
//!
//! Each hook asks one question first: is the CALLING task inside a registered agent cgroup
//! (itself or its nearest registered ancestor)? If not, it returns ALLOW at once, with no event.
//! For an agent it looks the destination up in the agent's policy trie, applies the mode, counts
//! the decision in a per-CPU counter and writes one event to the ring buffer.
#![no_std]
#![no_main]
// atomic_cxchg: the one read-modify-write the rate limiter needs (the nightly is pinned).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod decide;
mod dns;
mod exec;
mod maps;
mod net_raw;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    macros::{btf_tracepoint, cgroup_sock, cgroup_sock_addr},
    programs::{BtfTracePointContext, SockAddrContext, SockContext},
};

use agent_common::hook;

/// A sock_addr program's return values: 1 lets the call through, 0 makes it fail with EPERM.
pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;

// Each entry is thin: decide.rs judges, and a decision it cannot make (an address that cannot
// be read) fails closed there, with its record (reason `error`) written before it returns
// `Err`. The entry then returns its hook's `*_ON_ERROR`. Non-agents never reach an error path
// (identification itself cannot fail), so they always pass.

/// What each hook returns when its decision failed closed.
const CONNECT4_ON_ERROR: i32 = DENY;
const CONNECT6_ON_ERROR: i32 = DENY;
const SENDMSG4_ON_ERROR: i32 = DENY;
const SENDMSG6_ON_ERROR: i32 = DENY;
const SOCK_CREATE_ON_ERROR: i32 = DENY;
const CONNECT_UNIX_ON_ERROR: i32 = DENY;
const SENDMSG_UNIX_ON_ERROR: i32 = DENY;
/// The kernel ignores a tracepoint's return value: the packet-socket guard acts by its record
/// and SIGKILL, the exec tracker by its map (an untracked process is recorded as unknown).
const TRACEPOINT_RET: i32 = 0;
const NET_RAW_USE_ON_ERROR: i32 = TRACEPOINT_RET;
const EXEC_TRACK_ON_ERROR: i32 = TRACEPOINT_RET;
const FORK_TRACK_ON_ERROR: i32 = TRACEPOINT_RET;

/// The verdict as a sock_addr/sock program returns it: spelled out so the verifier sees a
/// return value of exactly 0 or 1.
#[inline(always)]
fn verdict(ret: i32) -> i32 {
    if ret == ALLOW {
        ALLOW
    } else {
        DENY
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match decide::inet4(&ctx, hook::CONNECT4) {
        Ok(v) => verdict(v),
        Err(_) => CONNECT4_ON_ERROR,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match decide::inet6(&ctx, hook::CONNECT6) {
        Ok(v) => verdict(v),
        Err(_) => CONNECT6_ON_ERROR,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    match decide::inet4(&ctx, hook::SENDMSG4) {
        Ok(v) => verdict(v),
        Err(_) => SENDMSG4_ON_ERROR,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    match decide::inet6(&ctx, hook::SENDMSG6) {
        Ok(v) => verdict(v),
        Err(_) => SENDMSG6_ON_ERROR,
    }
}

/// A steered DNS socket's answers read as coming from the resolver it asked (dns.rs). These hooks
/// must return 1: they rewrite, never refuse.
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::restore4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::restore6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    dns::restore4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    dns::restore6(&ctx);
    ALLOW
}

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    match decide::sock_create(&ctx) {
        Ok(v) => verdict(v),
        Err(_) => SOCK_CREATE_ON_ERROR,
    }
}

// aya 0.14 has no attach type for the Unix hooks (cgroup/connect_unix, cgroup/sendmsg_unix, Linux
// 6.7+). The section names below only let aya parse the object; the controller loads these two
// itself with the Unix attach types (agent-userspace/src/datapath/unix_hooks.rs).
#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/connect4")]
pub fn connect_unix(ctx: *mut bpf_sock_addr) -> i32 {
    match decide::unix(&SockAddrContext::new(ctx), hook::CONNECT_UNIX) {
        Ok(v) => verdict(v),
        Err(_) => CONNECT_UNIX_ON_ERROR,
    }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/sendmsg4")]
pub fn sendmsg_unix(ctx: *mut bpf_sock_addr) -> i32 {
    match decide::unix(&SockAddrContext::new(ctx), hook::SENDMSG_UNIX) {
        Ok(v) => verdict(v),
        Err(_) => SENDMSG_UNIX_ON_ERROR,
    }
}

/// A process exec'd: remember its executable (exec.rs).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn exec_track(ctx: BtfTracePointContext) -> i32 {
    match exec::on_exec(&ctx) {
        Ok(()) => TRACEPOINT_RET,
        Err(_) => EXEC_TRACK_ON_ERROR,
    }
}

/// A process forked: the child runs its parent's program until it execs (exec.rs).
#[btf_tracepoint(function = "sched_process_fork")]
pub fn fork_track(ctx: BtfTracePointContext) -> i32 {
    match exec::on_fork(&ctx) {
        Ok(()) => TRACEPOINT_RET,
        Err(_) => FORK_TRACK_ON_ERROR,
    }
}

/// A thread exited: forget the process when it was the leader (exec.rs). Cannot fail: a
/// process the tracker never knew has nothing to forget.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn exit_track(_ctx: BtfTracePointContext) -> i32 {
    exec::on_exit();
    TRACEPOINT_RET
}

/// An agent's CAP_NET_RAW check: packet sockets (see net_raw.rs). A use that cannot be read is
/// judged as the strictest kind, and counted (`counter::ERRORS`).
#[btf_tracepoint(function = "cap_capable")]
pub fn net_raw_use(ctx: BtfTracePointContext) -> i32 {
    match net_raw::cap_check(&ctx) {
        Ok(()) => TRACEPOINT_RET,
        Err(_) => NET_RAW_USE_ON_ERROR,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
