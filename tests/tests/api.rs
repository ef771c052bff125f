//! The control API on a real controller (`agentwall run`): every route answers with JSON, bad
//! input on every route is a 4xx naming the field and changes nothing, a caller that is not
//! root is told "permission denied", and the CLI's commands are clients of it.

use std::{
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    time::Duration,
};

use agentwall::api::{
    client::{self, ClientError, Method},
    wire::ApiError,
};
use agentwall_tests::{Daemon, TestCgroups};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

fn policy(name: &str, cgroup: &str) -> String {
    format!(
        "name: {name}\nagents:\n  cgroups:\n    - {cgroup}\negress:\n  - name: api\n    cidr: 127.0.0.1/32\n    ports: [1]\n    protocol: tcp\ngrantable:\n  - cidr: 127.0.0.1/32\n    ports: [1]\n    protocol: tcp\nmax_grant_ttl: 1h\n"
    )
}

/// A controller with one policy selecting `<base>/a`, and that cgroup made and registered
/// through the API (so nothing registers behind a test's back).
fn started(tag: &str) -> Result<(TestCgroups, Daemon)> {
    let cg = TestCgroups::new()?;
    let mut d = Daemon::prepare(tag)?;
    d.write_policy("p.yaml", &policy("p", &cg.rel("a")))?;
    d.start()?;
    cg.make("a")?;
    let reg = call(
        &d,
        Method::POST,
        "/v1/agents",
        Some(json!({ "cgroup": cg.path("a") })),
    )?;
    ensure!(reg["agent"] == "a", "{reg}");
    Ok((cg, d))
}

fn call(d: &Daemon, method: Method, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
    client::call(&d.socket, method, path, body)
}

/// The parts of `status` that only a change of state moves (counters and the audit log's
/// health move with time).
fn state(d: &Daemon) -> Result<Value> {
    let mut s = call(d, Method::GET, "/v1/status", None).context("status")?;
    let o = s.as_object_mut().context("status is an object")?;
    o.remove("counters");
    o.remove("audit_log");
    Ok(s)
}

/// The runtime routes answer from the controller: a result, or one of its typed errors; never
/// "no such route" (until the runtime lands they answer 500 "not built yet").
fn reached_the_controller(what: &str, r: Result<Value, ClientError>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(ClientError::Api { status, error }) => {
            ensure!(
                !error.message.contains("no such route") && status != 405,
                "{what}: {status} {error}"
            );
            ensure!(
                [400, 403, 404, 409, 500].contains(&status),
                "{what}: unexpected status {status}: {error}"
            );
            ensure!(!error.message.is_empty(), "{what}: empty message");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("{what}: {e}")),
    }
}

