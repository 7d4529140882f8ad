//! How one GraphQL operation runs, between the HTTP layer and async-graphql: documents are parsed once,
//! fully validated once, and every error leaves with an `extensions.code`.
//!
//! The background job sends the same few documents over and over with new variables, and async-graphql
//! would parse and fully validate each of them every time, which costs more than everything DataAPI itself
//! does for a push. GraphQL validation is a property of the document and the schema; only the variable
//! values change between requests (the spec checks them separately, when coercing variables). So:
//! - a document is parsed once and kept (bounded: see `DocumentCache`);
//! - the first time, it runs with full validation (async-graphql's strict mode, which checks the variable
//!   values too);
//! - once it has passed full validation with one operation and every variable it declares present, later
//!   requests with the same text run in async-graphql's fast mode (which still enforces the depth and complexity limits, with
//!   the request's own variables) provided [`InputTypes`] finds their variable values certainly valid;
//!   anything it is not sure about gets full validation again, and so the very same answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationDefinition, Selection,
};
use async_graphql::{ErrorExtensionValues, Request, Response, ServerError, ValidationMode};

use crate::schema::{self, DataApiSchema, Limits};
use crate::service::DialogService;
use crate::variables::InputTypes;

/// A thread of its own, with a single-threaded runtime, for the CPU-heavy part of requests: parsing and
/// validating a document the service has not seen before costs time that grows with the document (a
/// hundred kilobytes of aliases, thousands of fragments), and on the main runtime's threads it would hold
/// up every other client, pushes and `/health` included. On this lane such requests queue behind each
/// other instead (a client has at most `CLIENT_CONCURRENT_REQUESTS` of them), and the operating system
/// gives it only the time the main runtime leaves (see [`lower_this_threads_priority`]). Known light
/// documents (the background job's) never come here.
struct HeavyLane {
    handle: tokio::runtime::Handle,
    /// Dropped with the executor: ends the lane's thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl HeavyLane {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the heavy lane");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("dataapi-heavy".to_owned())
            .spawn(move || {
                ON_HEAVY_LANE.set(true);
                lower_this_threads_priority();
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .expect("a thread for the heavy lane");
        Self {
            handle,
            _stop: stop,
        }
    }

    /// Runs `work` on the lane; dropping the returned future (the request timed out, the client left)
    /// aborts it at its next await.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let task = self.handle.spawn(work);
        let _abort = AbortOnDrop(task.abort_handle());
        match task.await {
            Ok(output) => output,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => panic!("the heavy lane stopped under a request: {error}"),
        }
    }
}

