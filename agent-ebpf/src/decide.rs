//! The one place a decision is made: identify the agent, look up the destination, apply the mode,
//! count it and report it.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
        bpf_probe_read_kernel,
        generated::{bpf_probe_read_kernel as bpf_probe_read_kernel_raw, bpf_send_signal},
    },
    maps::{lpm_trie::Key, LpmTrie},
    programs::{SockAddrContext, SockContext},
};

use core::intrinsics::{atomic_cxchg, AtomicOrdering};

use agent_common::{
    action, counter, deadman,
    decide::{fold_chain, match_grants, match_ports, rate_take, with_grant, Judged, NO_ADDRESS},
    entry, entry_flags, hook, level, mode, reason, sock, verdict, AgentEntry, Event, GrantKeyV4,
    GrantKeyV6, GrantSet, PrefixV4, PrefixV6, UnixEvent, UnixKey, GRANT_AGENT_BITS,
    MAX_AGENT_CHAIN, MAX_CGROUP_LEVEL, NO_RULE, POLICY_PREFIX_BITS, UNIX_PATH_MAX,
};

use crate::{
    dns::{self, Steer},
    exec,
    maps::{
        count, AGENTS, CONFIG, EVENTS, GRANTS_V4, GRANTS_V6, HEARTBEAT, RATE, RULES_V4, RULES_V6,
        UNIX_PATHS,
    },
    ALLOW, DENY,
};

/// Enclosing agents a decision intersects beside the caller's own.
const CHAIN: usize = MAX_AGENT_CHAIN - 1;

/// The hook could not read what it needs to decide: it judged the call the strictest way and
/// its record has been written, or counted lost (reason `error`; for the packet-socket guard,
/// the strictest socket kind). Made only here, so an `Err` always means that; the hook then
/// returns its `*_ON_ERROR` value.
pub(crate) struct FailedClosed(());

/// What a hook that judges returns: `ALLOW` or `DENY`, or a decision that failed closed.
pub(crate) type Decision = Result<i32, FailedClosed>;

/// Load-time constant: wake the consumer only once this many bytes are pending. Below it events
/// are submitted without a wake-up and the controller drains them on a short timer
/// (a wake-up per event costs +61 % per TCP connect here, see MEASURED.md).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 256 * 1024;

/// Bytes of the header the ring puts before each record.
const RECORD_HEADER_BYTES: u64 = 8;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const AF_UNIX: u32 = 1;
const AF_NETLINK: u32 = 16;
const AF_PACKET: u32 = 17;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
/// The obsolete AF_INET/SOCK_PACKET form of a packet socket (the kernel makes it AF_PACKET).
const SOCK_PACKET: u32 = 10;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
const IPPROTO_SCTP: u32 = 132;
const IPPROTO_UDPLITE: u32 = 136;
const IPPROTO_MPTCP: u32 = 262;

/// Who is calling, when it is someone the policy judges.
pub(crate) struct Caller {
    /// The entry's cgroup (`Event::agent_cgroup_id`).
    pub cgroup: u64,
    /// A copy taken once: the controller updates entries in place (a policy switch, a task),
    /// and a decision must not mix the fields of two versions. Its `enclosing` list is the
    /// chain of agents that judge the call too.
    pub entry: AgentEntry,
    /// Below a watched parent with no registration yet: judged by the fallback (and the
    /// agents enclosing the watched parent).
    pub pending: bool,
}

impl Caller {
    /// Nobody yet: `find_agent` fills it.
    #[inline(always)]
    pub(crate) fn new() -> Caller {
        Caller {
            cgroup: 0,
            entry: EMPTY_ENTRY,
            pending: false,
        }
    }

    /// Agents enclosing the caller's (delegation): `entry.enclosing`, written by the controller.
    #[inline(always)]
    fn nested(&self) -> bool {
        self.entry.enclosing[0] != 0
    }
}

/// The entry the calling task falls under: the deepest one among its own cgroup and its
/// ancestors decides. An agent is judged by its policy; a task strictly below a watched parent
/// is pending; an exempt cgroup, or a task in a watched parent itself, is not an agent of its
/// own and falls under the nearest agent enclosing it, if any. Only levels that hold some entry
/// are probed, and only a found entry costs more.
///
/// Fills `c` (the hook's own, so the entry is copied once) and says whether it found one. A
/// function of its own (a BPF-to-BPF call), so its unrolled walk takes no room in the hook's
/// stack frame.
#[inline(never)]
pub(crate) fn find_agent(c: &mut Caller) -> bool {
    let Some(config) = CONFIG.get(0) else {
        return false;
    };
    let levels = config.agent_levels;
    if levels == 0 {
        return false;
    }
    // Deepest first, so a nested agent overrides its parent's registration. The level is a
    // constant in each (unrolled) step: with a computed start the verifier walks the loop once
    // per possible start, which made loading these programs take 0.3 s each.
    let mut found = 0;
    let mut level = MAX_CGROUP_LEVEL as i32;
    while level >= 0 {
        if levels & (1u32 << level) != 0 {
            // 0 when the task's cgroup is shallower than `level`.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if id != 0 {
                if let Some(e) = unsafe { AGENTS.get(id) } {
                    // SAFETY: a valid map value; read once, as a whole.
                    c.entry = unsafe { core::ptr::read_volatile(e) };
                    c.cgroup = id;
                    found = level + 1;
                    break;
                }
            }
        }
        level -= 1;
    }
    if found == 0 {
        return false;
    }
    match c.entry.kind {
        entry::AGENT => true,
        // Strictly below the watched cgroup: the task has an ancestor one level deeper.
        entry::WATCH if unsafe { bpf_get_current_ancestor_cgroup_id(found) } != 0 => {
            c.pending = true;
            true
        }
        // The watched parent itself, an exempt cgroup, or a kind this program does not know:
        // not an agent of its own; the nearest agent enclosing it judges it.
        _ => {
            let id = c.entry.enclosing[0];
            if id == 0 {
                return false;
            }
            match unsafe { AGENTS.get(id) } {
                Some(e) => {
                    // SAFETY: as above.
                    c.entry = unsafe { core::ptr::read_volatile(e) };
                    c.cgroup = id;
                    c.entry.kind == entry::AGENT
                }
                None => false,
            }
        }
    }
}

