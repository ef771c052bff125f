//! Types that cross the kernel boundary. Every struct is `#[repr(C)]`, uses only fixed-width
//! integers (u32 flags instead of bool) and carries a compile-time size assert, so the eBPF
//! programs and the controller agree on every byte and no struct has hidden padding.
#![no_std]

use core::mem::size_of;

pub mod decide;

/// Deepest cgroup level the kernel programs walk when looking for an agent ancestor.
/// Levels are counted from the cgroup2 root (level 0); the registered-levels mask is a u32.
pub const MAX_CGROUP_LEVEL: u32 = 31;

/// Port rules one compiled prefix can carry after merging every covering rule.
pub const MAX_PORT_RULES: usize = 16;

/// Agents one decision intersects: the calling agent and up to `MAX_AGENT_CHAIN - 1` agents whose
/// cgroups enclose it (delegation). A deeper nesting of agents is denied (`reason::CHAIN_TOO_DEEP`).
pub const MAX_AGENT_CHAIN: usize = 4;

/// Capacity of the agent map (registered cgroups).
pub const MAX_AGENTS: u32 = 16_384;
/// Capacity of each LPM trie (all policies together).
pub const MAX_PREFIXES_V4: u32 = 262_144;
pub const MAX_PREFIXES_V6: u32 = 262_144;

/// Capacity of the Unix-socket path trie (all policies together).
pub const MAX_UNIX_PATHS: u32 = 16_384;

/// Bytes of `sun_path` in `struct sockaddr_un`.
pub const UNIX_PATH_MAX: usize = 108;

/// Ring buffer size in bytes (power of two, multiple of the page size): about 50,000 events of
/// 656 bytes (record and header), so a burst of that many decisions is kept while the reader is
/// starved of CPU or the audit log cannot be written. The controller maps it, so it counts in
/// its resident memory once read through.
pub const EVENT_RING_BYTES: u32 = 32 << 20;

/// Bytes of an executable path kept per process and copied into each event (NUL included).
pub const EXE_PATH_MAX: usize = 256;

/// Capacity of the per-process executable map (live processes on the node).
pub const MAX_EXES: u32 = 65_536;

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
    /// No rule allowed it but a live grant of the agent did; `Event::rule_id` is the grant id.
    pub const GRANT: u32 = 11;
    /// The policy allowed it, but the agent (or an enclosing agent, `Event::decided_by`) had used
    /// up its connections and unconnected sends for now (`AgentEntry::rate_interval_ns`).
    pub const RATE_LIMIT: u32 = 12;
    /// More agents enclose the caller than a decision intersects (`MAX_AGENT_CHAIN`): denied,
    /// whatever the modes, so no agent escapes an enclosing agent by nesting deeper.
    pub const CHAIN_TOO_DEEP: u32 = 13;
    /// A DNS query (TCP or UDP to port 53) steered to agentwall's DNS proxy, which judges the
    /// name.
    pub const DNS_PROXY: u32 = 14;
    /// An address the DNS proxy resolved for this agent, for a name a host rule allows, before
    /// its deadline (`Event::rule_id` is the resolution's id).
    pub const HOST: u32 = 15;
}

/// Bits of `Event::proc_flags`: what the kernel knew about the calling process.
pub mod proc {
    /// `Event::exe` holds the executable the caller's process last exec'd.
    pub const EXE_KNOWN: u32 = 1 << 0;
    /// That path was longer than `EXE_PATH_MAX - 1` bytes and is cut short.
    pub const EXE_TRUNCATED: u32 = 1 << 1;
    /// `Event::parent_exe` holds the parent's executable.
    pub const PARENT_EXE_KNOWN: u32 = 1 << 2;
    pub const PARENT_EXE_TRUNCATED: u32 = 1 << 3;
    /// `Event::ppid` was read.
    pub const PPID_KNOWN: u32 = 1 << 4;
}

/// Bits of `ExePath::flags`.
pub mod exe {
    /// The path is cut short at `EXE_PATH_MAX - 1` bytes.
    pub const TRUNCATED: u32 = 1 << 0;
    /// Seeded by the controller from /proc (the process exec'd before the programs ran).
    pub const FROM_PROC: u32 = 1 << 1;
}

