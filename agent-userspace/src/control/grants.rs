//! The runtime-control model: live tasks and grants, what the grant tries must hold for them,
//! the policy scope a grant must lie in, and the state file that carries them across a
//! controller restart. Pure logic: the actor (control/tasks.rs) writes the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_common::{proto, Grant, GrantSet, MAX_GRANTS_PER_PREFIX, RESOLVED_ID_BIT};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::runtime::{Caller, ControlError, GrantInfo, TaskInfo};
use crate::{datapath::GrantPrefix, policy::GrantScope};

/// Ended tasks kept to name records still in flight or written while the controller was down.
const ENDED_TASKS_KEPT: usize = 1024;

/// Live grants one agent may hold unless `agentwall run --max-grants-per-agent` says otherwise:
/// the grant tries (`MAX_GRANT_PREFIXES` entries) are shared by every agent.
pub const DEFAULT_MAX_GRANTS_PER_AGENT: usize = 256;

/// A task set on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub agent_id: u64,
    pub agent: String,
    pub id: String,
    pub intent: String,
    /// RFC 3339.
    pub started: String,
    pub expires: Option<String>,
    /// CLOCK_BOOTTIME deadline the kernel checks (0: none).
    pub deadline_ns: u64,
    pub slot: u32,
    pub by: Caller,
}

impl Task {
    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            agent: self.agent.clone(),
            id: self.id.clone(),
            intent: self.intent.clone(),
            started: self.started.clone(),
            expires: self.expires.clone(),
            slot: self.slot,
            by: self.by.clone(),
        }
    }
}

/// A live grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveGrant {
    pub id: u64,
    pub agent_id: u64,
    pub agent: String,
    /// As given, normalized (`IpNet` text).
    pub to: String,
    pub ports: Vec<(u16, u16)>,
    pub protocols: u32,
    pub deadline_ns: u64,
    /// RFC 3339.
    pub expires: String,
    pub task: Option<String>,
    pub reason: String,
    pub by: Caller,
}

impl LiveGrant {
    pub fn net(&self) -> IpNet {
        self.to
            .parse()
            .expect("a grant's network was parsed when it was made")
    }

    pub fn info(&self) -> GrantInfo {
        GrantInfo {
            id: self.id,
            agent: self.agent.clone(),
            to: self.to.clone(),
            ports: ports_text(&self.ports),
            protocol: crate::policy::protocols_name(self.protocols).to_string(),
            expires: self.expires.clone(),
            task: self.task.clone(),
            reason: self.reason.clone(),
            by: self.by.clone(),
        }
    }

    /// Whether a connection to `addr:port` over `protocol` (`proto::*` bit) is one it allowed.
    pub fn covers(&self, addr: IpAddr, port: u16, protocol: u32) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            a => a,
        };
        self.net().contains(&addr)
            && self.protocols & protocol != 0
            && self
                .ports
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }
}

