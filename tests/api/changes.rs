//! The change feed (issue 11): everything stored or removed since a token, in commit order, so that a copy
//! kept by it equals the store; late consents, withdrawals, erasures, paging, concurrent writers, and the
//! export of the same feed. Over real HTTP, on both stores and on every buffer.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::helpers::{TestApp, code};

const CHANGES: &str = "query($after: ChangeToken, $first: Int) {
    changes(after: $after, first: $first) {
        token hasMore
        changes {
            __typename
            ... on MessageStored { change message { id dialogId customerId text language createdAt } }
            ... on DialogRemoved { change dialogId reason removedAt }
        }
    }
}";

/// A reader's copy of the data, kept by applying the feed in order.
#[derive(Default)]
struct Copy {
    /// Message id -> (dialog id, text).
    messages: BTreeMap<String, (String, String)>,
    token: Option<String>,
    last_change: u64,
}

impl Copy {
    /// Applies one page; every change comes once, in increasing order, and a message is never stored twice.
    fn apply(&mut self, page: &Value) {
        for change in page["changes"].as_array().unwrap() {
            let number: u64 = change["change"].as_str().unwrap().parse().unwrap();
            assert!(
                number > self.last_change,
                "changes come once, in order: {page:#}"
            );
            self.last_change = number;
            match change["__typename"].as_str().unwrap() {
                "MessageStored" => {
                    let message = &change["message"];
                    let id = message["id"].as_str().unwrap().to_owned();
                    let row = (
                        message["dialogId"].as_str().unwrap().to_owned(),
                        message["text"].as_str().unwrap().to_owned(),
                    );
                    assert!(
                        self.messages.insert(id, row).is_none(),
                        "a message came twice: {change}"
                    );
                }
                "DialogRemoved" => {
                    let dialog = change["dialogId"].as_str().unwrap();
                    self.messages.retain(|_, (d, _)| d != dialog);
                }
                other => panic!("unknown change {other}"),
            }
        }
        self.token = Some(page["token"].as_str().unwrap().to_owned());
    }

    /// Reads the feed until it has caught up; returns the pages read.
    async fn sync(&mut self, app: &TestApp, first: usize) -> usize {
        let mut pages = 0;
        loop {
            let page = app
                .data(CHANGES, json!({ "after": self.token, "first": first }))
                .await["changes"]
                .clone();
            self.apply(&page);
            pages += 1;
            if !page["hasMore"].as_bool().unwrap() {
                return pages;
            }
        }
    }

    fn dialogs(&self) -> BTreeSet<String> {
        self.messages.values().map(|(d, _)| d.clone()).collect()
    }
}

