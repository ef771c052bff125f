//! OCSF 1.8.0 output: each native record as one OCSF event (docs/ocsf.md has the mapping).
//!
//! Decisions become Network Activity (4001), the DNS proxy's `dns` records DNS Activity (4003),
//! and every other record (loss, notices) a Base Event (class 0) carrying the native fields in
//! `unmapped`. `check_required` validates an event against the schema's required attributes,
//! enums and types, for tests and for consumers.

use std::{
    fmt,
    net::IpAddr,
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{AuditRecord, DecisionRecord};

/// The OCSF schema release the events follow.
pub const OCSF_VERSION: &str = "1.8.0";
const PRODUCT: &str = "agentwall";
const LOG_NAME: &str = "agentwall.audit";

/// How records are written on a line-oriented sink (audit file, stdout, stream, NATS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// agentwall's own schema (docs/records.md).
    #[default]
    Native,
    /// OCSF 1.8.0 (docs/ocsf.md).
    Ocsf,
}

impl Format {
    /// The record as a JSON value in this format.
    pub fn to_value(self, rec: &AuditRecord) -> serde_json::Result<Value> {
        match self {
            Format::Native => serde_json::to_value(rec),
            Format::Ocsf => Ok(to_ocsf(rec)),
        }
    }

    /// The record as one JSON line, newline included.
    pub fn line(self, rec: &AuditRecord) -> serde_json::Result<Vec<u8>> {
        let mut line = match (self, &rec.decision) {
            (Format::Native, _) => serde_json::to_vec(rec)?,
            // Decisions are most records: written straight from the typed event.
            (Format::Ocsf, Some(d)) => serde_json::to_vec(&NetworkActivity::new(rec, d))?,
            (Format::Ocsf, None) => serde_json::to_vec(&to_ocsf(rec))?,
        };
        line.push(b'\n');
        Ok(line)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown record format {0:?}: expected native or ocsf")]
pub struct UnknownFormat(String);

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Format::Native),
            "ocsf" => Ok(Format::Ocsf),
            other => Err(UnknownFormat(other.to_string())),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Native => "native",
            Format::Ocsf => "ocsf",
        })
    }
}

/// One native record as an OCSF 1.8.0 event.
pub fn to_ocsf(rec: &AuditRecord) -> Value {
    let mut ev = match (&rec.decision, rec.kind.as_str()) {
        (Some(d), _) => {
            return serde_json::to_value(NetworkActivity::new(rec, d)).expect("plain JSON data")
        }
        (None, "dns") => match &rec.detail {
            Some(detail) => dns_activity(rec, detail),
            None => base_event(rec),
        },
        _ => base_event(rec),
    };
    let obj = ev.as_object_mut().expect("events are objects");
    let class_uid = obj["class_uid"].as_i64().unwrap_or(0);
    let activity_id = obj["activity_id"].as_i64().unwrap_or(0);
    obj.insert("category_uid".into(), json!(class_uid / 1000));
    obj.insert("type_uid".into(), json!(class_uid * 100 + activity_id));
    obj.insert("time".into(), json!(epoch_ms(&rec.time)));
    obj.insert("timezone_offset".into(), json!(0));
    obj.insert(
        "metadata".into(),
        serde_json::to_value(Metadata::new(rec)).expect("plain JSON data"),
    );
    obj.insert(
        "device".into(),
        serde_json::to_value(Device::new(rec)).expect("plain JSON data"),
    );
    ev
}

/// The RFC 3339 time of a record in ms since the epoch (0 when unreadable; `original_time`
/// keeps the text).
fn epoch_ms(time: &str) -> i64 {
    humantime::parse_rfc3339(time)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// (action_id, action, disposition_id, disposition, status_id, status, severity_id, severity)
/// of a verdict: `allowed` calls went through; a `deny` in audit mode was only observed.
fn outcome(
    decision: &str,
    mode: &str,
    action: &str,
) -> (i64, &'static str, i64, &'static str, i64, &'static str, i64) {
    match (decision, mode, action) {
        ("deny", "audit", _) | ("deny", _, "allowed") => {
            (3, "Observed", 15, "Detected", 1, "Success", 3)
        }
        (_, _, "allowed") => (1, "Allowed", 1, "Allowed", 1, "Success", 1),
        (_, _, "killed") => (2, "Denied", 2, "Blocked", 2, "Failure", 4),
        _ => (2, "Denied", 2, "Blocked", 2, "Failure", 3),
    }
}

fn severity_name(id: i64) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        5 => "Critical",
        6 => "Fatal",
        99 => "Other",
        _ => "Unknown",
    }
}

fn insert_outcome(obj: &mut Map<String, Value>, decision: &str, mode: &str, action: &str) {
    let (action_id, action_name, disp_id, disp, status_id, status, sev) =
        outcome(decision, mode, action);
    obj.insert("action_id".into(), json!(action_id));
    obj.insert("action".into(), json!(action_name));
    obj.insert("disposition_id".into(), json!(disp_id));
    obj.insert("disposition".into(), json!(disp));
    obj.insert("status_id".into(), json!(status_id));
    obj.insert("status".into(), json!(status));
    obj.insert("severity_id".into(), json!(sev));
    obj.insert("severity".into(), json!(severity_name(sev)));
    obj.insert("is_alert".into(), json!(decision == "deny"));
}

/// Where an address is: loopback, private, or beyond (`connection_info.boundary_id`).
fn boundary(ip: IpAddr) -> (i64, &'static str) {
    let internal = match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        // fc00::/7 (unique local) and fe80::/10 (link local).
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if ip.is_loopback() {
        (1, "Localhost")
    } else if internal {
        (2, "Internal")
    } else {
        (3, "External")
    }
}

/// Serializes a number as a string (OCSF types uids and versions as strings).
fn as_string<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct Metadata<'a> {
    version: &'static str,
    product: Product,
    /// (boot id, seq) identifies a record (a restart continues seq within a boot).
    uid: String,
    sequence: u64,
    log_name: &'static str,
    event_code: &'a str,
    original_time: &'a str,
    logged_time: i64,
    profiles: [&'static str; 2],
}

impl<'a> Metadata<'a> {
    fn new(rec: &'a AuditRecord) -> Self {
        let scope = if rec.boot_id.is_empty() {
            &rec.node
        } else {
            &rec.boot_id
        };
        Metadata {
            version: OCSF_VERSION,
            product: Product {
                name: PRODUCT,
                vendor_name: PRODUCT,
                version: env!("CARGO_PKG_VERSION"),
            },
            uid: format!("{scope}:{}", rec.seq),
            sequence: rec.seq,
            log_name: LOG_NAME,
            event_code: &rec.kind,
            original_time: &rec.time,
            logged_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            profiles: ["host", "security_control"],
        }
    }
}

#[derive(Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

/// The node the controller runs on (the host profile's `device`).
#[derive(Serialize)]
struct Device<'a> {
    hostname: &'a str,
    type_id: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_uid: Option<&'a str>,
}