/// "443,8000-8099" (or "all").
pub fn ports_text(ports: &[(u16, u16)]) -> String {
    if ports == [(0, u16::MAX)] {
        return "all".into();
    }
    ports
        .iter()
        .map(|(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One item of an address the DNS proxy resolved for an agent (control/dns.rs): the ports of one
/// host rule, for the chain levels whose rule it is, until a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedItem {
    /// `RESOLVED_ID_BIT | n`: one id per agent and name (what names the host in records).
    pub id: u32,
    pub ports: (u16, u16),
    pub protocols: u32,
    /// `level::*` bits.
    pub levels: u32,
    pub deadline_ns: u64,
}

impl ResolvedItem {
    fn grant(&self) -> Grant {
        Grant {
            deadline_ns: self.deadline_ns,
            grant_id: self.id,
            protocols: self.protocols,
            port_lo: self.ports.0,
            port_hi: self.ports.1,
            levels: self.levels,
        }
    }
}

/// What the controller holds, and persists, about tasks and grants.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Runtime {
    /// Agent cgroup id -> its current task.
    pub tasks: BTreeMap<u64, Task>,
    pub grants: BTreeMap<u64, LiveGrant>,
    /// Agent -> address -> what the DNS proxy resolved there. Not in the state file (a thousand
    /// lookups a second must not each rewrite it): the pinned tries hold them, and a restart
    /// adopts them from there (`adopt_resolved`).
    #[serde(skip)]
    pub resolved: BTreeMap<u64, BTreeMap<IpAddr, Vec<ResolvedItem>>>,
    /// Ended tasks by slot, for naming late records (bounded).
    pub ended: BTreeMap<u32, (String, String)>,
    pub last_grant_id: u64,
    pub last_slot: u32,
}

impl Runtime {
    pub fn next_grant_id(&mut self) -> u64 {
        self.last_grant_id += 1;
        self.last_grant_id
    }

    /// Slots are never reused (a record of an ended task keeps naming it).
    pub fn next_slot(&mut self) -> u32 {
        self.last_slot = self.last_slot.checked_add(1).unwrap_or(1);
        self.last_slot
    }

    pub fn remember_ended(&mut self, t: &Task) {
        self.ended.insert(t.slot, (t.id.clone(), t.intent.clone()));
        while self.ended.len() > ENDED_TASKS_KEPT {
            self.ended.pop_first();
        }
    }

    /// What the grant tries must hold for `agent`: every prefix one of its grants names, with
    /// the union of every grant covering it (the kernel finds only the longest prefix). The
    /// whole set, for a restart; a single grant's change uses [`Runtime::touched_by`].
    pub fn trie_for(
        &self,
        agent: u64,
        extra: Option<&LiveGrant>,
    ) -> Result<BTreeMap<GrantPrefix, GrantSet>, ControlError> {
        let grants = self.nets_of(agent, extra);
        let resolved = self.resolved.get(&agent);
        let mut out = BTreeMap::new();
        let hosts = resolved
            .into_iter()
            .flat_map(|r| r.keys())
            .map(|a| IpNet::from(*a));
        for net in grants.iter().map(|(n, _)| *n).chain(hosts) {
            if let std::collections::btree_map::Entry::Vacant(e) = out.entry(prefix_of(&net)) {
                e.insert(union_at(&grants, resolved_at(resolved, &net), &net)?);
            }
        }
        Ok(out)
    }

    /// What the entry of one resolved address of `agent` must hold now (None: nothing; no grant
    /// names that host prefix and nothing is resolved there).
    pub fn resolved_entry(
        &self,
        agent: u64,
        addr: IpAddr,
    ) -> Result<(GrantPrefix, Option<GrantSet>), ControlError> {
        let net = IpNet::from(addr);
        let grants = self.nets_of(agent, None);
        let resolved = self.resolved.get(&agent);
        let at = resolved_at(resolved, &net);
        let named = at.is_some_and(|v| !v.is_empty())
            || grants.iter().any(|(n, _)| prefix_of(n) == prefix_of(&net));
        let set = if named {
            Some(union_at(&grants, at, &net)?)
        } else {
            None
        };
        Ok((prefix_of(&net), set))
    }

    /// The entries of `g`'s agent that adding or removing `g` changes: its own prefix and every
    /// narrower prefix of the agent's grants inside it, each with what it must hold now (None:
    /// no grant names that prefix any more). `extra` counts as live (a grant not yet made). Only
    /// these entries are rewritten, so a grant costs O(the agent's grants), not a rebuild.
    pub fn touched_by(
        &self,
        g: &LiveGrant,
        extra: Option<&LiveGrant>,
    ) -> Result<BTreeMap<GrantPrefix, Option<GrantSet>>, ControlError> {
        let grants = self.nets_of(g.agent_id, extra);
        let resolved = self.resolved.get(&g.agent_id);
        let outer = g.net();
        let mut out = BTreeMap::new();
        out.insert(prefix_of(&outer), None);
        let hosts = resolved
            .into_iter()
            .flat_map(|r| r.keys())
            .map(|a| IpNet::from(*a));
        for net in grants.iter().map(|(n, _)| *n).chain(hosts) {
            if covers(&outer, &net) {
                out.insert(prefix_of(&net), None);
            }
        }
        for (prefix, set) in out.iter_mut() {
            let net = net_of(prefix);
            let at = resolved_at(resolved, &net);
            if grants.iter().any(|(n, _)| prefix_of(n) == *prefix) || at.is_some() {
                *set = Some(union_at(&grants, at, &net)?);
            }
        }
        Ok(out)
    }

    /// The live grants of `agent` (and `extra`), their networks parsed once.
    fn nets_of<'a>(
        &'a self,
        agent: u64,
        extra: Option<&'a LiveGrant>,
    ) -> Vec<(IpNet, &'a LiveGrant)> {
        self.grants
            .values()
            .filter(|g| g.agent_id == agent)
            .chain(extra)
            .map(|g| (g.net(), g))
            .collect()
    }

    /// Live grants of `agent`.
    pub fn live_of(&self, agent: u64) -> usize {
        self.grants.values().filter(|g| g.agent_id == agent).count()
    }

    /// Refuses one more grant for an agent that holds `cap` live grants already: the grant
    /// tries are shared by every agent, and one agent must not fill them.
    pub fn check_cap(&self, agent: u64, name: &str, cap: usize) -> Result<(), ControlError> {
        let live = self.live_of(agent);
        if live >= cap {
            return Err(ControlError::Refused(format!(
                "agent {name:?} holds {live} live grants, the most one agent may hold                  (--max-grants-per-agent {cap}): revoke one or let one expire first"
            )));
        }
        Ok(())
    }

    /// Every agent with a grant or a resolved address.
    pub fn granted_agents(&self) -> BTreeSet<u64> {
        self.grants
            .values()
            .map(|g| g.agent_id)
            .chain(self.resolved.keys().copied())
            .collect()
    }

    /// Takes the live resolved addresses the kernel's tries hold (a restart: the proxy of the
    /// last controller wrote them) as this controller's own; their names are not known here.
    pub fn adopt_resolved(&mut self, entries: &[(u64, GrantPrefix, GrantSet)], now: u64) -> usize {
        let mut n = 0;
        for (agent, prefix, set) in entries {
            let addr = match *prefix {
                GrantPrefix::V4(32, a) => IpAddr::from(a),
                GrantPrefix::V6(128, a) => IpAddr::from(a),
                _ => continue,
            };
            let count = (set.count as usize).min(MAX_GRANTS_PER_PREFIX);
            let items: Vec<ResolvedItem> = set.grants[..count]
                .iter()
                .filter(|g| g.grant_id & RESOLVED_ID_BIT != 0 && g.deadline_ns > now)
                .map(|g| ResolvedItem {
                    id: g.grant_id,
                    ports: (g.port_lo, g.port_hi),
                    protocols: g.protocols,
                    levels: g.levels,
                    deadline_ns: g.deadline_ns,
                })
                .collect();
            if !items.is_empty() {
                n += 1;
                self.resolved.entry(*agent).or_default().insert(addr, items);
            }
        }
        n
    }

    /// Drops the grants the kernel's tries no longer hold (`entries`, as adopted), returning
    /// them. The tries are the truth for what stands: a grant revoked (removed from the
    /// kernel) whose state file could not be rewritten must not come back at a restart.
    pub fn keep_only_in_kernel(
        &mut self,
        entries: &[(u64, GrantPrefix, GrantSet)],
    ) -> Vec<LiveGrant> {
        let in_kernel: BTreeSet<(u64, u64)> = entries
            .iter()
            .flat_map(|(agent, _, set)| {
                let n = (set.count as usize).min(MAX_GRANTS_PER_PREFIX);
                set.grants[..n]
                    .iter()
                    .filter(|g| g.grant_id & RESOLVED_ID_BIT == 0)
                    .map(move |g| (*agent, u64::from(g.grant_id)))
            })
            .collect();
        let gone: Vec<u64> = self
            .grants
            .values()
            .filter(|g| !in_kernel.contains(&(g.agent_id, g.id)))
            .map(|g| g.id)
            .collect();
        gone.iter()
            .filter_map(|id| self.grants.remove(id))
            .collect()
    }
}

