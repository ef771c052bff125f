//! Events: decode the kernel's fixed-size records, name and enrich them, write one JSON line per
//! decision. The reader drains on readiness AND on a short timer, because the programs submit
//! without a wake-up until a threshold of bytes is pending (MEASURED.md).

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, LineWriter, Write},
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::{action, hook, mode, reason, verdict, Event, UnixEvent, NO_RULE};
use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use crate::{cgroup, identity::Names};

/// How often the reader drains without a wake-up.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

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
}

impl Decision {
    /// Decodes one ring record: an `Event`, or a `UnixEvent` for the Unix-socket hooks.
    pub fn from_record(bytes: &[u8]) -> Option<Decision> {
        let e = Event::from_bytes(bytes)?;
        if matches!(e.hook, hook::CONNECT_UNIX | hook::SENDMSG_UNIX) {
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
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time: String,
    pub node: String,
    /// "decision" or "lost".
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionRecord>,
    /// For kind "lost": how many events the kernel could not queue since the last report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct DecisionRecord {
    pub agent: Option<String>,
    pub agent_cgroup: Option<String>,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub exe: Option<String>,
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
}

/// Converts CLOCK_BOOTTIME stamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - boottime at start, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let now = |clk| {
            let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
            // SAFETY: valid clock id and out pointer.
            unsafe { libc::clock_gettime(clk, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        Clock {
            offset_ns: now(libc::CLOCK_REALTIME) - now(libc::CLOCK_BOOTTIME),
        }
    }

    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        let ns = (boot_ns as i128 + self.offset_ns).clamp(0, u64::MAX as i128) as u64;
        UNIX_EPOCH + Duration::from_nanos(ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Builds records: names from the registry, process details from procfs.
pub struct Enricher {
    pub node: String,
    pub clock: Clock,
    pub names: Arc<RwLock<Names>>,
    /// cgroup2 mount, to name descendant cgroups of agents.
    root: PathBuf,
    /// cgroup id -> path; ids are never reused, so entries never go stale.
    cgroup_paths: HashMap<u64, String>,
    /// pid -> (comm, executable, when read): /proc/PID/exe is read at most once per EXE_TTL
    /// for a process whose comm is unchanged; a busy agent makes thousands of calls a second
    /// and the read costs more than the rest of a record.
    exes: HashMap<u32, (String, Option<String>, Instant)>,
    seq: u64,
}

/// How long a cached executable path is trusted (an exec changes comm, which is in the key).
const EXE_TTL: Duration = Duration::from_secs(1);
const EXE_CACHE_MAX: usize = 4096;

impl Enricher {
    pub fn new(names: Arc<RwLock<Names>>, root: PathBuf) -> Self {
        Self {
            node: node_name(),
            clock: Clock::new(),
            names,
            root,
            cgroup_paths: HashMap::new(),
            exes: HashMap::new(),
            seq: 0,
        }
    }

    fn exe(&mut self, pid: u32, comm: &str) -> Option<String> {
        let now = Instant::now();
        if let Some((c, exe, at)) = self.exes.get(&pid) {
            if c == comm && now.duration_since(*at) < EXE_TTL {
                return exe.clone();
            }
        }
        let exe = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.exe())
            .ok()
            .map(|p| p.display().to_string());
        if self.exes.len() >= EXE_CACHE_MAX {
            self.exes
                .retain(|_, (_, _, at)| now.duration_since(*at) < EXE_TTL);
        }
        self.exes.insert(pid, (comm.to_string(), exe.clone(), now));
        exe
    }

    /// Path of a cgroup below an agent: the caller's own /proc entry when it is still there and
    /// agrees, else a search of the agent's subtree by id.
    fn cgroup_path(&mut self, id: u64, pid: u32, agent_cgroup: &str) -> Option<String> {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return Some(p.clone());
        }
        let is = |root: &Path, rel: &str| cgroup::cgroup_id(&root.join(rel)).ok() == Some(id);
        let found = cgroup::of_pid(pid)
            .filter(|rel| is(&self.root, rel))
            .or_else(|| {
                let base = self.root.join(agent_cgroup);
                cgroup::walk(&base)
                    .into_iter()
                    .find(|rel| is(&base, rel))
                    .map(|rel| format!("{agent_cgroup}/{rel}"))
            })?;
        self.cgroup_paths.insert(id, found.clone());
        Some(found)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn now(&self) -> String {
        humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
    }

    pub fn decision(&mut self, d: &Decision) -> AuditRecord {
        let names = self.names.clone();
        let names = names.read().expect("names lock");
        let agent = names.agents.get(&d.agent_cgroup_id);
        let policy = names.policies.get(&d.policy_id);
        let cgroup = match agent {
            Some(a) if d.cgroup_id == d.agent_cgroup_id => Some(a.cgroup.clone()),
            Some(a) => self.cgroup_path(d.cgroup_id, d.pid, &a.cgroup),
            None => None,
        };
        let exe = self.exe(d.pid, &d.comm);
        let rec = DecisionRecord {
            agent: agent.map(|a| a.name.clone()),
            agent_cgroup: agent.map(|a| a.cgroup.clone()),
            cgroup_id: d.cgroup_id,
            cgroup,
            pid: d.pid,
            tid: d.tid,
            comm: d.comm.clone(),
            exe,
            uid: d.uid,
            gid: d.gid,
            hook: d.hook.to_string(),
            family: d.family.to_string(),
            protocol: d.protocol.clone(),
            dst: if d.socket.is_some() || d.unix_path.is_some() {
                String::new()
            } else {
                d.dst.to_string()
            },
            port: d.port,
            socket: d.socket.map(str::to_string),
            sock_type: (d.socket.is_some() || d.unix_path.is_some()).then_some(d.sock_type),
            unix_path: d.unix_path.clone(),
            decision: d.decision.to_string(),
            mode: d.mode.to_string(),
            action: d.action.to_string(),
            reason: d.reason.to_string(),
            rule: d.rule_id,
            rule_name: d
                .rule_id
                .and_then(|r| match d.unix_path {
                    Some(_) => names.unix_entry(d.policy_id, r),
                    None => names.rule_name(d.policy_id, r),
                })
                .map(str::to_string),
            policy: policy.map(|p| p.name.clone()),
            policy_version: d.policy_version,
        };
        drop(names);
        AuditRecord {
            seq: self.next_seq(),
            time: humantime::format_rfc3339_nanos(self.clock.wall(d.boot_ns)).to_string(),
            node: self.node.clone(),
            kind: "decision".into(),
            decision: Some(rec),
            lost: None,
        }
    }

    pub fn lost(&mut self, count: u64) -> AuditRecord {
        AuditRecord {
            seq: self.next_seq(),
            time: self.now(),
            node: self.node.clone(),
            kind: "lost".into(),
            decision: None,
            lost: Some(count),
        }
    }
}

/// Where records go: the audit file, stdout, and an in-process tap. The file is written a line
/// at a time while the ring record is still held, so the ring's consumer position passes a
/// record only once it is in the file: a controller killed at any moment loses no record (at
/// worst one is written twice, with the same time and thread).
pub struct Sink {
    file: Option<LineWriter<File>>,
    stdout: bool,
    tap: Option<mpsc::UnboundedSender<AuditRecord>>,
}

impl Sink {
    pub fn new(
        audit_log: Option<&Path>,
        stdout: bool,
        tap: Option<mpsc::UnboundedSender<AuditRecord>>,
    ) -> io::Result<Self> {
        let file = match audit_log {
            Some(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                Some(LineWriter::new(
                    OpenOptions::new().create(true).append(true).open(p)?,
                ))
            }
            None => None,
        };
        Ok(Self { file, stdout, tap })
    }

    pub fn write(&mut self, rec: &AuditRecord) -> io::Result<()> {
        let line = serde_json::to_string(rec).map_err(io::Error::other)?;
        if let Some(f) = &mut self.file {
            f.write_all(line.as_bytes())?;
            f.write_all(b"\n")?;
        }
        if self.stdout {
            println!("{line}");
        }
        if let Some(tap) = &self.tap {
            let _ = tap.send(rec.clone());
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = &mut self.file {
            f.flush()?;
        }
        Ok(())
    }
}

/// Reads the ring buffer until `shutdown` turns true; lost-event counts arrive on `lost`.
pub async fn run(
    ring: RingBuf<MapData>,
    mut enricher: Enricher,
    mut sink: Sink,
    mut lost: mpsc::UnboundedReceiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    drain_interval: Duration,
) -> io::Result<()> {
    // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd owns it.
    let mut afd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    let mut tick = tokio::time::interval(drain_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = afd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut enricher, &mut sink)?;
                guard.clear_ready();
            }
            _ = tick.tick() => drain(afd.get_mut(), &mut enricher, &mut sink)?,
            Some(n) = lost.recv() => {
                tracing::warn!(lost = n, "events lost: the ring buffer was full");
                sink.write(&enricher.lost(n))?;
                sink.flush()?;
            }
            _ = shutdown.changed() => {
                drain(afd.get_mut(), &mut enricher, &mut sink)?;
                while let Ok(n) = lost.try_recv() {
                    sink.write(&enricher.lost(n))?;
                }
                sink.flush()?;
                return Ok(());
            }
        }
    }
}

/// Writes what an older layout's ring still holds, and the losses its controller never
/// reported, before that layout's maps are removed.
pub fn drain_retired(
    retired: &mut crate::loader::Retired,
    enricher: &mut Enricher,
    sink: &mut Sink,
) -> io::Result<()> {
    if let Some(ring) = &mut retired.ring {
        drain(ring, enricher, sink)?;
    }
    if retired.lost > 0 {
        sink.write(&enricher.lost(retired.lost))?;
    }
    sink.flush()
}

fn drain(ring: &mut RingBuf<MapData>, enricher: &mut Enricher, sink: &mut Sink) -> io::Result<()> {
    let mut any = false;
    let mut undecodable = 0;
    while let Some(item) = ring.next() {
        any = true;
        match Decision::from_record(&item) {
            Some(d) => sink.write(&enricher.decision(&d))?,
            None => undecodable += 1,
        }
        // Dropping the item moves the consumer position: only after the record is written.
        drop(item);
    }
    if undecodable > 0 {
        tracing::error!(
            records = undecodable,
            "records of an unknown size in the event ring: reported as lost"
        );
        sink.write(&enricher.lost(undecodable))?;
    }
    if any {
        sink.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

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
            _reserved: 0,
        }
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
        // Between the two sizes (found by the fuzzer): read as v2, no panic.
        let whole = event();
        let odd = &as_bytes(&whole)[..agent_common::EVENT_V2_BYTES + 3];
        assert_eq!(Event::from_bytes(odd).map(|e| e.action), Some(0));
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
        let lost = en.lost(7);
        assert_eq!(
            (lost.seq, lost.kind.as_str(), lost.lost),
            (3, "lost", Some(7))
        );
    }
}
