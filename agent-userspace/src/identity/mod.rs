//! Who is who: registered agent cgroups and the policies they run under, shared (read-only) with
//! the event pipeline so each decision can be named.

use std::collections::HashMap;

pub mod cgroup;
pub mod watch;

/// A registered agent cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentMeta {
    /// The agent's name: the last component of its cgroup path.
    pub name: String,
    /// Path relative to the cgroup2 root.
    pub cgroup: String,
    pub policy: String,
}

/// An installed version of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMeta {
    pub name: String,
    pub version: u32,
    /// Rule names by rule id (None when the rule has no name).
    pub rules: Vec<Option<String>>,
    /// The `unix` entries as written, by entry index.
    pub unix: Vec<String>,
}

/// Names for the ids the kernel reports. Policy entries are kept after a reload so events still
/// in flight for the old version are named correctly.
#[derive(Debug, Default, Clone)]
pub struct Names {
    pub agents: HashMap<u64, AgentMeta>,
    pub policies: HashMap<u32, PolicyMeta>,
    /// Task slots the kernel stamps into events -> the task (kept after the task ends, for
    /// events still in flight; slots are never reused).
    pub tasks: HashMap<u32, TaskMeta>,
    /// Names the DNS proxy resolved: id (`RESOLVED_ID_BIT | n`) -> host name, and each agent's
    /// live resolved addresses -> the id of the latest name that resolved there, and since when
    /// (CLOCK_BOOTTIME ns).
    pub hosts: HashMap<u32, String>,
    pub resolved: HashMap<(u64, std::net::IpAddr), (u32, u64)>,
}

/// A task as records name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMeta {
    pub id: String,
    pub intent: String,
}

impl Names {
    /// The host name an agent had resolved `addr` as at `at_ns` (reason `host`: the resolution
    /// `rule_id` names it).
    pub fn host_of(
        &self,
        agent: u64,
        addr: std::net::IpAddr,
        at_ns: u64,
        resolution: Option<u32>,
    ) -> Option<&str> {
        let id = match resolution {
            Some(id) => id,
            None => {
                self.resolved
                    .get(&(agent, addr))
                    .filter(|(_, since)| *since <= at_ns)?
                    .0
            }
        };
        self.hosts.get(&id).map(String::as_str)
    }

    pub fn rule_name(&self, policy_id: u32, rule_id: u32) -> Option<&str> {
        self.policies
            .get(&policy_id)?
            .rules
            .get(rule_id as usize)?
            .as_deref()
    }

    /// The `unix` entry a Unix-socket decision names.
    pub fn unix_entry(&self, policy_id: u32, rule_id: u32) -> Option<&str> {
        self.policies
            .get(&policy_id)?
            .unix
            .get(rule_id as usize)
            .map(String::as_str)
    }
}

/// The agent name for a cgroup path: its last component.
pub fn agent_name(rel_cgroup: &str) -> String {
    rel_cgroup
        .rsplit('/')
        .find(|c| !c.is_empty())
        .unwrap_or("")
        .to_string()
}

/// Validates an agent name given to `agentwall exec --agent`: one cgroup path component.
pub fn valid_agent_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_name_is_the_last_component() {
        assert_eq!(agent_name("agentwall/demo"), "demo");
        assert_eq!(agent_name("demo"), "demo");
        assert_eq!(agent_name("a/b/c/"), "c");
    }

    #[test]
    fn agent_names_are_single_components() {
        assert!(valid_agent_name("research-1"));
        assert!(!valid_agent_name(""));
        assert!(!valid_agent_name(".."));
        assert!(!valid_agent_name("a/b"));
        assert!(!valid_agent_name("a b"));
    }
}