/// Names of the maps and programs, defined once for both sides. The eBPF side spells them as
/// literals (aya's `#[map(name = ..)]` and program names are identifiers, not constants): a unit
/// test of agent-userspace parses the built object and checks it against these lists, both ways.
pub mod names {
    /// Single-entry array: which cgroup levels hold agents (`Config`).
    pub const CONFIG_MAP: &str = "AW_CONFIG";
    /// Cgroup id -> `AgentEntry`.
    pub const AGENTS_MAP: &str = "AW_AGENTS";
    /// Per-policy IPv4 prefixes (LPM trie).
    pub const RULES_V4_MAP: &str = "AW_RULES_V4";
    /// Per-policy IPv6 prefixes (LPM trie).
    pub const RULES_V6_MAP: &str = "AW_RULES_V6";
    /// Per-policy Unix socket paths and abstract names (LPM trie).
    pub const UNIX_MAP: &str = "AW_UNIX";
    /// The ring buffer of decisions.
    pub const EVENTS_MAP: &str = "AW_EVENTS";
    /// Per-CPU counters (`counter::*`).
    pub const COUNTERS_MAP: &str = "AW_COUNTERS";
    /// Single-entry array: CLOCK_BOOTTIME (ns) of the controller's last liveness signal.
    pub const HEARTBEAT_MAP: &str = "AW_HEARTBEAT";
    /// tgid -> the executable it last exec'd (`ExePath`).
    pub const EXES_MAP: &str = "AW_EXES";
    /// Per-CPU room to build one `ExePath` (scratch space: never pinned).
    pub const EXE_SCRATCH_MAP: &str = "AW_EXE_SCRATCH";
    /// Per-agent live grants (LPM tries keyed by `GrantKeyV4`/`GrantKeyV6`, values `GrantSet`).
    pub const GRANTS_V4_MAP: &str = "AW_GRANTS_V4";
    pub const GRANTS_V6_MAP: &str = "AW_GRANTS_V6";
    /// Agent cgroup id -> its rate limiter's state (u64, `decide::rate_take`). Apart from the
    /// agent entry, which the controller rewrites on every task and policy change: a bucket there
    /// would refill each time.
    pub const RATE_MAP: &str = "AW_RATE";
    /// Single-entry array: where agents' DNS is steered (`DnsConfig`).
    pub const DNS_CONFIG_MAP: &str = "AW_DNS_CONFIG";
    /// Socket cookie -> the agent and resolver of a steered DNS socket (`DnsSock`), written by
    /// the programs only: how the proxy knows who asked, and how answers get their source back.
    pub const DNS_SOCKS_MAP: &str = "AW_DNS_SOCKS";

    /// Every map that is pinned, so that enforcement outlives the controller.
    pub const PINNED_MAPS: [&str; 14] = [
        CONFIG_MAP,
        AGENTS_MAP,
        RULES_V4_MAP,
        RULES_V6_MAP,
        UNIX_MAP,
        EVENTS_MAP,
        COUNTERS_MAP,
        HEARTBEAT_MAP,
        EXES_MAP,
        GRANTS_V4_MAP,
        GRANTS_V6_MAP,
        RATE_MAP,
        DNS_CONFIG_MAP,
        DNS_SOCKS_MAP,
    ];
    /// Every map the eBPF object defines.
    pub const ALL_MAPS: [&str; 15] = [
        CONFIG_MAP,
        AGENTS_MAP,
        RULES_V4_MAP,
        RULES_V6_MAP,
        UNIX_MAP,
        EVENTS_MAP,
        COUNTERS_MAP,
        HEARTBEAT_MAP,
        EXES_MAP,
        EXE_SCRATCH_MAP,
        GRANTS_V4_MAP,
        GRANTS_V6_MAP,
        RATE_MAP,
        DNS_CONFIG_MAP,
        DNS_SOCKS_MAP,
    ];