/// Every stored message id with its dialog and text, through `messages`.
async fn stored(app: &TestApp) -> BTreeMap<String, (String, String)> {
    let data = app
        .data(
            "{ messages(first: 1000) { nodes { id dialogId text } } }",
            json!({}),
        )
        .await;
    data["messages"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                (
                    m["dialogId"].as_str().unwrap().to_owned(),
                    m["text"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

async fn erase(app: &TestApp, customer: &str) {
    app.data(
        "mutation($c: ID!) { eraseCustomer(customerId: $c) { dialogCount } }",
        json!({ "c": customer }),
    )
    .await;
}

async fn the_feed_follows_consents_withdrawals_and_erasures(app: TestApp) {
    let mut copy = Copy::default();
    assert_eq!(copy.sync(&app, 10).await, 1);
    assert_eq!(copy.token.as_deref(), Some("0"), "an empty store");

    // Dialog a is older than b, but its consent comes later: it still reaches a reader who already read b.
    app.push("ada", "a", "a1", "en", None).await;
    app.push("ada", "a", "a2", "en", None).await;
    app.push("bob", "b", "b1", "de", None).await;
    app.push("bob", "b", "b2", "de", None).await;
    copy.sync(&app, 10).await;
    assert!(
        copy.messages.is_empty(),
        "buffered messages are not stored changes"
    );
    app.consent("b", true).await;
    copy.sync(&app, 10).await;
    assert_eq!(copy.dialogs(), BTreeSet::from(["b".to_owned()]));
    app.consent("a", true).await;
    app.push("ada", "a", "a3 after consent", "en", None).await;
    copy.sync(&app, 10).await;
    assert_eq!(copy.messages.len(), 5);
    assert_eq!(copy.messages, stored(&app).await);

    // Idle: the same token, nothing again.
    let before = copy.token.clone();
    let page = app
        .data(CHANGES, json!({ "after": before, "first": 10 }))
        .await["changes"]
        .clone();
    assert_eq!(page["changes"], json!([]));
    assert_eq!(page["token"].as_str(), before.as_deref());

    // A withdrawal and an erasure reach the copy as removals; the customer id is never in them.
    app.push("cyd", "c", "c1", "en", None).await;
    app.consent("c", true).await;
    app.consent("b", false).await;
    erase(&app, "ada").await;
    let page = app
        .data(CHANGES, json!({ "after": copy.token, "first": 10 }))
        .await["changes"]
        .clone();
    let removals: Vec<(String, String)> = page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["__typename"] == "DialogRemoved")
        .map(|c| {
            assert!(c.get("customerId").is_none());
            assert!(c["removedAt"].as_str().unwrap().ends_with('Z'));
            (
                c["dialogId"].as_str().unwrap().to_owned(),
                c["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        removals,
        [
            ("b".to_owned(), "WITHDRAWN".to_owned()),
            ("a".to_owned(), "ERASED".to_owned())
        ]
    );
    copy.apply(&page);
    assert_eq!(copy.dialogs(), BTreeSet::from(["c".to_owned()]));
    assert_eq!(copy.messages, stored(&app).await);

    // A refusal of a dialog never stored is no change at all.
    app.push("dan", "d", "d1", "en", None).await;
    app.consent("d", false).await;
    let page = app
        .data(CHANGES, json!({ "after": copy.token, "first": 10 }))
        .await["changes"]
        .clone();
    assert_eq!(page["changes"], json!([]));
    copy.apply(&page);

    // From the start, a page of one at a time: the same copy.
    let mut fresh = Copy::default();
    let pages = fresh.sync(&app, 1).await;
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(fresh.messages, copy.messages);
    assert_eq!(fresh.token, copy.token);
}

async fn bad_tokens_and_sizes_are_refused(app: TestApp) {
    app.push("ada", "a", "a1", "en", None).await;
    app.consent("a", true).await;
    let last = app.data(CHANGES, json!({})).await["changes"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // The decision and the message: live updates number decisions with the changes (see `live`).
    assert_eq!(last, "2");
    for bad in ["", "-1", "1.0", "abc", " 1", "99999999999999999999", "1e3"] {
        let error = app.error(CHANGES, json!({ "after": bad })).await;
        assert_eq!(code(&error), "INVALID_CHANGE_TOKEN", "{bad:?}: {error}");
        assert_eq!(error["extensions"]["field"], "after");
    }
    // Ahead of the database: restored from a backup, or another deployment's token.
    let error = app.error(CHANGES, json!({ "after": "3" })).await;
    assert_eq!(code(&error), "INVALID_CHANGE_TOKEN");
    assert!(
        error["message"].as_str().unwrap().contains("restored"),
        "{error}"
    );
    let error = app.error(CHANGES, json!({ "after": 1 })).await;
    assert!(
        error["message"].as_str().unwrap().contains("change token"),
        "{error}"
    );
    for first in [0, -1, 1001] {
        let error = app.error(CHANGES, json!({ "first": first })).await;
        assert_eq!(code(&error), "BAD_USER_INPUT", "{first}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains("MAX_PAGE_SIZE"),
            "{error}"
        );
    }
    // A page's cost counts in the query's complexity, like every listing's.
    let error = app.error(CHANGES, json!({ "first": 100_000 })).await;
    assert_eq!(code(&error), "QUERY_TOO_COMPLEX", "{error}");
    // Needs the read role like every listing (keys are tested in `security`).
}

/// Consents, pushes to consented dialogs and withdrawals run concurrently while a reader follows the feed
/// page by page: every change reaches it once, and its copy ends equal to the store. A change that became
/// visible below a token already handed out would be missing from the copy.
async fn a_reader_following_concurrent_writers_misses_nothing(app: TestApp) {
    // On the MongoDB-compatible test server, writes that take change numbers run one at a time and each
    // costs tens of milliseconds on a busy machine: enough dialogs to overlap, few enough to stay well
    // inside STORE_TIMEOUT.
    const DIALOGS: usize = 24;
    for dialog in 0..DIALOGS {
        for n in 0..3 {
            app.push(
                &format!("c{}", dialog % 7),
                &format!("w{dialog}"),
                &format!("m{n}"),
                "en",
                None,
            )
            .await;
        }
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let writers = async {
        futures::future::join_all((0..DIALOGS).map(|dialog| {
            let app = &app;
            async move {
                let id = format!("w{dialog}");
                app.consent(&id, true).await;
                app.push(&format!("c{}", dialog % 7), &id, "after", "en", None)
                    .await;
                if dialog % 5 == 0 {
                    app.consent(&id, false).await;
                }
            }
        }))
        .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    // Reads page by page for as long as the writers write (how often depends on the machine's speed),
    // then once more.
    let reader = async {
        let mut copy = Copy::default();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            copy.sync(&app, 7).await;
        }
        copy.sync(&app, 7).await;
        copy
    };
    let (copy, ()) = tokio::join!(reader, writers);
    let stored = stored(&app).await;
    let kept = (0..DIALOGS).filter(|dialog| dialog % 5 != 0).count();
    assert_eq!(stored.len(), kept * 4);
    assert_eq!(copy.messages, stored);
}

for_each_setup!(
    the_feed_follows_consents_withdrawals_and_erasures,
    bad_tokens_and_sizes_are_refused,
);

/// A module of its own: the macro names its modules after the setups, once per module.
mod concurrent {
    use super::a_reader_following_concurrent_writers_misses_nothing;

    for_each_setup!(
        with crate::helpers::patient_config();
        a_reader_following_concurrent_writers_misses_nothing
    );
}

/// Messages a MongoDB database held before the change feed existed have no change number: starting on
/// it numbers them in the order they were accepted, in batches, and later consents come after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stored_before_the_feed_are_numbered_on_mongodb() {
    use ::mongodb::bson::{DateTime, doc};
    use dataapi::store::Store;
    let url = crate::helpers::mongodb_url();
    let name = format!("dataapi_test_numbering_{}", uuid::Uuid::now_v7().simple());
    let client = ::mongodb::Client::with_uri_str(&url).await.unwrap();
    let messages = client
        .database(&name)
        .collection::<::mongodb::bson::Document>("messages");
    // More than one numbering batch, inserted out of acceptance order.
    let count = 2_500i64;
    messages
        .insert_many((0..count).rev().map(|n| {
            doc! {
                "_id": format!("m{n:05}"), "dialogId": format!("d{}", n / 10), "customerId": "c",
                "text": format!("t{n}"), "language": "en",
                "createdAt": DateTime::from_millis(1_795_000_000_000 + n), "seq": n,
            }
        }))
        .await
        .unwrap();
    let store = dataapi::store::MongoStore::connect(&url, &name).await;
    let outcome = async {
        let store = store.expect("the store opens on the old layout");
        assert_eq!(store.last_change().await.unwrap(), count);
        let mut after = 0;
        let mut texts = Vec::new();
        loop {
            let changes = store.scan_changes(after, count, 1000).await.unwrap();
            let Some(last) = changes.last() else { break };
            after = last.number();
            texts.extend(changes.into_iter().map(|change| match change {
                dataapi::model::Change::Stored { message, .. } => message.text.as_str().to_owned(),
                other => panic!("{other:?}"),
            }));
        }
        let expected: Vec<String> = (0..count).map(|n| format!("t{n}")).collect();
        assert_eq!(texts, expected, "numbered in acceptance order, each once");
        // Opening it again numbers nothing more.
        drop(store);
        let again = dataapi::store::MongoStore::connect(&url, &name)
            .await
            .unwrap();
        assert_eq!(again.last_change().await.unwrap(), count);
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(outcome)).await;
    client.database(&name).drop().await.unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
