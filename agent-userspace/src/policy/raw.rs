//! The YAML layer: serde types that mirror the file, checked value by value while they are
//! read, then turned into [`Policy`].
//!
//! Locations: a value that is wrong on its own (a CIDR, a port, a protocol, a name, a glob) is
//! rejected by its own `Deserialize` impl with `de::Error::custom`; serde-saphyr attaches the
//! line and column of that YAML node to the error. Checks that need more than one value
//! (`cidr` and `cidrs` together, an empty list, duplicates) run after deserialization on
//! values wrapped in [`Spanned`], which records where each node is.
//!
//! Why serde-saphyr and not serde_yaml: serde_yaml is archived and unmaintained. serde-saphyr is
//! maintained, fuzzed and panic-free, reports `line:column` for every error including our own
//! `de::Error::custom` ones, rejects duplicate keys, and has budgets (events, nodes, depth,
//! aliases, alias replay) that stop alias bombs and deeply nested documents before they cost
//! memory or time.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use agent_common::{proto, MAX_AGENTS, MAX_PREFIXES_V4, MAX_PREFIXES_V6, MAX_UNIX_PATHS};
use ipnet::IpNet;
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::options::DuplicateKeyPolicy;
use serde_saphyr::{MessageFormatter, Spanned};

use super::host::HostPattern;
use super::{CgroupSelector, Mode, Policy, PolicyError, Rule, MAX_POLICY_FILE_BYTES};

/// Deepest nesting a policy needs is 4 (document, `egress`, a rule, `ports`); leave some room.
const MAX_DEPTH: usize = 10;
/// Alias replay is the only way a YAML document grows beyond its size; bound it.
const MAX_REPLAYED_EVENTS: usize = 1_000_000;

/// Longest rule name (shown in audit records).
const MAX_RULE_NAME: usize = 128;

/// Most rules in one policy: as many as one family's trie holds prefixes (every rule has one).
pub(super) const MAX_RULES: usize = MAX_PREFIXES_V4 as usize;
/// Most networks in one rule's `cidrs`: as many as both tries hold.
pub(super) const MAX_RULE_NETWORKS: usize = (MAX_PREFIXES_V4 + MAX_PREFIXES_V6) as usize;
/// Most names in one rule's `hosts`.
pub(super) const MAX_RULE_HOSTS: usize = 256;
/// Most entries in one rule's `ports` (a compiled prefix holds 16 merged ranges anyway).
pub(super) const MAX_PORT_ENTRIES: usize = 1024;
/// Most `agents.cgroups` selectors in one policy: the agent map's capacity.
pub(super) const MAX_SELECTORS: usize = MAX_AGENTS as usize;
/// Most entries in `sockets` (there are 7 kinds; a repeat is harmless, a million are not).
pub(super) const MAX_SOCKET_KINDS: usize = 64;
/// Most entries in `unix` (the kernel's path trie holds this many for all policies).
pub(super) const MAX_UNIX_ENTRIES: usize = MAX_UNIX_PATHS as usize;

/// Longest value quoted whole in an error message (a hostile file can hold a value of
/// megabytes); a longer one is cut, and its length is given.
const MAX_QUOTED_CHARS: usize = 64;
/// Longest error message; a longer one (a YAML library message that quotes a whole value) is
/// cut.
pub(super) const MAX_MESSAGE_BYTES: usize = 1024;

/// `value` quoted for an error message, cut after [`MAX_QUOTED_CHARS`] characters.
pub(super) fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &value[..cut], value.len()),
    }
}

/// `message`, cut after [`MAX_MESSAGE_BYTES`] (at a character boundary).
fn cut_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        let total = message.len();
        message.truncate(cut);
        message.push_str(&format!("... (message cut, {total} bytes)"));
    }
    message
}

/// Longest excerpt of the file that a YAML library message may quote (it quotes whole keys
/// and values: a file of secrets, e.g. a copy of /etc/shadow, must not reach a log).
pub(super) const MAX_EXCERPT_CHARS: usize = 24;

