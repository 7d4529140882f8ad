//! Erasing a customer with a lot of data: in batches of whole dialogs, each one store transaction that ends
//! well within `STORE_TIMEOUT`; readers never see half a dialog; an erasure cut short is resumed by itself
//! and its audit record counts everything it erased.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dataapi::model::{CustomerId, DialogId, Language, Message, MessageText};
use dataapi::store::{Decision, MongoStore, SharedStore, SqliteStore, Store};
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestDatabase, code, mongodb_url, test_config};

/// Stores `dialogs` consented dialogs of `per_dialog` messages each for `customer`, straight through the
/// store (pushing them over HTTP would take most of the test's time). Returns the dialog ids.
async fn seed(
    app: &TestApp,
    customer: &str,
    prefix: &str,
    dialogs: usize,
    per_dialog: usize,
) -> Vec<String> {
    let customer_id = CustomerId::parse("customerId", customer).unwrap();
    let language = Language::parse("language", "en").unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut ids = Vec::new();
    for d in 0..dialogs {
        let dialog = format!("{prefix}-{d}");
        let dialog_id = DialogId::parse("dialogId", dialog.as_str()).unwrap();
        let messages = (0..per_dialog)
            .map(|i| Message {
                id: Message::id_text(Message::server_id(&dialog_id, None)),
                client_id: None,
                dialog_id: dialog_id.clone(),
                customer_id: customer_id.clone(),
                text: MessageText::parse("text", format!("{customer} says {i} in {dialog}"))
                    .unwrap(),
                language: language.clone(),
                created_at: now,
                seq: (now * 1000) + (d * per_dialog + i) as i64,
            })
            .collect();
        let decision = Decision {
            dialog_id,
            customer_id: customer_id.clone(),
            value: true,
            at: now,
        };
        app.store
            .record_decision(&decision, messages)
            .await
            .expect("seed a dialog");
        ids.push(dialog);
    }
    ids
}

/// A second store on the database `app` was started on, as another process (or a restart) would open it.
async fn same_database(app: &TestApp) -> SharedStore {
    match app.database.clone().expect("a database of the test's own") {
        TestDatabase::Sqlite(path) => Arc::new(SqliteStore::open(&path).await.unwrap()),
        TestDatabase::Mongo { name, .. } => {
            Arc::new(MongoStore::connect(&mongodb_url(), &name).await.unwrap())
        }
    }
}

/// The customer's dialog and message counts, asked again when the test server stalls the read (see
/// [`TestApp::data_despite_stalls`]): these tests check what the reads show, not how fast they come.
async fn customer_totals(app: &TestApp, customer: &str) -> (u64, u64) {
    let data = app
        .data_despite_stalls(
            "query($c: ID!) {
               dialogs(filter: {customerId: $c}, first: 0) { totalCount }
               messages(filter: {customerId: $c}, first: 0) { totalCount }
             }",
            json!({ "c": customer }),
        )
        .await;
    (
        data["dialogs"]["totalCount"].as_u64().unwrap(),
        data["messages"]["totalCount"].as_u64().unwrap(),
    )
}

const ERASE: &str = "mutation($c: ID!) {
  eraseCustomer(customerId: $c) { dialogCount messageCount consentCount bufferedMessageCount }
}";

