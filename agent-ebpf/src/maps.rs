//! Every map the programs read or write. Policy maps never evict: no LRU anywhere.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};

use agent_common::{
    counter, AgentEntry, Config, PrefixV4, PrefixV6, RuleSet, UnixKey, UnixRule, EVENT_RING_BYTES,
    MAX_AGENTS, MAX_PREFIXES_V4, MAX_PREFIXES_V6, MAX_UNIX_PATHS,
};

/// Which cgroup levels hold agents (one entry).
#[map(name = "AW_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

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
