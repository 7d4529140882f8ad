//! GraphiQL works in a real browser: headless Chromium (Debian's package) loads the page from the service,
//! runs the default `dialogs` query and shows the result. The screenshot is kept in `test-artifacts/`.

use std::process::Command;

use crate::helpers::{Backend, TestApp, run};

async fn graphiql_runs_the_default_query(app: TestApp) {
    browse(app, None).await;
}

/// With keys: the key typed into the Headers tab after the page opened loads the schema and runs queries,
/// and is remembered.
async fn graphiql_with_a_key_typed_in(mut app: TestApp) {
    app.key = Some(crate::security::key(dataapi::auth::Role::Admin).to_owned());
    browse(app, Some(crate::security::key(dataapi::auth::Role::Read))).await;
}

async fn browse(app: TestApp, key: Option<&'static str>) {
    app.push("ada", "graphiql-demo", "Where is my parcel?", "en", None)
        .await;
    app.consent("graphiql-demo", true).await;

    let root = env!("CARGO_MANIFEST_DIR");
    let artifacts = std::path::Path::new(root).join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join(if key.is_some() {
        "graphiql-keyed.png"
    } else {
        "graphiql.png"
    });
    let _ = std::fs::remove_file(&screenshot);

    let script = format!("{root}/tests/browser/graphiql.mjs");
    assert!(
        std::path::Path::new(&format!(
            "{root}/tests/browser/node_modules/playwright-core"
        ))
        .exists(),
        "tests/browser/node_modules is missing: run scripts/test, which installs it (npm ci)"
    );
    let base_url = app.url("/");
    let shot = screenshot.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(base_url)
            .arg(&shot)
            .arg("Where is my parcel?")
            .args(key)
            .output()
    })
    .await
    .unwrap()
    .expect("node must be installed to run the browser test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "GraphiQL browser run failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("graphiql-demo"),
        "the result pane shows the dialog: {stdout}"
    );
    assert!(
        screenshot.metadata().unwrap().len() > 10_000,
        "a real screenshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_in_headless_chromium_runs_a_dialogs_query_offline() {
    run(Backend::Sqlite, graphiql_runs_the_default_query).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_loads_the_schema_once_a_key_is_typed_and_remembers_it() {
    crate::helpers::run_with(
        Backend::Sqlite,
        crate::security::keyed_config(),
        graphiql_with_a_key_typed_in,
    )
    .await;
}
