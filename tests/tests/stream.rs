//! The live stream (`GET /v1/events`, `agentwall events --follow`) on a real controller and
//! kernel: consumers with different filters each get exactly their records; a consumer that
//! never reads does not slow the audit log (every decision written), others keep working, and
//! when it reads again it is told how many records it missed and then gets new ones; a consumer
//! that goes away is released; bad filters are a 400 naming the parameter.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use agentwall::api::client::{self, ClientError, Lines};
use agentwall_tests::{
    audit::{read_log, read_log_so_far},
    denied, one_port_policy, probe_in, sibling_exe, tcp_server,
    wait::{dir_of, until_answer, until_async},
    Harness,
};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A controller with its control socket and audit log in a directory of the test's own.
struct Ctl {
    h: Harness,
    dir: PathBuf,
    log: PathBuf,
    /// The agent's name, as its records carry it.
    agent: String,
}

impl Ctl {
    async fn start(port: u16, stream_buffer: usize) -> Result<Self> {
        // One directory per controller: the tests of this file run side by side.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("agentwall-stream-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("audit.jsonl");
        let mut h = Harness::start_with(&one_port_policy(port), |o| {
            o.control_socket = Some(dir.join("control.sock"));
            o.audit_log = Some(log.clone());
            o.stream_buffer = stream_buffer;
        })
        .await?;
        // One decision first: the agent's name, as records carry it.
        let out = probe(&h.agent, &[format!("tcp:127.0.0.1:{port}")]).await?;
        ensure!(out[0].ok, "{out:?}");
        let d = h.decisions(1).await?;
        let agent = d[0].agent.clone().context("the record names its agent")?;
        Ok(Self { h, dir, log, agent })
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// `agentwall events --follow ARGS`: its stdout lines, once it says it is following.
    fn cli_follow(&self, args: &[&str]) -> Result<CliStream> {
        let mut child = Command::new(sibling_exe("agentwall")?)
            .args(["events", "--follow", "--control-socket"])
            .arg(self.socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running agentwall events")?;
        let (tx, lines) = std_mpsc::channel();
        let stdout = child.stdout.take().context("stdout")?;
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        // Subscribed once the answer's head has come: it says so on stderr.
        let mut stderr = BufReader::new(child.stderr.take().context("stderr")?);
        let mut said = String::new();
        stderr.read_line(&mut said)?;
        if !said.contains("following records") {
            let _ = child.kill();
            bail!("agentwall events {args:?}: {said}");
        }
        Ok(CliStream { child, lines })
    }

    async fn stop(self) -> Result<()> {
        let r = self.h.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
        r
    }

    /// The audit log's decision records for this agent.
    fn decisions(&self) -> Result<Vec<Value>> {
        Ok(read_log(&self.log)?
            .into_iter()
            .filter(|r| {
                r.decision
                    .as_ref()
                    .is_some_and(|d| d.agent.as_deref() == Some(&self.agent))
            })
            .map(|r| serde_json::to_value(r).expect("a record"))
            .collect())
    }
}

async fn probe(agent: &Path, steps: &[String]) -> Result<Vec<agentwall_tests::Outcome>> {
    tokio::task::block_in_place(|| probe_in(agent, steps))
}

/// A running `agentwall events --follow`; killed when dropped.
struct CliStream {
    child: Child,
    lines: std_mpsc::Receiver<String>,
}

impl CliStream {
    /// Exactly `n` lines within 10 s, and no other within a grace after.
    fn exactly(&self, n: usize) -> Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => bail!("expected {n} lines, got {}: {out:#?}", out.len()),
            }
        }
        if let Ok(extra) = self.lines.recv_timeout(Duration::from_millis(500)) {
            bail!("expected {n} lines, got one more: {extra} after {out:#?}");
        }
        Ok(out)
    }
}

impl Drop for CliStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next record of an in-process stream (heartbeats skipped), within `limit`.
async fn next_record(lines: &mut Lines, limit: Duration) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .context("no record in time")??
            .context("the stream ended")?;
        let v: Value = serde_json::from_slice(&line)?;
        if v["kind"] != "stream-heartbeat" {
            return Ok(v);
        }
    }
}

