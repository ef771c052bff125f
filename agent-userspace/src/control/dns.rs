//! The control side of the DNS proxy (agent-userspace/src/dns): whether an agent, and every agent
//! enclosing it, may resolve a name; and the answer's addresses written into that agent's kernel
//! entries (the grant tries, as items of a host prefix) with a deadline the kernel checks, before
//! the proxy releases the answer.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use agent_common::{
    decide::rate_take, entry, entry_flags, level, mode, MAX_AGENT_CHAIN, RESOLVED_ID_BIT,
};
use serde::Serialize;

use super::{grants::ResolvedItem, State};
use crate::{
    datapath::{boottime_ns, Datapath},
    policy::{doh, DeniedAnswer, Policy},
};

/// Addresses one agent may hold resolved at once unless `agentwall run` says otherwise: the
/// grant tries are shared by every agent. Past it the soonest to expire make room.
pub const DEFAULT_MAX_RESOLVED_PER_AGENT: usize = 1024;

/// What the proxy does with a query.
#[derive(Debug, Clone, Serialize)]
pub struct NameVerdict {
    /// The agent that asked (its name), and its policy.
    pub agent: String,
    pub policy: Option<String>,
    /// "allow" or "deny" (what the policy says; in audit mode a denied name is still answered).
    pub decision: &'static str,
    pub mode: &'static str,
    /// rule, no-host-match, doh-endpoint, rate-limit, not-an-agent, deny:chain-too-deep.
    pub reason: &'static str,
    /// The caller's host rule that allowed the name (its index in `egress`), and its name.
    pub rule: Option<u32>,
    pub rule_name: Option<String>,
    /// The enclosing agent whose policy refused the name (delegation), when not the caller's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The answer a refused name gets.
    #[serde(skip)]
    pub denied_answer: DeniedAnswer,
    /// What to write for the answer's addresses (None: write nothing).
    #[serde(skip)]
    pub plan: Option<WritePlan>,
}

impl NameVerdict {
    /// Forwarded upstream and answered (an allowed name, or any name in audit mode).
    pub fn forwards(&self) -> bool {
        self.decision == "allow" || self.mode == "audit"
    }
}

/// The entries an allowed name's answer becomes.
#[derive(Debug, Clone)]
pub struct WritePlan {
    pub agent: u64,
    pub name: String,
    /// Every host rule that allowed the name, per level.
    pub items: Vec<Item>,
    pub ttl_min_secs: u32,
    pub ttl_max_secs: u32,
    pub grace_secs: u32,
    pub max_addresses: usize,
}

/// One address of an answer as the proxy read it.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    pub addr: IpAddr,
    pub ttl: u32,
}

/// What became of an answer's addresses.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Written {
    /// Written to the kernel: the address, its TTL, and the seconds the kernel keeps it open
    /// (the TTL clamped to the policy's floor and ceiling, plus the grace; None when nothing
    /// was written: audit mode).
    pub kept: Vec<(IpAddr, u32, Option<u32>)>,
    /// Not written (over the cap, or the kernel refused): dropped from the answer.
    pub dropped: Vec<(IpAddr, String)>,
}

/// The proxy's state in the actor: per-agent query buckets and resolution ids.
#[derive(Debug, Default)]
pub(crate) struct DnsState {
    /// Agent -> its query rate limiter (GCRA, as the kernel's connection limiter).
    buckets: HashMap<u64, u64>,
    /// (agent, name) -> the id its resolutions carry in the kernel.
    ids: HashMap<(u64, String), u32>,
    next_id: u32,
    pub(crate) max_resolved_per_agent: usize,
}

impl DnsState {
    pub(crate) fn new() -> Self {
        Self {
            max_resolved_per_agent: DEFAULT_MAX_RESOLVED_PER_AGENT,
            ..Default::default()
        }
    }

