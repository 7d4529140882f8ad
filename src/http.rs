//! The HTTP shell around the schema: `POST /graphql` (single and batch requests), GraphiQL at `GET /` and
//! `GET /graphql`, `GET /health` (alive), `GET /ready` (the store answers) and `GET /metrics` (Prometheus);
//! the REST routes (`rest`) and the exports (`export`) are merged in and share the admission steps defined
//! here; a WebSocket upgrade of `GET /graphql` (subscriptions) goes to `websocket`.
//! GraphiQL's scripts and styles are compiled into the binary and served from `/graphiql/`, so the page works
//! without internet access.
//!
//! Before any GraphQL runs, this layer checks what GraphQL cannot: the API key, the body's size and type,
//! and the number of operations in a batch. Its refusals have the same `{"errors": [...]}` shape, with a
//! code, and an HTTP status that matches.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::BatchRequest;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use sha2::Digest;

use crate::admission::{Admission, ClientId, Refusal, Ticket};
use crate::auth::{ApiKeys, Caller, KeyRing};
use crate::execution::{Executed, Executor};
use crate::hosts::AllowedHosts;
use crate::schema::{self, Limits};
use crate::service::DialogService;

#[derive(Clone)]
pub struct AppState {
    pub executor: Arc<Executor>,
    pub service: Arc<DialogService>,
    pub limits: Limits,
    pub api_keys: KeyRing,
    pub max_batch_operations: usize,
    pub max_body_bytes: usize,
    /// Bytes of all the answers of one request together.
    pub max_response_bytes: usize,
    /// Keyless: the hosts served (DNS rebinding). None with keys: the key is the protection.
    pub keyless_hosts: Option<Arc<AllowedHosts>>,
    /// Per-client limits; None when both are off.
    pub admission: Option<Arc<Admission>>,
    /// Exports that may run at once (see `export`).
    pub exports: Arc<tokio::sync::Semaphore>,
    /// Web pages that may call the service (CORS_ALLOWED_ORIGINS), also checked on WebSocket upgrades.
    pub allowed_origins: Arc<crate::cors::AllowedOrigins>,
}

pub fn router(state: AppState, graphiql: bool, cors: &crate::cors::AllowedOrigins) -> Router {
    // GET: queries for JSON clients (GraphQL over HTTP); a browser asking for HTML gets GraphiQL.
    let mut graphql_route = if graphiql {
        get(graphql_get_or_graphiql).post(graphql)
    } else {
        get(graphql_get).post(graphql)
    };
    // Only on /graphql, the REST routes and the exports (see `rest::routes`, `export::routes`), and only
    // when origins are allowed: every push would pay for a layer.
    if let Some(layer) = cors.layer() {
        graphql_route = graphql_route.layer(layer);
    }
    let mut router = Router::new()
        .route("/graphql", graphql_route)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(crate::rest::routes(cors))
        .merge(crate::export::routes(cors))
        .fallback(crate::rest::no_such_route);
    if graphiql {
        router = router
            .route("/", get(graphiql_page))
            .route("/graphiql/{file}", get(graphiql_asset));
    }
    router.with_state(state)
}

/// A request refused before the service is asked: its status, code and advice. GraphQL routes answer it in
/// GraphQL's error shape ([`reject`]), the REST routes as problem details (`rest`).
#[derive(Debug)]
pub(crate) struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds to wait before retrying (`Retry-After`).
    pub retry_after: Option<u64>,
}

