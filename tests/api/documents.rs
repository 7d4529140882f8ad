//! Documents are fully validated once (see `src/execution.rs`): a document seen before must answer exactly
//! as on first sight, whatever its variables, and the operation to run must be chosen with an error a
//! client can act on.

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, code, run_with, test_config};

const PUSH: &str =
    "mutation($i: PushMessageInput!) { pushMessage(input: $i) { status message { id } } }";
const PUSH_MANY: &str =
    "mutation($l: [PushMessageInput!]!) { pushMessages(inputs: $l) { status } }";
const DIALOGS: &str =
    "query($n: Int, $f: DialogFilter) { dialogs(first: $n, filter: $f) { totalCount } }";

fn input(dialog: &str) -> Value {
    json!({ "customerId": "c", "dialogId": dialog, "text": "hello", "language": "en", "messageId": "m1" })
}

async fn prevalidated(app: &TestApp) -> u64 {
    app.metrics_text()
        .await
        .lines()
        .find(|line| {
            line.starts_with("dataapi_graphql_validations_total{validation=\"prevalidated\"}")
        })
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0, |value| value.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_document_answers_any_variables_as_on_first_sight() {
    run_with(Backend::Sqlite, test_config(), async |app: TestApp| {
        let with_field = |field: &str, value: Value| {
            let mut input = input("d");
            input[field] = value;
            input
        };
        // (document, good variables, other variables): wrong types, unknown or missing fields, nulls,
        // out-of-range numbers, a single value where a list is declared, a number as an ID (valid), and
        // values of the right type that the service itself refuses.
        let cases = vec![
            (
                PUSH,
                json!({ "i": input("d") }),
                json!({ "i": with_field("text", json!(5)) }),
            ),
            (
                PUSH,
                json!({ "i": input("d") }),
                json!({ "i": with_field("bogus", json!("x")) }),
            ),
            (
                PUSH,
                json!({ "i": input("d") }),
                json!({ "i": with_field("customerId", Value::Null) }),
            ),
            (
                PUSH,
                json!({ "i": input("d") }),
                json!({ "i": with_field("messageId", json!(12)) }),
            ),
            (
                PUSH,
                json!({ "i": input("d") }),
                json!({ "i": with_field("text", json!("  ")) }),
            ),
            (
                PUSH,
                json!({ "i": input("d") }),
                json!({ "i": with_field("language", json!("english!")) }),
            ),
            (PUSH, json!({ "i": input("d") }), json!({ "i": null })),
            (PUSH, json!({ "i": input("d") }), json!({})),
            (
                PUSH,
                json!({ "i": input("d") }),
                json!({ "i": [input("d")] }),
            ),
            (
                PUSH_MANY,
                json!({ "l": [input("d")] }),
                json!({ "l": input("d") }),
            ),
            (
                PUSH_MANY,
                json!({ "l": [input("d")] }),
                json!({ "l": [input("d"), null] }),
            ),
            (
                PUSH_MANY,
                json!({ "l": [input("d")] }),
                json!({ "l": [input("d"), { "text": "t" }] }),
            ),
            (
                DIALOGS,
                json!({ "n": 5, "f": { "language": "en" } }),
                json!({ "n": "five" }),
            ),
            (
                DIALOGS,
                json!({ "n": 5, "f": { "language": "en" } }),
                json!({ "n": 3_000_000_000u64 }),
            ),
            (
                DIALOGS,
                json!({ "n": 5, "f": { "language": "en" } }),
                json!({ "n": 1.5 }),
            ),
            (
                DIALOGS,
                json!({ "n": 5, "f": { "language": "en" } }),
                json!({ "f": { "lang": "en" } }),
            ),
            (
                DIALOGS,
                json!({ "n": 5, "f": { "language": "en" } }),
                json!({ "n": 100_000 }),
            ),
            (
                DIALOGS,
                json!({ "n": 5, "f": { "language": "en" } }),
                json!({ "n": -1 }),
            ),
        ];
        for (index, (document, good, other)) in cases.into_iter().enumerate() {
            // A comment makes each case a document of its own, never seen before.
            let query = format!("{document} # case {index}");
            let first = app.graphql(&query, other.clone()).await;
            let good_answer = app.graphql(&query, good.clone()).await;
            assert!(
                good_answer.get("errors").is_none(),
                "case {index}: {good_answer}"
            );

            // Now known and validated: the same good request takes the prevalidated path...
            let before = prevalidated(&app).await;
            assert_eq!(app.graphql(&query, good).await, good_answer, "case {index}");
            assert_eq!(prevalidated(&app).await, before + 1, "case {index}");
            // ...and the other variables get the very answer they got on first sight.
            assert_eq!(app.graphql(&query, other).await, first, "case {index}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_is_trusted_only_once_every_argument_of_it_was_checked() {
    run_with(Backend::Sqlite, test_config(), async |app: TestApp| {
        // async-graphql skips checking an argument whose variable is missing: here `text: 5` would go
        // unnoticed on first sight, and the document must not be trusted on the strength of that.
        let query = "mutation($c: ID) { pushMessage(input: {customerId: $c, dialogId: \"d\", text: 5, language: \"en\"}) { status } }";
        let lenient = app.graphql(query, json!({})).await;
        let error = &lenient["errors"][0];
        assert!(!code(error).is_empty() && code(error) != "<no code>", "{lenient}");
        let before = prevalidated(&app).await;
        let checked = app.graphql(query, json!({ "c": "c" })).await;
        assert_eq!(code(&checked["errors"][0]), "GRAPHQL_VALIDATION_FAILED", "{checked}");
        assert_eq!(prevalidated(&app).await, before);

        // Nor does it check the arguments of an operation other than the one selected.
        let two = "mutation A($c: ID) { pushMessage(input: {customerId: $c, dialogId: \"d\", text: 5, language: \"en\"}) { status } } query B { __typename }";
        let b = app.post_json(&json!({ "query": two, "operationName": "B" })).await;
        assert_eq!(b["data"]["__typename"], "QueryRoot", "{b}");
        let a = app
            .post_json(&json!({ "query": two, "operationName": "A", "variables": { "c": "c" } }))
            .await;
        assert_eq!(code(&a["errors"][0]), "GRAPHQL_VALIDATION_FAILED", "{a}");
        assert_eq!(prevalidated(&app).await, before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operation_to_run_is_chosen_with_an_error_that_says_how() {
    run_with(Backend::Sqlite, test_config(), async |app: TestApp| {
        let two = "query A { __typename } query B { dialogs { totalCount } }";
        for (body, says) in [
            (
                json!({ "query": two }),
                "send the name of the one to run as operationName (`A`, `B`)",
            ),
            (
                json!({ "query": two, "operationName": "C" }),
                "no operation named `C`: send one of `A`, `B`",
            ),
            (
                json!({ "query": "{ __typename }", "operationName": "A" }),
                "only one without a name: leave operationName out",
            ),
        ] {
            let response = app.post_json(&body).await;
            let error = &response["errors"][0];
            assert_eq!(code(error), "OPERATION_NOT_FOUND", "{response}");
            assert!(
                error["message"].as_str().unwrap().contains(says),
                "{response}"
            );
        }
        let chosen = app
            .post_json(&json!({ "query": two, "operationName": "B" }))
            .await;
        assert_eq!(chosen["data"]["dialogs"]["totalCount"], 0, "{chosen}");
    })
    .await;
}
