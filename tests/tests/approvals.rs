//! Approvals against the real kernel (docs/runtime-control.md, "Approvals"): an agent's own
//! request under `approve: manual` waits for a person; approved (by the CLI), the agent's
//! connect that was denied is allowed; denied or expired, it stays denied; a denied connection
//! record becomes a request with `--from-event`; an agent can neither approve nor read another
//! agent's request; the pending requests are bounded; bad input changes nothing.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use agentwall::{
    api::client::{call_async, ClientError, Method},
    daemon::{self, Handle, Options, PolicySource},
    events::{AuditRecord, DecisionRecord},
    policy::{self, PolicySet},
};
use agentwall_tests::{
    inproc::{self, next_decision_to, next_record},
    probe_in, sibling_exe, tcp_server, Outcome, TestCgroups, EPERM,
};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Two agents (`ag-a`, `ag-b`) may reach 127.0.0.1:9; anything on 127.0.0.0/8 over TCP may be
/// granted for up to an hour, by a person.
const POLICY: &str = r#"
name: approvals-test
agents:
  cgroups: ["{base}/ag-*"]
egress:
  - cidr: 127.0.0.1/32
    ports: "9"
grantable:
  - cidr: 127.0.0.0/8
    protocol: tcp
max_grant_ttl: 1h
approve: manual
"#;

/// A controller with its control and agent sockets, every record it writes, two agents.
struct Ctl {
    _cgroups: TestCgroups,
    a: PathBuf,
    b: PathBuf,
    dir: PathBuf,
    opts: Options,
    handle: Option<Handle>,
    records: mpsc::UnboundedReceiver<AuditRecord>,
}

impl Ctl {
    async fn start(request_ttl: Duration) -> Result<Ctl> {
        Self::start_pinned(request_ttl, None).await
    }

    /// As `start`, pinned at `pin_dir` (its state files beside the runtime state).
    async fn start_pinned(request_ttl: Duration, pin_dir: Option<PathBuf>) -> Result<Ctl> {
        let cgroups = TestCgroups::new()?;
        let a = cgroups.make("ag-a")?;
        let b = cgroups.make("ag-b")?;
        let dir = std::env::temp_dir().join(format!("agentwall-approvals-{}", cgroups.base));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let yaml = POLICY.replace("{base}", &cgroups.base);
        let p = policy::parse_policy(Path::new("approvals.yaml"), &yaml)?;
        let (tap, records) = mpsc::unbounded_channel();
        let mut opts = Options::new(PolicySource::Fixed(PolicySet { policies: vec![p] }));
        opts.control_socket = Some(dir.join("control.sock"));
        opts.agent_socket = Some(dir.join("agent.sock"));
        opts.tap = Some(tap);
        opts.request_ttl = request_ttl;
        opts.pin_dir = pin_dir;
        let handle = daemon::start(opts.clone()).await?;
        handle.register(&a).await?;
        handle.register(&b).await?;
        Ok(Ctl {
            _cgroups: cgroups,
            a,
            b,
            dir,
            opts,
            handle: Some(handle),
            records,
        })
    }

    /// Stops the controller and starts a new one with the same options.
    async fn restart(&mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        let handle = daemon::start(self.opts.clone()).await?;
        handle.register(&self.a).await?;
        handle.register(&self.b).await?;
        self.handle = Some(handle);
        Ok(())
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// `agentwall ARGS --control-socket S`: (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = tokio::task::block_in_place(|| {
            Command::new(sibling_exe("agentwall")?)
                .args(args)
                .arg("--control-socket")
                .arg(self.control())
                .output()
                .context("running agentwall")
        })?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The admin API: (status, body).
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        match call_async(&self.control(), method, path, body).await {
            Ok(v) => Ok((200, v)),
            Err(ClientError::Api { status, error }) => Ok((status, serde_json::to_value(error)?)),
            Err(e) => Err(e.into()),
        }
    }

    /// Records until one matches `want` (fails after `limit`).
    async fn wait_record(
        &mut self,
        limit: Duration,
        want: impl Fn(&AuditRecord) -> bool,
    ) -> Result<AuditRecord> {
        next_record(&mut self.records, limit, want).await
    }

    /// The next controller record of `kind`; its detail.
    async fn notice(&mut self, kind: &str) -> Result<Value> {
        let r = self
            .wait_record(Duration::from_secs(5), |r| r.kind == kind)
            .await?;
        r.detail.context("a notice has a detail")
    }

    /// The next decision record about `dst`, with its seq.
    async fn decision_to(&mut self, dst: SocketAddr) -> Result<(u64, DecisionRecord)> {
        let r = next_decision_to(&mut self.records, dst).await?;
        Ok((r.seq, r.decision.expect("a decision")))
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            h.shutdown().await?;
        }
        Ok(())
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP connect from inside `agent`: 0 when it connected, else the errno.
fn connect_errno(agent: &Path, to: SocketAddr) -> Result<i32> {
    tokio::task::block_in_place(|| inproc::connect_errno(agent, to))
}