impl Rejection {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The headers that go with the refusal whatever its body's shape.
    pub(crate) fn add_headers(&self, response: &mut Response) {
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dataapi\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot carry another request: say so,
            // or the client may send its next one on it as it closes.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// What every route but the probes passes first: the host check (keyless only), then the per-client
/// limits; the ticket counts the request as in flight until dropped. Called by the handlers themselves:
/// as a middleware layer it cost every push a fifth of its throughput (BENCHMARKS.md).
pub(crate) fn guard(
    state: &AppState,
    parts: &axum::http::request::Parts,
) -> Result<Option<Ticket>, Rejection> {
    if let Some(refusal) = check_host(state, &parts.headers, &parts.uri) {
        return Err(refusal);
    }
    admit_client(state, parts)
}

/// Applies the per-client limits (see `admission`): 429 with `Retry-After` past them.
fn admit_client(
    state: &AppState,
    parts: &axum::http::request::Parts,
) -> Result<Option<Ticket>, Rejection> {
    let Some(admission) = &state.admission else {
        return Ok(None);
    };
    let valid_key = bearer(&parts.headers)
        .and_then(|key| state.api_keys.current().identify(key))
        .map(|(_, id)| ClientId::Key(id));
    let client = valid_key.unwrap_or_else(|| {
        ClientId::Address(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |info| info.0.ip()),
        )
    });
    let limits = admission.limits();
    match admission.admit(client) {
        Ok(ticket) => Ok(Some(ticket)),
        Err(refusal) => {
            let (retry_after, message) = match refusal {
                Refusal::Rate { retry_after } => (
                    retry_after,
                    format!(
                        "this client sent more than {} requests per second (CLIENT_REQUESTS_PER_SECOND; \
                         bursts up to {}, CLIENT_BURST): wait {} ms, then send fewer, or more per request \
                         (pushMessages, batches)",
                        limits.requests_per_second,
                        limits.burst,
                        retry_after.as_millis().max(1)
                    ),
                ),
                Refusal::Concurrency => (
                    Duration::from_secs(1),
                    format!(
                        "this client has {} requests in flight already (CLIENT_CONCURRENT_REQUESTS): wait \
                         for answers before sending more",
                        limits.concurrent_requests
                    ),
                ),
            };
            let mut rejection =
                Rejection::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", message);
            // Whole seconds, rounded up: a client that waits as told is let in.
            rejection.retry_after =
                Some(retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0));
            Err(rejection)
        }
    }
}

/// The key of an `Authorization: Bearer KEY` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Without keys, serves only requests that name a loopback host (or an allowed one): see `hosts`; the
/// refusal, if any. The probes stay open to any host, as load balancers send their own (or none), and they
/// reveal nothing.
fn check_host(state: &AppState, headers: &HeaderMap, uri: &axum::http::Uri) -> Option<Rejection> {
    let allowed = state.keyless_hosts.as_ref()?;
    // HTTP/1.1 names it in `Host`, HTTP/2 in the URI's authority.
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| uri.authority().map(|authority| authority.as_str()));
    match host {
        Some(host) if allowed.admits(host) => None,
        _ => Some(Rejection::new(
            StatusCode::FORBIDDEN,
            "HOST_NOT_ALLOWED",
            "without API keys this service only answers requests for a loopback host (localhost, \
             127.0.0.1, [::1]), so that web pages cannot reach it through a browser: open it as \
             http://localhost:PORT, list this host name in ALLOWED_HOSTS, or configure API_KEYS",
        )),
    }
}

/// Counts an error returned to a client, by its code.
pub(crate) fn count_error(state: &AppState, code: &str) {
    state
        .service
        .metrics()
        .errors
        .with_label_values(&[code])
        .inc();
}

/// A refusal in GraphQL's error shape, counted in the error metrics.
fn refuse(state: &AppState, status: StatusCode, code: &'static str, message: &str) -> Response {
    reject(state, Rejection::new(status, code, message))
}

/// A [`Rejection`] in GraphQL's error shape, counted in the error metrics.
pub(crate) fn reject(state: &AppState, rejection: Rejection) -> Response {
    count_error(state, rejection.code);
    let body = json!({ "errors": [{
        "message": rejection.message,
        "extensions": { "code": rejection.code },
    }] });
    let mut response = (rejection.status, axum::Json(body)).into_response();
    rejection.add_headers(&mut response);
    response
}

/// The media type of a GraphQL answer, chosen from the request's `Accept` as GraphQL over HTTP says:
/// `application/graphql-response+json` when the client accepts it (then a request refused before execution
/// is answered 400), else `application/json` (always 200 for GraphQL errors; also without `Accept`, for
/// clients written before the new type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseMedia {
    GraphqlResponse,
    Json,
}

impl ResponseMedia {
    /// `None`: the client accepts neither (406).
    fn negotiate(headers: &HeaderMap) -> Option<Self> {
        let Some(accept) = headers.get(header::ACCEPT) else {
            return Some(Self::Json);
        };
        let accept = accept.to_str().ok()?;
        let (mut graphql, mut json) = (false, false);
        for range in accept.split(',') {
            let mut parameters = range.split(';');
            let media = parameters.next().unwrap_or_default().trim();
            let refused = parameters
                .filter_map(|parameter| parameter.trim().strip_prefix("q="))
                .any(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0));
            if refused {
                continue;
            }
            if media.eq_ignore_ascii_case("application/graphql-response+json") {
                graphql = true;
            } else if ["application/json", "application/*", "*/*"]
                .iter()
                .any(|accepted| media.eq_ignore_ascii_case(accepted))
            {
                json = true;
            }
        }
        if graphql {
            Some(Self::GraphqlResponse)
        } else if json {
            Some(Self::Json)
        } else {
            None
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::GraphqlResponse => "application/graphql-response+json; charset=utf-8",
            Self::Json => "application/json; charset=utf-8",
        }
    }
}