const EMPTY_ENTRY: AgentEntry = AgentEntry {
    policy_id: 0,
    mode: 0,
    policy_version: 0,
    sockets: 0,
    deadman_secs: 0,
    deadman_mode: 0,
    kind: 0,
    task_slot: 0,
    task_deadline_ns: 0,
    rate_interval_ns: 0,
    rate_burst_ns: 0,
    enclosing: [0; CHAIN],
    flags: 0,
    _reserved: 0,
};

/// What a chain of agents is asked about: each kind of call answers for one agent's policy
/// (and grants). One type per kind, so each gets its own `judge`, with a stack frame no larger
/// than its own lookups need.
trait Ask {
    fn verdict(&mut self, e: &AgentEntry, cgroup: u64) -> (u32, u32, u32);

    /// An enclosing agent's judgement also reads the CALLER's key for the items that answer
    /// for its level (`level_bit`): an address the DNS proxy resolved for the caller under a
    /// host rule of that enclosing agent. Only destinations have such items.
    #[inline(always)]
    fn for_level(&mut self, _caller: u64, _level_bit: u32) -> Option<u32> {
        None
    }
}

/// An IPv4 destination (or an IPv4-mapped IPv6 one).
struct AskV4 {
    ip: [u8; 4],
    port: u16,
    protocol: u32,
}

impl Ask for AskV4 {
    #[inline(always)]
    fn verdict(&mut self, e: &AgentEntry, cgroup: u64) -> (u32, u32, u32) {
        policy_v4(e, cgroup, self.ip, self.port, self.protocol)
    }

    #[inline(always)]
    fn for_level(&mut self, caller: u64, level_bit: u32) -> Option<u32> {
        grant_for(
            &GRANTS_V4,
            grant_key_v4(caller, self.ip),
            self.port,
            self.protocol,
            level_bit,
        )
    }
}

struct AskV6 {
    addr: [u8; 16],
    port: u16,
    protocol: u32,
}

impl Ask for AskV6 {
    #[inline(always)]
    fn verdict(&mut self, e: &AgentEntry, cgroup: u64) -> (u32, u32, u32) {
        policy_v6(e, cgroup, self.addr, self.port, self.protocol)
    }

    #[inline(always)]
    fn for_level(&mut self, caller: u64, level_bit: u32) -> Option<u32> {
        grant_for(
            &GRANTS_V6,
            grant_key_v6(caller, self.addr),
            self.port,
            self.protocol,
            level_bit,
        )
    }
}

/// A socket kind (`sock::*`): the agent's `sockets` list.
struct AskSocket(u32);

impl Ask for AskSocket {
    #[inline(always)]
    fn verdict(&mut self, e: &AgentEntry, _: u64) -> (u32, u32, u32) {
        if e.sockets & self.0 != 0 {
            (verdict::ALLOW, reason::SOCKET_ALLOWED, NO_RULE)
        } else {
            (verdict::DENY, reason::SOCKET_KIND, NO_RULE)
        }
    }
}

/// A Unix socket name: the trie key (its policy part is set per agent), and whether the path
/// climbs with `..` (denied whatever the policy).
struct AskUnix<'a> {
    key: &'a mut Key<UnixKey>,
    dotdot: bool,
}

impl Ask for AskUnix<'_> {
    #[inline(always)]
    fn verdict(&mut self, e: &AgentEntry, _: u64) -> (u32, u32, u32) {
        if self.dotdot {
            return (verdict::DENY, reason::PATH_DOTDOT, NO_RULE);
        }
        self.key.data.policy = e.policy_id.to_be_bytes();
        match UNIX_PATHS.get(&*self.key) {
            Some(rule) => (verdict::ALLOW, reason::RULE, rule.rule_id),
            None => (verdict::DENY, reason::NO_PATH_MATCH, NO_RULE),
        }
    }
}

/// The caller's chain of agents judges `ask`: the caller (or the pending fallback), then each
/// enclosing agent, stopping at the first enforced denial. Like every step of a decision, a
/// function of its own (a BPF-to-BPF call): the hook's 512-byte stack then holds only what
/// lives across the steps (the caller, the destination).
#[inline(always)]
fn judge<A: Ask>(c: &Caller, ask: &mut A) -> Judged {
    let mut out = Judged {
        verdict: verdict::DENY,
        reason: reason::ERROR,
        rule_id: NO_RULE,
        mode: mode::ENFORCE,
        level: 0,
    };
    // The verdict travels back as the return value: LLVM drops a return value no caller uses,
    // and r0 may then hold a stack pointer at exit.
    out.verdict = judge_into(c, ask, &mut out);
    out
}

