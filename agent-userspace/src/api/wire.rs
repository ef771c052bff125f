//! What travels on the control API: request bodies, replies and the one error shape. These are
//! mirrors of the controller's types (control::runtime) that carry the OpenAPI schema, so the
//! document is generated from exactly what is sent.

use std::path::PathBuf;

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::control::{self, ControlError};

/// Every error the API answers, whatever the route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// What kind of error: `invalid` (400), `permission-denied` (403), `refused` (403),
    /// `not-found` (404), `method-not-allowed` (405), `timeout` (408), `conflict` (409),
    /// `too-large` (413), `too-many` (429), `internal` (500), `unavailable` (503).
    pub error: String,
    /// The request field at fault, for `invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Why, for a person.
    pub message: String,
    #[serde(skip)]
    pub status: u16,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            field: None,
            message: message.into(),
            status: status.as_u16(),
        }
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid", reason)
        }
    }

    pub fn permission_denied() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission-denied",
            "permission denied: the control socket serves root only",
        )
    }

    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the controller is shutting down",
        )
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {field}: {}", self.error, self.message),
            None => write!(f, "{}: {}", self.error, self.message),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid { field, reason } => Self::invalid(field, reason),
            ControlError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "not-found", m),
            ControlError::Refused(m) => Self::new(StatusCode::FORBIDDEN, "refused", m),
            ControlError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            ControlError::TooMany(m) => Self::new(StatusCode::TOO_MANY_REQUESTS, "too-many", m),
            ControlError::Internal(m) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self)).into_response()
    }
}

/// `POST /v1/agents`: register a cgroup as an agent (what `agentwall exec` does first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// Absolute path of the cgroup (below the cgroup2 mount).
    #[schema(value_type = String, example = "/sys/fs/cgroup/agents/coder")]
    pub cgroup: PathBuf,
}

impl RegisterBody {
    pub fn validate(&self) -> Result<(), ApiError> {
        if !self.cgroup.is_absolute() {
            return Err(ApiError::invalid("cgroup", "must be an absolute path"));
        }
        Ok(())
    }
}

/// `POST /v1/policy/apply`: a policy file or directory to apply now, read by the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyBody {
    /// Absolute path of a policy file or directory on the controller's host.
    #[schema(value_type = String, example = "/etc/agentwall/policies")]
    pub path: PathBuf,
}

impl ApplyBody {
    pub fn validate(&self) -> Result<(), ApiError> {
        if !self.path.is_absolute() {
            return Err(ApiError::invalid("path", "must be an absolute path"));
        }
        Ok(())
    }
}

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    pub agent: String,
    /// Relative to the cgroup2 mount.
    pub cgroup: String,
    pub policy: String,
    /// Socket families beyond inet/unix its policy allows (`raw`, `packet`).
    pub sockets: Vec<String>,
    /// Capabilities `exec` keeps for it.
    pub capabilities: Vec<String>,
}

impl From<control::Registration> for Registered {
    fn from(r: control::Registration) -> Self {
        Self {
            agent: r.agent,
            cgroup: r.cgroup,
            policy: r.policy,
            sockets: r.sockets.iter().map(|s| s.to_string()).collect(),
            capabilities: r.capabilities.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// `POST /v1/reload`: the policy directory was re-read and applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reloaded {
    /// Counts applied policy sets.
    pub generation: u32,
}

/// `GET /v1/status`: counters, policies, agents, watched cgroups, kernel state and problems.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = Object)]
pub struct Status(pub serde_json::Value);

/// Who asked: root on the admin socket, or an agent identified by the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Caller {
    Admin { uid: u32 },
    Agent { cgroup_id: u64, pid: u32 },
}

impl From<control::Caller> for Caller {
    fn from(c: control::Caller) -> Self {
        match c {
            control::Caller::Admin { uid } => Self::Admin { uid },
            control::Caller::Agent { cgroup_id, pid } => Self::Agent { cgroup_id, pid },
        }
    }
}

fn required(field: &str, v: &str) -> Result<(), ApiError> {
    if v.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    Ok(())
}

fn positive_ttl(field: &str, v: u64) -> Result<(), ApiError> {
    if v == 0 {
        return Err(ApiError::invalid(field, "must be at least 1 second"));
    }
    Ok(())
}

/// `POST /v1/tasks`: set an agent's current task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskStartBody {
    /// Agent name (the last component of its cgroup path) or its cgroup path.
    #[schema(example = "coder")]
    pub agent: String,
    #[schema(example = "JIRA-1234")]
    pub id: String,
    #[schema(example = "update the dependencies")]
    pub intent: String,
    /// Seconds until the task ends by itself (and its grants with it); absent: until ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

impl TaskStartBody {
    pub fn validate(&self) -> Result<(), ApiError> {
        required("agent", &self.agent)?;
        required("id", &self.id)?;
        required("intent", &self.intent)?;
        if let Some(t) = self.ttl_secs {
            positive_ttl("ttl_secs", t)?;
        }
        Ok(())
    }
}

impl From<TaskStartBody> for control::TaskStart {
    fn from(b: TaskStartBody) -> Self {
        Self {
            agent: b.agent,
            id: b.id,
            intent: b.intent,
            ttl_secs: b.ttl_secs,
        }
    }
}

/// An agent's current task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskInfo {
    pub agent: String,
    pub id: String,
    pub intent: String,
    /// RFC 3339.
    pub started: String,
    /// RFC 3339; null: until ended.
    pub expires: Option<String>,
    /// The kernel's task slot stamped into this agent's events.
    pub slot: u32,
    pub by: Caller,
}

