//! Decoding the kernel's fixed-size ring records into userspace terms.

use std::net::{IpAddr, Ipv6Addr};

use agent_common::{
    action, hook, mode, proc, reason, verdict, Event, UnixEvent, EXE_PATH_MAX, NO_RULE,
};

/// One decision in userspace terms, straight from the kernel record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub boot_ns: u64,
    pub cgroup_id: u64,
    pub agent_cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub dst: IpAddr,
    pub port: u16,
    pub family: &'static str,
    pub protocol: String,
    pub hook: &'static str,
    pub decision: &'static str,
    pub mode: &'static str,
    pub reason: &'static str,
    pub rule_id: Option<u32>,
    pub policy_id: u32,
    pub policy_version: u32,
    pub comm: String,
    /// What happened to the call: allowed, blocked or killed.
    pub action: &'static str,
    /// For socket-creation decisions: the socket kind (`raw`, `ping`, ...) and type number.
    pub socket: Option<&'static str>,
    pub sock_type: u32,
    /// For Unix-socket decisions: the path, or `@name` for an abstract socket.
    pub unix_path: Option<String>,
    /// The caller's executable as the kernel recorded it at its last exec (None: unknown, e.g.
    /// a layout v3 record or a process the tracker never saw), and whether it is cut short.
    pub exe: Option<String>,
    pub exe_truncated: bool,
    /// The caller's parent process at decision time (None: not read).
    pub ppid: Option<u32>,
    pub parent_exe: Option<String>,
    pub parent_exe_truncated: bool,
    /// The agent's task slot stamped by the kernel (None: no task).
    pub task_slot: Option<u32>,
    /// Agents enclosing the caller's, nearest first, that judged the call too (delegation).
    pub chain: Vec<u64>,
    /// Whose verdict this is: 0 the agent itself, n the agent `chain[n - 1]`.
    pub decided_by: u32,
}

/// A NUL-terminated path the kernel copied, when `known`.
fn kernel_path(bytes: &[u8; EXE_PATH_MAX], known: bool) -> Option<String> {
    if !known {
        return None;
    }
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(EXE_PATH_MAX);
    Some(String::from_utf8_lossy(&bytes[..len]).into_owned())
}

impl Decision {
    /// Decodes one ring record: an `Event`, or a `UnixEvent` for the Unix-socket hooks.
    pub fn from_record(bytes: &[u8]) -> Option<Decision> {
        // The layout is told by the record's length and hook (agent_common::Event::from_bytes).
        let e = Event::from_bytes(bytes)?;
        if agent_common::is_unix_hook(e.hook) {
            return UnixEvent::from_bytes(bytes).map(|u| Decision::from_unix_event(&u));
        }
        Some(Decision::from_event(&e))
    }

    pub fn from_unix_event(u: &UnixEvent) -> Decision {
        let name = u.name();
        let shown = match name.split_first() {
            Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
            _ => String::from_utf8_lossy(name).into_owned(),
        };
        Decision {
            protocol: match u.event.sock_type {
                1 => "stream".to_string(),
                2 => "dgram".to_string(),
                5 => "seqpacket".to_string(),
                t => format!("sock-type-{t}"),
            },
            unix_path: Some(shown),
            ..Decision::from_event(&u.event)
        }
    }

