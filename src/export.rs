//! Bulk export for analysis (`read` role), each as NDJSON, CSV and Parquet:
//! - `GET /export/messages.*`: the stored messages, with the filters and time range of `messages`;
//! - `GET /export/changes.*`: the change feed after a token (see `changes`), to keep a copy in step.
//!
//! The answer is streamed: rows are read in batches by keyset (each batch one indexed query, none held
//! open), encoded a batch at a time off the async threads, and sent through a channel of two chunks, so that
//! memory stays constant whatever the export's size and a slow client slows the reading down instead of
//! filling memory. NDJSON and CSV are gzip-compressed when the client accepts it; Parquet is compressed
//! inside (Snappy).

use std::io::Write;
use std::sync::{Arc, Mutex};

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Deserialize;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};

use crate::auth::Permission;
use crate::changes::ChangeToken;
use crate::error::ApiError;
use crate::http::{AppState, Rejection};
use crate::model::{Change, Message};
use crate::paging::ListOrder;
use crate::rest::{Answer, ListingOrder, RecordedMessage, admit, message_filter, respond};
use crate::store::{MessageFilter, message_key};

/// Messages read per query.
const BATCH: usize = 5_000;

/// Rows per Parquet row group: what the writer holds in memory before writing them out.
const ROW_GROUP: usize = 65_536;

/// Exports running at once, over all clients (each holds a database connection a batch at a time).
pub const EXPORTS_AT_ONCE: usize = 4;

const PARQUET: &str = "application/vnd.apache.parquet";

/// The file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Csv,
    Parquet,
}

impl Format {
    fn media_type(self) -> &'static str {
        match self {
            Self::Ndjson => "application/x-ndjson",
            Self::Csv => "text/csv; charset=utf-8; header=present",
            Self::Parquet => PARQUET,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Ndjson => "ndjson",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        }
    }
}

/// The response header that carries the change token to pass next time, after a complete download.
pub const CHANGE_TOKEN_HEADER: &str = "dataapi-change-token";

pub fn routes(cors: &crate::cors::AllowedOrigins) -> Router<AppState> {
    let routes = Router::new()
        .route("/export/messages.ndjson", get(export_ndjson))
        .route("/export/messages.csv", get(export_csv))
        .route("/export/messages.parquet", get(export_parquet))
        .route("/export/changes.ndjson", get(export_changes_ndjson))
        .route("/export/changes.csv", get(export_changes_csv))
        .route("/export/changes.parquet", get(export_changes_parquet))
        // Parquet is compressed inside already.
        .layer(
            CompressionLayer::new()
                .compress_when(DefaultPredicate::new().and(NotForContentType::const_new(PARQUET))),
        );
    match cors.layer() {
        Some(layer) => routes.layer(layer),
        None => routes,
    }
}

/// The query parameters of an export: the filters of `GET /data/`, without paging.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportParameters {
    /// Messages in this language (case-insensitive).
    language: Option<String>,
    /// Messages of this customer.
    customer_id: Option<String>,
    /// Messages of this dialog.
    dialog_id: Option<String>,
    /// Messages accepted at or after this time (RFC 3339; percent-encode a `+` offset as `%2B`, or use `Z`).
    #[param(value_type = Option<String>, format = DateTime)]
    since: Option<String>,
    /// Messages accepted before this time (exclusive), which must be later than `since`.
    #[param(value_type = Option<String>, format = DateTime)]
    until: Option<String>,
    /// `OLDEST_FIRST` (the default for exports: a file read from top to bottom follows time) or
    /// `NEWEST_FIRST`.
    order: Option<ListingOrder>,
}

/// The refusals every export route shares, in its OpenAPI description.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only described, never built: the refusals are answered as [`crate::rest::Problem`]s
enum ExportRefusals {
    #[response(
        status = 401,
        description = "No valid API key (`UNAUTHENTICATED`)",
        content_type = "application/problem+json"
    )]
    Unauthenticated(crate::rest::Problem),
    #[response(
        status = 403,
        description = "The key's role may not read (`FORBIDDEN`), or the host is not served (`HOST_NOT_ALLOWED`)",
        content_type = "application/problem+json"
    )]
    Forbidden(crate::rest::Problem),
    #[response(
        status = 503,
        description = "`EXPORT_BUSY` or `STORE_UNAVAILABLE`: retry after Retry-After",
        content_type = "application/problem+json"
    )]
    Busy(crate::rest::Problem),
}

