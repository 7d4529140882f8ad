//! The GraphQL API: types, resolvers and the DataLoader. Resolvers parse their inputs into domain values
//! and call the [`DialogService`]; they hold no rules of their own. Doc comments here are the descriptions
//! users read in GraphiQL and in `schema.graphql`.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::connection::{Connection, Edge};
use async_graphql::dataloader::{DataLoader, HashMapCache, Loader};
use async_graphql::{
    Context, Enum, ErrorExtensions, ID, InputObject, InputValueError, InputValueResult, Object,
    Result, Scalar, ScalarType, Schema, SchemaBuilder, SimpleObject, Subscription, Union,
    ValidationMode, Value,
};

use crate::auth::{Caller, Permission};
use crate::changes::ChangeToken;
use crate::error::ApiError;
use crate::model::{
    ClientMessageId, CustomerId, DialogId, IncomingMessage, Language, MessageFate, MessageText,
    Removal, TimeWindow,
};
use crate::paging::{ListKind, Page, PageArgs, encode_cursor};
use crate::service::DialogService;
use crate::store::{self, dialog_key, message_key};

pub type DataApiSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// Limits the schema enforces, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_page_size: usize,
    /// Messages in one `pushMessages` call.
    pub max_push_messages: usize,
    pub max_query_depth: usize,
    pub max_query_complexity: usize,
    /// Store calls one request's queries may make (see [`RequestAllowance`]).
    pub max_store_calls: usize,
    /// Messages one request's `Dialog.messages` fields may load together.
    pub max_loaded_messages: usize,
    /// Groups one statistics field may return.
    pub max_stats_groups: usize,
    /// Subscriptions one key may have open at once.
    pub max_subscriptions_per_key: usize,
}

/// What a request's queries may still ask of the database, shared by every operation of a batch:
/// - store calls: each listing, `totalCount`, `dialog`, `consent`, and batch of dialogs' messages is one.
///   Complexity bounds what one query selects, not how often it asks the database: thousands of aliased
///   counts are cheap to select and each is a scan;
/// - messages loaded for `Dialog.messages`: a dialog holds as many messages as its customer wrote, so the
///   page's dialogs are loaded with a limit, and past it the field is refused instead of loaded.
#[derive(Clone, Debug)]
pub struct RequestAllowance {
    store_calls: Arc<std::sync::atomic::AtomicUsize>,
    messages: Arc<std::sync::atomic::AtomicUsize>,
    limits: Limits,
}

impl RequestAllowance {
    pub fn new(limits: Limits) -> Self {
        Self {
            store_calls: Arc::new(std::sync::atomic::AtomicUsize::new(limits.max_store_calls)),
            messages: Arc::new(std::sync::atomic::AtomicUsize::new(
                limits.max_loaded_messages,
            )),
            limits,
        }
    }

    /// Takes one call from the allowance, or refuses the field.
    fn spend(&self) -> Result<()> {
        self.spend_many(1)
    }

    /// Takes `calls` calls from the allowance (a query that reads every matching row counts as several), or
    /// refuses the field.
    fn spend_many(&self, calls: usize) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.store_calls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(calls)
            })
            .map(|_| ())
            .map_err(|_| {
                async_graphql::Error::new(format!(
                    "this request asks the database more than {} times (MAX_STORE_CALLS: every listing, \
                     totalCount, dialog, consent and page of dialogs' messages counts once): ask for fewer \
                     counts and listings per request, or split it",
                    self.limits.max_store_calls
                ))
                .extend_with(|_, extensions| extensions.set("code", "STORE_CALLS_EXCEEDED"))
            })
    }

    /// Store calls and messages this request has used so far.
    pub fn spent(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.limits.max_store_calls - self.store_calls.load(Ordering::Acquire),
            self.limits.max_loaded_messages - self.messages.load(Ordering::Acquire),
        )
    }

    /// How many more messages this request may load.
    fn messages_left(&self) -> usize {
        self.messages.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes `shown` messages from the allowance, or refuses them all if they are more than what is left.
    /// Counted where they are shown, once per field: aliases of one dialog's messages each count.
    fn take_messages(&self, shown: usize) -> Result<()> {
        use std::sync::atomic::Ordering;
        self.messages
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(shown)
            })
            .map(|_| ())
            .map_err(|_| self.messages_refused())
    }

    fn messages_refused(&self) -> async_graphql::Error {
        async_graphql::Error::new(format!(
            "the dialogs' messages asked for in this request are more than {} (MAX_LOADED_MESSAGES, \
             every alias counted): ask for fewer dialogs (first), or page through one dialog's messages \
             with messages(filter: {{dialogId: …}}, first: …)",
            self.limits.max_loaded_messages
        ))
        .extend_with(|_, extensions| extensions.set("code", "RESPONSE_TOO_LARGE"))
    }
}

/// Who is calling, as audit records name them: `open` without keys, else `ROLE:KEYID` (the first 16 hex
/// digits of the key's configured digest, never the key).
#[derive(Clone, Debug)]
pub struct CallerName(pub String);

/// Spends one of the request's store calls (see [`RequestAllowance`]).
fn spend_store_call(ctx: &Context<'_>) -> Result<()> {
    data::<RequestAllowance>(ctx)?.spend()
}

/// The schema with the service attached, ready to execute requests; `validation` is async-graphql's
/// validation mode (see [`crate::execution`] for when each is used).
pub fn build(
    service: Arc<DialogService>,
    limits: Limits,
    introspection: bool,
    validation: ValidationMode,
) -> DataApiSchema {
    let mut builder = builder()
        .validation_mode(validation)
        .data(service)
        .data(limits)
        .limit_depth(limits.max_query_depth)
        .limit_complexity(limits.max_query_complexity);
    if !introspection {
        // "Did you mean …?" in an error would give the field names away one guess at a time.
        builder = builder.disable_introspection().disable_suggestions();
    }
    builder.finish()
}

/// The messages a dialog is assumed to hold when estimating a query's complexity.
const DIALOG_MESSAGES_COMPLEXITY: usize = 20;

