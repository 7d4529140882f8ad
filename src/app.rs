//! Building and running the service: one builder used by `main`, the tests and the benchmarks alike. It opens
//! the store, binds the listener (port 0 gives a free port, reported by `local_addr`), and serves until a
//! shutdown signal, then lets in-flight requests finish within a deadline and closes the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::auth::KeyRing;
use crate::buffer::redis::RedisOptions;
use crate::buffer::{BufferError, BufferLimits, MemoryBuffer, RedisBuffer, SharedBuffer};
use crate::config::{BufferBackend, Config, DatabaseConfig};
use crate::connections;
use crate::execution::Executor;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::model::AuditKey;
use crate::schema::Limits;
use crate::service::DialogService;
use crate::store::{GuardedStore, MongoStore, SharedStore, SqliteStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot reach the dialog buffer (BUFFER_URL): {0}")]
    Buffer(#[from] BufferError),
    #[error("cannot listen on {addr} (BIND_ADDR): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens the store that `config` names.
pub async fn open_store(config: &Config) -> Result<SharedStore, StoreError> {
    Ok(match &config.database {
        // Four fifths of the call's deadline: a write commits while its caller still waits, or never.
        DatabaseConfig::Sqlite { path } => Arc::new(
            SqliteStore::open(path)
                .await?
                .with_write_deadline(config.store_timeout * 4 / 5),
        ),
        DatabaseConfig::Mongo { url, database } => {
            Arc::new(MongoStore::connect(url, database).await?)
        }
    })
}

/// Opens the buffer that `config` names.
pub async fn open_buffer(config: &Config) -> Result<SharedBuffer, BufferError> {
    let limits = BufferLimits {
        max_messages_per_dialog: config.buffer.max_messages_per_dialog,
        max_bytes: config.buffer.max_bytes,
        ttl: config.buffer.ttl,
    };
    Ok(match &config.buffer.backend {
        BufferBackend::Memory => Arc::new(MemoryBuffer::new(limits)),
        BufferBackend::Redis { urls, key_prefix } => Arc::new(
            RedisBuffer::connect(RedisOptions {
                urls: urls.clone(),
                key_prefix: key_prefix.clone(),
                timeout: config.buffer.timeout,
                lease: decision_lease(config),
                limits,
            })
            .await?,
        ),
    })
}

/// How long a decision (or an erasure) holds its lease in a shared buffer: three times the longest its
/// store and buffer calls may take, so that only a replica that stopped loses it.
pub fn decision_lease(config: &Config) -> std::time::Duration {
    (config.store_timeout + config.buffer.timeout) * 3
}

/// How often the retention sweeper runs: every tenth of the retention period, and at least twice per
/// decision lease (so that a decision a replica left half-done is finished soon after its lease ends);
/// between 10 ms and a minute.
pub fn sweep_period(config: &Config) -> std::time::Duration {
    (config.buffer.ttl / 10)
        .min(decision_lease(config) / 2)
        .clamp(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_secs(60),
        )
}

/// How often unfinished erasures (cut short by a crash, or whose caller gave up) are looked for.
const ERASURE_RESUME_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    service: Arc<DialogService>,
    keys: KeyRing,
    config: Config,
}

impl Application {
    /// Opens the configured store and binds `config.bind_addr`.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let store = open_store(config).await?;
        Self::with_store(config, store).await
    }

    /// Like [`build`](Self::build) with a store made by the caller (tests wrap stores to count or fail calls).
    pub async fn with_store(config: &Config, store: SharedStore) -> Result<Self, StartupError> {
        let buffer = open_buffer(config).await?;
        Self::with_parts(config, store, buffer).await
    }

    /// Like [`build`](Self::build) with a store and a buffer made by the caller.
    pub async fn with_parts(
        config: &Config,
        store: SharedStore,
        buffer: SharedBuffer,
    ) -> Result<Self, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let store: SharedStore = Arc::new(GuardedStore::new(
            store,
            config.store_timeout,
            metrics.clone(),
        ));
        let audit_key = match &config.audit_secret {
            Some(key) => key.clone(),
            None => {
                let mut proposed = [0u8; 32];
                getrandom::fill(&mut proposed).expect("the operating system's random source");
                AuditKey::from_bytes(store.audit_secret(proposed).await?)
            }
        };
        let service = Arc::new(
            DialogService::new(store, buffer, metrics, audit_key)
                .with_erasure_batch_messages(config.erasure_batch_messages),
        );
        let limits = Limits {
            max_page_size: config.limits.max_page_size,
            max_push_messages: config.limits.max_push_messages,
            max_query_depth: config.limits.max_query_depth,
            max_query_complexity: config.limits.max_query_complexity,
            max_store_calls: config.limits.max_store_calls,
            max_loaded_messages: config.limits.max_loaded_messages,
            max_stats_groups: config.limits.max_stats_groups,
            max_subscriptions_per_key: config.limits.max_subscriptions_per_key,
        };
        let executor = Arc::new(Executor::new(
            service.clone(),
            limits,
            config.access.introspection,
        ));
        let keys = KeyRing::new(
            config.access.api_keys.clone(),
            config.access.api_keys_file.clone(),
        );
        let router = http::router(
            AppState {
                executor,
                service: service.clone(),
                limits,
                api_keys: keys.clone(),
                max_batch_operations: config.limits.max_batch_operations,
                max_body_bytes: config.limits.max_body_bytes,
                max_response_bytes: config.limits.max_response_bytes,
                keyless_hosts: config
                    .access
                    .api_keys
                    .is_empty()
                    .then(|| Arc::new(config.access.allowed_hosts.clone())),
                admission: (config.clients.requests_per_second > 0
                    || config.clients.concurrent_requests > 0)
                    .then(|| Arc::new(crate::admission::Admission::new(config.clients))),
                exports: Arc::new(tokio::sync::Semaphore::new(crate::export::EXPORTS_AT_ONCE)),
                allowed_origins: Arc::new(config.access.cors_origins.clone()),
            },
            config.access.graphiql,
            &config.access.cors_origins,
        )
        // A client that trickles its body (or a request that hangs) is cut off with 408.
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(TraceLayer::new_for_http());
        let listener = TcpListener::bind(config.bind_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: config.bind_addr,
                source,
            })?;
        Ok(Self {
            listener,
            router,
            service,
            keys,
            config: config.clone(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn service(&self) -> &Arc<DialogService> {
        &self.service
    }

    /// Serves until `shutdown` completes; then stops accepting, gives in-flight requests
    /// `SHUTDOWN_TIMEOUT` to finish, and closes the store. Undecided messages in the buffer are dropped
    /// (they are never written anywhere without consent); their number is logged.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let sweeper = self.service.spawn_sweeper(sweep_period(&self.config));
        let live_poller = self.service.live().spawn_poller();
        // Another replica's erasure writes a batch at least once per STORE_TIMEOUT while it runs.
        let erasure_resumer = self
            .service
            .spawn_erasure_resumer(ERASURE_RESUME_PERIOD, 3 * self.config.store_timeout);
        let key_reloader = spawn_key_reloader(self.keys.clone());
        let stopping = Arc::new(tokio::sync::Notify::new());
        let signalled = stopping.clone();
        let limits = self.config.connections.fitted_to_open_file_limit();
        let live = self.service.live().clone();
        let server = connections::serve(self.listener, self.router, limits, async move {
            shutdown.await;
            // Connections of subscribers would otherwise hold the shutdown up to its deadline.
            live.shut_down();
            signalled.notify_one();
        });
        let deadline = self.config.shutdown_timeout;
        tokio::select! {
            () = server => {},
            () = async {
                stopping.notified().await;
                tokio::time::sleep(deadline).await;
            } => {
                tracing::warn!(?deadline, "requests still running at the shutdown deadline were cut off");
            }
        };
        sweeper.abort();
        live_poller.abort();
        erasure_resumer.abort();
        if let Some(reloader) = key_reloader {
            reloader.abort();
        }
        let buffer = self.service.buffer();
        if !buffer.is_shared()
            && let Ok(buffered) = buffer.stats().await
            && buffered.messages > 0
        {
            tracing::warn!(
                dialogs = buffered.dialogs,
                messages = buffered.messages,
                "shutting down: undecided buffered messages are dropped, never stored"
            );
        }
        buffer.close().await;
        self.service.store().close().await;
        tracing::info!("stopped");
        Ok(())
    }

    /// Serves until SIGINT (Ctrl-C) or SIGTERM.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

/// With `API_KEYS_FILE`, reads the keys again on every SIGHUP (see `KeyRing`).
fn spawn_key_reloader(keys: KeyRing) -> Option<tokio::task::JoinHandle<()>> {
    keys.file()?;
    #[cfg(unix)]
    {
        let mut hangups = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::hangup(),
        ) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP: API_KEYS_FILE is read only at startup");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match keys.reload() {
                    Ok(count) => tracing::info!(keys = count, "API_KEYS_FILE reloaded"),
                    Err(reason) => tracing::error!(
                        "API_KEYS_FILE not reloaded, the keys in force stay as they were: {reason}"
                    ),
                }
            }
        }))
    }
    #[cfg(not(unix))]
    None
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received: finishing in-flight requests");
}