/// Export the stored messages as NDJSON: one message per line, as `GET /data/` shows them.
#[utoipa::path(
    get,
    path = "/export/messages.ndjson",
    tag = "read",
    operation_id = "exportNdjson",
    params(ExportParameters),
    responses(
        (status = 200, description = "Every matching message, one JSON object per line (gzip when accepted)",
            body = crate::rest::RecordedMessage, content_type = "application/x-ndjson"),
        (status = 400, description = "Invalid parameter (`BAD_USER_INPUT`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        ExportRefusals,
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_ndjson(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Ndjson, Export::Messages).await
}

/// Export the stored messages as CSV (RFC 4180, a header row; the columns of `GET /data/`).
#[utoipa::path(
    get,
    path = "/export/messages.csv",
    tag = "read",
    operation_id = "exportCsv",
    params(ExportParameters),
    responses(
        (status = 200, description = "Every matching message, one row each after the header (gzip when accepted)",
            body = String, content_type = "text/csv"),
        (status = 400, description = "Invalid parameter (`BAD_USER_INPUT`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        ExportRefusals,
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_csv(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Csv, Export::Messages).await
}

/// Export the stored messages as Parquet: string columns, `createdAt` a UTC timestamp in milliseconds.
#[utoipa::path(
    get,
    path = "/export/messages.parquet",
    tag = "read",
    operation_id = "exportParquet",
    params(ExportParameters),
    responses(
        (status = 200, description = "Every matching message in one Parquet file (Snappy-compressed row groups)",
            body = String, content_type = "application/vnd.apache.parquet"),
        (status = 400, description = "Invalid parameter (`BAD_USER_INPUT`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        ExportRefusals,
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_parquet(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Parquet, Export::Messages).await
}

/// The query parameters of a change export.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ChangeExportParameters {
    /// The change token of the last download (its `DataAPI-Change-Token` header, or the largest `change`
    /// in it); without it, every change from the start.
    after: Option<String>,
}

/// Export the change feed after a token as NDJSON, one change per line.
#[utoipa::path(
    get,
    path = "/export/changes.ndjson",
    tag = "read",
    operation_id = "exportChangesNdjson",
    params(ChangeExportParameters),
    responses(
        (status = 200, description = "Every change after `after` up to the moment of the request, in order (gzip when accepted). `kind` is `stored` (a message, with its fields), `withdrawn` or `erased` (a dialog removed whole: `dialogId` and `removedAt`)",
            body = ChangeRow, content_type = "application/x-ndjson",
            headers(("DataAPI-Change-Token" = String, description = "Pass as `after` next time, once the whole file has arrived"))),
        (status = 400, description = "`INVALID_CHANGE_TOKEN` (malformed, or ahead of this database), or an unknown parameter (`BAD_USER_INPUT`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        ExportRefusals,
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_changes_ndjson(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Ndjson, Export::Changes).await
}

/// Export the change feed after a token as CSV (RFC 4180, a header row; empty cells where a kind has no value).
#[utoipa::path(
    get,
    path = "/export/changes.csv",
    tag = "read",
    operation_id = "exportChangesCsv",
    params(ChangeExportParameters),
    responses(
        (status = 200, description = "Every change after `after` up to the moment of the request, in order (gzip when accepted)",
            body = String, content_type = "text/csv",
            headers(("DataAPI-Change-Token" = String, description = "Pass as `after` next time, once the whole file has arrived"))),
        (status = 400, description = "`INVALID_CHANGE_TOKEN` (malformed, or ahead of this database), or an unknown parameter (`BAD_USER_INPUT`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        ExportRefusals,
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_changes_csv(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Csv, Export::Changes).await
}

/// Export the change feed after a token as Parquet: `change` an int64, the times UTC timestamps.
#[utoipa::path(
    get,
    path = "/export/changes.parquet",
    tag = "read",
    operation_id = "exportChangesParquet",
    params(ChangeExportParameters),
    responses(
        (status = 200, description = "Every change after `after` up to the moment of the request, in order, in one Parquet file",
            body = String, content_type = "application/vnd.apache.parquet",
            headers(("DataAPI-Change-Token" = String, description = "Pass as `after` next time, once the whole file has arrived"))),
        (status = 400, description = "`INVALID_CHANGE_TOKEN` (malformed, or ahead of this database), or an unknown parameter (`BAD_USER_INPUT`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        ExportRefusals,
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_changes_parquet(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Parquet, Export::Changes).await
}

fn parse_change_export(query: &str) -> Result<ChangeToken, ApiError> {
    let parameters: ChangeExportParameters =
        serde_urlencoded::from_str(query).map_err(|error| {
            ApiError::invalid(
                "query",
                format!("is not valid ({error}): the only parameter is `after`, at most once"),
            )
        })?;
    match parameters.after {
        Some(after) => ChangeToken::parse("after", &after),
        None => Ok(ChangeToken::default()),
    }
}

fn parse_export(query: &str) -> Result<(MessageFilter, ListOrder), ApiError> {
    let parameters: ExportParameters = serde_urlencoded::from_str(query).map_err(|error| {
        ApiError::invalid(
            "query",
            format!(
                "is not valid ({error}): the parameters are language, customerId, dialogId, since, \
                 until and order, each at most once"
            ),
        )
    })?;
    let filter = message_filter(
        parameters.language.as_deref(),
        parameters.customer_id,
        parameters.dialog_id,
        parameters.since.as_deref(),
        parameters.until.as_deref(),
    )?;
    let order = match parameters.order {
        Some(ListingOrder::NewestFirst) => ListOrder::NewestFirst,
        None | Some(ListingOrder::OldestFirst) => ListOrder::OldestFirst,
    };
    Ok((filter, order))
}

/// What is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Export {
    Messages,
    Changes,
}

async fn export(
    State(state): State<AppState>,
    request: Request,
    format: Format,
    what: Export,
) -> Response {
    let answer = start_export(&state, request, format, what).await;
    respond(&state, answer)
}

async fn start_export(state: &AppState, request: Request, format: Format, what: Export) -> Answer {
    let (parts, _) = request.into_parts();
    let operation = match what {
        Export::Messages => "GET /export/messages.*",
        Export::Changes => "GET /export/changes.*",
    };
    let ticket = admit(state, &parts, Permission::Read, operation)?;
    let query = parts.uri.query().unwrap_or_default();
    match what {
        Export::Messages => {
            let (filter, order) = parse_export(query)?;
            stream(state, ticket, format, MessageSource { filter, order }, None).await
        }
        Export::Changes => {
            let after = parse_change_export(query)?;
            let through = state.service.change_horizon("after", after).await?;
            let token = HeaderValue::from(through);
            let source = ChangeSource {
                after: after.0,
                through,
            };
            stream(state, ticket, format, source, Some(token)).await
        }
    }
}

/// Answers with the rows of `source` as one file in `format`, streamed.
async fn stream<S: Source>(
    state: &AppState,
    ticket: Option<crate::admission::Ticket>,
    format: Format,
    source: S,
    change_token: Option<HeaderValue>,
) -> Answer {
    let permit = state.exports.clone().try_acquire_owned().map_err(|_| {
        let mut refusal = Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "EXPORT_BUSY",
            format!(
                "{EXPORTS_AT_ONCE} exports are running already: retry in a few seconds, or export \
                 less at a time (a time range)"
            ),
        );
        refusal.retry_after = Some(5);
        refusal
    })?;
    // The first batch before answering: a database that fails now gets a 503 with advice, not a download
    // that breaks off.
    let first = source.batch(&state.service, None).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
    let service = state.service.clone();
    tokio::spawn(async move {
        // The export counts as the client's request in flight until it ends.
        let _ticket = ticket;
        let _permit = permit;
        let started = std::time::Instant::now();
        let exported = produce(&service, &source, format, first, &sender).await;
        let metrics = service.metrics();
        let label = format!("export:{}:{}", S::NAME, format.extension());
        metrics.operations.with_label_values(&[&label]).inc();
        metrics
            .operation_seconds
            .with_label_values(&[&label])
            .observe(started.elapsed().as_secs_f64());
        if let Err(error) = exported {
            tracing::warn!(%error, "an export broke off");
            // The client sees the transfer end without its last chunk: an incomplete file, never a short
            // one that looks whole.
            let _ = sender.send(Err(std::io::Error::other(error))).await;
        }
    });
    // Fused: the compression layer may poll once more after the end.
    let body = Body::from_stream(futures::StreamExt::fuse(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|chunk| (chunk, receiver)) },
    )));
    let disposition = format!(
        "attachment; filename=\"{}.{}\"",
        S::NAME,
        format.extension()
    );
    let mut response = (
        [
            (header::CONTENT_TYPE, format.media_type()),
            (header::CONTENT_DISPOSITION, disposition.as_str()),
        ],
        body,
    )
        .into_response();
    if let Some(token) = change_token {
        response.headers_mut().insert(CHANGE_TOKEN_HEADER, token);
    }
    Ok(response)
}