/// Parses a JSON request body: one operation, or a batch (a list). Straight into the request type: the
/// generic untagged `BatchRequest` would first copy the whole body into an intermediate tree to find out
/// which one it is, for every push.
fn parse_batch(body: &[u8]) -> serde_json::Result<BatchRequest> {
    match body.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(body).map(BatchRequest::Batch),
        _ => serde_json::from_slice(body).map(BatchRequest::Single),
    }
}

/// Whether reading a body failed because it passed the size limit (and not because it broke off).
fn is_over_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Who is calling, and their name in audit records: open access when no keys are configured, else the
/// role of a valid bearer key (named `ROLE:KEYID`).
pub(crate) fn caller(keys: &ApiKeys, headers: &HeaderMap) -> Option<(Caller, schema::CallerName)> {
    if keys.is_empty() {
        return Some((Caller::Open, schema::CallerName("open".to_owned())));
    }
    let (role, id) = keys.identify(bearer(headers)?)?;
    Some((
        Caller::Key(role),
        schema::CallerName(format!("{role}:{}", hex::encode(id))),
    ))
}

/// A GraphQL request that passed the checks before its operations are read.
struct Admitted {
    /// Counts the request as in flight until dropped.
    _ticket: Option<Ticket>,
    media: ResponseMedia,
    caller: Caller,
    caller_name: schema::CallerName,
}

/// What POST and GET requests to `/graphql` pass first: the host check and the client limits, an acceptable
/// media type for the answer, and a valid key (when keys are configured).
fn admit(state: &AppState, parts: &axum::http::request::Parts) -> Result<Admitted, Rejection> {
    let ticket = guard(state, parts)?;
    let Some(media) = ResponseMedia::negotiate(&parts.headers) else {
        return Err(Rejection::new(
            StatusCode::NOT_ACCEPTABLE,
            "NOT_ACCEPTABLE",
            "answers are application/graphql-response+json or application/json: accept one of them",
        ));
    };
    let (caller, caller_name) = authenticate(state, &parts.headers)?;
    Ok(Admitted {
        _ticket: ticket,
        media,
        caller,
        caller_name,
    })
}

/// The caller of a request, or 401 when keys are configured and no valid one was sent.
pub(crate) fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Caller, schema::CallerName), Rejection> {
    caller(&state.api_keys.current(), headers).ok_or_else(|| {
        Rejection::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "send a valid API key as `Authorization: Bearer <key>`",
        )
    })
}

/// Refuses a body that is not declared as JSON (415). Besides naming the format, it keeps web pages out:
/// a browser sends `application/json` across origins only after a CORS preflight, which this service
/// answers only for the origins in CORS_ALLOWED_ORIGINS.
pub(crate) fn require_json(headers: &HeaderMap, what: &str) -> Result<(), Rejection> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if declared
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
    {
        Ok(())
    } else {
        Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            format!("send {what} as JSON, with Content-Type: application/json"),
        ))
    }
}

/// Reads a request body of at most MAX_BODY_BYTES: a larger one is refused (413) before it is read, when
/// its length is declared, or as soon as it passes the limit.
pub(crate) async fn read_body(
    state: &AppState,
    parts: &axum::http::request::Parts,
    body: Body,
) -> Result<axum::body::Bytes, Rejection> {
    let too_large = || {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!(
                "the request body is larger than {} bytes (MAX_BODY_BYTES): send fewer operations or \
                 smaller messages per request",
                state.max_body_bytes
            ),
        )
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > state.max_body_bytes as u64) {
        return Err(too_large());
    }
    match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(bytes) => Ok(bytes),
        Err(error) if is_over_limit(&error) => Err(too_large()),
        // A malformed chunk, or a client that went away mid-body: nothing was read to act on.
        Err(error) => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("the request body could not be read ({error}): send the request again"),
        )),
    }
}

