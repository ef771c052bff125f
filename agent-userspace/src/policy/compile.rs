//! Compiling a policy into the entries of the kernel's LPM tries.
//!
//! The kernel looks the destination up in a longest-prefix-match trie and checks only the port
//! rules of the entry it finds. A connection is allowed if ANY rule allows it, so the entry of
//! each prefix carries the union of the port rules of every rule whose network covers it: the
//! prefix itself and every shorter prefix that contains it. Otherwise a more specific rule
//! would hide a broader one.
//!
//! Prefixes sorted by (network address, length) list every prefix after all prefixes that
//! contain it, and the prefixes containing the current one are exactly a stack of enclosing
//! prefixes. One sweep gives each entry = merge(enclosing entry, own rules): O(n log n).
//!
//! Port merging works per protocol: all ranges (with the id of the rule that gave them) are
//! sorted and merged into maximal runs, overlapping or adjacent, each keeping the lowest rule
//! id. A run that TCP and UDP share exactly is emitted once as TCP|UDP. This is the fewest
//! entries that cover exactly the allowed (port, protocol) pairs: every run needs an entry of
//! its own, and an entry can serve a TCP run and a UDP run only when the two are identical.
//! An inherited run is never split (coverage only grows down the tree), so merging the
//! enclosing entry's runs instead of all its rules gives the same ranges and ids.
//!
//! Two cuts close side doors around the DNS proxy (docs/policy.md, "Host names"):
//! - Port 853 (DNS over TLS / QUIC) is taken out of every rule's ranges unless the rule lists
//!   853 as a single port ([`Rule::effective_ports`]).
//! - A well-known DoH/DoT endpoint address ([`super::doh::ENDPOINT_ADDRS`]) covered by a
//!   network wider than a host route gets a host-route entry of its own that inherits the
//!   covering rules without ports 443 and 853; only a rule naming the address exactly (/32,
//!   /128) allows those. Such an entry is a leaf, so the runs it splits are never inherited.
//!
//! Host rules (`host`/`hosts`) contribute no prefix: their addresses come from the DNS proxy at
//! run time.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use agent_common::{
    proto, PortRule, RuleSet, MAX_PORT_RULES, MAX_PREFIXES_V4, MAX_PREFIXES_V6, UNIX_PATH_MAX,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{doh, Policy, Rule, UnixTarget};

/// DNS over TLS (and over QUIC): allowed only by a rule that lists it as a single port.
pub const DOT_PORT: u16 = 853;
/// HTTPS: closed to DoH endpoint addresses unless a rule names the address exactly.
pub const DOH_PORT: u16 = 443;

/// `ranges` (sorted, disjoint) without `port`.
pub(super) fn cut_port(ranges: &[(u16, u16)], port: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(lo, hi) in ranges {
        if port < lo || port > hi {
            out.push((lo, hi));
            continue;
        }
        if lo < port {
            out.push((lo, port - 1));
        }
        if port < hi {
            out.push((port + 1, hi));
        }
    }
    out
}

/// A policy as the kernel's tries hold it: one entry per distinct prefix, sorted by (address,
/// prefix length). Prefix lengths count the address only (the loader adds the 32 policy-id
/// bits). IPv4-mapped IPv6 networks (`::ffff:0:0/96` and inside) are in `v4`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub v4: Vec<(u8, [u8; 4], RuleSet)>,
    pub v6: Vec<(u8, [u8; 16], RuleSet)>,
    /// Unix entries: bits of the path to match, the path, the entry's index. One key per
    /// distinct entry (a repeat keeps the first index).
    pub unix: Vec<(u32, [u8; UNIX_PATH_MAX], u32)>,
}

impl CompiledPolicy {
    /// Number of trie entries (both families).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Why a policy does not fit the kernel's maps.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// One prefix needs more than `agent_common::MAX_PORT_RULES` port rules.
    #[error(
        "policy {policy:?} ({}): destination {prefix} needs {count} port rules after merging \
         every rule that covers it, more than the limit of {max}; merge port ranges (e.g. \
         \"8000-8100\" instead of single ports) or use fewer overlapping rules",
        path.display()
    )]
    TooManyPortRules {
        policy: String,
        path: PathBuf,
        prefix: IpNet,
        count: usize,
        max: usize,
    },
    /// More distinct prefixes of one family than the trie holds.
    #[error(
        "policy {policy:?} ({}): {count} distinct {family} prefixes, more than the limit of {max}",
        path.display()
    )]
    TooManyPrefixes {
        policy: String,
        path: PathBuf,
        family: &'static str,
        count: usize,
        max: usize,
    },
}

/// A maximal port range of one protocol, with the lowest id of the rules that gave it.
/// Bounds are u32 so that `hi + 1` cannot overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    lo: u32,
    hi: u32,
    id: u32,
}

/// Merged runs of each protocol, sorted, disjoint and not adjacent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Runs {
    tcp: Vec<Run>,
    udp: Vec<Run>,
}

/// Sorts and merges overlapping and adjacent runs; a merged run keeps the lowest id.
fn merge_runs(mut items: Vec<Run>) -> Vec<Run> {
    items.sort_unstable_by_key(|r| (r.lo, r.hi, r.id));
    let mut out: Vec<Run> = Vec::with_capacity(items.len().min(MAX_PORT_RULES + 1));
    for item in items {
        match out.last_mut() {
            Some(last) if item.lo <= last.hi + 1 => {
                last.hi = last.hi.max(item.hi);
                last.id = last.id.min(item.id);
            }
            _ => out.push(item),
        }
    }
    out
}

impl Runs {
    fn of_rule(rule: &Rule) -> Runs {
        let runs = merge_runs(
            rule.effective_ports()
                .into_iter()
                .map(|(lo, hi)| Run {
                    lo: lo.into(),
                    hi: hi.into(),
                    id: rule.id,
                })
                .collect(),
        );
        Runs {
            tcp: if rule.protocols & proto::TCP != 0 {
                runs.clone()
            } else {
                Vec::new()
            },
            udp: if rule.protocols & proto::UDP != 0 {
                runs
            } else {
                Vec::new()
            },
        }
    }