impl<'a> Device<'a> {
    fn new(rec: &'a AuditRecord) -> Self {
        Device {
            hostname: &rec.node,
            type_id: 0,
            kind: "Unknown",
            boot_uid: (!rec.boot_id.is_empty()).then_some(rec.boot_id.as_str()),
        }
    }
}

/// A decision as Network Activity (4001), borrowing from the record.
#[derive(Serialize)]
struct NetworkActivity<'a> {
    class_uid: i64,
    class_name: &'static str,
    category_uid: i64,
    category_name: &'static str,
    activity_id: i64,
    activity_name: &'a str,
    type_uid: i64,
    time: i64,
    timezone_offset: i64,
    action_id: i64,
    action: &'static str,
    disposition_id: i64,
    disposition: &'static str,
    status_id: i64,
    status: &'static str,
    severity_id: i64,
    severity: &'static str,
    is_alert: bool,
    status_code: &'a str,
    status_detail: String,
    message: String,
    actor: Actor<'a>,
    src_endpoint: Host<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst_endpoint: Option<Dst<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_src_dst_assignment_known: Option<bool>,
    observables: Vec<Observable<'a>>,
    connection_info: Conn,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<Policy<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    firewall_rule: Option<Rule<'a>>,
    metadata: Metadata<'a>,
    device: Device<'a>,
    unmapped: Unmapped<'a>,
}

#[derive(Serialize)]
struct Actor<'a> {
    process: Process<'a>,
    user: User,
}

#[derive(Serialize)]
struct User {
    #[serde(serialize_with = "as_string")]
    uid: u32,
}

#[derive(Serialize)]
struct Process<'a> {
    pid: u32,
    tid: u32,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<File<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_process: Option<Parent<'a>>,
    user: User,
}

#[derive(Serialize)]
struct Parent<'a> {
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<File<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
}

/// An executable (`name` and `type_id` are required).
#[derive(Serialize)]
struct File<'a> {
    name: &'a str,
    path: &'a str,
    type_id: i64,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl<'a> File<'a> {
    fn exe(path: &'a str) -> Self {
        File {
            name: path.rsplit('/').next().unwrap_or(path),
            path,
            type_id: 1,
            kind: "Regular File",
        }
    }
}

#[derive(Serialize)]
struct Host<'a> {
    hostname: &'a str,
}

#[derive(Serialize)]
struct Dst<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'a str>,
}

#[derive(Serialize)]
struct Observable<'a> {
    name: &'static str,
    type_id: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    value: &'a str,
}

#[derive(Serialize)]
struct Conn {
    direction_id: i64,
    direction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_name: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_num: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_ver_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_ver: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boundary_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boundary: Option<&'static str>,
}

#[derive(Serialize)]
struct Policy<'a> {
    name: &'a str,
    uid: &'a str,
    #[serde(serialize_with = "as_string")]
    version: u32,
    is_applied: bool,
}

#[derive(Serialize)]
struct Rule<'a> {
    #[serde(serialize_with = "as_string")]
    uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// agentwall's own fields with no OCSF attribute (docs/ocsf.md lists them).
#[derive(Serialize)]
struct Unmapped<'a> {
    agent: Option<&'a str>,
    agent_cgroup: Option<&'a str>,
    cgroup: Option<&'a str>,
    cgroup_id: u64,
    hook: &'a str,
    family: &'a str,
    decision: &'a str,
    mode: &'a str,
    action: &'a str,
    reason: &'a str,
    gid: u32,
    ktime_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    intent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    chain: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    decided_by: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decided_by_policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exe_source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sock_type: Option<u32>,
    #[serde(skip_serializing_if = "is_false")]
    exe_truncated: bool,
    #[serde(skip_serializing_if = "is_false")]
    parent_exe_truncated: bool,
}

impl<'a> NetworkActivity<'a> {
    fn new(rec: &'a AuditRecord, d: &'a DecisionRecord) -> Self {
        // The attempted operation; the outcome is in action/disposition.
        let (activity_id, activity_name) = match d.hook.as_str() {
            "connect4" | "connect6" | "connect_unix" => (1, "Open"),
            "sendmsg4" | "sendmsg6" | "sendmsg_unix" => (6, "Traffic"),
            hook => (99, hook),
        };
        let (action_id, action, disposition_id, disposition, status_id, status, severity_id) =
            outcome(&d.decision, &d.mode, &d.action);
        let ip = d.dst.parse::<IpAddr>().ok();
        let dst = match (ip, &d.unix_path) {
            (Some(_), _) => Some(Dst {
                ip: Some(&d.dst),
                port: Some(d.port),
                name: None,
                hostname: d.host.as_deref(),
            }),
            (None, Some(path)) => Some(Dst {
                ip: None,
                port: None,
                name: Some(path),
                hostname: None,
            }),
            (None, None) => d.host.as_deref().map(|h| Dst {
                ip: None,
                port: None,
                name: None,
                hostname: Some(h),
            }),
        };
        let mut observables = Vec::with_capacity(3);
        observables.push(Observable {
            name: "src_endpoint.hostname",
            type_id: 1,
            kind: "Hostname",
            value: &rec.node,
        });
        if let Some(host) = &d.host {
            observables.push(Observable {
                name: "dst_endpoint.hostname",
                type_id: 1,
                kind: "Hostname",
                value: host,
            });
        }
        if ip.is_some() {
            observables.push(Observable {
                name: "dst_endpoint.ip",
                type_id: 2,
                kind: "IP Address",
                value: &d.dst,
            });
        }
        let (protocol_name, protocol_num) = match d.protocol.as_str() {
            "tcp" => (Some("tcp"), Some(6)),
            "udp" => (Some("udp"), Some(17)),
            other => (
                None,
                other
                    .strip_prefix("ip-proto-")
                    .and_then(|n| n.parse::<u8>().ok()),
            ),
        };
        let (protocol_ver_id, protocol_ver) = match d.family.as_str() {
            "inet" => (Some(4), Some("Internet Protocol version 4 (IPv4)")),
            "inet6" => (Some(6), Some("Internet Protocol version 6 (IPv6)")),
            _ => (None, None),
        };
        let (direction_id, direction) = if d.family == "unix" {
            (4, "Local")
        } else {
            (2, "Outbound")
        };
        let boundary = ip.map(boundary);
        let process = Process {
            pid: d.pid,
            tid: d.tid,
            name: &d.comm,
            file: d.exe.as_deref().map(File::exe),
            path: d.exe.as_deref(),
            parent_process: d.ppid.map(|pid| {
                let file = d.parent_exe.as_deref().map(File::exe);
                Parent {
                    pid,
                    name: file.as_ref().map(|f| f.name),
                    path: d.parent_exe.as_deref(),
                    file,
                }
            }),
            user: User { uid: d.uid },
        };
        let time = epoch_ms(&rec.time);
        NetworkActivity {
            class_uid: 4001,
            class_name: "Network Activity",
            category_uid: 4,
            category_name: "Network Activity",
            activity_id,
            activity_name,
            type_uid: 4001 * 100 + activity_id,
            time,
            timezone_offset: 0,
            action_id,
            action,
            disposition_id,
            disposition,
            status_id,
            status,
            severity_id,
            severity: severity_name(severity_id),
            is_alert: d.decision == "deny",
            status_code: &d.reason,
            status_detail: format!("{} ({}, {} mode)", d.reason, d.action, d.mode),
            message: format!(
                "{} {} {}{} by {} ({})",
                d.comm,
                d.hook,
                target(d),
                d.host.as_ref().map_or(String::new(), |h| format!(" ({h})")),
                d.agent.as_deref().unwrap_or("an unregistered agent"),
                d.action,
            ),
            actor: Actor {
                process,
                user: User { uid: d.uid },
            },
            src_endpoint: Host {
                hostname: &rec.node,
            },
            is_src_dst_assignment_known: dst.as_ref().map(|_| true),
            dst_endpoint: dst,
            observables,
            connection_info: Conn {
                direction_id,
                direction,
                protocol_name,
                protocol_num,
                protocol_ver_id,
                protocol_ver,
                boundary_id: boundary.map(|b| b.0),
                boundary: boundary.map(|b| b.1),
            },
            policy: d.policy.as_deref().map(|name| Policy {
                name,
                uid: name,
                version: d.policy_version,
                is_applied: d.decided_by.is_none(),
            }),
            firewall_rule: d.rule.map(|uid| Rule {
                uid,
                name: d.rule_name.as_deref(),
            }),
            metadata: Metadata::new(rec),
            device: Device::new(rec),
            unmapped: Unmapped {
                agent: d.agent.as_deref(),
                agent_cgroup: d.agent_cgroup.as_deref(),
                cgroup: d.cgroup.as_deref(),
                cgroup_id: d.cgroup_id,
                hook: &d.hook,
                family: &d.family,
                decision: &d.decision,
                mode: &d.mode,
                action: &d.action,
                reason: &d.reason,
                gid: d.gid,
                ktime_ns: d.ktime_ns,
                task: d.task.as_deref(),
                intent: d.intent.as_deref(),
                grant: d.grant,
                chain: &d.chain,
                decided_by: d.decided_by.as_deref(),
                decided_by_policy: d.decided_by_policy.as_deref(),
                exe_source: d.exe_source.as_deref(),
                socket: d.socket.as_deref(),
                sock_type: d.sock_type,
                exe_truncated: d.exe_truncated,
                parent_exe_truncated: d.parent_exe_truncated,
            },
        }
    }
}