async fn graphql(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Admitted {
        _ticket,
        media,
        caller,
        caller_name,
    } = match admit(&state, &parts) {
        Ok(admitted) => admitted,
        Err(refusal) => return reject(&state, refusal),
    };
    if let Err(refusal) = require_json(&parts.headers, "the GraphQL request") {
        return reject(&state, refusal);
    }
    let bytes = match read_body(&state, &parts, body).await {
        Ok(bytes) => bytes,
        Err(refusal) => return reject(&state, refusal),
    };
    let request = match parse_batch(&bytes) {
        Ok(request) => request,
        Err(error) => {
            return refuse(
                &state,
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!(
                    "the request is not a valid GraphQL request ({error}): send a JSON body like \
                     {{\"query\": \"{{ __typename }}\"}}"
                ),
            );
        }
    };
    let is_batch = matches!(request, BatchRequest::Batch(_));
    let operations = match request {
        BatchRequest::Single(operation) => vec![operation],
        BatchRequest::Batch(operations) if operations.is_empty() => {
            return refuse(
                &state,
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "the batch holds no operation",
            );
        }
        BatchRequest::Batch(operations) if operations.len() > state.max_batch_operations => {
            return refuse(
                &state,
                StatusCode::BAD_REQUEST,
                "BATCH_TOO_LARGE",
                &format!(
                    "the batch holds {} operations, more than MAX_BATCH_OPERATIONS ({}): split it",
                    operations.len(),
                    state.max_batch_operations
                ),
            );
        }
        BatchRequest::Batch(operations) => operations,
    };

    answer(&state, media, caller, caller_name, operations, is_batch).await
}

/// The parameters of a GraphQL request sent with GET, URL-encoded; `variables` and `extensions` are JSON.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct GetParameters {
    query: Option<String>,
    operation_name: Option<String>,
    variables: Option<String>,
    extensions: Option<String>,
}

/// `GET /graphql` with GraphiQL on: a browser (asking for HTML), or anyone sending no query, gets the page;
/// any other client's query runs.
async fn graphql_get_or_graphiql(state: State<AppState>, request: Request) -> Response {
    if crate::websocket::is_upgrade(request.headers()) {
        return crate::websocket::upgrade(state.0, request).await;
    }
    let has_query = request.uri().query().is_some_and(|parameters| {
        parameters
            .split('&')
            .any(|pair| pair == "query" || pair.starts_with("query="))
    });
    if !has_query || accepts_html(request.headers()) {
        graphiql_page(state, request).await
    } else {
        graphql_get(state, request).await
    }
}

/// Whether the client lists `text/html` as acceptable (browsers do; API clients do not).
fn accepts_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parameters = range.split(';');
            parameters
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/html"))
                && !parameters.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
                })
        })
}

