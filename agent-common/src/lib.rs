//! Types that cross the kernel boundary. Every struct is `#[repr(C)]`, uses only fixed-width
//! integers (u32 flags instead of bool) and carries a compile-time size assert, so the eBPF
//! programs and the controller agree on every byte and no struct has hidden padding.
#![no_std]

use core::mem::size_of;

/// Deepest cgroup level the kernel programs walk when looking for an agent ancestor.
/// Levels are counted from the cgroup2 root (level 0); the registered-levels mask is a u32.
pub const MAX_CGROUP_LEVEL: u32 = 31;

/// Port rules one compiled prefix can carry after merging every covering rule.
pub const MAX_PORT_RULES: usize = 16;

/// Capacity of the agent map (registered cgroups).
pub const MAX_AGENTS: u32 = 16_384;
/// Capacity of each LPM trie (all policies together).
pub const MAX_PREFIXES_V4: u32 = 262_144;
pub const MAX_PREFIXES_V6: u32 = 262_144;

/// Capacity of the Unix-socket path trie (all policies together).
pub const MAX_UNIX_PATHS: u32 = 16_384;

/// Bytes of `sun_path` in `struct sockaddr_un`.
pub const UNIX_PATH_MAX: usize = 108;

/// Ring buffer size in bytes (power of two, multiple of the page size): about 130,000 events,
/// so a burst of that many decisions is kept even while the reader is starved of CPU.
pub const EVENT_RING_BYTES: u32 = 16 << 20;

/// Decision codes (`Event::verdict`): what the policy says, before the mode is applied.
pub mod verdict {
    pub const ALLOW: u32 = 1;
    pub const DENY: u32 = 2;
}

/// Policy modes (`AgentEntry::mode`, `Event::mode`).
pub mod mode {
    /// Deny what the policy does not allow.
    pub const ENFORCE: u32 = 0;
    /// Decide the same, let everything through, record the would-be verdict.
    pub const AUDIT: u32 = 1;
}

/// Why a verdict was reached (`Event::reason`).
pub mod reason {
    /// A rule allowed it; `Event::rule_id` names the rule.
    pub const RULE: u32 = 1;
    /// No rule covers the destination address.
    pub const NO_ADDRESS_MATCH: u32 = 2;
    /// A rule covers the address, but none allows this port and protocol.
    pub const NO_PORT_MATCH: u32 = 3;
    /// The program could not read what it needs to decide; it failed closed.
    pub const ERROR: u32 = 4;
    /// A socket the connect and send hooks cannot see (raw, ping, packet, ...), not allowed
    /// by the policy's `sockets` list.
    pub const SOCKET_KIND: u32 = 5;
    /// Such a socket, allowed by the policy's `sockets` list.
    pub const SOCKET_ALLOWED: u32 = 6;
    /// The controller has been silent longer than the policy's dead-man time: deny-all.
    pub const DEADMAN: u32 = 7;
    /// A Unix socket path or abstract name that no `unix` entry of the policy allows.
    pub const NO_PATH_MATCH: u32 = 8;
    /// A Unix socket path with a `..` component: never allowed, so a directory entry cannot
    /// be climbed out of.
    pub const PATH_DOTDOT: u32 = 9;
    /// A cgroup below a selector's fixed parent that the controller has not registered yet
    /// (new, recreated, or the agent map was full): judged by the policy's `pending` fallback.
    pub const PENDING_IDENTITY: u32 = 10;
}

/// What an agent falls back to when the controller stops signalling liveness
/// (`AgentEntry::deadman_mode`).
pub mod deadman {
    /// No dead-man switch: the pinned policy keeps enforcing as it is.
    pub const OFF: u32 = 0;
    /// Deny everything.
    pub const DENY_ALL: u32 = 1;
    /// Allow everything and record the would-be verdicts (audit mode).
    pub const AUDIT_ALL: u32 = 2;
}

