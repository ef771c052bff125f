//! Any bytes as a ring-buffer record: `Event::from_bytes`, `Decision::from_record` (an `Event`,
//! or a `UnixEvent` for the Unix-socket hooks), and the audit record the controller writes for
//! it (and its JSON round trip).
//!
//! Never panics; a record whose length no layout writes (v2, v3 or v4 `Event`, or for a Unix
//! hook the `UnixEvent` of one of them) is refused; a decoded event is the record's bytes (an
//! older layout's prefix, zeros behind), and the decision carries its fields: the process fields
//! only when the kernel flagged them known.

#![no_main]

use std::collections::HashMap;
use std::mem::size_of;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use agent_common::{
    action, is_unix_hook, proc, Event, UnixEvent, EVENT_V2_BYTES, EVENT_V3_BYTES,
    EVENT_V5_BYTES, NO_RULE,
};
use agentwall::events::{AuditRecord, Decision, Enricher};
use agentwall::identity::{AgentMeta, Names, PolicyMeta};
use libfuzzer_sys::fuzz_target;

/// Agent cgroup 1 and policy 1 are known (the seeds use them), so records get names.
fn enricher() -> &'static Mutex<Enricher> {
    static ENRICHER: OnceLock<Mutex<Enricher>> = OnceLock::new();
    ENRICHER.get_or_init(|| {
        let names = Names {
            agents: HashMap::from([(
                1,
                AgentMeta {
                    name: "fuzz".into(),
                    cgroup: "agentwall/fuzz".into(),
                    policy: "fuzz".into(),
                },
            )]),
            policies: HashMap::from([(
                1,
                PolicyMeta {
                    name: "fuzz".into(),
                    version: 1,
                    rules: vec![Some("web".into()), None, Some("dns".into())],
                    unix: vec!["/run/tools/".into()],
                },
            )]),
            ..Names::default()
        };
        // A cgroup root that does not exist: no cgroup below an agent is ever found.
        Mutex::new(Enricher::new(
            Arc::new(RwLock::new(names)),
            "/nonexistent/agentwall-fuzz".into(),
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    let unix_tail = size_of::<UnixEvent>() - size_of::<Event>();
    let Some(e) = Event::from_bytes(data) else {
        return;
    };
    let is_unix = is_unix_hook(e.hook);
    let tail = if is_unix { unix_tail } else { 0 };
    // The layout the length names: how much of the current event the record holds.
    let head = data.len() - tail;
    assert!(
        [size_of::<Event>(), EVENT_V5_BYTES, EVENT_V3_BYTES, EVENT_V2_BYTES].contains(&head),
        "accepted a record of {} bytes",
        data.len()
    );
    // SAFETY: Event is repr(C) plain integers without padding (agent-common asserts its size).
    let bytes = unsafe {
        std::slice::from_raw_parts((&e as *const Event).cast::<u8>(), size_of::<Event>())
    };
    assert_eq!(&bytes[..head], &data[..head]);
    assert!(bytes[head..].iter().all(|&b| b == 0), "widened with zeros");

    let Some(d) = Decision::from_record(data) else {
        panic!("an event was read, the decision must be too");
    };
    assert_eq!(d.unix_path.is_some(), is_unix);
    if let Some(path) = &d.unix_path {
        let u = UnixEvent::from_bytes(data).expect("decoded as a Unix event");
        assert_eq!(u.event, e);
        let name = u.name();
        assert!(name.len() <= u.path_len as usize);
        // An abstract name shows as '@'; a path name never holds a NUL.
        match name.first() {
            Some(0) => assert!(path.starts_with('@'), "{path:?}"),
            _ => assert!(!name.contains(&0), "{name:?}"),
        }
    }
    assert_eq!(d.exe.is_some(), e.proc_flags & proc::EXE_KNOWN != 0);
    assert_eq!(d.ppid.is_some(), e.proc_flags & proc::PPID_KNOWN != 0);
    assert_eq!(
        d.parent_exe.is_some(),
        e.proc_flags & proc::PARENT_EXE_KNOWN != 0
    );
    assert_eq!(d.pid, (e.pid_tgid >> 32) as u32);
    assert_eq!(d.tid, e.pid_tgid as u32);
    assert_eq!(d.uid, e.uid_gid as u32);
    assert_eq!(d.gid, (e.uid_gid >> 32) as u32);
    assert_eq!(
        (d.cgroup_id, d.agent_cgroup_id),
        (e.cgroup_id, e.agent_cgroup_id)
    );
    assert_eq!(
        (d.policy_id, d.policy_version),
        (e.policy_id, e.policy_version)
    );
    assert_eq!(d.rule_id, (e.rule_id != NO_RULE).then_some(e.rule_id));
    match d.dst {
        IpAddr::V4(a) => {
            assert_eq!(e.family, 2);
            assert_eq!(a.to_ipv6_mapped().octets(), e.addr);
        }
        IpAddr::V6(a) => assert_eq!(a.octets(), e.addr),
    }
    assert!(!d.comm.contains('\0'), "{:?}", d.comm);
    assert!(["allow", "deny"].contains(&d.decision));
    assert!(["audit", "enforce"].contains(&d.mode));
    assert_eq!(
        d.action,
        match e.action {
            action::ALLOWED => "allowed",
            action::BLOCKED => "blocked",
            action::KILLED => "killed",
            // Not recorded (layout v2): what the verdict and the mode say.
            _ if d.decision == "deny" && d.mode == "enforce" => "blocked",
            _ => "allowed",
        }
    );

    let record = enricher().lock().unwrap().decision(&d);
    let rec = record.decision.as_ref().expect("a decision record");
    assert_eq!(rec.rule, d.rule_id);
    assert_eq!((rec.ppid, &rec.parent_exe), (d.ppid, &d.parent_exe));
    if d.exe.is_some() {
        assert_eq!(
            (&rec.exe, rec.exe_source.as_deref()),
            (&d.exe, Some("kernel"))
        );
    }
    assert_eq!(rec.action, d.action);
    if d.policy_id == 1 {
        // A grant's id is not a rule index, and an enclosing agent's verdict is not this
        // policy's: only the agent's own rule decision names a rule.
        let expected = match (d.rule_id, is_unix) {
            _ if d.reason == "grant" || d.decided_by != 0 => None,
            (Some(0), true) => Some("/run/tools/"),
            (Some(0), false) => Some("web"),
            (Some(2), false) => Some("dns"),
            _ => None,
        };
        assert_eq!(rec.rule_name.as_deref(), expected);
    }
    let json = serde_json::to_string(&record).expect("a record serializes");
    let back: AuditRecord = serde_json::from_str(&json).expect("a record parses back");
    assert_eq!(back, record, "{json}");
});