impl From<control::TaskInfo> for TaskInfo {
    fn from(t: control::TaskInfo) -> Self {
        Self {
            agent: t.agent,
            id: t.id,
            intent: t.intent,
            started: t.started,
            expires: t.expires,
            slot: t.slot,
            by: t.by.into(),
        }
    }
}

/// `DELETE /v1/tasks/{agent}`: the task ended and its grants were revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskEnded {
    pub agent: String,
    pub id: String,
    pub grants_revoked: Vec<u64>,
    pub sockets_destroyed: u64,
}

impl From<control::TaskEnded> for TaskEnded {
    fn from(t: control::TaskEnded) -> Self {
        Self {
            agent: t.agent,
            id: t.id,
            grants_revoked: t.grants_revoked,
            sockets_destroyed: t.sockets_destroyed,
        }
    }
}

/// `POST /v1/grants`: access for an agent to a destination until a deadline the kernel checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    #[schema(example = "coder")]
    pub agent: String,
    /// A network or an address, as a policy rule's `cidr`.
    #[schema(example = "127.0.0.1/32")]
    pub to: String,
    /// As in policy rules: "443", "8000-8099", comma-separated; absent: all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "443")]
    pub ports: Option<String>,
    /// `tcp`, `udp` or `any` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[schema(example = 300)]
    pub ttl_secs: u64,
    /// Tie the grant to this task of the agent: ending the task revokes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[schema(example = "fetch the release notes")]
    pub reason: String,
}

impl GrantBody {
    pub fn validate(&self) -> Result<(), ApiError> {
        required("agent", &self.agent)?;
        let to = self.to.trim();
        if to.parse::<ipnet::IpNet>().is_err() && to.parse::<std::net::IpAddr>().is_err() {
            return Err(ApiError::invalid(
                "to",
                format!(
                    "{:?} is not an IP network (a.b.c.d/len) or address",
                    self.to
                ),
            ));
        }
        if let Some(p) = &self.ports {
            required("ports", p)?;
        }
        if let Some(p) = &self.protocol {
            if !matches!(p.as_str(), "tcp" | "udp" | "any") {
                return Err(ApiError::invalid(
                    "protocol",
                    format!("{p:?}: expected tcp, udp or any"),
                ));
            }
        }
        positive_ttl("ttl_secs", self.ttl_secs)?;
        if let Some(t) = &self.task {
            required("task", t)?;
        }
        required("reason", &self.reason)
    }
}

impl From<GrantBody> for control::GrantRequest {
    fn from(b: GrantBody) -> Self {
        Self {
            agent: b.agent,
            to: b.to,
            ports: b.ports,
            protocol: b.protocol,
            ttl_secs: b.ttl_secs,
            task: b.task,
            reason: b.reason,
        }
    }
}

/// A live grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

impl From<control::GrantInfo> for GrantInfo {
    fn from(g: control::GrantInfo) -> Self {
        Self {
            id: g.id,
            agent: g.agent,
            to: g.to,
            ports: g.ports,
            protocol: g.protocol,
            expires: g.expires,
            task: g.task,
            reason: g.reason,
            by: g.by.into(),
        }
    }
}

/// `DELETE /v1/grants/{id}`: the grant is gone from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    pub id: u64,
    /// Live connections it allowed that were destroyed.
    pub sockets_destroyed: u64,
}