/// Kinds of socket the connect/sendmsg hooks do not see; bits of `AgentEntry::sockets`.
/// TCP and UDP over IPv4/IPv6, Unix and netlink sockets are not in this list: they need no
/// allowance to be created (TCP and UDP are judged at connect and send).
pub mod sock {
    /// SOCK_RAW in AF_INET/AF_INET6.
    pub const RAW: u32 = 1 << 0;
    /// ICMP / ICMPv6 datagram ("ping") sockets.
    pub const PING: u32 = 1 << 1;
    /// AF_PACKET.
    pub const PACKET: u32 = 1 << 2;
    pub const UDPLITE: u32 = 1 << 3;
    pub const SCTP: u32 = 1 << 4;
    pub const MPTCP: u32 = 1 << 5;
    /// Any other protocol in AF_INET/AF_INET6.
    pub const OTHER_INET: u32 = 1 << 6;
    /// Any other family whose sockets need CAP_NET_RAW (AF_XDP).
    pub const OTHER_FAMILY: u32 = 1 << 7;
}

/// Which program decided (`Event::hook`).
pub mod hook {
    pub const CONNECT4: u32 = 1;
    pub const CONNECT6: u32 = 2;
    pub const SENDMSG4: u32 = 3;
    pub const SENDMSG6: u32 = 4;
    pub const SOCK_CREATE: u32 = 5;
    /// connect() on an AF_UNIX socket (cgroup/connect_unix).
    pub const CONNECT_UNIX: u32 = 6;
    /// sendmsg() with a destination on an AF_UNIX socket (cgroup/sendmsg_unix).
    pub const SENDMSG_UNIX: u32 = 7;
    /// A socket that needs CAP_NET_RAW and that no cgroup hook sees (packet, AF_XDP), judged
    /// when the kernel checks the capability (tracepoint cap_capable).
    pub const SOCKET: u32 = 8;
}

/// What happened to the call (`Event::action`).
pub mod action {
    /// Not recorded: an event from pinned layout v2 or older, whose verdict and mode tell.
    pub const UNRECORDED: u32 = 0;
    /// The call went through.
    pub const ALLOWED: u32 = 1;
    /// The call failed with EPERM (by this hook, or for `hook::SOCKET` by the kernel itself).
    pub const BLOCKED: u32 = 2;
    /// The kernel let the call through against the policy and the calling process was killed
    /// before it returned to user space (`hook::SOCKET`, where no hook can make it fail).
    pub const KILLED: u32 = 3;
}

/// Protocol bits in `PortRule::protocols`.
pub mod proto {
    pub const TCP: u32 = 1 << 0;
    pub const UDP: u32 = 1 << 1;
    pub const ALL: u32 = TCP | UDP;
}

/// Indexes of the per-CPU counters array.
pub mod counter {
    /// Agent decisions that allowed.
    pub const ALLOWED: u32 = 0;
    /// Agent decisions that denied (returned EPERM).
    pub const DENIED: u32 = 1;
    /// Audit-mode decisions that would have denied but let the call through.
    pub const AUDITED: u32 = 2;
    /// Events that could not be reserved in the ring buffer (lost).
    pub const LOST: u32 = 3;
    /// Decisions that failed closed on an internal error.
    pub const ERRORS: u32 = 4;
    /// Written by the controller (CPU 0's slot): how many lost events it has already reported,
    /// so a restarted controller reports only what was lost since.
    pub const LOST_REPORTED: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Value of the agent map, keyed by cgroup id (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentEntry {
    /// Which policy's prefixes to look up (the first 32 bits of every LPM key).
    pub policy_id: u32,
    /// `mode::ENFORCE` or `mode::AUDIT`.
    pub mode: u32,
    /// Bumped on every reload of the policy; copied into events.
    pub policy_version: u32,
    /// `sock::*` bits: socket kinds beyond TCP/UDP this agent may create.
    pub sockets: u32,
    /// Seconds without a controller heartbeat before `deadman_mode` applies (0: never).
    pub deadman_secs: u32,
    /// `deadman::*`
    pub deadman_mode: u32,
    /// `entry::*`: an agent, a watched parent or an exempt cgroup.
    pub kind: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<AgentEntry>() == 32);

/// Kinds of entry in the agent map (`AgentEntry::kind`).
pub mod entry {
    /// A registered agent: the calling task and its descendants are judged by its policy.
    pub const AGENT: u32 = 0;
    /// The fixed parent of a selector (`agentwall` for `agentwall/research-*`): a task in a cgroup
    /// BELOW it that has no nearer entry is not registered yet, and is judged by the fallback
    /// (`mode`: deny, or audit) with reason `PENDING_IDENTITY`. A task in the parent itself is
    /// not an agent.
    pub const WATCH: u32 = 1;
    /// A cgroup below a watched parent that no selector can match: not an agent, no event.
    pub const EXEMPT: u32 = 2;
}

/// Data part of an IPv4 LPM key; the prefix length counts the 32 policy bits too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixV4 {
    /// Policy id, big-endian so the trie matches it bit for bit before the address.
    pub policy: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<PrefixV4>() == 8);

/// Data part of an IPv6 LPM key; the prefix length counts the 32 policy bits too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PrefixV6 {
    pub policy: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<PrefixV6>() == 20);

