//! The routes of the control API (v1) and the OpenAPI document generated from them. Each
//! handler validates its input, sends one typed command to the control actor and maps the
//! typed reply; a request refused here reaches the controller not at all.

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Body as HttpBody,
    extract::{FromRequest, Path, RawQuery, Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use bytes::Bytes;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use utoipa::OpenApi;

use super::{
    wire::{
        ApiError, ApplyBody, ApproveBody, Approved, Caller, DenyBody, EventsQuery, ExplainBody,
        Explanation, FromEventBody, GrantBody, GrantInfo, RegisterBody, Registered, Reloaded,
        RequestInfo, RequestState, Revoked, Status, StreamNotice, TaskEnded, TaskInfo,
        TaskStartBody,
    },
    MAX_REQUEST_BYTES, REQUEST_TIMEOUT,
};
use crate::{
    control::{self, Command, ControlError},
    sinks::{
        fanout::{Consumer, FanoutError, Item, Subscriber},
        Format,
    },
};

/// What a handler needs: the control actor, and who is calling (from the peer credentials).
#[derive(Clone)]
pub struct Ctx {
    pub commands: mpsc::Sender<Command>,
    pub caller: control::Caller,
    /// The live stream's fan-out (None: this controller serves no `/v1/events`).
    pub records: Option<Subscriber>,
    /// Set when this connection's answer is an event stream: it outlives the exchange timeout.
    pub streaming: Streaming,
}

/// Marks a connection as an event stream (see [`Ctx::streaming`]).
#[derive(Clone, Default)]
pub struct Streaming(Arc<AtomicBool>);

impl Streaming {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A stream with nothing to send says so this often: the consumer sees the stream is alive,
/// and a consumer gone away is found (the write fails) and released.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// The v1 routes; every unknown path or method answers the one JSON error shape.
pub fn router() -> Router<Ctx> {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/reload", post(reload))
        .route("/v1/policy/apply", post(apply_policy))
        .route("/v1/agents", post(register))
        .route("/v1/tasks", post(task_start))
        .route("/v1/tasks/{*agent}", delete(task_end))
        .route("/v1/grants", post(grant).get(grants))
        .route("/v1/grants/{id}", delete(revoke))
        .route("/v1/explain", post(explain))
        .route("/v1/events", get(events))
        .route("/v1/requests", get(requests).post(request_from_event))
        .route("/v1/requests/{id}", get(request))
        .route("/v1/requests/{id}/approve", post(approve))
        .route("/v1/requests/{id}/deny", post(deny))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// What a caller that is not root gets, whatever it asks.
pub fn refusing() -> Router {
    Router::new().fallback(|| async { ApiError::permission_denied() })
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such route (see docs/api.md)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not take that method (see docs/api.md)",
    )
}

/// A JSON body read within [`REQUEST_TIMEOUT`] and [`MAX_REQUEST_BYTES`], decoded with the
/// path of the field at fault in the error.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let read = axum::body::to_bytes(req.into_body(), MAX_REQUEST_BYTES);
        let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    "the request body did not arrive in time",
                ))
            }
            Ok(Err(_)) => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too-large",
                    format!("the request body is over {MAX_REQUEST_BYTES} bytes"),
                ))
            }
            Ok(Ok(b)) => b,
        };
        decode(&bytes).map(Body)
    }
}

/// Decodes a JSON body; the error names the field and the reason.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // A missing field is named in serde's message; the path is its parent.
        let missing = msg
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let field = match (missing, path.as_str()) {
            (Some(name), "." | "") => name.to_string(),
            (Some(name), parent) => format!("{parent}.{name}"),
            (None, "." | "") => "body".to_string(),
            (None, p) => p.to_string(),
        };
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid("body", format!("not valid JSON: {msg}"));
        }
        ApiError::invalid(field, msg)
    })
}

