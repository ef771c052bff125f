//! Policies: the YAML format, loading (one policy per file, a directory is loaded all or
//! nothing) and compilation into the per-prefix rule sets the kernel's LPM tries hold.
//!
//! The format and its semantics are described in `docs/policy.md`. In short: a policy names its
//! agents by cgroup path (literal or glob) and lists the egress it allows; everything else is
//! denied. A connection is allowed if ANY rule allows it, so [`compile`] gives every prefix the
//! union of the rules of all prefixes that cover it.
//!
//! Every error names `file:line:column` and the reason (see [`PolicyError`]).

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use agent_common::{mode, proto};
use ipnet::IpNet;

mod capacity;
mod compile;
#[cfg(test)]
mod dir_tests;
pub mod doh;
pub mod host;
mod raw;
#[cfg(test)]
mod tests;

pub use capacity::{check_capacity, CapacityError, Family, Usage};
pub use compile::{allow_agent_socket, compile, CompileError, CompiledPolicy, DOT_PORT};
pub use host::{normalize_name, HostPattern};

/// Largest policy file accepted, in bytes. A policy with 100,000 rules is about 5 MiB.
pub const MAX_POLICY_FILE_BYTES: u64 = 32 << 20;

/// Longest cgroup selector, in bytes (PATH_MAX: no longer path can name a cgroup).
pub const MAX_SELECTOR_BYTES: usize = 4096;

/// What happens when the policy denies a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Deny what the policy does not allow.
    #[default]
    Enforce,
    /// Decide the same, let everything through, record the would-be verdict.
    Audit,
}

