//! The REST API of the system DataAPI replaces, served as a drop-in so that existing background jobs and
//! scripts keep working: `POST /data/{customerId}/{dialogId}`, `POST /consents/{dialogId}` and
//! `GET /data/`. A thin shell like the GraphQL one: the same admission (host check, per-client limits),
//! the same keys and roles, and the same service calls, so every guarantee (idempotent `messageId`, consent
//! rules, bounds) holds alike. Errors are RFC 9457 problem details whose `code` is GraphQL's
//! `extensions.code`. The OpenAPI 3.1 document at `/openapi.json` (and `openapi.json` in the repository) is
//! generated from these handlers and types.

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::Permission;
use crate::error::ApiError;
use crate::http::{AppState, Rejection};
use crate::model::{
    ClientMessageId, CustomerId, DialogId, IncomingMessage, Language, MessageFate, MessageText,
    TimeWindow, rfc3339,
};
use crate::paging::{
    Direction, KeyRange, ListKind, ListOrder, PageRequest, decode_cursor, encode_cursor,
};
use crate::store::{MessageFilter, message_key};

/// Page size of `GET /data/` without `limit`.
const DEFAULT_LIMIT: usize = 20;

/// The media type of every error answer (RFC 9457).
const PROBLEM_JSON: &str = "application/problem+json";

/// The REST routes, behind the same CORS allowlist as `/graphql` (none by default).
pub fn routes(cors: &crate::cors::AllowedOrigins) -> Router<AppState> {
    // Each route's own 405 (a router-wide one would shadow the CORS layer's answer to preflights).
    let routes = Router::new()
        .route(
            "/data/{customerId}/{dialogId}",
            post(push_message).fallback(no_such_method),
        )
        .route(
            "/consents/{dialogId}",
            post(give_consent).fallback(no_such_method),
        )
        .route("/data/", get(list_messages).fallback(no_such_method))
        .route("/data", get(list_messages).fallback(no_such_method))
        .route(
            "/openapi.json",
            get(openapi_document).fallback(no_such_method),
        );
    match cors.layer() {
        Some(layer) => routes.layer(layer),
        None => routes,
    }
}

/// A route asked with a method it does not serve: 405 as problem details (axum adds `Allow`).
pub async fn no_such_method(State(state): State<AppState>) -> Response {
    problem(
        &state,
        Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "this route does not take this method: the `Allow` header lists those it takes, and \
             /openapi.json describes the REST routes",
        ),
        None,
    )
}

/// Any other path: 404 as problem details, pointing to what exists.
pub async fn no_such_route(State(state): State<AppState>) -> Response {
    problem(
        &state,
        Rejection::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such route: GraphQL is at /graphql, the REST routes are listed in /openapi.json",
        ),
        None,
    )
}

/// The OpenAPI document of the REST routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "DataAPI REST",
        description = "The REST endpoints of the system DataAPI replaces, and the bulk exports, on the \
                       same service as its GraphQL API (/graphql). Errors are RFC 9457 problem details whose \
                       `code` is the GraphQL `extensions.code`."
    ),
    paths(
        push_message,
        give_consent,
        list_messages,
        crate::export::export_ndjson,
        crate::export::export_csv,
        crate::export::export_parquet,
        crate::export::export_changes_ndjson,
        crate::export::export_changes_csv,
        crate::export::export_changes_parquet
    ),
    // Referenced by a query parameter, which utoipa does not collect by itself.
    components(schemas(ListingOrder)),
    modifiers(&BearerKeys),
    tags(
        (name = "ingest", description = "For the background job: a key with the ingest (or admin) role."),
        (name = "read", description = "For data scientists and dashboards: a key with the read (or admin) role."),
    )
)]
pub struct RestApi;

/// Declares the bearer keys every operation takes (when the service has keys configured).
struct BearerKeys;

impl utoipa::Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`dataapi hash-key`), as `Authorization: Bearer <key>`; not needed \
                         when the service runs without API_KEYS.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as served and as `openapi.json` holds it.
pub fn openapi_json() -> String {
    let mut json = RestApi::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    json
}

static OPENAPI_JSON: std::sync::LazyLock<String> = std::sync::LazyLock::new(openapi_json);

