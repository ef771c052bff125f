//! An in-memory datapath: the maps as Rust collections, with the agent map's capacity limit, so
//! control logic is unit-tested without root or a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use agent_common::{names, AgentEntry, GrantSet, RuleSet};

use super::{
    kernel_state::{KernelState, LinkState},
    Beat, Counters, Datapath, GrantPrefix, LoaderError, PrefixKeys,
};
use crate::policy::CompiledPolicy;

#[derive(Debug, Clone)]
pub struct Fake {
    pub agents: BTreeMap<u64, AgentEntry>,
    pub capacity: u32,
    pub levels: u32,
    /// Agent cgroup id -> rate limiter state, as the programs would leave it.
    pub rate: BTreeMap<u64, u64>,
    /// Policy id -> prefixes installed under it (v4, v6, unix counts).
    pub rules: BTreeMap<u32, PrefixKeys>,
    pub counters: Counters,
    pub lost_reported: u64,
    pub heartbeats: u64,
    /// Links the fake kernel reports as attached.
    pub attached: bool,
    /// The grant tries: (agent, prefix) -> grants.
    pub grants: BTreeMap<(u64, GrantPrefix), GrantSet>,
    pub grant_capacity: usize,
    /// Policy id -> its rule sets, for the lookups `explain` makes.
    pub rule_sets: BTreeMap<u32, CompiledPolicy>,
    /// The dead-man stamp (CLOCK_BOOTTIME ns).
    pub heartbeat_ns: u64,
}

impl Fake {
    pub fn new(capacity: u32) -> Self {
        Self {
            agents: BTreeMap::new(),
            capacity,
            levels: 0,
            rate: BTreeMap::new(),
            rules: BTreeMap::new(),
            counters: Counters::default(),
            lost_reported: 0,
            heartbeats: 0,
            attached: true,
            grants: BTreeMap::new(),
            grant_capacity: agent_common::MAX_GRANT_PREFIXES as usize,
            rule_sets: BTreeMap::new(),
            heartbeat_ns: super::boottime_ns(),
        }
    }

    /// Entries of one `entry::*` kind.
    pub fn of_kind(&self, kind: u32) -> BTreeMap<u64, AgentEntry> {
        self.agents
            .iter()
            .filter(|(_, e)| e.kind == kind)
            .map(|(k, e)| (*k, *e))
            .collect()
    }
}

impl Datapath for Fake {
    fn set_agent(&mut self, cgroup_id: u64, entry: AgentEntry) -> Result<(), LoaderError> {
        // As a BPF hash map: an update of an existing key always fits, a new key may not.
        if !self.agents.contains_key(&cgroup_id) && self.agents.len() >= self.capacity as usize {
            return Err(LoaderError::Full(names::AGENTS_MAP));
        }
        self.agents.insert(cgroup_id, entry);
        Ok(())
    }
    fn remove_agent(&mut self, cgroup_id: u64) -> Result<(), LoaderError> {
        self.agents.remove(&cgroup_id);
        Ok(())
    }
    fn agent_entries(&self) -> Vec<(u64, AgentEntry)> {
        self.agents.iter().map(|(k, e)| (*k, *e)).collect()
    }
    fn agent_capacity(&self) -> u32 {
        self.capacity
    }
    fn set_agent_levels(&mut self, mask: u32) -> Result<(), LoaderError> {
        self.levels = mask;
        Ok(())
    }
    fn rate_state(&self, cgroup_id: u64) -> Result<u64, LoaderError> {
        Ok(self.rate.get(&cgroup_id).copied().unwrap_or(0))
    }
    fn install_rules(
        &mut self,
        policy_id: u32,
        compiled: &CompiledPolicy,
    ) -> Result<(), LoaderError> {
        self.rules.insert(policy_id, PrefixKeys::of(compiled));
        self.rule_sets.insert(policy_id, compiled.clone());
        Ok(())
    }
    fn remove_rules(&mut self, policy_id: u32, _keys: &PrefixKeys) -> Result<(), LoaderError> {
        self.rules.remove(&policy_id);
        self.rule_sets.remove(&policy_id);
        Ok(())
    }
    fn remove_rules_except(&mut self, keep: &BTreeSet<u32>) -> Result<usize, LoaderError> {
        let before = self.rules.len();
        self.rules.retain(|id, _| keep.contains(id));
        self.rule_sets.retain(|id, _| keep.contains(id));
        Ok(before - self.rules.len())
    }
    fn rule_policy_ids(&self) -> BTreeSet<u32> {
        self.rules.keys().copied().collect()
    }
    fn counters(&self) -> Result<Counters, LoaderError> {
        Ok(self.counters)
    }
    fn lost_reported(&self) -> Result<u64, LoaderError> {
        Ok(self.lost_reported)
    }
    fn set_lost_reported(&mut self, n: u64) -> Result<(), LoaderError> {
        self.lost_reported = n;
        Ok(())
    }
    fn heartbeat(&mut self) -> Result<(), LoaderError> {
        self.heartbeats += 1;
        self.heartbeat_ns = super::boottime_ns();
        Ok(())
    }
    fn take_heartbeat(&mut self) -> Option<Box<dyn Beat>> {
        None
    }
    fn pinned(&self) -> bool {
        false
    }
    fn set_grants(
        &mut self,
        agent: u64,
        prefix: GrantPrefix,
        set: &GrantSet,
    ) -> Result<(), LoaderError> {
        let key = (agent, prefix);
        if !self.grants.contains_key(&key) && self.grants.len() >= self.grant_capacity {
            return Err(LoaderError::Full(names::GRANTS_V4_MAP));
        }
        self.grants.insert(key, *set);
        Ok(())
    }
    fn remove_grants(&mut self, agent: u64, prefix: GrantPrefix) -> Result<(), LoaderError> {
        self.grants.remove(&(agent, prefix));
        Ok(())
    }
    fn grant_entries(&self) -> Vec<(u64, GrantPrefix, GrantSet)> {
        self.grants.iter().map(|((a, p), s)| (*a, *p, *s)).collect()
    }
    fn pin_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
    fn lookup_rules(&self, policy_id: u32, addr: IpAddr) -> Result<Option<RuleSet>, LoaderError> {
        Ok(self
            .rule_sets
            .get(&policy_id)
            .and_then(|c| crate::control::explain::longest_rules(c, addr)))
    }
    fn lookup_grants(&self, agent: u64, addr: IpAddr) -> Result<Option<GrantSet>, LoaderError> {
        let entries = self.grants.iter().filter(|((a, _), _)| *a == agent);
        Ok(crate::control::explain::longest(
            entries.map(|((_, p), s)| match *p {
                GrantPrefix::V4(len, a) => (len, IpAddr::from(a), *s),
                GrantPrefix::V6(len, a) => (len, IpAddr::from(a), *s),
            }),
            addr,
        ))
    }
    fn last_heartbeat_ns(&self) -> Result<u64, LoaderError> {
        Ok(self.heartbeat_ns)
    }
    fn kernel_state(&self) -> KernelState {
        KernelState {
            pinned: false,
            links: vec![LinkState {
                program: names::CONNECT4_PROGRAM,
                pinned: false,
                attached: self.attached,
            }],
        }
    }
}
