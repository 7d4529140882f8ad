//! DataAPI's benchmark suite (`scripts/bench`; method and results in BENCHMARKS.md).
//!
//! It starts the release binary on 127.0.0.1 as a separate process, loads it with a fixed number of
//! connections for a fixed time (warm-up excluded), checks every response body (a GraphQL response with
//! `errors` is a failure, not throughput) and prints a results table. Targets are ratios measured in the
//! same run, because these machines are noisy; absolute numbers are shown, never asserted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dataapi::paging::{ListKind, SortKey, encode_cursor};
use dataapi::store::SqliteStore;
use deadpool_sqlite::rusqlite::{Connection, params};
use serde_json::{Value, json};

/// Settings of one run, from the command line (`cargo bench --bench service -- --seconds 5`).
struct Settings {
    binary: PathBuf,
    seconds: f64,
    warmup: f64,
    connections: usize,
    /// Dialogs and messages of the paging data set.
    paging_dialogs: usize,
    paging_messages_per_dialog: usize,
    /// Messages buffered for the memory measurement.
    memory_messages: usize,
    output: PathBuf,
    /// Run only the scenarios whose name contains this (push, rest, consent, paging, memory, redis,
    /// attack, startup).
    only: Option<String>,
}

impl Settings {
    fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1).cloned())
        };
        let quick = args.iter().any(|a| a == "--quick");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        Self {
            binary: value("--binary")
                .map(|path| root.join(path))
                .unwrap_or_else(|| root.join("target/release/dataapi")),
            seconds: value("--seconds")
                .and_then(|s| s.parse().ok())
                .unwrap_or(if quick { 2.0 } else { 6.0 }),
            warmup: if quick { 0.5 } else { 1.5 },
            connections: value("--connections")
                .and_then(|s| s.parse().ok())
                .unwrap_or(16),
            paging_dialogs: if quick { 5_000 } else { 50_000 },
            paging_messages_per_dialog: 20,
            memory_messages: if quick { 100_000 } else { 1_000_000 },
            only: value("--only"),
            output: value("--output")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target/bench-results.md")),
        }
    }
}

/// The service as a child process on a free loopback port.
struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the binary with `env` and waits until it answers; returns it and the time that took.
    async fn start(
        binary: &Path,
        database: Option<&Path>,
        env: &[(&str, String)],
    ) -> (Self, Duration) {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new(binary);
        command
            .current_dir(dir.path())
            .env_clear()
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("LOG", "error")
            .env("BUFFER_MAX_BYTES", (8u64 << 30).to_string())
            .env("MAX_QUERY_COMPLEXITY", "10000000")
            // The load generator is one client on one address, by design as fast as the service goes.
            .env("CLIENT_REQUESTS_PER_SECOND", "0")
            .env("CLIENT_CONCURRENT_REQUESTS", "0")
            .stdout(Stdio::null());
        if let Some(database) = database {
            command.env("DATABASE_URL", format!("sqlite://{}", database.display()));
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let started = Instant::now();
        let child = command
            .spawn()
            .expect("start the release binary (cargo build --release)");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        loop {
            if let Ok(response) = client.get(format!("{base}/health")).send().await
                && response.status() == 200
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the service did not start"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let startup = started.elapsed();
        (
            Self {
                child,
                base,
                _dir: dir,
            },
            startup,
        )
    }

    fn graphql_url(&self) -> String {
        format!("{}/graphql", self.base)
    }

    /// Resident memory of the service process, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS in /proc");
        kb * 1024
    }

    /// CPU time the service process has used so far (user and system), in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces): state is the first, utime the 12th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("/proc/PID/stat")
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks / per_second
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Throughput and latency of one load run.
#[derive(Clone, Debug, Default)]
struct LoadResult {
    requests: u64,
    failures: u64,
    seconds: f64,
    /// Latencies of the measured (post-warm-up) requests, in microseconds, sorted.
    latencies: Vec<u64>,
}

impl LoadResult {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[index] as f64 / 1000.0
    }

    fn summary(&self) -> String {
        format!(
            "{:.0} req/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} failed",
            self.throughput(),
            self.percentile(0.5),
            self.percentile(0.9),
            self.percentile(0.99),
            self.latencies.last().copied().unwrap_or(0) as f64 / 1000.0,
            self.failures
        )
    }
}

/// A GraphQL response counts only when it is a 200 without `errors`.
fn succeeded(status: u16, body: &Value) -> bool {
    status == 200 && body.get("errors").is_none() && !body["data"].is_null()
}

/// The parts of a GraphQL response the load generator checks: the whole body is parsed (it must be valid
/// JSON), without building a tree of it.
#[derive(serde::Deserialize)]
struct Checked {
    data: Option<serde::de::IgnoredAny>,
    errors: Option<serde::de::IgnoredAny>,
}

/// The load generator's [`succeeded`].
fn body_succeeded(status: u16, body: &[u8]) -> bool {
    status == 200
        && serde_json::from_slice::<Checked>(body)
            .is_ok_and(|checked| checked.data.is_some() && checked.errors.is_none())
}

/// Loads `url` from `connections` concurrent connections for warm-up plus `seconds`. `body(connection, n)`
/// makes the n-th request body (JSON) of a connection. With `rate` (requests per second in all), each connection paces
/// itself (open loop: latency is measured from the scheduled send time, so queueing counts).
async fn load(
    url: &str,
    connections: usize,
    warmup: f64,
    seconds: f64,
    rate: Option<f64>,
    body: impl Fn(usize, u64) -> String + Send + Sync + 'static,
) -> LoadResult {
    load_as(url, connections, None, warmup, seconds, rate, body).await
}

/// [`load`], each connection sending `keys[connection % keys.len()]` as its bearer key when given.
async fn load_as(
    url: &str,
    connections: usize,
    keys: Option<Arc<Vec<String>>>,
    warmup: f64,
    seconds: f64,
    rate: Option<f64>,
    body: impl Fn(usize, u64) -> String + Send + Sync + 'static,
) -> LoadResult {
    let url = url.to_owned();
    load_calls(
        connections,
        keys,
        warmup,
        seconds,
        rate,
        move |connection, n| Call::Graphql {
            url: url.clone(),
            body: body(connection, n),
        },
    )
    .await
}

/// One request of a load.
enum Call {
    /// A GraphQL POST: it counts when [`body_succeeded`].
    Graphql { url: String, body: String },
    /// A plain GET: it counts when its status is 2xx.
    Get { url: String },
    /// A JSON POST to a REST route: it counts when its status is 2xx.
    Post { url: String, body: String },
}