/// `GET /openapi.json`: the same public document as the repository's, so no key is needed; the host check
/// and the per-client limits apply as everywhere.
async fn openapi_document(State(state): State<AppState>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    if let Err(refusal) = crate::http::guard(&state, &parts) {
        return problem(&state, refusal, None);
    }
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        OPENAPI_JSON.as_str(),
    )
        .into_response()
}

/// An error answer (RFC 9457). `type` is `about:blank`: the status says what kind of failure it is, and
/// `code` (the GraphQL `extensions.code`) says exactly which.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// Always `about:blank`.
    #[serde(rename = "type")]
    #[schema(example = "about:blank")]
    pub problem_type: &'static str,
    /// The HTTP status's reason phrase.
    #[schema(example = "Not Found")]
    pub title: &'static str,
    #[schema(example = 404)]
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
    /// The same code as GraphQL's `extensions.code`, e.g. `BAD_USER_INPUT`, `DIALOG_NOT_FOUND`.
    #[schema(example = "DIALOG_NOT_FOUND")]
    pub code: &'static str,
    /// The input at fault, for `BAD_USER_INPUT` and `INVALID_CURSOR`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The dialog, for `DIALOG_NOT_FOUND`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialog_id: Option<String>,
}

/// Why a REST request was not served: refused before the service was asked, or by the service.
pub(crate) enum Refused {
    Early(Rejection),
    Service(ApiError),
}

impl From<Rejection> for Refused {
    fn from(rejection: Rejection) -> Self {
        Self::Early(rejection)
    }
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Self::Service(error)
    }
}

/// A handler's outcome: its answer, or why it refused.
pub(crate) type Answer = Result<Response, Refused>;

/// Writes a handler's outcome; a refusal as problem details.
pub(crate) fn respond(state: &AppState, answer: Answer) -> Response {
    match answer {
        Ok(response) => response,
        Err(Refused::Early(rejection)) => problem(state, rejection, None),
        Err(Refused::Service(error)) => service_problem(state, error),
    }
}

/// Renders a refusal as problem details, counted in the error metrics like GraphQL's.
fn problem(state: &AppState, rejection: Rejection, detail_of: Option<&ApiError>) -> Response {
    crate::http::count_error(state, rejection.code);
    let (field, dialog_id) = match detail_of {
        Some(
            ApiError::InvalidInput { field, .. }
            | ApiError::InvalidCursor { field, .. }
            | ApiError::InvalidChangeToken { field, .. },
        ) => (Some((*field).to_owned()), None),
        Some(ApiError::InvalidInputAt { field, .. }) => (Some(field.clone()), None),
        Some(ApiError::DialogNotFound(dialog_id)) => (None, Some(dialog_id.clone())),
        _ => (None, None),
    };
    let body = Problem {
        problem_type: "about:blank",
        title: rejection.status.canonical_reason().unwrap_or("Error"),
        status: rejection.status.as_u16(),
        detail: rejection.message.clone(),
        code: rejection.code,
        field,
        dialog_id,
    };
    let mut response = (
        rejection.status,
        [(header::CONTENT_TYPE, PROBLEM_JSON)],
        serde_json::to_vec(&body).expect("a problem serializes"),
    )
        .into_response();
    rejection.add_headers(&mut response);
    response
}

/// Renders an error of the service layer as problem details, with the status a REST client expects.
fn service_problem(state: &AppState, error: ApiError) -> Response {
    let status = match &error {
        ApiError::InvalidInput { .. }
        | ApiError::InvalidInputAt { .. }
        | ApiError::InvalidCursor { .. }
        | ApiError::InvalidChangeToken { .. } => StatusCode::BAD_REQUEST,
        ApiError::DialogNotFound(_) => StatusCode::NOT_FOUND,
        ApiError::MessageIdConflict { .. } | ApiError::CustomerMismatch { .. } => {
            StatusCode::CONFLICT
        }
        ApiError::StoreUnavailable(_)
        | ApiError::BufferUnavailable(_)
        | ApiError::BufferFull(_) => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
        ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
        // Subscriptions only; never from a REST route.
        ApiError::TooManySubscriptions { .. } => StatusCode::TOO_MANY_REQUESTS,
        ApiError::SubscriberTooSlow { .. } => StatusCode::CONFLICT,
    };
    match &error {
        ApiError::StoreUnavailable(source) => tracing::warn!(error = %source, "store call failed"),
        ApiError::BufferUnavailable(source) => {
            tracing::warn!(error = %source, "buffer call failed")
        }
        _ => {}
    }
    let mut rejection = Rejection::new(status, error.code(), error.message());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        rejection.retry_after = Some(5);
    }
    problem(state, rejection, Some(&error))
}