/// 200,000 messages in 100 dialogs (10,000 on MongoDB's test server), erased through one `eraseCustomer` while readers watch: every read
/// shows whole dialogs only (the customer's message count is always a multiple of a dialog's size, and a
/// dialog listed with its messages has all of them), the store works in bounded batches, and another
/// customer's data and pushes are untouched.
pub async fn a_customer_with_hundreds_of_thousands_of_messages_is_erased_in_whole_dialogs(
    app: TestApp,
) {
    // SecantusDB, the MongoDB-compatible test server, is an emulator in Python that takes about a
    // millisecond per document written or deleted, and holds other transactions (other tests') while one
    // runs: on it the test erases 10,000 messages in dialogs of 500, so that no transaction (seeding a
    // dialog, an erasure batch of ERASE_BATCH) lasts longer than about a second. It still takes several
    // batches; the batch count is what shows that the size does not matter. On SQLite each dialog is larger
    // than a batch, and goes alone.
    let (dialogs, per_dialog) = match app.database {
        Some(TestDatabase::Mongo { .. }) => (20, 500),
        _ => (100, 2_000),
    };
    seed(&app, "big", "big", dialogs, per_dialog).await;
    seed(&app, "bystander", "other", 3, 10).await;
    // A refusal: a consent record without a dialog, which goes too.
    app.push("big", "refused", "no thanks", "en", None).await;
    app.consent("refused", false).await;
    // And a message still waiting in the buffer.
    app.push("big", "open", "still talking", "en", None).await;
    let total = (dialogs * per_dialog) as u64;
    assert_eq!(customer_totals(&app, "big").await, (dialogs as u64, total));
    app.store.reset_calls();

    let app = Arc::new(app);
    let done = Arc::new(AtomicBool::new(false));
    let counts_seen = {
        let (app, done) = (app.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = vec![total];
            while !done.load(Ordering::SeqCst) {
                let (_, messages) = customer_totals(&app, "big").await;
                assert_eq!(
                    messages % per_dialog as u64,
                    0,
                    "a reader saw part of a dialog's messages ({messages} in all)"
                );
                assert!(
                    messages <= *seen.last().unwrap(),
                    "erased messages came back"
                );
                seen.push(messages);
            }
            seen
        })
    };
    let dialogs_seen = {
        let (app, done) = (app.clone(), done.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !done.load(Ordering::SeqCst) {
                let data = app
                    .data_despite_stalls(
                        "{ dialogs(filter: {customerId: \"big\"}, first: 2) {
                             edges { node { id messageCount messages { id } } } } }",
                        json!({}),
                    )
                    .await;
                for edge in data["dialogs"]["edges"].as_array().unwrap() {
                    let shown = edge["node"]["messages"].as_array().unwrap().len();
                    // The list and the messages are two reads: the dialog may be gone by the second.
                    assert!(
                        shown == per_dialog || shown == 0,
                        "dialog {} showed {shown} of its {per_dialog} messages",
                        edge["node"]["id"]
                    );
                }
                reads += 1;
            }
            reads
        })
    };
    // Another customer keeps pushing meanwhile (with keys, so that a push asked again records once).
    let pushes = {
        let (app, done) = (app.clone(), done.clone());
        tokio::spawn(async move {
            let mut pushed = 0;
            while !done.load(Ordering::SeqCst) {
                let data = app
                    .data_despite_stalls(
                        "mutation($input: PushMessageInput!) { pushMessage(input: $input) { status } }",
                        json!({ "input": {
                            "customerId": "c", "dialogId": format!("other-live-{pushed}"),
                            "text": "still here", "language": "en",
                            "messageId": format!("other-live-{pushed}"),
                        }}),
                    )
                    .await;
                assert_eq!(data["pushMessage"]["status"], "BUFFERED", "{data}");
                pushed += 1;
            }
            pushed
        })
    };

    // On a loaded test server the call may reach REQUEST_TIMEOUT (408), or a batch its deadline
    // (STORE_UNAVAILABLE): the erasure runs on by itself, or is resumed, and is awaited through the store
    // then. Either way the outcome is checked in the audit record below.
    let response = app
        .http_client()
        .post(app.url("/graphql"))
        .json(&json!({ "query": ERASE, "variables": { "c": "big" } }))
        .send()
        .await
        .expect("the erasure request is answered");
    let status = response.status().as_u16();
    let answer = response.text().await.unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(600), async {
        while !app.store.unfinished_erasures().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    done.store(true, Ordering::SeqCst);
    assert!(
        finished.is_ok(),
        "the erasure did not finish: {status} {answer}"
    );
    let counts_seen = counts_seen.await.expect("the counting reader");
    let dialog_reads = dialogs_seen.await.expect("the dialog reader");
    let pushed = pushes.await.expect("the other customer's pushes");
    let full = json!({
        "dialogCount": dialogs,
        "messageCount": total,
        "consentCount": dialogs + 1,
        "bufferedMessageCount": 1,
    });
    let calls = app.store.calls();
    let unfinished = calls.get("erase_batch unfinished").copied().unwrap_or(0);
    match status {
        200 => {
            let erased: Value = serde_json::from_str(&answer).unwrap();
            let cut_short = erased["errors"][0]["extensions"]["code"] == "STORE_UNAVAILABLE";
            if !(cut_short && unfinished > 0) {
                assert_eq!(erased["data"]["eraseCustomer"], full, "{answer}");
            }
        }
        408 => {}
        other => panic!("the erasure request got {other}: {answer}"),
    }
    assert!(dialog_reads > 0 && pushed > 0);
    assert!(
        counts_seen.len() > 2,
        "the readers were answered while the erasure ran: {counts_seen:?}"
    );

    // Bounded batches: as many whole dialogs as fit in ERASE_BATCH messages (at least one), then one for
    // the refusal, and one before and one after closing the gate that find nothing left. A batch that did
    // not finish (its deadline, on a loaded test server) costs itself and, resumed, at most one more empty
    // batch before the gate.
    let batches = calls.get("erase_batch").copied().unwrap_or(0);
    let full_batches = dialogs.div_ceil((ERASE_BATCH / per_dialog).max(1));
    assert!(
        (full_batches + 2..=full_batches + 4 + 2 * unfinished).contains(&batches),
        "{batches} batches for {dialogs} dialogs: {calls:?}"
    );
    assert_eq!(calls.get("finish_erasure"), Some(&1));

    assert_eq!(customer_totals(&app, "big").await, (0, 0));
    assert_eq!(customer_totals(&app, "bystander").await, (3, 30));
    assert!(
        app.data("{ consent(dialogId: \"refused\") { value } }", json!({}))
            .await["consent"]
            .is_null()
    );
    assert!(
        app.store.unfinished_erasures().await.unwrap().is_empty(),
        "the customer id is not kept once the erasure is done"
    );
    let records = app.erasure_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["messages"], json!(total));
    assert_eq!(records[0]["dialogs"], json!(dialogs));
    assert_eq!(records[0]["consents"], json!(dialogs + 1));
    assert_eq!(records[0]["bufferedMessages"], json!(1));
}

