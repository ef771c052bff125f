//! The agent socket (docs/agent-socket.md): every agent reaches it through the Unix guard even
//! with an empty `unix` list, unless its policy says `agent_socket: false`; the caller is the
//! agent the kernel names (peer pidfd -> cgroup -> nearest registered agent), whatever the
//! request says; a process that is not an agent is refused; bad bodies get a 400 naming the field.

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use agentwall::identity::cgroup;
use agentwall_tests::{probe, probe_in, Daemon, Harness, Outcome, EPERM};
use anyhow::{ensure, Context, Result};
use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A directory for the test's sockets, removed on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Result<Self> {
        let d = std::env::temp_dir().join(format!(
            "agentwall-agentsock-dir-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(policy: &str, socket: &Path) -> Result<Harness> {
    let socket = socket.to_path_buf();
    Harness::start_with(policy, move |o| o.agent_socket = Some(socket)).await
}

/// `http:` probe step.
fn http(socket: &Path, method: &str, route: &str, body: &str) -> String {
    let mut s = format!("http:{},{method},{route}", socket.display());
    if !body.is_empty() {
        s.push(',');
        s.push_str(body);
    }
    s
}

fn status_and_body(o: &Outcome) -> Result<(i64, Value)> {
    ensure!(o.ok, "{} failed: {o:?}", o.step);
    Ok((
        o.value,
        serde_json::from_str(&o.detail).with_context(|| format!("{}: {o:?}", o.step))?,
    ))
}

/// The same request from this test process (not an agent).
fn http_here(socket: &Path, method: &str, route: &str, body: &str) -> Result<(u16, Value)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {route} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let status = reply.get(9..12).context("short reply")?.parse()?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, serde_json::from_str(body)?))
}