/// What the call was aimed at, for the message.
fn target(d: &DecisionRecord) -> String {
    match (&d.unix_path, &d.socket) {
        (Some(p), _) => p.clone(),
        (None, Some(kind)) => format!("{kind} socket"),
        _ if d.dst.contains(':') => format!("[{}]:{}/{}", d.dst, d.port, d.protocol),
        _ => format!("{}:{}/{}", d.dst, d.port, d.protocol),
    }
}

/// DNS rcode names as the proxy writes them, to OCSF's rcode_id and caption.
fn rcode(name: &str) -> (i64, &'static str) {
    match name {
        "NOERROR" => (0, "NoError"),
        "FORMERR" => (1, "FormError"),
        "SERVFAIL" => (2, "ServError"),
        "NXDOMAIN" => (3, "NXDomain"),
        "NOTIMP" => (4, "NotImp"),
        "REFUSED" => (5, "Refused"),
        "YXDOMAIN" | "RCODE6" => (6, "YXDomain"),
        "YXRRSET" | "RCODE7" => (7, "YXRRSet"),
        "NXRRSET" | "RCODE8" => (8, "NXRRSet"),
        "NOTAUTH" | "RCODE9" => (9, "NotAuth"),
        "NOTZONE" | "RCODE10" => (10, "NotZone"),
        _ => (99, "Other"),
    }
}

fn dns_activity(rec: &AuditRecord, detail: &Value) -> Value {
    let s = |k: &str| detail.get(k).and_then(Value::as_str);
    let decision = s("decision").unwrap_or("deny");
    let mode = s("mode").unwrap_or("enforce");
    // An allowed name is answered; a denied one refused, except in audit mode (answered, and
    // recorded as what enforcement would have done) unless the proxy refused it anyway.
    let refused = s("rcode") == Some("REFUSED");
    let action = if decision == "allow" || (mode == "audit" && !refused) {
        "allowed"
    } else {
        "blocked"
    };
    let mut ev = Map::new();
    ev.insert("class_uid".into(), json!(4003));
    ev.insert("class_name".into(), json!("DNS Activity"));
    ev.insert("category_name".into(), json!("Network Activity"));
    // One record holds the query and the answer the agent got: bidirectional traffic.
    ev.insert("activity_id".into(), json!(6));
    ev.insert("activity_name".into(), json!("Traffic"));
    insert_outcome(&mut ev, decision, mode, action);
    if let Some(reason) = s("reason").filter(|r| !r.is_empty()) {
        ev.insert("status_code".into(), json!(reason));
    }
    if let Some(err) = s("error") {
        ev.insert("status_detail".into(), json!(err));
    }
    let name = s("name").unwrap_or_default();
    let mut query = json!({ "hostname": name, "class": "IN" });
    if let Some(t) = s("type").filter(|t| !t.is_empty()) {
        query["type"] = json!(t);
    }
    ev.insert("query".into(), query);
    ev.insert("query_time".into(), json!(epoch_ms(&rec.time)));
    let answers: Vec<Value> = detail
        .get("answers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let addr = a.get("addr")?.as_str()?;
            let kind = if addr.contains(':') { "AAAA" } else { "A" };
            let mut ans = json!({ "rdata": addr, "type": kind, "class": "IN" });
            if let Some(ttl) = a.get("ttl").and_then(Value::as_u64) {
                ans["ttl"] = json!(ttl);
            }
            Some(ans)
        })
        .collect();
    if !answers.is_empty() {
        ev.insert("answers".into(), json!(answers));
    }
    if let Some(code) = s("rcode") {
        let (id, caption) = rcode(code);
        ev.insert("rcode_id".into(), json!(id));
        ev.insert("rcode".into(), json!(if id == 99 { code } else { caption }));
    }
    ev.insert("src_endpoint".into(), json!({ "hostname": rec.node }));
    let mut observables = vec![json!({
        "name": "query.hostname", "type_id": 1, "type": "Hostname", "value": name,
    })];
    if let Some(r) = s("resolver").and_then(|r| r.parse::<std::net::SocketAddr>().ok()) {
        ev.insert(
            "dst_endpoint".into(),
            json!({ "ip": r.ip().to_string(), "port": r.port() }),
        );
        observables.push(json!({
            "name": "dst_endpoint.ip", "type_id": 2, "type": "IP Address",
            "value": r.ip().to_string(),
        }));
    }
    ev.insert("observables".into(), json!(observables));
    let mut conn = json!({ "direction_id": 2, "direction": "Outbound" });
    if let Some(t) = s("transport") {
        conn["protocol_name"] = json!(t);
    }
    ev.insert("connection_info".into(), conn);
    if let Some(p) = s("policy") {
        ev.insert("policy".into(), json!({ "name": p, "uid": p }));
    }
    if let Some(rule) = detail.get("rule").and_then(Value::as_u64) {
        let mut r = json!({ "uid": rule.to_string() });
        if let Some(n) = s("rule_name") {
            r["name"] = json!(n);
        }
        ev.insert("firewall_rule".into(), r);
    }
    ev.insert(
        "message".into(),
        json!(format!(
            "DNS {} {name} by {}: {decision}",
            s("type").unwrap_or("?"),
            s("agent").unwrap_or("an unregistered agent")
        )),
    );
    // The agent, and what OCSF has no place for (dropped answers, timings).
    let mut u = Map::new();
    for k in [
        "agent",
        "agent_cgroup_id",
        "decision",
        "mode",
        "reason",
        "decided_by",
        "dropped",
        "timing_us",
    ] {
        if let Some(v) = detail.get(k).filter(|v| !v.is_null()) {
            u.insert(k.into(), v.clone());
        }
    }
    let open: Vec<Value> = detail
        .get("answers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|a| a.get("open_secs").is_some_and(|v| !v.is_null()))
        .map(|a| json!({ "addr": a["addr"], "open_secs": a["open_secs"] }))
        .collect();
    if !open.is_empty() {
        u.insert("open_secs".into(), json!(open));
    }
    ev.insert("unmapped".into(), Value::Object(u));
    Value::Object(ev)
}

