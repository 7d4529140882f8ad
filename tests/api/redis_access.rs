//! Reaching a protected Redis: an ACL user and password in `BUFFER_URL`, and TLS (`rediss://`) with a
//! private certificate authority. Credentials never appear in errors or logs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dataapi::config::{BufferBackend, Config};
use serde_json::json;

use crate::helpers::test_config;
use crate::redis_support::{RedisProcess, fresh_prefix};

fn with_buffer(url: String) -> Config {
    let mut config = test_config();
    config.buffer.backend = BufferBackend::Redis {
        urls: vec![url],
        key_prefix: fresh_prefix(),
    };
    config.buffer.timeout = Duration::from_secs(2);
    config
}

/// An error message of `open_buffer`, or `None` if it connected.
async fn open_error(config: &Config) -> Option<String> {
    dataapi::app::open_buffer(config)
        .await
        .err()
        .map(|error| error.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_in_the_url_reaches_redis_and_a_wrong_password_stops_startup_unechoed() {
    // The default user is off; `dataapi` has exactly the rights README lists, on the test's keys only.
    let redis = RedisProcess::start_with(
        false,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "dataapi",
            "on",
            ">s3cret-pass",
            "~test.*",
            "+@read",
            "+@write",
            "+@scripting",
            "+@connection",
            "+info",
            "+time",
            "+config|get",
        ],
    );
    let port = redis.port;
    let right = with_buffer(format!("redis://dataapi:s3cret-pass@127.0.0.1:{port}"));
    assert_eq!(open_error(&right).await, None);
    let data = tempfile::tempdir().unwrap();
    let store = dataapi::store::SqliteStore::open(&data.path().join("t.sqlite3"))
        .await
        .unwrap();
    let app = crate::helpers::TestApp::start_with(std::sync::Arc::new(store), right).await;
    assert_eq!(
        app.push("c", "d", "hello", "en", None).await["status"],
        "BUFFERED"
    );
    assert_eq!(app.consent("d", true).await["storedCount"], 1);
    app.push("c", "d2", "erase me", "en", None).await;
    let erased = app
        .data(
            "mutation { eraseCustomer(customerId: \"c\") { bufferedMessageCount } }",
            json!({}),
        )
        .await;
    assert_eq!(erased["eraseCustomer"]["bufferedMessageCount"], 1);
    assert_eq!(
        app.metrics_text()
            .await
            .lines()
            .find(|line| line.starts_with("dataapi_buffer_messages "))
            .unwrap(),
        "dataapi_buffer_messages 0"
    );

    for url in [
        format!("redis://dataapi:wrong-pass@127.0.0.1:{port}"),
        format!("redis://127.0.0.1:{port}"),
    ] {
        let error = open_error(&with_buffer(url.clone()))
            .await
            .unwrap_or_else(|| panic!("{url} must be refused"));
        assert!(!error.contains("pass"), "no password in: {error}");
        assert!(
            error.to_ascii_lowercase().contains("auth")
                || error.to_ascii_lowercase().contains("noperm")
                || error.to_ascii_lowercase().contains("password"),
            "says what is wrong: {error}"
        );
    }
}

/// A certificate authority and a certificate for localhost signed by it, made with openssl.
fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (apt-get install openssl; scripts/test installs it)");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=dataapi-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "redis.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// The binary on the embedded store with `BUFFER_URL` and the given extra environment; returns whether it
/// became ready, and what it printed.
async fn run_binary(buffer_url: &str, extra_env: &[(&str, String)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::helpers::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dataapi"))
        .current_dir(dir.path())
        .env_clear()
        .env("BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG", "info")
        .env("BUFFER_URL", buffer_url)
        .env("BUFFER_TIMEOUT", "3s")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::fs::File::create(dir.path().join("out.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err.log")).unwrap())
        .spawn()
        .expect("start dataapi");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = false;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}/ready"))
            .send()
            .await
            && response.status() == 200
        {
            // And it buffers through TLS.
            let push = client
                .post(format!("http://127.0.0.1:{port}/graphql"))
                .json(&json!({ "query": "mutation { pushMessage(input: {customerId: \"c\", dialogId: \"d\", text: \"hi\", language: \"en\"}) { status } }" }))
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap();
            ready = push["data"]["pushMessage"]["status"] == "BUFFERED";
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let output = std::fs::read_to_string(dir.path().join("out.log")).unwrap()
        + &std::fs::read_to_string(dir.path().join("err.log")).unwrap();
    (ready, output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_authority_named_by_ssl_cert_file_and_refused_without_it() {
    let certificates = tempfile::tempdir().unwrap();
    make_certificates(certificates.path());
    let path = |name: &str| certificates.path().join(name).display().to_string();
    let (cert, key, ca) = (path("redis.crt"), path("redis.key"), path("ca.crt"));
    let redis = RedisProcess::start_with(
        false,
        &[
            "--port",
            "0",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    );
    let url = format!("rediss://localhost:{}", redis.port);
    let (ready, output) = run_binary(&url, &[("SSL_CERT_FILE", ca.clone())]).await;
    assert!(ready, "reaches Redis over TLS: {output}");
    assert!(output.contains("buffer=Redis at localhost"), "{output}");

    // Without the authority, the server's certificate is not trusted: startup fails and says so.
    let (ready, output) = run_binary(&url, &[("SSL_CERT_FILE", "/dev/null".to_owned())]).await;
    assert!(!ready, "an untrusted certificate is refused");
    assert!(
        output.contains("BUFFER_URL") && output.to_ascii_lowercase().contains("certificate"),
        "says why: {output}"
    );
    // And plain redis:// to a TLS port does not get through either.
    let (ready, _) = run_binary(&format!("redis://localhost:{}", redis.port), &[]).await;
    assert!(!ready);
}

/// A redis-server in Sentinel mode of the test's own, watching `primary` as `mymaster`.
struct SentinelProcess {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl SentinelProcess {
    fn start(primary: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::helpers::free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let child = Command::new(binary)
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        Self {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks a node (or a sentinel) something, until `done` likes the answer or 30 s have passed.
async fn until_answer<T: redis::FromRedisValue>(
    port: u16,
    command: &[&str],
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            && let Ok(mut connection) = client.get_multiplexed_async_connection().await
        {
            let mut cmd = redis::cmd(command[0]);
            for arg in &command[1..] {
                cmd.arg(*arg);
            }
            if let Ok(answer) = cmd.query_async::<T>(&mut connection).await
                && done(&answer)
            {
                return answer;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer to {command:?} on {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_the_buffer_continues_on_the_new_primary() {
    let primary = RedisProcess::start(false);
    let replica_of = primary.port.to_string();
    let replica = RedisProcess::start_with(false, &["--replicaof", "127.0.0.1", &replica_of]);
    let sentinel = SentinelProcess::start(primary.port);
    // The sentinel has found the replica (it can fail over to it).
    until_answer::<Vec<redis::Value>>(
        sentinel.port,
        &["SENTINEL", "REPLICAS", "mymaster"],
        |replicas| !replicas.is_empty(),
    )
    .await;
    let config = with_buffer(format!(
        "redis+sentinel://127.0.0.1:{}/mymaster",
        sentinel.port
    ));
    let data = tempfile::tempdir().unwrap();
    let store = dataapi::store::SqliteStore::open(&data.path().join("t.sqlite3"))
        .await
        .unwrap();
    let app = crate::helpers::TestApp::start_with(std::sync::Arc::new(store), config).await;
    app.push("c", "d", "before", "en", Some("m1")).await;
    // Replicated before the failover (replication is asynchronous: a failover loses what the replica had
    // not received yet, see README).
    until_answer::<i64>(primary.port, &["WAIT", "1", "1000"], |acked| *acked == 1).await;

    until_answer::<String>(sentinel.port, &["SENTINEL", "FAILOVER", "mymaster"], |ok| {
        ok == "OK"
    })
    .await;
    let new_primary = replica.port.to_string();
    until_answer::<Vec<String>>(
        sentinel.port,
        &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        |address| address.get(1) == Some(&new_primary),
    )
    .await;

    // The first calls after the failover may fail (BUFFER_UNAVAILABLE, retried as the job would); then
    // the service works on the new primary, with what the old one had.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = app
            .graphql(
                "mutation($i: PushMessageInput!) { pushMessage(input: $i) { status } }",
                json!({ "i": { "customerId": "c", "dialogId": "d", "text": "after", "language": "en",
                               "messageId": "m2" } }),
            )
            .await;
        if answer["data"]["pushMessage"]["status"] == "BUFFERED" {
            break;
        }
        assert_eq!(
            answer["errors"][0]["extensions"]["code"], "BUFFER_UNAVAILABLE",
            "{answer}"
        );
        assert!(Instant::now() < deadline, "never reached the new primary");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.consent("d", true).await["storedCount"], 2);
}
