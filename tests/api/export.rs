//! Bulk export (issue 11): NDJSON, CSV and Parquet of the stored messages with the filters of `messages`,
//! streamed in batches, gzip when accepted; over real HTTP, on both stores.

use std::io::Read;

use dataapi::auth::Role;
use serde_json::Value;

use crate::helpers::{Backend, TestApp, run_with};
use crate::reading::store_dialog;

/// GET with the app's key and extra headers; status, headers and the raw body.
async fn get(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut request = app.http_client().get(app.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(key) = &app.key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

fn ndjson(body: &[u8]) -> Vec<Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn seed(app: &TestApp) {
    store_dialog(
        app,
        "ada",
        "x1",
        &[
            ("2026-11-01T10:00:00Z", "en"),
            ("2026-11-01T10:01:00Z", "de"),
        ],
        "2026-11-01T11:00:00Z",
    )
    .await;
    store_dialog(
        app,
        "bob",
        "x2",
        &[
            ("2026-11-02T10:00:00Z", "en"),
            ("2026-11-03T10:00:00Z", "de"),
        ],
        "2026-11-03T11:00:00Z",
    )
    .await;
    // Texts a CSV must quote, through the API (so that they are stored as a client sends them).
    app.push(
        "cy",
        "x3",
        "a, \"quoted\"\nsecond line; ünïcode ✓",
        "en",
        Some("k1"),
    )
    .await;
    app.consent("x3", true).await;
}

async fn every_format_exports_the_same_messages(app: TestApp) {
    seed(&app).await;
    // What the REST listing gives, oldest first: the export's default order.
    let listed = {
        let (status, _, body) = get(&app, "/data/?order=OLDEST_FIRST&limit=100", &[]).await;
        assert_eq!(status, 200);
        serde_json::from_slice::<Value>(&body).unwrap()["data"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert_eq!(listed.len(), 5);

    let (status, headers, body) = get(&app, "/export/messages.ndjson", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/x-ndjson");
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains("messages.ndjson")
    );
    assert_eq!(
        ndjson(&body),
        listed,
        "NDJSON holds the messages as the API shows them"
    );

    let (status, headers, body) = get(&app, "/export/messages.csv", &[]).await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let mut reader = csv::Reader::from_reader(body.as_slice());
    assert_eq!(
        reader.headers().unwrap(),
        vec![
            "id",
            "messageId",
            "dialogId",
            "customerId",
            "language",
            "createdAt",
            "text"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), listed.len());
    for (row, message) in rows.iter().zip(&listed) {
        assert_eq!(&row[0], message["id"].as_str().unwrap());
        assert_eq!(&row[1], message["messageId"].as_str().unwrap_or(""));
        assert_eq!(&row[5], message["createdAt"].as_str().unwrap());
        assert_eq!(&row[6], message["text"].as_str().unwrap());
    }

    let (status, headers, body) = get(&app, "/export/messages.parquet", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/vnd.apache.parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        axum::body::Bytes::from(body),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut exported = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let column = |name: &str| batch.column(batch.schema().index_of(name).unwrap()).clone();
        let id = column("id");
        let id = id
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .unwrap();
        let created = column("createdAt");
        let created = created
            .as_any()
            .downcast_ref::<arrow_array::TimestampMillisecondArray>()
            .expect("createdAt is a timestamp column");
        for row in 0..batch.num_rows() {
            exported.push((id.value(row).to_owned(), created.value(row)));
        }
    }
    let expected: Vec<(String, i64)> = listed
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                chrono::DateTime::parse_from_rfc3339(m["createdAt"].as_str().unwrap())
                    .unwrap()
                    .timestamp_millis(),
            )
        })
        .collect();
    assert_eq!(exported, expected);

    // The filters and the order of `messages`.
    let (_, _, body) = get(
        &app,
        "/export/messages.ndjson?language=DE&since=2026-11-01T10:00:30Z&until=2026-11-04T00:00:00Z",
        &[],
    )
    .await;
    let german: Vec<Value> = listed
        .iter()
        .filter(|m| m["language"] == "de")
        .cloned()
        .collect();
    assert_eq!(ndjson(&body), german);
    let (_, _, body) = get(
        &app,
        "/export/messages.ndjson?order=NEWEST_FIRST&customerId=bob",
        &[],
    )
    .await;
    let bob_newest_first: Vec<Value> = listed
        .iter()
        .filter(|m| m["customerId"] == "bob")
        .rev()
        .cloned()
        .collect();
    assert_eq!(ids(&ndjson(&body)), ids(&bob_newest_first));

    // gzip when accepted, for the text formats; Parquet is compressed inside.
    for format in ["ndjson", "csv"] {
        let (plain_status, _, plain) = get(&app, &format!("/export/messages.{format}"), &[]).await;
        let (status, headers, zipped) = get(
            &app,
            &format!("/export/messages.{format}"),
            &[("accept-encoding", "gzip")],
        )
        .await;
        assert_eq!((plain_status, status), (200, 200));
        assert_eq!(headers["content-encoding"], "gzip", "{format}");
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(zipped.as_slice())
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, plain, "{format}");
    }
    let (_, headers, _) = get(
        &app,
        "/export/messages.parquet",
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert!(headers.get("content-encoding").is_none());

    // Nothing matches: an empty file of the format (CSV: its header).
    let (status, _, body) = get(&app, "/export/messages.ndjson?customerId=nobody", &[]).await;
    assert_eq!((status, body.len()), (200, 0));
    let (_, _, body) = get(&app, "/export/messages.csv?customerId=nobody", &[]).await;
    assert_eq!(String::from_utf8(body).unwrap().lines().count(), 1);
}

async fn bad_export_requests_are_refused(app: TestApp) {
    for (query, field) in [
        ("limit=10", "query"),
        ("cursor=abc", "query"),
        ("page=2", "query"),
        ("language=english", "language"),
        ("since=soon", "since"),
        (
            "since=2026-11-02T00:00:00Z&until=2026-11-01T00:00:00Z",
            "until",
        ),
        ("order=UP", "query"),
    ] {
        let (status, headers, body) =
            get(&app, &format!("/export/messages.csv?{query}"), &[]).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(headers["content-type"], "application/problem+json");
        let problem: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["field"], field, "{query}: {problem}");
    }
    let (status, _, _) = get(&app, "/export/messages.xlsx", &[]).await;
    assert_eq!(status, 404);
    // The database down: a 503 with advice before any byte of a file.
    app.store.set_down(true);
    let (status, headers, body) = get(&app, "/export/messages.parquet", &[]).await;
    app.store.set_down(false);
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "5");
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["code"], "STORE_UNAVAILABLE");
}

