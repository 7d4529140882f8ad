//! Live updates (issue 11): GraphQL subscriptions over WebSocket, both protocols, fed by the change feed:
//! what any replica stores or removes reaches every subscriber in commit order; a subscriber resumes from
//! a token; the key goes in `connection_init`; subscriptions per key are bounded; a subscriber that falls
//! behind is disconnected with close code 4008. Over real WebSockets, on both stores and every buffer.

use std::time::Duration;

use dataapi::auth::Role;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{TestApp, run_with};

pub const NEW: &str = "graphql-transport-ws";
const LEGACY: &str = "graphql-ws";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A subscriber's connection.
pub struct Subscriber {
    socket: Socket,
    protocol: &'static str,
}

/// Opens a WebSocket to `/graphql` with `protocol` and extra `headers`; the HTTP status if refused.
pub async fn open(
    app: &TestApp,
    protocol: &'static str,
    headers: &[(&str, &str)],
) -> Result<Subscriber, u16> {
    let mut request = app
        .url("/graphql")
        .replace("http://", "ws://")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    for (name, value) in headers {
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(Subscriber { socket, protocol }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(error) => panic!("cannot connect: {error}"),
    }
}

impl Subscriber {
    /// Connects and sends `connection_init` with `payload`; returns the answer (`connection_ack`, or a
    /// close as `{"close": code, "reason": …}`).
    pub async fn connect(app: &TestApp, protocol: &'static str, payload: Value) -> (Self, Value) {
        let mut subscriber = open(app, protocol, &[])
            .await
            .expect("the upgrade is accepted");
        subscriber
            .send(json!({ "type": "connection_init", "payload": payload }))
            .await;
        let answer = subscriber.next().await;
        (subscriber, answer)
    }

    /// Connects with `key` and expects the acknowledgement.
    pub async fn ready(app: &TestApp, protocol: &'static str, key: Option<&str>) -> Self {
        let payload = match key {
            Some(key) => json!({ "Authorization": format!("Bearer {key}") }),
            None => json!({}),
        };
        let (subscriber, answer) = Self::connect(app, protocol, payload).await;
        assert_eq!(answer["type"], "connection_ack", "{answer}");
        subscriber
    }

    async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    /// Starts subscription `id`.
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = if self.protocol == NEW {
            "subscribe"
        } else {
            "start"
        };
        self.send(json!({ "id": id, "type": kind, "payload": { "query": query, "variables": variables } }))
            .await;
    }

    /// Ends subscription `id`.
    pub async fn stop(&mut self, id: &str) {
        let kind = if self.protocol == NEW {
            "complete"
        } else {
            "stop"
        };
        self.send(json!({ "id": id, "type": kind })).await;
    }

    /// The next message, as JSON; a close frame as `{"close": code, "reason": …}`, the end as
    /// `{"end": true}`. Fails after 20 s without one.
    pub async fn next(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("a message within 20 s");
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).unwrap();
                    // Keep-alives of the legacy protocol.
                    if value["type"] == "ka" || value["type"] == "ping" {
                        continue;
                    }
                    return value;
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return json!({ "close": code, "reason": reason });
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return json!({ "end": true }),
            }
        }
    }

    /// The payload of the next event of any subscription (`next` / `data`), with its id.
    pub async fn event(&mut self) -> (String, Value) {
        let message = self.next().await;
        let kind = if self.protocol == NEW { "next" } else { "data" };
        assert_eq!(message["type"], kind, "{message}");
        (
            message["id"].as_str().unwrap().to_owned(),
            message["payload"].clone(),
        )
    }
}

/// Waits until the service counts `count` open subscriptions (in `/metrics`): a subscription starts when
/// the server has read it, after the client sent it.
pub async fn eventually_live(app: &TestApp, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = app.metrics_text().await;
        let open = metrics
            .lines()
            .find_map(|line| line.strip_prefix("dataapi_live_subscriptions "))
            .and_then(|value| value.trim().parse::<usize>().ok());
        if open == Some(count) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open:?} subscriptions open, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const STORED: &str = "subscription($filter: LiveMessageFilter, $after: ChangeToken) {
    messageStored(filter: $filter, after: $after) { change message { dialogId text language } }
}";
const REMOVED: &str = "subscription { dialogRemoved { change dialogId reason } }";
const DECIDED: &str = "subscription($after: ChangeToken) { consentDecided(after: $after) { change dialogId decision decidedAt } }";

