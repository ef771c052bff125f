//! Structured policies: rules built with `arbitrary` (networks of both families and IPv4-mapped
//! ones, prefix lengths, port ranges, protocols), written as policy YAML, parsed and compiled.
//!
//! The compiled entries are checked against a direct evaluation of the rules: for every
//! breakpoint destination (each rule network's first address and the one past its last, plus
//! the input's own probes) and every breakpoint port of the rules covering it (each range's
//! low end and the one past its high end, plus the probes'), which together cover every
//! distinct case, a longest-prefix lookup in the compiled v4/v6 lists, as the kernel does it,
//! allows exactly when the rules allow (`Policy::cidr_rule_allowing`: port 853 only for a rule
//! naming it, and 443/853 to a well-known DoH resolver only for a rule naming its address).
//! Also checked: the entries are the rules' distinct prefixes plus host routes of DoH resolver
//! addresses, sorted, without host bits; each entry's port rules are disjoint and maximal per
//! protocol; and the rule id the lookup reports belongs to a rule whose network covers the
//! destination.

#![no_main]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use agent_common::{proto, PortRule, RuleSet, MAX_PORT_RULES};
use agentwall::policy::{compile, doh, parse_policy, CompileError, CompiledPolicy, Policy};
use arbitrary::Arbitrary;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use libfuzzer_sys::fuzz_target;

const MAX_RULES: usize = 16;
const MAX_NETS: usize = 4;
const MAX_PORTS: usize = 6;
const MAX_PROBES: usize = 8;

#[derive(Arbitrary, Debug)]
struct Input {
    rules: Vec<GenRule>,
    probes: Vec<Probe>,
}

#[derive(Arbitrary, Debug)]
struct GenRule {
    nets: Vec<GenNet>,
    /// Empty: `ports` is omitted (all ports).
    ports: Vec<GenPorts>,
    protocol: GenProtocol,
    named: bool,
}

#[derive(Arbitrary, Debug)]
enum GenNet {
    V4(Addr4, u8),
    V6(Addr6, u8),
    /// An IPv4 network written as IPv4-mapped IPv6 (`::ffff:a.b.c.d/96+len`).
    Mapped(Addr4, u8),
}