thread_local! {
    /// True on the heavy lane's thread, which polls every task of the lane's runtime.
    static ON_HEAVY_LANE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling code runs on the heavy lane (its store calls then share a few permits: see
/// `store::guarded`).
pub fn on_heavy_lane() -> bool {
    ON_HEAVY_LANE.get()
}

/// The idle scheduling class for the calling thread (`SCHED_IDLE`; threads it starts inherit it): the heavy
/// lane runs at full speed on cores nothing else wants, and gives way at once when a thread of the main
/// runtime wakes up, so that clients with known light documents (pushes) and the probes come first. (At
/// nice 10 it held the core for a scheduler slice after such a wake-up: the pushes' p99 tripled under
/// attack; see BENCHMARKS.md.) While the cores are saturated, its requests wait: the ingest goes first.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and sched_setscheduler take plain integers and a pointer to a live local; a failure
    // only leaves the priority as it was.
    unsafe {
        let thread = libc::gettid();
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(thread, libc::SCHED_IDLE, &param) != 0 {
            tracing::warn!("cannot lower the priority of the heavy lane's thread");
        }
    }
}

pub struct Executor {
    /// Every validation rule, variable values included.
    strict: DataApiSchema,
    /// For documents that passed full validation before, with variables checked by `inputs`.
    prevalidated: DataApiSchema,
    inputs: InputTypes,
    documents: DocumentCache,
    /// MAX_QUERY_COMPLEXITY: also the bound on a document's selections with its fragments spread.
    max_complexity: usize,
    heavy: HeavyLane,
    /// Operations run with full validation, and with the document validated before.
    fully_validated: prometheus::IntCounter,
    prevalidated_runs: prometheus::IntCounter,
    /// Operations run on the main runtime, and on the heavy lane.
    main_lane_runs: prometheus::IntCounter,
    heavy_lane_runs: prometheus::IntCounter,
}

/// An operation's response, and the label it is counted under in the metrics.
pub struct Executed {
    pub label: Arc<str>,
    /// The response's errors: which codes to count, which status to answer with.
    pub errors: Vec<ServerError>,
    /// Whether it has data (some of it succeeded).
    pub has_data: bool,
    /// Refused before execution (parse, validation, cost): then `json` has no `data` entry at all, as the
    /// GraphQL spec says of request errors.
    pub request_error: bool,
    /// The response as the client gets it.
    pub json: Vec<u8>,
}

/// An operation's response before it is serialized.
struct Ran {
    label: Arc<str>,
    response: Response,
    /// Refused before execution (not parsed, not valid, too costly): a GraphQL "request error".
    request_error: bool,
}

impl Ran {
    fn serialized(self) -> Executed {
        let json = if self.request_error {
            serde_json::to_vec(&serde_json::json!({ "errors": &self.response.errors }))
        } else {
            serde_json::to_vec(&self.response)
        }
        .expect("a GraphQL response serializes");
        Executed {
            label: self.label,
            has_data: !matches!(self.response.data, async_graphql::Value::Null),
            request_error: self.request_error,
            errors: self.response.errors,
            json,
        }
    }
}

impl Executor {
    /// The schema with every validation rule, for subscriptions (run by the WebSocket transport).
    pub fn schema(&self) -> &DataApiSchema {
        &self.strict
    }

    pub fn new(service: Arc<DialogService>, limits: Limits, introspection: bool) -> Self {
        let strict = schema::build(
            service.clone(),
            limits,
            introspection,
            ValidationMode::Strict,
        );
        let inputs = InputTypes::from_sdl(&strict.sdl()).expect("the schema's own SDL parses");
        Self {
            fully_validated: service.metrics().validations.with_label_values(&["full"]),
            prevalidated_runs: service
                .metrics()
                .validations
                .with_label_values(&["prevalidated"]),
            main_lane_runs: service.metrics().lanes.with_label_values(&["main"]),
            heavy_lane_runs: service.metrics().lanes.with_label_values(&["heavy"]),
            prevalidated: schema::build(service, limits, introspection, ValidationMode::Fast),
            strict,
            inputs,
            documents: DocumentCache::default(),
            max_complexity: limits.max_query_complexity,
            heavy: HeavyLane::start(),
        }
    }

    /// Runs one operation. The caller has put the request's data (caller, loader, `allowance`) in
    /// already. A document seen before that proved light runs here; a new one, or one that proved heavy,
    /// on the heavy lane (see [`HeavyLane`]).
    pub async fn execute(
        self: &Arc<Self>,
        request: Request,
        allowance: &schema::RequestAllowance,
    ) -> Executed {
        let known = self.documents.get(&request.query);
        if let Some(light) = known
            .as_ref()
            .filter(|known| !known.heavy.load(Ordering::Relaxed))
        {
            self.main_lane_runs.inc();
            return self
                .run(request, Some(light.clone()), allowance)
                .await
                .serialized();
        }
        self.heavy_lane_runs.inc();
        let executor = self.clone();
        let allowance = allowance.clone();
        // Serialized on the lane too: a storm's answer (thousands of errors) is megabytes of JSON.
        self.heavy
            .run(async move { executor.run(request, known, &allowance).await.serialized() })
            .await
    }

    async fn run(
        &self,
        mut request: Request,
        known: Option<Arc<KnownDocument>>,
        allowance: &schema::RequestAllowance,
    ) -> Ran {
        let fresh;
        let document = match &known {
            Some(known) => &known.document,
            None => match async_graphql::parser::parse_query(&request.query) {
                Ok(document) => {
                    fresh = document;
                    &fresh
                }
                Err(error) => {
                    return Ran {
                        label: "invalid".into(),
                        response: refusal(error.into(), "GRAPHQL_PARSE_FAILED"),
                        request_error: true,
                    };
                }
            },
        };
        // Before anything walks the document with its fragments spread (validation does, at every spread).
        let mut expanded = 0;
        if known.is_none() {
            expanded = crate::expansion::expanded_selections(document);
            if expanded > self.max_complexity as u64 {
                return Ran {
                    label: "invalid".into(),
                    response: refusal(
                        ServerError::new(
                            format!(
                                "the query stands for {expanded} selections once its fragments are \
                                 spread where they are used, more than MAX_QUERY_COMPLEXITY ({}) allows \
                                 (every field, alias and fragment spread counts at every place it \
                                 expands to): spread fragments fewer times, or split the query",
                                self.max_complexity
                            ),
                            None,
                        ),
                        "QUERY_TOO_COMPLEX",
                    ),
                    request_error: true,
                };
            }
        }
        let operation = match select_operation(document, request.operation_name.as_deref()) {
            Ok(operation) => operation,
            Err(message) => {
                return Ran {
                    label: "other".into(),
                    response: refusal(ServerError::new(message, None), "OPERATION_NOT_FOUND"),
                    request_error: true,
                };
            }
        };
        // Kept with a known document of one operation: a push should not build its label every time.
        let label = match &known {
            Some(known) if matches!(document.operations, DocumentOperations::Single(_)) => {
                known.label.get_or_init(|| label(operation).into()).clone()
            }
            _ => label(operation).into(),
        };
        let declared = &operation.variable_definitions;
        // Whether full validation checked every argument: async-graphql skips an argument whose variable is
        // missing, and the variables of operations other than the one selected.
        let checks_every_argument = document.operations.iter().count() == 1
            && declared
                .iter()
                .all(|variable| request.variables.contains_key(&variable.node.name.node));
        let prevalidated = known
            .as_ref()
            .is_some_and(|known| known.validated.load(Ordering::Relaxed))
            && self.inputs.accept(declared, &request.variables);

        let to_keep = (known.is_none() && request.query.len() <= DocumentCache::MAX_QUERY_BYTES)
            .then(|| (request.query.clone(), document.clone()));
        request.set_parsed_query(document.clone());
        let spent_before = allowance.spent();
        let mut response = if prevalidated {
            self.prevalidated_runs.inc();
            self.prevalidated.execute(request).await
        } else {
            self.fully_validated.inc();
            self.strict.execute(request).await
        };
        let refused = give_codes(&mut response);
        let spent_after = allowance.spent();
        let heavy = expanded > LIGHT_SELECTIONS
            || spent_after.0 - spent_before.0 > LIGHT_STORE_CALLS
            || spent_after.1 - spent_before.1 > LIGHT_MESSAGES
            || response.errors.iter().any(hit_a_request_allowance);
        if let Some(known) = &known
            && heavy
        {
            known.heavy.store(true, Ordering::Relaxed);
        }
        if !prevalidated && !refused {
            match (known, to_keep) {
                (Some(known), _) if checks_every_argument => {
                    known.validated.store(true, Ordering::Relaxed)
                }
                (None, Some((query, document))) => {
                    self.documents
                        .keep(query, document, checks_every_argument, heavy)
                }
                _ => {}
            }
        }
        Ran {
            label,
            response,
            request_error: refused,
        }
    }
}

/// What a document may cost and still run on the main runtime once known: the background job's pushes and
/// consents, and small reads. A document that once cost more (its selections, its store calls, the
/// messages it showed, or a request allowance it ran into) runs on the heavy lane from then on, so that a
/// client repeating an expensive document cannot take the main runtime's threads from the others.
const LIGHT_SELECTIONS: u64 = 200;
const LIGHT_STORE_CALLS: usize = 4;
const LIGHT_MESSAGES: usize = 500;

fn hit_a_request_allowance(error: &ServerError) -> bool {
    error
        .extensions
        .as_ref()
        .and_then(|extensions| extensions.get("code"))
        .is_some_and(|code| {
            matches!(code, async_graphql::Value::String(code)
                if code == "STORE_CALLS_EXCEEDED" || code == "RESPONSE_TOO_LARGE")
        })
}

/// A response refusing the whole operation.
fn refusal(mut error: ServerError, code: &str) -> Response {
    set_code(&mut error, code);
    Response::from_errors(vec![error])
}

fn set_code(error: &mut ServerError, code: &str) {
    let extensions = error
        .extensions
        .get_or_insert_with(ErrorExtensionValues::default);
    if extensions.get("code").is_none() {
        extensions.set("code", code);
    }
}

/// Gives the errors async-graphql raises itself a code, as every error a client sees has one: our
/// resolvers always set theirs. An error without a path refused the operation before it ran (validation,
/// limits); one with a path came from coercing an argument or a variable while executing, i.e. from the
/// client's input. Returns whether the operation was refused before it ran.
fn give_codes(response: &mut Response) -> bool {
    let mut refused = false;
    for error in &mut response.errors {
        if !error.path.is_empty() {
            set_code(error, "BAD_USER_INPUT");
            continue;
        }
        refused = true;
        if error.message == "Query is nested too deep." {
            error.message =
                "the query is nested deeper than MAX_QUERY_DEPTH allows: select fewer levels"
                    .to_owned();
            set_code(error, "QUERY_TOO_DEEP");
        } else if error
            .message
            .starts_with("The recursion depth of the query")
        {
            // async-graphql's own bound on nested selection sets (fields and fragments alike), checked
            // before MAX_QUERY_DEPTH, which counts fields only.
            error.message = "the query nests selection sets (fields or fragments) more than 32 \
                             levels deep: nest fewer"
                .to_owned();
            set_code(error, "QUERY_TOO_DEEP");
        } else if error.message == "Query is too complex." {
            error.message =
                "the query selects more fields than MAX_QUERY_COMPLEXITY allows (every \
                             field and alias counts): split it"
                    .to_owned();
            set_code(error, "QUERY_TOO_COMPLEX");
        } else {
            set_code(error, "GRAPHQL_VALIDATION_FAILED");
        }
    }
    refused
}

/// The operation a request runs, chosen as the GraphQL spec says; the error says how to name it.
/// Whether the operation a request would run is a mutation (GraphQL over HTTP allows only queries over GET).
/// A document that does not parse, or names no such operation, is left to the executor to refuse.
pub fn selects_mutation(query: &str, operation_name: Option<&str>) -> bool {
    match async_graphql::parser::parse_query(query) {
        Ok(document) => select_operation(&document, operation_name).is_ok_and(|operation| {
            operation.ty == async_graphql::parser::types::OperationType::Mutation
        }),
        Err(_) => false,
    }
}

fn select_operation<'a>(
    document: &'a ExecutableDocument,
    name: Option<&str>,
) -> Result<&'a OperationDefinition, String> {
    let names = || {
        let mut names: Vec<String> = document
            .operations
            .iter()
            .filter_map(|(name, _)| name.map(|name| format!("`{name}`")))
            .collect();
        names.sort_unstable();
        names.join(", ")
    };
    match (&document.operations, name) {
        (DocumentOperations::Single(operation), None) => Ok(&operation.node),
        (DocumentOperations::Single(_), Some(name)) => Err(format!(
            "the document has no operation named `{name}`, only one without a name: leave \
             operationName out"
        )),
        (DocumentOperations::Multiple(operations), Some(name)) => operations
            .get(name)
            .map(|operation| &operation.node)
            .ok_or_else(|| {
                format!(
                    "the document has no operation named `{name}`: send one of {} as operationName",
                    names()
                )
            }),
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => {
            Ok(&operations.values().next().expect("one operation").node)
        }
        (DocumentOperations::Multiple(_), None) => Err(format!(
            "the document holds several operations: send the name of the one to run as \
             operationName ({})",
            names()
        )),
    }
}

