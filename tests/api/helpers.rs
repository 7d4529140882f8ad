//! Test harness: each test gets its own service on a free port, on its own database (a fresh SQLite file, or a
//! freshly named MongoDB database that is dropped afterwards), and talks to it over real HTTP.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use async_trait::async_trait;
use dataapi::app::Application;
use dataapi::config::{BufferBackend, Config};
use dataapi::model::{
    ConsentHistory, ConsentRecord, CustomerId, Dialog, DialogId, Erased, Message,
};
use dataapi::paging::{KeyRange, ScanOrder};
use dataapi::store::{
    Appended, Decision, DecisionWritten, DialogFilter, MessageFilter, MongoStore, SharedStore,
    SqliteStore, Store, StoreError, StoreResult,
};
use futures::FutureExt;
use serde_json::{Value, json};

pub use crate::redis_support::BufferKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Mongo,
}

/// The MongoDB the tests use: `TEST_MONGODB_URL`, which `scripts/test` sets after starting SecantusDB.
/// Missing, the MongoDB tests fail: they are never skipped.
pub fn mongodb_url() -> String {
    std::env::var("TEST_MONGODB_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_MONGODB_URL is not set: run the suite with scripts/test (which starts a MongoDB-compatible \
             server), or point TEST_MONGODB_URL at a MongoDB replica set"
        )
    })
}

/// Wraps a real store to count its calls and, on demand, to fail them as a dead database would.
pub struct InstrumentedStore {
    inner: SharedStore,
    calls: Mutex<HashMap<&'static str, usize>>,
    fail_all: AtomicBool,
    fail_after_write: AtomicBool,
    /// Milliseconds every call waits before running, as a slow database would.
    delay_ms: std::sync::atomic::AtomicU64,
    /// When set, the next `record_decision` signals the first and waits for the second before writing.
    hold: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
    hold_consents: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
    /// When set, the next `record_decision` writes, notifies, and then never returns: the replica stops
    /// between the database commit and cleaning its buffer, as if it died there.
    freeze_after_decision: Mutex<Option<Arc<Notify>>>,
    /// When set, how many more `erase_batch` calls go through; after those, every one fails.
    erase_batches_left: Mutex<Option<usize>>,
    /// When set, the next call of this method fails before it reaches the database.
    fail_next: Mutex<Option<&'static str>>,
}

impl InstrumentedStore {
    fn new(inner: SharedStore) -> Self {
        Self {
            inner,
            calls: Mutex::default(),
            fail_all: AtomicBool::new(false),
            fail_after_write: AtomicBool::new(false),
            delay_ms: Default::default(),
            hold: Mutex::default(),
            hold_consents: Mutex::default(),
            freeze_after_decision: Mutex::default(),
            erase_batches_left: Mutex::default(),
            fail_next: Mutex::default(),
        }
    }

    /// The next call of `method` fails before it reaches the database, as if it had not answered.
    pub fn fail_next(&self, method: &'static str) {
        *self.fail_next.lock().unwrap() = Some(method);
    }

    /// Every call first waits this long (zero: no wait).
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Holds the next consent write: `entered` is notified when it starts, and it proceeds only after
    /// `release` is notified.
    pub fn hold_next_decision(&self) -> (Arc<Notify>, Arc<Notify>) {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        *self.hold.lock().unwrap() = Some((entered.clone(), release.clone()));
        (entered, release)
    }

    /// The next consent write commits and then hangs forever; `committed` is notified once it has written.
    pub fn freeze_after_next_decision(&self) -> Arc<Notify> {
        let committed = Arc::new(Notify::new());
        *self.freeze_after_decision.lock().unwrap() = Some(committed.clone());
        committed
    }

    /// Holds the answer of the next look-up of many decisions (`consents`) after it has read the store:
    /// `entered` is notified then, and the answer goes back only after `release` is notified.
    pub fn hold_next_consents_answer(&self) -> (Arc<Notify>, Arc<Notify>) {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        *self.hold_consents.lock().unwrap() = Some((entered.clone(), release.clone()));
        (entered, release)
    }