impl Mode {
    /// The `agent_common::mode::*` value for `AgentEntry::mode`.
    pub fn as_kernel(&self) -> u32 {
        match self {
            Mode::Enforce => mode::ENFORCE,
            Mode::Audit => mode::AUDIT,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `agents.cgroups`: a cgroup path relative to the cgroup2 root, literal or a glob
/// (`*`, `?` and `[...]` stay within one path component, `**` spans any number of components).
#[derive(Clone, Debug)]
pub struct CgroupSelector {
    /// The selector as written, without a leading slash.
    pub pattern: String,
    /// `None` for a literal path (compared as a string).
    glob: Option<glob::Pattern>,
}

const GLOB_OPTIONS: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl CgroupSelector {
    /// Checks and compiles a selector; one leading slash is stripped. The error is the reason.
    pub fn new(pattern: &str) -> Result<CgroupSelector, String> {
        let pattern = pattern.strip_prefix('/').unwrap_or(pattern);
        if pattern.is_empty() {
            return Err("empty cgroup path (the cgroup2 root itself cannot be an agent)".into());
        }
        // Values in messages are cut (`raw::quoted`): a hostile file may hold megabytes in one.
        let shown = raw::quoted(pattern);
        if pattern.len() > MAX_SELECTOR_BYTES {
            return Err(format!(
                "cgroup path {shown} is longer than {MAX_SELECTOR_BYTES} bytes"
            ));
        }
        if pattern.ends_with('/') {
            return Err(format!(
                "cgroup path {shown} ends with '/'; write {}",
                raw::quoted(pattern.trim_end_matches('/'))
            ));
        }
        for component in pattern.split('/') {
            match component {
                "" => return Err(format!("cgroup path {shown} has an empty component (//)")),
                "." | ".." => {
                    return Err(format!("cgroup path {shown} has a {component:?} component"))
                }
                _ => {}
            }
        }
        if pattern.chars().any(char::is_control) {
            return Err(format!("cgroup path {shown} contains a control character"));
        }
        let literal = !pattern.contains(['*', '?', '[', ']']);
        let glob = if literal {
            None
        } else {
            Some(
                glob::Pattern::new(pattern)
                    .map_err(|e| format!("invalid cgroup glob {shown}: {}", e.msg))?,
            )
        };
        Ok(CgroupSelector {
            pattern: pattern.to_string(),
            glob,
        })
    }

    /// Whether the cgroup at `rel_path` (relative to the cgroup2 root, no leading slash) is
    /// selected.
    pub fn matches(&self, rel_path: &str) -> bool {
        match &self.glob {
            None => self.pattern == rel_path,
            Some(glob) => glob.matches_with(rel_path, GLOB_OPTIONS),
        }
    }

    /// Whether the selector is a plain path, without glob characters.
    pub fn is_literal(&self) -> bool {
        self.glob.is_none()
    }

    /// The literal components before the first glob component (`agentwall` for
    /// `agentwall/research-*` and for the literal `agentwall/demo`; `""` for the cgroup2 root,
    /// as for `demo` or `research-*`): the cgroup below which new cgroups may be selected.
    pub fn fixed_parent(&self) -> String {
        let parts: Vec<&str> = self.pattern.split('/').collect();
        let fixed = parts
            .iter()
            .position(|c| is_glob_component(c))
            .unwrap_or(parts.len() - 1);
        parts[..fixed].join("/")
    }

    /// Whether some cgroup strictly below `rel_path` could be selected: every component of
    /// `rel_path` matches the selector's component at the same place, and the selector is
    /// longer (or has a `**` that can span the rest).
    pub fn could_match_below(&self, rel_path: &str) -> bool {
        let pat: Vec<&str> = self.pattern.split('/').collect();
        let path: Vec<&str> = rel_path.split('/').filter(|c| !c.is_empty()).collect();
        for (i, c) in path.iter().enumerate() {
            let Some(p) = pat.get(i) else {
                return false;
            };
            if p.contains("**") {
                return true;
            }
            if !component_matches(p, c) {
                return false;
            }
        }
        pat.len() > path.len()
    }
}

/// A path component written with glob characters.
fn is_glob_component(c: &str) -> bool {
    c.contains(['*', '?', '[', ']'])
}

/// One selector component against one path component.
fn component_matches(pattern: &str, component: &str) -> bool {
    if !is_glob_component(pattern) {
        return pattern == component;
    }
    glob::Pattern::new(pattern)
        .map(|g| g.matches_with(component, GLOB_OPTIONS))
        .unwrap_or(false)
}

/// What a policy's selectable cgroups that are not registered yet fall back to, in the kernel
/// (`pending:`): cgroups below a selector's fixed parent without an entry of their own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Pending {
    /// Deny everything, with reason `pending-identity`.
    #[default]
    Deny,
    /// Allow everything and record it, with reason `pending-identity`.
    Audit,
}

impl Pending {
    /// The `agent_common::mode::*` of a watched parent's entry.
    pub fn as_kernel(&self) -> u32 {
        match self {
            Pending::Deny => mode::ENFORCE,
            Pending::Audit => mode::AUDIT,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Pending::Deny => "deny",
            Pending::Audit => "audit",
        }
    }
}

impl PartialEq for CgroupSelector {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl Eq for CgroupSelector {}

impl fmt::Display for CgroupSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// One entry of `egress`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 0-based index in the file's `egress` list; reported by the kernel as `rule_id`.
    pub id: u32,
    pub name: Option<String>,
    /// As written (host bits are never set; IPv4-mapped IPv6 networks stay IPv6 here). Empty
    /// for a host rule.
    pub nets: Vec<IpNet>,
    /// `host` / `hosts`, normalized; empty for a CIDR rule. A host rule opens no address by
    /// itself: the DNS proxy adds the addresses an agent resolves through it.
    pub hosts: Vec<HostPattern>,
    /// Inclusive ranges as written; `[(0, 65535)]` when `ports` is omitted.
    pub ports: Vec<(u16, u16)>,
    /// `agent_common::proto` bits.
    pub protocols: u32,
}

/// One policy file.
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub agents: Vec<CgroupSelector>,
    pub rules: Vec<Rule>,
    /// `agent_common::sock` bits: socket kinds beyond TCP/UDP the agents may create.
    pub sockets: u32,
    /// What the agents fall back to when the controller stops signalling liveness.
    pub deadman: Option<Deadman>,
    /// Connections and unconnected sends each agent may make, checked in the kernel.
    pub rate_limit: Option<RateLimit>,
    /// Unix sockets the agents may connect or send to (default: none).
    pub unix: Vec<UnixTarget>,
    /// Whether the agents may reach the controller's agent socket (default: yes).
    pub agent_socket: bool,
    /// How cgroups its selectors could match are judged until they are registered.
    pub pending: Pending,
    /// Capabilities `agentwall exec` lets the agents keep (names from [`CAPABILITIES`]).
    pub capabilities: Vec<&'static str>,
    /// What may be granted at run time, for how long, and how agents' own requests are approved.
    pub grants: GrantScope,
    /// How the DNS proxy answers and how long resolved addresses stay open (`dns:`).
    pub dns: DnsPolicy,
    /// The file it was read from.
    pub source: PathBuf,
}

/// A network or address as a rule's `cidr` takes it (no host bits set).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    raw::parse_net(s)
}