#[test]
fn every_route_answers() -> Result<()> {
    let (cg, d) = started("api-routes")?;
    let s = call(&d, Method::GET, "/v1/status", None)?;
    ensure!(s["policies"] == json!(["p"]), "{s}");
    let r = call(&d, Method::POST, "/v1/reload", None)?;
    ensure!(r["generation"].is_u64(), "{r}");
    let reg = call(
        &d,
        Method::POST,
        "/v1/agents",
        Some(json!({ "cgroup": cg.path("a") })),
    )?;
    assert_eq!(reg["agent"], "a", "{reg}");
    assert_eq!(reg["policy"], "p", "{reg}");
    assert_eq!(reg["cgroup"], cg.rel("a"), "{reg}");

    let task = json!({ "agent": "a", "id": "T-1", "intent": "read the docs", "ttl_secs": 60 });
    reached_the_controller(
        "POST /v1/tasks",
        call(&d, Method::POST, "/v1/tasks", Some(task)),
    )?;
    reached_the_controller(
        "DELETE /v1/tasks/a",
        call(&d, Method::DELETE, "/v1/tasks/a", None),
    )?;
    let grant = json!({ "agent": "a", "to": "127.0.0.1/32", "ports": "1", "protocol": "tcp",
        "ttl_secs": 30, "reason": "test" });
    let granted = call(&d, Method::POST, "/v1/grants", Some(grant));
    let id = granted.as_ref().ok().and_then(|g| g["id"].as_u64());
    reached_the_controller("POST /v1/grants", granted)?;
    let listed = call(&d, Method::GET, "/v1/grants", None);
    if let (Some(id), Ok(list)) = (id, &listed) {
        ensure!(
            list.as_array()
                .is_some_and(|l| l.iter().any(|g| g["id"] == id)),
            "grant {id} not listed: {list}"
        );
    }
    reached_the_controller("GET /v1/grants", listed)?;
    let revoked = call(
        &d,
        Method::DELETE,
        &format!("/v1/grants/{}", id.unwrap_or(1)),
        None,
    );
    if let Some(id) = id {
        let r = revoked.with_context(|| format!("revoking grant {id}"))?;
        ensure!(r["id"] == id, "{r}");
    } else {
        reached_the_controller("DELETE /v1/grants/{id}", revoked)?;
    }

    // The CLI: the same routes; a refusal is the controller's message, not a usage error.
    for args in [
        vec![
            "task", "start", "--agent", "a", "--id", "T-2", "--intent", "x", "--ttl", "90s",
        ],
        vec!["task", "end", "--agent", "a"],
        vec![
            "grant",
            "--agent",
            "a",
            "--to",
            "127.0.0.1/32",
            "--ports",
            "1",
            "--protocol",
            "tcp",
            "--ttl",
            "5m",
            "--reason",
            "test",
        ],
        vec!["grants"],
        vec!["revoke", "1"],
    ] {
        let (ok, out) = d.cli(&args)?;
        ensure!(
            ok || out.contains("the controller refused ("),
            "{args:?}: not an answer of the controller: {out}"
        );
        ensure!(!out.contains("no such route"), "{args:?}: {out}");
        if args[0] == "grant" && ok {
            ensure!(
                out.trim().parse::<u64>().is_ok(),
                "grant printed {out:?}, not an id"
            );
        }
    }
    let (ok, out) = d.cli(&[
        "grant",
        "--agent",
        "a",
        "--to",
        "127.0.0.1",
        "--ttl",
        "5x",
        "--reason",
        "r",
    ])?;
    ensure!(!ok && out.contains("--ttl"), "a bad duration: {out}");
    let (ok, out) = d.cli(&["status"])?;
    ensure!(ok && out.contains("\"policies\""), "status: {out}");
    Ok(())
}

/// Sends raw bytes on the socket and returns what came back.
fn raw(d: &Daemon, bytes: &[u8]) -> Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The controller may answer and close before reading it all.
    let _ = s.write_all(bytes);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