/// An erasure whose process stops half-way (the store stops answering its batches, then the service goes
/// down) is finished by the next process on the same database, without anyone asking again: the audit
/// record counts what both erased, the customer id is forgotten, and a reader in between saw whole
/// dialogs only. A second `eraseCustomer` afterwards finds nothing left and writes a record of its own.
pub async fn an_erasure_cut_short_is_finished_by_the_next_process(app: TestApp) {
    const DIALOGS: usize = 40;
    const PER_DIALOG: usize = 50;
    seed(&app, "cut", "cut", DIALOGS, PER_DIALOG).await;
    seed(&app, "kept", "kept", 2, 5).await;
    // The first few batches go through, then the store stops answering this process for good.
    app.store.fail_erase_batches_after(4);
    let error = app.error(ERASE, json!({ "c": "cut" })).await;
    assert_eq!(code(&error), "STORE_UNAVAILABLE", "{error}");
    let (left, messages) = customer_totals(&app, "cut").await;
    assert!(
        left > 0 && (left as usize) < DIALOGS,
        "half-way: {left} of {DIALOGS} dialogs left"
    );
    assert_eq!(messages, left * PER_DIALOG as u64, "whole dialogs only");
    assert_eq!(app.store.unfinished_erasures().await.unwrap().len(), 1);
    assert!(app.erasure_records().await.is_empty(), "not finished yet");

    // "Restart": a new process on the same database finds the unfinished erasure at startup.
    let mut config = test_config();
    config.erasure_batch_messages = 100;
    let mut next = TestApp::start_with(same_database(&app).await, config).await;
    next.database = app.database.clone();
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if customer_totals(&next, "cut").await == (0, 0)
                && next.store.unfinished_erasures().await.unwrap().is_empty()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        finished.is_ok(),
        "the next process did not finish the erasure"
    );
    let records = next.erasure_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["dialogs"], json!(DIALOGS), "{records:?}");
    assert_eq!(records[0]["messages"], json!(DIALOGS * PER_DIALOG));
    assert_eq!(
        records[0]["erasedBy"], "open",
        "the record names who asked, not the resumer"
    );
    assert_eq!(customer_totals(&next, "kept").await, (2, 10));

    let again = next.data(ERASE, json!({ "c": "cut" })).await;
    assert_eq!(
        again["eraseCustomer"],
        json!({ "dialogCount": 0, "messageCount": 0, "consentCount": 0, "bufferedMessageCount": 0 })
    );
    assert_eq!(next.erasure_records().await.len(), 2);
    let stopped = next.stopped();
    drop(next);
    stopped.wait().await;
}

/// Two calls for the same customer at once, and a call while a batch is held: they share one erasure
/// (one audit record, the same counts), and a caller whose request gives up leaves it running.
pub async fn concurrent_erasures_of_one_customer_share_one_run(app: TestApp) {
    seed(&app, "twice", "twice", 30, 20).await;
    let app = Arc::new(app);
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.data(ERASE, json!({ "c": "twice" })).await })
        })
        .collect();
    let mut answers: Vec<Value> = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap()["eraseCustomer"].clone());
    }
    let full = json!({ "dialogCount": 30, "messageCount": 600, "consentCount": 30, "bufferedMessageCount": 0 });
    // Calls that arrived together join one run; one that arrived after it finished finds nothing left.
    assert!(answers.contains(&full), "{answers:?}");
    let records = app.erasure_records().await;
    let erased: u64 = records
        .iter()
        .map(|r| r["messages"].as_u64().unwrap())
        .sum();
    assert_eq!(erased, 600, "each message counted once: {records:?}");
    assert_eq!(customer_totals(&app, "twice").await, (0, 0));
}