/// Ports as a rule's `ports` takes them, comma-separated: "443", "8000-8099,9000".
pub fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    s.split(',')
        .map(|p| raw::parse_port_range(p.trim()))
        .collect()
}

/// `tcp`, `udp` or `any` as `agent_common::proto` bits.
pub fn parse_protocol(s: &str) -> Result<u32, String> {
    match s {
        "tcp" => Ok(agent_common::proto::TCP),
        "udp" => Ok(agent_common::proto::UDP),
        "any" => Ok(agent_common::proto::ALL),
        _ => Err(format!(
            "unknown protocol {}: expected \"tcp\", \"udp\" or \"any\"",
            raw::quoted(s)
        )),
    }
}

/// The `dns:` block: how the DNS proxy treats these agents' queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsPolicy {
    /// The answer to a query for a name no rule allows.
    pub denied_answer: DeniedAnswer,
    /// Floor for a resolved address's lifetime, in seconds (`ttl_min`, default 5 s).
    pub ttl_min_secs: u32,
    /// Ceiling, in seconds (`ttl_max`, default 1 h, at most 1 day).
    pub ttl_max_secs: u32,
    /// Added after the clamped TTL, in seconds (`grace`, default 10 s).
    pub grace_secs: u32,
    /// Most addresses kept per name and agent (1 to 64, default 16).
    pub max_addresses_per_name: u32,
    /// Queries per second each agent may send (default: no limit).
    pub query_rate: Option<RateLimit>,
}

/// Longest `dns.ttl_max` (and `ttl_min`), in seconds.
pub const MAX_DNS_TTL_SECS: u32 = 86_400;
/// Longest `dns.grace`, in seconds.
pub const MAX_DNS_GRACE_SECS: u32 = 3_600;
/// Largest `dns.max_addresses_per_name`.
pub const MAX_ADDRESSES_PER_NAME: u32 = 64;

impl Default for DnsPolicy {
    fn default() -> Self {
        DnsPolicy {
            denied_answer: DeniedAnswer::Refused,
            ttl_min_secs: 5,
            ttl_max_secs: 3_600,
            grace_secs: 10,
            max_addresses_per_name: 16,
            query_rate: None,
        }
    }
}

impl DnsPolicy {
    /// How long an address resolved with `ttl` seconds stays open: the TTL clamped to
    /// `[ttl_min, ttl_max]`, plus the grace.
    pub fn lifetime_secs(&self, ttl: u32) -> u32 {
        ttl.clamp(self.ttl_min_secs, self.ttl_max_secs)
            .saturating_add(self.grace_secs)
    }
}

/// What a denied query gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeniedAnswer {
    /// RCODE 5, REFUSED.
    #[default]
    Refused,
    /// RCODE 3, NXDOMAIN.
    NxDomain,
}

impl DeniedAnswer {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeniedAnswer::Refused => "refused",
            DeniedAnswer::NxDomain => "nxdomain",
        }
    }
}

impl fmt::Display for DeniedAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Rule {
    /// Whether the destination is `host` / `hosts` rather than networks.
    pub fn is_host_rule(&self) -> bool {
        !self.hosts.is_empty()
    }

    /// Whether the rule lists the DNS-over-TLS port on its own (`853`, or `443,853`): only then
    /// does it allow 853 (see [`Rule::effective_ports`]).
    pub fn names_dot_port(&self) -> bool {
        self.ports.contains(&(DOT_PORT, DOT_PORT))
    }

