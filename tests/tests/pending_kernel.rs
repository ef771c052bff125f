//! The kernel side of the pending-identity fallback, driven through `datapath::Enforcer` alone
//! (no controller): the deepest agent-map entry above the calling task decides. A task strictly
//! below a WATCH entry is pending (denied, or recorded in audit mode, with reason
//! pending-identity); a task in the watched cgroup itself, or below an EXEMPT entry, is not an
//! agent; an AGENT entry below the watch is judged by its policy.

use std::path::{Path, PathBuf};

use agent_common::{entry, mode, AgentEntry, MAX_AGENT_CHAIN};
use agentwall::{
    datapath::{Enforcer, LoadOptions},
    events::Decision,
    identity::cgroup,
    policy,
};
use agentwall_tests::{probe_in, sa, tcp_server, TestCgroups, EPERM};
use anyhow::{ensure, Context, Result};

/// An Enforcer attached to a fresh test cgroup subtree, with its event ring.
struct Setup {
    cgroups: TestCgroups,
    enforcer: Enforcer,
    /// The next record in the event ring, if any.
    next: Box<dyn FnMut() -> Option<Vec<u8>>>,
    levels: u32,
}

impl Setup {
    fn new() -> Result<Self> {
        let cgroups = TestCgroups::new()?;
        let mut enforcer = Enforcer::load(&LoadOptions {
            ring_bytes: Some(1 << 20),
            ..Default::default()
        })
        .context("loading the programs")?;
        enforcer.attach(&cgroups.root.join(&cgroups.base), &[])?;
        let mut ring = enforcer.take_events().context("the event ring")?;
        Ok(Self {
            cgroups,
            enforcer,
            next: Box::new(move || ring.next().map(|item| item.to_vec())),
            levels: 0,
        })
    }

    /// Creates `<base>/<rel>` and puts `e` in the agent map for it; returns (path, cgroup id).
    fn entry(&mut self, rel: &str, e: AgentEntry) -> Result<(PathBuf, u64)> {
        let path = self.cgroups.make(rel)?;
        let id = cgroup::cgroup_id(&path)?;
        self.enforcer.set_agent(id, e)?;
        self.levels |= 1 << level(&self.cgroups.root, &path);
        self.enforcer.set_agent_levels(self.levels)?;
        Ok((path, id))
    }

    /// Every decision in the ring, which must satisfy `expect`. The probe has exited: a program
    /// submits its record before the call returns, so all of them are in the ring already.
    fn decisions_matching(
        &mut self,
        expect: impl Fn(&[Decision]) -> bool,
    ) -> Result<Vec<Decision>> {
        let mut out = Vec::new();
        while let Some(item) = (self.next)() {
            out.push(Decision::from_record(&item).context("an undecodable record")?);
        }
        ensure!(
            expect(&out),
            "the expected records are not in the ring: {out:#?}"
        );
        Ok(out)
    }
}

/// Level of a cgroup below the cgroup2 root (the root is level 0).
fn level(root: &Path, path: &Path) -> u32 {
    path.strip_prefix(root)
        .map(|p| p.components().count() as u32)
        .unwrap_or(0)
}

fn kind(kind: u32, mode: u32, policy_id: u32) -> AgentEntry {
    AgentEntry {
        policy_id,
        mode,
        policy_version: 1,
        sockets: 0,
        deadman_secs: 0,
        deadman_mode: 0,
        kind,
        task_slot: 0,
        task_deadline_ns: 0,
        rate_interval_ns: 0,
        rate_burst_ns: 0,
        enclosing: [0; MAX_AGENT_CHAIN - 1],
        flags: 0,
        _reserved: 0,
    }
}

