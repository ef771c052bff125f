//! What entry each cgroup should have in the kernel's agent map, from the policy set alone:
//! an agent (a selector matches it), a watch (a selector could match something below it; new
//! cgroups there are judged by the pending fallback until registered), exempt (below a watch,
//! but nothing can ever select it), or none. Pure functions: no kernel, no file system.

use std::collections::BTreeMap;

use agent_common::{mode, AgentEntry, MAX_CGROUP_LEVEL};

use crate::{
    identity::cgroup,
    policy::{Pending, Policy, PolicySet},
};

/// One entry the controller wrote to the agent map, keyed by cgroup id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Path relative to the cgroup2 root.
    pub(crate) rel: String,
    pub(crate) level: u32,
    /// What was written (its `kind` tells agent, watch or exempt).
    pub(crate) entry: AgentEntry,
}

/// What a cgroup should be.
#[derive(Debug)]
pub(crate) enum Class<'a> {
    /// Selected by these policies (more than one is a conflict, denied everything).
    Agent(Vec<&'a Policy>),
    /// Not an agent; cgroups below it that are not registered are judged by `mode`.
    Watch(u32),
    /// Below a watch, never selectable: not an agent, no event.
    Exempt,
    /// No entry: outside every watched parent, or below an agent (the agent's policy covers
    /// its descendants; an exempt entry there would free them from it).
    None,
}

/// The watched parents of a policy set: each selector's fixed parent that is not the cgroup2
/// root, with the strictest pending mode of the policies that share it.
pub(crate) fn watched_parents(set: &PolicySet) -> BTreeMap<String, u32> {
    let mut out: BTreeMap<String, u32> = BTreeMap::new();
    for p in &set.policies {
        for s in &p.agents {
            let parent = s.fixed_parent();
            if parent.is_empty() || cgroup::level(&parent) > MAX_CGROUP_LEVEL {
                continue;
            }
            let m = p.pending.as_kernel();
            out.entry(parent)
                .and_modify(|old| *old = strictest(*old, m))
                .or_insert(m);
        }
    }
    out
}

/// Selectors whose fixed parent is the cgroup2 root (`demo`, `research-*`): no watch can cover
/// them, since a watch on the root would judge every process of the node.
pub(crate) fn root_level_selectors(set: &PolicySet) -> Vec<(String, String)> {
    set.policies
        .iter()
        .flat_map(|p| {
            p.agents
                .iter()
                .filter(|s| s.fixed_parent().is_empty())
                .map(|s| (p.name.clone(), s.pattern.clone()))
        })
        .collect()
}

fn strictest(a: u32, b: u32) -> u32 {
    if a == mode::ENFORCE || b == mode::ENFORCE {
        mode::ENFORCE
    } else {
        mode::AUDIT
    }
}

/// The class of the cgroup at `rel` under `set`, whose watched parents are `parents`.
pub(crate) fn classify<'a>(
    set: &'a PolicySet,
    parents: &BTreeMap<String, u32>,
    rel: &str,
) -> Class<'a> {
    let matched = set.find_for_cgroup(rel);
    if !matched.is_empty() {
        return Class::Agent(matched);
    }
    let in_scope = parents.keys().any(|p| {
        rel == p
            || rel
                .strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with('/'))
    });
    if !in_scope || below_an_agent(set, rel) || cgroup::level(rel) > MAX_CGROUP_LEVEL {
        return Class::None;
    }
    let modes: Vec<u32> = set
        .policies
        .iter()
        .filter(|p| p.agents.iter().any(|s| s.could_match_below(rel)))
        .map(|p| p.pending.as_kernel())
        .collect();
    match modes.into_iter().reduce(strictest) {
        Some(m) => Class::Watch(m),
        None => Class::Exempt,
    }
}