/// What every REST request passes before its input is read: the host check and per-client limits, a valid
/// key (when keys are configured), and the role `permission` names. The ticket counts the request as in
/// flight until dropped.
pub(crate) fn admit(
    state: &AppState,
    parts: &axum::http::request::Parts,
    permission: Permission,
    operation: &str,
) -> Result<Option<crate::admission::Ticket>, Refused> {
    let ticket = crate::http::guard(state, parts)?;
    let (caller, _) = crate::http::authenticate(state, &parts.headers)?;
    if !caller.may(permission) {
        return Err(ApiError::Forbidden {
            operation: operation.to_owned(),
            allowed: match permission {
                Permission::Ingest => "ingest or admin",
                Permission::Read => "read or admin",
                Permission::Admin => "admin",
            },
        }
        .into());
    }
    Ok(ticket)
}

/// The path's parameters, or 400 when they are not valid UTF-8 after percent-decoding.
fn path_parameters<T>(parameters: Result<Path<T>, PathRejection>) -> Result<T, Refused> {
    parameters.map(|Path(values)| values).map_err(|rejection| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
            format!("the URL's path is not valid ({rejection}): percent-encode ids as UTF-8"),
        )
        .into()
    })
}

/// Reads a JSON body into `T`: 415 when it is not declared as JSON, 413 past MAX_BODY_BYTES, 400 (with
/// serde's account of what is wrong, and `expected`) when it does not parse or is a list.
async fn json_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    parts: &axum::http::request::Parts,
    body: axum::body::Body,
    expected: &str,
) -> Result<T, Refused> {
    crate::http::require_json(&parts.headers, "the body")?;
    let bytes = crate::http::read_body(state, parts, body).await?;
    let invalid = |reason: String| {
        Refused::Early(Rejection::new(
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
            format!("the body is not valid ({reason}): send {expected}"),
        ))
    };
    // serde reads a struct from a list of its fields' values too; no route takes a list.
    if bytes.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'[') {
        return Err(invalid("a list".to_owned()));
    }
    serde_json::from_slice(&bytes).map_err(|error| invalid(error.to_string()))
}

/// Counts a REST call in the operation metrics, under the GraphQL field it stands for.
fn observe(state: &AppState, label: &str, started: std::time::Instant) {
    let metrics = state.service.metrics();
    metrics.operations.with_label_values(&[label]).inc();
    metrics
        .operation_seconds
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
}

/// The body of `POST /data/{customerId}/{dialogId}`.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushBody {
    /// The message text: not blank, at most 10000 characters.
    #[schema(example = "Where is my parcel?")]
    pub text: String,
    /// A language tag such as `en` or `pt-BR`; case-insensitive.
    #[schema(example = "EN")]
    pub language: String,
    /// Optional idempotency key, unique within the dialog (or send the `Idempotency-Key` header): sending
    /// the same key again records the message once and answers with it as first recorded.
    #[serde(default)]
    pub message_id: Option<String>,
}

/// One customer message, as recorded.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordedMessage {
    /// Server-assigned id, unique across dialogs (the GraphQL `Message.id`).
    pub id: String,
    /// The client's idempotency key, when it sent one.
    pub message_id: Option<String>,
    pub dialog_id: String,
    pub customer_id: String,
    pub text: String,
    /// Lowercase language tag, e.g. `en` or `pt-br`.
    pub language: String,
    /// When the server accepted the message: RFC 3339, UTC, milliseconds.
    #[schema(format = DateTime, example = "2026-11-28T09:30:00.123Z")]
    pub created_at: String,
}

impl From<crate::model::Message> for RecordedMessage {
    fn from(message: crate::model::Message) -> Self {
        Self {
            id: message.id,
            message_id: message.client_id.map(|id| id.to_string()),
            dialog_id: message.dialog_id.to_string(),
            customer_id: message.customer_id.to_string(),
            text: message.text.into_string(),
            language: message.language.to_string(),
            created_at: rfc3339(message.created_at),
        }
    }
}