/// Sends one command and waits for its reply; a stopped controller is 503.
async fn call<T, E>(
    ctx: &Ctx,
    make: impl FnOnce(oneshot::Sender<Result<T, E>>) -> Command,
) -> Result<T, Result<E, ApiError>> {
    let (tx, rx) = oneshot::channel();
    ctx.commands
        .send(make(tx))
        .await
        .map_err(|_| Err(ApiError::unavailable()))?;
    match rx.await {
        Ok(r) => r.map_err(Ok),
        Err(_) => Err(Err(ApiError::unavailable())),
    }
}

/// A runtime command: typed errors map to their statuses.
async fn runtime<T>(
    ctx: &Ctx,
    make: impl FnOnce(control::RuntimeReply<T>) -> Command,
) -> Result<T, ApiError> {
    call(ctx, make)
        .await
        .map_err(|e| e.map_or_else(|e| e, |e: ControlError| e.into()))
}

/// Counters, policies, agents and kernel state.
#[utoipa::path(get, path = "/v1/status", tag = "controller",
    responses((status = 200, body = Status), (status = "4XX", body = ApiError), (status = "5XX", body = ApiError)))]
async fn status(State(ctx): State<Ctx>) -> Result<Json<Status>, ApiError> {
    call(&ctx, |reply| Command::Status { reply })
        .await
        .map(|v| Json(Status(v)))
        .map_err(|e| {
            e.map_or_else(
                |e| e,
                |m: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
            )
        })
}

/// Re-reads the policy directory; on any error the running policy stays (400, field `policy`,
/// the message names file:line:column).
#[utoipa::path(post, path = "/v1/reload", tag = "controller",
    responses((status = 200, body = Reloaded), (status = 400, body = ApiError), (status = "5XX", body = ApiError)))]
async fn reload(State(ctx): State<Ctx>) -> Result<Json<Reloaded>, ApiError> {
    call(&ctx, |reply| Command::Reload { reply })
        .await
        .map(|r| {
            Json(Reloaded {
                generation: r.generation,
            })
        })
        .map_err(|e| e.map_or_else(|e| e, |m: String| ApiError::invalid("policy", m)))
}

/// Applies a policy file or directory now, in one step per agent (as a reload does); an invalid
/// one is refused (400, field `policy`, the message names file:line:column) and the running
/// policy stays. The configured directory stays the one watched and re-read.
#[utoipa::path(post, path = "/v1/policy/apply", tag = "controller", request_body = ApplyBody,
    responses((status = 200, body = Reloaded), (status = 400, body = ApiError), (status = "5XX", body = ApiError)))]
async fn apply_policy(
    State(ctx): State<Ctx>,
    Body(body): Body<ApplyBody>,
) -> Result<Json<Reloaded>, ApiError> {
    body.validate()?;
    let origin = control::policy_watch::PolicyOrigin::Apply {
        caller: ctx.caller.clone(),
    };
    call(&ctx, |reply| Command::ApplyPolicy {
        path: Some(body.path),
        origin,
        reply,
    })
    .await
    .map(|r| {
        Json(Reloaded {
            generation: r.generation,
        })
    })
    .map_err(|e| e.map_or_else(|e| e, |m: String| ApiError::invalid("policy", m)))
}

/// Registers a cgroup as an agent (its policy found by selector), as `agentwall exec` does
/// before it runs the agent.
#[utoipa::path(post, path = "/v1/agents", tag = "controller", request_body = RegisterBody,
    responses((status = 200, body = Registered), (status = 400, body = ApiError), (status = "5XX", body = ApiError)))]
async fn register(
    State(ctx): State<Ctx>,
    Body(body): Body<RegisterBody>,
) -> Result<Json<Registered>, ApiError> {
    body.validate()?;
    call(&ctx, |reply| Command::Register {
        cgroup: body.cgroup,
        reply,
    })
    .await
    .map(|r| Json(r.into()))
    .map_err(|e| e.map_or_else(|e| e, |m: String| ApiError::invalid("cgroup", m)))
}