/// A listing costs its page size times what each item selects: a query's complexity then bounds the rows
/// it can pull from the database, not only the fields it names.
fn page_complexity(first: Option<i32>, last: Option<i32>, child_complexity: usize) -> usize {
    let size = first
        .or(last)
        .map_or(crate::paging::DEFAULT_PAGE_SIZE, |n| n.max(0) as usize);
    size.max(1)
        .saturating_mul(child_complexity)
        .saturating_add(1)
}

/// A guard that lets a field run only for callers with `permission`.
fn require(permission: Permission) -> impl Fn(&Context<'_>) -> Result<()> + Send + Sync + 'static {
    move |ctx| {
        let caller = ctx
            .data_opt::<Caller>()
            .ok_or_else(|| ApiError::Unauthenticated.extend())?;
        if caller.may(permission) {
            return Ok(());
        }
        let allowed = match permission {
            Permission::Ingest => "ingest or admin",
            Permission::Read => "read or admin",
            Permission::Admin => "admin",
        };
        Err(ApiError::Forbidden {
            operation: ctx.field().name().to_owned(),
            allowed,
        }
        .extend())
    }
}

/// The schema's SDL, as committed in `schema.graphql`.
pub fn sdl() -> String {
    builder().finish().sdl()
}

fn builder() -> SchemaBuilder<QueryRoot, MutationRoot, SubscriptionRoot> {
    Schema::build(QueryRoot, MutationRoot::default(), SubscriptionRoot)
}

/// The per-request loader of dialogs' messages.
pub type MessagesLoader = DataLoader<MessagesByDialog, HashMapCache>;

/// Per-request data: a fresh DataLoader, so that its cache never outlives the request. A batch may hold a
/// whole page of dialogs, so one page is always one query.
pub fn request_loader(
    service: Arc<DialogService>,
    limits: Limits,
    allowance: RequestAllowance,
) -> LazyMessagesLoader {
    LazyMessagesLoader {
        parts: (service, limits, allowance),
        loader: std::sync::OnceLock::new(),
    }
}

/// A request's [`MessagesLoader`], made when a field first needs it: most requests are pushes, which never
/// do.
pub struct LazyMessagesLoader {
    parts: (Arc<DialogService>, Limits, RequestAllowance),
    loader: std::sync::OnceLock<MessagesLoader>,
}

impl LazyMessagesLoader {
    fn get(&self) -> &MessagesLoader {
        self.loader.get_or_init(|| {
            let (service, limits, allowance) = &self.parts;
            DataLoader::with_cache(
                MessagesByDialog(service.clone(), allowance.clone()),
                tokio::spawn,
                HashMapCache::default(),
            )
            .max_batch_size(limits.max_page_size.max(1))
        })
    }
}

/// Context data the server itself attaches; missing, it is a server bug, not the client's.
fn data<'a, T: std::any::Any + Send + Sync>(ctx: &Context<'a>) -> Result<&'a T> {
    ctx.data::<T>().map_err(|error| {
        tracing::error!("missing request data: {}", error.message);
        async_graphql::Error::new("internal error: the server is misconfigured; please report it")
            .extend_with(|_, extensions| extensions.set("code", "INTERNAL_SERVER_ERROR"))
    })
}

fn service<'a>(ctx: &Context<'a>) -> Result<&'a Arc<DialogService>> {
    data::<Arc<DialogService>>(ctx)
}

/// An instant in time: an RFC 3339 string in UTC with millisecond precision, e.g.
/// `2026-11-28T09:30:00.123Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime(i64);

#[Scalar(
    name = "DateTime",
    specified_by_url = "https://datatracker.ietf.org/doc/html/rfc3339"
)]
impl ScalarType for DateTime {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
                .map(|time| Self(time.timestamp_millis()))
                .map_err(|_| {
                    InputValueError::custom(
                        "expected an RFC 3339 date-time such as 2026-11-28T09:30:00Z",
                    )
                }),
            other => Err(InputValueError::custom(format!(
                "expected an RFC 3339 date-time string such as 2026-11-28T09:30:00Z, found {other}"
            ))),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(crate::model::rfc3339(self.0))
    }
}

/// What happened to a pushed message.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageStatus {
    /// Waiting in the dialog buffer for the customer's consent decision; not stored anywhere yet.
    Buffered,
    /// The dialog has consent: the message is in the database.
    Stored,
    /// The customer refused consent for this dialog: the message was dropped, nothing was kept.
    Discarded,
}

impl From<MessageFate> for MessageStatus {
    fn from(fate: MessageFate) -> Self {
        match fate {
            MessageFate::Buffered => Self::Buffered,
            MessageFate::Stored => Self::Stored,
            MessageFate::Discarded => Self::Discarded,
        }
    }
}

/// One customer message.
pub struct Message(crate::model::Message);

/// One customer message.
#[Object]
impl Message {
    /// Server-assigned id, unique across dialogs.
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }

    /// The client's idempotency key, when it sent one.
    async fn message_id(&self) -> Option<ID> {
        self.0.client_id.as_ref().map(|id| ID(id.to_string()))
    }

    async fn dialog_id(&self) -> ID {
        ID(self.0.dialog_id.to_string())
    }

    async fn customer_id(&self) -> ID {
        ID(self.0.customer_id.to_string())
    }

    async fn text(&self) -> &str {
        self.0.text.as_str()
    }

    /// Lowercase language tag, e.g. `en` or `pt-br`.
    async fn language(&self) -> &str {
        self.0.language.as_str()
    }

    /// When the server accepted the message.
    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }
}

/// A dialog whose customer consented to storing it.
pub struct Dialog(crate::model::Dialog);

/// A dialog whose customer consented to storing it.
#[Object]
impl Dialog {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn customer_id(&self) -> ID {
        ID(self.0.customer_id.to_string())
    }

    /// The distinct languages of its messages, sorted.
    async fn languages(&self) -> Vec<&str> {
        self.0.languages.iter().map(Language::as_str).collect()
    }

    async fn message_count(&self) -> i64 {
        self.0.message_count
    }

    async fn first_message_at(&self) -> DateTime {
        DateTime(self.0.first_message_at)
    }

    /// The time of its latest message: dialog listings are ordered by it, most recent first.
    async fn last_message_at(&self) -> DateTime {
        DateTime(self.0.last_message_at)
    }

    /// When the customer gave consent.
    async fn consented_at(&self) -> DateTime {
        DateTime(self.0.consented_at)
    }

