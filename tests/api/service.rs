//! The service as an operator sees it: the binary, its settings, its HTTP surface and its public contract.

use std::process::Command;

use serde_json::json;

use crate::helpers::{Backend, BinaryService, TestApp, code, run};

fn dataapi() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dataapi"))
}

#[test]
fn schema_graphql_is_the_schema_the_code_serves() {
    let output = dataapi()
        .arg("print-schema")
        .output()
        .expect("run dataapi print-schema");
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql"))
        .expect("schema.graphql at the repository root");
    assert!(
        printed == committed,
        "schema.graphql is stale: regenerate it with `cargo run -- print-schema > schema.graphql`"
    );
}

#[test]
fn a_bad_setting_stops_startup_and_names_the_setting() {
    for (name, value) in [
        ("DATABASE_URL", "postgres://user:hunter2@db/x"),
        ("BIND_ADDR", "not-an-address"),
        ("MAX_PAGE_SIZE", "0"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = dataapi()
            .current_dir(dir.path())
            .env_clear()
            .env(name, value)
            .output()
            .expect("run dataapi");
        assert!(!output.status.success(), "{name}={value} must stop startup");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(name), "{name}: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "secrets are never echoed: {stderr}"
        );
    }
}

#[test]
fn without_keys_the_binary_refuses_to_listen_beyond_loopback_unless_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let output = dataapi()
        .current_dir(dir.path())
        .env_clear()
        .env("BIND_ADDR", "0.0.0.0:0")
        .output()
        .expect("run dataapi");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("API_KEYS") && stderr.contains("ALLOW_UNAUTHENTICATED"),
        "{stderr}"
    );

    // With the explicit opt-in it starts (and is stopped right away).
    let mut child = dataapi()
        .current_dir(dir.path())
        .env_clear()
        .env("BIND_ADDR", "0.0.0.0:0")
        .env("ALLOW_UNAUTHENTICATED", "true")
        .env("LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run dataapi");
    let mut first_line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first_line,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first_line.contains("NO API KEYS ARE CONFIGURED"),
        "{first_line}"
    );
}

#[tokio::test]
async fn the_binary_starts_on_the_embedded_store_says_so_and_answers() {
    let service = BinaryService::start("info").await;
    assert!(
        service.dir.path().join("data/dataapi.sqlite3").exists(),
        "the embedded store lives under ./data"
    );
    let startup = service.output();
    assert!(
        startup.contains("embedded SQLite at ./data/dataapi.sqlite3"),
        "{startup}"
    );
    assert!(
        startup.contains("in-process"),
        "names the buffer: {startup}"
    );
    assert!(
        startup.contains(&format!("GraphiQL at http://127.0.0.1:{}/", service.port)),
        "{startup}"
    );
}

