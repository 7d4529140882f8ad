//! Reading the data as data scientists and dashboards do (issue 11): time ranges and both orders, through
//! GraphQL and REST, with keyset cursors; on both stores.

use serde_json::{Value, json};

use crate::helpers::{TestApp, code};

/// A stored message as the tests compare them.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    id: String,
    dialog: String,
    language: String,
    at: String,
}

/// Pushes messages one after another, a few milliseconds apart (so that times differ), into dialogs of two
/// customers in two languages, and consents to all. Returns them oldest first.
async fn seed(app: &TestApp) -> Vec<Seen> {
    let plan = [
        ("ada", "d0", "en"),
        ("ada", "d0", "de"),
        ("bob", "d1", "en"),
        ("ada", "d2", "en"),
        ("bob", "d1", "de"),
        ("ada", "d3", "en"),
        ("ada", "d2", "de"),
        ("bob", "d4", "en"),
    ];
    let mut seen = Vec::new();
    for (n, (customer, dialog, language)) in plan.into_iter().enumerate() {
        let pushed = app
            .push(customer, dialog, &format!("message {n}"), language, None)
            .await;
        let message = &pushed["message"];
        seen.push(Seen {
            id: message["id"].as_str().unwrap().to_owned(),
            dialog: dialog.to_owned(),
            language: language.to_owned(),
            at: message["createdAt"].as_str().unwrap().to_owned(),
        });
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    for dialog in ["d0", "d1", "d2", "d3", "d4"] {
        app.consent(dialog, true).await;
    }
    seen
}

/// Every item of a GraphQL listing (`dialogs` or `messages`) with `filter` and `order`, paged by `size`
/// forwards (`first`/`after`) or backwards (`last`/`before`), in the list's order; and its `totalCount`.
async fn list_all(
    app: &TestApp,
    field: &str,
    filter: &Value,
    order: &str,
    size: usize,
    backwards: bool,
) -> (Vec<String>, u64) {
    let filter_type = if field == "dialogs" {
        "DialogFilter"
    } else {
        "MessageFilter"
    };
    let query = format!(
        "query($filter: {filter_type}, $first: Int, $after: String, $last: Int, $before: String) {{
            list: {field}(filter: $filter, first: $first, after: $after, last: $last, before: $before,
                          order: {order}) {{
                totalCount
                pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
                nodes {{ id }}
            }}
        }}"
    );
    let mut ids: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let variables = if backwards {
            json!({ "filter": filter, "last": size, "before": cursor })
        } else {
            json!({ "filter": filter, "first": size, "after": cursor })
        };
        let data = app.data(&query, variables).await;
        let list = &data["list"];
        let total = list["totalCount"].as_u64().unwrap();
        let page: Vec<String> = list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| node["id"].as_str().unwrap().to_owned())
            .collect();
        let info = &list["pageInfo"];
        if backwards {
            ids.splice(0..0, page);
            if !info["hasPreviousPage"].as_bool().unwrap() {
                return (ids, total);
            }
            cursor = Some(info["startCursor"].as_str().unwrap().to_owned());
        } else {
            ids.extend(page);
            if !info["hasNextPage"].as_bool().unwrap() {
                return (ids, total);
            }
            cursor = Some(info["endCursor"].as_str().unwrap().to_owned());
        }
    }
    panic!("paging did not end");
}