    /// cgroup/connect4, connect6, sendmsg4, sendmsg6.
    pub const CONNECT4_PROGRAM: &str = "connect4";
    pub const CONNECT6_PROGRAM: &str = "connect6";
    pub const SENDMSG4_PROGRAM: &str = "sendmsg4";
    pub const SENDMSG6_PROGRAM: &str = "sendmsg6";
    /// cgroup/recvmsg4, recvmsg6, getpeername4, getpeername6: a steered DNS socket sees its
    /// resolver's address, not the proxy's.
    pub const RECVMSG4_PROGRAM: &str = "recvmsg4";
    pub const RECVMSG6_PROGRAM: &str = "recvmsg6";
    pub const GETPEERNAME4_PROGRAM: &str = "getpeername4";
    pub const GETPEERNAME6_PROGRAM: &str = "getpeername6";
    /// cgroup/sock_create: the socket-creation guard (inet families).
    pub const SOCK_CREATE_PROGRAM: &str = "sock_create";
    /// cgroup/connect_unix, cgroup/sendmsg_unix (Linux 6.7+), loaded by the controller itself.
    pub const CONNECT_UNIX_PROGRAM: &str = "connect_unix";
    pub const SENDMSG_UNIX_PROGRAM: &str = "sendmsg_unix";
    /// tp_btf/cap_capable: the packet-socket guard.
    pub const NET_RAW_PROGRAM: &str = "net_raw_use";
    pub const NET_RAW_TRACEPOINT: &str = "cap_capable";
    /// tp_btf/sched_process_exec: records the executable.
    pub const EXEC_PROGRAM: &str = "exec_track";
    pub const EXEC_TRACEPOINT: &str = "sched_process_exec";
    /// tp_btf/sched_process_exit: forgets it when the thread-group leader exits.
    pub const EXIT_PROGRAM: &str = "exit_track";
    pub const EXIT_TRACEPOINT: &str = "sched_process_exit";
    /// tp_btf/sched_process_fork: a new process runs its parent's program until it execs.
    pub const FORK_PROGRAM: &str = "fork_track";
    pub const FORK_TRACEPOINT: &str = "sched_process_fork";

    /// The sock_addr programs aya loads and attaches.
    pub const SOCK_ADDR_PROGRAMS: [&str; 8] = [
        CONNECT4_PROGRAM,
        CONNECT6_PROGRAM,
        SENDMSG4_PROGRAM,
        SENDMSG6_PROGRAM,
        RECVMSG4_PROGRAM,
        RECVMSG6_PROGRAM,
        GETPEERNAME4_PROGRAM,
        GETPEERNAME6_PROGRAM,
    ];
    /// Every cgroup program aya loads and attaches (the Unix-socket ones are `UNIX_PROGRAMS`).
    pub const CGROUP_PROGRAMS: [&str; 9] = [
        CONNECT4_PROGRAM,
        CONNECT6_PROGRAM,
        SENDMSG4_PROGRAM,
        SENDMSG6_PROGRAM,
        RECVMSG4_PROGRAM,
        RECVMSG6_PROGRAM,
        GETPEERNAME4_PROGRAM,
        GETPEERNAME6_PROGRAM,
        SOCK_CREATE_PROGRAM,
    ];
    pub const UNIX_PROGRAMS: [&str; 2] = [CONNECT_UNIX_PROGRAM, SENDMSG_UNIX_PROGRAM];
    /// The exec tracker's programs, with their tracepoints.
    pub const EXEC_PROGRAMS: [(&str, &str); 3] = [
        (EXEC_PROGRAM, EXEC_TRACEPOINT),
        (FORK_PROGRAM, FORK_TRACEPOINT),
        (EXIT_PROGRAM, EXIT_TRACEPOINT),
    ];
    /// Every program the eBPF object defines.
    pub const ALL_PROGRAMS: [&str; 15] = [
        CONNECT4_PROGRAM,
        CONNECT6_PROGRAM,
        SENDMSG4_PROGRAM,
        SENDMSG6_PROGRAM,
        RECVMSG4_PROGRAM,
        RECVMSG6_PROGRAM,
        GETPEERNAME4_PROGRAM,
        GETPEERNAME6_PROGRAM,
        SOCK_CREATE_PROGRAM,
        CONNECT_UNIX_PROGRAM,
        SENDMSG_UNIX_PROGRAM,
        NET_RAW_PROGRAM,
        EXEC_PROGRAM,
        FORK_PROGRAM,
        EXIT_PROGRAM,
    ];

    /// Whether `name` is in `list` (usable in const context).
    const fn contains(list: &[&str], name: &str) -> bool {
        let mut i = 0;
        while i < list.len() {
            if eq(list[i], name) {
                return true;
            }
            i += 1;
        }
        false
    }

    const fn eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    const fn all_in(part: &[&str], whole: &[&str]) -> bool {
        let mut i = 0;
        while i < part.len() {
            if !contains(whole, part[i]) {
                return false;
            }
            i += 1;
        }
        true
    }