    /// Its messages, oldest first. Loaded in one batch for all dialogs of a page. For query complexity a
    /// dialog counts as 20 messages; one request shows at most MAX_LOADED_MESSAGES of them in all (every
    /// alias counted), past which this field fails with RESPONSE_TOO_LARGE: page through a long dialog with
    /// `messages(filter: {dialogId: …})`.
    #[graphql(complexity = "DIALOG_MESSAGES_COMPLEXITY * child_complexity + 1")]
    async fn messages(&self, ctx: &Context<'_>) -> Result<Vec<Message>> {
        let loader = data::<LazyMessagesLoader>(ctx)?.get();
        // Shared, not copied, until the allowance says they may be shown (aliases get the same list).
        let Some(messages) = loader.load_one(self.0.id.clone()).await? else {
            return Ok(Vec::new());
        };
        data::<RequestAllowance>(ctx)?.take_messages(messages.len())?;
        Ok(messages.iter().cloned().map(Message).collect())
    }
}

/// Loads the messages of many dialogs with one store query (one of the request's store calls).
pub struct MessagesByDialog(Arc<DialogService>, RequestAllowance);

impl Loader<DialogId> for MessagesByDialog {
    type Value = Arc<Vec<crate::model::Message>>;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[DialogId]) -> Result<HashMap<DialogId, Self::Value>, Self::Error> {
        self.1.spend()?;
        // Never more than the request may still show (one more, to tell): a page of long dialogs is not
        // loaded whole to be refused afterwards.
        let left = self.1.messages_left();
        let messages = self
            .0
            .messages_of_dialogs(keys, left.saturating_add(1))
            .await
            .map_err(|e| e.extend())?;
        if messages.len() > left {
            return Err(self.1.messages_refused());
        }
        let mut by_dialog: HashMap<DialogId, Vec<crate::model::Message>> = HashMap::new();
        for message in messages {
            by_dialog
                .entry(message.dialog_id.clone())
                .or_default()
                .push(message);
        }
        Ok(by_dialog
            .into_iter()
            .map(|(dialog, messages)| (dialog, Arc::new(messages)))
            .collect())
    }
}

/// A message for the dialog buffer.
#[derive(InputObject)]
pub struct PushMessageInput {
    /// The chatbot's customer id (at most 128 characters).
    pub customer_id: ID,
    /// The conversation this message belongs to (at most 128 characters).
    pub dialog_id: ID,
    /// The message text: not blank, at most 10000 characters.
    pub text: String,
    /// A language tag such as `en` or `pt-BR`; case-insensitive.
    pub language: String,
    /// Optional idempotency key, unique within the dialog: pushing the same `messageId` again records the
    /// message once and returns it as first recorded.
    pub message_id: Option<ID>,
}

impl PushMessageInput {
    fn parse(self) -> Result<IncomingMessage, ApiError> {
        Ok(IncomingMessage {
            customer_id: CustomerId::parse("customerId", self.customer_id)?,
            dialog_id: DialogId::parse("dialogId", self.dialog_id)?,
            text: MessageText::parse("text", self.text)?,
            language: Language::parse("language", &self.language)?,
            client_id: parse_field(
                self.message_id.map(|id| id.0),
                "messageId",
                ClientMessageId::parse,
            )?,
        })
    }
}

/// The message as recorded, and what happened to it.
pub struct PushMessagePayload {
    message: crate::model::Message,
    status: MessageStatus,
}

/// The message as recorded, and what happened to it.
#[Object]
impl PushMessagePayload {
    async fn message(&self) -> Message {
        Message(self.message.clone())
    }

    async fn status(&self) -> MessageStatus {
        self.status
    }
}

/// A consent decision as recorded.
pub struct ConsentPayload(crate::service::ConsentOutcome);

/// A consent decision as recorded.
#[Object]
impl ConsentPayload {
    async fn dialog_id(&self) -> ID {
        ID(self.0.record.dialog_id.to_string())
    }

    /// The decision now in force.
    async fn value(&self) -> bool {
        self.0.record.value
    }

    /// When this decision was first given (repeating it does not move it).
    async fn decided_at(&self) -> DateTime {
        DateTime(self.0.record.decided_at)
    }

    /// Buffered messages written to the database by this call.
    async fn stored_count(&self) -> u64 {
        self.0.stored
    }

    /// Buffered messages dropped by this call.
    async fn discarded_count(&self) -> u64 {
        self.0.discarded
    }

    /// Previously stored messages deleted by this call, because consent was withdrawn.
    async fn deleted_count(&self) -> u64 {
        self.0.deleted
    }
}

/// Which dialogs to list; the fields combine with AND.
#[derive(InputObject, Default)]
pub struct DialogFilter {
    /// Dialogs with at least one message in this language (case-insensitive).
    pub language: Option<String>,
    pub customer_id: Option<ID>,
    /// Dialogs whose latest message is at or after this time.
    pub since: Option<DateTime>,
    /// Dialogs whose latest message is before this time (exclusive), which must be later than `since`.
    pub until: Option<DateTime>,
}

/// The order of a listing, by its sort key (a dialog's latest message, a message's acceptance); null or
/// absent is `NEWEST_FIRST`.
#[derive(Enum, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[graphql(name = "ListOrder")]
pub enum Order {
    /// Most recent first (the default).
    #[default]
    NewestFirst,
    /// Oldest first, e.g. to read forward in time from `since`.
    OldestFirst,
}

impl From<Order> for crate::paging::ListOrder {
    fn from(order: Order) -> Self {
        match order {
            Order::NewestFirst => Self::NewestFirst,
            Order::OldestFirst => Self::OldestFirst,
        }
    }
}