/// An erasure that cannot empty the buffer is not finished: it stays recorded as running, to be resumed
/// (here by the caller's retry), and no audit record claims it done. Once it is finished, a consent of the
/// customer's buffered dialog finds nothing to store, and the record counts the buffered messages once.
pub async fn an_erasure_that_cannot_empty_the_buffer_is_finished_only_once_it_has(app: TestApp) {
    seed(&app, "held", "held-stored", 2, 3).await;
    for i in 0..4 {
        app.push("held", "held-waiting", &format!("waiting {i}"), "en", None)
            .await;
    }
    app.buffer_hooks.fail_next_customer_discard();
    let error = app.error(ERASE, json!({ "c": "held" })).await;
    assert_eq!(code(&error), "BUFFER_UNAVAILABLE", "{error}");
    assert_eq!(
        app.store.unfinished_erasures().await.unwrap().len(),
        1,
        "left to be resumed"
    );
    assert!(app.erasure_records().await.is_empty(), "not finished yet");

    let again = app.data(ERASE, json!({ "c": "held" })).await;
    assert_eq!(
        again["eraseCustomer"],
        json!({ "dialogCount": 2, "messageCount": 6, "consentCount": 2, "bufferedMessageCount": 4 }),
        "the retry finishes the erasure begun, with its counts"
    );
    assert!(app.store.unfinished_erasures().await.unwrap().is_empty());
    let error = app.consent_error("held-waiting", true).await;
    assert_eq!(code(&error), "DIALOG_NOT_FOUND", "{error}");
    assert_eq!(
        customer_totals(&app, "held").await,
        (0, 0),
        "a consent after the erasure stores nothing of the erased customer's"
    );
    let records = app.erasure_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["bufferedMessages"], json!(4), "{records:?}");
}

/// An erasure cut short after it emptied the buffer (the store does not answer its last write) still counts
/// the buffered messages when it is finished, although the buffer holds none of them by then.
pub async fn an_erasure_cut_short_after_emptying_the_buffer_counts_what_it_held(app: TestApp) {
    for i in 0..3 {
        app.push(
            "counted",
            "counted-waiting",
            &format!("waiting {i}"),
            "en",
            None,
        )
        .await;
    }
    app.store.fail_next("finish_erasure");
    let error = app.error(ERASE, json!({ "c": "counted" })).await;
    assert_eq!(code(&error), "STORE_UNAVAILABLE", "{error}");
    assert_eq!(app.store.unfinished_erasures().await.unwrap().len(), 1);

    let again = app.data(ERASE, json!({ "c": "counted" })).await;
    assert_eq!(
        again["eraseCustomer"]["bufferedMessageCount"],
        json!(3),
        "{again}"
    );
    let records = app.erasure_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["bufferedMessages"], json!(3), "{records:?}");
}

/// ERASURE_BATCH_MESSAGES of the large erasure test.
const ERASE_BATCH: usize = 1_000;

for_each_store!(
    with {
        let mut config = crate::helpers::test_config();
        config.erasure_batch_messages = super::ERASE_BATCH;
        // The MongoDB-compatible test server makes readers wait while a transaction commits, and the suite
        // runs other tests meanwhile: a reader or a push that waits for the erasure's batches is not what
        // this test checks, so the deadline of a store call is generous here.
        config.store_timeout = std::time::Duration::from_secs(60);
        config
    };
    a_customer_with_hundreds_of_thousands_of_messages_is_erased_in_whole_dialogs
);

mod buffered {
    pub use super::{
        an_erasure_cut_short_after_emptying_the_buffer_counts_what_it_held,
        an_erasure_that_cannot_empty_the_buffer_is_finished_only_once_it_has,
    };

    for_each_setup!(
        an_erasure_that_cannot_empty_the_buffer_is_finished_only_once_it_has,
        an_erasure_cut_short_after_emptying_the_buffer_counts_what_it_held,
    );
}

mod resumed {
    pub use super::{
        an_erasure_cut_short_is_finished_by_the_next_process,
        concurrent_erasures_of_one_customer_share_one_run,
    };

    for_each_store!(
        with {
            let mut config = crate::helpers::test_config();
            config.erasure_batch_messages = 100;
            config
        };
        an_erasure_cut_short_is_finished_by_the_next_process,
        concurrent_erasures_of_one_customer_share_one_run,
    );
}
