//! Enrichment: names from the registry, process details and cgroup paths, wall-clock time.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::decode::Decision;
use crate::{
    identity::{cgroup, Names},
    sinks::{AuditRecord, DecisionRecord},
};

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

/// The kernel's boot id (empty when it cannot be read).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Builds records: names from the registry, process details from the kernel's event (procfs
/// only as a marked fallback).
pub struct Enricher {
    pub node: String,
    /// The kernel's boot id: `seq` counts within one boot.
    pub boot_id: String,
    pub clock: Clock,
    pub names: Arc<RwLock<Names>>,
    /// cgroup2 mount, to name descendant cgroups of agents.
    root: PathBuf,
    /// cgroup id -> path; ids are never reused, so entries never go stale.
    cgroup_paths: HashMap<u64, String>,
    seq: u64,
    /// Recent denied decisions for `request --from-event` (control/requests.rs).
    denied: Option<crate::control::requests::DeniedIndex>,
}

impl Enricher {
    pub fn new(names: Arc<RwLock<Names>>, root: PathBuf) -> Self {
        Self {
            node: node_name(),
            boot_id: boot_id(),
            clock: Clock::new(),
            names,
            root,
            cgroup_paths: HashMap::new(),
            seq: 0,
            denied: None,
        }
    }

    /// Feeds every decision record to `index` (one short lock per record).
    pub fn index_denied(&mut self, index: crate::control::requests::DeniedIndex) {
        self.denied = Some(index);
    }

    /// The executable for a record, and where it came from: the kernel's, else (a process
    /// that exec'd where the tracker could not see it) /proc/PID/exe now, marked as such.
    fn exe(d: &Decision) -> (Option<String>, Option<String>) {
        if let Some(exe) = &d.exe {
            return (Some(exe.clone()), Some("kernel".into()));
        }
        let procfs = procfs::process::Process::new(d.pid as i32)
            .and_then(|p| p.exe())
            .ok()
            .map(|p| p.display().to_string());
        let source = procfs.as_ref().map(|_| "procfs".to_string());
        (procfs, source)
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

    /// Continues the sequence after `last`, the seq of the last record a controller of this
    /// boot wrote (a restart adds no gap and reuses no number).
    pub fn resume_after(&mut self, last: u64) {
        self.seq = self.seq.max(last);
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The seq of a record that is no decision (the denied index learns it exists).
    fn other_seq(&mut self) -> u64 {
        let seq = self.next_seq();
        if let Some(ix) = &self.denied {
            ix.observe(seq, false, None);
        }
        seq
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
        let (exe, exe_source) = Self::exe(d);
        let task = d.task_slot.and_then(|s| names.tasks.get(&s));
        // An enclosing agent's verdict (delegation): names its agent and policy.
        let decider = (d.decided_by > 0)
            .then(|| d.chain.get(d.decided_by as usize - 1))
            .flatten()
            .map(|id| (*id, names.agents.get(id)));
        let rec = DecisionRecord {
            agent: agent.map(|a| a.name.clone()),
            agent_cgroup: agent.map(|a| a.cgroup.clone()),
            ktime_ns: d.boot_ns,
            cgroup_id: d.cgroup_id,
            cgroup,
            pid: d.pid,
            tid: d.tid,
            comm: d.comm.clone(),
            exe,
            exe_source,
            exe_truncated: d.exe_truncated,
            ppid: d.ppid,
            parent_exe: d.parent_exe.clone(),
            parent_exe_truncated: d.parent_exe_truncated,
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
                .filter(|_| d.reason != "grant" && d.decided_by == 0)
                .and_then(|r| match d.unix_path {
                    Some(_) => names.unix_entry(d.policy_id, r),
                    None => names.rule_name(d.policy_id, r),
                })
                .map(str::to_string),
            policy: policy.map(|p| p.name.clone()),
            policy_version: d.policy_version,
            task: task.map(|t| t.id.clone()),
            intent: task.map(|t| t.intent.clone()),
            grant: (d.reason == "grant")
                .then_some(d.rule_id)
                .flatten()
                .map(u64::from),
            chain: d
                .chain
                .iter()
                .map(|id| match names.agents.get(id) {
                    Some(a) => a.name.clone(),
                    None => format!("cgroup-id:{id}"),
                })
                .collect(),
            decided_by: decider.map(|(id, a)| match a {
                Some(a) => a.name.clone(),
                None => format!("cgroup-id:{id}"),
            }),
            decided_by_policy: decider.and_then(|(_, a)| a.map(|a| a.policy.clone())),
            host: (d.unix_path.is_none() && d.socket.is_none())
                .then(|| {
                    let ip = match d.dst {
                        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(d.dst, Into::into),
                        ip => ip,
                    };
                    names.host_of(
                        d.agent_cgroup_id,
                        ip,
                        d.boot_ns,
                        d.rule_id.filter(|_| d.reason == "host"),
                    )
                })
                .flatten()
                .map(str::to_string),
        };
        drop(names);
        let seq = self.next_seq();
        if let Some(ix) = &self.denied {
            let inet = d.socket.is_none() && d.unix_path.is_none();
            let (allowed, conn) = crate::control::requests::denied_conn(
                seq,
                d.agent_cgroup_id,
                d.decision,
                d.dst,
                d.port,
                &d.protocol,
                inet,
            );
            ix.observe(seq, allowed, conn);
        }
        AuditRecord {
            seq,
            time: humantime::format_rfc3339_nanos(self.clock.wall(d.boot_ns)).to_string(),
            node: self.node.clone(),
            boot_id: self.boot_id.clone(),
            kind: "decision".into(),
            decision: Some(rec),
            lost: None,
            detail: None,
        }
    }

    /// A `lost` record: `count` decisions that were never written, and where they were lost
    /// (`kernel-ring`: the kernel could not queue them; `undecodable`: records of an unknown
    /// size in the ring; `nats-spool`: ...).
    pub fn lost(&mut self, count: u64, at: &str) -> AuditRecord {
        AuditRecord {
            seq: self.other_seq(),
            time: self.now(),
            node: self.node.clone(),
            boot_id: self.boot_id.clone(),
            kind: "lost".into(),
            decision: None,
            lost: Some(count),
            detail: Some(serde_json::json!({ "where": at })),
        }
    }

    /// A record of something the controller itself reports (`kind` is the notice's).
    pub fn notice(&mut self, n: &super::Notice) -> AuditRecord {
        AuditRecord {
            seq: self.other_seq(),
            time: self.now(),
            node: self.node.clone(),
            boot_id: self.boot_id.clone(),
            kind: n.kind.into(),
            decision: None,
            // A loss another part reports (the NATS publisher): counted like the reader's own.
            lost: (n.kind == "lost")
                .then(|| n.detail["lost"].as_u64())
                .flatten(),
            detail: Some(n.detail.clone()),
        }
    }
}