/// `message` with every `` `...` `` and `"..."` span longer than [`MAX_EXCERPT_CHARS`] cut.
pub(super) fn cut_excerpts(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE_BYTES));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=open]);
        let body = &rest[open + 1..];
        let (inner, after) = match body.find(quote) {
            Some(close) => (&body[..close], &body[close..]),
            None => (body, ""),
        };
        match inner.char_indices().nth(MAX_EXCERPT_CHARS) {
            None => out.push_str(inner),
            Some((cut, _)) => {
                out.push_str(&inner[..cut]);
                out.push_str(&format!("...({} bytes)", inner.len()));
            }
        }
        match after.chars().next() {
            Some(c) => {
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// A 1-based line and column (0 when unknown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Loc {
    pub line: u64,
    pub column: u64,
}

impl Loc {
    fn of<T>(spanned: &Spanned<T>) -> Loc {
        Loc {
            line: spanned.referenced.line(),
            column: spanned.referenced.column(),
        }
    }
}

/// Where the values that cross-file checks report on are.
#[derive(Clone, Debug, Default)]
pub(super) struct Locations {
    /// The value of `name`.
    pub name: Loc,
    /// Each `agents.cgroups` entry, in the order of [`Policy::agents`].
    pub agents: Vec<Loc>,
}

fn options() -> serde_saphyr::Options {
    // Every node takes at least two bytes ("1," in a flow list), so a file within the size
    // limit never reaches these two; they only bound what aliases could add.
    let max_nodes = (MAX_POLICY_FILE_BYTES / 2) as usize;
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: max_nodes * 2,
            max_nodes: max_nodes,
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_documents: 1,
            max_anchors: 10_000,
            max_aliases: 200_000,
            // Many aliases of one anchor are legitimate here (a port list used by every
            // rule); the replay limits below bound what they can cost.
            enforce_alias_anchor_ratio: false,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_REPLAYED_EVENTS,
            max_replay_stack_depth: MAX_DEPTH,
        },
        duplicate_keys: DuplicateKeyPolicy::Error,
        reject_unsupported_tags: true,
        strict_booleans: true,
        with_snippet: false,
        emit_comments: false,
    }
}

/// Parses and checks one policy. The locations are for the cross-file checks of `load_dir`.
pub(super) fn parse(source: &Path, text: &str) -> Result<(Policy, Locations), PolicyError> {
    if text.len() as u64 > MAX_POLICY_FILE_BYTES {
        return Err(PolicyError::TooLarge {
            path: source.to_path_buf(),
            size: text.len() as u64,
            limit: MAX_POLICY_FILE_BYTES,
        });
    }
    if text.trim().is_empty() {
        return Err(invalid(source, Loc::default(), "empty policy file".into()));
    }
    let raw: Spanned<RawPolicy> =
        serde_saphyr::from_str_with_options(text, options()).map_err(|e| yaml_error(source, &e))?;
    let at = Loc::of(&raw);
    raw.value.into_policy(source, at)
}

fn invalid(source: &Path, at: Loc, message: String) -> PolicyError {
    PolicyError::Invalid {
        path: source.to_path_buf(),
        line: at.line,
        column: at.column,
        message: cut_message(message),
    }
}

/// A serde-saphyr error as `file:line:column: message` (its own rendering appends
/// "at line X, column Y"; the formatter gives the bare message).
fn yaml_error(source: &Path, err: &serde_saphyr::Error) -> PolicyError {
    let mut inner = err.without_snippet();
    let mut defined = None;
    if let serde_saphyr::Error::AliasError {
        error, locations, ..
    } = inner
    {
        if locations.defined_location != locations.reference_location {
            defined = Some(locations.defined_location);
        }
        inner = error.without_snippet();
    }
    let mut message = match inner {
        serde_saphyr::Error::Budget {
            breach: BudgetBreach::Documents { .. },
            ..
        } => "a policy file holds one YAML document; this is a second one".to_string(),
        serde_saphyr::Error::Budget {
            breach: BudgetBreach::Depth { .. },
            ..
        } => format!("nesting too deep: a policy nests at most {MAX_DEPTH} levels"),
        _ => cut_message(cut_excerpts(
            &serde_saphyr::UserMessageFormatter.format_message(inner),
        )),
    };
    if let Some(defined) = defined.filter(|d| d.line() > 0) {
        message.push_str(&format!(
            " (in the anchored value defined at {}:{})",
            defined.line(),
            defined.column()
        ));
    }
    if message == "recursion limit exceeded" {
        message = format!("nesting too deep: a policy nests at most {MAX_DEPTH} levels");
    }
    let at = err.location().map_or(Loc::default(), |l| Loc {
        line: l.line(),
        column: l.column(),
    });
    invalid(source, at, neutralize_controls(&message))
}

/// The formatter's text is not sanitised: escape control characters (a YAML value could carry
/// terminal escape sequences into a log).
fn neutralize_controls(message: &str) -> String {
    if !message.chars().any(char::is_control) {
        return message.to_string();
    }
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// Required keys are `Option`s checked in `into_policy`: serde-saphyr reports a missing field at
// the last key it read, while a check on the `Spanned` mapping points at its start.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<PolicyName>>,
    #[serde(default)]
    mode: Mode,
    agents: Option<Spanned<RawAgents>>,
    egress: Option<Bounded<Spanned<RawRule>, RulesLimit>>,
    /// Socket kinds beyond TCP/UDP the agents may create (default: none).
    #[serde(default)]
    sockets: Bounded<SocketKind, SocketKindsLimit>,
    /// Fallback when the controller is silent (default: none; the pinned policy keeps going).
    deadman: Option<RawDeadman>,
    /// Connections and unconnected sends per second, per agent (default: no limit).
    rate_limit: Option<RawRateLimit>,
    /// Unix sockets the agents may reach (default: none).
    #[serde(default)]
    unix: Bounded<UnixEntry, UnixLimit>,
    /// Whether the agents may reach the agent socket (default: true).
    #[serde(default)]
    agent_socket: Option<bool>,
    /// Capabilities `exec` lets the agents keep (default: none).
    #[serde(default)]
    capabilities: Bounded<CapabilityName, CapabilitiesLimit>,
    /// Fallback for selectable cgroups not registered yet (default: deny).
    #[serde(default)]
    pending: PendingFallback,
    /// What may be granted at run time: rules of the same shape as `egress` (default: nothing).
    grantable: Option<Bounded<Spanned<RawRule>, GrantableLimit>>,
    /// The longest grant ("1h", "90s"); required with `grantable`.
    max_grant_ttl: Option<Spanned<GrantTtl>>,
    /// Whether an agent's own request inside `grantable` is granted at once (default: manual).
    #[serde(default)]
    approve: ApproveMode,
    /// The DNS proxy's answers and resolved addresses' lifetimes (default: [`DnsPolicy`]).
    dns: Option<Spanned<RawDns>>,
}

