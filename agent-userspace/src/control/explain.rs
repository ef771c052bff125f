//! `explain`: what the kernel would decide now for an agent and a destination, and why, without
//! making a connection. The maps are read with the kernel's own keys and judged by the same
//! functions the kernel programs run (`agent_common::decide`); a policy not yet applied is
//! judged the same way over its compiled entries.

use std::net::{IpAddr, SocketAddr};

use agent_common::{
    deadman,
    decide::{fold_chain, match_grants, match_ports, rate_take, with_grant, Judged, NO_ADDRESS},
    entry, entry_flags, mode, reason, verdict, AgentEntry, GrantSet, RuleSet, NO_RULE,
};
use serde::{Deserialize, Serialize};

use super::{ControlError, GrantInfo, State, TaskInfo};
use crate::{
    datapath::{boottime_ns, Datapath},
    policy::{self, CompiledPolicy, PolicySet},
};

/// What to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainRequest {
    /// Agent name or cgroup path (as `task` and `grant` take it).
    pub agent: String,
    pub to: SocketAddr,
    /// IANA protocol number (`decide::IPPROTO_TCP` or `IPPROTO_UDP`).
    pub protocol: u32,
}

/// The decision and its grounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub agent: String,
    /// Cgroup path relative to the cgroup2 root (the agent name given, for a dry run).
    pub cgroup: String,
    pub policy: String,
    /// The version the kernel entry carries (none for a dry run).
    pub policy_version: Option<u32>,
    pub to: String,
    pub protocol: String,
    /// The address the rules judge: the IPv4 one of ::ffff:a.b.c.d.
    pub judged_as: String,
    /// `allow` or `deny`: what the policy and grants say (before the mode).
    pub decision: String,
    /// As records name it: `rule`, `grant`, `default-deny:no-address-match`,
    /// `default-deny:no-port-match`, `deadman:deny-all`, `pending-identity`.
    pub reason: String,
    pub rule_id: Option<u32>,
    pub rule_name: Option<String>,
    /// The grant that allows it.
    pub grant: Option<GrantInfo>,
    /// The agent's task its records would carry.
    pub task: Option<TaskInfo>,
    /// `enforce` or `audit` (a dead-man audit-all fallback makes it audit).
    pub mode: String,
    /// `off`, `armed` (the controller is alive) or `fallen-back` (its fallback decides now).
    pub deadman: String,
    /// What the call gets: `allowed` or `blocked` (EPERM).
    pub action: String,
    /// `kernel` (the live maps) or `policy` (a dry run over a policy not yet applied).
    pub source: String,
    /// Agents whose cgroups enclose this one, nearest first: each judges the call too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// The enclosing agent whose verdict this is (none: the agent's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The agent's rate limit and whether a call now would be within it, e.g.
    /// `10/s, burst 20: within` (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
}

/// The longest prefix among `entries` that covers `addr` (same family only), as an LPM trie
/// answers a full-length key.
pub fn longest<T>(entries: impl IntoIterator<Item = (u8, IpAddr, T)>, addr: IpAddr) -> Option<T> {
    entries
        .into_iter()
        .filter(|(len, net, _)| covers(*len, *net, addr))
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, v)| v)
}

fn covers(len: u8, net: IpAddr, addr: IpAddr) -> bool {
    let (net, addr, bits) = match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n) as u128, u32::from(a) as u128, 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        _ => return false,
    };
    let len = u32::from(len).min(bits);
    if len == 0 {
        return true;
    }
    let shift = bits - len;
    net >> shift == addr >> shift
}

/// The rule set a compiled policy gives `addr` (the entry the kernel's trie would return).
pub fn longest_rules(c: &CompiledPolicy, addr: IpAddr) -> Option<RuleSet> {
    match addr {
        IpAddr::V4(_) => longest(
            c.v4.iter().map(|(l, a, r)| (*l, IpAddr::from(*a), *r)),
            addr,
        ),
        IpAddr::V6(_) => longest(
            c.v6.iter().map(|(l, a, r)| (*l, IpAddr::from(*a), *r)),
            addr,
        ),
    }
}

/// The address the rules judge: ::ffff:a.b.c.d reaches an IPv4 host, so the IPv4 rules do.
pub fn judged_addr(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        a => a,
    }
}