/// Addresses from a small space collide and nest often; any address reaches the edges.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr4 {
    Near(u8),
    Any(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr6 {
    Near(u8),
    /// Around the IPv4-mapped range `::ffff:0:0/96` and the ends of the space.
    Edge(u8, u8),
    Any(u128),
}

#[derive(Arbitrary, Debug)]
enum GenPorts {
    Near(u8),
    NearRange(u8, u8),
    Any(u16),
    AnyRange(u16, u16),
}

#[derive(Arbitrary, Debug)]
enum GenProtocol {
    Omitted,
    Tcp,
    Udp,
    Any,
}

#[derive(Arbitrary, Debug)]
struct Probe {
    addr: ProbeAddr,
    port: GenPorts,
}

#[derive(Arbitrary, Debug)]
enum ProbeAddr {
    V4(Addr4),
    V6(Addr6),
    Mapped(Addr4),
}

impl Addr4 {
    fn get(self) -> u32 {
        match self {
            Addr4::Near(b) => {
                let b = u32::from(b);
                0x0a00_0000 | ((b & 3) << 16) | (((b >> 2) & 3) << 8) | ((b >> 4) & 0xf)
            }
            Addr4::Any(a) => a,
        }
    }
}

impl Addr6 {
    fn get(self) -> u128 {
        match self {
            Addr6::Near(b) => {
                let b = u128::from(b);
                (0x2001_0db8u128 << 96) | ((b & 3) << 80) | ((b >> 2) & 0x3f)
            }
            Addr6::Edge(which, low) => {
                let low = u128::from(low);
                match which % 6 {
                    0 => low,
                    1 => (0xffffu128 << 32) | low,
                    2 => (0xffffu128 << 32) - 1 - low,
                    3 => (0x1_0000u128 << 32) + low,
                    4 => u128::MAX - low,
                    _ => (0xfffeu128 << 32) | low,
                }
            }
            Addr6::Any(a) => a,
        }
    }
}

impl GenPorts {
    fn get(&self) -> (u16, u16) {
        let sorted = |a: u16, b: u16| (a.min(b), a.max(b));
        match *self {
            GenPorts::Near(p) => (u16::from(p % 64), u16::from(p % 64)),
            GenPorts::NearRange(a, b) => sorted(u16::from(a % 64), u16::from(b % 64)),
            GenPorts::Any(p) => (p, p),
            GenPorts::AnyRange(a, b) => sorted(a, b),
        }
    }
}

impl GenNet {
    fn get(&self) -> IpNet {
        match *self {
            GenNet::V4(a, len) => Ipv4Net::new(Ipv4Addr::from(a.get()), len % 33)
                .unwrap()
                .trunc()
                .into(),
            GenNet::V6(a, len) => Ipv6Net::new(Ipv6Addr::from(a.get()), len % 129)
                .unwrap()
                .trunc()
                .into(),
            GenNet::Mapped(a, len) => {
                Ipv6Net::new(Ipv4Addr::from(a.get()).to_ipv6_mapped(), 96 + len % 33)
                    .unwrap()
                    .trunc()
                    .into()
            }
        }
    }
}

/// The policy YAML for the generated rules, in every form the format allows.
fn policy_text(rules: &[GenRule]) -> String {
    let mut text = String::from("name: fuzz\nagents:\n  cgroups: [agentwall/fuzz]\negress:");
    if rules.is_empty() {
        text.push_str(" []");
    }
    text.push('\n');
    for (i, rule) in rules.iter().enumerate() {
        let nets: Vec<String> = rule.nets.iter().map(|n| n.get().to_string()).collect();
        if rule.named {
            let _ = writeln!(text, "  - name: rule-{i}");
            text.push_str("    ");
        } else {
            text.push_str("  - ");
        }
        match nets.as_slice() {
            [one] if i % 2 == 0 => {
                let _ = writeln!(text, "cidr: {one}");
            }
            _ => {
                let _ = writeln!(text, "cidrs: [{}]", nets.join(", "));
            }
        }
        let ports: Vec<String> = rule
            .ports
            .iter()
            .map(|p| match p.get() {
                (lo, hi) if lo == hi && i % 3 == 0 => format!("\"{lo}\""),
                (lo, hi) if lo == hi => lo.to_string(),
                (lo, hi) => format!("\"{lo}-{hi}\""),
            })
            .collect();
        match ports.as_slice() {
            [] => {}
            [one] if i % 2 == 1 => {
                let _ = writeln!(text, "    ports: {one}");
            }
            _ => {
                let _ = writeln!(text, "    ports: [{}]", ports.join(", "));
            }
        }
        let protocol = match rule.protocol {
            GenProtocol::Omitted => None,
            GenProtocol::Tcp => Some("tcp"),
            GenProtocol::Udp => Some("udp"),
            GenProtocol::Any => Some("any"),
        };
        if let Some(protocol) = protocol {
            let _ = writeln!(text, "    protocol: {protocol}");
        }
    }
    text
}

/// A prefix of the v4 (32-bit) or v6 (128-bit) table, as the policy means it: networks inside
/// `::ffff:0:0/96` are IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Prefix {
    v4: bool,
    addr: u128,
    len: u8,
}

impl Prefix {
    fn of(net: &IpNet) -> Prefix {
        match net {
            IpNet::V4(n) => Prefix {
                v4: true,
                addr: u32::from(n.network()).into(),
                len: n.prefix_len(),
            },
            IpNet::V6(n) => {
                let addr = u128::from(n.network());
                if n.prefix_len() >= 96 && addr >> 32 == 0xffff {
                    Prefix {
                        v4: true,
                        addr: addr & 0xffff_ffff,
                        len: n.prefix_len() - 96,
                    }
                } else {
                    Prefix {
                        v4: false,
                        addr,
                        len: n.prefix_len(),
                    }
                }
            }
        }
    }

    fn bits(&self) -> u32 {
        if self.v4 {
            32
        } else {
            128
        }
    }

    /// The host bits.
    fn host_mask(&self) -> u128 {
        let bits = self.bits();
        let all = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        let len = u32::from(self.len);
        if len == bits {
            0
        } else {
            all >> len
        }
    }

    fn contains(&self, dst: &Dst) -> bool {
        self.v4 == dst.v4 && (self.addr ^ dst.addr) & !self.host_mask() == 0
    }

    fn first(&self) -> u128 {
        self.addr
    }

    fn last(&self) -> u128 {
        self.addr | self.host_mask()
    }
}

/// A destination as the kernel judges it: IPv4-mapped addresses are IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Dst {
    v4: bool,
    addr: u128,
}

impl Dst {
    fn of(ip: IpAddr) -> Dst {
        let ip = match ip {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(a) => Dst {
                v4: true,
                addr: u32::from(a).into(),
            },
            IpAddr::V6(a) => Dst {
                v4: false,
                addr: a.into(),
            },
        }
    }
}