/// Sets an agent's current task: its records carry the task id and intent until it ends.
#[utoipa::path(post, path = "/v1/tasks", tag = "runtime", request_body = TaskStartBody,
    responses((status = 200, body = TaskInfo), (status = 400, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError), (status = "5XX", body = ApiError)))]
async fn task_start(
    State(ctx): State<Ctx>,
    Body(body): Body<TaskStartBody>,
) -> Result<Json<TaskInfo>, ApiError> {
    body.validate()?;
    let by = ctx.caller.clone();
    let req = body.into();
    runtime(&ctx, |reply| Command::TaskStart { req, by, reply })
        .await
        .map(|t| Json(t.into()))
}

/// Ends an agent's task and revokes its grants.
#[utoipa::path(delete, path = "/v1/tasks/{agent}", tag = "runtime",
    params(("agent" = String, Path, description = "Agent name or cgroup path")),
    responses((status = 200, body = TaskEnded), (status = 400, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = "5XX", body = ApiError)))]
async fn task_end(
    State(ctx): State<Ctx>,
    Path(agent): Path<String>,
) -> Result<Json<TaskEnded>, ApiError> {
    if agent.trim_matches('/').is_empty() {
        return Err(ApiError::invalid("agent", "must not be empty"));
    }
    let by = ctx.caller.clone();
    runtime(&ctx, |reply| Command::TaskEnd { agent, by, reply })
        .await
        .map(|t| Json(t.into()))
}

/// Grants an agent access to a destination until a deadline the kernel checks.
#[utoipa::path(post, path = "/v1/grants", tag = "runtime", request_body = GrantBody,
    responses((status = 200, body = GrantInfo), (status = 400, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError), (status = "5XX", body = ApiError)))]
async fn grant(
    State(ctx): State<Ctx>,
    Body(body): Body<GrantBody>,
) -> Result<Json<GrantInfo>, ApiError> {
    body.validate()?;
    let by = ctx.caller.clone();
    let req = body.into();
    runtime(&ctx, |reply| Command::Grant { req, by, reply })
        .await
        .map(|g| Json(g.into()))
}

/// The live grants.
#[utoipa::path(get, path = "/v1/grants", tag = "runtime",
    responses((status = 200, body = Vec<GrantInfo>), (status = "5XX", body = ApiError)))]
async fn grants(State(ctx): State<Ctx>) -> Result<Json<Vec<GrantInfo>>, ApiError> {
    runtime(&ctx, |reply| Command::Grants { reply })
        .await
        .map(|g| Json(g.into_iter().map(Into::into).collect()))
}

/// Ends a grant at once and destroys the live connections it allowed.
#[utoipa::path(delete, path = "/v1/grants/{id}", tag = "runtime",
    params(("id" = u64, Path, description = "The grant id")),
    responses((status = 200, body = Revoked), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = "5XX", body = ApiError)))]
async fn revoke(State(ctx): State<Ctx>, Path(id): Path<String>) -> Result<Json<Revoked>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid("id", format!("{id:?} is not a grant id (a number)")))?;
    let by = ctx.caller.clone();
    runtime(&ctx, |reply| Command::Revoke { id, by, reply })
        .await
        .map(|r| Json(r.into()))
}

/// What the kernel would decide now for an agent and a destination, and why: read from the live
/// maps with the kernel's own lookups; nothing is connected.
#[utoipa::path(post, path = "/v1/explain", tag = "runtime", request_body = ExplainBody,
    responses((status = 200, body = Explanation), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = "5XX", body = ApiError)))]
async fn explain(
    State(ctx): State<Ctx>,
    Body(body): Body<ExplainBody>,
) -> Result<Json<Explanation>, ApiError> {
    let req = body.request()?;
    runtime(&ctx, |reply| Command::Explain { req, reply })
        .await
        .map(|e| Json(e.into()))
}