/// `judge`, writing its answer to `out` and returning its verdict. Every BPF-to-BPF function
/// here returns a scalar its callers use: one returning a struct, or nothing, may leave a
/// stack pointer in r0, which the verifier refuses ("cannot return stack pointer to the
/// caller").
#[inline(never)]
fn judge_into<A: Ask>(c: &Caller, ask: &mut A, out: &mut Judged) -> u32 {
    *out = judge_chain(c, ask);
    out.verdict
}

#[inline(always)]
fn judge_chain<A: Ask>(c: &Caller, ask: &mut A) -> Judged {
    let own = if c.pending {
        (verdict::DENY, reason::PENDING_IDENTITY, NO_RULE)
    } else {
        ask.verdict(&c.entry, c.cgroup)
    };
    if c.entry.flags & entry_flags::CHAIN_TOO_DEEP != 0 {
        return Judged {
            verdict: verdict::DENY,
            reason: reason::CHAIN_TOO_DEEP,
            rule_id: NO_RULE,
            mode: mode::ENFORCE,
            level: 0,
        };
    }
    let mut acc = resolve(&c.entry, own, 0);
    if !c.nested() {
        return acc;
    }
    opaque(&mut acc);
    let mut i = 0;
    while i < CHAIN {
        let id = c.entry.enclosing[i];
        if id == 0 || acc.blocks() {
            break;
        }
        // Read in place, not copied: the stack is too small for a copy per agent. A policy switch
        // of an enclosing agent during this call may mix its old and new fields once.
        if let Some(e) = unsafe { AGENTS.get(id) } {
            // Re-checked: the entry may have changed since the walk.
            if e.kind == entry::AGENT {
                let mut v = ask.verdict(e, id);
                if v.0 != verdict::ALLOW {
                    v = with_grant(v, ask.for_level(c.cgroup, level::bit(i as u32 + 1)));
                }
                acc = fold_chain(acc, resolve(e, v, i as u32 + 1));
                opaque(&mut acc);
            }
        }
        i += 1;
    }
    acc
}

/// The same judgement, as a value the verifier knows nothing about: copied through
/// bpf_probe_read_kernel (from this program's own stack, so it cannot fail; if it did, the
/// copy is zeros, which `enforce` denies). Without it the verifier walks each enclosing agent's
/// lookup once per combination of the outcomes before it (4 times the instructions, 10 times
/// the load time); with it, once per agent. Costs one helper call per enclosing agent, and
/// only for an agent that has some.
/// Copied onto itself, so it takes no more stack.
#[inline(always)]
fn opaque(j: &mut Judged) {
    let p = j as *mut Judged as *mut c_void;
    // SAFETY: this frame's own `size_of::<Judged>()` bytes, read and written in place.
    unsafe { bpf_probe_read_kernel_raw(p, size_of::<Judged>() as u32, p) };
}

/// The caller's rate limit, checked before anything is looked up: every connection attempt and
/// unconnected send pays a token, allowed or not, so a scan is slowed as much as real traffic.
/// Over the limit (true), the call is denied (reason `rate-limit`; only recorded in audit mode).
/// An agent with no limit pays one test here, no call.
#[inline(always)]
fn over_rate(c: &Caller) -> bool {
    !c.pending && c.entry.rate_interval_ns != 0 && out_of_tokens(c) != 0
}

/// The bucket itself, a function of its own (the hook's stack is full); 1 when empty (a
/// scalar its caller uses: see `judge_into`).
#[inline(never)]
fn out_of_tokens(c: &Caller) -> u32 {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    u32::from(!take_token(c.cgroup, &c.entry, now))
}

#[inline(always)]
fn over_limit(e: &AgentEntry, level: u32) -> Judged {
    resolve(e, (verdict::DENY, reason::RATE_LIMIT, NO_RULE), level)
}

/// One token of agent `cgroup`'s bucket, if it has a limit and a token left. The state is
/// swapped with compare-and-exchange, so calls on several CPUs at once pay one token each; one
/// that keeps losing the race is denied (counted as over the limit), never let through unpaid.
#[inline(always)]
fn take_token(cgroup: u64, e: &AgentEntry, now: u64) -> bool {
    let (interval, burst) = (e.rate_interval_ns, e.rate_burst_ns);
    if interval == 0 {
        return true;
    }
    let mut tries = 0;
    while tries < 4 {
        tries += 1;
        let Some(state) = RATE.get_ptr_mut(cgroup) else {
            // A new agent, or one evicted: a full bucket less this call. Lost to a racing
            // insert: try again with its state.
            let Some(next) = rate_take(0, now, interval, burst) else {
                return false;
            };
            if RATE.insert(cgroup, next, BPF_NOEXIST).is_ok() {
                return true;
            }
            continue;
        };
        // SAFETY: a valid, 8-byte aligned map value that lives while this program runs; only
        // these programs write it, always through this exchange.
        let old = unsafe { core::ptr::read_volatile(state) };
        let Some(next) = rate_take(old, now, interval, burst) else {
            return false;
        };
        // BPF_CMPXCHG (core's atomic types offer no read-modify-write on the BPF target).
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                state, old, next,
            )
        };
        if swapped {
            return true;
        }
    }
    false
}