/// Where an export's rows come from, a batch at a time.
#[async_trait::async_trait]
trait Source: Send + Sync + 'static {
    type Row: Row;
    /// Names the file and the metric.
    const NAME: &'static str;
    /// The rows after `last` (from the start without it), at most [`BATCH`].
    async fn batch(
        &self,
        service: &crate::service::DialogService,
        last: Option<&Self::Row>,
    ) -> Result<Vec<Self::Row>, ApiError>;
}

struct MessageSource {
    filter: MessageFilter,
    order: ListOrder,
}

#[async_trait::async_trait]
impl Source for MessageSource {
    type Row = Message;
    const NAME: &'static str = "messages";

    async fn batch(
        &self,
        service: &crate::service::DialogService,
        last: Option<&Message>,
    ) -> Result<Vec<Message>, ApiError> {
        let last = last.map(message_key);
        service
            .export_batch(&self.filter, last.as_ref(), self.order, BATCH)
            .await
    }
}

/// The changes in `(after, through]`: `through` is read once, when the export starts, so that a download
/// ends and its token covers exactly what it holds.
struct ChangeSource {
    after: i64,
    through: i64,
}

#[async_trait::async_trait]
impl Source for ChangeSource {
    type Row = Change;
    const NAME: &'static str = "changes";