/// The resolved items at `net` when it is a host prefix.
fn resolved_at<'a>(
    resolved: Option<&'a BTreeMap<IpAddr, Vec<ResolvedItem>>>,
    net: &IpNet,
) -> Option<&'a Vec<ResolvedItem>> {
    if net.prefix_len() != net.max_prefix_len() {
        return None;
    }
    resolved?.get(&net.addr())
}

/// The union at `net` of every grant in `grants` that covers it, then the items resolved at
/// exactly that address, latest deadline first, as many as fit: grants come first (a grant is
/// refused when grants alone overflow; a resolved item that does not fit is only dropped, and
/// the agent resolves the name again).
fn union_at(
    grants: &[(IpNet, &LiveGrant)],
    resolved: Option<&Vec<ResolvedItem>>,
    net: &IpNet,
) -> Result<GrantSet, ControlError> {
    let mut set = union_of_grants(grants, net)?;
    if let Some(items) = resolved {
        let mut items: Vec<&ResolvedItem> = items.iter().collect();
        items.sort_by_key(|i| std::cmp::Reverse(i.deadline_ns));
        for i in items {
            if set.count as usize == MAX_GRANTS_PER_PREFIX {
                break;
            }
            set.grants[set.count as usize] = i.grant();
            set.count += 1;
        }
    }
    Ok(set)
}