    // The sub-lists are parts of the whole ones, and the whole ones have no name twice.
    const _: () =
        assert!(all_in(&PINNED_MAPS, &ALL_MAPS) && !contains(&PINNED_MAPS, EXE_SCRATCH_MAP));
    const _: () = assert!(all_in(&CGROUP_PROGRAMS, &ALL_PROGRAMS));
    const _: () = assert!(all_in(&SOCK_ADDR_PROGRAMS, &CGROUP_PROGRAMS));
    const _: () = assert!(all_in(&UNIX_PROGRAMS, &ALL_PROGRAMS));
    const _: () = assert!(contains(&ALL_PROGRAMS, NET_RAW_PROGRAM));
    const _: () = assert!(
        contains(&ALL_PROGRAMS, EXEC_PROGRAM)
            && contains(&ALL_PROGRAMS, FORK_PROGRAM)
            && contains(&ALL_PROGRAMS, EXIT_PROGRAM)
    );
    const _: () = assert!(distinct(&ALL_MAPS) && distinct(&ALL_PROGRAMS));

    const fn distinct(list: &[&str]) -> bool {
        let mut i = 0;
        while i < list.len() {
            let mut j = i + 1;
            while j < list.len() {
                if eq(list[i], list[j]) {
                    return false;
                }
                j += 1;
            }
            i += 1;
        }
        true
    }
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
    /// The agent's current task (`Event::task_slot`), 0 for none. The controller names slots.
    pub task_slot: u32,
    /// CLOCK_BOOTTIME (ns) at which the task ends by itself (0: no ttl); the kernel stops
    /// stamping the slot after it, also while the controller is down.
    pub task_deadline_ns: u64,
    /// Rate limit of connections and unconnected sends together: one is allowed every this
    /// many ns on average (0: no limit).
    pub rate_interval_ns: u64,
    /// ... with bursts of up to `rate_burst_ns / rate_interval_ns` at once.
    pub rate_burst_ns: u64,
    /// Agents whose cgroups enclose this one, nearest first, 0 behind the last (delegation):
    /// each judges this entry's calls too. Kept by the controller, which knows the tree, so the
    /// programs walk no further than the nearest entry.
    pub enclosing: [u64; MAX_AGENT_CHAIN - 1],
    /// `entry_flags::*`
    pub flags: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<AgentEntry>() == 56 + 8 * (MAX_AGENT_CHAIN - 1) + 8);

/// Bits of `AgentEntry::flags`.
pub mod entry_flags {
    /// More agents enclose this one than `enclosing` holds: its calls are denied
    /// (`reason::CHAIN_TOO_DEEP`), so no agent escapes an enclosing one by nesting deeper.
    pub const CHAIN_TOO_DEEP: u32 = 1 << 0;
}

/// Capacity of each grant trie (all agents together).
pub const MAX_GRANT_PREFIXES: u32 = 16_384;
/// Grants one prefix of one agent can carry after merging every covering grant.
pub const MAX_GRANTS_PER_PREFIX: usize = 8;
/// Bits of a grant key taken by the agent's cgroup id.
pub const GRANT_AGENT_BITS: u32 = 64;

/// Data part of an IPv4 grant-trie key: the agent's cgroup id (big-endian, so the trie matches
/// it bit for bit first), then the address. The prefix length counts the 64 agent bits too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantKeyV4 {
    pub agent: [u8; 8],
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<GrantKeyV4>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantKeyV6 {
    pub agent: [u8; 8],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<GrantKeyV6>() == 24);

/// One live grant: ports and protocols until a deadline the kernel checks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Grant {
    /// CLOCK_BOOTTIME (ns) after which the grant allows nothing.
    pub deadline_ns: u64,
    /// The controller's grant id (`Event::rule_id` when reason is `GRANT`).
    pub grant_id: u32,
    /// `proto::*` bits.
    pub protocols: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    /// `level::*` bits: the chain levels the item answers for. A grant, and an address resolved
    /// for the agent itself, answer for the agent whose key holds them (`level::OWN`); an
    /// address resolved for a sub-agent also carries the bit of each enclosing agent whose host
    /// rule allowed the name (that agent's judgement of the sub-agent's call reads the
    /// sub-agent's key too).
    pub levels: u32,
}
const _: () = assert!(size_of::<Grant>() == 24);

/// Chain levels of a `Grant` (bit n: the n-th agent of the caller's chain, 0 the caller).
pub mod level {
    pub const OWN: u32 = 1 << 0;
    /// The bit of chain level `n`.
    #[inline(always)]
    pub const fn bit(n: u32) -> u32 {
        1 << n
    }
}

/// `Grant::grant_id` values with this bit set are DNS resolutions (reason `HOST`), not grants.
pub const RESOLVED_ID_BIT: u32 = 1 << 31;

