//! The per-entry decision, one implementation: the kernel programs call these on the values
//! their map lookups return, and the controller's `explain` calls them on the same values read
//! from the same maps (or from a compiled policy not yet applied). Pure functions of plain
//! values: no helpers, no maps, bounded loops the verifier accepts.

use crate::{
    proto, reason, verdict, GrantSet, RuleSet, MAX_GRANTS_PER_PREFIX, MAX_PORT_RULES, NO_RULE,
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

/// The first grant of a set (the longest grant prefix covering the address) whose ports and
/// protocol match and whose deadline (CLOCK_BOOTTIME ns) is after `now`: its id.
#[inline(always)]
pub fn match_grants(set: &GrantSet, port: u16, protocol: u32, now: u64) -> Option<u32> {
    let bit = protocol_bit(protocol);
    let n = set.count as usize;
    let mut i = 0;
    while i < MAX_GRANTS_PER_PREFIX {
        if i >= n {
            break;
        }
        let g = &set.grants[i];
        if g.deadline_ns > now && g.protocols & bit != 0 && port >= g.port_lo && port <= g.port_hi {
            return Some(g.grant_id);
        }
        i += 1;
    }
    None
}

/// A policy verdict with the agent's grants applied: a denial stands unless a live grant
/// allows the destination.
#[inline(always)]
pub fn with_grant(policy: (u32, u32, u32), grant: Option<u32>) -> (u32, u32, u32) {
    if policy.0 == verdict::ALLOW {
        return policy;
    }
    match grant {
        Some(id) => (verdict::ALLOW, reason::GRANT, id),
        None => policy,
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
                _reserved: 0,
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
        assert_eq!(match_grants(&s, 443, IPPROTO_TCP, 999), Some(7));
        assert_eq!(match_grants(&s, 443, IPPROTO_TCP, 1_000), None);
        assert_eq!(match_grants(&s, 443, IPPROTO_UDP, 0), None);
        assert_eq!(match_grants(&s, 53, IPPROTO_UDP, 4_999), Some(9));
        assert_eq!(match_grants(&s, 54, IPPROTO_UDP, 0), None);
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
    }
}