    /// New ids after `last` (the highest id adopted from the kernel at a restart).
    pub(crate) fn continue_after(&mut self, last: u32) {
        self.next_id = self.next_id.max(last);
    }
}

impl<D: Datapath> State<D> {
    fn policy_by_id(&self, id: u32) -> Option<&Policy> {
        let (name, _) = self.installed.iter().find(|(_, i)| i.id == id)?;
        self.set.get(name)
    }

    fn agent_name(&self, id: u64) -> String {
        let names = self.names.read().expect("names");
        names
            .agents
            .get(&id)
            .map_or_else(|| format!("cgroup-id:{id}"), |a| a.name.clone())
    }

    /// Judges a query for `name` (normalized) from the agent with cgroup id `agent` (as the
    /// kernel remembered the socket that asked). A sub-agent's query must be allowed by its own
    /// policy and by every enclosing agent's; the answer's entries carry each level's rule.
    pub(crate) fn judge_name(&mut self, agent: u64, name: &str) -> NameVerdict {
        let who = self.agent_name(agent);
        let mut v = NameVerdict {
            agent: who,
            policy: None,
            decision: "deny",
            mode: "enforce",
            reason: "not-an-agent",
            rule: None,
            rule_name: None,
            decided_by: None,
            denied_answer: DeniedAnswer::Refused,
            plan: None,
        };
        let Some(e) = self
            .entries
            .get(&agent)
            .filter(|e| e.entry.kind == entry::AGENT)
            .map(|e| e.entry)
        else {
            return v;
        };
        let own = self.policy_by_id(e.policy_id).cloned();
        v.policy = own.as_ref().map(|p| p.name.clone());
        v.mode = if e.mode == mode::AUDIT {
            "audit"
        } else {
            "enforce"
        };
        if let Some(p) = &own {
            v.denied_answer = p.dns.denied_answer;
        }
        if e.flags & entry_flags::CHAIN_TOO_DEEP != 0 {
            v.mode = "enforce";
            v.reason = "deny:chain-too-deep";
            return v;
        }
        if let Some(limit) = own.as_ref().and_then(|p| p.dns.query_rate) {
            let (interval, burst) = limit.kernel();
            let now = boottime_ns();
            let tat = self.dns.buckets.get(&agent).copied().unwrap_or(0);
            match rate_take(tat, now, interval, burst) {
                Some(next) => {
                    self.dns.buckets.insert(agent, next);
                }
                None => {
                    v.reason = "rate-limit";
                    return v;
                }
            }
        }
        let chain = chain_of(agent, &e);
        let judged = self.names_allowed(&chain, name);
        if let Some((reason, lvl)) = judged.refused {
            v.mode = "enforce";
            v.reason = reason;
            v.decided_by = (lvl > 0).then(|| self.agent_name(chain[lvl]));
            return v;
        }
        if let Some((id, rule_name)) = judged.rule {
            v.rule = Some(id);
            v.rule_name = rule_name;
        }
        if let Some((reason, lvl)) = judged.audited {
            // Audit mode: answered, recorded as what enforcement would have done; nothing
            // written (the kernel lets the connection through in audit mode and records it).
            v.mode = "audit";
            v.reason = reason;
            v.decided_by = (lvl > 0).then(|| self.agent_name(chain[lvl]));
            return v;
        }
        let items = judged.items;
        v.decision = "allow";
        v.reason = "rule";
        if let Some(p) = &own {
            v.plan = Some(WritePlan {
                agent,
                name: name.to_string(),
                items,
                ttl_min_secs: p.dns.ttl_min_secs,
                ttl_max_secs: p.dns.ttl_max_secs,
                grace_secs: p.dns.grace_secs,
                max_addresses: p.dns.max_addresses_per_name as usize,
            });
        }
        v
    }