/// Whether a proper ancestor of `rel` is selected.
fn below_an_agent(set: &PolicySet, rel: &str) -> bool {
    let mut at = rel;
    while let Some((up, _)) = at.rsplit_once('/') {
        if !set.find_for_cgroup(up).is_empty() {
            return true;
        }
        at = up;
    }
    false
}

#[cfg(test)]
/// The kind of a class's entry (None for `Class::None`).
pub(crate) fn kind_of(class: &Class) -> Option<u32> {
    use agent_common::entry;
    match class {
        Class::Agent(_) => Some(entry::AGENT),
        Class::Watch(_) => Some(entry::WATCH),
        Class::Exempt => Some(entry::EXEMPT),
        Class::None => None,
    }
}

/// "deny" or "audit" for a watch entry's mode.
pub(crate) fn pending_name(m: u32) -> &'static str {
    if m == Pending::Audit.as_kernel() {
        Pending::Audit.as_str()
    } else {
        Pending::Deny.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_policy;
    use agent_common::entry;
    use std::path::Path;

    pub(crate) fn set(policies: &[(&str, &[&str], &str)]) -> PolicySet {
        PolicySet {
            policies: policies
                .iter()
                .map(|(name, cgroups, pending)| {
                    let yaml = format!(
                        "name: {name}\npending: {pending}\nagents:\n  cgroups: [{}]\negress: []\n",
                        cgroups
                            .iter()
                            .map(|c| format!("\"{c}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    parse_policy(Path::new("t.yaml"), &yaml).unwrap()
                })
                .collect(),
        }
    }

    #[test]
    fn fixed_parents_stop_at_the_first_glob_component() {
        let s = set(&[(
            "a",
            &[
                "agentwall/research-*",
                "agentwall/demo",
                "kubepods.slice/**",
                "x/*/y",
                "top",
            ],
            "deny",
        )]);
        let parents = watched_parents(&s);
        assert_eq!(
            parents.keys().collect::<Vec<_>>(),
            ["agentwall", "kubepods.slice", "x"]
        );
        assert_eq!(
            root_level_selectors(&s),
            [("a".to_string(), "top".to_string())]
        );
    }

    #[test]
    fn the_strictest_pending_mode_wins_on_a_shared_parent() {
        let s = set(&[
            ("a", &["p/a-*"], "audit"),
            ("b", &["p/b-*"], "deny"),
            ("c", &["q/*"], "audit"),
        ]);
        let parents = watched_parents(&s);
        assert_eq!(parents["p"], mode::ENFORCE);
        assert_eq!(parents["q"], mode::AUDIT);
    }

    #[test]
    fn cgroups_below_a_watch_are_agents_watches_or_exempt() {
        let s = set(&[("a", &["p/research-*", "p/team/*/bot"], "deny")]);
        let parents = watched_parents(&s);
        let c = |rel| kind_of(&classify(&s, &parents, rel));
        assert_eq!(c("p"), Some(entry::WATCH));
        assert_eq!(c("p/research-1"), Some(entry::AGENT));
        assert_eq!(c("p/other"), Some(entry::EXEMPT));
        assert_eq!(c("p/team"), Some(entry::WATCH));
        assert_eq!(c("p/team/x"), Some(entry::WATCH));
        assert_eq!(c("p/team/x/bot"), Some(entry::AGENT));
        assert_eq!(c("p/team/x/other"), Some(entry::EXEMPT));
        // An agent's descendants stay under its policy: no exempt entry below it.
        assert_eq!(c("p/research-1/child"), None);
        assert_eq!(c("elsewhere"), None);
        assert_eq!(c("pp/research-1"), None);
    }

    #[test]
    fn a_double_star_watches_every_level() {
        let s = set(&[("k", &["kubepods.slice/**/agent-*"], "audit")]);
        let parents = watched_parents(&s);
        assert!(matches!(
            classify(&s, &parents, "kubepods.slice/a/b"),
            Class::Watch(mode::AUDIT)
        ));
    }
}