const BPF_NOEXIST: u64 = 1;

/// A denial stands unless a grant of the agent allows the destination: `key` is the agent's
/// grant-trie key for the full address, in the trie of its family.
#[inline(always)]
fn with_grants<K>(
    trie: &LpmTrie<K, GrantSet>,
    key: Key<K>,
    denied: (u32, u32, u32),
    port: u16,
    protocol: u32,
) -> (u32, u32, u32) {
    if denied.0 == verdict::ALLOW {
        return denied;
    }
    with_grant(denied, grant_for(trie, key, port, protocol, level::OWN))
}

/// The live item under `key` (a grant, or an address the DNS proxy resolved) that answers for
/// `level_bit` and allows `port`/`protocol`: its id.
#[inline(always)]
fn grant_for<K>(
    trie: &LpmTrie<K, GrantSet>,
    key: Key<K>,
    port: u16,
    protocol: u32,
    level_bit: u32,
) -> Option<u32> {
    // SAFETY: plain helper call. The kernel's clock decides, so grants and resolved addresses
    // end on time with no controller running.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    trie.get(&key)
        .and_then(|set| match_grants(set, port, protocol, now, level_bit))
}

#[inline(always)]
fn grant_key_v4(agent: u64, addr: [u8; 4]) -> Key<GrantKeyV4> {
    let data = GrantKeyV4 {
        agent: agent.to_be_bytes(),
        addr,
    };
    Key::new(GRANT_AGENT_BITS + 32, data)
}

#[inline(always)]
fn grant_key_v6(agent: u64, addr: [u8; 16]) -> Key<GrantKeyV6> {
    let data = GrantKeyV6 {
        agent: agent.to_be_bytes(),
        addr,
    };
    Key::new(GRANT_AGENT_BITS + 128, data)
}

#[inline(always)]
fn lookup_v4(policy_id: u32, addr: [u8; 4], port: u16, protocol: u32) -> (u32, u32, u32) {
    let key = Key::new(
        POLICY_PREFIX_BITS + 32,
        PrefixV4 {
            policy: policy_id.to_be_bytes(),
            addr,
        },
    );
    match RULES_V4.get(&key) {
        Some(rules) => match_ports(rules, port, protocol),
        None => NO_ADDRESS,
    }
}

/// The destination of one call, as the event carries it.
struct Dest {
    addr: [u8; 16],
    port: u16,
    /// Unix calls: bytes of the name the caller gave (the name stays in its lookup key).
    path_len: u16,
    family: u32,
    protocol: u32,
    sock_type: u32,
    sock_kind: u32,
}

impl Dest {
    /// A socket with no address (socket creation, and Unix sockets, whose path travels beside).
    #[inline(always)]
    fn socket(family: u32, sock_type: u32, protocol: u32, sock_kind: u32) -> Dest {
        Dest {
            addr: [0; 16],
            port: 0,
            path_len: 0,
            family,
            protocol,
            sock_type,
            sock_kind,
        }
    }
}

pub fn inet4(ctx: &SockAddrContext, hook: u32) -> Decision {
    let mut c = Caller::new();
    if !find_agent(&mut c) {
        return Ok(ALLOW);
    }
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    let ip = sa.user_ip4.to_ne_bytes(); // already network order in memory
    let dest = Dest {
        addr: [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
        ],
        port: u16::from_be(sa.user_port as u16),
        path_len: 0,
        family: AF_INET,
        protocol: sa.protocol,
        sock_type: 0,
        sock_kind: 0,
    };
    if !c.pending && dns::is_query(ctx) {
        match dns::steer_kind(dns::steer4(ctx, c.cgroup)) {
            Steer::No => {}
            Steer::Steered => return Ok(finish(hook, &c, &dest, steered(&c, verdict::ALLOW))),
            Steer::Refused => return Ok(finish(hook, &c, &dest, steered(&c, verdict::DENY))),
        }
    }
    let mut ask = AskV4 {
        ip,
        port: dest.port,
        protocol: dest.protocol,
    };
    let judged = if over_rate(&c) {
        over_limit(&c.entry, 0)
    } else {
        judge(&c, &mut ask)
    };
    Ok(finish(hook, &c, &dest, judged))
}

/// A DNS query steered to the proxy (allowed: the proxy judges the name), or one that could not
/// be (denied). Neither pays the connection rate limit: the proxy has its own for queries.
#[inline(always)]
fn steered(c: &Caller, v: u32) -> Judged {
    Judged {
        verdict: v,
        reason: reason::DNS_PROXY,
        rule_id: NO_RULE,
        mode: c.entry.mode,
        level: 0,
    }
}

/// What an agent's policy and grants say about an IPv4 destination.
#[inline(always)]
fn policy_v4(
    e: &AgentEntry,
    cgroup: u64,
    ip: [u8; 4],
    port: u16,
    protocol: u32,
) -> (u32, u32, u32) {
    let policy = lookup_v4(e.policy_id, ip, port, protocol);
    with_grants(&GRANTS_V4, grant_key_v4(cgroup, ip), policy, port, protocol)
}