/// Data part of a Unix-path LPM key. A path name is matched with its terminating NUL (an exact
/// entry) or without it (a directory entry, ending in `/`); an abstract name starts with a NUL
/// byte, as in `sun_path`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixKey {
    pub policy: [u8; 4],
    pub path: [u8; UNIX_PATH_MAX],
}
const _: () = assert!(size_of::<UnixKey>() == 4 + UNIX_PATH_MAX);

/// Value of the Unix-path trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UnixRule {
    /// Index of the policy's `unix` entry.
    pub rule_id: u32,
}
const _: () = assert!(size_of::<UnixRule>() == 4);

/// Bits of an LPM key taken by the policy id.
pub const POLICY_PREFIX_BITS: u32 = 32;

/// One allowed port range for a set of protocols, with the rule that granted it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortRule {
    pub port_lo: u16,
    pub port_hi: u16,
    /// `proto::*` bits.
    pub protocols: u32,
    /// Index of the policy rule this came from (first one when ranges were merged).
    pub rule_id: u32,
}
const _: () = assert!(size_of::<PortRule>() == 12);

/// Value of both LPM tries: the union of every rule that covers the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub count: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}
const _: () = assert!(size_of::<RuleSet>() == 4 + 12 * MAX_PORT_RULES);

impl RuleSet {
    pub const EMPTY: RuleSet = RuleSet {
        count: 0,
        rules: [PortRule {
            port_lo: 0,
            port_hi: 0,
            protocols: 0,
            rule_id: 0,
        }; MAX_PORT_RULES],
    };
}

/// Single-entry array read by every hook: which cgroup levels hold registered agents.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Bit n set: some agent cgroup sits at level n. Zero: no agents, every hook returns at once.
    pub agent_levels: u32,
    pub _reserved: u32,
    /// CLOCK_BOOTTIME (ns) of the controller's last liveness signal, for dead-man switches.
    pub heartbeat_ns: u64,
}
const _: () = assert!(size_of::<Config>() == 16);

/// One decision about an agent's connect or send. Fixed size, written to the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME in nanoseconds.
    pub boot_ns: u64,
    /// Cgroup of the calling task.
    pub cgroup_id: u64,
    /// Registered agent cgroup the caller belongs to (itself or its nearest ancestor).
    pub agent_cgroup_id: u64,
    /// `bpf_get_current_pid_tgid`: tgid in the high half, thread id in the low.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid`: gid in the high half, uid in the low.
    pub uid_gid: u64,
    /// Destination; IPv4 is written as an IPv4-mapped IPv6 address.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u32,
    /// AF_INET or AF_INET6 (the address family the caller used).
    pub family: u32,
    /// IPPROTO_TCP, IPPROTO_UDP, ...
    pub protocol: u32,
    /// `hook::*`
    pub hook: u32,
    /// `verdict::*`: what the policy says.
    pub verdict: u32,
    /// `mode::*`: whether the verdict was enforced.
    pub mode: u32,
    /// `reason::*`
    pub reason: u32,
    /// Rule index when `reason == RULE`, else `u32::MAX`.
    pub rule_id: u32,
    pub policy_id: u32,
    pub policy_version: u32,
    /// `bpf_get_current_comm`.
    pub comm: [u8; 16],
    /// SOCK_STREAM, SOCK_DGRAM, SOCK_RAW... (sock_create events; 0 for the others).
    pub sock_type: u32,
    /// `sock::*` bit of the socket kind (sock_create events; 0 for the others).
    pub sock_kind: u32,
    /// `action::*`
    pub action: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<Event>() == 40 + 16 + 40 + 16 + 16);

/// Bytes of an `Event` as layout v2 and older wrote it (no `action`); such records may still
/// wait in a retired layout's ring.
pub const EVENT_V2_BYTES: usize = size_of::<Event>() - 8;

pub const NO_RULE: u32 = u32::MAX;

