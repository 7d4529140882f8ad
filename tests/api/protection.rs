//! What protects the service and the customers: request limits, buffer bounds, retention, erasure, audit,
//! timeouts, readiness, metrics and shutdown. Each property is attacked, then the service must still serve.

use std::time::{Duration, Instant};

use dataapi::config::Config;
use dataapi::model::{AuditKey, CustomerId, customer_digest};
use serde_json::{Value, json};

use crate::helpers::{Backend, BinaryService, TestApp, code, run_with, test_config};

const INTROSPECTION: &str = include_str!("introspection.graphql");

pub fn small_limits() -> Config {
    let mut config = test_config();
    config.limits.max_body_bytes = 256 * 1024;
    config.limits.max_batch_operations = 5;
    config
}

/// Posts raw bytes; returns the status and the body as JSON (null if it is not JSON).
async fn post_raw(app: &TestApp, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = app
        .http_client()
        .post(app.url("/graphql"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn still_serving(app: &TestApp) {
    let response = app.graphql("{ __typename }", json!({})).await;
    assert_eq!(response["data"]["__typename"], "QueryRoot", "{response}");
}

pub async fn bad_requests_get_their_documented_error_and_the_service_keeps_serving(app: TestApp) {
    let json_body = |value: Value| value.to_string().into_bytes();
    let nested_fragments = format!(
        "{{ {} __typename {} }}",
        "... on QueryRoot { ".repeat(33),
        "}".repeat(33)
    );
    let deep = format!(
        "{{ __schema {{ types {{ fields {{ type {}{{ name }}{} }} }} }} }}",
        "{ ofType ".repeat(20),
        " }".repeat(20)
    );
    let aliases: String = (0..4000)
        .map(|i| format!("a{i}:dialogs{{totalCount}} "))
        .collect();
    let many: Vec<Value> = (0..6)
        .map(|_| json!({ "query": "{ __typename }" }))
        .collect();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "empty body",
            "application/json",
            Vec::new(),
            400,
            "BAD_REQUEST",
        ),
        (
            "invalid UTF-8",
            "application/json",
            vec![b'{', 0xff, 0xfe, b'}'],
            400,
            "BAD_REQUEST",
        ),
        (
            "not JSON",
            "application/json",
            b"query { x }".to_vec(),
            400,
            "BAD_REQUEST",
        ),
        (
            "query of the wrong type",
            "application/json",
            json_body(json!({ "query": 5 })),
            400,
            "BAD_REQUEST",
        ),
        (
            "wrong content type",
            "text/plain",
            json_body(json!({ "query": "{ __typename }" })),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "form content type",
            "application/x-www-form-urlencoded",
            b"query=x".to_vec(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "body over MAX_BODY_BYTES",
            "application/json",
            json_body(json!({ "query": "{ __typename }", "x": "y".repeat(300_000) })),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "batch over MAX_BATCH_OPERATIONS",
            "application/json",
            json_body(Value::Array(many)),
            400,
            "BATCH_TOO_LARGE",
        ),
        (
            "syntax error",
            "application/json",
            json_body(json!({ "query": "{ dialogs(" })),
            200,
            "GRAPHQL_PARSE_FAILED",
        ),
        (
            "unknown field",
            "application/json",
            json_body(json!({ "query": "{ dialogz { totalCount } }" })),
            200,
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            "unknown argument",
            "application/json",
            json_body(json!({ "query": "{ dialogs(sort: 1) { totalCount } }" })),
            200,
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            "deep nesting",
            "application/json",
            json_body(json!({ "query": deep })),
            200,
            "QUERY_TOO_DEEP",
        ),
        (
            "fragments nested past the engine's bound",
            "application/json",
            json_body(json!({ "query": nested_fragments })),
            200,
            "QUERY_TOO_DEEP",
        ),
        (
            "huge aliases",
            "application/json",
            json_body(json!({ "query": format!("{{ {aliases} }}") })),
            200,
            "QUERY_TOO_COMPLEX",
        ),
        (
            "wrong variable type",
            "application/json",
            json_body(
                json!({ "query": "query($n: Int) { dialogs(first: $n) { totalCount } }", "variables": { "n": "ten" } }),
            ),
            200,
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            "null byte in text",
            "application/json",
            json_body(
                json!({ "query": "mutation($t: String!) { pushMessage(input: {customerId: \"c\", dialogId: \"d\", text: $t, language: \"en\"}) { status } }", "variables": { "t": "a\u{0}b" } }),
            ),
            200,
            "BAD_USER_INPUT",
        ),
        (
            "huge text",
            "application/json",
            json_body(
                json!({ "query": "mutation($t: String!) { pushMessage(input: {customerId: \"c\", dialogId: \"d\", text: $t, language: \"en\"}) { status } }", "variables": { "t": "z".repeat(10_001) } }),
            ),
            200,
            "BAD_USER_INPUT",
        ),
        (
            "huge id",
            "application/json",
            json_body(
                json!({ "query": "mutation($d: ID!) { pushMessage(input: {customerId: \"c\", dialogId: $d, text: \"t\", language: \"en\"}) { status } }", "variables": { "d": "d".repeat(129) } }),
            ),
            200,
            "BAD_USER_INPUT",
        ),
        (
            "malformed cursor",
            "application/json",
            json_body(json!({ "query": "{ dialogs(after: \"%%%\") { totalCount } }" })),
            200,
            "INVALID_CURSOR",
        ),
        (
            "foreign cursor",
            "application/json",
            json_body(
                json!({ "query": "{ messages(before: \"ZGlhbG9ncy52MToxOmE\") { totalCount } }" }),
            ),
            200,
            "INVALID_CURSOR",
        ),
    ];
    for (name, content_type, body, status, expected) in cases {
        let (got, response) = post_raw(&app, content_type, body).await;
        assert_eq!(got, status, "{name}: {response}");
        let errors = response["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {response}"));
        assert_eq!(code(&errors[0]), expected, "{name}: {response}");
        assert!(
            errors[0]["message"].as_str().is_some_and(|m| m.len() > 10),
            "{name}: a message to act on"
        );
        still_serving(&app).await;
    }
    // A real page of 100 dialogs with their messages is well within the limits.
    let page = app
        .graphql(
            "{ dialogs(first: 100) { totalCount edges { cursor node { id customerId languages messageCount
                firstMessageAt lastMessageAt consentedAt messages { id text language createdAt } } }
                pageInfo { hasNextPage endCursor } } }",
            json!({}),
        )
        .await;
    assert!(page["errors"].is_null(), "{page}");
    // GraphiQL's own introspection query stays within the depth and complexity limits.
    let response = app.graphql(INTROSPECTION, json!({})).await;
    assert!(response["errors"].is_null(), "{response}");
    assert!(
        response["data"]["__schema"]["types"]
            .as_array()
            .unwrap()
            .len()
            > 10
    );
    // Nothing was buffered by the refused pushes.
    assert_eq!(app.store.calls().get("record_decision"), None);
    assert_eq!(
        code(&app.consent_error("d", true).await),
        "DIALOG_NOT_FOUND"
    );
}

