//! Control logic against the in-memory datapath, on a directory tree standing in for cgroupfs
//! (a cgroup id is its directory's inode number in both).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use agent_common::{entry, mode};
use tokio::sync::mpsc;

use super::*;
use crate::{datapath::fake::Fake, events::Notice, identity::watch::Change, policy::parse_policy};

/// A controller over the in-memory datapath on a temporary tree (shared with the runtime and
/// explain tests).
pub(super) struct T {
    pub(super) state: State<Fake>,
    pub(super) root: PathBuf,
    pub(super) notices: mpsc::UnboundedReceiver<Notice>,
}

impl Drop for T {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

pub(super) fn policies(list: &[(&str, &str, &str)]) -> PolicySet {
    PolicySet {
        policies: list
            .iter()
            .map(|(name, selector, pending)| {
                let yaml = format!(
                    "name: {name}\npending: {pending}\nagents:\n  cgroups: [\"{selector}\"]\n\
                     egress:\n  - cidr: 127.0.0.1/32\n"
                );
                parse_policy(Path::new("t.yaml"), &yaml).unwrap()
            })
            .collect(),
    }
}

pub(super) fn setup(capacity: u32, dirs: &[&str], set: PolicySet) -> T {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let root = std::env::temp_dir().join(format!(
        "aw-control-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&root);
    for d in dirs {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::create_dir_all(&root).unwrap();
    let (lost_tx, _losses) = crate::events::loss_link(0);
    let (notice_tx, notices) = mpsc::unbounded_channel();
    let mut state = State::new(
        Fake::new(capacity),
        root.clone(),
        None,
        Arc::new(RwLock::new(Names::default())),
        0,
        lost_tx,
        notice_tx,
        crate::sinks::Health::new(),
    )
    .unwrap();
    state.apply(set).unwrap();
    T {
        state,
        root,
        notices,
    }
}

/// A set of one policy from its YAML.
pub(super) fn one_policy(yaml: &str) -> PolicySet {
    PolicySet {
        policies: vec![parse_policy(Path::new("t.yaml"), yaml).unwrap()],
    }
}

impl T {
    pub(super) fn id(&self, rel: &str) -> u64 {
        cgroup::cgroup_id(&self.root.join(rel)).unwrap()
    }
    /// The kinds of the notices sent since the last call.
    pub(super) fn kinds(&mut self) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(n) = self.notices.try_recv() {
            out.push(n.kind);
        }
        out
    }

    fn kind(&self, rel: &str) -> Option<u32> {
        self.state
            .enforcer
            .agents
            .get(&self.id(rel))
            .map(|e| e.kind)
    }
    pub(super) fn entry(&self, rel: &str) -> AgentEntry {
        self.state.enforcer.agents[&self.id(rel)]
    }
}

#[test]
fn parents_are_watched_and_cgroups_below_them_judged() {
    let t = setup(
        64,
        &[
            "aw/research-1",
            "aw/other",
            "aw/research-1/child",
            "elsewhere",
        ],
        policies(&[("r", "aw/research-*", "deny")]),
    );
    assert_eq!(t.kind("aw"), Some(entry::WATCH));
    assert_eq!(t.entry("aw").mode, mode::ENFORCE);
    assert_eq!(t.kind("aw/research-1"), Some(entry::AGENT));
    assert_eq!(
        t.entry("aw/research-1").policy_id,
        t.state.installed["r"].id
    );
    assert_eq!(t.kind("aw/other"), Some(entry::EXEMPT));
    // An agent's child stays under the agent's policy; outside the parent nothing is written.
    assert_eq!(t.kind("aw/research-1/child"), None);
    assert_eq!(t.kind("elsewhere"), None);
    // Levels 1 (the watch) and 2 (agent, exempt) are probed by the kernel.
    assert_eq!(t.state.enforcer.levels, 0b110);
}

#[test]
fn a_recreated_cgroup_loses_its_old_entry_and_gets_a_new_one() {
    let mut t = setup(64, &["aw/a"], policies(&[("r", "aw/*", "deny")]));
    let old = t.id("aw/a");
    let path = t.root.join("aw/a");
    fs::remove_dir(&path).unwrap();
    // A freed inode number may be reused at once (by this directory, or another test's): the
    // recreation is tried again, the reused one kept aside, until it has a number of its own.
    for spare in 0.. {
        fs::create_dir(&path).unwrap();
        if t.id("aw/a") != old {
            break;
        }
        fs::rename(&path, t.root.join(format!("spare-{spare}"))).unwrap();
    }
    let new = t.id("aw/a");
    assert_ne!(old, new);
    t.state.on_change(Change::Removed(path.clone()));
    t.state.on_change(Change::Created(path.clone()));
    assert!(!t.state.enforcer.agents.contains_key(&old));
    assert_eq!(t.kind("aw/a"), Some(entry::AGENT));
    // Even when the removal is seen after the re-creation.
    fs::remove_dir(&path).unwrap();
    fs::create_dir(&path).unwrap();
    let newer = t.id("aw/a");
    t.state.on_change(Change::Created(path.clone()));
    t.state.on_change(Change::Removed(path.clone()));
    assert!(!t.state.enforcer.agents.contains_key(&new) || new == newer);
    assert_eq!(t.kind("aw/a"), Some(entry::AGENT));
}

#[test]
fn churn_leaves_no_stale_entries() {
    let mut t = setup(8, &["aw"], policies(&[("r", "aw/*", "deny")]));
    for i in 0..50 {
        let p = t.root.join(format!("aw/a{}", i % 3));
        fs::create_dir(&p).unwrap();
        t.state.on_change(Change::Created(p.clone()));
        fs::remove_dir(&p).unwrap();
        t.state.on_change(Change::Removed(p));
    }
    // Only the watch is left.
    assert_eq!(t.state.enforcer.agents.len(), 1);
    assert_eq!(t.state.entries.len(), 1);
}

#[test]
fn the_scan_removes_entries_of_cgroups_that_are_gone() {
    let mut t = setup(64, &["aw/a", "aw/b"], policies(&[("r", "aw/*", "deny")]));
    let a = t.id("aw/a");
    fs::remove_dir(t.root.join("aw/a")).unwrap();
    t.state.rescan();
    assert!(!t.state.enforcer.agents.contains_key(&a));
    assert_eq!(t.kind("aw/b"), Some(entry::AGENT));
}

#[test]
fn a_reload_switches_agents_and_moves_watches() {
    let mut t = setup(64, &["aw/a", "bw/b"], policies(&[("r", "aw/*", "deny")]));
    let first = t.entry("aw/a").policy_id;
    t.state
        .apply(policies(&[("r", "aw/*", "deny"), ("s", "bw/*", "audit")]))
        .unwrap();
    let second = t.entry("aw/a").policy_id;
    assert_ne!(first, second, "re-pointed to the new version");
    assert!(
        !t.state.enforcer.rules.contains_key(&first),
        "old rules removed"
    );
    assert_eq!(t.kind("bw"), Some(entry::WATCH));
    assert_eq!(t.entry("bw").mode, mode::AUDIT);
    assert_eq!(t.kind("bw/b"), Some(entry::AGENT));
    t.state.apply(policies(&[("s", "bw/*", "audit")])).unwrap();
    assert_eq!(t.kind("aw"), None, "an unwatched parent's entry goes");
    assert_eq!(t.kind("aw/a"), None);
}

#[test]
fn the_strictest_pending_mode_wins() {
    let t = setup(
        64,
        &["p"],
        policies(&[("a", "p/a-*", "audit"), ("b", "p/b-*", "deny")]),
    );
    assert_eq!(t.entry("p").mode, mode::ENFORCE);
}

#[test]
fn a_cgroup_two_policies_select_is_denied_everything() {
    let t = setup(
        64,
        &["aw/x"],
        policies(&[("a", "aw/*", "deny"), ("b", "aw/x", "deny")]),
    );
    assert_eq!(t.kind("aw/x"), Some(entry::AGENT));
    assert_eq!(t.entry("aw/x").policy_id, CONFLICT_POLICY_ID);
}

#[test]
fn a_full_map_fails_closed_is_reported_once_and_recovers() {
    // Room for the watch and two agents.
    let mut t = setup(3, &["aw/a", "aw/b"], policies(&[("r", "aw/*", "deny")]));
    for name in ["c", "d"] {
        let p = t.root.join("aw").join(name);
        fs::create_dir(&p).unwrap();
        t.state.on_change(Change::Created(p));
    }
    assert_eq!(t.kind("aw/c"), None, "no room: stays under the watch");
    let n = t.notices.try_recv().expect("a notice");
    assert_eq!(n.kind, "agent-map-full");
    assert_eq!(n.detail["fallback"], "deny");
    assert!(t.notices.try_recv().is_err(), "once per episode");
    let status = t.state.status();
    assert_eq!(status["agent_map"]["capacity"], 3);
    assert_eq!(status["agent_map"]["used"], 3);
    assert_eq!(
        status["agents_unregistered"],
        serde_json::json!(["aw/c", "aw/d"])
    );
    assert_eq!(status["kernel"]["ok"], false);
    // Registering through the API says so.
    let err = t.state.register_path(&t.root.join("aw/c")).unwrap_err();
    assert!(format!("{err:#}").contains("agent map is full"), "{err:#}");
    // Room again: the waiting cgroups are registered.
    let a = t.root.join("aw/a");
    let b = t.root.join("aw/b");
    fs::remove_dir(&a).unwrap();
    fs::remove_dir(&b).unwrap();
    t.state.on_change(Change::Removed(a));
    t.state.on_change(Change::Removed(b));
    assert_eq!(t.kind("aw/c"), Some(entry::AGENT));
    assert_eq!(t.kind("aw/d"), Some(entry::AGENT));
    assert!(!t.state.map_full);
    assert_eq!(t.state.status()["kernel"]["ok"], true);
}

#[test]
fn status_shows_entries_the_controller_did_not_write_and_detached_links() {
    let mut t = setup(64, &["aw/a"], policies(&[("r", "aw/*", "deny")]));
    let stray = AgentEntry {
        kind: entry::AGENT,
        ..t.entry("aw/a")
    };
    t.state.enforcer.agents.insert(424242, stray);
    t.state.enforcer.attached = false;
    let s = t.state.status();
    assert_eq!(s["kernel"]["ok"], false);
    assert_eq!(s["kernel"]["unknown_entries"], serde_json::json!([424242]));
    let problems = s["kernel"]["problems"].to_string();
    assert!(problems.contains("not attached"), "{problems}");
}

#[test]
fn registration_answers_for_selected_cgroups_only() {
    let mut t = setup(64, &["aw/a", "zz"], policies(&[("r", "aw/*", "deny")]));
    let r = t.state.register_path(&t.root.join("aw/a")).unwrap();
    assert_eq!((r.agent.as_str(), r.policy.as_str()), ("a", "r"));
    let err = t.state.register_path(&t.root.join("zz")).unwrap_err();
    assert!(format!("{err}").contains("no policy selects"), "{err}");
}
