//! The benchmark policy, generated at a given size, written once for agentwall (YAML) and once
//! for nftables (a table with a `socket cgroupv2` match and an interval set of equal size).
//!
//! The generated CIDRs come from private and shared ranges that never contain loopback, and do
//! not overlap (nftables interval sets refuse overlapping elements): 60 % /24s from 10.0.0.0/8,
//! 30 % /32s from 100.64.0.0/10, 10 % /28s from 172.16.0.0/12, each allowing TCP 443. One more
//! rule allows the loopback server (TCP and UDP, its two ports), so the workloads are allowed.
//! 198.18.0.0/15 (the benchmarking range) is left free for the single-update test.

use std::{fmt::Write as _, net::Ipv4Addr};

/// Port every generated rule allows (TCP).
pub const GENERATED_PORT: u16 = 443;

/// `n` distinct, non-overlapping IPv4 prefixes; deterministic.
pub fn cidrs(n: usize) -> Vec<(Ipv4Addr, u8)> {
    assert!(
        n <= 100_000 * 10 / 9,
        "the generator's ranges hold about 109,000 rules"
    );
    let (mut c24, mut c32, mut c28) = (0u32, 0u32, 0u32);
    (0..n)
        .map(|i| match i % 10 {
            0..=5 => {
                let a = (10 << 24) | (c24 << 8);
                c24 += 1;
                (Ipv4Addr::from(a), 24)
            }
            6..=8 => {
                let a = (100 << 24) | (64 << 16) | c32;
                c32 += 1;
                (Ipv4Addr::from(a), 32)
            }
            _ => {
                let a = (172 << 24) | (16 << 16) | (c28 << 4);
                c28 += 1;
                (Ipv4Addr::from(a), 28)
            }
        })
        .collect()
}

/// The agentwall policy: the generated rules plus one for the server.
pub fn policy_yaml(
    name: &str,
    audit: bool,
    agent_rel: &str,
    cidrs: &[(Ipv4Addr, u8)],
    server_ports: [u16; 2],
) -> String {
    let mut y = String::with_capacity(64 * cidrs.len() + 512);
    let _ = writeln!(y, "name: {name}");
    let _ = writeln!(y, "mode: {}", if audit { "audit" } else { "enforce" });
    let _ = writeln!(y, "agents:\n  cgroups:\n    - {agent_rel}");
    let _ = writeln!(y, "egress:");
    for (addr, len) in cidrs {
        let _ = writeln!(
            y,
            "  - cidr: {addr}/{len}\n    ports: [{GENERATED_PORT}]\n    protocol: tcp"
        );
    }
    let _ = writeln!(
        y,
        "  - name: bench-server\n    cidr: 127.0.0.1/32\n    ports: [{}, {}]\n    protocol: any",
        server_ports[0], server_ports[1]
    );
    y
}

/// The registration test's policy: it selects every `agent-*` below `parent` (so new cgroups
/// there are judged by `pending: deny` until the controller registers them) and allows the
/// loopback server, so a registered cgroup is told apart from a pending one by a connect.
pub fn registration_policy_yaml(parent: &str, server_ports: [u16; 2]) -> String {
    format!(
        "name: bench-registration\nmode: enforce\npending: deny\nagents:\n  cgroups:\n    - \
         {parent}/agent-*\negress:\n  - name: bench-server\n    cidr: 127.0.0.1/32\n    \
         ports: [{}, {}]\n    protocol: any\n",
        server_ports[0], server_ports[1]
    )
}

/// The same policy for nftables. `cgroup_path` is as nft resolves it (relative to
/// /sys/fs/cgroup), `level` the agent cgroup's level in the cgroup2 hierarchy.
pub fn nft_ruleset(
    table: &str,
    cgroup_path: &str,
    level: u32,
    cidrs: &[(Ipv4Addr, u8)],
    server_ports: [u16; 2],
) -> String {
    let mut t = String::with_capacity(20 * cidrs.len() + 1024);
    let _ = writeln!(t, "table inet {table} {{");
    let _ = writeln!(t, "  set allow4 {{\n    type ipv4_addr\n    flags interval");
    if !cidrs.is_empty() {
        t.push_str("    elements = {\n");
        for (i, (addr, len)) in cidrs.iter().enumerate() {
            let sep = if i + 1 == cidrs.len() { "" } else { "," };
            let _ = writeln!(t, "      {addr}/{len}{sep}");
        }
        t.push_str("    }\n");
    }
    t.push_str("  }\n");
    let _ = writeln!(
        t,
        "  chain output {{\n    type filter hook output priority filter; policy accept;\n    \
         socket cgroupv2 level {level} \"{cgroup_path}\" jump agent\n  }}"
    );
    let _ = writeln!(
        t,
        "  chain agent {{\n    ip daddr @allow4 tcp dport {GENERATED_PORT} accept\n    \
         ip daddr 127.0.0.1 meta l4proto {{ tcp, udp }} th dport {{ {}, {} }} accept\n    \
         reject with icmpx admin-prohibited\n  }}",
        server_ports[0], server_ports[1]
    );
    t.push_str("}\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn cidrs_are_distinct_and_never_loopback() {
        let c = cidrs(100_000);
        assert_eq!(c.len(), 100_000);
        let set: HashSet<_> = c.iter().collect();
        assert_eq!(set.len(), c.len());
        for (a, len) in &c {
            assert!(!a.is_loopback());
            assert!(a.is_private() || a.octets()[0] == 100);
            let host = u32::from(*a) & !(u32::MAX.checked_shl(32 - *len as u32).unwrap_or(0));
            assert_eq!(host, 0, "{a}/{len} has host bits");
        }
        assert_eq!(c.iter().filter(|(_, l)| *l == 24).count(), 60_000);
    }

    #[test]
    fn policy_parses_with_every_rule() {
        let c = cidrs(1000);
        let y = policy_yaml("bench", false, "a/agent", &c, [1000, 2000]);
        let p = agentwall::policy::parse_policy(std::path::Path::new("b.yaml"), &y).unwrap();
        assert_eq!(p.rules.len(), 1001);
        let compiled = agentwall::policy::compile(&p).unwrap();
        assert_eq!(compiled.v4.len(), 1001);
    }

    #[test]
    fn nft_text_has_every_element() {
        let c = cidrs(10);
        let t = nft_ruleset("t", "unified/a/agent", 2, &c, [1, 2]);
        assert_eq!(t.matches("/24").count(), 6);
        assert!(t.contains("socket cgroupv2 level 2 \"unified/a/agent\" jump agent"));
        assert!(t.contains("th dport { 1, 2 } accept"));
    }
}