/// A query sent with GET (GraphQL over HTTP): the same checks and answer as POST, for one operation given
/// in the URL; a mutation is refused with 405 (a GET must not change anything: caches and prefetchers
/// repeat it).
async fn graphql_get(State(state): State<AppState>, request: Request) -> Response {
    if crate::websocket::is_upgrade(request.headers()) {
        return crate::websocket::upgrade(state, request).await;
    }
    let (parts, _) = request.into_parts();
    let Admitted {
        _ticket,
        media,
        caller,
        caller_name,
    } = match admit(&state, &parts) {
        Ok(admitted) => admitted,
        Err(refusal) => return reject(&state, refusal),
    };
    let bad = |message: &str| refuse(&state, StatusCode::BAD_REQUEST, "BAD_REQUEST", message);
    let Ok(axum::extract::Query(parameters)) =
        axum::extract::Query::<GetParameters>::try_from_uri(&parts.uri)
    else {
        return bad(
            "the URL's parameters are not valid URL encoding: encode query, variables and extensions",
        );
    };
    let Some(query) = parameters.query else {
        // Only reached with GraphiQL off (with it on, such a GET gets the page): the page is not served.
        let mut response = refuse(
            &state,
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "GraphiQL is switched off (GRAPHIQL=false): send queries with POST, or with GET and a `query` \
             parameter (the URL-encoded document)",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    };
    let mut operation = async_graphql::Request::new(query);
    if let Some(name) = parameters.operation_name {
        operation = operation.operation_name(name);
    }
    if let Some(variables) = parameters.variables.filter(|v| v.trim() != "null") {
        match serde_json::from_str::<async_graphql::Variables>(&variables) {
            Ok(variables) => operation = operation.variables(variables),
            Err(error) => {
                return bad(&format!(
                    "the `variables` parameter is not a JSON object ({error}): send URL-encoded JSON"
                ));
            }
        }
    }
    if let Some(extensions) = parameters.extensions.filter(|e| e.trim() != "null") {
        match serde_json::from_str(&extensions) {
            Ok(extensions) => operation.extensions = extensions,
            Err(error) => {
                return bad(&format!(
                    "the `extensions` parameter is not a JSON object ({error}): send URL-encoded JSON"
                ));
            }
        }
    }
    if crate::execution::selects_mutation(&operation.query, operation.operation_name.as_deref()) {
        let mut response = refuse(
            &state,
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "mutations are sent with POST, never GET",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    answer(&state, media, caller, caller_name, vec![operation], false).await
}

/// Runs a request's operations and writes the answer: for POST (one operation or a batch) and GET (one).
async fn answer(
    state: &AppState,
    media: ResponseMedia,
    caller: Caller,
    caller_name: schema::CallerName,
    operations: Vec<async_graphql::Request>,
    is_batch: bool,
) -> Response {
    // In order, one after another (async-graphql would run them concurrently): a batch that pushes
    // messages and then gives consent must see its own pushes.
    let mut responses = Vec::with_capacity(operations.len());
    let metrics = state.service.metrics();
    // One allowance for the whole request, batch or not.
    let allowance = schema::RequestAllowance::new(state.limits);
    for mut operation in operations {
        operation.data.insert(caller);
        operation.data.insert(schema::request_loader(
            state.service.clone(),
            state.limits,
            allowance.clone(),
        ));
        operation.data.insert(allowance.clone());
        operation.data.insert(caller_name.clone());
        let started = std::time::Instant::now();
        let executed = state.executor.execute(operation, &allowance).await;
        metrics
            .operations
            .with_label_values(&[&executed.label])
            .inc();
        metrics
            .operation_seconds
            .with_label_values(&[&executed.label])
            .observe(started.elapsed().as_secs_f64());
        responses.push(executed);
    }

    let codes: Vec<String> = responses
        .iter()
        .flat_map(|executed| &executed.errors)
        .filter_map(|error| {
            let code = error.extensions.as_ref()?.get("code")?;
            match code {
                async_graphql::Value::String(code) => Some(code.clone()),
                _ => None,
            }
        })
        .collect();
    for code in &codes {
        count_error(state, code);
    }
    // A status other than 200 only when nothing succeeded: a client or proxy that retries on 503 must not
    // repeat the parts of a request that did succeed.
    let nothing_succeeded = responses.iter().all(|executed| !executed.has_data);
    let status = if nothing_succeeded {
        status_for(&codes).or_else(|| {
            // GraphQL over HTTP: with its own media type, a request refused before execution is 400.
            (media == ResponseMedia::GraphqlResponse
                && !is_batch
                && responses.iter().all(|executed| executed.request_error))
            .then_some(StatusCode::BAD_REQUEST)
        })
    } else {
        None
    };
    // Each operation's answer is written once, here; one that would pass MAX_RESPONSE_BYTES (all the
    // batch's answers together) is replaced by an error saying so, the others are kept: a batch's
    // mutations that succeeded must be reported as such.
    let mut body = Vec::new();
    if is_batch {
        body.push(b'[');
    }
    for (index, Executed { json, .. }) in responses.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        let start = body.len();
        let written = json.len();
        if start + written <= state.max_response_bytes {
            body.extend_from_slice(json);
        } else {
            count_error(state, "RESPONSE_TOO_LARGE");
            let refusal = json!({ "errors": [{
                "message": format!(
                    "the answer is {written} bytes, more than MAX_RESPONSE_BYTES ({}) allows: ask for \
                     fewer items (first), fewer fields, or page through one dialog's messages with \
                     messages(filter: {{dialogId: …}}, first: …)",
                    state.max_response_bytes
                ),
                "extensions": { "code": "RESPONSE_TOO_LARGE" },
            }] });
            serde_json::to_writer(&mut body, &refusal).expect("JSON serializes");
        }
    }
    if is_batch {
        body.push(b']');
    }
    let mut response = ([(header::CONTENT_TYPE, media.content_type())], body).into_response();
    if let Some(status) = status {
        *response.status_mut() = status;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
    }
    response
}

/// The HTTP status that says what the errors of a request that produced no data mean, where one does: a
/// refused role is 403, and a full buffer or an unavailable buffer or database is 503 (retry later). Other errors
/// keep GraphQL's 200.
fn status_for(codes: &[String]) -> Option<StatusCode> {
    if codes.iter().any(|code| code == "FORBIDDEN") {
        Some(StatusCode::FORBIDDEN)
    } else if codes.iter().any(|code| code == "UNAUTHENTICATED") {
        Some(StatusCode::UNAUTHORIZED)
    } else if codes.iter().any(|code| {
        matches!(
            code.as_str(),
            "BUFFER_FULL" | "BUFFER_UNAVAILABLE" | "STORE_UNAVAILABLE"
        )
    }) {
        Some(StatusCode::SERVICE_UNAVAILABLE)
    } else {
        None
    }
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Ready when the store and the buffer answer a ping; load balancers stop sending traffic otherwise.
async fn ready(State(state): State<AppState>) -> Response {
    let (store, buffer) = tokio::join!(state.service.store().ping(), state.service.buffer().ping());
    let mut reasons = Vec::new();
    if let Err(error) = store {
        tracing::warn!(%error, "readiness check: the store does not answer");
        reasons.push("the database does not answer");
    }
    if let Err(error) = buffer {
        tracing::warn!(%error, "readiness check: the buffer does not answer");
        reasons.push("the dialog buffer (Redis) does not answer");
    }
    if reasons.is_empty() {
        return axum::Json(json!({ "status": "ready" })).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "status": "unavailable", "reason": reasons.join("; ") })),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    let _ticket = match guard(&state, &parts) {
        Ok(ticket) => ticket,
        Err(refusal) => return reject(&state, refusal),
    };
    let metrics = state.service.metrics();
    // With a shared buffer these are the whole buffer's, the same on every replica. If it does not answer,
    // the gauges keep their last values.
    if let Ok(buffer) = state.service.buffer().stats().await {
        metrics.buffer_dialogs.set(buffer.dialogs as i64);
        metrics.buffer_messages.set(buffer.messages as i64);
        metrics.buffer_bytes.set(buffer.bytes as i64);
    }
    metrics
        .live_subscriptions
        .set(state.service.live().open_subscriptions() as i64);
    let scrub = state.service.store().scrub_status();
    metrics.store_scrub_pending.set(i64::from(scrub.pending));
    let counted = metrics.store_scrub_failures.get();
    metrics
        .store_scrub_failures
        .inc_by(scrub.failures.saturating_sub(counted));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        Body::from(metrics.render()),
    )
        .into_response()
}

