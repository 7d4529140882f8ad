//! Several replicas of the service sharing one Redis buffer and one MongoDB database, each with its own
//! connections, over real HTTP: every guarantee of the single process must hold whichever replica a request
//! reaches, and when a replica stops in the middle of a consent.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataapi::config::{BufferBackend, Config};
use dataapi::store::MongoStore;
use futures::FutureExt;
use serde_json::{Value, json};

use crate::helpers::{BufferKind, TestApp, code, mongodb_url, test_config};
use crate::redis_support::{self, RedisProcess};

/// Starts `count` replicas with `config` on a fresh MongoDB database and a fresh Redis key prefix of
/// `kind`, runs `test`, and drops both afterwards.
pub async fn with_replicas<F, Fut>(count: usize, kind: BufferKind, config: Config, test: F)
where
    F: FnOnce(Vec<TestApp>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut config = config;
    config.buffer.backend = redis_support::backend(kind);
    with_replicas_on(count, config, test).await;
}

/// Like [`with_replicas`], with the buffer `config` names (the keys of the suite's Redis servers are
/// dropped afterwards; a Redis of the test's own goes away with it).
async fn with_replicas_on<F, Fut>(count: usize, config: Config, test: F)
where
    F: FnOnce(Vec<TestApp>) -> Fut,
    Fut: Future<Output = ()>,
{
    let backend = config.buffer.backend.clone();
    let name = format!("dataapi_replicas_{}", uuid::Uuid::now_v7().simple());
    let mut replicas = Vec::new();
    for _ in 0..count {
        replicas.push(start_replica(&name, config.clone()).await);
    }
    let stopped: Vec<_> = replicas.iter().map(TestApp::stopped).collect();
    let outcome = AssertUnwindSafe(test(replicas)).catch_unwind().await;
    for replica in stopped {
        replica.wait().await;
    }
    redis_support::drop_keys(&backend).await;
    mongodb::Client::with_uri_str(mongodb_url())
        .await
        .expect("connect")
        .database(&name)
        .drop()
        .await
        .expect("drop the test database");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One more replica on database `name`, with a MongoDB connection of its own.
async fn start_replica(name: &str, config: Config) -> TestApp {
    let store = MongoStore::connect(&mongodb_url(), name)
        .await
        .expect("connect to MongoDB");
    let mut replica = TestApp::start_with(Arc::new(store), config).await;
    replica.database = Some(crate::helpers::TestDatabase::Mongo {
        url: mongodb_url(),
        name: name.to_owned(),
    });
    replica
}

/// Replicas whose lease on a decision runs out quickly, and whose sweeper looks often: what a stopped
/// replica left half-done is finished within a few seconds.
fn quick_leases() -> Config {
    let mut config = test_config();
    config.store_timeout = Duration::from_millis(1_000);
    config.buffer.timeout = Duration::from_millis(500);
    config.shutdown_timeout = Duration::from_millis(200);
    config
}

async fn stored_texts(app: &TestApp, dialog: &str) -> Vec<String> {
    let data = app
        .data(
            "query($id: ID!) { dialog(id: $id) { messages { text } } }",
            json!({ "id": dialog }),
        )
        .await;
    data["dialog"]["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .map(|m| m["text"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    app.metrics_text()
        .await
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0.0, |value| value.parse().unwrap())
}

async fn retry_push(app: &TestApp, customer: &str, dialog: &str, text: &str, key: &str) -> Value {
    app.error(
        "mutation($input: PushMessageInput!) { pushMessage(input: $input) { status } }",
        json!({ "input": { "customerId": customer, "dialogId": dialog, "text": text, "language": "en",
                           "messageId": key } }),
    )
    .await
}

async fn a_retry_on_another_replica_records_nothing_twice_and_misuse_is_refused_there(
    replicas: Vec<TestApp>,
) {
    let [a, b, c] = &replicas[..] else {
        unreachable!()
    };
    let first = a.push("carol", "d", "hello", "en", Some("m1")).await;
    let again = b.push("carol", "d", "hello", "en", Some("m1")).await;
    assert_eq!(
        again, first,
        "the retry answers the message as first recorded"
    );
    let conflict = retry_push(c, "carol", "d", "changed", "m1").await;
    assert_eq!(code(&conflict), "MESSAGE_ID_CONFLICT");
    let other_customer = retry_push(c, "mallory", "d", "hello", "m9").await;
    assert_eq!(code(&other_customer), "CUSTOMER_MISMATCH");
    c.push("carol", "d", "second", "en", Some("m2")).await;
    assert_eq!(b.consent("d", true).await["storedCount"], 2);
    // After consent, each replica still knows the key: as a stored message now.
    let stored = c.push("carol", "d", "hello", "en", Some("m1")).await;
    assert_eq!(stored["status"], "STORED");
    assert_eq!(stored["message"], first["message"]);
    assert_eq!(
        code(&retry_push(a, "carol", "d", "changed", "m1").await),
        "MESSAGE_ID_CONFLICT"
    );
    assert_eq!(stored_texts(a, "d").await, ["hello", "second"]);
    // Withdrawal on one replica, seen by the others.
    assert_eq!(c.consent("d", false).await["deletedCount"], 2);
    assert_eq!(
        a.push("carol", "d", "after", "en", None).await["status"],
        "DISCARDED"
    );
    assert_eq!(
        code(&b.consent_error("never-pushed", true).await),
        "DIALOG_NOT_FOUND"
    );
}

async fn pushes_to_one_dialog_from_three_replicas_keep_each_senders_order(replicas: Vec<TestApp>) {
    let replicas = Arc::new(replicas);
    let senders: Vec<_> = (0..3)
        .map(|sender| {
            let replicas = replicas.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    // Each sender goes round the replicas, so its messages land on all three.
                    let app = &replicas[(sender + i) % 3];
                    app.push("c", "busy", &format!("{sender}-{i}"), "en", None)
                        .await;
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(replicas[1].consent("busy", true).await["storedCount"], 120);
    let texts = stored_texts(&replicas[2], "busy").await;
    assert_eq!(texts.len(), 120);
    for sender in 0..3 {
        let mine: Vec<usize> = texts
            .iter()
            .filter_map(|text| text.strip_prefix(&format!("{sender}-")))
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(mine, (0..40).collect::<Vec<_>>(), "sender {sender}");
    }
    // Later messages follow, whichever replica takes them.
    replicas[0].push("c", "busy", "late", "en", None).await;
    assert_eq!(
        stored_texts(&replicas[1], "busy").await.last().unwrap(),
        "late"
    );
}

async fn a_consent_on_one_replica_stores_what_the_others_buffered_even_while_it_writes(
    replicas: Vec<TestApp>,
) {
    let [a, b, c] = &replicas[..] else {
        unreachable!()
    };
    a.push("c", "d", "one", "en", None).await;
    b.push("c", "d", "two", "en", None).await;
    let (entered, release) = a.store.hold_next_decision();
    let consent = a.graphql_in_background(
        "mutation { giveConsent(dialogId: \"d\", value: true) { storedCount } }",
        json!({}),
    );
    entered.notified().await;
    // While replica A writes, B and C still take the dialog's messages into the buffer.
    assert_eq!(
        b.push("c", "d", "three", "en", None).await["status"],
        "BUFFERED"
    );
    assert_eq!(
        c.push("c", "d", "four", "en", None).await["status"],
        "BUFFERED"
    );
    release.notify_one();
    let consent = consent.await.unwrap();
    assert_eq!(
        consent["data"]["giveConsent"]["storedCount"], 4,
        "{consent}"
    );
    assert_eq!(
        c.push("c", "d", "five", "en", None).await["status"],
        "STORED"
    );
    assert_eq!(
        stored_texts(b, "d").await,
        ["one", "two", "three", "four", "five"]
    );
    assert!(
        redis_support::buffered_dialog_keys(&a.buffer)
            .await
            .is_empty(),
        "nothing is left in the buffer"
    );
}

async fn erasure_on_one_replica_removes_what_every_replica_buffered(replicas: Vec<TestApp>) {
    let [a, b, c] = &replicas[..] else {
        unreachable!()
    };
    a.push("erin", "e1", "one", "en", None).await;
    b.push("erin", "e2", "two", "en", None).await;
    c.push("erin", "e3", "three", "en", None).await;
    c.push("erin", "e3", "four", "en", None).await;
    b.push("olga", "o1", "someone else", "en", None).await;
    a.push("erin", "e4", "stored", "en", None).await;
    a.consent("e4", true).await;
    let erased = b
        .data(
            "mutation { eraseCustomer(customerId: \"erin\") { messageCount bufferedMessageCount } }",
            json!({}),
        )
        .await;
    assert_eq!(
        erased["eraseCustomer"],
        json!({ "messageCount": 1, "bufferedMessageCount": 4 })
    );
    for (app, dialog) in [(c, "e1"), (a, "e2"), (b, "e3"), (c, "e4")] {
        assert_eq!(
            code(&app.consent_error(dialog, true).await),
            "DIALOG_NOT_FOUND"
        );
    }
    assert_eq!(a.consent("o1", true).await["storedCount"], 1);
}

fn tight_budget() -> Config {
    let mut config = test_config();
    config.buffer.max_messages_per_dialog = 4;
    config.buffer.max_bytes = 8_000;
    config
}

async fn the_dialog_cap_and_the_budget_count_what_every_replica_buffered(replicas: Vec<TestApp>) {
    // The cap: four messages in all, from three replicas.
    for i in 0..4 {
        assert_eq!(
            replicas[i % 3]
                .push_status("capped", &format!("m{i}"))
                .await
                .0,
            200
        );
    }
    let (status, body) = replicas[1].push_status("capped", "one too many").await;
    assert_eq!((status, code(&body["errors"][0])), (503, "BUFFER_FULL"));
    // The budget: round-robin until one replica refuses; the others refuse too, the buffer is one.
    let mut accepted = Vec::new();
    let refused_by = loop {
        let n = accepted.len();
        let app = &replicas[n % 3];
        let dialog = format!("fill-{n}");
        let (status, body) = app.push_status(&dialog, &"x".repeat(200)).await;
        if status == 503 {
            assert_eq!(code(&body["errors"][0]), "BUFFER_FULL");
            break n % 3;
        }
        assert_eq!(status, 200, "{body}");
        accepted.push(dialog);
        assert!(accepted.len() < 100, "the budget must refuse at some point");
    };
    assert!(
        accepted.len() >= 6,
        "every replica filled it: {}",
        accepted.len()
    );
    for app in &replicas {
        assert_eq!(app.push_status("one-more", &"x".repeat(200)).await.0, 503);
    }
    let bytes = metric(&replicas[refused_by], "dataapi_buffer_bytes").await;
    assert!(
        bytes <= 8_000.0,
        "the budget holds across replicas: {bytes}"
    );
    // A decision anywhere frees room everywhere (at once on the deciding replica's view; within the
    // refresh of usage elsewhere).
    replicas[(refused_by + 1) % 3]
        .consent(&accepted[0], false)
        .await;
    replicas[(refused_by + 1) % 3].consent("capped", true).await;
    assert_eq!(
        replicas[(refused_by + 1) % 3]
            .push_status("now", "fits")
            .await
            .0,
        200
    );
    for dialog in &accepted[1..] {
        assert_eq!(replicas[2].consent(dialog, true).await["storedCount"], 1);
    }
}

fn short_retention() -> Config {
    let mut config = test_config();
    config.buffer.ttl = Duration::from_millis(400);
    config
}

async fn undecided_dialogs_expire_once_whichever_replica_sweeps(replicas: Vec<TestApp>) {
    for (i, app) in replicas.iter().enumerate() {
        app.push("c", &format!("forgotten-{i}"), "hello", "en", None)
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut expired = 0.0;
        for app in &replicas {
            expired += metric(app, "dataapi_buffer_expired_dialogs_total").await;
        }
        if expired >= 3.0 {
            assert_eq!(expired, 3.0, "each dialog expired once, by one replica");
            break;
        }
        assert!(Instant::now() < deadline, "the sweepers never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, app) in replicas.iter().enumerate() {
        let other = &replicas[(i + 1) % 3];
        assert_eq!(
            code(&other.consent_error(&format!("forgotten-{i}"), true).await),
            "DIALOG_NOT_FOUND"
        );
        assert_eq!(metric(app, "dataapi_buffer_messages").await, 0.0);
    }
    assert!(
        redis_support::buffered_dialog_keys(&replicas[0].buffer)
            .await
            .is_empty()
    );
}

/// Waits until `check` holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_replica_that_stops_after_writing_a_consent_is_finished_by_another(
    mut replicas: Vec<TestApp>,
) {
    let a = replicas.remove(0);
    let b = &replicas[0];
    a.push("c", "d", "one", "en", None).await;
    b.push("c", "d", "two", "en", None).await;
    let committed = a.buffer_hooks.freeze_after_next_commit();
    let hung = a.graphql_in_background(
        "mutation { giveConsent(dialogId: \"d\", value: true) { storedCount } }",
        json!({}),
    );
    committed.notified().await;
    // Replica A wrote the decision and stops before cleaning the buffer. Meanwhile a message arrives at B:
    // the dialog is still buffered there, not sealed.
    assert_eq!(
        b.push("c", "d", "three", "en", None).await["status"],
        "BUFFERED"
    );
    drop(a);
    hung.abort();
    // Once A's lease has run out, B's sweeper finishes the consent from what the store says.
    eventually(
        Duration::from_secs(30),
        "the consent was never finished",
        || async { stored_texts(b, "d").await.len() == 3 },
    )
    .await;
    assert_eq!(stored_texts(b, "d").await, ["one", "two", "three"]);
    assert!(
        redis_support::buffered_dialog_keys(&b.buffer)
            .await
            .is_empty()
    );
    assert_eq!(
        b.push("c", "d", "four", "en", None).await["status"],
        "STORED"
    );
    // The client's retry of the consent changes nothing: the decision stands, nothing is stored twice.
    let retry = b.consent("d", true).await;
    assert_eq!(retry["storedCount"], 0);
    assert_eq!(stored_texts(b, "d").await.len(), 4);
}

async fn a_replica_that_stops_before_writing_a_consent_leaves_the_dialog_waiting_for_it(
    mut replicas: Vec<TestApp>,
) {
    let a = replicas.remove(0);
    let b = &replicas[0];
    a.push("c", "d", "one", "en", None).await;
    let (entered, _never_released) = a.store.hold_next_decision();
    let hung = a.graphql_in_background(
        "mutation { giveConsent(dialogId: \"d\", value: true) { storedCount } }",
        json!({}),
    );
    entered.notified().await;
    drop(a);
    hung.abort();
    // Nothing was written; the dialog still takes messages, and once the lease has run out a consent on
    // another replica stores them all.
    assert_eq!(
        b.push("c", "d", "two", "en", None).await["status"],
        "BUFFERED"
    );
    let consent = b.consent("d", true).await;
    assert_eq!(consent["storedCount"], 2);
    assert_eq!(stored_texts(b, "d").await, ["one", "two"]);
    assert!(
        redis_support::buffered_dialog_keys(&b.buffer)
            .await
            .is_empty()
    );
}

async fn a_consent_written_without_an_answer_in_time_is_finished_without_a_retry(
    replicas: Vec<TestApp>,
) {
    let [a, b] = &replicas[..] else {
        unreachable!()
    };
    a.push("c", "d", "one", "en", None).await;
    // The store writes the decision, but its answer never comes: the client gets STORE_UNAVAILABLE and,
    // say, never retries.
    let committed = a.store.freeze_after_next_decision();
    let error = a.consent_error("d", true).await;
    assert_eq!(code(&error), "STORE_UNAVAILABLE");
    committed.notified().await;
    b.push("c", "d", "two", "en", None).await;
    // The decision is in doubt, so the sweeper asks the store at once instead of at the end of the
    // retention period, and stores what the dialog holds.
    eventually(
        Duration::from_secs(30),
        "the consent was never finished",
        || async { stored_texts(b, "d").await.len() == 2 },
    )
    .await;
    assert!(
        redis_support::buffered_dialog_keys(&b.buffer)
            .await
            .is_empty()
    );
    assert_eq!(
        a.push("c", "d", "three", "en", None).await["status"],
        "STORED"
    );
}

async fn a_consent_whose_buffer_clean_up_failed_is_finished_by_the_sweeper(replicas: Vec<TestApp>) {
    let [a, b] = &replicas[..] else {
        unreachable!()
    };
    a.push("c", "d", "one", "en", None).await;
    b.push("c", "d", "two", "en", None).await;
    // The store writes the decision; removing the written messages from Redis then fails.
    a.buffer_hooks.fail_next_seal();
    let error = a.consent_error("d", true).await;
    assert_eq!(code(&error), "BUFFER_UNAVAILABLE");
    // The dialog is decided, so the sweeper finishes it at once rather than leaving it to age.
    eventually(
        Duration::from_secs(30),
        "the consent was never finished",
        || async {
            redis_support::buffered_dialog_keys(&b.buffer)
                .await
                .is_empty()
        },
    )
    .await;
    assert_eq!(stored_texts(b, "d").await, ["one", "two"]);
    assert_eq!(
        a.push("c", "d", "three", "en", None).await["status"],
        "STORED"
    );
}

async fn two_erasures_at_once_both_complete(replicas: Vec<TestApp>) {
    let [a, b, c] = &replicas[..] else {
        unreachable!()
    };
    for (i, customer) in ["x", "y"].iter().enumerate() {
        for d in 0..3 {
            c.push(customer, &format!("{customer}{d}"), "hi", "en", None)
                .await;
        }
        replicas[i].consent(&format!("{customer}0"), true).await;
    }
    let erase = |app: &TestApp, customer: &str| {
        app.graphql_in_background(
            "mutation($c: ID!) { eraseCustomer(customerId: $c) { messageCount bufferedMessageCount } }",
            json!({ "c": customer }),
        )
    };
    let (x, y) = (erase(a, "x"), erase(b, "y"));
    for erased in [x.await.unwrap(), y.await.unwrap()] {
        assert_eq!(
            erased["data"]["eraseCustomer"],
            json!({ "messageCount": 1, "bufferedMessageCount": 2 }),
            "{erased}"
        );
    }
    // And decisions go on afterwards.
    c.push("x", "x9", "new", "en", None).await;
    assert_eq!(a.consent("x9", true).await["storedCount"], 1);
}

async fn the_same_consent_on_two_replicas_at_once_is_written_once(replicas: Vec<TestApp>) {
    let [a, b, c] = &replicas[..] else {
        unreachable!()
    };
    for i in 0..5 {
        replicas[i % 3]
            .push("c", "same", &format!("m{i}"), "en", None)
            .await;
    }
    let (entered, release) = a.store.hold_next_decision();
    let consent_on = |app: &TestApp, dialog: &str, value: bool| {
        app.graphql_in_background(
            "mutation($d: ID!, $v: Boolean!) { giveConsent(dialogId: $d, value: $v) { value storedCount } }",
            json!({ "d": dialog, "v": value }),
        )
    };
    let first = consent_on(a, "same", true);
    entered.notified().await;
    // B's identical consent waits for A's lease instead of writing the same dialog alongside it.
    let second = consent_on(b, "same", true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second decision waits for the first"
    );
    release.notify_one();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    let stored = |answer: &Value| {
        answer["data"]["giveConsent"]["storedCount"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        (stored(&first), stored(&second)),
        (5, 0),
        "{first} {second}"
    );
    assert_eq!(stored_texts(c, "same").await.len(), 5);

    // Opposite answers at once: whichever comes second wins, never a mix.
    for (i, app) in replicas.iter().enumerate() {
        app.push("c", "torn", &format!("m{i}"), "en", None).await;
    }
    let (entered, release) = b.store.hold_next_decision();
    let yes = consent_on(b, "torn", true);
    entered.notified().await;
    let no = c.graphql_in_background(
        "mutation { giveConsent(dialogId: \"torn\", value: false) { value deletedCount discardedCount } }",
        json!({}),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    release.notify_one();
    let (yes, no) = (yes.await.unwrap(), no.await.unwrap());
    assert_eq!(yes["data"]["giveConsent"]["storedCount"], 3, "{yes}");
    assert_eq!(
        no["data"]["giveConsent"],
        json!({ "value": false, "deletedCount": 3, "discardedCount": 0 })
    );
    assert!(stored_texts(a, "torn").await.is_empty());
}

/// A subscriber connected to one replica hears what the others store and remove, in commit order: the
/// events come from the shared change feed, not from the replica that wrote.
async fn a_subscriber_on_one_replica_hears_what_the_others_store(replicas: Vec<TestApp>) {
    use crate::live::{NEW, STORED, Subscriber, eventually_live, text_of};
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
    let mut subscriber = Subscriber::ready(a, NEW, None).await;
    subscriber.subscribe("s", STORED, json!({})).await;
    subscriber
        .subscribe(
            "r",
            "subscription { dialogRemoved { dialogId reason } }",
            json!({}),
        )
        .await;
    eventually_live(a, 2).await;
    b.push("ada", "live", "one", "en", None).await;
    c.push("ada", "live", "two", "en", None).await;
    c.consent("live", true).await;
    b.push("ada", "live", "three", "en", None).await;
    for expected in ["one", "two", "three"] {
        let (id, payload) = subscriber.event().await;
        assert_eq!((id.as_str(), text_of(&payload)), ("s", expected.to_owned()));
    }
    b.consent("live", false).await;
    let (id, payload) = subscriber.event().await;
    assert_eq!(id, "r");
    assert_eq!(payload["data"]["dialogRemoved"]["dialogId"], "live");
}

/// An erasure holds the erasure gate for as long as it runs, even past the lease (its store calls may add
/// up to more): the hold is renewed, so that no decision begins, and stores the customer's buffered
/// messages, behind the erasure's back. Once the erasure ends, decisions begin again at once.
async fn the_erasure_gate_stays_closed_while_its_erasure_runs_past_the_lease(kind: BufferKind) {
    let mut config = quick_leases();
    config.buffer.backend = redis_support::backend(kind);
    let lease = dataapi::app::decision_lease(&config);
    let buffer = dataapi::app::open_buffer(&config)
        .await
        .expect("the buffer answers");
    let dialog = dataapi::model::DialogId::parse("dialogId", "gated").unwrap();
    let gate = buffer.enter_erasure_gate().await.expect("the gate closes");
    tokio::time::sleep(lease * 2).await;
    match buffer.begin_decision(&dialog).await {
        Err(error) => assert_eq!(error.code(), "BUFFER_UNAVAILABLE", "{error:?}"),
        Ok(_) => {
            panic!("a decision began while an erasure held the gate, two leases after it closed")
        }
    }
    drop(gate);
    let started = Instant::now();
    let decision = buffer
        .begin_decision(&dialog)
        .await
        .expect("a decision begins once the erasure has ended");
    assert!(
        started.elapsed() < lease,
        "waited {:?} for the gate to open",
        started.elapsed()
    );
    buffer.end_decision(decision, true).await;
    buffer.close().await;
    redis_support::drop_keys(&config.buffer.backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erasure_gate_stays_closed_past_the_lease_on_redis() {
    the_erasure_gate_stays_closed_while_its_erasure_runs_past_the_lease(BufferKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erasure_gate_stays_closed_past_the_lease_on_a_redis_cluster() {
    the_erasure_gate_stays_closed_while_its_erasure_runs_past_the_lease(BufferKind::RedisCluster)
        .await;
}

macro_rules! on_replicas {
    ($count:expr, $kind:ident, $config:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                with_replicas($count, BufferKind::$kind, $config, super::$test).await;
            }
        )*
    };
}

mod redis {
    use super::*;

    on_replicas!(3, Redis, test_config();
        a_retry_on_another_replica_records_nothing_twice_and_misuse_is_refused_there,
        pushes_to_one_dialog_from_three_replicas_keep_each_senders_order,
        a_consent_on_one_replica_stores_what_the_others_buffered_even_while_it_writes,
        erasure_on_one_replica_removes_what_every_replica_buffered,
        the_same_consent_on_two_replicas_at_once_is_written_once,
        two_erasures_at_once_both_complete,
        a_subscriber_on_one_replica_hears_what_the_others_store,
    );
    on_replicas!(3, Redis, tight_budget();
        the_dialog_cap_and_the_budget_count_what_every_replica_buffered,
    );
    on_replicas!(3, Redis, short_retention();
        undecided_dialogs_expire_once_whichever_replica_sweeps,
    );
    on_replicas!(2, Redis, quick_leases();
        a_replica_that_stops_after_writing_a_consent_is_finished_by_another,
        a_replica_that_stops_before_writing_a_consent_leaves_the_dialog_waiting_for_it,
        a_consent_written_without_an_answer_in_time_is_finished_without_a_retry,
        a_consent_whose_buffer_clean_up_failed_is_finished_by_the_sweeper,
    );
}

mod redis_cluster {
    use super::*;

    on_replicas!(3, RedisCluster, test_config();
        a_retry_on_another_replica_records_nothing_twice_and_misuse_is_refused_there,
        pushes_to_one_dialog_from_three_replicas_keep_each_senders_order,
        a_consent_on_one_replica_stores_what_the_others_buffered_even_while_it_writes,
        erasure_on_one_replica_removes_what_every_replica_buffered,
        the_same_consent_on_two_replicas_at_once_is_written_once,
        two_erasures_at_once_both_complete,
    );
    on_replicas!(3, RedisCluster, short_retention();
        undecided_dialogs_expire_once_whichever_replica_sweeps,
    );
    on_replicas!(2, RedisCluster, quick_leases();
        a_replica_that_stops_after_writing_a_consent_is_finished_by_another,
    );
}

/// Redis stopped and started again under a running service: pushes fail fast with their own code, the
/// service says it is not ready, nothing acknowledged is lost (append-only file, fsync always), and it
/// recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_pushes_with_buffer_unavailable_loses_nothing_and_heals() {
    let mut redis = RedisProcess::start(true);
    let mut config = test_config();
    config.buffer.backend = BufferBackend::Redis {
        urls: vec![redis.url()],
        key_prefix: redis_support::fresh_prefix(),
    };
    config.buffer.timeout = Duration::from_millis(500);
    with_replicas_on(2, config, async |replicas: Vec<TestApp>| {
        let [a, b] = &replicas[..] else {
            unreachable!()
        };
        a.push("c", "kept", "before the outage", "en", Some("k1"))
            .await;
        redis.kill();
        let (status, body) = b.push_status("kept", "during").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(code(&body["errors"][0]), "BUFFER_UNAVAILABLE");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("retry")
        );
        let ready = a.http_client().get(a.url("/ready")).send().await.unwrap();
        assert_eq!(ready.status(), 503);
        let reason = ready.json::<Value>().await.unwrap()["reason"].to_string();
        assert!(reason.contains("buffer"), "{reason}");
        let consent = a.consent_error("kept", true).await;
        assert_eq!(code(&consent), "BUFFER_UNAVAILABLE");
        let health = a.http_client().get(a.url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200, "alive all the same");

        redis.restart();
        eventually(
            Duration::from_secs(20),
            "the service never recovered",
            || async {
                a.http_client()
                    .get(a.url("/ready"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
        eventually(
            Duration::from_secs(20),
            "pushes never worked again",
            || async { b.push_status("kept", "after").await.0 == 200 },
        )
        .await;
        assert_eq!(b.consent("kept", true).await["storedCount"], 2);
        assert_eq!(
            stored_texts(a, "kept").await,
            ["before the outage", "after"]
        );
    })
    .await;
}

/// A Redis at its `maxmemory` (with `noeviction`): opening a dialog is refused with `BUFFER_FULL` and
/// nothing half-written, while what needs no room goes on: messages of consented dialogs, consents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_at_its_maxmemory_refuses_new_dialogs_but_not_decisions_or_consented_dialogs() {
    let redis = RedisProcess::start_with(
        false,
        &["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"],
    );
    let mut config = test_config();
    config.buffer.backend = BufferBackend::Redis {
        urls: vec![redis.url()],
        key_prefix: redis_support::fresh_prefix(),
    };
    with_replicas_on(1, config, async |replicas: Vec<TestApp>| {
        let app = &replicas[0];
        app.push("c", "consented", "before", "en", None).await;
        app.consent("consented", true).await;
        app.push("c", "waiting", "before", "en", None).await;
        // Fill Redis until it refuses.
        let text = "x".repeat(9_000);
        let mut refused = None;
        for i in 0..2_000 {
            let (status, body) = app.push_status(&format!("filler-{i}"), &text).await;
            if status != 200 {
                refused = Some(body);
                break;
            }
        }
        let refused = refused.expect("Redis must reach its maxmemory");
        assert_eq!(code(&refused["errors"][0]), "BUFFER_FULL", "{refused}");
        // It stays full (Redis's own usage moves a little from call to call, so the very next one may fit).
        let mut statuses = Vec::new();
        for i in 0..5 {
            statuses.push(app.push_status(&format!("more-{i}"), &text).await.0);
        }
        assert!(statuses.contains(&503), "{statuses:?}");
        // A consented dialog's messages go to the store: they need no room in Redis.
        assert_eq!(
            app.push("c", "consented", "after", "en", None).await["status"],
            "STORED"
        );
        // Decisions still drain the buffer.
        assert_eq!(app.consent("waiting", true).await["storedCount"], 1);
        assert_eq!(app.consent("filler-0", false).await["discardedCount"], 1);
    })
    .await;
}

/// More messages in one request, and in one dialog, than Lua's stack holds values (8000): the scripts
/// work through them in parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialog_of_thousands_of_messages_in_one_request_is_buffered_and_stored() {
    let mut config = test_config();
    config.limits.max_push_messages = 10_000;
    config.limits.max_body_bytes = 16 * 1024 * 1024;
    config.buffer.max_messages_per_dialog = 20_000;
    with_replicas(
        1,
        BufferKind::Redis,
        config,
        async |replicas: Vec<TestApp>| {
            let app = &replicas[0];
            let inputs: Vec<Value> = (0..9_000)
                .map(|i| {
                    json!({ "customerId": "c", "dialogId": "long", "text": format!("m{i}"),
                              "language": "en", "messageId": format!("k{i}") })
                })
                .collect();
            let push = "mutation($i: [PushMessageInput!]!) { pushMessages(inputs: $i) { status } }";
            let first = app.data(push, json!({ "i": inputs })).await;
            assert_eq!(first["pushMessages"].as_array().unwrap().len(), 9_000);
            // Again: every one is a retry now (its messageId is known), read back in parts too.
            let again = app.data(push, json!({ "i": inputs })).await;
            assert!(
                again["pushMessages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|pushed| pushed["status"] == "BUFFERED")
            );
            assert_eq!(app.consent("long", true).await["storedCount"], 9_000);
        },
    )
    .await;
}