/// (dialog, decision) of a `consentDecided` event.
fn decision_of(payload: &Value) -> (String, String) {
    let event = &payload["data"]["consentDecided"];
    (
        event["dialogId"]
            .as_str()
            .unwrap_or_else(|| panic!("{payload}"))
            .to_owned(),
        event["decision"].as_str().unwrap().to_owned(),
    )
}

/// The code of the error a subscription ended with: in a `next` (an error of its resolver, as
/// async-graphql sends it) or an `error` message (refused before it ran).
fn error_code(message: &Value) -> &str {
    let errors = match message["type"].as_str() {
        Some("next" | "data") => &message["payload"]["errors"],
        Some("error") => &message["payload"],
        _ => panic!("not an error: {message}"),
    };
    errors[0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code: {message}"))
}

pub fn text_of(payload: &Value) -> String {
    payload["data"]["messageStored"]["message"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{payload}"))
        .to_owned()
}

async fn stored_and_removed_reach_subscribers_of_both_protocols(app: TestApp) {
    let mut new = Subscriber::ready(&app, NEW, None).await;
    new.subscribe("s", STORED, json!({ "filter": { "language": "EN" } }))
        .await;
    new.subscribe("r", REMOVED, json!({})).await;
    let mut legacy = Subscriber::ready(&app, LEGACY, None).await;
    legacy.subscribe("1", STORED, json!({})).await;
    let mut decisions = Subscriber::ready(&app, NEW, None).await;
    decisions.subscribe("d", DECIDED, json!({})).await;
    // Messages stored before a subscription started are not its events: wait until all four started.
    eventually_live(&app, 4).await;

    app.push("ada", "a", "first", "en", None).await;
    app.push("ada", "a", "zweite", "de", None).await;
    app.push("ada", "a", "third", "en", None).await;
    app.consent("a", true).await;
    app.push("ada", "a", "after consent", "en", None).await;
    // Only English, in order, each once.
    for expected in ["first", "third", "after consent"] {
        let (id, payload) = new.event().await;
        assert_eq!((id.as_str(), text_of(&payload)), ("s", expected.to_owned()));
    }
    for expected in ["first", "zweite", "third", "after consent"] {
        let (id, payload) = legacy.event().await;
        assert_eq!((id.as_str(), text_of(&payload)), ("1", expected.to_owned()));
    }
    app.consent("a", false).await;
    let (id, payload) = new.event().await;
    assert_eq!(id, "r");
    assert_eq!(
        payload["data"]["dialogRemoved"]["reason"], "WITHDRAWN",
        "{payload}"
    );
    assert_eq!(payload["data"]["dialogRemoved"]["dialogId"], "a");

    // Decisions that change something, in order; a repeated one is no event.
    app.push("bob", "b", "nein", "de", None).await;
    app.consent("b", false).await;
    app.consent("b", false).await;
    app.consent("a", true).await;
    for expected in [
        ("a", "GRANTED"),
        ("a", "WITHDRAWN"),
        ("b", "REFUSED"),
        ("a", "GRANTED"),
    ] {
        let (id, payload) = decisions.event().await;
        assert_eq!(id, "d");
        assert_eq!(
            decision_of(&payload),
            (expected.0.to_owned(), expected.1.to_owned()),
            "{payload}"
        );
        assert!(
            payload["data"]["consentDecided"]["decidedAt"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
    }

    // Stopping a subscription frees its place.
    new.stop("s").await;
    eventually_live(&app, 3).await;
}

/// A subscriber that was away resumes from the last change it saw: first what it missed, then live.
async fn a_subscriber_resumes_from_a_token(app: TestApp) {
    app.push("bob", "b", "one", "en", None).await;
    app.push("bob", "b", "two", "en", None).await;
    app.consent("b", true).await;
    let token = app.data("{ changes(first: 1) { token } }", json!({})).await["changes"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut subscriber = Subscriber::ready(&app, NEW, None).await;
    subscriber
        .subscribe("s", STORED, json!({ "after": token }))
        .await;
    let (_, payload) = subscriber.event().await;
    assert_eq!(text_of(&payload), "two", "what came after the token");
    app.push("bob", "b", "three", "en", None).await;
    let (_, payload) = subscriber.event().await;
    assert_eq!(text_of(&payload), "three");

    // Decisions replayed from the start, except an erased customer's (erasure deletes them too).
    app.push("cyd", "c", "gone", "en", None).await;
    app.consent("c", false).await;
    app.data(
        "mutation { eraseCustomer(customerId: \"cyd\") { dialogCount } }",
        json!({}),
    )
    .await;
    let mut replay = Subscriber::ready(&app, LEGACY, None).await;
    replay
        .subscribe("d", DECIDED, json!({ "after": "0" }))
        .await;
    let (_, payload) = replay.event().await;
    assert_eq!(
        decision_of(&payload),
        ("b".to_owned(), "GRANTED".to_owned())
    );
    app.push("dee", "e", "new", "en", None).await;
    app.consent("e", false).await;
    let (_, payload) = replay.event().await;
    assert_eq!(
        decision_of(&payload),
        ("e".to_owned(), "REFUSED".to_owned()),
        "the erased customer's refusal is not replayed"
    );

    // A token ahead of the database is refused on the subscription, with its code.
    subscriber
        .subscribe("bad", STORED, json!({ "after": "999999" }))
        .await;
    let error = subscriber.next().await;
    assert_eq!(error["id"], "bad");
    assert_eq!(error_code(&error), "INVALID_CHANGE_TOKEN", "{error}");
}

for_each_setup!(
    stored_and_removed_reach_subscribers_of_both_protocols,
    a_subscriber_resumes_from_a_token
);

/// The key goes in `connection_init`; without a valid one the connection closes with 4401; a key whose role
/// may not read gets FORBIDDEN on each subscription; pages of other origins may not connect at all.
async fn keys_roles_and_origins(app: TestApp) {
    for payload in [
        json!({}),
        json!({ "Authorization": "Bearer dak_wrong" }),
        json!({ "Authorization": crate::security::key(Role::Read) }),
        json!("Bearer"),
    ] {
        for protocol in [NEW, LEGACY] {
            let (mut subscriber, answer) =
                Subscriber::connect(&app, protocol, payload.clone()).await;
            if protocol == NEW {
                assert_eq!(answer["close"], 4401, "{payload}: {answer}");
                assert!(answer["reason"].as_str().unwrap().contains("Authorization"));
            } else {
                // The legacy protocol answers with connection_error and stops.
                assert_eq!(answer["type"], "connection_error", "{payload}: {answer}");
                subscriber.subscribe("x", STORED, json!({})).await;
                let after = subscriber.next().await;
                assert!(
                    after.get("close").is_some() || after.get("end").is_some(),
                    "{after}"
                );
            }
        }
    }
    // In the headers object, as GraphiQL sends its Headers tab, in any case.
    let (_, answer) = Subscriber::connect(
        &app,
        NEW,
        json!({ "headers": { "authorization": format!("Bearer {}", crate::security::key(Role::Read)) } }),
    )
    .await;
    assert_eq!(answer["type"], "connection_ack", "{answer}");

    let mut ingest = Subscriber::ready(&app, NEW, Some(crate::security::key(Role::Ingest))).await;
    ingest.subscribe("s", STORED, json!({})).await;
    let error = ingest.next().await;
    assert_eq!(error_code(&error), "FORBIDDEN", "{error}");

    // Cross-site WebSocket hijacking: another site's page, even with the user's browser, is refused.
    let refused = open(&app, NEW, &[("origin", "https://evil.example")]).await;
    assert_eq!(refused.err(), Some(403));
    let own = app.url("").trim_end_matches('/').to_owned();
    assert!(open(&app, NEW, &[("origin", own.as_str())]).await.is_ok());
    // No GraphQL subprotocol offered: a clear 400, not a connection that speaks nothing.
    assert_eq!(open(&app, "chat", &[]).await.err(), Some(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_need_a_key_a_read_role_and_an_allowed_origin() {
    run_with(
        crate::helpers::Backend::Sqlite,
        crate::security::keyed_config(),
        keys_roles_and_origins,
    )
    .await;
}

/// At most MAX_SUBSCRIPTIONS_PER_KEY per key, over all its connections; one ended frees its place.
async fn bounded_per_key(app: TestApp) {
    let key = crate::security::key(Role::Read);
    let mut first = Subscriber::ready(&app, NEW, Some(key)).await;
    let mut second = Subscriber::ready(&app, LEGACY, Some(key)).await;
    first.subscribe("1", STORED, json!({})).await;
    second.subscribe("2", REMOVED, json!({})).await;
    eventually_live(&app, 2).await;
    first.subscribe("3", STORED, json!({})).await;
    let error = first.next().await;
    assert_eq!(error["id"], "3");
    assert_eq!(error_code(&error), "TOO_MANY_SUBSCRIPTIONS", "{error}");
    // Another key has places of its own.
    let mut admin = Subscriber::ready(&app, NEW, Some(crate::security::key(Role::Admin))).await;
    admin.subscribe("a", STORED, json!({})).await;
    eventually_live(&app, 3).await;
    // A connection that goes away gives its places back.
    drop(second);
    eventually_live(&app, 2).await;
    first.subscribe("4", STORED, json!({})).await;
    eventually_live(&app, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_bounded_per_key() {
    let mut config = crate::security::keyed_config();
    config.limits.max_subscriptions_per_key = 2;
    run_with(crate::helpers::Backend::Sqlite, config, bounded_per_key).await;
}

/// A subscriber that stops reading while more than the backlog is stored is disconnected with 4008 and the
/// token to resume from, instead of being buffered without limit; one that reads keeps up with the same burst.
async fn slow_subscriber(app: TestApp) {
    let backlog = dataapi::live::SUBSCRIBER_BACKLOG;
    let mut slow = Subscriber::ready(&app, NEW, None).await;
    slow.subscribe("s", STORED, json!({})).await;
    let mut fast = Subscriber::ready(&app, NEW, None).await;
    fast.subscribe("f", STORED, json!({})).await;
    eventually_live(&app, 2).await;
    // Texts long enough that the socket buffers fill long before the burst is through.
    let count = backlog + 1500;
    let text = "x".repeat(9_000);
    let times: Vec<String> = (0..count)
        .map(|n| {
            chrono::DateTime::from_timestamp_millis(1_795_000_000_000 + n as i64)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        })
        .collect();
    let messages: Vec<(&str, &str)> = times.iter().map(|t| (t.as_str(), "en")).collect();
    crate::reading::store_dialog_with_text(
        &app,
        "big",
        "burst",
        &messages,
        "2026-11-28T00:00:00Z",
        &text,
    )
    .await;
    // The fast one reads everything.
    for _ in 0..count {
        let (id, _) = fast.event().await;
        assert_eq!(id, "f");
    }
    // The slow one, reading only now, finds the events its socket held, then the error and the close.
    let mut events = 0;
    let mut told = false;
    let close = loop {
        let message = slow.next().await;
        match message["type"].as_str() {
            Some("next") if message["payload"]["errors"].is_array() => {
                assert_eq!(error_code(&message), "SUBSCRIBER_TOO_SLOW", "{message}");
                told = true;
            }
            Some("next") => events += 1,
            Some("complete") => {}
            _ => break message,
        }
    };
    assert!(told, "the subscription ended with SUBSCRIBER_TOO_SLOW");
    assert!(
        events < count,
        "the slow subscriber was not given everything"
    );
    assert_eq!(
        close["close"],
        dataapi::live::SLOW_SUBSCRIBER_CLOSE,
        "{close}"
    );
    assert!(
        close["reason"].as_str().unwrap().contains("after="),
        "{close}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_disconnected_with_4008() {
    run_with(
        crate::helpers::Backend::Sqlite,
        crate::helpers::test_config(),
        slow_subscriber,
    )
    .await;
}