const GRAPHIQL_PAGE: &str = include_str!("graphiql.html");

/// The page's policy: its own inline script (by hash) and the vendored files only, nothing from elsewhere,
/// no framing (clickjacking), requests to this service only. Styles may be inline: GraphiQL's editor
/// injects its own.
static GRAPHIQL_POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let inline_script = GRAPHIQL_PAGE
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(script, _)| script)
        .expect("the GraphiQL page has one inline script");
    let hash = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        sha2::Sha256::digest(inline_script.as_bytes()),
    );
    format!(
        "default-src 'none'; script-src 'self' 'sha256-{hash}'; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'"
    )
});

async fn graphiql_page(State(state): State<AppState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(refusal) = guard(&state, &parts) {
        return reject(&state, refusal);
    }
    (
        [
            (header::CONTENT_SECURITY_POLICY, GRAPHIQL_POLICY.as_str()),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(GRAPHIQL_PAGE),
    )
        .into_response()
}

/// The vendored GraphiQL build (see `assets/graphiql/` and `scripts/vendor-graphiql`).
const GRAPHIQL_ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "react.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/react.production.min.js"),
    ),
    (
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/react-dom.production.min.js"),
    ),
    (
        "graphiql.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/graphiql.min.js"),
    ),
    (
        "graphiql.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/graphiql.min.css"),
    ),
    (
        "graphiql-plugin-explorer.umd.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/graphiql-plugin-explorer.umd.js"),
    ),
    (
        "graphiql-plugin-explorer.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/graphiql-plugin-explorer.css"),
    ),
];

async fn graphiql_asset(
    State(state): State<AppState>,
    Path(file): Path<String>,
    request: Request,
) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(refusal) = guard(&state, &parts) {
        return reject(&state, refusal);
    }
    match GRAPHIQL_ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=86400"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such GraphiQL asset").into_response(),
    }
}