/// What an agent's policy and grants say about an IPv6 destination.
#[inline(always)]
fn policy_v6(
    e: &AgentEntry,
    cgroup: u64,
    addr: [u8; 16],
    port: u16,
    protocol: u32,
) -> (u32, u32, u32) {
    let key = Key::new(
        POLICY_PREFIX_BITS + 128,
        PrefixV6 {
            policy: e.policy_id.to_be_bytes(),
            addr,
        },
    );
    let policy = match RULES_V6.get(&key) {
        Some(rules) => match_ports(rules, port, protocol),
        None => NO_ADDRESS,
    };
    with_grants(
        &GRANTS_V6,
        grant_key_v6(cgroup, addr),
        policy,
        port,
        protocol,
    )
}

pub fn inet6(ctx: &SockAddrContext, hook: u32) -> Decision {
    let mut c = Caller::new();
    if !find_agent(&mut c) {
        return Ok(ALLOW);
    }
    // SAFETY: as above.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET6 {
        let dest = Dest::socket(sa.user_family, 0, sa.protocol, 0);
        return Err(fail_closed(hook, &c, &dest));
    }
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    // SAFETY: 16 bytes either way; the words are in network order in memory, as the bytes are.
    let addr: [u8; 16] = unsafe { core::mem::transmute(words) };
    let dest = Dest {
        addr,
        port: u16::from_be(sa.user_port as u16),
        path_len: 0,
        family: AF_INET6,
        protocol: sa.protocol,
        sock_type: 0,
        sock_kind: 0,
    };
    if !c.pending && dns::is_query(ctx) {
        match dns::steer_kind(dns::steer6(ctx, c.cgroup)) {
            Steer::No => {}
            Steer::Steered => return Ok(finish(hook, &c, &dest, steered(&c, verdict::ALLOW))),
            Steer::Refused => return Ok(finish(hook, &c, &dest, steered(&c, verdict::DENY))),
        }
    }
    // ::ffff:a.b.c.d reaches an IPv4 host: judge it by the IPv4 rules.
    let mapped = words[0] == 0 && words[1] == 0 && words[2].to_ne_bytes() == [0, 0, 0xff, 0xff];
    let judged = if over_rate(&c) {
        over_limit(&c.entry, 0)
    } else if mapped {
        let mut ask = AskV4 {
            ip: words[3].to_ne_bytes(),
            port: dest.port,
            protocol: dest.protocol,
        };
        judge(&c, &mut ask)
    } else {
        let mut ask = AskV6 {
            addr,
            port: dest.port,
            protocol: dest.protocol,
        };
        judge(&c, &mut ask)
    };
    Ok(finish(hook, &c, &dest, judged))
}

/// The `sock::*` kind of a new socket, or 0 for the kinds that need no allowance (TCP and UDP
/// are judged at connect and send; Unix and netlink sockets do not leave the host).
#[inline(always)]
fn socket_kind(family: u32, ty: u32, protocol: u32) -> u32 {
    match family {
        AF_INET | AF_INET6 => match (ty, protocol) {
            (SOCK_RAW, _) => sock::RAW,
            (SOCK_PACKET, _) if family == AF_INET => sock::PACKET,
            (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP) => 0,
            (_, IPPROTO_ICMP) | (_, IPPROTO_ICMPV6) => sock::PING,
            (_, IPPROTO_UDPLITE) => sock::UDPLITE,
            (_, IPPROTO_SCTP) => sock::SCTP,
            (_, IPPROTO_MPTCP) => sock::MPTCP,
            _ => sock::OTHER_INET,
        },
        AF_PACKET => sock::PACKET,
        AF_UNIX | AF_NETLINK => 0,
        _ => sock::OTHER_FAMILY,
    }
}

/// cgroup/sock_create: refuses inet sockets that the connect and send hooks would never see
/// (raw, ping, UDP-Lite, SCTP, ...), unless the agent's policy allows that kind. The kernel runs
/// this hook from inet_create and inet6_create only: packet sockets are judged by
/// `net_raw_use`.
pub fn sock_create(ctx: &SockContext) -> Decision {
    // SAFETY: the kernel hands every sock program a valid context.
    let sk = unsafe { &*ctx.sock };
    let (family, ty, protocol) = (sk.family, sk.type_, sk.protocol);
    let mut c = Caller::new();
    if !find_agent(&mut c) {
        return Ok(ALLOW);
    }
    let kind = socket_kind(family, ty, protocol);
    if kind == 0 {
        return Ok(ALLOW);
    }
    let dest = Dest::socket(family, ty, protocol, kind);
    let judged = judge_socket(&c, kind);
    Ok(finish(hook::SOCK_CREATE, &c, &dest, judged))
}

/// What the caller's chain says about a socket kind.
#[inline(always)]
fn judge_socket(c: &Caller, kind: u32) -> Judged {
    judge(c, &mut AskSocket(kind))
}