/// `dns:`; every key optional.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    denied_answer: Option<DnsDeniedAnswer>,
    ttl_min: Option<DnsDuration>,
    ttl_max: Option<DnsDuration>,
    grace: Option<DnsDuration>,
    max_addresses_per_name: Option<AddressesPerName>,
    query_rate: Option<RawRateLimit>,
}

impl RawDns {
    fn into_dns(self, source: &Path, at: Loc) -> Result<super::DnsPolicy, PolicyError> {
        let default = super::DnsPolicy::default();
        let dns = super::DnsPolicy {
            denied_answer: self.denied_answer.map_or(default.denied_answer, |a| a.0),
            ttl_min_secs: self.ttl_min.map_or(default.ttl_min_secs, |d| d.0),
            ttl_max_secs: self.ttl_max.map_or(default.ttl_max_secs, |d| d.0),
            grace_secs: self.grace.map_or(default.grace_secs, |d| d.0),
            max_addresses_per_name: self
                .max_addresses_per_name
                .map_or(default.max_addresses_per_name, |n| n.0),
            query_rate: self.query_rate.map(RawRateLimit::into_rate_limit),
        };
        if dns.ttl_max_secs == 0 {
            return Err(invalid(
                source,
                at,
                "dns.ttl_max must be at least 1s".into(),
            ));
        }
        if dns.ttl_min_secs > dns.ttl_max_secs {
            return Err(invalid(
                source,
                at,
                format!(
                    "dns.ttl_min ({}s) is above dns.ttl_max ({}s)",
                    dns.ttl_min_secs, dns.ttl_max_secs
                ),
            ));
        }
        if dns.grace_secs > super::MAX_DNS_GRACE_SECS {
            return Err(invalid(
                source,
                at,
                format!(
                    "dns.grace ({}s) is longer than {}s",
                    dns.grace_secs,
                    super::MAX_DNS_GRACE_SECS
                ),
            ));
        }
        Ok(dns)
    }
}

/// `ttl_min`, `ttl_max`, `grace`: a humantime duration of whole seconds, 0 to 1 day.
struct DnsDuration(u32);

impl<'de> Deserialize<'de> for DnsDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| {
            let d = humantime::parse_duration(s)
                .map_err(|e| format!("dns duration {}: {e}", quoted(s)))?;
            if d.subsec_nanos() != 0 {
                return Err(format!("dns duration {}: use whole seconds", quoted(s)));
            }
            match u32::try_from(d.as_secs()) {
                Ok(secs) if secs <= super::MAX_DNS_TTL_SECS => Ok(DnsDuration(secs)),
                _ => Err(format!("dns duration {} out of range: 0s to 1d", quoted(s))),
            }
        })
    }
}

/// `denied_answer: refused | nxdomain`.
struct DnsDeniedAnswer(super::DeniedAnswer);

impl<'de> Deserialize<'de> for DnsDeniedAnswer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| match s {
            "refused" => Ok(DnsDeniedAnswer(super::DeniedAnswer::Refused)),
            "nxdomain" => Ok(DnsDeniedAnswer(super::DeniedAnswer::NxDomain)),
            _ => Err(format!(
                "unknown denied_answer {}: expected \"refused\" or \"nxdomain\"",
                quoted(s)
            )),
        })
    }
}

/// `max_addresses_per_name`: 1 to 64.
struct AddressesPerName(u32);

impl<'de> Deserialize<'de> for AddressesPerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(deserializer)?;
        if (1..=u64::from(super::MAX_ADDRESSES_PER_NAME)).contains(&n) {
            Ok(AddressesPerName(n as u32))
        } else {
            Err(de::Error::custom(format!(
                "max_addresses_per_name {n} out of range: 1 to {}",
                super::MAX_ADDRESSES_PER_NAME
            )))
        }
    }
}

/// One entry of `host` / `hosts`.
struct HostName(HostPattern);

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| HostPattern::parse(s).map(HostName))
    }
}

struct HostsLimit;
impl Limit for HostsLimit {
    const MAX: usize = MAX_RULE_HOSTS;
    const LIST: &'static str = "hosts";
    const ITEMS: &'static str = "names";
}

/// `max_grant_ttl`: a humantime duration of 1 s to 30 days.
struct GrantTtl(u64);

