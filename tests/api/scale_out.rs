//! Scale-out under faults, with real processes: three `dataapi` processes share one Redis (append-only
//! file, fsync on every write) and one MongoDB-compatible database. Background jobs push round-robin and
//! give consent on random replicas; retired customers are erased on random replicas; one replica is killed
//! with SIGKILL and started again, and Redis is killed and started again, while the load runs. Afterwards
//! every acknowledged message of a consented dialog is stored exactly once, and nothing else is stored or
//! left in the buffer; and a reader that followed the change feed through whichever replica answered all
//! along holds exactly what is stored.
//!
//! Bounded: the load runs `DATAAPI_SCALE_SECONDS` (default 15) and stops by itself; the clean-up then
//! waits until a minute after the kill (the killed replica's open transactions must have ended before its
//! database can be dropped); every request has a timeout; everything is on 127.0.0.1.

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde_json::{Value, json};

use crate::helpers::mongodb_url;
use crate::redis_support::{self, RedisProcess};

fn load_duration() -> Duration {
    let seconds = std::env::var("DATAAPI_SCALE_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(15);
    Duration::from_secs(seconds)
}

/// One `dataapi` process on a fixed loopback port, that can be killed and started again with the same
/// settings.
struct Replica {
    port: u16,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Replica {
    fn start(env: Vec<(String, String)>) -> Self {
        let port = crate::helpers::free_port();
        let mut replica = Self {
            port,
            env,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        replica.restart();
        replica
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stdout.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dataapi"))
            .current_dir(self.dir.path())
            .env_clear()
            .env("BIND_ADDR", format!("127.0.0.1:{}", self.port))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start dataapi");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, no cleanup; whatever it was doing stops there.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill dataapi");
            child.wait().expect("reap dataapi");
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/graphql", self.port)
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the background jobs were told, per dialog.
#[derive(Default)]
struct Ledger {
    /// Acknowledged messageIds, per dialog.
    acknowledged: HashMap<String, BTreeSet<String>>,
    /// The decision finally recorded, per dialog.
    decided: HashMap<String, bool>,
    customer_of: HashMap<String, String>,
    erased_customers: BTreeSet<String>,
}

/// The replicas' URLs, and counters of what the jobs did.
struct Cluster {
    urls: Vec<String>,
    next: AtomicUsize,
    seed: AtomicU64,
    failures: AtomicUsize,
}

impl Cluster {
    /// A cheap random number (xorshift): which replica gets a consent or an erasure.
    fn random(&self) -> u64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x
    }

    /// Sends `body` to replica `first` and, while the answer is not a success, to the next ones, until
    /// `accept` takes an answer or the deadline passes. (The deadline is generous: a replica killed in the
    /// middle of a MongoDB transaction leaves it open until the server aborts it, 60 s later by default,
    /// and the consent of that dialog fails with STORE_UNAVAILABLE until then.)
    async fn send_until(
        &self,
        client: &reqwest::Client,
        mut replica: usize,
        body: &Value,
        accept: impl Fn(&Value) -> bool,
        deadline: Instant,
    ) -> Value {
        loop {
            let url = &self.urls[replica % self.urls.len()];
            let answer = client.post(url).json(body).send().await;
            if let Ok(response) = answer
                && let Ok(value) = response.json::<Value>().await
                && accept(&value)
            {
                return value;
            }
            self.failures.fetch_add(1, Ordering::Relaxed);
            assert!(
                Instant::now() < deadline,
                "no replica accepted {body} before the deadline"
            );
            replica += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const PUSH: &str = "mutation($input: PushMessageInput!) { pushMessage(input: $input) { status } }";
const CONSENT: &str =
    "mutation($d: ID!, $v: Boolean!) { giveConsent(dialogId: $d, value: $v) { value } }";

fn pushed(answer: &Value) -> bool {
    matches!(
        answer["data"]["pushMessage"]["status"].as_str(),
        Some("BUFFERED" | "STORED")
    )
}

const CHANGES: &str = "query($after: ChangeToken) { changes(after: $after, first: 500) {
    token hasMore
    changes {
        ... on MessageStored { change message { dialogId messageId } }
        ... on DialogRemoved { change dialogId }
    }
} }";

/// An analyst's copy kept by the change feed: (dialogId, messageId) of every message.
#[derive(Default)]
struct FeedCopy {
    token: Option<String>,
    last_change: u64,
    rows: BTreeSet<(String, String)>,
}

impl FeedCopy {
    /// Reads pages through any replica until the feed has caught up.
    async fn sync(&mut self, cluster: &Cluster, client: &reqwest::Client, deadline: Instant) {
        loop {
            let replica = cluster.random() as usize;
            let answer = cluster
                .send_until(
                    client,
                    replica,
                    &json!({ "query": CHANGES, "variables": { "after": self.token } }),
                    |answer| answer["data"]["changes"]["token"].is_string(),
                    deadline,
                )
                .await;
            let page = &answer["data"]["changes"];
            for change in page["changes"].as_array().unwrap() {
                let number: u64 = change["change"].as_str().unwrap().parse().unwrap();
                assert!(number > self.last_change, "changes come once, in order");
                self.last_change = number;
                let message = &change["message"];
                if message.is_object() {
                    let row = (
                        message["dialogId"].as_str().unwrap().to_owned(),
                        message["messageId"].as_str().unwrap().to_owned(),
                    );
                    assert!(self.rows.insert(row), "a message came twice: {change}");
                } else {
                    let dialog = change["dialogId"].as_str().unwrap();
                    self.rows.retain(|(d, _)| d != dialog);
                }
            }
            self.token = Some(page["token"].as_str().unwrap().to_owned());
            if !page["hasMore"].as_bool().unwrap() {
                return;
            }
        }
    }
}

/// Follows the change feed while the load runs, as an analyst's sync job would.
async fn follower(cluster: Arc<Cluster>, until: Instant) -> FeedCopy {
    let client = bounded_client();
    let mut copy = FeedCopy::default();
    while Instant::now() < until {
        copy.sync(&cluster, &client, until + Duration::from_secs(90))
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    copy
}

/// A background job: dialogs of 1 to 8 messages, each pushed round-robin, then a decision on a random
/// replica; a new customer every few dialogs, the old one retired (handed to the eraser).
async fn job(
    worker: usize,
    cluster: Arc<Cluster>,
    ledger: Arc<Mutex<Ledger>>,
    retired: Arc<Mutex<Vec<String>>>,
    until: Instant,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = until + Duration::from_secs(90);
    let mut dialogs = 0;
    while Instant::now() < until {
        let customer = format!("c{worker}-{}", dialogs / 4);
        let dialog = format!("d{worker}-{dialogs}");
        ledger
            .lock()
            .unwrap()
            .customer_of
            .insert(dialog.clone(), customer.clone());
        let length = 1 + cluster.random() % 8;
        for m in 0..length {
            let key = format!("m{m}");
            let body = json!({ "query": PUSH, "variables": { "input": {
                "customerId": customer, "dialogId": dialog, "text": format!("{dialog} {key}"),
                "language": "en", "messageId": key } } });
            let first = cluster.next.fetch_add(1, Ordering::Relaxed);
            cluster
                .send_until(&client, first, &body, pushed, deadline)
                .await;
            ledger
                .lock()
                .unwrap()
                .acknowledged
                .entry(dialog.clone())
                .or_default()
                .insert(key);
        }
        let value = !cluster.random().is_multiple_of(3);
        let body = json!({ "query": CONSENT, "variables": { "d": dialog, "v": value } });
        let first = cluster.random() as usize;
        cluster
            .send_until(
                &client,
                first,
                &body,
                |answer| answer["data"]["giveConsent"]["value"] == value,
                deadline,
            )
            .await;
        ledger.lock().unwrap().decided.insert(dialog, value);
        dialogs += 1;
        if dialogs % 4 == 0 {
            retired.lock().unwrap().push(customer);
        }
    }
}

/// Erases some retired customers (no job uses them any more), on random replicas.
async fn eraser(
    cluster: Arc<Cluster>,
    ledger: Arc<Mutex<Ledger>>,
    retired: Arc<Mutex<Vec<String>>>,
    until: Instant,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let customer = retired.lock().unwrap().pop();
        let Some(customer) = customer else { continue };
        let body = json!({ "query": "mutation($c: ID!) { eraseCustomer(customerId: $c) { customerId } }",
                           "variables": { "c": customer } });
        let first = cluster.random() as usize;
        cluster
            .send_until(
                &client,
                first,
                &body,
                |answer| answer["data"]["eraseCustomer"]["customerId"].is_string(),
                until + Duration::from_secs(90),
            )
            .await;
        ledger.lock().unwrap().erased_customers.insert(customer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_nothing_acknowledged_through_a_killed_replica_and_a_redis_restart() {
    let mut redis = RedisProcess::start(true);
    let database = format!("dataapi_scale_{}", uuid::Uuid::now_v7().simple());
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", mongodb_url()),
        ("DATABASE_NAME", database.clone()),
        ("BUFFER_URL", redis.url()),
        ("BUFFER_KEY_PREFIX", redis_support::fresh_prefix()),
        ("BUFFER_TIMEOUT", "500ms".to_owned()),
        ("STORE_TIMEOUT", "2s".to_owned()),
        // The jobs drive the replicas from one address as fast as they can.
        ("CLIENT_REQUESTS_PER_SECOND", "0".to_owned()),
        ("CLIENT_CONCURRENT_REQUESTS", "0".to_owned()),
        ("LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut replicas: Vec<Replica> = (0..3).map(|_| Replica::start(env.clone())).collect();
    let client = bounded_client();
    for replica in &replicas {
        wait_ready(&client, replica).await;
    }
    let cluster = Arc::new(Cluster {
        urls: replicas.iter().map(Replica::url).collect(),
        next: AtomicUsize::new(0),
        seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        failures: AtomicUsize::new(0),
    });
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let retired = Arc::new(Mutex::new(Vec::new()));
    let duration = load_duration();
    let until = Instant::now() + duration;
    let mut tasks: Vec<_> = (0..6)
        .map(|worker| {
            tokio::spawn(job(
                worker,
                cluster.clone(),
                ledger.clone(),
                retired.clone(),
                until,
            ))
        })
        .collect();
    tasks.push(tokio::spawn(eraser(
        cluster.clone(),
        ledger.clone(),
        retired.clone(),
        until,
    )));
    let feed = tokio::spawn(follower(cluster.clone(), until));

    // A replica dies without warning and comes back; later Redis does.
    tokio::time::sleep(duration / 3).await;
    let replica_killed_at = Instant::now();
    replicas[1].kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    replicas[1].restart();
    tokio::time::sleep(duration / 3).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.restart();

    for task in tasks {
        task.await.expect("a job failed");
    }
    let mut feed = feed.await.expect("the feed follower failed");
    let failures = cluster.failures.load(Ordering::Relaxed);
    assert!(
        failures > 0,
        "the faults must have been felt by the jobs (else this test proves nothing)"
    );

    // Reconcile. What a stopped replica left half-done is finished by the others' sweepers once its lease
    // has run out: wait for the buffer to drain.
    let buffered = |client: &reqwest::Client| {
        let url = format!("http://127.0.0.1:{}/metrics", replicas[0].port);
        let client = client.clone();
        async move {
            let text = client.get(url).send().await.ok()?.text().await.ok()?;
            text.lines()
                .find(|line| line.starts_with("dataapi_buffer_messages "))?
                .rsplit(' ')
                .next()?
                .parse::<f64>()
                .ok()
        }
    };
    let drained = Instant::now() + Duration::from_secs(60);
    while buffered(&client).await != Some(0.0) {
        assert!(
            Instant::now() < drained,
            "the buffer never drained: {:?} messages left",
            buffered(&client).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stored = stored_message_ids(&database).await;
    // What must be stored: every acknowledged message of the dialogs consented to, unless erased.
    let (expected, erased_customers) = {
        let ledger = ledger.lock().unwrap();
        let mut expected: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (dialog, value) in &ledger.decided {
            let erased = ledger
                .erased_customers
                .contains(&ledger.customer_of[dialog]);
            if *value && !erased {
                expected.insert(dialog.clone(), ledger.acknowledged[dialog].clone());
            }
        }
        (expected, ledger.erased_customers.len())
    };
    let mut stored_sets: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (dialog, message_id) in &stored {
        assert!(
            stored_sets
                .entry(dialog.clone())
                .or_default()
                .insert(message_id.clone()),
            "{dialog}/{message_id} is stored twice"
        );
    }
    for (dialog, keys) in &expected {
        assert_eq!(
            stored_sets.get(dialog),
            Some(keys),
            "dialog {dialog}: every acknowledged message of a consented dialog is stored"
        );
    }
    for dialog in stored_sets.keys() {
        assert!(
            expected.contains_key(dialog),
            "dialog {dialog} is stored although it was refused or its customer erased"
        );
    }
    assert!(
        expected.len() >= 10,
        "the load must have consented enough dialogs to mean something: {}",
        expected.len()
    );
    assert!(erased_customers > 0, "some customers were erased");
    // The copy kept by the feed, read on from where it stopped: exactly what is stored.
    feed.sync(&cluster, &client, Instant::now() + Duration::from_secs(60))
        .await;
    let stored_rows: BTreeSet<(String, String)> = stored.iter().cloned().collect();
    assert_eq!(
        feed.rows, stored_rows,
        "the copy kept by the change feed holds exactly what is stored"
    );
    assert!(
        redis_support::buffered_dialog_keys_at(&redis.url(), &env_value(&env, "BUFFER_KEY_PREFIX"))
            .await
            .is_empty(),
        "nothing is left in Redis"
    );
    for replica in &replicas {
        wait_ready(&client, replica).await;
        assert!(
            !replica.output().contains("panicked"),
            "{}",
            replica.output()
        );
    }
    // The replicas go first: nothing of theirs may still be writing when their database goes.
    drop(replicas);
    drop_database_after_abandoned_transactions(&database, replica_killed_at).await;
}

/// A client whose every request ends: a replica that stops answering fails the test, never hangs it.
fn bounded_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// How long a MongoDB server keeps a transaction whose client died (`transactionLifetimeLimitSeconds`:
/// 60 s by default, and on SecantusDB).
const TRANSACTION_LIFETIME: Duration = Duration::from_secs(60);

/// Drops the test's database once no transaction the killed replica left open can be holding it.
///
/// A replica killed in the middle of a transaction leaves it open on the server until its lifetime has
/// passed. MongoDB then aborts it by itself. SecantusDB aborts it only when another transaction arrives,
/// and its `dropDatabase` under such a transaction spins for ever, holding the write lock of the whole
/// server (every other test's writes would wait behind it; CI once ran into its 90 minutes so). Hence:
/// wait the lifetime out, run one transaction (SecantusDB reaps then; for MongoDB it is a no-op), drop.
async fn drop_database_after_abandoned_transactions(database: &str, replica_killed_at: Instant) {
    let lifetime_over = replica_killed_at + TRANSACTION_LIFETIME + Duration::from_secs(2);
    tokio::time::sleep_until(lifetime_over.into()).await;
    let client = mongodb::Client::with_uri_str(mongodb_url()).await.unwrap();
    let reap = async {
        let mut session = client.start_session().await?;
        session.start_transaction().await?;
        client
            .database(database)
            .collection::<mongodb::bson::Document>("consents")
            .find_one(mongodb::bson::doc! {})
            .session(&mut session)
            .await?;
        session.commit_transaction().await
    };
    within_a_minute("a transaction after the killed replica's", reap).await;
    within_a_minute(
        "dropping the test's database",
        client.database(database).drop(),
    )
    .await;
}

async fn within_a_minute<T>(
    what: &str,
    work: impl std::future::IntoFuture<Output = mongodb::error::Result<T>>,
) -> T {
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .unwrap_or_else(|_| panic!("{what} took more than a minute on the test server"))
        .unwrap_or_else(|error| panic!("{what} failed: {error}"))
}

fn env_value(env: &[(String, String)], name: &str) -> String {
    env.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
        .unwrap()
}

async fn wait_ready(client: &reqwest::Client, replica: &Replica) {
    let url = format!("http://127.0.0.1:{}/ready", replica.port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(&url).send().await
            && response.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica on port {} never became ready: {}",
            replica.port,
            replica.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every stored message: (dialogId, messageId).
async fn stored_message_ids(database: &str) -> Vec<(String, String)> {
    let documents: Vec<mongodb::bson::Document> = mongodb::Client::with_uri_str(mongodb_url())
        .await
        .unwrap()
        .database(database)
        .collection("messages")
        .find(mongodb::bson::doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    documents
        .into_iter()
        .map(|document| {
            (
                document.get_str("dialogId").unwrap().to_owned(),
                document.get_str("messageId").unwrap().to_owned(),
            )
        })
        .collect()
}