    /// The port ranges the rule allows in force: `ports` without 853 (DNS over TLS and QUIC),
    /// unless the rule lists 853 itself as a single port. Sorted, merged. The kernel tries and
    /// the addresses the DNS proxy opens for a host rule use these.
    pub fn effective_ports(&self) -> Vec<(u16, u16)> {
        let mut ranges: Vec<(u16, u16)> = self
            .ports
            .iter()
            .copied()
            .filter(|(lo, hi)| lo <= hi)
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len() + 1);
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        if self.names_dot_port() {
            return merged;
        }
        compile::cut_port(&merged, DOT_PORT)
    }
}

impl Policy {
    /// The egress rules whose `host`/`hosts` cover `name` (as [`normalize_name`] gives it), in
    /// rule order. A wildcard never covers a well-known DoH/DoT endpoint name ([`doh`]): only
    /// an exact `host:` naming it does.
    pub fn host_rules<'a>(&'a self, name: &str) -> Vec<&'a Rule> {
        let endpoint = doh::is_endpoint_name(name);
        self.rules
            .iter()
            .filter(|r| {
                r.hosts
                    .iter()
                    .any(|h| (!endpoint || h.is_exact()) && h.matches(name))
            })
            .collect()
    }
}

/// A policy's `grantable`, `max_grant_ttl` and `approve`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantScope {
    /// A grant must lie inside one of these (same shape as `egress` rules); empty: no grants.
    pub grantable: Vec<Rule>,
    /// The longest grant in seconds (0 when `grantable` is empty).
    pub max_ttl_secs: u64,
    pub approve: Approve,
}

/// Whether an agent's own request inside `grantable` is granted at once or waits for a person.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Approve {
    Auto,
    #[default]
    Manual,
}

/// One entry of `unix`; its index in the list is the `rule_id` the kernel reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnixTarget {
    /// `/run/x.sock`: this socket path exactly.
    Path(String),
    /// `/run/tools/`: any socket path under this directory (never one with a `..` component).
    Directory(String),
    /// `@name`: the abstract socket `name`.
    Abstract(String),
}

/// Longest exact socket path: `sun_path` holds it with its terminating NUL.
pub const MAX_UNIX_PATH: usize = agent_common::UNIX_PATH_MAX - 1;
/// Longest abstract name: after the leading NUL, with a NUL after it to make the match exact.
pub const MAX_UNIX_ABSTRACT: usize = agent_common::UNIX_PATH_MAX - 2;

impl UnixTarget {
    /// Checks one `unix` entry; the error is the reason.
    pub fn parse(s: &str) -> Result<UnixTarget, String> {
        let shown = raw::quoted(s);
        if s.contains('\0') || s.chars().any(char::is_control) {
            return Err(format!("unix entry {shown} contains a control character"));
        }
        if let Some(name) = s.strip_prefix('@') {
            if name.is_empty() || name.len() > MAX_UNIX_ABSTRACT {
                return Err(format!(
                    "abstract socket name {shown} must have 1 to {MAX_UNIX_ABSTRACT} bytes after '@'"
                ));
            }
            return Ok(UnixTarget::Abstract(name.to_string()));
        }
        if !s.starts_with('/') {
            return Err(format!(
                "unix entry {shown}: expected an absolute socket path (/run/x.sock), a directory \
                 ending in '/' (/run/tools/) or an abstract name (@name)"
            ));
        }
        let is_dir = s.ends_with('/');
        let body = s.trim_start_matches('/').trim_end_matches('/');
        for component in body.split('/').filter(|_| !body.is_empty()) {
            match component {
                "" => return Err(format!("unix path {shown} has an empty component (//)")),
                "." | ".." => {
                    return Err(format!(
                        "unix path {shown} has a {component:?} component; write the path as the \
                         agent will (agents' paths with '..' are always refused)"
                    ))
                }
                _ => {}
            }
        }
        if s.starts_with("//") || (is_dir && s.ends_with("//")) {
            return Err(format!("unix path {shown} has an empty component (//)"));
        }
        if is_dir {
            if s.len() > agent_common::UNIX_PATH_MAX {
                return Err(format!(
                    "unix directory {shown} is longer than {} bytes",
                    agent_common::UNIX_PATH_MAX
                ));
            }
            Ok(UnixTarget::Directory(s.to_string()))
        } else {
            if s.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "unix path {shown} is longer than {MAX_UNIX_PATH} bytes (sun_path holds 108 \
                     with the terminating NUL)"
                ));
            }
            Ok(UnixTarget::Path(s.to_string()))
        }
    }

    /// The trie key's path bytes and how many of their bits must match.
    pub fn key(&self) -> (u32, [u8; agent_common::UNIX_PATH_MAX]) {
        let mut path = [0u8; agent_common::UNIX_PATH_MAX];
        let len = match self {
            // With the NUL after it: this path and no longer one.
            UnixTarget::Path(p) => {
                path[..p.len()].copy_from_slice(p.as_bytes());
                p.len() + 1
            }
            // Without a NUL: every path that starts with it.
            UnixTarget::Directory(d) => {
                path[..d.len()].copy_from_slice(d.as_bytes());
                d.len()
            }
            // A leading NUL as in sun_path, and a NUL after the name.
            UnixTarget::Abstract(n) => {
                path[1..1 + n.len()].copy_from_slice(n.as_bytes());
                n.len() + 2
            }
        };
        (len as u32 * 8, path)
    }
}