/// A decision about a Unix socket: the common event plus the address the caller gave.
/// Told apart from `Event` by its hook (`CONNECT_UNIX`, `SENDMSG_UNIX`) and its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixEvent {
    pub event: Event,
    /// Bytes of `path` the caller passed (its address length minus the family).
    pub path_len: u32,
    /// `sun_path` as the kernel uses it: a path name ends at its first NUL (the rest is
    /// zeroed); an abstract name starts with a NUL and is `path_len` bytes long.
    pub path: [u8; UNIX_PATH_MAX],
}
const _: () = assert!(size_of::<UnixEvent>() == size_of::<Event>() + 4 + UNIX_PATH_MAX);
const _: () = assert!(size_of::<UnixEvent>().is_multiple_of(8));

/// Where the packet-socket guard (`hook::SOCKET`) finds what it reads when an agent's
/// CAP_NET_RAW is checked: syscall numbers of this architecture and byte offsets in kernel
/// structs, from the kernel's BTF. A load-time constant; `enabled == 0` turns the guard off (an
/// architecture it does not know).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CapGuardLayout {
    pub enabled: u32,
    /// socket(2) in the native table; socket and socketcall in the compat (32-bit) table
    /// (`u32::MAX`: none); io_uring_enter (the same number in both).
    pub nr_socket: u32,
    pub nr_compat_socket: u32,
    pub nr_compat_socketcall: u32,
    pub nr_io_uring_enter: u32,
    /// `struct pt_regs`: the syscall number, and the first three arguments in the native and
    /// the compat calling convention.
    pub regs_nr: u32,
    pub regs_args: [u32; 3],
    pub regs_compat_args: [u32; 3],
    /// `task_struct.flags` and the bit of io_uring's worker threads (PF_IO_WORKER).
    pub task_flags: u32,
    pub pf_io_worker: u32,
    /// `task_struct.thread_info.status` and the bit that marks a compat syscall in it.
    pub task_status: u32,
    pub status_compat: u32,
}
const _: () = assert!(size_of::<CapGuardLayout>() == 4 * 16);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), made only of integers, with no padding (checked by the size asserts).
    unsafe impl aya::Pod for AgentEntry {}
    unsafe impl aya::Pod for PrefixV4 {}
    unsafe impl aya::Pod for PrefixV6 {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for UnixKey {}
    unsafe impl aya::Pod for UnixRule {}
    unsafe impl aya::Pod for UnixEvent {}
    unsafe impl aya::Pod for CapGuardLayout {}
}

/// Reads a `T` from the first bytes of `bytes`; `None` if there are fewer.
fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is one of this crate's records, plain integers, for which any
    // bit pattern is valid; read_unaligned because ring records are only 8-byte aligned.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

/// A layout v2 record (8 bytes shorter than the current one of `N` bytes: no `action`) widened
/// to the current layout: a zero `action`, its tail (a Unix event's path) moved behind it.
/// `None` unless `bytes` has a v2 record's length.
fn widen_v2<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    if bytes.len() >= N || bytes.len() + 8 < N || bytes.len() < EVENT_V2_BYTES {
        return None;
    }
    let mut buf = [0u8; N];
    buf[..EVENT_V2_BYTES].copy_from_slice(&bytes[..EVENT_V2_BYTES]);
    // What fits behind the new field (a v2 record is exactly N - 8 bytes).
    buf[EVENT_V2_BYTES + 8..].copy_from_slice(&bytes[EVENT_V2_BYTES..N - 8]);
    Some(buf)
}

impl Event {
    /// Reads an event from ring-buffer bytes (a layout v2 record too); `None` if too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Event> {
        read_record(bytes).or_else(|| read_record(&widen_v2::<{ size_of::<Event>() }>(bytes)?))
    }
}

impl UnixEvent {
    /// Reads a Unix event from ring-buffer bytes (a layout v2 record too); `None` if too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<UnixEvent> {
        read_record(bytes).or_else(|| read_record(&widen_v2::<{ size_of::<UnixEvent>() }>(bytes)?))
    }

    /// The name as the kernel resolves it: a path name up to its first NUL, or an abstract
    /// name (leading NUL included) of `path_len` bytes.
    pub fn name(&self) -> &[u8] {
        let len = (self.path_len as usize).min(UNIX_PATH_MAX);
        let raw = &self.path[..len];
        if raw.first() == Some(&0) {
            return raw;
        }
        match raw.iter().position(|&b| b == 0) {
            Some(end) => &raw[..end],
            None => raw,
        }
    }
}
