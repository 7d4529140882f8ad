//! Load: many concurrent pushers and consenters, and readers paging meanwhile, for a bounded time on
//! 127.0.0.1 (`DATAAPI_LOAD_SECONDS`, default 20, then at most a minute more until `MIN_DIALOGS` were
//! decided; the stores' runs overlap). Afterwards the stored data reconciles exactly with what was
//! acknowledged. This proves correctness under load, not speed (see the benchmarks for that).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dataapi::store::Store;
use serde_json::json;

use crate::helpers::TestApp;

const PUSHERS: usize = 12;
const READERS: usize = 2;
const LANGUAGES: [&str; 3] = ["en", "de", "fr"];
/// The load goes on past its duration until this many dialogs were decided, for at most `OVERTIME` more: on a
/// loaded machine the MongoDB-compatible test server may decide few in the duration.
const MIN_DIALOGS: usize = 60;
const OVERTIME: Duration = Duration::from_secs(60);

/// When the pushers stop: the duration has passed and enough dialogs were decided, or the overtime is up.
struct Until {
    time: Instant,
    decided: AtomicUsize,
}

impl Until {
    fn reached(&self) -> bool {
        let now = Instant::now();
        now >= self.time + OVERTIME
            || (now >= self.time && self.decided.load(Ordering::SeqCst) >= MIN_DIALOGS)
    }
}

fn load_duration() -> Duration {
    let seconds = std::env::var("DATAAPI_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds)
}

/// What one pusher had acknowledged: for each dialog, its decision and its acknowledged messages.
type Ledger = HashMap<String, (bool, usize)>;

async fn pusher(app: Arc<TestApp>, worker: usize, until: Arc<Until>) -> Ledger {
    let mut ledger = Ledger::new();
    let mut n = 0;
    while !until.reached() {
        let dialog = format!("load-{worker}-{n}");
        let length = 1 + (worker + n) % 7;
        let mut acknowledged = 0;
        for i in 0..length {
            let response = app
                .graphql(
                    "mutation($i: PushMessageInput!) { pushMessage(input: $i) { status } }",
                    json!({ "i": { "customerId": format!("cust-{}", n % 5), "dialogId": dialog,
                                   "text": format!("message {i} of {dialog}"), "language": LANGUAGES[i % 3],
                                   "messageId": format!("m{i}") } }),
                )
                .await;
            assert!(response.get("errors").is_none(), "{response}");
            assert_eq!(response["data"]["pushMessage"]["status"], "BUFFERED");
            acknowledged += 1;
        }
        let value = n % 4 != 3;
        let response = app
            .graphql(
                "mutation($d: ID!, $v: Boolean!) { giveConsent(dialogId: $d, value: $v) { storedCount discardedCount } }",
                json!({ "d": dialog, "v": value }),
            )
            .await;
        assert!(response.get("errors").is_none(), "{response}");
        let outcome = &response["data"]["giveConsent"];
        let expected = if value {
            "storedCount"
        } else {
            "discardedCount"
        };
        assert_eq!(outcome[expected], acknowledged, "{dialog}: {outcome}");
        ledger.insert(dialog, (value, acknowledged));
        until.decided.fetch_add(1, Ordering::SeqCst);
        n += 1;
    }
    ledger
}

async fn reader(app: Arc<TestApp>, until: Arc<Until>) -> usize {
    let mut pages = 0;
    let mut after: Option<String> = None;
    while !until.reached() {
        let data = app
            .data(
                "query($a: String) { dialogs(first: 50, after: $a) {
                    edges { node { id messageCount messages { id } } } pageInfo { hasNextPage endCursor } } }",
                json!({ "a": after }),
            )
            .await;
        let connection = &data["dialogs"];
        for edge in connection["edges"].as_array().unwrap() {
            let node = &edge["node"];
            assert_eq!(
                node["messageCount"],
                node["messages"].as_array().unwrap().len(),
                "{node}"
            );
        }
        after = if connection["pageInfo"]["hasNextPage"] == true {
            connection["pageInfo"]["endCursor"]
                .as_str()
                .map(str::to_owned)
        } else {
            None
        };
        pages += 1;
    }
    pages
}

pub async fn concurrent_pushers_and_consenters_reconcile_exactly(app: TestApp) {
    let app = Arc::new(app);
    let until = Arc::new(Until {
        time: Instant::now() + load_duration(),
        decided: Default::default(),
    });
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|w| tokio::spawn(pusher(app.clone(), w, until.clone())))
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|_| tokio::spawn(reader(app.clone(), until.clone())))
        .collect();

    let mut ledger = Ledger::new();
    for pusher in pushers {
        ledger.extend(pusher.await.unwrap());
    }
    let pages: usize = futures::future::join_all(readers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();

    let consented: Vec<(&String, usize)> = ledger
        .iter()
        .filter(|(_, (value, _))| *value)
        .map(|(d, (_, n))| (d, *n))
        .collect();
    let expected_messages: usize = consented.iter().map(|(_, n)| n).sum();
    assert!(ledger.len() > 50, "the load ran: {} dialogs", ledger.len());
    assert!(pages > 0);
    assert_eq!(
        app.stored_dialogs().await as usize,
        consented.len(),
        "one stored dialog per yes"
    );
    assert_eq!(
        app.stored_messages().await as usize,
        expected_messages,
        "every acknowledged message once"
    );
    for (dialog, expected) in consented.iter().take(50) {
        let id = dataapi::model::DialogId::parse("dialogId", dialog.as_str()).unwrap();
        let stored = app.store.dialog(&id).await.unwrap().expect("stored");
        assert_eq!(stored.message_count as usize, *expected, "{dialog}");
    }
    eprintln!(
        "load: {} dialogs ({} consented, {expected_messages} messages stored), {pages} pages read",
        ledger.len(),
        consented.len()
    );
}

for_each_store!(
    with crate::helpers::patient_config();
    concurrent_pushers_and_consenters_reconcile_exactly
);