/// What happened to a pushed message (GraphQL's `MessageStatus`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MessageStatus {
    /// Waiting in the dialog buffer for the customer's consent decision; not stored anywhere yet.
    Buffered,
    /// The dialog has consent: the message is in the database.
    Stored,
    /// The customer refused consent for this dialog: the message was dropped, nothing was kept.
    Discarded,
}

/// The message as recorded, and what happened to it.
#[derive(Serialize, ToSchema)]
pub struct PushedMessage {
    pub message: RecordedMessage,
    pub status: MessageStatus,
}

/// Record one customer message (GraphQL: `pushMessage`).
///
/// Until the dialog has a consent decision the message waits in the buffer (`BUFFERED`); after `true` it
/// is stored at once (`STORED`); after `false` it is dropped (`DISCARDED`). Safe to retry with a
/// `messageId` or an `Idempotency-Key`: a retry answers 201 with the message as first recorded.
#[utoipa::path(
    post,
    path = "/data/{customerId}/{dialogId}",
    tag = "ingest",
    operation_id = "pushMessage",
    params(
        ("customerId" = String, Path, description = "The chatbot's customer id (at most 128 characters)."),
        ("dialogId" = String, Path, description = "The conversation (at most 128 characters)."),
        ("Idempotency-Key" = Option<String>, Header, description = "The message's idempotency key, as \
          `messageId` in the body (a quoted structured-field string is accepted too); both may be sent \
          only when they are equal."),
    ),
    request_body(content = PushBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Recorded (or, for a retry, recorded before)", body = PushedMessage),
        (status = 400, description = "Invalid input (`BAD_USER_INPUT`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key (`UNAUTHENTICATED`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's role may not push (`FORBIDDEN`), or the host is not served (`HOST_NOT_ALLOWED`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`MESSAGE_ID_CONFLICT` or `CUSTOMER_MISMATCH`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over MAX_BODY_BYTES (`PAYLOAD_TOO_LARGE`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body not sent as application/json (`UNSUPPORTED_MEDIA_TYPE`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Client over its limits (`RATE_LIMITED`), see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`BUFFER_FULL`, `BUFFER_UNAVAILABLE` or `STORE_UNAVAILABLE`: nothing was recorded, retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("apiKey" = [])),
)]
async fn push_message(
    State(state): State<AppState>,
    ids: Result<Path<(String, String)>, PathRejection>,
    request: Request,
) -> Response {
    let answer = push_message_answer(&state, ids, request).await;
    respond(&state, answer)
}

async fn push_message_answer(
    state: &AppState,
    ids: Result<Path<(String, String)>, PathRejection>,
    request: Request,
) -> Answer {
    let started = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let _ticket = admit(
        state,
        &parts,
        Permission::Ingest,
        "POST /data/{customerId}/{dialogId}",
    )?;
    let (customer_id, dialog_id) = path_parameters(ids)?;
    let body: PushBody = json_body(
        state,
        &parts,
        body,
        r#"an object like {"text": "…", "language": "en"}, optionally with "messageId""#,
    )
    .await?;
    let incoming = parse_push(customer_id, dialog_id, body, &parts.headers)?;
    let pushed = state.service.push(incoming).await;
    observe(state, "rest:pushMessage", started);
    let pushed = pushed?;
    let body = PushedMessage {
        message: pushed.message.into(),
        status: match pushed.fate {
            MessageFate::Buffered => MessageStatus::Buffered,
            MessageFate::Stored => MessageStatus::Stored,
            MessageFate::Discarded => MessageStatus::Discarded,
        },
    };
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// Validates a REST push as GraphQL's `PushMessageInput` is validated, fields named as the client sent
/// them.
fn parse_push(
    customer_id: String,
    dialog_id: String,
    body: PushBody,
    headers: &HeaderMap,
) -> Result<IncomingMessage, ApiError> {
    let header_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                ApiError::invalid("Idempotency-Key", "must be visible ASCII characters")
            })?;
            // RFC 8941 string, as the IETF draft writes it, or the bare token most clients send.
            let text = text
                .strip_prefix('"')
                .and_then(|text| text.strip_suffix('"'))
                .unwrap_or(text);
            Some(ClientMessageId::parse("Idempotency-Key", text.to_owned())?)
        }
    };
    let body_key = body
        .message_id
        .map(|id| ClientMessageId::parse("messageId", id))
        .transpose()?;
    let client_id = match (body_key, header_key) {
        (Some(body_key), Some(header_key)) if body_key != header_key => {
            return Err(ApiError::invalid(
                "messageId",
                "differs from the Idempotency-Key header: send one of them, or the same value in both",
            ));
        }
        (body_key, header_key) => body_key.or(header_key),
    };
    Ok(IncomingMessage {
        customer_id: CustomerId::parse("customerId", customer_id)?,
        dialog_id: DialogId::parse("dialogId", dialog_id)?,
        text: MessageText::parse("text", body.text)?,
        language: Language::parse("language", &body.language)?,
        client_id,
    })
}