/// The policy's verdict with the agent's grants applied, as `decide.rs` computes it.
pub fn judge(
    rules: Option<&RuleSet>,
    grants: Option<&GrantSet>,
    port: u16,
    protocol: u32,
    now: u64,
) -> (u32, u32, u32) {
    let policy = rules.map_or(NO_ADDRESS, |r| match_ports(r, port, protocol));
    if policy.0 == verdict::ALLOW {
        return policy;
    }
    with_grant(
        policy,
        grants.and_then(|g| match_grants(g, port, protocol, now, agent_common::level::OWN)),
    )
}

pub fn reason_name(r: u32) -> &'static str {
    match r {
        reason::RULE => "rule",
        reason::NO_ADDRESS_MATCH => "default-deny:no-address-match",
        reason::NO_PORT_MATCH => "default-deny:no-port-match",
        reason::DEADMAN => "deadman:deny-all",
        reason::PENDING_IDENTITY => "pending-identity",
        reason::GRANT => "grant",
        reason::RATE_LIMIT => "rate-limit",
        reason::CHAIN_TOO_DEEP => "deny:chain-too-deep",
        reason::DNS_PROXY => "dns-proxy",
        reason::HOST => "host",
        _ => "unknown",
    }
}

fn protocol_name(protocol: u32) -> String {
    match protocol {
        agent_common::decide::IPPROTO_TCP => "tcp".into(),
        agent_common::decide::IPPROTO_UDP => "udp".into(),
        p => p.to_string(),
    }
}

/// Parses `tcp` / `udp` (default tcp) into an IANA protocol number.
pub fn parse_protocol(s: Option<&str>) -> Result<u32, String> {
    match s.unwrap_or("tcp") {
        "tcp" => Ok(agent_common::decide::IPPROTO_TCP),
        "udp" => Ok(agent_common::decide::IPPROTO_UDP),
        other => Err(format!("{other:?}: expected tcp or udp")),
    }
}

/// The dead-man switch as the kernel applies it (`apply_deadman` in decide.rs): the decision
/// `(verdict, reason, rule)`, the mode in force and the switch's state.
fn apply_deadman(
    e: &AgentEntry,
    decided: (u32, u32, u32),
    beat: u64,
    now: u64,
) -> ((u32, u32, u32), u32, &'static str) {
    if e.deadman_secs == 0 || e.deadman_mode == deadman::OFF {
        return (decided, e.mode, "off");
    }
    if now.saturating_sub(beat) <= e.deadman_secs as u64 * 1_000_000_000 {
        return (decided, e.mode, "armed");
    }
    if e.deadman_mode == deadman::AUDIT_ALL {
        (decided, mode::AUDIT, "fallen-back")
    } else {
        (
            (verdict::DENY, reason::DEADMAN, NO_RULE),
            mode::ENFORCE,
            "fallen-back",
        )
    }
}

/// What the call gets in `mode`.
fn action(v: u32, m: u32) -> &'static str {
    if v == verdict::ALLOW || m == mode::AUDIT {
        "allowed"
    } else {
        "blocked"
    }
}

fn some_rule(rule: u32) -> Option<u32> {
    (rule != NO_RULE).then_some(rule)
}