/// An `http:` probe step on the agent socket.
fn http(socket: &Path, method: &str, route: &str, body: &str) -> String {
    let mut s = format!("http:{},{method},{route}", socket.display());
    if !body.is_empty() {
        s.push(',');
        s.push_str(body);
    }
    s
}

/// The agent's own request for TCP access to `to`.
fn access_body(to: SocketAddr, ttl_secs: u64) -> String {
    json!({ "to": to.ip().to_string(), "ports": to.port().to_string(), "protocol": "tcp",
            "ttl_secs": ttl_secs, "reason": "fetch the build log" })
    .to_string()
}

/// Runs `steps` in a probe inside `agent`.
fn in_agent(agent: &Path, steps: &[String]) -> Result<Vec<Outcome>> {
    tokio::task::block_in_place(|| probe_in(agent, steps))
}

fn reply(o: &Outcome) -> Result<(i64, Value)> {
    ensure!(o.ok, "{} failed: {o:?}", o.step);
    Ok((
        o.value,
        serde_json::from_str(&o.detail).with_context(|| format!("{}: {o:?}", o.step))?,
    ))
}

/// The agent asks for `to`; the pending request's id.
fn ask(c: &Ctl, agent: &Path, to: SocketAddr) -> Result<u64> {
    let out = in_agent(
        agent,
        &[http(
            &c.agent_socket(),
            "POST",
            "/v1/access",
            &access_body(to, 600),
        )],
    )?;
    let (status, body) = reply(&out[0])?;
    ensure!(status == 202, "expected 202 pending: {status} {body}");
    assert_eq!(body["state"], "pending", "{body}");
    assert_eq!(body["by"]["kind"], "agent", "{body}");
    body["id"].as_u64().context("a request id")
}

