//! The DNS proxy's control side over the in-memory datapath: which chain of agents allows a name,
//! what an answer writes (ports, levels, clamped deadlines, the cap), and what expiry and a
//! policy switch take away.

use std::net::IpAddr;

use agent_common::{level, proto, GrantSet, RESOLVED_ID_BIT};

use super::{
    dns::{Answered, WritePlan},
    tests::{setup, T},
    *,
};
use crate::{
    datapath::{boottime_ns, GrantPrefix},
    policy::parse_policy,
};

fn policy(name: &str, selector: &str, rules: &str, extra: &str) -> crate::policy::Policy {
    let yaml =
        format!("name: {name}\nagents:\n  cgroups: [\"{selector}\"]\negress:\n{rules}{extra}");
    parse_policy(std::path::Path::new(&format!("{name}.yaml")), &yaml).unwrap()
}

const OUTER: &str = "  - hosts: [\"**.example.com\"]\n    ports: \"443\"\n    protocol: tcp\n";
const INNER: &str = "  - host: api.example.com\n    ports: [80, 443]\n    protocol: tcp\n";

fn nested() -> T {
    setup(
        64,
        &["aw/outer/inner"],
        PolicySet {
            policies: vec![
                policy("outer", "aw/outer", OUTER, ""),
                policy(
                    "inner",
                    "aw/outer/inner",
                    INNER,
                    "dns:\n  ttl_min: 2s\n  ttl_max: 60s\n  grace: 1s\n  max_addresses_per_name: 2\n",
                ),
            ],
        },
    )
}

fn answers(list: &[(&str, u32)]) -> Vec<Answered> {
    list.iter()
        .map(|(a, ttl)| Answered {
            addr: a.parse().unwrap(),
            ttl: *ttl,
        })
        .collect()
}

fn host_entry(t: &T, agent: u64, addr: &str) -> Option<GrantSet> {
    let prefix = match addr.parse::<IpAddr>().unwrap() {
        IpAddr::V4(a) => GrantPrefix::V4(32, a.octets()),
        IpAddr::V6(a) => GrantPrefix::V6(128, a.octets()),
    };
    t.state.enforcer.grants.get(&(agent, prefix)).copied()
}

fn plan(t: &mut T, agent: u64, name: &str) -> WritePlan {
    let v = t.state.judge_name(agent, name);
    assert_eq!(v.decision, "allow", "{v:?}");
    v.plan.expect("an allowed name has a plan")
}

#[test]
fn a_sub_agents_name_needs_every_enclosing_agents_rule() {
    let mut t = nested();
    let inner = t.id("aw/outer/inner");
    let v = t.state.judge_name(inner, "api.example.com");
    assert_eq!((v.decision, v.reason, v.rule), ("allow", "rule", Some(0)));
    // Each item carries the levels whose rule it is: 443 both, 80 the sub-agent's alone.
    let mut items = v.plan.unwrap().items;
    items.sort();
    assert_eq!(
        items,
        [
            ((80, 80), proto::TCP, level::OWN),
            ((443, 443), proto::TCP, level::OWN | level::bit(1)),
        ]
    );
    // The outer agent allows the name; the inner does not: refused, by the inner one.
    let v = t.state.judge_name(inner, "other.example.com");
    assert_eq!(
        (v.decision, v.reason, v.decided_by),
        ("deny", "no-host-match", None)
    );
    // The inner one names it, the outer does not: refused, decided by the outer agent.
    let outer_only = policy("outer", "aw/outer", "  - cidr: 127.0.0.1/32\n", "");
    let inner_policy = policy("inner", "aw/outer/inner", INNER, "");
    t.state
        .apply(PolicySet {
            policies: vec![outer_only, inner_policy],
        })
        .unwrap();
    let v = t.state.judge_name(inner, "api.example.com");
    assert_eq!((v.decision, v.reason), ("deny", "no-host-match"));
    assert_eq!(v.decided_by.as_deref(), Some("outer"));
}