/// Parses an optional filter field.
fn parse_field<S, T>(
    value: Option<S>,
    field: &'static str,
    parse: impl FnOnce(&'static str, S) -> Result<T, ApiError>,
) -> Result<Option<T>, ApiError> {
    value.map(|value| parse(field, value)).transpose()
}

impl DialogFilter {
    fn parse(self) -> Result<store::DialogFilter, ApiError> {
        Ok(store::DialogFilter {
            language: parse_field(self.language, "filter.language", Language::parse)?,
            customer_id: parse_field(self.customer_id, "filter.customerId", CustomerId::parse)?,
            window: TimeWindow::parse(
                self.since.map(|time| time.0),
                self.until.map(|time| time.0),
                "filter.until",
            )?,
        })
    }
}

/// Which messages to list; the fields combine with AND.
#[derive(InputObject, Default)]
pub struct MessageFilter {
    /// Messages in this language (case-insensitive).
    pub language: Option<String>,
    pub customer_id: Option<ID>,
    pub dialog_id: Option<ID>,
    /// Messages accepted at or after this time.
    pub since: Option<DateTime>,
    /// Messages accepted before this time (exclusive), which must be later than `since`.
    pub until: Option<DateTime>,
}

impl MessageFilter {
    fn parse(self) -> Result<store::MessageFilter, ApiError> {
        Ok(store::MessageFilter {
            language: parse_field(self.language, "filter.language", Language::parse)?,
            customer_id: parse_field(self.customer_id, "filter.customerId", CustomerId::parse)?,
            dialog_id: parse_field(self.dialog_id, "filter.dialogId", DialogId::parse)?,
            window: TimeWindow::parse(
                self.since.map(|time| time.0),
                self.until.map(|time| time.0),
                "filter.until",
            )?,
        })
    }
}

/// Extra fields of a dialog listing.
pub struct DialogListTotals(store::DialogFilter);

#[Object]
impl DialogListTotals {
    /// How many dialogs match the filter, ignoring paging. Costs a count query: ask only when needed.
    async fn total_count(&self, ctx: &Context<'_>) -> Result<u64> {
        spend_store_call(ctx)?;
        Ok(service(ctx)?.count_dialogs(&self.0).await?)
    }
}

/// Extra fields of a message listing.
pub struct MessageListTotals(store::MessageFilter);

#[Object]
impl MessageListTotals {
    /// How many messages match the filter, ignoring paging. Costs a count query: ask only when needed.
    async fn total_count(&self, ctx: &Context<'_>) -> Result<u64> {
        spend_store_call(ctx)?;
        Ok(service(ctx)?.count_messages(&self.0).await?)
    }
}

fn connection<T, N, Extra>(
    page: Page<T>,
    kind: ListKind,
    key: impl Fn(&T) -> crate::paging::SortKey,
    node: impl Fn(T) -> N,
    extra: Extra,
) -> Connection<String, N, Extra>
where
    N: async_graphql::OutputType,
    Extra: async_graphql::ObjectType,
{
    let mut connection =
        Connection::with_additional_fields(page.has_previous_page, page.has_next_page, extra);
    connection.edges = page
        .items
        .into_iter()
        .map(|item| Edge::new(encode_cursor(kind, &key(&item)), node(item)))
        .collect();
    connection
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// Consented dialogs, most recent first (by their latest message; ties by id), or oldest first with
    /// `order: OLDEST_FIRST`. Page forwards with `first`/`after`, backwards with `last`/`before`; without
    /// either, the first 20. `filter.since`/`until` keep the dialogs whose latest message is in that range.
    #[graphql(
        guard = "require(Permission::Read)",
        complexity = "page_complexity(first, last, child_complexity)"
    )]
    // One parameter per GraphQL argument.
    #[allow(clippy::too_many_arguments)]
    async fn dialogs(
        &self,
        ctx: &Context<'_>,
        filter: Option<DialogFilter>,
        first: Option<i32>,
        after: Option<String>,
        last: Option<i32>,
        before: Option<String>,
        order: Option<Order>,
    ) -> Result<Connection<String, Dialog, DialogListTotals>> {
        let limits = data::<Limits>(ctx)?;
        let filter = filter.unwrap_or_default().parse()?;
        let request = PageArgs {
            first,
            after,
            last,
            before,
            order: order.unwrap_or_default().into(),
        }
        .parse(ListKind::Dialogs, limits.max_page_size)?;
        spend_store_call(ctx)?;
        let page = service(ctx)?.dialogs(&filter, &request).await?;
        // The loader batches the `messages` of the page's dialogs by waiting a moment for their resolvers;
        // loading them all up front makes the page one query however long resolving takes.
        let look_ahead = ctx.look_ahead();
        if look_ahead
            .field("edges")
            .field("node")
            .field("messages")
            .exists()
            || look_ahead.field("nodes").field("messages").exists()
        {
            let ids = page.items.iter().map(|dialog| dialog.id.clone());
            data::<LazyMessagesLoader>(ctx)?
                .get()
                .load_many(ids)
                .await?;
        }
        Ok(connection(
            page,
            ListKind::Dialogs,
            dialog_key,
            Dialog,
            DialogListTotals(filter),
        ))
    }

    /// One consented dialog, or null if no dialog with that id is stored.
    #[graphql(guard = "require(Permission::Read)")]
    async fn dialog(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Dialog>> {
        let id = DialogId::parse("id", id.0)?;
        spend_store_call(ctx)?;
        Ok(service(ctx)?.dialog(&id).await?.map(Dialog))
    }

    /// The recorded consent decision of a dialog and every change of it, for audits; null when the dialog
    /// has no decision (undecided dialogs exist only in the buffer).
    #[graphql(guard = "require(Permission::Read)")]
    async fn consent(&self, ctx: &Context<'_>, dialog_id: ID) -> Result<Option<ConsentRecord>> {
        let dialog_id = DialogId::parse("dialogId", dialog_id.0)?;
        spend_store_call(ctx)?;
        Ok(service(ctx)?
            .consent_history(&dialog_id)
            .await?
            .map(ConsentRecord))
    }

    /// Stored messages of all consented dialogs, most recent first (by acceptance), or oldest first with
    /// `order: OLDEST_FIRST`; the same paging rules as `dialogs`. `filter.since`/`until` keep the messages
    /// accepted in that range.
    #[graphql(
        guard = "require(Permission::Read)",
        complexity = "page_complexity(first, last, child_complexity)"
    )]
    // One parameter per GraphQL argument.
    #[allow(clippy::too_many_arguments)]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        filter: Option<MessageFilter>,
        first: Option<i32>,
        after: Option<String>,
        last: Option<i32>,
        before: Option<String>,
        order: Option<Order>,
    ) -> Result<Connection<String, Message, MessageListTotals>> {
        let limits = data::<Limits>(ctx)?;
        let filter = filter.unwrap_or_default().parse()?;
        let request = PageArgs {
            first,
            after,
            last,
            before,
            order: order.unwrap_or_default().into(),
        }
        .parse(ListKind::Messages, limits.max_page_size)?;
        spend_store_call(ctx)?;
        let page = service(ctx)?.messages(&filter, &request).await?;
        Ok(connection(
            page,
            ListKind::Messages,
            message_key,
            Message,
            MessageListTotals(filter),
        ))
    }

    /// The change feed: every message stored and every dialog removed (consent withdrawn, customer
    /// erased) after the token `after` (from the start without it), in the order the writes committed,
    /// at most `first` (20 by default, up to MAX_PAGE_SIZE). Keep a copy in step by applying each page in
    /// order (or: remove every dialog a page names as removed, then add its messages), and pass the
    /// page's `token` as `after` next time; while `hasMore`, ask again at once. Nothing is missed or repeated,
    /// however late a consent arrives and whichever replica wrote it.
    #[graphql(
        guard = "require(Permission::Read)",
        complexity = "page_complexity(first, None, child_complexity)"
    )]
    async fn changes(
        &self,
        ctx: &Context<'_>,
        after: Option<ChangeTokenValue>,
        first: Option<i32>,
    ) -> Result<ChangeFeedPage> {
        let limits = data::<Limits>(ctx)?;
        let after = match after {
            Some(token) => ChangeToken::parse("after", &token.0)?,
            None => ChangeToken::default(),
        };
        let first = match first {
            None => crate::paging::DEFAULT_PAGE_SIZE.min(limits.max_page_size),
            Some(n) if n >= 1 && n as usize <= limits.max_page_size => n as usize,
            Some(_) => {
                return Err(ApiError::invalid(
                    "first",
                    format!(
                        "must be between 1 and {} (MAX_PAGE_SIZE); read on with the returned token",
                        limits.max_page_size
                    ),
                )
                .extend());
            }
        };
        data::<RequestAllowance>(ctx)?.spend_many(CHANGES_STORE_CALLS)?;
        let page = service(ctx)?.changes("after", after, first).await?;
        Ok(ChangeFeedPage(page))
    }

    /// Counts of stored messages and of their dialogs, computed by the database, over the same filter and
    /// time range as `messages`; grouped by `groupBy` (language, customer) and by a time `bucket` in
    /// `timeZone` (an IANA name, UTC when null; buckets start at local midnight, on Monday for weeks, on
    /// the 1st for months). Groups come sorted by language, customer, then time; without any grouping, one group of
    /// totals. At most MAX_STATS_GROUPS groups (10000 by default).
    #[graphql(guard = "require(Permission::Read)")]
    async fn stats(
        &self,
        ctx: &Context<'_>,
        filter: Option<MessageFilter>,
        group_by: Option<Vec<StatsDimension>>,
        bucket: Option<TimeBucket>,
        time_zone: Option<String>,
    ) -> Result<Vec<StatsGroup>> {
        let limits = data::<Limits>(ctx)?;
        let filter = filter.unwrap_or_default().parse()?;
        let group_by = group_by.unwrap_or_default();
        let grouping = crate::stats::Grouping {
            language: group_by.contains(&StatsDimension::Language),
            customer: group_by.contains(&StatsDimension::Customer),
            buckets: stats_buckets(bucket, time_zone.as_deref())?,
        };
        data::<RequestAllowance>(ctx)?.spend_many(STATS_STORE_CALLS)?;
        let groups = service(ctx)?
            .message_stats(&filter, &grouping, limits.max_stats_groups + 1)
            .await?;
        if groups.len() > limits.max_stats_groups {
            return Err(stats_groups_refused(limits.max_stats_groups));
        }
        Ok(groups
            .into_iter()
            .map(|group| StatsGroup {
                language: group.language.map(|language| language.to_string()),
                customer_id: group.customer_id.map(|id| ID(id.to_string())),
                bucket_start: group.bucket.map(DateTime),
                message_count: group.messages,
                dialog_count: group.dialogs,
            })
            .collect())
    }

    /// Consent decisions per time `bucket` in `timeZone` (UTC when null; or in all, without `bucket`), from
    /// the recorded
    /// history of every dialog's decision, so that a consent rate survives restarts: decisions `true`,
    /// refusals, and withdrawals. Erased customers' decisions are gone from it. At most MAX_STATS_GROUPS
    /// buckets, oldest first.
    #[graphql(guard = "require(Permission::Read)")]
    async fn consent_stats(
        &self,
        ctx: &Context<'_>,
        filter: Option<ConsentStatsFilter>,
        bucket: Option<TimeBucket>,
        time_zone: Option<String>,
    ) -> Result<Vec<ConsentStatsGroup>> {
        let limits = data::<Limits>(ctx)?;
        let filter = filter.unwrap_or_default();
        let filter = store::ConsentFilter {
            customer_id: parse_field(filter.customer_id, "filter.customerId", CustomerId::parse)?,
            window: TimeWindow::parse(
                filter.since.map(|time| time.0),
                filter.until.map(|time| time.0),
                "filter.until",
            )?,
        };
        let buckets = stats_buckets(bucket, time_zone.as_deref())?;
        data::<RequestAllowance>(ctx)?.spend_many(STATS_STORE_CALLS)?;
        let groups = service(ctx)?
            .consent_stats(&filter, buckets.as_ref(), limits.max_stats_groups + 1)
            .await?;
        if groups.len() > limits.max_stats_groups {
            return Err(stats_groups_refused(limits.max_stats_groups));
        }
        Ok(groups
            .into_iter()
            .map(|group| ConsentStatsGroup {
                bucket_start: group.bucket.map(DateTime),
                granted: group.granted,
                refused: group.refused,
                withdrawn: group.withdrawn,
            })
            .collect())
    }
}