/// Loss and the controller's notices: a Base Event with the native record in `unmapped`.
fn base_event(rec: &AuditRecord) -> Value {
    let mut ev = Map::new();
    ev.insert("class_uid".into(), json!(0));
    ev.insert("class_name".into(), json!("Base Event"));
    ev.insert("category_name".into(), json!("Uncategorized"));
    ev.insert("activity_id".into(), json!(99));
    ev.insert("activity_name".into(), json!(rec.kind));
    let mut u = json!({ "kind": rec.kind });
    if let Some(detail) = &rec.detail {
        u["detail"] = detail.clone();
    }
    let sev = if rec.kind == "lost" {
        let count = rec.lost.unwrap_or(0);
        let at = rec
            .detail
            .as_ref()
            .and_then(|d| d.get("where"))
            .and_then(Value::as_str)
            .unwrap_or("kernel-ring");
        u["lost"] = json!(count);
        ev.insert("count".into(), json!(count));
        ev.insert("status_id".into(), json!(2));
        ev.insert("status".into(), json!("Failure"));
        ev.insert(
            "status_detail".into(),
            json!(format!("{count} records lost at {at}")),
        );
        ev.insert(
            "message".into(),
            json!(format!("{count} audit records lost at {at}")),
        );
        4
    } else {
        ev.insert("message".into(), json!(format!("agentwall {}", rec.kind)));
        match rec.kind.as_str() {
            "policy-rejected" | "agent-map-full" => 3,
            _ => 1,
        }
    };
    ev.insert("severity_id".into(), json!(sev));
    ev.insert("severity".into(), json!(severity_name(sev)));
    ev.insert("unmapped".into(), u);
    Value::Object(ev)
}

// ---- Validation against the schema ------------------------------------------------------------
//
// Transcribed from ocsf/ocsf-schema at the v1.8.0 release (commit 3dcb905d, "v1.8.0 prep":
// version.json = 1.8.0): events/base_event.json, events/network/network.json,
// events/network/network_activity.json, events/network/dns_activity.json,
// profiles/security_control.json, profiles/host.json, objects/{metadata,product,
// network_endpoint,endpoint,network_connection_info,actor,process,process_entity,user,policy,
// observable,device,file,dns_query,dns_answer,firewall_rule,rule}.json and dictionary.json
// (attribute types and enums).

/// JSON type of an OCSF attribute (integer_t/long_t/timestamp_t/port_t: integer; string_t and
/// its subtypes: string; objects; arrays; boolean_t).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Int,
    Str,
    Obj,
    Arr,
    Bool,
}

impl Ty {
    fn matches(self, v: &Value) -> bool {
        match self {
            Ty::Int => v.is_i64() || v.is_u64(),
            Ty::Str => v.is_string(),
            Ty::Obj => v.is_object(),
            Ty::Arr => v.is_array(),
            Ty::Bool => v.is_boolean(),
        }
    }
}

/// Required attributes: (the object they belong to, "" = the event; a `[]` suffix walks an
/// array), the attribute, its type. Objects apply wherever they occur in an event we write.
const REQUIRED: &[(&str, &str, Ty)] = &[
    // base_event.json (every class).
    ("", "activity_id", Ty::Int),
    ("", "category_uid", Ty::Int),
    ("", "class_uid", Ty::Int),
    ("", "metadata", Ty::Obj),
    ("", "severity_id", Ty::Int),
    ("", "time", Ty::Int),
    ("", "type_uid", Ty::Int),
    // metadata.json
    ("metadata", "product", Ty::Obj),
    ("metadata", "version", Ty::Str),
    // device.json (host profile).
    ("device", "type_id", Ty::Int),
    // observable.json
    ("observables[]", "type_id", Ty::Int),
    // network_connection_info.json
    ("connection_info", "direction_id", Ty::Int),
    // file.json
    ("actor.process.file", "name", Ty::Str),
    ("actor.process.file", "type_id", Ty::Int),
    ("actor.process.parent_process.file", "name", Ty::Str),
    ("actor.process.parent_process.file", "type_id", Ty::Int),
    // dns_query.json, dns_answer.json (DNS Activity).
    ("query", "hostname", Ty::Str),
    ("answers[]", "rdata", Ty::Str),
];

