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
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use agent_common::proto;
use ipnet::IpNet;
use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::options::DuplicateKeyPolicy;
use serde_saphyr::{MessageFormatter, Spanned};

use super::{CgroupSelector, Mode, Policy, PolicyError, Rule, MAX_POLICY_FILE_BYTES};

/// Deepest nesting a policy needs is 4 (document, `egress`, a rule, `ports`); leave some room.
const MAX_DEPTH: usize = 10;
/// Alias replay is the only way a YAML document grows beyond its size; bound it.
const MAX_REPLAYED_EVENTS: usize = 1_000_000;

/// Longest rule name (shown in audit records).
const MAX_RULE_NAME: usize = 128;

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
        message,
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
        _ => serde_saphyr::UserMessageFormatter
            .format_message(inner)
            .into_owned(),
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
    egress: Option<Vec<Spanned<RawRule>>>,
    /// Socket kinds beyond TCP/UDP the agents may create (default: none).
    #[serde(default)]
    sockets: Vec<SocketKind>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    cgroups: Option<Spanned<Vec<Spanned<Selector>>>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<RuleName>>,
    cidr: Option<Spanned<Net>>,
    cidrs: Option<Spanned<Vec<Net>>>,
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
        if cgroups.value.is_empty() {
            return Err(invalid(
                source,
                Loc::of(&cgroups),
                "agents.cgroups is empty; list at least one cgroup path".into(),
            ));
        }
        let mut agents = Vec::with_capacity(cgroups.value.len());
        let mut seen: HashMap<String, Loc> = HashMap::new();
        for selector in cgroups.value {
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

        let mut rules = Vec::with_capacity(egress.len());
        let mut rule_names: HashMap<String, Loc> = HashMap::new();
        for (index, raw) in egress.into_iter().enumerate() {
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
            let nets = match (raw.cidr, raw.cidrs) {
                (Some(net), None) => vec![net.value.0],
                (None, Some(nets)) if nets.value.is_empty() => {
                    return Err(invalid(
                        source,
                        Loc::of(&nets),
                        "cidrs is empty; list at least one network".into(),
                    ))
                }
                (None, Some(nets)) => nets.value.into_iter().map(|n| n.0).collect(),
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
                        "rule has no destination: add `cidr: <network>` or `cidrs: [...]`".into(),
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
                ports,
                protocols: raw.protocol.0,
            });
        }

        let policy = Policy {
            name: name.value.0,
            mode: self.mode,
            agents,
            rules,
            sockets: self.sockets.iter().fold(0, |m, k| m | k.0),
            source: source.to_path_buf(),
        };
        Ok((policy, locations))
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
                "unknown mode {s:?}: expected \"enforce\" or \"audit\""
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
                "unknown protocol {s:?}: expected \"tcp\", \"udp\" or \"any\""
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
            "invalid policy name {s:?}: use 1 to 63 characters of a-z, 0-9, '_', '.', '-', \
             starting with a letter or digit"
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
                    "invalid rule name {s:?}: use 1 to {MAX_RULE_NAME} characters"
                ))
            } else if s.chars().any(char::is_control) {
                Err(format!(
                    "invalid rule name {s:?}: control characters are not allowed"
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
        IpNet::from_str(s).map_err(|e| format!("invalid CIDR {s:?}: {e}"))?
    } else {
        IpAddr::from_str(s)
            .map(IpNet::from)
            .map_err(|e| format!("invalid CIDR {s:?}: {e}"))?
    };
    if net.addr() != net.network() {
        return Err(format!(
            "host bits set in {s:?}; did you mean {}/{}?",
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
                "invalid port {s:?}: expected a port number or a range \"lo-hi\""
            ));
        }
        match part.parse::<u32>() {
            Ok(n) if n <= u32::from(u16::MAX) => Ok(n as u16),
            _ => Err(format!("port {part} is out of range (0-65535)")),
        }
    };
    match s.split_once('-') {
        None => number(s).map(|p| (p, p)),
        Some((lo, hi)) => {
            let (lo, hi) = (number(lo)?, number(hi)?);
            if lo > hi {
                Err(format!(
                    "invalid port range {s:?}: the low port is above the high one \
                     (did you mean \"{hi}-{lo}\"?)"
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
        let mut ports = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(PortRange(range)) = seq.next_element()? {
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