fn union_of_grants(grants: &[(IpNet, &LiveGrant)], net: &IpNet) -> Result<GrantSet, ControlError> {
    let mut set = GrantSet {
        count: 0,
        _reserved: 0,
        grants: [Grant::default(); MAX_GRANTS_PER_PREFIX],
    };
    for (_, c) in grants.iter().filter(|(n, _)| covers(n, net)) {
        for (lo, hi) in &c.ports {
            if set.count as usize == MAX_GRANTS_PER_PREFIX {
                return Err(ControlError::Refused(format!(
                    "{net} would carry more than {MAX_GRANTS_PER_PREFIX} grant port ranges of \
                     agent {}; revoke one first",
                    c.agent
                )));
            }
            set.grants[set.count as usize] = Grant {
                deadline_ns: c.deadline_ns,
                grant_id: c.id as u32,
                protocols: c.protocols,
                port_lo: *lo,
                port_hi: *hi,
                levels: agent_common::level::OWN,
            };
            set.count += 1;
        }
    }
    Ok(set)
}

/// The network a trie prefix stands for.
fn net_of(p: &GrantPrefix) -> IpNet {
    match *p {
        GrantPrefix::V4(len, a) => IpNet::new(IpAddr::from(a), len),
        GrantPrefix::V6(len, a) => IpNet::new(IpAddr::from(a), len),
    }
    .expect("a prefix made from a valid network")
}

/// Whether `outer` contains `inner` (same family).
fn covers(outer: &IpNet, inner: &IpNet) -> bool {
    match (outer, inner) {
        (IpNet::V4(o), IpNet::V4(i)) => o.contains(i),
        (IpNet::V6(o), IpNet::V6(i)) => o.contains(i),
        _ => false,
    }
}

/// The trie prefix of a network; an IPv4-mapped IPv6 network goes to the IPv4 trie (the kernel
/// judges `::ffff:a.b.c.d` by the IPv4 lookup).
pub fn prefix_of(net: &IpNet) -> GrantPrefix {
    match net {
        IpNet::V4(n) => GrantPrefix::V4(n.prefix_len(), n.network().octets()),
        IpNet::V6(n) => GrantPrefix::V6(n.prefix_len(), n.network().octets()),
    }
}

