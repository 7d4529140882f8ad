//! Building and running the service: one builder used by `main`, the tests and the benchmarks alike. It opens
//! the store, binds the listener (port 0 gives a free port, reported by `local_addr`), and serves until a
//! shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::config::{Config, DatabaseConfig};
use crate::http::{self, AppState};
use crate::schema::{self, Limits};
use crate::service::DialogService;
use crate::store::{MongoStore, SharedStore, SqliteStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} (BIND_ADDR): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens the store that `config` names.
pub async fn open_store(config: &DatabaseConfig) -> Result<SharedStore, StoreError> {
    Ok(match config {
        DatabaseConfig::Sqlite { path } => Arc::new(SqliteStore::open(path).await?),
        DatabaseConfig::Mongo { url, database } => {
            Arc::new(MongoStore::connect(url, database).await?)
        }
    })
}

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    service: Arc<DialogService>,
}

impl Application {
    /// Opens the configured store and binds `config.bind_addr`.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let store = open_store(&config.database).await?;
        Self::with_store(config, store).await
    }

    /// Like [`build`](Self::build) with a store made by the caller (tests wrap stores to count or fail calls).
    pub async fn with_store(config: &Config, store: SharedStore) -> Result<Self, StartupError> {
        let service = Arc::new(DialogService::new(store));
        let limits = Limits {
            max_page_size: config.max_page_size,
        };
        let schema = schema::build(service.clone(), limits);
        let router = http::router(AppState {
            schema,
            service: service.clone(),
            limits,
        })
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

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Serves until SIGINT (Ctrl-C) or SIGTERM.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }
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