fn seqs(records: &[Value]) -> Vec<u64> {
    records.iter().filter_map(|r| r["seq"].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_with_different_filters_each_get_exactly_their_records() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let ctl = Ctl::start(tcp.port(), 1024).await?;
    let agent = ctl.agent.clone();
    let allowed = ctl.cli_follow(&["--agent", &agent, "--decision", "allow"])?;
    let text = ctl.cli_follow(&["--agent", &agent, "--decision", "deny", "--output", "text"])?;
    let mut denied_in_net = client::follow(
        &ctl.socket(),
        &format!("/v1/events?agent={agent}&decision=deny&dst=127.0.0.0/8"),
    )
    .await?;
    // Another network: no record of this test is for it.
    let mut elsewhere = client::follow(&ctl.socket(), "/v1/events?dst=10.0.0.0/8").await?;
    until_answer("four consumers", Duration::from_secs(5), || async {
        Ok((ctl
            .h
            .handle
            .as_ref()
            .context("running")?
            .records()
            .consumers()
            == 4)
            .then_some(()))
    })
    .await?;

    let (ok, no) = (format!("tcp:{tcp}"), format!("tcp:{}", denied(tcp)));
    let steps = [&ok, &no, &ok, &no, &no].map(|s| s.to_string());
    let out = probe(&ctl.h.agent, &steps).await?;
    ensure!(
        out.iter().map(|o| o.ok).collect::<Vec<_>>() == [true, false, true, false, false],
        "{out:?}"
    );

    let allow_lines: Vec<Value> = allowed
        .exactly(2)?
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    let mut deny_records = Vec::new();
    for _ in 0..3 {
        deny_records.push(next_record(&mut denied_in_net, Duration::from_secs(10)).await?);
    }
    let text_lines = text.exactly(3)?;

    // Exactly the audit log's records of each kind, in order, and nothing else.
    until_async(
        "the six decisions in the audit log",
        Duration::from_secs(5),
        &[dir_of(&ctl.log)],
        || Ok((read_log_so_far(&ctl.log)?.len() >= 6).then_some(())),
    )
    .await?;
    let logged = ctl.decisions()?;
    let of = |v: &str| -> Vec<Value> {
        logged
            .iter()
            .filter(|r| r["decision"]["decision"] == v)
            .cloned()
            .collect()
    };
    let (log_allow, log_deny) = (of("allow"), of("deny"));
    assert_eq!(log_allow.len(), 3, "the first connect and two more");
    assert_eq!(seqs(&allow_lines), seqs(&log_allow[1..]));
    assert_eq!(allow_lines, log_allow[1..].to_vec());
    assert_eq!(seqs(&deny_records), seqs(&log_deny));
    assert_eq!(deny_records, log_deny);
    for (line, rec) in text_lines.iter().zip(&log_deny) {
        let want = format!("agent={agent} tcp {}", denied(tcp));
        ensure!(
            line.contains(" deny ")
                && line.contains(&want)
                && line.ends_with(&format!(" seq={}", rec["seq"])),
            "text line {line:?} for {rec}"
        );
    }
    let quiet = tokio::time::timeout(Duration::from_millis(300), elsewhere.next_line()).await;
    ensure!(quiet.is_err(), "a record for 10.0.0.0/8: {quiet:?}");
    drop((allowed, text, denied_in_net, elsewhere));
    ctl.stop().await
}

/// The raw bytes of a response on the control socket, read by hand: a consumer that stops
/// reading is one whose socket fills.
struct RawStream {
    s: tokio::net::UnixStream,
    got: Vec<u8>,
}

impl RawStream {
    async fn open(socket: &Path, query: &str) -> Result<Self> {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        s.write_all(
            format!("GET /v1/events?{query} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Self { s, got: Vec::new() };
        // Subscribed once the head has come.
        raw.read_until(b"\r\n\r\n", Duration::from_secs(5)).await?;
        ensure!(
            raw.got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&raw.got)
        );
        Ok(raw)
    }

    /// Reads until `needle` is in what came after `from`; its offset.
    async fn read_until_from(
        &mut self,
        from: usize,
        needle: &[u8],
        limit: Duration,
    ) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(i) = self.got[from..]
                .windows(needle.len())
                .position(|w| w == needle)
            {
                return Ok(from + i);
            }
            let n = tokio::time::timeout_at(deadline, self.s.read(&mut buf))
                .await
                .with_context(|| {
                    format!("no {:?} within {limit:?}", String::from_utf8_lossy(needle))
                })??;
            ensure!(n > 0, "the stream ended");
            self.got.extend_from_slice(&buf[..n]);
        }
    }

    async fn read_until(&mut self, needle: &[u8], limit: Duration) -> Result<usize> {
        self.read_until_from(0, needle, limit).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_does_not_slow_the_audit_log_and_is_told_what_it_missed() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let ctl = Ctl::start(tcp.port(), 64).await?;
    let handle = ctl.h.handle.as_ref().context("running")?;
    let before = ctl.decisions()?.len();

    // Opens its stream and reads nothing more.
    let mut stuck = RawStream::open(&ctl.socket(), &format!("agent={}", ctl.agent)).await?;
    let out = probe(&ctl.h.agent, &[format!("loop:{tcp},{},4000", denied(tcp))]).await?;
    ensure!(out[0].ok, "{out:?}");
    let attempts = out[0].value as usize;
    // Far more than the stuck consumer's socket, its hyper buffer and its 64 records hold.
    ensure!(attempts > 1000, "only {attempts} decisions");

    // The audit log has every one of them: written = decisions.
    until_async(
        "every decision in the audit log",
        Duration::from_secs(20),
        &[dir_of(&ctl.log)],
        || Ok((read_log_so_far(&ctl.log)?.len() >= before + attempts).then_some(())),
    )
    .await?;
    let logged = ctl.decisions()?;
    assert_eq!(logged.len(), before + attempts, "written = decisions");
    let status = handle.status().await?;
    ensure!(status["audit_log"]["ok"] == true, "{status}");

    // A fresh consumer works while the stuck one still holds its place.
    let mut fresh = client::follow(
        &ctl.socket(),
        &format!("/v1/events?agent={}&decision=allow", ctl.agent),
    )
    .await?;
    let out = probe(&ctl.h.agent, &[format!("tcp:{tcp}")]).await?;
    ensure!(out[0].ok, "{out:?}");
    let r = next_record(&mut fresh, Duration::from_secs(10)).await?;
    assert_eq!(r["decision"]["decision"], "allow", "{r}");
    assert_eq!(r["decision"]["port"], tcp.port(), "{r}");

    // The stuck one reads again: first what its buffers held, then how many it missed, then
    // the records written since.
    let at = stuck
        .read_until(
            br#"{"kind":"stream-dropped","count":"#,
            Duration::from_secs(10),
        )
        .await?;
    let tail = &stuck.got[at..];
    let end = tail
        .iter()
        .position(|&b| b == b'\n')
        .context("a whole notice")?;
    let notice: Value = serde_json::from_slice(&tail[..end])?;
    let missed = notice["count"].as_u64().context("count")?;
    ensure!(missed > 0 && missed <= attempts as u64 + 1, "{notice}");
    ensure!(handle.records().dropped() >= missed, "dropped total");
    eprintln!("{attempts} decisions while stuck; its stream dropped {missed}");
    let new_port = tcp.port() ^ 2;
    let out = probe(&ctl.h.agent, &[format!("tcp:127.0.0.1:{new_port}")]).await?;
    ensure!(!out[0].ok, "{out:?}");
    stuck
        .read_until_from(
            at,
            format!(r#""port":{new_port}"#).as_bytes(),
            Duration::from_secs(10),
        )
        .await
        .context("a record after the drop notice")?;

    // Gone consumers are released (at the next record written to them).
    drop(stuck);
    drop(fresh);
    let out = probe(&ctl.h.agent, &[format!("tcp:{tcp}")]).await?;
    ensure!(out[0].ok, "{out:?}");
    until_answer(
        "the consumers released",
        Duration::from_secs(15),
        || async { Ok((handle.records().consumers() == 0).then_some(())) },
    )
    .await?;
    ctl.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_are_refused_naming_the_parameter() -> Result<()> {
    let (_t, tcp) = tcp_server("127.0.0.1")?;
    let ctl = Ctl::start(tcp.port(), 1024).await?;
    for (query, field) in [
        ("decision=maybe", "decision"),
        ("dst=10.0.0.0/33", "dst"),
        ("dst=example.com", "dst"),
        ("agent=", "agent"),
        ("format=xml", "format"),
        ("since=1", "since"),
        ("task=a&task=b", "task"),
    ] {
        match client::follow(&ctl.socket(), &format!("/v1/events?{query}")).await {
            Err(ClientError::Api { status, error }) => {
                ensure!(status == 400, "{query}: {status} {error}");
                ensure!(error.field.as_deref() == Some(field), "{query}: {error}");
                ensure!(!error.message.is_empty(), "{query}");
            }
            Err(e) => bail!("{query}: {e}"),
            Ok(_) => bail!("{query}: accepted"),
        }
    }
    let handle = ctl.h.handle.as_ref().context("running")?;
    ensure!(
        handle.records().consumers() == 0,
        "a refused stream holds no place"
    );
    // The CLI: without --follow it says what it needs; a bad filter is the controller's 400.
    let bin = sibling_exe("agentwall")?;
    let out = Command::new(&bin)
        .args(["events", "--control-socket"])
        .arg(ctl.socket())
        .output()?;
    ensure!(!out.status.success());
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("--follow"),
        "{out:?}"
    );
    let out = Command::new(&bin)
        .args([
            "events",
            "--follow",
            "--dst",
            "300.1.1.1",
            "--control-socket",
        ])
        .arg(ctl.socket())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("dst") && err.contains("300.1.1.1"),
        "{err}"
    );
    ctl.stop().await
}