    /// Writes an allowed answer's addresses into the asking agent's entries, each with the
    /// deadline its TTL gives (clamped to the policy's floor and ceiling, plus the grace). Only
    /// the addresses in `Written::kept` may be released to the agent.
    pub(crate) fn write_answer(&mut self, plan: &WritePlan, answers: &[Answered]) -> Written {
        let mut out = Written::default();
        let now = boottime_ns();
        let id = self.resolution_id(plan.agent, &plan.name);
        let mut seen: Vec<IpAddr> = Vec::new();
        for a in answers {
            let addr = match a.addr {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a.addr, IpAddr::V4),
                ip => ip,
            };
            if seen.contains(&addr) {
                continue;
            }
            if seen.len() >= plan.max_addresses {
                out.dropped.push((
                    a.addr,
                    format!("over max_addresses_per_name ({})", plan.max_addresses),
                ));
                continue;
            }
            seen.push(addr);
            let secs = a.ttl.clamp(plan.ttl_min_secs, plan.ttl_max_secs) + plan.grace_secs;
            let deadline = now + u64::from(secs) * 1_000_000_000;
            let items: Vec<ResolvedItem> = plan
                .items
                .iter()
                .map(|(ports, protocols, levels)| ResolvedItem {
                    id,
                    ports: *ports,
                    protocols: *protocols,
                    levels: *levels,
                    deadline_ns: deadline,
                })
                .collect();
            match self.set_resolved(plan.agent, addr, id, items) {
                Ok(()) => out.kept.push((a.addr, a.ttl, Some(secs))),
                Err(e) => out.dropped.push((a.addr, e)),
            }
        }
        self.make_room(plan.agent);
        out
    }

    /// The id of an agent's resolutions of a name (one per name: records name the host by it).
    fn resolution_id(&mut self, agent: u64, name: &str) -> u32 {
        if let Some(id) = self.dns.ids.get(&(agent, name.to_string())) {
            return *id;
        }
        // Ids of names no address carries any more are reused only after the counter wraps.
        self.dns.next_id = (self.dns.next_id + 1) & !RESOLVED_ID_BIT;
        let id = RESOLVED_ID_BIT | self.dns.next_id.max(1);
        self.dns.ids.insert((agent, name.to_string()), id);
        self.names
            .write()
            .expect("names")
            .hosts
            .insert(id, name.to_string());
        id
    }

    fn resolved_at(&mut self, agent: u64, addr: IpAddr) -> &mut Vec<ResolvedItem> {
        self.runtime
            .rt
            .resolved
            .entry(agent)
            .or_default()
            .entry(addr)
            .or_default()
    }

    /// Replaces the items of resolution `id` at `addr` and writes the entry.
    fn set_resolved(
        &mut self,
        agent: u64,
        addr: IpAddr,
        id: u32,
        items: Vec<ResolvedItem>,
    ) -> Result<(), String> {
        let at = self.resolved_at(agent, addr);
        let before = at.clone();
        at.retain(|i| i.id != id);
        at.extend(items);
        if let Err(e) = self.write_resolved(agent, addr) {
            // The kernel holds what it held: so does the model.
            *self.resolved_at(agent, addr) = before;
            return Err(e);
        }
        // Since when: a record of an earlier call to the address must not name the host.
        let since = self
            .names
            .read()
            .expect("names")
            .resolved
            .get(&(agent, addr))
            .filter(|(old, _)| *old == id)
            .map_or_else(boottime_ns, |(_, t)| *t);
        self.names
            .write()
            .expect("names")
            .resolved
            .insert((agent, addr), (id, since));
        Ok(())
    }

    /// Makes the kernel entry of one resolved address what the model says (and records no
    /// longer name a host for an address the agent no longer holds).
    fn write_resolved(&mut self, agent: u64, addr: IpAddr) -> Result<(), String> {
        let held = self
            .runtime
            .rt
            .resolved
            .get(&agent)
            .is_some_and(|m| m.contains_key(&addr));
        if !held {
            self.names
                .write()
                .expect("names")
                .resolved
                .remove(&(agent, addr));
        }
        let (prefix, set) = self
            .runtime
            .rt
            .resolved_entry(agent, addr)
            .map_err(|e| e.to_string())?;
        let key = (agent, prefix);
        match set {
            Some(set) if self.runtime.written.get(&key) != Some(&set) => {
                self.enforcer
                    .set_grants(agent, prefix, &set)
                    .map_err(|e| format!("the kernel refused the entry: {e}"))?;
                self.runtime.written.insert(key, set);
            }
            Some(_) => {}
            None => {
                if self.runtime.written.remove(&key).is_some() {
                    self.enforcer
                        .remove_grants(agent, prefix)
                        .map_err(|e| format!("removing the entry: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// Over the per-agent cap: the addresses that expire soonest go first.
    fn make_room(&mut self, agent: u64) {
        let cap = self.dns.max_resolved_per_agent;
        let Some(map) = self.runtime.rt.resolved.get(&agent) else {
            return;
        };
        if map.len() <= cap {
            return;
        }
        let mut by_deadline: Vec<(u64, IpAddr)> = map
            .iter()
            .map(|(a, items)| (items.iter().map(|i| i.deadline_ns).max().unwrap_or(0), *a))
            .collect();
        by_deadline.sort_unstable();
        let excess = map.len() - cap;
        for (_, addr) in by_deadline.into_iter().take(excess) {
            self.drop_resolved(agent, addr);
        }
    }

    fn drop_resolved(&mut self, agent: u64, addr: IpAddr) {
        if let Some(map) = self.runtime.rt.resolved.get_mut(&agent) {
            map.remove(&addr);
            if map.is_empty() {
                self.runtime.rt.resolved.remove(&agent);
            }
        }
        if let Err(e) = self.write_resolved(agent, addr) {
            tracing::error!(agent, %addr, "removing a resolved address: {e}");
        }
    }

    /// Removes resolved items past their deadline (the kernel already ignores them), and every
    /// item of an agent that is gone or whose policy no longer allows its name.
    pub(crate) fn expire_resolved(&mut self) {
        let now = boottime_ns();
        let mut touched: Vec<(u64, IpAddr)> = Vec::new();
        let agents: Vec<u64> = self.runtime.rt.resolved.keys().copied().collect();
        for agent in agents {
            let alive = self
                .entries
                .get(&agent)
                .is_some_and(|e| e.entry.kind == entry::AGENT);
            let Some(map) = self.runtime.rt.resolved.get_mut(&agent) else {
                continue;
            };
            for (addr, items) in map.iter_mut() {
                let n = items.len();
                items.retain(|i| alive && i.deadline_ns > now);
                if items.len() != n {
                    touched.push((agent, *addr));
                }
            }
            map.retain(|_, items| !items.is_empty());
        }
        self.runtime.rt.resolved.retain(|_, m| !m.is_empty());
        for (agent, addr) in touched {
            if let Err(e) = self.write_resolved(agent, addr) {
                tracing::error!(agent, %addr, "expiring a resolved address: {e}");
            }
        }
        // Ids of names with no address left.
        let live: std::collections::HashSet<u32> = self
            .runtime
            .rt
            .resolved
            .values()
            .flat_map(|m| m.values().flatten().map(|i| i.id))
            .collect();
        self.dns.ids.retain(|_, id| live.contains(id));
    }

    /// After a policy switch: a resolved name the agent's policy (or an enclosing one's) no
    /// longer allows stops working now, not at its deadline; one still allowed keeps its
    /// addresses with the new rules' ports.
    pub(crate) fn rejudge_resolved(&mut self) {
        let by_name: Vec<((u64, String), u32)> =
            self.dns.ids.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let mut changed: BTreeMap<(u64, IpAddr), ()> = BTreeMap::new();
        for ((agent, name), id) in by_name {
            // Not through `judge_name`: a re-check must not spend the agent's query tokens.
            let plan = self.plan_for(agent, &name);
            let Some(map) = self.runtime.rt.resolved.get_mut(&agent) else {
                continue;
            };
            for (addr, items) in map.iter_mut() {
                let Some(deadline) = items.iter().find(|i| i.id == id).map(|i| i.deadline_ns)
                else {
                    continue;
                };
                items.retain(|i| i.id != id);
                if let Some(plan) = &plan {
                    items.extend(plan.iter().map(|(ports, protocols, levels)| ResolvedItem {
                        id,
                        ports: *ports,
                        protocols: *protocols,
                        levels: *levels,
                        deadline_ns: deadline,
                    }));
                }
                changed.insert((agent, *addr), ());
            }
            map.retain(|_, items| !items.is_empty());
        }
        for ((agent, addr), ()) in changed {
            if let Err(e) = self.write_resolved(agent, addr) {
                tracing::error!(agent, %addr, "re-judging a resolved address: {e}");
            }
        }
    }

    /// The items an allowed name gets under the current policies (None: not allowed now).
    fn plan_for(&self, agent: u64, name: &str) -> Option<Vec<Item>> {
        let e = self
            .entries
            .get(&agent)
            .filter(|e| e.entry.kind == entry::AGENT)?
            .entry;
        let judged = self.names_allowed(&chain_of(agent, &e), name);
        (judged.refused.is_none() && judged.audited.is_none()).then_some(judged.items)
    }

    /// Each agent of a chain (the caller first) on a name: the first enforced refusal, or the
    /// first refusal in audit mode, and the items of every host rule that allows it, each with
    /// the bits of the levels whose rule it is.
    fn names_allowed(&self, chain: &[u64], name: &str) -> ChainNames {
        let mut out = ChainNames::default();
        for (lvl, id) in chain.iter().enumerate().take(MAX_AGENT_CHAIN) {
            let Some(entry) = self
                .entries
                .get(id)
                .filter(|x| x.entry.kind == entry::AGENT)
                .map(|x| x.entry)
            else {
                continue;
            };
            let rules = self
                .policy_by_id(entry.policy_id)
                .map(|p| p.host_rules(name))
                .unwrap_or_default();
            if rules.is_empty() {
                let reason = if doh::is_endpoint_name(name) {
                    "doh-endpoint"
                } else {
                    "no-host-match"
                };
                if entry.mode == mode::ENFORCE {
                    out.refused = Some((reason, lvl));
                    return out;
                }
                out.audited.get_or_insert((reason, lvl));
                continue;
            }
            if lvl == 0 {
                out.rule = Some((rules[0].id, rules[0].name.clone()));
            }
            let bit = level::bit(lvl as u32);
            for r in rules {
                // Without 853 unless the rule names it (DNS over TLS).
                for ports in &r.effective_ports() {
                    match out
                        .items
                        .iter_mut()
                        .find(|(p, proto, _)| p == ports && *proto == r.protocols)
                    {
                        Some(item) => item.2 |= bit,
                        None => out.items.push((*ports, r.protocols, bit)),
                    }
                }
            }
        }
        out
    }
}

/// (ports, protocols, `level::*` bits) of one item an allowed name's addresses get.
pub type Item = ((u16, u16), u32, u32);

/// A chain's answer on a name (`names_allowed`).
#[derive(Default)]
struct ChainNames {
    items: Vec<Item>,
    /// The caller's first host rule for the name: its id and name.
    rule: Option<(u32, Option<String>)>,
    /// (reason, level) of the first enforced refusal, or of the first in audit mode.
    refused: Option<(&'static str, usize)>,
    audited: Option<(&'static str, usize)>,
}

/// The caller and the agents enclosing it, nearest first.
fn chain_of(agent: u64, e: &agent_common::AgentEntry) -> Vec<u64> {
    let mut chain = vec![agent];
    chain.extend(e.enclosing.iter().copied().filter(|id| *id != 0));
    chain
}
