//! `agentwall events --follow`: the live stream of records (`GET /v1/events`, docs/stream.md),
//! filtered by the controller, printed as JSON lines, OCSF, or one readable line each.

use std::{
    io::{self, Write},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::{percent_encode, SocketArg};
use crate::{api, api::routes::HEARTBEAT};

#[derive(Args)]
pub struct EventsArgs {
    /// Keep printing records as they are written, until interrupted (required: past records
    /// are in the audit log).
    #[arg(long)]
    follow: bool,
    /// Only this agent's records (its name or cgroup path).
    #[arg(long)]
    agent: Option<String>,
    /// Only records of this verdict.
    #[arg(long, value_parser = ["allow", "deny"])]
    decision: Option<String>,
    /// Only records whose destination lies in this network (CIDR or address).
    #[arg(long)]
    dst: Option<String>,
    /// Only records of this task id.
    #[arg(long)]
    task: Option<String>,
    /// json: the audit log's records; ocsf: OCSF Network Activity; text: one line per record.
    #[arg(long, value_enum, default_value_t = Output::Json)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Json,
    Ocsf,
    Text,
}

/// A stream silent for this long (heartbeats included) has a controller that is gone.
const SILENCE: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());

pub fn run(a: EventsArgs) -> Result<()> {
    if !a.follow {
        bail!(
            "`agentwall events` shows records as they are written and needs --follow; \
             past records are in the audit log (`agentwall run --audit-log`)"
        );
    }
    let path = query(&a);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(follow(&a.socket.control_socket, &path, a.output))
}

/// `/v1/events?...` with the filters given.
fn query(a: &EventsArgs) -> String {
    let format = (a.output == Output::Ocsf).then_some("ocsf");
    let params: Vec<String> = [
        ("agent", a.agent.as_deref()),
        ("decision", a.decision.as_deref()),
        ("dst", a.dst.as_deref()),
        ("task", a.task.as_deref()),
        ("format", format),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={}", percent_encode(v))))
    .collect();
    match params.is_empty() {
        true => "/v1/events".into(),
        false => format!("/v1/events?{}", params.join("&")),
    }
}

async fn follow(socket: &std::path::Path, path: &str, output: Output) -> Result<()> {
    let mut lines = api::client::follow(socket, path).await?;
    eprintln!("agentwall: following records (interrupt to stop)");
    let mut out = io::stdout().lock();
    loop {
        let line = match tokio::time::timeout(SILENCE, lines.next_line()).await {
            Err(_) => bail!("the controller sent nothing for {SILENCE:?}"),
            Ok(r) => r?,
        };
        let Some(line) = line else {
            bail!("the controller ended the stream (it stopped)");
        };
        let v: Value = serde_json::from_slice(&line).context("a stream line that is not JSON")?;
        let printed = match (v["kind"].as_str(), output) {
            (Some("stream-heartbeat"), _) => continue,
            (_, Output::Json | Output::Ocsf) => {
                out.write_all(&line).and_then(|_| out.write_all(b"\n"))
            }
            (_, Output::Text) => writeln!(out, "{}", text(&v)),
        };
        match printed {
            Ok(()) => {}
            // `agentwall events --follow | head`: the reader is done.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
}

/// One readable line for a record of the native form (or a stream notice).
pub fn text(v: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let time = s(&v["time"]);
    let kind = v["kind"].as_str().unwrap_or("?");
    match kind {
        "stream-dropped" => format!(
            "! stream dropped {} records: this consumer fell behind",
            v["count"]
        ),
        "lost" => format!(
            "{time} LOST {} events the kernel could not queue (seq {})",
            v["lost"], v["seq"]
        ),
        "decision" => {
            let d = &v["decision"];
            let dst = match (
                d["dst"].as_str(),
                d["unix_path"].as_str(),
                d["socket"].as_str(),
            ) {
                (Some(ip), _, _) if !ip.is_empty() => {
                    let host = d["host"]
                        .as_str()
                        .map(|h| format!(" ({h})"))
                        .unwrap_or_default();
                    match ip.contains(':') {
                        true => format!("[{ip}]:{}{host}", d["port"]),
                        false => format!("{ip}:{}{host}", d["port"]),
                    }
                }
                (_, Some(path), _) => format!("unix:{path}"),
                (_, _, Some(sock)) => format!("socket:{sock}"),
                _ => "-".into(),
            };
            let mut line = format!(
                "{time} {:<5} {} agent={} {} {dst} pid={} comm={} reason={}",
                s(&d["decision"]),
                s(&d["action"]),
                s(&d["agent"]),
                s(&d["protocol"]),
                d["pid"],
                s(&d["comm"]),
                s(&d["reason"]),
            );
            for (k, field) in [
                ("rule", "rule_name"),
                ("task", "task"),
                ("by", "decided_by"),
            ] {
                if let Some(x) = d[field].as_str() {
                    line.push_str(&format!(" {k}={x}"));
                }
            }
            line.push_str(&format!(" seq={}", v["seq"]));
            line
        }
        other => format!("{time} {other} {}", v["detail"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_readable_line_per_record() {
        let v = serde_json::json!({
            "seq": 7, "time": "2026-11-30T06:00:00Z", "kind": "decision", "decision": {
                "agent": "a", "decision": "deny", "action": "blocked", "protocol": "tcp",
                "dst": "10.0.0.1", "port": 443, "pid": 42, "comm": "curl", "reason": "default",
                "task": "T-1", "rule_name": null, "host": "example.com"
            }
        });
        assert_eq!(
            text(&v),
            "2026-11-30T06:00:00Z deny  blocked agent=a tcp 10.0.0.1:443 (example.com) pid=42 \
             comm=curl reason=default task=T-1 seq=7"
        );
        let v = serde_json::json!({"kind": "stream-dropped", "count": 12});
        assert_eq!(
            text(&v),
            "! stream dropped 12 records: this consumer fell behind"
        );
        let v = serde_json::json!({"seq": 8, "time": "t", "kind": "lost", "lost": 3});
        assert_eq!(
            text(&v),
            "t LOST 3 events the kernel could not queue (seq 8)"
        );
    }
}