    /// `count` more erasure batches go through; every later one fails, as if this process had lost the
    /// database for good half-way through an erasure.
    pub fn fail_erase_batches_after(&self, count: usize) {
        *self.erase_batches_left.lock().unwrap() = Some(count);
    }

    /// How many times each store method ran since the last reset.
    pub fn calls(&self) -> HashMap<&'static str, usize> {
        self.calls.lock().unwrap().clone()
    }

    pub fn reset_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// Every call fails, as when the database is down.
    pub fn set_down(&self, down: bool) {
        self.fail_all.store(down, Ordering::SeqCst);
    }

    /// Writes go through but report failure, as when the connection drops before the acknowledgement.
    pub fn set_lose_acknowledgements(&self, lose: bool) {
        self.fail_after_write.store(lose, Ordering::SeqCst);
    }

    async fn enter(&self, method: &'static str) -> StoreResult<()> {
        *self.calls.lock().unwrap().entry(method).or_default() += 1;
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        if self.fail_all.load(Ordering::SeqCst) {
            return Err(StoreError(format!("injected outage in {method}")));
        }
        let mut fail_next = self.fail_next.lock().unwrap();
        if *fail_next == Some(method) {
            *fail_next = None;
            return Err(StoreError(format!("injected failure of {method}")));
        }
        Ok(())
    }

    fn acknowledge<T>(&self, method: &'static str, result: StoreResult<T>) -> StoreResult<T> {
        let value = result?;
        if self.fail_after_write.load(Ordering::SeqCst) {
            return Err(StoreError(format!(
                "injected lost acknowledgement in {method}"
            )));
        }
        Ok(value)
    }
}

/// Counts a call under its name when dropped before [`finished`](Self::finished): it failed, or it was
/// dropped unanswered (a deadline).
struct Unfinished<'a> {
    calls: &'a Mutex<HashMap<&'static str, usize>>,
    name: &'static str,
    armed: bool,
}

impl<'a> Unfinished<'a> {
    fn new(calls: &'a Mutex<HashMap<&'static str, usize>>, name: &'static str) -> Self {
        Self {
            calls,
            name,
            armed: true,
        }
    }

    fn finished(mut self) {
        self.armed = false;
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            *self.calls.lock().unwrap().entry(self.name).or_default() += 1;
        }
    }
}

#[async_trait]
impl Store for InstrumentedStore {
    fn describe(&self) -> String {
        format!("instrumented {}", self.inner.describe())
    }

    fn scrub_status(&self) -> dataapi::store::ScrubStatus {
        self.inner.scrub_status()
    }

    async fn ping(&self) -> StoreResult<()> {
        self.enter("ping").await?;
        self.inner.ping().await
    }

