//! The NATS JetStream publisher (docs/nats.md) against a real nats-server: every audit record
//! arrives in the stream, in order, with `Nats-Msg-Id` = node.boot_id.seq; across a broker stop
//! and start nothing is lost (the audit log is the spool) and duplicates are removable by id;
//! a controller restart resumes from the cursor instead of publishing again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use agentwall::{
    daemon::Options,
    events::AuditRecord,
    sinks::nats::{token, NatsOptions},
};
use agentwall_tests::{
    audit::{read_log, read_log_so_far},
    nats_server::{free_port, nats_server_bin, NatsServer, Stored, StreamReader},
    one_port_policy, probe_in, tcp_server,
    wait::{dir_of, until_async},
    Harness,
};
use anyhow::{ensure, Context, Result};

/// One allowed and one denied connect per round: two decisions.
fn decide(h: &Harness, tcp: SocketAddr, rounds: usize) -> Result<()> {
    let denied = SocketAddr::new(tcp.ip(), tcp.port() ^ 1);
    let steps: Vec<String> = (0..rounds)
        .flat_map(|_| [format!("tcp:{tcp}"), format!("tcp:{denied}")])
        .collect();
    let out = probe_in(&h.agent, &steps)?;
    ensure!(
        out.iter().step_by(2).all(|o| o.ok) && out.iter().skip(1).step_by(2).all(|o| !o.ok),
        "{out:?}"
    );
    Ok(())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The message id the publisher gives a record.
fn id_of(r: &AuditRecord) -> String {
    let boot = if r.boot_id.is_empty() {
        boot_id()
    } else {
        r.boot_id.clone()
    };
    format!("{}.{boot}.{}", r.node, r.seq)
}

/// Waits until the audit log holds `decisions` decisions; its records.
async fn logged(log: &Path, decisions: usize) -> Result<Vec<AuditRecord>> {
    until_async(
        &format!("{decisions} decisions in the audit log"),
        Duration::from_secs(10),
        &[dir_of(log)],
        || {
            let r = read_log_so_far(log)?;
            let d = r.iter().filter(|r| r.kind == "decision").count();
            Ok((d >= decisions).then_some(r))
        },
    )
    .await
}

/// Waits until the stream holds every record of the audit log (by id; `exact`: and nothing
/// else, the log being complete); checks each message's subject and id against its record, and
/// that first arrivals follow the audit log's order.
async fn all_arrive(
    reader: &mut StreamReader,
    log: &Path,
    prefix: &str,
    exact: bool,
) -> Result<Vec<Stored>> {
    let records = if exact {
        read_log(log)?
    } else {
        read_log_so_far(log)?
    };
    let want: Vec<String> = records.iter().map(id_of).collect();
    let want_set: BTreeSet<&String> = want.iter().collect();
    ensure!(
        want_set.len() == want.len(),
        "the audit log repeats an id: {want:?}"
    );
    let got = reader
        .until(
            &format!("the audit log's {} records in the stream", want.len()),
            Duration::from_secs(30),
            |all| {
                let ids: BTreeSet<&String> = all.iter().map(|m| &m.msg_id).collect();
                let done = if exact {
                    ids == want_set
                } else {
                    ids.is_superset(&want_set)
                };
                Ok(done.then(|| all.to_vec()))
            },
        )
        .await?;
    let mut first = Vec::new();
    let mut seen = BTreeSet::new();
    for m in &got {
        let r = &m.record;
        let id = format!(
            "{}.{}.{}",
            r["node"].as_str().context("node")?,
            r["boot_id"]
                .as_str()
                .filter(|b| !b.is_empty())
                .map_or_else(boot_id, String::from),
            r["seq"].as_u64().context("seq")?
        );
        ensure!(
            m.msg_id == id,
            "message {}: Nats-Msg-Id {} for record {r}",
            m.stream_seq,
            m.msg_id
        );
        let subject = format!(
            "{prefix}.{}.{}",
            token(r["node"].as_str().unwrap_or_default()),
            token(r["kind"].as_str().unwrap_or_default())
        );
        ensure!(
            m.subject == subject,
            "message {}: subject {} for {r}",
            m.stream_seq,
            m.subject
        );
        if seen.insert(m.msg_id.clone()) && want_set.contains(&m.msg_id) {
            first.push(m.msg_id.clone());
        }
    }
    ensure!(
        first == want,
        "first arrivals out of the audit log's order:\n stream {first:?}\n audit  {want:?}"
    );
    Ok(got)
}

fn counts(msgs: &[Stored]) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for m in msgs {
        *c.entry(m.msg_id.clone()).or_default() += 1;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_jetstream_across_a_broker_outage_and_a_controller_restart() -> Result<()> {
    nats_server_bin()?;
    let tmp = std::env::temp_dir().join(format!("agentwall-nats-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let store = tmp.join("jetstream");
    let log = tmp.join("audit.jsonl");
    let mut broker = NatsServer::start(&store, free_port()?)?;
    let prefix = format!("awtest{}", std::process::id());
    let stream = format!("AWTEST{}", std::process::id());
    let mut nats = NatsOptions::new(broker.url());
    nats.subject_prefix = prefix.clone();
    nats.stream = stream.clone();
    // A short window: what the broker would hide as a duplicate within 2 min shows here, so
    // the restart below proves it resumed from its cursor instead of publishing again.
    nats.duplicate_window = Duration::from_secs(1);
    let tune = |o: &mut Options| {
        o.audit_log = Some(log.clone());
        o.nats = Some(nats.clone());
    };
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let h = Harness::start_with(&one_port_policy(tcp.port()), tune).await?;
    let mut reader = StreamReader::connect(&broker.url(), &stream, &format!("{prefix}.>")).await?;

    // Broker up: every record, in order, subject and id as documented.
    decide(&h, tcp, 3)?;
    logged(&log, 6).await?;
    all_arrive(&mut reader, &log, &prefix, false).await?;

    // Broker stopped: decisions go on (enforcement never waits), the records wait in the log.
    broker.stop()?;
    decide(&h, tcp, 20)?;
    logged(&log, 46).await?;
    let mut broker = NatsServer::start(&store, broker.port)?;
    let got = all_arrive(&mut reader, &log, &prefix, false).await?;
    let before_restart = counts(&got);

    // Controller restart while the broker is away: what was not yet published goes out from
    // the cursor, and nothing acknowledged before is published again.
    broker.stop()?;
    decide(&h, tcp, 5)?;
    logged(&log, 56).await?;
    h.stop().await?;
    let cursor = nats.cursor_path(&log);
    ensure!(cursor.exists(), "no cursor at {}", cursor.display());
    let h = Harness::start_with(&one_port_policy(tcp.port()), tune).await?;
    decide(&h, tcp, 5)?;
    logged(&log, 66).await?;
    let _broker = NatsServer::start(&store, broker.port)?;
    all_arrive(&mut reader, &log, &prefix, false).await?;
    // Stopped, the controller has published its last records too: the complete log.
    h.stop().await?;
    let got = all_arrive(&mut reader, &log, &prefix, true).await?;
    let after = counts(&got);
    for (id, n) in &before_restart {
        ensure!(
            after.get(id) == Some(n),
            "{id} was published again after the restart ({n} -> {:?}): the cursor was not used",
            after.get(id)
        );
    }
    // Zero lost: every id of the audit log is in the stream (checked by all_arrive), and the
    // stream holds nothing else.
    let audit_ids: BTreeSet<String> = read_log(&log)?.iter().map(id_of).collect();
    let stream_ids: BTreeSet<String> = after.keys().cloned().collect();
    assert_eq!(stream_ids, audit_ids);
    let dups = got.len() - stream_ids.len();
    eprintln!(
        "{} records, {} messages ({dups} duplicates, removable by Nats-Msg-Id)",
        audit_ids.len(),
        got.len()
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_without_an_audit_log_is_refused_before_anything_is_loaded() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let Err(e) = Harness::start_with(&one_port_policy(tcp.port()), |o| {
        o.audit_log = None;
        o.nats = Some(NatsOptions::new("nats://127.0.0.1:1"));
    })
    .await
    else {
        anyhow::bail!("started with --nats and no audit log");
    };
    let e = format!("{e:#}");
    ensure!(e.contains("--nats") && e.contains("audit"), "{e}");
    Ok(())
}