    async fn batch(
        &self,
        service: &crate::service::DialogService,
        last: Option<&Change>,
    ) -> Result<Vec<Change>, ApiError> {
        let after = last.map_or(self.after, Change::number);
        service.change_batch(after, self.through, BATCH).await
    }
}

/// Encodes and sends every batch; stops early (with `Ok`) when the client went away.
async fn produce<S: Source>(
    service: &crate::service::DialogService,
    source: &S,
    format: Format,
    first: Vec<S::Row>,
    sender: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<(), String> {
    let mut encoder = Encoder::<S::Row>::new(format)?;
    let mut batch = first;
    loop {
        let more = batch.len() == BATCH;
        // Encoding is CPU work: off the threads that serve requests.
        let (returned, bytes, batch_back) = tokio::task::spawn_blocking(move || {
            let bytes = encoder.encode(&batch);
            (encoder, bytes, batch)
        })
        .await
        .map_err(|error| error.to_string())?;
        encoder = returned;
        let bytes = bytes?;
        if !bytes.is_empty() && sender.send(Ok(bytes.into())).await.is_err() {
            return Ok(());
        }
        let Some(last) = batch_back.last().filter(|_| more) else {
            break;
        };
        batch = source
            .batch(service, Some(last))
            .await
            .map_err(|error| error.message())?;
    }
    let tail = tokio::task::spawn_blocking(move || encoder.finish())
        .await
        .map_err(|error| error.to_string())??;
    if !tail.is_empty() {
        let _ = sender.send(Ok(tail.into())).await;
    }
    Ok(())
}

/// A `Write` whose bytes are taken out after each batch: what the Parquet writer has written so far.
#[derive(Clone, Default)]
struct Drain(Arc<Mutex<Vec<u8>>>);

impl Drain {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.lock().expect("the export buffer"))
    }
}

