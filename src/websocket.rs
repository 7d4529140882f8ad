//! GraphQL subscriptions over WebSocket at `GET /graphql` (an upgrade request): the protocols
//! `graphql-transport-ws` and the legacy `graphql-ws`, as async-graphql speaks them. The events come from
//! `live`; this module only admits connections and carries messages.
//!
//! Admission, in order: the host check and the per-client limits (the connection counts as a request in
//! flight while it lasts), the page's origin (a browser opens WebSockets across origins without asking,
//! so only the service's own pages and CORS_ALLOWED_ORIGINS may), then the key in the `connection_init`
//! payload, `{"Authorization": "Bearer <key>"}` (browsers cannot set headers on a WebSocket). Roles and the
//! bounds on subscriptions apply per subscription, as GraphQL errors.

use std::sync::Arc;

use async_graphql::Data;
use async_graphql::http::{ALL_WEBSOCKET_PROTOCOLS, WebSocketProtocols, WsMessage};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::{FromRequestParts, Request, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};

use crate::http::{AppState, Rejection};
use crate::live::CloseSignal;

/// The close code for a `connection_init` without a valid key (graphql-transport-ws uses 4403 for
/// "forbidden"; 4401 says what is missing).
pub const UNAUTHENTICATED_CLOSE: u16 = 4401;

/// The close code sent to open connections when the service shuts down ("going away").
const GOING_AWAY: u16 = 1001;

/// A message the client has not taken in this long (it stopped reading, its socket is full) ends the
/// connection: a subscriber that does not read holds its place and a task, not more.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether `headers` ask to upgrade to a WebSocket.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
}

/// Answers an upgrade request on `/graphql`.
pub async fn upgrade(state: AppState, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let ticket = match crate::http::guard(&state, &parts) {
        Ok(ticket) => ticket,
        Err(refusal) => return crate::http::reject(&state, refusal),
    };
    if let Some(origin) = parts.headers.get(header::ORIGIN)
        && !same_origin(origin, &parts.headers)
        && !state.allowed_origins.allows(origin)
    {
        return crate::http::reject(
            &state,
            Rejection::new(
                StatusCode::FORBIDDEN,
                "ORIGIN_NOT_ALLOWED",
                "this page's origin may not open live updates: add it to CORS_ALLOWED_ORIGINS",
            ),
        );
    }
    let protocol = parts
        .headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .and_then(|offered| {
            offered
                .split(',')
                .find_map(|name| name.trim().parse::<WebSocketProtocols>().ok())
        });
    let Some(protocol) = protocol else {
        return crate::http::reject(
            &state,
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                "offer a GraphQL WebSocket subprotocol: graphql-transport-ws (or the legacy graphql-ws)",
            ),
        );
    };
    // The connection's place under MAX_CONNECTIONS stays taken while the WebSocket lasts.
    let slot = parts
        .extensions
        .get::<crate::connections::ConnectionSlot>()
        .cloned();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| async move {
            // The connection counts as the client's request in flight until it ends.
            let _ticket = ticket;
            let _slot = slot;
            serve(socket, state, protocol).await;
        })
}

/// A page of this service (GraphiQL) has the origin of the address it was loaded from.
fn same_origin(origin: &HeaderValue, headers: &HeaderMap) -> bool {
    let (Ok(origin), Some(host)) = (
        origin.to_str(),
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    ) else {
        return false;
    };
    origin.split_once("://").is_some_and(|(scheme, authority)| {
        matches!(scheme, "http" | "https") && authority.eq_ignore_ascii_case(host)
    })
}

/// Carries one connection's messages until either side closes it, a subscriber is too slow (see `live`),
/// or the service shuts down.
async fn serve(socket: WebSocket, state: AppState, protocol: WebSocketProtocols) {
    let close = Arc::new(CloseSignal::default());
    let mut data = Data::default();
    data.insert(close.clone());
    let keys = state.api_keys.clone();
    let (mut sink, stream) = socket.split();
    let input = stream
        .take_while(|message| futures::future::ready(message.is_ok()))
        .filter_map(|message| {
            futures::future::ready(match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => Some(message.into_data()),
                _ => None,
            })
        });
    let output =
        async_graphql::http::WebSocket::new(state.executor.schema().clone(), input, protocol)
            .connection_data(data)
            .on_connection_init(move |payload| async move { authenticate(&keys, &payload) });
    futures::pin_mut!(output);
    let shutdown = state.service.live().shutting_down();
    futures::pin_mut!(shutdown);
    loop {
        let message = tokio::select! {
            // What the subscriptions said first (a last error goes out before the close it caused).
            biased;
            message = output.next() => match message {
                Some(WsMessage::Text(text)) => Message::Text(text.into()),
                Some(WsMessage::Close(code, reason)) => close_frame(code, reason),
                None => break,
            },
            (code, reason) = close.closed() => close_frame(code, reason),
            () = &mut shutdown => close_frame(GOING_AWAY, "the service is shutting down: reconnect".into()),
        };
        let last = matches!(message, Message::Close(_));
        match tokio::time::timeout(SEND_TIMEOUT, sink.send(message)).await {
            Ok(Ok(())) if !last => {}
            _ => break,
        }
    }
}

/// A close frame; an init refused for its key gets [`UNAUTHENTICATED_CLOSE`] instead of the generic 1002.
fn close_frame(code: u16, reason: String) -> Message {
    let code = match reason.starts_with(UNAUTHENTICATED) {
        true => UNAUTHENTICATED_CLOSE,
        false => code,
    };
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// How refusals of a `connection_init` begin (the close frame's reason), so that `close_frame` can give
/// them their code.
const UNAUTHENTICATED: &str = "UNAUTHENTICATED";

/// The caller named by the key in a `connection_init` payload: `{"Authorization": "Bearer <key>"}`, the
/// name in any case, also inside `"headers"` (where GraphiQL's Headers tab puts it).
fn authenticate(
    keys: &crate::auth::KeyRing,
    payload: &serde_json::Value,
) -> async_graphql::Result<Data> {
    let authorization = [payload, &payload["headers"]]
        .into_iter()
        .filter_map(serde_json::Value::as_object)
        .flat_map(|object| object.iter())
        .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, value)| value.as_str())
        .and_then(|value| HeaderValue::from_str(value).ok());
    let mut headers = HeaderMap::new();
    if let Some(authorization) = authorization {
        headers.insert(header::AUTHORIZATION, authorization);
    }
    let Some((caller, caller_name)) = crate::http::caller(&keys.current(), &headers) else {
        // A close frame's reason holds at most 123 bytes.
        return Err(async_graphql::Error::new(format!(
            "{UNAUTHENTICATED}: send {{\"Authorization\": \"Bearer <key>\"}} in connection_init"
        )));
    };
    let mut data = Data::default();
    data.insert(caller);
    data.insert(caller_name);
    Ok(data)
}