impl<D: Datapath> State<D> {
    /// Explains from the live maps: the agent's kernel entry, the rule trie under its policy id,
    /// its grant trie, the heartbeat, all at CLOCK_BOOTTIME now as the kernel reads it.
    pub(crate) fn explain(&self, req: ExplainRequest) -> Result<Explanation, ControlError> {
        let internal = |e: crate::datapath::LoaderError| ControlError::Internal(e.to_string());
        let (id, name, policy) = self.resolve(&req.agent)?;
        let Some(entry) = self
            .enforcer
            .agent_entries()
            .into_iter()
            .find_map(|(k, e)| (k == id).then_some(e))
        else {
            return Err(ControlError::NotFound(format!(
                "agent {name:?} has no kernel entry"
            )));
        };
        let now = boottime_ns();
        let addr = judged_addr(req.to.ip());
        let (port, protocol) = (req.to.port(), req.protocol);
        let beat = self.enforcer.last_heartbeat_ns().map_err(internal)?;
        // The order the kernel decides in: the rate limit first, then the agent's policy and
        // grants, then each enclosing agent's (delegation), the first enforced denial winning.
        let level = |e: &AgentEntry, cgroup: u64, own: bool, n: u32| -> Result<_, ControlError> {
            let mut decided = if own && e.kind != entry::AGENT {
                (verdict::DENY, reason::PENDING_IDENTITY, NO_RULE)
            } else {
                self.policy_verdict(e, cgroup, addr, port, protocol, now)?
            };
            // An enclosing agent also reads the caller's items for its level: addresses the DNS
            // proxy resolved for the caller under this agent's host rule.
            if !own && decided.0 != verdict::ALLOW {
                let found = self
                    .enforcer
                    .lookup_grants(id, addr)
                    .map_err(|e| ControlError::Internal(e.to_string()))?;
                decided = with_grant(
                    decided,
                    found.and_then(|g| {
                        match_grants(&g, port, protocol, now, agent_common::level::bit(n))
                    }),
                );
            }
            let ((v, r, rule), m, dm) = apply_deadman(e, decided, beat, now);
            Ok((
                Judged {
                    verdict: v,
                    reason: r,
                    rule_id: rule,
                    mode: m,
                    level: n,
                },
                dm,
            ))
        };
        let rate = (entry.kind == entry::AGENT && entry.rate_interval_ns != 0).then(|| {
            let tat = self.enforcer.rate_state(id).unwrap_or(0);
            let within = rate_take(tat, now, entry.rate_interval_ns, entry.rate_burst_ns).is_some();
            (within, rate_text(&entry, within))
        });
        let (mut judged, dm) = level(&entry, id, true, 0)?;
        if entry.flags & entry_flags::CHAIN_TOO_DEEP != 0 {
            judged = Judged {
                verdict: verdict::DENY,
                reason: reason::CHAIN_TOO_DEEP,
                rule_id: NO_RULE,
                mode: mode::ENFORCE,
                level: 0,
            };
        } else if rate.as_ref().is_some_and(|(within, _)| !within) {
            let ((v, r, rule), m, _) = apply_deadman(
                &entry,
                (verdict::DENY, reason::RATE_LIMIT, NO_RULE),
                beat,
                now,
            );
            judged = Judged {
                verdict: v,
                reason: r,
                rule_id: rule,
                mode: m,
                level: 0,
            };
        } else {
            let entries = self.enforcer.agent_entries();
            for (n, up) in entry.enclosing.iter().enumerate() {
                if *up == 0 || judged.blocks() {
                    break;
                }
                let Some(e) = entries
                    .iter()
                    .find_map(|(k, e)| (*k == *up && e.kind == entry::AGENT).then_some(*e))
                else {
                    continue;
                };
                judged = fold_chain(judged, level(&e, *up, false, n as u32 + 1)?.0);
            }
        }
        let (v, r, rule, m) = (judged.verdict, judged.reason, judged.rule_id, judged.mode);
        let names = self.names.read().expect("names");
        let rt = &self.runtime.rt;
        let task = rt
            .tasks
            .get(&id)
            .filter(|t| t.deadline_ns == 0 || t.deadline_ns > now)
            .map(|t| t.info());
        Ok(Explanation {
            cgroup: names
                .agents
                .get(&id)
                .map(|a| a.cgroup.clone())
                .unwrap_or_default(),
            agent: name,
            policy,
            policy_version: Some(entry.policy_version),
            to: req.to.to_string(),
            protocol: protocol_name(protocol),
            judged_as: addr.to_string(),
            decision: if v == verdict::ALLOW { "allow" } else { "deny" }.into(),
            reason: reason_name(r).into(),
            rule_id: (r == reason::RULE).then_some(rule),
            rule_name: (r == reason::RULE && judged.level == 0)
                .then(|| names.rule_name(entry.policy_id, rule).map(str::to_string))
                .flatten(),
            grant: (r == reason::GRANT)
                .then(|| rt.grants.get(&u64::from(rule)).map(|g| g.info()))
                .flatten(),
            task,
            mode: mode_name(m).into(),
            deadman: dm.into(),
            action: action(v, m).into(),
            source: "kernel".into(),
            chain: entry
                .enclosing
                .iter()
                .take_while(|id| **id != 0)
                .map(|id| agent_or_id(&names, *id))
                .collect(),
            decided_by: (judged.level > 0)
                .then(|| entry.enclosing.get(judged.level as usize - 1))
                .flatten()
                .map(|id| agent_or_id(&names, *id)),
            rate_limit: rate.map(|(_, text)| text),
        })
    }