impl fmt::Display for UnixTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnixTarget::Path(p) | UnixTarget::Directory(p) => f.write_str(p),
            UnixTarget::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

impl Policy {
    /// The names of the `sockets` kinds this policy allows.
    pub fn socket_kind_names(&self) -> Vec<&'static str> {
        SOCKET_KINDS
            .iter()
            .filter(|(_, bit)| self.sockets & bit != 0)
            .map(|(name, _)| *name)
            .collect()
    }
}

/// Largest `rate_limit` value (per second, or burst).
pub const MAX_RATE: u64 = 1_000_000;

/// A per-agent rate limit on connections and unconnected sends together: `per_second` on
/// average, up to `burst` at once after a quiet time. The kernel keeps a token bucket per agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    /// The agent entry's `(rate_interval_ns, rate_burst_ns)`.
    pub fn kernel(&self) -> (u64, u64) {
        let interval = 1_000_000_000 / u64::from(self.per_second.max(1));
        (interval, interval * u64::from(self.burst.max(1)))
    }
}

/// A dead-man switch: after `after_secs` without a controller heartbeat the kernel applies
/// `fallback` to the policy's agents, until the controller is back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadman {
    pub after_secs: u32,
    pub fallback: Fallback,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    DenyAll,
    AuditAll,
}

impl Fallback {
    pub fn as_kernel(&self) -> u32 {
        match self {
            Fallback::DenyAll => agent_common::deadman::DENY_ALL,
            Fallback::AuditAll => agent_common::deadman::AUDIT_ALL,
        }
    }
}

/// Names of the `sockets:` kinds and their `agent_common::sock` bits.
pub const SOCKET_KINDS: [(&str, u32); 8] = [
    ("raw", agent_common::sock::RAW),
    ("ping", agent_common::sock::PING),
    ("packet", agent_common::sock::PACKET),
    ("udplite", agent_common::sock::UDPLITE),
    ("sctp", agent_common::sock::SCTP),
    ("mptcp", agent_common::sock::MPTCP),
    ("other-inet", agent_common::sock::OTHER_INET),
    ("other-family", agent_common::sock::OTHER_FAMILY),
];

/// Capabilities a policy may let its agents keep (`capabilities:`), as policy names and the
/// kernel's. None of them lets an agent leave its cgroup, touch bpffs or signal other users'
/// processes; every other capability could undo containment and is refused. Risks: docs/exec.md.
pub const CAPABILITIES: [(&str, caps::Capability); 3] = [
    ("net_raw", caps::Capability::CAP_NET_RAW),
    ("net_bind_service", caps::Capability::CAP_NET_BIND_SERVICE),
    ("ipc_lock", caps::Capability::CAP_IPC_LOCK),
];

/// The kernel capability of a `capabilities:` name.
pub fn capability(name: &str) -> Option<caps::Capability> {
    CAPABILITIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
}