/// What an agent was doing when its CAP_NET_RAW was checked (read by net_raw.rs).
pub enum NetRawUse {
    /// socket(family, type, protocol). `trusted`: read from the registers the kernel saved at
    /// syscall entry; socketcall's arguments are in user memory, which another thread can
    /// change after the kernel read them.
    Socket {
        family: u32,
        ty: u32,
        protocol: u32,
        trusted: bool,
    },
    /// Inside io_uring (its worker threads, or io_uring_enter): socket creation or a socket
    /// option, which cannot be told apart here.
    IoUring,
    /// Anything else (a socket option such as SO_MARK): not socket creation.
    Other,
    /// The task could not be read (counted as an error).
    Unknown,
}

/// The packet-socket guard (tp_btf/cap_capable, see net_raw.rs): an agent's CAP_NET_RAW was
/// checked, and `granted` says how the kernel answered. Creating a packet (or AF_XDP) socket
/// needs it; a tracepoint cannot make the call fail, so an agent whose policy does not allow
/// the socket, and whose capability the kernel granted, is killed (SIGKILL to the whole process)
/// before the call returns to user space. A refusal by the kernel is recorded as blocked.
/// `Err`: the use could not be read and was judged, and recorded, as the strictest kind.
pub fn net_raw_use(c: &Caller, what: NetRawUse, granted: bool) -> Result<(), FailedClosed> {
    let unreadable = matches!(what, NetRawUse::Unknown);
    let (family, ty, protocol, kind) = match what {
        NetRawUse::Other => return Ok(()),
        // Which socket io_uring makes cannot be read here: only a policy that allows packet
        // sockets (the widest kind) lets an agent use CAP_NET_RAW there. Unreadable: the same,
        // failing closed.
        NetRawUse::IoUring | NetRawUse::Unknown => (0, 0, 0, sock::PACKET),
        NetRawUse::Socket {
            family,
            ty,
            protocol,
            trusted,
        } => {
            let kind = match socket_kind(family, ty, protocol) {
                0 => return Ok(()),
                // Raw inet sockets are judged by sock_create once the kernel grants this.
                sock::RAW if granted && trusted => return Ok(()),
                // Arguments another thread may have changed since the kernel read them.
                _ if !trusted => sock::PACKET,
                k => k,
            };
            (family, ty, protocol, kind)
        }
    };
    let judged = judge_socket(c, kind);
    if !granted && judged.verdict == verdict::ALLOW {
        // The kernel's own refusal of an allowed kind: no decision of ours.
        return Ok(());
    }
    let (ret, mut out) = enforce(judged);
    // SAFETY (bpf_send_signal): plain helper call; it signals the current process.
    out.action = if !granted {
        // The kernel fails the call with EPERM.
        action::BLOCKED
    } else if ret == ALLOW {
        action::ALLOWED
    } else if unsafe { bpf_send_signal(SIGKILL) } == 0 {
        action::KILLED
    } else {
        // The task is already exiting (or in a context a signal cannot be sent from).
        count(counter::ERRORS);
        action::ALLOWED
    };
    let dest = Dest::socket(family, ty, protocol, kind);
    emit(hook::SOCKET, c, &dest, &out);
    if unreadable {
        Err(FailedClosed(()))
    } else {
        Ok(())
    }
}

const SIGKILL: u32 = 9;

/// Counts and reports the decision; returns what the hook returns.
#[inline(always)]
fn finish(hook: u32, c: &Caller, dest: &Dest, judged: Judged) -> i32 {
    let (ret, out) = enforce(judged);
    emit(hook, c, dest, &out);
    ret
}

/// The program cannot read what it needs to decide: deny (whatever the mode), count it as a
/// denial and an error, and report it like any decision, with reason `error`.
#[inline(always)]
fn fail_closed(hook: u32, c: &Caller, dest: &Dest) -> FailedClosed {
    let out = failed();
    emit(hook, c, dest, &out);
    FailedClosed(())
}

/// The outcome of a decision that failed closed, counted.
#[inline(always)]
fn failed() -> Outcome {
    count(counter::ERRORS);
    count(counter::DENIED);
    Outcome {
        judged: Judged {
            verdict: verdict::DENY,
            reason: reason::ERROR,
            rule_id: NO_RULE,
            mode: mode::ENFORCE,
            level: 0,
        },
        action: action::BLOCKED,
    }
}

/// One agent's verdict with its dead-man switch and mode applied.
#[inline(always)]
fn resolve(agent: &AgentEntry, (v, r, rule_id): (u32, u32, u32), level: u32) -> Judged {
    apply_deadman(
        agent,
        Judged {
            verdict: v,
            reason: r,
            rule_id,
            mode: agent.mode,
            level,
        },
    )
}

/// Counts the decision: what the hook returns, and the outcome its event reports.
#[inline(always)]
fn enforce(judged: Judged) -> (i32, Outcome) {
    let ret = if judged.verdict == verdict::ALLOW {
        count(counter::ALLOWED);
        ALLOW
    } else if judged.mode == mode::AUDIT {
        count(counter::AUDITED);
        ALLOW
    } else {
        count(counter::DENIED);
        DENY
    };
    let action = if ret == ALLOW {
        action::ALLOWED
    } else {
        action::BLOCKED
    };
    (ret, Outcome { judged, action })
}

/// The decision as it is enforced and reported.
struct Outcome {
    judged: Judged,
    /// `action::*`: what happened to the call.
    action: u32,
}