    /// What one agent's policy and grants say, as the kernel reads them (the grant trie only
    /// for a denial).
    fn policy_verdict(
        &self,
        e: &AgentEntry,
        cgroup: u64,
        addr: IpAddr,
        port: u16,
        protocol: u32,
        now: u64,
    ) -> Result<(u32, u32, u32), ControlError> {
        let internal = |e: crate::datapath::LoaderError| ControlError::Internal(e.to_string());
        let rules = self
            .enforcer
            .lookup_rules(e.policy_id, addr)
            .map_err(internal)?;
        let policy = judge(rules.as_ref(), None, port, protocol, now);
        if policy.0 == verdict::ALLOW {
            return Ok(policy);
        }
        let grants = self
            .enforcer
            .lookup_grants(cgroup, addr)
            .map_err(internal)?;
        Ok(judge(rules.as_ref(), grants.as_ref(), port, protocol, now))
    }
}

/// An agent's name, or its cgroup id when it is not known.
fn agent_or_id(names: &crate::identity::Names, id: u64) -> String {
    names
        .agents
        .get(&id)
        .map_or_else(|| format!("cgroup-id:{id}"), |a| a.name.clone())
}

/// `10/s, burst 20: within` as `explain` shows a rate limit.
fn rate_text(e: &AgentEntry, within: bool) -> String {
    let per_second = 1_000_000_000 / e.rate_interval_ns.max(1);
    let burst = e.rate_burst_ns / e.rate_interval_ns.max(1);
    let state = if within { "within" } else { "exceeded now" };
    format!("{per_second}/s, burst {burst}: {state}")
}

fn mode_name(m: u32) -> &'static str {
    if m == mode::AUDIT {
        "audit"
    } else {
        "enforce"
    }
}

/// Explains for a policy set not yet applied: the policy whose selector matches `cgroup`
/// (relative to the cgroup2 root), compiled, judged by the same functions. No grants, task or
/// dead-man state: those exist only in a running controller.
pub fn dry_run(
    set: &PolicySet,
    cgroup: &str,
    to: SocketAddr,
    protocol: u32,
) -> Result<Explanation, String> {
    let found = set.find_for_cgroup(cgroup);
    let p = match found.as_slice() {
        [one] => *one,
        [] => return Err(format!("no policy selects cgroup {cgroup:?}")),
        many => {
            let names: Vec<_> = many.iter().map(|p| p.name.as_str()).collect();
            return Err(format!(
                "cgroup {cgroup:?} is selected by {} policies ({}): it would be denied everything",
                many.len(),
                names.join(", ")
            ));
        }
    };
    let compiled = policy::compile(p).map_err(|e| e.to_string())?;
    let addr = judged_addr(to.ip());
    let rules = longest_rules(&compiled, addr);
    let (v, r, rule) = judge(rules.as_ref(), None, to.port(), protocol, 0);
    let m = p.mode.as_kernel();
    Ok(Explanation {
        agent: crate::identity::agent_name(cgroup.trim_matches('/')),
        cgroup: cgroup.trim_matches('/').to_string(),
        policy: p.name.clone(),
        policy_version: None,
        to: to.to_string(),
        protocol: protocol_name(protocol),
        judged_as: addr.to_string(),
        decision: if v == verdict::ALLOW { "allow" } else { "deny" }.into(),
        reason: reason_name(r).into(),
        rule_id: some_rule(rule).filter(|_| r == reason::RULE),
        rule_name: (r == reason::RULE)
            .then(|| p.rules.get(rule as usize).and_then(|r| r.name.clone()))
            .flatten(),
        grant: None,
        task: None,
        mode: mode_name(m).into(),
        deadman: "off".into(),
        action: action(v, m).into(),
        source: "policy".into(),
        chain: Vec::new(),
        decided_by: None,
        rate_limit: p
            .rate_limit
            .map(|r| format!("{}/s, burst {}", r.per_second, r.burst)),
    })
}
