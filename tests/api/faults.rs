//! Real faults: a MongoDB-compatible server of the test's own is killed while the service runs, then
//! restarted. Needs SECANTUS_PYTHON (set by scripts/test), the interpreter that runs SecantusDB.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dataapi::store::{MongoStore, Store};
use serde_json::json;

use crate::helpers::{BinaryService, TestApp, code};

/// A SecantusDB process on a fixed loopback port that can be killed and started again; in memory, or on
/// disk (kept across restarts, synced on every commit) with [`KillableServer::start_durable`].
struct KillableServer {
    python: String,
    port: u16,
    child: Option<Child>,
    storage: Option<tempfile::TempDir>,
}

impl KillableServer {
    fn start() -> Self {
        Self::launch(None)
    }

    fn start_durable() -> Self {
        Self::launch(Some(tempfile::tempdir().expect("a storage directory")))
    }

    fn launch(storage: Option<tempfile::TempDir>) -> Self {
        let python = std::env::var("SECANTUS_PYTHON").unwrap_or_else(|_| {
            panic!("SECANTUS_PYTHON is not set: run the suite with scripts/test, which installs SecantusDB")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            python,
            port,
            child: None,
            storage,
        };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=2000&connectTimeoutMS=1000",
            self.port
        )
    }

    fn restart(&mut self) {
        let child = Command::new(&self.python)
            .args([
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
            ])
            .args(match &self.storage {
                Some(dir) => vec![
                    "--storage-path".to_owned(),
                    dir.path().display().to_string(),
                    "--sync-on-commit".to_owned(),
                ],
                None => vec!["--storage-path".to_owned(), ":memory:".to_owned()],
            })
            .args(["--log-level", "WARNING"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start SecantusDB");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "SecantusDB did not listen on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill SecantusDB");
            child.wait().expect("reap SecantusDB");
        }
    }
}

impl Drop for KillableServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_killed_before_consent_loses_nothing_and_a_retry_after_restart_stores_once() {
    let mut server = KillableServer::start();
    let store = Arc::new(
        MongoStore::connect(&server.url(), "dataapi_faults")
            .await
            .expect("connect"),
    );
    let app = TestApp::start(store.clone()).await;

    for i in 0..5 {
        app.push(
            "kim",
            "outage",
            &format!("m{i}"),
            "en",
            Some(&format!("k{i}")),
        )
        .await;
    }
    server.kill();

    let started = Instant::now();
    let error = app.consent_error("outage", true).await;
    assert_eq!(code(&error), "STORE_UNAVAILABLE", "{error:#}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a dead database fails fast, not after minutes"
    );
    // The buffered dialog keeps accepting messages without the database.
    assert_eq!(
        app.push("kim", "outage", "m5", "en", Some("k5")).await["status"],
        "BUFFERED"
    );

