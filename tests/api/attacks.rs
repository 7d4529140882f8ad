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
    let mut service = BinaryService::start("warn").await;
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
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> String {
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
        json!({ "query": "mutation { eraseCustomer(customerId: \"ada\") { erasedMessages } }" });
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
