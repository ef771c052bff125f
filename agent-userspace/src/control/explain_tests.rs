//! `explain` over the in-memory datapath: the reasons, the grant, the task, mapped addresses,
//! the dead-man state, and the dry run over a policy not yet applied.

use super::{
    explain::*,
    tests::{one_policy, setup as setup_tree, T},
    *,
};

const POLICY: &str = "name: r\nagents:\n  cgroups: [\"aw/*\"]\negress:\n  - name: web\n    \
    cidr: 127.0.0.0/8\n    ports: 80\n    protocol: tcp\n  - cidr: 127.0.0.9/32\n    ports: 53\n    \
    protocol: udp\ngrantable:\n  - cidr: 127.0.0.0/8\nmax_grant_ttl: 1m\n";

fn setup(policy: &str) -> T {
    setup_tree(64, &["aw/a"], one_policy(policy))
}

fn ask(t: &T, to: &str, protocol: &str) -> Explanation {
    t.state
        .explain(ExplainRequest {
            agent: "a".into(),
            to: to.parse().unwrap(),
            protocol: parse_protocol(Some(protocol)).unwrap(),
        })
        .unwrap()
}

#[test]
fn a_rule_names_itself_and_a_miss_says_which_default_deny() {
    let t = setup(POLICY);
    let e = ask(&t, "127.0.0.1:80", "tcp");
    assert_eq!((e.decision.as_str(), e.reason.as_str()), ("allow", "rule"));
    assert_eq!((e.rule_id, e.rule_name.as_deref()), (Some(0), Some("web")));
    assert_eq!(
        (e.action.as_str(), e.source.as_str()),
        ("allowed", "kernel")
    );
    assert_eq!(e.policy, "r");
    // The longest prefix decides: 127.0.0.9/32 carries both rules.
    let e = ask(&t, "127.0.0.9:53", "udp");
    assert_eq!((e.reason.as_str(), e.rule_id), ("rule", Some(1)));
    let e = ask(&t, "127.0.0.1:81", "tcp");
    assert_eq!(e.reason, "default-deny:no-port-match");
    assert_eq!((e.action.as_str(), e.rule_id), ("blocked", None));
    assert_eq!(
        ask(&t, "127.0.0.1:80", "udp").reason,
        "default-deny:no-port-match"
    );
    assert_eq!(
        ask(&t, "10.1.2.3:80", "tcp").reason,
        "default-deny:no-address-match"
    );
    assert_eq!(
        ask(&t, "[::1]:80", "tcp").reason,
        "default-deny:no-address-match"
    );
}

#[test]
fn a_mapped_address_is_judged_by_the_ipv4_rules() {
    let t = setup(POLICY);
    let e = ask(&t, "[::ffff:127.0.0.1]:80", "tcp");
    assert_eq!(
        (e.judged_as.as_str(), e.reason.as_str()),
        ("127.0.0.1", "rule")
    );
}

#[test]
fn a_live_grant_allows_and_is_named_with_its_expiry() {
    let mut t = setup(POLICY);
    let g = t
        .state
        .grant(
            GrantRequest {
                agent: "a".into(),
                to: "127.0.0.5".into(),
                ports: Some("443".into()),
                protocol: Some("tcp".into()),
                ttl_secs: 30,
                task: None,
                reason: "docs".into(),
            },
            Caller::Admin { uid: 0 },
        )
        .unwrap();
    let e = ask(&t, "127.0.0.5:443", "tcp");
    assert_eq!((e.reason.as_str(), e.action.as_str()), ("grant", "allowed"));
    let got = e.grant.expect("the grant is named");
    assert_eq!((got.id, got.expires), (g.id, g.expires));
    // Not for another port, nor another address of the same /8.
    assert_eq!(
        ask(&t, "127.0.0.5:444", "tcp").reason,
        "default-deny:no-port-match"
    );
    assert!(ask(&t, "127.0.0.6:443", "tcp").grant.is_none());
    // A passed deadline: the kernel's check says no, so does explain.
    for s in t.state.enforcer.grants.values_mut() {
        s.grants[0].deadline_ns = 1;
    }
    assert_eq!(
        ask(&t, "127.0.0.5:443", "tcp").reason,
        "default-deny:no-port-match"
    );
}