/// A network as grants are kept: IPv4-mapped IPv6 as IPv4.
pub fn normalize(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// Checks a grant against the agent's policy scope: inside one `grantable` rule (network,
/// every port range, every protocol) and no longer than `max_grant_ttl`.
pub fn check_scope(
    policy: &str,
    scope: &GrantScope,
    net: &IpNet,
    ports: &[(u16, u16)],
    protocols: u32,
    ttl_secs: u64,
) -> Result<(), ControlError> {
    if scope.grantable.is_empty() {
        return Err(ControlError::Refused(format!(
            "policy {policy:?} allows no grants (it has no `grantable`)"
        )));
    }
    if ttl_secs > scope.max_ttl_secs {
        return Err(ControlError::Refused(format!(
            "ttl {ttl_secs}s is above policy {policy:?}'s max_grant_ttl ({}s)",
            scope.max_ttl_secs
        )));
    }
    let inside = scope.grantable.iter().any(|r| {
        r.nets
            .iter()
            .any(|n| covers(&normalize(*n), net) || covers(n, net))
            && protocols & !r.protocols & proto::ALL == 0
            && ports
                .iter()
                .all(|(lo, hi)| r.ports.iter().any(|(rl, rh)| rl <= lo && hi <= rh))
    });
    if !inside {
        return Err(ControlError::Refused(format!(
            "{net} ports {} ({}) is outside policy {policy:?}'s `grantable`",
            ports_text(ports),
            crate::policy::protocols_name(protocols)
        )));
    }
    Ok(())
}

/// Where the runtime state of the controller pinned at `pin_dir` is kept (see
/// `pin::state_file`, which `uninstall` removes with the pins).
pub fn state_path(pin_dir: &Path) -> PathBuf {
    crate::datapath::pin::state_file(pin_dir)
}

/// Reads the state file; none yet is an empty state.
pub fn load(path: &Path) -> Result<Runtime, String> {
    super::state_file::load(path, "runtime state file")
}

/// Writes the state file atomically, readable by root only.
pub fn save(path: &Path, rt: &Runtime) -> Result<(), String> {
    super::state_file::save(path, rt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Approve, Rule};

    fn grant(id: u64, to: &str, ports: &[(u16, u16)]) -> LiveGrant {
        LiveGrant {
            id,
            agent_id: 7,
            agent: "a".into(),
            to: to.into(),
            ports: ports.to_vec(),
            protocols: proto::TCP,
            deadline_ns: 100,
            expires: String::new(),
            task: None,
            reason: "r".into(),
            by: Caller::Admin { uid: 0 },
        }
    }

    #[test]
    fn a_restart_keeps_only_the_grants_the_kernel_still_holds() {
        let mut rt = Runtime::default();
        for g in [
            grant(1, "10.0.0.0/8", &[(443, 443)]),
            grant(2, "192.0.2.1/32", &[(0, u16::MAX)]),
        ] {
            rt.grants.insert(g.id, g);
        }
        // The kernel holds the tries of grant 1 only (grant 2 was revoked; the file lagged).
        let entries: Vec<(u64, GrantPrefix, GrantSet)> = rt
            .trie_for(7, None)
            .unwrap()
            .into_iter()
            .filter(|(_, set)| {
                set.grants[..set.count as usize]
                    .iter()
                    .all(|g| g.grant_id == 1)
            })
            .map(|(p, set)| (7, p, set))
            .collect();
        assert!(!entries.is_empty());
        let gone = rt.keep_only_in_kernel(&entries);
        assert_eq!(gone.iter().map(|g| g.id).collect::<Vec<_>>(), [2]);
        assert_eq!(rt.grants.keys().copied().collect::<Vec<_>>(), [1]);
        // Another agent's entry naming the same id does not keep it.
        let mut rt2 = Runtime::default();
        rt2.grants.insert(1, grant(1, "10.0.0.0/8", &[(443, 443)]));
        let others: Vec<_> = entries.iter().map(|(_, p, s)| (8, *p, *s)).collect();
        assert_eq!(rt2.keep_only_in_kernel(&others).len(), 1);
        assert!(rt2.grants.is_empty());
    }

    #[test]
    fn a_narrower_prefix_carries_every_covering_grant() {
        let mut rt = Runtime::default();
        rt.grants.insert(1, grant(1, "10.0.0.0/8", &[(443, 443)]));
        rt.grants.insert(2, grant(2, "10.1.2.3/32", &[(80, 80)]));
        let t = rt.trie_for(7, None).unwrap();
        let narrow = t[&GrantPrefix::V4(32, [10, 1, 2, 3])];
        assert_eq!(narrow.count, 2);
        let ids: BTreeSet<u32> = narrow.grants[..2].iter().map(|g| g.grant_id).collect();
        assert_eq!(ids, BTreeSet::from([1, 2]));
        assert_eq!(t[&GrantPrefix::V4(8, [10, 0, 0, 0])].count, 1);
        assert!(rt.trie_for(8, None).unwrap().is_empty());
    }

    #[test]
    fn too_many_grants_on_one_prefix_are_refused() {
        let mut rt = Runtime::default();
        let ports: Vec<(u16, u16)> = (1..=MAX_GRANTS_PER_PREFIX as u16).map(|p| (p, p)).collect();
        rt.grants.insert(1, grant(1, "10.0.0.1/32", &ports));
        let extra = grant(2, "10.0.0.1/32", &[(9, 9)]);
        let e = rt.trie_for(7, Some(&extra)).unwrap_err();
        assert!(
            matches!(e, ControlError::Refused(ref m) if m.contains("more than")),
            "{e}"
        );
    }

    /// Applies one grant's change the way the actor does: only the entries it touches.
    fn apply(tries: &mut BTreeMap<GrantPrefix, GrantSet>, rt: &Runtime, g: &LiveGrant) {
        for (p, set) in rt.touched_by(g, None).unwrap() {
            match set {
                Some(s) => tries.insert(p, s),
                None => tries.remove(&p),
            };
        }
    }

    #[test]
    fn a_change_rewrites_only_what_it_touches_and_matches_a_rebuild() {
        let nets = [
            "10.1.2.3/32",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "192.168.0.0/24",
            "10.9.9.9/32",
            "2001:db8::/32",
            "2001:db8::1/128",
        ];
        let mut rt = Runtime::default();
        let mut tries = BTreeMap::new();
        for (i, n) in nets.iter().enumerate() {
            let g = grant(i as u64 + 1, n, &[(i as u16 + 1, i as u16 + 1)]);
            rt.grants.insert(g.id, g.clone());
            apply(&mut tries, &rt, &g);
            assert_eq!(tries, rt.trie_for(7, None).unwrap(), "after adding {n}");
        }
        // The /8 touches every prefix inside it, a /32 only itself.
        let wide = rt.grants[&2].clone();
        assert_eq!(rt.touched_by(&wide, None).unwrap().len(), 4);
        assert_eq!(
            rt.touched_by(&rt.grants[&6].clone(), None).unwrap().len(),
            1
        );
        for id in [2, 1, 8, 4, 3, 5, 6, 7] {
            let g = rt.grants.remove(&id).unwrap();
            apply(&mut tries, &rt, &g);
            assert_eq!(
                tries,
                rt.trie_for(7, None).unwrap(),
                "after removing {}",
                g.to
            );
        }
        assert!(tries.is_empty());
    }

    #[test]
    fn an_agent_over_its_cap_is_refused_and_others_are_not() {
        let mut rt = Runtime::default();
        for id in 1..=3 {
            rt.grants
                .insert(id, grant(id, &format!("10.0.0.{id}/32"), &[(80, 80)]));
        }
        assert!(rt.check_cap(7, "a", 4).is_ok());
        match rt.check_cap(7, "a", 3) {
            Err(ControlError::Refused(m)) => {
                assert!(
                    m.contains("3 live grants") && m.contains("--max-grants-per-agent 3"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(
            rt.check_cap(8, "b", 3).is_ok(),
            "another agent's grants do not count"
        );
    }

    #[test]
    fn scope_checks_network_ports_protocol_and_ttl() {
        let scope = GrantScope {
            grantable: vec![Rule {
                id: 0,
                name: None,
                nets: vec!["127.0.0.0/8".parse().unwrap()],
                hosts: Vec::new(),
                ports: vec![(1000, 2000)],
                protocols: proto::TCP,
            }],
            max_ttl_secs: 60,
            approve: Approve::Manual,
        };
        let net: IpNet = "127.0.0.5/32".parse().unwrap();
        assert!(check_scope("p", &scope, &net, &[(1500, 1500)], proto::TCP, 60).is_ok());
        let refused = |r: Result<(), ControlError>, want: &str| match r {
            Err(ControlError::Refused(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("{other:?}"),
        };
        refused(
            check_scope("p", &scope, &net, &[(1500, 1500)], proto::TCP, 61),
            "max_grant_ttl",
        );
        refused(
            check_scope("p", &scope, &net, &[(1500, 2001)], proto::TCP, 1),
            "outside",
        );
        refused(
            check_scope("p", &scope, &net, &[(1500, 1500)], proto::ALL, 1),
            "outside",
        );
        let far: IpNet = "10.0.0.1/32".parse().unwrap();
        refused(
            check_scope("p", &scope, &far, &[(1500, 1500)], proto::TCP, 1),
            "outside",
        );
        refused(
            check_scope("p", &GrantScope::default(), &net, &[(1, 1)], proto::TCP, 1),
            "no grants",
        );
    }

    #[test]
    fn mapped_networks_are_kept_as_ipv4() {
        let n = normalize("::ffff:127.0.0.0/104".parse().unwrap());
        assert_eq!(n, "127.0.0.0/8".parse::<IpNet>().unwrap());
        let g = grant(1, "127.0.0.1/32", &[(80, 80)]);
        assert!(g.covers("::ffff:127.0.0.1".parse().unwrap(), 80, proto::TCP));
        assert!(!g.covers("127.0.0.1".parse().unwrap(), 81, proto::TCP));
    }

    #[test]
    fn the_state_file_is_for_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("aw-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state/x.json");
        save(&path, &Runtime::default()).unwrap();
        save(&path, &Runtime::default()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&path), mode(path.parent().unwrap())), (0o600, 0o700));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_state_path_names_the_pin_dir() {
        assert_eq!(
            state_path(Path::new("/sys/fs/bpf/agentwall/v5")),
            PathBuf::from("/run/agentwall/state/sys_fs_bpf_agentwall_v5.json")
        );
    }
}
