//! `--format ocsf`: a controller's audit log holds one OCSF 1.8.0 event per record, each of which
//! passes the schema check (`agentwall::sinks::ocsf::check_required`: the required attributes,
//! enums and types of Network Activity 4001 and the Base Event, from ocsf-schema v1.8.0), and the
//! events say what the kernel decided: an allowed TCP connect, a refused one, a refused UDP send,
//! and in audit mode a deny that was only observed.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use agentwall::sinks::{
    chain::{self, Checker, Line, Signer},
    ocsf::check_required,
    Format,
};
use agentwall_tests::{
    probe_in, tcp_server, udp_server,
    wait::{dir_of, until_async},
    Harness,
};
use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn policy(tcp: SocketAddr, mode: &str) -> String {
    format!(
        "name: ocsf\nmode: {mode}\nagents:\n  cgroups:\n    - \"{{agent}}\"\negress:\n  - name: api\n    \
         cidr: \"127.0.0.1/32\"\n    ports: [{}]\n    protocol: tcp\n",
        tcp.port()
    )
}

/// A fresh directory for one test's audit log, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("agentwall-ocsf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every whole line of the log as an OCSF event that passes the check; the chain's own
/// checkpoint lines (not records, docs/ocsf.md) are passed over.
fn read_events(log: &std::path::Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).context(format!("reading {}", log.display())),
    };
    let whole = text.rsplit_once('\n').map_or("", |(a, _)| a);
    whole
        .lines()
        .enumerate()
        .filter(|(_, line)| !chain::is_checkpoint(line.as_bytes()))
        .map(|(i, line)| {
            let ev: Value = serde_json::from_str(line)
                .with_context(|| format!("line {} is not JSON: {line}", i + 1))?;
            check_required(&ev).map_err(|e| anyhow::anyhow!("line {}: {e}: {line}", i + 1))?;
            Ok(ev)
        })
        .collect()
}

fn network(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["class_uid"] == 4001).collect()
}