/// The agent reads its request `id` on the agent socket: (status, body).
fn poll(c: &Ctl, agent: &Path, id: u64) -> Result<(i64, Value)> {
    let out = in_agent(
        agent,
        &[http(
            &c.agent_socket(),
            "GET",
            &format!("/v1/requests/{id}"),
            "",
        )],
    )?;
    reply(&out[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_request_allows_the_connect_that_was_denied() -> Result<()> {
    let mut c = Ctl::start(Duration::from_secs(300)).await?;
    let (_l, to) = tcp_server("127.0.0.2")?;
    let a = c.a.clone();
    assert_eq!(connect_errno(&a, to)?, EPERM, "denied before any request");
    let id = ask(&c, &a, to)?;
    let created = c.notice("request-created").await?;
    assert_eq!(created["request"], id);
    assert_eq!(created["by"]["kind"], "agent");
    assert_eq!(created["agent"], "ag-a");
    // Pending is not granted.
    assert_eq!(connect_errno(&a, to)?, EPERM, "denied while pending");
    let (status, body) = poll(&c, &a, id)?;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("pending")),
        "{body}"
    );

    let (ok, listed, err) = c.cli(&["requests"])?;
    ensure!(ok, "agentwall requests: {err}");
    let listed: Value = serde_json::from_str(&listed)?;
    assert_eq!(listed[0]["id"], id, "{listed}");
    assert_eq!(listed[0]["to"], format!("{}/32", to.ip()), "{listed}");

    // An approval may shorten the ttl, never lengthen it (601 s > the requested 600 s).
    let (ok, _, err) = c.cli(&["approve", &id.to_string(), "--ttl", "601s"])?;
    ensure!(!ok && err.contains("ttl_secs"), "a longer ttl: {err}");
    let (ok, grant, err) = c.cli(&["approve", &id.to_string(), "--ttl", "5m"])?;
    ensure!(ok, "agentwall approve: {err}");
    let grant: u64 = grant
        .parse()
        .with_context(|| format!("a grant id: {grant:?}"))?;
    let granted = c.notice("granted").await?;
    assert_eq!(
        (granted["grant"].as_u64(), &granted["by"]["kind"]),
        (Some(grant), &json!("admin"))
    );
    let approved = c.notice("request-approved").await?;
    assert_eq!(approved["request"], id);
    assert_eq!(approved["grant"], grant);
    assert_eq!(approved["ttl_secs"], 300);
    assert_eq!(approved["by"]["kind"], "admin");

    assert_eq!(connect_errno(&a, to)?, 0, "allowed once approved");
    let (_, d) = c.decision_to(to).await?;
    assert_eq!((d.reason.as_str(), d.grant), ("grant", Some(grant)));
    let (status, body) = poll(&c, &a, id)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["state"].as_str(), body["grant"].as_u64()),
        (Some("approved"), Some(grant))
    );
    // Decided: a second decision conflicts, and nothing is pending.
    let (ok, _, err) = c.cli(&["deny", &id.to_string()])?;
    ensure!(!ok && err.contains("no longer pending"), "{err}");
    let (ok, listed, _) = c.cli(&["requests"])?;
    ensure!(ok && listed == "[]", "{listed}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_request_stays_denied() -> Result<()> {
    let mut c = Ctl::start(Duration::from_secs(300)).await?;
    let (_l, to) = tcp_server("127.0.0.3")?;
    let a = c.a.clone();
    let id = ask(&c, &a, to)?;
    let (ok, out, err) = c.cli(&["deny", &id.to_string(), "--reason", "not for this task"])?;
    ensure!(ok, "agentwall deny: {err}");
    let out: Value = serde_json::from_str(&out)?;
    assert_eq!(out["state"], "denied");
    let denied = c.notice("request-denied").await?;
    assert_eq!(denied["request"], id);
    assert_eq!(denied["denied_because"], "not for this task");
    assert_eq!(denied["by"]["kind"], "admin");
    assert_eq!(connect_errno(&a, to)?, EPERM, "still denied");
    let (_, body) = poll(&c, &a, id)?;
    assert_eq!(body["state"], "denied", "{body}");
    assert_eq!(body["decision_reason"], "not for this task", "{body}");
    let (ok, _, err) = c.cli(&["approve", &id.to_string()])?;
    ensure!(
        !ok && err.contains("409"),
        "approving a denied request: {err}"
    );
    assert!(c.handle.as_ref().unwrap().grants().await?.is_empty());
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_request_expires_as_denied() -> Result<()> {
    let mut c = Ctl::start(Duration::from_secs(2)).await?;
    let (_l, to) = tcp_server("127.0.0.4")?;
    let a = c.a.clone();
    let asked = Instant::now();
    let id = ask(&c, &a, to)?;
    let expired = c
        .wait_record(Duration::from_secs(10), |r| r.kind == "request-expired")
        .await?
        .detail
        .context("detail")?;
    let after = asked.elapsed();
    ensure!(
        after >= Duration::from_millis(1900),
        "expired after {after:?}, before its 2 s"
    );
    assert_eq!(expired["request"], id);
    assert_eq!(expired["by"]["kind"], "controller");
    let (_, body) = poll(&c, &a, id)?;
    assert_eq!(body["state"], "expired", "{body}");
    assert_eq!(
        connect_errno(&a, to)?,
        EPERM,
        "an expired request grants nothing"
    );
    let (ok, _, err) = c.cli(&["approve", &id.to_string()])?;
    ensure!(!ok && err.contains("no longer pending"), "{err}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_record_becomes_a_request_with_from_event() -> Result<()> {
    let mut c = Ctl::start(Duration::from_secs(300)).await?;
    let (_l, to) = tcp_server("127.0.0.5")?;
    let a = c.a.clone();
    assert_eq!(connect_errno(&a, to)?, EPERM);
    let (seq, d) = c.decision_to(to).await?;
    assert_eq!(d.decision, "deny");
    // An allowed record (127.0.0.1:9; nothing listens, the decision is what counts).
    let allowed: SocketAddr = "127.0.0.1:9".parse()?;
    connect_errno(&a, allowed)?;
    let (allowed_seq, d) = c.decision_to(allowed).await?;
    assert_eq!(d.decision, "allow");

    let (ok, _, err) = c.cli(&[
        "request",
        "--from-event",
        &allowed_seq.to_string(),
        "--reason",
        "x",
    ])?;
    ensure!(
        !ok && err.contains("from_event") && err.contains("allowed"),
        "{err}"
    );
    let (ok, _, err) = c.cli(&["request", "--from-event", "999999", "--reason", "x"])?;
    ensure!(
        !ok && err.contains("404") && err.contains("no record 999999"),
        "{err}"
    );

    let (ok, id, err) = c.cli(&[
        "request",
        "--from-event",
        &seq.to_string(),
        "--ttl",
        "10m",
        "--reason",
        "the build needs it",
    ])?;
    ensure!(ok, "agentwall request --from-event: {err}");
    let id: u64 = id
        .parse()
        .with_context(|| format!("a request id: {id:?}"))?;
    let created = c.notice("request-created").await?;
    assert_eq!(created["request"], id);
    assert_eq!(created["from_event"], seq);
    assert_eq!(created["by"]["kind"], "admin");
    assert_eq!(created["agent"], "ag-a");
    assert_eq!(created["ports"], to.port().to_string());
    assert_eq!(created["protocol"], "tcp");
    assert_eq!(connect_errno(&a, to)?, EPERM, "pending is not granted");
    let (_, d) = c.decision_to(to).await?;
    assert_eq!((d.decision.as_str(), d.grant), ("deny", None));
    let (ok, grant, err) = c.cli(&["approve", &id.to_string()])?;
    ensure!(ok, "approve: {err}");
    assert_eq!(connect_errno(&a, to)?, 0, "allowed once approved");
    let (_, d) = c.decision_to(to).await?;
    assert_eq!(d.grant.map(|g| g.to_string()), Some(grant));
    // The agent sees the request made for it.
    let (status, body) = poll(&c, &a, id)?;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("approved")),
        "{body}"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_approve_nor_read_another_agents_request() -> Result<()> {
    let c = Ctl::start(Duration::from_secs(300)).await?;
    let (_l, to) = tcp_server("127.0.0.6")?;
    let (a, b) = (c.a.clone(), c.b.clone());
    let id = ask(&c, &a, to)?;
    let s = c.agent_socket();
    let out = in_agent(
        &a,
        &[
            // No body: the 404 comes before a body would be read.
            http(&s, "POST", &format!("/v1/requests/{id}/approve"), ""),
            http(&s, "POST", &format!("/v1/requests/{id}/deny"), ""),
            http(&s, "GET", "/v1/requests", ""),
            http(&s, "POST", "/v1/requests", ""),
            http(&s, "GET", "/v1/requests/abc", ""),
        ],
    )?;
    for o in &out[..4] {
        let (status, body) = reply(o)?;
        assert_eq!(status, 404, "{}: {body}", o.step);
    }
    let (status, body) = reply(&out[4])?;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("id")),
        "{body}"
    );
    // Another agent: the same answer as for no such request.
    let (status, other) = poll(&c, &b, id)?;
    let (_, none) = poll(&c, &b, 999_999)?;
    assert_eq!(status, 404, "{other}");
    assert_eq!(other["error"], "not-found");
    assert_eq!(
        other["message"],
        none["message"]
            .as_str()
            .unwrap()
            .replace("999999", &id.to_string())
    );
    // Still pending, granted nothing.
    let (_, body) = poll(&c, &a, id)?;
    assert_eq!(body["state"], "pending");
    assert_eq!(connect_errno(&a, to)?, EPERM);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_are_bounded_per_agent() -> Result<()> {
    let c = Ctl::start(Duration::from_secs(300)).await?;
    let a = c.a.clone();
    let s = c.agent_socket();
    let cap = agentwall::control::requests::MAX_PENDING_PER_AGENT;
    let steps: Vec<String> = (0..=cap as u16)
        .map(|i| {
            let to: SocketAddr = format!("127.0.0.7:{}", 2000 + i).parse().unwrap();
            http(&s, "POST", "/v1/access", &access_body(to, 60))
        })
        .collect();
    let out = in_agent(&a, &steps)?;
    for o in &out[..cap] {
        let (status, body) = reply(o)?;
        assert_eq!(status, 202, "{}: {body}", o.step);
    }
    let (status, body) = reply(&out[cap])?;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too-many")),
        "{body}"
    );
    // Asking again for one already pending is that request, not a new one.
    let again = in_agent(&a, &steps[..1])?;
    let (status, body) = reply(&again[0])?;
    let (_, first) = reply(&out[0])?;
    assert_eq!((status, &body["id"]), (202, &first["id"]), "{body}");
    // Another agent still may ask.
    let (_l, to) = tcp_server("127.0.0.8")?;
    ask(&c, &c.b, to)?;
    let (status, list) = c.admin(Method::GET, "/v1/requests", None).await?;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(cap + 1), "{list}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_approval_routes_names_the_field_and_changes_nothing() -> Result<()> {
    let c = Ctl::start(Duration::from_secs(300)).await?;
    let (_l, to) = tcp_server("127.0.0.9")?;
    let a = c.a.clone();
    let id = ask(&c, &a, to)?;
    let approve = format!("/v1/requests/{id}/approve");
    let deny = format!("/v1/requests/{id}/deny");
    let cases: Vec<(Method, String, Option<Value>, u16, &str)> = vec![
        (
            Method::POST,
            "/v1/requests".into(),
            Some(json!({"reason": "x"})),
            400,
            "from_event",
        ),
        (
            Method::POST,
            "/v1/requests".into(),
            Some(json!({"from_event": 0, "reason": "x"})),
            400,
            "from_event",
        ),
        (
            Method::POST,
            "/v1/requests".into(),
            Some(json!({"from_event": 1, "reason": " "})),
            400,
            "reason",
        ),
        (
            Method::POST,
            "/v1/requests".into(),
            Some(json!({"from_event": 1, "reason": "x", "ttl_secs": 0})),
            400,
            "ttl_secs",
        ),
        (
            Method::POST,
            "/v1/requests".into(),
            Some(json!({"from_event": 1, "reason": "x", "agent": "ag-a"})),
            400,
            "agent",
        ),
        (Method::GET, "/v1/requests/abc".into(), None, 400, "id"),
        (
            Method::POST,
            "/v1/requests/abc/approve".into(),
            Some(json!({})),
            400,
            "id",
        ),
        (
            Method::POST,
            approve.clone(),
            Some(json!({"ttl_secs": 0})),
            400,
            "ttl_secs",
        ),
        (
            Method::POST,
            approve.clone(),
            Some(json!({"ttl_secs": "5m"})),
            400,
            "ttl_secs",
        ),
        (
            Method::POST,
            approve.clone(),
            Some(json!({"colour": 1})),
            400,
            "colour",
        ),
        (Method::POST, approve.clone(), None, 400, "body"),
        (
            Method::POST,
            deny.clone(),
            Some(json!({"reason": ""})),
            400,
            "reason",
        ),
        (
            Method::POST,
            deny.clone(),
            Some(json!({"reason": 5})),
            400,
            "reason",
        ),
        (
            Method::POST,
            "/v1/requests/424242/approve".into(),
            Some(json!({})),
            404,
            "",
        ),
        (
            Method::POST,
            "/v1/requests/424242/deny".into(),
            Some(json!({})),
            404,
            "",
        ),
        (Method::GET, "/v1/requests/424242".into(), None, 404, ""),
    ];
    for (method, path, body, want, field) in cases {
        let (status, err) = c.admin(method.clone(), &path, body.clone()).await?;
        assert_eq!(status, want, "{method} {path} {body:?}: {err}");
        if !field.is_empty() {
            let named = err["field"].as_str().unwrap_or_default();
            let message = err["message"].as_str().unwrap_or_default();
            assert!(
                named == field || message.contains(field),
                "{method} {path} {body:?}: expected {field} named: {err}"
            );
        }
    }
    // Nothing changed: still pending, nothing granted.
    let (_, list) = c.admin(Method::GET, "/v1/requests", None).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["state"], "pending");
    assert!(c.handle.as_ref().unwrap().grants().await?.is_empty());
    // The CLI says what is wrong before asking.
    let (ok, _, err) = c.cli(&["approve", "x"])?;
    ensure!(!ok && err.contains("invalid value"), "{err}");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_survive_a_controller_restart() -> Result<()> {
    agentwall::datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/agentwall-test-approvals-{}",
        std::process::id()
    ));
    let mut c = Ctl::start_pinned(Duration::from_secs(300), Some(pin_dir.clone())).await?;
    let result = async {
        let (_l, to) = tcp_server("127.0.0.10")?;
        let a = c.a.clone();
        let id = ask(&c, &a, to)?;
        c.restart().await?;
        let (status, list) = c.admin(Method::GET, "/v1/requests", None).await?;
        assert_eq!(status, 200);
        assert_eq!(list[0]["id"], id, "{list}");
        assert_eq!(list[0]["state"], "pending", "{list}");
        // The agent still reads it; a new request gets a new id.
        let (_, body) = poll(&c, &a, id)?;
        assert_eq!(body["state"], "pending", "{body}");
        let (_l2, other) = tcp_server("127.0.0.11")?;
        let next = ask(&c, &a, other)?;
        ensure!(next > id, "request ids restarted: {next} after {id}");
        assert_eq!(connect_errno(&a, to)?, EPERM);
        let (ok, _, err) = c.cli(&["approve", &id.to_string()])?;
        ensure!(ok, "approve after a restart: {err}");
        assert_eq!(connect_errno(&a, to)?, 0, "allowed once approved");
        anyhow::Ok(())
    }
    .await;
    let stopped = c.stop().await;
    agentwall::datapath::pin::uninstall(&pin_dir)?;
    let _ = std::fs::remove_file(agentwall::control::grants::state_path(&pin_dir));
    let _ = std::fs::remove_file(agentwall::control::requests::state_path(&pin_dir));
    result.and(stopped)
}