pub fn tight_buffer() -> Config {
    let mut config = test_config();
    config.buffer.max_messages_per_dialog = 5;
    config.buffer.max_bytes = 6_000;
    config
}

pub async fn a_full_buffer_refuses_with_buffer_full_and_loses_nothing_accepted(app: TestApp) {
    for i in 0..5 {
        assert_eq!(app.push_status("long", &format!("m{i}")).await.0, 200);
    }
    let (status, response) = app.push_status("long", "one too many").await;
    assert_eq!(status, 503, "{response}");
    assert_eq!(code(&response["errors"][0]), "BUFFER_FULL");
    assert!(
        response["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("consent")
    );
    assert_eq!(
        app.consent("long", true).await["storedCount"],
        5,
        "every accepted message is kept"
    );

    // The memory budget: fill it with one-message dialogs until it refuses.
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let dialog = format!("fill-{i}");
        let (status, response) = app.push_status(&dialog, "some text to take room").await;
        if status == 200 {
            accepted.push(dialog);
        } else {
            assert_eq!(status, 503);
            assert_eq!(code(&response["errors"][0]), "BUFFER_FULL");
            refused = Some(dialog);
            break;
        }
    }
    let refused = refused.expect("the budget must refuse at some point");
    assert!(
        accepted.len() >= 3,
        "the budget holds a few messages: {}",
        accepted.len()
    );
    // A refused first message leaves no dialog behind.
    assert_eq!(
        code(&app.consent_error(&refused, false).await),
        "DIALOG_NOT_FOUND"
    );
    // A decision frees room; nothing accepted was dropped meanwhile.
    app.consent(&accepted[0], false).await;
    assert_eq!(app.push_status(&refused, "now it fits").await.0, 200);
    for dialog in &accepted[1..] {
        assert_eq!(app.consent(dialog, true).await["storedCount"], 1);
    }
}