impl Policy {
    /// What `exec` keeps for this policy's agents: `capabilities`, and `net_raw` when `sockets`
    /// lists raw or packet sockets (which need it).
    pub fn kept_capabilities(&self) -> Vec<&'static str> {
        let mut kept = self.capabilities.clone();
        if self.sockets & (agent_common::sock::RAW | agent_common::sock::PACKET) != 0
            && !kept.contains(&"net_raw")
        {
            kept.push("net_raw");
        }
        kept
    }
}

pub fn socket_kind_bit(name: &str) -> Option<u32> {
    SOCKET_KINDS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
}

/// The name of one `agent_common::sock` bit.
pub fn socket_kind_name(bit: u32) -> Option<&'static str> {
    SOCKET_KINDS
        .iter()
        .find(|(_, b)| *b == bit)
        .map(|(n, _)| *n)
}

/// Every policy of a directory, sorted by name.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
}

impl PolicySet {
    /// All policies with a selector matching the cgroup at `rel_path` (relative to the cgroup2
    /// root; one leading slash is ignored), in name order.
    pub fn find_for_cgroup(&self, rel_path: &str) -> Vec<&Policy> {
        let rel_path = rel_path.strip_prefix('/').unwrap_or(rel_path);
        self.policies
            .iter()
            .filter(|p| p.agents.iter().any(|a| a.matches(rel_path)))
            .collect()
    }

    /// The policy called `name`.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }
}

/// Why a policy file or directory was rejected. Every variant names the file; those about the
/// content name `file:line:column` too (line and column count from 1; 0 when unknown).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file or directory could not be read.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is larger than [`MAX_POLICY_FILE_BYTES`].
    #[error("{}: file is {size} bytes, more than the limit of {limit} bytes", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// The content is invalid: YAML syntax, structure, a value, or a limit.
    #[error("{}{}: {message}", path.display(), LineColumn(*line, *column))]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    /// Two files of a directory clash (the same policy name or cgroup selector).
    #[error(
        "{}{}: {message} (also in {}{})",
        path.display(),
        LineColumn(*line, *column),
        other_path.display(),
        LineColumn(*other_line, *other_column)
    )]
    Conflict {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
        other_path: PathBuf,
        other_line: u64,
        other_column: u64,
    },
    /// More than one file of a directory is invalid; one error per line.
    #[error("{}", DisplayLines(.0))]
    Several(Vec<PolicyError>),
    /// A directory entry is a symbolic link that leads out of the directory (or is absolute);
    /// it is not read, so nothing of what it points to can reach a message.
    #[error(
        "{}: a symbolic link out of the policy directory{}; policy files must be in the \
         directory (links between its own entries are fine); it was not read",
        path.display(),
        target.as_deref().map(|t| format!(" (to {})", raw::quoted(&t.to_string_lossy()))).unwrap_or_default()
    )]
    OutsideDir {
        path: PathBuf,
        target: Option<PathBuf>,
    },
    /// A directory holds no policy file. Refused rather than read as an empty set: a controller
    /// whose policy directory was emptied (or mounted wrong) must not unregister every agent.
    #[error("no policy files (*.yaml, *.yml) in {}", dir.display())]
    NoPolicyFiles { dir: PathBuf },
}

/// `:line:column`, or nothing when the location is unknown.
struct LineColumn(u64, u64);

impl fmt::Display for LineColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            Ok(())
        } else {
            write!(f, ":{}:{}", self.0, self.1)
        }
    }
}

struct DisplayLines<'a>(&'a [PolicyError]);

impl fmt::Display for DisplayLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl PolicyError {
    /// `(line, column)` of the first problem, when known.
    pub fn line_column(&self) -> Option<(u64, u64)> {
        match self {
            PolicyError::Invalid { line, column, .. }
            | PolicyError::Conflict { line, column, .. }
                if *line > 0 =>
            {
                Some((*line, *column))
            }
            PolicyError::Several(errors) => errors.first().and_then(PolicyError::line_column),
            _ => None,
        }
    }
}

/// Parses one policy from `text`; `source` names the file in errors and in [`Policy::source`].
pub fn parse_policy(source: &Path, text: &str) -> Result<Policy, PolicyError> {
    raw::parse(source, text).map(|(policy, _)| policy)
}

/// Reads and parses one policy file.
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    load_file_located(path).map(|(policy, _)| policy)
}

