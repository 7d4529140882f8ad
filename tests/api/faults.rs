//! Real faults: a MongoDB-compatible server of the test's own is killed while the service runs, then
//! restarted. Needs SECANTUS_PYTHON (set by scripts/test), the interpreter that runs SecantusDB.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataapi::store::{MongoStore, Store};
use serde_json::json;

use crate::helpers::{TestApp, code};

/// A SecantusDB process on a fixed loopback port, in memory, that can be killed and started again.
struct KillableServer {
    python: String,
    port: u16,
    child: Option<Child>,
}

impl KillableServer {
    fn start() -> Self {
        let python = std::env::var("SECANTUS_PYTHON").unwrap_or_else(|_| {
            panic!("SECANTUS_PYTHON is not set: run the suite with scripts/test, which installs SecantusDB")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            python,
            port,
            child: None,
        };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?serverSelectionTimeoutMS=2000&connectTimeoutMS=1000",
            self.port
        )
    }

    fn restart(&mut self) {
        let child = Command::new(&self.python)
            .args([
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
            ])
            .args(["--storage-path", ":memory:", "--log-level", "WARNING"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start SecantusDB");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "SecantusDB did not listen on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill SecantusDB");
            child.wait().expect("reap SecantusDB");
        }
    }
}

impl Drop for KillableServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_killed_before_consent_loses_nothing_and_a_retry_after_restart_stores_once() {
    let mut server = KillableServer::start();
    let store = Arc::new(
        MongoStore::connect(&server.url(), "dataapi_faults")
            .await
            .expect("connect"),
    );
    let app = TestApp::start(store.clone()).await;

    for i in 0..5 {
        app.push(
            "kim",
            "outage",
            &format!("m{i}"),
            "en",
            Some(&format!("k{i}")),
        )
        .await;
    }
    server.kill();

    let started = Instant::now();
    let error = app.consent_error("outage", true).await;
    assert_eq!(code(&error), "STORE_UNAVAILABLE", "{error:#}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a dead database fails fast, not after minutes"
    );
    // The buffered dialog keeps accepting messages without the database.
    assert_eq!(
        app.push("kim", "outage", "m5", "en", Some("k5")).await["status"],
        "BUFFERED"
    );

    server.restart();
    // The driver notices the server again within a few heartbeats; retry as the background job would.
    let deadline = Instant::now() + Duration::from_secs(60);
    let consent = loop {
        let response = app
            .graphql(
                "mutation { giveConsent(dialogId: \"outage\", value: true) { storedCount } }",
                json!({}),
            )
            .await;
        if response.get("errors").is_none() {
            break response["data"]["giveConsent"].clone();
        }
        assert_eq!(
            code(&response["errors"][0]),
            "STORE_UNAVAILABLE",
            "{response:#}"
        );
        assert!(
            Instant::now() < deadline,
            "the restarted database never came back: {response:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        consent["storedCount"], 6,
        "every acknowledged push is stored"
    );
    assert_eq!(
        app.consent("outage", true).await["storedCount"],
        0,
        "and only once"
    );
    let data = app
        .data(
            "{ dialog(id: \"outage\") { messageCount messages { text } } }",
            json!({}),
        )
        .await;
    assert_eq!(data["dialog"]["messageCount"], 6);
    assert_eq!(store.count_messages(&Default::default()).await.unwrap(), 6);
}