for_each_store!(
    every_format_exports_the_same_messages,
    bad_export_requests_are_refused,
    the_change_export_is_the_feed_in_every_format
);

/// The change feed as a file: the same changes as GraphQL's `changes`, in every format, with the token
/// for next time in a header; a download after that token holds only what came since.
async fn the_change_export_is_the_feed_in_every_format(app: TestApp) {
    seed(&app).await;
    app.consent("x2", false).await;
    let feed = app
        .data(
            "{ changes(first: 1000) { token changes { __typename
                ... on MessageStored { change message { id dialogId text } }
                ... on DialogRemoved { change dialogId reason } } } }",
            serde_json::json!({}),
        )
        .await["changes"]
        .clone();
    let expected: Vec<(i64, String, String)> = feed["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let number = c["change"].as_str().unwrap().parse().unwrap();
            match c["__typename"].as_str().unwrap() {
                "MessageStored" => (
                    number,
                    "stored".to_owned(),
                    c["message"]["id"].as_str().unwrap().to_owned(),
                ),
                _ => (
                    number,
                    c["reason"].as_str().unwrap().to_lowercase(),
                    c["dialogId"].as_str().unwrap().to_owned(),
                ),
            }
        })
        .collect();
    // x2's messages were removed with it: the feed holds what is stored now, and the removal.
    assert_eq!(
        expected.len(),
        4,
        "3 messages stored, one dialog withdrawn: {feed}"
    );
    assert_eq!(expected[3].1, "withdrawn");
    let token = feed["token"].as_str().unwrap();

    let (status, headers, body) = get(&app, "/export/changes.ndjson", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["dataapi-change-token"], token);
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains("changes.ndjson")
    );
    let rows = ndjson(&body);
    let got: Vec<(i64, String, String)> = rows
        .iter()
        .map(|row| {
            let key = match row["kind"].as_str().unwrap() {
                "stored" => &row["id"],
                _ => &row["dialogId"],
            };
            (
                row["change"].as_i64().unwrap(),
                row["kind"].as_str().unwrap().to_owned(),
                key.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    // A removal names the dialog and when, nothing of the customer.
    let removal = &rows[3];
    assert_eq!(removal["dialogId"], "x2");
    assert!(removal["customerId"].is_null() && removal["text"].is_null());
    assert!(removal["removedAt"].as_str().unwrap().ends_with('Z'));

    let (status, headers, body) = get(&app, "/export/changes.csv", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["dataapi-change-token"], token);
    let mut reader = csv::Reader::from_reader(body.as_slice());
    assert_eq!(
        reader.headers().unwrap(),
        vec![
            "change",
            "kind",
            "dialogId",
            "id",
            "messageId",
            "customerId",
            "language",
            "createdAt",
            "text",
            "removedAt"
        ]
    );
    let csv_rows: Vec<(i64, String)> = reader
        .records()
        .map(|row| {
            let row = row.unwrap();
            (row[0].parse().unwrap(), row[1].to_owned())
        })
        .collect();
    assert_eq!(
        csv_rows,
        expected
            .iter()
            .map(|(n, kind, _)| (*n, kind.clone()))
            .collect::<Vec<_>>()
    );

    let (status, headers, body) = get(&app, "/export/changes.parquet", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["dataapi-change-token"], token);
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        axum::body::Bytes::from(body),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut numbers = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let change = batch
            .column(batch.schema().index_of("change").unwrap())
            .clone();
        let change = change
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .expect("change is an int64 column");
        let removed = batch
            .column(batch.schema().index_of("removedAt").unwrap())
            .clone();
        assert!(
            removed
                .as_any()
                .downcast_ref::<arrow_array::TimestampMillisecondArray>()
                .is_some(),
            "removedAt is a timestamp column"
        );
        numbers.extend(change.values().iter().copied());
    }
    assert_eq!(
        numbers,
        expected.iter().map(|(n, _, _)| *n).collect::<Vec<_>>()
    );

    // After the token: what came since, and only that.
    let (status, headers, body) =
        get(&app, &format!("/export/changes.ndjson?after={token}"), &[]).await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(headers["dataapi-change-token"], token);
    app.push("cy", "x3", "one more", "en", None).await;
    let (_, headers, body) = get(&app, &format!("/export/changes.ndjson?after={token}"), &[]).await;
    let since = ndjson(&body);
    assert_eq!(since.len(), 1);
    assert_eq!(since[0]["text"], "one more");
    assert_eq!(
        headers["dataapi-change-token"].to_str().unwrap(),
        since[0]["change"].to_string()
    );

    // Bad input: a 400 problem that names the parameter, before any byte of a file.
    let ahead = token.parse::<i64>().unwrap() + 100;
    for (query, field, code) in [
        ("after=abc".to_owned(), "after", "INVALID_CHANGE_TOKEN"),
        ("after=-1".to_owned(), "after", "INVALID_CHANGE_TOKEN"),
        (format!("after={ahead}"), "after", "INVALID_CHANGE_TOKEN"),
        ("after=1&after=2".to_owned(), "query", "BAD_USER_INPUT"),
        (
            "since=2026-11-01T00:00:00Z".to_owned(),
            "query",
            "BAD_USER_INPUT",
        ),
    ] {
        let (status, headers, body) =
            get(&app, &format!("/export/changes.parquet?{query}"), &[]).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(headers["content-type"], "application/problem+json");
        let problem: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (problem["field"].as_str(), problem["code"].as_str()),
            (Some(field), Some(code)),
            "{query}: {problem}"
        );
    }
}