async fn time_ranges_and_both_orders(app: TestApp) {
    let messages = seed(&app).await;
    let at = |n: usize| messages[n].at.clone();
    // [since, until) over message times, including open ends and a window that cuts dialogs in two.
    let windows: Vec<(Option<String>, Option<String>)> = vec![
        (None, None),
        (Some(at(2)), None),
        (None, Some(at(5))),
        (Some(at(1)), Some(at(6))),
        (Some(at(3)), Some(at(4))),
    ];
    for (since, until) in &windows {
        let inside = |time: &str| {
            since.as_deref().is_none_or(|since| time >= since)
                && until.as_deref().is_none_or(|until| time < until)
        };
        for language in [None, Some("de")] {
            let mut filter = json!({ "since": since, "until": until });
            if let Some(language) = language {
                filter["language"] = json!(language);
            }
            let oldest_first: Vec<String> = messages
                .iter()
                .filter(|m| inside(&m.at) && language.is_none_or(|l| m.language == l))
                .map(|m| m.id.clone())
                .collect();
            let mut newest_first = oldest_first.clone();
            newest_first.reverse();
            for (order, expected) in [
                ("NEWEST_FIRST", &newest_first),
                ("OLDEST_FIRST", &oldest_first),
            ] {
                for backwards in [false, true] {
                    let (ids, total) =
                        list_all(&app, "messages", &filter, order, 2, backwards).await;
                    assert_eq!(
                        &ids, expected,
                        "messages {filter} {order} backwards={backwards}"
                    );
                    assert_eq!(total, expected.len() as u64, "{filter}");
                }
            }
        }

        // Dialogs by their latest message.
        let mut latest: Vec<(String, String)> = Vec::new();
        for message in &messages {
            match latest
                .iter_mut()
                .find(|(dialog, _)| *dialog == message.dialog)
            {
                Some(entry) => entry.1 = message.at.clone(),
                None => latest.push((message.dialog.clone(), message.at.clone())),
            }
        }
        latest.sort_by(|a, b| a.1.cmp(&b.1));
        let oldest_first: Vec<String> = latest
            .iter()
            .filter(|(_, last)| inside(last))
            .map(|(dialog, _)| dialog.clone())
            .collect();
        let mut newest_first = oldest_first.clone();
        newest_first.reverse();
        let filter = json!({ "since": since, "until": until });
        for (order, expected) in [
            ("NEWEST_FIRST", &newest_first),
            ("OLDEST_FIRST", &oldest_first),
        ] {
            for backwards in [false, true] {
                let (ids, total) = list_all(&app, "dialogs", &filter, order, 2, backwards).await;
                assert_eq!(
                    &ids, expected,
                    "dialogs {filter} {order} backwards={backwards}"
                );
                assert_eq!(total, expected.len() as u64);
            }
        }
    }

    // The same through REST, following the Link headers.
    let (since, until) = (at(1), at(6));
    let expected: Vec<String> = messages[1..6].iter().map(|m| m.id.clone()).collect();
    let mut url = Some(format!(
        "/data/?since={}&until={}&order=OLDEST_FIRST&limit=2",
        since.replace('+', "%2B"),
        until.replace('+', "%2B")
    ));
    let mut ids = Vec::new();
    while let Some(next) = url {
        let response = app.http_client().get(app.url(&next)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        url = response.headers().get("link").map(|link| {
            link.to_str()
                .unwrap()
                .split(['<', '>'])
                .nth(1)
                .unwrap()
                .to_owned()
        });
        let page: Value = response.json().await.unwrap();
        ids.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(ids, expected);
}

async fn bad_time_ranges_are_refused(app: TestApp) {
    let query = "query($filter: MessageFilter) { messages(filter: $filter) { totalCount } }";
    for (filter, expected_code) in [
        (
            json!({ "since": "2026-11-28T10:00:00Z", "until": "2026-11-28T10:00:00Z" }),
            "BAD_USER_INPUT",
        ),
        (
            json!({ "since": "2026-11-28T10:00:00Z", "until": "2026-11-28T09:00:00Z" }),
            "BAD_USER_INPUT",
        ),
        // Variables that are not date-times: the scalar says what it expects.
        (json!({ "since": "2026-11-28" }), "BAD_USER_INPUT"),
        (json!({ "until": "yesterday" }), "BAD_USER_INPUT"),
        (json!({ "since": 1764324000000i64 }), "BAD_USER_INPUT"),
    ] {
        let error = app.error(query, json!({ "filter": filter })).await;
        assert_eq!(code(&error), expected_code, "{filter}: {error}");
        if filter["until"]
            .as_str()
            .is_some_and(|until| until.starts_with("2026"))
        {
            assert_eq!(error["extensions"]["field"], "filter.until", "{error}");
        } else {
            assert!(
                error["message"].as_str().unwrap().contains("RFC 3339"),
                "{error}"
            );
        }
    }
    let error = app
        .error("{ dialogs(order: SIDEWAYS) { totalCount } }", json!({}))
        .await;
    assert_eq!(code(&error), "GRAPHQL_VALIDATION_FAILED");
    // Far ends of the calendar are ranges like any other.
    let data = app
        .data(
            query,
            json!({ "filter": { "since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999Z" } }),
        )
        .await;
    assert_eq!(data["messages"]["totalCount"], 0);

    for (query, field) in [
        (
            "since=2026-11-28T10:00:00Z&until=2026-11-28T10:00:00Z",
            "until",
        ),
        ("since=yesterday", "since"),
        // An unencoded `+` is a space in a query string.
        ("since=2026-11-28T10:00:00+01:00", "since"),
        ("order=SIDEWAYS", "query"),
        ("order=newest_first", "query"),
    ] {
        let response = app
            .http_client()
            .get(app.url(&format!("/data/?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "BAD_USER_INPUT", "{query}");
        assert_eq!(problem["field"], field, "{query}: {problem}");
    }
}

for_each_store!(time_ranges_and_both_orders, bad_time_ranges_are_refused);

/// A database made by an earlier version has `messages.dialog_order` (dialogId, seq), which sorted a
/// dialog's page by `_id` in memory: starting on it replaces the index with `dialog_recent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_dialog_index_is_replaced_on_mongodb() {
    let url = crate::helpers::mongodb_url();
    let name = format!("dataapi_test_index_{}", uuid::Uuid::now_v7().simple());
    let client = ::mongodb::Client::with_uri_str(&url).await.unwrap();
    let messages = client
        .database(&name)
        .collection::<::mongodb::bson::Document>("messages");
    messages
        .create_index(
            ::mongodb::IndexModel::builder()
                .keys(::mongodb::bson::doc! { "dialogId": 1, "seq": 1 })
                .options(
                    ::mongodb::options::IndexOptions::builder()
                        .name("dialog_order".to_owned())
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let store = dataapi::store::MongoStore::connect(&url, &name).await;
    let names = messages.list_index_names().await.unwrap();
    client.database(&name).drop().await.unwrap();
    store.expect("the store opens on the old layout");
    assert!(names.contains(&"dialog_recent".to_owned()), "{names:?}");
    assert!(!names.contains(&"dialog_order".to_owned()), "{names:?}");
}
