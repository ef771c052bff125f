//! The audit record: one JSON line per decision or loss, the form every sink writes.

use serde::Serialize;

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AuditRecord {
    /// Per node and boot: one more per record written, with no gap, continued across
    /// controller restarts. After a crash the record being written may appear twice; (boot_id,
    /// seq) identifies it.
    pub seq: u64,
    pub time: String,
    pub node: String,
    /// The kernel's boot id (/proc/sys/kernel/random/boot_id): seq counts within one boot.
    #[serde(default)]
    pub boot_id: String,
    /// "decision" or "lost".
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionRecord>,
    /// For kind "lost": how many events the kernel could not queue since the last report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// For the controller's own notices (`events::Notice`): what happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DecisionRecord {
    pub agent: Option<String>,
    pub agent_cgroup: Option<String>,
    /// When the kernel decided: CLOCK_BOOTTIME ns (exact and monotonic within a boot; `time` is
    /// the wall clock derived from it).
    #[serde(default)]
    pub ktime_ns: u64,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// The executable that made the call: the path the kernel recorded when the process last
    /// exec'd, copied at decision time (see docs/events.md). None when unknown.
    pub exe: Option<String>,
    /// Where `exe` came from: "kernel" (the exec tracker), or "procfs" (a fallback read of
    /// /proc/PID/exe when the record was written, the kernel having none: it may name a later
    /// program, or none for a process already gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_source: Option<String>,
    /// The kernel's path was longer than 255 bytes and is cut short.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exe_truncated: bool,
    /// The caller's parent process (task->real_parent) at decision time.
    #[serde(default)]
    pub ppid: Option<u32>,
    /// The parent's executable, as the kernel recorded it (no fallback).
    #[serde(default)]
    pub parent_exe: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parent_exe_truncated: bool,
    pub uid: u32,
    pub gid: u32,
    pub hook: String,
    pub family: String,
    pub protocol: String,
    /// Destination address (empty for sock_create decisions, which have none).
    pub dst: String,
    pub port: u16,
    /// sock_create decisions: the socket kind (raw, ping, packet, udplite, sctp, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// sock_create and Unix-socket decisions: the socket type (SOCK_RAW = 3, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sock_type: Option<u32>,
    /// Unix-socket decisions: the socket path, or `@name` for an abstract socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_path: Option<String>,
    /// What the policy says: allow or deny.
    pub decision: String,
    /// enforce or audit.
    pub mode: String,
    /// What happened to the call: allowed, blocked, or killed (the process, for a socket it
    /// made against the policy where no hook could refuse it).
    pub action: String,
    pub reason: String,
    pub rule: Option<u32>,
    pub rule_name: Option<String>,
    pub policy: Option<String>,
    pub policy_version: u32,
    /// The agent's task at decision time (stamped by the kernel) and its intent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// Reason `grant`: the grant that allowed it (also in `rule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<u64>,
    /// Agents whose cgroups enclose this agent's, nearest first: each judged the call too
    /// (delegation). Absent when none does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// The enclosing agent whose verdict this is (absent: the agent's own), and its policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by_policy: Option<String>,
    /// The host name the agent resolved this address as, through agentwall's DNS proxy (the
    /// name whose answer allowed it, for reason `host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}