/// A request id from the path, or a 400 naming `id`.
fn request_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::invalid("id", format!("{id:?} is not a request id (a number)")))
}

/// The pending requests for access, oldest first.
#[utoipa::path(get, path = "/v1/requests", tag = "approvals",
    responses((status = 200, body = Vec<RequestInfo>), (status = "5XX", body = ApiError)))]
async fn requests(State(ctx): State<Ctx>) -> Result<Json<Vec<RequestInfo>>, ApiError> {
    runtime(&ctx, |reply| Command::Requests { reply })
        .await
        .map(|r| Json(r.into_iter().map(Into::into).collect()))
}

/// Turns a denied connection record (its audit `seq`) into a pending request for that agent,
/// destination, port and protocol, checked as a grant would be. An allowed record or one that
/// is not a connect or send is 400 (`from_event`); one too old or unknown 404; over the
/// pending caps 429.
#[utoipa::path(post, path = "/v1/requests", tag = "approvals", request_body = FromEventBody,
    responses((status = 202, body = RequestInfo), (status = 400, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 429, body = ApiError), (status = "5XX", body = ApiError)))]
async fn request_from_event(
    State(ctx): State<Ctx>,
    Body(body): Body<FromEventBody>,
) -> Result<(StatusCode, Json<RequestInfo>), ApiError> {
    body.validate()?;
    let by = ctx.caller.clone();
    let req = body.into();
    runtime(&ctx, |reply| Command::RequestFromEvent { req, by, reply })
        .await
        .map(|r| (StatusCode::ACCEPTED, Json(r.into())))
}

/// One request, pending or decided (decided ones are kept a while for their agent to read).
#[utoipa::path(get, path = "/v1/requests/{id}", tag = "approvals",
    params(("id" = u64, Path, description = "The request id")),
    responses((status = 200, body = RequestInfo), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = "5XX", body = ApiError)))]
async fn request(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Json<RequestInfo>, ApiError> {
    let id = request_id(&id)?;
    let by = ctx.caller.clone();
    runtime(&ctx, |reply| Command::Request { id, by, reply })
        .await
        .map(|r| Json(r.into()))
}

/// Approves a pending request: a grant through the same path as `POST /v1/grants` (scope,
/// `max_grant_ttl`, the kernel's deadline). `ttl_secs` may shorten the requested ttl, never
/// lengthen it. A request no longer pending is 409; one the policy no longer allows is 403 and
/// stays pending.
#[utoipa::path(post, path = "/v1/requests/{id}/approve", tag = "approvals", request_body = ApproveBody,
    params(("id" = u64, Path, description = "The request id")),
    responses((status = 200, body = Approved), (status = 400, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError), (status = 409, body = ApiError), (status = "5XX", body = ApiError)))]
async fn approve(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    Body(body): Body<ApproveBody>,
) -> Result<Json<Approved>, ApiError> {
    let id = request_id(&id)?;
    body.validate()?;
    let (by, ttl_secs) = (ctx.caller.clone(), body.ttl_secs);
    runtime(&ctx, |reply| Command::Approve {
        id,
        ttl_secs,
        by,
        reply,
    })
    .await
    .map(|a| Json(a.into()))
}

/// Denies a pending request.
#[utoipa::path(post, path = "/v1/requests/{id}/deny", tag = "approvals", request_body = DenyBody,
    params(("id" = u64, Path, description = "The request id")),
    responses((status = 200, body = RequestInfo), (status = 400, body = ApiError), (status = 404, body = ApiError),
        (status = 409, body = ApiError), (status = "5XX", body = ApiError)))]
async fn deny(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
    Body(body): Body<DenyBody>,
) -> Result<Json<RequestInfo>, ApiError> {
    let id = request_id(&id)?;
    body.validate()?;
    let (by, reason) = (ctx.caller.clone(), body.reason);
    runtime(&ctx, |reply| Command::Deny {
        id,
        reason,
        by,
        reply,
    })
    .await
    .map(|r| Json(r.into()))
}

