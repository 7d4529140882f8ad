//! The REST routes of the system DataAPI replaces (issue 12): the same service, roles and guarantees as
//! GraphQL, errors as RFC 9457 problem details, cursor paging with a `Link` header, and the OpenAPI
//! document that describes them. Over real HTTP, against both stores (and the Redis buffer).

use std::collections::HashSet;

use dataapi::auth::Role;
use reqwest::header::{CONTENT_TYPE, LINK, RETRY_AFTER, WWW_AUTHENTICATE};
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, run_with, test_config};
use crate::security::{key, keyed_config};

/// An answer: status, the headers a test looks at, and the body as JSON (`Null` when it is not JSON).
struct Answer {
    status: u16,
    content_type: String,
    link: Option<String>,
    retry_after: Option<String>,
    www_authenticate: Option<String>,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|value: &reqwest::header::HeaderValue| value.to_str().unwrap().to_owned())
    };
    let (content_type, link, retry_after, www_authenticate) = (
        header(CONTENT_TYPE).unwrap_or_default(),
        header(LINK),
        header(RETRY_AFTER),
        header(WWW_AUTHENTICATE),
    );
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    Answer {
        status,
        content_type,
        link,
        retry_after,
        www_authenticate,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

impl Answer {
    /// Asserts a problem answer (RFC 9457) with this status and code; returns its body.
    fn problem(&self, status: u16, code: &str) -> &Value {
        assert_eq!(
            (self.status, self.body["code"].as_str()),
            (status, Some(code)),
            "{:#}",
            self.body
        );
        assert_eq!(self.content_type, "application/problem+json");
        assert_eq!(self.body["status"], status);
        assert_eq!(self.body["type"], "about:blank");
        assert!(self.body["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(
            self.body["detail"].as_str().is_some_and(|d| d.len() > 20),
            "a detail that says what to do: {}",
            self.body
        );
        &self.body
    }
}

/// `POST /data/{customer}/{dialog}` with a JSON body, the app's key, and extra headers.
async fn push(
    app: &TestApp,
    customer: &str,
    dialog: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = app
        .http_client()
        .post(app.url(&format!("/data/{customer}/{dialog}")))
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(key) = &app.key {
        request = request.bearer_auth(key);
    }
    answer(request.send().await.unwrap()).await
}

async fn consent(app: &TestApp, dialog: &str, body: &str) -> Answer {
    let mut request = app
        .http_client()
        .post(app.url(&format!("/consents/{dialog}")))
        .header(CONTENT_TYPE, "application/json")
        .body(body.to_owned());
    if let Some(key) = &app.key {
        request = request.bearer_auth(key);
    }
    answer(request.send().await.unwrap()).await
}

async fn get(app: &TestApp, path_and_query: &str) -> Answer {
    let mut request = app.http_client().get(app.url(path_and_query));
    if let Some(key) = &app.key {
        request = request.bearer_auth(key);
    }
    answer(request.send().await.unwrap()).await
}

/// The URL of a `Link: <URL>; rel="next"` header.
fn next_link(link: &str) -> &str {
    let (url, relation) = link.split_once(';').expect("<URL>; rel=\"next\"");
    assert_eq!(relation.trim(), "rel=\"next\"");
    url.trim()
        .strip_prefix('<')
        .and_then(|url| url.strip_suffix('>'))
        .expect("<URL>")
}

/// Every page of `GET first`, following the `Link` headers; the messages' ids in order.
async fn all_pages(app: &TestApp, first: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut next = Some(first.to_owned());
    let mut pages = 0;
    while let Some(url) = next {
        pages += 1;
        assert!(pages < 100, "paging does not end");
        let page = get(app, &url).await;
        assert_eq!(page.status, 200, "{url}: {:#}", page.body);
        ids.extend(
            page.body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned()),
        );
        match (&page.link, page.body["nextCursor"].as_str()) {
            (Some(link), Some(cursor)) => {
                let url = next_link(link);
                assert!(url.starts_with("/data/?") && url.contains(cursor), "{url}");
                next = Some(url.to_owned());
            }
            (None, None) => next = None,
            other => panic!("Link and nextCursor disagree: {other:?}"),
        }
    }
    ids
}

async fn push_consent_and_list(app: TestApp) {
    let pushed = push(
        &app,
        "ada",
        "d1",
        json!({"text": "Where is my parcel?", "language": "EN"}),
        &[],
    )
    .await;
    assert_eq!(pushed.status, 201, "{:#}", pushed.body);
    assert_eq!(pushed.content_type, "application/json");
    assert_eq!(pushed.body["status"], "BUFFERED");
    let message = &pushed.body["message"];
    assert_eq!(
        (
            &message["customerId"],
            &message["dialogId"],
            &message["language"],
            &message["messageId"],
        ),
        (&json!("ada"), &json!("d1"), &json!("en"), &Value::Null)
    );
    let created_at = message["createdAt"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(created_at).is_ok() && created_at.ends_with('Z'));

    // Undecided: nothing is stored, so nothing is listed.
    let listed = get(&app, "/data/?customerId=ada").await;
    assert_eq!(listed.status, 200, "{:#}", listed.body);
    assert_eq!(listed.body, json!({"data": [], "nextCursor": null}));
    assert_eq!(listed.link, None);

    // The original API's bare `true`.
    let decided = consent(&app, "d1", "true").await;
    assert_eq!(decided.status, 200, "{:#}", decided.body);
    assert_eq!(decided.body["value"], true);
    assert_eq!(decided.body["storedCount"], 1);
    assert_eq!(decided.body["dialogId"], "d1");
    assert!(decided.body["decidedAt"].as_str().unwrap().ends_with('Z'));

    let later = push(
        &app,
        "ada",
        "d1",
        json!({"text": "Thanks!", "language": "en"}),
        &[],
    )
    .await;
    assert_eq!(later.status, 201);
    assert_eq!(later.body["status"], "STORED");

    let listed = get(&app, "/data?customerId=ada").await;
    let data = listed.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{:#}", listed.body);
    // Most recent first, the same messages as recorded.
    assert_eq!(data[0], later.body["message"]);
    assert_eq!(data[1], pushed.body["message"]);
    // GraphQL reads the same stored messages: one service behind both.
    let graphql = app
        .data(
            "{ messages(filter: {customerId: \"ada\"}) { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        graphql["messages"]["nodes"],
        json!([{"id": data[0]["id"]}, {"id": data[1]["id"]}])
    );

    // Withdrawal in the object form: the stored messages go.
    let withdrawn = consent(&app, "d1", r#"{"value": false}"#).await;
    assert_eq!(withdrawn.status, 200, "{:#}", withdrawn.body);
    assert_eq!(
        (&withdrawn.body["value"], &withdrawn.body["deletedCount"]),
        (&json!(false), &json!(2))
    );
    assert_eq!(app.stored_messages().await, 0);
    let discarded = push(
        &app,
        "ada",
        "d1",
        json!({"text": "x", "language": "en"}),
        &[],
    )
    .await;
    assert_eq!(
        (discarded.status, &discarded.body["status"]),
        (201, &json!("DISCARDED"))
    );
    assert_eq!(
        get(&app, "/data/").await.body,
        json!({"data": [], "nextCursor": null})
    );

    let unknown = consent(&app, "never-pushed", "true").await;
    let problem = unknown.problem(404, "DIALOG_NOT_FOUND");
    assert_eq!(problem["dialogId"], "never-pushed");
    assert_eq!(problem["title"], "Not Found");
}

async fn retries_are_idempotent(app: TestApp) {
    let body = json!({"text": "once", "language": "en"});
    let first = push(
        &app,
        "ada",
        "d1",
        body.clone(),
        &[("Idempotency-Key", "k1")],
    )
    .await;
    let again = push(
        &app,
        "ada",
        "d1",
        body.clone(),
        &[("Idempotency-Key", "\"k1\"")],
    )
    .await;
    assert_eq!((first.status, again.status), (201, 201));
    assert_eq!(first.body, again.body, "a retry answers as the first time");
    assert_eq!(first.body["message"]["messageId"], "k1");
    // The same key in the body, and through GraphQL: still the same message.
    let in_body = push(
        &app,
        "ada",
        "d1",
        json!({"text": "once", "language": "en", "messageId": "k1"}),
        &[],
    )
    .await;
    assert_eq!(in_body.body, first.body);
    let graphql = app.push("ada", "d1", "once", "en", Some("k1")).await;
    assert_eq!(graphql["message"]["id"], first.body["message"]["id"]);

    // The same key for another message, another customer in the dialog, keys that disagree.
    push(
        &app,
        "ada",
        "d1",
        json!({"text": "different", "language": "en"}),
        &[("Idempotency-Key", "k1")],
    )
    .await
    .problem(409, "MESSAGE_ID_CONFLICT");
    push(&app, "bob", "d1", body.clone(), &[])
        .await
        .problem(409, "CUSTOMER_MISMATCH");
    let disagree = push(
        &app,
        "ada",
        "d1",
        json!({"text": "once", "language": "en", "messageId": "k2"}),
        &[("Idempotency-Key", "k1")],
    )
    .await;
    assert_eq!(
        disagree.problem(400, "BAD_USER_INPUT")["field"],
        "messageId"
    );

    assert_eq!(consent(&app, "d1", "true").await.body["storedCount"], 1);
    assert_eq!(app.stored_messages().await, 1);
}

async fn pages_follow_the_link_to_the_end(app: TestApp) {
    let mut expected = Vec::new();
    for n in 0..7 {
        let (customer, dialog, language) = match n % 3 {
            0 => ("ada", "d-ada-1", "en"),
            1 => ("ada", "d-ada-2", "de"),
            _ => ("bob", "d-bob", "en"),
        };
        let pushed = push(
            &app,
            customer,
            dialog,
            json!({"text": format!("message {n}"), "language": language}),
            &[],
        )
        .await;
        assert_eq!(pushed.status, 201);
        expected.push((
            pushed.body["message"]["id"].as_str().unwrap().to_owned(),
            customer,
            language,
        ));
    }
    for dialog in ["d-ada-1", "d-ada-2", "d-bob"] {
        assert_eq!(consent(&app, dialog, "true").await.status, 200);
    }
    expected.reverse();
    let ids = |keep: &dyn Fn(&str, &str) -> bool| -> Vec<String> {
        expected
            .iter()
            .filter(|(_, customer, language)| keep(customer, language))
            .map(|(id, _, _)| id.clone())
            .collect()
    };

    assert_eq!(all_pages(&app, "/data/?limit=3").await, ids(&|_, _| true));
    assert_eq!(all_pages(&app, "/data/?limit=1").await, ids(&|_, _| true));
    // The filters stay in the Link, whatever their case and encoding.
    assert_eq!(
        all_pages(&app, "/data/?language=EN&limit=2").await,
        ids(&|_, language| language == "en")
    );
    assert_eq!(
        all_pages(&app, "/data/?customerId=ada&language=de&limit=1").await,
        ids(&|customer, language| customer == "ada" && language == "de")
    );
    let first = get(&app, "/data/?customerId=ada&limit=2").await;
    assert!(
        next_link(first.link.as_deref().unwrap()).contains("customerId=ada"),
        "{:?}",
        first.link
    );
    // A REST cursor continues GraphQL's `messages`, and the other way round.
    let cursor = first.body["nextCursor"].as_str().unwrap();
    let continued = app
        .data(
            "query($after: String) { messages(filter: {customerId: \"ada\"}, first: 100, after: $after) { nodes { id } } }",
            json!({ "after": cursor }),
        )
        .await;
    let rest_of_ada = ids(&|customer, _| customer == "ada");
    assert_eq!(
        continued["messages"]["nodes"],
        Value::Array(
            rest_of_ada[2..]
                .iter()
                .map(|id| json!({ "id": id }))
                .collect()
        )
    );
    let unique: HashSet<String> = all_pages(&app, "/data/?limit=2")
        .await
        .into_iter()
        .collect();
    assert_eq!(unique.len(), 7);
}

async fn bad_input_is_refused_and_nothing_is_recorded(app: TestApp) {
    let client = app.http_client();
    let good = json!({"text": "hi", "language": "en"});
    let long_id = "x".repeat(129);
    for (customer, dialog, body, field) in [
        (
            "ada",
            "d1",
            json!({"text": " ", "language": "en"}),
            Some("text"),
        ),
        (
            "ada",
            "d1",
            json!({"text": "x".repeat(10_001), "language": "en"}),
            Some("text"),
        ),
        (
            "ada",
            "d1",
            json!({"text": "a\u{0}b", "language": "en"}),
            Some("text"),
        ),
        (
            "ada",
            "d1",
            json!({"text": "hi", "language": "english"}),
            Some("language"),
        ),
        ("ada", "d1", json!({"text": "hi"}), None),
        (
            "ada",
            "d1",
            json!({"text": "hi", "language": "en", "customerId": "bob"}),
            None,
        ),
        ("ada", "d1", json!({"text": 5, "language": "en"}), None),
        ("ada", "d1", json!(["hi", "en"]), None),
        (
            "ada",
            "d1",
            json!({"text": "hi", "language": "en", "messageId": ""}),
            Some("messageId"),
        ),
        (long_id.as_str(), "d1", good.clone(), Some("customerId")),
        ("ada", long_id.as_str(), good.clone(), Some("dialogId")),
        ("%00", "d1", good.clone(), Some("customerId")),
        ("ada", "%20%20", good.clone(), Some("dialogId")),
    ] {
        let refused = push(&app, customer, dialog, body.clone(), &[]).await;
        let problem = refused.problem(400, "BAD_USER_INPUT");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{body}: {problem}");
        }
    }
    // Not valid UTF-8 once decoded.
    push(&app, "%FF", "d1", good.clone(), &[])
        .await
        .problem(400, "BAD_USER_INPUT");
    push(&app, "ada", "d1", good.clone(), &[("Idempotency-Key", "")])
        .await
        .problem(400, "BAD_USER_INPUT");

    // Not JSON: a form or a text/plain body (what a web page can send without a preflight) is refused.
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut request = client.post(app.url("/data/ada/d1")).body(good.to_string());
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        answer(request.send().await.unwrap())
            .await
            .problem(415, "UNSUPPORTED_MEDIA_TYPE");
    }
    let not_json = client
        .post(app.url("/data/ada/d1"))
        .header(CONTENT_TYPE, "application/json")
        .body("{\"text\": ")
        .send()
        .await
        .unwrap();
    answer(not_json).await.problem(400, "BAD_USER_INPUT");
    // Over MAX_BODY_BYTES, declared (refused before a byte of it is read) or streamed in chunks. Raw HTTP:
    // a client still writing the body may see the connection closed under it, as it should be.
    let addr: std::net::SocketAddr = app.url("").trim_start_matches("http://").parse().unwrap();
    let declared =
        "POST /data/ada/d1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                    Content-Length: 10000000000\r\n\r\n"
            .to_owned();
    let chunk = "x".repeat(64 * 1024);
    let mut chunked = String::from(
        "POST /data/ada/d1 HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
    );
    for _ in 0..40 {
        chunked += &format!("{:x}\r\n{chunk}\r\n", chunk.len());
    }
    for request in [declared, chunked] {
        let response = crate::attacks::raw_exchange(
            addr,
            request.as_bytes(),
            std::time::Duration::from_secs(10),
        )
        .await;
        let lower = response.to_ascii_lowercase();
        assert!(response.starts_with("HTTP/1.1 413"), "{response}");
        assert!(
            lower.contains("content-type: application/problem+json")
                && response.contains("\"code\":\"PAYLOAD_TOO_LARGE\""),
            "{response}"
        );
        // The unread body makes the connection unusable: the client is told not to reuse it.
        assert!(lower.contains("connection: close"), "{response}");
    }

    for body in [
        "\"yes\"",
        "1",
        "null",
        "[true]",
        r#"{"value": "true"}"#,
        r#"{"value": true, "dialogId": "d2"}"#,
        r#"{}"#,
        "",
    ] {
        consent(&app, "d1", body)
            .await
            .problem(400, "BAD_USER_INPUT");
    }
    consent(&app, &"d".repeat(129), "true")
        .await
        .problem(400, "BAD_USER_INPUT");

    for (query, field) in [
        ("page=2", "page"),
        ("skip=20&limit=10", "skip"),
        ("offset=20", "offset"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-5", "limit"),
        ("limit=1e3", "limit"),
        ("langauge=en", "query"),
        ("customerId=ada&customerId=bob", "query"),
        ("language=english", "language"),
        ("customerId=", "customerId"),
    ] {
        let refused = get(&app, &format!("/data/?{query}")).await;
        assert_eq!(
            refused.problem(400, "BAD_USER_INPUT")["field"],
            field,
            "{query}"
        );
        if field == "page" || field == "skip" {
            assert!(
                refused.body["detail"]
                    .as_str()
                    .unwrap()
                    .contains("nextCursor")
            );
        }
    }
    let dialogs_cursor = dataapi::paging::encode_cursor(
        dataapi::paging::ListKind::Dialogs,
        &dataapi::paging::SortKey {
            at: 1,
            id: "d".into(),
        },
    );
    for cursor in ["garbage".to_owned(), "x".repeat(5000), dialogs_cursor] {
        let refused = get(&app, &format!("/data/?cursor={cursor}")).await;
        assert_eq!(refused.problem(400, "INVALID_CURSOR")["field"], "cursor");
    }

    // Unknown routes and methods.
    get(&app, "/data/ada/d1/extra")
        .await
        .problem(404, "NOT_FOUND");
    let wrong_method = app
        .http_client()
        .get(app.url("/consents/d1"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.headers()["allow"], "POST");
    answer(wrong_method)
        .await
        .problem(405, "METHOD_NOT_ALLOWED");

    // Nothing of all that was recorded: d1 has no buffered message to decide on.
    consent(&app, "d1", "true")
        .await
        .problem(404, "DIALOG_NOT_FOUND");
    assert_eq!(app.stored_messages().await, 0);
}

async fn an_unavailable_store_is_503_with_retry_after(app: TestApp) {
    app.store.set_down(true);
    for refused in [
        push(
            &app,
            "ada",
            "d1",
            json!({"text": "hi", "language": "en"}),
            &[],
        )
        .await,
        get(&app, "/data/").await,
    ] {
        refused.problem(503, "STORE_UNAVAILABLE");
        assert_eq!(refused.retry_after.as_deref(), Some("5"));
    }
    app.store.set_down(false);
    assert_eq!(
        push(
            &app,
            "ada",
            "d1",
            json!({"text": "hi", "language": "en"}),
            &[]
        )
        .await
        .status,
        201
    );
    assert_eq!(get(&app, "/data/").await.status, 200);
}

// On both stores, and on the Redis buffer (standalone and Cluster) too: the REST shell must not depend on
// which buffer the service has.
for_each_setup!(
    push_consent_and_list,
    retries_are_idempotent,
    pages_follow_the_link_to_the_end,
    bad_input_is_refused_and_nothing_is_recorded,
    an_unavailable_store_is_503_with_retry_after,
);

/// A page whose messages would pass MAX_RESPONSE_BYTES ends early, with a cursor to the rest.
async fn a_page_is_cut_to_the_response_limit(app: TestApp) {
    for n in 0..10 {
        let text = format!("{n}{}", "x".repeat(2_000));
        push(
            &app,
            "ada",
            "d1",
            json!({"text": text, "language": "en"}),
            &[],
        )
        .await;
    }
    consent(&app, "d1", "true").await;
    let first = get(&app, "/data/?limit=10").await;
    let shown = first.body["data"].as_array().unwrap().len();
    assert!(
        (1..10).contains(&shown),
        "8 KiB hold a few of the 2 KB messages, not all: {shown}"
    );
    assert!(first.link.is_some());
    assert_eq!(all_pages(&app, "/data/?limit=10").await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_is_cut_to_max_response_bytes_and_continues() {
    let mut config = test_config();
    config.limits.max_response_bytes = 8 * 1024;
    run_with(Backend::Sqlite, config, a_page_is_cut_to_the_response_limit).await;
}

/// Every route with every role, without a key and with a wrong one; refusals come before the body is read.
async fn roles(mut app: TestApp) {
    let body = json!({"text": "hi", "language": "en"});
    for (key_of, may_push, may_read) in [
        (None, false, false),
        (Some("dak_not-a-key"), false, false),
        (Some(key(Role::Read)), false, true),
        (Some(key(Role::Ingest)), true, false),
        (Some(key(Role::Admin)), true, true),
    ] {
        app.key = key_of.map(str::to_owned);
        let pushed = push(&app, "ada", "d1", body.clone(), &[]).await;
        let listed = get(&app, "/data/").await;
        // A refused caller learns nothing about the input: the key is checked first.
        let garbage = push(&app, "ada", "d1", json!("garbage"), &[]).await;
        let decided = consent(&app, "no-such-dialog", "true").await;
        match key_of {
            None | Some("dak_not-a-key") => {
                for refused in [&pushed, &listed, &garbage, &decided] {
                    refused.problem(401, "UNAUTHENTICATED");
                    assert_eq!(
                        refused.www_authenticate.as_deref(),
                        Some("Bearer realm=\"dataapi\"")
                    );
                }
            }
            _ => {
                if may_push {
                    assert_eq!(pushed.status, 201);
                    garbage.problem(400, "BAD_USER_INPUT");
                    decided.problem(404, "DIALOG_NOT_FOUND");
                } else {
                    let detail = pushed.problem(403, "FORBIDDEN")["detail"].clone();
                    assert!(detail.as_str().unwrap().contains("ingest or admin"));
                    garbage.problem(403, "FORBIDDEN");
                    decided.problem(403, "FORBIDDEN");
                }
                if may_read {
                    assert_eq!(listed.status, 200);
                } else {
                    listed.problem(403, "FORBIDDEN");
                }
            }
        }
    }
    // Two pushes of ingest and admin, both buffered in d1; the refused ones recorded nothing.
    app.key = Some(key(Role::Admin).to_owned());
    assert_eq!(consent(&app, "d1", "true").await.body["storedCount"], 2);
    // The OpenAPI document is public, like the repository's copy.
    app.key = None;
    assert_eq!(get(&app, "/openapi.json").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_needs_its_role_on_sqlite() {
    run_with(Backend::Sqlite, keyed_config(), roles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_needs_its_role_on_mongodb() {
    run_with(Backend::Mongo, keyed_config(), roles).await;
}

async fn limits_and_hosts(app: TestApp) {
    // Keyless: a page that made its own name resolve to 127.0.0.1 gets nothing.
    let response = app
        .http_client()
        .get(app.url("/data/"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    answer(response).await.problem(403, "HOST_NOT_ALLOWED");
    let response = app
        .http_client()
        .post(app.url("/consents/d1"))
        .header("host", "evil.example")
        .header(CONTENT_TYPE, "application/json")
        .body("true")
        .send()
        .await
        .unwrap();
    answer(response).await.problem(403, "HOST_NOT_ALLOWED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_the_rest_routes_answer_only_loopback_hosts() {
    run_with(Backend::Sqlite, test_config(), limits_and_hosts).await;
}

async fn rate_limited(mut app: TestApp) {
    app.key = Some(key(Role::Ingest).to_owned());
    let mut refused = None;
    for n in 0..40 {
        let pushed = push(
            &app,
            "ada",
            "d1",
            json!({"text": format!("m{n}"), "language": "en"}),
            &[],
        )
        .await;
        if pushed.status == 429 {
            refused = Some(pushed);
            break;
        }
        assert_eq!(pushed.status, 201);
    }
    let refused = refused.expect("a client past its burst is refused");
    refused.problem(429, "RATE_LIMITED");
    assert!(
        refused
            .retry_after
            .as_deref()
            .is_some_and(|seconds| seconds.parse::<u64>().is_ok_and(|s| s >= 1))
    );
    // Another key is not held up by this one.
    app.key = Some(key(Role::Read).to_owned());
    assert_eq!(get(&app, "/data/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_a_429_problem_with_retry_after() {
    run_with(
        Backend::Sqlite,
        crate::attacks::limited(2, 5, 0),
        rate_limited,
    )
    .await;
}

fn dataapi() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_dataapi"))
}

#[test]
fn openapi_json_is_the_document_the_code_serves() {
    let output = dataapi()
        .arg("print-openapi")
        .output()
        .expect("run dataapi print-openapi");
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .expect("openapi.json at the repository root");
    assert!(
        printed == committed,
        "openapi.json is stale: regenerate it with `cargo run -- print-openapi > openapi.json`"
    );
}

async fn served_openapi(app: TestApp) {
    let served = app
        .http_client()
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert!(
        served.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(served.text().await.unwrap(), committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_serves_openapi_json() {
    run_with(Backend::Sqlite, test_config(), served_openapi).await;
}

/// openapi.json is valid OpenAPI 3.1, by an independent validator (openapi-spec-validator, installed by
/// scripts/test into .venv-test); a document broken on purpose proves that the check can fail.
#[test]
fn openapi_json_passes_an_openapi_3_1_validator() {
    let python = std::env::var("SECANTUS_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SECANTUS_PYTHON is not set: run the suite with scripts/test, which installs \
             openapi-spec-validator into .venv-test"
        )
    });
    let validate = |path: &std::path::Path| {
        std::process::Command::new(&python)
            .args(["-m", "openapi_spec_validator"])
            .arg(path)
            .output()
            .expect("run openapi-spec-validator")
    };
    let committed = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"));
    let output = validate(committed);
    assert!(
        output.status.success(),
        "openapi.json is not valid OpenAPI: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut broken: Value =
        serde_json::from_str(&std::fs::read_to_string(committed).unwrap()).unwrap();
    broken["paths"]["/data/"]["get"]["responses"]["200"] = json!({ "content": 5 });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.json");
    std::fs::write(&path, broken.to_string()).unwrap();
    assert!(
        !validate(&path).status.success(),
        "the validator accepts a broken document"
    );
}

const DASHBOARD: &str = "https://dash.example.com";

/// With CORS_ALLOWED_ORIGINS, a dashboard page of a listed origin may page through `GET /data/` (and read
/// the `Link` header) and push with an idempotency key; other origins get no permission.
async fn cors_on_the_rest_routes(app: TestApp) {
    let client = app.http_client();
    for (origin, allowed) in [
        (DASHBOARD, true),
        ("https://dash.example.com.evil.com", false),
        ("null", false),
    ] {
        let preflight = client
            .request(reqwest::Method::OPTIONS, app.url("/data/ada/d1"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            )
            .send()
            .await
            .unwrap();
        let granted = preflight
            .headers()
            .get("access-control-allow-origin")
            .map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(granted.as_deref(), allowed.then_some(origin), "{origin}");
        if allowed {
            let headers = preflight.headers()["access-control-allow-headers"]
                .to_str()
                .unwrap()
                .to_ascii_lowercase();
            assert!(headers.contains("idempotency-key"), "{headers}");
        }
    }
    for n in 0..3 {
        push(
            &app,
            "ada",
            "d1",
            json!({"text": format!("m{n}"), "language": "en"}),
            &[],
        )
        .await;
    }
    consent(&app, "d1", "true").await;
    let page = client
        .get(app.url("/data/?limit=1"))
        .header("origin", DASHBOARD)
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["access-control-allow-origin"], DASHBOARD);
    let exposed = page.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("link"), "{exposed}");
    assert!(page.headers().contains_key(LINK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_lets_a_listed_dashboard_use_the_rest_routes() {
    let mut config = test_config();
    config.access.cors_origins = dataapi::cors::AllowedOrigins::parse(DASHBOARD).unwrap();
    run_with(Backend::Sqlite, config, cors_on_the_rest_routes).await;
}