/// Types of the attributes we write when they are present (dictionary.json).
const TYPED: &[(&str, Ty)] = &[
    ("activity_name", Ty::Str),
    ("category_name", Ty::Str),
    ("class_name", Ty::Str),
    ("severity", Ty::Str),
    ("status", Ty::Str),
    ("status_id", Ty::Int),
    ("status_code", Ty::Str),
    ("status_detail", Ty::Str),
    ("message", Ty::Str),
    ("count", Ty::Int),
    ("timezone_offset", Ty::Int),
    ("action", Ty::Str),
    ("action_id", Ty::Int),
    ("disposition", Ty::Str),
    ("disposition_id", Ty::Int),
    ("is_alert", Ty::Bool),
    ("unmapped", Ty::Obj),
    ("observables", Ty::Arr),
    ("observables[].name", Ty::Str),
    ("observables[].value", Ty::Str),
    ("metadata.uid", Ty::Str),
    ("metadata.sequence", Ty::Int),
    ("metadata.log_name", Ty::Str),
    ("metadata.event_code", Ty::Str),
    ("metadata.original_time", Ty::Str),
    ("metadata.logged_time", Ty::Int),
    ("metadata.profiles", Ty::Arr),
    ("metadata.product.name", Ty::Str),
    ("metadata.product.vendor_name", Ty::Str),
    ("metadata.product.version", Ty::Str),
    ("device", Ty::Obj),
    ("device.hostname", Ty::Str),
    ("device.boot_uid", Ty::Str),
    ("actor", Ty::Obj),
    ("actor.process", Ty::Obj),
    ("actor.process.pid", Ty::Int),
    ("actor.process.tid", Ty::Int),
    ("actor.process.name", Ty::Str),
    ("actor.process.path", Ty::Str),
    ("actor.process.file.path", Ty::Str),
    ("actor.process.parent_process", Ty::Obj),
    ("actor.process.parent_process.pid", Ty::Int),
    ("actor.process.parent_process.path", Ty::Str),
    ("actor.process.user.uid", Ty::Str),
    ("actor.user", Ty::Obj),
    ("actor.user.uid", Ty::Str),
    ("src_endpoint", Ty::Obj),
    ("src_endpoint.hostname", Ty::Str),
    ("dst_endpoint", Ty::Obj),
    ("dst_endpoint.ip", Ty::Str),
    ("dst_endpoint.port", Ty::Int),
    ("dst_endpoint.hostname", Ty::Str),
    ("dst_endpoint.name", Ty::Str),
    ("is_src_dst_assignment_known", Ty::Bool),
    ("connection_info", Ty::Obj),
    ("connection_info.direction", Ty::Str),
    ("connection_info.protocol_name", Ty::Str),
    ("connection_info.protocol_num", Ty::Int),
    ("connection_info.protocol_ver_id", Ty::Int),
    ("connection_info.protocol_ver", Ty::Str),
    ("connection_info.boundary_id", Ty::Int),
    ("connection_info.boundary", Ty::Str),
    ("policy", Ty::Obj),
    ("policy.name", Ty::Str),
    ("policy.uid", Ty::Str),
    ("policy.version", Ty::Str),
    ("policy.is_applied", Ty::Bool),
    ("firewall_rule", Ty::Obj),
    ("firewall_rule.uid", Ty::Str),
    ("firewall_rule.name", Ty::Str),
    ("query", Ty::Obj),
    ("query.type", Ty::Str),
    ("query.class", Ty::Str),
    ("query_time", Ty::Int),
    ("answers", Ty::Arr),
    ("answers[].ttl", Ty::Int),
    ("answers[].type", Ty::Str),
    ("rcode", Ty::Str),
    ("rcode_id", Ty::Int),
];

/// Enumerations: (attribute, its caption sibling, the values with their captions).
type Enum = (
    &'static str,
    Option<&'static str>,
    &'static [(i64, &'static str)],
);
#[rustfmt::skip]
const ENUMS: &[Enum] = &[
    ("severity_id", Some("severity"), &[
        (0, "Unknown"), (1, "Informational"), (2, "Low"), (3, "Medium"), (4, "High"),
        (5, "Critical"), (6, "Fatal"), (99, "Other"),
    ]),
    ("status_id", Some("status"), &[(0, "Unknown"), (1, "Success"), (2, "Failure"), (99, "Other")]),
    // security_control profile.
    ("action_id", Some("action"), &[
        (0, "Unknown"), (1, "Allowed"), (2, "Denied"), (3, "Observed"), (4, "Modified"),
        (99, "Other"),
    ]),
    ("disposition_id", Some("disposition"), &[
        (0, "Unknown"), (1, "Allowed"), (2, "Blocked"), (3, "Quarantined"), (4, "Isolated"),
        (5, "Deleted"), (6, "Dropped"), (7, "Custom Action"), (8, "Approved"), (9, "Restored"),
        (10, "Exonerated"), (11, "Corrected"), (12, "Partially Corrected"), (13, "Uncorrected"),
        (14, "Delayed"), (15, "Detected"), (16, "No Action"), (17, "Logged"), (18, "Tagged"),
        (19, "Alert"), (20, "Count"), (21, "Reset"), (22, "Captcha"), (23, "Challenge"),
        (24, "Access Revoked"), (25, "Rejected"), (26, "Unauthorized"), (27, "Error"),
        (99, "Other"),
    ]),
    ("connection_info.direction_id", Some("connection_info.direction"), &[
        (0, "Unknown"), (1, "Inbound"), (2, "Outbound"), (3, "Lateral"), (4, "Local"),
        (99, "Other"),
    ]),
    ("connection_info.protocol_ver_id", Some("connection_info.protocol_ver"), &[
        (0, "Unknown"), (4, "Internet Protocol version 4 (IPv4)"),
        (6, "Internet Protocol version 6 (IPv6)"), (99, "Other"),
    ]),
    ("connection_info.boundary_id", Some("connection_info.boundary"), &[
        (0, "Unknown"), (1, "Localhost"), (2, "Internal"), (3, "External"), (4, "Same VPC"),
        (5, "Internet/VPC Gateway"), (6, "Virtual Private Gateway"), (7, "Intra-region VPC"),
        (8, "Inter-region VPC"), (9, "Local Gateway"), (10, "Gateway VPC"),
        (11, "Internet Gateway"), (99, "Other"),
    ]),
    ("device.type_id", Some("device.type"), &[
        (0, "Unknown"), (1, "Server"), (2, "Desktop"), (3, "Laptop"), (4, "Tablet"),
        (5, "Mobile"), (6, "Virtual"), (7, "IOT"), (8, "Browser"), (9, "Firewall"),
        (10, "Switch"), (11, "Hub"), (12, "Router"), (13, "IDS"), (14, "IPS"),
        (15, "Load Balancer"), (99, "Other"),
    ]),
    ("actor.process.file.type_id", Some("actor.process.file.type"), FILE_TYPES),
    (
        "actor.process.parent_process.file.type_id",
        Some("actor.process.parent_process.file.type"),
        FILE_TYPES,
    ),
    // Observable types come from dictionary.json's types (hostname_t 1, ip_t 2) and objects.
    ("observables[].type_id", Some("observables[].type"), &[
        (0, "Unknown"), (1, "Hostname"), (2, "IP Address"), (99, "Other"),
    ]),
    ("rcode_id", None, &[
        (0, "NoError"), (1, "FormError"), (2, "ServError"), (3, "NXDomain"), (4, "NotImp"),
        (5, "Refused"), (6, "YXDomain"), (7, "YXRRSet"), (8, "NXRRSet"), (9, "NotAuth"),
        (10, "NotZone"), (11, "DSOTYPENI"), (16, "BADSIG_VERS"), (17, "BADKEY"),
        (18, "BADTIME"), (19, "BADMODE"), (20, "BADNAME"), (21, "BADALG"), (22, "BADTRUNC"),
        (23, "BADCOOKIE"), (24, "Unassigned"), (25, "Reserved"), (99, "Other"),
    ]),
];