/// When the controller has been silent longer than the agent's dead-man time, the fallback
/// replaces the decision: deny-all, or audit-all (decide as usual, let everything through).
#[inline(always)]
fn apply_deadman(agent: &AgentEntry, j: Judged) -> Judged {
    if agent.deadman_secs == 0 || agent.deadman_mode == deadman::OFF {
        return j;
    }
    let Some(beat) = HEARTBEAT.get(0) else {
        return j;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if now.saturating_sub(*beat) <= agent.deadman_secs as u64 * 1_000_000_000 {
        return j;
    }
    if agent.deadman_mode == deadman::AUDIT_ALL {
        Judged {
            mode: mode::AUDIT,
            ..j
        }
    } else {
        Judged {
            verdict: verdict::DENY,
            reason: reason::DEADMAN,
            rule_id: NO_RULE,
            mode: mode::ENFORCE,
            level: j.level,
        }
    }
}

/// Writes the decision's record, or counts it lost. (It ends in a helper call, so r0 holds a
/// scalar at its exit; see `judge_into`.)
#[inline(never)]
fn emit(hook: u32, c: &Caller, dest: &Dest, out: &Outcome) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(counter::LOST);
        return;
    };
    // SAFETY: the reserved record is valid for an Event until submitted.
    unsafe { fill(entry.as_mut_ptr(), hook, c, dest, out) };
    entry.submit(wakeup_flags(size_of::<Event>() as u64));
}

/// Writes an event in place (it is larger than a program's stack).
///
/// # Safety
/// `e` points to a reserved ring record valid for an `Event`.
#[inline(always)]
unsafe fn fill(e: *mut Event, hook: u32, c: &Caller, dest: &Dest, out: &Outcome) {
    // SAFETY: plain helper calls with no arguments that can be wrong; `e` is the caller's.
    unsafe {
        let pid_tgid = bpf_get_current_pid_tgid();
        (*e).boot_ns = bpf_ktime_get_boot_ns();
        (*e).cgroup_id = bpf_get_current_cgroup_id();
        (*e).agent_cgroup_id = c.cgroup;
        (*e).pid_tgid = pid_tgid;
        (*e).uid_gid = bpf_get_current_uid_gid();
        (*e).addr = dest.addr;
        (*e).port = dest.port as u32;
        (*e).family = dest.family;
        (*e).protocol = dest.protocol;
        (*e).hook = hook;
        (*e).verdict = out.judged.verdict;
        (*e).mode = out.judged.mode;
        (*e).reason = out.judged.reason;
        (*e).rule_id = out.judged.rule_id;
        (*e).chain = c.entry.enclosing;
        (*e).decided_by = out.judged.level;
        (*e)._reserved = 0;
        (*e).policy_id = c.entry.policy_id;
        (*e).policy_version = c.entry.policy_version;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*e).sock_type = dest.sock_type;
        (*e).sock_kind = dest.sock_kind;
        (*e).action = out.action;
        (*e).task_slot = task_slot(&c.entry, (*e).boot_ns);
        exec::fill(e, (pid_tgid >> 32) as u32);
    }
}

/// The agent's task slot while its task lasts (0: none, or its ttl has passed).
#[inline(always)]
fn task_slot(agent: &AgentEntry, now: u64) -> u32 {
    if agent.task_deadline_ns == 0 || agent.task_deadline_ns > now {
        agent.task_slot
    } else {
        0
    }
}