    server.restart();
    // The driver notices the server again within a few heartbeats; retry as the background job would.
    let deadline = Instant::now() + Duration::from_secs(60);
    let consent =
        consent_until_recorded(&app, "outage", true, deadline, &AtomicUsize::new(0)).await;
    assert_eq!(
        consent["storedCount"], 6,
        "every acknowledged push is stored"
    );
    assert_eq!(
        app.consent("outage", true).await["storedCount"],
        0,
        "and only once"
    );
    let data = app
        .data(
            "{ dialog(id: \"outage\") { messageCount messages { text } } }",
            json!({}),
        )
        .await;
    assert_eq!(data["dialog"]["messageCount"], 6);
    assert_eq!(store.count_messages(&Default::default()).await.unwrap(), 6);
}

/// Runs one GraphQL operation until it succeeds, as a client retrying through an outage would; returns its
/// `data`. Any error other than `STORE_UNAVAILABLE` fails the test, and so does still failing at `deadline`.
/// `unavailable` counts the failed attempts (proof that the outage hit calls in flight).
async fn until_available(
    app: &TestApp,
    query: &str,
    variables: serde_json::Value,
    deadline: Instant,
    unavailable: &AtomicUsize,
) -> serde_json::Value {
    loop {
        let response = app.graphql(query, variables.clone()).await;
        if response.get("errors").is_none() {
            return response["data"].clone();
        }
        assert_eq!(
            code(&response["errors"][0]),
            "STORE_UNAVAILABLE",
            "{response}"
        );
        unavailable.fetch_add(1, Ordering::Relaxed);
        assert!(
            Instant::now() < deadline,
            "still failing at the deadline: {response}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pushes `messages` messages (keys `k0`..) to `dialog`, retrying each until it is acknowledged; returns
/// the acknowledged keys.
async fn push_until_acknowledged(
    app: &TestApp,
    customer: &str,
    dialog: &str,
    messages: usize,
    deadline: Instant,
    unavailable: &AtomicUsize,
) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for i in 0..messages {
        let key = format!("k{i}");
        until_available(
            app,
            "mutation($i: PushMessageInput!) { pushMessage(input: $i) { status } }",
            json!({ "i": { "customerId": customer, "dialogId": dialog, "text": format!("text {i}"),
                           "language": "en", "messageId": key } }),
            deadline,
            unavailable,
        )
        .await;
        acknowledged.push(key);
    }
    acknowledged
}

/// Gives consent, retrying while the database is unavailable; returns the `giveConsent` payload.
async fn consent_until_recorded(
    app: &TestApp,
    dialog: &str,
    value: bool,
    deadline: Instant,
    unavailable: &AtomicUsize,
) -> serde_json::Value {
    let data = until_available(
        app,
        "mutation($d: ID!, $v: Boolean!) { giveConsent(dialogId: $d, value: $v) { value storedCount } }",
        json!({ "d": dialog, "v": value }),
        deadline,
        unavailable,
    )
    .await;
    data["giveConsent"].clone()
}

/// The `messageId`s stored for a dialog, in order.
async fn stored_keys(app: &TestApp, dialog: &str) -> Vec<String> {
    let data = app
        .data(
            "query($d: ID!) { dialog(id: $d) { messageCount messages { messageId } } }",
            json!({ "d": dialog }),
        )
        .await;
    if data["dialog"].is_null() {
        return Vec::new();
    }
    let keys: Vec<String> = data["dialog"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        data["dialog"]["messageCount"],
        keys.len(),
        "{dialog}: summary and messages agree"
    );
    keys
}

fn durable_config() -> dataapi::config::Config {
    let mut config = crate::helpers::test_config();
    config.store_timeout = Duration::from_secs(3);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_stopped_during_a_stream_of_pushes_and_consents_keeps_every_acknowledged_message_once()
 {
    let mut server = KillableServer::start_durable();
    let store = Arc::new(
        MongoStore::connect(&server.url(), "dataapi_stream")
            .await
            .expect("connect"),
    );
    let app = Arc::new(TestApp::start_with(store.clone(), durable_config()).await);
    let deadline = Instant::now() + Duration::from_secs(120);

    // Four clients, each working through dialogs until told to stop: push, then decide (every third one
    // refuses).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let unavailable = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let app = app.clone();
            let stop = stop.clone();
            let unavailable = unavailable.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let dialog = format!("w{worker}-d{n}");
                    let customer = format!("c{worker}");
                    let keys = push_until_acknowledged(
                        &app,
                        &customer,
                        &dialog,
                        6,
                        deadline,
                        &unavailable,
                    )
                    .await;
                    let value = n % 3 != 0;
                    consent_until_recorded(&app, &dialog, value, deadline, &unavailable).await;
                    outcomes.push((dialog, value, keys));
                    n += 1;
                }
                outcomes
            })
        })
        .collect();

    // Meanwhile the database goes away twice.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.kill();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        server.restart();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut expected_total = 0;
    for worker in workers {
        for (dialog, value, keys) in worker.await.unwrap() {
            let stored = stored_keys(&app, &dialog).await;
            if value {
                assert_eq!(
                    stored, keys,
                    "{dialog}: every acknowledged message, once, in order"
                );
                expected_total += keys.len();
            } else {
                assert!(stored.is_empty(), "{dialog}: refused, nothing stored");
            }
        }
    }
    let total = store.count_messages(&Default::default()).await.unwrap();
    assert_eq!(total as usize, expected_total, "and nothing else");
    assert!(
        unavailable.load(Ordering::Relaxed) > 0,
        "the outages hit calls in flight"
    );
    store.drop_database().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_database_mid_consent_leaves_no_partial_dialog() {
    let mut server = KillableServer::start_durable();
    let store = Arc::new(
        MongoStore::connect(&server.url(), "dataapi_midconsent")
            .await
            .expect("connect"),
    );
    let app = Arc::new(TestApp::start_with(store.clone(), durable_config()).await);
    let deadline = Instant::now() + Duration::from_secs(120);
    let unavailable = AtomicUsize::new(0);
    const DIALOGS: usize = 6;
    const MESSAGES: usize = 300;
    for d in 0..DIALOGS {
        push_until_acknowledged(
            &app,
            "c",
            &format!("big-{d}"),
            MESSAGES,
            deadline,
            &unavailable,
        )
        .await;
    }
    // Consents run while the database is killed under them: as soon as the first one has committed.
    let mut consents = tokio::task::JoinSet::new();
    for d in 0..DIALOGS {
        let app = app.clone();
        consents.spawn(async move {
            app.graphql(
                "mutation($d: ID!) { giveConsent(dialogId: $d, value: true) { storedCount } }",
                json!({ "d": format!("big-{d}") }),
            )
            .await
        });
    }
    let first = consents.join_next().await.unwrap().unwrap();
    server.kill();
    assert!(first.get("errors").is_none(), "{first}");
    while let Some(response) = consents.join_next().await {
        let response = response.unwrap();
        if let Some(errors) = response.get("errors") {
            assert_eq!(code(&errors[0]), "STORE_UNAVAILABLE", "{response}");
        }
    }
    server.restart();

    // Every dialog is all there or not there at all, and retried consents complete the rest once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut visible_before_retry = 0;
    for d in 0..DIALOGS {
        let dialog = format!("big-{d}");
        let stored = until_available(
            &app,
            "query($d: ID!) { dialog(id: $d) { messageCount messages { messageId } } }",
            json!({ "d": dialog }),
            deadline,
            &unavailable,
        )
        .await["dialog"]
            .clone();
        if !stored.is_null() {
            visible_before_retry += 1;
            assert_eq!(stored["messageCount"], MESSAGES, "{dialog} is complete");
            assert_eq!(
                stored["messages"].as_array().unwrap().len(),
                MESSAGES,
                "{dialog} is complete"
            );
        }
        consent_until_recorded(&app, &dialog, true, deadline, &unavailable).await;
        assert_eq!(
            stored_keys(&app, &dialog).await.len(),
            MESSAGES,
            "{dialog} after the retry"
        );
    }
    assert_eq!(
        store.count_messages(&Default::default()).await.unwrap() as usize,
        DIALOGS * MESSAGES
    );
    eprintln!("{visible_before_retry} of {DIALOGS} consents had committed before the kill");
    assert!(
        visible_before_retry < DIALOGS,
        "the kill interrupted at least one consent"
    );
    store.drop_database().await.ok();
}

