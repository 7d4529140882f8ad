//! Reading the data as data scientists and dashboards do (issue 11): time ranges and both orders, through
//! GraphQL and REST, with keyset cursors; statistics by language, customer and time bucket in a time zone,
//! and of consent decisions; on both stores.

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
    // A dashboard's optional order variable, left out or null: the default order.
    for variables in [json!({}), json!({ "o": null })] {
        let data = app
            .data(
                "query($o: ListOrder) { dialogs(order: $o) { totalCount } messages(order: $o) { totalCount } }",
                variables,
            )
            .await;
        assert_eq!(data["dialogs"]["totalCount"], 0);
    }
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

/// Milliseconds since the epoch of an RFC 3339 time.
fn ms(time: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time)
        .unwrap()
        .timestamp_millis()
}

/// Stores a consented dialog straight through the store, its messages at the given times and its decision
/// at `decided`, so that statistics can be checked against known times.
pub(crate) async fn store_dialog(
    app: &TestApp,
    customer: &str,
    dialog: &str,
    messages: &[(&str, &str)],
    decided: &str,
) {
    store_dialog_texts(app, customer, dialog, messages, decided, None).await;
}

/// Like [`store_dialog`], every message with `text`.
pub(crate) async fn store_dialog_with_text(
    app: &TestApp,
    customer: &str,
    dialog: &str,
    messages: &[(&str, &str)],
    decided: &str,
    text: &str,
) {
    store_dialog_texts(app, customer, dialog, messages, decided, Some(text)).await;
}

async fn store_dialog_texts(
    app: &TestApp,
    customer: &str,
    dialog: &str,
    messages: &[(&str, &str)],
    decided: &str,
    text: Option<&str>,
) {
    use dataapi::model::{CustomerId, DialogId, Language, Message, MessageText};
    let customer_id = CustomerId::parse("customerId", customer).unwrap();
    let dialog_id = DialogId::parse("dialogId", dialog).unwrap();
    let messages = messages
        .iter()
        .enumerate()
        .map(|(n, (at, language))| {
            let created_at = ms(at);
            Message {
                id: Message::id_text(Message::server_id(&dialog_id, None)),
                client_id: None,
                dialog_id: dialog_id.clone(),
                customer_id: customer_id.clone(),
                text: MessageText::parse(
                    "text",
                    text.map_or_else(|| format!("message {n}"), str::to_owned),
                )
                .unwrap(),
                language: Language::parse("language", language).unwrap(),
                created_at,
                seq: created_at * 1000 + n as i64,
            }
        })
        .collect();
    decide(app, customer, dialog, true, decided, messages).await;
}

async fn decide(
    app: &TestApp,
    customer: &str,
    dialog: &str,
    value: bool,
    at: &str,
    messages: Vec<dataapi::model::Message>,
) {
    use dataapi::store::Store;
    let decision = dataapi::store::Decision {
        dialog_id: dataapi::model::DialogId::parse("dialogId", dialog).unwrap(),
        customer_id: dataapi::model::CustomerId::parse("customerId", customer).unwrap(),
        value,
        at: ms(at),
    };
    app.store
        .record_decision(&decision, messages)
        .await
        .expect("record a decision");
}

const STATS: &str =
    "query($filter: MessageFilter, $by: [StatsDimension!], $bucket: TimeBucket, $zone: String) {
    stats(filter: $filter, groupBy: $by, bucket: $bucket, timeZone: $zone) {
        language customerId bucketStart messageCount dialogCount
    }
}";

const CONSENT_STATS: &str = "query($filter: ConsentStatsFilter, $bucket: TimeBucket, $zone: String) {
    consentStats(filter: $filter, bucket: $bucket, timeZone: $zone) { bucketStart granted refused withdrawn }
}";