impl<'de> Deserialize<'de> for GrantTtl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| {
            let d = humantime::parse_duration(s)
                .map_err(|e| format!("max_grant_ttl {}: {e}", quoted(s)))?;
            let secs = d.as_secs();
            if (1..=30 * 86_400).contains(&secs) {
                Ok(GrantTtl(secs))
            } else {
                Err(format!(
                    "max_grant_ttl {} out of range: 1s to 30d",
                    quoted(s)
                ))
            }
        })
    }
}

/// `approve: auto | manual`.
#[derive(Default)]
struct ApproveMode(super::Approve);

impl<'de> Deserialize<'de> for ApproveMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| match s {
            "auto" => Ok(ApproveMode(super::Approve::Auto)),
            "manual" => Ok(ApproveMode(super::Approve::Manual)),
            _ => Err(format!(
                "unknown approve mode {}: expected \"auto\" or \"manual\"",
                quoted(s)
            )),
        })
    }
}

struct GrantableLimit;
impl Limit for GrantableLimit {
    const MAX: usize = MAX_GRANTABLE_RULES;
    const LIST: &'static str = "grantable";
    const ITEMS: &'static str = "rules";
}

/// Rules a `grantable` list may hold (each grant is checked against every one).
pub(super) const MAX_GRANTABLE_RULES: usize = 256;

/// `pending: deny | audit`.
#[derive(Default)]
struct PendingFallback(super::Pending);

impl<'de> Deserialize<'de> for PendingFallback {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| match s {
            "deny" => Ok(PendingFallback(super::Pending::Deny)),
            "audit" => Ok(PendingFallback(super::Pending::Audit)),
            _ => Err(format!(
                "unknown pending fallback {}: expected \"deny\" or \"audit\"",
                quoted(s)
            )),
        })
    }
}