/// The body of `POST /consents/{dialogId}`: the bare decision, as the original API took it, or an object.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ConsentBody {
    #[schema(example = true)]
    Bare(bool),
    Object(ConsentObject),
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsentObject {
    pub value: bool,
}

/// What a consent decision did (GraphQL's `ConsentPayload`).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsentResult {
    pub dialog_id: String,
    /// The decision now in force.
    pub value: bool,
    /// When this decision was first given (repeating it does not move it).
    #[schema(format = DateTime, example = "2026-11-28T09:30:00.123Z")]
    pub decided_at: String,
    /// Buffered messages written to the database by this call.
    pub stored_count: u64,
    /// Buffered messages dropped by this call.
    pub discarded_count: u64,
    /// Previously stored messages deleted by this call, because consent was withdrawn.
    pub deleted_count: u64,
}

/// Record the customer's consent decision for a dialog (GraphQL: `giveConsent`).
///
/// `true` stores its buffered messages and every later one; `false` discards them, deletes anything
/// stored earlier (withdrawal), and discards later ones. Repeating a decision changes nothing.
#[utoipa::path(
    post,
    path = "/consents/{dialogId}",
    tag = "ingest",
    operation_id = "giveConsent",
    params(("dialogId" = String, Path, description = "The conversation the customer decided about.")),
    request_body(content = ConsentBody, content_type = "application/json",
        description = "`true` or `false`, or `{\"value\": true}`"),
    responses(
        (status = 200, description = "The decision is recorded", body = ConsentResult),
        (status = 400, description = "Invalid input (`BAD_USER_INPUT`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key (`UNAUTHENTICATED`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's role may not decide (`FORBIDDEN`), or the host is not served (`HOST_NOT_ALLOWED`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The dialog has neither buffered messages nor a decision (`DIALOG_NOT_FOUND`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over MAX_BODY_BYTES (`PAYLOAD_TOO_LARGE`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body not sent as application/json (`UNSUPPORTED_MEDIA_TYPE`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Client over its limits (`RATE_LIMITED`), see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`BUFFER_UNAVAILABLE` or `STORE_UNAVAILABLE`: nothing was half-written, retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("apiKey" = [])),
)]
async fn give_consent(
    State(state): State<AppState>,
    dialog_id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let answer = give_consent_answer(&state, dialog_id, request).await;
    respond(&state, answer)
}

async fn give_consent_answer(
    state: &AppState,
    dialog_id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Answer {
    let started = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let _ticket = admit(
        state,
        &parts,
        Permission::Ingest,
        "POST /consents/{dialogId}",
    )?;
    let dialog_id = path_parameters(dialog_id)?;
    let (ConsentBody::Bare(value) | ConsentBody::Object(ConsentObject { value })) =
        json_body(state, &parts, body, r#"true, false or {"value": true}"#).await?;
    let dialog_id = DialogId::parse("dialogId", dialog_id)?;
    let outcome = state.service.give_consent(dialog_id, value).await;
    observe(state, "rest:giveConsent", started);
    let outcome = outcome?;
    Ok(axum::Json(ConsentResult {
        dialog_id: outcome.record.dialog_id.to_string(),
        value: outcome.record.value,
        decided_at: rfc3339(outcome.record.decided_at),
        stored_count: outcome.stored,
        discarded_count: outcome.discarded,
        deleted_count: outcome.deleted,
    })
    .into_response())
}

/// The query parameters of `GET /data/`. Unknown ones are refused rather than ignored: a misspelt filter
/// must not quietly return everything.
#[derive(Deserialize, Serialize, IntoParams, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParameters {
    /// Messages in this language (case-insensitive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Messages of this customer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Messages of this dialog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialog_id: Option<String>,
    /// Messages per page, 1 to MAX_PAGE_SIZE (default 20). A page may hold fewer when its messages would
    /// pass MAX_RESPONSE_BYTES: follow `nextCursor` all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<u32>, minimum = 1)]
    pub limit: Option<String>,
    /// Where to continue: the `nextCursor` of the previous page (or a cursor of GraphQL's `messages`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Messages accepted at or after this time (RFC 3339; percent-encode a `+` offset as `%2B`, or use `Z`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<String>,
    /// Messages accepted before this time (exclusive), which must be later than `since`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>, format = DateTime)]
    pub until: Option<String>,
    /// `NEWEST_FIRST` (the default) or `OLDEST_FIRST`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<ListingOrder>,
}

/// The order of `GET /data/` (GraphQL's `ListOrder`).
#[derive(Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ListingOrder {
    NewestFirst,
    OldestFirst,
}

