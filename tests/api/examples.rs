//! examples/ (issue 11), run against a live service with a read key: the dashboard's TypeScript (types
//! generated from schema.graphql by GraphQL Code Generator, compiled by `tsc --strict`) and the Python
//! notebook script. Both must build, run and report exactly the data seeded here.

use std::path::Path;
use std::process::Command;

use dataapi::auth::Role;
use serde_json::Value;

use crate::helpers::{Backend, TestApp, run_with};

/// Two consented dialogs (three German messages, one English) and one refused.
async fn seed(app: &TestApp) {
    app.push("ada", "d1", "Hallo", "de", None).await;
    app.push("ada", "d1", "hello", "en", None).await;
    app.push("ada", "d1", "Danke", "de", None).await;
    app.consent("d1", true).await;
    app.push("bob", "d2", "hi", "en", None).await;
    app.consent("d2", false).await;
    app.push("cy", "d3", "Guten Tag", "de", None).await;
    app.consent("d3", true).await;
}

/// Runs `command` in `dir` with the service's address and a read key; it must succeed. Its stdout.
async fn run_example(mut command: Command, dir: &Path, app: &TestApp) -> String {
    command
        .current_dir(dir)
        .env("DATAAPI_URL", app.url("").trim_end_matches('/'))
        .env("DATAAPI_KEY", crate::security::key(Role::Read));
    let shown = format!("{command:?}");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|error| panic!("cannot run {shown}: {error}"));
    assert!(
        output.status.success(),
        "{shown} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The last line of `stdout`, as JSON.
fn report(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().last().expect("a report line")).unwrap()
}

async fn both_examples(mut app: TestApp) {
    app.key = Some(crate::security::key(Role::Admin).to_owned());
    seed(&app).await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");

    let dashboard = examples.join("dashboard");
    assert!(
        dashboard.join("node_modules").is_dir(),
        "examples/dashboard/node_modules is missing: run the suite with scripts/test, which installs it (npm ci)"
    );
    let mut build = Command::new("npm");
    build.args(["run", "--silent", "build"]);
    run_example(build, &dashboard, &app).await;
    let mut start = Command::new("node");
    start.args(["dist/dashboard.js", "2026-01-01T00:00:00Z"]);
    let typescript = report(&run_example(start, &dashboard, &app).await);
    let per_language: Vec<(String, i64)> = typescript["chart"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["language"].as_str().unwrap().to_owned(),
                row["messages"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        per_language,
        [("de".to_owned(), 3), ("en".to_owned(), 1)],
        "{typescript}"
    );
    let rate = typescript["consentRate"].as_f64().unwrap();
    assert!((rate - 2.0 / 3.0).abs() < 1e-9, "{typescript}");
    assert_eq!(
        typescript["german"],
        serde_json::json!(["Guten Tag", "Danke", "Hallo"]),
        "newest first, over two pages: {typescript}"
    );

    let python = std::env::var("SECANTUS_PYTHON").unwrap_or_else(|_| {
        panic!("SECANTUS_PYTHON is not set: run the suite with scripts/test, which installs pandas into .venv-test")
    });
    let mut notebook = Command::new(python);
    notebook.arg("notebook.py");
    let python = report(&run_example(notebook, &examples.join("python"), &app).await);
    assert_eq!(
        python["languages"],
        serde_json::json!(["de", "en"]),
        "{python}"
    );
    assert_eq!(python["messages"], 4);
    assert!((python["consent_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(
        python["german"],
        serde_json::json!(["Danke", "Guten Tag", "Hallo"])
    );
    assert_eq!(python["german_created_at_is_time"], true);
    assert_eq!(python["copy"], 4, "{python}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_and_python_examples_run_against_the_live_service() {
    run_with(
        Backend::Sqlite,
        crate::security::keyed_config(),
        both_examples,
    )
    .await;
}