/// One entry of `capabilities:`.
struct CapabilityName(&'static str);

impl<'de> Deserialize<'de> for CapabilityName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| {
            super::CAPABILITIES
                .iter()
                .find(|(n, _)| *n == s)
                .map(|(n, _)| CapabilityName(n))
                .ok_or_else(|| {
                    format!(
                        "capability {} cannot be kept: expected one of {} (any other capability \
                         lets an agent undo its containment)",
                        quoted(s),
                        super::CAPABILITIES
                            .iter()
                            .map(|(n, _)| format!("\"{n}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        })
    }
}

struct CapabilitiesLimit;
impl Limit for CapabilitiesLimit {
    const MAX: usize = MAX_SOCKET_KINDS;
    const LIST: &'static str = "capabilities";
    const ITEMS: &'static str = "entries";
}

/// One entry of `unix:`.
struct UnixEntry(super::UnixTarget);

impl<'de> Deserialize<'de> for UnixEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| super::UnixTarget::parse(s).map(UnixEntry))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: RateCount,
    /// Calls at once after a quiet time (default: `per_second`).
    burst: Option<RateCount>,
}

impl RawRateLimit {
    fn into_rate_limit(self) -> super::RateLimit {
        super::RateLimit {
            per_second: self.per_second.0,
            burst: self.burst.map_or(self.per_second.0, |b| b.0),
        }
    }
}

/// 1 to 1,000,000 (calls per second, or in a burst).
struct RateCount(u32);

impl<'de> Deserialize<'de> for RateCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(deserializer)?;
        if (1..=super::MAX_RATE).contains(&n) {
            Ok(RateCount(n as u32))
        } else {
            Err(de::Error::custom(format!(
                "rate_limit value {n} out of range: 1 to {}",
                super::MAX_RATE
            )))
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadman {
    after_seconds: DeadmanSeconds,
    fallback: DeadmanFallback,
}

/// 1 to 86400 seconds.
struct DeadmanSeconds(u32);

impl<'de> Deserialize<'de> for DeadmanSeconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(deserializer)?;
        if (1..=86_400).contains(&n) {
            Ok(DeadmanSeconds(n as u32))
        } else {
            Err(de::Error::custom(format!(
                "deadman after_seconds {n} out of range: 1 to 86400"
            )))
        }
    }
}

struct DeadmanFallback(super::Fallback);

impl<'de> Deserialize<'de> for DeadmanFallback {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| match s {
            "deny-all" => Ok(DeadmanFallback(super::Fallback::DenyAll)),
            "audit-all" => Ok(DeadmanFallback(super::Fallback::AuditAll)),
            _ => Err(format!(
                "unknown deadman fallback {s:?}: expected \"deny-all\" or \"audit-all\""
            )),
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    cgroups: Option<Spanned<Bounded<Spanned<Selector>, SelectorsLimit>>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<RuleName>>,
    cidr: Option<Spanned<Net>>,
    cidrs: Option<Spanned<Bounded<Net, NetworksLimit>>>,
    host: Option<Spanned<HostName>>,
    hosts: Option<Spanned<Bounded<Spanned<HostName>, HostsLimit>>>,
    ports: Option<Spanned<Ports>>,
    #[serde(default)]
    protocol: Protocol,
}

impl RawPolicy {
    fn into_policy(self, source: &Path, at: Loc) -> Result<(Policy, Locations), PolicyError> {
        let missing = |what: &str| invalid(source, at, format!("the policy has no `{what}`"));
        let name = self.name.ok_or_else(|| missing("name"))?;
        let agents = self.agents.ok_or_else(|| missing("agents"))?;
        let egress = self.egress.ok_or_else(|| {
            invalid(
                source,
                at,
                "the policy has no `egress` (write `egress: []` to deny everything)".into(),
            )
        })?;
        let mut locations = Locations {
            name: Loc::of(&name),
            agents: Vec::new(),
        };

        let agents_at = Loc::of(&agents);
        let cgroups = agents
            .value
            .cgroups
            .ok_or_else(|| invalid(source, agents_at, "agents has no `cgroups`".into()))?;
        if cgroups.value.0.is_empty() {
            return Err(invalid(
                source,
                Loc::of(&cgroups),
                "agents.cgroups is empty; list at least one cgroup path".into(),
            ));
        }
        let mut agents = Vec::with_capacity(cgroups.value.0.len());
        let mut seen: HashMap<String, Loc> = HashMap::new();
        for selector in cgroups.value.0 {
            let at = Loc::of(&selector);
            let selector = selector.value.0;
            if let Some(first) = seen.insert(selector.pattern.clone(), at) {
                return Err(invalid(
                    source,
                    at,
                    format!(
                        "cgroup selector {:?} is listed twice (first at {}:{})",
                        selector.pattern, first.line, first.column
                    ),
                ));
            }
            locations.agents.push(at);
            agents.push(selector);
        }

        let rules = rules_of(source, egress.0, Hosts::Allowed)?;
        let grantable = match self.grantable {
            Some(list) => rules_of(source, list.0, Hosts::Refused)?,
            None => Vec::new(),
        };
        let dns = match self.dns {
            Some(dns) => {
                let at = Loc::of(&dns);
                dns.value.into_dns(source, at)?
            }
            None => super::DnsPolicy::default(),
        };
        let max_grant_ttl = self.max_grant_ttl.map(|t| t.value.0);
        if !grantable.is_empty() && max_grant_ttl.is_none() {
            return Err(invalid(
                source,
                at,
                "the policy has `grantable` but no `max_grant_ttl` (e.g. max_grant_ttl: 1h)".into(),
            ));
        }

        let policy = Policy {
            name: name.value.0,
            mode: self.mode,
            agents,
            rules,
            sockets: self.sockets.0.iter().fold(0, |m, k| m | k.0),
            deadman: self.deadman.map(|d| super::Deadman {
                after_secs: d.after_seconds.0,
                fallback: d.fallback.0,
            }),
            rate_limit: self.rate_limit.map(RawRateLimit::into_rate_limit),
            unix: self.unix.0.into_iter().map(|e| e.0).collect(),
            agent_socket: self.agent_socket.unwrap_or(true),
            capabilities: self.capabilities.0.iter().fold(Vec::new(), |mut kept, c| {
                if !kept.contains(&c.0) {
                    kept.push(c.0);
                }
                kept
            }),
            pending: self.pending.0,
            grants: super::GrantScope {
                grantable,
                max_ttl_secs: max_grant_ttl.unwrap_or(0),
                approve: self.approve.0,
            },
            dns,
            source: source.to_path_buf(),
        };
        Ok((policy, locations))
    }
}

/// Whether a list may hold host rules (`grantable` may not: a grant names addresses).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hosts {
    Allowed,
    Refused,
}

/// The rules of an `egress` or `grantable` list; a rule's id is its index in the list.
fn rules_of(
    source: &Path,
    list: Vec<Spanned<RawRule>>,
    hosts_ok: Hosts,
) -> Result<Vec<Rule>, PolicyError> {
    let mut rules = Vec::with_capacity(list.len());
    let mut rule_names: HashMap<String, Loc> = HashMap::new();
    for (index, raw) in list.into_iter().enumerate() {
        let rule_at = Loc::of(&raw);
        let raw = raw.value;
        let id = u32::try_from(index)
            .map_err(|_| invalid(source, rule_at, "too many rules (at most 2^32)".into()))?;
        let name = match raw.name {
            Some(name) => {
                let at = Loc::of(&name);
                let name = name.value.0;
                if let Some(first) = rule_names.insert(name.clone(), at) {
                    return Err(invalid(
                        source,
                        at,
                        format!(
                            "rule name {name:?} is used twice (first at {}:{})",
                            first.line, first.column
                        ),
                    ));
                }
                Some(name)
            }
            None => None,
        };
        let hosts = match (raw.host, raw.hosts) {
            (None, None) => Vec::new(),
            (Some(host), None) => vec![host],
            (None, Some(hosts)) if hosts.value.0.is_empty() => {
                return Err(invalid(
                    source,
                    Loc::of(&hosts),
                    "hosts is empty; list at least one name".into(),
                ))
            }
            (None, Some(hosts)) => hosts.value.0,
            (Some(_), Some(hosts)) => {
                return Err(invalid(
                    source,
                    Loc::of(&hosts),
                    "a rule has either `host` or `hosts`, not both".into(),
                ))
            }
        };
        if let Some(first) = hosts.first() {
            if hosts_ok == Hosts::Refused {
                return Err(invalid(
                    source,
                    Loc::of(first),
                    "host rules cannot be granted; grant the addresses".into(),
                ));
            }
            if raw.cidr.is_some() || raw.cidrs.is_some() {
                return Err(invalid(
                    source,
                    Loc::of(first),
                    "a rule has one kind of destination: `cidr`/`cidrs` or `host`/`hosts`, \
                     not both (write two rules)"
                        .into(),
                ));
            }
        }
        let mut seen_hosts: HashMap<&HostPattern, Loc> = HashMap::new();
        for host in &hosts {
            let at = Loc::of(host);
            if let Some(first) = seen_hosts.insert(&host.value.0, at) {
                return Err(invalid(
                    source,
                    at,
                    format!(
                        "host {} is listed twice (first at {}:{})",
                        quoted(&host.value.0.to_string()),
                        first.line,
                        first.column
                    ),
                ));
            }
        }
        let hosts: Vec<HostPattern> = hosts.into_iter().map(|h| h.value.0).collect();
        let nets = match (raw.cidr, raw.cidrs) {
            (None, None) if !hosts.is_empty() => Vec::new(),
            (Some(net), None) => vec![net.value.0],
            (None, Some(nets)) if nets.value.0.is_empty() => {
                return Err(invalid(
                    source,
                    Loc::of(&nets),
                    "cidrs is empty; list at least one network".into(),
                ))
            }
            (None, Some(nets)) => nets.value.0.into_iter().map(|n| n.0).collect(),
            (Some(_), Some(nets)) => {
                return Err(invalid(
                    source,
                    Loc::of(&nets),
                    "a rule has either `cidr` or `cidrs`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    source,
                    rule_at,
                    "rule has no destination: add `cidr: <network>`, `cidrs: [...]`, \
                     `host: <name>` or `hosts: [...]`"
                        .into(),
                ))
            }
        };
        let ports = match raw.ports {
            None => vec![(0, u16::MAX)],
            Some(ports) if ports.value.0.is_empty() => {
                return Err(invalid(
                    source,
                    Loc::of(&ports),
                    "ports is empty; omit `ports` to allow all ports".into(),
                ))
            }
            Some(ports) => ports.value.0,
        };
        rules.push(Rule {
            id,
            name,
            nets,
            hosts,
            ports,
            protocols: raw.protocol.0,
        });
    }

    Ok(rules)
}

/// The most items a list may have, and how to name it in the error.
trait Limit {
    const MAX: usize;
    /// "egress has more than N rules": the list and what it holds.
    const LIST: &'static str;
    const ITEMS: &'static str;
}

struct RulesLimit;
impl Limit for RulesLimit {
    const MAX: usize = MAX_RULES;
    const LIST: &'static str = "egress";
    const ITEMS: &'static str = "rules";
}

struct NetworksLimit;
impl Limit for NetworksLimit {
    const MAX: usize = MAX_RULE_NETWORKS;
    const LIST: &'static str = "cidrs";
    const ITEMS: &'static str = "networks";
}

struct SelectorsLimit;
impl Limit for SelectorsLimit {
    const MAX: usize = MAX_SELECTORS;
    const LIST: &'static str = "agents.cgroups";
    const ITEMS: &'static str = "selectors";
}

struct SocketKindsLimit;
impl Limit for SocketKindsLimit {
    const MAX: usize = MAX_SOCKET_KINDS;
    const LIST: &'static str = "sockets";
    const ITEMS: &'static str = "entries";
}

struct UnixLimit;
impl Limit for UnixLimit {
    const MAX: usize = MAX_UNIX_ENTRIES;
    const LIST: &'static str = "unix";
    const ITEMS: &'static str = "entries";
}

fn too_many<L: Limit>() -> String {
    format!("{} has more than {} {}", L::LIST, L::MAX, L::ITEMS)
}

/// A list of at most `L::MAX` items. The item past the limit is an error at once: the rest of
/// a huge list is never read, so it costs neither its time nor its memory.
struct Bounded<T, L>(Vec<T>, PhantomData<L>);

impl<T, L> Default for Bounded<T, L> {
    fn default() -> Self {
        Bounded(Vec::new(), PhantomData)
    }
}

impl<'de, T: Deserialize<'de>, L: Limit> Deserialize<'de> for Bounded<T, L> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BoundedVisitor<T, L>(PhantomData<(T, L)>);

        impl<'de, T: Deserialize<'de>, L: Limit> Visitor<'de> for BoundedVisitor<T, L> {
            type Value = Vec<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {} {}", L::MAX, L::ITEMS)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(item) = seq.next_element()? {
                    if items.len() == L::MAX {
                        return Err(de::Error::custom(too_many::<L>()));
                    }
                    items.push(item);
                }
                Ok(items)
            }
        }

        deserializer
            .deserialize_seq(BoundedVisitor::<T, L>(PhantomData))
            .map(|items| Bounded(items, PhantomData))
    }
}