const POLICY: &str = "name: t\nagents:\n  cgroups:\n    - \"{agent}\"\negress: []\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_the_agent_socket_and_speaks_only_for_itself() -> Result<()> {
    let dir = SocketDir::new()?;
    let socket = dir.path("agent.sock");
    let other = dir.path("other.sock");
    let _other = std::os::unix::net::UnixListener::bind(&other)?;
    let h = start(POLICY, &socket).await?;
    let agent_rel = h.cgroups.rel("agent");
    let agent_id = cgroup::cgroup_id(&h.agent)?;
    // A process below the agent's cgroup is the agent too (the nearest registered one).
    let below = h.cgroups.make("agent/worker")?;

    let steps = [
        // The policy lists no Unix socket: any other is denied, the agent socket is not.
        format!("unix:{}", other.display()),
        http(&socket, "GET", "/v1/self", ""),
        http(
            &socket,
            "POST",
            "/v1/task",
            r#"{"id":"t-1","intent":"triage, then fix","ttl_secs":60}"#,
        ),
        // Naming another agent is refused; naming itself is fine.
        http(
            &socket,
            "POST",
            "/v1/task",
            r#"{"agent":"someone-else","id":"t-2","intent":"x"}"#,
        ),
        http(
            &socket,
            "POST",
            "/v1/access",
            r#"{"agent":"someone-else","to":"127.0.0.1/32","ttl_secs":5,"reason":"x"}"#,
        ),
        http(
            &socket,
            "POST",
            "/v1/access",
            r#"{"agent":"agent","to":"127.0.0.1/32","ttl_secs":5,"reason":"fetch"}"#,
        ),
        http(&socket, "DELETE", "/v1/task", ""),
        // Bad bodies: cut short, a wrong type, an unknown field (no `grant` for oneself).
        http(&socket, "POST", "/v1/task", r#"{"id":"t""#),
        http(&socket, "POST", "/v1/task", r#"{"id":"t","intent":7}"#),
        http(
            &socket,
            "POST",
            "/v1/access",
            r#"{"to":"127.0.0.1/32","ttl_secs":5,"reason":"x","approve":true}"#,
        ),
        // What an agent can never do there: list grants, reload, register.
        http(&socket, "GET", "/v1/grants", ""),
        http(&socket, "POST", "/v1/reload", ""),
        http(&socket, "POST", "/v1/agents", r#"{"cgroup":"/x"}"#),
    ];
    let out = probe_in(&h.agent, &steps)?;
    assert_eq!(out[0].errno, EPERM, "another Unix socket: {:?}", out[0]);
    let (status, me) = status_and_body(&out[1])?;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["agent"], "agent");
    assert_eq!(me["cgroup"], agent_rel.as_str());
    assert_eq!(me["cgroup_id"], agent_id);
    assert_eq!(me["process_cgroup"], agent_rel.as_str());
    let pid = me["pid"].as_u64().context("pid")?;
    assert!(pid > 0);

    // The request reached the controller as this agent: its answer (a task or grant started by
    // this agent, its refusal, or "not built yet" while runtime control is being built), never
    // the socket's refusal.
    let reached = |o: &Outcome| -> Result<()> {
        let (status, body) = status_and_body(o)?;
        match status {
            200..=202 => {
                assert_eq!(body["by"]["kind"], "agent", "{}: {body}", o.step);
                assert_eq!(body["by"]["cgroup_id"], agent_id, "{}: {body}", o.step);
                assert_eq!(body["by"]["pid"], pid, "{}: {body}", o.step);
            }
            500 => assert!(
                body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("not built yet")),
                "{}: {body}",
                o.step
            ),
            _ => {
                assert_eq!(
                    (status, &body["error"]),
                    (403, &"refused".into()),
                    "{}: {body}",
                    o.step
                );
                assert!(body.get("field").is_none(), "{}: {body}", o.step);
            }
        }
        Ok(())
    };
    reached(&out[2])?;
    for o in &out[3..5] {
        let (status, body) = status_and_body(o)?;
        assert_eq!(status, 403, "{}: {body}", o.step);
        assert_eq!(body["error"], "refused", "{body}");
        assert_eq!(body["field"], "agent", "{body}");
    }
    reached(&out[5])?;
    let (status, body) = status_and_body(&out[6])?;
    ensure!(
        [200, 404, 500].contains(&status),
        "task end: {status} {body}"
    );
    for (o, field) in out[7..10].iter().zip(["body", "intent", "approve"]) {
        let (status, body) = status_and_body(o)?;
        assert_eq!(status, 400, "{}: {body}", o.step);
        assert_eq!(body["error"], "invalid", "{body}");
        let named = body["field"].as_str().unwrap_or_default();
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            named == field || message.contains(field),
            "{}: expected {field} named: {body}",
            o.step
        );
    }
    for o in &out[10..13] {
        let (status, body) = status_and_body(o)?;
        assert_eq!(status, 404, "{}: {body}", o.step);
    }

    // From below the agent's cgroup: the same agent, its own process cgroup.
    let out = probe_in(&below, &[http(&socket, "GET", "/v1/self", "")])?;
    let (status, me) = status_and_body(&out[0])?;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["cgroup_id"], agent_id);
    assert_eq!(me["process_cgroup"], h.cgroups.rel("agent/worker").as_str());

    // Each connect to the agent socket was allowed by its entry, and recorded as such (the
    // records also hold the controller's own, e.g. the task's).
    let records = h.stop_and_collect().await?;
    let shown = socket.display().to_string();
    let to_socket: Vec<_> = records
        .iter()
        .filter_map(|r| r.decision.as_ref())
        .filter(|r| r.unix_path.as_deref() == Some(shown.as_str()))
        .map(|r| (r.action.as_str(), r.reason.as_str(), r.rule_name.as_deref()))
        .collect();
    assert_eq!(
        to_socket,
        // Every http step of both probes: the first probe's but its `unix:` step, and one more.
        vec![("allowed", "rule", Some(shown.as_str())); steps.len() - 1 + 1],
        "{records:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_can_turn_the_agent_socket_off() -> Result<()> {
    let dir = SocketDir::new()?;
    let socket = dir.path("agent.sock");
    let mut h = start(&format!("{POLICY}agent_socket: false\n"), &socket).await?;
    let out = probe_in(&h.agent, &[http(&socket, "GET", "/v1/self", "")])?;
    assert_eq!(out[0].errno, EPERM, "{:?}", out[0]);
    let d = h.decisions(1).await?;
    let shown = socket.display().to_string();
    assert_eq!(
        (
            d[0].unix_path.as_deref(),
            d[0].action.as_str(),
            d[0].reason.as_str()
        ),
        (
            Some(shown.as_str()),
            "blocked",
            "default-deny:no-path-match"
        ),
        "{d:#?}"
    );
    // The socket itself is served: a process outside any agent reaches it (and is refused).
    let (status, body) = http_here(&socket, "GET", "/v1/self", "")?;
    assert_eq!(status, 403, "{body}");
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_is_not_an_agent_is_refused() -> Result<()> {
    let dir = SocketDir::new()?;
    let socket = dir.path("agent.sock");
    let h = start(POLICY, &socket).await?;
    let other = h.cgroups.make("not-an-agent")?;
    let steps = [
        http(&socket, "GET", "/v1/self", ""),
        http(
            &socket,
            "POST",
            "/v1/task",
            r#"{"agent":"agent","id":"t","intent":"i"}"#,
        ),
        http(
            &socket,
            "POST",
            "/v1/access",
            r#"{"agent":"agent","to":"127.0.0.1/32","ttl_secs":5,"reason":"x"}"#,
        ),
        http(&socket, "DELETE", "/v1/task", ""),
    ];
    // In a cgroup no policy selects, and in this test's own cgroup.
    let mut outcomes = probe_in(&other, &steps)?;
    outcomes.extend(probe(&steps)?);
    for o in &outcomes {
        let (status, body) = status_and_body(o)?;
        assert_eq!(status, 403, "{}: {body}", o.step);
        assert_eq!(body["error"], "permission-denied", "{body}");
    }
    let (status, body) = http_here(&socket, "POST", "/v1/task", r#"{"id":"t","intent":"i"}"#)?;
    assert_eq!(status, 403, "{body}");
    h.stop().await
}

#[test]
fn agentwall_run_serves_the_agent_socket_beside_the_control_socket() -> Result<()> {
    let mut d = Daemon::prepare("agentsock")?;
    d.write_policy(
        "p.yaml",
        "name: p\nagents:\n  cgroups:\n    - \"agentwall-test-none/*\"\negress: []\n",
    )?;
    d.start()?;
    let socket = d.socket.with_file_name("agent.sock");
    let mode = std::fs::metadata(&socket)
        .with_context(|| format!("{}: {}", socket.display(), d.log()))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666, "agent socket mode");
    let (status, body) = http_here(&socket, "GET", "/v1/self", "")?;
    assert_eq!(status, 403, "{body}");
    Ok(())
}
