//! The production store: MongoDB through the official driver, one shared client.
//!
//! Collections (field names as a data scientist reading them with pymongo sees them):
//! - `messages`: one document per stored message, `_id` the message id, dates as BSON dates;
//! - `dialogs`: one summary document per stored dialog (`_id` the dialog id), kept in step with its messages;
//! - `consents`: the audit record of each dialog's decision (`_id` the dialog id) with its `history`;
//! - `tombstones`: dialogs removed whole (`_id` the change number), for the change feed;
//! - `decisionEvents`: decisions that changed a dialog's decision (`_id` the change number), for live updates;
//! - `settings`: among others `lastChange`, the counter change numbers are taken from.
//!
//! Every write runs in a transaction, so a consented dialog is never half-written; message ids are decided
//! before the write, so a retried write inserts nothing twice.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use mongodb::bson::{Bson, DateTime as BsonDateTime, Document, doc};
use mongodb::error::{TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{ClientOptions, FindOptions, IndexOptions};
use mongodb::{Client, ClientSession, Collection, IndexModel};
use serde::{Deserialize, Serialize};

use super::{
    Appended, ConsentFilter, Decision, DecisionWritten, DialogFilter, Erased, ErasureAudit,
    MAX_DIALOGS_PER_ERASE_BATCH, MessageFilter, Store, StoreError, StoreResult,
};
use crate::clock::now_millis;
use crate::model::{
    Change, ClientMessageId, ConsentHistory, ConsentRecord, CustomerId, DecisionEvent,
    DecisionKind, Dialog, DialogId, Language, Message, MessageText, Removal,
};
use crate::paging::{KeyRange, ScanOrder};
use crate::stats::{Buckets, ConsentStats, Grouping, MessageStats};

/// How often a transaction that failed with a transient error (a write conflict, a failover) is retried.
const TRANSACTION_ATTEMPTS: usize = 5;

/// Documents per reply when loading the messages of a page of dialogs.
const LOAD_BATCH_SIZE: u32 = 1_000_000;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct MessageDoc {
    #[serde(rename = "_id")]
    id: String,
    dialog_id: String,
    customer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    text: String,
    language: String,
    created_at: BsonDateTime,
    /// Acceptance order in microseconds: orders messages within a dialog and in the flat listing.
    seq: i64,
    /// Its number in the change feed, taken when it is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    change_seq: Option<i64>,
}

impl From<&Message> for MessageDoc {
    fn from(message: &Message) -> Self {
        Self {
            id: message.id.clone(),
            dialog_id: message.dialog_id.to_string(),
            customer_id: message.customer_id.to_string(),
            message_id: message.client_id.as_ref().map(ToString::to_string),
            text: message.text.as_str().to_owned(),
            language: message.language.to_string(),
            created_at: BsonDateTime::from_millis(message.created_at),
            seq: message.seq,
            change_seq: None,
        }
    }
}

impl From<MessageDoc> for Message {
    fn from(doc: MessageDoc) -> Self {
        Self {
            id: doc.id,
            client_id: doc.message_id.map(ClientMessageId::from_trusted),
            dialog_id: DialogId::from_trusted(doc.dialog_id),
            customer_id: CustomerId::from_trusted(doc.customer_id),
            text: MessageText::from_trusted(doc.text),
            language: Language::from_trusted(doc.language),
            created_at: doc.created_at.timestamp_millis(),
            seq: doc.seq,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DialogDoc {
    #[serde(rename = "_id")]
    id: String,
    customer_id: String,
    languages: Vec<String>,
    message_count: i64,
    first_message_at: BsonDateTime,
    last_message_at: BsonDateTime,
    consented_at: BsonDateTime,
}

impl From<DialogDoc> for Dialog {
    fn from(doc: DialogDoc) -> Self {
        let mut languages: Vec<Language> = doc
            .languages
            .into_iter()
            .map(Language::from_trusted)
            .collect();
        languages.sort();
        languages.dedup();
        Self {
            id: DialogId::from_trusted(doc.id),
            customer_id: CustomerId::from_trusted(doc.customer_id),
            languages,
            message_count: doc.message_count,
            first_message_at: doc.first_message_at.timestamp_millis(),
            last_message_at: doc.last_message_at.timestamp_millis(),
            consented_at: doc.consented_at.timestamp_millis(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConsentDoc {
    #[serde(rename = "_id")]
    dialog_id: String,
    customer_id: String,
    value: bool,
    decided_at: BsonDateTime,
    #[serde(default)]
    history: Vec<ConsentChangeDoc>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConsentChangeDoc {
    value: bool,
    decided_at: BsonDateTime,
}

impl From<ConsentDoc> for ConsentRecord {
    fn from(doc: ConsentDoc) -> Self {
        Self {
            dialog_id: DialogId::from_trusted(doc.dialog_id),
            customer_id: CustomerId::from_trusted(doc.customer_id),
            value: doc.value,
            decided_at: doc.decided_at.timestamp_millis(),
        }
    }
}

pub struct MongoStore {
    client: Client,
    /// The servers from the URL, for the startup log (the URL itself may hold a password).
    hosts: String,
    database: String,
    messages: Collection<MessageDoc>,
    dialogs: Collection<DialogDoc>,
    consents: Collection<ConsentDoc>,
    /// Proof that erasures happened: counts and the customer's digest, no content.
    erasures: Collection<Document>,
    /// Erasures begun and not finished, by customer id (see [`Store::begin_erasure`]).
    erasures_running: Collection<Document>,
    /// Values the service keeps for itself (the audit secret when AUDIT_SECRET is unset, `lastChange`).
    settings: Collection<Document>,
    /// Dialogs removed whole, by change number (see [`Store::scan_changes`]).
    tombstones: Collection<Document>,
    /// Decisions that changed a dialog's decision, by change number (see [`Store::scan_decisions`]).
    decision_events: Collection<Document>,
    /// Held by the writes that take change numbers, for their whole transaction. Two transactions taking
    /// numbers conflict on the counter and one is aborted and retried: within this process they queue here
    /// instead, so that a burst of consents is not a burst of aborts that runs out of retries; only
    /// replicas conflict with each other.
    numbering: tokio::sync::Mutex<()>,
}

/// The `settings` document holding the last change number taken.
const LAST_CHANGE: &str = "lastChange";

/// Messages stored before the change feed existed are numbered this many per transaction at startup.
const NUMBERING_BATCH: usize = 1_000;

fn mongo_error(context: &'static str) -> impl Fn(mongodb::error::Error) -> StoreError {
    move |error| StoreError::new(context, error)
}

/// Keyset bounds on `(at_field, _id)`; `at` values are converted by `at_value` (a date or an integer).
fn range_filter(at_field: &str, range: &KeyRange, at_value: impl Fn(i64) -> Bson) -> Vec<Document> {
    // `at <= X` alone gives the planner a tight index bound; the `$or` then settles the ties on `at`.
    let bound = |inclusive: &str, strict: &str, at: i64, id: &str| {
        doc! {
            at_field: { inclusive: at_value(at) },
            "$or": [ { at_field: { strict: at_value(at) } }, { "_id": { strict: id } } ],
        }
    };
    let mut clauses = Vec::new();
    if let Some(key) = &range.older_than {
        clauses.push(bound("$lte", "$lt", key.at, &key.id));
    }
    if let Some(key) = &range.newer_than {
        clauses.push(bound("$gte", "$gt", key.at, &key.id));
    }
    clauses
}

/// `since <= at < until` on `at_field`, each end when set.
fn window_filter(
    at_field: &str,
    (since, until): (Option<i64>, Option<i64>),
    at_value: impl Fn(i64) -> Bson,
) -> Option<Document> {
    let mut bounds = Document::new();
    if let Some(since) = since {
        bounds.insert("$gte", at_value(since));
    }
    if let Some(until) = until {
        bounds.insert("$lt", at_value(until));
    }
    (!bounds.is_empty()).then(|| doc! { at_field: bounds })
}

/// `$dateTrunc` of a date field into `buckets` (weeks start on Monday).
fn date_trunc(field: &str, buckets: &Buckets) -> Bson {
    Bson::Document(doc! { "$dateTrunc": {
        "date": field,
        "unit": buckets.unit.mongo_name(),
        "timezone": buckets.zone.name(),
        "startOfWeek": "monday",
    } })
}

/// A count in an aggregation's answer, whichever number type the server chose.
fn count(row: &Document, field: &str) -> u64 {
    match row.get(field) {
        Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Bson::Double(n)) => *n as u64,
        _ => 0,
    }
}

fn and(mut clauses: Vec<Document>) -> Document {
    match clauses.len() {
        0 => Document::new(),
        1 => clauses.pop().expect("one clause"),
        _ => doc! { "$and": clauses },
    }
}

fn date(millis: i64) -> Bson {
    Bson::DateTime(BsonDateTime::from_millis(millis))
}

fn dialog_query(filter: &DialogFilter, range: &KeyRange) -> Document {
    let mut clauses = Vec::new();
    if let Some(language) = &filter.language {
        clauses.push(doc! { "languages": language.as_str() });
    }
    if let Some(customer_id) = &filter.customer_id {
        clauses.push(doc! { "customerId": customer_id.as_str() });
    }
    let (window, range) = super::scan_bounds(filter.window.scaled(1), range);
    clauses.extend(window_filter("lastMessageAt", window, date));
    clauses.extend(range_filter("lastMessageAt", &range, date));
    and(clauses)
}

fn message_query(filter: &MessageFilter, range: &KeyRange) -> Document {
    let mut clauses = Vec::new();
    if let Some(language) = &filter.language {
        clauses.push(doc! { "language": language.as_str() });
    }
    if let Some(customer_id) = &filter.customer_id {
        clauses.push(doc! { "customerId": customer_id.as_str() });
    }
    if let Some(dialog_id) = &filter.dialog_id {
        clauses.push(doc! { "dialogId": dialog_id.as_str() });
    }
    // On the sort key itself, so that a range narrows the same index scan that orders the page.
    let (window, range) = super::scan_bounds(filter.window.scaled(1000), range);
    clauses.extend(window_filter("seq", window, Bson::Int64));
    clauses.extend(range_filter("seq", &range, Bson::Int64));
    and(clauses)
}

fn sort(at_field: &str, order: ScanOrder) -> Document {
    let direction = match order {
        ScanOrder::NewestFirst => -1,
        ScanOrder::OldestFirst => 1,
    };
    doc! { at_field: direction, "_id": direction }
}

/// The summary update that folds newly inserted `messages` into their dialog's document.
fn dialog_update(messages: &[&MessageDoc], consented_at: i64) -> Document {
    let first_at = messages
        .iter()
        .map(|m| m.created_at)
        .min()
        .expect("at least one message");
    let last_at = messages
        .iter()
        .map(|m| m.created_at)
        .max()
        .expect("at least one message");
    let mut languages: Vec<&str> = messages.iter().map(|m| m.language.as_str()).collect();
    languages.sort_unstable();
    languages.dedup();
    doc! {
        "$setOnInsert": {
            "customerId": &messages[0].customer_id,
            "consentedAt": BsonDateTime::from_millis(consented_at),
        },
        "$inc": { "messageCount": messages.len() as i64 },
        "$min": { "firstMessageAt": first_at },
        "$max": { "lastMessageAt": last_at },
        "$addToSet": { "languages": { "$each": languages } },
    }
}

/// Runs `$body` (an expression using `$session`) in a transaction, retrying transient failures; the body is
/// a macro argument rather than a closure so that it can borrow freely.
macro_rules! in_transaction {
    ($store:expr, $session:ident, $body:expr) => {{
        let mut $session = $store
            .client
            .start_session()
            .await
            .map_err(mongo_error("start session"))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            $session
                .start_transaction()
                .await
                .map_err(mongo_error("start transaction"))?;
            let outcome = match $body.await {
                Ok(value) => commit(&mut $session).await.map(|()| value),
                Err(error) => {
                    // The server may have aborted already; a failed abort changes nothing.
                    let _ = $session.abort_transaction().await;
                    Err(error)
                }
            };
            match outcome {
                Err(error)
                    if error.contains_label(TRANSIENT_TRANSACTION_ERROR)
                        && attempt < TRANSACTION_ATTEMPTS =>
                {
                    // A write conflict: let the other transaction finish first. With jitter, so that
                    // replicas that conflicted once do not retry in step and conflict again.
                    tokio::time::sleep(backoff(attempt)).await;
                }
                other => break other.map_err(mongo_error("transaction")),
            }
        }
    }};
}

/// How long to wait before attempt `attempt + 1` of a transaction: 10 ms doubling, each time a random
/// amount between half of it and all of it.
fn backoff(attempt: usize) -> Duration {
    let ceiling = 10u64 << attempt.min(10);
    let random = u64::from(uuid::Uuid::new_v4().as_u128() as u32);
    Duration::from_millis(ceiling / 2 + random % (ceiling / 2 + 1))
}

/// Commits, retrying a commit whose outcome is unknown (committing twice is safe).
async fn commit(session: &mut ClientSession) -> mongodb::error::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match session.commit_transaction().await {
            Err(error)
                if error.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                    && attempt < TRANSACTION_ATTEMPTS => {}
            other => return other,
        }
    }
}

impl MongoStore {
    /// Connects to `url`, checks that the server answers, and creates the indexes the listings need.
    /// Without explicit timeouts in the URL, an unreachable server fails calls after 5 s instead of 30 s.
    pub async fn connect(url: &str, database: &str) -> StoreResult<Self> {
        let mut options = ClientOptions::parse(url)
            .await
            .map_err(mongo_error("invalid DATABASE_URL"))?;
        options
            .server_selection_timeout
            .get_or_insert(Duration::from_secs(5));
        options
            .connect_timeout
            .get_or_insert(Duration::from_secs(5));
        options.app_name.get_or_insert_with(|| "dataapi".to_owned());
        Self::with_options(options, database).await
    }

    /// Like [`connect`](Self::connect) with options prepared by the caller (tests add command monitoring to
    /// count round trips).
    pub async fn with_options(options: ClientOptions, database: &str) -> StoreResult<Self> {
        let hosts = options
            .hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let client = Client::with_options(options).map_err(mongo_error("mongodb client"))?;
        let db = client.database(database);
        let store = Self {
            messages: db.collection("messages"),
            dialogs: db.collection("dialogs"),
            consents: db.collection("consents"),
            erasures: db.collection("erasures"),
            erasures_running: db.collection("erasuresRunning"),
            settings: db.collection("settings"),
            tombstones: db.collection("tombstones"),
            decision_events: db.collection("decisionEvents"),
            numbering: tokio::sync::Mutex::new(()),
            database: database.to_owned(),
            hosts,
            client,
        };
        store.ping().await?;
        store.number_old_messages().await?;
        store.create_indexes().await?;
        Ok(store)
    }

    async fn create_indexes(&self) -> StoreResult<()> {
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        // `dialog_recent` replaced `dialog_order` (dialogId, seq): with `_id` last, a dialog's messages
        // listed by page are read in index order, not sorted.
        // 26 NamespaceNotFound (a new database), 27 IndexNotFound (already dropped).
        let absent = |error: &mongodb::error::Error| {
            matches!(*error.kind, mongodb::error::ErrorKind::Command(ref command)
                if matches!(command.code, 26 | 27))
        };
        match self.messages.drop_index("dialog_order").await {
            Ok(()) => tracing::info!("dropped messages.dialog_order (dialog_recent replaces it)"),
            Err(error) if absent(&error) => {}
            Err(error) => return Err(mongo_error("drop the old dialog_order index")(error)),
        }
        self.messages
            .create_indexes([
                index(doc! { "dialogId": 1, "seq": 1, "_id": 1 }, "dialog_recent"),
                index(doc! { "seq": -1, "_id": -1 }, "recent"),
                index(
                    doc! { "language": 1, "seq": -1, "_id": -1 },
                    "language_recent",
                ),
                index(
                    doc! { "customerId": 1, "seq": -1, "_id": -1 },
                    "customer_recent",
                ),
                index(doc! { "changeSeq": 1 }, "changes"),
            ])
            .await
            .map_err(mongo_error("create message indexes"))?;
        self.dialogs
            .create_indexes([
                index(doc! { "lastMessageAt": -1, "_id": -1 }, "recent"),
                index(
                    doc! { "customerId": 1, "lastMessageAt": -1, "_id": -1 },
                    "customer_recent",
                ),
                index(
                    doc! { "languages": 1, "lastMessageAt": -1, "_id": -1 },
                    "language_recent",
                ),
            ])
            .await
            .map_err(mongo_error("create dialog indexes"))?;
        self.consents
            .create_index(index(doc! { "customerId": 1 }, "customer"))
            .await
            .map_err(mongo_error("create consent indexes"))?;
        self.erasures
            .create_index(index(doc! { "customerDigest": 1 }, "customer_digest"))
            .await
            .map_err(mongo_error("create erasure indexes"))?;
        // An erasure deletes a dialog's decision events.
        self.decision_events
            .create_index(index(doc! { "dialogId": 1 }, "dialog"))
            .await
            .map_err(mongo_error("create decision event indexes"))?;
        Ok(())
    }

    /// Gives the messages stored before the change feed existed their change numbers, oldest first, in
    /// batches of one transaction each. Replicas starting together may run it at once: each batch takes
    /// the counter, so their transactions conflict and one retries, finding the messages numbered.
    async fn number_old_messages(&self) -> StoreResult<()> {
        let unnumbered = doc! { "changeSeq": { "$exists": false } };
        let mut numbered = 0u64;
        loop {
            let done = in_transaction!(self, session, async {
                let ids: Vec<Bson> = self
                    .messages
                    .clone_with_type::<Document>()
                    .find(unnumbered.clone())
                    .sort(doc! { "seq": 1, "_id": 1 })
                    .projection(doc! { "_id": 1 })
                    .limit(NUMBERING_BATCH as i64)
                    .session(&mut session)
                    .await?
                    .stream(&mut session)
                    .try_filter_map(|d| async move { Ok(d.get("_id").cloned()) })
                    .try_collect()
                    .await?;
                if ids.is_empty() {
                    return Ok::<_, mongodb::error::Error>(true);
                }
                let first = self.take_changes(&mut session, ids.len()).await?;
                // Each message's number is its place in the batch.
                self.messages
                    .update_many(
                        doc! { "_id": { "$in": &ids }, "changeSeq": { "$exists": false } },
                        vec![doc! { "$set": { "changeSeq": {
                            "$add": [first, { "$indexOfArray": [&ids, "$_id"] }]
                        } } }],
                    )
                    .session(&mut session)
                    .await?;
                numbered += ids.len() as u64;
                Ok(false)
            })?;
            if done {
                break;
            }
        }
        if numbered > 0 {
            tracing::info!(
                numbered,
                "numbered the messages stored before the change feed"
            );
        }
        Ok(())
    }

    /// Takes `count` change numbers from the counter, in the caller's transaction; returns the first.
    /// Two transactions taking numbers write the same document, so they conflict and one waits: numbers
    /// become visible in the order they were taken.
    async fn take_changes(
        &self,
        session: &mut ClientSession,
        count: usize,
    ) -> mongodb::error::Result<i64> {
        let count = count as i64;
        let counter = self
            .settings
            .find_one_and_update(
                doc! { "_id": LAST_CHANGE },
                doc! { "$inc": { "value": count } },
            )
            .upsert(true)
            .return_document(mongodb::options::ReturnDocument::After)
            .session(&mut *session)
            .await?;
        let last = counter
            .and_then(|counter| counter.get_i64("value").ok())
            .unwrap_or(count);
        Ok(last - count + 1)
    }

    /// Numbers the removal of each of `dialog_ids` as a change (a tombstone), in the removing transaction.
    async fn add_tombstones(
        &self,
        session: &mut ClientSession,
        dialog_ids: &[String],
        reason: Removal,
        at: i64,
    ) -> mongodb::error::Result<()> {
        if dialog_ids.is_empty() {
            return Ok(());
        }
        let first = self.take_changes(session, dialog_ids.len()).await?;
        let at = BsonDateTime::from_millis(at);
        self.tombstones
            .insert_many(dialog_ids.iter().zip(first..).map(|(dialog_id, change)| {
                doc! { "_id": change, "dialogId": dialog_id, "reason": reason.as_str(), "at": at }
            }))
            .session(&mut *session)
            .await?;
        Ok(())
    }

    /// Drops this store's database: for tests, which each get a database of their own.
    pub async fn drop_database(&self) -> StoreResult<()> {
        self.client
            .database(&self.database)
            .drop()
            .await
            .map_err(mongo_error("drop database"))
    }

    /// Makes `decision` the one in force unless it already is; returns the record in force, and what the
    /// decision did when it changed anything (the caller numbers that event). Always writes the consent
    /// document (`updatedAt`), so that two transactions deciding or appending for one dialog conflict
    /// instead of overtaking each other.
    async fn write_consent(
        &self,
        session: &mut ClientSession,
        decision: &Decision,
    ) -> mongodb::error::Result<(ConsentRecord, Option<DecisionKind>)> {
        let dialog_id = decision.dialog_id.as_str();
        let now = BsonDateTime::now();
        let existing = self
            .consents
            .find_one_and_update(
                doc! { "_id": dialog_id },
                doc! { "$set": { "updatedAt": now } },
            )
            .session(&mut *session)
            .await?;
        if let Some(existing) = existing.as_ref().filter(|e| e.value == decision.value) {
            return Ok((existing.clone().into(), None));
        }
        let kind = DecisionKind::of(existing.map(|e| e.value), decision.value);
        let at = BsonDateTime::from_millis(decision.at);
        self.consents
            .update_one(
                doc! { "_id": dialog_id },
                doc! {
                    "$set": { "value": decision.value, "decidedAt": at, "updatedAt": now },
                    "$setOnInsert": { "customerId": decision.customer_id.as_str() },
                    "$push": { "history": { "value": decision.value, "decidedAt": at } },
                },
            )
            .upsert(true)
            .session(&mut *session)
            .await?;
        let record = ConsentRecord {
            dialog_id: decision.dialog_id.clone(),
            customer_id: decision.customer_id.clone(),
            value: decision.value,
            decided_at: decision.at,
        };
        Ok((record, Some(kind)))
    }

    /// Records a decision event under change number `change`, in the deciding transaction.
    async fn add_decision_event(
        &self,
        session: &mut ClientSession,
        change: i64,
        decision: &Decision,
        kind: DecisionKind,
    ) -> mongodb::error::Result<()> {
        self.decision_events
            .insert_one(doc! {
                "_id": change,
                "dialogId": decision.dialog_id.as_str(),
                "kind": kind.as_str(),
                "at": BsonDateTime::from_millis(decision.at),
            })
            .session(&mut *session)
            .await?;
        Ok(())
    }

    /// Inserts the messages not stored yet and folds them into the dialog summary; returns how many were new.
    /// All of `messages` belong to one dialog. Reads name the dialog too, so that on a cluster sharded by
    /// `dialogId` (README: MongoDB at scale) they go to one shard, not to all.
    /// `event`: the decision that stores them, to number first (with the same round trip to the counter).
    async fn insert_messages(
        &self,
        session: &mut ClientSession,
        messages: &[MessageDoc],
        consented_at: i64,
        event: Option<(&Decision, DecisionKind)>,
    ) -> mongodb::error::Result<u64> {
        let Some(first) = messages.first() else {
            if let Some((decision, kind)) = event {
                let change = self.take_changes(session, 1).await?;
                self.add_decision_event(session, change, decision, kind)
                    .await?;
            }
            return Ok(0);
        };
        let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
        let existing: HashSet<String> = self
            .messages
            .clone_with_type::<Document>()
            .find(doc! { "dialogId": &first.dialog_id, "_id": { "$in": &ids } })
            .projection(doc! { "_id": 1 })
            .session(&mut *session)
            .await?
            .stream(&mut *session)
            .try_filter_map(|d| async move { Ok(d.get_str("_id").ok().map(str::to_owned)) })
            .try_collect()
            .await?;
        let mut new: Vec<MessageDoc> = messages
            .iter()
            .filter(|m| !existing.contains(&m.id))
            .cloned()
            .collect();
        if new.is_empty() && event.is_none() {
            return Ok(0);
        }
        let mut first_change = self
            .take_changes(session, new.len() + usize::from(event.is_some()))
            .await?;
        if let Some((decision, kind)) = event {
            self.add_decision_event(session, first_change, decision, kind)
                .await?;
            first_change += 1;
        }
        if new.is_empty() {
            return Ok(0);
        }
        for (message, change) in new.iter_mut().zip(first_change..) {
            message.change_seq = Some(change);
        }
        self.messages
            .insert_many(&new)
            .session(&mut *session)
            .await?;
        let new: Vec<&MessageDoc> = new.iter().collect();
        self.dialogs
            .update_one(
                doc! { "_id": &first.dialog_id },
                dialog_update(&new, consented_at),
            )
            .upsert(true)
            .session(&mut *session)
            .await?;
        Ok(new.len() as u64)
    }

    async fn write_decision(
        &self,
        session: &mut ClientSession,
        decision: &Decision,
        messages: &[MessageDoc],
    ) -> mongodb::error::Result<DecisionWritten> {
        let (record, event) = self.write_consent(session, decision).await?;
        let dialog_id = decision.dialog_id.as_str();
        if decision.value {
            let inserted = self
                .insert_messages(
                    session,
                    messages,
                    record.decided_at,
                    event.map(|kind| (decision, kind)),
                )
                .await?;
            Ok(DecisionWritten {
                record,
                inserted,
                deleted: 0,
            })
        } else {
            let deleted = self
                .messages
                .delete_many(doc! { "dialogId": dialog_id })
                .session(&mut *session)
                .await?
                .deleted_count;
            let removed = self
                .dialogs
                .delete_one(doc! { "_id": dialog_id })
                .session(&mut *session)
                .await?
                .deleted_count;
            if removed > 0 {
                self.add_tombstones(
                    session,
                    &[dialog_id.to_owned()],
                    Removal::Withdrawn,
                    decision.at,
                )
                .await?;
            }
            if let Some(kind) = event {
                let change = self.take_changes(session, 1).await?;
                self.add_decision_event(session, change, decision, kind)
                    .await?;
            }
            Ok(DecisionWritten {
                record,
                inserted: 0,
                deleted,
            })
        }
    }

    /// See [`Store::erase_batch`].
    async fn erase_batch_in(
        &self,
        session: &mut ClientSession,
        customer_id: &str,
        max_messages: usize,
    ) -> mongodb::error::Result<Option<Erased>> {
        // Touching the running record first makes two batches of one erasure (two replicas resuming it)
        // conflict, so that each counts only what it deleted itself.
        let running = self
            .erasures_running
            .find_one_and_update(
                doc! { "_id": customer_id },
                doc! { "$set": { "lastBatchAt": BsonDateTime::now() } },
            )
            .session(&mut *session)
            .await?;
        if running.is_none() {
            return Ok(None);
        }
        let limit = MAX_DIALOGS_PER_ERASE_BATCH as i64;
        let candidates: Vec<Document> = self
            .dialogs
            .clone_with_type::<Document>()
            .find(doc! { "customerId": customer_id })
            .projection(doc! { "_id": 1, "messageCount": 1 })
            .limit(limit)
            .session(&mut *session)
            .await?
            .stream(&mut *session)
            .try_collect()
            .await?;
        let mut ids: Vec<String> = Vec::new();
        let mut messages_in_batch = 0;
        for dialog in candidates {
            let count = usize::try_from(dialog.get_i64("messageCount").unwrap_or(0)).unwrap_or(0);
            if !ids.is_empty() && messages_in_batch + count > max_messages {
                break;
            }
            if let Ok(id) = dialog.get_str("_id") {
                ids.push(id.to_owned());
                messages_in_batch += count;
            }
        }
        if ids.is_empty() {
            // Consent records without a dialog: refusals and withdrawals.
            ids = self
                .ids_of(
                    &self.consents.clone_with_type(),
                    session,
                    customer_id,
                    limit,
                )
                .await?;
        }
        let mut erased = Erased::default();
        if ids.is_empty() {
            // Messages without their dialog break an invariant, but if there are any they go too.
            let stray = self
                .ids_of(
                    &self.messages.clone_with_type(),
                    session,
                    customer_id,
                    max_messages.max(1) as i64,
                )
                .await?;
            erased.messages = self
                .messages
                .delete_many(doc! { "_id": { "$in": &stray } })
                .session(&mut *session)
                .await?
                .deleted_count;
        } else {
            erased.messages = self
                .messages
                .delete_many(doc! { "dialogId": { "$in": &ids } })
                .session(&mut *session)
                .await?
                .deleted_count;
            erased.dialogs = self
                .dialogs
                .delete_many(doc! { "_id": { "$in": &ids } })
                .session(&mut *session)
                .await?
                .deleted_count;
            if erased.dialogs > 0 {
                // The ids came from `dialogs`: each was a stored dialog, now removed.
                self.add_tombstones(session, &ids, Removal::Erased, now_millis())
                    .await?;
            }
            erased.consents = self
                .consents
                .delete_many(doc! { "_id": { "$in": &ids } })
                .session(&mut *session)
                .await?
                .deleted_count;
            self.decision_events
                .delete_many(doc! { "dialogId": { "$in": &ids } })
                .session(&mut *session)
                .await?;
        }
        self.erasures_running
            .update_one(
                doc! { "_id": customer_id },
                doc! { "$inc": {
                    "dialogs": erased.dialogs as i64,
                    "messages": erased.messages as i64,
                    "consents": erased.consents as i64,
                } },
            )
            .session(&mut *session)
            .await?;
        Ok(Some(erased))
    }

    /// Up to `limit` ids of a customer's documents in `collection`.
    async fn ids_of(
        &self,
        collection: &Collection<Document>,
        session: &mut ClientSession,
        customer_id: &str,
        limit: i64,
    ) -> mongodb::error::Result<Vec<String>> {
        collection
            .find(doc! { "customerId": customer_id })
            .projection(doc! { "_id": 1 })
            .limit(limit)
            .session(&mut *session)
            .await?
            .stream(&mut *session)
            .try_filter_map(|d| async move { Ok(d.get_str("_id").ok().map(str::to_owned)) })
            .try_collect()
            .await
    }

    /// See [`Store::finish_erasure`].
    async fn finish_erasure_in(
        &self,
        session: &mut ClientSession,
        customer_id: &str,
        at: i64,
    ) -> mongodb::error::Result<Option<Erased>> {
        let Some(running) = self
            .erasures_running
            .find_one_and_delete(doc! { "_id": customer_id })
            .session(&mut *session)
            .await?
        else {
            return Ok(None);
        };
        let count = |field: &str| running.get_i64(field).unwrap_or(0).max(0) as u64;
        let erased = Erased {
            dialogs: count("dialogs"),
            messages: count("messages"),
            consents: count("consents"),
            buffered_messages: count("bufferedMessages"),
        };
        self.erasures
            .insert_one(doc! {
                "customerDigest": running.get_str("customerDigest").unwrap_or_default(),
                "digestScheme": running.get_str("digestScheme").unwrap_or_default(),
                "erasedBy": running.get_str("erasedBy").unwrap_or_default(),
                "erasedAt": BsonDateTime::from_millis(at),
                "dialogs": erased.dialogs as i64,
                "messages": erased.messages as i64,
                "consents": erased.consents as i64,
                "bufferedMessages": erased.buffered_messages as i64,
            })
            .session(&mut *session)
            .await?;
        Ok(Some(erased))
    }

    async fn append_in(
        &self,
        session: &mut ClientSession,
        message: &MessageDoc,
    ) -> mongodb::error::Result<Appended> {
        // Touching the consent document both checks the decision and makes a concurrent withdrawal (which
        // writes the same document) conflict with this transaction instead of overtaking it.
        let consent = self
            .consents
            .find_one_and_update(
                doc! { "_id": &message.dialog_id, "value": true },
                doc! { "$set": { "updatedAt": BsonDateTime::now() } },
            )
            .session(&mut *session)
            .await?;
        let Some(consent) = consent else {
            return Ok(Appended::NotConsented);
        };
        if let Some(existing) = self
            .messages
            .find_one(doc! { "dialogId": &message.dialog_id, "_id": &message.id })
            .session(&mut *session)
            .await?
        {
            return Ok(Appended::Stored {
                message: existing.into(),
                newly: false,
            });
        }
        self.insert_messages(
            session,
            std::slice::from_ref(message),
            consent.decided_at.timestamp_millis(),
            None,
        )
        .await?;
        Ok(Appended::Stored {
            message: message.clone().into(),
            newly: true,
        })
    }
}

#[async_trait]
impl Store for MongoStore {
    fn describe(&self) -> String {
        format!("MongoDB database `{}` at {}", self.database, self.hosts)
    }

    async fn ping(&self) -> StoreResult<()> {
        self.client
            .database("admin")
            .run_command(doc! { "ping": 1 })
            .await
            .map(drop)
            .map_err(mongo_error("ping"))
    }

    async fn close(&self) {
        self.client.clone().shutdown().immediate(true).await;
    }

    async fn consent_history(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentHistory>> {
        let doc = self
            .consents
            .find_one(doc! { "_id": dialog_id.as_str() })
            .await
            .map_err(mongo_error("read consent"))?;
        Ok(doc.map(|doc| ConsentHistory {
            changes: doc
                .history
                .iter()
                .map(|change| (change.value, change.decided_at.timestamp_millis()))
                .collect(),
            record: doc.into(),
        }))
    }

    async fn begin_erasure(
        &self,
        customer_id: &CustomerId,
        audit: &ErasureAudit,
    ) -> StoreResult<ErasureAudit> {
        let started = BsonDateTime::from_millis(audit.at);
        let running = self
            .erasures_running
            .find_one_and_update(
                doc! { "_id": customer_id.as_str() },
                doc! { "$setOnInsert": {
                    "customerDigest": &audit.customer_digest,
                    "digestScheme": &audit.digest_scheme,
                    "erasedBy": &audit.erased_by,
                    "startedAt": started,
                    "lastBatchAt": started,
                    "dialogs": 0_i64,
                    "messages": 0_i64,
                    "consents": 0_i64,
                } },
            )
            .upsert(true)
            .return_document(mongodb::options::ReturnDocument::After)
            .await
            .map_err(mongo_error("begin an erasure"))?
            .ok_or_else(|| StoreError("the begun erasure vanished".to_owned()))?;
        let text = |field: &str| running.get_str(field).unwrap_or_default().to_owned();
        Ok(ErasureAudit {
            at: running
                .get_datetime("startedAt")
                .map_or(audit.at, |at| at.timestamp_millis()),
            buffered_messages: 0,
            customer_digest: text("customerDigest"),
            digest_scheme: text("digestScheme"),
            erased_by: text("erasedBy"),
        })
    }

    async fn erase_batch(
        &self,
        customer_id: &CustomerId,
        max_messages: usize,
    ) -> StoreResult<Option<Erased>> {
        let _numbering = self.numbering.lock().await;
        in_transaction!(
            self,
            session,
            self.erase_batch_in(&mut session, customer_id.as_str(), max_messages)
        )
    }

    async fn note_buffered_messages(
        &self,
        customer_id: &CustomerId,
        count: u64,
    ) -> StoreResult<bool> {
        // In a transaction as every other write of an erasure, so that it waits for a batch of another
        // replica's instead of failing on it.
        in_transaction!(self, session, async {
            self.erasures_running
                .update_one(
                    doc! { "_id": customer_id.as_str() },
                    doc! { "$max": { "bufferedMessages": count as i64 } },
                )
                .session(&mut session)
                .await
                .map(|noted| noted.matched_count > 0)
        })
    }

    async fn finish_erasure(
        &self,
        customer_id: &CustomerId,
        at: i64,
    ) -> StoreResult<Option<Erased>> {
        in_transaction!(
            self,
            session,
            self.finish_erasure_in(&mut session, customer_id.as_str(), at)
        )
    }

    async fn unfinished_erasures(&self) -> StoreResult<Vec<(CustomerId, i64)>> {
        let running: Vec<Document> = self
            .erasures_running
            .find(doc! {})
            .projection(doc! { "_id": 1, "lastBatchAt": 1 })
            .await
            .map_err(mongo_error("list unfinished erasures"))?
            .try_collect()
            .await
            .map_err(mongo_error("list unfinished erasures"))?;
        running
            .into_iter()
            .map(|record| {
                let customer = record.get_str("_id").unwrap_or_default().to_owned();
                let at = record
                    .get_datetime("lastBatchAt")
                    .map_or(0, |at| at.timestamp_millis());
                CustomerId::parse("customerId", customer)
                    .map(|customer| (customer, at))
                    .map_err(|_| {
                        StoreError("an unfinished erasure names an invalid customer id".into())
                    })
            })
            .collect()
    }

    async fn audit_secret(&self, proposed: [u8; 32]) -> StoreResult<[u8; 32]> {
        // Inserted only if absent ($setOnInsert), then read: replicas starting together agree on the first.
        let id = "auditSecret";
        let secret = mongodb::bson::Binary {
            subtype: mongodb::bson::spec::BinarySubtype::Generic,
            bytes: proposed.to_vec(),
        };
        self.settings
            .update_one(
                doc! { "_id": id },
                doc! { "$setOnInsert": { "value": secret } },
            )
            .upsert(true)
            .await
            .map_err(mongo_error("store the audit secret"))?;
        let stored = self
            .settings
            .find_one(doc! { "_id": id })
            .await
            .map_err(mongo_error("read the audit secret"))?
            .ok_or_else(|| {
                StoreError("the audit secret vanished after it was stored".to_owned())
            })?;
        stored
            .get_binary_generic("value")
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
            .ok_or_else(|| StoreError("the stored audit secret is not 32 bytes".to_owned()))
    }

    async fn consent(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentRecord>> {
        self.consents
            .find_one(doc! { "_id": dialog_id.as_str() })
            .await
            .map(|doc| doc.map(Into::into))
            .map_err(mongo_error("read consent"))
    }

    async fn consents(&self, dialog_ids: &[DialogId]) -> StoreResult<Vec<ConsentRecord>> {
        if dialog_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = dialog_ids.iter().map(DialogId::as_str).collect();
        let docs: Vec<ConsentDoc> = self
            .consents
            .find(doc! { "_id": { "$in": ids } })
            .batch_size(LOAD_BATCH_SIZE)
            .await
            .map_err(mongo_error("read consents"))?
            .try_collect()
            .await
            .map_err(mongo_error("read consents"))?;
        Ok(docs.into_iter().map(Into::into).collect())
    }

    async fn record_decision(
        &self,
        decision: &Decision,
        messages: Vec<Message>,
    ) -> StoreResult<DecisionWritten> {
        let docs: Vec<MessageDoc> = if decision.value {
            messages.iter().map(MessageDoc::from).collect()
        } else {
            Vec::new()
        };
        let _numbering = self.numbering.lock().await;
        in_transaction!(
            self,
            session,
            self.write_decision(&mut session, decision, &docs)
        )
    }

    async fn append_consented(&self, message: &Message) -> StoreResult<Appended> {
        let doc = MessageDoc::from(message);
        let _numbering = self.numbering.lock().await;
        in_transaction!(self, session, self.append_in(&mut session, &doc))
    }

    async fn dialog(&self, dialog_id: &DialogId) -> StoreResult<Option<Dialog>> {
        self.dialogs
            .find_one(doc! { "_id": dialog_id.as_str() })
            .await
            .map(|doc| doc.map(Into::into))
            .map_err(mongo_error("read dialog"))
    }

    async fn scan_dialogs(
        &self,
        filter: &DialogFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Dialog>> {
        let options = FindOptions::builder()
            .sort(sort("lastMessageAt", order))
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .batch_size(u32::try_from(limit).unwrap_or(u32::MAX).max(1))
            .build();
        let docs: Vec<DialogDoc> = self
            .dialogs
            .find(dialog_query(filter, range))
            .with_options(options)
            .await
            .map_err(mongo_error("scan dialogs"))?
            .try_collect()
            .await
            .map_err(mongo_error("scan dialogs"))?;
        Ok(docs.into_iter().map(Into::into).collect())
    }

    async fn count_dialogs(&self, filter: &DialogFilter) -> StoreResult<u64> {
        self.dialogs
            .count_documents(dialog_query(filter, &KeyRange::default()))
            .await
            .map_err(mongo_error("count dialogs"))
    }

    async fn scan_messages(
        &self,
        filter: &MessageFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let options = FindOptions::builder()
            .sort(sort("seq", order))
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .batch_size(u32::try_from(limit).unwrap_or(u32::MAX).max(1))
            .build();
        let docs: Vec<MessageDoc> = self
            .messages
            .find(message_query(filter, range))
            .with_options(options)
            .await
            .map_err(mongo_error("scan messages"))?
            .try_collect()
            .await
            .map_err(mongo_error("scan messages"))?;
        Ok(docs.into_iter().map(Into::into).collect())
    }

    async fn count_messages(&self, filter: &MessageFilter) -> StoreResult<u64> {
        self.messages
            .count_documents(message_query(filter, &KeyRange::default()))
            .await
            .map_err(mongo_error("count messages"))
    }

    async fn message_stats(
        &self,
        filter: &MessageFilter,
        grouping: &Grouping,
        limit: usize,
    ) -> StoreResult<Vec<MessageStats>> {
        let mut key = Document::new();
        if grouping.language {
            key.insert("l", "$language");
        }
        if grouping.customer {
            key.insert("c", "$customerId");
        }
        if let Some(buckets) = &grouping.buckets {
            key.insert("b", date_trunc("$createdAt", buckets));
        }
        // First per dialog within each group, then per group: the dialogs are counted without keeping
        // their ids in memory.
        let mut per_dialog = key.clone();
        per_dialog.insert("d", "$dialogId");
        let mut group = Document::new();
        for field in key.keys() {
            group.insert(field.as_str(), format!("$_id.{field}"));
        }
        let pipeline = [
            doc! { "$match": message_query(filter, &KeyRange::default()) },
            doc! { "$group": { "_id": per_dialog, "n": { "$sum": 1 } } },
            doc! { "$group": { "_id": group, "messages": { "$sum": "$n" }, "dialogs": { "$sum": 1 } } },
            doc! { "$sort": { "_id": 1 } },
            doc! { "$limit": i64::try_from(limit).unwrap_or(i64::MAX) },
        ];
        let rows: Vec<Document> = self
            .messages
            .aggregate(pipeline)
            .await
            .map_err(mongo_error("message statistics"))?
            .try_collect()
            .await
            .map_err(mongo_error("message statistics"))?;
        rows.into_iter()
            .map(|row| {
                let key = row.get_document("_id").cloned().unwrap_or_default();
                Ok(MessageStats {
                    language: key
                        .get_str("l")
                        .ok()
                        .map(|l| Language::from_trusted(l.to_owned())),
                    customer_id: key
                        .get_str("c")
                        .ok()
                        .map(|c| CustomerId::from_trusted(c.to_owned())),
                    bucket: key.get_datetime("b").ok().map(|b| b.timestamp_millis()),
                    messages: count(&row, "messages"),
                    dialogs: count(&row, "dialogs"),
                })
            })
            .collect()
    }

    async fn consent_stats(
        &self,
        filter: &ConsentFilter,
        buckets: Option<&Buckets>,
        limit: usize,
    ) -> StoreResult<Vec<ConsentStats>> {
        let mut matched = Document::new();
        if let Some(customer_id) = &filter.customer_id {
            matched.insert("customerId", customer_id.as_str());
        }
        let bucket = match buckets {
            Some(buckets) => date_trunc("$cur.decidedAt", buckets),
            None => Bson::Null,
        };
        let is_false = doc! { "$eq": ["$cur.value", false] };
        let after_true = doc! { "$eq": ["$prev.value", true] };
        let pipeline = [
            doc! { "$match": matched },
            // Each change of decision with the one before it: a `false` after a `true` is a withdrawal.
            doc! { "$project": { "pairs": { "$zip": {
                "inputs": ["$history", { "$concatArrays": [[Bson::Null], "$history"] }],
            } } } },
            doc! { "$unwind": "$pairs" },
            doc! { "$project": {
                "cur": { "$arrayElemAt": ["$pairs", 0] },
                "prev": { "$arrayElemAt": ["$pairs", 1] },
            } },
            doc! { "$match": and(window_filter("cur.decidedAt", filter.window.scaled(1), date).into_iter().collect()) },
            doc! { "$group": {
                "_id": bucket,
                "granted": { "$sum": { "$cond": [{ "$eq": ["$cur.value", true] }, 1, 0] } },
                "refused": { "$sum": { "$cond": [{ "$and": [is_false.clone(), { "$not": [after_true.clone()] }] }, 1, 0] } },
                "withdrawn": { "$sum": { "$cond": [{ "$and": [is_false, after_true] }, 1, 0] } },
            } },
            doc! { "$sort": { "_id": 1 } },
            doc! { "$limit": i64::try_from(limit).unwrap_or(i64::MAX) },
        ];
        let rows: Vec<Document> = self
            .consents
            .clone_with_type::<Document>()
            .aggregate(pipeline)
            .await
            .map_err(mongo_error("consent statistics"))?
            .try_collect()
            .await
            .map_err(mongo_error("consent statistics"))?;
        Ok(rows
            .into_iter()
            .map(|row| ConsentStats {
                bucket: row.get_datetime("_id").ok().map(|b| b.timestamp_millis()),
                granted: count(&row, "granted"),
                refused: count(&row, "refused"),
                withdrawn: count(&row, "withdrawn"),
            })
            .collect())
    }

    async fn last_change(&self) -> StoreResult<i64> {
        let counter = self
            .settings
            .find_one(doc! { "_id": LAST_CHANGE })
            .await
            .map_err(mongo_error("read the last change"))?;
        Ok(counter
            .and_then(|counter| counter.get_i64("value").ok())
            .unwrap_or(0))
    }

    async fn scan_changes(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<Change>> {
        let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
        let stored: Vec<Change> = self
            .messages
            .find(doc! { "changeSeq": { "$gt": after, "$lte": through } })
            .sort(doc! { "changeSeq": 1 })
            .limit(limit_i64)
            .await
            .map_err(mongo_error("read stored changes"))?
            .map_ok(|doc| Change::Stored {
                number: doc.change_seq.unwrap_or_default(),
                message: doc.into(),
            })
            .try_collect()
            .await
            .map_err(mongo_error("read stored changes"))?;
        let removed: Vec<Change> = self
            .tombstones
            .find(doc! { "_id": { "$gt": after, "$lte": through } })
            .sort(doc! { "_id": 1 })
            .limit(limit_i64)
            .await
            .map_err(mongo_error("read removals"))?
            .map_ok(|doc| Change::Removed {
                number: doc.get_i64("_id").unwrap_or_default(),
                dialog_id: DialogId::from_trusted(
                    doc.get_str("dialogId").unwrap_or_default().to_owned(),
                ),
                // An unknown reason still removes the dialog.
                reason: Removal::from_stored(doc.get_str("reason").unwrap_or_default())
                    .unwrap_or(Removal::Erased),
                at: doc.get_datetime("at").map_or(0, |at| at.timestamp_millis()),
            })
            .try_collect()
            .await
            .map_err(mongo_error("read removals"))?;
        Ok(super::merge_changes(stored, removed, limit))
    }

    async fn scan_decisions(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<DecisionEvent>> {
        self.decision_events
            .find(doc! { "_id": { "$gt": after, "$lte": through } })
            .sort(doc! { "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(mongo_error("read decision events"))?
            .map_ok(|doc| DecisionEvent {
                number: doc.get_i64("_id").unwrap_or_default(),
                dialog_id: DialogId::from_trusted(
                    doc.get_str("dialogId").unwrap_or_default().to_owned(),
                ),
                // Only this code writes kinds; an unknown one reads as a refusal.
                kind: DecisionKind::from_stored(doc.get_str("kind").unwrap_or_default())
                    .unwrap_or(DecisionKind::Refused),
                at: doc.get_datetime("at").map_or(0, |at| at.timestamp_millis()),
            })
            .try_collect()
            .await
            .map_err(mongo_error("read decision events"))
    }

    async fn messages_of_dialogs(
        &self,
        dialog_ids: &[DialogId],
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        if dialog_ids.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = dialog_ids.iter().map(DialogId::as_str).collect();
        let docs: Vec<MessageDoc> = self
            .messages
            .find(doc! { "dialogId": { "$in": ids } })
            .sort(doc! { "dialogId": 1, "seq": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            // One reply (up to the server's 16 MB) instead of the default first batch of 101 documents.
            .batch_size(LOAD_BATCH_SIZE)
            .await
            .map_err(mongo_error("load messages"))?
            .try_collect()
            .await
            .map_err(mongo_error("load messages"))?;
        Ok(docs.into_iter().map(Into::into).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::SortKey;
    use mongodb::bson;

    fn key(at: i64, id: &str) -> SortKey {
        SortKey {
            at,
            id: id.to_owned(),
        }
    }

    #[test]
    fn dialog_filters_combine_with_and_and_keyset_bounds() {
        let filter = DialogFilter {
            language: Some(Language::from_trusted("en".into())),
            customer_id: Some(CustomerId::from_trusted("c1".into())),
            ..Default::default()
        };
        let range = KeyRange {
            older_than: Some(key(1000, "d9")),
            newer_than: None,
        };
        assert_eq!(
            dialog_query(&filter, &range),
            doc! { "$and": [
                { "languages": "en" },
                { "customerId": "c1" },
                {
                    "lastMessageAt": { "$lte": BsonDateTime::from_millis(1000) },
                    "$or": [
                        { "lastMessageAt": { "$lt": BsonDateTime::from_millis(1000) } },
                        { "_id": { "$lt": "d9" } },
                    ],
                },
            ] }
        );
        assert_eq!(
            dialog_query(&DialogFilter::default(), &KeyRange::default()),
            doc! {}
        );
    }

    #[test]
    fn message_ranges_bound_both_sides_on_seq() {
        let range = KeyRange {
            older_than: Some(key(50, "b")),
            newer_than: Some(key(10, "a")),
        };
        assert_eq!(
            message_query(&MessageFilter::default(), &range),
            doc! { "$and": [
                { "seq": { "$lte": 50_i64 }, "$or": [ { "seq": { "$lt": 50_i64 } }, { "_id": { "$lt": "b" } } ] },
                { "seq": { "$gte": 10_i64 }, "$or": [ { "seq": { "$gt": 10_i64 } }, { "_id": { "$gt": "a" } } ] },
            ] }
        );
        assert_eq!(
            sort("seq", ScanOrder::NewestFirst),
            doc! { "seq": -1, "_id": -1 }
        );
    }

    #[test]
    fn message_documents_use_bson_dates_and_round_trip() {
        let message = Message {
            id: "m1".into(),
            client_id: Some(ClientMessageId::from_trusted("k".into())),
            dialog_id: DialogId::from_trusted("d".into()),
            customer_id: CustomerId::from_trusted("c".into()),
            text: MessageText::from_trusted("hi".into()),
            language: Language::from_trusted("en".into()),
            created_at: 1_700_000_000_123,
            seq: 1_700_000_000_123_456,
        };
        let document = bson::to_document(&MessageDoc::from(&message)).unwrap();
        assert_eq!(
            document.get("createdAt"),
            Some(&Bson::DateTime(BsonDateTime::from_millis(
                1_700_000_000_123
            )))
        );
        assert_eq!(document.get_str("messageId").unwrap(), "k");
        let back: MessageDoc = bson::from_document(document).unwrap();
        assert_eq!(Message::from(back), message);
    }
}
