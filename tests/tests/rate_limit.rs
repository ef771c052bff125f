//! Rate limits in the kernel: an agent's connections and unconnected sends together are
//! limited by a token bucket from its policy; over the limit is denied with reason
//! `rate-limit` (recorded only, in audit mode). Checked with real sends and real errno.

use agentwall_tests::{inproc::Ctl, probe_in, sa, tcp_server, udp_server, EPERM};
use anyhow::{ensure, Result};

/// One call a second on average, five at once: a burst of sends gets exactly five through.
const LIMITED: &str = r#"
name: limited
mode: {mode}
agents:
  cgroups: ["{base}/agent"]
egress:
  - cidr: 127.0.0.0/8
rate_limit:
  per_second: 1
  burst: 5
"#;

#[tokio::test(flavor = "multi_thread")]
async fn sends_over_the_limit_are_denied_in_the_kernel() -> Result<()> {
    let policy = LIMITED.replace("{mode}", "enforce");
    let mut c = Ctl::start(&[&policy], &["agent"]).await?;
    let agent = c.path("agent");
    let (_u, to) = udp_server("127.0.0.1")?;
    let out = probe_in(&agent, &[format!("udpn:{},20", sa(to))])?;
    // Twenty sends take microseconds: the burst of five, not one more.
    assert_eq!(out[0].value, 5, "{out:?}");
    // The bucket is spent: a TCP connect is refused too (one bucket for both).
    let (_l, tcp) = tcp_server("127.0.0.1")?;
    let out = probe_in(&agent, &[format!("tcp:{}", sa(tcp))])?;
    assert_eq!(out[0].errno, EPERM, "{out:?}");
    let d = c
        .wait_record(|r| {
            r.decision
                .as_ref()
                .is_some_and(|d| d.reason == "rate-limit" && d.port == to.port())
        })
        .await?
        .decision
        .expect("a decision");
    assert_eq!(
        (d.decision.as_str(), d.action.as_str()),
        ("deny", "blocked")
    );
    assert_eq!(d.agent.as_deref(), Some("agent"));
    c.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn in_audit_mode_the_limit_is_recorded_only() -> Result<()> {
    let policy = LIMITED.replace("{mode}", "audit");
    let mut c = Ctl::start(&[&policy], &["agent"]).await?;
    let agent = c.path("agent");
    let (_u, to) = udp_server("127.0.0.1")?;
    let out = probe_in(&agent, &[format!("udpn:{},8", sa(to))])?;
    assert_eq!(
        out[0].value, 8,
        "audit mode lets every send through: {out:?}"
    );
    let mut over = 0;
    let mut allowed = 0;
    while over + allowed < 8 {
        let r = c
            .wait_record(|r| r.decision.as_ref().is_some_and(|d| d.port == to.port()))
            .await?;
        let d = r.decision.expect("a decision");
        ensure!(d.action == "allowed", "{d:?}");
        if d.reason == "rate-limit" {
            assert_eq!((d.decision.as_str(), d.mode.as_str()), ("deny", "audit"));
            over += 1;
        } else {
            allowed += 1;
        }
    }
    assert_eq!((allowed, over), (5, 3));
    c.stop().await
}

/// Two processes of the agent send at once, on both CPUs, while the bucket still holds tokens
/// (a burst of 20,000 for 40,000 sends): it hands out its burst and not one call more (tokens
/// are taken by compare-and-exchange; a call that keeps losing the race is denied, never let
/// through unpaid). Here the two split it about 12,700 / 7,300.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_senders_share_one_bucket_exactly() -> Result<()> {
    let policy = r#"
name: limited
agents:
  cgroups: ["{base}/agent"]
egress:
  - cidr: 127.0.0.0/8
rate_limit:
  per_second: 1
  burst: 20000
"#;
    let mut c = Ctl::start(&[policy], &["agent"]).await?;
    let agent = c.path("agent");
    let (_u, to) = udp_server("127.0.0.1")?;
    let started = std::time::Instant::now();
    let senders: Vec<_> = (0..2)
        .map(|_| {
            let (agent, step) = (agent.clone(), format!("udpn:{},20000", sa(to)));
            std::thread::spawn(move || probe_in(&agent, &[step]))
        })
        .collect();
    let mut each = Vec::new();
    for s in senders {
        let out = s.join().expect("a sender thread")?;
        each.push(out[0].value);
    }
    let through: i64 = each.iter().sum();
    // One token a second refills while they run.
    let refilled = started.elapsed().as_secs() as i64 + 1;
    ensure!(
        (20_000..=20_000 + refilled).contains(&through),
        "{through} sends ({each:?}) went through a bucket of 20,000 (plus {refilled} refilled)"
    );
    let d = c
        .wait_record(|r| {
            r.decision
                .as_ref()
                .is_some_and(|d| d.reason == "rate-limit")
        })
        .await?;
    assert_eq!(d.decision.expect("a decision").action, "blocked");
    c.stop().await
}