#[tokio::test]
async fn killing_the_service_mid_consent_leaves_the_embedded_store_consistent() {
    let mut service = BinaryService::start("warn").await;
    let url = service.url("/graphql");
    let client = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let client = client.clone();
        let url = url.clone();
        async move { client.post(&url).json(&body).send().await }
    };
    const DIALOGS: usize = 8;
    const MESSAGES: usize = 400;
    for d in 0..DIALOGS {
        for chunk in 0..(MESSAGES / 50) {
            let pushes: Vec<String> = (0..50)
                .map(|i| format!("p{i}: pushMessage(input: {{customerId: \"c\", dialogId: \"big-{d}\", text: \"message {}\", language: \"en\"}}) {{ status }}", chunk * 50 + i))
                .collect();
            let response = post(json!({ "query": format!("mutation {{ {} }}", pushes.join(" ")) }))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    // Fire the consents and kill the process while they run: as soon as the first one is answered (the
    // store writes one at a time, so the others are still queued or running). Progress, not a sleep, picks
    // the moment, so that a slow or busy machine moves it with the work.
    let consents: Vec<_> = (0..DIALOGS)
        .map(|d| tokio::spawn(post(json!({ "query": format!("mutation {{ giveConsent(dialogId: \"big-{d}\", value: true) {{ storedCount }} }}") }))))
        .collect();
    let (_, _, others) = futures::future::select_all(consents).await;
    service.child.kill().unwrap();
    service.child.wait().unwrap();
    for consent in others {
        let _ = consent.await;
    }

    // Whatever committed is whole: every dialog's summary matches its messages, no message is orphaned,
    // and a consent record of true exists exactly for the dialogs whose messages are there.
    let path = service.dir.path().join("data/dataapi.sqlite3");
    let db = deadpool_sqlite::rusqlite::Connection::open(&path).unwrap();
    let query = |sql: &str| -> i64 { db.query_row(sql, [], |row| row.get(0)).unwrap() };
    assert_eq!(
        query(
            "SELECT count(*) FROM dialogs d WHERE message_count != (SELECT count(*) FROM messages m WHERE m.dialog_id = d.id)"
        ),
        0
    );
    assert_eq!(
        query(
            "SELECT count(*) FROM messages m WHERE NOT EXISTS (SELECT 1 FROM dialogs d WHERE d.id = m.dialog_id)"
        ),
        0
    );
    assert_eq!(
        query(
            "SELECT count(*) FROM consents c WHERE c.value = 1 AND NOT EXISTS (SELECT 1 FROM dialogs d WHERE d.id = c.dialog_id)"
        ),
        0
    );
    let complete = query(&format!(
        "SELECT count(*) FROM dialogs WHERE message_count = {MESSAGES}"
    ));
    assert_eq!(
        complete,
        query("SELECT count(*) FROM dialogs"),
        "no dialog is partial"
    );
    eprintln!("{complete} of {DIALOGS} consents had committed before the kill");
    assert!(complete >= 1, "the first consent answered had committed");
    assert!(
        (complete as usize) < DIALOGS,
        "the kill interrupted at least one consent"
    );
}
