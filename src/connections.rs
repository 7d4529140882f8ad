//! Accepting connections, with bounds: a client that opens connections and sends nothing (or sends its
//! headers a byte at a time) holds a file descriptor and a task for as long as it likes unless the server
//! says otherwise, and once the process runs out of descriptors it stops accepting anyone, `/health`
//! included. So:
//! - a client has `HEADER_READ_TIMEOUT` to send a request's headers, counted from the moment its
//!   connection is ready for a request: hyper's clock starts when a keep-alive connection goes idle too,
//!   so an idle connection is closed after the same time (bodies are bounded by `REQUEST_TIMEOUT`);
//! - at most `MAX_CONNECTIONS` are open at once; past that, new ones wait in the kernel's accept queue
//!   (they take none of our descriptors) until one closes;
//! - the open-file limit is raised at startup as far as the system allows, and the cap is lowered to fit
//!   under it, with room for the database and Redis connections and the store's files.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// Descriptors kept for everything but clients: database and Redis pools, SQLite's files, logs.
const RESERVED_FILES: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// Raises the soft open-file limit to the hard one, and lowers `max_connections` to fit under what is in
    /// force (logged when it does).
    pub fn fitted_to_open_file_limit(self) -> Self {
        let limit = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => limit,
            Err(error) => {
                tracing::warn!(%error, "cannot read or raise the open-file limit");
                return self;
            }
        };
        let room =
            usize::try_from(limit.saturating_sub(RESERVED_FILES).max(16)).unwrap_or(usize::MAX);
        if room < self.max_connections {
            tracing::warn!(
                open_file_limit = limit,
                max_connections = room,
                "the open-file limit allows fewer connections than MAX_CONNECTIONS: raise `ulimit -n` (or \
                 the container's nofile limit) to serve more"
            );
            return Self {
                max_connections: room,
                ..self
            };
        }
        self
    }
}

/// A connection's place under `MAX_CONNECTIONS`, in each of its requests' extensions: a request that
/// upgrades the connection to a WebSocket keeps it for as long as the WebSocket lasts.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting and waits for the open
/// connections to finish their requests (the caller bounds that wait). Upgraded connections (WebSockets)
/// are not waited for: the application closes them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // hyper-util's GracefulShutdown does not take connections that may upgrade: the same, by hand. Each
    // connection's task holds a sender; once all are dropped, every connection has finished.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        // A free slot first: past the cap, connections wait in the kernel's queue, not in our descriptors.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors (or memory) for a moment: back off instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let slot = ConnectionSlot(Arc::new(slot));
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(slot.clone());
            let response = router.clone().oneshot(request);
            async move { Ok::<_, Infallible>(response.await.unwrap_or_else(|never| match never {})) }
        });
        // With upgrades: GraphQL subscriptions run over WebSockets.
        let connection = http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stop = stop.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let _open = open;
            tokio::pin!(connection);
            let finished = tokio::select! {
                finished = connection.as_mut() => finished,
                () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                    // Ends the connection once its request in progress (if any) is answered.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // Timeouts and clients that go away end here; nothing to tell anyone.
            if let Err(error) = finished {
                tracing::debug!(%error, %peer, "connection closed with an error");
            }
        });
    }
    drop(listener);
    stopping.send_replace(true);
    drop(open);
    let _ = all_closed.recv().await;
}
