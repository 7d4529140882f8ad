//! The Redis servers the tests use: `TEST_REDIS_URL` (a standalone Redis) and `TEST_REDIS_CLUSTER_URLS`
//! (every node of a three-node Redis Cluster), which `scripts/test` starts; and Redis processes of a test's
//! own, which it can stop and start again (`REDIS_SERVER`, the `redis-server` binary).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataapi::config::BufferBackend;

/// Which buffer a test's service uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferKind {
    Memory,
    Redis,
    RedisCluster,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the suite with scripts/test, which starts a Redis server and a Redis \
             Cluster for it"
        )
    })
}

/// The standalone Redis of the suite.
pub fn redis_url() -> String {
    env("TEST_REDIS_URL")
}

/// Every node of the suite's Redis Cluster.
pub fn cluster_urls() -> Vec<String> {
    env("TEST_REDIS_CLUSTER_URLS")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// A key prefix no other test uses.
pub fn fresh_prefix() -> String {
    format!("test.{}", uuid::Uuid::now_v7().simple())
}

/// The buffer setting for `kind`, under a fresh key prefix (`None` for the in-process buffer).
pub fn backend(kind: BufferKind) -> BufferBackend {
    match kind {
        BufferKind::Memory => BufferBackend::Memory,
        BufferKind::Redis => BufferBackend::Redis {
            urls: vec![redis_url()],
            key_prefix: fresh_prefix(),
        },
        // One seed node is enough: the client learns the others from it.
        BufferKind::RedisCluster => BufferBackend::Redis {
            urls: vec![cluster_urls()[0].clone()],
            key_prefix: fresh_prefix(),
        },
    }
}

/// The nodes a backend's keys live on, if it is one of the suite's servers (a Redis of a test's own goes
/// away with the test).
fn nodes_of(backend: &BufferBackend) -> Vec<String> {
    match backend {
        BufferBackend::Memory => Vec::new(),
        BufferBackend::Redis { urls, .. } if urls[0] == redis_url() => vec![redis_url()],
        BufferBackend::Redis { urls, .. } if cluster_urls().contains(&urls[0]) => cluster_urls(),
        BufferBackend::Redis { .. } => Vec::new(),
    }
}

/// A plain connection to one node.
pub async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|error| panic!("cannot reach Redis at {url}: {error}"))
}

/// The keys of a backend's prefix, on every node of the suite's servers.
pub async fn keys(backend: &BufferBackend) -> Vec<String> {
    let BufferBackend::Redis { key_prefix, .. } = backend else {
        return Vec::new();
    };
    keys_on(&nodes_of(backend), key_prefix).await
}