/// [`load_as`] for any [`Call`]s: `call(connection, n)` makes the n-th request of a connection.
async fn load_calls(
    connections: usize,
    keys: Option<Arc<Vec<String>>>,
    warmup: f64,
    seconds: f64,
    rate: Option<f64>,
    call: impl Fn(usize, u64) -> Call + Send + Sync + 'static,
) -> LoadResult {
    let call = Arc::new(call);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(warmup);
    let until = measure_from + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|connection| {
            let call = call.clone();
            let key = keys
                .as_ref()
                .map(|keys| keys[connection % keys.len()].clone());
            // One client per connection: each task keeps one keep-alive connection of its own.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            tokio::spawn(async move {
                let mut result = LoadResult::default();
                let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
                let mut next_send = start + Duration::from_micros((connection as u64 * 997) % 5000);
                let mut n = 0u64;
                loop {
                    if interval.is_some() {
                        tokio::time::sleep_until(next_send.into()).await;
                    }
                    let scheduled = if interval.is_some() {
                        next_send
                    } else {
                        Instant::now()
                    };
                    if scheduled >= until {
                        break;
                    }
                    let request = call(connection, n);
                    n += 1;
                    let graphql = matches!(request, Call::Graphql { .. });
                    let mut request = match request {
                        Call::Get { url } => client.get(url),
                        Call::Graphql { url, body } | Call::Post { url, body } => client
                            .post(url)
                            .header(reqwest::header::CONTENT_TYPE, "application/json")
                            .body(body),
                    };
                    if let Some(key) = &key {
                        request = request.bearer_auth(key);
                    }
                    let ok = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let body = response.bytes().await.unwrap_or_default();
                            if graphql {
                                body_succeeded(status, &body)
                            } else {
                                (200..300).contains(&status) && !body.is_empty()
                            }
                        }
                        Err(_) => false,
                    };
                    let done = Instant::now();
                    if scheduled >= measure_from {
                        result.requests += 1;
                        if ok {
                            result
                                .latencies
                                .push(done.duration_since(scheduled).as_micros() as u64);
                        } else {
                            result.failures += 1;
                        }
                    }
                    if let Some(interval) = interval {
                        next_send += interval;
                    }
                }
                result
            })
        })
        .collect();
    let mut total = LoadResult {
        seconds,
        ..Default::default()
    };
    for task in tasks {
        let part = task.await.unwrap();
        total.requests += part.requests;
        total.failures += part.failures;
        total.latencies.extend(part.latencies);
    }
    total.requests -= total.failures;
    total.latencies.sort_unstable();
    total
}

/// About 100 bytes of text, different for every message (`push_input` writes the same).
fn text(connection: usize, n: u64) -> String {
    format!(
        "Hello, I am writing about my order number {connection:04}-{n:09}; it has not arrived yet, where is it?"
    )
}

// The load generator writes its request bodies as JSON text directly (every value is plain ASCII without
// quotes or backslashes), and checks responses without building a tree of them: the client shares the
// machine's two cores with the server, and whatever it spends per request the server cannot use.