/// The root fields of the schema: the only names an operation label may contain.
const ROOT_FIELDS: &[&str] = &[
    "dialogs",
    "dialog",
    "messages",
    "consent",
    "pushMessage",
    "pushMessages",
    "giveConsent",
    "eraseCustomer",
];

/// The root fields an operation selects, sorted and joined with `+` (the metrics' operation label). Only the
/// schema's root fields are named, so clients cannot invent new labels; anything else is `other`.
fn label(operation: &OperationDefinition) -> String {
    let mut fields: Vec<&str> = Vec::new();
    for selection in &operation.selection_set.node.items {
        match &selection.node {
            Selection::Field(field) => {
                let name = field.node.name.node.as_str();
                if name.starts_with("__") {
                    continue;
                }
                if !ROOT_FIELDS.contains(&name) {
                    return "other".to_owned();
                }
                if !fields.contains(&name) {
                    fields.push(name);
                }
            }
            _ => return "other".to_owned(),
        }
    }
    if fields.is_empty() {
        return "introspection".to_owned();
    }
    fields.sort_unstable();
    fields.join("+")
}

/// A document that passed full validation.
struct KnownDocument {
    document: ExecutableDocument,
    /// Passed with one operation and every variable it declares present, so that every argument,
    /// variables substituted, was checked.
    validated: AtomicBool,
    /// Cost more than a light document once: runs on the heavy lane (see [`LIGHT_SELECTIONS`]).
    heavy: AtomicBool,
    /// The metrics' label of its operation, when it has one operation.
    label: std::sync::OnceLock<Arc<str>>,
}

/// Parsed documents by query text. Only short documents that passed full validation are kept, and at
/// most `DOCUMENTS` of them: the cache cannot grow with what clients send.
#[derive(Default)]
struct DocumentCache {
    documents: dashmap::DashMap<String, Arc<KnownDocument>>,
}

impl DocumentCache {
    const DOCUMENTS: usize = 256;
    const MAX_QUERY_BYTES: usize = 8 * 1024;

    fn get(&self, query: &str) -> Option<Arc<KnownDocument>> {
        self.documents.get(query).map(|known| known.clone())
    }

    /// Keeps a document that passed full validation.
    fn keep(&self, query: String, document: ExecutableDocument, validated: bool, heavy: bool) {
        if self.documents.len() >= Self::DOCUMENTS {
            self.documents.clear();
        }
        self.documents.insert(
            query,
            Arc::new(KnownDocument {
                document,
                validated: AtomicBool::new(validated),
                heavy: AtomicBool::new(heavy),
                label: std::sync::OnceLock::new(),
            }),
        );
    }
}