impl Write for Drain {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("the export buffer")
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A row of an export: the same columns, named as in NDJSON and CSV, in every format.
trait Row: Send + Sync + Sized + 'static {
    const COLUMNS: &'static [&'static str];
    fn parquet_schema() -> Schema;
    fn parquet_columns(rows: &[Self]) -> Vec<ArrayRef>;
    fn write_csv(&self, writer: &mut csv::Writer<Vec<u8>>) -> csv::Result<()>;
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn time(name: &str, nullable: bool) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        nullable,
    )
}

fn strings<'a, T: 'a>(rows: &'a [T], get: impl Fn(&'a T) -> Option<&'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter(rows.iter().map(get)))
}

fn times<T>(rows: &[T], get: impl Fn(&T) -> Option<i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter(rows.iter().map(get)).with_timezone("UTC"))
}

/// The columns of the message export (the GraphQL and REST field names).
const MESSAGE_COLUMNS: [&str; 7] = [
    "id",
    "messageId",
    "dialogId",
    "customerId",
    "language",
    "createdAt",
    "text",
];

impl Row for Message {
    const COLUMNS: &'static [&'static str] = &MESSAGE_COLUMNS;

    fn parquet_schema() -> Schema {
        Schema::new(vec![
            text("id", false),
            text("messageId", true),
            text("dialogId", false),
            text("customerId", false),
            text("language", false),
            time("createdAt", false),
            text("text", false),
        ])
    }

    fn parquet_columns(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            strings(rows, |m| Some(m.id.as_str())),
            strings(rows, |m| m.client_id.as_ref().map(|id| id.as_str())),
            strings(rows, |m| Some(m.dialog_id.as_str())),
            strings(rows, |m| Some(m.customer_id.as_str())),
            strings(rows, |m| Some(m.language.as_str())),
            times(rows, |m| Some(m.created_at)),
            strings(rows, |m| Some(m.text.as_str())),
        ]
    }

    fn write_csv(&self, writer: &mut csv::Writer<Vec<u8>>) -> csv::Result<()> {
        let created_at = crate::model::rfc3339(self.created_at);
        writer.write_record([
            self.id.as_str(),
            self.client_id.as_ref().map_or("", |id| id.as_str()),
            self.dialog_id.as_str(),
            self.customer_id.as_str(),
            self.language.as_str(),
            created_at.as_str(),
            self.text.as_str(),
        ])
    }

    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(out, &RecordedMessage::from(self.clone()))
    }
}

/// One change as exported: `kind` says which fields it has (JSON: the others are null; CSV: empty).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangeRow<'a> {
    /// The change's position in the feed; the largest one downloaded is the token for next time.
    change: i64,
    /// `stored`: a message was stored. `withdrawn`, `erased`: the dialog `dialogId` was removed whole, so
    /// drop every message of it copied before this change.
    kind: &'a str,
    dialog_id: &'a str,
    id: Option<&'a str>,
    message_id: Option<&'a str>,
    customer_id: Option<&'a str>,
    language: Option<&'a str>,
    #[schema(format = DateTime)]
    created_at: Option<String>,
    text: Option<&'a str>,
    #[schema(format = DateTime)]
    removed_at: Option<String>,
}

/// The columns of the change export.
const CHANGE_COLUMNS: [&str; 10] = [
    "change",
    "kind",
    "dialogId",
    "id",
    "messageId",
    "customerId",
    "language",
    "createdAt",
    "text",
    "removedAt",
];

impl Change {
    fn kind(&self) -> &'static str {
        match self {
            Self::Stored { .. } => "stored",
            Self::Removed { reason, .. } => reason.as_str(),
        }
    }

    fn dialog_id(&self) -> &str {
        match self {
            Self::Stored { message, .. } => message.dialog_id.as_str(),
            Self::Removed { dialog_id, .. } => dialog_id.as_str(),
        }
    }

    fn message(&self) -> Option<&Message> {
        match self {
            Self::Stored { message, .. } => Some(message),
            Self::Removed { .. } => None,
        }
    }

    fn removed_at(&self) -> Option<i64> {
        match self {
            Self::Stored { .. } => None,
            Self::Removed { at, .. } => Some(*at),
        }
    }
}

