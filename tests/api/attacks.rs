//! Requests crafted to stop the service (issue 10), each with parameters of several sizes: every one is
//! refused with a code and a message naming what was measured against which limit, and while the attack is
//! in flight `/health` and a push from another client keep answering; afterwards the process is alive,
//! with its memory within a stated bound.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Backend, BinaryService, TestApp, code, run_with, test_config};

/// Resident memory the service may have after an attack: a fresh one holds about 20 MiB.
const MEMORY_BOUND: u64 = 256 * 1024 * 1024;

/// Fragments that each spread the previous one `branch` times, `depth` levels deep, on `on`, the deepest
/// selecting `leaf`: `branch^depth` selections, in a few hundred bytes.
fn fragment_bomb(branch: usize, depth: usize, on: &str, leaf: &str) -> String {
    let mut fragments = format!("fragment F0 on {on} {{ {leaf} }}");
    for level in 1..=depth {
        let spreads = format!("...F{} ", level - 1).repeat(branch);
        fragments += &format!(" fragment F{level} on {on} {{ {spreads}}}");
    }
    fragments
}

/// Runs `attack` from several tasks for `duration` while another client checks `/health` and pushes
/// messages; returns the attack's responses. Panics if the other client is not served meanwhile.
async fn attack_while_serving(
    service: &BinaryService,
    attack: Value,
    duration: Duration,
) -> Vec<Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let until = tokio::time::Instant::now() + duration;
    let attackers: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, attack) = (client.clone(), service.url("/graphql"), attack.clone());
            tokio::spawn(async move {
                let mut responses = Vec::new();
                while tokio::time::Instant::now() < until {
                    let response = client.post(&url).json(&attack).send().await.unwrap();
                    responses.push(response.json::<Value>().await.unwrap());
                }
                responses
            })
        })
        .collect();
    let mut served = 0;
    while tokio::time::Instant::now() < until {
        // A bound for failure only (the attack used to take seconds to forever), not a timing target.
        let health = tokio::time::timeout(
            Duration::from_secs(10),
            client.get(service.url("/health")).send(),
        )
        .await
        .expect("/health answers during the attack")
        .unwrap();
        assert_eq!(health.status(), 200);
        let push = tokio::time::timeout(
            Duration::from_secs(10),
            client
                .post(service.url("/graphql"))
                .json(&json!({
                    "query": "mutation($d: ID!) { pushMessage(input: {customerId: \"other\", dialogId: $d, \
                              text: \"still here\", language: \"en\"}) { status } }",
                    "variables": { "d": format!("bystander-{served}") },
                }))
                .send(),
        )
        .await
        .expect("a push from another client is served during the attack")
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
        assert_eq!(push["data"]["pushMessage"]["status"], "BUFFERED", "{push}");
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served > 0);
    let mut responses = Vec::new();
    for attacker in attackers {
        responses.extend(attacker.await.unwrap());
    }
    assert!(!responses.is_empty());
    responses
}