fn load_file_located(path: &Path) -> Result<(Policy, raw::Locations), PolicyError> {
    let file = open_file(path, |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    })?;
    read_located(path, file)
}

fn read_located(path: &Path, file: std::fs::File) -> Result<(Policy, raw::Locations), PolicyError> {
    let text = read_text(path, file)?;
    raw::parse(path, &text)
}

/// Opens a policy file with `open` (given the flags to add) and checks it is a regular file.
/// O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below); it changes
/// nothing for a regular file.
fn open_file(
    path: &Path,
    open: impl FnOnce(i32) -> std::io::Result<std::fs::File>,
) -> Result<std::fs::File, PolicyError> {
    let io = |error| PolicyError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = open(libc::O_NONBLOCK).map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        // A device (/dev/zero, a tty), FIFO or socket: unbounded, or blocks, or both.
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(file)
}

/// Opens `name` in the directory `dir` without leaving it: a symlink may lead to another entry
/// of the directory (a Kubernetes ConfigMap volume is made of those), never out of it, nor be
/// absolute. openat2 (Linux 5.6; the ring buffer agentwall needs came in 5.8) does the check in
/// the kernel, in the same step as the open, so nothing can be swapped in between.
fn open_beneath(
    dir: &std::fs::File,
    name: &std::ffi::OsStr,
    flags: i32,
) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;

    let name = std::ffi::CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: open_how is plain data; every field is set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | flags) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid dirfd, NUL-terminated name, and a pointer to `how` with its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
}

/// Reads a regular file of at most [`MAX_POLICY_FILE_BYTES`] as UTF-8. The size is checked
/// before anything is read, and nothing past the limit is ever read.
fn read_text(path: &Path, file: std::fs::File) -> Result<String, PolicyError> {
    let io = |error| PolicyError::Io {
        path: path.to_path_buf(),
        error,
    };
    let too_large = |size| PolicyError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit: MAX_POLICY_FILE_BYTES,
    };
    let size = file.metadata().map_err(io)?.len();
    if size > MAX_POLICY_FILE_BYTES {
        return Err(too_large(size));
    }
    // The file may grow after the metadata check: never read more than the limit + 1 byte.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_POLICY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count() as u64
            + 1;
        PolicyError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message: "file is not valid UTF-8".into(),
        }
    })
}

/// Whether a directory entry is a policy file: `*.yaml` or `*.yml`, not hidden (editor
/// backups and the `..data` entries of Kubernetes ConfigMap volumes are skipped).
fn is_policy_file_name(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// The policy files of the directory `dir`, sorted by path, each opened once (what was checked
/// is what is read): regular files only, none through a symlink out of `dir`. Directories with
/// a policy file's name are skipped; every other refusal is an error naming the entry.
type Opened = (PathBuf, Result<std::fs::File, PolicyError>);

fn open_dir_files(dir: &Path) -> Result<Vec<Opened>, PolicyError> {
    let io = |path: &Path, error| PolicyError::Io {
        path: path.to_path_buf(),
        error,
    };
    let dir_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| io(dir, e))?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let name = entry.file_name();
        if !name.to_str().is_some_and(is_policy_file_name) {
            continue;
        }
        let path = entry.path();
        let opened = open_file(&path, |flags| open_beneath(&dir_fd, &name, flags));
        let opened = match opened {
            // EXDEV: the path leaves the directory (or is absolute); ELOOP: a magic link.
            Err(PolicyError::Io { error, .. })
                if matches!(error.raw_os_error(), Some(libc::EXDEV | libc::ELOOP)) =>
            {
                Err(PolicyError::OutsideDir {
                    target: std::fs::read_link(&path).ok(),
                    path: path.clone(),
                })
            }
            // Not read (today as before): a subdirectory, or a symlink to one in `dir`.
            Err(PolicyError::Io { error, .. })
                if error.kind() == std::io::ErrorKind::InvalidInput
                    && std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) =>
            {
                continue
            }
            other => other,
        };
        files.push((path, opened));
    }
    if files.is_empty() {
        return Err(PolicyError::NoPolicyFiles {
            dir: dir.to_path_buf(),
        });
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Loads every policy file (`*.yaml`, `*.yml`, not starting with `.`) of `dir`, not recursing
/// into subdirectories; `dir` may also be a single file. Only regular files are read, and no
/// symlink leads out of `dir` ([`PolicyError::OutsideDir`]). All or nothing: if any file is
/// invalid, or two files clash, the whole set is rejected, so the caller keeps what it runs.
/// A directory without policy files is an error ([`PolicyError::NoPolicyFiles`]), not an
/// empty set: an emptied directory must not unenforce every agent.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
    let meta = std::fs::metadata(dir).map_err(|error| PolicyError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    let mut errors = Vec::new();
    let mut loaded = Vec::new();
    if meta.is_dir() {
        for (path, file) in open_dir_files(dir)? {
            match file.and_then(|f| read_located(&path, f)) {
                Ok(p) => loaded.push(p),
                Err(e) => errors.push(e),
            }
        }
    } else {
        match load_file_located(dir) {
            Ok(p) => loaded.push(p),
            Err(e) => errors.push(e),
        }
    }
    check_conflicts(&loaded, &mut errors);
    match errors.len() {
        0 => {}
        1 => return Err(errors.remove(0)),
        _ => return Err(PolicyError::Several(errors)),
    }
    let mut policies: Vec<Policy> = loaded.into_iter().map(|(p, _)| p).collect();
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PolicySet { policies })
}