/// What the policy means (the reference the compiled tries must agree with).
fn policy_allows(policy: &Policy, dst: &Dst, port: u16, protocol: u32) -> bool {
    policy
        .cidr_rule_allowing(dst.ip(), port, protocol)
        .is_some()
}

impl Dst {
    fn ip(&self) -> IpAddr {
        if self.v4 {
            IpAddr::V4(Ipv4Addr::from(self.addr as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.addr))
        }
    }
}

/// The host route of a DoH resolver address, as the compiler may add one.
fn doh_route(p: &Prefix) -> bool {
    u32::from(p.len) == p.bits()
        && doh::ENDPOINT_ADDRS
            .iter()
            .any(|a| Dst::of(*a) == Dst { v4: p.v4, addr: p.addr })
}

/// The entry a longest-prefix lookup finds.
fn lookup<'a>(compiled: &'a CompiledPolicy, dst: &Dst) -> Option<(Prefix, &'a RuleSet)> {
    let v4 = compiled.v4.iter().map(|(len, addr, set)| {
        (
            Prefix {
                v4: true,
                addr: u32::from_be_bytes(*addr).into(),
                len: *len,
            },
            set,
        )
    });
    let v6 = compiled.v6.iter().map(|(len, addr, set)| {
        (
            Prefix {
                v4: false,
                addr: u128::from_be_bytes(*addr),
                len: *len,
            },
            set,
        )
    });
    v4.chain(v6)
        .filter(|(p, _)| p.contains(dst))
        .max_by_key(|(p, _)| p.len)
}

/// What the kernel does: the longest prefix, then the port rule for this port and protocol.
/// Returns the reported rule id, or None when denied.
fn kernel_decides(compiled: &CompiledPolicy, dst: &Dst, port: u16, protocol: u32) -> Option<u32> {
    let (prefix, set) = lookup(compiled, dst)?;
    let matching: Vec<&PortRule> = set.rules[..set.count as usize]
        .iter()
        .filter(|r| r.port_lo <= port && port <= r.port_hi && r.protocols & protocol != 0)
        .collect();
    assert!(
        matching.len() <= 1,
        "{prefix:?}: several port rules for {port}/{protocol}: {matching:?}"
    );
    matching.first().map(|r| r.rule_id)
}