/// The keys under `key_prefix` on `nodes`.
pub async fn keys_on(nodes: &[String], key_prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for node in nodes {
        let mut connection = connect(node).await;
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{key_prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .expect("SCAN");
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    keys
}

/// Deletes a test's keys, on every node.
pub async fn drop_keys(backend: &BufferBackend) {
    for node in nodes_of(backend) {
        let mut connection = connect(&node).await;
        let BufferBackend::Redis { key_prefix, .. } = backend else {
            return;
        };
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{key_prefix}:*"))
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        for key in found {
            let _: i64 = redis::cmd("UNLINK")
                .arg(key)
                .query_async(&mut connection)
                .await
                .expect("UNLINK");
        }
    }
}

/// The keys of a backend that hold buffered messages or dialogs (not counters, leases or marks).
pub async fn buffered_dialog_keys(backend: &BufferBackend) -> Vec<String> {
    dialog_keys(keys(backend).await)
}

/// Like [`buffered_dialog_keys`], on one Redis of a test's own.
pub async fn buffered_dialog_keys_at(url: &str, key_prefix: &str) -> Vec<String> {
    dialog_keys(keys_on(&[url.to_owned()], key_prefix).await)
}

fn dialog_keys(keys: Vec<String>) -> Vec<String> {
    keys.into_iter()
        .filter(|key| key.contains("}:m:") || key.contains("}:d:"))
        .collect()
}

/// How many times each command ran on a node since its statistics were last reset (`INFO commandstats`).
pub async fn command_counts(url: &str) -> std::collections::HashMap<String, u64> {
    let mut connection = connect(url).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

pub async fn reset_command_counts(url: &str) {
    let mut connection = connect(url).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut connection)
        .await
        .expect("CONFIG RESETSTAT");
}

/// A redis-server process of a test's own on a fixed loopback port, that can be stopped and started again.
/// With `appendonly`, it keeps an append-only file (fsync on every write) in its own directory, so what it
/// acknowledged survives a restart.
pub struct RedisProcess {
    pub port: u16,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    appendonly: bool,
    /// More redis-server arguments; `{port}` stands for the port, `{dir}` for the directory.
    extra: Vec<String>,
}

impl RedisProcess {
    pub fn start(appendonly: bool) -> Self {
        Self::start_with(appendonly, &[])
    }

    /// With more redis-server arguments (`{port}` and `{dir}` are replaced); e.g. ACL users, or TLS on
    /// the port with `--port 0 --tls-port {port}`.
    pub fn start_with(appendonly: bool, extra: &[&str]) -> Self {
        let port = crate::helpers::free_port();
        let mut server = Self {
            port,
            child: None,
            dir: tempfile::tempdir().expect("a directory for Redis"),
            appendonly,
            extra: extra.iter().map(|arg| arg.to_string()).collect(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let dir = self.dir.path().display().to_string();
        let port = self.port.to_string();
        let child = Command::new(&binary)
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--dir", &dir])
            .args(["--save", ""])
            .args(["--appendonly", if self.appendonly { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .args(
                self.extra
                    .iter()
                    .map(|arg| arg.replace("{port}", &port).replace("{dir}", &dir)),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start {binary} (set REDIS_SERVER, or run scripts/test): {error}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Listening is enough: whatever else it needs (a password, TLS) is the test's to give.
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it as a crash would (SIGKILL): what it had not written to its file is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill redis-server");
            child.wait().expect("reap redis-server");
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wraps a real buffer to stop a replica at chosen points, as if it died there.
pub struct InstrumentedBuffer {
    inner: dataapi::buffer::SharedBuffer,
    /// When set, the next seal (consent `true` is in the store, the buffer not yet cleaned) notifies and
    /// never returns: the replica holds its lease and does nothing more.
    freeze_seal: std::sync::Mutex<Option<std::sync::Arc<tokio::sync::Notify>>>,
    /// When set, the next seal fails as if Redis had not answered (the store has the decision).
    fail_seal: std::sync::atomic::AtomicBool,
    /// Calls that open dialogs, and the dialogs they named.
    opens: std::sync::Mutex<Vec<Vec<String>>>,
    /// When set, the next emptying of a customer's buffered dialogs fails as if Redis had not answered.
    fail_customer_discard: std::sync::atomic::AtomicBool,
}

impl InstrumentedBuffer {
    pub fn new(inner: dataapi::buffer::SharedBuffer) -> Self {
        Self {
            inner,
            freeze_seal: std::sync::Mutex::default(),
            fail_seal: std::sync::atomic::AtomicBool::new(false),
            opens: std::sync::Mutex::default(),
            fail_customer_discard: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The next erasure's emptying of the buffer fails, before it removes anything.
    pub fn fail_next_customer_discard(&self) {
        self.fail_customer_discard
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The dialogs of each call that opened dialogs so far, in the order of the calls.
    pub fn opens(&self) -> Vec<Vec<String>> {
        self.opens.lock().unwrap().clone()
    }

    /// The next decision's clean-up of the buffer fails, after its store write.
    pub fn fail_next_seal(&self) {
        self.fail_seal
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next decision stops for good after writing to the store; `stopped` is notified then.
    pub fn freeze_after_next_commit(&self) -> std::sync::Arc<tokio::sync::Notify> {
        let stopped = std::sync::Arc::new(tokio::sync::Notify::new());
        *self.freeze_seal.lock().unwrap() = Some(stopped.clone());
        stopped
    }
}

mod delegate {
    use std::time::Duration;

    use async_trait::async_trait;
    use dataapi::buffer::{
        Buffer, BufferResult, BufferStats, DecisionLease, DialogPush, Dropped, DueDialogs, Gate,
        PushOutcome,
    };
    use dataapi::error::ApiError;
    use dataapi::model::{CustomerId, DialogId, Message};

    use super::InstrumentedBuffer;

    #[async_trait]
    impl Buffer for InstrumentedBuffer {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn is_shared(&self) -> bool {
            self.inner.is_shared()
        }
        async fn ping(&self) -> BufferResult<()> {
            self.inner.ping().await
        }
        async fn push_if_buffered(
            &self,
            pushes: Vec<DialogPush>,
        ) -> BufferResult<Vec<PushOutcome>> {
            self.inner.push_if_buffered(pushes).await
        }
        async fn open(&self, pushes: Vec<DialogPush>) -> BufferResult<Vec<PushOutcome>> {
            let dialogs = pushes.iter().map(|push| push.dialog_id.to_string());
            self.opens.lock().unwrap().push(dialogs.collect());
            self.inner.open(pushes).await
        }
        async fn begin_decision(&self, dialog_id: &DialogId) -> Result<DecisionLease, ApiError> {
            self.inner.begin_decision(dialog_id).await
        }
        async fn seal_and_remove_through(
            &self,
            lease: &DecisionLease,
            seq: i64,
        ) -> BufferResult<Vec<Message>> {
            let freeze = self.freeze_seal.lock().unwrap().take();
            if let Some(stopped) = freeze {
                stopped.notify_one();
                std::future::pending::<()>().await;
            }
            if self
                .fail_seal
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(dataapi::buffer::BufferError(
                    "injected: no answer from Redis".to_owned(),
                ));
            }
            self.inner.seal_and_remove_through(lease, seq).await
        }
        async fn discard(&self, lease: &DecisionLease) -> BufferResult<usize> {
            self.inner.discard(lease).await
        }
        async fn end_decision(&self, lease: DecisionLease, settled: bool) {
            self.inner.end_decision(lease, settled).await
        }
        async fn enter_erasure_gate(&self) -> Result<Gate, ApiError> {
            self.inner.enter_erasure_gate().await
        }
        async fn count_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped> {
            self.inner.count_customer(customer_id).await
        }
        async fn discard_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped> {
            if self
                .fail_customer_discard
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(dataapi::buffer::BufferError(
                    "injected: no answer from Redis".to_owned(),
                ));
            }
            self.inner.discard_customer(customer_id).await
        }
        async fn due(&self) -> BufferResult<DueDialogs> {
            self.inner.due().await
        }
        async fn expire(&self, dialogs: &[DialogId]) -> BufferResult<Dropped> {
            self.inner.expire(dialogs).await
        }
        async fn claim_sweep(&self, period: Duration) -> bool {
            self.inner.claim_sweep(period).await
        }
        fn next_seq(&self) -> i64 {
            self.inner.next_seq()
        }
        async fn stats(&self) -> BufferResult<BufferStats> {
            self.inner.stats().await
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }
}