/// Value of the grant tries: every grant of the agent that covers the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantSet {
    pub count: u32,
    pub _reserved: u32,
    pub grants: [Grant; MAX_GRANTS_PER_PREFIX],
}
const _: () = assert!(size_of::<GrantSet>() == 8 + 24 * MAX_GRANTS_PER_PREFIX);

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
    /// Bit n set: some entry (an agent, a watched parent, an exempt cgroup) sits at level n.
    /// Zero: no entries, every hook returns at once.
    pub agent_levels: u32,
    pub _reserved: u32,
    /// Unused since layout v4 (the heartbeat has its own map, `names::HEARTBEAT_MAP`, so the
    /// task that beats never writes the agent levels).
    pub _reserved_heartbeat: u64,
}
const _: () = assert!(size_of::<Config>() == 16);

/// Single-entry array (`names::DNS_CONFIG_MAP`): where agents' DNS goes. Addresses and port are
/// as `bpf_sock_addr` holds them (network byte order in memory).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsConfig {
    /// Non-zero: an agent's TCP and UDP to port 53 is steered to the proxy. Zero: judged by its
    /// policy like any other port.
    pub enabled: u32,
    /// The proxy's port, network byte order in the low 16 bits (as `user_port`).
    pub port: u32,
    /// The proxy's IPv4 address (as `user_ip4`).
    pub ip4: u32,
    /// Non-zero: the proxy also listens at `ip6`; else an agent's IPv6 DNS is denied.
    pub has_ip6: u32,
    /// The proxy's IPv6 address (as `user_ip6`).
    pub ip6: [u32; 4],
}
const _: () = assert!(size_of::<DnsConfig>() == 32);

/// Value of `names::DNS_SOCKS_MAP` (keyed by socket cookie): a socket whose DNS was steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsSock {
    /// The agent that asked (its entry's cgroup id).
    pub agent: u64,
    /// The resolver the agent addressed, as `user_ip6` holds it (an IPv4 one as
    /// `::ffff:a.b.c.d`): what recvmsg and getpeername give back.
    pub addr: [u32; 4],
    /// Its port, network byte order in the low 16 bits.
    pub port: u32,
    /// `AF_INET` or `AF_INET6`: the family of the socket's own calls.
    pub family: u32,
}
const _: () = assert!(size_of::<DnsSock>() == 32);

/// Steered DNS sockets remembered at once (an LRU map: a closed socket's entry ages out).
pub const MAX_DNS_SOCKS: u32 = 65_536;

/// Value of the executable map (`names::EXES_MAP`), keyed by tgid (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExePath {
    /// `exe::*`
    pub flags: u32,
    pub _reserved: u32,
    /// The path given to execve (bprm->filename), NUL-terminated, zero-filled behind.
    pub path: [u8; EXE_PATH_MAX],
}
const _: () = assert!(size_of::<ExePath>() == 8 + EXE_PATH_MAX);

/// Where the exec tracker and the hooks find what they read in kernel structs: byte offsets from
/// the kernel's BTF. A load-time constant; `enabled == 0` leaves every process unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProcLayout {
    pub enabled: u32,
    /// `linux_binprm.filename` (const char *).
    pub bprm_filename: u32,
    /// `task_struct.real_parent` (struct task_struct *).
    pub task_real_parent: u32,
    /// `task_struct.tgid` (pid_t).
    pub task_tgid: u32,
    /// `task_struct.pid` (pid_t).
    pub task_pid: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<ProcLayout>() == 24);

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
    /// The agent's task slot at decision time (`AgentEntry::task_slot` while its deadline has
    /// not passed), 0 for none. Layout v5; 0 in records of older layouts.
    pub task_slot: u32,
    /// Parent process (`task->real_parent->tgid`) at decision time; valid with
    /// `proc::PPID_KNOWN`.
    pub ppid: u32,
    /// `proc::*`
    pub proc_flags: u32,
    /// The caller's executable, copied at decision time from the exec tracker's map
    /// (NUL-terminated); valid with `proc::EXE_KNOWN`.
    pub exe: [u8; EXE_PATH_MAX],
    /// The parent's executable, likewise; valid with `proc::PARENT_EXE_KNOWN`.
    pub parent_exe: [u8; EXE_PATH_MAX],
    /// Agents whose cgroups enclose `agent_cgroup_id`'s, nearest first, 0 behind the last: each
    /// judged the call too (delegation). Layout v6; zeros in records of older layouts.
    pub chain: [u64; MAX_AGENT_CHAIN - 1],
    /// Whose verdict this is: 0 the agent itself, n the agent `chain[n - 1]`.
    pub decided_by: u32,
    pub _reserved: u32,
}
const _: () = assert!(size_of::<Event>() == EVENT_V5_BYTES + 8 * (MAX_AGENT_CHAIN - 1) + 8);
const _: () = assert!(size_of::<Event>().is_multiple_of(8));