/// Per protocol, the ranges of an entry are sorted, disjoint and not adjacent (maximal).
fn check_entry(prefix: &Prefix, set: &RuleSet) {
    let count = set.count as usize;
    assert!(count <= MAX_PORT_RULES, "{prefix:?}: {count} port rules");
    let rules = &set.rules[..count];
    for r in rules {
        assert!(r.port_lo <= r.port_hi, "{prefix:?}: {r:?}");
        assert!(
            [proto::TCP, proto::UDP, proto::ALL].contains(&r.protocols),
            "{prefix:?}: {r:?}"
        );
    }
    for w in rules.windows(2) {
        assert!(
            (w[0].port_lo, w[0].port_hi, w[0].protocols)
                < (w[1].port_lo, w[1].port_hi, w[1].protocols),
            "{prefix:?}: not sorted: {rules:?}"
        );
    }
    for protocol in [proto::TCP, proto::UDP] {
        let mut runs: Vec<(u32, u32)> = rules
            .iter()
            .filter(|r| r.protocols & protocol != 0)
            .map(|r| (u32::from(r.port_lo), u32::from(r.port_hi)))
            .collect();
        runs.sort_unstable();
        for w in runs.windows(2) {
            assert!(
                w[1].0 > w[0].1 + 1,
                "{prefix:?}: protocol {protocol}: ranges {:?} and {:?} overlap or touch",
                w[0],
                w[1]
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let mut rules = input.rules;
    rules.truncate(MAX_RULES);
    for rule in &mut rules {
        rule.nets.truncate(MAX_NETS);
        rule.ports.truncate(MAX_PORTS);
    }
    // Every rule needs a destination.
    rules.retain(|r| !r.nets.is_empty());
    let text = policy_text(&rules);
    let policy = match parse_policy(Path::new("fuzz.yaml"), &text) {
        Ok(p) => p,
        Err(e) => panic!("a generated policy does not parse: {e}\n{text}"),
    };
    assert_eq!(policy.rules.len(), rules.len());

    let compiled = match compile(&policy) {
        Ok(c) => c,
        Err(CompileError::TooManyPortRules { prefix, count, .. }) => {
            assert!(count > MAX_PORT_RULES);
            let p = Prefix::of(&prefix);
            assert!(
                policy
                    .rules
                    .iter()
                    .flat_map(|r| &r.nets)
                    .any(|n| Prefix::of(n) == p),
                "{prefix} is not a rule's network"
            );
            return;
        }
        Err(e) => panic!("{e}\n{text}"),
    };

    // The entries: exactly the distinct prefixes of the rules, sorted, without host bits.
    let wanted: BTreeSet<Prefix> = policy
        .rules
        .iter()
        .flat_map(|r| &r.nets)
        .map(Prefix::of)
        .collect();
    let mut got = Vec::new();
    for (len, addr, set) in &compiled.v4 {
        assert!(*len <= 32);
        let p = Prefix {
            v4: true,
            addr: u32::from_be_bytes(*addr).into(),
            len: *len,
        };
        assert_eq!(p.addr & p.host_mask(), 0, "host bits in {p:?}");
        check_entry(&p, set);
        got.push((p.addr, p.len, p));
    }
    let v4_count = got.len();
    for (len, addr, set) in &compiled.v6 {
        assert!(*len <= 128);
        let p = Prefix {
            v4: false,
            addr: u128::from_be_bytes(*addr),
            len: *len,
        };
        assert_eq!(p.addr & p.host_mask(), 0, "host bits in {p:?}");
        check_entry(&p, set);
        got.push((p.addr, p.len, p));
    }
    assert!(
        got[..v4_count]
            .windows(2)
            .all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1))
            && got[v4_count..]
                .windows(2)
                .all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)),
        "entries not sorted by (address, length) or not distinct"
    );
    let got: BTreeSet<Prefix> = got.into_iter().map(|(_, _, p)| p).collect();
    assert!(
        wanted.is_subset(&got) && got.difference(&wanted).all(doh_route),
        "compiled prefixes differ from the rules' (and DoH resolver host routes)\n{text}"
    );

    // Destinations: for one protocol and port, whether the rules allow is constant between
    // the breakpoints "first address of a network" and "one past its last", so checking each
    // breakpoint checks every destination. The probes are added on top.
    let mut dsts: BTreeSet<Dst> = BTreeSet::new();
    for p in &wanted {
        let max = if p.v4 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        dsts.insert(Dst {
            v4: p.v4,
            addr: p.first(),
        });
        if let Some(addr) = p.last().checked_add(1).filter(|a| *a <= max) {
            dsts.insert(Dst { v4: p.v4, addr });
        }
    }
    // The DoH resolvers the compiler treats apart, and the ports around 443 and 853.
    dsts.extend(doh::ENDPOINT_ADDRS.iter().map(|a| Dst::of(*a)));
    let mut probe_ports: BTreeSet<u16> = [0, 442, 443, 444, 852, 853, 854].into();
    for probe in input.probes.iter().take(MAX_PROBES) {
        let ip = match probe.addr {
            ProbeAddr::V4(a) => IpAddr::V4(a.get().into()),
            ProbeAddr::V6(a) => IpAddr::V6(a.get().into()),
            ProbeAddr::Mapped(a) => IpAddr::V6(Ipv4Addr::from(a.get()).to_ipv6_mapped()),
        };
        dsts.insert(Dst::of(ip));
        let (lo, hi) = probe.port.get();
        probe_ports.extend([lo, hi]);
    }

    // The kernel judges an IPv4-mapped destination by the IPv4 table: one in the IPv6 table's
    // mapped range is never looked up there.
    dsts.retain(|d| d.v4 || d.addr >> 32 != 0xffff);
    for dst in &dsts {
        // Ports: likewise, the breakpoints of the rules that cover this destination.
        let mut ports = probe_ports.clone();
        for rule in &policy.rules {
            if rule.nets.iter().any(|n| Prefix::of(n).contains(dst)) {
                for &(lo, hi) in &rule.ports {
                    ports.insert(lo);
                    ports.extend(hi.checked_add(1));
                }
            }
        }
        for &port in &ports {
            for protocol in [proto::TCP, proto::UDP] {
                let kernel = kernel_decides(&compiled, dst, port, protocol);
                let allowed = policy_allows(&policy, dst, port, protocol);
                assert_eq!(
                    kernel.is_some(),
                    allowed,
                    "{dst:?} port {port} protocol {protocol}: compiled says {kernel:?}, \
                     the rules say {allowed}\n{text}\n{compiled}"
                );
                if let Some(id) = kernel {
                    let rule = policy
                        .rules
                        .get(id as usize)
                        .unwrap_or_else(|| panic!("rule id {id} of {} rules", policy.rules.len()));
                    assert!(
                        rule.nets.iter().any(|n| Prefix::of(n).contains(dst)),
                        "{dst:?}: reported rule {id} does not cover it\n{text}\n{compiled}"
                    );
                }
            }
        }
    }
});