/// Live updates over WebSocket at `/graphql` (protocols `graphql-transport-ws` and the legacy `graphql-ws`),
/// with the key in the connection's init payload: `{"Authorization": "Bearer <key>"}`.
pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Every message stored from now on (its dialog's consent arrived, or it was pushed to a consented
    /// dialog) that matches `filter`, whichever replica stored it, in the order the writes committed,
    /// within a fraction of a second. With `after` (a change token, e.g. the last `change` received before
    /// a disconnection), first everything since then: nothing is missed. A subscriber that falls 1024
    /// changes behind is disconnected (close code 4008) rather than buffered without limit.
    #[graphql(guard = "require(Permission::Read)")]
    async fn message_stored(
        &self,
        ctx: &Context<'_>,
        filter: Option<LiveMessageFilter>,
        after: Option<ChangeTokenValue>,
    ) -> Result<impl futures::Stream<Item = Result<MessageStored>> + use<>> {
        let filter = filter.unwrap_or_default();
        let interest = crate::live::Interest::Messages {
            language: parse_field(filter.language, "filter.language", Language::parse)?,
            customer_id: parse_field(filter.customer_id, "filter.customerId", CustomerId::parse)?,
            dialog_id: parse_field(filter.dialog_id, "filter.dialogId", DialogId::parse)?,
        };
        let stream = live_changes(ctx, interest, after).await?;
        Ok(futures::StreamExt::map(stream, |event| match event? {
            crate::live::LiveEvent::Change(change) => match Change::from(change) {
                Change::MessageStored(stored) => Ok(stored),
                Change::DialogRemoved(_) => unreachable!("the interest takes stored messages only"),
            },
            crate::live::LiveEvent::Decided(_) => {
                unreachable!("the interest takes stored messages only")
            }
        }))
    }

    /// Every stored dialog removed whole from now on (consent withdrawn, customer erased), whichever replica
    /// removed it: drop its messages from any copy. `after` and the bounds as for `messageStored`.
    #[graphql(guard = "require(Permission::Read)")]
    async fn dialog_removed(
        &self,
        ctx: &Context<'_>,
        after: Option<ChangeTokenValue>,
    ) -> Result<impl futures::Stream<Item = Result<DialogRemoved>> + use<>> {
        let stream = live_changes(ctx, crate::live::Interest::Removals, after).await?;
        Ok(futures::StreamExt::map(stream, |event| match event? {
            crate::live::LiveEvent::Change(change) => match Change::from(change) {
                Change::DialogRemoved(removed) => Ok(removed),
                Change::MessageStored(_) => unreachable!("the interest takes removals only"),
            },
            crate::live::LiveEvent::Decided(_) => unreachable!("the interest takes removals only"),
        }))
    }

    /// Every consent decision from now on that changed its dialog's decision, whichever replica recorded
    /// it, in commit order: `GRANTED` (a first consent, or consent given again), `REFUSED`, `WITHDRAWN`.
    /// Repeating the decision in force is no event. For a live consent rate next to `consentStats`.
    /// `after` and the bounds as for `messageStored` (an erased customer's decisions are gone from what
    /// `after` replays).
    #[graphql(guard = "require(Permission::Read)")]
    async fn consent_decided(
        &self,
        ctx: &Context<'_>,
        after: Option<ChangeTokenValue>,
    ) -> Result<impl futures::Stream<Item = Result<ConsentDecided>> + use<>> {
        let stream = live_changes(ctx, crate::live::Interest::Decisions, after).await?;
        Ok(futures::StreamExt::map(stream, |event| match event? {
            crate::live::LiveEvent::Decided(event) => Ok(ConsentDecided {
                change: ChangeToken(event.number).into(),
                dialog_id: ID(event.dialog_id.to_string()),
                decision: match event.kind {
                    crate::model::DecisionKind::Granted => ConsentDecision::Granted,
                    crate::model::DecisionKind::Refused => ConsentDecision::Refused,
                    crate::model::DecisionKind::Withdrawn => ConsentDecision::Withdrawn,
                },
                decided_at: DateTime(event.at),
            }),
            crate::live::LiveEvent::Change(_) => unreachable!("the interest takes decisions only"),
        }))
    }
}