impl<'a> From<&'a Change> for ChangeRow<'a> {
    fn from(change: &'a Change) -> Self {
        let message = change.message();
        Self {
            change: change.number(),
            kind: change.kind(),
            dialog_id: change.dialog_id(),
            id: message.map(|m| m.id.as_str()),
            message_id: message.and_then(|m| m.client_id.as_ref().map(|id| id.as_str())),
            customer_id: message.map(|m| m.customer_id.as_str()),
            language: message.map(|m| m.language.as_str()),
            created_at: message.map(|m| crate::model::rfc3339(m.created_at)),
            text: message.map(|m| m.text.as_str()),
            removed_at: change.removed_at().map(crate::model::rfc3339),
        }
    }
}

impl Row for Change {
    const COLUMNS: &'static [&'static str] = &CHANGE_COLUMNS;

    fn parquet_schema() -> Schema {
        Schema::new(vec![
            Field::new("change", DataType::Int64, false),
            text("kind", false),
            text("dialogId", false),
            text("id", true),
            text("messageId", true),
            text("customerId", true),
            text("language", true),
            time("createdAt", true),
            text("text", true),
            time("removedAt", true),
        ])
    }

    fn parquet_columns(rows: &[Self]) -> Vec<ArrayRef> {
        vec![
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(Change::number),
            )),
            strings(rows, |c| Some(c.kind())),
            strings(rows, |c| Some(c.dialog_id())),
            strings(rows, |c| c.message().map(|m| m.id.as_str())),
            strings(rows, |c| {
                c.message()
                    .and_then(|m| m.client_id.as_ref().map(|id| id.as_str()))
            }),
            strings(rows, |c| c.message().map(|m| m.customer_id.as_str())),
            strings(rows, |c| c.message().map(|m| m.language.as_str())),
            times(rows, |c| c.message().map(|m| m.created_at)),
            strings(rows, |c| c.message().map(|m| m.text.as_str())),
            times(rows, Change::removed_at),
        ]
    }

    fn write_csv(&self, writer: &mut csv::Writer<Vec<u8>>) -> csv::Result<()> {
        let row = ChangeRow::from(self);
        let number = row.change.to_string();
        writer.write_record([
            number.as_str(),
            row.kind,
            row.dialog_id,
            row.id.unwrap_or_default(),
            row.message_id.unwrap_or_default(),
            row.customer_id.unwrap_or_default(),
            row.language.unwrap_or_default(),
            row.created_at.as_deref().unwrap_or_default(),
            row.text.unwrap_or_default(),
            row.removed_at.as_deref().unwrap_or_default(),
        ])
    }

    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(out, &ChangeRow::from(self))
    }
}

/// Turns batches of rows into the bytes of one file.
enum Encoder<R: Row> {
    Ndjson,
    Csv {
        header_written: bool,
    },
    Parquet {
        // Boxed: the writer is large, the other formats hold nothing.
        writer: Box<ArrowWriter<Drain>>,
        out: Drain,
        schema: Arc<Schema>,
        rows: std::marker::PhantomData<R>,
    },
}