/// Bytes of an `Event` as layout v2 and older wrote it (no `action`); such records may still
/// wait in a retired layout's ring.
pub const EVENT_V2_BYTES: usize = EVENT_V3_BYTES - 8;
/// Bytes of an `Event` as layout v3 wrote it (no process fields).
pub const EVENT_V3_BYTES: usize = 40 + 16 + 40 + 16 + 16;
/// Bytes of an `Event` as layouts v4 and v5 wrote it (no chain of agents).
pub const EVENT_V5_BYTES: usize = EVENT_V3_BYTES + 8 + 2 * EXE_PATH_MAX;

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
    unsafe impl aya::Pod for GrantKeyV4 {}
    unsafe impl aya::Pod for GrantKeyV6 {}
    unsafe impl aya::Pod for Grant {}
    unsafe impl aya::Pod for GrantSet {}
    unsafe impl aya::Pod for PrefixV4 {}
    unsafe impl aya::Pod for PrefixV6 {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for DnsConfig {}
    unsafe impl aya::Pod for DnsSock {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for UnixKey {}
    unsafe impl aya::Pod for UnixRule {}
    unsafe impl aya::Pod for UnixEvent {}
    unsafe impl aya::Pod for CapGuardLayout {}
    unsafe impl aya::Pod for ExePath {}
    unsafe impl aya::Pod for ProcLayout {}
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

/// The layout of a ring record of exactly `len` bytes: how many bytes of the current `Event`
/// it holds (older layouts wrote a prefix of it), and the bytes behind that (a Unix event's
/// path). Records are exactly as long as their layout wrote them; any other length is `None`.
fn record_layout(len: usize, unix: bool) -> Option<(usize, usize)> {
    let tail = if unix {
        size_of::<UnixEvent>() - size_of::<Event>()
    } else {
        0
    };
    [
        size_of::<Event>(),
        EVENT_V5_BYTES,
        EVENT_V3_BYTES,
        EVENT_V2_BYTES,
    ]
    .into_iter()
    .find(|head| len == head + tail)
    .map(|head| (head, tail))
}

/// A record of any layout widened to the current one: its event prefix, zeros for the fields
/// its layout did not have, its tail (a Unix event's path) behind. `None` for a length no
/// layout writes.
fn widen<const N: usize>(bytes: &[u8], unix: bool) -> Option<[u8; N]> {
    let (head, tail) = record_layout(bytes.len(), unix)?;
    let mut buf = [0u8; N];
    buf[..head].copy_from_slice(&bytes[..head]);
    buf[N - tail..].copy_from_slice(&bytes[head..head + tail]);
    Some(buf)
}

/// The hook a record of any layout names (its offset is the same in all of them).
fn record_hook(bytes: &[u8]) -> Option<u32> {
    const AT: usize = core::mem::offset_of!(Event, hook);
    let b = bytes.get(AT..AT + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Whether a hook writes a `UnixEvent`.
pub fn is_unix_hook(hook: u32) -> bool {
    matches!(hook, hook::CONNECT_UNIX | hook::SENDMSG_UNIX)
}

impl Event {
    /// Reads the event of a ring record of any layout (v2 and v3 records are widened: zero
    /// `action` and process fields); `None` for a length no layout writes. For a Unix hook's
    /// record this is its `event` part.
    pub fn from_bytes(bytes: &[u8]) -> Option<Event> {
        if is_unix_hook(record_hook(bytes)?) {
            return UnixEvent::from_bytes(bytes).map(|u| u.event);
        }
        if bytes.len() == size_of::<Event>() {
            // The current layout: no widening copy.
            return read_record(bytes);
        }
        read_record(&widen::<{ size_of::<Event>() }>(bytes, false)?)
    }
}

impl UnixEvent {
    /// Reads a Unix event from a ring record of any layout; `None` for a length no layout
    /// writes.
    pub fn from_bytes(bytes: &[u8]) -> Option<UnixEvent> {
        if bytes.len() == size_of::<UnixEvent>() {
            return read_record(bytes);
        }
        read_record(&widen::<{ size_of::<UnixEvent>() }>(bytes, true)?)
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