/// `stats` as `(language, customer, bucket start in ms, messages, dialogs)` rows.
async fn stats(
    app: &TestApp,
    filter: Value,
    by: &[&str],
    bucket: Option<&str>,
    zone: &str,
) -> Vec<(Option<String>, Option<String>, Option<i64>, u64, u64)> {
    let data = app
        .data(
            STATS,
            json!({ "filter": filter, "by": by, "bucket": bucket, "zone": zone }),
        )
        .await;
    data["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| {
            (
                group["language"].as_str().map(str::to_owned),
                group["customerId"].as_str().map(str::to_owned),
                group["bucketStart"].as_str().map(ms),
                group["messageCount"].as_u64().unwrap(),
                group["dialogCount"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `consentStats` as `(bucket start in ms, granted, refused, withdrawn)` rows.
async fn consent_stats(
    app: &TestApp,
    filter: Value,
    bucket: Option<&str>,
    zone: &str,
) -> Vec<(Option<i64>, u64, u64, u64)> {
    let data = app
        .data(
            CONSENT_STATS,
            json!({ "filter": filter, "bucket": bucket, "zone": zone }),
        )
        .await;
    data["consentStats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| {
            (
                group["bucketStart"].as_str().map(ms),
                group["granted"].as_u64().unwrap(),
                group["refused"].as_u64().unwrap(),
                group["withdrawn"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Statistics around Europe/Berlin's clock change of 2026-10-25 (01:00 UTC, from +02:00 to +01:00), in
/// every bucket, grouped and filtered; and consent decisions with a refusal and a withdrawal.
async fn statistics_by_language_customer_and_local_time(app: TestApp) {
    store_dialog(
        &app,
        "ada",
        "s1",
        &[
            ("2026-10-24T21:30:00Z", "en"),
            ("2026-10-24T22:30:00Z", "en"),
        ],
        "2026-10-24T23:00:00Z",
    )
    .await;
    store_dialog(
        &app,
        "bob",
        "s2",
        &[("2026-10-25T23:30:00Z", "de")],
        "2026-10-26T00:00:00Z",
    )
    .await;
    store_dialog(
        &app,
        "bob",
        "s3",
        &[("2026-11-02T10:00:00Z", "en")],
        "2026-11-02T11:00:00Z",
    )
    .await;
    store_dialog(
        &app,
        "ada",
        "s4",
        &[
            ("2026-11-30T23:30:00Z", "en"),
            ("2026-12-01T00:30:00Z", "de"),
        ],
        "2026-12-01T01:00:00Z",
    )
    .await;
    let none = |messages, dialogs, at: &str| (None, None, Some(ms(at)), messages, dialogs);

    // Local days: the 25th is 25 hours long and starts at +02:00, the 26th at +01:00.
    assert_eq!(
        stats(&app, json!({}), &[], Some("DAY"), "Europe/Berlin").await,
        [
            none(1, 1, "2026-10-24T00:00:00+02:00"),
            none(1, 1, "2026-10-25T00:00:00+02:00"),
            none(1, 1, "2026-10-26T00:00:00+01:00"),
            none(1, 1, "2026-11-02T00:00:00+01:00"),
            none(2, 1, "2026-12-01T00:00:00+01:00"),
        ]
    );
    // The same messages by UTC days (the default zone).
    let data = app.data(STATS, json!({ "bucket": "DAY" })).await;
    let utc_days: Vec<(&str, u64)> = data["stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["bucketStart"].as_str().unwrap(),
                g["messageCount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        utc_days,
        [
            ("2026-10-24T00:00:00.000Z", 2),
            ("2026-10-25T00:00:00.000Z", 1),
            ("2026-11-02T00:00:00.000Z", 1),
            ("2026-11-30T00:00:00.000Z", 1),
            ("2026-12-01T00:00:00.000Z", 1),
        ]
    );
    // Weeks start on Monday; months on the 1st, local.
    assert_eq!(
        stats(&app, json!({}), &[], Some("WEEK"), "Europe/Berlin").await,
        [
            none(2, 1, "2026-10-19T00:00:00+02:00"),
            none(1, 1, "2026-10-26T00:00:00+01:00"),
            none(1, 1, "2026-11-02T00:00:00+01:00"),
            none(2, 1, "2026-11-30T00:00:00+01:00"),
        ]
    );
    assert_eq!(
        stats(&app, json!({}), &[], Some("MONTH"), "Europe/Berlin").await,
        [
            none(3, 2, "2026-10-01T00:00:00+02:00"),
            none(1, 1, "2026-11-01T00:00:00+01:00"),
            none(2, 1, "2026-12-01T00:00:00+01:00"),
        ]
    );
    // By language and customer, without time; then totals with a filter and a range.
    let group = |language: &str, customer: &str, messages, dialogs| {
        (
            Some(language.to_owned()),
            Some(customer.to_owned()),
            None,
            messages,
            dialogs,
        )
    };
    assert_eq!(
        stats(&app, json!({}), &["LANGUAGE", "CUSTOMER"], None, "UTC").await,
        [
            group("de", "ada", 1, 1),
            group("de", "bob", 1, 1),
            group("en", "ada", 3, 2),
            group("en", "bob", 1, 1)
        ]
    );
    assert_eq!(
        stats(
            &app,
            json!({ "language": "EN", "since": "2026-10-25T00:00:00Z", "until": "2026-12-01T00:00:00Z" }),
            &[],
            None,
            "UTC"
        )
        .await,
        [(None, None, None, 2, 2)]
    );
    // A repeated local hour is two buckets: 02:30 at +02:00 and 02:30 at +01:00.
    store_dialog(
        &app,
        "cy",
        "s5",
        &[
            ("2026-10-25T00:30:00Z", "en"),
            ("2026-10-25T01:30:00Z", "en"),
        ],
        "2026-10-25T02:00:00Z",
    )
    .await;
    assert_eq!(
        stats(
            &app,
            json!({ "dialogId": "s5" }),
            &[],
            Some("HOUR"),
            "Europe/Berlin"
        )
        .await,
        [
            none(1, 1, "2026-10-25T00:00:00Z"),
            none(1, 1, "2026-10-25T01:00:00Z")
        ]
    );
    // India is 5:30 ahead of UTC: its hours start at half past UTC hours.
    assert_eq!(
        stats(
            &app,
            json!({ "dialogId": "s5" }),
            &[],
            Some("HOUR"),
            "Asia/Kolkata"
        )
        .await,
        [
            none(1, 1, "2026-10-25T00:30:00Z"),
            none(1, 1, "2026-10-25T01:30:00Z")
        ]
    );

    // Consent decisions: five dialogs consented, one refused, one consent withdrawn.
    decide(&app, "cy", "r1", false, "2026-12-01T02:00:00Z", Vec::new()).await;
    decide(&app, "bob", "s3", false, "2026-12-02T00:00:00Z", Vec::new()).await;
    assert_eq!(
        consent_stats(&app, json!({}), None, "UTC").await,
        [(None, 5, 1, 1)]
    );
    assert_eq!(
        consent_stats(&app, json!({}), Some("DAY"), "UTC").await,
        [
            (Some(ms("2026-10-24T00:00:00Z")), 1, 0, 0),
            (Some(ms("2026-10-25T00:00:00Z")), 1, 0, 0),
            (Some(ms("2026-10-26T00:00:00Z")), 1, 0, 0),
            (Some(ms("2026-11-02T00:00:00Z")), 1, 0, 0),
            (Some(ms("2026-12-01T00:00:00Z")), 1, 1, 0),
            (Some(ms("2026-12-02T00:00:00Z")), 0, 0, 1),
        ]
    );
    assert_eq!(
        consent_stats(&app, json!({ "customerId": "bob" }), None, "UTC").await,
        [(None, 2, 0, 1)]
    );
    assert_eq!(
        consent_stats(
            &app,
            json!({ "since": "2026-12-01T00:00:00Z" }),
            Some("MONTH"),
            "Europe/Berlin"
        )
        .await,
        [(Some(ms("2026-12-01T00:00:00+01:00")), 1, 1, 1)]
    );
    // A withdrawal removed s3's message from the message statistics too.
    assert_eq!(
        stats(&app, json!({ "customerId": "bob" }), &[], None, "UTC").await,
        [(None, None, None, 1, 1)]
    );
    // Nothing stored at all in a range: no group, even without grouping... but totals of zero.
    assert_eq!(
        consent_stats(
            &app,
            json!({ "since": "2030-01-01T00:00:00Z" }),
            None,
            "UTC"
        )
        .await,
        []
    );
}

async fn statistics_refuse_bad_input(app: TestApp) {
    for (variables, field) in [
        (json!({ "zone": "Mars/Olympus" }), "timeZone"),
        (json!({ "zone": "" }), "timeZone"),
        (
            json!({ "filter": { "since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z" } }),
            "filter.until",
        ),
        (
            json!({ "filter": { "language": "klingon language" } }),
            "filter.language",
        ),
    ] {
        let error = app.error(STATS, variables.clone()).await;
        assert_eq!(code(&error), "BAD_USER_INPUT", "{variables}: {error}");
        assert_eq!(error["extensions"]["field"], field, "{error}");
    }
    let error = app
        .error(CONSENT_STATS, json!({ "zone": "Europe/Nowhere" }))
        .await;
    assert_eq!(code(&error), "BAD_USER_INPUT");
    let error = app
        .error(
            "{ stats(groupBy: [LANGUAGE], bucket: FORTNIGHT) { messageCount } }",
            json!({}),
        )
        .await;
    assert_eq!(code(&error), "GRAPHQL_VALIDATION_FAILED");
}

for_each_store!(
    time_ranges_and_both_orders,
    bad_time_ranges_are_refused,
    statistics_by_language_customer_and_local_time,
    statistics_refuse_bad_input,
);

/// More groups than MAX_STATS_GROUPS: refused with the advice to narrow the query, not cut silently; and a
/// statistics query counts as several store calls of the request's allowance.
async fn statistics_are_bounded(app: TestApp) {
    for customer in ["a", "b", "c"] {
        store_dialog(
            &app,
            customer,
            &format!("d-{customer}"),
            &[("2026-11-01T10:00:00Z", "en")],
            "2026-11-01T11:00:00Z",
        )
        .await;
    }
    let error = app
        .error("{ stats(groupBy: [CUSTOMER]) { customerId } }", json!({}))
        .await;
    assert_eq!(code(&error), "RESPONSE_TOO_LARGE", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("MAX_STATS_GROUPS")
    );
    assert_eq!(
        stats(
            &app,
            json!({ "customerId": "a" }),
            &["CUSTOMER"],
            None,
            "UTC"
        )
        .await
        .len(),
        1
    );
    // MAX_STORE_CALLS is 12 here: two statistics fit (5 calls each), a third does not.
    let response = app
        .graphql(
            "{ a: stats { messageCount } b: stats { messageCount } c: consentStats { granted } }",
            json!({}),
        )
        .await;
    assert_eq!(response["data"]["a"][0]["messageCount"], 3);
    assert_eq!(
        code(&response["errors"][0]),
        "STORE_CALLS_EXCEEDED",
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_have_bounds() {
    let mut config = crate::helpers::test_config();
    config.limits.max_stats_groups = 2;
    config.limits.max_store_calls = 12;
    crate::helpers::run_with(
        crate::helpers::Backend::Sqlite,
        config,
        statistics_are_bounded,
    )
    .await;
}

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