/// Duplicate policy names and identical cgroup selectors across files.
fn check_conflicts(loaded: &[(Policy, raw::Locations)], errors: &mut Vec<PolicyError>) {
    let conflict = |(p, at): (&Policy, raw::Loc),
                    (other, other_at): (&Policy, raw::Loc),
                    message: String| PolicyError::Conflict {
        path: p.source.clone(),
        line: at.line,
        column: at.column,
        message,
        other_path: other.source.clone(),
        other_line: other_at.line,
        other_column: other_at.column,
    };
    let mut names: HashMap<&str, (&Policy, raw::Loc)> = HashMap::new();
    let mut selectors: HashMap<&str, (&Policy, raw::Loc)> = HashMap::new();
    for (policy, locs) in loaded {
        if let Some(&first) = names.get(policy.name.as_str()) {
            errors.push(conflict(
                (policy, locs.name),
                first,
                format!(
                    "policy name {:?} is used by two files; names must be unique",
                    policy.name
                ),
            ));
        } else {
            names.insert(&policy.name, (policy, locs.name));
        }
        for (selector, &at) in policy.agents.iter().zip(&locs.agents) {
            if let Some(&(other, other_at)) = selectors.get(selector.pattern.as_str()) {
                errors.push(conflict(
                    (policy, at),
                    (other, other_at),
                    format!(
                        "cgroup selector {:?} is also used by policy {:?}; a cgroup path may \
                         be listed by one policy only",
                        selector.pattern, other.name
                    ),
                ));
            } else {
                selectors.insert(&selector.pattern, (policy, at));
            }
        }
    }
}

/// The protocol set as written in a policy: `tcp`, `udp` or `any`.
pub fn protocols_name(protocols: u32) -> &'static str {
    match protocols & proto::ALL {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ALL => "any",
        _ => "none",
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {}", self.id)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        f.write_str(": ")?;
        for (i, net) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{net}")?;
        }
        for (i, host) in self.hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{host}")?;
        }
        write!(f, ", protocol {}, ", protocols_name(self.protocols))?;
        if self.ports == [(0, u16::MAX)] {
            return f.write_str("all ports");
        }
        f.write_str(
            if self.ports.len() == 1 && self.ports[0].0 == self.ports[0].1 {
                "port "
            } else {
                "ports "
            },
        )?;
        for (i, &(lo, hi)) in self.ports.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "policy {} ({}, from {})",
            self.name,
            self.mode,
            self.source.display()
        )?;
        f.write_str("  agents:")?;
        for agent in &self.agents {
            write!(f, " {agent}")?;
        }
        f.write_str("\n")?;
        if self.rules.is_empty() {
            return f.write_str("  no egress allowed\n");
        }
        for rule in &self.rules {
            writeln!(f, "  {rule}")?;
        }
        Ok(())
    }
}