    /// The union of several run sets.
    fn union<'a>(sets: impl Iterator<Item = &'a Runs> + Clone) -> Runs {
        let tcp = sets.clone().flat_map(|r| r.tcp.iter().copied()).collect();
        let udp = sets.flat_map(|r| r.udp.iter().copied()).collect();
        Runs {
            tcp: merge_runs(tcp),
            udp: merge_runs(udp),
        }
    }

    /// These runs without the DoH and DoT ports, of both protocols.
    fn without_resolver_ports(&self) -> Runs {
        let cut = |runs: &[Run]| -> Vec<Run> {
            let mut out = Vec::with_capacity(runs.len() + 2);
            for r in runs {
                let mut lo = r.lo;
                for port in [u32::from(DOH_PORT), u32::from(DOT_PORT)] {
                    if port < lo || port > r.hi {
                        continue;
                    }
                    if lo < port {
                        out.push(Run {
                            lo,
                            hi: port - 1,
                            id: r.id,
                        });
                    }
                    lo = port + 1;
                }
                if lo <= r.hi {
                    out.push(Run { lo, ..*r });
                }
            }
            out
        };
        Runs {
            tcp: cut(&self.tcp),
            udp: cut(&self.udp),
        }
    }

    /// The fewest port rules covering exactly these runs, sorted by (lo, hi, protocols).
    fn port_rules(&self) -> Vec<PortRule> {
        let rule = |r: &Run, protocols| PortRule {
            port_lo: r.lo as u16,
            port_hi: r.hi as u16,
            protocols,
            rule_id: r.id,
        };
        let (mut t, mut u) = (self.tcp.iter().peekable(), self.udp.iter().peekable());
        let mut out = Vec::with_capacity(self.tcp.len() + self.udp.len());
        loop {
            match (t.peek(), u.peek()) {
                (Some(a), Some(b)) if (a.lo, a.hi) == (b.lo, b.hi) => {
                    out.push(PortRule {
                        rule_id: a.id.min(b.id),
                        ..rule(a, proto::TCP | proto::UDP)
                    });
                    t.next();
                    u.next();
                }
                (Some(a), Some(b)) if (a.lo, a.hi) < (b.lo, b.hi) => {
                    out.push(rule(a, proto::TCP));
                    t.next();
                }
                (Some(a), None) => {
                    out.push(rule(a, proto::TCP));
                    t.next();
                }
                (_, Some(b)) => {
                    out.push(rule(b, proto::UDP));
                    u.next();
                }
                (None, None) => break,
            }
        }
        out
    }
}

/// A prefix of either family as an integer: `bits` is 32 or 128.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Prefix {
    addr: u128,
    len: u8,
}

impl Prefix {
    fn contains(&self, other: &Prefix, bits: u8) -> bool {
        self.len <= other.len && mask(self.len, bits) & (self.addr ^ other.addr) == 0
    }
}

fn mask(len: u8, bits: u8) -> u128 {
    if len == 0 {
        0
    } else {
        (u128::MAX << (128 - u32::from(len))) >> (128 - u32::from(bits))
    }
}

/// Which trie a network goes to; IPv4-mapped IPv6 networks are IPv4.
fn classify(net: &IpNet) -> (bool, Prefix) {
    match net {
        IpNet::V4(n) => (
            true,
            Prefix {
                addr: u32::from(n.network()).into(),
                len: n.prefix_len(),
            },
        ),
        IpNet::V6(n) => {
            let addr = u128::from(n.network());
            if n.prefix_len() >= 96 && addr >> 32 == 0xffff {
                (
                    true,
                    Prefix {
                        addr: addr & 0xffff_ffff,
                        len: n.prefix_len() - 96,
                    },
                )
            } else {
                (
                    false,
                    Prefix {
                        addr,
                        len: n.prefix_len(),
                    },
                )
            }
        }
    }
}

/// Compiles a policy into trie entries. See the module documentation for the semantics.
pub fn compile(policy: &Policy) -> Result<CompiledPolicy, CompileError> {
    // Host rules have no networks, so they add no pair below; their runs are unused.
    let rule_runs: Vec<Runs> = policy.rules.iter().map(Runs::of_rule).collect();
    let mut v4: Vec<(Prefix, usize)> = Vec::new();
    let mut v6: Vec<(Prefix, usize)> = Vec::new();
    for (index, rule) in policy.rules.iter().enumerate() {
        for net in &rule.nets {
            match classify(net) {
                (true, prefix) => v4.push((prefix, index)),
                (false, prefix) => v6.push((prefix, index)),
            }
        }
    }
    let v4 = sweep(policy, &rule_runs, v4, Family::V4)?
        .into_iter()
        .map(|(p, set)| (p.len, (p.addr as u32).to_be_bytes(), set))
        .collect();
    let v6 = sweep(policy, &rule_runs, v6, Family::V6)?
        .into_iter()
        .map(|(p, set)| (p.len, p.addr.to_be_bytes(), set))
        .collect();
    let mut unix: Vec<(u32, [u8; UNIX_PATH_MAX], u32)> = Vec::with_capacity(policy.unix.len());
    let mut seen = std::collections::HashSet::with_capacity(policy.unix.len());
    for (index, target) in policy.unix.iter().enumerate() {
        let (bits, path) = target.key();
        if seen.insert((bits, path)) {
            unix.push((bits, path, index as u32));
        }
    }
    Ok(CompiledPolicy { v4, v6, unix })
}