/// Deserializes a string and checks it with `parse`; the error becomes a located message.
/// Works on the borrowed text: no allocation for values that are only checked.
fn from_string<'de, D, T>(
    deserializer: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct ParseStr<F>(F);

    impl<T, F: FnOnce(&str) -> Result<T, String>> Visitor<'_> for ParseStr<F> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
    }

    deserializer.deserialize_str(ParseStr(parse))
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| match s {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            _ => Err(format!(
                "unknown mode {}: expected \"enforce\" or \"audit\"",
                quoted(s)
            )),
        })
    }
}

/// A socket kind of `sockets:`, as an `agent_common::sock` bit.
struct SocketKind(u32);

impl<'de> Deserialize<'de> for SocketKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| {
            super::socket_kind_bit(s).map(SocketKind).ok_or_else(|| {
                format!(
                    "unknown socket kind {s:?}: expected one of {}",
                    super::SOCKET_KINDS
                        .iter()
                        .map(|(n, _)| format!("\"{n}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
    }
}

/// `tcp`, `udp` or `any`, as `agent_common::proto` bits.
struct Protocol(u32);

impl Default for Protocol {
    fn default() -> Self {
        Protocol(proto::ALL)
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| match s {
            "tcp" => Ok(Protocol(proto::TCP)),
            "udp" => Ok(Protocol(proto::UDP)),
            "any" => Ok(Protocol(proto::ALL)),
            _ => Err(format!(
                "unknown protocol {}: expected \"tcp\", \"udp\" or \"any\"",
                quoted(s)
            )),
        })
    }
}

/// `[a-z0-9][a-z0-9_.-]{0,62}`
struct PolicyName(String);

pub(super) fn check_policy_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'_' | b'.' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid policy name {}: use 1 to 63 characters of a-z, 0-9, '_', '.', '-', \
             starting with a letter or digit",
            quoted(s)
        ))
    }
}