pub async fn push_messages_reports_the_messages_that_did_not_fit_by_index(app: TestApp) {
    let inputs: Vec<Value> = (0..7)
        .map(|i| json!({ "customerId": "c", "dialogId": "crowded", "text": format!("m{i}"), "language": "en" }))
        .collect();
    let (status, response) = app
        .post_as(
            None,
            &json!({ "query": "mutation($i: [PushMessageInput!]!) { pushMessages(inputs: $i) { status } }",
                     "variables": { "i": inputs } }),
        )
        .await;
    assert_eq!(
        status, 200,
        "part succeeded, so no retry-inviting status: {response}"
    );
    let results = response["data"]["pushMessages"].as_array().unwrap();
    assert_eq!(results.len(), 7);
    assert!(results[..5].iter().all(|r| r["status"] == "BUFFERED"));
    assert!(results[5].is_null() && results[6].is_null());
    let errors = response["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2);
    for (error, index) in errors.iter().zip([5, 6]) {
        assert_eq!(code(error), "BUFFER_FULL");
        assert_eq!(error["path"], json!(["pushMessages", index]));
    }
    assert_eq!(app.consent("crowded", true).await["storedCount"], 5);
}

pub fn short_retention() -> Config {
    let mut config = test_config();
    config.buffer.ttl = Duration::from_millis(300);
    config
}

async fn metrics_text(app: &TestApp) -> String {
    app.metrics_text().await
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    metrics_text(app)
        .await
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0.0, |value| value.parse().unwrap())
}

pub async fn undecided_dialogs_expire_after_the_retention_period(app: TestApp) {
    app.push("c", "forgotten", "hello", "en", None).await;
    app.push("c", "forgotten", "anyone?", "en", None).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&app, "dataapi_buffer_expired_dialogs_total").await < 1.0 {
        assert!(Instant::now() < deadline, "the sweeper never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&app, "dataapi_buffer_expired_messages_total").await,
        2.0
    );
    assert_eq!(metric(&app, "dataapi_buffer_messages").await, 0.0);
    assert_eq!(
        code(&app.consent_error("forgotten", true).await),
        "DIALOG_NOT_FOUND"
    );
    assert_eq!(
        app.stored_messages().await,
        0,
        "nothing without consent reached the database"
    );
}