/// Adds the controller's agent socket at `path` to a compiled policy's Unix allowlist, unless the
/// policy says `agent_socket: false`. Its rule id is one past the `unix` list (records name it).
/// Returns whether it was added.
pub fn allow_agent_socket(policy: &Policy, compiled: &mut CompiledPolicy, path: &str) -> bool {
    if !policy.agent_socket {
        return false;
    }
    let Ok(target @ UnixTarget::Path(_)) = UnixTarget::parse(path) else {
        tracing::error!(path, "the agent socket path is not a valid Unix path entry");
        return false;
    };
    let (bits, key) = target.key();
    if !compiled
        .unix
        .iter()
        .any(|(b, k, _)| *b == bits && *k == key)
    {
        compiled.unix.push((bits, key, policy.unix.len() as u32));
    }
    true
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn max_prefixes(self) -> usize {
        match self {
            Family::V4 => MAX_PREFIXES_V4 as usize,
            Family::V6 => MAX_PREFIXES_V6 as usize,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn net(self, p: Prefix) -> IpNet {
        match self {
            Family::V4 => Ipv4Net::new((p.addr as u32).into(), p.len)
                .expect("length checked")
                .into(),
            Family::V6 => Ipv6Net::new(p.addr.into(), p.len)
                .expect("length checked")
                .into(),
        }
    }
}

/// The rule index of a DoH endpoint address's host route, added whether or not a rule names it.
const ENDPOINT: usize = usize::MAX;

/// Whether a host-length prefix of `family` is a DoH endpoint address.
fn is_endpoint(prefix: Prefix, family: Family) -> bool {
    prefix.len == family.bits()
        && doh::is_endpoint_addr(match family {
            Family::V4 => IpAddr::from((prefix.addr as u32).to_be_bytes()),
            Family::V6 => IpAddr::from(prefix.addr.to_be_bytes()),
        })
}

/// The stack sweep over one family's (prefix, rule index) pairs.
fn sweep(
    policy: &Policy,
    rule_runs: &[Runs],
    mut pairs: Vec<(Prefix, usize)>,
    family: Family,
) -> Result<Vec<(Prefix, RuleSet)>, CompileError> {
    pairs.sort_unstable();
    pairs.dedup();
    let distinct =
        pairs.windows(2).filter(|w| w[0].0 != w[1].0).count() + usize::from(!pairs.is_empty());
    let too_many = |count: usize| CompileError::TooManyPrefixes {
        policy: policy.name.clone(),
        path: policy.source.clone(),
        family: family.name(),
        count,
        max: family.max_prefixes(),
    };
    if distinct > family.max_prefixes() {
        return Err(too_many(distinct));
    }
    // Every endpoint address of the family, as a candidate host route: kept below only where a
    // wider network opens 443 or 853 to it.
    if !pairs.is_empty() {
        for addr in doh::ENDPOINT_ADDRS {
            let (v4, prefix) = classify(&IpNet::from(*addr));
            if v4 == matches!(family, Family::V4) {
                pairs.push((prefix, ENDPOINT));
            }
        }
        pairs.sort_unstable();
        pairs.dedup();
    }

    let bits = family.bits();
    let mut out = Vec::with_capacity(distinct);
    let mut stack: Vec<(Prefix, Runs)> = Vec::new();
    for group in pairs.chunk_by(|a, b| a.0 == b.0) {
        let prefix = group[0].0;
        while stack
            .last()
            .is_some_and(|(enclosing, _)| !enclosing.contains(&prefix, bits))
        {
            stack.pop();
        }
        let own = group
            .iter()
            .filter(|&&(_, index)| index != ENDPOINT)
            .map(|&(_, index)| &rule_runs[index]);
        let enclosing = stack.last().map(|(_, runs)| runs);
        let runs = if is_endpoint(prefix, family) {
            // Only rules naming the address exactly open 443 and 853 to it.
            let carved = enclosing.map(Runs::without_resolver_ports);
            let only_candidate = group.iter().all(|&(_, index)| index == ENDPOINT);
            if only_candidate && carved.as_ref() == enclosing {
                // Nothing to close (or nothing covers it): the enclosing entry decides.
                continue;
            }
            Runs::union(own.chain(carved.as_ref()))
        } else {
            Runs::union(own.chain(enclosing))
        };
        let rules = runs.port_rules();
        if rules.len() > MAX_PORT_RULES {
            return Err(CompileError::TooManyPortRules {
                policy: policy.name.clone(),
                path: policy.source.clone(),
                prefix: family.net(prefix),
                count: rules.len(),
                max: MAX_PORT_RULES,
            });
        }
        let mut set = RuleSet::EMPTY;
        set.count = rules.len() as u32;
        set.rules[..rules.len()].copy_from_slice(&rules);
        out.push((prefix, set));
        stack.push((prefix, runs));
    }
    if out.len() > family.max_prefixes() {
        return Err(too_many(out.len()));
    }
    Ok(out)
}

impl Policy {
    /// What the CIDR rules say about a connection to `dst`, straight from the rules: the
    /// reference the compiled tries must agree with. Addresses the DNS proxy opens for host
    /// rules at run time are not part of it. `protocol` is an `agent_common::proto` bit.
    /// Returns the lowest id of the rules that allow it.
    pub fn cidr_rule_allowing(&self, dst: IpAddr, port: u16, protocol: u32) -> Option<u32> {
        let dst = match dst {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(dst, IpAddr::V4),
            v4 => v4,
        };
        let (is_v4, addr) = match dst {
            IpAddr::V4(a) => (true, u128::from(u32::from(a))),
            IpAddr::V6(a) => (false, u128::from(a)),
        };
        let bits = if is_v4 { 32 } else { 128 };
        let resolver_port = port == DOH_PORT || port == DOT_PORT;
        let endpoint = resolver_port && doh::is_endpoint_addr(dst);
        self.rules
            .iter()
            .filter(|r| {
                r.protocols & protocol != 0
                    && r.ports.iter().any(|&(lo, hi)| lo <= port && port <= hi)
                    && (port != DOT_PORT || r.names_dot_port())
                    && r.nets.iter().any(|n| {
                        let (v4, pre) = classify(n);
                        v4 == is_v4
                            && mask(pre.len, bits) & (pre.addr ^ addr) == 0
                            && (!endpoint || pre.len == bits)
                    })
            })
            .map(|r| r.id)
            .min()
    }
}

/// The port rules of one compiled entry, for people: `tcp 443 (rule 0), any 53 (rule 2)`.
pub struct DisplayRuleSet<'a>(pub &'a RuleSet);

impl fmt::Display for DisplayRuleSet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = (self.0.count as usize).min(MAX_PORT_RULES);
        if count == 0 {
            return f.write_str("nothing");
        }
        for (i, r) in self.0.rules[..count].iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let protocols = match r.protocols & proto::ALL {
                proto::ALL => "tcp+udp",
                proto::TCP => "tcp",
                proto::UDP => "udp",
                _ => "none",
            };
            write!(f, "{protocols} ")?;
            if (r.port_lo, r.port_hi) == (0, u16::MAX) {
                f.write_str("all ports")?;
            } else if r.port_lo == r.port_hi {
                write!(f, "{}", r.port_lo)?;
            } else {
                write!(f, "{}-{}", r.port_lo, r.port_hi)?;
            }
            write!(f, " (rule {})", r.rule_id)?;
        }
        Ok(())
    }
}

