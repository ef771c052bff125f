use axum::{body::Body as HttpBody, http::Request as HttpRequest};
use http_body_util::BodyExt;
use hyper::StatusCode;
use tokio::sync::mpsc;
use tower::ServiceExt;

use super::{
    routes::{self, decode, Ctx},
    wire::{self, ApiError, GrantBody, TaskStartBody},
};
use crate::control::{self, Command, ControlError};

#[test]
fn control_errors_map_to_statuses() {
    let cases = [
        (ControlError::invalid("to", "bad"), 400, "invalid"),
        (ControlError::NotFound("x".into()), 404, "not-found"),
        (ControlError::Refused("x".into()), 403, "refused"),
        (ControlError::Conflict("x".into()), 409, "conflict"),
        (ControlError::Internal("x".into()), 500, "internal"),
    ];
    for (e, status, kind) in cases {
        let a = ApiError::from(e);
        assert_eq!((a.status, a.error.as_str()), (status, kind));
    }
    let a = ApiError::from(ControlError::invalid("ttl_secs", "too long"));
    assert_eq!(a.field.as_deref(), Some("ttl_secs"));
    assert_eq!(a.message, "too long");
}

#[test]
fn a_bad_body_names_the_field_and_the_reason() {
    let field = |body: &str| decode::<GrantBody>(body.as_bytes()).unwrap_err();
    let ok = r#""agent":"a","to":"127.0.0.1/32","ttl_secs":5,"reason":"r""#;
    let e = field(&format!("{{{ok},\"colour\":1}}"));
    assert_eq!(e.field.as_deref(), Some("colour"), "{e}");
    assert!(e.message.contains("unknown field"), "{e}");
    let e = field(r#"{"agent":"a","to":"127.0.0.1/32","reason":"r"}"#);
    assert_eq!(e.field.as_deref(), Some("ttl_secs"), "{e}");
    assert!(e.message.contains("missing field"), "{e}");
    let e = field(r#"{"agent":"a","to":"127.0.0.1/32","ttl_secs":"5m","reason":"r"}"#);
    assert_eq!(e.field.as_deref(), Some("ttl_secs"), "{e}");
    assert!(e.message.contains("invalid type"), "{e}");
    let e = field("{\"agent\":");
    assert_eq!(e.field.as_deref(), Some("body"), "{e}");
    assert!(e.message.contains("not valid JSON"), "{e}");
    assert_eq!(e.status, 400);
    assert!(decode::<GrantBody>(format!("{{{ok}}}").as_bytes()).is_ok());
}

#[test]
fn bodies_are_validated_field_by_field() {
    let grant = || GrantBody {
        agent: "a".into(),
        to: "127.0.0.1/32".into(),
        ports: None,
        protocol: None,
        ttl_secs: 60,
        task: None,
        reason: "r".into(),
    };
    assert!(grant().validate().is_ok());
    type Spoil = fn(&mut GrantBody);
    let checks: [(Spoil, &str); 6] = [
        (|g| g.agent = " ".into(), "agent"),
        (|g| g.to = "example.com".into(), "to"),
        (|g| g.protocol = Some("icmp".into()), "protocol"),
        (|g| g.ttl_secs = 0, "ttl_secs"),
        (|g| g.reason = String::new(), "reason"),
        (|g| g.ports = Some(String::new()), "ports"),
    ];
    for (spoil, field) in checks {
        let mut g = grant();
        spoil(&mut g);
        let e = g.validate().unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
    }
    let task = TaskStartBody {
        agent: "a".into(),
        id: String::new(),
        intent: "i".into(),
        ttl_secs: Some(0),
    };
    assert_eq!(task.validate().unwrap_err().field.as_deref(), Some("id"));
}

#[test]
fn mirrors_serialize_as_the_controller_types() {
    let by = control::Caller::Admin { uid: 0 };
    let g = control::GrantInfo {
        id: 7,
        agent: "a".into(),
        to: "127.0.0.1/32".into(),
        ports: "443".into(),
        protocol: "tcp".into(),
        expires: "2026-01-01T00:00:00Z".into(),
        task: Some("T".into()),
        reason: "r".into(),
        by: by.clone(),
    };
    assert_eq!(
        serde_json::to_value(wire::GrantInfo::from(g.clone())).unwrap(),
        serde_json::to_value(g).unwrap()
    );
    let t = control::TaskInfo {
        agent: "a".into(),
        id: "T".into(),
        intent: "i".into(),
        started: "s".into(),
        expires: None,
        slot: 3,
        by,
    };
    assert_eq!(
        serde_json::to_value(wire::TaskInfo::from(t.clone())).unwrap(),
        serde_json::to_value(t).unwrap()
    );
}

/// A stand-in controller: answers every runtime command with `Conflict("seen <what>")` and
/// counts the commands it got.
fn fake() -> (Ctx, tokio::task::JoinHandle<usize>) {
    let (tx, mut rx) = mpsc::channel(8);
    let task = tokio::spawn(async move {
        let mut n = 0;
        while let Some(c) = rx.recv().await {
            n += 1;
            fn err<T>(what: &str) -> Result<T, ControlError> {
                Err(ControlError::Conflict(format!("seen {what}")))
            }
            match c {
                Command::Status { reply } => {
                    let _ = reply.send(Ok(serde_json::json!({ "agents": [] })));
                }
                Command::Reload { reply } => {
                    let _ = reply.send(Err("p.yaml:3:1: bad".into()));
                }
                Command::Register { reply, .. } => {
                    let _ = reply.send(Err("no policy selects it".into()));
                }
                Command::TaskStart { req, reply, .. } => {
                    let _ = reply.send(err(&format!("task {}", req.id)));
                }
                Command::TaskEnd { agent, reply, .. } => {
                    let _ = reply.send(err(&format!("end {agent}")));
                }
                Command::Grant { req, reply, .. } => {
                    let _ = reply.send(err(&format!("grant {}", req.to)));
                }
                Command::Grants { reply } => {
                    let _ = reply.send(err("grants"));
                }
                Command::Revoke { id, reply, .. } => {
                    let _ = reply.send(err(&format!("revoke {id}")));
                }
                // Commands of other routes: dropped unanswered.
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        n
    });
    let ctx = Ctx {
        commands: tx,
        caller: control::Caller::Admin { uid: 0 },
        records: None,
        streaming: Default::default(),
    };
    (ctx, task)
}

async fn send(ctx: &Ctx, method: &str, uri: &str, body: &str) -> (u16, serde_json::Value) {
    let req = HttpRequest::builder()
        .method(method)
        .uri(uri)
        .body(HttpBody::from(body.to_string()))
        .unwrap();
    let resp = routes::router()
        .with_state(ctx.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn routes_reach_the_controller_and_map_its_errors() {
    let (ctx, task) = fake();
    let grant = r#"{"agent":"a","to":"127.0.0.1","ttl_secs":5,"reason":"r"}"#;
    let task_start = r#"{"agent":"a","id":"T","intent":"i"}"#;
    let cases = [
        ("GET", "/v1/status", "", 200, ""),
        ("POST", "/v1/reload", "", 400, "p.yaml:3:1"),
        ("POST", "/v1/agents", r#"{"cgroup":"/x"}"#, 400, "no policy"),
        ("POST", "/v1/tasks", task_start, 409, "seen task T"),
        ("DELETE", "/v1/tasks/a", "", 409, "seen end a"),
        ("DELETE", "/v1/tasks/agents/a", "", 409, "seen end agents/a"),
        (
            "DELETE",
            "/v1/tasks//sys/fs/cgroup/a",
            "",
            409,
            "seen end /sys/fs/cgroup/a",
        ),
        ("DELETE", "/v1/tasks/a%20b", "", 409, "seen end a b"),
        ("POST", "/v1/grants", grant, 409, "seen grant 127.0.0.1"),
        ("GET", "/v1/grants", "", 409, "seen grants"),
        ("DELETE", "/v1/grants/42", "", 409, "seen revoke 42"),
    ];
    for (method, uri, body, status, says) in cases {
        let (s, v) = send(&ctx, method, uri, body).await;
        assert_eq!(s, status, "{method} {uri}: {v}");
        if !says.is_empty() {
            assert!(v["message"].as_str().unwrap().contains(says), "{uri}: {v}");
        }
    }
    drop(ctx);
    assert_eq!(task.await.unwrap(), cases.len());
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field_and_reaches_nothing() {
    let (ctx, task) = fake();
    let cases = [
        ("POST", "/v1/agents", r#"{"cgroup":"rel/x"}"#, "cgroup"),
        ("POST", "/v1/agents", r#"{"cgroup":"/x","y":1}"#, "y"),
        ("POST", "/v1/tasks", r#"{"agent":"a","id":"T"}"#, "intent"),
        (
            "POST",
            "/v1/tasks",
            r#"{"agent":"a","id":"T","intent":"i","ttl_secs":-1}"#,
            "ttl_secs",
        ),
        (
            "POST",
            "/v1/grants",
            r#"{"agent":"a","to":"10.0.0.0/33","ttl_secs":5,"reason":"r"}"#,
            "to",
        ),
        ("POST", "/v1/grants", "not json", "body"),
        ("DELETE", "/v1/grants/seven", "", "id"),
    ];
    for (method, uri, body, field) in cases {
        let (s, v) = send(&ctx, method, uri, body).await;
        assert_eq!(s, 400, "{method} {uri} {body}: {v}");
        assert_eq!(v["error"], "invalid", "{v}");
        assert_eq!(v["field"], field, "{method} {uri} {body}: {v}");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    let (s, v) = send(&ctx, "GET", "/v1/nothing", "").await;
    assert_eq!((s, v["error"].as_str()), (404, Some("not-found")));
    let (s, v) = send(&ctx, "PUT", "/v1/grants", "").await;
    assert_eq!((s, v["error"].as_str()), (405, Some("method-not-allowed")));
    let big = format!(
        r#"{{"cgroup":"/{}"}}"#,
        "x".repeat(super::MAX_REQUEST_BYTES)
    );
    let (s, v) = send(&ctx, "POST", "/v1/agents", &big).await;
    assert_eq!((s, v["error"].as_str()), (413, Some("too-large")));
    drop(ctx);
    assert_eq!(task.await.unwrap(), 0, "bad input reached the controller");
}

#[tokio::test]
async fn a_caller_that_is_not_root_is_refused_everywhere() {
    for uri in ["/v1/status", "/v1/grants", "/v1/anything"] {
        let req = HttpRequest::builder()
            .uri(uri)
            .body(HttpBody::empty())
            .unwrap();
        let resp = routes::refusing().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let e: ApiError = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(e.error, "permission-denied");
        assert!(e.message.contains("permission denied"));
    }
}

/// docs/openapi.json is generated from the code; CI fails when it is stale.
#[test]
fn openapi_document_is_up_to_date() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let now = routes::openapi_json();
    if std::env::var_os("AGENTWALL_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &now).expect("writing docs/openapi.json");
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == now,
        "docs/openapi.json is stale: regenerate it with \
         `AGENTWALL_UPDATE_OPENAPI=1 cargo test -p agent-userspace openapi_document_is_up_to_date`"
    );
    for route in [
        "/v1/status",
        "/v1/reload",
        "/v1/agents",
        "/v1/tasks",
        "/v1/tasks/{agent}",
        "/v1/grants",
        "/v1/grants/{id}",
    ] {
        assert!(
            now.contains(&format!("\"{route}\"")),
            "{route} undocumented"
        );
    }
}

#[tokio::test]
async fn event_stream_filters_are_checked_before_a_stream_opens() {
    let (ctx, _task) = fake();
    for (uri, field) in [
        ("/v1/events?decision=maybe", "decision"),
        ("/v1/events?dst=10.0.0.0/33", "dst"),
        ("/v1/events?agent=", "agent"),
        ("/v1/events?format=xml", "format"),
        ("/v1/events?nope=1", "nope"),
        ("/v1/events?task=a&task=b", "task"),
    ] {
        let (status, v) = send(&ctx, "GET", uri, "").await;
        assert_eq!(
            (status, v["field"].as_str()),
            (400, Some(field)),
            "{uri}: {v}"
        );
    }
    // Valid, but this controller serves no stream.
    let (status, v) = send(&ctx, "GET", "/v1/events?decision=deny&dst=::1", "").await;
    assert_eq!(status, 503, "{v}");
}