#[rustfmt::skip]
const FILE_TYPES: &[(i64, &str)] = &[
    (0, "Unknown"), (1, "Regular File"), (2, "Folder"), (3, "Character Device"),
    (4, "Block Device"), (5, "Local Socket"), (6, "Named Pipe"), (7, "Symbolic Link"),
    (8, "Executable File"), (99, "Other"),
];

/// Classes we write: (class_uid, category_uid, activity_id values).
const CLASSES: &[(i64, i64, &[i64])] = &[
    // base_event.json: activity_id 0 Unknown, 99 Other.
    (0, 0, &[0, 99]),
    // network_activity.json: Open .. Listen, plus Unknown/Other.
    (4001, 4, &[0, 1, 2, 3, 4, 5, 6, 7, 99]),
    // dns_activity.json: Query, Response, Traffic, plus Unknown/Other.
    (4003, 4, &[0, 1, 2, 6, 99]),
];

/// `at_least_one` constraints: (object, attributes one of which it must have).
#[rustfmt::skip]
const AT_LEAST_ONE: &[(&str, &[&str])] = &[
    // _entity.json
    ("metadata.product", &["name", "uid"]),
    ("policy", &["name", "uid"]),
    ("firewall_rule", &["name", "uid"]),
    ("actor", &["process", "user", "invoked_by", "session", "app_name", "app_uid"]),
    ("actor.process", &["pid", "uid", "cpid"]),
    ("actor.process.parent_process", &["pid", "uid", "cpid"]),
    ("actor.user", &["account", "name", "uid"]),
    ("actor.process.user", &["account", "name", "uid"]),
    ("policy", &["name", "type", "uid"]),
    ("src_endpoint", &[
        "ip", "uid", "name", "hostname", "svc_name", "instance_uid", "interface_uid",
        "interface_name", "domain",
    ]),
    ("dst_endpoint", &[
        "ip", "uid", "name", "hostname", "svc_name", "instance_uid", "interface_uid",
        "interface_name", "domain",
    ]),
];

/// Every value at `path` ("" = the event; `a.b[].c` walks the array `b`).
fn at<'a>(ev: &'a Value, path: &str) -> Vec<(String, &'a Value)> {
    let mut found = vec![(String::new(), ev)];
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let (key, array) = match seg.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (seg, false),
        };
        let mut next = Vec::new();
        for (p, v) in found {
            let Some(child) = v.get(key) else { continue };
            let p = if p.is_empty() {
                key.to_string()
            } else {
                format!("{p}.{key}")
            };
            if array {
                for (i, item) in child.as_array().into_iter().flatten().enumerate() {
                    next.push((format!("{p}[{i}]"), item));
                }
            } else {
                next.push((p, child));
            }
        }
        found = next;
    }
    found
}