#[test]
fn the_task_audit_mode_and_deadman_are_reported() {
    let mut t = setup(&format!(
        "{POLICY}mode: audit\ndeadman:\n  after_seconds: 5\n  fallback: deny-all\n"
    ));
    t.state
        .task_start(
            TaskStart {
                agent: "a".into(),
                id: "t1".into(),
                intent: "read docs".into(),
                ttl_secs: None,
            },
            Caller::Admin { uid: 0 },
        )
        .unwrap();
    let e = ask(&t, "10.0.0.1:80", "tcp");
    assert_eq!(e.task.map(|t| t.id).as_deref(), Some("t1"));
    assert_eq!((e.mode.as_str(), e.deadman.as_str()), ("audit", "armed"));
    // Audit mode lets the denial through.
    assert_eq!(
        (e.decision.as_str(), e.action.as_str()),
        ("deny", "allowed")
    );
    // A controller silent longer than the dead-man time: its fallback decides.
    t.state.enforcer.heartbeat_ns = 1;
    let e = ask(&t, "127.0.0.1:80", "tcp");
    assert_eq!(
        (e.deadman.as_str(), e.reason.as_str()),
        ("fallen-back", "deadman:deny-all")
    );
    assert_eq!(e.action, "blocked");
}

#[test]
fn an_unknown_agent_is_not_found() {
    let t = setup(POLICY);
    let r = t.state.explain(ExplainRequest {
        agent: "nobody".into(),
        to: "127.0.0.1:80".parse().unwrap(),
        protocol: 6,
    });
    assert!(matches!(r, Err(ControlError::NotFound(_))));
}

#[test]
fn a_dry_run_judges_the_compiled_policy_the_same_way() {
    let t = setup(POLICY);
    let s = one_policy(POLICY);
    for (to, proto) in [
        ("127.0.0.1:80", "tcp"),
        ("127.0.0.9:53", "udp"),
        ("127.0.0.1:81", "tcp"),
        ("10.0.0.1:80", "tcp"),
        ("[::ffff:127.0.0.1]:80", "tcp"),
    ] {
        let live = ask(&t, to, proto);
        let dry = dry_run(
            &s,
            "aw/a",
            to.parse().unwrap(),
            parse_protocol(Some(proto)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (dry.reason, dry.rule_id, dry.action, dry.source.as_str()),
            (live.reason, live.rule_id, live.action, "policy"),
            "{to}/{proto}"
        );
    }
    assert!(dry_run(&s, "other/x", "127.0.0.1:80".parse().unwrap(), 6).is_err());
}

#[test]
fn longest_prefix_wins_and_families_do_not_mix() {
    let v4 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let entries = [
        (8u8, v4("10.0.0.0"), 'a'),
        (24, v4("10.1.2.0"), 'b'),
        (0, v4("0.0.0.0"), 'c'),
    ];
    assert_eq!(longest(entries, v4("10.1.2.3")), Some('b'));
    assert_eq!(longest(entries, v4("10.9.9.9")), Some('a'));
    assert_eq!(longest(entries, v4("11.0.0.1")), Some('c'));
    assert_eq!(longest(entries, v4("::1")), None);
}

#[test]
fn a_bad_explain_body_names_the_field() {
    use crate::api::wire::ExplainBody;
    let body = |agent: &str, to: &str, protocol: Option<&str>| ExplainBody {
        agent: agent.into(),
        to: to.into(),
        protocol: protocol.map(Into::into),
    };
    let field = |b: ExplainBody| b.request().unwrap_err().field;
    assert_eq!(
        field(body("", "127.0.0.1:80", None)).as_deref(),
        Some("agent")
    );
    assert_eq!(field(body("a", "127.0.0.1", None)).as_deref(), Some("to"));
    assert_eq!(field(body("a", "[::1]:x", None)).as_deref(), Some("to"));
    assert_eq!(
        field(body("a", "127.0.0.1:80", Some("icmp"))).as_deref(),
        Some("protocol")
    );
    let ok = body("a", "[::ffff:127.0.0.1]:80", Some("udp"))
        .request()
        .unwrap();
    assert_eq!((ok.to.port(), ok.protocol), (80, 17));
}