fn push_body(connection: usize, n: u64) -> String {
    // A new dialog every 20 messages: one push in 20 looks the dialog's decision up in the store.
    let mut body = String::with_capacity(320);
    body.push_str(r#"{"query":"mutation($i: PushMessageInput!) { pushMessage(input: $i) { status } }","variables":{"i":"#);
    push_input(&mut body, connection, n, "push");
    body.push_str("}}");
    body
}

/// Appends one message input (about 100 bytes of text, different for every message) to `body`.
fn push_input(body: &mut String, connection: usize, k: u64, prefix: &str) {
    use std::fmt::Write;
    // The text as `text` writes it, without a String of its own.
    write!(
        body,
        r#"{{"customerId":"customer-{connection}","dialogId":"{prefix}-{connection}-{}","text":"Hello, I am writing about my order number {connection:04}-{k:09}; it has not arrived yet, where is it?","language":"en","messageId":"m{k}"}}"#,
        k / 20,
    )
    .expect("writing to a String");
}

fn push_many_body(
    batch: usize,
    prefix: &'static str,
) -> impl Fn(usize, u64) -> String + Send + Sync {
    move |connection, n| {
        // One buffer for the whole body: the load generator shares the cores with the server.
        let mut body = String::with_capacity(100 + batch * 240);
        body.push_str(r#"{"query":"mutation($i: [PushMessageInput!]!) { pushMessages(inputs: $i) { status } }","variables":{"i":["#);
        for i in 0..batch as u64 {
            if i > 0 {
                body.push(',');
            }
            push_input(&mut body, connection, n * batch as u64 + i, prefix);
        }
        body.push_str("]}}");
        body
    }
}

/// One measured line of the results table.
struct Row {
    name: String,
    value: String,
    target: String,
    met: Option<bool>,
}

fn row(name: &str, value: String, target: &str, met: Option<bool>) -> Row {
    Row {
        name: name.to_owned(),
        value,
        target: target.to_owned(),
        met,
    }
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    post_text(client, url, body.to_string()).await
}

async fn post_text(client: &reqwest::Client, url: &str, body: String) -> Value {
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let value: Value = response.json().await.unwrap();
    assert!(
        succeeded(status, &value),
        "{}",
        value.to_string().chars().take(300).collect::<String>()
    );
    value
}

/// Median latencies, in milliseconds, of `repeat` sequential requests of `a` and of `b`, sent alternately so
/// that a change in the machine's speed meanwhile affects both alike.
async fn median_latencies(
    client: &reqwest::Client,
    url: &str,
    a: &Value,
    b: &Value,
    repeat: usize,
) -> (f64, f64) {
    let mut times = (Vec::with_capacity(repeat), Vec::with_capacity(repeat));
    for _ in 0..repeat {
        for (body, times) in [(a, &mut times.0), (b, &mut times.1)] {
            let started = Instant::now();
            post(client, url, body).await;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    (median(times.0), median(times.1))
}

/// Rounds of interleaved loads: each round runs every scenario once for `seconds / ROUNDS` (after its own
/// warm-up), and each scenario's measurements are summed over the rounds. Ratios between scenarios then
/// compare the same stretches of time, not a fast minute with a slow one.
const ROUNDS: usize = 3;

/// A request body maker: `(connection, n)` to the n-th request body (JSON) of a connection.
type BodyMaker = Arc<dyn Fn(usize, u64) -> String + Send + Sync>;

/// Runs each `(url, body)` load in turn, [`ROUNDS`] times, and sums each one's rounds.
async fn interleaved_loads(
    settings: &Settings,
    scenarios: Vec<(String, BodyMaker)>,
) -> Vec<LoadResult> {
    let mut totals = vec![LoadResult::default(); scenarios.len()];
    for round in 0..ROUNDS {
        for ((url, scenario), total) in scenarios.iter().zip(&mut totals) {
            let scenario = scenario.clone();
            // Each round pushes new messages to new dialogs: its request numbers start further on.
            let offset = round as u64 * 1_000_000_000;
            let part = load(
                url,
                settings.connections,
                settings.warmup / ROUNDS as f64,
                settings.seconds / ROUNDS as f64,
                None,
                move |connection, n| scenario(connection, n + offset),
            )
            .await;
            add(total, part);
        }
    }
    for total in &mut totals {
        total.latencies.sort_unstable();
    }
    totals
}

/// The REST drop-in (issue 12): `POST /data/{customerId}/{dialogId}` against `GET /health` of the same
/// server, in interleaved rounds; the pushes as the GraphQL ones (a new dialog every 20 messages, a
/// `messageId` each).
async fn rest_benchmark(settings: &Settings, rows: &mut Vec<Row>) {
    let (server, _) = Server::start(&settings.binary, None, &[]).await;
    let base = server.base.clone();
    let health = {
        let url = format!("{base}/health");
        move |_: usize, _: u64| Call::Get { url: url.clone() }
    };
    let push = move |connection: usize, n: u64| Call::Post {
        url: format!(
            "{base}/data/customer-{connection}/rest-{connection}-{}",
            n / 20
        ),
        body: format!(
            r#"{{"text":"Hello, I am writing about my order number {connection:04}-{n:09}; it has not arrived yet, where is it?","language":"en","messageId":"m{n}"}}"#
        ),
    };
    let calls: [Arc<dyn Fn(usize, u64) -> Call + Send + Sync>; 2] =
        [Arc::new(health), Arc::new(push)];
    let mut totals = [LoadResult::default(), LoadResult::default()];
    // The service's CPU time per load: how much of the machine each kind of request costs it.
    let mut cpu = [0.0f64; 2];
    for round in 0..ROUNDS {
        for ((call, total), cpu) in calls.iter().zip(&mut totals).zip(&mut cpu) {
            let call = call.clone();
            let offset = round as u64 * 1_000_000_000;
            let cpu_before = server.cpu_seconds();
            let part = load_calls(
                settings.connections,
                None,
                settings.warmup / ROUNDS as f64,
                settings.seconds / ROUNDS as f64,
                None,
                move |connection, n| call(connection, n + offset),
            )
            .await;
            *cpu += server.cpu_seconds() - cpu_before;
            add(total, part);
        }
    }
    for total in &mut totals {
        total.latencies.sort_unstable();
    }
    // Per request, over warm-up and measurement alike (the CPU counter cannot tell them apart).
    let warmup_share = settings.seconds / (settings.seconds + settings.warmup);
    let cpu_per_request =
        |cpu: f64, load: &LoadResult| cpu * warmup_share / load.requests.max(1) as f64 * 1e6;
    let [health, push] = totals;
    let (health_cpu, push_cpu) = (
        cpu_per_request(cpu[0], &health),
        cpu_per_request(cpu[1], &push),
    );
    // The pushes were recorded, not only answered: the buffer holds at least the measured ones.
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let buffered: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("dataapi_buffer_messages "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the buffer gauge in /metrics");
    assert!(
        buffered >= push.requests as f64,
        "{buffered} messages buffered after {} measured pushes",
        push.requests
    );
    let health_summary = format!(
        "{}; service CPU {health_cpu:.1} µs/request",
        health.summary()
    );
    let push_summary = format!("{}; service CPU {push_cpu:.1} µs/request", push.summary());
    println!("  GET /health: {health_summary}");
    println!("  POST /data/{{customerId}}/{{dialogId}}: {push_summary}");
    let ratio = push.throughput() / health.throughput();
    rows.push(row(
        "REST `GET /health` (the ceiling)",
        health_summary,
        "",
        None,
    ));
    rows.push(row(
        "REST `POST /data/{customerId}/{dialogId}`",
        push_summary,
        "",
        None,
    ));
    rows.push(row(
        "REST push / `GET /health` throughput",
        format!("{:.0}%", ratio * 100.0),
        ">= 80%",
        Some(ratio >= 0.8),
    ));
    drop(server);
}

/// Throughput: `{ __typename }`, `pushMessage`, p99 at half load, `pushMessages` x100.
async fn push_benchmarks(settings: &Settings, rows: &mut Vec<Row>) {
    let (server, _) = Server::start(&settings.binary, None, &[]).await;
    let url = server.graphql_url();
    let (c, w, s) = (settings.connections, settings.warmup, settings.seconds);

    let typename_body = |_: usize, _: u64| r#"{"query":"{ __typename }"}"#.to_owned();
    let measured = interleaved_loads(
        settings,
        vec![
            (url.clone(), Arc::new(typename_body)),
            (url.clone(), Arc::new(push_body)),
            (url.clone(), Arc::new(push_many_body(100, "many"))),
        ],
    )
    .await;
    let [typename, push, many] = <[LoadResult; 3]>::try_from(measured).unwrap();
    println!("  {{ __typename }}: {}", typename.summary());
    println!("  pushMessage: {}", push.summary());
    println!("  pushMessages x100: {}", many.summary());
    let half = load(
        &url,
        c,
        w,
        s,
        Some(push.throughput() / 2.0),
        |connection, n| push_body(connection, n + 10_000_000_000),
    )
    .await;
    println!("  pushMessage at half of its peak: {}", half.summary());

    let ratio = push.throughput() / typename.throughput();
    rows.push(row(
        "`{ __typename }` (the ceiling)",
        typename.summary(),
        "",
        None,
    ));
    rows.push(row(
        "`pushMessage`, one per request",
        push.summary(),
        "",
        None,
    ));
    rows.push(row(
        "`pushMessage` / `{ __typename }` throughput",
        format!("{:.0}%", ratio * 100.0),
        ">= 60%",
        Some(ratio >= 0.6),
    ));
    rows.push(row(
        "`pushMessage` p99 at half of its peak load",
        format!("{:.2} ms ({})", half.percentile(0.99), half.summary()),
        "reported",
        None,
    ));
    let many_rate = many.throughput() * 100.0;
    let factor = many_rate / push.throughput();
    rows.push(row(
        "`pushMessages` x100: messages/s",
        format!("{many_rate:.0} msg/s ({})", many.summary()),
        "",
        None,
    ));
    rows.push(row(
        "`pushMessages` x100 / `pushMessage` messages/s",
        format!("{factor:.1}x"),
        ">= 10x",
        Some(factor >= 10.0),
    ));
}

/// `giveConsent` of 20-message dialogs on SQLite, against a plain bulk insert of the same rows.
async fn consent_benchmark(settings: &Settings, rows: &mut Vec<Row>) {
    const DIALOG_LENGTH: usize = 20;
    let dialogs = if settings.seconds < 3.0 { 500 } else { 6_000 };
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("consent.sqlite3");
    let (server, _) = Server::start(&settings.binary, Some(&database), &[]).await;
    let url = server.graphql_url();
    let client = reqwest::Client::new();
    // Buffer the dialogs (not measured): 50 requests of 20 dialogs x 20 messages... in batches of 400.
    let fill = push_many_body(400, "consent");
    let batches = dialogs * DIALOG_LENGTH / 400;
    for n in 0..batches as u64 {
        post_text(&client, &url, fill(0, n)).await;
    }
    // The baseline: the very rows the service stored (read back, not timed), inserted plainly into a fresh
    // database with the same schema, one transaction per round. Consent and baseline alternate in rounds,
    // so that a change in the machine's speed affects both alike.
    let baseline_path = dir.path().join("baseline.sqlite3");
    SqliteStore::open(&baseline_path).await.unwrap();
    let mut baseline = Connection::open(&baseline_path).unwrap();
    baseline
        .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .unwrap();
    let stored = Connection::open(&database).unwrap();
    let (mut consent_time, mut baseline_time, mut copied_rowid) =
        (Duration::ZERO, Duration::ZERO, 0i64);
    for round in 0..ROUNDS {
        let range = dialogs * round / ROUNDS..dialogs * (round + 1) / ROUNDS;
        let started = Instant::now();
        give_consents(&url, settings.connections, range.clone(), DIALOG_LENGTH).await;
        consent_time += started.elapsed();

        let copied = stored_rows_after(&stored, &mut copied_rowid);
        assert_eq!(copied.len(), range.len() * DIALOG_LENGTH);
        let started = Instant::now();
        let tx = baseline.transaction().unwrap();
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO messages (id, dialog_id, customer_id, client_id, text, language, created_at, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .unwrap();
            for ((id, dialog, customer, client, text, language, created_at, seq), _) in &copied {
                insert
                    .execute(params![
                        id, dialog, customer, client, text, language, created_at, seq
                    ])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
        baseline_time += started.elapsed();
    }
    drop(server);
    let total = (dialogs * DIALOG_LENGTH) as f64;
    let consent_rate = total / consent_time.as_secs_f64();
    let baseline_rate = total / baseline_time.as_secs_f64();
    let ratio = consent_rate / baseline_rate;
    println!("  giveConsent: {consent_rate:.0} msg/s; bulk insert: {baseline_rate:.0} rows/s");
    rows.push(row(
        "`giveConsent` (20-message dialogs, SQLite): stored messages/s",
        format!(
            "{consent_rate:.0} msg/s, {} connections",
            settings.connections
        ),
        "",
        None,
    ));
    rows.push(row(
        "plain bulk insert of the same rows, same schema",
        format!("{baseline_rate:.0} rows/s"),
        "",
        None,
    ));
    rows.push(row(
        "`giveConsent` / bulk insert",
        format!("{:.0}%", ratio * 100.0),
        ">= 50%",
        Some(ratio >= 0.5),
    ));
}

/// Gives consent `true` to the buffered dialogs `consent-0-{d}` for `d` in `range`, from `connections`
/// concurrent clients; checks that each stored all its messages.
async fn give_consents(
    url: &str,
    connections: usize,
    range: std::ops::Range<usize>,
    dialog_length: usize,
) {
    let next = Arc::new(AtomicUsize::new(range.start));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let next = next.clone();
            let url = url.to_owned();
            let end = range.end;
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                loop {
                    let d = next.fetch_add(1, Ordering::Relaxed);
                    if d >= end {
                        break;
                    }
                    let body = json!({
                        "query": "mutation($d: ID!) { giveConsent(dialogId: $d, value: true) { storedCount } }",
                        "variables": { "d": format!("consent-0-{d}") },
                    });
                    let value = post(&client, &url, &body).await;
                    assert_eq!(value["data"]["giveConsent"]["storedCount"], dialog_length);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

type StoredRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    i64,
);

/// The rows of `messages` past `rowid`, in the order they were stored; moves `rowid` past them.
fn stored_rows_after(connection: &Connection, rowid: &mut i64) -> Vec<(StoredRow, i64)> {
    let mut select = connection
        .prepare(
            "SELECT id, dialog_id, customer_id, client_id, text, language, created_at, seq, rowid \
             FROM messages WHERE rowid > ?1 ORDER BY rowid",
        )
        .unwrap();
    let rows: Vec<(StoredRow, i64)> = select
        .query_map([*rowid], |r| {
            Ok((
                (
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ),
                r.get(8)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    if let Some((_, last)) = rows.last() {
        *rowid = *last;
    }
    rows
}

const LANGUAGES: [&str; 5] = ["en", "de", "fr", "es", "it"];

/// Writes `dialogs` consented dialogs of `per_dialog` messages straight into a SQLite file with the
/// service's schema; returns the sort keys of the dialogs and of the English messages, newest first.
async fn generate_paging_data(
    path: &Path,
    dialogs: usize,
    per_dialog: usize,
) -> (Vec<SortKey>, Vec<SortKey>) {
    SqliteStore::open(path).await.unwrap();
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut connection = Connection::open(&path).unwrap();
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;")
            .unwrap();
        let tx = connection.transaction().unwrap();
        let mut dialog_keys = Vec::with_capacity(dialogs);
        let mut english_keys = Vec::new();
        {
            let mut message = tx.prepare("INSERT INTO messages (id, dialog_id, customer_id, client_id, text, language, created_at, seq) VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, ?7)").unwrap();
            let mut dialog = tx.prepare("INSERT INTO dialogs (id, customer_id, message_count, first_message_at, last_message_at, consented_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)").unwrap();
            let mut language = tx.prepare("INSERT INTO dialog_languages (dialog_id, language, last_message_at) VALUES (?1, ?2, ?3)").unwrap();
            let mut consent = tx.prepare("INSERT INTO consents (dialog_id, customer_id, value, decided_at) VALUES (?1, ?2, 1, ?3)").unwrap();
            let base_seq = 1_790_000_000_000_000i64;
            // One message every ~31.5 s: a million spread over a year, so that statistics by day have
            // 365 days to group (and the year two clock changes in Europe/Berlin).
            let step = 31_536_000_000_000 / (dialogs * per_dialog).max(1) as i64;
            let mut seq = base_seq;
            for d in 0..dialogs {
                let id = format!("dialog-{d:06}");
                let customer = format!("customer-{}", d % 1000);
                let first_at = seq / 1000;
                let mut used = std::collections::BTreeSet::new();
                for m in 0..per_dialog {
                    seq += step;
                    let lang = LANGUAGES[(d + m) % LANGUAGES.len()];
                    used.insert(lang);
                    let message_id = uuid::Uuid::now_v7().to_string();
                    message
                        .execute(params![message_id, id, customer, text(d, m as u64), lang, seq / 1000, seq])
                        .unwrap();
                    if lang == "en" {
                        english_keys.push(SortKey { at: seq, id: message_id });
                    }
                }
                let last_at = seq / 1000;
                dialog.execute(params![id, customer, per_dialog as i64, first_at, last_at]).unwrap();
                for lang in used {
                    language.execute(params![id, lang, last_at]).unwrap();
                }
                consent.execute(params![id, customer, last_at]).unwrap();
                dialog_keys.push(SortKey { at: last_at, id });
            }
        }
        tx.commit().unwrap();
        connection.execute_batch("ANALYZE;").unwrap();
        dialog_keys.sort();
        dialog_keys.reverse();
        english_keys.sort();
        english_keys.reverse();
        (dialog_keys, english_keys)
    })
    .await
    .unwrap()
}

/// The first page against the page at 90% depth, for `dialogs` (with messages) and `messages` (by language).
async fn paging_benchmark(settings: &Settings, rows: &mut Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("paging.sqlite3");
    let started = Instant::now();
    let (dialog_keys, english_keys) = generate_paging_data(
        &database,
        settings.paging_dialogs,
        settings.paging_messages_per_dialog,
    )
    .await;
    let total_messages = settings.paging_dialogs * settings.paging_messages_per_dialog;
    println!(
        "  generated {} dialogs, {total_messages} messages in {:.1} s",
        settings.paging_dialogs,
        started.elapsed().as_secs_f64()
    );
    let (server, _) = Server::start(&settings.binary, Some(&database), &[]).await;
    let url = server.graphql_url();
    let client = reqwest::Client::new();
    let repeat = if settings.seconds < 3.0 { 10 } else { 30 };

    let dialogs_query = "query($a: String) { dialogs(first: 100, after: $a) { edges { cursor node { id messageCount lastMessageAt messages { text language createdAt } } } pageInfo { hasNextPage } } }";
    let deep_dialog = &dialog_keys[dialog_keys.len() * 9 / 10];
    let deep_cursor = encode_cursor(ListKind::Dialogs, deep_dialog);
    let first = json!({ "query": dialogs_query, "variables": { "a": null } });
    let deep = json!({ "query": dialogs_query, "variables": { "a": deep_cursor } });
    let check = post(&client, &url, &deep).await;
    assert_eq!(
        check["data"]["dialogs"]["edges"].as_array().unwrap().len(),
        100
    );
    let (first_ms, deep_ms) = median_latencies(&client, &url, &first, &deep, repeat).await;

    let messages_query = "query($a: String) { messages(first: 100, after: $a, filter: {language: \"en\"}) { edges { cursor node { id dialogId text createdAt } } pageInfo { hasNextPage } } }";
    let deep_message = &english_keys[english_keys.len() * 9 / 10];
    let first_messages = json!({ "query": messages_query, "variables": { "a": null } });
    let deep_messages = json!({ "query": messages_query, "variables": { "a": encode_cursor(ListKind::Messages, deep_message) } });
    let check = post(&client, &url, &deep_messages).await;
    assert_eq!(
        check["data"]["messages"]["edges"].as_array().unwrap().len(),
        100
    );
    let (first_messages_ms, deep_messages_ms) =
        median_latencies(&client, &url, &first_messages, &deep_messages, repeat).await;
    println!(
        "  dialogs page: first {first_ms:.2} ms, 90% deep {deep_ms:.2} ms; messages page: first {first_messages_ms:.2} ms, deep {deep_messages_ms:.2} ms"
    );

    // Time ranges (issue 11): the middle 80% of the data by time, in both orders; the page at 90% of the
    // range's depth against its first page.
    let millis = |key: &SortKey, micros: bool| if micros { key.at / 1000 } else { key.at };
    let rfc3339 = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let mut ranged = Vec::new();
    for (list, keys, micros) in [
        ("dialogs", &dialog_keys, false),
        ("messages", &english_keys, true),
    ] {
        // Newest first: the range's new end is at 10% of the keys, its old end at 90%.
        let until = millis(&keys[keys.len() / 10], micros);
        let since = millis(&keys[keys.len() * 9 / 10], micros);
        let inside: Vec<&SortKey> = keys
            .iter()
            .filter(|key| (since..until).contains(&millis(key, micros)))
            .collect();
        for order in ["NEWEST_FIRST", "OLDEST_FIRST"] {
            let in_order: Vec<&SortKey> = if order == "NEWEST_FIRST" {
                inside.clone()
            } else {
                inside.iter().rev().copied().collect()
            };
            let (kind, query) = if list == "dialogs" {
                (
                    ListKind::Dialogs,
                    format!(
                        "query($a: String, $s: DateTime, $u: DateTime) {{ dialogs(first: 100, after: $a, order: {order}, filter: {{since: $s, until: $u}}) {{ edges {{ cursor node {{ id messageCount lastMessageAt messages {{ text language createdAt }} }} }} pageInfo {{ hasNextPage }} }} }}"
                    ),
                )
            } else {
                (
                    ListKind::Messages,
                    format!(
                        "query($a: String, $s: DateTime, $u: DateTime) {{ messages(first: 100, after: $a, order: {order}, filter: {{language: \"en\", since: $s, until: $u}}) {{ edges {{ cursor node {{ id dialogId text createdAt }} }} pageInfo {{ hasNextPage }} }} }}"
                    ),
                )
            };
            let deep_key = in_order[in_order.len() * 9 / 10];
            let body = |after: Option<String>| json!({ "query": query, "variables": { "a": after, "s": rfc3339(since), "u": rfc3339(until) } });
            let first = body(None);
            let deep = body(Some(encode_cursor(kind, deep_key)));
            let check = post(&client, &url, &deep).await;
            assert_eq!(
                check["data"][list]["edges"].as_array().unwrap().len(),
                100,
                "{check}"
            );
            let (first_ms, deep_ms) = median_latencies(&client, &url, &first, &deep, repeat).await;
            println!(
                "  {list} in a time range, {order}: first {first_ms:.2} ms, 90% deep {deep_ms:.2} ms"
            );
            ranged.push((list, order, first_ms, deep_ms));
        }
    }

    // Statistics (issue 11): by language and day over every message, against the same GROUP BY written by
    // hand and run on the same file (read-only, outside the service), alternating.
    let stats_query = json!({ "query": "{ stats(groupBy: [LANGUAGE], bucket: DAY) { language bucketStart messageCount dialogCount } }" });
    let berlin_query = json!({ "query": "{ stats(groupBy: [LANGUAGE], bucket: DAY, timeZone: \"Europe/Berlin\") { language bucketStart messageCount dialogCount } }" });
    let hand_written = "SELECT language, date(created_at / 1000, 'unixepoch'), count(*), count(DISTINCT dialog_id) \
                        FROM messages GROUP BY 1, 2 ORDER BY 1, 2";
    let reader = Connection::open_with_flags(
        &database,
        deadpool_sqlite::rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let stats_repeat = if settings.seconds < 3.0 { 3 } else { 7 };
    let (mut service_times, mut sql_times, mut berlin_times) = (Vec::new(), Vec::new(), Vec::new());
    let mut groups = 0;
    for _ in 0..stats_repeat {
        let started = Instant::now();
        let answer = post(&client, &url, &stats_query).await;
        service_times.push(started.elapsed().as_secs_f64() * 1000.0);
        groups = answer["data"]["stats"].as_array().unwrap().len();
        let started = Instant::now();
        let rows: usize = {
            let mut statement = reader.prepare_cached(hand_written).unwrap();
            statement.query_map([], |_| Ok(())).unwrap().count()
        };
        sql_times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(
            rows, groups,
            "the service and the hand-written query agree on the groups"
        );
        let started = Instant::now();
        post(&client, &url, &berlin_query).await;
        berlin_times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let (service_ms, sql_ms, berlin_ms) = (
        median(service_times),
        median(sql_times),
        median(berlin_times),
    );
    println!(
        "  stats by language and day: service {service_ms:.0} ms (Europe/Berlin {berlin_ms:.0} ms), hand-written GROUP BY {sql_ms:.0} ms, {groups} groups"
    );

    // Exports (issue 11): every message, read to the end by a client as fast as it can; the service's
    // resident memory sampled every 20 ms meanwhile.
    let mut exports = Vec::new();
    for format in ["ndjson", "parquet"] {
        let before = server.rss();
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            let pid = server.child.id();
            std::thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    if let Some(rss) = rss_of(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let started = Instant::now();
        let mut response = client
            .get(format!("{}/export/messages.{format}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut bytes = 0usize;
        while let Some(chunk) = response.chunk().await.unwrap() {
            bytes += chunk.len();
        }
        let seconds = started.elapsed().as_secs_f64();
        sampling.store(false, Ordering::Relaxed);
        sampler.join().unwrap();
        let growth = peak.load(Ordering::Relaxed).saturating_sub(before);
        let rate = total_messages as f64 / seconds;
        println!(
            "  export {format}: {total_messages} messages, {} MiB in {seconds:.2} s = {rate:.0} msg/s, RSS +{} MiB",
            bytes >> 20,
            growth >> 20
        );
        exports.push((format, rate, growth, bytes, seconds));
    }

    let label = format!(
        "{} dialogs / {total_messages} messages, SQLite",
        settings.paging_dialogs
    );
    for (format, rate, growth, bytes, seconds) in exports {
        rows.push(row(
            &format!(
                "`GET /export/messages.{format}` of every message, {label}: messages per second"
            ),
            format!("{rate:.0} msg/s ({} MiB in {seconds:.2} s)", bytes >> 20),
            ">= 300000",
            Some(rate >= 300_000.0),
        ));
        rows.push(row(
            "the same export: the service's resident memory growth (peak, sampled every 20 ms)",
            format!("{:.1} MiB", growth as f64 / 1_048_576.0),
            "< 64 MiB",
            Some(growth < 64 << 20),
        ));
    }
    rows.push(row(
        &format!("`stats(groupBy: [LANGUAGE], bucket: DAY)` over every message ({groups} groups), {label}: service / hand-written `GROUP BY` on the same file"),
        format!(
            "{:.2}x ({service_ms:.0} ms / {sql_ms:.0} ms, median of {stats_repeat})",
            service_ms / sql_ms
        ),
        "<= 1.5x",
        Some(service_ms / sql_ms <= 1.5),
    ));
    rows.push(row(
        "the same statistics in `Europe/Berlin` (two clock changes in the year)",
        format!(
            "{berlin_ms:.0} ms ({:.2}x the hand-written UTC query)",
            berlin_ms / sql_ms
        ),
        "reported",
        None,
    ));
    for (list, order, first_ms, deep_ms) in ranged {
        let what = if list == "dialogs" {
            "`dialogs(first: 100)` with messages"
        } else {
            "`messages(first: 100)` by language"
        };
        rows.push(row(
            &format!(
                "{what}, middle 80% by time (`since`/`until`), `{order}`, {label}: page at 90% of the range / first page"
            ),
            format!(
                "{:.2}x ({deep_ms:.2} ms / {first_ms:.2} ms, median of {repeat})",
                deep_ms / first_ms
            ),
            "<= 1.5x",
            Some(deep_ms / first_ms <= 1.5),
        ));
    }
    rows.push(row(
        &format!("`dialogs(first: 100)` with messages, {label}: page at 90% depth / first page"),
        format!(
            "{:.2}x ({deep_ms:.2} ms / {first_ms:.2} ms, median of {repeat})",
            deep_ms / first_ms
        ),
        "<= 1.5x",
        Some(deep_ms / first_ms <= 1.5),
    ));
    rows.push(row(
        &format!("`messages(first: 100)` by language, {label}: page at 90% depth / first page"),
        format!(
            "{:.2}x ({deep_messages_ms:.2} ms / {first_messages_ms:.2} ms, median of {repeat})",
            deep_messages_ms / first_messages_ms
        ),
        "<= 1.5x",
        Some(deep_messages_ms / first_messages_ms <= 1.5),
    ));
}

/// Resident memory the buffer adds for many ~100-byte messages.
async fn memory_benchmark(settings: &Settings, rows: &mut Vec<Row>) {
    let (server, _) = Server::start(&settings.binary, None, &[]).await;
    let url = server.graphql_url();
    let client = reqwest::Client::new();
    let fill = push_many_body(1000, "memory");
    post_text(&client, &url, fill(1, 0)).await;
    let before = server.rss();
    let batches = settings.memory_messages / 1000;
    for n in 0..batches as u64 {
        post_text(&client, &url, fill(0, n)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss();
    let text_bytes = text(0, 0).len() as f64;
    let per_message = (after.saturating_sub(before)) as f64 / (batches * 1000) as f64;
    let ratio = per_message / text_bytes;
    println!("  buffer: {per_message:.0} bytes per message of {text_bytes} text bytes");
    rows.push(row(
        &format!("resident memory added per buffered message ({} messages of {text_bytes} bytes of text)", batches * 1000),
        format!("{per_message:.0} bytes ({ratio:.2}x the text; RSS {} MiB -> {} MiB)", before >> 20, after >> 20),
        "<= 3x",
        Some(ratio <= 3.0),
    ));
}

/// A redis-server of the benchmark's own on a free loopback port, without persistence unless asked: the
/// comparison is between buffers, not disks.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(std::env::var("REDIS_SERVER").unwrap_or("redis-server".into()))
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "no",
                "--dir",
                &dir.path().display().to_string(),
            ])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server, or set REDIS_SERVER)");
        let server = Self {
            child,
            port,
            _dir: dir,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `used_memory` from `INFO memory`: what Redis's allocator holds.
    async fn used_memory(&self) -> u64 {
        let mut connection = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut connection)
            .await
            .unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|value| value.trim().parse().ok())
            .expect("used_memory in INFO memory")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Redis buffer against the in-process one, in the same run: `pushMessage`, `pushMessages` x100 and
/// `giveConsent` of 20-message dialogs on SQLite; and Redis's memory per buffered message.
async fn redis_benchmarks(settings: &Settings, rows: &mut Vec<Row>) {
    let redis = RedisServer::start(&[]);
    let redis_env = [("BUFFER_URL", redis.url())];
    let (in_process, _) = Server::start(&settings.binary, None, &[]).await;
    let (shared, _) = Server::start(&settings.binary, None, &redis_env).await;
    let measured = interleaved_loads(
        settings,
        vec![
            (in_process.graphql_url(), Arc::new(push_body)),
            (shared.graphql_url(), Arc::new(push_body)),
            (shared.graphql_url(), Arc::new(push_many_body(100, "many"))),
        ],
    )
    .await;
    drop((in_process, shared));
    let [memory_push, redis_push, redis_many] = <[LoadResult; 3]>::try_from(measured).unwrap();
    println!(
        "  pushMessage, in-process buffer: {}",
        memory_push.summary()
    );
    println!("  pushMessage, Redis buffer: {}", redis_push.summary());
    println!(
        "  pushMessages x100, Redis buffer: {}",
        redis_many.summary()
    );
    let ratio = redis_push.throughput() / memory_push.throughput();
    rows.push(row(
        "`pushMessage`, in-process buffer (this run's reference)",
        memory_push.summary(),
        "",
        None,
    ));
    rows.push(row(
        "`pushMessage`, Redis buffer (Redis on this machine, no persistence)",
        redis_push.summary(),
        "",
        None,
    ));
    rows.push(row(
        "`pushMessage` Redis / in-process throughput",
        format!("{:.0}%", ratio * 100.0),
        ">= 50%",
        Some(ratio >= 0.5),
    ));
    let many_rate = redis_many.throughput() * 100.0;
    let factor = many_rate / redis_push.throughput();
    rows.push(row(
        "`pushMessages` x100, Redis buffer: messages/s",
        format!("{many_rate:.0} msg/s ({})", redis_many.summary()),
        "",
        None,
    ));
    rows.push(row(
        "`pushMessages` x100 / `pushMessage` messages/s, Redis buffer",
        format!("{factor:.1}x"),
        ">= 10x",
        Some(factor >= 10.0),
    ));

    // Consent: both services on SQLite files of their own, each with the same buffered dialogs; their
    // consents alternate in rounds.
    const DIALOG_LENGTH: usize = 20;
    let dialogs = if settings.seconds < 3.0 { 500 } else { 4_000 };
    let dir = tempfile::tempdir().unwrap();
    let (in_process, _) = Server::start(
        &settings.binary,
        Some(&dir.path().join("memory.sqlite3")),
        &[],
    )
    .await;
    let (shared, _) = Server::start(
        &settings.binary,
        Some(&dir.path().join("redis.sqlite3")),
        &redis_env,
    )
    .await;
    let client = reqwest::Client::new();
    let fill = push_many_body(400, "consent");
    for server in [&in_process, &shared] {
        for n in 0..(dialogs * DIALOG_LENGTH / 400) as u64 {
            post_text(&client, &server.graphql_url(), fill(0, n)).await;
        }
    }
    let (mut memory_time, mut redis_time) = (Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        let range = dialogs * round / ROUNDS..dialogs * (round + 1) / ROUNDS;
        for (server, time) in [(&in_process, &mut memory_time), (&shared, &mut redis_time)] {
            let started = Instant::now();
            give_consents(
                &server.graphql_url(),
                settings.connections,
                range.clone(),
                DIALOG_LENGTH,
            )
            .await;
            *time += started.elapsed();
        }
    }
    drop((in_process, shared));
    let total = (dialogs * DIALOG_LENGTH) as f64;
    let (memory_rate, redis_rate) = (
        total / memory_time.as_secs_f64(),
        total / redis_time.as_secs_f64(),
    );
    let ratio = redis_rate / memory_rate;
    println!("  giveConsent: in-process {memory_rate:.0} msg/s, Redis {redis_rate:.0} msg/s");
    rows.push(row(
        "`giveConsent` (20-message dialogs, SQLite): stored messages/s, in-process / Redis buffer",
        format!("{memory_rate:.0} / {redis_rate:.0} msg/s"),
        "",
        None,
    ));
    rows.push(row(
        "`giveConsent` Redis / in-process",
        format!("{:.0}%", ratio * 100.0),
        ">= 70%",
        Some(ratio >= 0.7),
    ));

    // Memory: what Redis itself holds per buffered message.
    let (shared, _) = Server::start(&settings.binary, None, &redis_env).await;
    let url = shared.graphql_url();
    post_text(&client, &url, fill(1, 0)).await;
    let before = redis.used_memory().await;
    let memory_fill = push_many_body(1000, "memory");
    let batches = settings.memory_messages / 1000;
    for n in 0..batches as u64 {
        post_text(&client, &url, memory_fill(0, n)).await;
    }
    let after = redis.used_memory().await;
    let text_bytes = text(0, 0).len() as f64;
    let per_message = after.saturating_sub(before) as f64 / (batches * 1000) as f64;
    let ratio = per_message / text_bytes;
    println!("  Redis: {per_message:.0} bytes per message of {text_bytes} text bytes");
    rows.push(row(
        &format!(
            "Redis memory per buffered message (`INFO memory`, {} messages of {text_bytes} bytes of text)",
            batches * 1000
        ),
        format!(
            "{per_message:.0} bytes ({ratio:.2}x the text; used_memory {} MiB -> {} MiB)",
            before >> 20,
            after >> 20
        ),
        "<= 3x",
        Some(ratio <= 3.0),
    ));
}

/// `pushMessage` from 16 ingest keys, alone and while one `read` key sends the three attacks of issue 10 as
/// fast as it may (fragment bombs, alias amplification of a long dialog, count storms), in interleaved
/// rounds. Every key is held to 4 requests in flight and 5,000 requests per second (far above what one
/// pusher connection sends, so the pushers' own rate is not what is measured).
async fn attack_benchmark(settings: &Settings, rows: &mut Vec<Row>) {
    use dataapi::auth::{digest, generate_key};
    let pusher_keys: Vec<String> = (0..settings.connections).map(|_| generate_key()).collect();
    let attacker_key = generate_key();
    let entries: Vec<String> = pusher_keys
        .iter()
        .map(|key| format!("ingest:{}", hex::encode(digest(key))))
        .chain([format!("read:{}", hex::encode(digest(&attacker_key)))])
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = Server::start(
        &settings.binary,
        Some(&dir.path().join("attack.sqlite3")),
        &[
            ("API_KEYS", entries.join(",")),
            ("CLIENT_CONCURRENT_REQUESTS", "4".to_owned()),
            // Per key: far above what one pusher connection sends, a bound on what the attacker may.
            ("CLIENT_REQUESTS_PER_SECOND", "5000".to_owned()),
            // The default bound, which fragment bombs are measured against (the harness raises it elsewhere).
            ("MAX_QUERY_COMPLEXITY", "50000".to_owned()),
        ],
    )
    .await;
    let url = server.graphql_url();
    // A long stored dialog (300 messages of 5,000 characters) for the alias storms, and some dialogs to count.
    let client = reqwest::Client::new();
    let setup = |body: Value| {
        let request = client
            .post(&url)
            .bearer_auth(&pusher_keys[0])
            .json(&body)
            .send();
        async move {
            let response: Value = request.await.unwrap().json().await.unwrap();
            assert!(response["errors"].is_null(), "{response}");
        }
    };
    let long_text = "long text ".repeat(500);
    for part in 0..3 {
        let messages: Vec<Value> = (0..100)
            .map(|n| json!({ "customerId": "c", "dialogId": "long", "text": format!("{part}-{n} {long_text}"), "language": "en" }))
            .collect();
        setup(json!({
            "query": "mutation($m: [PushMessageInput!]!) { pushMessages(inputs: $m) { status } }",
            "variables": { "m": messages },
        }))
        .await;
    }
    setup(json!({ "query": "mutation { giveConsent(dialogId: \"long\", value: true) { storedCount } }" })).await;

    let mut bomb = String::from("{ ...F29 } fragment F0 on QueryRoot { __typename }");
    for level in 1..=29 {
        bomb += &format!(
            " fragment F{level} on QueryRoot {{ {} }}",
            format!("...F{} ", level - 1).repeat(4)
        );
    }
    let aliases: String = (0..400)
        .map(|i| format!("a{i}: dialog(id: \"long\") {{ messages {{ text }} }} "))
        .collect();
    let counts: String = (0..3000)
        .map(|i| format!("c{i}: messages(first: 0) {{ totalCount }} "))
        .collect();
    let attacks: Arc<Vec<String>> = Arc::new(
        [bomb, format!("{{ {aliases} }}"), format!("{{ {counts} }}")]
            .into_iter()
            .map(|query| json!({ "query": query }).to_string())
            .collect(),
    );

    let keys = Arc::new(pusher_keys);
    let (mut calm, mut attacked) = (LoadResult::default(), LoadResult::default());
    let mut attack_requests = 0;
    for round in 0..ROUNDS {
        let offset = round as u64 * 1_000_000_000;
        let (warmup, seconds) = (
            settings.warmup / ROUNDS as f64,
            settings.seconds / ROUNDS as f64,
        );
        let part = load_as(
            &url,
            settings.connections,
            Some(keys.clone()),
            warmup,
            seconds,
            None,
            move |c, n| push_body(c, n + offset),
        )
        .await;
        add(&mut calm, part);
        let offset = offset + 500_000_000;
        let attack = attacks.clone();
        let (part, attack) = tokio::join!(
            load_as(
                &url,
                settings.connections,
                Some(keys.clone()),
                warmup,
                seconds,
                None,
                move |c, n| { push_body(c, n + offset) }
            ),
            // Eight connections: four are let in at a time, the others are refused with 429.
            load_as(
                &url,
                8,
                Some(Arc::new(vec![attacker_key.clone()])),
                warmup,
                seconds,
                None,
                move |_, n| { attack[n as usize % attack.len()].clone() }
            ),
        );
        add(&mut attacked, part);
        attack_requests += attack.requests + attack.failures;
    }
    calm.latencies.sort_unstable();
    attacked.latencies.sort_unstable();
    println!("  pushMessage alone: {}", calm.summary());
    println!("  pushMessage under attack: {}", attacked.summary());
    println!("  attack requests sent: {attack_requests}");
    rows.push(row(
        "`pushMessage` from 16 ingest keys, alone",
        calm.summary(),
        "",
        None,
    ));
    rows.push(row(
        &format!(
            "`pushMessage` from 16 ingest keys, while one `read` key attacks ({attack_requests} fragment bombs, \
             alias storms and count storms, 4 in flight at most)"
        ),
        attacked.summary(),
        "",
        None,
    ));
    let throughput = attacked.throughput() / calm.throughput();
    rows.push(row(
        "`pushMessage` throughput under attack / alone",
        format!("{:.0}%", throughput * 100.0),
        ">= 50% (within 2x)",
        Some(throughput >= 0.5),
    ));
    let p99 = attacked.percentile(0.99) / calm.percentile(0.99);
    rows.push(row(
        "`pushMessage` p99 under attack / alone",
        format!(
            "{p99:.2}x ({:.2} ms / {:.2} ms)",
            attacked.percentile(0.99),
            calm.percentile(0.99)
        ),
        "<= 2x",
        Some(p99 <= 2.0),
    ));
}

/// Adds one round's measurements to a total.
fn add(total: &mut LoadResult, part: LoadResult) {
    total.requests += part.requests;
    total.failures += part.failures;
    total.seconds += part.seconds;
    total.latencies.extend(part.latencies);
}

async fn startup_and_size(settings: &Settings, rows: &mut Vec<Row>) {
    let mut times = Vec::new();
    for _ in 0..5 {
        let (_server, startup) = Server::start(&settings.binary, None, &[]).await;
        times.push(startup.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    rows.push(row(
        "startup to the first answered request (embedded store, fresh database)",
        format!("{:.1} ms (median of 5)", times[2]),
        "reported",
        None,
    ));
    let size = std::fs::metadata(&settings.binary).unwrap().len();
    rows.push(row(
        "release binary size",
        format!("{:.1} MiB", size as f64 / (1 << 20) as f64),
        "reported",
        None,
    ));
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

#[tokio::main]
async fn main() {
    let settings = Settings::from_args();
    assert!(
        settings.binary.exists(),
        "{} is missing: run `cargo build --release` (scripts/bench does)",
        settings.binary.display()
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let run = |name: &str| {
        settings
            .only
            .as_deref()
            .is_none_or(|only| name.contains(only))
    };
    if run("push") {
        println!(
            "push throughput ({} connections, {:.0} s each after {:.1} s warm-up)",
            settings.connections, settings.seconds, settings.warmup
        );
        push_benchmarks(&settings, &mut rows).await;
    }
    if run("rest") {
        println!("REST push");
        rest_benchmark(&settings, &mut rows).await;
    }
    if run("consent") {
        println!("consent");
        consent_benchmark(&settings, &mut rows).await;
    }
    if run("paging") {
        println!("paging");
        paging_benchmark(&settings, &mut rows).await;
    }
    if run("memory") {
        println!("memory");
        memory_benchmark(&settings, &mut rows).await;
    }
    if run("redis") {
        println!("redis buffer");
        redis_benchmarks(&settings, &mut rows).await;
    }
    if run("attack") {
        println!("pushes under attack");
        attack_benchmark(&settings, &mut rows).await;
    }
    if run("startup") {
        startup_and_size(&settings, &mut rows).await;
    }

    let mut table =
        String::from("| measurement | result | target | met |\n| --- | --- | --- | --- |\n");
    for r in &rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.name, r.value, r.target, met
        ));
    }
    let header = format!(
        "Run on {} ({}), `{}` connections, {} s per load after {} s warm-up (the three push loads in \
         {ROUNDS} interleaved rounds); the suite took {:.0} s.\n\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        machine(),
        settings.connections,
        settings.seconds,
        settings.warmup,
        started.elapsed().as_secs_f64()
    );
    let report = header + &table;
    println!("\n{report}");
    std::fs::write(&settings.output, &report).unwrap();
    println!("(written to {})", settings.output.display());
}