impl fmt::Display for CompiledPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (len, addr, set) in &self.v4 {
            let net = Ipv4Net::new((*addr).into(), *len).map_err(|_| fmt::Error)?;
            writeln!(f, "{net}: {}", DisplayRuleSet(set))?;
        }
        for (len, addr, set) in &self.v6 {
            let net = Ipv6Net::new((*addr).into(), *len).map_err(|_| fmt::Error)?;
            writeln!(f, "{net}: {}", DisplayRuleSet(set))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::path::Path;

    use agent_common::proto::{ALL, TCP, UDP};

    use super::*;
    use crate::policy::raw::parse_net;
    use crate::policy::{parse_policy, CgroupSelector, Mode};

    #[test]
    fn the_agent_socket_joins_the_unix_list_unless_turned_off() {
        let yaml = "name: a\nagents:\n  cgroups: [x/a]\negress: []\nunix: [/run/x.sock]\n";
        let on = parse_policy(Path::new("a.yaml"), yaml).unwrap();
        let mut c = compile(&on).unwrap();
        assert!(allow_agent_socket(&on, &mut c, "/run/agentwall/agent.sock"));
        let (bits, key) = UnixTarget::Path("/run/agentwall/agent.sock".into()).key();
        // Named in records by the index after the policy's own entries.
        assert_eq!(c.unix.len(), 2);
        assert_eq!(c.unix[1], (bits, key, 1));
        // Listed already: one entry.
        let mut again = c.clone();
        allow_agent_socket(&on, &mut again, "/run/agentwall/agent.sock");
        assert_eq!(again.unix, c.unix);

        let off =
            parse_policy(Path::new("b.yaml"), &format!("{yaml}agent_socket: false\n")).unwrap();
        let mut c = compile(&off).unwrap();
        assert!(!allow_agent_socket(
            &off,
            &mut c,
            "/run/agentwall/agent.sock"
        ));
        assert_eq!(c.unix.len(), 1);
        assert!(
            parse_policy(Path::new("c.yaml"), &format!("{yaml}agent_socket: maybe\n")).is_err()
        );
    }

    fn pr(port_lo: u16, port_hi: u16, protocols: u32, rule_id: u32) -> PortRule {
        PortRule {
            port_lo,
            port_hi,
            protocols,
            rule_id,
        }
    }

    /// A policy from rules written as (cidrs, ports, protocols); ids are the positions.
    /// (networks, port ranges, protocols) of one rule.
    type Spec<'a> = (&'a [&'a str], &'a [(u16, u16)], u32);

    fn policy(rules: &[Spec]) -> Policy {
        Policy {
            name: "t".into(),
            mode: Mode::Enforce,
            sockets: 0,
            deadman: None,
            rate_limit: None,
            unix: Vec::new(),
            agent_socket: true,
            pending: Default::default(),
            grants: Default::default(),
            dns: Default::default(),
            capabilities: Vec::new(),
            agents: vec![CgroupSelector::new("t").unwrap()],
            rules: rules
                .iter()
                .enumerate()
                .map(|(id, (nets, ports, protocols))| Rule {
                    id: id as u32,
                    name: None,
                    nets: nets.iter().map(|n| parse_net(n).unwrap()).collect(),
                    hosts: Vec::new(),
                    ports: ports.to_vec(),
                    protocols: *protocols,
                })
                .collect(),
            source: "t.yaml".into(),
        }
    }

    fn rules(set: &RuleSet) -> &[PortRule] {
        &set.rules[..set.count as usize]
    }

    /// The v4 entry for `prefix` ("a.b.c.d/len").
    fn v4<'a>(c: &'a CompiledPolicy, prefix: &str) -> &'a [PortRule] {
        let net: Ipv4Net = prefix.parse().unwrap();
        let (_, _, set) =
            c.v4.iter()
                .find(|(len, addr, _)| *len == net.prefix_len() && *addr == net.addr().octets())
                .unwrap_or_else(|| panic!("no entry for {prefix}"));
        rules(set)
    }

    fn v6<'a>(c: &'a CompiledPolicy, prefix: &str) -> &'a [PortRule] {
        let net: Ipv6Net = prefix.parse().unwrap();
        let (_, _, set) =
            c.v6.iter()
                .find(|(len, addr, _)| *len == net.prefix_len() && *addr == net.addr().octets())
                .unwrap_or_else(|| panic!("no entry for {prefix}"));
        rules(set)
    }

    /// What the kernel does: longest prefix match (IPv4-mapped addresses in the v4 table),
    /// then the first port rule that matches. Returns the rule id, or None if denied.
    fn kernel_decides(c: &CompiledPolicy, dst: IpAddr, port: u16, protocol: u32) -> Option<u32> {
        let dst = match dst {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(dst, IpAddr::V4),
            v4 => v4,
        };
        let set = match dst {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                c.v4.iter()
                    .filter(|(len, addr, _)| {
                        mask(*len, 32) & (u128::from(a) ^ u128::from(u32::from_be_bytes(*addr)))
                            == 0
                    })
                    .max_by_key(|(len, _, _)| *len)
                    .map(|(_, _, set)| set)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                c.v6.iter()
                    .filter(|(len, addr, _)| {
                        mask(*len, 128) & (a ^ u128::from_be_bytes(*addr)) == 0
                    })
                    .max_by_key(|(len, _, _)| *len)
                    .map(|(_, _, set)| set)
            }
        }?;
        rules(set)
            .iter()
            .find(|r| r.port_lo <= port && port <= r.port_hi && r.protocols & protocol != 0)
            .map(|r| r.rule_id)
    }

    /// What the policy means: allowed iff some rule's network, ports and protocol all match.
    /// (The reference, [`Policy::cidr_rule_allowing`], with its 853 and DoH-address cuts.)
    fn policy_allows(p: &Policy, dst: IpAddr, port: u16, protocol: u32) -> bool {
        p.cidr_rule_allowing(dst, port, protocol).is_some()
    }

    #[test]
    fn union_of_overlapping_rules() {
        let c = compile(&policy(&[
            (&["10.0.0.0/8"], &[(443, 443)], TCP),
            (&["10.1.0.0/16"], &[(53, 53)], UDP),
        ]))
        .unwrap();
        assert_eq!(v4(&c, "10.0.0.0/8"), [pr(443, 443, TCP, 0)]);
        // The /16 allows both: its own UDP 53 and the covering /8's TCP 443.
        assert_eq!(
            v4(&c, "10.1.0.0/16"),
            [pr(53, 53, UDP, 1), pr(443, 443, TCP, 0)]
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(kernel_decides(&c, ip("10.1.2.3"), 443, TCP), Some(0));
        assert_eq!(kernel_decides(&c, ip("10.1.2.3"), 53, UDP), Some(1));
        assert_eq!(kernel_decides(&c, ip("10.2.2.3"), 53, UDP), None);
        assert_eq!(kernel_decides(&c, ip("10.1.2.3"), 53, TCP), None);
        assert_eq!(kernel_decides(&c, ip("11.0.0.1"), 443, TCP), None);
    }

    #[test]
    fn nested_three_levels_and_siblings() {
        let c = compile(&policy(&[
            (&["10.1.2.0/24"], &[(22, 22)], TCP),
            (&["10.1.0.0/16"], &[(53, 53)], UDP),
            (&["10.0.0.0/8"], &[(443, 443)], TCP),
            (&["10.2.0.0/16"], &[(80, 80)], TCP),
            (&["10.1.3.0/24"], &[(8080, 8080)], ALL),
            (&["11.0.0.0/8"], &[(1, 1)], TCP),
        ]))
        .unwrap();
        let order: Vec<_> = c.v4.iter().map(|(l, a, _)| (*l, *a)).collect();
        assert_eq!(
            order,
            [
                (8, [10, 0, 0, 0]),
                (16, [10, 1, 0, 0]),
                (24, [10, 1, 2, 0]),
                (24, [10, 1, 3, 0]),
                (16, [10, 2, 0, 0]),
                (8, [11, 0, 0, 0]),
            ]
        );
        assert_eq!(
            v4(&c, "10.1.2.0/24"),
            [pr(22, 22, TCP, 0), pr(53, 53, UDP, 1), pr(443, 443, TCP, 2)]
        );
        assert_eq!(
            v4(&c, "10.1.3.0/24"),
            [
                pr(53, 53, UDP, 1),
                pr(443, 443, TCP, 2),
                pr(8080, 8080, ALL, 4)
            ]
        );
        // A sibling does not inherit from the branch before it.
        assert_eq!(
            v4(&c, "10.2.0.0/16"),
            [pr(80, 80, TCP, 3), pr(443, 443, TCP, 2)]
        );
        assert_eq!(v4(&c, "11.0.0.0/8"), [pr(1, 1, TCP, 5)]);
    }

    #[test]
    fn default_route_covers_everything_of_its_family() {
        let c = compile(&policy(&[
            (&["0.0.0.0/0"], &[(53, 53)], UDP),
            (&["::/0"], &[(443, 443)], TCP),
            (&["192.0.2.1"], &[(80, 80)], TCP),
            (&["2001:db8::1"], &[(80, 80)], TCP),
        ]))
        .unwrap();
        assert_eq!(v4(&c, "0.0.0.0/0"), [pr(53, 53, UDP, 0)]);
        assert_eq!(
            v4(&c, "192.0.2.1/32"),
            [pr(53, 53, UDP, 0), pr(80, 80, TCP, 2)]
        );
        assert_eq!(v6(&c, "::/0"), [pr(443, 443, TCP, 1)]);
        assert_eq!(
            v6(&c, "2001:db8::1/128"),
            [pr(80, 80, TCP, 3), pr(443, 443, TCP, 1)]
        );
    }

    #[test]
    fn port_ranges_merge() {
        // Overlapping, adjacent and contained ranges of one protocol become one.
        let c = compile(&policy(&[(
            &["10.0.0.0/8"],
            &[
                (85, 100),
                (80, 80),
                (81, 81),
                (82, 90),
                (95, 96),
                (102, 102),
            ],
            TCP,
        )]))
        .unwrap();
        assert_eq!(
            v4(&c, "10.0.0.0/8"),
            [pr(80, 100, TCP, 0), pr(102, 102, TCP, 0)]
        );
        // Extremes do not overflow (853 is cut: see dot_port_is_cut_unless_listed).
        let c = compile(&policy(&[(
            &["10.0.0.0/8"],
            &[(65535, 65535), (0, 0), (1, 65534)],
            UDP,
        )]))
        .unwrap();
        assert_eq!(
            v4(&c, "10.0.0.0/8"),
            [pr(0, 852, UDP, 0), pr(854, 65535, UDP, 0)]
        );
    }

    #[test]
    fn protocols_combine_where_coverage_coincides() {
        let c = compile(&policy(&[
            (&["10.0.0.0/8"], &[(53, 53)], TCP),
            (&["10.0.0.0/8"], &[(53, 53)], UDP),
            (&["10.0.0.0/8"], &[(1, 100)], TCP),
            (&["10.0.0.0/8"], &[(50, 60)], UDP),
        ]))
        .unwrap();
        // TCP 1-100 and UDP 50-60: two entries (fewer than splitting into three).
        assert_eq!(
            v4(&c, "10.0.0.0/8"),
            [pr(1, 100, TCP, 0), pr(50, 60, UDP, 1)]
        );
        let c = compile(&policy(&[
            (&["10.0.0.0/8"], &[(53, 53)], TCP),
            (&["10.0.0.0/8"], &[(53, 53), (443, 443)], UDP),
            (&["10.0.0.0/8"], &[(443, 443)], TCP),
        ]))
        .unwrap();
        assert_eq!(
            v4(&c, "10.0.0.0/8"),
            [pr(53, 53, ALL, 0), pr(443, 443, ALL, 1)]
        );
    }

    #[test]
    fn rule_id_is_the_lowest_contributor() {
        let c = compile(&policy(&[
            (&["10.1.0.0/16"], &[(200, 300)], TCP),
            (&["10.0.0.0/8"], &[(100, 199)], TCP),
            (&["10.1.0.0/16"], &[(150, 250)], TCP),
            (&["10.1.0.0/16"], &[(1000, 1000)], UDP),
            (&["10.0.0.0/8"], &[(1000, 1000)], TCP),
        ]))
        .unwrap();
        assert_eq!(
            v4(&c, "10.0.0.0/8"),
            [pr(100, 199, TCP, 1), pr(1000, 1000, TCP, 4)]
        );
        assert_eq!(
            v4(&c, "10.1.0.0/16"),
            [pr(100, 300, TCP, 0), pr(1000, 1000, ALL, 3)]
        );
    }

    #[test]
    fn too_many_port_rules() {
        let ports: Vec<(u16, u16)> = (0..17).map(|i| (i * 10, i * 10)).collect();
        let p = policy(&[(&["10.0.0.0/8"], &ports, TCP)]);
        let e = compile(&p).unwrap_err();
        let CompileError::TooManyPortRules {
            policy: name,
            path,
            prefix,
            count,
            max,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(
            (
                name.as_str(),
                path.as_path(),
                prefix.to_string(),
                *count,
                *max
            ),
            (
                "t",
                Path::new("t.yaml"),
                "10.0.0.0/8".to_string(),
                17,
                MAX_PORT_RULES
            )
        );
        let shown = e.to_string();
        assert!(
            shown.starts_with("policy \"t\" (t.yaml): destination 10.0.0.0/8 needs 17 port rules")
        );
        assert!(shown.contains("merge port ranges"), "{shown}");

        // Exactly the limit fits.
        let c = compile(&policy(&[(&["10.0.0.0/8"], &ports[..16], TCP)])).unwrap();
        assert_eq!(c.v4[0].2.count, 16);

        // The limit is reached only by inheritance: the error names the inner prefix.
        let e = compile(&policy(&[
            (&["10.0.0.0/8"], &ports[..10], TCP),
            (&["10.1.0.0/16"], &ports[10..], TCP),
        ]))
        .unwrap_err();
        assert!(matches!(
            e,
            CompileError::TooManyPortRules { prefix, count: 17, .. } if prefix.to_string() == "10.1.0.0/16"
        ));
    }

    #[test]
    fn too_many_prefixes() {
        let nets: Vec<IpNet> = (0..=MAX_PREFIXES_V4)
            .map(|i| {
                Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32)
                    .unwrap()
                    .into()
            })
            .collect();
        let mut p = policy(&[(&["10.0.0.0/8"], &[(1, 1)], TCP)]);
        p.rules[0].nets = nets;
        let e = compile(&p).unwrap_err();
        assert!(matches!(
            e,
            CompileError::TooManyPrefixes { family: "IPv4", count, max, .. }
                if count == MAX_PREFIXES_V4 as usize + 1 && max == MAX_PREFIXES_V4 as usize
        ));
        p.rules[0].nets.pop();
        assert_eq!(compile(&p).unwrap().v4.len(), MAX_PREFIXES_V4 as usize);
    }

    #[test]
    fn ipv4_mapped_networks_compile_to_v4() {
        let c = compile(&policy(&[
            (&["::ffff:10.0.0.0/104"], &[(443, 443)], TCP),
            (&["10.0.0.0/8"], &[(80, 80)], TCP),
            (&["::ffff:0:0/96"], &[(53, 53)], UDP),
            (&["::ffff:192.0.2.7"], &[(22, 22)], TCP),
            (&["::/0"], &[(8443, 8443)], TCP),
            (&["::fffe:0:0/95"], &[(7, 7)], TCP),
        ]))
        .unwrap();
        // ::ffff:10.0.0.0/104 and 10.0.0.0/8 are the same entry.
        assert_eq!(
            c.v4.iter().map(|(l, a, _)| (*l, *a)).collect::<Vec<_>>(),
            [(0, [0, 0, 0, 0]), (8, [10, 0, 0, 0]), (32, [192, 0, 2, 7])]
        );
        assert_eq!(v4(&c, "0.0.0.0/0"), [pr(53, 53, UDP, 2)]);
        assert_eq!(
            v4(&c, "10.0.0.0/8"),
            [pr(53, 53, UDP, 2), pr(80, 80, TCP, 1), pr(443, 443, TCP, 0)]
        );
        assert_eq!(
            v4(&c, "192.0.2.7/32"),
            [pr(22, 22, TCP, 3), pr(53, 53, UDP, 2)]
        );
        // Shorter than /96 stays IPv6; ::/0 does not cover IPv4.
        assert_eq!(c.v6.iter().map(|(l, _, _)| *l).collect::<Vec<_>>(), [0, 95]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(kernel_decides(&c, ip("10.9.9.9"), 8443, TCP), None);
        assert_eq!(kernel_decides(&c, ip("::ffff:10.9.9.9"), 443, TCP), Some(0));
        assert_eq!(kernel_decides(&c, ip("2001:db8::1"), 8443, TCP), Some(4));
    }

    #[test]
    fn bare_addresses_and_all_ports() {
        let p = parse_policy(
            Path::new("t.yaml"),
            "name: t\nagents:\n  cgroups: [t]\negress:\n  - cidr: 192.0.2.1\n  - cidr: 2001:db8::1\n    protocol: tcp\n",
        )
        .unwrap();
        let c = compile(&p).unwrap();
        // Every port but 853 (DNS over TLS), which only a rule listing it allows.
        assert_eq!(
            v4(&c, "192.0.2.1/32"),
            [pr(0, 852, ALL, 0), pr(854, 65535, ALL, 0)]
        );
        assert_eq!(
            v6(&c, "2001:db8::1/128"),
            [pr(0, 852, TCP, 1), pr(854, 65535, TCP, 1)]
        );
    }

    #[test]
    fn duplicates_and_degenerate_rules() {
        let c = compile(&policy(&[
            (&["10.0.0.0/8", "10.0.0.0/8"], &[(1, 1), (1, 1)], TCP),
            (&["10.0.0.0/8"], &[], TCP),
            (&["10.0.0.0/8"], &[(5, 5)], 0),
            (&[], &[(9, 9)], TCP),
        ]))
        .unwrap();
        assert_eq!(c.v4.len(), 1);
        assert_eq!(v4(&c, "10.0.0.0/8"), [pr(1, 1, TCP, 0)]);
    }

    /// A small deterministic generator (no external crates).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        fn below(&mut self, n: u32) -> u32 {
            self.next() % n
        }
    }

    /// Random policies over a small address and port space: the compiled tries decide exactly
    /// what the rules say, for every probe.
    #[test]
    fn compiled_decisions_match_the_rules() {
        let mut rng = Lcg(7);
        for round in 0..200 {
            let mut p = policy(&[]);
            for id in 0..(1 + rng.below(8)) {
                let mut nets = Vec::new();
                for _ in 0..(1 + rng.below(2)) {
                    let len = [0u8, 4, 8, 12, 16, 24, 30, 32][rng.below(8) as usize];
                    let addr =
                        0x0a00_0000 | (rng.below(4) << 22) | (rng.below(4) << 12) | rng.below(4);
                    let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
                    nets.push(if rng.below(4) == 0 {
                        let mapped = net.network().to_ipv6_mapped();
                        Ipv6Net::new(mapped, len + 96).unwrap().into()
                    } else {
                        net.into()
                    });
                    if rng.below(3) == 0 {
                        let len = [0u8, 16, 32, 48, 64, 128][rng.below(6) as usize];
                        let addr = Ipv6Addr::new(
                            0x2001,
                            0xdb8,
                            rng.below(2) as u16,
                            0,
                            0,
                            0,
                            0,
                            rng.below(3) as u16,
                        );
                        nets.push(Ipv6Net::new(addr, len).unwrap().trunc().into());
                    }
                }
                let ports = (0..(1 + rng.below(3)))
                    .map(|_| {
                        let lo = rng.below(40) as u16;
                        (lo, lo + rng.below(10) as u16)
                    })
                    .collect();
                p.rules.push(Rule {
                    id,
                    name: None,
                    nets,
                    hosts: Vec::new(),
                    ports,
                    protocols: [TCP, UDP, ALL][rng.below(3) as usize],
                });
            }
            let c = match compile(&p) {
                Ok(c) => c,
                Err(CompileError::TooManyPortRules { .. }) => continue,
                Err(e) => panic!("{e}"),
            };
            for _ in 0..300 {
                let v4 = Ipv4Addr::from(
                    0x0a00_0000 | (rng.below(4) << 22) | (rng.below(4) << 12) | rng.below(4),
                );
                let dst = match rng.below(5) {
                    0 => IpAddr::V6(v4.to_ipv6_mapped()),
                    1 => IpAddr::V6(Ipv6Addr::new(
                        0x2001,
                        0xdb8,
                        rng.below(2) as u16,
                        0,
                        0,
                        0,
                        0,
                        rng.below(3) as u16,
                    )),
                    2 => IpAddr::V4(Ipv4Addr::from(rng.next())),
                    _ => IpAddr::V4(v4),
                };
                let port = rng.below(55) as u16;
                let protocol = [TCP, UDP][rng.below(2) as usize];
                let kernel = kernel_decides(&c, dst, port, protocol);
                assert_eq!(
                    kernel.is_some(),
                    policy_allows(&p, dst, port, protocol),
                    "round {round}: {dst} {port} {protocol}\n{p}\n{c}"
                );
                if let Some(id) = kernel {
                    // The id is one of the rules that contributed to the matched range.
                    assert!((id as usize) < p.rules.len());
                }
            }
        }
    }

    #[test]
    fn dot_port_is_cut_unless_listed() {
        let c = compile(&policy(&[
            (&["10.0.0.0/8"], &[(1, 65535)], ALL),
            (&["10.1.0.0/16"], &[(853, 853)], TCP),
            (&["10.2.0.0/16"], &[(443, 443), (853, 853)], UDP),
            (&["10.3.0.0/16"], &[(850, 860)], TCP),
        ]))
        .unwrap();
        assert_eq!(
            v4(&c, "10.0.0.0/8"),
            [pr(1, 852, ALL, 0), pr(854, 65535, ALL, 0)]
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let decide = |a: &str, port, protocol| kernel_decides(&c, ip(a), port, protocol);
        // "1-65535" does not cover 853; "853" does, for its own networks and protocol.
        assert_eq!(decide("10.9.0.1", 853, TCP), None);
        assert_eq!(decide("10.9.0.1", 852, TCP), Some(0));
        assert_eq!(decide("10.9.0.1", 854, UDP), Some(0));
        // (Merged with rule 0's ranges on either side, the run keeps the lowest id.)
        assert_eq!(decide("10.1.0.1", 853, TCP), Some(0));
        assert_eq!(
            v4(&c, "10.1.0.0/16"),
            [
                pr(1, 852, UDP, 0),
                pr(1, 65535, TCP, 0),
                pr(854, 65535, UDP, 0)
            ]
        );
        assert_eq!(decide("10.1.0.1", 853, UDP), None);
        assert_eq!(decide("10.2.0.1", 853, UDP), Some(0));
        assert_eq!(decide("10.2.0.1", 443, UDP), Some(0));
        // A range containing 853 is not a listing of it.
        assert_eq!(decide("10.3.0.1", 853, TCP), None);
        assert_eq!(decide("10.3.0.1", 855, TCP), Some(0));
        for (a, port, protocol) in [
            ("10.9.0.1", 853, TCP),
            ("10.1.0.1", 853, TCP),
            ("10.1.0.1", 853, UDP),
            ("10.2.0.1", 853, UDP),
            ("10.3.0.1", 853, TCP),
        ] {
            let p = policy(&[
                (&["10.0.0.0/8"], &[(1, 65535)], ALL),
                (&["10.1.0.0/16"], &[(853, 853)], TCP),
                (&["10.2.0.0/16"], &[(443, 443), (853, 853)], UDP),
                (&["10.3.0.0/16"], &[(850, 860)], TCP),
            ]);
            assert_eq!(
                policy_allows(&p, ip(a), port, protocol),
                decide(a, port, protocol).is_some(),
                "{a} {port} {protocol}"
            );
        }
    }

    #[test]
    fn doh_endpoint_addresses_need_a_rule_naming_them() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let wide = policy(&[
            (&["0.0.0.0/0"], &[(443, 443)], TCP),
            (&["::/0"], &[(443, 443), (853, 853)], ALL),
        ]);
        let c = compile(&wide).unwrap();
        for (dst, port, protocol, allowed) in [
            ("93.184.216.34", 443, TCP, true),
            ("1.1.1.1", 443, TCP, false),
            ("::ffff:1.1.1.1", 443, TCP, false),
            ("8.8.8.8", 443, TCP, false),
            ("2001:db8::1", 443, UDP, true),
            ("2001:db8::1", 853, TCP, true),
            ("2606:4700:4700::1111", 443, TCP, false),
            ("2606:4700:4700::1111", 853, UDP, false),
            ("2620:fe::fe", 853, TCP, false),
        ] {
            assert_eq!(
                kernel_decides(&c, ip(dst), port, protocol).is_some(),
                allowed,
                "{dst} {port}\n{c}"
            );
            assert_eq!(
                policy_allows(&wide, ip(dst), port, protocol),
                allowed,
                "{dst} {port}"
            );
        }
        // Each endpoint address has a host route that allows nothing.
        assert_eq!(v4(&c, "1.1.1.1/32"), []);
        assert_eq!(v6(&c, "2606:4700:4700::1111/128"), []);
        assert_eq!(c.v4.len(), 1 + ENDPOINT_V4);

        // Named exactly (in any form), the address is open to that rule's ports.
        let named = policy(&[
            (&["0.0.0.0/0"], &[(443, 443)], TCP),
            (&["1.1.1.1/32"], &[(0, 65535)], TCP),
            (&["::ffff:8.8.8.8"], &[(443, 443), (853, 853)], TCP),
        ]);
        let c = compile(&named).unwrap();
        for (dst, port, allowed) in [
            ("1.1.1.1", 443, true),
            ("1.1.1.1", 853, false),
            ("1.1.1.1", 80, true),
            ("8.8.8.8", 443, true),
            ("8.8.8.8", 853, true),
            ("8.8.4.4", 443, false),
            ("93.184.216.34", 443, true),
        ] {
            assert_eq!(
                kernel_decides(&c, ip(dst), port, TCP).is_some(),
                allowed,
                "{dst} {port}\n{c}"
            );
            assert_eq!(
                policy_allows(&named, ip(dst), port, TCP),
                allowed,
                "{dst} {port}"
            );
        }
        assert_eq!(kernel_decides(&c, ip("1.1.1.1"), 443, TCP), Some(1));

        // Nothing to close: no extra entries.
        let c = compile(&policy(&[(&["0.0.0.0/0"], &[(53, 53)], UDP)])).unwrap();
        assert_eq!(c.v4.len(), 1);
        // Ports around 443 stay open to an endpoint address.
        let c = compile(&policy(&[(&["1.0.0.0/8"], &[(400, 900)], TCP)])).unwrap();
        assert_eq!(
            v4(&c, "1.1.1.1/32"),
            [
                pr(400, 442, TCP, 0),
                pr(444, 852, TCP, 0),
                pr(854, 900, TCP, 0)
            ]
        );
    }

    const ENDPOINT_V4: usize = {
        let mut n = 0;
        let mut i = 0;
        while i < doh::ENDPOINT_ADDRS.len() {
            if doh::ENDPOINT_ADDRS[i].is_ipv4() {
                n += 1;
            }
            i += 1;
        }
        n
    };

    #[test]
    fn cutting_doh_ports_can_reach_the_port_rule_limit() {
        let mut ports: Vec<(u16, u16)> = (1..=14).map(|i| (i * 10, i * 10)).collect();
        ports.push((400, 900));
        // 16 port rules at 0.0.0.0/0 (400-900 is two, around 853); 17 at 1.1.1.1.
        let e = compile(&policy(&[(&["0.0.0.0/0"], &ports, TCP)])).unwrap_err();
        assert!(
            matches!(
                &e,
                CompileError::TooManyPortRules { prefix, count: 17, .. }
                    if prefix.to_string() == "1.0.0.1/32"
            ),
            "{e}"
        );
    }

    /// Rules around DoH endpoint addresses and port 853, with host rules mixed in: the tries
    /// decide what the reference says.
    #[test]
    fn compiled_decisions_match_the_rules_around_resolvers() {
        let nets = [
            "0.0.0.0/0",
            "1.0.0.0/8",
            "1.1.1.0/24",
            "1.1.1.0/31",
            "1.1.1.1/32",
            "8.8.8.8/32",
            "::ffff:1.1.1.1/128",
            "::ffff:1.0.0.0/104",
            "10.0.0.0/8",
            "::/0",
            "2606:4700:4700::/48",
            "2606:4700:4700::1111/128",
        ];
        let port_sets: [&[(u16, u16)]; 7] = [
            &[(443, 443)],
            &[(853, 853)],
            &[(443, 443), (853, 853)],
            &[(440, 860)],
            &[(0, 65535)],
            &[(80, 80), (850, 853)],
            &[(444, 852)],
        ];
        let dsts = [
            "1.1.1.1",
            "1.1.1.0",
            "1.1.1.2",
            "1.0.0.1",
            "8.8.8.8",
            "8.8.4.4",
            "93.184.216.34",
            "10.1.1.1",
            "::ffff:1.1.1.1",
            "2606:4700:4700::1111",
            "2606:4700:4700::1001",
            "2606:4700:4700::1",
            "2001:db8::1",
        ]
        .map(|s| s.parse::<IpAddr>().unwrap());
        let probe_ports = [0u16, 80, 442, 443, 444, 852, 853, 854, 860, 65535];
        let mut rng = Lcg(11);
        for round in 0..300 {
            let mut p = policy(&[]);
            for id in 0..(1 + rng.below(6)) {
                let host_rule = rng.below(5) == 0;
                p.rules.push(Rule {
                    id,
                    name: None,
                    nets: if host_rule {
                        Vec::new()
                    } else {
                        (0..(1 + rng.below(2)))
                            .map(|_| {
                                parse_net(nets[rng.below(nets.len() as u32) as usize]).unwrap()
                            })
                            .collect()
                    },
                    hosts: if host_rule {
                        vec![crate::policy::HostPattern::parse("one.one.one.one").unwrap()]
                    } else {
                        Vec::new()
                    },
                    ports: port_sets[rng.below(port_sets.len() as u32) as usize].to_vec(),
                    protocols: [TCP, UDP, ALL][rng.below(3) as usize],
                });
            }
            let c = match compile(&p) {
                Ok(c) => c,
                Err(e) => panic!("round {round}: {e}\n{p}"),
            };
            for dst in dsts {
                for port in probe_ports {
                    for protocol in [TCP, UDP] {
                        assert_eq!(
                            kernel_decides(&c, dst, port, protocol).is_some(),
                            policy_allows(&p, dst, port, protocol),
                            "round {round}: {dst} {port} {protocol}\n{p}\n{c}"
                        );
                    }
                }
            }
        }
    }
}