#[test]
fn bad_input_on_every_route_is_a_4xx_naming_the_field_and_changes_nothing() -> Result<()> {
    let (cg, d) = started("api-bad")?;
    let before = state(&d)?;
    let grant = |k: &str, v: Value| {
        let mut g = json!({ "agent": "a", "to": "127.0.0.1/32", "ttl_secs": 30, "reason": "r" });
        g[k] = v;
        g
    };
    let task = |k: &str, v: Value| {
        let mut t = json!({ "agent": "a", "id": "T", "intent": "i" });
        t[k] = v;
        t
    };
    let cases: Vec<(Method, String, Option<Value>, &str)> = vec![
        (
            Method::POST,
            "/v1/agents".into(),
            Some(json!({ "cgroup": "relative/a" })),
            "cgroup",
        ),
        (
            Method::POST,
            "/v1/agents".into(),
            Some(json!({ "cgroup": cg.path("nope") })),
            "cgroup",
        ),
        (
            Method::POST,
            "/v1/agents".into(),
            Some(json!({ "cgroup": 7 })),
            "cgroup",
        ),
        (Method::POST, "/v1/agents".into(), Some(json!({})), "cgroup"),
        (
            Method::POST,
            "/v1/tasks".into(),
            Some(task("ttl_secs", json!(0))),
            "ttl_secs",
        ),
        (
            Method::POST,
            "/v1/tasks".into(),
            Some(task("ttl_secs", json!("5m"))),
            "ttl_secs",
        ),
        (
            Method::POST,
            "/v1/tasks".into(),
            Some(task("id", json!(""))),
            "id",
        ),
        (
            Method::POST,
            "/v1/tasks".into(),
            Some(task("owner", json!("x"))),
            "owner",
        ),
        (Method::POST, "/v1/tasks".into(), None, "body"),
        (
            Method::POST,
            "/v1/grants".into(),
            Some(grant("to", json!("300.0.0.1/8"))),
            "to",
        ),
        (
            Method::POST,
            "/v1/grants".into(),
            Some(grant("protocol", json!("icmp"))),
            "protocol",
        ),
        (
            Method::POST,
            "/v1/grants".into(),
            Some(grant("ttl_secs", json!(-5))),
            "ttl_secs",
        ),
        (
            Method::POST,
            "/v1/grants".into(),
            Some(grant("reason", json!(""))),
            "reason",
        ),
        (
            Method::POST,
            "/v1/grants".into(),
            Some(grant("agent", json!(null))),
            "agent",
        ),
        (
            Method::POST,
            "/v1/grants".into(),
            Some(grant("extra", json!(1))),
            "extra",
        ),
        (Method::DELETE, "/v1/grants/abc".into(), None, "id"),
        (Method::DELETE, "/v1/grants/-1".into(), None, "id"),
    ];
    for (method, path, body, field) in cases {
        let what = format!("{method} {path} {body:?}");
        let e = call(&d, method, &path, body).expect_err(&what);
        let ClientError::Api { status, error } = e else {
            anyhow::bail!("{what}: {e}");
        };
        ensure!(status == 400, "{what}: {status} {error}");
        ensure!(error.error == "invalid", "{what}: {error}");
        ensure!(error.field.as_deref() == Some(field), "{what}: {error}");
        ensure!(!error.message.is_empty(), "{what}: no reason");
        ensure!(state(&d)? == before, "{what} changed the state");
    }
    // A route or method that does not exist: the same error shape.
    for (method, path, status) in [
        (Method::GET, "/v1/nothing", 404),
        (Method::GET, "/status", 404),
        (Method::PUT, "/v1/grants", 405),
        (Method::GET, "/v1/reload", 405),
    ] {
        let e = call(&d, method.clone(), path, None).expect_err(path);
        let ClientError::Api { status: s, error } = e else {
            anyhow::bail!("{method} {path}: {e}");
        };
        ensure!(s == status, "{method} {path}: {s} {error}");
    }
    // A reload of a policy that does not load: 400 naming file:line, the running one stays.
    d.write_policy(
        "bad.yaml",
        "name: bad\nagents:\n  cgroups: [x]\negress:\n  - cidr: 10.0.0.0/33\n",
    )?;
    let e = call(&d, Method::POST, "/v1/reload", None).expect_err("a bad policy loaded");
    let error = e.api().context("an API error")?;
    ensure!(error.field.as_deref() == Some("policy"), "{error}");
    ensure!(error.message.contains("bad.yaml:5:"), "{error}");
    ensure!(state(&d)? == before, "a rejected reload changed the state");
    std::fs::remove_file(d.dir.join("policies/bad.yaml"))?;

    // Not HTTP at all (the old one-line protocol, garbage, a huge body): refused, state kept.
    let out = raw(&d, b"{\"op\":\"status\"}\n")?;
    ensure!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    let huge = format!(
        "POST /v1/agents HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        100_000,
        "x".repeat(100_000)
    );
    let out = raw(&d, huge.as_bytes())?;
    ensure!(out.starts_with("HTTP/1.1 413"), "{out:?}");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    let e: ApiError = serde_json::from_str(body).with_context(|| format!("{out:?}"))?;
    ensure!(e.error == "too-large", "{e}");
    // A body announced and never sent: 408 once the body time is up.
    let started = std::time::Instant::now();
    let out = raw(
        &d,
        b"POST /v1/tasks HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{\"agent\"",
    )?;
    ensure!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    ensure!(state(&d)? == before, "raw input changed the state");
    Ok(())
}

#[test]
fn a_caller_that_is_not_root_is_told_permission_denied_on_every_route() -> Result<()> {
    let (_cg, d) = started("api-nonroot")?;
    let before = state(&d)?;
    let commands: [&[&str]; 6] = [
        &["status"],
        &["reload"],
        &[
            "task", "start", "--agent", "a", "--id", "T", "--intent", "i",
        ],
        &[
            "grant",
            "--agent",
            "a",
            "--to",
            "127.0.0.1",
            "--ttl",
            "1m",
            "--reason",
            "r",
        ],
        &["grants"],
        &["revoke", "1"],
    ];
    // The socket is root's (0600): connect fails with EACCES.
    for args in commands {
        let msg = d.cli_as_nobody(args)?;
        ensure!(msg.contains("permission denied"), "{args:?}: {msg}");
        ensure!(!msg.contains("os error"), "{args:?}: {msg}");
    }
    // Opened up by mistake: the controller refuses the peer (403), whatever the route.
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666))?;
    for args in commands {
        let msg = d.cli_as_nobody(args)?;
        ensure!(
            msg.contains("(403)") && msg.contains("permission denied"),
            "{args:?}: {msg}"
        );
    }
    ensure!(state(&d)? == before, "a non-root caller changed the state");
    Ok(())
}