fn assert_refused(responses: &[Value], expected: &str, mentions: &[&str]) {
    for response in responses {
        assert!(response["data"].is_null(), "{response}");
        let error = &response["errors"][0];
        assert_eq!(code(error), expected, "{response}");
        let message = error["message"].as_str().unwrap();
        for mention in mentions {
            assert!(message.contains(mention), "`{mention}` in: {message}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_bombs_are_refused_before_anything_walks_them_and_the_service_keeps_serving() {
    // The attack and the bystander share this machine's address: the limits per client are off here
    // (they have tests of their own), so that what is measured is the bombs' cost.
    let mut service = BinaryService::start_with(
        "warn",
        &[
            ("CLIENT_REQUESTS_PER_SECOND", "0"),
            ("CLIENT_CONCURRENT_REQUESTS", "0"),
        ],
    )
    .await;
    let on_dialog = fragment_bomb(4, 20, "Dialog", "id");
    let attacks = [
        // (what, request)
        (
            "4^12, the size that took seconds",
            json!({ "query": format!("{{ ...F12 }} {}", fragment_bomb(4, 12, "QueryRoot", "__typename")) }),
        ),
        (
            "4^29, the size that never finished",
            json!({ "query": format!("{{ ...F29 }} {}", fragment_bomb(4, 29, "QueryRoot", "__typename")) }),
        ),
        (
            "2^60, past 64-bit counts of some engines",
            json!({ "query": format!("{{ ...F60 }} {}", fragment_bomb(2, 60, "QueryRoot", "__typename")) }),
        ),
        (
            "a bomb that no operation spreads (validation still visits it)",
            json!({ "query": format!("{{ __typename }} {}", fragment_bomb(4, 25, "QueryRoot", "__typename")) }),
        ),
        (
            "a bomb in the operation that is not selected",
            json!({
                "query": format!(
                    "query Harmless {{ __typename }} query Bomb {{ ...F25 }} {}",
                    fragment_bomb(4, 25, "QueryRoot", "__typename")
                ),
                "operationName": "Harmless",
            }),
        ),
        (
            "a bomb inside a listing's items",
            json!({ "query": format!("{{ dialogs(first: 1) {{ edges {{ node {{ ...F20 }} }} }} }} {on_dialog}") }),
        ),
        (
            "a bomb in a mutation",
            json!({ "query": format!(
                "mutation {{ pushMessage(input: {{customerId: \"c\", dialogId: \"d\", text: \"t\", language: \"en\"}}) \
                 {{ ...F20 }} }} {}",
                fragment_bomb(4, 20, "PushMessagePayload", "status")
            ) }),
        ),
    ];
    for (what, attack) in attacks {
        let responses = attack_while_serving(&service, attack, Duration::from_millis(600)).await;
        eprintln!("{what}: {} refusals", responses.len());
        assert_refused(
            &responses,
            "QUERY_TOO_COMPLEX",
            &["MAX_QUERY_COMPLEXITY (50000)", "selections"],
        );
        assert!(service.is_alive(), "{what}");
    }
    // Nothing was pushed by the mutation bomb.
    let client = reqwest::Client::new();
    let consent = client
        .post(service.url("/graphql"))
        .json(&json!({ "query": "mutation { giveConsent(dialogId: \"d\", value: false) { storedCount } }" }))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(code(&consent["errors"][0]), "DIALOG_NOT_FOUND", "{consent}");
    // Fragments used as they are meant to be still run: 2^5 spreads, well within the limit.
    let fine = client
        .post(service.url("/graphql"))
        .json(&json!({ "query": format!("{{ ...F5 }} {}", fragment_bomb(2, 5, "QueryRoot", "__typename")) }))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(fine["data"]["__typename"], "QueryRoot", "{fine}");
    let resident = service.resident_bytes();
    assert!(resident < MEMORY_BOUND, "resident memory {resident} bytes");
}

/// Sends raw bytes on a fresh connection and returns what comes back until the server closes it or
/// `wait` passes.
pub(crate) async fn raw_exchange(
    addr: std::net::SocketAddr,
    request: &[u8],
    wait: Duration,
) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    received.extend_from_slice(&chunk[..n]);
                    // One whole response is enough.
                    let text = String::from_utf8_lossy(&received);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|line| {
                                line.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|value| value.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&received).into_owned()
}

async fn body_reading(app: TestApp) {
    let addr: std::net::SocketAddr = app.url("").trim_start_matches("http://").parse().unwrap();
    // A declared length over MAX_BODY_BYTES, and no body at all: refused at once, not after waiting for
    // gigabytes (or for REQUEST_TIMEOUT).
    for length in [
        2 * 1024 * 1024 + 1,
        10_000_000_000u64,
        1_000_000_000_000_000_000,
    ] {
        let request = format!(
            "POST /graphql HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n"
        );
        let response = raw_exchange(addr, request.as_bytes(), Duration::from_secs(10)).await;
        assert!(response.starts_with("HTTP/1.1 413"), "{length}: {response}");
        assert!(response.contains("PAYLOAD_TOO_LARGE"), "{response}");
        // The unread body makes the connection unusable: the client is told not to reuse it.
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{response}"
        );
    }
    // A chunked body that breaks off with a malformed chunk is a bad request, not a large one.
    for broken in [
        "5\r\n{\"que\r\nzz\r\nxx\r\n",
        "ffffffffffffffffffff\r\n",
        "3\r\nabcdef\r\n",
    ] {
        let request = format!(
            "POST /graphql HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n{broken}"
        );
        let response = raw_exchange(addr, request.as_bytes(), Duration::from_secs(10)).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{broken:?}: {response}"
        );
        assert!(!response.contains("PAYLOAD_TOO_LARGE"), "{response}");
    }
    // A chunked body that really is too large is still refused as such.
    let chunk = "x".repeat(64 * 1024);
    let mut request = String::from(
        "POST /graphql HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
    );
    for _ in 0..40 {
        request += &format!("{:x}\r\n{chunk}\r\n", chunk.len());
    }
    let response = raw_exchange(addr, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    // And the service serves on.
    assert_eq!(app.push_status("after-bodies", "fine").await.0, 200);
}

async fn keyless_hosts(app: TestApp) {
    app.push("ada", "kept", "keep me", "en", None).await;
    app.consent("kept", true).await;
    let client = app.http_client();
    let erase =
        json!({ "query": "mutation { eraseCustomer(customerId: \"ada\") { dialogCount } }" });
    // A page on another site made its name resolve to 127.0.0.1: the browser sends its host name.
    for host in [
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "dataapi.internal",
        "",
        "localhost:8000:1",
    ] {
        let response = client
            .post(app.url("/graphql"))
            .header("host", host)
            .json(&erase)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{host}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            code(&body["errors"][0]),
            "HOST_NOT_ALLOWED",
            "{host}: {body}"
        );
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("ALLOWED_HOSTS")
        );
        for path in ["/", "/graphql", "/metrics", "/graphiql/graphiql.min.js"] {
            let page = client
                .get(app.url(path))
                .header("host", host)
                .send()
                .await
                .unwrap();
            assert_eq!(page.status(), 403, "{host} {path}");
        }
        // Probes answer whatever the host: load balancers send their own.
        for path in ["/health", "/ready"] {
            let probe = client
                .get(app.url(path))
                .header("host", host)
                .send()
                .await
                .unwrap();
            assert_eq!(probe.status(), 200, "{host} {path}");
        }
    }
    assert_eq!(app.stored_messages().await, 1, "nothing was erased");
    // This machine's own names are served.
    let port = app.url("").rsplit(':').next().unwrap().to_owned();
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "LocalHost".to_owned(),
    ] {
        let response = client
            .post(app.url("/graphql"))
            .header("host", &host)
            .json(&json!({ "query": "{ dialogs { totalCount } }" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{host}");
    }
}

async fn allowed_hosts_extend_the_loopback_names(app: TestApp) {
    let client = app.http_client();
    let status = |host: &'static str| {
        let request = client
            .post(app.url("/graphql"))
            .header("host", host)
            .json(&json!({ "query": "{ __typename }" }));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("dataapi.internal:8000").await, 200);
    assert_eq!(status("localhost").await, 200);
    assert_eq!(status("api.dataapi.internal").await, 403);
    assert_eq!(status("evil.example").await, 403);
}

async fn with_keys_any_host_is_served(app: TestApp) {
    let key = crate::security::key(dataapi::auth::Role::Read);
    let response = app
        .http_client()
        .post(app.url("/graphql"))
        .header("host", "dataapi.example.com")
        .bearer_auth(key)
        .json(&json!({ "query": "{ dialogs { totalCount } }" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

async fn graphiql_page_security_headers(app: TestApp) {
    let page = app.http_client().get(app.url("/")).send().await.unwrap();
    let header = |name: &str| {
        page.headers()
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let policy = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "script-src 'self' 'sha256-",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    assert!(
        !policy.contains("unsafe-eval") && !policy.contains("script-src 'self' 'unsafe-inline'")
    );
    assert_eq!(header("x-frame-options"), "DENY");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let asset = app
        .http_client()
        .get(app.url("/graphiql/graphiql.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(asset.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused_unread_and_a_broken_one_is_a_bad_request() {
    run_with(Backend::Sqlite, test_config(), body_reading).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_only_loopback_hosts_are_served_dns_rebinding() {
    run_with(Backend::Sqlite, test_config(), keyless_hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hosts_names_more_hosts_for_a_keyless_service() {
    let mut config = test_config();
    config.access.allowed_hosts = dataapi::hosts::AllowedHosts::parse("dataapi.internal").unwrap();
    run_with(
        Backend::Sqlite,
        config,
        allowed_hosts_extend_the_loopback_names,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_the_host_is_not_checked() {
    run_with(
        Backend::Sqlite,
        crate::security::keyed_config(),
        with_keys_any_host_is_served,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graphiql_page_forbids_framing_sniffing_and_foreign_scripts() {
    run_with(
        Backend::Sqlite,
        test_config(),
        graphiql_page_security_headers,
    )
    .await;
}

/// The "Max open files" soft limit of a process, from `/proc/PID/limits`.
fn open_file_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Whether the server closed `stream` (read gives end of file or a reset) within `wait`.
async fn closed_by_server(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A response (hyper may answer 408 before closing): keep reading until the close.
            Ok(Ok(_)) => continue,
        }
    }
}

async fn health_answers(service: &BinaryService) {
    // A bound for failure only: /health waits for a free connection slot at worst.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = client
        .get(service.url("/health"))
        .send()
        .await
        .expect("/health answers");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_and_their_number_is_capped() {
    // This test opens over a thousand sockets itself.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    // The usual limit of a shell: 1024 open files. Before, a thousand idle connections stopped accepting.
    let mut service = BinaryService::start_with_open_files(
        "warn",
        &[("HEADER_READ_TIMEOUT", "1s")],
        Some((1024, 1024)),
    )
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", service.port).parse().unwrap();
    for (idle, slow) in [(100, 10), (1_200, 30)] {
        let mut idle_connections = Vec::new();
        for _ in 0..idle {
            idle_connections.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Slowloris: headers a byte at a time, never finished.
        let trickling: Vec<_> = (0..slow)
            .map(|_| {
                tokio::spawn(async move {
                    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let head = b"POST /graphql HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
                    for byte in head.iter().chain(b"a".repeat(200).iter()) {
                        if stream.write_all(&[*byte]).await.is_err() {
                            return true;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    false
                })
            })
            .collect();
        health_answers(&service).await;
        // Every idle connection is closed by the server (some may still wait in the accept queue).
        let mut closed = 0;
        for stream in &mut idle_connections {
            if closed_by_server(stream, Duration::from_secs(15)).await {
                closed += 1;
            }
        }
        assert_eq!(closed, idle, "idle connections closed by the server");
        for slow in trickling {
            assert!(slow.await.unwrap(), "a trickling client is cut off");
        }
        health_answers(&service).await;
        assert!(service.is_alive());
    }
    // The cap followed the open-file limit: it says so.
    assert!(
        service
            .output()
            .contains("open-file limit allows fewer connections"),
        "{}",
        service.output()
    );
    let resident = service.resident_bytes();
    assert!(resident < MEMORY_BOUND, "resident memory {resident} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_idle_past_the_header_timeout_is_closed() {
    let service = BinaryService::start_with("warn", &[("HEADER_READ_TIMEOUT", "1s")]).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", service.port).parse().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let read = stream.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
    assert!(closed_by_server(&mut stream, Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_is_raised_at_startup_as_far_as_allowed() {
    let service = BinaryService::start_with_open_files(
        "warn",
        &[("MAX_CONNECTIONS", "1000")],
        Some((256, 4096)),
    )
    .await;
    assert_eq!(open_file_limit(service.child.id()), 4096);
    assert!(
        !service
            .output()
            .contains("open-file limit allows fewer connections")
    );
}

/// Every byte of the SQLite files (database, write-ahead log, shared memory) under `dir`.
fn sqlite_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("sqlite3") {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// How the texts are removed, in each scenario.
#[derive(Clone, Copy, Debug)]
enum Removal {
    Withdrawals,
    Erasures,
    Both,
    /// Both, while readers page through the store (a reader's snapshot keeps a checkpoint from finishing).
    BothUnderReads,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_and_withdrawn_texts_leave_the_sqlite_files() {
    for (removal, dialogs) in [
        (Removal::Withdrawals, 60),
        (Removal::Erasures, 60),
        (Removal::Both, 120),
        (Removal::BothUnderReads, 120),
    ] {
        removed_texts_leave_the_disk(removal, dialogs).await;
    }
}

async fn removed_texts_leave_the_disk(removal: Removal, dialogs: usize) {
    let service = BinaryService::start("warn").await;
    let client = reqwest::Client::new();
    let graphql = |query: &'static str, variables: Value| {
        let request = client
            .post(service.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        async move {
            let response: Value = request.send().await.unwrap().json().await.unwrap();
            assert!(response["errors"].is_null(), "{response}");
            response["data"].clone()
        }
    };
    let push = "mutation($m: [PushMessageInput!]!) { pushMessages(inputs: $m) { status } }";
    let consent =
        "mutation($d: ID!, $v: Boolean!) { giveConsent(dialogId: $d, value: $v) { value } }";
    // Sizes: short texts, texts that fill pages, and texts past a page (overflow pages); enough dialogs
    // that pages split and merge as rows come and go.
    let text = |dialog: usize, message: usize| {
        let marker = format!("secret-{dialog:04}-{message:02}-");
        let length = [40, 900, 6_000][(dialog + message) % 3];
        let mut text = marker.repeat(length / marker.len() + 1);
        text.truncate(length);
        text
    };
    for dialog in 0..dialogs {
        let messages: Vec<Value> = (0..8)
            .map(|message| {
                json!({
                    "customerId": format!("customer-{}", dialog % 12),
                    "dialogId": format!("dialog-{dialog}"),
                    "text": text(dialog, message),
                    "language": "en",
                })
            })
            .collect();
        graphql(push, json!({ "m": messages })).await;
        graphql(
            consent,
            json!({ "d": format!("dialog-{dialog}"), "v": true }),
        )
        .await;
    }
    // Readers run until the last removal has answered.
    let removals_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..matches!(removal, Removal::BothUnderReads) as usize * 3)
        .map(|_| {
            let (client, url) = (client.clone(), service.url("/graphql"));
            let done = removals_done.clone();
            tokio::spawn(async move {
                let page =
                    json!({ "query": "{ messages(first: 100) { edges { node { text } } } }" });
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    client.post(&url).json(&page).send().await.unwrap();
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    // Withdraw every fifth dialog, erase customers 3 and 7 (dialogs 3, 15, 27… and 7, 19, 31…).
    let withdrawn =
        |dialog: usize| !matches!(removal, Removal::Erasures) && dialog.is_multiple_of(5);
    let erased = |dialog: usize| {
        !matches!(removal, Removal::Withdrawals) && (dialog % 12 == 3 || dialog % 12 == 7)
    };
    for dialog in (0..dialogs).filter(|dialog| withdrawn(*dialog)) {
        graphql(
            consent,
            json!({ "d": format!("dialog-{dialog}"), "v": false }),
        )
        .await;
    }
    if !matches!(removal, Removal::Withdrawals) {
        for customer in ["customer-3", "customer-7"] {
            graphql(
                "mutation($c: ID!) { eraseCustomer(customerId: $c) { dialogCount } }",
                json!({ "c": customer }),
            )
            .await;
        }
    }
    // Looked at as soon as the last call answered, readers still running.
    let bytes = sqlite_bytes(&service.dir.path().join("data"));
    removals_done.store(true, std::sync::atomic::Ordering::Relaxed);
    for reader in readers {
        assert!(
            reader.await.unwrap() > 0,
            "the readers overlapped the removals"
        );
    }
    let mut found = Vec::new();
    for dialog in 0..dialogs {
        let removed = withdrawn(dialog) || erased(dialog);
        let present = contains(&bytes, &format!("secret-{dialog:04}-"));
        if removed && present {
            found.push(dialog);
        }
        if !removed {
            assert!(
                present,
                "{removal:?}: kept dialog {dialog} is on disk (the search works)"
            );
        }
    }
    assert!(
        found.is_empty(),
        "{removal:?}: removed dialogs still on disk: {found:?}"
    );
    // An erased customer's id is gone too (the audit record keeps a digest).
    if !matches!(removal, Removal::Withdrawals) {
        for customer in ["customer-3", "customer-7"] {
            assert!(
                !contains(&bytes, customer),
                "{removal:?}: {customer} still on disk"
            );
        }
        assert!(contains(&bytes, "customer-4"));
    }
    // Nothing left to retry.
    let metrics = client
        .get(service.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dataapi_store_scrub_pending 0"),
        "{metrics}"
    );
}

pub(crate) fn limited(
    requests_per_second: u32,
    burst: u32,
    concurrent_requests: usize,
) -> dataapi::config::Config {
    let mut config = crate::security::keyed_config();
    config.clients = dataapi::admission::ClientLimits {
        requests_per_second,
        burst,
        concurrent_requests,
    };
    config
}

async fn status_and_retry_after(response: reqwest::Response) -> (u16, Option<u64>, Value) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().parse().unwrap());
    (
        status,
        retry_after,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn rate_per_client(app: TestApp) {
    use dataapi::auth::Role;
    let client = app.http_client();
    let query = json!({ "query": "{ dialogs { totalCount } }" });
    let send = |key: Option<&'static str>| {
        let mut request = client.post(app.url("/graphql")).json(&query);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move { status_and_retry_after(request.send().await.unwrap()).await }
    };
    let reader = crate::security::key(Role::Read);
    let admin = crate::security::key(Role::Admin);
    // Sizes: the burst (20) is served, then the key is held to its rate (5 per second).
    let mut refused = 0;
    let started = std::time::Instant::now();
    for _ in 0..60 {
        let (status, retry_after, body) = send(Some(reader)).await;
        match status {
            200 => {}
            429 => {
                refused += 1;
                assert_eq!(code(&body["errors"][0]), "RATE_LIMITED", "{body}");
                let message = body["errors"][0]["message"].as_str().unwrap();
                assert!(message.contains("CLIENT_REQUESTS_PER_SECOND") && message.contains('5'));
                assert!(retry_after.is_some_and(|seconds| (1..=2).contains(&seconds)));
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // Served: the burst, plus the rate over the time the loop took (however slow this machine is).
    let allowed = 20 + (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        60 - refused <= allowed,
        "held to its rate: {} served, {allowed} allowed",
        60 - refused
    );
    assert!(refused > 0);
    // Another key is another client, and the probes answer.
    assert_eq!(send(Some(admin)).await.0, 200);
    assert_eq!(
        client
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Made-up keys count against the address, not a fresh allowance each: they end in 429, not 401.
    let mut statuses = std::collections::BTreeSet::new();
    for n in 0..60 {
        let response = client
            .post(app.url("/graphql"))
            .bearer_auth(format!("dak_made_up_{n}"))
            .json(&query)
            .send()
            .await
            .unwrap();
        statuses.insert(response.status().as_u16());
    }
    assert_eq!(statuses, [401, 429].into(), "{statuses:?}");
    // After waiting as told, the key is served again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(send(Some(reader)).await.0, 200);
}

async fn concurrency_per_client(app: TestApp) {
    use dataapi::auth::Role;
    // Every store call takes 800 ms: requests stay in flight.
    app.store.set_delay(Duration::from_millis(800));
    let reader = crate::security::key(Role::Read);
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let request = app
                .http_client()
                .post(app.url("/graphql"))
                .bearer_auth(reader)
                .json(&json!({ "query": "{ dialogs { totalCount } }" }))
                .send();
            tokio::spawn(async move { status_and_retry_after(request.await.unwrap()).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        let (status, retry_after, body) = request.await.unwrap();
        if status == 429 {
            assert_eq!(code(&body["errors"][0]), "RATE_LIMITED");
            assert!(
                body["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .contains("CLIENT_CONCURRENT_REQUESTS")
            );
            assert_eq!(retry_after, Some(1));
        }
        statuses.push(status);
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429, 429, 429, 429],
        "3 in flight at most"
    );
    // Once answered, the slots are free again.
    app.store.set_delay(Duration::ZERO);
    let (status, _, _) = status_and_retry_after(
        app.http_client()
            .post(app.url("/graphql"))
            .bearer_auth(reader)
            .json(&json!({ "query": "{ dialogs { totalCount } }" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_with_retry_after_and_others_are_served() {
    run_with(Backend::Sqlite, limited(5, 20, 0), rate_per_client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_requests_in_flight_gets_429_and_others_are_served() {
    run_with(Backend::Sqlite, limited(0, 0, 3), concurrency_per_client).await;
}

/// The store calls a response of `aliases` listings, each with its `totalCount`, was allowed: a refused
/// listing (an error at `[alias]`) never asks for its count; a refused count is an error at
/// `[alias, totalCount]`.
fn calls_used(response: &Value, aliases: usize) -> usize {
    let errors = response["errors"].as_array().map_or(&[][..], Vec::as_slice);
    let refused = |depth: usize| {
        errors
            .iter()
            .filter(|error| error["path"].as_array().map_or(0, Vec::len) == depth)
            .count()
    };
    let listed = aliases - refused(1);
    listed + (listed - refused(2))
}

async fn count_storms(app: TestApp) {
    for i in 0..5 {
        let dialog = format!("storm-{i}");
        app.push("ada", &dialog, "counted text", "en", None).await;
        app.consent(&dialog, true).await;
    }
    let store_calls = |app: &TestApp| {
        let calls = app.store.calls();
        [
            "count_messages",
            "scan_messages",
            "count_dialogs",
            "scan_dialogs",
        ]
        .iter()
        .map(|call| calls.get(call).copied().unwrap_or(0))
        .sum::<usize>()
    };
    // Sizes: just over the allowance (50), ten times it, and a storm.
    for aliases in [30usize, 250, 3_000] {
        app.store.reset_calls();
        let query = format!(
            "{{ {} }}",
            (0..aliases)
                .map(|i| format!("c{i}: messages(first: 0) {{ totalCount }} "))
                .collect::<String>()
        );
        let bystander = format!("bystander-{aliases}");
        let (response, push, health) = tokio::join!(
            app.graphql(&query, json!({})),
            app.push_status(&bystander, "still served"),
            app.http_client().get(app.url("/health")).send(),
        );
        assert_eq!(push.0, 200, "{}", push.1);
        assert_eq!(health.unwrap().status(), 200);
        let errors = response["errors"].as_array().unwrap();
        // Each alias is two calls (the listing, then its count): 50 of them run, the rest are refused.
        assert!(
            errors.len() >= aliases.saturating_sub(50),
            "{aliases} aliases"
        );
        for error in errors {
            assert_eq!(code(error), "STORE_CALLS_EXCEEDED", "{error}");
            let message = error["message"].as_str().unwrap();
            assert!(
                message.contains("MAX_STORE_CALLS") && message.contains("50"),
                "{message}"
            );
        }
        assert!(store_calls(&app) <= 50, "{} store calls", store_calls(&app));
        assert_eq!(
            calls_used(&response, aliases),
            50,
            "the whole allowance, no more: {response}"
        );
    }
    // A batch shares one allowance: 10 operations of 10 counts each.
    app.store.reset_calls();
    let operation = json!({ "query": format!(
        "{{ {} }}",
        (0..10).map(|i| format!("d{i}: dialogs(first: 1) {{ totalCount }} ")).collect::<String>()
    ) });
    let batch = app.post_json(&Value::Array(vec![operation; 10])).await;
    let mut used = 0;
    for response in batch.as_array().unwrap() {
        for error in response["errors"].as_array().into_iter().flatten() {
            assert_eq!(code(error), "STORE_CALLS_EXCEEDED", "{error}");
        }
        used += calls_used(response, 10);
    }
    assert_eq!(used, 50, "the operations of a batch share one allowance");
    assert!(store_calls(&app) <= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_storms_are_held_to_the_store_call_allowance_and_others_are_served() {
    run_with(Backend::Sqlite, test_config(), count_storms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_amplification_of_long_dialogs_is_refused_before_it_is_built() {
    let mut service = BinaryService::start_with(
        "warn",
        &[
            ("CLIENT_REQUESTS_PER_SECOND", "0"),
            ("CLIENT_CONCURRENT_REQUESTS", "0"),
            ("MAX_LOADED_MESSAGES", "1000"),
            ("MAX_RESPONSE_BYTES", "4194304"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let url = service.url("/graphql");
    let post = |body: Value| {
        let request = client.post(&url).json(&body);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    // Three dialogs of 300 messages of 5,000 characters: 4.5 MB of text.
    let text = "long text ".repeat(500);
    for dialog in 0..3 {
        for part in 0..3 {
            let messages: Vec<Value> = (0..100)
                .map(|n| {
                    json!({ "customerId": "ada", "dialogId": format!("long-{dialog}"),
                            "text": format!("{part}-{n} {text}"), "language": "en" })
                })
                .collect();
            let pushed = post(json!({
                "query": "mutation($m: [PushMessageInput!]!) { pushMessages(inputs: $m) { status } }",
                "variables": { "m": messages },
            }))
            .await;
            assert!(pushed["errors"].is_null(), "{pushed}");
        }
        let consent = post(json!({ "query": format!(
            "mutation {{ giveConsent(dialogId: \"long-{dialog}\", value: true) {{ storedCount }} }}"
        ) }))
        .await;
        assert_eq!(
            consent["data"]["giveConsent"]["storedCount"], 300,
            "{consent}"
        );
    }
    let aliases = |count: usize| {
        let fields: String = (0..count)
            .map(|i| {
                format!(
                    "a{i}: dialog(id: \"long-{}\") {{ messages {{ text }} }} ",
                    i % 3
                )
            })
            .collect();
        json!({ "query": format!("{{ {fields} }}") })
    };
    // Sizes: 4 aliases (1,200 messages), 40, and 400 (the attack: 600 MB of answer, once).
    for count in [4, 40, 400] {
        let responses =
            attack_while_serving(&service, aliases(count), Duration::from_millis(500)).await;
        for response in &responses {
            let errors = response["errors"].as_array().unwrap();
            assert!(!errors.is_empty());
            for error in errors {
                // Past 50 aliases, each `dialog` is one store call too many.
                if code(error) == "STORE_CALLS_EXCEEDED" {
                    continue;
                }
                assert_eq!(code(error), "RESPONSE_TOO_LARGE", "{error}");
                // The messages allowance, or (when what it let through is still too long) the bytes.
                let message = error["message"].as_str().unwrap();
                assert!(
                    message.contains("1000 (MAX_LOADED_MESSAGES")
                        || message.contains("MAX_RESPONSE_BYTES (4194304)"),
                    "{message}"
                );
            }
            // What was shown fits the allowance.
            let shown: usize = (0..count)
                .filter_map(|i| response["data"][format!("a{i}")]["messages"].as_array())
                .map(Vec::len)
                .sum();
            assert!(shown <= 1000, "{shown} messages shown");
        }
        assert!(service.is_alive());
    }
    // A page of every dialog with all its messages: more than the allowance in one load.
    let page =
        post(json!({ "query": "{ dialogs(first: 10) { edges { node { messages { text } } } } }" }))
            .await;
    assert_eq!(code(&page["errors"][0]), "RESPONSE_TOO_LARGE", "{page}");
    // The answer's bytes: 900 messages of 5 KB listed flat pass MAX_RESPONSE_BYTES (4 MiB).
    let flat =
        post(json!({ "query": "{ messages(first: 1000) { edges { node { text } } } }" })).await;
    assert!(flat["data"].is_null(), "refused whole");
    let error = &flat["errors"][0];
    assert_eq!(code(error), "RESPONSE_TOO_LARGE", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("MAX_RESPONSE_BYTES (4194304)")
    );
    // Within the limits, the same data is served.
    let one = post(json!({ "query": "{ dialog(id: \"long-1\") { messages { text } } }" })).await;
    assert_eq!(
        one["data"]["dialog"]["messages"].as_array().unwrap().len(),
        300
    );
    let resident = service.resident_bytes();
    assert!(resident < MEMORY_BOUND, "resident memory {resident} bytes");
}

/// Sends SIGHUP to a process (the shell's own `kill`: no extra tool needed).
fn hang_up(pid: u32) {
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("kill -HUP {pid}")])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_from_a_file_on_sighup_and_a_bad_file_changes_nothing() {
    use dataapi::auth::{digest, generate_key};
    let keys_dir = tempfile::tempdir().unwrap();
    let file = keys_dir.path().join("api-keys");
    let (old, new) = (generate_key(), generate_key());
    let entry = |role: &str, key: &str| format!("{role}:{}", hex::encode(digest(key)));
    std::fs::write(
        &file,
        format!("# the reader's key\n{}\n", entry("read", &old)),
    )
    .unwrap();
    let service =
        BinaryService::start_with("info", &[("API_KEYS_FILE", file.to_str().unwrap())]).await;
    let pid = service.child.id();
    let client = reqwest::Client::new();
    let status = |key: &str| {
        let request = client
            .post(service.url("/graphql"))
            .bearer_auth(key)
            .json(&json!({ "query": "{ dialogs { totalCount } }" }));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // Waits (a bound for failure only) until `key` gets `expected`.
    let eventually = |key: String, expected: u16| {
        let status = &status;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while status(&key).await != expected {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never got {expected}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(status(&old).await, 200);
    assert_eq!(status(&new).await, 401);
    // Rotation: both keys, then the new one alone.
    std::fs::write(
        &file,
        format!("{}\n{}\n", entry("read", &old), entry("admin", &new)),
    )
    .unwrap();
    hang_up(pid);
    eventually(new.clone(), 200).await;
    assert_eq!(
        status(&old).await,
        200,
        "the old key stays valid until it is removed"
    );
    std::fs::write(&file, entry("admin", &new)).unwrap();
    hang_up(pid);
    eventually(old.clone(), 401).await;
    assert_eq!(status(&new).await, 200);
    // A file emptied, garbled or removed by mistake (or by an attacker) opens nothing and closes nothing.
    for (n, bad) in [
        "",
        "# all keys commented out\n",
        "admin:not-a-digest",
        "root:00",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(&file, bad).unwrap();
        hang_up(pid);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while service.output().matches("not reloaded").count() < n + 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{bad:?} was not reported"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status(&new).await, 200, "{bad:?}");
        // Never keyless: a request without a key is still refused.
        let anonymous = client
            .post(service.url("/graphql"))
            .json(&json!({ "query": "{ dialogs { totalCount } }" }))
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), 401, "{bad:?}");
    }
    std::fs::remove_file(&file).unwrap();
    for _ in 0..50 {
        hang_up(pid);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status(&new).await,
        200,
        "a storm of SIGHUPs with the file gone changes nothing"
    );
    assert!(!service.output().contains(&new), "keys are never logged");
}

async fn erasure_audit_names_the_key(app: TestApp) {
    use dataapi::auth::{Role, digest};
    let admin = crate::security::key(Role::Admin);
    let ingest = crate::security::key(Role::Ingest);
    let push = json!({ "query": "mutation { pushMessage(input: {customerId: \"zoe\", dialogId: \"z1\", text: \"bye\", language: \"en\"}) { status } }" });
    assert_eq!(app.post_as(Some(ingest), &push).await.0, 200);
    let erase = json!({ "query": "mutation { eraseCustomer(customerId: \"zoe\") { bufferedMessageCount } }" });
    let (status, body) = app.post_as(Some(admin), &erase).await;
    assert_eq!(status, 200, "{body}");
    let records = app.erasure_records().await;
    assert_eq!(records.len(), 1);
    let record = &records[0];
    // The key's id is the start of its configured digest, so an operator can tell which entry it was.
    let id = hex::encode(&digest(admin)[..8]);
    assert_eq!(
        record["erasedBy"],
        format!("admin:{id}").as_str(),
        "{record}"
    );
    assert!(!record.to_string().contains(admin), "never the key");
    assert_eq!(record["digestScheme"], "hmac-sha256");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_record_names_the_key_that_erased_never_the_key_itself() {
    run_with(
        Backend::Sqlite,
        crate::security::keyed_config(),
        erasure_audit_names_the_key,
    )
    .await;
    run_with(
        Backend::Mongo,
        crate::security::keyed_config(),
        erasure_audit_names_the_key,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_audit_secret_replicas_share_one_kept_in_the_database() {
    // Two services on one MongoDB database, no AUDIT_SECRET: the same customer's erasures get the same
    // digest on both, and it is not the plain hash anyone could compute.
    let mut config = test_config();
    config.audit_secret = None;
    let kind = crate::helpers::BufferKind::Redis;
    crate::replicas::with_replicas(2, kind, config, async |replicas: Vec<TestApp>| {
        for (n, replica) in replicas.iter().enumerate() {
            replica
                .push("yan", &format!("y{n}"), "text", "en", None)
                .await;
            replica
                .graphql(
                    "mutation { eraseCustomer(customerId: \"yan\") { dialogCount } }",
                    json!({}),
                )
                .await;
        }
        let records = replicas[0].erasure_records().await;
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0]["customerDigest"], records[1]["customerDigest"]);
        let plain = dataapi::model::customer_digest(
            &dataapi::model::CustomerId::parse("customerId", "yan").unwrap(),
        );
        assert_ne!(records[0]["customerDigest"], plain.as_str());
    })
    .await;
}

/// Operations the service ran on `lane` (`main` or `heavy`) so far.
async fn lane_runs(app: &TestApp, lane: &str) -> u64 {
    let name = format!("dataapi_graphql_lane_operations_total{{lane=\"{lane}\"}}");
    app.metrics_text()
        .await
        .lines()
        .find(|line| line.starts_with(&name))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0, |value| value.parse().unwrap())
}

/// A document that costs more than a light one once (store calls, shown messages, selections, or an
/// allowance it ran into) keeps running on the low-priority heavy lane when it is sent again, however often:
/// repeating an expensive query gives no way back onto the main runtime's threads, which serve the pushes.
/// The background job's pushes and consents, and small reads, run on the main runtime once known.
async fn expensive_documents_stay_on_the_heavy_lane(app: TestApp) {
    for i in 0..3 {
        app.push("ada", &format!("lane-{i}"), "some text", "en", None)
            .await;
        app.consent(&format!("lane-{i}"), true).await;
    }
    let counts = |aliases: usize| {
        let fields: String = (0..aliases)
            .map(|i| format!("c{i}: messages(first: 0) {{ totalCount }} "))
            .collect();
        format!("{{ {fields} }}")
    };
    let many_selections: String = (0..300).map(|i| format!("t{i}: __typename ")).collect();
    // Sizes: just over the light store-call bound, past the request's allowance, and many selections.
    let expensive = [counts(5), counts(60), format!("{{ {many_selections} }}")];
    let cheap = "{ dialogs(first: 2) { edges { node { id messages { text } } } } }";
    for query in expensive.iter().map(String::as_str).chain([cheap]) {
        // The first run of any document is on the heavy lane: it is new.
        let (main, heavy) = (
            lane_runs(&app, "main").await,
            lane_runs(&app, "heavy").await,
        );
        app.post_json(&json!({ "query": query })).await;
        assert_eq!(lane_runs(&app, "heavy").await, heavy + 1, "new: {query}");
        assert_eq!(lane_runs(&app, "main").await, main);
    }
    for round in 0..3 {
        for query in &expensive {
            let (main, heavy) = (
                lane_runs(&app, "main").await,
                lane_runs(&app, "heavy").await,
            );
            let answer = app.post_json(&json!({ "query": query })).await;
            assert!(answer.get("data").is_some(), "{answer}");
            assert_eq!(
                (
                    lane_runs(&app, "main").await,
                    lane_runs(&app, "heavy").await
                ),
                (main, heavy + 1),
                "round {round}, expensive and known: {query}"
            );
        }
        let (main, heavy) = (
            lane_runs(&app, "main").await,
            lane_runs(&app, "heavy").await,
        );
        app.data(cheap, json!({})).await;
        app.push("ada", "lane-0", "more", "en", None).await;
        assert_eq!(
            (
                lane_runs(&app, "main").await,
                lane_runs(&app, "heavy").await
            ),
            (main + 2, heavy),
            "round {round}: a small read and a push run on the main runtime once known"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_expensive_document_keeps_running_on_the_heavy_lane() {
    run_with(
        Backend::Sqlite,
        test_config(),
        expensive_documents_stay_on_the_heavy_lane,
    )
    .await;
}
