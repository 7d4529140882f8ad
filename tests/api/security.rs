//! Who may do what: every operation with every role, missing and wrong keys, and attempts to slip an
//! operation past the check inside a batch or an alias.

use std::sync::OnceLock;

use dataapi::auth::{ApiKeys, Role, digest, generate_key};
use dataapi::config::Config;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, code, run_with, test_config};

/// One key per role, made once for the whole test binary.
fn keys() -> &'static [(Role, String); 3] {
    static KEYS: OnceLock<[(Role, String); 3]> = OnceLock::new();
    KEYS.get_or_init(|| [Role::Ingest, Role::Read, Role::Admin].map(|role| (role, generate_key())))
}

pub fn key(role: Role) -> &'static str {
    &keys().iter().find(|(r, _)| *r == role).unwrap().1
}

pub fn keyed_config() -> Config {
    let entries: Vec<String> = keys()
        .iter()
        .map(|(role, key)| format!("{role}:{}", hex::encode(digest(key))))
        .collect();
    let mut config = test_config();
    config.access.api_keys = ApiKeys::parse(&entries.join(",")).unwrap();
    config
}

/// (operation, GraphQL document, the roles that may run it)
const OPERATIONS: &[(&str, &str, &[Role])] = &[
    (
        "pushMessage",
        r#"mutation { pushMessage(input: {customerId: "c", dialogId: "auth", text: "t", language: "en"}) { status } }"#,
        &[Role::Ingest, Role::Admin],
    ),
    (
        "pushMessages",
        r#"mutation { pushMessages(inputs: [{customerId: "c", dialogId: "auth", text: "t", language: "en"}]) { status } }"#,
        &[Role::Ingest, Role::Admin],
    ),
    (
        "giveConsent",
        r#"mutation { giveConsent(dialogId: "never-pushed", value: true) { value } }"#,
        &[Role::Ingest, Role::Admin],
    ),
    (
        "dialogs",
        "{ dialogs { totalCount } }",
        &[Role::Read, Role::Admin],
    ),
    (
        "dialog",
        r#"{ dialog(id: "x") { id } }"#,
        &[Role::Read, Role::Admin],
    ),
    (
        "messages",
        "{ messages { totalCount } }",
        &[Role::Read, Role::Admin],
    ),
    (
        "stats",
        "{ stats(groupBy: [LANGUAGE], bucket: DAY) { messageCount } }",
        &[Role::Read, Role::Admin],
    ),
    (
        "consentStats",
        "{ consentStats { granted } }",
        &[Role::Read, Role::Admin],
    ),
    (
        "consent",
        r#"{ consent(dialogId: "x") { value } }"#,
        &[Role::Read, Role::Admin],
    ),
    (
        "changes",
        "{ changes { token } }",
        &[Role::Read, Role::Admin],
    ),
    (
        "eraseCustomer",
        r#"mutation { eraseCustomer(customerId: "nobody") { messageCount } }"#,
        &[Role::Admin],
    ),
];

fn codes(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|errors| errors.iter().map(|e| code(e).to_owned()).collect())
        .unwrap_or_default()
}

