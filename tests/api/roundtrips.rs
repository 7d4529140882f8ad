//! Round trips to MongoDB, counted with the driver's command monitoring: what the hot paths cost in
//! commands must not grow with the dialog's length or the page size. (The test server's speed means
//! nothing; the counts are exact.)

use std::sync::{Arc, Mutex};

use dataapi::store::MongoStore;
use mongodb::event::EventHandler;
use mongodb::event::command::CommandEvent;
use mongodb::options::ClientOptions;
use serde_json::json;

use crate::helpers::{TestApp, mongodb_url};

/// The names of the commands the service sent, in order.
#[derive(Clone, Default)]
struct CommandLog(Arc<Mutex<Vec<String>>>);

impl CommandLog {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

async fn monitored_app() -> (TestApp, CommandLog, Arc<MongoStore>) {
    let log = CommandLog::default();
    let mut options = ClientOptions::parse(mongodb_url())
        .await
        .expect("TEST_MONGODB_URL");
    let sink = log.clone();
    options.command_event_handler = Some(EventHandler::callback(move |event: CommandEvent| {
        if let CommandEvent::Started(started) = event {
            // The look-up of unfinished erasures runs in the background (at startup and every few
            // seconds), not on behalf of a request.
            let collection = started.command.get_str(&started.command_name).ok();
            if collection != Some("erasuresRunning") {
                sink.0.lock().unwrap().push(started.command_name);
            }
        }
    }));
    let name = format!("dataapi_roundtrips_{}", uuid::Uuid::now_v7().simple());
    let store = Arc::new(
        MongoStore::with_options(options, &name)
            .await
            .expect("connect"),
    );
    let app = TestApp::start(store.clone()).await;
    log.take();
    (app, log, store)
}

/// Pushes `messages` messages to a new dialog and consents; returns the commands the consent sent.
async fn consent_commands(
    app: &TestApp,
    log: &CommandLog,
    dialog: &str,
    messages: usize,
) -> Vec<String> {
    for i in 0..messages {
        app.push("c", dialog, &format!("m{i}"), "en", None).await;
    }
    log.take();
    assert_eq!(app.consent(dialog, true).await["storedCount"], messages);
    log.take()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_round_trips_do_not_grow_with_dialog_length_or_page_size() {
    let (app, log, store) = monitored_app().await;

    // A dialog's first message looks its decision up once; the rest cost nothing.
    app.push("c", "quiet", "first", "en", None).await;
    assert_eq!(log.take(), ["find"]);
    for i in 0..20 {
        app.push("c", "quiet", &format!("more {i}"), "en", None)
            .await;
    }
    assert_eq!(
        log.take(),
        Vec::<String>::new(),
        "pushing to a buffered dialog sends no command"
    );

    // A batch looks the decisions of all its new dialogs up at once: one command for 2 dialogs or 25.
    for dialogs in [2, 25] {
        let inputs: Vec<_> = (0..dialogs * 4)
            .map(|i| {
                json!({ "customerId": "c", "dialogId": format!("batch-{dialogs}-{}", i % dialogs),
                        "text": format!("t{i}"), "language": "en" })
            })
            .collect();
        let data = app
            .data(
                "mutation($i: [PushMessageInput!]!) { pushMessages(inputs: $i) { status } }",
                json!({ "i": inputs }),
            )
            .await;
        assert_eq!(data["pushMessages"].as_array().unwrap().len(), dialogs * 4);
        assert_eq!(log.take(), ["find"], "a batch over {dialogs} new dialogs");
    }

    // Consent costs the same number of commands for 2 messages as for 300.
    let short = consent_commands(&app, &log, "short", 2).await;
    let long = consent_commands(&app, &log, "long", 300).await;
    assert_eq!(short, long);
    // Read-and-touch the consent record, record the decision, find the messages already stored, take
    // change numbers for the decision and the messages, insert the decision event and the messages, update
    // the dialog summary, commit (BENCHMARKS.md quotes this list).
    assert_eq!(
        short,
        [
            "findAndModify",
            "update",
            "find",
            "findAndModify",
            "insert",
            "insert",
            "update",
            "commitTransaction"
        ]
    );

    // A page of dialogs with their messages: two finds, whatever the page size.
    for d in 0..40 {
        let dialog = format!("paged-{d:02}");
        for m in 0..4 {
            app.push("c", &dialog, &format!("text {m}"), "en", None)
                .await;
        }
        app.consent(&dialog, true).await;
    }
    for page_size in [1, 10, 40] {
        log.take();
        let data = app
            .data(
                "query($n: Int) { dialogs(first: $n) { edges { node { id messages { text } } } } }",
                json!({ "n": page_size }),
            )
            .await;
        assert_eq!(
            data["dialogs"]["edges"].as_array().unwrap().len(),
            page_size
        );
        assert_eq!(log.take(), ["find", "find"], "page of {page_size}");
    }

    // Statistics are one aggregation, however many groups and rows they cover.
    for query in [
        "{ stats { messageCount } }",
        "{ stats(groupBy: [LANGUAGE, CUSTOMER], bucket: DAY, timeZone: \"Europe/Berlin\") { messageCount } }",
        "{ consentStats(bucket: WEEK) { granted } }",
    ] {
        log.take();
        app.data(query, json!({})).await;
        assert_eq!(log.take(), ["aggregate"], "{query}");
    }
    store.drop_database().await.expect("drop the test database");
}

/// The commands a Redis of the test's own received, by name, once they stop changing (a replica leaves the
/// erasure gate in the background, right after answering).
async fn settled_commands(url: &str) -> std::collections::HashMap<String, u64> {
    // The test's own INFO calls (which count themselves) do not count.
    let read = async || {
        let mut counts = crate::redis_support::command_counts(url).await;
        counts.remove("info");
        counts
    };
    let mut last = read().await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = read().await;
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Script calls (EVALSHA, and EVAL for a script Redis did not know yet) since the last reset: the service's
/// only commands on these paths, each a round trip. (The commands a script runs inside Redis are counted
/// by `INFO commandstats` too, but cost no round trip.)
async fn script_calls(url: &str) -> u64 {
    let counts = settled_commands(url).await;
    counts.get("evalsha").copied().unwrap_or(0) + counts.get("eval").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_round_trips_do_not_grow_with_dialog_length_or_batch_size() {
    let redis = crate::redis_support::RedisProcess::start(false);
    let dir = tempfile::tempdir().unwrap();
    let store = dataapi::store::SqliteStore::open(&dir.path().join("t.sqlite3"))
        .await
        .unwrap();
    let mut config = crate::helpers::test_config();
    config.buffer.backend = dataapi::config::BufferBackend::Redis {
        urls: vec![redis.url()],
        key_prefix: crate::redis_support::fresh_prefix(),
    };
    // A sweep period of a minute: none runs while the commands are counted (the first one runs at start).
    config.store_timeout = std::time::Duration::from_secs(60);
    let app = TestApp::start_with(Arc::new(store), config).await;
    // Every script once, so that what is counted below is never a first load.
    app.push("c", "warm", "a", "en", None).await;
    app.push("c", "warm", "b", "en", None).await;
    app.consent("warm", true).await;
    app.push("c", "warm-no", "a", "en", None).await;
    app.consent("warm-no", false).await;
    let url = redis.url();
    let reset = || crate::redis_support::reset_command_counts(&url);
    settled_commands(&url).await;

    // A push to a buffered dialog is one script, one round trip.
    app.push("c", "quiet", "first", "en", None).await;
    reset().await;
    for i in 0..10 {
        app.push(
            "c",
            "quiet",
            &format!("more {i}"),
            "en",
            Some(&format!("k{i}")),
        )
        .await;
    }
    assert_eq!(script_calls(&url).await, 10);
    // A dialog's first message: the look-up that finds it not buffered, then the one that opens it.
    reset().await;
    app.push("c", "new", "first", "en", None).await;
    assert_eq!(script_calls(&url).await, 2);

    // pushMessages costs one script for all its messages, whatever their dialogs (on a standalone Redis, one
    // shard): not one per message, nor one per dialog.
    let push = "mutation($i: [PushMessageInput!]!) { pushMessages(inputs: $i) { status } }";
    for (dialogs, per_dialog) in [(1, 100), (5, 20)] {
        let inputs: Vec<_> = (0..dialogs * per_dialog)
            .map(|i| {
                json!({ "customerId": "c", "dialogId": format!("quiet-{dialogs}-{}", i % dialogs),
                        "text": format!("t{i}"), "language": "en" })
            })
            .collect();
        app.data(push, json!({ "i": inputs })).await;
        reset().await;
        app.data(push, json!({ "i": inputs })).await;
        assert_eq!(
            script_calls(&url).await,
            1,
            "{} messages over {dialogs} buffered dialogs",
            dialogs * per_dialog
        );
    }

    // A batch that opens new dialogs: the look-up that finds them not buffered, then one call that opens
    // them all, whether it opens 1 or 5 (their decisions are looked up in one store call).
    for dialogs in [1, 5] {
        let inputs: Vec<_> = (0..100)
            .map(|i| {
                json!({ "customerId": "c", "dialogId": format!("fresh-{dialogs}-{}", i % dialogs),
                        "text": format!("t{i}"), "language": "en", "messageId": format!("m{i}") })
            })
            .collect();
        reset().await;
        let data = app.data(push, json!({ "i": inputs })).await;
        assert!(
            data["pushMessages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|result| result["status"] == "BUFFERED"),
            "{data}"
        );
        assert_eq!(
            script_calls(&url).await,
            2,
            "a batch opening {dialogs} dialogs"
        );
    }

    // A consent costs the same for 2 messages as for 300: take the dialog's lease (and a place in the
    // erasure gate) with its messages; remove them with the lease.
    let mut counts = Vec::new();
    for (dialog, messages) in [("short", 2), ("long", 300)] {
        for i in 0..messages {
            app.push("c", dialog, &format!("m{i}"), "en", None).await;
        }
        reset().await;
        assert_eq!(app.consent(dialog, true).await["storedCount"], messages);
        counts.push(script_calls(&url).await);
    }
    assert_eq!(counts, [2, 2]);
}
