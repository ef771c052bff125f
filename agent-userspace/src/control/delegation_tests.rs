//! Delegation and rate limits over the in-memory datapath: the controller keeps each entry's
//! list of enclosing agents current as agents come and go, and `explain` judges the chain and
//! the rate limit as the kernel does.

use agent_common::{entry_flags, MAX_AGENT_CHAIN};

use super::{
    explain::*,
    tests::{setup, T},
    *,
};
use crate::policy::parse_policy;

/// An agent policy selecting `selector`, allowing `cidr` (and an optional rate limit).
fn policy(name: &str, selector: &str, cidr: &str, extra: &str) -> crate::policy::Policy {
    let yaml = format!(
        "name: {name}\nagents:\n  cgroups: [\"{selector}\"]\negress:\n  - cidr: {cidr}\n{extra}"
    );
    parse_policy(std::path::Path::new(&format!("{name}.yaml")), &yaml).unwrap()
}

fn nested() -> T {
    setup(
        64,
        &["aw/outer/inner/tools"],
        PolicySet {
            policies: vec![
                policy("outer", "aw/outer", "127.0.0.0/30", ""),
                policy("inner", "aw/outer/inner", "127.0.0.1/32", ""),
                policy("tools", "aw/outer/inner/tools", "127.0.0.0/8", ""),
            ],
        },
    )
}

fn ask(t: &T, agent: &str, to: &str) -> Explanation {
    t.state
        .explain(ExplainRequest {
            agent: agent.into(),
            to: to.parse().unwrap(),
            protocol: parse_protocol(Some("tcp")).unwrap(),
        })
        .unwrap()
}

#[test]
fn each_entry_lists_the_agents_enclosing_it_nearest_first() {
    let t = nested();
    let (outer, inner) = (t.id("aw/outer"), t.id("aw/outer/inner"));
    assert_eq!(t.entry("aw/outer").enclosing, [0; MAX_AGENT_CHAIN - 1]);
    assert_eq!(t.entry("aw/outer/inner").enclosing, [outer, 0, 0]);
    assert_eq!(t.entry("aw/outer/inner/tools").enclosing, [inner, outer, 0]);
}

#[test]
fn the_lists_follow_agents_that_come_and_go() {
    let mut t = nested();
    let outer = t.id("aw/outer");
    // The middle agent's policy goes: its sub-agent is then enclosed by the outer one only.
    t.state
        .apply(PolicySet {
            policies: vec![
                policy("outer", "aw/outer", "127.0.0.0/30", ""),
                policy("tools", "aw/outer/inner/tools", "127.0.0.0/8", ""),
            ],
        })
        .unwrap();
    assert_eq!(t.entry("aw/outer/inner/tools").enclosing, [outer, 0, 0]);
    // And comes back.
    t.state
        .apply(PolicySet {
            policies: vec![
                policy("outer", "aw/outer", "127.0.0.0/30", ""),
                policy("inner", "aw/outer/inner", "127.0.0.1/32", ""),
                policy("tools", "aw/outer/inner/tools", "127.0.0.0/8", ""),
            ],
        })
        .unwrap();
    let inner = t.id("aw/outer/inner");
    assert_eq!(t.entry("aw/outer/inner/tools").enclosing, [inner, outer, 0]);
}

#[test]
fn nesting_deeper_than_the_chain_is_flagged_for_the_kernel_to_deny() {
    // Five agents nested: the innermost has four enclosing it, one more than the list holds.
    let dirs = "aw/a/b/c/d/e";
    let mut list = Vec::new();
    let mut path = String::from("aw");
    for (i, part) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        path = format!("{path}/{part}");
        list.push(policy(&format!("p{i}"), &path, "127.0.0.1/32", ""));
    }
    let t = setup(64, &[dirs], PolicySet { policies: list });
    assert_eq!(t.entry("aw/a/b/c/d").flags, 0);
    assert_eq!(t.entry("aw/a/b/c/d/e").flags, entry_flags::CHAIN_TOO_DEEP);
    let e = ask(&t, "e", "127.0.0.1:80");
    assert_eq!(
        (e.decision.as_str(), e.reason.as_str()),
        ("deny", "deny:chain-too-deep")
    );
}

#[test]
fn explain_judges_the_chain_and_names_who_decided() {
    let t = nested();
    // tools allows all of 127/8, inner only .1, outer .0/30: .1 passes all three.
    let e = ask(&t, "tools", "127.0.0.1:80");
    assert_eq!((e.decision.as_str(), e.reason.as_str()), ("allow", "rule"));
    assert_eq!(e.chain, vec!["inner".to_string(), "outer".to_string()]);
    assert_eq!(e.decided_by, None);
    // .2: inner denies (the nearest enclosing agent decides).
    let e = ask(&t, "tools", "127.0.0.2:80");
    assert_eq!(e.decision, "deny");
    assert_eq!(e.decided_by.as_deref(), Some("inner"));
    // .9: both enclosing agents deny; the nearest is named.
    let e = ask(&t, "tools", "127.0.0.9:80");
    assert_eq!(e.decided_by.as_deref(), Some("inner"));
    // The outer agent alone allows .2.
    let e = ask(&t, "outer", "127.0.0.2:80");
    assert_eq!((e.decision.as_str(), e.decided_by), ("allow", None));
}

#[test]
fn explain_shows_the_rate_limit_and_when_it_is_spent() {
    let mut t = setup(
        64,
        &["aw/a"],
        PolicySet {
            policies: vec![policy(
                "r",
                "aw/a",
                "127.0.0.0/8",
                "rate_limit:\n  per_second: 10\n  burst: 20\n",
            )],
        },
    );
    let id = t.id("aw/a");
    let e = t.entry("aw/a");
    assert_eq!(
        (e.rate_interval_ns, e.rate_burst_ns),
        (100_000_000, 2_000_000_000)
    );
    let x = ask(&t, "a", "127.0.0.1:80");
    assert_eq!(x.rate_limit.as_deref(), Some("10/s, burst 20: within"));
    assert_eq!(x.decision, "allow");
    // The kernel spent the bucket: its state runs the burst ahead of now.
    let far = crate::datapath::boottime_ns() + 10_000_000_000;
    t.state.enforcer.rate.insert(id, far);
    let x = ask(&t, "a", "127.0.0.1:80");
    assert_eq!(
        x.rate_limit.as_deref(),
        Some("10/s, burst 20: exceeded now")
    );
    assert_eq!(
        (x.decision.as_str(), x.reason.as_str()),
        ("deny", "rate-limit")
    );
}