#[test]
fn a_task_below_a_watched_parent_is_pending_and_denied() -> Result<()> {
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let mut s = Setup::new()?;
    let (watched, watch_id) = s.entry("w", kind(entry::WATCH, mode::ENFORCE, 0))?;
    let new = s.cgroups.make("w/new")?;
    let new_id = cgroup::cgroup_id(&new)?;
    let before = s.enforcer.counters()?;

    // Below the watch, unregistered: every hook denies.
    let mut steps = vec![
        format!("tcp:{}", sa(addr)),
        format!("udp:{}", sa(addr)),
        format!("tcp:[::1]:{}", addr.port()),
        // SOCK_RAW (UDP): refused at creation, the probe being root with CAP_NET_RAW.
        "sock:2,3,17".to_string(),
    ];
    if s.enforcer.unix_hooks() {
        steps.push("unix:@agentwall-pending-test".to_string());
    }
    let out = probe_in(&new, &steps)?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(errnos, vec![EPERM; steps.len()], "{out:#?}");
    let d = s.decisions_matching(|d| d.len() >= steps.len())?;
    assert_eq!(d.len(), steps.len(), "one record per decision: {d:#?}");
    for r in &d {
        assert_eq!(
            (r.reason, r.decision, r.mode, r.action),
            ("pending-identity", "deny", "enforce", "blocked"),
            "{r:#?}"
        );
        assert_eq!((r.agent_cgroup_id, r.cgroup_id), (watch_id, new_id));
    }
    let hooks: Vec<&str> = d.iter().map(|r| r.hook).collect();
    assert_eq!(
        &hooks[..4],
        ["connect4", "sendmsg4", "connect6", "sock_create"]
    );
    let after = s.enforcer.counters()?;
    assert_eq!(after.denied - before.denied, steps.len() as u64);

    // The watched cgroup itself is not an agent: allowed, no record. The connect that follows
    // below the watch is the only record.
    let out = probe_in(&watched, &[format!("tcp:{}", sa(addr))])?;
    assert_eq!(out[0].errno, 0, "{out:#?}");
    let out = probe_in(&new, &[format!("tcp:{}", sa(addr))])?;
    assert_eq!(out[0].errno, EPERM);
    let d = s.decisions_matching(|d| !d.is_empty())?;
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!((d[0].cgroup_id, d[0].reason), (new_id, "pending-identity"));
    Ok(())
}

#[test]
fn exempt_and_agent_entries_below_a_watch_decide() -> Result<()> {
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let mut s = Setup::new()?;
    let (_, watch_id) = s.entry("w", kind(entry::WATCH, mode::ENFORCE, 0))?;
    let (exempt, _) = s.entry("w/exempt", kind(entry::EXEMPT, mode::ENFORCE, 0))?;
    // A cgroup below the exempt one is exempt too: the deepest entry decides.
    let exempt_child = s.cgroups.make("w/exempt/child")?;

    let yaml = format!(
        "name: t\nagents:\n  cgroups:\n    - \"x\"\negress:\n  - name: web\n    cidr: \
         \"127.0.0.1/32\"\n    ports: [{}]\n    protocol: tcp\n",
        addr.port()
    );
    let p = policy::parse_policy(Path::new("t.yaml"), &yaml)?;
    let compiled = policy::compile(&p)?;
    s.enforcer.install_rules(7, &compiled)?;
    let (agent, agent_id) = s.entry("w/agent", kind(entry::AGENT, mode::ENFORCE, 7))?;
    ensure!(agent_id != watch_id);

    for cg in [&exempt, &exempt_child] {
        let out = probe_in(cg, &[format!("tcp:{}", sa(addr)), "sock:2,3,17".into()])?;
        assert_eq!(
            out.iter().map(|o| o.errno).collect::<Vec<_>>(),
            [0, 0],
            "{out:#?}"
        );
    }
    // The agent's policy: its rule allows, anything else is default-deny. These are the only
    // records (the exempt probes made none).
    let out = probe_in(
        &agent,
        &[
            format!("tcp:{}", sa(addr)),
            format!("tcp:127.0.0.2:{}", addr.port()),
        ],
    )?;
    assert_eq!(
        out.iter().map(|o| o.errno).collect::<Vec<_>>(),
        [0, EPERM],
        "{out:#?}"
    );
    let d = s.decisions_matching(|d| d.len() >= 2)?;
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!((d[0].reason, d[0].rule_id), ("rule", Some(0)));
    assert_eq!(d[1].reason, "default-deny:no-address-match");
    assert!(d
        .iter()
        .all(|r| r.agent_cgroup_id == agent_id && r.policy_id == 7));
    // Removing an agent that never had a rate limiter (no AW_RATE key) is no error.
    s.enforcer.remove_agent(agent_id)?;
    assert!(!s
        .enforcer
        .agent_entries()
        .iter()
        .any(|(id, _)| *id == agent_id));
    Ok(())
}

#[test]
fn an_audit_watch_lets_a_pending_task_through_and_records_it() -> Result<()> {
    let (_srv, addr) = tcp_server("127.0.0.1")?;
    let mut s = Setup::new()?;
    let (_, watch_id) = s.entry("w", kind(entry::WATCH, mode::AUDIT, 0))?;
    let new = s.cgroups.make("w/new")?;
    let out = probe_in(&new, &[format!("tcp:{}", sa(addr))])?;
    assert_eq!(out[0].errno, 0, "{out:#?}");
    let d = s.decisions_matching(|d| !d.is_empty())?;
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(
        (d[0].reason, d[0].decision, d[0].mode, d[0].action),
        ("pending-identity", "deny", "audit", "allowed")
    );
    assert_eq!(d[0].agent_cgroup_id, watch_id);
    Ok(())
}