    async fn consent(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentRecord>> {
        self.enter("consent").await?;
        self.inner.consent(dialog_id).await
    }

    async fn consents(&self, dialog_ids: &[DialogId]) -> StoreResult<Vec<ConsentRecord>> {
        self.enter("consents").await?;
        let answer = self.inner.consents(dialog_ids).await;
        let hold = self.hold_consents.lock().unwrap().take();
        if let Some((entered, release)) = hold {
            entered.notify_one();
            release.notified().await;
        }
        answer
    }

    async fn consent_history(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentHistory>> {
        self.enter("consent_history").await?;
        self.inner.consent_history(dialog_id).await
    }

    async fn begin_erasure(
        &self,
        customer_id: &CustomerId,
        audit: &dataapi::store::ErasureAudit,
    ) -> StoreResult<dataapi::store::ErasureAudit> {
        self.enter("begin_erasure").await?;
        let result = self.inner.begin_erasure(customer_id, audit).await;
        self.acknowledge("begin_erasure", result)
    }

    async fn erase_batch(
        &self,
        customer_id: &CustomerId,
        max_messages: usize,
    ) -> StoreResult<Option<Erased>> {
        // Counted when the call fails, or when its caller's deadline drops it before it answers.
        let unfinished = Unfinished::new(&self.calls, "erase_batch unfinished");
        self.enter("erase_batch").await?;
        if let Some(left) = self.erase_batches_left.lock().unwrap().as_mut() {
            if *left == 0 {
                return Err(StoreError("injected outage in erase_batch".into()));
            }
            *left -= 1;
        }
        let result = self.inner.erase_batch(customer_id, max_messages).await;
        let result = self.acknowledge("erase_batch", result);
        if result.is_ok() {
            unfinished.finished();
        }
        result
    }

    async fn note_buffered_messages(
        &self,
        customer_id: &CustomerId,
        count: u64,
    ) -> StoreResult<bool> {
        self.enter("note_buffered_messages").await?;
        let result = self.inner.note_buffered_messages(customer_id, count).await;
        self.acknowledge("note_buffered_messages", result)
    }

    async fn finish_erasure(
        &self,
        customer_id: &CustomerId,
        at: i64,
    ) -> StoreResult<Option<Erased>> {
        self.enter("finish_erasure").await?;
        let result = self.inner.finish_erasure(customer_id, at).await;
        self.acknowledge("finish_erasure", result)
    }

    /// Not counted: the service looks these up in the background every few seconds, which would disturb
    /// the tests that count what one request costs.
    async fn unfinished_erasures(&self) -> StoreResult<Vec<(CustomerId, i64)>> {
        if self.fail_all.load(Ordering::SeqCst) {
            return Err(StoreError("injected outage in unfinished_erasures".into()));
        }
        self.inner.unfinished_erasures().await
    }

    async fn audit_secret(&self, proposed: [u8; 32]) -> StoreResult<[u8; 32]> {
        self.inner.audit_secret(proposed).await
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    async fn record_decision(
        &self,
        decision: &Decision,
        messages: Vec<Message>,
    ) -> StoreResult<DecisionWritten> {
        self.enter("record_decision").await?;
        let hold = self.hold.lock().unwrap().take();
        if let Some((entered, release)) = hold {
            entered.notify_one();
            release.notified().await;
        }
        let result = self.inner.record_decision(decision, messages).await;
        let freeze = self.freeze_after_decision.lock().unwrap().take();
        if let Some(committed) = freeze {
            assert!(result.is_ok(), "the frozen decision was written");
            committed.notify_one();
            std::future::pending::<()>().await;
        }
        self.acknowledge("record_decision", result)
    }

    async fn append_consented(&self, message: &Message) -> StoreResult<Appended> {
        self.enter("append_consented").await?;
        let result = self.inner.append_consented(message).await;
        self.acknowledge("append_consented", result)
    }

    async fn dialog(&self, dialog_id: &DialogId) -> StoreResult<Option<Dialog>> {
        self.enter("dialog").await?;
        self.inner.dialog(dialog_id).await
    }

    async fn scan_dialogs(
        &self,
        filter: &DialogFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Dialog>> {
        self.enter("scan_dialogs").await?;
        self.inner.scan_dialogs(filter, range, order, limit).await
    }

    async fn count_dialogs(&self, filter: &DialogFilter) -> StoreResult<u64> {
        self.enter("count_dialogs").await?;
        self.inner.count_dialogs(filter).await
    }

    async fn scan_messages(
        &self,
        filter: &MessageFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        self.enter("scan_messages").await?;
        self.inner.scan_messages(filter, range, order, limit).await
    }

    async fn count_messages(&self, filter: &MessageFilter) -> StoreResult<u64> {
        self.enter("count_messages").await?;
        self.inner.count_messages(filter).await
    }

    async fn message_stats(
        &self,
        filter: &MessageFilter,
        grouping: &dataapi::stats::Grouping,
        limit: usize,
    ) -> StoreResult<Vec<dataapi::stats::MessageStats>> {
        self.enter("message_stats").await?;
        self.inner.message_stats(filter, grouping, limit).await
    }

    async fn consent_stats(
        &self,
        filter: &dataapi::store::ConsentFilter,
        buckets: Option<&dataapi::stats::Buckets>,
        limit: usize,
    ) -> StoreResult<Vec<dataapi::stats::ConsentStats>> {
        self.enter("consent_stats").await?;
        self.inner.consent_stats(filter, buckets, limit).await
    }

    async fn messages_of_dialogs(
        &self,
        dialog_ids: &[DialogId],
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        self.enter("messages_of_dialogs").await?;
        self.inner.messages_of_dialogs(dialog_ids, limit).await
    }

    async fn last_change(&self) -> StoreResult<i64> {
        self.enter("last_change").await?;
        self.inner.last_change().await
    }

    async fn scan_decisions(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<dataapi::model::DecisionEvent>> {
        self.enter("scan_decisions").await?;
        self.inner.scan_decisions(after, through, limit).await
    }

    async fn scan_changes(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<dataapi::model::Change>> {
        self.enter("scan_changes").await?;
        self.inner.scan_changes(after, through, limit).await
    }
}

/// What a test's database needs after the test.
enum Cleanup {
    TempDir(#[allow(dead_code)] tempfile::TempDir),
    /// Dropped through a client of its own: the service closes its client when it stops.
    MongoDatabase {
        url: String,
        name: String,
    },
}

/// Where a test's data lives, for tests that reach into the database behind the service's back.
#[derive(Clone, Debug)]
pub enum TestDatabase {
    Sqlite(std::path::PathBuf),
    Mongo { url: String, name: String },
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// Set by [`run`]; `None` for services started on a store of the test's own.
    pub database: Option<TestDatabase>,
    /// The buffer it was started with (for Redis: where, and under which key prefix).
    pub buffer: BufferBackend,
    /// The buffer as the service sees it, with hooks to stop the service at chosen points.
    pub buffer_hooks: Arc<crate::redis_support::InstrumentedBuffer>,
    /// The store as the service sees it, instrumented.
    pub store: Arc<InstrumentedStore>,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer <key>` by the request helpers, when set.
    pub key: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// True once the service has stopped (its in-flight requests answered, its store closed).
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// Waits for a [`TestApp`] to stop after it was dropped: a test database dropped under a service that is
/// still finishing a transaction in it can stall the MongoDB-compatible test server.
pub struct Stopped(tokio::sync::watch::Receiver<bool>);

impl Stopped {
    /// Bounded: a test may have left a request held up on purpose.
    pub async fn wait(mut self) {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.0.wait_for(|stopped| *stopped),
        )
        .await;
    }
}

/// Opens a fresh, empty store of `backend` and what to clean up after it.
async fn fresh_store(backend: Backend) -> (SharedStore, Cleanup, TestDatabase) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("test.sqlite3");
            let store = SqliteStore::open(&path).await.expect("open SQLite store");
            (
                Arc::new(store),
                Cleanup::TempDir(dir),
                TestDatabase::Sqlite(path),
            )
        }
        Backend::Mongo => {
            let name = format!("dataapi_test_{}", uuid::Uuid::now_v7().simple());
            let url = mongodb_url();
            let store = Arc::new(
                MongoStore::connect(&url, &name)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach TEST_MONGODB_URL: {e}")),
            );
            (
                store,
                Cleanup::MongoDatabase {
                    url: url.clone(),
                    name: name.clone(),
                },
                TestDatabase::Mongo { url, name },
            )
        }
    }
}

/// The settings of a test service: defaults, on a free loopback port. Its store is given to it directly,
/// so the database setting is unused.
/// The audit secret of the test services (`AUDIT_SECRET`), to check erasure records against.
pub const TEST_AUDIT_SECRET: &str = "test-audit-secret-of-at-least-32-characters";

pub fn test_config() -> Config {
    Config {
        audit_secret: Some(dataapi::model::AuditKey::from_text(TEST_AUDIT_SECRET)),
        bind_addr: "127.0.0.1:0".parse().unwrap(),
        log: "warn".into(),
        // Every test drives its service from one address, as fast as it can; the limits per client have
        // tests of their own (attacks.rs).
        clients: dataapi::admission::ClientLimits {
            requests_per_second: 0,
            burst: 0,
            concurrent_requests: 0,
        },
        ..Config::default()
    }
}

/// [`test_config`] with deadlines that wait out the MongoDB-compatible test server, for tests that check what
/// is stored, not how fast: on a loaded machine that server (an emulator in Python) can hold a write behind
/// the others' for longer than the default deadlines, which the service then rightly reports as
/// `STORE_UNAVAILABLE` or 408. Below the test client's own 120 s.
pub fn patient_config() -> Config {
    Config {
        store_timeout: std::time::Duration::from_secs(60),
        request_timeout: std::time::Duration::from_secs(90),
        ..test_config()
    }
}

impl TestApp {
    /// Starts the service on `store` on a free loopback port.
    pub async fn start(store: SharedStore) -> Self {
        Self::start_with(store, test_config()).await
    }

    /// Starts the service on `store` with the given settings.
    pub async fn start_with(store: SharedStore, config: Config) -> Self {
        let store = Arc::new(InstrumentedStore::new(store));
        let buffer = dataapi::app::open_buffer(&config)
            .await
            .expect("the buffer answers");
        let buffer_hooks = Arc::new(crate::redis_support::InstrumentedBuffer::new(buffer));
        let app = Application::with_parts(&config, store.clone(), buffer_hooks.clone())
            .await
            .expect("the service starts");
        let addr = app.local_addr();
        let (shutdown, shutdown_received) = tokio::sync::oneshot::channel::<()>();
        let (stopped_sender, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = app
                .run_until(async {
                    let _ = shutdown_received.await;
                })
                .await;
            let _ = stopped_sender.send(true);
        });
        Self {
            addr,
            database: None,
            buffer: config.buffer.backend,
            buffer_hooks,
            store,
            // Bounded: a request that never gets an answer fails the test with an error instead of hanging
            // the suite (REQUEST_TIMEOUT, 30 s, ends every request the service itself accepts).
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .expect("an HTTP client"),
            key: None,
            shutdown: Some(shutdown),
            stopped,
        }
    }

    /// Something to wait on, after the app is dropped, until it has stopped.
    pub fn stopped(&self) -> Stopped {
        Stopped(self.stopped.clone())
    }

    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The `/metrics` page.
    pub async fn metrics_text(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await;
        response
            .expect("GET /metrics")
            .text()
            .await
            .expect("a text body")
    }

    /// Posts one GraphQL operation and returns the whole response body.
    pub async fn graphql(&self, query: &str, variables: Value) -> Value {
        self.post_json(&json!({ "query": query, "variables": variables }))
            .await
    }

    pub async fn post_json(&self, body: &Value) -> Value {
        self.post_as(self.key.as_deref(), body).await.1
    }

    /// Posts `body` with `key` as the bearer key (or none); returns the HTTP status and the body.
    pub async fn post_as(&self, key: Option<&str>, body: &Value) -> (u16, Value) {
        let response = self
            .graphql_request(key, body)
            .send()
            .await
            .expect("POST /graphql");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON response"))
    }

    /// `POST /graphql` of `body`, with `key` as the bearer key (or none).
    fn graphql_request(&self, key: Option<&str>, body: &Value) -> reqwest::RequestBuilder {
        let request = self.http.post(self.url("/graphql")).json(body);
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends one GraphQL operation in the background, for a request a test holds up or races against
    /// another; the task gives the response body (`Null` if none came).
    pub fn graphql_in_background(
        &self,
        query: &str,
        variables: Value,
    ) -> tokio::task::JoinHandle<Value> {
        let request = self
            .http
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        tokio::spawn(async move {
            match request.send().await {
                Ok(response) => response.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            }
        })
    }

    /// Pushes a message of customer `c` without a key, and returns the HTTP status and the body.
    pub async fn push_status(&self, dialog: &str, text: &str) -> (u16, Value) {
        self.post_as(
            None,
            &json!({
                "query": "mutation($d: ID!, $t: String!) { pushMessage(input: {customerId: \"c\", dialogId: $d, text: $t, language: \"en\"}) { status } }",
                "variables": { "d": dialog, "t": text },
            }),
        )
        .await
    }

    /// Posts an operation that must succeed, and returns its `data`.
    pub async fn data(&self, query: &str, variables: Value) -> Value {
        let response = self.graphql(query, variables).await;
        assert!(
            response.get("errors").is_none(),
            "unexpected errors: {response:#}"
        );
        response["data"].clone()
    }

    /// Like [`data`](Self::data), for the bystanders of a test whose subject is not how fast they are
    /// answered: the MongoDB-compatible test server can hold a read behind a long transaction (another
    /// test's too) past `REQUEST_TIMEOUT` or `STORE_TIMEOUT` on a loaded machine. An answer cut off with
    /// 408 or refused with `STORE_UNAVAILABLE` only is asked again (so `query` must be safe to repeat: a
    /// read, or a write with its idempotency key); any other error fails the test, and so do stalls that
    /// last more than five minutes in all.
    pub async fn data_despite_stalls(&self, query: &str, variables: Value) -> Value {
        let body = json!({ "query": query, "variables": variables });
        let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let response = self
                .graphql_request(self.key.as_deref(), &body)
                .send()
                .await
                .expect("POST /graphql");
            let stalled = if response.status() == reqwest::StatusCode::REQUEST_TIMEOUT {
                "408".to_owned()
            } else {
                let response: Value = response.json().await.expect("a JSON response");
                match response["errors"].as_array() {
                    None => return response["data"].clone(),
                    Some(errors)
                        if errors
                            .iter()
                            .all(|error| error["extensions"]["code"] == "STORE_UNAVAILABLE") =>
                    {
                        response.to_string()
                    }
                    Some(_) => panic!("unexpected errors: {response:#}"),
                }
            };
            assert!(
                tokio::time::Instant::now() < give_up,
                "still stalled after five minutes: {stalled}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Posts an operation that must fail with one error, and returns that error.
    pub async fn error(&self, query: &str, variables: Value) -> Value {
        let response = self.graphql(query, variables).await;
        let errors = response["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("expected an error: {response:#}"));
        assert_eq!(errors.len(), 1, "expected one error: {response:#}");
        errors[0].clone()
    }

    /// Pushes a message; `message_id` is the optional client key. Returns the payload.
    pub async fn push(
        &self,
        customer: &str,
        dialog: &str,
        text: &str,
        language: &str,
        message_id: Option<&str>,
    ) -> Value {
        let data = self
            .data(
                "mutation($input: PushMessageInput!) {
                    pushMessage(input: $input) {
                        status
                        message { id messageId dialogId customerId text language createdAt }
                    }
                }",
                json!({ "input": {
                    "customerId": customer, "dialogId": dialog, "text": text,
                    "language": language, "messageId": message_id,
                }}),
            )
            .await;
        data["pushMessage"].clone()
    }

    pub async fn consent(&self, dialog: &str, value: bool) -> Value {
        let data = self
            .data(
                "mutation($dialogId: ID!, $value: Boolean!) {
                    giveConsent(dialogId: $dialogId, value: $value) {
                        dialogId value decidedAt storedCount discardedCount deletedCount
                    }
                }",
                json!({ "dialogId": dialog, "value": value }),
            )
            .await;
        data["giveConsent"].clone()
    }

    pub async fn consent_error(&self, dialog: &str, value: bool) -> Value {
        self.error(
            "mutation($dialogId: ID!, $value: Boolean!) {
                giveConsent(dialogId: $dialogId, value: $value) { value }
            }",
            json!({ "dialogId": dialog, "value": value }),
        )
        .await
    }

    /// Every stored dialog with its messages, most recent first, read straight from the store.
    pub async fn stored_messages(&self) -> u64 {
        self.store
            .count_messages(&MessageFilter::default())
            .await
            .expect("count messages")
    }

    pub async fn stored_dialogs(&self) -> u64 {
        self.store
            .count_dialogs(&DialogFilter::default())
            .await
            .expect("count dialogs")
    }
}

impl TestApp {
    /// How many times a dialog's decision changed, from the audit history in the database.
    pub async fn consent_history_len(&self, dialog: &str) -> usize {
        match self.database.clone().expect("a database of the test's own") {
            TestDatabase::Sqlite(path) => deadpool_sqlite::rusqlite::Connection::open(path)
                .and_then(|c| {
                    c.query_row(
                        "SELECT count(*) FROM consent_events WHERE dialog_id = ?1",
                        [dialog],
                        |row| row.get::<_, i64>(0),
                    )
                })
                .expect("read consent_events") as usize,
            TestDatabase::Mongo { url, name } => {
                let consent = mongodb::Client::with_uri_str(&url)
                    .await
                    .expect("connect")
                    .database(&name)
                    .collection::<mongodb::bson::Document>("consents")
                    .find_one(mongodb::bson::doc! { "_id": dialog })
                    .await
                    .expect("read consents")
                    .expect("a consent record");
                consent.get_array("history").expect("history").len()
            }
        }
    }

    /// The erasure audit records in the database, as JSON.
    pub async fn erasure_records(&self) -> Vec<Value> {
        match self.database.clone().expect("a database of the test's own") {
            TestDatabase::Sqlite(path) => {
                let connection = deadpool_sqlite::rusqlite::Connection::open(path).unwrap();
                let mut statement = connection
                    .prepare("SELECT customer_digest, erased_at, dialogs, messages, consents, buffered_messages, digest_scheme, erased_by FROM erasures")
                    .unwrap();
                statement
                    .query_map([], |row| {
                        Ok(json!({
                            "customerDigest": row.get::<_, String>(0)?,
                            "erasedAt": row.get::<_, i64>(1)?,
                            "dialogs": row.get::<_, i64>(2)?,
                            "messages": row.get::<_, i64>(3)?,
                            "consents": row.get::<_, i64>(4)?,
                            "bufferedMessages": row.get::<_, i64>(5)?,
                            "digestScheme": row.get::<_, String>(6)?,
                            "erasedBy": row.get::<_, Option<String>>(7)?,
                        }))
                    })
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            TestDatabase::Mongo { url, name } => {
                use futures::TryStreamExt;
                let documents: Vec<mongodb::bson::Document> = mongodb::Client::with_uri_str(&url)
                    .await
                    .unwrap()
                    .database(&name)
                    .collection("erasures")
                    .find(mongodb::bson::doc! {})
                    .projection(mongodb::bson::doc! { "_id": 0 })
                    .await
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap();
                documents
                    .into_iter()
                    .map(|d| mongodb::bson::Bson::Document(d).into_relaxed_extjson())
                    .collect()
            }
        }
    }

    /// Makes the database refuse (or accept again) writes of dialog summaries, which a consent writes after
    /// the messages: a failure half-way through the write's transaction.
    pub async fn reject_dialog_summaries(&self, reject: bool) {
        match self.database.clone().expect("a database of the test's own") {
            TestDatabase::Sqlite(path) => {
                let sql = if reject {
                    "CREATE TRIGGER reject_dialogs BEFORE INSERT ON dialogs \
                     BEGIN SELECT RAISE(ABORT, 'injected failure'); END;"
                } else {
                    "DROP TRIGGER reject_dialogs;"
                };
                deadpool_sqlite::rusqlite::Connection::open(path)
                    .and_then(|c| c.execute_batch(sql))
                    .expect("change the SQLite trigger");
            }
            TestDatabase::Mongo { url, name } => {
                let validator = if reject {
                    mongodb::bson::doc! { "_id": { "$exists": false } }
                } else {
                    mongodb::bson::doc! {}
                };
                mongodb::Client::with_uri_str(&url)
                    .await
                    .expect("connect")
                    .database(&name)
                    .run_command(mongodb::bson::doc! {
                        "collMod": "dialogs", "validator": validator, "validationAction": "error",
                    })
                    .await
                    .expect("change the dialogs validator");
            }
        }
    }
}

impl TestApp {
    /// Sends the service its shutdown signal, as SIGTERM would.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Runs `test` against a fresh service on `backend`, then drops the test's database even if the test failed.
pub async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()>,
{
    run_with(backend, test_config(), test).await;
}

/// Like [`run`], with settings of the test's own.
pub async fn run_with<F, Fut>(backend: Backend, config: Config, test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()>,
{
    run_setup(backend, BufferKind::Memory, config, test).await;
}

/// Like [`run_with`], on a buffer of `buffer`'s kind (for Redis, under a key prefix of the test's own,
/// deleted afterwards).
pub async fn run_setup<F, Fut>(backend: Backend, buffer: BufferKind, mut config: Config, test: F)
where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()>,
{
    config.buffer.backend = crate::redis_support::backend(buffer);
    let buffer_backend = config.buffer.backend.clone();
    let (store, cleanup, database) = fresh_store(backend).await;
    let mut app = TestApp::start_with(store, config).await;
    app.database = Some(database);
    let stopped = app.stopped();
    let outcome = AssertUnwindSafe(test(app)).catch_unwind().await;
    stopped.wait().await;
    crate::redis_support::drop_keys(&buffer_backend).await;
    if let Cleanup::MongoDatabase { url, name } = &cleanup {
        mongodb::Client::with_uri_str(url)
            .await
            .expect("connect to drop the test database")
            .database(name)
            .drop()
            .await
            .expect("drop the test database");
    }
    drop(cleanup);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free loopback port")
        .local_addr()
        .expect("its address")
        .port()
}

/// The `extensions.code` of an error.
pub fn code(error: &Value) -> &str {
    error["extensions"]["code"].as_str().unwrap_or("<no code>")
}

/// The `dataapi` binary, started in a directory of its own on a free loopback port, on the embedded store
/// (`./data` in that directory), with nothing but `BIND_ADDR`, `LOG` and the test's settings set. Killed
/// when dropped.
pub struct BinaryService {
    pub child: std::process::Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl BinaryService {
    /// Starts it (stdout into `stdout.log` in its directory) and waits until `/health` answers.
    pub async fn start(log_level: &str) -> Self {
        Self::start_with(log_level, &[]).await
    }

    /// Like [`start`](Self::start), with settings of the test's own.
    pub async fn start_with(log_level: &str, settings: &[(&str, &str)]) -> Self {
        Self::start_with_open_files(log_level, settings, None).await
    }

    /// Like [`start_with`](Self::start_with), with the process's open-file limit (soft, hard) set before
    /// it starts.
    pub async fn start_with_open_files(
        log_level: &str,
        settings: &[(&str, &str)],
        open_files: Option<(u64, u64)>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dataapi"));
        command
            .current_dir(dir.path())
            .env_clear()
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("LOG", log_level)
            .envs(settings.iter().copied())
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap());
        if let Some((soft, hard)) = open_files {
            // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard)
                });
            }
        }
        let child = command.spawn().expect("start dataapi");
        let service = Self { child, port, dir };
        let health = service.url("/health");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(response) = reqwest::get(&health).await
                && response.status() == 200
            {
                return service;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dataapi did not answer {health}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Its resident memory, from `/proc/PID/status`.
    pub fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// What it has printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap()
    }
}

impl Drop for BinaryService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
