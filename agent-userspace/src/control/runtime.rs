//! Runtime control: tasks, just-in-time grants and their revocation (issue 10). The wire-neutral
//! requests and replies the control actor takes, and its typed errors (the API maps them to
//! HTTP statuses: `Invalid` 400 naming the field, `NotFound` 404, `Refused` 403, `Conflict` 409,
//! `TooMany` 429, `Internal` 500).

use serde::{Deserialize, Serialize};

/// Who asks. The admin socket's caller (root) or an agent identified by the kernel (the
/// agent socket's SO_PEERCRED pid -> its cgroup -> the nearest registered agent); never by
/// anything in the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Caller {
    Admin { uid: u32 },
    Agent { cgroup_id: u64, pid: u32 },
}

/// Why a runtime-control request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum ControlError {
    /// A field of the request is wrong; nothing changed.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// No such agent, task or grant.
    #[error("{0}")]
    NotFound(String),
    /// Well-formed but not allowed (outside the policy's `grantable` scope, above
    /// `max_grant_ttl`, an agent asking for another agent, ...).
    #[error("{0}")]
    Refused(String),
    /// Conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// Over a bound (pending requests per agent, or in all): nothing was queued.
    #[error("{0}")]
    TooMany(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ControlError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// `task start`: sets the agent's current task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskStart {
    /// Agent name (the last component of its cgroup path) or its cgroup path.
    pub agent: String,
    pub id: String,
    pub intent: String,
    /// Seconds until the task ends by itself (and its grants with it); none: until ended.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A task as the controller holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub agent: String,
    pub id: String,
    pub intent: String,
    /// RFC 3339.
    pub started: String,
    /// RFC 3339; none: until ended.
    pub expires: Option<String>,
    /// The kernel's task slot stamped into this agent's events.
    pub slot: u32,
    /// Who started it.
    pub by: Caller,
}

/// `task end`: the task ended and its grants revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEnded {
    pub agent: String,
    pub id: String,
    pub grants_revoked: Vec<u64>,
    pub sockets_destroyed: u64,
}

/// `grant`: access for an agent to a destination until a deadline the kernel checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub agent: String,
    /// A network or address, as in policy rules (`cidr`).
    pub to: String,
    /// As in policy rules: "443", "8000-8099", comma-separated; none: all ports.
    #[serde(default)]
    pub ports: Option<String>,
    /// tcp | udp | any (default any).
    #[serde(default)]
    pub protocol: Option<String>,
    pub ttl_secs: u64,
    /// Tie the grant to this task of the agent: ending the task revokes it.
    #[serde(default)]
    pub task: Option<String>,
    pub reason: String,
}

/// A live grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub id: u64,
    pub agent: String,
    pub to: String,
    pub ports: String,
    pub protocol: String,
    /// RFC 3339.
    pub expires: String,
    pub task: Option<String>,
    pub reason: String,
    pub by: Caller,
}

/// `revoke`: the grant is gone from the kernel; live connections it allowed were destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub id: u64,
    pub sockets_destroyed: u64,
}

/// `request --from-event`: a denied connection record (its audit `seq`) turned into a pending
/// request for that agent, destination, port and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromEvent {
    pub seq: u64,
    /// The grant's ttl once approved; none: the policy's `max_grant_ttl`.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    pub reason: String,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    /// Not decided in time: counts as denied.
    Expired,
}

/// A request for access that waits for a person (control/requests.rs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestInfo {
    pub id: u64,
    pub agent: String,
    pub to: String,
    pub ports: String,
    pub protocol: String,
    /// The grant's ttl once approved (an approval may shorten it).
    pub ttl_secs: u64,
    pub task: Option<String>,
    pub reason: String,
    pub state: RequestState,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339: when a pending request expires (counts as denied).
    pub expires: String,
    /// Who asked: the agent, or the admin who turned a denied record into a request.
    pub by: Caller,
    /// The audit record (`seq`) it was made from.
    pub from_event: Option<u64>,
    /// The grant its approval created.
    pub grant: Option<u64>,
    /// Who approved or denied it.
    pub decided_by: Option<Caller>,
    /// The reason given with a denial.
    pub decision_reason: Option<String>,
}

/// The answer to an agent's own request for access: granted at once (`approve: auto`) or
/// pending a person's approval (`approve: manual`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Granted(GrantInfo),
    Pending(RequestInfo),
}

/// `approve`: the request and the grant it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approved {
    pub request: RequestInfo,
    pub grant: GrantInfo,
}