/// Submit flags for a record of `size` bytes: wake the reader once, as pending data crosses the
/// threshold (this record included), not on every record above it: a wake-up per record costs
/// more than the send it reports.
#[inline(always)]
fn wakeup_flags(size: u64) -> u64 {
    // SAFETY: read of a load-time constant.
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let record = size + RECORD_HEADER_BYTES;
    if pending >= threshold && pending < threshold + record {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Load-time constants: where `struct bpf_sock_addr_kern` (what a sock_addr program's context
/// really points to) keeps the caller's address and its length. The controller reads both
/// offsets from the kernel's BTF; the defaults are Linux 6.7 to 6.18's.
#[unsafe(no_mangle)]
static KCTX_UADDR_OFFSET: u64 = 8;
#[unsafe(no_mangle)]
static KCTX_UADDRLEN_OFFSET: u64 = 32;

/// Bytes of `struct sockaddr_un` before `sun_path`.
const SUN_PATH_OFFSET: u32 = 2;

/// cgroup/connect_unix and cgroup/sendmsg_unix: an agent may reach a Unix socket only by a path
/// or abstract name its policy lists. The kernel has no context field for the address of a
/// Unix call, so it is read from the kernel's own context with bpf_probe_read_kernel.
pub fn unix(ctx: &SockAddrContext, hook: u32) -> Decision {
    let mut c = Caller::new();
    if !find_agent(&mut c) {
        return Ok(ALLOW);
    }
    // SAFETY: only `type` of the context is read, which every sock_addr hook may read.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    let mut dest = Dest::socket(AF_UNIX, sock_type, 0, 0);
    let base = ctx.sock_addr as *const u8;
    // SAFETY: reads of load-time constants; the helper reads kernel memory safely and fails
    // instead of faulting.
    let (uaddr, addrlen) = unsafe {
        let uaddr_off = core::ptr::read_volatile(&KCTX_UADDR_OFFSET) as usize;
        let len_off = core::ptr::read_volatile(&KCTX_UADDRLEN_OFFSET) as usize;
        let uaddr = bpf_probe_read_kernel(base.add(uaddr_off) as *const u64);
        let len = bpf_probe_read_kernel(base.add(len_off) as *const u32);
        match (uaddr, len) {
            (Ok(a), Ok(l)) => (a, l),
            _ => return Err(unix_failed(hook, &c, &dest)),
        }
    };
    // The kernel has checked 2 < addrlen <= sizeof(struct sockaddr_un) before the hook runs.
    let n = addrlen.wrapping_sub(SUN_PATH_OFFSET) as usize;
    if n == 0 || n > UNIX_PATH_MAX {
        return Err(unix_failed(hook, &c, &dest));
    }
    let mut buf = PathBuf {
        key: Key::new(
            POLICY_PREFIX_BITS + UNIX_PATH_MAX as u32 * 8,
            UnixKey {
                policy: c.entry.policy_id.to_be_bytes(),
                path: [0; UNIX_PATH_MAX],
            },
        ),
        _spare: [0; PATH_READ_MASK + 1 - UNIX_PATH_MAX],
    };
    // Exactly the caller's `n` bytes: the kernel ends the name there, so the trie must too (a
    // longer read would let a cut-short name pass as the allowed one it starts). The volatile
    // reload and the mask give the verifier a bound it can see (LLVM would fold a plain one).
    // SAFETY: reads of a local; the helper writes at most PATH_READ_MASK bytes from `path`,
    // which `_spare` leaves room for, and fails instead of faulting on a bad source.
    let rc = unsafe {
        let len = core::ptr::read_volatile(&n) & PATH_READ_MASK;
        bpf_probe_read_kernel_raw(
            buf.key.data.path.as_mut_ptr() as *mut c_void,
            len as u32,
            (uaddr + SUN_PATH_OFFSET as u64) as *const c_void,
        )
    };
    if rc != 0 {
        return Err(unix_failed(hook, &c, &dest));
    }
    let dotdot = buf.key.data.path[0] != 0 && climbs(&buf.key.data.path);
    let judged = judge(
        &c,
        &mut AskUnix {
            key: &mut buf.key,
            dotdot,
        },
    );
    let (ret, out) = enforce(judged);
    dest.path_len = n as u16;
    emit_unix(hook, &c, &dest, &out, Some(&buf.key.data.path));
    Ok(ret)
}

/// A Unix-socket call whose address cannot be read: fails closed, reported with no path.
#[inline(always)]
fn unix_failed(hook: u32, c: &Caller, dest: &Dest) -> FailedClosed {
    let out = failed();
    emit_unix(hook, c, dest, &out, None);
    FailedClosed(())
}

/// Reports a Unix-socket decision with the name the caller gave (none when unreadable).
#[inline(never)]
fn emit_unix(
    hook: u32,
    c: &Caller,
    dest: &Dest,
    out: &Outcome,
    name: Option<&[u8; UNIX_PATH_MAX]>,
) {
    let Some(mut entry) = EVENTS.reserve::<UnixEvent>(0) else {
        count(counter::LOST);
        return;
    };
    let p = entry.as_mut_ptr();
    // SAFETY: `p` is the reserved record, valid for a UnixEvent until submitted.
    unsafe {
        fill(core::ptr::addr_of_mut!((*p).event), hook, c, dest, out);
        match name {
            Some(path) => {
                (*p).path_len = dest.path_len as u32;
                (*p).path = *path;
            }
            None => {
                (*p).path_len = 0;
                (*p).path = [0; UNIX_PATH_MAX];
            }
        }
    }
    entry.submit(wakeup_flags(size_of::<UnixEvent>() as u64));
}

/// Whether a path name has a `..` component (up to its first NUL, where the kernel ends it).
/// Bytes after that NUL need no care: every trie entry is a prefix that a NUL before its end
/// fails to match (an exact path carries its own NUL, a directory has none inside).
#[inline(always)]
fn climbs(path: &[u8; UNIX_PATH_MAX]) -> bool {
    // The last four bytes, behind an imagined leading '/', so a relative "../" counts too.
    let mut window = b'/' as u32;
    let mut climbs = false;
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        let c = path[i];
        window = (window << 8) | c as u32;
        if window == DOTDOT_DIR || window == DOTDOT_END {
            climbs = true;
        }
        if c == 0 {
            break;
        }
        i += 1;
    }
    // A name that fills sun_path ends without a NUL.
    climbs || window & 0x00ff_ffff == DOTDOT_END >> 8
}

/// The LPM key with room behind it for the masked read length.
#[repr(C)]
struct PathBuf {
    key: Key<UnixKey>,
    _spare: [u8; PATH_READ_MASK + 1 - UNIX_PATH_MAX],
}

/// Bound the verifier sees on the path read (a power of two minus one, >= UNIX_PATH_MAX).
const PATH_READ_MASK: usize = 127;

/// "/../" and "/..<NUL>" as the window holds them.
const DOTDOT_DIR: u32 = u32::from_be_bytes(*b"/../");
const DOTDOT_END: u32 = u32::from_be_bytes(*b"/..\0");

// Silence unused warnings for constants kept for readability.
const _: u32 = AF_INET;