impl From<control::Revoked> for Revoked {
    fn from(r: control::Revoked) -> Self {
        Self {
            id: r.id,
            sockets_destroyed: r.sockets_destroyed,
        }
    }
}

/// `POST /v1/explain`: what the kernel would decide now, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExplainBody {
    /// Agent name or cgroup path.
    #[schema(example = "coder")]
    pub agent: String,
    /// ADDR:PORT (`[v6]:port` for IPv6).
    #[schema(example = "127.0.0.1:443")]
    pub to: String,
    /// `tcp` (the default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

impl ExplainBody {
    /// The controller's request, or a 400 naming the field.
    pub fn request(&self) -> Result<control::explain::ExplainRequest, ApiError> {
        required("agent", &self.agent)?;
        let to = self.to.trim().parse().map_err(|_| {
            ApiError::invalid(
                "to",
                format!("{:?} is not ADDR:PORT (a.b.c.d:port or [v6]:port)", self.to),
            )
        })?;
        let protocol = control::explain::parse_protocol(self.protocol.as_deref())
            .map_err(|e| ApiError::invalid("protocol", e))?;
        Ok(control::explain::ExplainRequest {
            agent: self.agent.clone(),
            to,
            protocol,
        })
    }
}

/// The decision and its grounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Explanation {
    pub agent: String,
    /// Cgroup path relative to the cgroup2 root.
    pub cgroup: String,
    pub policy: String,
    /// The version the agent's kernel entry carries (null for a dry run).
    pub policy_version: Option<u32>,
    pub to: String,
    pub protocol: String,
    /// The address the rules judge (the IPv4 one of ::ffff:a.b.c.d).
    pub judged_as: String,
    /// `allow` or `deny`, before the mode.
    pub decision: String,
    /// As records name it: `rule`, `grant`, `default-deny:no-address-match`,
    /// `default-deny:no-port-match`, `deadman:deny-all`, `pending-identity`, `rate-limit`,
    /// `deny:chain-too-deep`.
    pub reason: String,
    pub rule_id: Option<u32>,
    pub rule_name: Option<String>,
    /// The grant that allows it.
    pub grant: Option<GrantInfo>,
    /// Agents whose cgroups enclose this one, nearest first: each judges the call too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// The enclosing agent whose verdict this is (absent: the agent's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// The agent's rate limit and whether a call now is within it (absent: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// The task the agent's records carry now.
    pub task: Option<TaskInfo>,
    /// `enforce` or `audit` (a dead-man audit-all fallback makes it audit).
    pub mode: String,
    /// `off`, `armed` or `fallen-back` (the dead-man fallback decides now).
    pub deadman: String,
    /// What the call gets: `allowed` or `blocked` (EPERM).
    pub action: String,
    /// `kernel` (the live maps) or `policy` (a dry run).
    pub source: String,
}

impl From<control::explain::Explanation> for Explanation {
    fn from(e: control::explain::Explanation) -> Self {
        Self {
            agent: e.agent,
            cgroup: e.cgroup,
            policy: e.policy,
            policy_version: e.policy_version,
            to: e.to,
            protocol: e.protocol,
            judged_as: e.judged_as,
            decision: e.decision,
            reason: e.reason,
            rule_id: e.rule_id,
            rule_name: e.rule_name,
            grant: e.grant.map(Into::into),
            chain: e.chain,
            decided_by: e.decided_by,
            rate_limit: e.rate_limit,
            task: e.task.map(Into::into),
            mode: e.mode,
            deadman: e.deadman,
            action: e.action,
            source: e.source,
        }
    }
}

/// Where a request for access stands: `expired` counts as denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    Expired,
}

impl From<control::RequestState> for RequestState {
    fn from(s: control::RequestState) -> Self {
        match s {
            control::RequestState::Pending => Self::Pending,
            control::RequestState::Approved => Self::Approved,
            control::RequestState::Denied => Self::Denied,
            control::RequestState::Expired => Self::Expired,
        }
    }
}

/// A request for access waiting for a person (or decided: its agent may read the outcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    /// RFC 3339: when a pending request expires (as denied).
    pub expires: String,
    /// Who asked: the agent, or the admin who made it from a denied record.
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

