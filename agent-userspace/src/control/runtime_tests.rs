//! Tasks, grants, revocation and expiry against the in-memory datapath.

use agent_common::proto;

use super::{
    tests::{one_policy, setup as setup_tree, T},
    *,
};
use crate::datapath::GrantPrefix;

const POLICY: &str = "name: r\nagents:\n  cgroups: [\"aw/*\"]\negress:\n  - cidr: 127.0.0.1/32\n\
    grantable:\n  - cidr: 127.0.0.0/8\n    ports: 1000-2000\n    protocol: tcp\n\
    max_grant_ttl: 1m\n";

#[test]
fn an_agents_own_request_is_granted_at_once_only_under_approve_auto() {
    let mut t = setup_with(&format!("{POLICY}approve: auto\n"));
    t.kinds();
    let me = Caller::Agent {
        cgroup_id: t.id("aw/a"),
        pid: 1,
    };
    // Inside `grantable`: granted at once, recorded as the agent's.
    let g = t
        .state
        .grant(req("127.0.0.1", "1500", 30), me.clone())
        .unwrap();
    assert_eq!(g.by, me);
    // Outside it: refused like an admin's grant would be.
    assert!(matches!(
        t.state.grant(req("10.0.0.1", "1500", 30), me.clone()),
        Err(ControlError::Refused(m)) if m.contains("grantable")
    ));
    // For another agent: never.
    let other = Caller::Agent {
        cgroup_id: t.id("aw/a") + 1,
        pid: 1,
    };
    assert!(matches!(
        t.state.grant(req("127.0.0.1", "1500", 30), other),
        Err(ControlError::Refused(m)) if m.contains("for itself only")
    ));
    // And an agent never revokes.
    assert!(t.state.revoke(g.id, me).is_err());
}

fn setup() -> T {
    setup_with(POLICY)
}

fn setup_with(policy: &str) -> T {
    setup_tree(64, &["aw/a"], one_policy(policy))
}

const ADMIN: Caller = Caller::Admin { uid: 0 };

fn req(to: &str, ports: &str, ttl: u64) -> GrantRequest {
    GrantRequest {
        agent: "a".into(),
        to: to.into(),
        ports: Some(ports.into()),
        protocol: Some("tcp".into()),
        ttl_secs: ttl,
        task: None,
        reason: "test".into(),
    }
}

#[test]
fn a_grant_is_written_listed_and_revoked() {
    let mut t = setup();
    t.kinds();
    let g = t.state.grant(req("127.0.0.5", "1500", 30), ADMIN).unwrap();
    let g2 = t
        .state
        .grant(req("127.0.0.0/24", "1000-1100", 30), ADMIN)
        .unwrap();
    assert!(g2.id > g.id, "ids increase");
    let id = t.id("aw/a");
    let narrow = t.state.enforcer.grants[&(id, GrantPrefix::V4(32, [127, 0, 0, 5]))];
    // The /32 carries the covering /24's grant too.
    assert_eq!(narrow.count, 2);
    assert_eq!(narrow.grants[0].protocols, proto::TCP);
    assert_eq!(t.state.grants().len(), 2);
    let r = t.state.revoke(g.id, ADMIN).unwrap();
    assert_eq!(r.sockets_destroyed, 0);
    assert!(!t
        .state
        .enforcer
        .grants
        .contains_key(&(id, GrantPrefix::V4(32, [127, 0, 0, 5]))));
    assert_eq!(t.state.enforcer.grants.len(), 1);
    assert_eq!(t.kinds(), ["granted", "granted", "revoked"]);
    assert!(matches!(
        t.state.revoke(g.id, ADMIN),
        Err(ControlError::NotFound(_))
    ));
}

#[test]
fn grants_outside_the_scope_are_refused_and_change_nothing() {
    let mut t = setup();
    t.kinds();
    let refused = |r: Result<GrantInfo, ControlError>, want: &str| match r {
        Err(ControlError::Refused(m)) => assert!(m.contains(want), "{m}"),
        other => panic!("{other:?}"),
    };
    refused(
        t.state.grant(req("10.0.0.1", "1500", 30), ADMIN),
        "grantable",
    );
    refused(
        t.state.grant(req("127.0.0.1", "80", 30), ADMIN),
        "grantable",
    );
    refused(
        t.state.grant(req("127.0.0.1", "1500", 61), ADMIN),
        "max_grant_ttl",
    );
    refused(
        t.state.grant(
            req("127.0.0.1", "1500", 30),
            Caller::Agent {
                cgroup_id: t.id("aw/a"),
                pid: 1,
            },
        ),
        "approve: manual",
    );
    assert!(matches!(
        t.state.grant(req("127.0.0.1/8", "1500", 30), ADMIN),
        Err(ControlError::Invalid { ref field, .. }) if field == "to"
    ));
    assert!(matches!(
        t.state.grant(req("127.0.0.1", "99999", 30), ADMIN),
        Err(ControlError::Invalid { ref field, .. }) if field == "ports"
    ));
    assert!(t.state.enforcer.grants.is_empty());
    assert!(t.state.grants().is_empty());
    assert!(t.kinds().is_empty());
}

#[test]
fn a_task_is_stamped_kept_across_reregistration_and_ends_with_its_grants() {
    let mut t = setup();
    t.kinds();
    let id = t.id("aw/a");
    let task = t
        .state
        .task_start(
            TaskStart {
                agent: "a".into(),
                id: "T-1".into(),
                intent: "fix the build".into(),
                ttl_secs: None,
            },
            ADMIN,
        )
        .unwrap();
    assert_ne!(task.slot, 0);
    assert_eq!(t.state.enforcer.agents[&id].task_slot, task.slot);
    assert_eq!(
        t.state.names.read().unwrap().tasks[&task.slot].intent,
        "fix the build"
    );
    // Re-registration (a rescan, the entry removed and written again) keeps the stamp.
    t.state.forget(id);
    t.state.rescan();
    assert_eq!(t.state.enforcer.agents[&id].task_slot, task.slot);
    let mut r = req("127.0.0.9", "1500", 30);
    r.task = Some("T-1".into());
    let g = t.state.grant(r, ADMIN).unwrap();
    let ended = t.state.task_end("a", ADMIN).unwrap();
    assert_eq!(ended.grants_revoked, [g.id]);
    assert_eq!(t.state.enforcer.agents[&id].task_slot, 0);
    assert!(t.state.enforcer.grants.is_empty());
    assert_eq!(
        t.kinds(),
        ["task-started", "granted", "revoked", "task-ended"]
    );
    // An agent speaks only for itself.
    let other = Caller::Agent {
        cgroup_id: id + 1,
        pid: 1,
    };
    assert!(matches!(
        t.state.task_end("a", other),
        Err(ControlError::Refused(_))
    ));
}

#[test]
fn expired_grants_leave_the_tries_and_are_recorded() {
    let mut t = setup();
    let g = t.state.grant(req("127.0.0.5", "1500", 30), ADMIN).unwrap();
    t.kinds();
    t.state
        .runtime
        .rt
        .grants
        .get_mut(&g.id)
        .unwrap()
        .deadline_ns = 1;
    t.state.expire();
    assert!(t.state.enforcer.grants.is_empty());
    assert!(t.state.grants().is_empty());
    assert_eq!(t.kinds(), ["grant-expired"]);
}
