//! The per-entry decision, one implementation: the kernel programs call these on the values
//! their map lookups return, and the controller's `explain` calls them on the same values read
//! from the same maps (or from a compiled policy not yet applied). Pure functions of plain
//! values: no helpers, no maps, bounded loops the verifier accepts.

use crate::{
    mode, proto, reason, verdict, GrantSet, RuleSet, MAX_GRANTS_PER_PREFIX, MAX_PORT_RULES,
    NO_RULE, RESOLVED_ID_BIT,
};

/// IANA protocol numbers the rules know.
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;

/// The `proto::*` bit of an IP protocol number (0 for one no rule can name).
#[inline(always)]
pub fn protocol_bit(protocol: u32) -> u32 {
    match protocol {
        IPPROTO_TCP => proto::TCP,
        IPPROTO_UDP => proto::UDP,
        _ => 0,
    }
}

/// What the policy says when no prefix covers the address.
pub const NO_ADDRESS: (u32, u32, u32) = (verdict::DENY, reason::NO_ADDRESS_MATCH, NO_RULE);

/// What a rule set (the longest prefix covering the address) says about one port and
/// protocol: `(verdict, reason, rule_id)`.
#[inline(always)]
pub fn match_ports(rules: &RuleSet, port: u16, protocol: u32) -> (u32, u32, u32) {
    let bit = protocol_bit(protocol);
    let n = rules.count as usize;
    let mut i = 0;
    while i < MAX_PORT_RULES {
        if i >= n {
            break;
        }
        let r = &rules.rules[i];
        if r.protocols & bit != 0 && port >= r.port_lo && port <= r.port_hi {
            return (verdict::ALLOW, reason::RULE, r.rule_id);
        }
        i += 1;
    }
    (verdict::DENY, reason::NO_PORT_MATCH, NO_RULE)
}

/// The first grant of a set (the longest grant prefix covering the address) that answers for
/// chain level `level_bit` (`level::*`), whose ports and protocol match and whose deadline
/// (CLOCK_BOOTTIME ns) is after `now`: its id. Grants and DNS resolutions alike.
#[inline(always)]
pub fn match_grants(
    set: &GrantSet,
    port: u16,
    protocol: u32,
    now: u64,
    level_bit: u32,
) -> Option<u32> {
    let bit = protocol_bit(protocol);
    let n = set.count as usize;
    let mut i = 0;
    while i < MAX_GRANTS_PER_PREFIX {
        if i >= n {
            break;
        }
        let g = &set.grants[i];
        if g.deadline_ns > now
            && g.levels & level_bit != 0
            && g.protocols & bit != 0
            && port >= g.port_lo
            && port <= g.port_hi
        {
            return Some(g.grant_id);
        }
        i += 1;
    }
    None
}

/// A policy verdict with the agent's grants applied: a denial stands unless a live grant, or an
/// address the DNS proxy resolved for the agent (reason `HOST`), allows the destination.
#[inline(always)]
pub fn with_grant(policy: (u32, u32, u32), grant: Option<u32>) -> (u32, u32, u32) {
    if policy.0 == verdict::ALLOW {
        return policy;
    }
    match grant {
        Some(id) if id & RESOLVED_ID_BIT != 0 => (verdict::ALLOW, reason::HOST, id),
        Some(id) => (verdict::ALLOW, reason::GRANT, id),
        None => policy,
    }
}

/// One agent's judgement of a call, its mode (and dead-man switch) applied: what a chain of
/// agents (the caller's and every agent enclosing it) combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judged {
    pub verdict: u32,
    pub reason: u32,
    pub rule_id: u32,
    /// `mode::*` in force for this agent.
    pub mode: u32,
    /// 0: the calling agent; n: the n-th enclosing agent.
    pub level: u32,
}

impl Judged {
    /// A denial that is enforced (not only recorded).
    #[inline(always)]
    pub fn blocks(&self) -> bool {
        self.verdict == verdict::DENY && self.mode == mode::ENFORCE
    }
}

/// Delegation: a call leaves only if every agent of the chain allows it. `acc` is what the
/// agents nearer the caller said, `next` what the next enclosing one says: the first enforced
/// denial wins, else the first denial (recorded in audit mode), else the caller's own allow.
#[inline(always)]
pub fn fold_chain(acc: Judged, next: Judged) -> Judged {
    if acc.blocks() {
        acc
    } else if next.blocks() || (acc.verdict == verdict::ALLOW && next.verdict == verdict::DENY) {
        next
    } else {
        acc
    }
}

