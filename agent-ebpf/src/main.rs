//! agentwall's kernel side: cgroup sock_addr programs attached once at the cgroup2 root.
//!
//! Each hook asks one question first: is the CALLING task inside a registered agent cgroup
//! (itself or its nearest registered ancestor)? If not, it returns ALLOW at once, with no event.
//! For an agent it looks the destination up in the agent's policy trie, applies the mode, counts
//! the decision in a per-CPU counter and writes one event to the ring buffer.
#![no_std]
#![no_main]

mod decide;
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

// What each hook returns when an agent's decision cannot be made: fail closed. Non-agents never
// reach an error path (identification itself cannot fail), so they always pass.
const CONNECT4_ON_ERROR: i32 = DENY;
const CONNECT6_ON_ERROR: i32 = DENY;
const SENDMSG4_ON_ERROR: i32 = DENY;
const SENDMSG6_ON_ERROR: i32 = DENY;
const SOCK_CREATE_ON_ERROR: i32 = DENY;
const CONNECT_UNIX_ON_ERROR: i32 = DENY;
const SENDMSG_UNIX_ON_ERROR: i32 = DENY;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match decide::inet4(&ctx, hook::CONNECT4) {
        // Spelled out so the verifier sees a return value of exactly 0 or 1.
        Ok(ALLOW) => ALLOW,
        Ok(_) => DENY,
        Err(_) => CONNECT4_ON_ERROR,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match decide::inet6(&ctx, hook::CONNECT6) {
        // Spelled out so the verifier sees a return value of exactly 0 or 1.
        Ok(ALLOW) => ALLOW,
        Ok(_) => DENY,
        Err(_) => CONNECT6_ON_ERROR,
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    match decide::inet4(&ctx, hook::SENDMSG4) {
        // Spelled out so the verifier sees a return value of exactly 0 or 1.
        Ok(ALLOW) => ALLOW,
        Ok(_) => DENY,
        Err(_) => SENDMSG4_ON_ERROR,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    match decide::inet6(&ctx, hook::SENDMSG6) {
        // Spelled out so the verifier sees a return value of exactly 0 or 1.
        Ok(ALLOW) => ALLOW,
        Ok(_) => DENY,
        Err(_) => SENDMSG6_ON_ERROR,
    }
}

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    match decide::sock_create(&ctx) {
        Ok(ALLOW) => ALLOW,
        Ok(_) => DENY,
        Err(_) => SOCK_CREATE_ON_ERROR,
    }
}

// aya 0.14 has no attach type for the Unix hooks (cgroup/connect_unix, cgroup/sendmsg_unix, Linux
// 6.7+). The section names below only let aya parse the object; the controller loads these two
// itself with the Unix attach types (agent-userspace/src/unix_hooks.rs).
#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/connect4")]
pub fn connect_unix(ctx: *mut bpf_sock_addr) -> i32 {
    match decide::unix(&SockAddrContext::new(ctx), hook::CONNECT_UNIX) {
        // Spelled out so the verifier sees a return value of exactly 0 or 1.
        Ok(ALLOW) => ALLOW,
        Ok(_) => DENY,
        Err(_) => CONNECT_UNIX_ON_ERROR,
    }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/sendmsg4")]
pub fn sendmsg_unix(ctx: *mut bpf_sock_addr) -> i32 {
    match decide::unix(&SockAddrContext::new(ctx), hook::SENDMSG_UNIX) {
        // Spelled out so the verifier sees a return value of exactly 0 or 1.
        Ok(ALLOW) => ALLOW,
        Ok(_) => DENY,
        Err(_) => SENDMSG_UNIX_ON_ERROR,
    }
}

/// An agent's CAP_NET_RAW check: packet sockets (see net_raw.rs). A tracepoint's return value
/// is ignored: its failures are counted (`counter::ERRORS`), and a use that cannot be read is
/// judged as the strictest kind.
#[btf_tracepoint(function = "cap_capable")]
pub fn net_raw_use(ctx: BtfTracePointContext) -> i32 {
    net_raw::cap_check(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