/// The one network event aimed at `dst` by hook kind (activity 1 Open, 6 Traffic).
fn aimed_at(events: &[Value], dst: SocketAddr, activity: i64) -> Result<&Value> {
    let found: Vec<&Value> = network(events)
        .into_iter()
        .filter(|e| {
            e["dst_endpoint"]["ip"] == dst.ip().to_string()
                && e["dst_endpoint"]["port"] == dst.port()
                && e["activity_id"] == activity
        })
        .collect();
    ensure!(
        found.len() == 1,
        "events for {dst} activity {activity}: {found:#?}"
    );
    Ok(found[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_mode_decisions_are_valid_ocsf_network_activity() -> Result<()> {
    let dir = TempDir::new("enforce")?;
    let log = dir.0.join("audit.jsonl");
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let (_u, udp) = udp_server("127.0.0.1")?;
    let refused = SocketAddr::new(tcp.ip(), tcp.port() ^ 1);
    let h = Harness::start_with(&policy(tcp, "enforce"), |o| {
        o.audit_log = Some(log.clone());
        o.format = Format::Ocsf;
    })
    .await?;
    let out = probe_in(
        &h.agent,
        &[
            format!("tcp:{tcp}"),
            format!("tcp:{refused}"),
            format!("udp:{udp}"),
        ],
    )?;
    ensure!(out[0].ok && !out[1].ok && !out[2].ok, "{out:?}");
    until_async(
        "three network events",
        Duration::from_secs(5),
        &[dir_of(&log)],
        || Ok((network(&read_events(&log)?).len() >= 3).then_some(())),
    )
    .await?;
    h.stop().await?;
    let events = read_events(&log)?;
    ensure!(network(&events).len() == 3, "{events:#?}");

    let allowed = aimed_at(&events, tcp, 1)?;
    let pid = &allowed["actor"]["process"]["pid"];
    assert_eq!(
        (
            &allowed["action_id"],
            &allowed["disposition_id"],
            &allowed["disposition"]
        ),
        (&Value::from(1), &Value::from(1), &Value::from("Allowed")),
        "{allowed:#}"
    );
    assert_eq!(allowed["connection_info"]["protocol_name"], "tcp");
    assert_eq!(allowed["connection_info"]["direction_id"], 2);
    assert_eq!(allowed["connection_info"]["protocol_ver_id"], 4);
    assert_eq!(allowed["policy"]["name"], "ocsf");
    assert_eq!(allowed["firewall_rule"]["name"], "api");
    assert_eq!(allowed["actor"]["process"]["name"], "probe");
    assert!(
        allowed["actor"]["process"]["file"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/probe")),
        "{allowed:#}"
    );
    assert_eq!(allowed["actor"]["user"]["uid"], "0");
    assert!(allowed["unmapped"]["agent"].is_string(), "{allowed:#}");
    assert!(allowed["metadata"]["uid"]
        .as_str()
        .is_some_and(|u| u.ends_with(&format!(":{}", allowed["metadata"]["sequence"]))));

    for (dst, activity, proto) in [(refused, 1, "tcp"), (udp, 6, "udp")] {
        let e = aimed_at(&events, dst, activity)?;
        assert_eq!(
            (&e["action_id"], &e["disposition_id"], &e["status_id"]),
            (&Value::from(2), &Value::from(2), &Value::from(2)),
            "{e:#}"
        );
        assert_eq!(e["connection_info"]["protocol_name"], proto);
        assert_eq!(
            &e["actor"]["process"]["pid"], pid,
            "one probe made all three calls"
        );
    }
    // Sequence numbers are unique: (boot id, seq) identifies each event.
    let mut uids: Vec<&str> = events
        .iter()
        .filter_map(|e| e["metadata"]["uid"].as_str())
        .collect();
    let n = uids.len();
    uids.sort();
    uids.dedup();
    ensure!(
        uids.len() == n && n == events.len(),
        "metadata.uid not unique: {uids:?}"
    );
    drop(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_mode_deny_is_observed_in_ocsf() -> Result<()> {
    let dir = TempDir::new("audit")?;
    let log = dir.0.join("audit.jsonl");
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let (_t2, other) = tcp_server("127.0.0.1")?;
    let h = Harness::start_with(&policy(tcp, "audit"), |o| {
        o.audit_log = Some(log.clone());
        o.format = Format::Ocsf;
    })
    .await?;
    let out = probe_in(&h.agent, &[format!("tcp:{other}")])?;
    ensure!(out[0].ok, "audit mode lets the call through: {out:?}");
    until_async(
        "the audit-mode event",
        Duration::from_secs(5),
        &[dir_of(&log)],
        || Ok((!network(&read_events(&log)?).is_empty()).then_some(())),
    )
    .await?;
    h.stop().await?;
    let events = read_events(&log)?;
    let e = aimed_at(&events, other, 1)?;
    assert_eq!(
        (
            &e["action_id"],
            &e["action"],
            &e["disposition_id"],
            &e["status_id"]
        ),
        (
            &Value::from(3),
            &Value::from("Observed"),
            &Value::from(15),
            &Value::from(1)
        ),
        "{e:#}"
    );
    assert_eq!(
        (&e["unmapped"]["mode"], &e["unmapped"]["decision"]),
        (&Value::from("audit"), &Value::from("deny"))
    );
    drop(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ocsf_log_is_chained_checkpointed_and_verifies() -> Result<()> {
    let dir = TempDir::new("chain")?;
    let log = dir.0.join("audit.jsonl");
    let key = b"ocsf-test-hmac-key-0123456789";
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let h = Harness::start_with(&policy(tcp, "enforce"), |o| {
        o.audit_log = Some(log.clone());
        o.format = Format::Ocsf;
        o.audit.signers = std::sync::Arc::new(vec![Signer::hmac(key).expect("an HMAC key")]);
    })
    .await?;
    let refused = SocketAddr::new(tcp.ip(), tcp.port() ^ 1);
    let out = probe_in(&h.agent, &[format!("tcp:{tcp}"), format!("tcp:{refused}")])?;
    ensure!(out[0].ok && !out[1].ok, "{out:?}");
    until_async(
        "two network events",
        Duration::from_secs(5),
        &[dir_of(&log)],
        || Ok((network(&read_events(&log)?).len() >= 2).then_some(())),
    )
    .await?;
    h.stop().await?;

    let bytes = std::fs::read(&log)?;
    let lines: Vec<&[u8]> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let checkpoints = lines.iter().filter(|l| chain::is_checkpoint(l)).count();
    ensure!(checkpoints >= 1, "no checkpoint in a signed log");
    // Every other line is an OCSF event (read_events checks each).
    let events = read_events(&log)?;
    assert_eq!(events.len() + checkpoints, lines.len());
    ensure!(network(&events).len() == 2, "{events:#?}");
    let summary = chain::verify(
        &[Checker::hmac(key).expect("an HMAC key")],
        lines.iter().enumerate().map(|(i, l)| Line {
            file: 0,
            number: i as u64 + 1,
            bytes: l.to_vec(),
            partial: false,
        }),
    )
    .map_err(|p| anyhow::anyhow!("the OCSF log does not verify: {p:?}"))?;
    assert_eq!(summary.records as usize, events.len(), "{summary:?}");
    drop(dir);
    Ok(())
}