/// The records as they are written to the audit log, one JSON object a line (NDJSON, HTTP/1.1
/// chunked), from the moment the response starts until the client closes. Filters are query
/// parameters, applied by the controller; loss records pass every filter. A consumer that falls
/// behind loses records from its own stream only, and a `{"kind":"stream-dropped","count":N}`
/// line says how many before the next record; `{"kind":"stream-heartbeat"}` comes after 10 s
/// without output. A consumer never slows enforcement or the audit log. See docs/stream.md.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses(
        (status = 200, description = "NDJSON: audit records (or OCSF objects), and stream notices",
            content_type = "application/x-ndjson", body = StreamNotice),
        (status = 400, body = ApiError), (status = 429, body = ApiError),
        (status = "5XX", body = ApiError)))]
async fn events(State(ctx): State<Ctx>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let (filter, format) = EventsQuery::parse(raw.as_deref())?.validate()?;
    let fanout = ctx.records.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this controller serves no event stream",
        )
    })?;
    let consumer = fanout.consumer(filter).map_err(|e| match e {
        FanoutError::TooMany => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too-many", e.to_string())
        }
        FanoutError::Stopped => ApiError::unavailable(),
    })?;
    ctx.streaming.set();
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        HttpBody::from_stream(lines(consumer, format)),
    )
        .into_response())
}

/// A consumer's lines: records in `format`, drop notices, heartbeats; ends with the controller.
fn lines(
    consumer: Consumer,
    format: Format,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold(consumer, move |mut c| async move {
        loop {
            let item = match tokio::time::timeout(HEARTBEAT, c.next()).await {
                Ok(None) => return None,
                Ok(Some(i)) => Some(i),
                Err(_) => None,
            };
            if let Some(line) = line(item, format) {
                return Some((Ok(line), c));
            }
        }
    })
}

/// One line of a stream (None: heartbeat). A record that cannot be encoded is logged and left
/// out (it is in the audit log).
fn line(item: Option<Item>, format: Format) -> Option<Bytes> {
    let notice = |kind: &str, count| StreamNotice {
        kind: kind.into(),
        count,
    };
    let encoded = match item {
        None => serde_json::to_vec(&notice("stream-heartbeat", None)),
        Some(Item::Dropped(n)) => serde_json::to_vec(&notice("stream-dropped", Some(n))),
        Some(Item::Record(r)) => return encoded_record(format.line(&r)),
    };
    encoded_record(encoded.map(|mut v| {
        v.push(b'\n');
        v
    }))
}

fn encoded_record(encoded: serde_json::Result<Vec<u8>>) -> Option<Bytes> {
    match encoded {
        Ok(v) => Some(v.into()),
        Err(e) => {
            tracing::warn!("event stream: encoding a record: {e}");
            None
        }
    }
}

/// The OpenAPI document of this API (docs/openapi.json is this, checked by a test).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "agentwall control API",
        description = "HTTP/JSON on the admin Unix socket (root only, /run/agentwall/control.sock). \
            Every error has the ApiError shape.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        status, reload, apply_policy, register, task_start, task_end, grant, grants, revoke,
        explain, requests, request_from_event, request, approve, deny, events
    ),
    components(schemas(ApiError, Caller, RequestState, StreamNotice)),
    tags(
        (name = "controller", description = "Registration, policy reload, status"),
        (name = "runtime", description = "Tasks and just-in-time grants"),
        (name = "approvals", description = "Requests for access that wait for a person"),
        (name = "events", description = "The live stream of records")
    )
)]
pub struct ApiDoc;

/// The document as checked in: pretty JSON with a final newline.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    // The crate version would make the document change with every release.
    doc.info.version = "v1".into();
    let mut s = doc
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    s.push('\n');
    s
}