/// A consent decision that changed its dialog's decision.
#[derive(SimpleObject)]
pub struct ConsentDecided {
    /// This event's position, for `after` when resuming.
    change: ChangeTokenValue,
    dialog_id: ID,
    decision: ConsentDecision,
    decided_at: DateTime,
}

/// What a consent decision did.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsentDecision {
    /// Consent given: the first decision of the dialog, or consent given again after a withdrawal.
    Granted,
    /// Consent refused for a dialog that never had it: nothing of it was stored.
    Refused,
    /// Consent taken back: the dialog's stored messages were deleted.
    Withdrawn,
}

/// Opens a subscription of the caller to `interest`, counted against its key's bound.
async fn live_changes(
    ctx: &Context<'_>,
    interest: crate::live::Interest,
    after: Option<ChangeTokenValue>,
) -> Result<impl futures::Stream<Item = Result<crate::live::LiveEvent, ApiError>> + use<>> {
    let limits = data::<Limits>(ctx)?;
    let caller = data::<CallerName>(ctx)?;
    let after = after
        .map(|token| ChangeToken::parse("after", &token.0))
        .transpose()?;
    let live = service(ctx)?.live().clone();
    let slot = live.reserve(&caller.0, limits.max_subscriptions_per_key)?;
    let close = ctx.data_opt::<Arc<crate::live::CloseSignal>>().cloned();
    Ok(crate::live::subscribe(live, interest, after, slot, close).await?)
}

/// Which stored messages a `messageStored` subscription receives; set fields combine with AND.
#[derive(InputObject, Default)]
pub struct LiveMessageFilter {
    /// Messages in this language (case-insensitive).
    pub language: Option<String>,
    pub customer_id: Option<ID>,
    pub dialog_id: Option<ID>,
}

/// Store calls one read of the change feed makes: the counter, then messages and removals.
const CHANGES_STORE_CALLS: usize = 3;

/// A position in the change feed, as `ChangeFeedPage.token` returns it: decimal digits. Pass it back
/// unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeTokenValue(String);

#[Scalar(name = "ChangeToken")]
impl ScalarType for ChangeTokenValue {
    fn parse(value: Value) -> InputValueResult<Self> {
        // Any string: the resolver checks it, so that a bad token gets INVALID_CHANGE_TOKEN and advice.
        match value {
            Value::String(text) => Ok(Self(text)),
            other => Err(InputValueError::custom(format!(
                "expected a change token string such as \"1042\", found {other}"
            ))),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.clone())
    }
}