impl<'de> Deserialize<'de> for PolicyName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| {
            check_policy_name(s)?;
            Ok(PolicyName(s.to_string()))
        })
    }
}

/// A rule name: 1 to 128 characters, no control characters (it is shown in audit records).
struct RuleName(String);

impl<'de> Deserialize<'de> for RuleName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| {
            if s.is_empty() || s.chars().count() > MAX_RULE_NAME {
                Err(format!(
                    "invalid rule name {}: use 1 to {MAX_RULE_NAME} characters",
                    quoted(s)
                ))
            } else if s.chars().any(char::is_control) {
                Err(format!(
                    "invalid rule name {}: control characters are not allowed",
                    quoted(s)
                ))
            } else {
                Ok(RuleName(s.to_string()))
            }
        })
    }
}

struct Selector(CgroupSelector);

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| CgroupSelector::new(s).map(Selector))
    }
}

/// A network: `a.b.c.d/len`, `x:y::/len`, or a bare address (/32 or /128). Host bits must be
/// zero.
struct Net(IpNet);

pub(super) fn parse_net(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        IpNet::from_str(s).map_err(|e| format!("invalid CIDR {}: {e}", quoted(s)))?
    } else {
        IpAddr::from_str(s)
            .map(IpNet::from)
            .map_err(|e| format!("invalid CIDR {}: {e}", quoted(s)))?
    };
    if net.addr() != net.network() {
        return Err(format!(
            "host bits set in {}; did you mean {}/{}?",
            quoted(s),
            net.network(),
            net.prefix_len()
        ));
    }
    Ok(net)
}

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_string(deserializer, |s| parse_net(s).map(Net))
    }
}

/// `ports`: a list of ports and ranges, or a single one.
struct Ports(Vec<(u16, u16)>);

/// One entry of `ports`: a number, or a string `"lo-hi"` (or a number as a string).
struct PortRange((u16, u16));

fn port_number(n: i128) -> Result<u16, String> {
    u16::try_from(n).map_err(|_| format!("port {n} is out of range (0-65535)"))
}

pub(super) fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let number = |part: &str| -> Result<u16, String> {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "invalid port {}: expected a port number or a range \"lo-hi\"",
                quoted(s)
            ));
        }
        match part.parse::<u32>() {
            Ok(n) if n <= u32::from(u16::MAX) => Ok(n as u16),
            _ if part.len() > MAX_QUOTED_CHARS => Err(format!(
                "port {}... ({} digits) is out of range (0-65535)",
                &part[..MAX_QUOTED_CHARS],
                part.len()
            )),
            _ => Err(format!("port {part} is out of range (0-65535)")),
        }
    };
    match s.split_once('-') {
        None => number(s).map(|p| (p, p)),
        Some((lo, hi)) => {
            let (lo, hi) = (number(lo)?, number(hi)?);
            if lo > hi {
                Err(format!(
                    "invalid port range {}: the low port is above the high one \
                     (did you mean \"{hi}-{lo}\"?)",
                    quoted(s)
                ))
            } else {
                Ok((lo, hi))
            }
        }
    }
}