    pub fn from_event(e: &Event) -> Decision {
        let v6 = Ipv6Addr::from(e.addr);
        // IPv4 is carried as ::ffff:a.b.c.d; show it as a plain IPv4 address only when the
        // caller used AF_INET (an AF_INET6 caller really wrote the mapped form).
        let dst = match (e.family, v6.to_ipv4_mapped()) {
            (2, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
        Decision {
            boot_ns: e.boot_ns,
            cgroup_id: e.cgroup_id,
            agent_cgroup_id: e.agent_cgroup_id,
            pid: (e.pid_tgid >> 32) as u32,
            tid: e.pid_tgid as u32,
            uid: e.uid_gid as u32,
            gid: (e.uid_gid >> 32) as u32,
            dst,
            port: e.port as u16,
            family: match e.family {
                1 => "unix",
                2 => "inet",
                10 => "inet6",
                16 => "netlink",
                17 => "packet",
                40 => "vsock",
                44 => "xdp",
                _ => "other",
            },
            protocol: match e.protocol {
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                p => format!("ip-proto-{p}"),
            },
            hook: match e.hook {
                hook::CONNECT4 => "connect4",
                hook::CONNECT6 => "connect6",
                hook::SENDMSG4 => "sendmsg4",
                hook::SENDMSG6 => "sendmsg6",
                hook::SOCK_CREATE => "sock_create",
                hook::CONNECT_UNIX => "connect_unix",
                hook::SENDMSG_UNIX => "sendmsg_unix",
                hook::SOCKET => "socket",
                _ => "unknown",
            },
            decision: if e.verdict == verdict::ALLOW {
                "allow"
            } else {
                "deny"
            },
            mode: if e.mode == mode::AUDIT {
                "audit"
            } else {
                "enforce"
            },
            reason: match e.reason {
                reason::RULE => "rule",
                reason::NO_ADDRESS_MATCH => "default-deny:no-address-match",
                reason::NO_PORT_MATCH => "default-deny:no-port-match",
                reason::ERROR => "error",
                reason::SOCKET_KIND => "default-deny:socket-kind",
                reason::SOCKET_ALLOWED => "socket-kind-allowed",
                reason::DEADMAN => "deadman:deny-all",
                reason::NO_PATH_MATCH => "default-deny:no-path-match",
                reason::PATH_DOTDOT => "deny:path-dotdot",
                reason::PENDING_IDENTITY => "pending-identity",
                reason::GRANT => "grant",
                reason::RATE_LIMIT => "rate-limit",
                reason::CHAIN_TOO_DEEP => "deny:chain-too-deep",
                reason::DNS_PROXY => "dns-proxy",
                reason::HOST => "host",
                _ => "unknown",
            },
            rule_id: (e.rule_id != NO_RULE).then_some(e.rule_id),
            policy_id: e.policy_id,
            policy_version: e.policy_version,
            comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
            action: match e.action {
                action::ALLOWED => "allowed",
                action::BLOCKED => "blocked",
                action::KILLED => "killed",
                // A layout v2 record: the verdict and the mode tell.
                _ if e.verdict == verdict::ALLOW || e.mode == mode::AUDIT => "allowed",
                _ => "blocked",
            },
            socket: matches!(e.hook, hook::SOCK_CREATE | hook::SOCKET)
                .then(|| crate::policy::socket_kind_name(e.sock_kind).unwrap_or("unknown")),
            sock_type: e.sock_type,
            unix_path: None,
            exe: kernel_path(&e.exe, e.proc_flags & proc::EXE_KNOWN != 0),
            exe_truncated: e.proc_flags & proc::EXE_TRUNCATED != 0,
            ppid: (e.proc_flags & proc::PPID_KNOWN != 0).then_some(e.ppid),
            parent_exe: kernel_path(&e.parent_exe, e.proc_flags & proc::PARENT_EXE_KNOWN != 0),
            parent_exe_truncated: e.proc_flags & proc::PARENT_EXE_TRUNCATED != 0,
            task_slot: (e.task_slot != 0).then_some(e.task_slot),
            chain: e.chain.iter().copied().take_while(|&id| id != 0).collect(),
            decided_by: e.decided_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::Enricher, identity::Names};
    use std::mem::size_of;
    use std::{
        path::PathBuf,
        sync::{Arc, RwLock},
    };

    fn event() -> Event {
        Event {
            boot_ns: 5,
            cgroup_id: 10,
            agent_cgroup_id: 10,
            pid_tgid: (42u64 << 32) | 43,
            uid_gid: (1000u64 << 32) | 1001,
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1],
            port: 8080,
            family: 2,
            protocol: 6,
            hook: hook::CONNECT4,
            verdict: verdict::DENY,
            mode: mode::ENFORCE,
            reason: reason::NO_ADDRESS_MATCH,
            rule_id: NO_RULE,
            policy_id: 3,
            policy_version: 1,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            sock_type: 0,
            sock_kind: 0,
            action: action::BLOCKED,
            task_slot: 0,
            ppid: 7,
            proc_flags: proc::PPID_KNOWN | proc::EXE_KNOWN,
            exe: path(b"/usr/bin/curl"),
            parent_exe: path(b"/bin/sh"),
            chain: [0; agent_common::MAX_AGENT_CHAIN - 1],
            decided_by: 0,
            _reserved: 0,
        }
    }

    #[test]
    fn the_chain_of_agents_and_who_decided_are_read() {
        let e = Event {
            chain: [20, 30, 0],
            decided_by: 2,
            reason: reason::RATE_LIMIT,
            ..event()
        };
        let d = Decision::from_event(&e);
        assert_eq!(d.chain, vec![20, 30]);
        assert_eq!(d.decided_by, 2);
        assert_eq!(d.reason, "rate-limit");
        // A layout v5 record (no chain) reads as no enclosing agents.
        let v5 = as_bytes(&e)[..agent_common::EVENT_V5_BYTES].to_vec();
        let d = Decision::from_record(&v5).unwrap();
        assert!(d.chain.is_empty());
        assert_eq!(d.decided_by, 0);
    }

    fn path(p: &[u8]) -> [u8; EXE_PATH_MAX] {
        let mut b = [0; EXE_PATH_MAX];
        b[..p.len()].copy_from_slice(p);
        b
    }

    #[test]
    fn process_fields_are_read_only_when_the_kernel_knew_them() {
        let d = Decision::from_event(&event());
        assert_eq!(d.exe.as_deref(), Some("/usr/bin/curl"));
        assert_eq!(d.ppid, Some(7));
        // The parent's path is there, but not flagged known: not shown.
        assert_eq!(d.parent_exe, None);
        let mut e = event();
        e.proc_flags = proc::PARENT_EXE_KNOWN | proc::PARENT_EXE_TRUNCATED;
        let d = Decision::from_event(&e);
        assert_eq!((d.exe, d.ppid), (None, None));
        assert_eq!(d.parent_exe.as_deref(), Some("/bin/sh"));
        assert!(d.parent_exe_truncated && !d.exe_truncated);
        // A path filling the whole field has no NUL: all of it.
        e.proc_flags = proc::EXE_KNOWN | proc::EXE_TRUNCATED;
        e.exe = [b'a'; EXE_PATH_MAX];
        let d = Decision::from_event(&e);
        assert_eq!(d.exe.map(|x| x.len()), Some(EXE_PATH_MAX));
        assert!(d.exe_truncated);
    }

    #[test]
    fn decodes_pending_identity_and_error() {
        let mut e = event();
        e.reason = reason::PENDING_IDENTITY;
        assert_eq!(Decision::from_event(&e).reason, "pending-identity");
        e.reason = reason::ERROR;
        assert_eq!(Decision::from_event(&e).reason, "error");
    }

    #[test]
    fn decodes_an_ipv4_denial() {
        let d = Decision::from_event(&event());
        assert_eq!(d.dst.to_string(), "127.0.0.1");
        assert_eq!((d.pid, d.tid, d.uid, d.gid), (42, 43, 1001, 1000));
        assert_eq!(d.comm, "curl");
        assert_eq!(d.protocol, "tcp");
        assert_eq!(d.hook, "connect4");
        assert_eq!(d.decision, "deny");
        assert_eq!(d.action, "blocked");
        assert_eq!(d.rule_id, None);
        assert_eq!(d.reason, "default-deny:no-address-match");
    }

    #[test]
    fn mapped_address_from_an_inet6_caller_stays_ipv6() {
        let mut e = event();
        e.family = 10;
        e.hook = hook::CONNECT6;
        let d = Decision::from_event(&e);
        assert_eq!(d.dst.to_string(), "::ffff:127.0.0.1");
    }

    #[test]
    fn decodes_a_socket_creation_denial() {
        let mut e = event();
        e.hook = hook::SOCK_CREATE;
        e.reason = reason::SOCKET_KIND;
        e.family = 2;
        e.protocol = 1;
        e.sock_type = 3;
        e.sock_kind = agent_common::sock::RAW;
        e.addr = [0; 16];
        let d = Decision::from_event(&e);
        assert_eq!(
            (d.hook, d.socket, d.sock_type),
            ("sock_create", Some("raw"), 3)
        );
        assert_eq!(d.reason, "default-deny:socket-kind");
        assert_eq!(d.protocol, "ip-proto-1");
    }

    #[test]
    fn decodes_a_killed_socket_call() {
        let mut e = event();
        e.hook = hook::SOCKET;
        e.reason = reason::SOCKET_KIND;
        e.family = 17;
        e.sock_type = 3;
        e.sock_kind = agent_common::sock::PACKET;
        e.action = action::KILLED;
        let d = Decision::from_event(&e);
        assert_eq!(
            (d.hook, d.family, d.socket, d.decision, d.action),
            ("socket", "packet", Some("packet"), "deny", "killed")
        );
    }

    #[test]
    fn layout_v2_records_decode_with_the_action_their_verdict_tells() {
        // v2 wrote no `action`: the same fields, 8 bytes shorter.
        let v2 = |e: &Event| as_bytes(e)[..agent_common::EVENT_V2_BYTES].to_vec();
        let mut e = event();
        e.action = 0;
        let d = Decision::from_record(&v2(&e)).unwrap();
        assert_eq!((d.hook, d.port, d.action), ("connect4", 8080, "blocked"));
        e.mode = mode::AUDIT;
        assert_eq!(Decision::from_record(&v2(&e)).unwrap().action, "allowed");
        // A v2 Unix record: its path follows the shorter event.
        let u = unix_event(b"/run/a.sock\0", 12);
        let mut bytes = v2(&u.event);
        bytes.extend_from_slice(&as_bytes(&u)[size_of::<Event>()..]);
        let d = Decision::from_record(&bytes).unwrap();
        assert_eq!(d.unix_path.as_deref(), Some("/run/a.sock"));
        assert_eq!(d.action, "blocked");
        assert!(Decision::from_record(&bytes[..agent_common::EVENT_V2_BYTES - 1]).is_none());
        // A length no layout writes (found by the fuzzer): refused, no panic.
        let whole = event();
        let odd = &as_bytes(&whole)[..agent_common::EVENT_V2_BYTES + 3];
        assert_eq!(Event::from_bytes(odd), None);
    }

    #[test]
    fn layout_v3_records_decode_without_process_fields() {
        // v3 wrote the same fields up to `action`, and no process fields.
        let v3 = |e: &Event| as_bytes(e)[..agent_common::EVENT_V3_BYTES].to_vec();
        let d = Decision::from_record(&v3(&event())).unwrap();
        assert_eq!((d.hook, d.port, d.action), ("connect4", 8080, "blocked"));
        assert_eq!((d.exe, d.ppid, d.parent_exe), (None, None, None));
        // A v3 Unix record: its path follows the v3 event.
        let u = unix_event(b"/run/a.sock\0", 12);
        let mut bytes = v3(&u.event);
        bytes.extend_from_slice(&as_bytes(&u)[size_of::<Event>()..]);
        let d = Decision::from_record(&bytes).unwrap();
        assert_eq!(d.unix_path.as_deref(), Some("/run/a.sock"));
        assert_eq!((d.action, d.exe), ("blocked", None));
        // A current Unix record cut to an event's length is refused, not misread.
        let whole = as_bytes(&u);
        assert!(Decision::from_record(&whole[..size_of::<Event>()]).is_none());
        assert!(Decision::from_record(&whole[..whole.len() - 1]).is_none());
    }

    #[test]
    fn audit_mode_lets_a_denial_through() {
        let mut e = event();
        e.mode = mode::AUDIT;
        e.action = action::ALLOWED;
        let d = Decision::from_event(&e);
        assert_eq!((d.decision, d.mode, d.action), ("deny", "audit", "allowed"));
    }

    #[test]
    fn round_trips_through_ring_bytes() {
        let e = event();
        // SAFETY: Event is plain integers with no padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(&e as *const Event as *const u8, size_of::<Event>())
        };
        assert_eq!(Event::from_bytes(bytes), Some(e));
        assert_eq!(Event::from_bytes(&bytes[..10]), None);
    }

    fn unix_event(path: &[u8], path_len: u32) -> UnixEvent {
        let mut p = [0u8; agent_common::UNIX_PATH_MAX];
        p[..path.len()].copy_from_slice(path);
        UnixEvent {
            event: Event {
                hook: hook::CONNECT_UNIX,
                family: 1,
                protocol: 0,
                sock_type: 1,
                reason: reason::NO_PATH_MATCH,
                addr: [0; 16],
                port: 0,
                ..event()
            },
            path_len,
            path: p,
        }
    }

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: the event types are plain integers without padding.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    #[test]
    fn decodes_unix_records_by_hook() {
        // A path name ends at its first NUL, within the caller's length.
        let u = unix_event(b"/run/a.sock\0/etc", 16);
        let d = Decision::from_record(as_bytes(&u)).unwrap();
        assert_eq!(d.unix_path.as_deref(), Some("/run/a.sock"));
        assert_eq!((d.hook, d.protocol.as_str()), ("connect_unix", "stream"));
        assert_eq!(d.reason, "default-deny:no-path-match");
        // An abstract name is exactly path_len bytes, leading NUL shown as '@'.
        let u = unix_event(b"\0broker", 7);
        let d = Decision::from_record(as_bytes(&u)).unwrap();
        assert_eq!(d.unix_path.as_deref(), Some("@broker"));
        // A Unix hook's record cut to an Event's size is refused, not misread.
        assert!(Decision::from_record(&as_bytes(&u)[..size_of::<Event>()]).is_none());
        // Other hooks decode as plain events.
        let d = Decision::from_record(as_bytes(&event())).unwrap();
        assert_eq!((d.hook, d.unix_path), ("connect4", None));
    }

    #[test]
    fn a_record_names_agent_policy_and_rule() {
        let mut names = Names::default();
        names.agents.insert(
            10,
            crate::identity::AgentMeta {
                name: "demo".into(),
                cgroup: "agentwall/demo".into(),
                policy: "demo".into(),
            },
        );
        names.policies.insert(
            3,
            crate::identity::PolicyMeta {
                name: "demo".into(),
                version: 1,
                rules: vec![Some("local-api".into())],
                unix: vec!["/run/tools/".into()],
            },
        );
        let mut en = Enricher::new(Arc::new(RwLock::new(names)), PathBuf::from("/nonexistent"));
        let mut e = event();
        e.verdict = verdict::ALLOW;
        e.reason = reason::RULE;
        e.rule_id = 0;
        e.action = action::ALLOWED;
        let rec = en.decision(&Decision::from_event(&e));
        let d = rec.decision.unwrap();
        assert_eq!(rec.seq, 1);
        assert_eq!(d.agent.as_deref(), Some("demo"));
        assert_eq!(d.cgroup.as_deref(), Some("agentwall/demo"));
        assert_eq!(d.rule_name.as_deref(), Some("local-api"));
        assert_eq!(d.policy.as_deref(), Some("demo"));
        assert_eq!(d.action, "allowed");
        let mut u = unix_event(b"/run/tools/x.sock\0junk", 17);
        u.event.verdict = verdict::ALLOW;
        u.event.reason = reason::RULE;
        u.event.rule_id = 0;
        u.event.action = action::ALLOWED;
        let rec = en.decision(&Decision::from_unix_event(&u));
        let d = rec.decision.unwrap();
        assert_eq!(d.unix_path.as_deref(), Some("/run/tools/x.sock"));
        assert_eq!(d.rule_name.as_deref(), Some("/run/tools/"));
        assert_eq!((d.dst.as_str(), d.sock_type), ("", Some(1)));
        let lost = en.lost(7, "kernel-ring");
        assert_eq!(
            (lost.seq, lost.kind.as_str(), lost.lost),
            (3, "lost", Some(7))
        );
        assert_eq!(lost.detail.unwrap()["where"], "kernel-ring");
        // A restarted controller continues the sequence of its boot.
        en.resume_after(41);
        assert_eq!(en.lost(1, "undecodable").seq, 42);
    }
}