#[test]
fn an_answer_opens_its_addresses_for_the_asking_agent_only_with_clamped_deadlines() {
    let mut t = nested();
    let (outer, inner) = (t.id("aw/outer"), t.id("aw/outer/inner"));
    let p = plan(&mut t, inner, "api.example.com");
    let before = boottime_ns();
    let w = t.state.write_answer(
        &p,
        &answers(&[("192.0.2.1", 0), ("192.0.2.2", 3600), ("192.0.2.3", 30)]),
    );
    // The cap (max_addresses_per_name: 2) keeps the first two; the third is dropped.
    assert_eq!(
        w.kept,
        [
            ("192.0.2.1".parse().unwrap(), 0, Some(3)),
            ("192.0.2.2".parse().unwrap(), 3600, Some(61)),
        ]
    );
    assert_eq!(w.dropped.len(), 1);
    let set = host_entry(&t, inner, "192.0.2.1").expect("written for the asking agent");
    assert_eq!(set.count, 2);
    for g in &set.grants[..2] {
        assert_ne!(g.grant_id & RESOLVED_ID_BIT, 0);
        // ttl 0 -> the floor (2 s) plus the grace (1 s).
        assert!(
            g.deadline_ns >= before + 3_000_000_000
                && g.deadline_ns <= boottime_ns() + 3_000_000_000
        );
    }
    assert!(host_entry(&t, inner, "192.0.2.3").is_none(), "over the cap");
    assert!(
        host_entry(&t, outer, "192.0.2.1").is_none(),
        "nothing for the enclosing agent"
    );
    // Records name the host (from the time it resolved).
    let names = t.state.names.read().unwrap();
    let ip: IpAddr = "192.0.2.2".parse().unwrap();
    assert_eq!(
        names.host_of(inner, ip, u64::MAX, None),
        Some("api.example.com")
    );
    assert_eq!(
        names.host_of(inner, ip, 0, None),
        None,
        "not before it resolved"
    );
}

#[test]
fn expiry_and_a_policy_switch_close_resolved_addresses() {
    let mut t = nested();
    let inner = t.id("aw/outer/inner");
    let p = plan(&mut t, inner, "api.example.com");
    t.state.write_answer(&p, &answers(&[("192.0.2.9", 60)]));
    assert!(host_entry(&t, inner, "192.0.2.9").is_some());
    // A switch that keeps the name allowed keeps the address, with the new rule's ports.
    let wider = policy(
        "inner",
        "aw/outer/inner",
        "  - host: api.example.com\n    ports: \"443\"\n    protocol: tcp\n",
        "",
    );
    let outer = policy("outer", "aw/outer", OUTER, "");
    t.state
        .apply(PolicySet {
            policies: vec![outer.clone(), wider],
        })
        .unwrap();
    let set = host_entry(&t, inner, "192.0.2.9").expect("still allowed");
    assert_eq!(set.count, 1);
    assert_eq!((set.grants[0].port_lo, set.grants[0].port_hi), (443, 443));
    // A switch that no longer allows it closes it at once, not at its deadline.
    let gone = policy(
        "inner",
        "aw/outer/inner",
        "  - host: else.example.com\n",
        "",
    );
    t.state
        .apply(PolicySet {
            policies: vec![outer, gone],
        })
        .unwrap();
    assert!(host_entry(&t, inner, "192.0.2.9").is_none());
    // Expiry: an item past its deadline leaves the trie.
    let p = plan(&mut t, inner, "else.example.com");
    t.state.write_answer(&p, &answers(&[("192.0.2.10", 60)]));
    for items in t
        .state
        .runtime
        .rt
        .resolved
        .get_mut(&inner)
        .unwrap()
        .values_mut()
    {
        for i in items.iter_mut() {
            i.deadline_ns = 1;
        }
    }
    t.state.expire_resolved();
    assert!(host_entry(&t, inner, "192.0.2.10").is_none());
    assert!(t.state.runtime.rt.resolved.is_empty());
}

#[test]
fn the_query_rate_refuses_past_the_burst() {
    let mut t = setup(
        64,
        &["aw/a"],
        PolicySet {
            policies: vec![policy(
                "a",
                "aw/a",
                INNER,
                "dns:\n  query_rate: {per_second: 1, burst: 2}\n",
            )],
        },
    );
    let a = t.id("aw/a");
    let reasons: Vec<&str> = (0..3)
        .map(|_| t.state.judge_name(a, "api.example.com").reason)
        .collect();
    assert_eq!(reasons, ["rule", "rule", "rate-limit"]);
    // A cgroup that is no agent is refused as such.
    assert_eq!(
        t.state.judge_name(12345, "api.example.com").reason,
        "not-an-agent"
    );
}