struct PortRangeVisitor;

impl Visitor<'_> for PortRangeVisitor {
    type Value = (u16, u16);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a port number or a range \"lo-hi\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        port_number(i128::from(v))
            .map(|p| (p, p))
            .map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        port_number(i128::from(v))
            .map(|p| (p, p))
            .map_err(E::custom)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Err(E::custom(format!("port {v} is out of range (0-65535)")))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        port_number(v).map(|p| (p, p)).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        parse_port_range(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(PortRangeVisitor)
            .map(PortRange)
    }
}

struct PortsVisitor;

impl<'de> Visitor<'de> for PortsVisitor {
    type Value = Vec<(u16, u16)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of port numbers and \"lo-hi\" ranges")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut ports = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PORT_ENTRIES));
        while let Some(PortRange(range)) = seq.next_element()? {
            if ports.len() == MAX_PORT_ENTRIES {
                return Err(de::Error::custom(format!(
                    "ports has more than {MAX_PORT_ENTRIES} entries; use ranges (\"8000-8100\")"
                )));
            }
            ports.push(range);
        }
        Ok(ports)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        PortRangeVisitor.visit_u64(v).map(|r| vec![r])
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        PortRangeVisitor.visit_i64(v).map(|r| vec![r])
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        PortRangeVisitor.visit_u128(v).map(|r| vec![r])
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        PortRangeVisitor.visit_i128(v).map(|r| vec![r])
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        PortRangeVisitor.visit_str(v).map(|r| vec![r])
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortsVisitor).map(Ports)
    }
}

#[cfg(test)]
mod grant_scope_tests {
    use super::super::{parse_policy, Approve};
    use std::path::Path;

    const BASE: &str = "name: p\nagents:\n  cgroups: [a]\negress: []\n";

    fn parse(extra: &str) -> Result<super::Policy, String> {
        parse_policy(Path::new("p.yaml"), &format!("{BASE}{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn grantable_max_grant_ttl_and_approve_are_read() {
        let p = parse(
            "grantable:\n  - cidr: 10.0.0.0/8\n    ports: \"443\"\n    protocol: tcp\n\
             max_grant_ttl: 1h\napprove: auto\n",
        )
        .unwrap();
        assert_eq!(p.grants.grantable.len(), 1);
        assert_eq!(p.grants.grantable[0].ports, [(443, 443)]);
        assert_eq!(p.grants.max_ttl_secs, 3600);
        assert_eq!(p.grants.approve, Approve::Auto);
        let none = parse("").unwrap();
        assert!(none.grants.grantable.is_empty());
        assert_eq!(none.grants.approve, Approve::Manual);
    }

    #[test]
    fn bad_grant_settings_are_located_errors() {
        let e = parse("grantable:\n  - cidr: 10.0.0.0/8\n").unwrap_err();
        assert!(e.contains("max_grant_ttl"), "{e}");
        let e = parse("max_grant_ttl: 40d\n").unwrap_err();
        assert!(e.contains("out of range") && e.contains(":5:"), "{e}");
        let e = parse("approve: sometimes\n").unwrap_err();
        assert!(e.contains("unknown approve mode"), "{e}");
        let e = parse("grantable:\n  - cidr: 10.0.0.1/8\nmax_grant_ttl: 1m\n").unwrap_err();
        assert!(e.contains("host bits"), "{e}");
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::super::{parse_policy, RateLimit};
    use std::path::Path;

    const BASE: &str = "name: p\nagents:\n  cgroups: [a]\negress: []\n";

    fn parse(extra: &str) -> Result<super::Policy, String> {
        parse_policy(Path::new("p.yaml"), &format!("{BASE}{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_rate_limit_is_read_and_its_burst_defaults_to_one_second() {
        let p = parse("rate_limit:\n  per_second: 50\n  burst: 200\n").unwrap();
        let r = p.rate_limit.unwrap();
        assert_eq!(
            r,
            RateLimit {
                per_second: 50,
                burst: 200
            }
        );
        assert_eq!(r.kernel(), (20_000_000, 4_000_000_000));
        let p = parse("rate_limit:\n  per_second: 7\n").unwrap();
        assert_eq!(p.rate_limit.unwrap().burst, 7);
        assert_eq!(parse("").unwrap().rate_limit, None);
    }

    #[test]
    fn bad_rate_limits_are_located_errors() {
        let e = parse("rate_limit:\n  per_second: 0\n").unwrap_err();
        assert!(e.contains("out of range") && e.contains(":6:"), "{e}");
        let e = parse("rate_limit:\n  per_second: 10\n  burst: 2000000\n").unwrap_err();
        assert!(e.contains("out of range") && e.contains(":7:"), "{e}");
        let e = parse("rate_limit:\n  burst: 10\n").unwrap_err();
        assert!(e.contains("per_second"), "{e}");
        let e = parse("rate_limit:\n  per_second: 10\n  per_minute: 5\n").unwrap_err();
        assert!(e.contains("per_minute"), "{e}");
    }
}