impl From<ChangeToken> for ChangeTokenValue {
    fn from(token: ChangeToken) -> Self {
        Self(token.to_string())
    }
}

/// One read of the change feed.
pub struct ChangeFeedPage(crate::changes::ChangePage);

/// One read of the change feed.
#[Object]
impl ChangeFeedPage {
    /// In the order the writes committed.
    async fn changes(&self) -> Vec<Change> {
        self.0.changes.iter().cloned().map(Change::from).collect()
    }

    /// Pass as `after` next time. After the last change of this page; when the page holds every change
    /// up to the moment of the read, after that moment.
    async fn token(&self) -> ChangeTokenValue {
        self.0.token.into()
    }

    /// More changes were committed before this read than the page holds: ask again with `token` now.
    async fn has_more(&self) -> bool {
        self.0.has_more
    }
}

/// An entry of the change feed.
#[derive(Union)]
pub enum Change {
    MessageStored(MessageStored),
    DialogRemoved(DialogRemoved),
}

impl From<crate::model::Change> for Change {
    fn from(change: crate::model::Change) -> Self {
        match change {
            crate::model::Change::Stored { number, message } => {
                Self::MessageStored(MessageStored {
                    change: ChangeToken(number).into(),
                    message: Message(message),
                })
            }
            crate::model::Change::Removed {
                number,
                dialog_id,
                reason,
                at,
            } => Self::DialogRemoved(DialogRemoved {
                change: ChangeToken(number).into(),
                dialog_id: ID(dialog_id.to_string()),
                reason: match reason {
                    Removal::Withdrawn => RemovalReason::Withdrawn,
                    Removal::Erased => RemovalReason::Erased,
                },
                removed_at: DateTime(at),
            }),
        }
    }
}

/// A message was stored: its dialog's consent arrived, or it was pushed to a consented dialog.
#[derive(SimpleObject)]
pub struct MessageStored {
    /// This change's position in the feed.
    change: ChangeTokenValue,
    message: Message,
}

/// A stored dialog was removed whole: drop every message of it you copied before this change.
#[derive(SimpleObject)]
pub struct DialogRemoved {
    /// This change's position in the feed.
    change: ChangeTokenValue,
    dialog_id: ID,
    reason: RemovalReason,
    removed_at: DateTime,
}

/// Why a stored dialog was removed.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemovalReason {
    /// Its consent was withdrawn.
    Withdrawn,
    /// Its customer was erased (the feed keeps the dialog id only, never the customer id).
    Erased,
}

/// What the statistics of messages are grouped by, besides a time bucket.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsDimension {
    Language,
    Customer,
}

/// The length of a time bucket, in the query's time zone; weeks start on Monday.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeBucket {
    Hour,
    Day,
    Week,
    Month,
}

impl From<TimeBucket> for crate::stats::BucketUnit {
    fn from(bucket: TimeBucket) -> Self {
        match bucket {
            TimeBucket::Hour => Self::Hour,
            TimeBucket::Day => Self::Day,
            TimeBucket::Week => Self::Week,
            TimeBucket::Month => Self::Month,
        }
    }
}

/// One group of `stats`: the values it is grouped by (null for a dimension not grouped by) and its counts.
#[derive(SimpleObject)]
pub struct StatsGroup {
    language: Option<String>,
    customer_id: Option<ID>,
    /// When the time bucket starts (its local start in the query's time zone).
    bucket_start: Option<DateTime>,
    /// Stored messages.
    message_count: u64,
    /// Distinct dialogs among the group's messages (a dialog spanning two buckets counts in both).
    dialog_count: u64,
}

/// Which consent decisions `consentStats` counts; the fields combine with AND.
#[derive(InputObject, Default)]
pub struct ConsentStatsFilter {
    pub customer_id: Option<ID>,
    /// Decisions made at or after this time.
    pub since: Option<DateTime>,
    /// Decisions made before this time (exclusive), which must be later than `since`.
    pub until: Option<DateTime>,
}

/// Consent decisions of one time bucket (or of the whole period without `bucket`).
#[derive(SimpleObject)]
pub struct ConsentStatsGroup {
    bucket_start: Option<DateTime>,
    /// Decisions `true`: first ones, and consent given again after a withdrawal.
    granted: u64,
    /// Decisions `false` for dialogs that never had consent.
    refused: u64,
    /// Decisions `false` that took a consent back (withdrawals).
    withdrawn: u64,
}

/// A statistics query reads every matching row: it counts as this many store calls of the request's
/// MAX_STORE_CALLS, and a document that holds one runs on the lane for expensive documents.
const STATS_STORE_CALLS: usize = 5;

/// Past MAX_STATS_GROUPS groups, a statistics query is refused with the advice to narrow it.
fn stats_groups_refused(limit: usize) -> async_graphql::Error {
    async_graphql::Error::new(format!(
        "the statistics have more than {limit} groups (MAX_STATS_GROUPS): narrow the filter (a time range, a \
         language, a customer), use a longer time bucket, or group by fewer dimensions"
    ))
    .extend_with(|_, extensions| extensions.set("code", "RESPONSE_TOO_LARGE"))
}

/// Reads the buckets of a statistics query; the zone is UTC unless named.
fn stats_buckets(
    bucket: Option<TimeBucket>,
    time_zone: Option<&str>,
) -> Result<Option<crate::stats::Buckets>, ApiError> {
    let zone = crate::stats::Buckets::parse_zone("timeZone", time_zone.unwrap_or("UTC"))?;
    Ok(bucket.map(|unit| crate::stats::Buckets {
        unit: unit.into(),
        zone,
    }))
}

/// The mutation root: the ingest operations and the privacy operations.
#[derive(async_graphql::MergedObject, Default)]
pub struct MutationRoot(IngestMutation, ErasureMutation);

#[derive(Default)]
pub struct IngestMutation;