/// Checks an event against OCSF 1.8.0: every required attribute of its class and of the
/// objects it holds present and well-typed, enums in range with matching captions, class,
/// category and type_uid consistent, `at_least_one` constraints met. The error names the first
/// attribute that fails.
pub fn check_required(ev: &Value) -> Result<(), String> {
    if !ev.is_object() {
        return Err("an OCSF event is a JSON object".into());
    }
    for (obj, attr, ty) in REQUIRED {
        for (p, o) in at(ev, obj) {
            let name = if p.is_empty() {
                attr.to_string()
            } else {
                format!("{p}.{attr}")
            };
            match o.get(*attr) {
                None | Some(Value::Null) => return Err(format!("required {name} missing")),
                Some(v) if !ty.matches(v) => {
                    return Err(format!("required {name} is {v}, not {ty:?}"))
                }
                Some(_) => {}
            }
        }
    }
    for (path, ty) in TYPED {
        for (p, v) in at(ev, path) {
            if !ty.matches(v) {
                return Err(format!("{p} is {v}, not {ty:?}"));
            }
        }
    }
    for (path, caption, values) in ENUMS {
        let ids = at(ev, path);
        let captions = caption.map(|c| at(ev, c)).unwrap_or_default();
        for (p, v) in &ids {
            let id = v
                .as_i64()
                .ok_or_else(|| format!("{p} is {v}, not an integer"))?;
            let Some((_, name)) = values.iter().find(|(i, _)| *i == id) else {
                return Err(format!("{p} = {id} is not in the schema's enum"));
            };
            // The caption sibling of the same object (same path prefix), when written.
            let prefix = p.rsplit_once('.').map_or("", |(a, _)| a);
            for (cp, c) in &captions {
                let same = cp.rsplit_once('.').map_or("", |(a, _)| a) == prefix;
                if same && id != 99 && c.as_str() != Some(name) {
                    return Err(format!("{cp} is {c}, but {p} = {id} is {name:?}"));
                }
            }
        }
    }
    let class = ev["class_uid"].as_i64().unwrap_or(-1);
    let activity = ev["activity_id"].as_i64().unwrap_or(-1);
    let Some((_, category, activities)) = CLASSES.iter().find(|(c, _, _)| *c == class) else {
        return Err(format!("class_uid {class} is not one agentwall writes"));
    };
    if ev["category_uid"].as_i64() != Some(*category) {
        return Err(format!(
            "category_uid {} does not match class {class} (expected {category})",
            ev["category_uid"]
        ));
    }
    if !activities.contains(&activity) {
        return Err(format!(
            "activity_id {activity} is not in class {class}'s enum"
        ));
    }
    if ev["type_uid"].as_i64() != Some(class * 100 + activity) {
        return Err(format!(
            "type_uid {} is not class_uid * 100 + activity_id ({})",
            ev["type_uid"],
            class * 100 + activity
        ));
    }
    // network.json: at_least_one of dst_endpoint, src_endpoint.
    if class != 0 && ev.get("dst_endpoint").is_none() && ev.get("src_endpoint").is_none() {
        return Err("a network event needs dst_endpoint or src_endpoint".into());
    }
    for (obj, any) in AT_LEAST_ONE {
        for (p, o) in at(ev, obj) {
            if !any.iter().any(|a| o.get(*a).is_some_and(|v| !v.is_null())) {
                return Err(format!("{p} needs one of {any:?}"));
            }
        }
    }
    for (p, v) in at(ev, "dst_endpoint.ip") {
        let ip = v.as_str().unwrap_or_default();
        ip.parse::<IpAddr>()
            .map_err(|_| format!("{p} = {ip:?} is not an IP address"))?;
    }
    for (p, v) in at(ev, "dst_endpoint.port") {
        if v.as_u64().is_none_or(|n| n > 65535) {
            return Err(format!("{p} = {v} is not a port"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(overrides: Value) -> DecisionRecord {
        let mut base = json!({
            "agent": "coder", "agent_cgroup": "agents/coder", "cgroup_id": 4242,
            "cgroup": "agents/coder", "pid": 3120, "tid": 3121, "comm": "python3",
            "exe": "/usr/bin/python3.12", "exe_source": "kernel", "ppid": 3001,
            "parent_exe": "/usr/bin/bash", "uid": 1000, "gid": 1000, "hook": "connect4",
            "family": "inet", "protocol": "tcp", "dst": "140.82.112.3", "port": 443,
            "decision": "allow", "mode": "enforce", "action": "allowed", "reason": "host",
            "rule": 2, "rule_name": "github", "policy": "coder", "policy_version": 7,
            "task": "T-17", "intent": "open a PR", "host": "api.github.com",
            "ktime_ns": 123456789u64,
        });
        for (k, v) in overrides.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    fn record(kind: &str, d: Option<DecisionRecord>, detail: Option<Value>) -> AuditRecord {
        AuditRecord {
            seq: 41,
            time: "2026-11-30T06:00:00.123456789Z".into(),
            node: "node-a".into(),
            boot_id: "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0".into(),
            kind: kind.into(),
            decision: d,
            lost: (kind == "lost").then_some(12),
            detail,
        }
    }

    fn checked(rec: &AuditRecord) -> Value {
        let ev = to_ocsf(rec);
        check_required(&ev).unwrap_or_else(|e| panic!("{e}\n{ev:#}"));
        // The line form is the same event.
        let line = Format::Ocsf.line(rec).unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        let mut again: Value = serde_json::from_slice(&line).unwrap();
        again["metadata"]["logged_time"] = ev["metadata"]["logged_time"].clone();
        assert_eq!(again, ev);
        ev
    }

    #[test]
    fn an_allowed_tcp_connect_with_a_host_is_network_activity() {
        let ev = checked(&record("decision", Some(decision(json!({}))), None));
        assert_eq!(
            (ev["class_uid"].clone(), ev["category_uid"].clone()),
            (json!(4001), json!(4))
        );
        assert_eq!(
            (ev["activity_id"].clone(), ev["type_uid"].clone()),
            (json!(1), json!(400101))
        );
        assert_eq!(ev["time"], json!(1_796_018_400_123i64));
        assert_eq!(
            ev["metadata"]["original_time"],
            "2026-11-30T06:00:00.123456789Z"
        );
        assert_eq!(
            ev["metadata"]["uid"],
            "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0:41"
        );
        assert_eq!(ev["metadata"]["version"], "1.8.0");
        assert_eq!(ev["metadata"]["product"]["name"], "agentwall");
        assert_eq!(ev["metadata"]["log_name"], "agentwall.audit");
        assert_eq!(
            (
                &ev["action_id"],
                &ev["disposition_id"],
                &ev["disposition"],
                &ev["status_id"]
            ),
            (&json!(1), &json!(1), &json!("Allowed"), &json!(1))
        );
        assert_eq!(ev["severity_id"], 1);
        let p = &ev["actor"]["process"];
        assert_eq!((&p["pid"], &p["name"]), (&json!(3120), &json!("python3")));
        assert_eq!(p["file"]["path"], "/usr/bin/python3.12");
        assert_eq!(p["file"]["name"], "python3.12");
        assert_eq!(p["parent_process"]["pid"], 3001);
        assert_eq!(p["parent_process"]["file"]["path"], "/usr/bin/bash");
        assert_eq!(ev["actor"]["user"]["uid"], "1000");
        let dst = &ev["dst_endpoint"];
        assert_eq!(
            (&dst["ip"], &dst["port"], &dst["hostname"]),
            (
                &json!("140.82.112.3"),
                &json!(443),
                &json!("api.github.com")
            )
        );
        let c = &ev["connection_info"];
        assert_eq!(
            (
                &c["protocol_name"],
                &c["direction_id"],
                &c["protocol_ver_id"],
                &c["boundary_id"]
            ),
            (&json!("tcp"), &json!(2), &json!(4), &json!(3))
        );
        assert_eq!(
            ev["policy"],
            json!({ "name": "coder", "uid": "coder", "version": "7", "is_applied": true })
        );
        assert_eq!(ev["firewall_rule"], json!({ "uid": "2", "name": "github" }));
        let obs = ev["observables"].as_array().unwrap();
        assert!(obs.contains(&json!({
            "name": "dst_endpoint.hostname", "type_id": 1, "type": "Hostname",
            "value": "api.github.com",
        })));
        let u = &ev["unmapped"];
        assert_eq!(
            (&u["agent"], &u["task"], &u["cgroup"]),
            (&json!("coder"), &json!("T-17"), &json!("agents/coder"))
        );
        assert_eq!(ev["device"]["hostname"], "node-a");
    }

    #[test]
    fn a_denied_udp_send_is_blocked() {
        let d = decision(json!({
            "hook": "sendmsg6", "family": "inet6", "protocol": "udp", "dst": "2001:db8::53",
            "port": 5353, "decision": "deny", "action": "blocked",
            "reason": "default-deny:no-address-match", "rule": null, "rule_name": null,
            "host": null, "ppid": null, "parent_exe": null,
        }));
        let ev = checked(&record("decision", Some(d), None));
        assert_eq!(
            (ev["activity_id"].clone(), ev["type_uid"].clone()),
            (json!(6), json!(400106))
        );
        assert_eq!(
            (
                &ev["action_id"],
                &ev["action"],
                &ev["disposition_id"],
                &ev["disposition"]
            ),
            (&json!(2), &json!("Denied"), &json!(2), &json!("Blocked"))
        );
        assert_eq!(
            (&ev["status_id"], &ev["is_alert"]),
            (&json!(2), &json!(true))
        );
        assert_eq!(ev["status_code"], "default-deny:no-address-match");
        let c = &ev["connection_info"];
        assert_eq!(
            (&c["protocol_name"], &c["protocol_ver_id"]),
            (&json!("udp"), &json!(6))
        );
        assert!(ev["dst_endpoint"].get("hostname").is_none());
        assert!(ev["actor"]["process"].get("parent_process").is_none());
        assert!(ev.get("firewall_rule").is_none());
    }

    #[test]
    fn an_audit_mode_deny_is_observed_not_blocked() {
        let d = decision(json!({
            "decision": "deny", "mode": "audit", "action": "allowed",
            "reason": "default-deny:no-port-match", "dst": "127.0.0.1", "port": 8081,
        }));
        let ev = checked(&record("decision", Some(d), None));
        assert_eq!(
            (
                &ev["action_id"],
                &ev["disposition_id"],
                &ev["disposition"],
                &ev["status_id"]
            ),
            (&json!(3), &json!(15), &json!("Detected"), &json!(1))
        );
        assert_eq!(ev["connection_info"]["boundary_id"], 1);
        assert_eq!(ev["unmapped"]["mode"], "audit");
    }

    #[test]
    fn a_killed_raw_socket_and_a_unix_connect_map() {
        let d = decision(json!({
            "hook": "socket", "family": "packet", "protocol": "ip-proto-0", "dst": "",
            "port": 0, "socket": "packet", "sock_type": 3, "decision": "deny",
            "action": "killed", "reason": "default-deny:socket-kind", "host": null,
        }));
        let ev = checked(&record("decision", Some(d), None));
        assert_eq!(
            (&ev["activity_id"], &ev["activity_name"]),
            (&json!(99), &json!("socket"))
        );
        assert_eq!(
            (&ev["disposition_id"], &ev["severity_id"]),
            (&json!(2), &json!(4))
        );
        assert!(ev.get("dst_endpoint").is_none());
        assert_eq!(ev["src_endpoint"]["hostname"], "node-a");

        let d = decision(json!({
            "hook": "connect_unix", "family": "unix", "protocol": "stream", "dst": "",
            "port": 0, "unix_path": "/run/docker.sock", "sock_type": 1, "host": null,
        }));
        let ev = checked(&record("decision", Some(d), None));
        assert_eq!(ev["dst_endpoint"], json!({ "name": "/run/docker.sock" }));
        assert_eq!(ev["connection_info"]["direction_id"], 4);
    }

    #[test]
    fn a_dns_record_is_dns_activity_with_query_and_answers() {
        let detail = json!({
            "agent": "coder", "agent_cgroup_id": 4242, "policy": "coder",
            "name": "api.github.com", "type": "A", "transport": "udp",
            "resolver": "127.0.0.53:53", "decision": "allow", "mode": "enforce",
            "reason": "host", "rule": 2, "rule_name": "github", "decided_by": null,
            "rcode": "NOERROR",
            "answers": [
                { "addr": "140.82.112.3", "ttl": 60, "open_secs": 60 },
                { "addr": "2606:50c0::3", "ttl": 30, "open_secs": null },
            ],
            "dropped": [], "error": null,
            "timing_us": { "policy_us": 10, "upstream_us": 800, "kernel_us": 5, "total_us": 830 },
        });
        let ev = checked(&record("dns", None, Some(detail)));
        assert_eq!(
            (ev["class_uid"].clone(), ev["type_uid"].clone()),
            (json!(4003), json!(400306))
        );
        assert_eq!(
            ev["query"],
            json!({ "hostname": "api.github.com", "type": "A", "class": "IN" })
        );
        assert_eq!(
            ev["answers"][0],
            json!({ "rdata": "140.82.112.3", "ttl": 60, "type": "A", "class": "IN" })
        );
        assert_eq!(ev["answers"][1]["type"], "AAAA");
        assert_eq!(
            (&ev["rcode_id"], &ev["rcode"]),
            (&json!(0), &json!("NoError"))
        );
        assert_eq!(ev["disposition_id"], 1);
        assert_eq!(
            ev["dst_endpoint"],
            json!({ "ip": "127.0.0.53", "port": 53 })
        );
        assert_eq!(ev["unmapped"]["agent"], "coder");

        let refused = json!({
            "agent": "coder", "name": "evil.example", "type": "AAAA", "transport": "tcp",
            "decision": "deny", "mode": "enforce", "reason": "default-deny:no-host-match",
            "rcode": "REFUSED", "answers": [], "dropped": [],
        });
        let ev = checked(&record("dns", None, Some(refused)));
        assert_eq!(
            (&ev["rcode_id"], &ev["disposition_id"]),
            (&json!(5), &json!(2))
        );
        assert!(ev.get("answers").is_none());
    }

    #[test]
    fn a_loss_and_a_notice_are_base_events() {
        let mut rec = record("lost", None, Some(json!({ "where": "kernel-ring" })));
        rec.boot_id.clear();
        let ev = checked(&rec);
        assert_eq!(
            (&ev["class_uid"], &ev["category_uid"], &ev["type_uid"]),
            (&json!(0), &json!(0), &json!(99))
        );
        assert_eq!(
            (&ev["count"], &ev["status_id"], &ev["severity_id"]),
            (&json!(12), &json!(2), &json!(4))
        );
        assert_eq!(ev["unmapped"]["lost"], 12);
        // No boot id: the node scopes the sequence.
        assert_eq!(ev["metadata"]["uid"], "node-a:41");

        let ev = checked(&record(
            "policy-applied",
            None,
            Some(json!({ "policy": "coder", "version": 8 })),
        ));
        assert_eq!(
            (&ev["activity_name"], &ev["unmapped"]["detail"]["version"]),
            (&json!("policy-applied"), &json!(8))
        );
    }

    #[test]
    fn the_check_names_what_is_wrong() {
        let ev = to_ocsf(&record("decision", Some(decision(json!({}))), None));
        let broken = |f: &dyn Fn(&mut Value)| {
            let mut e = ev.clone();
            f(&mut e);
            check_required(&e).unwrap_err()
        };
        assert!(broken(&|e| {
            e.as_object_mut().unwrap().remove("time");
        })
        .contains("time missing"));
        assert!(broken(&|e| e["metadata"]["version"] = json!(1)).contains("metadata.version"));
        assert!(broken(&|e| e["actor"]["user"]["uid"] = json!(1000)).contains("actor.user.uid"));
        assert!(broken(&|e| e["disposition_id"] = json!(42)).contains("disposition_id = 42"));
        assert!(broken(&|e| e["disposition"] = json!("Allowed-ish")).contains("disposition"));
        assert!(broken(&|e| e["type_uid"] = json!(400100)).contains("type_uid"));
        assert!(broken(&|e| e["category_uid"] = json!(1)).contains("category_uid"));
        assert!(broken(&|e| {
            e["connection_info"]
                .as_object_mut()
                .unwrap()
                .remove("direction_id");
        })
        .contains("connection_info.direction_id"));
        assert!(broken(&|e| {
            e["observables"][0]
                .as_object_mut()
                .unwrap()
                .remove("type_id");
        })
        .contains("observables[0].type_id"));
        assert!(
            broken(&|e| e["dst_endpoint"]["ip"] = json!("not-an-ip")).contains("dst_endpoint.ip")
        );
        assert!(
            broken(&|e| e["actor"]["process"]["file"] = json!({ "path": "/x" }))
                .contains("actor.process.file.name")
        );
    }

    #[test]
    fn formats_parse_and_native_stays_the_default() {
        assert_eq!(Format::default(), Format::Native);
        assert_eq!("ocsf".parse::<Format>().unwrap(), Format::Ocsf);
        assert_eq!("native".parse::<Format>().unwrap().to_string(), "native");
        assert!("cef"
            .parse::<Format>()
            .unwrap_err()
            .to_string()
            .contains("cef"));
        let rec = record("decision", Some(decision(json!({}))), None);
        let native: AuditRecord =
            serde_json::from_slice(&Format::Native.line(&rec).unwrap()).unwrap();
        assert_eq!(native, rec);
    }
}
