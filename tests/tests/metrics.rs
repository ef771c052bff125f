//! The metrics endpoint against the real kernel: an in-process controller serving /metrics on
//! loopback, an agent's allowed and denied connects, and a scrape that counts them exactly.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use agentwall_tests::{probe_in, sa, tcp_server, wait::until_async, Harness, EPERM};
use anyhow::{bail, ensure, Context, Result};

/// GET /metrics over loopback (HTTP/1.1, closed after the reply): the body.
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .context("an HTTP reply with a body")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    Ok(body.to_string())
}

/// The value of one series (`name{labels}` exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_counts_decisions_by_agent_decision_and_reason() -> Result<()> {
    let (_srv, ok) = tcp_server("127.0.0.1")?;
    let mut closed = ok;
    closed.set_port(ok.port() ^ 1);
    let policy = format!(
        "name: metered\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress:\n  - name: srv\n    \
         cidr: \"127.0.0.1/32\"\n    ports: [{}]\n    protocol: tcp\n",
        ok.port()
    );
    let mut h = Harness::start_with(&policy, |o| {
        o.metrics = Some("127.0.0.1:0".parse().expect("an address"));
    })
    .await?;
    let addr = h
        .handle
        .as_ref()
        .and_then(|h| h.metrics_addr())
        .context("the metrics endpoint's address")?;
    ensure!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    // 3 allowed, 2 denied (no port match).
    let steps: Vec<String> = [ok, closed, ok, closed, ok]
        .iter()
        .map(|a| format!("tcp:{}", sa(*a)))
        .collect();
    let out = probe_in(&h.agent, &steps)?;
    let errnos: Vec<i32> = out.iter().map(|o| o.errno).collect();
    assert_eq!(errnos, [0, EPERM, 0, EPERM, 0], "{out:#?}");
    let d = h.decisions(5).await?;
    assert_eq!(d.len(), 5, "{d:#?}");
    let agent = d[0].agent.clone().context("a named agent")?;
    let (allow_reason, deny_reason) = (d[0].reason.clone(), d[1].reason.clone());
    assert_eq!(deny_reason, "default-deny:no-port-match");

    let allow = format!(
        r#"agentwall_decisions_total{{agent="{agent}",decision="allow",reason="{allow_reason}",mode="enforce"}}"#
    );
    let deny = format!(
        r#"agentwall_decisions_total{{agent="{agent}",decision="deny",reason="{deny_reason}",mode="enforce"}}"#
    );
    // The tap sees a record just before the counters do; occupancy comes on the actor's tick.
    let text = until_async(
        "the scrape to count every decision",
        Duration::from_secs(5),
        &[],
        || {
            let t = scrape(addr)?;
            let done = value(&t, &allow) == Some(3.0)
                && value(&t, &deny) == Some(2.0)
                && value(&t, r#"agentwall_map_entries{map="agents"}"#).is_some();
            Ok(done.then_some(t))
        },
    )
    .await
    .or_else(|e| match scrape(addr) {
        Ok(t) => bail!("{e:#}; last scrape:\n{t}"),
        Err(s) => bail!("{e:#}; scrape: {s:#}"),
    })?;

    // Exactly these decisions for this agent, and every one of them counted as written.
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("agentwall_decisions_total{"))
        .collect();
    assert_eq!(series.len(), 2, "{series:#?}");
    assert_eq!(
        value(&text, r#"agentwall_records_written_total{kind="decision"}"#),
        Some(5.0),
        "{text}"
    );
    // The agent map holds at least this agent, within its capacity; the rule trie this rule.
    let entries = value(&text, r#"agentwall_map_entries{map="agents"}"#).unwrap_or(0.0);
    let capacity = value(&text, r#"agentwall_map_capacity{map="agents"}"#).unwrap_or(0.0);
    assert!(entries >= 1.0 && capacity >= entries, "{text}");
    assert!(
        value(&text, r#"agentwall_map_entries{map="rules_v4"}"#).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    // The policy's version is the one its records carry.
    assert_eq!(
        value(&text, r#"agentwall_policy_version{policy="metered"}"#),
        Some(f64::from(d[0].policy_version)),
        "{text}"
    );
    // Read at scrape time: the ring's size, its fill, the audit log's health.
    let ring = value(&text, "agentwall_ring_capacity_bytes").unwrap_or(0.0);
    assert!(ring >= 4096.0, "{text}");
    let pending = value(&text, "agentwall_ring_pending_bytes").context("ring fill")?;
    assert!(pending <= ring, "{text}");
    assert_eq!(value(&text, "agentwall_audit_log_healthy"), Some(1.0));
    assert_eq!(
        value(&text, "agentwall_audit_write_errors_total"),
        Some(0.0)
    );
    let last = value(&text, "agentwall_last_record_timestamp_seconds").unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        (now - last).abs() < 60.0,
        "last record at {last}, now {now}"
    );
    h.stop().await?;
    // The endpoint stops with the controller.
    ensure!(
        TcpStream::connect(addr).is_err(),
        "{addr} still accepts after shutdown"
    );
    Ok(())
}

/// The sum of every series of `name` (all label sets).
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_audit_log_and_its_losses_show_in_the_metrics() -> Result<()> {
    use agentwall_tests::audit::{read_log, Tmpfs};
    let fs = Tmpfs::mount("metrics", 1 << 20, false)?;
    let log = fs.path("audit.jsonl");
    let (_srv, ok) = tcp_server("127.0.0.1")?;
    let policy = format!(
        "name: t\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress:\n  - name: api\n    cidr: \
         \"127.0.0.1/32\"\n    ports: [{}]\n    protocol: tcp\n",
        ok.port()
    );
    // A small ring: while the reader is paused most of the loop's events cannot be queued.
    let h = Harness::start_with(&policy, |o| {
        o.audit_log = Some(log.clone());
        o.ring_bytes = Some(16 * 1024);
        o.metrics = Some("127.0.0.1:0".parse().expect("an address"));
    })
    .await?;
    let addr = h
        .handle
        .as_ref()
        .and_then(|h| h.metrics_addr())
        .context("the metrics endpoint's address")?;
    let t = scrape(addr)?;
    assert_eq!(value(&t, "agentwall_audit_log_healthy"), Some(1.0), "{t}");
    assert_eq!(
        value(&t, "agentwall_ring_capacity_bytes"),
        Some(16384.0),
        "{t}"
    );

    let filler = fs.fill("filler")?;
    let mut closed = ok;
    closed.set_port(ok.port() ^ 1);
    let out = probe_in(&h.agent, &[format!("loop:{ok},{closed},1500")])?;
    let attempts = out[0].value as u64;
    ensure!(attempts > 200, "only {attempts} attempts");
    // Failing: unhealthy, errors counted, and the ring holds what the reader could not write.
    let t = until_async(
        "the failure in the metrics",
        Duration::from_secs(5),
        &[],
        || {
            let t = scrape(addr)?;
            let failing = value(&t, "agentwall_audit_log_healthy") == Some(0.0)
                && value(&t, "agentwall_audit_write_errors_total").unwrap_or(0.0) >= 2.0;
            Ok(failing.then_some(t))
        },
    )
    .await?;
    let pending = value(&t, "agentwall_ring_pending_bytes").unwrap_or(0.0);
    assert!(
        pending > 0.0 && pending <= 16384.0,
        "a paused reader leaves records in the ring: {t}"
    );

    // Space again: every attempt is a decision counted or a loss counted, by where.
    std::fs::remove_file(&filler)?;
    let t = until_async(
        "the paused records in the metrics",
        Duration::from_secs(10),
        &[],
        || {
            let t = scrape(addr)?;
            let seen =
                total(&t, "agentwall_decisions_total") + total(&t, "agentwall_records_lost_total");
            let healthy = value(&t, "agentwall_audit_log_healthy") == Some(1.0);
            Ok((healthy && seen >= attempts as f64).then_some(t))
        },
    )
    .await?;
    let records = read_log(&log)?;
    let decisions = records.iter().filter(|r| r.kind == "decision").count() as f64;
    let lost: u64 = records
        .iter()
        .filter(|r| r.kind == "lost")
        .filter_map(|r| r.lost)
        .sum();
    assert_eq!(total(&t, "agentwall_decisions_total"), decisions, "{t}");
    assert!(
        lost > 0,
        "the small ring lost nothing: the test proves nothing"
    );
    assert_eq!(
        value(&t, r#"agentwall_records_lost_total{where="kernel-ring"}"#),
        Some(lost as f64),
        "{t}"
    );
    assert_eq!(decisions + lost as f64, attempts as f64);
    h.stop().await
}