/// Parses an RFC 3339 query parameter into milliseconds since the epoch.
pub(crate) fn time_parameter(
    field: &'static str,
    value: Option<&str>,
) -> Result<Option<i64>, ApiError> {
    value
        .map(|text| {
            chrono::DateTime::parse_from_rfc3339(text)
                .map(|time| time.timestamp_millis())
                .map_err(|_| {
                    ApiError::invalid(
                        field,
                        format!(
                            "must be an RFC 3339 date-time such as 2026-11-28T09:30:00Z, got {text:?} \
                             (percent-encode a `+` offset as %2B)"
                        ),
                    )
                })
        })
        .transpose()
}

/// One page of `GET /data/`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    /// Consented messages, most recent first (or in `order`).
    pub data: Vec<RecordedMessage>,
    /// The `cursor` of the next page; null on the last one. The `Link` header's `rel="next"` has the
    /// whole URL.
    pub next_cursor: Option<String>,
}

/// List the stored (consented) messages, most recent first (GraphQL: `messages`).
///
/// Filters combine with AND; `since`/`until` keep the messages accepted in that range, `order=OLDEST_FIRST`
/// reverses the list. Paged by cursor: each page but the last gives `nextCursor` and a `Link: <…>; rel="next"` header.
/// Offsets (`page`, `skip`) are refused with a 400 that says so: see README "REST API".
#[utoipa::path(
    get,
    path = "/data/",
    tag = "read",
    operation_id = "messages",
    params(ListParameters),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage,
            headers(("Link" = String, description = "`<URL of the next page>; rel=\"next\"`, absent on the last page"))),
        (status = 400, description = "Invalid parameter (`BAD_USER_INPUT`, `INVALID_CURSOR`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid API key (`UNAUTHENTICATED`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's role may not read (`FORBIDDEN`), or the host is not served (`HOST_NOT_ALLOWED`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Client over its limits (`RATE_LIMITED`), see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`STORE_UNAVAILABLE`: retry after Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("apiKey" = [])),
)]
async fn list_messages(State(state): State<AppState>, request: Request) -> Response {
    let answer = list_messages_answer(&state, request).await;
    respond(&state, answer)
}

async fn list_messages_answer(state: &AppState, request: Request) -> Answer {
    let started = std::time::Instant::now();
    let (parts, _) = request.into_parts();
    let _ticket = admit(state, &parts, Permission::Read, "GET /data/")?;
    let query = parts.uri.query().unwrap_or_default();
    let (parameters, filter, request) = parse_listing(query, state.limits.max_page_size)?;
    let page = state.service.messages(&filter, &request).await;
    observe(state, "rest:messages", started);
    let page = page?;
    // Written one message at a time: a page that would pass MAX_RESPONSE_BYTES ends early, with a cursor
    // to the rest, instead of failing (1 KiB is kept for the envelope and the cursor).
    let budget = state.max_response_bytes.saturating_sub(1024);
    let mut data = Vec::with_capacity(page.items.len());
    let mut written = 0;
    let mut cut_short = false;
    let mut last_key = None;
    for message in page.items {
        let key = message_key(&message);
        let message = RecordedMessage::from(message);
        written += serde_json::to_vec(&message).map_or(0, |json| json.len() + 1);
        if written > budget {
            if data.is_empty() {
                return Err(Rejection::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "RESPONSE_TOO_LARGE",
                    format!(
                        "one message is larger than MAX_RESPONSE_BYTES ({}) allows: the operator must \
                         raise it",
                        state.max_response_bytes
                    ),
                )
                .into());
            }
            cut_short = true;
            break;
        }
        data.push(message);
        last_key = Some(key);
    }
    let next_cursor = if page.has_next_page || cut_short {
        last_key.map(|key| encode_cursor(ListKind::Messages, &key))
    } else {
        None
    };
    let mut response = axum::Json(MessagePage {
        data,
        next_cursor: next_cursor.clone(),
    })
    .into_response();
    if let Some(cursor) = next_cursor {
        let next = ListParameters {
            cursor: Some(cursor),
            limit: Some(request.size.to_string()),
            ..parameters
        };
        let query = serde_urlencoded::to_string(&next).expect("parameters encode");
        if let Ok(link) = HeaderValue::from_str(&format!("</data/?{query}>; rel=\"next\"")) {
            response.headers_mut().insert(header::LINK, link);
        }
    }
    Ok(response)
}

