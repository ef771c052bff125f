//! Delegation against the real kernel: an agent whose cgroup lies inside another agent's is
//! judged by both. A call leaves only if its own policy (or grant) and the enclosing agent's
//! allow it; records name the chain and which agent decided; a grant to the inner agent never
//! reaches past the outer one; an exempt cgroup inside an agent is still judged by it.

use agentwall::control::{Caller, GrantRequest};
use agentwall_tests::{
    inproc::{connect_errno, Ctl},
    tcp_server, EPERM,
};
use anyhow::Result;

const ADMIN: Caller = Caller::Admin { uid: 0 };

/// The outer agent may reach 127.0.0.1 and 127.0.0.2; its sub-agent 127.0.0.1 and 127.0.0.3,
/// and may be granted anything on 127.0.0.0/8.
const OUTER: &str = r#"
name: outer
agents:
  cgroups: ["{base}/outer"]
egress:
  - name: outer-1
    cidr: 127.0.0.1/32
  - name: outer-2
    cidr: 127.0.0.2/32
"#;
const INNER: &str = r#"
name: inner
agents:
  cgroups: ["{base}/outer/inner"]
egress:
  - name: inner-1
    cidr: 127.0.0.1/32
  - name: inner-3
    cidr: 127.0.0.3/32
grantable:
  - cidr: 127.0.0.0/8
max_grant_ttl: 1h
"#;

async fn start() -> Result<Ctl> {
    Ctl::start(&[OUTER, INNER], &["outer", "outer/inner"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sub_agent_gets_the_intersection_of_its_policy_and_its_parents() -> Result<()> {
    let mut c = start().await?;
    let inner = c.path("outer/inner");
    let outer = c.path("outer");
    let (_l1, both) = tcp_server("127.0.0.1")?;
    let (_l2, outer_only) = tcp_server("127.0.0.2")?;
    let (_l3, inner_only) = tcp_server("127.0.0.3")?;

    // Both allow it: it leaves, allowed by the inner agent's own rule.
    assert_eq!(connect_errno(&inner, both)?, 0);
    let d = c.decision_to(both).await?;
    assert_eq!((d.decision.as_str(), d.reason.as_str()), ("allow", "rule"));
    assert_eq!(d.agent.as_deref(), Some("inner"));
    assert_eq!(d.rule_name.as_deref(), Some("inner-1"));
    assert_eq!(d.chain, vec!["outer".to_string()]);
    assert_eq!(d.decided_by, None);

    // Only the parent allows it: the sub-agent's own policy denies.
    assert_eq!(connect_errno(&inner, outer_only)?, EPERM);
    let d = c.decision_to(outer_only).await?;
    assert_eq!(d.decision, "deny");
    assert_eq!(d.decided_by, None, "the inner agent's own verdict");

    // Only the sub-agent allows it: the parent denies, and the record says so.
    assert_eq!(connect_errno(&inner, inner_only)?, EPERM);
    let d = c.decision_to(inner_only).await?;
    assert_eq!(d.decision, "deny");
    assert_eq!(d.reason, "default-deny:no-address-match");
    assert_eq!(d.decided_by.as_deref(), Some("outer"));
    assert_eq!(d.decided_by_policy.as_deref(), Some("outer"));
    assert_eq!(d.agent.as_deref(), Some("inner"));

    // The parent itself is judged by its own policy only.
    assert_eq!(connect_errno(&outer, outer_only)?, 0);
    assert_eq!(connect_errno(&outer, inner_only)?, EPERM);
    let d = c.decision_to(outer_only).await?;
    assert!(d.chain.is_empty());
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sub_agents_grant_never_reaches_past_its_parent() -> Result<()> {
    let mut c = start().await?;
    let inner = c.path("outer/inner");
    let (_l2, outer_only) = tcp_server("127.0.0.2")?;
    let (_l4, neither) = tcp_server("127.0.0.4")?;
    let grant = |to: std::net::SocketAddr| GrantRequest {
        agent: "inner".into(),
        to: to.ip().to_string(),
        ports: Some(to.port().to_string()),
        protocol: Some("tcp".into()),
        ttl_secs: 60,
        task: None,
        reason: "delegation test".into(),
    };
    // Granted where the parent's policy reaches: it works.
    c.h().grant(grant(outer_only), ADMIN).await?;
    assert_eq!(connect_errno(&inner, outer_only)?, 0);
    let d = c.decision_to(outer_only).await?;
    assert_eq!((d.decision.as_str(), d.reason.as_str()), ("allow", "grant"));
    // Granted where the parent's does not: the grant is in, the parent still denies.
    c.h().grant(grant(neither), ADMIN).await?;
    assert_eq!(connect_errno(&inner, neither)?, EPERM);
    let d = c.decision_to(neither).await?;
    assert_eq!(d.decided_by.as_deref(), Some("outer"));
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_inside_an_agent_cannot_step_out_of_it() -> Result<()> {
    let mut c = start().await?;
    // A plain child cgroup of the sub-agent (no entry of its own) and a deeper one: both are
    // judged as the sub-agent, with the parent above it.
    let deep = c.cgroups.make("outer/inner/tools/sandbox")?;
    let (_l3, inner_only) = tcp_server("127.0.0.3")?;
    let (_l1, both) = tcp_server("127.0.0.1")?;
    assert_eq!(connect_errno(&deep, both)?, 0);
    assert_eq!(connect_errno(&deep, inner_only)?, EPERM);
    let d = c.decision_to(inner_only).await?;
    assert_eq!(d.decided_by.as_deref(), Some("outer"));
    c.stop().await
}