impl<R: Row> Encoder<R> {
    fn new(format: Format) -> Result<Self, String> {
        Ok(match format {
            Format::Ndjson => Self::Ndjson,
            Format::Csv => Self::Csv {
                header_written: false,
            },
            Format::Parquet => {
                let schema = Arc::new(R::parquet_schema());
                let properties = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(ROW_GROUP))
                    .build();
                let out = Drain::default();
                let writer = ArrowWriter::try_new(out.clone(), schema.clone(), Some(properties))
                    .map_err(|error| error.to_string())?;
                Self::Parquet {
                    writer: Box::new(writer),
                    out,
                    schema,
                    rows: std::marker::PhantomData,
                }
            }
        })
    }

    /// The bytes of `batch`, ready to send (for Parquet, the row groups completed so far).
    fn encode(&mut self, batch: &[R]) -> Result<Vec<u8>, String> {
        match self {
            Self::Ndjson => {
                let mut out = Vec::with_capacity(batch.len() * 256);
                for row in batch {
                    row.write_json(&mut out)
                        .map_err(|error| error.to_string())?;
                    out.push(b'\n');
                }
                Ok(out)
            }
            Self::Csv { header_written } => {
                let mut writer = csv::Writer::from_writer(Vec::with_capacity(batch.len() * 256));
                if !*header_written {
                    writer
                        .write_record(R::COLUMNS)
                        .map_err(|error| error.to_string())?;
                    *header_written = true;
                }
                for row in batch {
                    row.write_csv(&mut writer)
                        .map_err(|error| error.to_string())?;
                }
                writer.into_inner().map_err(|error| error.to_string())
            }
            Self::Parquet {
                writer,
                out,
                schema,
                ..
            } => {
                let records = RecordBatch::try_new(schema.clone(), R::parquet_columns(batch))
                    .map_err(|error| error.to_string())?;
                writer.write(&records).map_err(|error| error.to_string())?;
                Ok(out.take())
            }
        }
    }

    /// The file's last bytes (Parquet: the last row group and the footer).
    fn finish(self) -> Result<Vec<u8>, String> {
        match self {
            Self::Ndjson => Ok(Vec::new()),
            Self::Csv { header_written } => {
                if header_written {
                    return Ok(Vec::new());
                }
                // No row at all: the header alone.
                let mut writer = csv::Writer::from_writer(Vec::new());
                writer
                    .write_record(R::COLUMNS)
                    .map_err(|error| error.to_string())?;
                writer.into_inner().map_err(|error| error.to_string())
            }
            Self::Parquet { writer, out, .. } => {
                writer.close().map_err(|error| error.to_string())?;
                Ok(out.take())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CustomerId, DialogId, Language};

    fn message(n: i64, text: &str) -> Message {
        let dialog_id = DialogId::from_trusted("d".into());
        Message {
            id: format!("m{n}"),
            client_id: (n % 2 == 0)
                .then(|| crate::model::ClientMessageId::from_trusted(format!("k{n}"))),
            dialog_id,
            customer_id: CustomerId::from_trusted("c".into()),
            text: crate::model::MessageText::from_trusted(text.into()),
            language: Language::from_trusted("en".into()),
            created_at: 1_795_856_400_000 + n,
            seq: (1_795_856_400_000 + n) * 1000,
        }
    }

    #[test]
    fn csv_quotes_what_needs_it_and_writes_the_header_once() {
        let mut encoder = Encoder::<Message>::new(Format::Csv).unwrap();
        let mut out = encoder
            .encode(&[message(0, "plain"), message(1, "a, \"quoted\"\nline")])
            .unwrap();
        out.extend(encoder.encode(&[message(2, "more")]).unwrap());
        out.extend(encoder.finish().unwrap());
        let mut reader = csv::Reader::from_reader(out.as_slice());
        assert_eq!(reader.headers().unwrap(), MESSAGE_COLUMNS.as_slice());
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(&rows[1][6], "a, \"quoted\"\nline");
        assert_eq!(&rows[1][1], "");
        assert_eq!(&rows[0][5], "2026-11-28T09:00:00.000Z");
        // No message: the header alone.
        let empty = Encoder::<Message>::new(Format::Csv)
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(
            String::from_utf8(empty).unwrap().trim(),
            MESSAGE_COLUMNS.join(",")
        );
    }

    #[test]
    fn parquet_comes_out_whole_with_typed_columns() {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let mut encoder = Encoder::<Message>::new(Format::Parquet).unwrap();
        let mut out = Vec::new();
        for chunk in 0..3 {
            let batch: Vec<Message> = (0..1000)
                .map(|n| message(chunk * 1000 + n, "text"))
                .collect();
            out.extend(encoder.encode(&batch).unwrap());
        }
        out.extend(encoder.finish().unwrap());
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(out))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
        assert_eq!(
            batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
            3000
        );
        let schema = batches[0].schema();
        assert_eq!(
            schema.field_with_name("createdAt").unwrap().data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
        );
        assert!(schema.field_with_name("messageId").unwrap().is_nullable());
        assert_eq!(batches[0].column(1).null_count(), batches[0].num_rows() / 2);
    }

    #[test]
    fn export_parameters_refuse_what_they_cannot_honour() {
        assert_eq!(parse_export("").unwrap().1, ListOrder::OldestFirst);
        assert_eq!(
            parse_export("order=NEWEST_FIRST").unwrap().1,
            ListOrder::NewestFirst
        );
        for query in [
            "limit=5",
            "cursor=x",
            "language=english",
            "since=soon",
            "order=UP",
        ] {
            assert!(parse_export(query).is_err(), "{query}");
        }
    }
}