#[Object]
impl IngestMutation {
    /// Records one customer message. Until the dialog has a consent decision it waits in the buffer
    /// (`BUFFERED`); after `true` it is stored at once (`STORED`); after `false` it is dropped (`DISCARDED`).
    /// Safe to retry when `messageId` is set.
    #[graphql(guard = "require(Permission::Ingest)")]
    async fn push_message(
        &self,
        ctx: &Context<'_>,
        input: PushMessageInput,
    ) -> Result<PushMessagePayload> {
        let incoming = input.parse()?;
        let pushed = service(ctx)?.push(incoming).await?;
        Ok(PushMessagePayload {
            message: pushed.message,
            status: pushed.fate.into(),
        })
    }

    /// Records many messages in one request, for the background job: each exactly as `pushMessage` would,
    /// in the order given (so a dialog's messages keep their order), at most `MAX_PUSH_MESSAGES`. Returns one
    /// result per input, in order. Every input is validated first: one invalid input fails the whole call
    /// and records nothing. A message that then fails on its own (`CUSTOMER_MISMATCH`, `MESSAGE_ID_CONFLICT`,
    /// `BUFFER_FULL`, `BUFFER_UNAVAILABLE`, `STORE_UNAVAILABLE`) is `null` with an error whose path names its
    /// index; the others are recorded. Retrying the whole call is safe when every input has a `messageId`.
    #[graphql(guard = "require(Permission::Ingest)")]
    async fn push_messages(
        &self,
        ctx: &Context<'_>,
        inputs: Vec<PushMessageInput>,
    ) -> Result<Vec<Option<PushMessagePayload>>> {
        let limits = data::<Limits>(ctx)?;
        if inputs.len() > limits.max_push_messages {
            return Err(ApiError::invalid(
                "inputs",
                format!(
                    "holds {} messages, more than MAX_PUSH_MESSAGES ({}): split the list",
                    inputs.len(),
                    limits.max_push_messages
                ),
            )
            .into());
        }
        let mut parsed = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.into_iter().enumerate() {
            parsed.push(
                input
                    .parse()
                    .map_err(|error| error.at_index("inputs", index))?,
            );
        }
        let pushed = service(ctx)?.push_many(parsed).await;
        let mut results = Vec::with_capacity(pushed.len());
        for (index, pushed) in pushed.into_iter().enumerate() {
            results.push(match pushed {
                Ok(pushed) => Some(PushMessagePayload {
                    message: pushed.message,
                    status: pushed.fate.into(),
                }),
                Err(error) => {
                    // This item is null; its error names its place in the list.
                    let mut error =
                        ctx.set_error_path(error.extend().into_server_error(ctx.item.pos));
                    error.path.push(async_graphql::PathSegment::Index(index));
                    ctx.add_error(error);
                    None
                }
            });
        }
        Ok(results)
    }

    /// Records the customer's consent decision for a dialog. `true` stores its buffered messages and every
    /// later one; `false` discards them, deletes anything stored earlier (withdrawal), and discards later
    /// ones. Repeating a decision changes nothing. A dialog with neither buffered messages nor a decision is
    /// `DIALOG_NOT_FOUND`.
    #[graphql(guard = "require(Permission::Ingest)")]
    async fn give_consent(
        &self,
        ctx: &Context<'_>,
        dialog_id: ID,
        value: bool,
    ) -> Result<ConsentPayload> {
        let dialog_id = DialogId::parse("dialogId", dialog_id.0)?;
        let outcome = service(ctx)?.give_consent(dialog_id, value).await?;
        Ok(ConsentPayload(outcome))
    }
}

#[Object]
impl ErasureMutation {
    /// Erases everything held about a customer: stored dialogs and messages, consent records, and messages
    /// still waiting in the buffer. Records that the erasure happened (when, how much, a keyed digest of the
    /// customer id, and the id of the key that erased; no content). Messages pushed afterwards are new
    /// data. Admin only.
    #[graphql(guard = "require(Permission::Admin)")]
    async fn erase_customer(&self, ctx: &Context<'_>, customer_id: ID) -> Result<ErasurePayload> {
        let customer_id = CustomerId::parse("customerId", customer_id.0)?;
        let erased_by = data::<CallerName>(ctx)?.0.clone();
        let erased = service(ctx)?
            .erase_customer(customer_id.clone(), erased_by)
            .await?;
        Ok(ErasurePayload {
            customer_id,
            erased,
        })
    }
}

/// Mutations of the privacy operations, merged into the mutation root.
#[derive(Default)]
pub struct ErasureMutation;

/// A consent decision and its history.
pub struct ConsentRecord(crate::model::ConsentHistory);

/// A dialog's recorded consent decision and every change of it.
#[Object]
impl ConsentRecord {
    async fn dialog_id(&self) -> ID {
        ID(self.0.record.dialog_id.to_string())
    }

    async fn customer_id(&self) -> ID {
        ID(self.0.record.customer_id.to_string())
    }

    /// The decision in force.
    async fn value(&self) -> bool {
        self.0.record.value
    }

    /// When the decision in force was given.
    async fn decided_at(&self) -> DateTime {
        DateTime(self.0.record.decided_at)
    }

    /// Every change of decision, oldest first.
    async fn history(&self) -> Vec<ConsentChange> {
        self.0
            .changes
            .iter()
            .map(|&(value, at)| ConsentChange { value, at })
            .collect()
    }
}

/// One change of a consent decision.
pub struct ConsentChange {
    value: bool,
    at: i64,
}

/// One change of a consent decision.
#[Object]
impl ConsentChange {
    async fn value(&self) -> bool {
        self.value
    }

    async fn decided_at(&self) -> DateTime {
        DateTime(self.at)
    }
}

/// What an erasure removed.
pub struct ErasurePayload {
    customer_id: CustomerId,
    erased: crate::model::Erased,
}

/// What an erasure removed.
#[Object]
impl ErasurePayload {
    async fn customer_id(&self) -> ID {
        ID(self.customer_id.to_string())
    }

    /// Stored dialogs deleted.
    async fn dialog_count(&self) -> u64 {
        self.erased.dialogs
    }

    /// Stored messages deleted.
    async fn message_count(&self) -> u64 {
        self.erased.messages
    }

    /// Consent records deleted.
    async fn consent_count(&self) -> u64 {
        self.erased.consents
    }

    /// Messages dropped from the buffer (they had never been stored).
    async fn buffered_message_count(&self) -> u64 {
        self.erased.buffered_messages
    }
}
