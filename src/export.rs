//! Bulk export of the stored messages for analysis: `GET /export/messages.ndjson`, `.csv` and `.parquet`,
//! with the filters and time range of `messages` (`read` role). The answer is streamed: the messages are
//! read in batches by keyset (each batch one indexed query, none held open), encoded a batch at a time off the
//! async threads, and sent through a channel of two chunks, so that memory stays constant whatever the
//! export's size and a slow client slows the reading down instead of filling memory. NDJSON and CSV are
//! gzip-compressed when the client accepts it; Parquet is compressed inside (Snappy).

use std::io::Write;
use std::sync::{Arc, Mutex};

use arrow_array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Deserialize;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};

use crate::auth::Permission;
use crate::error::ApiError;
use crate::http::{AppState, Rejection};
use crate::model::Message;
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

    fn file_name(self) -> &'static str {
        match self {
            Self::Ndjson => "attachment; filename=\"messages.ndjson\"",
            Self::Csv => "attachment; filename=\"messages.csv\"",
            Self::Parquet => "attachment; filename=\"messages.parquet\"",
        }
    }
}

pub fn routes(cors: &crate::cors::AllowedOrigins) -> Router<AppState> {
    let routes = Router::new()
        .route("/export/messages.ndjson", get(export_ndjson))
        .route("/export/messages.csv", get(export_csv))
        .route("/export/messages.parquet", get(export_parquet))
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
        (status = 401, description = "No valid API key (`UNAUTHENTICATED`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's role may not read (`FORBIDDEN`), or the host is not served (`HOST_NOT_ALLOWED`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`EXPORT_BUSY` or `STORE_UNAVAILABLE`: retry after Retry-After", body = crate::rest::Problem, content_type = "application/problem+json"),
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_ndjson(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Ndjson).await
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
        (status = 401, description = "No valid API key (`UNAUTHENTICATED`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's role may not read (`FORBIDDEN`), or the host is not served (`HOST_NOT_ALLOWED`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`EXPORT_BUSY` or `STORE_UNAVAILABLE`: retry after Retry-After", body = crate::rest::Problem, content_type = "application/problem+json"),
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_csv(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Csv).await
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
        (status = 401, description = "No valid API key (`UNAUTHENTICATED`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key's role may not read (`FORBIDDEN`), or the host is not served (`HOST_NOT_ALLOWED`)", body = crate::rest::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`EXPORT_BUSY` or `STORE_UNAVAILABLE`: retry after Retry-After", body = crate::rest::Problem, content_type = "application/problem+json"),
    ),
    security((), ("apiKey" = [])),
)]
pub async fn export_parquet(state: State<AppState>, request: Request) -> Response {
    export(state, request, Format::Parquet).await
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

async fn export(State(state): State<AppState>, request: Request, format: Format) -> Response {
    let answer = start_export(&state, request, format).await;
    respond(&state, answer)
}

async fn start_export(state: &AppState, request: Request, format: Format) -> Answer {
    let (parts, _) = request.into_parts();
    let ticket = admit(state, &parts, Permission::Read, "GET /export/messages.*")?;
    let (filter, order) = parse_export(parts.uri.query().unwrap_or_default())?;
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
    let first = state
        .service
        .export_batch(&filter, None, order, BATCH)
        .await?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(2);
    let service = state.service.clone();
    tokio::spawn(async move {
        // The export counts as the client's request in flight until it ends.
        let _ticket = ticket;
        let _permit = permit;
        let started = std::time::Instant::now();
        let exported = produce(&service, &filter, order, format, first, &sender).await;
        let metrics = service.metrics();
        let label = match format {
            Format::Ndjson => "export:ndjson",
            Format::Csv => "export:csv",
            Format::Parquet => "export:parquet",
        };
        metrics.operations.with_label_values(&[label]).inc();
        metrics
            .operation_seconds
            .with_label_values(&[label])
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
    Ok((
        [
            (header::CONTENT_TYPE, format.media_type()),
            (header::CONTENT_DISPOSITION, format.file_name()),
        ],
        body,
    )
        .into_response())
}

/// Encodes and sends every batch; stops early (with `Ok`) when the client went away.
async fn produce(
    service: &crate::service::DialogService,
    filter: &MessageFilter,
    order: ListOrder,
    format: Format,
    first: Vec<Message>,
    sender: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<(), String> {
    let mut encoder = Encoder::new(format)?;
    let mut batch = first;
    loop {
        let last = batch.last().map(message_key);
        let more = batch.len() == BATCH;
        // Encoding is CPU work: off the threads that serve requests.
        let (returned, bytes) = tokio::task::spawn_blocking(move || {
            let bytes = encoder.encode(&batch);
            (encoder, bytes)
        })
        .await
        .map_err(|error| error.to_string())?;
        encoder = returned;
        let bytes = bytes?;
        if !bytes.is_empty() && sender.send(Ok(bytes.into())).await.is_err() {
            return Ok(());
        }
        let Some(last) = last.filter(|_| more) else {
            break;
        };
        batch = service
            .export_batch(filter, Some(&last), order, BATCH)
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

/// Turns batches of messages into the bytes of one file.
enum Encoder {
    Ndjson,
    Csv {
        header_written: bool,
    },
    Parquet {
        // Boxed: the writer is large, the other formats hold nothing.
        writer: Box<ArrowWriter<Drain>>,
        out: Drain,
        schema: Arc<Schema>,
    },
}

/// The columns of every format, as named in NDJSON and CSV (the GraphQL and REST field names).
const COLUMNS: [&str; 7] = [
    "id",
    "messageId",
    "dialogId",
    "customerId",
    "language",
    "createdAt",
    "text",
];

impl Encoder {
    fn new(format: Format) -> Result<Self, String> {
        Ok(match format {
            Format::Ndjson => Self::Ndjson,
            Format::Csv => Self::Csv {
                header_written: false,
            },
            Format::Parquet => {
                let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
                let schema = Arc::new(Schema::new(vec![
                    text(COLUMNS[0], false),
                    text(COLUMNS[1], true),
                    text(COLUMNS[2], false),
                    text(COLUMNS[3], false),
                    text(COLUMNS[4], false),
                    Field::new(
                        COLUMNS[5],
                        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                        false,
                    ),
                    text(COLUMNS[6], false),
                ]));
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
                }
            }
        })
    }

    /// The bytes of `batch`, ready to send (for Parquet, the row groups completed so far).
    fn encode(&mut self, batch: &[Message]) -> Result<Vec<u8>, String> {
        match self {
            Self::Ndjson => {
                let mut out = Vec::with_capacity(batch.len() * 256);
                for message in batch {
                    serde_json::to_writer(&mut out, &RecordedMessage::from(message.clone()))
                        .map_err(|error| error.to_string())?;
                    out.push(b'\n');
                }
                Ok(out)
            }
            Self::Csv { header_written } => {
                let mut writer = csv::Writer::from_writer(Vec::with_capacity(batch.len() * 256));
                if !*header_written {
                    writer
                        .write_record(COLUMNS)
                        .map_err(|error| error.to_string())?;
                    *header_written = true;
                }
                for message in batch {
                    let created_at = crate::model::rfc3339(message.created_at);
                    writer
                        .write_record([
                            message.id.as_str(),
                            message.client_id.as_ref().map_or("", |id| id.as_str()),
                            message.dialog_id.as_str(),
                            message.customer_id.as_str(),
                            message.language.as_str(),
                            created_at.as_str(),
                            message.text.as_str(),
                        ])
                        .map_err(|error| error.to_string())?;
                }
                writer.into_inner().map_err(|error| error.to_string())
            }
            Self::Parquet {
                writer,
                out,
                schema,
            } => {
                let strings = |get: &dyn Fn(&Message) -> &str| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(batch.iter().map(get)))
                };
                let columns: Vec<ArrayRef> = vec![
                    strings(&|m| m.id.as_str()),
                    Arc::new(StringArray::from_iter(
                        batch
                            .iter()
                            .map(|m| m.client_id.as_ref().map(|id| id.as_str())),
                    )),
                    strings(&|m| m.dialog_id.as_str()),
                    strings(&|m| m.customer_id.as_str()),
                    strings(&|m| m.language.as_str()),
                    Arc::new(
                        TimestampMillisecondArray::from_iter_values(
                            batch.iter().map(|m| m.created_at),
                        )
                        .with_timezone("UTC"),
                    ),
                    strings(&|m| m.text.as_str()),
                ];
                let records = RecordBatch::try_new(schema.clone(), columns)
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
                // No message at all: the header alone.
                let mut writer = csv::Writer::from_writer(Vec::new());
                writer
                    .write_record(COLUMNS)
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
        let mut encoder = Encoder::new(Format::Csv).unwrap();
        let mut out = encoder
            .encode(&[message(0, "plain"), message(1, "a, \"quoted\"\nline")])
            .unwrap();
        out.extend(encoder.encode(&[message(2, "more")]).unwrap());
        out.extend(encoder.finish().unwrap());
        let mut reader = csv::Reader::from_reader(out.as_slice());
        assert_eq!(reader.headers().unwrap(), COLUMNS.as_slice());
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(&rows[1][6], "a, \"quoted\"\nline");
        assert_eq!(&rows[1][1], "");
        assert_eq!(&rows[0][5], "2026-11-28T09:00:00.000Z");
        // No message: the header alone.
        let empty = Encoder::new(Format::Csv).unwrap().finish().unwrap();
        assert_eq!(String::from_utf8(empty).unwrap().trim(), COLUMNS.join(","));
    }

    #[test]
    fn parquet_comes_out_whole_with_typed_columns() {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let mut encoder = Encoder::new(Format::Parquet).unwrap();
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
