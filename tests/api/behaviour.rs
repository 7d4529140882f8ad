//! The behaviour suite: what a user of the GraphQL API sees, over real HTTP. Every test runs against both
//! stores, and on the Redis buffer (standalone and Cluster) as well as the in-process one (see the
//! `for_each_setup!` list at the bottom).

use std::collections::HashSet;

use serde_json::{Value, json};

use dataapi::store::Store;

use crate::helpers::{TestApp, code};

const DIALOG_FIELDS: &str =
    "id customerId languages messageCount firstMessageAt lastMessageAt consentedAt
    messages { id messageId text language createdAt dialogId customerId }";

async fn dialog(app: &TestApp, id: &str) -> Value {
    let data = app
        .data(
            &format!("query($id: ID!) {{ dialog(id: $id) {{ {DIALOG_FIELDS} }} }}"),
            json!({ "id": id }),
        )
        .await;
    data["dialog"].clone()
}

fn texts(dialog: &Value) -> Vec<String> {
    dialog["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn total_counts(app: &TestApp) -> (i64, i64) {
    let data = app
        .data(
            "{ dialogs { totalCount } messages { totalCount } }",
            json!({}),
        )
        .await;
    (
        data["dialogs"]["totalCount"].as_i64().unwrap(),
        data["messages"]["totalCount"].as_i64().unwrap(),
    )
}

pub async fn messages_wait_in_the_buffer_until_consent_true_stores_them(app: TestApp) {
    let first = app.push("alice", "d1", "Hello", "EN", None).await;
    assert_eq!(first["status"], "BUFFERED");
    assert_eq!(
        first["message"]["language"], "en",
        "languages are stored lowercase"
    );
    assert!(
        first["message"]["createdAt"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    app.push("alice", "d1", "Bonjour", "fr", None).await;
    app.push("alice", "d1", "Bye", "en", None).await;

    assert_eq!(
        total_counts(&app).await,
        (0, 0),
        "nothing is stored before consent"
    );
    assert_eq!(app.stored_messages().await, 0);
    assert!(dialog(&app, "d1").await.is_null());

    let consent = app.consent("d1", true).await;
    assert_eq!(consent["value"], true);
    assert_eq!(consent["storedCount"], 3);
    assert_eq!(consent["discardedCount"], 0);

    let stored = dialog(&app, "d1").await;
    assert_eq!(stored["customerId"], "alice");
    assert_eq!(stored["languages"], json!(["en", "fr"]));
    assert_eq!(stored["messageCount"], 3);
    assert_eq!(texts(&stored), ["Hello", "Bonjour", "Bye"], "oldest first");
    assert_eq!(stored["firstMessageAt"], stored["messages"][0]["createdAt"]);
    assert_eq!(stored["lastMessageAt"], stored["messages"][2]["createdAt"]);
    assert_eq!(stored["consentedAt"], consent["decidedAt"]);
    assert_eq!(
        stored["messages"][0], first["message"],
        "stored exactly as recorded at push time"
    );
    assert_eq!(total_counts(&app).await, (1, 3));
}

pub async fn consent_false_leaves_nothing_in_the_database(app: TestApp) {
    app.push("bob", "d2", "my card number is 1234", "en", None)
        .await;
    app.push("bob", "d2", "thanks", "en", Some("m2")).await;
    let consent = app.consent("d2", false).await;
    assert_eq!(consent["value"], false);
    assert_eq!(consent["discardedCount"], 2);
    assert_eq!(consent["storedCount"], 0);

    assert_eq!(app.stored_messages().await, 0);
    assert_eq!(app.stored_dialogs().await, 0);
    assert_eq!(total_counts(&app).await, (0, 0));
    assert!(dialog(&app, "d2").await.is_null());
    // The decision itself is the audit record.
    let dialog_id = dataapi::model::DialogId::parse("dialogId", "d2").unwrap();
    let record = app
        .store
        .consent(&dialog_id)
        .await
        .unwrap()
        .expect("decision recorded");
    assert!(!record.value);
}

pub async fn a_repeated_message_id_is_recorded_once(app: TestApp) {
    let first = app.push("carol", "d3", "hi", "en", Some("m1")).await;
    let again = app.push("carol", "d3", "hi", "en", Some("m1")).await;
    assert_eq!(
        again, first,
        "a retry returns the message as first recorded"
    );
    app.push("carol", "d3", "second", "en", Some("m2")).await;
    assert_eq!(app.consent("d3", true).await["storedCount"], 2);

    // After consent the same key still means the same message, now stored.
    let retried = app.push("carol", "d3", "hi", "en", Some("m1")).await;
    assert_eq!(retried["status"], "STORED");
    assert_eq!(retried["message"], first["message"]);
    let late = app.push("carol", "d3", "third", "en", Some("m3")).await;
    assert_eq!(
        app.push("carol", "d3", "third", "en", Some("m3")).await,
        late
    );
    assert_eq!(dialog(&app, "d3").await["messageCount"], 3);
    assert_eq!(app.stored_messages().await, 3);

    // The same key for different content is a client bug, not a retry.
    for dialog_id in ["d3", "d3-buffered"] {
        app.push("carol", "d3-buffered", "original", "en", Some("k"))
            .await;
        let error = app
            .error(
                "mutation { pushMessage(input: {customerId: \"carol\", dialogId: \"DIALOG\", text: \"changed\",
                    language: \"en\", messageId: \"m1\"}) { status } }"
                    .replace("DIALOG", dialog_id)
                    .replace("m1", if dialog_id == "d3" { "m1" } else { "k" })
                    .as_str(),
                json!({}),
            )
            .await;
        assert_eq!(code(&error), "MESSAGE_ID_CONFLICT", "{error:#}");
    }
    // The same key and text in another language is not a retry either.
    let error = app
        .error(
            "mutation($i: PushMessageInput!) { pushMessage(input: $i) { status } }",
            json!({ "i": { "customerId": "carol", "dialogId": "d3-buffered", "text": "original",
                           "language": "de", "messageId": "k" } }),
        )
        .await;
    assert_eq!(code(&error), "MESSAGE_ID_CONFLICT", "{error:#}");

    // A batch mixing messages with and without a key: a keyless message is new whatever its text, a key
    // already used is a retry of its message, and a key repeated within the batch a retry of its first use.
    let earlier = app
        .push("carol", "d3-buffered", "original", "en", Some("k"))
        .await;
    let message = |text: &str, key: Option<&str>| {
        let mut input = json!({ "customerId": "carol", "dialogId": "d3-buffered", "text": text, "language": "en" });
        if let Some(key) = key {
            input["messageId"] = json!(key);
        }
        input
    };
    let inputs = json!([
        message("original", None),
        message("original", Some("k")),
        message("fresh", Some("k2")),
        message("fresh", Some("k2")),
        message("fresh", None),
    ]);
    let results = app.data(PUSH_MANY, json!({ "inputs": inputs })).await["pushMessages"].clone();
    let ids: Vec<&str> = (0..5)
        .map(|i| {
            assert_eq!(results[i]["status"], "BUFFERED", "{results:#}");
            results[i]["message"]["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids[1], earlier["message"]["id"].as_str().unwrap());
    assert_eq!(ids[2], ids[3]);
    let distinct: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 4, "{ids:?}");
    assert_eq!(
        app.consent("d3-buffered", true).await["storedCount"],
        4,
        "original (k), its keyless twin, fresh (k2) and its keyless twin"
    );
}

pub async fn repeating_a_decision_changes_nothing(app: TestApp) {
    app.push("dan", "d4", "one", "en", None).await;
    app.push("dan", "d4", "two", "en", None).await;
    let first = app.consent("d4", true).await;
    let second = app.consent("d4", true).await;
    assert_eq!(second["storedCount"], 0);
    assert_eq!(
        second["decidedAt"], first["decidedAt"],
        "the original decision time stands"
    );
    assert_eq!(dialog(&app, "d4").await["messageCount"], 2);
    assert_eq!(app.stored_messages().await, 2);

    assert_eq!(
        app.consent_history_len("d4").await,
        1,
        "the audit history has one entry"
    );

    app.push("dan", "d5", "one", "en", None).await;
    let no = app.consent("d5", false).await;
    let no_again = app.consent("d5", false).await;
    assert_eq!(no_again["decidedAt"], no["decidedAt"]);
    assert_eq!(no_again["discardedCount"], 0);
    assert_eq!(app.stored_messages().await, 2);
    assert_eq!(app.consent_history_len("d5").await, 1);

    // A change of decision is a new history entry.
    app.consent("d4", false).await;
    assert_eq!(app.consent_history_len("d4").await, 2);
}

pub async fn later_messages_follow_the_recorded_decision(app: TestApp) {
    app.push("erin", "yes", "before", "en", None).await;
    app.consent("yes", true).await;
    let after_yes = app.push("erin", "yes", "after", "de", None).await;
    assert_eq!(after_yes["status"], "STORED");
    let stored = dialog(&app, "yes").await;
    assert_eq!(texts(&stored), ["before", "after"]);
    assert_eq!(stored["languages"], json!(["de", "en"]));
    assert_eq!(stored["lastMessageAt"], after_yes["message"]["createdAt"]);

    app.push("erin", "no", "before", "en", None).await;
    app.consent("no", false).await;
    let after_no = app.push("erin", "no", "after", "en", None).await;
    assert_eq!(after_no["status"], "DISCARDED");
    assert_eq!(
        after_no["message"]["text"], "after",
        "the caller still sees what it sent"
    );
    assert!(dialog(&app, "no").await.is_null());
    assert_eq!(app.stored_messages().await, 2);

    // A dialog keeps its customer, whatever its state.
    for dialog_id in ["yes", "no"] {
        let error = app
            .error(
                "mutation($d: ID!) { pushMessage(input: {customerId: \"mallory\", dialogId: $d, text: \"x\",
                    language: \"en\"}) { status } }",
                json!({ "d": dialog_id }),
            )
            .await;
        assert_eq!(code(&error), "CUSTOMER_MISMATCH");
    }
}

pub async fn withdrawing_consent_deletes_the_stored_dialog(app: TestApp) {
    for text in ["a", "b", "c"] {
        app.push("frank", "d6", text, "en", None).await;
    }
    app.push("frank", "other", "kept", "en", None).await;
    app.consent("d6", true).await;
    app.consent("other", true).await;
    assert_eq!(app.stored_messages().await, 4);

    let withdrawal = app.consent("d6", false).await;
    assert_eq!(withdrawal["value"], false);
    assert_eq!(withdrawal["deletedCount"], 3);
    assert!(dialog(&app, "d6").await.is_null());
    assert_eq!(
        app.stored_messages().await,
        1,
        "other dialogs are untouched"
    );
    assert_eq!(
        app.push("frank", "d6", "later", "en", None).await["status"],
        "DISCARDED"
    );

    // Consent given again applies from then on; what was deleted stays deleted.
    let again = app.consent("d6", true).await;
    assert_eq!(again["value"], true);
    assert_eq!(
        app.push("frank", "d6", "new", "en", None).await["status"],
        "STORED"
    );
    assert_eq!(texts(&dialog(&app, "d6").await), ["new"]);
}

pub async fn consent_for_an_unknown_dialog_is_dialog_not_found(app: TestApp) {
    for value in [true, false] {
        let error = app.consent_error("never-seen", value).await;
        assert_eq!(code(&error), "DIALOG_NOT_FOUND");
        assert!(error["message"].as_str().unwrap().contains("never-seen"));
    }
    let dialog_id = dataapi::model::DialogId::parse("dialogId", "never-seen").unwrap();
    assert!(
        app.store.consent(&dialog_id).await.unwrap().is_none(),
        "no decision recorded"
    );
}

/// Pushes one message per `(customer, dialog, language, text)` and gives every dialog consent, in two
/// batched requests.
async fn seed(app: &TestApp, rows: &[(&str, &str, &str, &str)]) {
    let pushes: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, (customer, dialog, language, text))| {
            format!(
                "p{i}: pushMessage(input: {{customerId: \"{customer}\", dialogId: \"{dialog}\", \
                 language: \"{language}\", text: \"{text}\"}}) {{ status }}"
            )
        })
        .collect();
    app.data(&format!("mutation {{ {} }}", pushes.join("\n")), json!({}))
        .await;
    let dialogs: HashSet<&str> = rows.iter().map(|row| row.1).collect();
    let consents: Vec<String> = dialogs
        .iter()
        .enumerate()
        .map(|(i, dialog)| {
            format!("c{i}: giveConsent(dialogId: \"{dialog}\", value: true) {{ value }}")
        })
        .collect();
    app.data(
        &format!("mutation {{ {} }}", consents.join("\n")),
        json!({}),
    )
    .await;
}

fn ids(connection: &Value) -> Vec<String> {
    connection["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|edge| edge["node"]["id"].as_str().unwrap().to_owned())
        .collect()
}

pub async fn filters_match_language_case_insensitively_and_combine_with_and(app: TestApp) {
    seed(
        &app,
        &[
            ("c1", "a", "en", "hello"),
            ("c1", "a", "de", "hallo"),
            ("c1", "b", "fr", "salut"),
            ("c2", "c", "EN", "hi"),
            ("c2", "d", "pt-BR", "olá"),
        ],
    )
    .await;
    let dialogs = |filter: Value| {
        let app = &app;
        async move {
            let data = app
                .data(
                    "query($f: DialogFilter) { dialogs(filter: $f) { totalCount edges { node { id } } } }",
                    json!({ "f": filter }),
                )
                .await;
            let mut found = ids(&data["dialogs"]);
            found.sort();
            assert_eq!(data["dialogs"]["totalCount"], found.len());
            found
        }
    };
    assert_eq!(dialogs(json!({ "language": "En" })).await, ["a", "c"]);
    assert_eq!(dialogs(json!({ "language": "PT-br" })).await, ["d"]);
    assert_eq!(dialogs(json!({ "customerId": "c1" })).await, ["a", "b"]);
    assert_eq!(
        dialogs(json!({ "language": "en", "customerId": "c1" })).await,
        ["a"]
    );
    assert_eq!(
        dialogs(json!({ "language": "fr", "customerId": "c2" })).await,
        Vec::<String>::new()
    );
    assert_eq!(dialogs(json!({})).await, ["a", "b", "c", "d"]);

    let messages = |filter: Value| {
        let app = &app;
        async move {
            let data = app
                .data(
                    "query($f: MessageFilter) { messages(filter: $f) { totalCount edges { node { text } } } }",
                    json!({ "f": filter }),
                )
                .await;
            let mut found: Vec<String> = data["messages"]["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["node"]["text"].as_str().unwrap().to_owned())
                .collect();
            found.sort();
            assert_eq!(data["messages"]["totalCount"], found.len());
            found
        }
    };
    assert_eq!(messages(json!({ "language": "EN" })).await, ["hello", "hi"]);
    assert_eq!(
        messages(json!({ "customerId": "c1", "language": "de" })).await,
        ["hallo"]
    );
    assert_eq!(
        messages(json!({ "dialogId": "a" })).await,
        ["hallo", "hello"]
    );
    assert_eq!(
        messages(json!({ "dialogId": "a", "customerId": "c2" })).await,
        Vec::<String>::new()
    );
}

/// Pages through `dialogs` with `first`/`after` (or `last`/`before` when `backwards`), calling `between`
/// after each page, and returns the ids in display order.
async fn page_through(
    app: &TestApp,
    size: usize,
    backwards: bool,
    mut between: impl AsyncFnMut(usize),
) -> Vec<Value> {
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    for page_number in 0.. {
        let (query, cursor_var) = if backwards {
            ("query($n: Int, $c: String) { dialogs(last: $n, before: $c) {
                edges { cursor node { id lastMessageAt } } pageInfo { hasPreviousPage hasNextPage startCursor endCursor } } }", "c")
        } else {
            ("query($n: Int, $c: String) { dialogs(first: $n, after: $c) {
                edges { cursor node { id lastMessageAt } } pageInfo { hasPreviousPage hasNextPage startCursor endCursor } } }", "c")
        };
        let data = app
            .data(query, json!({ "n": size, cursor_var: cursor }))
            .await;
        let connection = &data["dialogs"];
        let edges = connection["edges"].as_array().unwrap().clone();
        let info = &connection["pageInfo"];
        assert!(edges.len() <= size);
        if let (Some(first), Some(last)) = (edges.first(), edges.last()) {
            assert_eq!(info["startCursor"], first["cursor"]);
            assert_eq!(info["endCursor"], last["cursor"]);
        }
        let nodes: Vec<Value> = edges.iter().map(|e| e["node"].clone()).collect();
        let more = if backwards {
            assert_eq!(info["hasNextPage"], cursor.is_some(), "page {page_number}");
            seen.splice(0..0, nodes);
            cursor = info["startCursor"].as_str().map(str::to_owned);
            info["hasPreviousPage"].as_bool().unwrap()
        } else {
            assert_eq!(
                info["hasPreviousPage"],
                cursor.is_some(),
                "page {page_number}"
            );
            seen.extend(nodes);
            cursor = info["endCursor"].as_str().map(str::to_owned);
            info["hasNextPage"].as_bool().unwrap()
        };
        if !more {
            break;
        }
        between(page_number).await;
    }
    seen
}

pub async fn paging_visits_every_dialog_once_in_both_directions_while_new_dialogs_arrive(
    app: TestApp,
) {
    const DIALOGS: usize = 240;
    let rows: Vec<(String, String)> = (0..DIALOGS)
        .map(|i| (format!("c{}", i % 7), format!("dlg-{i:04}")))
        .collect();
    for chunk in rows.chunks(80) {
        let chunk: Vec<(&str, &str, &str, &str)> = chunk
            .iter()
            .map(|(c, d)| (c.as_str(), d.as_str(), "en", "hi"))
            .collect();
        seed(&app, &chunk).await;
    }
    let expected: HashSet<String> = rows.iter().map(|(_, d)| d.clone()).collect();

    let mut arrivals = 0;
    for backwards in [false, true] {
        let seen = page_through(&app, 17, backwards, async |page| {
            // New dialogs arrive between pages; they are newer than everything, so they belong before the
            // pages already read (forwards) or after the start (backwards) and must not disturb the walk.
            let dialog = format!("new-{backwards}-{page}");
            app.push("newcomer", &dialog, "fresh", "en", None).await;
            app.consent(&dialog, true).await;
            arrivals += 1;
        })
        .await;
        let seen_ids: Vec<String> = seen
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect();
        let unique: HashSet<String> = seen_ids.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            seen_ids.len(),
            "no dialog twice (backwards: {backwards})"
        );
        let original: HashSet<String> = unique
            .iter()
            .filter(|id| id.starts_with("dlg-"))
            .cloned()
            .collect();
        assert_eq!(
            original, expected,
            "no dialog missed (backwards: {backwards})"
        );
        // Most recent first, ties broken by id, descending.
        let keys: Vec<(String, String)> = seen
            .iter()
            .map(|n| {
                (
                    n["lastMessageAt"].as_str().unwrap().to_owned(),
                    n["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert!(
            keys.windows(2).all(|w| w[0] > w[1]),
            "ordered (backwards: {backwards})"
        );
    }
    assert!(arrivals > 20);
}

pub async fn after_and_before_bound_a_page_from_both_sides(app: TestApp) {
    let rows: Vec<(String, String)> = (0..10).map(|i| ("c".to_owned(), format!("b{i}"))).collect();
    let rows: Vec<(&str, &str, &str, &str)> = rows
        .iter()
        .map(|(c, d)| (c.as_str(), d.as_str(), "en", "x"))
        .collect();
    seed(&app, &rows).await;
    let all = app
        .data(
            "{ dialogs(first: 10) { edges { cursor node { id } } } }",
            json!({}),
        )
        .await;
    let edges = all["dialogs"]["edges"].as_array().unwrap().clone();
    let all_ids = ids(&all["dialogs"]);
    let (after, before) = (edges[2]["cursor"].clone(), edges[7]["cursor"].clone());

    let query = "query($a: String, $b: String, $f: Int, $l: Int) {
        dialogs(after: $a, before: $b, first: $f, last: $l) {
            edges { node { id } } pageInfo { hasPreviousPage hasNextPage } } }";
    let between = app.data(query, json!({ "a": after, "b": before })).await;
    assert_eq!(ids(&between["dialogs"]), all_ids[3..7]);
    let first_two = app
        .data(query, json!({ "a": after, "b": before, "f": 2 }))
        .await;
    assert_eq!(ids(&first_two["dialogs"]), all_ids[3..5]);
    assert_eq!(
        first_two["dialogs"]["pageInfo"],
        json!({ "hasPreviousPage": true, "hasNextPage": true })
    );
    let last_two = app
        .data(query, json!({ "a": after, "b": before, "l": 2 }))
        .await;
    assert_eq!(ids(&last_two["dialogs"]), all_ids[5..7]);
    assert_eq!(
        last_two["dialogs"]["pageInfo"],
        json!({ "hasPreviousPage": true, "hasNextPage": true })
    );

    // An empty page still tells whether there is more.
    let none = app.data(query, json!({ "f": 0 })).await;
    assert_eq!(ids(&none["dialogs"]), Vec::<String>::new());
    assert_eq!(
        none["dialogs"]["pageInfo"],
        json!({ "hasPreviousPage": false, "hasNextPage": true })
    );
    let past_the_end = app.data(query, json!({ "a": edges[9]["cursor"] })).await;
    assert_eq!(ids(&past_the_end["dialogs"]), Vec::<String>::new());
    assert_eq!(
        past_the_end["dialogs"]["pageInfo"],
        json!({ "hasPreviousPage": true, "hasNextPage": false })
    );
}

pub async fn invalid_cursors_and_inputs_are_named_errors_and_change_nothing(app: TestApp) {
    seed(&app, &[("c", "known", "en", "hi")]).await;
    let messages = app
        .data("{ messages { edges { cursor } } }", json!({}))
        .await;
    let message_cursor = messages["messages"]["edges"][0]["cursor"]
        .as_str()
        .unwrap()
        .to_owned();

    let query_cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "query($c: String) { dialogs(after: $c) { totalCount } }",
            json!({ "c": "garbage!" }),
            "INVALID_CURSOR",
            "after",
        ),
        (
            "query($c: String) { dialogs(before: $c) { totalCount } }",
            json!({ "c": "ZGlhbG9ncy52MTp4Onk" }),
            "INVALID_CURSOR",
            "before",
        ),
        (
            "query($c: String) { dialogs(after: $c) { totalCount } }",
            json!({ "c": message_cursor }),
            "INVALID_CURSOR",
            "after",
        ),
        (
            "{ dialogs(first: 1001) { totalCount } }",
            json!({}),
            "BAD_USER_INPUT",
            "first",
        ),
        (
            "{ messages(last: 5000) { totalCount } }",
            json!({}),
            "BAD_USER_INPUT",
            "last",
        ),
        (
            "{ dialogs(first: -1) { totalCount } }",
            json!({}),
            "BAD_USER_INPUT",
            "first",
        ),
        (
            "{ dialogs(first: 1, last: 1) { totalCount } }",
            json!({}),
            "BAD_USER_INPUT",
            "first",
        ),
        (
            "{ dialogs(filter: {language: \"english!\"}) { totalCount } }",
            json!({}),
            "BAD_USER_INPUT",
            "filter.language",
        ),
        (
            "{ messages(filter: {dialogId: \"\"}) { totalCount } }",
            json!({}),
            "BAD_USER_INPUT",
            "filter.dialogId",
        ),
        (
            "{ dialog(id: \"\") { id } }",
            json!({}),
            "BAD_USER_INPUT",
            "id",
        ),
    ];
    for (query, variables, expected_code, field) in query_cases {
        let error = app.error(query, variables.clone()).await;
        assert_eq!(
            code(&error),
            expected_code,
            "{query} {variables}: {error:#}"
        );
        assert_eq!(error["extensions"]["field"], field, "{query}: {error:#}");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{error:#}"
        );
    }

    let long = "x".repeat(129);
    let huge_text = "y".repeat(10_001);
    let push_cases: Vec<(Value, &str)> = vec![
        (
            json!({ "customerId": "", "dialogId": "bad", "text": "t", "language": "en" }),
            "customerId",
        ),
        (
            json!({ "customerId": "c", "dialogId": long, "text": "t", "language": "en" }),
            "dialogId",
        ),
        (
            json!({ "customerId": "c", "dialogId": "bad", "text": "  ", "language": "en" }),
            "text",
        ),
        (
            json!({ "customerId": "c", "dialogId": "bad", "text": huge_text, "language": "en" }),
            "text",
        ),
        (
            json!({ "customerId": "c", "dialogId": "bad", "text": "nul\u{0}byte", "language": "en" }),
            "text",
        ),
        (
            json!({ "customerId": "c", "dialogId": "bad", "text": "t", "language": "e" }),
            "language",
        ),
        (
            json!({ "customerId": "c", "dialogId": "bad", "text": "t", "language": "en_US" }),
            "language",
        ),
        (
            json!({ "customerId": "c", "dialogId": "bad", "text": "t", "language": "en", "messageId": "" }),
            "messageId",
        ),
    ];
    for (input, field) in push_cases {
        let error = app
            .error(
                "mutation($i: PushMessageInput!) { pushMessage(input: $i) { status } }",
                json!({ "i": input }),
            )
            .await;
        assert_eq!(code(&error), "BAD_USER_INPUT", "{input}: {error:#}");
        assert_eq!(error["extensions"]["field"], field, "{input}: {error:#}");
    }
    // Wrong types are caught before any resolver runs, with a code as well.
    let error = app
        .error("mutation { pushMessage(input: {customerId: 1, dialogId: \"d\", text: \"t\"}) { status } }", json!({}))
        .await;
    assert_eq!(code(&error), "GRAPHQL_VALIDATION_FAILED");
    let error = app
        .error(
            "mutation($i: PushMessageInput!) { pushMessage(input: $i) { status } }",
            json!({ "i": { "text": 5 } }),
        )
        .await;
    assert!(
        !code(&error).is_empty() && code(&error) != "<no code>",
        "{error:#}"
    );

    // Nothing was buffered by the refused pushes, and the stored data is as before.
    assert_eq!(
        code(&app.consent_error("bad", true).await),
        "DIALOG_NOT_FOUND"
    );
    assert_eq!(total_counts(&app).await, (1, 1));
}

pub async fn concurrent_pushes_to_one_dialog_keep_their_order(app: TestApp) {
    const PUSHERS: usize = 4;
    const EACH: usize = 40;
    let app = std::sync::Arc::new(app);
    let tasks: Vec<_> = (0..PUSHERS)
        .map(|pusher| {
            let app = app.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let pushed = app
                        .push("cust", "busy", &format!("{pusher}-{i}"), "en", None)
                        .await;
                    assert_eq!(pushed["status"], "BUFFERED");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        app.consent("busy", true).await["storedCount"],
        PUSHERS * EACH
    );
    let stored = dialog(&app, "busy").await;
    let texts = texts(&stored);
    assert_eq!(texts.len(), PUSHERS * EACH);
    for pusher in 0..PUSHERS {
        let mine: Vec<usize> = texts
            .iter()
            .filter_map(|t| t.strip_prefix(&format!("{pusher}-")))
            .map(|i| i.parse().unwrap())
            .collect();
        assert_eq!(
            mine,
            (0..EACH).collect::<Vec<_>>(),
            "pusher {pusher}'s messages in the order sent"
        );
    }
    let times: Vec<&str> = stored["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["createdAt"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]));
}

pub async fn a_store_outage_during_consent_loses_nothing_and_a_retry_stores_once(app: TestApp) {
    for i in 0..5 {
        app.push(
            "gina",
            "fragile",
            &format!("m{i}"),
            "en",
            Some(&format!("k{i}")),
        )
        .await;
    }
    app.store.set_down(true);
    let error = app.consent_error("fragile", true).await;
    assert_eq!(code(&error), "STORE_UNAVAILABLE");
    assert!(error["message"].as_str().unwrap().contains("retry"));
    // Pushing still works while the database is down: the dialog is buffered.
    assert_eq!(
        app.push("gina", "fragile", "m5", "en", Some("k5")).await["status"],
        "BUFFERED"
    );
    app.store.set_down(false);
    assert_eq!(app.stored_messages().await, 0, "nothing half-written");

    // The write lands but its acknowledgement is lost: the caller sees a failure and retries.
    app.store.set_lose_acknowledgements(true);
    assert_eq!(
        code(&app.consent_error("fragile", true).await),
        "STORE_UNAVAILABLE"
    );
    app.store.set_lose_acknowledgements(false);
    assert_eq!(
        app.stored_messages().await,
        6,
        "the lost-acknowledgement write did land"
    );

    let retry = app.consent("fragile", true).await;
    assert_eq!(retry["value"], true);
    assert_eq!(retry["storedCount"], 0, "the retry stores nothing twice");
    let stored = dialog(&app, "fragile").await;
    assert_eq!(texts(&stored), ["m0", "m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(stored["messageCount"], 6);
    assert_eq!(app.stored_messages().await, 6);
    assert_eq!(app.consent("fragile", true).await["storedCount"], 0);
}

pub async fn a_store_outage_before_consent_is_written_keeps_the_buffer_for_a_retry(app: TestApp) {
    for i in 0..3 {
        app.push("hal", "later", &format!("m{i}"), "en", None).await;
    }
    app.store.set_down(true);
    assert_eq!(
        code(&app.consent_error("later", true).await),
        "STORE_UNAVAILABLE"
    );
    assert_eq!(
        code(&app.consent_error("later", false).await),
        "STORE_UNAVAILABLE"
    );
    app.store.set_down(false);
    assert_eq!(app.consent("later", true).await["storedCount"], 3);
    assert_eq!(app.stored_messages().await, 3);
}

pub async fn a_page_of_dialogs_loads_its_messages_in_one_store_query(app: TestApp) {
    let rows: Vec<(String, String, String)> = (0..30)
        .flat_map(|d| {
            (0..3).map(move |m| (format!("c{d}"), format!("dl-{d:02}"), format!("text {m}")))
        })
        .collect();
    let borrowed: Vec<(&str, &str, &str, &str)> = rows
        .iter()
        .map(|(c, d, t)| (c.as_str(), d.as_str(), "en", t.as_str()))
        .collect();
    seed(&app, &borrowed).await;

    for page_size in [1, 10, 30] {
        app.store.reset_calls();
        let data = app
            .data(
                "query($n: Int) { dialogs(first: $n) { edges { node { id messages { id text } } } } }",
                json!({ "n": page_size }),
            )
            .await;
        let edges = data["dialogs"]["edges"].as_array().unwrap();
        assert_eq!(edges.len(), page_size);
        assert!(
            edges
                .iter()
                .all(|e| e["node"]["messages"].as_array().unwrap().len() == 3)
        );
        let calls = app.store.calls();
        assert_eq!(calls.get("scan_dialogs"), Some(&1), "{calls:?}");
        assert_eq!(
            calls.get("messages_of_dialogs"),
            Some(&1),
            "one query for all {page_size} dialogs: {calls:?}"
        );
        assert_eq!(
            calls.values().sum::<usize>(),
            2,
            "nothing else, not even a count: {calls:?}"
        );
    }

    // totalCount costs one count query, and only when asked for.
    app.store.reset_calls();
    app.data("{ dialogs(first: 5) { totalCount } }", json!({}))
        .await;
    assert_eq!(app.store.calls().get("count_dialogs"), Some(&1));
}

pub async fn pushing_to_a_buffered_dialog_costs_no_store_call(app: TestApp) {
    app.push("ivy", "quiet", "first", "en", None).await;
    app.store.reset_calls();
    for i in 0..10 {
        app.push("ivy", "quiet", &format!("more {i}"), "en", None)
            .await;
    }
    assert!(app.store.calls().is_empty(), "{:?}", app.store.calls());
}

pub async fn batched_requests_run_every_operation(app: TestApp) {
    let response = app
        .post_json(&json!([
            { "query": "mutation { pushMessage(input: {customerId: \"c\", dialogId: \"batch\", text: \"a\", language: \"en\"}) { status } }" },
            { "query": "mutation { giveConsent(dialogId: \"batch\", value: true) { storedCount } }" },
            { "query": "{ dialog(id: \"batch\") { messageCount messages { text } } }" },
        ]))
        .await;
    assert_eq!(response[0]["data"]["pushMessage"]["status"], "BUFFERED");
    assert_eq!(response[1]["data"]["giveConsent"]["storedCount"], 1);
    assert_eq!(response[2]["data"]["dialog"]["messageCount"], 1);
}

/// The batch's look-up of its new dialogs' decisions is an answer from the past by the time a message is
/// pushed: a decision written meanwhile must still be seen.
pub async fn a_batch_sees_decisions_written_after_it_looked_them_up(app: TestApp) {
    let app = std::sync::Arc::new(app);
    let (looked_up, release) = app.store.hold_next_consents_answer();
    let batch = {
        let app = app.clone();
        tokio::spawn(async move {
            app.data(
                "mutation($i: [PushMessageInput!]!) { pushMessages(inputs: $i) { status } }",
                json!({ "i": [
                    { "customerId": "kim", "dialogId": "calm", "text": "one", "language": "en" },
                    { "customerId": "kim", "dialogId": "decided-meanwhile", "text": "late", "language": "en" },
                ] }),
            )
            .await
        })
    };
    looked_up.notified().await;
    // Both dialogs were new when the batch looked; now one of them gets a message and a consent.
    app.push("kim", "decided-meanwhile", "early", "en", None)
        .await;
    assert_eq!(
        app.consent("decided-meanwhile", true).await["storedCount"],
        1
    );
    release.notify_one();
    let statuses = batch.await.unwrap()["pushMessages"].clone();
    assert_eq!(
        statuses,
        json!([{ "status": "BUFFERED" }, { "status": "STORED" }])
    );
    assert_eq!(texts_of(&app, "decided-meanwhile").await, ["early", "late"]);
    assert_eq!(
        app.store.calls().get("consents"),
        Some(&1),
        "one look-up for the batch"
    );
}

/// A batch opens its new dialogs in one buffer call, each under its dialog's lock; a dialog whose lock is
/// busy (here: a consent being written) is not waited for before the others open, and follows once it is
/// free, by its decision. Messages carry no messageId, so a message recorded twice would show.
pub async fn a_batch_opens_its_new_dialogs_together_and_does_not_wait_for_a_busy_one(app: TestApp) {
    let app = std::sync::Arc::new(app);
    let dialogs: Vec<String> = (0..5).map(|d| format!("busy-{d}")).collect();
    let (looked_up, release_look_up) = app.store.hold_next_consents_answer();
    let batch = {
        let (app, dialogs) = (app.clone(), dialogs.clone());
        tokio::spawn(async move {
            let inputs: Vec<Value> = dialogs
                .iter()
                .flat_map(|d| (0..3).map(move |i| (d.clone(), i)))
                .map(|(d, i)| json!({ "customerId": "batcher", "dialogId": d, "text": format!("b{i}"), "language": "en" }))
                .collect();
            app.data(PUSH_MANY, json!({ "inputs": inputs })).await
        })
    };
    // The batch found all five not buffered and looked their decisions up: none. Meanwhile busy-2 gets a
    // message and a consent, which holds its lock while the store writes it.
    looked_up.notified().await;
    app.push("batcher", "busy-2", "single", "en", None).await;
    let (writing, release_decision) = app.store.hold_next_decision();
    let consent = {
        let app = app.clone();
        tokio::spawn(async move { app.consent("busy-2", true).await })
    };
    writing.notified().await;
    let opened_before = app.buffer_hooks.opens().len();
    release_look_up.notify_one();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.buffer_hooks.opens().len() == opened_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the batch opened nothing while busy-2's lock was held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(
        app.buffer_hooks.opens()[opened_before..],
        [vec!["busy-0", "busy-1", "busy-3", "busy-4"]],
        "one call for the four free dialogs"
    );
    // Still during busy-2's consent: the others hold the batch's messages.
    assert_eq!(app.consent("busy-0", true).await["storedCount"], 3);
    release_decision.notify_one();
    assert_eq!(consent.await.unwrap()["storedCount"], 1);
    let statuses: Vec<(String, String)> = batch.await.unwrap()["pushMessages"]
        .as_array()
        .unwrap()
        .iter()
        .zip(dialogs.iter().flat_map(|d| [d; 3]))
        .map(|(result, d)| (d.clone(), result["status"].as_str().unwrap().to_owned()))
        .collect();
    for (d, status) in &statuses {
        let expected = if d == "busy-2" { "STORED" } else { "BUFFERED" };
        assert_eq!(status, expected, "{d}: {statuses:?}");
    }
    assert_eq!(
        app.buffer_hooks.opens().len(),
        opened_before + 1,
        "busy-2 followed its decision"
    );
    assert_eq!(texts_of(&app, "busy-2").await, ["single", "b0", "b1", "b2"]);
    for d in ["busy-1", "busy-3", "busy-4"] {
        assert_eq!(app.consent(d, true).await["storedCount"], 3, "{d}");
        assert_eq!(texts_of(&app, d).await, ["b0", "b1", "b2"], "{d}");
    }
    assert_eq!(texts_of(&app, "busy-0").await, ["b0", "b1", "b2"]);
}

pub async fn messages_pushed_while_consent_is_written_are_stored_too(app: TestApp) {
    app.push("jo", "race", "opening", "en", None).await;
    let app = std::sync::Arc::new(app);
    let (entered, release) = app.store.hold_next_decision();
    let consent = {
        let app = app.clone();
        tokio::spawn(async move { app.consent("race", true).await })
    };
    entered.notified().await;
    // The decision is not committed yet: these wait in the buffer.
    for i in 0..10 {
        let pushed = app
            .push("jo", "race", &format!("r{i}"), "en", Some(&format!("k{i}")))
            .await;
        assert_eq!(pushed["status"], "BUFFERED");
    }
    release.notify_one();
    let outcome = consent.await.unwrap();
    assert_eq!(
        outcome["storedCount"], 11,
        "the consent call stored what arrived during its write"
    );
    assert_eq!(
        app.store.calls().get("record_decision"),
        Some(&2),
        "one more pass, not a loop"
    );

    // From now on messages go straight to the store, retries of buffered ones included.
    assert_eq!(
        app.push("jo", "race", "after", "en", None).await["status"],
        "STORED"
    );
    assert_eq!(
        app.push("jo", "race", "r3", "en", Some("k3")).await["status"],
        "STORED"
    );
    let stored = dialog(&app, "race").await;
    let mut expected = vec!["opening".to_owned()];
    expected.extend((0..10).map(|i| format!("r{i}")));
    expected.push("after".to_owned());
    assert_eq!(texts(&stored), expected);
    assert_eq!(app.stored_messages().await, 12);
}

pub async fn a_write_failing_half_way_leaves_nothing_and_a_retry_stores_once(app: TestApp) {
    for i in 0..4 {
        app.push("lee", "halfway", &format!("m{i}"), "en", None)
            .await;
    }
    // The messages are written first, then the dialog summary, which the database now refuses.
    app.reject_dialog_summaries(true).await;
    assert_eq!(
        code(&app.consent_error("halfway", true).await),
        "STORE_UNAVAILABLE"
    );
    app.reject_dialog_summaries(false).await;
    assert_eq!(
        app.stored_messages().await,
        0,
        "the messages written before the failure were rolled back"
    );
    assert_eq!(app.stored_dialogs().await, 0);
    let dialog_id = dataapi::model::DialogId::parse("dialogId", "halfway").unwrap();
    assert!(
        app.store.consent(&dialog_id).await.unwrap().is_none(),
        "and so was the decision"
    );

    assert_eq!(app.consent("halfway", true).await["storedCount"], 4);
    assert_eq!(dialog(&app, "halfway").await["messageCount"], 4);
    assert_eq!(app.stored_messages().await, 4);
}

const PUSH_MANY: &str = "mutation($inputs: [PushMessageInput!]!) {
    pushMessages(inputs: $inputs) { status message { id messageId dialogId text } } }";

fn input(dialog: &str, text: &str, key: &str) -> Value {
    json!({ "customerId": "batcher", "dialogId": dialog, "text": text, "language": "en", "messageId": key })
}

pub async fn push_messages_records_each_in_order_like_push_message(app: TestApp) {
    app.push("batcher", "yes", "earlier", "en", None).await;
    app.consent("yes", true).await;
    app.push("batcher", "no", "earlier", "en", None).await;
    app.consent("no", false).await;

    let inputs = json!([
        input("new", "one", "n1"),
        input("yes", "stored", "y1"),
        input("new", "two", "n2"),
        input("no", "dropped", "x1"),
        input("new", "three", "n3"),
    ]);
    let first = app.data(PUSH_MANY, json!({ "inputs": inputs })).await["pushMessages"].clone();
    let statuses: Vec<&str> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["BUFFERED", "STORED", "BUFFERED", "DISCARDED", "BUFFERED"]
    );
    let texts: Vec<&str> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["one", "stored", "two", "dropped", "three"],
        "one result per input, in order"
    );

    // The whole call retried: every message is recorded once, as first recorded.
    let again = app.data(PUSH_MANY, json!({ "inputs": inputs })).await["pushMessages"].clone();
    for (a, b) in first
        .as_array()
        .unwrap()
        .iter()
        .zip(again.as_array().unwrap())
    {
        if a["status"] != "DISCARDED" {
            assert_eq!(a["message"], b["message"]);
        }
    }
    assert_eq!(app.consent("new", true).await["storedCount"], 3);
    assert_eq!(texts_of(&app, "new").await, ["one", "two", "three"]);
    assert_eq!(texts_of(&app, "yes").await, ["earlier", "stored"]);
    assert!(dialog(&app, "no").await.is_null());
}

async fn texts_of(app: &TestApp, dialog_id: &str) -> Vec<String> {
    texts(&dialog(app, dialog_id).await)
}

pub async fn push_messages_validates_every_input_before_recording_any(app: TestApp) {
    let inputs = json!([
        input("checked", "fine", "a"),
        input("checked", "fine too", "b"),
        { "customerId": "batcher", "dialogId": "checked", "text": "bad tag", "language": "english" },
    ]);
    let error = app.error(PUSH_MANY, json!({ "inputs": inputs })).await;
    assert_eq!(code(&error), "BAD_USER_INPUT");
    assert_eq!(error["extensions"]["field"], "inputs[2].language");
    assert_eq!(
        code(&app.consent_error("checked", true).await),
        "DIALOG_NOT_FOUND",
        "nothing recorded"
    );

    let too_many: Vec<Value> = (0..1001)
        .map(|i| input("many", "x", &format!("k{i}")))
        .collect();
    let error = app.error(PUSH_MANY, json!({ "inputs": too_many })).await;
    assert_eq!(code(&error), "BAD_USER_INPUT");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("MAX_PUSH_MESSAGES")
    );
    let empty = app.data(PUSH_MANY, json!({ "inputs": [] })).await;
    assert_eq!(empty["pushMessages"], json!([]));
}

/// The per-input failures of `pushMessages` that are the client's own: a dialog that belongs to another
/// customer, and a `messageId` repeated with another text. Each is `null` with its code at its index (on a
/// buffered dialog and on a stored one alike); the other inputs are recorded; the status stays 200.
pub async fn push_messages_reports_misuse_by_index_and_records_the_rest(app: TestApp) {
    app.push("owner", "owned", "first", "en", Some("m1")).await;
    app.push("owner", "kept", "first", "en", Some("k1")).await;
    app.consent("kept", true).await;
    let input = |customer: &str, dialog: &str, text: &str, id: &str| json!({ "customerId": customer, "dialogId": dialog, "text": text, "language": "en", "messageId": id });
    let inputs = json!([
        input("owner", "owned", "second", "m2"),
        input("intruder", "owned", "not yours", "x1"),
        input("owner", "owned", "first, changed", "m1"),
        input("intruder", "kept", "not yours either", "x2"),
        input("owner", "kept", "first, changed", "k1"),
        input("owner", "kept", "second", "k2"),
    ]);
    let (status, response) = app
        .post_as(
            None,
            &json!({ "query": PUSH_MANY, "variables": { "inputs": inputs } }),
        )
        .await;
    assert_eq!(status, 200, "part succeeded: {response}");
    let results = response["data"]["pushMessages"].as_array().unwrap();
    let statuses: Vec<&Value> = results.iter().map(|r| &r["status"]).collect();
    assert_eq!(
        statuses,
        [
            &json!("BUFFERED"),
            &Value::Null,
            &Value::Null,
            &Value::Null,
            &Value::Null,
            &json!("STORED")
        ],
        "{response}"
    );
    let errors: Vec<(Value, &str)> = response["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| (error["path"].clone(), code(error)))
        .collect();
    assert_eq!(
        errors,
        [
            (json!(["pushMessages", 1]), "CUSTOMER_MISMATCH"),
            (json!(["pushMessages", 2]), "MESSAGE_ID_CONFLICT"),
            (json!(["pushMessages", 3]), "CUSTOMER_MISMATCH"),
            (json!(["pushMessages", 4]), "MESSAGE_ID_CONFLICT"),
        ]
    );
    assert_eq!(app.consent("owned", true).await["storedCount"], 2);
    let texts = app
        .data(
            "{ messages(filter: {customerId: \"intruder\"}) { totalCount } }",
            json!({}),
        )
        .await;
    assert_eq!(
        texts["messages"]["totalCount"], 0,
        "nothing of the misuse was stored"
    );
}

for_each_setup!(
    messages_wait_in_the_buffer_until_consent_true_stores_them,
    consent_false_leaves_nothing_in_the_database,
    a_repeated_message_id_is_recorded_once,
    repeating_a_decision_changes_nothing,
    later_messages_follow_the_recorded_decision,
    withdrawing_consent_deletes_the_stored_dialog,
    consent_for_an_unknown_dialog_is_dialog_not_found,
    filters_match_language_case_insensitively_and_combine_with_and,
    paging_visits_every_dialog_once_in_both_directions_while_new_dialogs_arrive,
    after_and_before_bound_a_page_from_both_sides,
    invalid_cursors_and_inputs_are_named_errors_and_change_nothing,
    concurrent_pushes_to_one_dialog_keep_their_order,
    a_store_outage_during_consent_loses_nothing_and_a_retry_stores_once,
    a_store_outage_before_consent_is_written_keeps_the_buffer_for_a_retry,
    a_page_of_dialogs_loads_its_messages_in_one_store_query,
    pushing_to_a_buffered_dialog_costs_no_store_call,
    batched_requests_run_every_operation,
    a_batch_sees_decisions_written_after_it_looked_them_up,
    a_batch_opens_its_new_dialogs_together_and_does_not_wait_for_a_busy_one,
    messages_pushed_while_consent_is_written_are_stored_too,
    a_write_failing_half_way_leaves_nothing_and_a_retry_stores_once,
    push_messages_records_each_in_order_like_push_message,
    push_messages_validates_every_input_before_recording_any,
    push_messages_reports_misuse_by_index_and_records_the_rest,
);
