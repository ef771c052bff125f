//! The per-agent grant cap against a real daemon (`agentwall run`, default cap): one agent
//! fills its share of the shared grant tries through the admin API, its next grant is refused
//! (403, naming the cap) and writes nothing to the kernel, while another agent still gets a grant
//! that the kernel honours; a revoke makes room again.

use std::net::Ipv4Addr;

use agentwall::{
    api::client::{self, ClientError, Method},
    control::grants::DEFAULT_MAX_GRANTS_PER_AGENT,
};
use agentwall_tests::{inproc::connect_errno, tcp_server, Daemon, TestCgroups, EPERM};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// Agents `a` and `b`, nothing allowed by a rule but one unused port; anything on 127.0.0.0/8
/// over TCP may be granted.
fn policy(a: &str, b: &str) -> String {
    format!(
        "name: limits\nagents:\n  cgroups:\n    - {a}\n    - {b}\negress:\n  - cidr: 127.0.0.1/32\n    \
         ports: [9]\n    protocol: tcp\ngrantable:\n  - cidr: 127.0.0.0/8\n    protocol: tcp\n\
         max_grant_ttl: 1h\n"
    )
}

fn call(d: &Daemon, method: Method, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
    client::call(&d.socket, method, path, body)
}

fn grant(d: &Daemon, agent: &str, to: &str) -> Result<Value, ClientError> {
    let body = json!({ "agent": agent, "to": to, "protocol": "tcp", "ttl_secs": 600,
        "reason": "grant-limits test" });
    call(d, Method::POST, "/v1/grants", Some(body))
}

#[test]
fn one_agent_cannot_fill_the_grant_tries() -> Result<()> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare("grant-limits")?;
    d.write_policy("limits.yaml", &policy(&cg.rel("a"), &cg.rel("b")))?;
    d.start()?;
    for name in ["a", "b"] {
        let path = cg.make(name)?;
        let reg = call(
            &d,
            Method::POST,
            "/v1/agents",
            Some(json!({ "cgroup": path })),
        )
        .with_context(|| format!("registering {name}"))?;
        ensure!(reg["agent"] == name, "{reg}");
    }

    // Agent a takes every grant it may hold: /32s from 127.1.0.1 up.
    let cap = DEFAULT_MAX_GRANTS_PER_AGENT;
    let nth = |i: usize| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + i as u32);
    let mut ids = Vec::new();
    for i in 0..cap {
        let g = grant(&d, "a", &format!("{}/32", nth(i)))
            .with_context(|| format!("grant {} of {cap} to agent a", i + 1))?;
        ids.push(g["id"].as_u64().context("a grant id")?);
    }

    // One more is refused, naming the cap, and the kernel does not allow it.
    let (_over_l, over) = tcp_server(&nth(cap).to_string())?;
    match grant(&d, "a", &format!("{}/32", over.ip())) {
        Err(ClientError::Api { status, error }) => {
            ensure!(status == 403, "over the cap: {status} {error}");
            ensure!(
                error.message.contains("--max-grants-per-agent")
                    && error.message.contains(&cap.to_string()),
                "the refusal names the cap: {}",
                error.message
            );
        }
        other => bail!("grant {} of agent a was not refused: {other:?}", cap + 1),
    }
    ensure!(
        connect_errno(&cg.path("a"), over)? == EPERM,
        "the refused grant's destination must stay denied"
    );
    let live = call(&d, Method::GET, "/v1/grants", None)?;
    let of_a = live
        .as_array()
        .context("grants list")?
        .iter()
        .filter(|g| g["agent"] == "a")
        .count();
    ensure!(of_a == cap, "agent a holds {of_a} live grants, not {cap}");

    // Agent b is not starved: its grant is made and the kernel honours it.
    let (_b_l, b_to) = tcp_server("127.2.0.1")?;
    ensure!(
        connect_errno(&cg.path("b"), b_to)? == EPERM,
        "agent b is denied before its grant"
    );
    grant(&d, "b", &format!("{}/32", b_to.ip())).context("agent b's grant")?;
    ensure!(
        connect_errno(&cg.path("b"), b_to)? == 0,
        "agent b's grant allows its connect"
    );

    // A revoke makes room for agent a again.
    call(&d, Method::DELETE, &format!("/v1/grants/{}", ids[0]), None).context("revoke")?;
    grant(&d, "a", &format!("{}/32", over.ip())).context("agent a after a revoke")?;
    ensure!(
        connect_errno(&cg.path("a"), over)? == 0,
        "agent a's new grant allows its connect"
    );
    Ok(())
}