pub async fn every_operation_with_every_role_missing_and_wrong_keys(app: TestApp) {
    let wrong = "dak_this-is-not-a-configured-key";
    for (operation, document, allowed) in OPERATIONS {
        let body = json!({ "query": document });
        for presented in [None, Some(wrong), Some("")] {
            let (status, response) = app.post_as(presented, &body).await;
            assert_eq!(status, 401, "{operation} with {presented:?}: {response}");
            assert_eq!(codes(&response), ["UNAUTHENTICATED"], "{operation}");
            assert!(
                !response.to_string().contains(wrong),
                "a key is never echoed"
            );
        }
        for role in [Role::Ingest, Role::Read, Role::Admin] {
            let (status, response) = app.post_as(Some(key(role)), &body).await;
            let codes = codes(&response);
            if allowed.contains(&role) {
                assert_eq!(status, 200, "{operation} as {role}: {response}");
                assert!(
                    !codes
                        .iter()
                        .any(|c| c == "FORBIDDEN" || c == "UNAUTHENTICATED"),
                    "{operation} as {role}: {response}"
                );
            } else {
                assert_eq!(status, 403, "{operation} as {role}: {response}");
                assert_eq!(codes, ["FORBIDDEN"], "{operation} as {role}");
                let message = response["errors"][0]["message"].as_str().unwrap();
                assert!(message.contains(operation), "{message}");
                assert!(
                    !response.to_string().contains(key(role)),
                    "a key is never echoed"
                );
            }
        }
    }
    // Other schemes than Bearer are not keys.
    let response = app
        .http_client()
        .post(app.url("/graphql"))
        .header("authorization", format!("Basic {}", key(Role::Admin)))
        .json(&json!({ "query": "{ __typename }" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
}

pub async fn a_read_key_cannot_slip_a_mutation_into_a_batch_or_an_alias(app: TestApp) {
    let batch = json!([
        { "query": "{ dialogs { totalCount } }" },
        { "query": r#"mutation { pushMessage(input: {customerId: "c", dialogId: "sneaky", text: "t", language: "en"}) { status } }"# },
    ]);
    let (status, response) = app.post_as(Some(key(Role::Read)), &batch).await;
    assert_eq!(status, 200, "the query part succeeded: {response}");
    assert_eq!(response[0]["data"]["dialogs"]["totalCount"], 0);
    assert_eq!(code(&response[1]["errors"][0]), "FORBIDDEN");

    let aliases = json!({ "query": r#"mutation {
        a: pushMessage(input: {customerId: "c", dialogId: "sneaky", text: "t", language: "en"}) { status }
        b: giveConsent(dialogId: "sneaky", value: true) { value } }"# });
    let (status, response) = app.post_as(Some(key(Role::Read)), &aliases).await;
    assert_eq!(status, 403, "{response}");
    assert_eq!(
        codes(&response),
        ["FORBIDDEN", "FORBIDDEN"],
        "each alias is refused: {response}"
    );

    // Nothing was buffered on the way.
    let check = json!({ "query": r#"mutation { giveConsent(dialogId: "sneaky", value: true) { value } }"# });
    let (_, response) = app.post_as(Some(key(Role::Admin)), &check).await;
    assert_eq!(codes(&response), ["DIALOG_NOT_FOUND"], "{response}");

    // And an ingest key cannot read, not even through an alias next to an allowed mutation.
    let mixed = json!({ "query": "{ recent: dialogs { totalCount } }" });
    let (status, response) = app.post_as(Some(key(Role::Ingest)), &mixed).await;
    assert_eq!(status, 403);
    assert_eq!(codes(&response), ["FORBIDDEN"]);
    assert_eq!(response["data"], Value::Null);
}

pub async fn any_valid_key_may_introspect(app: TestApp) {
    for role in [Role::Ingest, Role::Read, Role::Admin] {
        let (status, response) = app
            .post_as(
                Some(key(role)),
                &json!({ "query": "{ __typename __schema { queryType { name } } }" }),
            )
            .await;
        assert_eq!(status, 200, "{response}");
        assert_eq!(
            response["data"]["__schema"]["queryType"]["name"],
            "QueryRoot"
        );
    }
}

for_each_store!(
    with super::keyed_config();
    every_operation_with_every_role_missing_and_wrong_keys,
    a_read_key_cannot_slip_a_mutation_into_a_batch_or_an_alias,
    any_valid_key_may_introspect,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_and_introspection_can_be_switched_off() {
    let mut config = test_config();
    config.access.graphiql = false;
    config.access.introspection = false;
    run_with(Backend::Sqlite, config, async |app: TestApp| {
        let client = app.http_client();
        assert_eq!(client.get(app.url("/")).send().await.unwrap().status(), 404);
        assert_eq!(
            client
                .get(app.url("/graphql"))
                .send()
                .await
                .unwrap()
                .status(),
            405
        );
        assert_eq!(
            client
                .get(app.url("/graphiql/graphiql.min.js"))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
        let response = app
            .graphql("{ __schema { queryType { name } } }", json!({}))
            .await;
        assert!(response["data"]["__schema"].is_null(), "{response}");
        // Nor do errors give names away one guess at a time.
        for query in [
            "{ dialogz { totalCount } }",
            "{ dialogs { totalCont } }",
            "{ dialogs(frist: 1) { totalCount } }",
        ] {
            let response = app.graphql(query, json!({})).await;
            let message = response["errors"][0]["message"].as_str().unwrap();
            assert!(!message.contains("Did you mean"), "{message}");
        }
        // The API itself still works.
        assert!(app.graphql("{ dialogs { totalCount } }", json!({})).await["errors"].is_null());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_by_hash_key_opens_the_api_for_its_role() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_dataapi"))
        .args(["hash-key", "read"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let field = |prefix: &str| {
        stdout
            .lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(": ").next())
            .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}"))
            .to_owned()
    };
    let key = field("key");
    let entry = field("API_KEYS entry");
    assert!(entry.starts_with("read:"), "{entry}");

    // Hashing the same key from standard input gives the same entry.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dataapi"))
        .args(["hash-key", "read", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{key}").unwrap();
    let hashed = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    assert!(hashed.contains(&entry), "{hashed}");
    assert!(
        !hashed.contains(&key),
        "hashing an existing key does not print it"
    );

    let mut config = test_config();
    config.access.api_keys = ApiKeys::parse(&entry).unwrap();
    run_with(Backend::Sqlite, config, async move |app: TestApp| {
        let query = json!({ "query": "{ dialogs { totalCount } }" });
        assert_eq!(app.post_as(Some(&key), &query).await.0, 200);
        let push = json!({ "query": r#"mutation { pushMessage(input: {customerId: "c", dialogId: "d", text: "t", language: "en"}) { status } }"# });
        assert_eq!(app.post_as(Some(&key), &push).await.0, 403);
    })
    .await;
}

/// A preflight for a JSON POST with a key, from `origin`: the response's status and CORS headers.
async fn preflight(
    app: &TestApp,
    origin: &str,
) -> (u16, Option<String>, Option<String>, Option<String>) {
    let response = app
        .http_client()
        .request(reqwest::Method::OPTIONS, app.url("/graphql"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap().to_ascii_lowercase())
    };
    (
        response.status().as_u16(),
        header("access-control-allow-origin"),
        header("access-control-allow-methods"),
        header("access-control-allow-headers"),
    )
}

/// A query POSTed with `Origin: origin`: the answer's `Access-Control-Allow-Origin`, and its JSON.
async fn cross_origin_query(app: &TestApp, origin: &str) -> (Option<String>, Value) {
    let response = app
        .http_client()
        .post(app.url("/graphql"))
        .header("Origin", origin)
        .json(&json!({ "query": "{ dialogs(first: 1) { totalCount } }" }))
        .send()
        .await
        .unwrap();
    let allowed = response
        .headers()
        .get("access-control-allow-origin")
        .map(|value| value.to_str().unwrap().to_owned());
    (allowed, response.json().await.unwrap())
}

const DASHBOARD: &str = "https://dash.example.com";

/// `CORS_ALLOWED_ORIGINS` lets exactly the listed origins' pages call `/graphql` from a browser: the
/// preflight of a JSON POST with a key is allowed for them, and only for them. Look-alike origins (a
/// suffix, another scheme or port, `null`) get no permission, and without the setting nobody does.
async fn cors_admits_exactly_the_listed_origins(app: TestApp) {
    let (status, origin, methods, headers) = preflight(&app, DASHBOARD).await;
    assert!((200..300).contains(&status), "{status}");
    assert_eq!(origin.as_deref(), Some(DASHBOARD));
    assert!(methods.unwrap().contains("post"));
    let headers = headers.unwrap();
    assert!(headers.contains("authorization") && headers.contains("content-type"));
    let (allowed, answer) = cross_origin_query(&app, DASHBOARD).await;
    assert_eq!(allowed.as_deref(), Some(DASHBOARD));
    assert!(
        answer["data"]["dialogs"]["totalCount"].is_number(),
        "{answer}"
    );
    for stranger in [
        "https://evil.example.com",
        "https://dash.example.com.evil.com",
        "http://dash.example.com",
        "https://dash.example.com:8443",
        "null",
    ] {
        let (_, origin, _, _) = preflight(&app, stranger).await;
        assert_eq!(origin, None, "{stranger}");
        let (allowed, _) = cross_origin_query(&app, stranger).await;
        assert_eq!(allowed, None, "{stranger}");
    }
}

async fn without_cors_no_origin_is_admitted(app: TestApp) {
    let (_, origin, _, _) = preflight(&app, DASHBOARD).await;
    assert_eq!(origin, None);
    let (allowed, _) = cross_origin_query(&app, DASHBOARD).await;
    assert_eq!(allowed, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_lets_exactly_the_listed_browser_origins_call_graphql() {
    let mut config = test_config();
    config.access.cors_origins =
        dataapi::cors::AllowedOrigins::parse(&format!("{DASHBOARD}, http://127.0.0.1:3000"))
            .unwrap();
    run_with(
        Backend::Sqlite,
        config,
        cors_admits_exactly_the_listed_origins,
    )
    .await;
    run_with(
        Backend::Sqlite,
        test_config(),
        without_cors_no_origin_is_admitted,
    )
    .await;
}