/// The filter of a REST listing or export, from its query parameters (each named as the client spelled it).
pub(crate) fn message_filter(
    language: Option<&str>,
    customer_id: Option<String>,
    dialog_id: Option<String>,
    since: Option<&str>,
    until: Option<&str>,
) -> Result<MessageFilter, ApiError> {
    Ok(MessageFilter {
        language: language
            .map(|language| Language::parse("language", language))
            .transpose()?,
        customer_id: customer_id
            .map(|id| CustomerId::parse("customerId", id))
            .transpose()?,
        dialog_id: dialog_id
            .map(|id| DialogId::parse("dialogId", id))
            .transpose()?,
        window: TimeWindow::parse(
            time_parameter("since", since)?,
            time_parameter("until", until)?,
            "until",
        )?,
    })
}

/// Validates the query string of `GET /data/`.
fn parse_listing(
    query: &str,
    max_page_size: usize,
) -> Result<(ListParameters, MessageFilter, PageRequest), ApiError> {
    // Named first, for a better answer than "unknown field".
    if let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        && let Some((name, _)) = pairs
            .iter()
            .find(|(name, _)| name == "page" || name == "skip" || name == "offset")
    {
        return Err(ApiError::InvalidInput {
            field: match name.as_str() {
                "page" => "page",
                "skip" => "skip",
                _ => "offset",
            },
            reason: "is not offered: pages are reached by cursor, which stays exact while data \
                     arrives and costs the same at any depth; follow `nextCursor` (or the Link header's \
                     rel=\"next\") from the first page"
                .to_owned(),
        });
    }
    let parameters: ListParameters = serde_urlencoded::from_str(query).map_err(|error| {
        ApiError::invalid(
            "query",
            format!(
                "is not valid ({error}): the parameters are language, customerId, dialogId, since, \
                 until, order, limit and cursor, each at most once"
            ),
        )
    })?;
    let filter = message_filter(
        parameters.language.as_deref(),
        parameters.customer_id.clone(),
        parameters.dialog_id.clone(),
        parameters.since.as_deref(),
        parameters.until.as_deref(),
    )?;
    let size = match &parameters.limit {
        None => DEFAULT_LIMIT.min(max_page_size),
        Some(limit) => match limit.parse::<usize>() {
            Ok(size) if (1..=max_page_size).contains(&size) => size,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!(
                        "must be a whole number from 1 to {max_page_size} (MAX_PAGE_SIZE), got {limit:?}: \
                         follow nextCursor for more"
                    ),
                ));
            }
        },
    };
    let cursor = parameters
        .cursor
        .as_deref()
        .map(|cursor| decode_cursor(ListKind::Messages, "cursor", cursor))
        .transpose()?;
    // The next page lies past the cursor in the list's order.
    let (order, range) = match parameters.order {
        None | Some(ListingOrder::NewestFirst) => (
            ListOrder::NewestFirst,
            KeyRange {
                older_than: cursor,
                newer_than: None,
            },
        ),
        Some(ListingOrder::OldestFirst) => (
            ListOrder::OldestFirst,
            KeyRange {
                older_than: None,
                newer_than: cursor,
            },
        ),
    };
    let request = PageRequest {
        direction: Direction::Forward,
        size,
        range,
        order,
    };
    Ok((parameters, filter, request))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(query: &str) -> Result<(MessageFilter, PageRequest), ApiError> {
        parse_listing(query, 100).map(|(_, filter, request)| (filter, request))
    }

    #[test]
    fn listing_parameters_parse_and_default() {
        let (filter, request) = listing("language=EN&customerId=c%201").unwrap();
        assert_eq!(filter.language.unwrap().as_str(), "en");
        assert_eq!(filter.customer_id.unwrap().as_str(), "c 1");
        assert_eq!(request.size, DEFAULT_LIMIT);
        assert_eq!(request.range, KeyRange::default());
        let (_, request) = listing("limit=100").unwrap();
        assert_eq!(request.size, 100);
    }

    #[test]
    fn listing_parameters_refuse_what_they_cannot_honour() {
        for (query, field) in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("limit=-1", "limit"),
            ("limit=ten", "limit"),
            ("page=2", "page"),
            ("skip=40", "skip"),
            ("offset=40", "offset"),
            ("langauge=en", "query"),
            ("language=en&language=de", "query"),
            ("language=", "language"),
            ("customerId=", "customerId"),
            ("cursor=garbage", "cursor"),
            ("since=yesterday", "since"),
            ("until=2026-11-28", "until"),
            (
                "since=2026-11-29T00:00:00Z&until=2026-11-28T00:00:00Z",
                "until",
            ),
            ("order=UP", "query"),
        ] {
            match listing(query) {
                Err(ApiError::InvalidInput { field: got, .. })
                | Err(ApiError::InvalidCursor { field: got, .. }) => {
                    assert_eq!(got, field, "{query}")
                }
                other => panic!("{query}: expected an invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_cursor_bounds_the_side_the_order_reads_towards() {
        let key = crate::paging::SortKey {
            at: 7,
            id: "m".into(),
        };
        let cursor = encode_cursor(ListKind::Messages, &key);
        let (filter, newest) = listing(&format!(
            "cursor={cursor}&since=2026-11-28T10:00:00%2B01:00"
        ))
        .unwrap();
        assert_eq!(newest.order, ListOrder::NewestFirst);
        assert_eq!(newest.range.older_than, Some(key.clone()));
        assert_eq!(filter.window.since, Some(1_795_856_400_000));
        let (_, oldest) = listing(&format!("cursor={cursor}&order=OLDEST_FIRST")).unwrap();
        assert_eq!(oldest.order, ListOrder::OldestFirst);
        assert_eq!(oldest.range.newer_than, Some(key));
        assert_eq!(oldest.range.older_than, None);
    }

    #[test]
    fn a_cursor_of_another_list_is_refused() {
        let dialogs = encode_cursor(
            ListKind::Dialogs,
            &crate::paging::SortKey {
                at: 1,
                id: "d".into(),
            },
        );
        assert!(matches!(
            listing(&format!("cursor={dialogs}")),
            Err(ApiError::InvalidCursor { .. })
        ));
    }

    #[test]
    fn the_idempotency_key_header_and_the_body_field_must_agree() {
        let body = |message_id: Option<&str>| PushBody {
            text: "hi".into(),
            language: "en".into(),
            message_id: message_id.map(str::to_owned),
        };
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("idempotency-key", HeaderValue::from_str(value).unwrap());
            headers
        };
        let parse = |body, headers: &HeaderMap| parse_push("c".into(), "d".into(), body, headers);
        let quoted = parse(body(None), &headers("\"k1\"")).unwrap();
        assert_eq!(quoted.client_id.unwrap().as_str(), "k1");
        let same = parse(body(Some("k1")), &headers("k1")).unwrap();
        assert_eq!(same.client_id.unwrap().as_str(), "k1");
        assert!(matches!(
            parse(body(Some("k2")), &headers("k1")),
            Err(ApiError::InvalidInput {
                field: "messageId",
                ..
            })
        ));
        assert!(matches!(
            parse(body(None), &headers("\"\"")),
            Err(ApiError::InvalidInput {
                field: "Idempotency-Key",
                ..
            })
        ));
    }

    #[test]
    fn the_openapi_document_is_3_1_with_the_three_routes() {
        let document: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = document["paths"].as_object().unwrap();
        assert!(paths["/data/{customerId}/{dialogId}"]["post"].is_object());
        assert!(paths["/consents/{dialogId}"]["post"].is_object());
        assert!(paths["/data/"]["get"].is_object());
        for format in ["ndjson", "csv", "parquet"] {
            assert!(paths[&format!("/export/messages.{format}")]["get"].is_object());
            assert!(paths[&format!("/export/changes.{format}")]["get"].is_object());
        }
    }
}