async fn roles(mut app: TestApp) {
    for (key, status) in [
        (None, 401),
        (Some(crate::security::key(Role::Ingest)), 403),
        (Some(crate::security::key(Role::Read)), 200),
        (Some(crate::security::key(Role::Admin)), 200),
    ] {
        app.key = key.map(str::to_owned);
        let (got, _, _) = get(&app, "/export/messages.ndjson", &[]).await;
        assert_eq!(got, status, "{key:?}");
        let (got, _, _) = get(&app, "/export/changes.parquet", &[]).await;
        assert_eq!(got, status, "changes, {key:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_need_a_read_key() {
    run_with(Backend::Sqlite, crate::security::keyed_config(), roles).await;
}

/// More than one batch, in order and whole; exports held open by clients that do not read are bounded
/// (EXPORT_BUSY), and a client that goes away frees its place.
async fn large_and_concurrent_exports(app: TestApp) {
    let times: Vec<String> = (0..12_000)
        .map(|n| {
            chrono::DateTime::from_timestamp_millis(1_795_000_000_000 + n * 1000)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        })
        .collect();
    let messages: Vec<(&str, &str)> = times.iter().map(|t| (t.as_str(), "en")).collect();
    store_dialog(&app, "big", "big", &messages, "2026-11-28T00:00:00Z").await;
    let (status, _, body) = get(&app, "/export/messages.ndjson", &[]).await;
    assert_eq!(status, 200);
    let exported = ndjson(&body);
    assert_eq!(exported.len(), 12_000);
    assert!(
        exported
            .windows(2)
            .all(|pair| pair[0]["createdAt"].as_str() < pair[1]["createdAt"].as_str()),
        "oldest first, nothing repeated"
    );

    // Four exports whose clients read nothing hold every place.
    let mut held = Vec::new();
    for _ in 0..dataapi::export::EXPORTS_AT_ONCE {
        let response = app
            .http_client()
            .get(app.url("/export/messages.ndjson"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    let (status, headers, body) = get(&app, "/export/messages.csv", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "5");
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["code"],
        "EXPORT_BUSY"
    );
    // Those clients go away: their places come back.
    drop(held);
    let started = std::time::Instant::now();
    loop {
        let (status, _, _) = get(&app, "/export/messages.csv", &[]).await;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the places of abandoned exports did not come back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_stream_in_batches_and_are_bounded() {
    run_with(
        Backend::Sqlite,
        crate::helpers::test_config(),
        large_and_concurrent_exports,
    )
    .await;
}

/// README's pandas lines, run as they stand there (with this service's address and a read key), on the
/// export of known messages: Parquet filtered, NDJSON and CSV whole, times parsed as times.
async fn readme_pandas(mut app: TestApp) {
    app.key = Some(crate::security::key(Role::Admin).to_owned());
    seed(&app).await;
    let script = readme_python("### Bulk export (data scientists)")
        .replace("http://localhost:8000", &app.url(""))
        .replace("dak_…", crate::security::key(Role::Read))
        + "
assert len(german) == 2 and set(german.language) == {'de'}, german
assert str(german.createdAt.dtype).startswith('datetime64') and str(german.createdAt.dt.tz) == 'UTC', german.dtypes
assert len(lines) == 5 and str(lines.createdAt.dtype).startswith('datetime64'), lines.dtypes
assert len(table) == 5 and str(table.createdAt.dtype).startswith('datetime64'), table.dtypes
assert 'a, \"quoted\"\\nsecond line; ünïcode ✓' in set(table.text), table.text
assert frame.height == 5 and str(frame.schema['createdAt']).startswith('Datetime'), frame.schema
print('ok')
";
    run_python(script, None).await;
}

/// The first Python block after `heading` in README.md, as it stands there.
fn readme_python(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README has the section {heading}"));
    section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a Python block")
        .to_owned()
}

/// Runs `script` with the suite's Python (which has pandas and pyarrow), in `dir` if given; it must
/// succeed and print `ok`. Returns what it printed.
async fn run_python(script: String, dir: Option<std::path::PathBuf>) -> String {
    let python = std::env::var("SECANTUS_PYTHON").unwrap_or_else(|_| {
        panic!("SECANTUS_PYTHON is not set: run the suite with scripts/test, which installs pandas into .venv-test")
    });
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut command = std::process::Command::new(python);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child = command
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run Python");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && stdout.contains("ok"),
        "README's pandas lines failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// README's pymongo lines (the MongoDB data model), as they stand there, against this test's database.
async fn readme_pymongo(app: TestApp) {
    let Some(crate::helpers::TestDatabase::Mongo { url, name }) = app.database.clone() else {
        panic!("a MongoDB-backed app");
    };
    app.push("ada", "p1", "first words", "en", None).await;
    app.push("ada", "p1", "zweite", "de", None).await;
    app.push("ada", "p1", "last words", "en", None).await;
    app.consent("p1", true).await;
    let section = readme_python("With pymongo, for example:");
    assert!(section.contains("mongodb://127.0.0.1:27017/?replicaSet=rs0\").dataapi"));
    let script = section.replace(
        "mongodb://127.0.0.1:27017/?replicaSet=rs0\").dataapi",
        &format!("{url}\")[\"{name}\"]"),
    ) + "print('ok')\n";
    let printed = run_python(script, None).await;
    let texts: Vec<&str> = printed
        .lines()
        .filter(|line| line.contains(" p1 "))
        .map(|line| line.rsplit(" p1 ").next().unwrap())
        .collect();
    assert_eq!(texts, ["last words", "first words"], "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_pymongo_lines_read_the_stored_messages() {
    crate::helpers::run(Backend::Mongo, readme_pymongo).await;
}

/// Every stored message id, sorted, through `messages`.
async fn stored_ids(app: &TestApp) -> Vec<String> {
    let data = app
        .data(
            "{ messages(first: 1000) { nodes { id } } }",
            serde_json::json!({}),
        )
        .await;
    let mut ids: Vec<String> = data["messages"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// README's change-feed loop, as it stands there, run three times in one directory while dialogs are
/// consented, withdrawn and erased in between: each time its Parquet copy holds exactly the stored messages.
/// Then once more after losing its token (a sync cut short): the same copy.
async fn readme_change_feed_loop(mut app: TestApp) {
    app.key = Some(crate::security::key(Role::Admin).to_owned());
    let script = readme_python("### Keeping a copy in step: the change feed")
        .replace("http://localhost:8000", &app.url(""))
        .replace("dak_…", crate::security::key(Role::Read))
        + "
print('ids', ','.join(sorted(copy.id)))
assert str(copy.createdAt.dtype).startswith('datetime64'), copy.dtypes
print('ok')
";
    let dir = tempfile::tempdir().unwrap();
    let synced = |script: String| {
        let dir = dir.path().to_owned();
        async move {
            let printed = run_python(script, Some(dir)).await;
            let ids = printed
                .lines()
                .find_map(|line| line.strip_prefix("ids "))
                .unwrap()
                .to_owned();
            let mut ids: Vec<String> = ids
                .split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect();
            ids.sort();
            ids
        }
    };
    seed(&app).await;
    assert_eq!(synced(script.clone()).await, stored_ids(&app).await);
    assert_eq!(stored_ids(&app).await.len(), 5);

    app.consent("x2", false).await;
    app.push("cy", "x3", "later", "en", None).await;
    app.push("dee", "x4", "new", "en", None).await;
    app.consent("x4", true).await;
    app.data(
        "mutation { eraseCustomer(customerId: \"ada\") { dialogCount } }",
        serde_json::json!({}),
    )
    .await;
    let after = stored_ids(&app).await;
    assert_eq!(after.len(), 3, "x3's two messages and x4's");
    assert_eq!(synced(script.clone()).await, after);
    // Nothing new: the same copy.
    assert_eq!(synced(script.clone()).await, after);
    // A sync cut short before it saved its token reads again from the start: still the same copy.
    std::fs::remove_file(dir.path().join("messages.token")).unwrap();
    assert_eq!(synced(script).await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_change_feed_loop_keeps_a_parquet_copy_in_step() {
    run_with(
        Backend::Sqlite,
        crate::security::keyed_config(),
        readme_change_feed_loop,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_pandas_lines_load_every_format() {
    run_with(
        Backend::Sqlite,
        crate::security::keyed_config(),
        readme_pandas,
    )
    .await;
}
