//! `explain` against the real kernel: for an agent with a policy and a grant, what explain says
//! (read from the live maps, nothing connected) is what a real connect from the agent gets:
//! EPERM exactly when explain says blocked, for a destination allowed by a rule, by a grant,
//! denied with no address, denied with no port, and v4-mapped IPv6 ones.

use std::{net::SocketAddr, path::Path};

use agentwall::{
    control::{
        explain::{dry_run, parse_protocol, ExplainRequest, Explanation},
        Caller, GrantRequest,
    },
    daemon::{self, Options, PolicySource},
    policy::{self, PolicySet},
};
use agentwall_tests::{probe_in, tcp_server, TestCgroups, EPERM};
use anyhow::{ensure, Context, Result};

const POLICY: &str = r#"
name: explain-test
agents:
  cgroups: ["{agent}"]
egress:
  - name: local-web
    cidr: 127.0.0.1/32
    ports: "{port}"
    protocol: tcp
grantable:
  - cidr: 127.0.0.0/8
    protocol: tcp
max_grant_ttl: 1h
"#;

/// The errno a connect (tcp) or a send (udp) from inside the agent gets (0: none).
fn errno(agent: &Path, to: SocketAddr, protocol: &str) -> Result<i32> {
    let out = probe_in(agent, &[format!("{protocol}:{to}")])?;
    Ok(if out[0].ok { 0 } else { out[0].errno })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_matches_what_a_real_connect_gets() -> Result<()> {
    let cgroups = TestCgroups::new()?;
    let agent = cgroups.make("agent")?;
    let (_web, web) = tcp_server("127.0.0.1")?;
    let (_granted, granted) = tcp_server("127.0.0.2")?;
    let yaml = POLICY
        .replace("{agent}", &cgroups.rel("agent"))
        .replace("{port}", &web.port().to_string());
    let set = PolicySet {
        policies: vec![policy::parse_policy(Path::new("explain.yaml"), &yaml)?],
    };
    let mut opts = Options::new(PolicySource::Fixed(set.clone()));
    opts.control_socket = None;
    let h = daemon::start(opts).await?;
    h.register(&agent).await?;
    let g = h
        .grant(
            GrantRequest {
                agent: "agent".into(),
                to: granted.ip().to_string(),
                ports: Some(granted.port().to_string()),
                protocol: Some("tcp".into()),
                ttl_secs: 600,
                task: None,
                reason: "explain test".into(),
            },
            Caller::Admin { uid: 0 },
        )
        .await
        .context("granting")?;

    let other_port = if web.port() == u16::MAX {
        1
    } else {
        web.port() + 1
    };
    let mapped = |a: SocketAddr| -> SocketAddr {
        let SocketAddr::V4(v4) = a else {
            unreachable!()
        };
        format!("[::ffff:{}]:{}", v4.ip(), v4.port())
            .parse()
            .unwrap()
    };
    let cases: Vec<(SocketAddr, &str, &str)> = vec![
        (web, "tcp", "rule"),
        (granted, "tcp", "grant"),
        (
            SocketAddr::new("127.0.0.3".parse()?, web.port()),
            "tcp",
            "default-deny:no-address-match",
        ),
        (
            SocketAddr::new(web.ip(), other_port),
            "tcp",
            "default-deny:no-port-match",
        ),
        (web, "udp", "default-deny:no-port-match"),
        (mapped(web), "tcp", "rule"),
        (mapped(granted), "tcp", "grant"),
        (
            mapped(SocketAddr::new("127.0.0.3".parse()?, web.port())),
            "tcp",
            "default-deny:no-address-match",
        ),
    ];
    for (to, proto, reason) in cases {
        let e: Explanation = h
            .explain(ExplainRequest {
                agent: "agent".into(),
                to,
                protocol: parse_protocol(Some(proto)).map_err(anyhow::Error::msg)?,
            })
            .await
            .with_context(|| format!("explaining {to}/{proto}"))?;
        ensure!(
            e.reason == reason,
            "{to}/{proto}: explain says {e:?}, expected {reason}"
        );
        ensure!(
            e.source == "kernel" && e.mode == "enforce",
            "{to}/{proto}: {e:?}"
        );
        let got = errno(&agent, to, proto)?;
        let blocked = got == EPERM;
        ensure!(
            blocked == (e.action == "blocked"),
            "{to}/{proto}: explain says {} ({}), the kernel gave errno {got}",
            e.action,
            e.reason
        );
        match reason {
            "rule" => ensure!(
                e.rule_id == Some(0) && e.rule_name.as_deref() == Some("local-web"),
                "{to}: the rule is named: {e:?}"
            ),
            "grant" => ensure!(
                e.grant.as_ref().map(|x| (x.id, x.expires.as_str()))
                    == Some((g.id, g.expires.as_str())),
                "{to}: the grant is named with its expiry: {e:?}"
            ),
            _ => {}
        }
        // The dry run over the same policy agrees wherever no grant is involved.
        let dry = dry_run(
            &set,
            &cgroups.rel("agent"),
            to,
            parse_protocol(Some(proto)).unwrap(),
        )
        .map_err(anyhow::Error::msg)?;
        if reason != "grant" {
            ensure!(
                (dry.reason.as_str(), dry.action.as_str()) == (reason, e.action.as_str()),
                "{to}/{proto}: dry run says {dry:?}"
            );
        } else {
            ensure!(dry.action == "blocked", "{to}: without the grant: {dry:?}");
        }
    }
    h.shutdown().await?;
    Ok(())
}