impl From<control::RequestInfo> for RequestInfo {
    fn from(r: control::RequestInfo) -> Self {
        Self {
            id: r.id,
            agent: r.agent,
            to: r.to,
            ports: r.ports,
            protocol: r.protocol,
            ttl_secs: r.ttl_secs,
            task: r.task,
            reason: r.reason,
            state: r.state.into(),
            created: r.created,
            expires: r.expires,
            by: r.by.into(),
            from_event: r.from_event,
            grant: r.grant,
            decided_by: r.decided_by.map(Into::into),
            decision_reason: r.decision_reason,
        }
    }
}

/// `POST /v1/requests`: turn a denied connection record into a pending request for that agent,
/// destination, port and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FromEventBody {
    /// The denied decision record's `seq` in the audit log (this controller's run).
    #[schema(example = 1042)]
    pub from_event: u64,
    /// The grant's ttl once approved; absent: the policy's `max_grant_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[schema(example = "the build needs the package mirror")]
    pub reason: String,
}

impl FromEventBody {
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.from_event == 0 {
            return Err(ApiError::invalid(
                "from_event",
                "must be a record's seq (1 or more)",
            ));
        }
        if let Some(t) = self.ttl_secs {
            positive_ttl("ttl_secs", t)?;
        }
        required("reason", &self.reason)
    }
}

impl From<FromEventBody> for control::FromEvent {
    fn from(b: FromEventBody) -> Self {
        Self {
            seq: b.from_event,
            ttl_secs: b.ttl_secs,
            reason: b.reason,
        }
    }
}

/// `POST /v1/requests/{id}/approve`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    /// Shorten the grant to this ttl (never longer than requested); absent: as requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

impl ApproveBody {
    pub fn validate(&self) -> Result<(), ApiError> {
        match self.ttl_secs {
            Some(t) => positive_ttl("ttl_secs", t),
            None => Ok(()),
        }
    }
}

/// `POST /v1/requests/{id}/deny`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DenyBody {
    /// Why, for the records and the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl DenyBody {
    pub fn validate(&self) -> Result<(), ApiError> {
        match &self.reason {
            Some(r) => required("reason", r),
            None => Ok(()),
        }
    }
}

/// An approved request and the grant it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Approved {
    pub request: RequestInfo,
    pub grant: GrantInfo,
}

impl From<control::Approved> for Approved {
    fn from(a: control::Approved) -> Self {
        Self {
            request: a.request.into(),
            grant: a.grant.into(),
        }
    }
}

/// The query of `GET /v1/events`: which records a stream gets, and in which form. Every
/// parameter is optional; each one set must match (a decision record's fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The agent's name or its cgroup path.
    pub agent: Option<String>,
    /// The policy's verdict: `allow` or `deny`.
    pub decision: Option<String>,
    /// The destination lies in this network (a CIDR or one address).
    pub dst: Option<String>,
    /// The agent's task id at decision time.
    pub task: Option<String>,
    /// `json` (the audit log's records, the default) or `ocsf` (OCSF Network Activity).
    pub format: Option<String>,
}

impl EventsQuery {
    /// Decodes a raw query string; an unknown or repeated parameter is a 400 naming it.
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut q = Self::default();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let slot = match k.as_ref() {
                "agent" => &mut q.agent,
                "decision" => &mut q.decision,
                "dst" => &mut q.dst,
                "task" => &mut q.task,
                "format" => &mut q.format,
                other => {
                    return Err(ApiError::invalid(
                        other,
                        "unknown parameter (agent, decision, dst, task, format)",
                    ))
                }
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(ApiError::invalid(k, "given more than once"));
            }
        }
        Ok(q)
    }

    /// The filter and the format, or a 400 naming the parameter at fault.
    pub fn validate(
        &self,
    ) -> Result<(crate::sinks::fanout::Filter, crate::sinks::Format), ApiError> {
        let filter = crate::sinks::fanout::Filter::parse(
            self.agent.as_deref(),
            self.decision.as_deref(),
            self.dst.as_deref(),
            self.task.as_deref(),
        )
        .map_err(|e| ApiError::invalid(e.field, e.reason))?;
        let format = match self.format.as_deref() {
            None | Some("json") => crate::sinks::Format::Native,
            Some("ocsf") => crate::sinks::Format::Ocsf,
            Some(f) => {
                return Err(ApiError::invalid(
                    "format",
                    format!("{f:?} is not json or ocsf"),
                ))
            }
        };
        Ok((filter, format))
    }
}

/// The stream's own lines, between records: `stream-dropped` (this consumer fell behind and
/// `count` records went by unseen, counted before filtering) and `stream-heartbeat` (nothing to
/// send for a while; the stream is alive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamNotice {
    /// `stream-dropped` or `stream-heartbeat`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}