pub async fn erasure_removes_a_customers_data_everywhere_and_leaves_an_audit_record(app: TestApp) {
    app.push("erin", "e1", "stored one", "en", None).await;
    app.push("erin", "e1", "stored two", "en", None).await;
    app.consent("e1", true).await;
    app.push("erin", "e2", "refused", "en", None).await;
    app.consent("e2", false).await;
    app.push("erin", "e3", "still buffered", "en", None).await;
    app.push("olga", "o1", "someone else", "en", None).await;
    app.consent("o1", true).await;

    let erased = app
        .data(
            "mutation { eraseCustomer(customerId: \"erin\") {
                customerId dialogCount messageCount consentCount bufferedMessageCount } }",
            json!({}),
        )
        .await;
    assert_eq!(
        erased["eraseCustomer"],
        json!({ "customerId": "erin", "dialogCount": 1, "messageCount": 2, "consentCount": 2,
                "bufferedMessageCount": 1 })
    );
    let left = app
        .data(
            "{ erin: dialogs(filter: {customerId: \"erin\"}) { totalCount }
               erinMessages: messages(filter: {customerId: \"erin\"}) { totalCount }
               e1: consent(dialogId: \"e1\") { value } e2: consent(dialogId: \"e2\") { value }
               olga: dialogs(filter: {customerId: \"olga\"}) { totalCount } }",
            json!({}),
        )
        .await;
    assert_eq!(
        left,
        json!({ "erin": { "totalCount": 0 }, "erinMessages": { "totalCount": 0 }, "e1": null, "e2": null,
                "olga": { "totalCount": 1 } })
    );
    assert_eq!(
        code(&app.consent_error("e3", true).await),
        "DIALOG_NOT_FOUND",
        "the buffer is erased too"
    );
    assert_eq!(app.stored_messages().await, 1);

    let audit = app.erasure_records().await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let record = audit[0].to_string();
    let erin = CustomerId::parse("customerId", "erin").unwrap();
    // Keyed with the server's secret: the plain hash of the id, which anyone can check guesses against,
    // is not in the record.
    let digest = AuditKey::from_text(crate::helpers::TEST_AUDIT_SECRET).digest(&erin);
    assert_eq!(audit[0]["customerDigest"], digest.as_str(), "{record}");
    assert_eq!(audit[0]["digestScheme"], "hmac-sha256");
    assert_eq!(audit[0]["erasedBy"], "open", "a keyless service");
    assert!(!record.contains(&customer_digest(&erin)), "{record}");
    assert!(
        !record.contains("erin") && !record.contains("stored one"),
        "no erased content: {record}"
    );

    // Later messages of the customer are new data, handled as usual.
    assert_eq!(
        app.push("erin", "e4", "new", "en", None).await["status"],
        "BUFFERED"
    );
}

pub async fn the_consent_query_shows_the_decision_and_its_history(app: TestApp) {
    app.push("cy", "audited", "hi", "en", None).await;
    let first = app.consent("audited", true).await;
    app.consent("audited", true).await;
    app.consent("audited", false).await;
    let last = app.consent("audited", true).await;
    let data = app
        .data(
            "{ consent(dialogId: \"audited\") { dialogId customerId value decidedAt history { value decidedAt } } }",
            json!({}),
        )
        .await;
    let consent = &data["consent"];
    assert_eq!(consent["value"], true);
    assert_eq!(consent["customerId"], "cy");
    assert_eq!(consent["decidedAt"], last["decidedAt"]);
    let history: Vec<bool> = consent["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_bool().unwrap())
        .collect();
    assert_eq!(
        history,
        [true, false, true],
        "a repeated decision is not a change"
    );
    assert_eq!(consent["history"][0]["decidedAt"], first["decidedAt"]);
    let none = app
        .data("{ consent(dialogId: \"undecided\") { value } }", json!({}))
        .await;
    assert!(none["consent"].is_null());
}

pub async fn readiness_follows_the_store(app: TestApp) {
    let client = app.http_client();
    assert_eq!(
        client.get(app.url("/ready")).send().await.unwrap().status(),
        200
    );
    app.store.set_down(true);
    assert_eq!(
        client.get(app.url("/ready")).send().await.unwrap().status(),
        503
    );
    assert_eq!(
        client
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "alive all the same"
    );
    app.store.set_down(false);
    assert_eq!(
        client.get(app.url("/ready")).send().await.unwrap().status(),
        200
    );
}

for_each_store!(
    with super::small_limits();
    bad_requests_get_their_documented_error_and_the_service_keeps_serving,
);

mod buffer_bounds {
    for_each_setup!(
        with super::super::tight_buffer();
        a_full_buffer_refuses_with_buffer_full_and_loses_nothing_accepted,
        push_messages_reports_the_messages_that_did_not_fit_by_index,
    );
    use super::{
        a_full_buffer_refuses_with_buffer_full_and_loses_nothing_accepted,
        push_messages_reports_the_messages_that_did_not_fit_by_index,
    };
}

mod retention {
    for_each_setup!(
        with super::super::short_retention();
        undecided_dialogs_expire_after_the_retention_period,
    );
    use super::undecided_dialogs_expire_after_the_retention_period;
}

mod privacy {
    for_each_setup!(
        erasure_removes_a_customers_data_everywhere_and_leaves_an_audit_record,
        the_consent_query_shows_the_decision_and_its_history,
        readiness_follows_the_store,
    );
    use super::{
        erasure_removes_a_customers_data_everywhere_and_leaves_an_audit_record,
        readiness_follows_the_store, the_consent_query_shows_the_decision_and_its_history,
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_fails_fast_with_store_unavailable() {
    let mut config = test_config();
    config.store_timeout = Duration::from_millis(200);
    run_with(Backend::Sqlite, config, async |app: TestApp| {
        app.store.set_delay(Duration::from_secs(30));
        let started = Instant::now();
        let (status, response) = app.push_status("slow", "hello").await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(status, 503, "{response}");
        assert_eq!(code(&response["errors"][0]), "STORE_UNAVAILABLE");
        app.store.set_delay(Duration::ZERO);
        assert_eq!(app.push_status("slow", "hello").await.0, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_operations_errors_consents_store_calls_and_the_buffer() {
    run_with(Backend::Sqlite, test_config(), async |app: TestApp| {
        app.push("m", "counted", "one", "en", None).await;
        app.push("m", "counted", "two", "en", None).await;
        app.push("m", "waiting", "three", "en", None).await;
        app.consent("counted", true).await;
        app.consent_error("nope", true).await;
        app.data("{ dialogs { totalCount } }", json!({})).await;
        // Clients cannot invent metric labels with made-up field names.
        for i in 0..3 {
            app.graphql(&format!("{{ invented{i} }}"), json!({})).await;
        }
        let text = metrics_text(&app).await;
        for expected in [
            "dataapi_graphql_operations_total{operation=\"pushMessage\"} 3",
            "dataapi_graphql_operations_total{operation=\"giveConsent\"} 2",
            "dataapi_graphql_operations_total{operation=\"dialogs\"} 1",
            "dataapi_graphql_errors_total{code=\"DIALOG_NOT_FOUND\"} 1",
            "dataapi_consents_total{value=\"true\"} 1",
            "dataapi_buffer_dialogs 1",
            "dataapi_buffer_messages 1",
            "dataapi_store_call_duration_seconds_count{call=\"record_decision\"} 1",
            "dataapi_graphql_operation_duration_seconds_count{operation=\"pushMessage\"} 3",
            "dataapi_graphql_operations_total{operation=\"other\"} 3",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(!text.contains("invented"), "{text}");
        assert!(metric(&app, "dataapi_buffer_bytes").await > 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish_and_then_refuses_new_ones() {
    let mut config = test_config();
    config.shutdown_timeout = Duration::from_secs(10);
    run_with(Backend::Sqlite, config, async |mut app: TestApp| {
        app.store.set_delay(Duration::from_millis(700));
        let url = app.url("/graphql");
        let in_flight = tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({ "query": "mutation { pushMessage(input: {customerId: \"c\", dialogId: \"late\", text: \"t\", language: \"en\"}) { status } }" }))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.begin_shutdown();
        let response = in_flight.await.unwrap();
        assert_eq!(response["data"]["pushMessage"]["status"], "BUFFERED", "{response}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = reqwest::Client::new().get(app.url("/health")).send().await;
        assert!(refused.is_err(), "no new connections after shutdown");
    })
    .await;
}

#[tokio::test]
async fn sigterm_stops_the_binary_gracefully_and_says_what_it_drops() {
    let mut service = BinaryService::start("info").await;
    let push = json!({ "query": "mutation { pushMessage(input: {customerId: \"c\", dialogId: \"d\", text: \"t\", language: \"en\"}) { status } }" });
    let response = reqwest::Client::new()
        .post(service.url("/graphql"))
        .json(&push)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let child = &mut service.child;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dataapi did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let output = service.output();
    assert!(output.contains("shutdown signal received"), "{output}");
    assert!(
        output.contains("undecided buffered messages are dropped"),
        "{output}"
    );
    assert!(output.contains("messages=1"), "{output}");
    assert!(output.contains("stopped"), "{output}");
}