async fn http_surface(app: TestApp) {
    let client = reqwest::Client::new();
    let health = client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap(),
        json!({ "status": "ok" })
    );

    for path in ["/", "/graphql"] {
        let page = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(
            html.contains("/graphiql/graphiql.min.js"),
            "{path} serves GraphiQL"
        );
        assert!(
            !html.contains("unpkg") && !html.contains("jsdelivr"),
            "no CDN"
        );
    }
    for asset in [
        "graphiql.min.js",
        "graphiql.min.css",
        "react.production.min.js",
        "react-dom.production.min.js",
    ] {
        let response = client
            .get(app.url(&format!("/graphiql/{asset}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        assert!(response.bytes().await.unwrap().len() > 1000, "{asset}");
    }
    assert_eq!(
        client
            .get(app.url("/graphiql/nope.js"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Not GraphQL at all: still a GraphQL-shaped error with a code.
    for (content_type, body, status, expected_code) in [
        ("application/json", "{not json", 400, "BAD_REQUEST"),
        ("application/json", "\"just a string\"", 400, "BAD_REQUEST"),
        (
            "text/plain",
            "{\"query\": \"{ __typename }\"}",
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
    ] {
        let response = client
            .post(app.url("/graphql"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let got = response.status();
        let body_json: serde_json::Value = response.json().await.unwrap_or(json!(null));
        assert_eq!(got, status, "{content_type} {body}: {body_json}");
        assert_eq!(
            body_json["errors"][0]["extensions"]["code"], expected_code,
            "{body_json}"
        );
    }
    // JSON without an operation in it is an error with a code: an empty batch, or an empty query.
    let empty = app.post_json(&json!([])).await;
    assert_eq!(
        empty["errors"][0]["extensions"]["code"], "BAD_REQUEST",
        "{empty}"
    );
    assert_eq!(
        empty["errors"][0]["message"], "the batch holds no operation",
        "{empty}"
    );
    let empty = app.post_json(&json!({ "query": "" })).await;
    assert_eq!(
        empty["errors"][0]["extensions"]["code"], "GRAPHQL_PARSE_FAILED",
        "{empty}"
    );
    // And the service keeps serving.
    assert_eq!(
        app.data("{ __typename }", json!({})).await,
        json!({ "__typename": "QueryRoot" })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_surface_serves_graphiql_health_and_clear_transport_errors() {
    run(Backend::Sqlite, http_surface).await;
}

/// Runs `dataapi health` with `args` and `BIND_ADDR` (if given); its exit status, output and duration.
async fn health_check(
    args: &[&str],
    bind_addr: Option<String>,
) -> (bool, String, std::time::Duration) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dataapi"));
    command.arg("health").args(args).env_remove("BIND_ADDR");
    if let Some(bind_addr) = bind_addr {
        command.env("BIND_ADDR", bind_addr);
    }
    let started = std::time::Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run dataapi health");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text, started.elapsed())
}

/// A loopback server that accepts connections, reads what the client sends first, answers it with `reply`
/// (nothing at all when empty), then holds the connection open.
async fn fake_server(reply: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                if !reply.is_empty() {
                    let _ = socket.write_all(reply).await;
                }
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            });
        }
    });
    addr
}

/// `dataapi health`, the image's health check: exit status 0 only when `/ready` answers 200, found from
/// `BIND_ADDR` (an unspecified address is asked on loopback) or `--addr`; and it fails, within its bound,
/// against nothing listening, a server that never answers, one that answers garbage, and a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_subcommand_asks_ready_and_fails_within_its_bound_otherwise() {
    let service = BinaryService::start("warn").await;
    let (ok, text, _) = health_check(&[], Some(format!("0.0.0.0:{}", service.port))).await;
    assert!(ok, "{text}");
    assert!(text.starts_with("ready:"), "{text}");
    let (ok, text, _) =
        health_check(&["--addr", &format!("127.0.0.1:{}", service.port)], None).await;
    assert!(ok, "{text}");

    let nobody = format!("127.0.0.1:{}", crate::helpers::free_port());
    let (ok, text, _) = health_check(&["--addr", &nobody], None).await;
    assert!(!ok && text.contains("cannot connect"), "{text}");

    let silent = fake_server(b"").await.to_string();
    let (ok, text, took) = health_check(&["--addr", &silent], None).await;
    assert!(!ok && text.contains("no answer"), "{text}");
    assert!(took < std::time::Duration::from_secs(10), "took {took:?}");

    let garbage = fake_server(b"SSH-2.0-OpenSSH_9.2\r\n").await.to_string();
    let (ok, text, _) = health_check(&["--addr", &garbage], None).await;
    assert!(!ok, "{text}");

    let unready = fake_server(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 23\r\n\r\n{\"status\":\"not ready\"}\n",
    )
    .await
    .to_string();
    let (ok, text, _) = health_check(&["--addr", &unready], None).await;
    assert!(!ok && text.contains("503"), "{text}");

    let (ok, text, _) = health_check(&[], Some("not-an-address".into())).await;
    assert!(!ok && text.contains("BIND_ADDR"), "{text}");
}

/// POSTs `query` with `accept` (none when `None`): status, content type, and the body as JSON.
async fn post_accepting(
    app: &TestApp,
    accept: Option<&str>,
    query: &str,
) -> (u16, String, serde_json::Value) {
    let mut request = app
        .http_client()
        .post(app.url("/graphql"))
        .header("Content-Type", "application/json")
        .body(json!({ "query": query }).to_string());
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.json().await.unwrap())
}

/// GraphQL over HTTP's content negotiation: `application/graphql-response+json` when the client accepts it,
/// with 400 and no `data` entry for a request refused before execution; `application/json` otherwise
/// (also without `Accept`, for older clients), 200 for GraphQL errors; 406 when neither is acceptable.
async fn answers_follow_the_accept_header(app: TestApp) {
    const GRAPHQL: &str = "application/graphql-response+json";
    let broken = "{ dialogs(first: 1) { totalCount ";
    let invalid = "{ dialogs(first: 1) { noSuchField } }";
    let fine = "{ dialogs(first: 1) { totalCount } }";

    for accept in [
        None,
        Some("application/json"),
        Some("*/*"),
        Some(&*format!("{GRAPHQL};q=0, application/json")),
    ] {
        for query in [broken, invalid] {
            let (status, content_type, body) = post_accepting(&app, accept, query).await;
            assert_eq!(status, 200, "{accept:?} {query}: {body}");
            assert!(
                content_type.starts_with("application/json"),
                "{accept:?}: {content_type}"
            );
            assert!(
                body.get("data").is_none(),
                "a request error has no data entry: {body}"
            );
            assert!(!body["errors"][0]["extensions"]["code"].is_null(), "{body}");
        }
        let (status, content_type, body) = post_accepting(&app, accept, fine).await;
        assert_eq!(status, 200);
        assert!(content_type.starts_with("application/json"));
        assert!(body["data"]["dialogs"]["totalCount"].is_number(), "{body}");
    }

    for accept in [
        GRAPHQL,
        &*format!("{GRAPHQL}, application/json"),
        &*format!("application/json;q=0.9, {GRAPHQL}"),
    ] {
        for (query, code) in [
            (broken, "GRAPHQL_PARSE_FAILED"),
            (invalid, "GRAPHQL_VALIDATION_FAILED"),
        ] {
            let (status, content_type, body) = post_accepting(&app, Some(accept), query).await;
            assert_eq!(status, 400, "{accept} {query}: {body}");
            assert!(content_type.starts_with(GRAPHQL), "{content_type}");
            assert!(body.get("data").is_none(), "{body}");
            assert_eq!(body["errors"][0]["extensions"]["code"], code, "{body}");
        }
        let (status, content_type, body) = post_accepting(&app, Some(accept), fine).await;
        assert_eq!(status, 200, "{body}");
        assert!(content_type.starts_with(GRAPHQL));
        assert!(body["data"]["dialogs"]["totalCount"].is_number(), "{body}");
        // A field error happens during execution: 200, with data.
        let (status, _, body) = post_accepting(
            &app,
            Some(accept),
            "{ dialogs(after: \"not-a-cursor\") { totalCount } }",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("data").is_some(), "{body}");
    }

    for accept in [
        "text/html",
        "application/xml",
        &*format!("{GRAPHQL};q=0"),
        "application/json;q=0",
    ] {
        let (status, _, body) = post_accepting(&app, Some(accept), fine).await;
        assert_eq!(status, 406, "{accept}: {body}");
        assert_eq!(body["errors"][0]["extensions"]["code"], "NOT_ACCEPTABLE");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_negotiated_as_graphql_over_http_says() {
    run(Backend::Sqlite, answers_follow_the_accept_header).await;
}

/// GETs `/graphql` with `parameters` (already URL-encoded) and `accept`: status, content type, body.
async fn get_graphql(app: &TestApp, parameters: &str, accept: &str) -> (u16, String, String) {
    let response = app
        .http_client()
        .get(app.url(&format!("/graphql{parameters}")))
        .header("Accept", accept)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let allow = response
        .headers()
        .get("allow")
        .map(|value| value.to_str().unwrap().to_owned());
    let body = response.text().await.unwrap();
    (
        status,
        content_type,
        format!(
            "{}{body}",
            allow.map(|a| format!("allow={a} ")).unwrap_or_default()
        ),
    )
}

fn encoded(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Queries over GET, as GraphQL over HTTP describes: URL-encoded `query`, `operationName` and JSON
/// `variables`; the same media types and statuses as POST. Mutations over GET are refused with 405 and
/// `Allow: POST` and change nothing; variables or extensions that are not a JSON object are 400; a browser
/// asking for HTML still gets GraphiQL, with or without a query in the URL, and so does a GET without one.
async fn queries_run_over_get(app: TestApp) {
    app.push("c", "over-get", "hello", "en", None).await;
    app.consent("over-get", true).await;
    let json = "application/json";
    let query = encoded("query Count($c: ID) { dialogs(filter: {customerId: $c}) { totalCount } }");
    let variables = encoded(r#"{"c": "c"}"#);
    let (status, content_type, body) = get_graphql(
        &app,
        &format!("?query={query}&operationName=Count&variables={variables}"),
        json,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(content_type.starts_with(json), "{content_type}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["data"]["dialogs"]["totalCount"], 1, "{body}");

    let graphql = "application/graphql-response+json";
    let (status, content_type, body) =
        get_graphql(&app, &format!("?query={}", encoded("{ dialogs {")), graphql).await;
    assert_eq!(status, 400, "{body}");
    assert!(content_type.starts_with(graphql));

    let push = encoded(
        r#"mutation { pushMessage(input: {customerId: "c", dialogId: "by-get", text: "no", language: "en"}) { status } }"#,
    );
    for accept in [json, graphql] {
        let (status, _, body) = get_graphql(&app, &format!("?query={push}"), accept).await;
        assert_eq!(status, 405, "{body}");
        assert!(
            body.starts_with("allow=POST ") && body.contains("METHOD_NOT_ALLOWED"),
            "{body}"
        );
    }
    assert_eq!(
        code(&app.consent_error("by-get", true).await),
        "DIALOG_NOT_FOUND",
        "nothing was pushed"
    );

    for (parameters, why) in [
        (
            format!("?query={query}&variables=%7Bnot-json"),
            "variables that are not JSON",
        ),
        (
            format!("?query={query}&variables=%5B1%5D"),
            "variables that are not an object",
        ),
        (
            format!("?query={query}&extensions=%7B"),
            "extensions that are not JSON",
        ),
    ] {
        let (status, _, body) = get_graphql(&app, &parameters, json).await;
        assert_eq!(status, 400, "{why}: {body}");
        assert!(body.contains("BAD_REQUEST"), "{why}: {body}");
    }

    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    let with_query = format!("?query={query}");
    for (parameters, accept) in [("", browser), (&*with_query, browser), ("", json)] {
        let (status, content_type, _) = get_graphql(&app, parameters, accept).await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/html"),
            "{parameters} {accept}: {content_type}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_can_be_sent_with_get_and_mutations_cannot() {
    run(Backend::Sqlite, queries_run_over_get).await;
}

/// The graphql-http project's own server audit (npm `graphql-http`, `auditServer`), run against the service
/// over real HTTP: every MUST and every SHOULD item passes. The MAY items it reports as not followed are
/// the ones README names (400 for invalid parameters under `application/json`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graphql_http_audit_passes_every_must_and_should() {
    run(Backend::Sqlite, |app: TestApp| async move {
        let root = env!("CARGO_MANIFEST_DIR");
        assert!(
            std::path::Path::new(&format!("{root}/tests/browser/node_modules/graphql-http"))
                .exists(),
            "tests/browser/node_modules is missing: run scripts/test, which installs it (npm ci)"
        );
        let script = format!("{root}/tests/browser/graphql-http-audit.mjs");
        let url = app.url("/graphql");
        let output =
            tokio::task::spawn_blocking(move || Command::new("node").arg(script).arg(url).output())
                .await
                .unwrap()
                .expect("node must be installed to run the audit");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "graphql-http audit:\n{stdout}\n{stderr}"
        );
        assert!(stdout.contains(" 0 MUST or SHOULD failed"), "{stdout}");
        assert!(
            !stdout.contains("ERROR") && !stdout.contains("WARN"),
            "{stdout}"
        );
        let audited: usize = stdout
            .split(" items audited")
            .next()
            .and_then(|head| head.rsplit(|c: char| !c.is_ascii_digit()).next())
            .and_then(|count| count.parse().ok())
            .unwrap_or(0);
        assert!(audited >= 50, "the audit ran its items: {stdout}");
    })
    .await;
}