/// Rate limiting (GCRA, a token bucket as one number): `tat` is the agent's theoretical arrival
/// time (CLOCK_BOOTTIME ns; 0 when new), one call costs `interval` ns, and calls may run
/// `burst_ns` ahead of `now`. The new `tat` when the call is within the limit, else `None`.
#[inline(always)]
pub fn rate_take(tat: u64, now: u64, interval: u64, burst_ns: u64) -> Option<u64> {
    let base = if tat > now { tat } else { now };
    let next = base.saturating_add(interval);
    if next - now > burst_ns {
        None
    } else {
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Grant, PortRule};

    fn rules(list: &[(u16, u16, u32, u32)]) -> RuleSet {
        let mut s = RuleSet::EMPTY;
        for (i, &(lo, hi, p, id)) in list.iter().enumerate() {
            s.rules[i] = PortRule {
                port_lo: lo,
                port_hi: hi,
                protocols: p,
                rule_id: id,
            };
        }
        s.count = list.len() as u32;
        s
    }

    fn grants(list: &[(u16, u16, u32, u32, u64)]) -> GrantSet {
        let mut s = GrantSet {
            count: list.len() as u32,
            _reserved: 0,
            grants: [Grant::default(); MAX_GRANTS_PER_PREFIX],
        };
        for (i, &(lo, hi, p, id, deadline)) in list.iter().enumerate() {
            s.grants[i] = Grant {
                deadline_ns: deadline,
                grant_id: id,
                protocols: p,
                port_lo: lo,
                port_hi: hi,
                levels: crate::level::OWN,
            };
        }
        s
    }

    #[test]
    fn ports_match_first_rule_in_range_and_protocol() {
        let s = rules(&[(80, 80, proto::TCP, 3), (1000, 2000, proto::ALL, 5)]);
        assert_eq!(
            match_ports(&s, 80, IPPROTO_TCP),
            (verdict::ALLOW, reason::RULE, 3)
        );
        assert_eq!(
            match_ports(&s, 80, IPPROTO_UDP),
            (verdict::DENY, reason::NO_PORT_MATCH, NO_RULE)
        );
        assert_eq!(
            match_ports(&s, 2000, IPPROTO_UDP),
            (verdict::ALLOW, reason::RULE, 5)
        );
        assert_eq!(
            match_ports(&s, 2001, IPPROTO_TCP),
            (verdict::DENY, reason::NO_PORT_MATCH, NO_RULE)
        );
        // A protocol no rule can name never matches.
        assert_eq!(match_ports(&s, 1500, 132).0, verdict::DENY);
    }

    #[test]
    fn count_bounds_the_rules_read() {
        let mut s = rules(&[(80, 80, proto::TCP, 1)]);
        s.rules[1] = PortRule {
            port_lo: 443,
            port_hi: 443,
            protocols: proto::TCP,
            rule_id: 2,
        };
        assert_eq!(match_ports(&s, 443, IPPROTO_TCP).0, verdict::DENY);
        assert_eq!(
            match_ports(&RuleSet::EMPTY, 0, IPPROTO_TCP).1,
            reason::NO_PORT_MATCH
        );
    }

    #[test]
    fn grants_match_until_their_deadline() {
        let s = grants(&[
            (443, 443, proto::TCP, 7, 1_000),
            (53, 53, proto::UDP, 9, 5_000),
        ]);
        let own = crate::level::OWN;
        assert_eq!(match_grants(&s, 443, IPPROTO_TCP, 999, own), Some(7));
        assert_eq!(match_grants(&s, 443, IPPROTO_TCP, 1_000, own), None);
        assert_eq!(match_grants(&s, 443, IPPROTO_UDP, 0, own), None);
        assert_eq!(match_grants(&s, 53, IPPROTO_UDP, 4_999, own), Some(9));
        assert_eq!(match_grants(&s, 54, IPPROTO_UDP, 0, own), None);
        // An item answers only for the chain levels it carries.
        assert_eq!(
            match_grants(&s, 443, IPPROTO_TCP, 0, crate::level::bit(1)),
            None
        );
    }

    #[test]
    fn a_grant_only_lifts_a_denial() {
        let allow = (verdict::ALLOW, reason::RULE, 2);
        assert_eq!(with_grant(allow, Some(4)), allow);
        assert_eq!(
            with_grant(NO_ADDRESS, Some(4)),
            (verdict::ALLOW, reason::GRANT, 4)
        );
        assert_eq!(with_grant(NO_ADDRESS, None), NO_ADDRESS);
        let resolved = RESOLVED_ID_BIT | 3;
        assert_eq!(
            with_grant(NO_ADDRESS, Some(resolved)),
            (verdict::ALLOW, reason::HOST, resolved)
        );
    }

    fn judged(verdict: u32, mode: u32, level: u32) -> Judged {
        Judged {
            verdict,
            reason: if verdict == verdict::ALLOW {
                reason::RULE
            } else {
                reason::NO_ADDRESS_MATCH
            },
            rule_id: level,
            mode,
            level,
        }
    }

    #[test]
    fn a_chain_allows_only_when_every_agent_allows() {
        use crate::{mode::*, verdict::*};
        let own = judged(ALLOW, ENFORCE, 0);
        assert_eq!(fold_chain(own, judged(ALLOW, ENFORCE, 1)), own);
        // An enclosing agent's enforced denial blocks, whatever the caller said.
        let parent = judged(DENY, ENFORCE, 1);
        assert_eq!(fold_chain(own, parent), parent);
        assert_eq!(fold_chain(judged(DENY, AUDIT, 0), parent), parent);
        // The nearest enforced denial is the one reported.
        let blocked = judged(DENY, ENFORCE, 0);
        assert_eq!(fold_chain(blocked, parent), blocked);
        // An audit-mode denial is recorded over an allow, but an enforced one wins over it.
        let audited = judged(DENY, AUDIT, 1);
        assert_eq!(fold_chain(own, audited), audited);
        assert_eq!(fold_chain(audited, judged(DENY, ENFORCE, 2)).level, 2);
        assert_eq!(fold_chain(audited, judged(DENY, AUDIT, 2)).level, 1);
    }

    #[test]
    fn rate_take_allows_a_burst_then_one_per_interval() {
        let (interval, burst) = (1_000, 3);
        let mut tat = 0;
        let now = 1_000_000;
        for _ in 0..burst {
            tat = rate_take(tat, now, interval, burst * interval).expect("within the burst");
        }
        assert_eq!(rate_take(tat, now, interval, burst * interval), None);
        // One interval later, one more.
        tat = rate_take(tat, now + interval, interval, burst * interval).expect("refilled");
        assert_eq!(
            rate_take(tat, now + interval, interval, burst * interval),
            None
        );
        // Idle time refills the burst, not more.
        let later = now + 100 * interval;
        for _ in 0..burst {
            tat = rate_take(tat, later, interval, burst * interval).expect("refilled burst");
        }
        assert_eq!(rate_take(tat, later, interval, burst * interval), None);
    }
}
