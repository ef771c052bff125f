//! Every map the programs read or write. Policy maps never evict: the rate limiter's state is
//! the only LRU map.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};

use agent_common::{
    counter, AgentEntry, Config, DnsConfig, DnsSock, ExePath, GrantKeyV4, GrantKeyV6, GrantSet,
    PrefixV4, PrefixV6, RuleSet, UnixKey, UnixRule, EVENT_RING_BYTES, MAX_AGENTS, MAX_DNS_SOCKS,
    MAX_EXES, MAX_GRANT_PREFIXES, MAX_PREFIXES_V4, MAX_PREFIXES_V6, MAX_UNIX_PATHS,
};

/// BPF_F_NO_PREALLOC: entries take memory only while a process lives.
const NO_PREALLOC: u32 = 1;

/// Which cgroup levels hold agents (one entry).
#[map(name = "AW_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// CLOCK_BOOTTIME (ns) of the controller's last liveness signal, for dead-man switches. Its
/// own map, so the task that beats never writes anything else.
#[map(name = "AW_HEARTBEAT")]
pub static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

/// tgid -> the executable it last exec'd (exec.rs), for every process on the node: a process
/// may join an agent's cgroup after its exec.
#[map(name = "AW_EXES")]
pub static EXES: HashMap<u32, ExePath> = HashMap::with_max_entries(MAX_EXES, NO_PREALLOC);

/// Room to build one AW_EXES value (larger than a comfortable share of the 512-byte stack).
/// Not pinned: scratch space only.
#[map(name = "AW_EXE_SCRATCH")]
pub static EXE_SCRATCH: PerCpuArray<ExePath> = PerCpuArray::with_max_entries(1, 0);

/// Registered agent cgroups: cgroup id -> policy and mode.
#[map(name = "AW_AGENTS")]
pub static AGENTS: HashMap<u64, AgentEntry> = HashMap::with_max_entries(MAX_AGENTS, 0);

/// Per-policy IPv4 prefixes (the key's first 32 bits are the policy id).
#[map(name = "AW_RULES_V4")]
pub static RULES_V4: LpmTrie<PrefixV4, RuleSet> = LpmTrie::with_max_entries(MAX_PREFIXES_V4, 0);

/// Per-policy IPv6 prefixes.
#[map(name = "AW_RULES_V6")]
pub static RULES_V6: LpmTrie<PrefixV6, RuleSet> = LpmTrie::with_max_entries(MAX_PREFIXES_V6, 0);

/// Per-policy Unix socket paths and abstract names (the key's first 32 bits are the policy id).
#[map(name = "AW_UNIX")]
pub static UNIX_PATHS: LpmTrie<UnixKey, UnixRule> = LpmTrie::with_max_entries(MAX_UNIX_PATHS, 0);

/// Per-agent live grants (the key's first 64 bits are the agent's cgroup id), read only after
/// the policy denied: an agent without grants pays one lookup on a deny, others nothing.
#[map(name = "AW_GRANTS_V4")]
pub static GRANTS_V4: LpmTrie<GrantKeyV4, GrantSet> =
    LpmTrie::with_max_entries(MAX_GRANT_PREFIXES, 0);

#[map(name = "AW_GRANTS_V6")]
pub static GRANTS_V6: LpmTrie<GrantKeyV6, GrantSet> =
    LpmTrie::with_max_entries(MAX_GRANT_PREFIXES, 0);

/// Agent cgroup id -> its rate limiter's theoretical arrival time (`decide::rate_take`), written
/// by the programs only. LRU: entries of removed agents make room (the controller also deletes
/// them); an evicted live entry starts again with a full burst, never with less.
#[map(name = "AW_RATE")]
pub static RATE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_AGENTS, 0);

/// Where agents' DNS is steered (dns.rs): the controller's proxy.
#[map(name = "AW_DNS_CONFIG")]
pub static DNS_CONFIG: Array<DnsConfig> = Array::with_max_entries(1, 0);

/// Socket cookie -> the agent and the resolver of a socket whose DNS was steered (dns.rs),
/// written by the programs only. LRU: a closed socket's entry ages out; a live one evicted
/// loses the answer's source rewrite (its stub resolver then drops the answer and asks again).
#[map(name = "AW_DNS_SOCKS")]
pub static DNS_SOCKS: LruHashMap<u64, DnsSock> = LruHashMap::with_max_entries(MAX_DNS_SOCKS, 0);

/// One event per agent decision.
#[map(name = "AW_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// allowed / denied / audited / lost / errors, per CPU (no shared cache line on the hot path).
#[map(name = "AW_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, programs do not migrate CPUs while running.
        unsafe { *p += 1 };
    }
}
